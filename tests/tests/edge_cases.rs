//! Edge cases at the limits: absurd delays, replays of entries that fail again, reads at
//! shutdown, and unsupported URLs.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde::{Deserialize, Serialize};
use slim_bus::{Context, Error, EventBus, EventBusBuilder, HandlerError};
use slim_bus_tests::{RedisServer, within};
use tokio::sync::mpsc;

const STEP: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "orders")]
struct Order {
    seq: u64,
}

async fn server() -> RedisServer {
    slim_bus_tests::init_tracing();
    within("redis-server", STEP, RedisServer::start())
        .await
        .unwrap()
}

fn bus(server: &RedisServer) -> EventBusBuilder {
    EventBus::builder()
        .url(server.url())
        .consumer_group("edge")
        .consumer_name("edge-1")
        .block_time(Duration::from_millis(200))
        .handler_timeout(Duration::from_millis(500))
        .claim_min_idle(Duration::from_secs(5))
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
}

async fn pending(server: &RedisServer) -> usize {
    let mut conn = server.connection().await;
    let summary: redis::Value = within(
        "XPENDING",
        STEP,
        redis::cmd("XPENDING")
            .arg("orders")
            .arg("edge")
            .query_async(&mut conn),
    )
    .await
    .unwrap();
    match summary {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(n)) => *n as usize,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

/// Sends each delivery's seq to the test, then fails or succeeds as `outcome` says.
struct Scripted<F> {
    seen: mpsc::UnboundedSender<u64>,
    outcome: F,
}

#[slim_bus::async_trait]
impl<F> slim_bus::StreamHandler for Scripted<F>
where
    F: Fn(&Order) -> Result<(), HandlerError> + Send + Sync + 'static,
{
    type Event = Order;

    async fn handle(&self, event: Order, _ctx: Context) -> Result<(), HandlerError> {
        let _ = self.seen.send(event.seq);
        (self.outcome)(&event)
    }
}

fn scripted<F>(outcome: F) -> (Scripted<F>, mpsc::UnboundedReceiver<u64>)
where
    F: Fn(&Order) -> Result<(), HandlerError> + Send + Sync + 'static,
{
    let (seen, rx) = mpsc::unbounded_channel();
    (Scripted { seen, outcome }, rx)
}

async fn recv(rx: &mut mpsc::UnboundedReceiver<u64>) -> u64 {
    within("a delivery", STEP, rx.recv()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_all_ends_even_when_the_replayed_entries_fail_again() {
    let server = server().await;
    let (handler, mut seen) = scripted(|_| Err(HandlerError::permanent("still broken")));
    let bus = within("build", STEP, bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let orders: Vec<Order> = (0..50).map(|seq| Order { seq }).collect();
    within("publish", STEP, bus.publish_batch(&orders))
        .await
        .unwrap();
    for _ in 0..50 {
        recv(&mut seen).await;
    }
    let dead = bus.dead_letters("orders");
    within("dead letters", STEP, async {
        while dead.len().await.unwrap() < 50 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // While it replays, the listener dead-letters the replayed entries again.
    assert_eq!(
        within("replay_all", STEP, dead.replay_all()).await.unwrap(),
        50
    );
    for _ in 0..50 {
        recv(&mut seen).await;
    }
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_retry_delay_leaves_the_entry_pending_without_harming_the_bus() {
    let server = server().await;
    let (handler, mut seen) = scripted(|order| {
        if order.seq == 0 {
            Err(HandlerError::retry_after(Duration::MAX, "much later"))
        } else {
            Ok(())
        }
    });
    let bus = within("build", STEP, bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let orders: Vec<Order> = (0..3).map(|seq| Order { seq }).collect();
    within("publish", STEP, bus.publish_batch(&orders))
        .await
        .unwrap();
    let mut handled: Vec<u64> = Vec::new();
    for _ in 0..3 {
        handled.push(recv(&mut seen).await);
    }
    handled.sort_unstable();
    assert_eq!(handled, [0, 1, 2]);
    within("acks", STEP, async {
        while pending(&server).await != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within("publish", STEP, bus.publish(&Order { seq: 3 }))
        .await
        .unwrap();
    assert_eq!(recv(&mut seen).await, 3, "the bus still handles entries");
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_returns_the_bus_reads_nothing_more() {
    let server = server().await;
    let (handler, mut seen) = scripted(|_| Ok(()));
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .block_time(Duration::from_secs(5))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&Order { seq: 1 }))
        .await
        .unwrap();
    assert_eq!(recv(&mut seen).await, 1);
    // The reader is blocked in a 5 s read now.
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    within("publish", STEP, bus.publish(&Order { seq: 2 }))
        .await
        .unwrap();
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(
        health.streams[0].pending, 0,
        "no consumer took the entry published after shutdown"
    );
    assert_eq!(health.streams[0].lag, Some(1));
}

#[tokio::test]
async fn tls_urls_are_refused_by_name() {
    let err = within(
        "build",
        STEP,
        EventBus::builder().url("rediss://127.0.0.1:1/").build(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Config { setting: "url", .. }), "{err}");
}
