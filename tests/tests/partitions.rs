//! Partitioned streams: keyed publishes land in the partition their key picks, in publish
//! order; publishes without a key take the partitions in turn; a handler of the logical
//! stream reads every partition; dead letters and replays stay in their partition; a
//! listener warns of partitions left beyond a shrunk count. Each behaviour test runs
//! against a real redis-server and the in-memory backend.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slim_bus::testing::{Outcome, TestBus};
use slim_bus::{
    Context, Error, Event, EventBus, HandlerError, Headers, MemoryBroker, partition_for_key,
    partition_stream,
};
use slim_bus_tests::within;
use support::*;
use tokio::sync::mpsc;
use tracing_subscriber::layer::SubscriberExt;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "orders", partitions = 4, key = "order_id")]
struct OrderPlaced {
    order_id: String,
    seq: u64,
}

fn order(order_id: &str, seq: u64) -> OrderPlaced {
    OrderPlaced {
        order_id: order_id.to_owned(),
        seq,
    }
}

/// Published by the handler of `orders`, keyed on the same field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "shipments", partitions = 2, key = "order_id")]
struct OrderShipped {
    order_id: String,
    seq: u64,
}

/// A stream partitioned by the bus's setting, its event type naming no key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "clicks")]
struct Clicked {
    seq: u64,
}

const ORDER_IDS: [&str; 5] = ["o-1", "o-2", "o-3", "o-4", "o-5"];

/// The partition `order_id` picks among `partitions`, computed as a publisher in another
/// language would: CRC-32 of the field's stored bytes.
fn partition_of(order_id: &str, partitions: u32) -> u32 {
    partition_for_key(order_id.as_bytes(), partitions)
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> &'a str {
    fields
        .iter()
        .find(|(field, _)| field == name)
        .map(|(_, value)| value.as_str())
        .unwrap_or_else(|| panic!("no field {name} in {fields:?}"))
}

/// Per partition of `stream`, the `(order_id, seq)` of its entries in stream order.
async fn by_partition(
    backend: &Backend,
    stream: &str,
    partitions: u32,
) -> BTreeMap<u32, Vec<(String, u64)>> {
    let mut found = BTreeMap::new();
    for partition in 0..partitions {
        let entries = backend.entries(&partition_stream(stream, partition)).await;
        let orders = entries
            .iter()
            .map(|(_, fields)| {
                (
                    field(fields, "order_id").to_owned(),
                    field(fields, "seq").parse().unwrap(),
                )
            })
            .collect();
        found.insert(partition, orders);
    }
    found
}

async fn keyed_publishes_land_in_the_partition_of_their_key_in_publish_order(backend: Backend) {
    let bus = within("build", STEP, backend.builder().build())
        .await
        .unwrap();
    let publisher = bus.publisher();
    let mut headers = Headers::new();
    headers.insert("request-id", "r-1");
    // Every way to publish a typed event, interleaved over the keys.
    let mut seq = 0;
    for round in 0..4 {
        for order_id in ORDER_IDS {
            let event = order(order_id, seq);
            match round {
                0 => within("publish", STEP, bus.publish(&event)).await.map(drop),
                1 => within("publish", STEP, bus.publish_with_headers(&event, &headers))
                    .await
                    .map(drop),
                2 => within("publish", STEP, publisher.publish(&event))
                    .await
                    .map(drop),
                _ => within("publish", STEP, bus.publish_batch(&[event]))
                    .await
                    .map(drop),
            }
            .unwrap();
            seq += 1;
        }
    }
    let batch: Vec<OrderPlaced> = (0..10)
        .map(|n| order(ORDER_IDS[n % ORDER_IDS.len()], seq + n as u64))
        .collect();
    let ids = within("publish_batch", STEP, bus.publish_batch(&batch))
        .await
        .unwrap();
    assert_eq!(ids.len(), batch.len());

    let found = by_partition(&backend, "orders", 4).await;
    let mut total = 0;
    for (partition, orders) in &found {
        total += orders.len();
        for (order_id, _) in orders {
            assert_eq!(
                partition_of(order_id, 4),
                *partition,
                "{order_id} landed in partition {partition}"
            );
        }
        for order_id in ORDER_IDS {
            let seqs: Vec<u64> = orders
                .iter()
                .filter(|(id, _)| id == order_id)
                .map(|(_, seq)| *seq)
                .collect();
            assert!(
                seqs.windows(2).all(|pair| pair[0] < pair[1]),
                "{order_id} out of publish order in partition {partition}: {seqs:?}"
            );
        }
    }
    assert_eq!(total, 30, "{found:?}");
    assert!(
        backend.entries("orders").await.is_empty(),
        "nothing goes to the logical name"
    );

    // The ids the batch returned are those of its entries, in the batch's order.
    for (event, id) in batch.iter().zip(&ids) {
        let stream = partition_stream("orders", partition_of(&event.order_id, 4));
        let entries = backend.entries(&stream).await;
        let (_, fields) = entries
            .iter()
            .find(|(entry_id, _)| *entry_id == id.to_string())
            .unwrap_or_else(|| panic!("entry {id} is not in {stream}"));
        assert_eq!(field(fields, "seq"), event.seq.to_string());
    }

    // A concrete partition name is published to unchanged.
    within(
        "publish_to",
        STEP,
        bus.publish_to("orders:{3}", &order("o-9", 99)),
    )
    .await
    .unwrap();
    let last = backend.entries("orders:{3}").await;
    assert_eq!(field(&last.last().unwrap().1, "order_id"), "o-9");
}
conformance!(keyed_publishes_land_in_the_partition_of_their_key_in_publish_order);

async fn publishes_without_a_key_take_the_partitions_in_turn(backend: Backend) {
    let bus = within(
        "build",
        STEP,
        backend.builder().stream_partitions("clicks", 3).build(),
    )
    .await
    .unwrap();
    for seq in 0..3 {
        within("publish", STEP, bus.publish(&Clicked { seq }))
            .await
            .unwrap();
    }
    within(
        "publish_to",
        STEP,
        bus.publish_to("clicks", &Clicked { seq: 3 }),
    )
    .await
    .unwrap();
    within("send", STEP, bus.send("clicks", [("seq", "4")]))
        .await
        .unwrap();
    let batch: Vec<Clicked> = (5..9).map(|seq| Clicked { seq }).collect();
    within("publish_batch", STEP, bus.publish_batch(&batch))
        .await
        .unwrap();
    let mut counts = Vec::new();
    let mut seqs = BTreeSet::new();
    for partition in 0..3 {
        let entries = backend
            .entries(&partition_stream("clicks", partition))
            .await;
        counts.push(entries.len());
        seqs.extend(
            entries
                .iter()
                .map(|(_, fields)| field(fields, "seq").parse::<u64>().unwrap()),
        );
    }
    assert_eq!(counts, [3, 3, 3], "9 publishes over 3 partitions in turn");
    assert_eq!(seqs, (0..9).collect());
}
conformance!(publishes_without_a_key_take_the_partitions_in_turn);

/// What a handler saw of one delivery of a partitioned stream.
#[derive(Debug)]
struct SeenPartition {
    seq: u64,
    stream: String,
    partition: Option<u32>,
    order_id: String,
}

/// Reports each delivery and ships each order: an event of a partitioned stream of its own.
struct Shipping {
    seen: mpsc::UnboundedSender<SeenPartition>,
}

#[slim_bus::handlers]
impl Shipping {
    #[stream]
    async fn on_order(
        &self,
        event: OrderPlaced,
        ctx: Context,
    ) -> Result<OrderShipped, HandlerError> {
        let _ = self.seen.send(SeenPartition {
            seq: event.seq,
            stream: ctx.stream().to_owned(),
            partition: ctx.partition(),
            order_id: event.order_id.clone(),
        });
        // Emitted events are routed by their own key.
        Ok(OrderShipped {
            order_id: event.order_id,
            seq: event.seq,
        })
    }
}

async fn a_handler_of_the_logical_stream_gets_every_entry_of_every_partition_once(
    backend: Backend,
) {
    let (tx, mut seen) = mpsc::unbounded_channel();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .service(Arc::new(Shipping { seen: tx }))
            .build(),
    )
    .await
    .unwrap();
    let streams: Vec<&str> = bus.streams().collect();
    assert_eq!(
        streams,
        ["orders:{0}", "orders:{1}", "orders:{2}", "orders:{3}"]
    );
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let events: Vec<OrderPlaced> = (0..60)
        .map(|seq| order(ORDER_IDS[seq as usize % ORDER_IDS.len()], seq))
        .collect();
    within("publish_batch", STEP, bus.publish_batch(&events))
        .await
        .unwrap();
    let mut handled = BTreeSet::new();
    for _ in 0..events.len() {
        let delivery = recv(&mut seen, "a delivery").await;
        let partition = partition_of(&delivery.order_id, 4);
        assert_eq!(delivery.partition, Some(partition), "{delivery:?}");
        assert_eq!(delivery.stream, partition_stream("orders", partition));
        assert!(handled.insert(delivery.seq), "{delivery:?} handled twice");
    }
    assert_eq!(handled, (0..60).collect());
    for partition in 0..4 {
        backend
            .until_nothing_pending(&partition_stream("orders", partition), "tests")
            .await;
    }
    assert!(seen.try_recv().is_err(), "an entry was handled twice");

    let health = within("health", STEP, bus.health()).await;
    let reported: Vec<(&str, u64)> = health
        .streams
        .iter()
        .map(|stream| (stream.stream.as_str(), stream.length))
        .collect();
    assert_eq!(reported.len(), 4, "{reported:?}");
    assert_eq!(reported.iter().map(|(_, length)| length).sum::<u64>(), 60);

    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    let shipped = by_partition(&backend, "shipments", 2).await;
    assert_eq!(shipped.values().map(Vec::len).sum::<usize>(), 60);
    for (partition, orders) in &shipped {
        for (order_id, _) in orders {
            assert_eq!(partition_of(order_id, 2), *partition);
        }
    }
}
conformance!(a_handler_of_the_logical_stream_gets_every_entry_of_every_partition_once);

async fn dead_letters_and_their_replay_stay_in_their_partition(backend: Backend) {
    // The first delivery of o-2's entry fails for good; its replay succeeds.
    let failed_once = Arc::new(Mutex::new(false));
    let (handler, mut seen) = Scripted::new(move |event: OrderPlaced, _| {
        let failed_once = failed_once.clone();
        async move {
            let mut failed = failed_once.lock().unwrap();
            if event.order_id == "o-2" && !*failed {
                *failed = true;
                return Err(HandlerError::permanent("no such customer"));
            }
            Ok(())
        }
    });
    let bus = within("build", STEP, backend.bus().handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let failing = within("publish", STEP, bus.publish(&order("o-2", 1)))
        .await
        .unwrap();
    let partition = partition_stream("orders", partition_of("o-2", 4));
    let first = recv(&mut seen, "the failing delivery").await;
    assert_eq!(first.stream, partition);

    let dead = bus.dead_letters(&partition);
    assert_eq!(dead.stream(), format!("{partition}:dlq"));
    let letters = within("dead letters", STEP, async {
        loop {
            let letters = dead.list(None, 10).await.unwrap();
            if !letters.is_empty() {
                break letters;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].origin_id, Some(failing));
    assert_eq!(letters[0].origin_stream, partition);

    // The logical name has no dead letters of its own, and says where they are.
    let error = within("len", STEP, bus.dead_letters("orders").len())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::PartitionedStream { stream, partitions: 4 } if stream == "orders"),
        "{error}"
    );
    assert!(error.to_string().contains("orders:{0}"), "{error}");
    assert_eq!(bus.partition_count("orders"), Some(4));

    let replayed = within("replay", STEP, dead.replay(letters[0].id))
        .await
        .unwrap()
        .expect("the dead letter is there");
    let again = recv(&mut seen, "the replayed delivery").await;
    assert_eq!(again.stream, partition, "replayed into its partition");
    assert_eq!(again.entry_id, replayed);
    backend.until_nothing_pending(&partition, "tests").await;
    assert!(within("is_empty", STEP, dead.is_empty()).await.unwrap());
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}
conformance!(dead_letters_and_their_replay_stay_in_their_partition);

/// The WARN events logged while it is installed on this thread.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Text<'a>(&'a mut String);
        impl tracing::field::Visit for Text<'_> {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={value:?} ", field.name()));
            }
        }
        if *event.metadata().level() == tracing::Level::WARN {
            let mut text = String::new();
            event.record(&mut Text(&mut text));
            self.0.lock().unwrap().push(text);
        }
    }
}

async fn a_listener_warns_of_entries_left_in_partitions_beyond_a_shrunk_count(backend: Backend) {
    // Published while `clicks` had 4 partitions.
    let before = within(
        "build",
        STEP,
        backend.builder().stream_partitions("clicks", 4).build(),
    )
    .await
    .unwrap();
    let batch: Vec<Clicked> = (0..8).map(|seq| Clicked { seq }).collect();
    within("publish_batch", STEP, before.publish_batch(&batch))
        .await
        .unwrap();

    let warnings = Warnings::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));
    let (handler, mut seen) = Record::<Clicked>::new();
    let after = within(
        "build",
        STEP,
        backend
            .bus()
            .stream_partitions("clicks", 2)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, after.listen()).await.unwrap();
    let logged = warnings.0.lock().unwrap().clone();
    let warning = logged
        .iter()
        .find(|text| text.contains("beyond the stream's partition count"))
        .unwrap_or_else(|| panic!("no warning of the unread partitions in {logged:?}"));
    assert!(
        warning.contains("clicks:{2}") && warning.contains("clicks:{3}"),
        "{warning}"
    );
    assert!(!warning.contains("clicks:{1}"), "{warning}");
    // The partitions within the count are read as usual.
    for _ in 0..4 {
        let delivery = recv(&mut seen, "an entry of partitions 0 and 1").await;
        assert!(
            delivery.stream == "clicks:{0}" || delivery.stream == "clicks:{1}",
            "{delivery:?}"
        );
    }
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}
conformance!(a_listener_warns_of_entries_left_in_partitions_beyond_a_shrunk_count);

#[tokio::test]
async fn bad_partition_settings_are_errors_of_build_naming_the_stream() {
    let broker = MemoryBroker::new();
    let zero = EventBus::builder()
        .memory(&broker)
        .stream_partitions("clicks", 0)
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(
            zero,
            Error::Config {
                setting: "stream_partitions",
                ..
            }
        ),
        "{zero}"
    );
    assert!(zero.to_string().contains("`clicks`"), "{zero}");

    let (handler, _seen) = Record::<OrderPlaced>::new();
    let conflict = EventBus::builder()
        .memory(&broker)
        .consumer_group("tests")
        .stream_partitions("orders", 8)
        .handler(handler)
        .build()
        .await
        .unwrap_err();
    let text = conflict.to_string();
    assert!(
        text.contains("stream `orders` has 8 partitions") && text.contains("partitions = 4"),
        "{text}"
    );

    // A publisher that disagrees with the event type finds out at the publish, before
    // anything is written.
    let bus = EventBus::builder()
        .memory(&broker)
        .stream_partitions("orders", 8)
        .build()
        .await
        .unwrap();
    let error = bus.publish(&order("o-1", 0)).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("stream `orders` has 8 partitions"),
        "{error}"
    );
    assert!((0..8).all(|partition| {
        broker
            .entries(&partition_stream("orders", partition))
            .is_empty()
    }));

    let hash_tag = EventBus::builder()
        .memory(&broker)
        .stream_partitions("{clicks}", 2)
        .build()
        .await
        .unwrap_err();
    assert!(hash_tag.to_string().contains("`{clicks}`"), "{hash_tag}");
}

#[tokio::test]
async fn an_event_type_declared_as_published_makes_its_stream_partitioned_for_untyped_publishes() {
    let broker = MemoryBroker::new();
    let bus = within(
        "build",
        STEP,
        EventBus::builder()
            .memory(&broker)
            .publishes::<OrderPlaced>()
            .build(),
    )
    .await
    .unwrap();
    assert_eq!(bus.partition_count("orders"), Some(4));
    within(
        "send",
        STEP,
        bus.send("orders", [("order_id", "o-1"), ("seq", "0")]),
    )
    .await
    .unwrap();
    assert!(
        broker.entries("orders").is_empty(),
        "nothing goes to the logical name, which nobody reads"
    );
    let stored: usize = (0..4)
        .map(|partition| broker.entries(&partition_stream("orders", partition)).len())
        .sum();
    assert_eq!(stored, 1);

    // A setting that disagrees with the declared event type is an error of build().
    let conflict = EventBus::builder()
        .memory(&broker)
        .stream_partitions("orders", 8)
        .publishes::<OrderPlaced>()
        .build()
        .await
        .unwrap_err();
    assert!(
        conflict
            .to_string()
            .contains("stream `orders` has 8 partitions"),
        "{conflict}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_test_bus_routes_and_reads_partitions() {
    let (handler, _seen) = Record::<OrderPlaced>::new();
    let mut bus = TestBus::new(EventBus::builder().handler(handler))
        .await
        .unwrap();
    let ids = [
        bus.publish(&order("o-1", 0)).await.unwrap(),
        bus.publish(&order("o-2", 1)).await.unwrap(),
    ];
    bus.run_until_idle().await.unwrap();
    for id in ids {
        assert_eq!(bus.outcome(id), Outcome::Acked { deliveries: 1 });
    }
    let in_partition = bus
        .broker()
        .entries(&partition_stream("orders", partition_of("o-2", 4)));
    assert!(in_partition.iter().any(|(id, _)| *id == ids[1]));
}

/// Reports the partition of every entry of each batch, and succeeds.
struct BatchPartitions {
    seen: mpsc::UnboundedSender<Vec<(u64, Option<u32>)>>,
}

#[slim_bus::async_trait]
impl slim_bus::BatchHandler for BatchPartitions {
    type Event = OrderPlaced;

    fn max_batch(&self) -> usize {
        10
    }

    async fn handle_batch(&self, batch: Vec<(OrderPlaced, Context)>) -> slim_bus::BatchOutcome {
        let _ = self.seen.send(
            batch
                .iter()
                .map(|(event, ctx)| (event.seq, ctx.partition()))
                .collect(),
        );
        slim_bus::BatchOutcome::each(batch.iter().map(|_| Ok(())).collect())
    }
}

#[tokio::test(start_paused = true)]
async fn a_batch_handler_of_the_logical_stream_gets_batches_of_one_partition_each() {
    let (tx, mut seen) = mpsc::unbounded_channel();
    let mut bus = TestBus::new(EventBus::builder().batch_handler(BatchPartitions { seen: tx }))
        .await
        .unwrap();
    let events: Vec<OrderPlaced> = (0..40)
        .map(|seq| order(ORDER_IDS[seq as usize % ORDER_IDS.len()], seq))
        .collect();
    bus.bus().publish_batch(&events).await.unwrap();
    bus.run_until_idle().await.unwrap();
    let mut handled = BTreeSet::new();
    while let Ok(batch) = seen.try_recv() {
        let partitions: BTreeSet<Option<u32>> = batch.iter().map(|(_, p)| *p).collect();
        assert_eq!(partitions.len(), 1, "a batch mixes partitions: {batch:?}");
        for (seq, partition) in batch {
            let order_id = ORDER_IDS[seq as usize % ORDER_IDS.len()];
            assert_eq!(partition, Some(partition_of(order_id, 4)));
            assert!(handled.insert(seq), "{seq} handled twice");
        }
    }
    assert_eq!(handled, (0..40).collect());
}

#[test]
fn the_derive_names_the_stored_key_field_and_the_partitions() {
    #[derive(Serialize, Deserialize, slim_bus::Event)]
    #[event(stream = "payments", partitions = 16, key = "payment_id")]
    #[serde(rename_all = "camelCase")]
    struct PaymentReceived {
        payment_id: String,
        #[serde(rename = "amount")]
        cents: u64,
    }
    #[derive(Serialize, Deserialize, slim_bus::Event)]
    #[event(stream = "refunds", key = "cents")]
    struct Refunded {
        #[serde(rename = "amount")]
        cents: u64,
    }
    assert_eq!(PaymentReceived::PARTITIONS, Some(16));
    assert_eq!(PaymentReceived::PARTITION_KEY, Some("paymentId"));
    assert_eq!(Refunded::PARTITIONS, None);
    assert_eq!(Refunded::PARTITION_KEY, Some("amount"));
    assert_eq!(OrderShipped::PARTITION_KEY, Some("order_id"));
}
