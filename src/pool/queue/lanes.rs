//! What the queue's lock guards: the backlog, the new tasks in one lane per priority level
//! (taken highest first, with the starvation bound of `AGING`), and the counts of waiting
//! workers and submitters; and what a take yields.

use std::collections::VecDeque;

use tokio::time::Instant;

use super::hand::Hand;
use super::lane::Lane;
use crate::journal::MAX_PRIORITY;
use crate::pool::job::{Job, Queued};
use crate::task::TaskId;

/// Priority levels: 0 (the default) to [`MAX_PRIORITY`].
const LEVELS: usize = MAX_PRIORITY as usize + 1;

/// While several priority levels hold new tasks, every `AGING`th take is the oldest of them
/// (the starvation bound).
pub(super) const AGING: u32 = 16;

/// What a take owes the submitters waiting for room.
pub(super) enum Room {
    /// Nothing: none waits, or room is owed already.
    Kept,
    /// A batch of slots is free: one is claimed, to be woken.
    Wake,
    /// Room freed below the batch: owed from now (the upkeep task is told).
    Owed,
}

/// A job taken from the queue: made whole only once the lock is let go (a new task's value
/// moves into its `Arc` then).
pub(super) enum Took<T> {
    Job(Job<T>),
    New(Queued<T>),
}

impl<T> Took<T> {
    pub(super) fn into_job(self) -> Job<T> {
        match self {
            Self::Job(job) => job,
            Self::New(task) => task.into_job(),
        }
    }
}

/// What the lock guards.
pub(super) struct Lanes<T> {
    pub(super) backlog: VecDeque<Job<T>>,
    /// New tasks, one lane per priority level, oldest first in each.
    pub(super) fresh: [Lane<T>; LEVELS],
    /// Bit `l` set: lane `l` holds tasks.
    pub(super) filled: u8,
    /// How many new tasks are queued, in every lane.
    pub(super) fresh_len: usize,
    /// Takes of new tasks while several lanes held some, for the starvation bound.
    pub(super) turn: u32,
    /// How many of them are held decoded.
    pub(super) decoded: usize,
    /// Slots reserved for new tasks not sent yet.
    pub(super) reserved: usize,
    /// Workers registered as idle and not woken yet.
    pub(super) idle: usize,
    /// Submitters registered as wanting room and not woken yet.
    pub(super) wanting_room: usize,
    /// Since when room freed below the batch waits for submitters that were not woken for it.
    pub(super) owed_since: Option<Instant>,
    /// Set when the shutdown took the queue: no slot is reserved from then on.
    pub(super) taken: bool,
}

impl<T> Lanes<T> {
    /// Lanes holding `backlog` (replayed tasks, in order) and no new task.
    pub(super) fn new(backlog: VecDeque<Job<T>>) -> Self {
        Self {
            backlog,
            fresh: Default::default(),
            filled: 0,
            fresh_len: 0,
            turn: 0,
            decoded: 0,
            reserved: 0,
            idle: 0,
            wanting_room: 0,
            owed_since: None,
            taken: false,
        }
    }

    /// New tasks queued or on their way.
    pub(super) fn used(&self) -> usize {
        self.fresh_len + self.reserved
    }

    /// Queues a new task in its priority's lane.
    pub(super) fn push_fresh(&mut self, task: Queued<T>) {
        let lane = usize::from(task.priority().min(MAX_PRIORITY));
        self.decoded += usize::from(task.is_decoded());
        self.fresh[lane].push(task);
        self.filled |= 1 << lane;
        self.fresh_len += 1;
    }

    /// Takes the next new task: the head of the highest lane, or, every [`AGING`]th take
    /// while several lanes hold tasks, the oldest head.
    pub(super) fn pop_fresh(&mut self) -> Option<Queued<T>> {
        if self.filled == 0 {
            return None;
        }
        let top = 7 - self.filled.leading_zeros() as usize;
        let lane = if self.filled.is_power_of_two() {
            top
        } else {
            self.turn = self.turn.wrapping_add(1);
            if self.turn.is_multiple_of(AGING) {
                self.oldest_lane().unwrap_or(top)
            } else {
                top
            }
        };
        let task = self.fresh[lane].pop()?;
        if self.fresh[lane].is_empty() {
            self.filled &= !(1 << lane);
        }
        self.fresh_len -= 1;
        self.decoded -= usize::from(task.is_decoded());
        Some(task)
    }

    /// The lane whose head is the oldest new task.
    fn oldest_lane(&self) -> Option<usize> {
        (0..LEVELS)
            .filter_map(|lane| Some((self.fresh[lane].front_id()?, lane)))
            .min_by_key(|&(id, _): &(TaskId, usize)| id)
            .map(|(_, lane)| lane)
    }

    /// Takes the next job: the backlog first, then the new tasks in order, `take` of them at
    /// once (the first returned, the others put in `hand`); and what the take owes the
    /// submitters waiting for room.
    pub(super) fn pop(
        &mut self,
        capacity: usize,
        batch: usize,
        take: usize,
        hand: &Hand<T>,
    ) -> Option<(Took<T>, Room)> {
        if let Some(job) = self.backlog.pop_front() {
            return Some((Took::Job(job), Room::Kept));
        }
        let task = self.pop_fresh()?;
        if take > 1 {
            hand.fill(std::iter::from_fn(|| self.pop_fresh()).take(take - 1));
        }
        let room = if self.wanting_room == 0 {
            Room::Kept
        } else if capacity.saturating_sub(self.used()) >= batch && self.claim_wanting_room() {
            // A batch is free: one submitter is woken (and passes the turn on).
            self.owed_since = None;
            Room::Wake
        } else if self.owed_since.is_none() {
            self.owed_since = Some(Instant::now());
            Room::Owed
        } else {
            Room::Kept
        };
        Some((Took::New(task), room))
    }

    /// Claims an idle worker to wake, if one waits.
    pub(super) fn claim_idle(&mut self) -> bool {
        let claimed = self.idle > 0;
        self.idle -= usize::from(claimed);
        claimed
    }

    /// Claims a submitter wanting room to wake, if one waits.
    pub(super) fn claim_wanting_room(&mut self) -> bool {
        let claimed = self.wanting_room > 0;
        self.wanting_room -= usize::from(claimed);
        claimed
    }
}
