//! `cargo bench -p drainpool-benches --bench codec`: the journal's record encoder and decoder,
//! in bytes per second, to catch regressions.
//!
//! The encoder and decoder are crate-private, so this measures them through the public API, at
//! a small scale where they dominate:
//!
//! - `spill`: 10,000 queued tasks spilled by `shutdown_now()`, timed by the report's
//!   `spill_time` (encoding and writing; fsync excluded);
//! - `reload`: `start()` on a journal of the same 10,000 tasks (scanning, CRC checks, decoding
//!   and deserializing the payloads, queueing them for replay).
//!
//! Throughput is the journal's size in bytes. The journal lives on tmpfs (`/dev/shm`) where
//! there is one, so the disk's noise stays out of a CPU measurement; otherwise under
//! `target/bench/`.

mod common;

use common::{Email, email};

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use drainpool::{Pool, Task};
use tokio::runtime::Runtime;

const TASKS: u64 = 10_000;

/// A scratch directory for journals, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let shm = Path::new("/dev/shm");
        let base =
            if shm.is_dir() && std::fs::metadata(shm).is_ok_and(|m| !m.permissions().readonly()) {
                shm.to_path_buf()
            } else {
                // The workspace's `target/`: this package lives in `benches/`.
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench")
            };
        let dir = base.join(format!("drainpool-codec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One worker whose handler waits for the drain deadline: nothing completes.
async fn blocked_pool(dir: &Path) -> Pool<Email> {
    Pool::builder()
        .workers(1)
        .queue_capacity(TASKS as usize + 16)
        .journal_dir(dir)
        .start(|task: Task<Email>| async move {
            task.cancelled().await;
            Ok::<(), Infallible>(())
        })
        .await
        .expect("start a pool")
}

async fn until_in_flight(pool: &Pool<Email>) {
    while pool.stats().in_flight == 0 {
        tokio::task::yield_now().await;
    }
}

/// Queues `TASKS` tasks behind one in flight and spills them. Returns the report's encode and
/// write time.
fn spill_into(rt: &Runtime, dir: &Path) -> Duration {
    rt.block_on(async {
        let pool = blocked_pool(dir).await;
        for i in 0..=TASKS {
            pool.submit(email(i)).await.expect("submit");
        }
        until_in_flight(&pool).await;
        pool.shutdown_now();
        let report = pool.wait().await.expect("shutdown");
        assert_eq!(report.spilled, TASKS, "{report:?}");
        report.spill_time
    })
}

/// The journal directory's segment files and their total size.
fn segments(dir: &Path) -> (Vec<PathBuf>, u64) {
    let mut files = Vec::new();
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir).expect("list the journal") {
        let entry = entry.expect("list the journal");
        if entry.file_name().to_string_lossy().ends_with(".seg") {
            bytes += entry.metadata().expect("stat a segment").len();
            files.push(entry.path());
        }
    }
    (files, bytes)
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("create a journal copy");
    for entry in std::fs::read_dir(from).expect("list the journal") {
        let entry = entry.expect("list the journal");
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy the journal");
        }
    }
}

fn codec(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let scratch = Scratch::new();
    let prepared = scratch.0.join("prepared");
    spill_into(&rt, &prepared);
    let (files, bytes) = segments(&prepared);
    assert_eq!(files.len(), 1, "one segment expected: {files:?}");

    let mut group = c.benchmark_group("journal");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Bytes(bytes));

    let spill_dir = scratch.0.join("spill");
    group.bench_function("spill 10k tasks (encode+write)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let _ = std::fs::remove_dir_all(&spill_dir);
                total += spill_into(&rt, &spill_dir);
            }
            total
        });
    });

    let reload_dir = scratch.0.join("reload");
    group.bench_function("reload 10k tasks (start)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                copy_dir(&prepared, &reload_dir);
                total += rt.block_on(async {
                    let t = Instant::now();
                    let pool = blocked_pool(&reload_dir).await;
                    let elapsed = t.elapsed();
                    assert_eq!(pool.recovery().replayed as u64, TASKS);
                    pool.shutdown_now();
                    pool.wait().await.expect("shutdown");
                    elapsed
                });
            }
            total
        });
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
