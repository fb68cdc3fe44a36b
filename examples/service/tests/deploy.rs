//! The recipes in `deploy/`, each played with the order service as a real child process, real
//! HTTP load and real signals. A test reads the recipe's numbers from its file (a few fields, by
//! line scanning; a missing field fails the test, named), checks that the values the recipe
//! must repeat agree (the grace period and `GRACE_SECONDS`, the preStop sleep and
//! `PRE_STOP_SECONDS`), runs the service as the recipe says, stops it the way the orchestrator
//! does, starts the next generation on the same directory, and takes its verdict from the
//! ledger the handlers write: every order answered 202 was shipped (and invoiced, if it asked),
//! lost = 0. The stop must also end inside the grace period by itself: a SIGKILL from the
//! played orchestrator fails the test, since the recipe's numbers then do not add up.
//!
//! Each round has a slow order running when the stop begins, which outlasts the drain deadline
//! and then the cancel grace (it takes longer to wind down than the pool gives it): the stop
//! spends its whole budget, the worst case the recipe's numbers must cover, and the order is
//! dropped at the hard stop, journaled as interrupted, and shipped by the next generation.
//!
//! **Time scale.** The recipes' grace periods (30 s, 30 s, 10 s) are too long for a test meant to
//! take seconds, so each is played as [`PLAYED_GRACE`] (10 s): the recipe's seconds (the grace
//! period, the preStop sleep, the readiness probe's period) are divided by `grace / 10 s`, and
//! the service is given the scaled values (`GRACE_SECONDS`, `PRE_STOP_SECONDS`), from which it
//! derives its drain deadline. What does not scale is played at full length (the service's
//! HTTP linger, 1 s, the cancel grace, 2 s, the spill itself) while the pool's safety margin
//! (5% of what the grace period leaves) shrinks with the scale, so the played stop is a
//! tighter fit than the recipe's own: if it ends in time, so does the real one. Each test
//! prints its scale; `DEPLOY_REAL_TIME=1` plays the recipes' own seconds (about 40 s).
//!
//! Waiting is for states (the service's `listening on` and `draining` lines, HTTP answers, the
//! ledger, the exit), bounded; the sleeps are the recipe's timing (the preStop, the probe
//! period), not synchronisation.
#![cfg(unix)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::host::{child_of, innermost_pid, pid_namespaces, require, say};
use common::{
    Answers, Files, LIMIT, Service, head, ledger, load, order, request, response, ships_the_rest,
    summary, wait_for_http, wait_until,
};
use rustix::process::{Pid, Signal};

/// How long a recipe's grace period lasts when played.
const PLAYED_GRACE: Duration = Duration::from_secs(10);
/// Orders accepted before the stop begins.
const ACCEPTED_BEFORE_STOP: usize = 100;
/// `docker stop`'s timeout when none is given (`--time`, `--stop-timeout`).
const DOCKER_STOP_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Reading a recipe.
// ---------------------------------------------------------------------------------------------

/// A recipe file in `deploy/`, and the fields the tests read from it.
struct Recipe {
    path: PathBuf,
    text: String,
}

impl Recipe {
    fn read(relative: &str) -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy")
            .join(relative);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("the recipe {}: {e}", path.display()));
        Self { path, text }
    }

    #[track_caller]
    fn missing(&self, what: &str) -> ! {
        panic!(
            "{}: no {what}; the test reads it from the recipe (one `key: value` or `Key=value` \
             a line)",
            self.path.display()
        )
    }

    /// Fails unless a line starts with `prefix` (a key without a value, say).
    #[track_caller]
    fn has(&self, prefix: &str) {
        if !self.content().any(|line| line.starts_with(prefix)) {
            self.missing(&format!("`{prefix}`"));
        }
    }

    /// The lines that are not blank and not comments, each without a trailing comment.
    fn content(&self) -> impl Iterator<Item = &str> {
        self.text
            .lines()
            .map(|line| {
                line.split_once(" #")
                    .map_or(line, |(before, _)| before)
                    .trim()
            })
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
    }

    /// YAML: the value of the first `key:` line at or after the first line containing
    /// `anchor`, within the next 12 lines (quotes taken off).
    #[track_caller]
    fn yaml(&self, anchor: &str, key: &str) -> String {
        self.yaml_if_any(anchor, key)
            .unwrap_or_else(|| self.missing(&format!("`{key}:` after `{anchor}`")))
    }

    /// As [`yaml`](Self::yaml), for a field the recipe may leave out.
    fn yaml_if_any(&self, anchor: &str, key: &str) -> Option<String> {
        self.content()
            .skip_while(|line| !line.contains(anchor))
            .take(12)
            .find_map(|line| {
                let line = line.strip_prefix("- ").unwrap_or(line);
                line.strip_prefix(key)?.strip_prefix(':').map(str::trim)
            })
            .filter(|value| !value.is_empty())
            .map(|value| unquote(value).to_string())
    }

    /// YAML: the value the container's environment gives `name`.
    #[track_caller]
    fn yaml_env(&self, name: &str) -> String {
        self.yaml(&format!("name: {name}"), "value")
    }

    /// The value `pick` finds in the last line it finds one in (the one that counts), quotes
    /// taken off; `what` names it if there is none.
    #[track_caller]
    fn last<'a>(&'a self, what: &str, pick: impl FnMut(&'a str) -> Option<&'a str>) -> String {
        self.content()
            .filter_map(pick)
            .last()
            .map(|value| unquote(value).to_string())
            .unwrap_or_else(|| self.missing(what))
    }

    /// systemd's `Key=value` (`separator` `=`) or a Dockerfile's `INSTRUCTION value`
    /// (`separator` a space): the value.
    #[track_caller]
    fn field(&self, key: &str, separator: char) -> String {
        self.last(&format!("`{key}{separator}`"), |line| {
            line.strip_prefix(key)?.strip_prefix(separator)
        })
    }

    /// The value the environment lines (systemd's `Environment=`, a Dockerfile's `ENV `, as
    /// `line`) give `name`, from its `name=value`.
    #[track_caller]
    fn env(&self, line: &str, name: &str) -> String {
        self.last(&format!("`{line}{name}=`"), |text| {
            text.strip_prefix(line)?
                .split_whitespace()
                .find_map(|assignment| assignment.strip_prefix(name)?.strip_prefix('='))
        })
    }

    /// A number of seconds (`30`, `"30"`, `30s`), or the test fails naming the field.
    #[track_caller]
    fn seconds(&self, field: &str, value: &str) -> Duration {
        value
            .strip_suffix('s')
            .unwrap_or(value)
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .unwrap_or_else(|| {
                panic!(
                    "{}: {field} = {value:?} is not a number of seconds",
                    self.path.display()
                )
            })
    }

    /// The seconds in `field`, a `(name, value)`, which `again` must repeat (the recipe's
    /// format cannot pass one to the other).
    #[track_caller]
    fn same(&self, field: (&str, &str), again: (&str, &str)) -> Duration {
        let seconds = self.seconds(field.0, field.1);
        assert_eq!(
            self.seconds(again.0, again.1),
            seconds,
            "{}: {} must be {}",
            self.path.display(),
            again.0,
            field.0
        );
        seconds
    }

    /// The journal directory and the ledger the recipe gives the service, both strictly below
    /// `dir` (as the recipe names them), relative to it.
    #[track_caller]
    fn files_below(&self, journal: &str, ledger: &str, dir: &str) -> (PathBuf, PathBuf) {
        (
            self.below("ORDERS_JOURNAL_DIR", journal, dir),
            self.below("ORDERS_LEDGER", ledger, dir),
        )
    }

    /// `path`, which must lie strictly below `dir` (both as the recipe names them), relative
    /// to `dir`.
    #[track_caller]
    fn below(&self, what: &str, path: &str, dir: &str) -> PathBuf {
        let relative = Path::new(path)
            .strip_prefix(dir)
            .ok()
            .filter(|r| !r.as_os_str().is_empty())
            .unwrap_or_else(|| {
                panic!(
                    "{}: {what} {path:?} must be a subdirectory of {dir:?} (a journal directory \
                     must be the pool's alone, the volume's root may not be)",
                    self.path.display()
                )
            });
        relative.to_path_buf()
    }

    /// A Kubernetes pod's grace period and preStop sleep, each checked against the variable
    /// that repeats it for the service (`GRACE_SECONDS`, `PRE_STOP_SECONDS`).
    #[track_caller]
    fn pod_timing(&self) -> (Duration, Duration) {
        let grace_field = "terminationGracePeriodSeconds";
        let grace = self.same(
            (grace_field, &self.yaml(grace_field, grace_field)),
            ("GRACE_SECONDS", &self.yaml_env("GRACE_SECONDS")),
        );
        let pre_stop = self.same(
            ("the preStop sleep", &self.yaml("preStop:", "seconds")),
            ("PRE_STOP_SECONDS", &self.yaml_env("PRE_STOP_SECONDS")),
        );
        (grace, pre_stop)
    }
}

fn unquote(value: &str) -> &str {
    value.trim().trim_matches('"').trim_matches('\'')
}

// ---------------------------------------------------------------------------------------------
// Playing time.
// ---------------------------------------------------------------------------------------------

/// The factor a recipe's seconds are divided by.
struct Scale(f64);

impl Scale {
    /// The scale that plays `grace` as `PLAYED_GRACE`, or 1 with `DEPLOY_REAL_TIME=1`; says
    /// how `name`'s `fields` (the grace period first) are played.
    fn announce(name: &str, fields: &[(&str, Duration)]) -> Self {
        let real = std::env::var("DEPLOY_REAL_TIME").is_ok_and(|v| v.trim() == "1");
        let grace = fields[0].1;
        let scale = if real {
            Self(1.0)
        } else {
            Self((grace.as_secs_f64() / PLAYED_GRACE.as_secs_f64()).max(1.0))
        };
        let played: Vec<String> = fields
            .iter()
            .map(|(field, d)| format!("{field} {d:.1?} as {:.2?}", scale.play(*d)))
            .collect();
        say(&format!(
            "{name}: time scale 1/{:.2}: {}",
            scale.0,
            played.join(", ")
        ));
        scale
    }

    fn play(&self, recipe: Duration) -> Duration {
        recipe.div_f64(self.0)
    }

    /// A played duration as the service reads it from the environment.
    fn env(&self, recipe: Duration) -> String {
        format!("{:.3}", self.play(recipe).as_secs_f64())
    }
}

// ---------------------------------------------------------------------------------------------
// A generation under load, and its stop.
// ---------------------------------------------------------------------------------------------

/// Where the generations of one test run: a temporary directory holding the recipe's
/// directory (a volume, a state directory) and the generations' stderr files.
struct Stage {
    dir: tempfile::TempDir,
    /// The recipe's directory.
    root: PathBuf,
    files: Files,
}

impl Stage {
    /// `root` (relative, made `mode` if given) in a fresh temporary directory, with the journal
    /// and the ledger at `journal` and `ledger` below it.
    fn new(root: &str, mode: Option<u32>, journal: &Path, ledger: &Path) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let root = dir.path().join(root);
        std::fs::create_dir_all(&root).unwrap();
        if let Some(mode) = mode {
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let files = Files {
            journal: root.join(journal),
            ledger: root.join(ledger),
        };
        Self { dir, root, files }
    }

    /// Starts `command` as `generation`, its stderr in `<generation>.stderr`.
    fn spawn(&self, command: std::process::Command, generation: &str) -> Service {
        Service::spawn(command, &self.stderr(generation))
    }

    fn stderr(&self, generation: &str) -> PathBuf {
        self.dir.path().join(format!("{generation}.stderr"))
    }
}

/// A generation at work: a slow order running, clients posting orders.
struct Busy {
    service: Service,
    answers: Arc<Answers>,
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<()>>,
}

/// Posts the slow order (it outlasts any drain deadline here, and then the cancel grace: it
/// stops only when the pool drops it at the hard stop), starts the clients, and waits
/// until `ACCEPTED_BEFORE_STOP` orders were accepted and one of the clients' orders shipped:
/// the queue is first in, first out, so the slow order, posted first, is running by then.
fn busy(service: Service, prefix: &str, ledger_path: &Path) -> Busy {
    let slow = serde_json::json!({ "id": "slow", "work_ms": 600_000, "wind_down_ms": 600_000 });
    let slow = slow.to_string();
    let (status, body) = request(service.addr, "POST", "/orders", &slow).expect("POST slow");
    assert_eq!(status, 202, "{body}");
    let answers = Arc::new(Answers::default());
    answers.record("slow".into(), false, 202);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(service.addr, prefix, &answers, &stop);
    let shipped = format!("shipped {prefix}-");
    wait_until("orders accepted, and the slow one running", || {
        answers.accepted_count() > ACCEPTED_BEFORE_STOP
            && ledger(ledger_path).iter().any(|l| l.starts_with(&shipped))
    });
    Busy {
        service,
        answers,
        stop,
        clients,
    }
}

impl Busy {
    /// SIGTERM, now; returns when the service says it is draining. The clients go on until
    /// they are refused.
    fn sigterm(&self) -> Instant {
        let sent = Instant::now();
        self.service.sigterm();
        self.stop.store(true, Ordering::SeqCst);
        self.service.line("draining");
        sent
    }

    /// Waits for the exit until `deadline` (`played` after the orchestrator began), and
    /// `kill`s the service then. Returns the clients' answers once they are done, and the
    /// generation's report, which must show a stop that ended by itself, with success, and
    /// the slow order interrupted at the drain deadline.
    fn stopped(
        self,
        deadline: Instant,
        kill: impl FnOnce(&Service),
        recipe: &str,
        played: Duration,
    ) -> (Arc<Answers>, String, Instant) {
        let exit = self.service.exit_by(deadline, kill);
        let at = Instant::now();
        for client in self.clients {
            client.join().expect("a client thread");
        }
        assert!(
            !exit.killed,
            "{recipe}: the service outlived its played grace period ({played:?}) and was \
             SIGKILLed: the recipe's numbers (or the service's sum of them) do not add up \
             (report: {:?})",
            exit.report
        );
        let report = exit.report.expect("the report line");
        assert!(exit.status.success(), "exit {}: {report}", exit.status);
        assert!(
            interrupted(&report) >= 1,
            "the slow order should have been interrupted at the drain deadline: {report}"
        );
        (self.answers, report, at)
    }
}

/// The `interrupted N` of a report line.
fn interrupted(report: &str) -> u64 {
    report
        .split(", ")
        .find_map(|part| part.strip_prefix("interrupted ")?.parse().ok())
        .unwrap_or_else(|| panic!("no `interrupted N` in {report:?}"))
}

/// A request held open from before the stop: its head sent, its end not yet.
fn hold(service: &Service, head: &str) -> TcpStream {
    let mut stream = TcpStream::connect(service.addr).expect("connect");
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    stream
}

/// The next generation ships what the first accepted; prints how the stop went (`stop`) and
/// the round's summary.
fn next_generation_ships_the_rest(
    next: Service,
    ledger_path: &Path,
    answers: &Answers,
    first: &str,
    stop: &str,
) {
    let accepted: BTreeMap<String, bool> = answers.accepted();
    let second = ships_the_rest(next, ledger_path, &accepted);
    eprintln!(
        "{stop}\n{}",
        summary(answers, &[("gen1", first), ("gen2", &second)])
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes: deploy/kubernetes/statefulset.yaml.
// ---------------------------------------------------------------------------------------------

/// The kubelet's volume ownership pass for `fsGroup` (its group played by ours), at each
/// mount: every directory gets `g+rwx` and setgid, every file `g+rw`, recursively; with
/// `fsGroupChangePolicy: OnRootMismatch`, only while the volume's root lacks them. Nothing
/// without an `fsGroup` (`policy` is `None`).
fn kubelet_mounts(volume: &Path, policy: Option<&str>) {
    const DIR_BITS: u32 = 0o2770;
    let root = std::fs::metadata(volume).unwrap().permissions().mode();
    match policy {
        None => return,
        Some("OnRootMismatch") if root & DIR_BITS == DIR_BITS => return,
        Some(_) => {}
    }
    fn walk(path: &Path) {
        let meta = std::fs::symlink_metadata(path).unwrap();
        let (mode, bits) = (meta.permissions().mode(), 0o660);
        if meta.is_dir() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | DIR_BITS))
                .unwrap();
            for entry in std::fs::read_dir(path).unwrap() {
                walk(&entry.unwrap().path());
            }
        } else if meta.is_file() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | bits)).unwrap();
        }
    }
    walk(volume);
}

/// The kubelet and the StatefulSet recipe: the pod's volume (with the recipe's fsGroup policy
/// played on every mount), readiness before traffic, then the pod's deletion: the preStop
/// sleep while traffic goes on and readiness is still polled (200 throughout), SIGTERM,
/// traffic still going on (503 or refused from then on, and a held `GET /ready` answered 503),
/// a `POST /orders` held open with its body never sent (the HTTP linger must keep it from
/// costing the grace period), the wait for the exit until the grace period ends (SIGKILL
/// then, which fails the test), and the next pod on the same volume.
#[test]
fn kubelet_plays_the_statefulset() {
    let recipe = Recipe::read("kubernetes/statefulset.yaml");
    assert_eq!(
        recipe.yaml("clusterIP", "clusterIP"),
        "None",
        "a headless Service"
    );
    recipe.has("volumeClaimTemplates:");
    let (grace, pre_stop) = recipe.pod_timing();
    assert!(
        pre_stop < grace,
        "the preStop sleep takes the whole grace period"
    );
    assert_eq!(recipe.yaml("readinessProbe", "path"), "/ready");
    assert_eq!(recipe.yaml("livenessProbe", "path"), "/live");
    let probe_field = recipe.yaml("readinessProbe", "periodSeconds");
    let probe_period = recipe.seconds("readinessProbe periodSeconds", &probe_field);
    // With an fsGroup, the kubelet's ownership pass at each mount (Always by default).
    let policy = recipe.yaml_if_any("fsGroup:", "fsGroup").map(|_| {
        recipe
            .yaml_if_any("fsGroupChangePolicy", "fsGroupChangePolicy")
            .unwrap_or_else(|| "Always".into())
    });
    let mount = recipe.yaml("volumeMounts", "mountPath");
    let (journal, ledger_file) = recipe.files_below(
        &recipe.yaml_env("ORDERS_JOURNAL_DIR"),
        &recipe.yaml_env("ORDERS_LEDGER"),
        &mount,
    );

    let scale = Scale::announce(
        "kubelet",
        &[
            ("grace", grace),
            ("preStop", pre_stop),
            ("readiness period", probe_period),
        ],
    );
    let (played_grace, played_pre_stop) = (scale.play(grace), scale.play(pre_stop));
    let played_period = scale.play(probe_period);

    let stage = Stage::new("volume", None, &journal, &ledger_file);
    let pod = |generation: &str| {
        kubelet_mounts(&stage.root, policy.as_deref());
        let mut command = stage.files.command(None);
        command
            .env("GRACE_SECONDS", scale.env(grace))
            .env("PRE_STOP_SECONDS", scale.env(pre_stop));
        let service = stage.spawn(command, generation);
        // The readiness probe lets the pod in.
        wait_for_http(&service, "/ready", 200);
        wait_for_http(&service, "/live", 200);
        service
    };

    let service = pod("pod1");
    let held_order = order("held", false, None);
    let held_post = hold(
        &service,
        &head(service.addr, "POST", "/orders", held_order.len()),
    );
    let ready_head = head(service.addr, "GET", "/ready", 0);
    let (ready_start, ready_end) = ready_head.split_at(ready_head.len() - 2);
    let mut held_ready = hold(&service, ready_start);
    // Connections are accepted in order: the slow order's answer shows these two were.
    let busy = busy(service, "k8s", &stage.files.ledger);

    // The pod is deleted: the grace period starts, and the preStop hook runs first.
    let deleted = Instant::now();
    let pre_stop_end = deleted + played_pre_stop;
    let before = busy.answers.accepted_count();
    let mut probes = 0;
    loop {
        let (status, body) = request(busy.service.addr, "GET", "/ready", "").expect("readiness");
        assert_eq!(status, 200, "readiness during the preStop sleep: {body}");
        probes += 1;
        if Instant::now() + played_period >= pre_stop_end {
            break;
        }
        thread::sleep(played_period);
    }
    thread::sleep(pre_stop_end.saturating_duration_since(Instant::now()));
    let during_pre_stop = busy.answers.accepted_count() - before;
    assert!(
        during_pre_stop > 0,
        "no order was accepted during the preStop sleep"
    );

    busy.sigterm();
    held_ready.write_all(ready_end.as_bytes()).unwrap();
    let (status, body) = response(held_ready).expect("the held readiness probe's answer");
    assert_eq!(status, 503, "readiness after SIGTERM: {body}");
    assert!(body.contains("shutting down"), "{body}");
    if let Ok((status, body)) = request(busy.service.addr, "GET", "/ready", "") {
        assert_ne!(status, 200, "a fresh readiness probe after SIGTERM: {body}");
    }

    let (answers, first, gone) = busy.stopped(
        deleted + played_grace,
        Service::kill,
        "statefulset.yaml",
        played_grace,
    );
    let took = gone - deleted;
    // The held order's request was still open when the pool had stopped: the service gave it
    // its linger, then dropped it.
    let stderr = std::fs::read_to_string(stage.stderr("pod1")).unwrap();
    assert!(
        stderr.contains("requests still open"),
        "the held request should have outlived the drain: {stderr}"
    );
    drop(held_post);

    next_generation_ships_the_rest(
        pod("pod2"),
        &stage.files.ledger,
        &answers,
        &first,
        &format!(
            "kubelet: {probes} readiness probes during the preStop, {during_pre_stop} orders \
             accepted; the pod gone {took:.2?} after its deletion (grace {played_grace:.2?})"
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes: deploy/kubernetes/deployment.yaml.
// ---------------------------------------------------------------------------------------------

/// The kubelet and the Deployment recipe, on a real PostgreSQL (`DATABASE_URL`; a schema of
/// the test's own rather than the recipe's, so tests can run side by side): the recipe's
/// replicas, each pod on an `emptyDir` of its own that no later pod sees, and a rolling update
/// as `maxSurge: 1, maxUnavailable: 0` plays it: a new pod up and ready, then an old one
/// deleted (the preStop sleep with traffic going on, SIGTERM, the wait for the exit until the
/// grace period ends, SIGKILL then, which fails the test), for each old pod in turn. The first
/// old pod has a slow order running that outlasts its drain deadline: it is interrupted and
/// handed off. Every order answered 202 by an old pod must then be shipped by the new ones
/// (the ledger stands in for the orders' effect, wherever they ran): since no pod ever sees
/// another's directory, only the handoff through PostgreSQL can have brought them there.
#[test]
fn kubelet_rolls_the_deployment() {
    let recipe = Recipe::read("kubernetes/deployment.yaml");
    recipe.has("kind: Deployment");
    recipe.has("emptyDir:");
    recipe.has("secretKeyRef:");
    assert_eq!(recipe.yaml("rollingUpdate", "maxSurge"), "1");
    assert_eq!(recipe.yaml("rollingUpdate", "maxUnavailable"), "0");
    let replicas: usize = recipe
        .yaml("replicas", "replicas")
        .parse()
        .expect("replicas: a number");
    assert!(replicas >= 2, "a rolling update of one pod proves little");
    let (grace, pre_stop) = recipe.pod_timing();
    assert_eq!(recipe.yaml("readinessProbe", "path"), "/ready");
    let mount = recipe.yaml("volumeMounts", "mountPath");
    let journal = recipe.below(
        "ORDERS_JOURNAL_DIR",
        &recipe.yaml_env("ORDERS_JOURNAL_DIR"),
        &mount,
    );
    let Some(database) = common::pg::Schema::new("deployment") else {
        return;
    };

    let scale = Scale::announce("deployment", &[("grace", grace), ("preStop", pre_stop)]);
    let (played_grace, played_pre_stop) = (scale.play(grace), scale.play(pre_stop));
    let stage = tempfile::tempdir().expect("a temp dir");
    let ledger_path = stage.path().join("ledger");
    let pod = |name: &str| {
        // The pod's emptyDir: fresh, and gone with it.
        let files = Files {
            journal: stage.path().join(name).join(&journal),
            ledger: ledger_path.clone(),
        };
        let mut command = files.command(None);
        command
            .env("GRACE_SECONDS", scale.env(grace))
            .env("PRE_STOP_SECONDS", scale.env(pre_stop))
            .env("ORDERS_DATABASE_URL", &database.url)
            .env("ORDERS_DATABASE_SCHEMA", &database.name);
        let service = Service::spawn(command, &stage.path().join(format!("{name}.stderr")));
        wait_for_http(&service, "/ready", 200);
        service
    };

    // The old pods at work: the first with a slow order running, every one under load.
    let old: Vec<Service> = (0..replicas).map(|n| pod(&format!("old{n}"))).collect();
    let mut old = old.into_iter();
    let first = busy(old.next().expect("a pod"), "dep0", &ledger_path);
    let others: Vec<_> = old
        .enumerate()
        .map(|(n, service)| {
            let answers = Arc::new(Answers::default());
            let stop = Arc::new(AtomicBool::new(false));
            let clients = load(service.addr, &format!("dep{}", n + 1), &answers, &stop);
            Busy {
                service,
                answers,
                stop,
                clients,
            }
        })
        .collect();

    let mut answers = Vec::new();
    let mut reports = Vec::new();
    let mut new = Vec::new();
    for (n, old) in std::iter::once(first).chain(others).enumerate() {
        // maxSurge 1: the new pod is up and ready before the old one is deleted.
        new.push(pod(&format!("new{n}")));
        let deleted = Instant::now();
        thread::sleep(played_pre_stop);
        old.sigterm();
        let exit = old.service.exit_by(deleted + played_grace, Service::kill);
        for client in old.clients {
            client.join().expect("a client thread");
        }
        assert!(
            !exit.killed,
            "deployment.yaml: old pod {n} outlived its played grace period ({played_grace:?}) \
             and was SIGKILLed (report: {:?})",
            exit.report
        );
        let report = exit.report.expect("the report line");
        assert!(exit.status.success(), "exit {}: {report}", exit.status);
        say(&format!(
            "deployment: old pod {n} gone {:.2?} after its deletion: {report}",
            deleted.elapsed()
        ));
        answers.push(old.answers);
        reports.push(report);
    }
    let handed_off = |report: &str| {
        report
            .split(", ")
            .find_map(|part| part.strip_prefix("handed off ")?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no `handed off N` in {report:?}"))
    };
    assert!(
        interrupted(&reports[0]) >= 1 && handed_off(&reports[0]) >= 1,
        "the slow order should have been interrupted and handed off: {}",
        reports[0]
    );

    // The new pods ship everything the old ones accepted, then stop cleanly.
    let mut accepted = BTreeMap::new();
    for answers in &answers {
        accepted.extend(answers.accepted());
    }
    wait_until(
        "every order the old pods accepted shipped by the new ones",
        || common::missing(&ledger_path, &accepted).is_empty(),
    );
    for service in new {
        service.sigterm();
        let (status, report) = service.exit();
        assert!(status.success(), "a new pod exited {status}: {report}");
    }
    let lost = common::missing(&ledger_path, &accepted);
    assert!(lost.is_empty(), "lost: {lost:?}");
    say(&format!(
        "deployment: {} orders accepted by the old pods, lost 0; handed off {:?}",
        accepted.len(),
        reports.iter().map(|r| handed_off(r)).collect::<Vec<_>>()
    ));
}

// ---------------------------------------------------------------------------------------------
// systemd: deploy/systemd/order-service.service.
// ---------------------------------------------------------------------------------------------

/// `systemctl stop` and start for the unit as written: the service in a process group of its
/// own (the unit's cgroup, played), its journal in the `StateDirectory=`; SIGTERM to the main
/// process alone (`KillMode=mixed`), up to `TimeoutStopSec` for it to exit (then SIGKILL to
/// the group, which fails the test), SIGKILL to what is left of the group; then the service
/// again on the same state directory.
#[test]
fn systemctl_stop_plays_the_unit() {
    let recipe = Recipe::read("systemd/order-service.service");
    assert_eq!(
        recipe.field("KillMode", '='),
        "mixed",
        "KillMode=mixed: SIGTERM to the main process alone"
    );
    assert_eq!(recipe.field("KillSignal", '='), "SIGTERM");
    let timeout = recipe.same(
        ("TimeoutStopSec", &recipe.field("TimeoutStopSec", '=')),
        (
            "GRACE_SECONDS",
            &recipe.env("Environment=", "GRACE_SECONDS"),
        ),
    );
    let restart = recipe.field("Restart", '=');
    assert!(
        ["on-failure", "on-abnormal", "always"].contains(&restart.as_str()),
        "Restart={restart}: a crashed service must come back to replay its journal"
    );
    let state = recipe.field("StateDirectory", '=');
    let mode = recipe.field("StateDirectoryMode", '=');
    let mode = u32::from_str_radix(&mode, 8).expect("StateDirectoryMode in octal");
    let state_dir = format!("%S/{state}");
    let (journal, ledger_file) = recipe.files_below(
        &recipe.env("Environment=", "ORDERS_JOURNAL_DIR"),
        &recipe.env("Environment=", "ORDERS_LEDGER"),
        &state_dir,
    );

    let scale = Scale::announce("systemd", &[("TimeoutStopSec", timeout)]);
    let played_timeout = scale.play(timeout);

    // %S is `state`; the state directory in it, as systemd makes it.
    let stage = Stage::new(
        &format!("state/{state}"),
        Some(mode),
        &journal,
        &ledger_file,
    );
    let start = |generation: &str| {
        let mut command = stage.files.command(None);
        command
            .env("GRACE_SECONDS", scale.env(timeout))
            .process_group(0);
        stage.spawn(command, generation)
    };

    let busy = busy(start("start1"), "unit", &stage.files.ledger);
    let group = Pid::from_raw(busy.service.pid() as i32).expect("a pid");
    let stopped = busy.sigterm();
    let kill_group = || {
        // ESRCH once the group is empty.
        let _ = rustix::process::kill_process_group(group, Signal::KILL);
    };
    let (answers, first, gone) = busy.stopped(
        stopped + played_timeout,
        |_| kill_group(),
        "order-service.service",
        played_timeout,
    );
    // What is left of the unit once its main process has exited.
    kill_group();
    let took = gone - stopped;

    next_generation_ships_the_rest(
        start("start2"),
        &stage.files.ledger,
        &answers,
        &first,
        &format!("systemd: stopped {took:.2?} after SIGTERM (TimeoutStopSec {played_timeout:.2?})"),
    );
}

// ---------------------------------------------------------------------------------------------
// Docker: deploy/docker/Dockerfile.
// ---------------------------------------------------------------------------------------------

/// `docker stop` for the image as built: the binary as PID 1 of a PID namespace of its own
/// (`unshare --pid --fork`, as the exec-form `ENTRYPOINT` makes it), its journal on the
/// `VOLUME`; `STOPSIGNAL` (SIGTERM) to PID 1, docker's default timeout (which `GRACE_SECONDS`
/// must match), SIGKILL to PID 1 after it (which fails the test); then the container started
/// again on the same volume.
#[test]
fn docker_stop_plays_pid_1() {
    let recipe = Recipe::read("docker/Dockerfile");
    let entrypoint = recipe.field("ENTRYPOINT", ' ');
    assert!(
        entrypoint.starts_with('[') && entrypoint.ends_with(']'),
        "ENTRYPOINT {entrypoint}: the exec form, so the binary is PID 1 and gets the SIGTERM"
    );
    assert_eq!(recipe.field("STOPSIGNAL", ' '), "SIGTERM");
    let default_timeout = format!("{}", DOCKER_STOP_TIMEOUT.as_secs());
    recipe.same(
        ("docker stop's default timeout", &default_timeout),
        ("GRACE_SECONDS", &recipe.env("ENV ", "GRACE_SECONDS")),
    );
    let volume_field = recipe.field("VOLUME", ' ');
    let volume_path = unquote(volume_field.trim_matches(['[', ']']));
    let (journal, ledger_file) = recipe.files_below(
        &recipe.env("ENV ", "ORDERS_JOURNAL_DIR"),
        &recipe.env("ENV ", "ORDERS_LEDGER"),
        volume_path,
    );
    let Some(unshare) = require("unshare able to make a PID namespace", pid_namespaces()) else {
        return;
    };

    let scale = Scale::announce("docker", &[("stop timeout", DOCKER_STOP_TIMEOUT)]);
    let played_timeout = scale.play(DOCKER_STOP_TIMEOUT);

    let stage = Stage::new("volume", None, &journal, &ledger_file);
    let run = |generation: &str| {
        let mut command = stage.files.command(Some(("unshare", unshare)));
        command.env("GRACE_SECONDS", scale.env(DOCKER_STOP_TIMEOUT));
        let mut service = stage.spawn(command, generation);
        let outer = service.pid();
        let mut inner = None;
        wait_until("the namespaced service's pid", || {
            inner = child_of(outer);
            inner.is_some()
        });
        let inner = inner.unwrap_or_default();
        assert_eq!(innermost_pid(inner), Some(1), "pid {inner} is not PID 1");
        service.signal_to(inner);
        service
    };

    let busy = busy(run("run1"), "docker", &stage.files.ledger);
    let stopped = busy.sigterm();
    let (answers, first, gone) = busy.stopped(
        stopped + played_timeout,
        Service::kill,
        "Dockerfile",
        played_timeout,
    );
    let took = gone - stopped;

    next_generation_ships_the_rest(
        run("run2"),
        &stage.files.ledger,
        &answers,
        &first,
        &format!("docker: PID 1 stopped {took:.2?} after SIGTERM (timeout {played_timeout:.2?})"),
    );
}
