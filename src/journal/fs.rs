//! The few file-system calls the journal needs, with their permissions.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;

/// Creates a file that must not exist yet, readable and writable by the owner only.
pub(crate) fn create_new(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Opens a file for reading and writing, creating it owner-only if needed.
pub(crate) fn open_or_create(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
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
