//! Submitting inside the caller's own transaction, on a real server (`DATABASE_URL`): the
//! task exists if and only if the caller's business write commits. A committed transaction's
//! task runs (on the pool, woken by the notification the commit delivers) and a rolled-back
//! one's leaves no row and never runs; the payload survives the SQL literal byte for byte.
//!
//! `cargo test --features postgres --test postgres_transactional`. Under `CI=true` a missing
//! database fails the test; elsewhere it says why it skips.

#![cfg(feature = "postgres")]

mod common;

use std::sync::{Arc, Mutex};

use common::pg::{Schema, psql};
use common::{PATIENCE, eventually};
use drainpool::{Pool, PostgresError, SubmitError, Task, TaskId};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_submitted_in_a_transaction_exists_if_and_only_if_it_commits() {
    let Some(schema) = Schema::new("in_tx") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ran: Arc<Mutex<Vec<(TaskId, String)>>> = Arc::default();
    let pool = Pool::<String>::builder()
        .workers(1)
        .journal_dir(dir.path())
        .postgres(schema.store())
        .start({
            let ran = Arc::clone(&ran);
            move |task: Task<String>| {
                ran.lock()
                    .unwrap()
                    .push((task.id(), task.payload().clone()));
                async { Ok::<(), std::io::Error>(()) }
            }
        })
        .await
        .unwrap();

    let (mut client, connection) = tokio_postgres::connect(&schema.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let orders = format!("\"{}\".orders", schema.name);
    client
        .batch_execute(&format!("CREATE TABLE {orders} (id bigint PRIMARY KEY)"))
        .await
        .unwrap();

    // Rolled back: the order and its task, neither.
    let tx = client.transaction().await.unwrap();
    tx.execute(&format!("INSERT INTO {orders} VALUES (1)"), &[])
        .await
        .unwrap();
    let dropped = pool.submit_in_transaction("order 1".into()).unwrap();
    tx.batch_execute(dropped.sql()).await.unwrap();
    tx.rollback().await.unwrap();

    // Committed: the order and its task, both. Its payload has every character a literal
    // could get wrong.
    let payload =
        "order 2: it's \"quoted\", back\\slashed, $$dollar$$, ünïcödé, \u{0}\n".to_string();
    let tx = client.transaction().await.unwrap();
    tx.execute(&format!("INSERT INTO {orders} VALUES (2)"), &[])
        .await
        .unwrap();
    let kept = pool.submit_in_transaction(payload.clone()).unwrap();
    tx.batch_execute(kept.sql()).await.unwrap();
    // Not there before the commit: another connection does not see the row.
    let rows = |id: TaskId| {
        psql(
            &schema.url,
            &format!(
                "SELECT count(*) FROM \"{}\".drainpool_tasks WHERE run = {} AND seq = {}",
                schema.name,
                id.run(),
                id.seq()
            ),
        )
        .unwrap()
    };
    assert_eq!(
        rows(kept.id()),
        "0",
        "the task is visible before the commit"
    );
    tx.commit().await.unwrap();

    eventually(PATIENCE, "the committed transaction's task to run", || {
        !ran.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(
        *ran.lock().unwrap(),
        vec![(kept.id(), payload)],
        "the committed task, its payload as submitted"
    );
    assert!(dropped.id() < kept.id(), "ids in submit order");
    // The rolled-back task has no row, so nothing can ever run it; its order is gone too.
    assert_eq!(rows(dropped.id()), "0");
    assert_eq!(
        psql(
            &schema.url,
            &format!("SELECT string_agg(id::text, ',') FROM {orders}")
        )
        .unwrap(),
        "2"
    );
    let report = pool.shutdown().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(ran.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_pool_without_the_store_refuses_with_the_task_back() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::<String>::builder()
        .journal_dir(dir.path())
        .start(|_task: Task<String>| async { Ok::<(), std::io::Error>(()) })
        .await
        .unwrap();
    match pool.submit_in_transaction("x".into()) {
        Err(SubmitError::Postgres { task, error }) => {
            assert_eq!(task, "x");
            let error = error
                .downcast_ref::<PostgresError>()
                .expect("a PostgresError");
            assert_eq!(error.op(), "submit in a transaction");
        }
        other => panic!("expected a refusal: {other:?}"),
    }
    pool.shutdown().await.unwrap();
}
