//! The shape of the API: the two-phase start and weak handles, codecs other than JSON,
//! `Permanent` found through context, the deadline as one explicit choice, a waiting handler
//! polled once a wake.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{PATIENCE, counts_add_up, eventually};
use drainpool::{BoxError, Codec, Deadline, Permanent, Pool, StartError, State, Task};

/// Tasks `n < 100` each submit a follow-up `n + 100` to their own pool, through a weak handle;
/// dropping the last strong handle still shuts the pool down.
#[tokio::test]
async fn a_handler_submits_follow_ups_to_its_own_pool_through_a_weak_handle() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, runner) = Pool::<u64>::builder()
        .workers(2)
        .journal_dir(dir.path())
        .build()
        .await
        .unwrap();
    let done = Arc::new(Mutex::new(Vec::new()));
    let own = pool.downgrade();
    runner.run({
        let done = Arc::clone(&done);
        move |task: Task<u64>| {
            let (done, own) = (Arc::clone(&done), own.clone());
            async move {
                let n = *task.payload();
                if n < 100 {
                    let pool = own.upgrade().ok_or("the pool is gone")?;
                    pool.submit(n + 100).await.map_err(|e| e.to_string())?;
                }
                done.lock().unwrap().push(n);
                Ok::<(), BoxError>(())
            }
        }
    });
    for n in 0..5 {
        pool.submit(n).await.unwrap();
    }
    eventually(PATIENCE, "every task and follow-up to finish", || {
        done.lock().unwrap().len() == 10
    })
    .await;
    let mut finished = done.lock().unwrap().clone();
    finished.sort_unstable();
    assert_eq!(finished, [0, 1, 2, 3, 4, 100, 101, 102, 103, 104]);
    assert_eq!(pool.stats().completed, 10);

    // The handler's weak handle does not keep the pool alive: dropping this last one stops it.
    let mut state = pool.watch_state();
    let weak = pool.downgrade();
    drop(pool);
    let stopped = tokio::time::timeout(PATIENCE, state.wait_for(|s| s == State::Stopped)).await;
    assert!(
        matches!(stopped, Ok(Some(State::Stopped)) | Ok(None)),
        "{stopped:?}"
    );
    assert!(weak.upgrade().is_none(), "no strong handle is left");
    // The journal was closed and unlocked: another pool can take the directory.
    let again = Pool::<u64>::builder()
        .journal_dir(dir.path())
        .start(|_: Task<u64>| async { Ok::<(), BoxError>(()) })
        .await
        .unwrap();
    assert_eq!(again.recovery().replayed, 0);
    again.shutdown().await.unwrap();
}

/// Tasks submitted before the runner runs wait for it; none is lost or run twice.
#[tokio::test(start_paused = true)]
async fn tasks_submitted_before_the_runner_runs_wait_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, runner) = Pool::<u64>::builder()
        .workers(1)
        .journal_dir(dir.path())
        .build()
        .await
        .unwrap();
    for n in 0..3 {
        pool.submit(n).await.unwrap();
    }
    common::settle().await;
    let stats = pool.stats();
    assert_eq!((stats.queued, stats.completed), (3, 0), "{stats:?}");

    let runs = Arc::new(AtomicU64::new(0));
    runner.run({
        let runs = Arc::clone(&runs);
        move |_: Task<u64>| {
            runs.fetch_add(1, Ordering::SeqCst);
            async { Ok::<(), BoxError>(()) }
        }
    });
    let report = pool.shutdown().await.unwrap();
    // The shutdown spills what no worker took; whatever ran, ran once.
    assert_eq!(report.completed, runs.load(Ordering::SeqCst));
    assert_eq!(report.completed + report.spilled, 3, "{report:?}");
    counts_add_up(&report);
}

/// A runner dropped without running leaves no worker: the pool still accepts tasks, and its
/// shutdown journals them all for the next start.
#[tokio::test(start_paused = true)]
async fn a_runner_never_run_leaves_every_task_to_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, runner) = Pool::<u64>::builder()
        .journal_dir(dir.path())
        .build()
        .await
        .unwrap();
    drop(runner);
    for n in 0..5 {
        pool.submit(n).await.unwrap();
    }
    let report = pool.shutdown().await.unwrap();
    assert_eq!((report.spilled, report.completed), (5, 0), "{report:?}");
    assert!(report.is_clean());

    let ran = Arc::new(Mutex::new(Vec::new()));
    let pool = Pool::<u64>::builder()
        .workers(1)
        .journal_dir(dir.path())
        .start({
            let ran = Arc::clone(&ran);
            move |task: Task<u64>| {
                ran.lock().unwrap().push(*task.payload());
                async { Ok::<(), BoxError>(()) }
            }
        })
        .await
        .unwrap();
    assert_eq!(pool.recovery().replayed, 5);
    eventually(PATIENCE, "the replayed tasks to run", || {
        ran.lock().unwrap().len() == 5
    })
    .await;
    let report = pool.shutdown().await.unwrap();
    assert_eq!(report.completed, 5, "{report:?}");
    assert_eq!(*ran.lock().unwrap(), [0, 1, 2, 3, 4]);
}

/// Payloads that are bytes already, journaled as they are.
struct Raw;

impl Codec<Vec<u8>> for Raw {
    fn encode<W: std::io::Write>(&self, value: &Vec<u8>, mut out: W) -> Result<(), BoxError> {
        Ok(out.write_all(value)?)
    }

    fn decode(&self, bytes: &[u8]) -> Result<Vec<u8>, BoxError> {
        Ok(bytes.to_vec())
    }
}

/// A codec other than JSON: the journal holds its bytes, and the next start decodes them.
#[tokio::test(start_paused = true)]
async fn a_raw_bytes_codec_survives_spill_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let payloads: Vec<Vec<u8>> = vec![vec![0xff, 0x00, 0x7f], Vec::new(), b"plain".to_vec()];
    let (pool, runner) = drainpool::Builder::with_codec(Raw)
        .journal_dir(dir.path())
        .max_record_bytes(4096)
        .build()
        .await
        .unwrap();
    drop(runner);
    for payload in &payloads {
        pool.submit(payload.clone()).await.unwrap();
    }
    // The size check counts the codec's bytes: 4096 less the record's own header is too much.
    let refused = pool.submit(vec![0; 4096]).await.unwrap_err();
    assert!(
        matches!(refused, drainpool::SubmitError::RecordTooLarge { .. }),
        "{refused:?}"
    );
    assert_eq!(pool.shutdown().await.unwrap().spilled, 3);

    let journaled: Vec<Vec<u8>> = drainpool::journal::inspect(dir.path())
        .unwrap()
        .live
        .into_iter()
        .map(|task| task.payload)
        .collect();
    assert_eq!(journaled, payloads, "the journal holds the codec's bytes");

    let ran = Arc::new(Mutex::new(Vec::new()));
    let pool = drainpool::Builder::with_codec(Raw)
        .workers(1)
        .journal_dir(dir.path())
        .start({
            let ran = Arc::clone(&ran);
            move |task: Task<Vec<u8>>| {
                ran.lock().unwrap().push(task.payload().clone());
                async { Ok::<(), BoxError>(()) }
            }
        })
        .await
        .unwrap();
    eventually(PATIENCE, "the replayed tasks to run", || {
        ran.lock().unwrap().len() == 3
    })
    .await;
    assert_eq!(pool.shutdown().await.unwrap().completed, 3);
    assert_eq!(*ran.lock().unwrap(), payloads);
}

/// Context wrapped around a permanent error, as `anyhow`'s `.context(..)` does it.
#[derive(Debug)]
struct Context(Permanent);

impl std::fmt::Display for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("while sending the email")
    }
}

impl std::error::Error for Context {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// A `Permanent` error is found in the source chain: context around it does not turn it into
/// retries.
#[tokio::test(start_paused = true)]
async fn a_permanent_error_inside_context_goes_to_the_dead_letters_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::<u64>::builder()
        .workers(1)
        .max_attempts(5)
        .journal_dir(dir.path())
        .start(|_: Task<u64>| async {
            Err::<(), _>(Context(Permanent::new("the address does not exist")))
        })
        .await
        .unwrap();
    pool.submit(7).await.unwrap();
    common::settle().await;
    let report = pool.shutdown().await.unwrap();
    assert_eq!((report.failed, report.retried), (1, 0), "{report:?}");
    let dead = drainpool::journal::inspect(dir.path()).unwrap().dead;
    assert_eq!(dead.len(), 1);
    let error = dead[0].last_error.as_deref().unwrap_or("");
    assert!(
        error.contains("while sending the email") && error.contains("does not exist"),
        "{error}"
    );
}

/// The deadline is one choice: a grace period read from an unset variable falls back to the
/// fixed deadline given with it; one that is not a number refuses the start, naming the
/// setting.
#[tokio::test(start_paused = true)]
async fn a_grace_period_from_the_environment_is_one_explicit_choice() {
    let dir = tempfile::tempdir().unwrap();
    let unset = Deadline::GracePeriodFromEnv {
        variable: "DRAINPOOL_TEST_VARIABLE_NEVER_SET".into(),
        pre_stop: Duration::ZERO,
        fallback: Duration::from_secs(3),
    };
    let pool = Pool::<u64>::builder()
        .deadline(unset)
        .journal_dir(dir.path())
        .start(|_: Task<u64>| async { Ok::<(), BoxError>(()) })
        .await
        .unwrap();
    let report = pool.shutdown().await.unwrap();
    assert_eq!(report.drain_deadline, Duration::from_secs(3));
    assert!(report.budget.is_none(), "{report:?}");

    // PATH is set everywhere, and is not a number of seconds.
    let malformed = Deadline::GracePeriodFromEnv {
        variable: "PATH".into(),
        pre_stop: Duration::ZERO,
        fallback: Duration::from_secs(3),
    };
    let refused = Pool::<u64>::builder()
        .deadline(malformed)
        .journal_dir(dir.path())
        .start(|_: Task<u64>| async { Ok::<(), BoxError>(()) })
        .await;
    match refused {
        Err(StartError::InvalidConfig { setting, reason }) => {
            assert_eq!(setting, "deadline");
            assert!(reason.contains("PATH"), "{reason}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

/// A follow-up submitted by the pool's own handler during the drain is accepted and journaled
/// (it goes straight to the spill), not refused; a stranger's submit is still refused.
#[tokio::test(start_paused = true)]
async fn a_follow_up_submitted_during_the_drain_is_spilled_not_refused() {
    for durability in [
        drainpool::Durability::on_shutdown(),
        drainpool::Durability::write_ahead(drainpool::SyncPolicy::Always),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (pool, runner) = Pool::<u64>::builder()
            .workers(1)
            .durability(durability)
            .drain_deadline(Duration::from_secs(5))
            .journal_dir(dir.path())
            .build()
            .await
            .unwrap();
        let own = pool.downgrade();
        let follow_up = Arc::new(Mutex::new(None));
        runner.run({
            let follow_up = Arc::clone(&follow_up);
            move |task: Task<u64>| {
                let (own, follow_up) = (own.clone(), Arc::clone(&follow_up));
                async move {
                    if *task.payload() == 1 {
                        // Finish the work once the drain has begun, then hand on the rest.
                        let pool = own.upgrade().ok_or("the pool is gone")?;
                        let mut state = pool.watch_state();
                        state.wait_for(|s| s != State::Running).await;
                        let id = pool.submit(2).await.map_err(|e| e.to_string())?;
                        *follow_up.lock().unwrap() = Some(id);
                    }
                    Ok::<(), BoxError>(())
                }
            }
        });
        pool.submit(1).await.unwrap();
        eventually(PATIENCE, "task 1 in flight", || pool.stats().in_flight == 1).await;
        let report = pool.shutdown().await.unwrap();
        let follow_up = follow_up
            .lock()
            .unwrap()
            .expect("the follow-up was accepted");
        assert_eq!((report.completed, report.spilled), (1, 1), "{report:?}");
        assert_eq!(report.submitted, 2, "{report:?}");
        assert!(report.is_clean(), "{report:?}");
        counts_add_up(&report);
        assert!(matches!(
            pool.submit(3).await,
            Err(drainpool::SubmitError::ShuttingDown(3))
        ));
        let live = drainpool::journal::inspect(dir.path()).unwrap().live;
        assert_eq!(
            live.iter().map(|t| t.id).collect::<Vec<_>>(),
            [follow_up],
            "{durability:?}"
        );
    }
}

/// A bounded submit: `Full` with the task handed back once no room comes within the wait, in
/// write-ahead mode too (where `try_submit` always says `WouldBlock`).
#[tokio::test(start_paused = true)]
async fn submit_within_refuses_with_full_when_no_room_comes_in_time() {
    for durability in [
        drainpool::Durability::on_shutdown(),
        drainpool::Durability::write_ahead(drainpool::SyncPolicy::Always),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (pool, runner) = Pool::<u64>::builder()
            .queue_capacity(2)
            .durability(durability)
            .journal_dir(dir.path())
            .build()
            .await
            .unwrap();
        drop(runner);
        for n in 0..2 {
            pool.submit_within(n, Duration::ZERO).await.unwrap();
        }
        for wait in [Duration::ZERO, Duration::from_millis(50)] {
            match pool.submit_within(9, wait).await {
                Err(drainpool::SubmitError::Full(task)) => assert_eq!(task, 9),
                other => panic!("{durability:?}, {wait:?}: expected Full, got {other:?}"),
            }
        }
        let report = pool.shutdown().await.unwrap();
        assert_eq!(report.spilled, 2, "{durability:?}: {report:?}");
    }
}

/// Handlers that submit follow-ups to their own full pool do not wait for room (which they
/// would wait for forever, every worker doing the same): the follow-ups go ahead of the queue.
#[tokio::test]
async fn follow_ups_into_a_full_pool_do_not_stop_it() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, runner) = Pool::<u64>::builder()
        .workers(2)
        .queue_capacity(1)
        .journal_dir(dir.path())
        .build()
        .await
        .unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let own = pool.downgrade();
    runner.run({
        let done = Arc::clone(&done);
        move |task: Task<u64>| {
            let (own, done) = (own.clone(), Arc::clone(&done));
            async move {
                let n = *task.payload();
                if n < 100 {
                    let pool = own.upgrade().ok_or("the pool is gone")?;
                    pool.submit(n + 100).await.map_err(|e| e.to_string())?;
                }
                done.fetch_add(1, Ordering::SeqCst);
                Ok::<(), BoxError>(())
            }
        }
    });
    for n in 0..20 {
        pool.submit(n).await.unwrap();
    }
    eventually(PATIENCE, "every task and its follow-up to finish", || {
        done.load(Ordering::SeqCst) == 40
    })
    .await;
    let report = pool.shutdown().await.unwrap();
    assert_eq!((report.completed, report.submitted), (40, 40), "{report:?}");
}

/// Intake refuses from the moment `shutdown` or `shutdown_now` is called, as `health` says, not
/// only once the drain gets going.
#[tokio::test(start_paused = true)]
async fn intake_refuses_from_the_trigger_on() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::<u64>::builder()
        .journal_dir(dir.path())
        .start(|_: Task<u64>| async { Ok::<(), BoxError>(()) })
        .await
        .unwrap();
    assert!(pool.health().is_ready());
    pool.shutdown_now();
    assert!(matches!(pool.health(), drainpool::Health::ShuttingDown));
    // No await in between: the shutdown sequence has not run yet.
    assert!(matches!(
        pool.try_submit(1),
        Err(drainpool::SubmitError::ShuttingDown(1))
    ));
    assert!(matches!(
        pool.submit(2).await,
        Err(drainpool::SubmitError::ShuttingDown(2))
    ));
    let report = pool.wait().await.unwrap();
    assert_eq!(report.submitted, 0, "{report:?}");
}

/// A handler's future that stays pending until `open` is set, counting its polls.
#[derive(Clone, Default)]
struct Gated {
    polls: Arc<AtomicU64>,
    open: Arc<std::sync::atomic::AtomicBool>,
    waker: Arc<Mutex<Option<std::task::Waker>>>,
}

impl std::future::Future for Gated {
    type Output = Result<(), std::convert::Infallible>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        if self.open.load(Ordering::SeqCst) {
            return std::task::Poll::Ready(Ok(()));
        }
        *self.waker.lock().unwrap() = Some(cx.waker().clone());
        std::task::Poll::Pending
    }
}

/// A handler that waits is polled once a wake, as any future: not polled again at once when it
/// first waits (the worker races it against the hard stop from then on), and once when woken.
#[tokio::test(start_paused = true)]
async fn a_waiting_handler_is_polled_once_a_wake() {
    let dir = tempfile::tempdir().unwrap();
    let gated = Gated::default();
    let handler = gated.clone();
    let pool = Pool::builder()
        .workers(1)
        .journal_dir(dir.path())
        .start(move |_: Task<u64>| handler.clone())
        .await
        .unwrap();
    pool.submit(1).await.unwrap();
    eventually(PATIENCE, "the handler's first poll", || {
        gated.waker.lock().unwrap().is_some()
    })
    .await;
    gated.open.store(true, Ordering::SeqCst);
    let waker = gated.waker.lock().unwrap().take().unwrap();
    waker.wake();
    eventually(PATIENCE, "the task to complete", || {
        pool.stats().completed == 1
    })
    .await;
    assert_eq!(
        gated.polls.load(Ordering::SeqCst),
        2,
        "one poll that waited, one after the wake"
    );
    let report = pool.shutdown().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    counts_add_up(&report);
}
