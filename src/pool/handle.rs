//! The handles: [`Pool`], cheap to clone, and [`WeakPool`], which does not keep the pool from
//! shutting down on drop.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Weak};

use tokio_util::sync::{CancellationToken, DropGuard};

use super::intake::Extras;
use super::shared::Shared;
use super::task_builder::TaskBuilder;
use crate::error::{RunError, ShutdownError, SubmitError};
use crate::report::{Health, RecoveryReport, ShutdownReport, State, StateWatch, Stats};
use crate::task::TaskId;

/// A pool of workers whose unfinished tasks survive shutdown in a journal.
///
/// A cheap handle: clones share one pool. **Dropping the last `Pool` handle starts the
/// shutdown** (spilling what is queued), but only [`shutdown`](Self::shutdown) or
/// [`wait`](Self::wait) tells how that went. A handle held by the pool's own handler (or by
/// application state the handler holds) would keep that from ever happening: hold a
/// [`WeakPool`] there instead ([`downgrade`](Self::downgrade)), or shut the pool down
/// explicitly (a call, a token, a signal).
#[must_use = "dropping the last handle starts the pool's shutdown"]
pub struct Pool<T> {
    shared: Arc<Shared<T>>,
    /// Starts the shutdown when the last handle goes.
    on_drop: Arc<DropGuard>,
}

/// A handle that does not keep its pool from shutting down when the last [`Pool`] handle is
/// dropped, for a handler that submits follow-up tasks to its own pool. Made by
/// [`Pool::downgrade`].
pub struct WeakPool<T> {
    shared: Weak<Shared<T>>,
    on_drop: Weak<DropGuard>,
}

impl<T> Clone for Pool<T> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            on_drop: Arc::clone(&self.on_drop),
        }
    }
}

impl<T> Clone for WeakPool<T> {
    fn clone(&self) -> Self {
        Self {
            shared: Weak::clone(&self.shared),
            on_drop: Weak::clone(&self.on_drop),
        }
    }
}

impl<T> fmt::Debug for Pool<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("journal_dir", &self.shared.store.dir())
            .field("state", &self.shared.shutdown.state())
            .field("run", &self.shared.ids.run())
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Debug for WeakPool<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakPool").finish_non_exhaustive()
    }
}

impl<T> WeakPool<T> {
    /// A full handle, if some other `Pool` handle still exists.
    #[must_use]
    pub fn upgrade(&self) -> Option<Pool<T>> {
        Some(Pool {
            shared: self.shared.upgrade()?,
            on_drop: self.on_drop.upgrade()?,
        })
    }
}

impl<T: Send + Sync + 'static> Pool<T> {
    pub(crate) fn new(shared: Arc<Shared<T>>, trigger: CancellationToken) -> Self {
        Self {
            shared,
            on_drop: Arc::new(trigger.drop_guard()),
        }
    }

    /// Queues a task, waiting for room if the queue is full. Returns its id.
    ///
    /// # Errors
    ///
    /// Every error hands the task back: [`SubmitError::ShuttingDown`] once shutdown has begun
    /// (answer 503, or hold on to it), [`SubmitError::RecordTooLarge`] if its record would
    /// exceed the maximum record size, [`SubmitError::Unserializable`] if it fails to
    /// encode, and in write-ahead mode [`SubmitError::Journal`] if the journal failed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped before it completes, the task was not queued.
    pub async fn submit(&self, payload: T) -> Result<TaskId, SubmitError<T>> {
        self.shared.submit(payload, None, Extras::default()).await
    }

    /// A task with options, submitted by the builder's
    /// [`submit`](TaskBuilder::submit) or [`try_submit`](TaskBuilder::try_submit): a priority,
    /// a time to run at, a time to live, a unique key, its own retry limit. Every option is
    /// journaled with the task, so it holds across a spill, a reload and (write-ahead) a
    /// SIGKILL, and `inspect` shows it.
    ///
    /// ```no_run
    /// # async fn f(pool: drainpool::Pool<String>) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    ///
    /// let id = pool
    ///     .task("send the receipt for order 7".to_string())
    ///     .priority(5)
    ///     .delay(Duration::from_secs(30))
    ///     .time_to_live(Duration::from_secs(3600))
    ///     .unique_key("receipt:7")
    ///     .max_attempts(10)
    ///     .submit()
    ///     .await?;
    /// # let _ = id;
    /// # Ok(())
    /// # }
    /// ```
    pub fn task(&self, payload: T) -> TaskBuilder<'_, T> {
        TaskBuilder::new(&self.shared, payload)
    }

    /// Queues a task, waiting at most `wait` for room in the queue; then, in write-ahead mode,
    /// for its record to be durable (that wait is the disk's, not bounded here). Returns its id.
    /// The bounded submit for a service that answers 429 when it is full: `try_submit` with a
    /// little patience, and the one that works in write-ahead mode (where `try_submit` cannot
    /// wait for the journal).
    ///
    /// # Errors
    ///
    /// As [`submit`](Self::submit), plus [`SubmitError::Full`] when no room came within
    /// `wait` (`Duration::ZERO`: none now).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped before it completes, the task was not queued.
    pub async fn submit_within(
        &self,
        payload: T,
        wait: std::time::Duration,
    ) -> Result<TaskId, SubmitError<T>> {
        self.shared
            .submit(payload, Some(wait), Extras::default())
            .await
    }

    /// Queues a task if there is room now. Returns its id.
    ///
    /// # Errors
    ///
    /// As [`submit`](Self::submit), plus [`SubmitError::Full`] when the queue is full, and
    /// [`SubmitError::WouldBlock`] always in write-ahead mode, where accepting a task means
    /// waiting for the journal: use `submit` there.
    pub fn try_submit(&self, payload: T) -> Result<TaskId, SubmitError<T>> {
        self.shared.try_submit(payload, Extras::default())
    }

    /// `submit_in_transaction`'s pool side (the public method is in `postgres/`, which owns
    /// the refusal of a pool without the store): the task's SQL, or the payload back if the
    /// pool has no shared store.
    #[cfg(feature = "postgres")]
    pub(crate) fn in_transaction(
        &self,
        payload: T,
    ) -> Result<Result<super::InTransaction, T>, SubmitError<T>> {
        self.shared.in_transaction(payload)
    }
}

impl<T> Pool<T> {
    /// A handle that does not keep the pool from shutting down on drop: see [`WeakPool`].
    #[must_use]
    pub fn downgrade(&self) -> WeakPool<T> {
        WeakPool {
            shared: Arc::downgrade(&self.shared),
            on_drop: Arc::downgrade(&self.on_drop),
        }
    }

    /// Starts the shutdown (if it has not begun) and waits for its report.
    ///
    /// Intake closes at once; queued tasks are spilled right away; in-flight tasks run until
    /// the drain deadline, then their tokens fire, and after the cancel grace those still
    /// running are dropped and journaled as interrupted. The journal is then fsynced and
    /// unlocked. Calling it again, or from a clone, waits for the same shutdown.
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
        // Intake refuses from this moment, not from when the drain gets going.
        self.shared.queue.close();
        self.shared.shutdown.trigger().cancel();
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
        self.shared.shutdown.report().await
    }

    /// Runs until SIGTERM or SIGINT (or any other shutdown trigger), then shuts down and returns
    /// the report.
    ///
    /// Escalation, as container runtimes and operators expect: the first SIGTERM or SIGINT
    /// starts the drain; a second skips the wait ([`shutdown_now`](Self::shutdown_now)): tokens
    /// fire and every task still running is journaled at once; a third exits the process at
    /// once with 128 + the signal number (143 for SIGTERM), from inside the signal handler, so
    /// it works even if the runtime is wedged, and skips the final spill: tasks in flight then
    /// are lost in the on-shutdown mode (queued ones were spilled at the first signal).
    /// SIGQUIT keeps its default.
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
        self.listen_for_signals().map_err(RunError::Signals)?;
        Ok(self.wait().await?)
    }

    /// Joins the process's signal owner (once per pool): the first signal starts the
    /// shutdown, the second skips the wait, the third exits.
    pub(crate) fn listen_for_signals(&self) -> std::io::Result<()> {
        if !self.shared.shutdown.start_listening() {
            return Ok(());
        }
        let trigger = self.shared.shutdown.trigger().clone();
        let hurry = self.shared.shutdown.hurry_token();
        // The gate, not the pool: the listener lives as long as the process.
        let gate = self.shared.queue.gate();
        crate::signal::listen(3, move |count, signal| match count {
            1 => {
                tracing::info!(%signal, "draining: a second signal skips the wait, a third exits");
                gate.close();
                trigger.cancel();
            }
            2 => {
                tracing::warn!(%signal, "second signal: skipping the drain wait; a third exits at once");
                hurry.cancel();
                trigger.cancel();
            }
            _ => {}
        })
    }

    /// Skips the rest of the wait for in-flight tasks: fire their tokens and journal every
    /// task still running now. Starts the shutdown if it has not begun. Returns false if
    /// this had been asked before.
    pub fn shutdown_now(&self) -> bool {
        self.shared.queue.close();
        self.shared.shutdown.hurry()
    }

    /// The pool's state now: `Running`, then `Draining`, then `Stopped`.
    #[must_use]
    pub fn state(&self) -> State {
        self.shared.shutdown.state()
    }

    /// A watch on the pool's state, to wait for it to change (a readiness probe that fails as
    /// soon as the pool leaves `Running`, say).
    #[must_use]
    pub fn watch_state(&self) -> StateWatch {
        self.shared.shutdown.watch_state()
    }

    /// Whether the pool can take work, for a readiness probe: not from the first shutdown
    /// trigger on, nor while the journal cannot take what the pool holds (a failed journal, a
    /// spill reserve that cannot grow), with the reason.
    ///
    /// ```no_run
    /// # fn probe(pool: &drainpool::Pool<String>) -> (u16, String) {
    /// let health = pool.health();
    /// (if health.is_ready() { 200 } else { 503 }, health.to_string())
    /// # }
    /// ```
    #[must_use]
    pub fn health(&self) -> Health {
        let shared = &*self.shared;
        if shared.shutdown.trigger().is_cancelled() || shared.queue.is_closed() {
            return Health::ShuttingDown;
        }
        if let Some(error) = self.journal_problem() {
            return Health::JournalUnavailable(error);
        }
        // Write-ahead with the store: submits need the server.
        #[cfg(feature = "postgres")]
        if let Some(claims) = &shared.remote
            && claims.commits.is_some()
            && let Some(error) = claims.trouble()
        {
            return Health::StoreUnavailable(error);
        }
        Health::Ready
    }

    /// Why the journal cannot take what the pool holds, if it cannot: it failed, or the spill
    /// reserve cannot grow.
    fn journal_problem(&self) -> Option<std::sync::Arc<crate::error::JournalError>> {
        let shared = &*self.shared;
        shared
            .store
            .first_error()
            .or_else(|| shared.reserve.as_ref().and_then(|r| r.shortage()))
    }

    /// A snapshot of the pool's counters.
    #[must_use]
    pub fn stats(&self) -> Stats {
        let shared = &*self.shared;
        Stats {
            queued: shared.queue.len() as u64,
            in_flight: shared.counters.in_flight.get(),
            journal_ready: self.journal_problem().is_none(),
            spill_reserve: shared.reserve.as_ref().map_or(0, |r| r.reserved()),
            counts: shared.counters.snapshot(),
        }
    }

    /// What recovery found when the pool started.
    #[must_use]
    pub fn recovery(&self) -> &RecoveryReport {
        &self.shared.recovery
    }

    /// The journal directory.
    #[must_use]
    pub fn journal_dir(&self) -> &Path {
        self.shared.store.dir()
    }

    /// The token whose cancellation starts the shutdown.
    #[must_use]
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.trigger().clone()
    }
}
