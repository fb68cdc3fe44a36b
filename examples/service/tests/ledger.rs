//! The order service as a child process, under real HTTP load and real SIGTERMs: every order
//! answered 202 must appear `shipped` in the ledger the handlers write (and its invoice, if it
//! asked for one), counting the next generation that replays the journal.
//!
//! Everything waits for a state (a line on the child's stdout, an HTTP answer, the ledger's
//! content, the child's exit), bounded; nothing sleeps and hopes.
#![cfg(unix)]

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

/// The bound on every wait for the child (start, a line, exit, the ledger).
const LIMIT: Duration = Duration::from_secs(60);
/// Client threads posting orders.
const CLIENTS: usize = 3;
/// Orders a client may post after the SIGTERM while the service still answers.
const AFTER_STOP: usize = 1000;
/// Orders accepted before the first SIGTERM.
const ACCEPTED_BEFORE_SIGTERM: usize = 200;

/// One generation of the service; killed and reaped if the test ends before it exits.
struct Service {
    child: Child,
    addr: SocketAddr,
    lines: Receiver<String>,
    stderr: PathBuf,
}

impl Service {
    fn start(dir: &Path, generation: &str, grace_seconds: &str) -> Self {
        let stderr = dir.join(format!("{generation}.stderr"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_order-service"))
            .env("ORDERS_JOURNAL_DIR", dir.join("journal"))
            .env("ORDERS_LEDGER", dir.join("ledger"))
            .env("ORDERS_ADDR", "127.0.0.1:0")
            .env("GRACE_SECONDS", grace_seconds)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
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
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            lines,
            stderr,
        };
        let first = service.line("listening on ");
        service.addr = first["listening on ".len()..].parse().expect("an address");
        service
    }

    /// Waits for the next stdout line starting with `prefix` (skipping others).
    fn line(&self, prefix: &str) -> String {
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

    fn sigterm(&self) {
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        )
        .expect("SIGTERM the service");
    }

    /// Waits for the exit, and returns its status and the report line.
    fn exit(mut self) -> (ExitStatus, String) {
        let report = self.line("stopped: ");
        let end = Instant::now() + LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status, report);
            }
            assert!(
                Instant::now() < end,
                "the service did not exit within {LIMIT:?} of its report; {}",
                self.stderr_text()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn stderr_text(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("the service's stderr:\n{text}")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP/1.1 request on a fresh connection; the status and the body.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    response(stream)
}

fn response(mut stream: TcpStream) -> std::io::Result<(u16, String)> {
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

fn order(id: &str, invoice: bool, work_ms: Option<u64>) -> String {
    serde_json::json!({ "id": id, "invoice": invoice, "work_ms": work_ms }).to_string()
}

/// Waits until `GET path` answers `status`.
fn wait_for_http(service: &Service, path: &str, status: u16) -> String {
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

/// The pool's gauge or counter `name` from `/metrics` (its series labelled `pool="orders"`).
fn metric(text: &str, name: &str) -> f64 {
    let series = format!("{name}{{pool=\"orders\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series)?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {series} in {text}"))
}

/// A count from the report line the service prints last ("stopped: replayed 3, submitted 1,
/// completed 4, ...").
fn reported(report: &str, count: &str) -> f64 {
    report
        .split(", ")
        .filter_map(|part| part.rsplit_once(' '))
        .find(|(name, _)| name.ends_with(count))
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or_else(|| panic!("no {count} in the report {report:?}"))
}

/// What the clients saw: each order's answer (an HTTP status, or 0 for no answer).
#[derive(Default)]
struct Answers {
    by_order: Mutex<BTreeMap<String, (u16, bool)>>,
    accepted: AtomicUsize,
}

impl Answers {
    fn record(&self, id: String, invoice: bool, status: u16) {
        if status == 202 {
            self.accepted.fetch_add(1, Ordering::SeqCst);
        }
        self.by_order.lock().unwrap().insert(id, (status, invoice));
    }

    /// Orders answered 202, with whether each asked for an invoice.
    fn accepted(&self) -> BTreeMap<String, bool> {
        let by_order = self.by_order.lock().unwrap();
        by_order
            .iter()
            .filter(|(_, (status, _))| *status == 202)
            .map(|(id, (_, invoice))| (id.clone(), *invoice))
            .collect()
    }

    fn tally(&self) -> BTreeMap<u16, usize> {
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
fn load(
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

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let end = Instant::now() + LIMIT;
    while !condition() {
        assert!(Instant::now() < end, "waited {LIMIT:?} in vain for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// The ledger's lines, as a set.
fn ledger(dir: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(dir.join("ledger"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// What the accepted orders still lack in the ledger.
fn missing(dir: &Path, accepted: &BTreeMap<String, bool>) -> Vec<String> {
    let ledger = ledger(dir);
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

/// Starts a generation on the same journal, waits until every accepted order shipped (and
/// invoiced), stops it with a SIGTERM, and checks that nothing is missing.
///
/// Its `/metrics` is checked against its report: once every task is done, the completed counter
/// is what the report says at exit (nothing runs in between), and the run-time histogram has
/// a sample per completed task at least.
fn second_generation_ships_the_rest(dir: &Path, accepted: &BTreeMap<String, bool>) -> String {
    let service = Service::start(dir, "gen2", "30");
    wait_until("every accepted order shipped in the ledger", || {
        missing(dir, accepted).is_empty()
    });
    let mut text = String::new();
    wait_until("every task done, in /metrics", || {
        text =
            request(service.addr, "GET", "/metrics", "").map_or_else(|_| String::new(), |(_, t)| t);
        text.contains("drainpool_tasks_completed_total")
            && metric(&text, "drainpool_tasks_completed_total")
                == metric(&text, "drainpool_tasks_replayed_total")
                    + metric(&text, "drainpool_tasks_submitted_total")
    });
    let completed = metric(&text, "drainpool_tasks_completed_total");
    assert!(completed > 0.0, "gen2 replays what gen1 spilled: {text}");
    assert!(
        metric(&text, "drainpool_task_run_seconds_count") >= completed,
        "{text}"
    );
    assert!(
        text.contains("# TYPE drainpool_task_run_seconds histogram"),
        "{text}"
    );
    service.sigterm();
    let (status, report) = service.exit();
    assert!(
        status.success(),
        "the second generation exited with {status}: {report}"
    );
    assert_eq!(
        completed,
        reported(&report, "completed"),
        "/metrics said {text}"
    );
    let lost = missing(dir, accepted);
    assert!(lost.is_empty(), "lost: {lost:?}");
    report
}

#[test]
fn every_order_answered_202_ships_across_a_sigterm() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let service = Service::start(dir.path(), "gen1", "30");
    wait_for_http(&service, "/ready", 200);
    wait_for_http(&service, "/live", 200);

    // A request held open across the SIGTERM: its headers now, its body once the pool drains.
    let held_order = order("held", false, None);
    let mut held = TcpStream::connect(service.addr).expect("connect");
    held.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        held,
        "POST /orders HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        service.addr,
        held_order.len()
    )
    .unwrap();

    // An order too large to journal.
    let big = serde_json::json!({ "id": "big", "note": "x".repeat(20_000) }).to_string();
    let (status, body) = request(service.addr, "POST", "/orders", &big).expect("POST big");
    assert_eq!(status, 413, "{body}");

    let answers = Arc::new(Answers::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(service.addr, "one", &answers, &stop);
    wait_until("orders accepted before the SIGTERM", || {
        answers.accepted.load(Ordering::SeqCst) >= ACCEPTED_BEFORE_SIGTERM
    });
    stop.store(true, Ordering::SeqCst);
    service.sigterm();
    service.line("draining");

    // The held request, finished while the pool drains: refused, not lost.
    held.write_all(held_order.as_bytes()).unwrap();
    let (status, body) = response(held).expect("the held request's answer");
    assert_eq!(status, 503, "{body}");

    for client in clients {
        client.join().expect("a client thread");
    }
    let (status, report) = service.exit();
    assert!(
        status.success(),
        "the first generation exited with {status}: {report}"
    );

    let accepted = answers.accepted();
    assert!(accepted.len() >= ACCEPTED_BEFORE_SIGTERM);
    let report2 = second_generation_ships_the_rest(dir.path(), &accepted);
    eprintln!(
        "answers {:?}; accepted {}, invoices asked {}, lost 0\n  gen1 {report}\n  gen2 {report2}",
        answers.tally(),
        accepted.len(),
        accepted.values().filter(|invoice| **invoice).count(),
    );
}

#[test]
fn a_second_sigterm_skips_the_wait_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("a temp dir");
    // A drain deadline far longer than LIMIT: only the second signal can end this one in time.
    let service = Service::start(dir.path(), "gen1", "300");
    wait_for_http(&service, "/ready", 200);

    // A slow order, running before anything else is posted: the drain would wait for it.
    let (status, body) = request(
        service.addr,
        "POST",
        "/orders",
        &order("slow", true, Some(600_000)),
    )
    .unwrap();
    assert_eq!(status, 202, "{body}");
    wait_until("the slow order running", || {
        request(service.addr, "GET", "/metrics", "")
            .is_ok_and(|(_, text)| metric(&text, "drainpool_tasks_in_flight") == 1.0)
    });

    let answers = Arc::new(Answers::default());
    answers.record("slow".into(), true, 202);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(service.addr, "two", &answers, &stop);
    wait_until("orders accepted before the SIGTERM", || {
        answers.accepted.load(Ordering::SeqCst) >= ACCEPTED_BEFORE_SIGTERM
    });
    stop.store(true, Ordering::SeqCst);
    service.sigterm();
    service.line("draining");
    service.sigterm();
    for client in clients {
        client.join().expect("a client thread");
    }
    let (status, report) = service.exit();
    assert!(
        status.success(),
        "the first generation exited with {status}: {report}"
    );
    assert!(
        !report.contains("interrupted 0,"),
        "the slow order should have been interrupted: {report}"
    );

    let accepted = answers.accepted();
    let report2 = second_generation_ships_the_rest(dir.path(), &accepted);
    eprintln!(
        "answers {:?}; accepted {}, invoices asked {}, lost 0\n  gen1 {report}\n  gen2 {report2}",
        answers.tally(),
        accepted.len(),
        accepted.values().filter(|invoice| **invoice).count(),
    );
}
