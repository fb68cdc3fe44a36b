//! A task's fields as the table's columns, and back: ids and counts as `bigint`s, times as
//! milliseconds since the Unix epoch (the statements make them `timestamptz`), the options as
//! their columns (a default as the column's default or null); the arrays a multi-row
//! statement takes, and a claimed row read back.
//!
//! Task ids and counts go to `bigint` columns: a `u64` is stored as the `i64` with the same
//! bits (run numbers and sequence numbers stay far below 2^63, so the order holds; a start
//! whose directory's run is beyond it is refused).

use tokio_postgres::Row;

use crate::journal::{MAX_PRIORITY, TaskOptions, TaskState};
use crate::pool::remote::{Claimed, StoredTask};
use crate::task::TaskId;

/// The latest time stored: the end of year 9999, PostgreSQL's `to_timestamp` goes no further
/// in a form every client reads back.
pub(super) const MAX_MS: i64 = 253_402_300_799_999;

/// A task id as two `bigint`s, bit for bit.
pub(super) fn to_sql(id: TaskId) -> (i64, i64) {
    (id.run().cast_signed(), id.seq().cast_signed())
}

pub(super) fn from_sql(run: i64, seq: i64) -> TaskId {
    TaskId::new(run.cast_unsigned(), seq.cast_unsigned())
}

/// Milliseconds since the epoch, within what a `timestamptz` holds.
pub(super) fn ms(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX).min(MAX_MS)
}

/// A count read back: negative is 0, past `u32` is `u32::MAX`.
pub(super) fn count(value: i64) -> u32 {
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}

/// Text as PostgreSQL takes it: no NUL characters.
pub(super) fn text(value: &str) -> String {
    value.replace('\0', "\u{fffd}")
}

/// A task's options as its columns hold them: `priority` (`smallint`), `max_attempts`
/// (`integer`, null: the pool's), `expires_at` (milliseconds here, null: never), `unique_key`
/// (`text`, null: none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Options {
    pub(super) priority: i16,
    pub(super) max_attempts: Option<i32>,
    pub(super) expires_ms: Option<i64>,
    pub(super) key: Option<String>,
}

impl Options {
    pub(super) fn of(options: Option<&TaskOptions>) -> Self {
        let Some(o) = options else {
            return Self::default();
        };
        Self {
            priority: i16::from(o.priority.min(MAX_PRIORITY)),
            max_attempts: (o.max_attempts > 0)
                .then(|| i32::try_from(o.max_attempts).unwrap_or(i32::MAX)),
            expires_ms: (o.expires_ms > 0).then(|| ms(o.expires_ms)),
            key: o.key.as_deref().map(text),
        }
    }

    /// Read back from a row, the four columns from `first` on.
    pub(super) fn read(row: &Row, first: usize) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            priority: row.try_get(first)?,
            max_attempts: row.try_get(first + 1)?,
            expires_ms: row.try_get(first + 2)?,
            key: row.try_get(first + 3)?,
        })
    }

    /// The priority, within the levels the pool has.
    pub(super) fn level(&self) -> u8 {
        u8::try_from(self.priority.clamp(0, i16::from(MAX_PRIORITY))).unwrap_or(0)
    }

    /// The retry limit, if the task has one (0 and below: the pool's).
    pub(super) fn attempts(&self) -> Option<u32> {
        self.max_attempts
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n > 0)
    }

    /// The expiry, if the task has one (a time at or before the epoch is 1 ms after it: long
    /// past, not "never").
    pub(super) fn expiry(&self) -> Option<u64> {
        self.expires_ms.map(|ms| ms.max(1).cast_unsigned())
    }

    /// The unique key, if the task has one.
    pub(super) fn unique_key(&self) -> Option<&str> {
        self.key.as_deref().filter(|k| !k.is_empty())
    }

    /// As the pool carries them: `None` when every one is at its default.
    pub(super) fn task_options(&self) -> Option<Box<TaskOptions>> {
        let options = TaskOptions {
            priority: self.level(),
            max_attempts: self.attempts().unwrap_or(0),
            expires_ms: self.expiry().unwrap_or(0),
            key: self.unique_key().map(Into::into),
        };
        (!options.is_default()).then(|| Box::new(options))
    }
}

/// Tasks as columns (one array per column), for `unnest`.
pub(super) struct Columns<'a> {
    pub(super) run: Vec<i64>,
    pub(super) seq: Vec<i64>,
    pub(super) attempts: Vec<i64>,
    pub(super) interruptions: Vec<i64>,
    pub(super) interrupted: Vec<bool>,
    pub(super) enqueued: Vec<i64>,
    pub(super) not_before: Vec<i64>,
    pub(super) error: Vec<Option<String>>,
    pub(super) payload: Vec<&'a [u8]>,
    pub(super) priority: Vec<i16>,
    pub(super) max_attempts: Vec<Option<i32>>,
    pub(super) expires: Vec<Option<i64>>,
    pub(super) key: Vec<Option<String>>,
}

impl<'a> Columns<'a> {
    pub(super) fn of(tasks: &'a [StoredTask]) -> Self {
        let n = tasks.len();
        let mut c = Self {
            run: Vec::with_capacity(n),
            seq: Vec::with_capacity(n),
            attempts: Vec::with_capacity(n),
            interruptions: Vec::with_capacity(n),
            interrupted: Vec::with_capacity(n),
            enqueued: Vec::with_capacity(n),
            not_before: Vec::with_capacity(n),
            error: Vec::with_capacity(n),
            payload: Vec::with_capacity(n),
            priority: Vec::with_capacity(n),
            max_attempts: Vec::with_capacity(n),
            expires: Vec::with_capacity(n),
            key: Vec::with_capacity(n),
        };
        for task in tasks {
            let (run, seq) = to_sql(task.id);
            let state = &task.state;
            c.run.push(run);
            c.seq.push(seq);
            c.attempts.push(i64::from(state.attempts));
            c.interruptions.push(i64::from(state.interruptions));
            c.interrupted.push(state.interrupted);
            c.enqueued.push(ms(state.enqueued_ms));
            c.not_before.push(ms(state.not_before_ms));
            c.error.push(task.last_error.as_deref().map(text));
            c.payload.push(&task.payload);
            let options = Options::of(task.options.as_deref());
            c.priority.push(options.priority);
            c.max_attempts.push(options.max_attempts);
            c.expires.push(options.expires_ms);
            c.key.push(options.key);
        }
        c
    }
}

/// A claimed row: the columns of `Sql::claim`'s `RETURNING`.
pub(super) fn claimed(row: &Row) -> Result<Claimed, tokio_postgres::Error> {
    let last_error: Option<String> = row.try_get(7)?;
    Ok(Claimed {
        task: StoredTask {
            id: from_sql(row.try_get(0)?, row.try_get(1)?),
            state: TaskState {
                attempts: count(row.try_get(2)?),
                interruptions: count(row.try_get(3)?),
                interrupted: row.try_get(4)?,
                enqueued_ms: row.try_get::<_, i64>(5)?.max(0).cast_unsigned(),
                not_before_ms: row.try_get::<_, i64>(6)?.max(0).cast_unsigned(),
            },
            last_error: last_error.map(String::into_boxed_str),
            payload: row.try_get(8)?,
            options: Options::read(row, 10)?.task_options(),
        },
        rescued: row.try_get(9)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_go_to_bigints_and_back_bit_for_bit() {
        for id in [
            TaskId::new(0, 0),
            TaskId::new(7, 1042),
            TaskId::new(u64::MAX, 1 << 63),
        ] {
            let (run, seq) = to_sql(id);
            assert_eq!(from_sql(run, seq), id);
        }
    }

    #[test]
    fn values_the_table_cannot_hold_are_clamped_not_refused() {
        assert_eq!(ms(u64::MAX), MAX_MS);
        assert_eq!(ms(1_700_000_000_123), 1_700_000_000_123);
        assert_eq!(count(-5), 0);
        assert_eq!(count(i64::MAX), u32::MAX);
        assert_eq!(text("a\0b"), "a\u{fffd}b");
    }

    #[test]
    fn options_go_to_their_columns_and_back() {
        assert_eq!(Options::of(None), Options::default());
        assert_eq!(Options::default().task_options(), None);
        let all = TaskOptions {
            priority: 5,
            max_attempts: 3,
            expires_ms: 1_700_000_000_123,
            key: Some("order-7".into()),
        };
        let columns = Options::of(Some(&all));
        assert_eq!(
            columns,
            Options {
                priority: 5,
                max_attempts: Some(3),
                expires_ms: Some(1_700_000_000_123),
                key: Some("order-7".into()),
            }
        );
        assert_eq!(columns.task_options().as_deref(), Some(&all));
        // What the table may hold that the pool never writes: clamped, not refused.
        let odd = Options {
            priority: 300,
            max_attempts: Some(-1),
            expires_ms: Some(-5),
            key: Some(String::new()),
        };
        let back = odd.task_options().unwrap();
        assert_eq!((back.priority, back.max_attempts), (MAX_PRIORITY, 0));
        assert_eq!((back.expires_ms, back.key), (1, None));
        let huge = TaskOptions {
            max_attempts: u32::MAX,
            expires_ms: u64::MAX,
            ..TaskOptions::default()
        };
        let columns = Options::of(Some(&huge));
        assert_eq!(columns.max_attempts, Some(i32::MAX));
        assert_eq!(columns.expires_ms, Some(MAX_MS));
    }
}
