//! The pool: a handle over shared parts, each in its own file.
//!
//! One task's path, and the file for each step:
//!
//! | step | file |
//! | --- | --- |
//! | `submit`: the size check, a fresh id, the write-ahead record | [`intake`](self::intake) |
//! | waiting for a worker (new tasks, replay backlog, retries waiting for their time) | [`queue`](self::queue) |
//! | a worker runs the handler | [`worker`](self::worker) |
//! | the outcome: ack, retry, dead letter, interruption | [`outcome`](self::outcome) |
//! | the journal, as the pool sees it | [`store`](self::store) |
//! | write-ahead parts: group commit and live index | [`write_ahead`](self::write_ahead) |
//! | the background: flusher, due retries, deletion, compaction, interval sync | [`upkeep`](self::upkeep) |
//! | start and recovery; shutdown and its report | [`start`](self::start), [`drain`](self::drain) |
//!
//! Two layers, so that no module imports one that imports it back: the parts (`config`,
//! `job`, `queue`, `store`, `live`, `write_ahead`, `shutdown`, and `worker` with its narrow
//! `Host` interface) know nothing of each other's owner; `shared` holds them together; the
//! modules above it (`intake`, `outcome`, `upkeep`, `drain`, `start`, `handle`) work on
//! `Shared<T>`.
//!
//! Every background task has one owner: the workers are in `Shared::workers`, the flusher
//! and the upkeep task in `Shared::background`; the shutdown sequence stops them in turn.

mod claims;
mod config;
mod drain;
mod handle;
mod intake;
mod job;
mod keys;
mod live;
mod lock;
mod outcome;
mod queue;
pub(crate) mod remote;
mod reserve;
mod shared;
mod shutdown;
mod start;
mod store;
mod task_builder;
#[cfg(feature = "postgres")]
mod transactional;
mod upkeep;
mod waiting;
mod worker;
mod write_ahead;

pub(crate) use self::config::Config;
pub use self::config::{
    DEFAULT_CANCEL_GRACE, DEFAULT_DRAIN_DEADLINE, DEFAULT_MAX_RECORD_BYTES, DEFAULT_QUEUE_CAPACITY,
    DEFAULT_SEGMENT_BYTES, Deadline, MAX_RECORD_BYTES_LIMIT,
};
pub use self::handle::{Pool, WeakPool};
pub use self::start::Runner;
pub(crate) use self::start::build;
pub use self::task_builder::TaskBuilder;
#[cfg(feature = "postgres")]
pub use self::transactional::InTransaction;
