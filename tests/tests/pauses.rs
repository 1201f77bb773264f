//! Pauses that never stall and health that tells the truth: one poison entry never pauses
//! a stream, a paused quiet stream sees its next entry within about the block time, a
//! deliberate pause is live, `listening` only from a successful `listen()`, and the
//! longest-idle pending entry is the one health reports.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use slim_bus::{EventBus, HandlerError};
use slim_bus_tests::{RedisServer, within};
use support::*;
use tokio::time::Instant;

const DLQ: &str = "{user.created}:dlq";

/// Waits until `done` holds, checking every few milliseconds, for at most `limit`.
async fn until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    within(what, limit, async {
        while !done().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// The cause of a failed attempt.
fn refusal() -> std::io::Error {
    std::io::Error::other("the payload is refused")
}

/// An attempt that failed and may be retried.
fn refused() -> HandlerError {
    HandlerError::new(refusal())
}

conformance!(
    one_poison_entry_is_dead_lettered_without_pausing_and_the_next_entry_is_handled_promptly
);
async fn one_poison_entry_is_dead_lettered_without_pausing_and_the_next_entry_is_handled_promptly(
    backend: Backend,
) {
    // seq 0 always fails: five deliveries, then a dead letter. The retry maximum is far
    // above the block time, so that a pause (probed no sooner than that) would show.
    let (handler, mut seen) = Scripted::new(|event: UserCreated, _| {
        std::future::ready(if event.seq == 0 {
            Err(refused())
        } else {
            Ok(())
        })
    });
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .block_time(Duration::from_millis(100))
            .retry_backoff(Duration::from_millis(10), Duration::from_secs(5))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(0)))
        .await
        .unwrap();
    let mut deliveries = 0;
    while deliveries < 5 {
        let delivery = recv(&mut seen, "a delivery of the poison entry").await;
        assert_eq!(delivery.event.seq, 0);
        deliveries += 1;
        assert_eq!(delivery.delivery_count, deliveries, "retried, not skipped");
    }
    until("the poison entry to be dead-lettered", STEP, async || {
        backend.stream_len(DLQ).await == 1
    })
    .await;
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(
        health.streams[0].paused, None,
        "the retries of one entry never pause a stream: {health:?}"
    );

    // A quiet while first: a blocking read already under way when the entry failed ends,
    // and the next read must be one that the failures did not hold back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    // A couple of block times, with room for a slow machine; a pause would take the 5 s
    // retry maximum at least.
    let delivery = within(
        "the next entry, within a couple of block times",
        Duration::from_secs(2),
        seen.recv(),
    )
    .await
    .unwrap();
    assert_eq!(delivery.event.seq, 1);
    backend.until_nothing_pending("user.created", "tests").await;
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(health.streams[0].paused, None, "{health:?}");
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(a_paused_quiet_stream_sees_a_new_entry_within_about_the_block_time);
async fn a_paused_quiet_stream_sees_a_new_entry_within_about_the_block_time(backend: Backend) {
    // Five different entries fail on their only delivery: reading pauses, and nothing of
    // the stream is held once they are dead letters.
    let (handler, mut seen) = Scripted::new(|event: UserCreated, _| {
        std::future::ready(if event.seq < 5 {
            Err(refused())
        } else {
            Ok(())
        })
    });
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .block_time(Duration::from_millis(100))
            .max_deliveries(1)
            .retry_backoff(Duration::from_millis(10), Duration::from_secs(5))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let failing: Vec<UserCreated> = (0..5).map(user).collect();
    within("publish", STEP, bus.publish_batch(&failing))
        .await
        .unwrap();
    until(
        "the failing entries to be dead-lettered",
        STEP,
        async || backend.stream_len(DLQ).await == 5,
    )
    .await;
    let health = within("health", STEP, bus.health()).await;
    let reason = health.streams[0]
        .paused
        .clone()
        .expect("failures on five different entries pause reading");
    assert!(reason.contains("different entries"), "{reason}");
    for _ in 0..5 {
        recv(&mut seen, "a failing delivery").await;
    }

    // A quiet while: probes find nothing, which must not space the next ones out.
    tokio::time::sleep(Duration::from_secs(1)).await;
    within("publish", STEP, bus.publish(&user(5)))
        .await
        .unwrap();
    let delivery = within(
        "the new entry, within about a block time",
        Duration::from_secs(2),
        seen.recv(),
    )
    .await
    .unwrap();
    assert_eq!(delivery.event.seq, 5);
    backend.until_nothing_pending("user.created", "tests").await;
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(
        health.streams[0].paused, None,
        "its success resumed reading: {health:?}"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(every_paused_quiet_stream_sees_its_next_entry_not_only_the_first);
async fn every_paused_quiet_stream_sees_its_next_entry_not_only_the_first(backend: Backend) {
    let streams = ["probes.first", "probes.second"];
    let bus = streams.iter().fold(
        backend
            .bus()
            .block_time(Duration::from_millis(100))
            .max_deliveries(1)
            .retry_backoff(Duration::from_millis(10), Duration::from_secs(5)),
        |builder, stream| {
            let (handler, _seen) = Scripted::new(|event: UserCreated, _| {
                std::future::ready(if event.seq < 5 {
                    Err(refused())
                } else {
                    Ok(())
                })
            });
            builder.handler_on(*stream, handler)
        },
    );
    let (handler, mut seen) = Scripted::new(|event: UserCreated, _| {
        std::future::ready(if event.seq < 5 {
            Err(refused())
        } else {
            Ok(())
        })
    });
    let bus = within(
        "build",
        STEP,
        bus.handler_on("probes.third", handler).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let failing: Vec<UserCreated> = (0..5).map(user).collect();
    for stream in streams.iter().chain(&["probes.third"]) {
        within("publish", STEP, bus.publish_batch_to(stream, &failing))
            .await
            .unwrap();
    }
    until("every stream to pause", STEP, async || {
        let health = bus.health().await;
        health.streams.iter().all(|stream| stream.paused.is_some())
            && health.streams.iter().all(|stream| stream.pending == 0)
    })
    .await;
    for _ in 0..5 {
        recv(&mut seen, "a failing delivery of the last stream").await;
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    within("publish", STEP, bus.publish_to("probes.third", &user(5)))
        .await
        .unwrap();
    let delivery = within(
        "the new entry of the last paused stream, within about a block time",
        Duration::from_secs(2),
        seen.recv(),
    )
    .await
    .unwrap();
    assert_eq!(delivery.event.seq, 5);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(a_pause_with_every_place_waiting_for_a_retry_is_live_and_a_stopped_listener_is_not);
async fn a_pause_with_every_place_waiting_for_a_retry_is_live_and_a_stopped_listener_is_not(
    backend: Backend,
) {
    // Every attempt fails and asks for a retry in 4 s: the five entries read pause the
    // stream and take every place until then.
    let failing = Arc::new(AtomicBool::new(true));
    let (handler, mut seen) = Scripted::new({
        let failing = failing.clone();
        move |_: UserCreated, _| {
            std::future::ready(if failing.load(Ordering::Relaxed) {
                Err(HandlerError::retry_after(
                    Duration::from_secs(4),
                    std::io::Error::other("the downstream is down"),
                ))
            } else {
                Ok(())
            })
        }
    });
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .block_time(Duration::from_millis(50))
            .command_timeout(Duration::from_millis(500))
            .handler_timeout(Duration::from_millis(200))
            .max_concurrent(1)
            .max_in_flight(5)
            .retry_backoff(Duration::from_millis(10), Duration::from_secs(5))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let users: Vec<UserCreated> = (0..10).map(user).collect();
    within("publish", STEP, bus.publish_batch(&users))
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for _ in 0..5 {
        recv(&mut seen, "a failing delivery").await;
    }
    let stall_after = within("health", STEP, bus.health()).await.read_stall_after;
    assert!(
        stall_after < Duration::from_secs(2),
        "the test needs a short read_stall_after, not {stall_after:?}"
    );

    // For longer than read_stall_after, the reader chooses not to read: live throughout.
    let watched_from = Instant::now();
    let mut paused_seen = false;
    while watched_from.elapsed() < stall_after + Duration::from_millis(800) {
        let health = within("health", STEP, bus.health()).await;
        assert!(health.is_live(), "a deliberate pause is alive: {health:?}");
        paused_seen |= health.streams[0].paused.is_some();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let health = within("health", STEP, bus.health()).await;
    assert!(paused_seen, "reading was paused meanwhile: {health:?}");
    assert!(
        health.since_last_read > Some(stall_after),
        "nothing was read for longer than read_stall_after: {health:?}"
    );
    assert!(health.is_live(), "{health:?}");
    assert!(
        backend.pending_count("user.created", "tests").await <= 5,
        "no more than max_in_flight entries were read"
    );

    failing.store(false, Ordering::Relaxed);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    let health = within("health", STEP, bus.health()).await;
    assert!(!health.listening, "{health:?}");
    assert!(
        !health.is_live(),
        "a stopped listener is not live: {health:?}"
    );
}

conformance!(health_reports_the_longest_idle_pending_entry_not_the_lowest_id);
async fn health_reports_the_longest_idle_pending_entry_not_the_lowest_id(backend: Backend) {
    // seq 0 fails once and is delivered again 1 s later (its idle time starts over), then
    // runs long like seq 1 does from its first delivery: seq 1, the higher id, idles longest.
    let (handler, mut seen) =
        Scripted::new(|event: UserCreated, ctx: slim_bus::Context| async move {
            if event.seq == 0 && ctx.delivery_count() == 1 {
                return Err(HandlerError::retry_after(Duration::from_secs(1), refusal()));
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok(())
        });
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .retry_backoff(Duration::from_millis(10), Duration::from_secs(5))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish_batch(&[user(0), user(1)]))
        .await
        .unwrap();
    let mut second_delivered_at = None;
    let mut first_delivered_again = false;
    while second_delivered_at.is_none() || !first_delivered_again {
        let delivery = recv(&mut seen, "a delivery").await;
        match (delivery.event.seq, delivery.delivery_count) {
            (1, _) => second_delivered_at = Some(Instant::now()),
            (0, 2) => first_delivered_again = true,
            _ => {}
        }
    }
    let second_delivered_at = second_delivered_at.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let health = within("health", STEP, bus.health()).await;
    let idle = health.streams[0]
        .oldest_pending_idle
        .expect("entries are pending");
    // Redis counts idle time in whole milliseconds from a delivery just before the handler
    // reported it; the lowest id was delivered again a second after the other.
    let at_least = second_delivered_at
        .elapsed()
        .saturating_sub(Duration::from_millis(201));
    assert!(
        idle >= at_least,
        "the longest idle ({idle:?}) is that of seq 1, about {:?}",
        second_delivered_at.elapsed()
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// A port nothing listens on now, for a server started later.
fn unused_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_listening_while_listen_waits_for_redis() {
    slim_bus_tests::init_tracing();
    let port = unused_port();
    let (handler, mut seen) = Record::<UserCreated>::new();
    let bus = within(
        "build without redis",
        STEP,
        EventBus::builder()
            .url(format!("redis://127.0.0.1:{port}/"))
            .consumer_group("tests")
            .consumer_name("consumer-1")
            .block_time(Duration::from_millis(200))
            .command_timeout(Duration::from_millis(300))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listening = tokio::spawn({
        let bus = bus.clone();
        async move { bus.listen().await }
    });
    // listen() claims the bus at once and then waits with backoff: look at health()
    // through a few of its attempts.
    let watched_from = Instant::now();
    while watched_from.elapsed() < Duration::from_secs(1) {
        let health = within("health without redis", STEP, bus.health()).await;
        assert!(
            !health.listening,
            "listen() has not succeeded yet: {health:?}"
        );
        assert!(!health.is_ready(), "{health:?}");
        assert!(!health.is_live(), "{health:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!listening.is_finished(), "listen() waits for redis");

    let server = within(
        "redis-server to start on the bus's port",
        STEP,
        RedisServer::builder().port(port).start(),
    )
    .await
    .unwrap();
    let listener = within("listen once redis answers", STEP, listening)
        .await
        .unwrap()
        .unwrap();
    let health = within("health", STEP, bus.health()).await;
    assert!(health.listening, "{health:?}");
    assert!(health.is_ready() && health.is_live(), "{health:?}");
    let id = within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    assert_eq!(recv(&mut seen, "the delivery").await.entry_id, id);
    until_nothing_pending(&server, "user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    assert!(!within("health", STEP, bus.health()).await.listening);
}
