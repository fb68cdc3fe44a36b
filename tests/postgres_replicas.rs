//! Replicas of a Deployment on one PostgreSQL table, played for real: three replica processes
//! (this test binary started again, running the ignored test `replica_main`), each on a fresh
//! directory of its own, under continuous load.
//!
//! 1. **A rolling restart**: each replica in turn is stopped the way the kubelet stops a pod
//!    (SIGTERM, the grace period, SIGKILL if still alive) and replaced by a new one on a new,
//!    empty directory. What the leaving replica held (its queue at the SIGTERM, its tasks
//!    interrupted at the drain deadline) is handed off, and the replicas that stay run it.
//! 2. **A replica SIGKILLed**: a replica that only claims (tasks handed off by a pool in the
//!    harness) is killed while it holds leases; the others rescue those tasks once the leases
//!    expire, within the lease time.
//! 3. **A write-ahead replica SIGKILLed under load**: three replicas in write-ahead mode, each
//!    with concurrent producers; one is killed mid-load. Every task whose `submit` returned
//!    `Ok` was committed first, so its queue, its running tasks and its finished-but-not-yet-
//!    deleted ones are all rows leased to it: the others rescue them within the lease time.
//!
//! The verdict comes from two ledgers the processes append to: every task `submit` accepted,
//! and every task a handler finished (with whether its previous run was interrupted). No
//! accepted task may be missing; a task may finish twice only if the later run was told its
//! previous one was interrupted (a drain deadline, or a rescue).
//!
//! `cargo test --features postgres --test postgres_replicas`; under `CI=true` a missing
//! database fails it.

#![cfg(all(unix, feature = "postgres"))]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::child::{LedgerFile, SelfExec, Worker, last_words, read, run_worker, said};
use common::pg::Schema;
use drainpool::{Durability, Pool, PostgresStore, SubmitError, SyncPolicy, Task};
use rustix::process::Signal;

const REPLICA: SelfExec = SelfExec {
    test: "replica_main",
    dir_var: "DRAINPOOL_REPLICA_DIR",
    config_var: "DRAINPOOL_REPLICA_CONFIG",
    exit_poll: Duration::from_millis(5),
    ready_poll: Duration::from_millis(5),
};

/// The lease of every replica.
const LEASE: Duration = Duration::from_secs(2);
/// The kubelet's grace period: SIGKILL after it.
const GRACE: Duration = Duration::from_secs(5);
/// Every wait for a state, bounded.
const LIMIT: Duration = Duration::from_secs(20);

/// What a replica does, from the harness.
#[derive(Debug, Clone)]
struct Config {
    url: String,
    schema: String,
    ledgers: PathBuf,
    /// The first task number its producer submits; 0: no producer (it only claims).
    first: u64,
    /// The number of the one task it submits at start, to learn its run (an id's high half):
    /// a task of no work, in neither ledger (a SIGKILL may take it, as it takes every task a
    /// pool holds only in memory).
    marker: u64,
    /// Write-ahead durability (every accepted task committed first), with concurrent
    /// producers; otherwise on-shutdown, with one.
    write_ahead: bool,
}

impl Config {
    fn encode(&self) -> String {
        format!(
            "{}\n{}\n{}\n{}\n{}\n{}",
            self.url,
            self.schema,
            self.ledgers.display(),
            self.first,
            self.marker,
            self.write_ahead
        )
    }

    fn decode(text: &str) -> Self {
        let mut lines = text.lines();
        let mut next = || lines.next().expect("a replica config line").to_string();
        Self {
            url: next(),
            schema: next(),
            ledgers: PathBuf::from(next()),
            first: next().parse().expect("first"),
            marker: next().parse().expect("marker"),
            write_ahead: next().parse().expect("write_ahead"),
        }
    }

    fn store(&self) -> PostgresStore {
        PostgresStore::new(&self.url)
            .schema(self.schema.clone())
            .lease(LEASE)
            .claim_batch(16)
            .poll_interval(Duration::from_millis(200))
            .timeout(Duration::from_secs(2))
    }
}

/// The first number of the tasks the harness hands off for the SIGKILL.
const FED: u64 = 900_000_000;

/// Concurrent producers of a write-ahead replica: at most this many of its submits can be
/// committed and not yet in the ledger when it is killed.
const WRITE_AHEAD_PRODUCERS: usize = 3;

/// The first marker task's number (see [`Config::marker`]).
const MARKERS: u64 = 500_000_000;

fn is_marker(n: u64) -> bool {
    (MARKERS..MARKERS + 1_000_000).contains(&n)
}

/// A task's work: most take a few milliseconds (fed ones 300 ms); one in 200 takes 1.5 s, past the drain
/// deadline, and gives up when its token fires (so a SIGTERM interrupts it).
fn work(n: u64) -> Duration {
    if n >= FED {
        // Long enough that the victim of the SIGKILL holds some when it dies.
        Duration::from_millis(300)
    } else if n % 200 == 7 {
        Duration::from_millis(1500)
    } else {
        Duration::from_millis(2 + n % 9)
    }
}

/// The replica process: runs only when the harness starts this binary with a configuration.
#[test]
#[ignore = "a replica process of the replica tests, which start it themselves"]
fn replica_main() {
    let Some((dir, config)) = REPLICA.worker_env() else {
        return;
    };
    run_worker(true, replica(dir, Config::decode(&config)));
}

async fn replica(dir: PathBuf, config: Config) -> i32 {
    let done = Arc::new(LedgerFile::open(&config.ledgers.join("done.log")));
    let accepted = Arc::new(LedgerFile::open(&config.ledgers.join("accepted.log")));
    let durability = if config.write_ahead {
        Durability::write_ahead(SyncPolicy::Always)
    } else {
        Durability::on_shutdown()
    };
    let pid = std::process::id();
    let pool = Pool::builder()
        // The one that only claims (the SIGKILL's victim) holds a few tasks at a time.
        .workers(if config.first > 0 { 8 } else { 4 })
        .queue_capacity(if config.first > 0 { 64 } else { 8 })
        // A long task may be interrupted by every leaving replica in turn: not a poison.
        .max_interruptions(20)
        .drain_deadline(Duration::from_secs(1))
        .cancel_grace(Duration::from_millis(250))
        .durability(durability)
        .journal_dir(dir.join("journal"))
        .postgres(config.store())
        .start(move |task: Task<u64>| {
            let done = Arc::clone(&done);
            async move {
                let n = *task.payload();
                if is_marker(n) {
                    return Ok(());
                }
                tokio::select! {
                    () = tokio::time::sleep(work(n)) => {}
                    () = task.cancelled() => return Err("interrupted"),
                }
                // The side effect, once the work is done.
                done.line(format!("{n} {} {pid}\n", u8::from(task.was_interrupted())));
                Ok(())
            }
        })
        .await
        .expect("replica start");
    // The run number (an id's high half) is the owner of this replica's leases.
    let Ok(marker) = pool.submit(config.marker).await else {
        return 3;
    };
    let run = marker.run();
    println!("ready run={run}");
    let (producers, pace) = match (config.first, config.write_ahead) {
        (0, _) => (0, Duration::ZERO),
        (_, false) => (1, Duration::from_millis(4)),
        // Concurrent submits, sharing commits.
        (_, true) => (WRITE_AHEAD_PRODUCERS, Duration::from_millis(8)),
    };
    let next = Arc::new(AtomicU64::new(config.first));
    let producers: Vec<_> = (0..producers)
        .map(|_| {
            let (pool, next, accepted) = (pool.clone(), Arc::clone(&next), Arc::clone(&accepted));
            let stop = config.ledgers.join("stop-producing");
            tokio::spawn(async move {
                while !stop.exists() {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    match pool.submit(n).await {
                        Ok(_) => accepted.line(format!("{n}\n")),
                        Err(SubmitError::ShuttingDown(_)) => return,
                        Err(error) => panic!("submit: {error}"),
                    }
                    tokio::time::sleep(pace).await;
                }
            })
        })
        .collect();
    let report = pool.run_until_signal().await.expect("signal handlers");
    for producer in producers {
        let _ = producer.await;
    }
    println!(
        "report replayed={} submitted={} completed={} spilled={} interrupted={} handed_off={} \
         dropped={} failed={} unsaved={} error={:?}",
        report.replayed,
        report.submitted,
        report.completed,
        report.spilled,
        report.interrupted,
        report.handed_off,
        report.dropped,
        report.failed,
        report.unsaved,
        report.handoff_error.as_ref().map(ToString::to_string),
    );
    if report.is_clean() && report.handoff_error.is_none() {
        0
    } else {
        1
    }
}

/// One replica process and its directory.
struct Replica {
    process: Worker,
    dir: PathBuf,
    run: u64,
}

/// The harness's side: the schema, the ledgers, the replicas.
struct Harness {
    schema: Schema,
    base: tempfile::TempDir,
    started: u32,
    /// Whether the replicas it starts are in write-ahead mode.
    write_ahead: bool,
}

impl Harness {
    /// Replicas in write-ahead mode or not, on `schema`, with fresh ledgers.
    fn new(schema: Schema, write_ahead: bool) -> Self {
        Self {
            schema,
            base: tempfile::tempdir().expect("a temporary directory"),
            started: 0,
            write_ahead,
        }
    }

    fn ledgers(&self) -> PathBuf {
        self.base.path().to_path_buf()
    }

    /// Starts a replica on a fresh directory; waits until it is running.
    fn start(&mut self, first: u64) -> Replica {
        self.started += 1;
        let dir = self.base.path().join(format!("replica-{}", self.started));
        std::fs::create_dir(&dir).expect("a replica directory");
        let config = Config {
            url: self.schema.url.clone(),
            schema: self.schema.name.clone(),
            ledgers: self.ledgers(),
            first,
            marker: MARKERS + u64::from(self.started) * 1000,
            write_ahead: self.write_ahead,
        };
        let mut process = REPLICA
            .spawn(&dir, 1, &config.encode(), None)
            .expect("a replica process");
        let out = dir.join("out.1");
        let ready = process.wait_for(LIMIT, "the replica to start", || {
            read(&out).contains("ready run=")
        });
        if let Err(error) = ready {
            panic!("{error}{}", last_words(&dir, 1, None));
        }
        let run = said(&out, "ready run=")
            .and_then(|r| r.parse().ok())
            .expect("the replica's run");
        Replica { process, dir, run }
    }

    /// Stops a replica as the kubelet does: SIGTERM, then SIGKILL if it outlives the grace
    /// period. Returns whether it exited cleanly by itself, and how long it took.
    fn kubelet_stop(&self, replica: &mut Replica) -> (bool, Duration) {
        let sent = Instant::now();
        replica
            .process
            .signal(Signal::TERM, "SIGTERM")
            .expect("SIGTERM");
        let clean = match replica.process.wait(GRACE) {
            Ok(status) => status.success(),
            // `wait` killed it at the end of the grace period.
            Err(_) => false,
        };
        if !clean {
            eprintln!("{}", last_words(&replica.dir, 1, None));
        } else {
            // No task set aside as a dead letter: each stays in the ledgers' reckoning.
            assert_eq!(Self::reported(replica, "failed"), 0, "a dead letter");
        }
        (clean, sent.elapsed())
    }

    /// A number from a stopped replica's report line.
    fn reported(replica: &Replica, key: &str) -> u64 {
        let out = read(&replica.dir.join("out.1"));
        out.lines()
            .filter_map(|l| l.split_once("report ").map(|(_, r)| r.to_string()))
            .flat_map(|r| r.split(' ').map(str::to_string).collect::<Vec<_>>())
            .find_map(|kv| {
                kv.strip_prefix(&format!("{key}="))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or_else(|| panic!("no {key} in the report of {}: {out}", replica.dir.display()))
    }

    fn done(&self) -> BTreeMap<u64, Vec<bool>> {
        let mut done: BTreeMap<u64, Vec<bool>> = BTreeMap::new();
        for line in read(&self.ledgers().join("done.log")).lines() {
            let mut words = line.split(' ');
            let (Some(n), Some(flag)) = (words.next(), words.next()) else {
                continue;
            };
            if let Ok(n) = n.parse() {
                done.entry(n).or_default().push(flag == "1");
            }
        }
        done
    }

    fn accepted(&self) -> BTreeSet<u64> {
        read(&self.ledgers().join("accepted.log"))
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }

    /// Waits until `count` more tasks are done than `before`.
    fn progress(&self, before: usize, count: usize) {
        let started = Instant::now();
        while self.done().values().map(Vec::len).sum::<usize>() < before + count {
            assert!(started.elapsed() < LIMIT, "no progress in {LIMIT:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn done_count(&self) -> usize {
        self.done().values().map(Vec::len).sum()
    }

    /// Rows leased to `run`.
    fn leased_to(&self, run: u64) -> u64 {
        self.schema.number(&format!(
            "SELECT count(*) FROM {{t}} WHERE lease_owner = {run}"
        ))
    }

    /// The verdict: nothing accepted lost, duplicates only where the later run was told of an
    /// interruption; a task finished but never recorded as accepted only among `unrecorded`
    /// numbers, at most `most` (a write-ahead replica killed between a submit's commit and
    /// its ledger line). Returns (accepted, duplicates, reruns after an interruption).
    fn verdict(&self, unrecorded: std::ops::Range<u64>, most: usize) -> (usize, usize, usize) {
        let accepted = self.accepted();
        let done = self.done();
        let lost: Vec<u64> = accepted
            .iter()
            .filter(|n| !done.contains_key(n))
            .copied()
            .collect();
        assert!(
            lost.is_empty(),
            "lost {} accepted tasks: {:?}",
            lost.len(),
            &lost[..lost.len().min(20)]
        );
        let strays: Vec<&u64> = done.keys().filter(|n| !accepted.contains(n)).collect();
        assert!(
            strays.len() <= most && strays.iter().all(|n| unrecorded.contains(n)),
            "finished but never accepted: {strays:?}"
        );
        let mut duplicates = 0;
        for (n, runs) in &done {
            duplicates += runs.len() - 1;
            assert!(
                runs.iter().skip(1).all(|&interrupted| interrupted),
                "task {n} finished {} times without an interruption between: {runs:?}",
                runs.len()
            );
        }
        let after_interruption = done.values().flatten().filter(|&&i| i).count();
        (accepted.len(), duplicates, after_interruption)
    }
}

#[test]
fn a_rolling_restart_and_a_sigkill_lose_no_accepted_task() {
    let Some(schema) = Schema::new("replicas") else {
        return;
    };
    let test_started = Instant::now();
    let mut harness = Harness::new(schema, false);
    let mut replicas: Vec<Replica> = (1..=3).map(|i| harness.start(i * 1_000_000)).collect();
    harness.progress(0, 200);

    // 1. The rolling restart: each replica replaced by a new one on an empty directory.
    let (mut handed_off, mut interrupted) = (0, 0);
    for i in 0..3 {
        let before = harness.done_count();
        let mut leaving = replicas.remove(0);
        let (clean, took) = harness.kubelet_stop(&mut leaving);
        assert!(
            clean,
            "replica {i} did not stop cleanly within the grace ({took:?})"
        );
        handed_off += Harness::reported(&leaving, "handed_off");
        interrupted += Harness::reported(&leaving, "interrupted");
        replicas.push(harness.start((10 + i as u64) * 1_000_000));
        harness.progress(before, 100);
    }
    assert!(handed_off > 0, "the rolling restart handed off nothing");

    // 2. A replica that only claims is SIGKILLed while it holds leases.
    let victim = harness.start(0);
    let fed = feed(&harness, FED, 120);
    let started = Instant::now();
    while harness.leased_to(victim.run) == 0 {
        assert!(started.elapsed() < LIMIT, "the victim never claimed a task");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (orphaned, rescued_after) = harness.sigkill(victim);

    harness.wind_down(replicas);
    let (accepted, duplicates, after_interruption) = harness.verdict(0..0, 0);
    assert!(accepted > fed as usize + 500, "too little load: {accepted}");
    assert_eq!(harness.schema.rows(), 0, "every finished task is deleted");
    common::say(&format!(
        "replicas: accepted={accepted} lost=0 duplicates={duplicates} handed_off={handed_off} \
         interrupted={interrupted} reruns_after_interruption={after_interruption} \
         victim_leases={orphaned} \
         rescued_after_ms={} test_ms={}",
        rescued_after.as_millis(),
        test_started.elapsed().as_millis()
    ));
}

impl Harness {
    /// SIGKILLs a replica and waits until no row is leased to it any more (each rescued by
    /// another replica, or finished there), which must take no longer than the lease and a
    /// poll. Returns how many rows it held when killed, and how long the rescue took.
    fn sigkill(&self, victim: Replica) -> (u64, Duration) {
        let Replica {
            mut process, run, ..
        } = victim;
        process.signal(Signal::KILL, "SIGKILL").expect("SIGKILL");
        let killed = Instant::now();
        let _ = process.wait(LIMIT);
        let orphaned = self.leased_to(run);
        while self.leased_to(run) > 0 {
            assert!(
                killed.elapsed() < LIMIT,
                "the victim's leases were never rescued"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let rescued_after = killed.elapsed();
        // Expiry within the lease, then a claim at the next poll of a replica with room.
        assert!(
            rescued_after < LEASE + Duration::from_secs(1),
            "rescued after {rescued_after:?}"
        );
        (orphaned, rescued_after)
    }

    /// The load stops; everything accepted finishes (or the verdict names what is missing);
    /// the replicas leave as the kubelet makes them, each cleanly.
    fn wind_down(&self, replicas: Vec<Replica>) {
        std::fs::write(self.ledgers().join("stop-producing"), b"").unwrap();
        let started = Instant::now();
        while started.elapsed() < LIMIT {
            let done = self.done();
            if self.accepted().iter().all(|n| done.contains_key(n)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for mut replica in replicas {
            let (clean, took) = self.kubelet_stop(&mut replica);
            assert!(clean, "a replica did not stop cleanly ({took:?})");
        }
    }
}

#[test]
fn a_write_ahead_replica_sigkilled_under_load_loses_no_accepted_task() {
    let Some(schema) = Schema::new("replicas_wa") else {
        return;
    };
    let test_started = Instant::now();
    let mut harness = Harness::new(schema, true);
    let mut replicas: Vec<Replica> = (1..=3).map(|i| harness.start(i * 1_000_000)).collect();
    harness.progress(0, 300);

    // The first replica, mid-load, holding rows: killed.
    let victim = replicas.remove(0);
    let started = Instant::now();
    while harness.leased_to(victim.run) < 5 {
        assert!(started.elapsed() < LIMIT, "the victim holds no rows");
        std::thread::sleep(Duration::from_millis(2));
    }
    let before = harness.done_count();
    let (orphaned, rescued_after) = harness.sigkill(victim);
    // The others go on.
    harness.progress(before, 200);

    harness.wind_down(replicas);
    // The victim's producers' numbers: 1,000,000 on.
    let (accepted, duplicates, after_interruption) =
        harness.verdict(1_000_000..2_000_000, WRITE_AHEAD_PRODUCERS);
    assert!(accepted > 600, "too little load: {accepted}");
    assert_eq!(harness.schema.rows(), 0, "every finished task is deleted");
    common::say(&format!(
        "write-ahead replicas: accepted={accepted} lost=0 duplicates={duplicates} \
         reruns_after_interruption={after_interruption} victim_rows={orphaned} \
         rescued_after_ms={} test_ms={}",
        rescued_after.as_millis(),
        test_started.elapsed().as_millis()
    ));
}

/// Hands off `count` tasks numbered from `first` through a pool in this process (no workers:
/// all stay queued until its shutdown), recording them as accepted.
fn feed(harness: &Harness, first: u64, count: u64) -> u64 {
    let runtime = common::current_thread_runtime();
    let dir = harness.base.path().join("feeder");
    let accepted = LedgerFile::open(&harness.ledgers().join("accepted.log"));
    let store = PostgresStore::new(&harness.schema.url).schema(harness.schema.name.clone());
    runtime.block_on(async {
        let (pool, runner) = Pool::builder()
            .journal_dir(&dir)
            .postgres(store)
            .queue_capacity(count as usize)
            .build()
            .await
            .expect("the feeder");
        drop(runner);
        for n in first..first + count {
            pool.submit(n).await.expect("feed");
            accepted.line(format!("{n}\n"));
        }
        let report = pool.shutdown().await.expect("the feeder's report");
        assert_eq!(report.handed_off, count, "{report:?}");
    });
    count
}
