//! A real full disk: a tiny tmpfs mounted by the test (Linux, as root, as CI runs). Where
//! mounting is refused the tests fail under `CI=true`, and elsewhere skip with a printed reason.
//!
//! Write-ahead: once the disk is full, `submit` fails with `SubmitError::Journal` and hands the
//! task back; the journal takes no more writes; every task accepted before is still in the
//! journal and comes back once there is room. On-shutdown, with the spill reserve (the
//! default): `submit` refuses with `SubmitError::JournalFull` once the reserve cannot grow, and
//! the spill saves every task accepted; a start that cannot take the reserve's first step fails.
//! Without the reserve, a spill that finds the disk full saves what fits, and is reported loudly
//! (an error in the report, the unsaved ids, a failing exit code).
//!
//! The reserve file's life on an ordinary directory, too: a shutdown that journals nothing
//! leaves it for the next start, which replaces it (or removes it, making none).

#![cfg(target_os = "linux")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use drainpool::{Durability, Pool, SubmitError, SyncPolicy, Task};

/// A tmpfs of `size` mounted on a fresh temporary directory; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount could not run: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount refused: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.path())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// The tmpfs, or `None` once the test is skipped (outside CI) for want of one.
#[track_caller]
fn mounted(size: &str) -> Option<Tmpfs> {
    common::require(
        "a tmpfs (mounted as root) for a real full disk",
        Tmpfs::mount(size),
    )
}

fn is_enospc(error: &drainpool::JournalError) -> bool {
    error.io_error().and_then(std::io::Error::raw_os_error) == Some(28)
}

/// A payload of about 1 KiB of JSON.
fn payload(n: u64) -> (u64, String) {
    (n, "x".repeat(1000))
}

async fn hanging_pool(dir: PathBuf, durability: Durability) -> Pool<(u64, String)> {
    hanging_builder(dir, durability)
        .spill_reserve(false)
        .start(hang)
        .await
        .unwrap()
}

/// A handler that holds its task until the deadline, then gives up.
async fn hang(task: Task<(u64, String)>) -> Result<(), &'static str> {
    task.cancelled().await;
    Err("stopped at the deadline")
}

fn hanging_builder(dir: PathBuf, durability: Durability) -> drainpool::Builder<(u64, String)> {
    Pool::builder()
        .workers(1)
        .queue_capacity(10_000)
        .drain_deadline(Duration::from_millis(10))
        .cancel_grace(Duration::from_millis(10))
        .durability(durability)
        .journal_dir(dir)
}

#[tokio::test]
async fn write_ahead_on_a_full_disk_refuses_new_tasks_and_keeps_every_accepted_one() {
    let Some(disk) = mounted("256k") else { return };
    let dir = disk.path().join("journal");
    let pool = hanging_pool(dir.clone(), Durability::write_ahead(SyncPolicy::Always)).await;

    let mut accepted = Vec::new();
    let mut refused = None;
    for n in 0..1_000 {
        match pool.submit(payload(n)).await {
            Ok(_) => accepted.push(n),
            Err(SubmitError::Journal { task, error }) => {
                assert_eq!(task, payload(n), "the refused task is handed back whole");
                assert!(is_enospc(&error), "{error:?}");
                refused = Some(n);
                break;
            }
            Err(other) => panic!("unexpected refusal: {other}"),
        }
    }
    let refused = refused.expect("the disk filled up");
    assert!(
        accepted.len() > 50,
        "only {} accepted before the disk was full",
        accepted.len()
    );
    // The journal takes no more writes, even small ones.
    match pool.submit((refused + 1, String::new())).await {
        Err(SubmitError::Journal { task, .. }) => assert_eq!(task.0, refused + 1),
        other => panic!("expected the journal to stay stopped, got {other:?}"),
    }

    let report = pool.shutdown().await.unwrap();
    assert!(!report.is_clean());
    assert!(report.journal_error.is_some());
    assert_eq!(report.exit_code(), std::process::ExitCode::FAILURE);

    // With room again, the next start replays every accepted task: none was lost.
    disk.resize("16m");
    let pool = hanging_pool(dir, Durability::on_shutdown()).await;
    assert_eq!(
        pool.recovery().replayed,
        accepted.len() as u64,
        "{:?}",
        pool.recovery()
    );
    pool.shutdown_now();
    let report = pool.wait().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[tokio::test]
async fn a_spill_that_finds_the_disk_full_is_reported_loudly() {
    let Some(disk) = mounted("256k") else { return };
    let dir = disk.path().join("journal");
    let pool = hanging_pool(dir.clone(), Durability::on_shutdown()).await;
    for n in 0..500 {
        pool.submit(payload(n)).await.unwrap();
    }
    let report = pool.shutdown().await.unwrap();
    assert!(!report.is_clean());
    assert!(
        report.journal_error.as_deref().is_some_and(is_enospc),
        "{report:?}"
    );
    assert!(report.unsaved > 0, "{report:?}");
    assert_eq!(
        report.spilled + report.interrupted + report.unsaved,
        500,
        "every task is accounted for: {report:?}"
    );
    assert_eq!(report.exit_code(), std::process::ExitCode::FAILURE);
}

/// On-shutdown mode, no room for the whole queue: the spill saves what fits, in id order, and
/// lists exactly the ids it could not save; every saved task comes back at the next start.
#[tokio::test]
async fn a_spill_on_a_full_disk_saves_what_fits_and_names_the_rest() {
    let Some(disk) = mounted("256k") else { return };
    let dir = disk.path().join("journal");
    let pool = hanging_pool(dir.clone(), Durability::on_shutdown()).await;
    let mut ids = Vec::new();
    for n in 0..500 {
        ids.push((pool.submit(payload(n)).await.unwrap(), n));
    }
    // Task 0 in flight (its handler hangs), the other 499 queued.
    common::eventually(common::PATIENCE, "the first task in flight", || {
        pool.stats().in_flight == 1
    })
    .await;
    let in_flight = ids[0].0;
    let report = pool.shutdown().await.unwrap();
    assert!(
        report.journal_error.as_deref().is_some_and(is_enospc),
        "{report:?}"
    );
    // About 200 of the 500 1 KiB tasks fit in 256 KiB: far more than none.
    assert!(report.spilled > 100, "{report:?}");
    assert!(report.unsaved > 0, "{report:?}");
    assert_eq!(
        report.unsaved_ids.len() as u64,
        report.unsaved,
        "{report:?}"
    );
    assert_eq!(
        report.spilled + report.interrupted + report.unsaved,
        500,
        "{report:?}"
    );
    assert!(!report.is_clean());
    assert!(
        report
            .interrupted_ids
            .iter()
            .all(|id| !report.unsaved_ids.contains(id)),
        "an interrupted id is listed only if it was saved: {report:?}"
    );
    assert_eq!(
        u8::from(report.interrupted_ids.contains(&in_flight))
            + u8::from(report.unsaved_ids.contains(&in_flight)),
        1,
        "the task in flight is either saved as interrupted or listed unsaved: {report:?}"
    );

    // What the journal holds is exactly what the report did not call unsaved.
    let journaled: Vec<drainpool::TaskId> = drainpool::journal::inspect(&dir)
        .unwrap()
        .live
        .iter()
        .map(|task| task.id)
        .collect();
    let expected: Vec<drainpool::TaskId> = ids
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !report.unsaved_ids.contains(id))
        .collect();
    let mut journaled_sorted = journaled.clone();
    journaled_sorted.sort_unstable();
    assert_eq!(journaled_sorted, expected);
    // The queue was saved in id order: the unsaved queued tasks are the newest ones.
    let first_unsaved = report
        .unsaved_ids
        .iter()
        .find(|id| **id != in_flight)
        .copied();
    assert!(first_unsaved.is_some(), "{report:?}");
    assert!(
        journaled
            .iter()
            .filter(|id| **id != in_flight)
            .all(|id| first_unsaved.is_some_and(|first| *id < first)),
        "saved queued tasks all precede the first unsaved one: {report:?}"
    );

    // With room again, every saved task comes back.
    disk.resize("16m");
    let pool = hanging_pool(dir, Durability::on_shutdown()).await;
    assert_eq!(pool.recovery().replayed, journaled.len() as u64);
    pool.shutdown_now();
    pool.wait().await.unwrap();
}

/// On-shutdown mode with the spill reserve: once the reserve cannot grow, `submit` refuses and
/// hands the task back, the pool says the journal is not ready, and the spill at shutdown saves
/// every task accepted: a full disk costs none.
#[tokio::test]
async fn with_the_spill_reserve_a_full_disk_costs_no_accepted_task() {
    let Some(disk) = mounted("4m") else { return };
    let dir = disk.path().join("journal");
    let pool = hanging_builder(dir.clone(), Durability::on_shutdown())
        .start(hang)
        .await
        .unwrap();
    assert!(pool.stats().journal_ready);
    assert!(pool.stats().spill_reserve >= 1 << 20);
    let mut accepted = 0u64;
    let mut refused = None;
    for n in 0..20_000 {
        match pool.submit(payload(n)).await {
            Ok(_) => accepted += 1,
            Err(SubmitError::JournalFull { task, error }) => {
                assert_eq!(task, payload(n), "the refused task is handed back whole");
                assert!(is_enospc(&error), "{error:?}");
                refused = Some(n);
                break;
            }
            Err(other) => panic!("unexpected refusal: {other}"),
        }
    }
    assert!(refused.is_some(), "the disk filled up");
    assert!(accepted > 1_000, "only {accepted} accepted");
    let stats = pool.stats();
    assert!(!stats.journal_ready, "{stats:?}");
    // The reserve covers every accepted task's record (each over 1 KiB).
    assert!(stats.spill_reserve >= accepted * 1024, "{stats:?}");

    let report = pool.shutdown().await.unwrap();
    assert_eq!(report.unsaved, 0, "{report:?}");
    assert!(report.unsaved_ids.is_empty());
    assert_eq!(report.spilled + report.interrupted, accepted, "{report:?}");
    assert!(report.is_clean(), "{report:?}");
    assert!(
        !dir.join("reserve").exists(),
        "the reserve went before the spill"
    );
    let journaled = drainpool::journal::inspect(&dir).unwrap().live.len() as u64;
    assert_eq!(journaled, accepted);
}

/// A journal directory that cannot take the spill reserve's first step fails the start, with
/// the file system's error, instead of failing at shutdown.
#[tokio::test]
async fn a_start_without_room_for_the_spill_reserve_fails() {
    let Some(disk) = mounted("256k") else { return };
    let dir = disk.path().join("journal");
    let started = hanging_builder(dir.clone(), Durability::on_shutdown())
        .start(hang)
        .await;
    match started {
        Err(drainpool::StartError::Journal(error)) => assert!(is_enospc(&error), "{error:?}"),
        other => panic!("expected the start to fail, got {other:?}"),
    }
    // Turned off, the same directory starts.
    let pool = hanging_pool(dir, Durability::on_shutdown()).await;
    pool.shutdown().await.unwrap();
}

/// On an ordinary directory: a shutdown that journals nothing leaves the reserve file
/// (removing it was most of an idle pool's shutdown on a disk that discards freed blocks); the
/// next start replaces it, and a start that makes no reserve removes it.
#[tokio::test]
async fn an_idle_shutdown_leaves_the_spill_reserve_to_the_next_start() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("journal");
    let reserve = dir.join("reserve");
    let pool = hanging_builder(dir.clone(), Durability::on_shutdown())
        .start(hang)
        .await
        .unwrap();
    assert_eq!(std::fs::metadata(&reserve).unwrap().len(), 1 << 20);
    let report = pool.shutdown().await.unwrap();
    assert!(report.is_clean() && report.spilled == 0, "{report:?}");
    assert_eq!(std::fs::metadata(&reserve).unwrap().len(), 1 << 20);
    assert_eq!(
        pool.stats().spill_reserve,
        0,
        "nothing is set aside once stopped"
    );

    // What an earlier run left is replaced, not trusted.
    std::fs::write(&reserve, b"left over").unwrap();
    let pool = hanging_builder(dir.clone(), Durability::on_shutdown())
        .start(hang)
        .await
        .unwrap();
    let bytes = std::fs::read(&reserve).unwrap();
    assert_eq!(bytes.len(), 1 << 20);
    assert!(bytes.iter().all(|&b| b == 0), "a reserve of its own");
    pool.shutdown().await.unwrap();
    assert!(reserve.exists());

    let pool = hanging_pool(dir.clone(), Durability::write_ahead(SyncPolicy::Always)).await;
    assert!(
        !reserve.exists(),
        "a start without a reserve removes the one left"
    );
    pool.shutdown().await.unwrap();
}

/// A shutdown that journals tasks removes the reserve first: its room is the spill's.
#[tokio::test]
async fn a_shutdown_that_spills_removes_the_spill_reserve() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("journal");
    let pool = hanging_builder(dir.clone(), Durability::on_shutdown())
        .start(hang)
        .await
        .unwrap();
    for n in 0..10 {
        pool.submit(payload(n)).await.unwrap();
    }
    let report = pool.shutdown().await.unwrap();
    assert_eq!(report.spilled + report.interrupted, 10, "{report:?}");
    assert!(report.is_clean(), "{report:?}");
    assert!(!dir.join("reserve").exists());
    assert_eq!(drainpool::journal::inspect(&dir).unwrap().live.len(), 10);
}
