//! [`LastState`]: the last state per task id, as recovery and inspection fold a journal.
//!
//! The ids of one run are handed out as a dense sequence, so each run keeps its states in a
//! vector indexed by the sequence number less a base: no hashing, and a walk of the runs in
//! number order yields the ids in order, with nothing to sort. The vector grows at either end
//! (a compaction copies old ids after newer ones) but only by about twice the ids held, so a
//! crafted file cannot make it allocate more than its own records ask for; an id further off,
//! or of a run beyond the first [`DENSE_RUNS`], goes to an ordered map instead, and the two
//! are merged when read. The map is searched for an id in a vector's range only when the
//! map has held ids of that run around it.

use std::collections::BTreeMap;
use std::iter::Peekable;

use crate::task::TaskId;

/// How many runs are kept as dense vectors; the ids of any further run go to the map.
const DENSE_RUNS: usize = 64;
/// How far past the end of its run's vector an id may be and still grow it, besides twice the
/// number of ids held.
const DENSE_SLACK: u64 = 1024;

/// One run's states, indexed by `seq - base`.
#[derive(Debug)]
struct Run<T> {
    run: u64,
    base: u64,
    states: Vec<Option<T>>,
    /// The lowest and highest sequence numbers of this run's ids the map has held: only an id
    /// between them may be in the map although the vector's range holds it (it was put there
    /// before the vector grew over it), and only for such an id is the map searched.
    in_map: Option<(u64, u64)>,
}

/// Where an id's state is kept.
enum Place {
    /// In run `.0`'s vector, at `.1`.
    Dense(usize, usize),
    /// In the map; of run `Some(i)` of the runs kept as vectors, or of none of them.
    Map(Option<usize>),
}

/// The last state of each task id seen, read back in id order.
#[derive(Debug)]
pub(in crate::journal) struct LastState<T> {
    /// By run number.
    runs: Vec<Run<T>>,
    /// The ids that fit no run's vector.
    sparse: BTreeMap<TaskId, T>,
    /// How many ids have a state.
    len: usize,
    /// Room to reserve in the first run's vector.
    capacity: usize,
}

impl<T> LastState<T> {
    /// Room for `capacity` ids in the first run seen, so that a large journal's vector is not
    /// moved again and again as it grows.
    pub(in crate::journal) fn with_capacity(capacity: usize) -> Self {
        Self {
            runs: Vec::new(),
            sparse: BTreeMap::new(),
            len: 0,
            capacity,
        }
    }

    /// Where `id` is kept; `grow`: its run's vector made or lengthened (at either end) to
    /// hold it if it can be, otherwise only where it is now.
    #[inline(always)]
    fn place(&mut self, id: TaskId, grow: bool) -> Place {
        let at = match self.runs.binary_search_by_key(&id.run(), |r| r.run) {
            Ok(at) => at,
            Err(at) => {
                if !grow || self.runs.len() >= DENSE_RUNS {
                    return Place::Map(None);
                }
                let capacity = std::mem::take(&mut self.capacity);
                self.runs.insert(
                    at,
                    Run {
                        run: id.run(),
                        base: id.seq(),
                        states: Vec::with_capacity(capacity),
                        in_map: None,
                    },
                );
                at
            }
        };
        let limit = (self.len as u64)
            .saturating_mul(2)
            .saturating_add(DENSE_SLACK);
        let run = &mut self.runs[at];
        let seq = id.seq();
        if seq < run.base {
            // Below the vector: it grows down by at least its length, so growing is amortized.
            let below = run.base - seq;
            let extra = below.max(run.states.len() as u64).min(run.base);
            let Ok(extra) = usize::try_from(extra) else {
                return Place::Map(Some(at));
            };
            if !grow || below > limit {
                return Place::Map(Some(at));
            }
            let mut states = Vec::with_capacity(extra + run.states.len());
            states.resize_with(extra, || None);
            states.append(&mut run.states);
            run.states = states;
            run.base -= extra as u64;
        }
        let offset = seq - run.base;
        let Ok(index) = usize::try_from(offset) else {
            return Place::Map(Some(at));
        };
        if index >= run.states.len() {
            if !grow || offset > limit {
                return Place::Map(Some(at));
            }
            if index == run.states.len() {
                run.states.push(None);
            } else {
                run.states.resize_with(index + 1, || None);
            }
        }
        Place::Dense(at, index)
    }

    /// Takes `id` out of the map if run `at` (or, for `None`, no run kept as a vector) may have
    /// it there.
    fn take_from_map(&mut self, id: TaskId, at: Option<usize>) {
        if let Some(run) = at.and_then(|at| self.runs.get(at)) {
            match run.in_map {
                Some((low, high)) if (low..=high).contains(&id.seq()) => {}
                _ => return,
            }
        }
        if self.sparse.remove(&id).is_some() {
            self.len -= 1;
        }
    }

    /// Sets the state of `id`.
    pub(super) fn set(&mut self, id: TaskId, state: T) {
        match self.place(id, true) {
            Place::Dense(at, index) => {
                let slot = self.runs.get_mut(at).and_then(|r| r.states.get_mut(index));
                if let Some(slot) = slot {
                    if slot.replace(state).is_none() {
                        self.len += 1;
                    }
                    // A vector grown over an id the map held takes it over.
                    self.take_from_map(id, Some(at));
                }
            }
            Place::Map(at) => {
                if self.sparse.insert(id, state).is_none() {
                    self.len += 1;
                    if let Some(run) = at.and_then(|at| self.runs.get_mut(at)) {
                        let seq = id.seq();
                        run.in_map = Some(match run.in_map {
                            Some((low, high)) => (low.min(seq), high.max(seq)),
                            None => (seq, seq),
                        });
                    }
                }
            }
        }
    }

    /// Ends the state of `id`, if it has one.
    pub(super) fn end(&mut self, id: TaskId) {
        let at = match self.place(id, false) {
            Place::Dense(at, index) => {
                let slot = self.runs.get_mut(at).and_then(|r| r.states.get_mut(index));
                if slot.and_then(Option::take).is_some() {
                    self.len -= 1;
                }
                Some(at)
            }
            Place::Map(at) => at,
        };
        self.take_from_map(id, at);
    }

    /// How many ids have a state.
    pub(in crate::journal) fn len(&self) -> usize {
        self.len
    }

    /// The ids with a state and their states, in id order.
    pub(in crate::journal) fn iter(&self) -> impl Iterator<Item = (TaskId, &T)> {
        let dense = self.runs.iter().flat_map(|run| {
            let (number, base) = (run.run, run.base);
            run.states.iter().enumerate().filter_map(move |(i, state)| {
                let state = state.as_ref()?;
                Some((TaskId::new(number, base + i as u64), state))
            })
        });
        Merge {
            a: dense.peekable(),
            b: self
                .sparse
                .iter()
                .map(|(id, state)| (*id, state))
                .peekable(),
        }
    }

    /// The ids with a state and their states, in id order.
    pub(in crate::journal) fn into_sorted(self) -> Vec<(TaskId, T)> {
        let dense = self.runs.into_iter().flat_map(|run| {
            let (number, base) = (run.run, run.base);
            run.states
                .into_iter()
                .enumerate()
                .filter_map(move |(i, state)| Some((TaskId::new(number, base + i as u64), state?)))
        });
        Merge {
            a: dense.peekable(),
            b: self.sparse.into_iter().peekable(),
        }
        .collect()
    }
}

/// Two iterators of distinct ids, each in id order, merged in id order.
struct Merge<A: Iterator, B: Iterator> {
    a: Peekable<A>,
    b: Peekable<B>,
}

impl<S, A, B> Iterator for Merge<A, B>
where
    A: Iterator<Item = (TaskId, S)>,
    B: Iterator<Item = (TaskId, S)>,
{
    type Item = (TaskId, S);

    fn next(&mut self) -> Option<Self::Item> {
        match (self.a.peek(), self.b.peek()) {
            (Some((a, _)), Some((b, _))) if b < a => self.b.next(),
            (Some(_), _) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(run: u64, seq: u64) -> TaskId {
        TaskId::new(run, seq)
    }

    /// A plain model: the last state per id, by an ordered map.
    fn model(ops: &[(TaskId, Option<u32>)]) -> Vec<(TaskId, u32)> {
        let mut map = BTreeMap::new();
        for &(id, op) in ops {
            match op {
                Some(v) => map.insert(id, v),
                None => map.remove(&id),
            };
        }
        map.into_iter().collect()
    }

    fn fold(ops: &[(TaskId, Option<u32>)]) -> LastState<u32> {
        let mut state = LastState::with_capacity(4);
        for &(id, op) in ops {
            match op {
                Some(v) => state.set(id, v),
                None => state.end(id),
            }
        }
        state
    }

    fn check(ops: &[(TaskId, Option<u32>)]) {
        let want = model(ops);
        let state = fold(ops);
        assert_eq!(state.len(), want.len());
        let borrowed: Vec<_> = state.iter().map(|(id, v)| (id, *v)).collect();
        assert_eq!(borrowed, want);
        assert_eq!(state.into_sorted(), want);
    }

    #[test]
    fn dense_runs_keep_the_last_state_in_id_order() {
        check(&[
            (id(2, 1), Some(1)),
            (id(2, 2), Some(2)),
            (id(1, 5), Some(3)),
            (id(2, 1), Some(4)),
            (id(1, 5), None),
            (id(2, 3), Some(5)),
            (id(1, 6), Some(6)),
        ]);
    }

    #[test]
    fn ids_off_their_runs_vector_go_to_the_map_and_merge_in_order() {
        let ops = [
            (id(3, 100), Some(1)),
            // Below the run's first sequence number.
            (id(3, 7), Some(2)),
            // Far past its end.
            (id(3, 1_000_000), Some(3)),
            (id(3, 101), Some(4)),
            (id(3, 7), None),
            (id(3, 1_000_000), Some(5)),
            (id(1, u64::MAX), Some(6)),
        ];
        check(&ops);
        let state = fold(&ops);
        assert!(state.runs.iter().all(|r| r.states.len() < 2_000));
    }

    #[test]
    fn a_vector_grown_over_an_id_the_map_holds_takes_it_over() {
        let mut ops = vec![(id(1, 0), Some(0)), (id(1, 2_000), Some(1))];
        // Enough dense ids that the vector grows past 2,000.
        ops.extend((1..1_500).map(|s| (id(1, s), Some(2))));
        ops.push((id(1, 2_000), Some(3)));
        ops.extend((1_500..2_100).map(|s| (id(1, s), Some(4))));
        check(&ops);
        let mut ended = ops.clone();
        ended.push((id(1, 2_000), None));
        check(&ended);
    }

    #[test]
    fn runs_past_the_dense_limit_still_count() {
        let ops: Vec<_> = (0..(DENSE_RUNS as u64 + 10))
            .flat_map(|run| {
                [
                    (id(run, 1), Some(1)),
                    (id(run, 2), Some(2)),
                    (id(run, 1), None),
                ]
            })
            .collect();
        check(&ops);
    }

    #[test]
    fn random_folds_agree_with_the_model() {
        // Seeded: the same cases every run.
        let mut rng = crate::test_rng::Xorshift(0x9E37_79B9_7F4A_7C15);
        let mut next = move || rng.next();
        for _ in 0..200 {
            let ops: Vec<_> = (0..400)
                .map(|_| {
                    let r = next();
                    let run = r % 3;
                    // Mostly near the start of a run, now and then far off, past its end or
                    // below it.
                    let seq = match (r >> 8) % 16 {
                        0 => (r >> 16) % 1_000_000,
                        1 => (r >> 16) % 4,
                        // Past the vector's end, into the map, and later grown over.
                        2 | 3 => 100 + (r >> 16) % 3_000,
                        _ => 100 + (r >> 16) % 300,
                    };
                    let op = ((r >> 40) % 3 != 0).then_some((r >> 48) as u32);
                    (id(run, seq), op)
                })
                .collect();
            check(&ops);
        }
    }

    #[test]
    fn ending_an_unknown_id_changes_nothing() {
        check(&[(id(1, 1), None), (id(1, 2), Some(1)), (id(9, 9), None)]);
    }
}
