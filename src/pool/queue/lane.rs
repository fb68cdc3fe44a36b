//! One priority level's new tasks.

use std::collections::VecDeque;

use crate::pool::job::{Fresh, Head, Queued};
use crate::task::TaskId;

/// One priority level's new tasks, in two lists by the form they are held in: the value as
/// submitted (the hot window: at most [`HOT`](super::HOT) over every lane) and the encoding,
/// each in the order sent; taken in id order across the two. Kept apart so that a task held
/// encoded takes no room for a value: a list of one form would size every entry for the
/// value (80 bytes more per task for a 102-byte e-mail, a million of them queued).
pub(super) struct Lane<T> {
    hot: VecDeque<(Head, T)>,
    cold: VecDeque<(Head, Box<[u8]>)>,
}

impl<T> Default for Lane<T> {
    fn default() -> Self {
        Self {
            hot: VecDeque::new(),
            cold: VecDeque::new(),
        }
    }
}

impl<T> Lane<T> {
    pub(super) fn push(&mut self, task: Queued<T>) {
        let Queued { head, payload } = task;
        match payload {
            Fresh::Value(value) => self.hot.push_back((head, value)),
            Fresh::Encoded(bytes) => self.cold.push_back((head, bytes)),
        }
    }

    /// The id of the task [`pop`](Self::pop) would take.
    pub(super) fn front_id(&self) -> Option<TaskId> {
        match (self.hot.front(), self.cold.front()) {
            (Some((hot, _)), Some((cold, _))) => Some(hot.id.min(cold.id)),
            (Some((head, _)), None) | (None, Some((head, _))) => Some(head.id),
            (None, None) => None,
        }
    }

    /// Takes the oldest task (the smaller id of the two lists' heads).
    pub(super) fn pop(&mut self) -> Option<Queued<T>> {
        let hot_first = match (self.hot.front(), self.cold.front()) {
            (Some((hot, _)), Some((cold, _))) => hot.id < cold.id,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if hot_first {
            let (head, value) = self.hot.pop_front()?;
            Some(Queued {
                head,
                payload: Fresh::Value(value),
            })
        } else {
            let (head, bytes) = self.cold.pop_front()?;
            Some(Queued {
                head,
                payload: Fresh::Encoded(bytes),
            })
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.hot.is_empty() && self.cold.is_empty()
    }

    /// Every task, emptying the lane (not in order: the caller sorts).
    pub(super) fn drain(&mut self) -> impl Iterator<Item = Queued<T>> + '_ {
        let hot = self.hot.drain(..).map(|(head, value)| Queued {
            head,
            payload: Fresh::Value(value),
        });
        let cold = self.cold.drain(..).map(|(head, bytes)| Queued {
            head,
            payload: Fresh::Encoded(bytes),
        });
        hot.chain(cold)
    }
}
