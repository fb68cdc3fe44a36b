//! The `metrics` feature: a recorder installed for this whole test binary (the pool's workers
//! and background tasks record from other threads than the test's, so a thread-local recorder
//! would miss them), pools told apart by their `pool` label, and every counter equal to the
//! count the pool reports.

#![cfg(feature = "metrics")]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{counts_add_up, eventually};
use drainpool::{Counts, Durability, Permanent, Pool, SyncPolicy, Task};
use metrics::atomics::AtomicU64;
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// A recorder that keeps everything, read back by name and `pool` label.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

/// A metric's name and its `pool` label.
type Id = (String, String);

#[derive(Debug, Default)]
struct Kept {
    counters: Mutex<HashMap<Id, Arc<AtomicU64>>>,
    gauges: Mutex<HashMap<Id, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<Id, Arc<Samples>>>,
    /// Each description: kind, unit.
    described: Mutex<HashMap<String, (&'static str, Option<Unit>)>>,
}

fn id(key: &Key) -> Id {
    let pool = key
        .labels()
        .find(|label| label.key() == "pool")
        .map_or_else(String::new, |label| label.value().to_owned());
    assert_eq!(key.labels().count(), 1, "one label, `pool`: {key:?}");
    (key.name().to_owned(), pool)
}

#[derive(Debug, Clone, Copy)]
struct Keeper(&'static Kept);

impl Recorder for Keeper {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        self.describe(key, "counter", unit);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        self.describe(key, "gauge", unit);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        self.describe(key, "histogram", unit);
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.0.counters.lock().unwrap();
        Counter::from_arc(Arc::clone(counters.entry(id(key)).or_default()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let mut gauges = self.0.gauges.lock().unwrap();
        Gauge::from_arc(Arc::clone(gauges.entry(id(key)).or_default()))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut histograms = self.0.histograms.lock().unwrap();
        Histogram::from_arc(Arc::clone(histograms.entry(id(key)).or_default()))
    }
}

impl Keeper {
    fn describe(&self, key: KeyName, kind: &'static str, unit: Option<Unit>) {
        let mut described = self.0.described.lock().unwrap();
        described.insert(key.as_str().to_owned(), (kind, unit));
    }
}

/// The recorder of this test binary, installed by the first test that asks.
fn kept() -> &'static Kept {
    static KEPT: OnceLock<&'static Kept> = OnceLock::new();
    KEPT.get_or_init(|| {
        let kept: &'static Kept = Box::leak(Box::default());
        metrics::set_global_recorder(Keeper(kept)).expect("no other recorder in this binary");
        kept
    })
}

fn counter(pool: &str, name: &str) -> u64 {
    let counters = kept().counters.lock().unwrap();
    counters
        .get(&(name.to_owned(), pool.to_owned()))
        .map_or_else(
            || panic!("no counter {name} for {pool}"),
            |c| c.load(std::sync::atomic::Ordering::Acquire),
        )
}

fn gauge(pool: &str, name: &str) -> f64 {
    let gauges = kept().gauges.lock().unwrap();
    gauges.get(&(name.to_owned(), pool.to_owned())).map_or_else(
        || panic!("no gauge {name} for {pool}"),
        |g| f64::from_bits(g.load(std::sync::atomic::Ordering::Acquire)),
    )
}

fn samples(pool: &str, name: &str) -> Vec<f64> {
    let histograms = kept().histograms.lock().unwrap();
    histograms
        .get(&(name.to_owned(), pool.to_owned()))
        .map_or_else(
            || panic!("no histogram {name} for {pool}"),
            |h| h.0.lock().unwrap().clone(),
        )
}

/// The counters as `Counts` reads them (what `Stats` and `ShutdownReport` hold), from the
/// recorder.
fn recorded_counts(pool: &str) -> [(&'static str, u64); 11] {
    let c = |name| counter(pool, name);
    [
        ("replayed", c("drainpool_tasks_replayed_total")),
        ("submitted", c("drainpool_tasks_submitted_total")),
        ("completed", c("drainpool_tasks_completed_total")),
        ("failed", c("drainpool_tasks_dead_lettered_total")),
        ("retried", c("drainpool_tasks_retried_total")),
        ("dropped", c("drainpool_tasks_dropped_total")),
        ("spilled", c("drainpool_tasks_spilled_total")),
        ("interrupted", c("drainpool_tasks_interrupted_total")),
        ("unsaved", c("drainpool_tasks_unsaved_total")),
        ("compacted", c("drainpool_tasks_compacted_total")),
        ("expired", c("drainpool_tasks_expired_total")),
    ]
}

fn named(counts: &Counts) -> [(&'static str, u64); 11] {
    [
        ("replayed", counts.replayed),
        ("submitted", counts.submitted),
        ("completed", counts.completed),
        ("failed", counts.failed),
        ("retried", counts.retried),
        ("dropped", counts.dropped),
        ("spilled", counts.spilled),
        ("interrupted", counts.interrupted),
        ("unsaved", counts.unsaved),
        ("compacted", counts.compacted),
        ("expired", counts.expired),
    ]
}

/// Adds two runs' counts, field by field.
fn sum(a: [(&'static str, u64); 11], b: [(&'static str, u64); 11]) -> [(&'static str, u64); 11] {
    let mut total = a;
    for (t, (_, n)) in total.iter_mut().zip(b) {
        t.1 += n;
    }
    total
}

// ---------------------------------------------------------------------------------------------
// The pool under test.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Plan {
    Ok,
    /// Sleeps this many (virtual) milliseconds, then succeeds.
    Sleep(u64),
    /// Fails its first attempt, then succeeds.
    FailOnce,
    /// Fails with a permanent error: a dead letter at once.
    Permanent,
    /// Runs for an hour, ignoring its token, unless an earlier run was interrupted.
    HangOnce,
}

async fn start(dir: &std::path::Path, name: &str) -> Pool<Plan> {
    Pool::builder()
        .name(name)
        .workers(1)
        .max_attempts(3)
        .backoff(Duration::from_millis(10), Duration::from_millis(10))
        .drain_deadline(Duration::from_secs(1))
        .cancel_grace(Duration::from_millis(100))
        .journal_dir(dir)
        .start(|task: Task<Plan>| async move {
            match *task.payload() {
                Plan::Ok => Ok(()),
                Plan::Sleep(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(())
                }
                Plan::FailOnce if task.attempt() == 1 => Err("refused by the test".into()),
                Plan::FailOnce => Ok(()),
                Plan::Permanent => Err(Permanent::new("never").into()),
                Plan::HangOnce if !task.was_interrupted() => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(())
                }
                Plan::HangOnce => Ok::<(), drainpool::BoxError>(()),
            }
        })
        .await
        .unwrap()
}

const WAIT: Duration = Duration::from_secs(30);

/// Successes, a retry, a dead letter, an interruption and a spill at shutdown, then the replay
/// in the next run: every counter equals the pool's own count, the gauges follow the pool's
/// state, and the histograms have a sample per run.
#[tokio::test(start_paused = true)]
async fn counters_equal_the_reports_across_a_spill_and_a_replay() {
    let pool_name = "orders";
    kept();
    let dir = tempfile::tempdir().unwrap();

    // Run 1.
    let pool = start(dir.path(), pool_name).await;
    for plan in [
        Plan::Ok,
        Plan::FailOnce,
        Plan::Permanent,
        Plan::Sleep(250),
        Plan::Ok,
    ] {
        pool.submit(plan).await.unwrap();
    }
    eventually(WAIT, "the first five tasks to finish", || {
        let stats = pool.stats();
        stats.completed == 4 && stats.failed == 1
    })
    .await;
    assert_eq!(recorded_counts(pool_name), named(&pool.stats().counts));
    assert_eq!(pool.stats().retried, 1);
    // Two failed runs: the retried one and the permanent one.
    assert_eq!(counter(pool_name, "drainpool_tasks_failed_total"), 2);

    // One task holds the only worker; two wait behind it.
    pool.submit(Plan::HangOnce).await.unwrap();
    eventually(WAIT, "the hanging task to start", || {
        pool.stats().in_flight == 1
    })
    .await;
    pool.submit(Plan::Ok).await.unwrap();
    pool.submit(Plan::Ok).await.unwrap();
    eventually(WAIT, "the gauges to show one running, two queued", || {
        gauge(pool_name, "drainpool_tasks_in_flight") == 1.0
            && gauge(pool_name, "drainpool_tasks_queued") == 2.0
    })
    .await;
    assert!(gauge(pool_name, "drainpool_spill_reserve_bytes") >= f64::from(1 << 20));

    let first = pool.shutdown().await.unwrap();
    counts_add_up(&first);
    assert!(first.is_clean(), "{first:?}");
    assert_eq!(
        (first.spilled, first.interrupted),
        (2, 1),
        "two spilled from the queue, the hanging one interrupted: {first:?}"
    );
    assert_eq!(recorded_counts(pool_name), named(&first.counts));
    // The pool's last state: nothing queued or running, the reserve gone, three tasks journaled.
    assert_eq!(gauge(pool_name, "drainpool_tasks_queued"), 0.0);
    assert_eq!(gauge(pool_name, "drainpool_tasks_in_flight"), 0.0);
    assert_eq!(gauge(pool_name, "drainpool_spill_reserve_bytes"), 0.0);
    let journal_bytes = gauge(pool_name, "drainpool_journal_bytes");
    assert!(
        journal_bytes > 48.0,
        "a header and three records: {journal_bytes}"
    );
    // Runs: Ok, FailOnce twice, Permanent, Sleep, Ok, HangOnce (stopped at the hard stop).
    let runs = samples(pool_name, "drainpool_task_run_seconds");
    assert_eq!(runs.len(), 7, "{runs:?}");
    assert!(runs.iter().any(|&s| s >= 0.25), "the 250 ms run: {runs:?}");
    let waits = samples(pool_name, "drainpool_task_queue_wait_seconds");
    assert_eq!(waits.len(), 7, "{waits:?}");
    // The Ok submitted behind the 250 ms task waited for it.
    assert!(waits.iter().any(|&s| s >= 0.25), "{waits:?}");
    let spills = samples(pool_name, "drainpool_spill_seconds");
    // The queue's spill and the interrupted task's.
    assert_eq!(spills.len(), 2, "{spills:?}");
    // On-shutdown mode: no write-ahead fsyncs.
    assert!(samples(pool_name, "drainpool_journal_fsync_seconds").is_empty());

    // Run 2, same name: the replay, and every task finishes.
    let pool = start(dir.path(), pool_name).await;
    assert_eq!(pool.recovery().replayed, 3);
    eventually(WAIT, "the replayed tasks to finish", || {
        pool.stats().completed == 3
    })
    .await;
    let second = pool.shutdown().await.unwrap();
    counts_add_up(&second);
    assert_eq!(second.replayed, 3);
    // One recorder, one label: the counters go on from the first run's.
    assert_eq!(
        recorded_counts(pool_name),
        sum(named(&first.counts), named(&second.counts))
    );
    assert_eq!(samples(pool_name, "drainpool_task_run_seconds").len(), 10);
    assert_eq!(
        gauge(pool_name, "drainpool_journal_bytes"),
        0.0,
        "nothing left to journal"
    );
}

/// Write-ahead under `Always`: every new task's record is in exactly one fsynced batch, so the
/// tasks-per-fsync samples add up to the tasks submitted, one sample per fsync; and a second
/// pool in the process has metrics of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_ahead_fsyncs_and_batch_sizes() {
    let pool_name = "ahead";
    kept();
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::builder()
        .name(pool_name)
        .workers(2)
        .durability(Durability::write_ahead(SyncPolicy::Always))
        .journal_dir(dir.path())
        .start(|_: Task<u64>| async { Ok::<(), drainpool::BoxError>(()) })
        .await
        .unwrap();
    let mut submitters = tokio::task::JoinSet::new();
    for lane in 0..4 {
        let pool = pool.clone();
        submitters.spawn(async move {
            for n in 0..25 {
                pool.submit(lane * 100 + n).await.unwrap();
            }
        });
    }
    while let Some(joined) = submitters.join_next().await {
        joined.unwrap();
    }
    eventually(WAIT, "every task to finish", || {
        pool.stats().completed == 100
    })
    .await;
    eventually(WAIT, "the journal gauge to see the segment", || {
        gauge(pool_name, "drainpool_journal_bytes") > 0.0
    })
    .await;
    let report = pool.shutdown().await.unwrap();
    counts_add_up(&report);
    assert_eq!(recorded_counts(pool_name), named(&report.counts));

    let per_fsync = samples(pool_name, "drainpool_journal_tasks_per_fsync");
    let fsyncs = samples(pool_name, "drainpool_journal_fsync_seconds");
    assert_eq!(per_fsync.iter().sum::<f64>(), 100.0, "{per_fsync:?}");
    assert_eq!(fsyncs.len(), per_fsync.len());
    assert!(fsyncs.iter().all(|&s| s >= 0.0));
    assert_eq!(samples(pool_name, "drainpool_task_run_seconds").len(), 100);
}

/// Every metric is described, with its kind and unit, as the README lists them.
#[tokio::test]
async fn every_metric_is_described() {
    kept();
    let dir = tempfile::tempdir().unwrap();
    let pool = start(dir.path(), "described").await;
    pool.shutdown().await.unwrap();
    let described = kept().described.lock().unwrap().clone();
    let expected: [(&str, &str, Unit); 21] = [
        ("drainpool_tasks_submitted_total", "counter", Unit::Count),
        ("drainpool_tasks_replayed_total", "counter", Unit::Count),
        ("drainpool_tasks_completed_total", "counter", Unit::Count),
        ("drainpool_tasks_failed_total", "counter", Unit::Count),
        ("drainpool_tasks_retried_total", "counter", Unit::Count),
        (
            "drainpool_tasks_dead_lettered_total",
            "counter",
            Unit::Count,
        ),
        ("drainpool_tasks_dropped_total", "counter", Unit::Count),
        ("drainpool_tasks_spilled_total", "counter", Unit::Count),
        ("drainpool_tasks_interrupted_total", "counter", Unit::Count),
        ("drainpool_tasks_unsaved_total", "counter", Unit::Count),
        ("drainpool_tasks_compacted_total", "counter", Unit::Count),
        ("drainpool_tasks_expired_total", "counter", Unit::Count),
        ("drainpool_tasks_queued", "gauge", Unit::Count),
        ("drainpool_tasks_in_flight", "gauge", Unit::Count),
        ("drainpool_journal_bytes", "gauge", Unit::Bytes),
        ("drainpool_spill_reserve_bytes", "gauge", Unit::Bytes),
        (
            "drainpool_task_queue_wait_seconds",
            "histogram",
            Unit::Seconds,
        ),
        ("drainpool_task_run_seconds", "histogram", Unit::Seconds),
        ("drainpool_spill_seconds", "histogram", Unit::Seconds),
        (
            "drainpool_journal_fsync_seconds",
            "histogram",
            Unit::Seconds,
        ),
        (
            "drainpool_journal_tasks_per_fsync",
            "histogram",
            Unit::Count,
        ),
    ];
    for (name, kind, unit) in expected {
        assert_eq!(described.get(name), Some(&(kind, Some(unit))), "{name}");
    }
    assert_eq!(described.len(), expected.len(), "{described:?}");
}
