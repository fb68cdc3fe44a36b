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
use crate::journal::format::FLAG_INTERRUPTED;
use crate::pool::{Held, Inner, Job};
use crate::task::Task;

/// How one run of a handler ended.
enum Outcome {
    Completed,
    Failed(String),
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

async fn run_one<T, F, Fut, E>(inner: &Inner<T>, handler: &F, mut job: Job<T>)
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
        interrupted: job.meta.flags & FLAG_INTERRUPTED != 0,
        enqueued_at: UNIX_EPOCH + Duration::from_millis(job.meta.enqueued_ms),
        payload: Arc::clone(&job.payload),
        cancel: inner.deadline.clone(),
    };
    let span = tracing::info_span!("task", id = %job.id, attempt = task.attempt);
    let outcome = match catch_unwind(AssertUnwindSafe(|| handler(task))) {
        Err(panic) => Outcome::Failed(panic_message(&*panic)),
        Ok(future) => {
            let future = CatchUnwind { inner: future }.instrument(span);
            tokio::select! {
                biased;
                result = future => match result {
                    Ok(Ok(())) => Outcome::Completed,
                    Ok(Err(error)) => Outcome::Failed(error_chain(&*error.into())),
                    Err(panic) => Outcome::Failed(panic_message(&*panic)),
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
                inner.finish_journaled(job.id).await;
            }
        }
        Outcome::Aborted => {
            tracing::warn!(task = %job.id, "task stopped at the hard stop; journaled as interrupted");
            inner.hold(Held::Interrupted, job.interrupted());
        }
        Outcome::Failed(error) if inner.deadline.is_cancelled() => {
            tracing::warn!(task = %job.id, %error, "task gave up after the drain deadline; journaled as interrupted");
            job.last_error = Some(error.into());
            inner.hold(Held::Interrupted, job.interrupted());
        }
        Outcome::Failed(error) => {
            job.meta.attempts = job.meta.attempts.saturating_add(1);
            job.meta.flags &= !FLAG_INTERRUPTED;
            job.meta.interruptions = 0;
            inner.dead_letter(job, error).await;
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
