//! Intake: `submit` and `try_submit`. The size check, a fresh id (and the unique key, if the
//! task has one), and in write-ahead mode the task's record (or, with the shared store, its
//! row), durable before the task is queued. A task scheduled for later goes to the queue's
//! waiting tasks instead of its new ones.

use super::job::{Fresh, Head, Held, Job, Queued, now_ms, task_span};
use super::queue::{NoRoom, Slot, Unsent};
use super::shared::Shared;
use super::worker::{Host, running_for};
use crate::codec::Refused;
use crate::error::SubmitError;
use crate::journal::{self, TaskOptions, TaskState};
use crate::task::TaskId;
use durable::Durable;

impl<T: Send + Sync + 'static> Shared<T> {
    /// `room`: how long to wait for room in the queue (`None`: as long as it takes), after
    /// which the task is refused with `Full`.
    pub(crate) async fn submit(
        &self,
        payload: T,
        room: Option<std::time::Duration>,
        extras: Extras,
    ) -> Result<TaskId, SubmitError<T>> {
        if self.queue.is_closed() {
            return self.too_late(payload, extras).await;
        }
        let size = match self.size_of(&payload, &extras) {
            Ok(size) => size,
            Err(refused) => return Err(refused.with(payload)),
        };
        if self.in_own_handler() {
            return self.follow_up(payload, size, extras).await;
        }
        if extras.key().is_none() && extras.not_before_ms == 0 && !self.writes_ahead() {
            return self.submit_plain(payload, size, room, extras).await;
        }
        let slot = match self.slot(room, &extras).await {
            Ok(slot) => slot,
            Err(NoRoom::Full) => return Err(SubmitError::Full(payload)),
            Err(NoRoom::Closed) => return self.too_late(payload, extras).await,
        };
        if self.writes_ahead() {
            return self.write_ahead(slot, payload, size, extras).await;
        }
        let (id, state) = match self.claim(size, &extras) {
            Ok(claimed) => claimed,
            Err(refused) => return Err(refused.with(payload)),
        };
        Ok(self.accept(slot, id, state, payload, size, extras, Durable::default()))
    }

    /// A slot for a new task, waiting for room (`room`: at most so long); `Closed` if the gate
    /// closed first, or meanwhile.
    async fn slot(
        &self,
        room: Option<std::time::Duration>,
        extras: &Extras,
    ) -> Result<Slot<'_, T>, NoRoom> {
        let reserved = match room {
            _ if extras.is_scheduled() => self.slot_now(extras),
            None => self.queue.reserve().await,
            Some(wait) => tokio::time::timeout(wait, self.queue.reserve())
                .await
                .unwrap_or(Err(NoRoom::Full)),
        };
        match reserved {
            // A slot taken as the gate closed is given back (dropped).
            Ok(_) | Err(NoRoom::Full) if self.queue.is_closed() => Err(NoRoom::Closed),
            other => other,
        }
    }

    /// A task for now without a unique key in the on-shutdown mode, the common case: queued in
    /// one lock when there is room now, where a slot takes two (one to reserve it, one to send
    /// the task). With no room, it waits for a slot, keeping its id (and holding nothing a
    /// dropped submit would have to give back: no key, no spill reserve).
    async fn submit_plain(
        &self,
        payload: T,
        size: usize,
        room: Option<std::time::Duration>,
        extras: Extras,
    ) -> Result<TaskId, SubmitError<T>> {
        // As `Queue::reserve` does: a producer that always finds room still yields now and then.
        tokio::task::consume_budget().await;
        let options_bytes = extras.bytes();
        let (id, state) = match self.claim(size, &extras) {
            Ok(claimed) => claimed,
            Err(refused) => return Err(refused.with(payload)),
        };
        let head = self.head((id, state), size, extras, false);
        let (mut head, payload) = match self.queue.try_send(head, payload) {
            Ok(()) => {
                self.count_accepted(size);
                return Ok(id);
            }
            Err(Unsent::Cold(slot, head, payload)) => {
                let task = Queued {
                    head,
                    payload: Fresh::Value(payload),
                };
                let size = self.send_cold(slot, task, size, None, options_bytes);
                self.count_accepted(size);
                return Ok(id);
            }
            Err(Unsent::Refused(why, head, payload)) => {
                self.forget_reserved(u64::from(head.reserved));
                if matches!(why, NoRoom::Closed) {
                    return Err(SubmitError::ShuttingDown(payload));
                }
                (head, payload)
            }
        };
        // No room now: it waits for a slot holding no spill reserve (given back above), so a
        // submit dropped while it waits holds none.
        head.reserved = 0;
        let slot = match self.slot(room, &Extras::default()).await {
            Ok(slot) => slot,
            Err(NoRoom::Full) => return Err(SubmitError::Full(payload)),
            Err(NoRoom::Closed) => return Err(SubmitError::ShuttingDown(payload)),
        };
        if let Err(refused) = self.reserve_room(size + options_bytes) {
            return Err(refused.with(payload));
        }
        head.reserved = self.reserved_for(size + options_bytes, false);
        // Accepted now, not when it first found the queue full.
        head.enqueued_ms = now_ms();
        #[cfg(feature = "metrics")]
        {
            head.queued_at = tokio::time::Instant::now();
        }
        let task = Queued {
            head,
            payload: Fresh::Value(payload),
        };
        let size = self.send_new(slot, task, size, None, options_bytes);
        self.count_accepted(size);
        Ok(id)
    }

    /// Gives back `bytes` of spill reserve: a task refused after all, or one that left memory
    /// for good.
    pub(crate) fn forget_reserved(&self, bytes: u64) {
        if let Some(reserve) = &self.reserve
            && bytes > 0
        {
            reserve.forget(bytes);
        }
    }

    /// A fresh id and state for a task of `size` encoded bytes about to be accepted, with its
    /// unique key taken and (on-shutdown mode) its room in the spill reserve; or the refusal,
    /// nothing kept.
    fn claim(&self, size: usize, extras: &Extras) -> Result<(TaskId, TaskState), Refusal> {
        let (id, state) = self.fresh(extras)?;
        match self.reserve_room(size + extras.bytes()) {
            Ok(()) => Ok((id, state)),
            Err(refused) => {
                self.let_go(id, extras);
                Err(refused)
            }
        }
    }

    /// A fresh id, and the task's state as accepted now, with its unique key taken; or the
    /// refusal of a duplicate.
    fn fresh(&self, extras: &Extras) -> Result<(TaskId, TaskState), Refusal> {
        let (id, mut state) = self.ids.fresh();
        state.not_before_ms = extras.not_before_ms;
        if let Some(key) = extras.key()
            && let Err(first) = self.keys.take(key, id)
        {
            return Err(Refusal::Duplicate { first });
        }
        Ok((id, state))
    }

    /// Lets go of a refused task's unique key.
    fn let_go(&self, id: TaskId, extras: &Extras) {
        if let Some(key) = extras.key() {
            self.keys.release(key, id);
        }
    }

    /// Whether every task is made durable before it is accepted: the file journal's
    /// write-ahead mode, or the shared store's.
    fn writes_ahead(&self) -> bool {
        self.write_ahead.is_some() || self.store_commits().is_some()
    }

    pub(crate) fn try_submit(&self, payload: T, extras: Extras) -> Result<TaskId, SubmitError<T>> {
        if self.queue.is_closed() && !self.writes_ahead() && self.in_own_handler() {
            // A follow-up in the on-shutdown mode needs no wait: it goes to the spill.
            let (payload, size) = kept(self.size_of(&payload, &extras), payload)?;
            return self.hold_follow_up(payload, size, extras);
        }
        if self.queue.is_closed() {
            return Err(SubmitError::ShuttingDown(payload));
        }
        let (payload, size) = kept(self.size_of(&payload, &extras), payload)?;
        if self.writes_ahead() {
            // Journaling waits for the disk (or the store); only `submit` can do that.
            return Err(SubmitError::WouldBlock(payload));
        }
        match self.slot_now(&extras) {
            Ok(slot) => {
                let (payload, (id, state)) = kept(self.claim(size, &extras), payload)?;
                Ok(self.accept(slot, id, state, payload, size, extras, Durable::default()))
            }
            Err(NoRoom::Full) => Err(SubmitError::Full(payload)),
            Err(NoRoom::Closed) => Err(SubmitError::ShuttingDown(payload)),
        }
    }

    /// A slot without waiting: one outside the capacity for a task for later (it waits with the
    /// retries; the slot only orders it against the shutdown's collection), else room now.
    fn slot_now(&self, extras: &Extras) -> Result<Slot<'_, T>, NoRoom> {
        if extras.is_scheduled() {
            self.queue.reserve_scheduled()
        } else {
            self.queue.try_reserve()
        }
    }

    /// Whether this runs inside one of this pool's handlers.
    fn in_own_handler(&self) -> bool {
        running_for() == Some(self.key())
    }

    /// A submit after intake closed: refused, unless it is a follow-up from one of this pool's
    /// own handlers, which is kept for the final spill (journaled first in write-ahead mode,
    /// so the promise of that mode holds for it too).
    async fn too_late(&self, payload: T, extras: Extras) -> Result<TaskId, SubmitError<T>> {
        if !self.in_own_handler() {
            return Err(SubmitError::ShuttingDown(payload));
        }
        let (payload, size) = kept(self.size_of(&payload, &extras), payload)?;
        if !self.writes_ahead() {
            return self.hold_follow_up(payload, size, extras);
        }
        let (payload, (id, state)) = kept(self.fresh(&extras), payload)?;
        let (payload, durable) = self.write_first(id, state, payload, size, &extras).await?;
        Ok(self.hold(
            self.durable_job(id, state, payload, size, extras, durable),
            size,
        ))
    }

    /// A follow-up from one of this pool's own running handlers: queued at once, ahead of the
    /// new tasks when the queue is full (a handler waiting for room in its own full pool could
    /// wait for itself, and with every worker doing so the pool would stop); held for the final
    /// spill if the shutdown took the queue meanwhile. Journaled first in write-ahead mode.
    async fn follow_up(
        &self,
        payload: T,
        size: usize,
        extras: Extras,
    ) -> Result<TaskId, SubmitError<T>> {
        if let Ok(slot) = self.slot_now(&extras) {
            if self.writes_ahead() {
                return self.write_ahead(slot, payload, size, extras).await;
            }
            let (payload, (id, state)) = kept(self.claim(size, &extras), payload)?;
            return Ok(self.accept(slot, id, state, payload, size, extras, Durable::default()));
        }
        let (payload, (id, state)) = kept(self.claim(size, &extras), payload)?;
        let (payload, durable) = self.write_first(id, state, payload, size, &extras).await?;
        let job = self.durable_job(id, state, payload, size, extras, durable);
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

    /// A new task as the queue holds it, with its share of the spill reserve.
    fn queued(
        &self,
        (id, state): (TaskId, TaskState),
        payload: T,
        size: usize,
        extras: Extras,
        journaled: bool,
    ) -> Queued<T> {
        Queued {
            head: self.head((id, state), size, extras, journaled),
            payload: Fresh::Value(payload),
        }
    }

    /// What the queue holds of a new task besides its payload.
    fn head(
        &self,
        (id, state): (TaskId, TaskState),
        size: usize,
        extras: Extras,
        journaled: bool,
    ) -> Head {
        Head {
            id,
            enqueued_ms: state.enqueued_ms,
            reserved: self.reserved_for(size + extras.bytes(), journaled),
            journaled,
            span: task_span(id),
            lease: None,
            priority: extras.priority,
            options: extras.options,
            #[cfg(feature = "metrics")]
            queued_at: tokio::time::Instant::now(),
        }
    }

    /// The spill reserve a new task of `size` encoded bytes (payload and options) holds: its
    /// record's size, unless its record is in the journal already or there is no reserve.
    fn reserved_for(&self, size: usize, journaled: bool) -> u32 {
        if self.reserve.is_some() && !journaled {
            reserved_bytes(size) as u32
        } else {
            0
        }
    }

    fn hold_follow_up(
        &self,
        payload: T,
        size: usize,
        extras: Extras,
    ) -> Result<TaskId, SubmitError<T>> {
        let (payload, (id, state)) = kept(self.claim(size, &extras), payload)?;
        let job = self.queued((id, state), payload, size, extras, false);
        Ok(self.hold(job.into_job_in(state), size))
    }

    /// Keeps an accepted follow-up (`size` encoded bytes) for the final spill, and counts it.
    fn hold(&self, job: Job<T>, size: usize) -> TaskId {
        let id = job.id;
        tracing::debug!(task = %id, "follow-up submitted during the drain; kept for the spill");
        self.shutdown.hold(Held::FollowUp, job);
        self.count_accepted(size);
        id
    }

    /// Makes room in the spill reserve for a task of `size` encoded bytes (its payload and
    /// options), or refuses it.
    fn reserve_room(&self, size: usize) -> Result<(), Refusal> {
        match &self.reserve {
            Some(reserve) => reserve
                .admit(reserved_bytes(size))
                .map_err(Refusal::JournalFull),
            None => Ok(()),
        }
    }

    /// The payload's encoded size, or the refusal: the payload and the options together must
    /// fit in a record. The size may be an upper bound (the codec's `encoded_len_bound`, when
    /// within the limit): what the spill reserve covers while the task is held decoded, until
    /// `accept` encodes it past the queue's hot window.
    pub(super) fn size_of(&self, payload: &T, extras: &Extras) -> Result<usize, Refusal> {
        let limit = self.config.max_record_bytes;
        let room = limit
            .saturating_sub(journal::task_record_len(0, 0))
            .saturating_sub(extras.bytes());
        match self.codec.len_within(payload, room) {
            Ok(size) => Ok(size),
            Err(Refused::TooLarge) => Err(Refusal::TooLarge { limit }),
            Err(Refused::Failed(source)) => Err(Refusal::Unserializable(source)),
        }
    }

    /// Queues an accepted task and counts it, as `durable` says it was made durable (its
    /// record in the journal, with these bytes as its payload; or its row leased in the store).
    /// A task for later waits for its time instead.
    ///
    /// Past the queue's hot window the task is held encoded: the journaled bytes, or its
    /// payload encoded now (a payload that does not encode is held as it is: the spill will
    /// report it).
    #[expect(clippy::too_many_arguments, reason = "one call per way of accepting")]
    fn accept(
        &self,
        slot: Slot<'_, T>,
        id: TaskId,
        state: TaskState,
        payload: T,
        size: usize,
        extras: Extras,
        durable: Durable,
    ) -> TaskId {
        let Durable { journaled, lease } = durable;
        let options_bytes = extras.bytes();
        // A task for at once (`not_before_ms` 0) reads no clock here.
        let now = if state.not_before_ms > 0 { now_ms() } else { 0 };
        if state.not_before_ms > now {
            let mut job = self
                .queued((id, state), payload, size, extras, journaled.is_some())
                .into_job_in(state);
            job.lease = lease;
            let delay = std::time::Duration::from_millis(state.not_before_ms - now);
            slot.schedule(job, delay);
            self.count_accepted(size);
            return id;
        }
        let mut task = self.queued((id, state), payload, size, extras, journaled.is_some());
        task.head.lease = lease;
        let size = self.send_new(slot, task, size, journaled, options_bytes);
        self.count_accepted(size);
        id
    }

    /// Sends a new task in its slot: as it is, or, past the queue's hot window, held encoded
    /// (see [`send_cold`](Self::send_cold)). Returns its size as counted.
    fn send_new(
        &self,
        slot: Slot<'_, T>,
        task: Queued<T>,
        size: usize,
        journaled: Option<Vec<u8>>,
        options_bytes: usize,
    ) -> usize {
        match slot.send(task) {
            Ok(()) => size,
            Err((slot, task)) => self.send_cold(slot, task, size, journaled, options_bytes),
        }
    }

    /// Sends a new task the queue handed back past its hot window, held encoded: as its
    /// journaled bytes, or its payload encoded now (a payload that does not encode is held as it
    /// is: the spill will report it). Returns its size as counted.
    fn send_cold(
        &self,
        slot: Slot<'_, T>,
        mut task: Queued<T>,
        size: usize,
        journaled: Option<Vec<u8>>,
        options_bytes: usize,
    ) -> usize {
        let mut size = size;
        let bytes = journaled.or_else(|| match &task.payload {
            Fresh::Value(value) => self.codec.to_bytes(value, size).ok(),
            Fresh::Encoded(_) => None,
        });
        if let Some(bytes) = bytes {
            size = bytes.len();
            self.reserve_exact(&mut task.head.reserved, size + options_bytes);
            task.payload = Fresh::Encoded(bytes.into_boxed_slice());
        }
        slot.send_encoded(task);
        size
    }

    /// A task held encoded, `size` bytes with its options: the spill reserve it holds drops
    /// from its payload's bound (see `size_of`) to its record's exact size.
    fn reserve_exact(&self, reserved: &mut u32, size: usize) {
        if let Some(reserve) = &self.reserve
            && *reserved > 0
        {
            let exact = reserved_bytes(size) as u32;
            reserve.forget(u64::from(reserved.saturating_sub(exact)));
            *reserved = exact.min(*reserved);
        }
    }
}

/// What a submit carries besides its payload: the task's priority, its other options (`None`:
/// all at their defaults; the priority too, when set) and the time it may run from (ms since
/// the Unix epoch; 0: at once).
#[derive(Debug, Default)]
pub(crate) struct Extras {
    pub(crate) priority: u8,
    pub(crate) options: Option<Box<TaskOptions>>,
    pub(crate) not_before_ms: u64,
}

impl Extras {
    /// The extras of a task with `options`: boxed only if an option other than the priority
    /// is set.
    pub(crate) fn new(options: TaskOptions, not_before_ms: u64) -> Self {
        Self {
            priority: options.priority,
            options: (!options.is_level_only()).then(|| Box::new(options)),
            not_before_ms,
        }
    }

    /// All its options (`None`: all at their defaults).
    pub(crate) fn options(&self) -> Option<&TaskOptions> {
        TaskOptions::of(self.options.as_deref(), self.priority)
    }

    /// The bytes its options add to the task's record.
    fn bytes(&self) -> usize {
        journal::options_bytes(self.options())
    }

    fn key(&self) -> Option<&str> {
        self.options.as_ref().and_then(|o| o.key.as_deref())
    }

    /// Whether the task is for later.
    fn is_scheduled(&self) -> bool {
        self.not_before_ms > 0 && self.not_before_ms > now_ms()
    }
}

/// The spill reserve a task of `size` encoded payload (and options) bytes needs: its record's
/// size.
fn reserved_bytes(size: usize) -> u64 {
    journal::task_record_len(size, 0) as u64
}

/// Why a submit refused its task, without the task (the checks borrow it; the payload is
/// moved once, into the queue, or back to the caller in the [`SubmitError`]).
pub(super) enum Refusal {
    TooLarge { limit: usize },
    Unserializable(crate::error::BoxError),
    Duplicate { first: TaskId },
    JournalFull(std::sync::Arc<crate::error::JournalError>),
}

impl Refusal {
    /// The refusal, handing `task` back.
    fn with<T>(self, task: T) -> SubmitError<T> {
        match self {
            Self::TooLarge { limit } => SubmitError::RecordTooLarge { task, limit },
            Self::Unserializable(source) => SubmitError::Unserializable { task, source },
            Self::Duplicate { first } => SubmitError::Duplicate { task, first },
            Self::JournalFull(error) => SubmitError::JournalFull { task, error },
        }
    }
}

/// `result`'s value with the payload, or its refusal handing the payload back. Off the plain
/// submit's path: there the refusal is matched by hand, so the payload is not moved in and out
/// (about 120 of the 1,214 instructions a plain submit counted in callgrind).
pub(super) fn kept<X, T>(result: Result<X, Refusal>, payload: T) -> Result<(T, X), SubmitError<T>> {
    match result {
        Ok(value) => Ok((payload, value)),
        Err(refused) => Err(refused.with(payload)),
    }
}

mod durable;
