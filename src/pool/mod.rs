//! The pool: a handle over shared parts, each in its own file.
//!
//! One task's path, and the file for each step:
//!
//! | step | file |
//! | --- | --- |
//! | `submit`: the size check, a fresh id, the write-ahead record | [`intake`](self::intake) |
//! | waiting for a worker (channel, replay backlog, retries waiting for their time) | [`queue`](self::queue) |
//! | a worker runs the handler | [`worker`](self::worker) |
//! | the outcome: ack, retry, dead letter, interruption | [`outcome`](self::outcome) |
//! | the journal, as the pool sees it | [`store`](self::store) |
//! | write-ahead upkeep: flusher, deletion, compaction, interval sync | [`upkeep`](self::upkeep) |
//! | start and recovery; shutdown and its report | [`start`](self::start), [`shutdown`](self::shutdown) |
//!
//! Every background task has one owner: the workers are in `Shared::workers`, the flusher
//! and the upkeep task in `Shared::background`; the shutdown sequence stops them in turn.

mod config;
mod handle;
mod intake;
mod job;
mod live;
mod outcome;
mod queue;
mod shutdown;
mod start;
mod store;
mod upkeep;
mod worker;

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio_util::task::TaskTracker;

use self::intake::Intake;
use self::queue::Queue;
use self::shutdown::Shutdown;
use self::store::Store;
use self::upkeep::WriteAhead;
use crate::codec::Encoding;
use crate::policy::{Jitter, Policy};
use crate::report::{Counters, RecoveryReport};

pub(crate) use self::config::Config;
pub use self::config::Deadline;
pub use self::config::{
    DEFAULT_CANCEL_GRACE, DEFAULT_DRAIN_DEADLINE, DEFAULT_MAX_RECORD_BYTES, DEFAULT_QUEUE_CAPACITY,
    DEFAULT_SEGMENT_BYTES, MAX_RECORD_BYTES_LIMIT,
};
pub use self::handle::{Pool, WeakPool};
pub use self::start::Runner;
pub(crate) use self::start::build;

/// What the handles, the workers and the background tasks share. Each part owns one concern;
/// this struct only holds them together.
pub(crate) struct Shared<T> {
    config: Config,
    codec: Encoding<T>,
    policy: Policy<T>,
    jitter: Jitter,
    intake: Intake,
    queue: Queue<T>,
    store: Store,
    /// The write-ahead parts: `None` in the on-shutdown mode.
    write_ahead: Option<WriteAhead>,
    shutdown: Shutdown<T>,
    counters: Counters,
    recovery: RecoveryReport,
    /// Replayed tasks not finished yet (on-shutdown mode: the earlier runs' segments go when
    /// this reaches zero).
    replay_outstanding: AtomicU64,
    /// The workers: the shutdown waits for them.
    workers: TaskTracker,
    /// The flusher and the upkeep task: the shutdown stops them explicitly.
    background: TaskTracker,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while these locks are held; if something did, the data is still whole.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The wall clock, in milliseconds since the Unix epoch (what the journal stores).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
