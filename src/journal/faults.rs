//! A faulty [`FileOps`] for tests: chosen calls fail with a chosen error, a write can stop
//! short, and a power cut drops everything that was not fsynced.
//!
//! It wraps the real operations (the files really exist), counts every call per operation, and
//! remembers, for each file it created or wrote, the length at its last successful `sync` and
//! whether its directory was fsynced since it was created. A removal is not undone by a power
//! cut.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use std::time::Duration;

use super::Journal;
use super::fs::{FileOps, Ops, Os};
use crate::error::JournalError;
use crate::report::RecoveryReport;

/// `EIO`: an I/O error, as a failed fsync reports it.
pub(crate) const EIO: i32 = 5;
/// `ENOSPC`: no space left on the device.
pub(crate) const ENOSPC: i32 = 28;

/// The operations a fault can be aimed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Op {
    Create,
    Write,
    Sync,
    Truncate,
    SyncDir,
    Remove,
    /// Recovery's: creating the journal directory or `damaged/`.
    CreateDir,
    /// Recovery's: storing the run counter (write and fsyncs in one).
    WriteRun,
    /// Recovery's: cutting a torn tail off.
    TruncateTail,
    /// Recovery's: copying a damaged segment to `damaged/`.
    KeepCopy,
    /// The write-speed probe.
    Probe,
    /// The spill reserve: creating, growing or removing its file.
    Allocate,
    /// Room made ahead of a write-ahead segment's records (zeros).
    Fill,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The call fails with this raw OS error.
    Error(i32),
    /// A write puts the first `keep` bytes in the file, then fails with `errno`.
    Short { keep: usize, errno: i32 },
}

impl Fault {
    fn error(self) -> io::Error {
        match self {
            Self::Error(errno) | Self::Short { errno, .. } => io::Error::from_raw_os_error(errno),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Rule {
    op: Op,
    /// The first call (1-based, counted per operation since the start) it applies to.
    from: u64,
    /// Whether it applies to every later call too, or to call `from` only.
    onwards: bool,
    fault: Fault,
}

#[derive(Debug, Clone, Copy, Default)]
struct Tracked {
    /// The write position (the records' end) at the last successful `sync` (`None`: never
    /// synced).
    synced_len: Option<u64>,
    /// Whether the directory was fsynced since the file was created.
    entry_synced: bool,
}

#[derive(Debug, Default)]
struct State {
    calls: HashMap<Op, u64>,
    /// Calls of every operation.
    total: u64,
    /// Every call after this many in all fails with EIO: the process died there.
    halt_after: Option<u64>,
    rules: Vec<Rule>,
    files: BTreeMap<PathBuf, Tracked>,
}

/// File operations that fail where a test says, and can lose unsynced data.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    state: Mutex<State>,
}

impl Faults {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// These faults as the journal's file operations.
    pub(crate) fn ops(self: &Arc<Self>) -> Ops {
        Arc::clone(self) as Ops
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many calls of `op` were made so far, failed ones included.
    pub(crate) fn calls(&self, op: Op) -> u64 {
        self.state().calls.get(&op).copied().unwrap_or(0)
    }

    fn add(&self, op: Op, from: u64, onwards: bool, fault: Fault) {
        self.state().rules.push(Rule {
            op,
            from,
            onwards,
            fault,
        });
    }

    /// The `nth` call of `op` (1-based, counted from the start) fails with `errno`.
    pub(crate) fn fail_nth(&self, op: Op, nth: u64, errno: i32) {
        self.add(op, nth, false, Fault::Error(errno));
    }

    /// Every call of `op` from the `nth` on fails with `errno`.
    pub(crate) fn fail_from(&self, op: Op, nth: u64, errno: i32) {
        self.add(op, nth, true, Fault::Error(errno));
    }

    /// The next call of `op` fails with `errno`.
    pub(crate) fn fail_next(&self, op: Op, errno: i32) {
        self.fail_nth(op, self.calls(op) + 1, errno);
    }

    /// Every call of `op` from the next one on fails with `errno`.
    pub(crate) fn fail_from_next(&self, op: Op, errno: i32) {
        self.fail_from(op, self.calls(op) + 1, errno);
    }

    /// The next write puts only the first `keep` bytes of its buffer in the file, then fails
    /// with `errno`.
    pub(crate) fn short_write_next(&self, keep: usize, errno: i32) {
        let nth = self.calls(Op::Write) + 1;
        self.add(Op::Write, nth, false, Fault::Short { keep, errno });
    }

    /// Calls of every operation so far.
    pub(crate) fn total_calls(&self) -> u64 {
        self.state().total
    }

    /// Every call after the first `calls` (of any operation) fails with EIO and changes
    /// nothing: the state on disk is the one a crash right after call `calls` leaves.
    pub(crate) fn halt_after(&self, calls: u64) {
        self.state().halt_after = Some(calls);
    }

    /// Drops every rule: from now on every call succeeds (the disk has room again).
    pub(crate) fn clear(&self) {
        self.state().rules.clear();
    }

    /// Counts a call of `op` and returns the fault aimed at it, if any.
    fn call(&self, op: Op) -> Option<Fault> {
        let mut state = self.state();
        state.total += 1;
        if state.halt_after.is_some_and(|halt| state.total > halt) {
            return Some(Fault::Error(EIO));
        }
        let count = state.calls.entry(op).or_insert(0);
        *count += 1;
        let n = *count;
        state
            .rules
            .iter()
            .find(|r| r.op == op && (n == r.from || (r.onwards && n > r.from)))
            .map(|r| r.fault)
    }

    /// Counts a call of `op`; fails it if a fault is aimed at it.
    fn check(&self, op: Op) -> io::Result<()> {
        self.call(op).map_or(Ok(()), |fault| Err(fault.error()))
    }

    /// A power cut: every file this created or wrote is cut back to its length at its last
    /// successful `sync` (to nothing if never synced), and one whose directory was not fsynced
    /// since it was created is removed. What remains counts as durable afterwards.
    pub(crate) fn power_cut(&self) -> io::Result<()> {
        self.cut(0, false, false)
    }

    /// A power cut that tore the unsynced writes instead of dropping them: every file this
    /// created or wrote keeps up to `keep` bytes past its last synced length, and every
    /// directory entry survives.
    pub(crate) fn torn_power_cut(&self, keep: u64) -> io::Result<()> {
        self.cut(keep, true, false)
    }

    /// A power cut after which the files' lengths reached the disk but their unsynced data did
    /// not (as some file systems leave them): as [`torn_power_cut`](Self::torn_power_cut),
    /// with the kept unsynced bytes zeroed.
    pub(crate) fn zeroed_power_cut(&self, keep: u64) -> io::Result<()> {
        self.cut(keep, true, true)
    }

    fn cut(&self, keep: u64, keep_entries: bool, zero: bool) -> io::Result<()> {
        let files = std::mem::take(&mut self.state().files);
        for (path, tracked) in files {
            let result = if !tracked.entry_synced && !keep_entries {
                std::fs::remove_file(&path)
            } else {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|file| {
                        let len = file.metadata()?.len();
                        let synced = tracked.synced_len.unwrap_or(0).min(len);
                        let kept = len.min(synced.saturating_add(keep));
                        if zero {
                            file.set_len(synced)?;
                        }
                        file.set_len(kept)
                    })
            };
            if let Err(e) = result
                && e.kind() != io::ErrorKind::NotFound
            {
                return Err(e);
            }
        }
        Ok(())
    }
}

impl FileOps for Faults {
    fn create(&self, path: &Path) -> io::Result<File> {
        self.check(Op::Create)?;
        let file = Os.create(path)?;
        self.state()
            .files
            .insert(path.to_path_buf(), Tracked::default());
        Ok(file)
    }

    fn write(&self, path: &Path, file: &mut File, buf: &[u8]) -> io::Result<()> {
        let fault = self.call(Op::Write);
        if !self.state().files.contains_key(path) {
            // A file this did not create: what it held before counts as durable.
            let tracked = Tracked {
                synced_len: Some(file.metadata()?.len()),
                entry_synced: true,
            };
            self.state().files.insert(path.to_path_buf(), tracked);
        }
        match fault {
            None => Os.write(path, file, buf),
            Some(Fault::Short { keep, errno }) => {
                Os.write(path, file, &buf[..keep.min(buf.len())])?;
                Err(io::Error::from_raw_os_error(errno))
            }
            Some(fault) => Err(fault.error()),
        }
    }

    fn sync(&self, path: &Path, file: &File) -> io::Result<()> {
        self.check(Op::Sync)?;
        // Durable: what was written up to the write position. Past it is room made ahead
        // (zeros), which a power cut may as well take: the records written over it later are
        // not durable until the next sync.
        let len = io::Seek::stream_position(&mut &*file)?;
        Os.sync(path, file)?;
        if let Some(tracked) = self.state().files.get_mut(path) {
            tracked.synced_len = Some(len);
        }
        Ok(())
    }

    fn fill(&self, path: &Path, file: &File, offset: u64, len: u64) -> io::Result<()> {
        self.check(Op::Fill)?;
        Os.fill(path, file, offset, len)
    }

    fn truncate(&self, path: &Path, file: &File, len: u64) -> io::Result<()> {
        self.check(Op::Truncate)?;
        Os.truncate(path, file, len)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.check(Op::SyncDir)?;
        Os.sync_dir(dir)?;
        for (path, tracked) in &mut self.state().files {
            if path.parent() == Some(dir) {
                tracked.entry_synced = true;
            }
        }
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.check(Op::Remove)?;
        Os.remove(path)?;
        self.state().files.remove(path);
        Ok(())
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.check(Op::CreateDir)?;
        Os.create_dir(path)
    }

    fn write_run(&self, path: &Path, file: &mut File, buf: &[u8]) -> io::Result<()> {
        self.check(Op::WriteRun)?;
        Os.write_run(path, file, buf)
    }

    fn truncate_tail(&self, path: &Path, len: u64) -> io::Result<()> {
        self.check(Op::TruncateTail)?;
        Os.truncate_tail(path, len)?;
        // Synced at that length.
        if let Some(tracked) = self.state().files.get_mut(path) {
            tracked.synced_len = Some(len);
        }
        Ok(())
    }

    fn keep_copy(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.check(Op::KeepCopy)?;
        Os.keep_copy(from, to)
    }

    fn create_reserve(&self, path: &Path) -> io::Result<File> {
        self.check(Op::Allocate)?;
        Os.create_reserve(path)
    }

    fn remove_reserve(&self, path: &Path) -> io::Result<()> {
        self.check(Op::Allocate)?;
        Os.remove_reserve(path)
    }

    fn allocate(&self, path: &Path, file: &mut File, len: u64) -> io::Result<()> {
        self.check(Op::Allocate)?;
        Os.allocate(path, file, len)
    }

    fn probe(&self, path: &Path, buf: &[u8]) -> io::Result<(Duration, Duration)> {
        self.check(Op::Probe)?;
        Os.probe(path, buf)
    }
}

/// Opens `dir` as a starting pool would (with the real file operations: torn tails are
/// truncated), and returns what recovery found and the live `u64` payloads in id order.
pub(crate) fn recover(dir: &Path) -> (RecoveryReport, Vec<u64>) {
    let opened = Journal::open(dir, super::fs::os(), |record| {
        // A u64 as the pool serializes it: its decimal digits.
        std::str::from_utf8(record.payload)
            .ok()
            .and_then(|digits| digits.parse::<u64>().ok())
            .expect("a u64 payload")
    });
    let (journal, report, live) = opened.expect("the journal opens");
    // Dropped, not closed: closing would retire the segments just read.
    drop(journal);
    (report, live.into_iter().map(|task| task.value).collect())
}

/// Asserts that the segment at `path` holds `records_end` bytes of header and records, and
/// past them only room made ahead (zeros), if any.
pub(crate) fn assert_records_end(path: &Path, records_end: u64) {
    let bytes = std::fs::read(path).expect("the segment reads");
    assert!(
        bytes.len() as u64 >= records_end,
        "{} bytes, records to {records_end}",
        bytes.len()
    );
    assert!(
        bytes[records_end as usize..].iter().all(|&b| b == 0),
        "something past the records at {records_end}"
    );
}

/// The one live segment file of `dir` (fails the test if there is not exactly one).
pub(crate) fn only_segment(dir: &Path) -> PathBuf {
    let [segment] = &segments(dir)[..] else {
        panic!("one segment expected")
    };
    segment.clone()
}

/// The live segment files of `dir`, in number order.
pub(crate) fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("the journal directory lists")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.ends_with(".seg") && !name.starts_with("dead-"))
        })
        .collect();
    found.sort();
    found
}

/// The raw OS error of a journal error, if it is an I/O error.
pub(crate) fn errno(error: &JournalError) -> Option<i32> {
    error.io_error().and_then(io::Error::raw_os_error)
}

mod tests;
