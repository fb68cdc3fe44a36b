//! The pool's work with a shared store (see `remote.rs` for the protocol): opening it at start,
//! the two background tasks while running, and the handoff at shutdown.
//!
//! - **At start** the store gives the run number, which is raised in the journal's `LOCK`
//!   before any task gets an id; the tasks the local journal holds (a handoff that fell back
//!   to it) are handed on, committed in the store before their segments are retired here: a
//!   crash in between hands them on twice, never loses them.
//! - **The claimer** (from `Runner::run` on) takes tasks due in the store when the queue has room, as many as fit (at
//!   most a batch), woken by the store's notification or its poll interval; it stops at the
//!   shutdown trigger, before the queue is collected, so nothing it claims is stranded.
//! - **The heartbeat** renews this pool's leases every quarter lease, loses those the store no
//!   longer gives it (their handlers' tokens fire), and loses every lease it could not renew
//!   for three quarters of a lease, before another pool may rescue them. Between renewals it
//!   settles finished and failed claimed tasks in batches. It runs until the last worker is
//!   gone, then settles what is left.
//! - **The handoff** writes queued (at the trigger) or interrupted (at the end) tasks in one
//!   transaction. When it fails, the tasks go to the local journal as before, the failure is in
//!   the report, and the later handoffs of this shutdown go straight there.
//! - **The committer** (write-ahead mode, from `build` on) inserts the tasks waiting in
//!   [`Commits`] in one statement, leased to this pool, answers their submits, and takes the
//!   next batch: the more submits arrive during one commit, the more the next one carries. A
//!   submit that gave up waiting (the store's timeout, or its future dropped) and a batch that
//!   failed have their rows, if any were committed after all, deleted by the next settle. It
//!   stops once the last worker is gone, committing what is left first.
//! - **Dead letters** go to the store (a row marked dead), or to the local journal when the
//!   store cannot take them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::job::{Job, Payload, now_ms};
use super::remote::{Claimed, Claims, Commits, Connect, Lease, StoredTask};
use super::shared::Shared;
use crate::error::{JournalError, StartError, SubmitError};
use crate::journal::{Journal, Recovered, TaskOptions, TaskState};
use crate::task::TaskId;

/// How soon the claimer looks again after a full batch, or while the queue has no room.
const CLAIM_AGAIN: Duration = Duration::from_millis(20);

/// Opens the shared store: takes the run number into the journal's `LOCK`, hands on the tasks
/// the journal holds, then retires their segments. Returns the journal and the pool's side of
/// the store.
pub(crate) async fn open(
    connect: &dyn Connect,
    journal: Journal,
    recovered: Vec<Recovered<Vec<u8>>>,
    write_ahead: bool,
) -> Result<(Journal, Claims), StartError> {
    let forwarded = recovered.len() as u64;
    let forward = recovered
        .into_iter()
        .map(|task| StoredTask {
            id: task.id,
            state: task.state,
            last_error: task.last_error,
            payload: task.value,
            options: task.options,
        })
        .collect();
    let remote = connect.connect(journal.run(), forward).await?;
    let run = remote.run();
    let journal = blocking(move || {
        let mut journal = journal;
        journal.raise_run(run)?;
        // Every task of the old segments is in the store now.
        journal.retire_obsolete()?;
        Ok(journal)
    })
    .await?;
    if forwarded > 0 {
        tracing::info!(
            tasks = forwarded,
            "handed on the locally journaled tasks to the shared store"
        );
    }
    Ok((journal, Claims::new(remote, forwarded, write_ahead)))
}

async fn blocking(
    f: impl FnOnce() -> Result<Journal, JournalError> + Send + 'static,
) -> Result<Journal, StartError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StartError::InvalidConfig {
            setting: "journal_dir",
            reason: format!("raising the run number panicked: {e}"),
        })?
        .map_err(StartError::from)
}

/// Starts the heartbeat and, in write-ahead mode, the committer, owned by the pool's
/// background tracker, at `build` (tasks submitted before the workers run are committed and
/// their leases renewed).
pub(crate) fn spawn_at_build<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>) {
    let Some(claims) = &shared.remote else {
        return;
    };
    let heartbeat = heartbeat(Arc::clone(shared), claims.heartbeat.token());
    claims.heartbeat.own(shared.background.spawn(heartbeat));
    if claims.commits.is_some() {
        let committer = committer(Arc::clone(shared), claims.committer.token());
        claims.committer.own(shared.background.spawn(committer));
    }
}

/// Starts the claimer, owned by the pool's background tracker (once the workers run: a pool
/// that runs nothing claims nothing). Started after the shutdown stopped it, it sees its
/// token cancelled and ends at once.
pub(crate) fn spawn<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>) {
    let Some(claims) = &shared.remote else {
        return;
    };
    let claimer = claimer(Arc::clone(shared), claims.claimer.token());
    claims.claimer.own(shared.background.spawn(claimer));
}

/// The claimer: see the module docs.
async fn claimer<T: Send + Sync + 'static>(shared: Arc<Shared<T>>, stop: CancellationToken) {
    let Some(claims) = &shared.remote else {
        return;
    };
    let pacing = claims.store.pacing();
    let mut failing = false;
    loop {
        let room = shared
            .config
            .queue_capacity
            .saturating_sub(shared.queue.len())
            .min(pacing.claim_batch);
        let mut again = room == 0;
        if room > 0 && !stop.is_cancelled() {
            // Not raced against `stop`: a claim that committed must reach the queue, which
            // the shutdown collects only after this task ended.
            let sent = Instant::now();
            match claims.store.claim(room).await {
                Ok(claimed) => {
                    failing = false;
                    again = claimed.len() == room;
                    take_claimed(&shared, claimed, sent).await;
                }
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(
                        error = &*error as &dyn std::error::Error,
                        "claiming from the shared store failed; retrying"
                    );
                }
                Err(_) => {}
            }
        }
        let pause = if again {
            CLAIM_AGAIN
        } else {
            pacing.poll_interval
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = claims.store.woken() => {}
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Queues claimed tasks (higher priorities first, in id order within one, as the store
/// claimed them) with their leases, each holding its unique key here from then on. One that
/// no longer decodes, or was interrupted `max_interruptions` times in a row (a pool dying with
/// it each time), is kept as a dead letter instead.
async fn take_claimed<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    mut claimed: Vec<Claimed>,
    sent: Instant,
) {
    let Some(claims) = &shared.remote else {
        return;
    };
    claimed.sort_by_key(|c| {
        let priority = c.task.options.as_ref().map_or(0, |o| o.priority);
        (std::cmp::Reverse(priority), c.task.id)
    });
    shared.counters.replayed.add(claimed.len() as u64);
    for Claimed { task, rescued } in claimed {
        let lease = claims.hold(task.id, shared.shutdown.deadline(), sent);
        if rescued {
            tracing::warn!(task = %task.id, interruptions = task.state.interruptions, "rescued a task whose lease had expired");
        }
        let poisoned = task.state.interruptions >= shared.policy.max_interruptions;
        let payload = match shared.codec.decode(&task.payload) {
            Ok(payload) if !poisoned => payload,
            Ok(_) => {
                let reason = format!(
                    "interrupted in {} consecutive runs (the pools running it died)",
                    task.state.interruptions
                );
                shared.dead_letter_claimed(task, reason).await;
                continue;
            }
            Err(error) => {
                let reason = format!("payload no longer decodes: {error}");
                shared.dead_letter_claimed(task, reason).await;
                continue;
            }
        };
        if let Some(key) = task.options.as_ref().and_then(|o| o.key.as_deref()) {
            shared.keys.adopt(key, task.id);
        }
        shared.queue.push_backlog(Job {
            id: task.id,
            state: task.state,
            last_error: task.last_error,
            payload: Payload::new(payload),
            journaled: false,
            replayed: false,
            reserved: 0,
            #[cfg(feature = "metrics")]
            queued_at: tokio::time::Instant::now(),
            lease: Some(lease),
            priority: task.options.as_ref().map_or(0, |o| o.priority),
            options: task.options,
            span: None,
        });
    }
}

/// The heartbeat: see the module docs.
async fn heartbeat<T: Send + Sync + 'static>(shared: Arc<Shared<T>>, stop: CancellationToken) {
    let Some(claims) = &shared.remote else {
        return;
    };
    let lease = claims.store.pacing().lease;
    let every = lease / 4;
    let mut next = Instant::now() + every;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(next) => {
                next = Instant::now() + every;
                renew(claims, lease).await;
            }
            () = claims.settle_ready.notified() => {}
        }
        settle(claims).await;
    }
    settle(claims).await;
}

/// One renewal of every lease; see the module docs. A renewal is given a quarter lease at most
/// (the store's timeout may be longer): a server that does not answer must not keep the
/// handlers from learning that their leases are going.
async fn renew(claims: &Claims, lease: Duration) {
    if claims.held() > 0 {
        let sent = Instant::now();
        match tokio::time::timeout(lease / 4, claims.store.renew(claims.leased())).await {
            Ok(Ok(still)) => {
                claims.reached(None);
                claims.renewed(&still, sent);
            }
            Ok(Err(error)) => {
                tracing::warn!(
                    error = &*error as &dyn std::error::Error,
                    "renewing leases failed"
                );
                claims.reached(Some(&error));
            }
            Err(_) => {
                tracing::warn!("renewing leases took over a quarter lease; given up");
                claims.reached(Some(&claims.store.timed_out("renew leases")));
            }
        }
    }
    claims.expire(lease * 3 / 4);
}

/// Deletes the rows of finished claimed tasks and writes failed ones' states; on failure they
/// wait for the next try.
async fn settle(claims: &Claims) {
    let (done, failed) = claims.take_pending();
    if done.is_empty() && failed.is_empty() {
        return;
    }
    if let Err(error) = claims.store.settle(done.clone(), failed.clone()).await {
        tracing::warn!(
            error = &*error as &dyn std::error::Error,
            tasks = done.len() + failed.len(),
            "settling claimed tasks failed; will retry"
        );
        claims.restore_pending(done, failed);
    }
}

/// The committer: see the module docs.
async fn committer<T: Send + Sync + 'static>(shared: Arc<Shared<T>>, stop: CancellationToken) {
    let Some(claims) = &shared.remote else {
        return;
    };
    let Some(commits) = &claims.commits else {
        return;
    };
    loop {
        let stopping = tokio::select! {
            biased;
            () = commits.ready.notified() => false,
            () = stop.cancelled() => true,
        };
        if stopping {
            // Nothing is pushed after the last take below.
            commits.close();
        }
        loop {
            let (tasks, answers) = commits.take();
            if tasks.is_empty() {
                break;
            }
            commit(claims, tasks, answers).await;
        }
        if stopping {
            return;
        }
    }
}

/// Commits one batch and answers its submits.
async fn commit(
    claims: &Claims,
    tasks: Vec<StoredTask>,
    answers: Vec<tokio::sync::oneshot::Sender<super::remote::Committed>>,
) {
    let ids: Vec<TaskId> = tasks.iter().map(|task| task.id).collect();
    let sent = Instant::now();
    let result = claims.store.write_ahead(tasks).await;
    let mut revoked = Vec::new();
    match &result {
        Ok(()) => claims.reached(None),
        Err(error) => {
            tracing::warn!(
                error = &**error as &dyn std::error::Error,
                tasks = ids.len(),
                "write-ahead commit to the shared store failed; the submits are refused"
            );
            claims.reached(Some(error));
            // The commit's answer may be what was lost: their rows go if they exist.
            revoked.clone_from(&ids);
        }
    }
    for (id, answer) in ids.into_iter().zip(answers) {
        let delivered = answer.send(result.clone().map(|()| sent)).is_ok();
        if !delivered && result.is_ok() {
            // Its submit gave up (or was dropped) while the row was committed: not accepted.
            revoked.push(id);
        }
    }
    if !revoked.is_empty() {
        claims.revoke(revoked);
    }
}

impl<T: Send + Sync + 'static> Shared<T> {
    /// The shared store and its commits, in the store's write-ahead mode.
    pub(crate) fn store_commits(&self) -> Option<(&Claims, &Commits)> {
        let claims = self.remote.as_ref()?;
        Some((claims, claims.commits.as_ref()?))
    }

    /// Write-ahead with the shared store: commits a new task's row, leased to this pool
    /// (sharing the commit with the submits waiting meanwhile), and takes its lease; hands
    /// the payload back with the lease, or refuses the task. Waits the store's timeout at
    /// most.
    #[expect(
        clippy::too_many_arguments,
        reason = "the new task's parts, as intake holds them"
    )]
    pub(crate) async fn commit_first(
        &self,
        claims: &Claims,
        commits: &Commits,
        id: TaskId,
        state: TaskState,
        payload: T,
        size: usize,
        options: Option<&TaskOptions>,
    ) -> Result<(T, Arc<Lease>), SubmitError<T>> {
        let (payload, bytes) = self.encoded(payload, size)?;
        let task = StoredTask {
            id,
            state,
            last_error: None,
            payload: bytes,
            options: options.cloned().map(Box::new),
        };
        // Refused only once the last worker is gone: no submit is left by then.
        let Some(answer) = commits.push(task) else {
            return Err(SubmitError::ShuttingDown(payload));
        };
        let timeout = claims.store.pacing().timeout;
        let error = match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(Ok(sent))) => {
                let lease = claims.hold(id, self.shutdown.deadline(), sent);
                return Ok((payload, lease));
            }
            Ok(Ok(Err(error))) => error,
            // The committer is gone (it ended without answering): the row may exist; the
            // lease expires and another pool runs it, or none does; refused here either way.
            Ok(Err(_)) => claims.store.timed_out("commit"),
            // Given up: the committer deletes the row if its commit comes through after all.
            Err(_) => claims.store.timed_out("commit"),
        };
        Err(submit_error(payload, error))
    }

    /// Keeps a dead letter in the shared store: its row written and marked dead, its lease
    /// cleared. `Ok(true)`: kept there; `Ok(false)`: another pool holds the task now;
    /// `Err(payload)`: there is no store, or it could not take it (the local journal keeps it
    /// then).
    pub(crate) async fn dead_letter_to_store(
        &self,
        id: TaskId,
        state: TaskState,
        reason: &str,
        (payload, options): (Vec<u8>, Option<&TaskOptions>),
    ) -> Result<bool, Vec<u8>> {
        let Some(claims) = &self.remote else {
            return Err(payload);
        };
        let task = StoredTask {
            id,
            state,
            last_error: Some(reason.into()),
            payload,
            options: options.cloned().map(Box::new),
        };
        match claims.store.dead_letter(task.clone()).await {
            Ok(kept) => {
                claims.release([id]);
                Ok(kept)
            }
            Err(error) => {
                tracing::warn!(
                    task = %id,
                    error = &*error as &dyn std::error::Error,
                    "the shared store could not keep a dead letter; the local journal keeps it"
                );
                Err(task.payload)
            }
        }
    }

    /// A claimed task set aside: its dead letter kept in the store, or else written to the
    /// local journal and its row deleted. If neither can be written the row stays, and its
    /// lease expires.
    async fn dead_letter_claimed(&self, task: StoredTask, reason: String) {
        let id = task.id;
        tracing::warn!(task = %id, %reason, "claimed task kept as a dead letter");
        let options = task.options;
        let payload = match self
            .dead_letter_to_store(id, task.state, &reason, (task.payload, options.as_deref()))
            .await
        {
            Ok(true) => {
                self.counters.failed.add(1);
                return;
            }
            Ok(false) => {
                self.counters.dropped.add(1);
                return;
            }
            Err(payload) => payload,
        };
        match self
            .store
            .dead_letter(id, task.state, reason, (payload, options))
            .await
        {
            Ok(()) => {
                self.counters.failed.add(1);
                if let Some(claims) = &self.remote {
                    claims.done(id);
                }
            }
            Err(_) => {
                // Left to its lease: not this pool's any more.
                self.counters.dropped.add(1);
                if let Some(claims) = &self.remote {
                    claims.release([id]);
                }
            }
        }
    }
}

/// The refusal of a write-ahead submit the store could not commit.
#[cfg(feature = "postgres")]
fn submit_error<T>(task: T, error: super::remote::RemoteError) -> SubmitError<T> {
    SubmitError::Postgres { task, error }
}

/// Without the `postgres` feature no store is ever set, so no submit reaches it.
#[cfg(not(feature = "postgres"))]
fn submit_error<T>(task: T, _: super::remote::RemoteError) -> SubmitError<T> {
    SubmitError::ShuttingDown(task)
}

/// Hands `jobs` off to the shared store in one transaction. Returns how many were committed,
/// and the jobs left for the local journal: all of them without a store, or when the handoff
/// failed (now or earlier in this shutdown); those whose payload fails to encode otherwise.
pub(crate) async fn hand_off<T: Send + Sync + 'static>(
    shared: &Shared<T>,
    jobs: Vec<Job<T>>,
) -> (u64, Vec<Job<T>>) {
    let Some(claims) = &shared.remote else {
        return (0, jobs);
    };
    if jobs.is_empty() || claims.handoff_error().is_some() {
        claims.release(jobs.iter().map(|job| job.id));
        return (0, jobs);
    }
    let (mut tasks, mut rest) = (Vec::with_capacity(jobs.len()), Vec::new());
    let mut encoded = Vec::with_capacity(jobs.len());
    // Those leased from the store (claimed, or written ahead to it) first: they have rows.
    let (leased, local): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|job| job.lease.is_some());
    for job in leased.into_iter().chain(local) {
        let mut payload = Vec::new();
        match job.payload.encode(&shared.codec, &mut payload) {
            Ok(()) => {
                tasks.push(StoredTask {
                    id: job.id,
                    state: job.state,
                    last_error: job.last_error.clone(),
                    payload,
                    options: job.options().cloned().map(Box::new),
                });
                encoded.push(job);
            }
            // The local spill tries again, and counts it as unsaved.
            Err(_) => rest.push(job),
        }
    }
    let count = tasks.len() as u64;
    let started = now_ms();
    let stored = encoded.iter().filter(|job| job.lease.is_some()).count();
    let result = claims.store.hand_off(tasks, stored).await;
    claims.release(encoded.iter().map(|job| job.id));
    match result {
        Ok(()) => {
            // Another pool's to run now: their keys are free here.
            for job in &encoded {
                if let Some(key) = job.key() {
                    shared.keys.release(key, job.id);
                }
            }
            claims.handed_off.fetch_add(count, Ordering::Relaxed);
            tracing::info!(
                tasks = count,
                ms = now_ms().saturating_sub(started),
                "handed off tasks to the shared store"
            );
            (count, rest)
        }
        Err(error) => {
            tracing::error!(
                error = &*error as &dyn std::error::Error,
                tasks = count,
                "handoff to the shared store failed; journaling the tasks locally"
            );
            claims.handoff_failed(error);
            rest.extend(encoded);
            (0, rest)
        }
    }
}
