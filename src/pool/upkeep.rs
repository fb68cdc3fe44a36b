//! The pool's two long-lived background tasks.
//!
//! - **The flusher** (write-ahead only) writes the group-commit buffer to the journal, batch
//!   after batch, whenever a new task's record (or a waiter, or a full buffer) wakes it, and
//!   enters each written batch's tasks in the live index (on the blocking thread that wrote
//!   it, which also wakes the batch's submits, then takes the next batch there, once every
//!   submit it woke is back or [`GATHER`] after the first, for [`HOLD`] at most). Records
//!   that need no fsync (acks,
//!   retry states, compaction copies) wait for a new task's record to share its write, or
//!   [`ACK_LINGER`] at most. After a batch of [`YIELDS_FROM`] task records or more it yields
//!   [`YIELDS`] times before it takes the next: the submits that batch woke push their next
//!   records first, and the next fsync carries them all. It runs until the shutdown sequence
//!   stops it, after the last worker is gone and before the final spill.
//! - **The upkeep task** moves retries to the queue as they come due, hands room freed below
//!   the queue's batch to the submitters waiting for it (see `queue.rs`), and in write-ahead mode
//!   fsyncs the journal at the `Interval` policy's pace, deletes sealed segments with nothing
//!   live left (woken when one empties or is sealed), and compacts sparse old segments (one
//!   compaction at a time, run inside the same task). With the `metrics` feature it also sets
//!   the gauges, once a second. The shutdown sequence stops it as soon as intake closes.
//!
//! Deletion and compaction rules are in ARCHITECTURE.md: sealed segments go oldest first while
//! they hold nothing live; the sealed segments after that empty prefix (the newest left out)
//! are compacted when at most half their bytes are live, by writing their live tasks again
//! through the group commit, each checked and pushed under the live index's lock.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lock::lock;
use super::shared::Shared;
use super::write_ahead::WriteAhead;
use crate::error::JournalError;
use crate::journal::{ACK_LINGER, Batch, Copies, Journal, Sealed};
use crate::policy::SyncPolicy;

/// Compaction copies are handed to the group commit this many at a time, so acks never wait
/// long for the index lock.
const COMPACT_CHUNK: usize = 256;

/// How many times the flusher yields before it takes a batch, when the batch before held at
/// least [`YIELDS_FROM`] task records (see `flusher`).
const YIELDS: usize = 8;

/// Below this many task records in the batch before, the flusher takes the next at once: few
/// submits were woken, and a lone submit's fsync should not wait for other tasks' turns.
const YIELDS_FROM: usize = 8;

/// How long the flusher's blocking thread waits for a new task's record after it wrote a batch,
/// before it hands back to the flusher's task (see `flusher`).
const BACK_TO_BACK: Duration = Duration::from_millis(1);

/// How long the flusher's blocking thread waits, after the first new task's record came, for
/// every submit the last batch woke to push its next before it takes the next batch: long
/// enough for a few submitters to come back together (16 submitters: 8 % more tasks a second
/// and 9 % less CPU a task than taking the first record at once), short against an fsync, so
/// that many submitters whose work outlasts it fall into cohorts, one running while another's
/// fsync runs (256 submitters: 21 % more tasks a second than one fsync for all of them).
const GATHER: Duration = Duration::from_micros(20);

/// How long the flusher's blocking thread keeps writing batches back to back at most, holding
/// the journal's lock, before it lets the other users of the journal have it.
const HOLD: Duration = Duration::from_millis(20);

/// How often the gauges are set (the `metrics` feature).
const GAUGES_EVERY: Duration = Duration::from_secs(1);

/// The flusher's blocking thread's timer slack at a microsecond while it writes batches back to
/// back, put back as it was after (the thread is one of tokio's blocking pool). Linux lets a
/// timed wait run late by the thread's timer slack, 50 µs by default: the [`GATHER`] wait of
/// 20 µs ended 80 µs late on average (28 µs with this), the journal idle meanwhile
/// (write-ahead end to end at 256 submitters: 0.53 -> 0.44 s for 256,000 tasks).
struct FineTimers {
    #[cfg(target_os = "linux")]
    was: Option<std::num::NonZeroU64>,
}

impl FineTimers {
    /// The slack asked for, in nanoseconds.
    #[cfg(target_os = "linux")]
    const SLACK_NS: u64 = 1_000;

    fn set() -> Self {
        #[cfg(target_os = "linux")]
        {
            // Left as it is where it cannot be read (and so put back): a sandbox refusing
            // `prctl`, say. Then the waits are only later.
            let was = rustix::thread::current_timer_slack()
                .ok()
                .and_then(std::num::NonZeroU64::new);
            if was.is_some() {
                let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(
                    Self::SLACK_NS,
                ));
            }
            Self { was }
        }
        #[cfg(not(target_os = "linux"))]
        Self {}
    }
}

impl Drop for FineTimers {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(was) = self.was {
            let _ = rustix::thread::set_current_timer_slack(Some(was));
        }
    }
}

/// The flusher: see the module docs. Stops once `stop` fires and the buffer is empty.
pub(crate) async fn flusher<T: Send + Sync + 'static>(
    shared: Arc<Shared<T>>,
    stop: CancellationToken,
) {
    let Some(write_ahead) = &shared.write_ahead else {
        return;
    };
    loop {
        let mut stopping = tokio::select! {
            biased;
            () = write_ahead.commit.pushed() => false,
            () = stop.cancelled() => true,
        };
        // Records that need no fsync are taken only with a new task's, or when forced.
        let mut force = stopping;
        let mut woken = 0;
        loop {
            // The submits the last batch woke run first and push their next records: the
            // batch taken after them carries them all, and the fsync is shared the wider.
            if woken >= YIELDS_FROM {
                for _ in 0..YIELDS {
                    tokio::task::yield_now().await;
                }
            }
            let Some(batch) = write_ahead.commit.take(force) else {
                if force || !write_ahead.commit.holds_deferred() {
                    break;
                }
                // Only acks and the like wait: a new task's record, the linger, or the stop.
                force = tokio::select! {
                    biased;
                    () = write_ahead.commit.pushed() => false,
                    () = tokio::time::sleep(ACK_LINGER) => true,
                    () = stop.cancelled() => {
                        stopping = true;
                        true
                    }
                };
                continue;
            };
            let on_disk = Arc::clone(&shared);
            let stopped = stop.clone();
            // Written, each batch is finished on the blocking thread itself (its submits are
            // woken from there, one hand-off back to this task sooner), and the next batch is
            // taken there too: once every submit waiting or woken then has pushed its record,
            // or `GATHER` after the first did. Submits whose work outlasts that fall into
            // cohorts, one pushing while another's fsync runs, rather than every submit waiting
            // for one fsync and the fsync for all of them. Handed back after `HOLD` (the
            // journal's lock is held meanwhile), at the stop, or once no new task's record
            // came within `BACK_TO_BACK`.
            woken = shared
                .store
                .with_journal("append", move |journal| {
                    let held = std::time::Instant::now();
                    let _fine = FineTimers::set();
                    let mut batch = batch;
                    let mut woken;
                    loop {
                        woken = batch.placements.len();
                        let Some(waiting) = write_batch(&on_disk, journal, batch) else {
                            break;
                        };
                        if stopped.is_cancelled() || held.elapsed() >= HOLD {
                            break;
                        }
                        // Written, so the pool writes ahead.
                        let Some(write_ahead) = &on_disk.write_ahead else {
                            break;
                        };
                        match write_ahead
                            .commit
                            .take_within(BACK_TO_BACK, waiting + woken, GATHER)
                        {
                            Some(next) => batch = next,
                            None => break,
                        }
                    }
                    Ok(woken)
                })
                .await
                .unwrap_or_else(|panicked| {
                    // The batch it was writing is failed, and the journal with it.
                    let error = shared.store.record_error(panicked);
                    write_ahead.commit.fail_taken(error);
                    0
                });
        }
        if stopping {
            return;
        }
    }
}

/// Writes `batch` to `journal` (and fsyncs it if it holds a new task's record under the
/// `Always` policy), enters its tasks in the live index and finishes it: its submits learn how
/// it went. Written, how many task records were waiting behind it when it was finished (see
/// `Commit::take_within`); `None` if it was not.
fn write_batch<T: Send + Sync + 'static>(
    shared: &Shared<T>,
    journal: &mut Option<Journal>,
    batch: Batch,
) -> Option<usize> {
    let Some(write_ahead) = &shared.write_ahead else {
        return None;
    };
    let (tasks, new_tasks) = (batch.placements.len(), batch.new_tasks);
    let sync = write_ahead.sync == SyncPolicy::Always && new_tasks;
    let appended = match journal.as_mut() {
        Some(journal) => journal.append_batch(&batch.bytes, tasks, sync, write_ahead.segment_bytes),
        // Closed by the shutdown, whose spill holds every live task in its latest state: acks,
        // retry states and compaction copies need not be written. A new task's record that
        // comes this late fails its submit.
        None if !new_tasks => {
            write_ahead.commit.finish(batch.last_seq, Ok(()));
            return None;
        }
        None => Err(JournalError::Poisoned),
    };
    match appended {
        Ok(appended) => {
            lock(&write_ahead.live).placed(appended.segment, &batch.placements);
            if appended.sealed {
                write_ahead.segments_changed.notify_one();
            }
            #[cfg(feature = "metrics")]
            if let Some(fsync) = appended.synced {
                shared.metrics.fsync.record(fsync);
                shared.metrics.tasks_per_fsync.record(tasks as f64);
            }
            let waiting = write_ahead.commit.finish(batch.last_seq, Ok(()));
            write_ahead.commit.recycle(batch.bytes, batch.placements);
            Some(waiting)
        }
        Err(error) => {
            let error = match (&error, shared.store.first_error()) {
                // A journal poisoned earlier (by a failed `Interval` fsync, say): the submits get
                // the failure that poisoned it.
                (JournalError::Poisoned, Some(first)) => first,
                _ => shared.store.record_error(error),
            };
            write_ahead.commit.finish(batch.last_seq, Err(error));
            None
        }
    }
}

type Compaction = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The upkeep task: see the module docs. Stops when `stop` fires.
pub(crate) async fn upkeep<T: Send + Sync + 'static>(
    shared: Arc<Shared<T>>,
    stop: CancellationToken,
) {
    let write_ahead = shared.write_ahead.as_ref();
    let sync_every = match write_ahead.map(|w| w.sync) {
        Some(SyncPolicy::Interval(every)) => Some(every),
        _ => None,
    };
    let mut next_sync = sync_every.map(|every| Instant::now() + every);
    let mut next_gauges = gauges_after(Instant::now());
    let mut compaction: Option<Compaction> = None;
    #[cfg(feature = "metrics")]
    refresh_gauges(&shared).await;
    if write_ahead.is_some() {
        // Earlier runs' segments without live tasks go at once, the others as they empty.
        delete_empty_segments(&shared, &mut compaction).await;
    }
    loop {
        let next_retry = shared.queue.release_due();
        let event = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = shared.queue.retry_added() => Event::Retry,
            () = sleep_until(next_retry) => Event::Retry,
            () = sleep_until(next_sync) => Event::Sync,
            () = sleep_until(next_gauges) => Event::Gauges,
            () = segments_changed(write_ahead) => Event::Segments,
            () = run(&mut compaction) => Event::Compacted,
        };
        match event {
            // Released at the top of the loop.
            Event::Retry => {}
            Event::Sync => {
                next_sync = sync_every.map(|every| Instant::now() + every);
                let synced = shared
                    .store
                    .with_journal("fsync", |journal| {
                        journal.as_mut().map_or(Ok(None), Journal::sync_current)
                    })
                    .await;
                match synced {
                    #[cfg(feature = "metrics")]
                    Ok(Some(fsync)) => shared.metrics.fsync.record(fsync),
                    Ok(_) => {}
                    Err(error) => {
                        shared.store.record_error(error);
                    }
                }
            }
            Event::Gauges => {
                next_gauges = gauges_after(Instant::now());
                #[cfg(feature = "metrics")]
                refresh_gauges(&shared).await;
            }
            Event::Segments => delete_empty_segments(&shared, &mut compaction).await,
            Event::Compacted => {
                compaction = None;
                delete_empty_segments(&shared, &mut compaction).await;
            }
        }
    }
}

/// What woke the upkeep task.
enum Event {
    Retry,
    Sync,
    Gauges,
    Segments,
    Compacted,
}

/// When the gauges are next set: [`GAUGES_EVERY`] from `now` with the `metrics` feature,
/// never without.
fn gauges_after(now: Instant) -> Option<Instant> {
    cfg!(feature = "metrics").then(|| now + GAUGES_EVERY)
}

/// Sets the gauges from the pool's own state: what `Pool::stats` reads, and the live
/// journal's size (waiting for the journal's lock, one write at most).
#[cfg(feature = "metrics")]
pub(crate) async fn refresh_gauges<T>(shared: &Shared<T>) {
    let metrics = &shared.metrics;
    metrics.queued.set(shared.queue.len() as f64);
    let in_flight = shared.counters.in_flight.get();
    metrics.in_flight.set(in_flight as f64);
    let reserve = shared.reserve.as_ref().map_or(0, |r| r.reserved());
    metrics.spill_reserve.set(reserve as f64);
    if let Some(bytes) = shared.store.journal_bytes().await {
        metrics.journal_bytes.set(bytes as f64);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn segments_changed(write_ahead: Option<&WriteAhead>) {
    match write_ahead {
        Some(write_ahead) => write_ahead.segments_changed.notified().await,
        None => std::future::pending().await,
    }
}

async fn run(compaction: &mut Option<Compaction>) {
    match compaction {
        Some(compaction) => compaction.await,
        None => std::future::pending().await,
    }
}

/// Deletes the sealed segments with nothing live left, oldest first (a newer segment may hold
/// the acks of an older one's tasks, so it never goes first). Then, if the sealed segments
/// before the newest hold no more live data than dead, starts a compaction of them, unless one
/// runs or no segment was sealed since the last one.
async fn delete_empty_segments<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    compaction: &mut Option<Compaction>,
) {
    let pass = Arc::clone(shared);
    let deleted = shared
        .store
        .with_journal("remove", move |journal| {
            let (Some(journal), Some(write_ahead)) = (journal.as_mut(), &pass.write_ahead) else {
                return Ok(None);
            };
            let (through, sparse) = {
                let live = lock(&write_ahead.live);
                let healthy = journal.may_delete();
                let sealed = journal.sealed();
                let empty = sealed
                    .iter()
                    .take_while(|s| live.usage(s.number).tasks == 0)
                    .count();
                let through = empty.checked_sub(1).map(|i| sealed[i].number);
                // The newest sealed segment is left alone: its tasks are the most likely to
                // finish on their own soon.
                let older = sealed[empty..]
                    .split_last()
                    .map_or(&[][..], |(_, older)| older);
                let size: u64 = older.iter().map(|s| s.len).sum();
                let used: u64 = older.iter().map(|s| live.usage(s.number).bytes).sum();
                let newest = older.last().map_or(0, |s| s.number);
                let sparse = (healthy
                    && !older.is_empty()
                    && used.saturating_mul(2) <= size
                    && newest > write_ahead.compacted_through.load(Ordering::Acquire))
                .then(|| older.to_vec());
                (through, sparse)
            };
            if let Some(through) = through {
                journal.delete_sealed_through(through)?;
            }
            Ok(sparse)
        })
        .await;
    match deleted {
        Ok(Some(sparse)) if compaction.is_none() && !shared.queue.is_closed() => {
            *compaction = Some(Box::pin(compact(Arc::clone(shared), sparse)));
        }
        Ok(_) => {}
        Err(error) => {
            shared.store.record_error(error);
        }
    }
}

/// Write-ahead compaction: writes the live tasks of `segments` again at the end of the
/// journal, so that they hold nothing live and the next deletion pass removes them (after an
/// fsync of the copies). A crash at any point leaves the old records, the copies, or both:
/// recovery keeps one task per id.
async fn compact<T: Send + Sync + 'static>(shared: Arc<Shared<T>>, segments: Vec<Sealed>) {
    let Some(write_ahead) = &shared.write_ahead else {
        return;
    };
    let newest = segments.last().map_or(0, |s| s.number);
    write_ahead
        .compacted_through
        .fetch_max(newest, Ordering::AcqRel);
    match copy_live(&shared, write_ahead, segments).await {
        Ok(0) => {}
        Ok(count) => {
            shared.counters.compacted.add(count as u64);
            tracing::info!(tasks = count, through = newest, "compacted old segments");
        }
        Err(error) => tracing::warn!(
            error = &error as &dyn std::error::Error,
            "compaction stopped; the old segments stay"
        ),
    }
}

/// Reads the live tasks of `segments` and hands copies to the group commit; waits until they
/// are written. Returns how many were copied.
async fn copy_live<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    write_ahead: &WriteAhead,
    segments: Vec<Sealed>,
) -> Result<usize, Arc<JournalError>> {
    let reader = Arc::clone(shared);
    let epoch = write_ahead.commit.epoch();
    let read = tokio::task::spawn_blocking(move || {
        let mut copies = Copies::default();
        let Some(write_ahead) = &reader.write_ahead else {
            return Ok(copies);
        };
        for segment in &segments {
            copies.read(&segment.path, segment.number, epoch, |id| {
                lock(&write_ahead.live).settled_in(id, segment.number)
            })?;
        }
        Ok::<_, JournalError>(copies)
    })
    .await;
    let copies = match read {
        Ok(Ok(copies)) => copies,
        Ok(Err(error)) => return Err(Arc::new(error)),
        Err(error) => {
            let error = std::io::Error::other(error.to_string());
            return Err(Arc::new(JournalError::io(
                "compact",
                shared.store.dir(),
                None,
                error,
            )));
        }
    };
    // Each copy is checked and pushed under the index lock: a task finished before is not
    // copied, and one finished after has its ack behind the copy.
    let (mut count, mut last_seq) = (0, None);
    for chunk in copies.list().chunks(COMPACT_CHUNK) {
        let pushed = {
            let mut live = lock(&write_ahead.live);
            if shared.queue.is_closed() {
                // The shutdown spill writes every live task anew.
                break;
            }
            write_ahead.commit.push_copies(&copies, chunk, |copy| {
                live.settled_in(copy.id, copy.segment) && live.begin_move(copy.id)
            })
        };
        count += pushed.count;
        last_seq = pushed.last_seq.or(last_seq);
    }
    if let Some(seq) = last_seq {
        write_ahead.commit.wait(seq).await?;
    }
    Ok(count)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::FineTimers;

    #[test]
    fn the_flusher_thread_waits_with_a_microsecond_of_slack_and_its_slack_is_put_back() {
        let before = rustix::thread::current_timer_slack().unwrap();
        assert_ne!(
            before,
            FineTimers::SLACK_NS,
            "the test needs another slack to begin with"
        );
        {
            let _fine = FineTimers::set();
            assert_eq!(
                rustix::thread::current_timer_slack().unwrap(),
                FineTimers::SLACK_NS
            );
        }
        assert_eq!(rustix::thread::current_timer_slack().unwrap(), before);
    }
}
