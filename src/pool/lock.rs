//! The one way the pool's parts take a standard mutex.

use std::sync::{Mutex, MutexGuard, PoisonError};

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while these locks are held; if something did, the data is still whole.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
