//! The write-ahead parts of a pool: the group commit, and the live index that says which
//! segment holds each unfinished task's latest record (so sealed segments go once nothing live
//! is left in them, and sparse ones are compacted). Every push that must be ordered against
//! the index (an ack, a retry's new state, a compaction copy) is made under the index lock.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use tokio::sync::Notify;

use super::live::LiveIndex;
use super::lock::lock;
use crate::journal::{Commit, InBatch, TaskRecord};
use crate::policy::SyncPolicy;
use crate::task::TaskId;

/// The write-ahead parts of a pool.
pub(crate) struct WriteAhead {
    pub(crate) commit: Commit,
    /// Where each unfinished task's latest record is, so that sealed segments go once nothing
    /// live is left in them, and sparse ones are compacted.
    pub(crate) live: Mutex<LiveIndex>,
    pub(crate) sync: SyncPolicy,
    pub(crate) segment_bytes: u64,
    /// Wakes the upkeep task: a segment emptied or was sealed.
    pub(crate) segments_changed: Notify,
    /// The newest segment compacted so far; a compaction needs a newer one.
    pub(crate) compacted_through: AtomicU64,
}

impl WriteAhead {
    pub(crate) fn new(epoch: u64, live: LiveIndex, sync: SyncPolicy, segment_bytes: u64) -> Self {
        Self {
            commit: Commit::new(epoch),
            live: Mutex::new(live),
            sync,
            segment_bytes,
            segments_changed: Notify::new(),
            compacted_through: AtomicU64::new(0),
        }
    }

    /// Hands a new task's record to the group commit: its batch written (and synced, as the
    /// policy says) resolves the [`InBatch`].
    pub(crate) fn push_new(&self, record: &TaskRecord<'_>) -> InBatch {
        self.commit.push_new_task(record)
    }

    /// A journaled task is finished: it leaves the index and its ack enters the buffer under
    /// one lock, so that a compaction copy of the task is either not made or ordered before
    /// the ack. The ack rides with the next batch, unsynced.
    pub(crate) fn finish(&self, id: TaskId) {
        let emptied = {
            let mut live = lock(&self.live);
            let emptied = live.finish(id);
            self.commit.push_ack(id);
            emptied
        };
        if emptied {
            self.segments_changed.notify_one();
        }
    }

    /// Journals a failed task's new state (attempts, retry time, error) as it waits for the
    /// retry. Not synced: if it is lost, the task runs with its earlier state, an extra attempt
    /// at most. Nothing is pushed once `closed` says intake closed (checked under the index
    /// lock, which the shutdown takes to see what was pushed): the final spill journals the
    /// task in its latest state then.
    pub(crate) fn journal_retry(&self, record: &TaskRecord<'_>, closed: impl Fn() -> bool) {
        let mut live = lock(&self.live);
        if closed() || !live.begin_move(record.id) {
            return;
        }
        self.commit.push_task(record, true);
    }

    /// Waits until everything pushed so far is written. `closed` must already hold (see
    /// `journal_retry`), so nothing but new submits can follow.
    pub(crate) async fn flush_pushed(&self) {
        let pushed = {
            let _live = lock(&self.live);
            self.commit.last_seq()
        };
        // A failure is the journal's, recorded by the flusher.
        let _ = self.commit.wait(pushed).await;
    }
}
