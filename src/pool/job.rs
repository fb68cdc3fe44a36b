//! A task as the pool holds it between intake and its outcome.

use std::sync::Arc;

use crate::journal::TaskState;
use crate::task::TaskId;

/// A task waiting for, or held by, a worker.
pub(crate) struct Job<T> {
    pub(crate) id: TaskId,
    pub(crate) state: TaskState,
    pub(crate) last_error: Option<Box<str>>,
    pub(crate) payload: Arc<T>,
    /// Whether a record of this task is in the journal (so finishing it must append an ack).
    pub(crate) journaled: bool,
    /// Whether it was replayed from an earlier run (whose segments wait for it).
    pub(crate) replayed: bool,
}

impl<T> Job<T> {
    /// Marks the job interrupted at the deadline: its attempt is not counted.
    pub(crate) fn interrupted(mut self) -> Self {
        self.state.interrupted = true;
        self.state.interruptions = self.state.interruptions.saturating_add(1);
        self
    }

    /// Marks a failed attempt: counted, and no longer interrupted.
    pub(crate) fn failed(&mut self) {
        self.state.attempts = self.state.attempts.saturating_add(1);
        self.state.interrupted = false;
        self.state.interruptions = 0;
    }
}

/// Why a task is held back for the final spill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    /// Still running at the hard stop (or gave up after its token fired).
    Interrupted,
    /// Failed, and its dead letter could not be written: it stays a live task.
    Retained,
}
