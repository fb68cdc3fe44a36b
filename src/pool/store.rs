//! The journal as the pool sees it: typed records in, typed results out, each call on a
//! blocking thread with the journal locked. The first journal failure is kept for the report.
//!
//! Nothing here knows the record format: tasks are handed over as [`TaskRecord`]s whose
//! payloads the pool's codec encodes (for a spill, one at a time, as the journal writes them).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::job::{Job, Payload};
use super::lock::lock;
use crate::codec::Encoding;
use crate::error::JournalError;
use crate::journal::{Journal, SpillSource, TaskOptions, TaskRecord, TaskState};
use crate::task::TaskId;

/// The locked journal (`None` once closed) and what the pool learned of it.
pub(crate) struct Store {
    dir: PathBuf,
    journal: Arc<tokio::sync::Mutex<Option<Journal>>>,
    first_error: Mutex<Option<Arc<JournalError>>>,
    /// Time spent writing and syncing spills.
    spill_times: Mutex<(Duration, Duration)>,
    /// The journal's write speed and fsync latency, measured at start when the deadline is
    /// derived from a grace period.
    probe: Option<(u64, Duration)>,
    /// The live journal's bytes left at close.
    #[cfg(feature = "metrics")]
    closed_bytes: std::sync::OnceLock<u64>,
}

/// Jobs to spill, made into records one at a time as the journal writes them.
pub(crate) struct Spill<T> {
    jobs: Vec<Job<T>>,
    codec: Encoding<T>,
}

impl<T> Spill<T> {
    pub(crate) fn new(jobs: Vec<Job<T>>, codec: &Encoding<T>) -> Self {
        Self {
            jobs,
            codec: codec.clone(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }
}

impl<T: Send + Sync + 'static> SpillSource for Spill<T> {
    fn len(&self) -> usize {
        self.jobs.len()
    }

    fn record<'a>(&'a self, i: usize, payload: &'a mut Vec<u8>) -> Option<TaskRecord<'a>> {
        let job = self.jobs.get(i)?;
        let value = match &job.payload {
            // Held encoded in the queue: written as it is.
            Payload::Encoded(bytes) => return Some(job.record(bytes, None)),
            Payload::Decoded(value) => value,
        };
        if let Err(error) = self.codec.encode(value, payload) {
            tracing::error!(task = %job.id, %error, "payload failed to encode at spill; task lost");
            return None;
        }
        Some(job.record(payload, None))
    }
}

impl Store {
    pub(crate) fn new(dir: PathBuf, journal: Journal, probe: Option<(u64, Duration)>) -> Self {
        Self {
            dir,
            journal: Arc::new(tokio::sync::Mutex::new(Some(journal))),
            first_error: Mutex::new(None),
            spill_times: Mutex::new((Duration::ZERO, Duration::ZERO)),
            probe,
            #[cfg(feature = "metrics")]
            closed_bytes: std::sync::OnceLock::new(),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn probe(&self) -> Option<(u64, Duration)> {
        self.probe
    }

    /// Remembers the first journal failure for the report.
    pub(crate) fn record_error(&self, error: JournalError) -> Arc<JournalError> {
        let error = Arc::new(error);
        self.record_arc(Arc::clone(&error));
        error
    }

    pub(crate) fn record_arc(&self, error: Arc<JournalError>) {
        tracing::error!(error = &*error as &dyn std::error::Error, "journal failure");
        lock(&self.first_error).get_or_insert(error);
    }

    /// The first journal failure, if any.
    pub(crate) fn first_error(&self) -> Option<Arc<JournalError>> {
        lock(&self.first_error).clone()
    }

    /// The time spent writing and syncing spills so far.
    pub(crate) fn spill_times(&self) -> (Duration, Duration) {
        *lock(&self.spill_times)
    }

    /// Runs `f` on a blocking thread with the journal locked (`None` once it is closed). A
    /// panic in `f` becomes an I/O error naming `op`.
    pub(crate) async fn with_journal<R: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Option<Journal>) -> Result<R, JournalError> + Send + 'static,
    ) -> Result<R, JournalError> {
        let mut guard = Arc::clone(&self.journal).lock_owned().await;
        match tokio::task::spawn_blocking(move || f(&mut guard)).await {
            Ok(result) => result,
            Err(panic) => Err(JournalError::io(
                op,
                &self.dir,
                None,
                std::io::Error::other(panic.to_string()),
            )),
        }
    }

    /// The bytes of the live journal's segments (see `Journal::bytes`), open or closed; `None`
    /// if it failed to close.
    #[cfg(feature = "metrics")]
    pub(crate) async fn journal_bytes(&self) -> Option<u64> {
        match self.journal.lock().await.as_ref() {
            Some(journal) => Some(journal.bytes()),
            None => self.closed_bytes.get().copied(),
        }
    }

    /// The journal, locked, for quick calls that do no I/O.
    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'_, Option<Journal>> {
        self.journal.lock().await
    }

    /// Records that a journaled task is finished (on-shutdown mode: write-ahead acks go
    /// through the group commit). Not synced: a lost ack only means a repeat.
    pub(crate) async fn ack(&self, id: TaskId) {
        let mut journal = self.journal.lock().await;
        if let Some(journal) = journal.as_mut()
            && let Err(error) = journal.append_ack(id)
        {
            // A lost ack only means a repeat; the task itself is finished.
            tracing::warn!(error = &error as &dyn std::error::Error, task = %id, "could not append ack");
        }
    }

    /// Deletes the segments of earlier runs once nothing live depends on them.
    pub(crate) async fn retire_replayed(&self) {
        let result = self
            .with_journal("retire", |journal| {
                journal.as_mut().map_or(Ok(()), Journal::retire_obsolete)
            })
            .await;
        match result {
            Ok(()) => tracing::info!("replay finished; old segments retired"),
            Err(error) => {
                self.record_error(error);
            }
        }
    }

    /// Writes one dead letter, durably: the task's state and encoded payload, with `reason`
    /// as its last error.
    pub(crate) async fn dead_letter(
        &self,
        id: TaskId,
        state: TaskState,
        reason: String,
        (payload, options): (Vec<u8>, Option<Box<TaskOptions>>),
    ) -> Result<(), Arc<JournalError>> {
        let result = self
            .with_journal("dead letter", move |journal| {
                let journal = journal.as_mut().ok_or(JournalError::Poisoned)?;
                journal.write_dead(&TaskRecord {
                    id,
                    state,
                    last_error: Cow::Owned(reason),
                    payload: &payload,
                    options: options.as_deref().map(Cow::Borrowed),
                })
            })
            .await;
        result.map_err(|error| self.record_error(error))
    }

    /// Journals the tasks of `spill` as live tasks and fsyncs, as many as fit. Returns the ids
    /// of those that could not be saved, in id order (none: all are durable), and the time
    /// spent writing and syncing (zero if nothing was written).
    pub(crate) async fn spill<T: Send + Sync + 'static>(
        &self,
        spill: Spill<T>,
    ) -> (Vec<TaskId>, Duration) {
        if spill.len() == 0 {
            return (Vec::new(), Duration::ZERO);
        }
        // Shared with the blocking thread, so that the ids are still at hand if it fails.
        let spill = Arc::new(spill);
        let writing = Arc::clone(&spill);
        let result = self
            .with_journal("spill", move |journal| {
                let journal = journal.as_mut().ok_or(JournalError::Poisoned)?;
                Ok(journal.spill(&*writing))
            })
            .await;
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(error) => {
                tracing::error!(
                    tasks = spill.len(),
                    error = &error as &dyn std::error::Error,
                    "spill failed; no task saved"
                );
                self.record_error(error);
                return (
                    spill.jobs.iter().map(|job| job.id).collect(),
                    Duration::ZERO,
                );
            }
        };
        let unsaved: Vec<TaskId> = outcome.unsaved.iter().map(|&i| spill.jobs[i].id).collect();
        {
            let mut total = lock(&self.spill_times);
            total.0 += outcome.write_time;
            total.1 += outcome.sync_time;
        }
        if !unsaved.is_empty() {
            let shown: Vec<String> = unsaved.iter().take(20).map(ToString::to_string).collect();
            tracing::error!(
                saved = outcome.written,
                unsaved = unsaved.len(),
                ids = %shown.join(" "),
                "spill could not save every task; the first unsaved ids are listed"
            );
        } else if outcome.error.is_some() {
            tracing::warn!(
                tasks = outcome.written,
                "spilled tasks to a fresh segment after a failure"
            );
        } else {
            // A routine shutdown: what the pool is for, not a warning.
            tracing::info!(tasks = outcome.written, "spilled tasks to the journal");
        }
        if let Some(error) = outcome.error {
            self.record_error(error);
        }
        (unsaved, outcome.write_time + outcome.sync_time)
    }

    /// Syncs, deletes what the spill replaced, and releases the lock. Returns how long it took.
    pub(crate) async fn close(&self) -> Duration {
        let started = std::time::Instant::now();
        let result = self
            .with_journal("close", |journal| {
                journal.take().map(Journal::close).transpose()
            })
            .await;
        match result {
            #[cfg(feature = "metrics")]
            Ok(Some(bytes)) => {
                let _ = self.closed_bytes.set(bytes);
            }
            Ok(_) => {}
            Err(error) => {
                self.record_error(error);
            }
        }
        started.elapsed()
    }
}
