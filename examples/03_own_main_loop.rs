//! A service that owns its main loop: one signal future stops both the server and the pool.
//!
//! `drainpool::shutdown_signal()` installs the SIGTERM/SIGINT handlers and resolves at the
//! first signal (a second exits at once). Here its result cancels a `CancellationToken` that
//! the service's own loop watches and that the pool was given with `shutdown_token`, the way
//! `axum::serve(..).with_graceful_shutdown(..)` would be wired. The pool's state doubles as the
//! readiness probe: ready only while `Running`.
//!
//! Run it with `cargo run --example 03_own_main_loop`, then press Ctrl-C (or send SIGTERM); it
//! stops by itself after ten seconds otherwise.

use std::time::Duration;

use drainpool::{BoxError, Pool, State, Task};
use tokio_util::sync::CancellationToken;

#[cfg(unix)]
#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let shutdown = CancellationToken::new();
    let signal = drainpool::shutdown_signal()?;
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                received = signal.received() => println!("{received}: stopping"),
                () = tokio::time::sleep(Duration::from_secs(10)) => println!("ten seconds: stopping"),
            }
            shutdown.cancel();
        }
    });

    let dir = tempfile::tempdir()?;
    let pool = Pool::builder()
        .journal_dir(dir.path())
        .shutdown_token(shutdown.clone())
        .start(|task: Task<u64>| async move {
            tokio::time::sleep(Duration::from_millis(*task.payload())).await;
            Ok::<(), BoxError>(())
        })
        .await?;

    // The service's own loop: here, a producer that stops at the same token.
    let mut n = 0u64;
    while !shutdown.is_cancelled() {
        let ready = pool.state() == State::Running;
        if ready && pool.try_submit(n % 50).is_ok() {
            n += 1;
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }

    let report = pool.wait().await?;
    println!(
        "accepted {}, completed {}, journaled {} for the next start",
        report.submitted,
        report.completed,
        report.spilled + report.interrupted
    );
    std::process::exit(if report.is_clean() { 0 } else { 1 });
}

#[cfg(not(unix))]
fn main() {
    println!("shutdown_signal catches SIGTERM and SIGINT on Unix only");
}
