//! `Pool::submit_in_transaction`, the public side of submitting inside the caller's own
//! transaction (the pool side is `pool/transactional.rs`): here, where a pool without the
//! store is refused with a [`PostgresError`], so that the pool never names this module.

use std::sync::Arc;

use super::{InTransaction, PostgresError};
use crate::Pool;
use crate::error::SubmitError;

impl<T: Send + Sync + 'static> Pool<T> {
    /// A task to submit inside your own PostgreSQL transaction (requires the `postgres`
    /// feature and a pool built with [`Builder::postgres`](crate::Builder::postgres)): run
    /// its [`sql`](InTransaction::sql) in the transaction that makes your
    /// business write, and the task exists if and only if that transaction commits. Any pool
    /// on the table then runs it (this one too), woken by the notification the commit
    /// delivers. Nothing is written by this call, and the pool's own state does not matter:
    /// it works while the pool drains, since the task goes to the table, not to this pool.
    ///
    /// ```no_run
    /// # async fn example(pool: drainpool::Pool<String>, client: &mut tokio_postgres::Client) -> Result<(), drainpool::BoxError> {
    /// let tx = client.transaction().await?;
    /// tx.execute("INSERT INTO orders (id) VALUES ($1)", &[&42_i64]).await?;
    /// let task = pool.submit_in_transaction("ship 42".to_string()).map_err(|e| e.to_string())?;
    /// tx.batch_execute(task.sql()).await?;
    /// tx.commit().await?; // the order and its task, or neither
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`SubmitError::RecordTooLarge`] and [`SubmitError::Unserializable`] as for `submit`;
    /// [`SubmitError::Postgres`] if the pool has no PostgreSQL store.
    pub fn submit_in_transaction(&self, payload: T) -> Result<InTransaction, SubmitError<T>> {
        self.in_transaction(payload)?.map_err(|task| {
            let error = PostgresError::refused(
                "submit in a transaction",
                "the pool has no PostgreSQL store (Builder::postgres)",
            );
            SubmitError::Postgres {
                task,
                error: Arc::new(error),
            }
        })
    }
}
