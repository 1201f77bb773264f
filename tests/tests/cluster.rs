//! The bus on a real Redis Cluster (six throwaway nodes: three masters, a replica each):
//! streams on different masters round-trip, retry, are claimed from a dead consumer,
//! dead-letter and replay, and shut down with nothing pending; and with a ledger of every
//! entry, nothing is lost or left pending while a master is killed and its replica takes
//! over, or while a consumed stream's slot migrates to another master.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::AsyncCommands;
use slim_bus::{EventBus, EventBusBuilder, HandlerError};
use slim_bus_tests::{RedisCluster, within};
use support::*;
use tokio::sync::mpsc;

/// Six nodes starting and agreeing on a loaded 2-core machine.
const START: Duration = Duration::from_secs(120);
/// A failover waits for the node timeout (2 s) and an election.
const FAILOVER: Duration = Duration::from_secs(90);
/// Everything published handled, after a fault.
const SETTLE: Duration = Duration::from_secs(60);

async fn start_cluster() -> RedisCluster {
    slim_bus_tests::init_tracing();
    within("the cluster to start", START, RedisCluster::start())
        .await
        .unwrap()
}

/// A bus on `cluster`, seeded with one node only: it discovers the others.
fn bus(cluster: &RedisCluster) -> EventBusBuilder {
    bus_without_handlers(cluster)
        .consumer_group("tests")
        .consumer_name("consumer-1")
}

/// A bus on `cluster` that publishes (and listens, given handlers), seeded with one node.
fn bus_without_handlers(cluster: &RedisCluster) -> EventBusBuilder {
    EventBus::builder()
        .cluster([cluster.urls()[0].clone()])
        .block_time(Duration::from_millis(200))
        .handler_timeout(Duration::from_secs(5))
        .command_timeout(Duration::from_secs(3))
}

/// A stream name for each master: `s0.events`, `s1.events`, ... until each master serves one.
async fn stream_per_master(cluster: &RedisCluster) -> Vec<String> {
    let masters = cluster.masters().await.unwrap();
    let mut found: Vec<(String, u16)> = Vec::new();
    for n in 0.. {
        let stream = format!("s{n}.events");
        let owner = cluster.master_of(&stream).await.unwrap();
        if !found.iter().any(|(_, port)| *port == owner) {
            found.push((stream, owner));
        }
        if found.len() == masters.len() {
            return found.into_iter().map(|(stream, _)| stream).collect();
        }
    }
    unreachable!()
}

/// A connection to the master serving `key`.
async fn master_connection(cluster: &RedisCluster, key: &str) -> redis::aio::MultiplexedConnection {
    let port = within("master_of", STEP, cluster.master_of(key))
        .await
        .unwrap();
    within(
        "a connection",
        STEP,
        cluster.node(port).server().connection(),
    )
    .await
}

/// Entries of `stream` pending in group `tests`, asked of its master.
async fn pending(cluster: &RedisCluster, stream: &str) -> u64 {
    let mut connection = master_connection(cluster, stream).await;
    let summary: redis::Value = within(
        "XPENDING",
        STEP,
        redis::cmd("XPENDING")
            .arg(stream)
            .arg("tests")
            .query_async(&mut connection),
    )
    .await
    .unwrap();
    match summary {
        redis::Value::Array(fields) => match fields.first() {
            Some(redis::Value::Int(count)) => u64::try_from(*count).unwrap(),
            other => panic!("XPENDING summary starts with {other:?}"),
        },
        other => panic!("XPENDING answered {other:?}"),
    }
}

/// Waits (bounded) until group `tests` holds nothing pending on any of `streams`.
async fn until_nothing_pending(cluster: &RedisCluster, streams: &[String]) {
    within("nothing pending", SETTLE, async {
        loop {
            let mut total = 0;
            for stream in streams {
                total += pending(cluster, stream).await;
            }
            if total == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_three_masters_round_trip_retry_claim_dead_letter_and_replay() {
    let cluster = start_cluster().await;
    let streams = stream_per_master(&cluster).await;
    let owners: BTreeSet<u16> = {
        let mut owners = BTreeSet::new();
        for stream in &streams {
            owners.insert(cluster.master_of(stream).await.unwrap());
        }
        owners
    };
    assert_eq!(owners.len(), 3, "one stream on each master");
    let (failing, flaky, plain) = (&streams[0], &streams[1], &streams[2]);

    // An entry read by a consumer that then died, on the plain stream's master.
    {
        let mut connection = master_connection(&cluster, plain).await;
        let _: String = connection
            .xadd(
                plain,
                "*",
                &[
                    ("user_id", "u100"),
                    ("user_name", "User 100"),
                    ("seq", "100"),
                ],
            )
            .await
            .unwrap();
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(plain)
            .arg("tests")
            .arg("0")
            .query_async(&mut connection)
            .await
            .unwrap();
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("tests")
            .arg("dead-consumer")
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg(plain)
            .arg(">")
            .query_async(&mut connection)
            .await
            .unwrap();
    }

    let healed = Arc::new(AtomicBool::new(false));
    let (failing_handler, mut failing_seen) = Scripted::<UserCreated>::new({
        let healed = healed.clone();
        move |_, _| {
            let healed = healed.load(Ordering::SeqCst);
            async move {
                if healed {
                    Ok(())
                } else {
                    Err(HandlerError::permanent("the downstream refuses it"))
                }
            }
        }
    });
    let (flaky_handler, mut flaky_seen) = Scripted::<UserCreated>::new(|_, ctx| async move {
        if ctx.delivery_count() == 1 {
            Err(HandlerError::new("try again"))
        } else {
            Ok(())
        }
    });
    let (plain_handler, mut plain_seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        bus(&cluster)
            .handler_timeout(Duration::from_millis(250))
            .retry_backoff(Duration::from_millis(50), Duration::from_millis(150))
            .claim_min_idle(Duration::from_millis(300))
            .claim_interval(Duration::from_millis(200))
            .handler_on(failing.clone(), failing_handler)
            .handler_on(flaky.clone(), flaky_handler)
            .handler_on(plain.clone(), plain_handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for seq in 0..20 {
        for stream in &streams {
            within("publish", STEP, bus.publish_to(stream, &user(seq)))
                .await
                .unwrap();
        }
    }
    let batch: Vec<UserCreated> = (20..30).map(user).collect();
    within("publish a batch", STEP, bus.publish_batch_to(plain, &batch))
        .await
        .unwrap();

    // The plain stream: every entry once, and the dead consumer's entry claimed.
    let mut plain_seqs = BTreeSet::new();
    while plain_seqs.len() < 31 {
        plain_seqs.insert(recv(&mut plain_seen, "a plain entry").await.event.seq);
    }
    assert_eq!(plain_seqs, (0..30).chain([100]).collect());
    // The flaky stream: every entry twice, handled on the second delivery.
    let mut flaky_counts: BTreeMap<u64, u64> = BTreeMap::new();
    while flaky_counts.len() < 20 || flaky_counts.values().any(|&count| count < 2) {
        let seen = recv(&mut flaky_seen, "a flaky delivery").await;
        *flaky_counts.entry(seen.event.seq).or_default() += 1;
    }
    // The failing stream: every entry dead-lettered at once (a permanent failure).
    let dead_letters = bus.dead_letters(failing);
    within("20 dead letters", SETTLE, async {
        while dead_letters.len().await.unwrap() < 20 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    until_nothing_pending(&cluster, &streams).await;

    // Replayed once the downstream is back: each entry handled again, and acked.
    while failing_seen.try_recv().is_ok() {}
    healed.store(true, Ordering::SeqCst);
    let replayed = within("replay", STEP, dead_letters.replay_all())
        .await
        .unwrap();
    assert_eq!(replayed, 20);
    let mut replayed_seqs = BTreeSet::new();
    while replayed_seqs.len() < 20 {
        replayed_seqs.insert(recv(&mut failing_seen, "a replayed entry").await.event.seq);
    }
    assert_eq!(replayed_seqs, (0..20).collect());
    assert_eq!(dead_letters.len().await.unwrap(), 0);
    until_nothing_pending(&cluster, &streams).await;

    // Graceful shutdown: handlers still running finish and are acked.
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    until_nothing_pending(&cluster, &streams).await;
}

/// Publishes `seqs` to `streams` in turn, each publish tried again until it succeeds
/// (a publish that failed mid-fault may or may not have been written: at least once).
async fn publish_all(bus: &EventBus, streams: &[String], seqs: std::ops::Range<u64>) {
    for seq in seqs {
        let stream = &streams[usize::try_from(seq).unwrap() % streams.len()];
        within("a publish to succeed", SETTLE, async {
            while let Err(error) = bus.publish_to(stream, &user(seq)).await {
                tracing::info!(%error, seq, "publish failed; trying again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    }
}

/// Adds the seqs handled, from `seen`, to `ledger` (how often each was handled) until
/// every one of `0..total` was.
async fn until_all_handled(
    seen: &mut mpsc::UnboundedReceiver<Seen<UserCreated>>,
    mut ledger: BTreeMap<u64, u64>,
    total: u64,
) -> BTreeMap<u64, u64> {
    within("every entry handled", SETTLE, async {
        while u64::try_from(ledger.len()).unwrap() < total {
            let seen = seen.recv().await.unwrap();
            *ledger.entry(seen.event.seq).or_default() += 1;
        }
    })
    .await;
    ledger
}

/// A bus for the fault cases: short claim timings, so that an entry whose ack the
/// failover lost is claimed again soon.
async fn ledger_bus(
    cluster: &RedisCluster,
    streams: &[String],
) -> (EventBus, mpsc::UnboundedReceiver<Seen<UserCreated>>) {
    let (seen, rx) = mpsc::unbounded_channel();
    let mut builder = bus(cluster)
        .handler_timeout(Duration::from_millis(500))
        .claim_min_idle(Duration::from_secs(1))
        .claim_interval(Duration::from_millis(300))
        .retry_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .max_deliveries(1000);
    for stream in streams {
        builder = builder.handler_on(stream.clone(), Record { seen: seen.clone() });
    }
    let bus = within("build", STEP, builder.build()).await.unwrap();
    (bus, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_followed_to_its_promoted_replica_and_nothing_is_lost() {
    let mut cluster = start_cluster().await;
    let streams = stream_per_master(&cluster).await;
    let (bus, mut seen) = ledger_bus(&cluster, &streams).await;
    // A bus that only publishes: nothing but its publishes tells it of the failover.
    let publisher = within("build", STEP, bus_without_handlers(&cluster).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    publish_all(&publisher, &streams, 0..300).await;
    let ledger = until_all_handled(&mut seen, BTreeMap::new(), 300).await;

    // Replicated before the kill: Redis Cluster's replication is asynchronous, and a
    // write the replica never got is lost with its master whatever the client does.
    publish_all(&publisher, &streams, 300..600).await;
    let victim = cluster.master_of(&streams[0]).await.unwrap();
    within(
        "the replica to catch up",
        FAILOVER,
        cluster.wait_for_replication(victim),
    )
    .await
    .unwrap();
    let promoted = within("the failover", FAILOVER, cluster.kill_master(victim))
        .await
        .unwrap();
    assert_eq!(cluster.master_of(&streams[0]).await.unwrap(), promoted);

    // The publisher finds the promoted replica: its connection to the dead master is
    // refused, nothing was written, and the publish goes to the replica instead.
    for seq in 600..900 {
        let stream = &streams[usize::try_from(seq).unwrap() % streams.len()];
        within(
            "a publish after the failover",
            STEP,
            publisher.publish_to(stream, &user(seq)),
        )
        .await
        .unwrap();
    }

    let ledger = until_all_handled(&mut seen, ledger, 900).await;
    assert_eq!(
        ledger.keys().copied().collect::<Vec<_>>(),
        (0..900).collect::<Vec<_>>(),
        "every entry handled"
    );
    until_nothing_pending(&cluster, &streams).await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    until_nothing_pending(&cluster, &streams).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumed_stream_whose_slot_migrates_is_followed_through_ask_and_moved() {
    let cluster = start_cluster().await;
    let streams = stream_per_master(&cluster).await;
    let (bus, mut seen) = ledger_bus(&cluster, &streams).await;
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let moving = &streams[0];
    let slot = cluster.slot_of(moving).await.unwrap();
    let source = cluster.master_of(moving).await.unwrap();
    let target = cluster.master_of(&streams[1]).await.unwrap();
    publish_all(&bus, &streams, 0..300).await;
    let ledger = until_all_handled(&mut seen, BTreeMap::new(), 300).await;

    // While the stream's key is on the target and the slot still the source's, the
    // source answers ASK: publishes (one by one and in a batch) and reads follow it.
    let ledger = within(
        "the migration",
        SETTLE,
        cluster.migrate_slot_with(slot, target, async {
            let mut on_source = within(
                "a connection",
                STEP,
                cluster.node(source).server().connection(),
            )
            .await;
            let asked = redis::cmd("XLEN")
                .arg(moving)
                .query_async::<u64>(&mut on_source)
                .await
                .expect_err("the key moved");
            assert_eq!(asked.code(), Some("ASK"), "{asked}");
            for seq in 300..400 {
                within(
                    "a publish during the migration",
                    STEP,
                    bus.publish_to(moving, &user(seq)),
                )
                .await
                .unwrap();
            }
            let batch: Vec<UserCreated> = (400..450).map(user).collect();
            within(
                "a batch during the migration",
                STEP,
                bus.publish_batch_to(moving, &batch),
            )
            .await
            .unwrap();
            // Each XADD there went after an ASKING of its own (one holds for one command).
            let mut on_target = within(
                "a connection",
                STEP,
                cluster.node(target).server().connection(),
            )
            .await;
            let stats: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut on_target)
                .await
                .unwrap();
            let asking: u64 = stats
                .lines()
                .find_map(|line| line.strip_prefix("cmdstat_asking:calls="))
                .and_then(|rest| rest.split(',').next())
                .map_or(0, |calls| calls.parse().unwrap());
            assert!(asking >= 150, "{asking} ASKING calls for 150 publishes");
            let mut ledger = ledger;
            for seq in 300..450 {
                ledger.insert(seq, 0);
            }
            within(
                "the entries published during the migration",
                SETTLE,
                async {
                    while ledger.values().any(|&count| count == 0) {
                        let seen = seen.recv().await.unwrap();
                        *ledger.entry(seen.event.seq).or_default() += 1;
                    }
                },
            )
            .await;
            ledger
        }),
    )
    .await;
    let ledger = ledger.unwrap();
    assert_eq!(cluster.master_of(moving).await.unwrap(), target);

    // Afterwards the source answers MOVED, and the bus goes to the target.
    for seq in 450..600 {
        within(
            "a publish after the migration",
            STEP,
            bus.publish_to(moving, &user(seq)),
        )
        .await
        .unwrap();
    }
    let ledger = until_all_handled(&mut seen, ledger, 600).await;
    assert_eq!(
        ledger.keys().copied().collect::<Vec<_>>(),
        (0..600).collect::<Vec<_>>(),
        "every entry handled"
    );
    until_nothing_pending(&cluster, &streams).await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    until_nothing_pending(&cluster, &streams).await;
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, slim_bus::Event)]
#[event(stream = "orders", partitions = 6, key = "order_id")]
struct OrderPlaced {
    order_id: String,
    seq: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_stream_spreads_over_the_masters_and_keeps_each_key_in_order() {
    let cluster = start_cluster().await;
    let mut masters = BTreeSet::new();
    for partition in 0..6 {
        let stream = slim_bus::partition_stream("orders", partition);
        masters.insert(cluster.master_of(&stream).await.unwrap());
    }
    assert_eq!(masters.len(), 3, "the six partitions are on every master");

    let (seen, mut rx) = mpsc::unbounded_channel();
    let bus = within(
        "build",
        STEP,
        bus(&cluster)
            .max_concurrent(1)
            .handler(OrderRecord { seen })
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let keys = ["o-1", "o-2", "o-3", "o-4", "o-5", "o-6", "o-7", "o-8"];
    for seq in 0..80 {
        let order = OrderPlaced {
            order_id: keys[usize::try_from(seq).unwrap() % keys.len()].to_owned(),
            seq,
        };
        within("publish", STEP, bus.publish(&order)).await.unwrap();
    }
    let mut by_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut partitions = BTreeSet::new();
    for _ in 0..80 {
        let (order, partition) = recv(&mut rx, "an order").await;
        partitions.insert(partition);
        by_key.entry(order.order_id).or_default().push(order.seq);
    }
    assert!(
        partitions.len() > 1,
        "orders came from several partitions: {partitions:?}"
    );
    for (key, seqs) in &by_key {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, &sorted, "the orders of {key} in publish order");
    }
    let streams: Vec<String> = (0..6)
        .map(|partition| slim_bus::partition_stream("orders", partition))
        .collect();
    until_nothing_pending(&cluster, &streams).await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// Reports each order with the partition it came from.
struct OrderRecord {
    seen: mpsc::UnboundedSender<(OrderPlaced, u32)>,
}

#[slim_bus::async_trait]
impl slim_bus::StreamHandler for OrderRecord {
    type Event = OrderPlaced;

    async fn handle(&self, order: OrderPlaced, ctx: slim_bus::Context) -> Result<(), HandlerError> {
        let _ = self
            .seen
            .send((order, ctx.partition().expect("a partition")));
        Ok(())
    }
}

/// Stream names with braces in every odd place: each key the bus derives from a stream is
/// in the stream's slot as the cluster itself computes it, and a permanent failure on such
/// a stream is dead-lettered and replayed (one script over the stream and its dead
/// letters, which the cluster would refuse with `CROSSSLOT` across slots).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_derived_from_awkward_stream_names_are_in_the_streams_slot() {
    const AWKWARD: [&str; 6] = ["a{}b", "x}y", "}{", "{}", "{a}b", "a{b}c{d}"];
    let cluster = start_cluster().await;
    let mut connection = master_connection(&cluster, "any").await;
    let mut slot_of = async |key: &str| -> u16 {
        within(
            "CLUSTER KEYSLOT",
            STEP,
            redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query_async(&mut connection),
        )
        .await
        .unwrap()
    };
    for stream in AWKWARD {
        let slot = slot_of(stream).await;
        for key in slim_bus::__private::keys_next_to_stream(stream, ":dlq", "tests") {
            assert_eq!(slot_of(&key).await, slot, "`{key}` of stream `{stream}`");
        }
    }

    let healed = Arc::new(AtomicBool::new(false));
    let (handler, mut seen) = Scripted::<UserCreated>::new({
        let healed = healed.clone();
        move |_, _| {
            let healed = healed.load(Ordering::SeqCst);
            async move {
                if healed {
                    Ok(())
                } else {
                    Err(HandlerError::permanent("the downstream refuses it"))
                }
            }
        }
    });
    let streams: Vec<String> = AWKWARD.iter().map(|s| (*s).to_owned()).collect();
    let mut builder = bus(&cluster);
    for stream in &streams[..5] {
        builder = builder.handler_on(stream.clone(), handler.clone());
    }
    let bus = within(
        "build",
        STEP,
        builder.handler_on(streams[5].clone(), handler).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for (seq, stream) in streams.iter().enumerate() {
        within("publish", STEP, bus.publish_to(stream, &user(seq as u64)))
            .await
            .unwrap();
    }
    for stream in &streams {
        let dead_letters = bus.dead_letters(stream);
        within("the entry to be dead-lettered", SETTLE, async {
            while dead_letters.len().await.unwrap() < 1 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }
    until_nothing_pending(&cluster, &streams).await;
    while seen.try_recv().is_ok() {}
    healed.store(true, Ordering::SeqCst);
    for stream in &streams {
        let dead_letters = bus.dead_letters(stream);
        let replayed = within("replay", STEP, dead_letters.replay_all())
            .await
            .unwrap();
        assert_eq!(replayed, 1, "{stream}");
        assert_eq!(dead_letters.len().await.unwrap(), 0, "{stream}");
    }
    let mut replayed = BTreeSet::new();
    while replayed.len() < streams.len() {
        replayed.insert(recv(&mut seen, "a replayed entry").await.stream);
    }
    until_nothing_pending(&cluster, &streams).await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_entries_on_three_masters_stay_fresh_and_are_handed_over_at_shutdown() {
    let cluster = start_cluster().await;
    let streams = stream_per_master(&cluster).await;
    let claim_min_idle = Duration::from_millis(300);
    let leaving = |handler: Scripted<UserCreated>, streams: &[String]| {
        let mut builder = bus(&cluster)
            .consumer_name("leaving-pod")
            .handler_timeout(Duration::from_secs(600))
            .shutdown_grace(Duration::from_millis(100))
            .claim_min_idle(claim_min_idle)
            // Its own scans would claim its entries back to itself: only the other scans.
            .claim_interval(Duration::from_secs(3600))
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(100));
        for stream in streams {
            builder = builder.handler_on(stream.clone(), handler.clone());
        }
        builder
    };
    let (hanging, mut started) =
        Scripted::<UserCreated>::new(|_, _| std::future::pending::<Result<(), HandlerError>>());
    let leaving = within("build", STEP, leaving(hanging, &streams).build())
        .await
        .unwrap();
    let leaving_bus = leaving;
    let leaving = within("listen", STEP, leaving_bus.listen()).await.unwrap();
    for stream in &streams {
        within("publish", STEP, leaving_bus.publish_to(stream, &user(1)))
            .await
            .unwrap();
    }
    for _ in &streams {
        recv(&mut started, "a handler of the leaving consumer").await;
    }

    let (handler, mut seen) = Record::<UserCreated>::new();
    let mut staying = bus(&cluster)
        .consumer_name("staying-pod")
        .claim_min_idle(claim_min_idle)
        .claim_interval(Duration::from_millis(50))
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(100));
    for stream in &streams {
        staying = staying.handler_on(stream.clone(), handler.clone());
    }
    let staying = within("build", STEP, staying.build()).await.unwrap();
    let staying = within("listen", STEP, staying.listen()).await.unwrap();
    // Kept fresh on every master: four times claim_min_idle of scans claim nothing.
    let claimed = tokio::time::timeout(claim_min_idle * 4, seen.recv()).await;
    assert!(claimed.is_err(), "a running handler's entry was claimed");

    within("shutdown past the grace period", STEP, leaving.shutdown())
        .await
        .unwrap();
    let mut handed = BTreeSet::new();
    for _ in &streams {
        let delivery = recv(&mut seen, "an entry handed over").await;
        assert_eq!(delivery.consumer, "staying-pod");
        handed.insert(delivery.stream);
    }
    assert_eq!(handed, streams.iter().cloned().collect());
    until_nothing_pending(&cluster, &streams).await;
    within("shutdown", STEP, staying.shutdown()).await.unwrap();
}
