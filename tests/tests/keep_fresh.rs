//! What a consumer holds stays its own while it works on it, and goes to the others when it
//! stops: handlers longer than `claim_min_idle` and dead-letter moves that keep failing are
//! never claimed by a live consumer, a consumer that shuts down hands over what it will not
//! finish, and a claim whose reply was lost does not leave entries untracked.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use slim_bus::{EventBusBuilder, HandlerError, MemoryBroker};
use slim_bus_tests::{RedisServer, within};
use support::*;

const DLQ: &str = "{user.created}:dlq";

async fn until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    within(what, limit, async {
        while !done().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// A consumer of the group that scans for stale entries every 50 ms.
fn scanning(backend: &Backend, name: &str, claim_min_idle: Duration) -> EventBusBuilder {
    backend
        .bus()
        .consumer_name(name)
        .claim_min_idle(claim_min_idle)
        .claim_interval(Duration::from_millis(50))
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
}

/// The delivery count Redis keeps for entry `id` of the group `tests`.
async fn delivery_count(server: &RedisServer, stream: &str, id: slim_bus::EntryId) -> i64 {
    let mut conn = server.connection().await;
    let rows: Vec<(String, String, i64, i64)> = within(
        "XPENDING of one entry",
        STEP,
        redis::cmd("XPENDING")
            .arg(stream)
            .arg("tests")
            .arg(id.to_string())
            .arg(id.to_string())
            .arg(1)
            .query_async(&mut conn),
    )
    .await
    .unwrap();
    rows.first().map_or(0, |row| row.3)
}

conformance!(a_handler_running_longer_than_claim_min_idle_is_never_claimed_by_a_live_consumer);
async fn a_handler_running_longer_than_claim_min_idle_is_never_claimed_by_a_live_consumer(
    backend: Backend,
) {
    let claim_min_idle = Duration::from_millis(300);
    let (slow, mut started) = Scripted::new(move |_: UserCreated, _| async move {
        tokio::time::sleep(claim_min_idle * 4).await;
        Ok::<_, HandlerError>(())
    });
    // A handler timeout far above claim_min_idle is a valid setting.
    let worker = within(
        "build",
        STEP,
        scanning(&backend, "slow-pod", claim_min_idle)
            // Its own scans would claim the entry back to itself: only the other scans.
            .claim_interval(Duration::from_secs(3600))
            .handler_timeout(Duration::from_secs(5))
            .handler(slow)
            .build(),
    )
    .await
    .unwrap();
    let worker = within("listen", STEP, worker.listen()).await.unwrap();
    let publisher = within("build", STEP, backend.builder().build())
        .await
        .unwrap();
    within("publish", STEP, publisher.publish(&user(1)))
        .await
        .unwrap();
    let first = recv(&mut started, "the slow handler to start").await;
    assert_eq!(
        (first.consumer.as_str(), first.delivery_count),
        ("slow-pod", 1)
    );

    let (other, mut claimed) = Scripted::new(|_: UserCreated, _| async { Ok(()) });
    let scanner = within(
        "build",
        STEP,
        scanning(&backend, "scanning-pod", claim_min_idle)
            .handler(other)
            .build(),
    )
    .await
    .unwrap();
    let scanner = within("listen", STEP, scanner.listen()).await.unwrap();
    backend.until_nothing_pending("user.created", "tests").await;
    assert!(
        claimed.try_recv().is_err(),
        "the live consumer's entry was never claimed"
    );
    assert!(started.try_recv().is_err(), "it ran once");
    within("shutdown", STEP, scanner.shutdown()).await.unwrap();
    within("shutdown", STEP, worker.shutdown()).await.unwrap();
}

conformance!(a_consumer_that_shuts_down_hands_what_it_will_not_finish_to_a_live_one);
async fn a_consumer_that_shuts_down_hands_what_it_will_not_finish_to_a_live_one(backend: Backend) {
    // Long enough that without the hand-over nothing would be claimed within a step.
    let claim_min_idle = Duration::from_secs(60);
    let (stuck, mut started) = Scripted::new(|event: UserCreated, _| async move {
        if event.seq == 0 {
            // Waits for its retry when the consumer stops.
            return Err(HandlerError::retry_after(
                Duration::from_secs(30),
                std::io::Error::other("not yet"),
            ));
        }
        std::future::pending::<Result<(), HandlerError>>().await
    });
    let leaving = within(
        "build",
        STEP,
        scanning(&backend, "leaving-pod", claim_min_idle)
            .handler_timeout(Duration::from_secs(600))
            .shutdown_grace(Duration::from_millis(100))
            .handler(stuck)
            .build(),
    )
    .await
    .unwrap();
    let leaving = within("listen", STEP, leaving.listen()).await.unwrap();
    let publisher = within("build", STEP, backend.builder().build())
        .await
        .unwrap();
    for seq in 0..3 {
        within("publish", STEP, publisher.publish(&user(seq)))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        recv(&mut started, "the leaving consumer to start").await;
    }

    let (handler, mut seen) = Scripted::new(|_: UserCreated, _| async { Ok(()) });
    let staying = within(
        "build",
        STEP,
        scanning(&backend, "staying-pod", claim_min_idle)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let staying = within("listen", STEP, staying.listen()).await.unwrap();
    within("shutdown past the grace period", STEP, leaving.shutdown())
        .await
        .unwrap();
    let mut handled = Vec::new();
    for _ in 0..3 {
        let delivery = recv(&mut seen, "an entry the leaving consumer held").await;
        assert_eq!(delivery.consumer, "staying-pod");
        handled.push((delivery.event.seq, delivery.delivery_count));
    }
    handled.sort_unstable();
    // The hand-over keeps the delivery counts: one delivery each before, this one now.
    assert_eq!(handled, [(0, 2), (1, 2), (2, 2)]);
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, staying.shutdown()).await.unwrap();
}

/// A bus whose dead-letter key holds a string, so every move fails until it is deleted.
async fn failing_moves(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    let mut conn = server.connection().await;
    let _: () = within(
        "SET",
        STEP,
        redis::AsyncCommands::set(&mut conn, DLQ, "not a stream"),
    )
    .await
    .unwrap();
    conn
}

// Redis only: the in-memory backend has no key of another type to make moves fail with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_whose_dead_letter_move_keeps_failing_is_never_run_again() {
    let backend = Backend::redis().await;
    let server = backend.server().unwrap();
    let mut conn = failing_moves(server).await;
    let claim_min_idle = Duration::from_secs(1);
    let permanent = || {
        Scripted::new(|_: UserCreated, _| async {
            Err(HandlerError::permanent(std::io::Error::other(
                "invalid order",
            )))
        })
    };
    let (handler, mut seen) = permanent();
    let bus = within(
        "build",
        STEP,
        scanning(&backend, "consumer-1", claim_min_idle)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let id = within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    let first = recv(&mut seen, "the handler to run").await;
    assert_eq!(first.delivery_count, 1);
    // Another live consumer of the group, scanning too.
    let (other_handler, mut other_seen) = permanent();
    let other = within(
        "build",
        STEP,
        scanning(&backend, "consumer-2", claim_min_idle)
            .handler(other_handler)
            .build(),
    )
    .await
    .unwrap();
    let other = within("listen", STEP, other.listen()).await.unwrap();
    // Four times claim_min_idle of failing moves: each scan of either consumer would have
    // run the handler again.
    let again = tokio::time::timeout(claim_min_idle * 4, async {
        tokio::select! {
            _ = seen.recv() => {}
            _ = other_seen.recv() => {}
        }
    })
    .await;
    assert!(again.is_err(), "the handler ran once");
    assert_eq!(delivery_count(server, "user.created", id).await, 1);
    let failing = within("health", STEP, bus.health()).await.streams[0].dead_letter_moves_failing;
    assert!(failing <= 1, "one move loop, not {failing}");
    let _: () = within("DEL", STEP, redis::AsyncCommands::del(&mut conn, DLQ))
        .await
        .unwrap();
    until("the dead letter", STEP, async || {
        stream_len(server, DLQ).await == 1
    })
    .await;
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, other.shutdown()).await.unwrap();
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    assert_eq!(stream_len(server, DLQ).await, 1, "dead-lettered once");
}

// Redis only, for the same reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_on_the_last_delivery_does_not_cancel_its_dead_letter_move() {
    let backend = Backend::redis().await;
    let server = backend.server().unwrap();
    let mut conn = failing_moves(server).await;
    let (hanging, mut seen) =
        Scripted::new(|_: UserCreated, _| std::future::pending::<Result<(), HandlerError>>());
    let bus = within(
        "build",
        STEP,
        scanning(&backend, "consumer-1", Duration::from_secs(60))
            .handler_timeout(Duration::from_millis(100))
            .max_deliveries(1)
            .handler(hanging)
            .build(),
    )
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
    // The move is still tried: the dead letter arrives long before any claim could.
    until("the dead letter", STEP, async || {
        stream_len(server, DLQ).await == 1
    })
    .await;
    let letters = within(
        "list",
        STEP,
        bus.dead_letters("user.created").list(None, 10),
    )
    .await
    .unwrap();
    assert_eq!(letters[0].reason, Some(slim_bus::DeadLetterReason::Timeout));
    assert!(seen.try_recv().is_err(), "the handler ran once");
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

// The in-memory backend only: it can lose the reply of a command that ran.
#[tokio::test(start_paused = true)]
async fn entries_claimed_in_a_reply_that_was_lost_are_found_again_and_run() {
    let backend = Backend::memory();
    let Backend::Memory(broker) = &backend else {
        unreachable!("a memory backend")
    };
    let broker: MemoryBroker = broker.clone();
    for seq in 0..3 {
        backend.xadd("user.created", &user_fields(seq)).await;
    }
    backend
        .read_as_dead_consumer("user.created", "tests", "dead-pod", 10)
        .await;
    broker.lose_next_reply("XAUTOCLAIM");
    let claim_min_idle = Duration::from_secs(8);
    let (handler, mut seen) = Scripted::new(|_: UserCreated, _| async { Ok(()) });
    let bus = within(
        "build",
        STEP,
        scanning(&backend, "consumer-1", claim_min_idle)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    // The first scan, after claim_min_idle, claims all three and loses the reply: they are
    // found again at once, not when they have gone stale a second time.
    let mut handled = Vec::new();
    within(
        "the claimed entries to run",
        claim_min_idle + claim_min_idle / 2,
        async {
            for _ in 0..3 {
                let delivery = recv(&mut seen, "a claimed entry").await;
                handled.push(delivery.event.seq);
            }
        },
    )
    .await;
    handled.sort_unstable();
    assert_eq!(handled, [0, 1, 2]);
    backend.until_nothing_pending("user.created", "tests").await;
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

// The in-memory backend only, as above.
#[tokio::test(start_paused = true)]
async fn an_entry_whose_retry_claim_lost_its_reply_is_still_retried() {
    let backend = Backend::memory();
    let Backend::Memory(broker) = &backend else {
        unreachable!("a memory backend")
    };
    broker.lose_next_reply("XCLAIM");
    let (handler, mut seen) = Scripted::new(|_: UserCreated, ctx: slim_bus::Context| async move {
        if ctx.delivery_count() == 1 {
            return Err(HandlerError::new(std::io::Error::other("once")));
        }
        Ok(())
    });
    let bus = within(
        "build",
        STEP,
        scanning(&backend, "consumer-1", Duration::from_secs(60))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    recv(&mut seen, "the first delivery").await;
    // The claim for the retry ran, its reply was lost: the retry is claimed again rather
    // than taken for another consumer's claim (which would leave it untouched until a
    // claim scan found it stale, a minute later).
    let retried = recv(&mut seen, "the retry").await;
    assert!(retried.delivery_count >= 2);
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

// Redis only: the test makes a held entry look stale from outside, which the in-memory
// backend has no command for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_scan_never_runs_an_entry_this_consumer_holds_a_second_time() {
    let backend = Backend::redis().await;
    let server = backend.server().unwrap();
    let (release, released) = tokio::sync::watch::channel(false);
    let (handler, mut seen) = Scripted::new(move |_: UserCreated, _| {
        let mut released = released.clone();
        async move {
            let _ = released.wait_for(|go| *go).await;
            Ok::<_, HandlerError>(())
        }
    });
    let bus = within(
        "build",
        STEP,
        scanning(&backend, "consumer-1", Duration::from_secs(10))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let id = within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    recv(&mut seen, "the handler to start").await;
    // As if this consumer had stalled for longer than claim_min_idle: its own next claim
    // scan finds the entry stale while its handler still runs.
    let mut conn = server.connection().await;
    let _: redis::Value = within(
        "XCLAIM ... IDLE",
        STEP,
        redis::cmd("XCLAIM")
            .arg("user.created")
            .arg("tests")
            .arg("consumer-1")
            .arg(0)
            .arg(id.to_string())
            .arg("IDLE")
            .arg(600_000)
            .arg("JUSTID")
            .query_async(&mut conn),
    )
    .await
    .unwrap();
    let again = tokio::time::timeout(Duration::from_millis(500), seen.recv()).await;
    assert!(again.is_err(), "the entry ran a second time");
    release.send(true).unwrap();
    backend.until_nothing_pending("user.created", "tests").await;
    assert!(seen.try_recv().is_err(), "it ran once");
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

// Redis only: the crashed consumer runs on a runtime of its own, which the test drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_consumers_entries_are_still_claimed_after_claim_min_idle() {
    let backend = Backend::redis().await;
    let server = backend.server().unwrap();
    let claim_min_idle = Duration::from_secs(1);
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let (crash, crashed) = std::sync::mpsc::channel::<()>();
    let url = server.url();
    // A consumer whose process dies while its handler runs: its runtime is dropped, and
    // with it the task that kept its entry fresh. No shutdown, so no hand-over either.
    let crashing = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.spawn(async move {
            let (hanging, mut seen) = Scripted::new(|_: UserCreated, _| {
                std::future::pending::<Result<(), HandlerError>>()
            });
            let bus = slim_bus::EventBus::builder()
                .url(url)
                .consumer_group("tests")
                .consumer_name("crashing-pod")
                .block_time(Duration::from_millis(200))
                .handler_timeout(Duration::from_secs(600))
                .claim_min_idle(claim_min_idle)
                .retry_backoff(Duration::from_millis(10), Duration::from_millis(100))
                .handler(hanging)
                .build()
                .await
                .unwrap();
            let listener = bus.listen().await.unwrap();
            bus.publish(&user(1)).await.unwrap();
            let first = seen.recv().await.unwrap();
            let _ = started_tx.send(first.delivery_count);
            // Listening until the runtime goes: never shut down.
            std::future::pending::<()>().await;
            drop(listener);
        });
        let _ = crashed.recv_timeout(STEP);
        runtime.shutdown_background();
    });
    assert_eq!(
        recv(&mut started, "the crashing consumer to start").await,
        1
    );

    let (handler, mut seen) = Scripted::new(|_: UserCreated, _| async { Ok(()) });
    let bus = within(
        "build",
        STEP,
        scanning(&backend, "consumer-1", claim_min_idle)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    crash.send(()).unwrap();
    within("the crashing runtime to go", STEP, async {
        while !crashing.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let delivery = recv(&mut seen, "the crashed consumer's entry").await;
    assert_eq!((delivery.event.seq, delivery.delivery_count), (1, 2));
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

// The in-memory backend only, as above.
#[tokio::test(start_paused = true)]
async fn a_claim_whose_reply_was_lost_delivers_no_held_entry_again() {
    let backend = Backend::memory();
    let Backend::Memory(broker) = &backend else {
        unreachable!("a memory backend")
    };
    let broker: MemoryBroker = broker.clone();
    let (release, released) = tokio::sync::watch::channel(false);
    let (handler, mut seen) = Scripted::new(move |event: UserCreated, _| {
        let mut released = released.clone();
        async move {
            if event.seq == 1 {
                let _ = released.wait_for(|go| *go).await;
            }
            Ok(())
        }
    });
    let claim_min_idle = Duration::from_secs(8);
    let bus = within(
        "build",
        STEP,
        scanning(&backend, "consumer-1", claim_min_idle)
            .handler_timeout(Duration::from_secs(600))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    backend.xadd("user.created", &user_fields(1)).await;
    let running = recv(&mut seen, "entry 1 running").await;
    assert_eq!(running.event.seq, 1);
    // A consumer that dies holding entry 2; a claim scan of consumer-1 loses its reply
    // while entry 1 runs: looking for what the lost reply may have given consumer-1 must
    // not deliver entry 1 again, and must find entry 2 if that reply claimed it.
    backend.xadd("user.created", &user_fields(2)).await;
    backend
        .read_as_dead_consumer("user.created", "tests", "dead-pod", 1)
        .await;
    broker.lose_next_reply("XAUTOCLAIM");
    let claimed = within("the dead consumer's entry", claim_min_idle * 2, async {
        recv(&mut seen, "entry 2, claimed").await
    })
    .await;
    assert_eq!(claimed.event.seq, 2, "{claimed:?}");
    let held = broker
        .pending("user.created", "tests")
        .into_iter()
        .find(|entry| entry.id == running.entry_id)
        .expect("entry 1 is pending while it runs");
    assert_eq!(held.delivery_count, 1, "entry 1 was delivered again");
    release.send(true).unwrap();
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}
