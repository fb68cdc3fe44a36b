//! A task as the pool holds it between intake and its outcome.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::remote::Lease;
use crate::codec::Encoding;
use crate::error::BoxError;
use crate::journal::{TaskOptions, TaskRecord, TaskState};
use crate::task::TaskId;

/// The wall clock, in milliseconds since the Unix epoch (what the journal stores).
pub(crate) fn now_ms() -> u64 {
    epoch_ms(SystemTime::now())
}

/// `at` in milliseconds since the Unix epoch (0 before it, saturated far after).
pub(crate) fn epoch_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `after` from now, in milliseconds since the Unix epoch, saturated.
pub(crate) fn ms_from_now(after: Duration) -> u64 {
    now_ms().saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX))
}

/// A task waiting for, or held by, a worker.
pub(crate) struct Job<T> {
    pub(crate) id: TaskId,
    pub(crate) state: TaskState,
    pub(crate) last_error: Option<Box<str>>,
    pub(crate) payload: Payload<T>,
    /// Whether a record of this task is in the journal (so finishing it must append an ack).
    pub(crate) journaled: bool,
    /// Whether it was replayed from an earlier run (whose segments wait for it).
    pub(crate) replayed: bool,
    /// The bytes of spill reserve it holds (0 for a replayed or claimed task: see
    /// `reserve.rs`).
    pub(crate) reserved: u32,
    /// When it last joined the queue (accepted, replayed, or its retry came due), for the
    /// queue-wait histogram. Only with the `metrics` feature: a queued task costs no more
    /// without it.
    #[cfg(feature = "metrics")]
    pub(crate) queued_at: tokio::time::Instant,
    /// The task's span, made at submit when the submitter was inside one (see [`task_span`]).
    pub(crate) span: Option<Box<tracing::Span>>,
    /// Claimed from the shared store: its lease (the handler's token fires if it is lost).
    pub(crate) lease: Option<Arc<Lease>>,
    /// Its priority (also in `options`, when those are held).
    pub(crate) priority: u8,
    /// Its options; `None` when every one but the priority is at its default (a null
    /// pointer's worth: a task that sets its priority alone allocates nothing for it).
    pub(crate) options: Option<Box<TaskOptions>>,
}

/// A job's payload: decoded, or held as its encoding while the job waits behind the queue's
/// hot window (see `queue.rs`). A worker's host decodes it before the run; a spill writes the
/// bytes as they are.
pub(crate) enum Payload<T> {
    Decoded(Arc<T>),
    Encoded(Box<[u8]>),
}

impl<T> Payload<T> {
    pub(crate) fn new(value: T) -> Self {
        Self::Decoded(Arc::new(value))
    }

    /// The value, unless it is still encoded.
    pub(crate) fn decoded(&self) -> Option<&Arc<T>> {
        match self {
            Self::Decoded(value) => Some(value),
            Self::Encoded(_) => None,
        }
    }

    /// Appends the payload's encoding to `out` (the bytes held, or the codec's encoding of the
    /// value); on an error `out` is left as it was.
    pub(crate) fn encode(&self, codec: &Encoding<T>, out: &mut Vec<u8>) -> Result<(), BoxError>
    where
        T: 'static,
    {
        match self {
            Self::Decoded(value) => codec.encode(value, out),
            Self::Encoded(bytes) => {
                out.extend_from_slice(bytes);
                Ok(())
            }
        }
    }
}

/// A new task as the queue holds it: what a new task's [`Job`] holds, without what only a
/// retried, replayed or claimed one needs (its state beyond the time it was accepted, its last
/// error), and with its payload as submitted, not shared yet (see [`Fresh`]). With the payload
/// encoded, about half the memory of the decoded form. A new task made durable as a row of the
/// shared store (write-ahead with PostgreSQL) keeps its lease here.
pub(crate) struct Queued<T> {
    pub(crate) head: Head,
    pub(crate) payload: Fresh<T>,
}

/// What a [`Queued`] task holds besides its payload.
pub(crate) struct Head {
    pub(crate) id: TaskId,
    pub(crate) enqueued_ms: u64,
    pub(crate) reserved: u32,
    pub(crate) journaled: bool,
    pub(crate) span: Option<Box<tracing::Span>>,
    pub(crate) lease: Option<Arc<Lease>>,
    /// As in [`Job`]: the priority, and the options held only when another one is set.
    pub(crate) priority: u8,
    pub(crate) options: Option<Box<TaskOptions>>,
    #[cfg(feature = "metrics")]
    pub(crate) queued_at: tokio::time::Instant,
}

impl Head {
    /// Its priority (0, the default, unless its options say otherwise).
    pub(crate) fn priority(&self) -> u8 {
        self.priority
    }
}

/// A new task's payload as the queue holds it.
pub(crate) enum Fresh<T> {
    /// As submitted. Moved into an `Arc` (which a run's `Task` shares) when a worker takes the
    /// task, so that allocation is made, and freed, on the worker's thread: the submitter's
    /// core is spared it, and the worker's first touch of the count is not a miss.
    Value(T),
    /// Its encoding, past the queue's hot window (see `queue.rs`).
    Encoded(Box<[u8]>),
}

impl<T> Queued<T> {
    pub(crate) fn is_decoded(&self) -> bool {
        matches!(self.payload, Fresh::Value(_))
    }

    /// The job again (its value shared, if it is not encoded).
    pub(crate) fn into_job(self) -> Job<T> {
        let Self { head, payload } = self;
        Job {
            id: head.id,
            state: TaskState {
                enqueued_ms: head.enqueued_ms,
                ..TaskState::default()
            },
            last_error: None,
            payload: match payload {
                Fresh::Value(value) => Payload::new(value),
                Fresh::Encoded(bytes) => Payload::Encoded(bytes),
            },
            journaled: head.journaled,
            replayed: false,
            reserved: head.reserved,
            #[cfg(feature = "metrics")]
            queued_at: head.queued_at,
            span: head.span,
            lease: head.lease,
            priority: head.priority,
            options: head.options,
        }
    }

    /// The job of a new task that does not wait with the others (held for the spill, queued
    /// ahead of them, or waiting for its time), in `state`.
    pub(crate) fn into_job_in(self, state: TaskState) -> Job<T> {
        let mut job = self.into_job();
        job.state = state;
        job
    }

    /// Its priority (0, the default, unless its options say otherwise).
    pub(crate) fn priority(&self) -> u8 {
        self.head.priority()
    }
}

/// The span of a task submitted from inside a span (an HTTP request's, say), made at submit so
/// that it `follows_from` the submitter's while that span is still open: a trace then links the
/// request to the background work without the request's span being kept open (a parent would
/// be, until the task ends). Its runs are entered under it. `None` outside any span, or when
/// the subscriber does not want it: the run then makes its own span, and the task holds no
/// more than a null pointer.
pub(crate) fn task_span(id: TaskId) -> Option<Box<tracing::Span>> {
    if !tracing::level_enabled!(tracing::Level::INFO) {
        // No subscriber would record the span: two loads rather than a lookup per submit.
        return None;
    }
    let submitter = tracing::Span::current();
    submitter.id()?;
    let span = tracing::info_span!(parent: None, "task", id = %id, attempt = tracing::field::Empty);
    if span.is_disabled() {
        return None;
    }
    span.follows_from(&submitter);
    Some(Box::new(span))
}

impl<T> Job<T> {
    /// All its options (`None`: all at their defaults).
    pub(crate) fn options(&self) -> Option<&TaskOptions> {
        TaskOptions::of(self.options.as_deref(), self.priority)
    }

    /// Its unique key, if it has one.
    pub(crate) fn key(&self) -> Option<&str> {
        self.options.as_ref().and_then(|o| o.key.as_deref())
    }

    /// Its expiry (ms since the Unix epoch), if it has one.
    pub(crate) fn expires_ms(&self) -> Option<u64> {
        self.options
            .as_ref()
            .map(|o| o.expires_ms)
            .filter(|&ms| ms > 0)
    }

    /// Its retry limit: its own, or `pool`'s.
    pub(crate) fn max_attempts(&self, pool: u32) -> u32 {
        self.options
            .as_ref()
            .map(|o| o.max_attempts)
            .filter(|&n| n > 0)
            .unwrap_or(pool)
    }

    /// The task as a journal record, with its payload encoded in `payload`, and `error` as
    /// its last error instead of its own if given.
    pub(crate) fn record<'a>(
        &'a self,
        payload: &'a [u8],
        error: Option<&'a str>,
    ) -> TaskRecord<'a> {
        TaskRecord {
            id: self.id,
            state: self.state,
            last_error: Cow::Borrowed(error.or(self.last_error.as_deref()).unwrap_or("")),
            payload,
            options: self.options().map(Cow::Borrowed),
        }
    }

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
    /// A follow-up its own pool's handler submitted after intake closed: it goes to the spill.
    FollowUp,
}

/// Ids and the sizes of what was accepted.
#[derive(Debug)]
pub(crate) struct Ids {
    /// This start's run number: the high half of every new id.
    run: u64,
    next_seq: AtomicU64,
    /// Encoded payload bytes of the tasks accepted, for the spill estimate.
    submitted_bytes: AtomicU64,
}

impl Ids {
    pub(crate) fn new(run: u64) -> Self {
        Self {
            run,
            next_seq: AtomicU64::new(1),
            submitted_bytes: AtomicU64::new(0),
        }
    }

    pub(crate) fn run(&self) -> u64 {
        self.run
    }

    /// Counts an accepted task's encoded payload.
    pub(crate) fn accepted(&self, size: usize) {
        self.submitted_bytes
            .fetch_add(size as u64, Ordering::Relaxed);
    }

    /// The average encoded payload of the tasks accepted so far (0 before the first).
    pub(crate) fn average_payload(&self, accepted: u64) -> u64 {
        self.submitted_bytes.load(Ordering::Relaxed) / accepted.max(1)
    }

    /// A new task's id, and its state as accepted now.
    pub(crate) fn fresh(&self) -> (TaskId, TaskState) {
        let id = TaskId::new(self.run, self.next_seq.fetch_add(1, Ordering::Relaxed));
        let state = TaskState {
            enqueued_ms: now_ms(),
            ..TaskState::default()
        };
        (id, state)
    }
}
