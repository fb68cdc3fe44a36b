use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use super::*;
use crate::journal::TaskState;
use crate::pool::job::{Fresh, Payload};
use crate::task::TaskId;

const HOT_: u64 = HOT as u64;

fn job(seq: u64) -> Job<u64> {
    Job {
        id: TaskId::new(1, seq),
        state: TaskState::default(),
        last_error: None,
        payload: Payload::new(seq),
        journaled: false,
        replayed: false,
        reserved: 0,
        #[cfg(feature = "metrics")]
        queued_at: Instant::now(),
        span: None,
        lease: None,
        priority: 0,
        options: None,
    }
}

fn queued(seq: u64) -> Queued<u64> {
    Queued {
        head: Head {
            id: TaskId::new(1, seq),
            enqueued_ms: 0,
            reserved: 0,
            journaled: false,
            span: None,
            lease: None,
            priority: 0,
            options: None,
            #[cfg(feature = "metrics")]
            queued_at: Instant::now(),
        },
        payload: Fresh::Value(seq),
    }
}

/// Sends task `seq` in `slot` the way intake does: encoded (here, its number in decimal)
/// when the queue hands it back.
fn send_in(slot: Slot<'_, u64>, seq: u64) {
    if let Err((slot, mut task)) = slot.send(queued(seq)) {
        task.payload = Fresh::Encoded(seq.to_string().into_bytes().into_boxed_slice());
        slot.send_encoded(task);
    }
}

fn send(queue: &Queue<u64>, seq: u64) {
    send_in(queue.try_reserve().ok().expect("room"), seq);
}

/// Polls `future` once.
fn poll_once<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(Waker::noop()))
}

/// The task's number, from its payload in either form.
fn seq(job: &Job<u64>) -> u64 {
    match &job.payload {
        Payload::Decoded(value) => **value,
        Payload::Encoded(bytes) => std::str::from_utf8(bytes).unwrap().parse().unwrap(),
    }
}

fn queue(capacity: usize, backlog: &[u64]) -> Queue<u64> {
    queue_for(1, capacity, backlog)
}

fn queue_for(workers: usize, capacity: usize, backlog: &[u64]) -> Queue<u64> {
    Queue::new(
        capacity,
        workers,
        backlog.iter().map(|&n| job(n)).collect(),
        Vec::new(),
    )
}

#[tokio::test]
async fn new_tasks_past_the_hot_window_are_held_encoded_and_keep_their_order() {
    let queue = queue(HOT + 10, &[]);
    for n in 0..HOT_ + 10 {
        send(&queue, n);
    }
    assert_eq!(queue.len(), HOT + 10);
    for n in 0..HOT_ + 10 {
        let job = queue.next_job(0, || ()).await.unwrap();
        assert_eq!((job.id, seq(&job)), (TaskId::new(1, n), n));
        assert_eq!(
            job.payload.decoded().is_some(),
            n < HOT_,
            "decoded up to the window, encoded past it: task {n}"
        );
    }
    // Taken: the window has room again.
    send(&queue, 9999);
    assert!(
        queue
            .next_job(0, || ())
            .await
            .unwrap()
            .payload
            .decoded()
            .is_some()
    );
}

#[tokio::test]
async fn the_backlog_goes_first_and_a_follow_up_joins_it() {
    let queue = queue(4, &[1, 2]);
    send(&queue, 10);
    assert!(queue.push_follow_up(job(11)).is_ok());
    let mut order = Vec::new();
    for _ in 0..4 {
        order.push(seq(&queue.next_job(0, || ()).await.unwrap()));
    }
    assert_eq!(order, [1, 2, 11, 10]);
}

#[tokio::test]
async fn a_full_queue_gives_room_to_the_waiting_submitter_as_a_task_is_taken() {
    let queue = queue(2, &[]);
    send(&queue, 1);
    send(&queue, 2);
    assert!(matches!(queue.try_reserve(), Err(NoRoom::Full)));
    let mut waiting = pin!(queue.reserve());
    assert!(poll_once(waiting.as_mut()).is_pending());
    assert_eq!(seq(&queue.next_job(0, || ()).await.unwrap()), 1);
    let Poll::Ready(Ok(slot)) = poll_once(waiting.as_mut()) else {
        panic!("the submitter was not given the room");
    };
    // A slot given up gives its room back.
    drop(slot);
    send(&queue, 3);
    assert_eq!(queue.len(), 2);
}

/// A queue of `capacity` holding tasks 0 to `capacity - 1`, for four workers: while 16 or
/// fewer wait, a take is one task.
fn full(capacity: usize) -> Queue<u64> {
    let queue = queue_for(4, capacity, &[]);
    for n in 0..capacity as u64 {
        send(&queue, n);
    }
    queue
}

#[tokio::test]
async fn a_waiting_submitter_is_woken_once_a_batch_of_slots_is_free() {
    // Capacity 16: woken at 2 free slots (an eighth).
    let queue = full(16);
    let mut waiting = pin!(queue.reserve());
    assert!(poll_once(waiting.as_mut()).is_pending());
    let mut other = pin!(queue.reserve());
    assert!(poll_once(other.as_mut()).is_pending());
    assert_eq!(seq(&queue.next_job(0, || ()).await.unwrap()), 0);
    assert!(
        poll_once(waiting.as_mut()).is_pending(),
        "woken with one slot free"
    );
    assert_eq!(seq(&queue.next_job(0, || ()).await.unwrap()), 1);
    let Poll::Ready(Ok(slot)) = poll_once(waiting.as_mut()) else {
        panic!("not woken with two slots free");
    };
    // It took one and passed the other to the next submitter waiting.
    let Poll::Ready(Ok(other_slot)) = poll_once(other.as_mut()) else {
        panic!("the second submitter was not given the slot left");
    };
    drop((slot, other_slot));
    assert_eq!(queue.len(), 14);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_submitter_finds_a_slot_freed_below_the_batch_when_no_more_are_taken() {
    let queue = full(16);
    let mut waiting = pin!(queue.reserve());
    assert!(poll_once(waiting.as_mut()).is_pending());
    let mut told = pin!(queue.retry_added());
    assert!(poll_once(told.as_mut()).is_pending());
    // One slot frees, and no worker takes another (they are all busy): the room is owed, and
    // the upkeep task is told.
    assert_eq!(seq(&queue.next_job(0, || ()).await.unwrap()), 0);
    assert!(
        poll_once(told.as_mut()).is_ready(),
        "the upkeep task was not told"
    );
    // Not at once: a batch may still free meanwhile.
    let due = queue.release_due().expect("a time to pay the room");
    assert_eq!(due, Instant::now() + ROOM_OWED_FOR);
    assert!(poll_once(waiting.as_mut()).is_pending());
    // Then the upkeep task hands it to the submitter.
    tokio::time::advance(ROOM_OWED_FOR).await;
    assert_eq!(queue.release_due(), None);
    let Poll::Ready(Ok(slot)) = poll_once(waiting.as_mut()) else {
        panic!("the owed room was not handed over");
    };
    drop(slot);
    assert_eq!(queue.len(), 15);
}

#[tokio::test]
async fn a_task_sent_without_a_slot_is_queued_only_with_room_and_handed_back_otherwise() {
    let queue = queue(HOT + 1, &[]);
    let mut idle = pin!(queue.next_job(0, || ()));
    assert!(poll_once(idle.as_mut()).is_pending());
    let Queued { head, payload } = queued(0);
    let Fresh::Value(value) = payload else {
        panic!("built with its value")
    };
    assert!(queue.try_send(head, value).is_ok());
    // The idle worker was woken for it.
    assert!(matches!(poll_once(idle.as_mut()), Poll::Ready(Some(ref job)) if seq(job) == 0));
    for n in 1..=HOT_ + 1 {
        let Queued { head, payload } = queued(n);
        let Fresh::Value(value) = payload else {
            panic!("built with its value")
        };
        match queue.try_send(head, value) {
            Ok(()) => assert!(n <= HOT_, "task {n} past the hot window was queued decoded"),
            // Past the hot window: handed back with a slot, to be sent encoded.
            Err(Unsent::Cold(slot, head, value)) => {
                assert_eq!((n, head.id, value), (HOT_ + 1, TaskId::new(1, n), n));
                slot.send_encoded(Queued {
                    head,
                    payload: Fresh::Encoded(n.to_string().into_bytes().into_boxed_slice()),
                });
            }
            Err(Unsent::Refused(..)) => panic!("task {n} refused with room"),
        }
    }
    // Full: handed back as it came, nothing queued.
    let Queued { head, .. } = queued(9999);
    assert!(matches!(
        queue.try_send(head, 9999),
        Err(Unsent::Refused(NoRoom::Full, ref head, 9999)) if head.id == TaskId::new(1, 9999)
    ));
    assert_eq!(queue.len(), HOT + 1);
    // Closed: handed back too, and the shutdown takes what was queued.
    queue.close();
    let Queued { head, .. } = queued(10_000);
    assert!(matches!(
        queue.try_send(head, 10_000),
        Err(Unsent::Refused(NoRoom::Closed, _, 10_000))
    ));
    let taken = queue.take_queued().await;
    assert_eq!(
        taken.iter().map(seq).collect::<Vec<_>>(),
        (1..=HOT_ + 1).collect::<Vec<_>>()
    );
    assert!(
        taken[..HOT]
            .iter()
            .all(|job| job.payload.decoded().is_some())
    );
    assert!(
        taken[HOT].payload.decoded().is_none(),
        "the last was sent encoded"
    );
}

#[tokio::test]
async fn an_idle_worker_is_woken_by_a_task_and_by_the_gate_closing() {
    let queue = queue(4, &[]);
    let mut idle = pin!(queue.next_job(0, || ()));
    assert!(poll_once(idle.as_mut()).is_pending());
    send(&queue, 1);
    assert!(matches!(poll_once(idle.as_mut()), Poll::Ready(Some(ref job)) if seq(job) == 1));

    let mut idle = pin!(queue.next_job(0, || ()));
    assert!(poll_once(idle.as_mut()).is_pending());
    assert!(queue.close());
    assert!(!queue.close(), "closed once");
    assert!(matches!(poll_once(idle.as_mut()), Poll::Ready(None)));
}

#[tokio::test]
async fn once_the_gate_closes_no_task_starts_and_a_waiting_submitter_is_refused() {
    let queue = queue(1, &[]);
    send(&queue, 1);
    let mut waiting = pin!(queue.reserve());
    assert!(poll_once(waiting.as_mut()).is_pending());
    queue.close();
    assert!(matches!(
        poll_once(waiting.as_mut()),
        Poll::Ready(Err(NoRoom::Closed))
    ));
    assert!(
        queue.next_job(0, || ()).await.is_none(),
        "task 1 is never started"
    );
    let queued = queue.take_queued().await;
    assert_eq!(queued.iter().map(seq).collect::<Vec<_>>(), [1]);
}

#[tokio::test]
async fn the_shutdown_takes_every_task_in_id_order_and_waits_for_slots_in_use() {
    let queue = queue(HOT + 10, &[1]);
    for n in 2..HOT_ + 10 {
        send(&queue, n);
    }
    let slot = queue.try_reserve().ok().unwrap();
    queue.close();
    let mut taking = pin!(queue.take_queued());
    assert!(
        poll_once(taking.as_mut()).is_pending(),
        "a slot reserved before the gate closed is still in use"
    );
    assert!(matches!(queue.try_reserve(), Err(NoRoom::Closed)));
    assert!(
        queue.push_follow_up(job(99)).is_err(),
        "taken: held instead"
    );
    send_in(slot, HOT_ + 10);
    let Poll::Ready(queued) = poll_once(taking.as_mut()) else {
        panic!("the last slot was used: nothing is left to wait for");
    };
    let order: Vec<u64> = queued.iter().map(seq).collect();
    assert_eq!(order, (1..=HOT_ + 10).collect::<Vec<_>>());
    let encoded = queued.iter().filter(|j| j.payload.decoded().is_none());
    // Tasks 2..HOT+10 were queued past the window's HOT; the last one came after the
    // queue was emptied.
    assert_eq!(encoded.count(), 8, "those held encoded still are");
    assert_eq!(queue.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn waiting_tasks_are_released_as_they_come_due_and_the_rest_keep_waiting() {
    let queue = queue(8, &[]);
    let now = Instant::now();
    // Out of order, and many: each release takes only what is due.
    for seq in (1..=1000).rev() {
        queue.retry_later(job(seq), Duration::from_millis(seq));
    }
    assert_eq!(queue.len(), 1000);
    tokio::time::advance(Duration::from_millis(3)).await;
    assert_eq!(queue.release_due(), Some(now + Duration::from_millis(4)));
    for expected in 1..=3 {
        let job = queue.next_job(0, || ()).await.unwrap();
        assert_eq!(seq(&job), expected);
    }
    assert_eq!(queue.len(), 997);
    let rest = queue.take_waiting();
    assert_eq!(rest.len(), 997);
    assert_eq!(queue.release_due(), None);
}

#[tokio::test]
async fn a_worker_takes_several_tasks_from_a_long_queue_and_runs_them_in_order() {
    // One worker, 64 waiting: it takes a quarter of them (16) at once.
    let queue = queue(64, &[]);
    for n in 0..64 {
        send(&queue, n);
    }
    assert_eq!(seq(&queue.next_job(0, || ()).await.unwrap()), 0);
    // The 15 in its hand still count as waiting, and the room they left is free.
    assert_eq!(queue.len(), 63);
    for n in 64..80 {
        send(&queue, n);
    }
    assert!(matches!(queue.try_reserve(), Err(NoRoom::Full)));
    for n in 1..80 {
        assert_eq!(seq(&queue.next_job(0, || ()).await.unwrap()), n);
    }
    assert_eq!(queue.len(), 0);
}

#[tokio::test]
async fn a_worker_out_of_work_takes_from_another_hand_before_it_waits() {
    let queue = queue_for(2, 64, &[]);
    for n in 0..64 {
        send(&queue, n);
    }
    // Worker 0 takes 8 (a quarter of its share): 1 to run, 7 in its hand. It is busy now.
    assert_eq!(seq(&queue.next_job(0, || ()).await.unwrap()), 0);
    // Worker 1 takes the rest of the queue, then worker 0's hand, oldest first.
    let mut taken = Vec::new();
    for _ in 1..64 {
        taken.push(seq(&queue.next_job(1, || ()).await.unwrap()));
    }
    assert_eq!(taken[..56], (8..64).collect::<Vec<_>>());
    assert_eq!(taken[56..], (1..8).collect::<Vec<_>>());
    // Nothing is left anywhere: worker 1 waits.
    let mut idle = pin!(queue.next_job(1, || ()));
    assert!(poll_once(idle.as_mut()).is_pending());
    assert_eq!(queue.len(), 0);
}

#[tokio::test]
async fn the_shutdown_takes_the_tasks_in_the_workers_hands_and_none_of_them_starts() {
    let queue = queue_for(2, 64, &[]);
    for n in 0..64 {
        send(&queue, n);
    }
    assert_eq!(seq(&queue.next_job(0, || ()).await.unwrap()), 0);
    assert_eq!(seq(&queue.next_job(1, || ()).await.unwrap()), 8);
    queue.close();
    assert!(
        queue.next_job(0, || ()).await.is_none(),
        "its hand holds tasks 1 to 7, and the gate is closed"
    );
    let taken = queue.take_queued().await;
    let expected: Vec<u64> = (1..64).filter(|&n| n != 8).collect();
    assert_eq!(taken.iter().map(seq).collect::<Vec<_>>(), expected);
    assert_eq!(queue.len(), 0);
}

#[tokio::test]
async fn a_job_joining_the_backlog_goes_before_the_tasks_in_a_workers_hand() {
    let queue = queue(64, &[]);
    for n in 0..64 {
        send(&queue, n);
    }
    assert_eq!(seq(&queue.next_job(0, || ()).await.unwrap()), 0);
    // Tasks 1 to 15 are in the worker's hand; a follow-up and a claimed task join the backlog.
    assert!(queue.push_follow_up(job(100)).is_ok());
    queue.push_backlog(job(101));
    assert_eq!(seq(&queue.next_job(0, || ()).await.unwrap()), 100);
    assert_eq!(seq(&queue.next_job(0, || ()).await.unwrap()), 101);
    // The backlog is empty again: the hand, then the rest of the queue, in order.
    for n in 1..64 {
        assert_eq!(seq(&queue.next_job(0, || ()).await.unwrap()), n);
    }
}

/// A worker finds the queue empty while a submitter is ready on the same thread: the
/// lingering queue's worker lets it run and takes its task without registering as idle; the
/// other registers (and is woken for the task).
#[tokio::test(flavor = "current_thread")]
async fn a_lingering_worker_takes_a_burst_without_registering_as_idle() {
    for linger in [true, false] {
        let queue = Arc::new(queue(4, &[]).lingering(linger));
        let registered = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let worker = tokio::spawn({
            let (queue, registered) = (Arc::clone(&queue), Arc::clone(&registered));
            async move {
                let job = queue
                    .next_job(0, || {
                        registered.store(true, std::sync::atomic::Ordering::SeqCst)
                    })
                    .await;
                seq(&job.unwrap())
            }
        });
        // Spawned after the worker: on this one thread, it runs after the worker's first look.
        let submitter = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move { send(&queue, 7) }
        });
        submitter.await.unwrap();
        assert_eq!(worker.await.unwrap(), 7);
        assert_eq!(
            registered.load(std::sync::atomic::Ordering::SeqCst),
            !linger,
            "lingering: {linger}"
        );
    }
}
