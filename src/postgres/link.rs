//! `Link`: one connection for one role (claims, heartbeat, handoff), made when first needed and
//! made again after it broke. Every use is bounded by the store's timeout, connecting
//! included: a database that went away costs a call its timeout, never a hang.
//!
//! A connection's driver runs on a task of the store's tracker and ends when the connection
//! is dropped. On the claimer's link it also forwards notifications (`LISTEN` is issued on
//! each new connection), waking the claimer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::task::TaskTracker;

use super::error::PostgresError;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub(super) struct Link {
    config: tokio_postgres::Config,
    timeout: Duration,
    /// Run on each new connection (`LISTEN`), and where its notifications go.
    listen: Option<(String, Arc<Notify>)>,
    client: tokio::sync::Mutex<Option<Client>>,
    drivers: TaskTracker,
}

impl Link {
    pub(super) fn new(
        config: tokio_postgres::Config,
        timeout: Duration,
        listen: Option<(String, Arc<Notify>)>,
        drivers: TaskTracker,
    ) -> Self {
        Self {
            config,
            timeout,
            listen,
            client: tokio::sync::Mutex::new(None),
            drivers,
        }
    }

    /// Runs `f` on this link's connection (connecting first if it has none, or a broken one),
    /// all within the timeout. A failure other than the server's answer (an I/O error, the
    /// timeout) drops the connection, so the next call makes a fresh one.
    pub(super) async fn run<R: Send + 'static>(
        &self,
        op: &'static str,
        f: impl for<'c> FnOnce(&'c mut Client) -> BoxFuture<'c, Result<R, tokio_postgres::Error>> + Send,
    ) -> Result<R, PostgresError> {
        let work = async {
            let mut client = self.client.lock().await;
            if client.as_ref().is_none_or(Client::is_closed) {
                *client = None;
                *client = Some(
                    self.connect()
                        .await
                        .map_err(|e| PostgresError::driver(op, e))?,
                );
            }
            let Some(connected) = client.as_mut() else {
                return Err(PostgresError::refused(op, "no connection"));
            };
            match f(connected).await {
                Ok(value) => Ok(value),
                Err(error) => {
                    if error.as_db_error().is_none() {
                        *client = None;
                    }
                    Err(PostgresError::driver(op, error))
                }
            }
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => {
                // The connection may be mid-statement: the next call starts afresh. The lock
                // was dropped with the future, so this cannot wait on a stuck call.
                *self.client.lock().await = None;
                Err(PostgresError::timed_out(op, self.timeout))
            }
        }
    }

    /// A new connection, its driver started (and `LISTEN` issued, on the claimer's link).
    async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, mut connection) = self.config.connect(NoTls).await?;
        match &self.listen {
            None => {
                self.drivers.spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "PostgreSQL connection ended");
                    }
                });
            }
            Some((listen, notify)) => {
                let notify = Arc::clone(notify);
                self.drivers.spawn(async move {
                    loop {
                        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                            Some(Ok(AsyncMessage::Notification(_))) => notify.notify_one(),
                            Some(Ok(_)) => {}
                            Some(Err(error)) => {
                                tracing::debug!(%error, "PostgreSQL connection ended");
                                return;
                            }
                            None => return,
                        }
                    }
                });
                client.batch_execute(listen).await?;
            }
        }
        Ok(client)
    }

    /// Drops the connection (its driver ends with it).
    pub(super) async fn close(&self) {
        *self.client.lock().await = None;
    }
}
