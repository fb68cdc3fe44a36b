//! The pool: intake, the queue, the workers, and the shutdown sequence.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::BoxError;
use crate::builder::{Builder, Config};
use crate::error::{JournalError, RunError, ShutdownError, StartError, SubmitError};
use crate::journal::format;
use crate::journal::{self, Commit, Copies, Journal, Sealed, TaskRecord, TaskState};
use crate::live::LiveIndex;
use crate::policy::{Durability, Jitter, Policy, SyncPolicy};
use crate::report::{Budget, RecoveryReport, ShutdownReport, State, Stats};
use crate::task::{Task, TaskId};
use crate::worker;

/// A task waiting for, or held by, a worker.
pub(crate) struct Job<T> {
    pub(crate) id: TaskId,
    pub(crate) meta: TaskState,
    pub(crate) last_error: Option<Box<str>>,
    pub(crate) payload: Arc<T>,
    /// Whether a record of this task is in the journal (so finishing it must append an ack).
    pub(crate) journaled: bool,
    /// Whether it was replayed from an earlier run (whose segments wait for it).
    pub(crate) replayed: bool,
}

/// Why a task is held back for the final spill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    /// Still running at the hard stop (or gave up after its token fired).
    Interrupted,
    /// Failed, and its dead letter could not be written: it stays a live task.
    Retained,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) submitted: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) spilled: AtomicU64,
    pub(crate) interrupted: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) unsaved: AtomicU64,
    pub(crate) compacted: AtomicU64,
    pub(crate) in_flight: AtomicUsize,
}

/// State shared by the handles, the workers and the shutdown sequence.
pub(crate) struct Inner<T> {
    pub(crate) config: Config,
    journal_dir: PathBuf,
    tx: mpsc::Sender<Job<T>>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Job<T>>>,
    backlog: Mutex<VecDeque<Job<T>>>,
    backlog_len: AtomicUsize,
    pub(crate) journal: Arc<tokio::sync::Mutex<Option<Journal>>>,
    pub(crate) epoch: u64,
    run: u64,
    next_seq: AtomicU64,
    /// Cancelled when intake closes: at the first shutdown trigger.
    pub(crate) intake: CancellationToken,
    /// Set just before `intake` is cancelled.
    intake_closed: std::sync::atomic::AtomicBool,
    /// The handlers' token: cancelled at the drain deadline. Shared with each task by `Arc`.
    pub(crate) deadline: Arc<CancellationToken>,
    /// Cancelled at the hard stop: handlers still running are dropped.
    pub(crate) hard_stop: CancellationToken,
    /// Cancelled to skip the wait for in-flight tasks.
    hurry: CancellationToken,
    /// Woken when a job is added to the backlog.
    backlog_ready: Notify,
    /// Failed tasks waiting for their retry, with the instant they are due.
    waiting: Mutex<Vec<(Instant, Job<T>)>>,
    /// Woken when a retry is added.
    waiting_changed: Notify,
    pub(crate) policy: Policy<T>,
    pub(crate) jitter: Jitter,
    /// The write-ahead group commit (`None` in `OnShutdown` mode).
    commit: Option<Commit>,
    /// Write-ahead: where each unfinished task's latest record is, so that sealed segments go
    /// once nothing live is left in them, and sparse ones are compacted.
    live: Mutex<LiveIndex>,
    /// Write-ahead: set while a compaction runs.
    compacting: std::sync::atomic::AtomicBool,
    /// Write-ahead: the newest segment compacted so far; a compaction needs a newer one.
    compacted_through: AtomicU64,
    /// The shutdown trigger (the user's token, if one was given).
    trigger: CancellationToken,
    tracker: TaskTracker,
    pub(crate) held: Mutex<Vec<(Held, Job<T>)>>,
    /// Ids of the tasks journaled as interrupted, for the report.
    interrupted_ids: Mutex<Vec<TaskId>>,
    pub(crate) replay_outstanding: AtomicUsize,
    pub(crate) counters: Counters,
    state: watch::Sender<State>,
    report: watch::Sender<Option<ShutdownReport>>,
    journal_error: Mutex<Option<Arc<JournalError>>>,
    recovery: RecoveryReport,
    /// The journal's write speed and fsync latency, measured at start when a grace period is
    /// set.
    probe: Option<(u64, Duration)>,
    /// Serialized payload bytes of the tasks accepted, for the spill estimate.
    submitted_bytes: AtomicU64,
    /// Time spent writing and syncing spills.
    spill_times: Mutex<(Duration, Duration)>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while these locks are held; if something did, the data is still whole.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl<T> Inner<T> {
    /// The next job for a worker: replayed tasks first, then the queue. `None` once intake has
    /// closed: from then on queued tasks are spilled, never started.
    ///
    /// The queue is polled before the intake token, so a busy pool never registers with the
    /// token (whose every poll takes a lock); a job received after intake closed is handed
    /// back to the backlog, which the shutdown collects after the receiver.
    pub(crate) async fn next_job(&self) -> Option<Job<T>> {
        loop {
            if self.intake_closed() {
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
                () = self.intake.cancelled() => return None,
            };
            // A retry may have come due while this worker waited for the receiver.
            if let Some(job) = self.pop_backlog() {
                return Some(job);
            }
            let job = tokio::select! {
                biased;
                job = rx.recv() => job?,
                () = self.backlog_ready.notified() => continue,
                () = self.intake.cancelled() => return None,
            };
            return self.started_or_returned(job);
        }
    }

    /// A job just received, unless intake closed meanwhile: then it is too late to start it,
    /// and it goes back to the backlog (the caller still holds the receiver, so the shutdown,
    /// which takes the receiver before the backlog, finds it).
    fn started_or_returned(&self, job: Job<T>) -> Option<Job<T>> {
        if self.intake_closed() {
            lock(&self.backlog).push_front(job);
            self.backlog_len.fetch_add(1, Ordering::AcqRel);
            return None;
        }
        Some(job)
    }

    /// Whether intake has closed: an atomic load, for the hot paths.
    pub(crate) fn intake_closed(&self) -> bool {
        self.intake_closed.load(Ordering::Acquire)
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

    /// Moves the retries that are due to the backlog; returns when the next one is due.
    fn release_due(&self) -> Option<Instant> {
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
            lock(&self.backlog).extend(due.into_iter().map(|(_, job)| job));
            self.backlog_len.fetch_add(count, Ordering::AcqRel);
            for _ in 0..count {
                self.backlog_ready.notify_one();
            }
        }
        next
    }

    /// Remembers the first journal failure for the report.
    pub(crate) fn record_journal_error(&self, error: JournalError) {
        self.record_journal_arc(Arc::new(error));
    }

    pub(crate) fn record_journal_arc(&self, error: Arc<JournalError>) {
        tracing::error!(%error, "journal failure");
        let mut slot = lock(&self.journal_error);
        if slot.is_none() {
            *slot = Some(error);
        }
    }

    pub(crate) fn hold(&self, why: Held, job: Job<T>) {
        lock(&self.held).push((why, job));
    }
}

impl<T: Serialize + Send + Sync + 'static> Inner<T> {
    /// Appends an ack for a journaled task that is finished (completed, dead-lettered or
    /// dropped); retires the old segments after the last replayed one.
    pub(crate) async fn finish_journaled(self: &Arc<Self>, job: &Job<T>) {
        let id = job.id;
        if let Some(commit) = &self.commit {
            // Write-ahead: the ack rides with the next batch, unsynced. It leaves the index and
            // enters the buffer under one lock, so that a compaction copy of the task is either
            // not made or ordered before the ack.
            let (emptied, start) = {
                let mut live = lock(&self.live);
                let emptied = live.finish(id);
                let (_, start) = commit.push_ack(id);
                (emptied, start)
            };
            if start {
                tokio::spawn(flush(Arc::clone(self)));
            }
            if emptied {
                spawn_delete_empty_segments(Arc::clone(self));
            }
        } else {
            let mut journal = self.journal.lock().await;
            if let Some(journal) = journal.as_mut()
                && let Err(error) = journal.append_ack(id)
            {
                // A lost ack only means a repeat; the task itself is finished.
                tracing::warn!(%error, task = %id, "could not append ack");
            }
        }
        // Write-ahead retires earlier runs' segments like its own, by what they still hold.
        if job.replayed
            && self.replay_outstanding.fetch_sub(1, Ordering::AcqRel) == 1
            && self.commit.is_none()
        {
            self.retire_replayed().await;
        }
    }

    /// Write-ahead: journals a failed task's new state (its attempt count, its retry time and
    /// its error) as it waits for the retry. Not synced: if it is lost, the task runs with its
    /// earlier state, an extra attempt at most.
    pub(crate) fn journal_retry(self: &Arc<Self>, job: &Job<T>) {
        let Some(commit) = &self.commit else { return };
        if !job.journaled {
            return;
        }
        let Ok(payload) = serde_json::to_vec(&*job.payload) else {
            // Submit checked it serializes; if it no longer does, the journal keeps the
            // earlier state.
            return;
        };
        let start = {
            let mut live = lock(&self.live);
            // Once intake closed, the final spill journals the task in its latest state.
            if self.intake_closed() || !live.begin_move(job.id) {
                return;
            }
            commit.push_task(&job.record(&payload), true).1
        };
        if start {
            tokio::spawn(flush(Arc::clone(self)));
        }
    }

    async fn retire_replayed(&self) {
        let result = with_journal(&self.journal, move |guard| {
            guard.as_mut().map_or(Ok(()), Journal::retire_obsolete)
        })
        .await;
        match result {
            Ok(Ok(())) => tracing::info!("replay finished; old segments retired"),
            Ok(Err(error)) => self.record_journal_error(error),
            Err(error) => tracing::error!(%error, "retiring old segments panicked"),
        }
    }

    /// Writes a dead letter, durably. On failure the task is held for the final spill instead.
    pub(crate) async fn dead_letter(self: &Arc<Self>, job: Job<T>, error: String) {
        let encoded = serde_json::to_vec(&*job.payload);
        let result = match encoded {
            Err(e) => Err(e.to_string()),
            Ok(payload) => {
                let (id, state, reason) = (job.id, job.meta, error.clone());
                let written = with_journal(&self.journal, move |guard| {
                    let record = TaskRecord {
                        id,
                        state,
                        last_error: reason.into(),
                        payload: &payload,
                    };
                    guard
                        .as_mut()
                        .map_or(Err(JournalError::Poisoned), |j| j.write_dead(&record))
                })
                .await;
                match written {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => {
                        let text = e.to_string();
                        self.record_journal_error(e);
                        Err(text)
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        match result {
            Ok(()) => {
                tracing::warn!(task = %job.id, attempts = job.meta.attempts, %error, "task failed; kept as a dead letter");
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                if job.journaled {
                    self.finish_journaled(&job).await;
                }
            }
            Err(why) => {
                tracing::error!(task = %job.id, %why, "could not write dead letter; task kept for the spill");
                let mut job = job;
                job.last_error = Some(error.into());
                self.hold(Held::Retained, job);
            }
        }
    }
}

/// A pool of workers whose unfinished tasks survive shutdown in a journal.
///
/// A cheap handle: clones share one pool. When the last handle is dropped, the pool shuts
/// down on its own (spilling what is queued), but only [`shutdown`](Self::shutdown) or
/// [`wait`](Self::wait) tells how that went.
pub struct Pool<T> {
    inner: Arc<Inner<T>>,
    /// Starts the shutdown when the last handle goes.
    _on_drop: Arc<DropGuard>,
}

impl<T> Clone for Pool<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            _on_drop: Arc::clone(&self._on_drop),
        }
    }
}

impl<T> fmt::Debug for Pool<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("journal_dir", &self.inner.journal_dir)
            .field("state", &*self.inner.state.borrow())
            .field("run", &self.inner.run)
            .finish_non_exhaustive()
    }
}

impl<T> Pool<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// A builder with the default settings.
    pub fn builder() -> Builder<T> {
        Builder::new()
    }

    /// Queues a task, waiting for room if the queue is full. Returns its id.
    ///
    /// # Errors
    ///
    /// Every error hands the task back: [`SubmitError::ShuttingDown`] once shutdown has begun
    /// (answer 503, or hold on to it), [`SubmitError::RecordTooLarge`] if its record would
    /// exceed the maximum record size, [`SubmitError::Unserializable`] if it fails to
    /// serialize.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped before it completes, the task was not queued.
    pub async fn submit(&self, payload: T) -> Result<TaskId, SubmitError<T>> {
        let inner = &*self.inner;
        if inner.intake_closed() {
            return Err(SubmitError::ShuttingDown(payload));
        }
        let (payload, size) = self.checked(payload)?;
        let permit = match inner.tx.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Closed(())) => {
                return Err(SubmitError::ShuttingDown(payload));
            }
            // Full: wait for room, or for intake to close.
            Err(mpsc::error::TrySendError::Full(())) => tokio::select! {
                biased;
                permit = inner.tx.reserve() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return Err(SubmitError::ShuttingDown(payload)),
                },
                () = inner.intake.cancelled() => return Err(SubmitError::ShuttingDown(payload)),
            },
        };
        if inner.intake_closed() {
            return Err(SubmitError::ShuttingDown(payload));
        }
        if inner.commit.is_some() {
            return self.write_ahead(permit, payload, size).await;
        }
        Ok(self.enqueue(permit, payload, size))
    }

    /// Write-ahead: journals the task (and waits for the fsync the policy asks for) before
    /// queueing it.
    async fn write_ahead(
        &self,
        permit: mpsc::Permit<'_, Job<T>>,
        payload: T,
        size: usize,
    ) -> Result<TaskId, SubmitError<T>> {
        let inner = &self.inner;
        let Some(commit) = &inner.commit else {
            return Ok(self.enqueue(permit, payload, size));
        };
        let (id, meta) = self.fresh();
        let mut bytes = Vec::with_capacity(size);
        if let Err(source) = serde_json::to_writer(&mut bytes, &payload) {
            return Err(SubmitError::Unserializable {
                task: payload,
                source,
            });
        }
        let record = TaskRecord {
            id,
            state: meta,
            last_error: "".into(),
            payload: &bytes,
        };
        let (seq, start) = commit.push_task(&record, false);
        if start {
            tokio::spawn(flush(Arc::clone(inner)));
        }
        if let Err(error) = commit.wait(seq).await {
            return Err(SubmitError::Journal {
                task: payload,
                error,
            });
        }
        Ok(self.accept(permit, id, meta, payload, size, true))
    }

    /// Queues a task if there is room now. Returns its id.
    ///
    /// # Errors
    ///
    /// As [`submit`](Self::submit), plus [`SubmitError::Full`] when the queue is full, and
    /// [`SubmitError::WouldBlock`] always in write-ahead mode, where accepting a task means
    /// waiting for the journal: use `submit` there.
    pub fn try_submit(&self, payload: T) -> Result<TaskId, SubmitError<T>> {
        let inner = &*self.inner;
        if inner.intake_closed() {
            return Err(SubmitError::ShuttingDown(payload));
        }
        let (payload, size) = self.checked(payload)?;
        if inner.commit.is_some() {
            // Journaling waits for the disk; only `submit` can do that.
            return Err(SubmitError::WouldBlock(payload));
        }
        match inner.tx.try_reserve() {
            Ok(permit) => Ok(self.enqueue(permit, payload, size)),
            Err(mpsc::error::TrySendError::Full(())) => Err(SubmitError::Full(payload)),
            Err(mpsc::error::TrySendError::Closed(())) => Err(SubmitError::ShuttingDown(payload)),
        }
    }

    /// The payload back with its serialized size, or the refusal.
    fn checked(&self, payload: T) -> Result<(T, usize), SubmitError<T>> {
        let limit = self.inner.config.max_record_bytes;
        let mut sink = SizeSink {
            len: 0,
            limit: limit.saturating_sub(format::task_record_len(0, 0)),
        };
        match serde_json::to_writer(&mut sink, &payload) {
            Ok(()) => Ok((payload, sink.len)),
            Err(_) if sink.len > sink.limit => Err(SubmitError::RecordTooLarge {
                task: payload,
                limit,
            }),
            Err(source) => Err(SubmitError::Unserializable {
                task: payload,
                source,
            }),
        }
    }

    /// Queues a new task that needs no journaling now (`OnShutdown` mode).
    fn enqueue(&self, permit: mpsc::Permit<'_, Job<T>>, payload: T, size: usize) -> TaskId {
        let (id, meta) = self.fresh();
        self.accept(permit, id, meta, payload, size, false)
    }

    /// A new task's id, and its metadata as accepted now.
    fn fresh(&self) -> (TaskId, TaskState) {
        let inner = &*self.inner;
        let id = TaskId::new(inner.run, inner.next_seq.fetch_add(1, Ordering::Relaxed));
        let meta = TaskState {
            enqueued_ms: now_ms(),
            ..TaskState::default()
        };
        (id, meta)
    }

    /// Queues an accepted task (`journaled`: its record is in the journal) and counts it.
    fn accept(
        &self,
        permit: mpsc::Permit<'_, Job<T>>,
        id: TaskId,
        meta: TaskState,
        payload: T,
        size: usize,
        journaled: bool,
    ) -> TaskId {
        permit.send(Job {
            id,
            meta,
            last_error: None,
            payload: Arc::new(payload),
            journaled,
            replayed: false,
        });
        let inner = &*self.inner;
        inner.counters.submitted.fetch_add(1, Ordering::Relaxed);
        inner
            .submitted_bytes
            .fetch_add(size as u64, Ordering::Relaxed);
        id
    }
}

impl<T> Pool<T> {
    /// Starts the shutdown (if it has not begun) and waits for its report.
    ///
    /// Intake closes at once; queued tasks are spilled right away; in-flight tasks run until the
    /// drain deadline, then their tokens fire, and after the cancel grace those still running
    /// are dropped and journaled as interrupted. The journal is then fsynced and unlocked.
    /// Calling it again, or from a clone, waits for the same shutdown.
    ///
    /// # Errors
    ///
    /// [`ShutdownError`] only if the shutdown sequence itself was torn down (the runtime shut
    /// down under it). Journal failures are in the report: see
    /// [`ShutdownReport::journal_error`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future does not stop the shutdown, which runs on its own task.
    pub async fn shutdown(&self) -> Result<ShutdownReport, ShutdownError> {
        self.inner.trigger.cancel();
        self.wait().await
    }

    /// Waits until the pool has stopped (after a shutdown was triggered in any way) and
    /// returns the report.
    ///
    /// # Errors
    ///
    /// As [`shutdown`](Self::shutdown).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn wait(&self) -> Result<ShutdownReport, ShutdownError> {
        let mut rx = self.inner.report.subscribe();
        let report = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| ShutdownError(()))?;
        report.clone().ok_or(ShutdownError(()))
    }

    /// Runs until SIGTERM or SIGINT (or any other shutdown trigger), then shuts down and returns
    /// the report.
    ///
    /// Escalation, as container runtimes and operators expect: the first SIGTERM or SIGINT
    /// starts the drain; a second skips the wait ([`shutdown_now`](Self::shutdown_now)): tokens
    /// fire and every task still running is journaled at once; a third exits the process at
    /// once with 128 + the signal number (143 for SIGTERM), from inside the signal handler, so
    /// it works even if the runtime is wedged, and skips the final spill: tasks in flight then
    /// are lost in `OnShutdown` mode (queued ones were spilled at the first signal). SIGQUIT
    /// keeps its default.
    ///
    /// Signals are not queued: one sent while the same signal is still pending merges with it
    /// (in the kernel, or on the pool's signal thread), so `kill -TERM` three times in a row
    /// may count once. Escalation counts the signals the pool noticed.
    ///
    /// Tasks dropped at the hard stop are journaled at once, even while a handler that blocks
    /// its thread has not returned yet; only such a handler's own task is then at the mercy of
    /// a third signal. (Block with `tokio::task::block_in_place` or `spawn_blocking`: a thread
    /// blocked in plain async code also stalls tasks the runtime queued on it.)
    ///
    /// The handlers stay installed for the rest of the process's life: nothing is installed
    /// until this is called.
    ///
    /// # Errors
    ///
    /// [`RunError::Signals`] if the handlers could not be registered (or, off Unix, signals
    /// are not supported), before anything else happens; [`RunError::Shutdown`] as for
    /// [`shutdown`](Self::shutdown).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the handlers installed: a later signal still shuts the pool
    /// down.
    pub async fn run_until_signal(&self) -> Result<ShutdownReport, RunError> {
        let trigger = self.inner.trigger.clone();
        let hurry = self.inner.hurry.clone();
        crate::signal::listen(3, move |count, signal| {
            tracing::debug!(%signal, count, "signal received");
            match count {
                1 => {
                    tracing::info!(%signal, "draining: a second signal skips the wait, a third exits");
                    trigger.cancel();
                }
                2 => {
                    tracing::warn!(%signal, "second signal: skipping the drain wait; a third exits at once");
                    hurry.cancel();
                    trigger.cancel();
                }
                _ => {}
            }
        })
        .map_err(RunError::Signals)?;
        Ok(self.wait().await?)
    }

    /// Skips the rest of the wait for in-flight tasks: fire their tokens and journal every
    /// task still running now. Starts the shutdown if it has not begun. Returns false if
    /// this had been asked before.
    pub fn shutdown_now(&self) -> bool {
        let first = !self.inner.hurry.is_cancelled();
        self.inner.hurry.cancel();
        self.inner.trigger.cancel();
        first
    }

    /// The pool's state, as a watch: `Running`, then `Draining`, then `Stopped`.
    pub fn state(&self) -> watch::Receiver<State> {
        self.inner.state.subscribe()
    }

    /// A snapshot of the pool's counters.
    pub fn stats(&self) -> Stats {
        let inner = &*self.inner;
        let c = &inner.counters;
        let channel = inner.tx.max_capacity() - inner.tx.capacity();
        Stats {
            queued: inner.backlog_len.load(Ordering::Relaxed)
                + channel
                + lock(&inner.waiting).len(),
            in_flight: c.in_flight.load(Ordering::Relaxed),
            submitted: c.submitted.load(Ordering::Relaxed),
            replayed: c.replayed.load(Ordering::Relaxed),
            completed: c.completed.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            spilled: c.spilled.load(Ordering::Relaxed),
            interrupted: c.interrupted.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            compacted: c.compacted.load(Ordering::Relaxed),
        }
    }

    /// What recovery found when the pool started.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    /// The journal directory.
    pub fn journal_dir(&self) -> &Path {
        &self.inner.journal_dir
    }

    /// The token whose cancellation starts the shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.trigger.clone()
    }
}

/// Counts serialized bytes, failing once past the limit (so a huge payload is not serialized
/// whole just to be refused).
struct SizeSink {
    len: usize,
    limit: usize,
}

impl std::io::Write for SizeSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.len += buf.len();
        if self.len > self.limit {
            return Err(std::io::Error::other("record too large"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A task read back from the journal.
enum Recovered<T> {
    Live {
        meta: TaskState,
        last_error: Option<Box<str>>,
        /// Boxed at once, so the moves that follow are a pointer's, not a payload's.
        payload: Arc<T>,
        /// The segment holding this latest record, and the record's length.
        segment: u64,
        len: u32,
    },
    Undecodable {
        meta: TaskState,
        error: String,
        payload: Vec<u8>,
    },
}

pub(crate) async fn start<T, F, Fut, E>(
    config: Config,
    policy: Policy<T>,
    handler: F,
) -> Result<Pool<T>, StartError>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    F: Fn(Task<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    let dir = config.journal_dir.clone().unwrap_or_default();
    let open_dir = dir.clone();
    let ops = config.file_ops.clone();
    let want_probe = config.grace_period.is_some();
    let opened = tokio::task::spawn_blocking(move || {
        let opened = recover::<T>(&open_dir, ops)?;
        let probe = want_probe.then(|| opened.0.probe());
        Ok::<_, StartError>((opened, probe))
    })
    .await
    .map_err(|e| StartError::InvalidConfig(format!("journal recovery panicked: {e}")))??;
    let ((journal, mut recovery, recovered), probe) = opened;
    let probe = probe.map(|probe| match probe {
        Ok((rate, fsync)) => {
            tracing::info!(bytes_per_sec = rate, fsync_us = fsync.as_micros() as u64, "journal write speed measured");
            (rate, fsync)
        }
        Err(error) => {
            tracing::warn!(%error, "could not measure the journal's write speed; assuming 10 MB/s and 50 ms per fsync");
            (10_000_000, Duration::from_millis(50))
        }
    });

    // Tasks whose payload no longer decodes become dead letters, durably, before anything runs.
    let mut journal = journal;
    let write_ahead = matches!(config.durability, Durability::WriteAhead { .. });
    let mut live = LiveIndex::default();
    if write_ahead {
        journal.adopt_obsolete();
    }
    let mut backlog = VecDeque::with_capacity(recovered.len());
    let mut waiting = Vec::new();
    let (now, wall) = (Instant::now(), now_ms());
    for (id, task) in recovered {
        match task {
            Recovered::Live {
                meta,
                last_error,
                payload,
                segment,
                len,
            } => {
                if write_ahead {
                    live.recovered(id, segment, len);
                }
                let job = Job {
                    id,
                    meta,
                    last_error,
                    payload,
                    journaled: true,
                    replayed: true,
                };
                // A task spilled while waiting for its retry keeps its time.
                if meta.not_before_ms > wall {
                    let delay = Duration::from_millis(meta.not_before_ms - wall);
                    waiting.push((now + delay, job));
                } else {
                    backlog.push_back(job);
                }
            }
            Recovered::Undecodable {
                meta,
                error,
                payload,
            } => {
                recovery.undecodable += 1;
                let record = TaskRecord {
                    id,
                    state: meta,
                    last_error: error.as_str().into(),
                    payload: &payload,
                };
                tracing::warn!(task = %id, %error, "payload no longer decodes; kept as a dead letter");
                match journal
                    .write_dead(&record)
                    .and_then(|()| journal.append_ack(id))
                {
                    Ok(()) => recovery.dead_letters += 1,
                    Err(error) => {
                        tracing::error!(%error, task = %id, "could not write dead letter; the old segment is kept");
                        journal.keep_obsolete();
                    }
                }
            }
        }
    }
    recovery.replayed = backlog.len() + waiting.len();

    // A child token: the pool's own shutdown (or its drop) never cancels the user's token.
    let trigger = config
        .shutdown_token
        .as_ref()
        .map_or_else(CancellationToken::new, CancellationToken::child_token);
    let (tx, rx) = mpsc::channel(config.queue_capacity);
    let replayed = recovery.replayed;
    let in_backlog = backlog.len();
    let epoch = journal.epoch();
    let inner = Arc::new(Inner {
        journal_dir: dir,
        tx,
        rx: tokio::sync::Mutex::new(rx),
        backlog_len: AtomicUsize::new(in_backlog),
        backlog: Mutex::new(backlog),
        epoch,
        run: journal.run(),
        journal: Arc::new(tokio::sync::Mutex::new(Some(journal))),
        next_seq: AtomicU64::new(1),
        intake: CancellationToken::new(),
        intake_closed: std::sync::atomic::AtomicBool::new(false),
        deadline: Arc::new(CancellationToken::new()),
        hard_stop: CancellationToken::new(),
        hurry: CancellationToken::new(),
        backlog_ready: Notify::new(),
        waiting: Mutex::new(waiting),
        waiting_changed: Notify::new(),
        jitter: Jitter::from_entropy(),
        commit: write_ahead.then(|| Commit::new(epoch)),
        live: Mutex::new(live),
        compacting: std::sync::atomic::AtomicBool::new(false),
        compacted_through: AtomicU64::new(0),
        policy,
        trigger: trigger.clone(),
        tracker: TaskTracker::new(),
        held: Mutex::new(Vec::new()),
        interrupted_ids: Mutex::new(Vec::new()),
        replay_outstanding: AtomicUsize::new(replayed),
        counters: Counters::default(),
        state: watch::Sender::new(State::Running),
        report: watch::Sender::new(None),
        journal_error: Mutex::new(None),
        recovery,
        config,
        probe,
        submitted_bytes: AtomicU64::new(0),
        spill_times: Mutex::new((Duration::ZERO, Duration::ZERO)),
    });
    inner
        .counters
        .replayed
        .store(replayed as u64, Ordering::Relaxed);
    if write_ahead {
        // Earlier runs' segments without live tasks go now, the others as they empty.
        spawn_delete_empty_segments(Arc::clone(&inner));
    } else if replayed == 0 && inner.recovery.segments > 0 {
        // Nothing to replay: the old segments (acks only, or all damaged) can go now.
        let mut journal = inner.journal.lock().await;
        if let Some(journal) = journal.as_mut()
            && let Err(error) = journal.retire_obsolete()
        {
            inner.record_journal_error(error);
        }
    }

    let handler = Arc::new(handler);
    for _ in 0..inner.config.workers {
        inner
            .tracker
            .spawn(worker::run(Arc::clone(&inner), Arc::clone(&handler)));
    }
    inner.tracker.close();
    tokio::spawn(schedule_retries(Arc::clone(&inner)));
    if let Durability::WriteAhead {
        sync: SyncPolicy::Interval(every),
    } = inner.config.durability
    {
        tokio::spawn(sync_every(Arc::clone(&inner), every));
    }
    tokio::spawn(supervise(Arc::clone(&inner)));
    tracing::info!(
        dir = %inner.journal_dir.display(),
        run = inner.run,
        workers = inner.config.workers,
        replayed,
        "pool started"
    );
    Ok(Pool {
        _on_drop: Arc::new(trigger.drop_guard()),
        inner,
    })
}

type Opened<T> = (Journal, RecoveryReport, Vec<(TaskId, Recovered<T>)>);

/// Opens the journal and decodes the last state of every task id, in id order.
fn recover<T: DeserializeOwned>(
    dir: &Path,
    ops: crate::journal::fs::Ops,
) -> Result<Opened<T>, StartError> {
    let (journal, report, found): (_, _, Vec<journal::Recovered<_>>) =
        Journal::open(dir, ops, |record| {
            serde_json::from_slice::<T>(record.payload)
                .map(Arc::new)
                .map_err(|e| {
                    let error = format!("payload no longer decodes: {e}");
                    (error, record.payload.to_vec())
                })
        })?;
    let tasks = found
        .into_iter()
        .map(|task| {
            let entry = match task.value {
                Ok(payload) => Recovered::Live {
                    meta: task.state,
                    last_error: task.last_error,
                    payload,
                    segment: task.segment,
                    len: task.len,
                },
                Err((error, payload)) => Recovered::Undecodable {
                    meta: task.state,
                    error,
                    payload,
                },
            };
            (task.id, entry)
        })
        .collect();
    Ok((journal, report, tasks))
}

/// Runs `f` on a blocking thread with the journal locked (`None` once it is closed).
async fn with_journal<R: Send + 'static>(
    journal: &Arc<tokio::sync::Mutex<Option<Journal>>>,
    f: impl FnOnce(&mut Option<Journal>) -> R + Send + 'static,
) -> Result<R, tokio::task::JoinError> {
    let mut guard = Arc::clone(journal).lock_owned().await;
    tokio::task::spawn_blocking(move || f(&mut guard)).await
}

/// Writes the group-commit buffer to the journal, batch after batch, until it is empty.
async fn flush<T: Send + Sync + 'static>(inner: Arc<Inner<T>>) {
    let Some(commit) = &inner.commit else { return };
    let sync = matches!(
        inner.config.durability,
        Durability::WriteAhead {
            sync: SyncPolicy::Always
        }
    );
    let segment_bytes = inner.config.segment_bytes;
    while let Some(batch) = commit.take() {
        let (tasks, new_tasks) = (batch.placements.len(), batch.new_tasks);
        let bytes = batch.bytes;
        let written = with_journal(&inner.journal, move |guard| {
            match guard.as_mut() {
                Some(journal) => journal
                    .append_batch(&bytes, tasks, sync && new_tasks, segment_bytes)
                    .map(Some),
                // Closed by the shutdown, whose spill holds every live task in its latest
                // state: acks, retry states and compaction copies need not be written. A new
                // task's record that comes this late fails its submit.
                None if !new_tasks => Ok(None),
                None => Err(JournalError::Poisoned),
            }
        })
        .await;
        let result = match written {
            Ok(result) => result,
            Err(e) => Err(JournalError::io(
                "append",
                &inner.journal_dir,
                None,
                std::io::Error::other(e.to_string()),
            )),
        };
        let result = match result {
            Ok(Some((segment, sealed))) => {
                lock(&inner.live).placed(segment, &batch.placements);
                if sealed {
                    spawn_delete_empty_segments(Arc::clone(&inner));
                }
                Ok(())
            }
            Ok(None) => Ok(()),
            // A journal poisoned earlier (by a failed `Interval` fsync, say): the submits get
            // the failure that poisoned it.
            Err(JournalError::Poisoned) if lock(&inner.journal_error).is_some() => {
                Err(lock(&inner.journal_error)
                    .clone()
                    .unwrap_or_else(|| Arc::new(JournalError::Poisoned)))
            }
            Err(error) => {
                let error = Arc::new(error);
                inner.record_journal_arc(Arc::clone(&error));
                Err(error)
            }
        };
        commit.finish(batch.last_seq, result);
    }
}

/// Write-ahead: deletes the sealed segments with nothing live left, oldest first (a newer
/// segment may hold the acks of an older one's tasks, so it never goes first). Then, if the
/// sealed segments before the newest hold no more live data than dead, starts a compaction
/// of them, unless one runs or no segment was sealed since the last one.
fn spawn_delete_empty_segments<T: Send + Sync + 'static>(inner: Arc<Inner<T>>) {
    tokio::spawn(delete_empty_segments(inner));
}

async fn delete_empty_segments<T: Send + Sync + 'static>(inner: Arc<Inner<T>>) {
    let worker = Arc::clone(&inner);
    let deleted = with_journal(&inner.journal, move |guard| {
        let Some(journal) = guard.as_mut() else {
            return Ok(None);
        };
        let (through, sparse) = {
            let live = lock(&worker.live);
            let healthy = journal.may_delete();
            let sealed = journal.sealed();
            let empty = sealed
                .iter()
                .take_while(|s| live.usage(s.number).tasks == 0)
                .count();
            let through = empty.checked_sub(1).map(|i| sealed[i].number);
            // The newest sealed segment is left alone: its tasks are the most likely to finish
            // on their own soon.
            let older = sealed[empty..]
                .split_last()
                .map_or(&[][..], |(_, older)| older);
            let size: u64 = older.iter().map(|s| s.len).sum();
            let used: u64 = older.iter().map(|s| live.usage(s.number).bytes).sum();
            let newest = older.last().map_or(0, |s| s.number);
            let sparse = (healthy
                && !older.is_empty()
                && used.saturating_mul(2) <= size
                && newest > worker.compacted_through.load(Ordering::Acquire))
            .then(|| older.to_vec());
            (through, sparse)
        };
        if let Some(through) = through {
            journal.delete_sealed_through(through)?;
        }
        Ok(sparse)
    })
    .await;
    match deleted {
        Ok(Ok(Some(sparse))) if !inner.intake_closed() => {
            if !inner.compacting.swap(true, Ordering::AcqRel) {
                tokio::spawn(compact(inner, sparse));
            }
        }
        Ok(Ok(_)) => {}
        Ok(Err(error)) => inner.record_journal_error(error),
        Err(error) => tracing::error!(%error, "deleting segments panicked"),
    }
}

/// Write-ahead compaction: writes the live tasks of `segments` again at the end of the journal,
/// so that they hold nothing live and the next deletion pass removes them (after an fsync of
/// the copies). A crash at any point leaves the old records, the copies, or both: recovery
/// keeps one task per id.
async fn compact<T: Send + Sync + 'static>(inner: Arc<Inner<T>>, segments: Vec<Sealed>) {
    let newest = segments.last().map_or(0, |s| s.number);
    inner.compacted_through.fetch_max(newest, Ordering::AcqRel);
    let copied = copy_live(&inner, segments).await;
    inner.compacting.store(false, Ordering::Release);
    match copied {
        Ok(0) => {}
        Ok(count) => {
            inner
                .counters
                .compacted
                .fetch_add(count as u64, Ordering::Relaxed);
            tracing::info!(tasks = count, through = newest, "compacted old segments");
            spawn_delete_empty_segments(inner);
        }
        Err(error) => tracing::warn!(%error, "compaction stopped; the old segments stay"),
    }
}

/// Reads the live tasks of `segments` and hands copies to the group commit; waits until they
/// are written. Returns how many were copied.
async fn copy_live<T: Send + Sync + 'static>(
    inner: &Arc<Inner<T>>,
    segments: Vec<Sealed>,
) -> Result<usize, Arc<JournalError>> {
    let Some(commit) = &inner.commit else {
        return Ok(0);
    };
    let reader = Arc::clone(inner);
    let read = tokio::task::spawn_blocking(move || {
        let mut copies = Copies::default();
        for segment in &segments {
            copies.read(&segment.path, segment.number, reader.epoch, |id| {
                lock(&reader.live).settled_in(id, segment.number)
            })?;
        }
        Ok::<_, JournalError>(copies)
    })
    .await;
    let copies = match read {
        Ok(Ok(read)) => read,
        Ok(Err(error)) => return Err(Arc::new(error)),
        Err(error) => {
            let error = std::io::Error::other(error.to_string());
            return Err(Arc::new(JournalError::io(
                "compact",
                &inner.journal_dir,
                None,
                error,
            )));
        }
    };
    // Each copy is checked and pushed under the index lock: a task finished before is not
    // copied, and one finished after has its ack behind the copy.
    let (mut count, mut last_seq) = (0, None);
    for chunk in copies.list().chunks(COMPACT_CHUNK) {
        let start = {
            let mut live = lock(&inner.live);
            if inner.intake_closed() {
                // The shutdown spill writes every live task anew.
                break;
            }
            let pushed = commit.push_copies(&copies, chunk, |copy| {
                live.settled_in(copy.id, copy.segment) && live.begin_move(copy.id)
            });
            count += pushed.count;
            last_seq = pushed.last_seq.or(last_seq);
            pushed.start
        };
        if start {
            tokio::spawn(flush(Arc::clone(inner)));
        }
    }
    if let Some(seq) = last_seq {
        commit.wait(seq).await?;
    }
    Ok(count)
}

/// Compaction copies are handed to the group commit this many at a time, so acks never wait
/// long for the index lock.
const COMPACT_CHUNK: usize = 256;

/// The write-ahead `Interval` policy: fsyncs the journal every `every`, until intake closes.
async fn sync_every<T>(inner: Arc<Inner<T>>, every: Duration) {
    loop {
        tokio::select! {
            () = inner.intake.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let synced = with_journal(&inner.journal, move |guard| {
            guard.as_mut().map_or(Ok(()), Journal::sync_current)
        })
        .await;
        if let Ok(Err(error)) = synced {
            inner.record_journal_arc(Arc::new(error));
        }
    }
}

/// Moves retries to the backlog as they come due, until intake closes (then they are spilled
/// with the time they may run).
async fn schedule_retries<T>(inner: Arc<Inner<T>>) {
    loop {
        let next = inner.release_due();
        tokio::select! {
            () = inner.intake.cancelled() => return,
            () = inner.waiting_changed.notified() => {}
            () = sleep_until_option(next) => {}
        }
    }
}

async fn sleep_until_option(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Waits for the trigger, then runs the shutdown sequence and publishes the report.
async fn supervise<T: Serialize + Send + Sync + 'static>(inner: Arc<Inner<T>>) {
    inner.trigger.cancelled().await;
    let report = drain(&inner).await;
    inner.state.send_replace(State::Stopped);
    inner.report.send_replace(Some(report));
}

async fn drain<T: Serialize + Send + Sync + 'static>(inner: &Arc<Inner<T>>) -> ShutdownReport {
    let started = Instant::now();
    inner.intake_closed.store(true, Ordering::Release);
    inner.intake.cancel();
    inner.state.send_replace(State::Draining);
    tracing::info!(
        in_flight = inner.counters.in_flight.load(Ordering::Relaxed),
        "shutdown: intake closed"
    );

    // Everything queued. The receiver first: once it is held, no worker can take a job, and
    // one that received a job after intake closed has put it back in the backlog.
    let mut queued: Vec<Job<T>> = Vec::new();
    {
        let mut rx = inner.rx.lock().await;
        rx.close();
        while let Some(job) = rx.recv().await {
            queued.push(job);
        }
    }
    queued.extend(lock(&inner.backlog).drain(..));
    inner.backlog_len.store(0, Ordering::Release);
    queued.sort_unstable_by_key(|job| job.id);

    if let Some(commit) = &inner.commit {
        // Write-ahead: the live tasks are journaled already, but among the whole run's history.
        // Spill them (and the interrupted ones) to a fresh segment, so that the next start reads
        // the live queue only; this run's segments go at close, once that spill is durable.
        // First, what is in the commit buffer is written: no retry state or compaction copy is
        // pushed after intake closed (both check under the index lock), so none can land after
        // the spill's newer records.
        let pushed = {
            let _live = lock(&inner.live);
            commit.last_seq()
        };
        // A failure is the journal's, recorded by the flusher.
        let _ = commit.wait(pushed).await;
        if let Some(journal) = inner.journal.lock().await.as_mut() {
            journal.rotate_for_spill();
        }
    }
    let (drain_deadline, budget) = deadline(inner, queued.len());
    let spill_queued = spill(inner, queued);
    let wait_in_flight = wait_in_flight(inner, started, drain_deadline);
    let (spilled, drain_time) = tokio::join!(spill_queued, wait_in_flight);

    // Whatever is still held, and the tasks waiting for a retry (they keep their time).
    spill_held(inner, true).await;

    let closing = std::time::Instant::now();
    let closed = {
        with_journal(&inner.journal, move |guard| {
            guard.take().map_or(Ok(()), Journal::close)
        })
        .await
    };
    let close_time = closing.elapsed();
    let (spill_time, sync_time) = *lock(&inner.spill_times);
    match closed {
        Ok(Ok(())) => {}
        Ok(Err(error)) => inner.record_journal_error(error),
        Err(error) => tracing::error!(%error, "closing the journal panicked"),
    }

    let c = &inner.counters;
    c.spilled.fetch_add(spilled.0, Ordering::Relaxed);
    c.unsaved.fetch_add(spilled.1, Ordering::Relaxed);
    let report = ShutdownReport {
        replayed: c.replayed.load(Ordering::Relaxed),
        submitted: c.submitted.load(Ordering::Relaxed),
        completed: c.completed.load(Ordering::Relaxed),
        failed: c.failed.load(Ordering::Relaxed),
        spilled: c.spilled.load(Ordering::Relaxed),
        interrupted: c.interrupted.load(Ordering::Relaxed),
        dropped: c.dropped.load(Ordering::Relaxed),
        retried: c.retried.load(Ordering::Relaxed),
        unsaved: c.unsaved.load(Ordering::Relaxed),
        interrupted_ids: lock(&inner.interrupted_ids).clone(),
        elapsed: started.elapsed(),
        drain_deadline,
        drain_time,
        spill_time,
        sync_time: sync_time + close_time,
        budget,
        journal_dir: inner.journal_dir.clone(),
        journal_error: lock(&inner.journal_error).clone(),
    };
    tracing::info!(
        completed = report.completed,
        spilled = report.spilled,
        interrupted = report.interrupted,
        failed = report.failed,
        unsaved = report.unsaved,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "shutdown complete"
    );
    report
}

/// The drain deadline for this shutdown: as configured, or derived from the grace period.
fn deadline<T>(inner: &Inner<T>, queued: usize) -> (Duration, Option<Budget>) {
    let config = &inner.config;
    let (Some(grace), Some((rate, fsync))) = (config.grace_period, inner.probe) else {
        return (config.drain_deadline, None);
    };
    let available = grace.saturating_sub(config.pre_stop);
    let submitted = inner.counters.submitted.load(Ordering::Relaxed).max(1);
    let average = inner.submitted_bytes.load(Ordering::Relaxed) / submitted
        + format::task_record_len(0, 0) as u64;
    let seconds_for = |bytes: u64| Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
    let margin = (available / 20).max(Duration::from_millis(100));
    let spill_reserve = fsync * 3 + seconds_for(config.workers as u64 * average) + margin;
    let drain_deadline = available
        .saturating_sub(config.cancel_grace)
        .saturating_sub(spill_reserve);
    let queue_spill_estimate = fsync + seconds_for(queued as u64 * average);
    if queue_spill_estimate > drain_deadline + config.cancel_grace {
        tracing::error!(
            queued,
            estimate_ms = queue_spill_estimate.as_millis() as u64,
            "spilling the queue may outlast the grace period"
        );
    }
    let budget = Budget {
        grace_period: grace,
        pre_stop: config.pre_stop,
        cancel_grace: config.cancel_grace,
        spill_reserve,
        queue_spill_estimate,
        drain_deadline,
        write_bytes_per_sec: rate,
        fsync_latency: fsync,
    };
    tracing::info!(
        deadline_ms = drain_deadline.as_millis() as u64,
        "drain deadline derived from the grace period"
    );
    (drain_deadline, Some(budget))
}

/// Waits for in-flight tasks: to the deadline, then the handlers' tokens fire; after the grace,
/// the hard stop. Returns how long it waited.
async fn wait_in_flight<T: Serialize + Send + Sync + 'static>(
    inner: &Arc<Inner<T>>,
    started: Instant,
    deadline: Duration,
) -> Duration {
    let config = &inner.config;
    let all_done = inner.tracker.wait();
    tokio::pin!(all_done);
    tokio::select! {
        () = &mut all_done => return started.elapsed(),
        () = tokio::time::sleep_until(started + deadline) => {
            tracing::error!(
                in_flight = inner.counters.in_flight.load(Ordering::Relaxed),
                "drain deadline passed; cancelling in-flight tasks"
            );
        }
        () = inner.hurry.cancelled() => tracing::info!("skipping the drain wait"),
    }
    inner.deadline.cancel();
    if !inner.hurry.is_cancelled() {
        tokio::select! {
            () = &mut all_done => return started.elapsed(),
            () = tokio::time::sleep(config.cancel_grace) => {}
            () = inner.hurry.cancelled() => {}
        }
    }
    inner.hard_stop.cancel();
    // Handlers dropped at the hard stop hand their tasks back at once. One that blocks its
    // thread would keep the others' tasks in memory until it returns, and a third signal then
    // would lose them: journal what is held now, then wait for the rest.
    if tokio::time::timeout(HELD_SPILL_AFTER, &mut all_done)
        .await
        .is_err()
    {
        spill_held(inner, false).await;
        all_done.await;
    }
    started.elapsed()
}

/// How long after the hard stop to wait for every handler before journaling what is held.
const HELD_SPILL_AFTER: Duration = Duration::from_millis(20);

/// Journals the held tasks (interrupted ones first, then failed ones whose dead letter could
/// not be written) and, with `with_waiting`, the tasks waiting for a retry; counts them.
async fn spill_held<T: Serialize + Send + Sync + 'static>(
    inner: &Arc<Inner<T>>,
    with_waiting: bool,
) {
    let mut held = std::mem::take(&mut *lock(&inner.held));
    held.sort_by_key(|(why, job)| (*why != Held::Interrupted, job.id));
    let ids: Vec<TaskId> = held
        .iter()
        .filter(|(why, _)| *why == Held::Interrupted)
        .map(|(_, job)| job.id)
        .collect();
    let waiting = if with_waiting {
        std::mem::take(&mut *lock(&inner.waiting))
    } else {
        Vec::new()
    };
    let jobs: Vec<Job<T>> = held
        .into_iter()
        .map(|(_, job)| job)
        .chain(waiting.into_iter().map(|(_, job)| job))
        .collect();
    let (written, unsaved) = spill(inner, jobs).await;
    // A spill is durable whole or not at all; only a payload that fails to serialize (which
    // submit already rules out) is left out of a durable one, so the split is by count.
    let interrupted = written.min(ids.len() as u64);
    let c = &inner.counters;
    c.interrupted.fetch_add(interrupted, Ordering::Relaxed);
    c.spilled
        .fetch_add(written - interrupted, Ordering::Relaxed);
    c.unsaved.fetch_add(unsaved, Ordering::Relaxed);
    lock(&inner.interrupted_ids).extend(ids);
}

/// Journals `jobs` as live tasks. Returns (written, not written).
async fn spill<T: Serialize + Send + Sync + 'static>(
    inner: &Arc<Inner<T>>,
    jobs: Vec<Job<T>>,
) -> (u64, u64) {
    if jobs.is_empty() {
        return (0, 0);
    }
    let count = jobs.len() as u64;
    let result = with_journal(&inner.journal, move |guard| {
        let Some(journal) = guard.as_mut() else {
            return (
                Err(JournalError::Poisoned),
                0,
                (Duration::ZERO, Duration::ZERO),
            );
        };
        let started = std::time::Instant::now();
        let payloads: Vec<Option<Vec<u8>>> = jobs.iter().map(encode_payload).collect();
        let records: Vec<TaskRecord<'_>> = jobs
            .iter()
            .zip(&payloads)
            .filter_map(|(job, payload)| Some(job.record(payload.as_deref()?)))
            .collect();
        let encode_time = started.elapsed();
        let outcome = journal.spill(&records);
        let times = (outcome.write_time + encode_time, outcome.sync_time);
        let written = if outcome.durable {
            outcome.written as u64
        } else {
            0
        };
        match outcome.error {
            Some(error) if !outcome.durable => (Err(error), written, times),
            Some(error) => (Ok(Some(error)), written, times),
            None => (Ok(None), written, times),
        }
    })
    .await;
    let (status, written, times) = match result {
        Ok(triple) => triple,
        Err(e) => {
            let error = std::io::Error::other(e.to_string());
            let times = (Duration::ZERO, Duration::ZERO);
            (
                Err(JournalError::io("spill", &inner.journal_dir, None, error)),
                0,
                times,
            )
        }
    };
    {
        let mut total = lock(&inner.spill_times);
        total.0 += times.0;
        total.1 += times.1;
    }
    match status {
        Ok(None) => tracing::warn!(tasks = written, "spilled tasks to the journal"),
        Ok(Some(error)) => {
            tracing::warn!(
                tasks = written,
                "spilled tasks to a fresh segment after a failure"
            );
            inner.record_journal_error(error);
        }
        Err(error) => inner.record_journal_error(error),
    }
    (written, count - written)
}

/// The job's payload, serialized for the spill; `None` (logged) if it fails to.
fn encode_payload<T: Serialize>(job: &Job<T>) -> Option<Vec<u8>> {
    match serde_json::to_vec(&*job.payload) {
        Ok(payload) => Some(payload),
        Err(error) => {
            tracing::error!(task = %job.id, %error, "payload failed to serialize at spill; task lost");
            None
        }
    }
}

impl<T> Job<T> {
    /// The job as a task record, with its `payload` serialized.
    fn record<'a>(&'a self, payload: &'a [u8]) -> TaskRecord<'a> {
        TaskRecord {
            id: self.id,
            state: self.meta,
            last_error: self.last_error.as_deref().unwrap_or("").into(),
            payload,
        }
    }

    /// Marks the job interrupted at the deadline: its attempt is not counted.
    pub(crate) fn interrupted(mut self) -> Self {
        self.meta.interrupted = true;
        self.meta.interruptions = self.meta.interruptions.saturating_add(1);
        self
    }
}
