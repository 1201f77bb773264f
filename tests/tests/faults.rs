//! Fault injection against real redis-servers: a killed consumer process, a Redis restart,
//! dropped connections, FLUSHALL, a frozen server, and a shared backlog. Each case publishes
//! numbered entries while consuming, injects its fault, then checks the ledger: every entry
//! handled at least once, nothing pending, nothing dead-lettered, duplicates within what
//! could be in flight at the fault. Each prints one line of figures (`--no-capture`).
//!
//! The example size is 20,000 entries per case; the cases use 5,000 by default so
//! that the whole suite stays well under two minutes in a debug build on two cores (a debug
//! bus handles a few thousand entries a second). What they check does not depend on the
//! size: the fault lands mid-stream either way. `SLIM_BUS_FAULT_ENTRIES=20000` runs the
//! full size.
#![allow(clippy::unwrap_used)]

mod faults_support;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use faults_support::*;
use futures_util::FutureExt;
use slim_bus::{EventBus, Listener};
use slim_bus_tests::{Proxy, RedisServer, within};
use tokio::time::Instant;

/// Entries per case unless `SLIM_BUS_FAULT_ENTRIES` says otherwise (the example
/// is 20,000; see the module docs).
const DEFAULT_ENTRIES: u64 = 5_000;

/// How long each handler of the in-process buses works.
const WORK: Duration = Duration::from_millis(1);
/// How long each handler of a consumer process works, on average (its `ledger` mode
/// spreads it so that handlers started together do not all end together).
const PROCESS_WORK_MILLIS: u64 = 2;
/// How much longer than the command timeout a failing call may take to return.
const SLACK: Duration = Duration::from_secs(1);

fn entries() -> u64 {
    std::env::var("SLIM_BUS_FAULT_ENTRIES")
        .ok()
        .and_then(|entries| entries.parse().ok())
        .unwrap_or(DEFAULT_ENTRIES)
}

/// All `entries` in 100 round trips, one per `interval`: the publisher is still going when
/// the fault strikes.
fn pacing(entries: u64, interval: Duration) -> Pacing {
    Pacing {
        batch: entries.div_ceil(100),
        interval,
    }
}

/// Waits until the fault can strike mid-stream: half the entries published, the consumers
/// at work on them.
async fn until_mid_stream(ledger: &Ledger, publisher: &Publisher, entries: u64) {
    within(
        "the stream to be half published and consumed",
        SETTLE,
        async {
            while publisher.unsent() < entries / 2 || ledger.total() < entries / 10 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        },
    )
    .await;
}

fn user(seq: u64) -> UserCreated {
    UserCreated {
        user_id: format!("u{seq}"),
        user_name: format!("User {seq}"),
        seq,
    }
}

async fn listening_bus(url: &str, consumer: &str, ledger: &Arc<Ledger>) -> (EventBus, Listener) {
    let bus = within(
        "build",
        STEP,
        fault_bus(url, consumer)
            .handler(LedgerHandler::new(ledger, WORK))
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    (bus, listener)
}

/// The listener must still run: only errors that cannot heal may end it.
fn assert_still_listening(listener: &mut Listener) {
    if let Some(result) = listener.now_or_never() {
        panic!("the listener stopped after a transient fault: {result:?}");
    }
}

async fn shut_down(listener: Listener) {
    within("shutdown", STEP, listener.shutdown())
        .await
        .expect("the listener shuts down cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_1_kill_9_of_a_consumer_process_mid_stream_a_second_process_finishes() {
    let started = Instant::now();
    let server = start_server(RedisServer::builder()).await;
    let ledger = Arc::new(Ledger::default());
    let doomed = ConsumerProcess::start(&server.url(), "pod-a", PROCESS_WORK_MILLIS, &ledger).await;
    let entries = entries();
    let publisher = Publisher::start(
        server.client(),
        0..entries,
        pacing(entries, Duration::from_millis(10)),
    );
    ledger
        .until_total(entries / 4, "pod-a to handle a quarter of the entries")
        .await;

    doomed.kill().await;
    let fault_end = Instant::now();
    let mut conn = direct(&server).await;
    let held = pending_of(&mut conn, "pod-a").await;
    if held.is_empty() {
        let consumers: redis::Value = within(
            "XINFO CONSUMERS",
            STEP,
            redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(STREAM)
                .arg(GROUP)
                .query_async(&mut conn),
        )
        .await
        .unwrap();
        panic!(
            "pod-a held nothing when killed, after handling {} entries, with {} published: \
             the fault did not land mid-stream. Consumers: {consumers:?}",
            ledger.total(),
            publisher.unsent()
        );
    }
    let heir = ConsumerProcess::start(&server.url(), "pod-b", PROCESS_WORK_MILLIS, &ledger).await;
    within("pod-b to claim and handle what pod-a held", SETTLE, async {
        while !pending_of(&mut conn, "pod-a").await.is_empty()
            || !held.iter().all(|id| ledger.contains(*id))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let recovered = fault_end.elapsed();

    let published = publisher.finish().await;
    let expected = stream_entries(&mut conn).await;
    assert_nothing_lost(&published, &expected);
    let settled = settle(&server, &ledger, &expected).await;
    let by_consumer = ledger.by_consumer();
    Figures {
        case: "1 kill -9 of a consumer process",
        settled: &settled,
        // Only pod-a was hit.
        duplicate_bound: IN_FLIGHT_WINDOW,
        recovered: Some(recovered),
        fault_end,
        started,
        notes: format!(
            "pod-a held {} at the kill; handled by pod-a {}, by pod-b {} (recovered = until \
             pod-b handled all pod-a held)",
            held.len(),
            by_consumer.get("pod-a").copied().unwrap_or(0),
            by_consumer.get("pod-b").copied().unwrap_or(0),
        ),
    }
    .report();
    heir.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_2_redis_restarted_with_aof_mid_stream_the_bus_reconnects_and_loses_nothing() {
    let started = Instant::now();
    let mut server =
        start_server(RedisServer::builder().appendonly(true).appendfsync_always()).await;
    let ledger = Arc::new(Ledger::default());
    let (bus, mut listener) = listening_bus(&server.url(), "consumer-1", &ledger).await;
    let entries = entries();
    let publisher = Publisher::start(
        server.client(),
        0..entries,
        pacing(entries, Duration::from_millis(10)),
    );
    until_mid_stream(&ledger, &publisher, entries).await;

    within("redis-server to stop", STEP, server.stop())
        .await
        .unwrap();
    let down_at = Instant::now();
    let health = within(
        "health() while Redis is down",
        COMMAND_TIMEOUT + SLACK,
        bus.health(),
    )
    .await;
    assert!(!health.connected && health.listening, "{health:?}");
    // The fault: Redis stays down for half a second.
    tokio::time::sleep_until(down_at + Duration::from_millis(500)).await;
    within("redis-server to restart", STEP, server.restart())
        .await
        .unwrap();
    let fault_end = Instant::now();
    let handled_at_fault_end = ledger.total();

    let retries = publisher.retries();
    let published = publisher.finish().await;
    let mut conn = direct(&server).await;
    let expected = stream_entries(&mut conn).await;
    assert_nothing_lost(&published, &expected);
    let settled = settle(&server, &ledger, &expected).await;
    assert_still_listening(&mut listener);
    let health = within("health() after the restart", STEP, bus.health()).await;
    assert!(health.connected, "{health:?}");
    assert_eq!(health.streams[0].pending, 0, "{health:?}");
    Figures {
        case: "2 redis-server restart with AOF (appendfsync always)",
        settled: &settled,
        duplicate_bound: IN_FLIGHT_WINDOW,
        recovered: recovered(&ledger, handled_at_fault_end, fault_end),
        fault_end,
        started,
        notes: format!(
            "down {:.2?}; {} entries in the stream for {entries} numbers ({retries} publisher \
             retries)",
            fault_end - down_at,
            expected.len()
        ),
    }
    .report();
    shut_down(listener).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_3_a_proxy_dropping_every_connection_every_300ms_heals_each_time() {
    const DROP_EVERY: Duration = Duration::from_millis(300);
    let started = Instant::now();
    let (server, proxy) = behind_a_proxy().await;
    let ledger = Arc::new(Ledger::default());
    let (_bus, mut listener) = listening_bus(&proxy.url(), "consumer-1", &ledger).await;
    // Slower than the other cases, so that a dozen drops land while entries flow. The
    // publisher talks to Redis directly: only the bus's connections are dropped.
    let entries = entries();
    let publisher = Publisher::start(
        server.client(),
        0..entries,
        pacing(entries, Duration::from_millis(30)),
    );

    let mut drops = 0u64;
    let mut dropped_connections = 0;
    let fault_end = within("the drops", SETTLE, async {
        let mut tick = tokio::time::interval_at(Instant::now() + DROP_EVERY, DROP_EVERY);
        // Drop until two thirds are published, so that entries still come after the last drop.
        while publisher.unsent() < entries * 2 / 3 {
            tick.tick().await;
            dropped_connections += proxy.drop_connections();
            drops += 1;
        }
        Instant::now()
    })
    .await;
    let handled_at_fault_end = ledger.total();

    let published = publisher.finish().await;
    let mut conn = direct(&server).await;
    let expected = stream_entries(&mut conn).await;
    assert_nothing_lost(&published, &expected);
    let settled = settle(&server, &ledger, &expected).await;
    assert_still_listening(&mut listener);
    Figures {
        case: "3 proxy drops every connection every 300 ms",
        settled: &settled,
        // Each drop can cost at most one in-flight window.
        duplicate_bound: drops * IN_FLIGHT_WINDOW,
        recovered: recovered(&ledger, handled_at_fault_end, fault_end),
        fault_end,
        started,
        notes: format!(
            "{drops} drops cut {dropped_connections} connections; the bus connected {} times \
             (recovered = after the last drop)",
            proxy.accepted()
        ),
    }
    .report();
    shut_down(listener).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_4_flushall_mid_stream_the_bus_recreates_the_group_and_handles_new_entries() {
    let started = Instant::now();
    let server = start_server(RedisServer::builder()).await;
    let ledger = Arc::new(Ledger::default());
    let (_bus, mut listener) = listening_bus(&server.url(), "consumer-1", &ledger).await;
    let entries = entries();
    let publisher = Publisher::start(
        server.client(),
        0..entries,
        pacing(entries, Duration::from_millis(10)),
    );
    until_mid_stream(&ledger, &publisher, entries).await;

    let mut conn = direct(&server).await;
    let _: () = within(
        "FLUSHALL",
        STEP,
        redis::cmd("FLUSHALL").query_async(&mut conn),
    )
    .await
    .unwrap();
    let fault_end = Instant::now();
    let (handled_at_fault_end, unsent) = (ledger.total(), publisher.unsent());

    let published = publisher.finish().await;
    // Entries the flush deleted are out of scope: only what is in the stream now counts,
    // and that must include everything published after the flush.
    let expected = stream_entries(&mut conn).await;
    let after_flush: Vec<_> = published
        .iter()
        .filter(|(_, seq)| *seq >= unsent)
        .copied()
        .collect();
    assert!(
        !after_flush.is_empty(),
        "nothing was published after the flush"
    );
    assert_nothing_lost(&after_flush, &expected);
    let settled = settle(&server, &ledger, &expected).await;
    assert_still_listening(&mut listener);
    Figures {
        case: "4 FLUSHALL while consuming",
        settled: &settled,
        duplicate_bound: IN_FLIGHT_WINDOW,
        recovered: recovered(&ledger, handled_at_fault_end, fault_end),
        fault_end,
        started,
        notes: format!(
            "entries = those in the stream after the flush; {handled_at_fault_end} handled before it"
        ),
    }
    .report();
    shut_down(listener).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_5_redis_frozen_longer_than_block_and_handler_timeouts_no_crash_no_excess_duplicates()
{
    const FROZEN: Duration = Duration::from_secs(3);
    const _: () = assert!(FROZEN.as_millis() > BLOCK_TIME.as_millis());
    const _: () = assert!(FROZEN.as_millis() > HANDLER_TIMEOUT.as_millis());
    let started = Instant::now();
    let server = start_server(RedisServer::builder()).await;
    let ledger = Arc::new(Ledger::default());
    let (bus, mut listener) = listening_bus(&server.url(), "consumer-1", &ledger).await;
    let entries = entries();
    let publisher = Publisher::start(
        server.client(),
        0..entries,
        pacing(entries, Duration::from_millis(10)),
    );
    until_mid_stream(&ledger, &publisher, entries).await;

    server.pause().unwrap();
    let frozen_at = Instant::now();
    let health = within(
        "health() while Redis is frozen",
        COMMAND_TIMEOUT + SLACK,
        bus.health(),
    )
    .await;
    let health_while_frozen = health.connected;
    tokio::time::sleep_until(frozen_at + FROZEN).await;
    server.resume().unwrap();
    let fault_end = Instant::now();
    let handled_at_fault_end = ledger.total();
    assert!(
        !health_while_frozen,
        "health() saw a frozen Redis as connected"
    );

    let retries = publisher.retries();
    let published = publisher.finish().await;
    let mut conn = direct(&server).await;
    let expected = stream_entries(&mut conn).await;
    assert_nothing_lost(&published, &expected);
    let settled = settle(&server, &ledger, &expected).await;
    assert_still_listening(&mut listener);
    Figures {
        case: "5 redis-server frozen (SIGSTOP) for 3 s",
        settled: &settled,
        duplicate_bound: IN_FLIGHT_WINDOW,
        recovered: recovered(&ledger, handled_at_fault_end, fault_end),
        fault_end,
        started,
        notes: format!(
            "{} entries in the stream for {entries} numbers ({retries} publisher retries)",
            expected.len()
        ),
    }
    .report();
    shut_down(listener).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_6_three_consumers_with_slow_handlers_at_the_limit_share_a_backlog() {
    const CONSUMERS: usize = 3;
    /// Fewer entries: at 20 ms a handler, three consumers of 16 slots do 2,400 a second.
    const BACKLOG: u64 = 3_000;
    const SLOW: Duration = Duration::from_millis(20);
    let started = Instant::now();
    let server = start_server(RedisServer::builder()).await;
    let ledger = Arc::new(Ledger::default());
    let published = Publisher::start(
        server.client(),
        0..BACKLOG,
        Pacing {
            batch: 500,
            interval: Duration::from_millis(1),
        },
    )
    .finish()
    .await;

    let mut gauges = Vec::new();
    let mut listeners = Vec::new();
    for i in 1..=CONSUMERS {
        let handler = LedgerHandler::new(&ledger, SLOW);
        gauges.push(handler.gauge.clone());
        let bus = within(
            "build",
            STEP,
            fault_bus(&server.url(), &format!("consumer-{i}"))
                .handler(handler)
                .build(),
        )
        .await
        .unwrap();
        listeners.push(within("listen", STEP, bus.listen()).await.unwrap());
    }
    let fault_end = Instant::now();
    let mut conn = direct(&server).await;
    let expected = stream_entries(&mut conn).await;
    assert_nothing_lost(&published, &expected);
    let settled = settle(&server, &ledger, &expected).await;

    let by_consumer = ledger.by_consumer();
    let shares: Vec<u64> = (1..=CONSUMERS)
        .map(|i| {
            by_consumer
                .get(&format!("consumer-{i}"))
                .copied()
                .unwrap_or(0)
        })
        .collect();
    let peaks: Vec<usize> = gauges.iter().map(|gauge| gauge.max()).collect();
    Figures {
        case: "6 three consumers, slow handlers at the limit, one backlog",
        settled: &settled,
        // No fault: nothing may be handled twice.
        duplicate_bound: 0,
        recovered: None,
        fault_end,
        started,
        notes: format!("handled per consumer {shares:?}; most handlers at once {peaks:?}"),
    }
    .report();
    for peak in &peaks {
        assert!(
            *peak <= MAX_IN_FLIGHT,
            "a consumer ran {peak} handlers at once, above max_concurrent {MAX_IN_FLIGHT}"
        );
        assert_eq!(
            *peak, MAX_IN_FLIGHT,
            "with a backlog, every consumer should work at its concurrency limit"
        );
    }
    // Equal consumers: each should take about a third; at least half of that is "spread".
    let fair_share = BACKLOG / CONSUMERS as u64;
    for (i, share) in shares.iter().enumerate() {
        assert!(
            *share >= fair_share / 2,
            "consumer-{} handled only {share} of {BACKLOG}: {shares:?}",
            i + 1
        );
    }
    for mut listener in listeners {
        assert_still_listening(&mut listener);
        shut_down(listener).await;
    }
}

// Focused cases: publish during outages, acks across a reconnect, pacing of retries, and a
// group that disappears.

/// Publishes once and returns the result and how long it took, failing the test if it
/// takes longer than the command timeout plus slack.
async fn timed_publish(
    bus: &EventBus,
    seq: u64,
) -> (slim_bus::Result<slim_bus::EntryId>, Duration) {
    let start = Instant::now();
    let result = within(
        "publish to fail or succeed within the command timeout",
        COMMAND_TIMEOUT + SLACK,
        bus.publish(&user(seq)),
    )
    .await;
    (result, start.elapsed())
}

/// Publishes until it works, returning how many attempts failed first.
async fn publish_until_it_works(bus: &EventBus, seq: u64) -> u32 {
    within("publish to work again", STEP, async {
        let mut failures = 0;
        while bus.publish(&user(seq)).await.is_err() {
            failures += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        failures
    })
    .await
}

fn assert_publish_failed(result: &slim_bus::Result<slim_bus::EntryId>) {
    match result {
        Ok(id) => panic!("publish during an outage returned {id}"),
        Err(error) => {
            let message = error.to_string();
            assert!(
                message.contains("publishing to stream `user.created`"),
                "the error does not say what failed: {message}"
            );
        }
    }
}

async fn publishing_bus(url: &str) -> EventBus {
    within("build", STEP, fault_bus(url, "publisher").build())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_while_redis_is_down_fails_within_the_command_timeout_then_works_again() {
    let mut server = start_server(RedisServer::builder()).await;
    let bus = publishing_bus(&server.url()).await;
    timed_publish(&bus, 0).await.0.unwrap();

    within("redis-server to stop", STEP, server.stop())
        .await
        .unwrap();
    let mut took = Vec::new();
    for seq in 1..=3 {
        let (result, elapsed) = timed_publish(&bus, seq).await;
        assert_publish_failed(&result);
        took.push(elapsed);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    within("redis-server to restart", STEP, server.restart())
        .await
        .unwrap();
    let failures = publish_until_it_works(&bus, 4).await;
    println!(
        "fault case | publish while Redis is down | failed after {took:.2?} | {failures} \
         failures after Redis was back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_while_redis_is_frozen_fails_within_the_command_timeout_then_works_again() {
    let server = start_server(RedisServer::builder()).await;
    let bus = publishing_bus(&server.url()).await;
    timed_publish(&bus, 0).await.0.unwrap();

    server.pause().unwrap();
    let mut took = Vec::new();
    for seq in 1..=2 {
        let (result, elapsed) = timed_publish(&bus, seq).await;
        took.push(elapsed);
        if result.is_ok() {
            server.resume().unwrap();
        }
        assert_publish_failed(&result);
    }
    server.resume().unwrap();
    let failures = publish_until_it_works(&bus, 3).await;
    println!(
        "fault case | publish while Redis is frozen | failed after {took:.2?} | {failures} \
         failures after Redis was back"
    );
}

/// A bus listening on `stream` through `group`, which has handled one entry: the start of
/// the cases that watch what one consumer does when something breaks.
async fn handling_one_entry(
    url: &str,
    stream: &str,
    group: &str,
) -> (Arc<Ledger>, EventBus, Listener) {
    let ledger = Arc::new(Ledger::default());
    let bus = within(
        "build",
        STEP,
        fault_bus(url, "consumer-1")
            .consumer_group(group)
            .handler_on(stream, LedgerHandler::new(&ledger, WORK))
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish_to(stream, &user(0)))
        .await
        .unwrap();
    ledger.until_total(1, "the first entry to be handled").await;
    (ledger, bus, listener)
}

/// A throwaway server behind a proxy that can drop every connection.
async fn behind_a_proxy() -> (RedisServer, Proxy) {
    let server = start_server(RedisServer::builder()).await;
    let proxy = within(
        "the proxy to start",
        STEP,
        Proxy::start((Ipv4Addr::LOCALHOST, server.port())),
    )
    .await
    .unwrap();
    (server, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_after_the_idle_connection_was_closed_goes_through() {
    let (_server, proxy) = behind_a_proxy().await;
    let bus = publishing_bus(&proxy.url()).await;
    timed_publish(&bus, 0).await.0.unwrap();

    // Like a server's `timeout` or a load balancer closing a connection nobody used for a
    // while: nothing tells the bus until it sends.
    assert!(proxy.drop_connections() > 0);
    within("the proxy to close its connections", STEP, async {
        while proxy.open_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let (result, took) = timed_publish(&bus, 1).await;
    let id = result.expect("the first publish after the connection was closed");
    let batch = within(
        "a batch",
        COMMAND_TIMEOUT + SLACK,
        bus.publish_batch(&[user(2), user(3)]),
    )
    .await
    .unwrap();
    assert!(id < batch[0], "{id} then {batch:?}");
    println!("fault case | publish after an idle disconnect | went through in {took:.2?}");
}

/// Publishes queued behind a pipeline that Redis does not answer still fail within their
/// own command timeout, not the one of the pipeline before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_queued_behind_a_stuck_pipeline_fail_within_their_own_timeout() {
    let server = start_server(RedisServer::builder()).await;
    let bus = publishing_bus(&server.url()).await;
    timed_publish(&bus, 0).await.0.unwrap();

    server.pause().unwrap();
    let mut publishes = tokio::task::JoinSet::new();
    for (seq, after) in [(1u64, 0u64), (2, 300), (3, 600)] {
        let bus = bus.clone();
        publishes.spawn(async move {
            tokio::time::sleep(Duration::from_millis(after)).await;
            let start = Instant::now();
            let result = if seq == 3 {
                bus.publish_batch(&[user(seq), user(seq + 100)])
                    .await
                    .map(drop)
            } else {
                bus.publish(&user(seq)).await.map(drop)
            };
            (seq, result, start.elapsed())
        });
    }
    let mut took = Vec::new();
    while let Some(joined) = within(
        "every publish to end",
        COMMAND_TIMEOUT * 4,
        publishes.join_next(),
    )
    .await
    {
        took.push(joined.unwrap());
    }
    server.resume().unwrap();
    for (seq, result, elapsed) in &took {
        assert!(
            result.is_err(),
            "publish {seq} succeeded against a frozen server"
        );
        // Queued behind the first pipeline, the later ones would take up to twice the
        // timeout if it only started counting when their pipeline was sent.
        assert!(
            *elapsed <= COMMAND_TIMEOUT + Duration::from_millis(400),
            "publish {seq} took {elapsed:?} with a command timeout of {COMMAND_TIMEOUT:?}"
        );
    }
    publish_until_it_works(&bus, 4).await;
}

/// A bus whose connection broke while Redis hangs: it has to reconnect to a server that
/// accepts TCP connections but answers nothing, as during a network partition or a stuck
/// server. The server is frozen when this returns.
async fn frozen_behind_a_dropped_connection() -> (RedisServer, Proxy, EventBus) {
    let (server, proxy) = behind_a_proxy().await;
    let bus = publishing_bus(&proxy.url()).await;
    timed_publish(&bus, 0).await.0.unwrap();
    server.pause().unwrap();
    proxy.drop_connections();
    (server, proxy, bus)
}

/// Runs `call` three times, each bounded by the command timeout plus slack; returns how
/// long each took, or what went wrong. Thaws `server` either way, so that a failure does
/// not leave a frozen process behind.
async fn three_bounded_calls<T, F>(
    server: &RedisServer,
    mut call: impl FnMut() -> F,
    healthy: impl Fn(&T) -> bool,
) -> Vec<Duration>
where
    F: std::future::Future<Output = T>,
{
    let mut took = Vec::new();
    let mut outcome = Ok(());
    for attempt in 1..=3 {
        let start = Instant::now();
        match tokio::time::timeout(COMMAND_TIMEOUT + SLACK, call()).await {
            Ok(result) => {
                took.push(start.elapsed());
                if healthy(&result) {
                    outcome = Err(format!("call {attempt} succeeded against a frozen Redis"));
                    break;
                }
            }
            Err(_) => {
                outcome = Err(format!(
                    "call {attempt} was still waiting after {:?}, the command timeout plus \
                     slack (the calls before it took {took:.2?})",
                    COMMAND_TIMEOUT + SLACK
                ));
                break;
            }
        }
    }
    server.resume().unwrap();
    if let Err(message) = outcome {
        panic!("{message}");
    }
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_while_reconnecting_to_a_frozen_redis_fails_within_the_command_timeout() {
    let (server, _proxy, bus) = frozen_behind_a_dropped_connection().await;
    let mut seq = 0;
    let took = three_bounded_calls(
        &server,
        || {
            seq += 1;
            let (bus, event) = (&bus, user(seq));
            async move { bus.publish(&event).await }
        },
        Result::is_ok,
    )
    .await;
    let failures = publish_until_it_works(&bus, 4).await;
    println!(
        "fault case | publish while reconnecting to a frozen Redis | failed after {took:.2?} | \
         {failures} failures after Redis was back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_while_reconnecting_to_a_frozen_redis_answers_within_the_command_timeout() {
    let (server, _proxy, bus) = frozen_behind_a_dropped_connection().await;
    let took = three_bounded_calls(&server, || bus.health(), |health| health.connected).await;
    within("health() to see Redis again", STEP, async {
        while !bus.health().await.connected {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    println!(
        "fault case | health() while reconnecting to a frozen Redis | answered after {took:.2?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_that_failed_on_a_dropped_connection_are_sent_after_reconnecting() {
    let (server, proxy) = behind_a_proxy().await;
    let ledger = Arc::new(Ledger::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = GatedHandler {
        ledger: ledger.clone(),
        gate: gate.clone(),
        running: Arc::default(),
    };
    let running = handler.running.clone();
    // No claim scan for a minute: an entry whose ack is lost stays pending for the whole
    // test, so pending reaching zero proves the acks themselves were sent again.
    let bus = within(
        "build",
        STEP,
        fault_bus(&proxy.url(), "consumer-1")
            .claim_min_idle(Duration::from_secs(61))
            .claim_interval(Duration::from_secs(60))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let mut listener = within("listen", STEP, bus.listen()).await.unwrap();
    let entries = MAX_IN_FLIGHT as u64;
    let published = Publisher::start(
        server.client(),
        0..entries,
        Pacing {
            batch: entries,
            interval: Duration::from_millis(1),
        },
    )
    .finish()
    .await;
    within("every handler to start", STEP, async {
        while running.load(std::sync::atomic::Ordering::Acquire) < MAX_IN_FLIGHT {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    // The handlers are running: cut the connections their acks will go out on, then let
    // them finish.
    let connections_before = proxy.accepted();
    proxy.drop_connections();
    within("the proxy to close its connections", STEP, async {
        while proxy.open_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    gate.add_permits(MAX_IN_FLIGHT);

    let mut conn = direct(&server).await;
    let expected = stream_entries(&mut conn).await;
    assert_nothing_lost(&published, &expected);
    let settled = settle(&server, &ledger, &expected).await;
    assert_eq!(settled.duplicates, 0, "an entry was delivered again");
    assert!(
        proxy.accepted() > connections_before,
        "the bus never reconnected, so no ack can have been sent again"
    );
    assert_still_listening(&mut listener);
    shut_down(listener).await;
}

/// Waits for a permit of `gate`, then records the entry.
struct GatedHandler {
    ledger: Arc<Ledger>,
    gate: Arc<tokio::sync::Semaphore>,
    running: Arc<std::sync::atomic::AtomicUsize>,
}

#[slim_bus::async_trait]
impl slim_bus::StreamHandler for GatedHandler {
    type Event = UserCreated;

    async fn handle(
        &self,
        event: UserCreated,
        ctx: slim_bus::Context,
    ) -> Result<(), slim_bus::HandlerError> {
        self.running
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.gate.acquire().await.unwrap().forget();
        self.ledger.record(
            ctx.entry_id(),
            event.seq,
            ctx.consumer(),
            ctx.delivery_count(),
        );
        Ok(())
    }
}

/// How many times the read loop can fail during `outage`: after each failed command it
/// waits out a backoff step, the steps doubling from 100 ms up to 5 s, each at least half
/// its ceiling (consumer/mod.rs); plus the turn in progress.
fn read_loop_turns(outage: Duration) -> u64 {
    let (mut step, mut elapsed, mut turns) = (Duration::from_millis(100), Duration::ZERO, 1);
    while elapsed <= outage {
        elapsed += step / 2;
        step = (step * 2).min(Duration::from_secs(5));
        turns += 1;
    }
    turns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_retried_with_backoff_and_logged_at_a_bounded_rate_then_heals() {
    const OUTAGE: Duration = Duration::from_secs(3);
    // Names only this test uses, to pick its lines out of a log other tests may share.
    const WATCHED_STREAM: &str = "outage.watch";
    const WATCHED_GROUP: &str = "outage-watch";
    let (mut server, proxy) = behind_a_proxy().await;
    let (ledger, bus, mut listener) =
        handling_one_entry(&proxy.url(), WATCHED_STREAM, WATCHED_GROUP).await;

    within("redis-server to stop", STEP, server.stop())
        .await
        .unwrap();
    let (connections_before, log_before) = (proxy.accepted(), log_mark());
    tokio::time::sleep(OUTAGE).await;
    let attempts = proxy.accepted() - connections_before;
    let proxy_port = format!(":{}", proxy.addr().port());
    let logged = log_lines(log_before, &[WATCHED_STREAM, WATCHED_GROUP, &proxy_port]);
    within("redis-server to restart", STEP, server.restart())
        .await
        .unwrap();
    let back_at = Instant::now();
    within("publish to work again", STEP, async {
        while bus.publish_to(WATCHED_STREAM, &user(1)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    ledger
        .until_total(2, "an entry published after the outage to be handled")
        .await;
    let healed_in = back_at.elapsed();
    assert_still_listening(&mut listener);

    // Each failed turn of the read loop logs one line and makes each of the bus's two
    // connection managers try at most 1 + 3 connections (broker/redis.rs); nothing else
    // talks to Redis while no acks are due. Twice that, for margin.
    let turns = read_loop_turns(OUTAGE);
    let (attempt_bound, line_bound) = (2 * turns * 2 * 4, 2 * turns);
    println!(
        "fault case | Redis down for {OUTAGE:?} | {attempts} connection attempts (bound \
         {attempt_bound}) | {} log lines (bound {line_bound}) | handling again {healed_in:.2?} \
         after Redis was back",
        logged.len()
    );
    assert!(
        attempts <= attempt_bound,
        "{attempts} connection attempts in {OUTAGE:?}: the bus retries in a hot loop"
    );
    assert!(
        logged.len() as u64 <= line_bound,
        "{} log lines in {OUTAGE:?}:\n{}",
        logged.len(),
        logged.join("\n")
    );
    shut_down(listener).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_destroyed_while_the_reader_blocks_is_recreated_with_a_warning_naming_the_stream() {
    const WATCHED_STREAM: &str = "destroy.watch";
    const WATCHED_GROUP: &str = "destroy-watch";
    let server = start_server(RedisServer::builder()).await;
    let (ledger, bus, mut listener) =
        handling_one_entry(&server.url(), WATCHED_STREAM, WATCHED_GROUP).await;
    let mut conn = direct(&server).await;
    let nothing_pending = async |conn: &mut redis::aio::MultiplexedConnection| {
        within("nothing to be pending", STEP, async {
            while pending_count_of(conn, WATCHED_STREAM, WATCHED_GROUP).await != Some(0) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    };
    nothing_pending(&mut conn).await;

    // The reader spends nearly all its time blocked in XREADGROUP on the idle stream.
    let log_before = log_mark();
    let destroyed: u64 = within(
        "XGROUP DESTROY",
        STEP,
        redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(WATCHED_STREAM)
            .arg(WATCHED_GROUP)
            .query_async(&mut conn),
    )
    .await
    .unwrap();
    assert_eq!(destroyed, 1);
    within("publish", STEP, bus.publish_to(WATCHED_STREAM, &user(1)))
        .await
        .unwrap();
    within(
        "the entry published after the destroy to be handled",
        STEP,
        async {
            while ledger.first_handled_from_seq(1).is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    nothing_pending(&mut conn).await;
    assert_still_listening(&mut listener);
    let warnings: Vec<String> = log_lines(log_before, &[WATCHED_GROUP])
        .into_iter()
        .filter(|line| line.contains("WARN"))
        .collect();
    println!(
        "fault case | consumer group destroyed | entries handled again after the group was \
         recreated: {} | warnings: {warnings:?}",
        ledger.duplicates()
    );
    assert!(
        !warnings.is_empty(),
        "recreating the group logged no warning"
    );
    for warning in &warnings {
        assert!(
            warning.contains(WATCHED_STREAM),
            "the warning does not name the stream `{WATCHED_STREAM}`: {warning}"
        );
    }
    shut_down(listener).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_persistence_recreates_the_group_and_new_entries_are_handled() {
    let mut server = start_server(RedisServer::builder()).await;
    let ledger = Arc::new(Ledger::default());
    let (bus, mut listener) = listening_bus(&server.url(), "consumer-1", &ledger).await;
    within("publish", STEP, bus.publish(&user(0)))
        .await
        .unwrap();
    ledger.until_total(1, "the first entry to be handled").await;

    within("redis-server to restart", STEP, server.restart())
        .await
        .unwrap();
    publish_until_it_works(&bus, 1).await;
    within(
        "the entry published after the restart to be handled",
        STEP,
        async {
            while ledger.first_handled_from_seq(1).is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    let mut conn = direct(&server).await;
    until_nothing_pending(&mut conn).await;
    assert_still_listening(&mut listener);
    shut_down(listener).await;
}

async fn until_nothing_pending(conn: &mut redis::aio::MultiplexedConnection) {
    within("nothing to be pending", STEP, async {
        while pending_count(conn).await != Some(0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}
