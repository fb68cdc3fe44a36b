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
//! [`Durability::WriteAhead`] every task is journaled before `submit` returns, which survives
//! SIGKILL too (and power loss, with [`SyncPolicy::Always`]). Signals are caught only when asked:
//! [`Pool::run_until_signal`], or [`shutdown_signal`] for a service that owns its main loop.
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
pub mod error;
#[cfg(test)]
mod fault_tests;
pub mod journal;
mod live;
mod policy;
mod pool;
mod report;
mod signal;
mod task;
mod worker;

pub use builder::{
    Builder, DEFAULT_CANCEL_GRACE, DEFAULT_DRAIN_DEADLINE, DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_QUEUE_CAPACITY, DEFAULT_SEGMENT_BYTES, MAX_RECORD_BYTES_LIMIT,
};
pub use error::{JournalError, RunError, ShutdownError, StartError, SubmitError};
pub use policy::{
    DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_CAP, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_INTERRUPTIONS,
    DeadlineAction, Durability, Interruption, Permanent, SyncPolicy,
};
pub use pool::Pool;
pub use report::{Budget, Damage, RecoveryReport, ShutdownReport, State, Stats};
pub use signal::{ShutdownSignal, Signal, shutdown_signal};
pub use task::ParseTaskIdError;
pub use task::{Task, TaskId};

/// The error type a handler may return: anything that converts into a boxed error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
