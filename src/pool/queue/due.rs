//! The queue's side of the upkeep task: the tasks waiting for their time (retries, and tasks
//! submitted for later) released to the backlog as they come due, and room freed below the
//! batch handed to the submitters waiting for it.

use std::time::Duration;

use tokio::time::Instant;

use super::{Job, Queue, ROOM_OWED_FOR, lock};
use crate::pool::waiting::due_after;

impl<T> Queue<T> {
    /// Hands room freed below the batch to the submitters waiting for it, once it has waited
    /// [`ROOM_OWED_FOR`] (for the upkeep task); returns when that is, if it has not yet.
    fn pay_owed_room(&self, now: Instant) -> Option<Instant> {
        let mut lanes = lock(&self.lanes);
        let since = lanes.owed_since?;
        let due = since + ROOM_OWED_FOR;
        if now < due {
            return Some(due);
        }
        lanes.owed_since = None;
        let free = self.capacity.saturating_sub(lanes.used());
        let woken = lanes.wanting_room.min(free);
        lanes.wanting_room -= woken;
        drop(lanes);
        for _ in 0..woken {
            self.room.notify_one();
        }
        None
    }

    /// Puts a failed task back after its backoff delay.
    pub(crate) fn retry_later(&self, job: Job<T>, delay: Duration) {
        lock(&self.waiting).push(due_after(Instant::now(), delay), job);
        self.waiting_changed.notify_one();
    }

    /// Resolves when a retry is added, or room is owed (for the upkeep task that releases and
    /// pays them).
    pub(crate) async fn retry_added(&self) {
        self.waiting_changed.notified().await;
    }

    /// Moves the retries and scheduled tasks that are due to the backlog (in id order), and
    /// hands owed room to the submitters waiting; returns when the next of either is due.
    pub(crate) fn release_due(&self) -> Option<Instant> {
        let now = Instant::now();
        let room_due = self.pay_owed_room(now);
        let mut waiting = lock(&self.waiting);
        let mut due = waiting.take_due(now);
        let next = match (waiting.next_due(), room_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        drop(waiting);
        if !due.is_empty() {
            due.sort_by_key(|job| job.id);
            #[cfg(feature = "metrics")]
            for job in &mut due {
                job.queued_at = now;
            }
            let mut lanes = lock(&self.lanes);
            lanes.backlog.extend(due);
            self.backlogged.set(true);
            let woken = lanes.idle.min(lanes.backlog.len());
            lanes.idle -= woken;
            drop(lanes);
            for _ in 0..woken {
                self.ready.notify_one();
            }
        }
        next
    }
}
