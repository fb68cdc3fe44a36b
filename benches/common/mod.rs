//! The payload every bench uses, so that their figures describe the same tasks.

use serde::{Deserialize, Serialize};

/// A task payload: an e-mail to send, about 100 bytes of JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Email {
    pub(crate) id: u64,
    pub(crate) to: String,
    pub(crate) subject: String,
    pub(crate) body: String,
}

/// The `i`th payload. Fixed-width numbers keep every payload the same size.
pub(crate) fn email(i: u64) -> Email {
    let n = i % 10_000_000;
    Email {
        id: i,
        to: format!("user{n:07}@example.com"),
        subject: format!("Order {n:07} shipped"),
        body: "Leaves today.".to_owned(),
    }
}
