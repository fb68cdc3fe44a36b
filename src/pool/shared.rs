//! `Shared<T>`: the parts a pool is made of, held together. Each part owns one concern and
//! knows nothing of the others; the modules that need several parts at once (intake,
//! outcomes, upkeep, the drain, start, the handles) work on this struct from above it.

use std::sync::atomic::AtomicU64;

use tokio_util::task::TaskTracker;

use super::config::Config;
use super::job::Ids;
use super::keys::Keys;
use super::queue::Queue;
use super::remote::Claims;
use super::reserve::SpillReserve;
use super::shutdown::Shutdown;
use super::store::Store;
use super::write_ahead::WriteAhead;
use crate::codec::Encoding;
use crate::policy::{Jitter, Policy};
use crate::report::{Counters, RecoveryReport};

/// What the handles, the workers and the background tasks share. Each part owns one concern;
/// this struct only holds them together.
pub(crate) struct Shared<T> {
    pub(crate) config: Config,
    pub(crate) codec: Encoding<T>,
    pub(crate) policy: Policy<T>,
    pub(crate) jitter: Jitter,
    pub(crate) ids: Ids,
    /// The unique keys of the tasks this pool holds.
    pub(crate) keys: Keys,
    pub(crate) queue: Queue<T>,
    pub(crate) store: Store,
    /// The write-ahead parts: `None` in the on-shutdown mode.
    pub(crate) write_ahead: Option<WriteAhead>,
    /// The shared store's side (PostgreSQL): `None` with the file journal alone.
    pub(crate) remote: Option<Claims>,
    /// The spill reserve: on-shutdown mode, unless turned off.
    pub(crate) reserve: Option<SpillReserve>,
    pub(crate) shutdown: Shutdown<T>,
    pub(crate) counters: Counters,
    /// The gauges and histograms (the counters are in `counters`).
    #[cfg(feature = "metrics")]
    pub(crate) metrics: crate::metrics::Metrics,
    pub(crate) recovery: RecoveryReport,
    /// Replayed tasks not finished yet (on-shutdown mode: the earlier runs' segments go when
    /// this reaches zero).
    pub(crate) replay_outstanding: AtomicU64,
    /// The workers: the shutdown waits for them.
    pub(crate) workers: TaskTracker,
    /// The supervisor (which runs the shutdown), the flusher and the upkeep task; the
    /// shutdown stops the last two explicitly.
    pub(crate) background: TaskTracker,
}
