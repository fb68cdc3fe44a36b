//! Helpers shared by the integration tests.

#![allow(dead_code, unreachable_pub)]

#[cfg(unix)]
pub mod child;
pub mod host;

// Where the tests have always found them; not every test binary uses each.
#[allow(unused_imports)]
pub use host::{in_ci, require, say, skip_or_fail};

#[cfg(feature = "postgres")]
pub mod pg;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drainpool::{Pool, Task, TaskId};
use serde::{Deserialize, Serialize};

/// A task payload of a realistic shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub n: u64,
    /// How long the handler takes, in virtual milliseconds.
    pub work_ms: u64,
    /// What the handler does.
    pub action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Sleep `work_ms`, then succeed.
    Work,
    /// Sleep `work_ms`, ignoring the cancellation token.
    IgnoreToken,
    /// Sleep `work_ms` or until the token fires; return an error if it fired.
    HonourToken,
    /// Sleep `work_ms` or until the token fires; checkpoint and return Ok either way.
    Checkpoint,
    /// Return an error.
    Fail,
    /// Panic.
    Panic,
}

impl Job {
    pub fn work(n: u64, work_ms: u64) -> Self {
        Self {
            n,
            work_ms,
            action: Action::Work,
        }
    }

    pub fn with(n: u64, work_ms: u64, action: Action) -> Self {
        Self { n, work_ms, action }
    }
}

/// One handler run, as the handler saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub n: u64,
    pub id: TaskId,
    pub attempt: u32,
    pub interrupted_before: bool,
    /// Whether the run returned Ok.
    pub ok: bool,
}

/// What the handlers saw: every run that started, and every run that finished.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    pub started: Arc<Mutex<Vec<u64>>>,
    pub finished: Arc<Mutex<Vec<Run>>>,
}

impl Ledger {
    pub fn started(&self) -> Vec<u64> {
        self.started.lock().unwrap().clone()
    }

    pub fn finished(&self) -> Vec<Run> {
        self.finished.lock().unwrap().clone()
    }

    pub fn completed(&self) -> Vec<u64> {
        self.finished()
            .iter()
            .filter(|r| r.ok)
            .map(|r| r.n)
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TestError(pub &'static str);

/// Starts a pool over `dir` whose handler follows each job's action and writes the ledger.
pub async fn start(
    dir: &std::path::Path,
    workers: usize,
    ledger: &Ledger,
    configure: impl FnOnce(drainpool::Builder<Job>) -> drainpool::Builder<Job>,
) -> Result<Pool<Job>, drainpool::StartError> {
    let ledger = ledger.clone();
    let builder = Pool::builder()
        .workers(workers)
        .queue_capacity(1000)
        .drain_deadline(Duration::from_secs(10))
        .cancel_grace(Duration::from_secs(2))
        .journal_dir(dir);
    configure(builder)
        .start(move |task: Task<Job>| {
            let ledger = ledger.clone();
            async move { handle(task, ledger).await }
        })
        .await
}

async fn handle(task: Task<Job>, ledger: Ledger) -> Result<(), TestError> {
    let job = task.payload().clone();
    ledger.started.lock().unwrap().push(job.n);
    let work = tokio::time::sleep(Duration::from_millis(job.work_ms));
    let result = match job.action {
        Action::Work | Action::IgnoreToken => {
            work.await;
            Ok(())
        }
        Action::HonourToken => tokio::select! {
            () = work => Ok(()),
            () = task.cancelled() => Err(TestError("cancelled")),
        },
        Action::Checkpoint => {
            tokio::select! {
                () = work => {}
                () = task.cancelled() => {}
            }
            Ok(())
        }
        Action::Fail => Err(TestError("refused by the test")),
        Action::Panic => panic!("test panic for task {}", job.n),
    };
    ledger.finished.lock().unwrap().push(Run {
        n: job.n,
        id: task.id(),
        attempt: task.attempt(),
        interrupted_before: task.was_interrupted(),
        ok: result.is_ok(),
    });
    result
}

/// Lets every ready task run (virtual time does not move).
pub async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting for a state, bounded.
// ---------------------------------------------------------------------------------------------

/// How long a test waits for a state it expects before it fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Polls `condition` every 5 ms until it holds (true), or `limit` of real time has passed
/// (false). Under a paused clock the polls do not move virtual time by much.
pub async fn poll_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let started = std::time::Instant::now();
    loop {
        if condition() {
            return true;
        }
        if started.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until `condition` holds; fails the test, naming `what` ("for ..."), after `limit`
/// of real time.
#[track_caller]
pub fn eventually<'a>(
    limit: Duration,
    what: &'a str,
    condition: impl FnMut() -> bool + 'a,
) -> impl Future<Output = ()> + 'a {
    let caller = std::panic::Location::caller();
    async move {
        assert!(
            poll_until(limit, condition).await,
            "waited {limit:?} in vain for {what} (at {caller})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Runtimes and reports.
// ---------------------------------------------------------------------------------------------

/// A current-thread tokio runtime with every driver.
pub fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A tokio runtime with two worker threads and every driver.
pub fn multi_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Every task a run took in is accounted for once in its report.
#[track_caller]
pub fn counts_add_up(r: &drainpool::ShutdownReport) {
    assert_eq!(
        r.replayed + r.submitted,
        r.completed + r.failed + r.dropped + r.spilled + r.interrupted + r.unsaved,
        "counts do not add up: {r:?}"
    );
}
