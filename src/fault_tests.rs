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

/// With `SyncPolicy::Always`, every task whose submit returned `Ok` survives a power cut, even
/// with submits in flight at the cut and segments sealed along the way.
#[test]
fn a_power_cut_with_sync_always_keeps_every_acknowledged_task() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let accepted = Done::default();
    let attempted = Done::default();
    let rt = runtime();
    let pool = rt.block_on(async {
        let pool = Pool::builder()
            .workers(1)
            .queue_capacity(1_000)
            .durability(ALWAYS)
            // Four records to a segment.
            .segment_bytes(HEADER + 4 * RECORD)
            .file_ops(faults.ops())
            .journal_dir(dir.path())
            .start(|task: Task<u64>| async move {
                task.cancelled().await;
                Err::<(), _>("stopped at the drain deadline")
            })
            .await
            .unwrap();
        // Four submitters share the fsyncs; the power goes while they are still submitting.
        for lane in 0..4 {
            let pool = pool.clone();
            let (accepted, attempted) = (Arc::clone(&accepted), Arc::clone(&attempted));
            tokio::spawn(async move {
                for n in (lane..).step_by(4) {
                    attempted.lock().unwrap().push(n);
                    pool.submit(n).await.unwrap();
                    accepted.lock().unwrap().push(n);
                }
            });
        }
        while faults.calls(Op::Sync) < 12 {
            tokio::task::yield_now().await;
        }
        pool
    });
    crash(rt, pool);
    let (recovery, live) = after_power_cut(dir.path(), &faults);
    assert!(recovery.segments > 1, "{recovery:?}");
    let accepted = accepted.lock().unwrap().clone();
    let attempted = attempted.lock().unwrap().clone();
    assert!(accepted.len() >= 12, "{accepted:?}");
    for n in &accepted {
        assert!(
            live.contains(n),
            "task {n} was acknowledged and lost: {live:?}"
        );
    }
    for n in &live {
        assert!(attempted.contains(n), "task {n} was never submitted");
    }
}

/// Submits tasks `0..count` in write-ahead mode under `sync`, then crashes; returns the faults
/// to cut the power with.
fn crash_after_submitting(dir: &Path, sync: SyncPolicy, count: u64) -> Arc<Faults> {
    let faults = Faults::new();
    let rt = runtime();
    let durability = Durability::write_ahead(sync);
    let pool = rt.block_on(async {
        let pool = start(dir, durability, &faults, &Done::default(), none).await;
        submit_all(&pool, 0..count).await;
        pool
    });
    crash(rt, pool);
    faults
}

/// With `SyncPolicy::Never`, a power cut may lose every task accepted (nothing was fsynced),
/// but never corrupts the journal: whether the unsynced writes are dropped, or torn at any
/// byte, the next start reads a valid prefix of what was accepted, and truncates the torn tail.
#[test]
fn a_power_cut_with_sync_never_leaves_a_valid_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let faults = crash_after_submitting(dir.path(), SyncPolicy::Never, 8);
    assert_eq!(faults.calls(Op::Sync) + faults.calls(Op::SyncDir), 0);
    let (_, live) = after_power_cut(dir.path(), &faults);
    assert!(live.is_empty(), "{live:?}");

    let full = HEADER + 8 * RECORD;
    for keep in [
        0,
        20,
        HEADER,
        HEADER + 1,
        HEADER + RECORD,
        HEADER + 3 * RECORD + 17,
        full - 1,
        full,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let faults = crash_after_submitting(dir.path(), SyncPolicy::Never, 8);
        faults.torn_power_cut(keep).unwrap();
        let (recovery, live) = recover(dir.path());
        let whole = keep.saturating_sub(HEADER) / RECORD;
        assert_eq!(live, (0..whole).collect::<Vec<_>>(), "cut at {keep}");
        let torn = keep != 0 && keep != HEADER + whole * RECORD;
        assert_eq!(
            recovery.torn_tails.len(),
            usize::from(torn),
            "cut at {keep}: {recovery:?}"
        );
        assert!(
            recovery.damage.is_empty() && recovery.damaged_copies.is_empty(),
            "cut at {keep}: {recovery:?}"
        );
        let segment = segments(dir.path()).remove(0);
        assert_eq!(
            std::fs::metadata(segment).unwrap().len(),
            if keep < HEADER {
                0
            } else {
                HEADER + whole * RECORD
            },
            "the torn tail is truncated"
        );
    }
}

/// How the power goes.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// Every unsynced write is dropped.
    Clean,
    /// This many bytes of unsynced writes reached the disk.
    Torn(u64),
    /// This many bytes of file length past the synced data reached the disk, as zeros.
    Zeroed(u64),
}

impl Cut {
    fn apply(self, faults: &Faults) {
        match self {
            Self::Clean => faults.power_cut(),
            Self::Torn(keep) => faults.torn_power_cut(keep),
            Self::Zeroed(keep) => faults.zeroed_power_cut(keep),
        }
        .unwrap();
    }
}

/// With `SyncPolicy::Interval`, a power cut loses at most the tasks accepted since the last
/// fsync: the next start has every task accepted before it, then a prefix of the rest (none
/// if the unsynced bytes are zeros, which read as room, not as a torn tail), and truncates the
/// torn tail.
#[test]
fn a_power_cut_with_sync_interval_loses_at_most_what_followed_the_last_fsync() {
    const EVERY: Duration = Duration::from_secs(1);
    for cut in [
        Cut::Clean,
        Cut::Torn(RECORD + 36),
        Cut::Torn(2 * RECORD),
        Cut::Zeroed(RECORD + 36),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        let rt = runtime();
        let durability = Durability::write_ahead(SyncPolicy::Interval(EVERY));
        let pool = rt.block_on(async {
            let pool = start(dir.path(), durability, &faults, &Done::default(), none).await;
            submit_all(&pool, 0..5).await;
            assert_eq!(
                faults.calls(Op::Sync),
                0,
                "submits do not wait for an fsync"
            );
            tokio::time::sleep(EVERY + EVERY / 2).await;
            assert_eq!(faults.calls(Op::Sync), 1);
            submit_all(&pool, 5..10).await;
            assert_eq!(faults.calls(Op::Sync), 1);
            pool
        });
        crash(rt, pool);

        cut.apply(&faults);
        let (recovery, live) = recover(dir.path());
        let (survivors, torn) = match cut {
            Cut::Clean => (5, false),
            Cut::Torn(keep) => (5 + keep / RECORD, keep % RECORD != 0),
            // Zeros from a record boundary on read as room never written, not a torn tail.
            Cut::Zeroed(_) => (5, false),
        };
        assert_eq!(live, (0..survivors).collect::<Vec<_>>(), "{cut:?}");
        assert_eq!(
            recovery.torn_tails.len(),
            usize::from(torn),
            "{cut:?}: {recovery:?}"
        );
        assert!(
            recovery.damage.is_empty() && recovery.damaged_copies.is_empty(),
            "{cut:?}: {recovery:?}"
        );
    }
}

/// A segment never fsynced whose length reached the disk but not its data is all zeros after
/// the power cut. Nothing valid is in it, so it is a torn tail like any other: it is not
/// reported as damage, nor copied aside.
#[test]
fn a_never_synced_segment_left_zero_filled_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let faults = crash_after_submitting(dir.path(), SyncPolicy::Never, 8);
    Cut::Zeroed(HEADER + 3 * RECORD).apply(&faults);
    let (recovery, live) = recover(dir.path());
    assert!(live.is_empty(), "{live:?}");
    assert!(
        recovery.damage.is_empty() && recovery.damaged_copies.is_empty(),
        "{recovery:?}"
    );
}

/// On-shutdown mode: the spill's segment fails (its creation, its header, the queued tasks'
/// records, their fsync, the directory's fsync, or later the interrupted task's record or its
/// fsync); what was not saved in it is written to a fresh segment, the failure is in the
/// report, and after a power cut every task comes back. A chunk refused for a full disk whose
/// records then fit one by one needs no fresh segment for itself, though a later spill does
/// not write to a segment that failed (`segments`: how many are created).
#[test]
fn a_spill_that_fails_once_is_retried_in_a_fresh_segment() {
    let cases = [
        (Op::Create, 1, EIO, 2),
        (Op::Write, 1, ENOSPC, 2),
        (Op::Write, 2, ENOSPC, 2),
        (Op::Write, 2, EIO, 2),
        (Op::Sync, 1, EIO, 2),
        (Op::SyncDir, 1, EIO, 2),
        (Op::Write, 3, ENOSPC, 1),
        (Op::Write, 3, EIO, 2),
        (Op::Sync, 2, EIO, 2),
    ];
    for (op, nth, code, segments) in cases {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        let report = runtime().block_on(async {
            let pool = start(
                dir.path(),
                Durability::on_shutdown(),
                &faults,
                &Done::default(),
                none,
            )
            .await;
            submit_all(&pool, 0..10).await;
            in_flight(&pool, 1).await;
            // Nothing is written before the shutdown in this mode.
            assert_eq!(faults.calls(op), 0);
            faults.fail_nth(op, nth, code);
            pool.shutdown().await.unwrap()
        });
        let case = format!("{op:?} #{nth} ({code})");
        assert_eq!(report_errno(&report), Some(code), "{case}: {report:?}");
        assert_eq!(report.unsaved, 0, "{case}: {report:?}");
        assert_eq!(
            (report.spilled, report.interrupted),
            (9, 1),
            "{case}: {report:?}"
        );
        assert_eq!(
            faults.calls(Op::Create),
            segments,
            "{case}: segments created"
        );

        faults.power_cut().unwrap();
        let (recovery, live) = recover(dir.path());
        assert!(undamaged(&recovery), "{case}: {recovery:?}");
        assert_eq!(live, (0..10).collect::<Vec<_>>(), "{case}");
    }
}

/// On-shutdown mode: both spill attempts fail. The report says so (the error, `unsaved`, a
/// failing exit code), nothing panics, and the segments the replayed tasks came from are kept:
/// only the tasks new in the failed run are lost, fewer than `unsaved` says.
#[test]
fn a_spill_that_fails_twice_is_reported_and_the_old_segments_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    // A first run leaves tasks 0 to 4 in the journal.
    let first = runtime().block_on(async {
        let faults = Faults::new();
        let pool = start(
            dir.path(),
            Durability::on_shutdown(),
            &faults,
            &Done::default(),
            none,
        )
        .await;
        submit_all(&pool, 0..5).await;
        pool.shutdown().await.unwrap()
    });
    assert!(first.is_clean(), "{first:?}");
    let old = segments(dir.path());
    assert_eq!(old.len(), 1);

    // The second replays them, takes three more, and every fsync fails.
    let faults = Faults::new();
    let report = runtime().block_on(async {
        let pool = start(
            dir.path(),
            Durability::on_shutdown(),
            &faults,
            &Done::default(),
            none,
        )
        .await;
        assert_eq!(pool.recovery().replayed, 5);
        submit_all(&pool, 5..8).await;
        faults.fail_from(Op::Sync, 1, EIO);
        pool.shutdown().await.unwrap()
    });
    assert_eq!(report_errno(&report), Some(EIO), "{report:?}");
    assert_eq!((report.replayed, report.submitted), (5, 3), "{report:?}");
    assert_eq!(report.unsaved, 8, "{report:?}");
    assert_eq!(report.spilled + report.interrupted, 0, "{report:?}");
    assert_eq!(report.exit_code(), std::process::ExitCode::FAILURE);
    assert!(old[0].exists(), "the old segment is kept");

    let (_, live) = after_power_cut(dir.path(), &faults);
    assert_eq!(live, [0, 1, 2, 3, 4]);
}

/// Write-ahead mode: the spill at shutdown fails in both segments. This run's write-ahead
/// segments, which hold every accepted task, are kept, so none is lost.
#[test]
fn a_write_ahead_spill_that_fails_twice_keeps_the_run_segments() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let report = runtime().block_on(async {
        let pool = start(dir.path(), ALWAYS, &faults, &Done::default(), none).await;
        submit_all(&pool, 0..6).await;
        faults.fail_from_next(Op::Sync, EIO);
        pool.shutdown().await.unwrap()
    });
    assert_eq!(report_errno(&report), Some(EIO), "{report:?}");
    assert_eq!(report.unsaved, 6, "{report:?}");
    assert!(!report.is_clean());

    let (_, live) = after_power_cut(dir.path(), &faults);
    assert_eq!(live, [0, 1, 2, 3, 4, 5]);
}

/// Write-ahead mode: the spill is durable but the run's old segments cannot be removed at
/// close. The report says so; the next start reads the old segments and the spill, and has
/// each live task once.
#[test]
fn a_failed_removal_at_close_is_reported_and_costs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let report = runtime().block_on(async {
        let pool = start(dir.path(), ALWAYS, &faults, &Done::default(), none).await;
        submit_all(&pool, 0..3).await;
        faults.fail_from_next(Op::Remove, EIO);
        pool.shutdown().await.unwrap()
    });
    assert_eq!(report_errno(&report), Some(EIO), "{report:?}");
    assert_eq!(report.unsaved, 0, "{report:?}");
    assert_eq!(report.spilled + report.interrupted, 3, "{report:?}");

    let (recovery, live) = after_power_cut(dir.path(), &faults);
    assert_eq!(recovery.segments, 2, "{recovery:?}");
    assert_eq!(live, [0, 1, 2]);
}

/// A task out of attempts whose dead letter cannot be written is not lost, nor counted as
/// failed: it stays a live task, spilled at shutdown with its last error, and the report has
/// the failure.
#[test]
fn a_dead_letter_that_cannot_be_written_stays_a_live_task() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let report = runtime().block_on(async {
        let pool = Pool::builder()
            .workers(1)
            .max_attempts(1)
            .drain_deadline(Duration::from_secs(1))
            .file_ops(faults.ops())
            .journal_dir(dir.path())
            .start(|_: Task<u64>| async { Err::<(), _>("always fails") })
            .await
            .unwrap();
        // The dead-letter segment cannot be created.
        faults.fail_nth(Op::Create, 1, EIO);
        pool.submit(7).await.unwrap();
        while faults.calls(Op::Create) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        pool.shutdown().await.unwrap()
    });
    assert_eq!(report_errno(&report), Some(EIO), "{report:?}");
    assert_eq!(
        (report.failed, report.spilled, report.unsaved),
        (0, 1, 0),
        "{report:?}"
    );

    faults.power_cut().unwrap();
    let contents = crate::journal::inspect(dir.path()).unwrap();
    assert!(contents.dead.is_empty(), "{contents:?}");
    let [task] = &contents.live[..] else {
        panic!("one live task expected: {contents:?}")
    };
    assert_eq!(task.payload, b"7");
    assert_eq!(task.attempts, 1);
    assert_eq!(task.last_error.as_deref(), Some("always fails"));
}

/// What one run of the compaction scenario left.
struct CompactionRun {
    /// File operations the run made after its start, before the crash.
    calls: u64,
    /// Tasks accepted and not completed at the crash: each must come back.
    unfinished: Vec<u64>,
    /// Tasks the compaction copied before the crash.
    compacted: u64,
}

/// Task 0 never finishes; tasks 1 to 19 finish one after the other, filling small segments,
/// so the first segment holds one live task among finished ones and is compacted. The pool
/// is then torn down as a kill would (after `halt_after` file operations past the start, if
/// given, every further one fails and changes nothing: the process died there).
fn compaction_scenario(dir: &Path, faults: &Arc<Faults>, halt_after: Option<u64>) -> CompactionRun {
    let done = Done::default();
    let rt = runtime();
    let (pool, run) = rt.block_on(async {
        let finished = Arc::clone(&done);
        let pool = Pool::builder()
            .workers(2)
            .durability(ALWAYS)
            .segment_bytes(HEADER + 4 * RECORD)
            .file_ops(faults.ops())
            .journal_dir(dir)
            .start(move |task: Task<u64>| {
                let finished = Arc::clone(&finished);
                async move {
                    let n = *task.payload();
                    if n == 0 {
                        std::future::pending::<()>().await;
                    }
                    finished.lock().unwrap().push(n);
                    Ok::<(), std::io::Error>(())
                }
            })
            .await
            .unwrap();
        // The start's own calls (the run counter) are not crash points here.
        let started = faults.total_calls();
        if let Some(calls) = halt_after {
            faults.halt_after(started + calls);
        }
        let mut accepted = Vec::new();
        for n in 0..20 {
            if pool.submit(n).await.is_ok() {
                accepted.push(n);
            }
            // Let the task finish, and its ack, deletions and compactions run.
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let finished = done.lock().unwrap().clone();
        let run = CompactionRun {
            calls: faults.total_calls() - started,
            unfinished: accepted
                .into_iter()
                .filter(|n| !finished.contains(n))
                .collect(),
            compacted: pool.stats().compacted,
        };
        (pool, run)
    });
    crash(rt, pool);
    run
}

/// A crash after each file operation of a run that compacts, in turn (writing the copies,
/// fsyncing them, fsyncing the directory, unlinking each old segment, fsyncing the directory
/// again), with and without a power cut after it: every unfinished task comes back, from its
/// old segment or from its copy — the old state or the new, never neither.
#[test]
fn a_crash_at_any_step_of_a_compaction_keeps_every_unfinished_task() {
    let clean = {
        let dir = tempfile::tempdir().unwrap();
        compaction_scenario(dir.path(), &Faults::new(), None)
    };
    assert!(clean.compacted > 0, "the scenario compacts");
    assert_eq!(clean.unfinished, [0]);
    let (mut copied_old_kept, mut copied_old_gone) = (0, 0);
    for halt in 1..=clean.calls {
        for power_cut in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let faults = Faults::new();
            let run = compaction_scenario(dir.path(), &faults, Some(halt));
            let first_segment = segments(dir.path()).first().cloned();
            if power_cut {
                faults.power_cut().unwrap();
            }
            let (recovery, live) = recover(dir.path());
            let context = format!("crash after call {halt}, power cut {power_cut}");
            assert!(
                recovery.damage.is_empty() && recovery.damaged_copies.is_empty(),
                "{context}: {recovery:?}"
            );
            for n in &run.unfinished {
                assert!(live.contains(n), "{context}: task {n} lost; live {live:?}");
            }
            if run.compacted > 0 {
                let oldest_kept =
                    first_segment.is_some_and(|path| path.ends_with(format!("{:020}.seg", 1)));
                if oldest_kept {
                    copied_old_kept += 1;
                } else {
                    copied_old_gone += 1;
                }
            }
        }
    }
    // The crashes fell between the copy and the deletion, and after the deletion.
    assert!(
        copied_old_kept > 0 && copied_old_gone > 0,
        "{copied_old_kept} {copied_old_gone}"
    );
}

/// On-shutdown mode: the spill reserve cannot grow once (ENOSPC). That submit is refused with
/// the task handed back and the journal reported not ready; the next growth succeeds and all is
/// well again; every accepted task is spilled.
#[test]
fn a_spill_reserve_that_cannot_grow_refuses_the_task_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    runtime().block_on(async {
        let (pool, runner) = Pool::<String>::builder()
            .queue_capacity(10_000)
            .file_ops(faults.ops())
            .journal_dir(dir.path())
            .build()
            .await
            .unwrap();
        drop(runner);
        // The reserve's first step took calls 1 to 3 (remove a leftover, create, allocate).
        assert_eq!(faults.calls(Op::Allocate), 3);
        faults.fail_nth(Op::Allocate, 4, ENOSPC);
        let big = "x".repeat(1000);
        let mut accepted = 0;
        let refused = loop {
            match pool.submit(big.clone()).await {
                Ok(_) => accepted += 1,
                Err(SubmitError::JournalFull { task, error }) => {
                    assert_eq!(task, big, "the task is handed back");
                    assert_eq!(errno(&error), Some(ENOSPC));
                    break accepted;
                }
                Err(other) => panic!("unexpected refusal: {other:?}"),
            }
            assert!(accepted < 5_000, "the reserve never had to grow");
        };
        assert!(
            refused > 500,
            "1 MiB covers about a thousand such tasks: {refused}"
        );
        assert!(!pool.stats().journal_ready);
        match pool.health() {
            crate::Health::JournalUnavailable(error) => assert_eq!(errno(&error), Some(ENOSPC)),
            other => panic!("expected the journal unavailable, got {other:?}"),
        }
        // The next growth succeeds.
        pool.submit(big.clone()).await.unwrap();
        let stats = pool.stats();
        assert!(stats.journal_ready, "{stats:?}");
        assert!(stats.spill_reserve > 1 << 20, "{stats:?}");
        assert!(pool.health().is_ready());
        let report = pool.shutdown().await.unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.spilled, refused + 1);
    });
}
