//! The segment reader: a whole segment's bytes in, records, damage and torn tail out.
//!
//! Asserts, besides "no panic":
//! - the scan is deterministic, and its header is `decode_header`'s (or, for a file of zeros
//!   only, `Short`: a torn tail at 0); a decoded header re-encodes to the same 48 bytes;
//! - every record handed out sits at an aligned offset, in increasing order, inside the file,
//!   and re-decodes at that offset to the same record and length (with nothing after it
//!   looked at); a record the writer could have written re-encodes to the same bytes;
//! - records, damage and the torn tail tile the file after the header exactly, in order, the
//!   torn tail last (without one, zeros may follow the records: room made ahead); each damage and the torn tail hold the decoder's error at their offset,
//!   and no aligned offset inside them decodes (the reader resynchronises at the first valid
//!   record, and a torn tail has nothing valid after it);
//! - cutting the file at a record's end keeps every record before the cut.

#![no_main]

use drainpool::journal::fuzzing::{
    self, ALIGN, HEADER_LEN, Header, MAX_ERROR_LEN, Record, RecordError, Scan,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let scan = fuzzing::scan(data);
    assert_eq!(scan, fuzzing::scan(data), "scan is deterministic");
    assert_eq!(scan.record_count, scan.records.len());
    check_header(data, &scan);
    let Some(epoch) = scan.epoch else {
        assert!(scan.records.is_empty() && scan.damage.is_empty());
        assert!(!scan.is_damaged || matches!(scan.header, Header::Damaged { .. }));
        if let Some((at, error)) = scan.torn_tail {
            assert_eq!((at, error), (0, RecordError::Truncated));
            assert!(!data.is_empty());
            assert_eq!(scan.header, Header::Short);
        }
        return;
    };
    assert_eq!(
        scan.is_damaged,
        !scan.damage.is_empty() || matches!(scan.header, Header::Damaged { .. })
    );

    let mut last = None;
    for (offset, record) in &scan.records {
        assert!(last.is_none_or(|l| *offset > l), "records in file order");
        last = Some(*offset);
        check_record(data, epoch, *offset, record);
    }
    check_tiling(data, epoch, &scan);
    check_prefix(data, &scan);
});

fn check_header(data: &[u8], scan: &Scan) {
    let decoded = fuzzing::decode_header(data);
    if scan.header != decoded {
        // A file of zeros only is a torn tail at 0, not a damaged header.
        assert!(data.len() >= HEADER_LEN && data.iter().all(|&b| b == 0));
        assert_eq!(scan.header, Header::Short);
        assert_eq!(scan.torn_tail, Some((0, RecordError::Truncated)));
        return;
    }
    // The version this build writes, as the writer puts it in a header.
    let written = fuzzing::encode_header(0, 0);
    let current = u16::from_le_bytes([written[8], written[9]]);
    match decoded {
        Header::Ok { epoch, segment } => {
            let encoded = fuzzing::encode_header(epoch, segment);
            let version = u16::from_le_bytes([data[8], data[9]]);
            if version == current {
                assert_eq!(encoded[..], data[..HEADER_LEN]);
            } else {
                // An earlier version, read as it was written: the same header but for the
                // version and its checksum.
                assert!(version < current, "version {version}");
                assert_eq!(encoded[..8], data[..8]);
                assert_eq!(encoded[10..40], data[10..40]);
                assert_eq!(encoded[44..], data[44..HEADER_LEN]);
            }
            assert_eq!(scan.epoch, Some(epoch));
        }
        Header::Short => {
            assert!(data.len() < HEADER_LEN);
            assert_eq!(scan.epoch, None);
        }
        Header::UnsupportedVersion(v) => {
            assert!(v > current && data[..8] == *b"DRAINPOL");
            assert_eq!(scan.epoch, None);
            assert!(scan.torn_tail.is_none());
        }
        Header::Damaged { epochs, .. } => {
            assert!(data.len() >= HEADER_LEN);
            assert_eq!(epochs[0].to_le_bytes()[..], data[16..24]);
            assert_eq!(epochs[1].to_le_bytes()[..], data[24..32]);
            if let Some(epoch) = scan.epoch {
                assert!(epochs.contains(&epoch));
            }
        }
    }
}

fn check_record(data: &[u8], epoch: u64, offset: u64, record: &Record) {
    let at = usize::try_from(offset).unwrap();
    assert!(at >= HEADER_LEN && at % ALIGN == 0);
    let (again, len) = fuzzing::decode_record(&data[at..], epoch).expect("re-decodes");
    assert_eq!(&again, record);
    assert_eq!(len, record.encoded_len);
    assert!(at + len <= data.len());
    let alone = fuzzing::decode_record(&data[at..at + len], epoch).expect("decodes alone");
    assert_eq!(alone, (again, len));
    // What the writer could have written (it never sets the interrupted flag on an ack, takes
    // the error as UTF-8 and cuts it to its cap) re-encodes byte for byte.
    let writable = !(record.kind == 2 && record.interrupted)
        && record.error.len() <= MAX_ERROR_LEN
        && std::str::from_utf8(&record.error).is_ok();
    if writable {
        let mut out = Vec::new();
        assert_eq!(fuzzing::encode_record(&mut out, epoch, record), Some(len));
        assert_eq!(out[..], data[at..at + len], "re-encodes byte for byte");
    }
}

/// No aligned offset in `from..to` holds a valid record.
fn nothing_valid(data: &[u8], epoch: u64, from: usize, to: usize) {
    for p in (from..to).step_by(ALIGN) {
        assert!(
            fuzzing::decode_record(&data[p..], epoch).is_err(),
            "valid record at {p} skipped"
        );
    }
}

fn check_tiling(data: &[u8], epoch: u64, scan: &Scan) {
    // (offset, length, error if not a record)
    let mut pieces: Vec<(usize, usize, Option<RecordError>)> = Vec::new();
    for (offset, record) in &scan.records {
        pieces.push((*offset as usize, record.encoded_len, None));
    }
    for &(offset, skipped, error) in &scan.damage {
        if error == RecordError::TooManyCandidates {
            // The resync gave up (a file crafted to make it quadratic): the rest, unread.
            assert_eq!(offset + skipped, data.len() as u64, "given up to the end");
            assert!(scan.torn_tail.is_none());
        } else {
            assert!(skipped > 0 && skipped % ALIGN as u64 == 0);
        }
        pieces.push((offset as usize, skipped as usize, Some(error)));
    }
    pieces.sort_by_key(|p| p.0);
    let mut pos = HEADER_LEN;
    for &(offset, len, error) in &pieces {
        assert_eq!(offset, pos, "records and damage tile the file");
        if error == Some(RecordError::TooManyCandidates) {
            pos += len;
            continue;
        }
        if let Some(error) = error {
            assert_eq!(
                fuzzing::decode_record(&data[offset..], epoch).err(),
                Some(error)
            );
            nothing_valid(data, epoch, offset + ALIGN, offset + len);
            assert!(offset + len < data.len(), "damage is followed by a record");
        }
        pos += len;
    }
    match scan.torn_tail {
        Some((offset, error)) => {
            let offset = offset as usize;
            assert_eq!(offset, pos, "the torn tail comes last");
            assert!(offset < data.len());
            assert_eq!(
                fuzzing::decode_record(&data[offset..], epoch).err(),
                Some(error)
            );
            nothing_valid(data, epoch, offset + ALIGN, data.len());
        }
        // Past the records only room made ahead of them: zeros from a record boundary on.
        None => assert!(
            data[pos..].iter().all(|&b| b == 0),
            "nothing left unaccounted but room"
        ),
    }
}

fn check_prefix(data: &[u8], scan: &Scan) {
    // With a good header the epoch cannot change; cut at one record's end.
    if !matches!(scan.header, Header::Ok { .. }) || scan.records.is_empty() {
        return;
    }
    let (offset, record) = &scan.records[data.len() % scan.records.len()];
    let cut = *offset as usize + record.encoded_len;
    let prefix = fuzzing::scan(&data[..cut]);
    let kept: Vec<_> = scan
        .records
        .iter()
        .filter(|(o, r)| *o as usize + r.encoded_len <= cut)
        .cloned()
        .collect();
    assert_eq!(prefix.records, kept, "a cut keeps the records before it");
    assert_eq!(prefix.torn_tail, None);
}
