//! The on-disk format of a journal segment, version 2 (version 1 is read too: it is version 2
//! without the options block, which it never flags).
//!
//! All integers are little-endian. A segment is a header followed by records; every record starts
//! on an 8-byte boundary.
//!
//! # Segment header (48 bytes)
//!
//! | offset | size | field                                                              |
//! |-------:|-----:|--------------------------------------------------------------------|
//! |      0 |    8 | magic, `DRAINPOL`                                                  |
//! |      8 |    2 | format version, `2` (`1` read too)                                 |
//! |     10 |    2 | header length, `48`                                                |
//! |     12 |    4 | reserved, zero                                                     |
//! |     16 |    8 | writer epoch: random, chosen at each start                         |
//! |     24 |    8 | writer epoch again, so a damaged header still yields its epoch     |
//! |     32 |    8 | segment number                                                     |
//! |     40 |    4 | CRC-32C of bytes 0..40                                             |
//! |     44 |    4 | reserved, zero                                                     |
//!
//! # Record (32-byte header, then the body, zero-padded to a multiple of 8)
//!
//! | offset | size | field                                                              |
//! |-------:|-----:|--------------------------------------------------------------------|
//! |      0 |    4 | CRC-32C, seeded with the writer epoch, of bytes 4 to the padded end|
//! |      4 |    4 | body length `L`                                                    |
//! |      8 |    1 | kind: 1 task, 2 ack, 3 dead letter                                 |
//! |      9 |    1 | flags: bit 0, the last run was interrupted at the drain deadline;  |
//! |        |      | bit 1, the body holds an options block                             |
//! |     10 |    6 | reserved, zero                                                     |
//! |     16 |    8 | task id: run number                                                |
//! |     24 |    8 | task id: sequence within the run                                   |
//! |     32 |  `L`| body                                                               |
//!
//! Seeding the CRC with the epoch means bytes left by an earlier writer (a recycled block, a
//! stale page after a crash) never validate as records of this segment. The CRC covers the
//! length, so a damaged length is caught like any other damaged byte.
//!
//! # Body of a task or dead-letter record (an ack has an empty body)
//!
//! | offset | size | field                                                              |
//! |-------:|-----:|--------------------------------------------------------------------|
//! |      0 |    4 | attempts: failed runs so far (an interrupted run does not count)   |
//! |      4 |    4 | interruptions: consecutive runs interrupted at the drain deadline  |
//! |      8 |    8 | enqueue time, milliseconds since the Unix epoch                    |
//! |     16 |    8 | not before, milliseconds since the Unix epoch (0: at once)         |
//! |     24 |    4 | error length `E`                                                   |
//! |     28 |  `E`| last error, UTF-8                                                  |
//! | 28+`E` |16+`K`| options block, only with flag bit 1 (below)                        |
//! |   then | rest | payload: opaque bytes, as the pool encoded them                   |
//!
//! # Options block (flag bit 1)
//!
//! | offset | size | field                                                              |
//! |-------:|-----:|--------------------------------------------------------------------|
//! |      0 |    1 | priority, 0 to 7                                                   |
//! |      1 |    1 | reserved, zero                                                     |
//! |      2 |    2 | unique key length `K` (at most 1024; 0: no key)                    |
//! |      4 |    4 | retry limit: failed runs allowed (0: the pool's)                   |
//! |      8 |    8 | expiry, milliseconds since the Unix epoch (0: never)               |
//! |     16 |  `K`| unique key, UTF-8                                                  |
//!
//! Every decode path here is total: short input, bad magic, a newer version, a length over the
//! cap or past the end, a CRC mismatch and a malformed body are typed outcomes, never a panic
//! and never an allocation sized by untrusted bytes.

use std::fmt;

use std::borrow::Cow;
use std::cell::Cell;

use super::record::{MAX_KEY_LEN, MAX_PRIORITY, TaskOptions, TaskRecord, TaskState};
use crate::task::TaskId;

/// The magic bytes that open every segment.
pub(crate) const MAGIC: [u8; 8] = *b"DRAINPOL";
/// The format version this build writes and the newest it reads.
pub(crate) const VERSION: u16 = 2;
/// The oldest format version this build reads.
const OLDEST_VERSION: u16 = 1;
/// Length of the segment header.
pub(crate) const HEADER_LEN: usize = 48;
/// Length of a record header.
pub(crate) const RECORD_HEADER_LEN: usize = 32;
/// Length of the fixed part of a task body.
pub(crate) const BODY_FIXED_LEN: usize = 28;
/// Length of the fixed part of an options block.
pub(crate) const OPTIONS_FIXED_LEN: usize = 16;
/// Records start on multiples of this.
pub(crate) const ALIGN: usize = 8;
/// The hard cap on one encoded record, whatever the configuration says.
pub(crate) const MAX_RECORD_LIMIT: usize = 64 * 1024 * 1024;

/// Flag bit: the task's last run was interrupted at the drain deadline.
const FLAG_INTERRUPTED: u8 = 0b0000_0001;
/// Flag bit: the body holds an options block.
const FLAG_OPTIONS: u8 = 0b0000_0010;
const KNOWN_FLAGS: u8 = FLAG_INTERRUPTED | FLAG_OPTIONS;

/// What a record says about its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// The task is live: queued, or interrupted and waiting to run again.
    Task = 1,
    /// The task is finished; earlier records of it are void.
    Ack = 2,
    /// The task was set aside for a person.
    Dead = 3,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Task),
            2 => Some(Self::Ack),
            3 => Some(Self::Dead),
            _ => None,
        }
    }
}

/// A decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) epoch: u64,
    pub(crate) segment: u64,
}

/// Why a segment header did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderError {
    /// Fewer than [`HEADER_LEN`] bytes: the file was cut before its header was whole.
    Short,
    /// The version field names a format newer than this build reads.
    UnsupportedVersion(u16),
    /// The header is damaged (bad magic, bad length or CRC mismatch). The two stored copies of
    /// the epoch are handed back so the records can still be tried against each.
    Damaged { magic_ok: bool, epochs: [u64; 2] },
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Short => f.write_str("segment header is cut short"),
            Self::UnsupportedVersion(v) => {
                write!(
                    f,
                    "format version {v} is newer than this build reads ({VERSION})"
                )
            }
            Self::Damaged {
                magic_ok: false, ..
            } => f.write_str("bad magic in segment header"),
            Self::Damaged { magic_ok: true, .. } => f.write_str("segment header checksum mismatch"),
        }
    }
}

/// Why the bytes at an offset are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordError {
    /// The record runs past the end of the input (a torn write, or a damaged length).
    Truncated,
    /// The length field is above the format's cap.
    TooLong(u32),
    /// Unknown kind, unknown flags or non-zero reserved bytes.
    Malformed,
    /// The CRC does not match.
    Checksum,
    /// The CRC matches but the body's own fields are inconsistent.
    BadBody,
    /// After damage, so many candidate records failed their checksum that reading on would
    /// cost far more than the file's size (a file crafted that way): the rest is not read.
    TooManyCandidates,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("record runs past the end of the file"),
            Self::TooLong(len) => write!(f, "record length {len} is above the cap"),
            Self::Malformed => f.write_str("record header is malformed"),
            Self::Checksum => f.write_str("record checksum mismatch"),
            Self::BadBody => f.write_str("record body is malformed"),
            Self::TooManyCandidates => f.write_str(
                "too many record-like stretches after damage to check them all; the rest of \
                 the file is not read",
            ),
        }
    }
}

/// A record borrowed from the bytes it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RecordRef<'a> {
    pub(super) kind: Kind,
    pub(super) id: TaskId,
    /// The body's fixed fields and the interrupted flag (all default for an ack).
    pub(super) state: TaskState,
    /// The last error text, for dead letters and failed attempts (not validated as UTF-8 here).
    pub(super) error: &'a [u8],
    /// The payload, opaque bytes (empty for acks).
    pub(super) payload: &'a [u8],
    /// The options block's fixed fields and key, if the record has one.
    pub(super) options: Option<OptionsRef<'a>>,
}

/// An options block, borrowed from the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OptionsRef<'a> {
    pub(super) priority: u8,
    pub(super) max_attempts: u32,
    pub(super) expires_ms: u64,
    pub(super) key: &'a str,
}

impl OptionsRef<'_> {
    fn to_owned(self) -> TaskOptions {
        TaskOptions {
            priority: self.priority,
            max_attempts: self.max_attempts,
            expires_ms: self.expires_ms,
            key: (!self.key.is_empty()).then(|| self.key.into()),
        }
    }
}

impl<'a> RecordRef<'a> {
    /// The record as a task record (its error text decoded, invalid UTF-8 replaced).
    pub(super) fn task(&self) -> TaskRecord<'a> {
        TaskRecord {
            id: self.id,
            state: self.state,
            last_error: String::from_utf8_lossy(self.error),
            payload: self.payload,
            options: self.options.map(|o| Cow::Owned(o.to_owned())),
        }
    }

    /// The record's options, owned (`None` if it has none).
    pub(super) fn owned_options(&self) -> Option<Box<TaskOptions>> {
        self.options.map(|o| Box::new(o.to_owned()))
    }

    /// The encoded length of this record.
    pub(super) fn encoded_len(&self) -> usize {
        match self.kind {
            Kind::Ack => RECORD_HEADER_LEN,
            Kind::Task | Kind::Dead => task_record_len(
                self.payload.len() + self.options.map_or(0, |o| options_len(o.key.len())),
                self.error.len(),
            ),
        }
    }
}

/// Rounds `len` up to a multiple of [`ALIGN`].
pub(crate) const fn padded(len: usize) -> usize {
    (len + (ALIGN - 1)) & !(ALIGN - 1)
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// The CRC seed of a record of `epoch`'s: the checksum of the epoch's bytes. Remembered per
/// thread for the last epoch asked (a journal's records all share one), so that encoding or
/// checking a record takes one checksum, not two.
fn epoch_seed(epoch: u64) -> u32 {
    thread_local! {
        static LAST: Cell<Option<(u64, u32)>> = const { Cell::new(None) };
    }
    LAST.with(|last| match last.get() {
        Some((remembered, seed)) if remembered == epoch => seed,
        _ => {
            let seed = crc32c::crc32c(&epoch.to_le_bytes());
            last.set(Some((epoch, seed)));
            seed
        }
    })
}

/// Encodes a segment header.
pub(crate) fn encode_header(header: Header) -> [u8; HEADER_LEN] {
    let mut buf = [0u8; HEADER_LEN];
    buf[0..8].copy_from_slice(&MAGIC);
    buf[8..10].copy_from_slice(&VERSION.to_le_bytes());
    buf[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
    buf[16..24].copy_from_slice(&header.epoch.to_le_bytes());
    buf[24..32].copy_from_slice(&header.epoch.to_le_bytes());
    buf[32..40].copy_from_slice(&header.segment.to_le_bytes());
    let crc = crc32c::crc32c(&buf[0..40]);
    buf[40..44].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// Decodes a segment header from the start of `buf`.
pub(crate) fn decode_header(buf: &[u8]) -> Result<Header, HeaderError> {
    if buf.len() < HEADER_LEN {
        return Err(HeaderError::Short);
    }
    let magic_ok = buf[0..8] == MAGIC;
    let epochs = [u64_at(buf, 16), u64_at(buf, 24)];
    let crc_ok = crc32c::crc32c(&buf[0..40]) == u32_at(buf, 40);
    let version = u16_at(buf, 8);
    if magic_ok && crc_ok && version > VERSION {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    let sane = (OLDEST_VERSION..=VERSION).contains(&version)
        && usize::from(u16_at(buf, 10)) == HEADER_LEN
        && epochs[0] == epochs[1]
        && u32_at(buf, 12) == 0
        && u32_at(buf, 44) == 0;
    if !(magic_ok && crc_ok && sane) {
        return Err(HeaderError::Damaged { magic_ok, epochs });
    }
    Ok(Header {
        epoch: epochs[0],
        segment: u64_at(buf, 32),
    })
}

/// Appends one record of `kind` to `out`, checksummed under `epoch`: the task's state, its
/// last error (cut to [`MAX_ERROR_LEN`]) and its payload bytes; an ack has an empty body and
/// only takes the id. Returns the encoded length.
pub(super) fn encode_record(
    out: &mut Vec<u8>,
    epoch: u64,
    kind: Kind,
    record: &TaskRecord<'_>,
) -> usize {
    let start = out.len();
    let state = &record.state;
    out.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
    out[start + 8] = kind as u8;
    let options = record
        .options
        .as_deref()
        .filter(|o| kind != Kind::Ack && !o.is_default());
    if kind != Kind::Ack {
        out[start + 9] = if state.interrupted {
            FLAG_INTERRUPTED
        } else {
            0
        } | if options.is_some() { FLAG_OPTIONS } else { 0 };
    }
    out[start + 16..start + 24].copy_from_slice(&record.id.run().to_le_bytes());
    out[start + 24..start + 32].copy_from_slice(&record.id.seq().to_le_bytes());
    if kind != Kind::Ack {
        out.extend_from_slice(&state.attempts.to_le_bytes());
        out.extend_from_slice(&state.interruptions.to_le_bytes());
        out.extend_from_slice(&state.enqueued_ms.to_le_bytes());
        out.extend_from_slice(&state.not_before_ms.to_le_bytes());
        let error = truncate_utf8(&record.last_error, MAX_ERROR_LEN);
        out.extend_from_slice(&(error.len() as u32).to_le_bytes());
        out.extend_from_slice(error.as_bytes());
        if let Some(options) = options {
            encode_options(out, options);
        }
        out.extend_from_slice(record.payload);
    }
    let body_len = out.len() - start - RECORD_HEADER_LEN;
    let end = start + padded(RECORD_HEADER_LEN + body_len);
    out.resize(end, 0);
    // A body over 4 GiB cannot be framed; callers check the cap before this, so saturating
    // here only keeps the arithmetic total. Such a record fails its checks on read.
    let len_field = u32::try_from(body_len).unwrap_or(u32::MAX);
    out[start + 4..start + 8].copy_from_slice(&len_field.to_le_bytes());
    let crc = crc32c::crc32c_append(epoch_seed(epoch), &out[start + 4..end]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    end - start
}

/// Appends an ack record for `id`: what [`encode_record`] makes of an ack (a header alone, no
/// body), framed in place, since every finished journaled task appends one.
pub(super) fn encode_ack(out: &mut Vec<u8>, epoch: u64, id: TaskId) {
    let mut ack = [0u8; RECORD_HEADER_LEN];
    ack[8] = Kind::Ack as u8;
    ack[16..24].copy_from_slice(&id.run().to_le_bytes());
    ack[24..32].copy_from_slice(&id.seq().to_le_bytes());
    let crc = crc32c::crc32c_append(epoch_seed(epoch), &ack[4..]);
    ack[0..4].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&ack);
}

/// Appends an options block (its key cut to [`MAX_KEY_LEN`], its priority to
/// [`MAX_PRIORITY`]: the pool never hands in more).
fn encode_options(out: &mut Vec<u8>, options: &TaskOptions) {
    let key = truncate_utf8(options.key(), MAX_KEY_LEN);
    out.push(options.priority.min(MAX_PRIORITY));
    out.push(0);
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&options.max_attempts.to_le_bytes());
    out.extend_from_slice(&options.expires_ms.to_le_bytes());
    out.extend_from_slice(key.as_bytes());
}

/// The length of an options block with a key of `key_len` bytes.
pub(crate) const fn options_len(key_len: usize) -> usize {
    OPTIONS_FIXED_LEN + key_len
}

/// The bytes a task's options add to its record (0 for none, or all defaults).
pub(crate) fn options_bytes(options: Option<&TaskOptions>) -> usize {
    options
        .filter(|o| !o.is_default())
        .map_or(0, |o| options_len(o.key().len().min(MAX_KEY_LEN)))
}

/// The longest last-error text kept in a record; longer texts are cut at a character boundary.
pub(crate) const MAX_ERROR_LEN: usize = 4096;

/// `s` cut to at most `max` bytes, at a character boundary.
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The encoded length of a task record whose payload serializes to `payload_len` bytes.
pub(crate) const fn task_record_len(payload_len: usize, error_len: usize) -> usize {
    padded(RECORD_HEADER_LEN + BODY_FIXED_LEN + error_len + payload_len)
}

/// The checks made of a record's header before its checksum: the padded length of the record
/// at the start of `buf` if its header is sane and it fits, which is the number of bytes its
/// checksum covers (less 4). A reader hunting for the next record after damage pays for each
/// candidate that passes these.
pub(super) fn frame_len(buf: &[u8]) -> Result<usize, RecordError> {
    if buf.len() < RECORD_HEADER_LEN {
        return Err(RecordError::Truncated);
    }
    let kind = Kind::from_byte(buf[8]);
    let flags = buf[9];
    if kind.is_none() || flags & !KNOWN_FLAGS != 0 || buf[10..16].iter().any(|&b| b != 0) {
        return Err(RecordError::Malformed);
    }
    let len = u32_at(buf, 4);
    let body_len = len as usize;
    if body_len > MAX_RECORD_LIMIT - RECORD_HEADER_LEN {
        return Err(RecordError::TooLong(len));
    }
    let total = padded(RECORD_HEADER_LEN + body_len);
    if total > buf.len() {
        return Err(RecordError::Truncated);
    }
    Ok(total)
}

/// Decodes the record at the start of `buf`, written under `epoch`.
///
/// Returns the record and its encoded (padded) length.
pub(super) fn decode_record(buf: &[u8], epoch: u64) -> Result<(RecordRef<'_>, usize), RecordError> {
    decode(buf, Some(epoch))
}

/// Decodes again a record [`decode_record`] accepted, from the same bytes, without computing
/// its checksum a second time.
pub(super) fn decode_checked_record(buf: &[u8]) -> Result<(RecordRef<'_>, usize), RecordError> {
    decode(buf, None)
}

/// [`decode_record`], its checksum checked under `epoch` if one is given.
fn decode(buf: &[u8], epoch: Option<u64>) -> Result<(RecordRef<'_>, usize), RecordError> {
    let total = frame_len(buf)?;
    let kind = Kind::from_byte(buf[8]);
    let flags = buf[9];
    let body_len = u32_at(buf, 4) as usize;
    if let Some(epoch) = epoch
        && crc32c::crc32c_append(epoch_seed(epoch), &buf[4..total]) != u32_at(buf, 0)
    {
        return Err(RecordError::Checksum);
    }
    let Some(kind) = kind else {
        return Err(RecordError::Malformed);
    };
    let id = TaskId::new(u64_at(buf, 16), u64_at(buf, 24));
    let body = &buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + body_len];
    let padding = &buf[RECORD_HEADER_LEN + body_len..total];
    if padding.iter().any(|&b| b != 0) {
        return Err(RecordError::BadBody);
    }
    let mut record = RecordRef {
        kind,
        id,
        state: TaskState {
            interrupted: flags & FLAG_INTERRUPTED != 0,
            ..TaskState::default()
        },
        error: &[],
        payload: &[],
        options: None,
    };
    if kind == Kind::Ack {
        if flags & FLAG_OPTIONS != 0 {
            return Err(RecordError::BadBody);
        }
        if !body.is_empty() {
            return Err(RecordError::BadBody);
        }
        return Ok((record, total));
    }
    if body.len() < BODY_FIXED_LEN {
        return Err(RecordError::BadBody);
    }
    record.state.attempts = u32_at(body, 0);
    record.state.interruptions = u32_at(body, 4);
    record.state.enqueued_ms = u64_at(body, 8);
    record.state.not_before_ms = u64_at(body, 16);
    let error_len = u32_at(body, 24) as usize;
    let rest = &body[BODY_FIXED_LEN..];
    if error_len > rest.len() {
        return Err(RecordError::BadBody);
    }
    record.error = &rest[..error_len];
    let mut rest = &rest[error_len..];
    if flags & FLAG_OPTIONS != 0 {
        let (options, after) = decode_options(rest).ok_or(RecordError::BadBody)?;
        record.options = Some(options);
        rest = after;
    }
    record.payload = rest;
    Ok((record, total))
}

/// An options block at the start of `buf`, and what follows it; `None` if it is malformed
/// (cut short, a reserved byte set, a priority or key length out of range, a key not UTF-8).
fn decode_options(buf: &[u8]) -> Option<(OptionsRef<'_>, &[u8])> {
    if buf.len() < OPTIONS_FIXED_LEN || buf[1] != 0 || buf[0] > MAX_PRIORITY {
        return None;
    }
    let key_len = usize::from(u16_at(buf, 2));
    if key_len > MAX_KEY_LEN || buf.len() < OPTIONS_FIXED_LEN + key_len {
        return None;
    }
    let key = std::str::from_utf8(&buf[OPTIONS_FIXED_LEN..OPTIONS_FIXED_LEN + key_len]).ok()?;
    let options = OptionsRef {
        priority: buf[0],
        max_attempts: u32_at(buf, 4),
        expires_ms: u64_at(buf, 8),
        key,
    };
    Some((options, &buf[OPTIONS_FIXED_LEN + key_len..]))
}

#[cfg(test)]
mod tests;
