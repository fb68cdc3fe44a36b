use super::*;

const EPOCH: u64 = 0x0123_4567_89ab_cdef;

fn meta() -> TaskState {
    TaskState {
        attempts: 3,
        interruptions: 2,
        interrupted: true,
        enqueued_ms: 1_700_000_000_123,
        not_before_ms: 1_700_000_060_000,
    }
}

/// Encodes one record into a fresh buffer.
fn encode(kind: Kind, id: TaskId, state: &TaskState, error: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let record = TaskRecord {
        id,
        state: *state,
        last_error: error.into(),
        payload,
        options: None,
    };
    let len = encode_record(&mut out, EPOCH, kind, &record);
    assert_eq!(len, out.len());
    out
}

fn task(payload: &[u8]) -> Vec<u8> {
    encode(Kind::Task, TaskId::new(7, 42), &meta(), "boom", payload)
}

/// Recomputes a record's CRC after a test edited it, so only the edited field is wrong.
fn reseal(record: &mut [u8], epoch: u64) {
    let crc = crc32c::crc32c_append(epoch_seed(epoch), &record[4..]);
    record[0..4].copy_from_slice(&crc.to_le_bytes());
}

/// Recomputes a header's CRC after a test edited it.
fn reseal_header(header: &mut [u8; HEADER_LEN]) {
    let crc = crc32c::crc32c(&header[0..40]);
    header[40..44].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn task_record_round_trips() {
    let payload = br#"{"to":"a@example.com","n":12}"#;
    let id = TaskId::new(7, 42);
    let bytes = encode(Kind::Task, id, &meta(), "connection refused", payload);
    assert_eq!(bytes.len() % ALIGN, 0);
    let (record, len) = decode_record(&bytes, EPOCH).unwrap();
    assert_eq!(len, bytes.len());
    assert_eq!(
        record,
        RecordRef {
            kind: Kind::Task,
            id,
            state: meta(),
            error: b"connection refused",
            payload,
            options: None,
        }
    );
}

#[test]
fn dead_record_round_trips() {
    let id = TaskId::new(u64::MAX, 0);
    let meta = TaskState {
        attempts: 5,
        interruptions: 0,
        interrupted: false,
        enqueued_ms: 9,
        not_before_ms: 0,
    };
    let bytes = encode(Kind::Dead, id, &meta, "handler panicked: oh no", b"[1,2,3]");
    let (record, len) = decode_record(&bytes, EPOCH).unwrap();
    assert_eq!(len, bytes.len());
    assert_eq!(
        record,
        RecordRef {
            kind: Kind::Dead,
            id,
            state: meta,
            error: b"handler panicked: oh no",
            payload: b"[1,2,3]",
            options: None,
        }
    );
}

#[test]
fn ack_record_round_trips_with_an_empty_body() {
    let id = TaskId::new(3, 99);
    // An ack carries only its id: the state, error and payload given are not written.
    let bytes = encode(Kind::Ack, id, &meta(), "ignored", b"ignored");
    assert_eq!(bytes.len(), RECORD_HEADER_LEN);
    assert_eq!(u32_at(&bytes, 4), 0);
    let (record, len) = decode_record(&bytes, EPOCH).unwrap();
    assert_eq!(len, RECORD_HEADER_LEN);
    assert_eq!(record.kind, Kind::Ack);
    assert_eq!(record.id, id);
    assert_eq!(bytes[9], 0, "no flags on an ack");
    assert_eq!(record.state, TaskState::default());
    assert!(record.error.is_empty() && record.payload.is_empty());
}

#[test]
fn empty_payload_and_error_round_trip() {
    let bytes = encode(
        Kind::Task,
        TaskId::new(1, 1),
        &TaskState::default(),
        "",
        b"",
    );
    assert_eq!(bytes.len(), task_record_len(0, 0));
    let (record, _) = decode_record(&bytes, EPOCH).unwrap();
    assert_eq!(record.state, TaskState::default());
    assert!(record.error.is_empty() && record.payload.is_empty());
}

#[test]
fn interrupted_is_flag_bit_zero() {
    for interrupted in [false, true] {
        let state = TaskState {
            interrupted,
            ..meta()
        };
        let bytes = encode(Kind::Task, TaskId::new(1, 1), &state, "", b"1");
        assert_eq!(bytes[9], u8::from(interrupted));
        let (record, _) = decode_record(&bytes, EPOCH).unwrap();
        assert_eq!(record.state, state);
    }
}

#[test]
fn encode_appends_after_existing_bytes() {
    let first = task(b"\"first\"");
    let mut out = first.clone();
    let second = TaskRecord {
        id: TaskId::new(7, 43),
        state: meta(),
        last_error: "".into(),
        payload: b"\"second\"",
        options: None,
    };
    let len = encode_record(&mut out, EPOCH, Kind::Task, &second);
    assert_eq!(out.len(), first.len() + len);
    assert_eq!(&out[..first.len()], &first[..]);
    let (record, _) = decode_record(&out[first.len()..], EPOCH).unwrap();
    assert_eq!(record.task(), second);
}

#[test]
fn huge_length_field_is_refused_without_reading_or_allocating() {
    let mut bytes = task(b"\"x\"");
    bytes[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let started = std::time::Instant::now();
    assert_eq!(
        decode_record(&bytes, EPOCH),
        Err(RecordError::TooLong(u32::MAX))
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(1));

    // Just over the cap is too long; at the cap it is only past the end of this small buffer.
    let max_body = (MAX_RECORD_LIMIT - RECORD_HEADER_LEN) as u32;
    bytes[4..8].copy_from_slice(&(max_body + 1).to_le_bytes());
    assert_eq!(
        decode_record(&bytes, EPOCH),
        Err(RecordError::TooLong(max_body + 1))
    );
    bytes[4..8].copy_from_slice(&max_body.to_le_bytes());
    assert_eq!(decode_record(&bytes, EPOCH), Err(RecordError::Truncated));
}

#[test]
fn length_past_the_end_is_truncated() {
    let good = task(b"\"payload\"");
    let body = u32_at(&good, 4);
    let mut bytes = good.clone();
    bytes[4..8].copy_from_slice(&(body + 8).to_le_bytes());
    assert_eq!(decode_record(&bytes, EPOCH), Err(RecordError::Truncated));
    for len in 0..good.len() {
        assert_eq!(
            decode_record(&good[..len], EPOCH),
            Err(RecordError::Truncated),
            "len {len}"
        );
    }
}

#[test]
fn record_checked_under_another_epoch_fails_its_checksum() {
    for bytes in [
        task(b"{}"),
        encode(Kind::Ack, TaskId::new(1, 2), &TaskState::default(), "", b""),
    ] {
        assert!(decode_record(&bytes, EPOCH).is_ok());
        assert_eq!(decode_record(&bytes, EPOCH + 1), Err(RecordError::Checksum));
        assert_eq!(decode_record(&bytes, 0), Err(RecordError::Checksum));
    }
}

#[test]
fn any_flipped_bit_in_a_record_is_caught() {
    let good = task(br#"{"k":"value"}"#);
    for at in 0..good.len() {
        for bit in 0..8 {
            let mut bytes = good.clone();
            bytes[at] ^= 1 << bit;
            assert!(decode_record(&bytes, EPOCH).is_err(), "byte {at} bit {bit}");
        }
    }
}

#[test]
fn unknown_kind_unknown_flags_and_reserved_bytes_are_malformed() {
    let good = task(b"1");
    for kind in [0u8, 4, 0x80, 0xFF] {
        let mut bytes = good.clone();
        bytes[8] = kind;
        reseal(&mut bytes, EPOCH);
        assert_eq!(
            decode_record(&bytes, EPOCH),
            Err(RecordError::Malformed),
            "kind {kind}"
        );
    }
    for flag in 2..8 {
        let mut bytes = good.clone();
        bytes[9] |= 1 << flag;
        reseal(&mut bytes, EPOCH);
        assert_eq!(
            decode_record(&bytes, EPOCH),
            Err(RecordError::Malformed),
            "flag bit {flag}"
        );
    }
    for at in 10..16 {
        let mut bytes = good.clone();
        bytes[at] = 1;
        reseal(&mut bytes, EPOCH);
        assert_eq!(
            decode_record(&bytes, EPOCH),
            Err(RecordError::Malformed),
            "byte {at}"
        );
    }
}

#[test]
fn non_zero_padding_is_rejected() {
    // A 1-byte payload leaves padding after the body.
    let good = task(b"1");
    let body_end = RECORD_HEADER_LEN + u32_at(&good, 4) as usize;
    assert!(body_end < good.len(), "the test record must have padding");
    for at in body_end..good.len() {
        let mut bytes = good.clone();
        bytes[at] = 0x20;
        reseal(&mut bytes, EPOCH);
        assert_eq!(
            decode_record(&bytes, EPOCH),
            Err(RecordError::BadBody),
            "byte {at}"
        );
    }
}

#[test]
fn inconsistent_bodies_are_bad() {
    // An ack with a body.
    let mut ack = encode(Kind::Ack, TaskId::new(1, 2), &TaskState::default(), "", b"");
    ack.extend_from_slice(&[0; 8]);
    ack[4..8].copy_from_slice(&1u32.to_le_bytes());
    ack[RECORD_HEADER_LEN] = b'x';
    reseal(&mut ack, EPOCH);
    assert_eq!(decode_record(&ack, EPOCH), Err(RecordError::BadBody));

    // A task with a body shorter than its fixed part.
    let mut short = encode(
        Kind::Task,
        TaskId::new(1, 2),
        &TaskState::default(),
        "",
        b"",
    );
    short[4..8].copy_from_slice(&((BODY_FIXED_LEN - 4) as u32).to_le_bytes());
    short.truncate(padded(RECORD_HEADER_LEN + BODY_FIXED_LEN - 4));
    short[RECORD_HEADER_LEN + BODY_FIXED_LEN - 4..].fill(0);
    reseal(&mut short, EPOCH);
    assert_eq!(decode_record(&short, EPOCH), Err(RecordError::BadBody));

    // An error length running past the body.
    let mut long_error = task(b"\"p\"");
    let body_len = u32_at(&long_error, 4);
    let at = RECORD_HEADER_LEN + 24;
    long_error[at..at + 4].copy_from_slice(&(body_len - BODY_FIXED_LEN as u32 + 1).to_le_bytes());
    reseal(&mut long_error, EPOCH);
    assert_eq!(decode_record(&long_error, EPOCH), Err(RecordError::BadBody));
    long_error[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    reseal(&mut long_error, EPOCH);
    assert_eq!(decode_record(&long_error, EPOCH), Err(RecordError::BadBody));
}

#[test]
fn error_text_in_range_is_kept_whole() {
    let exact = "e".repeat(MAX_ERROR_LEN);
    let bytes = encode(Kind::Dead, TaskId::new(1, 1), &meta(), &exact, b"null");
    let (record, _) = decode_record(&bytes, EPOCH).unwrap();
    assert_eq!(record.error, exact.as_bytes());
    assert_eq!(record.payload, b"null");
}

#[test]
fn long_error_text_is_cut_at_a_char_boundary() {
    // "a" then 2-byte chars: byte MAX_ERROR_LEN falls inside a char.
    let two = format!("a{}", "é".repeat(MAX_ERROR_LEN));
    // 4-byte chars: byte MAX_ERROR_LEN is a boundary only every fourth offset.
    let four = format!("ab{}", "😀".repeat(MAX_ERROR_LEN));
    for (text, expected_len) in [(two, MAX_ERROR_LEN - 1), (four, MAX_ERROR_LEN - 2)] {
        assert!(!text.is_char_boundary(MAX_ERROR_LEN));
        let bytes = encode(
            Kind::Task,
            TaskId::new(1, 1),
            &meta(),
            &text,
            b"\"payload\"",
        );
        let (record, len) = decode_record(&bytes, EPOCH).unwrap();
        assert_eq!(len, bytes.len());
        assert_eq!(record.error.len(), expected_len);
        let error = std::str::from_utf8(record.error).expect("cut at a char boundary");
        assert!(text.starts_with(error));
        // The cut did not eat into the payload.
        assert_eq!(record.payload, b"\"payload\"");
        assert_eq!(bytes.len(), task_record_len(9, expected_len));
    }
    assert_eq!(truncate_utf8("héllo", 2), "h");
    assert_eq!(truncate_utf8("héllo", 3), "hé");
    assert_eq!(truncate_utf8("short", MAX_ERROR_LEN), "short");
}

#[test]
fn padded_rounds_up_to_the_alignment() {
    assert_eq!(padded(0), 0);
    assert_eq!(padded(1), 8);
    assert_eq!(padded(7), 8);
    assert_eq!(padded(8), 8);
    assert_eq!(padded(9), 16);
    for len in 0..200 {
        let p = padded(len);
        assert!(
            p >= len && p < len + ALIGN && p.is_multiple_of(ALIGN),
            "len {len}"
        );
    }
}

#[test]
fn task_record_len_matches_the_encoded_length() {
    for payload_len in 0..40 {
        for error_len in 0..20 {
            let payload = vec![b'7'; payload_len];
            let error = "x".repeat(error_len);
            for kind in [Kind::Task, Kind::Dead] {
                let bytes = encode(kind, TaskId::new(2, 3), &meta(), &error, &payload);
                assert_eq!(bytes.len(), task_record_len(payload_len, error_len));
                assert_eq!(
                    bytes.len(),
                    padded(RECORD_HEADER_LEN + BODY_FIXED_LEN + error_len + payload_len)
                );
                let (record, len) = decode_record(&bytes, EPOCH).unwrap();
                assert_eq!(len, bytes.len());
                assert_eq!(record.payload, &payload[..]);
                assert_eq!(record.error, error.as_bytes());
            }
        }
    }
}

#[test]
fn decode_ignores_bytes_after_the_record() {
    let mut bytes = task(b"\"p\"");
    let len = bytes.len();
    bytes.extend_from_slice(&[0xFF; 64]);
    let (record, decoded_len) = decode_record(&bytes, EPOCH).unwrap();
    assert_eq!(decoded_len, len);
    assert_eq!(record.payload, b"\"p\"");
}

fn with_options(options: &TaskOptions, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let record = TaskRecord {
        id: TaskId::new(7, 43),
        state: meta(),
        last_error: "boom".into(),
        payload,
        options: Some(Cow::Borrowed(options)),
    };
    let len = encode_record(&mut out, EPOCH, Kind::Task, &record);
    assert_eq!(len, out.len());
    out
}

#[test]
fn options_round_trip_and_count_in_the_record_length() {
    let options = TaskOptions {
        priority: 6,
        max_attempts: 9,
        expires_ms: 1_700_000_999_000,
        key: Some("order:7/é".into()),
    };
    let bytes = with_options(&options, b"{\"a\":1}");
    let (record, len) = decode_record(&bytes, EPOCH).unwrap();
    assert_eq!(len, bytes.len());
    assert_eq!(record.encoded_len(), bytes.len());
    assert_eq!(record.payload, b"{\"a\":1}");
    assert_eq!(record.error, b"boom");
    assert_eq!(record.state, meta());
    assert_eq!(record.owned_options().as_deref(), Some(&options));
    assert_eq!(record.task().options.as_deref(), Some(&options));
    assert_eq!(
        bytes.len(),
        task_record_len(7 + options_bytes(Some(&options)), 4)
    );
    // All at their defaults: no block, no flag, the length of a record without options.
    let plain = with_options(&TaskOptions::default(), b"{\"a\":1}");
    assert_eq!(plain[9] & FLAG_OPTIONS, 0);
    let (record, _) = decode_record(&plain, EPOCH).unwrap();
    assert_eq!(record.options, None);
    assert_eq!(options_bytes(Some(&TaskOptions::default())), 0);
}

#[test]
fn a_malformed_options_block_is_a_bad_body() {
    let options = TaskOptions {
        priority: 3,
        key: Some("k".into()),
        ..TaskOptions::default()
    };
    let good = with_options(&options, b"[]");
    let block = RECORD_HEADER_LEN + BODY_FIXED_LEN + 4;
    // A priority above 7, a reserved byte, a key longer than the body, a key not UTF-8.
    for (at, value) in [
        (block, 8),
        (block + 1, 1),
        (block + 2, 200),
        (block + 16, 0xff),
    ] {
        let mut bytes = good.clone();
        bytes[at] = value;
        reseal(&mut bytes, EPOCH);
        assert_eq!(
            decode_record(&bytes, EPOCH),
            Err(RecordError::BadBody),
            "byte {at} = {value}"
        );
    }
    // An ack never carries options.
    let mut ack = Vec::new();
    encode_ack(&mut ack, EPOCH, TaskId::new(1, 1));
    ack[9] = FLAG_OPTIONS;
    reseal(&mut ack, EPOCH);
    assert_eq!(decode_record(&ack, EPOCH), Err(RecordError::BadBody));
}

mod header;

#[test]
fn an_ack_framed_in_place_is_the_record_encode_record_makes_of_it() {
    for id in [
        TaskId::new(1, 1),
        TaskId::new(7, u64::MAX),
        TaskId::new(u64::MAX, 3),
    ] {
        let mut framed = vec![0xAA];
        encode_ack(&mut framed, EPOCH, id);
        let mut general = vec![0xAA];
        let ack = TaskRecord {
            id,
            state: TaskState::default(),
            last_error: "".into(),
            payload: &[],
            options: None,
        };
        encode_record(&mut general, EPOCH, Kind::Ack, &ack);
        assert_eq!(framed, general, "{id}");
        let (decoded, len) = decode_record(&framed[1..], EPOCH).unwrap();
        assert_eq!(
            (decoded.kind, decoded.id, len),
            (Kind::Ack, id, RECORD_HEADER_LEN)
        );
    }
}
