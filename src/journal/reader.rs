//! Reads one segment's bytes, record by record, resynchronising past damage.

use super::format::{self, ALIGN, HEADER_LEN, Header, HeaderError, RecordError, RecordRef};

/// A run of bytes that did not decode, followed by a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Damage {
    /// Offset of the first bad byte.
    pub(crate) offset: u64,
    /// How many bytes were skipped to reach the next valid record.
    pub(crate) skipped: u64,
    /// What was wrong at `offset`.
    pub(crate) error: RecordError,
}

/// What reading a segment found, besides the records handed to the callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scan {
    /// The header, or why it did not decode.
    pub(crate) header: Result<Header, HeaderError>,
    /// The epoch the records were checked against, if one was found.
    pub(crate) epoch: Option<u64>,
    /// Valid records read.
    pub(crate) records: usize,
    /// Damage followed by further valid records.
    pub(crate) damage: Vec<Damage>,
    /// Where the valid prefix ends when nothing valid follows it (a torn tail).
    pub(crate) torn_tail: Option<(u64, RecordError)>,
}

impl Scan {
    /// Whether anything other than a torn tail was wrong with the segment's bytes (recovery's
    /// `damage_of` also checks the header against the file name).
    #[cfg(any(test, fuzzing))]
    pub(crate) fn is_damaged(&self) -> bool {
        !self.damage.is_empty() || matches!(self.header, Err(HeaderError::Damaged { .. }))
    }
}

/// Reads the segment in `buf`, calling `on_record` with each valid record and its offset.
///
/// A damaged record costs only itself: the reader moves on to the next 8-byte boundary at which
/// a record validates under the segment's epoch. A damaged header is survived by trying both
/// stored copies of the epoch. An unsupported version yields no records.
pub(crate) fn scan<'a>(buf: &'a [u8], mut on_record: impl FnMut(u64, RecordRef<'a>)) -> Scan {
    let header = format::decode_header(buf);
    let mut scan = Scan {
        header,
        epoch: None,
        records: 0,
        damage: Vec::new(),
        torn_tail: None,
    };
    let epoch = match scan.header {
        Ok(h) => h.epoch,
        Err(HeaderError::Short) => {
            if !buf.is_empty() {
                scan.torn_tail = Some((0, RecordError::Truncated));
            }
            return scan;
        }
        Err(HeaderError::UnsupportedVersion(_)) => return scan,
        Err(HeaderError::Damaged { epochs, .. }) => match choose_epoch(buf, epochs) {
            Some(epoch) => epoch,
            // Zeros only: the file's data never reached the disk (a power cut soon after it
            // was created, on a file system that keeps the size but not the data). That is a
            // torn tail at 0, not damage.
            None if buf.iter().all(|&b| b == 0) => {
                scan.header = Err(HeaderError::Short);
                scan.torn_tail = Some((0, RecordError::Truncated));
                return scan;
            }
            None => return scan,
        },
    };
    scan.epoch = Some(epoch);
    let mut budget = resync_budget(buf.len());
    let mut pos = HEADER_LEN;
    while pos < buf.len() {
        match format::decode_record(&buf[pos..], epoch) {
            Ok((record, len)) => {
                on_record(pos as u64, record);
                scan.records += 1;
                pos += len;
            }
            // Zeros from a record boundary to the end: room made ahead of the records and not
            // written yet (see `writer.rs`), not a torn record.
            Err(_) if buf[pos..].iter().all(|&b| b == 0) => break,
            Err(error) => match next_valid(buf, pos + ALIGN, epoch, &mut budget) {
                Err(GaveUp) => {
                    scan.damage.push(Damage {
                        offset: pos as u64,
                        skipped: (buf.len() - pos) as u64,
                        error: RecordError::TooManyCandidates,
                    });
                    break;
                }
                Ok(Some(next)) => {
                    scan.damage.push(Damage {
                        offset: pos as u64,
                        skipped: (next - pos) as u64,
                        error,
                    });
                    pos = next;
                }
                Ok(None) => {
                    scan.torn_tail = Some((pos as u64, error));
                    break;
                }
            },
        }
    }
    scan
}

/// The checksum bytes a segment's resynchronisation may compute: many times its size, far more
/// than real damage (zeros, torn writes, flipped bits) ever asks for, but a bound on a file
/// crafted with a record-like header at every boundary, which would otherwise cost time
/// quadratic in its size.
fn resync_budget(len: usize) -> u64 {
    16 * len as u64 + (1 << 20)
}

/// The budget ran out.
#[derive(Debug)]
struct GaveUp;

/// The first aligned offset at or after `from` holding a valid record; each candidate whose
/// header passes the checks is charged the bytes its checksum covers.
fn next_valid(
    buf: &[u8],
    from: usize,
    epoch: u64,
    budget: &mut u64,
) -> Result<Option<usize>, GaveUp> {
    for p in (from..buf.len()).step_by(ALIGN) {
        let Ok(total) = format::frame_len(&buf[p..]) else {
            continue;
        };
        *budget = budget.checked_sub(total as u64).ok_or(GaveUp)?;
        if format::decode_record(&buf[p..], epoch).is_ok() {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// Of the two stored epochs of a damaged header, the one under which a record validates first.
fn choose_epoch(buf: &[u8], epochs: [u64; 2]) -> Option<u64> {
    let mut budget = resync_budget(buf.len());
    let mut find = |epoch| {
        next_valid(buf, HEADER_LEN, epoch, &mut budget)
            .ok()
            .flatten()
            .map(|at| (at, epoch))
    };
    let first = find(epochs[0]);
    let second = if epochs[1] == epochs[0] {
        None
    } else {
        find(epochs[1])
    };
    match (first, second) {
        (Some(a), Some(b)) => Some(if b.0 < a.0 { b.1 } else { a.1 }),
        (a, b) => a.or(b).map(|(_, epoch)| epoch),
    }
}

#[cfg(test)]
mod tests;
