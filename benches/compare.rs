//! `cargo bench -p drainpool-benches --bench compare`: drainpool against baselines measured in
//! the same process.
//!
//! Each row puts a figure of drainpool, measured through its public API only, beside a
//! baseline doing the same job by hand, on the same machine and file system (everything lives
//! under `target/bench/`), and checks the ratio against the goal of the performance issue.
//! Figures are medians of several runs, the runs of a row interleaved with its baseline's so
//! that a noisy neighbour hurts both alike. The table goes to stdout, the same figures as JSON
//! to `target/bench/compare.json`.
//!
//! The steady rows also give the producing thread's CPU time a task while it submitted (read
//! from `/proc/thread-self/schedstat`, so Linux only; elsewhere the rows give the rates alone).
//!
//! The shutdown-latency and memory rows run in child processes: this binary re-executes itself
//! with `--child-shutdown` or `--child-memory`.
//!
//! Run without `--bench` (as `cargo test -p drainpool-benches --benches` does) it makes a quick
//! smoke run at a hundredth of the scale and writes `target/bench/compare-quick.json` instead.
//! `--only ROWS` (comma-separated: `steady,priority,spill,reserve,durable,shutdown,memory`, and the
//! PostgreSQL store's `handoff,pickup,pgwrite`) runs some rows only, for profiling, and writes
//! `target/bench/compare-partial.json`, leaving the full run's file alone. `spill` makes three
//! rows: the spill, the reload of what it wrote (with the time to the first replayed task), and
//! the same reload from a cold page cache (dropped as root; the row says why when it cannot
//! be).
//!
//! The PostgreSQL rows (`compare/postgres.rs`) run on the database of `DATABASE_URL`, or the
//! local server's `postgres://postgres@127.0.0.1:5432/test`; when none answers they are
//! skipped, each saying why.

mod common;
#[path = "compare/postgres.rs"]
mod postgres;

use common::{Email, email};

use std::convert::Infallible;
use std::error::Error;
use std::fs::{self, File};
use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use drainpool::{Durability, Pool, SyncPolicy, Task};
use serde_json::{Value, json};
use tokio::runtime::Runtime;
use tokio::sync::{Notify, mpsc};

type BoxResult<T> = Result<T, Box<dyn Error>>;

/// A PostgreSQL section: the rows it makes in `dir` at `scale` on the database at the URL.
type PgRows<'a> = &'a dyn Fn(&Path, Scale, &str) -> BoxResult<Vec<Row>>;

fn payload_json_len() -> usize {
    serde_json::to_vec(&email(1_234_567)).map_or(0, |v| v.len())
}

/// How big each row runs.
#[derive(Debug, Clone, Copy)]
struct Scale {
    quick: bool,
    steady_noop_tasks: u64,
    steady_busy_tasks: u64,
    steady_runs: usize,
    spill_tasks: u64,
    spill_runs: usize,
    durable_point: Duration,
    /// Runs of each end-to-end variant (write-ahead, on-shutdown), alternated; medians taken.
    end_to_end_runs: usize,
    shutdown_queued: u64,
    shutdown_runs: usize,
    memory_tasks: u64,
    pg_handoff_tasks: u64,
    pg_handoff_runs: usize,
    pg_pickups: usize,
    pg_table_period: Duration,
    pg_table_runs: usize,
}

impl Scale {
    const FULL: Self = Self {
        quick: false,
        steady_noop_tasks: 200_000,
        steady_busy_tasks: 40_000,
        steady_runs: 7,
        spill_tasks: 1_000_000,
        spill_runs: 5,
        durable_point: Duration::from_secs(2),
        end_to_end_runs: 3,
        shutdown_queued: 100_000,
        shutdown_runs: 5,
        memory_tasks: 1_000_000,
        pg_handoff_tasks: 100_000,
        pg_handoff_runs: 3,
        pg_pickups: 30,
        // The 2 workers drain what 1 s of submits committed in about 6 s.
        pg_table_period: Duration::from_secs(1),
        pg_table_runs: 3,
    };

    const QUICK: Self = Self {
        quick: true,
        steady_noop_tasks: 2_000,
        steady_busy_tasks: 400,
        steady_runs: 1,
        spill_tasks: 10_000,
        spill_runs: 1,
        durable_point: Duration::from_millis(100),
        end_to_end_runs: 1,
        shutdown_queued: 1_000,
        shutdown_runs: 1,
        memory_tasks: 10_000,
        pg_handoff_tasks: 1_000,
        pg_handoff_runs: 1,
        pg_pickups: 3,
        pg_table_period: Duration::from_millis(100),
        pg_table_runs: 1,
    };
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("--child-shutdown") => child_shutdown(&args[1..]),
        Some("--child-memory") => child_memory(&args[1..]),
        _ => compare(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("compare: {error}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The table.

/// One line of the table.
#[derive(Debug)]
struct Row {
    name: String,
    /// What the drainpool figure measures.
    unit: &'static str,
    drainpool: Option<f64>,
    drainpool_text: String,
    baseline: Option<f64>,
    baseline_text: String,
    ratio: Option<f64>,
    goal: String,
    met: Option<bool>,
    detail: Value,
}

impl Row {
    fn verdict(&self) -> &'static str {
        match (self.met, self.drainpool) {
            (Some(true), _) => "met",
            (Some(false), _) => "MISSED",
            (None, Some(_)) => "no goal",
            (None, None) if self.baseline.is_some() => "baseline only",
            (None, None) => "not measured",
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "row": self.name,
            "unit": self.unit,
            "drainpool": self.drainpool,
            "drainpool_text": self.drainpool_text,
            "baseline": self.baseline,
            "baseline_text": self.baseline_text,
            "ratio": self.ratio,
            "goal": self.goal,
            "met": self.met,
            "detail": self.detail,
        })
    }
}

fn print_table(rows: &[Row]) {
    let header = ["row", "drainpool", "baseline", "ratio", "goal", "result"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.drainpool_text.clone(),
                r.baseline_text.clone(),
                r.ratio
                    .map_or_else(|| "—".to_owned(), |x| format!("{x:.2}")),
                r.goal.clone(),
                r.verdict().to_owned(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::from("|");
        for (cell, w) in cells.iter().zip(widths) {
            let pad = w - cell.chars().count();
            out.push(' ');
            out.push_str(cell);
            out.push_str(&" ".repeat(pad));
            out.push_str(" |");
        }
        out
    };
    println!("{}", line(&header.map(str::to_owned)));
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    println!("{}", line(&rule));
    for row in &cells {
        println!("{}", line(row));
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn rate_text(per_sec: f64) -> String {
    if per_sec >= 1e6 {
        format!("{:.2} M/s", per_sec / 1e6)
    } else if per_sec >= 1e3 {
        format!("{:.1} k/s", per_sec / 1e3)
    } else {
        format!("{per_sec:.0}/s")
    }
}

/// `1000000` as `1,000,000`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn secs_text(secs: f64) -> String {
    if secs >= 1.0 {
        format!("{secs:.2} s")
    } else {
        format!("{:.1} ms", secs * 1e3)
    }
}

/// Where the benches keep their files: `target/bench/`, found from this executable's path
/// (`target/<profile>/deps/compare-…`), so it follows `CARGO_TARGET_DIR`; failing that, the
/// workspace's `target/` (this package lives in `benches/`, one level below the root).
fn bench_dir() -> BoxResult<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "deps"))
        .and_then(|deps| deps.parent()?.parent())
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
            Path::to_path_buf,
        );
    let dir = target.join("bench");
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn fresh_dir(path: &Path) -> BoxResult<PathBuf> {
    match fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    Ok(path.to_path_buf())
}

fn runtime() -> BoxResult<Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Nanoseconds since the Unix epoch (CLOCK_REALTIME), comparable across processes.
fn realtime_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Today's date (UTC) as `YYYY-MM-DD`.
fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn compare(args: &[String]) -> BoxResult<()> {
    let started = Instant::now();
    let scale = if args.iter().any(|a| a == "--bench") {
        Scale::FULL
    } else {
        Scale::QUICK
    };
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(str::to_owned).collect());
    let wants = |row: &str| only.as_ref().is_none_or(|o| o.iter().any(|r| r == row));
    let dir = bench_dir()?;
    let json_len = payload_json_len();
    eprintln!(
        "compare: {} run, files under {}, payload {json_len} bytes of JSON",
        if scale.quick { "quick (smoke)" } else { "full" },
        dir.display()
    );

    let mut rows = Vec::new();
    let mut timings = serde_json::Map::new();
    let mut timed =
        |name: &str, rows: &mut Vec<Row>, f: &mut dyn FnMut() -> BoxResult<Vec<Row>>| {
            let t = Instant::now();
            eprintln!("compare: {name}…");
            let new = f()?;
            let secs = t.elapsed().as_secs_f64();
            eprintln!("compare: {name} took {secs:.1} s");
            timings.insert(name.to_owned(), json!(secs));
            rows.extend(new);
            Ok::<(), Box<dyn Error>>(())
        };
    if wants("steady") {
        timed("steady", &mut rows, &mut || steady_rows(&dir, scale))?;
    }
    if wants("priority") {
        timed("priority", &mut rows, &mut || priority_rows(&dir, scale))?;
    }
    if wants("spill") {
        timed("spill", &mut rows, &mut || spill_rows(&dir, scale))?;
    }
    if wants("reserve") {
        timed("reserve", &mut rows, &mut || reserve_rows(&dir, scale))?;
    }
    if wants("durable") {
        timed("durable", &mut rows, &mut || durable_rows(&dir, scale))?;
    }
    if wants("shutdown") {
        timed("shutdown", &mut rows, &mut || shutdown_rows(&dir, scale))?;
    }
    if wants("memory") {
        timed("memory", &mut rows, &mut || {
            memory_rows(&dir, scale, json_len)
        })?;
    }
    let pg_rows: [(&str, &str, PgRows<'_>); 3] = [
        (
            "handoff",
            "handoff of queued tasks at shutdown, committed",
            &|dir, scale, url| postgres::handoff_rows(dir, scale, url),
        ),
        (
            "pickup",
            "pickup: a replica starts a task another handed off",
            &|dir, scale, url| postgres::pickup_rows(dir, scale, url),
        ),
        (
            "pgwrite",
            "PostgreSQL write-ahead end to end, against a hand-written task table",
            &|dir, scale, url| postgres::table_rows(dir, scale, url),
        ),
    ];
    if pg_rows.iter().any(|(key, _, _)| wants(key)) {
        let database = postgres::database(&runtime()?);
        for (key, name, rows_of) in pg_rows {
            if !wants(key) {
                continue;
            }
            match &database {
                Ok(url) => timed(key, &mut rows, &mut || rows_of(&dir, scale, url))?,
                Err(reason) => rows.push(postgres::skipped(name, reason)),
            }
        }
    }

    let wall = started.elapsed().as_secs_f64();
    println!();
    println!(
        "drainpool compare — {} — {} CPUs — payload {json_len} B JSON — {}",
        today(),
        std::thread::available_parallelism().map_or(0, usize::from),
        if scale.quick {
            "QUICK smoke run, figures not meaningful"
        } else {
            "medians of several runs"
        }
    );
    println!();
    print_table(&rows);
    println!();
    println!("bench run took {wall:.1} s");

    let report = json!({
        "command": "cargo bench -p drainpool-benches --bench compare",
        "date": today(),
        "quick": scale.quick,
        "only": only,
        "cpus": std::thread::available_parallelism().map_or(0, usize::from),
        "payload_json_bytes": json_len,
        "wall_seconds": wall,
        "section_seconds": timings,
        "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
    });
    let name = if scale.quick {
        "compare-quick.json"
    } else if only.is_some() {
        "compare-partial.json"
    } else {
        "compare.json"
    };
    let path = dir.join(name);
    fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Steady state: tasks/s through a pool, against two hand-written tokio pools.

/// What a handler does with a task.
#[derive(Debug, Clone, Copy)]
enum Work {
    Noop,
    /// Spins for this long: CPU work the size of a small real handler.
    Spin(Duration),
}

impl Work {
    fn run(self, payload: &Email) {
        black_box(payload);
        if let Work::Spin(d) = self {
            let t = Instant::now();
            while t.elapsed() < d {
                std::hint::spin_loop();
            }
        }
    }
}

/// Counts finished tasks down to zero and wakes the producer then.
#[derive(Debug)]
struct Done {
    left: AtomicU64,
    notify: Notify,
}

impl Done {
    fn new(tasks: u64) -> Arc<Self> {
        Arc::new(Self {
            left: AtomicU64::new(tasks),
            notify: Notify::new(),
        })
    }

    fn tick(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.notify.notify_one();
        }
    }

    async fn wait(&self) {
        // notify_one stores a permit if nobody waits yet.
        self.notify.notified().await;
    }
}

const STEADY_WORKERS: usize = 2;
const STEADY_QUEUE: usize = 1024;

/// One steady-state run: tasks per second, and the CPU time the producing thread spent per
/// task while it submitted (NaN where the thread's CPU time cannot be read).
struct Steady {
    rate: f64,
    producer_ns: f64,
}

impl Steady {
    fn new(tasks: usize, secs: f64, producer: Option<u64>) -> Self {
        Self {
            rate: tasks as f64 / secs,
            producer_ns: producer.map_or(f64::NAN, |ns| ns as f64 / tasks as f64),
        }
    }
}

/// This thread's CPU time so far, in nanoseconds (Linux: `/proc/thread-self/schedstat`).
fn thread_cpu_ns() -> Option<u64> {
    let stat = fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

/// The CPU time this thread spent since `since` (a [`thread_cpu_ns`] reading).
fn thread_cpu_since(since: Option<u64>) -> Option<u64> {
    Some(thread_cpu_ns()?.saturating_sub(since?))
}

/// drainpool's steady rate: with `levels` above 1, task `i` is submitted at priority
/// `i % levels` through `Pool::task` (what the priority lanes cost against the plain queue).
async fn steady_drainpool(
    dir: &Path,
    payloads: Vec<Email>,
    work: Work,
    levels: u8,
) -> BoxResult<Steady> {
    let done = Done::new(payloads.len() as u64);
    let handler_done = Arc::clone(&done);
    let pool = Pool::builder()
        .workers(STEADY_WORKERS)
        .queue_capacity(STEADY_QUEUE)
        .journal_dir(fresh_dir(dir)?)
        .start(move |task: Task<Email>| {
            let done = Arc::clone(&handler_done);
            async move {
                work.run(task.payload());
                done.tick();
                Ok::<(), Infallible>(())
            }
        })
        .await?;
    let n = payloads.len();
    let t = Instant::now();
    let cpu = thread_cpu_ns();
    for (i, payload) in payloads.into_iter().enumerate() {
        let submitted = if levels > 1 {
            let level = (i % usize::from(levels)) as u8;
            pool.task(payload).priority(level).submit().await
        } else {
            pool.submit(payload).await
        };
        submitted.map_err(|e| format!("submit: {e}"))?;
    }
    let producer = thread_cpu_since(cpu);
    done.wait().await;
    let secs = t.elapsed().as_secs_f64();
    let report = pool.shutdown().await?;
    if !report.is_clean() || report.completed as usize != n {
        return Err(format!("steady run not clean: {report:?}").into());
    }
    Ok(Steady::new(n, secs, producer))
}

/// Baseline 1: workers sharing one mpsc receiver behind a mutex.
async fn steady_shared_receiver(payloads: Vec<Email>, work: Work) -> BoxResult<Steady> {
    let done = Done::new(payloads.len() as u64);
    let (tx, rx) = mpsc::channel::<Email>(STEADY_QUEUE);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let workers: Vec<_> = (0..STEADY_WORKERS)
        .map(|_| {
            let rx = Arc::clone(&rx);
            let done = Arc::clone(&done);
            tokio::spawn(async move {
                loop {
                    let job = rx.lock().await.recv().await;
                    let Some(job) = job else { break };
                    handle(job, work, &done).await;
                }
            })
        })
        .collect();
    let n = payloads.len();
    let t = Instant::now();
    let cpu = thread_cpu_ns();
    for payload in payloads {
        tx.send(payload).await.map_err(|_| "worker gone")?;
    }
    let producer = thread_cpu_since(cpu);
    done.wait().await;
    let secs = t.elapsed().as_secs_f64();
    drop(tx);
    for worker in workers {
        worker.await?;
    }
    Ok(Steady::new(n, secs, producer))
}

/// Baseline 2: one dispatcher round-robining to per-worker channels.
async fn steady_dispatcher(payloads: Vec<Email>, work: Work) -> BoxResult<Steady> {
    let done = Done::new(payloads.len() as u64);
    let (tx, mut rx) = mpsc::channel::<Email>(STEADY_QUEUE);
    let mut senders = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..STEADY_WORKERS {
        let (wtx, mut wrx) = mpsc::channel::<Email>(STEADY_QUEUE / STEADY_WORKERS);
        senders.push(wtx);
        let done = Arc::clone(&done);
        workers.push(tokio::spawn(async move {
            while let Some(job) = wrx.recv().await {
                handle(job, work, &done).await;
            }
        }));
    }
    let dispatcher = tokio::spawn(async move {
        let mut next = 0;
        while let Some(job) = rx.recv().await {
            if senders[next].send(job).await.is_err() {
                break;
            }
            next = (next + 1) % senders.len();
        }
    });
    let n = payloads.len();
    let t = Instant::now();
    let cpu = thread_cpu_ns();
    for payload in payloads {
        tx.send(payload).await.map_err(|_| "dispatcher gone")?;
    }
    let producer = thread_cpu_since(cpu);
    done.wait().await;
    let secs = t.elapsed().as_secs_f64();
    drop(tx);
    dispatcher.await?;
    for worker in workers {
        worker.await?;
    }
    Ok(Steady::new(n, secs, producer))
}

async fn handle(job: Email, work: Work, done: &Done) {
    // The same shape as a pool handler: an async fn over the payload.
    async { work.run(&job) }.await;
    done.tick();
}

fn steady_rows(dir: &Path, scale: Scale) -> BoxResult<Vec<Row>> {
    let rt = runtime()?;
    let journal = dir.join("steady-journal");
    let cases = [
        ("no-op handler", Work::Noop, scale.steady_noop_tasks),
        (
            "~10 µs handler",
            Work::Spin(Duration::from_micros(10)),
            scale.steady_busy_tasks,
        ),
    ];
    let mut rows = Vec::new();
    for (label, work, tasks) in cases {
        // [drainpool, shared receiver, dispatcher], one list of tasks/s per variant, and of
        // the producing thread's CPU time a task.
        let mut rates: [Vec<f64>; 3] = Default::default();
        let mut producer: [Vec<f64>; 3] = Default::default();
        for run in 0..scale.steady_runs {
            // Rotate the order each run, so no variant always goes first.
            for k in 0..3 {
                let variant = (run + k) % 3;
                let payloads: Vec<Email> = (0..tasks).map(email).collect();
                let run = rt.block_on(async {
                    match variant {
                        0 => steady_drainpool(&journal, payloads, work, 1).await,
                        1 => steady_shared_receiver(payloads, work).await,
                        _ => steady_dispatcher(payloads, work).await,
                    }
                })?;
                rates[variant].push(run.rate);
                producer[variant].push(run.producer_ns);
            }
        }
        let [dp, shared, dispatch] = [0, 1, 2].map(|v| median(&rates[v]));
        let [dp_ns, shared_ns, dispatch_ns] = [0, 1, 2].map(|v| median(&producer[v]));
        let (baseline, baseline_name, baseline_ns) = if shared >= dispatch {
            (shared, "shared receiver", shared_ns)
        } else {
            (dispatch, "dispatcher", dispatch_ns)
        };
        let ratio = dp / baseline;
        // The one producer's own CPU time a task: what sets the no-op row's pace.
        let (dp_text, baseline_text) = if dp_ns.is_nan() || baseline_ns.is_nan() {
            (
                rate_text(dp),
                format!("{} ({baseline_name})", rate_text(baseline)),
            )
        } else {
            (
                format!(
                    "{} (producer: {dp_ns:.0} ns of CPU a submit)",
                    rate_text(dp)
                ),
                format!(
                    "{} ({baseline_name}; producer: {baseline_ns:.0} ns a send)",
                    rate_text(baseline)
                ),
            )
        };
        rows.push(Row {
            name: format!("steady state, {label}"),
            unit: "tasks/s",
            drainpool: Some(dp),
            drainpool_text: dp_text,
            baseline: Some(baseline),
            baseline_text,
            ratio: Some(ratio),
            goal: "ratio ≥ 0.90".to_owned(),
            met: Some(ratio >= 0.90),
            detail: json!({
                "tasks_per_run": tasks,
                "workers": STEADY_WORKERS,
                "queue_capacity": STEADY_QUEUE,
                "drainpool_runs": rates[0],
                "shared_receiver_runs": rates[1],
                "dispatcher_runs": rates[2],
                "shared_receiver_median": shared,
                "dispatcher_median": dispatch,
                "drainpool_producer_ns_runs": producer[0],
                "shared_receiver_producer_ns_runs": producer[1],
                "dispatcher_producer_ns_runs": producer[2],
            }),
        });
    }
    let _ = fs::remove_dir_all(&journal);
    Ok(rows)
}

/// The steady no-op row with 8 priority levels in use, against the faster hand-written pool
/// and, in the detail, drainpool without priorities, interleaved in the same runs.
fn priority_rows(dir: &Path, scale: Scale) -> BoxResult<Vec<Row>> {
    const LEVELS: u8 = 8;
    let rt = runtime()?;
    let journal = dir.join("priority-journal");
    let tasks = scale.steady_noop_tasks;
    // [8 levels, plain, shared receiver, dispatcher]
    let mut rates: [Vec<f64>; 4] = Default::default();
    for run in 0..scale.steady_runs {
        for k in 0..4 {
            let variant = (run + k) % 4;
            let payloads: Vec<Email> = (0..tasks).map(email).collect();
            let run = rt.block_on(async {
                match variant {
                    0 => steady_drainpool(&journal, payloads, Work::Noop, LEVELS).await,
                    1 => steady_drainpool(&journal, payloads, Work::Noop, 1).await,
                    2 => steady_shared_receiver(payloads, Work::Noop).await,
                    _ => steady_dispatcher(payloads, Work::Noop).await,
                }
            })?;
            rates[variant].push(run.rate);
        }
    }
    let [levels, plain, shared, dispatch] = [0, 1, 2, 3].map(|v| median(&rates[v]));
    let (baseline, baseline_name) = if shared >= dispatch {
        (shared, "shared receiver")
    } else {
        (dispatch, "dispatcher")
    };
    let _ = fs::remove_dir_all(&journal);
    Ok(vec![Row {
        name: format!("steady state, no-op handler, {LEVELS} priority levels in use"),
        unit: "tasks/s",
        drainpool: Some(levels),
        drainpool_text: format!(
            "{} (without priorities: {}, {:.2}×)",
            rate_text(levels),
            rate_text(plain),
            levels / plain
        ),
        baseline: Some(baseline),
        baseline_text: format!("{} ({baseline_name})", rate_text(baseline)),
        ratio: Some(levels / baseline),
        goal: "— (reported)".to_owned(),
        met: None,
        detail: json!({
            "tasks_per_run": tasks,
            "levels": LEVELS,
            "levels_runs": rates[0],
            "plain_runs": rates[1],
            "shared_receiver_runs": rates[2],
            "dispatcher_runs": rates[3],
            "plain_median": plain,
        }),
    }])
}

// ---------------------------------------------------------------------------------------------
// The spill reserve's cost: submits into a growing queue, with and without it.

/// Submits `payloads` to a pool with no worker (its runner is never run), so the queue and the
/// spill reserve grow with every task; returns submits per second. The shutdown then spills
/// them (not timed).
async fn submit_growing(dir: &Path, payloads: Vec<Email>, reserve: bool) -> BoxResult<f64> {
    let n = payloads.len();
    let (pool, runner) = Pool::builder()
        .queue_capacity(n)
        .spill_reserve(reserve)
        .journal_dir(fresh_dir(dir)?)
        .build()
        .await?;
    drop(runner);
    let t = Instant::now();
    for payload in payloads {
        pool.submit(payload)
            .await
            .map_err(|e| format!("submit: {e}"))?;
    }
    let secs = t.elapsed().as_secs_f64();
    let report = pool.shutdown().await?;
    if !report.is_clean() || report.spilled as usize != n {
        return Err(format!("reserve run not clean: {report:?}").into());
    }
    Ok(n as f64 / secs)
}

fn reserve_rows(dir: &Path, scale: Scale) -> BoxResult<Vec<Row>> {
    let rt = runtime()?;
    let journal = dir.join("reserve-journal");
    let n = scale.spill_tasks;
    // [with the reserve, without], submits per second per run, alternating which goes first.
    let mut rates: [Vec<f64>; 2] = Default::default();
    for run in 0..scale.spill_runs {
        for k in 0..2 {
            let variant = (run + k) % 2;
            let payloads: Vec<Email> = (0..n).map(email).collect();
            let rate = rt.block_on(submit_growing(&journal, payloads, variant == 0))?;
            rates[variant].push(rate);
        }
    }
    let _ = fs::remove_dir_all(&journal);
    let [on, off] = [0, 1].map(|v| median(&rates[v]));
    let ratio = on / off;
    Ok(vec![Row {
        name: format!("submit into a growing queue ({n} tasks), spill reserve on"),
        unit: "tasks/s",
        drainpool: Some(on),
        drainpool_text: rate_text(on),
        baseline: Some(off),
        baseline_text: format!("{} (reserve off)", rate_text(off)),
        ratio: Some(ratio),
        goal: "— (reported)".to_owned(),
        met: None,
        detail: json!({
            "tasks_per_run": n,
            "reserve_on_runs": rates[0],
            "reserve_off_runs": rates[1],
        }),
    }])
}

// ---------------------------------------------------------------------------------------------
// Spill and reload of a big queue.

/// A pool of one worker whose handler waits for the drain deadline, so nothing completes
/// before shutdown (the one task in flight returns `Ok` when its token fires).
async fn blocked_pool(dir: &Path, capacity: usize) -> BoxResult<Pool<Email>> {
    blocked_pool_noting(dir, capacity, Arc::default()).await
}

/// [`blocked_pool`], its handler noting in `first` when the first task started.
async fn blocked_pool_noting(
    dir: &Path,
    capacity: usize,
    first: Arc<OnceLock<Instant>>,
) -> BoxResult<Pool<Email>> {
    Ok(Pool::builder()
        .workers(1)
        .queue_capacity(capacity)
        .journal_dir(dir)
        .start(move |task: Task<Email>| {
            first.get_or_init(Instant::now);
            async move {
                task.cancelled().await;
                Ok::<(), Infallible>(())
            }
        })
        .await?)
}

/// Empties the page cache: `sync`, then `3` into `/proc/sys/vm/drop_caches` (root only, and
/// not in every container); the reason when it cannot.
fn drop_caches() -> Result<(), String> {
    Command::new("sync")
        .status()
        .map_err(|e| format!("cannot run sync: {e}"))?;
    fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| format!("cannot write /proc/sys/vm/drop_caches: {e}"))
}

/// Starts a pool on `journal`, which holds `n` queued tasks; returns the seconds from the
/// `start` call to its `Ok` and to the first replayed task starting in the handler, and how
/// many tasks its shutdown spilled back.
fn reload_once(rt: &Runtime, journal: &Path, n: u64) -> BoxResult<(f64, f64, u64)> {
    rt.block_on(async {
        let first = Arc::new(OnceLock::new());
        let t = Instant::now();
        let pool = blocked_pool_noting(journal, 16, Arc::clone(&first)).await?;
        let wall = t.elapsed().as_secs_f64();
        let replayed = pool.recovery().replayed;
        if replayed != n {
            return Err(format!("reload replayed {replayed}, expected {n}").into());
        }
        let started = loop {
            if let Some(at) = first.get() {
                break *at;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        pool.shutdown_now();
        let report = pool.wait().await?;
        Ok((
            wall,
            started.duration_since(t).as_secs_f64(),
            report.spilled,
        ))
    })
}

/// Reads a file of JSON lines and parses every payload; returns the seconds it took.
fn read_and_parse(jsonl: &Path, n: u64) -> BoxResult<f64> {
    let t = Instant::now();
    let bytes = fs::read(jsonl)?;
    let parsed: Vec<Email> = bytes
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(serde_json::from_slice)
        .collect::<Result<_, _>>()?;
    let secs = t.elapsed().as_secs_f64();
    if parsed.len() as u64 != n {
        return Err("baseline parsed the wrong number of payloads".into());
    }
    drop(parsed);
    Ok(secs)
}

async fn until_in_flight(pool: &Pool<Email>, n: usize) {
    while pool.stats().in_flight < n as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Bytes of the live segments in a journal directory.
fn segment_bytes(dir: &Path) -> BoxResult<(u64, Vec<PathBuf>)> {
    let mut total = 0;
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".seg") && !name.starts_with("dead-") {
            total += entry.metadata()?.len();
            files.push(entry.path());
        }
    }
    files.sort();
    Ok((total, files))
}

#[derive(Debug)]
struct SpillRun {
    spill_wall: f64,
    spill_report_write: f64,
    spill_report_sync: f64,
    spill_baseline: f64,
    journal_bytes: u64,
    reload: ReloadRun,
    jsonl_bytes: u64,
    /// The reload and its baseline from a cold page cache, or why the cache could not be
    /// dropped.
    cold: Result<ReloadRun, String>,
}

impl Default for SpillRun {
    fn default() -> Self {
        Self {
            spill_wall: 0.0,
            spill_report_write: 0.0,
            spill_report_sync: 0.0,
            spill_baseline: 0.0,
            journal_bytes: 0,
            reload: ReloadRun::default(),
            jsonl_bytes: 0,
            cold: Err("not run".to_owned()),
        }
    }
}

/// A reload and its baseline, in seconds.
#[derive(Debug, Clone, Copy, Default)]
struct ReloadRun {
    /// `start()` to `Ok`.
    wall: f64,
    /// `start()` to the first replayed task starting in the handler.
    first_task: f64,
    /// Read and parse the same payloads as JSON lines.
    baseline: f64,
}

fn spill_once(rt: &Runtime, dir: &Path, scale: Scale) -> BoxResult<SpillRun> {
    let n = scale.spill_tasks;
    let journal = fresh_dir(&dir.join("spill-journal"))?;
    let mut run = SpillRun::default();

    // Spill: n tasks queued behind one in flight, then shutdown_now.
    rt.block_on(async {
        let pool = blocked_pool(&journal, n as usize + 16).await?;
        for i in 0..=n {
            pool.submit(email(i))
                .await
                .map_err(|e| format!("submit: {e}"))?;
        }
        until_in_flight(&pool, 1).await;
        let t = Instant::now();
        pool.shutdown_now();
        let report = pool.wait().await?;
        run.spill_wall = t.elapsed().as_secs_f64();
        run.spill_report_write = report.spill_time.as_secs_f64();
        run.spill_report_sync = report.sync_time.as_secs_f64();
        if !report.is_clean() || report.spilled != n {
            return Err(format!("spill of {n} not clean: {report:?}").into());
        }
        Ok::<(), Box<dyn Error>>(())
    })?;
    let (bytes, files) = segment_bytes(&journal)?;
    run.journal_bytes = bytes;

    // Its baseline: the same bytes, one write and one fsync into a new file.
    let mut data = Vec::with_capacity(bytes as usize);
    for file in &files {
        data.extend_from_slice(&fs::read(file)?);
    }
    let copy = dir.join("spill-baseline.bin");
    let _ = fs::remove_file(&copy);
    let t = Instant::now();
    let mut file = File::create(&copy)?;
    file.write_all(&data)?;
    file.sync_data()?;
    run.spill_baseline = t.elapsed().as_secs_f64();
    drop(file);
    drop(data);
    fs::remove_file(&copy)?;

    // Reload: start a pool on that journal. Its shutdown spills the tasks back (but the one
    // in flight, which completes), so the same journal is reloaded again from a cold page
    // cache.
    let (wall, first_task, left) = reload_once(rt, &journal, n)?;
    run.reload.wall = wall;
    run.reload.first_task = first_task;
    // A smoke run leaves the machine's page cache alone.
    let dropped = if scale.quick {
        Err("quick run: the page cache is left alone".to_owned())
    } else {
        drop_caches()
    };
    run.cold = match dropped {
        Ok(()) => {
            let (wall, first_task, _) = reload_once(rt, &journal, left)?;
            Ok(ReloadRun {
                wall,
                first_task,
                baseline: 0.0,
            })
        }
        Err(reason) => Err(reason),
    };

    // Its baseline: read a file of the same payloads as JSON lines and parse them all; then
    // again from a cold page cache.
    let jsonl = dir.join("reload-baseline.jsonl");
    {
        let mut out = std::io::BufWriter::new(File::create(&jsonl)?);
        for i in 0..n {
            serde_json::to_writer(&mut out, &email(i))?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
    }
    run.jsonl_bytes = fs::metadata(&jsonl)?.len();
    run.reload.baseline = read_and_parse(&jsonl, n)?;
    if let Ok(cold) = &mut run.cold {
        drop_caches()?;
        cold.baseline = read_and_parse(&jsonl, n)?;
    }
    fs::remove_file(&jsonl)?;
    fs::remove_dir_all(&journal)?;
    Ok(run)
}

fn spill_rows(dir: &Path, scale: Scale) -> BoxResult<Vec<Row>> {
    let rt = runtime()?;
    let n = scale.spill_tasks;
    let mut runs = Vec::new();
    for _ in 0..scale.spill_runs {
        runs.push(spill_once(&rt, dir, scale)?);
    }
    let pick = |f: fn(&SpillRun) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let spill = pick(|r| r.spill_wall);
    let write = pick(|r| r.spill_report_write);
    let sync = pick(|r| r.spill_report_sync);
    let spill_base = pick(|r| r.spill_baseline);
    let bytes = runs.last().map_or(0, |r| r.journal_bytes);
    let jsonl = runs.last().map_or(0, |r| r.jsonl_bytes);
    let all = |f: fn(&SpillRun) -> f64| runs.iter().map(f).collect::<Vec<_>>();
    let spill_ratio = spill / spill_base;
    Ok(vec![
        Row {
            name: format!("spill {} queued tasks", thousands(n)),
            unit: "seconds, shutdown_now() to report",
            drainpool: Some(spill),
            drainpool_text: format!(
                "{} (report: write {}, fsync {})",
                secs_text(spill),
                secs_text(write),
                secs_text(sync)
            ),
            baseline: Some(spill_base),
            baseline_text: format!(
                "{} (write+fsync {:.0} MB)",
                secs_text(spill_base),
                bytes as f64 / 1e6
            ),
            ratio: Some(spill_ratio),
            goal: "≤ 2.0×".to_owned(),
            met: Some(spill_ratio <= 2.0),
            detail: json!({
                "tasks": n,
                "journal_bytes": bytes,
                "wall_runs": all(|r| r.spill_wall),
                "report_write_runs": all(|r| r.spill_report_write),
                "report_sync_runs": all(|r| r.spill_report_sync),
                "report_write_plus_sync": write + sync,
                "ratio_report_write_plus_sync": (write + sync) / spill_base,
                "baseline_runs": all(|r| r.spill_baseline),
            }),
        },
        reload_row(
            format!("reload {} tasks", thousands(n)),
            &runs.iter().map(|r| r.reload).collect::<Vec<_>>(),
            (n, bytes, jsonl),
            Some(1.5),
        ),
        {
            let name = format!("reload {} tasks, cold page cache", thousands(n));
            match runs
                .iter()
                .map(|r| r.cold.clone())
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(cold) => reload_row(name, &cold, (n, bytes, jsonl), None),
                Err(reason) => skipped_row(name, &reason),
            }
        },
    ])
}

/// A reload row: the medians of `runs` (a reload of `n` tasks from the journal of `bytes`,
/// against reading and parsing `jsonl` bytes of JSON lines), and the goal for their ratio, if
/// it has one.
fn reload_row(
    name: String,
    runs: &[ReloadRun],
    (n, bytes, jsonl): (u64, u64, u64),
    goal: Option<f64>,
) -> Row {
    let all = |f: fn(&ReloadRun) -> f64| runs.iter().map(f).collect::<Vec<_>>();
    let (wall, first_task, base) = (
        median(&all(|r| r.wall)),
        median(&all(|r| r.first_task)),
        median(&all(|r| r.baseline)),
    );
    let ratio = wall / base;
    Row {
        unit: "seconds, start() to Ok; first task: start() to the first replayed task in the handler",
        drainpool: Some(wall),
        drainpool_text: format!("{} (first task {})", secs_text(wall), secs_text(first_task)),
        baseline: Some(base),
        baseline_text: format!(
            "{} (read+parse {:.0} MB JSONL)",
            secs_text(base),
            jsonl as f64 / 1e6
        ),
        ratio: Some(ratio),
        goal: goal.map_or_else(|| "—".to_owned(), |g| format!("≤ {g:.1}×")),
        met: goal.map(|g| ratio <= g),
        detail: json!({
            "tasks": n,
            "journal_bytes": bytes,
            "jsonl_bytes": jsonl,
            "wall_runs": all(|r| r.wall),
            "first_task_runs": all(|r| r.first_task),
            "baseline_runs": all(|r| r.baseline),
        }),
        name,
    }
}

/// A row that could not be measured, saying why.
fn skipped_row(name: String, reason: &str) -> Row {
    eprintln!("compare: {name}: skipped: {reason}");
    Row {
        name,
        unit: "—",
        drainpool: None,
        drainpool_text: format!("skipped: {reason}"),
        baseline: None,
        baseline_text: "—".to_owned(),
        ratio: None,
        goal: "—".to_owned(),
        met: None,
        detail: json!({ "skipped": reason }),
    }
}

// ---------------------------------------------------------------------------------------------
// Durable submit: drainpool's WriteAhead mode does not exist yet; its baselines do.

/// Writes of 128 bytes, each followed by fdatasync, for `period`; returns fsyncs per second.
/// `append`: each write extends the file (as a journal segment grows), so every fdatasync also
/// commits the new size; otherwise the writes cycle through a preallocated 1 MiB (as SQLite
/// reuses its WAL file), so an fdatasync only flushes data.
fn fsync_rate(dir: &Path, period: Duration, append: bool) -> BoxResult<f64> {
    use std::os::unix::fs::FileExt;
    const AREA: u64 = 1 << 20;
    let path = dir.join("fsync-rate.bin");
    let _ = fs::remove_file(&path);
    let file = File::create(&path)?;
    if !append {
        file.write_all_at(&vec![0u8; AREA as usize], 0)?;
        file.sync_all()?;
    }
    let record = [0x5au8; 128];
    let mut offset = 0u64;
    let mut count = 0u64;
    let t = Instant::now();
    while t.elapsed() < period {
        file.write_all_at(&record, offset)?;
        file.sync_data()?;
        offset += record.len() as u64;
        if !append && offset >= AREA {
            offset = 0;
        }
        count += 1;
    }
    let rate = count as f64 / t.elapsed().as_secs_f64();
    drop(file);
    fs::remove_file(&path)?;
    Ok(rate)
}

fn sqlite_open(path: &Path) -> BoxResult<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("SQLite refused WAL mode: {mode}").into());
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

/// One task, as a SQLite-backed queue does it: a committed insert at submit, a committed
/// update at completion.
fn sqlite_task(conn: &Mutex<rusqlite::Connection>, payload: &str) -> BoxResult<()> {
    let id = {
        let conn = conn.lock().map_err(|_| "poisoned")?;
        conn.prepare_cached("INSERT INTO tasks (payload, state) VALUES (?1, 0)")?
            .execute([payload])?;
        conn.last_insert_rowid()
    };
    let conn = conn.lock().map_err(|_| "poisoned")?;
    conn.prepare_cached("UPDATE tasks SET state = 1 WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

/// SQLite tasks/s with `submitters` threads for `period`: either one connection behind a
/// mutex, or a connection per thread.
fn sqlite_rate(dir: &Path, submitters: usize, period: Duration, shared: bool) -> BoxResult<f64> {
    let path = dir.join("sqlite-tasks.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let setup = sqlite_open(&path)?;
    setup.execute_batch(
        "CREATE TABLE tasks (id INTEGER PRIMARY KEY, payload TEXT NOT NULL, state INTEGER NOT NULL)",
    )?;
    let one = Arc::new(Mutex::new(setup));
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let failed: Mutex<Option<String>> = Mutex::new(None);
    let started = Instant::now();
    let counted = std::thread::scope(|s| {
        for t in 0..submitters {
            let (stop, done, failed, one, path) = (&stop, &done, &failed, &one, &path);
            s.spawn(move || {
                let conn = if shared {
                    Arc::clone(one)
                } else {
                    match sqlite_open(path) {
                        Ok(c) => Arc::new(Mutex::new(c)),
                        Err(e) => {
                            *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                            return;
                        }
                    }
                };
                let mut i = t as u64 * 1_000_000_000;
                while !stop.load(Ordering::Relaxed) {
                    let payload = serde_json::to_string(&email(i)).unwrap_or_default();
                    if let Err(e) = sqlite_task(&conn, &payload) {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                        return;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            });
        }
        std::thread::sleep(period);
        let counted = (done.load(Ordering::Relaxed), started.elapsed());
        stop.store(true, Ordering::Relaxed);
        counted
    });
    if let Some(error) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(format!("sqlite: {error}").into());
    }
    drop(one);
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(counted.0 as f64 / counted.1.as_secs_f64())
}

/// `submitters` concurrent submitters of distinct payloads into `pool` for `period`: the
/// tasks accepted, or the first refusal.
async fn submit_for(pool: &Pool<Email>, submitters: usize, period: Duration) -> BoxResult<u64> {
    let accepted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut lanes = tokio::task::JoinSet::new();
    for lane in 0..submitters as u64 {
        let (pool, accepted) = (pool.clone(), Arc::clone(&accepted));
        lanes.spawn(async move {
            let mut i = lane;
            while started.elapsed() < period {
                pool.submit(email(i)).await.map_err(|e| e.to_string())?;
                accepted.fetch_add(1, Ordering::Relaxed);
                i += submitters as u64;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(lane) = lanes.join_next().await {
        lane??;
    }
    Ok(accepted.load(Ordering::Relaxed))
}

/// A handler that does nothing with its task but count it in `completed`.
fn counting(
    completed: &Arc<AtomicU64>,
) -> impl Fn(Task<Email>) -> std::future::Ready<Result<(), Infallible>> + Send + Sync + 'static {
    let completed = Arc::clone(completed);
    move |task: Task<Email>| {
        black_box(task.payload());
        completed.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok(()))
    }
}

/// Write-ahead submits per second (`WriteAhead { sync: Always }`: each `submit` returns after
/// the fsync covering its record) with `submitters` concurrent submitters for `period`.
fn write_ahead_rate(dir: &Path, submitters: usize, period: Duration) -> BoxResult<f64> {
    let journal = fresh_dir(&dir.join("write-ahead"))?;
    let rt = runtime()?;
    rt.block_on(async {
        let pool = Pool::builder()
            .workers(2)
            .queue_capacity(submitters * 4 + 64)
            .durability(Durability::write_ahead(SyncPolicy::Always))
            .journal_dir(&journal)
            .start(|task: Task<Email>| async move {
                black_box(task.payload());
                Ok::<(), Infallible>(())
            })
            .await?;
        let started = Instant::now();
        let accepted = submit_for(&pool, submitters, period).await?;
        let rate = accepted as f64 / started.elapsed().as_secs_f64();
        let report = pool.shutdown().await?;
        if !report.is_clean() {
            return Err(format!("write-ahead run not clean: {report:?}").into());
        }
        Ok(rate)
    })
}

/// End to end, submit to completion: tasks/s through a pool of 2 workers (a handler that only
/// looks at the payload) with `durability`, `submitters` concurrent submitters for `period`,
/// until the last accepted task has run.
fn end_to_end_rate(
    dir: &Path,
    durability: Durability,
    submitters: usize,
    period: Duration,
) -> BoxResult<f64> {
    let journal = fresh_dir(&dir.join("end-to-end"))?;
    let rt = runtime()?;
    rt.block_on(async {
        let completed = Arc::new(AtomicU64::new(0));
        let pool = Pool::builder()
            .workers(2)
            .queue_capacity(submitters * 4 + 64)
            .durability(durability)
            .journal_dir(&journal)
            .start(counting(&completed))
            .await?;
        let started = Instant::now();
        let n = submit_for(&pool, submitters, period).await?;
        while completed.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        let report = pool.shutdown().await?;
        if !report.is_clean() || report.completed != n {
            return Err(format!("end-to-end run not clean: {report:?}").into());
        }
        Ok(rate)
    })
}

fn durable_rows(dir: &Path, scale: Scale) -> BoxResult<Vec<Row>> {
    let append_fsyncs = fsync_rate(dir, scale.durable_point, true)?;
    let overwrite_fsyncs = fsync_rate(dir, scale.durable_point, false)?;
    // The goal's "tasks per fsync" is held against the faster kind of fsync.
    let fsyncs = append_fsyncs.max(overwrite_fsyncs);
    let mut rows = Vec::new();
    for submitters in [1usize, 16, 256] {
        let shared = sqlite_rate(dir, submitters, scale.durable_point, true)?;
        let per_thread = if submitters > 1 {
            Some(sqlite_rate(dir, submitters, scale.durable_point, false)?)
        } else {
            None
        };
        let (best, how) = match per_thread {
            Some(p) if p > shared => (p, "connection per thread"),
            _ => (shared, "one connection, mutex"),
        };
        let drainpool = write_ahead_rate(dir, submitters, scale.durable_point)?;
        let ratio = drainpool / best;
        let per_fsync = drainpool / fsyncs;
        let (goal, met) = if submitters == 256 {
            (
                format!(
                    "≥ 25× SQLite (≥ {}) and ≥ 30 tasks/fsync (≥ {})",
                    rate_text(25.0 * best),
                    rate_text(30.0 * fsyncs)
                ),
                Some(ratio >= 25.0 && per_fsync >= 30.0),
            )
        } else {
            ("— (reported)".to_owned(), None)
        };
        rows.push(Row {
            name: format!(
                "durable submit, {submitters} submitter{}",
                if submitters == 1 { "" } else { "s" }
            ),
            unit: "tasks/s",
            drainpool: Some(drainpool),
            drainpool_text: format!(
                "{} (WriteAhead, sync Always; {per_fsync:.1} tasks per fsync)",
                rate_text(drainpool)
            ),
            baseline: Some(best),
            baseline_text: format!(
                "SQLite {} ({how}); fsync {} append, {} overwrite",
                rate_text(best),
                rate_text(append_fsyncs),
                rate_text(overwrite_fsyncs)
            ),
            ratio: Some(ratio),
            goal,
            met,
            detail: json!({
                "drainpool_tasks_per_sec": drainpool,
                "tasks_per_fsync": per_fsync,
                "submitters": submitters,
                "seconds_per_point": scale.durable_point.as_secs_f64(),
                "fsync_per_sec_append": append_fsyncs,
                "fsync_per_sec_overwrite": overwrite_fsyncs,
                "sqlite_one_connection_mutex": shared,
                "sqlite_connection_per_thread": per_thread,
                "sqlite_best": best,
                "needed_for_25x_sqlite": 25.0 * best,
                "needed_for_30_per_fsync": 30.0 * fsyncs,
            }),
        });
    }
    rows.extend(end_to_end_rows(dir, scale, fsyncs)?);
    Ok(rows)
}

/// End to end with 256 submitters and 2 workers: write-ahead (`Always`) against SQLite's full
/// cycle (a committed insert, then a committed update marking it done: the better of one
/// connection and one per thread), and against the same pool in the on-shutdown mode (the
/// price of durability). `fsyncs` is the faster fsync rate measured in this run: each
/// submitter waits for one fsync per task, so the write-ahead rate cannot pass `SUBMITTERS`
/// tasks per fsync, however little CPU a task took; the price row prints that ceiling.
fn end_to_end_rows(dir: &Path, scale: Scale, fsyncs: f64) -> BoxResult<Vec<Row>> {
    const SUBMITTERS: usize = 256;
    let period = scale.durable_point;
    let sqlite = sqlite_rate(dir, SUBMITTERS, period, true)?
        .max(sqlite_rate(dir, SUBMITTERS, period, false)?);
    // Alternated, each variant's median: one run of either swings with the machine's load.
    let (mut durable_runs, mut plain_runs) = (Vec::new(), Vec::new());
    for _ in 0..scale.end_to_end_runs {
        durable_runs.push(end_to_end_rate(
            dir,
            Durability::write_ahead(SyncPolicy::Always),
            SUBMITTERS,
            period,
        )?);
        plain_runs.push(end_to_end_rate(
            dir,
            Durability::on_shutdown(),
            SUBMITTERS,
            period,
        )?);
    }
    let (durable, plain) = (median(&durable_runs), median(&plain_runs));
    let versus_sqlite = durable / sqlite;
    let price = durable / plain;
    let ceiling = SUBMITTERS as f64 * fsyncs;
    let row = |name: String, baseline: f64, baseline_text: String, ratio: f64, goal: f64| Row {
        name,
        unit: "tasks/s, submit to completion",
        drainpool: Some(durable),
        drainpool_text: format!(
            "{} (WriteAhead, sync Always; {SUBMITTERS} submitters, 2 workers)",
            rate_text(durable)
        ),
        baseline: Some(baseline),
        baseline_text,
        ratio: Some(ratio),
        goal: format!("ratio ≥ {goal}"),
        met: Some(ratio >= goal),
        detail: json!({
            "write_ahead": durable,
            "on_shutdown": plain,
            "write_ahead_runs": durable_runs,
            "on_shutdown_runs": plain_runs,
            "sqlite_full_cycle": sqlite,
            "submitters": SUBMITTERS,
            "seconds": period.as_secs_f64(),
            "fsync_per_sec": fsyncs,
            "write_ahead_ceiling": ceiling,
            "price_ceiling": ceiling / plain,
        }),
    };
    Ok(vec![
        row(
            "durable end to end, 256 submitters, against SQLite".to_owned(),
            sqlite,
            format!("SQLite {} (insert, then update as done)", rate_text(sqlite)),
            versus_sqlite,
            50.0,
        ),
        row(
            "durability's price, 256 submitters".to_owned(),
            plain,
            format!(
                "{} (the same pool, OnShutdown); ceiling at {} fsyncs: {} (ratio {:.2})",
                rate_text(plain),
                rate_text(fsyncs),
                rate_text(ceiling),
                ceiling / plain
            ),
            price,
            0.5,
        ),
    ])
}

// ---------------------------------------------------------------------------------------------
// Shutdown latency: SIGTERM to a child process running `run_until_signal`.

/// The child: a pool with `queued` tasks waiting behind two in flight (whose handlers finish as
/// soon as the drain begins), running until a signal. Prints `ready` once the signal handlers
/// are installed and `report <ns>` (CLOCK_REALTIME) when the report arrives.
fn child_shutdown(args: &[String]) -> BoxResult<()> {
    let [queued, dir] = args else {
        return Err("usage: --child-shutdown QUEUED DIR".into());
    };
    let queued: u64 = queued.parse()?;
    let dir = PathBuf::from(dir);
    let rt = runtime()?;
    rt.block_on(async {
        let (gate, gate_rx) = tokio::sync::watch::channel(false);
        let in_flight = if queued > 0 { 2 } else { 0 };
        let pool = Pool::builder()
            .workers(2)
            .queue_capacity(queued as usize + 16)
            .journal_dir(&dir)
            .start(move |task: Task<Email>| {
                let mut gate = gate_rx.clone();
                async move {
                    tokio::select! {
                        _ = gate.wait_for(|open| *open) => {}
                        () = task.cancelled() => {}
                    }
                    Ok::<(), Infallible>(())
                }
            })
            .await?;
        for i in 0..queued + in_flight {
            pool.submit(email(i))
                .await
                .map_err(|e| format!("submit: {e}"))?;
        }
        until_in_flight(&pool, in_flight as usize).await;
        // In-flight handlers finish as soon as the drain begins: only the spill is measured.
        let mut state = pool.watch_state();
        tokio::spawn(async move {
            let _ = state.wait_for(|s| s != drainpool::State::Running).await;
            gate.send_replace(true);
        });
        let run = pool.run_until_signal();
        tokio::pin!(run);
        // The first poll installs the signal handlers.
        let early = tokio::select! {
            biased;
            result = &mut run => Some(result),
            () = std::future::ready(()) => None,
        };
        println!("ready");
        std::io::stdout().flush()?;
        let report = match early {
            Some(result) => result?,
            None => run.await?,
        };
        let at = realtime_ns();
        println!(
            "report {at} spilled {} elapsed_us {}",
            report.spilled,
            report.elapsed.as_micros()
        );
        std::io::stdout().flush()?;
        Ok::<(), Box<dyn Error>>(())
    })?;
    Ok(())
}

#[derive(Debug)]
struct ShutdownRun {
    to_report_ms: f64,
    to_exit_ms: f64,
    spilled: u64,
}

fn shutdown_once(dir: &Path, queued: u64) -> BoxResult<ShutdownRun> {
    let journal = fresh_dir(&dir.join("shutdown-journal"))?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--child-shutdown")
        .arg(queued.to_string())
        .arg(&journal)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    if line.trim() != "ready" {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("child said {line:?} instead of ready").into());
    }
    // Let the child settle into its idle wait.
    std::thread::sleep(Duration::from_millis(100));
    let sent = realtime_ns();
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )?;
    let status = child.wait()?;
    let exited = realtime_ns();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest)?;
    if !status.success() {
        return Err(format!("shutdown child exited with {status}").into());
    }
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (Some(&"report"), Some(at), Some(spilled)) = (fields.first(), fields.get(1), fields.get(3))
    else {
        return Err(format!("child printed {rest:?}").into());
    };
    let at: u128 = at.parse()?;
    let ms = |t: u128| (t as i128 - sent as i128) as f64 / 1e6;
    let _ = fs::remove_dir_all(&journal);
    Ok(ShutdownRun {
        to_report_ms: ms(at),
        to_exit_ms: ms(exited),
        spilled: spilled.parse()?,
    })
}

fn shutdown_rows(dir: &Path, scale: Scale) -> BoxResult<Vec<Row>> {
    let mut rows = Vec::new();
    for (label, queued, report_goal, exit_goal) in [
        ("idle", 0, 1.0, 5.0),
        ("queued", scale.shutdown_queued, 200.0, 200.0),
    ] {
        let mut runs = Vec::new();
        for _ in 0..scale.shutdown_runs {
            runs.push(shutdown_once(dir, queued)?);
        }
        if runs.iter().any(|r| r.spilled != queued) {
            return Err(format!("shutdown child spilled the wrong count: {runs:?}").into());
        }
        let what = if queued == 0 {
            label.to_owned()
        } else {
            format!("{} {label}", thousands(queued))
        };
        for (to, goal, pick) in [
            (
                "report",
                report_goal,
                (|r: &ShutdownRun| r.to_report_ms) as fn(&ShutdownRun) -> f64,
            ),
            ("exit", exit_goal, |r: &ShutdownRun| r.to_exit_ms),
        ] {
            let all: Vec<f64> = runs.iter().map(pick).collect();
            let m = median(&all);
            rows.push(Row {
                name: format!("shutdown, {what}: SIGTERM to {to}"),
                unit: "milliseconds",
                drainpool: Some(m),
                drainpool_text: format!("{m:.2} ms"),
                baseline: None,
                baseline_text: "—".to_owned(),
                ratio: None,
                goal: format!("≤ {goal} ms"),
                met: Some(m <= goal),
                detail: json!({ "queued": queued, "runs_ms": all }),
            });
        }
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// Memory: resident bytes per queued task.

fn vm_rss() -> BoxResult<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS in /proc/self/status")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or("malformed VmRSS")?
        .parse()?;
    Ok(kb * 1024)
}

/// The child: `pool N DIR` queues N tasks in a pool (behind one in flight); `vec N` builds a
/// `Vec` of the same N payloads. Prints `rss BEFORE AFTER` and exits at once.
fn child_memory(args: &[String]) -> BoxResult<()> {
    let mode = args.first().map(String::as_str);
    let n: u64 = args.get(1).ok_or("missing count")?.parse()?;
    match mode {
        Some("pool") => {
            let dir = PathBuf::from(args.get(2).ok_or("missing dir")?);
            let rt = runtime()?;
            rt.block_on(async {
                let pool = blocked_pool(&dir, n as usize + 16).await?;
                pool.submit(email(u64::MAX / 2))
                    .await
                    .map_err(|e| format!("submit: {e}"))?;
                until_in_flight(&pool, 1).await;
                let before = vm_rss()?;
                for i in 0..n {
                    pool.submit(email(i))
                        .await
                        .map_err(|e| format!("submit: {e}"))?;
                }
                let after = vm_rss()?;
                println!("rss {before} {after} queued {}", pool.stats().queued);
                std::io::stdout().flush()?;
                // Exit without the shutdown: the spill is not what is measured here.
                std::process::exit(0);
            })
        }
        Some("vec") => {
            let before = vm_rss()?;
            let payloads: Vec<Email> = (0..n).map(email).collect();
            let after = vm_rss()?;
            black_box(&payloads);
            println!("rss {before} {after} queued {}", payloads.len());
            Ok(())
        }
        _ => Err("usage: --child-memory pool N DIR | vec N".into()),
    }
}

fn memory_child(args: &[&str]) -> BoxResult<(u64, u64, u64)> {
    let output = Command::new(std::env::current_exe()?)
        .arg("--child-memory")
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !output.status.success() {
        return Err(format!(
            "memory child failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let text = String::from_utf8(output.stdout)?;
    let fields: Vec<&str> = text.split_whitespace().collect();
    match fields.as_slice() {
        ["rss", before, after, "queued", queued] => {
            Ok((before.parse()?, after.parse()?, queued.parse()?))
        }
        _ => Err(format!("memory child printed {text:?}").into()),
    }
}

fn memory_rows(dir: &Path, scale: Scale, json_len: usize) -> BoxResult<Vec<Row>> {
    let n = scale.memory_tasks;
    let journal = fresh_dir(&dir.join("memory-journal"))?;
    let journal_arg = journal.to_string_lossy().into_owned();
    let (before, after, queued) = memory_child(&["pool", &n.to_string(), &journal_arg])?;
    let _ = fs::remove_dir_all(&journal);
    if queued != n {
        return Err(format!("memory child queued {queued}, expected {n}").into());
    }
    let (vbefore, vafter, _) = memory_child(&["vec", &n.to_string()])?;
    let per_task = after.saturating_sub(before) as f64 / n as f64;
    let per_payload = vafter.saturating_sub(vbefore) as f64 / n as f64;
    let overhead = per_task - json_len as f64;
    Ok(vec![Row {
        name: format!("memory, {} queued", thousands(n)),
        unit: "resident bytes per queued task",
        drainpool: Some(per_task),
        drainpool_text: format!("{per_task:.0} B/task ({overhead:.0} B over the JSON)"),
        baseline: Some(json_len as f64),
        baseline_text: format!("{json_len} B JSON (a Vec<Email> of the same: {per_payload:.0} B)"),
        ratio: None,
        goal: "≤ 100 B overhead".to_owned(),
        met: Some(overhead <= 100.0),
        detail: json!({
            "tasks": n,
            "rss_before": before,
            "rss_after": after,
            "bytes_per_task": per_task,
            "payload_json_bytes": json_len,
            "overhead_bytes": overhead,
            "vec_of_payloads_bytes_each": per_payload,
            "overhead_over_vec": per_task - per_payload,
        }),
    }])
}
