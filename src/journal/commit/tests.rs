use super::*;
use crate::journal::record::TaskState;

const EPOCH: u64 = 0x5eed;

fn record(seq: u64, payload: &[u8]) -> TaskRecord<'_> {
    TaskRecord {
        id: TaskId::new(1, seq),
        state: TaskState::default(),
        last_error: "".into(),
        payload,
        options: None,
    }
}

/// The records in `bytes`, decoded under [`EPOCH`]: (kind, seq, payload).
fn decode(mut bytes: &[u8]) -> Vec<(Kind, u64, Vec<u8>)> {
    let mut found = Vec::new();
    while !bytes.is_empty() {
        let (record, len) = format::decode_record(bytes, EPOCH).unwrap();
        found.push((record.kind, record.id.seq(), record.payload.to_vec()));
        bytes = &bytes[len..];
    }
    found
}

/// Polls `future` once.
fn poll_once<F: std::future::Future>(future: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    future.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
}

#[tokio::test]
async fn records_that_need_no_fsync_wait_for_a_new_task_a_waiter_or_their_size() {
    let commit = Commit::new(EPOCH);
    // An ack and a retry's state alone stay unless forced.
    commit.push_ack(TaskId::new(1, 1));
    commit.push_task(&record(2, b"retry"), true);
    assert!(commit.take(false).is_none());
    assert!(commit.holds_deferred());
    // A new task's record takes them along, and wakes the flusher.
    let mut pushed = std::pin::pin!(commit.pushed());
    assert!(
        poll_once(pushed.as_mut()).is_ready(),
        "the first push woke it"
    );
    let mut pushed = std::pin::pin!(commit.pushed());
    assert!(poll_once(pushed.as_mut()).is_pending());
    commit.push_task(&record(3, b"new"), false);
    assert!(
        poll_once(pushed.as_mut()).is_ready(),
        "the new task did not wake it"
    );
    let batch = commit.take(false).unwrap();
    assert!(batch.new_tasks);
    let seqs: Vec<u64> = decode(&batch.bytes).iter().map(|r| r.1).collect();
    assert_eq!(seqs, [1, 2, 3]);
    commit.finish(batch.last_seq, Ok(()));
    assert!(!commit.holds_deferred());

    // Someone waiting for an ack has it taken at once.
    let seq = commit.push_ack(TaskId::new(1, 3));
    assert!(commit.take(false).is_none());
    let mut waiting = std::pin::pin!(commit.wait(seq));
    assert!(poll_once(waiting.as_mut()).is_pending());
    let batch = commit.take(false).expect("taken for its waiter");
    assert!(!batch.new_tasks);
    commit.finish(batch.last_seq, Ok(()));
    assert!(matches!(
        poll_once(waiting.as_mut()),
        std::task::Poll::Ready(Ok(()))
    ));

    // Past the size, they go on their own.
    let mut n = 10;
    while commit.take(false).is_none() {
        assert!(commit.pending().buf.len() < DEFER_BYTES);
        commit.push_ack(TaskId::new(1, n));
        n += 1;
    }
    assert!(n > 10 + (DEFER_BYTES / 64) as u64, "taken after {n} acks");
}

#[tokio::test]
async fn one_batch_covers_every_record_pushed_before_it_is_taken() {
    let commit = Commit::new(EPOCH);
    assert_eq!(commit.push_task(&record(1, b"a"), false), 1);
    assert_eq!(commit.push_task(&record(2, b"bb"), true), 2);
    assert_eq!(commit.push_ack(TaskId::new(1, 1)), 3);
    // The pushes left one wake-up for the flusher, kept until it waits.
    tokio::time::timeout(std::time::Duration::from_secs(10), commit.pushed())
        .await
        .expect("a push wakes the flusher");
    let batch = commit.take(true).unwrap();
    assert_eq!(
        decode(&batch.bytes),
        [
            (Kind::Task, 1, b"a".to_vec()),
            (Kind::Task, 2, b"bb".to_vec()),
            (Kind::Ack, 1, Vec::new())
        ]
    );
    let lens: Vec<u32> = batch.placements.iter().map(|p| p.len).collect();
    assert_eq!(
        lens,
        [format::task_record_len(1, 0), format::task_record_len(2, 0)].map(|l| l as u32)
    );
    assert_eq!(batch.last_seq, 3);
    assert!(batch.new_tasks);
    assert!(commit.take(true).is_none());
    commit.finish(3, Ok(()));
    for seq in 1..=3 {
        commit.wait(seq).await.unwrap();
    }
    // The next push wakes the flusher again.
    assert_eq!(commit.push_task(&record(3, b"d"), true), 4);
    tokio::time::timeout(std::time::Duration::from_secs(10), commit.pushed())
        .await
        .expect("a push wakes the flusher");
    assert!(
        !commit.take(true).unwrap().new_tasks,
        "a moved record alone needs no fsync"
    );
}

#[tokio::test]
async fn a_failed_batch_fails_its_records_and_every_later_one_but_not_earlier_ones() {
    let commit = Commit::new(EPOCH);
    commit.push_task(&record(1, b"a"), false);
    let first = commit.take(true).unwrap();
    commit.finish(first.last_seq, Ok(()));
    commit.push_task(&record(2, b"b"), false);
    let second = commit.take(true).unwrap();
    commit.finish(second.last_seq, Err(Arc::new(JournalError::Poisoned)));
    commit.push_task(&record(3, b"c"), false);
    let third = commit.take(true).unwrap();
    commit.finish(third.last_seq, Ok(()));
    assert!(commit.wait(1).await.is_ok());
    assert!(commit.wait(2).await.is_err());
    assert!(
        commit.wait(3).await.is_err(),
        "nothing after a failure is trusted"
    );
}

/// Counts its wake-ups.
#[derive(Default)]
struct Wakes(std::sync::atomic::AtomicUsize);

impl std::task::Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Wakes {
    fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[test]
fn handling_a_batch_wakes_its_own_waiters_and_no_others() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    let commit = Commit::new(EPOCH);
    let first = commit.push_task(&record(1, b"a"), false);
    let batch = commit.take(true).unwrap();
    let second = commit.push_task(&record(2, b"b"), false);
    let (one, two) = (Arc::new(Wakes::default()), Arc::new(Wakes::default()));
    let (waker_one, waker_two) = (Waker::from(Arc::clone(&one)), Waker::from(Arc::clone(&two)));
    let mut wait_one = std::pin::pin!(commit.wait(first));
    let mut wait_two = std::pin::pin!(commit.wait(second));
    assert!(
        wait_one
            .as_mut()
            .poll(&mut Context::from_waker(&waker_one))
            .is_pending()
    );
    assert!(
        wait_two
            .as_mut()
            .poll(&mut Context::from_waker(&waker_two))
            .is_pending()
    );

    commit.finish(batch.last_seq, Ok(()));
    assert_eq!(
        (one.count(), two.count()),
        (1, 0),
        "only the first batch's waiter"
    );
    assert!(matches!(
        wait_one.as_mut().poll(&mut Context::from_waker(&waker_one)),
        Poll::Ready(Ok(()))
    ));
    assert!(
        wait_two
            .as_mut()
            .poll(&mut Context::from_waker(&waker_two))
            .is_pending()
    );

    let batch = commit.take(true).unwrap();
    commit.finish(batch.last_seq, Err(Arc::new(JournalError::Poisoned)));
    assert_eq!(two.count(), 1);
    assert!(matches!(
        wait_two.as_mut().poll(&mut Context::from_waker(&waker_two)),
        Poll::Ready(Err(_))
    ));
}

#[test]
fn copies_are_the_last_record_per_id_reencoded_and_pushed_as_moved() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("old.seg");
    let old_epoch = 77;
    let mut bytes = format::encode_header(format::Header {
        epoch: old_epoch,
        segment: 4,
    })
    .to_vec();
    for (seq, payload) in [(1, &b"old"[..]), (2, b"two"), (1, b"new"), (3, b"gone")] {
        format::encode_record(&mut bytes, old_epoch, Kind::Task, &record(seq, payload));
    }
    std::fs::write(&path, &bytes).unwrap();

    let mut copies = Copies::default();
    copies.read(&path, 4, EPOCH, |id| id.seq() != 3).unwrap();
    copies
        .read(&tmp.path().join("deleted.seg"), 5, EPOCH, |_| true)
        .unwrap();
    let ids: Vec<(u64, u64)> = copies
        .list()
        .iter()
        .map(|c| (c.id.seq(), c.segment))
        .collect();
    assert_eq!(ids, [(1, 4), (2, 4)]);

    let commit = Commit::new(EPOCH);
    let pushed = commit.push_copies(&copies, copies.list(), |copy| copy.id.seq() == 1);
    assert_eq!(
        pushed,
        Pushed {
            count: 1,
            last_seq: Some(1),
        }
    );
    let batch = commit.take(true).unwrap();
    assert_eq!(decode(&batch.bytes), [(Kind::Task, 1, b"new".to_vec())]);
    assert!(batch.placements[0].moved && !batch.new_tasks);
}

#[tokio::test]
async fn a_new_task_waits_for_the_batch_that_takes_it_and_gets_its_outcome() {
    let commit = Commit::new(EPOCH);
    // Pushed, then its batch is taken and handled: it waits until then, not before.
    let first = commit.push_new_task(&record(1, b"a"));
    let mut first = std::pin::pin!(first.handled());
    assert!(poll_once(first.as_mut()).is_pending());
    let batch = commit
        .take(false)
        .expect("a new task's record is taken at once");
    assert_eq!(decode(&batch.bytes), [(Kind::Task, 1, b"a".to_vec())]);
    // A record pushed after the take waits for the next batch.
    let second = commit.push_new_task(&record(2, b"b"));
    let mut second = std::pin::pin!(second.handled());
    commit.finish(batch.last_seq, Ok(()));
    assert!(matches!(
        poll_once(first.as_mut()),
        std::task::Poll::Ready(Ok(()))
    ));
    assert!(poll_once(second.as_mut()).is_pending());
    // Its batch fails: it gets the failure, and so does a record of a later batch.
    let batch = commit.take(false).unwrap();
    commit.finish(batch.last_seq, Err(Arc::new(JournalError::Poisoned)));
    assert!(matches!(
        poll_once(second.as_mut()),
        std::task::Poll::Ready(Err(_))
    ));
    let third = commit.push_new_task(&record(3, b"c"));
    let batch = commit.take(false).unwrap();
    commit.finish(batch.last_seq, Ok(()));
    assert!(third.handled().await.is_err(), "the journal stays failed");
}

/// Pushes the new tasks `seqs` from another thread, each once the flusher waits on its
/// thread (or after 10 s without it, so that a flusher that stopped waiting too soon fails
/// the test rather than hangs it).
fn push_while_waiting(
    commit: &Arc<Commit>,
    seqs: Vec<u64>,
) -> std::thread::JoinHandle<Vec<InBatch>> {
    let commit = Arc::clone(commit);
    std::thread::spawn(move || {
        seqs.into_iter()
            .map(|seq| {
                let give_up = Instant::now() + Duration::from_secs(10);
                while commit.pending().taker_waits_for.is_none() && Instant::now() < give_up {
                    std::thread::yield_now();
                }
                commit.push_new_task(&record(seq, b"new"))
            })
            .collect()
    })
}

#[test]
fn the_flusher_waiting_on_its_thread_takes_a_batch_once_everyone_it_waits_for_is_in() {
    const LONG: Duration = Duration::from_secs(600);
    let commit = Arc::new(Commit::new(EPOCH));
    // Nothing, or only an ack: nothing to take within the patience.
    assert!(
        commit
            .take_within(Duration::from_millis(5), 1, LONG)
            .is_none()
    );
    commit.push_ack(TaskId::new(1, 1));
    assert!(
        commit
            .take_within(Duration::from_millis(5), 1, LONG)
            .is_none()
    );
    // Waiting for two: the first record alone does not make the batch, the second does.
    let pusher = push_while_waiting(&commit, vec![2, 3]);
    let batch = commit
        .take_within(LONG, 2, LONG)
        .expect("woken by the second record");
    assert_eq!(
        decode(&batch.bytes),
        [
            (Kind::Ack, 1, Vec::new()),
            (Kind::Task, 2, b"new".to_vec()),
            (Kind::Task, 3, b"new".to_vec())
        ]
    );
    assert!(commit.pending().taker_waits_for.is_none());
    let in_batch = pusher.join().unwrap();
    commit.finish(batch.last_seq, Ok(()));
    for in_batch in in_batch {
        assert!(matches!(
            poll_once(std::pin::pin!(in_batch.handled())),
            std::task::Poll::Ready(Ok(()))
        ));
    }
    // Waiting for more than come: taken the gathering time after the first record.
    let pusher = push_while_waiting(&commit, vec![4]);
    let batch = commit
        .take_within(LONG, 100, Duration::from_millis(1))
        .expect("taken after the gathering time");
    assert_eq!(decode(&batch.bytes), [(Kind::Task, 4, b"new".to_vec())]);
    drop(pusher.join().unwrap());
    // A waiter for the buffer has it taken at once.
    let seq = commit.push_ack(TaskId::new(1, 4));
    let mut waiting = std::pin::pin!(commit.wait(seq));
    assert!(poll_once(waiting.as_mut()).is_pending());
    assert!(commit.take_within(LONG, 100, LONG).is_some());
}

#[test]
fn the_batch_handled_tells_how_many_task_records_wait_behind_it() {
    let commit = Commit::new(EPOCH);
    let _ = commit.push_new_task(&record(1, b"a"));
    let batch = commit.take(false).unwrap();
    let _ = commit.push_new_task(&record(2, b"b"));
    let _ = commit.push_new_task(&record(3, b"c"));
    commit.push_ack(TaskId::new(1, 1));
    assert_eq!(commit.finish(batch.last_seq, Ok(())), 2);
}

#[test]
fn a_batch_whose_writer_failed_fails_its_submits() {
    let commit = Commit::new(EPOCH);
    let in_batch = commit.push_new_task(&record(1, b"a"));
    let _taken = commit.take(false).unwrap();
    commit.fail_taken(Arc::new(JournalError::Poisoned));
    assert!(matches!(
        poll_once(std::pin::pin!(in_batch.handled())),
        std::task::Poll::Ready(Err(_))
    ));
    // Nothing taken: nothing to fail.
    commit.fail_taken(Arc::new(JournalError::Poisoned));
}

#[test]
fn a_written_batch_buffers_are_reused_for_a_later_batch() {
    let commit = Commit::new(EPOCH);
    let _ = commit.push_new_task(&record(1, b"first"));
    let first = commit.take(false).unwrap();
    let (ptr, capacity) = (first.bytes.as_ptr(), first.bytes.capacity());
    commit.recycle(first.bytes, first.placements);
    // The buffer the first push filled since is the next batch's; the recycled one fills next.
    let _ = commit.push_new_task(&record(2, b"second"));
    let second = commit.take(false).unwrap();
    assert_ne!(second.bytes.as_ptr(), ptr);
    let _ = commit.push_new_task(&record(3, b"third"));
    let third = commit.take(false).unwrap();
    assert_eq!(
        (third.bytes.as_ptr(), third.bytes.capacity()),
        (ptr, capacity)
    );
    assert_eq!(decode(&third.bytes), [(Kind::Task, 3, b"third".to_vec())]);
    // One pair is kept, and none too large.
    commit.recycle(Vec::with_capacity(SPARE_BYTES + 1), Vec::new());
    assert_eq!(commit.pending().spare.0.capacity(), 0);
}
