//! Recovery over hostile or odd directories: symbolic links and special files where journal
//! files should be, a directory others may write, a run counter at its end, a segment under
//! another segment's name, the empty file a failed header write leaves; and the text of the
//! errors they give.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use super::*;
use crate::error::FileKind;
use crate::journal::faults::{ENOSPC, Faults, Op};
use crate::journal::handle::SpillOutcome;
use crate::journal::inspect;
use crate::task::TaskId;

type Opened = (Journal, RecoveryReport, Vec<Recovered<Vec<u8>>>);

fn try_open(dir: &Path) -> Result<Opened, StartError> {
    Journal::open(dir, fs::os(), |record| record.payload.to_vec())
}

/// Opens `dir` on another thread and waits at most ten seconds: a start that hangs fails the
/// test instead of hanging it.
fn open_in_time(dir: &Path) -> Result<Opened, StartError> {
    let (tx, rx) = mpsc::channel();
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(try_open(&dir));
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the start returns instead of hanging")
}

fn spill_one(journal: &mut Journal, seq: u64) -> SpillOutcome {
    let record = TaskRecord {
        id: TaskId::new(journal.run(), seq),
        state: crate::journal::TaskState::default(),
        last_error: "".into(),
        payload: b"\"x\"",
        options: None,
    };
    journal.spill(&vec![record])
}

/// A directory holding one closed live segment (number 1) with one task.
fn journal_with_one_task() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let (mut journal, _, _) = try_open(tmp.path()).unwrap();
    assert!(spill_one(&mut journal, 1).unsaved.is_empty());
    journal.close().unwrap();
    tmp
}

fn wrong_kind(result: Result<Opened, StartError>) -> (PathBuf, FileKind, FileKind) {
    match result {
        Err(StartError::Journal(JournalError::WrongKind {
            path,
            expected,
            found,
        })) => (path, expected, found),
        other => panic!("expected WrongKind, got {:?}", other.map(|o| o.1)),
    }
}

#[cfg(unix)]
#[test]
fn a_lock_symlink_is_refused_and_its_target_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::write(&outside, b"precious bytes, not a run counter").unwrap();
    let dir = tmp.path().join("journal");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join(dir::LOCK_FILE)).unwrap();

    let (path, expected, found) = wrong_kind(try_open(&dir));
    assert_eq!(path, dir.join(dir::LOCK_FILE));
    assert_eq!((expected, found), (FileKind::File, FileKind::Symlink));
    assert_eq!(
        std::fs::read(&outside).unwrap(),
        b"precious bytes, not a run counter"
    );
}

#[cfg(unix)]
#[test]
fn a_dangling_lock_symlink_creates_nothing_at_its_target() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("made-by-the-pool");
    let dir = tmp.path().join("journal");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::symlink(&target, dir.join(dir::LOCK_FILE)).unwrap();

    let (path, _, found) = wrong_kind(try_open(&dir));
    assert_eq!((path, found), (dir.join(dir::LOCK_FILE), FileKind::Symlink));
    assert!(!target.exists());
}

#[cfg(unix)]
#[test]
fn a_damaged_symlink_is_refused_and_no_copy_goes_where_it_points() {
    let tmp = journal_with_one_task();
    let elsewhere = tempfile::tempdir().unwrap();
    let segment = tmp.path().join(dir::segment_name(1, false));
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[20] ^= 0x01; // the header's first epoch copy: damage that keeps a copy
    std::fs::write(&segment, &bytes).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), tmp.path().join(DAMAGED_DIR)).unwrap();

    let (path, expected, found) = wrong_kind(try_open(tmp.path()));
    assert_eq!(path, tmp.path().join(DAMAGED_DIR));
    assert_eq!((expected, found), (FileKind::Directory, FileKind::Symlink));
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
}

#[cfg(unix)]
#[test]
fn a_journal_directory_others_may_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    for mode in [0o770, 0o707, 0o1777] {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        match try_open(tmp.path()) {
            Err(StartError::Journal(
                ref error @ JournalError::InsecureDirectory { ref path, .. },
            )) => {
                assert_eq!(path, tmp.path());
                assert!(error.to_string().contains("writable"), "{error}");
            }
            other => panic!(
                "{mode:o}: expected InsecureDirectory, got {:?}",
                other.map(|o| o.1)
            ),
        }
        assert!(!tmp.path().join(dir::LOCK_FILE).exists(), "{mode:o}");
    }
    // Owner-only, and merely readable by others, are fine.
    for mode in [0o700, 0o755] {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        assert!(try_open(tmp.path()).is_ok(), "{mode:o}");
    }
}

#[test]
fn a_directory_owned_by_another_user_is_refused() {
    assert!(dir::insecurity(0o40700, 1000, 1000).is_none());
    assert!(dir::insecurity(0o40755, 0, 0).is_none());
    let reason = dir::insecurity(0o40700, 1001, 1000).unwrap();
    assert!(
        reason.contains("uid 1001") && reason.contains("uid 1000"),
        "{reason}"
    );
    // root running over a directory another user owns is the case to refuse above all.
    assert!(dir::insecurity(0o40700, 1000, 0).is_some());
    assert!(dir::insecurity(0o40720, 1000, 1000).is_some());
}

#[cfg(unix)]
#[test]
fn special_files_named_like_segments_are_skipped_and_reported() {
    let tmp = journal_with_one_task();
    let fifo = tmp.path().join(dir::segment_name(2, false));
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let dangling = tmp.path().join(dir::segment_name(3, false));
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
    let subdir = tmp.path().join(dir::segment_name(4, true));
    std::fs::create_dir(&subdir).unwrap();

    let (mut journal, report, live) = open_in_time(tmp.path()).unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(report.segments, 1);
    let skipped: Vec<_> = report
        .skipped
        .iter()
        .map(|s| (s.path.clone(), s.kind))
        .collect();
    assert_eq!(
        skipped,
        [
            (fifo.clone(), FileKind::Fifo),
            (dangling.clone(), FileKind::Symlink),
            (subdir.clone(), FileKind::Directory),
        ]
    );
    assert!(report.damage.is_empty() && report.torn_tails.is_empty());

    // The new segment takes a number none of them has.
    assert!(spill_one(&mut journal, 1).unsaved.is_empty());
    drop(journal);
    assert!(tmp.path().join(dir::segment_name(5, false)).exists());

    // verify and inspect read the same listing.
    let verification = inspect::verify(tmp.path()).unwrap();
    assert_eq!(verification.skipped, report.skipped);
    assert!(!verification.is_clean());
    let contents = inspect::inspect(tmp.path()).unwrap();
    assert_eq!(contents.skipped, 3);
    assert_eq!(contents.live.len(), 2);
    assert!(std::fs::symlink_metadata(&fifo).is_ok());
}

#[test]
fn a_start_that_cannot_raise_the_run_counter_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut journal, _, _) = try_open(tmp.path()).unwrap();
    dir::write_run(
        &fs::Os,
        &mut journal.lock,
        &tmp.path().join(dir::LOCK_FILE),
        u64::MAX - 1,
    )
    .unwrap();
    drop(journal);

    let (journal, _, _) = try_open(tmp.path()).unwrap();
    assert_eq!(journal.run(), u64::MAX);
    drop(journal);
    for _ in 0..2 {
        match try_open(tmp.path()) {
            Err(ref error @ StartError::RunsExhausted { ref dir }) => {
                assert_eq!(dir, tmp.path());
                assert!(error.to_string().contains("run number"), "{error}");
            }
            other => panic!("expected RunsExhausted, got {:?}", other.map(|o| o.1)),
        }
    }
}

#[test]
fn a_segment_whose_header_names_another_number_is_damage() {
    let tmp = journal_with_one_task();
    let moved = tmp.path().join(dir::segment_name(7, false));
    std::fs::rename(tmp.path().join(dir::segment_name(1, false)), &moved).unwrap();

    let verification = inspect::verify(tmp.path()).unwrap();
    assert!(!verification.is_clean());
    assert_eq!(verification.damage.len(), 1, "{verification:?}");
    let damage = &verification.damage[0];
    assert_eq!((damage.path.as_path(), damage.offset), (moved.as_path(), 0));
    assert!(
        damage.reason.contains("segment number 1") && damage.reason.contains('7'),
        "{}",
        damage.reason
    );

    let (journal, report, live) = try_open(tmp.path()).unwrap();
    assert_eq!(report.damage, verification.damage);
    assert_eq!(report.damaged_copies.len(), 1);
    // Its records are still read: at least once, never lost.
    assert_eq!(live.len(), 1);
    drop(journal);
}

#[test]
fn a_failed_header_write_leaves_no_empty_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let (mut journal, _, _) =
        Journal::open(tmp.path(), faults.ops(), |record| record.payload.to_vec()).unwrap();
    faults.fail_next(Op::Write, ENOSPC);
    assert!(journal.append_ack(TaskId::new(1, 1)).is_err());
    faults.short_write_next(10, ENOSPC);
    assert!(journal.append_ack(TaskId::new(1, 1)).is_err());
    assert_eq!(dir::list_segments(tmp.path()).unwrap(), []);
}

#[test]
fn io_errors_show_their_os_error_once_in_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let error = JournalError::io(
        "open",
        &missing,
        Some(16),
        std::io::Error::from(std::io::ErrorKind::NotFound),
    );
    assert_eq!(
        error.to_string(),
        format!("open {} at offset 16", missing.display())
    );
    let source = std::error::Error::source(&error).unwrap().to_string();
    assert!(!error.to_string().contains(&source));
}

#[test]
fn a_failure_to_open_the_lock_is_not_called_a_recovery_failure() {
    let error = StartError::from(JournalError::io(
        "open",
        Path::new("/j/LOCK"),
        None,
        std::io::Error::from(std::io::ErrorKind::PermissionDenied),
    ));
    assert_eq!(error.to_string(), "could not open the journal");
}

#[test]
fn a_journal_path_that_is_a_file_is_not_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("journal");
    std::fs::write(&file, b"").unwrap();
    let (path, expected, found) = wrong_kind(try_open(&file));
    assert_eq!(path, file);
    assert_eq!((expected, found), (FileKind::Directory, FileKind::File));
    let error = JournalError::WrongKind {
        path,
        expected,
        found,
    };
    assert!(error.to_string().contains("not a directory"), "{error}");
}
