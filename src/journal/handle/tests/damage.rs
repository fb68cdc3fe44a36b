//! Damaged and foreign segments at open: a newer version refused and left alone, a damaged
//! record reported with a copy kept, torn tails and checksum failures truncated.

use super::*;

#[test]
fn newer_version_segment_fails_open_and_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = format::encode_header(Header {
        epoch: 5,
        segment: 1,
    });
    bytes[8..10].copy_from_slice(&3u16.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[0..40]);
    bytes[40..44].copy_from_slice(&crc.to_le_bytes());
    let mut contents = bytes.to_vec();
    contents.extend_from_slice(&[0xAB; 100]);
    let path = tmp.path().join("00000000000000000001.seg");
    std::fs::write(&path, &contents).unwrap();

    match try_open(tmp.path()) {
        Err(StartError::Journal(
            ref error @ JournalError::UnsupportedVersion {
                path: ref found_path,
                found,
                supported,
            },
        )) => {
            assert_eq!(found_path, &path);
            assert_eq!((found, supported), (3, format::VERSION));
            assert_eq!(error.path(), Some(path.as_path()));
        }
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), contents);
    assert!(!tmp.path().join(DAMAGED_DIR).exists());

    // The failed open released the lock.
    std::fs::rename(&path, tmp.path().join("moved-away")).unwrap();
    let (journal, report, _) = open(tmp.path());
    assert_eq!(report.segments, 0);
    drop(journal);
}

#[test]
fn damaged_middle_record_is_reported_and_a_copy_kept() {
    let (tmp, written, path) = closed_segment(5);
    let offset = format::HEADER_LEN + written[..2].iter().map(Item::record_len).sum::<usize>();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offset + format::RECORD_HEADER_LEN + 3] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();

    let (journal, report, seen) = open(tmp.path());
    let expected: Vec<_> = written
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, item)| item.seen())
        .collect();
    assert_eq!(seen, expected);
    assert_eq!(
        report.damage,
        [Damage {
            path: path.clone(),
            offset: offset as u64,
            len: written[2].record_len() as u64,
            reason: format::RecordError::Checksum.to_string(),
        }]
    );
    assert!(report.torn_tails.is_empty());
    assert_eq!(report.damaged_copies.len(), 1);
    let copy = &report.damaged_copies[0];
    assert_eq!(copy.parent(), Some(tmp.path().join(DAMAGED_DIR).as_path()));
    assert_eq!(std::fs::read(copy).unwrap(), bytes);
    #[cfg(unix)]
    {
        assert_eq!(mode(&tmp.path().join(DAMAGED_DIR)), 0o700);
        assert_eq!(mode(copy), 0o600);
    }
    // The damaged segment itself is not rewritten by recovery.
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    drop(journal);

    // A second recovery keeps a second copy and never overwrites the first.
    let (journal, report, _) = open(tmp.path());
    assert_eq!(report.damaged_copies.len(), 1);
    assert_ne!(&report.damaged_copies[0], copy);
    assert_eq!(
        std::fs::read_dir(tmp.path().join(DAMAGED_DIR))
            .unwrap()
            .count(),
        2
    );
    drop(journal);
}

#[test]
fn damaged_header_costs_no_record() {
    let (tmp, written, path) = closed_segment(3);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 0x01; // the first copy of the epoch
    std::fs::write(&path, &bytes).unwrap();

    let (journal, report, seen) = open(tmp.path());
    assert_eq!(seen, written.iter().map(Item::seen).collect::<Vec<_>>());
    assert_eq!(report.damage.len(), 1);
    assert_eq!(
        (report.damage[0].offset, report.damage[0].len),
        (0, format::HEADER_LEN as u64)
    );
    assert_eq!(report.damage[0].path, path);
    assert_eq!(report.damaged_copies.len(), 1);
    assert!(report.torn_tails.is_empty());
    drop(journal);
}

#[test]
fn torn_tail_is_truncated_on_disk_and_reported() {
    let (tmp, written, path) = closed_segment(4);
    let full = std::fs::metadata(&path).unwrap().len();
    let cut = full - 5;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let valid_end = full - written[3].record_len() as u64;

    let (journal, report, seen) = open(tmp.path());
    assert_eq!(
        seen,
        written[..3].iter().map(Item::seen).collect::<Vec<_>>()
    );
    assert_eq!(
        report.torn_tails,
        [Damage {
            path: path.clone(),
            offset: valid_end,
            len: cut - valid_end,
            reason: format::RecordError::Truncated.to_string(),
        }]
    );
    assert!(report.damage.is_empty() && report.damaged_copies.is_empty());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), valid_end);
    drop(journal);

    // Once cut back, the segment is whole again.
    let (journal, report, seen) = open(tmp.path());
    assert_eq!(seen.len(), 3);
    assert_clean(&report);
    drop(journal);
}

#[test]
fn a_whole_last_record_failing_its_checksum_is_truncated_and_a_copy_kept() {
    let (tmp, written, path) = closed_segment(4);
    let mut bytes = std::fs::read(&path).unwrap();
    let full = bytes.len() as u64;
    let valid_end = full - written[3].record_len() as u64;
    // Flip a bit inside the last record's body: its length still fits the file.
    bytes[valid_end as usize + 40] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();

    let (journal, report, seen) = open(tmp.path());
    assert_eq!(
        seen,
        written[..3].iter().map(Item::seen).collect::<Vec<_>>()
    );
    assert_eq!(report.torn_tails.len(), 1);
    assert_eq!(report.torn_tails[0].offset, valid_end);
    assert_eq!(
        report.torn_tails[0].reason,
        format::RecordError::Checksum.to_string()
    );
    assert_eq!(report.damaged_copies.len(), 1);
    assert_eq!(std::fs::read(&report.damaged_copies[0]).unwrap(), bytes);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), valid_end);
    drop(journal);
}

#[test]
fn segment_cut_inside_its_header_is_truncated_to_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let header = format::encode_header(Header {
        epoch: 5,
        segment: 1,
    });
    let path = tmp.path().join("00000000000000000001.seg");
    std::fs::write(&path, &header[..20]).unwrap();

    let (journal, report, seen) = open(tmp.path());
    assert!(seen.is_empty());
    assert_eq!(report.torn_tails.len(), 1);
    assert_eq!(
        (report.torn_tails[0].offset, report.torn_tails[0].len),
        (0, 20)
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    journal.close().unwrap();
    assert!(!path.exists());
}
