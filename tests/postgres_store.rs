//! The PostgreSQL store with pools in this process, on a real server (`DATABASE_URL`): the
//! schema, the handoff and the claim, the fallback to the local journal when the server is
//! away, and leases lost and rescued. Each test works in a schema of its own.
//!
//! `cargo test --features postgres --test postgres_store`. Under `CI=true` a missing database
//! fails the tests; elsewhere they say why they skip.

#![cfg(feature = "postgres")]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::pg::{Proxy, Schema, psql};
use common::{PATIENCE, eventually};
use drainpool::{Pool, PostgresStore, StartError, Task, TaskId};

/// What the handlers of one test saw: (task number, id, attempt, was interrupted, ok).
type Runs = Arc<Mutex<Vec<(u64, TaskId, u32, bool)>>>;

/// A pool on `dir` with `store`; its handler records each run that returns.
async fn start(dir: &std::path::Path, store: PostgresStore, runs: &Runs) -> Pool<u64> {
    let runs = Arc::clone(runs);
    Pool::builder()
        .workers(4)
        .drain_deadline(Duration::from_secs(5))
        .journal_dir(dir)
        .postgres(store)
        .start(move |task: Task<u64>| {
            let runs = Arc::clone(&runs);
            async move {
                runs.lock().unwrap().push((
                    *task.payload(),
                    task.id(),
                    task.attempt(),
                    task.was_interrupted(),
                ));
                Ok::<_, std::io::Error>(())
            }
        })
        .await
        .expect("pool start")
}

/// A pool on `dir` with `store` whose workers never start: what it accepts stays queued.
async fn idle(dir: &std::path::Path, store: PostgresStore) -> Pool<u64> {
    common::pg::idle(Pool::builder().workers(1).journal_dir(dir).postgres(store)).await
}

async fn submit_all(pool: &Pool<u64>, numbers: std::ops::Range<u64>) -> Vec<TaskId> {
    let mut ids = Vec::new();
    for n in numbers {
        ids.push(pool.submit(n).await.expect("submit"));
    }
    ids
}

/// How many live tasks the local journal in `dir` holds.
fn locally_live(dir: &std::path::Path) -> usize {
    drainpool::journal::inspect(dir).unwrap().live.len()
}

fn numbers(runs: &Runs) -> BTreeSet<u64> {
    runs.lock().unwrap().iter().map(|r| r.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_is_made_once_when_replicas_start_together() {
    let Some(schema) = Schema::new("schema") else {
        return;
    };
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let starts = dirs.iter().map(|dir| {
        let (path, store) = (dir.path().to_path_buf(), schema.store());
        async move { idle(&path, store).await }
    });
    let pools = futures_join_all(starts).await;
    // Each got a run of its own, from the one counter.
    let mut runs = BTreeSet::new();
    for pool in &pools {
        runs.insert(pool.submit(0).await.unwrap().run());
    }
    assert_eq!(runs.len(), 4, "runs {runs:?}");
    assert_eq!(
        schema.number(&format!(
            "SELECT version FROM \"{}\".drainpool_tasks_meta",
            schema.name
        )),
        3
    );
    assert_eq!(
        schema.number(&format!(
            "SELECT last_run FROM \"{}\".drainpool_tasks_meta",
            schema.name
        )),
        *runs.last().unwrap()
    );
    for pool in pools {
        let report = pool.shutdown().await.unwrap();
        assert_eq!(report.handed_off, 1);
    }
    // The script as a DBA applies it: again, over the tables the pools made.
    let script = schema.store().schema_sql().unwrap();
    for _ in 0..2 {
        psql(&schema.url, &script).expect("the script applies again");
    }
    assert_eq!(schema.rows(), 4);
    // A pool that only checks the version starts on it.
    let dir = tempfile::tempdir().unwrap();
    let pool = idle(dir.path(), schema.store().migrate(false)).await;
    drop(pool.shutdown().await.unwrap());
}

/// `join_all` for a few futures, without the futures crate.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pools_queue_is_handed_off_and_another_pool_runs_it() {
    let Some(schema) = Schema::new("handoff") else {
        return;
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = idle(dir_a.path(), schema.store()).await;
    let ids = submit_all(&a, 0..300).await;
    let report = a.shutdown().await.unwrap();
    assert_eq!(
        (report.spilled, report.handed_off),
        (300, 300),
        "{report:?}"
    );
    assert!(
        report.handoff_error.is_none() && report.is_clean(),
        "{report:?}"
    );
    assert_eq!(schema.rows(), 300);
    assert_eq!(
        locally_live(dir_a.path()),
        0,
        "nothing went to the local journal"
    );

    let runs = Runs::default();
    let b = start(dir_b.path(), schema.store(), &runs).await;
    eventually(PATIENCE, "pool B to run A's tasks", || {
        numbers(&runs).len() == 300
    })
    .await;
    let seen: BTreeSet<TaskId> = runs.lock().unwrap().iter().map(|r| r.1).collect();
    assert_eq!(seen, ids.iter().copied().collect(), "ids are kept");
    // Ids unique across two fresh directories: B's run is not A's.
    let own = b.submit(1000).await.unwrap();
    assert!(own.run() > ids[0].run(), "{own} after {}", ids[0]);
    eventually(PATIENCE, "B's own task to run", || {
        numbers(&runs).contains(&1000)
    })
    .await;
    let report = b.shutdown().await.unwrap();
    assert_eq!(
        report.replayed, 300,
        "claimed tasks count as replayed: {report:?}"
    );
    assert_eq!(report.completed, 301, "{report:?}");
    common::counts_add_up(&report);
    assert_eq!(schema.rows(), 0, "finished tasks are deleted");
    assert_eq!(runs.lock().unwrap().len(), 301, "each task ran once");
}

/// A pool's own tasks (never written to the table) are handed off with a plain insert; should
/// one meet a row after all (a handoff committed unbeknownst to the pool, say), the handoff
/// upserts them all instead, and nothing is lost or sent to the local journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_that_meets_a_row_it_did_not_expect_upserts_and_loses_nothing() {
    let Some(schema) = Schema::new("handoff_row") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = idle(dir.path(), schema.store()).await;
    let ids = submit_all(&a, 0..10).await;
    let planted = ids[3];
    let (run, seq) = (planted.run(), planted.seq());
    let inserted = schema.number(&format!(
        "WITH i AS (INSERT INTO {{t}} (run, seq, enqueued_at, run_after, payload) \
         VALUES ({run}, {seq}, now(), now(), '\\x3939') RETURNING 1) SELECT count(*) FROM i"
    ));
    assert_eq!(inserted, 1);
    let report = a.shutdown().await.unwrap();
    assert_eq!(report.handed_off, 10, "{report:?}");
    assert!(
        report.handoff_error.is_none() && report.is_clean(),
        "{report:?}"
    );
    assert_eq!(schema.rows(), 10);
    // The planted row holds task 3 now (its payload, `3`), not the planted `99`.
    let payload = schema.number(&format!(
        "SELECT convert_from(payload, 'UTF8')::int8 FROM {{t}} WHERE run = {run} AND seq = {seq}"
    ));
    assert_eq!(payload, 3);
    assert_eq!(
        locally_live(dir.path()),
        0,
        "nothing went to the local journal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_at_shutdown_sends_the_queue_to_the_local_journal() {
    let Some(schema) = Schema::new("fallback") else {
        return;
    };
    let Some(mut proxy) = common::require("a proxy to the database", Proxy::start(&schema.url))
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = idle(dir.path(), schema.store_at(&proxy.url)).await;
    let ids = submit_all(&a, 0..50).await;
    proxy.cut();
    let report = a.shutdown().await.unwrap();
    let error = report
        .handoff_error
        .as_ref()
        .expect("the report says the handoff failed");
    let error = error
        .downcast_ref::<drainpool::PostgresError>()
        .expect("a PostgresError");
    assert_eq!(error.op(), "hand off", "{error}");
    assert_eq!((report.spilled, report.handed_off), (50, 0), "{report:?}");
    assert!(report.is_clean(), "nothing lost: {report:?}");
    let local = drainpool::journal::inspect(dir.path()).unwrap();
    assert_eq!(
        local.live.iter().map(|t| t.id).collect::<Vec<_>>(),
        ids,
        "journaled locally"
    );
    assert_eq!(schema.rows(), 0);

    // The next start on the directory, with the database back, hands them on, then runs them.
    let runs = Runs::default();
    let again = start(dir.path(), schema.store(), &runs).await;
    assert_eq!(again.recovery().forwarded, 50);
    assert_eq!(again.recovery().replayed, 0);
    assert_eq!(
        locally_live(dir.path()),
        0,
        "retired locally once committed in PostgreSQL"
    );
    eventually(PATIENCE, "the forwarded tasks to run", || {
        numbers(&runs).len() == 50
    })
    .await;
    let report = again.shutdown().await.unwrap();
    assert_eq!(numbers(&runs), (0..50).collect(), "none lost");
    assert_eq!(runs.lock().unwrap().len(), 50, "none twice");
    assert_eq!(report.completed, 50);
    assert_eq!(schema.rows(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_cut_off_loses_its_lease_and_another_rescues_the_task() {
    let Some(schema) = Schema::new("lease") else {
        return;
    };
    let Some(mut proxy) = common::require("a proxy to the database", Proxy::start(&schema.url))
    else {
        return;
    };
    // One task in the table.
    let dir = tempfile::tempdir().unwrap();
    let giver = idle(dir.path(), schema.store()).await;
    let id = giver.submit(7).await.unwrap();
    assert_eq!(giver.shutdown().await.unwrap().handed_off, 1);

    // A pool behind the proxy claims it; its handler waits for its token.
    let token_fired = Arc::new(tokio::sync::Notify::new());
    let started = Arc::new(tokio::sync::Notify::new());
    let cut_dir = tempfile::tempdir().unwrap();
    let (fired, began) = (Arc::clone(&token_fired), Arc::clone(&started));
    let cut_off = Pool::builder()
        .workers(1)
        .drain_deadline(Duration::from_secs(5))
        .journal_dir(cut_dir.path())
        .postgres(schema.store_at(&proxy.url))
        .start(move |task: Task<u64>| {
            let (fired, began) = (Arc::clone(&fired), Arc::clone(&began));
            async move {
                began.notify_one();
                task.cancelled().await;
                fired.notify_one();
                Err::<(), _>(std::io::Error::other("lease lost"))
            }
        })
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, started.notified())
        .await
        .expect("the claim");
    let cut_at = std::time::Instant::now();
    proxy.cut();
    tokio::time::timeout(PATIENCE, token_fired.notified())
        .await
        .expect("the token to fire");
    // Three quarters of the 2 s lease, and a heartbeat's quarter at most.
    assert!(
        cut_at.elapsed() < Duration::from_millis(2600),
        "{:?}",
        cut_at.elapsed()
    );
    let report = cut_off.shutdown().await.unwrap();
    assert_eq!(report.dropped, 1, "given up, not failed: {report:?}");
    assert_eq!((report.failed, report.interrupted), (0, 0), "{report:?}");

    // The lease expires; another pool rescues the task: interrupted, not a failed attempt.
    let runs = Runs::default();
    let rescuer_dir = tempfile::tempdir().unwrap();
    let rescuer = start(rescuer_dir.path(), schema.store(), &runs).await;
    eventually(PATIENCE, "the rescue", || !runs.lock().unwrap().is_empty()).await;
    assert_eq!(runs.lock().unwrap()[0], (7, id, 1, true));
    drop(rescuer.shutdown().await.unwrap());
    assert_eq!(schema.rows(), 0);
}

#[tokio::test]
async fn settings_the_store_cannot_keep_are_refused_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    // Write-ahead with the store is a commit before `submit` returns: no fsync interval or
    // "never" to honour.
    for sync in [
        drainpool::SyncPolicy::Interval(Duration::from_millis(10)),
        drainpool::SyncPolicy::Never,
    ] {
        let result = Pool::<u64>::builder()
            .journal_dir(dir.path())
            .durability(drainpool::Durability::write_ahead(sync))
            .postgres(PostgresStore::new(common::pg::DEFAULT_URL))
            .build()
            .await;
        match result {
            Err(StartError::InvalidConfig { setting, reason }) => {
                assert_eq!(setting, "durability");
                assert!(reason.contains("SyncPolicy::Always only"), "{reason}");
            }
            other => panic!("{sync:?}: {:?}", other.map(drop)),
        }
    }
    for (store, what) in [
        (
            PostgresStore::new("postgres://x/y").table("no-dash"),
            "table name",
        ),
        (
            PostgresStore::new("postgres://x/y").lease(Duration::from_millis(10)),
            "lease",
        ),
        (PostgresStore::new("not a url ="), "URL"),
    ] {
        let result = Pool::<u64>::builder()
            .journal_dir(dir.path())
            .postgres(store)
            .build()
            .await;
        match result {
            Err(StartError::InvalidConfig {
                setting: "postgres",
                reason,
            }) => {
                assert!(reason.contains(what), "{what}: {reason}");
            }
            other => panic!("{what}: {:?}", other.map(drop)),
        }
    }
}
