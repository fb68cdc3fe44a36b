//! A model test: random sequences of submits, acks, spills, retirements and restarts (clean,
//! keeping old segments, or a crash), checked against a model of which tasks are live.

use super::*;
use crate::test_rng::Xorshift as Gen;

/// One step of a pool's life, as the journal sees it.
#[derive(Debug, Clone)]
enum Op {
    /// A task is accepted (not yet journaled).
    Submit {
        payload: String,
        error: bool,
        interrupted: bool,
    },
    /// The task at this index (of all ids so far) finishes.
    Ack(usize),
    /// The accepted tasks are spilled.
    Spill,
    /// A live task is journaled again with a new state (an interrupted run).
    Respill(usize),
    /// The old segments are retired, if every task in them is done or journaled anew.
    Retire,
    /// The run ends and the journal is reopened.
    Restart(End),
}

#[derive(Debug, Clone, Copy)]
enum End {
    /// Every live task is spilled again and the journal closed.
    Clean,
    /// Accepted tasks are spilled, old segments kept, and the journal closed.
    Keep,
    /// The process dies: nothing more is written and tasks not spilled are lost.
    Crash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    /// Accepted, only in memory.
    Pending,
    /// Journaled in this run's segment.
    Current,
    /// Journaled only in segments of earlier runs.
    Old,
}

/// The model test's draws, on the tests' generator.
impl Gen {
    /// A payload of up to 24 characters, quotes, backslashes and a non-ASCII one included.
    fn payload(&mut self) -> String {
        const CHARS: [char; 11] = ['a', 'q', 'z', '0', '7', '9', ' ', '"', '\\', 'é', 'x'];
        (0..self.below(25))
            .map(|_| CHARS[self.below(CHARS.len() as u64) as usize])
            .collect()
    }

    /// One operation, weighted as a run's are: submits most, restarts least.
    fn op(&mut self) -> Op {
        match self.below(12) {
            0..=3 => Op::Submit {
                payload: self.payload(),
                error: self.coin(),
                interrupted: self.coin(),
            },
            4..=6 => Op::Ack(self.next() as usize),
            7 | 8 => Op::Spill,
            9 => Op::Respill(self.next() as usize),
            10 => Op::Retire,
            _ => Op::Restart(match self.below(3) {
                0 => End::Clean,
                1 => End::Keep,
                _ => End::Crash,
            }),
        }
    }
}

/// The model of a pool driving the journal: what it holds live, and where each task is.
struct Model {
    dir: PathBuf,
    journal: Option<Journal>,
    live: BTreeMap<TaskId, (Item, Where)>,
    /// Every id ever accepted, in order.
    ids: Vec<TaskId>,
    next_seq: u64,
    last_run: u64,
}

impl Model {
    fn start(dir: &Path) -> Self {
        let mut model = Self {
            dir: dir.to_path_buf(),
            journal: None,
            live: BTreeMap::new(),
            ids: Vec::new(),
            next_seq: 1,
            last_run: 0,
        };
        model.reopen();
        model
    }

    fn journal(&mut self) -> &mut Journal {
        self.journal.as_mut().unwrap()
    }

    /// Opens the journal and checks that recovery gives exactly the live tasks.
    fn reopen(&mut self) {
        let (journal, report, seen) = open(&self.dir);
        assert_clean(&report);
        assert!(journal.run() > self.last_run);
        assert!(self.ids.iter().all(|id| id.run() < journal.run()));
        self.last_run = journal.run();
        self.next_seq = 1;
        let expected: BTreeMap<_, _> = self
            .live
            .iter()
            .map(|(id, (item, _))| (*id, item.seen()))
            .collect();
        assert_eq!(live(&seen), expected);
        for (_, place) in self.live.values_mut() {
            *place = Where::Old;
        }
        self.journal = Some(journal);
    }

    /// Spills the live tasks `filter` picks, as one batch, and marks them journaled here.
    fn spill_where(&mut self, filter: impl Fn(Where) -> bool) {
        let batch: Vec<Item> = self
            .live
            .values()
            .filter(|(_, place)| filter(*place))
            .map(|(item, _)| item.clone())
            .collect();
        spill_all(self.journal(), &batch);
        for item in &batch {
            self.live.get_mut(&item.id).unwrap().1 = Where::Current;
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Submit {
                payload,
                error,
                interrupted,
            } => {
                let id = TaskId::new(self.last_run, self.next_seq);
                self.next_seq += 1;
                let mut item = Item::new(id, &payload);
                item.error = if error {
                    format!("failed: {payload}")
                } else {
                    String::new()
                };
                item.meta.interrupted = interrupted;
                self.ids.push(id);
                self.live.insert(id, (item, Where::Pending));
            }
            Op::Ack(index) => {
                if self.ids.is_empty() {
                    return;
                }
                let id = self.ids[index % self.ids.len()];
                match self.live.remove(&id) {
                    // Finished before it was ever journaled: nothing to write.
                    Some((_, Where::Pending)) => {}
                    // Live and journaled, or already finished (a repeated ack is harmless).
                    Some(_) | None => self.journal().append_ack(id).unwrap(),
                }
            }
            Op::Spill => self.spill_where(|place| place == Where::Pending),
            Op::Respill(index) => {
                let journaled: Vec<TaskId> = self
                    .live
                    .iter()
                    .filter(|(_, (_, place))| *place != Where::Pending)
                    .map(|(id, _)| *id)
                    .collect();
                if journaled.is_empty() {
                    return;
                }
                let id = journaled[index % journaled.len()];
                let (item, place) = self.live.get_mut(&id).unwrap();
                item.meta.interruptions += 1;
                item.meta.interrupted = true;
                *place = Where::Current;
                let item = item.clone();
                spill_all(self.journal(), &[item]);
            }
            Op::Retire => {
                if self.live.values().all(|(_, place)| *place != Where::Old) {
                    self.journal().retire_obsolete().unwrap();
                }
            }
            Op::Restart(end) => {
                match end {
                    End::Clean => {
                        self.spill_where(|place| place != Where::Current);
                        self.journal.take().unwrap().close().unwrap();
                    }
                    End::Keep => {
                        self.spill_where(|place| place == Where::Pending);
                        self.journal().keep_obsolete();
                        self.journal.take().unwrap().close().unwrap();
                    }
                    End::Crash => {
                        self.live.retain(|_, (_, place)| *place != Where::Pending);
                        drop(self.journal.take());
                    }
                }
                self.reopen();
            }
        }
    }
}

/// Whatever a run writes, across clean stops, kept segments and crashes, recovery gives back
/// exactly the live tasks, each in its last journaled state: 64 seeded sequences of 1 to 47
/// operations (a failure names its seed and prints the operations).
#[test]
fn recovery_gives_exactly_the_live_tasks() {
    for case in 0..64u64 {
        let seed = 0x006a_6f75_726e_616c ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut generator = Gen(seed | 1);
        let len = 1 + generator.below(47) as usize;
        let ops: Vec<Op> = (0..len).map(|_| generator.op()).collect();
        let tmp = tempfile::tempdir().unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut model = Model::start(tmp.path());
            for op in ops.clone() {
                model.apply(op);
            }
            model.apply(Op::Restart(End::Clean));
            model.journal.take().unwrap().close().unwrap();
        }));
        if let Err(panic) = result {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            panic!("case {case} (seed {seed:#x}), operations {ops:?}: {message}");
        }
    }
}
