use std::collections::{BTreeMap, HashMap};

use serde::{Serialize, Serializer};

use super::{json_len, json_len_bound};
use crate::test_rng::Xorshift as Rng;

/// Strings drawn on the tests' generator.
impl Rng {
    /// A string from an alphabet of every kind serde_json treats differently: plain ASCII,
    /// the characters it escapes with a backslash, control characters it writes as `\u00XX`,
    /// DEL (not escaped), and two- to four-byte UTF-8.
    fn text(&mut self) -> String {
        const ALPHABET: &[char] = &[
            'a', 'Z', ' ', '0', '"', '\\', '/', '\n', '\r', '\t', '\u{8}', '\u{c}', '\u{0}',
            '\u{1}', '\u{1f}', '\u{7f}', 'é', '€', '𝄞',
        ];
        let len = self.below(40);
        (0..len)
            .map(|_| ALPHABET[self.below(ALPHABET.len() as u64) as usize])
            .collect()
    }
}

/// Bytes that serialize as bytes (not as a sequence of numbers, which `Vec<u8>` does).
struct Bytes(Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

#[derive(Serialize)]
struct Unit;

#[derive(Serialize)]
struct Name(String);

#[derive(Serialize)]
enum Shape {
    Unit,
    Newtype(String),
    Tuple(i64, u8),
    Struct { a: Option<u32>, b: Vec<String> },
}

#[derive(Serialize)]
struct Order {
    id: u64,
    neg: i64,
    big: u128,
    small: i128,
    tiny: i8,
    name: Name,
    tags: Vec<String>,
    empty: Vec<u32>,
    meta: BTreeMap<String, String>,
    keyed_by_newtype: BTreeMap<String, Name>,
    shape: Shape,
    nested: Option<Box<Order>>,
    letter: char,
    pair: (bool, ()),
    bytes: Bytes,
    numbers: Vec<u8>,
    unit: Unit,
}

fn order(rng: &mut Rng, depth: u32) -> Order {
    let ints = [0, 1, 9, 10, 99, 100, u64::MAX, rng.next()];
    let pick = |rng: &mut Rng| ints[rng.below(ints.len() as u64) as usize];
    Order {
        id: pick(rng),
        neg: -((pick(rng) >> 1) as i64) - i64::from(rng.below(2) == 0),
        big: u128::from(pick(rng)) * u128::from(pick(rng)),
        small: [i128::MIN, i128::MAX, -1, 0][rng.below(4) as usize],
        tiny: rng.next() as i8,
        name: Name(rng.text()),
        tags: (0..rng.below(4)).map(|_| rng.text()).collect(),
        empty: Vec::new(),
        meta: (0..rng.below(4))
            .map(|_| (rng.text(), rng.text()))
            .collect(),
        keyed_by_newtype: (0..rng.below(3))
            .map(|_| (rng.text(), Name(rng.text())))
            .collect(),
        shape: match rng.below(4) {
            0 => Shape::Unit,
            1 => Shape::Newtype(rng.text()),
            2 => Shape::Tuple(rng.next() as i64, rng.next() as u8),
            _ => Shape::Struct {
                a: (rng.below(2) == 0).then(|| rng.next() as u32),
                b: (0..rng.below(3)).map(|_| rng.text()).collect(),
            },
        },
        nested: (depth < 2 && rng.below(2) == 0).then(|| Box::new(order(rng, depth + 1))),
        letter: rng.text().chars().next().unwrap_or('"'),
        pair: (rng.below(2) == 0, ()),
        bytes: Bytes((0..rng.below(6)).map(|_| rng.next() as u8).collect()),
        numbers: (0..rng.below(6)).map(|_| rng.next() as u8).collect(),
        unit: Unit,
    }
}

#[test]
fn the_count_is_the_length_serde_json_writes() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..5_000 {
        let order = order(&mut rng, 0);
        let written = serde_json::to_vec(&order).unwrap();
        assert_eq!(
            json_len(&order),
            Some(written.len()),
            "{}",
            String::from_utf8_lossy(&written)
        );
    }
    for value in [0, -1, i128::MIN, i128::from(i64::MIN), i128::from(u64::MAX)] {
        assert_eq!(json_len(&value), Some(value.to_string().len()));
    }
    assert_eq!(json_len(&u128::MAX), Some(u128::MAX.to_string().len()));
    for value in ["", "\"", "\\", "\u{0}", "\u{7f}", "𝄞"] {
        assert_eq!(
            json_len(value),
            Some(serde_json::to_vec(value).unwrap().len())
        );
    }
}

#[test]
fn the_bound_is_never_below_the_length_serde_json_writes() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for _ in 0..5_000 {
        let order = order(&mut rng, 0);
        let written = serde_json::to_vec(&order).unwrap().len();
        let bound = json_len_bound(&order).unwrap();
        assert!(bound >= written, "{bound} < {written}");
    }
    // The worst case, met: every byte a control character written as `\u00XX`.
    for len in [1, 32, 33, 50] {
        let controls = "\u{1}".repeat(len);
        assert_eq!(
            json_len_bound(&controls),
            Some(serde_json::to_vec(&controls).unwrap().len())
        );
    }
    // Short strings are bounded, longer ones counted.
    assert_eq!(json_len_bound(&"a".repeat(32)), Some(32 * 6 + 2));
    assert_eq!(json_len_bound(&"a".repeat(33)), Some(33 + 2));
    for (value, bound) in [(u64::MAX, 20), (0, 20)] {
        assert_eq!(json_len_bound(&value), Some(bound));
    }
    assert_eq!(json_len_bound(&i64::MIN), Some(20));
    assert_eq!(json_len_bound(&u128::MAX), Some(39));
    assert_eq!(json_len_bound(&i128::MIN), Some(40));
    let bytes = Bytes(vec![255; 10]);
    assert!(json_len_bound(&bytes) >= json_len(&bytes));
    // It gives up where the exact count does.
    assert_eq!(json_len_bound(&1.5f64), None);
    let int_keys: HashMap<u32, u32> = [(1, 2)].into_iter().collect();
    assert_eq!(json_len_bound(&int_keys), None);
    assert_eq!(json_len_bound(&vec![Refuses]), None);
}

/// A value whose `Serialize` fails.
struct Refuses;

impl Serialize for Refuses {
    fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("no"))
    }
}

#[test]
fn it_gives_up_where_it_would_have_to_copy_serde_json_or_the_value_fails() {
    assert_eq!(
        json_len(&1.5f64),
        None,
        "floats: serde_json's shortest form"
    );
    assert_eq!(json_len(&vec![0.1f32]), None);
    let int_keys: HashMap<u32, u32> = [(1, 2)].into_iter().collect();
    assert_eq!(json_len(&int_keys), None, "serde_json quotes integer keys");
    let tuple_keys: BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into_iter().collect();
    assert_eq!(json_len(&tuple_keys), None, "serde_json refuses these keys");
    assert_eq!(json_len(&vec![Refuses]), None);
    assert_eq!(
        json_len(&Raw),
        None,
        "serde_json writes raw values as they are"
    );
}

/// What serde_json's `RawValue` serializes as.
struct Raw;

impl Serialize for Raw {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_newtype_struct(super::RAW_VALUE, "[1, 2]")
    }
}

#[test]
fn a_byte_to_escape_is_found_wherever_it_is_in_a_string() {
    for special in [
        '"', '\\', '\n', '\u{0}', '\u{1f}', '\u{7f}', 'é', ' ', '!', '#', '[', ']',
    ] {
        for len in 0..24 {
            for at in 0..len {
                let mut text: String = "a".repeat(len);
                text.replace_range(at..=at, &special.to_string());
                let written = serde_json::to_vec(&text).unwrap().len();
                assert_eq!(json_len(&text), Some(written), "{text:?}");
            }
        }
    }
}
