//! Appends records to one segment file.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::format::{self, Header};
use super::fs::Ops;
use crate::error::JournalError;

/// An open segment this run appends to.
#[derive(Debug)]
pub(crate) struct SegmentWriter {
    ops: Ops,
    file: File,
    path: PathBuf,
    number: u64,
    /// Bytes known written (header and whole records).
    len: u64,
    /// Whether the directory entry has been fsynced since the file was created.
    dir_synced: bool,
    /// Task or dead-letter records written (acks not counted).
    tasks: usize,
    /// Set when a failed write could not be cut back cleanly: nothing more may be appended.
    broken: bool,
}

impl SegmentWriter {
    /// Creates `path` (it must not exist) and writes its header; if the header cannot be
    /// written, the file is removed again (best effort).
    pub(crate) fn create(ops: Ops, path: PathBuf, header: Header) -> Result<Self, JournalError> {
        let mut file = ops
            .create(&path)
            .map_err(|e| JournalError::io("create", &path, None, e))?;
        let bytes = format::encode_header(header);
        if let Err(e) = ops.write(&path, &mut file, &bytes) {
            // A file without a whole header holds nothing: left behind (a full disk), it would
            // only be one more empty segment per attempt.
            drop(file);
            if let Err(error) = ops.remove(&path) {
                tracing::warn!(path = %path.display(), %error, "could not remove a segment whose header failed");
            }
            return Err(JournalError::io("write", &path, Some(0), e));
        }
        Ok(Self {
            ops,
            file,
            path,
            number: header.segment,
            len: bytes.len() as u64,
            dir_synced: false,
            tasks: 0,
            broken: false,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The segment's number.
    pub(crate) fn number(&self) -> u64 {
        self.number
    }

    /// Bytes written so far, header included.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Task or dead-letter records written to this segment.
    pub(crate) fn tasks(&self) -> usize {
        self.tasks
    }

    /// Appends whole encoded records holding `tasks` task records.
    ///
    /// On a failed or short write the file is cut back to the last whole record, so what is on
    /// disk stays a valid prefix. Callers that cannot tell a full disk from a failing one treat
    /// the writer as poisoned then. After a failed write that was cut back cleanly (the file truncated to its last whole
    /// record, and the write position moved back there), more may be appended, the way a spill
    /// on a full disk writes what still fits; if the cut failed, every later append fails.
    pub(crate) fn append(&mut self, bytes: &[u8], tasks: usize) -> Result<(), JournalError> {
        if self.broken {
            return Err(JournalError::Poisoned);
        }
        if let Err(e) = self.ops.write(&self.path, &mut self.file, bytes) {
            // Best effort: a torn tail is also handled on recovery.
            let cut = self.ops.truncate(&self.path, &self.file, self.len).is_ok()
                && std::io::Seek::seek(&mut self.file, std::io::SeekFrom::Start(self.len)).is_ok();
            self.broken = !cut;
            return Err(JournalError::io("write", &self.path, Some(self.len), e));
        }
        self.len += bytes.len() as u64;
        self.tasks += tasks;
        Ok(())
    }

    /// Best effort, cuts the file back to `len` bytes (a record boundary): used when the records
    /// after it failed to become durable and their tasks were handed back. The caller must treat
    /// the writer as poisoned.
    pub(crate) fn cut_back(&mut self, len: u64) {
        if len < self.len && self.ops.truncate(&self.path, &self.file, len).is_ok() {
            self.len = len;
        }
    }

    /// Makes everything appended so far durable: the file's data, and its directory entry the
    /// first time.
    pub(crate) fn sync(&mut self) -> Result<(), JournalError> {
        self.ops
            .sync(&self.path, &self.file)
            .map_err(|e| JournalError::io("fsync", &self.path, None, e))?;
        if !self.dir_synced {
            if let Some(dir) = self.path.parent() {
                self.ops
                    .sync_dir(dir)
                    .map_err(|e| JournalError::io("fsync", dir, None, e))?;
            }
            self.dir_synced = true;
        }
        Ok(())
    }
}
