//! The pool's metrics, through the `metrics` facade (the `metrics` feature): every metric's
//! name, kind, unit and meaning in one list, [`ALL`] (the README's table is checked against
//! it), and the handles a pool records into, each labelled `pool="<name>"`.
//!
//! Handles are registered once, when the pool is built, with the recorder installed then (an
//! exporter installed later sees nothing of this pool). Without one they are the facade's
//! no-ops: a branch per record. The counters are not held here but in `report::Counters`, each
//! beside the count [`Stats`](crate::Stats) reads, so the two move together.

use metrics::{Gauge, Histogram, Unit};

use crate::report::{Counters, Striped, Tally, WorkerTally};

/// The label that tells pools apart: the name given to
/// [`Builder::name`](crate::Builder::name).
pub(crate) const LABEL: &str = "pool";

/// What kind of metric one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric: what the README lists.
#[derive(Debug)]
pub(crate) struct Metric {
    pub(crate) name: &'static str,
    pub(crate) kind: Kind,
    pub(crate) unit: Unit,
    pub(crate) help: &'static str,
}

const fn metric(name: &'static str, kind: Kind, unit: Unit, help: &'static str) -> Metric {
    Metric {
        name,
        kind,
        unit,
        help,
    }
}

const SUBMITTED: Metric = metric(
    "drainpool_tasks_submitted_total",
    Kind::Counter,
    Unit::Count,
    "Tasks accepted by a submit in this run (Counts::submitted).",
);
const REPLAYED: Metric = metric(
    "drainpool_tasks_replayed_total",
    Kind::Counter,
    Unit::Count,
    "Tasks reloaded from the journal at start (Counts::replayed).",
);
const COMPLETED: Metric = metric(
    "drainpool_tasks_completed_total",
    Kind::Counter,
    Unit::Count,
    "Tasks whose handler returned Ok (Counts::completed).",
);
const FAILED: Metric = metric(
    "drainpool_tasks_failed_total",
    Kind::Counter,
    Unit::Count,
    "Handler runs that failed (an error or a panic before the drain deadline); each is retried or dead-lettered.",
);
const RETRIED: Metric = metric(
    "drainpool_tasks_retried_total",
    Kind::Counter,
    Unit::Count,
    "Failed runs scheduled for a retry (Counts::retried).",
);
const DEAD_LETTERED: Metric = metric(
    "drainpool_tasks_dead_lettered_total",
    Kind::Counter,
    Unit::Count,
    "Tasks set aside as dead letters (Counts::failed).",
);
const DROPPED: Metric = metric(
    "drainpool_tasks_dropped_total",
    Kind::Counter,
    Unit::Count,
    "Tasks dropped at the drain deadline by the deadline policy (Counts::dropped).",
);
const SPILLED: Metric = metric(
    "drainpool_tasks_spilled_total",
    Kind::Counter,
    Unit::Count,
    "Tasks journaled at shutdown without having been interrupted (Counts::spilled).",
);
const INTERRUPTED: Metric = metric(
    "drainpool_tasks_interrupted_total",
    Kind::Counter,
    Unit::Count,
    "In-flight tasks stopped at the drain deadline and journaled (Counts::interrupted).",
);
const UNSAVED: Metric = metric(
    "drainpool_tasks_unsaved_total",
    Kind::Counter,
    Unit::Count,
    "Tasks the final spill could not journal (Counts::unsaved).",
);
const COMPACTED: Metric = metric(
    "drainpool_tasks_compacted_total",
    Kind::Counter,
    Unit::Count,
    "Write-ahead: live tasks copied out of old segments by compaction (Counts::compacted).",
);
const EXPIRED: Metric = metric(
    "drainpool_tasks_expired_total",
    Kind::Counter,
    Unit::Count,
    "Tasks not run because their time to live ran out first (Counts::expired).",
);
const QUEUED: Metric = metric(
    "drainpool_tasks_queued",
    Kind::Gauge,
    Unit::Count,
    "Tasks waiting for a worker, retries waiting for their time included (Stats::queued).",
);
const IN_FLIGHT: Metric = metric(
    "drainpool_tasks_in_flight",
    Kind::Gauge,
    Unit::Count,
    "Tasks whose handler is running (Stats::in_flight).",
);
const JOURNAL_BYTES: Metric = metric(
    "drainpool_journal_bytes",
    Kind::Gauge,
    Unit::Bytes,
    "Bytes of the live journal's segments, earlier runs' not yet deleted included; dead letters and the spill reserve excluded.",
);
const SPILL_RESERVE: Metric = metric(
    "drainpool_spill_reserve_bytes",
    Kind::Gauge,
    Unit::Bytes,
    "Disk set aside for the spill at shutdown (Stats::spill_reserve).",
);
const QUEUE_WAIT: Metric = metric(
    "drainpool_task_queue_wait_seconds",
    Kind::Histogram,
    Unit::Seconds,
    "From a task's queueing (its submit, the start that replayed it, its retry coming due) to a worker taking it.",
);
const RUN: Metric = metric(
    "drainpool_task_run_seconds",
    Kind::Histogram,
    Unit::Seconds,
    "One run of the handler, whatever its outcome.",
);
const SPILL: Metric = metric(
    "drainpool_spill_seconds",
    Kind::Histogram,
    Unit::Seconds,
    "One spill at shutdown (the queue's, then the held tasks'): encoding, writing and fsync.",
);
const FSYNC: Metric = metric(
    "drainpool_journal_fsync_seconds",
    Kind::Histogram,
    Unit::Seconds,
    "Write-ahead: one fsync of the journal, of a group-commit batch (SyncPolicy::Always) or at the interval (SyncPolicy::Interval).",
);
const TASKS_PER_FSYNC: Metric = metric(
    "drainpool_journal_tasks_per_fsync",
    Kind::Histogram,
    Unit::Count,
    "Write-ahead, SyncPolicy::Always: task records in a group-commit batch made durable by one fsync.",
);

/// Every metric a pool records, in the README's order.
pub(crate) const ALL: [&Metric; 21] = [
    &SUBMITTED,
    &REPLAYED,
    &COMPLETED,
    &FAILED,
    &RETRIED,
    &DEAD_LETTERED,
    &DROPPED,
    &SPILLED,
    &INTERRUPTED,
    &UNSAVED,
    &COMPACTED,
    &EXPIRED,
    &QUEUED,
    &IN_FLIGHT,
    &JOURNAL_BYTES,
    &SPILL_RESERVE,
    &QUEUE_WAIT,
    &RUN,
    &SPILL,
    &FSYNC,
    &TASKS_PER_FSYNC,
];

/// A pool's gauges and histograms (its counters are in [`Counters`]).
#[derive(Debug)]
pub(crate) struct Metrics {
    pub(crate) queued: Gauge,
    pub(crate) in_flight: Gauge,
    pub(crate) journal_bytes: Gauge,
    pub(crate) spill_reserve: Gauge,
    pub(crate) queue_wait: Histogram,
    pub(crate) run: Histogram,
    pub(crate) spill: Histogram,
    pub(crate) fsync: Histogram,
    pub(crate) tasks_per_fsync: Histogram,
}

impl Metrics {
    /// Describes every metric to the recorder installed now, and registers the handles of the
    /// pool named `pool`: its gauges and histograms, and its counters.
    pub(crate) fn register(pool: &str, workers: usize) -> (Self, Counters) {
        for metric in ALL {
            let (name, unit, help) = (metric.name, metric.unit, metric.help);
            match metric.kind {
                Kind::Counter => metrics::describe_counter!(name, unit, help),
                Kind::Gauge => metrics::describe_gauge!(name, unit, help),
                Kind::Histogram => metrics::describe_histogram!(name, unit, help),
            }
        }
        let counter = |metric: &Metric| {
            Tally::recorded(metrics::counter!(metric.name, LABEL => pool.to_owned()))
        };
        let gauge = |metric: &Metric| metrics::gauge!(metric.name, LABEL => pool.to_owned());
        let histogram =
            |metric: &Metric| metrics::histogram!(metric.name, LABEL => pool.to_owned());
        let counters = Counters {
            replayed: counter(&REPLAYED),
            submitted: counter(&SUBMITTED),
            completed: WorkerTally::recorded(
                workers,
                metrics::counter!(
                    COMPLETED.name,
                    LABEL => pool.to_owned()
                ),
            ),
            failed: counter(&DEAD_LETTERED),
            retried: counter(&RETRIED),
            dropped: counter(&DROPPED),
            spilled: counter(&SPILLED),
            interrupted: counter(&INTERRUPTED),
            unsaved: counter(&UNSAVED),
            compacted: counter(&COMPACTED),
            expired: counter(&EXPIRED),
            failed_runs: counter(&FAILED),
            in_flight: Striped::new(workers),
        };
        let metrics = Self {
            queued: gauge(&QUEUED),
            in_flight: gauge(&IN_FLIGHT),
            journal_bytes: gauge(&JOURNAL_BYTES),
            spill_reserve: gauge(&SPILL_RESERVE),
            queue_wait: histogram(&QUEUE_WAIT),
            run: histogram(&RUN),
            spill: histogram(&SPILL),
            fsync: histogram(&FSYNC),
            tasks_per_fsync: histogram(&TASKS_PER_FSYNC),
        };
        (metrics, counters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's metrics table lists every metric with its type and unit, and nothing else
    /// by a metric's name.
    #[test]
    fn the_readme_lists_every_metric() {
        let readme = include_str!("../README.md");
        let rows: Vec<&str> = readme
            .lines()
            .filter(|line| line.starts_with("| `drainpool_"))
            .collect();
        for metric in ALL {
            let kind = match metric.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let unit = metric.unit.as_str();
            let row = rows
                .iter()
                .find(|row| row.starts_with(&format!("| `{}` |", metric.name)))
                .unwrap_or_else(|| panic!("{} is not in the README's table", metric.name));
            assert!(
                row.contains(&format!("| {kind} | {unit} |")),
                "{}: the README says {row:?}, the code {kind} in {unit}",
                metric.name
            );
        }
        assert_eq!(
            rows.len(),
            ALL.len(),
            "the README lists metrics the code lacks"
        );
    }

    #[test]
    fn names_follow_the_prometheus_conventions() {
        for metric in ALL {
            let suffix = match (metric.kind, metric.unit) {
                (Kind::Counter, _) => "_total",
                (_, Unit::Seconds) => "_seconds",
                (_, Unit::Bytes) => "_bytes",
                _ => "",
            };
            assert!(metric.name.starts_with("drainpool_"), "{}", metric.name);
            assert!(metric.name.ends_with(suffix), "{}", metric.name);
            assert!(
                metric
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{}",
                metric.name
            );
        }
    }
}
