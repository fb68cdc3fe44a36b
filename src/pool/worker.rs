//! A worker: takes jobs, runs the handler, and hands each outcome to its host.
//!
//! The worker knows nothing of the pool's state: it sees the narrow [`Host`] interface (the
//! next job, the two tokens, the counters, where outcomes go), which the pool implements in
//! `outcome.rs`.

use std::any::Any;
use std::cell::Cell;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use super::job::Job;
use crate::error::{BoxError, error_chain};
use crate::policy::Permanent;
use crate::report::Counters;
use crate::task::Task;

/// How one run of a handler ended.
pub(crate) enum Outcome {
    Completed,
    /// The error text, and whether it is permanent.
    Failed(String, bool),
    /// Dropped at the hard stop.
    Aborted,
}

thread_local! {
    /// While a handler is called or its future polled on this thread: the [`Host::key`] of
    /// the pool running it. Set around each poll (a thread-local, not a task-local: no future
    /// of its own to wrap the handler's in, and no lookup beyond one `Cell`).
    static RUNNING_FOR: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The key of the pool whose handler is running on this thread, if one is.
pub(crate) fn running_for() -> Option<usize> {
    RUNNING_FOR.get()
}

/// Marks this thread as running a handler of the pool `key` while it lives (restoring what
/// was marked before, on unwind too).
struct Running(Option<usize>);

impl Running {
    fn enter(key: usize) -> Self {
        Self(RUNNING_FOR.replace(Some(key)))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING_FOR.set(self.0);
    }
}

/// What a worker needs from the pool.
pub(crate) trait Host<T>: Send + Sync + 'static {
    /// A number that tells this pool from any other in the process (while it lives).
    fn key(&self) -> usize;
    /// The next job, its payload decoded, or `None` when the worker should stop.
    fn next_job(&self, local: &mut Local) -> impl Future<Output = Option<Job<T>>> + Send;
    /// The handlers' token: fires at the drain deadline. Each worker shares a child of it
    /// (cancelled with it) with its tasks by `Arc`.
    fn deadline(&self) -> &Arc<CancellationToken>;
    /// Fires at the hard stop: a handler still running is dropped.
    fn hard_stop(&self) -> &CancellationToken;
    fn counters(&self) -> &Counters;
    /// The histograms a run records into.
    #[cfg(feature = "metrics")]
    fn metrics(&self) -> &crate::metrics::Metrics;
    /// Records how a run ended.
    fn settle(
        &self,
        job: Job<T>,
        outcome: Outcome,
        local: &mut Local,
    ) -> impl Future<Output = ()> + Send;
}

/// What one worker keeps to itself, so that workers finishing tasks at once do not write the
/// same cache line at every task: its stripe of the counts the workers move, and the spill
/// reserve its finished tasks gave back, returned to the pool in batches (see `outcome.rs`).
#[derive(Debug)]
pub(crate) struct Local {
    /// The worker's number: its stripe of a `Striped` count.
    pub(crate) stripe: usize,
    /// Spill reserve bytes given back and not returned to the pool yet.
    pub(crate) unreserved: u64,
}

/// The worker loop: runs until intake closes (queued tasks are then spilled, not started).
pub(crate) async fn run<T, H, F, Fut, E>(host: Arc<H>, handler: Arc<F>, number: usize)
where
    T: Send + Sync + 'static,
    H: Host<T>,
    F: Fn(Task<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    // This worker's own handle on the handlers' token: a child of it, cancelled with it, so the
    // workers do not all count references on one `Arc` at every task.
    let deadline = Arc::new(host.deadline().child_token());
    let mut local = Local {
        stripe: number,
        unreserved: 0,
    };
    while let Some(job) = host.next_job(&mut local).await {
        let outcome = run_one(&*host, &*handler, &job, &deadline, local.stripe).await;
        host.settle(job, outcome, &mut local).await;
    }
}

async fn run_one<T, H, F, Fut, E>(
    host: &H,
    handler: &F,
    job: &Job<T>,
    deadline: &Arc<CancellationToken>,
    stripe: usize,
) -> Outcome
where
    H: Host<T>,
    F: Fn(Task<T>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<BoxError> + 'static,
{
    let Some(payload) = job.payload.decoded() else {
        // Not reached: the host decodes a job before handing it over.
        return Outcome::Failed("the payload was not decoded".to_owned(), true);
    };
    let counters = host.counters();
    counters.in_flight.add(stripe, 1);
    #[cfg(feature = "metrics")]
    host.metrics().queue_wait.record(job.queued_at.elapsed());
    // Timed only when someone will read it.
    let debug = tracing::enabled!(tracing::Level::DEBUG);
    let started = (debug || cfg!(feature = "metrics")).then(tokio::time::Instant::now);
    let task = Task {
        id: job.id,
        attempt: job.state.attempts.saturating_add(1),
        interrupted: job.state.interrupted,
        enqueued_at: UNIX_EPOCH + Duration::from_millis(job.state.enqueued_ms),
        payload: Arc::clone(payload),
        // A claimed task's token also fires when its lease is lost.
        cancel: job
            .lease
            .as_ref()
            .map_or_else(|| Arc::clone(deadline), |lease| Arc::clone(&lease.token)),
    };
    let span = match &job.span {
        Some(span) => {
            span.record("attempt", task.attempt);
            (**span).clone()
        }
        None => tracing::info_span!("task", id = %job.id, attempt = task.attempt),
    };
    let key = host.key();
    let made = {
        let _running = Running::enter(key);
        catch_unwind(AssertUnwindSafe(|| handler(task)))
    };
    let outcome = match made {
        Err(panic) => Outcome::Failed(panic_message(&*panic), false),
        Ok(future) => {
            let mut future = std::pin::pin!(future);
            // The handler first at every wake, polled in its span, marked as running for this
            // pool and with a panic caught: one future, not three wrapped in one another. The
            // hard stop's future is made (and registered) only once the handler waits, so a
            // handler that finishes at its first poll (most do) never makes one.
            let mut stop = None;
            std::future::poll_fn(|cx| {
                let polled = {
                    let _entered = span.enter();
                    let _running = Running::enter(key);
                    catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx)))
                };
                match polled {
                    Ok(Poll::Ready(result)) => return Poll::Ready(outcome_of(Ok(result))),
                    Err(panic) => return Poll::Ready(outcome_of::<E>(Err(panic))),
                    Ok(Poll::Pending) => {}
                }
                let stop = stop.get_or_insert_with(|| Box::pin(host.hard_stop().cancelled()));
                stop.as_mut().poll(cx).map(|()| Outcome::Aborted)
            })
            .await
        }
    };
    counters.in_flight.sub(stripe, 1);
    let took = started.map(|started| started.elapsed());
    #[cfg(feature = "metrics")]
    if let Some(took) = took {
        host.metrics().run.record(took);
    }
    if let Some(took) = took
        && debug
    {
        let how = match &outcome {
            Outcome::Completed => "completed",
            Outcome::Failed(..) => "failed",
            Outcome::Aborted => "dropped at the hard stop",
        };
        tracing::debug!(
            task = %job.id,
            run_us = took.as_micros() as u64,
            outcome = how,
            "task run ended"
        );
    }
    outcome
}

/// How a handler's run ended, from its future's output (or the panic caught polling it).
fn outcome_of<E: Into<BoxError>>(result: Result<Result<(), E>, Box<dyn Any + Send>>) -> Outcome {
    match result {
        Ok(Ok(())) => Outcome::Completed,
        Ok(Err(error)) => {
            let error: BoxError = error.into();
            Outcome::Failed(error_chain(&*error), Permanent::is_in(&*error))
        }
        Err(panic) => Outcome::Failed(panic_message(&*panic), false),
    }
}

pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    let detail = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a non-string payload");
    format!("handler panicked: {detail}")
}

pin_project_lite::pin_project! {
    /// Resolves to `Err` with the panic payload if polling the inner future panics.
    pub(crate) struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F> CatchUnwind<F> {
    pub(crate) fn new(inner: F) -> Self {
        Self { inner }
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
