//! The pool's builder.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::codec::{Codec, Encoding, Json};
use crate::error::{BoxError, StartError};
use crate::policy::{DeadlineAction, Durability, Expiry, Interruption, Policy};
use crate::pool::{self, Config, Deadline, Pool, Runner};
use crate::task::Task;

impl<T> Pool<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// A builder with the default settings, encoding payloads as JSON.
    pub fn builder() -> Builder<T> {
        Builder::with_codec(Json)
    }
}

/// Configures and starts a [`Pool`]. Made by [`Pool::builder`].
#[must_use = "a builder does nothing until `start` is called"]
pub struct Builder<T> {
    config: Config,
    policy: Policy<T>,
    codec: Encoding<T>,
}

impl<T> fmt::Debug for Builder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .field("policy", &self.policy)
            .finish()
    }
}

impl<T: Send + Sync + 'static> Builder<T> {
    /// A builder with the default settings, encoding payloads with `codec` (see [`Codec`]);
    /// [`Pool::builder`] is this with [`Json`].
    pub fn with_codec(codec: impl Codec<T>) -> Self {
        Self {
            config: Config::default(),
            policy: Policy::default(),
            codec: Encoding::new(codec),
        }
    }

    /// How payloads are encoded in the journal.
    ///
    /// The default is [`Json`] (with [`Pool::builder`]).
    pub fn codec(mut self, codec: impl Codec<T>) -> Self {
        self.codec = Encoding::new(codec);
        self
    }

    /// The pool's name, telling it from other pools in the process: with the `metrics`
    /// feature, every metric it records carries the label `pool="<name>"` (the README lists
    /// the metrics); it is also in the log line of its start. Give each pool of a process its
    /// own, or their metrics mix.
    ///
    /// The default is `"default"`; an empty name makes `start` fail with
    /// [`StartError::InvalidConfig`].
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// How many handlers run at once.
    ///
    /// The default is the number of CPUs the process may use.
    pub fn workers(mut self, workers: usize) -> Self {
        self.config.workers = workers;
        self
    }

    /// How many tasks may wait for a worker before `submit` waits and `try_submit` returns
    /// [`Full`](crate::SubmitError::Full). Tasks replayed from the journal do not count.
    ///
    /// A `submit` waiting for room is woken once an eighth of the capacity (at most 64 slots)
    /// is free, or gets a slot about a millisecond after one frees: a full queue then
    /// wakes its submitter once per batch, not once per task.
    ///
    /// From a long queue a worker takes a few tasks at once (at most 16), which leave the
    /// capacity as a running task does: up to 16 per worker may wait in workers' hands beyond
    /// it (they still count in [`Stats::queued`](crate::Stats::queued) and are spilled with
    /// the queue).
    ///
    /// The default is 1024.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.config.queue_capacity = capacity;
        self
    }

    /// How long in-flight tasks may run after shutdown begins: a fixed drain deadline, or one
    /// derived from the orchestrator's grace period (see [`Deadline`]). When it passes, each
    /// handler's cancellation token fires. One choice: a later call replaces an earlier one,
    /// as does [`drain_deadline`](Self::drain_deadline).
    ///
    /// The default is `Deadline::Fixed(25 s)`, which leaves room for the cancel grace and the
    /// spill inside Kubernetes' default 30 s termination grace period.
    pub fn deadline(mut self, deadline: Deadline) -> Self {
        self.config.deadline = deadline;
        self
    }

    /// A fixed drain deadline: shorthand for `deadline(Deadline::Fixed(deadline))`.
    pub fn drain_deadline(self, deadline: Duration) -> Self {
        self.deadline(Deadline::Fixed(deadline))
    }

    /// How long a handler has, after its token fires, to checkpoint and return before it is
    /// dropped and its task journaled as interrupted.
    ///
    /// The default is 2 s.
    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.config.cancel_grace = grace;
        self
    }

    /// The directory of the pool's journal. It is created (owner-only) if missing, and locked
    /// for the pool's life: one pool per directory.
    ///
    /// There is no default; `start` fails without one.
    pub fn journal_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.journal_dir = Some(dir.into());
        self
    }

    /// The largest journal record a task may need, header included. A payload that would need
    /// more is refused at `submit` with [`RecordTooLarge`](crate::SubmitError::RecordTooLarge),
    /// never discovered at spill time.
    ///
    /// The default is 1 MiB; at most 64 MiB.
    pub fn max_record_bytes(mut self, bytes: usize) -> Self {
        self.config.max_record_bytes = bytes;
        self
    }

    /// A token whose cancellation starts the shutdown, for services that already have one.
    /// The pool watches a child of it: [`Pool::shutdown`] never cancels the token itself.
    ///
    /// The default is a fresh token of the pool's own.
    pub fn shutdown_token(mut self, token: CancellationToken) -> Self {
        self.config.shutdown_token = Some(token);
        self
    }

    /// When tasks reach the disk: at shutdown, or before `submit` returns. See [`Durability`]
    /// for what each mode survives.
    ///
    /// The default is [`Durability::on_shutdown`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.config.durability = durability;
        self
    }

    /// In write-ahead mode, the size at which the journal's segment is sealed and a new one
    /// started. A sealed segment is deleted as soon as every task in it (and in every older
    /// one) is finished. When the older sealed segments hold no more live data than finished,
    /// their unfinished tasks are copied to the end of the journal and the segments deleted
    /// (compaction), so one task that never finishes pins nothing: the journal stays within
    /// about twice the live tasks' records plus three segments.
    ///
    /// The default is 64 MiB; at least 112 bytes (a segment's header and one record), or
    /// `start` fails with [`StartError::InvalidConfig`].
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.config.segment_bytes = bytes;
        self
    }

    /// Whether, in the on-shutdown mode, the pool keeps disk space set aside in the journal
    /// directory (a `reserve` file, allocated but never written) that covers every task it
    /// holds in memory, so that the spill at shutdown finds room for all of them even when the
    /// disk has filled up meanwhile. The reserve grows in steps as the pool accepts tasks;
    /// when it cannot grow, `submit` refuses with [`SubmitError::JournalFull`](crate::SubmitError::JournalFull),
    /// handing the task back, and [`Stats::journal_ready`](crate::Stats::journal_ready) is
    /// false. Its first step (1 MiB) is taken at start: a directory that cannot take it fails
    /// `start`. The shutdown removes it just before it journals the first task; one with
    /// nothing to journal leaves it to the next start (freeing its blocks can cost more than
    /// the rest of an idle shutdown). Off, a spill on a full disk saves what fits and lists the
    /// rest in the report.
    /// Not used in write-ahead mode, where every task is on disk already.
    ///
    /// The default is on.
    pub fn spill_reserve(mut self, on: bool) -> Self {
        self.config.spill_reserve = on;
        self
    }

    /// Whether to catch SIGTERM and SIGINT from the very start: the handlers are installed
    /// (see [`catch_signals`](crate::catch_signals)) before the journal is opened and replayed,
    /// and the pool listens once it is built, as [`Pool::run_until_signal`] would make it. A
    /// signal during the replay is then not lost (as PID 1 in a container the kernel would
    /// otherwise ignore it): the pool drains as soon as it is built, journaling every replayed
    /// task again, and [`Pool::wait`] returns its report. The second signal skips the drain's
    /// wait, the third exits with 128 + its number.
    ///
    /// The default is off: nothing is installed until asked.
    pub fn catch_signals(mut self, on: bool) -> Self {
        self.config.catch_signals = on;
        self
    }

    /// Shares the pool's unfinished work with other pools through PostgreSQL (the `postgres`
    /// feature): at shutdown queued and interrupted tasks are handed off to the store's table
    /// instead of the local journal, and while running the pool claims and runs what other
    /// pools handed off. The journal directory is still needed: a handoff that PostgreSQL
    /// cannot take goes there, and the next start hands it on. See [`PostgresStore`](crate::PostgresStore).
    ///
    /// With [`Durability::write_ahead`] and `SyncPolicy::Always`, every accepted task is committed
    /// to the table (leased to this pool) before `submit` returns, instead of journaled
    /// locally: a SIGKILL loses nothing accepted, the other pools rescue its tasks. Other sync
    /// policies fail `start` with [`StartError::InvalidConfig`].
    ///
    /// The default is none: the local journal alone.
    #[cfg(feature = "postgres")]
    pub fn postgres(mut self, store: crate::PostgresStore) -> Self {
        self.config.remote = Some(Arc::new(store));
        self
    }

    /// The journal's file operations: a test's faulty ones instead of the real calls.
    #[cfg(test)]
    pub(crate) fn file_ops(mut self, ops: crate::journal::Ops) -> Self {
        self.config.file_ops = ops;
        self
    }

    /// How many times a task may fail (its handler returns an error or panics) before it is set
    /// aside as a dead letter. A run interrupted at the drain deadline does not count.
    ///
    /// The default is 5.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.policy.max_attempts = attempts;
        self
    }

    /// The delay before retrying a failed task: `base` after the first failure, doubling after
    /// each further one up to `cap`, with jitter (each delay is between half and all of that).
    /// A task waiting for its retry at shutdown is journaled with the time it may run again,
    /// and the next start honours it.
    ///
    /// The default is 1 s, capped at 5 min.
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.policy.backoff_base = base;
        self.policy.backoff_cap = cap;
        self
    }

    /// What to do with a task still running at the drain deadline, decided from its payload
    /// (an enum payload can answer per task kind).
    ///
    /// The default is [`DeadlineAction::Requeue`] for every task.
    pub fn on_deadline(
        mut self,
        decide: impl Fn(&T) -> DeadlineAction + Send + Sync + 'static,
    ) -> Self {
        self.policy.on_deadline = Some(Arc::new(decide));
        self
    }

    /// A hook that runs for each task stopped at the drain deadline, before its
    /// [`DeadlineAction`] is carried out (to release a lease, say, or record a metric). It gets
    /// the cancel grace to finish, then it is dropped.
    ///
    /// The default is none.
    pub fn on_interrupt<H, Fut>(mut self, hook: H) -> Self
    where
        H: Fn(Interruption<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.policy.on_interrupt = Some(Arc::new(move |interruption| Box::pin(hook(interruption))));
        self
    }

    /// After how many consecutive runs interrupted at the drain deadline a task is set aside
    /// as a dead letter instead of replayed again, so a task that always outlives the deadline
    /// cannot loop forever.
    ///
    /// The default is 3.
    pub fn max_interruptions(mut self, runs: u32) -> Self {
        self.policy.max_interruptions = runs;
        self
    }

    /// What becomes of a task whose time to live
    /// ([`TaskBuilder::time_to_live`](crate::TaskBuilder::time_to_live)) ran out before a run
    /// could start: a dead letter (the default) or dropped. It is not run either way.
    pub fn on_expiry(mut self, expiry: Expiry) -> Self {
        self.policy.on_expiry = expiry;
        self
    }

    /// Opens and locks the journal, recovers it, and queues the recovered tasks ahead of
    /// anything new; returns the pool's first handle and the [`Runner`] that starts the
    /// workers once it is given the handler. Tasks can be submitted at once; they run when
    /// the runner runs.
    ///
    /// Use this when the handler needs a handle of its own pool (to submit follow-up tasks, or
    /// because it holds application state that holds the pool): hold a
    /// [`WeakPool`](crate::WeakPool) there, so the pool can still shut down when the last
    /// other handle goes.
    ///
    /// # Errors
    ///
    /// [`StartError::JournalLocked`] if another pool holds the directory,
    /// [`StartError::Journal`] if the journal cannot be opened or read (a segment of a newer
    /// format, an I/O error), [`StartError::InvalidConfig`] for a setting out of range or a
    /// missing journal directory. Damaged records are not errors: they are repaired or skipped
    /// and listed in [`Pool::recovery`].
    ///
    /// # Panics
    ///
    /// Panics if called outside a tokio runtime.
    pub async fn build(self) -> Result<(Pool<T>, Runner<T>), StartError> {
        if self.policy.max_attempts == 0 {
            return Err(StartError::InvalidConfig {
                setting: "max_attempts",
                reason: "must be at least 1".into(),
            });
        }
        if self.policy.max_interruptions == 0 {
            return Err(StartError::InvalidConfig {
                setting: "max_interruptions",
                reason: "must be at least 1".into(),
            });
        }
        let catch = self.config.catch_signals;
        if catch {
            crate::signal::catch_signals().map_err(StartError::Signals)?;
        }
        let (pool, runner) = pool::build(self.config, self.policy, self.codec).await?;
        if catch {
            pool.listen_for_signals().map_err(StartError::Signals)?;
        }
        Ok((pool, runner))
    }

    /// [`build`](Self::build), then [`Runner::run`] with `handler`: the one-step start.
    ///
    /// The handler is called once per run of a task. Its future must be `Send + 'static`. An
    /// `Err` or a panic is a failed attempt: the task is retried after its backoff, and kept as
    /// a dead letter once out of attempts (or at once, for a
    /// [`Permanent`](crate::Permanent) error).
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build).
    ///
    /// # Panics
    ///
    /// Panics if called outside a tokio runtime.
    pub async fn start<F, Fut, E>(self, handler: F) -> Result<Pool<T>, StartError>
    where
        F: Fn(Task<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let (pool, runner) = self.build().await?;
        runner.run(handler);
        Ok(pool)
    }
}
