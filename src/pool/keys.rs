//! Unique keys: while a task with a key is queued, waiting (for its time or its retry) or
//! running, a submit with the same key is refused with the first task's id
//! (`SubmitError::Duplicate`). A key is taken at submit, before the task is made durable or
//! queued, and let go when the task leaves the pool for good (completed, a dead letter,
//! dropped, expired, or handed to another pool). A task spilled at shutdown keeps it: the next
//! start takes the keys of the tasks it replays before any submit.
//!
//! Tasks without a key never touch the map (nor its lock).

use std::collections::HashMap;
use std::sync::Mutex;

use super::lock::lock;
use crate::task::TaskId;

/// The keys of the tasks this pool holds.
#[derive(Debug, Default)]
pub(crate) struct Keys {
    held: Mutex<HashMap<Box<str>, TaskId>>,
}

impl Keys {
    /// Takes `key` for `id`; the id of the task holding it if another does.
    pub(crate) fn take(&self, key: &str, id: TaskId) -> Result<(), TaskId> {
        let mut held = lock(&self.held);
        match held.get(key) {
            Some(&first) => Err(first),
            None => {
                held.insert(key.into(), id);
                Ok(())
            }
        }
    }

    /// Takes `key` for a task found in the journal or claimed from the shared store, whatever
    /// holds it now (two tasks with one key can only come from outside this pool: both run;
    /// the key stays with the first).
    pub(crate) fn adopt(&self, key: &str, id: TaskId) {
        lock(&self.held).entry(key.into()).or_insert(id);
    }

    /// Lets go of `key` if `id` holds it.
    pub(crate) fn release(&self, key: &str, id: TaskId) {
        let mut held = lock(&self.held);
        if held.get(key) == Some(&id) {
            held.remove(key);
        }
    }

    /// How many keys are held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.held).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_refused_while_held_and_free_once_its_holder_releases_it() {
        let keys = Keys::default();
        let first = TaskId::new(1, 1);
        let second = TaskId::new(1, 2);
        assert_eq!(keys.take("order-7", first), Ok(()));
        assert_eq!(keys.take("order-7", second), Err(first));
        // Only the holder lets go.
        keys.release("order-7", second);
        assert_eq!(keys.take("order-7", second), Err(first));
        keys.release("order-7", first);
        assert_eq!(keys.len(), 0);
        assert_eq!(keys.take("order-7", second), Ok(()));
        keys.adopt("order-7", first);
        assert_eq!(keys.take("order-7", TaskId::new(1, 3)), Err(second));
    }
}
