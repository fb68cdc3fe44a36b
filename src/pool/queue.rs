//! The queue: everything waiting for a worker, and the gate in front of it.
//!
//! Three places hold waiting tasks, all owned here: the bounded channel new tasks arrive on
//! (its capacity is the backpressure), the backlog (tasks replayed from the journal, and
//! retries that came due), which workers drain first, and the retries still waiting for their
//! time. The gate closes once, at the first shutdown trigger: from then on no task is started,
//! and the shutdown collects every waiting task to spill it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::job::Job;
use super::lock::lock;

pub(crate) struct Queue<T> {
    tx: mpsc::Sender<Job<T>>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Job<T>>>,
    backlog: Mutex<VecDeque<Job<T>>>,
    backlog_len: AtomicUsize,
    /// Woken when a job is added to the backlog.
    backlog_ready: Notify,
    /// Failed tasks waiting for their retry, with the instant they are due.
    waiting: Mutex<Vec<(Instant, Job<T>)>>,
    /// Woken when a retry is added.
    waiting_changed: Notify,
    /// The gate: shared, so that a trigger that must not keep the pool alive (a signal
    /// listener) can close it too.
    gate: Arc<Gate>,
}

/// The intake gate: closed once, at the first shutdown trigger.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    /// Set just before `token` is cancelled: an atomic load for the hot paths.
    closed: AtomicBool,
    token: CancellationToken,
}

impl Gate {
    /// Closes the gate. Returns false if it was closed already.
    pub(crate) fn close(&self) -> bool {
        let first = !self.closed.swap(true, Ordering::AcqRel);
        self.token.cancel();
        first
    }
}

/// Why no slot could be reserved.
pub(crate) enum NoRoom {
    Full,
    Closed,
}

impl<T> Queue<T> {
    /// A queue holding `backlog` (replayed tasks, in order) and `waiting` retries.
    pub(crate) fn new(
        capacity: usize,
        backlog: VecDeque<Job<T>>,
        waiting: Vec<(Instant, Job<T>)>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(capacity);
        Self {
            tx,
            rx: tokio::sync::Mutex::new(rx),
            backlog_len: AtomicUsize::new(backlog.len()),
            backlog: Mutex::new(backlog),
            backlog_ready: Notify::new(),
            waiting: Mutex::new(waiting),
            waiting_changed: Notify::new(),
            gate: Arc::new(Gate::default()),
        }
    }

    /// Whether the gate has closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.gate.closed.load(Ordering::Acquire)
    }

    /// The gate, for a trigger that closes it from outside the pool.
    pub(crate) fn gate(&self) -> Arc<Gate> {
        Arc::clone(&self.gate)
    }

    /// Queues a job ahead of the channel, whatever its capacity: a follow-up of a running
    /// handler (a handler waiting for room in its own full pool could wait for itself), or a
    /// task claimed from the shared store (claimed only when there is room).
    pub(crate) fn push_backlog(&self, job: Job<T>) {
        lock(&self.backlog).push_back(job);
        self.backlog_len.fetch_add(1, Ordering::AcqRel);
        self.backlog_ready.notify_one();
    }

    /// Closes the gate: no task starts from now on. Returns false if it was closed already.
    pub(crate) fn close(&self) -> bool {
        self.gate.close()
    }

    /// Resolves once the gate has closed.
    pub(crate) async fn closed(&self) {
        self.gate.token.cancelled().await;
    }

    /// A slot in the channel if there is room now.
    pub(crate) fn try_reserve(&self) -> Result<mpsc::Permit<'_, Job<T>>, NoRoom> {
        match self.tx.try_reserve() {
            Ok(permit) => Ok(permit),
            Err(mpsc::error::TrySendError::Full(())) => Err(NoRoom::Full),
            Err(mpsc::error::TrySendError::Closed(())) => Err(NoRoom::Closed),
        }
    }

    /// A slot in the channel, waiting for room; `Closed` if the gate closes first.
    pub(crate) async fn reserve(&self) -> Result<mpsc::Permit<'_, Job<T>>, NoRoom> {
        match self.try_reserve() {
            Err(NoRoom::Full) => tokio::select! {
                biased;
                permit = self.tx.reserve() => permit.map_err(|_| NoRoom::Closed),
                () = self.closed() => Err(NoRoom::Closed),
            },
            other => other,
        }
    }

    /// The next job for a worker: the backlog first, then the channel. `None` once the gate
    /// has closed: from then on waiting tasks are spilled, never started.
    ///
    /// The channel is polled before the gate's token, so a busy pool never registers with the
    /// token (whose every poll takes a lock); a job received after the gate closed is handed
    /// back to the backlog, which the shutdown collects after the receiver.
    pub(crate) async fn next_job(&self) -> Option<Job<T>> {
        loop {
            if self.is_closed() {
                return None;
            }
            if let Some(job) = self.pop_backlog() {
                return Some(job);
            }
            // Fast path: the receiver is free and a job is waiting.
            if let Ok(mut rx) = self.rx.try_lock()
                && let Ok(job) = rx.try_recv()
            {
                return self.started_or_returned(job);
            }
            let mut rx = tokio::select! {
                biased;
                rx = self.rx.lock() => rx,
                () = self.closed() => return None,
            };
            // A retry may have come due while this worker waited for the receiver.
            if let Some(job) = self.pop_backlog() {
                return Some(job);
            }
            let job = tokio::select! {
                biased;
                job = rx.recv() => job?,
                () = self.backlog_ready.notified() => continue,
                () = self.closed() => return None,
            };
            return self.started_or_returned(job);
        }
    }

    /// A job just received, unless the gate closed meanwhile: then it is too late to start it,
    /// and it goes back to the backlog (the caller still holds the receiver, so the shutdown,
    /// which takes the receiver before the backlog, finds it).
    fn started_or_returned(&self, job: Job<T>) -> Option<Job<T>> {
        if self.is_closed() {
            lock(&self.backlog).push_front(job);
            self.backlog_len.fetch_add(1, Ordering::AcqRel);
            return None;
        }
        Some(job)
    }

    fn pop_backlog(&self) -> Option<Job<T>> {
        if self.backlog_len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let job = lock(&self.backlog).pop_front()?;
        self.backlog_len.fetch_sub(1, Ordering::AcqRel);
        Some(job)
    }

    /// Puts a failed task back after its backoff delay.
    pub(crate) fn retry_later(&self, job: Job<T>, delay: Duration) {
        lock(&self.waiting).push((Instant::now() + delay, job));
        self.waiting_changed.notify_one();
    }

    /// Resolves when a retry is added (for the upkeep task that releases them).
    pub(crate) async fn retry_added(&self) {
        self.waiting_changed.notified().await;
    }

    /// Moves the retries that are due to the backlog; returns when the next one is due.
    pub(crate) fn release_due(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut waiting = lock(&self.waiting);
        let mut due = Vec::new();
        let mut i = 0;
        while i < waiting.len() {
            if waiting[i].0 <= now {
                due.push(waiting.swap_remove(i));
            } else {
                i += 1;
            }
        }
        let next = waiting.iter().map(|(at, _)| *at).min();
        drop(waiting);
        if !due.is_empty() {
            due.sort_by_key(|(_, job)| job.id);
            let count = due.len();
            #[cfg(feature = "metrics")]
            for (_, job) in &mut due {
                job.queued_at = now;
            }
            lock(&self.backlog).extend(due.into_iter().map(|(_, job)| job));
            self.backlog_len.fetch_add(count, Ordering::AcqRel);
            for _ in 0..count {
                self.backlog_ready.notify_one();
            }
        }
        next
    }

    /// Every task waiting for a worker, in id order; the gate must be closed. The receiver
    /// first: once it is held, no worker can take a job, and one that received a job after the
    /// gate closed has put it back in the backlog. Waits for slots reserved before the gate
    /// closed to be used or given up.
    pub(crate) async fn take_queued(&self) -> Vec<Job<T>> {
        let mut queued = Vec::new();
        {
            let mut rx = self.rx.lock().await;
            rx.close();
            while let Some(job) = rx.recv().await {
                queued.push(job);
            }
        }
        queued.extend(lock(&self.backlog).drain(..));
        self.backlog_len.store(0, Ordering::Release);
        queued.sort_unstable_by_key(|job| job.id);
        queued
    }

    /// The retries still waiting for their time (they keep it: see `Job::state`).
    pub(crate) fn take_waiting(&self) -> Vec<Job<T>> {
        std::mem::take(&mut *lock(&self.waiting))
            .into_iter()
            .map(|(_, job)| job)
            .collect()
    }

    /// How many tasks wait: in the backlog, in the channel, and for their retry.
    pub(crate) fn len(&self) -> usize {
        self.backlog_len.load(Ordering::Relaxed)
            + (self.tx.max_capacity() - self.tx.capacity())
            + lock(&self.waiting).len()
    }
}
