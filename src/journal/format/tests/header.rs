//! Segment headers: round trips, every way one is damaged or foreign, and the version-1
//! header still read.

use super::*;

/// `bytes` with `value` written at `at`, resealed, must read as a damaged header whose magic
/// is intact.
fn damaged_with(mut bytes: [u8; HEADER_LEN], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_le_bytes());
    resealed_is_damaged(bytes, &format!("{value} at {at}"));
}

/// `bytes`, resealed, must read as a damaged header whose magic is intact.
fn resealed_is_damaged(mut bytes: [u8; HEADER_LEN], case: &str) {
    reseal_header(&mut bytes);
    assert!(
        matches!(
            decode_header(&bytes),
            Err(HeaderError::Damaged { magic_ok: true, .. })
        ),
        "{case}"
    );
}

/// Segment `segment`'s header under [`EPOCH`], encoded.
fn header_bytes(segment: u64) -> [u8; HEADER_LEN] {
    encode_header(Header {
        epoch: EPOCH,
        segment,
    })
}

#[test]
fn header_round_trips() {
    for (epoch, segment) in [(0, 0), (1, 1), (EPOCH, 17), (u64::MAX, u64::MAX)] {
        let header = Header { epoch, segment };
        let bytes = encode_header(header);
        assert_eq!(&bytes[0..8], b"DRAINPOL");
        assert_eq!(decode_header(&bytes), Ok(header));
        // Trailing bytes (the records) do not disturb the header.
        let mut longer = bytes.to_vec();
        longer.extend_from_slice(&[0xAA; 100]);
        assert_eq!(decode_header(&longer), Ok(header));
    }
}

#[test]
fn header_with_bad_magic_is_damaged_and_keeps_its_epochs() {
    let mut bytes = header_bytes(3);
    bytes[0] = b'X';
    assert_eq!(
        decode_header(&bytes),
        Err(HeaderError::Damaged {
            magic_ok: false,
            epochs: [EPOCH, EPOCH]
        })
    );
    // Even with a CRC that matches the bad magic.
    reseal_header(&mut bytes);
    assert_eq!(
        decode_header(&bytes),
        Err(HeaderError::Damaged {
            magic_ok: false,
            epochs: [EPOCH, EPOCH]
        })
    );
}

#[test]
fn header_of_a_newer_version_is_unsupported() {
    let mut bytes = header_bytes(3);
    bytes[8..10].copy_from_slice(&3u16.to_le_bytes());
    // Without a matching CRC it is just damage: a flipped bit must not pass for a new version.
    assert!(matches!(
        decode_header(&bytes),
        Err(HeaderError::Damaged { magic_ok: true, .. })
    ));
    reseal_header(&mut bytes);
    assert_eq!(
        decode_header(&bytes),
        Err(HeaderError::UnsupportedVersion(3))
    );
    let message = HeaderError::UnsupportedVersion(3).to_string();
    assert!(message.contains('3') && message.contains('2'), "{message}");
}

#[test]
fn header_of_version_zero_is_damaged() {
    damaged_with(header_bytes(3), 8, 0);
}

#[test]
fn short_header_is_short() {
    let bytes = header_bytes(3);
    for len in 0..HEADER_LEN {
        assert_eq!(
            decode_header(&bytes[..len]),
            Err(HeaderError::Short),
            "len {len}"
        );
    }
}

#[test]
fn header_with_differing_epochs_hands_back_both() {
    let mut bytes = header_bytes(3);
    bytes[24..32].copy_from_slice(&5u64.to_le_bytes());
    reseal_header(&mut bytes);
    assert_eq!(
        decode_header(&bytes),
        Err(HeaderError::Damaged {
            magic_ok: true,
            epochs: [EPOCH, 5]
        })
    );
}

#[test]
fn header_with_non_zero_reserved_bytes_or_wrong_length_is_damaged() {
    let good = header_bytes(3);
    // Reserved bytes 12..16 are under the CRC: reseal so only the reserved check can fail.
    for at in 12..16 {
        let mut bytes = good;
        bytes[at] = 1;
        resealed_is_damaged(bytes, &format!("byte {at}"));
    }
    // Reserved bytes 44..48 follow the CRC.
    for at in 44..48 {
        let mut bytes = good;
        bytes[at] = 0x80;
        assert!(
            matches!(
                decode_header(&bytes),
                Err(HeaderError::Damaged { magic_ok: true, .. })
            ),
            "byte {at}"
        );
    }
    damaged_with(good, 10, 64);
}

#[test]
fn header_with_any_flipped_bit_is_damaged_with_a_usable_epoch() {
    let good = header_bytes(3);
    for at in 0..HEADER_LEN {
        for bit in 0..8 {
            let mut bytes = good;
            bytes[at] ^= 1 << bit;
            match decode_header(&bytes) {
                Err(HeaderError::Damaged { epochs, .. }) => {
                    assert!(epochs.contains(&EPOCH), "byte {at} bit {bit}: {epochs:?}");
                }
                other => panic!("byte {at} bit {bit}: {other:?}"),
            }
        }
    }
}

#[test]
fn a_version_1_header_is_still_read() {
    let mut bytes = header_bytes(5);
    assert_eq!(u16_at(&bytes, 8), VERSION);
    bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
    reseal_header(&mut bytes);
    assert_eq!(
        decode_header(&bytes),
        Ok(Header {
            epoch: EPOCH,
            segment: 5
        })
    );
}
