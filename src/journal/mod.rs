//! The journal: one locked directory of checksummed, append-only segment files.
//!
//! A directory holds:
//!
//! - `LOCK`: held with an exclusive `File::try_lock` for the pool's whole life; it also stores
//!   the run counter that makes task ids unique across runs;
//! - `NNNNNNNNNNNNNNNNNNNN.seg`: live segments (task and ack records), numbered in write order;
//! - `dead-NNNNNNNNNNNNNNNNNNNN.seg`: dead-letter segments;
//! - `damaged/`: copies of segments found damaged at recovery, kept for inspection.
//!
//! Segments from earlier runs are read at start and kept until what replaces them is durable:
//! until each of their tasks is acked, or the run's spill is fsynced.
//!
//! The public functions here look into a journal directory without starting a pool: list its
//! live tasks and dead letters ([`inspect`]), verify every record ([`verify`]), count
//! ([`stats`]), and move dead letters back to the live journal ([`requeue`]). The `drainpool`
//! command-line tool (the `cli` feature) is built on them.

// Inside the crate, the pool speaks to the journal in typed records; the payload is opaque bytes
// here, and only `format.rs` knows frames, kinds and flags.
pub(crate) use self::commit::{ACK_LINGER, Batch, Commit, Copies, InBatch, Placement};
pub(crate) use self::fs::{Ops, os};
pub(crate) use self::handle::{Journal, Sealed, SpillSource};
pub use self::inspect::{
    Contents, JournaledTask, Requeue, RequeueError, Requeued, Stats, Verification, inspect,
    requeue, stats, verify,
};
pub(crate) use self::record::{
    MAX_KEY_LEN, MAX_PRIORITY, Recovered, TaskOptions, TaskRecord, TaskState,
};
pub(crate) use self::recover::Recovery;
pub(crate) use self::reserve::Reserve;

/// The largest record the format frames: 64 MiB.
pub(crate) const MAX_RECORD_BYTES: usize = format::MAX_RECORD_LIMIT;
/// The length of a segment's header.
pub(crate) const SEGMENT_HEADER_LEN: usize = format::HEADER_LEN;

/// The encoded length of a task record whose payload and last error take these many bytes.
pub(crate) const fn task_record_len(payload_len: usize, error_len: usize) -> usize {
    format::task_record_len(payload_len, error_len)
}

/// The bytes a task's options add to its record (0 for none, or all at their defaults).
pub(crate) fn options_bytes(options: Option<&TaskOptions>) -> usize {
    format::options_bytes(options)
}

pub(crate) use self::format::truncate_utf8;

mod commit;
mod dir;
#[cfg(test)]
pub(crate) mod faults;
mod format;
pub(crate) mod fs;
// The fuzz targets' way to the crate-private decoders; `cargo fuzz` builds with `--cfg fuzzing`.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
mod handle;
mod inspect;
mod reader;
mod record;
mod recover;
mod reserve;
mod writer;
