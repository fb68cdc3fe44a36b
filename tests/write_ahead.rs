//! The write-ahead mode in one process: a "crash" is the runtime torn down with the pool
//! running (no shutdown sequence, no spill), which leaves the journal as a SIGKILL would. The
//! real kills are in `tests/crash.rs`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::multi_thread_runtime as runtime;
use drainpool::{Durability, Pool, SubmitError, SyncPolicy, Task};

type Done = Arc<Mutex<Vec<u64>>>;

/// A pool whose handler records the task and returns at once, unless the task number is at
/// least `hang_from`: those wait for the drain deadline and give up.
async fn start(dir: &std::path::Path, sync: SyncPolicy, done: &Done, hang_from: u64) -> Pool<u64> {
    let done = Arc::clone(done);
    Pool::builder()
        .workers(2)
        .drain_deadline(Duration::from_millis(50))
        .cancel_grace(Duration::from_millis(10))
        .durability(Durability::write_ahead(sync))
        .journal_dir(dir)
        .start(move |task: Task<u64>| {
            let done = Arc::clone(&done);
            async move {
                let n = *task.payload();
                if n >= hang_from {
                    task.cancelled().await;
                    return Err("gave up at the deadline");
                }
                done.lock().unwrap().push(n);
                Ok(())
            }
        })
        .await
        .unwrap()
}

/// Submits tasks `0..count` from several concurrent submitters; returns when every submit
/// returned `Ok`.
async fn submit_all(pool: &Pool<u64>, count: u64) {
    let mut submitters = tokio::task::JoinSet::new();
    for lane in 0..8 {
        let pool = pool.clone();
        submitters.spawn(async move {
            for n in (lane..count).step_by(8) {
                pool.submit(n).await.unwrap();
            }
        });
    }
    while let Some(joined) = submitters.join_next().await {
        joined.unwrap();
    }
}

/// Tears the runtime down with the pool in it: the journal is left as a kill leaves it.
fn crash(rt: tokio::runtime::Runtime, pool: Pool<u64>) {
    // Every task is dropped where it stands; then the last handle goes, and with it the lock.
    rt.shutdown_timeout(Duration::from_secs(10));
    drop(pool);
}

/// Waits until `count` tasks have completed (bounded).
async fn completed(pool: &Pool<u64>, count: u64) {
    let what = format!("{count} tasks to complete");
    common::eventually(Duration::from_secs(30), &what, || {
        pool.stats().completed >= count
    })
    .await;
    assert_eq!(pool.stats().completed, count);
}

fn every_accepted_task_comes_back_after_a_crash(sync: SyncPolicy) {
    let dir = tempfile::tempdir().unwrap();
    let done = Done::default();
    let rt = runtime();
    // Every task hangs: none finishes before the crash.
    let pool = rt.block_on(async {
        let pool = start(dir.path(), sync, &done, 0).await;
        submit_all(&pool, 200).await;
        pool
    });
    crash(rt, pool);

    let rt = runtime();
    rt.block_on(async {
        let pool = start(dir.path(), sync, &done, u64::MAX).await;
        assert_eq!(pool.recovery().replayed, 200, "{sync:?}");
        completed(&pool, 200).await;
        let report = pool.shutdown().await.unwrap();
        assert_eq!(report.completed, 200);
    });
    let mut finished = done.lock().unwrap().clone();
    finished.sort_unstable();
    assert_eq!(finished, (0..200).collect::<Vec<_>>());
}

#[test]
fn with_sync_always_every_accepted_task_comes_back_after_a_crash() {
    every_accepted_task_comes_back_after_a_crash(SyncPolicy::Always);
}

#[test]
fn with_sync_interval_every_accepted_task_comes_back_after_a_process_crash() {
    every_accepted_task_comes_back_after_a_crash(SyncPolicy::Interval(Duration::from_millis(5)));
}

#[test]
fn with_sync_never_every_accepted_task_comes_back_after_a_process_crash() {
    every_accepted_task_comes_back_after_a_crash(SyncPolicy::Never);
}

#[test]
fn acks_spare_finished_tasks_a_repeat_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let done = Done::default();
    let rt = runtime();
    // Tasks below 100 finish; then 100 to 149 are submitted, and hang.
    let pool = rt.block_on(async {
        let pool = start(dir.path(), SyncPolicy::Always, &done, 100).await;
        submit_all(&pool, 100).await;
        completed(&pool, 100).await;
        for n in 100..150 {
            pool.submit(n).await.unwrap();
        }
        // The acks are not waited for: wait until their batch is in the file, where only the
        // 50 hanging tasks are live.
        let stats = journal_until(dir.path(), |stats| stats.live_tasks == 50).await;
        assert_eq!(stats.live_tasks, 50, "{stats:?}");
        pool
    });
    crash(rt, pool);
    assert_eq!(replayed_after_restart(dir.path(), &done), 50);
}

/// Acks wait in the commit buffer for a new task's record to share its write, but not for ever:
/// with no new task after them, the flusher writes them after its linger.
#[test]
fn acks_with_no_new_task_after_them_reach_the_journal_after_the_linger() {
    let dir = tempfile::tempdir().unwrap();
    let done = Done::default();
    let rt = runtime();
    let pool = rt.block_on(async {
        let pool = start(dir.path(), SyncPolicy::Always, &done, u64::MAX).await;
        submit_all(&pool, 20).await;
        completed(&pool, 20).await;
        // Nothing is submitted after the last completion: only the linger writes its ack.
        let stats = journal_until(dir.path(), |stats| stats.live_tasks == 0).await;
        assert_eq!(stats.live_tasks, 0, "{stats:?}");
        pool
    });
    crash(rt, pool);
    assert_eq!(
        replayed_after_restart(dir.path(), &done),
        0,
        "a finished task came back"
    );
}

/// How many tasks a new pool on `dir` replays (it runs them all, then shuts down).
fn replayed_after_restart(dir: &std::path::Path, done: &Done) -> u64 {
    runtime().block_on(async {
        let pool = start(dir, SyncPolicy::Always, done, u64::MAX).await;
        let replayed = pool.recovery().replayed;
        pool.shutdown().await.unwrap();
        replayed
    })
}

#[test]
fn a_clean_shutdown_leaves_only_the_live_tasks_in_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let done = Done::default();
    let live = runtime().block_on(async {
        let pool = start(dir.path(), SyncPolicy::Always, &done, 1_000).await;
        submit_all(&pool, 1_000).await;
        completed(&pool, 1_000).await;
        for n in 1_000..1_010 {
            pool.submit(n).await.unwrap();
        }
        let report = pool.shutdown().await.unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.completed, 1_000);
        report.spilled + report.interrupted
    });
    assert_eq!(live, 10);
    // The run's history (1,010 task records and 1,000 acks) is gone: one segment of ten.
    let stats = drainpool::journal::stats(dir.path()).unwrap();
    assert_eq!(
        (stats.segments, stats.live_tasks, stats.records),
        (1, 10, 10),
        "{stats:?}"
    );
}

#[test]
fn try_submit_refuses_to_wait_for_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let pool = start(dir.path(), SyncPolicy::Always, &Done::default(), u64::MAX).await;
        assert!(matches!(
            pool.try_submit(7),
            Err(SubmitError::WouldBlock(7))
        ));
        pool.shutdown().await.unwrap();
    });
}

#[test]
fn full_segments_are_deleted_once_their_tasks_are_done() {
    let dir = tempfile::tempdir().unwrap();
    let done = Done::default();
    let rt = runtime();
    let pool = rt.block_on(async {
        // Tasks from 2,000 on stay unfinished until the crash.
        let pool = start_small(dir.path(), &done, 2_000, 0).await;
        submit_all(&pool, 2_000).await;
        completed(&pool, 2_000).await;
        pool.submit(2_000).await.unwrap();
        pool.submit(2_001).await.unwrap();
        // 2,000 task records of ~70 bytes and their acks fill about 60 segments of 4 KiB;
        // every full one has gone once its tasks were done.
        let stats = journal_shrinks_to(dir.path(), 2).await;
        assert!(stats.segments <= 2, "{stats:?}");
        pool
    });
    crash(rt, pool);

    // What is left holds the two unfinished tasks, and of the finished ones at most those
    // whose ack the crash cut off.
    let live = live_payloads(dir.path());
    assert!(live.contains(&2_000) && live.contains(&2_001), "{live:?}");
    assert!(live.len() < 100, "{} live records survive", live.len());
}

/// A pool with small segments whose handler finishes every task except those from `hang_from`
/// on, which never finish; and tasks numbered below `fail_below`, which fail with a backoff of
/// an hour (so they wait for their retry until the crash).
async fn start_small(
    dir: &std::path::Path,
    done: &Done,
    hang_from: u64,
    fail_below: u64,
) -> Pool<u64> {
    let done = Arc::clone(done);
    Pool::builder()
        .workers(2)
        .durability(Durability::write_ahead(SyncPolicy::Never))
        .segment_bytes(4096)
        .backoff(Duration::from_secs(3600), Duration::from_secs(3600))
        .journal_dir(dir)
        .start(move |task: Task<u64>| {
            let done = Arc::clone(&done);
            async move {
                let n = *task.payload();
                if n >= hang_from {
                    std::future::pending::<()>().await;
                }
                if n < fail_below {
                    return Err(std::io::Error::other(format!("task {n} failed")));
                }
                done.lock().unwrap().push(n);
                Ok(())
            }
        })
        .await
        .unwrap()
}

/// Waits (bounded) until the journal has at most `segments` segments; returns the stats.
async fn journal_shrinks_to(dir: &std::path::Path, segments: u64) -> drainpool::journal::Stats {
    journal_until(dir, |stats| stats.segments <= segments).await
}

/// Waits (bounded) until the journal's stats satisfy `done`; returns the last stats read.
async fn journal_until(
    dir: &std::path::Path,
    done: impl Fn(&drainpool::journal::Stats) -> bool,
) -> drainpool::journal::Stats {
    let mut stats = drainpool::journal::stats(dir).unwrap();
    common::poll_until(common::PATIENCE, || {
        stats = drainpool::journal::stats(dir).unwrap();
        done(&stats)
    })
    .await;
    stats
}

/// The live tasks of a journal, by payload, in order.
fn live_payloads(dir: &std::path::Path) -> Vec<u64> {
    let contents = drainpool::journal::inspect(dir).unwrap();
    let mut live: Vec<u64> = contents
        .live
        .iter()
        .map(|t| serde_json::from_slice::<u64>(&t.payload).unwrap())
        .collect();
    live.sort_unstable();
    live
}

#[test]
fn a_task_that_never_finishes_does_not_pin_the_segments_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let done = Done::default();
    let rt = runtime();
    let pool = rt.block_on(async {
        // Task 1,000,000 is submitted first and never finishes; 3,000 quick ones follow.
        let pool = start_small(dir.path(), &done, 1_000_000, 0).await;
        pool.submit(1_000_000).await.unwrap();
        submit_all(&pool, 3_000).await;
        completed(&pool, 3_000).await;
        pool.submit(1_000_001).await.unwrap();
        // Without compaction the first segment would keep all ~75 after it.
        let stats = journal_shrinks_to(dir.path(), 4).await;
        assert!(stats.segments <= 4, "{stats:?}");
        assert!(pool.stats().compacted > 0, "{:?}", pool.stats());
        pool
    });
    crash(rt, pool);

    // The unfinished tasks are there once each (copies and originals are one task), and of
    // the finished ones at most those whose ack the crash cut off.
    let live = live_payloads(dir.path());
    assert_eq!(
        live.iter()
            .filter(|&&n| n >= 1_000_000)
            .copied()
            .collect::<Vec<_>>(),
        [1_000_000, 1_000_001],
        "{live:?}"
    );
    assert!(live.len() < 150, "{} live records survive", live.len());

    let rt = runtime();
    rt.block_on(async {
        let pool = start_small(dir.path(), &done, u64::MAX, 0).await;
        assert_eq!(pool.recovery().damage, []);
        assert_eq!(pool.recovery().replayed, live.len() as u64);
        completed(&pool, live.len() as u64).await;
        pool.shutdown().await.unwrap();
    });
}

#[test]
fn segments_of_an_earlier_run_go_as_their_replayed_tasks_finish() {
    let dir = tempfile::tempdir().unwrap();
    let done = Done::default();
    let rt = runtime();
    let pool = rt.block_on(async {
        // 600 tasks that never finish in this run: about ten segments.
        let pool = start_small(dir.path(), &done, 0, 0).await;
        submit_all(&pool, 600).await;
        pool
    });
    crash(rt, pool);
    let before = drainpool::journal::stats(dir.path()).unwrap();
    assert!(before.segments >= 10, "{before:?}");

    let rt = runtime();
    let pool = rt.block_on(async {
        let pool = start_small(dir.path(), &done, u64::MAX, 0).await;
        assert_eq!(pool.recovery().replayed, 600);
        completed(&pool, 600).await;
        // The earlier run's segments are gone while the pool runs, not only at its shutdown:
        // what is left is at most this run's segment, with the acks once they are written.
        let gone = |stats: &drainpool::journal::Stats| stats.segments <= 1 && stats.live_tasks == 0;
        let stats = journal_until(dir.path(), gone).await;
        assert!(gone(&stats), "{stats:?}");
        pool
    });
    crash(rt, pool);
    assert_eq!(live_payloads(dir.path()), Vec::<u64>::new());
}

#[test]
fn a_retry_state_reaches_the_journal_when_the_task_fails() {
    let dir = tempfile::tempdir().unwrap();
    let done = Done::default();
    let rt = runtime();
    let pool = rt.block_on(async {
        // Tasks 0 to 2 fail once, then wait an hour for their retry.
        let pool = start_small(dir.path(), &done, u64::MAX, 3).await;
        submit_all(&pool, 3).await;
        common::eventually(common::PATIENCE, "three tasks to fail once", || {
            pool.stats().retried >= 3
        })
        .await;
        assert_eq!(pool.stats().retried, 3);
        // The retry states ride with the next batch; this submit's record follows them.
        pool.submit(10).await.unwrap();
        completed(&pool, 1).await;
        pool
    });
    crash(rt, pool);

    // Task 10 finished, but its ack may not have been written before the crash.
    let contents = drainpool::journal::inspect(dir.path()).unwrap();
    let failed: Vec<_> = contents
        .live
        .iter()
        .filter(|task| task.payload != b"10")
        .collect();
    assert_eq!(failed.len(), 3, "{contents:?}");
    for task in failed {
        let n: u64 = serde_json::from_slice(&task.payload).unwrap();
        assert_eq!(task.attempts, 1, "{task:?}");
        assert_eq!(
            task.last_error.as_deref(),
            Some(&*format!("task {n} failed"))
        );
        // An hour's backoff, jittered down to half of it at most.
        assert!(task.not_before_ms > now_ms() + 1_700_000, "{task:?}");
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
