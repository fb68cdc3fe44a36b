//! The faulty file operations themselves, and the journal under them: a failed fsync or write
//! poisons it without another call, a short write is cut back to the last whole record, and a
//! spill is retried once in a fresh segment. Recovery's own writes (the directory, the run
//! counter, a torn tail's truncation, the copy of a damaged segment) and the probe fail as
//! documented: the run counter and the directory stop the start, a truncation or a copy is
//! logged and the start goes on, and the probe hands its error back.

use std::fs::File;

use super::*;
use crate::error::StartError;
use crate::journal::format::{self, HEADER_LEN, Kind};
use crate::journal::record::{TaskRecord, TaskState};
use crate::task::TaskId;

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn the_chosen_calls_fail_with_the_chosen_error_and_the_others_pass() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let faults = Faults::new();
    let ops = faults.ops();
    faults.fail_nth(Op::Create, 1, EIO);
    let error = ops.create(&path).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(EIO));
    assert!(!path.exists(), "a failed create makes no file");
    let mut file = ops.create(&path).unwrap();

    faults.fail_nth(Op::Write, 2, ENOSPC);
    ops.write(&path, &mut file, b"one ").unwrap();
    let error = ops.write(&path, &mut file, b"two ").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(ENOSPC));
    ops.write(&path, &mut file, b"three").unwrap();
    assert_eq!(read(&path), b"one three");

    faults.fail_from_next(Op::Sync, EIO);
    for _ in 0..3 {
        assert_eq!(
            ops.sync(&path, &file).unwrap_err().raw_os_error(),
            Some(EIO)
        );
    }
    faults.clear();
    ops.sync(&path, &file).unwrap();
    assert_eq!(
        [Op::Create, Op::Write, Op::Sync, Op::SyncDir].map(|op| faults.calls(op)),
        [2, 3, 4, 0]
    );
}

#[test]
fn a_short_write_puts_its_prefix_in_the_file_then_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let faults = Faults::new();
    let ops = faults.ops();
    let mut file = ops.create(&path).unwrap();
    faults.short_write_next(5, ENOSPC);
    let error = ops.write(&path, &mut file, b"hello world").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(ENOSPC));
    assert_eq!(read(&path), b"hello");
    ops.write(&path, &mut file, b"!").unwrap();
    assert_eq!(read(&path), b"hello!");
}

#[test]
fn a_power_cut_keeps_only_what_was_synced() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let ops = faults.ops();
    let [synced, entry_only, unlisted] =
        ["synced", "entry-only", "unlisted"].map(|n| dir.path().join(n));

    let mut a = ops.create(&synced).unwrap();
    ops.write(&synced, &mut a, b"kept").unwrap();
    ops.sync(&synced, &a).unwrap();
    let mut b = ops.create(&entry_only).unwrap();
    ops.sync_dir(dir.path()).unwrap();
    ops.write(&synced, &mut a, b" lost").unwrap();
    ops.write(&entry_only, &mut b, b"lost").unwrap();
    // Synced, but its directory entry never was.
    let mut c = ops.create(&unlisted).unwrap();
    ops.write(&unlisted, &mut c, b"lost").unwrap();
    ops.sync(&unlisted, &c).unwrap();
    // A file from before, written through the faults: what it held counts as durable.
    let old = dir.path().join("old");
    std::fs::write(&old, b"old").unwrap();
    let mut d = File::options().append(true).open(&old).unwrap();
    ops.write(&old, &mut d, b" lost").unwrap();

    faults.power_cut().unwrap();
    assert_eq!(read(&synced), b"kept");
    assert_eq!(read(&entry_only), b"");
    assert!(!unlisted.exists());
    assert_eq!(read(&old), b"old");
}

#[test]
fn a_torn_power_cut_keeps_a_prefix_of_the_unsynced_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let ops = faults.ops();
    let [synced, unsynced] = ["synced", "unsynced"].map(|n| dir.path().join(n));
    let mut a = ops.create(&synced).unwrap();
    ops.write(&synced, &mut a, b"kept").unwrap();
    ops.sync(&synced, &a).unwrap();
    ops.write(&synced, &mut a, b"+torn").unwrap();
    let mut b = ops.create(&unsynced).unwrap();
    ops.write(&unsynced, &mut b, b"to").unwrap();
    let mut c = ops.create(&dir.path().join("short")).unwrap();
    ops.write(&dir.path().join("short"), &mut c, b"a").unwrap();

    faults.torn_power_cut(3).unwrap();
    assert_eq!(read(&synced), b"kept+to");
    assert_eq!(read(&unsynced), b"to");
    assert_eq!(read(&dir.path().join("short")), b"a");
}

#[test]
fn a_zeroed_power_cut_keeps_the_file_lengths_but_not_the_unsynced_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let ops = faults.ops();
    let path = dir.path().join("a");
    let mut a = ops.create(&path).unwrap();
    ops.write(&path, &mut a, b"kept").unwrap();
    ops.sync(&path, &a).unwrap();
    ops.write(&path, &mut a, b"lost").unwrap();
    faults.zeroed_power_cut(3).unwrap();
    assert_eq!(read(&path), b"kept\0\0\0");
}

/// A task record with a `u64` payload.
fn record(epoch: u64, seq: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let payload = seq.to_string();
    format::encode_record(&mut out, epoch, Kind::Task, &task(seq, &payload));
    out
}

/// Task `seq` with its `payload` (its sequence number, as JSON).
fn task(seq: u64, payload: &str) -> TaskRecord<'_> {
    TaskRecord {
        id: TaskId::new(1, seq),
        state: TaskState::default(),
        last_error: "".into(),
        payload: payload.as_bytes(),
        options: None,
    }
}

fn open(dir: &Path, faults: &Arc<Faults>) -> Journal {
    Journal::open(dir, faults.ops(), |_| ()).unwrap().0
}

const NO_SEAL: u64 = u64::MAX;

/// Appends task `seq`'s record as a batch of its own (synced if `sync`), into segments of
/// `segment_bytes` at most.
fn append_one(
    journal: &mut Journal,
    seq: u64,
    sync: bool,
    segment_bytes: u64,
) -> Result<crate::journal::handle::Appended, JournalError> {
    let epoch = journal.epoch();
    journal.append_batch(&record(epoch, seq), 1, sync, segment_bytes)
}

#[test]
fn a_failed_fsync_poisons_the_journal_and_nothing_is_written_or_synced_after_it() {
    for code in [EIO, ENOSPC] {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        let mut journal = open(dir.path(), &faults);
        append_one(&mut journal, 1, true, NO_SEAL).unwrap();
        faults.fail_next(Op::Sync, code);
        let error = append_one(&mut journal, 2, true, NO_SEAL).unwrap_err();
        assert_eq!(errno(&error), Some(code), "{error}");
        let calls = [Op::Create, Op::Write, Op::Sync, Op::Truncate].map(|op| faults.calls(op));
        for seq in 3..6 {
            let error = append_one(&mut journal, seq, true, NO_SEAL).unwrap_err();
            assert!(matches!(error, JournalError::Poisoned), "{error}");
        }
        assert_eq!(
            [Op::Create, Op::Write, Op::Sync, Op::Truncate].map(|op| faults.calls(op)),
            calls,
            "a failed fsync is never retried, nor anything written after it"
        );
        drop(journal);

        // What the failed fsync covered is not on the disk after a power cut; what an earlier
        // one covered is.
        faults.power_cut().unwrap();
        let (report, live) = recover(dir.path());
        assert_eq!(live, [1]);
        assert!(
            report.damage.is_empty() && report.torn_tails.is_empty(),
            "{report:?}"
        );
    }
}

#[test]
fn a_short_write_is_cut_back_to_the_last_whole_record() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let mut journal = open(dir.path(), &faults);
    let epoch = journal.epoch();
    let batch = [record(epoch, 1), record(epoch, 2)].concat();
    journal.append_batch(&batch, 2, true, NO_SEAL).unwrap();
    let segment = &only_segment(dir.path());
    let whole = (HEADER_LEN + batch.len()) as u64;
    assert_records_end(segment, whole);

    // The next batch stops 40 bytes into its first record.
    faults.short_write_next(40, ENOSPC);
    let batch = [record(epoch, 3), record(epoch, 4)].concat();
    let error = journal.append_batch(&batch, 2, true, NO_SEAL).unwrap_err();
    assert_eq!(errno(&error), Some(ENOSPC));
    assert_eq!(error.offset(), Some(whole), "{error}");
    assert_eq!(faults.calls(Op::Truncate), 1);
    // Cut back to the records, the room made ahead with them.
    assert_eq!(std::fs::metadata(segment).unwrap().len(), whole);
    assert!(matches!(
        journal.append_batch(&batch, 2, true, NO_SEAL),
        Err(JournalError::Poisoned)
    ));
    drop(journal);

    let (report, live) = recover(dir.path());
    assert_eq!(live, [1, 2]);
    assert_eq!(report.records, 2);
    assert!(
        report.damage.is_empty() && report.torn_tails.is_empty(),
        "{report:?}"
    );
}

#[test]
fn a_short_write_that_cannot_be_cut_back_is_a_torn_tail_at_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let mut journal = open(dir.path(), &faults);
    let epoch = journal.epoch();
    append_one(&mut journal, 1, true, NO_SEAL).unwrap();
    let whole = (HEADER_LEN + record(epoch, 1).len()) as u64;
    faults.short_write_next(40, ENOSPC);
    faults.fail_next(Op::Truncate, EIO);
    let error = append_one(&mut journal, 2, true, NO_SEAL).unwrap_err();
    assert_eq!(
        errno(&error),
        Some(ENOSPC),
        "the write's error, not the cut's"
    );
    drop(journal);
    let segment = segments(dir.path()).remove(0);
    // The torn record's 40 bytes, in the room made ahead.
    let len = std::fs::metadata(&segment).unwrap().len();
    assert!(len >= whole + 40, "{len}");

    let (report, live) = recover(dir.path());
    assert_eq!(live, [1]);
    assert!(report.damage.is_empty(), "{report:?}");
    // Inside the room the torn record reads as whole (its length fits) and fails its
    // checksum: the file is copied aside, as for any whole record failing its checks.
    assert_eq!(report.damaged_copies.len(), 1, "{report:?}");
    let [torn] = &report.torn_tails[..] else {
        panic!("one torn tail expected: {report:?}")
    };
    assert_eq!(
        (&torn.path, torn.offset, torn.len, torn.reason.as_str()),
        (&segment, whole, len - whole, "record checksum mismatch")
    );
    assert_eq!(
        std::fs::metadata(&segment).unwrap().len(),
        whole,
        "truncated"
    );
}

/// Spills tasks `seqs` (their payload is their sequence number).
fn spill(
    journal: &mut Journal,
    seqs: std::ops::Range<u64>,
) -> crate::journal::handle::SpillOutcome {
    let payloads: Vec<(u64, String)> = seqs.map(|seq| (seq, seq.to_string())).collect();
    let records: Vec<TaskRecord<'_>> = payloads
        .iter()
        .map(|(seq, payload)| task(*seq, payload))
        .collect();
    journal.spill(&records)
}

#[test]
fn a_spill_that_fails_once_is_written_whole_to_a_fresh_segment() {
    // The first segment's creation, header, records, fsync or directory fsync fails.
    let cases = [
        (Op::Create, 1),
        (Op::Write, 1),
        (Op::Write, 2),
        (Op::Sync, 1),
        (Op::SyncDir, 1),
    ];
    for (op, nth) in cases {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        let mut journal = open(dir.path(), &faults);
        faults.fail_nth(op, nth, EIO);
        let outcome = spill(&mut journal, 1..6);
        assert!(outcome.unsaved.is_empty(), "{op:?} {nth}");
        assert_eq!(outcome.written, 5, "{op:?} {nth}");
        let error = outcome.error.expect("the first failure is reported");
        assert_eq!(errno(&error), Some(EIO), "{op:?} {nth}: {error}");
        journal.close().unwrap();

        faults.power_cut().unwrap();
        let (report, live) = recover(dir.path());
        assert_eq!(live, [1, 2, 3, 4, 5], "{op:?} {nth}");
        assert!(
            report.damage.is_empty() && report.torn_tails.is_empty(),
            "{op:?} {nth}: {report:?}"
        );
    }
}

#[test]
fn a_spill_that_fails_twice_leaves_the_old_segments_in_place() {
    let dir = tempfile::tempdir().unwrap();
    // An earlier run spilled tasks 1 to 5.
    let mut journal = open(dir.path(), &Faults::new());
    assert!(spill(&mut journal, 1..6).unsaved.is_empty());
    journal.close().unwrap();
    let old = segments(dir.path());
    assert_eq!(old.len(), 1);

    // This run replays them and has two more, and every fsync fails.
    let faults = Faults::new();
    let mut journal = open(dir.path(), &faults);
    faults.fail_from(Op::Sync, 1, EIO);
    let outcome = spill(&mut journal, 1..8);
    assert_eq!(outcome.unsaved, [0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(outcome.written, 0);
    assert_eq!(outcome.error.as_ref().and_then(errno), Some(EIO));
    assert_eq!(faults.calls(Op::Create), 2, "one retry, in a fresh segment");
    journal.retire_obsolete().unwrap();
    journal.close().unwrap();
    assert!(old[0].exists(), "the old segment is kept");

    faults.power_cut().unwrap();
    let (report, live) = recover(dir.path());
    assert_eq!(live, [1, 2, 3, 4, 5]);
    assert!(
        report.damage.is_empty() && report.torn_tails.is_empty(),
        "{report:?}"
    );
}

/// A journal directory holding one closed segment with tasks 1 to 4; returns the segment.
fn closed_segment(dir: &Path) -> PathBuf {
    let mut journal = open(dir, &Faults::new());
    assert!(spill(&mut journal, 1..5).unsaved.is_empty());
    journal.close().unwrap();
    let segment = &only_segment(dir);
    segment.clone()
}

/// Opens `dir` on `faults`, returning what recovery found and the live `u64` payloads.
fn open_on(dir: &Path, faults: &Arc<Faults>) -> Result<(RecoveryReport, Vec<u64>), StartError> {
    let (journal, report, live) = Journal::open(dir, faults.ops(), |record| {
        std::str::from_utf8(record.payload)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    })?;
    drop(journal);
    Ok((report, live.into_iter().map(|task| task.value).collect()))
}

#[test]
fn a_failed_run_counter_write_fails_the_start_with_the_lock_file_and_its_error() {
    let dir = tempfile::tempdir().unwrap();
    closed_segment(dir.path());
    let faults = Faults::new();
    faults.fail_next(Op::WriteRun, EIO);
    let error = open_on(dir.path(), &faults).unwrap_err();
    let StartError::Journal(ref journal_error) = error else {
        panic!("expected a journal error, got {error:?}")
    };
    assert_eq!(errno(journal_error), Some(EIO), "{journal_error}");
    let lock = dir.path().join("LOCK");
    assert_eq!(journal_error.path(), Some(lock.as_path()));
    assert!(
        journal_error
            .to_string()
            .starts_with(&format!("write {}", lock.display())),
        "{journal_error}"
    );
    assert_eq!(faults.calls(Op::WriteRun), 1);

    // Nothing was changed, and the lock was released: the next start goes on as usual.
    let (report, live) = open_on(dir.path(), &Faults::new()).unwrap();
    assert_eq!(live, [1, 2, 3, 4]);
    assert_eq!(report.segments, 1);
}

#[test]
fn a_failed_directory_creation_fails_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let faults = Faults::new();
    faults.fail_next(Op::CreateDir, EIO);
    match open_on(&dir, &faults) {
        Err(StartError::Journal(error)) => {
            assert_eq!(errno(&error), Some(EIO), "{error}");
            assert_eq!(error.path(), Some(dir.as_path()));
        }
        other => panic!("expected a journal error, got {other:?}"),
    }
    assert!(!dir.exists());
}

#[test]
fn a_failed_torn_tail_truncation_is_logged_and_the_start_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let segment = closed_segment(dir.path());
    let full = std::fs::metadata(&segment).unwrap().len();
    let cut = full - 5;
    File::options()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(cut)
        .unwrap();

    let faults = Faults::new();
    faults.fail_next(Op::TruncateTail, EIO);
    let (report, live) = open_on(dir.path(), &faults).unwrap();
    assert_eq!(live, [1, 2, 3]);
    assert_eq!(report.torn_tails.len(), 1, "{report:?}");
    assert_eq!(faults.calls(Op::TruncateTail), 1);
    assert_eq!(
        std::fs::metadata(&segment).unwrap().len(),
        cut,
        "left as it was"
    );

    // The next start cuts it.
    let (report, live) = open_on(dir.path(), &Faults::new()).unwrap();
    assert_eq!(live, [1, 2, 3]);
    let valid_end = report.torn_tails[0].offset;
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), valid_end);
}

#[test]
fn a_failed_copy_of_a_damaged_segment_is_logged_and_the_start_goes_on() {
    for op in [Op::CreateDir, Op::KeepCopy] {
        let dir = tempfile::tempdir().unwrap();
        let segment = closed_segment(dir.path());
        let mut bytes = read(&segment);
        bytes[HEADER_LEN + 40] ^= 0x01; // inside the first record's body
        std::fs::write(&segment, &bytes).unwrap();

        let faults = Faults::new();
        // The first directory creation is the journal directory's own.
        let nth = if op == Op::CreateDir { 2 } else { 1 };
        faults.fail_nth(op, nth, EIO);
        let (report, live) = open_on(dir.path(), &faults).unwrap();
        assert_eq!(live, [2, 3, 4], "{op:?}");
        assert_eq!(report.damage.len(), 1, "{op:?}: {report:?}");
        assert!(report.damaged_copies.is_empty(), "{op:?}: {report:?}");
        assert_eq!(faults.calls(op), nth, "{op:?}");
    }
}

#[test]
fn a_failed_probe_is_an_error_with_the_probe_file() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let journal = open(dir.path(), &faults);
    assert!(journal.probe().is_ok());
    faults.fail_next(Op::Probe, ENOSPC);
    let error = journal.probe().unwrap_err();
    assert_eq!(errno(&error), Some(ENOSPC), "{error}");
    assert!(error.path().is_some_and(|p| p.ends_with("probe.tmp")));
    assert!(!dir.path().join("probe.tmp").exists());
}

/// The live payloads a start finds in `dir`, which must hold no damage and no torn tail.
fn recover_clean(dir: &Path) -> Vec<u64> {
    let (report, live) = recover(dir);
    assert!(
        report.damage.is_empty() && report.torn_tails.is_empty(),
        "{report:?}"
    );
    live
}

/// The size of the file at `path`.
fn size(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

#[test]
fn a_segment_synced_at_every_batch_is_written_over_room_made_ahead() {
    use crate::journal::writer::ROOM_AHEAD;
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let mut journal = open(dir.path(), &faults);
    let epoch = journal.epoch();
    append_one(&mut journal, 1, true, NO_SEAL).unwrap();
    let segment = &only_segment(dir.path());
    let one = (HEADER_LEN + record(epoch, 1).len()) as u64;
    assert!(size(segment) >= one + ROOM_AHEAD, "{}", size(segment));
    assert_records_end(segment, one);
    // The next batches are written over the room: none is made until it runs short.
    let room = size(segment);
    for seq in 2..10 {
        append_one(&mut journal, seq, true, NO_SEAL).unwrap();
    }
    assert_eq!((faults.calls(Op::Fill), size(segment)), (1, room));
    // What was synced is what a power cut leaves: every record, then at most room.
    drop(journal);
    faults.power_cut().unwrap();
    assert_eq!(recover_clean(dir.path()), (1..10).collect::<Vec<_>>());
}

#[test]
fn a_batch_not_synced_at_once_makes_no_room() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let mut journal = open(dir.path(), &faults);
    let epoch = journal.epoch();
    append_one(&mut journal, 1, false, NO_SEAL).unwrap();
    let segment = &only_segment(dir.path());
    assert_eq!(faults.calls(Op::Fill), 0);
    assert_eq!(size(segment), (HEADER_LEN + record(epoch, 1).len()) as u64);
}

#[test]
fn without_room_for_zeros_the_records_are_appended_as_they_come() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let mut journal = open(dir.path(), &faults);
    let epoch = journal.epoch();
    faults.fail_next(Op::Fill, ENOSPC);
    for seq in 1..4 {
        append_one(&mut journal, seq, true, NO_SEAL).unwrap();
    }
    let segment = &only_segment(dir.path());
    let records: usize = (1..4).map(|seq| record(epoch, seq).len()).sum();
    // Tried once for the segment, then not again; the records are all there.
    assert_eq!(faults.calls(Op::Fill), 1);
    assert_eq!(size(segment), (HEADER_LEN + records) as u64);
    drop(journal);
    assert_eq!(recover_clean(dir.path()), [1, 2, 3]);
}

#[test]
fn a_full_segment_is_sealed_without_its_room() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let mut journal = open(dir.path(), &faults);
    let epoch = journal.epoch();
    let len = record(epoch, 1).len() as u64;
    // Four records to a segment, and half a record more: the room stops at its size.
    let four = HEADER_LEN as u64 + 4 * len;
    let segment_bytes = four + len / 2;
    for seq in 1..=4 {
        append_one(&mut journal, seq, true, segment_bytes).unwrap();
    }
    let first = segments(dir.path()).remove(0);
    assert_eq!(
        size(&first),
        segment_bytes,
        "room to the segment's size only"
    );
    // The fifth seals the first segment, cut back to its records; the second gets room.
    append_one(&mut journal, 5, true, segment_bytes).unwrap();
    let [first, second] = &segments(dir.path())[..] else {
        panic!("two segments expected")
    };
    assert_eq!(size(first), four);
    assert_eq!(size(second), segment_bytes);
    assert_records_end(second, HEADER_LEN as u64 + len);
    drop(journal);
    assert_eq!(recover_clean(dir.path()), [1, 2, 3, 4, 5]);
}
