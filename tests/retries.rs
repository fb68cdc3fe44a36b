//! Retries with backoff, permanent errors, the deadline policy and poison protection, under a
//! paused clock.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::counts_add_up;
use drainpool::{DeadlineAction, Permanent, Pool, Task, TaskId};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// What the handler does with a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Plan {
    /// Fail (an error) while the attempt is at most `n`, then succeed.
    FailTimes(u32),
    /// Panic while the attempt is at most `n`, then succeed.
    PanicTimes(u32),
    /// Fail with a permanent error.
    Permanent,
    /// Run for an hour, ignoring the token.
    Hang,
    /// Run for an hour, ignoring the token; the deadline policy drops it.
    HangDroppable,
    /// Run for an hour, ignoring the token; the deadline policy dead-letters it.
    HangDeadLetter,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    n: u64,
    plan: Plan,
}

/// Every run: task number, attempt, whether the last run was interrupted, and when it started.
type Runs = Arc<Mutex<Vec<(u64, u32, bool, Instant)>>>;

async fn start(
    dir: &std::path::Path,
    runs: &Runs,
    configure: impl FnOnce(drainpool::Builder<Job>) -> drainpool::Builder<Job>,
) -> Pool<Job> {
    let runs = Arc::clone(runs);
    let builder = Pool::builder()
        .workers(2)
        .drain_deadline(Duration::from_secs(10))
        .cancel_grace(Duration::from_secs(1))
        .backoff(Duration::from_secs(4), Duration::from_secs(60))
        .journal_dir(dir)
        .on_deadline(|job: &Job| match job.plan {
            Plan::HangDroppable => DeadlineAction::Drop,
            Plan::HangDeadLetter => DeadlineAction::DeadLetter,
            _ => DeadlineAction::Requeue,
        });
    configure(builder)
        .start(move |task: Task<Job>| {
            let runs = Arc::clone(&runs);
            async move {
                let job = task.payload().clone();
                let attempt = task.attempt();
                runs.lock()
                    .unwrap()
                    .push((job.n, attempt, task.was_interrupted(), Instant::now()));
                match job.plan {
                    Plan::FailTimes(n) if attempt <= n => Err("refused by the test".into()),
                    Plan::PanicTimes(n) if attempt <= n => panic!("test panic, attempt {attempt}"),
                    Plan::Permanent => Err(Permanent::new("this can never work").into()),
                    Plan::Hang | Plan::HangDroppable | Plan::HangDeadLetter => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        Ok(())
                    }
                    _ => Ok::<(), drainpool::BoxError>(()),
                }
            }
        })
        .await
        .unwrap()
}

fn runs_of(runs: &Runs, n: u64) -> Vec<(u32, bool, Instant)> {
    runs.lock()
        .unwrap()
        .iter()
        .filter(|r| r.0 == n)
        .map(|r| (r.1, r.2, r.3))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_failing_task_is_retried_with_exponential_backoff_and_jitter() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Runs::default();
    let pool = start(dir.path(), &runs, |b| b).await;
    pool.submit(Job {
        n: 1,
        plan: Plan::FailTimes(3),
    })
    .await
    .unwrap();
    pool.submit(Job {
        n: 2,
        plan: Plan::PanicTimes(1),
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;

    let one = runs_of(&runs, 1);
    assert_eq!(one.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
    // Base 4 s, doubling: each gap is between half and all of 4, 8 and 16 s.
    for (i, full) in [4u64, 8, 16].into_iter().enumerate() {
        let gap = one[i + 1].2 - one[i].2;
        let full = Duration::from_secs(full);
        assert!(
            gap >= full / 2 && gap <= full + Duration::from_millis(2),
            "gap {i}: {gap:?}"
        );
    }
    // A panic is a failed attempt like any other, and the worker survives it.
    assert_eq!(
        runs_of(&runs, 2).iter().map(|r| r.0).collect::<Vec<_>>(),
        [1, 2]
    );
    let stats = pool.stats();
    assert_eq!((stats.completed, stats.retried, stats.failed), (2, 4, 0));
    let report = pool.shutdown().await.unwrap();
    counts_add_up(&report);
}

#[tokio::test(start_paused = true)]
async fn a_task_out_of_attempts_becomes_a_durable_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Runs::default();
    let pool = start(dir.path(), &runs, |b| b.max_attempts(3)).await;
    pool.submit(Job {
        n: 1,
        plan: Plan::FailTimes(100),
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(runs_of(&runs, 1).len(), 3);
    let report = pool.shutdown().await.unwrap();
    assert_eq!((report.failed, report.retried, report.spilled), (1, 2, 0));
    counts_add_up(&report);

    let pool = start(dir.path(), &runs, |b| b).await;
    assert_eq!(pool.recovery().dead_letters, 1);
    assert_eq!(pool.recovery().replayed, 0);
    pool.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_skips_the_retries() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Runs::default();
    let pool = start(dir.path(), &runs, |b| b).await;
    pool.submit(Job {
        n: 1,
        plan: Plan::Permanent,
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(runs_of(&runs, 1).len(), 1);
    let report = pool.shutdown().await.unwrap();
    assert_eq!((report.failed, report.retried), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_task_waiting_for_its_retry_is_spilled_and_reload_honours_its_time() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Runs::default();
    let pool = start(dir.path(), &runs, |b| {
        b.backoff(Duration::from_secs(600), Duration::from_secs(600))
    })
    .await;
    let id = pool
        .submit(Job {
            n: 1,
            plan: Plan::FailTimes(1),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(runs_of(&runs, 1).len(), 1);
    assert_eq!(pool.stats().queued, 1); // waiting for its retry
    let report = pool.shutdown().await.unwrap();
    assert_eq!((report.spilled, report.retried), (1, 1));
    counts_add_up(&report);

    // The retry is due 300 to 600 s after the failure (wall clock); the next start waits.
    let runs = Runs::default();
    let pool = start(dir.path(), &runs, |b| b).await;
    assert_eq!(pool.recovery().replayed, 1);
    tokio::time::sleep(Duration::from_secs(290)).await;
    assert!(runs_of(&runs, 1).is_empty(), "ran before its backoff ended");
    tokio::time::sleep(Duration::from_secs(320)).await;
    let after = runs_of(&runs, 1);
    assert_eq!(after.len(), 1);
    assert_eq!(
        after[0].0, 2,
        "the failed attempt still counts after the reload"
    );
    let report = pool.shutdown().await.unwrap();
    assert_eq!((report.replayed, report.completed), (1, 1));
    let _ = id;
}

#[tokio::test(start_paused = true)]
async fn the_deadline_policy_drops_or_dead_letters_and_the_hook_runs_first() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Runs::default();
    let seen: Arc<Mutex<Vec<(TaskId, DeadlineAction, u32)>>> = Arc::default();
    let hook_seen = Arc::clone(&seen);
    let pool = start(dir.path(), &runs, |b| {
        b.workers(3).on_interrupt(move |interruption| {
            let seen = Arc::clone(&hook_seen);
            async move {
                let entry = (
                    interruption.id(),
                    interruption.action(),
                    interruption.interruptions(),
                );
                seen.lock().unwrap().push(entry);
            }
        })
    })
    .await;
    let requeued = pool
        .submit(Job {
            n: 1,
            plan: Plan::Hang,
        })
        .await
        .unwrap();
    let dropped = pool
        .submit(Job {
            n: 2,
            plan: Plan::HangDroppable,
        })
        .await
        .unwrap();
    let dead = pool
        .submit(Job {
            n: 3,
            plan: Plan::HangDeadLetter,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let report = pool.shutdown().await.unwrap();
    assert_eq!(
        (report.interrupted, report.dropped, report.failed),
        (1, 1, 1)
    );
    assert_eq!(report.interrupted_ids, [requeued]);
    counts_add_up(&report);
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by_key(|entry| entry.0);
    assert_eq!(
        seen,
        [
            (requeued, DeadlineAction::Requeue, 1),
            (dropped, DeadlineAction::Drop, 1),
            (dead, DeadlineAction::DeadLetter, 1)
        ]
    );

    let pool = start(dir.path(), &Runs::default(), |b| b).await;
    assert_eq!(
        (pool.recovery().replayed, pool.recovery().dead_letters),
        (1, 1)
    );
    pool.shutdown_now();
    pool.wait().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_task_interrupted_in_consecutive_runs_becomes_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Runs::default();
    for run in 1..=3u32 {
        let pool = start(dir.path(), &runs, |b| b.workers(1)).await;
        if run == 1 {
            pool.submit(Job {
                n: 1,
                plan: Plan::Hang,
            })
            .await
            .unwrap();
        } else {
            assert_eq!(pool.recovery().replayed, 1);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        let report = pool.shutdown().await.unwrap();
        if run < 3 {
            assert_eq!((report.interrupted, report.failed), (1, 0), "run {run}");
        } else {
            assert_eq!((report.interrupted, report.failed), (0, 1), "run {run}");
        }
        counts_add_up(&report);
    }
    // Each run saw the previous one interrupted, and none counted as an attempt.
    let seen = runs_of(&runs, 1);
    assert_eq!(
        seen.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
        [(1, false), (1, true), (1, true)]
    );

    let pool = start(dir.path(), &runs, |b| b).await;
    assert_eq!(
        (pool.recovery().replayed, pool.recovery().dead_letters),
        (0, 1)
    );
    pool.shutdown().await.unwrap();
}
