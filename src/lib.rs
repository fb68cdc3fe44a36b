//! A tokio work pool whose background work survives restarts.
//!
//! A [`Pool`] runs your handler over tasks you [`submit`](Pool::submit). When the service is
//! told to stop, the pool closes intake, spills every queued task to an append-only,
//! checksummed journal at once, lets in-flight tasks run to a deadline, journals those still
//! running as interrupted, and fsyncs. The next start on the same journal directory replays
//! every journaled task before any new one. Nothing accepted is lost: a task is forgotten only
//! when its handler returns `Ok` (or is set aside as a dead letter after its retries).
//!
//! By default tasks reach the disk at shutdown, which survives SIGTERM but not SIGKILL; with
//! [`Durability::write_ahead`] every task is journaled before `submit` returns, which survives
//! SIGKILL too (and power loss, with [`SyncPolicy::Always`]). Signals are caught only when asked:
//! [`Pool::run_until_signal`], or [`shutdown_signal`] for a service that owns its main loop.
//!
//! A task that fails is retried with backoff, then kept as a durable dead letter; one still
//! running at the drain deadline is requeued, dropped or dead-lettered as
//! [`DeadlineAction`] says. Payloads are JSON by default; any [`Codec`] can replace it.
//!
//! [`Pool::task`] submits one task with options, journaled with it: a priority, a time to run
//! at, a time to live, a unique key (a duplicate is refused while the first is held), its own
//! retry limit ([`TaskBuilder`]).
//!
//! With the `metrics` feature, a pool records counters, gauges and histograms through the
//! [`metrics`](https://docs.rs/metrics) facade, labelled with its [`Builder::name`]; the README
//! lists them.
//!
//! [`Builder::start`] starts a pool in one step. [`Builder::build`] starts it in two: the
//! [`Pool`] handle first, then [`Runner::run`] with a handler that may hold a [`WeakPool`] of
//! its own pool.
//!
//! ```no_run
//! use std::time::Duration;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct SendEmail { to: String }
//!
//! # async fn send(_: &SendEmail) -> std::io::Result<()> { Ok(()) }
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = drainpool::Pool::builder()
//!     .workers(8)
//!     .queue_capacity(10_000)
//!     .drain_deadline(Duration::from_secs(25))
//!     .journal_dir("/var/lib/myservice/journal")
//!     .start(|task: drainpool::Task<SendEmail>| async move { send(task.payload()).await })
//!     .await?; // recovers the journal; its tasks run first
//!
//! pool.submit(SendEmail { to: "a@example.com".into() }).await?;
//! let report = pool.shutdown().await?; // or trigger it with your own CancellationToken
//! assert_eq!(report.unsaved, 0);
//! # Ok(()) }
//! ```
//!
//! See the crate's README for what each durability mode survives, and `ARCHITECTURE.md` for
//! the lifecycle and the on-disk format.

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub,
    clippy::print_stdout,
    clippy::print_stderr
)]

mod builder;
mod codec;
pub mod error;
#[cfg(test)]
mod fault_tests;
pub mod journal;
#[cfg(feature = "metrics")]
mod metrics;
mod policy;
mod pool;
#[cfg(feature = "postgres")]
pub mod postgres;
mod report;
mod signal;
mod task;
#[cfg(test)]
mod test_rng;

pub use builder::Builder;
pub use codec::{Codec, Json};
pub use error::{
    BoxError, FileKind, JournalError, RunError, ShutdownError, StartError, SubmitError,
};
pub use policy::{
    DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_CAP, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_INTERRUPTIONS,
    DeadlineAction, Durability, Expiry, Interruption, Permanent, SyncPolicy,
};
pub use pool::{
    DEFAULT_CANCEL_GRACE, DEFAULT_DRAIN_DEADLINE, DEFAULT_MAX_RECORD_BYTES, DEFAULT_QUEUE_CAPACITY,
    DEFAULT_SEGMENT_BYTES, Deadline, MAX_RECORD_BYTES_LIMIT, Pool, Runner, TaskBuilder, WeakPool,
};
#[cfg(feature = "postgres")]
pub use postgres::{PostgresError, PostgresStore};
pub use report::{
    Budget, Counts, Damage, Health, RecoveryReport, ShutdownReport, Skipped, State, StateWatch,
    Stats,
};
pub use signal::{ShutdownSignal, Signal, catch_signals, shutdown_signal};
pub use task::{ParseTaskIdError, Task, TaskId};
/// The token a pool's shutdown is triggered with (tokio-util's, re-exported so that a user
/// need not depend on the same tokio-util version).
pub use tokio_util::sync::CancellationToken;

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
