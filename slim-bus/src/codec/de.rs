//! Deserializers from flat stream fields to an event value.

use std::fmt;
use std::str::FromStr;

use serde::de::value::BorrowedStrDeserializer;
use serde::de::{self, DeserializeSeed, Visitor};
use serde::forward_to_deserialize_any;
use serde_json::de::SliceRead;

use super::CodecError;

/// Deserializes a whole entry; it presents the fields as a map.
pub(super) struct EventDeserializer<I> {
    fields: I,
}

impl<'de, I: Iterator<Item = (&'de [u8], &'de [u8])>> EventDeserializer<I> {
    /// Reads the entry's `(name, value)` pairs.
    pub(super) fn new(fields: I) -> Self {
        Self { fields }
    }
}

impl<'de, I: Iterator<Item = (&'de [u8], &'de [u8])>> de::Deserializer<'de>
    for EventDeserializer<I>
{
    type Error = CodecError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        visitor.visit_map(FieldsAccess {
            rest: self.fields,
            current: None,
        })
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        visitor.visit_unit()
    }

    // Structs and maps both read the fields as a map; anything else gets a map
    // too and reports the type mismatch itself.
    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct seq tuple tuple_struct map struct
        enum identifier
    }
}

/// Walks an entry's fields, handing out names as keys and values as values.
struct FieldsAccess<'de, I> {
    rest: I,
    /// The field whose name was just handed out, awaiting its value.
    current: Option<(&'de str, &'de [u8])>,
}

impl<'de, I: Iterator<Item = (&'de [u8], &'de [u8])>> de::MapAccess<'de> for FieldsAccess<'de, I> {
    type Error = CodecError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, CodecError> {
        let Some((name, value)) = self.rest.next() else {
            return Ok(None);
        };
        let name = std::str::from_utf8(name).map_err(|_| {
            CodecError::new(format!("field name `{}` is not valid UTF-8", Shown(name)))
        })?;
        self.current = Some((name, value));
        // Keys go through the value deserializer so that maps keyed by integers,
        // chars or enums decode what the serializer wrote for them.
        seed.deserialize(ValueDeserializer::from_str(name))
            .map(Some)
            .map_err(|error| error.in_field(name))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, CodecError> {
        let (name, value) = self
            .current
            .take()
            .ok_or_else(|| CodecError::new("field value requested before its name"))?;
        seed.deserialize(ValueDeserializer::from_bytes(value))
            .map_err(|error| error.in_field(name))
    }

    fn size_hint(&self) -> Option<usize> {
        match self.rest.size_hint() {
            (len, Some(max)) if len == max => Some(len),
            _ => None,
        }
    }
}

/// Shows a value in an error message: lossy UTF-8, cut short so a large
/// payload does not flood the logs.
struct Shown<'a>(&'a [u8]);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX_CHARS: usize = 64;
        let text = String::from_utf8_lossy(self.0);
        let mut chars = text.chars();
        for c in chars.by_ref().take(MAX_CHARS) {
            fmt::Write::write_char(f, c)?;
        }
        if chars.next().is_some() {
            f.write_str("...")?;
        }
        Ok(())
    }
}

/// Whether a field value is a JSON object or array (checked whole: text such as
/// `[draft] notes` stays text).
fn is_json_container(bytes: &[u8]) -> bool {
    matches!(bytes.first(), Some(b'{' | b'['))
        && serde_json::from_slice::<de::IgnoredAny>(bytes).is_ok()
}

fn json_error(error: serde_json::Error) -> CodecError {
    match error.classify() {
        // A type mismatch inside valid JSON is not "invalid JSON".
        serde_json::error::Category::Data => CodecError::new(error.to_string()),
        _ => CodecError::new(format!("invalid JSON: {error}")),
    }
}

/// Deserializes one field value (or a field name used as a map key), parsing
/// the bytes according to the type asked for.
struct ValueDeserializer<'de> {
    bytes: &'de [u8],
    /// The bytes as text, when they are already known to be UTF-8.
    text: Option<&'de str>,
}

impl<'de> ValueDeserializer<'de> {
    fn from_bytes(bytes: &'de [u8]) -> Self {
        Self { bytes, text: None }
    }

    fn from_str(text: &'de str) -> Self {
        Self {
            bytes: text.as_bytes(),
            text: Some(text),
        }
    }

    fn text(&self) -> Result<&'de str, CodecError> {
        match self.text {
            Some(text) => Ok(text),
            None => std::str::from_utf8(self.bytes)
                .map_err(|_| CodecError::new("value is not valid UTF-8")),
        }
    }

    /// Parses the value as a number of type `T`, named `type_name` in errors.
    fn parse<T: FromStr<Err: fmt::Display>>(&self, type_name: &str) -> Result<T, CodecError> {
        let text = self.text().map_err(|_| {
            CodecError::new(format!(
                "value is not valid UTF-8: `{}` is not {type_name}",
                Shown(self.bytes)
            ))
        })?;
        text.parse().map_err(|error| {
            CodecError::new(format!(
                "{error}: `{}` is not {type_name}",
                Shown(self.bytes)
            ))
        })
    }

    /// Hands a nested value to serde_json, which must consume all of it.
    fn json<T>(
        self,
        parse: impl FnOnce(&mut serde_json::Deserializer<SliceRead<'de>>) -> serde_json::Result<T>,
    ) -> Result<T, CodecError> {
        let mut json = serde_json::Deserializer::from_slice(self.bytes);
        let value = parse(&mut json).map_err(json_error)?;
        json.end().map_err(json_error)?;
        Ok(value)
    }
}

/// Generates number `deserialize_*` methods that parse the text and visit the result.
macro_rules! parse_number {
    ($($method:ident => $visit:ident($ty:ty, $type_name:literal);)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
            visitor.$visit(self.parse::<$ty>($type_name)?)
        }
    )*};
}

/// Generates `deserialize_*` methods for nested values, read as JSON.
macro_rules! forward_json {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {$(
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, CodecError> {
            self.json(|json| de::Deserializer::$method(json, $($arg,)* visitor))
        }
    )*};
}

impl<'de> de::Deserializer<'de> for ValueDeserializer<'de> {
    type Error = CodecError;

    /// The wire carries no types, so "anything" is the text (or raw bytes), except a value
    /// that is a JSON object or array: the encoder writes nested values so, and serde asks
    /// for "anything" when it buffers a tagged or untagged enum (`#[serde(tag = "...")]`,
    /// `#[serde(untagged)]`), which then finds its tag and fields.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        if self.text.is_none() && is_json_container(self.bytes) {
            return self.json(|json| de::Deserializer::deserialize_any(json, visitor));
        }
        match self.text() {
            Ok(text) => visitor.visit_borrowed_str(text),
            Err(_) => visitor.visit_borrowed_bytes(self.bytes),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        // The Go original writes booleans as `1` and `0`.
        match self.bytes {
            b"true" | b"1" => visitor.visit_bool(true),
            b"false" | b"0" => visitor.visit_bool(false),
            other => Err(CodecError::new(format!(
                "`{}` is not a bool (expected `true`, `false`, `1` or `0`)",
                Shown(other)
            ))),
        }
    }

    parse_number! {
        deserialize_i8 => visit_i8(i8, "an i8");
        deserialize_i16 => visit_i16(i16, "an i16");
        deserialize_i32 => visit_i32(i32, "an i32");
        deserialize_i64 => visit_i64(i64, "an i64");
        deserialize_i128 => visit_i128(i128, "an i128");
        deserialize_u8 => visit_u8(u8, "a u8");
        deserialize_u16 => visit_u16(u16, "a u16");
        deserialize_u32 => visit_u32(u32, "a u32");
        deserialize_u64 => visit_u64(u64, "a u64");
        deserialize_u128 => visit_u128(u128, "a u128");
        deserialize_f32 => visit_f32(f32, "an f32");
        deserialize_f64 => visit_f64(f64, "an f64");
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        let text = self.text()?;
        let mut chars = text.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => visitor.visit_char(c),
            _ => Err(CodecError::new(format!(
                "`{}` is not a single character",
                Shown(self.bytes)
            ))),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        visitor.visit_borrowed_str(self.text()?)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        visitor.visit_borrowed_str(self.text()?)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        visitor.visit_borrowed_str(self.text()?)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        visitor.visit_borrowed_bytes(self.bytes)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        visitor.visit_borrowed_bytes(self.bytes)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        // The Go original writes nil as an empty value.
        if self.bytes.is_empty() {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        // Data variants are written as a JSON object, unit variants as their bare
        // name; a name cannot start with `{`, so the first byte tells them apart.
        if self.bytes.trim_ascii_start().first() == Some(&b'{') {
            self.json(|json| de::Deserializer::deserialize_enum(json, name, variants, visitor))
        } else {
            visitor.visit_enum(BorrowedStrDeserializer::<CodecError>::new(self.text()?))
        }
    }

    forward_json! {
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        visitor.visit_unit()
    }
}
