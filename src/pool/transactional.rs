//! Submitting inside the caller's own transaction (the PostgreSQL store): the task is a row
//! of the shared table that exists if and only if the caller's transaction commits, so a
//! business write and its background task are one atomic step.
//!
//! The pool makes the statement and nothing else: an id, the payload encoded and checked
//! against the record limit, and SQL with literals only (the payload as hex), which the
//! caller runs with whatever client holds its transaction. The row is unleased and due at once;
//! its `NOTIFY` is delivered at the commit, and any pool on the table claims it then, this one
//! included.

use super::intake::Extras;
use super::remote::StoredTask;
use super::shared::Shared;
use crate::error::SubmitError;
use crate::task::TaskId;

/// A task that is submitted by running its [`sql`](Self::sql) inside your own PostgreSQL
/// transaction: it exists if and only if that transaction commits. Made by
/// [`Pool::submit_in_transaction`](crate::Pool::submit_in_transaction).
#[derive(Debug, Clone)]
#[must_use = "nothing is submitted until its SQL runs in a transaction that commits"]
pub struct InTransaction {
    id: TaskId,
    sql: String,
}

impl InTransaction {
    /// The task's id (stable: the handler sees it).
    pub fn id(&self) -> TaskId {
        self.id
    }

    /// The statements to run in the transaction: an `INSERT` into the pool's table and a
    /// `NOTIFY`, literals only (run them as a simple query: `batch_execute` in tokio-postgres,
    /// `raw_sql` in sqlx).
    pub fn sql(&self) -> &str {
        &self.sql
    }
}

impl<T: Send + Sync + 'static> Shared<T> {
    /// The task's SQL, or the payload back if the pool has no shared store.
    pub(crate) fn in_transaction(
        &self,
        payload: T,
    ) -> Result<Result<InTransaction, T>, SubmitError<T>> {
        let Some(claims) = &self.remote else {
            return Ok(Err(payload));
        };
        let (payload, size) =
            super::intake::kept(self.size_of(&payload, &Extras::default()), payload)?;
        let (_, bytes) = self.encoded(payload, size)?;
        let (id, state) = self.ids.fresh();
        let sql = claims.store.insert_sql(&StoredTask {
            id,
            state,
            last_error: None,
            payload: bytes,
            options: None,
        });
        Ok(Ok(InTransaction { id, sql }))
    }
}
