//! The cluster-wide `Lease` on a real PostgreSQL (`DATABASE_URL`; see `tests/common/pg.rs`): one holder at a time, the fencing number, the `lost` token when another
//! holder has the row or the database cannot be reached before the expiry, and — with real
//! processes — a holder SIGKILLed (another holds once the lease expires) or shut down (another
//! holds at once). Each test works in a schema of its own.

#![cfg(feature = "postgres")]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::child::{SelfExec, read, run_worker, tail};
use common::pg::{Proxy, Schema, psql};
use common::{PATIENCE, current_thread_runtime, eventually, say};
use drainpool::postgres::Lease;
use rustix::process::Signal;

#[test]
fn one_replica_holds_a_lease_at_a_time_and_a_release_lets_the_next_in() {
    current_thread_runtime().block_on(async {
        let Some(schema) = Schema::new("one") else {
            return;
        };
        let url = schema.url.clone();
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
            .try_acquire("postgres://nobody@127.0.0.1:1/none")
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
        let Some(schema) = Schema::new("taken") else {
            return;
        };
        let lease = Lease::named("loop")
            .ttl(Duration::from_millis(600))
            .schema(&schema.name)
            .try_acquire(&schema.url)
            .await
            .unwrap()
            .expect("free");
        let lost = lease.lost();
        // Another holder in the row (as after an expiry the holder did not see).
        psql(
            &schema.url,
            &format!(
                "UPDATE \"{}\".drainpool_leases SET holder = 'elsewhere', fence = fence + 1",
                schema.name
            ),
        )
        .unwrap();
        eventually(PATIENCE, "the lost token", || lost.is_cancelled()).await;
        assert!(!lease.is_held());
    });
}

#[test]
fn a_holder_cut_off_from_the_database_counts_itself_out_before_the_lease_expires() {
    current_thread_runtime().block_on(async {
        let Some(schema) = Schema::new("cut") else {
            return;
        };
        let mut proxy = Proxy::start(&schema.url).unwrap();
        let url = proxy.url.clone();
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
        let unexpired = psql(
            &schema.url,
            &format!(
                "SELECT expires_at > now() FROM \"{}\".drainpool_leases WHERE name = 'loop'",
                schema.name
            ),
        )
        .unwrap()
            == "t";
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
    let Some((_, config)) = HOLDER.worker_env() else {
        return;
    };
    // "<schema> <url>"
    let (schema, url) = config.split_once(' ').expect("the holder's configuration");
    let (schema, url) = (schema.to_owned(), url.to_owned());
    run_worker(false, async move {
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
    let Some(schema) = Schema::new("processes") else {
        return;
    };
    let config = format!("{} {}", schema.name, schema.url);
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let limit = PATIENCE;

    let mut first = HOLDER.spawn(dir, 1, &config, None).unwrap();
    first
        .wait_for(limit, "the first holder", || fence_held(dir, 1).is_some())
        .unwrap_or_else(|e| panic!("{e}; {}", output(dir, 1)));
    let mut second = HOLDER.spawn(dir, 2, &config, None).unwrap();
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
    let mut third = HOLDER.spawn(dir, 3, &config, None).unwrap();
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
