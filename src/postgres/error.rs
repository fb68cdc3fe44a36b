//! `PostgresError`: what failed, talking to PostgreSQL.

use std::fmt;
use std::time::Duration;

/// A PostgreSQL operation of the store failed: connecting, checking or migrating the schema,
/// taking a run number, a handoff, a claim, a renewal.
///
/// The message names the operation; the driver's error (the server's message, or the I/O
/// error) is the [`source`](std::error::Error::source): print the chain to see it.
#[derive(Debug)]
pub struct PostgresError {
    op: &'static str,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Driver(tokio_postgres::Error),
    TimedOut(Duration),
    Refused(String),
}

impl PostgresError {
    pub(super) fn driver(op: &'static str, error: tokio_postgres::Error) -> Self {
        Self {
            op,
            kind: Kind::Driver(error),
        }
    }

    pub(super) fn timed_out(op: &'static str, after: Duration) -> Self {
        Self {
            op,
            kind: Kind::TimedOut(after),
        }
    }

    /// The store refuses to go on: a setting or a schema it cannot work with.
    pub(crate) fn refused(op: &'static str, reason: impl Into<String>) -> Self {
        Self {
            op,
            kind: Kind::Refused(reason.into()),
        }
    }

    /// The operation that failed: "connect", "migrate", "hand off", "claim", …
    #[must_use]
    pub fn op(&self) -> &'static str {
        self.op
    }

    /// Whether it failed by taking longer than the store's
    /// [`timeout`](crate::PostgresStore::timeout).
    #[must_use]
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, Kind::TimedOut(_))
    }
}

impl fmt::Display for PostgresError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Driver(_) => write!(f, "PostgreSQL {} failed", self.op),
            Kind::TimedOut(after) => write!(f, "PostgreSQL {} timed out after {after:?}", self.op),
            Kind::Refused(reason) => write!(f, "PostgreSQL {}: {reason}", self.op),
        }
    }
}

impl std::error::Error for PostgresError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            Kind::Driver(error) => Some(error),
            _ => None,
        }
    }
}
