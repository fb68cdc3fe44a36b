//! The journal directory: file names, listing, the lock and its run counter, writer epochs.
//!
//! Used by recovery (`Journal::recover`) and by the read-only look into a directory
//! (`inspect.rs`) alike, so both read the same names the same way.
//!
//! Hostile entries: an entry named like a segment that is not a regular file (a symbolic link,
//! a named pipe, …) is listed as [`Skipped`] and never opened; a `LOCK` or `damaged` that is
//! not a regular file or a real directory stops the start ([`JournalError::WrongKind`]). Before
//! anything is written, the directory must be writable by its owner alone, and that owner must
//! be the user running ([`check_writable_by_us_only`]): nobody else can then plant an entry
//! between these checks and the opens, which follow no link anyway.

use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::fs::{self, FileOps};
use crate::error::FileKind;
use crate::error::JournalError;
use crate::report::Skipped;

/// The lock file, which also holds the run counter.
pub(super) const LOCK_FILE: &str = "LOCK";
/// Where copies of damaged segments go.
pub(super) const DAMAGED_DIR: &str = "damaged";
/// The write-speed probe's file, removed again at once.
pub(super) const PROBE_FILE: &str = "probe.tmp";
const SEGMENT_SUFFIX: &str = ".seg";
const DEAD_PREFIX: &str = "dead-";

/// A segment file found in the directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct SegmentFile {
    pub(super) number: u64,
    pub(super) dead: bool,
    pub(super) path: PathBuf,
}

/// The file name of segment `number`: `NNNNNNNNNNNNNNNNNNNN.seg`, or with a `dead-` prefix for a
/// dead-letter segment.
pub(super) fn segment_name(number: u64, dead: bool) -> String {
    let prefix = if dead { DEAD_PREFIX } else { "" };
    format!("{prefix}{number:020}{SEGMENT_SUFFIX}")
}

/// The number of the segment named `name`, and whether it is a dead-letter segment; `None` for
/// any other name.
pub(super) fn parse_segment_name(name: &str) -> Option<(u64, bool)> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
    let (digits, dead) = match stem.strip_prefix(DEAD_PREFIX) {
        Some(digits) => (digits, true),
        None => (stem, false),
    };
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, dead))
}

/// The entries of a journal directory named like segments.
#[derive(Debug, Default)]
pub(super) struct Listing {
    /// The regular files, in number order.
    pub(super) segments: Vec<SegmentFile>,
    /// The others (links, pipes, directories, …), in name order: never opened.
    pub(super) skipped: Vec<Skipped>,
    /// A number above every one named, regular or not: the next segment's.
    pub(super) next_number: u64,
}

/// Lists the entries of `dir` named like segments. The kind of each is the entry's own (a
/// symbolic link is a link), so nothing is followed or opened.
pub(super) fn list(dir: &Path) -> Result<Listing, JournalError> {
    let entries = std::fs::read_dir(dir).map_err(|e| JournalError::io("list", dir, None, e))?;
    let mut listing = Listing {
        next_number: 1,
        ..Listing::default()
    };
    for entry in entries {
        let entry = entry.map_err(|e| JournalError::io("list", dir, None, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((number, dead)) = parse_segment_name(name) else {
            continue;
        };
        listing.next_number = listing.next_number.max(number.saturating_add(1));
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| JournalError::io("stat", &path, None, e))?;
        if kind.is_file() {
            listing.segments.push(SegmentFile { number, dead, path });
        } else {
            let kind = FileKind::of(kind);
            listing.skipped.push(Skipped { path, kind });
        }
    }
    listing.segments.sort();
    listing.skipped.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(listing)
}

/// Lists the segment files of `dir`, in number order.
#[cfg(test)]
pub(super) fn list_segments(dir: &Path) -> Result<Vec<SegmentFile>, JournalError> {
    Ok(list(dir)?.segments)
}

/// The entries of `dir` named like segments; an error if `dir` holds neither a segment nor a
/// `LOCK` file, which every directory a pool has opened has: the path is most likely mistyped
/// (the parent of the journal directory, say).
pub(super) fn journal_segments(dir: &Path) -> Result<Listing, JournalError> {
    let segments = list(dir)?;
    let lock = dir.join(LOCK_FILE);
    if segments.segments.is_empty()
        && segments.skipped.is_empty()
        && std::fs::symlink_metadata(&lock).is_err()
    {
        return Err(JournalError::io(
            "open",
            &lock,
            None,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not a journal directory: it has no LOCK file and no segment",
            ),
        ));
    }
    Ok(segments)
}

/// An error if `path` exists and is not a `expected` itself (a symbolic link to one is not).
pub(super) fn check_kind(path: &Path, expected: FileKind) -> Result<(), JournalError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if FileKind::of(meta.file_type()) == expected => Ok(()),
        Ok(meta) => Err(JournalError::WrongKind {
            path: path.to_path_buf(),
            expected,
            found: FileKind::of(meta.file_type()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(JournalError::io("stat", path, None, e)),
    }
}

/// Checks, before anything is written in it, that the journal directory `dir` can be changed
/// by the user running alone: a directory (or a link to one: the path is the operator's),
/// owned by that user, writable by neither its group nor everyone.
pub(super) fn check_writable_by_us_only(dir: &Path) -> Result<(), JournalError> {
    let meta = std::fs::metadata(dir).map_err(|e| JournalError::io("stat", dir, None, e))?;
    if !meta.is_dir() {
        return Err(JournalError::WrongKind {
            path: dir.to_path_buf(),
            expected: FileKind::Directory,
            found: FileKind::of(meta.file_type()),
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let euid = rustix::process::geteuid().as_raw();
        if let Some(reason) = insecurity(meta.mode(), meta.uid(), euid) {
            return Err(JournalError::InsecureDirectory {
                path: dir.to_path_buf(),
                reason,
            });
        }
    }
    Ok(())
}

/// What makes a directory of this `mode` and `owner` unsafe to write for the user `euid`, if
/// anything.
#[cfg_attr(not(unix), allow(dead_code))]
pub(super) fn insecurity(mode: u32, owner: u32, euid: u32) -> Option<String> {
    if owner != euid {
        return Some(format!(
            "is owned by uid {owner}, not by the user running the pool (uid {euid})"
        ));
    }
    let writable = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (_, true) => "everyone",
        (true, false) => "its group",
        (false, false) => return None,
    };
    Some(format!(
        "is writable by {writable} (mode {:o})",
        mode & 0o7777
    ))
}

/// The directory's lock: its open `LOCK` file, locked. Dropping it unlocks the file before
/// closing it: a process forked meanwhile by any thread (a `Command::spawn` anywhere in the
/// service) holds a copy of the descriptor until it execs, and a close alone would leave the
/// lock held through that copy for that moment, so that a pool started again at once on the
/// directory would find it locked. The unlock releases it for every copy.
#[derive(Debug)]
pub(super) struct DirLock(File);

impl std::ops::Deref for DirLock {
    type Target = File;

    fn deref(&self) -> &File {
        &self.0
    }
}

impl std::ops::DerefMut for DirLock {
    fn deref_mut(&mut self) -> &mut File {
        &mut self.0
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// Takes the directory's lock, with the `LOCK` file's path, or `None` if another process
/// holds it.
pub(super) fn lock_dir(dir: &Path) -> Result<Option<(DirLock, PathBuf)>, JournalError> {
    let lock_path = dir.join(LOCK_FILE);
    check_kind(&lock_path, FileKind::File)?;
    let lock = fs::open_or_create(&lock_path)
        .map_err(|e| JournalError::io("open", &lock_path, None, e))?;
    match lock.try_lock() {
        Ok(()) => Ok(Some((DirLock(lock), lock_path))),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(JournalError::io("lock", &lock_path, None, e)),
    }
}

/// The lock file's content: the last run number, and its CRC-32C.
pub(super) fn read_run(lock: &mut File, path: &Path) -> Result<Option<u64>, JournalError> {
    let mut buf = [0u8; 16];
    let mut read = 0;
    lock.seek(SeekFrom::Start(0))
        .map_err(|e| JournalError::io("read", path, None, e))?;
    while read < buf.len() {
        match lock.read(&mut buf[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(JournalError::io("read", path, None, e)),
        }
    }
    if read == 0 {
        return Ok(None);
    }
    let run = parse_run(&buf[..read]);
    if run.is_none() {
        tracing::warn!(path = %path.display(), "run counter damaged; deriving it from the segments");
    }
    Ok(run)
}

/// The run number in the lock file's content `buf` (its first 16 bytes count; more are
/// ignored), or `None` if it is cut short or fails its CRC.
pub(super) fn parse_run(buf: &[u8]) -> Option<u64> {
    let buf = buf.get(..16)?;
    let mut run = [0u8; 8];
    run.copy_from_slice(&buf[0..8]);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&buf[8..12]);
    (crc32c::crc32c(&run) == u32::from_le_bytes(crc)).then(|| u64::from_le_bytes(run))
}

/// Stores `run` in the lock file at `path` and makes it durable, file and directory, through
/// `ops`.
pub(super) fn write_run(
    ops: &dyn FileOps,
    lock: &mut File,
    path: &Path,
    run: u64,
) -> Result<(), JournalError> {
    let mut buf = [0u8; 16];
    buf[0..8].copy_from_slice(&run.to_le_bytes());
    buf[8..12].copy_from_slice(&crc32c::crc32c(&run.to_le_bytes()).to_le_bytes());
    ops.write_run(path, lock, &buf)
        .map_err(|e| JournalError::io("write", path, Some(0), e))
}

/// The run counter in `LOCK`, read without taking the lock.
pub(super) fn stored_run(dir: &Path) -> Result<Option<u64>, JournalError> {
    let path = dir.join(LOCK_FILE);
    check_kind(&path, FileKind::File)?;
    match fs::open_regular(&path, false) {
        Ok(mut file) => read_run(&mut file, &path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(JournalError::io("open", &path, None, e)),
    }
}

/// A writer epoch: random per start, so bytes from an earlier writer never validate.
pub(super) fn random_epoch(run: u64) -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(run);
    hasher.write_u32(std::process::id());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    hasher.write_u128(now);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy of the lock's descriptor held elsewhere (what a process forked at that moment
    /// holds until it execs) does not keep the directory locked once the lock is dropped.
    #[test]
    fn a_dropped_lock_is_released_even_while_a_copy_of_its_descriptor_lives() {
        let tmp = tempfile::tempdir().unwrap();
        let (lock, _) = lock_dir(tmp.path()).unwrap().expect("free");
        let copy = lock.try_clone().unwrap();
        assert!(lock_dir(tmp.path()).unwrap().is_none(), "held");
        drop(lock);
        assert!(
            lock_dir(tmp.path()).unwrap().is_some(),
            "released although a copy of the descriptor is still open"
        );
        drop(copy);
    }

    #[test]
    fn the_run_counter_parses_only_whole_and_checksummed() {
        let mut lock = [0u8; 16];
        lock[0..8].copy_from_slice(&41u64.to_le_bytes());
        lock[8..12].copy_from_slice(&crc32c::crc32c(&41u64.to_le_bytes()).to_le_bytes());
        assert_eq!(parse_run(&lock), Some(41));
        // Bytes after the first 16 are ignored, as `read_run` never reads them.
        assert_eq!(parse_run(&[&lock[..], b"tail"].concat()), Some(41));
        assert_eq!(parse_run(&lock[..15]), None, "cut short");
        assert_eq!(parse_run(&[]), None, "empty");
        let mut flipped = lock;
        flipped[3] ^= 0x10;
        assert_eq!(parse_run(&flipped), None, "CRC mismatch");
    }

    #[test]
    fn segment_names_round_trip_and_are_parsed_strictly() {
        for (number, dead) in [(7, false), (12, true), (u64::MAX, true), (0, false)] {
            assert_eq!(
                parse_segment_name(&segment_name(number, dead)),
                Some((number, dead))
            );
        }
        assert_eq!(segment_name(7, false), "00000000000000000007.seg");
        assert_eq!(segment_name(12, true), "dead-00000000000000000012.seg");
        for name in [
            "7.seg",
            "0000000000000000000x.seg",
            "00000000000000000007.tmp",
            "LOCK",
            "damaged",
        ] {
            assert_eq!(parse_segment_name(name), None, "{name}");
        }
    }
}
