//! The spill reserve: disk space set aside in the journal directory, so that the spill at
//! shutdown finds room for every task the pool holds in memory even when the file system has
//! filled up meanwhile.
//!
//! It is one file, `reserve`, whose blocks are allocated (`fallocate` on Linux) but never
//! written. The pool grows it as it accepts tasks; the shutdown removes it just before the
//! first spill that journals a task, which then writes into the space it freed. A shutdown
//! that journals nothing leaves it (removing it costs about 0.5 ms where freed blocks are
//! discarded); so does a killed run. The next start replaces it, or removes it if it makes no
//! reserve. Recovery and inspection ignore it: it is not a segment.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::fs::Ops;
use crate::error::JournalError;

/// The reserve's file name in the journal directory.
pub(crate) const RESERVE_FILE: &str = "reserve";

/// The reserve file, and the bytes allocated to it.
#[derive(Debug)]
pub(crate) struct Reserve {
    ops: Ops,
    path: PathBuf,
    file: File,
    len: u64,
}

impl Reserve {
    /// Creates the reserve in `dir` (removing one an earlier run left; a symlink there is
    /// removed, not followed) and allocates `len` bytes to it.
    pub(crate) fn create(dir: &Path, ops: Ops, len: u64) -> Result<Self, JournalError> {
        Self::remove_left(dir, &ops)?;
        let path = dir.join(RESERVE_FILE);
        let file = ops
            .create_reserve(&path)
            .map_err(|e| JournalError::io("create", &path, None, e))?;
        let mut reserve = Self {
            ops,
            path,
            file,
            len: 0,
        };
        if let Err(error) = reserve.grow_to(len) {
            // Best effort: an empty reserve file would only confuse a reader.
            let _ = reserve.ops.remove_reserve(&reserve.path);
            return Err(error);
        }
        Ok(reserve)
    }

    /// Removes a reserve file an earlier run left in `dir` (a start that makes none: the
    /// write-ahead mode, or the reserve turned off). Nothing if there is none.
    pub(crate) fn remove_left(dir: &Path, ops: &Ops) -> Result<(), JournalError> {
        let path = dir.join(RESERVE_FILE);
        match ops.remove_reserve(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(JournalError::io("remove", &path, None, e)),
        }
    }

    /// The bytes allocated.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Allocates up to `len` bytes; nothing if it holds that much already.
    pub(crate) fn grow_to(&mut self, len: u64) -> Result<(), JournalError> {
        if len <= self.len {
            return Ok(());
        }
        self.ops
            .allocate(&self.path, &mut self.file, len)
            .map_err(|e| JournalError::io("allocate", &self.path, Some(self.len), e))?;
        self.len = len;
        Ok(())
    }

    /// Removes the file, so the spill can use its space.
    pub(crate) fn release(self) -> Result<(), JournalError> {
        drop(self.file);
        match self.ops.remove_reserve(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(JournalError::io("remove", &self.path, None, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_takes_real_blocks_and_gives_them_back() {
        let dir = tempfile::tempdir().unwrap();
        // A file an earlier run left is replaced.
        std::fs::write(dir.path().join(RESERVE_FILE), b"left over").unwrap();
        let mut reserve = Reserve::create(dir.path(), super::super::fs::os(), 1 << 20).unwrap();
        let path = dir.path().join(RESERVE_FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        reserve.grow_to(1 << 19).unwrap();
        assert_eq!(reserve.len(), 1 << 20, "it never shrinks by growing");
        reserve.grow_to(3 << 20).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 << 20);
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            // Allocated, not sparse: the blocks are taken.
            assert!(std::fs::metadata(&path).unwrap().blocks() * 512 >= 3 << 20);
        }
        reserve.release().unwrap();
        assert!(!path.exists());
    }
}
