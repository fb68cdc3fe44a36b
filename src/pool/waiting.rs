//! The tasks waiting for their time (retries after their backoff, tasks submitted for later),
//! ordered by when they are due: a heap, so that releasing the due ones costs their number
//! times a logarithm, not a walk over every waiting task (a pool holding many scheduled tasks
//! releases one at a time, as each comes due).

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use std::time::Duration;

use tokio::time::Instant;

use super::job::Job;
use crate::task::TaskId;

/// The longest wait kept as such: about 30 years. A time further off (a run-at far in the
/// future, or one read from the journal) waits this long instead of overflowing the clock.
const LONGEST: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// The instant `delay` after `now`, capped at [`LONGEST`] from it (which the monotonic
/// clock, counted from boot, always has room for).
pub(crate) fn due_after(now: Instant, delay: Duration) -> Instant {
    now + delay.min(LONGEST)
}

/// A task and when it is due.
struct Entry<T> {
    /// The earliest due first; among equals, the smallest id.
    key: Reverse<(Instant, TaskId)>,
    job: Job<T>,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl<T> Eq for Entry<T> {}

impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key.cmp(&other.key)
    }
}

/// The waiting tasks.
pub(crate) struct Waiting<T> {
    heap: BinaryHeap<Entry<T>>,
}

impl<T> Waiting<T> {
    pub(crate) fn new(tasks: Vec<(Instant, Job<T>)>) -> Self {
        Self {
            heap: tasks
                .into_iter()
                .map(|(at, job)| Entry {
                    key: Reverse((at, job.id)),
                    job,
                })
                .collect(),
        }
    }

    pub(crate) fn push(&mut self, at: Instant, job: Job<T>) {
        self.heap.push(Entry {
            key: Reverse((at, job.id)),
            job,
        });
    }

    /// Takes the tasks due at `now`, earliest first (by id among equals).
    pub(crate) fn take_due(&mut self, now: Instant) -> Vec<Job<T>> {
        let mut due = Vec::new();
        while self.heap.peek().is_some_and(|entry| entry.key.0.0 <= now) {
            if let Some(entry) = self.heap.pop() {
                due.push(entry.job);
            }
        }
        due
    }

    /// When the next task is due.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|entry| entry.key.0.0)
    }

    /// Every waiting task (each keeps its time in its state).
    pub(crate) fn take_all(&mut self) -> Vec<Job<T>> {
        std::mem::take(&mut self.heap)
            .into_iter()
            .map(|entry| entry.job)
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }
}
