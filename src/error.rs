//! The errors of each operation.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::task::TaskId;

/// An error and its sources, joined with ": ".
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The error type a handler may return, and the one a [`Codec`](crate::Codec) reports:
/// anything that converts into a boxed error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A journal operation failed.
///
/// I/O failures carry the file and, where it matters, the offset. A failed write or fsync
/// poisons the journal handle: drainpool never retries an fsync as if the data were safe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// Reading, writing, syncing, renaming or removing a journal file failed.
    ///
    /// The message names the operation, the file and the offset; the operating system's error
    /// is the [`source`](std::error::Error::source) (print the chain to show it).
    #[error("{op} {path}{at}", path = path.display(), at = OffsetSuffix(*offset))]
    Io {
        /// What was being done: "write", "fsync", "create", …
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The byte offset in the file, where one applies.
        offset: Option<u64>,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A segment was written by a newer drainpool whose format this build does not read.
    ///
    /// The file is left untouched; run the newer version, or move the file away.
    #[error(
        "segment {path} has format version {found}; this build reads version {supported}",
        path = path.display()
    )]
    UnsupportedVersion {
        /// The segment.
        path: PathBuf,
        /// The version found in its header.
        found: u16,
        /// The newest version this build reads.
        supported: u16,
    },
    /// A journal file or directory is not of the kind it must be: a symbolic link or a special
    /// file where `LOCK` or `damaged/` should be, a file where the journal directory should be.
    /// The journal follows no symbolic link inside its directory and opens no special file;
    /// nothing was written.
    #[error("{path} is a {found}, not a {expected}", path = path.display())]
    WrongKind {
        /// The entry.
        path: PathBuf,
        /// What it must be.
        expected: FileKind,
        /// What it is.
        found: FileKind,
    },
    /// The journal directory may be changed by another user: it is writable by its group or by
    /// everyone, or owned by a user other than the one running the pool. Such a user could put
    /// a symbolic link where the journal writes. Nothing was written; make the directory
    /// owner-only (`chmod 700`) and owned by the user running the pool, or let the pool create
    /// it.
    #[error("journal directory {path} {reason}; make it owner-only (chmod 700) and owned by the user running the pool", path = path.display())]
    InsecureDirectory {
        /// The journal directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An earlier write or fsync failed, so this journal handle no longer accepts writes.
    #[error("journal is poisoned by an earlier failure")]
    Poisoned,
}

struct OffsetSuffix(Option<u64>);

impl fmt::Display for OffsetSuffix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(offset) => write!(f, " at offset {offset}"),
            None => Ok(()),
        }
    }
}

impl JournalError {
    pub(crate) fn io(
        op: &'static str,
        path: &Path,
        offset: Option<u64>,
        source: io::Error,
    ) -> Self {
        Self::Io {
            op,
            path: path.to_path_buf(),
            offset,
            source,
        }
    }

    /// The file the error is about, if any.
    #[must_use]
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Io { path, .. }
            | Self::UnsupportedVersion { path, .. }
            | Self::WrongKind { path, .. }
            | Self::InsecureDirectory { path, .. } => Some(path),
            Self::Poisoned => None,
        }
    }

    /// The byte offset the error is about, if any.
    #[must_use]
    pub fn offset(&self) -> Option<u64> {
        match self {
            Self::Io { offset, .. } => *offset,
            _ => None,
        }
    }

    /// The underlying I/O error, if this is one.
    #[must_use]
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The pool could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Another pool, in this process or another, holds the journal directory.
    #[error("journal directory {dir} is locked by another pool", dir = dir.display())]
    JournalLocked {
        /// The journal directory.
        dir: PathBuf,
    },
    /// Opening the journal failed: creating or checking its directory, taking its lock,
    /// reading or repairing its segments, or storing the run counter. The cause is the
    /// [`source`](std::error::Error::source).
    #[error("could not open the journal")]
    Journal(#[from] JournalError),
    /// The journal directory's run counter is at its largest value, so this start has no new
    /// run number and its task ids would repeat earlier ones. Start with a new directory (after
    /// draining this one).
    #[error("journal directory {dir} has used up every run number; task ids would repeat", dir = dir.display())]
    RunsExhausted {
        /// The journal directory.
        dir: PathBuf,
    },
    /// The signal handlers asked for with
    /// [`Builder::catch_signals`](crate::Builder::catch_signals) could not be registered.
    #[error("could not register signal handlers")]
    Signals(#[source] io::Error),
    /// The PostgreSQL store could not be opened: connecting, checking or migrating the
    /// schema, taking a run number, or handing on the tasks the local journal held. Nothing
    /// was lost: those tasks stay in the journal directory.
    #[cfg(feature = "postgres")]
    #[error("could not open the PostgreSQL store")]
    Postgres(#[source] crate::PostgresError),
    /// A builder setting is out of range, or missing.
    #[error("invalid configuration: {setting}: {reason}")]
    InvalidConfig {
        /// The builder setting at fault, as its method is named (`"workers"`,
        /// `"journal_dir"`, `"deadline"`, …).
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// A submission was refused. Every variant hands the task back.
#[non_exhaustive]
pub enum SubmitError<T> {
    /// The queue is full (only from [`try_submit`](crate::Pool::try_submit)).
    Full(T),
    /// The pool has begun shutting down and takes no new work.
    ShuttingDown(T),
    /// Accepting the task would mean waiting (only from `try_submit` in write-ahead mode, where
    /// a task is journaled before it is accepted).
    WouldBlock(T),
    /// The task's record would be larger than the pool's maximum record size.
    RecordTooLarge {
        /// The task.
        task: T,
        /// The limit, in bytes.
        limit: usize,
    },
    /// The write-ahead journal failed, so the task could not be made durable. The journal
    /// takes no more writes (a failed fsync is never retried as if the data were safe); the
    /// tasks it already holds stay in memory and are spilled to a fresh file at shutdown.
    Journal {
        /// The task.
        task: T,
        /// What failed.
        error: std::sync::Arc<JournalError>,
    },
    /// The journal's disk has no room for this task should it need to be spilled: the spill
    /// reserve could not grow to cover it (on-shutdown mode). Like `Full`, a refusal to retry
    /// later or to answer with 503; the tasks already accepted are covered. See
    /// [`Builder::spill_reserve`](crate::Builder::spill_reserve).
    JournalFull {
        /// The task.
        task: T,
        /// Why the reserve could not grow (ENOSPC, a quota).
        error: std::sync::Arc<JournalError>,
    },
    /// Write-ahead with the PostgreSQL store: the task could not be committed to the table
    /// within the store's [`timeout`](crate::PostgresStore::timeout) (the server unreachable,
    /// or failing), so it was not accepted. Unlike the file journal's failure this is not
    /// final: the next submit tries the server again. [`Pool::health`](crate::Pool::health)
    /// says why meanwhile.
    ///
    /// A commit whose answer was lost may still have gone through; its row is deleted again
    /// once the server answers.
    #[cfg(feature = "postgres")]
    Postgres {
        /// The task.
        task: T,
        /// What failed: a [`PostgresError`](crate::PostgresError)
        /// (`error.downcast_ref::<drainpool::PostgresError>()`).
        error: std::sync::Arc<dyn std::error::Error + Send + Sync>,
    },
    /// A task with the same unique key ([`TaskBuilder::unique_key`](crate::TaskBuilder::unique_key))
    /// is still queued, waiting or running in this pool (whether it was submitted in this run
    /// or replayed from the journal).
    Duplicate {
        /// The task.
        task: T,
        /// The id of the task that holds the key.
        first: TaskId,
    },
    /// The payload failed to encode (with the pool's [`Codec`](crate::Codec)), so it could
    /// never be journaled.
    Unserializable {
        /// The task.
        task: T,
        /// What the codec said.
        source: BoxError,
    },
}

impl<T> SubmitError<T> {
    /// Gives back the refused task.
    #[must_use]
    pub fn into_inner(self) -> T {
        match self {
            Self::Full(task)
            | Self::ShuttingDown(task)
            | Self::WouldBlock(task)
            | Self::RecordTooLarge { task, .. }
            | Self::Journal { task, .. }
            | Self::JournalFull { task, .. }
            | Self::Duplicate { task, .. }
            | Self::Unserializable { task, .. } => task,
            #[cfg(feature = "postgres")]
            Self::Postgres { task, .. } => task,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Full(_) => "Full",
            Self::ShuttingDown(_) => "ShuttingDown",
            Self::WouldBlock(_) => "WouldBlock",
            Self::RecordTooLarge { .. } => "RecordTooLarge",
            Self::Journal { .. } => "Journal",
            Self::JournalFull { .. } => "JournalFull",
            Self::Duplicate { .. } => "Duplicate",
            Self::Unserializable { .. } => "Unserializable",
            #[cfg(feature = "postgres")]
            Self::Postgres { .. } => "Postgres",
        }
    }
}

impl<T> fmt::Debug for SubmitError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RecordTooLarge { limit, .. } => f
                .debug_struct("RecordTooLarge")
                .field("limit", limit)
                .finish_non_exhaustive(),
            Self::Journal { error, .. } => f
                .debug_struct("Journal")
                .field("error", error)
                .finish_non_exhaustive(),
            Self::JournalFull { error, .. } => f
                .debug_struct("JournalFull")
                .field("error", error)
                .finish_non_exhaustive(),
            Self::Duplicate { first, .. } => f
                .debug_struct("Duplicate")
                .field("first", first)
                .finish_non_exhaustive(),
            Self::Unserializable { source, .. } => f
                .debug_struct("Unserializable")
                .field("source", source)
                .finish_non_exhaustive(),
            #[cfg(feature = "postgres")]
            Self::Postgres { error, .. } => f
                .debug_struct("Postgres")
                .field("error", error)
                .finish_non_exhaustive(),
            _ => f.debug_tuple(self.name()).finish_non_exhaustive(),
        }
    }
}

impl<T> fmt::Display for SubmitError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full(_) => f.write_str("queue is full"),
            Self::ShuttingDown(_) => f.write_str("pool is shutting down"),
            Self::WouldBlock(_) => f.write_str("accepting the task would wait for the journal"),
            Self::RecordTooLarge { limit, .. } => {
                write!(f, "task record is larger than the {limit}-byte limit")
            }
            Self::Journal { .. } => f.write_str("the write-ahead journal failed"),
            Self::JournalFull { .. } => {
                f.write_str("the journal has no room to spill the task at shutdown")
            }
            Self::Duplicate { first, .. } => {
                write!(f, "task {first} holds the same unique key")
            }
            Self::Unserializable { .. } => f.write_str("task payload does not serialize"),
            #[cfg(feature = "postgres")]
            Self::Postgres { .. } => f.write_str("the task could not be committed to PostgreSQL"),
        }
    }
}

impl<T> std::error::Error for SubmitError<T> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Unserializable { source, .. } => Some(&**source),
            Self::Journal { error, .. } | Self::JournalFull { error, .. } => Some(&**error),
            #[cfg(feature = "postgres")]
            Self::Postgres { error, .. } => Some(&**error),
            _ => None,
        }
    }
}

/// The shutdown sequence ended without a report: its task was torn down, which happens when the
/// runtime shuts down under it.
#[derive(Debug, thiserror::Error)]
#[error("the pool's shutdown sequence ended without a report")]
pub struct ShutdownError(pub(crate) ());

/// [`Pool::run_until_signal`](crate::Pool::run_until_signal) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The signal handlers could not be registered.
    #[error("could not register signal handlers")]
    Signals(#[source] io::Error),
    /// The shutdown sequence ended without a report.
    #[error(transparent)]
    Shutdown(#[from] ShutdownError),
}

/// What kind of file a directory entry is, as named in
/// [`Skipped`](crate::Skipped) and [`JournalError::WrongKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link (never followed by the journal).
    Symlink,
    /// A named pipe.
    Fifo,
    /// A Unix domain socket.
    Socket,
    /// A block device.
    BlockDevice,
    /// A character device.
    CharDevice,
    /// Anything else the platform has.
    Other,
}

impl FileKind {
    /// The kind of `file_type` (as `symlink_metadata` or a directory listing gives it: a
    /// symbolic link is a link, not what it points to).
    pub(crate) fn of(file_type: std::fs::FileType) -> Self {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            if file_type.is_fifo() {
                return Self::Fifo;
            }
            if file_type.is_socket() {
                return Self::Socket;
            }
            if file_type.is_block_device() {
                return Self::BlockDevice;
            }
            if file_type.is_char_device() {
                return Self::CharDevice;
            }
        }
        if file_type.is_symlink() {
            Self::Symlink
        } else if file_type.is_dir() {
            Self::Directory
        } else if file_type.is_file() {
            Self::File
        } else {
            Self::Other
        }
    }
}

impl std::fmt::Display for FileKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::File => "regular file",
            Self::Directory => "directory",
            Self::Symlink => "symbolic link",
            Self::Fifo => "named pipe",
            Self::Socket => "socket",
            Self::BlockDevice => "block device",
            Self::CharDevice => "character device",
            Self::Other => "special file",
        })
    }
}
