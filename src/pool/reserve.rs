//! The pool's side of the spill reserve (on-shutdown mode): the encoded bytes of the tasks it
//! holds in memory, and the reserve file grown to cover them.
//!
//! Each task accepted in this run adds its record's size when it is accepted, and gives it back
//! when it leaves memory for good (completed, dead-lettered, dropped). When the total would
//! pass what the reserve holds, the reserve grows, in steps of a quarter more than needed
//! (at least [`STEP`]), so a steady pool grows it rarely and a busy one in few steps. When it
//! cannot grow (the disk is full), `submit` refuses the task, handing it back, and the pool
//! reports the journal as not ready until a later growth succeeds. Tasks replayed from the
//! journal need no reserve: the segments they came from stay until the spill that replaces them
//! is durable. At shutdown the reserve file is removed just before the first spill that journals
//! a task, which writes into the space it freed; a shutdown that journals nothing leaves the
//! file to the next start (see `journal/reserve.rs`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::lock::lock;
use crate::error::JournalError;
use crate::journal::Reserve;

/// The reserve's first size, and the least it grows by.
pub(crate) const STEP: u64 = 1 << 20;

pub(crate) struct SpillReserve {
    /// `None` once released for the spill.
    file: Mutex<Option<Reserve>>,
    /// Bytes allocated to the file (a copy, read without the lock).
    reserved: AtomicU64,
    /// Encoded bytes of the tasks accepted in this run and still in memory.
    held: AtomicU64,
    /// Set while the reserve could not grow to cover `held`.
    short: AtomicBool,
    /// Why it last could not grow.
    last_error: Mutex<Option<Arc<JournalError>>>,
}

impl SpillReserve {
    pub(crate) fn new(file: Reserve) -> Self {
        Self {
            reserved: AtomicU64::new(file.len()),
            file: Mutex::new(Some(file)),
            held: AtomicU64::new(0),
            short: AtomicBool::new(false),
            last_error: Mutex::new(None),
        }
    }

    /// Covers `bytes` more, growing the reserve if needed. On failure nothing is added.
    pub(crate) fn admit(&self, bytes: u64) -> Result<(), Arc<JournalError>> {
        let held = self.held.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if held <= self.reserved.load(Ordering::Acquire) {
            return Ok(());
        }
        self.grow(held).inspect_err(|_| {
            self.held.fetch_sub(bytes, Ordering::AcqRel);
        })
    }

    /// Covers `bytes` more if the reserve can grow to it; the bytes count either way (a task
    /// already accepted, whose record grew: a retry's error text).
    pub(crate) fn add(&self, bytes: u64) {
        let held = self.held.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if held > self.reserved.load(Ordering::Acquire) {
            let _ = self.grow(held);
        }
    }

    /// A task left memory for good: its bytes need no reserve any more.
    pub(crate) fn forget(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Whether the reserve covers what the pool holds.
    pub(crate) fn is_short(&self) -> bool {
        self.short.load(Ordering::Acquire)
    }

    /// Why the reserve does not cover what the pool holds, if it does not.
    pub(crate) fn shortage(&self) -> Option<Arc<JournalError>> {
        if !self.is_short() {
            return None;
        }
        lock(&self.last_error).clone()
    }

    /// The bytes allocated.
    pub(crate) fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }

    fn grow(&self, held: u64) -> Result<(), Arc<JournalError>> {
        let mut file = lock(&self.file);
        let Some(reserve) = file.as_mut() else {
            // Released for the spill: intake has closed.
            return Ok(());
        };
        if held <= reserve.len() {
            return Ok(());
        }
        let target = (held + held / 4)
            .max(reserve.len() + STEP)
            .next_multiple_of(STEP);
        match reserve.grow_to(target) {
            Ok(()) => {
                self.reserved.store(reserve.len(), Ordering::Release);
                if self.short.swap(false, Ordering::AcqRel) {
                    tracing::info!(
                        reserved = reserve.len(),
                        "spill reserve grown again; journal ready"
                    );
                }
                Ok(())
            }
            Err(error) => {
                let error = Arc::new(error);
                *lock(&self.last_error) = Some(Arc::clone(&error));
                if !self.short.swap(true, Ordering::AcqRel) {
                    tracing::error!(
                        error = &*error as &dyn std::error::Error,
                        held,
                        "spill reserve cannot grow: new tasks are refused"
                    );
                }
                Err(error)
            }
        }
    }

    /// Lets go of the reserve file without removing it (the shutdown journaled nothing); the
    /// next start replaces it. Nothing is set aside from now on. Idempotent, and nothing once
    /// released.
    pub(crate) fn leave(&self) {
        drop(lock(&self.file).take());
        self.reserved.store(0, Ordering::Release);
    }

    /// Removes the reserve file, freeing its space for the spill. Idempotent.
    pub(crate) fn release(&self) {
        let file = lock(&self.file).take();
        // Nothing is set aside from now on (`Stats::spill_reserve`, the gauge).
        self.reserved.store(0, Ordering::Release);
        if let Some(reserve) = file
            && let Err(error) = reserve.release()
        {
            tracing::error!(
                error = &error as &dyn std::error::Error,
                "could not remove the spill reserve; the spill may find no room"
            );
        }
    }
}
