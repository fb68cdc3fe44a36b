//! Deciding what happens to work that fails or outlives the drain deadline.
//!
//! Three kinds of task share one pool: a report that can wait (requeued at the deadline, the
//! default), a cache warm-up that is worthless once late (dropped), and a payment capture that
//! a person must look at if it was cut off (dead-lettered). A handler marks an error that no
//! retry can fix as `Permanent`; other errors are retried with backoff. The `on_interrupt` hook
//! runs before each deadline action, with the task's id and what is about to happen to it.
//!
//! Run it with `cargo run --example 02_deadline_policy`: it submits one task of each kind,
//! shuts down while they run, and prints the report.

use std::time::Duration;

use drainpool::{BoxError, DeadlineAction, Permanent, Pool, Task};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
enum Work {
    MonthlyReport { customer: u64 },
    WarmCache { key: String },
    CapturePayment { order: u64, cents: u64 },
    ParseUpload { raw: String },
}

async fn handle(task: Task<Work>) -> Result<(), BoxError> {
    match task.payload() {
        Work::ParseUpload { raw } => {
            // Retrying cannot make a malformed upload parse: set it aside at once.
            raw.parse::<u64>().map_err(Permanent::new)?;
            Ok(())
        }
        // Everything else is slow: longer than this example's drain deadline.
        _ => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let pool = Pool::builder()
        .workers(4)
        .drain_deadline(Duration::from_millis(300))
        .cancel_grace(Duration::from_millis(100))
        .max_attempts(5)
        .backoff(Duration::from_millis(200), Duration::from_secs(30))
        .journal_dir(dir.path())
        .on_deadline(|work: &Work| match work {
            Work::MonthlyReport { .. } => DeadlineAction::Requeue,
            Work::WarmCache { .. } => DeadlineAction::Drop,
            Work::CapturePayment { .. } | Work::ParseUpload { .. } => DeadlineAction::DeadLetter,
        })
        .on_interrupt(|interruption| async move {
            println!(
                "task {} interrupted (run {} in a row): {:?}",
                interruption.id(),
                interruption.interruptions(),
                interruption.action()
            );
        })
        .start(handle)
        .await?;

    pool.submit(Work::MonthlyReport { customer: 7 }).await?;
    pool.submit(Work::WarmCache { key: "home".into() }).await?;
    pool.submit(Work::CapturePayment {
        order: 1042,
        cents: 4_999,
    })
    .await?;
    pool.submit(Work::ParseUpload {
        raw: "not a number".into(),
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let report = pool.shutdown().await?;
    println!(
        "requeued {} (journaled, runs again at the next start), dropped {}, dead letters {}",
        report.interrupted, report.dropped, report.failed
    );
    Ok(())
}
