//! The spill and the journal's upkeep failing: a spill retried in a fresh segment or reported,
//! a removal that fails at close, a dead letter that cannot be written, a crash during a
//! compaction, a spill reserve that cannot grow.

use super::*;

/// A write-ahead pool on `dir` accepts tasks `0..tasks`, then every `op` from the next fails
/// with EIO, and the pool shuts down. Returns the shutdown's report.
fn shut_down_failing(dir: &Path, faults: &Arc<Faults>, tasks: u64, op: Op) -> ShutdownReport {
    runtime().block_on(async {
        let pool = start(dir, ALWAYS, faults, &Done::default(), none).await;
        submit_all(&pool, 0..tasks).await;
        faults.fail_from_next(op, EIO);
        pool.shutdown().await.unwrap()
    })
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
    let report = shut_down_failing(dir.path(), &faults, 6, Op::Sync);
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
    let report = shut_down_failing(dir.path(), &faults, 3, Op::Remove);
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
