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

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::job::{Job, Payload, now_ms};
use super::remote::{Claimed, Claims, Connect, StoredTask};
use super::shared::Shared;
use crate::error::{JournalError, StartError};
use crate::journal::{Journal, Recovered};

/// How soon the claimer looks again after a full batch, or while the queue has no room.
const CLAIM_AGAIN: Duration = Duration::from_millis(20);

/// Opens the shared store: takes the run number into the journal's `LOCK`, hands on the tasks
/// the journal holds, then retires their segments. Returns the journal and the pool's side of
/// the store.
pub(crate) async fn open(
    connect: &dyn Connect,
    journal: Journal,
    recovered: Vec<Recovered<Vec<u8>>>,
) -> Result<(Journal, Claims), StartError> {
    let forwarded = recovered.len() as u64;
    let forward = recovered
        .into_iter()
        .map(|task| StoredTask {
            id: task.id,
            state: task.state,
            last_error: task.last_error,
            payload: task.value,
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
    Ok((journal, Claims::new(remote, forwarded)))
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

/// Starts the claimer and the heartbeat, owned by the pool's background tracker (once the
/// workers run: a pool that runs nothing claims nothing). Started after the shutdown stopped
/// them, they see their tokens cancelled and end at once.
pub(crate) fn spawn<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>) {
    let Some(claims) = &shared.remote else {
        return;
    };
    let claimer = claimer(Arc::clone(shared), claims.claimer.token());
    claims.claimer.own(shared.background.spawn(claimer));
    let heartbeat = heartbeat(Arc::clone(shared), claims.heartbeat.token());
    claims.heartbeat.own(shared.background.spawn(heartbeat));
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

/// Queues claimed tasks (in id order) with their leases. One that no longer decodes, or was
/// interrupted `max_interruptions` times in a row (a pool dying with it each time), is kept as
/// a dead letter instead.
async fn take_claimed<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    mut claimed: Vec<Claimed>,
    sent: Instant,
) {
    let Some(claims) = &shared.remote else {
        return;
    };
    claimed.sort_by_key(|c| c.task.id);
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
        match tokio::time::timeout(lease / 4, claims.store.renew()).await {
            Ok(Ok(still)) => claims.renewed(&still, sent),
            Ok(Err(error)) => {
                tracing::warn!(
                    error = &*error as &dyn std::error::Error,
                    "renewing leases failed"
                );
            }
            Err(_) => tracing::warn!("renewing leases took over a quarter lease; given up"),
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

impl<T: Send + Sync + 'static> Shared<T> {
    /// A claimed task set aside: its dead letter written to the local journal, then its row
    /// deleted. If the dead letter cannot be written the row stays, and its lease expires.
    async fn dead_letter_claimed(&self, task: StoredTask, reason: String) {
        let id = task.id;
        tracing::warn!(task = %id, %reason, "claimed task kept as a dead letter");
        match self
            .store
            .dead_letter(id, task.state, reason, task.payload)
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
    for job in jobs {
        let mut payload = Vec::new();
        match job.payload.encode(&shared.codec, &mut payload) {
            Ok(()) => {
                tasks.push(StoredTask {
                    id: job.id,
                    state: job.state,
                    last_error: job.last_error.clone(),
                    payload,
                });
                encoded.push(job);
            }
            // The local spill tries again, and counts it as unsaved.
            Err(_) => rest.push(job),
        }
    }
    let count = tasks.len() as u64;
    let started = now_ms();
    let result = claims.store.hand_off(tasks).await;
    claims.release(encoded.iter().map(|job| job.id));
    match result {
        Ok(()) => {
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
