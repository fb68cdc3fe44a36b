//! The crate-private decoders, reachable by the fuzz targets in `fuzz/` only.
//!
//! Compiled only under `--cfg fuzzing` (which `cargo fuzz` passes); a normal build has none of
//! this. Each function is a thin wrapper that turns the decoders' borrowed, crate-private types
//! into plain owned ones, so the targets can check the decoders' contracts from outside:
//! [`scan`] (a whole segment in, records, damage and torn tail out), [`decode_header`],
//! [`decode_record`], [`encode_record`] (to check that what decodes re-encodes), and
//! [`parse_run`] (the `LOCK` file's run counter).

#![allow(missing_docs, missing_debug_implementations)]

use std::borrow::Cow;
use std::fmt;

use super::format::{self, HeaderError, Kind, RecordRef};
use super::reader;
use super::record::{MAX_KEY_LEN, MAX_PRIORITY, TaskOptions, TaskRecord, TaskState};
use crate::task::TaskId;

/// The length of a segment header.
pub const HEADER_LEN: usize = format::HEADER_LEN;
/// Records start on multiples of this.
pub const ALIGN: usize = format::ALIGN;
/// The longest last-error text a record is written with.
pub const MAX_ERROR_LEN: usize = format::MAX_ERROR_LEN;
/// The largest record the format frames, header included.
pub const MAX_RECORD_LIMIT: usize = format::MAX_RECORD_LIMIT;
/// The length of a record header.
pub const RECORD_HEADER_LEN: usize = format::RECORD_HEADER_LEN;

/// A decoded segment header, or why it did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    Ok { epoch: u64, segment: u64 },
    Short,
    UnsupportedVersion(u16),
    Damaged { magic_ok: bool, epochs: [u64; 2] },
}

impl From<Result<format::Header, HeaderError>> for Header {
    fn from(header: Result<format::Header, HeaderError>) -> Self {
        match header {
            Ok(h) => Self::Ok {
                epoch: h.epoch,
                segment: h.segment,
            },
            Err(HeaderError::Short) => Self::Short,
            Err(HeaderError::UnsupportedVersion(v)) => Self::UnsupportedVersion(v),
            Err(HeaderError::Damaged { magic_ok, epochs }) => Self::Damaged { magic_ok, epochs },
        }
    }
}

/// A decoded record, owned. `kind` is the byte on disk: 1 task, 2 ack, 3 dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: u8,
    pub run: u64,
    pub seq: u64,
    pub interrupted: bool,
    pub attempts: u32,
    pub interruptions: u32,
    pub enqueued_ms: u64,
    pub not_before_ms: u64,
    pub error: Vec<u8>,
    pub payload: Vec<u8>,
    /// The options block, if the record has one.
    pub options: Option<Options>,
    /// What `RecordRef::encoded_len` says the record takes.
    pub encoded_len: usize,
}

/// A record's options block, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub priority: u8,
    pub max_attempts: u32,
    pub expires_ms: u64,
    pub key: String,
}

impl From<RecordRef<'_>> for Record {
    fn from(r: RecordRef<'_>) -> Self {
        Self {
            kind: r.kind as u8,
            run: r.id.run(),
            seq: r.id.seq(),
            interrupted: r.state.interrupted,
            attempts: r.state.attempts,
            interruptions: r.state.interruptions,
            enqueued_ms: r.state.enqueued_ms,
            not_before_ms: r.state.not_before_ms,
            error: r.error.to_vec(),
            payload: r.payload.to_vec(),
            options: r.options.map(|o| Options {
                priority: o.priority,
                max_attempts: o.max_attempts,
                expires_ms: o.expires_ms,
                key: o.key.to_owned(),
            }),
            encoded_len: r.encoded_len(),
        }
    }
}

/// Why the bytes at an offset are not a record; its `Display` is what `verify` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    Truncated,
    TooLong(u32),
    Malformed,
    Checksum,
    BadBody,
    TooManyCandidates,
}

impl From<format::RecordError> for RecordError {
    fn from(error: format::RecordError) -> Self {
        match error {
            format::RecordError::Truncated => Self::Truncated,
            format::RecordError::TooLong(len) => Self::TooLong(len),
            format::RecordError::Malformed => Self::Malformed,
            format::RecordError::Checksum => Self::Checksum,
            format::RecordError::BadBody => Self::BadBody,
            format::RecordError::TooManyCandidates => Self::TooManyCandidates,
        }
    }
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let error = match *self {
            Self::Truncated => format::RecordError::Truncated,
            Self::TooLong(len) => format::RecordError::TooLong(len),
            Self::Malformed => format::RecordError::Malformed,
            Self::Checksum => format::RecordError::Checksum,
            Self::BadBody => format::RecordError::BadBody,
            Self::TooManyCandidates => format::RecordError::TooManyCandidates,
        };
        error.fmt(f)
    }
}

/// The `Display` of a damaged or short header, as `verify` reports it.
pub fn header_error_message(header: Header) -> Option<String> {
    let error = match header {
        Header::Ok { .. } => return None,
        Header::Short => HeaderError::Short,
        Header::UnsupportedVersion(v) => HeaderError::UnsupportedVersion(v),
        Header::Damaged { magic_ok, epochs } => HeaderError::Damaged { magic_ok, epochs },
    };
    Some(error.to_string())
}

/// What `scan` found in a whole segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub header: Header,
    pub epoch: Option<u64>,
    /// The records handed to the callback, with their offsets, in the order handed out.
    pub records: Vec<(u64, Record)>,
    /// The count the scan itself kept.
    pub record_count: usize,
    /// Damage followed by a valid record: offset, bytes skipped, error.
    pub damage: Vec<(u64, u64, RecordError)>,
    /// Where the valid prefix ends when nothing valid follows, and why.
    pub torn_tail: Option<(u64, RecordError)>,
    pub is_damaged: bool,
}

/// Decodes a segment header from the start of `buf`.
pub fn decode_header(buf: &[u8]) -> Header {
    format::decode_header(buf).into()
}

/// Encodes a segment header.
pub fn encode_header(epoch: u64, segment: u64) -> [u8; HEADER_LEN] {
    format::encode_header(format::Header { epoch, segment })
}

/// Decodes the record at the start of `buf` under `epoch`: the record and its padded length.
pub fn decode_record(buf: &[u8], epoch: u64) -> Result<(Record, usize), RecordError> {
    format::decode_record(buf, epoch)
        .map(|(record, len)| (record.into(), len))
        .map_err(RecordError::from)
}

/// Appends `record` to `out` as the writer would, under `epoch`; `None` for a kind byte the
/// format does not know, an error text that is not UTF-8 (the writer takes a `&str`), or
/// options the pool never hands in (a priority above 7, a key over 1,024 bytes, all at their
/// defaults: the writer writes no block then).
/// Returns the encoded length.
pub fn encode_record(out: &mut Vec<u8>, epoch: u64, record: &Record) -> Option<usize> {
    let kind = match record.kind {
        1 => Kind::Task,
        2 => Kind::Ack,
        3 => Kind::Dead,
        _ => return None,
    };
    let last_error = std::str::from_utf8(&record.error).ok()?;
    let options = match &record.options {
        None => None,
        Some(o) => {
            let options = TaskOptions {
                priority: o.priority,
                max_attempts: o.max_attempts,
                expires_ms: o.expires_ms,
                key: (!o.key.is_empty()).then(|| o.key.as_str().into()),
            };
            if o.priority > MAX_PRIORITY || o.key.len() > MAX_KEY_LEN || options.is_default() {
                return None;
            }
            Some(options)
        }
    };
    let task = TaskRecord {
        id: TaskId::new(record.run, record.seq),
        state: TaskState {
            attempts: record.attempts,
            interruptions: record.interruptions,
            interrupted: record.interrupted,
            enqueued_ms: record.enqueued_ms,
            not_before_ms: record.not_before_ms,
        },
        last_error: Cow::Borrowed(last_error),
        payload: &record.payload,
        options: options.as_ref().map(Cow::Borrowed),
    };
    Some(format::encode_record(out, epoch, kind, &task))
}

/// Reads the whole segment `buf` as recovery and the read-only API do.
pub fn scan(buf: &[u8]) -> Scan {
    let mut records = Vec::new();
    let scan = reader::scan(buf, |offset, record| records.push((offset, record.into())));
    Scan {
        header: scan.header.into(),
        epoch: scan.epoch,
        records,
        record_count: scan.records,
        damage: scan
            .damage
            .iter()
            .map(|d| (d.offset, d.skipped, d.error.into()))
            .collect(),
        torn_tail: scan.torn_tail.map(|(at, e)| (at, e.into())),
        is_damaged: scan.is_damaged(),
    }
}

/// The run counter in a `LOCK` file's content, as a starting pool and `stats` read it.
pub fn parse_run(buf: &[u8]) -> Option<u64> {
    super::dir::parse_run(buf)
}
