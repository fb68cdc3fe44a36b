//! Group commit for the write-ahead mode: concurrent submits share one write and one fsync.
//!
//! Each submit hands its task record (or an ack) to the commit, which encodes it under this
//! run's epoch, appends it to a shared buffer, gives it a sequence number and wakes the
//! flusher ([`pushed`](Commit::pushed), or [`take_within`](Commit::take_within) where it waits
//! on the blocking thread that wrote the last batch). The flusher, one at a time, takes the
//! whole buffer, writes it (and fsyncs it, under `SyncPolicy::Always`), publishes the highest
//! sequence number it covered, and repeats until the buffer is empty. The more submits arrive
//! during one fsync, the more the next one carries. Each batch has its own signal, so handling
//! a batch wakes the submits waiting for it and no others; each record is encoded straight into
//! the shared buffer, under its lock.
//!
//! Compaction copies ([`Copies`]) are read back from sealed segments already encoded under
//! this run's epoch, and pushed as they are.

use std::collections::VecDeque;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::format::{self, Kind};
use super::reader;
use super::record::TaskRecord;
use crate::error::JournalError;
use crate::task::TaskId;

/// Records that need no fsync (acks, retry states, compaction copies) wait in the buffer for a
/// new task's record to share its write, up to this many bytes...
pub(crate) const DEFER_BYTES: usize = 64 * 1024;

/// ...or this long (the flusher's linger): a lost ack means a repeat, which the at-least-once
/// contract allows, so only this long of finished tasks can run again after a crash.
pub(crate) const ACK_LINGER: std::time::Duration = std::time::Duration::from_millis(10);

/// A written batch's buffer larger than this is not kept for the next.
const SPARE_BYTES: usize = 4 * 1024 * 1024;

/// A task record on its way to the journal through the group commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) id: TaskId,
    /// The record's length in the journal.
    pub(crate) len: u32,
    /// A newer record of a task already in the index (a retry's new state, or a compaction
    /// copy), rather than a new task.
    pub(crate) moved: bool,
}

#[derive(Debug, Default)]
struct Pending {
    buf: Vec<u8>,
    /// The task records in `buf`, in order.
    placements: Vec<Placement>,
    /// The sequence number of the last record appended.
    last_seq: u64,
    /// The signal of the records in `buf`: set when the batch that takes them is handled.
    signal: Arc<Signal>,
    /// The batches taken and not yet handled: the last sequence number of each, and its
    /// signal. One at a time with the one flusher.
    flying: VecDeque<(u64, Arc<Signal>)>,
    /// Every batch up to this sequence number has been handled.
    done: u64,
    /// Every batch up to this sequence number is written (and synced, as the policy says).
    ok_through: u64,
    /// The failure that stopped the journal, if any.
    error: Option<Arc<JournalError>>,
    /// Whether `buf` holds a new task's record (see [`Commit::take`]).
    has_new: bool,
    /// Whether a submit or the pool waits for records in `buf` that need no fsync: they are
    /// taken at once, without waiting for a new task's record to go with.
    urged: bool,
    /// While the flusher waits on [`Commit::takeable`]: how many task records it waits for
    /// (see [`Commit::take_within`]).
    taker_waits_for: Option<usize>,
    /// A written batch's buffers, emptied, for the next batch (see [`Commit::recycle`]).
    spare: (Vec<u8>, Vec<Placement>),
}

impl Pending {
    /// How the batches through `seq` went, once all of them are handled.
    fn outcome(&self, seq: u64) -> Result<(), Arc<JournalError>> {
        if seq <= self.ok_through {
            Ok(())
        } else {
            Err(self
                .error
                .clone()
                .unwrap_or_else(|| Arc::new(JournalError::Poisoned)))
        }
    }
}

/// How one batch went, and the submits waiting for it: each waits on its own batch's signal,
/// so handling a batch wakes its waiters and no one else.
#[derive(Debug, Default)]
struct Signal {
    outcome: OnceLock<Result<(), Arc<JournalError>>>,
    handled: Notify,
}

impl Signal {
    fn set(&self, outcome: Result<(), Arc<JournalError>>) {
        // Set once: a batch is handled once.
        let _ = self.outcome.set(outcome);
        self.handled.notify_waiters();
    }

    async fn wait(&self) -> Result<(), Arc<JournalError>> {
        // Registered before the check: a `notify_waiters` after it wakes this one.
        let handled = self.handled.notified();
        if let Some(outcome) = self.outcome.get() {
            return outcome.clone();
        }
        handled.await;
        self.outcome
            .get()
            .cloned()
            .unwrap_or_else(|| Err(Arc::new(JournalError::Poisoned)))
    }
}

/// The shared buffer and the progress of its flushes.
#[derive(Debug)]
pub(crate) struct Commit {
    /// The epoch records are encoded under: this run's.
    epoch: u64,
    pending: Mutex<Pending>,
    /// Wakes the flusher.
    pushed: Notify,
    /// Wakes the flusher where it waits on the blocking thread that wrote the last batch
    /// ([`take_within`](Self::take_within)).
    takeable: Condvar,
}

/// A batch taken by the flusher.
#[derive(Debug)]
pub(crate) struct Batch {
    pub(crate) bytes: Vec<u8>,
    /// The task records in `bytes`, in order.
    pub(crate) placements: Vec<Placement>,
    /// Whether the batch holds a new task's record: only those wait for an fsync under the
    /// `Always` policy (a lost ack or retry state means a repeat; a compaction copy is synced
    /// before its original goes).
    pub(crate) new_tasks: bool,
    pub(crate) last_seq: u64,
}

impl Commit {
    /// An empty buffer whose records are encoded under `epoch`.
    pub(crate) fn new(epoch: u64) -> Self {
        Self {
            epoch,
            pending: Mutex::new(Pending::default()),
            pushed: Notify::new(),
            takeable: Condvar::new(),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Encodes `record` as a live task (`moved`: a newer record of a task already journaled,
    /// not a new task) and appends it. Returns its sequence number.
    pub(crate) fn push_task(&self, record: &TaskRecord<'_>, moved: bool) -> u64 {
        self.push(self.task_encoder(record, moved))
    }

    /// Encodes `record` as a live task into the buffer, for [`append`](Self::append).
    fn task_encoder<'a>(
        &'a self,
        record: &'a TaskRecord<'_>,
        moved: bool,
    ) -> impl FnOnce(&mut Vec<u8>) -> Option<Placement> + 'a {
        move |buf| {
            let len = format::encode_record(buf, self.epoch, Kind::Task, record);
            Some(Placement {
                id: record.id,
                len: u32::try_from(len).unwrap_or(u32::MAX),
                moved,
            })
        }
    }

    /// The epoch records are encoded under.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Appends an ack for `id`. Returns its sequence number.
    pub(crate) fn push_ack(&self, id: TaskId) -> u64 {
        self.push(|buf| {
            format::encode_ack(buf, self.epoch, id);
            None
        })
    }

    /// Appends the copies of `chunk` (entries of `copies`) that `keep` accepts, in order, as
    /// newer records of their tasks. Returns how many were pushed and the sequence number of
    /// the last one.
    pub(crate) fn push_copies(
        &self,
        copies: &Copies,
        chunk: &[Copy],
        mut keep: impl FnMut(&Copy) -> bool,
    ) -> Pushed {
        let mut pushed = Pushed::default();
        for copy in chunk {
            let Some(bytes) = copies.buf.get(copy.range.clone()) else {
                continue;
            };
            if !keep(copy) {
                continue;
            }
            let seq = self.push(|buf| {
                buf.extend_from_slice(bytes);
                Some(Placement {
                    id: copy.id,
                    len: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
                    moved: true,
                })
            });
            pushed.count += 1;
            pushed.last_seq = Some(seq);
        }
        pushed
    }

    /// Encodes a new task's record and appends it; the batch that takes it resolves
    /// [`InBatch::handled`]. One lock: `push_task` then [`wait`](Self::wait) take two, and
    /// look for the batch in between.
    pub(crate) fn push_new_task(&self, record: &TaskRecord<'_>) -> InBatch {
        let (signal, wake) = {
            let mut pending = self.pending();
            let wake = Self::append(&mut pending, self.task_encoder(record, false));
            // The buffer's signal goes with the batch that takes the record.
            (
                Arc::clone(&pending.signal),
                self.wake_for(&mut pending, wake),
            )
        };
        self.wake(wake);
        InBatch(signal)
    }

    /// Appends one record, which `encode` writes straight into the buffer (no copy of its
    /// own), returning the placement of a task record or `None` for an ack.
    fn push(&self, encode: impl FnOnce(&mut Vec<u8>) -> Option<Placement>) -> u64 {
        let (seq, wake) = {
            let mut pending = self.pending();
            let wake = Self::append(&mut pending, encode);
            (pending.last_seq, self.wake_for(&mut pending, wake))
        };
        self.wake(wake);
        seq
    }

    /// Who a push that made the buffer takeable (`wake`) wakes: the flusher's task, and the
    /// flusher waiting on a blocking thread if it does.
    fn wake_for(&self, pending: &mut Pending, wake: bool) -> Wake {
        // The flusher waiting on its blocking thread: at the first new task's record (its
        // gathering starts), once everyone it waits for is in, or for a waiter. Once: the
        // flag is cleared.
        let blocked = pending
            .taker_waits_for
            .is_some_and(|everyone| wake || pending.placements.len() >= everyone || pending.urged);
        if blocked {
            pending.taker_waits_for = None;
        }
        Wake {
            task: wake,
            blocked,
        }
    }

    /// Wakes them, once the lock is let go.
    fn wake(&self, wake: Wake) {
        if wake.task {
            self.pushed.notify_one();
        }
        if wake.blocked {
            self.takeable.notify_one();
        }
    }

    /// Appends one record under the lock (see [`push`](Self::push)); whether the flusher must
    /// be woken for it.
    fn append(
        pending: &mut Pending,
        encode: impl FnOnce(&mut Vec<u8>) -> Option<Placement>,
    ) -> bool {
        let first = pending.buf.is_empty();
        let had_new = pending.has_new;
        let was_due = pending.buf.len() >= DEFER_BYTES;
        if let Some(placement) = encode(&mut pending.buf) {
            pending.has_new |= !placement.moved;
            pending.placements.push(placement);
        }
        pending.last_seq += 1;
        // The push that made the buffer non-empty, or takeable (its first new task, or
        // past the deferral's size), wakes the flusher; it takes until nothing more is
        // takeable, so a push behind it needs no wake-up of its own.
        let due = pending.buf.len() >= DEFER_BYTES;
        first || (pending.has_new && !had_new) || (due && !was_due)
    }

    /// Resolves once something was pushed since the flusher last waited here (at once if it
    /// was pushed before: the wake-up is kept).
    pub(crate) async fn pushed(&self) {
        self.pushed.notified().await;
    }

    /// The next batch for the flusher, or `None` when the buffer is empty, or holds only
    /// records that need no fsync (acks, retry states, compaction copies) and `force` is not
    /// set: those wait for the next new task's record to share its write, unless they pass
    /// [`DEFER_BYTES`] or someone waits for them ([`wait`](Self::wait)). Written one batch at
    /// a time, they took the flusher from the fsyncs the submits wait for (see
    /// [`holds_deferred`](Self::holds_deferred)).
    pub(crate) fn take(&self, force: bool) -> Option<Batch> {
        Self::take_from(&mut self.pending(), force)
    }

    /// The next batch, for the flusher on the blocking thread that wrote (and finished) the
    /// batch before (see `upkeep.rs`), waiting on this thread: taken once `everyone` task
    /// records are in (the submits that were waiting when that batch was handled, and those it
    /// woke), or `gather` after the first new task's record came, whichever is first; at once
    /// if someone waits for the buffer or it is due by its size. `None` if no new task's
    /// record came within `patience`.
    pub(crate) fn take_within(
        &self,
        patience: Duration,
        everyone: usize,
        gather: Duration,
    ) -> Option<Batch> {
        let deadline = Instant::now() + patience;
        let mut pending = self.pending();
        let mut first_new: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if pending.urged || pending.buf.len() >= DEFER_BYTES {
                return Self::take_from(&mut pending, false);
            }
            let mut until = deadline;
            if pending.has_new {
                let since = *first_new.get_or_insert(now);
                if pending.placements.len() >= everyone || now >= since + gather {
                    return Self::take_from(&mut pending, false);
                }
                until = until.min(since + gather);
            } else if now >= deadline {
                return None;
            }
            pending.taker_waits_for = Some(everyone);
            pending = self
                .takeable
                .wait_timeout(pending, until.saturating_duration_since(now))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            pending.taker_waits_for = None;
        }
    }

    fn take_from(pending: &mut Pending, force: bool) -> Option<Batch> {
        if pending.buf.is_empty() {
            return None;
        }
        if !force && !pending.has_new && !pending.urged && pending.buf.len() < DEFER_BYTES {
            return None;
        }
        pending.has_new = false;
        pending.urged = false;
        // The next batch starts in the buffers the last written batch gave back, or with this
        // one's room: grown from nothing, each batch would pay a run of reallocations (and
        // copies) on the submit path.
        let (spare_bytes, spare_placements) = std::mem::take(&mut pending.spare);
        let bytes = take_buffer(&mut pending.buf, spare_bytes);
        let placements = take_buffer(&mut pending.placements, spare_placements);
        let signal = std::mem::take(&mut pending.signal);
        let last_seq = pending.last_seq;
        pending.flying.push_back((last_seq, signal));
        Some(Batch {
            bytes,
            new_tasks: placements.iter().any(|p| !p.moved),
            placements,
            last_seq,
        })
    }

    /// Takes back a written batch's buffers, emptied, for the next batch (one pair is kept, and
    /// none past [`SPARE_BYTES`]): a batch's buffer, allocated afresh and freed each time, made
    /// the allocator consolidate its free lists and fault in fresh pages at every batch.
    pub(crate) fn recycle(&self, mut bytes: Vec<u8>, mut placements: Vec<Placement>) {
        if bytes.capacity() > SPARE_BYTES {
            return;
        }
        bytes.clear();
        placements.clear();
        let mut pending = self.pending();
        if pending.spare.0.capacity() == 0 {
            pending.spare = (bytes, placements);
        }
    }

    /// Publishes how a batch went, and wakes the submits waiting for it.
    pub(crate) fn finish(&self, last_seq: u64, result: Result<(), Arc<JournalError>>) -> usize {
        let mut handled = Vec::new();
        let (outcome, waiting) = {
            let mut pending = self.pending();
            pending.done = pending.done.max(last_seq);
            match result {
                Ok(()) if pending.error.is_none() => pending.ok_through = last_seq,
                Ok(()) => {}
                Err(error) => {
                    pending.error.get_or_insert(error);
                }
            }
            while pending
                .flying
                .front()
                .is_some_and(|(last, _)| *last <= last_seq)
            {
                handled.extend(pending.flying.pop_front());
            }
            (pending.outcome(last_seq), pending.placements.len())
        };
        for (_, signal) in handled {
            signal.set(outcome.clone());
        }
        waiting
    }

    /// Fails the batch taken and not handled, if there is one (its writer panicked).
    pub(crate) fn fail_taken(&self, error: Arc<JournalError>) {
        let taken = self.pending().flying.back().map(|(last, _)| *last);
        if let Some(last_seq) = taken {
            self.finish(last_seq, Err(error));
        }
    }

    /// Whether records wait in the buffer that [`take`](Self::take) left there: the flusher
    /// writes them after [`ACK_LINGER`] if no new task's record comes first.
    pub(crate) fn holds_deferred(&self) -> bool {
        !self.pending().buf.is_empty()
    }

    /// The sequence number of the last record pushed.
    pub(crate) fn last_seq(&self) -> u64 {
        self.pending().last_seq
    }

    /// Waits until the batch holding `seq` has been handled.
    ///
    /// # Errors
    ///
    /// The journal failed before that batch was safe.
    pub(crate) async fn wait(&self, seq: u64) -> Result<(), Arc<JournalError>> {
        let signal = {
            let mut pending = self.pending();
            if seq <= pending.done {
                return pending.outcome(seq);
            }
            match pending.flying.iter().find(|(last, _)| seq <= *last) {
                Some((_, signal)) => Arc::clone(signal),
                // Still in the buffer: taken at once, new task or not.
                None => {
                    let wake = !pending.urged && !pending.has_new;
                    pending.urged = true;
                    let wake = self.wake_for(&mut pending, wake);
                    self.wake(wake);
                    Arc::clone(&pending.signal)
                }
            }
        };
        signal.wait().await
    }
}

/// Takes `current` for a batch, leaving `spare` in its place if it has room, else a buffer
/// with the room `current` had.
fn take_buffer<T>(current: &mut Vec<T>, spare: Vec<T>) -> Vec<T> {
    let next = if spare.capacity() > 0 {
        spare
    } else {
        Vec::with_capacity(current.capacity())
    };
    std::mem::replace(current, next)
}

/// Who a push wakes (see [`Commit::wake_for`]).
#[derive(Debug, Clone, Copy)]
struct Wake {
    task: bool,
    blocked: bool,
}

/// A new task's record in the commit buffer (see [`Commit::push_new_task`]).
#[must_use = "the record is durable only once `handled` resolves with Ok"]
pub(crate) struct InBatch(Arc<Signal>);

impl InBatch {
    /// Waits until the batch holding the record has been handled.
    ///
    /// # Errors
    ///
    /// The journal failed before that batch was safe.
    pub(crate) async fn handled(self) -> Result<(), Arc<JournalError>> {
        self.0.wait().await
    }
}

/// What [`Commit::push_copies`] pushed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Pushed {
    /// Copies pushed.
    pub(crate) count: usize,
    /// The sequence number of the last one.
    pub(crate) last_seq: Option<u64>,
}

/// The live tasks of sealed segments, read back and encoded under this run's epoch, for a
/// compaction: one buffer of records, and an entry per copy.
#[derive(Debug, Default)]
pub(crate) struct Copies {
    buf: Vec<u8>,
    list: Vec<Copy>,
}

/// One task copied by [`Copies::read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Copy {
    pub(crate) id: TaskId,
    /// The segment it was copied from.
    pub(crate) segment: u64,
    /// Its encoded record in the buffer.
    range: Range<usize>,
}

impl Copies {
    /// The copies, in the order read (segment order, id order within a segment).
    pub(crate) fn list(&self) -> &[Copy] {
        &self.list
    }

    /// Reads the task records of the sealed segment `number` at `path` that `keep` selects
    /// (the last one per id) and adds each, encoded under `epoch`. Damaged records are
    /// skipped: a task whose record does not read back is not copied, so its segment stays. A
    /// segment already gone yields nothing.
    pub(crate) fn read(
        &mut self,
        path: &Path,
        number: u64,
        epoch: u64,
        mut keep: impl FnMut(TaskId) -> bool,
    ) -> Result<(), JournalError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
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
        self.list.reserve(records.len());
        for record in records {
            let start = self.buf.len();
            format::encode_record(&mut self.buf, epoch, Kind::Task, &record.task());
            self.list.push(Copy {
                id: record.id,
                segment: number,
                range: start..self.buf.len(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
