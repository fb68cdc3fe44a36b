//! The shutdown sequence:
//!
//! ```text
//! trigger ─► gate closed, upkeep (and claimer) stopped ─► queued tasks collected ─►
//! (write-ahead: buffer written, run's segments set aside) ─► queued tasks spilled ∥ in-flight
//! tasks run to the deadline, then their token fires, then the hard stop ─► flusher (and
//! heartbeat) stopped ─► held tasks and waiting retries spilled ─► journal closed ─► report
//! ```
//!
//! With a shared store each spill is first a handoff to it (`claims.rs`), and what the store
//! did not take goes to the local journal.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::claims;
use super::config::Settled;
use super::job::{Held, Job};
use super::lock::lock;
use super::shared::Shared;
use super::store::Spill;
use crate::journal;
use crate::report::{Budget, ShutdownReport, State};
use crate::task::TaskId;

/// How long after the hard stop to wait for every handler before journaling what is held.
const HELD_SPILL_AFTER: Duration = Duration::from_millis(20);

/// Waits for the trigger, then runs the shutdown sequence and publishes the report.
pub(crate) async fn supervise<T: Send + Sync + 'static>(shared: Arc<Shared<T>>) {
    shared.shutdown.trigger.cancelled().await;
    let report = drain(&shared).await;
    shared.shutdown.state.send_replace(State::Stopped);
    shared.shutdown.report.send_replace(Some(report));
}

async fn drain<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>) -> ShutdownReport {
    let started = Instant::now();
    let shutdown = &shared.shutdown;
    shared.queue.close();
    // A runner that was never run starts no worker now: the wait below need not wait for one.
    shared.workers.close();
    shutdown.state.send_replace(State::Draining);
    tracing::info!(
        in_flight = shared.counters.in_flight.get(),
        "shutdown: intake closed"
    );
    // No retry is released, no segment deleted or compacted from now on.
    shutdown.upkeep.stop().await;
    if let Some(claims) = &shared.remote {
        // Nothing is claimed from now on: what was claimed is in the queue, collected next.
        claims.claimer.stop().await;
    }

    let queued = shared.queue.take_queued().await;
    if let Some(write_ahead) = &shared.write_ahead {
        // Write-ahead: the live tasks are journaled already, but among the whole run's
        // history. Spill them (and the interrupted ones) to a fresh segment, so that the next
        // start reads the live queue only; this run's segments go at close, once that spill is
        // durable. First, what is in the commit buffer is written: no retry state or
        // compaction copy is pushed after intake closed, so none can land after the spill's
        // newer records.
        write_ahead.flush_pushed().await;
        if let Some(journal) = shared.store.lock().await.as_mut() {
            journal.rotate_for_spill();
        }
    }
    let (drain_deadline, budget) = deadline(shared, queued.len());
    let spill_queued = spill(shared, queued);
    let wait_in_flight = wait_in_flight(shared, started, drain_deadline);
    let ((spilled, unsaved), drain_time) = tokio::join!(spill_queued, wait_in_flight);
    let counters = &shared.counters;
    counters.spilled.add(spilled);
    counters.unsaved.add(unsaved.len() as u64);
    lock(&shutdown.unsaved_ids).extend(unsaved);

    // Every worker is gone: nothing pushes to the commit buffer any more, no claimed task
    // finishes (the heartbeat settles the last ones as it stops).
    shutdown.flusher.stop().await;
    if let Some(claims) = &shared.remote {
        // What is left to commit first (the follow-ups of the last handlers), then the
        // settles, with the leases still renewed meanwhile.
        claims.committer.stop().await;
        claims.heartbeat.stop().await;
    }
    // Whatever is still held, and the tasks waiting for a retry (they keep their time).
    spill_held(shared, true).await;
    if let Some(reserve) = &shared.reserve {
        // Unless a spill removed it (nothing was journaled: an idle pool), the file stays for
        // the next start, which replaces it. Removing it frees its blocks, which takes about
        // 0.5 ms on a file system that discards them (`-o discard`): half an idle pool's whole
        // shutdown.
        reserve.leave();
    }
    let close_time = shared.store.close().await;
    if let Some(claims) = &shared.remote {
        claims.store.close().await;
    }
    let (spill_time, sync_time) = shared.store.spill_times();
    // The pool's last state: nothing queued or running, no reserve, the journal as left.
    #[cfg(feature = "metrics")]
    super::upkeep::refresh_gauges(shared).await;

    let report = ShutdownReport {
        counts: counters.snapshot(),
        interrupted_ids: lock(&shutdown.interrupted_ids).clone(),
        unsaved_ids: {
            let mut ids = lock(&shutdown.unsaved_ids).clone();
            ids.sort_unstable();
            ids
        },
        elapsed: started.elapsed(),
        drain_deadline,
        drain_time,
        spill_time,
        sync_time: sync_time + close_time,
        budget,
        journal_dir: shared.store.dir().to_path_buf(),
        journal_error: shared.store.first_error(),
        #[cfg(feature = "postgres")]
        handed_off: shared.remote.as_ref().map_or(0, |claims| {
            claims.handed_off.load(std::sync::atomic::Ordering::Relaxed)
        }),
        #[cfg(feature = "postgres")]
        handoff_error: shared.remote.as_ref().and_then(|c| c.handoff_error()),
    };
    tracing::info!(
        completed = report.completed,
        spilled = report.spilled,
        interrupted = report.interrupted,
        failed = report.failed,
        unsaved = report.unsaved,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "shutdown complete"
    );
    report
}

/// The drain deadline for this shutdown: as configured, or derived from the grace period.
fn deadline<T>(shared: &Shared<T>, queued: usize) -> (Duration, Option<Budget>) {
    let config = &shared.config;
    let (grace, pre_stop) = match shared.shutdown.settled {
        Settled::Fixed(deadline) => return (deadline, None),
        Settled::GracePeriod { grace, pre_stop } => (grace, pre_stop),
    };
    let Some((rate, fsync)) = shared.store.probe() else {
        return (grace.saturating_sub(pre_stop), None);
    };
    let available = grace.saturating_sub(pre_stop);
    let submitted = shared.counters.submitted.get();
    let average = shared.ids.average_payload(submitted) + journal::task_record_len(0, 0) as u64;
    let seconds_for = |bytes: u64| Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
    let margin = (available / 20).max(Duration::from_millis(100));
    let spill_reserve = fsync * 3 + seconds_for(config.workers as u64 * average) + margin;
    let drain_deadline = available
        .saturating_sub(config.cancel_grace)
        .saturating_sub(spill_reserve);
    let queue_spill_estimate = fsync + seconds_for(queued as u64 * average);
    if queue_spill_estimate > drain_deadline + config.cancel_grace {
        tracing::error!(
            queued,
            estimate_ms = queue_spill_estimate.as_millis() as u64,
            "spilling the queue may outlast the grace period"
        );
    }
    let budget = Budget {
        grace_period: grace,
        pre_stop,
        cancel_grace: config.cancel_grace,
        spill_reserve,
        queue_spill_estimate,
        drain_deadline,
        write_bytes_per_sec: rate,
        fsync_latency: fsync,
    };
    tracing::info!(
        deadline_ms = drain_deadline.as_millis() as u64,
        "drain deadline derived from the grace period"
    );
    (drain_deadline, Some(budget))
}

/// Waits for in-flight tasks: to the deadline, then the handlers' tokens fire; after the
/// grace, the hard stop. Returns how long it waited.
async fn wait_in_flight<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    started: Instant,
    deadline: Duration,
) -> Duration {
    let shutdown = &shared.shutdown;
    let all_done = shared.workers.wait();
    tokio::pin!(all_done);
    tokio::select! {
        () = &mut all_done => return started.elapsed(),
        () = tokio::time::sleep_until(started + deadline) => {
            // Each task stopped is logged at WARN with its id as its outcome is settled.
            tracing::warn!(
                in_flight = shared.counters.in_flight.get(),
                "drain deadline passed; cancelling in-flight tasks"
            );
        }
        () = shutdown.hurry.cancelled() => tracing::info!("skipping the drain wait"),
    }
    shutdown.deadline.cancel();
    if !shutdown.hurry.is_cancelled() {
        tokio::select! {
            () = &mut all_done => return started.elapsed(),
            () = tokio::time::sleep(shared.config.cancel_grace) => {}
            () = shutdown.hurry.cancelled() => {}
        }
    }
    shutdown.hard_stop.cancel();
    // Handlers dropped at the hard stop hand their tasks back at once. One that blocks its
    // thread would keep the others' tasks in memory until it returns, and a third signal then
    // would lose them: journal what is held now, then wait for the rest.
    if tokio::time::timeout(HELD_SPILL_AFTER, &mut all_done)
        .await
        .is_err()
    {
        spill_held(shared, false).await;
        all_done.await;
    }
    started.elapsed()
}

/// Journals the held tasks (interrupted ones first, then failed ones whose dead letter could
/// not be written) and, with `with_waiting`, the tasks waiting for a retry; counts them.
async fn spill_held<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, with_waiting: bool) {
    let shutdown = &shared.shutdown;
    let mut held = std::mem::take(&mut *lock(&shutdown.held));
    held.sort_by_key(|(why, job)| (*why != Held::Interrupted, job.id));
    let ids: Vec<TaskId> = held
        .iter()
        .filter(|(why, _)| *why == Held::Interrupted)
        .map(|(_, job)| job.id)
        .collect();
    let waiting = if with_waiting {
        shared.queue.take_waiting()
    } else {
        Vec::new()
    };
    let jobs: Vec<Job<T>> = held
        .into_iter()
        .map(|(_, job)| job)
        .chain(waiting)
        .collect();
    let (written, unsaved) = spill(shared, jobs).await;
    // Only what was saved counts as interrupted (and is listed so); the rest is unsaved.
    let saved_interrupted: Vec<TaskId> =
        ids.into_iter().filter(|id| !unsaved.contains(id)).collect();
    let interrupted = saved_interrupted.len() as u64;
    let counters = &shared.counters;
    counters.interrupted.add(interrupted);
    counters.spilled.add(written - interrupted);
    counters.unsaved.add(unsaved.len() as u64);
    lock(&shutdown.interrupted_ids).extend(saved_interrupted);
    lock(&shutdown.unsaved_ids).extend(unsaved);
}

/// Hands `jobs` off to the shared store, if there is one, and journals as live tasks what it
/// did not take, as many as fit, in the room the spill reserve leaves once removed (the first
/// spill that journals a task removes it). Returns how many were saved, and the ids of the
/// others.
async fn spill<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    jobs: Vec<Job<T>>,
) -> (u64, Vec<TaskId>) {
    let (handed_off, jobs) = claims::hand_off(shared, jobs).await;
    if let Some(reserve) = &shared.reserve
        && !jobs.is_empty()
    {
        reserve.release();
    }
    let count = jobs.len() as u64;
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    let (unsaved, took) = shared.store.spill(Spill::new(jobs, &shared.codec)).await;
    #[cfg(feature = "metrics")]
    if count > 0 {
        shared.metrics.spill.record(took);
    }
    (handed_off + count - unsaved.len() as u64, unsaved)
}
