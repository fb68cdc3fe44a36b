//! The one type that owns what the shutdown sequence (`drain.rs`) needs: the trigger, the
//! handlers' deadline token, the hard stop, the tasks held back for the final spill, the
//! background tasks to stop, and the report.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::config::Settled;
use super::job::{Held, Job};
use super::lock::lock;
use crate::error::ShutdownError;
use crate::report::{ShutdownReport, State, StateWatch};
use crate::task::TaskId;

/// A background task the shutdown stops: its token and its handle.
pub(crate) struct Owned {
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Owned {
    pub(crate) fn new() -> Self {
        Self {
            stop: CancellationToken::new(),
            task: Mutex::new(None),
        }
    }

    /// The token the task watches.
    pub(crate) fn token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Takes the task's handle, to wait for it when it is stopped.
    pub(crate) fn own(&self, task: JoinHandle<()>) {
        *lock(&self.task) = Some(task);
    }

    /// Stops the task and waits for it to end.
    pub(crate) async fn stop(&self) {
        self.stop.cancel();
        let task = lock(&self.task).take();
        if let Some(task) = task
            && let Err(error) = task.await
        {
            tracing::error!(%error, "a background task failed");
        }
    }
}

pub(crate) struct Shutdown<T> {
    /// Starts the shutdown (a child of the user's token, if one was given).
    pub(crate) trigger: CancellationToken,
    /// The handlers' token: cancelled at the drain deadline. Shared with each task by `Arc`.
    pub(crate) deadline: Arc<CancellationToken>,
    /// Cancelled at the hard stop: handlers still running are dropped.
    pub(crate) hard_stop: CancellationToken,
    /// Cancelled to skip the wait for in-flight tasks.
    pub(crate) hurry: CancellationToken,
    /// The drain deadline as configured: fixed, or from a grace period.
    pub(crate) settled: Settled,
    pub(crate) held: Mutex<Vec<(Held, Job<T>)>>,
    /// Ids of the tasks journaled as interrupted, for the report.
    pub(crate) interrupted_ids: Mutex<Vec<TaskId>>,
    /// Ids of the tasks the final spill could not save, for the report.
    pub(crate) unsaved_ids: Mutex<Vec<TaskId>>,
    pub(crate) flusher: Owned,
    pub(crate) upkeep: Owned,
    pub(crate) state: watch::Sender<State>,
    /// Set once the pool listens to the process's signals.
    listening: std::sync::atomic::AtomicBool,
    pub(crate) report: watch::Sender<Option<ShutdownReport>>,
}

impl<T> Shutdown<T> {
    pub(crate) fn new(trigger: CancellationToken, settled: Settled) -> Self {
        Self {
            trigger,
            deadline: Arc::new(CancellationToken::new()),
            hard_stop: CancellationToken::new(),
            hurry: CancellationToken::new(),
            settled,
            held: Mutex::new(Vec::new()),
            interrupted_ids: Mutex::new(Vec::new()),
            unsaved_ids: Mutex::new(Vec::new()),
            flusher: Owned::new(),
            upkeep: Owned::new(),
            state: watch::Sender::new(State::Running),
            listening: std::sync::atomic::AtomicBool::new(false),
            report: watch::Sender::new(None),
        }
    }

    pub(crate) fn trigger(&self) -> &CancellationToken {
        &self.trigger
    }

    pub(crate) fn deadline(&self) -> &Arc<CancellationToken> {
        &self.deadline
    }

    pub(crate) fn hard_stop(&self) -> &CancellationToken {
        &self.hard_stop
    }

    /// The token a background task watches, and where its handle goes.
    pub(crate) fn flusher_stop(&self) -> CancellationToken {
        self.flusher.stop.clone()
    }

    pub(crate) fn upkeep_stop(&self) -> CancellationToken {
        self.upkeep.stop.clone()
    }

    pub(crate) fn own(&self, flusher: Option<JoinHandle<()>>, upkeep: JoinHandle<()>) {
        *lock(&self.flusher.task) = flusher;
        *lock(&self.upkeep.task) = Some(upkeep);
    }

    /// Skips the rest of the wait for in-flight tasks, and starts the shutdown. Returns false
    /// if this had been asked before.
    pub(crate) fn hurry(&self) -> bool {
        let first = !self.hurry.is_cancelled();
        self.hurry.cancel();
        self.trigger.cancel();
        first
    }

    /// Whether this call is the first to make the pool listen to signals.
    pub(crate) fn start_listening(&self) -> bool {
        !self
            .listening
            .swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// The token that skips the wait (for the signal thread, which must not keep the pool).
    pub(crate) fn hurry_token(&self) -> CancellationToken {
        self.hurry.clone()
    }

    pub(crate) fn hold(&self, why: Held, job: Job<T>) {
        lock(&self.held).push((why, job));
    }

    pub(crate) fn watch_state(&self) -> StateWatch {
        StateWatch(self.state.subscribe())
    }

    pub(crate) fn state(&self) -> State {
        *self.state.borrow()
    }

    /// Waits for the report.
    pub(crate) async fn report(&self) -> Result<ShutdownReport, ShutdownError> {
        let mut rx = self.report.subscribe();
        let report = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| ShutdownError(()))?;
        report.clone().ok_or(ShutdownError(()))
    }
}
