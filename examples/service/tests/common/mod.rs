//! What the service's process tests share (`ledger.rs`, `deploy.rs`): the order service as a
//! child process ([`Service`], killed and reaped on every path), HTTP/1.1 by hand on fresh
//! connections, the clients that keep posting orders, and the ledger verdict (every order
//! answered 202 shipped, and invoiced if it asked). The CI rule and PID namespaces are the
//! root package's test helpers, `tests/common/host.rs`.
//!
//! Everything waits for a state (a line on the child's stdout, an HTTP answer, the ledger's
//! content, the child's exit), bounded; nothing sleeps and hopes.

#![allow(dead_code, unreachable_pub)]

#[path = "../../../../tests/common/host.rs"]
pub mod host;
// The root package's PostgreSQL helpers (a schema of the test's own, psql), for the Deployment.
#[path = "../../../../tests/common/pg.rs"]
pub mod pg;
// Where `pg` looks for them.
pub use host::{in_ci, require};

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// The bound on every wait for the child (start, a line, exit, the ledger).
pub const LIMIT: Duration = Duration::from_secs(60);
/// Client threads posting orders.
pub const CLIENTS: usize = 3;
/// Orders a client may post after the SIGTERM while the service still answers.
pub const AFTER_STOP: usize = 1000;

/// The files one service works on: its journal directory and its ledger.
#[derive(Debug, Clone)]
pub struct Files {
    pub journal: PathBuf,
    pub ledger: PathBuf,
}

impl Files {
    /// `journal` and `ledger` in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            journal: dir.join("journal"),
            ledger: dir.join("ledger"),
        }
    }

    /// The order service's command on these files, listening on a free port; under
    /// `launcher` (a program and its options, followed by the service) if one is given.
    pub fn command(&self, launcher: Option<(&str, &[&str])>) -> Command {
        let service = env!("CARGO_BIN_EXE_order-service");
        let mut command = match launcher {
            Some((program, options)) => {
                let mut command = Command::new(program);
                command.args(options).arg(service);
                command
            }
            None => Command::new(service),
        };
        command
            .env("ORDERS_JOURNAL_DIR", &self.journal)
            .env("ORDERS_LEDGER", &self.ledger)
            .env("ORDERS_ADDR", "127.0.0.1:0")
            .env_remove("GRACE_SECONDS")
            .env_remove("PRE_STOP_SECONDS");
        command
    }
}

/// One generation of the service; killed and reaped if the test ends before it exits.
pub struct Service {
    child: Child,
    /// The process signals go to: the child, or under `unshare` the child's child (PID 1 of
    /// its namespace).
    target: u32,
    pub addr: SocketAddr,
    lines: Receiver<String>,
    stderr: PathBuf,
}

/// How a generation ended.
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    /// The report line (`stopped: ...`), if it printed one.
    pub report: Option<String>,
    /// Whether it had to be killed, still running at the deadline it was given.
    pub killed: bool,
}

impl Service {
    /// A generation on `dir`'s journal and ledger, with `GRACE_SECONDS`.
    pub fn start(dir: &Path, generation: &str, grace_seconds: &str) -> Self {
        let mut command = Files::in_dir(dir).command(None);
        command.env("GRACE_SECONDS", grace_seconds);
        Self::spawn(command, &dir.join(format!("{generation}.stderr")))
    }

    /// Starts `command` (the order service, or a launcher of it), its stderr in `stderr`, and
    /// waits for its `listening on` line.
    pub fn spawn(mut command: Command, stderr: &Path) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(stderr).expect("stderr file"))
            .spawn()
            .expect("start the order service");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut service = Self {
            target: child.id(),
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            lines,
            stderr: stderr.to_path_buf(),
        };
        let first = service.line("listening on ");
        service.addr = first["listening on ".len()..].parse().expect("an address");
        service
    }

    /// The child's pid (under a launcher, the launcher's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends signals to `pid` from now on (the service under a launcher).
    pub fn signal_to(&mut self, pid: u32) {
        self.target = pid;
    }

    /// Waits for the next stdout line starting with `prefix` (skipping others).
    pub fn line(&self, prefix: &str) -> String {
        let end = Instant::now() + LIMIT;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no line {prefix:?} in {LIMIT:?}; {}", self.stderr_text())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "stdout closed before a line {prefix:?}; {}",
                        self.stderr_text()
                    )
                }
            }
        }
    }

    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.target as i32).expect("a pid");
        rustix::process::kill_process(pid, signal)
            .unwrap_or_else(|e| panic!("{signal:?} to the service ({}): {e}", self.target));
    }

    /// SIGKILL, if the process is still there to get it.
    pub fn kill(&self) {
        if let Some(pid) = Pid::from_raw(self.target as i32) {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
    }

    pub fn sigterm(&self) {
        self.signal(Signal::TERM);
    }

    /// Waits for the exit until `deadline`; past it, `kill` (an orchestrator's SIGKILL) and
    /// then the exit. The report line is the last `stopped: ` line the service printed.
    pub fn exit_by(mut self, deadline: Instant, kill: impl FnOnce(&Self)) -> Exit {
        let mut killed = false;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                killed = true;
                kill(&self);
                break self.child.wait().expect("wait");
            }
            thread::sleep(Duration::from_millis(5));
        };
        // The process is gone: its stdout ends once the reader has the rest.
        let end = Instant::now() + LIMIT;
        let mut report = None;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with("stopped: ") => report = Some(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("stdout still open {LIMIT:?} after the exit")
                }
            }
        }
        Exit {
            status,
            report,
            killed,
        }
    }

    /// Waits for the exit (within [`LIMIT`]), and returns its status and the report line.
    pub fn exit(self) -> (ExitStatus, String) {
        let stderr = self.stderr.clone();
        let exit = self.exit_by(Instant::now() + LIMIT, |service| {
            let _ = rustix::process::kill_process(Pid::from_child(&service.child), Signal::KILL);
        });
        let stderr = std::fs::read_to_string(stderr).unwrap_or_default();
        assert!(
            !exit.killed,
            "the service did not exit within {LIMIT:?}; its stderr:\n{stderr}"
        );
        let report = exit.report.unwrap_or_else(|| {
            panic!(
                "the service printed no report ({}); its stderr:\n{stderr}",
                exit.status
            )
        });
        (exit.status, report)
    }

    pub fn stderr_text(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("the service's stderr:\n{text}")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Under `unshare --kill-child`, its child dies with it.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP/1.1 request on a fresh connection; the status and the body.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "{}{body}", head(addr, method, path, body.len()))?;
    response(stream)
}

/// A request's head, for a body of `len` bytes.
pub fn head(addr: SocketAddr, method: &str, path: &str, len: usize) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {len}\r\nConnection: close\r\n\r\n"
    )
}

pub fn response(mut stream: TcpStream) -> std::io::Result<(u16, String)> {
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

pub fn order(id: &str, invoice: bool, work_ms: Option<u64>) -> String {
    serde_json::json!({ "id": id, "invoice": invoice, "work_ms": work_ms }).to_string()
}

/// Waits until `GET path` answers `status`.
pub fn wait_for_http(service: &Service, path: &str, status: u16) -> String {
    let end = Instant::now() + LIMIT;
    loop {
        if let Ok((got, body)) = request(service.addr, "GET", path, "")
            && got == status
        {
            return body;
        }
        assert!(
            Instant::now() < end,
            "GET {path} never answered {status}; {}",
            service.stderr_text()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// What the clients saw: each order's answer (an HTTP status, or 0 for no answer).
#[derive(Default)]
pub struct Answers {
    by_order: Mutex<BTreeMap<String, (u16, bool)>>,
    pub accepted: AtomicUsize,
}

impl Answers {
    pub fn record(&self, id: String, invoice: bool, status: u16) {
        if status == 202 {
            self.accepted.fetch_add(1, Ordering::SeqCst);
        }
        self.by_order.lock().unwrap().insert(id, (status, invoice));
    }

    /// How many orders were answered 202 so far.
    pub fn accepted_count(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Orders answered 202, with whether each asked for an invoice.
    pub fn accepted(&self) -> BTreeMap<String, bool> {
        let by_order = self.by_order.lock().unwrap();
        by_order
            .iter()
            .filter(|(_, (status, _))| *status == 202)
            .map(|(id, (_, invoice))| (id.clone(), *invoice))
            .collect()
    }

    pub fn tally(&self) -> BTreeMap<u16, usize> {
        let mut tally = BTreeMap::new();
        for (status, _) in self.by_order.lock().unwrap().values() {
            *tally.entry(*status).or_default() += 1;
        }
        tally
    }
}

/// Client threads posting orders `{prefix}-c{client}-{n}` (every third asks for an invoice)
/// until `stop` is set and then until the service refuses (a 503, or no connection), at most
/// `AFTER_STOP` more each.
pub fn load(
    addr: SocketAddr,
    prefix: &str,
    answers: &Arc<Answers>,
    stop: &Arc<AtomicBool>,
) -> Vec<thread::JoinHandle<()>> {
    (0..CLIENTS)
        .map(|client| {
            let (answers, stop, prefix) = (answers.clone(), stop.clone(), prefix.to_string());
            thread::spawn(move || {
                let mut after_stop = 0;
                for n in 0.. {
                    let id = format!("{prefix}-c{client}-{n}");
                    let invoice = n % 3 == 0;
                    let answer = request(addr, "POST", "/orders", &order(&id, invoice, None));
                    let status = answer.as_ref().map_or(0, |(status, _)| *status);
                    answers.record(id, invoice, status);
                    if stop.load(Ordering::SeqCst) {
                        after_stop += 1;
                        if status == 503 || answer.is_err() || after_stop >= AFTER_STOP {
                            break;
                        }
                    }
                }
            })
        })
        .collect()
}

pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let end = Instant::now() + LIMIT;
    while !condition() {
        assert!(Instant::now() < end, "waited {LIMIT:?} in vain for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// The ledger's lines, as a set.
pub fn ledger(path: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// What the accepted orders still lack in the ledger at `path`.
pub fn missing(path: &Path, accepted: &BTreeMap<String, bool>) -> Vec<String> {
    let ledger = ledger(path);
    let mut missing = Vec::new();
    for (id, invoice) in accepted {
        for line in [
            Some(format!("shipped {id}")),
            invoice.then(|| format!("invoiced {id}")),
        ]
        .into_iter()
        .flatten()
        {
            if !ledger.contains(&line) {
                missing.push(line);
            }
        }
    }
    missing
}

/// With `service`, a generation on the same journal, waits until every accepted order shipped
/// (and invoiced) in the ledger at `ledger`, stops it with a SIGTERM, and checks that nothing
/// is missing. Returns its report.
pub fn ships_the_rest(
    service: Service,
    ledger: &Path,
    accepted: &BTreeMap<String, bool>,
) -> String {
    wait_until("every accepted order shipped in the ledger", || {
        missing(ledger, accepted).is_empty()
    });
    service.sigterm();
    let (status, report) = service.exit();
    assert!(
        status.success(),
        "the next generation exited with {status}: {report}"
    );
    let lost = missing(ledger, accepted);
    assert!(lost.is_empty(), "lost: {lost:?}");
    report
}

/// The line a round ends with: the answers, the accepted orders, lost 0, and the reports.
pub fn summary(answers: &Answers, reports: &[(&str, &str)]) -> String {
    let accepted = answers.accepted();
    let mut text = format!(
        "answers {:?}; accepted {}, invoices asked {}, lost 0",
        answers.tally(),
        accepted.len(),
        accepted.values().filter(|invoice| **invoice).count(),
    );
    for (name, report) in reports {
        text.push_str(&format!("\n  {name} {report}"));
    }
    text
}
