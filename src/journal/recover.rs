//! The rules recovery and inspection share, and recovery itself.
//!
//! - [`read_segment`] reads one segment's bytes: each valid record to a callback, and what was
//!   wrong as [`Damage`] entries (a damaged header, damage followed by valid records) and a torn
//!   tail (nothing valid after it). A newer format version is an error.
//! - [`Fold`] keeps the last state per task id over every segment, in number order, records in
//!   file order. In a live segment a task record makes its task live, an ack or a dead letter
//!   ends it; in a dead-letter segment a dead letter sets its task aside, an ack (written when
//!   it is requeued) takes it back, and a task record means nothing. Its [`LastState`] is
//!   indexed by id without hashing (`last_state.rs`).
//! - [`Journal::recover`] applies both to the whole directory, then repairs: a torn tail is
//!   truncated, a damaged segment is copied to `damaged/`. Every write there goes through the
//!   journal's [`FileOps`]. It keeps each live task's latest record as a position in the live
//!   segments' bytes, which its [`Recovery`] holds, and reads the live tasks from them in id
//!   order: no record is copied until the pool makes it a job.
//!
//! The read-only look into a directory (`inspect.rs`) uses the first two, so what recovery
//! reports and what `verify` shows agree.

use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::dir::{self, DAMAGED_DIR, SegmentFile};
use super::format::{self, HeaderError, Kind, RecordError, RecordRef};
use super::fs::{self, FileOps};
use super::handle::{Journal, Sealed};
use super::reader::{self, Scan};
use super::record::Recovered;
#[cfg(test)]
use super::record::TaskRecord;
use crate::error::FileKind;
use crate::error::{JournalError, StartError};
use crate::report::{Damage, RecoveryReport};

mod last_state;

pub(super) use last_state::LastState;

/// What reading one segment found, besides its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SegmentRead {
    /// Valid records.
    pub(super) records: usize,
    /// A damaged header (offset 0), and damage followed by further valid records.
    pub(super) damage: Vec<Damage>,
    /// Where the valid prefix ends when nothing valid follows it.
    pub(super) torn_tail: Option<Damage>,
    /// Whether recovery keeps a copy of the file: it is damaged, or its last record is whole
    /// but fails its checks (a torn write, or damage: it is truncated like a torn tail).
    pub(super) keep_copy: bool,
}

/// Reads the segment `file`, whose content is `bytes`, calling `on_record` with each valid
/// record and its offset, in file order.
///
/// # Errors
///
/// [`JournalError::UnsupportedVersion`] for a segment of a newer format (no record is read).
pub(super) fn read_segment<'a>(
    file: &SegmentFile,
    bytes: &'a [u8],
    on_record: impl FnMut(u64, RecordRef<'a>),
) -> Result<SegmentRead, JournalError> {
    let scan = reader::scan(bytes, on_record);
    if let Err(HeaderError::UnsupportedVersion(found)) = scan.header {
        return Err(JournalError::UnsupportedVersion {
            path: file.path.clone(),
            found,
            supported: format::VERSION,
        });
    }
    let (damage, torn_tail) = damage_of(file, bytes.len() as u64, &scan);
    let whole_bad_tail = matches!(
        scan.torn_tail,
        Some((_, RecordError::Checksum | RecordError::BadBody))
    );
    Ok(SegmentRead {
        records: scan.records,
        keep_copy: !damage.is_empty() || whole_bad_tail,
        damage,
        torn_tail,
    })
}

/// What the scan of the `len` bytes of the segment `file` found wrong, as [`Damage`]: the
/// damage entries, and the torn tail.
///
/// A valid header holding another segment's number is damage too: the file was copied or
/// renamed, and read in the wrong place its records could revive tasks a later segment ended.
/// Its records are still read (a task may come back twice, never be lost).
fn damage_of(file: &SegmentFile, len: u64, scan: &Scan) -> (Vec<Damage>, Option<Damage>) {
    let header_len = format::HEADER_LEN as u64;
    let damage_at = |offset: u64, len: u64, reason: String| Damage {
        path: file.path.clone(),
        offset,
        len,
        reason,
    };
    let mut damage = Vec::new();
    if let Ok(header) = scan.header
        && header.segment != file.number
    {
        damage.push(damage_at(
            0,
            header_len,
            format!(
                "header holds segment number {}, but the file is named for segment {}",
                header.segment, file.number
            ),
        ));
    }
    if let Err(error @ HeaderError::Damaged { .. }) = scan.header {
        damage.push(damage_at(0, header_len, error.to_string()));
        if scan.epoch.is_none() && len > header_len {
            // Without an epoch no record can be checked: everything after the header is lost.
            damage.push(damage_at(
                header_len,
                len - header_len,
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
    (damage, torn_tail)
}

/// The last state per task id over a journal directory: live tasks and dead letters.
#[derive(Debug)]
pub(super) struct Fold<L, D> {
    pub(super) live: LastState<L>,
    pub(super) dead: LastState<D>,
}

impl<L, D> Fold<L, D> {
    pub(super) fn with_capacity(live: usize) -> Self {
        Self {
            live: LastState::with_capacity(live),
            dead: LastState::with_capacity(0),
        }
    }

    /// Applies one record of a segment (`dead_segment`: a dead-letter one). `live` makes the
    /// state of a task record in a live segment, `dead` that of a dead letter in a dead-letter
    /// segment; each is called only for such a record.
    pub(super) fn apply(
        &mut self,
        dead_segment: bool,
        record: &RecordRef<'_>,
        live: impl FnOnce() -> L,
        dead: impl FnOnce() -> D,
    ) {
        match (dead_segment, record.kind) {
            (false, Kind::Task) => self.live.set(record.id, live()),
            (false, Kind::Ack | Kind::Dead) => self.live.end(record.id),
            (true, Kind::Dead) => self.dead.set(record.id, dead()),
            (true, Kind::Ack) => self.dead.end(record.id),
            (true, Kind::Task) => {}
        }
    }
}

/// Recovery's tables are sized from the segments' bytes: about one task per this many.
const BYTES_PER_TASK_ESTIMATE: u64 = 160;

/// Where a live task's latest record is: the index of its segment among those [`Recovery`]
/// keeps, and its offset there (past the header, so never 0).
#[derive(Debug, Clone, Copy)]
struct Position {
    segment: u32,
    offset: NonZeroU64,
}

/// What [`Journal::recover`] found: the live tasks, each at its latest record, read from the
/// live segments' bytes, which it holds until it is dropped.
#[derive(Debug)]
pub(crate) struct Recovery {
    /// The live segments' numbers and bytes, in number order.
    segments: Vec<(u64, Vec<u8>)>,
    live: LastState<Position>,
    /// Whether a task record with a priority was read (perhaps one a later record replaced).
    prioritized: bool,
}

impl Recovery {
    /// How many live tasks there are.
    pub(crate) fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether any live task may have a priority: if not, [`tasks`](Self::tasks) is already
    /// in replay order.
    pub(crate) fn prioritized(&self) -> bool {
        self.prioritized
    }

    /// The live tasks in id order, each in its latest state, its payload borrowed.
    pub(crate) fn tasks(&self) -> impl Iterator<Item = Recovered<&[u8]>> {
        self.live.iter().filter_map(|(id, at)| {
            let (number, bytes) = self.segments.get(at.segment as usize)?;
            let offset = usize::try_from(at.offset.get()).ok()?;
            // The record validated when it was read; these are the same bytes.
            let (record, _) = format::decode_checked_record(bytes.get(offset..)?).ok()?;
            Some(Recovered {
                id,
                state: record.state,
                last_error: (!record.error.is_empty())
                    .then(|| String::from_utf8_lossy(record.error).into()),
                options: record.owned_options(),
                value: record.payload,
                segment: *number,
                len: u32::try_from(record.encoded_len()).unwrap_or(u32::MAX),
            })
        })
    }
}

impl Journal {
    /// [`recover`](Self::recover), with `decode`'s value of each live task: called once per
    /// live task, in id order.
    #[cfg(test)]
    pub(crate) fn open<V>(
        dir: &Path,
        ops: fs::Ops,
        mut decode: impl FnMut(&TaskRecord<'_>) -> V,
    ) -> Result<(Self, RecoveryReport, Vec<Recovered<V>>), StartError> {
        let (journal, report, recovery) = Self::recover(dir, ops)?;
        let live = recovery
            .tasks()
            .map(|task| {
                let record = TaskRecord {
                    id: task.id,
                    state: task.state,
                    last_error: task.last_error.as_deref().unwrap_or_default().into(),
                    payload: task.value,
                    options: task.options.as_deref().map(std::borrow::Cow::Borrowed),
                };
                let value = decode(&record);
                task.replace(value).1
            })
            .collect();
        Ok((journal, report, live))
    }

    /// Opens and locks `dir` (creating it if needed) and recovers every segment: the live
    /// tasks, each at its latest record. The run counter is raised and made durable before
    /// this returns.
    ///
    /// Two passes: each segment is read whole and its records checked, in number order, the
    /// last record per id kept as a position (nothing is copied); then [`Recovery::tasks`]
    /// reads the live tasks from the same bytes, in id order.
    pub(crate) fn recover(
        dir: &Path,
        ops: fs::Ops,
    ) -> Result<(Self, RecoveryReport, Recovery), StartError> {
        // The journal path (the operator's, so it may be a link) must be a directory.
        match std::fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => {
                return Err(JournalError::WrongKind {
                    path: dir.to_path_buf(),
                    expected: FileKind::Directory,
                    found: FileKind::of(meta.file_type()),
                }
                .into());
            }
            _ => {}
        }
        ops.create_dir(dir)
            .map_err(|e| JournalError::io("create", dir, None, e))?;
        dir::check_writable_by_us_only(dir)?;
        dir::check_kind(&dir.join(DAMAGED_DIR), FileKind::Directory)?;
        let Some((mut lock, lock_path)) = dir::lock_dir(dir)? else {
            return Err(StartError::JournalLocked {
                dir: dir.to_path_buf(),
            });
        };
        let stored_run = dir::read_run(&mut lock, &lock_path)?;

        let dir::Listing {
            segments,
            skipped,
            next_number: next_segment,
        } = dir::list(dir)?;
        let estimate = segments
            .iter()
            .filter(|s| !s.dead)
            .filter_map(|s| std::fs::symlink_metadata(&s.path).ok())
            .map(|m| m.len())
            .sum::<u64>()
            / BYTES_PER_TASK_ESTIMATE;
        let mut fold = Fold::with_capacity(usize::try_from(estimate).unwrap_or(0));
        let mut report = RecoveryReport::default();
        let mut max_run = stored_run.unwrap_or(0);
        let mut obsolete = Vec::new();
        for skipped in skipped {
            tracing::warn!(path = %skipped.path.display(), kind = %skipped.kind, "not a regular file; skipped");
            report.skipped.push(skipped);
        }
        let mut kept = Vec::new();
        let mut prioritized = false;
        for segment in &segments {
            let bytes = fs::read_regular(&segment.path)
                .map_err(|e| JournalError::io("read", &segment.path, None, e))?;
            let index = u32::try_from(kept.len()).unwrap_or(u32::MAX);
            let read = read_segment(segment, &bytes, |offset, record| {
                max_run = max_run.max(record.id.run());
                prioritized |= record.options.is_some_and(|o| o.priority > 0);
                let at = || Position {
                    segment: index,
                    offset: NonZeroU64::new(offset).unwrap_or(NonZeroU64::MAX),
                };
                fold.apply(segment.dead, &record, at, || ());
            })?;
            report.segments += 1;
            report.records += read.records as u64;
            repair(&*ops, dir, segment, read, &mut report);
            if !segment.dead {
                obsolete.push(Sealed {
                    number: segment.number,
                    path: segment.path.clone(),
                    len: bytes.len() as u64,
                });
                kept.push((segment.number, bytes));
            }
        }

        report.dead_letters = fold.dead.len() as u64;
        let recovery = Recovery {
            segments: kept,
            live: fold.live,
            prioritized,
        };
        // Ids must never repeat in a directory's life: a start without a new run number stops.
        let Some(run) = max_run.checked_add(1) else {
            return Err(StartError::RunsExhausted {
                dir: dir.to_path_buf(),
            });
        };
        dir::write_run(&*ops, &mut lock, &lock_path, run)?;
        let journal = Self {
            dir: dir.to_path_buf(),
            ops,
            lock,
            epoch: dir::random_epoch(run),
            run,
            next_segment,
            current: None,
            dead: None,
            obsolete,
            keep_obsolete: false,
            failed: false,
            rotated: Vec::new(),
            sealed: Vec::new(),
        };
        tracing::info!(
            dir = %dir.display(),
            run,
            segments = report.segments,
            records = report.records,
            damaged = report.damage.len(),
            "journal opened"
        );
        Ok((journal, report, recovery))
    }
}

/// Logs and reports what reading `segment` found wrong; keeps a copy of a damaged file and
/// truncates a torn tail (a failure of either is logged, and recovery goes on).
fn repair(
    ops: &dyn FileOps,
    dir: &Path,
    segment: &SegmentFile,
    read: SegmentRead,
    report: &mut RecoveryReport,
) {
    let path = &segment.path;
    for damage in &read.damage {
        let what = if damage.offset == 0 {
            "damaged segment header"
        } else {
            "damaged records skipped"
        };
        tracing::warn!(
            path = %path.display(),
            offset = damage.offset,
            skipped = damage.len,
            error = %damage.reason,
            "{what}"
        );
    }
    report.damage.extend(read.damage);
    if read.keep_copy {
        match keep_copy(ops, dir, path) {
            Ok(copy) => report.damaged_copies.push(copy),
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "could not keep a copy of a damaged segment");
            }
        }
    }
    if let Some(torn) = read.torn_tail {
        tracing::warn!(path = %path.display(), offset = torn.offset, error = %torn.reason, "torn tail truncated");
        if let Err(error) = ops.truncate_tail(path, torn.offset) {
            tracing::warn!(path = %path.display(), %error, "could not truncate torn tail");
        }
        report.torn_tails.push(torn);
    }
}

/// Copies a damaged segment into `damaged/`, never overwriting an earlier copy.
fn keep_copy(ops: &dyn FileOps, dir: &Path, path: &Path) -> std::io::Result<PathBuf> {
    let damaged = dir.join(DAMAGED_DIR);
    ops.create_dir(&damaged)?;
    // Checked at open too; the directory is writable by this user alone, so it stays so.
    dir::check_kind(&damaged, FileKind::Directory).map_err(std::io::Error::other)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut n = 0u32;
    loop {
        let copy = damaged.join(format!("{name}.{stamp}.{n}"));
        match ops.keep_copy(path, &copy) {
            Ok(()) => return Ok(copy),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
