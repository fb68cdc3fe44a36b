//! The queue: everything waiting for a worker, and the gate in front of it.
//!
//! Three places hold waiting tasks, all owned here, behind one lock: the backlog (tasks
//! replayed from the journal, retries and scheduled tasks that came due, claimed tasks,
//! follow-ups past a full queue), which workers drain first; the new tasks, one lane per
//! priority level, each in the order its tasks were sent, bounded together by the capacity
//! (the backpressure); and, apart, the tasks waiting for their time (retries, and tasks
//! submitted for later). The gate closes once, at the first shutdown trigger: from then on no
//! task is started, and the shutdown collects every waiting task to spill it.
//!
//! Priorities: a worker takes the new task at the head of the highest non-empty lane, except
//! that while more than one lane holds tasks, every [`AGING`](lanes::AGING)th take is the
//! oldest head of any lane (the smallest id). So no task starves: every [`AGING`](lanes::AGING)
//! takes include the oldest new task, and only tasks accepted before it can be older, so a task
//! waits at most `AGING × (k + 1)` takes of new tasks, `k` the new tasks accepted before it and
//! still waiting (at most the capacity). With one level in use the lanes are one FIFO.
//!
//! New tasks wait in a compact form ([`Queued`]), their payload decoded while fewer than
//! [`HOT`] of them are (enough to keep the workers busy); beyond that, a task is held as its
//! payload's encoding (the bytes a spill writes anyway, about half the memory) and decoded by
//! the worker's host when a worker takes it. A pool whose workers keep up never encodes.
//!
//! Waiting costs a registration only when there is nothing to do: a worker that finds no job
//! registers as idle (under the lock) and a submitter that finds no room as wanting room; the
//! side that makes a job or room claims one of them and wakes it. Closing the gate wakes them
//! all. Where new tasks come in bursts (write-ahead intake), a worker that finds no job yields
//! once and looks again before it registers ([`Queue::lingering`]). Room is made in batches: a
//! take wakes a submitter only once an eighth of the capacity (at most 64 slots) is free, and a
//! woken submitter that leaves room passes the turn to the next; a full queue under busy
//! workers would otherwise wake its submitter (a thread, often, taken off a core a worker runs
//! on) once per task. So that a slot freed below the batch is never stranded (the workers busy
//! with long tasks, none taking another), such a take marks the room owed and tells the upkeep
//! task, which wakes as many waiting submitters as there are free slots [`ROOM_OWED_FOR`] later
//! if no claim did meanwhile: one timer for the pool, however many submitters wait.
//!
//! From a long queue a worker takes several new tasks at once into its hand (see `hand.rs`),
//! so that the lock is not taken by every worker at every task.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

use super::job::{Fresh, Head, Job, Queued};
use super::lock::lock;
use super::waiting::Waiting;
use hand::{Backlogged, Hand, take_size};
use lanes::{Lanes, Room, Took};
pub(crate) use slot::{Gate, NoRoom, Slot, Unsent};

/// How many new tasks are held decoded at most; the others are held encoded.
pub(crate) const HOT: usize = 1024;

/// A submitter waiting for room is woken once this share of the capacity is free (1/8)…
const ROOM_BATCH_SHARE: usize = 8;

/// …or this many slots, whichever is fewer (at least one).
const MAX_ROOM_BATCH: usize = 64;

/// How long room freed below the batch waits for one before the upkeep task hands it to the
/// submitters waiting.
pub(crate) const ROOM_OWED_FOR: Duration = Duration::from_millis(1);

pub(crate) struct Queue<T> {
    lanes: Mutex<Lanes<T>>,
    /// How many new tasks may wait (slots reserved for tasks not sent yet included).
    capacity: usize,
    /// How many slots must be free before a take wakes a submitter waiting for room.
    room_batch: usize,
    /// Woken for a worker that registered as idle, when a job is queued.
    ready: Notify,
    /// Woken for a submitter that registered as wanting room, when a new task is taken.
    room: Notify,
    /// Woken when a slot is used or given up after the shutdown took the queue.
    settled: Notify,
    /// Tasks waiting for their time (retries, tasks for later), by when they are due.
    waiting: Mutex<Waiting<T>>,
    /// Woken when a retry is added.
    waiting_changed: Notify,
    /// The gate: shared, so that a trigger that must not keep the pool alive (a signal
    /// listener) can close it too.
    gate: Arc<Gate>,
    /// One hand per worker: the new tasks it took at once (see `hand.rs`).
    hands: Box<[Hand<T>]>,
    /// Whether the backlog holds jobs, set under the lock: a worker reads it without the lock
    /// to take the backlog before its hand (the backlog goes first).
    backlogged: Backlogged,
    /// Whether a worker that finds no job yields once and looks again before it waits (see
    /// [`lingering`](Self::lingering)).
    linger: bool,
}

impl<T> Queue<T> {
    /// A queue for `workers` holding `backlog` (replayed tasks, in order) and `waiting`
    /// retries.
    pub(crate) fn new(
        capacity: usize,
        workers: usize,
        backlog: VecDeque<Job<T>>,
        waiting: Vec<(Instant, Job<T>)>,
    ) -> Self {
        Self {
            backlogged: Backlogged::new(!backlog.is_empty()),
            lanes: Mutex::new(Lanes::new(backlog)),
            capacity,
            room_batch: (capacity / ROOM_BATCH_SHARE).clamp(1, MAX_ROOM_BATCH),
            ready: Notify::new(),
            room: Notify::new(),
            settled: Notify::new(),
            waiting: Mutex::new(Waiting::new(waiting)),
            waiting_changed: Notify::new(),
            gate: Arc::new(Gate::default()),
            hands: (0..workers.max(1)).map(|_| Hand::new()).collect(),
            linger: false,
        }
    }

    /// The queue of a pool whose new tasks come in bursts (`on`): write-ahead intake accepts
    /// the tasks of a batch when its fsync (or commit) returns, each as its submitter runs
    /// again. A worker that finds the queue empty then yields once, so that the submitters
    /// ready on its thread queue their tasks, and looks again before it registers as idle:
    /// without it, the workers went idle and were woken for every few tasks of a burst (write-
    /// ahead end to end, 256 submitters: 12 % more tasks a second, 0.75 µs less CPU a task).
    pub(crate) fn lingering(mut self, on: bool) -> Self {
        self.linger = on;
        self
    }

    /// Whether the gate has closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.gate.is_closed()
    }

    /// The gate, for a trigger that closes it from outside the pool.
    pub(crate) fn gate(&self) -> Arc<Gate> {
        Arc::clone(&self.gate)
    }

    /// Queues a job ahead of the new tasks, whatever the capacity: a task claimed from the
    /// shared store (claimed only when there is room).
    pub(crate) fn push_backlog(&self, job: Job<T>) {
        let mut lanes = lock(&self.lanes);
        lanes.backlog.push_back(job);
        self.backlogged.set(true);
        let wake = lanes.claim_idle();
        drop(lanes);
        if wake {
            self.ready.notify_one();
        }
    }

    /// Queues a follow-up of a running handler ahead of the new tasks, whatever the capacity
    /// (a handler waiting for room in its own full pool could wait for itself); hands it back
    /// if the shutdown has taken the queue already, to be held for the final spill.
    #[allow(
        clippy::result_large_err,
        reason = "the job comes back once, at shutdown; boxing it would cost every follow-up \
                  an allocation (over the lint's size only with the metrics feature's timestamp)"
    )]
    pub(crate) fn push_follow_up(&self, job: Job<T>) -> Result<(), Job<T>> {
        let mut lanes = lock(&self.lanes);
        if lanes.taken {
            return Err(job);
        }
        lanes.backlog.push_back(job);
        self.backlogged.set(true);
        let wake = lanes.claim_idle();
        drop(lanes);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Closes the gate: no task starts from now on. Wakes the idle workers and the submitters
    /// waiting for room (a gate closed from outside wakes them here too: the drain calls this).
    /// Returns false if the gate was closed already.
    pub(crate) fn close(&self) -> bool {
        let first = self.gate.close();
        // Waiters check the gate and register under the lock: each one either saw it closed
        // or is registered by now.
        drop(lock(&self.lanes));
        self.ready.notify_waiters();
        self.room.notify_waiters();
        first
    }

    /// A slot for a task submitted for later: it takes no room among the new tasks (it waits
    /// for its time with the retries), so it is given whatever the capacity, unless the
    /// shutdown took the queue.
    pub(crate) fn reserve_scheduled(&self) -> Result<Slot<'_, T>, NoRoom> {
        let mut lanes = lock(&self.lanes);
        if lanes.taken {
            return Err(NoRoom::Closed);
        }
        lanes.reserved += 1;
        Ok(Slot { queue: self })
    }

    /// A slot if there is room now.
    pub(crate) fn try_reserve(&self) -> Result<Slot<'_, T>, NoRoom> {
        let mut lanes = lock(&self.lanes);
        self.reserve_in(&mut lanes)
    }

    fn reserve_in(&self, lanes: &mut Lanes<T>) -> Result<Slot<'_, T>, NoRoom> {
        if lanes.taken {
            return Err(NoRoom::Closed);
        }
        if lanes.used() >= self.capacity {
            return Err(NoRoom::Full);
        }
        lanes.reserved += 1;
        Ok(Slot { queue: self })
    }

    /// Queues a new task if there is room now, in one lock (a slot takes two: one to reserve,
    /// one to send): a submit's fast path.
    pub(crate) fn try_send(&self, head: Head, value: T) -> Result<(), Unsent<'_, T>> {
        let mut lanes = lock(&self.lanes);
        // Under the lock, as `find` reads it: the shutdown closes the gate before it takes the
        // queue.
        if self.is_closed() || lanes.taken {
            return Err(Unsent::Refused(NoRoom::Closed, head, value));
        }
        if lanes.used() >= self.capacity {
            return Err(Unsent::Refused(NoRoom::Full, head, value));
        }
        lanes.reserved += 1;
        if lanes.decoded >= HOT {
            drop(lanes);
            return Err(Unsent::Cold(Slot { queue: self }, head, value));
        }
        let task = Queued {
            head,
            payload: Fresh::Value(value),
        };
        self.sent(lanes, task);
        Ok(())
    }

    /// A slot, waiting for room; `Closed` if the gate closes first.
    pub(crate) async fn reserve(&self) -> Result<Slot<'_, T>, NoRoom> {
        // A unit of the task's coop budget, as a tokio channel takes: a producer that always
        // finds room still yields now and then, so the tasks it woke on its thread run.
        tokio::task::consume_budget().await;
        // Room at once, without a registration.
        match self.try_reserve() {
            Err(NoRoom::Full) => {}
            other => return other,
        }
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            {
                let mut lanes = lock(&self.lanes);
                match self.reserve_in(&mut lanes) {
                    Err(NoRoom::Full) if self.is_closed() => return Err(NoRoom::Closed),
                    Err(NoRoom::Full) => {
                        // Registered in the same order as counted: each claim wakes the
                        // submitter that has waited longest.
                        room.as_mut().enable();
                        lanes.wanting_room += 1;
                    }
                    Ok(slot) => {
                        // Woken with room to spare: the next waiting submitter's turn.
                        let pass = lanes.used() < self.capacity && lanes.claim_wanting_room();
                        drop(lanes);
                        if pass {
                            self.room.notify_one();
                        }
                        return Ok(slot);
                    }
                    other => return other,
                }
            }
            room.await;
        }
    }

    /// Queues a slot's task, and wakes an idle worker for it.
    fn sent(&self, mut lanes: MutexGuard<'_, Lanes<T>>, task: Queued<T>) {
        lanes.push_fresh(task);
        lanes.reserved -= 1;
        let wake = lanes.claim_idle();
        let taken = lanes.taken;
        drop(lanes);
        if wake {
            self.ready.notify_one();
        }
        if taken {
            self.settled.notify_one();
        }
    }

    /// The next job for a worker: the backlog first, then the new tasks in order. `None` once
    /// the gate has closed: from then on waiting tasks are spilled, never started. A job held
    /// encoded comes out so (`Payload::Encoded`): the caller decodes it.
    /// `worker` is the worker's number (its hand); `idle` runs once, before the worker waits
    /// for the first time.
    pub(crate) async fn next_job(&self, worker: usize, idle: impl FnOnce()) -> Option<Job<T>> {
        // As in `reserve`: a worker that always finds a job yields now and then.
        tokio::task::consume_budget().await;
        // A busy pool finds a job at once, without a registration.
        if let Some(found) = self.find(worker, None) {
            return found;
        }
        if self.linger {
            // The tasks ready on this thread run first (the submitters a batch released, as
            // often as not), then it looks again: a burst is taken as it comes, not a wait
            // and a wake-up per task.
            tokio::task::yield_now().await;
            if let Some(found) = self.find(worker, None) {
                return found;
            }
        }
        idle();
        loop {
            let ready = self.ready.notified();
            tokio::pin!(ready);
            if let Some(found) = self.find(worker, Some(ready.as_mut())) {
                return found;
            }
            ready.await;
        }
    }

    /// Takes the next job (from the worker's hand first), or `Some(None)` once the gate has
    /// closed; `None` if there is no job, after registering `ready` (if given) and counting the
    /// worker as idle.
    fn find(&self, worker: usize, ready: Option<Pin<&mut Notified<'_>>>) -> Option<Option<Job<T>>> {
        let hand = &self.hands[worker % self.hands.len()];
        // The backlog goes first, so the hand only while the backlog is empty (read without
        // the lock here, and checked again under it below).
        if !self.backlogged.is_set() {
            match hand.take(|| self.is_closed()) {
                Ok(Some(task)) => return Some(Some(task.into_job())),
                Err(()) => return Some(None),
                Ok(None) => {}
            }
        }
        let mut lanes = lock(&self.lanes);
        // Under the lock: the shutdown closes the gate before it takes the queue.
        if self.is_closed() {
            return Some(None);
        }
        if lanes.backlog.is_empty()
            && let Ok(Some(task)) = hand.take(|| false)
        {
            // The backlog emptied since the read above: the hand's tasks were taken before
            // the lanes' and go first.
            drop(lanes);
            return Some(Some(task.into_job()));
        }
        let take = take_size(lanes.fresh_len, self.hands.len());
        if let Some((took, room)) = lanes.pop(self.capacity, self.room_batch, take, hand) {
            if matches!(took, Took::Job(_)) && lanes.backlog.is_empty() {
                self.backlogged.set(false);
            }
            drop(lanes);
            match room {
                Room::Wake => self.room.notify_one(),
                // The upkeep task pays it if no batch frees first.
                Room::Owed => self.waiting_changed.notify_one(),
                Room::Kept => {}
            }
            return Some(Some(took.into_job()));
        }
        // The queue is empty: a task another worker holds in its hand, before waiting (under
        // the lanes' lock, so a hand fills only after this worker is counted idle, and the
        // queue's next task wakes it).
        for other in &*self.hands {
            if let Ok(Some(task)) = other.take(|| false) {
                drop(lanes);
                return Some(Some(task.into_job()));
            }
        }
        if let Some(ready) = ready {
            // Registered in the same order as counted, under the lock: each claim wakes the
            // worker that has waited longest, and the gate's closing wakes them all.
            ready.enable();
            lanes.idle += 1;
        }
        None
    }

    /// Every task waiting for a worker, in id order (those held encoded still encoded); the
    /// gate must be closed. From now on no slot is reserved; waits for the slots reserved
    /// before to be used or given up.
    pub(crate) async fn take_queued(&self) -> Vec<Job<T>> {
        let mut queued = Vec::new();
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            {
                let mut lanes = lock(&self.lanes);
                lanes.taken = true;
                let lanes = &mut *lanes;
                queued.extend(lanes.backlog.drain(..));
                self.backlogged.set(false);
                for lane in &mut lanes.fresh {
                    queued.extend(lane.drain().map(Queued::into_job));
                }
                for hand in &*self.hands {
                    queued.extend(hand.drain().into_iter().map(Queued::into_job));
                }
                lanes.decoded = 0;
                lanes.fresh_len = 0;
                lanes.filled = 0;
                if lanes.reserved == 0 {
                    break;
                }
            }
            settled.await;
        }
        queued.sort_unstable_by_key(|job| job.id);
        queued
    }

    /// The retries still waiting for their time (they keep it: see `Job::state`).
    pub(crate) fn take_waiting(&self) -> Vec<Job<T>> {
        lock(&self.waiting).take_all()
    }

    /// How many tasks wait: in the backlog, new ones (slots reserved included), and for their
    /// retry.
    pub(crate) fn len(&self) -> usize {
        let queued = {
            let lanes = lock(&self.lanes);
            let handed: usize = self.hands.iter().map(Hand::len).sum();
            lanes.backlog.len() + lanes.used() + handed
        };
        queued + lock(&self.waiting).len()
    }
}

mod due;
mod hand;
mod lane;
mod lanes;
mod slot;
#[cfg(test)]
mod tests;
