//! The queue past its hot window: tasks beyond the first 1,024 queued are held encoded, and
//! keep their order, their payloads and their accounting through a run, a spill and a reload.

mod common;

use std::time::Duration;

use common::{Action, Job, Ledger, counts_add_up, settle, start};

/// More new tasks than the queue holds decoded.
const MANY: u64 = 2_500;

/// A pool of one worker over `dir`, given `first`, then tasks 1 to `MANY`, which queue up
/// behind it. Each payload differs beyond its number, so one decoded at dispatch is checked
/// whole.
async fn queued_up(dir: &std::path::Path, ledger: &Ledger, first: Job) -> drainpool::Pool<Job> {
    let pool = start(dir, 1, ledger, |b| b.queue_capacity(4096))
        .await
        .unwrap();
    pool.submit(first).await.unwrap();
    settle().await;
    for n in 1..=MANY {
        pool.submit(Job::with(n, n % 7, Action::Work))
            .await
            .unwrap();
    }
    pool
}

#[tokio::test(start_paused = true)]
async fn tasks_past_the_hot_window_run_in_order_with_their_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = queued_up(dir.path(), &ledger, Job::work(0, 1000)).await;
    assert_eq!(pool.stats().queued, MANY);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let expected: Vec<u64> = (0..=MANY).collect();
    assert_eq!(ledger.started(), expected, "FIFO across the hot window");
    let report = pool.shutdown().await.unwrap();
    assert_eq!(report.completed, MANY + 1);
    counts_add_up(&report);
}

#[tokio::test(start_paused = true)]
async fn tasks_held_encoded_are_spilled_and_replayed_first_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = queued_up(
        dir.path(),
        &ledger,
        Job::with(0, 3_600_000, Action::IgnoreToken),
    )
    .await;
    let report = pool.shutdown().await.unwrap();
    assert_eq!((report.spilled, report.interrupted), (MANY, 1));
    assert_eq!(report.submitted, MANY + 1);
    counts_add_up(&report);

    let ledger = Ledger::default();
    let pool = start(dir.path(), 1, &ledger, |b| b).await.unwrap();
    for n in 10_000..10_010 {
        pool.submit(Job::work(n, 1)).await.unwrap();
    }
    // Job 0 (interrupted) ignores its token for an hour; let it and everything else run.
    tokio::time::sleep(Duration::from_secs(3700 + MANY)).await;
    let expected: Vec<u64> = (0..=MANY).chain(10_000..10_010).collect();
    assert_eq!(ledger.started(), expected);
    let runs = ledger.finished();
    assert!(
        runs.iter().all(|run| run.ok && run.attempt == 1),
        "every payload came back whole"
    );
    let report = pool.shutdown().await.unwrap();
    assert_eq!(
        (report.replayed, report.submitted, report.completed),
        (MANY + 1, 10, MANY + 11)
    );
    counts_add_up(&report);
}

/// JSON, but a payload whose number is a multiple of 1,000 no longer decodes.
struct Picky;

impl drainpool::Codec<Job> for Picky {
    fn encode<W: std::io::Write>(&self, value: &Job, out: W) -> Result<(), drainpool::BoxError> {
        Ok(serde_json::to_writer(out, value)?)
    }

    fn decode(&self, bytes: &[u8]) -> Result<Job, drainpool::BoxError> {
        let job: Job = serde_json::from_slice(bytes)?;
        if job.n.is_multiple_of(1000) {
            return Err("refused by the test".into());
        }
        Ok(job)
    }
}

#[tokio::test(start_paused = true)]
async fn a_task_held_encoded_that_no_longer_decodes_becomes_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = start(dir.path(), 1, &ledger, |b| {
        b.queue_capacity(4096).codec(Picky)
    })
    .await
    .unwrap();
    pool.submit(Job::work(1, 1000)).await.unwrap();
    settle().await;
    // Task 1,000 is held decoded (within the window), task 2,000 encoded.
    for n in 2..=MANY {
        pool.submit(Job::work(n, 1)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let expected: Vec<u64> = (1..=MANY).filter(|&n| n != 2000).collect();
    assert_eq!(ledger.started(), expected);
    let report = pool.shutdown().await.unwrap();
    assert_eq!((report.completed, report.failed), (MANY - 1, 1));
    counts_add_up(&report);
    let stats = drainpool::journal::stats(dir.path()).unwrap();
    assert_eq!((stats.dead_letters, stats.live_tasks), (1, 0));
}

/// A reload decodes the first 1,024 replayed tasks at start and the rest as workers take them:
/// a payload that no longer decodes is a dead letter either way, found at start within the
/// first 1,024 (and counted in the recovery report), at dispatch beyond them.
#[tokio::test(start_paused = true)]
async fn a_reload_decodes_the_first_replayed_tasks_at_start_and_the_rest_at_dispatch() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default();
    let pool = queued_up(
        dir.path(),
        &ledger,
        // Not a multiple of 1,000: the codec below refuses those.
        Job::with(4999, 3_600_000, Action::IgnoreToken),
    )
    .await;
    let report = pool.shutdown().await.unwrap();
    assert_eq!((report.spilled, report.interrupted), (MANY, 1));

    // Replayed in id order: task 1,000 is the 1,001st (decoded at start), 2,000 the 2,001st.
    let ledger = Ledger::default();
    let pool = start(dir.path(), 1, &ledger, |b| b.codec(Picky))
        .await
        .unwrap();
    let recovery = pool.recovery();
    assert_eq!(
        (
            recovery.replayed,
            recovery.undecodable,
            recovery.dead_letters
        ),
        (MANY, 1, 1),
        "task 1,000 found at start, task 2,000 not yet: {recovery:?}"
    );
    tokio::time::sleep(Duration::from_secs(3700 + MANY)).await;
    let expected: Vec<u64> = std::iter::once(4999)
        .chain((1..=MANY).filter(|&n| n != 1000 && n != 2000))
        .collect();
    assert_eq!(ledger.started(), expected, "replay order kept around both");
    let report = pool.shutdown().await.unwrap();
    assert_eq!((report.completed, report.failed), (MANY - 1, 1));
    counts_add_up(&report);
    let stats = drainpool::journal::stats(dir.path()).unwrap();
    assert_eq!((stats.dead_letters, stats.live_tasks), (2, 0));
}

/// A handler's log of the tasks it started, in order.
type Started = std::sync::Arc<std::sync::Mutex<Vec<u64>>>;

/// A pool over `dir` whose handler logs each task it starts, then waits for a permit of the
/// returned gate; and that log.
async fn gated_pool(
    dir: &std::path::Path,
    workers: usize,
    capacity: usize,
) -> (
    drainpool::Pool<u64>,
    std::sync::Arc<tokio::sync::Semaphore>,
    Started,
) {
    use std::sync::Arc;

    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Started::default();
    let (handler_gate, handler_started) = (Arc::clone(&gate), Arc::clone(&started));
    let pool = drainpool::Pool::<u64>::builder()
        .workers(workers)
        .queue_capacity(capacity)
        .journal_dir(dir)
        .start(move |task: drainpool::Task<u64>| {
            let (gate, started) = (Arc::clone(&handler_gate), Arc::clone(&handler_started));
            async move {
                started.lock().unwrap().push(*task.payload());
                gate.acquire().await.unwrap().forget();
                Ok::<(), std::convert::Infallible>(())
            }
        })
        .await
        .unwrap();
    (pool, gate, started)
}

/// Waits until `started` holds `n` tasks.
async fn started_count(started: &Started, n: usize) {
    let what = format!("{n} tasks to start");
    common::eventually(common::PATIENCE, &what, || {
        started.lock().unwrap().len() == n
    })
    .await;
}

/// A full queue wakes a waiting submitter once a batch of slots is free; a slot freed below
/// the batch, with every worker then busy with a long task, still reaches it (the upkeep task
/// hands owed room over).
#[tokio::test]
async fn a_slot_freed_below_the_batch_reaches_a_waiting_submit_while_the_workers_stay_busy() {
    let dir = tempfile::tempdir().unwrap();
    // Capacity 16: a submitter is woken at 2 free slots. Four workers: from 16 waiting, each
    // takes one task at a time (a worker takes several only from a longer queue).
    let (pool, gate, started) = gated_pool(dir.path(), 4, 16).await;
    for n in 0..20 {
        pool.submit(n).await.unwrap();
    }
    // Four run, sixteen wait: the queue is full.
    started_count(&started, 4).await;
    assert!(matches!(
        pool.try_submit(99),
        Err(drainpool::SubmitError::Full(99))
    ));
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move { pool.submit(100).await.map_err(|e| e.into_inner()) }
    });
    // One task ends; its worker takes the next and blocks on it: one slot free, below the
    // batch, and no other take comes.
    gate.add_permits(1);
    started_count(&started, 5).await;
    let accepted = tokio::time::timeout(common::PATIENCE, waiting)
        .await
        .expect("the waiting submit never got the slot freed below the batch")
        .unwrap();
    assert!(accepted.is_ok(), "{accepted:?}");
    gate.add_permits(1_000);
    let report = pool.shutdown().await.unwrap();
    assert_eq!(report.completed + report.spilled, 21, "{report:?}");
    counts_add_up(&report);
}

/// Tasks a worker took at once from a long queue (its hand) and had not started when intake
/// closed are spilled with the rest, none of them started, and come back at the next start.
#[tokio::test]
async fn tasks_in_the_workers_hands_at_shutdown_are_spilled_and_replayed() {
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let (pool, gate, started) = gated_pool(dir.path(), 2, 64).await;
    // Two run (each taken alone from a short queue), then 64 wait.
    for n in 0..2 {
        pool.submit(n).await.unwrap();
    }
    started_count(&started, 2).await;
    for n in 2..66 {
        pool.submit(n).await.unwrap();
    }
    // Both finish; from 64 waiting each takes several at once: one to run, the rest in its
    // hand.
    gate.add_permits(2);
    started_count(&started, 4).await;
    assert_eq!(pool.stats().queued, 62, "the hands' tasks count as queued");
    let shutdown = tokio::spawn({
        let pool = pool.clone();
        async move { pool.shutdown().await }
    });
    assert!(
        common::poll_until(common::PATIENCE, || pool.state()
            != drainpool::State::Running)
        .await
    );
    // Intake is closed: the two running finish, and nothing in a hand starts.
    gate.add_permits(1_000);
    let report = shutdown.await.unwrap().unwrap();
    assert_eq!((report.completed, report.spilled), (4, 62), "{report:?}");
    counts_add_up(&report);
    let ran: BTreeSet<u64> = started.lock().unwrap().iter().copied().collect();
    assert_eq!(ran.len(), 4);
    drop(pool);

    // The next start replays exactly the 62 that never started.
    let replayed = Arc::new(Mutex::new(BTreeSet::new()));
    let seen = Arc::clone(&replayed);
    let pool = drainpool::Pool::<u64>::builder()
        .workers(2)
        .journal_dir(dir.path())
        .start(move |task: drainpool::Task<u64>| {
            seen.lock().unwrap().insert(*task.payload());
            std::future::ready(Ok::<(), std::convert::Infallible>(()))
        })
        .await
        .unwrap();
    let all_back = || replayed.lock().unwrap().len() == 62;
    assert!(common::poll_until(common::PATIENCE, all_back).await);
    let report = pool.shutdown().await.unwrap();
    assert_eq!((report.replayed, report.completed), (62, 62), "{report:?}");
    let expected: BTreeSet<u64> = (0..66).filter(|n| !ran.contains(n)).collect();
    assert_eq!(*replayed.lock().unwrap(), expected);
}
