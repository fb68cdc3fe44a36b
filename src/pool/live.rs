//! Write-ahead bookkeeping: which segment holds the latest record of each unfinished task, and
//! how much live data each segment still holds.
//!
//! A segment can be deleted once it holds no live task (and no older segment is left: see
//! `delete_empty_segments` in the pool). When the old segments hold little live data, the pool
//! compacts them: it writes their live tasks again at the end of the journal, and the
//! [`moved`](LiveIndex::placed) records make the old segments empty.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use crate::journal::Placement;
use crate::task::TaskId;

/// What a segment still holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Live tasks whose latest record is in the segment.
    pub(crate) tasks: u64,
    /// Those records' bytes.
    pub(crate) bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    segment: u64,
    len: u32,
    /// Newer records of the task on their way to the journal.
    moving: u32,
}

/// A multiply-rotate hash of the id's two numbers: ids are made by the pool (or read back
/// from its own journal), not chosen by a caller, so no keyed hash is needed, and every submit
/// and every ack pays for one.
#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Where every unfinished, journaled task is.
#[derive(Debug, Default)]
pub(crate) struct LiveIndex {
    tasks: HashMap<TaskId, Entry, BuildHasherDefault<IdHasher>>,
    segments: BTreeMap<u64, Usage>,
    /// The newest segment a batch was placed in: the one being written.
    newest: u64,
}

impl LiveIndex {
    /// A task read back from the journal at start, whose latest record is in `segment`.
    pub(crate) fn recovered(&mut self, id: TaskId, segment: u64, len: u32) {
        // An earlier run's segment is full: this run writes newer ones.
        self.newest = self.newest.max(segment.saturating_add(1));
        self.tasks.insert(
            id,
            Entry {
                segment,
                len,
                moving: 0,
            },
        );
        self.add(segment, len);
    }

    /// A batch of records reached `segment`. A new task enters the index; a moved one leaves
    /// its old segment, unless it finished meanwhile.
    pub(crate) fn placed(&mut self, segment: u64, placements: &[Placement]) {
        self.newest = self.newest.max(segment);
        // Counted once for the batch: every record of it is in `segment`.
        let mut added = Usage::default();
        self.tasks.reserve(placements.len());
        for placement in placements {
            if placement.moved {
                let Some(entry) = self.tasks.get_mut(&placement.id) else {
                    continue;
                };
                let old = *entry;
                entry.segment = segment;
                entry.len = placement.len;
                entry.moving = entry.moving.saturating_sub(1);
                self.remove(old.segment, old.len);
            } else {
                self.tasks.insert(
                    placement.id,
                    Entry {
                        segment,
                        len: placement.len,
                        moving: 0,
                    },
                );
            }
            added.tasks += 1;
            added.bytes += u64::from(placement.len);
        }
        if added.tasks > 0 {
            let usage = self.segments.entry(segment).or_default();
            usage.tasks += added.tasks;
            usage.bytes += added.bytes;
        }
    }

    /// A newer record of `id` is about to be written. Returns false if the task is not in the
    /// index (finished, or never journaled).
    pub(crate) fn begin_move(&mut self, id: TaskId) -> bool {
        match self.tasks.get_mut(&id) {
            Some(entry) => {
                entry.moving = entry.moving.saturating_add(1);
                true
            }
            None => false,
        }
    }

    /// Whether the latest record of `id` is the one in `segment`, with no newer one on its
    /// way: only then may a compaction copy it.
    pub(crate) fn settled_in(&self, id: TaskId, segment: u64) -> bool {
        self.tasks
            .get(&id)
            .is_some_and(|entry| entry.segment == segment && entry.moving == 0)
    }

    /// The task finished. Returns true if that left a full segment (one older than the
    /// segment being written) without live tasks: it may be deleted now.
    pub(crate) fn finish(&mut self, id: TaskId) -> bool {
        let Some(entry) = self.tasks.remove(&id) else {
            return false;
        };
        self.remove(entry.segment, entry.len);
        entry.segment < self.newest && !self.segments.contains_key(&entry.segment)
    }

    /// What `segment` still holds.
    pub(crate) fn usage(&self, segment: u64) -> Usage {
        self.segments.get(&segment).copied().unwrap_or_default()
    }

    fn add(&mut self, segment: u64, len: u32) {
        let usage = self.segments.entry(segment).or_default();
        usage.tasks += 1;
        usage.bytes += u64::from(len);
    }

    fn remove(&mut self, segment: u64, len: u32) {
        if let Some(usage) = self.segments.get_mut(&segment) {
            usage.tasks = usage.tasks.saturating_sub(1);
            usage.bytes = usage.bytes.saturating_sub(u64::from(len));
            if usage.tasks == 0 {
                self.segments.remove(&segment);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64) -> TaskId {
        TaskId::new(1, seq)
    }

    fn fresh(seq: u64, len: u32) -> Placement {
        Placement {
            id: id(seq),
            len,
            moved: false,
        }
    }

    fn moved(seq: u64, len: u32) -> Placement {
        Placement {
            moved: true,
            ..fresh(seq, len)
        }
    }

    fn usage(tasks: u64, bytes: u64) -> Usage {
        Usage { tasks, bytes }
    }

    #[test]
    fn a_full_segment_empties_when_its_last_task_finishes() {
        let mut live = LiveIndex::default();
        live.placed(1, &[fresh(1, 40), fresh(2, 48), fresh(3, 40)]);
        assert_eq!(live.usage(1), usage(3, 128));
        assert!(!live.finish(id(1)));
        live.placed(2, &[fresh(4, 40)]);
        assert!(!live.finish(id(2)));
        assert!(live.finish(id(3)), "segment 1 is full and empty");
        assert_eq!(live.usage(1), Usage::default());
        assert!(!live.finish(id(3)), "a second finish changes nothing");
        assert!(
            !live.finish(id(4)),
            "the segment being written is not deletable"
        );
        assert_eq!(live.usage(2), Usage::default());
    }

    #[test]
    fn a_moved_task_leaves_its_old_segment_when_the_new_record_is_placed() {
        let mut live = LiveIndex::default();
        live.placed(1, &[fresh(1, 40), fresh(2, 40)]);
        assert!(live.begin_move(id(1)));
        assert!(!live.settled_in(id(1), 1), "a copy is on its way");
        assert!(live.settled_in(id(2), 1));
        live.placed(3, &[moved(1, 56)]);
        assert_eq!(live.usage(1), usage(1, 40));
        assert_eq!(live.usage(3), usage(1, 56));
        assert!(live.settled_in(id(1), 3));
        assert!(live.finish(id(2)), "segment 1 held one more task");
        assert!(!live.finish(id(1)), "segment 3 is being written");
        assert_eq!(live.usage(3), Usage::default());
    }

    #[test]
    fn a_task_finished_while_its_copy_was_on_its_way_stays_finished() {
        let mut live = LiveIndex::default();
        live.placed(1, &[fresh(1, 40)]);
        assert!(live.begin_move(id(1)));
        live.finish(id(1));
        live.placed(2, &[moved(1, 40)]);
        assert_eq!(live.usage(2), Usage::default(), "the copy pins nothing");
        assert!(!live.begin_move(id(1)));
    }

    #[test]
    fn recovered_tasks_count_in_their_segments() {
        let mut live = LiveIndex::default();
        live.recovered(id(7), 4, 64);
        live.recovered(id(8), 5, 64);
        assert_eq!(live.usage(4), usage(1, 64));
        assert!(live.settled_in(id(8), 5));
        assert!(live.finish(id(7)), "an earlier run's segment is full");
        assert!(
            live.finish(id(8)),
            "even the last one, before this run writes"
        );
    }
}
