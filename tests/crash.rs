//! SIGKILL at seeded random moments loses no acknowledged task under
//! `Durability::write_ahead(SyncPolicy::Always)`.
//!
//! Every generation starts this test binary again as a worker process (the ignored test
//! `crash_worker`, which does nothing unless the environment names a worker directory). The
//! worker runs a write-ahead pool on `journal/`; several concurrent submitters (4 to 16 in
//! flight, so group commit is exercised) submit numbered tasks and append each number to
//! `acknowledged.log` only after `submit` returned `Ok`. Handlers take 0 to 5 ms and append the
//! number to `completed.log` before they return `Ok`. Lines are single `write`s to `O_APPEND`
//! files: a SIGKILL does not lose the page cache, so no fsync is needed.
//!
//! The harness kills with SIGKILL (a) during the submits, after a random number of
//! acknowledgements; (b) during the drain, a few milliseconds after a SIGTERM (the worker runs
//! `run_until_signal`); (c) during the replay: the second generation (sometimes the third too)
//! after it completed a random number of the tasks it replayed, or while it starts; (d) during
//! compaction: with segments of 1 to 4 KiB and one slow task in 40 to 120 pinning its segment,
//! a few milliseconds after the first compaction copied tasks (compactions go on after it as
//! segments fill). It then
//! restarts the worker until a generation runs to empty without a kill, and asserts that every
//! acknowledged number was completed at least once (`lost=0`), that no generation's recovery
//! found damage mid-file, that each one replayed at least the acknowledged tasks still
//! pending, that a worker the kill missed exited 0 with a clean report, and that the journal
//! holds no live task at the end. Repeats (at-least-once) are counted, not failed. A SIGKILL
//! keeps the page cache, so these tests check that a record is written before `submit`
//! returns and that recovery finds it, not the fsync itself.
//!
//! `cargo test --test crash` runs `CRASH_ROUNDS` (default 12) rounds of each kill moment, seeded
//! from `CRASH_SEED`; a failure names its round's seed, and `CRASH_ROUND_SEED=<seed>` runs only
//! that round (`CRASH_KEEP_DIR=1` keeps a failing round's directory). The soak cycles the four
//! moments,
//!
//! ```text
//! SOAK_ROUNDS=1000 cargo test --release --test crash -- --ignored soak
//! ```
//!
//! and its last line reads `rounds=N acknowledged=A lost=0`.

#![cfg(unix)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::child::{
    LedgerFile, Rng, SelfExec, describe, env_u64, field, install_signal_handlers, last_words, read,
    run_worker, shut_down_when_empty, splitmix, tail, task_hash, touch_when_draining,
};
use common::say;
use drainpool::{Durability, Pool, SubmitError, SyncPolicy, Task};
use rustix::process::Signal;
use serde::{Deserialize, Serialize};

/// How the test binary runs itself as a worker: only `crash_worker`, on the directory (ledgers,
/// markers and `journal/`) and the configuration (`key=value` words) these variables name.
const WORKER: SelfExec = SelfExec {
    test: "crash_worker",
    dir_var: "DRAINPOOL_CRASH_WORKER_DIR",
    config_var: "DRAINPOOL_CRASH_WORKER_CONFIG",
    exit_poll: Duration::from_millis(1),
    ready_poll: Duration::from_micros(500),
};

/// Limits on every wait for a worker.
const READY_LIMIT: Duration = Duration::from_secs(15);
const PROGRESS_LIMIT: Duration = Duration::from_secs(15);
const EXIT_LIMIT: Duration = Duration::from_secs(30);
/// Generations in one round before the work must be done.
const MAX_GENERATIONS: u32 = 8;

// ---------------------------------------------------------------------------------------------
// The worker process.
// ---------------------------------------------------------------------------------------------

/// The task payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Work {
    n: u64,
    work_ms: u64,
}

/// One generation of the worker.
#[derive(Debug, Clone)]
struct WorkerConfig {
    generation: u32,
    /// The first task number this generation submits; lower numbers are from earlier ones.
    first: u64,
    count: u64,
    /// Submits in flight at once.
    submitters: usize,
    workers: usize,
    queue: usize,
    seed: u64,
    multi_thread: bool,
    /// Shut down by itself once the producer is done and nothing is queued or running.
    until_empty: bool,
    /// The journal's segment size (0: the default).
    segment_bytes: u64,
    /// Every this many tasks, one runs for `SLOW_MS` (0: none), pinning its segment.
    slow_every: u64,
}

/// How long a slow task runs.
const SLOW_MS: u64 = 400;

impl WorkerConfig {
    fn encode(&self) -> String {
        format!(
            "generation={} first={} count={} submitters={} workers={} queue={} seed={} multi_thread={} until_empty={} segment_bytes={} slow_every={}",
            self.generation,
            self.first,
            self.count,
            self.submitters,
            self.workers,
            self.queue,
            self.seed,
            self.multi_thread,
            self.until_empty,
            self.segment_bytes,
            self.slow_every
        )
    }

    fn decode(text: &str) -> Self {
        let map: HashMap<&str, &str> = text.split(' ').filter_map(|w| w.split_once('=')).collect();
        let get = |key: &str| {
            *map.get(key)
                .unwrap_or_else(|| panic!("no {key} in {text:?}"))
        };
        let num = |key: &str| get(key).parse::<u64>().expect("a number");
        Self {
            generation: num("generation") as u32,
            first: num("first"),
            count: num("count"),
            submitters: num("submitters") as usize,
            workers: num("workers") as usize,
            queue: num("queue") as usize,
            seed: num("seed"),
            multi_thread: get("multi_thread") == "true",
            until_empty: get("until_empty") == "true",
            segment_bytes: num("segment_bytes"),
            slow_every: num("slow_every"),
        }
    }
}

/// The worker: runs only when a crash test starts this binary with a worker directory.
#[test]
#[ignore = "the worker process of the crash tests, which start it themselves"]
fn crash_worker() {
    let Some((dir, config)) = WORKER.worker_env() else {
        return;
    };
    let config = WorkerConfig::decode(&config);
    run_worker(config.multi_thread, worker(dir, config));
}

/// Writes a small file whole: the harness never reads half of it.
fn publish(dir: &Path, name: &str, text: &str) {
    let partial = dir.join(format!("{name}.partial"));
    std::fs::write(&partial, text).expect("a marker file");
    std::fs::rename(&partial, dir.join(name)).expect("a marker file");
}

/// A task's run time, 0 to 5 ms, from the seed and its number; or, with `slow_every`, `SLOW_MS`
/// for every `slow_every`-th task and 0 for the others.
fn work_ms(seed: u64, n: u64, slow_every: u64) -> u64 {
    match slow_every {
        0 => task_hash(seed, n) % 6,
        every if n.is_multiple_of(every) => SLOW_MS,
        _ => 0,
    }
}

async fn worker(dir: PathBuf, config: WorkerConfig) -> i32 {
    let generation = config.generation;
    // Every ledger line, `generation number;`, goes out in one `write`.
    let completed = Arc::new(LedgerFile::open_mended(&dir.join("completed.log")));
    let started = Arc::new(LedgerFile::open_mended(&dir.join("started.log")));
    let handler = move |task: Task<Work>| {
        let Work { n, work_ms } = *task.payload();
        started.line(format!("{generation} {n};\n"));
        let completed = Arc::clone(&completed);
        async move {
            tokio::time::sleep(Duration::from_millis(work_ms)).await;
            completed.line(format!("{generation} {n};\n"));
            Ok::<(), std::io::Error>(())
        }
    };
    let mut builder = Pool::builder();
    if config.segment_bytes > 0 {
        builder = builder.segment_bytes(config.segment_bytes);
    }
    let pool = builder
        .workers(config.workers)
        .queue_capacity(config.queue)
        .drain_deadline(Duration::from_secs(5))
        .durability(Durability::write_ahead(SyncPolicy::Always))
        .journal_dir(dir.join("journal"))
        .start(handler)
        .await;
    let pool = match pool {
        Ok(pool) => pool,
        Err(error) => {
            publish(
                &dir,
                &format!("fatal.{generation}"),
                &format!("start failed: {error}: {error:?}"),
            );
            return 2;
        }
    };
    let recovery = pool.recovery();
    publish(
        &dir,
        &format!("start.{generation}"),
        &format!(
            "replayed={} torn={} damage={} undecodable={} dead_letters={}",
            recovery.replayed,
            recovery.torn_tails.len(),
            recovery.damage.len(),
            recovery.undecodable,
            recovery.dead_letters
        ),
    );

    let mut run = std::pin::pin!(pool.run_until_signal());
    install_signal_handlers(run.as_mut()).await;
    publish(&dir, &format!("ready.{generation}"), "");
    touch_when_draining(&pool, dir.join(format!("draining.{generation}")));
    tokio::spawn({
        // Tells the harness once a compaction has copied tasks.
        let (pool, dir) = (pool.clone(), dir.clone());
        async move {
            while pool.stats().compacted == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let compacted = pool.stats().compacted;
            publish(
                &dir,
                &format!("compacted.{generation}"),
                &compacted.to_string(),
            );
        }
    });

    let producer_done = Arc::new(AtomicBool::new(false));
    let producer = tokio::spawn({
        let pool = pool.clone();
        let done = Arc::clone(&producer_done);
        let acknowledged = Arc::new(LedgerFile::open_mended(&dir.join("acknowledged.log")));
        let errors = Arc::new(LedgerFile::open_mended(&dir.join("submit_errors.log")));
        let config = config.clone();
        async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(config.submitters));
            let stop = Arc::new(AtomicBool::new(false));
            let mut submits = tokio::task::JoinSet::new();
            for n in config.first..config.first + config.count {
                let slot = Arc::clone(&slots)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (pool, acknowledged, errors, stop) = (
                    pool.clone(),
                    Arc::clone(&acknowledged),
                    Arc::clone(&errors),
                    Arc::clone(&stop),
                );
                submits.spawn(async move {
                    let work = Work {
                        n,
                        work_ms: work_ms(config.seed, n, config.slow_every),
                    };
                    match pool.submit(work).await {
                        // Only now is the task the pool's responsibility.
                        Ok(_) => acknowledged.line(format!("{generation} {n};\n")),
                        Err(SubmitError::ShuttingDown(_)) => stop.store(true, Ordering::SeqCst),
                        Err(error) => {
                            errors.line(format!("{generation} {n} {error}: {error:?}\n"));
                            stop.store(true, Ordering::SeqCst);
                        }
                    }
                    drop(slot);
                });
            }
            while let Some(joined) = submits.join_next().await {
                joined.expect("a submitter");
            }
            done.store(true, Ordering::SeqCst);
        }
    });

    if config.until_empty {
        shut_down_when_empty(&pool, &producer_done, Duration::from_millis(2));
    }

    let report = run.await.expect("run_until_signal");
    producer.await.expect("the producer");
    publish(
        &dir,
        &format!("report.{generation}"),
        &format!(
            "replayed={} submitted={} completed={} failed={} retried={} dropped={} spilled={} interrupted={} unsaved={} clean={} journal_error={}",
            report.replayed,
            report.submitted,
            report.completed,
            report.failed,
            report.retried,
            report.dropped,
            report.spilled,
            report.interrupted,
            report.unsaved,
            report.is_clean(),
            report.journal_error.as_ref().map_or_else(
                || "none".to_string(),
                |e| format!("{e:?}").replace(' ', "_")
            ),
        ),
    );
    if report.is_clean() { 0 } else { 1 }
}

// ---------------------------------------------------------------------------------------------
// The harness.
// ---------------------------------------------------------------------------------------------

/// When the harness sends SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    /// While the first generation submits, after a random number of acknowledgements.
    Submits,
    /// A few milliseconds after a SIGTERM started the first generation's drain.
    Drain,
    /// While the second (and sometimes the third) generation replays what the first left.
    Replay,
    /// While the first generation compacts: small segments, some slow tasks pinning them,
    /// killed a random few milliseconds after its first compaction copied tasks.
    Compaction,
}

const MOMENTS: [Moment; 4] = [
    Moment::Submits,
    Moment::Drain,
    Moment::Replay,
    Moment::Compaction,
];

/// Whole lines in a ledger.
fn line_count(path: &Path) -> usize {
    std::fs::read(path)
        .map(|bytes| bytes.iter().filter(|&&b| b == b'\n').count())
        .unwrap_or(0)
}

/// Whole lines of generation `generation` in a ledger.
fn lines_of(path: &Path, generation: u32) -> usize {
    let prefix = format!("{generation} ");
    read(path)
        .split_inclusive('\n')
        .filter(|l| l.ends_with(";\n") && l.starts_with(&prefix))
        .count()
}

/// A `key=value ...` file the worker published, if it did.
fn fields(path: &Path) -> Option<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// The `generation number;` lines of a ledger, and how many lines a SIGKILL cut short (no
/// `;`; never seen so far: each line is one small `write`), which are left out.
fn pairs(dir: &Path, name: &str) -> Result<(Vec<(u32, u64)>, usize), String> {
    let text = read(&dir.join(name));
    let mut out = Vec::new();
    let mut torn = 0;
    for line in text.split_inclusive('\n') {
        let Some(line) = line.strip_suffix(";\n") else {
            torn += 1;
            continue;
        };
        let pair = line
            .split_once(' ')
            .and_then(|(g, n)| Some((g.parse().ok()?, n.parse().ok()?)))
            .ok_or_else(|| format!("malformed line in {name}: {line:?}"))?;
        out.push(pair);
    }
    Ok((out, torn))
}

/// What one generation did.
struct GenRun {
    config: WorkerConfig,
    status: ExitStatus,
    /// What its recovery found, if it got that far.
    start: Option<HashMap<String, String>>,
    report: Option<HashMap<String, String>>,
}

impl GenRun {
    fn killed(&self) -> bool {
        std::os::unix::process::ExitStatusExt::signal(&self.status) == Some(9)
    }
}

/// What a round found.
#[derive(Debug, Default)]
struct Outcome {
    /// Distinct task numbers acknowledged to the producer.
    acknowledged: usize,
    /// Acknowledged numbers never completed: must be zero.
    lost: usize,
    /// What was lost, and what the ledgers say about it.
    lost_detail: String,
    /// Extra completions (at-least-once).
    duplicates: usize,
    /// Completed tasks whose acknowledgement a kill cut off (submitted, journaled, not acked).
    completed_unacknowledged: usize,
    /// SIGKILLs that found the worker running.
    kills: usize,
    /// SIGKILLs that came after the drain began (the pool had left `Running`).
    kills_in_drain: usize,
    /// Drains that finished before their SIGKILL came.
    drains_finished_first: usize,
    /// SIGKILLs that came after a compaction had copied tasks.
    kills_after_compaction: usize,
    /// Tasks the generations' recoveries replayed.
    replayed: u64,
    torn_tails: u64,
    /// Ledger lines a SIGKILL cut short (left out of the checks).
    torn_ledger_lines: usize,
    generations: u32,
}

/// Why a round failed, with what it found if it got to the end (tasks lost).
#[derive(Debug)]
struct Failure {
    message: String,
    outcome: Option<Box<Outcome>>,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self {
            message,
            outcome: None,
        }
    }
}

/// Runs one round in a temporary directory, removed afterwards whatever happened (unless
/// `CRASH_KEEP_DIR` is set and the round failed).
fn run_round(moment: Moment, seed: u64) -> Result<Outcome, Failure> {
    let temp = tempfile::Builder::new()
        .prefix("drainpool-crash-")
        .tempdir()
        .map_err(|e| Failure::from(format!("a temporary directory: {e}")))?;
    let dir = temp.path().to_path_buf();
    let result = run_generations(moment, seed, &dir)
        .map_err(Failure::from)
        .and_then(|outcome| {
            if outcome.lost == 0 {
                Ok(outcome)
            } else {
                Err(Failure {
                    message: format!(
                        "{} acknowledged tasks lost: {}",
                        outcome.lost, outcome.lost_detail
                    ),
                    outcome: Some(Box::new(outcome)),
                })
            }
        });
    let result = result.map_err(|mut failure| {
        // Show the last words of every generation's worker.
        let words = last_words(&dir, MAX_GENERATIONS, Some("fatal"));
        failure.message.push_str(&words);
        failure
    });
    if result.is_err() && std::env::var_os("CRASH_KEEP_DIR").is_some() {
        let kept = temp.keep();
        return result.map_err(|mut failure| {
            let kept = format!("\n(directory kept: {})", kept.display());
            failure.message.push_str(&kept);
            failure
        });
    }
    temp.close()
        .map_err(|e| Failure::from(format!("removing the temporary directory: {e}")))?;
    result
}

fn run_generations(moment: Moment, seed: u64, dir: &Path) -> Result<Outcome, String> {
    let mut rng = Rng::new(seed);
    let mut outcome = Outcome::default();
    let acknowledged = dir.join("acknowledged.log");
    let completed = dir.join("completed.log");

    // Generation 1: submits, and is killed. For the replay, one or two slow workers and a deep
    // queue leave a long backlog in the journal.
    let compaction = moment == Moment::Compaction;
    let count = if compaction {
        rng.range(600, 1_000)
    } else {
        rng.range(100, 300)
    };
    let config = WorkerConfig {
        generation: 1,
        first: 0,
        count,
        submitters: rng.range(4, 16) as usize,
        workers: match moment {
            Moment::Replay => rng.range(1, 2),
            Moment::Compaction => 16,
            Moment::Submits | Moment::Drain => rng.range(2, 4),
        } as usize,
        queue: if moment == Moment::Replay {
            512
        } else {
            rng.range(16, 128) as usize
        },
        seed,
        multi_thread: rng.coin(),
        until_empty: false,
        segment_bytes: if compaction {
            rng.range(1_024, 4_096)
        } else {
            0
        },
        slow_every: if compaction { rng.range(40, 120) } else { 0 },
    };
    let mut next = count;
    let mut worker = WORKER.spawn(dir, config.generation, &config.encode(), None)?;
    let ready = dir.join("ready.1");
    if !worker.wait_until(READY_LIMIT, "ready marker", || ready.exists())? {
        return Err("generation 1 exited before it was ready".into());
    }
    let after = match moment {
        Moment::Submits | Moment::Drain => rng.range(0, count - 1),
        Moment::Replay => rng.range(count / 3, count - 1),
        // Until the first compaction (or the last submit), then a few milliseconds.
        Moment::Compaction => count,
    } as usize;
    let compacted = dir.join("compacted.1");
    if !worker.wait_until(PROGRESS_LIMIT, "acknowledgements", || {
        line_count(&acknowledged) >= after || (compaction && compacted.exists())
    })? {
        return Err("generation 1 exited by itself".into());
    }
    if compaction {
        std::thread::sleep(Duration::from_micros(rng.range(0, 10_000)));
    }
    if moment == Moment::Drain {
        worker.signal(Signal::TERM, "SIGTERM")?;
        std::thread::sleep(Duration::from_micros(rng.range(0, 6_000)));
    }
    worker.signal(Signal::KILL, "SIGKILL")?;
    let status = worker.wait(EXIT_LIMIT)?;
    drop(worker);
    let mut runs = vec![collect(dir, config, status)];
    let first = &runs[0];
    match (moment, first.killed(), first.status.code()) {
        (Moment::Drain, true, _) if dir.join("draining.1").exists() => {
            outcome.kills += 1;
            outcome.kills_in_drain += 1;
        }
        (Moment::Compaction, true, _) if compacted.exists() => {
            outcome.kills += 1;
            outcome.kills_after_compaction += 1;
        }
        (_, true, _) => outcome.kills += 1,
        // The drain may finish before the SIGKILL comes.
        (Moment::Drain, false, Some(0)) => outcome.drains_finished_first += 1,
        _ => return Err(unexpected_end(dir, first)),
    }

    // Restarts until one runs to empty without a kill.
    let replay_kills = if moment == Moment::Replay {
        rng.range(1, 2) as u32
    } else {
        0
    };
    let mut done = false;
    for generation in 2..=MAX_GENERATIONS {
        let count = if generation == 2 { rng.range(0, 20) } else { 0 };
        let config = WorkerConfig {
            generation,
            first: next,
            count,
            submitters: rng.range(4, 16) as usize,
            workers: rng.range(2, 4) as usize,
            queue: 64,
            seed,
            multi_thread: rng.coin(),
            until_empty: true,
            segment_bytes: 0,
            slow_every: 0,
        };
        next += count;
        let mut worker = WORKER.spawn(dir, config.generation, &config.encode(), None)?;
        if generation <= 1 + replay_kills {
            let start = dir.join(format!("start.{generation}"));
            let running = if rng.range(0, 3) == 0 {
                // While it starts: opening, recovering, or just replaying.
                std::thread::sleep(Duration::from_micros(rng.range(0, 40_000)));
                true
            } else if worker.wait_until(READY_LIMIT, "recovery", || start.exists())? {
                let replayed = fields(&start)
                    .map(|f| field(&f, "replayed"))
                    .transpose()?
                    .unwrap_or(0);
                let enough = rng.range(1, replayed.saturating_sub(1).max(1)) as usize;
                worker.wait_until(PROGRESS_LIMIT, "replayed completions", || {
                    lines_of(&completed, generation) >= enough
                })?
            } else {
                false
            };
            if running {
                worker.signal(Signal::KILL, "SIGKILL")?;
            }
        }
        let status = worker.wait(EXIT_LIMIT)?;
        drop(worker);
        let run = collect(dir, config, status);
        if run.killed() {
            outcome.kills += 1;
        } else if run.status.code() != Some(0) {
            return Err(unexpected_end(dir, &run));
        } else {
            let report = run
                .report
                .as_ref()
                .ok_or_else(|| format!("generation {generation} exited without a report"))?;
            // It ran to empty: nothing is left to spill.
            done = field(report, "spilled")? + field(report, "interrupted")? == 0;
        }
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
    check(dir, &runs, outcome)
}

/// A worker that ended neither by the harness's SIGKILL nor with success: what it said.
fn unexpected_end(dir: &Path, run: &GenRun) -> String {
    format!(
        "generation {} ended with {}; start {:?}, report {:?}, submit errors {:?}",
        run.config.generation,
        run.status,
        run.start,
        run.report,
        tail(&read(&dir.join("submit_errors.log")), 3)
    )
}

fn collect(dir: &Path, config: WorkerConfig, status: ExitStatus) -> GenRun {
    let generation = config.generation;
    GenRun {
        start: fields(&dir.join(format!("start.{generation}"))),
        report: fields(&dir.join(format!("report.{generation}"))),
        config,
        status,
    }
}

/// Checks the ledgers, the recoveries and the reports of a round.
fn check(dir: &Path, runs: &[GenRun], mut outcome: Outcome) -> Result<Outcome, String> {
    let (acks, torn_acks) = pairs(dir, "acknowledged.log")?;
    let (completions, torn_completions) = pairs(dir, "completed.log")?;
    let (starts, _) = pairs(dir, "started.log")?;
    outcome.torn_ledger_lines = torn_acks + torn_completions;
    let errors = read(&dir.join("submit_errors.log"));
    if !errors.is_empty() {
        return Err(format!("submit failed:\n{}", tail(&errors, 5)));
    }
    outcome.generations = runs.len() as u32;

    // Acknowledged once each, and only numbers that generation submitted.
    let mut acked: BTreeMap<u64, u32> = BTreeMap::new();
    for &(g, n) in &acks {
        let config = runs
            .iter()
            .map(|r| &r.config)
            .find(|c| c.generation == g)
            .ok_or_else(|| format!("an acknowledgement from unknown generation {g}"))?;
        if !(config.first..config.first + config.count).contains(&n) {
            return Err(format!(
                "generation {g} acknowledged {n}, not one of its tasks"
            ));
        }
        if acked.insert(n, g).is_some() {
            return Err(format!("task {n} was acknowledged twice"));
        }
    }
    let submitted_end = runs
        .iter()
        .map(|r| r.config.first + r.config.count)
        .max()
        .unwrap_or(0);
    let mut times: BTreeMap<u64, usize> = BTreeMap::new();
    for &(_, n) in &completions {
        if n >= submitted_end {
            return Err(format!("task {n} completed but was never submitted"));
        }
        *times.entry(n).or_default() += 1;
    }

    // The loss first: the checks below explain it, when there is one.
    outcome.acknowledged = acked.len();
    outcome.duplicates = times.values().map(|&c| c - 1).sum();
    outcome.completed_unacknowledged = times.keys().filter(|n| !acked.contains_key(n)).count();
    let lost: BTreeSet<u64> = acked
        .keys()
        .copied()
        .filter(|n| !times.contains_key(n))
        .collect();
    outcome.lost = lost.len();

    let mut problems = Vec::new();
    for run in runs {
        let g = run.config.generation;
        let Some(start) = &run.start else {
            if !run.killed() {
                problems.push(format!("generation {g} published no recovery"));
            }
            continue; // killed before its recovery was done
        };
        let replayed = field(start, "replayed")?;
        outcome.replayed += replayed;
        outcome.torn_tails += field(start, "torn")?;
        // A SIGKILL keeps the page cache: records can be cut short at the end, never damaged
        // in the middle.
        for key in ["damage", "undecodable", "dead_letters"] {
            if field(start, key)? != 0 {
                problems.push(format!("generation {g}'s recovery found {key}: {start:?}"));
            }
        }
        // Every acknowledged task not completed before this start is in the journal.
        let done_before: BTreeSet<u64> = completions
            .iter()
            .filter(|&&(h, _)| h < g)
            .map(|&(_, n)| n)
            .collect();
        let pending: BTreeSet<u64> = acks
            .iter()
            .filter(|&&(h, n)| h < g && !done_before.contains(&n))
            .map(|&(_, n)| n)
            .collect();
        if replayed < pending.len() as u64 {
            problems.push(format!(
                "generation {g} replayed {replayed} tasks, but {} acknowledged ones were pending: {}",
                pending.len(),
                describe(&pending)
            ));
        }
        if let Some(report) = &run.report {
            let get = |key: &str| field(report, key);
            if report.get("clean").map(String::as_str) != Some("true")
                || ["failed", "retried", "dropped", "unsaved"]
                    .iter()
                    .any(|key| get(key).ok() != Some(0))
            {
                problems.push(format!("generation {g}: unclean report: {report:?}"));
            }
            if get("replayed")? != replayed {
                problems.push(format!(
                    "generation {g}: report and recovery disagree: {report:?} {start:?}"
                ));
            }
        }
    }

    // The last generation ran to empty and shut down cleanly: nothing is left to replay.
    match drainpool::journal::inspect(&dir.join("journal")) {
        Ok(contents) if contents.live.is_empty() && contents.damage == 0 => {}
        Ok(contents) => problems.push(format!(
            "after a clean run to empty the journal holds {} live tasks (first {:?}) and {} damage",
            contents.live.len(),
            contents.live.first().map(|t| t.id),
            contents.damage
        )),
        Err(e) => problems.push(format!("inspecting the journal: {e}")),
    }

    if lost.is_empty() {
        return if problems.is_empty() {
            Ok(outcome)
        } else {
            Err(problems.join("\n"))
        };
    }
    let mut detail = describe(&lost);
    for &n in lost.iter().take(5) {
        let ran: Vec<u32> = starts
            .iter()
            .filter(|&&(_, m)| m == n)
            .map(|&(g, _)| g)
            .collect();
        detail.push_str(&format!(
            "\n  task {n}: acknowledged in generation {}, started in generations {ran:?}",
            acked[&n]
        ));
    }
    for problem in &problems {
        detail.push_str(&format!("\n  {problem}"));
    }
    for run in runs {
        detail.push_str(&format!(
            "\n  generation {} ({}): {:?} start {:?} report {:?}",
            run.config.generation,
            run.status,
            run.config.encode(),
            run.start,
            run.report
        ));
    }
    outcome.lost_detail = detail;
    Ok(outcome)
}

// ---------------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------------

fn round_seed(moment: Moment, round: u64) -> u64 {
    let base = env_u64("CRASH_SEED").unwrap_or(0xC2A5_D2A1_4900_0001);
    splitmix(base ^ ((moment as u64 + 1) << 48) ^ round)
}

/// Totals over rounds.
#[derive(Debug, Default)]
struct Totals {
    rounds: u64,
    acknowledged: usize,
    lost: usize,
    duplicates: usize,
    completed_unacknowledged: usize,
    kills: usize,
    kills_in_drain: usize,
    drains_finished_first: usize,
    kills_after_compaction: usize,
    replayed: u64,
    torn_tails: u64,
    torn_ledger_lines: usize,
    most_generations: u32,
}

impl Totals {
    fn add(&mut self, o: &Outcome) {
        self.rounds += 1;
        self.acknowledged += o.acknowledged;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.completed_unacknowledged += o.completed_unacknowledged;
        self.kills += o.kills;
        self.kills_in_drain += o.kills_in_drain;
        self.drains_finished_first += o.drains_finished_first;
        self.kills_after_compaction += o.kills_after_compaction;
        self.replayed += o.replayed;
        self.torn_tails += o.torn_tails;
        self.torn_ledger_lines += o.torn_ledger_lines;
        self.most_generations = self.most_generations.max(o.generations);
    }

    fn summary(&self) -> String {
        format!(
            "kills {} (in a drain {}; drains finished before the kill {}; after a compaction {}), replayed {}, torn tails {}, ledger lines cut short {}, duplicates {}, completed but never acknowledged {}, up to {} generations",
            self.kills,
            self.kills_in_drain,
            self.drains_finished_first,
            self.kills_after_compaction,
            self.replayed,
            self.torn_tails,
            self.torn_ledger_lines,
            self.duplicates,
            self.completed_unacknowledged,
            self.most_generations
        )
    }
}

fn run_moment(moment: Moment, test: &str) {
    let seeds: Vec<u64> = match env_u64("CRASH_ROUND_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("CRASH_ROUNDS").unwrap_or(12))
            .map(|round| round_seed(moment, round))
            .collect(),
    };
    let started = Instant::now();
    let mut totals = Totals::default();
    for (round, &seed) in seeds.iter().enumerate() {
        let outcome = run_round(moment, seed).unwrap_or_else(|failure| {
            panic!(
                "{moment:?} round {round} (seed {seed:#x}): {}\nreproduce: CRASH_ROUND_SEED={seed:#x} cargo test --test crash {test}",
                failure.message
            )
        });
        totals.add(&outcome);
    }
    say(&format!(
        "crash {moment:?}: {} rounds in {:.1} s: acknowledged {}, lost {}; {}",
        totals.rounds,
        started.elapsed().as_secs_f64(),
        totals.acknowledged,
        totals.lost,
        totals.summary()
    ));
    assert_eq!(totals.lost, 0);
    if moment == Moment::Compaction && seeds.len() > 1 {
        assert!(
            totals.kills_after_compaction > 0,
            "no kill came after a compaction: {}",
            totals.summary()
        );
    }
}

#[test]
fn sigkill_during_submits() {
    run_moment(Moment::Submits, "sigkill_during_submits");
}

#[test]
fn sigkill_during_the_drain() {
    run_moment(Moment::Drain, "sigkill_during_the_drain");
}

#[test]
fn sigkill_during_replay() {
    run_moment(Moment::Replay, "sigkill_during_replay");
}

#[test]
fn sigkill_during_compaction() {
    run_moment(Moment::Compaction, "sigkill_during_compaction");
}

/// `SOAK_ROUNDS=1000 cargo test --release --test crash -- --ignored soak`
#[test]
#[ignore = "a long soak: run it by name"]
fn soak() {
    let rounds = env_u64("SOAK_ROUNDS").unwrap_or(30);
    let started = Instant::now();
    let mut totals = Totals::default();
    let mut failures = Vec::new();
    for round in 0..rounds {
        let moment = MOMENTS[(round % MOMENTS.len() as u64) as usize];
        let seed = round_seed(moment, 1_000_000 + round);
        match run_round(moment, seed) {
            Ok(outcome) => totals.add(&outcome),
            Err(failure) => {
                // A round that lost tasks got to the end: count what it found.
                if let Some(outcome) = &failure.outcome {
                    totals.add(outcome);
                }
                say(&format!(
                    "FAILED {moment:?} round {round} (seed {seed:#x}): {}",
                    failure.message
                ));
                failures.push(format!("{moment:?} round {round} (seed {seed:#x})"));
            }
        }
        if (round + 1) % 50 == 0 && round + 1 < rounds {
            say(&format!(
                "soak: {} rounds in {:.0} s",
                round + 1,
                started.elapsed().as_secs_f64()
            ));
        }
    }
    say(&format!(
        "soak: {rounds} rounds in {:.0} s, failures {}; {}",
        started.elapsed().as_secs_f64(),
        failures.len(),
        totals.summary()
    ));
    say(&format!(
        "rounds={rounds} acknowledged={} lost={}",
        totals.acknowledged, totals.lost
    ));
    assert!(failures.is_empty(), "failed rounds: {failures:?}");
    assert_eq!(totals.lost, 0, "acknowledged tasks were lost");
}
