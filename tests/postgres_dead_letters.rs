//! Dead letters in the PostgreSQL store, on a real server (`DATABASE_URL`): a task out of
//! attempts becomes a dead row with its last error, never claimed, listed, requeued, and then
//! runs; the same through the `drainpool` binary (`inspect --postgres`, `requeue --postgres`);
//! and a version-1 table migrated in place (to version 2, then 3). Each test works in a
//! schema of its own.
//!
//! `cargo test --features postgres --test postgres_dead_letters` (the CLI test also needs
//! `cli`). Under `CI=true` a missing database fails the tests; elsewhere they say why they
//! skip.

#![cfg(feature = "postgres")]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::pg::{Schema, psql};
use common::{PATIENCE, eventually};
use drainpool::journal::Requeue;
use drainpool::postgres::RequeueError;
use drainpool::{Durability, Pool, PostgresStore, SyncPolicy, Task, TaskId};

/// The runs a handler saw: (payload, id, attempt, succeeded).
type Runs = Arc<Mutex<Vec<(u64, TaskId, u32, bool)>>>;

/// A pool whose handler fails task 2 while `broken` holds, with "broken: 2".
async fn start(
    dir: &std::path::Path,
    store: PostgresStore,
    durability: Durability,
    runs: &Runs,
    broken: &Arc<AtomicBool>,
) -> Pool<u64> {
    let (runs, broken) = (Arc::clone(runs), Arc::clone(broken));
    Pool::builder()
        .workers(2)
        .max_attempts(2)
        .backoff(Duration::from_millis(10), Duration::from_millis(20))
        .durability(durability)
        .journal_dir(dir)
        .postgres(store)
        .start(move |task: Task<u64>| {
            let (runs, broken) = (Arc::clone(&runs), Arc::clone(&broken));
            async move {
                let n = *task.payload();
                let fails = n == 2 && broken.load(Ordering::SeqCst);
                runs.lock()
                    .unwrap()
                    .push((n, task.id(), task.attempt(), !fails));
                if fails {
                    return Err(format!("broken: {n}"));
                }
                Ok(())
            }
        })
        .await
        .expect("pool start")
}

fn runs_of(runs: &Runs, n: u64) -> Vec<(u32, bool)> {
    runs.lock()
        .unwrap()
        .iter()
        .filter(|r| r.0 == n)
        .map(|r| (r.2, r.3))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_out_of_attempts_is_a_dead_row_until_requeued_then_it_runs() {
    let Some(schema) = Schema::new("dead") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (runs, broken) = (Runs::default(), Arc::new(AtomicBool::new(true)));
    // Write-ahead: every task is a row leased to the pool from the start.
    let write_ahead = Durability::write_ahead(SyncPolicy::Always);
    let pool = start(dir.path(), schema.store(), write_ahead, &runs, &broken).await;
    let mut ids = Vec::new();
    for n in 1..=3 {
        ids.push(pool.submit(n).await.unwrap());
    }
    let store = schema.store();
    eventually(PATIENCE, "task 2's dead letter", || {
        runs_of(&runs, 2).len() == 2
    })
    .await;
    let mut contents = store.inspect().await.unwrap();
    for _ in 0..100 {
        if contents.live.is_empty() && contents.dead.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        contents = store.inspect().await.unwrap();
    }
    assert!(contents.live.is_empty(), "{:?}", contents.live);
    let [dead] = &contents.dead[..] else {
        panic!("one dead letter: {:?}", contents.dead);
    };
    assert_eq!(dead.id, ids[1]);
    assert_eq!(dead.attempts, 2);
    assert_eq!(dead.last_error.as_deref(), Some("broken: 2"));
    assert_eq!(dead.payload, b"2");
    assert_eq!(dead.lease_owner, None);
    assert!(dead.dead_at_ms.is_some());
    // Kept in the table, not in the local journal.
    assert!(
        drainpool::journal::inspect(dir.path())
            .unwrap()
            .dead
            .is_empty()
    );
    // Never claimed: several polls later it has not run again.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(runs_of(&runs, 2), [(1, false), (2, false)]);

    // Fixed, requeued: the pool on the table is woken and runs it, with fresh attempts.
    broken.store(false, Ordering::SeqCst);
    let requeued = store.requeue(Requeue::Ids(vec![ids[1]])).await.unwrap();
    assert_eq!(requeued.ids, [ids[1]]);
    eventually(PATIENCE, "the requeued task to run", || {
        runs_of(&runs, 2).len() == 3
    })
    .await;
    assert_eq!(runs_of(&runs, 2)[2], (1, true));
    eventually(PATIENCE, "its row to go", || schema.rows() == 0).await;
    // Requeued already: not a dead letter any more, and nothing is changed.
    match store.requeue(Requeue::Ids(vec![ids[1], ids[0]])).await {
        Err(RequeueError::NotDead { ids: missing }) => {
            assert_eq!(missing, [ids[0], ids[1]]);
        }
        other => panic!("{other:?}"),
    }
    assert!(store.requeue(Requeue::All).await.unwrap().ids.is_empty());
    let report = pool.shutdown().await.unwrap();
    assert_eq!(
        (
            report.submitted,
            report.failed,
            report.replayed,
            report.completed
        ),
        (3, 1, 1, 3),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_table_is_migrated_in_place_and_its_tasks_kept() {
    let Some(schema) = Schema::new("v1") else {
        return;
    };
    // The version-1 tables, and a task in them.
    schema.make_at_version(1);
    psql(
        &schema.url,
        &format!(
            "INSERT INTO \"{}\".drainpool_tasks (run, seq, enqueued_at, run_after, payload) \
             VALUES (1, 1, now(), to_timestamp(0), '7')",
            schema.name
        ),
    )
    .unwrap();
    // A pool that only checks refuses it, untouched.
    schema.assert_refused_unmigrated(1).await;
    let dir = tempfile::tempdir().unwrap();

    // A pool that migrates brings it to version 2 (and on to 3) in place, and runs the task
    // it held.
    let (runs, broken) = (Runs::default(), Arc::new(AtomicBool::new(false)));
    let pool = start(
        dir.path(),
        schema.store(),
        Durability::on_shutdown(),
        &runs,
        &broken,
    )
    .await;
    assert_eq!(schema.version(), 3);
    assert_eq!(
        schema.number(&format!(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = '{}' \
             AND table_name = 'drainpool_tasks' AND column_name = 'dead_at'",
            schema.name
        )),
        1
    );
    eventually(PATIENCE, "the version-1 task to run", || {
        !runs_of(&runs, 7).is_empty()
    })
    .await;
    assert_eq!(runs.lock().unwrap()[0].1.to_string(), "1-1");
    drop(pool.shutdown().await.unwrap());
    // Applied again (by a DBA, say): nothing changes.
    let script = schema.store().schema_sql().unwrap();
    psql(&schema.url, &script).expect("the script applies again");
    assert_eq!(schema.version(), 3);
}

#[cfg(feature = "cli")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_and_requeues_the_tables_dead_letters() {
    use std::process::{Command, Output};

    let Some(schema) = Schema::new("dead_cli") else {
        return;
    };
    // `drainpool <command> <args> --postgres URL --schema S`
    let drainpool = |args: &[&str]| -> Output {
        Command::new(env!("CARGO_BIN_EXE_drainpool"))
            .args(args)
            .args(["--postgres", &schema.url, "--schema", &schema.name])
            .output()
            .expect("the drainpool binary")
    };
    let lines = |output: &Output| -> Vec<serde_json::Value> {
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    };

    // One task out of attempts.
    let dir = tempfile::tempdir().unwrap();
    let (runs, broken) = (Runs::default(), Arc::new(AtomicBool::new(true)));
    let pool = start(
        dir.path(),
        schema.store(),
        Durability::on_shutdown(),
        &runs,
        &broken,
    )
    .await;
    let id = pool.submit(2).await.unwrap();
    eventually(PATIENCE, "the dead letter", || runs_of(&runs, 2).len() == 2).await;
    assert_eq!(pool.shutdown().await.unwrap().failed, 1);

    let dead = lines(&drainpool(&["inspect", "--dead"]));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["id"], id.to_string());
    assert_eq!(dead[0]["attempts"], 2);
    assert_eq!(dead[0]["last_error"], "broken: 2");
    assert_eq!(dead[0]["payload"], 2);
    assert!(dead[0]["dead_at_ms"].as_u64().is_some(), "{dead:?}");
    assert!(dead[0]["lease_owner"].is_null());
    assert!(lines(&drainpool(&["inspect"])).is_empty());

    let requeued = drainpool(&["requeue", "--id", &id.to_string()]);
    assert!(requeued.status.success(), "{requeued:?}");
    assert_eq!(
        String::from_utf8_lossy(&requeued.stdout).trim(),
        id.to_string()
    );
    assert!(lines(&drainpool(&["inspect", "--dead"])).is_empty());
    let live = lines(&drainpool(&["inspect"]));
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(
        (live[0]["id"].as_str(), live[0]["attempts"].as_u64()),
        (Some(&*id.to_string()), Some(0))
    );
    // Not a dead letter any more: refused, exit status 1, the id named.
    let again = drainpool(&["requeue", "--id", &id.to_string()]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains(&format!("no dead letter with id {id}")),
        "{again:?}"
    );

    // A pool runs it, fixed.
    broken.store(false, Ordering::SeqCst);
    let other = tempfile::tempdir().unwrap();
    let pool = start(
        other.path(),
        schema.store(),
        Durability::on_shutdown(),
        &runs,
        &broken,
    )
    .await;
    eventually(PATIENCE, "the requeued task to run", || {
        runs_of(&runs, 2).last() == Some(&(1, true))
    })
    .await;
    drop(pool.shutdown().await.unwrap());
    assert_eq!(schema.rows(), 0);
}
