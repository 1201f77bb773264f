//! Unit tests of the in-memory backend against the Redis behaviour it stands for.

use std::borrow::Cow;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::{MemoryBroker, MemoryConnection};
use crate::broker::Unowned;
use crate::broker::{
    DeadLetterMove, DeadLetterStore, Delivery, GroupReading, GroupStats, Inspection, Publishing,
    RawFields,
};
use crate::codec::EncodedField;
use crate::config::StartFrom;
use crate::dead_letter::pack_fields;
use crate::error::Error;
use crate::event::EntryId;

const MINUTE: Duration = Duration::from_secs(60);

fn fields(pairs: &[(&'static str, &str)]) -> Vec<EncodedField> {
    pairs
        .iter()
        .map(|(name, value)| (Cow::Borrowed(*name), value.as_bytes().to_vec()))
        .collect()
}

fn streams(names: &[&str]) -> Vec<Arc<str>> {
    names.iter().map(|name| Arc::from(*name)).collect()
}

async fn publish(broker: &MemoryConnection, stream: &str, seq: u64) -> EntryId {
    broker
        .publish(stream, None, fields(&[("seq", &seq.to_string())]))
        .await
        .expect("publishing in memory succeeds")
}

async fn read(broker: &MemoryConnection, consumer: &str, count: usize) -> Vec<Delivery> {
    broker
        .read_new("g", consumer, &streams(&["s"]), count, None)
        .await
        .expect("the group exists")
        .into_iter()
        .flat_map(|batch| batch.deliveries)
        .collect()
}

fn code(error: &Error) -> Option<&str> {
    match error {
        Error::Redis { source, .. } => source.code(),
        _ => None,
    }
}

#[tokio::test]
async fn ids_grow_within_a_stream_and_are_unique_across_streams() {
    let broker = MemoryBroker::new().connect();
    let mut ids = Vec::new();
    for seq in 0..50 {
        ids.push(publish(&broker, if seq % 2 == 0 { "a" } else { "b" }, seq).await);
    }
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as u64;
    assert!(ids[0].millis() <= now && ids[0].millis() + 60_000 > now);
}

#[tokio::test]
async fn groups_start_at_the_beginning_or_after_the_last_entry_and_creating_twice_is_fine() {
    let broker = MemoryBroker::new().connect();
    let before = publish(&broker, "s", 1).await;
    broker
        .ensure_group("s", "g", StartFrom::Beginning)
        .await
        .expect("created");
    broker
        .ensure_group("s", "late", StartFrom::NewOnly)
        .await
        .expect("created");
    let after = publish(&broker, "s", 2).await;
    let first = read(&broker, "c", 10).await;
    assert_eq!(
        first.iter().map(|d| d.id).collect::<Vec<_>>(),
        [before, after]
    );
    // Like BUSYGROUP: the existing group keeps its position.
    broker
        .ensure_group("s", "g", StartFrom::Beginning)
        .await
        .expect("exists");
    assert!(read(&broker, "c", 10).await.is_empty());
    let late = broker
        .read_new("late", "c", &streams(&["s"]), 10, None)
        .await
        .expect("the group exists");
    assert_eq!(late[0].deliveries.len(), 1);
    assert_eq!(late[0].deliveries[0].id, after);
}

#[tokio::test]
async fn a_missing_group_or_stream_is_a_nogroup_error_like_redis() {
    let broker = MemoryBroker::new().connect();
    let error = broker
        .read_new("g", "c", &streams(&["nowhere"]), 1, None)
        .await
        .expect_err("no such stream");
    assert_eq!(code(&error), Some("NOGROUP"), "{error}");
    let report = format!("{:#}", anyhow::Error::new(error));
    assert!(report.contains("nowhere"), "{report}");
    publish(&broker, "s", 1).await;
    for error in [
        broker
            .read_own_pending("s", "g", "c", EntryId::MIN, 1)
            .await
            .map(drop)
            .expect_err("no such group"),
        broker
            .claim_stale("s", "g", "c", MINUTE, EntryId::MIN, 1)
            .await
            .map(drop)
            .expect_err("no such group"),
        broker
            .claim_own(
                "g",
                "c",
                &[(Arc::from("s"), EntryId::MIN)],
                Unowned::PutBack,
            )
            .await
            .map(drop)
            .expect_err("no such group"),
    ] {
        assert_eq!(code(&error), Some("NOGROUP"), "{error}");
    }
    // XACK of a missing group acknowledges nothing and is no error.
    broker
        .ack("g", &[(Arc::from("s"), vec![EntryId::MIN])])
        .await
        .expect("no error");
}

#[tokio::test(start_paused = true)]
async fn reading_history_again_counts_each_delivery_and_shows_deleted_entries_without_fields() {
    let handle = MemoryBroker::new();
    let broker = handle.connect();
    broker
        .ensure_group("s", "g", StartFrom::Beginning)
        .await
        .expect("created");
    let ids = [
        publish(&broker, "s", 1).await,
        publish(&broker, "s", 2).await,
        publish(&broker, "s", 3).await,
    ];
    assert_eq!(read(&broker, "mine", 2).await.len(), 2);
    assert_eq!(read(&broker, "theirs", 2).await.len(), 1);
    tokio::time::advance(Duration::from_secs(3)).await;
    let pending = handle.pending("s", "g");
    assert_eq!(pending.len(), 3);
    assert!(
        pending
            .iter()
            .all(|p| p.delivery_count == 1 && p.idle == Duration::from_secs(3))
    );
    assert_eq!(handle.delete_entries("s", &[ids[1]]), 1);

    let again = broker
        .read_own_pending("s", "g", "mine", EntryId::MIN, 10)
        .await
        .expect("the group exists");
    assert_eq!(again.iter().map(|d| d.id).collect::<Vec<_>>(), &ids[..2]);
    assert_eq!(
        again.iter().map(|d| d.delivery_count).collect::<Vec<_>>(),
        [2, 2]
    );
    assert!(again[0].fields.is_some());
    assert!(again[1].fields.is_none(), "deleted but pending: no fields");
    let after_first = broker
        .read_own_pending("s", "g", "mine", ids[0], 10)
        .await
        .expect("the group exists");
    assert_eq!(after_first.len(), 1);
    assert_eq!(after_first[0].delivery_count, 3);
    let pending = handle.pending("s", "g");
    assert_eq!(
        pending[0].idle,
        Duration::ZERO,
        "delivering again resets the idle time"
    );
    assert_eq!(pending[2].idle, Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn autoclaim_takes_only_idle_entries_pages_with_a_cursor_and_drops_deleted_ones() {
    let handle = MemoryBroker::new();
    let broker = handle.connect();
    broker
        .ensure_group("s", "g", StartFrom::Beginning)
        .await
        .expect("created");
    let mut ids = Vec::new();
    for seq in 0..5 {
        ids.push(publish(&broker, "s", seq).await);
    }
    read(&broker, "dead", 4).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    read(&broker, "dead", 1).await; // ids[4]: fresh
    handle.delete_entries("s", &[ids[1]]);

    let page = broker
        .claim_stale("s", "g", "live", Duration::from_secs(5), EntryId::MIN, 2)
        .await
        .expect("the group exists");
    // ids[0] claimed, ids[1] deleted (it counts against COUNT): the next page starts at ids[2].
    assert_eq!(
        page.deliveries.iter().map(|d| d.id).collect::<Vec<_>>(),
        [ids[0]]
    );
    assert_eq!(page.deliveries[0].delivery_count, 2);
    assert_eq!(page.deleted, [ids[1]]);
    assert_eq!(page.next_cursor, ids[2]);

    let page = broker
        .claim_stale(
            "s",
            "g",
            "live",
            Duration::from_secs(5),
            page.next_cursor,
            10,
        )
        .await
        .expect("the group exists");
    assert_eq!(
        page.deliveries.iter().map(|d| d.id).collect::<Vec<_>>(),
        &ids[2..4]
    );
    assert_eq!(
        page.next_cursor,
        EntryId::MIN,
        "the scan went through the whole list"
    );
    let pending = handle.pending("s", "g");
    assert_eq!(
        pending
            .iter()
            .map(|p| (p.id, p.consumer.as_str(), p.delivery_count))
            .collect::<Vec<_>>(),
        [
            (ids[0], "live", 2),
            (ids[2], "live", 2),
            (ids[3], "live", 2),
            (ids[4], "dead", 1)
        ],
        "the deleted entry left the pending list; the fresh one stayed"
    );
}

#[tokio::test(start_paused = true)]
async fn claiming_for_a_retry_takes_only_own_entries_so_a_claim_in_between_wins() {
    let handle = MemoryBroker::new();
    let broker = handle.connect();
    broker
        .ensure_group("s", "g", StartFrom::Beginning)
        .await
        .expect("created");
    let kept = publish(&broker, "s", 1).await;
    let gone = publish(&broker, "s", 2).await;
    let taken = publish(&broker, "s", 3).await;
    read(&broker, "me", 3).await;
    tokio::time::advance(Duration::from_millis(500)).await;
    let s: Arc<str> = Arc::from("s");
    // Another consumer claims one: however idle it was, it is not this consumer's now.
    broker
        .claim_own("g", "other", &[(s.clone(), taken)], Unowned::PutBack)
        .await
        .expect("the group exists");
    let stolen = broker
        .claim_stale("s", "g", "other", Duration::ZERO, taken, 1)
        .await
        .expect("the group exists");
    assert_eq!(stolen.deliveries.len(), 1);
    handle.delete_entries("s", &[gone]);
    let claimed = broker
        .claim_own(
            "g",
            "me",
            &[(s.clone(), kept), (s.clone(), gone), (s.clone(), taken)],
            Unowned::PutBack,
        )
        .await
        .expect("the group exists");
    assert!(claimed[0].is_some());
    assert_eq!(claimed[1], None, "deleted");
    assert_eq!(claimed[2], None, "another consumer's");
    let pending = handle.pending("s", "g");
    assert_eq!(pending.len(), 2, "the deleted entry left the pending list");
    assert_eq!(
        (pending[0].delivery_count, pending[0].idle),
        (2, Duration::ZERO)
    );
    assert_eq!(pending[1].consumer, "other");
}

#[tokio::test]
async fn dead_letters_move_atomically_with_escaped_names_and_are_capped() {
    let handle = MemoryBroker::new();
    let broker = handle.connect();
    broker
        .ensure_group("s", "g", StartFrom::Beginning)
        .await
        .expect("created");
    let id = broker
        .publish("s", None, fields(&[("user", "u1"), ("@reason", "mine")]))
        .await
        .expect("published");
    read(&broker, "me", 1).await;
    let meta = [
        ("@reason", "permanent".to_owned()),
        ("@error", "no".to_owned()),
    ];
    let moved = |consumer: &'static str| {
        let broker = &broker;
        let meta = &meta;
        async move {
            broker
                .dead_letter("s", "{s}:dlq", "g", consumer, id, meta, Some(2))
                .await
                .expect("the group exists")
        }
    };
    assert_eq!(moved("someone-else").await, DeadLetterMove::NotPending);
    assert_eq!(moved("me").await, DeadLetterMove::Moved { trimmed: 0 });
    assert_eq!(moved("me").await, DeadLetterMove::NotPending, "never twice");
    assert!(handle.pending("s", "g").is_empty());
    let letters = handle.entries("{s}:dlq");
    assert_eq!(letters.len(), 1);
    let names: Vec<_> = letters[0].1.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["user", "@@reason", "@reason", "@error"]);

    // Replay restores the escaped name and drops the metadata.
    let replayed = broker
        .replay("{s}:dlq", "s", letters[0].0)
        .await
        .expect("replayed")
        .expect("the dead letter exists");
    let origin = handle.entries("s");
    assert_eq!(origin.last().map(|(id, _)| *id), Some(replayed));
    assert_eq!(
        origin.last().map(|(_, fields)| fields.clone()),
        Some(vec![
            ("user".to_owned(), b"u1".to_vec()),
            ("@reason".to_owned(), b"mine".to_vec())
        ])
    );
    assert_eq!(handle.stream_len("{s}:dlq"), 0);
    assert_eq!(
        broker
            .replay("{s}:dlq", "s", letters[0].0)
            .await
            .expect("no error"),
        None
    );

    // A deleted entry is acknowledged, not moved; the cap keeps the newest.
    let deleted = publish(&broker, "s", 9).await;
    for seq in 0..4 {
        publish(&broker, "s", seq).await;
    }
    read(&broker, "me", 10).await;
    handle.delete_entries("s", &[deleted]);
    assert_eq!(
        broker
            .dead_letter("s", "{s}:dlq", "g", "me", deleted, &meta, Some(2))
            .await
            .expect("the group exists"),
        DeadLetterMove::Deleted
    );
    let rest: Vec<EntryId> = handle.pending("s", "g").iter().map(|p| p.id).collect();
    let mut trimmed = 0;
    for id in &rest {
        if let DeadLetterMove::Moved { trimmed: t } = broker
            .dead_letter("s", "{s}:dlq", "g", "me", *id, &meta, Some(2))
            .await
            .expect("the group exists")
        {
            trimmed += t;
        }
    }
    assert_eq!(rest.len(), 5, "the four published and the replayed one");
    assert_eq!(trimmed, 3, "five dead letters under a cap of two");
    assert_eq!(handle.stream_len("{s}:dlq"), 2);
    let stats = broker
        .group_stats("s", "g", "{s}:dlq")
        .await
        .expect("no error");
    // Dead-lettering leaves the entries in their stream, as Redis does.
    let length = handle.stream_len("s");
    assert_eq!(
        stats,
        GroupStats {
            length,
            lag: Some(0),
            pending: 0,
            oldest_pending_idle: None,
            dead_letters: 2,
            dead_letters_trimmed: 3,
        }
    );
}

#[tokio::test]
async fn an_entry_too_large_for_the_redis_script_has_its_fields_packed_like_there() {
    let handle = MemoryBroker::new();
    let broker = handle.connect();
    broker
        .ensure_group("s", "g", StartFrom::Beginning)
        .await
        .expect("created");
    let names: Vec<String> = (0..4000).map(|i| format!("f{i}")).collect();
    let many: Vec<EncodedField> = names
        .iter()
        .map(|name| (Cow::Owned(name.clone()), b"v".to_vec()))
        .collect();
    let id = broker.publish("s", None, many).await.expect("published");
    read(&broker, "me", 1).await;
    let meta = [("@reason", "decode".to_owned())];
    assert_eq!(
        broker
            .dead_letter("s", "{s}:dlq", "g", "me", id, &meta, None)
            .await
            .expect("the group exists"),
        DeadLetterMove::Moved { trimmed: 0 }
    );
    let letters = handle.entries("{s}:dlq");
    let original: RawFields = names
        .iter()
        .map(|name| (name.as_bytes().to_vec(), b"v".to_vec()))
        .collect();
    assert_eq!(
        letters[0].1,
        [
            ("@fields".to_owned(), pack_fields(&original)),
            ("@reason".to_owned(), b"decode".to_vec())
        ]
    );
}

#[tokio::test]
async fn a_dead_letter_without_original_fields_is_not_replayed() {
    let handle = MemoryBroker::new();
    let broker = handle.connect();
    let id = broker
        .publish("{s}:dlq", None, fields(&[("@reason", "decode")]))
        .await
        .expect("published");
    let error = broker
        .replay("{s}:dlq", "s", id)
        .await
        .expect_err("nothing to replay");
    let report = format!("{:#}", anyhow::Error::new(error));
    assert!(report.contains("has no original fields"), "{report}");
    assert_eq!(handle.stream_len("{s}:dlq"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_blocking_read_is_woken_by_a_new_entry_or_a_wake_and_otherwise_times_out() {
    let handle = MemoryBroker::new();
    let broker = Arc::new(handle.connect());
    let publisher = handle.connect();
    broker
        .ensure_group("s", "g", StartFrom::Beginning)
        .await
        .expect("created");
    let start = Instant::now();
    let timed_out = broker
        .read_new("g", "c", &streams(&["s"]), 10, Some(Duration::from_secs(2)))
        .await
        .expect("read");
    assert!(timed_out.is_empty());
    assert_eq!(start.elapsed(), Duration::from_secs(2));

    let reader = tokio::spawn({
        let broker = broker.clone();
        async move {
            broker
                .read_new("g", "c", &streams(&["s"]), 10, Some(MINUTE))
                .await
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let id = publish(&publisher, "s", 1).await;
    let woken = reader.await.expect("no panic").expect("read");
    assert_eq!(woken[0].deliveries[0].id, id);
    assert_eq!(start.elapsed(), Duration::from_secs(3), "woken at once");

    let reader = tokio::spawn({
        let broker = broker.clone();
        async move {
            broker
                .read_new("g", "c", &streams(&["s"]), 10, Some(MINUTE))
                .await
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.wake_reader().await.expect("woken");
    assert!(reader.await.expect("no panic").expect("read").is_empty());
    assert_eq!(start.elapsed(), Duration::from_secs(4));

    // A wake while no read blocks makes the next read return without blocking.
    broker.wake_reader().await.expect("woken");
    let read = broker
        .read_new("g", "c", &streams(&["s"]), 10, Some(MINUTE))
        .await
        .expect("read");
    assert!(read.is_empty());
    assert_eq!(start.elapsed(), Duration::from_secs(4));
}

#[tokio::test]
async fn named_brokers_are_shared_and_memory_urls_pick_them() {
    let named = MemoryBroker::from_url("memory://memory-unit-test").expect("a memory url");
    publish(&named.connect(), "s", 1).await;
    assert_eq!(MemoryBroker::named("memory-unit-test").stream_len("s"), 1);
    let private = MemoryBroker::from_url("memory://").expect("a memory url");
    assert_eq!(private.stream_len("s"), 0);
    assert!(MemoryBroker::from_url("redis://127.0.0.1/").is_none());
}

#[tokio::test]
async fn a_cluster_like_broker_refuses_keys_of_several_slots_in_one_command_and_reads_per_slot() {
    let handle = MemoryBroker::cluster_like();
    let broker = handle.connect();
    // A configuration error naming the keys, not a Redis error to wait out.
    let crossslot = |error: Error| {
        assert!(
            matches!(&error, Error::CrossSlot { keys } if keys.len() >= 2),
            "{error}"
        );
    };
    // `foo` and `bar` are in slots 12182 and 5061; `{foo}.b` shares `foo`'s.
    for stream in ["foo", "bar", "{foo}.b"] {
        broker
            .ensure_group(stream, "g", StartFrom::Beginning)
            .await
            .expect("created");
        publish(&broker, stream, 1).await;
    }
    let read = broker
        .read_new("g", "c", &streams(&["foo", "{foo}.b"]), 10, None)
        .await
        .expect("one slot");
    assert_eq!(read.len(), 2);
    // A read of streams in two slots is one read per slot, as on a cluster.
    let two_slots = broker
        .read_new("g", "c", &streams(&["foo", "bar"]), 10, None)
        .await
        .expect("a read per slot");
    assert_eq!(two_slots.len(), 1, "only bar had an entry left");
    assert_eq!(two_slots[0].stream_index, 1);
    let id = read[0].deliveries[0].id;
    crossslot(
        broker
            .dead_letter("foo", "bar:dlq", "g", "c", id, &[], None)
            .await
            .expect_err("the dead-letter stream is in another slot"),
    );
    assert_eq!(handle.pending("foo", "g").len(), 1, "nothing moved");
    assert_eq!(
        broker
            .dead_letter("foo", "{foo}:dlq", "g", "c", id, &[], None)
            .await
            .expect("one slot"),
        DeadLetterMove::Moved { trimmed: 0 }
    );
    let letter = handle.entries("{foo}:dlq")[0].0;
    crossslot(
        broker
            .replay("{foo}:dlq", "bar", letter)
            .await
            .expect_err("the origin is in another slot"),
    );
    assert!(
        broker
            .replay("{foo}:dlq", "foo", letter)
            .await
            .expect("one slot")
            .is_some()
    );
    // A broker that is not cluster-like reads any streams together.
    assert!(!MemoryBroker::new().is_cluster_like());
}

#[tokio::test]
async fn a_trim_deletes_at_most_as_many_entries_as_it_is_given() {
    let broker = MemoryBroker::new().connect();
    broker
        .ensure_group("s", "g", StartFrom::Beginning)
        .await
        .expect("created");
    for seq in 0..25 {
        publish(&broker, "s", seq).await;
    }
    let read = read(&broker, "c", 25).await;
    let ids: Vec<EntryId> = read.iter().map(|delivery| delivery.id).collect();
    broker
        .ack("g", &[(Arc::from("s"), ids)])
        .await
        .expect("acknowledged");
    // 24 may go (the last one delivered is kept): 10, 10, then the 4 left.
    for expected in [10, 10, 4, 0] {
        assert_eq!(broker.trim_acked("s", 10).await.expect("trimmed"), expected);
    }
}

#[tokio::test(start_paused = true)]
async fn an_entry_pending_with_no_one_is_put_back_only_when_asked() {
    let handle = MemoryBroker::new();
    let broker = handle.connect();
    broker
        .ensure_group("s", "g", StartFrom::Beginning)
        .await
        .expect("created");
    let id = publish(&broker, "s", 1).await;
    read(&broker, "me", 1).await;
    let s: Arc<str> = Arc::from("s");
    broker
        .ack("g", &[(s.clone(), vec![id])])
        .await
        .expect("acknowledged");
    // Acknowledged since it was listed as this consumer's: left alone.
    let left = broker
        .claim_own("g", "me", &[(s.clone(), id)], Unowned::Leave)
        .await
        .expect("the group exists");
    assert_eq!(left, [None]);
    assert!(handle.pending("s", "g").is_empty(), "not put back");
    // In a group lost and created again while this consumer held it: put back.
    let put_back = broker
        .claim_own("g", "me", &[(s.clone(), id)], Unowned::PutBack)
        .await
        .expect("the group exists");
    assert!(put_back[0].is_some());
    let pending = handle.pending("s", "g");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].consumer, "me");
}
