//! What follows the last good record: room never written, torn records, garbage over or
//! across records, random buffers, and a file crafted to make the search for records slow.

use super::*;

#[test]
fn zeros_from_a_record_boundary_to_the_end_are_room_not_a_torn_tail() {
    let segment = segment();
    for tail in [1, 7, 8, 31, 32, 33, 64, 100, 4096, 4 << 20] {
        let mut buf = segment.bytes.clone();
        buf.resize(buf.len() + tail, 0);
        let (scan, got) = read(&buf);
        assert_eq!(got, segment.records, "tail {tail}");
        assert!(scan.damage.is_empty(), "tail {tail}");
        assert_eq!(scan.torn_tail, None, "tail {tail}");
    }
}

#[test]
fn a_record_cut_short_before_the_room_is_a_torn_tail() {
    let segment = segment();
    let end = segment.bytes.len();
    let mut buf = segment.bytes.clone();
    // The first record again, cut short, then room: a write torn inside the room.
    let first = HEADER_LEN..HEADER_LEN + RECORD_HEADER_LEN + 4;
    buf.extend_from_slice(&segment.bytes[first]);
    buf.resize(buf.len() + 4096, 0);
    let (scan, got) = read(&buf);
    assert_eq!(got, segment.records);
    assert!(scan.damage.is_empty());
    assert!(
        matches!(scan.torn_tail, Some((at, _)) if at == end as u64),
        "{:?}",
        scan.torn_tail
    );
}

#[test]
fn random_garbage_tail_is_torn_and_costs_nothing() {
    let segment = segment();
    let end = segment.bytes.len() as u64;
    for seed in 0..64 {
        let mut rng = Rng::new(seed);
        let tail = 1 + rng.below(600);
        let mut buf = segment.bytes.clone();
        buf.extend_from_slice(&rng.bytes(tail));
        let (scan, got) = read(&buf);
        assert_eq!(got, segment.records, "seed {seed}");
        assert!(scan.damage.is_empty(), "seed {seed}");
        assert!(
            matches!(scan.torn_tail, Some((o, _)) if o == end),
            "seed {seed}: {scan:?}"
        );
    }
}

#[test]
fn records_of_an_earlier_writer_never_validate() {
    // Bytes left by a writer with another epoch (a recycled block) after this writer's records.
    let segment = segment();
    let end = segment.bytes.len() as u64;
    let mut buf = segment.bytes.clone();
    for seq in 0..5 {
        push_record(
            &mut buf,
            EPOCH ^ 1,
            Kind::Task,
            TaskId::new(2, seq),
            TaskState::default(),
            "",
            b"1",
        );
    }
    let (scan, got) = read(&buf);
    assert_eq!(got, segment.records);
    assert!(scan.damage.is_empty());
    assert_eq!(scan.torn_tail, Some((end, RecordError::Checksum)));
}

#[test]
fn garbage_over_one_record_costs_that_record_only() {
    let segment = segment();
    let last = segment.records.len() - 1;
    for index in 0..segment.records.len() {
        let mut buf = segment.bytes.clone();
        let (start, end) = (segment.start(index), segment.ends[index]);
        Rng::new(index as u64).fill(&mut buf[start..end]);
        let (scan, got) = read(&buf);
        assert_eq!(got, segment.without(index), "record {index}");
        if index == last {
            assert!(scan.damage.is_empty());
            assert!(
                matches!(scan.torn_tail, Some((o, _)) if o == start as u64),
                "{scan:?}"
            );
        } else {
            assert_eq!(scan.damage.len(), 1, "record {index}: {scan:?}");
            assert_eq!(scan.damage[0].offset, start as u64);
            assert_eq!(scan.damage[0].skipped, (end - start) as u64);
            assert_eq!(scan.torn_tail, None);
        }
    }
}

#[test]
fn garbage_across_two_records_is_one_damage() {
    let segment = segment();
    let (first, second) = (10, 11);
    let mut buf = segment.bytes.clone();
    let from = segment.start(first) + 20;
    let to = segment.start(second) + 12;
    Rng::new(99).fill(&mut buf[from..to]);
    let (scan, got) = read(&buf);
    let mut expected = segment.records.clone();
    expected.drain(first..=second);
    assert_eq!(got, expected);
    assert_eq!(scan.damage.len(), 1);
    assert_eq!(scan.damage[0].offset, segment.start(first) as u64);
    assert_eq!(
        scan.damage[0].skipped,
        (segment.ends[second] - segment.start(first)) as u64
    );
    assert_eq!(scan.torn_tail, None);
}

#[test]
fn separate_damages_are_reported_in_order() {
    let segment = segment();
    let damaged = [3, 17, 30];
    let mut buf = segment.bytes.clone();
    for &index in &damaged {
        buf[segment.start(index) + 5] ^= 0x10;
    }
    let (scan, got) = read(&buf);
    let expected: Vec<_> = segment
        .records
        .iter()
        .enumerate()
        .filter(|(i, _)| !damaged.contains(i))
        .map(|(_, r)| r.clone())
        .collect();
    assert_eq!(got, expected);
    let offsets: Vec<_> = scan.damage.iter().map(|d| d.offset).collect();
    let expected_offsets: Vec<_> = damaged.iter().map(|&i| segment.start(i) as u64).collect();
    assert_eq!(offsets, expected_offsets);
    assert_eq!(scan.torn_tail, None);
}

#[test]
fn random_buffers_never_panic() {
    let segment = segment();
    let header = format::encode_header(Header {
        epoch: EPOCH,
        segment: SEGMENT,
    });
    for seed in 0..300 {
        let mut rng = Rng::new(seed);
        let len = rng.below(1500);
        // Pure noise.
        let noise = rng.bytes(len);
        let (scan, got) = read(&noise);
        check_invariants(&noise, &scan, &got);
        // A valid header, then noise: exercises the record decoder and the resync.
        let mut framed = header.to_vec();
        framed.extend_from_slice(&noise);
        let (scan, got) = read(&framed);
        check_invariants(&framed, &scan, &got);
        assert!(got.is_empty(), "seed {seed}: noise validated as a record");
        // A real segment with a few random bytes overwritten and a random cut: whatever is
        // read back is exactly what was written, at the offset it was written.
        let mut mangled = segment.bytes.clone();
        for _ in 0..1 + rng.below(6) {
            let at = rng.below(mangled.len());
            mangled[at] = rng.next() as u8;
        }
        mangled.truncate(HEADER_LEN + rng.below(segment.bytes.len() - HEADER_LEN + 1));
        let (scan, got) = read(&mangled);
        check_invariants(&mangled, &scan, &got);
        for record in &got {
            assert!(
                segment.records.contains(record),
                "seed {seed}: {record:?} was never written"
            );
        }
    }
}

/// A file crafted with a record-like header every 16 bytes, each claiming 512 KiB and failing
/// its checksum, would cost the resynchronisation time quadratic in its size (minutes for
/// 2 MiB). The reader gives up once it has checked many times the file's size, and reports the
/// rest as damage, not read.
#[test]
fn a_file_crafted_to_make_resync_quadratic_is_given_up_on() {
    let len = 2 << 20;
    let mut buf = format::encode_header(Header {
        epoch: EPOCH,
        segment: SEGMENT,
    })
    .to_vec();
    let claimed = (512u32 << 10) - RECORD_HEADER_LEN as u32;
    while buf.len() < len {
        // A word with a wrong checksum (0) and the claimed length, then a word with a task's
        // kind and zeros for flags and reserved bytes.
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(&claimed.to_le_bytes());
        buf.extend_from_slice(&[Kind::Task as u8, 0, 0, 0, 0, 0, 0, 0]);
    }
    let (scan, got) = read(&buf);
    assert!(got.is_empty());
    let last = scan.damage.last().expect("reported as damage");
    assert_eq!(last.error, RecordError::TooManyCandidates);
    assert_eq!(
        last.offset + last.skipped,
        buf.len() as u64,
        "to the end of the file"
    );
    assert_eq!(
        scan.torn_tail, None,
        "not a torn tail: nothing is truncated"
    );
}
