//! A store that several pools share (PostgreSQL, with the `postgres` feature), as the pool sees
//! it: typed tasks in and out, each call bounded in time by the store itself.
//!
//! The protocol, seen from one pool:
//!
//! - at start, [`Connect::connect`] gives this pool a run number unique among every pool on the
//!   store (and above the journal directory's own), which is also the owner of its leases, and
//!   hands on the tasks a local journal holds (a handoff that fell back to it);
//! - at shutdown, queued and interrupted tasks are **handed off** in one transaction each
//!   ([`Remote::hand_off`]); a task this pool had claimed is written back with its lease
//!   cleared, unless another pool holds a live lease on it by then;
//! - while running, a pool **claims** tasks due now, higher priorities first and in id order
//!   within one ([`Remote::claim`]), each leased to it (and holds their unique keys); a claim whose previous lease had expired is a *rescue*, counted as an
//!   interruption;
//! - its leases are **renewed** together ([`Remote::renew`]); a task whose lease is gone is no
//!   longer this pool's: its handler's token fires, and its outcome is not recorded;
//! - a claimed task that finishes is deleted, one that failed has its new state written
//!   ([`Remote::settle`], batched); both only while this pool still holds its lease;
//! - in write-ahead mode, every accepted task is **inserted leased to this pool** before
//!   `submit` returns ([`Remote::write_ahead`], one statement for every submit waiting: a
//!   group commit), so it is held exactly like a claimed one from then on;
//! - a task out of attempts is kept as a **dead letter** in the store ([`Remote::dead_letter`]):
//!   its row marked dead, never claimed again until requeued.
//!
//! [`Claims`] is the pool's side of it: the leases held, the outcomes waiting for the next
//! settle, the first failure, and in write-ahead mode the submits waiting for their commit
//! ([`Commits`]). The background tasks that claim, renew and commit are in `claims.rs`.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lock::lock;
use super::shutdown::Owned;
use crate::error::StartError;
use crate::journal::{TaskOptions, TaskState};
use crate::task::TaskId;

/// A boxed future, for the store's calls (made by a trait object).
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A store failure: what the report shows. With the `postgres` feature it is a
/// `PostgresError`.
pub(crate) type RemoteError = Arc<dyn std::error::Error + Send + Sync>;

/// A task as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredTask {
    pub(crate) id: TaskId,
    pub(crate) state: TaskState,
    pub(crate) last_error: Option<Box<str>>,
    /// The payload, as the pool's codec encoded it.
    pub(crate) payload: Vec<u8>,
    /// Its options, if any is set.
    pub(crate) options: Option<Box<TaskOptions>>,
}

/// A task just claimed.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) task: StoredTask,
    /// Whether its previous lease had expired (a pool died holding it): the store counted the
    /// interruption already.
    pub(crate) rescued: bool,
}

/// A claimed task's new state after a failed attempt.
#[derive(Debug, Clone)]
#[cfg_attr(
    not(feature = "postgres"),
    expect(dead_code, reason = "read by the PostgreSQL store only")
)]
pub(crate) struct Failed {
    pub(crate) id: TaskId,
    pub(crate) state: TaskState,
    pub(crate) last_error: Box<str>,
}

/// How the pool paces its calls, as the store was configured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pacing {
    /// How long a lease lasts without renewal.
    pub(crate) lease: Duration,
    /// The most tasks one claim takes.
    pub(crate) claim_batch: usize,
    /// How often to look for work when no notification comes.
    pub(crate) poll_interval: Duration,
    /// The bound on each operation.
    pub(crate) timeout: Duration,
}

/// Makes the store's connection at start (the settings the user gave, type-erased).
pub(crate) trait Connect: Send + Sync + fmt::Debug + 'static {
    /// Checks the settings, before anything is opened.
    fn check(&self) -> Result<(), StartError>;
    /// Connects (and migrates the schema, if asked), takes this pool's run number (unique
    /// among the store's pools, and at least `dir_run`), and hands off `forward` (the tasks
    /// the local journal held) in one transaction.
    fn connect(
        &self,
        dir_run: u64,
        forward: Vec<StoredTask>,
    ) -> BoxFuture<'_, Result<Arc<dyn Remote>, StartError>>;
}

/// The store's operations.
pub(crate) trait Remote: Send + Sync + 'static {
    /// This pool's run number, the owner of its leases.
    fn run(&self) -> u64;
    fn pacing(&self) -> Pacing;
    /// Writes `tasks` in one transaction (a claimed one's lease cleared, unless another pool
    /// holds a live one), then wakes the pools that listen. The first `stored` may have rows
    /// already (claimed from the store); the others were never written to it.
    fn hand_off(
        &self,
        tasks: Vec<StoredTask>,
        stored: usize,
    ) -> BoxFuture<'_, Result<(), RemoteError>>;
    /// Claims up to `limit` tasks due now, higher priorities first and in id order within
    /// one, leased to this pool.
    fn claim(&self, limit: usize) -> BoxFuture<'_, Result<Vec<Claimed>, RemoteError>>;
    /// Renews this pool's leases on `tasks` (no other: a lease it gave up must expire, for
    /// another pool to rescue the task); returns those it still holds.
    fn renew(&self, tasks: Vec<TaskId>) -> BoxFuture<'_, Result<Vec<TaskId>, RemoteError>>;
    /// Deletes finished tasks and writes failed ones' states, for tasks this pool still holds.
    fn settle(
        &self,
        done: Vec<TaskId>,
        failed: Vec<Failed>,
    ) -> BoxFuture<'_, Result<(), RemoteError>>;
    /// Write-ahead: inserts new tasks, leased to this pool for a lease, in one statement
    /// (one commit). Bounded by the store's timeout; on failure none of them may be relied
    /// on (a lost answer to the commit leaves them unknown).
    fn write_ahead(&self, tasks: Vec<StoredTask>) -> BoxFuture<'_, Result<(), RemoteError>>;
    /// Keeps `task` as a dead letter (its `last_error` the reason): its row is written and
    /// marked dead, its lease cleared. `Ok(false)`: another pool holds a live lease on it
    /// (it is that pool's now), nothing was written.
    fn dead_letter(&self, task: StoredTask) -> BoxFuture<'_, Result<bool, RemoteError>>;
    /// The SQL that inserts `task` (unleased, due now) and wakes the pools that listen, for
    /// a caller to run inside its own transaction: literals only, no parameters, so that any
    /// client can run it.
    #[cfg(feature = "postgres")]
    fn insert_sql(&self, task: &StoredTask) -> String;
    /// The error a wait for the store reports when it gave up after the store's timeout.
    fn timed_out(&self, op: &'static str) -> RemoteError;
    /// Resolves when another pool may have handed off work (a notification).
    fn woken(&self) -> BoxFuture<'_, ()>;
    /// Closes the connections.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// One claimed task's lease, as its job carries it.
#[derive(Debug)]
pub(crate) struct Lease {
    /// The handler's token: a child of the pool's deadline token, also fired when the lease
    /// is lost.
    pub(crate) token: Arc<CancellationToken>,
    lost: AtomicBool,
}

impl Lease {
    /// Whether another pool may hold the task now.
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    fn lose(&self) {
        self.lost.store(true, Ordering::Release);
        self.token.cancel();
    }
}

/// A lease held, and since when it is known to be good.
struct Held {
    lease: Arc<Lease>,
    /// When the claim (or insert) or the last renewal that covered it was sent.
    good_since: Instant,
    /// When the claim or insert was known to be committed: a renewal sent before then may
    /// not have seen the row yet, so its absence from that renewal's answer means nothing.
    confirmed: Instant,
}

/// Outcomes waiting for the next settle.
#[derive(Default)]
struct Pending {
    done: Vec<TaskId>,
    failed: Vec<Failed>,
}

/// The pool's side of the shared store.
pub(crate) struct Claims {
    pub(crate) store: Arc<dyn Remote>,
    held: std::sync::Mutex<HashMap<TaskId, Held>>,
    pending: std::sync::Mutex<Pending>,
    /// Woken when an outcome is pending.
    pub(crate) settle_ready: Notify,
    /// The first handoff failure: later handoffs go to the local journal at once.
    handoff_error: std::sync::Mutex<Option<RemoteError>>,
    /// Tasks committed to the store by this pool's handoffs.
    pub(crate) handed_off: AtomicU64,
    /// Tasks handed on at start from the local journal.
    #[cfg_attr(
        not(feature = "postgres"),
        expect(dead_code, reason = "reported with the PostgreSQL store only")
    )]
    pub(crate) forwarded: u64,
    /// The claimer, stopped at the trigger.
    pub(crate) claimer: Owned,
    /// Renewals and settles, stopped once the last worker is gone.
    pub(crate) heartbeat: Owned,
    /// Write-ahead mode: the submits waiting for their commit. `None` in the on-shutdown mode.
    pub(crate) commits: Option<Commits>,
    /// The committer, stopped once the last worker is gone (before the heartbeat).
    pub(crate) committer: Owned,
    /// Why the store's last commit or renewal failed, until one succeeds again.
    trouble: std::sync::Mutex<Option<RemoteError>>,
}

impl Claims {
    /// `write_ahead`: every accepted task is committed to the store before `submit` returns.
    pub(crate) fn new(store: Arc<dyn Remote>, forwarded: u64, write_ahead: bool) -> Self {
        Self {
            store,
            held: std::sync::Mutex::new(HashMap::new()),
            pending: std::sync::Mutex::new(Pending::default()),
            settle_ready: Notify::new(),
            handoff_error: std::sync::Mutex::new(None),
            handed_off: AtomicU64::new(0),
            forwarded,
            claimer: Owned::new(),
            heartbeat: Owned::new(),
            commits: write_ahead.then(Commits::default),
            committer: Owned::new(),
            trouble: std::sync::Mutex::new(None),
        }
    }

    /// A store operation (a commit, a renewal) went through, or failed with `error`.
    pub(crate) fn reached(&self, error: Option<&RemoteError>) {
        *lock(&self.trouble) = error.cloned();
    }

    /// Why the store could not be reached the last time it was tried, if it could not.
    #[cfg_attr(
        not(feature = "postgres"),
        expect(
            dead_code,
            reason = "reported by `Pool::health` with the PostgreSQL store only"
        )
    )]
    pub(crate) fn trouble(&self) -> Option<RemoteError> {
        lock(&self.trouble).clone()
    }

    /// Takes a lease on `id`, claimed by a call sent at `sent`; its token is a child of
    /// `deadline`.
    pub(crate) fn hold(
        &self,
        id: TaskId,
        deadline: &CancellationToken,
        sent: Instant,
    ) -> Arc<Lease> {
        let lease = Arc::new(Lease {
            token: Arc::new(deadline.child_token()),
            lost: AtomicBool::new(false),
        });
        let held = Held {
            lease: Arc::clone(&lease),
            good_since: sent,
            confirmed: Instant::now(),
        };
        lock(&self.held).insert(id, held);
        lease
    }

    /// How many leases this pool holds.
    pub(crate) fn held(&self) -> usize {
        lock(&self.held).len()
    }

    /// The tasks whose leases a renewal keeps: those held, and those finished here (or
    /// revoked) whose rows wait for the next settle.
    pub(crate) fn leased(&self) -> Vec<TaskId> {
        let mut ids: Vec<TaskId> = lock(&self.held).keys().copied().collect();
        ids.extend(lock(&self.pending).done.iter().copied());
        ids
    }

    /// A claimed task finished here (completed, dropped, dead-lettered): its row goes.
    pub(crate) fn done(&self, id: TaskId) {
        lock(&self.held).remove(&id);
        lock(&self.pending).done.push(id);
        self.settle_ready.notify_one();
    }

    /// Rows this pool may have committed for tasks it did not accept after all (a
    /// write-ahead submit that was refused): deleted by the next settle, if they exist.
    pub(crate) fn revoke(&self, ids: Vec<TaskId>) {
        lock(&self.pending).done.extend(ids);
        self.settle_ready.notify_one();
    }

    /// A claimed task failed an attempt and waits here for its retry: its row gets the state.
    pub(crate) fn failed(&self, failed: Failed) {
        lock(&self.pending).failed.push(failed);
        self.settle_ready.notify_one();
    }

    /// The claimed tasks among `ids` left this pool (handed back, or journaled locally).
    pub(crate) fn release(&self, ids: impl IntoIterator<Item = TaskId>) {
        let mut held = lock(&self.held);
        for id in ids {
            held.remove(&id);
        }
    }

    /// The outcomes waiting to be settled, taken.
    pub(crate) fn take_pending(&self) -> (Vec<TaskId>, Vec<Failed>) {
        let pending = std::mem::take(&mut *lock(&self.pending));
        (pending.done, pending.failed)
    }

    /// Puts outcomes back after a failed settle, ahead of newer ones.
    pub(crate) fn restore_pending(&self, done: Vec<TaskId>, failed: Vec<Failed>) {
        let mut pending = lock(&self.pending);
        let newer = std::mem::replace(&mut *pending, Pending { done, failed });
        pending.done.extend(newer.done);
        pending.failed.extend(newer.failed);
    }

    /// A renewal sent at `sent` came back with `still` (the tasks this pool still holds): the
    /// leases it covered are good from `sent`; those held since before it and not in `still`
    /// are lost.
    pub(crate) fn renewed(&self, still: &[TaskId], sent: Instant) {
        let still: std::collections::HashSet<TaskId> = still.iter().copied().collect();
        self.lose_unless("another pool holds the task now", |id, held| {
            if still.contains(id) {
                held.good_since = held.good_since.max(sent);
                return true;
            }
            // Committed after the renewal was sent, it need not be in it.
            held.confirmed >= sent
        });
    }

    /// Loses every lease not renewed within `limit` (renewals failing): their handlers' tokens
    /// fire before another pool may rescue the tasks.
    pub(crate) fn expire(&self, limit: Duration) {
        let now = Instant::now();
        self.lose_unless("not renewed in time", |_, held| {
            now.duration_since(held.good_since) < limit
        });
    }

    /// Loses (and forgets) every lease for which `keep` is false.
    fn lose_unless(&self, why: &str, mut keep: impl FnMut(&TaskId, &mut Held) -> bool) {
        lock(&self.held).retain(|id, held| {
            if keep(id, held) {
                return true;
            }
            tracing::warn!(task = %id, why, "lease lost");
            held.lease.lose();
            false
        });
    }

    /// Records a failed handoff; the first one is kept for the report.
    pub(crate) fn handoff_failed(&self, error: RemoteError) {
        lock(&self.handoff_error).get_or_insert(error);
    }

    /// The first handoff failure, if any.
    pub(crate) fn handoff_error(&self) -> Option<RemoteError> {
        lock(&self.handoff_error).clone()
    }
}

/// How a write-ahead submit's commit went: the time its statement was sent (its lease counts
/// from then), or why it failed.
pub(crate) type Committed = Result<Instant, RemoteError>;

/// Write-ahead: the tasks waiting for the committer, each with its submit's answer.
#[derive(Default)]
pub(crate) struct Commits {
    waiting: std::sync::Mutex<Waiting>,
    /// Wakes the committer.
    pub(crate) ready: Notify,
}

#[derive(Default)]
struct Waiting {
    tasks: Vec<StoredTask>,
    answers: Vec<oneshot::Sender<Committed>>,
    /// The committer stopped: nothing more is taken.
    closed: bool,
}

/// A batch the committer took: the tasks, and their submits' answers in the same order.
pub(crate) type Batch = (Vec<StoredTask>, Vec<oneshot::Sender<Committed>>);

impl Commits {
    /// Hands a task to the committer; `None` once it has stopped.
    pub(crate) fn push(&self, task: StoredTask) -> Option<oneshot::Receiver<Committed>> {
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = lock(&self.waiting);
            if waiting.closed {
                return None;
            }
            waiting.tasks.push(task);
            waiting.answers.push(tx);
        }
        self.ready.notify_one();
        Some(rx)
    }

    /// Everything waiting, taken (empty when nothing is).
    pub(crate) fn take(&self) -> Batch {
        let mut waiting = lock(&self.waiting);
        (
            std::mem::take(&mut waiting.tasks),
            std::mem::take(&mut waiting.answers),
        )
    }

    /// From now on nothing is taken: later pushes are refused.
    pub(crate) fn close(&self) {
        lock(&self.waiting).closed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store never called: `Claims` alone is under test.
    struct Unused;

    impl Remote for Unused {
        fn run(&self) -> u64 {
            1
        }
        fn pacing(&self) -> Pacing {
            Pacing {
                lease: Duration::from_secs(2),
                claim_batch: 1,
                poll_interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
            }
        }
        fn hand_off(&self, _: Vec<StoredTask>, _: usize) -> BoxFuture<'_, Result<(), RemoteError>> {
            Box::pin(std::future::pending())
        }
        fn claim(&self, _: usize) -> BoxFuture<'_, Result<Vec<Claimed>, RemoteError>> {
            Box::pin(std::future::pending())
        }
        fn renew(&self, _: Vec<TaskId>) -> BoxFuture<'_, Result<Vec<TaskId>, RemoteError>> {
            Box::pin(std::future::pending())
        }
        fn settle(&self, _: Vec<TaskId>, _: Vec<Failed>) -> BoxFuture<'_, Result<(), RemoteError>> {
            Box::pin(std::future::pending())
        }
        fn write_ahead(&self, _: Vec<StoredTask>) -> BoxFuture<'_, Result<(), RemoteError>> {
            Box::pin(std::future::pending())
        }
        fn dead_letter(&self, _: StoredTask) -> BoxFuture<'_, Result<bool, RemoteError>> {
            Box::pin(std::future::pending())
        }
        #[cfg(feature = "postgres")]
        fn insert_sql(&self, _: &StoredTask) -> String {
            String::new()
        }
        fn timed_out(&self, _: &'static str) -> RemoteError {
            Arc::new(std::io::Error::other("timed out"))
        }
        fn woken(&self) -> BoxFuture<'_, ()> {
            Box::pin(std::future::pending())
        }
        fn close(&self) -> BoxFuture<'_, ()> {
            Box::pin(std::future::ready(()))
        }
    }

    const MS: Duration = Duration::from_millis(1);

    /// The claimer and the heartbeat use two connections, so a renewal sent while a claim is
    /// on its way may run before the claim commits. Its answer then lacks the new leases,
    /// which were good all along.
    #[tokio::test(start_paused = true)]
    async fn a_renewal_sent_before_a_claim_was_answered_loses_none_of_its_leases() {
        let claims = Claims::new(Arc::new(Unused), 0, false);
        let deadline = CancellationToken::new();
        let claim_sent = Instant::now();
        tokio::time::advance(MS).await;
        let renewal_sent = Instant::now();
        tokio::time::advance(MS).await;
        // The claim's answer comes after the renewal was sent.
        let lease = claims.hold(TaskId::new(1, 1), &deadline, claim_sent);
        claims.renewed(&[], renewal_sent);
        assert!(!lease.is_lost() && !lease.token.is_cancelled());
        // A renewal sent after the claim's answer must find the lease: missing, it is lost.
        tokio::time::advance(MS).await;
        claims.renewed(&[], Instant::now());
        assert!(lease.is_lost() && lease.token.is_cancelled());
        assert_eq!(claims.held(), 0);
    }

    /// A renewal keeps the leases held and those of tasks finished here, waiting for their
    /// rows' delete; not one given up (it must expire, for another pool to rescue the task).
    #[tokio::test(start_paused = true)]
    async fn a_renewal_covers_the_leases_held_and_the_finished_tasks_only() {
        let claims = Claims::new(Arc::new(Unused), 0, false);
        let deadline = CancellationToken::new();
        let sent = Instant::now();
        let ids = [1, 2, 3].map(|seq| TaskId::new(1, seq));
        for id in ids {
            claims.hold(id, &deadline, sent);
        }
        claims.done(ids[1]);
        tokio::time::advance(MS).await;
        // The renewal found the first only: the third is lost.
        claims.renewed(&ids[..1], Instant::now());
        let mut leased = claims.leased();
        leased.sort_unstable();
        assert_eq!(leased, ids[..2]);
    }
}
