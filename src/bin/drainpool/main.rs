//! `drainpool`: look into a drainpool journal directory, check it, and take dead letters back.
//!
//! Built only with the `cli` feature: `cargo install drainpool --features cli`, or
//! `cargo run --features cli --bin drainpool -- --help`. Results go to stdout (JSON lines where
//! they are records), messages to stderr. Exit status: 0 success, 1 damage found or the
//! operation failed, 2 a usage error.
//!
//! Built with the `postgres` feature too, `schema` prints the PostgreSQL store's migration
//! script, for teams whose DBAs apply migrations, and `inspect --postgres URL` and
//! `requeue --postgres URL` read the store's table (its live tasks and dead letters) and take
//! its dead letters back, instead of a journal directory's.

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use drainpool::journal::{JournaledTask, Requeue};
use drainpool::{Damage, TaskId};
use serde_json::{Value, json};

/// Look into a drainpool journal directory, check it, and take dead letters back.
///
/// `inspect`, `verify` and `stats` only read: they take no lock and change nothing, so they
/// may run beside a pool (whose segment being written may then show a torn tail). `requeue`
/// writes, and refuses while a pool holds the directory.
#[derive(Debug, Parser)]
#[command(
    name = "drainpool",
    version,
    after_help = "Exit status: 0 success; 1 damage found (verify) or the operation failed; \
                  2 a usage error.\n\
                  Results go to stdout, messages to stderr."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print every live task (or every dead letter) as one JSON object per line.
    ///
    /// Live tasks are printed in the order the next start replays them, dead letters in id
    /// order. Each line holds: id ("run-seq"), attempts (failed runs so far), interruptions,
    /// interrupted (whether the last run was cut off at the drain deadline), enqueued_at_ms
    /// and not_before_ms (milliseconds since the Unix epoch; 0: at once), last_error (or
    /// null), payload (the task's JSON; a string if the bytes are not JSON), its options:
    /// priority (0 to 7), max_attempts (its own retry limit, or null: the pool's),
    /// expires_at_ms (or null: never), unique_key (or null); and the segment and offset of
    /// the record it was read from.
    ///
    /// With --postgres, the PostgreSQL store's table instead, in id order: live tasks
    /// (waiting, or held by a pool) or dead letters, each line with lease_owner (the run of
    /// the pool holding it, or null) and dead_at_ms (or null) instead of segment and offset.
    Inspect {
        /// The journal directory (the pool's `journal_dir`).
        #[arg(value_name = "DIR")]
        #[cfg_attr(feature = "postgres", arg(required_unless_present = "postgres"))]
        #[cfg_attr(not(feature = "postgres"), arg(required = true))]
        dir: Option<PathBuf>,
        /// Print the dead letters instead of the live tasks.
        #[arg(long)]
        dead: bool,
        #[cfg(feature = "postgres")]
        #[command(flatten)]
        table: Table,
    },
    /// Check every segment header and record; report each damaged stretch with file and offset.
    ///
    /// Prints one line per finding to stdout: `PATH: offset N: KIND: REASON (LEN bytes)`,
    /// where KIND is "damaged header", "damaged records" (followed by valid records: the next
    /// start skips them and keeps a copy of the file) or "torn tail" (nothing valid after it:
    /// the next start truncates it). Exits 0 when clean, 1 when anything is found.
    Verify {
        /// The journal directory (the pool's `journal_dir`).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Print each finding as a JSON object (path, offset, len, kind, reason) instead.
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back into the live journal, so the next start runs them.
    ///
    /// Each is written as a fresh live task (same id, payload and last error; attempts and
    /// interruptions reset) and made durable before its dead letter is marked as taken back,
    /// so a crash in between duplicates, never loses; requeuing again completes the move.
    /// Prints the ids taken back, one per line. Refuses while a pool holds the directory.
    ///
    /// With --postgres, the dead letters of the PostgreSQL store's table: live again in one
    /// transaction (attempts and interruptions reset, the last error kept, due at once), and
    /// the pools on the table are notified, so they run them at once. Safe while pools run.
    Requeue {
        /// The journal directory (the pool's `journal_dir`).
        #[arg(value_name = "DIR")]
        #[cfg_attr(feature = "postgres", arg(required_unless_present = "postgres"))]
        #[cfg_attr(not(feature = "postgres"), arg(required = true))]
        dir: Option<PathBuf>,
        #[command(flatten)]
        which: Which,
        #[cfg(feature = "postgres")]
        #[command(flatten)]
        table: Table,
    },
    /// Count segments, records, live tasks, dead letters and damage, with their sizes.
    ///
    /// With --json, one object with the keys segments, segment_bytes, dead_segments,
    /// dead_segment_bytes, records (valid ones, superseded included), live_tasks,
    /// live_payload_bytes, dead_letters, dead_payload_bytes, damage (damaged stretches and torn
    /// tails), damaged_copies, damaged_copy_bytes (copies kept under damaged/ by earlier
    /// starts) and run (the run counter in LOCK, or null).
    Stats {
        /// The journal directory (the pool's `journal_dir`).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the PostgreSQL store's migration script (what a pool applies at start) for a
    /// DBA to apply, e.g. `drainpool schema --schema jobs | psql "$DATABASE_URL"`.
    ///
    /// One transaction under an advisory lock; every statement idempotent, so applying it
    /// twice, or while pools run, is safe. Start the pools with `PostgresStore::migrate(false)`
    /// to have them only check the version.
    #[cfg(feature = "postgres")]
    Schema {
        /// The schema the tables live in (the store's `schema`).
        #[arg(long, default_value = "public")]
        schema: String,
        /// The tasks table (the store's `table`); its version table is `<TABLE>_meta`.
        #[arg(long, default_value = "drainpool_tasks")]
        table: String,
    },
}

/// The PostgreSQL store's table, instead of a journal directory.
#[cfg(feature = "postgres")]
#[derive(Debug, Args)]
struct Table {
    /// Read the PostgreSQL store's table instead of a journal directory: its connection URL
    /// (`postgres://user@host/db`, as the pools' `PostgresStore::new`).
    #[arg(long, value_name = "URL", conflicts_with = "dir")]
    postgres: Option<String>,
    /// With --postgres: the schema the tables live in (the store's `schema`) [default:
    /// public].
    #[arg(long, requires = "postgres")]
    schema: Option<String>,
    /// With --postgres: the tasks table (the store's `table`) [default: drainpool_tasks].
    #[arg(long, requires = "postgres")]
    table: Option<String>,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct Which {
    /// Requeue this dead letter (its id as `inspect --dead` prints it, e.g. 3-17). Repeat the
    /// option, or separate ids with commas, for several. If one is not a dead letter, nothing
    /// is written.
    #[arg(long = "id", value_name = "ID", value_delimiter = ',')]
    ids: Vec<TaskId>,
    /// Requeue every dead letter.
    #[arg(long)]
    all: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(feature = "postgres")]
    table::check(&cli.command);
    let mut out = Stdout::new();
    let result = match cli.command {
        #[cfg(feature = "postgres")]
        Command::Inspect {
            dead,
            table:
                Table {
                    postgres: Some(url),
                    schema,
                    table,
                },
            ..
        } => table::inspect(&table::store(url, schema, table), dead, &mut out),
        Command::Inspect { dir, dead, .. } => {
            given(dir).and_then(|dir| inspect(&dir, dead, &mut out))
        }
        Command::Verify { dir, json } => verify(&dir, json, &mut out),
        #[cfg(feature = "postgres")]
        Command::Requeue {
            which,
            table:
                Table {
                    postgres: Some(url),
                    schema,
                    table,
                },
            ..
        } => table::requeue(&table::store(url, schema, table), which.into(), &mut out),
        Command::Requeue { dir, which, .. } => {
            given(dir).and_then(|dir| requeue(&dir, which, &mut out))
        }
        Command::Stats { dir, json } => stats(&dir, json, &mut out),
        #[cfg(feature = "postgres")]
        Command::Schema { schema, table } => table::print_schema(&schema, &table, &mut out),
    };
    let result = result.and_then(|code| {
        out.finish()
            .map_err(|e| Failure::new("could not write to stdout", e))?;
        Ok(code)
    });
    match result {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("drainpool: error: {failure}");
            ExitCode::from(1)
        }
    }
}

/// An operation that failed: its error and the error's sources, for stderr.
#[derive(Debug)]
struct Failure(String);

impl Failure {
    fn new(what: &str, error: impl std::error::Error) -> Self {
        Self(format!("{what}: {}", chain(&error)))
    }

    fn from_error(error: impl std::error::Error) -> Self {
        Self(chain(&error))
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // Each error's message leaves its source out (the Rust API guidelines' rule, which
        // drainpool's errors keep): the chain is printed here, each cause once.
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Stdout, buffered; a reader that went away (`| head`) ends the output quietly.
struct Stdout {
    out: BufWriter<io::StdoutLock<'static>>,
    closed: bool,
}

impl Stdout {
    fn new() -> Self {
        Self {
            out: BufWriter::new(io::stdout().lock()),
            closed: false,
        }
    }

    fn line(&mut self, line: impl std::fmt::Display) -> Result<(), Failure> {
        if self.closed {
            return Ok(());
        }
        let result = writeln!(self.out, "{line}");
        self.check(result)
            .map_err(|e| Failure::new("could not write to stdout", e))
    }

    fn finish(&mut self) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let result = self.out.flush();
        self.check(result)
    }

    fn check(&mut self, result: io::Result<()>) -> io::Result<()> {
        match result {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            other => other,
        }
    }
}

fn inspect(dir: &Path, dead: bool, out: &mut Stdout) -> Result<ExitCode, Failure> {
    let contents = drainpool::journal::inspect(dir).map_err(Failure::from_error)?;
    let tasks = if dead { &contents.dead } else { &contents.live };
    for task in tasks {
        out.line(task_json(task))?;
    }
    if contents.damage > 0 {
        eprintln!(
            "drainpool: warning: {} damaged stretch(es) skipped; `drainpool verify {}` shows where",
            contents.damage,
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn task_json(task: &JournaledTask) -> Value {
    Fields {
        id: task.id,
        attempts: task.attempts,
        interruptions: task.interruptions,
        interrupted: task.interrupted,
        enqueued_at_ms: task.enqueued_at_ms,
        not_before_ms: task.not_before_ms,
        last_error: task.last_error.as_deref(),
        payload: &task.payload,
        priority: task.priority,
        max_attempts: task.max_attempts,
        expires_at_ms: task.expires_at_ms,
        unique_key: task.unique_key.as_deref(),
    }
    .json([
        ("segment", json!(task.segment.display().to_string())),
        ("offset", json!(task.offset)),
    ])
}

/// What a task's line holds wherever it is kept (a journal directory, the PostgreSQL table).
struct Fields<'a> {
    id: TaskId,
    attempts: u32,
    interruptions: u32,
    interrupted: bool,
    enqueued_at_ms: u64,
    not_before_ms: u64,
    last_error: Option<&'a str>,
    payload: &'a [u8],
    priority: u8,
    max_attempts: Option<u32>,
    expires_at_ms: Option<u64>,
    unique_key: Option<&'a str>,
}

impl Fields<'_> {
    /// The line: these fields, then the `place`'s (where the task is kept), in that order.
    fn json(&self, place: [(&str, Value); 2]) -> Value {
        let payload = serde_json::from_slice::<Value>(self.payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(self.payload).into_owned()));
        let mut line = json!({
            "id": self.id.to_string(),
            "attempts": self.attempts,
            "interruptions": self.interruptions,
            "interrupted": self.interrupted,
            "enqueued_at_ms": self.enqueued_at_ms,
            "not_before_ms": self.not_before_ms,
            "last_error": self.last_error,
            "payload": payload,
            "priority": self.priority,
            "max_attempts": self.max_attempts,
            "expires_at_ms": self.expires_at_ms,
            "unique_key": self.unique_key,
        });
        if let Value::Object(fields) = &mut line {
            for (key, value) in place {
                fields.insert(key.to_owned(), value);
            }
        }
        line
    }
}

fn verify(dir: &Path, as_json: bool, out: &mut Stdout) -> Result<ExitCode, Failure> {
    let verification = drainpool::journal::verify(dir).map_err(Failure::from_error)?;
    let mut findings: Vec<(&Damage, &str)> = verification
        .damage
        .iter()
        .map(|d| {
            let kind = if d.offset == 0 {
                "damaged header"
            } else {
                "damaged records"
            };
            (d, kind)
        })
        .chain(verification.torn_tails.iter().map(|d| (d, "torn tail")))
        .collect();
    findings.sort_by(|a, b| (&a.0.path, a.0.offset).cmp(&(&b.0.path, b.0.offset)));
    for (damage, kind) in &findings {
        if as_json {
            out.line(json!({
                "path": damage.path.display().to_string(),
                "offset": damage.offset,
                "len": damage.len,
                "kind": kind.replace(' ', "_"),
                "reason": damage.reason,
            }))?;
        } else {
            out.line(format_args!(
                "{}: offset {}: {kind}: {} ({} bytes)",
                damage.path.display(),
                damage.offset,
                damage.reason,
                damage.len
            ))?;
        }
    }
    for skipped in &verification.skipped {
        if as_json {
            out.line(json!({
                "path": skipped.path.display().to_string(),
                "kind": "skipped",
                "reason": format!("not a regular file but a {}", skipped.kind),
            }))?;
        } else {
            out.line(format_args!(
                "{}: skipped: not a regular file but a {}",
                skipped.path.display(),
                skipped.kind
            ))?;
        }
    }
    let summary = format!(
        "{} segment(s), {} valid record(s)",
        verification.segments, verification.records
    );
    if verification.is_clean() {
        eprintln!("drainpool: {}: clean: {summary}", dir.display());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "drainpool: {}: DAMAGED: {} damaged stretch(es), {} torn tail(s), {} skipped; {summary}",
            dir.display(),
            verification.damage.len(),
            verification.torn_tails.len(),
            verification.skipped.len(),
        );
        Ok(ExitCode::from(1))
    }
}

/// The directory clap made sure of (it is required unless --postgres is given).
fn given(dir: Option<PathBuf>) -> Result<PathBuf, Failure> {
    dir.ok_or_else(|| Failure("a journal directory is required".into()))
}

impl From<Which> for Requeue {
    fn from(which: Which) -> Self {
        if which.all {
            Self::All
        } else {
            Self::Ids(which.ids)
        }
    }
}

fn requeue(dir: &Path, which: Which, out: &mut Stdout) -> Result<ExitCode, Failure> {
    let requeued = drainpool::journal::requeue(dir, which.into()).map_err(Failure::from_error)?;
    for id in &requeued.ids {
        out.line(id)?;
    }
    match &requeued.live_segment {
        _ if requeued.ids.is_empty() => eprintln!("drainpool: no dead letters to requeue"),
        Some(segment) => eprintln!(
            "drainpool: requeued {} dead letter(s) into {}; they run at the next start",
            requeued.ids.len(),
            segment.display()
        ),
        None => eprintln!(
            "drainpool: requeued {} dead letter(s) that were live already; they run at the next start",
            requeued.ids.len()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn stats(dir: &Path, as_json: bool, out: &mut Stdout) -> Result<ExitCode, Failure> {
    let s = drainpool::journal::stats(dir).map_err(Failure::from_error)?;
    if as_json {
        out.line(json!({
            "segments": s.segments,
            "segment_bytes": s.segment_bytes,
            "dead_segments": s.dead_segments,
            "dead_segment_bytes": s.dead_segment_bytes,
            "records": s.records,
            "live_tasks": s.live_tasks,
            "live_payload_bytes": s.live_payload_bytes,
            "dead_letters": s.dead_letters,
            "dead_payload_bytes": s.dead_payload_bytes,
            "damage": s.damage,
            "damaged_copies": s.damaged_copies,
            "damaged_copy_bytes": s.damaged_copy_bytes,
            "run": s.run,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    let run = s
        .run
        .map_or_else(|| "unknown".to_owned(), |r| r.to_string());
    let rows = [
        (
            "live segments",
            s.segments.to_string(),
            bytes(s.segment_bytes),
        ),
        (
            "dead segments",
            s.dead_segments.to_string(),
            bytes(s.dead_segment_bytes),
        ),
        ("records", s.records.to_string(), String::new()),
        (
            "live tasks",
            s.live_tasks.to_string(),
            format!("{} of payload", bytes(s.live_payload_bytes)),
        ),
        (
            "dead letters",
            s.dead_letters.to_string(),
            format!("{} of payload", bytes(s.dead_payload_bytes)),
        ),
        ("damaged stretches", s.damage.to_string(), String::new()),
        (
            "damaged copies",
            s.damaged_copies.to_string(),
            bytes(s.damaged_copy_bytes),
        ),
        ("run counter", run, String::new()),
    ];
    for (name, value, detail) in rows {
        if detail.is_empty() {
            out.line(format_args!("{name:<18} {value:>10}"))?;
        } else {
            out.line(format_args!("{name:<18} {value:>10}  ({detail})"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn bytes(n: u64) -> String {
    format!("{n} bytes")
}

#[cfg(feature = "postgres")]
mod table;
