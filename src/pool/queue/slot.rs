//! The intake gate, and the slots and refusals of new tasks on their way into the queue.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::{HOT, Head, Queue};
use crate::pool::job::{Job, Queued};
use crate::pool::lock::lock;
use crate::pool::waiting::due_after;

/// The intake gate: closed once, at the first shutdown trigger.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    closed: AtomicBool,
}

impl Gate {
    /// Closes the gate. Returns false if it was closed already.
    pub(crate) fn close(&self) -> bool {
        !self.closed.swap(true, Ordering::AcqRel)
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Why no slot could be reserved.
pub(crate) enum NoRoom {
    Full,
    Closed,
}

/// Why a new task sent without a slot ([`Queue::try_send`]) was not queued.
pub(crate) enum Unsent<'a, T> {
    /// No room now, or the shutdown is taking the queue: the task back as it came.
    Refused(NoRoom, Head, T),
    /// Past the hot window: a slot reserved for it, to be sent encoded
    /// ([`Slot::send_encoded`]).
    Cold(Slot<'a, T>, Head, T),
}

/// A slot reserved for a new task: [`send`](Self::send) queues the task; dropping it gives
/// the room back.
#[must_use = "a slot holds room in the queue until it is used or dropped"]
pub(crate) struct Slot<'a, T> {
    pub(super) queue: &'a Queue<T>,
}

impl<T> Slot<'_, T> {
    /// Queues a new task if fewer than [`HOT`] are held decoded (or its payload is encoded);
    /// otherwise hands it back with the slot, to be sent with its payload encoded
    /// ([`send_encoded`](Self::send_encoded)).
    pub(crate) fn send(self, task: Queued<T>) -> Result<(), (Self, Queued<T>)> {
        let lanes = lock(&self.queue.lanes);
        if task.is_decoded() && lanes.decoded >= HOT {
            drop(lanes);
            return Err((self, task));
        }
        self.queue.sent(lanes, task);
        std::mem::forget(self);
        Ok(())
    }

    /// Queues a new task handed back by [`send`](Self::send), its payload encoded now (or, if
    /// it would not encode, as it was: beyond the window, but in its place).
    pub(crate) fn send_encoded(self, task: Queued<T>) {
        let lanes = lock(&self.queue.lanes);
        self.queue.sent(lanes, task);
        std::mem::forget(self);
    }

    /// Puts a task submitted for later with the tasks waiting for their time, `delay` from
    /// now; the slot (taken with [`Queue::reserve_scheduled`]) is used up.
    pub(crate) fn schedule(self, job: Job<T>, delay: Duration) {
        let queue = self.queue;
        let mut lanes = lock(&queue.lanes);
        lock(&queue.waiting).push(due_after(Instant::now(), delay), job);
        lanes.reserved -= 1;
        let taken = lanes.taken;
        drop(lanes);
        std::mem::forget(self);
        queue.waiting_changed.notify_one();
        if taken {
            queue.settled.notify_one();
        }
    }
}

impl<T> Drop for Slot<'_, T> {
    fn drop(&mut self) {
        let mut lanes = lock(&self.queue.lanes);
        lanes.reserved -= 1;
        let wake = lanes.claim_wanting_room();
        let taken = lanes.taken;
        drop(lanes);
        if wake {
            self.queue.room.notify_one();
        }
        if taken {
            self.queue.settled.notify_one();
        }
    }
}
