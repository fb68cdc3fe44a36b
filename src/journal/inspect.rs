//! Reading a journal directory from outside a pool, and taking dead letters back.
//!
//! [`inspect`], [`verify`] and [`stats`] only read: they take no lock, truncate nothing and
//! copy nothing, so they are safe beside a running pool (whose segment being written at that
//! moment may then show a torn tail). They read every segment with recovery's own rules
//! (`recover.rs`): segments in number order, records in file order, the last record of a task
//! id wins, and the same damage found the same way.
//!
//! [`requeue`] writes, so it takes the directory lock as a starting pool does and refuses while
//! a pool holds it.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use super::dir::{
    DAMAGED_DIR, SegmentFile, check_writable_by_us_only, journal_segments, lock_dir, random_epoch,
    segment_name, stored_run,
};
use super::format::{self, Header, Kind, RecordRef};
use super::fs;
use super::record::{TaskOptions, TaskRecord, TaskState};
use super::recover::{Fold, read_segment};
use super::writer::SegmentWriter;
use crate::error::JournalError;
use crate::report::{Damage, Skipped};
use crate::task::TaskId;

/// A task as a journal directory holds it: live (waiting to run at the next start) or a dead
/// letter (set aside after a failed run).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JournaledTask {
    /// The task's id, the same the handler saw.
    pub id: TaskId,
    /// Failed runs so far (a run interrupted at the drain deadline does not count).
    pub attempts: u32,
    /// Consecutive runs interrupted at the drain deadline.
    pub interruptions: u32,
    /// Whether the last run was interrupted at the drain deadline.
    pub interrupted: bool,
    /// When the task was first accepted, in milliseconds since the Unix epoch.
    pub enqueued_at_ms: u64,
    /// The task is not to run before this time, in milliseconds since the Unix epoch; 0 for at
    /// once.
    pub not_before_ms: u64,
    /// The last run's error (invalid UTF-8 replaced), if it had one.
    pub last_error: Option<String>,
    /// The payload as journaled: its serde_json bytes.
    pub payload: Vec<u8>,
    /// Its priority, 0 (the default, lowest) to 7.
    pub priority: u8,
    /// Its own retry limit (failed runs before it is a dead letter); `None`: the pool's.
    pub max_attempts: Option<u32>,
    /// No run starts after this time, in milliseconds since the Unix epoch; `None`: never.
    pub expires_at_ms: Option<u64>,
    /// Its unique key, if it was given one.
    pub unique_key: Option<String>,
    /// The segment holding the record that decides the task's state.
    pub segment: PathBuf,
    /// That record's offset in the segment.
    pub offset: u64,
}

/// What a journal directory holds, from [`inspect`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Contents {
    /// Live tasks, in the order the next start replays them: higher priorities first, id
    /// order within one. (Tasks due later wait for their time: `not_before_ms`.)
    pub live: Vec<JournaledTask>,
    /// Dead letters, in id order. A task found in both lists is a dead letter whose requeue (or
    /// whose failure) was cut short by a crash: it runs at the next start and stays a dead
    /// letter until taken back.
    pub dead: Vec<JournaledTask>,
    /// Segment files read, live and dead.
    pub segments: u64,
    /// Stretches of damage met while reading, torn tails included; their records are not in
    /// the lists. [`verify`] tells where they are.
    pub damage: u64,
    /// Entries named like segments that are not regular files, not read. [`verify`] names
    /// them.
    pub skipped: u64,
}

/// What checking every segment and record of a journal directory found, from [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verification {
    /// Segment files checked, live and dead.
    pub segments: u64,
    /// Valid records found.
    pub records: u64,
    /// Damaged segment headers (offset 0) and damage in the middle of a segment, each followed
    /// by valid records; recovery skips what they cover and keeps a copy of the file.
    pub damage: Vec<Damage>,
    /// Ends of segments where nothing valid follows: a write cut short by a crash, or damage
    /// to the last records; recovery truncates them.
    pub torn_tails: Vec<Damage>,
    /// Entries named like segments that are not regular files (a symbolic link, a named pipe,
    /// …): not read, here or by recovery, which reports them the same way.
    pub skipped: Vec<Skipped>,
}

impl Verification {
    /// Whether no damage, no torn tail and no skipped entry was found.
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty() && self.torn_tails.is_empty() && self.skipped.is_empty()
    }
}

/// Counts and sizes of a journal directory, from [`stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Live segment files.
    pub segments: u64,
    /// Their total size in bytes.
    pub segment_bytes: u64,
    /// Dead-letter segment files.
    pub dead_segments: u64,
    /// Their total size in bytes.
    pub dead_segment_bytes: u64,
    /// Valid records in all segments (tasks, acks and dead letters, superseded ones included).
    pub records: u64,
    /// Live tasks: what the next start replays.
    pub live_tasks: u64,
    /// Total size of their payloads in bytes.
    pub live_payload_bytes: u64,
    /// Dead letters.
    pub dead_letters: u64,
    /// Total size of their payloads in bytes.
    pub dead_payload_bytes: u64,
    /// Stretches of damage, torn tails included.
    pub damage: u64,
    /// Entries named like segments that are not regular files, not read.
    pub skipped: u64,
    /// Copies of damaged segments kept under `damaged/`.
    pub damaged_copies: u64,
    /// Their total size in bytes.
    pub damaged_copy_bytes: u64,
    /// The run counter stored in `LOCK`: the run number of the last start. `None` if the file
    /// is missing or damaged (the next start then derives it from the segments).
    pub run: Option<u64>,
}

/// Which dead letters [`requeue`] takes back.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Requeue {
    /// Every dead letter.
    All,
    /// These; each must be a dead letter.
    Ids(Vec<TaskId>),
}

/// What [`requeue`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Requeued {
    /// The tasks taken back, in id order. They run at the next start.
    pub ids: Vec<TaskId>,
    /// The new live segment holding them (none if there was nothing to write).
    pub live_segment: Option<PathBuf>,
    /// The new dead-letter segment recording that they were taken back.
    pub dead_segment: Option<PathBuf>,
}

/// [`requeue`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequeueError {
    /// A pool, in this process or another, holds the journal directory.
    #[error("journal directory {dir} is locked by a running pool; stop it first", dir = dir.display())]
    Locked {
        /// The journal directory.
        dir: PathBuf,
    },
    /// Some of the ids asked for are not dead letters. Nothing was written.
    #[error("no dead letter with id {}", IdList(ids))]
    NotDead {
        /// The ids that are not dead letters.
        ids: Vec<TaskId>,
    },
    /// Reading the journal or writing the requeued tasks failed. Nothing was taken back.
    #[error("could not requeue")]
    Journal(#[from] JournalError),
    /// The tasks are durable in the live journal (they run at the next start), but recording
    /// that their dead letters were taken back failed: they are listed both live and dead. A
    /// second requeue of the same ids completes it without writing them twice.
    #[error("requeued tasks are live, but their dead letters could not be marked as taken back")]
    Incomplete {
        /// The tasks now live.
        ids: Vec<TaskId>,
        /// What failed.
        #[source]
        source: JournalError,
    },
}

struct IdList<'a>(&'a [TaskId]);

impl fmt::Display for IdList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, id) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{id}")?;
        }
        Ok(())
    }
}

/// Reads every live task and dead letter of the journal directory `dir`, without locking or
/// changing anything.
///
/// # Errors
///
/// A directory that cannot be read or is not a journal directory (it has neither a `LOCK` file
/// nor a segment), a segment that cannot be read, or a segment of a newer format
/// ([`JournalError::UnsupportedVersion`]). Damage is not an error: the records it covers are
/// missing from the lists and counted in [`Contents::damage`].
pub fn inspect(dir: &Path) -> Result<Contents, JournalError> {
    let survey = survey(dir, true)?;
    let (segments, damage, skipped) = (
        survey.segments.len() as u64,
        survey.damage_count() as u64,
        survey.skipped.len() as u64,
    );
    let mut live: Vec<JournaledTask> = survey.live.into_values().map(|t| t.task).collect();
    // The replay order: higher priorities first, id order within one (a stable sort).
    live.sort_by_key(|task| std::cmp::Reverse(task.priority));
    Ok(Contents {
        segments,
        damage,
        skipped,
        live,
        dead: survey.dead.into_values().map(|t| t.task).collect(),
    })
}

/// Checks every segment header and record of the journal directory `dir`, without locking or
/// changing anything, and reports each damaged stretch with its file and offset.
///
/// # Errors
///
/// A directory that cannot be read or is not a journal directory (it has neither a `LOCK` file
/// nor a segment), a segment that cannot be read, or a segment of a newer format
/// ([`JournalError::UnsupportedVersion`]), which this build cannot check.
pub fn verify(dir: &Path) -> Result<Verification, JournalError> {
    let survey = survey(dir, false)?;
    let mut verification = Verification {
        skipped: survey.skipped,
        ..Verification::default()
    };
    for segment in survey.segments {
        verification.segments += 1;
        verification.records += segment.records as u64;
        verification.damage.extend(segment.damage);
        verification.torn_tails.extend(segment.torn_tail);
    }
    Ok(verification)
}

/// Counts and measures the journal directory `dir`, without locking or changing anything.
///
/// # Errors
///
/// A directory that cannot be read or is not a journal directory (it has neither a `LOCK` file
/// nor a segment), a segment that cannot be read, or a segment of a newer format
/// ([`JournalError::UnsupportedVersion`]).
pub fn stats(dir: &Path) -> Result<Stats, JournalError> {
    let survey = survey(dir, false)?;
    let mut stats = Stats {
        damage: survey.damage_count() as u64,
        skipped: survey.skipped.len() as u64,
        live_tasks: survey.live.len() as u64,
        live_payload_bytes: survey.live.values().map(|t| t.payload_len).sum(),
        dead_letters: survey.dead.len() as u64,
        dead_payload_bytes: survey.dead.values().map(|t| t.payload_len).sum(),
        run: stored_run(dir)?,
        ..Stats::default()
    };
    for segment in &survey.segments {
        stats.records += segment.records as u64;
        if segment.file.dead {
            stats.dead_segments += 1;
            stats.dead_segment_bytes += segment.bytes;
        } else {
            stats.segments += 1;
            stats.segment_bytes += segment.bytes;
        }
    }
    let damaged = dir.join(DAMAGED_DIR);
    match std::fs::read_dir(&damaged) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(|e| JournalError::io("list", &damaged, None, e))?;
                let meta = entry
                    .metadata()
                    .map_err(|e| JournalError::io("stat", &entry.path(), None, e))?;
                if meta.is_file() {
                    stats.damaged_copies += 1;
                    stats.damaged_copy_bytes += meta.len();
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(JournalError::io("list", &damaged, None, e)),
    }
    Ok(stats)
}

/// Moves dead letters back into the live journal of `dir`, so the next start runs them.
///
/// Takes the directory lock as a starting pool does, and refuses while a pool holds it. The
/// selected dead letters are written as live tasks (same id, payload and last error; attempts,
/// interruptions and any not-before time reset) into a new live segment, which is fsynced with
/// its directory entry. Only then does a new dead-letter segment record that they were taken
/// back. A crash in between leaves a task both live and dead, never lost; requeuing it again
/// completes the move without writing it twice. The run counter is left as it is.
///
/// # Errors
///
/// [`RequeueError::Locked`] while a pool holds the directory; [`RequeueError::NotDead`] if an
/// id asked for is not a dead letter (nothing is written then); [`RequeueError::Journal`] if
/// the directory is not a journal directory, or reading or writing failed before anything was
/// taken back; [`RequeueError::Incomplete`] if the tasks are live again but their dead letters
/// could not be marked as taken back.
pub fn requeue(dir: &Path, which: Requeue) -> Result<Requeued, RequeueError> {
    // Never make a journal directory (or a `LOCK` file) out of a mistyped path.
    journal_segments(dir)?;
    check_writable_by_us_only(dir)?;
    let Some((lock, _)) = lock_dir(dir)? else {
        return Err(RequeueError::Locked {
            dir: dir.to_path_buf(),
        });
    };
    let result = requeue_locked(dir, which);
    // Closing the file releases the lock; unlocking first only makes it explicit.
    let _ = lock.unlock();
    result
}

fn requeue_locked(dir: &Path, which: Requeue) -> Result<Requeued, RequeueError> {
    let survey = survey(dir, true)?;
    let selected: Vec<&SurveyedTask> = match which {
        Requeue::All => survey.dead.values().collect(),
        Requeue::Ids(ids) => {
            let ids: BTreeSet<TaskId> = ids.into_iter().collect();
            let missing: Vec<TaskId> = ids
                .iter()
                .filter(|id| !survey.dead.contains_key(id))
                .copied()
                .collect();
            if !missing.is_empty() {
                return Err(RequeueError::NotDead { ids: missing });
            }
            ids.iter().filter_map(|id| survey.dead.get(id)).collect()
        }
    };
    let mut done = Requeued {
        ids: selected.iter().map(|t| t.task.id).collect(),
        ..Requeued::default()
    };
    if selected.is_empty() {
        return Ok(done);
    }
    let mut number = survey.next_number;
    // A task already live (a requeue cut short, or a crash between a dead letter and its ack)
    // runs at the next start anyway: writing it again would only make a duplicate.
    let to_write: Vec<&SurveyedTask> = selected
        .iter()
        .copied()
        .filter(|t| !survey.live.contains_key(&t.task.id))
        .collect();
    if !to_write.is_empty() {
        let path = write_live(dir, number, &to_write)?;
        number += 1;
        done.live_segment = Some(path);
    }
    match write_taken_back(dir, number, &done.ids) {
        Ok(path) => done.dead_segment = Some(path),
        Err(source) => {
            return Err(RequeueError::Incomplete {
                ids: done.ids,
                source,
            });
        }
    }
    tracing::info!(
        dir = %dir.display(),
        requeued = done.ids.len(),
        written = to_write.len(),
        "dead letters requeued"
    );
    Ok(done)
}

/// Writes `tasks` as fresh live tasks into a new live segment numbered `number`, durably. On
/// failure the segment is removed again (best effort): the dead letters are still there.
fn write_live(dir: &Path, number: u64, tasks: &[&SurveyedTask]) -> Result<PathBuf, JournalError> {
    let epoch = random_epoch(number);
    let mut buf = Vec::new();
    for surveyed in tasks {
        let task = &surveyed.task;
        let record = TaskRecord {
            id: task.id,
            state: TaskState {
                enqueued_ms: task.enqueued_at_ms,
                ..TaskState::default()
            },
            last_error: task.last_error.as_deref().unwrap_or("").into(),
            payload: &task.payload,
            // Taken back with its options, but not its expiry: a requeue means to run it.
            options: Some(Cow::Owned(TaskOptions {
                priority: task.priority,
                max_attempts: task.max_attempts.unwrap_or(0),
                expires_ms: 0,
                key: task.unique_key.as_deref().map(Into::into),
            })),
        };
        format::encode_record(&mut buf, epoch, Kind::Task, &record);
    }
    let path = dir.join(segment_name(number, false));
    let result = SegmentWriter::create(
        fs::os(),
        path.clone(),
        Header {
            epoch,
            segment: number,
        },
    )
    .and_then(|mut segment| {
        segment.append(&buf, tasks.len())?;
        segment.sync()
    });
    if let Err(error) = result {
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "could not remove an unfinished requeue segment");
        }
        return Err(error);
    }
    Ok(path)
}

/// Records, durably, in a new dead-letter segment numbered `number`, that `ids` were taken
/// back.
fn write_taken_back(dir: &Path, number: u64, ids: &[TaskId]) -> Result<PathBuf, JournalError> {
    let epoch = random_epoch(number);
    let mut buf = Vec::with_capacity(ids.len() * format::RECORD_HEADER_LEN);
    for &id in ids {
        format::encode_ack(&mut buf, epoch, id);
    }
    let path = dir.join(segment_name(number, true));
    let mut segment = SegmentWriter::create(
        fs::os(),
        path.clone(),
        Header {
            epoch,
            segment: number,
        },
    )?;
    segment.append(&buf, 0)?;
    segment.sync()?;
    Ok(path)
}

/// A task's last state, with its payload length (kept even when the payload is not).
struct SurveyedTask {
    task: JournaledTask,
    payload_len: u64,
}

/// One segment as read.
struct SegmentSurvey {
    file: SegmentFile,
    bytes: u64,
    records: usize,
    damage: Vec<Damage>,
    torn_tail: Option<Damage>,
}

/// Everything read from a directory.
struct Survey {
    segments: Vec<SegmentSurvey>,
    skipped: Vec<Skipped>,
    live: BTreeMap<TaskId, SurveyedTask>,
    dead: BTreeMap<TaskId, SurveyedTask>,
    /// A number above every segment's, live or dead.
    next_number: u64,
}

impl Survey {
    fn damage_count(&self) -> usize {
        self.segments
            .iter()
            .map(|s| s.damage.len() + usize::from(s.torn_tail.is_some()))
            .sum()
    }
}

/// Reads every segment of `dir` with the recovery rules; `payloads` says whether to keep the
/// payload bytes.
fn survey(dir: &Path, payloads: bool) -> Result<Survey, JournalError> {
    let mut segments = Vec::new();
    let mut fold = Fold::with_capacity(0);
    let listing = journal_segments(dir)?;
    for file in listing.segments {
        let bytes = match fs::read_regular(&file.path) {
            Ok(bytes) => bytes,
            // Retired by a running pool since the listing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(JournalError::io("read", &file.path, None, e)),
        };
        let read = read_segment(&file, &bytes, |offset, record| {
            let task = || surveyed(&file.path, offset, &record, payloads);
            fold.apply(file.dead, &record, task, task);
        })?;
        segments.push(SegmentSurvey {
            bytes: bytes.len() as u64,
            records: read.records,
            damage: read.damage,
            torn_tail: read.torn_tail,
            file,
        });
    }
    Ok(Survey {
        segments,
        skipped: listing.skipped,
        next_number: listing.next_number,
        live: fold.live.into_sorted().into_iter().collect(),
        dead: fold.dead.into_sorted().into_iter().collect(),
    })
}

fn surveyed(path: &Path, offset: u64, record: &RecordRef<'_>, payloads: bool) -> SurveyedTask {
    let state = record.state;
    SurveyedTask {
        task: JournaledTask {
            id: record.id,
            attempts: state.attempts,
            interruptions: state.interruptions,
            interrupted: state.interrupted,
            enqueued_at_ms: state.enqueued_ms,
            not_before_ms: state.not_before_ms,
            last_error: (!record.error.is_empty())
                .then(|| String::from_utf8_lossy(record.error).into_owned()),
            payload: if payloads {
                record.payload.to_vec()
            } else {
                Vec::new()
            },
            priority: record.options.map_or(0, |o| o.priority),
            max_attempts: record.options.map(|o| o.max_attempts).filter(|&n| n > 0),
            expires_at_ms: record.options.map(|o| o.expires_ms).filter(|&ms| ms > 0),
            unique_key: record
                .options
                .map(|o| o.key)
                .filter(|k| !k.is_empty())
                .map(str::to_owned),
            segment: path.to_path_buf(),
            offset,
        },
        payload_len: record.payload.len() as u64,
    }
}

#[cfg(test)]
mod tests;
