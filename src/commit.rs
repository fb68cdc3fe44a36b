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
use crate::live::Placement;

#[derive(Debug, Default)]
struct Pending {
    buf: Vec<u8>,
    /// The task records in `buf`, in order.
    placements: Vec<Placement>,
    /// The sequence number of the last record appended.
    last_seq: u64,
    /// Whether a flusher is running.
    flushing: bool,
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
}

/// A batch taken by the flusher.
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
    pub(crate) fn new() -> Self {
        Self {
            pending: Mutex::new(Pending::default()),
            progress: watch::Sender::new(Progress::default()),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends encoded records: one task record with its placement, or acks (`None`). Returns
    /// their sequence number, and whether the caller must start a flusher.
    pub(crate) fn push(&self, bytes: &[u8], task: Option<Placement>) -> (u64, bool) {
        let mut pending = self.pending();
        pending.buf.extend_from_slice(bytes);
        if let Some(placement) = task {
            pending.placements.push(placement);
        }
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
        let placements = std::mem::take(&mut pending.placements);
        Some(Batch {
            bytes: std::mem::take(&mut pending.buf),
            new_tasks: placements.iter().any(|p| !p.moved),
            placements,
            last_seq: pending.last_seq,
        })
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
    use crate::task::TaskId;

    fn task(seq: u64, moved: bool) -> Option<Placement> {
        Some(Placement {
            id: TaskId::new(1, seq),
            len: 1,
            moved,
        })
    }

    #[tokio::test]
    async fn one_batch_covers_every_record_pushed_before_it_is_taken() {
        let commit = Commit::new();
        assert_eq!(commit.push(b"a", task(1, false)), (1, true));
        assert_eq!(commit.push(b"b", task(2, true)), (2, false));
        assert_eq!(commit.push(b"c", None), (3, false));
        let batch = commit.take().unwrap();
        assert_eq!(
            (
                batch.bytes.as_slice(),
                batch.placements.len(),
                batch.last_seq
            ),
            (&b"abc"[..], 2, 3)
        );
        assert!(batch.new_tasks);
        assert!(commit.take().is_none());
        commit.finish(3, Ok(()));
        for seq in 1..=3 {
            commit.wait(seq).await.unwrap();
        }
        // The flusher stopped: the next push starts another.
        assert_eq!(commit.push(b"d", task(3, true)), (4, true));
        assert!(
            !commit.take().unwrap().new_tasks,
            "a moved record alone needs no fsync"
        );
    }

    #[tokio::test]
    async fn a_failed_batch_fails_its_records_and_every_later_one_but_not_earlier_ones() {
        let commit = Commit::new();
        commit.push(b"a", task(1, false));
        let first = commit.take().unwrap();
        commit.finish(first.last_seq, Ok(()));
        commit.push(b"b", task(2, false));
        let second = commit.take().unwrap();
        commit.finish(second.last_seq, Err(Arc::new(JournalError::Poisoned)));
        commit.push(b"c", task(3, false));
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
