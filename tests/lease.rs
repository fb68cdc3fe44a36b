//! The cluster-wide `Lease` on a real PostgreSQL (`DATABASE_URL`, by default the local server's
//! `test` database): one holder at a time, the fencing number, the `lost` token when another
//! holder has the row or the database cannot be reached before the expiry, and — with real
//! processes — a holder SIGKILLed (another holds once the lease expires) or shut down (another
//! holds at once). Each test works in a schema of its own.

#![cfg(feature = "postgres")]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::child::{SelfExec, read, run_worker, tail};
use common::{PATIENCE, current_thread_runtime, eventually, require, say};
use drainpool::postgres::Lease;
use rustix::process::Signal;

/// The database the tests use.
fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A schema of the test's own, dropped when the guard goes; `None` (the test skipped, or failed
/// under CI) when the database does not answer.
struct Schema {
    name: String,
}

impl Schema {
    async fn new(test: &str) -> Option<Self> {
        let name = format!("lease_{test}_{}", std::process::id());
        let client = require("a PostgreSQL server (DATABASE_URL)", client().await)?;
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
            .await
            .unwrap();
        Some(Self { name })
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Its own thread and runtime: the test's runtime may be gone or busy.
        let _ = std::thread::spawn(move || {
            current_thread_runtime().block_on(async {
                if let Ok(client) = client().await {
                    let _ = client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                        .await;
                }
            });
        })
        .join();
    }
}

async fn client() -> Result<tokio_postgres::Client, String> {
    let url = database_url();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("{url} does not answer: {e}"))?;
    tokio::spawn(connection);
    Ok(client)
}

#[test]
fn one_replica_holds_a_lease_at_a_time_and_a_release_lets_the_next_in() {
    current_thread_runtime().block_on(async {
        let Some(schema) = Schema::new("one").await else {
            return;
        };
        let url = database_url();
        let take = || Lease::named("report").schema(&schema.name);
        let first = take().try_acquire(&url).await.unwrap().expect("free");
        assert!(first.is_held());
        assert!(
            take().try_acquire(&url).await.unwrap().is_none(),
            "held by the first"
        );
        // Another name is another lease.
        let other = Lease::named("other").schema(&schema.name);
        let other = other.try_acquire(&url).await.unwrap().expect("free");

        let lost = first.lost();
        let fence = first.fence();
        first.release().await.unwrap();
        assert!(lost.is_cancelled(), "released: no longer held");
        let second = take().try_acquire(&url).await.unwrap().expect("released");
        assert!(second.fence() > fence, "{} after {fence}", second.fence());
        other.release().await.unwrap();
        second.release().await.unwrap();
    });
}

#[test]
fn a_ttl_below_the_minimum_is_refused() {
    current_thread_runtime().block_on(async {
        let refused = Lease::named("x")
            .ttl(Duration::from_millis(10))
            .try_acquire(&database_url())
            .await;
        assert!(
            matches!(
                refused,
                Err(drainpool::postgres::LeaseError::InvalidConfig { setting: "ttl", .. })
            ),
            "{refused:?}"
        );
    });
}

#[test]
fn a_holder_whose_row_was_taken_learns_it_from_its_token() {
    current_thread_runtime().block_on(async {
        let Some(schema) = Schema::new("taken").await else {
            return;
        };
        let lease = Lease::named("loop")
            .ttl(Duration::from_millis(600))
            .schema(&schema.name)
            .try_acquire(&database_url())
            .await
            .unwrap()
            .expect("free");
        let lost = lease.lost();
        // Another holder in the row (as after an expiry the holder did not see).
        client()
            .await
            .unwrap()
            .execute(
                &format!(
                    "UPDATE {}.leases SET holder = 'elsewhere', fence = fence + 1",
                    schema.name
                ),
                &[],
            )
            .await
            .unwrap();
        eventually(PATIENCE, "the lost token", || lost.is_cancelled()).await;
        assert!(!lease.is_held());
    });
}

/// A TCP proxy to the database that can be cut: the holder then cannot renew.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let (target, cut2, streams2) = (target.to_owned(), Arc::clone(&cut), Arc::clone(&streams));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if cut2.load(Ordering::SeqCst) {
                    continue; // dropped: refused in effect
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let mut kept = streams2.lock().unwrap();
                kept.push(client.try_clone().unwrap());
                kept.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Self { port, cut, streams }
    }

    /// Closes every connection and refuses new ones.
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for stream in self.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

#[test]
fn a_holder_cut_off_from_the_database_counts_itself_out_before_the_lease_expires() {
    current_thread_runtime().block_on(async {
        let Some(schema) = Schema::new("cut").await else {
            return;
        };
        let proxy = Proxy::start("127.0.0.1:5432");
        let url = format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            proxy.port,
            database_url().rsplit('/').next().unwrap_or("test")
        );
        let ttl = Duration::from_millis(1500);
        let lease = Lease::named("loop")
            .ttl(ttl)
            .schema(&schema.name)
            .try_acquire(&url)
            .await
            .unwrap()
            .expect("free");
        let lost = lease.lost();
        // Renewals go through for a while (a full ttl: the lease outlives its first expiry).
        tokio::time::sleep(ttl + ttl / 2).await;
        assert!(lease.is_held(), "renewed while the database answers");

        proxy.cut();
        let cut_at = Instant::now();
        eventually(PATIENCE, "the lost token after the cut", || {
            lost.is_cancelled()
        })
        .await;
        let noticed = cut_at.elapsed();
        // The database still has it: this holder counted itself out before the expiry, so no
        // other replica could have held it meanwhile.
        let direct = client().await.unwrap();
        let row = direct
            .query_one(
                &format!(
                    "SELECT expires_at > now() FROM {}.leases WHERE name = 'loop'",
                    schema.name
                ),
                &[],
            )
            .await
            .unwrap();
        let unexpired: bool = row.get(0);
        say(&format!("lost {noticed:?} after the cut (ttl {ttl:?})"));
        assert!(
            unexpired,
            "the token fired only after the database let the lease go"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Real processes.
// ---------------------------------------------------------------------------------------------

const HOLDER: SelfExec = SelfExec {
    test: "lease_holder",
    dir_var: "DRAINPOOL_LEASE_HOLDER_DIR",
    config_var: "DRAINPOOL_LEASE_HOLDER_CONFIG",
    exit_poll: Duration::from_millis(5),
    ready_poll: Duration::from_millis(5),
};

/// The time to live the holder processes use.
const PROCESS_TTL: Duration = Duration::from_millis(1500);

/// The holder process (does nothing in an ordinary run): prints `waiting` if the lease is
/// taken, `held <fence>` once it holds it, and on SIGTERM releases it and exits 0.
#[test]
#[ignore = "a worker process for the lease tests"]
fn lease_holder() {
    let Some((_, schema)) = HOLDER.worker_env() else {
        return;
    };
    run_worker(false, async move {
        let url = database_url();
        let take = || Lease::named("singleton").ttl(PROCESS_TTL).schema(&schema);
        let signal = drainpool::shutdown_signal().expect("signal handlers");
        let lease = match take().try_acquire(&url).await.expect("try_acquire") {
            Some(lease) => lease,
            None => {
                println!("waiting");
                take().acquire(&url).await.expect("acquire")
            }
        };
        println!("held {}", lease.fence());
        let lost = lease.lost();
        tokio::select! {
            () = signal => {}
            () = lost.cancelled() => {
                println!("lost");
                return 1;
            }
        }
        lease.release().await.expect("release");
        println!("released");
        0
    });
}

fn fence_held(dir: &Path, generation: u32) -> Option<u64> {
    read(&dir.join(format!("out.{generation}")))
        .lines()
        // The first line follows the test harness's `test lease_holder ... `.
        .find_map(|line| line.rsplit_once("held ")?.1.trim().parse().ok())
}

/// What a holder process printed, for a failure's message.
fn output(dir: &Path, generation: u32) -> String {
    let name = |kind: &str| dir.join(format!("{kind}.{generation}"));
    format!(
        "holder {generation} printed:\n{}\n{}",
        read(&name("out")),
        tail(&read(&name("err")), 20)
    )
}

fn waiting(dir: &Path, generation: u32) -> bool {
    read(&dir.join(format!("out.{generation}")))
        .lines()
        .any(|line| line.ends_with("waiting"))
}

#[test]
fn a_lease_passes_to_another_process_when_its_holder_is_killed_or_shut_down() {
    let Some(schema) = current_thread_runtime().block_on(Schema::new("processes")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let limit = PATIENCE;

    let mut first = HOLDER.spawn(dir, 1, &schema.name, None).unwrap();
    first
        .wait_for(limit, "the first holder", || fence_held(dir, 1).is_some())
        .unwrap_or_else(|e| panic!("{e}; {}", output(dir, 1)));
    let mut second = HOLDER.spawn(dir, 2, &schema.name, None).unwrap();
    second
        .wait_for(limit, "the second process waiting", || waiting(dir, 2))
        .unwrap_or_else(|e| panic!("{e}; {}", output(dir, 2)));
    assert_eq!(fence_held(dir, 2), None, "two holders at once");

    // SIGKILL: the lease stays with the dead holder until it expires, then passes on.
    first.signal(Signal::KILL, "SIGKILL").unwrap();
    let killed = Instant::now();
    second
        .wait_for(limit, "the second holder", || fence_held(dir, 2).is_some())
        .unwrap_or_else(|e| panic!("{e}; {}", output(dir, 2)));
    let after_kill = killed.elapsed();
    assert!(fence_held(dir, 2) > fence_held(dir, 1));

    // SIGTERM: the holder releases it, and the waiting process holds it at once.
    let mut third = HOLDER.spawn(dir, 3, &schema.name, None).unwrap();
    third
        .wait_for(limit, "the third process waiting", || waiting(dir, 3))
        .unwrap_or_else(|e| panic!("{e}; {}", output(dir, 3)));
    second.signal(Signal::TERM, "SIGTERM").unwrap();
    let terminated = Instant::now();
    third
        .wait_for(limit, "the third holder", || fence_held(dir, 3).is_some())
        .unwrap_or_else(|e| panic!("{e}; {}", output(dir, 3)));
    let after_release = terminated.elapsed();
    let status = second.wait(limit).unwrap();
    assert!(status.success(), "the second holder exited {status}");
    assert!(read(&dir.join("out.2")).contains("released"));
    assert!(fence_held(dir, 3) > fence_held(dir, 2));
    third.signal(Signal::TERM, "SIGTERM").unwrap();
    assert!(third.wait(limit).unwrap().success());
    say(&format!(
        "held by another process {after_kill:?} after SIGKILL (ttl {PROCESS_TTL:?}), \
         {after_release:?} after SIGTERM"
    ));
}
