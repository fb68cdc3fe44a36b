//! What a handler receives.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

/// The identity of a task, unique within the life of its journal directory.
///
/// A task keeps its id when it is spilled and reloaded, so a handler can use it as an
/// idempotency key: a task interrupted at the drain deadline runs again with the same id.
///
/// The id is made of the pool run that accepted the task (a counter stored in the journal
/// directory and raised at every start) and a sequence number within that run. Ids order tasks
/// by the time they were accepted. It displays as `run-seq`, e.g. `7-1042`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId {
    run: u64,
    seq: u64,
}

impl TaskId {
    pub(crate) const fn new(run: u64, seq: u64) -> Self {
        Self { run, seq }
    }

    /// The pool run that accepted the task.
    #[must_use]
    pub const fn run(self) -> u64 {
        self.run
    }

    /// The task's sequence number within its run.
    #[must_use]
    pub const fn seq(self) -> u64 {
        self.seq
    }

    /// The id as one number: the run in the high 64 bits, the sequence in the low 64.
    #[must_use]
    pub const fn as_u128(self) -> u128 {
        ((self.run as u128) << 64) | self.seq as u128
    }

    /// The id from [`as_u128`](Self::as_u128)'s number.
    pub const fn from_u128(value: u128) -> Self {
        Self {
            run: (value >> 64) as u64,
            seq: value as u64,
        }
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.run, self.seq)
    }
}

/// A string was not a task id of the form `run-seq`, e.g. `7-1042`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid task id {0:?}: expected run-seq, two decimal numbers such as 7-1042")]
pub struct ParseTaskIdError(String);

impl FromStr for TaskId {
    type Err = ParseTaskIdError;

    /// Parses the form [`Display`](fmt::Display) writes: `run-seq`, e.g. `7-1042`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = || ParseTaskIdError(s.to_owned());
        let (run, seq) = s.split_once('-').ok_or_else(error)?;
        let number = |part: &str| {
            // `u64::from_str` takes a leading `+`; an id never has one.
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(error());
            }
            part.parse::<u64>().map_err(|_| error())
        };
        Ok(Self::new(number(run)?, number(seq)?))
    }
}

/// One run of a task, as the handler sees it.
///
/// The handler gets the payload, the task's id, which attempt this is, and a cancellation token
/// that fires when the drain deadline comes. A task is done only when its handler returns `Ok`.
pub struct Task<T> {
    pub(crate) id: TaskId,
    pub(crate) attempt: u32,
    pub(crate) interrupted: bool,
    pub(crate) enqueued_at: SystemTime,
    pub(crate) payload: Arc<T>,
    /// Shared, not cloned: cloning a `CancellationToken` takes a lock, an `Arc` does not.
    pub(crate) cancel: Arc<CancellationToken>,
}

impl<T> Task<T> {
    /// The task's id, stable across spill and reload.
    #[must_use]
    pub fn id(&self) -> TaskId {
        self.id
    }

    /// Which attempt this is, counting from 1. A run interrupted at the drain deadline does not
    /// count as an attempt.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether the task's previous run was interrupted at a drain deadline (so the handler may
    /// find its own side effects from that run half done).
    #[must_use]
    pub fn was_interrupted(&self) -> bool {
        self.interrupted
    }

    /// When the task was first accepted.
    #[must_use]
    pub fn enqueued_at(&self) -> SystemTime {
        self.enqueued_at
    }

    /// The payload.
    #[must_use]
    pub fn payload(&self) -> &T {
        &self.payload
    }

    /// The token that fires when the drain deadline comes.
    ///
    /// After it fires the handler has the pool's cancel grace to checkpoint and return; then it
    /// is dropped and the task is journaled as interrupted. A handler that returns an error
    /// after the token fired is treated as interrupted too, not as failed.
    #[must_use]
    pub fn cancellation_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Waits until the drain deadline comes. Shorthand for
    /// `task.cancellation_token().cancelled()`.
    ///
    /// # Cancel safety
    ///
    /// This method is cancel safe.
    pub fn cancelled(&self) -> impl std::future::Future<Output = ()> + Send + '_ {
        self.cancel.cancelled()
    }

    /// Whether the drain deadline has come.
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

impl<T: fmt::Debug> fmt::Debug for Task<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task")
            .field("id", &self.id)
            .field("attempt", &self.attempt)
            .field("interrupted", &self.interrupted)
            .field("payload", &self.payload)
            .field("cancelled", &self.cancel.is_cancelled())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_id_parses_back_from_its_display() {
        for id in [
            TaskId::new(0, 0),
            TaskId::new(7, 1042),
            TaskId::new(u64::MAX, u64::MAX),
        ] {
            assert_eq!(id.to_string().parse::<TaskId>(), Ok(id));
        }
    }

    #[test]
    fn a_malformed_task_id_is_refused() {
        for bad in [
            "",
            "7",
            "7-",
            "-7",
            "7-1-2",
            "+7-1",
            "7-+1",
            "a-1",
            "7 -1",
            "7-18446744073709551616",
        ] {
            let error = bad.parse::<TaskId>().unwrap_err();
            assert_eq!(error, ParseTaskIdError(bad.to_owned()), "{bad:?}");
            assert!(error.to_string().contains("run-seq"), "{error}");
        }
    }
}
