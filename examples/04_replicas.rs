//! Three replicas of a Deployment on one PostgreSQL database, and a rolling restart under
//! load, played by one program: nothing accepted is lost though each new replica starts on an
//! empty directory.
//!
//! The program starts three replica processes (itself, run with `replica`), each with a fresh
//! journal directory of its own and a producer submitting a task every few milliseconds (the
//! requests a pod's service would take). Then it replaces them one by one the way a
//! Deployment's rolling update does: a new replica on a new, empty directory, and once it is
//! running the old one is stopped with the kubelet's sequence (SIGTERM, the grace period,
//! SIGKILL if it is still alive). A leaving replica hands its queued tasks off to the table at
//! the SIGTERM, and the tasks it interrupted at its drain deadline at the end; the replicas
//! that stay claim and run them at once. Then the load stops, every accepted task finishes,
//! and the last replicas are stopped the same way.
//!
//! Every handler appends the task it finished to a ledger, and every producer appends each
//! task `submit` accepted to another. The last line is computed from those files, not from the
//! pools' counters: `submitted=N completed=N handed_off=H rescued=R lost=0 duplicates=D`, where
//! `handed_off` counts the tasks finished by another replica than the one that accepted them,
//! and `rescued` those a SIGKILLed replica had started and another finished (none when every
//! replica leaves within its grace period, as here).
//!
//! It uses `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`) and a schema of
//! its own, dropped at the end.
//!
//! Run it with `cargo run --features postgres --example 04_replicas`.

#[cfg(unix)]
fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("replica") {
        demo::replica(&args[2..])
    } else {
        demo::orchestrate()
    }
}

#[cfg(not(unix))]
fn main() {
    println!("this demonstration sends real SIGTERMs, so it runs on Unix only");
}

#[cfg(unix)]
mod demo {
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use std::fs::{File, OpenOptions};
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, ExitCode, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use drainpool::{Pool, PostgresStore, SubmitError, Task};
    use rustix::process::{Pid, Signal, kill_process};

    const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
    /// The kubelet's grace period (`terminationGracePeriodSeconds`): SIGKILL after it.
    const GRACE: Duration = Duration::from_secs(5);
    /// How long the replicas run before the rolling update, and between two replacements.
    const RUN_BEFORE: Duration = Duration::from_secs(3);
    const RUN_BETWEEN: Duration = Duration::from_secs(2);
    /// How often the program says how far it has got.
    const PROGRESS_EVERY: Duration = Duration::from_secs(2);
    /// Every wait for a replica's state, bounded.
    const LIMIT: Duration = Duration::from_secs(30);

    /// How long task `n` works: a few milliseconds; one in 100 takes 2 s, past the drain
    /// deadline (1 s): those are the ones a SIGTERM interrupts.
    fn work(n: u64) -> Duration {
        if n % 100 == 7 {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(4 + n * 7 % 11)
        }
    }

    // -----------------------------------------------------------------------------------------
    // The orchestrator: the Deployment and the kubelet.

    pub(crate) fn orchestrate() -> ExitCode {
        let url = std::env::var("DATABASE_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        let schema = format!("drainpool_example_{}", std::process::id());
        let database = match Database::open(&url, &schema) {
            Ok(database) => database,
            Err(error) => {
                eprintln!(
                    "04_replicas: no PostgreSQL database answers at {url} ({error}); set \
                     DATABASE_URL to one"
                );
                return ExitCode::from(2);
            }
        };
        let temp = tempfile::tempdir().expect("a temporary directory");
        let mut run = Run {
            base: temp.path().to_path_buf(),
            url,
            schema: schema.clone(),
            started: Instant::now(),
            last_progress: Instant::now(),
            next: 0,
            killed: BTreeSet::new(),
            failed_exits: 0,
        };
        println!(
            "drainpool replicas: 3 replicas on {} (schema {schema}), each on an empty directory \
             under {}",
            database.shown_url,
            run.base.display()
        );

        let mut replicas: Vec<Replica> = (0..3).map(|_| run.start()).collect();
        run.wait(RUN_BEFORE, &replicas);
        // The rolling update: a new replica first (maxSurge 1, maxUnavailable 0), then the old
        // one goes.
        for _ in 0..3 {
            let new = run.start();
            replicas.push(new);
            let old = replicas.remove(0);
            run.stop(old, &replicas);
            run.wait(RUN_BETWEEN, &replicas);
        }
        // The load stops; the replicas finish what was accepted, then leave too.
        File::create(run.base.join("stop-producing")).expect("the stop file");
        let drained = run.wait_until(&replicas, "every accepted task to finish", |ledgers| {
            ledgers
                .accepted
                .keys()
                .all(|n| ledgers.done.contains_key(n))
        });
        for replica in std::mem::take(&mut replicas) {
            run.stop(replica, &[]);
        }
        if !drained {
            println!("not every accepted task finished within {LIMIT:?}");
        }
        let verdict = run.verdict();
        drop(database);
        verdict
    }

    /// The schema of this run, dropped at the end (or when the program fails).
    struct Database {
        url: String,
        schema: String,
        /// The URL without its password, to print.
        shown_url: String,
    }

    impl Database {
        fn open(url: &str, schema: &str) -> Result<Self, String> {
            sql(url, "SELECT 1")?;
            let shown_url = match url.split_once('@') {
                Some((credentials, rest)) if credentials.contains(':') => {
                    let scheme = credentials.split(':').next().unwrap_or_default();
                    format!("{scheme}://…@{rest}")
                }
                _ => url.to_owned(),
            };
            Ok(Self {
                url: url.to_owned(),
                schema: schema.to_owned(),
                shown_url,
            })
        }
    }

    impl Drop for Database {
        fn drop(&mut self) {
            let drop_it = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
            if let Err(error) = sql(&self.url, &drop_it) {
                eprintln!(
                    "04_replicas: could not drop schema {}: {error}",
                    self.schema
                );
            }
        }
    }

    /// Runs `statements` on the database at `url`.
    fn sql(url: &str, statements: &str) -> Result<(), String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
            let (client, connection) = tokio::time::timeout(Duration::from_secs(5), connect)
                .await
                .map_err(|_| "connecting timed out after 5 s".to_owned())?
                .map_err(|e| chain(&e))?;
            tokio::spawn(connection);
            client
                .batch_execute(statements)
                .await
                .map_err(|e| chain(&e))
        })
    }

    /// An error and its sources, one after another.
    fn chain(error: &dyn std::error::Error) -> String {
        let mut text = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        text
    }

    /// One replica process (killed if this program fails before it stopped it).
    struct Replica {
        number: u32,
        child: Child,
        dir: PathBuf,
    }

    impl Replica {
        fn pid(&self) -> u32 {
            self.child.id()
        }

        fn signal(&self, signal: Signal) {
            if let Some(pid) = Pid::from_raw(self.child.id() as i32) {
                let _ = kill_process(pid, signal);
            }
        }
    }

    impl Drop for Replica {
        fn drop(&mut self) {
            if matches!(self.child.try_wait(), Ok(None)) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }

    /// What the ledgers say: task → the replicas (pids) that accepted it, started it, finished
    /// it (with whether that run was told of an interruption).
    #[derive(Default)]
    struct Ledgers {
        accepted: BTreeMap<u64, u32>,
        started: HashMap<u64, Vec<u32>>,
        done: BTreeMap<u64, Vec<(u32, bool)>>,
    }

    impl Ledgers {
        fn read(base: &Path) -> Self {
            let mut ledgers = Self::default();
            for (n, pid, _) in lines(&base.join("accepted.log")) {
                ledgers.accepted.insert(n, pid);
            }
            for (n, pid, _) in lines(&base.join("started.log")) {
                ledgers.started.entry(n).or_default().push(pid);
            }
            for (n, pid, interrupted) in lines(&base.join("done.log")) {
                ledgers.done.entry(n).or_default().push((pid, interrupted));
            }
            ledgers
        }

        fn completed(&self) -> usize {
            self.done.values().map(Vec::len).sum()
        }
    }

    /// A ledger's lines: `task pid [flag]`.
    fn lines(path: &Path) -> Vec<(u64, u32, bool)> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let mut words = line.split(' ');
                let n = words.next()?.parse().ok()?;
                let pid = words.next()?.parse().ok()?;
                Some((n, pid, words.next() == Some("1")))
            })
            .collect()
    }

    struct Run {
        base: PathBuf,
        url: String,
        schema: String,
        started: Instant,
        last_progress: Instant,
        next: u32,
        /// The replicas the kubelet had to SIGKILL.
        killed: BTreeSet<u32>,
        failed_exits: u32,
    }

    impl Run {
        /// Starts replica number `next` on a fresh directory; waits until it runs.
        fn start(&mut self) -> Replica {
            self.next += 1;
            let number = self.next;
            let dir = self.base.join(format!("replica-{number}"));
            std::fs::create_dir(&dir).expect("a replica directory");
            let out = File::create(dir.join("out")).expect("the replica's output file");
            let child = Command::new(std::env::current_exe().expect("this program"))
                .args([
                    "replica",
                    &number.to_string(),
                    &self.url,
                    &self.schema,
                    &self.base.display().to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(out)
                .spawn()
                .expect("a replica process");
            let replica = Replica { number, child, dir };
            let since = Instant::now();
            while !read(&replica.dir.join("out")).contains("ready") {
                assert!(
                    since.elapsed() < LIMIT,
                    "replica {number} did not start: {}",
                    read(&replica.dir.join("out"))
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            println!(
                "{:>5.1} s  replica {number} (pid {}) is running, on an empty directory",
                self.elapsed(),
                replica.pid()
            );
            replica
        }

        /// Stops `replica` as the kubelet does: SIGTERM, then SIGKILL if it outlives the
        /// grace period.
        fn stop(&mut self, mut replica: Replica, others: &[Replica]) {
            let number = replica.number;
            replica.signal(Signal::TERM);
            let sent = Instant::now();
            println!(
                "{:>5.1} s  replica {number} (pid {}): SIGTERM",
                self.elapsed(),
                replica.pid()
            );
            let status = loop {
                if let Ok(Some(status)) = replica.child.try_wait() {
                    break Some(status);
                }
                if sent.elapsed() >= GRACE {
                    break None;
                }
                self.progress(others);
                std::thread::sleep(Duration::from_millis(5));
            };
            let took = sent.elapsed().as_secs_f64();
            let out = read(&replica.dir.join("out"));
            let report = out
                .lines()
                .find_map(|l| l.strip_prefix("report "))
                .unwrap_or("(no report)");
            match status {
                Some(status) => {
                    if !status.success() {
                        self.failed_exits += 1;
                    }
                    println!(
                        "{:>5.1} s  replica {number} exited after {took:.2} s ({status}): {report}",
                        self.elapsed()
                    );
                }
                None => {
                    replica.signal(Signal::KILL);
                    let _ = replica.child.wait();
                    self.killed.insert(replica.pid());
                    println!(
                        "{:>5.1} s  replica {number} outlived the grace period: SIGKILL",
                        self.elapsed()
                    );
                }
            }
        }

        /// Lets the replicas run for `period`, saying how far they have got.
        fn wait(&mut self, period: Duration, replicas: &[Replica]) {
            let until = Instant::now() + period;
            while Instant::now() < until {
                self.progress(replicas);
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        /// Waits (at most `LIMIT`) until `done` holds of the ledgers.
        fn wait_until(
            &mut self,
            replicas: &[Replica],
            what: &str,
            done: impl Fn(&Ledgers) -> bool,
        ) -> bool {
            println!(
                "{:>5.1} s  the load stops; waiting for {what}",
                self.elapsed()
            );
            let since = Instant::now();
            while since.elapsed() < LIMIT {
                if done(&Ledgers::read(&self.base)) {
                    return true;
                }
                self.progress(replicas);
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        }

        /// A line every `PROGRESS_EVERY`: the replicas running, the tasks accepted and finished.
        fn progress(&mut self, replicas: &[Replica]) {
            if self.last_progress.elapsed() < PROGRESS_EVERY {
                return;
            }
            self.last_progress = Instant::now();
            let ledgers = Ledgers::read(&self.base);
            let running: Vec<String> = replicas.iter().map(|r| r.number.to_string()).collect();
            println!(
                "{:>5.1} s  replicas [{}] running; {} tasks accepted, {} finished",
                self.elapsed(),
                running.join(", "),
                ledgers.accepted.len(),
                ledgers.completed()
            );
        }

        fn elapsed(&self) -> f64 {
            self.started.elapsed().as_secs_f64()
        }

        /// The last line, from the ledgers.
        fn verdict(&self) -> ExitCode {
            let ledgers = Ledgers::read(&self.base);
            let submitted = ledgers.accepted.len();
            let completed = ledgers
                .accepted
                .keys()
                .filter(|n| ledgers.done.contains_key(n))
                .count();
            let lost = submitted - completed;
            let duplicates: usize = ledgers.done.values().map(|runs| runs.len() - 1).sum();
            let strays = ledgers
                .done
                .keys()
                .filter(|n| !ledgers.accepted.contains_key(n))
                .count();
            // Finished by another replica than the one that accepted it.
            let handed_off = ledgers
                .done
                .iter()
                .filter(|(n, runs)| {
                    ledgers
                        .accepted
                        .get(n)
                        .is_some_and(|pid| runs.iter().any(|(by, _)| by != pid))
                })
                .count();
            // Started by a replica that was SIGKILLed, finished by another.
            let rescued = ledgers
                .done
                .iter()
                .filter(|(n, runs)| {
                    ledgers.started.get(n).is_some_and(|pids| {
                        pids.iter().any(|pid| {
                            self.killed.contains(pid) && runs.iter().any(|(by, _)| by != pid)
                        })
                    })
                })
                .count();
            let interrupted = ledgers
                .done
                .values()
                .filter(|runs| runs.iter().any(|&(_, i)| i))
                .count();
            if strays > 0 {
                println!("{strays} finished tasks were never accepted: the ledger is inconsistent");
            }
            if self.failed_exits > 0 {
                println!("{} replicas exited with a failure", self.failed_exits);
            }
            println!(
                "{:>5.1} s  done: {interrupted} tasks ran again after an interruption (a drain \
                 deadline)",
                self.elapsed()
            );
            println!(
                "submitted={submitted} completed={completed} handed_off={handed_off} \
                 rescued={rescued} lost={lost} duplicates={duplicates}"
            );
            if lost == 0 && strays == 0 && self.failed_exits == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    // -----------------------------------------------------------------------------------------
    // A replica: a pool on the shared table, a producer, handlers that write the ledger.

    /// An append-only ledger; each line goes out in one `write`.
    struct Ledger(Mutex<File>);

    impl Ledger {
        fn open(path: &Path) -> Self {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("a ledger file");
            Self(Mutex::new(file))
        }

        fn line(&self, line: String) {
            let mut file = self.0.lock().unwrap_or_else(|p| p.into_inner());
            file.write_all(line.as_bytes()).expect("a ledger write");
        }
    }

    /// `replica NUMBER URL SCHEMA BASE`: runs until SIGTERM.
    pub(crate) fn replica(args: &[String]) -> ExitCode {
        let [number, url, schema, base] = args else {
            eprintln!("usage: 04_replicas replica NUMBER URL SCHEMA BASE");
            return ExitCode::FAILURE;
        };
        let number: u64 = number.parse().expect("a replica number");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        runtime.block_on(run_replica(number, url, schema, PathBuf::from(base)))
    }

    async fn run_replica(number: u64, url: &str, schema: &str, base: PathBuf) -> ExitCode {
        let pid = std::process::id();
        let started = Arc::new(Ledger::open(&base.join("started.log")));
        let done = Arc::new(Ledger::open(&base.join("done.log")));
        let accepted = Ledger::open(&base.join("accepted.log"));
        let store = PostgresStore::new(url)
            .schema(schema)
            .lease(Duration::from_secs(2))
            .poll_interval(Duration::from_millis(200))
            .timeout(Duration::from_secs(2));
        let pool = Pool::builder()
            .workers(32)
            .queue_capacity(256)
            .drain_deadline(Duration::from_secs(1))
            .cancel_grace(Duration::from_millis(250))
            // A long task may be interrupted by every leaving replica in turn.
            .max_interruptions(20)
            .journal_dir(base.join(format!("replica-{number}")).join("journal"))
            .postgres(store)
            .start(move |task: Task<u64>| {
                let (started, done) = (Arc::clone(&started), Arc::clone(&done));
                async move {
                    let n = *task.payload();
                    started.line(format!("{n} {pid}\n"));
                    tokio::select! {
                        () = tokio::time::sleep(work(n)) => {}
                        () = task.cancelled() => return Err("interrupted at the drain deadline"),
                    }
                    // The side effect, recorded once the work is done.
                    done.line(format!("{n} {pid} {}\n", u8::from(task.was_interrupted())));
                    Ok(())
                }
            })
            .await;
        let pool = match pool {
            Ok(pool) => pool,
            Err(error) => {
                eprintln!("replica {number}: {}", chain(&error));
                return ExitCode::FAILURE;
            }
        };
        println!("ready");
        let producer = tokio::spawn({
            let pool = pool.clone();
            let stop = base.join("stop-producing");
            async move {
                for n in number * 1_000_000.. {
                    if stop.exists() {
                        return;
                    }
                    match pool.submit(n).await {
                        // Only now is the task the pool's responsibility.
                        Ok(_) => accepted.line(format!("{n} {pid}\n")),
                        Err(SubmitError::ShuttingDown(_)) => return,
                        Err(error) => panic!("submit failed: {error}"),
                    }
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            }
        });
        let report = pool.run_until_signal().await.expect("signal handlers");
        let _ = producer.await;
        println!(
            "report handed_off={} interrupted={} completed={} replayed={} unsaved={} error={}",
            report.handed_off,
            report.interrupted,
            report.completed,
            report.replayed,
            report.unsaved,
            report
                .handoff_error
                .as_ref()
                .map_or_else(|| "none".to_owned(), ToString::to_string),
        );
        report.exit_code()
    }
}
