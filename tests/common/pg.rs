//! What the PostgreSQL tests share: the database (from `DATABASE_URL`), a schema of each test's
//! own (dropped at the end, so tests run in parallel), `psql` to look at the tables, and a TCP
//! proxy to cut a pool off from the server.
//!
//! Under `CI=true` a missing database fails the test (`.ci/run` starts one and exports
//! `DATABASE_URL`); elsewhere the test says why it skips, and the default URL is the local
//! server's.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drainpool::PostgresStore;

/// The server the tests use when `DATABASE_URL` is unset outside CI.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The database URL, or why there is none.
pub fn database_url() -> Result<String, String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => Ok(url),
        _ if super::in_ci() => Err("DATABASE_URL is not set".into()),
        _ => Ok(DEFAULT_URL.into()),
    }
}

/// Runs `sql` with psql; returns its unaligned, tuples-only output.
pub fn psql(url: &str, sql: &str) -> Result<String, String> {
    let output = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            url,
            "-c",
            sql,
        ])
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "psql failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// A schema of the test's own on the test database, dropped when this is.
#[derive(Debug)]
pub struct Schema {
    pub url: String,
    pub name: String,
}

impl Schema {
    /// A fresh schema named after `test`, or `None` once `require` has said why not (which
    /// fails the test under CI). The schema itself is created by the first pool.
    #[track_caller]
    pub fn new(test: &str) -> Option<Self> {
        let url = super::require("a PostgreSQL database", database_url())?;
        super::require(
            "a PostgreSQL server that answers",
            psql(&url, "SELECT 1").map(drop),
        )?;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "t_{test}_{}_{nanos}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Some(Self { url, name })
    }

    /// The store on this schema, with test pacing: short lease, quick polls.
    pub fn store(&self) -> PostgresStore {
        self.store_at(&self.url)
    }

    /// The same store reached at `url` (through a proxy, say).
    pub fn store_at(&self, url: &str) -> PostgresStore {
        PostgresStore::new(url)
            .schema(self.name.clone())
            .lease(Duration::from_secs(2))
            .poll_interval(Duration::from_millis(200))
            .timeout(Duration::from_secs(3))
    }

    /// One number from a query on this schema's tasks table (`{t}` in `sql`).
    pub fn number(&self, sql: &str) -> u64 {
        let sql = sql.replace("{t}", &format!("\"{}\".drainpool_tasks", self.name));
        let out = psql(&self.url, &sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        out.parse()
            .unwrap_or_else(|_| panic!("{sql}: not a number: {out:?}"))
    }

    /// The tasks in the table.
    pub fn rows(&self) -> u64 {
        self.number("SELECT count(*) FROM {t}")
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = psql(
            &self.url,
            &format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name),
        );
    }
}

/// A TCP proxy on 127.0.0.1 in front of the database: [`cut`](Self::cut) closes every
/// connection through it and refuses new ones, as a server that went away does.
#[derive(Debug)]
pub struct Proxy {
    pub url: String,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A proxy to the server of `url` (`postgres://[user@]host[:port]/db`), and the URL that
    /// goes through it.
    pub fn start(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| format!("{url} is not a postgres:// URL"))?;
        let (user, rest) = rest.rsplit_once('@').map_or(("", rest), |(u, r)| (u, r));
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = if host.contains(':') {
            host.to_string()
        } else {
            format!("{host}:5432")
        };
        let target = host
            .to_socket_addrs()
            .map_err(|e| format!("{host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host}: no address"))?;
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("nonblocking: {e}"))?;
        let at = if user.is_empty() {
            String::new()
        } else {
            format!("{user}@")
        };
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (stop, streams) = (Arc::clone(&stop), Arc::clone(&streams));
            std::thread::spawn(move || accept_loop(listener, target, &stop, &streams))
        };
        Ok(Self {
            url: format!("postgres://{at}127.0.0.1:{port}/{path}"),
            stop,
            streams,
            accept: Some(accept),
        })
    }

    /// Closes every connection and stops listening.
    pub fn cut(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for stream in self.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

fn accept_loop(
    listener: TcpListener,
    target: std::net::SocketAddr,
    stop: &AtomicBool,
    streams: &Mutex<Vec<TcpStream>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => return,
        };
        let Ok(server) = TcpStream::connect(target) else {
            continue;
        };
        let _ = client.set_nonblocking(false);
        let mut kept = streams.lock().unwrap();
        for stream in [&client, &server] {
            if let Ok(clone) = stream.try_clone() {
                kept.push(clone);
            }
        }
        drop(kept);
        pump(&client, &server);
        pump(&server, &client);
    }
}

/// Copies `from` to `to` on a thread of its own until either end closes.
fn pump(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
