//! One signal owner per process, against real processes and real signals.
//!
//! - Two listeners in one process (`shutdown_signal()` for the HTTP server, `run_until_signal()`
//!   for the pool) count the signals once: the first resolves the future and drains the pool,
//!   the second skips the drain's wait (the process exits 0 with its report, not 143), the
//!   third exits at once with 143.
//! - Handlers armed before the journal is replayed (`catch_signals()`, or the builder's
//!   `catch_signals(true)`): a SIGTERM that comes during start-up is counted, and the pool
//!   drains as soon as it listens, leaving every replayed task in the journal, exit status 0;
//!   also as PID 1 of a new PID namespace, where the kernel would drop an unhandled SIGTERM.
//!
//! The worker is this test binary again (`worker_main`, ignored), run by `SelfExec`; every
//! wait is bounded, and the `Worker` guard kills and reaps the process whatever happens.

#![cfg(target_os = "linux")]

mod common;

use std::path::Path;
use std::time::Duration;

use common::child::{
    SelfExec, child_of, innermost_pid, pid_namespaces, read, run_worker, send, touch,
};
use drainpool::{BoxError, Pool, State, Task};
use rustix::process::Signal;

const WORKER: SelfExec = SelfExec {
    test: "worker_main",
    dir_var: "DRAINPOOL_OWNER_DIR",
    config_var: "DRAINPOOL_OWNER_MODE",
    exit_poll: Duration::from_millis(10),
    ready_poll: Duration::from_millis(5),
};

const LIMIT: Duration = Duration::from_secs(30);
/// The drain deadline where no second signal comes: the tasks in flight are journaled then.
const SHORT: Duration = Duration::from_millis(500);
/// Tasks the first generation leaves in the journal for the replay tests.
const SEEDED: u64 = 40;

/// A pool on `dir` whose handler holds every task until its token fires (at `deadline` into
/// the drain), then gives up.
fn holding(dir: &Path, deadline: Duration) -> drainpool::Builder<u64> {
    Pool::<u64>::builder()
        .workers(2)
        .drain_deadline(deadline)
        .cancel_grace(Duration::from_millis(200))
        .journal_dir(dir.join("journal"))
}

async fn hold(task: Task<u64>) -> Result<(), BoxError> {
    task.cancelled().await;
    Err("stopped at the deadline".into())
}

/// Writes the report's figures to `report` in the worker's directory, then exits 0.
fn finish(dir: &Path, report: &drainpool::ShutdownReport) -> i32 {
    std::fs::write(
        dir.join("report"),
        format!(
            "replayed={} completed={} spilled={} interrupted={} unsaved={}",
            report.replayed, report.completed, report.spilled, report.interrupted, report.unsaved
        ),
    )
    .unwrap();
    if report.is_clean() { 0 } else { 1 }
}

#[test]
#[ignore = "a worker process for the tests in this file"]
fn worker_main() {
    let Some((dir, mode)) = WORKER.worker_env() else {
        return;
    };
    run_worker(true, async move {
        match mode.as_str() {
            // Two listeners: the HTTP server's future and the pool's run_until_signal.
            "two" => {
                // A deadline only the second signal cuts short.
                let (pool, runner) = holding(&dir, Duration::from_secs(600))
                    .build()
                    .await
                    .unwrap();
                runner.run(hold);
                let signal = drainpool::shutdown_signal().unwrap();
                let marker = dir.join("server-stopped");
                tokio::spawn(async move {
                    signal.await;
                    touch(&marker);
                });
                pool.submit(1).await.unwrap();
                while pool.stats().in_flight == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let mut state = pool.watch_state();
                let draining = dir.join("draining");
                tokio::spawn(async move {
                    state.wait_for(|s| s != State::Running).await;
                    touch(&draining);
                });
                let run = pool.run_until_signal();
                tokio::pin!(run);
                common::child::install_signal_handlers(run.as_mut()).await;
                touch(&dir.join("ready"));
                let report = run.await.unwrap();
                finish(&dir, &report)
            }
            // Leaves SEEDED tasks in the journal.
            "seed" => {
                let (pool, runner) = holding(&dir, SHORT).build().await.unwrap();
                drop(runner);
                for n in 0..SEEDED {
                    pool.submit(n).await.unwrap();
                }
                let report = pool.shutdown().await.unwrap();
                finish(&dir, &report)
            }
            // Signals caught before anything else, then a start that replays the journal.
            "early" => {
                drainpool::catch_signals().unwrap();
                touch(&dir.join("ready"));
                while !dir.join("go").exists() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let pool = holding(&dir, SHORT).start(hold).await.unwrap();
                let report = pool.run_until_signal().await.unwrap();
                finish(&dir, &report)
            }
            // The builder's option: listening from the start, `wait` is enough.
            "builder" => {
                let pool = holding(&dir, SHORT)
                    .catch_signals(true)
                    .start(hold)
                    .await
                    .unwrap();
                touch(&dir.join("ready"));
                let report = pool.wait().await.unwrap();
                finish(&dir, &report)
            }
            other => panic!("unknown mode {other}"),
        }
    })
}

fn spawn(dir: &Path, generation: u32, mode: &str, pid1: bool) -> common::child::Worker {
    let launcher = if pid1 {
        common::require("unshare able to make a PID namespace", pid_namespaces())
            .map(|options| ("unshare", options))
    } else {
        None
    };
    WORKER.spawn(dir, generation, mode, launcher).unwrap()
}

/// The pid to signal: the worker's, or under `unshare` its child, PID 1 of the namespace.
fn target(worker: &mut common::child::Worker, pid1: bool) -> u32 {
    if !pid1 {
        return worker.pid();
    }
    let outer = worker.pid();
    let mut inner = None;
    worker
        .wait_for(LIMIT, "the namespaced worker's pid", || {
            inner = child_of(outer);
            inner.is_some()
        })
        .unwrap();
    let inner = inner.unwrap_or_default();
    assert_eq!(innermost_pid(inner), Some(1), "pid {inner} is not PID 1");
    inner
}

fn report(dir: &Path) -> String {
    read(&dir.join("report"))
}

#[test]
fn two_listeners_count_the_signals_once() {
    for third in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let mut worker = spawn(dir, 1, "two", false);
        worker
            .wait_for(LIMIT, "the worker to listen", || dir.join("ready").exists())
            .unwrap();
        send(worker.pid(), Signal::TERM, "SIGTERM").unwrap();
        worker
            .wait_for(LIMIT, "the drain and the server's signal", || {
                dir.join("draining").exists() && dir.join("server-stopped").exists()
            })
            .unwrap();
        send(worker.pid(), Signal::TERM, "SIGTERM").unwrap();
        if third {
            // The second skipped the wait; a third, sent at once, may beat the report.
            send(worker.pid(), Signal::TERM, "SIGTERM").unwrap();
            let status = worker.wait(LIMIT).unwrap();
            assert!(
                status.code() == Some(143) || status.code() == Some(0),
                "the third SIGTERM exits 143 (or the report came first): {status}"
            );
            continue;
        }
        let status = worker.wait(LIMIT).unwrap();
        assert_eq!(
            status.code(),
            Some(0),
            "the second SIGTERM skips the drain's wait instead of exiting 143: {status}\n{}",
            read(&dir.join("err.1"))
        );
        let report = report(dir);
        assert!(report.contains("interrupted=1"), "{report}");
    }
}

/// Leaves SEEDED tasks in a fresh directory's journal.
fn seeded() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut seed = spawn(dir.path(), 1, "seed", false);
    assert_eq!(seed.wait(LIMIT).unwrap().code(), Some(0));
    assert!(report(dir.path()).contains(&format!("spilled={SEEDED}")));
    dir
}

fn live_tasks(dir: &Path) -> usize {
    drainpool::journal::inspect(&dir.join("journal"))
        .unwrap()
        .live
        .len()
}

fn a_sigterm_before_the_replay_drains_the_pool_at_once(pid1: bool) {
    let dir = seeded();
    let dir = dir.path();
    let mut worker = spawn(dir, 2, "early", pid1);
    let pid = target(&mut worker, pid1);
    worker
        .wait_for(LIMIT, "the handlers", || dir.join("ready").exists())
        .unwrap();
    send(pid, Signal::TERM, "SIGTERM").unwrap();
    // Counted, not lost: the pool, started after it, drains as soon as it listens.
    touch(&dir.join("go"));
    let status = worker.wait(LIMIT).unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "{status}\n{}",
        read(&dir.join("err.2"))
    );
    let report = report(dir);
    assert!(report.contains(&format!("replayed={SEEDED}")), "{report}");
    assert!(report.contains("unsaved=0"), "{report}");
    assert_eq!(
        live_tasks(dir),
        SEEDED as usize,
        "every replayed task is in the journal"
    );
}

#[test]
fn a_sigterm_during_start_up_is_counted_and_drains_the_pool() {
    a_sigterm_before_the_replay_drains_the_pool_at_once(false);
}

#[test]
fn a_sigterm_during_start_up_is_counted_as_pid_1_too() {
    if pid_namespaces().is_err() {
        common::skip_or_fail("unshare able to make a PID namespace", "it is refused here");
        return;
    }
    a_sigterm_before_the_replay_drains_the_pool_at_once(true);
}

#[test]
fn the_builder_option_makes_the_pool_listen_from_the_start() {
    let dir = seeded();
    let dir = dir.path();
    let mut worker = spawn(dir, 2, "builder", false);
    worker
        .wait_for(LIMIT, "the pool", || dir.join("ready").exists())
        .unwrap();
    send(worker.pid(), Signal::TERM, "SIGTERM").unwrap();
    let status = worker.wait(LIMIT).unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
    let report = report(dir);
    assert!(report.contains("unsaved=0"), "{report}");
    assert_eq!(live_tasks(dir), SEEDED as usize);
}
