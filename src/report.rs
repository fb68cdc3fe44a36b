//! What the pool tells about itself: state, counters, and the reports of start and shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{FileKind, JournalError, error_chain};
use crate::task::TaskId;

/// Where a pool is in its life. Watch it with [`Pool::state`](crate::Pool::state); fail a
/// readiness probe as soon as it leaves `Running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Accepting and running tasks.
    Running,
    /// Intake is closed; queued tasks are spilled, in-flight tasks run to the deadline.
    Draining,
    /// Everything is finished or journaled, and the journal is unlocked.
    Stopped,
}

/// A watch on a pool's [`State`], from [`Pool::watch_state`](crate::Pool::watch_state).
///
/// Cheap to clone; each clone sees every change from the moment it was made.
#[derive(Debug, Clone)]
pub struct StateWatch(pub(crate) tokio::sync::watch::Receiver<State>);

impl StateWatch {
    /// The state now.
    #[must_use]
    pub fn get(&self) -> State {
        *self.0.borrow()
    }

    /// Waits for the state to change from the one last seen (by this method, `wait_for`, or
    /// since the watch was made) and returns the new one. `None` once the pool is gone and no
    /// change can come.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn changed(&mut self) -> Option<State> {
        self.0.changed().await.ok()?;
        Some(*self.0.borrow_and_update())
    }

    /// Waits until the state satisfies `condition` (at once if it does now) and returns it.
    /// `None` if the pool is gone before it does.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn wait_for(&mut self, mut condition: impl FnMut(State) -> bool) -> Option<State> {
        self.0
            .wait_for(|state| condition(*state))
            .await
            .ok()
            .map(|s| *s)
    }
}

/// Whether a pool can take work: what a readiness probe asks, from
/// [`Pool::health`](crate::Pool::health).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Health {
    /// Running, and the journal can take what the pool holds.
    Ready,
    /// Shutting down, from the first trigger on: send no more work here.
    ShuttingDown,
    /// The journal cannot take what the pool holds: it has failed (a write or fsync error),
    /// or the spill reserve cannot grow to cover the tasks in memory (a full disk). New tasks
    /// are refused; the error says why.
    JournalUnavailable(Arc<JournalError>),
    /// Write-ahead with the PostgreSQL store: the last commit or lease renewal failed (the
    /// error is a [`PostgresError`](crate::PostgresError)), so new tasks are refused until
    /// the server answers again. The next submit tries it again.
    #[cfg(feature = "postgres")]
    StoreUnavailable(Arc<dyn std::error::Error + Send + Sync>),
}

impl Health {
    /// Whether the pool is ready for more work.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready)
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ready => f.write_str("ready"),
            Self::ShuttingDown => f.write_str("shutting down"),
            Self::JournalUnavailable(error) => {
                write!(f, "journal unavailable: {}", error_chain(&**error))
            }
            #[cfg(feature = "postgres")]
            Self::StoreUnavailable(error) => {
                write!(f, "PostgreSQL unavailable: {}", error_chain(&**error))
            }
        }
    }
}

/// The counters a pool keeps, shared by [`Stats`] (while it runs) and [`ShutdownReport`]
/// (when it has stopped): one definition, one integer type.
///
/// `replayed + submitted = completed + failed + dropped + spilled + interrupted + unsaved`
/// once the pool has stopped, plus the tasks still queued or in flight before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Counts {
    /// Tasks reloaded from the journal at start; with the PostgreSQL store, tasks claimed
    /// from it.
    pub replayed: u64,
    /// Tasks accepted by `submit` or `try_submit` in this run.
    pub submitted: u64,
    /// Tasks whose handler returned `Ok`.
    pub completed: u64,
    /// Tasks set aside as dead letters in this run: out of attempts, a permanent error, or
    /// interrupted at the deadline too often (or by the deadline policy). A task whose dead
    /// letter could not be written is spilled as a live task instead.
    pub failed: u64,
    /// Failed attempts scheduled for a retry (a task can count several times).
    pub retried: u64,
    /// Tasks dropped at the drain deadline by the deadline policy; with the PostgreSQL store,
    /// also claimed tasks whose lease was lost (another pool holds them now).
    pub dropped: u64,
    /// Tasks journaled at shutdown without having been interrupted: queued ones (spilled at
    /// once), and failed ones waiting for their retry (with the time they may run).
    pub spilled: u64,
    /// In-flight tasks stopped at the drain deadline and journaled as interrupted.
    pub interrupted: u64,
    /// Tasks the final spill could not journal because the journal failed. Zero unless the
    /// report's `journal_error` is set. An upper bound on what is lost: the segments that held
    /// them before are kept after a failure, so a replayed task, or any task in write-ahead
    /// mode, may still come back from there at the next start.
    pub unsaved: u64,
    /// Write-ahead: live tasks copied out of old segments by compaction, so those segments
    /// could be deleted.
    pub compacted: u64,
    /// Tasks not run because their time to live ran out first. Each is also counted in
    /// `failed` or `dropped`, as [`Builder::on_expiry`](crate::Builder::on_expiry) says.
    pub expired: u64,
}

/// A snapshot of a running pool, from [`Pool::stats`](crate::Pool::stats).
///
/// It dereferences to its [`Counts`], so `stats.completed` reads a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Tasks waiting for a worker (replayed ones, and failed ones waiting for their retry,
    /// included).
    pub queued: u64,
    /// Tasks whose handler is running.
    pub in_flight: u64,
    /// Whether the journal can take what the pool holds: false once it has failed, or while
    /// its spill reserve cannot grow to cover the tasks in memory (a full disk). A readiness
    /// probe should fail then.
    pub journal_ready: bool,
    /// Bytes of disk set aside for the spill (on-shutdown mode, with the spill reserve on).
    pub spill_reserve: u64,
    /// The counters.
    pub counts: Counts,
}

impl std::ops::Deref for Stats {
    type Target = Counts;

    fn deref(&self) -> &Counts {
        &self.counts
    }
}

/// One stretch of damage found in a segment at start.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Damage {
    /// The segment.
    pub path: PathBuf,
    /// Offset of the first bad byte.
    pub offset: u64,
    /// How many bytes were lost.
    pub len: u64,
    /// What was wrong there.
    pub reason: String,
}

/// A directory entry named like a segment that is not a regular file (a symbolic link, a
/// named pipe, a directory, …): never opened, left in place, and reported.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Skipped {
    /// The entry.
    pub path: PathBuf,
    /// What it is.
    pub kind: FileKind,
}

/// What recovery found when the pool started, from [`Pool::recovery`](crate::Pool::recovery).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Segment files read.
    pub segments: u64,
    /// Valid records read.
    pub records: u64,
    /// Live tasks queued for replay, ahead of any new submission.
    pub replayed: u64,
    /// Dead letters present in the directory.
    pub dead_letters: u64,
    /// Records whose payload no longer decodes into the task type, found at start; each was
    /// moved to the dead letters with its decode error. Only the first 1,024 replayed tasks
    /// are decoded at start; the rest are decoded as workers take them, and one that no longer
    /// decodes becomes a dead letter then (counted in the shutdown report's `failed`).
    pub undecodable: u64,
    /// Tails cut off by a crash mid-write, truncated (expected after a kill).
    pub torn_tails: Vec<Damage>,
    /// Damage in the middle of a segment: each costs the records it covers, nothing more.
    pub damage: Vec<Damage>,
    /// Copies of damaged segments kept for inspection, under the journal's `damaged/`.
    pub damaged_copies: Vec<PathBuf>,
    /// Entries named like segments that are not regular files: not read, left in place.
    pub skipped: Vec<Skipped>,
    /// With the PostgreSQL store: live tasks the local journal held (an earlier handoff that
    /// fell back to it), handed on to PostgreSQL at this start instead of replayed here (so
    /// not in `replayed`); committed there before their segments were retired.
    #[cfg(feature = "postgres")]
    pub forwarded: u64,
}

/// How a drain deadline was derived from the orchestrator's grace period.
///
/// `drain_deadline = grace_period - pre_stop - cancel_grace - spill_reserve`, where the spill
/// reserve covers the final spill (at most one task per worker, at the average record size
/// seen), three fsyncs at the latency measured at start, and a safety margin of 5% of what is
/// left after the pre-stop delay (at least 100 ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Budget {
    /// The grace period given.
    pub grace_period: Duration,
    /// The pre-stop delay given.
    pub pre_stop: Duration,
    /// The cancel grace given.
    pub cancel_grace: Duration,
    /// The time kept back for the final spill and sync.
    pub spill_reserve: Duration,
    /// The estimated time to spill the queue at shutdown (it runs during the drain; if it is
    /// longer than the drain, the shutdown may outlast the grace period).
    pub queue_spill_estimate: Duration,
    /// The deadline derived.
    pub drain_deadline: Duration,
    /// The journal's write speed measured at start, fsync included, in bytes per second.
    pub write_bytes_per_sec: u64,
    /// The fsync latency measured at start.
    pub fsync_latency: Duration,
}

/// What a shutdown did, returned by [`Pool::shutdown`](crate::Pool::shutdown) and
/// [`Pool::wait`](crate::Pool::wait).
///
/// It dereferences to its [`Counts`], so `report.completed` reads a counter. The counts add
/// up: `replayed + submitted = completed + failed + dropped + spilled + interrupted +
/// unsaved`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// The counters, final.
    pub counts: Counts,
    /// Ids of the tasks journaled as interrupted (saved: a task the spill could not save is in
    /// `unsaved_ids` instead).
    pub interrupted_ids: Vec<TaskId>,
    /// Ids of the tasks the final spill could not save (a full disk, a failed journal), in id
    /// order; as many as `unsaved`.
    pub unsaved_ids: Vec<TaskId>,
    /// From the shutdown trigger to the report.
    pub elapsed: Duration,
    /// The drain deadline this shutdown used (given, or derived from the grace period).
    pub drain_deadline: Duration,
    /// The time spent waiting for in-flight tasks (the queued tasks' spill runs meanwhile).
    pub drain_time: Duration,
    /// The time spent encoding and writing spilled tasks, fsync excluded.
    pub spill_time: Duration,
    /// The time spent in fsync (spills and the final sync).
    pub sync_time: Duration,
    /// How the deadline was derived from the grace period, if one was given.
    pub budget: Option<Budget>,
    /// The journal directory.
    pub journal_dir: PathBuf,
    /// The first journal failure during the run or the shutdown, if any.
    pub journal_error: Option<Arc<JournalError>>,
    /// With the PostgreSQL store: how many of the tasks this shutdown saved (`spilled` and
    /// `interrupted`) were handed off to PostgreSQL; the others went to the local journal.
    #[cfg(feature = "postgres")]
    pub handed_off: u64,
    /// With the PostgreSQL store: why a handoff failed, if one did (a
    /// [`PostgresError`](crate::PostgresError)). Its tasks, and those of any later handoff in
    /// the same shutdown, were journaled locally instead (and counted in `spilled` or
    /// `interrupted` all the same); the next start on the directory hands them on. Nothing
    /// is lost, so this alone does not make the shutdown unclean.
    #[cfg(feature = "postgres")]
    pub handoff_error: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl std::ops::Deref for ShutdownReport {
    type Target = Counts;

    fn deref(&self) -> &Counts {
        &self.counts
    }
}

impl ShutdownReport {
    /// Whether every task this run held is finished or durably journaled.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.unsaved == 0 && self.journal_error.is_none()
    }

    /// The conventional exit status for a service that stopped with this report: success when
    /// the shutdown was clean (every task finished or durably journaled: a graceful stop on
    /// SIGTERM is a success to systemd and Kubernetes), failure (1) when a journal failure
    /// kept tasks from being saved or left the journal in doubt, so the orchestrator and the
    /// logs show it.
    ///
    /// ```no_run
    /// # async fn example(pool: drainpool::Pool<String>) -> Result<std::process::ExitCode, drainpool::RunError> {
    /// let report = pool.run_until_signal().await?;
    /// Ok(report.exit_code())
    /// # }
    /// ```
    #[must_use]
    pub fn exit_code(&self) -> std::process::ExitCode {
        if self.is_clean() {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        }
    }
}

/// One of the pool's counters: its own count and, with the `metrics` feature, the metric that
/// moves with it, so that a metric and [`Stats`] never disagree. Each on a cache line of its
/// own: the submitter's count and the workers' do not make each other's core reload it.
#[derive(Debug)]
#[repr(align(64))]
pub(crate) struct Tally {
    count: AtomicU64,
    #[cfg(feature = "metrics")]
    metric: metrics::Counter,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            count: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            metric: metrics::Counter::noop(),
        }
    }
}

impl Tally {
    /// A count whose every step also goes to `metric`.
    #[cfg(feature = "metrics")]
    pub(crate) fn recorded(metric: metrics::Counter) -> Self {
        Self {
            count: AtomicU64::new(0),
            metric,
        }
    }

    pub(crate) fn add(&self, n: u64) {
        self.count.fetch_add(n, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metric.increment(n);
    }

    pub(crate) fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// A count the workers move, in stripes: one per worker, each on cache lines of its own, so
/// that two workers finishing tasks at once do not take the line from each other at every
/// task. Only worker `i` moves stripe `i`, so a step is a load and a store, not a locked
/// read-modify-write (which cost about a tenth of the steady no-op rate, three per task).
/// Reading sums the stripes.
#[derive(Debug)]
pub(crate) struct Striped {
    stripes: Box<[Stripe]>,
}

/// 128 bytes: the pair of lines the adjacent-line prefetcher moves together.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

impl Striped {
    /// A count for `workers` workers (at least one stripe).
    pub(crate) fn new(workers: usize) -> Self {
        Self {
            stripes: (0..workers.max(1)).map(|_| Stripe::default()).collect(),
        }
    }

    /// The stripe of worker `stripe`: the caller is that worker, the only one to move it.
    fn own(&self, stripe: usize) -> &AtomicU64 {
        &self.stripes[stripe % self.stripes.len()].0
    }

    pub(crate) fn add(&self, stripe: usize, n: u64) {
        let own = self.own(stripe);
        own.store(
            own.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    pub(crate) fn sub(&self, stripe: usize, n: u64) {
        let own = self.own(stripe);
        own.store(
            own.load(Ordering::Relaxed).wrapping_sub(n),
            Ordering::Relaxed,
        );
    }

    /// The sum of the stripes (one stripe may be below zero on its own: a task counted up on
    /// one worker's stripe is never counted down on another's, so the sum never is).
    pub(crate) fn get(&self) -> u64 {
        self.stripes.iter().fold(0, |sum, stripe| {
            sum.wrapping_add(stripe.0.load(Ordering::Relaxed))
        })
    }
}

/// A [`Tally`] the workers move: counted in [`Striped`] stripes.
#[derive(Debug)]
pub(crate) struct WorkerTally {
    count: Striped,
    #[cfg(feature = "metrics")]
    metric: metrics::Counter,
}

impl WorkerTally {
    /// A count for `workers` workers.
    #[cfg(not(feature = "metrics"))]
    pub(crate) fn new(workers: usize) -> Self {
        Self {
            count: Striped::new(workers),
        }
    }

    /// A count for `workers` workers whose every step also goes to `metric`.
    #[cfg(feature = "metrics")]
    pub(crate) fn recorded(workers: usize, metric: metrics::Counter) -> Self {
        Self {
            count: Striped::new(workers),
            metric,
        }
    }

    /// Adds `n` on the stripe of worker `stripe`.
    pub(crate) fn add(&self, stripe: usize, n: u64) {
        self.count.add(stripe, n);
        #[cfg(feature = "metrics")]
        self.metric.increment(n);
    }

    pub(crate) fn get(&self) -> u64 {
        self.count.get()
    }
}

/// The live counters behind [`Counts`].
#[derive(Debug)]
pub(crate) struct Counters {
    pub(crate) replayed: Tally,
    pub(crate) submitted: Tally,
    pub(crate) completed: WorkerTally,
    pub(crate) failed: Tally,
    pub(crate) retried: Tally,
    pub(crate) dropped: Tally,
    pub(crate) spilled: Tally,
    pub(crate) interrupted: Tally,
    pub(crate) unsaved: Tally,
    pub(crate) compacted: Tally,
    pub(crate) expired: Tally,
    /// Failed runs (an error or a panic before the deadline): a metric only, not a [`Counts`]
    /// field.
    #[cfg(feature = "metrics")]
    pub(crate) failed_runs: Tally,
    /// Handlers running now (not a [`Counts`] field: [`Stats::in_flight`]).
    pub(crate) in_flight: Striped,
}

impl Counters {
    /// Counters for a pool of `workers` workers, all at zero.
    #[cfg(not(feature = "metrics"))]
    pub(crate) fn new(workers: usize) -> Self {
        Self {
            replayed: Tally::default(),
            submitted: Tally::default(),
            completed: WorkerTally::new(workers),
            failed: Tally::default(),
            retried: Tally::default(),
            dropped: Tally::default(),
            spilled: Tally::default(),
            interrupted: Tally::default(),
            unsaved: Tally::default(),
            compacted: Tally::default(),
            expired: Tally::default(),
            in_flight: Striped::new(workers),
        }
    }

    /// The counters as they stand.
    pub(crate) fn snapshot(&self) -> Counts {
        Counts {
            replayed: self.replayed.get(),
            submitted: self.submitted.get(),
            completed: self.completed.get(),
            failed: self.failed.get(),
            retried: self.retried.get(),
            dropped: self.dropped.get(),
            spilled: self.spilled.get(),
            interrupted: self.interrupted.get(),
            unsaved: self.unsaved.get(),
            compacted: self.compacted.get(),
            expired: self.expired.get(),
        }
    }
}
