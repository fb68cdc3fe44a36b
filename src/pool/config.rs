//! A pool's settings, their defaults, and the checks `start` makes of them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::remote::Connect;
use crate::error::StartError;
use crate::journal;
use crate::policy::{Durability, SyncPolicy};

/// The default drain deadline: 25 s, to fit Kubernetes' default 30 s grace period.
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(25);
/// The default time between the deadline (when handlers' tokens fire) and the hard stop.
pub const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(2);
/// The default maximum size of one journal record: 1 MiB.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1024 * 1024;
/// The largest maximum record size a pool accepts: 64 MiB.
pub const MAX_RECORD_BYTES_LIMIT: usize = journal::MAX_RECORD_BYTES;
/// The default size at which a write-ahead segment is sealed: 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// The default queue capacity.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;

/// How long in-flight tasks may run once shutdown begins: one explicit choice, set with
/// [`Builder::deadline`](crate::Builder::deadline).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Deadline {
    /// A fixed drain deadline. When it passes, each handler's cancellation token fires.
    Fixed(Duration),
    /// Derived at shutdown from the orchestrator's termination grace period (Kubernetes'
    /// `terminationGracePeriodSeconds`, systemd's `TimeoutStopSec`, `docker stop --time`): the
    /// grace period, less `pre_stop` (the time spent before SIGTERM, a Kubernetes `preStop`
    /// sleep say), less the cancel grace, less a spill reserve sized from the work in flight
    /// and the journal's write speed, measured at start. The
    /// [`ShutdownReport::budget`](crate::ShutdownReport::budget) says how it was spent.
    GracePeriod {
        /// The grace period.
        grace: Duration,
        /// The part of it spent before SIGTERM.
        pre_stop: Duration,
    },
    /// As `GracePeriod`, with the grace period read at start from an environment variable, in
    /// seconds (`30` or `29.5`), e.g. one the deployment sets from its
    /// `terminationGracePeriodSeconds`. An unset variable means `Fixed(fallback)`; a malformed
    /// one makes `start` fail.
    GracePeriodFromEnv {
        /// The variable's name.
        variable: String,
        /// The part of the grace period spent before SIGTERM.
        pre_stop: Duration,
        /// The fixed deadline used when the variable is unset.
        fallback: Duration,
    },
}

impl Default for Deadline {
    fn default() -> Self {
        Self::Fixed(DEFAULT_DRAIN_DEADLINE)
    }
}

/// The deadline settled at start: fixed, or a grace period to derive it from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    Fixed(Duration),
    GracePeriod { grace: Duration, pre_stop: Duration },
}

impl Deadline {
    /// Reads the environment, if asked to, and checks the result.
    pub(crate) fn settle(&self) -> Result<Settled, StartError> {
        let invalid = |reason: String| StartError::InvalidConfig {
            setting: "deadline",
            reason,
        };
        let settled = match self {
            Self::Fixed(deadline) => Settled::Fixed(*deadline),
            Self::GracePeriod { grace, pre_stop } => Settled::GracePeriod {
                grace: *grace,
                pre_stop: *pre_stop,
            },
            Self::GracePeriodFromEnv {
                variable,
                pre_stop,
                fallback,
            } => match std::env::var(variable) {
                Ok(value) => match parse_seconds(&value) {
                    Some(grace) => Settled::GracePeriod {
                        grace,
                        pre_stop: *pre_stop,
                    },
                    None => {
                        return Err(invalid(format!(
                            "{variable}={value:?} is not a number of seconds"
                        )));
                    }
                },
                Err(std::env::VarError::NotPresent) => Settled::Fixed(*fallback),
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(invalid(format!("{variable} is not unicode")));
                }
            },
        };
        if let Settled::GracePeriod { grace, pre_stop } = settled
            && pre_stop >= grace
        {
            return Err(invalid(format!(
                "pre_stop ({pre_stop:?}) leaves nothing of the grace period ({grace:?})"
            )));
        }
        Ok(settled)
    }
}

/// The name a pool has unless given one.
pub(crate) const DEFAULT_NAME: &str = "default";

/// The settings a pool starts with.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Tells this pool from others in the process: its metrics' `pool` label, its log line at
    /// start.
    pub(crate) name: String,
    pub(crate) workers: usize,
    pub(crate) queue_capacity: usize,
    pub(crate) deadline: Deadline,
    pub(crate) cancel_grace: Duration,
    pub(crate) journal_dir: Option<PathBuf>,
    pub(crate) max_record_bytes: usize,
    pub(crate) shutdown_token: Option<CancellationToken>,
    pub(crate) durability: Durability,
    pub(crate) segment_bytes: u64,
    /// Whether the on-shutdown mode keeps a spill reserve.
    pub(crate) spill_reserve: bool,
    /// Whether `build` catches SIGTERM and SIGINT before recovery, and the pool listens.
    pub(crate) catch_signals: bool,
    /// How the journal writes its files: the real calls, or a test's faulty ones.
    pub(crate) file_ops: journal::Ops,
    /// A store shared with other pools (PostgreSQL), if one is set.
    pub(crate) remote: Option<Arc<dyn Connect>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: DEFAULT_NAME.to_owned(),
            workers: std::thread::available_parallelism().map_or(4, usize::from),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            deadline: Deadline::default(),
            cancel_grace: DEFAULT_CANCEL_GRACE,
            journal_dir: None,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            shutdown_token: None,
            durability: Durability::on_shutdown(),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            spill_reserve: true,
            catch_signals: false,
            file_ops: journal::os(),
            remote: None,
        }
    }
}

impl Config {
    /// Checks every setting; returns the journal directory and the settled deadline.
    pub(crate) fn check(&self) -> Result<(PathBuf, Settled), StartError> {
        let invalid = |setting: &'static str, reason: String| {
            Err(StartError::InvalidConfig { setting, reason })
        };
        if self.name.is_empty() {
            return invalid("name", "must not be empty".into());
        }
        if self.workers == 0 {
            return invalid("workers", "must be at least 1".into());
        }
        if self.queue_capacity == 0 {
            return invalid("queue_capacity", "must be at least 1".into());
        }
        let smallest = journal::task_record_len(2, 0);
        if !(smallest..=MAX_RECORD_BYTES_LIMIT).contains(&self.max_record_bytes) {
            return invalid(
                "max_record_bytes",
                format!("must be between {smallest} and {MAX_RECORD_BYTES_LIMIT}"),
            );
        }
        // A segment must hold its header and at least one record.
        let least = (journal::SEGMENT_HEADER_LEN + journal::task_record_len(2, 0)) as u64;
        if self.segment_bytes < least {
            return invalid(
                "segment_bytes",
                format!("must be at least {least} (a segment's header and one record)"),
            );
        }
        if let Some(remote) = &self.remote {
            remote.check()?;
        }
        if self.remote.is_some()
            && let Some(sync) = self.durability.sync_policy()
            && sync != SyncPolicy::Always
        {
            // With the store, write-ahead means committed in PostgreSQL before `submit`
            // returns; how durable a commit is, the server's settings say.
            return invalid(
                "durability",
                format!(
                    "with the PostgreSQL store, write-ahead takes SyncPolicy::Always only (a task \
                     is committed before submit returns), not {sync:?}; to relax the commit, set \
                     synchronous_commit = off on the database role instead"
                ),
            );
        }
        let Some(dir) = self.journal_dir.clone() else {
            return invalid("journal_dir", "is required".into());
        };
        Ok((dir, self.deadline.settle()?))
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

    #[test]
    fn each_bad_setting_is_named() {
        let dir = Some(PathBuf::from("/nonexistent"));
        let cases: [(&str, Config); 6] = [
            (
                "name",
                Config {
                    name: String::new(),
                    journal_dir: dir.clone(),
                    ..Config::default()
                },
            ),
            (
                "segment_bytes",
                Config {
                    segment_bytes: 0,
                    journal_dir: dir.clone(),
                    ..Config::default()
                },
            ),
            (
                "workers",
                Config {
                    workers: 0,
                    journal_dir: dir.clone(),
                    ..Config::default()
                },
            ),
            (
                "queue_capacity",
                Config {
                    queue_capacity: 0,
                    journal_dir: dir.clone(),
                    ..Config::default()
                },
            ),
            (
                "max_record_bytes",
                Config {
                    max_record_bytes: 1,
                    journal_dir: dir.clone(),
                    ..Config::default()
                },
            ),
            ("journal_dir", Config::default()),
        ];
        for (name, config) in cases {
            match config.check() {
                Err(StartError::InvalidConfig { setting, .. }) => assert_eq!(setting, name),
                other => panic!("{name}: {other:?}"),
            }
        }
    }
}
