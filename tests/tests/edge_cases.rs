//! Edge cases at the limits: absurd delays, replays of entries that fail again, reads at
//! shutdown.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use slim_bus::{EventBusBuilder, HandlerError};
use slim_bus_tests::{RedisServer, within};
use support::*;

fn edge_bus(server: &RedisServer) -> EventBusBuilder {
    bus(server)
        .handler_timeout(Duration::from_millis(500))
        .claim_min_idle(Duration::from_secs(5))
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_all_ends_even_when_the_replayed_entries_fail_again() {
    let server = start_server().await;
    let (handler, mut seen) =
        Scripted::new(|_: UserCreated, _| async { Err(HandlerError::permanent("still broken")) });
    let bus = within("build", STEP, edge_bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let users: Vec<UserCreated> = (0..50).map(user).collect();
    within("publish", STEP, bus.publish_batch(&users))
        .await
        .unwrap();
    for _ in 0..50 {
        recv(&mut seen, "a first attempt").await;
    }
    let dead = bus.dead_letters("user.created");
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
        recv(&mut seen, "a replayed attempt").await;
    }
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_retry_delay_leaves_the_entry_pending_without_harming_the_bus() {
    let server = start_server().await;
    let (handler, mut seen) = Scripted::new(|event: UserCreated, _| async move {
        if event.seq == 0 {
            Err(HandlerError::retry_after(Duration::MAX, "much later"))
        } else {
            Ok(())
        }
    });
    let bus = within("build", STEP, edge_bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let users: Vec<UserCreated> = (0..3).map(user).collect();
    within("publish", STEP, bus.publish_batch(&users))
        .await
        .unwrap();
    let mut handled: Vec<u64> = Vec::new();
    for _ in 0..3 {
        handled.push(recv(&mut seen, "a delivery").await.event.seq);
    }
    handled.sort_unstable();
    assert_eq!(handled, [0, 1, 2]);
    within("acks", STEP, async {
        while pending_count(&server, "user.created", "tests").await != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within("publish", STEP, bus.publish(&user(3)))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut seen, "a later entry").await.event.seq,
        3,
        "the bus still handles entries"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_returns_the_bus_reads_nothing_more() {
    let server = start_server().await;
    let (handler, mut seen) = Scripted::new(|_: UserCreated, _| async { Ok(()) });
    let bus = within(
        "build",
        STEP,
        edge_bus(&server)
            .block_time(Duration::from_secs(5))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    assert_eq!(recv(&mut seen, "the first entry").await.event.seq, 1);
    // The reader is blocked in a 5 s read now.
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    within("publish", STEP, bus.publish(&user(2)))
        .await
        .unwrap();
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(
        health.streams[0].pending, 0,
        "no consumer took the entry published after shutdown"
    );
    assert_eq!(health.streams[0].lag, Some(1));
}
