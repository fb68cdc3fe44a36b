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

use drainpool::{Builder, Pool, PostgresStore, StartError};

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

    /// The schema's version, from its meta table.
    pub fn version(&self) -> u64 {
        self.number(&format!(
            "SELECT version FROM \"{}\".drainpool_tasks_meta",
            self.name
        ))
    }

    /// Makes the tables as the build of schema `version` did: the current script up to its
    /// step to the next version.
    pub fn make_at_version(&self, version: u64) {
        let script = self.store().schema_sql().unwrap();
        let step = format!("-- Version {}", version + 1);
        let (older, _) = script.split_once(&step).expect("the next version's step");
        psql(&self.url, &format!("{older}COMMIT;")).expect("the older schema");
        assert_eq!(self.version(), version);
    }

    /// A pool that only checks the version (`migrate(false)`) refuses the tables at `version`
    /// (not this build's), and leaves them so.
    pub async fn assert_refused_unmigrated(&self, version: u64) {
        let dir = tempfile::tempdir().unwrap();
        let refused = Pool::<u64>::builder()
            .journal_dir(dir.path())
            .postgres(self.store().migrate(false))
            .build()
            .await;
        match refused {
            Err(StartError::Postgres(error)) => {
                let said = error.to_string();
                assert!(said.contains(&format!("version {version}")), "{said}");
            }
            other => panic!("{:?}", other.map(drop)),
        }
        assert_eq!(self.version(), version);
    }
}

/// The pool `builder` makes, its workers never started: what it accepts stays queued (in
/// write-ahead mode, its rows leased to it), and its shutdown hands it off.
pub async fn idle(builder: Builder<u64>) -> Pool<u64> {
    let (pool, runner) = builder.build().await.expect("pool build");
    drop(runner);
    pool
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

/// A PostgreSQL server of the test's own, for tests that stop and restart it: `initdb` into a
/// temporary directory (run as the `postgres` user when the test runs as root, since the server
/// refuses root), started with `pg_ctl` on a free port of 127.0.0.1, its socket in that
/// directory. Dropping it stops the server (`-m immediate`) and removes the directory, on every
/// path the test takes.
#[derive(Debug)]
pub struct Server {
    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub url: String,
    bin: std::path::PathBuf,
    data: std::path::PathBuf,
    options: String,
    /// Whom to run `initdb` and `pg_ctl` as: the `postgres` user's (uid, gid) under root.
    user: Option<(u32, u32)>,
    base: tempfile::TempDir,
}

impl Server {
    /// A fresh server, started; or why there is none.
    pub fn start() -> Result<Self, String> {
        let bin = pg_bin()?;
        let user = if rustix::process::geteuid().is_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        let base = tempfile::tempdir().map_err(|e| format!("a temporary directory: {e}"))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(base.path(), Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", base.path().display()))?;
        }
        let data = base.path().join("data");
        let mut server = Self {
            url: String::new(),
            bin,
            data,
            options: String::new(),
            user,
            base,
        };
        server.run(
            "initdb",
            &[
                "-D",
                &server.data.display().to_string(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-locale",
                "-E",
                "UTF8",
                "-N",
            ],
        )?;
        // A free port: the kernel's choice, released for the server (tried again if taken).
        let mut last = String::new();
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("a free port: {e}"))?
                .port();
            server.options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                server.base.path().display()
            );
            server.url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
            match server.start_again() {
                Ok(()) => return Ok(server),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub fn start_again(&self) -> Result<(), String> {
        self.pg_ctl(&["-o", &self.options, "start"])
    }

    /// `pg_ctl stop -m fast`: the connections are ended, the server is down when it returns.
    pub fn stop(&self) -> Result<(), String> {
        self.pg_ctl(&["-m", "fast", "stop"])
    }

    /// `pg_ctl restart -m fast`: every connection ended, the server up again when it returns.
    pub fn restart(&self) -> Result<(), String> {
        self.pg_ctl(&["-m", "fast", "restart"])
    }

    /// The server's log, for a failure's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.base.path().join("log")).unwrap_or_default()
    }

    /// Runs `pg_ctl`, waiting for the server's state. The server's output goes to the log,
    /// at a restart too (else it would inherit `pg_ctl`'s).
    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let data = self.data.display().to_string();
        let log = self.base.path().join("log").display().to_string();
        let mut all = vec!["-D", &data, "-l", &log, "-w", "-t", "30"];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all)
    }

    /// Runs one of the server's programs, as the server's user. Its output goes to a file,
    /// not a pipe: a server it starts could hold a pipe open, and the wait with it.
    fn run(&self, program: &str, args: &[&str]) -> Result<(), String> {
        use std::os::unix::process::CommandExt;
        let out_path = self.base.path().join(format!("{program}.out"));
        let out = std::fs::File::create(&out_path).map_err(|e| format!("{program}.out: {e}"))?;
        let err = out.try_clone().map_err(|e| format!("{program}.out: {e}"))?;
        let mut command = Command::new(self.bin.join(program));
        command
            .args(args)
            .current_dir(self.base.path())
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some((uid, gid)) = self.user {
            command.uid(uid).gid(gid);
        }
        let status = command
            .status()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        if status.success() {
            return Ok(());
        }
        Err(format!(
            "{program} {args:?} failed ({status}): {}\n{}",
            std::fs::read_to_string(&out_path)
                .unwrap_or_default()
                .trim(),
            self.log()
        ))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Whether it runs or not: stopped at once, then the directory goes with `base`.
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
    }
}

/// The directory of `initdb` and `pg_ctl`: `PG_BIN`, the newest `/usr/lib/postgresql/*/bin`,
/// or `pg_config --bindir`.
fn pg_bin() -> Result<std::path::PathBuf, String> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Ok(dir.into());
    }
    let mut found: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return Ok(bin);
    }
    let output = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .map_err(|e| format!("no /usr/lib/postgresql/*/bin/initdb, and no pg_config: {e}"))?;
    let bin = std::path::PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if bin.join("initdb").exists() {
        Ok(bin)
    } else {
        Err(format!("no initdb in {}", bin.display()))
    }
}

/// The `postgres` user's uid and gid, from `/etc/passwd`.
fn postgres_user() -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.first() != Some(&"postgres") {
                return None;
            }
            Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?))
        })
        .ok_or_else(|| "no postgres user to run the server as (it refuses root)".to_string())
}
