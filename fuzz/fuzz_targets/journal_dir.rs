//! The command-line tool's readers: `journal::{inspect, verify, stats}` over a directory
//! holding the input as one segment, and perhaps a `LOCK` file.
//!
//! Input: byte 0, bit 0: a dead-letter segment (else live), bit 1: write a `LOCK` file; byte 1:
//! the `LOCK` file's length, its content next; the rest is the segment.
//!
//! Asserts, besides "no panic":
//! - all three return `Ok`, or all three `UnsupportedVersion` for this segment, exactly when
//!   its header names a newer version;
//! - they agree with each other (segments, records, the damage count) and with the segment
//!   reader run on the same bytes (records, each damage and torn tail with its reason);
//! - every damage and torn tail lies in the file, is not empty, and they do not overlap;
//! - the live tasks and dead letters are those of the recovery rule applied to the reader's
//!   records (last record of an id wins), in id order, each with its record's fields, segment
//!   and offset; `stats`' counts and payload bytes match them;
//! - `stats().run` is the `LOCK` parser's result on the file's bytes (`None` without one);
//! - nothing in the directory changes: the segment and `LOCK` bytes stay, no `LOCK` is created,
//!   no `damaged/` copy is made.

#![no_main]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use drainpool::JournalError;
use drainpool::journal::fuzzing::{self, HEADER_LEN, Header, Record};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        // A tmpfs when there is one: the target writes a file per input.
        let shm = Path::new("/dev/shm");
        let builder = tempfile::Builder::new().prefix("drainpool-fuzz-").clone();
        if shm.is_dir() {
            builder.tempdir_in(shm)
        } else {
            builder.tempdir()
        }
        .expect("temporary directory")
    })
    .path()
}

fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("remove {}: {e}", path.display()),
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let dead = data[0] & 1 == 1;
    let lock_len = usize::from(data[1]).min(data.len() - 2);
    let lock = (data[0] & 2 == 2).then(|| &data[2..2 + lock_len]);
    let segment = &data[2 + lock_len..];

    let dir = dir();
    let live_path = dir.join("00000000000000000001.seg");
    let dead_path = dir.join("dead-00000000000000000001.seg");
    let lock_path = dir.join("LOCK");
    for path in [&live_path, &dead_path, &lock_path] {
        remove(path);
    }
    let path = if dead { dead_path } else { live_path };
    std::fs::write(&path, segment).unwrap();
    if let Some(lock) = lock {
        std::fs::write(&lock_path, lock).unwrap();
    }

    check(dir, &path, dead, segment, lock);

    assert_eq!(
        std::fs::read(&path).unwrap(),
        segment,
        "the segment is left as it was"
    );
    match lock {
        Some(lock) => assert_eq!(std::fs::read(&lock_path).unwrap(), lock),
        None => assert!(!lock_path.exists(), "no LOCK file is made"),
    }
    assert!(!dir.join("damaged").exists(), "no copy is made");
});

fn check(dir: &Path, path: &Path, dead: bool, segment: &[u8], lock: Option<&[u8]>) {
    let inspected = drainpool::journal::inspect(dir);
    let verified = drainpool::journal::verify(dir);
    let stats = drainpool::journal::stats(dir);
    let scan = fuzzing::scan(segment);

    if let Header::UnsupportedVersion(v) = scan.header {
        for error in [inspected.err(), verified.err(), stats.err()] {
            match error {
                Some(JournalError::UnsupportedVersion {
                    path: p,
                    found,
                    supported,
                    ..
                }) => assert_eq!((p.as_path(), found, supported), (path, v, 1)),
                other => panic!("expected UnsupportedVersion, got {other:?}"),
            }
        }
        return;
    }
    let inspected = inspected.expect("inspect");
    let verified = verified.expect("verify");
    let stats = stats.expect("stats");
    let len = segment.len() as u64;

    // The three agree with each other and with the reader.
    assert_eq!((inspected.segments, verified.segments), (1, 1));
    assert_eq!(
        (stats.segments, stats.dead_segments),
        (u64::from(!dead), u64::from(dead))
    );
    assert_eq!(stats.segment_bytes + stats.dead_segment_bytes, len);
    assert_eq!(verified.records, scan.records.len() as u64);
    assert_eq!(stats.records, verified.records);
    let damage = (verified.damage.len() + verified.torn_tails.len()) as u64;
    assert_eq!(inspected.damage, damage);
    assert_eq!(stats.damage, damage);
    assert_eq!((stats.damaged_copies, stats.damaged_copy_bytes), (0, 0));
    assert_eq!(stats.run, lock.and_then(fuzzing::parse_run));

    // Damage: in the file, not empty, in order, and what the reader found.
    let mut end = 0;
    for d in verified.damage.iter().chain(&verified.torn_tails) {
        assert_eq!(d.path, path);
        assert!(
            d.len > 0 && d.offset >= end && d.offset + d.len <= len,
            "{d:?} in {len}"
        );
        end = d.offset + d.len;
    }
    let header_damage = match scan.header {
        // A header holding another segment's number than its file's name: damage at 0.
        Header::Ok { segment, .. } if segment != 1 => {
            let first = &verified.damage[0];
            assert_eq!((first.offset, first.len), (0, HEADER_LEN as u64));
            assert!(
                first.reason.ends_with(&format!(
                    "holds segment number {segment}, but the file is named for segment 1"
                )),
                "{first:?}"
            );
            1
        }
        Header::Damaged { .. } => {
            let first = &verified.damage[0];
            assert_eq!((first.offset, first.len), (0, HEADER_LEN as u64));
            assert_eq!(
                Some(&first.reason),
                fuzzing::header_error_message(scan.header).as_ref()
            );
            if scan.epoch.is_none() && len > HEADER_LEN as u64 {
                2
            } else {
                1
            }
        }
        _ => 0,
    };
    assert_eq!(verified.damage.len(), header_damage + scan.damage.len());
    for (d, &(offset, skipped, error)) in verified.damage[header_damage..].iter().zip(&scan.damage)
    {
        assert_eq!((d.offset, d.len), (offset, skipped));
        assert_eq!(d.reason, error.to_string());
    }
    match (scan.torn_tail, verified.torn_tails.as_slice()) {
        (None, []) => {}
        (Some((offset, error)), [d]) => {
            assert_eq!((d.offset, d.len), (offset, len - offset));
            let reason = match scan.header {
                Header::Short => fuzzing::header_error_message(Header::Short).unwrap(),
                _ => error.to_string(),
            };
            assert_eq!(d.reason, reason);
        }
        (expected, found) => panic!("torn tail {expected:?}, verify found {found:?}"),
    }

    // The recovery rule, applied to the reader's records: the last record of an id wins.
    let mut live: BTreeMap<(u64, u64), (u64, &Record)> = BTreeMap::new();
    let mut dead_letters = live.clone();
    for (offset, record) in &scan.records {
        let id = (record.run, record.seq);
        match (dead, record.kind) {
            (false, 1) => {
                live.insert(id, (*offset, record));
            }
            (false, _) => {
                live.remove(&id);
            }
            (true, 3) => {
                dead_letters.insert(id, (*offset, record));
            }
            (true, 2) => {
                dead_letters.remove(&id);
            }
            (true, _) => {}
        }
    }
    same_tasks(&inspected.live, &live, path, true);
    same_tasks(&inspected.dead, &dead_letters, path, false);
    let payload_bytes = |tasks: &[drainpool::journal::JournaledTask]| {
        tasks.iter().map(|t| t.payload.len() as u64).sum::<u64>()
    };
    assert_eq!(stats.live_tasks, inspected.live.len() as u64);
    assert_eq!(stats.live_payload_bytes, payload_bytes(&inspected.live));
    assert_eq!(stats.dead_letters, inspected.dead.len() as u64);
    assert_eq!(stats.dead_payload_bytes, payload_bytes(&inspected.dead));
}

fn same_tasks(
    found: &[drainpool::journal::JournaledTask],
    expected: &BTreeMap<(u64, u64), (u64, &Record)>,
    path: &Path,
    by_priority: bool,
) {
    assert_eq!(found.len(), expected.len());
    // Live tasks in the replay order (higher priorities first, id order within one), dead
    // letters in id order.
    let mut expected: Vec<_> = expected.iter().collect();
    if by_priority {
        expected.sort_by_key(|(_, (_, record))| {
            std::cmp::Reverse(record.options.as_ref().map_or(0, |o| o.priority))
        });
    }
    for (task, (&(run, seq), &(offset, record))) in found.iter().zip(expected) {
        assert_eq!((task.id.run(), task.id.seq()), (run, seq), "replay order");
        let options = record.options.as_ref();
        assert_eq!(task.priority, options.map_or(0, |o| o.priority));
        assert_eq!(
            task.max_attempts,
            options.map(|o| o.max_attempts).filter(|&n| n > 0)
        );
        assert_eq!(
            task.expires_at_ms,
            options.map(|o| o.expires_ms).filter(|&ms| ms > 0)
        );
        assert_eq!(
            task.unique_key.as_deref(),
            options.map(|o| o.key.as_str()).filter(|k| !k.is_empty())
        );
        assert_eq!(task.segment, PathBuf::from(path));
        assert_eq!(task.offset, offset);
        assert_eq!(
            (task.attempts, task.interruptions, task.interrupted),
            (record.attempts, record.interruptions, record.interrupted)
        );
        assert_eq!(
            (task.enqueued_at_ms, task.not_before_ms),
            (record.enqueued_ms, record.not_before_ms)
        );
        let error =
            (!record.error.is_empty()).then(|| String::from_utf8_lossy(&record.error).into_owned());
        assert_eq!(task.last_error, error);
        assert_eq!(task.payload, record.payload);
    }
}
