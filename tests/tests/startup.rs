//! Starting and identity: a bus built and serving its health while Redis is down, and
//! listening once Redis answers.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use slim_bus::{Error, EventBus};
use slim_bus_tests::{RedisServer, within};
use support::*;

/// A port nothing listens on now, for a server started later.
fn unused_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_builds_without_redis_and_listens_once_redis_answers() {
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
            .command_timeout(Duration::from_secs(1))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();

    let health = within("health without redis", STEP, bus.health()).await;
    assert!(!health.connected, "{health:?}");
    assert!(health.streams.is_empty(), "{health:?}");

    let err = within(
        "a publish without redis",
        Duration::from_secs(2),
        bus.publish(&user(0)),
    )
    .await
    .unwrap_err();
    let report = format!("{:#}", anyhow::Error::new(err));
    assert!(
        report.contains(&format!("not connected to 127.0.0.1:{port}")),
        "{report}"
    );
    assert!(report.contains("nothing was written"), "{report}");

    // listen() waits for Redis by default.
    let listening = tokio::spawn({
        let bus = bus.clone();
        async move { bus.listen().await }
    });
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
    let id = within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    assert_eq!(recv(&mut seen, "the delivery").await.entry_id, id);
    until_nothing_pending(&server, "user.created", "tests").await;
    assert!(within("health", STEP, bus.health()).await.connected);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_fails_at_once_without_redis_unless_it_waits() {
    slim_bus_tests::init_tracing();
    let port = unused_port();
    let (handler, _seen) = Record::<UserCreated>::new();
    let bus = within(
        "build without redis",
        STEP,
        EventBus::builder()
            .url(format!("redis://127.0.0.1:{port}/"))
            .consumer_group("tests")
            .wait_for_redis(false)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let err = within("listen", STEP, bus.listen()).await.unwrap_err();
    assert!(
        matches!(err, Error::Redis { .. } | Error::Timeout { .. }),
        "{err}"
    );
    let report = format!("{:#}", anyhow::Error::new(err));
    assert!(
        report.contains(&format!("connecting to 127.0.0.1:{port}")),
        "{report}"
    );
    assert!(!within("health", STEP, bus.health()).await.listening);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_until_ends_at_its_signal_while_waiting_for_redis() {
    slim_bus_tests::init_tracing();
    let (handler, _seen) = Record::<UserCreated>::new();
    let bus = within(
        "build without redis",
        STEP,
        EventBus::builder()
            .url(format!("redis://127.0.0.1:{}/", unused_port()))
            .consumer_group("tests")
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn({
        let bus = bus.clone();
        async move {
            bus.run_until(async {
                let _ = stopped.await;
            })
            .await
        }
    });
    stop.send(()).unwrap();
    within("run_until to end", STEP, running)
        .await
        .unwrap()
        .unwrap();
}
