//! Appends records to one segment file.
//!
//! A write-ahead segment synced at every batch is written into room made ahead of it: zeros,
//! [`ROOM_AHEAD`] at a time, written once and made durable by the next batch's fsync. An
//! fsync of data written over blocks the file already has need not commit a new file size
//! to the file system's journal, and took about a third less time than an append's here
//! (ARCHITECTURE.md, the group commit). The reader takes zeros from a record boundary to the
//! end of a segment for what they are: room never written, not a torn record.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::format::{self, Header};
use super::fs::Ops;
use crate::error::JournalError;

/// How much room a write-ahead segment is given ahead of its records at a time.
pub(crate) const ROOM_AHEAD: u64 = 4 << 20;

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
    /// The file's size: `len`, and zeros written ahead of it (see `prepare_room`).
    size: u64,
    /// Set when making room failed (a full disk, say): the records are appended as they come.
    no_room: bool,
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
            size: bytes.len() as u64,
            no_room: false,
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
            if cut {
                self.size = self.len;
            }
            return Err(JournalError::io("write", &self.path, Some(self.len), e));
        }
        self.len += bytes.len() as u64;
        self.size = self.size.max(self.len);
        self.tasks += tasks;
        Ok(())
    }

    /// Makes sure `need` bytes past the records are room already written (zeros), writing up
    /// to [`ROOM_AHEAD`] more, but not past `limit` (the segment's size, once it is full). Best
    /// effort: if the zeros cannot be written, the file is cut back to its records and
    /// records are appended from then on.
    pub(crate) fn prepare_room(&mut self, need: u64, limit: u64) {
        if self.no_room || self.broken || self.len + need <= self.size {
            return;
        }
        let to = (self.len + need + ROOM_AHEAD).min(limit.max(self.len + need));
        if let Err(error) = self
            .ops
            .fill(&self.path, &self.file, self.size, to - self.size)
        {
            tracing::debug!(path = %self.path.display(), %error, "no room made ahead of the records");
            self.no_room = true;
            if self.ops.truncate(&self.path, &self.file, self.len).is_ok() {
                self.size = self.len;
            }
            return;
        }
        self.size = to;
    }

    /// Cuts the room left past the records off the file (a full segment, sealed). Best effort:
    /// the reader takes it for room if it stays.
    pub(crate) fn trim_room(&mut self) {
        if self.size > self.len && self.ops.truncate(&self.path, &self.file, self.len).is_ok() {
            self.size = self.len;
        }
    }

    /// Best effort, cuts the file back to `len` bytes (a record boundary): used when the records
    /// after it failed to become durable and their tasks were handed back. The caller must treat
    /// the writer as poisoned.
    pub(crate) fn cut_back(&mut self, len: u64) {
        if len < self.len && self.ops.truncate(&self.path, &self.file, len).is_ok() {
            self.len = len;
            self.size = len;
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
