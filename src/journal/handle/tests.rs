use std::collections::BTreeMap;

use super::*;
use crate::error::StartError;
use crate::journal::dir::{DAMAGED_DIR, LOCK_FILE, list_segments};
use crate::journal::{TaskState, fs};
use crate::report::{Damage, RecoveryReport};

/// A live task as recovery handed it back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    id: TaskId,
    state: TaskState,
    error: Vec<u8>,
    payload: Vec<u8>,
}

/// A task to spill.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    id: TaskId,
    meta: TaskState,
    error: String,
    payload: String,
}

impl Item {
    fn new(id: TaskId, payload: &str) -> Self {
        let meta = TaskState {
            attempts: (id.seq() % 3) as u32,
            interruptions: (id.seq() % 2) as u32,
            interrupted: id.seq() % 2 == 1,
            enqueued_ms: 1_700_000_000_000 + id.seq(),
            not_before_ms: 0,
        };
        let error = if id.seq().is_multiple_of(2) {
            format!("attempt of {id} failed")
        } else {
            String::new()
        };
        Self {
            id,
            meta,
            error,
            payload: payload.to_owned(),
        }
    }

    /// The bytes the payload serializes to.
    fn json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.payload).unwrap()
    }

    /// What recovery hands back for this task.
    fn seen(&self) -> Seen {
        Seen {
            id: self.id,
            state: self.meta,
            error: self.error.clone().into_bytes(),
            payload: self.json(),
        }
    }

    /// The task as a record, its payload serialized into `json`.
    fn record<'a>(&'a self, json: &'a [u8]) -> TaskRecord<'a> {
        TaskRecord {
            id: self.id,
            state: self.meta,
            last_error: self.error.as_str().into(),
            payload: json,
            options: None,
        }
    }

    fn record_len(&self) -> usize {
        format::task_record_len(self.json().len(), self.error.len())
    }
}

fn items(run: u64, count: u64) -> Vec<Item> {
    (1..=count)
        .map(|seq| Item::new(TaskId::new(run, seq), &"p".repeat(seq as usize * 7)))
        .collect()
}

fn try_open(dir: &Path) -> Result<(Journal, RecoveryReport, Vec<Seen>), StartError> {
    let (journal, report, live) = Journal::open(dir, fs::os(), |record| record.payload.to_vec())?;
    let seen = live
        .into_iter()
        .map(|task| Seen {
            id: task.id,
            state: task.state,
            error: task.last_error.unwrap_or_default().as_bytes().to_vec(),
            payload: task.value,
        })
        .collect();
    Ok((journal, report, seen))
}

fn open(dir: &Path) -> (Journal, RecoveryReport, Vec<Seen>) {
    try_open(dir).unwrap()
}

/// Spills `items` as task records through [`Journal::spill`].
fn spill(journal: &mut Journal, items: &[Item]) -> SpillOutcome {
    let json: Vec<Vec<u8>> = items.iter().map(Item::json).collect();
    let records: Vec<TaskRecord<'_>> = items
        .iter()
        .zip(&json)
        .map(|(item, json)| item.record(json))
        .collect();
    journal.spill(&records)
}

fn spill_all(journal: &mut Journal, items: &[Item]) {
    let outcome = spill(journal, items);
    assert!(
        outcome.unsaved.is_empty() && outcome.error.is_none(),
        "{outcome:?}"
    );
    assert_eq!(outcome.written, items.len());
}

/// The live segment files of `dir`, in number order.
fn live_segments(dir: &Path) -> Vec<PathBuf> {
    list_segments(dir)
        .unwrap()
        .into_iter()
        .filter(|s| !s.dead)
        .map(|s| s.path)
        .collect()
}

fn only_segment(dir: &Path) -> PathBuf {
    let segments = live_segments(dir);
    assert_eq!(segments.len(), 1, "{segments:?}");
    segments.into_iter().next().unwrap()
}

/// The tasks live after replaying `seen` in order: the last state of each id not acked since.
/// A directory holding one closed segment of `count` tasks: the directory, the tasks, the file.
fn closed_segment(count: u64) -> (tempfile::TempDir, Vec<Item>, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let (mut journal, _, _) = open(tmp.path());
    let written = items(journal.run(), count);
    spill_all(&mut journal, &written);
    journal.close().unwrap();
    let path = only_segment(tmp.path());
    (tmp, written, path)
}

/// The live tasks recovery gave, by id; they must come in id order.
fn live(seen: &[Seen]) -> BTreeMap<TaskId, Seen> {
    assert!(seen.is_sorted_by(|a, b| a.id < b.id), "{seen:?}");
    seen.iter().map(|task| (task.id, task.clone())).collect()
}

fn assert_clean(report: &RecoveryReport) {
    assert!(report.damage.is_empty(), "{report:?}");
    assert!(report.torn_tails.is_empty(), "{report:?}");
    assert!(report.damaged_copies.is_empty(), "{report:?}");
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn spilled_tasks_come_back_after_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let (mut journal, report, seen) = open(&dir);
    assert!(seen.is_empty());
    assert_eq!(report, RecoveryReport::default());
    let written = items(journal.run(), 6);
    spill_all(&mut journal, &written);
    journal.close().unwrap();

    let (journal, report, seen) = open(&dir);
    let expected: Vec<_> = written.iter().map(Item::seen).collect();
    assert_eq!(seen, expected);
    assert_eq!(
        (report.segments, report.records, report.dead_letters),
        (1, 6, 0)
    );
    assert_clean(&report);
    journal.close().unwrap();
}

#[test]
fn spill_larger_than_one_chunk_comes_back_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut journal, _, _) = open(tmp.path());
    let run = journal.run();
    let big = "x".repeat(3000);
    let written: Vec<_> = (1..=400)
        .map(|seq| Item::new(TaskId::new(run, seq), &big))
        .collect();
    let total: usize = written.iter().map(Item::record_len).sum();
    assert!(
        total > SPILL_CHUNK,
        "the spill must need more than one chunk"
    );
    spill_all(&mut journal, &written);
    journal.close().unwrap();
    let segment = only_segment(tmp.path());
    assert_eq!(
        std::fs::metadata(&segment).unwrap().len(),
        (format::HEADER_LEN + total) as u64
    );

    let (journal, report, seen) = open(tmp.path());
    assert_eq!(seen, written.iter().map(Item::seen).collect::<Vec<_>>());
    assert_clean(&report);
    drop(journal);
}

#[test]
fn empty_spill_writes_no_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut journal, _, _) = open(tmp.path());
    let outcome = spill(&mut journal, &[]);
    assert!(outcome.unsaved.is_empty() && outcome.error.is_none());
    assert_eq!(outcome.written, 0);
    journal.close().unwrap();
    assert!(live_segments(tmp.path()).is_empty());
}

#[test]
fn locked_dir_is_refused_until_closed_or_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let (first, _, _) = open(&dir);
    assert_eq!(first.run(), 1);
    match try_open(&dir) {
        Err(StartError::JournalLocked { dir: locked }) => assert_eq!(locked, dir),
        other => panic!("expected JournalLocked, got {other:?}"),
    }
    let message = try_open(&dir).unwrap_err().to_string();
    assert!(message.contains(&dir.display().to_string()), "{message}");
    first.close().unwrap();

    // The refused opens did not raise the run counter.
    let (second, _, _) = open(&dir);
    assert_eq!(second.run(), 2);
    assert!(matches!(
        try_open(&dir),
        Err(StartError::JournalLocked { .. })
    ));
    drop(second);

    let (third, _, _) = open(&dir);
    assert_eq!(third.run(), 3);
    third.close().unwrap();
}

#[cfg(unix)]
#[test]
fn created_dirs_and_files_are_owner_only() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tmp.path().join("state");
    let dir = parent.join("journal");
    let (mut journal, _, _) = open(&dir);
    let written = items(journal.run(), 2);
    spill_all(&mut journal, &written);
    let dead = TaskRecord {
        id: TaskId::new(journal.run(), 9),
        state: TaskState::default(),
        last_error: "failed".into(),
        payload: b"null",
        options: None,
    };
    journal.write_dead(&dead).unwrap();
    journal.close().unwrap();

    assert_eq!(mode(&parent), 0o700);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
    let segments = list_segments(&dir).unwrap();
    assert_eq!(segments.len(), 2, "{segments:?}");
    for segment in &segments {
        assert_eq!(mode(&segment.path), 0o600, "{}", segment.path.display());
    }
}

#[test]
fn run_counter_rises_at_every_open() {
    let tmp = tempfile::tempdir().unwrap();
    for expected in 1..=4 {
        let (journal, _, _) = open(tmp.path());
        assert_eq!(journal.run(), expected);
        if expected % 2 == 0 {
            journal.close().unwrap();
        } else {
            drop(journal);
        }
    }
}

#[test]
fn run_counter_stays_above_the_ids_in_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut journal, _, _) = open(tmp.path());
    assert_eq!(journal.run(), 1);
    spill_all(
        &mut journal,
        &[Item::new(TaskId::new(40, 1), "\"from the future\"")],
    );
    journal.close().unwrap();

    // A counter with a bad checksum is ignored: the run comes from the segments alone.
    let lock_path = tmp.path().join(LOCK_FILE);
    let mut lock = [0u8; 16];
    lock[0..8].copy_from_slice(&1000u64.to_le_bytes());
    std::fs::write(&lock_path, lock).unwrap();
    let (journal, _, seen) = open(tmp.path());
    assert_eq!(seen.len(), 1);
    assert_eq!(journal.run(), 41);
    drop(journal);

    // A cut counter likewise; once intact again, it counts on from there.
    std::fs::write(&lock_path, [7u8; 5]).unwrap();
    let (journal, _, _) = open(tmp.path());
    assert_eq!(journal.run(), 41);
    drop(journal);
    let (journal, _, _) = open(tmp.path());
    assert_eq!(journal.run(), 42);
    drop(journal);
}

#[test]
fn acks_remove_tasks_in_the_same_and_in_later_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut journal, _, _) = open(tmp.path());
    let [a, b, c] = <[Item; 3]>::try_from(items(journal.run(), 3)).unwrap();
    spill_all(&mut journal, &[a.clone(), b.clone(), c.clone()]);
    journal.append_ack(b.id).unwrap();
    journal.close().unwrap();

    let (mut journal, report, seen) = open(tmp.path());
    assert_eq!(seen, [a.seen(), c.seen()]);
    assert_eq!(report.records, 4);
    // A replayed task finishes, then the process dies: the old segment is still there, and the
    // ack in the new one follows it.
    journal.append_ack(a.id).unwrap();
    drop(journal);

    let (mut journal, report, seen) = open(tmp.path());
    assert_eq!(seen, [c.seen()]);
    assert_eq!((report.segments, report.records), (2, 5));
    // This time the survivor is spilled again and the run ends cleanly: the old segments go.
    spill_all(&mut journal, std::slice::from_ref(&c));
    journal.close().unwrap();
    only_segment(tmp.path());

    let (journal, report, seen) = open(tmp.path());
    assert_eq!(seen, [c.seen()]);
    assert_eq!(report.segments, 1);
    drop(journal);
}

#[test]
fn segment_of_acks_only_is_removed_with_what_it_acks() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut journal, _, _) = open(tmp.path());
    let written = items(journal.run(), 2);
    spill_all(&mut journal, &written);
    journal.close().unwrap();

    let (mut journal, _, seen) = open(tmp.path());
    assert_eq!(seen.len(), 2);
    for item in &written {
        journal.append_ack(item.id).unwrap();
    }
    assert_eq!(live_segments(tmp.path()).len(), 2);
    journal.close().unwrap();
    assert!(live_segments(tmp.path()).is_empty());

    let (journal, report, seen) = open(tmp.path());
    assert!(seen.is_empty());
    assert_eq!(report.segments, 0);
    drop(journal);
}

#[test]
fn kept_obsolete_segments_survive_close() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut journal, _, _) = open(tmp.path());
    let written = items(journal.run(), 2);
    spill_all(&mut journal, &written);
    journal.close().unwrap();

    let (mut journal, _, _) = open(tmp.path());
    journal.append_ack(written[0].id).unwrap();
    journal.keep_obsolete();
    journal.close().unwrap();
    assert_eq!(live_segments(tmp.path()).len(), 2);

    let (journal, _, seen) = open(tmp.path());
    assert_eq!(seen, [written[1].seen()]);
    drop(journal);
}

#[test]
fn retire_obsolete_removes_old_segments_mid_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut journal, _, _) = open(tmp.path());
    let written = items(journal.run(), 3);
    spill_all(&mut journal, &written);
    journal.close().unwrap();
    let old = only_segment(tmp.path());

    let (mut journal, _, _) = open(tmp.path());
    journal.append_ack(written[0].id).unwrap();
    spill_all(&mut journal, &written[1..]);
    journal.retire_obsolete().unwrap();
    let current = only_segment(tmp.path());
    assert_ne!(current, old);
    // The run goes on writing to its segment.
    journal.append_ack(written[1].id).unwrap();
    journal.close().unwrap();

    let (journal, report, seen) = open(tmp.path());
    // The ack of written[0], written[1] and [2], the ack of written[1].
    assert_eq!((report.segments, report.records), (1, 4));
    assert_eq!(seen, [written[2].seen()]);
    drop(journal);
}

#[test]
fn dead_letters_are_counted_not_replayed_and_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut journal, _, _) = open(tmp.path());
    let record = TaskRecord {
        id: TaskId::new(journal.run(), 1),
        state: TaskState::default(),
        last_error: "handler failed".into(),
        payload: b"{}",
        options: None,
    };
    journal.write_dead(&record).unwrap();
    journal.close().unwrap();

    for _ in 0..2 {
        let (journal, report, seen) = open(tmp.path());
        assert!(seen.is_empty());
        assert_eq!(
            (report.segments, report.records, report.dead_letters),
            (1, 1, 1)
        );
        journal.close().unwrap();
    }
    let segments = list_segments(tmp.path()).unwrap();
    assert_eq!(segments.len(), 1);
    assert!(segments[0].dead);
}

mod damage;
mod model;
