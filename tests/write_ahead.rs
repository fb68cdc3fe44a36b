//! The write-ahead mode in one process: a "crash" is the runtime torn down with the pool
//! running (no shutdown sequence, no spill), which leaves the journal as a SIGKILL would. The
//! real kills are in `tests/crash.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use drainpool::{Durability, Pool, SubmitError, SyncPolicy, Task};

type Done = Arc<Mutex<Vec<u64>>>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A pool whose handler records the task and returns at once, unless the task number is at
/// least `hang_from`: those wait for the drain deadline and give up.
async fn start(dir: &std::path::Path, sync: SyncPolicy, done: &Done, hang_from: u64) -> Pool<u64> {
    let done = Arc::clone(done);
    Pool::builder()
        .workers(2)
        .drain_deadline(Duration::from_millis(50))
        .cancel_grace(Duration::from_millis(10))
        .durability(Durability::WriteAhead { sync })
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
    let waited = std::time::Instant::now();
    while pool.stats().completed < count && waited.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
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
        // Give the acks' batch a moment to reach the file (they are not waited for).
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool
    });
    crash(rt, pool);

    let rt = runtime();
    rt.block_on(async {
        let pool = start(dir.path(), SyncPolicy::Always, &done, u64::MAX).await;
        assert_eq!(pool.recovery().replayed, 50);
        pool.shutdown().await.unwrap();
    });
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
    let stats = drainpool::journal::journal_stats(dir.path()).unwrap();
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
        let done = Arc::clone(&done);
        let pool = Pool::builder()
            .workers(2)
            .durability(Durability::WriteAhead {
                sync: SyncPolicy::Never,
            })
            .segment_bytes(4096)
            .journal_dir(dir.path())
            .start(move |task: Task<u64>| {
                let done = Arc::clone(&done);
                async move {
                    // Tasks from 2,000 on stay unfinished until the crash.
                    if *task.payload() >= 2_000 {
                        std::future::pending::<()>().await;
                    }
                    done.lock().unwrap().push(*task.payload());
                    Ok::<(), std::io::Error>(())
                }
            })
            .await
            .unwrap();
        submit_all(&pool, 2_000).await;
        completed(&pool, 2_000).await;
        pool.submit(2_000).await.unwrap();
        pool.submit(2_001).await.unwrap();
        // 2,000 task records of ~70 bytes and their acks fill about 60 segments of 4 KiB;
        // every full one has gone once its tasks were done.
        let waited = std::time::Instant::now();
        loop {
            let stats = drainpool::journal::journal_stats(dir.path()).unwrap();
            if stats.segments <= 2 || waited.elapsed() > Duration::from_secs(10) {
                assert!(stats.segments <= 2, "{stats:?}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        pool
    });
    crash(rt, pool);

    // What is left holds the two unfinished tasks, and of the finished ones at most those
    // whose ack the crash cut off.
    let contents = drainpool::journal::inspect_journal(dir.path()).unwrap();
    let live: Vec<u64> = contents
        .live
        .iter()
        .map(|t| serde_json::from_slice::<u64>(&t.payload).unwrap())
        .collect();
    assert!(live.contains(&2_000) && live.contains(&2_001), "{live:?}");
    assert!(live.len() < 100, "{} live records survive", live.len());
}
