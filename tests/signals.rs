//! Real signals sent to a real worker process.
//!
//! Every round starts this test binary again as a worker process (the ignored test
//! `worker_main`, which does nothing unless the environment names a worker configuration). The
//! worker runs a pool under load: its producer submits numbered tasks and appends each one
//! `submit` accepted to `accepted.log`; handlers sleep a few milliseconds and append the task's
//! number to `completed.log` once the work is done (then take a millisecond or two more to
//! "reply", so a hard stop can catch a task that did its work but never returned `Ok`); every
//! handler run is written to `starts.log`, in start order, with its `was_interrupted` flag.
//! The worker prints what recovery replayed and the shutdown report, interrupted ids included.
//!
//! The harness sends, at seeded moments: SIGTERM once; SIGINT once; SIGTERM twice in quick
//! succession; SIGTERM while a handler ignores its cancellation token (the deadline path);
//! SIGTERM three times (the forced exit, status 143, which loses the tasks still running, as
//! documented, while those dropped at the hard stop were journaled at once); SIGTERM to the worker running as PID 1 of a new PID namespace. It then
//! restarts the worker on the same journal, with new work, until a start finds nothing to
//! replay and leaves nothing behind, and checks from the ledgers that no accepted task is lost,
//! that a task completes twice only if it was interrupted at a deadline, that every restart
//! runs its replayed tasks before any new one, and that the shutdown reports agree with the
//! ledgers.
//!
//! Signals are not queued: one sent while the same signal is still pending is merged with it,
//! by the kernel or by the pool's signal thread. So the harness sends a second or third signal
//! only once the worker shows it took the previous one (a marker file written when the pool
//! starts draining, another when the handlers' tokens fire).
//!
//! `cargo test --test signals` runs `SIGNALS_ROUNDS` (default 8) rounds of each case, seeded
//! from `SIGNALS_SEED` (a failure names the seed of its round). The soak is one command,
//!
//! ```text
//! SOAK_ROUNDS=1000 cargo test --release --test signals -- --ignored soak
//! ```
//!
//! whose last line reads `rounds=N lost=0 duplicates_outside_deadline=0`.

#![cfg(unix)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::child::{
    LedgerFile, Rng, SelfExec, child_of, describe, env_u64, field, innermost_pid,
    install_signal_handlers, last_words, pid_namespaces, read, run_worker, send,
    shut_down_when_empty, splitmix, task_hash, touch, touch_when_draining,
};
use common::say;
use drainpool::{Pool, SubmitError, Task, TaskId};
use rustix::process::Signal;
use serde::{Deserialize, Serialize};

/// How the test binary runs itself as a worker: only `worker_main`, on the directory (ledgers,
/// markers, and `journal/`) and the configuration (`key=value` words) these variables name.
const WORKER: SelfExec = SelfExec {
    test: "worker_main",
    dir_var: "DRAINPOOL_SIGNALS_WORKER_DIR",
    config_var: "DRAINPOOL_SIGNALS_WORKER_CONFIG",
    exit_poll: Duration::from_millis(2),
    ready_poll: Duration::from_millis(1),
};

/// The time between the drain deadline and the hard stop.
const CANCEL_GRACE_MS: u64 = 100;
/// How long a stuck handler sleeps, ignoring its token (far past any deadline).
const STUCK: Duration = Duration::from_secs(30);
/// How long a wedged handler blocks its thread.
const WEDGED: Duration = Duration::from_secs(10);
/// Limits on every wait for a worker.
const READY_LIMIT: Duration = Duration::from_secs(15);
const MARKER_LIMIT: Duration = Duration::from_secs(10);
const EXIT_LIMIT: Duration = Duration::from_secs(20);
/// Restarts after the signalled generation before the work must be done.
const MAX_GENERATIONS: u32 = 6;

// ---------------------------------------------------------------------------------------------
// The worker process.
// ---------------------------------------------------------------------------------------------

/// The task payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Work {
    n: u64,
    /// The work, in milliseconds.
    work_ms: u64,
    /// The reply after the work is recorded, in milliseconds.
    reply_ms: u64,
    kind: Kind,
}

/// What a handler does with a task in the signalled generation. Later generations run every
/// task as `Short`: the slow dependency is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Kind {
    Short,
    /// Sleeps far past the deadline, ignoring its cancellation token.
    Stuck,
    /// Blocks its thread (`block_in_place`) far past the deadline: the hard stop cannot drop
    /// it, so the process stays up until a third signal.
    Wedged,
}

/// One generation of the worker.
#[derive(Debug, Clone)]
struct WorkerConfig {
    generation: u32,
    /// The first task number this generation submits; lower numbers are from earlier ones.
    first: u64,
    count: u64,
    seed: u64,
    workers: usize,
    queue: usize,
    deadline_ms: u64,
    /// The slow tasks, if any.
    slow: Vec<(u64, Kind)>,
    /// Whether the slow tasks are slow in this generation.
    slow_active: bool,
    multi_thread: bool,
    /// Shut down by itself once the producer is done and nothing is queued or running.
    until_empty: bool,
}

impl WorkerConfig {
    fn encode(&self) -> String {
        let slow: Vec<String> = self
            .slow
            .iter()
            .map(|(n, kind)| format!("{n}:{kind:?}"))
            .collect();
        let slow = if slow.is_empty() {
            "-".to_string()
        } else {
            slow.join(",")
        };
        format!(
            "generation={} first={} count={} seed={} workers={} queue={} deadline_ms={} slow={slow} slow_active={} multi_thread={} until_empty={}",
            self.generation,
            self.first,
            self.count,
            self.seed,
            self.workers,
            self.queue,
            self.deadline_ms,
            self.slow_active,
            self.multi_thread,
            self.until_empty
        )
    }

    fn decode(text: &str) -> Self {
        let map: HashMap<&str, &str> = text.split(' ').filter_map(|w| w.split_once('=')).collect();
        let get = |key: &str| {
            *map.get(key)
                .unwrap_or_else(|| panic!("no {key} in {text:?}"))
        };
        let num = |key: &str| get(key).parse::<u64>().expect("a number");
        let flag = |key: &str| get(key) == "true";
        let slow = get("slow")
            .split(',')
            .filter_map(|task| task.split_once(':'))
            .map(|(n, kind)| {
                let kind = match kind {
                    "Stuck" => Kind::Stuck,
                    "Wedged" => Kind::Wedged,
                    _ => Kind::Short,
                };
                (n.parse().expect("a task number"), kind)
            })
            .collect();
        Self {
            generation: num("generation") as u32,
            first: num("first"),
            count: num("count"),
            seed: num("seed"),
            workers: num("workers") as usize,
            queue: num("queue") as usize,
            deadline_ms: num("deadline_ms"),
            slow,
            slow_active: flag("slow_active"),
            multi_thread: flag("multi_thread"),
            until_empty: flag("until_empty"),
        }
    }
}

/// The worker: runs only when a signal test starts this binary with a worker configuration.
#[test]
#[ignore = "the worker process of the signal tests, which start it themselves"]
fn worker_main() {
    let Some((dir, config)) = WORKER.worker_env() else {
        return;
    };
    let config = WorkerConfig::decode(&config);
    run_worker(config.multi_thread, worker(dir, config));
}

/// A task's work and reply times, from the seed and its number.
fn task_times(seed: u64, n: u64) -> (u64, u64) {
    let h = task_hash(seed, n);
    (1 + h % 20, (h >> 32) % 3)
}

async fn worker(dir: PathBuf, config: WorkerConfig) -> i32 {
    let generation = config.generation;
    let completed = Arc::new(LedgerFile::open(&dir.join("completed.log")));
    let starts = Arc::new(LedgerFile::open(&dir.join("starts.log")));
    let numbers: Arc<Mutex<HashMap<TaskId, u64>>> = Arc::default();
    let watching = Arc::new(AtomicBool::new(false));
    let tokens_marker = dir.join(format!("tokens.{generation}"));
    let slow_active = config.slow_active;

    let handler = {
        let numbers = Arc::clone(&numbers);
        move |task: Task<Work>| {
            let work = task.payload().clone();
            // Written when the worker takes the task, before anything can await: the order of
            // these lines is the order the pool handed tasks out (exact on a current-thread
            // runtime).
            starts.line(format!(
                "{generation} {} {} {}\n",
                work.n,
                u8::from(task.was_interrupted()),
                task.attempt()
            ));
            numbers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(task.id(), work.n);
            if !watching.swap(true, Ordering::SeqCst) {
                // Every task shares the deadline token: mark when it fires.
                let token = task.cancellation_token().clone();
                let marker = tokens_marker.clone();
                tokio::spawn(async move {
                    token.cancelled().await;
                    touch(&marker);
                });
            }
            let completed = Arc::clone(&completed);
            async move {
                match (slow_active, work.kind) {
                    (true, Kind::Wedged) => {
                        tokio::task::block_in_place(|| std::thread::sleep(WEDGED));
                    }
                    // Ignores its cancellation token.
                    (true, Kind::Stuck) => tokio::time::sleep(STUCK).await,
                    _ => tokio::time::sleep(Duration::from_millis(work.work_ms)).await,
                }
                // The side effect, once the work is done.
                completed.line(format!("{generation} {}\n", work.n));
                tokio::time::sleep(Duration::from_millis(work.reply_ms)).await;
                Ok::<(), std::convert::Infallible>(())
            }
        }
    };

    let pool = Pool::builder()
        .workers(config.workers)
        .queue_capacity(config.queue)
        .drain_deadline(Duration::from_millis(config.deadline_ms))
        .cancel_grace(Duration::from_millis(CANCEL_GRACE_MS))
        .journal_dir(dir.join("journal"))
        .start(handler)
        .await
        .expect("the pool starts");
    let recovery = pool.recovery();
    println!(
        "dpw start generation={generation} replayed={} torn={} damage={} pid={}",
        recovery.replayed,
        recovery.torn_tails.len(),
        recovery.damage.len(),
        std::process::id()
    );

    touch_when_draining(&pool, dir.join(format!("draining.{generation}")));

    let accepted = Arc::new(AtomicU64::new(0));
    let producer_done = Arc::new(AtomicBool::new(false));
    let producer = tokio::spawn({
        let pool = pool.clone();
        let ledger = LedgerFile::open(&dir.join("accepted.log"));
        let accepted = Arc::clone(&accepted);
        let done = Arc::clone(&producer_done);
        let config = config.clone();
        async move {
            for n in config.first..config.first + config.count {
                let (work_ms, reply_ms) = task_times(config.seed, n);
                let kind = config
                    .slow
                    .iter()
                    .find(|(slow, _)| *slow == n)
                    .map_or(Kind::Short, |&(_, kind)| kind);
                let work = Work {
                    n,
                    work_ms,
                    reply_ms,
                    kind,
                };
                match pool.submit(work).await {
                    // Only now is the task the pool's responsibility.
                    Ok(_) => {
                        ledger.line(format!("{generation} {n}\n"));
                        accepted.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(SubmitError::ShuttingDown(_)) => break,
                    Err(e) => panic!("submit failed: {e}"),
                }
            }
            done.store(true, Ordering::SeqCst);
        }
    });

    let mut run = std::pin::pin!(pool.run_until_signal());
    install_signal_handlers(run.as_mut()).await;
    let enough = config.count.min(20);
    while accepted.load(Ordering::SeqCst) < enough && !producer_done.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    touch(&dir.join(format!("ready.{generation}")));

    if config.until_empty {
        shut_down_when_empty(&pool, &producer_done, Duration::from_millis(5));
    }

    let report = run.await.expect("run_until_signal");
    producer.await.expect("the producer");
    let numbers = numbers.lock().unwrap_or_else(|e| e.into_inner());
    let interrupted: Vec<String> = report
        .interrupted_ids
        .iter()
        .map(|id| {
            numbers
                .get(id)
                .map_or_else(|| format!("?{id}"), u64::to_string)
        })
        .collect();
    println!(
        "dpw report generation={generation} replayed={} submitted={} completed={} failed={} retried={} dropped={} spilled={} interrupted={} unsaved={} elapsed_ms={} drain_ms={} clean={} interrupted_ids={}",
        report.replayed,
        report.submitted,
        report.completed,
        report.failed,
        report.retried,
        report.dropped,
        report.spilled,
        report.interrupted,
        report.unsaved,
        report.elapsed.as_millis(),
        report.drain_time.as_millis(),
        report.is_clean(),
        interrupted.join(",")
    );
    if report.exit_code() == ExitCode::SUCCESS {
        0
    } else {
        1
    }
}

// ---------------------------------------------------------------------------------------------
// The harness.
// ---------------------------------------------------------------------------------------------

/// What the harness does to the first generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    /// SIGTERM once, with tasks queued and in flight.
    TermOnce,
    /// SIGINT once.
    IntOnce,
    /// SIGTERM, then another as soon as the drain began: the wait is skipped.
    TermTwice,
    /// SIGTERM, then nothing, while a handler ignores its token.
    TermDeadline,
    /// SIGTERM three times: the third exits at once with 143.
    TermThrice,
    /// SIGTERM to the worker as PID 1 of a new PID namespace.
    Pid1,
}

const CASES: [Case; 6] = [
    Case::TermOnce,
    Case::IntOnce,
    Case::TermTwice,
    Case::TermDeadline,
    Case::TermThrice,
    Case::Pid1,
];

impl Case {
    /// The slow tasks of the signalled generation: among the first tasks, so that they are in
    /// flight early.
    fn slow_tasks(self, rng: &mut Rng, workers: usize) -> Vec<(u64, Kind)> {
        let mut kinds = match self {
            Self::TermTwice | Self::TermDeadline => vec![Kind::Stuck; rng.range(1, 2) as usize],
            Self::TermThrice => {
                let mut kinds = vec![Kind::Wedged];
                kinds.extend(vec![Kind::Stuck; rng.range(0, 2) as usize]);
                kinds
            }
            Self::TermOnce | Self::IntOnce | Self::Pid1 => Vec::new(),
        };
        let mut slow = Vec::new();
        while let Some(kind) = kinds.pop() {
            let n = loop {
                let n = rng.range(0, workers.min(6) as u64 - 1);
                if slow.iter().all(|&(m, _)| m != n) {
                    break n;
                }
            };
            slow.push((n, kind));
        }
        slow
    }

    fn deadline_ms(self, rng: &mut Rng) -> u64 {
        match self {
            // Long enough that skipping the wait is unmistakable.
            Self::TermTwice | Self::TermThrice => 2_000,
            Self::TermDeadline => rng.range(300, 500),
            Self::TermOnce | Self::IntOnce | Self::Pid1 => 500,
        }
    }

    fn exit_code(self, generation: u32) -> i32 {
        if self == Self::TermThrice && generation == 1 {
            128 + 15
        } else {
            0
        }
    }
}

/// What one generation did.
struct GenRun {
    config: WorkerConfig,
    status: ExitStatus,
    start: HashMap<String, String>,
    report: Option<HashMap<String, String>>,
}

/// A line `dpw <kind> key=value ...` of the worker's output.
fn worker_line(out: &str, kind: &str) -> Option<HashMap<String, String>> {
    let prefix = format!("dpw {kind} ");
    // libtest may have begun the line with `test worker_main ... `.
    let line = out
        .lines()
        .find_map(|l| l.find(prefix.as_str()).map(|at| &l[at + prefix.len()..]))?;
    Some(
        line.split(' ')
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn numbers_field(map: &HashMap<String, String>, key: &str) -> Result<BTreeSet<u64>, String> {
    let text = map.get(key).ok_or_else(|| format!("no {key} in {map:?}"))?;
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|_| format!("{key}: not a task number: {s}"))
        })
        .collect()
}

fn collect(dir: &Path, config: WorkerConfig, status: ExitStatus) -> Result<GenRun, String> {
    let out = read(&dir.join(format!("out.{}", config.generation)));
    let start = worker_line(&out, "start").ok_or("the worker printed no start line")?;
    let report = worker_line(&out, "report");
    Ok(GenRun {
        config,
        status,
        start,
        report,
    })
}

/// One line of `starts.log`.
#[derive(Debug)]
struct Start {
    generation: u32,
    n: u64,
    interrupted: bool,
    attempt: u32,
}

fn starts(dir: &Path) -> Result<Vec<Start>, String> {
    read(&dir.join("starts.log"))
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let parsed = match f.as_slice() {
                [g, n, i, a] => (|| {
                    Some(Start {
                        generation: g.parse().ok()?,
                        n: n.parse().ok()?,
                        interrupted: *i == "1",
                        attempt: a.parse().ok()?,
                    })
                })(),
                _ => None,
            };
            parsed.ok_or_else(|| format!("malformed line in starts.log: {line:?}"))
        })
        .collect()
}

/// `generation n` lines.
fn pairs(dir: &Path, name: &str) -> Result<Vec<(u32, u64)>, String> {
    read(&dir.join(name))
        .lines()
        .map(|line| {
            line.split_once(' ')
                .and_then(|(g, n)| Some((g.parse().ok()?, n.parse().ok()?)))
                .ok_or_else(|| format!("malformed line in {name}: {line:?}"))
        })
        .collect()
}

/// What a round found.
#[derive(Debug, Default)]
struct Outcome {
    skipped: Option<String>,
    accepted: usize,
    /// Accepted tasks never completed (outside what the forced exit is documented to lose).
    lost: usize,
    /// Tasks in flight at the forced exit, lost as documented.
    lost_in_flight: usize,
    /// Extra completions of tasks interrupted at a deadline.
    duplicates_inside_deadline: usize,
    /// Extra completions of tasks never interrupted: must be zero.
    duplicates_outside_deadline: usize,
    /// Tasks journaled at the signal: queued (spilled) and in flight (interrupted).
    spilled_at_signal: u64,
    interrupted_at_signal: u64,
    generations: u32,
}

/// Runs one round: the signalled generation, then restarts until the journal is empty.
fn run_round(case: Case, seed: u64) -> Result<Outcome, String> {
    if case == Case::Pid1
        && let Err(reason) = pid_namespaces()
    {
        return Ok(Outcome {
            skipped: Some(reason),
            ..Outcome::default()
        });
    }
    let temp = tempfile::Builder::new()
        .prefix("drainpool-signals-")
        .tempdir()
        .map_err(|e| format!("a temporary directory: {e}"))?;
    let dir = temp.path();
    let result = run_generations(case, seed, dir);
    // Show the last words of every generation's worker.
    let result = result.map_err(|e| e + &last_words(dir, MAX_GENERATIONS, None));
    temp.close()
        .map_err(|e| format!("removing the temporary directory: {e}"))?;
    result
}

fn run_generations(case: Case, seed: u64, dir: &Path) -> Result<Outcome, String> {
    let mut rng = Rng::new(seed);
    let workers = rng.range(4, 8) as usize;
    let slow = case.slow_tasks(&mut rng, workers);
    let first = WorkerConfig {
        generation: 1,
        first: 0,
        count: rng.range(150, 250),
        seed,
        workers,
        queue: 32,
        deadline_ms: case.deadline_ms(&mut rng),
        slow: slow.clone(),
        slow_active: true,
        multi_thread: case == Case::TermThrice || rng.coin(),
        until_empty: false,
    };
    let mut next = first.count;
    let mut runs = vec![signalled_generation(case, dir, first, &mut rng)?];
    let mut done = false;
    for generation in 2..=MAX_GENERATIONS {
        let count = if generation == 2 {
            rng.range(20, 60)
        } else {
            0
        };
        let config = WorkerConfig {
            generation,
            first: next,
            count,
            seed,
            workers,
            queue: 32,
            deadline_ms: 500,
            slow: slow.clone(),
            slow_active: false,
            // Current-thread, so that the start order is exactly the order of hand-out.
            multi_thread: false,
            until_empty: true,
        };
        next += count;
        let mut worker = WORKER.spawn(dir, config.generation, &config.encode(), None)?;
        let status = worker
            .wait(EXIT_LIMIT)
            .map_err(|e| format!("generation {generation}: {e}"))?;
        drop(worker);
        let run = collect(dir, config, status)?;
        // Done when a generation found nothing to replay and left nothing behind.
        done = match &run.report {
            Some(report) => {
                field(&run.start, "replayed")?
                    + field(report, "spilled")?
                    + field(report, "interrupted")?
                    == 0
            }
            None => false,
        };
        runs.push(run);
        if done {
            break;
        }
    }
    if !done {
        return Err(format!(
            "the work was not done after {MAX_GENERATIONS} generations"
        ));
    }
    check(case, dir, &runs)
}

/// The first generation: starts the worker under load and sends the case's signals.
fn signalled_generation(
    case: Case,
    dir: &Path,
    config: WorkerConfig,
    rng: &mut Rng,
) -> Result<GenRun, String> {
    let unshare = if case == Case::Pid1 {
        Some(pid_namespaces()?)
    } else {
        None
    };
    let launcher = unshare.map(|options| ("unshare", options));
    let mut worker = WORKER.spawn(dir, config.generation, &config.encode(), launcher)?;
    let ready = dir.join("ready.1");
    worker.wait_for(READY_LIMIT, "ready marker", || ready.exists())?;
    // The slow tasks must be in flight when the signal comes.
    let starts_log = dir.join("starts.log");
    let needles: Vec<String> = config.slow.iter().map(|(n, _)| format!("1 {n} ")).collect();
    worker.wait_for(READY_LIMIT, "the start of the slow tasks", || {
        let text = read(&starts_log);
        needles
            .iter()
            .all(|needle| text.lines().any(|l| l.starts_with(needle)))
    })?;
    let pid = if unshare.is_some() {
        let outer = worker.pid();
        let mut inner = None;
        worker.wait_for(MARKER_LIMIT, "the namespaced worker's pid", || {
            inner = child_of(outer);
            inner.is_some()
        })?;
        let inner = inner.unwrap_or_default();
        match innermost_pid(inner) {
            Some(1) => {}
            other => {
                return Err(format!(
                    "pid {inner}, the child of unshare {outer}, is pid {other:?} in its namespace, not 1"
                ));
            }
        }
        inner
    } else {
        worker.pid()
    };
    let draining = dir.join("draining.1");
    let tokens = dir.join("tokens.1");
    rng.sleep_ms(0, 250);
    match case {
        Case::TermOnce | Case::Pid1 | Case::TermDeadline => send(pid, Signal::TERM, "SIGTERM")?,
        Case::IntOnce => send(pid, Signal::INT, "SIGINT")?,
        Case::TermTwice => {
            send(pid, Signal::TERM, "SIGTERM")?;
            // Signals are not queued: wait until the first was taken, then send the second
            // right away.
            worker.wait_for(MARKER_LIMIT, "the drain after SIGTERM", || {
                draining.exists()
            })?;
            rng.sleep_ms(0, 10);
            send(pid, Signal::TERM, "second SIGTERM")?;
        }
        Case::TermThrice => {
            send(pid, Signal::TERM, "SIGTERM")?;
            worker.wait_for(MARKER_LIMIT, "the drain after SIGTERM", || {
                draining.exists()
            })?;
            rng.sleep_ms(20, 150);
            send(pid, Signal::TERM, "second SIGTERM")?;
            // The second signal fires the tokens (the deadline is far off).
            worker.wait_for(MARKER_LIMIT, "the tokens after the second SIGTERM", || {
                tokens.exists()
            })?;
            rng.sleep_ms(0, 30);
            send(pid, Signal::TERM, "third SIGTERM")?;
        }
    }
    let status = worker
        .wait(EXIT_LIMIT)
        .map_err(|e| format!("generation 1: {e}"))?;
    drop(worker);
    collect(dir, config, status)
}

/// Checks the ledgers and the reports of a round.
fn check(case: Case, dir: &Path, runs: &[GenRun]) -> Result<Outcome, String> {
    let accepted = pairs(dir, "accepted.log")?;
    let completed = pairs(dir, "completed.log")?;
    let starts = starts(dir)?;

    let mut accepted_set = BTreeSet::new();
    for &(_, n) in &accepted {
        if !accepted_set.insert(n) {
            return Err(format!("task {n} was accepted twice"));
        }
    }
    // Interrupted at a deadline, by generation, as the shutdown reports said.
    let mut interrupted: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    // In flight at the forced exit: the documented loss.
    let mut in_flight_at_exit = BTreeSet::new();
    let mut outcome = Outcome {
        accepted: accepted_set.len(),
        generations: runs.len() as u32,
        ..Outcome::default()
    };

    for run in runs {
        let g = run.config.generation;
        let fail = |what: String| Err(format!("{case:?} generation {g}: {what}"));
        let expected = case.exit_code(g);
        if run.status.code() != Some(expected) {
            return fail(format!(
                "the worker ended with {}, not {expected}",
                run.status
            ));
        }
        let replayed = field(&run.start, "replayed")? as usize;
        if field(&run.start, "damage")? != 0 {
            return fail(format!("recovery found damage: {:?}", run.start));
        }
        let before = |list: &[(u32, u64)]| -> BTreeSet<u64> {
            list.iter()
                .filter(|(h, _)| *h < g)
                .map(|&(_, n)| n)
                .collect()
        };
        let pending: BTreeSet<u64> = before(&accepted)
            .difference(&before(&completed))
            .copied()
            .collect();
        let accepted_here = accepted.iter().filter(|(h, _)| *h == g).count() as u64;
        let completed_here: Vec<u64> = completed
            .iter()
            .filter(|(h, _)| *h == g)
            .map(|&(_, n)| n)
            .collect();
        let started: Vec<&Start> = starts.iter().filter(|s| s.generation == g).collect();
        let started_set: BTreeSet<u64> = started.iter().map(|s| s.n).collect();
        if started_set.len() != started.len() {
            return fail("a task started twice in one generation".into());
        }
        let interrupted_before: BTreeSet<u64> = interrupted.values().flatten().copied().collect();
        let interrupted_last = interrupted.get(&(g - 1)).cloned().unwrap_or_default();

        // Replay before new work: the first `replayed` tasks handed out are all old.
        let is_old = |n: u64| n < run.config.first;
        if let Some(p) = started.iter().position(|s| !is_old(s.n))
            && p < replayed
        {
            return fail(format!(
                "new task {} started after only {p} of {replayed} replayed tasks",
                started[p].n
            ));
        }
        let replay: BTreeSet<u64> = started_set.iter().copied().filter(|&n| is_old(n)).collect();
        if replay.len() > replayed {
            return fail(format!(
                "{} old tasks ran but recovery replayed {replayed}",
                replay.len()
            ));
        }
        let unexpected: BTreeSet<u64> = replay
            .iter()
            .copied()
            .filter(|n| !pending.contains(n) && !interrupted_last.contains(n))
            .collect();
        if !unexpected.is_empty() {
            return fail(format!(
                "replayed tasks that were done and never interrupted: {}",
                describe(&unexpected)
            ));
        }
        if run.config.until_empty {
            if replay.len() != replayed {
                return fail(format!(
                    "recovery replayed {replayed} but {} ran",
                    replay.len()
                ));
            }
            let missing: BTreeSet<u64> = pending
                .difference(&replay)
                .copied()
                .filter(|n| !in_flight_at_exit.contains(n))
                .collect();
            if !missing.is_empty() {
                return fail(format!(
                    "accepted, never completed, and not replayed: {}",
                    describe(&missing)
                ));
            }
            for n in &interrupted_last {
                if !started.iter().any(|s| s.n == *n && s.interrupted) {
                    return fail(format!(
                        "task {n} was journaled as interrupted but did not run as interrupted"
                    ));
                }
            }
        }
        for s in &started {
            if s.attempt != 1 {
                return fail(format!("task {} ran as attempt {}", s.n, s.attempt));
            }
            // A forced exit leaves no report, but the tasks dropped at its hard stop were
            // journaled at once and come back interrupted.
            let saved_at_forced_exit = case == Case::TermThrice && in_flight_at_exit.contains(&s.n);
            if s.interrupted && !interrupted_before.contains(&s.n) && !saved_at_forced_exit {
                return fail(format!(
                    "task {} ran as interrupted but no report interrupted it",
                    s.n
                ));
            }
        }

        match &run.report {
            Some(report) => {
                let get = |key: &str| field(report, key);
                let (submitted, done, spilled, held) = (
                    get("submitted")?,
                    get("completed")?,
                    get("spilled")?,
                    get("interrupted")?,
                );
                if get("replayed")? != replayed as u64 {
                    return fail(format!("report and recovery disagree: {report:?}"));
                }
                if submitted != accepted_here {
                    return fail(format!(
                        "the pool accepted {submitted} tasks, the producer recorded {accepted_here}"
                    ));
                }
                // Handlers never fail here, and the default deadline action requeues.
                let nothing_else = ["failed", "retried", "dropped", "unsaved"];
                if nothing_else.iter().any(|key| get(key).ok() != Some(0))
                    || report["clean"] != "true"
                {
                    return fail(format!("unclean report: {report:?}"));
                }
                if replayed as u64 + submitted != done + spilled + held {
                    return fail(format!("the report's counts do not add up: {report:?}"));
                }
                let ids = numbers_field(report, "interrupted_ids")?;
                if ids.len() as u64 != held || !ids.is_subset(&started_set) {
                    return fail(format!("bad interrupted ids: {report:?}"));
                }
                // A task can record its work and be stopped before it returns: such a task
                // is in the ledger and in the report's interrupted ids.
                let recorded_then_stopped =
                    completed_here.iter().filter(|n| ids.contains(n)).count() as u64;
                if completed_here.len() as u64 != done + recorded_then_stopped {
                    return fail(format!(
                        "{} completions in the ledger, {done} in the report, {recorded_then_stopped} stopped after",
                        completed_here.len()
                    ));
                }
                if g == 1 {
                    outcome.spilled_at_signal = spilled;
                    outcome.interrupted_at_signal = held;
                }
                interrupted.insert(g, ids);
            }
            None if expected == 0 => return fail("no shutdown report".into()),
            None => {}
        }
        if case == Case::TermThrice && g == 1 {
            let done: BTreeSet<u64> = completed_here.iter().copied().collect();
            in_flight_at_exit = started_set.difference(&done).copied().collect();
        }
        if case == Case::TermThrice && g == 2 {
            // No report from the forced exit: what the first signal spilled is what replays.
            outcome.spilled_at_signal = replayed as u64;
        }
    }

    // The signalled generation did what its case is about.
    let first = &runs[0];
    let report_1 = first.report.as_ref();
    let interrupted_1 = interrupted.get(&1).cloned().unwrap_or_default();
    let slow: BTreeSet<u64> = first.config.slow.iter().map(|&(n, _)| n).collect();
    let deadline = first.config.deadline_ms;
    let fail = |what: String| Err(format!("{case:?} generation 1: {what}"));
    match case {
        Case::TermOnce | Case::IntOnce | Case::Pid1 => {
            if !interrupted_1.is_empty() {
                return fail(format!(
                    "short tasks were interrupted at a {deadline} ms deadline: {}",
                    describe(&interrupted_1)
                ));
            }
            if case == Case::Pid1 && first.start.get("pid").map(String::as_str) != Some("1") {
                return fail(format!("the worker was not PID 1: {:?}", first.start));
            }
        }
        Case::TermTwice => {
            let elapsed = report_1.map(|r| field(r, "elapsed_ms")).transpose()?;
            if elapsed.is_none_or(|ms| ms >= deadline) {
                return fail(format!(
                    "the second SIGTERM did not skip the wait: shutdown took {elapsed:?} ms, the deadline is {deadline} ms"
                ));
            }
            if !slow.is_subset(&interrupted_1) {
                return fail(format!(
                    "the stuck tasks {slow:?} were not all journaled as interrupted: {interrupted_1:?}"
                ));
            }
        }
        Case::TermDeadline => {
            let drained = report_1.map(|r| field(r, "drain_ms")).transpose()?;
            if drained.is_none_or(|ms| ms < deadline + CANCEL_GRACE_MS) {
                return fail(format!(
                    "the drain ended after {drained:?} ms, before the deadline and grace ({deadline} + {CANCEL_GRACE_MS} ms)"
                ));
            }
            if !slow.is_subset(&interrupted_1) {
                return fail(format!(
                    "the tasks ignoring their token ({slow:?}) were not all journaled as interrupted: {interrupted_1:?}"
                ));
            }
        }
        Case::TermThrice => {}
    }

    // Across all generations.
    let mut times: BTreeMap<u64, usize> = BTreeMap::new();
    for &(_, n) in &completed {
        *times.entry(n).or_default() += 1;
    }
    let strays: BTreeSet<u64> = times
        .keys()
        .copied()
        .filter(|n| !accepted_set.contains(n))
        .collect();
    if !strays.is_empty() {
        return Err(format!(
            "{case:?}: completed but never accepted: {}",
            describe(&strays)
        ));
    }
    let interrupted_all: BTreeSet<u64> = interrupted.values().flatten().copied().collect();
    for (&n, &count) in &times {
        if count > 1 {
            if interrupted_all.contains(&n) {
                outcome.duplicates_inside_deadline += count - 1;
            } else {
                outcome.duplicates_outside_deadline += count - 1;
            }
        }
    }
    let lost: BTreeSet<u64> = accepted_set
        .iter()
        .copied()
        .filter(|n| !times.contains_key(n))
        .collect();
    let (documented, other): (BTreeSet<u64>, BTreeSet<u64>) =
        lost.iter().partition(|n| in_flight_at_exit.contains(n));
    outcome.lost = other.len();
    outcome.lost_in_flight = documented.len();
    // The wedged handler (blocking its thread) is still running at the forced exit: its task
    // is lost, as documented. Stuck ones were dropped at the hard stop and may have been
    // journaled before the third signal.
    let wedged: BTreeSet<u64> = first
        .config
        .slow
        .iter()
        .filter(|&&(_, kind)| kind == Kind::Wedged)
        .map(|&(n, _)| n)
        .collect();
    if case == Case::TermThrice && !wedged.is_subset(&documented) {
        return Err(format!(
            "{case:?}: the wedged tasks {wedged:?} were running at the forced exit but not all lost ({documented:?}): the documentation says they are"
        ));
    }
    if !other.is_empty() {
        eprintln!("{case:?}: lost {}", describe(&other));
    }
    Ok(outcome)
}

// ---------------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------------

fn round_seed(case: Case, round: u64) -> u64 {
    let base = env_u64("SIGNALS_SEED").unwrap_or(0x5EED_D2A1_4900_0001);
    splitmix(base ^ ((case as u64) << 48) ^ round)
}

/// Totals over rounds.
#[derive(Debug, Default)]
struct Totals {
    rounds: u64,
    accepted: usize,
    lost: usize,
    lost_in_flight: usize,
    duplicates_inside_deadline: usize,
    duplicates_outside_deadline: usize,
    spilled_at_signal: u64,
    interrupted_at_signal: u64,
    most_generations: u32,
}

impl Totals {
    fn add(&mut self, o: &Outcome) {
        self.rounds += 1;
        self.accepted += o.accepted;
        self.lost += o.lost;
        self.lost_in_flight += o.lost_in_flight;
        self.duplicates_inside_deadline += o.duplicates_inside_deadline;
        self.duplicates_outside_deadline += o.duplicates_outside_deadline;
        self.spilled_at_signal += o.spilled_at_signal;
        self.interrupted_at_signal += o.interrupted_at_signal;
        self.most_generations = self.most_generations.max(o.generations);
    }
}

fn run_case(case: Case) {
    let rounds = env_u64("SIGNALS_ROUNDS").unwrap_or(8);
    let started = Instant::now();
    let mut totals = Totals::default();
    for round in 0..rounds {
        let seed = round_seed(case, round);
        let outcome = run_round(case, seed)
            .unwrap_or_else(|e| panic!("{case:?} round {round} (seed {seed:#x}): {e}"));
        if let Some(reason) = outcome.skipped {
            common::skip_or_fail(&format!("signals {case:?}: a PID namespace"), &reason);
            return;
        }
        assert_eq!(
            outcome.lost, 0,
            "{case:?} round {round} (seed {seed:#x}): accepted tasks lost"
        );
        assert_eq!(
            outcome.duplicates_outside_deadline, 0,
            "{case:?} round {round} (seed {seed:#x}): tasks completed twice without a deadline interruption"
        );
        if case != Case::TermThrice {
            assert_eq!(outcome.lost_in_flight, 0);
        }
        totals.add(&outcome);
    }
    let forced = if case == Case::TermThrice {
        format!(
            ", in flight at the forced exit and lost as documented {}",
            totals.lost_in_flight
        )
    } else {
        String::new()
    };
    say(&format!(
        "signals {case:?}: {rounds} rounds in {:.1} s, up to {} generations: accepted {}, spilled at the signal {}, interrupted {}, duplicates after a deadline {}, lost {}{forced}",
        started.elapsed().as_secs_f64(),
        totals.most_generations,
        totals.accepted,
        totals.spilled_at_signal,
        totals.interrupted_at_signal,
        totals.duplicates_inside_deadline,
        totals.lost,
    ));
}

#[test]
fn sigterm_once() {
    run_case(Case::TermOnce);
}

#[test]
fn sigint_once() {
    run_case(Case::IntOnce);
}

#[test]
fn sigterm_twice_skips_the_wait() {
    run_case(Case::TermTwice);
}

#[test]
fn sigterm_with_a_handler_ignoring_its_token() {
    run_case(Case::TermDeadline);
}

#[test]
fn sigterm_thrice_exits_at_once() {
    run_case(Case::TermThrice);
}

#[test]
fn sigterm_to_pid_1_of_a_pid_namespace() {
    run_case(Case::Pid1);
}

/// `SOAK_ROUNDS=1000 cargo test --release --test signals -- --ignored soak`
#[test]
#[ignore = "a long soak: run it by name"]
fn soak() {
    let rounds = env_u64("SOAK_ROUNDS").unwrap_or(20);
    let started = Instant::now();
    let mut totals = Totals::default();
    let mut failures = Vec::new();
    let mut skipped = BTreeSet::new();
    for round in 0..rounds {
        for case in CASES {
            let seed = round_seed(case, 1_000_000 + round);
            match run_round(case, seed) {
                Ok(outcome) => match outcome.skipped {
                    Some(reason) => {
                        skipped.insert(format!("{case:?}: {reason}"));
                    }
                    None => totals.add(&outcome),
                },
                Err(e) => {
                    say(&format!(
                        "FAILED {case:?} round {round} (seed {seed:#x}): {e}"
                    ));
                    failures.push(format!("{case:?} round {round} (seed {seed:#x})"));
                }
            }
        }
        if (round + 1) % 10 == 0 && round + 1 < rounds {
            say(&format!(
                "soak: {} rounds in {:.0} s",
                round + 1,
                started.elapsed().as_secs_f64()
            ));
        }
    }
    for reason in &skipped {
        common::skip_or_fail("every case of the soak", reason);
    }
    say(&format!(
        "cases={} accepted={} spilled_at_signal={} interrupted_at_signal={} duplicates_inside_deadline={} most_generations={} failures={} seconds={:.0}",
        totals.rounds,
        totals.accepted,
        totals.spilled_at_signal,
        totals.interrupted_at_signal,
        totals.duplicates_inside_deadline,
        totals.most_generations,
        failures.len(),
        started.elapsed().as_secs_f64()
    ));
    say(&format!(
        "forced exit (third SIGTERM): in-flight tasks lost as documented={} over {rounds} rounds",
        totals.lost_in_flight
    ));
    say(&format!(
        "rounds={rounds} lost={} duplicates_outside_deadline={}",
        totals.lost, totals.duplicates_outside_deadline
    ));
    assert!(failures.is_empty(), "failed rounds: {failures:?}");
    assert_eq!(totals.lost, 0, "accepted tasks were lost");
    assert_eq!(
        totals.duplicates_outside_deadline, 0,
        "tasks completed twice without a deadline interruption"
    );
}
