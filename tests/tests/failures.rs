//! Failure handling: claims from dead consumers, retries with delivery counts, dead
//! letters, poison entries, replay, and deleted pending entries. Each `conformance!` test
//! runs against a real redis-server and against the in-memory backend (`name::redis`,
//! `name::memory`); killing a consumer process needs a server the process can reach.
#![allow(clippy::unwrap_used, clippy::type_complexity)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use slim_bus::{DeadLetterReason, Error, EventBus, EventBusBuilder, HandlerError};
use slim_bus_tests::within;
use support::*;

const DLQ: &str = "{user.created}:dlq";

/// A bus that retries quickly and claims from dead consumers after 300 ms.
fn failing_bus(backend: &Backend) -> EventBusBuilder {
    backend
        .bus()
        .handler_timeout(Duration::from_millis(200))
        .claim_min_idle(Duration::from_millis(300))
        .claim_interval(Duration::from_millis(50))
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
}

fn ok() -> impl Fn(UserCreated, slim_bus::Context) -> std::future::Ready<Result<(), HandlerError>> {
    |_, _| std::future::ready(Ok(()))
}

conformance!(
    entries_of_a_dead_consumer_are_claimed_after_the_idle_time_with_delivery_count_two,
    tls
);
async fn entries_of_a_dead_consumer_are_claimed_after_the_idle_time_with_delivery_count_two(
    backend: Backend,
) {
    for seq in 0..3 {
        backend.xadd("user.created", &user_fields(seq)).await;
    }
    backend
        .read_as_dead_consumer("user.created", "tests", "dead-pod", 10)
        .await;

    let (handler, mut seen) = Scripted::new(ok());
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend).handler(handler).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let mut claimed = Vec::new();
    for _ in 0..3 {
        let delivery = recv(&mut seen, "a claimed entry").await;
        assert_eq!(delivery.consumer, "consumer-1");
        claimed.push((delivery.event.seq, delivery.delivery_count));
    }
    claimed.sort_unstable();
    assert_eq!(claimed, [(0, 2), (1, 2), (2, 2)]);
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(
    entries_abandoned_by_a_stopped_consumer_are_claimed_by_another_with_delivery_count_two
);
async fn entries_abandoned_by_a_stopped_consumer_are_claimed_by_another_with_delivery_count_two(
    backend: Backend,
) {
    // The in-process stand-in for a killed consumer: one whose handler hangs until its
    // shutdown grace period is over, so the entry stays pending with it.
    let (hanging, mut started) =
        Scripted::new(|_: UserCreated, _| std::future::pending::<Result<(), HandlerError>>());
    let doomed = within(
        "build",
        STEP,
        failing_bus(&backend)
            .consumer_name("doomed-pod")
            // Its handler is abandoned at shutdown, never timed out and retried first.
            .handler_timeout(Duration::from_secs(5))
            .claim_min_idle(Duration::from_secs(10))
            .shutdown_grace(Duration::from_millis(50))
            .handler(hanging)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, doomed.listen()).await.unwrap();
    within("publish", STEP, doomed.publish(&user(1)))
        .await
        .unwrap();
    let first = recv(&mut started, "the doomed consumer to start").await;
    assert_eq!(
        (first.consumer.as_str(), first.delivery_count),
        ("doomed-pod", 1)
    );
    within("shutdown past the grace period", STEP, listener.shutdown())
        .await
        .unwrap();
    assert_eq!(backend.pending_count("user.created", "tests").await, 1);

    let (handler, mut seen) = Scripted::new(ok());
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend).handler(handler).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let delivery = recv(&mut seen, "the entry the stopped consumer held").await;
    assert_eq!(
        (
            delivery.event.seq,
            delivery.consumer.as_str(),
            delivery.delivery_count
        ),
        (1, "consumer-1", 2)
    );
    backend.until_nothing_pending("user.created", "tests").await;
    assert!(
        started.try_recv().is_err(),
        "the stopped consumer got nothing more"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(a_pending_list_longer_than_many_claim_batches_is_recovered_in_full);
async fn a_pending_list_longer_than_many_claim_batches_is_recovered_in_full(backend: Backend) {
    let publisher = within("build", STEP, backend.builder().build())
        .await
        .unwrap();
    for seq in 0..500 {
        within("publish", STEP, publisher.publish(&user(seq)))
            .await
            .unwrap();
    }
    backend
        .read_as_dead_consumer("user.created", "tests", "dead-pod", 500)
        .await;

    let (handler, mut seen) = Scripted::new(ok());
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend)
            .max_count(10)
            .max_concurrent(10)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let mut seqs = Vec::new();
    for _ in 0..500 {
        let delivery = recv(&mut seen, "a claimed entry").await;
        assert_eq!(delivery.delivery_count, 2);
        seqs.push(delivery.event.seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (0..500).collect::<Vec<_>>(), "every entry once");
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(
    an_entry_failing_twice_then_succeeding_sees_delivery_counts_one_two_three,
    tls
);
async fn an_entry_failing_twice_then_succeeding_sees_delivery_counts_one_two_three(
    backend: Backend,
) {
    let (handler, mut seen) = Scripted::new(|_: UserCreated, ctx: slim_bus::Context| async move {
        if ctx.delivery_count() < 3 {
            Err(HandlerError::new("not yet"))
        } else {
            Ok(())
        }
    });
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend).handler(handler).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    let mut counts = Vec::new();
    for _ in 0..3 {
        counts.push(recv(&mut seen, "an attempt").await.delivery_count);
    }
    assert_eq!(counts, [1, 2, 3]);
    backend.until_nothing_pending("user.created", "tests").await;
    // Redis counted the retries too.
    assert_eq!(backend.stream_len(DLQ).await, 0);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(
    an_entry_is_dead_lettered_once_with_its_metadata_after_max_deliveries,
    tls
);
async fn an_entry_is_dead_lettered_once_with_its_metadata_after_max_deliveries(backend: Backend) {
    let (handler, mut seen) =
        Scripted::new(|_: UserCreated, _| async { Err(HandlerError::new("smtp is down")) });
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend)
            .max_deliveries(3)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let id = within("publish", STEP, bus.publish(&user(9)))
        .await
        .unwrap();
    for expected in 1..=3 {
        assert_eq!(recv(&mut seen, "an attempt").await.delivery_count, expected);
    }
    backend.until_nothing_pending("user.created", "tests").await;

    let dead = bus.dead_letters("user.created");
    assert_eq!(dead.stream(), DLQ);
    let letters = within("list dead letters", STEP, dead.list(None, 10))
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "exactly one dead letter");
    let letter = &letters[0];
    assert_eq!(letter.origin_stream, "user.created");
    assert_eq!(letter.origin_id, Some(id));
    assert_eq!(letter.group, "tests");
    assert_eq!(letter.consumer, "consumer-1");
    assert_eq!(letter.delivery_count, 3);
    assert_eq!(letter.reason, Some(DeadLetterReason::Handler));
    assert_eq!(letter.error, "smtp is down");
    assert!(letter.failed_at.is_some());
    assert_eq!(letter.field("user_id"), Some("u9"));
    assert_eq!(letter.field("seq"), Some("9"));
    // No fourth attempt.
    assert!(seen.try_recv().is_err());
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(a_handler_can_set_its_own_max_deliveries);
async fn a_handler_can_set_its_own_max_deliveries(backend: Backend) {
    let (handler, mut seen) =
        Scripted::new(|_: UserCreated, _| async { Err(HandlerError::new("no")) });
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend)
            .max_deliveries(5)
            .handler(handler.max_deliveries(1))
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    assert_eq!(recv(&mut seen, "the only attempt").await.delivery_count, 1);
    backend.until_nothing_pending("user.created", "tests").await;
    assert_eq!(backend.stream_len(DLQ).await, 1);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(timeouts_and_panics_are_retried_then_dead_lettered_with_their_reason);
async fn timeouts_and_panics_are_retried_then_dead_lettered_with_their_reason(backend: Backend) {
    let (handler, mut seen) = Scripted::new(|event: UserCreated, _| async move {
        if event.seq == 1 {
            std::future::pending::<()>().await;
        }
        panic!("bug in the handler");
    });
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend)
            .max_deliveries(2)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    within("publish", STEP, bus.publish(&user(2)))
        .await
        .unwrap();
    for _ in 0..4 {
        recv(&mut seen, "an attempt").await;
    }
    backend.until_nothing_pending("user.created", "tests").await;
    let letters = within(
        "list",
        STEP,
        bus.dead_letters("user.created").list(None, 10),
    )
    .await
    .unwrap();
    let mut reasons: Vec<_> = letters
        .iter()
        .map(|l| {
            (
                l.field("seq").unwrap().to_owned(),
                l.reason,
                l.delivery_count,
            )
        })
        .collect();
    reasons.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        reasons,
        [
            ("1".to_owned(), Some(DeadLetterReason::Timeout), 2),
            ("2".to_owned(), Some(DeadLetterReason::Panic), 2)
        ]
    );
    assert!(
        letters
            .iter()
            .any(|l| l.error.contains("bug in the handler"))
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(a_permanent_error_dead_letters_on_the_first_delivery);
async fn a_permanent_error_dead_letters_on_the_first_delivery(backend: Backend) {
    let (handler, mut seen) =
        Scripted::new(|_: UserCreated, _| async { Err(HandlerError::permanent("user is banned")) });
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend).handler(handler).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    assert_eq!(recv(&mut seen, "the attempt").await.delivery_count, 1);
    backend.until_nothing_pending("user.created", "tests").await;
    let letters = within(
        "list",
        STEP,
        bus.dead_letters("user.created").list(None, 10),
    )
    .await
    .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, Some(DeadLetterReason::Permanent));
    assert_eq!(letters[0].delivery_count, 1);
    assert_eq!(letters[0].error, "user is banned");
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

fn user_fields(seq: u64) -> Vec<(&'static str, &'static [u8])> {
    let seq: &'static str = Box::leak(seq.to_string().into_boxed_str());
    vec![
        ("user_id", b"u".as_slice()),
        ("user_name", b"name".as_slice()),
        ("seq", seq.as_bytes()),
    ]
}

conformance!(each_kind_of_undecodable_entry_is_dead_lettered_at_once_between_good_ones);
async fn each_kind_of_undecodable_entry_is_dead_lettered_at_once_between_good_ones(
    backend: Backend,
) {
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Profile {
        name: String,
        age: u32,
        address: Address,
    }
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Address {
        city: String,
    }
    impl slim_bus::Event for Profile {
        const STREAM: Option<&'static str> = Some("profiles");
    }
    let good: Vec<(&str, &[u8])> = vec![
        ("name", b"ok"),
        ("age", b"30"),
        ("address", br#"{"city":"Oslo"}"#),
    ];
    let poison: Vec<(&str, Vec<(&str, &[u8])>)> = vec![
        (
            "missing field",
            vec![("name", b"x"), ("address", br#"{"city":"Oslo"}"#)],
        ),
        (
            "wrong type",
            vec![
                ("name", b"x"),
                ("age", b"thirty"),
                ("address", br#"{"city":"Oslo"}"#),
            ],
        ),
        (
            "invalid json",
            vec![("name", b"x"), ("age", b"30"), ("address", b"{city:")],
        ),
        (
            "non-utf-8",
            vec![
                ("name", b"\xff\xfe"),
                ("age", b"30"),
                ("address", br#"{"city":"Oslo"}"#),
            ],
        ),
    ];
    backend.xadd("profiles", &good).await;
    let mut poison_ids = Vec::new();
    for (_, fields) in &poison {
        poison_ids.push(backend.xadd("profiles", fields).await);
        backend.xadd("profiles", &good).await;
    }

    let (handler, mut seen) = Scripted::new(|_: Profile, _| async { Ok(()) });
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend).handler(handler).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for _ in 0..5 {
        assert_eq!(recv(&mut seen, "a good entry").await.event.name, "ok");
    }
    backend.until_nothing_pending("profiles", "tests").await;
    let mut letters = within("list", STEP, bus.dead_letters("profiles").list(None, 10))
        .await
        .unwrap();
    letters.sort_by_key(|l| l.origin_id);
    assert_eq!(
        letters
            .iter()
            .map(|l| l.origin_id.unwrap().to_string())
            .collect::<Vec<_>>(),
        poison_ids,
        "each poison entry dead-lettered once"
    );
    for (letter, (kind, _)) in letters.iter().zip(&poison) {
        assert_eq!(letter.reason, Some(DeadLetterReason::Decode), "{kind}");
        assert_eq!(letter.delivery_count, 1, "{kind}: no retries");
        assert!(
            letter.error.contains("profiles"),
            "{kind}: {}",
            letter.error
        );
    }
    assert!(letters[0].error.contains("age"), "{}", letters[0].error);
    assert!(
        letters[1].error.contains("age") && letters[1].error.contains("thirty"),
        "{}",
        letters[1].error
    );
    assert!(
        letters[2].error.contains("address") && letters[2].error.contains("JSON"),
        "{}",
        letters[2].error
    );
    assert!(
        letters[3].error.contains("name") && letters[3].error.contains("UTF-8"),
        "{}",
        letters[3].error
    );
    // The original bytes are kept exactly, non-UTF-8 included.
    assert_eq!(
        letters[3].fields[0],
        ("name".to_owned(), b"\xff\xfe".to_vec())
    );
    assert!(
        seen.try_recv().is_err(),
        "poison entries never reached the handler"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(
    replayed_dead_letters_are_handled_and_leave_the_dead_letter_stream,
    tls
);
async fn replayed_dead_letters_are_handled_and_leave_the_dead_letter_stream(backend: Backend) {
    let fail = Arc::new(AtomicUsize::new(1));
    let (handler, mut seen) = Scripted::new({
        let fail = fail.clone();
        move |_: UserCreated, _| {
            let fail = fail.load(Ordering::SeqCst) == 1;
            async move {
                if fail {
                    Err(HandlerError::permanent("downstream rejected it"))
                } else {
                    Ok(())
                }
            }
        }
    });
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend).handler(handler).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    // A user field that looks like metadata survives the round trip.
    backend
        .xadd(
            "user.created",
            &[
                ("user_id", b"u1"),
                ("user_name", b"n"),
                ("seq", b"1"),
                ("@reason", b"mine"),
            ],
        )
        .await;
    recv(&mut seen, "the failing attempt").await;
    backend.until_nothing_pending("user.created", "tests").await;
    let dead = bus.dead_letters("user.created");
    let letters = within("list", STEP, dead.list(None, 10)).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, Some(DeadLetterReason::Permanent));
    assert_eq!(letters[0].field("@reason"), Some("mine"));

    fail.store(0, Ordering::SeqCst);
    let new_id = within("replay", STEP, dead.replay(letters[0].id))
        .await
        .unwrap();
    assert!(new_id.is_some());
    let again = recv(&mut seen, "the replayed entry").await;
    assert_eq!(Some(again.entry_id), new_id);
    assert_eq!(again.delivery_count, 1);
    backend.until_nothing_pending("user.created", "tests").await;
    assert!(within("is_empty", STEP, dead.is_empty()).await.unwrap());
    let replayed = backend.entries("user.created").await.pop().unwrap();
    assert!(
        replayed
            .1
            .contains(&("@reason".to_owned(), "mine".to_owned())),
        "{replayed:?}"
    );
    assert!(!replayed.1.iter().any(|(name, _)| name == "@origin_stream"));
    // Replaying what is gone is not an error.
    assert_eq!(
        within("replay again", STEP, dead.replay(letters[0].id))
            .await
            .unwrap(),
        None
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(an_entry_with_thousands_of_fields_is_dead_lettered_and_replayed_whole);
async fn an_entry_with_thousands_of_fields_is_dead_lettered_and_replayed_whole(backend: Backend) {
    let (handler, mut seen) =
        Scripted::new(|_: UserCreated, _| async { Err(HandlerError::permanent("no")) });
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend).handler(handler).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    // More fields than a Redis script can pass to one command (about 8000 values).
    let filler: Vec<String> = (0..3997).map(|i| format!("extra_{i}")).collect();
    let mut fields: Vec<(&str, &[u8])> =
        vec![("user_id", b"u1"), ("user_name", b"n"), ("seq", b"1")];
    fields.extend(filler.iter().map(|name| (name.as_str(), b"x:y".as_slice())));
    let original_id = backend.xadd("user.created", &fields).await;
    recv(&mut seen, "the failing attempt").await;
    backend.until_nothing_pending("user.created", "tests").await;
    let dead = bus.dead_letters("user.created");
    let letters = within("list", STEP, dead.list(None, 10)).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, Some(DeadLetterReason::Permanent));
    assert_eq!(letters[0].fields.len(), 4000, "every field is kept");
    assert_eq!(letters[0].field("extra_3996"), Some("x:y"));

    let replayed = within("replay", STEP, dead.replay(letters[0].id))
        .await
        .unwrap()
        .expect("the dead letter exists");
    let entries = backend.entries("user.created").await;
    let (original, copy) = (&entries[0], entries.last().unwrap());
    assert_eq!(original.0, original_id);
    assert_eq!(copy.0, replayed.to_string());
    assert_eq!(
        copy.1, original.1,
        "the replayed entry has the original fields"
    );
    assert!(
        within("list", STEP, dead.list(None, 10))
            .await
            .unwrap()
            .iter()
            .all(|letter| letter.id != letters[0].id),
        "the replayed dead letter is deleted"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(replay_all_and_purge_work_on_the_whole_dead_letter_stream);
async fn replay_all_and_purge_work_on_the_whole_dead_letter_stream(backend: Backend) {
    let (handler, mut seen) =
        Scripted::new(|_: UserCreated, _| async { Err(HandlerError::permanent("no")) });
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend).handler(handler).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for seq in 0..150 {
        within("publish", STEP, bus.publish(&user(seq)))
            .await
            .unwrap();
    }
    for _ in 0..150 {
        recv(&mut seen, "an attempt").await;
    }
    backend.until_nothing_pending("user.created", "tests").await;
    let dead = bus.dead_letters("user.created");
    assert_eq!(within("len", STEP, dead.len()).await.unwrap(), 150);
    // Paging goes through all of them.
    let mut after = None;
    let mut paged = 0;
    loop {
        let page = within("page", STEP, dead.list(after, 40)).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        paged += page.len();
    }
    assert_eq!(paged, 150);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();

    assert_eq!(
        within("replay all", STEP, dead.replay_all()).await.unwrap(),
        150
    );
    assert_eq!(within("len", STEP, dead.len()).await.unwrap(), 0);
    assert_eq!(backend.stream_len("user.created").await, 300);

    let first = within(
        "purge one",
        STEP,
        bus.dead_letters("other")
            .purge(slim_bus::EntryId::new(1, 1)),
    )
    .await
    .unwrap();
    assert!(!first);
    within("purge all", STEP, dead.purge_all()).await.unwrap();
}

conformance!(dead_letter_streams_are_capped);
async fn dead_letter_streams_are_capped(backend: Backend) {
    let (handler, mut seen) =
        Scripted::new(|_: UserCreated, _| async { Err(HandlerError::permanent("no")) });
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend)
            .dead_letter_max_len(10)
            .max_concurrent(16)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let publisher = within("build", STEP, backend.builder().build())
        .await
        .unwrap();
    for seq in 0..1000 {
        within("publish", STEP, publisher.publish(&user(seq)))
            .await
            .unwrap();
    }
    for _ in 0..1000 {
        recv(&mut seen, "an attempt").await;
    }
    backend.until_nothing_pending("user.created", "tests").await;
    // MAXLEN ~ trims whole nodes of the stream (100 entries each by default), so the cap
    // is approximate, but far below what was written.
    let len = backend.stream_len(DLQ).await;
    assert!(
        (10..300).contains(&len),
        "dead-letter stream has {len} entries"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(an_entry_waiting_for_its_retry_holds_no_slot);
async fn an_entry_waiting_for_its_retry_holds_no_slot(backend: Backend) {
    let (handler, mut seen) =
        Scripted::new(|event: UserCreated, ctx: slim_bus::Context| async move {
            if event.seq == 1 && ctx.delivery_count() == 1 {
                return Err(HandlerError::retry_after(
                    Duration::from_millis(800),
                    "later",
                ));
            }
            Ok(())
        });
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend)
            .claim_min_idle(Duration::from_secs(5))
            .max_concurrent(1)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    let first = recv(&mut seen, "the failing attempt").await;
    let failed_at = tokio::time::Instant::now();
    within("publish", STEP, bus.publish(&user(2)))
        .await
        .unwrap();
    let second = recv(&mut seen, "the next entry, while the first waits").await;
    assert_eq!((first.event.seq, second.event.seq), (1, 2));
    let retry = recv(&mut seen, "the retry").await;
    assert_eq!((retry.event.seq, retry.delivery_count), (1, 2));
    assert!(
        failed_at.elapsed() >= Duration::from_millis(700),
        "the retry came before its delay"
    );
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(pending_entries_deleted_from_the_stream_do_not_loop);
async fn pending_entries_deleted_from_the_stream_do_not_loop(backend: Backend) {
    let own = backend.xadd("user.created", &user_fields(1)).await;
    let theirs = backend.xadd("user.created", &user_fields(2)).await;
    let kept = backend.xadd("user.created", &user_fields(3)).await;
    // consumer-1 (this bus, in a previous life) holds the first, a dead pod the others.
    backend
        .read_as_dead_consumer("user.created", "tests", "consumer-1", 1)
        .await;
    backend
        .read_as_dead_consumer("user.created", "tests", "dead-pod", 2)
        .await;
    assert_eq!(
        backend
            .xdel("user.created", &[own.as_str(), theirs.as_str()])
            .await,
        2
    );

    let (handler, mut seen) = Scripted::new(ok());
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend).handler(handler).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let delivery = recv(&mut seen, "the entry that still exists").await;
    assert_eq!(delivery.entry_id.to_string(), kept);
    backend.until_nothing_pending("user.created", "tests").await;
    assert_eq!(backend.stream_len(DLQ).await, 0);
    assert!(seen.try_recv().is_err());
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test]
async fn claim_and_retry_settings_are_checked() {
    let cases = [
        (
            "claim_min_idle",
            EventBus::builder().claim_min_idle(Duration::ZERO),
        ),
        (
            "claim_interval",
            EventBus::builder().claim_interval(Duration::ZERO),
        ),
        ("max_deliveries", EventBus::builder().max_deliveries(0)),
        (
            "consumer_idle_removal",
            EventBus::builder().consumer_idle_removal(Duration::ZERO),
        ),
        (
            "retry_base",
            EventBus::builder().retry_backoff(Duration::ZERO, Duration::from_secs(1)),
        ),
        (
            "retry_max",
            EventBus::builder().retry_backoff(Duration::from_secs(2), Duration::from_secs(1)),
        ),
        (
            "dead_letter_suffix",
            EventBus::builder().dead_letter_suffix(""),
        ),
        (
            "dead_letter_max_len",
            EventBus::builder().dead_letter_max_len(0),
        ),
    ];
    for (setting, builder) in cases {
        match within("build", STEP, builder.build()).await {
            Err(Error::Config { setting: named, .. }) => assert_eq!(named, setting),
            other => panic!("expected {setting} to be rejected, got {other:?}"),
        }
    }
    // Held entries are kept fresh: a handler may take longer than claim_min_idle.
    within(
        "build",
        STEP,
        EventBus::builder()
            .handler_timeout(Duration::from_secs(300))
            .claim_min_idle(Duration::from_secs(10))
            .retry_backoff(Duration::from_secs(1), Duration::from_secs(5))
            .build(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn settings_left_unset_follow_the_ones_that_are_set() {
    // The retry delays follow a short claim_min_idle, the lease a long command timeout.
    let (handler, _seen) = Record::<UserCreated>::new();
    within(
        "build",
        STEP,
        EventBus::builder()
            .consumer_group("tests")
            .claim_min_idle(Duration::from_secs(2))
            .command_timeout(Duration::from_secs(20))
            .handler(handler)
            .build(),
    )
    .await
    .expect("claim_min_idle(2s) and a long command timeout alone build");

    // Retries are kept fresh while they wait: a long retry_max next to a short
    // claim_min_idle is no conflict.
    within(
        "build",
        STEP,
        EventBus::builder()
            .claim_min_idle(Duration::from_secs(2))
            .retry_backoff(Duration::from_millis(100), Duration::from_secs(2))
            .build(),
    )
    .await
    .expect("retry_max may outlast claim_min_idle");

    // Set both, the pair must agree, and the error names both.

    let err = within(
        "build",
        STEP,
        EventBus::builder()
            .command_timeout(Duration::from_secs(3))
            .consumer_lease_ttl(Duration::from_secs(5))
            .build(),
    )
    .await
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with("invalid setting `consumer_lease_ttl`: (5s)"),
        "{message}"
    );
    assert!(message.contains("command_timeout (3s)"), "{message}");
}

#[tokio::test]
async fn one_build_reports_every_invalid_setting() {
    let err = within(
        "build",
        STEP,
        EventBus::builder()
            .max_deliveries(0)
            .dead_letter_suffix("")
            .build(),
    )
    .await
    .unwrap_err();
    let Error::Config { setting, also, .. } = &err else {
        panic!("expected a config error, got {err:?}");
    };
    let named: Vec<&str> = std::iter::once(*setting)
        .chain(also.iter().map(|invalid| invalid.setting()))
        .collect();
    assert_eq!(named, ["max_deliveries", "dead_letter_suffix"], "{err}");
    let message = err.to_string();
    assert!(
        message.contains("invalid setting `max_deliveries`: must be at least 1; invalid setting `dead_letter_suffix`: must not be empty"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_held_by_a_killed_consumer_process_are_claimed_by_a_live_bus() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let backend = Backend::redis().await;
    let server = backend.server().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_slim-bus-test-consumer"))
        .arg(server.url())
        .arg("doomed-pod")
        .arg("hang")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the consumer process starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_line = async || {
        within("a line from the consumer process", STEP, lines.next_line())
            .await
            .unwrap()
            .expect("the consumer process is running")
    };
    assert_eq!(next_line().await, "listening");
    within("publish", STEP, async {
        let bus = EventBus::builder().url(server.url()).build().await?;
        bus.publish(&user(1)).await
    })
    .await
    .unwrap();
    assert_eq!(next_line().await, "started 1 1");
    within("kill -9", STEP, child.kill()).await.unwrap();
    assert_eq!(pending_count(server, "user.created", "tests").await, 1);

    let (handler, mut seen) = Scripted::new(ok());
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend).handler(handler).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let delivery = recv(&mut seen, "the entry the killed process held").await;
    assert_eq!((delivery.event.seq, delivery.delivery_count), (1, 2));
    until_nothing_pending(server, "user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(a_retry_is_not_held_back_by_an_idle_blocking_read);
async fn a_retry_is_not_held_back_by_an_idle_blocking_read(backend: Backend) {
    let (handler, mut seen) = Scripted::new(|_: UserCreated, ctx: slim_bus::Context| async move {
        if ctx.delivery_count() == 1 {
            Err(HandlerError::new("once"))
        } else {
            Ok(())
        }
    });
    let bus = within(
        "build",
        STEP,
        failing_bus(&backend)
            .block_time(Duration::from_secs(30))
            .claim_interval(Duration::from_secs(60))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    assert_eq!(recv(&mut seen, "the first attempt").await.delivery_count, 1);
    // The reader is blocked for up to 30 s by now; the retry is due in at most 10 ms.
    let retry = within(
        "the retry, long before the block time",
        Duration::from_secs(5),
        seen.recv(),
    )
    .await
    .unwrap();
    assert_eq!(retry.delivery_count, 2);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(consumers_idle_for_long_and_holding_nothing_are_removed_from_the_group);
async fn consumers_idle_for_long_and_holding_nothing_are_removed_from_the_group(backend: Backend) {
    // A pod that read once from an empty stream, and one that died holding an entry.
    backend
        .read_as_dead_consumer("user.created", "tests", "gone-pod", 1)
        .await;
    if let Some(server) = backend.server() {
        // Redis 7.0 creates a consumer only when a read delivers to it.
        let mut conn = server.connection().await;
        let _: i64 = within(
            "XGROUP CREATECONSUMER",
            STEP,
            redis::cmd("XGROUP")
                .arg("CREATECONSUMER")
                .arg("user.created")
                .arg("tests")
                .arg("gone-pod")
                .query_async(&mut conn),
        )
        .await
        .unwrap();
    }
    let fields: &[(&str, &[u8])] = &[("user_id", b"u1"), ("user_name", b"One"), ("seq", b"1")];
    backend.xadd("user.created", fields).await;
    backend
        .read_as_dead_consumer("user.created", "tests", "crashed-pod", 1)
        .await;
    assert_eq!(
        backend.consumers("user.created", "tests").await,
        ["crashed-pod", "gone-pod"]
    );

    let (handler, _seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            // Its entry is not claimed from the crashed pod (claim_min_idle is a minute).
            .claim_interval(Duration::from_millis(100))
            .consumer_idle_removal(Duration::from_millis(500))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("the idle consumer to be removed", STEP, async {
        while backend.consumers("user.created", "tests").await != ["consumer-1", "crashed-pod"] {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        backend.pending_count("user.created", "tests").await,
        1,
        "the consumer holding an entry keeps it"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}
