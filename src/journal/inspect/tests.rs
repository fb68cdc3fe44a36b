use std::collections::BTreeMap;
use std::fs::File;
use std::sync::{Arc, Mutex};

use super::super::dir::{LOCK_FILE, list_segments};
use super::super::{Journal, reader};
use super::*;

fn meta(seq: u64) -> TaskState {
    TaskState {
        attempts: 2,
        interruptions: 1,
        interrupted: true,
        enqueued_ms: 1_700_000_000_000 + seq,
        not_before_ms: 1_800_000_000_000,
    }
}

fn payload(seq: u64) -> String {
    format!("{{\"n\":{seq}}}")
}

/// Opens `dir` as a pool would, spills `live` as tasks, sets `dead` aside as dead letters (each
/// with the error "failed <seq>"), acks `acked`, and closes. Returns the run.
fn write_journal(dir: &Path, live: &[u64], dead: &[u64], acked: &[u64]) -> u64 {
    let (mut journal, _, _) = Journal::open(dir, crate::journal::fs::os(), |_| ()).unwrap();
    let run = journal.run();
    let payloads: Vec<String> = live.iter().map(|&seq| payload(seq)).collect();
    let records: Vec<TaskRecord<'_>> = live
        .iter()
        .zip(&payloads)
        .map(|(&seq, payload)| TaskRecord {
            id: TaskId::new(run, seq),
            state: meta(seq),
            last_error: "".into(),
            payload: payload.as_bytes(),
            options: None,
        })
        .collect();
    let outcome = journal.spill(&records);
    assert!(outcome.unsaved.is_empty(), "{outcome:?}");
    for &seq in dead {
        let payload = payload(seq);
        let error = format!("failed {seq}");
        let record = TaskRecord {
            id: TaskId::new(run, seq),
            state: meta(seq),
            last_error: error.as_str().into(),
            payload: payload.as_bytes(),
            options: None,
        };
        journal.write_dead(&record).unwrap();
    }
    for &seq in acked {
        journal.append_ack(TaskId::new(run, seq)).unwrap();
    }
    journal.keep_obsolete();
    journal.close().unwrap();
    run
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

fn ids(tasks: &[JournaledTask]) -> Vec<TaskId> {
    tasks.iter().map(|t| t.id).collect()
}

fn segment_files(dir: &Path) -> Vec<(u64, bool)> {
    list_segments(dir)
        .unwrap()
        .into_iter()
        .map(|s| (s.number, s.dead))
        .collect()
}

/// The offsets of the records of a segment.
fn record_offsets(path: &Path) -> Vec<u64> {
    let bytes = std::fs::read(path).unwrap();
    let mut offsets = Vec::new();
    reader::scan(&bytes, |offset, _| offsets.push(offset));
    offsets
}

#[test]
fn inspect_keeps_the_last_state_of_each_task() {
    let tmp = tempfile::tempdir().unwrap();
    let run = write_journal(tmp.path(), &[1, 2, 3], &[4, 5], &[2]);
    let contents = inspect(tmp.path()).unwrap();
    let id = |seq| TaskId::new(run, seq);
    assert_eq!(ids(&contents.live), [id(1), id(3)]);
    assert_eq!(ids(&contents.dead), [id(4), id(5)]);
    assert_eq!(contents.damage, 0);

    let task = &contents.live[1];
    assert_eq!(task.attempts, 2);
    assert_eq!(task.interruptions, 1);
    assert!(task.interrupted);
    assert_eq!(task.enqueued_at_ms, 1_700_000_000_003);
    assert_eq!(task.not_before_ms, 1_800_000_000_000);
    assert_eq!(task.last_error, None);
    assert_eq!(task.payload, payload(3).as_bytes());
    assert_eq!(record_offsets(&task.segment)[2], task.offset);

    let dead = &contents.dead[0];
    assert_eq!(dead.last_error.as_deref(), Some("failed 4"));
    assert_eq!(dead.payload, payload(4).as_bytes());
    assert!(
        dead.segment
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("dead-")
    );
}

#[test]
fn an_ack_in_a_dead_segment_takes_a_dead_letter_back() {
    let tmp = tempfile::tempdir().unwrap();
    let run = write_journal(tmp.path(), &[], &[1, 2], &[]);
    write_taken_back(tmp.path(), 100, &[TaskId::new(run, 1)]).unwrap();
    let contents = inspect(tmp.path()).unwrap();
    assert_eq!(ids(&contents.dead), [TaskId::new(run, 2)]);
    assert!(contents.live.is_empty());
}

#[test]
fn reading_changes_nothing_and_works_while_a_pool_holds_the_lock() {
    let tmp = tempfile::tempdir().unwrap();
    write_journal(tmp.path(), &[1, 2, 3], &[4], &[]);
    // A torn tail, which recovery would truncate.
    let segment = list_segments(tmp.path()).unwrap()[0].path.clone();
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes.truncate(bytes.len() - 5);
    std::fs::write(&segment, &bytes).unwrap();
    let before = snapshot(tmp.path());

    // Lock the directory the way a running pool does.
    let lock = File::open(tmp.path().join(LOCK_FILE)).unwrap();
    lock.try_lock().unwrap();
    let contents = inspect(tmp.path()).unwrap();
    assert_eq!(contents.live.len(), 2);
    assert_eq!(contents.damage, 1);
    assert!(!verify(tmp.path()).unwrap().is_clean());
    let stats = stats(tmp.path()).unwrap();
    assert_eq!(
        (stats.live_tasks, stats.dead_letters, stats.damage),
        (2, 1, 1)
    );
    drop(lock);
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn verify_reports_each_kind_of_damage_at_its_offset() {
    let tmp = tempfile::tempdir().unwrap();
    write_journal(tmp.path(), &[1, 2, 3, 4], &[5], &[]);
    assert!(verify(tmp.path()).unwrap().is_clean());
    let segments = list_segments(tmp.path()).unwrap();
    let (live, dead) = (&segments[0].path, &segments[1].path);
    let offsets = record_offsets(live);

    // A flipped byte in the body of the second record: damage there, followed by valid ones.
    let mut bytes = std::fs::read(live).unwrap();
    bytes[offsets[1] as usize + 40] ^= 0x01;
    // The last record cut short: a torn tail.
    bytes.truncate(bytes.len() - 3);
    std::fs::write(live, &bytes).unwrap();
    // A damaged header in the dead segment.
    let mut dead_bytes = std::fs::read(dead).unwrap();
    dead_bytes[3] ^= 0x20;
    std::fs::write(dead, &dead_bytes).unwrap();

    let verification = verify(tmp.path()).unwrap();
    assert!(!verification.is_clean());
    assert_eq!(verification.segments, 2);
    // Records 1, 3 and the dead letter (read under its header's stored epoch).
    assert_eq!(verification.records, 3);
    let found: Vec<_> = verification
        .damage
        .iter()
        .map(|d| (d.path.clone(), d.offset, d.len))
        .collect();
    assert_eq!(
        found,
        [
            (live.clone(), offsets[1], offsets[2] - offsets[1]),
            (dead.clone(), 0, format::HEADER_LEN as u64),
        ]
    );
    assert_eq!(verification.damage[0].reason, "record checksum mismatch");
    assert_eq!(verification.damage[1].reason, "bad magic in segment header");
    let torn: Vec<_> = verification
        .torn_tails
        .iter()
        .map(|d| (d.path.clone(), d.offset, d.len))
        .collect();
    assert_eq!(
        torn,
        [(live.clone(), offsets[3], bytes.len() as u64 - offsets[3])]
    );
    // Read-only: the torn tail is still there.
    assert_eq!(std::fs::read(live).unwrap(), bytes);
}

#[test]
fn verify_reports_a_header_under_which_nothing_validates() {
    let tmp = tempfile::tempdir().unwrap();
    write_journal(tmp.path(), &[1, 2], &[], &[]);
    let live = list_segments(tmp.path()).unwrap()[0].path.clone();
    let mut bytes = std::fs::read(&live).unwrap();
    // Both stored epochs damaged: no record can be checked.
    bytes[16] ^= 0x01;
    bytes[24] ^= 0x02;
    std::fs::write(&live, &bytes).unwrap();
    let verification = verify(tmp.path()).unwrap();
    let found: Vec<_> = verification
        .damage
        .iter()
        .map(|d| (d.offset, d.len))
        .collect();
    let header = format::HEADER_LEN as u64;
    assert_eq!(found, [(0, header), (header, bytes.len() as u64 - header)]);
}

#[test]
fn verify_reports_a_header_cut_short_and_refuses_a_newer_version() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(segment_name(7, false));
    std::fs::write(
        &path,
        &format::encode_header(Header {
            epoch: 1,
            segment: 7,
        })[..20],
    )
    .unwrap();
    let verification = verify(tmp.path()).unwrap();
    assert!(verification.damage.is_empty());
    assert_eq!(verification.torn_tails.len(), 1);
    assert_eq!(verification.torn_tails[0].offset, 0);
    assert_eq!(
        verification.torn_tails[0].reason,
        "segment header is cut short"
    );

    let mut header = format::encode_header(Header {
        epoch: 1,
        segment: 7,
    });
    header[8] = 3;
    let crc = crc32c::crc32c(&header[0..40]);
    header[40..44].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, header).unwrap();
    match verify(tmp.path()) {
        Err(JournalError::UnsupportedVersion { found: 3, .. }) => {}
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
}

#[test]
fn stats_count_and_measure() {
    let tmp = tempfile::tempdir().unwrap();
    let run = write_journal(tmp.path(), &[1, 2, 3], &[4], &[3]);
    let stats = stats(tmp.path()).unwrap();
    let segments = list_segments(tmp.path()).unwrap();
    let size = |dead: bool| -> u64 {
        segments
            .iter()
            .filter(|s| s.dead == dead)
            .map(|s| std::fs::metadata(&s.path).unwrap().len())
            .sum()
    };
    assert_eq!((stats.segments, stats.dead_segments), (1, 1));
    assert_eq!(stats.segment_bytes, size(false));
    assert_eq!(stats.dead_segment_bytes, size(true));
    assert_eq!(stats.records, 5);
    assert_eq!((stats.live_tasks, stats.dead_letters), (2, 1));
    assert_eq!(
        stats.live_payload_bytes,
        (payload(1).len() + payload(2).len()) as u64
    );
    assert_eq!(stats.dead_payload_bytes, payload(4).len() as u64);
    assert_eq!((stats.damage, stats.damaged_copies), (0, 0));
    assert_eq!(stats.run, Some(run));
}

#[test]
fn requeue_moves_dead_letters_into_new_segments_above_every_other() {
    let tmp = tempfile::tempdir().unwrap();
    let run = write_journal(tmp.path(), &[1], &[2, 3, 4], &[]);
    let lock_before = std::fs::read(tmp.path().join(LOCK_FILE)).unwrap();
    assert_eq!(segment_files(tmp.path()), [(1, false), (2, true)]);
    let id = |seq| TaskId::new(run, seq);

    let done = requeue(tmp.path(), Requeue::Ids(vec![id(4), id(2), id(4)])).unwrap();
    assert_eq!(done.ids, [id(2), id(4)]);
    assert_eq!(
        segment_files(tmp.path()),
        [(1, false), (2, true), (3, false), (4, true)]
    );
    assert_eq!(
        done.live_segment,
        Some(tmp.path().join(segment_name(3, false)))
    );
    assert_eq!(
        done.dead_segment,
        Some(tmp.path().join(segment_name(4, true)))
    );
    assert_eq!(
        std::fs::read(tmp.path().join(LOCK_FILE)).unwrap(),
        lock_before
    );

    let contents = inspect(tmp.path()).unwrap();
    assert_eq!(ids(&contents.live), [id(1), id(2), id(4)]);
    assert_eq!(ids(&contents.dead), [id(3)]);
    let requeued = &contents.live[1];
    assert_eq!((requeued.attempts, requeued.interruptions), (0, 0));
    assert!(!requeued.interrupted);
    assert_eq!(requeued.not_before_ms, 0);
    assert_eq!(requeued.enqueued_at_ms, meta(2).enqueued_ms);
    assert_eq!(requeued.last_error.as_deref(), Some("failed 2"));
    assert_eq!(requeued.payload, payload(2).as_bytes());
    assert!(verify(tmp.path()).unwrap().is_clean());

    let done = requeue(tmp.path(), Requeue::All).unwrap();
    assert_eq!(done.ids, [id(3)]);
    assert!(inspect(tmp.path()).unwrap().dead.is_empty());
    // Nothing left: nothing written.
    let before = snapshot(tmp.path());
    assert_eq!(
        requeue(tmp.path(), Requeue::All).unwrap(),
        Requeued::default()
    );
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn requeue_of_an_id_that_is_not_a_dead_letter_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let run = write_journal(tmp.path(), &[1], &[2], &[]);
    let before = snapshot(tmp.path());
    let asked = vec![
        TaskId::new(run, 2),
        TaskId::new(run, 1),
        TaskId::new(run + 5, 9),
    ];
    match requeue(tmp.path(), Requeue::Ids(asked)) {
        Err(error @ RequeueError::NotDead { .. }) => {
            let text = error.to_string();
            assert_eq!(
                text,
                format!("no dead letter with id {run}-1, {}-9", run + 5)
            );
        }
        other => panic!("expected NotDead, got {other:?}"),
    }
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn requeue_refuses_while_a_pool_holds_the_lock() {
    let tmp = tempfile::tempdir().unwrap();
    write_journal(tmp.path(), &[], &[1], &[]);
    let (journal, _, _) = Journal::open(tmp.path(), crate::journal::fs::os(), |_| ()).unwrap();
    let before = snapshot(tmp.path());
    match requeue(tmp.path(), Requeue::All) {
        Err(error @ RequeueError::Locked { .. }) => assert_eq!(
            error.to_string(),
            format!(
                "journal directory {} is locked by a running pool; stop it first",
                tmp.path().display()
            )
        ),
        other => panic!("expected Locked, got {other:?}"),
    }
    assert_eq!(snapshot(tmp.path()), before);
    journal.close().unwrap();
    assert_eq!(requeue(tmp.path(), Requeue::All).unwrap().ids.len(), 1);
}

#[test]
fn requeue_refuses_a_directory_that_does_not_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    assert!(matches!(
        requeue(&missing, Requeue::All),
        Err(RequeueError::Journal(JournalError::Io { .. }))
    ));
    assert!(!missing.exists());
}

/// The first half of a requeue: the tasks written live, their dead letters not yet taken back,
/// as a crash between the two steps leaves it.
fn requeue_cut_short(dir: &Path, seqs: &[u64], run: u64) {
    let survey = survey(dir, true).unwrap();
    let tasks: Vec<&SurveyedTask> = seqs
        .iter()
        .map(|&seq| &survey.dead[&TaskId::new(run, seq)])
        .collect();
    write_live(dir, survey.next_number, &tasks).unwrap();
}

#[test]
fn a_requeue_cut_short_leaves_a_duplicate_and_a_second_requeue_completes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run = write_journal(tmp.path(), &[], &[1, 2], &[]);
    let id = |seq| TaskId::new(run, seq);
    requeue_cut_short(tmp.path(), &[1], run);
    let contents = inspect(tmp.path()).unwrap();
    assert_eq!(ids(&contents.live), [id(1)]);
    assert_eq!(ids(&contents.dead), [id(1), id(2)]);

    let done = requeue(tmp.path(), Requeue::All).unwrap();
    assert_eq!(done.ids, [id(1), id(2)]);
    let contents = inspect(tmp.path()).unwrap();
    assert_eq!(ids(&contents.live), [id(1), id(2)]);
    assert!(contents.dead.is_empty());
    // Task 1 was not written a second time.
    let live_records: usize = list_segments(tmp.path())
        .unwrap()
        .iter()
        .filter(|s| !s.dead)
        .map(|s| record_offsets(&s.path).len())
        .sum();
    assert_eq!(live_records, 2);
}

#[tokio::test]
async fn after_a_requeue_cut_short_the_next_start_runs_the_task() {
    let tmp = tempfile::tempdir().unwrap();
    let run = write_journal(tmp.path(), &[], &[1, 2], &[]);
    requeue_cut_short(tmp.path(), &[2], run);

    let ran = Arc::new(Mutex::new(Vec::new()));
    let pool = {
        let ran = Arc::clone(&ran);
        crate::Pool::<serde_json::Value>::builder()
            .workers(1)
            .journal_dir(tmp.path())
            .start(move |task: crate::Task<serde_json::Value>| {
                let ran = Arc::clone(&ran);
                async move {
                    ran.lock()
                        .unwrap()
                        .push((task.id(), task.payload().clone()));
                    Ok::<(), std::convert::Infallible>(())
                }
            })
            .await
            .unwrap()
    };
    assert_eq!(pool.recovery().replayed, 1);
    for _ in 0..10_000 {
        if !ran.lock().unwrap().is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let report = pool.shutdown().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        *ran.lock().unwrap(),
        [(TaskId::new(run, 2), serde_json::json!({ "n": 2 }))]
    );
    // Done, and still listed as a dead letter until taken back: a duplicate, never a loss.
    let contents = inspect(tmp.path()).unwrap();
    assert!(contents.live.is_empty());
    assert_eq!(
        ids(&contents.dead),
        [TaskId::new(run, 1), TaskId::new(run, 2)]
    );
}

#[test]
fn a_directory_with_no_lock_file_and_no_segment_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let not_journal = |e: JournalError| {
        assert_eq!(e.path(), Some(tmp.path().join(LOCK_FILE).as_path()));
        // The reason is the source, not repeated in the message.
        let source = std::error::Error::source(&e).map(ToString::to_string);
        assert!(
            source.is_some_and(|s| s.contains("not a journal directory")),
            "{e:?}"
        );
    };
    not_journal(inspect(tmp.path()).unwrap_err());
    not_journal(verify(tmp.path()).unwrap_err());
    not_journal(stats(tmp.path()).unwrap_err());
    match requeue(tmp.path(), Requeue::All) {
        Err(RequeueError::Journal(e)) => not_journal(e),
        other => panic!("expected a journal error, got {other:?}"),
    }
    assert!(snapshot(tmp.path()).is_empty());

    // A journal directory with nothing left in it is one.
    let (journal, _, _) = Journal::open(tmp.path(), crate::journal::fs::os(), |_| ()).unwrap();
    journal.close().unwrap();
    assert_eq!(inspect(tmp.path()).unwrap(), Contents::default());
    assert!(verify(tmp.path()).unwrap().is_clean());
    assert_eq!(stats(tmp.path()).unwrap().run, Some(1));
    assert_eq!(
        requeue(tmp.path(), Requeue::All).unwrap(),
        Requeued::default()
    );
}

#[test]
fn recovery_reports_the_damage_verify_shows() {
    let tmp = tempfile::tempdir().unwrap();
    write_journal(tmp.path(), &[1, 2, 3], &[4, 5], &[]);
    let segments = list_segments(tmp.path()).unwrap();
    let (live, dead) = (&segments[0].path, &segments[1].path);
    // Both copies of the live segment's epoch destroyed: none of its records can be checked.
    let mut bytes = std::fs::read(live).unwrap();
    for byte in &mut bytes[16..32] {
        *byte ^= 0xA5;
    }
    std::fs::write(live, &bytes).unwrap();
    // The dead-letter segment's first record damaged, a valid one after it.
    let mut bytes = std::fs::read(dead).unwrap();
    bytes[record_offsets(dead)[0] as usize + 40] ^= 0x01;
    std::fs::write(dead, &bytes).unwrap();
    // A segment cut inside its header.
    let header = format::encode_header(Header {
        epoch: 9,
        segment: 99,
    });
    std::fs::write(tmp.path().join(segment_name(99, false)), &header[..20]).unwrap();

    let verification = verify(tmp.path()).unwrap();
    let reasons: Vec<&str> = verification
        .damage
        .iter()
        .chain(&verification.torn_tails)
        .map(|d| d.reason.as_str())
        .collect();
    assert_eq!(
        reasons,
        [
            "segment header checksum mismatch",
            "no record validates under either epoch of the damaged header",
            "record checksum mismatch",
            "segment header is cut short",
        ]
    );

    let (journal, report, recovered) =
        Journal::open(tmp.path(), crate::journal::fs::os(), |_| ()).unwrap();
    drop(journal);
    assert!(recovered.is_empty());
    assert_eq!(report.damage, verification.damage);
    assert_eq!(report.torn_tails, verification.torn_tails);
    assert_eq!(report.dead_letters, 1);
    // The two damaged segments are copied aside; the one cut in its header is truncated.
    assert_eq!(report.damaged_copies.len(), 2, "{report:?}");
}
