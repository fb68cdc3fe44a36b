//! What happens after a run: the pool's side of the worker's [`Host`] interface.
//!
//! `Ok` completes the task (and acks it if the journal holds it). `Err` or a panic is a failed
//! attempt: retried after its backoff, or, out of attempts or permanent, kept as a durable dead
//! letter. A run stopped at the drain deadline is an interruption: its attempt is not counted,
//! the `on_interrupt` hook runs, then the deadline policy requeues it (held for the final
//! spill), drops it, or dead-letters it.
//!
//! A task claimed from the shared store whose lease was lost belongs to another pool now: it
//! is not started, and whatever its run's outcome, nothing is recorded of it here.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use super::job::{Held, Job, Payload};
use super::job::{ms_from_now, now_ms};
use super::remote::Failed;
use super::shared::Shared;
use super::worker::{CatchUnwind, Host, Local, Outcome, panic_message};
use crate::policy::{DeadlineAction, Expiry, Interruption};
use crate::report::Counters;

/// How many bytes of spill reserve a worker's completed tasks give back before it returns them
/// to the pool (and whenever it is about to wait, or stops). Until then the reserve counts
/// them as held: it may grow a little sooner than it must, never later.
const GIVE_BACK: u64 = 64 * 1024;

impl<T: Send + Sync + 'static> Host<T> for Shared<T> {
    fn key(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    async fn next_job(&self, local: &mut Local) -> Option<Job<T>> {
        loop {
            // A worker about to wait (or stop) returns what it holds back first.
            let stripe = local.stripe;
            let Some(mut job) = self.queue.next_job(stripe, || self.give_back(local)).await else {
                self.give_back(local);
                return None;
            };
            if let Some(expiry) = job.expires_ms()
                && now_ms() > expiry
            {
                self.expired(job, expiry).await;
                continue;
            }
            if let Payload::Encoded(bytes) = &job.payload {
                // Held encoded in the queue: decoded for its run.
                match self.codec.decode(bytes) {
                    Ok(value) => job.payload = Payload::new(value),
                    Err(error) => {
                        let reason = format!("payload no longer decodes: {error}");
                        self.dead_letter(job, reason).await;
                        continue;
                    }
                }
            }
            if !lease_lost(&job) {
                return Some(job);
            }
            self.given_up(&job);
        }
    }

    fn deadline(&self) -> &Arc<CancellationToken> {
        self.shutdown.deadline()
    }

    fn hard_stop(&self) -> &CancellationToken {
        self.shutdown.hard_stop()
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }

    #[cfg(feature = "metrics")]
    fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    async fn settle(&self, mut job: Job<T>, outcome: Outcome, local: &mut Local) {
        if lease_lost(&job) {
            self.given_up(&job);
            return;
        }
        match outcome {
            Outcome::Completed => {
                self.counters.completed.add(local.stripe, 1);
                // Given back in batches: the submitters add to the same count at every task.
                local.unreserved += u64::from(job.reserved);
                if local.unreserved >= GIVE_BACK {
                    self.give_back(local);
                }
                self.finished(&job).await;
            }
            Outcome::Aborted => self.interrupted(job, None).await,
            // A handler that gives up once its token fired was interrupted, not failed.
            Outcome::Failed(error, _) if self.shutdown.deadline().is_cancelled() => {
                self.interrupted(job, Some(error)).await;
            }
            Outcome::Failed(error, permanent) => {
                #[cfg(feature = "metrics")]
                self.counters.failed_runs.add(1);
                job.failed();
                if permanent || job.state.attempts >= job.max_attempts(self.policy.max_attempts) {
                    self.dead_letter(job, error).await;
                } else {
                    self.retry(job, error);
                }
            }
        }
    }
}

/// Whether the job was claimed from the shared store and its lease is lost.
fn lease_lost<T>(job: &Job<T>) -> bool {
    job.lease.as_ref().is_some_and(|lease| lease.is_lost())
}

impl<T: Send + Sync + 'static> Shared<T> {
    /// A claimed task whose lease was lost: another pool holds it now, so it leaves this one
    /// without a trace (counted as dropped).
    fn given_up(&self, job: &Job<T>) {
        tracing::warn!(task = %job.id, "lease lost; the task is left to the pool that holds it");
        self.counters.dropped.add(1);
        self.let_go_key(job);
    }

    /// Lets go of the task's unique key, if it has one: it left this pool for good.
    fn let_go_key(&self, job: &Job<T>) {
        if let Some(key) = job.key() {
            self.keys.release(key, job.id);
        }
    }

    /// A task whose time to live ran out before a run could start: not run; a dead letter or
    /// dropped, as the pool's expiry policy says.
    async fn expired(&self, job: Job<T>, expiry: u64) {
        self.counters.expired.add(1);
        match self.policy.on_expiry {
            Expiry::DeadLetter => {
                let reason = format!(
                    "expired: its time to live ran out at {expiry} ms since the Unix epoch, \
                     before a run could start"
                );
                self.dead_letter(job, reason).await;
            }
            Expiry::Drop => {
                tracing::info!(task = %job.id, "task expired before it started; dropped by policy");
                self.counters.dropped.add(1);
                self.unreserve(&job);
                self.finished(&job).await;
            }
        }
    }

    /// Records that a task left this pool for good (completed, dead-lettered or dropped): an
    /// ack if the journal holds it, its row deleted if it was claimed from the shared store.
    async fn finished(&self, job: &Job<T>) {
        self.let_go_key(job);
        if let (Some(claims), Some(_)) = (&self.remote, &job.lease) {
            claims.done(job.id);
        }
        if job.journaled {
            self.finish_journaled(job).await;
        }
    }

    /// Schedules a failed task's next attempt after its backoff, journaling its new state in
    /// write-ahead mode.
    fn retry(&self, mut job: Job<T>, error: String) {
        let delay = self.policy.backoff(job.state.attempts, &self.jitter);
        tracing::info!(
            task = %job.id,
            attempt = job.state.attempts,
            retry_in_ms = delay.as_millis() as u64,
            %error,
            "task failed; will retry"
        );
        job.state.not_before_ms = ms_from_now(delay);
        if let Some(reserve) = &self.reserve
            && job.reserved > 0
        {
            // Its record now carries the error (cut at 4 KiB in the journal).
            let grown = error.len().min(4096) as u32;
            let before = job
                .last_error
                .as_deref()
                .map_or(0, |e| e.len().min(4096) as u32);
            if grown > before {
                reserve.add(u64::from(grown - before));
                job.reserved += grown - before;
            }
        }
        job.last_error = Some(error.into());
        if let Some(write_ahead) = &self.write_ahead
            && job.journaled
        {
            let mut payload = Vec::new();
            // Submit checked it encodes; if it no longer does, the journal keeps the earlier
            // state.
            if job.payload.encode(&self.codec, &mut payload).is_ok() {
                write_ahead.journal_retry(&job.record(&payload, None), || self.queue.is_closed());
            }
        }
        if let (Some(claims), Some(_)) = (&self.remote, &job.lease) {
            // Its row gets the new state, so a pool that rescues it knows the attempts.
            claims.failed(Failed {
                id: job.id,
                state: job.state,
                last_error: job.last_error.clone().unwrap_or_default(),
            });
        }
        self.counters.retried.add(1);
        self.queue.retry_later(job, delay);
    }

    /// Returns the spill reserve a worker holds back (see [`GIVE_BACK`]).
    fn give_back(&self, local: &mut Local) {
        self.forget_reserved(std::mem::take(&mut local.unreserved));
    }

    /// A task left memory for good: the spill reserve it held is free.
    fn unreserve(&self, job: &Job<T>) {
        self.forget_reserved(u64::from(job.reserved));
    }

    /// Records that a journaled task is finished (completed, dead-lettered or dropped); retires
    /// the old segments after the last replayed one.
    async fn finish_journaled(&self, job: &Job<T>) {
        match &self.write_ahead {
            Some(write_ahead) => write_ahead.finish(job.id),
            None => self.store.ack(job.id).await,
        }
        // Write-ahead retires earlier runs' segments like its own, by what they still hold.
        if job.replayed
            && self.replay_outstanding.fetch_sub(1, Ordering::AcqRel) == 1
            && self.write_ahead.is_none()
        {
            self.store.retire_replayed().await;
        }
    }

    /// Writes a dead letter, durably: in the shared store if there is one and it takes it,
    /// else in the local journal. On failure the task is held for the final spill instead.
    async fn dead_letter(&self, mut job: Job<T>, error: String) {
        let mut payload = Vec::new();
        let written = match job.payload.encode(&self.codec, &mut payload) {
            Ok(()) => match self
                .dead_letter_to_store(job.id, job.state, &error, (payload, job.options()))
                .await
            {
                Ok(kept) => Ok(Some(kept)),
                Err(payload) => self
                    .store
                    .dead_letter(
                        job.id,
                        job.state,
                        error.clone(),
                        (payload, job.options().cloned().map(Box::new)),
                    )
                    .await
                    .map(|()| None)
                    .map_err(|e| e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        match written {
            // Its row is the dead letter now (its lease let go): nothing more to record.
            Ok(Some(true)) => {
                tracing::warn!(task = %job.id, attempts = job.state.attempts, %error, "task failed; kept as a dead letter in the shared store");
                self.counters.failed.add(1);
                self.unreserve(&job);
                self.let_go_key(&job);
            }
            // Another pool holds it now.
            Ok(Some(false)) => {
                self.given_up(&job);
                self.unreserve(&job);
            }
            Ok(None) => {
                tracing::warn!(task = %job.id, attempts = job.state.attempts, %error, "task failed; kept as a dead letter");
                self.counters.failed.add(1);
                self.unreserve(&job);
                self.finished(&job).await;
            }
            Err(why) => {
                tracing::error!(task = %job.id, %why, "could not write dead letter; task kept for the spill");
                job.last_error = Some(error.into());
                self.shutdown.hold(Held::Retained, job);
            }
        }
    }

    /// Carries out the deadline action for a task stopped at the drain deadline, after the
    /// hook.
    async fn interrupted(&self, job: Job<T>, error: Option<String>) {
        let mut job = job.interrupted();
        if let Some(error) = error {
            job.last_error = Some(error.into());
        }
        // Only a job that ran is interrupted, and a job runs decoded.
        let Some(payload) = job.payload.decoded().map(Arc::clone) else {
            self.shutdown.hold(Held::Interrupted, job);
            return;
        };
        let policy = &self.policy;
        let poisoned = job.state.interruptions >= policy.max_interruptions;
        let action = if poisoned {
            DeadlineAction::DeadLetter
        } else {
            policy.deadline_action(&payload)
        };
        if let Some(hook) = &policy.on_interrupt {
            let interruption = Interruption {
                id: job.id,
                attempt: job.state.attempts.saturating_add(1),
                interruptions: job.state.interruptions,
                action,
                payload,
            };
            let hook = CatchUnwind::new(hook(interruption));
            match tokio::time::timeout(self.config.cancel_grace, hook).await {
                Ok(Ok(())) => {}
                Ok(Err(panic)) => {
                    tracing::error!(task = %job.id, error = %panic_message(&*panic), "interrupt hook panicked")
                }
                Err(_) => {
                    tracing::error!(task = %job.id, "interrupt hook outlived the cancel grace; dropped")
                }
            }
        }
        match action {
            DeadlineAction::Requeue => {
                tracing::warn!(task = %job.id, interruptions = job.state.interruptions, "task interrupted at the drain deadline; journaled");
                self.shutdown.hold(Held::Interrupted, job);
            }
            DeadlineAction::Drop => {
                tracing::warn!(task = %job.id, "task interrupted at the drain deadline; dropped by policy");
                self.counters.dropped.add(1);
                self.unreserve(&job);
                self.finished(&job).await;
            }
            DeadlineAction::DeadLetter => {
                let reason = if poisoned {
                    format!(
                        "interrupted at the drain deadline in {} consecutive runs",
                        job.state.interruptions
                    )
                } else {
                    "interrupted at the drain deadline".to_string()
                };
                self.dead_letter(job, reason).await;
            }
        }
    }
}
