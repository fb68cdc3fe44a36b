//! How payloads become the bytes the journal keeps: the one place a payload is encoded or
//! decoded.
//!
//! A [`Codec`] is chosen once per pool ([`Builder::codec`](crate::Builder::codec)); JSON
//! ([`Json`], through serde_json) is the default. The pool calls it three ways, all here:
//! counting a payload's encoded size against the record limit at `submit` (`Json` bounds it
//! without reading the strings, and counts exactly without encoding only when the bound is over
//! the limit, `json_len.rs`; otherwise into a sink that stops at the limit, so a huge
//! payload is not encoded whole only to be refused), encoding
//! into a buffer (write-ahead submits, spills, dead letters), and decoding at start.

use std::io;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::BoxError;

mod json_len;

/// Turns payloads into bytes and back.
///
/// The journal stores whatever bytes `encode` writes and hands them to `decode` at the next
/// start. A payload that no longer decodes (its type changed incompatibly, say) becomes a dead
/// letter with the decode error, so a codec should fail rather than guess.
///
/// ```
/// use drainpool::{BoxError, Codec};
///
/// /// Payloads that are bytes already, stored as they are.
/// struct Raw;
///
/// impl Codec<Vec<u8>> for Raw {
///     fn encode<W: std::io::Write>(&self, value: &Vec<u8>, mut out: W) -> Result<(), BoxError> {
///         Ok(out.write_all(value)?)
///     }
///
///     fn decode(&self, bytes: &[u8]) -> Result<Vec<u8>, BoxError> {
///         Ok(bytes.to_vec())
///     }
/// }
/// ```
pub trait Codec<T>: Send + Sync + 'static {
    /// Writes `value`'s encoding to `out`. An error from `out` must be returned (the pool's
    /// size check stops a payload over the limit that way).
    ///
    /// # Errors
    ///
    /// The value cannot be encoded, or `out` failed.
    fn encode<W: io::Write>(&self, value: &T, out: W) -> Result<(), BoxError>;

    /// The exact length of what `encode` would write for `value`, if the codec can tell it
    /// more cheaply than by encoding; `None` (the default) to let the pool count `encode`'s
    /// output instead. `submit` asks for it to check the record limit: the payload itself is
    /// encoded only when it is journaled. A length shorter than the encoding is a bug (a
    /// spill could then meet a record over the limit); where unsure, return `None`.
    fn encoded_len(&self, value: &T) -> Option<usize> {
        let _ = value;
        None
    }

    /// At least the length of what `encode` would write for `value`, if the codec can tell it
    /// more cheaply still than [`encoded_len`](Self::encoded_len); the default is
    /// `encoded_len`. `submit` accepts a payload whose bound is within the record limit without
    /// counting it exactly (and counts exactly only when it is not), and sets the bound aside
    /// in the spill reserve while the task is held decoded. A bound shorter than the encoding
    /// is a bug, as for `encoded_len`.
    fn encoded_len_bound(&self, value: &T) -> Option<usize> {
        self.encoded_len(value)
    }

    /// Reads a value back from what `encode` wrote.
    ///
    /// # Errors
    ///
    /// The bytes are not a valid encoding of a `T`.
    fn decode(&self, bytes: &[u8]) -> Result<T, BoxError>;
}

/// JSON through serde_json: the default codec.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<T: Serialize + DeserializeOwned> Codec<T> for Json {
    fn encode<W: io::Write>(&self, value: &T, out: W) -> Result<(), BoxError> {
        Ok(serde_json::to_writer(out, value)?)
    }

    /// Counted without encoding for strings, integers and the shapes around them (see
    /// `json_len.rs`); `None` for floats and non-string map keys.
    fn encoded_len(&self, value: &T) -> Option<usize> {
        json_len::json_len(value)
    }

    /// Like `encoded_len`, without reading short strings (up to 32 bytes, each counted as six
    /// bytes a byte, the longest escape being `\u00XX`, plus its quotes) and with integers
    /// counted at their type's widest.
    fn encoded_len_bound(&self, value: &T) -> Option<usize> {
        json_len::json_len_bound(value)
    }

    fn decode(&self, bytes: &[u8]) -> Result<T, BoxError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// Why a payload was refused by the size check.
pub(crate) enum Refused {
    /// Its encoding is longer than the limit.
    TooLarge,
    /// The codec failed.
    Failed(BoxError),
}

/// A pool's codec, behind one pointer: its methods are monomorphized for the user's codec, so
/// a call costs one indirect jump, not one per write.
pub(crate) struct Encoding<T>(Arc<dyn Erased<T>>);

impl<T> Clone for Encoding<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T> std::fmt::Debug for Encoding<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Encoding")
    }
}

impl<T: 'static> Encoding<T> {
    pub(crate) fn new(codec: impl Codec<T>) -> Self {
        Self(Arc::new(codec))
    }

    /// The length of `value`'s encoding, or a bound on it (see [`Codec::encoded_len_bound`]),
    /// if that is at most `limit`; `TooLarge` only if the exact length is over the limit.
    pub(crate) fn len_within(&self, value: &T, limit: usize) -> Result<usize, Refused> {
        self.0.len_within(value, limit)
    }

    /// `value`'s encoding in a buffer of exactly its length, `size` being what it is expected
    /// to take at most. Encoded into this thread's scratch buffer first: the size `submit`
    /// takes may be a bound, and a buffer of that size would have to shrink later (a
    /// reallocation per task held encoded).
    pub(crate) fn to_bytes(&self, value: &T, size: usize) -> Result<Vec<u8>, BoxError> {
        /// A scratch buffer that grew past this is not kept for the next task.
        const KEEP: usize = 64 * 1024;
        thread_local! {
            static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
        }
        // Taken out, not borrowed: a codec that encodes again on this thread gets an empty one.
        let mut scratch = SCRATCH.take();
        scratch.clear();
        scratch.reserve(size);
        let result = self.0.encode(value, &mut scratch);
        let bytes = result.map(|()| scratch.as_slice().to_vec());
        if scratch.capacity() <= KEEP {
            SCRATCH.set(scratch);
        }
        bytes
    }

    /// Appends `value`'s encoding to `out`; on an error `out` is left as it was.
    pub(crate) fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), BoxError> {
        let start = out.len();
        let result = self.0.encode(value, out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    pub(crate) fn decode(&self, bytes: &[u8]) -> Result<T, BoxError> {
        self.0.decode(bytes)
    }
}

trait Erased<T>: Send + Sync {
    fn len_within(&self, value: &T, limit: usize) -> Result<usize, Refused>;
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), BoxError>;
    fn decode(&self, bytes: &[u8]) -> Result<T, BoxError>;
}

impl<T, C: Codec<T>> Erased<T> for C {
    fn len_within(&self, value: &T, limit: usize) -> Result<usize, Refused> {
        if let Some(bound) = Codec::encoded_len_bound(self, value)
            && bound <= limit
        {
            return Ok(bound);
        }
        if let Some(len) = Codec::encoded_len(self, value) {
            return if len <= limit {
                Ok(len)
            } else {
                Err(Refused::TooLarge)
            };
        }
        let mut sink = SizeSink { len: 0, limit };
        match Codec::encode(self, value, &mut sink) {
            Ok(()) => Ok(sink.len),
            Err(_) if sink.len > limit => Err(Refused::TooLarge),
            Err(error) => Err(Refused::Failed(error)),
        }
    }

    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), BoxError> {
        Codec::encode(self, value, out)
    }

    fn decode(&self, bytes: &[u8]) -> Result<T, BoxError> {
        Codec::decode(self, bytes)
    }
}

/// Counts encoded bytes, failing once past the limit.
struct SizeSink {
    len: usize,
    limit: usize,
}

impl io::Write for SizeSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.len += buf.len();
        if self.len > self.limit {
            return Err(io::Error::other("record too large"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_check_stops_at_the_limit_and_tells_a_failure_from_a_large_payload() {
        let json = Encoding::<Vec<u32>>::new(Json);
        let value = vec![7u32; 100];
        let mut bytes = Vec::new();
        json.encode(&value, &mut bytes).unwrap();
        assert!(matches!(json.len_within(&value, bytes.len()), Ok(n) if n == bytes.len()));
        assert!(matches!(
            json.len_within(&value, bytes.len() - 1),
            Err(Refused::TooLarge)
        ));
        assert_eq!(json.decode(&bytes).unwrap(), value);

        // A map with non-string keys does not encode as JSON: a failure, not a size.
        let odd = Encoding::<std::collections::HashMap<(u8, u8), u8>>::new(Json);
        let value = [((1, 2), 3)].into_iter().collect();
        assert!(matches!(
            odd.len_within(&value, 1 << 20),
            Err(Refused::Failed(_))
        ));
        let mut out = b"kept".to_vec();
        assert!(odd.encode(&value, &mut out).is_err());
        assert_eq!(out, b"kept", "a failed encode leaves the buffer as it was");
        assert!(odd.to_bytes(&value, 100).is_err());
    }

    #[test]
    fn to_bytes_gives_a_buffer_of_exactly_the_encoding_whatever_the_size_expected() {
        let json = Encoding::<Vec<String>>::new(Json);
        for value in [vec![], vec!["a".repeat(10)], vec!["b".repeat(100_000)]] {
            let expected = serde_json::to_vec(&value).unwrap();
            for size in [0, expected.len(), expected.len() * 6] {
                let bytes = json.to_bytes(&value, size).unwrap();
                assert_eq!(bytes, expected);
                assert_eq!(bytes.capacity(), bytes.len());
            }
        }
    }
}
