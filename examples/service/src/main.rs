//! An order service: axum 0.8 and a drainpool pool under one shutdown.
//!
//! `POST /orders` takes a JSON order and answers 202 with the id of the task that will ship it
//! (429 when the queue stays full for 20 ms, 503 once draining, 413 for an order too large to
//! journal, 507 when the journal's disk has no room for it). `GET /ready` is 200 while the pool
//! is ready and 503 with the reason otherwise; `GET /live` is 200; `GET /metrics` is the pool's
//! metrics (drainpool's `metrics` feature, labelled `pool="orders"`) in Prometheus text, rendered
//! by `metrics-exporter-prometheus` inside the axum route (no listener of its own). The task handler "ships" the order (a short sleep that honours
//! the task's cancellation token), appends `shipped <order id>` to a ledger file, and for an
//! order that asks for an invoice submits a follow-up task to its own pool through a `WeakPool`,
//! which appends `invoiced <order id>`.
//!
//! The shutdown is one budget. The pool catches SIGTERM/SIGINT from before its replay
//! (`catch_signals(true)`); `drainpool::shutdown_signal()` joins the same count and stops axum
//! from accepting, so from the first SIGTERM intake answers 503 and the queue is spilled at once.
//! The pool's drain goes on on its own tasks; axum gets the whole drain to finish the requests it
//! holds, then [`HTTP_LINGER`] more, then it is dropped, so a client that holds a request open
//! cannot keep the process alive past its grace period (the linger is counted in the deadline's
//! `pre_stop`). A second SIGTERM skips the drain's wait, a third exits at once (143). The exit
//! status is the report's: 0 when every task finished or was journaled.
//!
//! Environment: `ORDERS_JOURNAL_DIR` (required), `ORDERS_LEDGER` (required), `ORDERS_ADDR`
//! (default `127.0.0.1:8080`; `127.0.0.1:0` picks a free port), `GRACE_SECONDS` (the
//! orchestrator's grace period; unset: a 10 s drain deadline), `PRE_STOP_SECONDS` (the part of
//! it the orchestrator spends before SIGTERM, a Kubernetes `preStop` sleep; default 0),
//! `ORDERS_DATABASE_URL` (optional: the PostgreSQL store, so that replicas on directories of
//! their own hand their work to each other; `ORDERS_DATABASE_SCHEMA` names its schema, default
//! `public`). The recipes in `deploy/` set them. The first line on stdout is
//! `listening on <address>`, the line `draining` follows the first shutdown trigger, and the last
//! is the report. Run it from the repository's root with
//! `ORDERS_JOURNAL_DIR=/tmp/orders ORDERS_LEDGER=/tmp/orders.ledger cargo run -p drainpool-service-example`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Json, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use drainpool::{BoxError, Deadline, Pool, PostgresStore, SubmitError, Task, WeakPool};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};

/// How long axum may go on after the pool has stopped, for responses still being written.
const HTTP_LINGER: Duration = Duration::from_secs(1);
/// How long `POST /orders` waits for room in the queue before answering 429.
const SUBMIT_WAIT: Duration = Duration::from_millis(20);
/// Workers.
const WORKERS: usize = 4;
/// The queue's capacity.
const QUEUE_CAPACITY: usize = 64;
/// The largest journal record: an order with a longer note is refused with 413.
const MAX_RECORD_BYTES: usize = 16 * 1024;
/// The pool's name: the `pool` label of its metrics.
const POOL_NAME: &str = "orders";
/// How often the exporter's histograms are drained (`install_recorder` leaves that to us).
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// An order, as posted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    /// The client's id for the order: what the ledger records.
    id: String,
    /// Whether shipping it is followed by an invoice (a follow-up task).
    #[serde(default)]
    invoice: bool,
    /// How long shipping takes, in ms (default: 5 to 30, from the id). A run that was
    /// interrupted at a drain deadline resumes with the default: the stand-in for work that
    /// checkpoints.
    #[serde(default)]
    work_ms: Option<u64>,
    /// How long shipping takes to stop once the drain deadline has fired its token, in ms
    /// (default 0): the stand-in for work that must finish a step before it can stop. Past
    /// the pool's cancel grace the run is dropped, and journaled as interrupted all the same.
    #[serde(default)]
    wind_down_ms: u64,
    /// Free text, journaled with the order.
    #[serde(default)]
    note: String,
}

/// What the pool runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Job {
    Ship(Order),
    Invoice { order: String },
}

/// The append-only ledger the handlers write: one line per job done.
#[derive(Debug, Clone)]
struct Ledger(Arc<Mutex<std::fs::File>>);

impl Ledger {
    fn open(path: &std::path::Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self(Arc::new(Mutex::new(file))))
    }

    /// One whole line in one `write` (the file is opened for appending).
    fn record(&self, line: &str) -> std::io::Result<()> {
        let mut file = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        file.write_all(format!("{line}\n").as_bytes())
    }
}

/// The task handler: ships an order (and asks for its invoice), or writes an invoice.
async fn run(task: Task<Job>, own: WeakPool<Job>, ledger: Ledger) -> Result<(), BoxError> {
    match task.payload() {
        Job::Ship(order) => {
            let default = 5 + order.id.bytes().map(u64::from).sum::<u64>() % 26;
            let work = match order.work_ms {
                Some(ms) if !task.was_interrupted() => ms,
                _ => default,
            };
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(work)) => {}
                // Journaled as interrupted, and replayed at the next start.
                () = task.cancelled() => {
                    tokio::time::sleep(Duration::from_millis(order.wind_down_ms)).await;
                    return Err("interrupted at the drain deadline".into());
                }
            }
            ledger.record(&format!("shipped {}", order.id))?;
            if order.invoice {
                // A follow-up from the pool's own handler never waits for room (a full queue
                // takes it ahead of the rest) and is accepted during the drain too (it goes
                // to the spill). Should it fail all the same (the journal's disk is full), the
                // order is retried, shipped twice (at least once is the promise), and its
                // invoice asked for again.
                let pool = own.upgrade().ok_or("the pool is gone")?;
                let invoice = Job::Invoice {
                    order: order.id.clone(),
                };
                pool.submit(invoice)
                    .await
                    .map_err(|e| format!("invoice for {}: {e}", order.id))?;
            }
        }
        Job::Invoice { order } => ledger.record(&format!("invoiced {order}"))?,
    }
    Ok(())
}

async fn submit(State(pool): State<Pool<Job>>, Json(order): Json<Order>) -> impl IntoResponse {
    let id = order.id.clone();
    // From the first SIGTERM the pool refuses intake itself: `ShuttingDown`, a 503.
    match pool.submit_within(Job::Ship(order), SUBMIT_WAIT).await {
        Ok(task) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "order": id, "task": task.to_string() })),
        ),
        Err(error) => {
            let status = match &error {
                SubmitError::Full(_) => StatusCode::TOO_MANY_REQUESTS,
                SubmitError::ShuttingDown(_) | SubmitError::Journal { .. } => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                SubmitError::RecordTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                SubmitError::JournalFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (
                status,
                Json(serde_json::json!({ "order": id, "error": error.to_string() })),
            )
        }
    }
}

async fn ready(State(pool): State<Pool<Job>>) -> impl IntoResponse {
    let health = pool.health();
    let status = if health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, health.to_string())
}

/// Installs the Prometheus recorder, before the pool is built (a pool registers its metrics
/// then), with histogram buckets rather than the exporter's default summaries; and drains its
/// histograms now and then. Returns the handle `GET /metrics` renders.
fn install_metrics() -> Result<PrometheusHandle, BoxError> {
    let seconds = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let tasks = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)?
        .set_buckets_for_metric(Matcher::Suffix("_per_fsync".into()), &tasks)?
        .install_recorder()?;
    tokio::spawn({
        let handle = handle.clone();
        async move {
            let mut every = tokio::time::interval(METRICS_UPKEEP);
            loop {
                every.tick().await;
                handle.run_upkeep();
            }
        }
    });
    Ok(handle)
}

fn app(pool: Pool<Job>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/orders", post(submit))
        .route("/ready", get(ready))
        .route("/live", get(|| async { StatusCode::OK }))
        .route("/metrics", get(move || async move { metrics.render() }))
        .with_state(pool)
}

fn env_path(name: &str) -> Result<PathBuf, BoxError> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .ok_or_else(|| format!("{name} is not set").into())
}

/// A number of seconds (`5`, `0.5`) from the environment; zero when unset.
fn env_seconds(name: &str) -> Result<Duration, BoxError> {
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => Ok(Duration::ZERO),
        Err(error) => Err(format!("{name}: {error}").into()),
        Ok(text) => text
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
            .ok_or_else(|| format!("{name}={text:?} is not a number of seconds").into()),
    }
}

async fn serve() -> Result<ExitCode, BoxError> {
    let ledger = Ledger::open(&env_path("ORDERS_LEDGER")?)?;
    let addr = std::env::var("ORDERS_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());

    let metrics = install_metrics()?;
    let builder = Pool::<Job>::builder()
        .name(POOL_NAME)
        .workers(WORKERS)
        .queue_capacity(QUEUE_CAPACITY)
        .max_record_bytes(MAX_RECORD_BYTES)
        // The handlers are armed before the journal is replayed: a SIGTERM during the replay
        // drains as soon as the pool is built.
        .catch_signals(true)
        .deadline(Deadline::GracePeriodFromEnv {
            variable: "GRACE_SECONDS".into(),
            // The deployment's preStop is spent before SIGTERM, axum's linger after the pool
            // has stopped: both inside the grace period.
            pre_stop: env_seconds("PRE_STOP_SECONDS")? + HTTP_LINGER,
            fallback: Duration::from_secs(10),
        })
        .journal_dir(env_path("ORDERS_JOURNAL_DIR")?);
    // A Deployment's pods hand their work to each other through PostgreSQL; the journal
    // directory is then the fallback for a handoff the database cannot take.
    let builder = match std::env::var("ORDERS_DATABASE_URL") {
        Ok(url) => {
            let schema =
                std::env::var("ORDERS_DATABASE_SCHEMA").unwrap_or_else(|_| "public".into());
            builder.postgres(PostgresStore::new(url).schema(schema))
        }
        Err(_) => builder,
    };
    let (pool, runner) = builder.build().await?;
    let own = pool.downgrade();
    runner.run(move |task: Task<Job>| run(task, own.clone(), ledger.clone()));

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    tokio::spawn({
        let trigger = pool.shutdown_token();
        async move {
            trigger.cancelled().await;
            println!("draining");
        }
    });

    // axum stops accepting at the first signal and finishes the requests it holds; the pool's
    // drain runs meanwhile on its own tasks, whatever axum does.
    let mut server = tokio::spawn(
        axum::serve(listener, app(pool.clone(), metrics))
            .with_graceful_shutdown(drainpool::shutdown_signal()?)
            .into_future(),
    );
    let report = tokio::select! {
        report = pool.wait() => report?,
        served = &mut server => {
            // Done after the signal, or failed: either way the pool stops too.
            match served {
                Ok(Ok(())) => {}
                Ok(Err(error)) => eprintln!("order-service: the HTTP server failed: {error}"),
                Err(error) => eprintln!("order-service: the HTTP server panicked: {error}"),
            }
            pool.shutdown().await?
        }
    };
    if !server.is_finished()
        && tokio::time::timeout(HTTP_LINGER, &mut server)
            .await
            .is_err()
    {
        eprintln!(
            "order-service: requests still open {HTTP_LINGER:?} after the pool stopped; dropped"
        );
        server.abort();
    }

    println!(
        "stopped: replayed {}, submitted {}, completed {}, spilled {}, interrupted {}, unsaved {}, \
         handed off {}, drain deadline {:.2?}, stopped {:.2?} after the trigger",
        report.replayed,
        report.submitted,
        report.completed,
        report.spilled,
        report.interrupted,
        report.unsaved,
        report.handed_off,
        report.drain_deadline,
        report.elapsed,
    );
    Ok(report.exit_code())
}

#[tokio::main]
async fn main() -> ExitCode {
    match serve().await {
        Ok(code) => code,
        Err(error) => {
            // The whole chain: "could not open the journal: journal directory ... is writable by
            // its group ...", not its first link alone.
            let mut text = error.to_string();
            let mut source = error.source();
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("order-service: {text}");
            ExitCode::FAILURE
        }
    }
}
