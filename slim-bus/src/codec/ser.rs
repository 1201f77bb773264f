//! Serializers from an event value to flat stream fields.

use std::borrow::Cow;
use std::io;

use serde::Serialize;
use serde::ser::{self, Impossible};

use super::{CodecError, EncodedField};

/// The error for a top-level value that cannot be an entry's field list.
fn not_an_event(kind: &str) -> CodecError {
    CodecError::new(format!(
        "an event must serialize as a struct or a map, not {kind}"
    ))
}

/// The error for a map key that cannot be a field name.
fn not_a_name(kind: &str) -> CodecError {
    CodecError::new(format!(
        "a field name must be a string, a char or an integer, not {kind}"
    ))
}

fn json_error(error: serde_json::Error) -> CodecError {
    CodecError::new(error.to_string())
}

/// Encodes one field value; `None` means the field is left out (the value was `None`).
fn encode_value<T: Serialize + ?Sized>(value: &T) -> Result<Option<Vec<u8>>, CodecError> {
    // Nested values go straight into this buffer as JSON; it only allocates if
    // the value turns out to be nested.
    let mut json_buf = Vec::new();
    let mut json = serde_json::Serializer::new(&mut json_buf);
    let encoded = value.serialize(ValueSerializer { json: &mut json })?;
    Ok(match encoded {
        Encoded::Omitted => None,
        Encoded::Bytes(bytes) => Some(bytes),
        Encoded::Json => Some(json_buf),
    })
}

/// Serializes the top-level event: a struct, a map, or a newtype struct around one.
pub(super) struct EventSerializer;

/// Generates `Serializer` methods that reject a kind of value with `$error`.
macro_rules! reject {
    ($error:ident: $($method:ident($($arg:ident: $ty:ty),*) => $kind:expr;)*) => {$(
        fn $method(self, $($arg: $ty),*) -> Result<Self::Ok, CodecError> {
            $(let _ = $arg;)*
            Err($error(&$kind))
        }
    )*};
}

impl ser::Serializer for EventSerializer {
    type Ok = Vec<EncodedField>;
    type Error = CodecError;
    type SerializeSeq = Impossible<Self::Ok, CodecError>;
    type SerializeTuple = Impossible<Self::Ok, CodecError>;
    type SerializeTupleStruct = Impossible<Self::Ok, CodecError>;
    type SerializeTupleVariant = Impossible<Self::Ok, CodecError>;
    type SerializeMap = MapFields;
    type SerializeStruct = StructFields;
    type SerializeStructVariant = Impossible<Self::Ok, CodecError>;

    reject! { not_an_event:
        serialize_bool(v: bool) => "a bool";
        serialize_i8(v: i8) => "an i8";
        serialize_i16(v: i16) => "an i16";
        serialize_i32(v: i32) => "an i32";
        serialize_i64(v: i64) => "an i64";
        serialize_i128(v: i128) => "an i128";
        serialize_u8(v: u8) => "a u8";
        serialize_u16(v: u16) => "a u16";
        serialize_u32(v: u32) => "a u32";
        serialize_u64(v: u64) => "a u64";
        serialize_u128(v: u128) => "a u128";
        serialize_f32(v: f32) => "an f32";
        serialize_f64(v: f64) => "an f64";
        serialize_char(v: char) => "a char";
        serialize_str(v: &str) => "a string";
        serialize_bytes(v: &[u8]) => "bytes";
        serialize_none() => "an option";
        serialize_unit() => "unit";
        serialize_unit_struct(name: &'static str) => format!("the unit struct `{name}`");
        serialize_unit_variant(name: &'static str, index: u32, variant: &'static str)
            => format!("the enum variant `{name}::{variant}`");
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result<Self::Ok, CodecError> {
        Err(not_an_event("an option"))
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Self::Ok, CodecError> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        _value: &T,
    ) -> Result<Self::Ok, CodecError> {
        Err(not_an_event(&format!(
            "the enum variant `{name}::{variant}`"
        )))
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, CodecError> {
        Err(not_an_event("a sequence"))
    }

    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, CodecError> {
        Err(not_an_event("a tuple"))
    }

    fn serialize_tuple_struct(
        self,
        name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct, CodecError> {
        Err(not_an_event(&format!("the tuple struct `{name}`")))
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, CodecError> {
        Err(not_an_event(&format!(
            "the enum variant `{name}::{variant}`"
        )))
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap, CodecError> {
        Ok(MapFields {
            fields: Vec::with_capacity(len.unwrap_or(0)),
            pending_key: None,
        })
    }

    fn serialize_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStruct, CodecError> {
        Ok(StructFields {
            fields: Vec::with_capacity(len),
        })
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, CodecError> {
        Err(not_an_event(&format!(
            "the enum variant `{name}::{variant}`"
        )))
    }
}

/// Collects the fields of a top-level struct.
pub(super) struct StructFields {
    fields: Vec<EncodedField>,
}

impl ser::SerializeStruct for StructFields {
    type Ok = Vec<EncodedField>;
    type Error = CodecError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), CodecError> {
        if let Some(bytes) = encode_value(value).map_err(|error| error.in_field(key))? {
            self.fields.push((Cow::Borrowed(key), bytes));
        }
        Ok(())
    }

    fn end(self) -> Result<Self::Ok, CodecError> {
        Ok(self.fields)
    }
}

/// Collects the entries of a top-level map (or of a struct with flattened fields).
pub(super) struct MapFields {
    fields: Vec<EncodedField>,
    /// The key passed to `serialize_key`, awaiting its `serialize_value`.
    pending_key: Option<Cow<'static, str>>,
}

impl MapFields {
    fn push<T: Serialize + ?Sized>(
        &mut self,
        key: Cow<'static, str>,
        value: &T,
    ) -> Result<(), CodecError> {
        if let Some(bytes) = encode_value(value).map_err(|error| error.in_field(&key))? {
            self.fields.push((key, bytes));
        }
        Ok(())
    }
}

impl ser::SerializeMap for MapFields {
    type Ok = Vec<EncodedField>;
    type Error = CodecError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), CodecError> {
        self.pending_key = Some(key.serialize(KeySerializer)?);
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), CodecError> {
        let key = self
            .pending_key
            .take()
            .ok_or_else(|| CodecError::new("map value serialized before its key"))?;
        self.push(key, value)
    }

    fn serialize_entry<K: Serialize + ?Sized, V: Serialize + ?Sized>(
        &mut self,
        key: &K,
        value: &V,
    ) -> Result<(), CodecError> {
        let key = key.serialize(KeySerializer)?;
        self.push(key, value)
    }

    fn end(self) -> Result<Self::Ok, CodecError> {
        Ok(self.fields)
    }
}

/// Turns a top-level map key into a field name.
struct KeySerializer;

/// Generates `Serializer` methods that render a key as its `Display` text.
macro_rules! key_display {
    ($($method:ident($ty:ty);)*) => {$(
        fn $method(self, v: $ty) -> Result<Self::Ok, CodecError> {
            Ok(Cow::Owned(v.to_string()))
        }
    )*};
}

impl ser::Serializer for KeySerializer {
    type Ok = Cow<'static, str>;
    type Error = CodecError;
    type SerializeSeq = Impossible<Self::Ok, CodecError>;
    type SerializeTuple = Impossible<Self::Ok, CodecError>;
    type SerializeTupleStruct = Impossible<Self::Ok, CodecError>;
    type SerializeTupleVariant = Impossible<Self::Ok, CodecError>;
    type SerializeMap = Impossible<Self::Ok, CodecError>;
    type SerializeStruct = Impossible<Self::Ok, CodecError>;
    type SerializeStructVariant = Impossible<Self::Ok, CodecError>;

    key_display! {
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
        serialize_char(char);
        serialize_str(&str);
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Self::Ok, CodecError> {
        Ok(Cow::Borrowed(variant))
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Self::Ok, CodecError> {
        value.serialize(self)
    }

    reject! { not_a_name:
        serialize_bool(v: bool) => "a bool";
        serialize_f32(v: f32) => "an f32";
        serialize_f64(v: f64) => "an f64";
        serialize_bytes(v: &[u8]) => "bytes";
        serialize_none() => "an option";
        serialize_unit() => "unit";
        serialize_unit_struct(name: &'static str) => format!("the unit struct `{name}`");
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result<Self::Ok, CodecError> {
        Err(not_a_name("an option"))
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        _value: &T,
    ) -> Result<Self::Ok, CodecError> {
        Err(not_a_name(&format!("the enum variant `{name}::{variant}`")))
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, CodecError> {
        Err(not_a_name("a sequence"))
    }

    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, CodecError> {
        Err(not_a_name("a tuple"))
    }

    fn serialize_tuple_struct(
        self,
        name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct, CodecError> {
        Err(not_a_name(&format!("the tuple struct `{name}`")))
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, CodecError> {
        Err(not_a_name(&format!("the enum variant `{name}::{variant}`")))
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, CodecError> {
        Err(not_a_name("a map"))
    }

    fn serialize_struct(
        self,
        name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStruct, CodecError> {
        Err(not_a_name(&format!("the struct `{name}`")))
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, CodecError> {
        Err(not_a_name(&format!("the enum variant `{name}::{variant}`")))
    }
}

/// What a field value serialized to.
enum Encoded {
    /// `None`: the field is left out of the entry.
    Omitted,
    /// A flat value's bytes.
    Bytes(Vec<u8>),
    /// A nested value, written as JSON into the buffer `encode_value` gave the
    /// JSON serializer (it cannot be returned here: the serializer borrows it).
    Json,
}

/// Serializes one top-level field's value.
struct ValueSerializer<'a, W> {
    /// Where nested values are written as JSON.
    json: &'a mut serde_json::Serializer<W>,
}

/// Generates `Serializer` methods that write a value as its `Display` text.
macro_rules! value_display {
    ($($method:ident($ty:ty);)*) => {$(
        fn $method(self, v: $ty) -> Result<Self::Ok, CodecError> {
            Ok(Encoded::Bytes(v.to_string().into_bytes()))
        }
    )*};
}

impl<'a, W: io::Write> ser::Serializer for ValueSerializer<'a, W> {
    type Ok = Encoded;
    type Error = CodecError;
    type SerializeSeq = JsonCompound<'a, W>;
    type SerializeTuple = JsonCompound<'a, W>;
    type SerializeTupleStruct = JsonCompound<'a, W>;
    type SerializeTupleVariant = JsonCompound<'a, W>;
    type SerializeMap = JsonCompound<'a, W>;
    type SerializeStruct = JsonCompound<'a, W>;
    type SerializeStructVariant = JsonCompound<'a, W>;

    // `Display` of integers is decimal, and of floats the shortest text that
    // parses back to the same value, never in exponent form.
    value_display! {
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
    }

    fn serialize_bool(self, v: bool) -> Result<Self::Ok, CodecError> {
        let text: &[u8] = if v { b"true" } else { b"false" };
        Ok(Encoded::Bytes(text.to_vec()))
    }

    fn serialize_char(self, v: char) -> Result<Self::Ok, CodecError> {
        let mut utf8 = [0; 4];
        Ok(Encoded::Bytes(v.encode_utf8(&mut utf8).as_bytes().to_vec()))
    }

    fn serialize_str(self, v: &str) -> Result<Self::Ok, CodecError> {
        Ok(Encoded::Bytes(v.as_bytes().to_vec()))
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<Self::Ok, CodecError> {
        Ok(Encoded::Bytes(v.to_vec()))
    }

    fn serialize_none(self) -> Result<Self::Ok, CodecError> {
        Ok(Encoded::Omitted)
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Self::Ok, CodecError> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<Self::Ok, CodecError> {
        Ok(Encoded::Bytes(Vec::new()))
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<Self::Ok, CodecError> {
        Ok(Encoded::Bytes(Vec::new()))
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Self::Ok, CodecError> {
        Ok(Encoded::Bytes(variant.as_bytes().to_vec()))
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Self::Ok, CodecError> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Self::Ok, CodecError> {
        ser::Serializer::serialize_newtype_variant(self.json, name, index, variant, value)
            .map_err(json_error)?;
        Ok(Encoded::Json)
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq, CodecError> {
        ser::Serializer::serialize_seq(self.json, len)
            .map(JsonCompound)
            .map_err(json_error)
    }

    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, CodecError> {
        ser::Serializer::serialize_tuple(self.json, len)
            .map(JsonCompound)
            .map_err(json_error)
    }

    fn serialize_tuple_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct, CodecError> {
        ser::Serializer::serialize_tuple_struct(self.json, name, len)
            .map(JsonCompound)
            .map_err(json_error)
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, CodecError> {
        ser::Serializer::serialize_tuple_variant(self.json, name, index, variant, len)
            .map(JsonCompound)
            .map_err(json_error)
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap, CodecError> {
        ser::Serializer::serialize_map(self.json, len)
            .map(JsonCompound)
            .map_err(json_error)
    }

    fn serialize_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStruct, CodecError> {
        ser::Serializer::serialize_struct(self.json, name, len)
            .map(JsonCompound)
            .map_err(json_error)
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, CodecError> {
        ser::Serializer::serialize_struct_variant(self.json, name, index, variant, len)
            .map(JsonCompound)
            .map_err(json_error)
    }
}

/// A nested field value being written as JSON: serde_json's own compound
/// serializer, with its errors turned into [`CodecError`]s.
struct JsonCompound<'a, W>(serde_json::ser::Compound<'a, W, serde_json::ser::CompactFormatter>);

/// Implements a serde compound-serializer trait for [`JsonCompound`] by
/// forwarding each `$method(args)` to serde_json.
macro_rules! forward_compound {
    ($($trait:ident { $($method:ident($($arg:ident: $ty:ty),*);)* })*) => {$(
        impl<W: io::Write> ser::$trait for JsonCompound<'_, W> {
            type Ok = Encoded;
            type Error = CodecError;

            $(fn $method<T: Serialize + ?Sized>(&mut self, $($arg: $ty,)* value: &T) -> Result<(), CodecError> {
                ser::$trait::$method(&mut self.0, $($arg,)* value).map_err(json_error)
            })*

            fn end(self) -> Result<Encoded, CodecError> {
                ser::$trait::end(self.0).map_err(json_error)?;
                Ok(Encoded::Json)
            }
        }
    )*};
}

forward_compound! {
    SerializeSeq { serialize_element(); }
    SerializeTuple { serialize_element(); }
    SerializeTupleStruct { serialize_field(); }
    SerializeTupleVariant { serialize_field(); }
    SerializeStruct { serialize_field(key: &'static str); }
    SerializeStructVariant { serialize_field(key: &'static str); }
}

impl<W: io::Write> ser::SerializeMap for JsonCompound<'_, W> {
    type Ok = Encoded;
    type Error = CodecError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), CodecError> {
        ser::SerializeMap::serialize_key(&mut self.0, key).map_err(json_error)
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), CodecError> {
        ser::SerializeMap::serialize_value(&mut self.0, value).map_err(json_error)
    }

    fn end(self) -> Result<Encoded, CodecError> {
        ser::SerializeMap::end(self.0).map_err(json_error)?;
        Ok(Encoded::Json)
    }
}
