//! PostgreSQL (the `postgres` feature): the cluster-wide [`Lease`].

mod lease;

pub use lease::{Lease, LeaseBuilder, LeaseError};

/// A schema name as an SQL identifier, quoted (so any name is safe in the statements).
fn quoted(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}
