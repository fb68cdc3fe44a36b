//! Tracing: a task submitted from inside a span (an HTTP request's) runs in a span that
//! `follows_from` it, so a trace links the request to the background work; a task submitted
//! outside any span runs in a span of its own. Checked with a small recording subscriber.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::current_thread_runtime;
use drainpool::{BoxError, Pool, Task};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};
use tracing_core::span::Current;

/// What the subscriber saw of one span.
#[derive(Debug, Clone, Default)]
struct Seen {
    name: &'static str,
    fields: HashMap<&'static str, String>,
    follows_from: Vec<u64>,
}

impl Visit for Seen {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.fields.insert(field.name(), format!("{value:?}"));
    }
}

/// Records every span, its fields and its `follows_from` links; keeps the entered stack so
/// `Span::current()` works (the runtime is single-threaded, so one stack is enough).
#[derive(Debug, Default, Clone)]
struct Recorder {
    next: Arc<AtomicU64>,
    spans: Arc<Mutex<HashMap<u64, (Seen, &'static Metadata<'static>)>>>,
    stack: Arc<Mutex<Vec<u64>>>,
}

impl Recorder {
    fn seen(&self, id: u64) -> Seen {
        self.spans.lock().unwrap()[&id].0.clone()
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut seen = Seen {
            name: attrs.metadata().name(),
            ..Seen::default()
        };
        attrs.record(&mut seen);
        self.spans
            .lock()
            .unwrap()
            .insert(id, (seen, attrs.metadata()));
        Id::from_u64(id)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        if let Some((seen, _)) = self.spans.lock().unwrap().get_mut(&span.into_u64()) {
            values.record(seen);
        }
    }

    fn record_follows_from(&self, span: &Id, follows: &Id) {
        if let Some((seen, _)) = self.spans.lock().unwrap().get_mut(&span.into_u64()) {
            seen.follows_from.push(follows.into_u64());
        }
    }

    fn event(&self, _: &Event<'_>) {}

    fn enter(&self, span: &Id) {
        self.stack.lock().unwrap().push(span.into_u64());
    }

    fn exit(&self, span: &Id) {
        let mut stack = self.stack.lock().unwrap();
        if let Some(at) = stack.iter().rposition(|&id| id == span.into_u64()) {
            stack.remove(at);
        }
    }

    fn current_span(&self) -> Current {
        let Some(&id) = self.stack.lock().unwrap().last() else {
            return Current::none();
        };
        let metadata = self.spans.lock().unwrap()[&id].1;
        Current::new(Id::from_u64(id), metadata)
    }
}

#[test]
fn a_task_submitted_in_a_span_runs_in_a_span_that_follows_from_it() {
    let recorder = Recorder::default();
    let _default = tracing::subscriber::set_default(recorder.clone());
    current_thread_runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        // Each run reports the span it ran in; task 1 fails its first attempt.
        let (tx, mut ran_in) = tokio::sync::mpsc::unbounded_channel::<(u32, u32, Option<u64>)>();
        let pool = Pool::<u32>::builder()
            .workers(1)
            .backoff(std::time::Duration::ZERO, std::time::Duration::ZERO)
            .journal_dir(dir.path())
            .start(move |task: Task<u32>| {
                let tx = tx.clone();
                async move {
                    let current = tracing::Span::current().id().map(|id| id.into_u64());
                    tx.send((*task.payload(), task.attempt(), current)).unwrap();
                    if *task.payload() == 1 && task.attempt() == 1 {
                        return Err::<(), BoxError>("first attempt fails".into());
                    }
                    Ok(())
                }
            })
            .await
            .unwrap();

        let request = tracing::info_span!("request");
        let request_id = request.id().unwrap().into_u64();
        {
            let _entered = request.enter();
            pool.submit(1).await.unwrap();
        }
        pool.submit(2).await.unwrap();
        // Two runs of task 1, one of task 2.
        let mut runs = Vec::new();
        while runs.len() < 3 {
            runs.push(ran_in.recv().await.unwrap());
        }
        let report = pool.shutdown().await.unwrap();
        assert_eq!(report.completed, 2, "{report:?}");
        let span_of = |payload: u32, attempt: u32| {
            runs.iter()
                .find(|r| r.0 == payload && r.1 == attempt)
                .and_then(|r| r.2)
                .unwrap_or_else(|| panic!("run {payload}/{attempt} not in a span: {runs:?}"))
        };

        // Task 1: one span for both attempts, linked to the request, not its child.
        let first = span_of(1, 1);
        assert_eq!(span_of(1, 2), first, "both attempts in the task's span");
        let task = recorder.seen(first);
        assert_eq!(task.name, "task");
        assert_eq!(task.follows_from, vec![request_id]);
        assert_eq!(task.fields.get("attempt").map(String::as_str), Some("2"));
        assert!(task.fields.contains_key("id"), "{task:?}");

        // Task 2, submitted outside any span: a span of its own, linked to nothing.
        let other = recorder.seen(span_of(2, 1));
        assert_eq!(other.name, "task");
        assert!(other.follows_from.is_empty(), "{other:?}");
        assert_eq!(other.fields.get("attempt").map(String::as_str), Some("1"));
    });
}
