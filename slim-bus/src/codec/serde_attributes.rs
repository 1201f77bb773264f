//! Round trips of events through stream fields for each of serde's attributes: what the
//! encoder accepts, the decoder reads back the same (or `#[derive(Event)]` rejects it).

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{CodecError, from_fields, to_fields};

/// Encodes `value`, decodes the fields as a consumer reads them, and compares.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(
    value: &T,
) -> Result<(), CodecError> {
    let entry: Vec<(Vec<u8>, Vec<u8>)> = to_fields(value)?
        .into_iter()
        .map(|(name, value)| (name.as_bytes().to_vec(), value))
        .collect();
    let decoded: T = from_fields(&entry)?;
    assert_eq!(&decoded, value);
    Ok(())
}

mod upper {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &str, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&value.to_uppercase())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<String, D::Error> {
        String::deserialize(deserializer).map(|value| value.to_lowercase())
    }
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename = "Renamed", deny_unknown_fields)]
struct ContainerAttributes {
    order_id: u64,
    #[serde(rename = "who")]
    customer_name: String,
    #[serde(alias = "old_total")]
    total_cents: i64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct FieldAttributes {
    #[serde(default)]
    count: u32,
    #[serde(skip)]
    skipped: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    #[serde(with = "upper")]
    code: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tags: Vec<String>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
struct InternallyTagged {
    id: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "Celsius", into = "Celsius")]
struct Temperature {
    millidegrees: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Celsius {
    degrees: f64,
}

impl From<Celsius> for Temperature {
    fn from(value: Celsius) -> Self {
        Temperature {
            millidegrees: (value.degrees * 1000.0).round() as i64,
        }
    }
}

impl From<Temperature> for Celsius {
    fn from(value: Temperature) -> Self {
        Celsius {
            degrees: value.millidegrees as f64 / 1000.0,
        }
    }
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
struct Transparent {
    inner: ContainerAttributes,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
enum InternallyTaggedField {
    Circle { radius: u32 },
    Square { side: u32 },
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c")]
enum AdjacentlyTaggedField {
    Number(u32),
    Text(String),
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum UntaggedField {
    Pair { a: u32, b: u32 },
    // A number or bool variant would not come back: the wire carries no types, and an
    // untagged enum sees every scalar as text.
    Name(String),
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct TaggedFields {
    shape: InternallyTaggedField,
    value: AdjacentlyTaggedField,
    either: UntaggedField,
}

#[test]
fn container_and_field_attributes_round_trip() -> Result<(), CodecError> {
    round_trip(&ContainerAttributes {
        order_id: 7,
        customer_name: "Ann".into(),
        total_cents: -5,
    })?;
    round_trip(&Transparent {
        inner: ContainerAttributes {
            order_id: 1,
            customer_name: "B".into(),
            total_cents: 2,
        },
    })?;
    round_trip(&FieldAttributes {
        count: 3,
        skipped: 0,
        note: None,
        code: "abc".into(),
        tags: vec!["x".into()],
    })?;
    round_trip(&Temperature {
        millidegrees: 21_500,
    })?;
    Ok(())
}

#[test]
fn internally_tagged_structs_round_trip() -> Result<(), CodecError> {
    round_trip(&InternallyTagged { id: 4 })
}

#[test]
fn tagged_and_untagged_enums_in_fields_round_trip() -> Result<(), CodecError> {
    round_trip(&TaggedFields {
        shape: InternallyTaggedField::Circle { radius: 2 },
        value: AdjacentlyTaggedField::Number(3),
        either: UntaggedField::Pair { a: 1, b: 2 },
    })?;
    round_trip(&TaggedFields {
        shape: InternallyTaggedField::Square { side: 5 },
        value: AdjacentlyTaggedField::Text("t".into()),
        either: UntaggedField::Name("nine".into()),
    })
}
