//! The length of serde_json's compact encoding of a value, counted without writing it.
//!
//! `submit` needs a payload's encoded size (against the record limit, and for the spill
//! reserve) but not its bytes: in the default mode the task is held as it is and encoded only
//! if it is spilled. Counting serde_json's output through a writer costs about as much as
//! encoding (every string escaped piece by piece); this serializer walks the value once and
//! adds up lengths instead (a string with nothing to escape is its length plus two).
//!
//! Two counts: the exact length ([`json_len`]), and an upper bound ([`json_len_bound`]) that
//! reads no short string's bytes (up to [`SHORT`]: each byte escapes to at most six,
//! `\u00XX`) and counts every integer at its type's widest; longer strings are counted exactly.
//! `submit` accepts on the bound when it is within the limit and counts exactly only when it
//! is not.
//!
//! It follows serde_json's compact format exactly for what it counts, and gives up (`None`,
//! and the caller encodes into a counting sink) wherever following it would mean copying
//! serde_json's internals: floats (their shortest form), map keys other than strings (serde_json
//! quotes some and refuses others), and serde_json's raw values. It gives up too when the
//! value's own `Serialize` fails, so that the real encoding reports the error.

use std::fmt;

use serde::Serialize;
use serde::ser::{self, Impossible};

/// The exact length of `serde_json::to_writer(value)`'s output, or `None` where this count
/// does not follow serde_json (see the module's documentation).
pub(crate) fn json_len<T: Serialize + ?Sized>(value: &T) -> Option<usize> {
    count(value, false)
}

/// At least the length of `serde_json::to_writer(value)`'s output (saturating at
/// `usize::MAX`): strings of at most [`SHORT`] bytes count as six bytes a byte without being
/// read, integers as their type's widest. `None` where [`json_len`] is.
pub(crate) fn json_len_bound<T: Serialize + ?Sized>(value: &T) -> Option<usize> {
    count(value, true)
}

fn count<T: Serialize + ?Sized>(value: &T, bound: bool) -> Option<usize> {
    let mut len = Len { n: 0, bound };
    value.serialize(&mut len).ok()?;
    Some(len.n)
}

/// The bytes serde_json adds to escape `byte` in a string: `\"`, `\\` and the short forms of
/// five control characters add one; the other control characters (`\u00XX`) add five.
const fn escape_extra(byte: u8) -> u8 {
    match byte {
        b'"' | b'\\' | 0x08 | 0x09 | 0x0A | 0x0C | 0x0D => 1,
        0x00..=0x1F => 5,
        _ => 0,
    }
}

/// The longest string the bound counts without reading it: a longer one is counted exactly
/// (the scan costs about as much as the rest of its handling then), so the bound exceeds the
/// exact length by at most five bytes a byte of such short strings.
const SHORT: usize = 32;

/// `s` as a JSON string: exactly, or (`bound`, when at most [`SHORT`] bytes) at most six
/// bytes a byte (the longest escape, `\u00XX`) and the quotes.
#[inline]
fn str_len_as(s: &str, bound: bool) -> usize {
    if bound && s.len() <= SHORT {
        s.len() * 6 + 2
    } else {
        str_len(s)
    }
}

/// `s` as a JSON string: its quotes, its bytes, and what escaping adds.
fn str_len(s: &str) -> usize {
    let bytes = s.as_bytes();
    let extra: usize = if any_to_escape(bytes) {
        bytes.iter().map(|&b| usize::from(escape_extra(b))).sum()
    } else {
        0
    };
    s.len() + 2 + extra
}

/// Whether any byte needs escaping: eight bytes at a time (most strings have none). The tail
/// is the last eight bytes, overlapping the words before (only whether any byte needs escaping
/// is asked); a string shorter than eight is read as one word of overlapping pieces.
fn any_to_escape(bytes: &[u8]) -> bool {
    let n = bytes.len();
    let word = |at: usize| {
        let eight = bytes.get(at..at + 8).and_then(|b| b.try_into().ok());
        u64::from_ne_bytes(eight.unwrap_or([0; 8]))
    };
    if n >= 8 {
        let mut at = 0;
        while at + 8 <= n {
            if word_to_escape(word(at)) {
                return true;
            }
            at += 8;
        }
        return at < n && word_to_escape(word(n - 8));
    }
    let half = |at: usize| {
        let four = bytes.get(at..at + 4).and_then(|b| b.try_into().ok());
        u32::from_ne_bytes(four.unwrap_or([0; 4]))
    };
    let word = match n {
        0 => return false,
        // Bytes 0, n/2 and n-1 are all the bytes; the rest repeats byte 0.
        1..=3 => u64::from_ne_bytes([
            bytes[0],
            bytes[n / 2],
            bytes[n - 1],
            bytes[0],
            bytes[0],
            bytes[0],
            bytes[0],
            bytes[0],
        ]),
        _ => u64::from(half(0)) | u64::from(half(n - 4)) << 32,
    };
    word_to_escape(word)
}

/// Whether any of the eight bytes of `word` needs escaping.
#[inline]
fn word_to_escape(word: u64) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // A high bit set in each byte of `word` that is below `n` (for n <= 0x80; exact as to
    // whether any is).
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS;
    below(word, 0x20)
        | below(word ^ (ONES * u64::from(b'"')), 1)
        | below(word ^ (ONES * u64::from(b'\\')), 1)
        != 0
}

/// Decimal digits of `n`, with a minus sign if `negative`.
fn int_len(n: u128, negative: bool) -> usize {
    // Most integers fit 64 bits, whose logarithm is several times cheaper.
    let log = match u64::try_from(n) {
        Ok(n) => n.checked_ilog10(),
        Err(_) => n.checked_ilog10(),
    };
    log.map_or(1, |d| d as usize + 1) + usize::from(negative)
}

/// The name serde_json gives the newtype struct of a raw value (written as it is).
const RAW_VALUE: &str = "$serde_json::private::RawValue";

/// Nothing to count: the value's `Serialize` failed, or this count does not follow serde_json.
#[derive(Debug)]
pub(crate) struct GiveUp;

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no length counted")
    }
}

impl std::error::Error for GiveUp {}

impl ser::Error for GiveUp {
    fn custom<M: fmt::Display>(_: M) -> Self {
        Self
    }
}

/// The serializer: the bytes counted so far, exactly or (`bound`) at most.
struct Len {
    n: usize,
    bound: bool,
}

/// A sequence or map being counted: commas go between its elements.
struct Compound<'a> {
    len: &'a mut Len,
    first: bool,
}

impl Compound<'_> {
    fn comma(&mut self) {
        if !self.first {
            self.len.add(1);
        }
        self.first = false;
    }

    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), GiveUp> {
        self.comma();
        value.serialize(&mut *self.len)
    }

    /// `"key":` then the value.
    #[inline]
    fn field<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<(), GiveUp> {
        self.comma();
        self.len.add(self.len.str_len(key).saturating_add(1));
        value.serialize(&mut *self.len)
    }
}

impl Len {
    #[inline]
    fn add(&mut self, n: usize) {
        self.n = self.n.saturating_add(n);
    }

    /// A string's length: exact, or its bound.
    #[inline]
    fn str_len(&self, s: &str) -> usize {
        str_len_as(s, self.bound)
    }

    /// Opens a sequence or map (its two brackets counted now).
    fn open(&mut self) -> Compound<'_> {
        self.add(2);
        Compound {
            len: self,
            first: true,
        }
    }

    /// `{"variant":` and its closing `}`, before a variant's content.
    fn variant(&mut self, variant: &str) {
        self.add(self.str_len(variant).saturating_add(3));
    }
}

/// Integer methods that count their value as the widest integer of its sign.
macro_rules! widen {
    ($($($method:ident($ty:ty)),* => $wide:ident;)*) => {$($(
        #[inline]
        fn $method(self, v: $ty) -> Result<(), GiveUp> {
            self.$wide(v.into())
        }
    )*)*};
}

impl<'a> ser::Serializer for &'a mut Len {
    type Ok = ();
    type Error = GiveUp;
    type SerializeSeq = Compound<'a>;
    type SerializeTuple = Compound<'a>;
    type SerializeTupleStruct = Compound<'a>;
    type SerializeTupleVariant = Compound<'a>;
    type SerializeMap = Compound<'a>;
    type SerializeStruct = Compound<'a>;
    type SerializeStructVariant = Compound<'a>;

    fn serialize_bool(self, v: bool) -> Result<(), GiveUp> {
        self.add(if v { 4 } else { 5 });
        Ok(())
    }

    widen! {
        serialize_i8(i8), serialize_i16(i16), serialize_i32(i32), serialize_i64(i64) => serialize_i128;
        serialize_u8(u8), serialize_u16(u16), serialize_u32(u32), serialize_u64(u64) => serialize_u128;
    }

    #[inline]
    fn serialize_i128(self, v: i128) -> Result<(), GiveUp> {
        self.add(match (self.bound, i64::try_from(v)) {
            // `-9223372036854775808`; `i128::MIN`.
            (true, Ok(_)) => 20,
            (true, Err(_)) => 40,
            (false, _) => int_len(v.unsigned_abs(), v < 0),
        });
        Ok(())
    }

    #[inline]
    fn serialize_u128(self, v: u128) -> Result<(), GiveUp> {
        self.add(match (self.bound, u64::try_from(v)) {
            // `u64::MAX`; `u128::MAX`.
            (true, Ok(_)) => 20,
            (true, Err(_)) => 39,
            (false, _) => int_len(v, false),
        });
        Ok(())
    }

    fn serialize_f32(self, _: f32) -> Result<(), GiveUp> {
        Err(GiveUp)
    }

    fn serialize_f64(self, _: f64) -> Result<(), GiveUp> {
        Err(GiveUp)
    }

    fn serialize_char(self, v: char) -> Result<(), GiveUp> {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }

    #[inline]
    fn serialize_str(self, v: &str) -> Result<(), GiveUp> {
        self.add(self.str_len(v));
        Ok(())
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<(), GiveUp> {
        // An array of numbers.
        let digits: usize = v.iter().map(|&b| int_len(b.into(), false)).sum();
        self.add(2 + digits + v.len().saturating_sub(1));
        Ok(())
    }

    fn serialize_none(self) -> Result<(), GiveUp> {
        self.serialize_unit()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), GiveUp> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), GiveUp> {
        self.add(4); // null
        Ok(())
    }

    fn serialize_unit_struct(self, _: &'static str) -> Result<(), GiveUp> {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<(), GiveUp> {
        self.serialize_str(variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<(), GiveUp> {
        if name == RAW_VALUE {
            return Err(GiveUp);
        }
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), GiveUp> {
        self.variant(variant);
        value.serialize(self)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Compound<'a>, GiveUp> {
        Ok(self.open())
    }

    fn serialize_tuple(self, _: usize) -> Result<Compound<'a>, GiveUp> {
        Ok(self.open())
    }

    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Compound<'a>, GiveUp> {
        Ok(self.open())
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'a>, GiveUp> {
        self.variant(variant);
        Ok(self.open())
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Compound<'a>, GiveUp> {
        Ok(self.open())
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Compound<'a>, GiveUp> {
        Ok(self.open())
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'a>, GiveUp> {
        self.variant(variant);
        Ok(self.open())
    }
}

/// The sequence-like compounds: elements between commas.
macro_rules! elements {
    ($($kind:ident::$method:ident),*) => {$(
        impl ser::$kind for Compound<'_> {
            type Ok = ();
            type Error = GiveUp;

            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), GiveUp> {
                self.element(value)
            }

            fn end(self) -> Result<(), GiveUp> {
                Ok(())
            }
        }
    )*};
}

elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

/// The struct-like compounds: `"field":value` between commas.
macro_rules! fields {
    ($($kind:ident),*) => {$(
        impl ser::$kind for Compound<'_> {
            type Ok = ();
            type Error = GiveUp;

            #[inline]
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), GiveUp> {
                self.field(key, value)
            }

            fn end(self) -> Result<(), GiveUp> {
                Ok(())
            }
        }
    )*};
}

fields!(SerializeStruct, SerializeStructVariant);

impl ser::SerializeMap for Compound<'_> {
    type Ok = ();
    type Error = GiveUp;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), GiveUp> {
        self.comma();
        self.len
            .add(key.serialize(StrKey(self.len.bound))?.saturating_add(1));
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), GiveUp> {
        value.serialize(&mut *self.len)
    }

    fn end(self) -> Result<(), GiveUp> {
        Ok(())
    }
}

/// A map key: counted (exactly, or its bound) only when it is a string (or a newtype around
/// one); any other key gives up, because serde_json quotes some kinds of keys and refuses
/// others.
struct StrKey(bool);

macro_rules! give_up {
    ($($method:ident($($arg:ty),*);)*) => {
        $(fn $method(self, $(_: $arg),*) -> Result<usize, GiveUp> { Err(GiveUp) })*
    };
}

impl ser::Serializer for StrKey {
    type Ok = usize;
    type Error = GiveUp;
    type SerializeSeq = Impossible<usize, GiveUp>;
    type SerializeTuple = Impossible<usize, GiveUp>;
    type SerializeTupleStruct = Impossible<usize, GiveUp>;
    type SerializeTupleVariant = Impossible<usize, GiveUp>;
    type SerializeMap = Impossible<usize, GiveUp>;
    type SerializeStruct = Impossible<usize, GiveUp>;
    type SerializeStructVariant = Impossible<usize, GiveUp>;

    fn serialize_str(self, v: &str) -> Result<usize, GiveUp> {
        Ok(str_len_as(v, self.0))
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<usize, GiveUp> {
        if name == RAW_VALUE {
            return Err(GiveUp);
        }
        value.serialize(self)
    }

    give_up! {
        serialize_bool(bool);
        serialize_i8(i8);
        serialize_i16(i16);
        serialize_i32(i32);
        serialize_i64(i64);
        serialize_i128(i128);
        serialize_u8(u8);
        serialize_u16(u16);
        serialize_u32(u32);
        serialize_u64(u64);
        serialize_u128(u128);
        serialize_f32(f32);
        serialize_f64(f64);
        serialize_char(char);
        serialize_bytes(&[u8]);
        serialize_none();
        serialize_unit();
        serialize_unit_struct(&'static str);
        serialize_unit_variant(&'static str, u32, &'static str);
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<usize, GiveUp> {
        Err(GiveUp)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<usize, GiveUp> {
        Err(GiveUp)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, GiveUp> {
        Err(GiveUp)
    }

    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, GiveUp> {
        Err(GiveUp)
    }

    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, GiveUp> {
        Err(GiveUp)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, GiveUp> {
        Err(GiveUp)
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, GiveUp> {
        Err(GiveUp)
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, GiveUp> {
        Err(GiveUp)
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, GiveUp> {
        Err(GiveUp)
    }
}

#[cfg(test)]
mod tests;
