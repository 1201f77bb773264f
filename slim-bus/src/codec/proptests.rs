//! Property tests of the field codec: any event encodes to fields that decode back to it.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use super::{from_fields, to_fields};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Plan {
    Free,
    ProMonthly,
    Team,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Address {
    city: String,
    zip: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Change {
    Renamed { from: String, to: String },
    Moved(Address),
    Closed,
}

/// An event with a field of every kind the wire format knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Everything {
    text: String,
    letter: char,
    small: i8,
    signed: i64,
    unsigned: u64,
    wide: u128,
    ratio: f64,
    single: f32,
    flag: bool,
    /// Never `Some("")`, which reads back as `None` (documented).
    note: Option<String>,
    count: Option<u16>,
    plan: Plan,
    address: Address,
    tags: Vec<String>,
    scores: BTreeMap<String, i32>,
    pair: (u8, String),
    change: Change,
    changes: Vec<Change>,
}

fn address() -> impl Strategy<Value = Address> {
    (any::<String>(), any::<Option<u32>>()).prop_map(|(city, zip)| Address { city, zip })
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (any::<String>(), any::<String>()).prop_map(|(from, to)| Change::Renamed { from, to }),
        address().prop_map(Change::Moved),
        Just(Change::Closed),
    ]
}

fn finite_f64() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("finite", |value| value.is_finite())
}

fn finite_f32() -> impl Strategy<Value = f32> {
    any::<f32>().prop_filter("finite", |value| value.is_finite())
}

fn everything() -> impl Strategy<Value = Everything> {
    let scalars = (
        any::<String>(),
        any::<char>(),
        any::<i8>(),
        any::<i64>(),
        any::<u64>(),
        any::<u128>(),
        finite_f64(),
        finite_f32(),
        any::<bool>(),
        prop::option::of(".+"),
        any::<Option<u16>>(),
    );
    let nested = (
        prop_oneof![Just(Plan::Free), Just(Plan::ProMonthly), Just(Plan::Team)],
        address(),
        prop::collection::vec(any::<String>(), 0..4),
        prop::collection::btree_map(any::<String>(), any::<i32>(), 0..4),
        (any::<u8>(), any::<String>()),
        change(),
        prop::collection::vec(change(), 0..3),
    );
    (scalars, nested).prop_map(
        |(
            (text, letter, small, signed, unsigned, wide, ratio, single, flag, note, count),
            (plan, address, tags, scores, pair, change, changes),
        )| Everything {
            text,
            letter,
            small,
            signed,
            unsigned,
            wide,
            ratio,
            single,
            flag,
            note,
            count,
            plan,
            address,
            tags,
            scores,
            pair,
            change,
            changes,
        },
    )
}

/// The entry a consumer reads back for `event`.
fn round_trip<T: Serialize + for<'de> Deserialize<'de>>(event: &T) -> T {
    let fields: Vec<(Vec<u8>, Vec<u8>)> = to_fields(event)
        .expect("every generated event encodes")
        .into_iter()
        .map(|(name, value)| (name.as_bytes().to_vec(), value))
        .collect();
    from_fields(&fields).unwrap_or_else(|error| panic!("{fields:?} does not decode: {error:?}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn an_event_decodes_from_its_own_fields(event in everything()) {
        prop_assert_eq!(round_trip(&event), event);
    }

    #[test]
    fn untyped_fields_decode_from_their_own_fields(
        fields in prop::collection::btree_map("[^@][a-z_]{0,8}", ".+", 1..8),
    ) {
        prop_assert_eq!(round_trip(&fields), fields);
    }
}
