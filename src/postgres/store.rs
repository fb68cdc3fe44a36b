//! `Store`: the pool's `Remote` over PostgreSQL. Four links, one per role, so that a long
//! handoff or a write-ahead batch never delays a renewal: the claimer's (which listens), the
//! heartbeat's (renewals, settles and dead letters), the handoff's (start and shutdown), and
//! the committer's (write-ahead batches; connected at the first one).
//!
//! Task ids and counts go to `bigint` columns: a `u64` is stored as the `i64` with the same
//! bits (run numbers and sequence numbers stay far below 2^63, so the order holds; a start
//! whose directory's run is beyond it is refused). Times are milliseconds since the Unix
//! epoch on the pool's side and `timestamptz` in the table.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::Row;
use tokio_util::task::TaskTracker;

use super::error::PostgresError;
use super::link::Link;
use super::schema::{Sql, VERSION};
use crate::journal::TaskState;
use crate::pool::remote::{BoxFuture, Claimed, Failed, Pacing, Remote, RemoteError, StoredTask};
use crate::task::TaskId;

/// Rows per statement in a handoff (all in one transaction): bounds one message's size.
const HANDOFF_CHUNK: usize = 10_000;
/// The latest time stored: the end of year 9999, PostgreSQL's `to_timestamp` goes no further
/// in a form every client reads back.
const MAX_MS: i64 = 253_402_300_799_999;

pub(super) struct Store {
    sql: Arc<Sql>,
    run: u64,
    pacing: Pacing,
    claimer: Link,
    heartbeat: Link,
    handoff: Link,
    /// Write-ahead commits: a link of their own, so a renewal never waits behind a batch.
    committer: Link,
    notified: Arc<Notify>,
    drivers: TaskTracker,
    timeout: Duration,
}

/// The settings a store is made with.
pub(super) struct Setup {
    pub(super) config: tokio_postgres::Config,
    pub(super) sql: Sql,
    pub(super) pacing: Pacing,
    pub(super) timeout: Duration,
    pub(super) migrate: bool,
}

impl Store {
    /// Connects, migrates (or checks) the schema, takes the run number (at least `dir_run`),
    /// and hands off `forward`.
    pub(super) async fn open(
        setup: Setup,
        dir_run: u64,
        forward: Vec<StoredTask>,
    ) -> Result<Self, PostgresError> {
        let floor = i64::try_from(dir_run).map_err(|_| {
            PostgresError::refused(
                "take a run number",
                format!("the journal directory's run {dir_run} is beyond PostgreSQL's bigint"),
            )
        })?;
        let Setup {
            config,
            sql,
            pacing,
            timeout,
            migrate,
        } = setup;
        let drivers = TaskTracker::new();
        let notified = Arc::new(Notify::new());
        let listen = Some((sql.listen(), Arc::clone(&notified)));
        let link = |listen| Link::new(config.clone(), timeout, listen, drivers.clone());
        let mut store = Self {
            claimer: link(listen),
            heartbeat: link(None),
            handoff: link(None),
            committer: link(None),
            sql: Arc::new(sql),
            run: 0,
            pacing,
            notified,
            drivers,
            timeout,
        };
        if migrate {
            store.migrate().await?;
        }
        store.check_version().await?;
        store.run = store.take_run(floor).await?;
        if !forward.is_empty() {
            store.write(forward).await?;
        }
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), PostgresError> {
        let script = self.sql.migration();
        self.handoff
            .run("migrate", move |client| {
                Box::pin(async move { client.batch_execute(&script).await })
            })
            .await
    }

    async fn check_version(&self) -> Result<(), PostgresError> {
        check_version(&self.handoff, &self.sql).await
    }

    async fn take_run(&self, floor: i64) -> Result<u64, PostgresError> {
        let query = self.sql.take_run();
        let run = self
            .handoff
            .run("take a run number", move |client| {
                Box::pin(async move {
                    client
                        .query_one(&query, &[&floor])
                        .await?
                        .try_get::<_, i64>(0)
                })
            })
            .await?;
        Ok(run.cast_unsigned())
    }

    /// Writes `tasks` in one transaction, then notifies.
    async fn write(&self, tasks: Vec<StoredTask>) -> Result<(), PostgresError> {
        let sql = Arc::clone(&self.sql);
        let owner = self.run.cast_signed();
        self.handoff
            .run("hand off", move |client| {
                Box::pin(async move {
                    let insert = sql.hand_off();
                    let transaction = client.transaction().await?;
                    for chunk in tasks.chunks(HANDOFF_CHUNK) {
                        let c = Columns::of(chunk);
                        transaction
                            .execute(
                                &insert,
                                &[
                                    &c.run,
                                    &c.seq,
                                    &c.attempts,
                                    &c.interruptions,
                                    &c.interrupted,
                                    &c.enqueued,
                                    &c.not_before,
                                    &c.error,
                                    &c.payload,
                                    &owner,
                                ],
                            )
                            .await?;
                    }
                    transaction.batch_execute(&sql.notify()).await?;
                    transaction.commit().await
                })
            })
            .await
    }
}

/// Checks that the schema is at this build's version.
pub(super) async fn check_version(link: &Link, sql: &Sql) -> Result<(), PostgresError> {
    let query = sql.version();
    let version = link
        .run("check the schema", move |client| {
            Box::pin(async move { client.query_one(&query, &[]).await?.try_get::<_, i32>(0) })
        })
        .await?;
    if version == VERSION {
        return Ok(());
    }
    Err(PostgresError::refused(
        "check the schema",
        format!(
            "the schema is at version {version}, this build needs {VERSION} (print the \
             migration with `drainpool schema`, or let a pool migrate)"
        ),
    ))
}

/// A handoff's tasks as columns (one array per column).
struct Columns<'a> {
    run: Vec<i64>,
    seq: Vec<i64>,
    attempts: Vec<i64>,
    interruptions: Vec<i64>,
    interrupted: Vec<bool>,
    enqueued: Vec<i64>,
    not_before: Vec<i64>,
    error: Vec<Option<String>>,
    payload: Vec<&'a [u8]>,
}

impl<'a> Columns<'a> {
    fn of(tasks: &'a [StoredTask]) -> Self {
        let mut c = Self {
            run: Vec::with_capacity(tasks.len()),
            seq: Vec::with_capacity(tasks.len()),
            attempts: Vec::with_capacity(tasks.len()),
            interruptions: Vec::with_capacity(tasks.len()),
            interrupted: Vec::with_capacity(tasks.len()),
            enqueued: Vec::with_capacity(tasks.len()),
            not_before: Vec::with_capacity(tasks.len()),
            error: Vec::with_capacity(tasks.len()),
            payload: Vec::with_capacity(tasks.len()),
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
        }
        c
    }
}

/// A task id as two `bigint`s, bit for bit.
pub(super) fn to_sql(id: TaskId) -> (i64, i64) {
    (id.run().cast_signed(), id.seq().cast_signed())
}

pub(super) fn from_sql(run: i64, seq: i64) -> TaskId {
    TaskId::new(run.cast_unsigned(), seq.cast_unsigned())
}

/// Milliseconds since the epoch, within what a `timestamptz` holds.
fn ms(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX).min(MAX_MS)
}

/// A count read back: negative is 0, past `u32` is `u32::MAX`.
pub(super) fn count(value: i64) -> u32 {
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}

/// Text as PostgreSQL takes it: no NUL characters.
fn text(value: &str) -> String {
    value.replace('\0', "\u{fffd}")
}

/// A claimed row: the columns of [`Sql::claim`]'s `RETURNING`.
fn claimed(row: &Row) -> Result<Claimed, tokio_postgres::Error> {
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
            options: None,
        },
        rescued: row.try_get(9)?,
    })
}

fn erased(error: PostgresError) -> RemoteError {
    Arc::new(error)
}

impl Remote for Store {
    fn run(&self) -> u64 {
        self.run
    }

    fn insert_sql(&self, task: &StoredTask) -> String {
        let (run, seq) = to_sql(task.id);
        self.sql
            .insert_literal(run, seq, ms(task.state.enqueued_ms), &task.payload)
    }

    fn pacing(&self) -> Pacing {
        self.pacing
    }

    fn hand_off(&self, tasks: Vec<StoredTask>) -> BoxFuture<'_, Result<(), RemoteError>> {
        Box::pin(async move { self.write(tasks).await.map_err(erased) })
    }

    fn claim(&self, limit: usize) -> BoxFuture<'_, Result<Vec<Claimed>, RemoteError>> {
        let query = self.sql.claim();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let owner = self.run.cast_signed();
        let lease = self.pacing.lease.as_secs_f64();
        Box::pin(async move {
            self.claimer
                .run("claim", move |client| {
                    Box::pin(async move {
                        let rows = client.query(&query, &[&limit, &owner, &lease]).await?;
                        rows.iter().map(claimed).collect()
                    })
                })
                .await
                .map_err(erased)
        })
    }

    fn renew(&self, tasks: Vec<TaskId>) -> BoxFuture<'_, Result<Vec<TaskId>, RemoteError>> {
        let query = self.sql.renew();
        let owner = self.run.cast_signed();
        let lease = self.pacing.lease.as_secs_f64();
        let (run, seq): (Vec<i64>, Vec<i64>) = tasks.into_iter().map(to_sql).unzip();
        Box::pin(async move {
            self.heartbeat
                .run("renew leases", move |client| {
                    Box::pin(async move {
                        let rows = client.query(&query, &[&owner, &lease, &run, &seq]).await?;
                        rows.iter()
                            .map(|row| Ok(from_sql(row.try_get(0)?, row.try_get(1)?)))
                            .collect()
                    })
                })
                .await
                .map_err(erased)
        })
    }

    fn settle(
        &self,
        done: Vec<TaskId>,
        failed: Vec<Failed>,
    ) -> BoxFuture<'_, Result<(), RemoteError>> {
        let sql = Arc::clone(&self.sql);
        let owner = self.run.cast_signed();
        Box::pin(async move {
            self.heartbeat
                .run("settle", move |client| {
                    Box::pin(async move {
                        if !done.is_empty() {
                            let (run, seq): (Vec<i64>, Vec<i64>) =
                                done.iter().map(|&id| to_sql(id)).unzip();
                            client.execute(&sql.delete(), &[&run, &seq, &owner]).await?;
                        }
                        if !failed.is_empty() {
                            update_failed(client, &sql, &failed, owner).await?;
                        }
                        Ok(())
                    })
                })
                .await
                .map_err(erased)
        })
    }

    fn write_ahead(&self, tasks: Vec<StoredTask>) -> BoxFuture<'_, Result<(), RemoteError>> {
        let query = self.sql.write_ahead();
        let owner = self.run.cast_signed();
        let lease = self.pacing.lease.as_secs_f64();
        Box::pin(async move {
            self.committer
                .run("commit", move |client| {
                    Box::pin(async move {
                        let mut columns = (
                            Vec::with_capacity(tasks.len()),
                            Vec::with_capacity(tasks.len()),
                            Vec::with_capacity(tasks.len()),
                            Vec::with_capacity(tasks.len()),
                        );
                        for task in &tasks {
                            let (run, seq) = to_sql(task.id);
                            columns.0.push(run);
                            columns.1.push(seq);
                            columns.2.push(ms(task.state.enqueued_ms));
                            columns.3.push(task.payload.as_slice());
                        }
                        let (run, seq, enqueued, payload) = columns;
                        client
                            .execute(&query, &[&run, &seq, &enqueued, &payload, &owner, &lease])
                            .await
                            .map(drop)
                    })
                })
                .await
                .map_err(erased)
        })
    }

    fn dead_letter(&self, task: StoredTask) -> BoxFuture<'_, Result<bool, RemoteError>> {
        let query = self.sql.dead_letter();
        let owner = self.run.cast_signed();
        Box::pin(async move {
            self.heartbeat
                .run("keep a dead letter", move |client| {
                    Box::pin(async move {
                        let (run, seq) = to_sql(task.id);
                        let state = &task.state;
                        let error = task.last_error.as_deref().map(text);
                        let rows = client
                            .query(
                                &query,
                                &[
                                    &run,
                                    &seq,
                                    &i64::from(state.attempts),
                                    &i64::from(state.interruptions),
                                    &state.interrupted,
                                    &ms(state.enqueued_ms),
                                    &error,
                                    &task.payload,
                                    &owner,
                                ],
                            )
                            .await?;
                        Ok(!rows.is_empty())
                    })
                })
                .await
                .map_err(erased)
        })
    }

    fn timed_out(&self, op: &'static str) -> RemoteError {
        erased(PostgresError::timed_out(op, self.timeout))
    }

    fn woken(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.notified.notified())
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for link in [
                &self.claimer,
                &self.heartbeat,
                &self.handoff,
                &self.committer,
            ] {
                link.close().await;
            }
            self.drivers.close();
            if tokio::time::timeout(self.timeout, self.drivers.wait())
                .await
                .is_err()
            {
                tracing::warn!("a PostgreSQL connection did not close in time");
            }
        })
    }
}

async fn update_failed(
    client: &tokio_postgres::Client,
    sql: &Sql,
    failed: &[Failed],
    owner: i64,
) -> Result<u64, tokio_postgres::Error> {
    let mut columns = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for f in failed {
        let (run, seq) = to_sql(f.id);
        columns.0.push(run);
        columns.1.push(seq);
        columns.2.push(i64::from(f.state.attempts));
        columns.3.push(i64::from(f.state.interruptions));
        columns.4.push(f.state.interrupted);
        columns.5.push(ms(f.state.not_before_ms));
        columns.6.push(text(&f.last_error));
    }
    let (run, seq, attempts, interruptions, interrupted, not_before, error) = columns;
    client
        .execute(
            &sql.failed(),
            &[
                &run,
                &seq,
                &attempts,
                &interruptions,
                &interrupted,
                &not_before,
                &error,
                &owner,
            ],
        )
        .await
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
}
