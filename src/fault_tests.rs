//! Fault injection through a whole pool: the journal's file operations fail where each test
//! says (EIO, ENOSPC, short writes) or lose what was never fsynced (a power cut), and each test
//! checks the outcome the documentation promises: the failure is reported, never a panic or a
//! silent success, and no task accepted is lost but as the durability mode allows.
//!
//! Every pool runs on a current-thread runtime with a paused clock, so drain deadlines pass at
//! once and nothing depends on timing. Most handlers hold their task until the drain deadline
//! and give up, so every accepted task ends up in the journal (spilled or interrupted). A
//! "crash" tears the runtime down with the pool running, as a kill would; a power cut then
//! drops what was not fsynced. What survives is read back as a starting pool reads it.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::journal::faults::{EIO, ENOSPC, Faults, Op, errno, only_segment, recover, segments};
use crate::journal::{SEGMENT_HEADER_LEN as HEADER_LEN, task_record_len};
use crate::{Durability, Pool, ShutdownReport, SubmitError, SyncPolicy, Task};

const ALWAYS: Durability = Durability::write_ahead(SyncPolicy::Always);

/// The length of the record of every task here: a `u64` payload under 10,000, no error.
const RECORD: u64 = task_record_len(4, 0) as u64;

/// A segment header's length.
const HEADER: u64 = HEADER_LEN as u64;

type Done = Arc<Mutex<Vec<u64>>>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

/// A pool on `dir` writing through `faults`, with one worker. Its handler completes the tasks
/// `completes` picks (recording them in `done`); it holds the others until the drain deadline
/// and gives up, so they are journaled as interrupted.
async fn start(
    dir: &Path,
    durability: Durability,
    faults: &Arc<Faults>,
    done: &Done,
    completes: fn(u64) -> bool,
) -> Pool<u64> {
    let done = Arc::clone(done);
    Pool::builder()
        .workers(1)
        .queue_capacity(1_000)
        .drain_deadline(Duration::from_secs(1))
        .cancel_grace(Duration::from_secs(1))
        .durability(durability)
        .file_ops(faults.ops())
        .journal_dir(dir)
        .start(move |task: Task<u64>| {
            let done = Arc::clone(&done);
            async move {
                let n = *task.payload();
                if !completes(n) {
                    task.cancelled().await;
                    return Err("stopped at the drain deadline");
                }
                done.lock().unwrap().push(n);
                Ok(())
            }
        })
        .await
        .unwrap()
}

/// A handler that completes nothing.
fn none(_: u64) -> bool {
    false
}

/// Lets the pool run (on the test's paused clock) until `n` handlers run.
async fn in_flight(pool: &Pool<u64>, n: u64) {
    for _ in 0..10_000 {
        if pool.stats().in_flight == n {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{n} tasks never ran at once: {:?}", pool.stats());
}

/// Submits every task of `tasks`; each must be accepted.
async fn submit_all(pool: &Pool<u64>, tasks: std::ops::Range<u64>) {
    for n in tasks {
        if let Err(error) = pool.submit(n).await {
            panic!("task {n} refused: {error:?}");
        }
    }
}

/// Submits `n`, which must be refused with `SubmitError::Journal` and handed back whole.
/// Returns the error's raw OS error.
async fn refused(pool: &Pool<u64>, n: u64) -> Option<i32> {
    match pool.submit(n).await {
        Err(SubmitError::Journal { task, error }) => {
            assert_eq!(task, n, "the refused task is handed back");
            errno(&error)
        }
        other => panic!("task {n}: expected SubmitError::Journal, got {other:?}"),
    }
}

/// Tears the runtime down with the pool running: the journal is left as a kill leaves it.
fn crash(rt: tokio::runtime::Runtime, pool: Pool<u64>) {
    drop(rt);
    drop(pool);
}

fn report_errno(report: &ShutdownReport) -> Option<i32> {
    report.journal_error.as_deref().and_then(errno)
}

/// Cuts the power, then reads back what survived as a starting pool does; recovery must find
/// nothing wrong. Returns what it found and the live payloads in id order.
fn after_power_cut(dir: &Path, faults: &Faults) -> (crate::RecoveryReport, Vec<u64>) {
    faults.power_cut().unwrap();
    let (recovery, live) = recover(dir);
    assert!(undamaged(&recovery), "{recovery:?}");
    (recovery, live)
}

/// Whether recovery found nothing wrong: no damage, no torn tail, no damaged copy.
fn undamaged(report: &crate::RecoveryReport) -> bool {
    report.damage.is_empty() && report.torn_tails.is_empty() && report.damaged_copies.is_empty()
}

/// An fsync fails in write-ahead mode (`SyncPolicy::Always`): the submit it covered fails with
/// `SubmitError::Journal` and hands its task back; every later submit fails too, without a
/// write or an fsync (the journal is poisoned, the fsync never retried); the tasks accepted
/// before are finished or spilled at shutdown, which reports the error; after a power cut the
/// next start has every accepted task that was not finished.
fn a_failed_fsync_in_write_ahead_mode(code: i32) {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let done = Done::default();
    let report = runtime().block_on(async {
        // Even tasks complete (their acks are written unsynced), odd ones are held.
        let pool = start(dir.path(), ALWAYS, &faults, &done, |n| n % 2 == 0).await;
        submit_all(&pool, 0..6).await;
        faults.fail_next(Op::Sync, code);
        assert_eq!(refused(&pool, 6).await, Some(code));
        let calls = [Op::Create, Op::Write, Op::Sync].map(|op| faults.calls(op));
        for n in 7..10 {
            assert_eq!(refused(&pool, n).await, Some(code), "the first error stays");
        }
        assert_eq!(
            [Op::Create, Op::Write, Op::Sync].map(|op| faults.calls(op)),
            calls,
            "nothing is written or synced after the failed fsync"
        );
        pool.shutdown().await.unwrap()
    });
    assert_eq!(report.submitted, 6, "{report:?}");
    assert_eq!(report_errno(&report), Some(code), "{report:?}");
    assert!(!report.is_clean());
    assert_eq!(report.unsaved, 0, "{report:?}");
    assert_eq!(
        report.completed + report.spilled + report.interrupted,
        6,
        "{report:?}"
    );

    let (_, live) = after_power_cut(dir.path(), &faults);
    let done = done.lock().unwrap().clone();
    for n in 0..6 {
        assert!(
            done.contains(&n) || live.contains(&n),
            "task {n} was neither finished nor kept: done {done:?}, live {live:?}"
        );
    }
    assert!(
        live.iter().all(|n| *n < 6),
        "only accepted tasks come back: {live:?}"
    );
}

#[test]
fn eio_on_fsync_refuses_the_task_poisons_the_journal_and_keeps_the_accepted_ones() {
    a_failed_fsync_in_write_ahead_mode(EIO);
}

#[test]
fn enospc_on_fsync_refuses_the_task_poisons_the_journal_and_keeps_the_accepted_ones() {
    a_failed_fsync_in_write_ahead_mode(ENOSPC);
}

/// The task whose fsync failed was handed back to the caller by `SubmitError::Journal`; it
/// does not also run at the next start. Its record was written before the fsync failed, in a
/// segment the journal keeps after a failure: the failed batch is cut off that segment.
#[test]
fn a_task_refused_after_a_failed_fsync_does_not_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    runtime().block_on(async {
        let pool = start(dir.path(), ALWAYS, &faults, &Done::default(), none).await;
        submit_all(&pool, 0..6).await;
        assert!(pool.health().is_ready());
        faults.fail_next(Op::Sync, EIO);
        assert_eq!(refused(&pool, 6).await, Some(EIO));
        match pool.health() {
            crate::Health::JournalUnavailable(error) => assert_eq!(errno(&error), Some(EIO)),
            other => panic!("a failed journal is not ready: {other:?}"),
        }
        pool.shutdown_token().cancel();
        assert!(matches!(pool.health(), crate::Health::ShuttingDown));
        pool.shutdown().await.unwrap();
    });
    let (_, live) = recover(dir.path());
    assert_eq!(live, [0, 1, 2, 3, 4, 5], "task 6 was handed back");
}

/// An fsync of the `SyncPolicy::Interval` task fails: the journal is poisoned, so the next
/// submit fails and hands its task back; the tasks accepted before, whose records were never
/// durable, are spilled at shutdown and survive a power cut.
#[test]
fn eio_on_an_interval_fsync_poisons_the_journal_and_the_accepted_tasks_are_spilled() {
    const EVERY: Duration = Duration::from_secs(1);
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let durability = Durability::write_ahead(SyncPolicy::Interval(EVERY));
    let report = runtime().block_on(async {
        let pool = start(dir.path(), durability, &faults, &Done::default(), none).await;
        submit_all(&pool, 0..5).await;
        faults.fail_next(Op::Sync, EIO);
        tokio::time::sleep(EVERY + EVERY / 2).await;
        assert_eq!(faults.calls(Op::Sync), 1);
        let writes = faults.calls(Op::Write);
        for n in 5..8 {
            // The submits get the failure that poisoned the journal.
            assert_eq!(refused(&pool, n).await, Some(EIO));
        }
        assert_eq!(
            faults.calls(Op::Write),
            writes,
            "no write after the failure"
        );
        tokio::time::sleep(EVERY * 3).await;
        assert_eq!(faults.calls(Op::Sync), 1, "the failed fsync is not retried");
        pool.shutdown().await.unwrap()
    });
    assert_eq!(report_errno(&report), Some(EIO), "{report:?}");
    assert_eq!(report.submitted, 5, "{report:?}");
    assert_eq!(report.unsaved, 0, "{report:?}");
    assert_eq!(report.spilled + report.interrupted, 5, "{report:?}");

    let (_, live) = after_power_cut(dir.path(), &faults);
    assert_eq!(live, [0, 1, 2, 3, 4]);
}

/// A write fails with ENOSPC in write-ahead mode, and the disk has room again by shutdown: the
/// refused task is handed back and nothing of it is in the journal; the journal takes no more
/// writes; every accepted task is spilled and comes back.
#[test]
fn enospc_on_write_refuses_the_task_and_leaves_nothing_of_it_in_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let report = runtime().block_on(async {
        let pool = start(dir.path(), ALWAYS, &faults, &Done::default(), none).await;
        submit_all(&pool, 0..6).await;
        faults.fail_next(Op::Write, ENOSPC);
        assert_eq!(refused(&pool, 6).await, Some(ENOSPC));
        let writes = faults.calls(Op::Write);
        assert_eq!(refused(&pool, 7).await, Some(ENOSPC));
        assert_eq!(
            faults.calls(Op::Write),
            writes,
            "no write after the failure"
        );
        pool.shutdown().await.unwrap()
    });
    assert_eq!(report_errno(&report), Some(ENOSPC), "{report:?}");
    assert_eq!(report.unsaved, 0, "{report:?}");
    assert_eq!((report.spilled, report.interrupted), (5, 1), "{report:?}");

    let (_, live) = after_power_cut(dir.path(), &faults);
    assert_eq!(live, [0, 1, 2, 3, 4, 5]);
}

/// The disk stays full from a write-ahead write on: the spill at shutdown fails in both
/// segments it tries, which the report says loudly; the write-ahead segment holding every
/// accepted task is kept, so none is lost.
#[test]
fn a_disk_that_stays_full_fails_the_spill_loudly_and_keeps_the_write_ahead_segment() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let report = runtime().block_on(async {
        let pool = start(dir.path(), ALWAYS, &faults, &Done::default(), none).await;
        submit_all(&pool, 0..6).await;
        faults.fail_from_next(Op::Write, ENOSPC);
        assert_eq!(refused(&pool, 6).await, Some(ENOSPC));
        pool.shutdown().await.unwrap()
    });
    assert_eq!(report_errno(&report), Some(ENOSPC), "{report:?}");
    assert_eq!(report.unsaved, 6, "{report:?}");
    assert_eq!(report.spilled + report.interrupted, 0, "{report:?}");
    assert_eq!(report.exit_code(), std::process::ExitCode::FAILURE);

    let (_, live) = after_power_cut(dir.path(), &faults);
    assert_eq!(live, [0, 1, 2, 3, 4, 5]);
}

/// A write-ahead write stops short: the segment is cut back to the last whole record at once,
/// so the journal holds whole records only, and the next start finds no torn tail.
#[test]
fn a_short_write_is_cut_back_to_the_last_whole_record() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let report = runtime().block_on(async {
        let pool = start(dir.path(), ALWAYS, &faults, &Done::default(), none).await;
        submit_all(&pool, 0..6).await;
        let segment = &only_segment(dir.path());
        let whole = HEADER + 6 * RECORD;
        crate::journal::faults::assert_records_end(segment, whole);

        faults.short_write_next(20, ENOSPC);
        assert_eq!(refused(&pool, 6).await, Some(ENOSPC));
        assert_eq!(faults.calls(Op::Truncate), 1);
        assert_eq!(std::fs::metadata(segment).unwrap().len(), whole);
        let verified = crate::journal::verify(dir.path()).unwrap();
        assert!(verified.is_clean(), "{verified:?}");
        assert_eq!(verified.records, 6);
        pool.shutdown().await.unwrap()
    });
    assert_eq!(report.unsaved, 0, "{report:?}");
    assert_eq!(report.spilled + report.interrupted, 6, "{report:?}");

    let (recovery, live) = recover(dir.path());
    assert!(undamaged(&recovery), "{recovery:?}");
    assert_eq!(live, [0, 1, 2, 3, 4, 5]);
}

mod power_cut;
mod spill;
