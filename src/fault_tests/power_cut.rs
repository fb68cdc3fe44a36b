//! Power cuts: what was never fsynced is lost, and what each sync policy promises survives.

use super::*;

/// Recovery found a torn tail if `torn` (and none otherwise), and no other damage.
fn torn_at_most(recovery: &crate::RecoveryReport, torn: bool, case: &str) {
    assert_eq!(
        recovery.torn_tails.len(),
        usize::from(torn),
        "{case}: {recovery:?}"
    );
    assert!(
        recovery.damage.is_empty() && recovery.damaged_copies.is_empty(),
        "{case}: {recovery:?}"
    );
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
        torn_at_most(&recovery, torn, &format!("cut at {keep}"));
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
        torn_at_most(&recovery, torn, &format!("{cut:?}"));
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
