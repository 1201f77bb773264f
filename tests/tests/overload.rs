//! Overload and failure semantics: a failing handler or an outage never drains the backlog
//! into dead letters. A consumer holds at most `max_in_flight` entries, stops reading while
//! every attempt fails, leaves the rest to healthy consumers, and keeps every dead letter.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slim_bus::{EventBus, HandlerError};
use slim_bus_tests::within;
use support::*;
use tokio::sync::mpsc;

const DLQ: &str = "{user.created}:dlq";

/// Publishes `count` users, `seq` 0 to `count - 1`, in batches.
async fn publish_users(bus: &EventBus, count: u64) {
    let users: Vec<UserCreated> = (0..count).map(user).collect();
    for batch in users.chunks(500) {
        within("publish a batch", STEP, bus.publish_batch(batch))
            .await
            .unwrap();
    }
}

/// Waits until `done` holds, checking every few milliseconds, for at most `limit`.
async fn until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    within(what, limit, async {
        while !done().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// A handler that always fails, counting its calls.
fn always_failing(calls: Arc<AtomicUsize>) -> Scripted<UserCreated> {
    Scripted::new(move |_, _| {
        calls.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Err(HandlerError::new(std::io::Error::other(
            "the downstream refused",
        ))))
    })
    .0
}

conformance!(a_failing_consumer_never_holds_more_than_max_in_flight_entries_and_pauses);
async fn a_failing_consumer_never_holds_more_than_max_in_flight_entries_and_pauses(
    backend: Backend,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .max_concurrent(2)
            .max_in_flight(8)
            .max_deliveries(1_000)
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(40))
            .handler(always_failing(calls.clone()))
            .build(),
    )
    .await
    .unwrap();
    publish_users(&bus, 2_000).await;
    let listener = within("listen", STEP, bus.listen()).await.unwrap();

    // Retries go on while reading is paused: sample what the consumer holds meanwhile.
    let mut most_held = 0;
    while calls.load(Ordering::Relaxed) < 200 {
        most_held = most_held.max(
            backend
                .pending_of("user.created", "tests", "consumer-1")
                .await,
        );
        within(
            "a few retries",
            STEP,
            tokio::time::sleep(Duration::from_millis(2)),
        )
        .await;
    }
    assert!(
        most_held <= 8,
        "the consumer held {most_held} entries, more than max_in_flight"
    );
    let health = within("health", STEP, bus.health()).await;
    let reason = health.streams[0]
        .paused
        .clone()
        .expect("reading is paused while every attempt fails");
    assert!(reason.contains("the downstream refused"), "{reason}");
    assert!(
        backend.pending_count("user.created", "tests").await <= 8,
        "no more than max_in_flight entries were read at all"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(a_healthy_consumer_handles_what_a_failing_one_in_its_group_cannot);
async fn a_healthy_consumer_handles_what_a_failing_one_in_its_group_cannot(backend: Backend) {
    const ENTRIES: u64 = 2_000;
    let fast_retries = |name: &str| {
        backend
            .bus()
            .consumer_name(name)
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
    };
    let failing = within(
        "build the failing consumer",
        STEP,
        fast_retries("failing")
            .handler(always_failing(Arc::default()))
            .build(),
    )
    .await
    .unwrap();
    let (handler, mut seen) = Scripted::new(|_: UserCreated, _| async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(())
    });
    let healthy = within(
        "build the healthy consumer",
        STEP,
        fast_retries("healthy").handler(handler).build(),
    )
    .await
    .unwrap();
    let failing_listener = within("listen", STEP, failing.listen()).await.unwrap();
    let healthy_listener = within("listen", STEP, healthy.listen()).await.unwrap();
    publish_users(&healthy, ENTRIES).await;

    // Every entry ends handled by the healthy consumer or dead-lettered by the failing one.
    let mut handled = HashSet::new();
    let limit = Duration::from_secs(30);
    until(
        "every entry to be handled or dead-lettered",
        limit,
        async || {
            while let Ok(delivery) = seen.try_recv() {
                handled.insert(delivery.event.seq);
            }
            handled.len() + backend.stream_len(DLQ).await >= ENTRIES as usize
        },
    )
    .await;
    backend.until_nothing_pending("user.created", "tests").await;
    let dead = backend.stream_len(DLQ).await;
    assert_eq!(
        handled.len() + dead,
        ENTRIES as usize,
        "no entry lost, none both handled and dead-lettered"
    );
    assert!(
        handled.len() as u64 >= ENTRIES * 95 / 100,
        "the healthy consumer handled only {} of {ENTRIES} ({dead} dead-lettered by the failing one)",
        handled.len()
    );
    within("shutdown", STEP, failing_listener.shutdown())
        .await
        .unwrap();
    within("shutdown", STEP, healthy_listener.shutdown())
        .await
        .unwrap();
}

conformance!(an_outage_dead_letters_no_more_than_max_in_flight_and_the_rest_is_handled);
async fn an_outage_dead_letters_no_more_than_max_in_flight_and_the_rest_is_handled(
    backend: Backend,
) {
    const ENTRIES: u64 = 5_000;
    const MAX_IN_FLIGHT: usize = 128;
    let outage = Arc::new(AtomicBool::new(true));
    let failed = Arc::new(AtomicUsize::new(0));
    let handled = Arc::new(Mutex::new(HashSet::new()));
    let (handler, _seen) = Scripted::new({
        let (outage, failed, handled) = (outage.clone(), failed.clone(), handled.clone());
        move |event: UserCreated, _| {
            let result = if outage.load(Ordering::Relaxed) {
                failed.fetch_add(1, Ordering::Relaxed);
                Err(HandlerError::new(std::io::Error::other("downstream down")))
            } else {
                handled.lock().unwrap().insert(event.seq);
                Ok(())
            };
            std::future::ready(result)
        }
    });
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .max_in_flight(MAX_IN_FLIGHT)
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(100))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    publish_users(&bus, ENTRIES).await;
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    // The downstream is down for three seconds: long enough for every held entry to
    // exhaust its deliveries (10 + 20 + 40 + 80 ms of backoff).
    until("the handler to fail", STEP, async || {
        failed.load(Ordering::Relaxed) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    outage.store(false, Ordering::Relaxed);

    let handled_count = || handled.lock().unwrap().len();
    until(
        "the backlog to be worked off",
        Duration::from_secs(60),
        async || handled_count() + backend.stream_len(DLQ).await >= ENTRIES as usize,
    )
    .await;
    backend.until_nothing_pending("user.created", "tests").await;
    let dead = backend.stream_len(DLQ).await;
    let handled = handled_count();
    assert!(
        dead <= MAX_IN_FLIGHT,
        "{dead} entries were dead-lettered during the outage, more than max_in_flight"
    );
    assert_eq!(
        handled + dead,
        ENTRIES as usize,
        "every other entry was handled"
    );
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(health.streams[0].paused, None, "reading resumed");
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(every_permanent_failure_is_kept_as_a_dead_letter_by_default);
async fn every_permanent_failure_is_kept_as_a_dead_letter_by_default(backend: Backend) {
    const ENTRIES: u64 = 12_000;
    let (handler, _seen) = Scripted::new(|_: UserCreated, _| {
        std::future::ready(Err(HandlerError::permanent(std::io::Error::other(
            "never valid",
        ))))
    });
    let bus = within("build", STEP, backend.bus().handler(handler).build())
        .await
        .unwrap();
    publish_users(&bus, ENTRIES).await;
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    until(
        "every entry to be dead-lettered",
        Duration::from_secs(60),
        async || backend.stream_len(DLQ).await >= ENTRIES as usize,
    )
    .await;
    backend.until_nothing_pending("user.created", "tests").await;
    assert_eq!(backend.stream_len(DLQ).await, ENTRIES as usize);
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(health.streams[0].dead_letters, ENTRIES);
    assert_eq!(health.streams[0].dead_letters_trimmed, 0);
    assert_eq!(
        health.streams[0].paused, None,
        "permanent failures say nothing about the handler's health"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(a_dead_letter_cap_counts_what_it_trims);
async fn a_dead_letter_cap_counts_what_it_trims(backend: Backend) {
    const ENTRIES: u64 = 1_000;
    let (handler, _seen) = Scripted::new(|_: UserCreated, _| {
        std::future::ready(Err(HandlerError::permanent(std::io::Error::other("no"))))
    });
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .dead_letter_max_len(100)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    publish_users(&bus, ENTRIES).await;
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let limit = Duration::from_secs(30);
    until(
        "every entry to be dead-lettered or trimmed",
        limit,
        async || {
            let health = bus.health().await;
            health
                .streams
                .first()
                .is_some_and(|stream| stream.dead_letters + stream.dead_letters_trimmed >= ENTRIES)
        },
    )
    .await;
    let health = within("health", STEP, bus.health()).await;
    let stream = &health.streams[0];
    assert_eq!(stream.dead_letters + stream.dead_letters_trimmed, ENTRIES);
    assert!(
        stream.dead_letters_trimmed > 0,
        "the cap trimmed: {stream:?}"
    );
    assert_eq!(stream.dead_letters as usize, backend.stream_len(DLQ).await);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(a_busy_stream_next_to_an_idle_one_is_not_held_back_by_its_blocking_reads);
async fn a_busy_stream_next_to_an_idle_one_is_not_held_back_by_its_blocking_reads(
    backend: Backend,
) {
    let (busy, mut seen) = Record::<UserCreated>::new();
    let (idle, _idle_seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .max_concurrent(1)
            .block_time(Duration::from_secs(5))
            .handler_on("busy", busy)
            .handler_on("idle", idle)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    // Let the reader find both streams empty and block on them.
    until("a read", STEP, async || {
        bus.health().await.since_last_read.is_some()
    })
    .await;
    let users: Vec<UserCreated> = (0..10).map(user).collect();
    within("publish", STEP, bus.publish_batch_to("busy", &users))
        .await
        .unwrap();
    // A read that blocked on the idle stream alone would hold each entry back for the
    // 5 s block time.
    within(
        "ten entries of the busy stream",
        Duration::from_secs(4),
        async {
            for _ in 0..10 {
                seen.recv().await.expect("the handler stays registered");
            }
        },
    )
    .await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dead_letter_move_is_retried_without_running_the_handler_again() {
    let server = start_server().await;
    let mut conn = server.connection().await;
    // A dead-letter key of the wrong type makes every move fail until it is removed.
    let _: () = within(
        "SET",
        STEP,
        redis::AsyncCommands::set(&mut conn, DLQ, "not a stream"),
    )
    .await
    .unwrap();
    let (handler, mut seen) = Scripted::new(|_: UserCreated, _| {
        std::future::ready(Err(HandlerError::permanent(std::io::Error::other(
            "invalid order",
        ))))
    });
    let bus = within("build", STEP, bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    recv(&mut seen, "the handler to run").await;
    until("the failing move to show in health", STEP, async || {
        bus.health()
            .await
            .streams
            .first()
            .is_some_and(|s| s.dead_letter_moves_failing == 1)
    })
    .await;
    let _: () = within("DEL", STEP, redis::AsyncCommands::del(&mut conn, DLQ))
        .await
        .unwrap();
    until("the dead letter", STEP, async || {
        stream_len(&server, DLQ).await == 1
    })
    .await;
    let letters = within(
        "list",
        STEP,
        bus.dead_letters("user.created").list(None, 10),
    )
    .await
    .unwrap();
    assert_eq!(
        letters[0].reason,
        Some(slim_bus::DeadLetterReason::Permanent)
    );
    assert!(
        letters[0].error.contains("invalid order"),
        "{}",
        letters[0].error
    );
    assert!(
        seen.try_recv().is_err(),
        "the handler ran once: only the move was tried again"
    );
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(health.streams[0].dead_letter_moves_failing, 0);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_handler_that_blocks_its_thread_to_flush_acks() {
    let server = start_server().await;
    let (unblock, blocked) = std::sync::mpsc::channel::<()>();
    let blocked = Mutex::new(blocked);
    let (started, mut started_rx) = mpsc::unbounded_channel();
    let (handler, _seen) = Scripted::new(move |event: UserCreated, _| {
        if event.seq == 0 {
            let _ = started.send(());
            // Blocks its worker thread, as a synchronous call would, until the test ends.
            let _ = blocked
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(20));
        }
        std::future::ready(Ok(()))
    });
    let command_timeout = Duration::from_secs(2);
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .command_timeout(command_timeout)
            .shutdown_grace(Duration::from_millis(100))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(0)))
        .await
        .unwrap();
    recv(&mut started_rx, "the blocking handler to start").await;
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    until("the other entry to be acknowledged", STEP, async || {
        pending_count(&server, "user.created", "tests").await == 1
    })
    .await;
    // Grace (100 ms) and the wait for abandoned handlers (1 s) pass; the acks are flushed
    // already, so nothing waits for the blocked handler's ack sender.
    within(
        "shutdown past a blocked handler",
        Duration::from_millis(100) + Duration::from_secs(1) + command_timeout,
        listener.shutdown(),
    )
    .await
    .unwrap();
    drop(unblock);
}

/// How often the server has run `CLIENT UNBLOCK`, from `INFO commandstats`.
async fn client_unblock_calls(server: &slim_bus_tests::RedisServer) -> u64 {
    let mut conn = server.connection().await;
    let info: String = within(
        "INFO commandstats",
        STEP,
        redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn),
    )
    .await
    .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_client|unblock:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_while_a_backlog_is_read_do_not_send_client_unblock() {
    const ENTRIES: u64 = 1_000;
    let server = start_server().await;
    let handled = Arc::new(AtomicUsize::new(0));
    let (handler, _seen) = Scripted::new({
        let handled = handled.clone();
        move |event: UserCreated, ctx: slim_bus::Context| {
            // One entry in ten fails once.
            let result = if event.seq.is_multiple_of(10) && ctx.delivery_count() == 1 {
                Err(HandlerError::new(std::io::Error::other("transient")))
            } else {
                handled.fetch_add(1, Ordering::Relaxed);
                Ok(())
            };
            std::future::ready(result)
        }
    });
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    publish_users(&bus, ENTRIES).await;
    let before = client_unblock_calls(&server).await;
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    until("every entry to be handled", STEP, async || {
        handled.load(Ordering::Relaxed) as u64 == ENTRIES
    })
    .await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    // A failure wakes the reader only when it blocks on empty streams and the retry is due
    // before the read returns: not while the backlog is read. Once it is drained, the last
    // retries may wake the blocked read.
    let calls = client_unblock_calls(&server).await - before;
    assert!(
        calls <= 10,
        "{calls} CLIENT UNBLOCK calls for {} failed attempts",
        ENTRIES / 10
    );
}

conformance!(a_paused_stream_still_claims_what_a_dead_consumer_left);
async fn a_paused_stream_still_claims_what_a_dead_consumer_left(backend: Backend) {
    // Every entry but seq 100 fails: five of them pause reading and are dead-lettered.
    let (handler, mut seen) = Scripted::new(|event: UserCreated, _| {
        std::future::ready(if event.seq == 100 {
            Ok(())
        } else {
            Err(HandlerError::new(std::io::Error::other("downstream down")))
        })
    });
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .max_deliveries(2)
            .handler_timeout(Duration::from_millis(200))
            .claim_min_idle(Duration::from_millis(300))
            .claim_interval(Duration::from_millis(50))
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(20))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    // A consumer that died holding an entry the handler takes; it becomes claimable after
    // 300 ms, long after reading has paused.
    within("publish", STEP, bus.publish(&user(100)))
        .await
        .unwrap();
    backend
        .read_as_dead_consumer("user.created", "tests", "dead-pod", 1)
        .await;
    let failing: Vec<UserCreated> = (0..5).map(user).collect();
    within("publish", STEP, bus.publish_batch(&failing))
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    until(
        "the failing entries to be dead-lettered",
        STEP,
        async || backend.stream_len(DLQ).await == 5,
    )
    .await;
    let health = within("health", STEP, bus.health()).await;
    assert!(health.streams[0].paused.is_some(), "{health:?}");
    loop {
        let delivery = recv(&mut seen, "the dead consumer's entry").await;
        if delivery.event.seq == 100 {
            assert_eq!(delivery.delivery_count, 2, "claimed from the dead consumer");
            break;
        }
    }
    backend.until_nothing_pending("user.created", "tests").await;
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(
        health.streams[0].paused, None,
        "the claimed entry's success resumed reading"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}
