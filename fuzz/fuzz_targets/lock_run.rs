//! The `LOCK` file's parser: the run counter a starting pool and `stats` read.
//!
//! Asserts, besides "no panic", that it is exactly the documented format: a run is read iff
//! the content has at least 16 bytes and bytes 8..12 are the CRC-32C of bytes 0..8, which hold
//! the run; only the first 16 bytes count; and what `write_run` writes for any run parses back.

#![no_main]

use drainpool::journal::fuzzing;
use libfuzzer_sys::fuzz_target;

/// The 16 bytes a pool stores for `run`: the run, its CRC-32C, four zero bytes.
fn encode(run: u64) -> [u8; 16] {
    let mut buf = [0u8; 16];
    buf[0..8].copy_from_slice(&run.to_le_bytes());
    buf[8..12].copy_from_slice(&crc32c::crc32c(&run.to_le_bytes()).to_le_bytes());
    buf
}

fuzz_target!(|data: &[u8]| {
    let parsed = fuzzing::parse_run(data);
    let expected = (data.len() >= 16
        && crc32c::crc32c(&data[0..8]).to_le_bytes()[..] == data[8..12])
        .then(|| u64::from_le_bytes(data[0..8].try_into().unwrap()));
    assert_eq!(parsed, expected);
    assert_eq!(fuzzing::parse_run(&data[..data.len().min(16)]), parsed);
    if data.len() >= 8 {
        let run = u64::from_le_bytes(data[0..8].try_into().unwrap());
        let stored = encode(run);
        assert_eq!(fuzzing::parse_run(&stored), Some(run));
        assert_eq!(fuzzing::parse_run(&stored[..15]), None);
        // Any one flipped bit in the run or its CRC is caught.
        let bit = data.len() % 96;
        let mut flipped = stored;
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(fuzzing::parse_run(&flipped), None);
    }
});
