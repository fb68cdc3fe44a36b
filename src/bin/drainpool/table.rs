//! `inspect --postgres`, `requeue --postgres` and `schema`: the PostgreSQL store's table.

use std::process::ExitCode;

use drainpool::PostgresStore;
use drainpool::journal::Requeue;
use drainpool::postgres::TableTask;
use serde_json::{Value, json};

use super::{Command, Failure, Fields, Stdout, Table};

/// `--schema` and `--table` without `--postgres` (clap does not say so when a DIR is
/// given): a usage error, not a silent journal read.
pub(super) fn check(command: &Command) {
    let (Command::Inspect { table, .. } | Command::Requeue { table, .. }) = command else {
        return;
    };
    if let Table {
        postgres: None,
        schema,
        table,
    } = table
        && (schema.is_some() || table.is_some())
    {
        use clap::CommandFactory;
        super::Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--schema and --table go with --postgres <URL>",
            )
            .exit();
    }
}

/// The store at `url`, with its schema and table if given.
pub(super) fn store(url: String, schema: Option<String>, table: Option<String>) -> PostgresStore {
    let store = PostgresStore::new(url);
    let store = match schema {
        Some(schema) => store.schema(schema),
        None => store,
    };
    match table {
        Some(table) => store.table(table),
        None => store,
    }
}

/// Runs `work` on a runtime of its own (the store's calls are async).
fn block_on<F: std::future::Future>(work: F) -> Result<F::Output, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new("could not start a runtime", e))?;
    Ok(runtime.block_on(work))
}

pub(super) fn inspect(
    store: &PostgresStore,
    dead: bool,
    out: &mut Stdout,
) -> Result<ExitCode, Failure> {
    let contents = block_on(store.inspect())?.map_err(Failure::from_error)?;
    let tasks = if dead { &contents.dead } else { &contents.live };
    for task in tasks {
        out.line(task_json(task))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn task_json(task: &TableTask) -> Value {
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
        ("lease_owner", json!(task.lease_owner)),
        ("dead_at_ms", json!(task.dead_at_ms)),
    ])
}

pub(super) fn requeue(
    store: &PostgresStore,
    which: Requeue,
    out: &mut Stdout,
) -> Result<ExitCode, Failure> {
    let requeued = block_on(store.requeue(which))?.map_err(Failure::from_error)?;
    for id in &requeued.ids {
        out.line(id)?;
    }
    if requeued.ids.is_empty() {
        eprintln!("drainpool: no dead letters to requeue");
    } else {
        eprintln!(
            "drainpool: requeued {} dead letter(s) in the table; the pools on it run them now",
            requeued.ids.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `schema`: the migration script for the store with this schema and table.
pub(super) fn print_schema(
    schema: &str,
    table: &str,
    out: &mut Stdout,
) -> Result<ExitCode, Failure> {
    let store = drainpool::PostgresStore::new("")
        .schema(schema)
        .table(table);
    let script = store.schema_sql().map_err(Failure::from_error)?;
    out.line(script.trim_end())?;
    Ok(ExitCode::SUCCESS)
}
