//! A worker: takes jobs, runs the handler, records the outcome.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;
use tracing::Instrument;

use crate::BoxError;
use crate::policy::{DeadlineAction, Interruption, Permanent};
use crate::pool::{Held, Inner, Job, now_ms};
use crate::task::Task;

/// How one run of a handler ended.
enum Outcome {
    Completed,
    /// The error text, and whether it is permanent.
    Failed(String, bool),
    /// Dropped at the hard stop.
    Aborted,
}

/// The worker loop: runs until intake closes (queued tasks are then spilled, not started).
pub(crate) async fn run<T, F, Fut, E>(inner: Arc<Inner<T>>, handler: Arc<F>)
where
    T: Serialize + Send + Sync + 'static,
    F: Fn(Task<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    while let Some(job) = inner.next_job().await {
        run_one(&inner, &*handler, job).await;
    }
}

async fn run_one<T, F, Fut, E>(inner: &Arc<Inner<T>>, handler: &F, mut job: Job<T>)
where
    T: Serialize + Send + Sync + 'static,
    F: Fn(Task<T>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<BoxError> + 'static,
{
    let counters = &inner.counters;
    counters.in_flight.fetch_add(1, Ordering::Relaxed);
    let task = Task {
        id: job.id,
        attempt: job.meta.attempts.saturating_add(1),
        interrupted: job.meta.interrupted,
        enqueued_at: UNIX_EPOCH + Duration::from_millis(job.meta.enqueued_ms),
        payload: Arc::clone(&job.payload),
        cancel: Arc::clone(&inner.deadline),
    };
    let span = tracing::info_span!("task", id = %job.id, attempt = task.attempt);
    let outcome = match catch_unwind(AssertUnwindSafe(|| handler(task))) {
        Err(panic) => Outcome::Failed(panic_message(&*panic), false),
        Ok(future) => {
            let future = CatchUnwind { inner: future }.instrument(span);
            tokio::select! {
                biased;
                result = future => match result {
                    Ok(Ok(())) => Outcome::Completed,
                    Ok(Err(error)) => {
                        let error: BoxError = error.into();
                        Outcome::Failed(error_chain(&*error), error.is::<Permanent>())
                    }
                    Err(panic) => Outcome::Failed(panic_message(&*panic), false),
                },
                () = inner.hard_stop.cancelled() => Outcome::Aborted,
            }
        }
    };
    counters.in_flight.fetch_sub(1, Ordering::Relaxed);

    match outcome {
        Outcome::Completed => {
            counters.completed.fetch_add(1, Ordering::Relaxed);
            if job.journaled {
                inner.finish_journaled(&job).await;
            }
        }
        Outcome::Aborted => interrupted(inner, job, None).await,
        // A handler that gives up once its token fired was interrupted, not failed.
        Outcome::Failed(error, _) if inner.deadline.is_cancelled() => {
            interrupted(inner, job, Some(error)).await;
        }
        Outcome::Failed(error, permanent) => {
            job.meta.attempts = job.meta.attempts.saturating_add(1);
            job.meta.interrupted = false;
            job.meta.interruptions = 0;
            let policy = &inner.policy;
            if permanent || job.meta.attempts >= policy.max_attempts {
                inner.dead_letter(job, error).await;
            } else {
                let delay = policy.backoff(job.meta.attempts, &inner.jitter);
                tracing::info!(
                    task = %job.id,
                    attempt = job.meta.attempts,
                    retry_in_ms = delay.as_millis() as u64,
                    %error,
                    "task failed; will retry"
                );
                job.meta.not_before_ms = now_ms().saturating_add(delay.as_millis() as u64);
                job.last_error = Some(error.into());
                inner.journal_retry(&job);
                counters.retried.fetch_add(1, Ordering::Relaxed);
                inner.retry_later(job, delay);
            }
        }
    }
}

/// Carries out the deadline action for a task stopped at the drain deadline, after the hook.
async fn interrupted<T>(inner: &Arc<Inner<T>>, job: Job<T>, error: Option<String>)
where
    T: Serialize + Send + Sync + 'static,
{
    let mut job = job.interrupted();
    if let Some(error) = error {
        job.last_error = Some(error.into());
    }
    let policy = &inner.policy;
    let poisoned = job.meta.interruptions >= policy.max_interruptions;
    let action = if poisoned {
        DeadlineAction::DeadLetter
    } else {
        policy.deadline_action(&job.payload)
    };
    if let Some(hook) = &policy.on_interrupt {
        let interruption = Interruption {
            id: job.id,
            attempt: job.meta.attempts.saturating_add(1),
            interruptions: job.meta.interruptions,
            action,
            payload: Arc::clone(&job.payload),
        };
        let hook = CatchUnwind {
            inner: hook(interruption),
        };
        match tokio::time::timeout(inner.config.cancel_grace, hook).await {
            Ok(Ok(())) => {}
            Ok(Err(panic)) => {
                tracing::error!(task = %job.id, error = %panic_message(&*panic), "interrupt hook panicked")
            }
            Err(_) => {
                tracing::error!(task = %job.id, "interrupt hook outlived the cancel grace; dropped")
            }
        }
    }
    match action {
        DeadlineAction::Requeue => {
            tracing::warn!(task = %job.id, interruptions = job.meta.interruptions, "task interrupted at the drain deadline; journaled");
            inner.hold(Held::Interrupted, job);
        }
        DeadlineAction::Drop => {
            tracing::warn!(task = %job.id, "task interrupted at the drain deadline; dropped by policy");
            inner.counters.dropped.fetch_add(1, Ordering::Relaxed);
            if job.journaled {
                inner.finish_journaled(&job).await;
            }
        }
        DeadlineAction::DeadLetter => {
            let reason = if poisoned {
                format!(
                    "interrupted at the drain deadline in {} consecutive runs",
                    job.meta.interruptions
                )
            } else {
                "interrupted at the drain deadline".to_string()
            };
            inner.dead_letter(job, reason).await;
        }
    }
}

/// An error and its sources, joined with ": ".
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    let detail = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a non-string payload");
    format!("handler panicked: {detail}")
}

pin_project_lite::pin_project! {
    /// Resolves to `Err` with the panic payload if polling the inner future panics.
    struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}
