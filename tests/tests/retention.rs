//! Retention: the publish cap (`stream_max_len`, `#[event(max_len = N)]`) keeps a stream
//! near its cap, and `trim_acked` deletes only what every consumer group of a stream has
//! been delivered and has acknowledged, whatever other groups lag behind.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use slim_bus::{EntryId, EventBus};
use slim_bus_tests::within;
use support::*;

#[derive(Debug, Clone, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "audit.logged", max_len = 50)]
struct AuditLogged {
    seq: u64,
}

/// Acknowledges `ids` of `stream` in `group`, as another service's consumer would.
async fn acknowledge(backend: &Backend, stream: &str, group: &str, ids: &[String]) {
    match backend {
        Backend::Memory(broker) => {
            let ids: Vec<EntryId> = ids.iter().map(|id| id.parse().unwrap()).collect();
            broker.acknowledge(stream, group, &ids);
        }
        _ => {
            let server = backend.server().unwrap();
            let mut conn = server.connection().await;
            let acked: usize = within(
                "XACK",
                STEP,
                redis::cmd("XACK")
                    .arg(stream)
                    .arg(group)
                    .arg(ids)
                    .query_async(&mut conn),
            )
            .await
            .unwrap();
            assert_eq!(acked, ids.len(), "every id was pending in `{group}`");
        }
    }
}

/// The ids of `stream`'s entries, oldest first.
async fn entry_ids(backend: &Backend, stream: &str) -> Vec<String> {
    backend
        .entries(stream)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// Waits until the oldest entry of `stream` is `id`.
async fn until_oldest_is(backend: &Backend, stream: &str, id: &str) {
    within(
        &format!("the stream to be trimmed up to {id}"),
        STEP,
        async {
            while entry_ids(backend, stream).await.first().map(String::as_str) != Some(id) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await
}

conformance!(trim_acked_deletes_only_what_every_group_acknowledged);
async fn trim_acked_deletes_only_what_every_group_acknowledged(backend: Backend) {
    let publisher = within("build a publisher", STEP, backend.builder().build())
        .await
        .unwrap();
    let users: Vec<UserCreated> = (0..100).map(user).collect();
    within("publish", STEP, publisher.publish_batch(&users))
        .await
        .unwrap();
    let ids = entry_ids(&backend, "user.created").await;
    assert_eq!(ids.len(), 100);
    // Another service's group lags: it was delivered 30 entries and acknowledged 10.
    backend
        .read_as_dead_consumer("user.created", "reports", "reports-1", 30)
        .await;
    acknowledge(&backend, "user.created", "reports", &ids[..10]).await;

    let (handler, mut seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .trim_acked()
            .trim_acked_interval(Duration::from_millis(50))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for _ in 0..100 {
        recv(&mut seen, "every entry handled").await;
    }
    backend.until_nothing_pending("user.created", "tests").await;

    // This group is done with all 100; the other one still needs its oldest pending entry.
    until_oldest_is(&backend, "user.created", &ids[10]).await;
    assert_eq!(entry_ids(&backend, "user.created").await, ids[10..]);

    // Once the other group acknowledged all it was delivered, what it was not delivered
    // yet stays, from the last entry delivered to it on.
    acknowledge(&backend, "user.created", "reports", &ids[10..30]).await;
    until_oldest_is(&backend, "user.created", &ids[29]).await;
    assert_eq!(entry_ids(&backend, "user.created").await, ids[29..]);
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(health.streams[0].length, 71);
    assert_eq!(health.streams[0].lag, Some(0));

    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(trim_acked_on_trims_a_stream_the_bus_does_not_handle_and_leaves_the_others);
async fn trim_acked_on_trims_a_stream_the_bus_does_not_handle_and_leaves_the_others(
    backend: Backend,
) {
    let publisher = within("build a publisher", STEP, backend.builder().build())
        .await
        .unwrap();
    for stream in ["orders.audit", "user.created"] {
        let users: Vec<UserCreated> = (0..10).map(user).collect();
        within("publish", STEP, publisher.publish_batch_to(stream, &users))
            .await
            .unwrap();
    }
    // Every group of `orders.audit` has handled it all; no one reads `user.created` yet.
    backend
        .read_as_dead_consumer("orders.audit", "auditors", "auditor-1", 10)
        .await;
    let audit_ids = entry_ids(&backend, "orders.audit").await;
    acknowledge(&backend, "orders.audit", "auditors", &audit_ids).await;

    let (handler, mut seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .trim_acked_on("orders.audit")
            .trim_acked_interval(Duration::from_millis(50))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for _ in 0..10 {
        recv(&mut seen, "every entry handled").await;
    }
    backend.until_nothing_pending("user.created", "tests").await;
    until_oldest_is(&backend, "orders.audit", &audit_ids[9]).await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    // `user.created` is not in `trim_acked_on`: this bus handled it all, and it is kept.
    assert_eq!(backend.stream_len("user.created").await, 10);
}

conformance!(trim_acked_on_a_partitioned_stream_trims_its_partitions);
async fn trim_acked_on_a_partitioned_stream_trims_its_partitions(backend: Backend) {
    let publisher = within(
        "build a publisher",
        STEP,
        backend.builder().stream_partitions("orders", 2).build(),
    )
    .await
    .unwrap();
    let users: Vec<UserCreated> = (0..10).map(user).collect();
    within(
        "publish",
        STEP,
        publisher.publish_batch_to("orders", &users),
    )
    .await
    .unwrap();
    let partitions = [
        slim_bus::partition_stream("orders", 0),
        slim_bus::partition_stream("orders", 1),
    ];
    let mut last_ids = Vec::new();
    for partition in &partitions {
        backend
            .read_as_dead_consumer(partition, "auditors", "auditor-1", 10)
            .await;
        let ids = entry_ids(&backend, partition).await;
        assert!(ids.len() > 1, "{partition} holds several entries: {ids:?}");
        acknowledge(&backend, partition, "auditors", &ids).await;
        last_ids.push(ids.last().unwrap().clone());
    }

    let (handler, _seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .stream_partitions("orders", 2)
            .trim_acked_on("orders")
            .trim_acked_interval(Duration::from_millis(50))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for (partition, last) in partitions.iter().zip(&last_ids) {
        until_oldest_is(&backend, partition, last).await;
    }
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(the_first_trim_of_a_long_stream_deletes_all_it_may_in_bounded_calls);
async fn the_first_trim_of_a_long_stream_deletes_all_it_may_in_bounded_calls(backend: Backend) {
    // More than one trim call deletes (10 000 entries): the trim goes on with further calls.
    const LONG: usize = 12_000;
    let publisher = within("build a publisher", STEP, backend.builder().build())
        .await
        .unwrap();
    let users: Vec<UserCreated> = (0..LONG as u64).map(user).collect();
    for batch in users.chunks(1_000) {
        within(
            "publish a batch",
            STEP,
            publisher.publish_batch_to("orders.audit", batch),
        )
        .await
        .unwrap();
    }
    backend
        .read_as_dead_consumer("orders.audit", "auditors", "auditor-1", LONG)
        .await;
    let ids = entry_ids(&backend, "orders.audit").await;
    assert_eq!(ids.len(), LONG);
    acknowledge(&backend, "orders.audit", "auditors", &ids).await;

    let (handler, _seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .trim_acked_on("orders.audit")
            .trim_acked_interval(Duration::from_millis(50))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    until_oldest_is(&backend, "orders.audit", &ids[LONG - 1]).await;
    assert_eq!(backend.stream_len("orders.audit").await, 1);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(a_stream_without_groups_is_not_trimmed);
async fn a_stream_without_groups_is_not_trimmed(backend: Backend) {
    let publisher = within("build a publisher", STEP, backend.builder().build())
        .await
        .unwrap();
    let users: Vec<UserCreated> = (0..10).map(user).collect();
    within(
        "publish",
        STEP,
        publisher.publish_batch_to("no.groups", &users),
    )
    .await
    .unwrap();
    let (handler, mut seen) = Record::<UserCreated>::new();
    // Trimmed in this order: once `user.created` is, `no.groups` has been too.
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .trim_acked_on("no.groups")
            .trim_acked_on("user.created")
            .trim_acked_interval(Duration::from_millis(10))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let two: Vec<UserCreated> = (1..=2).map(user).collect();
    within("publish", STEP, publisher.publish_batch(&two))
        .await
        .unwrap();
    recv(&mut seen, "the first entry handled").await;
    recv(&mut seen, "the second entry handled").await;
    backend.until_nothing_pending("user.created", "tests").await;
    let last = entry_ids(&backend, "user.created").await.pop().unwrap();
    until_oldest_is(&backend, "user.created", &last).await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    assert_eq!(backend.stream_len("no.groups").await, 10);
}

conformance!(a_publish_cap_keeps_the_stream_near_its_max_len);
async fn a_publish_cap_keeps_the_stream_near_its_max_len(backend: Backend) {
    let bus = within(
        "build",
        STEP,
        backend
            .builder()
            .stream_max_len("user.created", 100)
            .build(),
    )
    .await
    .unwrap();
    let users: Vec<UserCreated> = (0..1_000).map(user).collect();
    for batch in users.chunks(100) {
        within("publish a batch", STEP, bus.publish_batch(batch))
            .await
            .unwrap();
    }
    // `MAXLEN ~`: Redis deletes whole nodes of 100 entries, so keeps 100 to 199.
    let len = backend.stream_len("user.created").await;
    assert!((100..200).contains(&len), "{len} entries");
    let newest = backend.entries("user.created").await.pop().unwrap();
    assert!(newest.1.contains(&("seq".to_owned(), "999".to_owned())));

    // An event type's own cap, `#[event(max_len = 50)]`, on single publishes.
    for seq in 0..300 {
        within("publish", STEP, bus.publish(&AuditLogged { seq }))
            .await
            .unwrap();
    }
    let len = backend.stream_len("audit.logged").await;
    assert!((50..150).contains(&len), "{len} entries");

    // The bus's cap for the stream overrides the event type's.
    let uncapped = within(
        "build",
        STEP,
        backend
            .builder()
            .stream_max_len("audit.logged", 10_000)
            .build(),
    )
    .await
    .unwrap();
    for seq in 300..600 {
        within("publish", STEP, uncapped.publish(&AuditLogged { seq }))
            .await
            .unwrap();
    }
    assert_eq!(backend.stream_len("audit.logged").await, len + 300);
}

#[tokio::test]
async fn a_zero_cap_is_refused_when_the_bus_is_built() {
    let error = EventBus::builder()
        .memory(&slim_bus::MemoryBroker::new())
        .stream_max_len("user.created", 0)
        .build()
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("stream_max_len"),
        "the error names the setting: {error}"
    );
}
