//! The journal's typed records: what the pool hands in and gets back. Frames, kinds and flags
//! stay in `format.rs`; the payload is opaque bytes here.

use std::borrow::Cow;

use crate::task::TaskId;

/// A task's journaled state, without its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct TaskState {
    /// Failed runs so far (a run interrupted at the drain deadline does not count).
    pub(crate) attempts: u32,
    /// Consecutive runs interrupted at the drain deadline.
    pub(crate) interruptions: u32,
    /// Whether the last run was interrupted at the drain deadline.
    pub(crate) interrupted: bool,
    /// When the task was first accepted, in milliseconds since the Unix epoch.
    pub(crate) enqueued_ms: u64,
    /// Not to run before this time, in milliseconds since the Unix epoch (0: at once).
    pub(crate) not_before_ms: u64,
}

/// A task's options, chosen at submit and journaled with it (format version 2). A task with
/// every option at its default carries none (`None` where a job holds them).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct TaskOptions {
    /// 0 (the default, lowest) to [`MAX_PRIORITY`]; higher runs first.
    pub(crate) priority: u8,
    /// Failed runs allowed before the task becomes a dead letter (0: the pool's setting).
    pub(crate) max_attempts: u32,
    /// No run starts after this time, in milliseconds since the Unix epoch (0: never).
    pub(crate) expires_ms: u64,
    /// While the task is queued or running, a submit with the same key is refused.
    pub(crate) key: Option<Box<str>>,
}

/// The highest priority level.
pub(crate) const MAX_PRIORITY: u8 = 7;

/// The longest unique key, in bytes.
pub(crate) const MAX_KEY_LEN: usize = 1024;

/// The options of a task that sets its priority and nothing else, one per level: such a task
/// (the common case of options) borrows its level's, instead of allocating its own.
static LEVELS: [TaskOptions; MAX_PRIORITY as usize + 1] = {
    let mut levels = [const { TaskOptions::DEFAULT }; MAX_PRIORITY as usize + 1];
    let mut level = 0;
    while level < levels.len() {
        levels[level].priority = level as u8;
        level += 1;
    }
    levels
};

impl TaskOptions {
    /// Every option at its default.
    const DEFAULT: Self = Self {
        priority: 0,
        max_attempts: 0,
        expires_ms: 0,
        key: None,
    };

    /// Whether every option is at its default (nothing to journal).
    pub(crate) fn is_default(&self) -> bool {
        self.priority == 0 && self.is_level_only()
    }

    /// Whether no option but the priority is set: the options are then [`level`](Self::level)'s.
    pub(crate) fn is_level_only(&self) -> bool {
        self.max_attempts == 0 && self.expires_ms == 0 && self.key.is_none()
    }

    /// All the options of a task that holds `held` (boxed only when an option other than the
    /// priority is set) and `priority`.
    pub(crate) fn of(held: Option<&Self>, priority: u8) -> Option<&Self> {
        held.or_else(|| Self::level(priority))
    }

    /// The options of a task that sets `priority` (capped at [`MAX_PRIORITY`]) and nothing
    /// else; `None` for the default level.
    pub(crate) fn level(priority: u8) -> Option<&'static Self> {
        LEVELS
            .get(usize::from(priority.min(MAX_PRIORITY)))
            .filter(|o| o.priority > 0)
    }

    /// The key, or `""`.
    pub(crate) fn key(&self) -> &str {
        self.key.as_deref().unwrap_or("")
    }
}

/// One task record, borrowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TaskRecord<'a> {
    pub(crate) id: TaskId,
    pub(crate) state: TaskState,
    /// The last run's error; `""` for none. Invalid UTF-8 is replaced when read.
    pub(crate) last_error: Cow<'a, str>,
    /// The payload's bytes, as the pool encoded them.
    pub(crate) payload: &'a [u8],
    /// Its options, if any is set.
    pub(crate) options: Option<Cow<'a, TaskOptions>>,
}

/// A live task found at start: its latest record, decoded by the caller's closure.
#[derive(Debug)]
pub(crate) struct Recovered<V> {
    pub(crate) id: TaskId,
    pub(crate) state: TaskState,
    /// The last run's error, if it had one.
    pub(crate) last_error: Option<Box<str>>,
    /// Its options, if any is set.
    pub(crate) options: Option<Box<TaskOptions>>,
    /// What the caller's closure made of the record.
    pub(crate) value: V,
    /// The number of the segment holding the record.
    pub(crate) segment: u64,
    /// The record's encoded length.
    pub(crate) len: u32,
}

impl<V> Recovered<V> {
    /// The same task with `value` instead of its own, which is returned.
    pub(crate) fn replace<U>(self, value: U) -> (V, Recovered<U>) {
        let task = Recovered {
            id: self.id,
            state: self.state,
            last_error: self.last_error,
            options: self.options,
            value,
            segment: self.segment,
            len: self.len,
        };
        (self.value, task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_level_has_options_that_set_that_priority_alone() {
        assert_eq!(TaskOptions::level(0), None);
        for priority in 1..=MAX_PRIORITY {
            let options = TaskOptions::level(priority).unwrap();
            assert_eq!(options.priority, priority);
            assert!(options.is_level_only() && !options.is_default());
        }
        // Above the highest level: the highest, as the builder caps it.
        assert_eq!(TaskOptions::level(200).unwrap().priority, MAX_PRIORITY);
    }
}
