//! A dead letter survives a SIGKILL that comes right after it is written: it is fsynced when
//! written, in every durability mode.
//!
//! The test binary runs itself as the child (`child_main`, ignored unless the environment says
//! otherwise); the child fails a task permanently, prints its id once `stats()` counts it, and
//! waits to be killed.

#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use drainpool::{Permanent, Pool, Task};

const CHILD_ENV: &str = "DRAINPOOL_DEAD_LETTER_CHILD_DIR";

/// Kills and reaps the child on every path, the failing ones included.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_dead_letter_survives_a_sigkill_right_after_it_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_main",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Reaped(child);
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest may print "test child_main ... " on the same line first.
            if let Some((_, id)) = line.rsplit_once("dead ") {
                let _ = tx.send(id.to_string());
            }
        }
    });
    let id = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the child wrote its dead letter");
    let pid = rustix::process::Pid::from_raw(child.0.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );

    let contents = drainpool::journal::inspect(dir.path()).unwrap();
    let ids: Vec<String> = contents.dead.iter().map(|t| t.id.to_string()).collect();
    assert_eq!(ids, [id]);
    let error = contents.dead[0].last_error.as_deref().unwrap_or_default();
    assert!(error.contains("no such customer: c-42"), "{error}");

    let runtime = common::current_thread_runtime();
    runtime.block_on(async {
        let pool = Pool::builder()
            .journal_dir(dir.path())
            .start(|_: Task<String>| async { Ok::<(), std::io::Error>(()) })
            .await
            .unwrap();
        assert_eq!(pool.recovery().dead_letters, 1);
        assert_eq!(pool.recovery().replayed, 0);
        pool.shutdown().await.unwrap();
    });
}

/// The child: not a test of its own; it returns at once unless run by the test above.
#[test]
#[ignore = "run as a child process by a_dead_letter_survives_a_sigkill_right_after_it_is_written"]
fn child_main() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let runtime = common::current_thread_runtime();
    runtime.block_on(async move {
        let pool = Pool::builder()
            .journal_dir(dir)
            .start(|task: Task<String>| async move {
                Err::<(), drainpool::BoxError>(
                    Permanent::new(format!("no such customer: {}", task.payload())).into(),
                )
            })
            .await
            .unwrap();
        let id = pool.submit("c-42".to_string()).await.unwrap();
        while pool.stats().failed == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        println!("dead {id}");
        std::future::pending::<()>().await;
    });
}
