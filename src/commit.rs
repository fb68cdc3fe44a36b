//! Group commit for the write-ahead mode: concurrent submits share one write and one fsync.
//!
//! Each submit appends its encoded record to a shared buffer and gets a sequence number. If no
//! flush is under way, it starts one; the flusher takes the whole buffer, writes it (and fsyncs
//! it, under `SyncPolicy::Always`), publishes the highest sequence number it covered, and
//! repeats until the buffer is empty. The more submits arrive during one fsync, the more the
//! next one carries.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::error::JournalError;

#[derive(Debug, Default)]
struct Pending {
    buf: Vec<u8>,
    /// Task records in `buf` (acks do not need an fsync).
    tasks: usize,
    /// The sequence number of the last record appended.
    last_seq: u64,
    /// Whether a flusher is running.
    flushing: bool,
    /// The last sequence number taken by the flusher.
    taken_through: u64,
}

#[derive(Debug, Clone, Default)]
struct Progress {
    /// Every batch up to this sequence number has been handled.
    done: u64,
    /// Every batch up to this sequence number is written (and synced, as the policy says).
    ok_through: u64,
    /// The failure that stopped the journal, if any.
    error: Option<Arc<JournalError>>,
}

/// The shared buffer and the progress of its flushes.
#[derive(Debug)]
pub(crate) struct Commit {
    pending: Mutex<Pending>,
    progress: watch::Sender<Progress>,
    /// Where each segment's records start: (first sequence number, segment), ascending.
    placement: Mutex<Vec<(u64, u64)>>,
}

/// A batch taken by the flusher.
pub(crate) struct Batch {
    pub(crate) bytes: Vec<u8>,
    pub(crate) tasks: usize,
    pub(crate) first_seq: u64,
    pub(crate) last_seq: u64,
}

impl Commit {
    pub(crate) fn new() -> Self {
        Self {
            pending: Mutex::new(Pending::default()),
            progress: watch::Sender::new(Progress::default()),
            placement: Mutex::new(Vec::new()),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends encoded records holding `tasks` task records. Returns their sequence number, and
    /// whether the caller must start a flusher.
    pub(crate) fn push(&self, bytes: &[u8], tasks: usize) -> (u64, bool) {
        let mut pending = self.pending();
        pending.buf.extend_from_slice(bytes);
        pending.tasks += tasks;
        pending.last_seq += 1;
        let start = !pending.flushing;
        pending.flushing = true;
        (pending.last_seq, start)
    }

    /// The next batch for the flusher, or `None` (and the flusher stops) when there is none.
    pub(crate) fn take(&self) -> Option<Batch> {
        let mut pending = self.pending();
        if pending.buf.is_empty() {
            pending.flushing = false;
            return None;
        }
        let first_seq = pending.taken_through + 1;
        pending.taken_through = pending.last_seq;
        Some(Batch {
            bytes: std::mem::take(&mut pending.buf),
            tasks: std::mem::take(&mut pending.tasks),
            first_seq,
            last_seq: pending.last_seq,
        })
    }

    /// Records that the records from `first_seq` on went to `segment` (called by the flusher
    /// before it publishes the batch).
    pub(crate) fn placed(&self, first_seq: u64, segment: u64) {
        let mut placement = self
            .placement
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if placement.last().is_none_or(|&(_, last)| last != segment) {
            placement.push((first_seq, segment));
        }
    }

    /// The segment holding the record numbered `seq` (once its batch is published).
    pub(crate) fn segment_of(&self, seq: u64) -> u64 {
        let placement = self
            .placement
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let at = placement.partition_point(|&(first, _)| first <= seq);
        at.checked_sub(1).map_or(0, |i| placement[i].1)
    }

    /// Publishes how a batch went.
    pub(crate) fn finish(&self, last_seq: u64, result: Result<(), Arc<JournalError>>) {
        self.progress.send_modify(|progress| {
            progress.done = progress.done.max(last_seq);
            match result {
                Ok(()) if progress.error.is_none() => progress.ok_through = last_seq,
                Ok(()) => {}
                Err(error) => {
                    progress.error.get_or_insert(error);
                }
            }
        });
    }

    /// Waits until the batch holding `seq` has been handled.
    ///
    /// # Errors
    ///
    /// The journal failed before that batch was safe.
    pub(crate) async fn wait(&self, seq: u64) -> Result<(), Arc<JournalError>> {
        let mut rx = self.progress.subscribe();
        let progress = match rx.wait_for(|p| p.done >= seq).await {
            Ok(progress) => progress.clone(),
            // The sender lives as long as `self`.
            Err(_) => return Err(Arc::new(JournalError::Poisoned)),
        };
        if seq <= progress.ok_through {
            Ok(())
        } else {
            Err(progress
                .error
                .unwrap_or_else(|| Arc::new(JournalError::Poisoned)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_batch_covers_every_record_pushed_before_it_is_taken() {
        let commit = Commit::new();
        assert_eq!(commit.push(b"a", 1), (1, true));
        assert_eq!(commit.push(b"b", 1), (2, false));
        assert_eq!(commit.push(b"c", 0), (3, false));
        let batch = commit.take().unwrap();
        assert_eq!(
            (batch.bytes.as_slice(), batch.tasks, batch.last_seq),
            (&b"abc"[..], 2, 3)
        );
        assert!(commit.take().is_none());
        commit.finish(3, Ok(()));
        for seq in 1..=3 {
            commit.wait(seq).await.unwrap();
        }
        // The flusher stopped: the next push starts another.
        assert_eq!(commit.push(b"d", 1), (4, true));
    }

    #[tokio::test]
    async fn a_failed_batch_fails_its_records_and_every_later_one_but_not_earlier_ones() {
        let commit = Commit::new();
        commit.push(b"a", 1);
        let first = commit.take().unwrap();
        commit.finish(first.last_seq, Ok(()));
        commit.push(b"b", 1);
        let second = commit.take().unwrap();
        commit.finish(second.last_seq, Err(Arc::new(JournalError::Poisoned)));
        commit.push(b"c", 1);
        let third = commit.take().unwrap();
        commit.finish(third.last_seq, Ok(()));
        assert!(commit.wait(1).await.is_ok());
        assert!(commit.wait(2).await.is_err());
        assert!(
            commit.wait(3).await.is_err(),
            "nothing after a failure is trusted"
        );
    }
}
