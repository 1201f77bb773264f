//! An entry stays with the consumer that holds it, and only with it: a retry never takes an
//! entry back from a live consumer, a bus whose name was taken leaves its successor's
//! entries alone, and what a consumer holds when its group is lost is still handled. Each
//! test says in its comment the interleaving it forces.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::Ipv4Addr;
use std::time::Duration;

use slim_bus::{EventBus, HandlerError};
use slim_bus_tests::{Proxy, within};
use support::*;

fn user_fields(seq: u64) -> Vec<(&'static str, &'static [u8])> {
    let seq: &'static str = Box::leak(seq.to_string().into_boxed_str());
    vec![
        ("user_id", b"u".as_slice()),
        ("user_name", b"name".as_slice()),
        ("seq", seq.as_bytes()),
    ]
}

/// A port nothing listens on.
fn unused_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

// A held entry waiting for an asked retry (`retry_after`) while a claim scan of this
// consumer loses its reply: looking for what the lost reply gave this consumer does not
// deliver the held entry again, and the retry still runs at its time (not a whole
// claim_min_idle later, when a claim scan would find it stale).
//
// In-memory only: it is the backend that can lose the reply of a command that ran.
#[tokio::test(start_paused = true)]
async fn an_asked_retry_re_read_after_a_lost_claim_reply_still_runs_at_its_time() {
    let backend = Backend::memory();
    let Backend::Memory(broker) = &backend else {
        unreachable!("a memory backend")
    };
    let broker = broker.clone();
    // A dead consumer's entry, for the claim scan to find stale after claim_min_idle.
    backend.xadd("user.created", &user_fields(100)).await;
    backend
        .read_as_dead_consumer("user.created", "tests", "dead-pod", 10)
        .await;
    broker.lose_next_reply("XAUTOCLAIM");
    let claim_min_idle = Duration::from_secs(60);
    // Due after the recovery read (just after claim_min_idle) and before the next touch
    // (every claim_min_idle / 3: at 60 s, then 80 s).
    let asked = Duration::from_secs(70);
    let (handler, mut seen) = Scripted::new(
        move |event: UserCreated, ctx: slim_bus::Context| async move {
            if event.seq == 1 && ctx.delivery_count() == 1 {
                return Err(HandlerError::retry_after(
                    asked,
                    std::io::Error::other("not yet"),
                ));
            }
            Ok(())
        },
    );
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .claim_min_idle(claim_min_idle)
            .claim_interval(Duration::from_millis(50))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    let first = recv(&mut seen, "the first delivery").await;
    assert_eq!((first.event.seq, first.delivery_count), (1, 1));
    let failed_at = tokio::time::Instant::now();
    // The dead consumer's entry, claimed in the lost reply and found again by the recovery
    // read, then the retry of entry 1 at its time (a few seconds of slack).
    let retried = within(
        "the asked-for retry to run at its time",
        asked + Duration::from_secs(5),
        async {
            loop {
                let delivery = seen.recv().await.expect("the handler is alive");
                if delivery.event.seq == 1 {
                    return delivery;
                }
            }
        },
    )
    .await;
    assert!(
        failed_at.elapsed() < asked + Duration::from_secs(5),
        "retried after {:?}, asked for {asked:?}",
        failed_at.elapsed()
    );
    assert_eq!(retried.consumer, "consumer-1");
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

// A retry claim that fails without reaching Redis (the connection is down) must not take
// the entry back later from a live consumer that claimed it meanwhile: the retry is claimed
// only while the entry is pending with this consumer, whatever its idle time.
//
// Interleaving: A holds E waiting for its retry; A loses Redis; E goes stale and B claims
// it and runs it; A's retry claims keep failing; A reconnects and claims again: E is B's,
// so A leaves it and B's run is the only one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_claim_that_failed_unsent_does_not_take_the_entry_from_a_live_consumer() {
    let server = start_server().await;
    let proxy = within(
        "proxy",
        STEP,
        Proxy::start((Ipv4Addr::LOCALHOST, server.port())),
    )
    .await
    .unwrap();
    // Both consumers touch what they hold every 20 s: nothing in this test lasts that long.
    let claim_min_idle = Duration::from_secs(60);
    let (a_handler, mut a_seen) =
        Scripted::new(|_: UserCreated, ctx: slim_bus::Context| async move {
            if ctx.delivery_count() == 1 {
                return Err(HandlerError::retry_after(
                    Duration::from_secs(2),
                    std::io::Error::other("once"),
                ));
            }
            Ok(())
        });
    let a = within(
        "build",
        STEP,
        EventBus::builder()
            .url(proxy.url())
            .consumer_group("tests")
            .consumer_name("pod-a")
            .block_time(Duration::from_millis(200))
            .handler_timeout(Duration::from_secs(5))
            .command_timeout(Duration::from_millis(500))
            .claim_min_idle(claim_min_idle)
            .claim_interval(Duration::from_millis(50))
            .handler(a_handler)
            .build(),
    )
    .await
    .unwrap();
    let a_listener = within("listen", STEP, a.listen()).await.unwrap();
    let id = within("publish", STEP, a.publish(&user(1))).await.unwrap();
    let first = recv(&mut a_seen, "pod-a's first delivery").await;
    assert_eq!(first.delivery_count, 1);

    // pod-a is cut off from Redis: its touches and its retry claims fail.
    proxy.set_upstream((Ipv4Addr::LOCALHOST, unused_port()));
    proxy.drop_connections();
    // As if pod-a had been cut off for claim_min_idle already.
    let mut conn = server.connection().await;
    let _: redis::Value = within(
        "XCLAIM ... IDLE",
        STEP,
        redis::cmd("XCLAIM")
            .arg("user.created")
            .arg("tests")
            .arg("pod-a")
            .arg(0)
            .arg(id.to_string())
            .arg("IDLE")
            .arg(600_000)
            .arg("JUSTID")
            .query_async(&mut conn),
    )
    .await
    .unwrap();
    let (release, released) = tokio::sync::watch::channel(false);
    let (b_handler, mut b_seen) = Scripted::new(move |_: UserCreated, _| {
        let mut released = released.clone();
        async move {
            let _ = released.wait_for(|go| *go).await;
            Ok::<_, HandlerError>(())
        }
    });
    let b = within(
        "build",
        STEP,
        bus(&server)
            .consumer_name("pod-b")
            // Its handler runs until released: no retry of its own resets the idle time.
            .handler_timeout(Duration::from_secs(60))
            .claim_min_idle(claim_min_idle)
            .claim_interval(Duration::from_millis(50))
            .handler(b_handler)
            .build(),
    )
    .await
    .unwrap();
    let b_listener = within("listen", STEP, b.listen()).await.unwrap();
    let claimed = recv(&mut b_seen, "pod-b to claim the stale entry").await;
    assert_eq!(claimed.entry_id, id);
    // pod-a's retry came due while cut off (2 s after its failure) and its claims failed
    // after pod-b's claim; then it reaches Redis again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.set_upstream((Ipv4Addr::LOCALHOST, server.port()));
    let again = tokio::time::timeout(Duration::from_secs(8), a_seen.recv()).await;
    assert!(
        again.is_err(),
        "pod-a ran the entry again while pod-b, alive, was running it: {again:?}"
    );
    release.send(true).unwrap();
    within(
        "pending",
        STEP,
        until_nothing_pending(&server, "user.created", "tests"),
    )
    .await;
    within("shutdown", STEP, b_listener.shutdown())
        .await
        .unwrap();
    within("shutdown", STEP, a_listener.shutdown())
        .await
        .unwrap();
}

/// Deletes the consumer group `tests` of `user.created`, like `XGROUP DESTROY`: the stream
/// and its entries stay.
async fn destroy_group(backend: &Backend) {
    match backend {
        Backend::Memory(broker) => assert!(broker.destroy_group("user.created", "tests")),
        _ => {
            let mut conn = backend.server().unwrap().connection().await;
            let destroyed: i64 = within(
                "XGROUP DESTROY",
                STEP,
                redis::cmd("XGROUP")
                    .arg("DESTROY")
                    .arg("user.created")
                    .arg("tests")
                    .query_async(&mut conn),
            )
            .await
            .unwrap();
            assert_eq!(destroyed, 1);
        }
    }
}

// A group lost while this consumer holds entries (waiting for a retry, running, being
// dead-lettered), which were in the lost pending list only: the retry claim puts the entry
// back under this consumer, so the retry still runs.
conformance!(an_entry_waiting_for_its_retry_when_the_group_is_lost_is_still_handled);
async fn an_entry_waiting_for_its_retry_when_the_group_is_lost_is_still_handled(backend: Backend) {
    let (handler, mut seen) = Scripted::new(|_: UserCreated, ctx: slim_bus::Context| async move {
        if ctx.delivery_count() == 1 {
            return Err(HandlerError::new(std::io::Error::other("once")));
        }
        Ok(())
    });
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .retry_backoff(Duration::from_millis(500), Duration::from_millis(500))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    let first = recv(&mut seen, "the first delivery").await;
    assert_eq!((first.event.seq, first.delivery_count), (1, 1));
    // While the entry waits for its retry.
    destroy_group(&backend).await;
    let retried = recv(&mut seen, "the retry of the entry the consumer held").await;
    assert_eq!(retried.event.seq, 1);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

// A bus that lost its consumer-name lease shuts down gracefully next to its successor,
// which has the same consumer name: it must not hand over (or keep fresh) the entries
// pending under that name, which are the successor's, or a third consumer's claim scan
// would run them while the successor still runs them.
//
// Interleaving: pod-a runs E; pod-a is cut off for longer than its lease TTL; pod-a' (same
// name) takes the lease and its recovery read delivers E to it; pod-a reaches Redis, finds
// its lease taken, shuts down and abandons E after its grace; pod-b's scans claim nothing.
//
// Redis only: the in-memory backend has no connection to cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_that_lost_its_lease_does_not_hand_over_its_successors_entries() {
    let server = start_server().await;
    let proxy = within(
        "proxy",
        STEP,
        Proxy::start((Ipv4Addr::LOCALHOST, server.port())),
    )
    .await
    .unwrap();
    let claim_min_idle = Duration::from_secs(60);
    let hanging =
        || Scripted::new(|_: UserCreated, _| std::future::pending::<Result<(), HandlerError>>());
    let named_a = |url: String| {
        EventBus::builder()
            .url(url)
            .consumer_group("tests")
            .consumer_name("pod-a")
            .block_time(Duration::from_millis(200))
            .handler_timeout(Duration::from_secs(600))
            .command_timeout(Duration::from_millis(200))
            .consumer_lease_ttl(Duration::from_secs(1))
            .shutdown_grace(Duration::from_millis(300))
            .claim_min_idle(claim_min_idle)
            .claim_interval(Duration::from_millis(50))
    };
    let (a_handler, mut a_seen) = hanging();
    let a = within(
        "build",
        STEP,
        named_a(proxy.url()).handler(a_handler).build(),
    )
    .await
    .unwrap();
    let a_listener = within("listen", STEP, a.listen()).await.unwrap();
    let id = within("publish", STEP, a.publish(&user(1))).await.unwrap();
    assert_eq!(recv(&mut a_seen, "pod-a to run E").await.entry_id, id);

    let (b_handler, mut b_seen) = Scripted::new(|_: UserCreated, _| async { Ok(()) });
    let b = within(
        "build",
        STEP,
        bus(&server)
            .consumer_name("pod-b")
            .claim_min_idle(claim_min_idle)
            .claim_interval(Duration::from_millis(50))
            .handler(b_handler)
            .build(),
    )
    .await
    .unwrap();
    let b_listener = within("listen", STEP, b.listen()).await.unwrap();

    // pod-a is cut off; its lease lapses and a new process of the same name takes it.
    proxy.set_upstream((Ipv4Addr::LOCALHOST, unused_port()));
    proxy.drop_connections();
    let (successor_handler, mut successor_seen) = hanging();
    let successor = within(
        "build",
        STEP,
        named_a(server.url()).handler(successor_handler).build(),
    )
    .await
    .unwrap();
    let successor_listener = within("listen", STEP, successor.listen()).await.unwrap();
    let recovered = recv(&mut successor_seen, "the successor to recover E").await;
    assert_eq!(recovered.entry_id, id);

    // pod-a reaches Redis again, finds its lease taken and shuts down.
    proxy.set_upstream((Ipv4Addr::LOCALHOST, server.port()));
    let stopped = within("pod-a to stop", STEP, a_listener).await;
    assert!(stopped.is_err(), "pod-a lost its lease: {stopped:?}");
    let stolen = tokio::time::timeout(Duration::from_secs(2), b_seen.recv()).await;
    assert!(
        stolen.is_err(),
        "pod-b ran E while the live successor runs it: {stolen:?}"
    );
    within("shutdown", STEP, b_listener.shutdown())
        .await
        .unwrap();
    within("shutdown", STEP, successor_listener.shutdown())
        .await
        .unwrap();
}

// Two consumers of the group; the one that notices the lost group first creates it again
// after the last entry delivered to it, which is after the other's held entry: the other
// consumer's retry claim finds that entry pending with no one, puts it back under itself
// and runs it, rather than give it up (never handled again nor dead-lettered).
//
// Interleaving: consumer-b fails entry 1 (its only place, retry in 3 s); consumer-a
// handles and acks entry 2; the group is destroyed; consumer-a's read gets NOGROUP and
// creates the group again just after entry 2; consumer-b's retry claim finds entry 1
// pending with no one.
conformance!(an_entry_another_consumer_holds_for_its_retry_when_the_group_is_lost_is_still_handled);
async fn an_entry_another_consumer_holds_for_its_retry_when_the_group_is_lost_is_still_handled(
    backend: Backend,
) {
    let (handler_b, mut seen_b) =
        Scripted::new(|_: UserCreated, ctx: slim_bus::Context| async move {
            if ctx.delivery_count() == 1 {
                return Err(HandlerError::new(std::io::Error::other("once")));
            }
            Ok(())
        });
    let bus_b = within(
        "build b",
        STEP,
        backend
            .bus()
            .consumer_name("consumer-b")
            .max_in_flight(1)
            .max_concurrent(1)
            .claim_min_idle(Duration::from_secs(60))
            .claim_interval(Duration::from_secs(60))
            .retry_backoff(Duration::from_secs(3), Duration::from_secs(3))
            .handler(handler_b)
            .build(),
    )
    .await
    .unwrap();
    let listener_b = within("listen b", STEP, bus_b.listen()).await.unwrap();
    within("publish 1", STEP, bus_b.publish(&user(1)))
        .await
        .unwrap();
    let first = recv(&mut seen_b, "consumer-b's first delivery of entry 1").await;
    assert_eq!((first.event.seq, first.delivery_count), (1, 1));

    let (handler_a, mut seen_a) =
        Scripted::new(|_: UserCreated, _: slim_bus::Context| async move { Ok(()) });
    let bus_a = within(
        "build a",
        STEP,
        backend
            .bus()
            .consumer_name("consumer-a")
            .claim_min_idle(Duration::from_secs(60))
            .claim_interval(Duration::from_secs(60))
            .handler(handler_a)
            .build(),
    )
    .await
    .unwrap();
    let listener_a = within("listen a", STEP, bus_a.listen()).await.unwrap();
    within("publish 2", STEP, bus_a.publish(&user(2)))
        .await
        .unwrap();
    let second = recv(&mut seen_a, "consumer-a's delivery of entry 2").await;
    assert_eq!(second.event.seq, 2);
    within("entry 2 acked", STEP, async {
        while backend.pending_count("user.created", "tests").await != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // While entry 1 waits for its retry at consumer-b.
    destroy_group(&backend).await;
    let handled_again = within("entry 1 (held by consumer-b for its retry when the group was lost) handled again by either consumer", Duration::from_secs(10), async {
        tokio::select! {
            seen = seen_a.recv() => seen.unwrap().event.seq,
            seen = seen_b.recv() => seen.unwrap().event.seq,
        }
    })
    .await;
    assert_eq!(handled_again, 1, "only entry 1 is left to handle");
    within("shutdown a", STEP, listener_a.shutdown())
        .await
        .unwrap();
    within("shutdown b", STEP, listener_b.shutdown())
        .await
        .unwrap();
}

// A group lost while consumer-a holds entry 1 and consumer-b runs entry 2: the group is
// created again after what was delivered, never before a held entry, so entry 2, which
// consumer-b is running and keeps fresh, is not delivered again as new to consumer-a.
//
// Interleaving: entries 1 and 3 are pending with consumer-a, entry 2 with consumer-b
// (each bus's recovery read delivers its own); consumer-a runs 1 (long) and acks 3;
// consumer-b runs 2 (long), its only place; the group is destroyed; consumer-a's read
// gets NOGROUP and creates the group again.
conformance!(a_group_created_again_does_not_run_another_consumers_running_entry_twice);
async fn a_group_created_again_does_not_run_another_consumers_running_entry_twice(
    backend: Backend,
) {
    for seq in 1..=3 {
        backend.xadd("user.created", &user_fields(seq)).await;
    }
    backend
        .read_as_dead_consumer("user.created", "tests", "consumer-a", 1)
        .await;
    backend
        .read_as_dead_consumer("user.created", "tests", "consumer-b", 1)
        .await;
    backend
        .read_as_dead_consumer("user.created", "tests", "consumer-a", 1)
        .await;
    let long = |seq: u64| {
        move |event: UserCreated, _: slim_bus::Context| async move {
            if event.seq == seq {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Ok::<(), HandlerError>(())
        }
    };
    let (handler_a, mut seen_a) = Scripted::new(long(1));
    let (handler_b, mut seen_b) = Scripted::new(long(2));
    let settings = |name: &'static str| {
        backend
            .bus()
            .consumer_name(name)
            .handler_timeout(Duration::from_secs(60))
            .shutdown_grace(Duration::from_millis(100))
            .claim_min_idle(Duration::from_secs(60))
            .claim_interval(Duration::from_secs(60))
    };
    let bus_a = within(
        "build a",
        STEP,
        settings("consumer-a").handler(handler_a).build(),
    )
    .await
    .unwrap();
    let bus_b = within(
        "build b",
        STEP,
        settings("consumer-b")
            .max_in_flight(1)
            .max_concurrent(1)
            .handler(handler_b)
            .build(),
    )
    .await
    .unwrap();
    let listener_a = within("listen a", STEP, bus_a.listen()).await.unwrap();
    let mut seqs_a = vec![
        recv(&mut seen_a, "consumer-a's own entry").await.event.seq,
        recv(&mut seen_a, "consumer-a's other own entry")
            .await
            .event
            .seq,
    ];
    seqs_a.sort_unstable();
    assert_eq!(seqs_a, [1, 3]);
    let listener_b = within("listen b", STEP, bus_b.listen()).await.unwrap();
    assert_eq!(
        recv(&mut seen_b, "consumer-b's own entry").await.event.seq,
        2
    );
    within("entry 3 acked", STEP, async {
        while backend.pending_count("user.created", "tests").await != 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    destroy_group(&backend).await;
    let twice = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let seen = seen_a.recv().await.unwrap();
            if seen.event.seq == 2 {
                return seen;
            }
        }
    })
    .await;
    assert!(
        twice.is_err(),
        "entry 2 ran at consumer-a while consumer-b, alive, still ran it"
    );
    within("shutdown a", STEP, listener_a.shutdown())
        .await
        .unwrap();
    within("shutdown b", STEP, listener_b.shutdown())
        .await
        .unwrap();
}

// A group lost while this consumer holds an entry for its retry, then a graceful shutdown
// before the retry: the hand-over puts the entry back in the pending list (for the next
// claim scan), rather than report it handed over while it is in none.
//
// Interleaving: entry 1 fails (retry in 60 s); the group is destroyed; consumer-1 creates
// it again just after entry 1 and handles entry 2; shutdown hands entry 1 over with
// `touch_own`, which finds it pending with no one and puts it back.
conformance!(an_entry_held_for_its_retry_across_a_lost_group_is_handed_over_at_shutdown);
async fn an_entry_held_for_its_retry_across_a_lost_group_is_handed_over_at_shutdown(
    backend: Backend,
) {
    let (handler, mut seen) =
        Scripted::new(|event: UserCreated, _: slim_bus::Context| async move {
            if event.seq == 1 {
                return Err(HandlerError::retry_after(
                    Duration::from_secs(60),
                    std::io::Error::other("later"),
                ));
            }
            Ok(())
        });
    let bus = within("build", STEP, backend.bus().handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish 1", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    assert_eq!(recv(&mut seen, "entry 1 fails").await.event.seq, 1);
    destroy_group(&backend).await;
    within("publish 2", STEP, bus.publish(&user(2)))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut seen, "entry 2 (group created again)")
            .await
            .event
            .seq,
        2
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    assert_eq!(
        backend.pending_count("user.created", "tests").await,
        1,
        "entry 1, held for its retry, is in no pending list after the hand-over: lost"
    );
}
