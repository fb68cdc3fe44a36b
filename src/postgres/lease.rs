//! A lease that one replica holds at a time, for loops only one replica may run.
//!
//! One row per lease name in `<schema>.drainpool_leases`: the holder, a fencing number raised at every
//! change of holder, and an expiry in the database's clock. Taking the lease is one statement
//! that succeeds only while the row is missing or expired; the holder renews it every third of
//! its time to live, and gives it up by expiring its row at once, so a waiting replica (which retries
//! at least every [`POLL`]) takes over within a fraction of a second. A holder that cannot renew
//! (the database unreachable, the row taken after an expiry) fires its `lost` token before the
//! database would let another replica in: the renewal's expiry is counted locally from the
//! moment the statement was *sent*, which is no later than the database's `now()`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

use super::quoted;
use crate::error::BoxError;

/// How often a replica waiting in [`LeaseBuilder::acquire`] tries again, at most.
const POLL: Duration = Duration::from_millis(250);
/// The longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default time to live.
const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// The shortest time to live accepted: renewals run at a third of it.
const MIN_TTL: Duration = Duration::from_millis(300);

/// Why a lease could not be taken or given up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// PostgreSQL could not be reached.
    #[error("could not connect to PostgreSQL")]
    Connect(#[source] BoxError),
    /// A statement failed.
    #[error("a lease statement failed")]
    Query(#[source] BoxError),
    /// PostgreSQL did not answer in time.
    #[error("PostgreSQL did not answer within {0:?}")]
    Timeout(Duration),
    /// A setting is out of range.
    #[error("invalid lease setting `{setting}`: {reason}")]
    InvalidConfig {
        /// The setting's builder method.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Settings of a [`Lease`] to take: [`Lease::named`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `acquire` or `try_acquire`"]
pub struct LeaseBuilder {
    name: String,
    ttl: Duration,
    schema: String,
}

/// A cluster-wide lease (requires the `postgres` feature): while a replica holds it, no other
/// does. It is renewed in the background while held, given up by [`release`](Self::release)
/// (or, at the latest, when its time to live runs out after the holder is gone), and its
/// [`lost`](Self::lost) token fires when the holder can no longer be sure it holds it.
///
/// For "only one replica runs this" loops: run the loop until the token fires.
///
/// ```no_run
/// # async fn example() -> Result<(), drainpool::BoxError> {
/// use std::time::Duration;
/// use drainpool::postgres::Lease;
///
/// let lease = Lease::named("nightly-report")
///     .ttl(Duration::from_secs(10))
///     .acquire("postgres://app@db/app")
///     .await?; // waits while another replica holds it
/// let lost = lease.lost();
/// tokio::select! {
///     () = lost.cancelled() => {} // another replica may run it now: stop at once
///     () = async { /* the loop */ } => {}
/// }
/// lease.release().await?; // the next replica takes over within a second
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Lease {
    name: String,
    fence: i64,
    lost: CancellationToken,
    /// Stops the renewal, which then hands back its connection for the release.
    stop: CancellationToken,
    renewal: Option<JoinHandle<Option<Client>>>,
    release_sql: String,
    holder: String,
}

impl Lease {
    /// A lease of this name, to be taken with [`LeaseBuilder::acquire`] or
    /// [`try_acquire`](LeaseBuilder::try_acquire). Its time to live is 10 s and its table
    /// `public.drainpool_leases` unless set otherwise.
    pub fn named(name: impl Into<String>) -> LeaseBuilder {
        LeaseBuilder {
            name: name.into(),
            ttl: DEFAULT_TTL,
            schema: "public".into(),
        }
    }

    /// The lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing number: raised every time the lease changes holder, so a write guarded by
    /// it (`… WHERE fence < $1`) cannot come from an earlier holder.
    pub fn fence(&self) -> u64 {
        self.fence as u64
    }

    /// Fires when this replica can no longer count on holding the lease: a renewal failed
    /// until just before its expiry, or another holder has the row; also at release or drop.
    #[must_use]
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Whether the lease is still held (its `lost` token has not fired).
    pub fn is_held(&self) -> bool {
        !self.lost.is_cancelled()
    }

    /// Gives the lease up now, so another replica can take it at once.
    pub async fn release(mut self) -> Result<(), LeaseError> {
        self.give_up().await
    }

    /// Stops the renewal and, if the lease was still held, deletes its row.
    fn give_up(&mut self) -> impl Future<Output = Result<(), LeaseError>> + use<> {
        self.stop.cancel();
        let held = self.is_held();
        self.lost.cancel();
        let renewal = self.renewal.take();
        let (sql, name, holder, fence) = (
            std::mem::take(&mut self.release_sql),
            self.name.clone(),
            std::mem::take(&mut self.holder),
            self.fence,
        );
        async move {
            let Some(renewal) = renewal else {
                return Ok(());
            };
            let Ok(Some(client)) = renewal.await else {
                return Ok(());
            };
            if !held {
                return Ok(());
            }
            let params: [&(dyn ToSql + Sync); 3] = [&name, &holder, &fence];
            bounded(client.execute(sql.as_str(), &params))
                .await
                .map(drop)
        }
    }
}

impl Drop for Lease {
    /// Stops the renewal; the release runs on the runtime if there is one (otherwise the lease
    /// expires after its time to live).
    fn drop(&mut self) {
        if self.renewal.is_none() {
            return;
        }
        let release = self.give_up();
        let name = self.name.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = release.await {
                    tracing::warn!(lease = %name, error = &error as &dyn std::error::Error, "could not release a dropped lease; it expires");
                }
            });
        }
    }
}

impl LeaseBuilder {
    /// How long the lease lasts without renewal (at least 300 ms): a replica that dies holding
    /// it blocks the others this long. Renewals run every third of it.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The schema of the `drainpool_leases` table (created if missing); `public` unless set.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Takes the lease if no other replica holds it; `None` if one does.
    pub async fn try_acquire(self, url: &str) -> Result<Option<Lease>, LeaseError> {
        self.check()?;
        let client = connect(url).await?;
        let table = self.prepare(&client).await?;
        Ok(self.attempt(url, client, &table).await?.ok())
    }

    /// Takes the lease, waiting while another replica holds it (trying again at least every
    /// 250 ms, and at once when the holder releases it). Dropping the future stops waiting.
    pub async fn acquire(self, url: &str) -> Result<Lease, LeaseError> {
        self.check()?;
        let mut client = connect(url).await?;
        let table = self.prepare(&client).await?;
        loop {
            let next = Instant::now() + POLL.min(self.ttl / 4);
            client = match self.attempt(url, client, &table).await? {
                Ok(lease) => return Ok(lease),
                Err(client) => client,
            };
            sleep_until(next).await;
        }
    }

    fn check(&self) -> Result<(), LeaseError> {
        if self.ttl < MIN_TTL {
            return Err(LeaseError::InvalidConfig {
                setting: "ttl",
                reason: format!("{:?} is below the minimum of {MIN_TTL:?}", self.ttl),
            });
        }
        if self.name.is_empty() {
            return Err(LeaseError::InvalidConfig {
                setting: "named",
                reason: "a lease needs a name".into(),
            });
        }
        Ok(())
    }

    /// Creates the schema and table if missing (under an advisory lock, so replicas starting
    /// together do not race on it), and returns the table's quoted name.
    async fn prepare(&self, client: &Client) -> Result<String, LeaseError> {
        let schema = quoted(&self.schema);
        let table = format!("{schema}.drainpool_leases");
        let key = format!("drainpool lease table {}", self.schema).replace('\'', "''");
        let sql = format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('{key}'));
             CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {table} (
                 name text PRIMARY KEY,
                 holder text NOT NULL,
                 fence bigint NOT NULL,
                 expires_at timestamptz NOT NULL
             );
             COMMIT;"
        );
        bounded(client.batch_execute(&sql)).await?;
        Ok(table)
    }

    /// One try: takes the row if it is missing or expired, or hands the connection back.
    async fn attempt(
        &self,
        url: &str,
        client: Client,
        table: &str,
    ) -> Result<Result<Lease, Client>, LeaseError> {
        let holder = holder_id();
        let ttl = self.ttl.as_secs_f64();
        let take = format!(
            "INSERT INTO {table} AS l (name, holder, fence, expires_at)
             VALUES ($1, $2, 1, now() + $3 * interval '1 second')
             ON CONFLICT (name) DO UPDATE
                 SET holder = EXCLUDED.holder, fence = l.fence + 1,
                     expires_at = EXCLUDED.expires_at
                 WHERE l.expires_at <= now()
             RETURNING fence"
        );
        let sent = Instant::now();
        let rows = bounded(client.query(&take, &[&self.name, &holder, &ttl])).await?;
        let Some(row) = rows.first() else {
            return Ok(Err(client));
        };
        let fence: i64 = row.try_get(0).map_err(|e| LeaseError::Query(e.into()))?;
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let renewal = Renewal {
            url: url.to_owned(),
            renew_sql: format!(
                "UPDATE {table} SET expires_at = now() + $4 * interval '1 second'
                 WHERE name = $1 AND holder = $2 AND fence = $3"
            ),
            name: self.name.clone(),
            holder: holder.clone(),
            fence,
            ttl: self.ttl,
            lost: lost.clone(),
            stop: stop.clone(),
        };
        tracing::info!(lease = %self.name, fence, "lease taken");
        Ok(Ok(Lease {
            name: self.name.clone(),
            fence,
            lost,
            stop,
            renewal: Some(tokio::spawn(renewal.run(client, sent + self.ttl))),
            // Expired, not deleted: the fencing number must keep rising.
            release_sql: format!(
                "UPDATE {table} SET expires_at = '-infinity'
                 WHERE name = $1 AND holder = $2 AND fence = $3"
            ),
            holder,
        }))
    }
}

/// The background renewal of a held lease.
struct Renewal {
    url: String,
    renew_sql: String,
    name: String,
    holder: String,
    fence: i64,
    ttl: Duration,
    lost: CancellationToken,
    stop: CancellationToken,
}

impl Renewal {
    /// Renews every third of the time to live until stopped (handing back the connection) or
    /// until the lease is lost. `held_until` is the local instant before which the database
    /// cannot have let the lease go.
    async fn run(self, client: Client, mut held_until: Instant) -> Option<Client> {
        let period = self.ttl / 3;
        // Lost a little before the database's expiry, so two holders never overlap.
        let margin = self.ttl / 10;
        let mut client = Some(client);
        let mut next = Instant::now() + period;
        loop {
            tokio::select! {
                biased;
                () = self.stop.cancelled() => return client,
                () = sleep_until(next) => {}
            }
            let lose_at = held_until - margin;
            tokio::select! {
                biased;
                () = self.stop.cancelled() => return client,
                () = sleep_until(lose_at) => {
                    tracing::warn!(lease = %self.name, "lease lost: no renewal reached PostgreSQL in time");
                    self.lost.cancel();
                    return client;
                }
                renewed = self.renew(&mut client, period / 3) => match renewed {
                    Some(until) => {
                        held_until = until;
                        next = Instant::now() + period;
                    }
                    None => {
                        tracing::warn!(lease = %self.name, "lease lost: another replica holds it");
                        self.lost.cancel();
                        return client;
                    }
                },
            }
        }
    }

    /// Renews, retrying (and reconnecting) every `pause` until it succeeds: `Some` with the new
    /// local expiry, or `None` if the row is no longer this holder's.
    async fn renew(&self, client: &mut Option<Client>, pause: Duration) -> Option<Instant> {
        let ttl = self.ttl.as_secs_f64();
        loop {
            if client.as_ref().is_none_or(Client::is_closed) {
                *client = connect(&self.url).await.ok();
            }
            if let Some(live) = client.as_ref() {
                let sent = Instant::now();
                let params: [&(dyn ToSql + Sync); 4] =
                    [&self.name, &self.holder, &self.fence, &ttl];
                match timeout(pause * 3, live.execute(self.renew_sql.as_str(), &params)).await {
                    Ok(Ok(1)) => return Some(sent + self.ttl),
                    Ok(Ok(_)) => return None,
                    Ok(Err(error)) => {
                        tracing::debug!(lease = %self.name, %error, "lease renewal failed; retrying");
                        *client = None;
                    }
                    Err(_) => {
                        tracing::debug!(lease = %self.name, "lease renewal timed out; retrying");
                        *client = None;
                    }
                }
            }
            sleep(pause).await;
        }
    }
}

/// A connection, its driver spawned on the runtime.
async fn connect(url: &str) -> Result<Client, LeaseError> {
    let (client, connection) = timeout(CONNECT_TIMEOUT, tokio_postgres::connect(url, NoTls))
        .await
        .map_err(|_| LeaseError::Timeout(CONNECT_TIMEOUT))?
        .map_err(|e| LeaseError::Connect(e.into()))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "lease connection ended");
        }
    });
    Ok(client)
}

/// A statement, bounded in time.
async fn bounded<R>(
    statement: impl Future<Output = Result<R, tokio_postgres::Error>>,
) -> Result<R, LeaseError> {
    timeout(CONNECT_TIMEOUT, statement)
        .await
        .map_err(|_| LeaseError::Timeout(CONNECT_TIMEOUT))?
        .map_err(|e| LeaseError::Query(e.into()))
}

/// Who holds a lease: the host (a pod's name under Kubernetes), the process and a number that
/// differs between two takes in one process.
fn holder_id() -> String {
    static TAKES: AtomicU64 = AtomicU64::new(0);
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "?".into());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{host}/{}/{nanos:x}/{}",
        std::process::id(),
        TAKES.fetch_add(1, Ordering::Relaxed)
    )
}
