use super::*;
use crate::journal::format::{Kind, RECORD_HEADER_LEN};
use crate::journal::record::{TaskRecord, TaskState};
use crate::task::TaskId;

const EPOCH: u64 = 0x5eed_0fd4_a14b_0000;
const SEGMENT: u64 = 9;
const RECORDS: usize = 36;

/// A deterministic xorshift64 generator: no dependency, same bytes on every run.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for byte in buf {
            *byte = self.next() as u8;
        }
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.fill(&mut buf);
        buf
    }
}

/// A record as read back, owning its bytes, with the offset the reader gave.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owned {
    offset: u64,
    kind: Kind,
    id: TaskId,
    state: TaskState,
    error: Vec<u8>,
    payload: Vec<u8>,
}

impl Owned {
    fn new(offset: u64, record: RecordRef<'_>) -> Self {
        Self {
            offset,
            kind: record.kind,
            id: record.id,
            state: record.state,
            error: record.error.to_vec(),
            payload: record.payload.to_vec(),
        }
    }
}

/// A segment built in memory, with what was written into it.
struct Segment {
    bytes: Vec<u8>,
    records: Vec<Owned>,
    /// Where each record ends.
    ends: Vec<usize>,
}

impl Segment {
    /// The index of the record holding byte `at` (which must be past the header).
    fn record_at(&self, at: usize) -> usize {
        self.ends
            .iter()
            .position(|&end| at < end)
            .expect("byte inside a record")
    }

    fn start(&self, index: usize) -> usize {
        self.records[index].offset as usize
    }

    fn len_of(&self, index: usize) -> usize {
        self.ends[index] - self.start(index)
    }

    fn without(&self, index: usize) -> Vec<Owned> {
        let mut records = self.records.clone();
        records.remove(index);
        records
    }
}

/// A JSON string payload of about `len` bytes, with escapes and multi-byte characters.
fn json_payload(rng: &mut Rng, len: usize) -> Vec<u8> {
    const CHARS: [char; 8] = ['a', 'z', '0', ' ', '"', '\\', 'é', '\n'];
    let text: String = (0..len).map(|_| CHARS[rng.below(CHARS.len())]).collect();
    serde_json::to_vec(&text).unwrap()
}

/// Encodes one record at the end of `bytes`, returning what reading it back must give.
fn push_record(
    bytes: &mut Vec<u8>,
    epoch: u64,
    kind: Kind,
    id: TaskId,
    state: TaskState,
    error: &str,
    payload: &[u8],
) -> Owned {
    let offset = bytes.len() as u64;
    let record = TaskRecord {
        id,
        state,
        last_error: error.into(),
        payload,
        options: None,
    };
    format::encode_record(bytes, epoch, kind, &record);
    let (state, error, payload) = match kind {
        Kind::Ack => (TaskState::default(), Vec::new(), Vec::new()),
        Kind::Task | Kind::Dead => (state, error.as_bytes().to_vec(), payload.to_vec()),
    };
    Owned {
        offset,
        kind,
        id,
        state,
        error,
        payload,
    }
}

/// A header and `RECORDS` records: tasks with payloads of 0 to 200 bytes, some with an error
/// text, and every fifth record an ack of the task before it.
fn segment() -> Segment {
    let mut rng = Rng::new(1);
    let mut bytes = format::encode_header(Header {
        epoch: EPOCH,
        segment: SEGMENT,
    })
    .to_vec();
    let mut records = Vec::new();
    let mut ends = Vec::new();
    for i in 0..RECORDS {
        let n = i as u64;
        let record = if i % 5 == 4 {
            push_record(
                &mut bytes,
                EPOCH,
                Kind::Ack,
                TaskId::new(3, n - 1),
                TaskState::default(),
                "",
                b"",
            )
        } else {
            let meta = TaskState {
                attempts: i as u32,
                interruptions: (i % 3) as u32,
                interrupted: i % 2 == 1,
                enqueued_ms: 1_700_000_000_000 + n,
                not_before_ms: if i % 4 == 0 { 0 } else { 1_700_000_100_000 + n },
            };
            let error = if i % 3 == 0 {
                format!("attempt {i} failed")
            } else {
                String::new()
            };
            let len = rng.below(200);
            let payload = json_payload(&mut rng, len);
            push_record(
                &mut bytes,
                EPOCH,
                Kind::Task,
                TaskId::new(3, n),
                meta,
                &error,
                &payload,
            )
        };
        records.push(record);
        ends.push(bytes.len());
    }
    Segment {
        bytes,
        records,
        ends,
    }
}

fn read(buf: &[u8]) -> (Scan, Vec<Owned>) {
    let mut got = Vec::new();
    let scan = scan(buf, |offset, record| got.push(Owned::new(offset, record)));
    assert_eq!(scan.records, got.len(), "the count matches the callbacks");
    (scan, got)
}

/// What must hold of any scan, whatever the input.
fn check_invariants(buf: &[u8], scan: &Scan, got: &[Owned]) {
    let len = buf.len() as u64;
    let mut last_end = HEADER_LEN as u64;
    for record in got {
        assert!(
            record.offset >= last_end,
            "records in order, not overlapping: {scan:?}"
        );
        assert_eq!(record.offset % ALIGN as u64, 0);
        last_end = record.offset + RECORD_HEADER_LEN as u64;
    }
    assert!(last_end <= len.max(HEADER_LEN as u64));
    for damage in &scan.damage {
        assert_eq!(damage.offset % ALIGN as u64, 0);
        assert!(damage.offset >= HEADER_LEN as u64);
        assert!(damage.skipped > 0 && damage.offset + damage.skipped < len);
        // A damage is always followed by a valid record.
        assert!(
            got.iter()
                .any(|r| r.offset == damage.offset + damage.skipped),
            "{scan:?}"
        );
    }
    if let Some((offset, _)) = scan.torn_tail {
        assert!(offset <= len);
        assert!(
            got.iter().all(|r| r.offset < offset),
            "nothing valid after a torn tail"
        );
    }
    if !got.is_empty() {
        assert!(scan.epoch.is_some());
    }
}

#[test]
fn intact_segment_reads_every_record() {
    let segment = segment();
    let (scan, got) = read(&segment.bytes);
    assert_eq!(got, segment.records);
    assert_eq!(
        scan.header,
        Ok(Header {
            epoch: EPOCH,
            segment: SEGMENT
        })
    );
    assert_eq!(scan.epoch, Some(EPOCH));
    assert!(scan.damage.is_empty());
    assert_eq!(scan.torn_tail, None);
    assert!(!scan.is_damaged());
    // The segment exercises what it claims to: varied sizes, both kinds, errors.
    assert!(got.iter().any(|r| r.kind == Kind::Ack));
    assert!(got.iter().any(|r| r.payload.len() > 150) && got.iter().any(|r| r.payload.len() < 10));
    assert!(got.iter().any(|r| !r.error.is_empty()));
}

#[test]
fn empty_buffer_gives_nothing() {
    let (scan, got) = read(&[]);
    assert!(got.is_empty());
    assert_eq!(
        scan,
        Scan {
            header: Err(HeaderError::Short),
            epoch: None,
            records: 0,
            damage: Vec::new(),
            torn_tail: None,
        }
    );
    assert!(!scan.is_damaged());
}

#[test]
fn header_only_buffer_gives_nothing() {
    let header = format::encode_header(Header {
        epoch: EPOCH,
        segment: SEGMENT,
    });
    let (scan, got) = read(&header);
    assert!(got.is_empty());
    assert_eq!(
        scan,
        Scan {
            header: Ok(Header {
                epoch: EPOCH,
                segment: SEGMENT
            }),
            epoch: Some(EPOCH),
            records: 0,
            damage: Vec::new(),
            torn_tail: None,
        }
    );
    assert!(!scan.is_damaged());
}

#[test]
fn truncation_at_every_offset_keeps_exactly_the_whole_records_before_it() {
    let segment = segment();
    for cut in 0..=segment.bytes.len() {
        let (scan, got) = read(&segment.bytes[..cut]);
        let whole = segment.ends.iter().filter(|&&end| end <= cut).count();
        assert_eq!(got, segment.records[..whole], "cut {cut}");
        assert!(scan.damage.is_empty(), "cut {cut}: {scan:?}");
        assert!(!scan.is_damaged(), "cut {cut}");
        if cut < HEADER_LEN {
            assert_eq!(scan.header, Err(HeaderError::Short));
            let torn = (cut > 0).then_some((0, RecordError::Truncated));
            assert_eq!(scan.torn_tail, torn, "cut {cut}");
            continue;
        }
        assert_eq!(
            scan.header,
            Ok(Header {
                epoch: EPOCH,
                segment: SEGMENT
            })
        );
        let valid_end = if whole == 0 {
            HEADER_LEN
        } else {
            segment.ends[whole - 1]
        };
        let torn = (cut != valid_end).then_some((valid_end as u64, RecordError::Truncated));
        assert_eq!(scan.torn_tail, torn, "cut {cut}");
    }
}

/// Checks the scan of `segment` with byte `at` damaged: a header byte costs no record, a record
/// byte costs that record and nothing else, and no record read differs from what was written.
fn check_one_damaged_byte(segment: &Segment, buf: &[u8], at: usize, mask: u8) {
    let what = format_args!("byte {at} xor {mask:#04x}");
    let (scan, got) = read(buf);
    if at < HEADER_LEN {
        assert!(
            matches!(scan.header, Err(HeaderError::Damaged { .. })),
            "{what}"
        );
        assert_eq!(scan.epoch, Some(EPOCH), "{what}");
        assert_eq!(got, segment.records, "{what}");
        assert!(
            scan.damage.is_empty() && scan.torn_tail.is_none(),
            "{what}: {scan:?}"
        );
        assert!(scan.is_damaged(), "{what}");
        return;
    }
    let index = segment.record_at(at);
    assert_eq!(
        scan.header,
        Ok(Header {
            epoch: EPOCH,
            segment: SEGMENT
        }),
        "{what}"
    );
    assert_eq!(got, segment.without(index), "{what}");
    let offset = segment.start(index) as u64;
    if index + 1 == segment.records.len() {
        // Nothing valid follows the last record: its damage looks like a torn tail.
        assert!(scan.damage.is_empty(), "{what}: {scan:?}");
        assert!(
            matches!(scan.torn_tail, Some((o, _)) if o == offset),
            "{what}: {scan:?}"
        );
    } else {
        assert_eq!(scan.damage.len(), 1, "{what}: {scan:?}");
        assert_eq!(scan.damage[0].offset, offset, "{what}");
        assert_eq!(
            scan.damage[0].skipped,
            segment.len_of(index) as u64,
            "{what}"
        );
        assert_eq!(scan.torn_tail, None, "{what}");
        assert!(scan.is_damaged(), "{what}");
    }
}

#[test]
fn flipping_any_bit_of_any_byte_costs_at_most_its_own_record() {
    let segment = segment();
    let mut buf = segment.bytes.clone();
    for at in 0..buf.len() {
        for bit in 0..8 {
            let mask = 1 << bit;
            buf[at] ^= mask;
            check_one_damaged_byte(&segment, &buf, at, mask);
            buf[at] ^= mask;
        }
    }
    assert_eq!(buf, segment.bytes);
}

#[test]
fn inverting_any_byte_costs_at_most_its_own_record() {
    let segment = segment();
    let mut buf = segment.bytes.clone();
    for at in 0..buf.len() {
        buf[at] ^= 0xFF;
        check_one_damaged_byte(&segment, &buf, at, 0xFF);
        buf[at] ^= 0xFF;
    }
}

#[test]
fn header_with_either_epoch_copy_damaged_still_reads_every_record() {
    let segment = segment();
    for copy_at in [16, 24] {
        let mut buf = segment.bytes.clone();
        buf[copy_at..copy_at + 8].copy_from_slice(&0xdead_beef_u64.to_le_bytes());
        let (scan, got) = read(&buf);
        assert_eq!(got, segment.records);
        assert_eq!(scan.epoch, Some(EPOCH));
        assert!(matches!(
            scan.header,
            Err(HeaderError::Damaged { magic_ok: true, .. })
        ));
        assert!(scan.is_damaged());
    }
}

#[test]
fn damaged_header_with_no_valid_record_gives_nothing() {
    let segment = segment();
    let mut buf = segment.bytes[..HEADER_LEN].to_vec();
    buf[0] ^= 1;
    buf.extend_from_slice(&Rng::new(7).bytes(300));
    let (scan, got) = read(&buf);
    assert!(got.is_empty());
    assert_eq!(scan.epoch, None);
    assert!(matches!(
        scan.header,
        Err(HeaderError::Damaged {
            magic_ok: false,
            ..
        })
    ));
    assert!(scan.is_damaged());
}

#[test]
fn newer_version_yields_no_records() {
    let segment = segment();
    let mut buf = segment.bytes.clone();
    buf[8..10].copy_from_slice(&3u16.to_le_bytes());
    let crc = crc32c::crc32c(&buf[0..40]);
    buf[40..44].copy_from_slice(&crc.to_le_bytes());
    let (scan, got) = read(&buf);
    assert!(got.is_empty());
    assert_eq!(scan.header, Err(HeaderError::UnsupportedVersion(3)));
    assert_eq!(scan.epoch, None);
    assert!(scan.damage.is_empty() && scan.torn_tail.is_none());
    assert!(!scan.is_damaged());
}

mod tails;
