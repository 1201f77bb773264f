//! Serde <-> the flat field/value pairs of one Redis stream entry.
//!
//! An event's top-level fields become the fields of one stream entry, so that
//! `XRANGE` output stays readable and consumers written in other languages (the
//! Go original among them) can read and write the same entries.
//!
//! # Wire format
//!
//! The top-level value must serialize as a struct or a map (a newtype struct
//! around one is unwrapped; `#[serde(flatten)]` turns a struct into a map, so
//! both work). Each top-level field becomes one stream field, in the order serde
//! hands them over (declaration order for derived structs). Map keys must be
//! strings, chars, integers (as decimal) or unit enum variants (their name).
//!
//! | Rust value                                     | field value bytes                          |
//! |------------------------------------------------|--------------------------------------------|
//! | `String`, `&str`, `char`                       | UTF-8 as is                                |
//! | integers, all widths up to 128 bits            | decimal, e.g. `-7`                         |
//! | `f32`, `f64`                                   | `Display`: `3.5`, `0.1`, `1000000000000000000000`, `NaN`, `inf`, `-inf` |
//! | `bool`                                         | `true` / `false`                           |
//! | `None`                                         | field omitted                              |
//! | `Some(x)`, newtype struct `N(x)`               | as `x`                                     |
//! | `()`, unit struct                              | empty                                      |
//! | unit enum variant                              | variant name (after `rename`)              |
//! | bytes (`serde_bytes`)                          | raw bytes, need not be UTF-8               |
//! | struct, map, sequence, tuple, data enum variant| JSON text, as `serde_json::to_vec` writes  |
//!
//! Names that start with a single `@` are the bus's own (headers as `@h.NAME`,
//! dead-letter metadata): a top-level field whose name starts with `@` is stored
//! with the `@` doubled (`@x` as `@@x`), and decoding reads `@@x` as `@x` and
//! leaves the bus's own fields out.
//!
//! Decoding takes the fields in any order and ignores unknown ones (unless the
//! type says `deny_unknown_fields`). Field values are parsed by the type asked
//! for, and are lenient where the Go original writes something else:
//!
//! - `bool` accepts `true`, `false`, `1` and `0`.
//! - integers accept a leading `+`; no surrounding whitespace.
//! - floats accept anything `str::parse` does (exponents, `NaN`, `inf`).
//! - an empty value is `None` for every `Option<T>`, because the Go original
//!   writes nil as `""`. So `Option<String>` cannot carry `Some("")`: it comes
//!   back as `None`. A missing field is `None` as well.
//! - an enum whose value starts with `{` is read as JSON, anything else as the
//!   name of a unit variant.
//! - strings are borrowed from the input where the type allows (`&'de str`).
//! - a duplicated field name is handed to the type as it is: derived structs
//!   report `duplicate field`, maps keep the last value.
//!
//! Types that ask for "anything" (`deserialize_any`: `serde_json::Value`,
//! untagged and internally tagged enums, the fields of a `#[serde(flatten)]`ed
//! struct) get every value as a string (or as bytes when it is not UTF-8), since
//! the wire carries no types. That keeps untyped events byte-exact when they are
//! re-encoded, but it means a flattened struct decodes only when its fields
//! accept strings, and a `serde_json::Value` field holds the JSON text as a
//! string.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

mod de;
mod ser;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod serde_attributes;
#[cfg(test)]
mod tests;

/// One encoded field: name and value bytes.
pub(crate) type EncodedField = (Cow<'static, str>, Vec<u8>);

/// Encodes `value` as the fields of one stream entry.
///
/// # Errors
///
/// Fails when `value` does not serialize as a struct or a map, when a map key is
/// not string-like, or when the value's own `Serialize` fails; errors raised while
/// encoding a field name that field.
pub(crate) fn to_fields<T: Serialize + ?Sized>(value: &T) -> Result<Vec<EncodedField>, CodecError> {
    let mut fields = value.serialize(ser::EventSerializer)?;
    escape_reserved(&mut fields);
    Ok(fields)
}

/// Doubles the `@` of field names that start with one: the bus reserves the names that
/// start with a single `@` (headers, dead-letter metadata), so an event's own field `@x`
/// is stored as `@@x`, and [`from_pairs`] reads it back as `@x`.
fn escape_reserved(fields: &mut [EncodedField]) {
    for (name, _) in fields {
        if name.starts_with(RESERVED_PREFIX) {
            *name = Cow::Owned(format!("{RESERVED_PREFIX}{name}"));
        }
    }
}

/// What the names of the bus's own fields start with; see [`escape_reserved`].
const RESERVED_PREFIX: &str = "@";

/// An entry's fields as the event's decoder sees them: the bus's own fields (a single
/// leading `@`: headers, metadata) left out, escaped names (`@@x`) as the event wrote
/// them (`@x`).
pub(crate) fn event_pairs<'de>(
    fields: impl Iterator<Item = (&'de [u8], &'de [u8])>,
) -> impl Iterator<Item = (&'de [u8], &'de [u8])> {
    let prefix = RESERVED_PREFIX.as_bytes();
    fields.filter_map(move |(name, value)| match name.strip_prefix(prefix) {
        None => Some((name, value)),
        Some(rest) if rest.starts_with(prefix) => Some((rest, value)),
        Some(_) => None,
    })
}

/// Decodes one stream entry's `(name, value)` pairs into `T`, borrowing strings
/// from `fields` where `T` allows. The bus's own fields are left out (see
/// [`event_pairs`]).
///
/// # Errors
///
/// Fails when a field name is not UTF-8, when a value does not parse as the type
/// its field asks for, or when a required field is missing; errors about a field
/// name it in [`CodecError::field`].
pub(crate) fn from_pairs<'de, T: Deserialize<'de>>(
    fields: impl Iterator<Item = (&'de [u8], &'de [u8])>,
) -> Result<T, CodecError> {
    T::deserialize(de::EventDeserializer::new(event_pairs(fields)))
}

/// [`from_pairs`] over owned pairs.
#[cfg(test)]
pub(crate) fn from_fields<'de, T: Deserialize<'de>>(
    fields: &'de [(Vec<u8>, Vec<u8>)],
) -> Result<T, CodecError> {
    from_pairs(fields.iter().map(|(name, value)| (&name[..], &value[..])))
}

/// Why an event could not be encoded to or decoded from stream fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CodecError {
    /// The top-level field being handled when the error arose, if any.
    pub(crate) field: Option<String>,
    /// What went wrong, lowercase and without a trailing period.
    pub(crate) reason: String,
}

impl CodecError {
    /// An error not (yet) tied to a field.
    fn new(reason: impl Into<String>) -> Self {
        Self {
            field: None,
            reason: reason.into(),
        }
    }

    /// Ties the error to the top-level field `name` as it leaves that field's
    /// (de)serializer.
    ///
    /// An error already naming another field (a user type calling
    /// `missing_field` inside a value, say) keeps that name in the reason, so the
    /// outer field, which is what a user can find in the entry, is the one named.
    fn in_field(mut self, name: &str) -> Self {
        match &self.field {
            None => self.field = Some(name.to_owned()),
            Some(inner) if inner == name => {}
            Some(inner) => {
                self.reason = format!("field `{inner}`: {}", self.reason);
                self.field = Some(name.to_owned());
            }
        }
        self
    }

    /// An error about the top-level field `name`.
    fn for_field(name: &str, reason: impl Into<String>) -> Self {
        Self {
            field: Some(name.to_owned()),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "field `{field}`: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

impl std::error::Error for CodecError {}

impl serde::ser::Error for CodecError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self::new(msg.to_string())
    }
}

impl serde::de::Error for CodecError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self::new(msg.to_string())
    }

    // serde calls these three with the field's name; keeping it in `field`
    // rather than only in the message lets callers report it structurally.
    fn missing_field(field: &'static str) -> Self {
        Self::for_field(field, "missing field")
    }

    fn duplicate_field(field: &'static str) -> Self {
        Self::for_field(field, "duplicate field")
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        let reason = if expected.is_empty() {
            "unknown field, there are no fields".to_owned()
        } else {
            let names: Vec<String> = expected.iter().map(|name| format!("`{name}`")).collect();
            format!("unknown field, expected one of {}", names.join(", "))
        };
        Self::for_field(field, reason)
    }
}
