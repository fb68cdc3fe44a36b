//! What the tests that run a real worker process share (`signals`, `crash`): the worker is this
//! test binary started again, running only an ignored test that does nothing unless the
//! environment names a worker directory and configuration.
//!
//! The worker side: [`SelfExec::worker_env`], [`run_worker`], the append-only [`LedgerFile`]
//! and markers. The harness side: [`SelfExec::spawn`], the [`Worker`] guard that kills and
//! reaps the process whatever happened, the seeded [`Rng`], and small helpers for reading what
//! the worker left behind.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use drainpool::{Pool, State};
use rustix::process::{Pid, Signal};

// Where the tests have always found them; not every test binary uses each.
#[allow(unused_imports)]
pub use super::host::{child_of, innermost_pid, pid_namespaces};

// ---------------------------------------------------------------------------------------------
// Seeds and numbers.
// ---------------------------------------------------------------------------------------------

/// A tiny deterministic PRNG (xorshift64*).
#[derive(Debug)]
pub struct Rng(u64);

pub fn splitmix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(splitmix(seed) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    pub fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }

    pub fn sleep_ms(&mut self, lo: u64, hi: u64) {
        std::thread::sleep(Duration::from_millis(self.range(lo, hi)));
    }
}

/// A number for task `n` of a worker seeded with `seed`: the same in every process.
pub fn task_hash(seed: u64, n: u64) -> u64 {
    splitmix(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// A number from the environment, decimal or `0x` hex; `None` if unset.
pub fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={text:?} is not a number")))
}

// ---------------------------------------------------------------------------------------------
// The worker process.
// ---------------------------------------------------------------------------------------------

/// How a test binary runs itself as a worker process.
#[derive(Debug, Clone, Copy)]
pub struct SelfExec {
    /// The ignored test that is the worker.
    pub test: &'static str,
    /// The variable naming the worker's directory; its presence selects the worker.
    pub dir_var: &'static str,
    /// The variable holding the worker's configuration.
    pub config_var: &'static str,
    /// How often the harness checks whether the worker exited, while it waits for the exit.
    pub exit_poll: Duration,
    /// How often the harness checks a condition while it waits for the worker.
    pub ready_poll: Duration,
}

impl SelfExec {
    /// In the worker process, its directory and configuration; `None` in an ordinary test run.
    pub fn worker_env(&self) -> Option<(PathBuf, String)> {
        let (Some(dir), Ok(config)) = (
            std::env::var_os(self.dir_var),
            std::env::var(self.config_var),
        ) else {
            return None;
        };
        Some((PathBuf::from(dir), config))
    }

    /// Starts a worker on `dir`, its stdout and stderr in `out.<generation>` and
    /// `err.<generation>` there; under `launcher` (a program and its options, followed by this
    /// test binary) if one is given.
    pub fn spawn(
        &self,
        dir: &Path,
        generation: u32,
        config: &str,
        launcher: Option<(&str, &[&str])>,
    ) -> Result<Worker, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut command = match launcher {
            Some((program, options)) => {
                let mut command = Command::new(program);
                command.args(options).arg(&exe);
                command
            }
            None => Command::new(&exe),
        };
        let out = File::create(dir.join(format!("out.{generation}")))
            .map_err(|e| format!("stdout file: {e}"))?;
        let err = File::create(dir.join(format!("err.{generation}")))
            .map_err(|e| format!("stderr file: {e}"))?;
        let child = command
            .args([
                self.test,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(self.dir_var, dir)
            .env(self.config_var, config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawning the worker: {e}"))?;
        Ok(Worker {
            child,
            exit_poll: self.exit_poll,
            ready_poll: self.ready_poll,
        })
    }
}

/// Runs the worker process's `main` on a tokio runtime (two worker threads, or the current
/// thread) and exits with the code it returns.
pub fn run_worker(multi_thread: bool, main: impl Future<Output = i32>) -> ! {
    let runtime = if multi_thread {
        super::multi_thread_runtime()
    } else {
        super::current_thread_runtime()
    };
    let code = runtime.block_on(main);
    // Exit here: no destructors, no waiting for blocking threads.
    std::process::exit(code);
}

/// An append-only ledger file; every line goes out in one `write`.
#[derive(Debug)]
pub struct LedgerFile(Mutex<File>);

impl LedgerFile {
    pub fn open(path: &Path) -> Self {
        Self(Mutex::new(append(path)))
    }

    /// Opens a ledger, ending a line an earlier generation's SIGKILL may have cut short (a
    /// write across a page boundary can stop between pages), so that the harness sees the
    /// fragment on a line of its own.
    pub fn open_mended(path: &Path) -> Self {
        let mut file = append(path);
        let text = std::fs::read(path).expect("a ledger file");
        if text.last().is_some_and(|&b| b != b'\n') {
            file.write_all(b"\n").expect("a ledger write");
        }
        Self(Mutex::new(file))
    }

    pub fn line(&self, line: String) {
        let mut file = self.0.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(line.as_bytes()).expect("a ledger write");
    }
}

fn append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("a ledger file")
}

pub fn touch(path: &Path) {
    File::create(path).expect("a marker file");
}

/// Creates `marker` once the pool leaves `Running`.
pub fn touch_when_draining<T: Send + Sync + 'static>(pool: &Pool<T>, marker: PathBuf) {
    let mut state = pool.watch_state();
    tokio::spawn(async move {
        if state.wait_for(|s| s != State::Running).await.is_some() {
            touch(&marker);
        }
    });
}

/// Polls `run` (the pool's `run_until_signal`) once: the first poll installs the signal
/// handlers, so only then is the worker ready for a signal.
pub async fn install_signal_handlers<F>(mut run: Pin<&mut F>)
where
    F: Future,
    F::Output: std::fmt::Debug,
{
    let first = std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await;
    if let Poll::Ready(result) = first {
        panic!("run_until_signal returned at once: {result:?}");
    }
}

/// Shuts the pool down by itself, checking `every`, once the producer is `done` and nothing is
/// queued or running.
pub fn shut_down_when_empty<T: Send + Sync + 'static>(
    pool: &Pool<T>,
    done: &Arc<AtomicBool>,
    every: Duration,
) {
    let pool = pool.clone();
    let done = Arc::clone(done);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let stats = pool.stats();
            if done.load(Ordering::SeqCst) && stats.queued == 0 && stats.in_flight == 0 {
                pool.shutdown_token().cancel();
                return;
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The harness.
// ---------------------------------------------------------------------------------------------

/// A worker process that is killed (SIGKILL) and reaped when dropped, whatever happened.
#[derive(Debug)]
pub struct Worker {
    child: Child,
    exit_poll: Duration,
    ready_poll: Duration,
}

impl Worker {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (called `name` in errors) to the worker.
    pub fn signal(&self, signal: Signal, name: &str) -> Result<(), String> {
        // The child is not reaped before `wait`, so its pid cannot be reused meanwhile.
        send(self.pid(), signal, name)
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the exit, killing the worker after `limit`.
    pub fn wait(&mut self, limit: Duration) -> Result<ExitStatus, String> {
        let started = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if started.elapsed() < limit => {
                    std::thread::sleep(self.exit_poll);
                }
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!("the worker still ran after {limit:?}; killed it"));
                }
                Err(e) => return Err(format!("waiting for the worker: {e}")),
            }
        }
    }

    /// Polls `ready` until it holds, failing if the worker exits first or after `limit`.
    pub fn wait_for(
        &mut self,
        limit: Duration,
        what: &str,
        ready: impl FnMut() -> bool,
    ) -> Result<(), String> {
        self.poll(limit, what, ready)?
            .map_err(|status| format!("the worker exited ({status}) before {what}"))
    }

    /// Polls `ready` until it holds (true), or the worker exits first (false); an error after
    /// `limit`.
    pub fn wait_until(
        &mut self,
        limit: Duration,
        what: &str,
        ready: impl FnMut() -> bool,
    ) -> Result<bool, String> {
        Ok(self.poll(limit, what, ready)?.is_ok())
    }

    /// Polls `ready` until it holds (`Ok(Ok(()))`) or the worker exits (`Ok(Err(status))`); an
    /// error after `limit`.
    fn poll(
        &mut self,
        limit: Duration,
        what: &str,
        mut ready: impl FnMut() -> bool,
    ) -> Result<Result<(), ExitStatus>, String> {
        let started = Instant::now();
        loop {
            if ready() {
                return Ok(Ok(()));
            }
            if let Some(status) = self.exited() {
                return Ok(Err(status));
            }
            if started.elapsed() > limit {
                return Err(format!("no {what} after {limit:?}"));
            }
            std::thread::sleep(self.ready_poll);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // Under `unshare --kill-child`, its child dies with it.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Sends `signal` (called `name` in errors) to process `pid`.
pub fn send(pid: u32, signal: Signal, name: &str) -> Result<(), String> {
    let target = Pid::from_raw(pid as i32).ok_or("pid 0")?;
    rustix::process::kill_process(target, signal).map_err(|e| format!("{name} to {pid}: {e}"))
}

/// The last words of the workers of generations `1..=generations` in `dir`: the tails of their
/// stdout and stderr, and the whole of `<extra>.<generation>` if `extra` names one more file.
pub fn last_words(dir: &Path, generations: u32, extra: Option<&str>) -> String {
    let mut text = String::new();
    for generation in 1..=generations {
        let err = read(&dir.join(format!("err.{generation}")));
        let out = read(&dir.join(format!("out.{generation}")));
        let extra = extra
            .map(|name| read(&dir.join(format!("{name}.{generation}"))))
            .unwrap_or_default();
        if !err.is_empty() || !out.is_empty() || !extra.is_empty() {
            text.push_str(&format!(
                "\n--- generation {generation} stdout:\n{}\n--- stderr:\n{}{extra}",
                tail(&out, 8),
                tail(&err, 15)
            ));
        }
    }
    text
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// What a worker printed after `key` on a line of the file at `path` (its stdout), trimmed;
/// libtest may have printed the test's name on the same line, before it.
pub fn said(path: &Path, key: &str) -> Option<String> {
    read(path)
        .lines()
        .find_map(|l| l.split_once(key).map(|(_, value)| value.trim().to_string()))
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The number `key` of a `key=value` map.
pub fn field(map: &HashMap<String, String>, key: &str) -> Result<u64, String> {
    map.get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no number {key} in {map:?}"))
}

/// How many task numbers, and the first 20.
pub fn describe(set: &BTreeSet<u64>) -> String {
    let shown: Vec<String> = set.iter().take(20).map(u64::to_string).collect();
    let more = if set.len() > 20 { ", ..." } else { "" };
    format!("{} [{}{more}]", set.len(), shown.join(", "))
}
