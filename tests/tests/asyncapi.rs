//! The AsyncAPI document of a service: valid AsyncAPI 3.0 (against the schema of
//! `@asyncapi/specs`, vendored in fixtures/asyncapi), with payload schemas that describe
//! the fields the codec writes, and written by `build()` when SLIM_BUS_ASYNCAPI asks.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::process::Stdio;

use serde_json::Value;
use slim_bus::MemoryBroker;
use slim_bus_tests::asyncapi_service::{self, Address, OrderPlaced, Plan};
use slim_bus_tests::within;
use support::STEP;

const ASYNCAPI_3_0_SCHEMA: &str = include_str!("../fixtures/asyncapi/asyncapi-3.0.0.schema.json");

/// Every violation of the AsyncAPI 3.0 schema in `document`, one line each.
fn violations(document: &Value) -> Vec<String> {
    let schema: Value = serde_json::from_str(ASYNCAPI_3_0_SCHEMA).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    validator
        .iter_errors(document)
        .map(|error| format!("{} at {}", error, error.instance_path()))
        .collect()
}

/// Every `$ref` in `value` that does not point into `document`.
fn dangling_refs(document: &Value, value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(object) => {
            if let Some(Value::String(target)) = object.get("$ref") {
                let resolves = target
                    .strip_prefix('#')
                    .is_some_and(|pointer| document.pointer(pointer).is_some());
                if !resolves {
                    found.push(target.clone());
                }
            }
            object
                .values()
                .for_each(|v| dangling_refs(document, v, found));
        }
        Value::Array(items) => items.iter().for_each(|v| dangling_refs(document, v, found)),
        _ => {}
    }
}

async fn service_document() -> Value {
    let bus = within(
        "build",
        STEP,
        asyncapi_service::builder("memory://").build(),
    )
    .await
    .unwrap();
    bus.asyncapi()
}

#[tokio::test]
async fn the_document_is_valid_asyncapi_3_0_and_names_every_stream_handler_and_event() {
    let document = service_document().await;
    assert_eq!(violations(&document), Vec::<String>::new(), "{document:#}");
    let mut broken = document.clone();
    broken["operations"]["receive.payment.received"]["action"] = "publish".into();
    assert_ne!(
        violations(&broken),
        Vec::<String>::new(),
        "the schema is checked"
    );
    let mut dangling = Vec::new();
    dangling_refs(&document, &document, &mut dangling);
    assert_eq!(dangling, Vec::<String>::new(), "every $ref resolves");

    assert_eq!(document["info"]["title"], "billing");
    assert_eq!(document["info"]["version"], "2.1.0");
    let channels: Vec<&str> = document["channels"]
        .as_object()
        .unwrap()
        .values()
        .map(|channel| channel["address"].as_str().unwrap())
        .collect();
    assert_eq!(
        channels,
        [
            "audit.logged",
            "legacy.orders",
            "order.placed",
            "payment.received"
        ]
    );
    let mut operations: Vec<(String, String)> = document["operations"]
        .as_object()
        .unwrap()
        .values()
        .map(|op| {
            let channel = op["channel"]["$ref"].as_str().unwrap();
            let address = document
                .pointer(channel.strip_prefix('#').unwrap())
                .unwrap()["address"]
                .as_str()
                .unwrap()
                .to_owned();
            (op["action"].as_str().unwrap().to_owned(), address)
        })
        .collect();
    operations.sort();
    assert_eq!(
        operations,
        [
            ("receive".to_owned(), "legacy.orders".to_owned()),
            ("receive".to_owned(), "payment.received".to_owned()),
            ("send".to_owned(), "audit.logged".to_owned()),
            ("send".to_owned(), "order.placed".to_owned()),
        ]
    );
    let payment = &document["channels"]["payment.received"]["messages"]["PaymentReceived"];
    assert_eq!(
        payment["payload"]["required"],
        serde_json::json!(["order_id", "cents"])
    );
    // Without a schema, a message is any flat fields.
    let audit = &document["channels"]["audit.logged"]["messages"]["AuditLogged"];
    assert_eq!(audit["payload"]["additionalProperties"]["type"], "string");
    assert!(
        document["info"]["description"]
            .as_str()
            .unwrap()
            .contains("flat fields"),
        "the wire format is described"
    );
}

#[tokio::test]
async fn the_payload_schema_names_the_fields_the_codec_writes() {
    let document = service_document().await;
    let payload = &document["channels"]["order.placed"]["messages"]["OrderPlaced"]["payload"];
    let properties: BTreeSet<&str> = payload["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let required: BTreeSet<&str> = payload["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| name.as_str().unwrap())
        .collect();

    let broker = MemoryBroker::new();
    let bus = within(
        "build",
        STEP,
        slim_bus::EventBus::builder().memory(&broker).build(),
    )
    .await
    .unwrap();
    let mut order = OrderPlaced {
        order_id: "o-1".into(),
        cents: 1250,
        prepaid: true,
        coupon: Some("WELCOME".into()),
        plan: Plan::ProMonthly,
        shipping: Address {
            city: "Oslo".into(),
            postal_code: "0150".into(),
        },
        tags: vec!["gift".into()],
    };
    within("publish", STEP, bus.publish(&order)).await.unwrap();
    order.coupon = None;
    within("publish", STEP, bus.publish(&order)).await.unwrap();
    let entries = broker.entries("order.placed");
    let with_coupon: BTreeSet<&str> = entries[0].1.iter().map(|(name, _)| name.as_str()).collect();
    let without: BTreeSet<&str> = entries[1].1.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(with_coupon, properties, "one field per property");
    assert_eq!(
        without, required,
        "an optional property left out is no field"
    );

    // Nested values are JSON text that the property's schema describes.
    let shipping = entries[0]
        .1
        .iter()
        .find(|(name, _)| name == "shipping")
        .unwrap();
    let shipping: Value = serde_json::from_slice(&shipping.1).unwrap();
    let address = &document["components"]["schemas"]["Address"];
    let validator = jsonschema::validator_for(address).unwrap();
    assert!(
        validator.is_valid(&shipping),
        "{shipping} matches {address}"
    );
    let plan = entries[0]
        .1
        .iter()
        .find(|(name, _)| name == "plan")
        .unwrap();
    assert_eq!(plan.1, b"pro_monthly");
    let plan_schema = &document["components"]["schemas"]["Plan"];
    let validator = jsonschema::validator_for(plan_schema).unwrap();
    assert!(validator.is_valid(&"pro_monthly".into()), "{plan_schema}");
    assert!(!validator.is_valid(&"ProMonthly".into()), "{plan_schema}");
}

#[tokio::test]
async fn build_writes_the_document_and_ends_the_process_when_slim_bus_asyncapi_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("asyncapi.json");
    let status = within(
        "the service to write its document and exit",
        STEP,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_slim-bus-test-asyncapi"))
            .env(slim_bus::ASYNCAPI_ENV, &path)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .status(),
    )
    .await
    .unwrap();
    assert!(status.success(), "{status}");
    let written: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(written, service_document().await);
}

#[tokio::test]
async fn a_test_bus_never_ends_the_process_for_slim_bus_asyncapi() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("asyncapi.json");
    let output = within(
        "the service to build a TestBus and exit",
        STEP,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_slim-bus-test-asyncapi"))
            .arg("--test-bus")
            .env(slim_bus::ASYNCAPI_ENV, &path)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert!(output.status.success(), "{:?}", output);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "built\n");
    assert!(!path.exists(), "a TestBus wrote the document");
}

#[derive(Debug, serde::Serialize, serde::Deserialize, slim_bus::Event)]
#[event(stream = "orders", partitions = 3, key = "order_id")]
struct OrderShipped {
    order_id: String,
}

#[derive(Debug, serde::Serialize, serde::Deserialize, slim_bus::Event)]
#[event(stream = "invoices", partitions = 2)]
struct InvoiceSent {
    invoice_id: String,
}

#[slim_bus::stream]
async fn on_order_shipped(_event: OrderShipped) {}

#[tokio::test]
async fn a_partitioned_stream_is_one_channel_with_a_partition_parameter() {
    let bus = within(
        "build",
        STEP,
        slim_bus::EventBus::builder()
            .url("memory://")
            .consumer_group("shipping")
            .handler(on_order_shipped)
            .publishes::<InvoiceSent>()
            .build(),
    )
    .await
    .unwrap();
    let document = bus.asyncapi();
    assert_eq!(violations(&document), Vec::<String>::new(), "{document:#}");

    let orders = &document["channels"]["orders"];
    assert_eq!(orders["address"], "orders:{partition}");
    assert!(
        orders["description"]
            .as_str()
            .unwrap()
            .contains("`orders:{partition}:dlq`"),
        "{orders:#}"
    );
    // The address with each value of its parameter filled in, as AsyncAPI fills it in,
    // names the streams the bus reads.
    let filled_in = |channel: &Value| -> BTreeSet<String> {
        channel["parameters"]["partition"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|value| {
                channel["address"]
                    .as_str()
                    .unwrap()
                    .replace("{partition}", value.as_str().unwrap())
            })
            .collect()
    };
    let read: BTreeSet<String> = bus.streams().map(str::to_owned).collect();
    assert_eq!(filled_in(orders), read);
    assert_eq!(
        filled_in(&document["channels"]["invoices"]),
        BTreeSet::from(["invoices:{0}".to_owned(), "invoices:{1}".to_owned()])
    );
    // One receive for the handler, not one per partition.
    let receives: Vec<&Value> = document["operations"]
        .as_object()
        .unwrap()
        .values()
        .filter(|op| op["action"] == "receive")
        .collect();
    assert_eq!(receives.len(), 1, "{document:#}");
    assert_eq!(receives[0]["channel"]["$ref"], "#/channels/orders");
}
