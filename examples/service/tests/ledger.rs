//! The order service as a child process, under real HTTP load and real SIGTERMs: every order
//! answered 202 must appear `shipped` in the ledger the handlers write (and its invoice, if it
//! asked for one), counting the next generation that replays the journal.
//!
//! Everything waits for a state (a line on the child's stdout, an HTTP answer, the ledger's
//! content, the child's exit), bounded; nothing sleeps and hopes.
#![cfg(unix)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{
    Answers, LIMIT, Service, head, load, order, request, response, ships_the_rest, summary,
    wait_for_http, wait_until,
};

/// Orders accepted before the first SIGTERM.
const ACCEPTED_BEFORE_SIGTERM: usize = 200;

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

/// Waits until `service` has run every task it replayed or accepted, by its `/metrics`, and
/// checks the series: the run-time histogram has a sample per completed task at least. Returns
/// the completed counter, which the report at exit must repeat (nothing runs in between).
fn all_done_by_metrics(service: &Service) -> f64 {
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
    assert!(
        completed > 0.0,
        "the next generation replays the spill: {text}"
    );
    assert!(
        metric(&text, "drainpool_task_run_seconds_count") >= completed,
        "{text}"
    );
    assert!(
        text.contains("# TYPE drainpool_task_run_seconds histogram"),
        "{text}"
    );
    completed
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
        "{}",
        head(service.addr, "POST", "/orders", held_order.len())
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
        answers.accepted_count() >= ACCEPTED_BEFORE_SIGTERM
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
    let next = Service::start(dir.path(), "gen2", "30");
    let completed = all_done_by_metrics(&next);
    let report2 = ships_the_rest(next, &dir.path().join("ledger"), &accepted);
    assert_eq!(completed, reported(&report2, "completed"), "{report2}");
    eprintln!(
        "{}",
        summary(&answers, &[("gen1", &report), ("gen2", &report2)])
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
        answers.accepted_count() >= ACCEPTED_BEFORE_SIGTERM
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
    let next = Service::start(dir.path(), "gen2", "30");
    let report2 = ships_the_rest(next, &dir.path().join("ledger"), &accepted);
    eprintln!(
        "{}",
        summary(&answers, &[("gen1", &report), ("gen2", &report2)])
    );
}
