//! Reading a journal directory from outside a pool, and taking dead letters back.
//!
//! [`inspect_journal`], [`verify_journal`] and [`journal_stats`] only read: they take no lock,
//! truncate nothing and copy nothing, so they are safe beside a running pool (whose segment
//! being written at that moment may then show a torn tail). They read every segment with the
//! same rules as recovery: segments in number order, records in file order, the last record of
//! a task id wins.
//!
//! [`requeue_dead_letters`] writes, so it takes the directory lock as a starting pool does and
//! refuses while a pool holds it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::format::{self, Header, HeaderError, Kind, Meta, RecordRef};
use super::writer::SegmentWriter;
use super::{
    DAMAGED_DIR, DEAD_PREFIX, LOCK_FILE, SEGMENT_SUFFIX, SegmentFile, fs, list_segments, lock_dir,
    random_epoch, read_run, reader,
};
use crate::error::JournalError;
use crate::report::Damage;
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
    /// The segment holding the record that decides the task's state.
    pub segment: PathBuf,
    /// That record's offset in the segment.
    pub offset: u64,
}

/// What a journal directory holds, from [`inspect_journal`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct JournalContents {
    /// Live tasks, in the order the next start replays them (id order).
    pub live: Vec<JournaledTask>,
    /// Dead letters, in id order. A task found in both lists is a dead letter whose requeue (or
    /// whose failure) was cut short by a crash: it runs at the next start and stays a dead
    /// letter until taken back.
    pub dead: Vec<JournaledTask>,
    /// Segment files read, live and dead.
    pub segments: usize,
    /// Stretches of damage met while reading, torn tails included; their records are not in
    /// the lists. [`verify_journal`] tells where they are.
    pub damage: usize,
}

/// What checking every segment and record of a journal directory found, from
/// [`verify_journal`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verification {
    /// Segment files checked, live and dead.
    pub segments: usize,
    /// Valid records found.
    pub records: usize,
    /// Damaged segment headers (offset 0) and damage in the middle of a segment, each followed
    /// by valid records; recovery skips what they cover and keeps a copy of the file.
    pub damage: Vec<Damage>,
    /// Ends of segments where nothing valid follows: a write cut short by a crash, or damage
    /// to the last records; recovery truncates them.
    pub torn_tails: Vec<Damage>,
}

impl Verification {
    /// Whether no damage and no torn tail was found.
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty() && self.torn_tails.is_empty()
    }
}

/// Counts and sizes of a journal directory, from [`journal_stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct JournalStats {
    /// Live segment files.
    pub segments: usize,
    /// Their total size in bytes.
    pub segment_bytes: u64,
    /// Dead-letter segment files.
    pub dead_segments: usize,
    /// Their total size in bytes.
    pub dead_segment_bytes: u64,
    /// Valid records in all segments (tasks, acks and dead letters, superseded ones included).
    pub records: usize,
    /// Live tasks: what the next start replays.
    pub live_tasks: usize,
    /// Total size of their payloads in bytes.
    pub live_payload_bytes: u64,
    /// Dead letters.
    pub dead_letters: usize,
    /// Total size of their payloads in bytes.
    pub dead_payload_bytes: u64,
    /// Stretches of damage, torn tails included.
    pub damage: usize,
    /// Copies of damaged segments kept under `damaged/`.
    pub damaged_copies: usize,
    /// Their total size in bytes.
    pub damaged_copy_bytes: u64,
    /// The run counter stored in `LOCK`: the run number of the last start. `None` if the file
    /// is missing or damaged (the next start then derives it from the segments).
    pub run: Option<u64>,
}

/// Which dead letters [`requeue_dead_letters`] takes back.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Requeue {
    /// Every dead letter.
    All,
    /// These; each must be a dead letter.
    Ids(Vec<TaskId>),
}

/// What [`requeue_dead_letters`] did.
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

/// [`requeue_dead_letters`] failed.
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
/// missing from the lists and counted in [`JournalContents::damage`].
pub fn inspect_journal(dir: &Path) -> Result<JournalContents, JournalError> {
    let survey = survey(dir, true)?;
    Ok(JournalContents {
        segments: survey.segments.len(),
        damage: survey.damage_count(),
        live: survey.live.into_values().map(|t| t.task).collect(),
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
pub fn verify_journal(dir: &Path) -> Result<Verification, JournalError> {
    let survey = survey(dir, false)?;
    let mut verification = Verification::default();
    for segment in survey.segments {
        verification.segments += 1;
        verification.records += segment.records;
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
pub fn journal_stats(dir: &Path) -> Result<JournalStats, JournalError> {
    let survey = survey(dir, false)?;
    let mut stats = JournalStats {
        damage: survey.damage_count(),
        live_tasks: survey.live.len(),
        live_payload_bytes: survey.live.values().map(|t| t.payload_len).sum(),
        dead_letters: survey.dead.len(),
        dead_payload_bytes: survey.dead.values().map(|t| t.payload_len).sum(),
        run: stored_run(dir)?,
        ..JournalStats::default()
    };
    for segment in &survey.segments {
        stats.records += segment.records;
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
pub fn requeue_dead_letters(dir: &Path, which: Requeue) -> Result<Requeued, RequeueError> {
    // Never make a journal directory (or a `LOCK` file) out of a mistyped path.
    journal_segments(dir)?;
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
        let meta = Meta {
            attempts: 0,
            interruptions: 0,
            enqueued_ms: task.enqueued_at_ms,
            not_before_ms: 0,
            flags: 0,
        };
        let error = task.last_error.as_deref().unwrap_or("");
        let Ok(_) =
            format::encode_record(&mut buf, epoch, Kind::Task, task.id, &meta, error, |out| {
                out.extend_from_slice(&task.payload);
                Ok::<(), std::convert::Infallible>(())
            });
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

fn segment_name(number: u64, dead: bool) -> String {
    if dead {
        format!("{DEAD_PREFIX}{number:020}{SEGMENT_SUFFIX}")
    } else {
        format!("{number:020}{SEGMENT_SUFFIX}")
    }
}

/// The run counter in `LOCK`, read without taking the lock.
fn stored_run(dir: &Path) -> Result<Option<u64>, JournalError> {
    let path = dir.join(LOCK_FILE);
    match File::open(&path) {
        Ok(mut file) => read_run(&mut file, &path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(JournalError::io("open", &path, None, e)),
    }
}

/// The segments of `dir`, in number order; an error if `dir` holds neither a segment nor a
/// `LOCK` file, which every directory a pool has opened has: the path is most likely mistyped
/// (the parent of the journal directory, say).
fn journal_segments(dir: &Path) -> Result<Vec<SegmentFile>, JournalError> {
    let segments = list_segments(dir)?;
    let lock = dir.join(LOCK_FILE);
    if segments.is_empty() && !lock.exists() {
        return Err(JournalError::io(
            "open",
            &lock,
            None,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not a journal directory: it has no LOCK file and no segment",
            ),
        ));
    }
    Ok(segments)
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
    let mut survey = Survey {
        segments: Vec::new(),
        live: BTreeMap::new(),
        dead: BTreeMap::new(),
        next_number: 1,
    };
    for file in journal_segments(dir)? {
        survey.next_number = survey.next_number.max(file.number.saturating_add(1));
        let bytes = match std::fs::read(&file.path) {
            Ok(bytes) => bytes,
            // Retired by a running pool since the listing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(JournalError::io("read", &file.path, None, e)),
        };
        let scan = reader::scan(&bytes, |offset, record| {
            let id = record.id;
            let state = if file.dead {
                &mut survey.dead
            } else {
                &mut survey.live
            };
            match (file.dead, record.kind) {
                (false, Kind::Task) | (true, Kind::Dead) => {
                    let task = surveyed(&file.path, offset, &record, payloads);
                    state.insert(id, task);
                }
                (_, Kind::Ack) | (false, Kind::Dead) => {
                    state.remove(&id);
                }
                (true, Kind::Task) => {}
            }
        });
        if let Err(HeaderError::UnsupportedVersion(found)) = scan.header {
            return Err(JournalError::UnsupportedVersion {
                path: file.path.clone(),
                found,
                supported: format::VERSION,
            });
        }
        let segment = segment_survey(file, &bytes, &scan);
        survey.segments.push(segment);
    }
    Ok(survey)
}

fn surveyed(path: &Path, offset: u64, record: &RecordRef<'_>, payloads: bool) -> SurveyedTask {
    let meta = record.meta;
    SurveyedTask {
        task: JournaledTask {
            id: record.id,
            attempts: meta.attempts,
            interruptions: meta.interruptions,
            interrupted: meta.flags & format::FLAG_INTERRUPTED != 0,
            enqueued_at_ms: meta.enqueued_ms,
            not_before_ms: meta.not_before_ms,
            last_error: (!record.error.is_empty())
                .then(|| String::from_utf8_lossy(record.error).into_owned()),
            payload: if payloads {
                record.payload.to_vec()
            } else {
                Vec::new()
            },
            segment: path.to_path_buf(),
            offset,
        },
        payload_len: record.payload.len() as u64,
    }
}

/// What the scan of one segment found wrong, as [`Damage`] with the file's path.
fn segment_survey(file: SegmentFile, bytes: &[u8], scan: &reader::Scan) -> SegmentSurvey {
    let len = bytes.len() as u64;
    let damage_at = |offset: u64, len: u64, reason: String| Damage {
        path: file.path.clone(),
        offset,
        len,
        reason,
    };
    let mut damage = Vec::new();
    if let Err(error @ HeaderError::Damaged { .. }) = scan.header {
        damage.push(damage_at(0, format::HEADER_LEN as u64, error.to_string()));
        if scan.epoch.is_none() && len > format::HEADER_LEN as u64 {
            // Without an epoch no record can be checked: everything after the header is lost.
            damage.push(damage_at(
                format::HEADER_LEN as u64,
                len - format::HEADER_LEN as u64,
                "no record validates under either epoch of the damaged header".to_owned(),
            ));
        }
    }
    for d in &scan.damage {
        damage.push(damage_at(d.offset, d.skipped, d.error.to_string()));
    }
    let torn_tail = scan.torn_tail.map(|(offset, error)| {
        let reason = if scan.header == Err(HeaderError::Short) {
            HeaderError::Short.to_string()
        } else {
            error.to_string()
        };
        damage_at(offset, len.saturating_sub(offset), reason)
    });
    SegmentSurvey {
        bytes: len,
        records: scan.records,
        damage,
        torn_tail,
        file,
    }
}

#[cfg(test)]
mod tests;
