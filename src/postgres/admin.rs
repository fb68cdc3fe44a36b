//! The table seen from outside a pool: [`PostgresStore::inspect`] lists its tasks, live and
//! dead, and [`PostgresStore::requeue`] takes dead letters back, as `drainpool::journal`'s
//! `inspect` and `requeue` do for a journal directory (and `drainpool inspect --postgres`,
//! `drainpool requeue --postgres` from the command line).
//!
//! Both connect once, check the schema's version (never migrate it), and close. Safe beside
//! running pools: a requeue is one transaction that touches dead rows only, and its `NOTIFY`
//! wakes every pool on the table, which claims the tasks at once.

use tokio_util::task::TaskTracker;

use super::PostgresStore;
use super::columns::{Options, count, from_sql, to_sql};
use super::error::PostgresError;
use super::link::Link;
use super::schema::Sql;
use super::store::check_version;
use crate::journal::Requeue;
use crate::task::TaskId;

/// A task as the PostgreSQL table holds it, from [`PostgresStore::inspect`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TableTask {
    /// The task's id, the same the handler saw.
    pub id: TaskId,
    /// Failed runs so far (an interrupted run does not count).
    pub attempts: u32,
    /// Consecutive runs interrupted (at a drain deadline, or by a pool that died).
    pub interruptions: u32,
    /// Whether the last run was interrupted.
    pub interrupted: bool,
    /// When the task was first accepted, in milliseconds since the Unix epoch.
    pub enqueued_at_ms: u64,
    /// The task is not to run before this time (a retry's backoff), in milliseconds since the
    /// Unix epoch; 0 for at once, and for a dead letter.
    pub not_before_ms: u64,
    /// The last run's error, if it had one: a dead letter's reason.
    pub last_error: Option<String>,
    /// The payload as the pool's codec encoded it (serde_json bytes with the default codec).
    pub payload: Vec<u8>,
    /// The run number of the pool that holds the task leased (claimed it, or accepted it in
    /// write-ahead mode), if one does; the lease may have expired, so that another pool
    /// rescues it at its next claim.
    pub lease_owner: Option<u64>,
    /// When the task was set aside as a dead letter, in milliseconds since the Unix epoch;
    /// `None` for a live task.
    pub dead_at_ms: Option<u64>,
    /// Its priority, 0 (the default, lowest) to 7.
    pub priority: u8,
    /// Its own retry limit (failed runs before it is a dead letter); `None`: the pool's.
    pub max_attempts: Option<u32>,
    /// No run starts after this time, in milliseconds since the Unix epoch; `None`: never.
    pub expires_at_ms: Option<u64>,
    /// Its unique key, if it was given one.
    pub unique_key: Option<String>,
}

/// What the table holds, from [`PostgresStore::inspect`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Contents {
    /// Live tasks, in id order: waiting to be claimed, or held by a pool.
    pub live: Vec<TableTask>,
    /// Dead letters, in id order: never claimed until requeued.
    pub dead: Vec<TableTask>,
}

/// What [`PostgresStore::requeue`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Requeued {
    /// The tasks taken back, in id order. Any pool on the table claims them at once.
    pub ids: Vec<TaskId>,
}

/// [`PostgresStore::requeue`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequeueError {
    /// Some of the ids asked for are not dead letters in the table. Nothing was changed.
    #[error("no dead letter with id {}", list(ids))]
    NotDead {
        /// The ids that are not dead letters.
        ids: Vec<TaskId>,
    },
    /// Connecting, checking the schema or the statement failed. Nothing was changed.
    #[error("could not requeue")]
    Postgres(#[from] PostgresError),
}

fn list(ids: &[TaskId]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl PostgresStore {
    /// Every task in the table, live and dead, read in one statement (the schema must be at
    /// this build's version; it is not migrated). Needs a tokio runtime; bounded by the
    /// store's [`timeout`](Self::timeout).
    ///
    /// # Errors
    ///
    /// A setting the store refuses, the server unreachable, a schema at another version.
    pub async fn inspect(&self) -> Result<Contents, PostgresError> {
        let (link, sql, drivers) = self.admin()?;
        let result = async {
            check_version(&link, &sql).await?;
            let query = sql.list();
            link.run("inspect", move |client| {
                Box::pin(async move {
                    let rows = client.query(&query, &[]).await?;
                    let mut contents = Contents::default();
                    for row in &rows {
                        let task = table_task(row)?;
                        if task.dead_at_ms.is_some() {
                            contents.dead.push(task);
                        } else {
                            contents.live.push(task);
                        }
                    }
                    Ok(contents)
                })
            })
            .await
        }
        .await;
        close(&link, &drivers).await;
        result
    }

    /// Takes dead letters back: each becomes a live task again (same id, payload, last error
    /// and options, but no expiry: a requeue means to run it; attempts and interruptions
    /// reset; due at once), in one transaction that then
    /// notifies the pools on the table, which claim them at once. Needs a tokio runtime;
    /// bounded by the store's [`timeout`](Self::timeout).
    ///
    /// # Errors
    ///
    /// [`RequeueError::NotDead`] if an id asked for is not a dead letter (nothing is changed
    /// then); [`RequeueError::Postgres`] if the server could not be reached or the statement
    /// failed.
    pub async fn requeue(&self, which: Requeue) -> Result<Requeued, RequeueError> {
        let (link, sql, drivers) = self.admin()?;
        let result = async {
            check_version(&link, &sql).await?;
            let (all, asked) = match which {
                Requeue::All => (true, Vec::new()),
                Requeue::Ids(ids) => (false, ids),
            };
            let update = sql.requeue(all);
            let notify = sql.notify();
            let wanted = asked.clone();
            let outcome = link
                .run("requeue", move |client| {
                    Box::pin(async move {
                        let transaction = client.transaction().await?;
                        let rows = if all {
                            transaction.query(&update, &[]).await?
                        } else {
                            let (run, seq): (Vec<i64>, Vec<i64>) =
                                wanted.iter().map(|&id| to_sql(id)).unzip();
                            transaction.query(&update, &[&run, &seq]).await?
                        };
                        let mut ids = rows
                            .iter()
                            .map(|row| Ok(from_sql(row.try_get(0)?, row.try_get(1)?)))
                            .collect::<Result<Vec<TaskId>, tokio_postgres::Error>>()?;
                        ids.sort_unstable();
                        let missing: Vec<TaskId> = {
                            let mut missing: Vec<TaskId> = wanted
                                .iter()
                                .filter(|id| ids.binary_search(id).is_err())
                                .copied()
                                .collect();
                            missing.sort_unstable();
                            missing.dedup();
                            missing
                        };
                        if !missing.is_empty() {
                            // Dropped without a commit: rolled back.
                            return Ok(Err(missing));
                        }
                        if !ids.is_empty() {
                            transaction.batch_execute(&notify).await?;
                        }
                        transaction.commit().await?;
                        Ok(Ok(ids))
                    })
                })
                .await?;
            match outcome {
                Ok(ids) => Ok(Requeued { ids }),
                Err(ids) => Err(RequeueError::NotDead { ids }),
            }
        }
        .await;
        close(&link, &drivers).await;
        result
    }

    /// A link for one-off statements, with the store's settings and names.
    fn admin(&self) -> Result<(Link, Sql, TaskTracker), PostgresError> {
        let setup = self
            .setup()
            .map_err(|e| PostgresError::refused("configure", e.to_string()))?;
        let drivers = TaskTracker::new();
        let link = Link::new(setup.config, setup.timeout, None, drivers.clone());
        Ok((link, setup.sql, drivers))
    }
}

/// Closes the link and waits for its driver (bounded: a driver ends with its connection).
async fn close(link: &Link, drivers: &TaskTracker) {
    link.close().await;
    drivers.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drivers.wait()).await;
}

/// A row of [`Sql::list`].
fn table_task(row: &tokio_postgres::Row) -> Result<TableTask, tokio_postgres::Error> {
    let millis = |value: i64| value.max(0).cast_unsigned();
    let options = Options::read(row, 11)?;
    Ok(TableTask {
        id: from_sql(row.try_get(0)?, row.try_get(1)?),
        attempts: count(row.try_get(2)?),
        interruptions: count(row.try_get(3)?),
        interrupted: row.try_get(4)?,
        enqueued_at_ms: millis(row.try_get(5)?),
        not_before_ms: millis(row.try_get(6)?),
        last_error: row.try_get(7)?,
        payload: row.try_get(8)?,
        lease_owner: row.try_get::<_, Option<i64>>(9)?.map(i64::cast_unsigned),
        dead_at_ms: row.try_get::<_, Option<i64>>(10)?.map(millis),
        priority: options.level(),
        max_attempts: options.attempts(),
        expires_at_ms: options.expiry(),
        unique_key: options.unique_key().map(str::to_owned),
    })
}
