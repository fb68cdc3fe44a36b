//! What happens to a task that fails or outlives the drain deadline.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::BoxError;
use crate::task::TaskId;

/// Wraps a handler's error to say retrying cannot help: the task goes to the dead letters at
/// once, whatever attempts it has left.
///
/// ```
/// # use drainpool::{BoxError, Permanent};
/// fn parse(raw: &str) -> Result<u32, BoxError> {
///     raw.parse::<u32>().map_err(|e| Permanent::new(e).into())
/// }
/// assert!(parse("x").unwrap_err().is::<Permanent>());
/// ```
///
/// It is found anywhere in the error's [`source`](std::error::Error::source) chain, so context
/// wrapped around it (`anyhow`'s `.context(..)`, say) keeps it permanent.
#[derive(Debug)]
pub struct Permanent(BoxError);

impl Permanent {
    /// Marks `error` as permanent.
    pub fn new(error: impl Into<BoxError>) -> Self {
        Self(error.into())
    }

    /// The wrapped error.
    #[must_use]
    pub fn into_inner(self) -> BoxError {
        self.0
    }

    /// Whether `error`, or any error in its source chain, is a `Permanent`.
    #[must_use]
    pub fn is_in(error: &(dyn std::error::Error + 'static)) -> bool {
        let mut next = Some(error);
        while let Some(error) = next {
            if error.is::<Self>() {
                return true;
            }
            next = error.source();
        }
        false
    }
}

impl fmt::Display for Permanent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("permanent failure")
    }
}

impl std::error::Error for Permanent {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// When a task reaches the disk. Made by [`Durability::on_shutdown`] (the default) or
/// [`Durability::write_ahead`].
///
/// | mode | a task is on disk | survives |
/// | --- | --- | --- |
/// | `on_shutdown()` | at shutdown (the spill) | SIGTERM, SIGINT, `shutdown()`, handler panics, a drain past its deadline |
/// | `write_ahead(SyncPolicy::Always)` | before `submit` returns, fsynced | all of the above, SIGKILL, OOM kill, power loss |
/// | `write_ahead(SyncPolicy::Interval(d))` | before `submit` returns, fsynced within `d` | all of the above but power loss, which can take the last `d` |
/// | `write_ahead(SyncPolicy::Never)` | before `submit` returns, in the kernel | all of the above but power loss, which can take what the OS had not written |
///
/// With the PostgreSQL store (`Builder::postgres`, the `postgres` feature), write-ahead means
/// committed to the store's table before `submit` returns, and only `SyncPolicy::Always` is
/// taken (the server's settings decide how durable a commit is); the other policies are
/// refused at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Durability(Mode);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Mode {
    #[default]
    OnShutdown,
    WriteAhead(SyncPolicy),
}

impl Durability {
    /// Tasks are journaled at shutdown: nothing is written while the service runs (but acks
    /// for replayed tasks). The default.
    #[must_use]
    pub const fn on_shutdown() -> Self {
        Self(Mode::OnShutdown)
    }

    /// Every task is journaled before `submit` returns, so a SIGKILL or an OOM kill loses
    /// nothing accepted; completions append acks (not synced: a lost ack means a repeat).
    /// `sync` says when the journal is fsynced.
    #[must_use]
    pub const fn write_ahead(sync: SyncPolicy) -> Self {
        Self(Mode::WriteAhead(sync))
    }

    /// The write-ahead sync policy, or `None` in the on-shutdown mode.
    #[must_use]
    pub const fn sync_policy(&self) -> Option<SyncPolicy> {
        match self.0 {
            Mode::OnShutdown => None,
            Mode::WriteAhead(sync) => Some(sync),
        }
    }

    /// Whether tasks are journaled before `submit` returns.
    #[must_use]
    pub const fn is_write_ahead(&self) -> bool {
        matches!(self.0, Mode::WriteAhead(_))
    }
}

/// When a write-ahead journal is fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncPolicy {
    /// `submit` returns after an fsync that covers its record. Concurrent submits share one
    /// fsync (group commit), so throughput grows with concurrency.
    Always,
    /// `submit` returns once the record is written; the journal is fsynced at this interval.
    Interval(Duration),
    /// `submit` returns once the record is written; the OS decides when it reaches the disk.
    Never,
}

/// What to do with a task still running when the drain deadline comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum DeadlineAction {
    /// Journal it as interrupted: it runs again on the next start, its attempt not counted,
    /// and the handler is told the last run was interrupted.
    #[default]
    Requeue,
    /// Forget it (for work that is worthless once late).
    Drop,
    /// Set it aside as a dead letter.
    DeadLetter,
}

/// What to do with a task whose time to live ran out before a run could start (see
/// [`TaskBuilder::time_to_live`](crate::TaskBuilder::time_to_live)). Either way it is not run,
/// and it is counted in [`Counts::expired`](crate::Counts::expired).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Expiry {
    /// Set it aside as a dead letter, its reason the expiry (also counted in `failed`).
    #[default]
    DeadLetter,
    /// Forget it (also counted in `dropped`).
    Drop,
}

/// A task stopped at the drain deadline, as the [`on_interrupt`](crate::Builder::on_interrupt)
/// hook sees it before its [`DeadlineAction`] is carried out.
pub struct Interruption<T> {
    pub(crate) id: TaskId,
    pub(crate) attempt: u32,
    pub(crate) interruptions: u32,
    pub(crate) action: DeadlineAction,
    pub(crate) payload: Arc<T>,
}

impl<T> Interruption<T> {
    /// The task's id.
    #[must_use]
    pub fn id(&self) -> TaskId {
        self.id
    }

    /// The attempt that was interrupted, counting from 1.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How many runs in a row have now been interrupted, this one included.
    #[must_use]
    pub fn interruptions(&self) -> u32 {
        self.interruptions
    }

    /// What is about to happen to the task.
    #[must_use]
    pub fn action(&self) -> DeadlineAction {
        self.action
    }

    /// The payload.
    #[must_use]
    pub fn payload(&self) -> &T {
        &self.payload
    }
}

impl<T: fmt::Debug> fmt::Debug for Interruption<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interruption")
            .field("id", &self.id)
            .field("attempt", &self.attempt)
            .field("interruptions", &self.interruptions)
            .field("action", &self.action)
            .field("payload", &self.payload)
            .finish()
    }
}

pub(crate) type DeadlineFn<T> = Arc<dyn Fn(&T) -> DeadlineAction + Send + Sync>;
pub(crate) type HookFn<T> =
    Arc<dyn Fn(Interruption<T>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The retry and deadline settings of a pool.
pub(crate) struct Policy<T> {
    pub(crate) max_attempts: u32,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_cap: Duration,
    pub(crate) max_interruptions: u32,
    pub(crate) on_expiry: Expiry,
    pub(crate) on_deadline: Option<DeadlineFn<T>>,
    pub(crate) on_interrupt: Option<HookFn<T>>,
}

impl<T> Clone for Policy<T> {
    fn clone(&self) -> Self {
        Self {
            max_attempts: self.max_attempts,
            backoff_base: self.backoff_base,
            backoff_cap: self.backoff_cap,
            max_interruptions: self.max_interruptions,
            on_expiry: self.on_expiry,
            on_deadline: self.on_deadline.clone(),
            on_interrupt: self.on_interrupt.clone(),
        }
    }
}

impl<T> fmt::Debug for Policy<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("max_attempts", &self.max_attempts)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_cap", &self.backoff_cap)
            .field("max_interruptions", &self.max_interruptions)
            .field("on_expiry", &self.on_expiry)
            .field("on_deadline", &self.on_deadline.is_some())
            .field("on_interrupt", &self.on_interrupt.is_some())
            .finish()
    }
}

/// The default number of attempts before a failing task becomes a dead letter.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// The default first retry delay; each further retry doubles it.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// The default longest retry delay.
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(300);
/// The default number of consecutive interrupted runs after which a task becomes a dead letter.
pub const DEFAULT_MAX_INTERRUPTIONS: u32 = 3;

impl<T> Default for Policy<T> {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_cap: DEFAULT_BACKOFF_CAP,
            max_interruptions: DEFAULT_MAX_INTERRUPTIONS,
            on_expiry: Expiry::DeadLetter,
            on_deadline: None,
            on_interrupt: None,
        }
    }
}

impl<T> Policy<T> {
    /// The delay before the retry that follows `failed` failed attempts: `base * 2^(failed-1)`,
    /// capped, with "equal jitter" (half fixed, half random) so retries of tasks that failed
    /// together spread out.
    pub(crate) fn backoff(&self, failed: u32, jitter: &Jitter) -> Duration {
        let doublings = failed.saturating_sub(1).min(63);
        let full = self
            .backoff_base
            .checked_mul(1u32.checked_shl(doublings.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.backoff_cap)
            .min(self.backoff_cap);
        let half = full / 2;
        half + half.mul_f64(jitter.next_unit())
    }

    pub(crate) fn deadline_action(&self, payload: &T) -> DeadlineAction {
        self.on_deadline
            .as_ref()
            .map_or(DeadlineAction::Requeue, |f| f(payload))
    }
}

/// A small lock-free xorshift generator for retry jitter.
#[derive(Debug)]
pub(crate) struct Jitter(AtomicU64);

impl Jitter {
    pub(crate) fn new(seed: u64) -> Self {
        Self(AtomicU64::new(seed | 1))
    }

    /// Seeded from the standard library's per-process random hasher keys.
    pub(crate) fn from_entropy() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        Self::new(hasher.finish())
    }

    /// A number in `[0, 1)`.
    pub(crate) fn next_unit(&self) -> f64 {
        let step = |mut x: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let previous = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some(step(x)));
        let value = step(previous.unwrap_or_else(|x| x));
        (value >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_equal_jitter() {
        let policy = Policy::<()> {
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(10),
            ..Policy::default()
        };
        let jitter = Jitter::new(42);
        for (failed, full) in [
            (1, 1),
            (2, 2),
            (3, 4),
            (4, 8),
            (5, 10),
            (40, 10),
            (u32::MAX, 10),
        ] {
            let full = Duration::from_secs(full);
            for _ in 0..100 {
                let delay = policy.backoff(failed, &jitter);
                assert!(
                    delay >= full / 2 && delay <= full,
                    "{failed}: {delay:?} vs {full:?}"
                );
            }
        }
    }

    #[test]
    fn jitter_spreads_over_the_unit_interval() {
        let jitter = Jitter::new(7);
        let values: Vec<f64> = (0..1000).map(|_| jitter.next_unit()).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        assert!(values.iter().any(|&v| v < 0.1) && values.iter().any(|&v| v > 0.9));
    }
}
