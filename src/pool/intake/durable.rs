//! Write-ahead intake: a new task made durable (its record journaled and synced as the policy
//! asks, or its row committed to the shared store) before it is accepted; its unique key is
//! let go if that fails or the submit is dropped meanwhile.

use std::borrow::Cow;
use std::sync::Arc;

use super::Extras;
use crate::error::SubmitError;
use crate::journal::{TaskOptions, TaskRecord, TaskState};
use crate::pool::job::Job;
use crate::pool::queue::Slot;
use crate::pool::remote::Lease;
use crate::pool::shared::Shared;
use crate::pool::write_ahead::WriteAhead;
use crate::task::TaskId;

impl<T: Send + Sync + 'static> Shared<T> {
    /// Write-ahead: journals the task (and waits for the fsync the policy asks for), or
    /// commits its row to the shared store, before queueing it.
    pub(super) async fn write_ahead(
        &self,
        slot: Slot<'_, T>,
        payload: T,
        size: usize,
        extras: Extras,
    ) -> Result<TaskId, SubmitError<T>> {
        let (payload, (id, state)) = super::kept(self.fresh(&extras), payload)?;
        let (payload, durable) = self.write_first(id, state, payload, size, &extras).await?;
        Ok(self.accept(slot, id, state, payload, size, extras, durable))
    }

    /// Write-ahead: makes a new task durable, in the file journal or (with the shared store)
    /// as a row leased to this pool. Its unique key (taken) is let go if that fails.
    pub(super) async fn write_first(
        &self,
        id: TaskId,
        state: TaskState,
        payload: T,
        size: usize,
        extras: &Extras,
    ) -> Result<(T, Durable), SubmitError<T>> {
        let options = extras.options();
        // Let go if this fails, or if the submit is dropped while it waits.
        let key = KeyGuard {
            keys: &self.keys,
            key: extras.key(),
            id,
        };
        let made = if let Some((claims, commits)) = self.store_commits() {
            self.commit_first(claims, commits, id, state, payload, size, options)
                .await
                .map(|(payload, lease)| {
                    let durable = Durable {
                        journaled: None,
                        lease: Some(lease),
                    };
                    (payload, durable)
                })
        } else if let Some(write_ahead) = &self.write_ahead {
            self.journal_first(write_ahead, id, state, payload, size, options)
                .await
                .map(|(payload, bytes)| {
                    let durable = Durable {
                        journaled: Some(bytes),
                        lease: None,
                    };
                    (payload, durable)
                })
        } else {
            Ok((payload, Durable::default()))
        };
        if made.is_ok() {
            std::mem::forget(key);
        }
        made
    }

    /// Write-ahead: journals a new task's record and waits for its batch (and the fsync the
    /// policy asks for); hands the payload back with its encoding, or refuses the task.
    async fn journal_first(
        &self,
        write_ahead: &WriteAhead,
        id: TaskId,
        state: TaskState,
        payload: T,
        size: usize,
        options: Option<&TaskOptions>,
    ) -> Result<(T, Vec<u8>), SubmitError<T>> {
        let (payload, bytes) = self.encoded(payload, size)?;
        let record = TaskRecord {
            id,
            state,
            last_error: Cow::Borrowed(""),
            payload: &bytes,
            options: options.map(Cow::Borrowed),
        };
        match write_ahead.push_new(&record).handled().await {
            Ok(()) => Ok((payload, bytes)),
            Err(error) => Err(SubmitError::Journal {
                task: payload,
                error,
            }),
        }
    }

    /// The payload and its encoding (at most `size` bytes, as checked at submit), or the
    /// refusal.
    pub(crate) fn encoded(&self, payload: T, size: usize) -> Result<(T, Vec<u8>), SubmitError<T>> {
        match self.codec.to_bytes(&payload, size) {
            Ok(bytes) => Ok((payload, bytes)),
            Err(source) => Err(SubmitError::Unserializable {
                task: payload,
                source,
            }),
        }
    }

    /// The job of a task `write_first` made durable (journaled, or leased in the store), or
    /// of one that needed nothing made durable.
    pub(super) fn durable_job(
        &self,
        id: TaskId,
        state: TaskState,
        payload: T,
        size: usize,
        extras: Extras,
        durable: Durable,
    ) -> Job<T> {
        let journaled = durable.journaled.is_some();
        let mut job = self
            .queued((id, state), payload, size, extras, journaled)
            .into_job_in(state);
        job.lease = durable.lease;
        job
    }
}

/// A unique key taken for a task being made durable: let go when dropped (the task refused,
/// or its submit dropped while it waited); forgotten once the task is accepted.
struct KeyGuard<'a> {
    keys: &'a crate::pool::keys::Keys,
    key: Option<&'a str>,
    id: TaskId,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.keys.release(key, self.id);
        }
    }
}

/// How a new task was made durable before it was queued: its journal record's payload bytes
/// (the file journal's write-ahead mode), or its row's lease (the shared store's); neither in
/// the on-shutdown mode.
#[derive(Default)]
pub(super) struct Durable {
    pub(super) journaled: Option<Vec<u8>>,
    pub(super) lease: Option<Arc<Lease>>,
}
