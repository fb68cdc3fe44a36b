//! The `drainpool` tool, run as a real binary against journals a real pool wrote.

#![cfg(feature = "cli")]

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{PATIENCE, eventually};
use drainpool::{Pool, Task, TaskId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Job {
    n: u64,
    action: Action,
    note: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum Action {
    Work,
    /// Fails on the first pool run (a bug since fixed), works on later ones.
    Fail,
    /// Waits for the drain deadline on the first pool run, works on later ones.
    Block,
}

impl Job {
    fn new(n: u64, action: Action) -> Self {
        Self {
            n,
            action,
            note: format!("job {n} «{action:?}»"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TestError(&'static str);

/// What handlers ran to success: (id, n).
type Ledger = Arc<Mutex<Vec<(TaskId, u64)>>>;

/// Starts a one-worker pool over `dir`. On the `first` run, `Fail` jobs fail (and become dead
/// letters at once) and `Block` jobs wait for the drain deadline; later, every job works.
async fn start(dir: &Path, ledger: &Ledger, first: bool) -> Pool<Job> {
    let ledger = Arc::clone(ledger);
    Pool::builder()
        .workers(1)
        .max_attempts(1)
        .drain_deadline(Duration::from_secs(10))
        .cancel_grace(Duration::from_secs(1))
        .journal_dir(dir)
        .start(move |task: Task<Job>| {
            let ledger = Arc::clone(&ledger);
            async move {
                match task.payload().action {
                    Action::Fail if first => return Err(TestError("refused by the test")),
                    Action::Block if first => {
                        task.cancelled().await;
                        return Err(TestError("cancelled"));
                    }
                    _ => {}
                }
                ledger.lock().unwrap().push((task.id(), task.payload().n));
                Ok(())
            }
        })
        .await
        .unwrap()
}

/// A journal left by a pool stopped mid-work.
struct Journal {
    dir: tempfile::TempDir,
    /// Live tasks, in replay order: the one interrupted at the deadline, then the queued ones.
    live: Vec<(TaskId, Job)>,
    /// Dead letters, in id order.
    dead: Vec<(TaskId, Job)>,
}

impl Journal {
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Runs a pool that sets `dead` tasks aside as dead letters, then is stopped with one task
/// running and `queued` waiting.
async fn journal(dead: u64, queued: u64) -> Journal {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = start(dir.path(), &ledger, true).await;
    let mut journal = Journal {
        dir,
        live: Vec::new(),
        dead: Vec::new(),
    };
    for n in 1..=dead {
        let job = Job::new(n, Action::Fail);
        journal
            .dead
            .push((pool.submit(job.clone()).await.unwrap(), job));
    }
    eventually(PATIENCE, "the dead letters", || pool.stats().failed == dead).await;
    if queued > 0 {
        let job = Job::new(100, Action::Block);
        journal
            .live
            .push((pool.submit(job.clone()).await.unwrap(), job));
        eventually(PATIENCE, "the blocking task to start", || {
            pool.stats().in_flight == 1
        })
        .await;
        for n in 101..101 + queued {
            let job = Job::new(n, Action::Work);
            journal
                .live
                .push((pool.submit(job.clone()).await.unwrap(), job));
        }
    }
    pool.shutdown_now();
    let report = pool.wait().await.unwrap();
    assert_eq!(report.unsaved, 0, "{report:?}");
    assert_eq!(report.spilled, queued, "{report:?}");
    assert!(ledger.lock().unwrap().is_empty());
    journal
}

fn drainpool<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_drainpool"))
        .args(args)
        .output()
        .unwrap()
}

fn run(args: &[&dyn AsRef<OsStr>]) -> Output {
    drainpool(args.iter().map(|a| a.as_ref()))
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exited by a signal")
}

/// Each stdout line as JSON.
fn json_lines(output: &Output) -> Vec<Value> {
    assert_eq!(code(output), 0, "stderr: {}", stderr(output));
    stdout(output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

fn inspect(dir: &Path, dead: bool) -> Vec<Value> {
    let output = if dead {
        run(&[&"inspect", &dir, &"--dead"])
    } else {
        run(&[&"inspect", &dir])
    };
    json_lines(&output)
}

fn ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect()
}

fn expected_ids(tasks: &[(TaskId, Job)]) -> Vec<String> {
    tasks.iter().map(|(id, _)| id.to_string()).collect()
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// The live segment files of `dir`.
fn live_segments(dir: &Path) -> Vec<PathBuf> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.ends_with(".seg") && !name.starts_with("dead-")
        })
        .collect();
    segments.sort();
    segments
}

/// The offsets of the records in a segment, walked with the documented layout: a 48-byte
/// header, then records of a 32-byte header (body length at offset 4) and the body, padded to
/// a multiple of 8.
fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut at = 48;
    while at < bytes.len() {
        offsets.push(at);
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        at += (32 + len).div_ceil(8) * 8;
    }
    assert_eq!(at, bytes.len());
    offsets
}

#[tokio::test]
async fn inspect_prints_live_tasks_and_dead_letters_as_json_lines() {
    let journal = journal(2, 3).await;

    let live = inspect(journal.path(), false);
    assert_eq!(ids(&live), expected_ids(&journal.live));
    for (line, (_, job)) in live.iter().zip(&journal.live) {
        assert_eq!(line["payload"], serde_json::to_value(job).unwrap());
        assert_eq!(line["attempts"], 0);
        assert!(line["enqueued_at_ms"].as_u64().unwrap() > 1_600_000_000_000);
        assert_eq!(line["not_before_ms"], 0);
        // No options given: their defaults, named as in `JournaledTask`.
        assert_eq!(line["priority"], 0);
        assert_eq!(line["max_attempts"], Value::Null);
        assert_eq!(line["expires_at_ms"], Value::Null);
        assert_eq!(line["unique_key"], Value::Null);
        assert!(line["segment"].as_str().unwrap().ends_with(".seg"));
        assert!(line["offset"].as_u64().unwrap() >= 48);
    }
    // The task running at the deadline was journaled as interrupted.
    assert_eq!(live[0]["interrupted"], true);
    assert_eq!(live[0]["interruptions"], 1);
    assert_eq!(live[1]["interrupted"], false);
    assert_eq!(live[1]["last_error"], Value::Null);

    let dead = inspect(journal.path(), true);
    assert_eq!(ids(&dead), expected_ids(&journal.dead));
    for (line, (_, job)) in dead.iter().zip(&journal.dead) {
        assert_eq!(line["payload"], serde_json::to_value(job).unwrap());
        assert_eq!(line["attempts"], 1);
        assert_eq!(line["last_error"], "refused by the test");
        assert_eq!(line["interrupted"], false);
    }
}

#[tokio::test]
async fn an_empty_journal_is_clean_and_its_parent_is_refused() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("journal");
    let pool = start(&dir, &Ledger::default(), false).await;
    assert!(pool.shutdown().await.unwrap().is_clean());
    assert!(inspect(&dir, false).is_empty());
    assert!(inspect(&dir, true).is_empty());
    assert_eq!(code(&run(&[&"verify", &dir])), 0);

    // The parent, as when `DRAINPOOL_DEMO_DIR` is given instead of its `journal`.
    let output = run(&[&"verify", &parent.path()]);
    assert_eq!(code(&output), 1);
    assert!(
        stderr(&output).contains("not a journal directory"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn an_os_error_is_printed_once_after_the_message_it_caused() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let output = run(&[&"verify", &missing]);
    assert_eq!(code(&output), 1);
    let err = stderr(&output);
    let os_error = std::io::Error::from_raw_os_error(2).to_string();
    assert_eq!(err.matches(&os_error).count(), 1, "{err}");
    assert!(
        err.contains(&format!("list {}: {os_error}", missing.display())),
        "{err}"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn verify_names_a_symlink_named_like_a_segment_and_is_not_clean() {
    let journal = journal(0, 1).await;
    let link = journal.path().join("00000000000000000099.seg");
    std::os::unix::fs::symlink(journal.path().join("nowhere"), &link).unwrap();
    let output = run(&[&"verify", &journal.path()]);
    assert_eq!(code(&output), 1, "{}{}", stdout(&output), stderr(&output));
    assert_eq!(
        stdout(&output),
        format!(
            "{}: skipped: not a regular file but a symbolic link\n",
            link.display()
        )
    );
}

#[tokio::test]
async fn verify_is_clean_then_finds_a_flipped_byte_at_its_record() {
    let journal = journal(1, 4).await;
    let output = run(&[&"verify", &journal.path()]);
    assert_eq!(code(&output), 0, "{}{}", stdout(&output), stderr(&output));
    assert_eq!(stdout(&output), "");
    assert!(stderr(&output).contains("clean"), "{}", stderr(&output));

    let [segment] = &live_segments(journal.path())[..] else {
        panic!("expected one live segment");
    };
    let mut bytes = std::fs::read(segment).unwrap();
    let offsets = record_offsets(&bytes);
    assert_eq!(offsets.len(), 5);
    // One flipped bit in the payload of a record in the middle (after the record header and
    // the body's fixed fields; a queued task has no last error).
    let target = offsets[2];
    bytes[target + 32 + 28 + 2] ^= 0x04;
    std::fs::write(segment, &bytes).unwrap();
    let before = snapshot(journal.path());

    let output = run(&[&"verify", &journal.path()]);
    assert_eq!(code(&output), 1, "{}{}", stdout(&output), stderr(&output));
    let expected = format!(
        "{}: offset {target}: damaged records: record checksum mismatch ({} bytes)\n",
        segment.display(),
        offsets[3] - target
    );
    assert_eq!(stdout(&output), expected);
    assert!(stderr(&output).contains("DAMAGED"), "{}", stderr(&output));

    let output = run(&[&"verify", &journal.path(), &"--json"]);
    assert_eq!(code(&output), 1);
    let found: Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    assert_eq!(found["path"], segment.display().to_string());
    assert_eq!(found["offset"], target);
    assert_eq!(found["kind"], "damaged_records");

    // Read-only: nothing was repaired or copied.
    assert_eq!(snapshot(journal.path()), before);
    // The damage costs only its record.
    let mut expected = expected_ids(&journal.live);
    let lost = id_at(&bytes, target);
    expected.retain(|id| *id != lost);
    assert_eq!(ids(&inspect(journal.path(), false)), expected);
}

/// The id of the record at `offset`.
fn id_at(bytes: &[u8], offset: usize) -> String {
    let run = u64::from_le_bytes(bytes[offset + 16..offset + 24].try_into().unwrap());
    let seq = u64::from_le_bytes(bytes[offset + 24..offset + 32].try_into().unwrap());
    format!("{run}-{seq}")
}

#[tokio::test]
async fn verify_reports_a_torn_tail() {
    let journal = journal(0, 2).await;
    let [segment] = &live_segments(journal.path())[..] else {
        panic!("expected one live segment");
    };
    let mut bytes = std::fs::read(segment).unwrap();
    let last = *record_offsets(&bytes).last().unwrap();
    bytes.truncate(last + 20);
    std::fs::write(segment, &bytes).unwrap();
    let output = run(&[&"verify", &journal.path()]);
    assert_eq!(code(&output), 1);
    assert_eq!(
        stdout(&output),
        format!(
            "{}: offset {last}: torn tail: record runs past the end of the file (20 bytes)\n",
            segment.display()
        )
    );
    assert_eq!(std::fs::read(segment).unwrap(), bytes);
}

#[tokio::test]
async fn requeue_refuses_while_a_pool_holds_the_lock() {
    let journal = journal(2, 0).await;
    let ledger = Ledger::default();
    let pool = start(journal.path(), &ledger, false).await;
    let before = snapshot(journal.path());

    let output = run(&[&"requeue", &journal.path(), &"--all"]);
    assert_eq!(code(&output), 1);
    assert_eq!(stdout(&output), "");
    assert_eq!(
        stderr(&output),
        format!(
            "drainpool: error: journal directory {} is locked by a running pool; stop it first\n",
            journal.path().display()
        )
    );
    assert_eq!(snapshot(journal.path()), before);
    // Reading works meanwhile.
    assert_eq!(inspect(journal.path(), true).len(), 2);

    assert!(pool.shutdown().await.unwrap().is_clean());
    assert!(ledger.lock().unwrap().is_empty());
    assert_eq!(inspect(journal.path(), true).len(), 2);
}

#[tokio::test]
async fn requeue_all_brings_dead_letters_back_and_the_next_start_runs_them() {
    let journal = journal(3, 2).await;
    let output = run(&[&"requeue", &journal.path(), &"--all"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let printed: Vec<String> = stdout(&output).lines().map(str::to_owned).collect();
    assert_eq!(printed, expected_ids(&journal.dead));
    assert!(
        stderr(&output).contains("requeued 3 dead letter(s)"),
        "{}",
        stderr(&output)
    );

    assert!(inspect(journal.path(), true).is_empty());
    let live = inspect(journal.path(), false);
    let mut expected: Vec<(TaskId, Job)> =
        journal.live.iter().chain(&journal.dead).cloned().collect();
    expected.sort_by_key(|(id, _)| *id);
    assert_eq!(ids(&live), expected_ids(&expected));
    let verify = run(&[&"verify", &journal.path()]);
    assert_eq!(code(&verify), 0, "{}", stdout(&verify));

    // The handler was fixed: the next start runs every task, the dead letters included.
    let ledger = Ledger::default();
    let pool = start(journal.path(), &ledger, false).await;
    assert_eq!(pool.recovery().replayed, 6);
    assert_eq!(pool.recovery().dead_letters, 0);
    eventually(PATIENCE, "the replay", || pool.stats().completed == 6).await;
    assert!(pool.shutdown().await.unwrap().is_clean());
    let mut ran = ledger.lock().unwrap().clone();
    ran.sort();
    let expected: Vec<(TaskId, u64)> = expected.iter().map(|(id, job)| (*id, job.n)).collect();
    assert_eq!(ran, expected);

    assert!(inspect(journal.path(), false).is_empty());
    assert!(inspect(journal.path(), true).is_empty());
}

#[tokio::test]
async fn requeue_by_id_takes_back_only_those() {
    let journal = journal(3, 0).await;
    let (first, third) = (journal.dead[0].0.to_string(), journal.dead[2].0.to_string());
    let both = format!("{first},{third}");
    let output = run(&[&"requeue", &journal.path(), &"--id", &both]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(stdout(&output), format!("{first}\n{third}\n"));
    assert_eq!(
        ids(&inspect(journal.path(), true)),
        [journal.dead[1].0.to_string()]
    );
    assert_eq!(ids(&inspect(journal.path(), false)), [first.clone(), third]);

    // The repeated option works too; `first` is no longer a dead letter.
    let second = journal.dead[1].0.to_string();
    let before = snapshot(journal.path());
    let output = run(&[
        &"requeue",
        &journal.path(),
        &"--id",
        &second,
        &"--id",
        &first,
    ]);
    assert_eq!(code(&output), 1);
    assert_eq!(
        stderr(&output),
        format!("drainpool: error: no dead letter with id {first}\n")
    );
    assert_eq!(snapshot(journal.path()), before);
}

#[tokio::test]
async fn requeue_of_an_unknown_id_changes_nothing() {
    let journal = journal(1, 1).await;
    let before = snapshot(journal.path());
    let output = run(&[&"requeue", &journal.path(), &"--id", &"999-1"]);
    assert_eq!(code(&output), 1);
    assert_eq!(stdout(&output), "");
    assert!(
        stderr(&output).contains("no dead letter with id 999-1"),
        "{}",
        stderr(&output)
    );
    // A live task is not a dead letter either.
    let live = journal.live[0].0.to_string();
    let output = run(&[&"requeue", &journal.path(), &"--id", &live]);
    assert_eq!(code(&output), 1);
    assert_eq!(snapshot(journal.path()), before);
}

#[tokio::test]
async fn stats_count_tasks_and_bytes() {
    let journal = journal(2, 3).await;
    let output = run(&[&"stats", &journal.path(), &"--json"]);
    let [stats] = &json_lines(&output)[..] else {
        panic!("expected one JSON line: {}", stdout(&output));
    };
    assert_eq!(stats["segments"], 1);
    assert_eq!(stats["dead_segments"], 1);
    assert_eq!(stats["live_tasks"], 4);
    assert_eq!(stats["dead_letters"], 2);
    assert_eq!(stats["records"], 6);
    assert_eq!(stats["damage"], 0);
    assert_eq!(stats["run"], journal.live[0].0.run());
    let on_disk: u64 = live_segments(journal.path())
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(stats["segment_bytes"], on_disk);

    let output = run(&[&"stats", &journal.path()]);
    assert_eq!(code(&output), 0);
    let table = stdout(&output);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("live tasks") && l.contains(" 4 ")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("dead letters") && l.contains(" 2 ")),
        "{table}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: [&[&dyn AsRef<OsStr>]; 8] = [
        &[],
        &[&"frobnicate", &d],
        &[&"inspect"],
        &[&"inspect", &d, &"--bogus"],
        &[&"requeue", &d],
        &[&"requeue", &d, &"--all", &"--id", &"1-2"],
        &[&"requeue", &d, &"--id", &"1_2"],
        &[&"requeue", &d, &"--id", &"1-"],
    ];
    for args in cases {
        let output = run(args);
        assert_eq!(code(&output), 2, "{}", stderr(&output));
        assert_eq!(stdout(&output), "");
        assert!(!stderr(&output).is_empty());
    }
    let output = run(&[&"requeue", &d, &"--id", &"x-1"]);
    assert!(stderr(&output).contains("run-seq"), "{}", stderr(&output));
}

#[test]
fn a_directory_that_cannot_be_read_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    for command in ["inspect", "verify", "stats", "requeue"] {
        let output = if command == "requeue" {
            run(&[&command, &missing, &"--all"])
        } else {
            run(&[&command, &missing])
        };
        assert_eq!(code(&output), 1, "{command}");
        assert!(
            stderr(&output).starts_with("drainpool: error: "),
            "{command}: {}",
            stderr(&output)
        );
        assert!(stderr(&output).contains("missing"), "{}", stderr(&output));
    }
    assert!(!missing.exists());
}

#[test]
fn help_describes_every_command_and_argument() {
    let output = run(&[&"--help"]);
    assert_eq!(code(&output), 0);
    let help = stdout(&output);
    for word in ["inspect", "verify", "requeue", "stats", "Exit status"] {
        assert!(help.contains(word), "{word}: {help}");
    }
    // With the `postgres` feature, `inspect` and `requeue` read a table instead when given
    // `--postgres URL`, so their directory is `[DIR]` there.
    let dir = if cfg!(feature = "postgres") {
        "[DIR]"
    } else {
        "<DIR>"
    };
    let table: &[&str] = if cfg!(feature = "postgres") {
        &["--postgres <URL>", "--schema <SCHEMA>", "--table <TABLE>"]
    } else {
        &[]
    };
    let inspect = [&[dir, "--dead", "JSON"][..], table].concat();
    let requeue = [
        &[dir, "--id <ID>", "--all", "Refuses while a pool"][..],
        table,
    ]
    .concat();
    let expected: [(&str, &[&str]); 4] = [
        ("inspect", &inspect),
        ("verify", &["<DIR>", "--json", "offset"]),
        ("requeue", &requeue),
        ("stats", &["<DIR>", "--json"]),
    ];
    for (command, words) in expected {
        let output = run(&[&command, &"--help"]);
        assert_eq!(code(&output), 0);
        let help = stdout(&output);
        for word in words {
            assert!(help.contains(word), "{command}: {word}: {help}");
        }
    }
}

#[tokio::test]
async fn inspect_prints_each_tasks_options() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, runner) = Pool::<String>::builder()
        .journal_dir(dir.path())
        .build()
        .await
        .unwrap();
    let plain = pool.submit("plain".to_string()).await.unwrap();
    let rich = pool
        .task("rich".to_string())
        .priority(4)
        .max_attempts(7)
        .time_to_live(Duration::from_secs(3600))
        .unique_key("rich:1")
        .submit()
        .await
        .unwrap();
    drop(runner);
    pool.shutdown().await.unwrap();
    let live = inspect(dir.path(), false);
    // The higher priority first: the order the next start replays them.
    assert_eq!(ids(&live), [rich.to_string(), plain.to_string()]);
    assert_eq!(live[0]["priority"], 4);
    assert_eq!(live[0]["max_attempts"], 7);
    assert!(live[0]["expires_at_ms"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!(live[0]["unique_key"], "rich:1");
    assert_eq!(live[1]["priority"], 0);
    assert_eq!(live[1]["max_attempts"], Value::Null);
    assert_eq!(live[1]["expires_at_ms"], Value::Null);
    assert_eq!(live[1]["unique_key"], Value::Null);
}
