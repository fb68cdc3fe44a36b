//! `Store`: the pool's `Remote` over PostgreSQL. Four links, one per role, so that a long
//! handoff or a write-ahead batch never delays a renewal: the claimer's (which listens), the
//! heartbeat's (renewals, settles and dead letters), the handoff's (start and shutdown), and
//! the committer's (write-ahead batches; connected at the first one).
//!
//! How a task's fields become columns and come back is `columns.rs`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_util::task::TaskTracker;

use super::columns::{Columns, Options, claimed, from_sql, ms, text, to_sql};
use super::error::PostgresError;
use super::link::Link;
use super::schema::{Literal, Sql, VERSION};
use crate::pool::remote::{BoxFuture, Claimed, Failed, Pacing, Remote, RemoteError, StoredTask};
use crate::task::TaskId;

/// Rows per statement in a handoff (all in one transaction): bounds one message's size.
const HANDOFF_CHUNK: usize = 10_000;

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
            // Tasks of the local journal: a handoff that failed may have been committed after
            // all, so each may have a row.
            let stored = forward.len();
            store.write(forward, stored).await?;
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

    /// Writes `tasks` in one transaction, then notifies. The first `stored` of them may have
    /// rows already (claimed from the table) and are upserted; the others were never written
    /// to it and are inserted, without the upsert's cost. Should one of those meet a row after
    /// all, the transaction is rolled back and every task is upserted.
    async fn write(&self, tasks: Vec<StoredTask>, stored: usize) -> Result<(), PostgresError> {
        let sql = Arc::clone(&self.sql);
        let owner = self.run.cast_signed();
        self.handoff
            .run("hand off", move |client| {
                Box::pin(async move {
                    let upsert = sql.hand_off();
                    let (known, new) = tasks.split_at(stored.min(tasks.len()));
                    let transaction = client.transaction().await?;
                    write_rows(&transaction, &upsert, known, Some(owner)).await?;
                    let transaction =
                        match write_rows(&transaction, &sql.hand_off_new(), new, None).await {
                            Ok(()) => transaction,
                            Err(error) if error.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                                transaction.rollback().await?;
                                let transaction = client.transaction().await?;
                                write_rows(&transaction, &upsert, &tasks, Some(owner)).await?;
                                transaction
                            }
                            Err(error) => return Err(error),
                        };
                    transaction.batch_execute(&sql.notify()).await?;
                    transaction.commit().await
                })
            })
            .await
    }
}

/// Writes `tasks` with `statement` (`hand_off`, given the `owner`, or `hand_off_new`),
/// [`HANDOFF_CHUNK`] rows at a time.
async fn write_rows(
    transaction: &tokio_postgres::Transaction<'_>,
    statement: &str,
    tasks: &[StoredTask],
    owner: Option<i64>,
) -> Result<(), tokio_postgres::Error> {
    for chunk in tasks.chunks(HANDOFF_CHUNK) {
        let c = Columns::of(chunk);
        let state: [&(dyn ToSql + Sync); 9] = [
            &c.run,
            &c.seq,
            &c.attempts,
            &c.interruptions,
            &c.interrupted,
            &c.enqueued,
            &c.not_before,
            &c.error,
            &c.payload,
        ];
        let options: [&(dyn ToSql + Sync); 4] = [&c.priority, &c.max_attempts, &c.expires, &c.key];
        let mut params = Vec::with_capacity(14);
        params.extend_from_slice(&state);
        if let Some(owner) = &owner {
            params.push(owner as &(dyn ToSql + Sync));
        }
        params.extend_from_slice(&options);
        transaction.execute(statement, &params).await?;
    }
    Ok(())
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

fn erased(error: PostgresError) -> RemoteError {
    Arc::new(error)
}

impl Remote for Store {
    fn run(&self) -> u64 {
        self.run
    }

    fn insert_sql(&self, task: &StoredTask) -> String {
        let (run, seq) = to_sql(task.id);
        self.sql.insert_literal(&Literal {
            run,
            seq,
            enqueued_ms: ms(task.state.enqueued_ms),
            not_before_ms: ms(task.state.not_before_ms),
            payload: &task.payload,
            options: Options::of(task.options.as_deref()),
        })
    }

    fn pacing(&self) -> Pacing {
        self.pacing
    }

    fn hand_off(
        &self,
        tasks: Vec<StoredTask>,
        stored: usize,
    ) -> BoxFuture<'_, Result<(), RemoteError>> {
        Box::pin(async move { self.write(tasks, stored).await.map_err(erased) })
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
                        let c = Columns::of(&tasks);
                        client
                            .execute(
                                &query,
                                &[
                                    &c.run,
                                    &c.seq,
                                    &c.enqueued,
                                    &c.not_before,
                                    &c.payload,
                                    &owner,
                                    &lease,
                                    &c.priority,
                                    &c.max_attempts,
                                    &c.expires,
                                    &c.key,
                                ],
                            )
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
                        let options = Options::of(task.options.as_deref());
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
                                    &options.priority,
                                    &options.max_attempts,
                                    &options.expires_ms,
                                    &options.key,
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
