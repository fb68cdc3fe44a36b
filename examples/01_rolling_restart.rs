//! A rolling restart, played by one program: nothing accepted is lost across SIGTERM.
//!
//! The program starts three generations of a worker process (itself, run with `worker`), one
//! after the other, on the same journal directory:
//!
//! 1. generation 1 accepts 3,000 orders to ship and is sent a real SIGTERM mid-work;
//! 2. generation 2 replays what generation 1 journaled, accepts 1,000 new orders, and is sent
//!    SIGTERM mid-work too;
//! 3. generation 3 replays the rest and stops by itself when the queue is empty.
//!
//! Every handler appends the order it shipped to a ledger file; every producer appends each
//! order `submit` accepted to another. The last line is computed from those two files, not
//! from the pool's counters: `submitted=N completed=N spilled=S replayed=R lost=0
//! duplicates=D`. While a generation runs, a line of progress every two seconds says how many
//! orders it has shipped so far.
//!
//! The journal lives where `DRAINPOOL_DEMO_DIR` says (kept afterwards, to try the tools on),
//! or in a temporary directory that is removed at the end.
//!
//! Run it with `cargo run --example 01_rolling_restart`.

#[cfg(unix)]
fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("worker") {
        demo::worker(&args[2..])
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
    use std::collections::{BTreeSet, HashMap};
    use std::fs::{File, OpenOptions};
    use std::io::{BufRead, BufReader, Write};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, ExitCode, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use drainpool::{Pool, SubmitError, Task};
    use serde::{Deserialize, Serialize};

    /// An order to ship: the shape of a real task payload.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct ShipOrder {
        order: u64,
        customer: String,
        warehouse: String,
        items: Vec<Item>,
        express: bool,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Item {
        sku: String,
        qty: u32,
    }

    impl ShipOrder {
        fn new(order: u64) -> Self {
            let items = (0..1 + order % 4)
                .map(|i| Item {
                    sku: format!("SKU-{:05}", (order * 7 + i) % 50_000),
                    qty: 1 + (i as u32),
                })
                .collect();
            Self {
                order,
                customer: format!("customer-{}", order % 977),
                warehouse: ["ams-1", "fra-2", "lhr-1"][(order % 3) as usize].into(),
                items,
                // One order in 200 goes by freight, which takes seconds, longer than the
                // drain deadline: those are the ones a SIGTERM interrupts.
                express: order % 200 == 7,
            }
        }

        fn shipping_time(&self) -> Duration {
            if self.express {
                Duration::from_secs(3)
            } else {
                Duration::from_millis(3 + (self.order * 2_654_435_761 % 20))
            }
        }
    }

    const GENERATIONS: [(u64, u64); 3] = [(1, 3_000), (100_001, 1_000), (0, 0)];
    /// Completions to wait for, in each generation that gets a SIGTERM, before sending it.
    const COMPLETIONS_BEFORE_SIGTERM: usize = 400;
    /// How often a running generation says how far it has got.
    const PROGRESS_EVERY: Duration = Duration::from_secs(2);

    /// The parent: runs the generations, sends the signals, reads the ledger.
    pub(crate) fn orchestrate() -> ExitCode {
        let (base, _temp) = match std::env::var_os("DRAINPOOL_DEMO_DIR") {
            Some(dir) => (PathBuf::from(dir), None),
            None => {
                let temp = tempfile::tempdir().expect("a temporary directory");
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        std::fs::create_dir_all(&base).expect("the demo directory");
        for file in ["submitted.log", "shipped.log"] {
            let _ = std::fs::remove_file(base.join(file));
        }
        println!(
            "drainpool rolling restart: journal in {}",
            base.join("journal").display()
        );

        let (mut spilled, mut replayed) = (0u64, 0u64);
        for (generation, (first, count)) in GENERATIONS.into_iter().enumerate() {
            let generation = generation + 1;
            let signal = count > 0;
            let shipped_before = count_lines(&base.join("shipped.log"));
            let mut child = Command::new(std::env::current_exe().expect("this program"))
                .args([
                    "worker",
                    &base.display().to_string(),
                    &first.to_string(),
                    &count.to_string(),
                ])
                .stdout(Stdio::piped())
                .spawn()
                .expect("the worker process");
            let started = Instant::now();
            let mut progress = Progress::new(generation, base.join("shipped.log"), shipped_before);
            let stdout = child.stdout.take().expect("the worker's stdout");
            let lines = std::thread::spawn(move || {
                BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                    .collect::<Vec<_>>()
            });

            let mut signalled = None;
            if signal {
                let target = shipped_before + COMPLETIONS_BEFORE_SIGTERM;
                while count_lines(&base.join("shipped.log")) < target
                    && started.elapsed() < Duration::from_secs(60)
                {
                    progress.tick();
                    std::thread::sleep(Duration::from_millis(5));
                }
                let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("a child pid");
                rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
                signalled = Some(Instant::now());
            }
            let status = wait_or_kill(&mut child, Duration::from_secs(120), || progress.tick());
            let lines = lines.join().unwrap_or_default();
            let report = parse_report(&lines);
            spilled += report.get("spilled").copied().unwrap_or(0)
                + report.get("interrupted").copied().unwrap_or(0);
            replayed += report.get("replayed").copied().unwrap_or(0);
            let stop = match signalled {
                Some(at) => format!(
                    "SIGTERM after {} ms, exit {} ms later",
                    (at - started).as_millis(),
                    at.elapsed().as_millis()
                ),
                None => format!("ran to empty in {} ms", started.elapsed().as_millis()),
            };
            println!(
                "generation {generation}: replayed {:>4}, accepted {:>4}, completed {:>4}, spilled {:>4}, interrupted {:>2}, report after {} ms; {stop}; {status}",
                report.get("replayed").unwrap_or(&0),
                report.get("submitted").unwrap_or(&0),
                report.get("completed").unwrap_or(&0),
                report.get("spilled").unwrap_or(&0),
                report.get("interrupted").unwrap_or(&0),
                report.get("elapsed_ms").unwrap_or(&0),
            );
        }

        let submitted: BTreeSet<u64> = read_numbers(&base.join("submitted.log"))
            .into_iter()
            .collect();
        let mut shipped: HashMap<u64, u32> = HashMap::new();
        for order in read_numbers(&base.join("shipped.log")) {
            *shipped.entry(order).or_default() += 1;
        }
        let completed = submitted.iter().filter(|o| shipped.contains_key(o)).count();
        let lost = submitted.len() - completed;
        let duplicates: u32 = shipped.values().map(|n| n - 1).sum();
        let strays = shipped.keys().filter(|o| !submitted.contains(o)).count();
        if strays > 0 {
            println!("{strays} shipped orders were never accepted: the ledger is inconsistent");
        }
        println!(
            "submitted={} completed={completed} spilled={spilled} replayed={replayed} lost={lost} duplicates={duplicates}",
            submitted.len()
        );
        if lost == 0 && strays == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }

    /// A worker generation: replays the journal, accepts `count` new orders from `first`, and
    /// runs until SIGTERM (or, with nothing to accept, until its queue is empty).
    pub(crate) fn worker(args: &[String]) -> ExitCode {
        let base = PathBuf::from(&args[0]);
        let first: u64 = args[1].parse().expect("first order");
        let count: u64 = args[2].parse().expect("order count");
        let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
        runtime.block_on(run_worker(base, first, count))
    }

    async fn run_worker(base: PathBuf, first: u64, count: u64) -> ExitCode {
        let shipped = Arc::new(Mutex::new(append(&base.join("shipped.log"))));
        let ledger = Arc::clone(&shipped);
        let pool = Pool::builder()
            .workers(16)
            .queue_capacity(10_000)
            .drain_deadline(Duration::from_secs(1))
            .cancel_grace(Duration::from_millis(250))
            .journal_dir(base.join("journal"))
            .start(move |task: Task<ShipOrder>| {
                let ledger = Arc::clone(&ledger);
                async move {
                    tokio::select! {
                        () = tokio::time::sleep(task.payload().shipping_time()) => {}
                        () = task.cancelled() => return Err("shipment interrupted at the drain deadline"),
                    }
                    // The side effect, recorded once the work is done.
                    writeln!(ledger.lock().expect("ledger"), "{}", task.payload().order).map_err(|_| "ledger write failed")?;
                    Ok(())
                }
            })
            .await
            .expect("pool start");

        let producer = tokio::spawn({
            let pool = pool.clone();
            let mut accepted = append(&base.join("submitted.log"));
            async move {
                for order in first..first + count {
                    match pool.submit(ShipOrder::new(order)).await {
                        // Only now is the order the pool's responsibility.
                        Ok(_) => writeln!(accepted, "{order}").expect("submitted log"),
                        Err(SubmitError::ShuttingDown(_)) => break,
                        Err(e) => panic!("submit failed: {e}"),
                    }
                }
            }
        });
        if count == 0 {
            let pool = pool.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let stats = pool.stats();
                    if stats.queued == 0 && stats.in_flight == 0 {
                        pool.shutdown_token().cancel();
                        return;
                    }
                }
            });
        }
        let report = pool.run_until_signal().await.expect("signal handlers");
        let _ = producer.await;
        println!(
            "report replayed={} submitted={} completed={} spilled={} interrupted={} failed={} unsaved={} elapsed_ms={}",
            report.replayed,
            report.submitted,
            report.completed,
            report.spilled,
            report.interrupted,
            report.failed,
            report.unsaved,
            report.elapsed.as_millis()
        );
        report.exit_code()
    }

    fn append(path: &Path) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("a ledger file")
    }

    fn count_lines(path: &Path) -> usize {
        std::fs::read(path)
            .map(|b| b.iter().filter(|&&c| c == b'\n').count())
            .unwrap_or(0)
    }

    fn read_numbers(path: &Path) -> Vec<u64> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }

    fn parse_report(lines: &[String]) -> HashMap<String, u64> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix("report "))
            .flat_map(|l| l.split(' '))
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect()
    }

    /// A line of progress every [`PROGRESS_EVERY`] while a generation runs: the orders it has
    /// shipped so far, counted in the ledger.
    struct Progress {
        generation: usize,
        shipped_log: PathBuf,
        shipped_before: usize,
        started: Instant,
        last: Instant,
    }

    impl Progress {
        fn new(generation: usize, shipped_log: PathBuf, shipped_before: usize) -> Self {
            let now = Instant::now();
            Self {
                generation,
                shipped_log,
                shipped_before,
                started: now,
                last: now,
            }
        }

        fn tick(&mut self) {
            if self.last.elapsed() < PROGRESS_EVERY {
                return;
            }
            self.last = Instant::now();
            let shipped = count_lines(&self.shipped_log).saturating_sub(self.shipped_before);
            println!(
                "generation {}: running for {:.0} s, {shipped} orders shipped so far",
                self.generation,
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    /// Waits for the worker to exit, calling `on_wait` between polls; kills it after `limit`.
    fn wait_or_kill(child: &mut Child, limit: Duration, mut on_wait: impl FnMut()) -> String {
        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return format!("worker {status}"),
                Ok(None) if started.elapsed() < limit => {
                    on_wait();
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return "worker killed after the time limit".into();
                }
            }
        }
    }
}
