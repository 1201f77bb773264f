//! Starting and identity: a bus built and serving its health while Redis is down and
//! listening once Redis answers; one live process per consumer name, and a process
//! restarted after a crash under its own name finding its pending entries.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use slim_bus::{Error, EventBus, HandlerError};
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
    // health() says what listen() waits for, and why.
    let waiting = within("health to show the wait for redis", STEP, async {
        loop {
            let health = bus.health().await;
            if health.waiting_for.is_some() {
                return health;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(waiting.waiting_for, Some("redis"), "{waiting:?}");
    let last_error = waiting.last_error.clone().unwrap_or_default();
    assert!(
        last_error.contains(&format!("127.0.0.1:{port}")),
        "{last_error}"
    );
    let json = serde_json::to_value(&waiting).unwrap();
    assert_eq!(json["waiting_for"], "redis", "{json}");
    assert_eq!(json["last_error"], last_error.as_str(), "{json}");
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
    let health = within("health", STEP, bus.health()).await;
    assert!(health.connected, "{health:?}");
    assert_eq!(
        (health.waiting_for, health.last_error.as_deref()),
        (None, None),
        "{health:?}"
    );
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
        report.contains(&format!("connecting to redis://127.0.0.1:{port}/")),
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

conformance!(a_consumer_name_listened_under_by_a_live_bus_is_refused);
async fn a_consumer_name_listened_under_by_a_live_bus_is_refused(backend: Backend) {
    let lease = Duration::from_millis(600);
    // The lease must outlast two command timeouts.
    let command_timeout = Duration::from_millis(300);
    let (first_handler, mut first_seen) = Record::<UserCreated>::new();
    let first = within(
        "build",
        STEP,
        backend
            .bus()
            .consumer_lease_ttl(lease)
            .command_timeout(command_timeout)
            .handler(first_handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, first.listen()).await.unwrap();

    let (handler, _seen) = Record::<UserCreated>::new();
    let second = within(
        "build a second bus",
        STEP,
        backend
            .bus()
            .consumer_lease_ttl(lease)
            .command_timeout(command_timeout)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let err = within("listen under the same name", STEP, second.listen())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::ConsumerNameTaken { group, consumer, .. } if group == "tests" && consumer == "consumer-1"),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.starts_with(
            "consumer name `consumer-1` of group `tests` is in use by another live process (pid "
        ),
        "{message}"
    );
    assert!(
        message.ends_with("give each process its own consumer_name"),
        "{message}"
    );

    // The first bus goes on, its lease renewed past its TTL.
    let id = within("publish", STEP, first.publish(&user(1)))
        .await
        .unwrap();
    assert_eq!(recv(&mut first_seen, "the delivery").await.entry_id, id);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();

    // Shutdown released the name.
    let listener = within("listen after the first shut down", STEP, second.listen())
        .await
        .unwrap();
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(names_holding_colons_lease_names_of_their_own);
async fn names_holding_colons_lease_names_of_their_own(backend: Backend) {
    let mut listeners = Vec::new();
    for (group, consumer) in [("a:b", "c"), ("a", "b:c")] {
        let (handler, _seen) = Record::<UserCreated>::new();
        let bus = within(
            "build",
            STEP,
            backend
                .bus()
                .consumer_group(group)
                .consumer_name(consumer)
                .handler(handler)
                .build(),
        )
        .await
        .unwrap();
        let listener = within("listen", STEP, bus.listen())
            .await
            .unwrap_or_else(|e| panic!("group `{group}`, consumer `{consumer}`: {e}"));
        listeners.push(listener);
    }
    for listener in listeners {
        within("shutdown", STEP, listener.shutdown()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_restarted_after_a_crash_under_its_name_handles_its_pending_entries() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let server = start_server().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_slim-bus-test-consumer"))
        .arg(server.url())
        .arg("pod-7")
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
    let (handler, mut seen) = Record::<UserCreated>::new();
    // The restarted process: claims by others would take a minute.
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .consumer_name("pod-7")
            .claim_min_idle(Duration::from_secs(60))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    assert_eq!(next_line().await, "started 1 1");

    let err = within("listen while the process lives", STEP, bus.listen())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ConsumerNameTaken { .. }), "{err}");

    within("kill -9", STEP, child.kill()).await.unwrap();
    // The dead process's lease lapses within its TTL (5 s, as its command timeout is
    // short); meanwhile health() says whose lease listen() waits for.
    let listening = tokio::spawn({
        let bus = bus.clone();
        async move { bus.listen().await }
    });
    let waiting = within("health to show the wait for the lease", STEP, async {
        loop {
            let health = bus.health().await;
            if health.waiting_for.is_some() {
                return health;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(waiting.waiting_for, Some("consumer_lease"), "{waiting:?}");
    let last_error = waiting.last_error.unwrap_or_default();
    assert!(
        last_error.contains("the consumer name `pod-7` of group `tests` is leased by pid "),
        "{last_error}"
    );
    let listener = within("listen after the crash", STEP, listening)
        .await
        .unwrap()
        .unwrap();
    let delivery = recv(&mut seen, "the entry the crashed process held").await;
    assert_eq!((delivery.event.seq, delivery.delivery_count), (1, 2));
    assert_eq!(delivery.consumer, "pod-7");
    until_nothing_pending(&server, "user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_that_loses_its_lease_lets_its_running_handlers_finish() {
    let server = start_server().await;
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let (handler, mut seen) = Scripted::new({
        let release = release.clone();
        move |_: UserCreated, _| {
            let release = release.clone();
            async move {
                let _permit = release.acquire().await.map_err(HandlerError::new)?;
                // Work that outlasts the renewal beat (a third of the TTL), by which the
                // bus finds its lease taken.
                tokio::time::sleep(Duration::from_millis(900)).await;
                Ok(())
            }
        }
    });
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .consumer_lease_ttl(Duration::from_millis(900))
            .command_timeout(Duration::from_millis(300))
            .handler_timeout(Duration::from_secs(8))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    recv(&mut seen, "the handler to start").await;

    // Another process takes the name, as one does after this one could not renew.
    let mut conn = server.connection().await;
    let _: () = within(
        "SET the lease",
        STEP,
        redis::cmd("SET")
            .arg("slim-bus:consumer:tests:consumer-1")
            .arg("another-token pid 1 on elsewhere")
            .arg("PX")
            .arg(60_000)
            .query_async(&mut conn),
    )
    .await
    .unwrap();
    // The renewal that finds it taken comes within a third of the TTL; the running
    // handler is not abandoned for it, but given the shutdown grace.
    release.add_permits(1);
    let error = within("the listener to stop", STEP, listener)
        .await
        .expect_err("a bus whose lease was taken stops");
    assert!(matches!(error, Error::ConsumerNameTaken { .. }), "{error}");
    until_nothing_pending(&server, "user.created", "tests").await;
}
