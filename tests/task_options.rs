//! Task options (`Pool::task`): priority and its starvation bound, run at / delay, time to
//! live, unique keys, the per-task retry limit; each through a spill and a reload, and shown
//! by `inspect`. The SIGKILL rounds (write-ahead) are in `tests/crash.rs`'s options round.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{PATIENCE, eventually, multi_thread_runtime as runtime};
use drainpool::journal::inspect;
use drainpool::{Builder, Expiry, Pool, Runner, SubmitError, Task, TaskBuilder, TaskId};

/// What the handler saw, in the order the runs started: (payload, attempt, wall ms at start).
type Seen = Arc<Mutex<Vec<(String, u32, u64)>>>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn builder(dir: &Path) -> Builder<String> {
    Pool::builder()
        .workers(1)
        .queue_capacity(1_000)
        .drain_deadline(Duration::from_secs(5))
        .cancel_grace(Duration::from_millis(200))
        .backoff(Duration::from_millis(1), Duration::from_millis(2))
        .journal_dir(dir)
}

/// Runs `runner` with a handler that records each run and fails the payloads starting with
/// "fail".
fn run(runner: Runner<String>, seen: &Seen) {
    let seen = Arc::clone(seen);
    runner.run(move |task: Task<String>| {
        let seen = Arc::clone(&seen);
        async move {
            let payload = task.payload().clone();
            let failing = payload.starts_with("fail");
            seen.lock()
                .unwrap()
                .push((payload, task.attempt(), now_ms()));
            if failing {
                Err("refused by the test")
            } else {
                Ok(())
            }
        }
    });
}

/// Submits `payload` with the options `with` sets; its id.
async fn submit(
    pool: &Pool<String>,
    payload: String,
    with: impl for<'a> FnOnce(TaskBuilder<'a, String>) -> TaskBuilder<'a, String>,
) -> TaskId {
    with(pool.task(payload)).submit().await.unwrap()
}

fn names(seen: &Seen) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(p, _, _)| p.clone())
        .collect()
}

#[test]
fn higher_priorities_run_first_and_each_level_in_order() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (pool, runner) = builder(dir.path()).build().await.unwrap();
        // Submitted before the worker runs, so the order is the queue's alone.
        for (name, level) in [
            ("a0", 0),
            ("b7", 7),
            ("c3", 3),
            ("d7", 7),
            ("e0", 0),
            ("f3", 3),
        ] {
            submit(&pool, name.to_string(), |t| t.priority(level)).await;
        }
        // A level above 7 is taken as 7: after the two 7s already queued.
        submit(&pool, "g9".to_string(), |t| t.priority(9)).await;
        let seen = Seen::default();
        run(runner, &seen);
        eventually(PATIENCE, "every task to run", || {
            seen.lock().unwrap().len() == 7
        })
        .await;
        assert_eq!(names(&seen), ["b7", "d7", "g9", "c3", "f3", "a0", "e0"]);
        let report = pool.shutdown().await.unwrap();
        assert_eq!(report.completed, 7);
    });
}

#[test]
fn a_low_priority_task_waits_at_most_sixteen_starts() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (pool, runner) = builder(dir.path()).build().await.unwrap();
        submit(&pool, "low".to_string(), |t| t.priority(0)).await;
        for n in 0..100 {
            submit(&pool, format!("high{n}"), |t| t.priority(5)).await;
        }
        let seen = Seen::default();
        run(runner, &seen);
        eventually(PATIENCE, "every task to run", || {
            seen.lock().unwrap().len() == 101
        })
        .await;
        let names = names(&seen);
        let low = names.iter().position(|n| n == "low").unwrap();
        // Nothing was older than it: it is the oldest at the 16th start.
        assert_eq!(low, 15, "{names:?}");
        // The high ones kept their order around it.
        let highs: Vec<_> = names.iter().filter(|n| *n != "low").cloned().collect();
        let expected: Vec<_> = (0..100).map(|n| format!("high{n}")).collect();
        assert_eq!(highs, expected);
        pool.shutdown().await.unwrap();
    });
}

#[test]
fn a_delayed_task_waits_for_its_time_without_a_place_in_the_queue() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (pool, runner) = builder(dir.path()).queue_capacity(1).build().await.unwrap();
        let submitted = now_ms();
        submit(&pool, "later".to_string(), |t| {
            t.delay(Duration::from_millis(300))
        })
        .await;
        // It takes no room: the one place is still free, and a task now runs first.
        pool.try_submit("now".to_string()).unwrap();
        let seen = Seen::default();
        run(runner, &seen);
        eventually(PATIENCE, "both tasks to run", || {
            seen.lock().unwrap().len() == 2
        })
        .await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[0].0, "now");
        assert_eq!(seen[1].0, "later");
        assert!(seen[1].2 >= submitted + 300, "ran early: {seen:?}");
        pool.shutdown().await.unwrap();
    });
}

#[test]
fn a_delayed_task_is_spilled_with_its_time_and_waits_for_it_after_a_reload() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (pool, runner) = builder(dir.path()).build().await.unwrap();
        let run_at = SystemTime::now() + Duration::from_millis(600);
        let at_ms = run_at.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        let id = submit(&pool, "later".to_string(), |t| t.run_at(run_at)).await;
        drop(runner);
        let report = pool.shutdown().await.unwrap();
        assert_eq!(report.spilled, 1);
        let contents = inspect(dir.path()).unwrap();
        assert_eq!(contents.live.len(), 1);
        assert_eq!(contents.live[0].id, id);
        assert_eq!(contents.live[0].not_before_ms, at_ms);

        let (pool, runner) = builder(dir.path()).build().await.unwrap();
        let seen = Seen::default();
        run(runner, &seen);
        eventually(PATIENCE, "the task to run", || {
            seen.lock().unwrap().len() == 1
        })
        .await;
        let started = seen.lock().unwrap()[0].2;
        assert!(started >= at_ms, "ran at {started}, before {at_ms}");
        let report = pool.shutdown().await.unwrap();
        assert_eq!((report.replayed, report.completed), (1, 1));
    });
}

/// Waits until the wall clock is past `ms` (a state of the clock, not a guess at a delay).
async fn until_past(ms: u64) {
    eventually(PATIENCE, "the clock to pass the expiry", || now_ms() > ms).await;
}

#[test]
fn an_expired_task_is_not_run_but_kept_as_a_dead_letter_or_dropped() {
    runtime().block_on(async {
        for policy in [Expiry::DeadLetter, Expiry::Drop] {
            let dir = tempfile::tempdir().unwrap();
            let (pool, runner) = builder(dir.path()).on_expiry(policy).build().await.unwrap();
            let expires = SystemTime::now() + Duration::from_millis(20);
            let expires_ms = expires.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
            submit(&pool, "stale".to_string(), |t| t.expires_at(expires)).await;
            submit(&pool, "fresh".to_string(), |t| {
                t.time_to_live(Duration::from_secs(3600))
            })
            .await;
            until_past(expires_ms).await;
            let seen = Seen::default();
            run(runner, &seen);
            eventually(PATIENCE, "the fresh task to run", || {
                seen.lock().unwrap().len() == 1
            })
            .await;
            eventually(PATIENCE, "the expiry to be counted", || {
                pool.stats().expired == 1
            })
            .await;
            let report = pool.shutdown().await.unwrap();
            assert_eq!(names(&seen), ["fresh"]);
            assert_eq!(report.expired, 1);
            assert_eq!(report.completed, 1);
            let dead = inspect(dir.path()).unwrap().dead;
            match policy {
                Expiry::DeadLetter => {
                    assert_eq!((report.failed, report.dropped), (1, 0));
                    assert_eq!(dead.len(), 1);
                    let reason = dead[0].last_error.as_deref().unwrap();
                    assert!(reason.contains("expired"), "{reason}");
                    assert_eq!(dead[0].expires_at_ms, Some(expires_ms));
                }
                _ => {
                    assert_eq!((report.failed, report.dropped), (0, 1));
                    assert!(dead.is_empty());
                }
            }
        }
    });
}

#[test]
fn a_task_that_expires_while_spilled_is_a_dead_letter_after_the_reload() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (pool, runner) = builder(dir.path()).build().await.unwrap();
        let id = submit(&pool, "stale".to_string(), |t| {
            t.time_to_live(Duration::from_millis(50))
        })
        .await;
        drop(runner);
        assert_eq!(pool.shutdown().await.unwrap().spilled, 1);
        let live = inspect(dir.path()).unwrap().live;
        let expires_ms = live[0].expires_at_ms.expect("the expiry is journaled");
        until_past(expires_ms).await;

        let (pool, runner) = builder(dir.path()).build().await.unwrap();
        let seen = Seen::default();
        run(runner, &seen);
        eventually(PATIENCE, "the expiry", || pool.stats().expired == 1).await;
        let report = pool.shutdown().await.unwrap();
        assert!(names(&seen).is_empty());
        assert_eq!((report.replayed, report.failed, report.expired), (1, 1, 1));
        let contents = inspect(dir.path()).unwrap();
        assert!(contents.live.is_empty());
        assert_eq!(contents.dead.len(), 1);
        assert_eq!(contents.dead[0].id, id);
    });
}

#[test]
fn a_unique_key_is_refused_while_its_task_is_held_and_free_once_it_is_done() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (pool, runner) = builder(dir.path()).build().await.unwrap();
        let first = submit(&pool, "one".to_string(), |t| t.unique_key("order:7")).await;
        match pool
            .task("two".to_string())
            .unique_key("order:7")
            .submit()
            .await
        {
            Err(SubmitError::Duplicate {
                task,
                first: holder,
            }) => {
                assert_eq!((task.as_str(), holder), ("two", first));
            }
            other => panic!("expected Duplicate, got {other:?}"),
        }
        match pool
            .task("three".to_string())
            .unique_key("order:7")
            .try_submit()
        {
            Err(SubmitError::Duplicate { first: holder, .. }) => assert_eq!(holder, first),
            other => panic!("expected Duplicate, got {other:?}"),
        }
        // Another key, and no key, are not affected.
        submit(&pool, "four".to_string(), |t| t.unique_key("order:8")).await;
        pool.submit("five".to_string()).await.unwrap();
        let seen = Seen::default();
        run(runner, &seen);
        eventually(PATIENCE, "three runs", || pool.stats().completed == 3).await;
        // Completed: the key is free again.
        let again = submit(&pool, "six".to_string(), |t| t.unique_key("order:7")).await;
        assert_ne!(again, first);
        eventually(PATIENCE, "four runs", || pool.stats().completed == 4).await;
        pool.shutdown().await.unwrap();
    });
}

#[test]
fn a_unique_key_holds_across_a_spill_and_a_reload_and_is_freed_by_a_dead_letter() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (pool, runner) = builder(dir.path()).build().await.unwrap();
        let first = submit(&pool, "fail: keyed".to_string(), |t| {
            t.unique_key("k").max_attempts(1)
        })
        .await;
        drop(runner);
        pool.shutdown().await.unwrap();

        let (pool, runner) = builder(dir.path()).build().await.unwrap();
        // Replayed, not running yet: the key is still its.
        match pool
            .task("other".to_string())
            .unique_key("k")
            .submit()
            .await
        {
            Err(SubmitError::Duplicate { first: holder, .. }) => assert_eq!(holder, first),
            other => panic!("expected Duplicate, got {other:?}"),
        }
        let seen = Seen::default();
        run(runner, &seen);
        eventually(PATIENCE, "the dead letter", || pool.stats().failed == 1).await;
        // Its one attempt failed: a dead letter, and the key is free.
        submit(&pool, "other".to_string(), |t| t.unique_key("k")).await;
        eventually(PATIENCE, "the second task", || pool.stats().completed == 1).await;
        pool.shutdown().await.unwrap();
    });
}

#[test]
fn a_task_retry_limit_overrides_the_pools() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (pool, runner) = builder(dir.path()).max_attempts(5).build().await.unwrap();
        submit(&pool, "fail once".to_string(), |t| t.max_attempts(1)).await;
        submit(&pool, "fail thrice".to_string(), |t| t.max_attempts(3)).await;
        let seen = Seen::default();
        run(runner, &seen);
        eventually(PATIENCE, "both dead letters", || pool.stats().failed == 2).await;
        let report = pool.shutdown().await.unwrap();
        let attempts = |name: &str| {
            seen.lock()
                .unwrap()
                .iter()
                .filter(|(p, _, _)| p == name)
                .count()
        };
        assert_eq!((attempts("fail once"), attempts("fail thrice")), (1, 3));
        assert_eq!((report.failed, report.retried), (2, 2));
        let dead = inspect(dir.path()).unwrap().dead;
        assert_eq!(dead.len(), 2);
        assert!(
            dead.iter()
                .any(|t| t.max_attempts == Some(1) && t.attempts == 1)
        );
        assert!(
            dead.iter()
                .any(|t| t.max_attempts == Some(3) && t.attempts == 3)
        );
    });
}

#[test]
fn every_option_is_journaled_by_a_spill_shown_by_inspect_and_kept_by_a_reload() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (pool, runner) = builder(dir.path()).build().await.unwrap();
        let plain = pool.submit("plain".to_string()).await.unwrap();
        let rich = submit(&pool, "rich".to_string(), |t| {
            t.priority(6)
                .max_attempts(2)
                .time_to_live(Duration::from_secs(3600))
                .unique_key("rich:1")
        })
        .await;
        // A priority alone: held without options of its own, journaled all the same.
        let ranked = submit(&pool, "ranked".to_string(), |t| t.priority(3)).await;
        drop(runner);
        pool.shutdown().await.unwrap();
        let live = inspect(dir.path()).unwrap().live;
        let find = |id: TaskId| live.iter().find(|t| t.id == id).unwrap();
        let (p, r, k) = (find(plain), find(rich), find(ranked));
        assert_eq!(
            (p.priority, p.max_attempts, p.expires_at_ms),
            (0, None, None)
        );
        assert_eq!(p.unique_key, None);
        assert_eq!((r.priority, r.max_attempts), (6, Some(2)));
        assert!(r.expires_at_ms.unwrap() > now_ms());
        assert_eq!(r.unique_key.as_deref(), Some("rich:1"));
        assert_eq!(
            (k.priority, k.max_attempts, k.expires_at_ms),
            (3, None, None)
        );
        assert_eq!(k.unique_key, None);

        // Reloaded: the higher priority is replayed first, and the key is held.
        let (pool, runner) = builder(dir.path()).build().await.unwrap();
        assert!(matches!(
            pool.task("again".to_string()).unique_key("rich:1").try_submit(),
            Err(SubmitError::Duplicate { first, .. }) if first == rich
        ));
        let seen = Seen::default();
        run(runner, &seen);
        eventually(PATIENCE, "the three runs", || {
            seen.lock().unwrap().len() == 3
        })
        .await;
        assert_eq!(names(&seen), ["rich", "ranked", "plain"]);
        pool.shutdown().await.unwrap();
    });
}

/// Write-ahead: every option of an accepted task survives a SIGKILL of the process that
/// accepted it. The worker is this test binary started again (`options_kill_worker`); it
/// journals tasks with options (its runner never runs, so all stay live), writes each
/// acknowledged one to a ledger, and is killed with SIGKILL once it says it is done.
#[cfg(unix)]
mod sigkill {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use drainpool::journal::inspect;
    use drainpool::{Durability, SubmitError, SyncPolicy};
    use rustix::process::Signal;

    use super::common::child::{LedgerFile, SelfExec, read, run_worker, touch};
    use super::common::{PATIENCE, eventually};
    use super::{Seen, builder, names, now_ms, run, runtime};

    const WORKER: SelfExec = SelfExec {
        test: "sigkill::options_kill_worker",
        dir_var: "DRAINPOOL_OPTIONS_WORKER_DIR",
        config_var: "DRAINPOOL_OPTIONS_WORKER_CONFIG",
        exit_poll: Duration::from_millis(1),
        ready_poll: Duration::from_millis(1),
    };
    const TASKS: u64 = 40;
    const HOUR: Duration = Duration::from_secs(3600);

    fn journal(dir: &Path) -> PathBuf {
        dir.join("journal")
    }

    /// Task `n`'s options: priority `n % 8`, retry limit `n % 3 + 1`, key `key<n>`, an hour to
    /// live, except every fourth from the fourth on, which sets its priority alone; every
    /// fifth is delayed by an hour.
    fn delayed(n: u64) -> bool {
        n.is_multiple_of(5)
    }

    fn level_only(n: u64) -> bool {
        n % 4 == 3
    }

    #[test]
    #[ignore = "the worker process of write_ahead_keeps_every_option_through_a_sigkill"]
    fn options_kill_worker() {
        let Some((dir, _)) = WORKER.worker_env() else {
            return;
        };
        run_worker(true, async move {
            let (pool, _runner) = builder(&journal(&dir))
                .durability(Durability::write_ahead(SyncPolicy::Always))
                .build()
                .await
                .expect("a pool");
            let acked = LedgerFile::open(&dir.join("acked.log"));
            for n in 0..TASKS {
                let mut task = pool.task(format!("task{n}")).priority((n % 8) as u8);
                if !level_only(n) {
                    task = task
                        .max_attempts((n % 3 + 1) as u32)
                        .time_to_live(HOUR)
                        .unique_key(format!("key{n}"));
                }
                if delayed(n) {
                    task = task.delay(HOUR);
                }
                let id = task.submit().await.expect("a durable submit");
                acked.line(format!("{n} {id}\n"));
            }
            touch(&dir.join("ready"));
            std::future::pending::<i32>().await
        });
    }

    #[test]
    fn write_ahead_keeps_every_option_through_a_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let started = now_ms();
        let mut worker = WORKER.spawn(dir.path(), 1, "", None).unwrap();
        worker
            .wait_for(PATIENCE, "the worker's submits", || {
                dir.path().join("ready").exists()
            })
            .unwrap();
        worker.signal(Signal::KILL, "SIGKILL").unwrap();
        let status = worker.wait(PATIENCE).unwrap();
        assert!(!status.success(), "the worker was killed: {status}");
        let acked: Vec<(u64, String)> = read(&dir.path().join("acked.log"))
            .lines()
            .map(|line| {
                let (n, id) = line.split_once(' ').unwrap();
                (n.parse().unwrap(), id.to_string())
            })
            .collect();
        assert_eq!(acked.len() as u64, TASKS);

        let live = inspect(&journal(dir.path())).unwrap().live;
        assert_eq!(live.len() as u64, TASKS);
        for (n, id) in &acked {
            let task = live
                .iter()
                .find(|t| t.id.to_string() == *id)
                .unwrap_or_else(|| panic!("acknowledged task {n} ({id}) is not in the journal"));
            let payload: String = serde_json::from_slice(&task.payload).unwrap();
            assert_eq!(payload, format!("task{n}"));
            assert_eq!(task.priority, (n % 8) as u8);
            assert_eq!(task.not_before_ms > started, delayed(*n), "task {n}");
            if level_only(*n) {
                assert_eq!(
                    (task.max_attempts, &task.unique_key, task.expires_at_ms),
                    (None, &None, None),
                    "task {n}"
                );
                continue;
            }
            assert_eq!(task.max_attempts, Some((n % 3 + 1) as u32));
            assert_eq!(task.unique_key, Some(format!("key{n}")));
            let expires = task.expires_at_ms.unwrap();
            assert!(expires >= started + HOUR.as_millis() as u64, "task {n}");
        }

        runtime().block_on(async {
            let (pool, runner) = builder(&journal(dir.path()))
                .durability(Durability::write_ahead(SyncPolicy::Always))
                .build()
                .await
                .unwrap();
            // A delayed task waiting for its hour still holds its key.
            assert!(matches!(
                pool.task("again".to_string())
                    .unique_key("key0")
                    .submit()
                    .await,
                Err(SubmitError::Duplicate { .. })
            ));
            let seen = Seen::default();
            run(runner, &seen);
            let due = (0..TASKS).filter(|&n| !delayed(n)).count();
            eventually(PATIENCE, "the due tasks", || {
                seen.lock().unwrap().len() == due
            })
            .await;
            // Replayed by priority, highest first, in acceptance order within one.
            let mut expected: Vec<u64> = (0..TASKS).filter(|&n| !delayed(n)).collect();
            expected.sort_by_key(|&n| std::cmp::Reverse(n % 8));
            let expected: Vec<String> = expected.iter().map(|n| format!("task{n}")).collect();
            assert_eq!(names(&seen), expected);
            let report = pool.shutdown().await.unwrap();
            assert_eq!(report.replayed, TASKS);
            assert_eq!(report.spilled, TASKS - due as u64);
        });
    }
}

#[test]
fn a_run_at_far_in_the_future_waits_through_a_spill_and_a_reload_without_overflowing() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (pool, runner) = builder(dir.path()).build().await.unwrap();
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 1_000_000);
        submit(&pool, "far".to_string(), |t| t.run_at(far)).await;
        submit(&pool, "never".to_string(), |t| t.delay(Duration::MAX)).await;
        drop(runner);
        assert_eq!(pool.shutdown().await.unwrap().spilled, 2);
        let (pool, runner) = builder(dir.path()).build().await.unwrap();
        let seen = Seen::default();
        run(runner, &seen);
        assert_eq!(pool.stats().queued, 2);
        let report = pool.shutdown().await.unwrap();
        assert_eq!((report.replayed, report.spilled), (2, 2));
        assert!(names(&seen).is_empty());
    });
}
