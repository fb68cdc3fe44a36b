//! The few file-system calls the journal needs, with their permissions.
//!
//! No open follows a symbolic link (`O_NOFOLLOW`) or waits on a named pipe or a device
//! (`O_NONBLOCK`, then a check that what was opened is a regular file), so an entry planted in
//! the journal directory can neither redirect a write nor hang a start. The journal directory
//! itself is the operator's path and may be reached through a link; the checks of what is in
//! it, and of who may write it, are in `dir.rs`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// Adds the flags every open of a journal file carries: follow no symbolic link, wait on no
/// named pipe or device.
fn no_follow(options: &mut OpenOptions) -> &mut OpenOptions {
    #[cfg(unix)]
    {
        use rustix::fs::OFlags;
        let flags = (OFlags::NOFOLLOW | OFlags::NONBLOCK).bits();
        std::os::unix::fs::OpenOptionsExt::custom_flags(options, flags as i32);
    }
    options
}

/// `file`, if it is a regular file; an error naming what it is otherwise (an entry swapped
/// for a special file between a directory listing and the open).
fn regular(file: File) -> io::Result<File> {
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        Ok(file)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "not a regular file but a {}",
                crate::error::FileKind::of(kind)
            ),
        ))
    }
}

/// Creates a file that must not exist yet, readable and writable by the owner only.
pub(crate) fn create_new(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    no_follow(&mut options).open(path)
}

/// Opens a regular file for reading and writing, creating it owner-only if needed.
pub(crate) fn open_or_create(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    regular(no_follow(&mut options).open(path)?)
}

/// Opens an existing regular file, to read it or (`write`) to write it.
pub(crate) fn open_regular(path: &Path, write: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(!write).write(write);
    regular(no_follow(&mut options).open(path)?)
}

/// Reads a whole regular file.
pub(crate) fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = open_regular(path, false)?;
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut file, &mut bytes)?;
    Ok(bytes)
}

/// Creates a directory and its parents; a directory this creates is owner-only.
pub(crate) fn create_dir(path: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path)
}

/// Makes a directory's entries (new files, renames, removals) durable.
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(path)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        // Directories cannot be opened as files elsewhere; their entries are made durable by
        // the file system's own journal.
        let _ = path;
        Ok(())
    }
}

/// The journal's write-side file operations, in one place: the seam where tests inject
/// failures (EIO, ENOSPC, short writes) and simulate a power cut. Every method defaults to
/// the real operation; [`Os`] is the implementation the pool uses.
///
/// Segments are written with the first six; recovery's own writes (the journal directory, the
/// run counter, a torn tail's truncation, the copy of a damaged segment) and the write-speed
/// probe have a method each, so that a test can fail them without shifting the calls counted
/// for the segments.
pub(crate) trait FileOps: std::fmt::Debug + Send + Sync {
    /// Creates a segment file that must not exist yet.
    fn create(&self, path: &Path) -> io::Result<File> {
        create_new(path)
    }

    /// Writes all of `buf` at the end of `file`.
    fn write(&self, path: &Path, file: &mut File, buf: &[u8]) -> io::Result<()> {
        let _ = path;
        io::Write::write_all(file, buf)
    }

    /// Writes `len` zeros into `file` at `offset`, not moving its write position: room made
    /// ahead of a write-ahead segment's records. Elsewhere than on Unix, makes none (an error
    /// says so).
    fn fill(&self, path: &Path, file: &File, offset: u64, len: u64) -> io::Result<()> {
        let _ = path;
        fill(file, offset, len)
    }

    /// Makes `file`'s data durable.
    fn sync(&self, path: &Path, file: &File) -> io::Result<()> {
        let _ = path;
        file.sync_data()
    }

    /// Cuts `file` back to `len` bytes.
    fn truncate(&self, path: &Path, file: &File, len: u64) -> io::Result<()> {
        let _ = path;
        file.set_len(len)
    }

    /// Makes `dir`'s entries durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        sync_dir(dir)
    }

    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    /// Creates a directory and its parents (owner-only), as [`create_dir`] does.
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        create_dir(path)
    }

    /// Overwrites the start of the lock file with the run counter's bytes and makes them
    /// durable, file and directory entry.
    fn write_run(&self, path: &Path, file: &mut File, buf: &[u8]) -> io::Result<()> {
        file.seek(SeekFrom::Start(0))?;
        file.write_all(buf)?;
        file.sync_data()?;
        match path.parent() {
            Some(dir) => sync_dir(dir),
            None => Ok(()),
        }
    }

    /// Cuts a torn tail off the segment at `path`: truncates it to `len` bytes and fsyncs it.
    fn truncate_tail(&self, path: &Path, len: u64) -> io::Result<()> {
        let file = open_regular(path, true)?;
        file.set_len(len)?;
        file.sync_data()
    }

    /// Copies `from` into `to`, a file that must not exist yet (owner-only), and makes the
    /// copy durable, file and directory entry.
    fn keep_copy(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut copy = create_new(to)?;
        let mut source = open_regular(from, false)?;
        io::copy(&mut source, &mut copy)?;
        copy.sync_all()?;
        match to.parent() {
            Some(dir) => sync_dir(dir),
            None => Ok(()),
        }
    }

    /// Creates the spill reserve's file, which must not exist yet (owner-only).
    fn create_reserve(&self, path: &Path) -> io::Result<File> {
        create_new(path)
    }

    /// Removes the spill reserve's file, freeing its space.
    fn remove_reserve(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    /// Makes `file` (the spill reserve) hold `len` bytes of allocated disk space: `fallocate`
    /// on Linux, which takes the blocks without writing them; elsewhere, zeros written from its
    /// current end. Fails with the file system's error (ENOSPC) when there is no room.
    fn allocate(&self, path: &Path, file: &mut File, len: u64) -> io::Result<()> {
        let _ = path;
        allocate(file, len)
    }

    /// Writes `buf` to a new file at `path` (removing any left by an earlier probe), fsyncs
    /// it and removes it again. Returns how long the write and the fsync took.
    fn probe(&self, path: &Path, buf: &[u8]) -> io::Result<(Duration, Duration)> {
        let _ = fs::remove_file(path);
        let result = (|| {
            let mut file = create_new(path)?;
            let started = Instant::now();
            file.write_all(buf)?;
            let synced = Instant::now();
            file.sync_data()?;
            Ok((synced - started, synced.elapsed()))
        })();
        let _ = fs::remove_file(path);
        result
    }
}

/// Writes `len` zeros at `offset` (see [`FileOps::fill`]).
#[cfg(unix)]
fn fill(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; len.min(CHUNK) as usize];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(CHUNK) as usize;
        file.write_all_at(&zeros[..n], offset + at)?;
        at += n as u64;
    }
    Ok(())
}

/// Makes no room (see [`FileOps::fill`]).
#[cfg(not(unix))]
fn fill(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let _ = (file, offset, len);
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "room ahead is made on Unix only",
    ))
}

/// Allocates disk space for `file` up to `len` bytes (see [`FileOps::allocate`]).
#[cfg(target_os = "linux")]
fn allocate(file: &mut File, len: u64) -> io::Result<()> {
    let current = file.metadata()?.len();
    if len <= current {
        return Ok(());
    }
    rustix::fs::fallocate(
        &*file,
        rustix::fs::FallocateFlags::empty(),
        current,
        len - current,
    )
    .map_err(io::Error::from)
}

/// Allocates disk space for `file` up to `len` bytes (see [`FileOps::allocate`]).
#[cfg(not(target_os = "linux"))]
fn allocate(file: &mut File, len: u64) -> io::Result<()> {
    let current = file.metadata()?.len();
    if len <= current {
        return Ok(());
    }
    file.seek(SeekFrom::Start(current))?;
    let zeros = vec![0u8; 1 << 16];
    let mut left = len - current;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// The real file operations.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Os;

impl FileOps for Os {}

/// The file operations a journal uses, shared with its segment writers.
pub(crate) type Ops = std::sync::Arc<dyn FileOps>;

/// The real file operations, as [`Ops`].
pub(crate) fn os() -> Ops {
    std::sync::Arc::new(Os)
}
