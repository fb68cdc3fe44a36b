//! A worker's hand: the new tasks it took from the queue at once while the queue was long.
//!
//! Taking one task per lock makes the lanes' lock the pool's hottest line once handlers are
//! short: the submitter and every worker take it at every task. So a worker that finds the
//! queue long takes a few new tasks at once (at most [`HAND`], and never more than its share
//! of what waits), holds them in its hand and takes them from there, under a lock only the
//! shutdown and a worker out of work ever share with it. A worker whose hand and the queue are
//! empty takes from another's hand before it waits, so no task waits in a hand behind a long
//! run while a worker idles. The shutdown takes every hand with the queue. The backlog still
//! goes first: a worker takes from its hand only while the queue's backlog is empty.
//!
//! Lock order: the lanes, then a hand; a worker takes its own hand alone.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::pool::job::Queued;
use crate::pool::lock::lock;

/// How many new tasks a worker takes at once at most.
pub(crate) const HAND: usize = 16;

/// One worker's hand, on a line of its own (128 bytes: the pair of lines the adjacent-line
/// prefetcher moves together).
#[repr(align(128))]
pub(super) struct Hand<T> {
    tasks: Mutex<VecDeque<Queued<T>>>,
}

impl<T> Hand<T> {
    pub(super) fn new() -> Self {
        Self {
            tasks: Mutex::new(VecDeque::with_capacity(HAND)),
        }
    }

    /// Takes the oldest task in the hand, unless `closed` says the gate has closed (read
    /// under the hand's lock: the shutdown closes the gate before it takes the hands).
    pub(super) fn take(&self, closed: impl FnOnce() -> bool) -> Result<Option<Queued<T>>, ()> {
        let mut tasks = lock(&self.tasks);
        if tasks.is_empty() {
            return Ok(None);
        }
        if closed() {
            return Err(());
        }
        Ok(tasks.pop_front())
    }

    /// Adds the tasks of a take, in the order taken.
    pub(super) fn fill(&self, taken: impl Iterator<Item = Queued<T>>) {
        lock(&self.tasks).extend(taken);
    }

    /// Every task in the hand, emptying it.
    pub(super) fn drain(&self) -> Vec<Queued<T>> {
        lock(&self.tasks).drain(..).collect()
    }

    pub(super) fn len(&self) -> usize {
        lock(&self.tasks).len()
    }
}

/// The backlog flag, on 128 bytes of its own: every worker reads it at every task, and it is
/// written only when the backlog fills or empties, so its line stays in every core's cache
/// (beside the queue's other fields, it would share a line written at every submit).
#[repr(align(128))]
pub(super) struct Backlogged(AtomicBool);

impl Backlogged {
    pub(super) fn new(on: bool) -> Self {
        Self(AtomicBool::new(on))
    }

    pub(super) fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets it to `on` (under the lanes' lock), writing the line only if that changes it.
    pub(super) fn set(&self, on: bool) {
        if self.is_set() != on {
            self.0.store(on, Ordering::Relaxed);
        }
    }
}

/// How many new tasks a worker takes at once when `waiting` wait and `workers` share them: a
/// fraction of its share, so that every worker finds some; 1 while few wait.
pub(super) fn take_size(waiting: usize, workers: usize) -> usize {
    (waiting / (4 * workers.max(1))).clamp(1, HAND)
}
