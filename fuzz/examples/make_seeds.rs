//! Writes the fuzz targets' seed corpus, `fuzz/seeds/<target>/`, from real journals.
//!
//! Two pools run in temporary directories: one spills at shutdown (queued tasks, and one
//! interrupted at the deadline), one journals write-ahead with one attempt per task (its
//! segment while it runs: task records and acks; after it: a dead letter with its error, the
//! interrupted task compacted into a new segment), and then `requeue` takes the
//! dead letter back (a live segment it writes, a dead-letter segment of acks). Every segment
//! and `LOCK` file they leave becomes a seed, shaped for each target's input.
//!
//! Run it with `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use drainpool::journal::Requeue;
use drainpool::{BoxError, Durability, Pool, SyncPolicy, Task};

async fn handle(task: Task<String>) -> Result<(), BoxError> {
    match task.payload().as_str() {
        "slow" => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        }
        "fail" => Err("upstream said 503: Service Unavailable".into()),
        _ => Ok(()),
    }
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_str().unwrap().to_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    found.sort();
    found
}

fn write(seeds: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = seeds.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
    println!("{target}/{name}: {} bytes", bytes.len());
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let seeds = std::env::args().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds"),
        PathBuf::from,
    );

    let spilled = tempfile::tempdir()?;
    let pool = Pool::builder()
        .workers(1)
        .drain_deadline(Duration::from_millis(200))
        .cancel_grace(Duration::from_millis(50))
        .journal_dir(spilled.path())
        .start(handle)
        .await?;
    for payload in ["slow", "queued", "{\"to\":\"a@example.com\"}"] {
        pool.submit(payload.to_owned()).await?;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    pool.shutdown().await?;

    let write_ahead = tempfile::tempdir()?;
    let pool = Pool::builder()
        .workers(2)
        .durability(Durability::write_ahead(SyncPolicy::Always))
        .max_attempts(1)
        .drain_deadline(Duration::from_millis(200))
        .cancel_grace(Duration::from_millis(50))
        .journal_dir(write_ahead.path())
        .start(handle)
        .await?;
    for payload in ["done", "fail", "done too", "slow"] {
        pool.submit(payload.to_owned()).await?;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The running pool's segment: task records, and acks for the tasks that finished.
    let running = files(write_ahead.path());
    pool.shutdown().await?;
    let before_requeue = files(write_ahead.path());
    drainpool::journal::requeue(write_ahead.path(), Requeue::All)?;

    let mut all = Vec::new();
    for (name, bytes) in files(spilled.path()) {
        all.push((format!("spill-{name}"), bytes));
    }
    for (name, bytes) in running {
        if name.ends_with(".seg") && !name.starts_with("dead-") {
            all.push((format!("running-{name}"), bytes));
        }
    }
    for (name, bytes) in files(write_ahead.path()) {
        let requeued = !before_requeue.iter().any(|(n, _)| *n == name);
        let prefix = if requeued { "requeue" } else { "write-ahead" };
        all.push((format!("{prefix}-{name}"), bytes));
    }
    for (name, bytes) in &all {
        if name.ends_with("LOCK") {
            write(&seeds, "lock_run", name, bytes);
            continue;
        }
        write(&seeds, "segment_scan", name, bytes);
        // The record decoder: the epoch, then the bytes from the first record on.
        let mut record = bytes[16..24].to_vec();
        record.extend_from_slice(&bytes[48..]);
        write(&seeds, "record_decode", name, &record);
        // The directory: flags (dead-letter segment, a LOCK file), the LOCK, the segment.
        let dead = name.contains("dead-");
        let lock = &all.iter().find(|(n, _)| n.ends_with("LOCK")).unwrap().1;
        let mut input = vec![u8::from(dead) | 2, lock.len() as u8];
        input.extend_from_slice(lock);
        input.extend_from_slice(bytes);
        write(&seeds, "journal_dir", name, &input);
    }
    Ok(())
}
