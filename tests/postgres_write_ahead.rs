//! Write-ahead durability with the PostgreSQL store, on a real server (`DATABASE_URL`): every
//! submit that returned `Ok` has its row committed, leased to its pool; concurrent submits
//! share commits; rows go as their tasks finish; the local journal holds no task; an
//! unreachable server refuses submits with the task handed back. Each test works in a schema
//! of its own. (A replica SIGKILLed in this mode: `tests/postgres_replicas.rs`.)
//!
//! `cargo test --features postgres --test postgres_write_ahead`. Under `CI=true` a missing
//! database fails the tests; elsewhere they say why they skip.

#![cfg(feature = "postgres")]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pg::{Proxy, Schema, psql};
use common::{PATIENCE, eventually};
use drainpool::{
    Durability, Health, Pool, PostgresError, PostgresStore, SubmitError, SyncPolicy, Task, TaskId,
};

const WRITE_AHEAD: Durability = Durability::write_ahead(SyncPolicy::Always);

/// Submitters at once, and tasks each.
const SUBMITTERS: u64 = 256;
const EACH: u64 = 8;

/// A write-ahead pool on `dir` with `store` whose workers never start: what it accepts stays
/// queued (and its rows leased to it).
async fn idle(dir: &std::path::Path, store: PostgresStore, capacity: usize) -> Pool<u64> {
    let builder = Pool::builder()
        .workers(1)
        .queue_capacity(capacity)
        .durability(WRITE_AHEAD)
        .journal_dir(dir)
        .postgres(store);
    common::pg::idle(builder).await
}

/// Whether the row of `id` is committed, leased to its own run, and live: asked by psql, a
/// connection of its own, on the database at `url` in `schema`.
fn row_is_leased_to_its_run(url: &str, schema: &str, id: TaskId) -> bool {
    let sql = format!(
        "SELECT count(*) FROM \"{schema}\".drainpool_tasks WHERE run = {run} AND seq = {seq} \
         AND lease_owner = {run} AND lease_expires > now() AND dead_at IS NULL",
        run = id.run(),
        seq = id.seq()
    );
    psql(url, &sql).unwrap_or_else(|e| panic!("{sql}: {e}")) == "1"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_submit_has_its_row_committed_and_concurrent_submits_share_commits() {
    let Some(schema) = Schema::new("wa_commit") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let total = (SUBMITTERS * EACH) as usize;
    // A long lease: no renewal rewrites the rows (and their xmin) while they are counted.
    let store = schema.store().lease(Duration::from_secs(120));
    let pool = idle(dir.path(), store, total).await;

    // 256 submitters at once; the first checks each of its rows from another connection as
    // soon as its submit returns (no task runs in this pool, so before the task runs).
    let checked = Arc::new(Mutex::new(Vec::new()));
    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|s| {
            let pool = pool.clone();
            let (checked, url, name) = (
                Arc::clone(&checked),
                schema.url.clone(),
                schema.name.clone(),
            );
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..EACH {
                    let id = pool.submit(s * EACH + i).await.expect("submit");
                    if s == 0 {
                        let (url, name) = (url.clone(), name.clone());
                        let found = tokio::task::spawn_blocking(move || {
                            row_is_leased_to_its_run(&url, &name, id)
                        })
                        .await
                        .unwrap();
                        checked.lock().unwrap().push((id, found));
                    }
                    ids.push(id);
                }
                ids
            })
        })
        .collect();
    let mut ids = BTreeSet::new();
    for submitter in submitters {
        ids.extend(submitter.await.unwrap());
    }
    assert_eq!(ids.len(), total);
    let checked = checked.lock().unwrap().clone();
    assert_eq!(checked.len(), EACH as usize);
    assert!(
        checked.iter().all(|(_, found)| *found),
        "a submit returned before its row was committed: {checked:?}"
    );

    // Every accepted task is a row leased to this pool; each row's xmin is the transaction
    // that inserted it (no renewal has rewritten them yet): there were far fewer commits than
    // tasks, and at least as many as one submitter's sequential submits.
    let run = ids.first().unwrap().run();
    assert_eq!(
        schema.number(&format!(
            "SELECT count(*) FROM {{t}} WHERE lease_owner = {run}"
        )),
        total as u64
    );
    let commits = schema.number("SELECT count(DISTINCT xmin::text) FROM {t}");
    assert!(
        (EACH..=total as u64 / 4).contains(&commits),
        "{commits} commits for {total} tasks from {SUBMITTERS} submitters"
    );
    // The local journal holds none of them: the table is the write-ahead log.
    let local = drainpool::journal::inspect(dir.path()).unwrap();
    assert!(local.live.is_empty() && local.segments == 0, "{local:?}");
    assert!(pool.health().is_ready(), "{}", pool.health());
    common::say(&format!(
        "write-ahead: {total} tasks from {SUBMITTERS} submitters in {commits} commits \
         ({:.1} tasks per commit)",
        total as f64 / commits as f64
    ));

    // At shutdown the queued tasks' leases are let go, so any pool takes them at once.
    let report = pool.shutdown().await.unwrap();
    assert_eq!(report.handed_off, total as u64, "{report:?}");
    assert!(report.is_clean() && report.handoff_error.is_none());
    assert_eq!(
        schema.number("SELECT count(*) FROM {t} WHERE lease_owner IS NULL"),
        total as u64
    );

    // Another write-ahead pool runs them, and its own; every finished task's row goes.
    let ran = Arc::new(Mutex::new(Vec::new()));
    let other_dir = tempfile::tempdir().unwrap();
    let recorder = Arc::clone(&ran);
    let other = Pool::builder()
        .workers(4)
        .durability(WRITE_AHEAD)
        .journal_dir(other_dir.path())
        .postgres(schema.store().claim_batch(500))
        .start(move |task: Task<u64>| {
            let ran = Arc::clone(&recorder);
            async move {
                ran.lock().unwrap().push(task.id());
                Ok::<_, std::io::Error>(())
            }
        })
        .await
        .unwrap();
    let mut own = BTreeSet::new();
    for n in 0..100 {
        own.insert(other.submit(100_000 + n).await.unwrap());
    }
    eventually(PATIENCE, "every task to run", || {
        ran.lock().unwrap().len() >= total + 100
    })
    .await;
    eventually(PATIENCE, "every finished task's row to go", || {
        schema.rows() == 0
    })
    .await;
    let report = other.shutdown().await.unwrap();
    let ran: Vec<TaskId> = ran.lock().unwrap().clone();
    assert_eq!(ran.len(), total + 100, "each ran once");
    let ran: BTreeSet<TaskId> = ran.into_iter().collect();
    assert_eq!(ran, ids.union(&own).copied().collect());
    assert_eq!(
        (report.replayed, report.submitted, report.completed),
        (total as u64, 100, total as u64 + 100),
        "{report:?}"
    );
    common::counts_add_up(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_refuses_write_ahead_submits_with_the_task_back() {
    let Some(schema) = Schema::new("wa_cut") else {
        return;
    };
    let Some(mut proxy) = common::require("a proxy to the database", Proxy::start(&schema.url))
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = schema.store_at(&proxy.url);
    let timeout = Duration::from_secs(3); // `Schema::store`'s
    let pool = idle(dir.path(), store, 100).await;
    let kept = pool
        .submit(1)
        .await
        .expect("submit while the server answers");
    assert!(row_is_leased_to_its_run(&schema.url, &schema.name, kept));

    proxy.cut();
    let started = Instant::now();
    let refused = pool.submit(2).await.expect_err("no server, no acceptance");
    let took = started.elapsed();
    assert!(took < timeout + Duration::from_secs(1), "took {took:?}");
    let error = match refused {
        SubmitError::Postgres { task, error } => {
            assert_eq!(task, 2, "the task is handed back");
            error
        }
        other => panic!("{other:?}"),
    };
    let error = error
        .downcast_ref::<PostgresError>()
        .expect("a PostgresError");
    assert_eq!(error.op(), "commit", "{error}");
    match pool.health() {
        Health::StoreUnavailable(why) => {
            assert!(why.downcast_ref::<PostgresError>().is_some(), "{why}");
        }
        other => panic!("health: {other}"),
    }
    // The one refused is not in the table; the one accepted is.
    assert_eq!(schema.rows(), 1);

    // Its shutdown cannot let the lease go: the task goes to the local journal as well, and
    // the next start on the directory hands it on; nothing accepted is lost.
    let report = pool.shutdown().await.unwrap();
    assert!(report.handoff_error.is_some(), "{report:?}");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!((report.submitted, report.spilled), (1, 1), "{report:?}");
    let ran = Arc::new(Mutex::new(Vec::new()));
    let recorder = Arc::clone(&ran);
    let again = Pool::builder()
        .workers(1)
        .durability(WRITE_AHEAD)
        .journal_dir(dir.path())
        .postgres(schema.store())
        .start(move |task: Task<u64>| {
            let ran = Arc::clone(&recorder);
            async move {
                ran.lock().unwrap().push((*task.payload(), task.id()));
                Ok::<_, std::io::Error>(())
            }
        })
        .await
        .unwrap();
    assert_eq!(again.recovery().forwarded, 1);
    eventually(PATIENCE, "the accepted task to run", || {
        !ran.lock().unwrap().is_empty()
    })
    .await;
    eventually(PATIENCE, "its row to go", || schema.rows() == 0).await;
    drop(again.shutdown().await.unwrap());
    assert_eq!(ran.lock().unwrap().clone(), [(1, kept)]);
}
