//! The pool's builder.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::BoxError;
use crate::error::StartError;
use crate::journal::format;
use crate::policy::{DeadlineAction, Durability, Interruption, Policy};
use crate::pool::{self, Pool};
use crate::task::Task;

/// The default drain deadline: 25 s, to fit Kubernetes' default 30 s grace period.
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(25);
/// The default time between the deadline (when handlers' tokens fire) and the hard stop.
pub const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(2);
/// The default maximum size of one journal record: 1 MiB.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1024 * 1024;
/// The largest maximum record size a pool accepts: 64 MiB.
pub const MAX_RECORD_BYTES_LIMIT: usize = format::MAX_RECORD_LIMIT;
/// The default size at which a write-ahead segment is sealed: 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// The default queue capacity.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;

/// The settings a pool starts with.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) workers: usize,
    pub(crate) queue_capacity: usize,
    pub(crate) drain_deadline: Duration,
    pub(crate) cancel_grace: Duration,
    pub(crate) journal_dir: Option<PathBuf>,
    pub(crate) max_record_bytes: usize,
    pub(crate) shutdown_token: Option<CancellationToken>,
    pub(crate) grace_period: Option<Duration>,
    pub(crate) grace_period_env: Option<String>,
    pub(crate) pre_stop: Duration,
    pub(crate) durability: Durability,
    pub(crate) segment_bytes: u64,
    /// How the journal writes its files: the real calls, or a test's faulty ones.
    pub(crate) file_ops: crate::journal::fs::Ops,
}

/// Configures and starts a [`Pool`]. Made by [`Pool::builder`].
#[must_use = "a builder does nothing until `start` is called"]
pub struct Builder<T> {
    config: Config,
    policy: Policy<T>,
}

impl<T> fmt::Debug for Builder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .field("policy", &self.policy)
            .finish()
    }
}

impl<T> Builder<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    pub(crate) fn new() -> Self {
        let workers = std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(4);
        Self {
            config: Config {
                workers,
                queue_capacity: DEFAULT_QUEUE_CAPACITY,
                drain_deadline: DEFAULT_DRAIN_DEADLINE,
                cancel_grace: DEFAULT_CANCEL_GRACE,
                journal_dir: None,
                max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
                shutdown_token: None,
                grace_period: None,
                grace_period_env: None,
                pre_stop: Duration::ZERO,
                durability: Durability::OnShutdown,
                segment_bytes: DEFAULT_SEGMENT_BYTES,
                file_ops: crate::journal::fs::os(),
            },
            policy: Policy::default(),
        }
    }

    /// How many handlers run at once.
    ///
    /// The default is the number of CPUs the process may use.
    pub fn workers(mut self, workers: usize) -> Self {
        self.config.workers = workers;
        self
    }

    /// How many tasks may wait for a worker before `submit` waits and `try_submit` returns
    /// [`Full`](crate::SubmitError::Full). Tasks replayed from the journal do not count.
    ///
    /// The default is 1024.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.config.queue_capacity = capacity;
        self
    }

    /// How long in-flight tasks may run after shutdown begins. When it passes, each handler's
    /// cancellation token fires.
    ///
    /// The default is 25 s, which leaves room for the cancel grace and the spill inside
    /// Kubernetes' default 30 s termination grace period.
    pub fn drain_deadline(mut self, deadline: Duration) -> Self {
        self.config.drain_deadline = deadline;
        self
    }

    /// How long a handler has, after its token fires, to checkpoint and return before it is
    /// dropped and its task journaled as interrupted.
    ///
    /// The default is 2 s.
    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.config.cancel_grace = grace;
        self
    }

    /// The directory of the pool's journal. It is created (owner-only) if missing, and locked
    /// for the pool's life: one pool per directory.
    ///
    /// There is no default; `start` fails without one.
    pub fn journal_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.journal_dir = Some(dir.into());
        self
    }

    /// The largest journal record a task may need, header included. A payload that would need
    /// more is refused at `submit` with [`RecordTooLarge`](crate::SubmitError::RecordTooLarge),
    /// never discovered at spill time.
    ///
    /// The default is 1 MiB; at most 64 MiB.
    pub fn max_record_bytes(mut self, bytes: usize) -> Self {
        self.config.max_record_bytes = bytes;
        self
    }

    /// A token whose cancellation starts the shutdown, for services that already have one.
    /// The pool watches a child of it: [`Pool::shutdown`] never cancels the token itself.
    ///
    /// The default is a fresh token of the pool's own.
    pub fn shutdown_token(mut self, token: CancellationToken) -> Self {
        self.config.shutdown_token = Some(token);
        self
    }

    /// The orchestrator's termination grace period: the time from the stop request to
    /// SIGKILL (Kubernetes' `terminationGracePeriodSeconds`, systemd's `TimeoutStopSec`,
    /// `docker stop --time`). When set, it replaces [`drain_deadline`](Self::drain_deadline):
    /// the pool derives the deadline at shutdown as the grace period, less the
    /// [`pre_stop`](Self::pre_stop) delay, less the cancel grace, less a spill reserve sized
    /// from the work in flight and the journal's write speed, measured at start. The
    /// [`ShutdownReport::budget`](crate::ShutdownReport::budget) says how it was spent.
    ///
    /// The default is unset: the drain deadline is used as given.
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.config.grace_period = Some(grace);
        self
    }

    /// Reads the grace period, in seconds (`30` or `29.5`), from an environment variable at
    /// `start`, e.g. one the deployment sets from its `terminationGracePeriodSeconds`. An unset
    /// variable leaves the setting as it was; a malformed one makes `start` fail.
    ///
    /// The default is not to read any variable.
    pub fn grace_period_from_env(mut self, variable: impl Into<String>) -> Self {
        self.config.grace_period_env = Some(variable.into());
        self
    }

    /// The time the orchestrator spends before it sends SIGTERM, out of the same grace period
    /// (a Kubernetes `preStop` sleep, for example). Used only with a grace period.
    ///
    /// The default is zero.
    pub fn pre_stop(mut self, delay: Duration) -> Self {
        self.config.pre_stop = delay;
        self
    }

    /// When tasks reach the disk: at shutdown, or before `submit` returns. See [`Durability`]
    /// for what each mode survives.
    ///
    /// The default is [`Durability::OnShutdown`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.config.durability = durability;
        self
    }

    /// In write-ahead mode, the size at which the journal's segment is sealed and a new one
    /// started. A sealed segment is deleted as soon as every task in it (and in every older
    /// one) is finished. When the older sealed segments hold no more live data than finished,
    /// their unfinished tasks are copied to the end of the journal and the segments deleted
    /// (compaction), so one task that never finishes pins nothing: the journal stays within
    /// about twice the live tasks' records plus three segments.
    ///
    /// The default is 64 MiB.
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.config.segment_bytes = bytes;
        self
    }

    /// The journal's file operations: a test's faulty ones instead of the real calls.
    #[cfg(test)]
    pub(crate) fn file_ops(mut self, ops: crate::journal::fs::Ops) -> Self {
        self.config.file_ops = ops;
        self
    }

    /// How many times a task may fail (its handler returns an error or panics) before it is set
    /// aside as a dead letter. A run interrupted at the drain deadline does not count.
    ///
    /// The default is 5.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.policy.max_attempts = attempts;
        self
    }

    /// The delay before retrying a failed task: `base` after the first failure, doubling after
    /// each further one up to `cap`, with jitter (each delay is between half and all of that).
    /// A task waiting for its retry at shutdown is journaled with the time it may run again,
    /// and the next start honours it.
    ///
    /// The default is 1 s, capped at 5 min.
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.policy.backoff_base = base;
        self.policy.backoff_cap = cap;
        self
    }

    /// What to do with a task still running at the drain deadline, decided from its payload
    /// (an enum payload can answer per task kind).
    ///
    /// The default is [`DeadlineAction::Requeue`] for every task.
    pub fn on_deadline(
        mut self,
        decide: impl Fn(&T) -> DeadlineAction + Send + Sync + 'static,
    ) -> Self {
        self.policy.on_deadline = Some(Arc::new(decide));
        self
    }

    /// A hook that runs for each task stopped at the drain deadline, before its
    /// [`DeadlineAction`] is carried out (to release a lease, say, or record a metric). It gets
    /// the cancel grace to finish, then it is dropped.
    ///
    /// The default is none.
    pub fn on_interrupt<H, Fut>(mut self, hook: H) -> Self
    where
        H: Fn(Interruption<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.policy.on_interrupt = Some(Arc::new(move |interruption| Box::pin(hook(interruption))));
        self
    }

    /// After how many consecutive runs interrupted at the drain deadline a task is set aside
    /// as a dead letter instead of replayed again, so a task that always outlives the deadline
    /// cannot loop forever.
    ///
    /// The default is 3.
    pub fn max_interruptions(mut self, runs: u32) -> Self {
        self.policy.max_interruptions = runs;
        self
    }

    /// Opens and locks the journal, recovers it, queues the recovered tasks ahead of anything
    /// new, and starts the workers.
    ///
    /// The handler is called once per run of a task. Its future must be `Send + 'static`; an
    /// `Err` or a panic is recorded as a failed attempt and the task kept as a dead letter.
    ///
    /// # Errors
    ///
    /// [`StartError::JournalLocked`] if another pool holds the directory,
    /// [`StartError::Journal`] if the journal cannot be opened or read (a segment of a newer
    /// format, an I/O error), [`StartError::InvalidConfig`] for a setting out of range or a
    /// missing journal directory. Damaged records are not errors: they are repaired or skipped
    /// and listed in [`Pool::recovery`].
    ///
    /// # Panics
    ///
    /// Panics if called outside a tokio runtime.
    pub async fn start<F, Fut, E>(self, handler: F) -> Result<Pool<T>, StartError>
    where
        F: Fn(Task<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let mut config = self.config;
        if let Some(variable) = &config.grace_period_env {
            match std::env::var(variable) {
                Ok(value) => match parse_seconds(&value) {
                    Some(grace) => config.grace_period = Some(grace),
                    None => {
                        return Err(StartError::InvalidConfig(format!(
                            "{variable}={value:?} is not a number of seconds"
                        )));
                    }
                },
                Err(std::env::VarError::NotPresent) => {}
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(StartError::InvalidConfig(format!(
                        "{variable} is not unicode"
                    )));
                }
            }
        }
        if let Some(grace) = config.grace_period
            && config.pre_stop >= grace
        {
            return Err(StartError::InvalidConfig(format!(
                "pre_stop ({:?}) leaves nothing of the grace period ({grace:?})",
                config.pre_stop
            )));
        }
        if self.policy.max_attempts == 0 || self.policy.max_interruptions == 0 {
            return Err(StartError::InvalidConfig(
                "max_attempts and max_interruptions must be at least 1".into(),
            ));
        }
        if config.workers == 0 {
            return Err(StartError::InvalidConfig(
                "workers must be at least 1".into(),
            ));
        }
        if config.queue_capacity == 0 {
            return Err(StartError::InvalidConfig(
                "queue_capacity must be at least 1".into(),
            ));
        }
        let smallest = format::task_record_len(2, 0);
        if !(smallest..=MAX_RECORD_BYTES_LIMIT).contains(&config.max_record_bytes) {
            return Err(StartError::InvalidConfig(format!(
                "max_record_bytes must be between {smallest} and {MAX_RECORD_BYTES_LIMIT}"
            )));
        }
        if config.journal_dir.is_none() {
            return Err(StartError::InvalidConfig("journal_dir is required".into()));
        }
        pool::start(config, self.policy, handler).await
    }
}

/// Parses a number of seconds such as `30` or `29.5`.
fn parse_seconds(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    Duration::try_from_secs_f64(secs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_periods_parse_as_seconds() {
        assert_eq!(parse_seconds("30"), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_seconds(" 29.5\n"),
            Some(Duration::from_millis(29_500))
        );
        assert_eq!(parse_seconds("0"), Some(Duration::ZERO));
        for bad in ["", "-1", "NaN", "inf", "30s", "1e400"] {
            assert_eq!(parse_seconds(bad), None, "{bad:?}");
        }
    }
}
