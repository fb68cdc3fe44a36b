//! Start: open and recover the journal, build the pool's parts, start the shutdown supervisor
//! and the background tasks; then, when the handler is given, the workers.
//!
//! The two phases let a pool's handle exist before its handler does, so the handler (or the
//! application state it holds) can keep a handle of its own pool.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::claims;
use super::config::{Config, Settled};
use super::drain::supervise;
use super::handle::Pool;
use super::job::{Ids, Job, Payload, now_ms};
use super::keys::Keys;
use super::live::LiveIndex;
use super::queue::{HOT, Queue};
use super::reserve::{self, SpillReserve};
use super::shared::Shared;
use super::shutdown::Shutdown;
use super::store::Store;
use super::upkeep;
use super::waiting::due_after;
use super::worker;
use super::write_ahead::WriteAhead;
use crate::codec::Encoding;
use crate::error::{BoxError, StartError};
use crate::journal::{Journal, Recovered, Recovery, Reserve, TaskRecord};
use crate::policy::{Jitter, Policy};
use crate::report::RecoveryReport;
use crate::task::Task;

/// The second half of a pool's start: takes the handler and starts the workers. Made by
/// [`Builder::build`](crate::Builder::build) together with the pool's first handle.
///
/// Until [`run`](Self::run) is called, tasks are accepted and queued but none runs; a shutdown
/// meanwhile journals them all. Dropping a `Runner` without running it leaves the pool without
/// workers: it still accepts tasks, and journals them at shutdown.
#[must_use = "no task runs until `run` is called with the handler"]
pub struct Runner<T> {
    shared: Arc<Shared<T>>,
}

impl<T> fmt::Debug for Runner<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runner")
            .field("journal_dir", &self.shared.store.dir())
            .finish_non_exhaustive()
    }
}

impl<T: Send + Sync + 'static> Runner<T> {
    /// Starts the workers with `handler`, which is called once per run of a task. Its future
    /// must be `Send + 'static`. An `Err` or a panic is a failed attempt: the task is retried
    /// after its backoff, and kept as a dead letter once out of attempts (or at once, for a
    /// [`Permanent`](crate::Permanent) error).
    ///
    /// # Panics
    ///
    /// Panics if called outside a tokio runtime.
    pub fn run<F, Fut, E>(self, handler: F)
    where
        F: Fn(Task<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let shared = &self.shared;
        let handler = Arc::new(handler);
        for number in 0..shared.config.workers {
            shared.workers.spawn(worker::run(
                Arc::clone(shared),
                Arc::clone(&handler),
                number,
            ));
        }
        shared.workers.close();
        // Only a pool that runs tasks claims them from a shared store.
        claims::spawn(shared);
        tracing::info!(workers = shared.config.workers, "workers started");
    }
}

impl<T> Drop for Runner<T> {
    fn drop(&mut self) {
        // Run or not, no worker joins later: the shutdown need not wait for one.
        self.shared.workers.close();
    }
}

/// The first phase: checks the settings, opens and recovers the journal, and starts the
/// supervisor and the background tasks.
pub(crate) async fn build<T: Send + Sync + 'static>(
    config: Config,
    policy: Policy<T>,
    codec: Encoding<T>,
) -> Result<(Pool<T>, Runner<T>), StartError> {
    let (dir, settled) = config.check()?;
    let open_dir = dir.clone();
    let ops = config.file_ops.clone();
    let want_probe = matches!(settled, Settled::GracePeriod { .. });
    let decoder = codec.clone();
    // With the shared store, write-ahead goes to its table: the file journal holds no task
    // while the pool runs.
    let write_ahead = config.durability.is_write_ahead() && config.remote.is_none();
    let want_reserve = config.spill_reserve && !config.durability.is_write_ahead();
    let reserve_ops = config.file_ops.clone();
    let (now, wall) = (Instant::now(), now_ms());
    let forwarding = config.remote.is_some();
    let opened = tokio::task::spawn_blocking(move || {
        let (mut journal, mut report, recovery) = Journal::recover(&open_dir, ops)?;
        if write_ahead {
            journal.adopt_obsolete();
        }
        // The spill reserve's first step: a journal that cannot take it fails the start.
        let reserve = if want_reserve {
            Some(Reserve::create(&open_dir, reserve_ops, reserve::STEP)?)
        } else {
            // One an earlier run left would hold its space for nothing.
            if let Err(error) = Reserve::remove_left(&open_dir, &reserve_ops) {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "could not remove the spill reserve an earlier run left"
                );
            }
            None
        };
        // With a shared store every live task is handed on to it; the pool that claims one
        // decodes it.
        let (replay, forward) = if forwarding {
            let forward = recovery
                .tasks()
                .map(|task| {
                    let bytes = task.value.to_vec();
                    task.replace(bytes).1
                })
                .collect();
            (Replay::default(), forward)
        } else {
            let replay = replay(
                &mut journal,
                &mut report,
                &recovery,
                &decoder,
                write_ahead,
                (now, wall),
            );
            (replay, Vec::new())
        };
        // The segments' bytes, no longer needed.
        drop(recovery);
        let probe = want_probe.then(|| journal.probe());
        Ok::<_, StartError>((journal, report, replay, forward, probe, reserve))
    })
    .await
    .map_err(|e| StartError::InvalidConfig {
        setting: "journal_dir",
        reason: format!("journal recovery panicked: {e}"),
    })??;
    let (journal, mut recovery, replay, forward, probe, reserve) = opened;
    // With a shared store: the run number from it, and the local tasks handed on to it.
    let (journal, remote) = match &config.remote {
        Some(connect) => {
            let write_ahead = config.durability.is_write_ahead();
            let (journal, claims) = claims::open(&**connect, journal, forward, write_ahead).await?;
            #[cfg(feature = "postgres")]
            {
                recovery.forwarded = claims.forwarded;
            }
            (journal, Some(claims))
        }
        None => (journal, None),
    };
    let probe = probe.map(|probe| match probe {
        Ok((rate, fsync)) => {
            tracing::info!(
                bytes_per_sec = rate,
                fsync_us = fsync.as_micros() as u64,
                "journal write speed measured"
            );
            (rate, fsync)
        }
        Err(error) => {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "could not measure the journal's write speed; assuming 10 MB/s and 50 ms per fsync"
            );
            (10_000_000, Duration::from_millis(50))
        }
    });
    let Replay {
        backlog,
        waiting,
        live,
        keys,
    } = replay;
    recovery.replayed = (backlog.len() + waiting.len()) as u64;
    let replayed = recovery.replayed;
    let sync = config
        .durability
        .sync_policy()
        .filter(|_| config.remote.is_none());

    // A child token: the pool's own shutdown (or its drop) never cancels the user's token.
    let trigger = config
        .shutdown_token
        .as_ref()
        .map_or_else(CancellationToken::new, CancellationToken::child_token);
    let write_ahead =
        sync.map(|sync| WriteAhead::new(journal.epoch(), live, sync, config.segment_bytes));
    let run = journal.run();
    #[cfg(feature = "metrics")]
    let (metrics, counters) = crate::metrics::Metrics::register(&config.name, config.workers);
    #[cfg(not(feature = "metrics"))]
    let counters = crate::report::Counters::new(config.workers);
    counters.replayed.add(replayed);
    let shared = Arc::new(Shared {
        codec,
        policy,
        jitter: Jitter::from_entropy(),
        ids: Ids::new(run),
        keys,
        queue: Queue::new(config.queue_capacity, config.workers, backlog, waiting)
            .lingering(config.durability.is_write_ahead()),
        store: Store::new(dir, journal, probe),
        remote,
        write_ahead,
        reserve: reserve.map(SpillReserve::new),
        shutdown: Shutdown::new(trigger.clone(), settled),
        counters,
        #[cfg(feature = "metrics")]
        metrics,
        replay_outstanding: AtomicU64::new(replayed),
        workers: TaskTracker::new(),
        background: TaskTracker::new(),
        config,
        recovery,
    });
    if shared.write_ahead.is_none() && replayed == 0 && shared.recovery.segments > 0 {
        // Nothing to replay: the old segments (acks only, or all damaged) can go now.
        let mut journal = shared.store.lock().await;
        if let Some(journal) = journal.as_mut()
            && let Err(error) = journal.retire_obsolete()
        {
            shared.store.record_error(error);
        }
    }

    let shutdown = &shared.shutdown;
    let flusher = shared.write_ahead.as_ref().map(|_| {
        shared.background.spawn(upkeep::flusher(
            Arc::clone(&shared),
            shutdown.flusher_stop(),
        ))
    });
    let upkeep = shared
        .background
        .spawn(upkeep::upkeep(Arc::clone(&shared), shutdown.upkeep_stop()));
    shutdown.own(flusher, upkeep);
    claims::spawn_at_build(&shared);
    shared.background.spawn(supervise(Arc::clone(&shared)));
    shared.background.close();
    tracing::info!(
        pool = %shared.config.name,
        dir = %shared.store.dir().display(),
        run,
        replayed,
        "pool started"
    );
    let pool = Pool::new(Arc::clone(&shared), trigger);
    Ok((pool, Runner { shared }))
}

/// The recovered tasks, ready to run: the backlog (in replay order), the retries waiting for
/// their time, (write-ahead) where each one's record is, and their unique keys.
struct Replay<T> {
    backlog: VecDeque<Job<T>>,
    waiting: Vec<(Instant, Job<T>)>,
    live: LiveIndex,
    /// The unique keys of the replayed tasks.
    keys: Keys,
}

impl<T> Default for Replay<T> {
    fn default() -> Self {
        Self {
            backlog: VecDeque::new(),
            waiting: Vec::new(),
            live: LiveIndex::default(),
            keys: Keys::default(),
        }
    }
}

/// Makes the recovered tasks into jobs, in one pass over the journal's bytes, each payload
/// copied once. The first [`HOT`] (in replay order, the ones the workers take first) are
/// decoded now: those whose payload no longer decodes become dead letters, durably, before
/// anything runs (their old segments are kept if that fails). The rest stay encoded, as the
/// queue holds tasks past its hot window, and are decoded when a worker takes them (one that
/// no longer decodes becomes a dead letter then): so the workers start while most of a long
/// journal is still bytes, and a reload costs what reading and checking the journal costs,
/// not a decode of every payload first. A task spilled while waiting for its retry keeps its
/// time (`now`, as `(instant, wall clock)`: the same moment on the two clocks).
fn replay<T: 'static>(
    journal: &mut Journal,
    report: &mut RecoveryReport,
    recovery: &Recovery,
    codec: &Encoding<T>,
    write_ahead: bool,
    (now, wall): (Instant, u64),
) -> Replay<T> {
    let mut replay = Replay {
        backlog: VecDeque::with_capacity(recovery.len()),
        ..Replay::default()
    };
    // Higher priorities first, id order within each (a stable sort of the id order); without
    // priorities, straight from the journal's bytes.
    let tasks: Box<dyn Iterator<Item = Recovered<&[u8]>>> = if recovery.prioritized() {
        let mut tasks: Vec<_> = recovery.tasks().collect();
        tasks.sort_by_key(|task| Reverse(task.options.as_ref().map_or(0, |o| o.priority)));
        Box::new(tasks.into_iter())
    } else {
        Box::new(recovery.tasks())
    };
    for (n, task) in tasks.enumerate() {
        let bytes = task.value;
        let payload = if n < HOT {
            match codec.decode(bytes) {
                Ok(value) => Payload::new(value),
                Err(e) => {
                    let error = format!("payload no longer decodes: {e}");
                    dead_letter(journal, report, &task, error);
                    continue;
                }
            }
        } else {
            Payload::Encoded(bytes.into())
        };
        if write_ahead {
            replay.live.recovered(task.id, task.segment, task.len);
        }
        let job = Job {
            id: task.id,
            state: task.state,
            last_error: task.last_error,
            payload,
            journaled: true,
            replayed: true,
            span: None,
            reserved: 0,
            #[cfg(feature = "metrics")]
            queued_at: now,
            lease: None,
            priority: task.options.as_ref().map_or(0, |o| o.priority),
            options: task.options,
        };
        if let Some(key) = job.key() {
            replay.keys.adopt(key, job.id);
        }
        if job.state.not_before_ms > wall {
            let delay = Duration::from_millis(job.state.not_before_ms - wall);
            replay.waiting.push((due_after(now, delay), job));
        } else {
            replay.backlog.push_back(job);
        }
    }
    replay
}

/// Keeps a recovered task whose payload no longer decodes as a dead letter, with `error`.
fn dead_letter(
    journal: &mut Journal,
    report: &mut RecoveryReport,
    task: &Recovered<&[u8]>,
    error: String,
) {
    report.undecodable += 1;
    tracing::warn!(task = %task.id, %error, "payload no longer decodes; kept as a dead letter");
    let record = TaskRecord {
        id: task.id,
        state: task.state,
        last_error: error.into(),
        payload: task.value,
        options: task.options.as_deref().map(Cow::Borrowed),
    };
    match journal
        .write_dead(&record)
        .and_then(|()| journal.append_ack(task.id))
    {
        Ok(()) => report.dead_letters += 1,
        Err(error) => {
            tracing::error!(error = &error as &dyn std::error::Error, task = %task.id, "could not write dead letter; the old segment is kept");
            journal.keep_obsolete();
        }
    }
}
