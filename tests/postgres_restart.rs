//! The PostgreSQL store when the server itself goes away: restarted mid-run (`pg_ctl restart
//! -m fast`, which ends every connection), and stopped across a pool's shutdown. Each test
//! starts a server of its own (`initdb` into a temporary directory, `pg_ctl` on a free port:
//! `common::pg::Server`), so stopping it disturbs no other test; the server is stopped and
//! its directory removed however the test ends.
//!
//! `cargo test --features postgres --test postgres_restart`. Under `CI=true` a missing
//! `initdb` fails the tests; elsewhere they say why they skip.

#![cfg(all(unix, feature = "postgres"))]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pg::{Server, psql};
use common::{PATIENCE, eventually};
use drainpool::{Pool, PostgresError, PostgresStore, StartError, Task};

/// Every run that returned `Ok`: task number → (pool, whether it was told of an interruption),
/// one entry per run.
type Done = Arc<Mutex<BTreeMap<u64, Vec<(&'static str, bool)>>>>;
/// The tasks whose handler gave up because its token fired (a lease lost), one entry per run.
type Cancelled = Arc<Mutex<Vec<u64>>>;

const SCHEMA: &str = "restart";
const LEASE: Duration = Duration::from_secs(2);

fn store(url: &str) -> PostgresStore {
    PostgresStore::new(url)
        .schema(SCHEMA)
        .lease(LEASE)
        .claim_batch(4)
        .poll_interval(Duration::from_millis(100))
        .timeout(Duration::from_secs(1))
}

/// The server, or `None` once `require` said why not (a failure under CI).
fn server() -> Option<Server> {
    common::require(
        "a PostgreSQL server of the test's own (initdb)",
        Server::start(),
    )
}

/// How long task `n` works: 30 ms, or its number of milliseconds from 1,000,000 on (a task
/// longer than the lease, which only renewals keep).
fn work(n: u64) -> Duration {
    Duration::from_millis(if n >= 1_000_000 { n - 1_000_000 } else { 30 })
}

/// A pool claiming from `url`; its handler works (giving up when its token fires: a lost
/// lease) and records each run that finished, and each that gave up.
async fn worker(
    name: &'static str,
    dir: &Path,
    url: &str,
    done: &Done,
    cancelled: &Cancelled,
) -> Pool<u64> {
    let (done, cancelled) = (Arc::clone(done), Arc::clone(cancelled));
    Pool::builder()
        .workers(4)
        .queue_capacity(8)
        .drain_deadline(Duration::from_secs(2))
        .journal_dir(dir)
        .postgres(store(url))
        .start(move |task: Task<u64>| {
            let (done, cancelled) = (Arc::clone(&done), Arc::clone(&cancelled));
            async move {
                let n = *task.payload();
                tokio::select! {
                    () = tokio::time::sleep(work(n)) => {}
                    () = task.cancelled() => {
                        cancelled.lock().unwrap().push(n);
                        return Err(std::io::Error::other("lease lost"));
                    }
                }
                done.lock()
                    .unwrap()
                    .entry(n)
                    .or_default()
                    .push((name, task.was_interrupted()));
                Ok(())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("pool {name}: {e}"))
}

/// Hands `numbers` off to the table through a pool that runs nothing (all stay queued until
/// its shutdown); asserts they were committed there.
async fn feed(dir: &Path, url: &str, numbers: impl Iterator<Item = u64>) -> u64 {
    let (pool, runner) = Pool::builder()
        .queue_capacity(1000)
        .journal_dir(dir)
        .postgres(store(url))
        .build()
        .await
        .expect("the feeder");
    drop(runner);
    for n in numbers {
        pool.submit(n).await.expect("feed");
    }
    let report = pool.shutdown().await.expect("the feeder's report");
    assert!(report.handoff_error.is_none(), "{report:?}");
    assert_eq!(report.handed_off, report.submitted, "{report:?}");
    report.handed_off
}

fn table_count(url: &str, filter: &str) -> u64 {
    let sql = format!("SELECT count(*) FROM \"{SCHEMA}\".drainpool_tasks {filter}");
    psql(url, &sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .parse()
        .expect("a count")
}

/// Every number in `expected` finished; a number finished twice only if the later run was
/// told of an interruption (a lease lost and rescued). Returns the reruns.
fn verdict(done: &Done, expected: impl Iterator<Item = u64>) -> usize {
    let done = done.lock().unwrap();
    let mut reruns = 0;
    for n in expected {
        let runs = done.get(&n).unwrap_or_else(|| panic!("task {n} was lost"));
        assert!(
            runs.iter().skip(1).all(|&(_, interrupted)| interrupted),
            "task {n} ran again without an interruption: {runs:?}"
        );
        reruns += runs.len() - 1;
    }
    reruns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_mid_run_loses_nothing_and_the_pools_go_on() {
    let Some(server) = server() else {
        return;
    };
    let test_started = Instant::now();
    let base = tempfile::tempdir().unwrap();
    let dir = |name: &str| base.path().join(name);
    let (done, cancelled) = (Done::default(), Cancelled::default());
    let a = worker("a", &dir("a"), &server.url, &done, &cancelled).await;
    let b = worker("b", &dir("b"), &server.url, &done, &cancelled).await;

    // Load: 400 tasks of 30 ms in the table, claimed four at a time by eight workers.
    feed(&dir("feed-1"), &server.url, 0..400).await;
    eventually(PATIENCE, "100 tasks to finish", || {
        done.lock().unwrap().len() >= 100
    })
    .await;
    let leased = table_count(&server.url, "WHERE lease_owner IS NOT NULL");
    assert!(leased > 0, "no claim held at the restart");

    // Every connection of both pools is ended, mid-claim, mid-renewal, mid-settle.
    let restart = Instant::now();
    server
        .restart()
        .unwrap_or_else(|e| panic!("pg_ctl restart: {e}"));
    let down_for = restart.elapsed();

    // The pools reconnect: the tasks in flight at the restart are either renewed (the
    // heartbeat recovered) or given up and rescued; claims resume.
    eventually(PATIENCE, "the first 400 tasks to finish", || {
        done.lock().unwrap().len() >= 400
    })
    .await;
    // After the restart: a handoff, claimed by both pools, and one task of 3.5 s, longer
    // than the 2 s lease: it finishes once, not interrupted, only if the heartbeat renews.
    let after_restart = Instant::now();
    feed(&dir("feed-2"), &server.url, (400..500).chain([1_003_500])).await;
    eventually(PATIENCE, "the tasks handed off after the restart", || {
        let done = done.lock().unwrap();
        (400..500).chain([1_003_500]).all(|n| done.contains_key(&n))
    })
    .await;
    let long_run = after_restart.elapsed();
    {
        let done = done.lock().unwrap();
        assert_eq!(
            done[&1_003_500].len(),
            1,
            "the long task ran once: {:?}",
            done[&1_003_500]
        );
        assert!(!done[&1_003_500][0].1, "the long task kept its lease");
        for pool in ["a", "b"] {
            assert!(
                (400..500).any(|n| done[&n].iter().any(|r| r.0 == pool)),
                "pool {pool} claimed nothing after the restart"
            );
        }
    }

    // Down for longer than a lease, mid-run: the leases are given up (the handlers told), they
    // expire, and the pools rescue the tasks once the server is back.
    // Two tasks of 3 s first (claims go in id order), so that handlers run through the
    // outage, then a hundred of 30 ms.
    feed(
        &dir("feed-3"),
        &server.url,
        [1_003_000, 1_003_001].into_iter().chain(500..600),
    )
    .await;
    eventually(PATIENCE, "the 3 s tasks to be running", || {
        done.lock().unwrap().range(500..600).count() >= 10
    })
    .await;
    server.stop().unwrap_or_else(|e| panic!("pg_ctl stop: {e}"));
    let stopped = Instant::now();
    eventually(PATIENCE, "a lease to be given up", || {
        !cancelled.lock().unwrap().is_empty()
    })
    .await;
    let given_up_after = stopped.elapsed();
    assert!(given_up_after < LEASE, "given up after {given_up_after:?}");
    // Past the lease: every claim of the first outage's tasks has expired.
    tokio::time::sleep(LEASE.saturating_sub(stopped.elapsed()) + Duration::from_millis(100)).await;
    server
        .start_again()
        .unwrap_or_else(|e| panic!("pg_ctl start: {e}"));
    eventually(
        PATIENCE,
        "every task to finish after the long outage",
        || {
            let done = done.lock().unwrap();
            (500..600)
                .chain([1_003_000, 1_003_001])
                .all(|n| done.contains_key(&n))
        },
    )
    .await;
    {
        // The 3 s tasks were given up mid-run, then rescued and told so. (A task of 30 ms
        // may be given up too: one that finished during the outage, rescued after its lease
        // expired, and whose finished run's delete then removed the row under the rescue.)
        let done = done.lock().unwrap();
        let cancelled = cancelled.lock().unwrap();
        for n in [1_003_000, 1_003_001] {
            assert!(
                cancelled.contains(&n),
                "task {n} was not given up: {cancelled:?}"
            );
            assert!(
                done[&n].iter().all(|r| r.1),
                "task {n}, given up, was rescued and told so: {:?}",
                done[&n]
            );
        }
    }

    let mut dropped = 0;
    for (name, pool) in [("a", a), ("b", b)] {
        let report = pool.shutdown().await.unwrap();
        assert!(report.handoff_error.is_none(), "{name}: {report:?}");
        assert!(report.is_clean(), "{name}: {report:?}");
        assert_eq!(report.failed, 0, "{name}: {report:?}");
        common::counts_add_up(&report);
        dropped += report.dropped;
    }
    let reruns = verdict(&done, (0..600).chain([1_003_500, 1_003_000, 1_003_001]));
    assert_eq!(
        table_count(&server.url, ""),
        0,
        "every finished task deleted"
    );
    common::say(&format!(
        "restart: down for {} ms, held {leased} leases at the restart; the 3.5 s task finished \
         in {} ms; long outage: leases given up after {} ms; {dropped} given up, {} cancelled, \
         {reruns} rerun after a rescue; test {} ms",
        down_for.as_millis(),
        long_run.as_millis(),
        given_up_after.as_millis(),
        cancelled.lock().unwrap().len(),
        test_started.elapsed().as_millis()
    ));
}

/// A pool whose handler records each start and waits for its token (then gives up).
async fn blocked(dir: &Path, url: &str, started: &Arc<Mutex<Vec<(u64, bool)>>>) -> Pool<u64> {
    let started = Arc::clone(started);
    Pool::builder()
        .workers(1)
        .queue_capacity(64)
        .drain_deadline(Duration::from_millis(300))
        .cancel_grace(Duration::from_millis(100))
        .journal_dir(dir)
        .postgres(store(url))
        .start(move |task: Task<u64>| {
            let started = Arc::clone(&started);
            async move {
                started.lock().unwrap().push((*task.payload(), false));
                task.cancelled().await;
                started.lock().unwrap().push((*task.payload(), true));
                Err::<(), _>(std::io::Error::other("cancelled"))
            }
        })
        .await
        .expect("the blocked pool")
}

/// The whole chain of an error, one message after another.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopped_across_a_shutdown_sends_the_tasks_to_the_journal_then_on() {
    let Some(server) = server() else {
        return;
    };
    let test_started = Instant::now();
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("pool");

    // One task in the table, which the pool claims and runs until its lease is lost.
    feed(&base.path().join("feed"), &server.url, [7_000].into_iter()).await;
    let started = Arc::new(Mutex::new(Vec::new()));
    let pool = blocked(&dir, &server.url, &started).await;
    eventually(PATIENCE, "the claimed task to start", || {
        started.lock().unwrap().contains(&(7_000, false))
    })
    .await;
    // Twenty of its own: one runs once the claimed task gives up, the others stay queued.
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(pool.submit(n).await.expect("submit"));
    }

    server.stop().unwrap_or_else(|e| panic!("pg_ctl stop: {e}"));
    let stopped = Instant::now();
    // Renewals fail: the lease is given up before it expires, and the handler is told.
    eventually(PATIENCE, "the claimed task's token to fire", || {
        started.lock().unwrap().contains(&(7_000, true))
    })
    .await;
    let lost_after = stopped.elapsed();
    assert!(
        lost_after < LEASE,
        "the lease was given up after {lost_after:?}, not before it expired"
    );

    // The shutdown: the handoff fails at once (connection refused), the tasks go to the local
    // journal, and the report says why.
    let report = pool.shutdown().await.unwrap();
    let error = report
        .handoff_error
        .as_ref()
        .expect("the report says the handoff failed");
    let postgres = error
        .downcast_ref::<PostgresError>()
        .expect("a PostgresError");
    assert_eq!(postgres.op(), "hand off", "{}", chain(&**error));
    assert!(!postgres.is_timeout(), "refused, not timed out");
    let text = chain(&**error);
    assert!(
        text.starts_with("PostgreSQL hand off failed") && text.contains("connect"),
        "{text}"
    );
    assert_eq!(report.handed_off, 0, "{report:?}");
    assert_eq!(
        report.spilled + report.interrupted,
        20,
        "the pool's own tasks, journaled: {report:?}"
    );
    assert_eq!(
        report.dropped, 1,
        "the claimed task is not this pool's: {report:?}"
    );
    assert!(report.is_clean(), "{report:?}");
    common::counts_add_up(&report);
    let fallback_took = report.elapsed;
    assert!(
        fallback_took < Duration::from_secs(3),
        "the fallback took {fallback_took:?}"
    );
    let local = drainpool::journal::inspect(&dir).unwrap();
    assert_eq!(
        local.live.iter().map(|t| t.id).collect::<Vec<_>>(),
        ids,
        "journaled locally, in order"
    );

    // A start on the directory while the server is still down: refused, clearly, and the
    // journal is left as it was.
    let (done, cancelled) = (Done::default(), Cancelled::default());
    let refused = Pool::<u64>::builder()
        .journal_dir(&dir)
        .postgres(store(&server.url))
        .start(|_task: Task<u64>| async { Ok::<_, std::io::Error>(()) })
        .await;
    match refused {
        Err(StartError::Postgres(error)) => {
            assert_eq!(error.op(), "migrate", "the first operation: {error}");
            let text = chain(&StartError::Postgres(error));
            assert!(
                text.starts_with("could not open the PostgreSQL store: PostgreSQL migrate failed")
                    && text.contains("connect"),
                "{text}"
            );
        }
        other => panic!("expected StartError::Postgres, got {:?}", other.map(drop)),
    }
    assert_eq!(drainpool::journal::inspect(&dir).unwrap().live.len(), 20);

    // The server back: the next start hands the journal's tasks on, and every task runs once
    // (the claimed one rescued after its lease expired, told of the interruption).
    server
        .start_again()
        .unwrap_or_else(|e| panic!("pg_ctl start: {e}"));
    let again = worker("again", &dir, &server.url, &done, &cancelled).await;
    assert_eq!(again.recovery().forwarded, 20);
    assert!(
        drainpool::journal::inspect(&dir).unwrap().live.is_empty(),
        "retired once committed in PostgreSQL"
    );
    eventually(PATIENCE, "every task to run", || {
        done.lock().unwrap().len() == 21
    })
    .await;
    let report = again.shutdown().await.unwrap();
    assert!(
        report.is_clean() && report.handoff_error.is_none(),
        "{report:?}"
    );
    let done = done.lock().unwrap();
    for (n, runs) in done.iter() {
        assert_eq!(runs.len(), 1, "task {n} ran once: {runs:?}");
    }
    assert!(
        done[&7_000][0].1,
        "the rescued task was told of its interruption"
    );
    let interrupted_locally = started
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.1 && s.0 < 20)
        .count();
    assert_eq!(
        done.iter()
            .filter(|(n, runs)| **n < 20 && runs[0].1)
            .count(),
        interrupted_locally,
        "the local task interrupted at the deadline was told so"
    );
    assert_eq!(table_count(&server.url, ""), 0);
    common::say(&format!(
        "stopped: lease given up {} ms after the stop; fallback shutdown {} ms; test {} ms",
        lost_after.as_millis(),
        fallback_took.as_millis(),
        test_started.elapsed().as_millis()
    ));
}
