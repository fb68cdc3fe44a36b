//! The PostgreSQL store's rows (`--only handoff,pickup,pgwrite`), on the database of
//! `DATABASE_URL` (or the local server's default URL), each in a schema of its own that is
//! dropped afterwards. With no database answering, each row is skipped and says why.
//!
//! - **handoff**: an idle pool (its one worker busy with a handler that waits) with N tasks
//!   queued, `shutdown()`; the report's `elapsed`, the rows counted in the table afterwards.
//!   Baseline: the same N payloads, serialized and inserted by hand with multi-row `INSERT`s
//!   in one transaction.
//! - **pickup**: a leaving pool hands off one task; another pool on the table (in this
//!   process) starts it. From the leaving pool's `shutdown()` call to the handler's start.
//! - **pgwrite**: write-ahead with the store end to end (256 submitters, each `submit`
//!   returning once its row is committed; 2 workers; until the last row is deleted), against
//!   the hand-written task table a user would write instead: one committed `INSERT` per submit
//!   from 256 submitters, 2 workers claiming with `FOR UPDATE SKIP LOCKED` and deleting on
//!   completion ([`handwritten_table`]). The two run interleaved, each on a schema of its own.

use std::collections::HashMap;
use std::convert::Infallible;
use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drainpool::{Durability, Pool, PostgresStore, State, SyncPolicy, Task};
use serde_json::json;
use tokio::runtime::Runtime;
use tokio_postgres::{Client, NoTls};

use super::{
    BoxResult, Row, Scale, counting, fresh_dir, median, rate_text, runtime, secs_text, submit_for,
    thousands,
};
use crate::common::{Email, email};

/// The server the rows use when `DATABASE_URL` is unset (the tests' default too).
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Rows per statement of the baseline's multi-row `INSERT` (as the store's handoff does).
const INSERT_CHUNK: usize = 10_000;

/// The hand-written table's submitters share this many connections (a connection pool's
/// size; a `tokio_postgres::Client` takes concurrent statements and pipelines them).
const TABLE_CONNECTIONS: usize = 16;

/// The database URL, and whether it answers (`Err`: why the rows are skipped).
pub(super) fn database(rt: &Runtime) -> Result<String, String> {
    let url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_URL.to_owned());
    rt.block_on(async {
        let client = connect(&url)
            .await
            .map_err(|e| format!("{url}: {}", chain(&*e)))?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| format!("{url}: {}", chain(&e)))?;
        Ok(url)
    })
}

/// An error and its sources, one after another.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// A row that did not run, and why.
pub(super) fn skipped(name: &str, reason: &str) -> Row {
    super::skipped_row(
        name.to_owned(),
        &format!("no PostgreSQL database answers ({reason})"),
    )
}

async fn connect(url: &str) -> BoxResult<Client> {
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(5), tokio_postgres::connect(url, NoTls))
            .await
            .map_err(|_| "connecting timed out after 5 s")??;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Runs `f` with a fresh schema of this process's own, dropped afterwards whatever `f`
/// returned.
fn with_schema<T>(
    rt: &Runtime,
    url: &str,
    row: &str,
    f: impl FnOnce(&str) -> BoxResult<T>,
) -> BoxResult<T> {
    let schema = format!("drainpool_bench_{row}_{}", std::process::id());
    let drop_it = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
    rt.block_on(async {
        let client = connect(url).await?;
        client.batch_execute(&drop_it).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    let result = f(&schema);
    let dropped = rt.block_on(async {
        let client = connect(url).await?;
        client.batch_execute(&drop_it).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    });
    let value = result?;
    dropped?;
    Ok(value)
}

fn store(url: &str, schema: &str) -> PostgresStore {
    PostgresStore::new(url).schema(schema)
}

async fn count(client: &Client, table: &str) -> BoxResult<u64> {
    let n: i64 = client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0);
    Ok(n.try_into()?)
}

// ---------------------------------------------------------------------------------------------
// Handoff at shutdown.

/// A pool whose one worker holds a task until the drain begins, with `n` queued behind it;
/// `shutdown()` hands them off. Returns (the report's elapsed, the call's wall time), having
/// counted the `n` rows in the table.
async fn handoff_drainpool(dir: &Path, url: &str, schema: &str, n: u64) -> BoxResult<(f64, f64)> {
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    let pool = Pool::builder()
        .workers(1)
        .queue_capacity(n as usize + 16)
        .journal_dir(fresh_dir(dir)?)
        .postgres(store(url, schema))
        .start(move |task: Task<Email>| {
            let mut gate = gate_rx.clone();
            async move {
                black_box(task.payload());
                let _ = gate.wait_for(|open| *open).await;
                Ok::<(), Infallible>(())
            }
        })
        .await?;
    for i in 0..=n {
        pool.submit(email(i))
            .await
            .map_err(|e| format!("submit: {e}"))?;
    }
    while pool.stats().in_flight < 1 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The task in flight finishes as soon as the drain begins: only the handoff is measured.
    let mut state = pool.watch_state();
    tokio::spawn(async move {
        let _ = state.wait_for(|s| s != State::Running).await;
        gate.send_replace(true);
    });
    let t = Instant::now();
    let report = pool.shutdown().await?;
    let wall = t.elapsed().as_secs_f64();
    if report.handed_off != n || report.handoff_error.is_some() || !report.is_clean() {
        return Err(format!("handoff of {n} not clean: {report:?}").into());
    }
    let client = connect(url).await?;
    let table = format!("\"{schema}\".drainpool_tasks");
    let rows = count(&client, &table).await?;
    if rows != n {
        return Err(format!("handed off {n}, but the table holds {rows}").into());
    }
    client.batch_execute(&format!("TRUNCATE {table}")).await?;
    Ok((report.elapsed.as_secs_f64(), wall))
}

/// The hand-written table of this module's rows.
fn create_table(schema: &str) -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         CREATE TABLE IF NOT EXISTS \"{schema}\".tasks (
             id bigserial PRIMARY KEY,
             payload bytea NOT NULL
         )"
    )
}

/// The baseline: the same payloads serialized and inserted with multi-row `INSERT ... VALUES
/// ($1), ($2), ...` (`INSERT_CHUNK` rows a statement), in one transaction. Returns the
/// seconds from the first serialization to the commit.
async fn handoff_baseline(url: &str, schema: &str, n: u64) -> BoxResult<f64> {
    let mut client = connect(url).await?;
    client.batch_execute(&create_table(schema)).await?;
    let table = format!("\"{schema}\".tasks");
    let emails: Vec<Email> = (0..n).map(email).collect();
    let t = Instant::now();
    let payloads = emails
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<Vec<_>, _>>()?;
    let transaction = client.transaction().await?;
    for chunk in payloads.chunks(INSERT_CHUNK) {
        let values: Vec<String> = (1..=chunk.len()).map(|i| format!("(${i})")).collect();
        let sql = format!("INSERT INTO {table} (payload) VALUES {}", values.join(", "));
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = chunk
            .iter()
            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        transaction.execute(&sql, &params).await?;
    }
    transaction.commit().await?;
    let secs = t.elapsed().as_secs_f64();
    let rows = count(&client, &table).await?;
    if rows != n {
        return Err(format!("the baseline inserted {rows} rows, not {n}").into());
    }
    client.batch_execute(&format!("TRUNCATE {table}")).await?;
    Ok(secs)
}

pub(super) fn handoff_rows(dir: &Path, scale: Scale, url: &str) -> BoxResult<Vec<Row>> {
    let rt = runtime()?;
    let n = scale.pg_handoff_tasks;
    let journal = dir.join("handoff-journal");
    let (pool_runs, wall_runs, baseline_runs) = with_schema(&rt, url, "handoff", |schema| {
        let (mut pool, mut wall, mut baseline) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..scale.pg_handoff_runs {
            // Alternate which goes first.
            for k in 0..2 {
                if (run + k) % 2 == 0 {
                    let (elapsed, call) =
                        rt.block_on(handoff_drainpool(&journal, url, schema, n))?;
                    pool.push(elapsed);
                    wall.push(call);
                } else {
                    baseline.push(rt.block_on(handoff_baseline(url, schema, n))?);
                }
            }
        }
        Ok((pool, wall, baseline))
    })?;
    let _ = std::fs::remove_dir_all(&journal);
    let drainpool = median(&pool_runs);
    let baseline = median(&baseline_runs);
    let ratio = drainpool / baseline;
    Ok(vec![Row {
        name: format!(
            "handoff of {} queued tasks at shutdown, committed",
            thousands(n)
        ),
        unit: "seconds, the report's elapsed",
        drainpool: Some(drainpool),
        drainpool_text: format!(
            "{} (shutdown(); {} rows counted after)",
            secs_text(drainpool),
            thousands(n)
        ),
        baseline: Some(baseline),
        baseline_text: format!(
            "{} (serialize + multi-row INSERT, {} rows a statement, one transaction)",
            secs_text(baseline),
            thousands(INSERT_CHUNK as u64)
        ),
        ratio: Some(ratio),
        goal: "≤ 1 s".to_owned(),
        met: Some(drainpool <= 1.0),
        detail: json!({
            "tasks": n,
            "report_elapsed_runs": pool_runs,
            "shutdown_call_runs": wall_runs,
            "baseline_runs": baseline_runs,
            "baseline_table": "id bigserial PRIMARY KEY, payload bytea NOT NULL",
        }),
    }])
}

// ---------------------------------------------------------------------------------------------
// Pickup: a replica starts a task another one handed off.

/// The `q` quantile of `values` by nearest rank.
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(super) fn pickup_rows(dir: &Path, scale: Scale, url: &str) -> BoxResult<Vec<Row>> {
    let rt = runtime()?;
    let handoffs = scale.pg_pickups;
    let (from_call, from_report, call_to_report) = with_schema(&rt, url, "pickup", |schema| {
        rt.block_on(pickups(dir, url, schema, handoffs))
    })?;
    let p50 = quantile(&from_call, 0.5);
    let p99 = quantile(&from_call, 0.99);
    Ok(vec![Row {
        name: "pickup: a replica starts a task another handed off".to_owned(),
        unit: "milliseconds, the leaving pool's shutdown() call to the handler's start",
        drainpool: Some(p50),
        drainpool_text: format!("p50 {p50:.1} ms, p99 {p99:.1} ms ({handoffs} handoffs)"),
        baseline: None,
        baseline_text: "—".to_owned(),
        ratio: None,
        goal: "p50 ≤ 100 ms".to_owned(),
        met: Some(p50 <= 100.0),
        detail: json!({
            "handoffs": handoffs,
            "clock": "from the leaving pool's shutdown() call, before its handoff's commit \
                      (so an upper bound, by the one-row transaction's time), to the \
                      replica's handler starting; the replica polls every 1 s (the default), \
                      so a pickup faster than that was woken by NOTIFY",
            "from_shutdown_call_ms": from_call,
            "from_report_ms": from_report,
            "shutdown_call_to_report_ms": call_to_report,
            "p50_from_report_ms": quantile(&from_report, 0.5),
            "p50_shutdown_call_to_report_ms": quantile(&call_to_report, 0.5),
        }),
    }])
}

/// `handoffs` times: a pool that runs nothing takes one task and shuts down (handing it off);
/// the replica's handler notes when it starts it. Returns, in ms, per handoff: from the
/// `shutdown()` call to the start, from the report to the start (negative when the replica
/// started it before the leaving pool's shutdown returned), and from the call to the report.
async fn pickups(
    dir: &Path,
    url: &str,
    schema: &str,
    handoffs: usize,
) -> BoxResult<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let started: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let seen = Arc::clone(&started);
    let replica = Pool::builder()
        .workers(2)
        .journal_dir(fresh_dir(&dir.join("pickup-replica"))?)
        .postgres(store(url, schema))
        .start(move |task: Task<u64>| {
            let at = Instant::now();
            let seen = Arc::clone(&seen);
            async move {
                seen.lock()
                    .map_err(|_| "poisoned")?
                    .insert(*task.payload(), at);
                Ok::<(), &'static str>(())
            }
        })
        .await?;
    let leaving_dir = dir.join("pickup-leaving");
    let (mut from_call, mut from_report, mut call_to_report) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..handoffs as u64 {
        let (leaving, runner) = Pool::builder()
            .journal_dir(fresh_dir(&leaving_dir)?)
            .postgres(store(url, schema))
            .build()
            .await?;
        drop(runner);
        leaving
            .submit(i)
            .await
            .map_err(|e| format!("submit: {e}"))?;
        // Let the replica settle into its wait.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let call = Instant::now();
        let report = leaving.shutdown().await?;
        let returned = Instant::now();
        if report.handed_off != 1 {
            return Err(format!("the leaving pool handed off nothing: {report:?}").into());
        }
        let limit = Instant::now() + Duration::from_secs(10);
        let at = loop {
            if let Some(at) = started.lock().map_err(|_| "poisoned")?.get(&i) {
                break *at;
            }
            if Instant::now() > limit {
                return Err(format!("the replica did not start handoff {i} in 10 s").into());
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        let ms = |from: Instant| {
            if at >= from {
                (at - from).as_secs_f64() * 1e3
            } else {
                -((from - at).as_secs_f64() * 1e3)
            }
        };
        from_call.push(ms(call));
        from_report.push(ms(returned));
        call_to_report.push((returned - call).as_secs_f64() * 1e3);
    }
    let report = replica.shutdown().await?;
    if report.completed != handoffs as u64 || !report.is_clean() {
        return Err(format!("the replica's run was not clean: {report:?}").into());
    }
    let _ = std::fs::remove_dir_all(&leaving_dir);
    let _ = std::fs::remove_dir_all(dir.join("pickup-replica"));
    Ok((from_call, from_report, call_to_report))
}

// ---------------------------------------------------------------------------------------------
// The hand-written task table.

/// One run of the hand-written task table: see [`handwritten_table`].
#[derive(Debug, Clone, Copy)]
pub(super) struct HandWritten {
    /// Tasks whose `INSERT` committed while the submitters ran.
    pub(super) submitted: u64,
    /// How long the submitters ran.
    pub(super) submit_secs: f64,
    /// From the first submit to the last task's `DELETE` committed.
    pub(super) end_to_end_secs: f64,
}

impl HandWritten {
    /// End to end: every task submitted, run and deleted, per second.
    pub(super) fn tasks_per_sec(&self) -> f64 {
        self.submitted as f64 / self.end_to_end_secs
    }

    /// Committed submits per second while the submitters ran.
    pub(super) fn submits_per_sec(&self) -> f64 {
        self.submitted as f64 / self.submit_secs
    }
}

/// What a user writes instead of the store: a table, one committed `INSERT` per submit from
/// `submitters` concurrent tasks (sharing [`TABLE_CONNECTIONS`] connections, each statement
/// prepared once per connection), and `workers` workers each on a connection of its own,
/// claiming one task per transaction (`SELECT … ORDER BY id LIMIT 1 FOR UPDATE SKIP
/// LOCKED`), running it (decoding the payload) and deleting its row in that transaction. The
/// submitters run for `period`; then every task submitted is waited for. In schema `schema`
/// (created here; the caller drops it).
pub(super) async fn handwritten_table(
    url: &str,
    schema: &str,
    submitters: usize,
    workers: usize,
    period: Duration,
) -> BoxResult<HandWritten> {
    let setup = connect(url).await?;
    let table = format!("\"{schema}\".tasks");
    setup.batch_execute(&create_table(schema)).await?;
    setup.batch_execute(&format!("TRUNCATE {table}")).await?;
    let insert = format!("INSERT INTO {table} (payload) VALUES ($1)");
    let claim =
        format!("SELECT id, payload FROM {table} ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED");
    let delete = format!("DELETE FROM {table} WHERE id = $1");

    let mut connections = Vec::new();
    for _ in 0..TABLE_CONNECTIONS.min(submitters.max(1)) {
        let client = connect(url).await?;
        let statement = client.prepare(&insert).await?;
        connections.push(Arc::new((client, statement)));
    }
    let submitting = Arc::new(AtomicBool::new(true));
    let submitted = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));

    let mut worker_tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let mut client = connect(url).await?;
        let claim = client.prepare(&claim).await?;
        let delete = client.prepare(&delete).await?;
        let (submitting, submitted, completed) = (
            Arc::clone(&submitting),
            Arc::clone(&submitted),
            Arc::clone(&completed),
        );
        worker_tasks.spawn(async move {
            loop {
                let transaction = client.transaction().await?;
                match transaction.query_opt(&claim, &[]).await? {
                    Some(row) => {
                        let id: i64 = row.get(0);
                        let payload: &[u8] = row.get(1);
                        black_box(serde_json::from_slice::<Email>(payload)?);
                        transaction.execute(&delete, &[&id]).await?;
                        transaction.commit().await?;
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        transaction.rollback().await?;
                        let all = !submitting.load(Ordering::Acquire)
                            && completed.load(Ordering::Relaxed)
                                >= submitted.load(Ordering::Relaxed);
                        if all {
                            return Ok::<Instant, Box<dyn std::error::Error + Send + Sync>>(
                                Instant::now(),
                            );
                        }
                        // What a simple poller does between empty looks.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        });
    }

    let started = Instant::now();
    let mut lanes = tokio::task::JoinSet::new();
    for lane in 0..submitters {
        let connection = Arc::clone(&connections[lane % connections.len()]);
        let submitted = Arc::clone(&submitted);
        lanes.spawn(async move {
            let mut i = lane as u64;
            while started.elapsed() < period {
                let payload = serde_json::to_vec(&email(i))?;
                connection.0.execute(&connection.1, &[&payload]).await?;
                submitted.fetch_add(1, Ordering::Relaxed);
                i += submitters as u64;
            }
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        });
    }
    while let Some(lane) = lanes.join_next().await {
        lane?.map_err(|e| e.to_string())?;
    }
    let submit_secs = started.elapsed().as_secs_f64();
    submitting.store(false, Ordering::Release);
    let mut last = started;
    let drained = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(worker) = worker_tasks.join_next().await {
            last = last.max(worker?.map_err(|e| e.to_string())?);
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    });
    drained
        .await
        .map_err(|_| "the hand-written table's workers did not drain it in 300 s")??;
    let left = count(&setup, &table).await?;
    if left != 0 {
        return Err(format!("the hand-written table still holds {left} tasks").into());
    }
    Ok(HandWritten {
        submitted: submitted.load(Ordering::Relaxed),
        submit_secs,
        end_to_end_secs: (last - started).as_secs_f64(),
    })
}

/// The same work through drainpool: a pool with the store in write-ahead mode (`submit`
/// returns once the task's row is committed), `submitters` concurrent submitters for
/// `period`, `workers` workers decoding nothing more than the pool does; until the last task
/// ran and its row was deleted. Returns (tasks, end-to-end seconds).
async fn write_ahead_end_to_end(
    dir: &Path,
    url: &str,
    schema: &str,
    submitters: usize,
    workers: usize,
    period: Duration,
) -> BoxResult<(u64, f64)> {
    let completed = Arc::new(AtomicU64::new(0));
    let pool = Pool::builder()
        .workers(workers)
        .durability(Durability::write_ahead(SyncPolicy::Always))
        .journal_dir(fresh_dir(dir)?)
        .postgres(store(url, schema))
        .start(counting(&completed))
        .await?;
    let started = Instant::now();
    let n = submit_for(&pool, submitters, period).await?;
    let waited = tokio::time::timeout(Duration::from_secs(300), async {
        while completed.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    waited
        .await
        .map_err(|_| "the write-ahead pool did not run its tasks in 300 s")?;
    // The cycle ends when the last row is deleted, as the baseline's does with its DELETE:
    // the pool deletes finished tasks' rows in batches.
    let client = connect(url).await?;
    let table = format!("\"{schema}\".drainpool_tasks");
    let deleted = tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            if count(&client, &table).await? == 0 {
                return Ok::<Instant, Box<dyn std::error::Error>>(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let end = deleted
        .await
        .map_err(|_| "the write-ahead pool did not delete its rows in 300 s")??;
    let report = pool.shutdown().await?;
    if !report.is_clean() || report.completed != n {
        return Err(format!("write-ahead run not clean: {report:?}").into());
    }
    Ok((n, (end - started).as_secs_f64()))
}

pub(super) fn table_rows(dir: &Path, scale: Scale, url: &str) -> BoxResult<Vec<Row>> {
    const SUBMITTERS: usize = 256;
    const WORKERS: usize = 2;
    let rt = runtime()?;
    let dir = dir.join("pgwrite");
    // Interleaved, each on a schema of its own: drainpool, then the hand-written table.
    let mut runs = Vec::new();
    for _ in 0..scale.pg_table_runs {
        let ours = with_schema(&rt, url, "pgwrite", |schema| {
            rt.block_on(write_ahead_end_to_end(
                &dir,
                url,
                schema,
                SUBMITTERS,
                WORKERS,
                scale.pg_table_period,
            ))
        })?;
        let theirs = with_schema(&rt, url, "pgtable", |schema| {
            rt.block_on(handwritten_table(
                url,
                schema,
                SUBMITTERS,
                WORKERS,
                scale.pg_table_period,
            ))
        })?;
        runs.push((ours, theirs));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ours: Vec<f64> = runs.iter().map(|((n, secs), _)| *n as f64 / secs).collect();
    let rates: Vec<f64> = runs.iter().map(|(_, t)| t.tasks_per_sec()).collect();
    let submits: Vec<f64> = runs.iter().map(|(_, t)| t.submits_per_sec()).collect();
    let (rate, baseline) = (median(&ours), median(&rates));
    let ratio = rate / baseline;
    let met = ratio >= 10.0 && rate >= 20_000.0;
    Ok(vec![Row {
        name: format!(
            "PostgreSQL write-ahead end to end, {SUBMITTERS} submitters, {WORKERS} workers"
        ),
        unit: "tasks/s, submitted, run and deleted",
        drainpool: Some(rate),
        drainpool_text: format!(
            "{} (write_ahead(Always) with the store: submit returns once its row is committed)",
            rate_text(rate)
        ),
        baseline: Some(baseline),
        baseline_text: format!(
            "{} hand-written task table ({SUBMITTERS} submitters, a committed INSERT each: {} \
             on {TABLE_CONNECTIONS} connections; {WORKERS} workers, FOR UPDATE SKIP LOCKED, \
             DELETE)",
            rate_text(baseline),
            rate_text(median(&submits)),
        ),
        ratio: Some(ratio),
        goal: "≥ 10× the hand-written table and ≥ 20,000 tasks/s".to_owned(),
        met: Some(met),
        detail: json!({
            "submitters": SUBMITTERS,
            "workers": WORKERS,
            "connections_for_submitters": TABLE_CONNECTIONS,
            "submit_seconds": scale.pg_table_period.as_secs_f64(),
            "drainpool_runs": ours,
            "drainpool_tasks_runs": runs.iter().map(|((n, _), _)| n).collect::<Vec<_>>(),
            "end_to_end_runs": rates,
            "submit_runs": submits,
            "tasks_runs": runs.iter().map(|(_, r)| r.submitted).collect::<Vec<_>>(),
            "end_to_end_seconds_runs": runs.iter().map(|(_, r)| r.end_to_end_secs).collect::<Vec<_>>(),
        }),
    }])
}
