//! Task options with the PostgreSQL store, on a real server (`DATABASE_URL`): every option
//! travels with a task handed off at shutdown and comes back to the pool that claims it, which
//! honours them (claims take higher priorities first, a task's own retry limit, its time to
//! live, its run-at time, its unique key held while it runs); `PostgresStore::inspect` shows
//! them, a dead letter keeps them, a requeue keeps them but the expiry; a write-ahead task
//! keeps them across a SIGKILL of its pool; a version-2 table is migrated in place to version
//! 3; `drainpool inspect` prints them from the table as from a journal. Each test works in a
//! schema of its own.
//!
//! `cargo test --features postgres --test postgres_options` (the CLI test also needs `cli`).
//! Under `CI=true` a missing database fails the tests; elsewhere they say why they skip.

#![cfg(all(feature = "postgres", unix))]

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::child::{SelfExec, read, run_worker, said};
use common::pg::{Schema, psql};
use common::{PATIENCE, eventually};
use drainpool::journal::Requeue;
use drainpool::postgres::TableTask;
use drainpool::{
    Durability, Pool, PostgresStore, StartError, SubmitError, SyncPolicy, Task, TaskId,
};
use rustix::process::Signal;
use tokio::sync::Semaphore;

/// One run a handler saw: (payload, id, attempt, was interrupted, wall clock ms at its start).
type Runs = Arc<Mutex<Vec<(u64, TaskId, u32, bool, u64)>>>;

fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(since.as_millis()).unwrap()
}

/// A pool on `dir` with `store` whose workers never start: what it accepts stays queued, and
/// its shutdown hands it off.
async fn idle(dir: &std::path::Path, store: PostgresStore) -> Pool<u64> {
    common::pg::idle(Pool::builder().journal_dir(dir).postgres(store)).await
}

/// The one task in `tasks`.
#[track_caller]
fn only(tasks: &[TableTask]) -> &TableTask {
    match tasks {
        [task] => task,
        _ => panic!("one task: {tasks:?}"),
    }
}

/// What a pool's handler does, and what it saw: it records each run; task 1's first attempt
/// waits for a permit of `gate` (one is there unless the handler was made gated); task 1 fails
/// if `broken`.
#[derive(Clone)]
struct Handler {
    runs: Runs,
    gate: Arc<Semaphore>,
    broken: bool,
}

impl Handler {
    fn new(broken: bool, gated: bool) -> Self {
        Self {
            runs: Runs::default(),
            gate: Arc::new(Semaphore::new(usize::from(!gated))),
            broken,
        }
    }

    fn payloads(&self) -> Vec<u64> {
        self.runs.lock().unwrap().iter().map(|r| r.0).collect()
    }
}

/// A pool of `workers` (the pool's retry limit 5) with `handler`.
async fn start(
    dir: &std::path::Path,
    store: PostgresStore,
    workers: usize,
    handler: &Handler,
) -> Pool<u64> {
    let handler = handler.clone();
    Pool::builder()
        .workers(workers)
        .max_attempts(5)
        .backoff(Duration::from_millis(10), Duration::from_millis(20))
        .journal_dir(dir)
        .postgres(store)
        .start(move |task: Task<u64>| {
            let handler = handler.clone();
            async move {
                let n = *task.payload();
                handler.runs.lock().unwrap().push((
                    n,
                    task.id(),
                    task.attempt(),
                    task.was_interrupted(),
                    now_ms(),
                ));
                if n == 1 && task.attempt() == 1 {
                    handler.gate.acquire().await.expect("the gate").forget();
                }
                if n == 1 && handler.broken {
                    return Err(format!("broken: {n}"));
                }
                Ok(())
            }
        })
        .await
        .expect("pool start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_take_higher_priorities_first_after_a_handoff() {
    let Some(schema) = Schema::new("prio") else {
        return;
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = idle(dir_a.path(), schema.store()).await;
    // Low first, then high, then low again, as submitted.
    let mut ids = Vec::new();
    for (n, priority) in [(1, 0), (2, 0), (3, 3), (4, 7), (5, 7), (6, 0)] {
        let task = a.task(n);
        let task = if priority > 0 {
            task.priority(priority)
        } else {
            task
        };
        ids.push(task.submit().await.expect("submit"));
    }
    let report = a.shutdown().await.unwrap();
    assert_eq!(report.handed_off, 6, "{report:?}");
    let contents = schema.store().inspect().await.unwrap();
    let priorities: Vec<u8> = contents.live.iter().map(|t| t.priority).collect();
    assert_eq!(priorities, [0, 0, 3, 7, 7, 0], "in id order");

    // One worker: the tasks run in the order the claim queued them.
    let handler = Handler::new(false, false);
    let b = start(dir_b.path(), schema.store(), 1, &handler).await;
    eventually(PATIENCE, "every handed-off task to run", || {
        handler.payloads().len() == 6
    })
    .await;
    assert_eq!(handler.payloads(), [4, 5, 3, 1, 2, 6]);
    eventually(PATIENCE, "their rows to go", || schema.rows() == 0).await;
    let report = b.shutdown().await.unwrap();
    assert_eq!((report.replayed, report.completed), (6, 6), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_option_travels_with_a_handed_off_task_and_the_claiming_pool_honours_it() {
    let Some(schema) = Schema::new("opts") else {
        return;
    };
    let store = schema.store();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = idle(dir_a.path(), schema.store()).await;
    let before = now_ms();
    let id = a
        .task(1)
        .priority(5)
        .delay(Duration::from_millis(300))
        .time_to_live(Duration::from_secs(3600))
        .unique_key("order-7")
        .max_attempts(2)
        .submit()
        .await
        .expect("submit");
    let after = now_ms();
    let report = a.shutdown().await.unwrap();
    assert_eq!(report.handed_off, 1, "{report:?}");

    // In the table with every option.
    let contents = store.inspect().await.unwrap();
    let task = only(&contents.live);
    assert_eq!(task.id, id);
    assert_eq!(
        (task.priority, task.max_attempts, task.unique_key.as_deref()),
        (5, Some(2), Some("order-7"))
    );
    let expires = task.expires_at_ms.expect("an expiry");
    assert!((before + 3_600_000..=after + 3_600_000).contains(&expires));
    assert!((before + 300..=after + 300).contains(&task.not_before_ms));
    let not_before = task.not_before_ms;

    // Another pool claims it once it is due; its key is held there while it runs.
    let handler = Handler::new(true, true);
    let b = start(dir_b.path(), schema.store(), 2, &handler).await;
    eventually(PATIENCE, "the claimed task to start", || {
        !handler.runs.lock().unwrap().is_empty()
    })
    .await;
    let first = handler.runs.lock().unwrap()[0];
    assert_eq!((first.0, first.1, first.2), (1, id, 1));
    assert!(
        first.4 >= not_before,
        "ran at {} before {not_before}",
        first.4
    );
    match b.task(99).unique_key("order-7").submit().await {
        Err(SubmitError::Duplicate { task, first }) => assert_eq!((task, first), (99, id)),
        other => panic!("a duplicate of the claimed task: {other:?}"),
    }

    // Its own retry limit (2), not the pool's (5): a dead letter in the table after two
    // failed runs, with its options.
    handler.gate.add_permits(1);
    let dead = async {
        loop {
            let contents = store.inspect().await.unwrap();
            if let [dead] = &contents.dead[..] {
                return dead.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let dead = tokio::time::timeout(PATIENCE, dead)
        .await
        .expect("the dead letter");
    assert_eq!(handler.payloads(), [1, 1]);
    assert_eq!(
        (dead.id, dead.attempts, dead.last_error.as_deref()),
        (id, 2, Some("broken: 1"))
    );
    assert_eq!(
        (dead.priority, dead.max_attempts, dead.expires_at_ms),
        (5, Some(2), Some(expires))
    );
    assert_eq!(dead.unique_key.as_deref(), Some("order-7"));
    // The key went with it: a new task may take it.
    let again = b.task(99).unique_key("order-7").submit().await.unwrap();
    eventually(PATIENCE, "the new task with the key to run", || {
        handler.payloads().contains(&99)
    })
    .await;
    let report = b.shutdown().await.unwrap();
    assert_eq!(
        (
            report.replayed,
            report.submitted,
            report.failed,
            report.completed
        ),
        (1, 1, 1, 1),
        "{report:?}"
    );
    assert!(again.run() > id.run());

    // A requeue keeps its options but the expiry (it means to run it).
    assert_eq!(store.requeue(Requeue::All).await.unwrap().ids, [id]);
    let contents = store.inspect().await.unwrap();
    let task = only(&contents.live);
    assert_eq!((task.id, task.attempts, task.not_before_ms), (id, 0, 0));
    assert_eq!(
        (task.priority, task.max_attempts, task.expires_at_ms),
        (5, Some(2), None)
    );
    assert_eq!(task.unique_key.as_deref(), Some("order-7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_time_to_live_ran_out_in_the_table_is_a_dead_letter_saying_so() {
    let Some(schema) = Schema::new("ttl") else {
        return;
    };
    let store = schema.store();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = idle(dir_a.path(), schema.store()).await;
    let id = a
        .task(1)
        .time_to_live(Duration::from_millis(200))
        .submit()
        .await
        .unwrap();
    let kept = a.submit(2).await.unwrap();
    assert_eq!(a.shutdown().await.unwrap().handed_off, 2);
    let contents = store.inspect().await.unwrap();
    let expires = contents.live[0].expires_at_ms.expect("an expiry");
    assert_eq!(contents.live[1].expires_at_ms, None);
    // Its time runs out while it is in the table.
    eventually(PATIENCE, "the task's expiry to pass", || now_ms() > expires).await;

    let handler = Handler::new(false, false);
    let b = start(dir_b.path(), schema.store(), 1, &handler).await;
    eventually(PATIENCE, "the other task to run", || {
        handler.payloads().contains(&2)
    })
    .await;
    eventually(PATIENCE, "the expired task's dead letter", || {
        schema.number("SELECT count(*) FROM {t} WHERE dead_at IS NOT NULL") == 1
    })
    .await;
    let report = b.shutdown().await.unwrap();
    assert_eq!(handler.payloads(), [2], "the expired task never ran");
    assert_eq!(
        (
            report.replayed,
            report.expired,
            report.failed,
            report.completed
        ),
        (2, 1, 1, 1),
        "{report:?}"
    );
    let contents = store.inspect().await.unwrap();
    assert!(contents.live.is_empty(), "{contents:?}");
    let dead = only(&contents.dead);
    assert_eq!((dead.id, dead.attempts), (id, 0));
    let reason = dead.last_error.as_deref().unwrap_or_default();
    assert!(reason.starts_with("expired"), "{reason}");
    assert_ne!(dead.id, kept);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_table_is_migrated_in_place_and_its_tasks_kept() {
    let Some(schema) = Schema::new("v2") else {
        return;
    };
    let table = format!("\"{}\".drainpool_tasks", schema.name);
    // The version-2 tables, a live task and a dead letter in them.
    schema.make_at_version(2);
    psql(
        &schema.url,
        &format!(
            "INSERT INTO {table} (run, seq, enqueued_at, run_after, payload) \
             VALUES (1, 1, now(), to_timestamp(0), '7'); \
             INSERT INTO {table} (run, seq, enqueued_at, run_after, payload, last_error, \
                 dead_at) VALUES (1, 2, now(), 'infinity', '8', 'broken', now())"
        ),
    )
    .unwrap();
    // A pool that only checks refuses it, untouched.
    schema.assert_refused_unmigrated(2).await;
    let dir = tempfile::tempdir().unwrap();

    // A pool that migrates brings it to version 3 in place; its rows have the options'
    // defaults.
    let pool = idle(dir.path(), schema.store()).await;
    assert_eq!(schema.version(), 3);
    assert_eq!(
        schema.number(&format!(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = '{}' \
             AND table_name = 'drainpool_tasks' AND column_name IN \
             ('priority', 'max_attempts', 'expires_at', 'unique_key')",
            schema.name
        )),
        4
    );
    assert_eq!(
        schema.number(&format!(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = '{}' \
             AND indexname = 'drainpool_tasks_claim'",
            schema.name
        )),
        1
    );
    drop(pool.shutdown().await.unwrap());
    let contents = schema.store().inspect().await.unwrap();
    for task in contents.live.iter().chain(&contents.dead) {
        assert_eq!(
            (task.priority, task.max_attempts, task.expires_at_ms),
            (0, None, None)
        );
        assert_eq!(task.unique_key, None);
    }
    assert_eq!(contents.live.len(), 1);
    assert_eq!(contents.dead[0].last_error.as_deref(), Some("broken"));
    // A version-2 pool still running during a rolling upgrade inserts without the new
    // columns: its rows get their defaults, and a version-3 pool runs them, with the kept one.
    psql(
        &schema.url,
        &format!(
            "INSERT INTO {table} (run, seq, enqueued_at, run_after, payload) \
             VALUES (1, 3, now(), to_timestamp(0), '9')"
        ),
    )
    .unwrap();
    let handler = Handler::new(false, false);
    let dir = tempfile::tempdir().unwrap();
    let pool = start(dir.path(), schema.store(), 1, &handler).await;
    eventually(PATIENCE, "the kept tasks to run", || {
        handler.payloads().len() == 2
    })
    .await;
    drop(pool.shutdown().await.unwrap());
    assert_eq!(handler.payloads(), [7, 9]);
    // Applied again (by a DBA, say): nothing changes.
    let script = schema.store().schema_sql().unwrap();
    psql(&schema.url, &script).expect("the script applies again");
    assert_eq!(schema.version(), 3);
    assert_eq!(schema.rows(), 1, "the dead letter");

    // A table newer than this build stops a start that would migrate, untouched.
    psql(
        &schema.url,
        &format!(
            "UPDATE \"{}\".drainpool_tasks_meta SET version = 4",
            schema.name
        ),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let refused = Pool::<u64>::builder()
        .journal_dir(dir.path())
        .postgres(schema.store())
        .build()
        .await;
    let error = match refused {
        Err(StartError::Postgres(error)) => error,
        other => panic!("{:?}", other.map(drop)),
    };
    let mut chain = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        chain = format!("{chain}: {cause}");
        source = cause.source();
    }
    assert!(chain.contains("newer than version 3"), "{chain}");
    assert_eq!(schema.version(), 4);
    schema.assert_refused_unmigrated(4).await;
}

/// How this test binary runs itself as the write-ahead pool that is SIGKILLed.
const WRITER: SelfExec = SelfExec {
    test: "write_ahead_writer",
    dir_var: "DRAINPOOL_OPTIONS_DIR",
    config_var: "DRAINPOOL_OPTIONS_CONFIG",
    exit_poll: Duration::from_millis(5),
    ready_poll: Duration::from_millis(5),
};

/// The write-ahead pool's process: runs only when the test below starts this binary with a
/// configuration (`<url> <schema>`).
#[test]
#[ignore = "the process of the write-ahead SIGKILL test, which starts it itself"]
fn write_ahead_writer() {
    let Some((dir, config)) = WRITER.worker_env() else {
        return;
    };
    run_worker(true, writer(dir, config));
}

/// Accepts one task with every option (its row committed, leased to this pool, which never
/// runs it), says so, and waits to be killed.
async fn writer(dir: PathBuf, config: String) -> i32 {
    let Some((url, schema)) = config.split_once(' ') else {
        return 2;
    };
    let store = PostgresStore::new(url)
        .schema(schema)
        .lease(Duration::from_secs(2))
        .timeout(Duration::from_secs(3));
    let Ok((pool, runner)) = Pool::<u64>::builder()
        .durability(Durability::write_ahead(SyncPolicy::Always))
        .journal_dir(dir.join("journal"))
        .postgres(store)
        .build()
        .await
    else {
        return 3;
    };
    let accepted = pool
        .task(1)
        .priority(6)
        .delay(Duration::from_millis(500))
        .time_to_live(Duration::from_secs(3600))
        .unique_key("receipt-7")
        .max_attempts(2)
        .submit()
        .await;
    let Ok(id) = accepted else {
        return 4;
    };
    println!("accepted id={id}");
    tokio::time::sleep(Duration::from_secs(3600)).await;
    drop(runner);
    0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_ahead_task_keeps_its_options_across_a_sigkill_of_its_pool() {
    let Some(schema) = Schema::new("wa_kill") else {
        return;
    };
    let base = tempfile::tempdir().unwrap();
    let config = format!("{} {}", schema.url, schema.name);
    let before = now_ms();
    let mut writer = WRITER
        .spawn(base.path(), 1, &config, None)
        .expect("the writer process");
    let out = base.path().join("out.1");
    let waited = writer.wait_for(PATIENCE, "the accepted task", || {
        read(&out).contains("accepted id=")
    });
    if let Err(error) = waited {
        panic!("{error}\n{}", read(&base.path().join("err.1")));
    }
    let after = now_ms();
    let id: TaskId = said(&out, "accepted id=")
        .and_then(|id| id.parse().ok())
        .expect("the accepted task's id");
    writer.signal(Signal::KILL, "SIGKILL").expect("SIGKILL");
    writer.wait(PATIENCE).expect("the writer to die");

    // Its row, leased to the dead pool, with every option and its run-at time.
    let store = schema.store();
    let contents = store.inspect().await.unwrap();
    let task = only(&contents.live);
    assert_eq!((task.id, task.lease_owner), (id, Some(id.run())));
    assert_eq!(
        (task.priority, task.max_attempts, task.unique_key.as_deref()),
        (6, Some(2), Some("receipt-7"))
    );
    assert!((before + 3_600_000..=after + 3_600_000).contains(&task.expires_at_ms.unwrap()));
    assert!((before + 500..=after + 500).contains(&task.not_before_ms));

    // Another pool rescues it once the lease expired, and honours its retry limit (2, not the
    // pool's 5): two failed runs, the first interrupted, then a dead letter with its options.
    let handler = Handler::new(true, false);
    let dir = tempfile::tempdir().unwrap();
    let pool = start(dir.path(), schema.store(), 1, &handler).await;
    eventually(PATIENCE, "the dead letter", || {
        schema.number("SELECT count(*) FROM {t} WHERE dead_at IS NOT NULL") == 1
    })
    .await;
    let report = pool.shutdown().await.unwrap();
    let seen: Vec<(u64, TaskId, u32, bool)> = handler
        .runs
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.0, r.1, r.2, r.3))
        .collect();
    assert_eq!(seen, [(1, id, 1, true), (1, id, 2, false)]);
    assert_eq!((report.replayed, report.failed), (1, 1), "{report:?}");
    let contents = store.inspect().await.unwrap();
    let dead = only(&contents.dead);
    // (The failed runs reset the count of consecutive interruptions.)
    assert_eq!((dead.id, dead.attempts, dead.interruptions), (id, 2, 0));
    assert_eq!(
        (dead.priority, dead.max_attempts, dead.unique_key.as_deref()),
        (6, Some(2), Some("receipt-7"))
    );
}

/// The task with options the CLI test submits.
#[cfg(feature = "cli")]
async fn submit_with_options(pool: &Pool<u64>) -> TaskId {
    pool.task(5)
        .priority(4)
        .time_to_live(Duration::from_secs(3600))
        .unique_key("k-5")
        .max_attempts(3)
        .submit()
        .await
        .expect("submit")
}

#[cfg(feature = "cli")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_a_tasks_options_from_the_table_as_from_a_journal() {
    let Some(schema) = Schema::new("opts_cli") else {
        return;
    };
    // The same task, handed off to the table by one pool and spilled to its journal by another.
    let (table_dir, journal_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let before = now_ms();
    let a = idle(table_dir.path(), schema.store()).await;
    submit_with_options(&a).await;
    assert_eq!(a.shutdown().await.unwrap().handed_off, 1);
    let b = common::pg::idle(Pool::builder().journal_dir(journal_dir.path())).await;
    submit_with_options(&b).await;
    assert_eq!(b.shutdown().await.unwrap().spilled, 1);
    let after = now_ms();

    let line = |args: &[&str]| -> serde_json::Value {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_drainpool"))
            .args(args)
            .output()
            .expect("the drainpool binary");
        assert!(output.status.success(), "{output:?}");
        let text = String::from_utf8(output.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        serde_json::from_str(lines[0]).unwrap()
    };
    let table = line(&[
        "inspect",
        "--postgres",
        &schema.url,
        "--schema",
        &schema.name,
    ]);
    let journal = line(&["inspect", &journal_dir.path().display().to_string()]);
    for line in [&table, &journal] {
        assert_eq!(line["priority"], 4, "{line}");
        assert_eq!(line["max_attempts"], 3, "{line}");
        assert_eq!(line["unique_key"], "k-5", "{line}");
        let expires = line["expires_at_ms"].as_u64().expect("an expiry");
        assert!((before + 3_600_000..=after + 3_600_000).contains(&expires));
    }
}
