//! Inspection of any stream through a bus built with only a URL: groups, consumers,
//! pending entries and dead letters, and entries read as they arrive without a group.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use slim_bus::{EntryId, Error, HandlerError};
use slim_bus_tests::within;
use support::*;

/// Publishes `count` users and dead-letters every one through group `tests`, whose
/// handler refuses them for good; returns the publisher.
async fn dead_letter_users(backend: &Backend, count: u64) -> slim_bus::EventBus {
    let (handler, mut seen) =
        Scripted::new(|_: UserCreated, _| async { Err(HandlerError::permanent("user is banned")) });
    let bus = within("build", STEP, backend.bus().handler(handler).build())
        .await
        .unwrap();
    let users: Vec<UserCreated> = (0..count).map(user).collect();
    within("publish", STEP, bus.publish_batch(&users))
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for _ in 0..count {
        recv(&mut seen, "every delivery").await;
    }
    let dead = bus.dead_letters("user.created");
    within("every entry to be dead-lettered", STEP, async {
        while dead.len().await.unwrap() < count {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    bus
}

conformance!(stream_status_shows_every_group_its_consumers_and_the_dead_letters);
async fn stream_status_shows_every_group_its_consumers_and_the_dead_letters(backend: Backend) {
    dead_letter_users(&backend, 3).await;
    // Another service's consumer took two entries and died holding them.
    backend
        .read_as_dead_consumer("user.created", "reports", "reports-1", 2)
        .await;

    let inspector = within("build an inspector", STEP, backend.builder().build())
        .await
        .unwrap();
    let status = within(
        "stream_status",
        STEP,
        inspector.stream_status("user.created"),
    )
    .await
    .unwrap();
    let ids: Vec<EntryId> = backend
        .entries("user.created")
        .await
        .iter()
        .map(|(id, _)| id.parse().unwrap())
        .collect();
    assert_eq!(status.stream, "user.created");
    assert_eq!(status.length, 3);
    assert_eq!(status.last_entry_id, Some(ids[2]));
    assert_eq!(status.dead_letter_stream, "{user.created}:dlq");
    assert_eq!(status.dead_letters, 3);
    let names: Vec<&str> = status.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["reports", "tests"]);

    let reports = &status.groups[0];
    assert_eq!(reports.lag, Some(1));
    assert_eq!(reports.pending, 2);
    assert!(reports.oldest_pending_idle.is_some());
    assert_eq!(reports.last_delivered_id, ids[1]);
    assert_eq!(reports.consumers.len(), 1);
    assert_eq!(reports.consumers[0].name, "reports-1");
    assert_eq!(reports.consumers[0].pending, 2);

    let tests = &status.groups[1];
    assert_eq!(tests.lag, Some(0));
    assert_eq!(tests.pending, 0);
    assert_eq!(tests.oldest_pending_idle, None);
    assert_eq!(tests.last_delivered_id, ids[2]);
    assert_eq!(tests.consumers[0].name, "consumer-1");
    assert_eq!(tests.consumers[0].pending, 0);

    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["groups"][0]["consumers"][0]["name"], "reports-1");
    assert!(json["groups"][0]["oldest_pending_idle_ms"].is_u64());
    assert_eq!(json["last_entry_id"], ids[2].to_string());
}

conformance!(a_missing_stream_or_group_is_an_error_that_names_it);
async fn a_missing_stream_or_group_is_an_error_that_names_it(backend: Backend) {
    let inspector = within("build an inspector", STEP, backend.builder().build())
        .await
        .unwrap();
    let error = within("stream_status", STEP, inspector.stream_status("no.such"))
        .await
        .unwrap_err();
    assert!(matches!(&error, Error::StreamNotFound { stream } if stream == "no.such"));
    assert_eq!(error.to_string(), "stream `no.such` does not exist");

    backend.xadd("orders", &[("order_id", b"o-1")]).await;
    let error = within(
        "pending_entries",
        STEP,
        inspector.pending_entries("orders", "billing", None, 10),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&error, Error::GroupNotFound { stream, group } if stream == "orders" && group == "billing"),
        "{error:?}"
    );
    let error = within(
        "pending_entries",
        STEP,
        inspector.pending_entries("no.such", "billing", None, 10),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, Error::GroupNotFound { .. }), "{error:?}");
}

conformance!(pending_entries_say_who_holds_what_and_how_often_it_was_delivered);
async fn pending_entries_say_who_holds_what_and_how_often_it_was_delivered(backend: Backend) {
    for seq in 0..5 {
        backend
            .xadd("orders", &[("seq", seq.to_string().as_bytes())])
            .await;
    }
    backend
        .read_as_dead_consumer("orders", "billing", "pod-1", 2)
        .await;
    backend
        .read_as_dead_consumer("orders", "billing", "pod-2", 2)
        .await;
    let inspector = within("build an inspector", STEP, backend.builder().build())
        .await
        .unwrap();
    let all = within(
        "pending_entries",
        STEP,
        inspector.pending_entries("orders", "billing", None, 10),
    )
    .await
    .unwrap();
    let holders: Vec<&str> = all.iter().map(|entry| entry.consumer.as_str()).collect();
    assert_eq!(holders, ["pod-1", "pod-1", "pod-2", "pod-2"]);
    assert!(all.iter().all(|entry| entry.delivery_count == 1));
    assert!(all.windows(2).all(|pair| pair[0].id < pair[1].id));

    let of_pod_2 = within(
        "pending_entries of one consumer",
        STEP,
        inspector.pending_entries("orders", "billing", Some("pod-2"), 1),
    )
    .await
    .unwrap();
    // The idle times grow between the two calls: compare the rest.
    let without_idle =
        |entries: &[slim_bus::PendingEntry]| -> Vec<(slim_bus::EntryId, String, u64)> {
            entries
                .iter()
                .map(|entry| (entry.id, entry.consumer.clone(), entry.delivery_count))
                .collect()
        };
    assert_eq!(without_idle(&of_pod_2), without_idle(&all[2..3]));
}

conformance!(tail_yields_what_is_added_after_it_started_and_takes_nothing_from_groups);
async fn tail_yields_what_is_added_after_it_started_and_takes_nothing_from_groups(
    backend: Backend,
) {
    let before = backend.xadd("orders", &[("order_id", b"o-1")]).await;
    backend
        .read_as_dead_consumer("orders", "billing", "pod-1", 10)
        .await;
    let inspector = within(
        "build an inspector",
        STEP,
        backend
            .builder()
            .block_time(Duration::from_millis(100))
            .build(),
    )
    .await
    .unwrap();
    let new_only = within("tail", STEP, inspector.tail("orders", None))
        .await
        .unwrap();
    let mut new_only = std::pin::pin!(new_only);
    let after = backend.xadd("orders", &[("order_id", b"o-2")]).await;
    let entry = within("the new entry", STEP, new_only.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.id.to_string(), after);
    assert_eq!(entry.field("order_id"), Some("o-2"));

    let everything = within("tail", STEP, inspector.tail("orders", Some(EntryId::MIN)))
        .await
        .unwrap();
    let ids: Vec<String> = within("both entries", STEP, everything.take(2).collect::<Vec<_>>())
        .await
        .into_iter()
        .map(|entry| entry.unwrap().id.to_string())
        .collect();
    assert_eq!(ids, [before, after]);

    // Nothing was taken from the group: its one pending entry is still there, and the new
    // entry is still to be delivered to it.
    let status = within("stream_status", STEP, inspector.stream_status("orders"))
        .await
        .unwrap();
    assert_eq!(status.groups[0].pending, 1);
    assert_eq!(status.groups[0].lag, Some(1));
}

conformance!(read_after_waits_for_an_entry_and_an_empty_wait_is_not_an_error);
async fn read_after_waits_for_an_entry_and_an_empty_wait_is_not_an_error(backend: Backend) {
    let inspector = within("build an inspector", STEP, backend.builder().build())
        .await
        .unwrap();
    let nothing = within(
        "a read that finds nothing",
        STEP,
        inspector.read_after("not.yet", EntryId::MIN, 10, Some(Duration::from_millis(50))),
    )
    .await
    .unwrap();
    assert!(nothing.is_empty());

    let waiting = tokio::spawn({
        let inspector = inspector.clone();
        async move {
            inspector
                .read_after("not.yet", EntryId::MIN, 10, Some(Duration::from_secs(5)))
                .await
        }
    });
    let id = backend.xadd("not.yet", &[("n", b"1")]).await;
    let entries = within("the waiting read", STEP, waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].id.to_string(), id);
    // Meanwhile the bus's other commands were not held up by the wait.
    within("ping while reading", STEP, inspector.health()).await;
}
