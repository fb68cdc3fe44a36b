//! The record decoder: the first 8 bytes are the writer epoch, the rest the bytes at a record's
//! offset.
//!
//! Asserts, besides "no panic":
//! - a decoded record is a known kind, takes an aligned length of at least a header and at most
//!   the input, says so itself (`encoded_len`), decodes the same from exactly its bytes, and is
//!   `Truncated` from one byte fewer; an ack carries no state, error or payload;
//! - the CRC binds the epoch: under any other epoch the same bytes are a `Checksum` error;
//! - a record the writer could have written re-encodes byte for byte;
//! - errors are what the bytes say (`TooLong` carries the length field, above the cap;
//!   `Truncated` only when the input is shorter than the header or the framed length);
//! - and the other way round, a record built from the input's bytes, encoded by the writer,
//!   decodes to itself (an ack to its id alone; the error text cut to its cap).

#![no_main]

use drainpool::journal::fuzzing::{
    self, ALIGN, MAX_ERROR_LEN, MAX_RECORD_LIMIT, RECORD_HEADER_LEN, Record, RecordError,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let epoch = u64::from_le_bytes(data[..8].try_into().unwrap());
    let buf = &data[8..];
    decode(epoch, buf);
    round_trip(epoch, buf);
});

fn decode(epoch: u64, buf: &[u8]) {
    match fuzzing::decode_record(buf, epoch) {
        Ok((record, len)) => {
            assert!((1..=3).contains(&record.kind));
            assert!(len >= RECORD_HEADER_LEN && len % ALIGN == 0 && len <= buf.len());
            assert_eq!(len, record.encoded_len);
            assert_eq!(
                fuzzing::decode_record(&buf[..len], epoch),
                Ok((record.clone(), len))
            );
            assert_eq!(
                fuzzing::decode_record(&buf[..len - 1], epoch),
                Err(RecordError::Truncated)
            );
            if record.kind == 2 {
                assert!(record.error.is_empty() && record.payload.is_empty());
                assert_eq!(
                    (record.attempts, record.interruptions, record.enqueued_ms),
                    (0, 0, 0)
                );
                assert_eq!(record.not_before_ms, 0);
            }
            for other in [epoch ^ 1, epoch.wrapping_add(1 << 40), !epoch] {
                assert_eq!(
                    fuzzing::decode_record(buf, other),
                    Err(RecordError::Checksum),
                    "the CRC binds the epoch"
                );
            }
            let writable = !(record.kind == 2 && record.interrupted)
                && record.error.len() <= MAX_ERROR_LEN
                && std::str::from_utf8(&record.error).is_ok();
            if writable {
                let mut out = Vec::new();
                assert_eq!(fuzzing::encode_record(&mut out, epoch, &record), Some(len));
                assert_eq!(out[..], buf[..len]);
            }
        }
        Err(RecordError::TooLong(len)) => {
            assert_eq!(len.to_le_bytes()[..], buf[4..8]);
            assert!(len as usize > MAX_RECORD_LIMIT - RECORD_HEADER_LEN);
        }
        Err(RecordError::Truncated) => {
            if buf.len() >= RECORD_HEADER_LEN {
                let len = u32::from_le_bytes(buf[4..8].try_into().unwrap()) as usize;
                let framed = (RECORD_HEADER_LEN + len).div_ceil(ALIGN) * ALIGN;
                assert!(framed > buf.len());
            }
        }
        Err(RecordError::Malformed | RecordError::Checksum | RecordError::BadBody) => {
            assert!(buf.len() >= RECORD_HEADER_LEN);
        }
        Err(RecordError::TooManyCandidates) => {
            panic!("only a segment's resync gives up, never one record's decode")
        }
    }
}

/// A record built from `bytes` (field by field, the rest split into error text and payload)
/// goes through the writer and back.
fn round_trip(epoch: u64, bytes: &[u8]) {
    if bytes.len() < 36 {
        return;
    }
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let kind = 1 + bytes[0] % 3;
    let rest = &bytes[36..];
    let split = usize::from(bytes[1]).min(rest.len());
    let error = String::from_utf8_lossy(&rest[..split]).into_owned();
    let record = Record {
        kind,
        run: u64_at(4),
        seq: u64_at(12),
        interrupted: bytes[2] & 1 == 1,
        attempts: u32_at(20),
        interruptions: u32_at(24),
        enqueued_ms: u64_at(28),
        not_before_ms: u64_at(28).rotate_left(17),
        error: error.into_bytes(),
        payload: rest[split..].to_vec(),
        options: None,
        encoded_len: 0,
    };
    let mut out = vec![0xAA; usize::from(bytes[3] % 4) * ALIGN];
    let start = out.len();
    let len = fuzzing::encode_record(&mut out, epoch, &record).expect("UTF-8 error text");
    assert_eq!(out.len(), start + len);
    let (decoded, decoded_len) =
        fuzzing::decode_record(&out[start..], epoch).expect("what the writer wrote decodes");
    assert_eq!(decoded_len, len);
    let expected = if kind == 2 {
        Record {
            kind,
            run: record.run,
            seq: record.seq,
            interrupted: false,
            attempts: 0,
            interruptions: 0,
            enqueued_ms: 0,
            not_before_ms: 0,
            error: Vec::new(),
            payload: Vec::new(),
            options: None,
            encoded_len: len,
        }
    } else {
        Record {
            encoded_len: len,
            ..record
        }
    };
    assert_eq!(decoded, expected);
}
