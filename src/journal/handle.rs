//! `Journal`, the open journal of one pool run: the lock it holds, its current segment,
//! sealing, spills, dead letters, acks, and deleting or retiring old segments.
//! [`Journal::recover`] (recovery) is in `recover.rs`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::dir::{self, DirLock};
use super::format::{self, Header, Kind};
use super::fs;
use super::record::TaskRecord;
use super::writer::SegmentWriter;
use crate::error::JournalError;
use crate::task::TaskId;

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

/// The open journal of one pool run.
#[derive(Debug)]
pub(crate) struct Journal {
    pub(super) dir: PathBuf,
    /// The file operations segments are written with.
    pub(super) ops: fs::Ops,
    /// Holds the directory lock; dropping it releases it.
    pub(super) lock: DirLock,
    pub(super) epoch: u64,
    pub(super) run: u64,
    pub(super) next_segment: u64,
    /// This run's live segment: acks for replayed tasks, then the spill.
    pub(super) current: Option<SegmentWriter>,
    /// This run's dead-letter segment.
    pub(super) dead: Option<SegmentWriter>,
    /// Segments of earlier runs, deleted once nothing live depends on them.
    pub(super) obsolete: Vec<Sealed>,
    /// Set when a spill could not be made durable: nothing old may be deleted then.
    pub(super) keep_obsolete: bool,
    /// Set when a write-ahead batch failed: no more write-ahead appends (the spill at
    /// shutdown still tries a fresh segment).
    pub(super) failed: bool,
    /// This run's write-ahead segments, set aside at shutdown: deleted only at close, after the
    /// spill of every live task is durable.
    pub(super) rotated: Vec<Sealed>,
    /// Full write-ahead segments, oldest first, until all their tasks are acked: this run's,
    /// after those of earlier runs once [`adopt_obsolete`](Self::adopt_obsolete) is called.
    pub(super) sealed: Vec<Sealed>,
}

/// The tasks a spill writes, made into records one at a time.
pub(crate) trait SpillSource: Send {
    /// How many tasks there are.
    fn len(&self) -> usize;

    /// Task `i` as a record, its payload encoded into `payload` (empty on entry), or `None` if
    /// the payload fails to encode.
    fn record<'a>(&'a self, i: usize, payload: &'a mut Vec<u8>) -> Option<TaskRecord<'a>>;
}

/// Records made beforehand, in tests.
#[cfg(test)]
impl SpillSource for Vec<TaskRecord<'_>> {
    fn len(&self) -> usize {
        <[TaskRecord<'_>]>::len(self)
    }

    fn record<'a>(&'a self, i: usize, _: &'a mut Vec<u8>) -> Option<TaskRecord<'a>> {
        self.get(i).cloned()
    }
}

/// Where a write-ahead batch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Appended {
    /// The number of the segment it went to.
    pub(crate) segment: u64,
    /// Whether a full segment was sealed first.
    pub(crate) sealed: bool,
    /// How long its fsync took, if it was synced.
    pub(crate) synced: Option<Duration>,
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
    /// The indices (into the source, in order) of the tasks not saved: their payload failed to
    /// encode, or they did not fit.
    pub(crate) unsaved: Vec<usize>,
    /// The first failure, if the spill had to be retried or failed.
    pub(crate) error: Option<JournalError>,
}

impl Journal {
    /// The run number of this start, the high half of every new task id.
    pub(crate) fn run(&self) -> u64 {
        self.run
    }

    /// Raises this start's run number to `run` (a shared store's, unique among its pools),
    /// durably, before any task gets an id: the directory's next start then takes a higher
    /// one, so ids stay unique in the directory too. A lower `run` changes nothing.
    pub(crate) fn raise_run(&mut self, run: u64) -> Result<(), JournalError> {
        if run <= self.run {
            return Ok(());
        }
        let path = self.dir.join(dir::LOCK_FILE);
        dir::write_run(&*self.ops, &mut self.lock, &path, run)?;
        self.run = run;
        Ok(())
    }

    /// The epoch records of this run are checksummed with.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    fn new_segment(&mut self, dead: bool) -> Result<SegmentWriter, JournalError> {
        let number = self.next_segment;
        self.next_segment += 1;
        SegmentWriter::create(
            self.ops.clone(),
            self.dir.join(dir::segment_name(number, dead)),
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
    /// started. Returns where the batch went, and how long its fsync took.
    pub(crate) fn append_batch(
        &mut self,
        bytes: &[u8],
        tasks: usize,
        sync: bool,
        segment_bytes: u64,
    ) -> Result<Appended, JournalError> {
        if self.failed {
            return Err(JournalError::Poisoned);
        }
        let result = self
            .seal_if_full(bytes.len() as u64, segment_bytes)
            .and_then(|sealed| {
                let segment = self.current()?;
                let before = segment.len();
                if sync {
                    // Synced at every batch: written over room made ahead, the fsync is cheaper.
                    segment.prepare_room(bytes.len() as u64, segment_bytes);
                }
                segment.append(bytes, tasks)?;
                let started = Instant::now();
                if sync && let Err(error) = segment.sync() {
                    // The batch's submits fail and hand their tasks back, so the tasks must not
                    // come back at the next start either.
                    segment.cut_back(before);
                    return Err(error);
                }
                Ok(Appended {
                    segment: segment.number(),
                    sealed,
                    synced: sync.then(|| started.elapsed()),
                })
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
            segment.trim_room();
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

    /// Fsyncs this run's segment, if it has one (the write-ahead `Interval` policy). Returns
    /// how long the fsync took, if there was one.
    pub(crate) fn sync_current(&mut self) -> Result<Option<Duration>, JournalError> {
        let Some(segment) = self.current.as_mut() else {
            return Ok(None);
        };
        let started = Instant::now();
        let result = segment.sync();
        if result.is_err() {
            self.failed = true;
            self.keep_obsolete = true;
            self.current = None;
        }
        result.map(|()| Some(started.elapsed()))
    }

    /// Starts a fresh segment for what follows: the current one joins the segments that the
    /// shutdown deletes once its spill is durable. Used at shutdown in write-ahead mode, so the
    /// next start reads the live tasks, not the whole run's history.
    pub(crate) fn rotate_for_spill(&mut self) {
        self.rotated.append(&mut self.sealed);
        if let Some(mut segment) = self.current.take() {
            // Its room goes now, for the spill to have it.
            segment.trim_room();
            self.rotated.push(Sealed {
                number: segment.number(),
                path: segment.path().to_path_buf(),
                len: segment.len(),
            });
        }
    }

    /// Appends `record` as a dead letter (its `last_error` is the reason) and makes it
    /// durable.
    pub(crate) fn write_dead(&mut self, record: &TaskRecord<'_>) -> Result<(), JournalError> {
        if self.dead.is_none() {
            self.dead = Some(self.new_segment(true)?);
        }
        let mut buf = Vec::new();
        format::encode_record(&mut buf, self.epoch, Kind::Dead, record);
        let segment = self.dead.as_mut().ok_or(JournalError::Poisoned)?;
        let result = segment.append(&buf, 1).and_then(|()| segment.sync());
        if result.is_err() {
            self.dead = None;
        }
        result
    }

    /// Writes the tasks of `tasks` as live task records, in order, and fsyncs: as many as fit.
    /// Each record is made as it is written (its payload encoded into one reused buffer), so a
    /// spill never holds more than a chunk of encoded records.
    ///
    /// When a write fails (a full disk, say), the records of the failed chunk are written one
    /// by one until one fails too, and what was written is fsynced: that prefix is saved. The
    /// rest is tried once more in a fresh segment. A failed fsync saves nothing of its segment.
    /// What could not be saved, or whose payload failed to encode, is listed in
    /// [`SpillOutcome::unsaved`]. Old segments are never deleted after a spill failed.
    pub(crate) fn spill(&mut self, tasks: &dyn SpillSource) -> SpillOutcome {
        let mut outcome = SpillOutcome::default();
        let count = tasks.len();
        // Every task before `next` is saved or listed as unsaved.
        let mut next = 0;
        for try_number in 0..2 {
            if next == count {
                break;
            }
            let mut unencodable = Vec::new();
            let (saved_to, error) = self.spill_from(tasks, next, &mut unencodable, &mut outcome);
            outcome
                .unsaved
                .extend(unencodable.into_iter().filter(|&i| i < saved_to));
            next = saved_to;
            let Some(error) = error else { break };
            tracing::error!(
                error = &error as &dyn std::error::Error,
                try_number,
                saved = next,
                of = count,
                "journal spill failed"
            );
            self.current = None;
            self.keep_obsolete = true;
            outcome.error.get_or_insert(error);
        }
        outcome.unsaved.extend(next..count);
        outcome.written = count - outcome.unsaved.len();
        outcome
    }

    /// Writes tasks `start..` into the current segment (a new one if there is none) and
    /// fsyncs. Returns the end of the saved range (`start` if nothing was saved) and the first
    /// error, if any; `unencodable` gets the indices left out for their payload.
    fn spill_from(
        &mut self,
        tasks: &dyn SpillSource,
        start: usize,
        unencodable: &mut Vec<usize>,
        times: &mut SpillOutcome,
    ) -> (usize, Option<JournalError>) {
        let started = Instant::now();
        let epoch = self.epoch;
        let segment = match self.current() {
            Ok(segment) => segment,
            Err(error) => return (start, Some(error)),
        };
        let mut buf = Vec::with_capacity(SPILL_CHUNK + 4096);
        // The records in `buf`: each one's task index and end offset.
        let mut in_buf: Vec<(usize, usize)> = Vec::new();
        let mut payload = Vec::new();
        let mut written_to = start;
        let mut failed = None;
        for i in start..tasks.len() {
            payload.clear();
            match tasks.record(i, &mut payload) {
                Some(record) => {
                    format::encode_record(&mut buf, epoch, Kind::Task, &record);
                    in_buf.push((i, buf.len()));
                }
                None => unencodable.push(i),
            }
            if buf.len() >= SPILL_CHUNK || i + 1 == tasks.len() {
                let (fit_to, error) = append_what_fits(segment, &buf, &in_buf);
                buf.clear();
                in_buf.clear();
                if let Some(error) = error {
                    written_to = fit_to;
                    failed = Some(error);
                    break;
                }
                // Every task through `i` is written, or left out for its payload.
                written_to = i + 1;
            }
        }
        let synced = Instant::now();
        times.write_time += synced - started;
        let result = segment.sync();
        times.sync_time += synced.elapsed();
        match result {
            Ok(()) => (written_to, failed),
            // Nothing written to this segment can be trusted.
            Err(error) => (start, Some(failed.unwrap_or(error))),
        }
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
        let path = self.dir.join(dir::PROBE_FILE);
        let (write, fsync) = self
            .ops
            .probe(&path, &vec![0u8; PROBE_BYTES])
            .map_err(|e| JournalError::io("probe", &path, None, e))?;
        let total = (write + fsync).max(Duration::from_micros(1));
        let rate = (PROBE_BYTES as f64 / total.as_secs_f64()) as u64;
        Ok((rate, fsync))
    }

    /// The bytes of the live journal's segments (task and ack records): earlier runs' not yet
    /// deleted, this run's sealed and current ones, and those set aside for deletion at close.
    /// Dead-letter segments are not counted.
    pub(crate) fn bytes(&self) -> u64 {
        let total = |segments: &[Sealed]| segments.iter().map(|s| s.len).sum::<u64>();
        total(&self.obsolete)
            + total(&self.sealed)
            + total(&self.rotated)
            + self.current.as_ref().map_or(0, SegmentWriter::len)
    }

    /// Syncs this run's segment, deletes what the spill replaced, and releases the lock.
    /// Returns the [`bytes`](Self::bytes) left.
    pub(crate) fn close(mut self) -> Result<u64, JournalError> {
        if let Some(segment) = self.current.as_mut()
            && let Err(error) = segment.sync()
        {
            self.keep_obsolete = true;
            self.current = None;
            return Err(error);
        }
        self.retire_obsolete()?;
        if !self.keep_obsolete {
            let rotated: Vec<PathBuf> = self.rotated.iter().map(|s| s.path.clone()).collect();
            remove_segments(&*self.ops, &self.dir, &rotated)?;
            self.rotated.clear();
        }
        self.lock
            .unlock()
            .map_err(|e| JournalError::io("unlock", &self.dir, None, e))?;
        Ok(self.bytes())
    }
}

/// Appends a chunk of records (`in_buf`: each one's task index and end offset in `buf`).
/// Returns the index after the last task written, and the error if the chunk failed. On a full
/// disk (or quota), the chunk's records are then appended one by one until one fails, so that
/// what still fits is written; after any other failure the segment takes nothing more.
fn append_what_fits(
    segment: &mut SegmentWriter,
    buf: &[u8],
    in_buf: &[(usize, usize)],
) -> (usize, Option<JournalError>) {
    let (Some(&(first, _)), Some(&(last, _))) = (in_buf.first(), in_buf.last()) else {
        return (0, None);
    };
    let Err(error) = segment.append(buf, in_buf.len()) else {
        return (last + 1, None);
    };
    let full = error.io_error().is_some_and(|e| {
        matches!(
            e.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        )
    });
    if !full {
        return (first, Some(error));
    }
    let mut from = 0;
    for &(i, end) in in_buf {
        if segment.append(&buf[from..end], 1).is_err() {
            return (i, Some(error));
        }
        from = end;
    }
    (last + 1, Some(error))
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

#[cfg(test)]
mod tests;
