//! The journal: one locked directory of checksummed, append-only segment files.
//!
//! A directory holds:
//!
//! - `LOCK`: held with an exclusive `File::try_lock` for the pool's whole life; it also stores
//!   the run counter that makes task ids unique across runs;
//! - `NNNNNNNNNNNNNNNNNNNN.seg`: live segments (task and ack records), numbered in write order;
//! - `dead-NNNNNNNNNNNNNNNNNNNN.seg`: dead-letter segments;
//! - `damaged/`: copies of segments found damaged at recovery, kept for inspection.
//!
//! Segments from earlier runs are read at start and kept until what replaces them is durable:
//! until each of their tasks is acked, or the run's spill is fsynced.
//!
//! The public functions here look into a journal directory without starting a pool: list its
//! live tasks and dead letters, verify every record, count, and move dead letters back to the
//! live journal. The `drainpool` command-line tool (the `cli` feature) is built on them.

pub use self::inspect::{
    JournalContents, JournalStats, JournaledTask, Requeue, RequeueError, Requeued, Verification,
    inspect_journal, journal_stats, requeue_dead_letters, verify_journal,
};

#[cfg(test)]
pub(crate) mod faults;
pub(crate) mod format;
pub(crate) mod fs;
mod inspect;
mod reader;
mod writer;

use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use self::format::{Header, HeaderError, Kind, RecordRef};
use self::writer::SegmentWriter;
use crate::error::{JournalError, StartError};
use crate::report::{Damage, RecoveryReport};
use crate::task::TaskId;

const LOCK_FILE: &str = "LOCK";
const DAMAGED_DIR: &str = "damaged";
const SEGMENT_SUFFIX: &str = ".seg";
const DEAD_PREFIX: &str = "dead-";
const PROBE_FILE: &str = "probe.tmp";

/// Spills are written in chunks of about this many bytes.
const SPILL_CHUNK: usize = 1 << 20;

/// A full segment: one this run sealed, or one of an earlier run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sealed {
    pub(crate) number: u64,
    pub(crate) path: PathBuf,
    /// Its size in bytes.
    pub(crate) len: u64,
}

/// A segment file found in the directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SegmentFile {
    number: u64,
    dead: bool,
    path: PathBuf,
}

/// The open journal of one pool run.
#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    /// The file operations segments are written with.
    ops: fs::Ops,
    /// Holds the directory lock; closing the file releases it.
    lock: File,
    epoch: u64,
    run: u64,
    next_segment: u64,
    /// This run's live segment: acks for replayed tasks, then the spill.
    current: Option<SegmentWriter>,
    /// This run's dead-letter segment.
    dead: Option<SegmentWriter>,
    /// Segments of earlier runs, deleted once nothing live depends on them.
    obsolete: Vec<Sealed>,
    /// Set when a spill could not be made durable: nothing old may be deleted then.
    keep_obsolete: bool,
    /// Set when a write-ahead batch failed: no more write-ahead appends (the spill at
    /// shutdown still tries a fresh segment).
    failed: bool,
    /// This run's write-ahead segments, set aside at shutdown: deleted only at close, after the
    /// spill of every live task is durable.
    rotated: Vec<PathBuf>,
    /// Full write-ahead segments, oldest first, until all their tasks are acked: this run's,
    /// after those of earlier runs once [`adopt_obsolete`](Self::adopt_obsolete) is called.
    sealed: Vec<Sealed>,
}

/// How a spill went.
#[derive(Debug, Default)]
pub(crate) struct SpillOutcome {
    /// Time spent encoding and writing.
    pub(crate) write_time: Duration,
    /// Time spent in fsync.
    pub(crate) sync_time: Duration,
    /// Tasks made durable.
    pub(crate) written: usize,
    /// Tasks whose payload failed to serialize.
    pub(crate) unencodable: usize,
    /// The first failure, if the spill had to be retried or failed.
    pub(crate) error: Option<JournalError>,
    /// Whether the tasks are durable (in the first file or the retry).
    pub(crate) durable: bool,
}

impl Journal {
    /// Opens and locks `dir`, recovers every segment, and hands each valid record of the live
    /// segments to `on_record` with its segment's number, in segment and file order.
    pub(crate) fn open(
        dir: &Path,
        ops: fs::Ops,
        mut on_record: impl FnMut(u64, RecordRef<'_>),
    ) -> Result<(Self, RecoveryReport), StartError> {
        fs::create_dir(dir).map_err(|e| JournalError::io("create", dir, None, e))?;
        let Some((mut lock, lock_path)) = lock_dir(dir)? else {
            return Err(StartError::JournalLocked {
                dir: dir.to_path_buf(),
            });
        };
        let stored_run = read_run(&mut lock, &lock_path)?;

        let segments = list_segments(dir)?;
        let mut report = RecoveryReport::default();
        let mut max_run = stored_run.unwrap_or(0);
        let mut obsolete = Vec::new();
        let mut next_segment = 1;
        // Dead letters, last state per id: a dead record sets one aside, an ack (written when
        // it is requeued) takes it back.
        let mut dead = std::collections::HashSet::new();
        for segment in &segments {
            next_segment = next_segment.max(segment.number.saturating_add(1));
            let bytes = std::fs::read(&segment.path)
                .map_err(|e| JournalError::io("read", &segment.path, None, e))?;
            let scan = reader::scan(&bytes, |_, record| {
                max_run = max_run.max(record.id.run());
                if segment.dead {
                    match record.kind {
                        Kind::Dead => dead.insert(record.id),
                        Kind::Ack => dead.remove(&record.id),
                        Kind::Task => false,
                    };
                } else {
                    on_record(segment.number, record);
                }
            });
            if let Err(HeaderError::UnsupportedVersion(found)) = scan.header {
                return Err(JournalError::UnsupportedVersion {
                    path: segment.path.clone(),
                    found,
                    supported: format::VERSION,
                }
                .into());
            }
            report.segments += 1;
            report.records += scan.records;
            note_damage(dir, segment, &scan, &mut report);
            if !segment.dead {
                obsolete.push(Sealed {
                    number: segment.number,
                    path: segment.path.clone(),
                    len: bytes.len() as u64,
                });
            }
        }

        report.dead_letters = dead.len();
        let run = max_run.saturating_add(1);
        write_run(&mut lock, &lock_path, run)?;
        let journal = Self {
            dir: dir.to_path_buf(),
            ops,
            lock,
            epoch: random_epoch(run),
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
        Ok((journal, report))
    }

    /// The run number of this start, the high half of every new task id.
    pub(crate) fn run(&self) -> u64 {
        self.run
    }

    /// The epoch records of this run are checksummed with.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    fn new_segment(&mut self, dead: bool) -> Result<SegmentWriter, JournalError> {
        let number = self.next_segment;
        self.next_segment += 1;
        let name = if dead {
            format!("{DEAD_PREFIX}{number:020}{SEGMENT_SUFFIX}")
        } else {
            format!("{number:020}{SEGMENT_SUFFIX}")
        };
        SegmentWriter::create(
            self.ops.clone(),
            self.dir.join(name),
            Header {
                epoch: self.epoch,
                segment: number,
            },
        )
    }

    fn current(&mut self) -> Result<&mut SegmentWriter, JournalError> {
        if self.current.is_none() {
            self.current = Some(self.new_segment(false)?);
        }
        self.current.as_mut().ok_or(JournalError::Poisoned)
    }

    /// Records that a task from an earlier run is finished. Not synced: a lost ack only means
    /// the task runs again, which the at-least-once contract allows.
    pub(crate) fn append_ack(&mut self, id: TaskId) -> Result<(), JournalError> {
        let mut buf = Vec::with_capacity(format::RECORD_HEADER_LEN);
        format::encode_ack(&mut buf, self.epoch, id);
        let result = self.current().and_then(|segment| segment.append(&buf, 0));
        if result.is_err() {
            // Never write to a segment after a failed write.
            self.current = None;
        }
        result
    }

    /// Appends a write-ahead batch of encoded records (`tasks` of them task records), fsyncing
    /// it when `sync` is set. A failure poisons the segment and every later batch: a failed
    /// write or fsync is never retried as if the data were safe.
    ///
    /// A segment that would grow past `segment_bytes` is sealed (fsynced) first and a new one
    /// started. Returns the number of the segment the batch went to, and whether one was
    /// sealed.
    pub(crate) fn append_batch(
        &mut self,
        bytes: &[u8],
        tasks: usize,
        sync: bool,
        segment_bytes: u64,
    ) -> Result<(u64, bool), JournalError> {
        if self.failed {
            return Err(JournalError::Poisoned);
        }
        let result = self
            .seal_if_full(bytes.len() as u64, segment_bytes)
            .and_then(|sealed| {
                let segment = self.current()?;
                let before = segment.len();
                segment.append(bytes, tasks)?;
                if sync && let Err(error) = segment.sync() {
                    // The batch's submits fail and hand their tasks back, so the tasks must not
                    // come back at the next start either.
                    segment.cut_back(before);
                    return Err(error);
                }
                Ok((segment.number(), sealed))
            });
        if result.is_err() {
            self.failed = true;
            self.keep_obsolete = true;
            self.current = None;
        }
        result
    }

    fn seal_if_full(&mut self, adding: u64, segment_bytes: u64) -> Result<bool, JournalError> {
        let full = self.current.as_ref().is_some_and(|s| {
            s.len() > format::HEADER_LEN as u64 && s.len() + adding > segment_bytes
        });
        if full && let Some(mut segment) = self.current.take() {
            segment.sync()?;
            self.sealed.push(Sealed {
                number: segment.number(),
                path: segment.path().to_path_buf(),
                len: segment.len(),
            });
            return Ok(true);
        }
        Ok(false)
    }

    /// Write-ahead: the segments of earlier runs join the sealed ones, to be deleted as their
    /// tasks finish or are compacted, like this run's own.
    pub(crate) fn adopt_obsolete(&mut self) {
        let mut adopted = std::mem::take(&mut self.obsolete);
        adopted.append(&mut self.sealed);
        self.sealed = adopted;
    }

    /// Whether segments may still be deleted: not after a failure.
    pub(crate) fn may_delete(&self) -> bool {
        !self.failed && !self.keep_obsolete
    }

    /// Deletes the sealed segments numbered up to `through`, oldest first: nothing live is
    /// left in them (the caller counts), and no older segment is left whose tasks they ack.
    ///
    /// This run's segment is fsynced first, so whatever replaced them (acks, compaction copies,
    /// new retry states) is durable before they go. Nothing is deleted once the journal has
    /// failed.
    pub(crate) fn delete_sealed_through(&mut self, through: u64) -> Result<(), JournalError> {
        let done = self.sealed.partition_point(|s| s.number <= through);
        if done == 0 || !self.may_delete() {
            return Ok(());
        }
        self.sync_current()?;
        // Forget them only once removed: on a failure they stay listed (and go with the spill's
        // rotation at shutdown).
        let paths: Vec<PathBuf> = self.sealed[..done].iter().map(|s| s.path.clone()).collect();
        remove_segments(&*self.ops, &self.dir, &paths)?;
        self.sealed.drain(..done);
        Ok(())
    }

    /// Fsyncs this run's segment, if it has one (the write-ahead `Interval` policy).
    pub(crate) fn sync_current(&mut self) -> Result<(), JournalError> {
        let Some(segment) = self.current.as_mut() else {
            return Ok(());
        };
        let result = segment.sync();
        if result.is_err() {
            self.failed = true;
            self.keep_obsolete = true;
            self.current = None;
        }
        result
    }

    /// Starts a fresh segment for what follows: the current one joins the segments that the
    /// shutdown deletes once its spill is durable. Used at shutdown in write-ahead mode, so the
    /// next start reads the live tasks, not the whole run's history.
    pub(crate) fn rotate_for_spill(&mut self) {
        self.rotated.extend(self.sealed.drain(..).map(|s| s.path));
        if let Some(segment) = self.current.take() {
            self.rotated.push(segment.path().to_path_buf());
        }
    }

    /// Appends one encoded dead-letter record (encoded under [`epoch`](Self::epoch)) and
    /// makes it durable.
    pub(crate) fn write_dead(&mut self, record: &[u8]) -> Result<(), JournalError> {
        if self.dead.is_none() {
            self.dead = Some(self.new_segment(true)?);
        }
        let segment = self.dead.as_mut().ok_or(JournalError::Poisoned)?;
        let result = segment.append(record, 1).and_then(|()| segment.sync());
        if result.is_err() {
            self.dead = None;
        }
        result
    }

    /// Writes every item as a task record and fsyncs. `encode` appends one item's record to the
    /// buffer (under the epoch it is given) and returns false if its payload failed to
    /// serialize.
    ///
    /// A failed write or fsync poisons the segment in use; the whole spill is then tried once
    /// more into a fresh segment. Old segments are never deleted after a spill failed.
    pub(crate) fn spill<J>(
        &mut self,
        items: &[J],
        mut encode: impl FnMut(&J, u64, &mut Vec<u8>) -> bool,
    ) -> SpillOutcome {
        let mut outcome = SpillOutcome::default();
        if items.is_empty() {
            outcome.durable = true;
            return outcome;
        }
        for try_number in 0..2 {
            match self.spill_once(items, &mut encode, &mut outcome) {
                Ok((written, unencodable)) => {
                    outcome.written = written;
                    outcome.unencodable = unencodable;
                    outcome.durable = true;
                    return outcome;
                }
                Err(error) => {
                    tracing::error!(%error, try_number, "journal spill failed");
                    self.current = None;
                    self.keep_obsolete = true;
                    outcome.error.get_or_insert(error);
                }
            }
        }
        outcome
    }

    fn spill_once<J>(
        &mut self,
        items: &[J],
        encode: &mut impl FnMut(&J, u64, &mut Vec<u8>) -> bool,
        times: &mut SpillOutcome,
    ) -> Result<(usize, usize), JournalError> {
        let started = Instant::now();
        let epoch = self.epoch;
        let segment = self.current()?;
        let mut buf = Vec::with_capacity(SPILL_CHUNK + 4096);
        let (mut written, mut unencodable, mut in_buf) = (0, 0, 0);
        for item in items {
            if encode(item, epoch, &mut buf) {
                in_buf += 1;
            } else {
                unencodable += 1;
            }
            if buf.len() >= SPILL_CHUNK {
                segment.append(&buf, in_buf)?;
                written += in_buf;
                in_buf = 0;
                buf.clear();
            }
        }
        segment.append(&buf, in_buf)?;
        written += in_buf;
        let synced = Instant::now();
        times.write_time += synced - started;
        let result = segment.sync();
        times.sync_time += synced.elapsed();
        result?;
        Ok((written, unencodable))
    }

    /// The sealed segments, oldest first.
    pub(crate) fn sealed(&self) -> &[Sealed] {
        &self.sealed
    }

    /// Keeps the segments of earlier runs for good: something live in them could not be
    /// written elsewhere.
    pub(crate) fn keep_obsolete(&mut self) {
        self.keep_obsolete = true;
    }

    /// Deletes the segments of earlier runs once nothing live depends on them (every replayed
    /// task acked, dead-lettered or spilled again), and this run's segment if it holds no task.
    pub(crate) fn retire_obsolete(&mut self) -> Result<(), JournalError> {
        if self.keep_obsolete {
            return Ok(());
        }
        if self.current.as_ref().is_some_and(|s| s.tasks() == 0)
            && let Some(segment) = self.current.take()
        {
            self.obsolete.push(Sealed {
                number: segment.number(),
                path: segment.path().to_path_buf(),
                len: segment.len(),
            });
        }
        if self.obsolete.is_empty() {
            return Ok(());
        }
        let paths: Vec<PathBuf> = std::mem::take(&mut self.obsolete)
            .into_iter()
            .map(|s| s.path)
            .collect();
        remove_segments(&*self.ops, &self.dir, &paths)?;
        tracing::debug!(dir = %self.dir.display(), "retired old segments");
        Ok(())
    }

    /// Measures how fast this directory takes data: writes and fsyncs a 1 MiB probe file (then
    /// removes it). Returns bytes per second, fsync included, and the time of the fsync alone.
    pub(crate) fn probe(&self) -> Result<(u64, Duration), JournalError> {
        const PROBE_BYTES: usize = 1 << 20;
        let path = self.dir.join(PROBE_FILE);
        let _ = std::fs::remove_file(&path);
        let result = (|| {
            let mut file = fs::create_new(&path)?;
            let started = Instant::now();
            file.write_all(&vec![0u8; PROBE_BYTES])?;
            let synced = Instant::now();
            file.sync_data()?;
            let done = Instant::now();
            let total = (done - started).max(Duration::from_micros(1));
            let rate = (PROBE_BYTES as f64 / total.as_secs_f64()) as u64;
            Ok::<_, std::io::Error>((rate, done - synced))
        })();
        let _ = std::fs::remove_file(&path);
        result.map_err(|e| JournalError::io("probe", &path, None, e))
    }

    /// Syncs this run's segment, deletes what the spill replaced, and releases the lock.
    pub(crate) fn close(mut self) -> Result<(), JournalError> {
        if let Some(segment) = self.current.as_mut()
            && let Err(error) = segment.sync()
        {
            self.keep_obsolete = true;
            self.current = None;
            return Err(error);
        }
        self.retire_obsolete()?;
        if !self.keep_obsolete {
            remove_segments(&*self.ops, &self.dir, &std::mem::take(&mut self.rotated))?;
        }
        self.lock
            .unlock()
            .map_err(|e| JournalError::io("unlock", &self.dir, None, e))?;
        Ok(())
    }
}

/// Reads the task records of a sealed segment that `keep` selects (the last one per id) and
/// appends each, encoded under `epoch`, to `out`. Returns each copy's id and byte range in
/// `out`. Damaged records are skipped: a task whose record does not read back is not copied,
/// so its segment stays. A segment already gone yields nothing.
pub(crate) fn copy_tasks(
    path: &Path,
    epoch: u64,
    out: &mut Vec<u8>,
    mut keep: impl FnMut(TaskId) -> bool,
) -> Result<Vec<(TaskId, std::ops::Range<usize>)>, JournalError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(JournalError::io("read", path, None, e)),
    };
    let mut last = std::collections::HashMap::new();
    reader::scan(&bytes, |_, record| {
        if record.kind == Kind::Task && keep(record.id) {
            last.insert(record.id, record);
        }
    });
    let mut records: Vec<_> = last.into_values().collect();
    records.sort_unstable_by_key(|record| record.id);
    let mut copies = Vec::with_capacity(records.len());
    for record in records {
        let start = out.len();
        let error = String::from_utf8_lossy(record.error);
        let Ok(_) = format::encode_record(
            out,
            epoch,
            Kind::Task,
            record.id,
            &record.meta,
            &error,
            |out| {
                out.extend_from_slice(record.payload);
                Ok::<(), std::convert::Infallible>(())
            },
        );
        copies.push((record.id, start..out.len()));
    }
    Ok(copies)
}

/// Removes segment files (one already gone is fine), then fsyncs the directory so the removals
/// are durable. Does nothing for an empty list.
fn remove_segments(
    ops: &dyn fs::FileOps,
    dir: &Path,
    paths: &[PathBuf],
) -> Result<(), JournalError> {
    if paths.is_empty() {
        return Ok(());
    }
    for path in paths {
        match ops.remove(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(JournalError::io("remove", path, None, e)),
        }
    }
    ops.sync_dir(dir)
        .map_err(|e| JournalError::io("fsync", dir, None, e))
}

/// Lists the segment files of `dir`, in number order.
fn list_segments(dir: &Path) -> Result<Vec<SegmentFile>, JournalError> {
    let entries = std::fs::read_dir(dir).map_err(|e| JournalError::io("list", dir, None, e))?;
    let mut segments = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| JournalError::io("list", dir, None, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((number, dead)) = parse_segment_name(name) {
            segments.push(SegmentFile {
                number,
                dead,
                path: entry.path(),
            });
        }
    }
    segments.sort();
    Ok(segments)
}

fn parse_segment_name(name: &str) -> Option<(u64, bool)> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
    let (digits, dead) = match stem.strip_prefix(DEAD_PREFIX) {
        Some(digits) => (digits, true),
        None => (stem, false),
    };
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, dead))
}

/// Logs and records what a scan found wrong; truncates a torn tail; copies a damaged file aside.
fn note_damage(
    dir: &Path,
    segment: &SegmentFile,
    scan: &reader::Scan,
    report: &mut RecoveryReport,
) {
    let path = &segment.path;
    if let Err(error @ HeaderError::Damaged { .. }) = scan.header {
        tracing::warn!(path = %path.display(), offset = 0, %error, "damaged segment header");
        report.damage.push(Damage {
            path: path.clone(),
            offset: 0,
            len: format::HEADER_LEN as u64,
            reason: error.to_string(),
        });
    }
    for damage in &scan.damage {
        tracing::warn!(
            path = %path.display(),
            offset = damage.offset,
            skipped = damage.skipped,
            error = %damage.error,
            "damaged record skipped"
        );
        report.damage.push(Damage {
            path: path.clone(),
            offset: damage.offset,
            len: damage.skipped,
            reason: damage.error.to_string(),
        });
    }
    // A whole record failing its checks at the end may be a torn write (its last pages never
    // reached the disk) or damage: it is truncated like a torn tail, but a copy is kept.
    let whole_bad_tail = matches!(
        scan.torn_tail,
        Some((
            _,
            format::RecordError::Checksum | format::RecordError::BadBody
        ))
    );
    if scan.is_damaged() || whole_bad_tail {
        match keep_copy(dir, path) {
            Ok(copy) => report.damaged_copies.push(copy),
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "could not keep a copy of a damaged segment");
            }
        }
    }
    if let Some((offset, error)) = scan.torn_tail {
        tracing::warn!(path = %path.display(), offset, %error, "torn tail truncated");
        report.torn_tails.push(Damage {
            path: path.clone(),
            offset,
            len: std::fs::metadata(path)
                .map(|m| m.len().saturating_sub(offset))
                .unwrap_or(0),
            reason: error.to_string(),
        });
        if let Err(error) = truncate(path, offset) {
            tracing::warn!(path = %path.display(), %error, "could not truncate torn tail");
        }
    }
}

fn truncate(path: &Path, len: u64) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.set_len(len)?;
    file.sync_data()
}

/// Copies a damaged segment into `damaged/`, never overwriting an earlier copy.
fn keep_copy(dir: &Path, path: &Path) -> std::io::Result<PathBuf> {
    let damaged = dir.join(DAMAGED_DIR);
    fs::create_dir(&damaged)?;
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
        match fs::create_new(&copy) {
            Ok(mut file) => {
                let mut source = File::open(path)?;
                std::io::copy(&mut source, &mut file)?;
                file.sync_all()?;
                fs::sync_dir(&damaged)?;
                return Ok(copy);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Takes the directory's lock: its open `LOCK` file (closing it releases the lock) and the
/// file's path, or `None` if another process holds it.
fn lock_dir(dir: &Path) -> Result<Option<(File, PathBuf)>, JournalError> {
    let lock_path = dir.join(LOCK_FILE);
    let lock = fs::open_or_create(&lock_path)
        .map_err(|e| JournalError::io("open", &lock_path, None, e))?;
    match lock.try_lock() {
        Ok(()) => Ok(Some((lock, lock_path))),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(JournalError::io("lock", &lock_path, None, e)),
    }
}

/// The lock file's content: the last run number, and its CRC-32C.
fn read_run(lock: &mut File, path: &Path) -> Result<Option<u64>, JournalError> {
    let mut buf = [0u8; 16];
    let mut read = 0;
    lock.seek(SeekFrom::Start(0))
        .map_err(|e| JournalError::io("read", path, None, e))?;
    while read < buf.len() {
        match lock.read(&mut buf[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(JournalError::io("read", path, None, e)),
        }
    }
    if read == 0 {
        return Ok(None);
    }
    let mut run = [0u8; 8];
    run.copy_from_slice(&buf[0..8]);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&buf[8..12]);
    if read < 16 || crc32c::crc32c(&run) != u32::from_le_bytes(crc) {
        tracing::warn!(path = %path.display(), "run counter damaged; deriving it from the segments");
        return Ok(None);
    }
    Ok(Some(u64::from_le_bytes(run)))
}

fn write_run(lock: &mut File, path: &Path, run: u64) -> Result<(), JournalError> {
    let mut buf = [0u8; 16];
    buf[0..8].copy_from_slice(&run.to_le_bytes());
    buf[8..12].copy_from_slice(&crc32c::crc32c(&run.to_le_bytes()).to_le_bytes());
    lock.seek(SeekFrom::Start(0))
        .map_err(|e| JournalError::io("write", path, None, e))?;
    lock.write_all(&buf)
        .map_err(|e| JournalError::io("write", path, Some(0), e))?;
    lock.sync_data()
        .map_err(|e| JournalError::io("fsync", path, None, e))?;
    if let Some(dir) = path.parent() {
        fs::sync_dir(dir).map_err(|e| JournalError::io("fsync", dir, None, e))?;
    }
    Ok(())
}

/// A writer epoch: random per start, so bytes from an earlier writer never validate.
fn random_epoch(run: u64) -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(run);
    hasher.write_u32(std::process::id());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    hasher.write_u128(now);
    hasher.finish()
}

#[cfg(test)]
mod tests;
