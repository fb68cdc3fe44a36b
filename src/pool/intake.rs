//! Intake: `submit` and `try_submit`. The size check, a fresh id, and in write-ahead mode the
//! task's record (or, with the shared store, its row), durable before the task is queued.

use std::borrow::Cow;
use std::sync::Arc;

use super::job::{Held, Job, Payload, task_span};
use super::queue::{NoRoom, Slot};
use super::remote::Lease;
use super::shared::Shared;
use super::worker::{Host, running_for};
use super::write_ahead::WriteAhead;
use crate::codec::Refused;
use crate::error::SubmitError;
use crate::journal::{self, TaskRecord, TaskState};
use crate::task::TaskId;

impl<T: Send + Sync + 'static> Shared<T> {
    /// `room`: how long to wait for room in the queue (`None`: as long as it takes), after
    /// which the task is refused with `Full`.
    pub(crate) async fn submit(
        &self,
        payload: T,
        room: Option<std::time::Duration>,
    ) -> Result<TaskId, SubmitError<T>> {
        if self.queue.is_closed() {
            return self.too_late(payload).await;
        }
        let (payload, size) = self.checked(payload)?;
        if self.in_own_handler() {
            return self.follow_up(payload, size).await;
        }
        let reserved = match room {
            None => self.queue.reserve().await,
            Some(wait) => tokio::time::timeout(wait, self.queue.reserve())
                .await
                .unwrap_or(Err(NoRoom::Full)),
        };
        let slot = match reserved {
            Ok(slot) => slot,
            Err(NoRoom::Full) if !self.queue.is_closed() => {
                return Err(SubmitError::Full(payload));
            }
            Err(NoRoom::Closed | NoRoom::Full) => return self.too_late(payload).await,
        };
        if self.queue.is_closed() {
            drop(slot);
            return self.too_late(payload).await;
        }
        if self.writes_ahead() {
            return self.write_ahead(slot, payload, size).await;
        }
        let payload = self.reserve_room(payload, size)?;
        let (id, state) = self.ids.fresh();
        Ok(self.accept(slot, id, state, payload, size, Durable::default()))
    }

    /// Whether every task is made durable before it is accepted: the file journal's
    /// write-ahead mode, or the shared store's.
    fn writes_ahead(&self) -> bool {
        self.write_ahead.is_some() || self.store_commits().is_some()
    }

    pub(crate) fn try_submit(&self, payload: T) -> Result<TaskId, SubmitError<T>> {
        if self.queue.is_closed() && !self.writes_ahead() && self.in_own_handler() {
            // A follow-up in the on-shutdown mode needs no wait: it goes to the spill.
            let (payload, size) = self.checked(payload)?;
            return Ok(self.hold_follow_up(payload, size, false));
        }
        if self.queue.is_closed() {
            return Err(SubmitError::ShuttingDown(payload));
        }
        let (payload, size) = self.checked(payload)?;
        if self.writes_ahead() {
            // Journaling waits for the disk (or the store); only `submit` can do that.
            return Err(SubmitError::WouldBlock(payload));
        }
        match self.queue.try_reserve() {
            Ok(slot) => {
                let payload = self.reserve_room(payload, size)?;
                let (id, state) = self.ids.fresh();
                Ok(self.accept(slot, id, state, payload, size, Durable::default()))
            }
            Err(NoRoom::Full) => Err(SubmitError::Full(payload)),
            Err(NoRoom::Closed) => Err(SubmitError::ShuttingDown(payload)),
        }
    }

    /// Write-ahead: journals the task (and waits for the fsync the policy asks for), or
    /// commits its row to the shared store, before queueing it.
    async fn write_ahead(
        &self,
        slot: Slot<'_, T>,
        payload: T,
        size: usize,
    ) -> Result<TaskId, SubmitError<T>> {
        let (id, state) = self.ids.fresh();
        let (payload, durable) = self.write_first(id, state, payload, size).await?;
        Ok(self.accept(slot, id, state, payload, size, durable))
    }

    /// Write-ahead: makes a new task durable, in the file journal or (with the shared store)
    /// as a row leased to this pool.
    async fn write_first(
        &self,
        id: TaskId,
        state: TaskState,
        payload: T,
        size: usize,
    ) -> Result<(T, Durable), SubmitError<T>> {
        if let Some((claims, commits)) = self.store_commits() {
            let (payload, lease) = self
                .commit_first(claims, commits, id, state, payload, size)
                .await?;
            let durable = Durable {
                journaled: None,
                lease: Some(lease),
            };
            return Ok((payload, durable));
        }
        let Some(write_ahead) = &self.write_ahead else {
            return Ok((payload, Durable::default()));
        };
        let (payload, bytes) = self
            .journal_first(write_ahead, id, state, payload, size)
            .await?;
        let durable = Durable {
            journaled: Some(bytes),
            lease: None,
        };
        Ok((payload, durable))
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
    ) -> Result<(T, Vec<u8>), SubmitError<T>> {
        let (payload, bytes) = self.encoded(payload, size)?;
        let record = TaskRecord {
            id,
            state,
            last_error: Cow::Borrowed(""),
            payload: &bytes,
        };
        let seq = write_ahead.push_task(&record, false);
        match write_ahead.wait(seq).await {
            Ok(()) => Ok((payload, bytes)),
            Err(error) => Err(SubmitError::Journal {
                task: payload,
                error,
            }),
        }
    }

    /// The payload and its encoding (`size` bytes, as checked at submit), or the refusal.
    pub(crate) fn encoded(&self, payload: T, size: usize) -> Result<(T, Vec<u8>), SubmitError<T>> {
        let mut bytes = Vec::with_capacity(size);
        match self.codec.encode(&payload, &mut bytes) {
            Ok(()) => Ok((payload, bytes)),
            Err(source) => Err(SubmitError::Unserializable {
                task: payload,
                source,
            }),
        }
    }

    /// Whether this runs inside one of this pool's handlers.
    fn in_own_handler(&self) -> bool {
        running_for() == Some(self.key())
    }

    /// A submit after intake closed: refused, unless it is a follow-up from one of this pool's
    /// own handlers, which is kept for the final spill (journaled first in write-ahead mode,
    /// so the promise of that mode holds for it too).
    async fn too_late(&self, payload: T) -> Result<TaskId, SubmitError<T>> {
        if !self.in_own_handler() {
            return Err(SubmitError::ShuttingDown(payload));
        }
        let (payload, size) = self.checked(payload)?;
        if !self.writes_ahead() {
            return Ok(self.hold_follow_up(payload, size, false));
        }
        let (id, state) = self.ids.fresh();
        let (payload, durable) = self.write_first(id, state, payload, size).await?;
        Ok(self.hold(self.durable_job(id, state, payload, size, durable), size))
    }

    /// A follow-up from one of this pool's own running handlers: queued at once, ahead of the
    /// new tasks when the queue is full (a handler waiting for room in its own full pool could
    /// wait for itself, and with every worker doing so the pool would stop); held for the final
    /// spill if the shutdown took the queue meanwhile. Journaled first in write-ahead mode.
    async fn follow_up(&self, payload: T, size: usize) -> Result<TaskId, SubmitError<T>> {
        if let Ok(slot) = self.queue.try_reserve() {
            if self.writes_ahead() {
                return self.write_ahead(slot, payload, size).await;
            }
            let payload = self.reserve_room(payload, size)?;
            let (id, state) = self.ids.fresh();
            return Ok(self.accept(slot, id, state, payload, size, Durable::default()));
        }
        let payload = self.reserve_room(payload, size)?;
        let (id, state) = self.ids.fresh();
        let (payload, durable) = self.write_first(id, state, payload, size).await?;
        let job = self.durable_job(id, state, payload, size, durable);
        if let Err(job) = self.queue.push_follow_up(job) {
            // The shutdown took the queue meanwhile: the job goes to the final spill.
            self.shutdown.hold(Held::FollowUp, job);
        }
        self.count_accepted(size);
        Ok(id)
    }

    /// Counts an accepted task of `size` encoded bytes.
    fn count_accepted(&self, size: usize) {
        self.counters.submitted.add(1);
        self.ids.accepted(size);
    }

    /// A new job, holding its share of the spill reserve.
    fn job(
        &self,
        id: TaskId,
        state: TaskState,
        payload: T,
        size: usize,
        journaled: bool,
    ) -> Job<T> {
        Job {
            id,
            state,
            last_error: None,
            payload: Payload::new(payload),
            journaled,
            replayed: false,
            lease: None,
            reserved: if self.reserve.is_some() && !journaled {
                reserved_bytes(size) as u32
            } else {
                0
            },
            span: task_span(id),
            #[cfg(feature = "metrics")]
            queued_at: tokio::time::Instant::now(),
        }
    }

    /// The job of a task `write_first` made durable (journaled, or leased in the store), or
    /// of one that needed nothing made durable.
    fn durable_job(
        &self,
        id: TaskId,
        state: TaskState,
        payload: T,
        size: usize,
        durable: Durable,
    ) -> Job<T> {
        let mut job = self.job(id, state, payload, size, durable.journaled.is_some());
        job.lease = durable.lease;
        job
    }

    fn hold_follow_up(&self, payload: T, size: usize, journaled: bool) -> TaskId {
        let (id, state) = self.ids.fresh();
        self.hold(self.job(id, state, payload, size, journaled), size)
    }

    /// Keeps an accepted follow-up (`size` encoded bytes) for the final spill, and counts it.
    fn hold(&self, job: Job<T>, size: usize) -> TaskId {
        let id = job.id;
        tracing::debug!(task = %id, "follow-up submitted during the drain; kept for the spill");
        self.shutdown.hold(Held::FollowUp, job);
        self.count_accepted(size);
        id
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
    pub(crate) fn checked(&self, payload: T) -> Result<(T, usize), SubmitError<T>> {
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

    /// Queues an accepted task and counts it, as `durable` says it was made durable (its
    /// record in the journal, with these bytes as its payload; or its row leased in the store).
    ///
    /// Past the queue's hot window the task is held encoded: the journaled bytes, or its
    /// payload encoded now (a payload that does not encode is held as it is: the spill will
    /// report it).
    fn accept(
        &self,
        slot: Slot<'_, T>,
        id: TaskId,
        state: TaskState,
        payload: T,
        size: usize,
        durable: Durable,
    ) -> TaskId {
        let Durable { journaled, lease } = durable;
        let mut job = self.job(id, state, payload, size, journaled.is_some());
        job.lease = lease;
        let task = job.queued();
        if let Err((slot, mut task)) = slot.send(task) {
            let bytes = journaled.or_else(|| {
                let mut bytes = Vec::with_capacity(size);
                task.payload.encode(&self.codec, &mut bytes).ok()?;
                Some(bytes)
            });
            if let Some(bytes) = bytes {
                task.payload = Payload::Encoded(bytes.into_boxed_slice());
            }
            slot.send_encoded(task);
        }
        self.count_accepted(size);
        id
    }
}

/// How a new task was made durable before it was queued: its journal record's payload bytes
/// (the file journal's write-ahead mode), or its row's lease (the shared store's); neither in
/// the on-shutdown mode.
#[derive(Default)]
struct Durable {
    journaled: Option<Vec<u8>>,
    lease: Option<Arc<Lease>>,
}

/// The spill reserve a task of `size` encoded payload bytes needs: its record's size.
fn reserved_bytes(size: usize) -> u64 {
    journal::task_record_len(size, 0) as u64
}
