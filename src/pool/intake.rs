//! Intake: `submit` and `try_submit`. The size check, a fresh id, and in write-ahead mode the
//! task's record, durable before the task is queued.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use super::job::Job;
use super::queue::NoRoom;
use super::shared::Shared;
use crate::codec::Refused;
use crate::error::SubmitError;
use crate::journal::{self, TaskRecord, TaskState};
use crate::task::TaskId;

impl<T: Send + Sync + 'static> Shared<T> {
    pub(crate) async fn submit(&self, payload: T) -> Result<TaskId, SubmitError<T>> {
        if self.queue.is_closed() {
            return Err(SubmitError::ShuttingDown(payload));
        }
        let (payload, size) = self.checked(payload)?;
        let permit = match self.queue.reserve().await {
            Ok(permit) => permit,
            Err(NoRoom::Closed | NoRoom::Full) => return Err(SubmitError::ShuttingDown(payload)),
        };
        if self.queue.is_closed() {
            return Err(SubmitError::ShuttingDown(payload));
        }
        if self.write_ahead.is_some() {
            return self.write_ahead(permit, payload, size).await;
        }
        let payload = self.reserve_room(payload, size)?;
        let (id, state) = self.ids.fresh();
        Ok(self.accept(permit, id, state, payload, size, false))
    }

    pub(crate) fn try_submit(&self, payload: T) -> Result<TaskId, SubmitError<T>> {
        if self.queue.is_closed() {
            return Err(SubmitError::ShuttingDown(payload));
        }
        let (payload, size) = self.checked(payload)?;
        if self.write_ahead.is_some() {
            // Journaling waits for the disk; only `submit` can do that.
            return Err(SubmitError::WouldBlock(payload));
        }
        match self.queue.try_reserve() {
            Ok(permit) => {
                let payload = self.reserve_room(payload, size)?;
                let (id, state) = self.ids.fresh();
                Ok(self.accept(permit, id, state, payload, size, false))
            }
            Err(NoRoom::Full) => Err(SubmitError::Full(payload)),
            Err(NoRoom::Closed) => Err(SubmitError::ShuttingDown(payload)),
        }
    }

    /// Write-ahead: journals the task (and waits for the fsync the policy asks for) before
    /// queueing it.
    async fn write_ahead(
        &self,
        permit: mpsc::Permit<'_, Job<T>>,
        payload: T,
        size: usize,
    ) -> Result<TaskId, SubmitError<T>> {
        let (id, state) = self.ids.fresh();
        let Some(write_ahead) = &self.write_ahead else {
            return Ok(self.accept(permit, id, state, payload, size, false));
        };
        let mut bytes = Vec::with_capacity(size);
        if let Err(source) = self.codec.encode(&payload, &mut bytes) {
            return Err(SubmitError::Unserializable {
                task: payload,
                source,
            });
        }
        let record = TaskRecord {
            id,
            state,
            last_error: Cow::Borrowed(""),
            payload: &bytes,
        };
        let seq = write_ahead.push_task(&record, false);
        drop(bytes);
        if let Err(error) = write_ahead.wait(seq).await {
            return Err(SubmitError::Journal {
                task: payload,
                error,
            });
        }
        Ok(self.accept(permit, id, state, payload, size, true))
    }

    /// Makes room in the spill reserve for a task of `size` encoded bytes, or refuses it.
    fn reserve_room(&self, payload: T, size: usize) -> Result<T, SubmitError<T>> {
        match &self.reserve {
            Some(reserve) => match reserve.admit(reserved_bytes(size)) {
                Ok(()) => Ok(payload),
                Err(error) => Err(SubmitError::JournalFull {
                    task: payload,
                    error,
                }),
            },
            None => Ok(payload),
        }
    }

    /// The payload back with its encoded size, or the refusal.
    fn checked(&self, payload: T) -> Result<(T, usize), SubmitError<T>> {
        let limit = self.config.max_record_bytes;
        let room = limit.saturating_sub(journal::task_record_len(0, 0));
        match self.codec.len_within(&payload, room) {
            Ok(size) => Ok((payload, size)),
            Err(Refused::TooLarge) => Err(SubmitError::RecordTooLarge {
                task: payload,
                limit,
            }),
            Err(Refused::Failed(source)) => Err(SubmitError::Unserializable {
                task: payload,
                source,
            }),
        }
    }

    /// Queues an accepted task (`journaled`: its record is in the journal) and counts it.
    fn accept(
        &self,
        permit: mpsc::Permit<'_, Job<T>>,
        id: TaskId,
        state: TaskState,
        payload: T,
        size: usize,
        journaled: bool,
    ) -> TaskId {
        permit.send(Job {
            id,
            state,
            last_error: None,
            payload: Arc::new(payload),
            journaled,
            replayed: false,
            reserved: if self.reserve.is_some() {
                reserved_bytes(size) as u32
            } else {
                0
            },
        });
        self.counters.submitted.fetch_add(1, Ordering::Relaxed);
        self.ids.accepted(size);
        id
    }
}

/// The spill reserve a task of `size` encoded payload bytes needs: its record's size.
fn reserved_bytes(size: usize) -> u64 {
    journal::task_record_len(size, 0) as u64
}
