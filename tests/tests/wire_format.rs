//! The wire format: what `publish` writes to the stream, field by field, and what handlers
//! decode from entries written raw with XADD, including what go-slim-event-bus producers
//! write.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use slim_bus_tests::within;
use support::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Address {
    city: String,
    zip: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Plan {
    Free,
    ProMonthly,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Payment {
    Card { last4: String },
    Invoice(u32),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Signup {
    name: String,
    age: i64,
    score: f64,
    active: bool,
    nickname: Option<String>,
    referrer: Option<u64>,
    plan: Plan,
    address: Address,
    tags: Vec<String>,
    limits: BTreeMap<String, u32>,
    payment: Payment,
}

impl slim_bus::Event for Signup {
    const STREAM: Option<&'static str> = Some("signups");
}

fn signup() -> Signup {
    Signup {
        name: "Zoë O'Hara".into(),
        age: -7,
        score: 3.5,
        active: true,
        nickname: None,
        referrer: Some(42),
        plan: Plan::ProMonthly,
        address: Address {
            city: "Oslo".into(),
            zip: 150,
        },
        tags: vec!["a".into(), "b c".into()],
        limits: BTreeMap::from([("api".into(), 10)]),
        payment: Payment::Card {
            last4: "4242".into(),
        },
    }
}

conformance!(publish_writes_one_flat_field_per_struct_field_in_declaration_order);
async fn publish_writes_one_flat_field_per_struct_field_in_declaration_order(backend: Backend) {
    let bus = within("build", STEP, backend.builder().build())
        .await
        .unwrap();
    let id = within("publish", STEP, bus.publish(&signup()))
        .await
        .unwrap();

    let entries = backend.entries("signups").await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, id.to_string());
    let fields: Vec<(&str, &str)> = entries[0]
        .1
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("name", "Zoë O'Hara"),
            ("age", "-7"),
            ("score", "3.5"),
            ("active", "true"),
            // nickname is None: no field at all
            ("referrer", "42"),
            ("plan", "pro_monthly"),
            ("address", r#"{"city":"Oslo","zip":150}"#),
            ("tags", r#"["a","b c"]"#),
            ("limits", r#"{"api":10}"#),
            ("payment", r#"{"Card":{"last4":"4242"}}"#),
        ]
    );
}

/// One raw entry and the event a handler must decode from it.
struct Row {
    what: &'static str,
    fields: Vec<(&'static str, &'static [u8])>,
    expected: Signup,
}

fn rows() -> Vec<Row> {
    let base: Vec<(&'static str, &'static [u8])> = vec![
        ("name", "Zoë O'Hara".as_bytes()),
        ("age", b"-7"),
        ("score", b"3.5"),
        ("active", b"true"),
        ("referrer", b"42"),
        ("plan", b"pro_monthly"),
        ("address", br#"{"city":"Oslo","zip":150}"#),
        ("tags", br#"["a","b c"]"#),
        ("limits", br#"{"api":10}"#),
        ("payment", br#"{"Card":{"last4":"4242"}}"#),
    ];
    let with = |what, changes: &[(&'static str, &'static [u8])], expect: &dyn Fn(&mut Signup)| {
        let mut fields = base.clone();
        for (name, value) in changes {
            match fields.iter_mut().find(|(n, _)| n == name) {
                Some(field) => field.1 = value,
                None => fields.push((name, value)),
            }
        }
        let mut expected = signup();
        expect(&mut expected);
        Row {
            what,
            fields,
            expected,
        }
    };
    let mut reordered = base.clone();
    reordered.reverse();
    vec![
        with("what publish writes", &[], &|_| {}),
        Row {
            what: "fields in any order",
            fields: reordered,
            expected: signup(),
        },
        with(
            "unknown fields are ignored",
            &[("added_later", b"x")],
            &|_| {},
        ),
        with("Go bool 1", &[("active", b"1")], &|e| e.active = true),
        with("Go bool 0", &[("active", b"0")], &|e| e.active = false),
        with("bool false", &[("active", b"false")], &|e| e.active = false),
        with(
            "Go nil is an empty string: None",
            &[("referrer", b"")],
            &|e| e.referrer = None,
        ),
        with("a string option present", &[("nickname", b"zo")], &|e| {
            e.nickname = Some("zo".into())
        }),
        with(
            "Go float32 widened",
            &[("score", b"0.10000000149011612")],
            &|e| e.score = 0.10000000149011612,
        ),
        with(
            "Go large float64, no exponent",
            &[("score", b"1000000000000000000000")],
            &|e| e.score = 1e21,
        ),
        with("integer as float", &[("score", b"2")], &|e| e.score = 2.0),
        with(
            "unit variant by its serde name",
            &[("plan", b"free")],
            &|e| e.plan = Plan::Free,
        ),
        with(
            "newtype variant as JSON",
            &[("payment", br#"{"Invoice":7}"#)],
            &|e| e.payment = Payment::Invoice(7),
        ),
        with("empty sequence", &[("tags", b"[]")], &|e| e.tags.clear()),
    ]
}

conformance!(handlers_decode_entries_written_raw_including_go_producers);
async fn handlers_decode_entries_written_raw_including_go_producers(backend: Backend) {
    let rows = rows();
    let mut ids = Vec::new();
    for row in &rows {
        ids.push(backend.xadd("signups", &row.fields).await);
    }
    let (handler, mut seen) = Record::<Signup>::new();
    let bus = within(
        "build",
        STEP,
        backend.bus().max_concurrent(1).handler(handler).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for (row, id) in rows.iter().zip(&ids) {
        let delivery = recv(&mut seen, row.what).await;
        assert_eq!(delivery.entry_id.to_string(), *id, "{}", row.what);
        assert_eq!(delivery.event, row.expected, "{}", row.what);
    }
    backend.until_nothing_pending("signups", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(untyped_handlers_see_every_field_as_text);
async fn untyped_handlers_see_every_field_as_text(backend: Backend) {
    backend
        .xadd(
            "legacy",
            &[("user_id", b"1a2b3c"), ("user_name", b"John Doe")],
        )
        .await;
    let (handler, mut seen) = Record::<HashMap<String, String>>::new();
    let bus = within(
        "build",
        STEP,
        backend.bus().handler_on("legacy", handler).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let delivery = recv(&mut seen, "the untyped entry").await;
    assert_eq!(
        delivery.event,
        HashMap::from([
            ("user_id".to_owned(), "1a2b3c".to_owned()),
            ("user_name".to_owned(), "John Doe".to_owned())
        ])
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(send_writes_untyped_fields_like_the_go_original);
async fn send_writes_untyped_fields_like_the_go_original(backend: Backend) {
    let bus = within("build", STEP, backend.builder().build())
        .await
        .unwrap();
    within(
        "send",
        STEP,
        bus.send(
            "user.created",
            [("user_id", "1a2b3c"), ("user_name", "John Doe")],
        ),
    )
    .await
    .unwrap();
    let entries = backend.entries("user.created").await;
    assert_eq!(
        entries[0].1,
        [
            ("user_id".to_owned(), "1a2b3c".to_owned()),
            ("user_name".to_owned(), "John Doe".to_owned())
        ]
    );
    let empty: [(&str, &str); 0] = [];
    let err = within("send nothing", STEP, bus.send("user.created", empty))
        .await
        .unwrap_err();
    assert!(matches!(err, slim_bus::Error::Encode { .. }), "{err}");
}

conformance!(a_batch_is_published_in_order_and_handled_like_single_events);
async fn a_batch_is_published_in_order_and_handled_like_single_events(backend: Backend) {
    let (handler, mut seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend.bus().max_concurrent(1).handler(handler).build(),
    )
    .await
    .unwrap();
    let events: Vec<UserCreated> = (0..250).map(user).collect();
    let ids = within("publish a batch", STEP, bus.publish_batch(&events))
        .await
        .unwrap();
    assert_eq!(ids.len(), 250);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids in publishing order"
    );
    assert_eq!(backend.stream_len("user.created").await, 250);
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for (seq, id) in ids.iter().enumerate() {
        let delivery = recv(&mut seen, "a batch entry").await;
        assert_eq!((delivery.event.seq, delivery.entry_id), (seq as u64, *id));
    }
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    assert!(
        within("empty batch", STEP, bus.publish_batch::<UserCreated>(&[]))
            .await
            .unwrap()
            .is_empty()
    );
}
