//! The pool's lifecycle under a paused clock: intake, spill, deadline, reload.

mod common;

use std::time::Duration;

use common::{Action, Job, Ledger, counts_add_up, settle, start};
use drainpool::{Deadline, State, SubmitError};
use tokio_util::sync::CancellationToken;

#[tokio::test(start_paused = true)]
async fn intake_refusal_hands_the_task_back() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = start(dir.path(), 1, &ledger, |b| b).await.unwrap();
    let report = pool.shutdown().await.unwrap();
    assert!(report.is_clean());

    let job = Job::work(7, 1);
    match pool.submit(job.clone()).await {
        Err(SubmitError::ShuttingDown(back)) => assert_eq!(back, job),
        other => panic!("expected ShuttingDown, got {other:?}"),
    }
    match pool.try_submit(job.clone()) {
        Err(e @ SubmitError::ShuttingDown(_)) => assert_eq!(e.into_inner(), job),
        other => panic!("expected ShuttingDown, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_hands_the_task_back() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = start(dir.path(), 1, &ledger, |b| b.queue_capacity(2))
        .await
        .unwrap();
    pool.submit(Job::work(0, 1000)).await.unwrap();
    settle().await; // the worker takes job 0
    pool.try_submit(Job::work(1, 1)).unwrap();
    pool.try_submit(Job::work(2, 1)).unwrap();
    match pool.try_submit(Job::work(3, 1)) {
        Err(SubmitError::Full(back)) => assert_eq!(back.n, 3),
        other => panic!("expected Full, got {other:?}"),
    }
    assert_eq!(pool.stats().queued, 2);
    assert_eq!(pool.stats().in_flight, 1);
    // `submit` waits for room instead.
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.submit(Job::work(3, 1))
                .await
                .map_err(|e| e.into_inner().n)
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(waiting.await.unwrap().is_ok());
    let report = pool.shutdown().await.unwrap();
    assert_eq!(report.completed, 4);
    counts_add_up(&report);
}

#[tokio::test(start_paused = true)]
async fn an_oversized_payload_is_refused_at_submit() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = start(dir.path(), 1, &ledger, |b| b.max_record_bytes(256))
        .await
        .unwrap();
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Big(String);
    let big = drainpool::Pool::<Big>::builder()
        .journal_dir(dir.path().join("big"))
        .max_record_bytes(256)
        .start(|_task: drainpool::Task<Big>| async { Ok::<(), std::io::Error>(()) })
        .await
        .unwrap();
    match big.submit(Big("x".repeat(300))).await {
        Err(SubmitError::RecordTooLarge { task, limit }) => {
            assert_eq!(task.0.len(), 300);
            assert_eq!(limit, 256);
        }
        other => panic!(
            "expected RecordTooLarge, got {:?}",
            other.map_err(|e| e.to_string())
        ),
    }
    big.submit(Big("x".repeat(100))).await.unwrap();
    assert!(big.shutdown().await.unwrap().is_clean());
    assert!(pool.shutdown().await.unwrap().is_clean());
}

#[tokio::test(start_paused = true)]
async fn queued_tasks_are_spilled_and_never_started_during_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = start(dir.path(), 1, &ledger, |b| b).await.unwrap();
    for n in 0..10 {
        pool.submit(Job::work(n, 1000)).await.unwrap();
    }
    settle().await;
    assert_eq!(ledger.started(), vec![0]);
    let report = pool.shutdown().await.unwrap();
    // Only the task already running was started; it finished inside the deadline.
    assert_eq!(ledger.started(), vec![0]);
    assert_eq!(ledger.completed(), vec![0]);
    assert_eq!(
        (report.completed, report.spilled, report.interrupted),
        (1, 9, 0)
    );
    assert!(report.is_clean());
    counts_add_up(&report);

    // The next start replays exactly those nine, in order.
    let ledger = Ledger::default();
    let pool = start(dir.path(), 1, &ledger, |b| b).await.unwrap();
    assert_eq!(pool.recovery().replayed, 9);
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(ledger.completed(), (1..10).collect::<Vec<_>>());
    let report = pool.shutdown().await.unwrap();
    assert_eq!(
        (report.replayed, report.completed, report.spilled),
        (9, 9, 0)
    );
    counts_add_up(&report);
}

#[tokio::test(start_paused = true)]
async fn a_task_that_finishes_before_the_deadline_is_not_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = start(dir.path(), 2, &ledger, |b| b).await.unwrap();
    pool.submit(Job::work(1, 5_000)).await.unwrap();
    settle().await;
    let report = pool.shutdown().await.unwrap();
    assert_eq!(
        (report.completed, report.spilled, report.interrupted),
        (1, 0, 0)
    );
    assert!(report.drain_time >= Duration::from_secs(5));
    assert!(report.drain_time < Duration::from_secs(10));

    let pool = start(dir.path(), 2, &Ledger::default(), |b| b)
        .await
        .unwrap();
    assert_eq!(pool.recovery().replayed, 0);
    pool.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_task_ignoring_its_token_is_aborted_at_deadline_plus_grace_and_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = start(dir.path(), 1, &ledger, |b| b).await.unwrap();
    let id = pool
        .submit(Job::with(1, 3_600_000, Action::IgnoreToken))
        .await
        .unwrap();
    settle().await;
    let report = pool.shutdown().await.unwrap();
    assert_eq!((report.completed, report.interrupted), (0, 1));
    assert_eq!(report.interrupted_ids, vec![id]);
    // Deadline 10 s plus grace 2 s, on the paused clock.
    assert!(report.drain_time >= Duration::from_secs(12), "{report:?}");
    assert!(report.drain_time < Duration::from_secs(13), "{report:?}");
    assert!(ledger.finished().is_empty());
    counts_add_up(&report);

    // Reloaded with the same id, told it was interrupted, its attempt not counted.
    let ledger = Ledger::default();
    let pool = start(dir.path(), 1, &ledger, |b| b).await.unwrap();
    let _token = pool.shutdown_token(); // a handle on the trigger is cheap and changes nothing
    assert_eq!(pool.recovery().replayed, 1);
    settle().await;
    let report = pool.shutdown().await.unwrap();
    assert_eq!(report.interrupted, 1);
    let ledger = Ledger::default();
    let pool = start(dir.path(), 1, &ledger, |b| {
        b.drain_deadline(Duration::from_secs(7200))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3601)).await;
    let runs = ledger.finished();
    assert_eq!(runs.len(), 1);
    assert_eq!(
        (runs[0].id, runs[0].attempt, runs[0].interrupted_before),
        (id, 1, true)
    );
    pool.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_handler_giving_up_at_its_token_is_interrupted_and_one_checkpointing_completes() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = start(dir.path(), 2, &ledger, |b| b).await.unwrap();
    let gave_up = pool
        .submit(Job::with(1, 3_600_000, Action::HonourToken))
        .await
        .unwrap();
    pool.submit(Job::with(2, 3_600_000, Action::Checkpoint))
        .await
        .unwrap();
    settle().await;
    let report = pool.shutdown().await.unwrap();
    assert_eq!(
        (report.completed, report.interrupted, report.failed),
        (1, 1, 0)
    );
    assert_eq!(report.interrupted_ids, vec![gave_up]);
    // Both returned when the token fired: no need to wait for the grace.
    assert_eq!(report.drain_time, Duration::from_secs(10));
    counts_add_up(&report);
}

#[tokio::test(start_paused = true)]
async fn reload_keeps_fifo_order_and_runs_before_new_work() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = start(dir.path(), 1, &ledger, |b| b).await.unwrap();
    pool.submit(Job::with(0, 3_600_000, Action::IgnoreToken))
        .await
        .unwrap();
    for n in 1..50 {
        pool.submit(Job::work(n, 1)).await.unwrap();
    }
    settle().await;
    let report = pool.shutdown().await.unwrap();
    assert_eq!((report.spilled, report.interrupted), (49, 1));

    let ledger = Ledger::default();
    let pool = start(dir.path(), 1, &ledger, |b| b).await.unwrap();
    for n in 100..110 {
        pool.submit(Job::work(n, 1)).await.unwrap();
    }
    // Job 0 (interrupted) ignores its token for an hour; let it and everything else run.
    tokio::time::sleep(Duration::from_secs(3700)).await;
    let expected: Vec<u64> = (0..50).chain(100..110).collect();
    assert_eq!(ledger.started(), expected);
    let report = pool.shutdown().await.unwrap();
    assert_eq!(
        (report.replayed, report.submitted, report.completed),
        (50, 10, 60)
    );
    counts_add_up(&report);
}

#[tokio::test(start_paused = true)]
async fn failures_and_panics_are_recorded_and_never_take_a_worker_down() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = start(dir.path(), 1, &ledger, |b| b.max_attempts(1))
        .await
        .unwrap();
    pool.submit(Job::with(1, 0, Action::Panic)).await.unwrap();
    pool.submit(Job::with(2, 0, Action::Fail)).await.unwrap();
    pool.submit(Job::work(3, 10)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ledger.completed(), vec![3]);
    let stats = pool.stats();
    assert_eq!((stats.failed, stats.completed), (2, 1));
    let report = pool.shutdown().await.unwrap();
    assert_eq!((report.failed, report.completed), (2, 1));
    counts_add_up(&report);

    // The failed tasks are kept as dead letters, not replayed.
    let pool = start(dir.path(), 1, &Ledger::default(), |b| b)
        .await
        .unwrap();
    assert_eq!(pool.recovery().replayed, 0);
    assert_eq!(pool.recovery().dead_letters, 2);
    pool.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_counts_add_up_in_a_mixed_run() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = start(dir.path(), 3, &ledger, |b| b.max_attempts(1))
        .await
        .unwrap();
    pool.submit(Job::with(1, 3_600_000, Action::IgnoreToken))
        .await
        .unwrap();
    pool.submit(Job::with(2, 0, Action::Fail)).await.unwrap();
    pool.submit(Job::work(3, 100)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    pool.submit(Job::work(4, 5_000)).await.unwrap();
    pool.submit(Job::work(5, 5_000)).await.unwrap();
    settle().await;
    for n in 6..20 {
        pool.submit(Job::work(n, 5_000)).await.unwrap();
    }
    let report = pool.shutdown().await.unwrap();
    assert_eq!(report.submitted, 19);
    assert_eq!(report.completed, 3); // 3, 4, 5
    assert_eq!(report.failed, 1);
    assert_eq!(report.interrupted, 1);
    assert_eq!(report.spilled, 14);
    counts_add_up(&report);

    let ledger = Ledger::default();
    let pool = start(dir.path(), 3, &ledger, |b| b).await.unwrap();
    // Two workers take the 14 tasks of 5 s, six each by 30 s; at 31 s the last two run, and
    // finish within the drain. (At exactly 30 s, intake closing as they end would spill them.)
    tokio::time::sleep(Duration::from_secs(31)).await;
    let report = pool.shutdown().await.unwrap();
    assert_eq!(report.replayed, 15);
    assert_eq!(report.completed, 14);
    assert_eq!(report.interrupted, 1); // task 1 ignores its token again
    counts_add_up(&report);
}

#[tokio::test(start_paused = true)]
async fn state_moves_from_running_to_draining_to_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = start(dir.path(), 1, &ledger, |b| b).await.unwrap();
    let mut state = pool.watch_state();
    assert_eq!(state.get(), State::Running);
    assert_eq!(pool.state(), State::Running);
    pool.submit(Job::work(1, 5_000)).await.unwrap();
    settle().await;
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.shutdown().await }
    });
    assert_eq!(state.changed().await, Some(State::Draining));
    assert!(matches!(
        pool.try_submit(Job::work(2, 1)),
        Err(SubmitError::ShuttingDown(_))
    ));
    assert_eq!(state.changed().await, Some(State::Stopped));
    let report = waiter.await.unwrap().unwrap();
    assert_eq!(report.completed, 1);
    // Every clone waits for the same report.
    assert_eq!(pool.wait().await.unwrap().completed, 1);
}

#[tokio::test(start_paused = true)]
async fn a_second_pool_on_a_locked_directory_is_refused_until_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let pool = start(dir.path(), 1, &Ledger::default(), |b| b)
        .await
        .unwrap();
    match start(dir.path(), 1, &Ledger::default(), |b| b).await {
        Err(e @ drainpool::StartError::JournalLocked { .. }) => {
            assert!(
                e.to_string().contains(&dir.path().display().to_string()),
                "{e}"
            );
        }
        other => panic!("expected JournalLocked, got {other:?}"),
    }
    pool.shutdown().await.unwrap();
    let again = start(dir.path(), 1, &Ledger::default(), |b| b)
        .await
        .unwrap();
    again.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_users_token_starts_the_shutdown_and_is_not_cancelled_by_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let pool = start(dir.path(), 1, &Ledger::default(), |b| {
        b.shutdown_token(token.clone())
    })
    .await
    .unwrap();
    for n in 0..5 {
        pool.submit(Job::with(n, 3_600_000, Action::IgnoreToken))
            .await
            .unwrap();
    }
    settle().await;
    assert_eq!(pool.stats().in_flight, 1);
    token.cancel();
    let report = pool.wait().await.unwrap();
    assert_eq!((report.interrupted, report.spilled), (1, 4));

    let other = CancellationToken::new();
    let pool = start(dir.path(), 1, &Ledger::default(), |b| {
        b.shutdown_token(other.clone())
    })
    .await
    .unwrap();
    pool.shutdown().await.unwrap();
    assert!(!other.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn dropping_the_last_handle_spills_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let pool = start(dir.path(), 1, &Ledger::default(), |b| b)
        .await
        .unwrap();
    let mut state = pool.watch_state();
    for n in 0..5 {
        pool.submit(Job::with(n, 3_600_000, Action::IgnoreToken))
            .await
            .unwrap();
    }
    settle().await;
    drop(pool);
    state.wait_for(|s| s == State::Stopped).await.unwrap();
    let pool = start(dir.path(), 1, &Ledger::default(), |b| b)
        .await
        .unwrap();
    assert_eq!(pool.recovery().replayed, 5);
    pool.shutdown_now();
    pool.wait().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_now_skips_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let pool = start(dir.path(), 2, &Ledger::default(), |b| b)
        .await
        .unwrap();
    pool.submit(Job::with(1, 3_600_000, Action::IgnoreToken))
        .await
        .unwrap();
    pool.submit(Job::work(2, 3_600_000)).await.unwrap();
    settle().await;
    assert!(pool.shutdown_now());
    assert!(!pool.shutdown_now());
    let report = pool.wait().await.unwrap();
    assert_eq!(report.interrupted, 2);
    assert_eq!(report.drain_time, Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_payload_that_no_longer_decodes_becomes_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let pool = start(dir.path(), 1, &Ledger::default(), |b| b)
        .await
        .unwrap();
    pool.submit(Job::with(1, 3_600_000, Action::IgnoreToken))
        .await
        .unwrap();
    pool.submit(Job::work(2, 1)).await.unwrap();
    pool.shutdown_now();
    pool.wait().await.unwrap();

    // The task type changed in an "upgrade".
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Renamed {
        number: u64,
    }
    let pool = drainpool::Pool::<Renamed>::builder()
        .journal_dir(dir.path())
        .start(|_task: drainpool::Task<Renamed>| async { Ok::<(), std::io::Error>(()) })
        .await
        .unwrap();
    assert_eq!(pool.recovery().undecodable, 2);
    assert_eq!(pool.recovery().replayed, 0);
    pool.shutdown().await.unwrap();

    // They stay dead letters (not lost, not replayed) on the next start too.
    let pool = start(dir.path(), 1, &Ledger::default(), |b| b)
        .await
        .unwrap();
    assert_eq!(pool.recovery().replayed, 0);
    assert_eq!(pool.recovery().dead_letters, 2);
    pool.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_deadline_is_derived_from_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = start(dir.path(), 2, &ledger, |b| {
        b.deadline(Deadline::GracePeriod {
            grace: Duration::from_secs(30),
            pre_stop: Duration::from_secs(5),
        })
    })
    .await
    .unwrap();
    let id = pool
        .submit(Job::with(1, 3_600_000, Action::IgnoreToken))
        .await
        .unwrap();
    for n in 2..100 {
        pool.submit(Job::with(n, 3_600_000, Action::IgnoreToken))
            .await
            .unwrap();
    }
    settle().await;
    let report = pool.shutdown().await.unwrap();
    let budget = report.budget.expect("a budget when a grace period is set");
    assert_eq!(budget.grace_period, Duration::from_secs(30));
    assert_eq!(budget.drain_deadline, report.drain_deadline);
    assert_eq!(
        budget.pre_stop + budget.drain_deadline + budget.cancel_grace + budget.spill_reserve,
        budget.grace_period
    );
    // The reserve keeps at least its 5% margin, and leaves most of the time to the drain.
    assert!(
        budget.spill_reserve >= Duration::from_millis(1250),
        "{budget:?}"
    );
    assert!(
        budget.drain_deadline > Duration::from_secs(15),
        "{budget:?}"
    );
    assert!(budget.write_bytes_per_sec > 0);
    // The tasks ignoring their token were stopped at the derived deadline plus the grace.
    let hard_stop = report.drain_deadline + Duration::from_secs(2);
    assert!(report.drain_time >= hard_stop, "{report:?}");
    assert!(
        report.drain_time <= hard_stop + Duration::from_millis(5),
        "{report:?}"
    );
    assert_eq!(report.interrupted, 2);
    assert!(report.interrupted_ids.contains(&id));
    assert_eq!(report.spilled, 97);
    counts_add_up(&report);
}

#[tokio::test(start_paused = true)]
async fn a_pre_stop_longer_than_the_grace_period_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let result = start(dir.path(), 1, &Ledger::default(), |b| {
        b.deadline(Deadline::GracePeriod {
            grace: Duration::from_secs(5),
            pre_stop: Duration::from_secs(5),
        })
    })
    .await;
    assert!(
        matches!(
            result,
            Err(drainpool::StartError::InvalidConfig {
                setting: "deadline",
                ..
            })
        ),
        "{result:?}"
    );
}

/// A crash in the middle of a replay run (the runtime torn down: no spill, no close) loses
/// nothing: the replayed tasks' segment is still there, and the acks written so far spare the
/// finished ones a repeat.
#[test]
fn a_crash_during_the_replay_run_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = common::current_thread_runtime;
    let all: Vec<u64> = (0..20).collect();

    // Run 1: twenty tasks journaled (task 0 running and interrupted, the rest spilled).
    runtime().block_on(async {
        let pool = start(dir.path(), 1, &Ledger::default(), |b| b)
            .await
            .unwrap();
        pool.submit(Job::with(0, 300, Action::IgnoreToken))
            .await
            .unwrap();
        for n in 1..20 {
            pool.submit(Job::work(n, 20)).await.unwrap();
        }
        common::eventually(common::PATIENCE, "task 0 in flight", || {
            pool.stats().in_flight == 1
        })
        .await;
        pool.shutdown_now();
        let report = pool.wait().await.unwrap();
        assert_eq!((report.interrupted, report.spilled), (1, 19));
    });

    // Run 2: replays them; once ten have finished, the process "dies": the runtime is torn
    // down with the pool still running, so no shutdown sequence runs.
    let ledger = Ledger::default();
    let rt = runtime();
    let pool = rt.block_on(async {
        let pool = start(dir.path(), 2, &ledger, |b| b).await.unwrap();
        assert_eq!(pool.recovery().replayed, 20);
        common::eventually(
            Duration::from_secs(30),
            "ten replayed tasks to complete",
            || ledger.completed().len() >= 10,
        )
        .await;
        pool
    });
    rt.shutdown_background();
    drop(pool);
    let completed_before_crash: std::collections::BTreeSet<u64> =
        ledger.completed().into_iter().collect();
    assert!(completed_before_crash.len() >= 10);

    // Run 3: everything not acked comes back (at most one finished task whose ack the crash
    // cut off is repeated), and the work completes.
    let ledger = Ledger::default();
    runtime().block_on(async {
        let pool = start(dir.path(), 2, &ledger, |b| b).await.unwrap();
        let replayed = pool.recovery().replayed as usize;
        assert!(
            (20..=21).contains(&(replayed + completed_before_crash.len())),
            "replayed {replayed}, completed before the crash {completed_before_crash:?}"
        );
        common::eventually(
            Duration::from_secs(30),
            "every replayed task to complete",
            || ledger.completed().len() >= replayed,
        )
        .await;
        let report = pool.shutdown().await.unwrap();
        assert_eq!(report.completed as usize, replayed);
    });
    let mut done: Vec<u64> = completed_before_crash
        .into_iter()
        .chain(ledger.completed())
        .collect();
    done.sort_unstable();
    done.dedup();
    assert_eq!(done, all, "every task finished in some run");
}

/// A handler that blocks its thread past the hard stop does not keep the other interrupted
/// tasks off the disk: they are journaled while it is still blocked (so a third signal, which
/// exits at once, loses only the blocked one).
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn tasks_dropped_at_the_hard_stop_are_journaled_while_a_blocked_handler_still_runs() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[derive(serde::Serialize, serde::Deserialize)]
    enum Work {
        BlockThread,
        Hang,
    }
    let dir = tempfile::tempdir().unwrap();
    let unblocked = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&unblocked);
    let started = Arc::new(AtomicUsize::new(0));
    let starts = Arc::clone(&started);
    let pool = drainpool::Pool::builder()
        .workers(2)
        .drain_deadline(Duration::from_millis(100))
        .cancel_grace(Duration::from_millis(50))
        .journal_dir(dir.path())
        .start(move |task: drainpool::Task<Work>| {
            let flag = Arc::clone(&flag);
            let starts = Arc::clone(&starts);
            async move {
                starts.fetch_add(1, Ordering::SeqCst);
                match task.payload() {
                    Work::BlockThread => {
                        // Blocking as a careful handler does it: the runtime moves this
                        // worker's other tasks elsewhere.
                        tokio::task::block_in_place(|| std::thread::sleep(Duration::from_secs(3)));
                        flag.store(true, Ordering::SeqCst);
                    }
                    Work::Hang => tokio::time::sleep(Duration::from_secs(3600)).await,
                }
                Ok::<(), std::io::Error>(())
            }
        })
        .await
        .unwrap();
    pool.submit(Work::BlockThread).await.unwrap();
    let hung = pool.submit(Work::Hang).await.unwrap();
    // Both handlers run before the shutdown begins (else the hung task would be spilled).
    common::eventually(common::PATIENCE, "both handlers to start", || {
        started.load(Ordering::SeqCst) == 2
    })
    .await;
    let shutdown = tokio::spawn({
        let pool = pool.clone();
        async move { pool.shutdown().await }
    });

    let found = common::poll_until(Duration::from_secs(2), || {
        let live = drainpool::journal::inspect(dir.path()).unwrap().live;
        live.iter().any(|t| t.id == hung)
    })
    .await;
    assert!(
        found,
        "the hung task was not journaled while the other handler blocked"
    );
    assert!(
        !unblocked.load(Ordering::SeqCst),
        "the blocked handler returned first"
    );

    let report = shutdown.await.unwrap().unwrap();
    assert_eq!(report.interrupted, 1);
    assert_eq!(report.completed, 1); // the blocked handler returned Ok after the hard stop
    assert_eq!(report.interrupted_ids, [hung]);
    counts_add_up(&report);
}
