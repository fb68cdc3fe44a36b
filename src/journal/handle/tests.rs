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

#[test]
fn newer_version_segment_fails_open_and_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = format::encode_header(Header {
        epoch: 5,
        segment: 1,
    });
    bytes[8..10].copy_from_slice(&3u16.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[0..40]);
    bytes[40..44].copy_from_slice(&crc.to_le_bytes());
    let mut contents = bytes.to_vec();
    contents.extend_from_slice(&[0xAB; 100]);
    let path = tmp.path().join("00000000000000000001.seg");
    std::fs::write(&path, &contents).unwrap();

    match try_open(tmp.path()) {
        Err(StartError::Journal(
            ref error @ JournalError::UnsupportedVersion {
                path: ref found_path,
                found,
                supported,
            },
        )) => {
            assert_eq!(found_path, &path);
            assert_eq!((found, supported), (3, format::VERSION));
            assert_eq!(error.path(), Some(path.as_path()));
        }
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), contents);
    assert!(!tmp.path().join(DAMAGED_DIR).exists());

    // The failed open released the lock.
    std::fs::rename(&path, tmp.path().join("moved-away")).unwrap();
    let (journal, report, _) = open(tmp.path());
    assert_eq!(report.segments, 0);
    drop(journal);
}

#[test]
fn damaged_middle_record_is_reported_and_a_copy_kept() {
    let (tmp, written, path) = closed_segment(5);
    let offset = format::HEADER_LEN + written[..2].iter().map(Item::record_len).sum::<usize>();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offset + format::RECORD_HEADER_LEN + 3] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();

    let (journal, report, seen) = open(tmp.path());
    let expected: Vec<_> = written
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, item)| item.seen())
        .collect();
    assert_eq!(seen, expected);
    assert_eq!(
        report.damage,
        [Damage {
            path: path.clone(),
            offset: offset as u64,
            len: written[2].record_len() as u64,
            reason: format::RecordError::Checksum.to_string(),
        }]
    );
    assert!(report.torn_tails.is_empty());
    assert_eq!(report.damaged_copies.len(), 1);
    let copy = &report.damaged_copies[0];
    assert_eq!(copy.parent(), Some(tmp.path().join(DAMAGED_DIR).as_path()));
    assert_eq!(std::fs::read(copy).unwrap(), bytes);
    #[cfg(unix)]
    {
        assert_eq!(mode(&tmp.path().join(DAMAGED_DIR)), 0o700);
        assert_eq!(mode(copy), 0o600);
    }
    // The damaged segment itself is not rewritten by recovery.
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    drop(journal);

    // A second recovery keeps a second copy and never overwrites the first.
    let (journal, report, _) = open(tmp.path());
    assert_eq!(report.damaged_copies.len(), 1);
    assert_ne!(&report.damaged_copies[0], copy);
    assert_eq!(
        std::fs::read_dir(tmp.path().join(DAMAGED_DIR))
            .unwrap()
            .count(),
        2
    );
    drop(journal);
}

#[test]
fn damaged_header_costs_no_record() {
    let (tmp, written, path) = closed_segment(3);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 0x01; // the first copy of the epoch
    std::fs::write(&path, &bytes).unwrap();

    let (journal, report, seen) = open(tmp.path());
    assert_eq!(seen, written.iter().map(Item::seen).collect::<Vec<_>>());
    assert_eq!(report.damage.len(), 1);
    assert_eq!(
        (report.damage[0].offset, report.damage[0].len),
        (0, format::HEADER_LEN as u64)
    );
    assert_eq!(report.damage[0].path, path);
    assert_eq!(report.damaged_copies.len(), 1);
    assert!(report.torn_tails.is_empty());
    drop(journal);
}

#[test]
fn torn_tail_is_truncated_on_disk_and_reported() {
    let (tmp, written, path) = closed_segment(4);
    let full = std::fs::metadata(&path).unwrap().len();
    let cut = full - 5;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let valid_end = full - written[3].record_len() as u64;

    let (journal, report, seen) = open(tmp.path());
    assert_eq!(
        seen,
        written[..3].iter().map(Item::seen).collect::<Vec<_>>()
    );
    assert_eq!(
        report.torn_tails,
        [Damage {
            path: path.clone(),
            offset: valid_end,
            len: cut - valid_end,
            reason: format::RecordError::Truncated.to_string(),
        }]
    );
    assert!(report.damage.is_empty() && report.damaged_copies.is_empty());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), valid_end);
    drop(journal);

    // Once cut back, the segment is whole again.
    let (journal, report, seen) = open(tmp.path());
    assert_eq!(seen.len(), 3);
    assert_clean(&report);
    drop(journal);
}

#[test]
fn a_whole_last_record_failing_its_checksum_is_truncated_and_a_copy_kept() {
    let (tmp, written, path) = closed_segment(4);
    let mut bytes = std::fs::read(&path).unwrap();
    let full = bytes.len() as u64;
    let valid_end = full - written[3].record_len() as u64;
    // Flip a bit inside the last record's body: its length still fits the file.
    bytes[valid_end as usize + 40] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();

    let (journal, report, seen) = open(tmp.path());
    assert_eq!(
        seen,
        written[..3].iter().map(Item::seen).collect::<Vec<_>>()
    );
    assert_eq!(report.torn_tails.len(), 1);
    assert_eq!(report.torn_tails[0].offset, valid_end);
    assert_eq!(
        report.torn_tails[0].reason,
        format::RecordError::Checksum.to_string()
    );
    assert_eq!(report.damaged_copies.len(), 1);
    assert_eq!(std::fs::read(&report.damaged_copies[0]).unwrap(), bytes);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), valid_end);
    drop(journal);
}

#[test]
fn segment_cut_inside_its_header_is_truncated_to_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let header = format::encode_header(Header {
        epoch: 5,
        segment: 1,
    });
    let path = tmp.path().join("00000000000000000001.seg");
    std::fs::write(&path, &header[..20]).unwrap();

    let (journal, report, seen) = open(tmp.path());
    assert!(seen.is_empty());
    assert_eq!(report.torn_tails.len(), 1);
    assert_eq!(
        (report.torn_tails[0].offset, report.torn_tails[0].len),
        (0, 20)
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    journal.close().unwrap();
    assert!(!path.exists());
}

/// One step of a pool's life, as the journal sees it.
#[derive(Debug, Clone)]
enum Op {
    /// A task is accepted (not yet journaled).
    Submit {
        payload: String,
        error: bool,
        interrupted: bool,
    },
    /// The task at this index (of all ids so far) finishes.
    Ack(usize),
    /// The accepted tasks are spilled.
    Spill,
    /// A live task is journaled again with a new state (an interrupted run).
    Respill(usize),
    /// The old segments are retired, if every task in them is done or journaled anew.
    Retire,
    /// The run ends and the journal is reopened.
    Restart(End),
}

#[derive(Debug, Clone, Copy)]
enum End {
    /// Every live task is spilled again and the journal closed.
    Clean,
    /// Accepted tasks are spilled, old segments kept, and the journal closed.
    Keep,
    /// The process dies: nothing more is written and tasks not spilled are lost.
    Crash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    /// Accepted, only in memory.
    Pending,
    /// Journaled in this run's segment.
    Current,
    /// Journaled only in segments of earlier runs.
    Old,
}

/// A small deterministic generator (xorshift64*) for the model test's operations.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }

    /// A payload of up to 24 characters, quotes, backslashes and a non-ASCII one included.
    fn payload(&mut self) -> String {
        const CHARS: [char; 11] = ['a', 'q', 'z', '0', '7', '9', ' ', '"', '\\', 'é', 'x'];
        (0..self.below(25))
            .map(|_| CHARS[self.below(CHARS.len() as u64) as usize])
            .collect()
    }

    /// One operation, weighted as a run's are: submits most, restarts least.
    fn op(&mut self) -> Op {
        match self.below(12) {
            0..=3 => Op::Submit {
                payload: self.payload(),
                error: self.coin(),
                interrupted: self.coin(),
            },
            4..=6 => Op::Ack(self.next() as usize),
            7 | 8 => Op::Spill,
            9 => Op::Respill(self.next() as usize),
            10 => Op::Retire,
            _ => Op::Restart(match self.below(3) {
                0 => End::Clean,
                1 => End::Keep,
                _ => End::Crash,
            }),
        }
    }
}

/// The model of a pool driving the journal: what it holds live, and where each task is.
struct Model {
    dir: PathBuf,
    journal: Option<Journal>,
    live: BTreeMap<TaskId, (Item, Where)>,
    /// Every id ever accepted, in order.
    ids: Vec<TaskId>,
    next_seq: u64,
    last_run: u64,
}

impl Model {
    fn start(dir: &Path) -> Self {
        let mut model = Self {
            dir: dir.to_path_buf(),
            journal: None,
            live: BTreeMap::new(),
            ids: Vec::new(),
            next_seq: 1,
            last_run: 0,
        };
        model.reopen();
        model
    }

    fn journal(&mut self) -> &mut Journal {
        self.journal.as_mut().unwrap()
    }

    /// Opens the journal and checks that recovery gives exactly the live tasks.
    fn reopen(&mut self) {
        let (journal, report, seen) = open(&self.dir);
        assert_clean(&report);
        assert!(journal.run() > self.last_run);
        assert!(self.ids.iter().all(|id| id.run() < journal.run()));
        self.last_run = journal.run();
        self.next_seq = 1;
        let expected: BTreeMap<_, _> = self
            .live
            .iter()
            .map(|(id, (item, _))| (*id, item.seen()))
            .collect();
        assert_eq!(live(&seen), expected);
        for (_, place) in self.live.values_mut() {
            *place = Where::Old;
        }
        self.journal = Some(journal);
    }

    /// Spills the live tasks `filter` picks, as one batch, and marks them journaled here.
    fn spill_where(&mut self, filter: impl Fn(Where) -> bool) {
        let batch: Vec<Item> = self
            .live
            .values()
            .filter(|(_, place)| filter(*place))
            .map(|(item, _)| item.clone())
            .collect();
        spill_all(self.journal(), &batch);
        for item in &batch {
            self.live.get_mut(&item.id).unwrap().1 = Where::Current;
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Submit {
                payload,
                error,
                interrupted,
            } => {
                let id = TaskId::new(self.last_run, self.next_seq);
                self.next_seq += 1;
                let mut item = Item::new(id, &payload);
                item.error = if error {
                    format!("failed: {payload}")
                } else {
                    String::new()
                };
                item.meta.interrupted = interrupted;
                self.ids.push(id);
                self.live.insert(id, (item, Where::Pending));
            }
            Op::Ack(index) => {
                if self.ids.is_empty() {
                    return;
                }
                let id = self.ids[index % self.ids.len()];
                match self.live.remove(&id) {
                    // Finished before it was ever journaled: nothing to write.
                    Some((_, Where::Pending)) => {}
                    // Live and journaled, or already finished (a repeated ack is harmless).
                    Some(_) | None => self.journal().append_ack(id).unwrap(),
                }
            }
            Op::Spill => self.spill_where(|place| place == Where::Pending),
            Op::Respill(index) => {
                let journaled: Vec<TaskId> = self
                    .live
                    .iter()
                    .filter(|(_, (_, place))| *place != Where::Pending)
                    .map(|(id, _)| *id)
                    .collect();
                if journaled.is_empty() {
                    return;
                }
                let id = journaled[index % journaled.len()];
                let (item, place) = self.live.get_mut(&id).unwrap();
                item.meta.interruptions += 1;
                item.meta.interrupted = true;
                *place = Where::Current;
                let item = item.clone();
                spill_all(self.journal(), &[item]);
            }
            Op::Retire => {
                if self.live.values().all(|(_, place)| *place != Where::Old) {
                    self.journal().retire_obsolete().unwrap();
                }
            }
            Op::Restart(end) => {
                match end {
                    End::Clean => {
                        self.spill_where(|place| place != Where::Current);
                        self.journal.take().unwrap().close().unwrap();
                    }
                    End::Keep => {
                        self.spill_where(|place| place == Where::Pending);
                        self.journal().keep_obsolete();
                        self.journal.take().unwrap().close().unwrap();
                    }
                    End::Crash => {
                        self.live.retain(|_, (_, place)| *place != Where::Pending);
                        drop(self.journal.take());
                    }
                }
                self.reopen();
            }
        }
    }
}

/// Whatever a run writes, across clean stops, kept segments and crashes, recovery gives back
/// exactly the live tasks, each in its last journaled state: 64 seeded sequences of 1 to 47
/// operations (a failure names its seed and prints the operations).
#[test]
fn recovery_gives_exactly_the_live_tasks() {
    for case in 0..64u64 {
        let seed = 0x006a_6f75_726e_616c ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut generator = Gen(seed | 1);
        let len = 1 + generator.below(47) as usize;
        let ops: Vec<Op> = (0..len).map(|_| generator.op()).collect();
        let tmp = tempfile::tempdir().unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut model = Model::start(tmp.path());
            for op in ops.clone() {
                model.apply(op);
            }
            model.apply(Op::Restart(End::Clean));
            model.journal.take().unwrap().close().unwrap();
        }));
        if let Err(panic) = result {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            panic!("case {case} (seed {seed:#x}), operations {ops:?}: {message}");
        }
    }
}
