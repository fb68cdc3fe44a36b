//! PostgreSQL (the `postgres` feature): the store, the table where pools on several machines
//! hand their unfinished tasks to each other; and [`Lease`], for loops only one replica may run.
//!
//! In the on-shutdown mode the pool runs from memory; at shutdown it hands its queued tasks (at
//! the trigger) and its interrupted ones (at the end) to the table, one transaction each, and
//! notifies. In write-ahead mode (`Durability::write_ahead(SyncPolicy::Always)`) every task
//! `submit` accepts is first a committed row, leased to its pool (concurrent submits share one
//! commit), so a SIGKILL loses nothing accepted. Every pool on the table claims what is due,
//! higher priorities first and in id order within one, under a lease it renews; a pool that
//! dies leaves leases that expire, and another pool rescues those tasks. A task's options
//! (priority, retry limit, expiry, unique key) are columns of its row. When PostgreSQL cannot
//! take a handoff, the tasks go to the pool's local journal, and the next start on that
//! directory hands them on. Dead letters are rows marked dead, listed and requeued with
//! [`PostgresStore::inspect`] and [`PostgresStore::requeue`]. The protocol is in
//! `pool/remote.rs`, the pool's side in `pool/claims.rs`; this module knows SQL and
//! connections only:
//!
//! | file | what it holds |
//! | --- | --- |
//! | `mod.rs` | [`PostgresStore`], the settings, and the pool's way in (`Connect`) |
//! | `schema.rs` | names, the migration script, the statements |
//! | `store.rs` | the operations: run number, handoff, claim, renew, settle, commit, dead letter |
//! | `columns.rs` | a task's fields as the table's columns (ids, times, options) and back |
//! | `link.rs` | one connection per role, made again after it broke, every use bounded |
//! | `admin.rs` | the table from outside a pool: [`PostgresStore::inspect`], [`PostgresStore::requeue`] |
//! | `error.rs` | [`PostgresError`] |
//! | `submit.rs` | `Pool::submit_in_transaction`: the pool's `InTransaction`, or a refusal without the store |
//! | `lease.rs` | [`Lease`]: one holder at a time, renewed, released, lost before it expires |

mod admin;
mod columns;
mod error;
mod lease;
mod link;
mod schema;
mod store;
mod submit;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub use self::admin::{Contents, RequeueError, Requeued, TableTask};
pub use self::error::PostgresError;
pub use self::lease::{Lease, LeaseBuilder, LeaseError};
use self::schema::Sql;
use self::store::{Setup, Store};
use crate::error::StartError;
pub use crate::pool::InTransaction;
use crate::pool::remote::{BoxFuture, Connect, Pacing, Remote, StoredTask};

/// The default lease: how long a claimed task stays with its pool without a renewal.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// The default number of tasks one claim takes at most.
pub const DEFAULT_CLAIM_BATCH: usize = 100;
/// The default time between looks for work when no notification comes.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// The default bound on connecting and on each operation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The PostgreSQL store's settings, for [`Builder::postgres`](crate::Builder::postgres).
///
/// ```no_run
/// # async fn example() -> Result<(), drainpool::StartError> {
/// use drainpool::{Pool, PostgresStore, Task};
///
/// let pool = Pool::builder()
///     .journal_dir("/var/lib/myservice/journal") // the fallback when PostgreSQL is away
///     .postgres(PostgresStore::new("postgres://app@db/app").schema("jobs"))
///     .start(|task: Task<String>| async move { Ok::<_, std::io::Error>(()) })
///     .await?;
/// # Ok(()) }
/// ```
///
/// With [`Durability::write_ahead`](crate::Durability::write_ahead), every accepted task is
/// committed to the table before `submit` returns, and only
/// [`SyncPolicy::Always`](crate::SyncPolicy::Always) is taken: the commit is the durability point, as durable as
/// the server makes it (`synchronous_commit`); `Interval` and `Never` are refused at start.
/// An unreachable server makes `submit` fail within [`timeout`](Self::timeout) with
/// [`SubmitError::Postgres`](crate::SubmitError::Postgres), the task handed back.
///
/// TLS is not supported yet: the connection is made without it (`sslmode=require` fails).
#[derive(Clone)]
pub struct PostgresStore {
    url: String,
    schema: String,
    table: String,
    lease: Duration,
    claim_batch: usize,
    poll_interval: Duration,
    timeout: Duration,
    migrate: bool,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the URL: it may hold a password.
        f.debug_struct("PostgresStore")
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("lease", &self.lease)
            .field("claim_batch", &self.claim_batch)
            .field("poll_interval", &self.poll_interval)
            .field("timeout", &self.timeout)
            .field("migrate", &self.migrate)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// The store at `url`, a libpq connection URL or key-value string
    /// (`postgres://user@host:5432/db`, `host=/run/postgresql dbname=app`), with the default
    /// settings.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: schema::DEFAULT_SCHEMA.into(),
            table: schema::DEFAULT_TABLE.into(),
            lease: DEFAULT_LEASE,
            claim_batch: DEFAULT_CLAIM_BATCH,
            poll_interval: DEFAULT_POLL_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            migrate: true,
        }
    }

    /// The schema the tables live in, created if missing. ASCII letters, digits and `_`.
    ///
    /// The default is `public`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The tasks table (its version table is `<table>_meta`). The pools that share a table
    /// hand tasks to each other; ASCII letters, digits and `_`, at most 57.
    ///
    /// The default is `drainpool_tasks`.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// How long a claimed task stays with its pool without a renewal. The pool renews every
    /// quarter lease; a pool that cannot renew for three quarters of it stops counting on its
    /// claims (their handlers' tokens fire), and once a lease has expired any pool may rescue
    /// the task. So a dead pool's tasks run again this long after its death, at most.
    ///
    /// The default is 30 s; at least 200 ms.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The most tasks one claim takes (never more than the queue has room for).
    ///
    /// The default is 100; at least 1.
    pub fn claim_batch(mut self, tasks: usize) -> Self {
        self.claim_batch = tasks;
        self
    }

    /// How often a pool looks for work when no notification woke it (a handoff notifies every
    /// pool; this covers notifications lost with a connection, and retries coming due).
    ///
    /// The default is 1 s; more than zero.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The bound on connecting and on each operation (a handoff's whole transaction
    /// included), and on a write-ahead `submit`'s wait for its commit. Count it in the
    /// shutdown's budget: the final handoff comes after the drain deadline and the cancel
    /// grace.
    ///
    /// The default is 5 s; more than zero.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether the pool creates and migrates the schema at start (under an advisory lock, so
    /// replicas starting together are safe). Off, it only checks the version, for databases
    /// whose migrations a DBA applies from [`schema_sql`](Self::schema_sql).
    ///
    /// The default is on.
    pub fn migrate(mut self, on: bool) -> Self {
        self.migrate = on;
        self
    }

    /// The migration script for this schema and table: what the pool applies at start, for a
    /// DBA to apply instead (`drainpool schema` prints it). One transaction, idempotent.
    ///
    /// # Errors
    ///
    /// If the schema or table name is not one the store takes.
    pub fn schema_sql(&self) -> Result<String, PostgresError> {
        Ok(Sql::new(&self.schema, &self.table)?.migration())
    }

    /// Checks every setting; the connection's and the statements'.
    fn setup(&self) -> Result<Setup, StartError> {
        let invalid = |reason: String| StartError::InvalidConfig {
            setting: "postgres",
            reason,
        };
        let config = tokio_postgres::Config::from_str(&self.url)
            .map_err(|e| invalid(format!("the connection URL does not parse: {e}")))?;
        let sql = Sql::new(&self.schema, &self.table).map_err(|e| invalid(e.to_string()))?;
        if self.lease < Duration::from_millis(200) {
            return Err(invalid(format!("lease {:?} is under 200 ms", self.lease)));
        }
        if self.claim_batch == 0 {
            return Err(invalid("claim_batch must be at least 1".into()));
        }
        if self.poll_interval.is_zero() || self.timeout.is_zero() {
            return Err(invalid(
                "poll_interval and timeout must be more than zero".into(),
            ));
        }
        let mut config = config;
        config.connect_timeout(self.timeout);
        Ok(Setup {
            config,
            sql,
            pacing: Pacing {
                lease: self.lease,
                claim_batch: self.claim_batch,
                poll_interval: self.poll_interval,
                timeout: self.timeout,
            },
            timeout: self.timeout,
            migrate: self.migrate,
        })
    }
}

impl Connect for PostgresStore {
    fn check(&self) -> Result<(), StartError> {
        self.setup().map(drop)
    }

    fn connect(
        &self,
        dir_run: u64,
        forward: Vec<StoredTask>,
    ) -> BoxFuture<'_, Result<Arc<dyn Remote>, StartError>> {
        Box::pin(async move {
            let store = Store::open(self.setup()?, dir_run, forward)
                .await
                .map_err(StartError::Postgres)?;
            tracing::info!(
                schema = %self.schema,
                table = %self.table,
                run = store.run(),
                "PostgreSQL store opened"
            );
            Ok(Arc::new(store) as Arc<dyn Remote>)
        })
    }
}

/// An SQL identifier, quoted (so any name is safe in a statement).
fn quoted(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}
