//! `TaskBuilder`: one submit with options (priority, run at, time to live, unique key, retry
//! limit), from [`Pool::task`](crate::Pool::task).

use std::fmt;
use std::time::{Duration, SystemTime};

use super::intake::Extras;
use super::job::{epoch_ms, ms_from_now};
use super::shared::Shared;
use crate::error::SubmitError;
use crate::journal::{MAX_KEY_LEN, MAX_PRIORITY, TaskOptions, truncate_utf8};
use crate::task::TaskId;

/// One task and its options, made by [`Pool::task`](crate::Pool::task) and submitted by
/// [`submit`](Self::submit) (or [`try_submit`](Self::try_submit)). Every option is journaled
/// with the task (file journal and PostgreSQL store alike), so it survives a spill, a reload
/// and, in write-ahead mode, a SIGKILL.
#[must_use = "a task builder does nothing until it is submitted"]
pub struct TaskBuilder<'a, T> {
    shared: &'a Shared<T>,
    payload: T,
    options: TaskOptions,
    /// When it may run: ms since the Unix epoch (0: at once).
    not_before_ms: u64,
}

impl<T> fmt::Debug for TaskBuilder<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskBuilder")
            .field("priority", &self.options.priority)
            .field("max_attempts", &self.options.max_attempts)
            .field("expires_ms", &self.options.expires_ms)
            .field("unique_key", &self.options.key)
            .field("not_before_ms", &self.not_before_ms)
            .finish_non_exhaustive()
    }
}

impl<'a, T: Send + Sync + 'static> TaskBuilder<'a, T> {
    pub(crate) fn new(shared: &'a Shared<T>, payload: T) -> Self {
        Self {
            shared,
            payload,
            options: TaskOptions::default(),
            not_before_ms: 0,
        }
    }

    /// Its priority: 0 (the default, lowest) to 7; higher levels are taken as 7. Among new
    /// tasks a higher level runs first, and tasks of one level run in the order they were
    /// submitted. No task starves: while several levels wait, every 16th task started is the
    /// oldest waiting one, so a task waits at most 16 × (k + 1) starts of new tasks, `k` the
    /// new tasks accepted before it and still waiting. Replayed tasks, retries and scheduled
    /// tasks that came due run before new ones (a reload replays higher levels first).
    ///
    /// From a long queue a worker takes up to 16 new tasks at once, in this order, and starts
    /// them one by one: a task of a higher level submitted meanwhile may start after those,
    /// up to 15 per worker (and the bound above counts takes, each start at most that late).
    /// Replayed tasks, retries and scheduled tasks that came due still go first.
    pub fn priority(mut self, level: u8) -> Self {
        self.options.priority = level.min(MAX_PRIORITY);
        self
    }

    /// Runs it `delay` from now at the earliest. It waits without holding a worker or a place
    /// in the queue's capacity; a shutdown spills it with its time, and the next start waits
    /// for what is left of it. Then it runs before the new tasks.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.not_before_ms = ms_from_now(delay);
        self
    }

    /// Runs it at `at` at the earliest (the wall clock; a time past runs at once). As
    /// [`delay`](Self::delay).
    pub fn run_at(mut self, at: SystemTime) -> Self {
        self.not_before_ms = epoch_ms(at);
        self
    }

    /// No run of it starts later than `ttl` from now (a retry included). A task still waiting
    /// then is not run: it becomes a dead letter saying so, or is dropped, as
    /// [`Builder::on_expiry`](crate::Builder::on_expiry) says, and is counted in
    /// [`Counts::expired`](crate::Counts::expired). A run already started is not stopped.
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.options.expires_ms = ms_from_now(ttl).max(1);
        self
    }

    /// As [`time_to_live`](Self::time_to_live), until `at` (the wall clock).
    pub fn expires_at(mut self, at: SystemTime) -> Self {
        self.options.expires_ms = epoch_ms(at).max(1);
        self
    }

    /// While a task with the same key is queued, waiting for its time, or running in this pool
    /// (submitted in this run or replayed from the journal), this one is refused with
    /// [`SubmitError::Duplicate`], which names that task's id. The key is free again once that
    /// task completes, becomes a dead letter, is dropped or expires. Keys are at most 1,024
    /// bytes; a longer one is cut at a character boundary. With the PostgreSQL store, a task
    /// handed to the table keeps its key; the pool that claims it holds the key from then on
    /// (the table itself does not refuse duplicates).
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        let mut key: String = key.into();
        key.truncate(truncate_utf8(&key, MAX_KEY_LEN).len());
        self.options.key = (!key.is_empty()).then(|| key.into_boxed_str());
        self
    }

    /// Failed runs before it becomes a dead letter, instead of the pool's
    /// [`max_attempts`](crate::Builder::max_attempts) (0: the pool's).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.options.max_attempts = attempts;
        self
    }

    fn into_parts(self) -> (&'a Shared<T>, T, Extras) {
        let extras = Extras::new(self.options, self.not_before_ms);
        (self.shared, self.payload, extras)
    }

    /// Queues the task as [`Pool::submit`](crate::Pool::submit) does (a task for later needs
    /// no room in the queue). Returns its id.
    ///
    /// # Errors
    ///
    /// As [`Pool::submit`](crate::Pool::submit), plus [`SubmitError::Duplicate`] for a unique
    /// key held by another task. The options count in the record's size.
    pub async fn submit(self) -> Result<TaskId, SubmitError<T>> {
        let (shared, payload, extras) = self.into_parts();
        shared.submit(payload, None, extras).await
    }

    /// Queues the task if there is room now, as [`Pool::try_submit`](crate::Pool::try_submit)
    /// does. Returns its id.
    ///
    /// # Errors
    ///
    /// As [`Pool::try_submit`](crate::Pool::try_submit), plus [`SubmitError::Duplicate`].
    pub fn try_submit(self) -> Result<TaskId, SubmitError<T>> {
        let (shared, payload, extras) = self.into_parts();
        shared.try_submit(payload, extras)
    }
}
