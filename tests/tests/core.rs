//! The core runtime against a real redis-server: round trips, concurrency, timeouts,
//! pending recovery, graceful shutdown, panics, and configuration errors.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use slim_bus::{Context, Error, EventBus, HandlerError, StreamHandler};
use slim_bus_tests::within;
use support::*;
use tokio::sync::{Semaphore, mpsc};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_events_reach_their_handler_typed_and_are_acknowledged() {
    let server = start_server().await;
    let (handler, mut seen) = Record::<UserCreated>::new();
    let bus = within("build", STEP, bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();

    let id = within("publish", STEP, bus.publish(&user(7)))
        .await
        .unwrap();
    let delivery = recv(&mut seen, "the delivery").await;

    assert_eq!(delivery.event, user(7));
    assert_eq!(delivery.stream, "user.created");
    assert_eq!(delivery.entry_id, id);
    assert_eq!(delivery.consumer, "consumer-1");
    assert_eq!(delivery.delivery_count, 1);
    until_nothing_pending(&server, "user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_published_before_the_group_existed_are_handled() {
    let server = start_server().await;
    let publisher = within(
        "build publisher",
        STEP,
        EventBus::builder().url(server.url()).build(),
    )
    .await
    .unwrap();
    for seq in 0..3 {
        within("publish", STEP, publisher.publish(&user(seq)))
            .await
            .unwrap();
    }

    let (handler, mut seen) = Record::<UserCreated>::new();
    let bus = within("build", STEP, bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let mut seqs = Vec::new();
    for _ in 0..3 {
        seqs.push(recv(&mut seen, "an early entry").await.event.seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, [0, 1, 2]);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// Tracks how many handlers run at once.
struct BusyHandler(Arc<Busy>);

struct Busy {
    running: AtomicUsize,
    peak: AtomicUsize,
    done: mpsc::UnboundedSender<u64>,
}

#[slim_bus::async_trait]
impl StreamHandler for BusyHandler {
    type Event = UserCreated;

    async fn handle(&self, event: UserCreated, _ctx: Context) -> Result<(), HandlerError> {
        let busy = &self.0;
        let now = busy.running.fetch_add(1, Ordering::SeqCst) + 1;
        busy.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        busy.running.fetch_sub(1, Ordering::SeqCst);
        let _ = busy.done.send(event.seq);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_limit_is_reached_and_never_exceeded() {
    let server = start_server().await;
    let (done, mut finished) = mpsc::unbounded_channel();
    let busy = Arc::new(Busy {
        running: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
        done,
    });
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .max_concurrent(8)
            .handler(BusyHandler(busy.clone()))
            .build(),
    )
    .await
    .unwrap();
    for seq in 0..200 {
        within("publish", STEP, bus.publish(&user(seq)))
            .await
            .unwrap();
    }
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let mut handled = Vec::new();
    for _ in 0..200 {
        handled.push(recv(&mut finished, "a handled entry").await);
    }
    handled.sort_unstable();
    assert_eq!(handled, (0..200).collect::<Vec<_>>());
    assert_eq!(busy.peak.load(Ordering::SeqCst), 8, "peak concurrency");
    until_nothing_pending(&server, "user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// Never finishes on its own; reports when its context is cancelled and when its future
/// is dropped.
struct Stuck {
    started: mpsc::UnboundedSender<u64>,
    cancelled: mpsc::UnboundedSender<u64>,
    dropped: mpsc::UnboundedSender<u64>,
}

struct OnDrop(Option<(mpsc::UnboundedSender<u64>, u64)>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some((tx, seq)) = self.0.take() {
            let _ = tx.send(seq);
        }
    }
}

#[slim_bus::async_trait]
impl StreamHandler for Stuck {
    type Event = UserCreated;

    async fn handle(&self, event: UserCreated, ctx: Context) -> Result<(), HandlerError> {
        let _guard = OnDrop(Some((self.dropped.clone(), event.seq)));
        let cancelled = self.cancelled.clone();
        let token = ctx.cancellation_token();
        tokio::spawn(async move {
            token.cancelled().await;
            let _ = cancelled.send(event.seq);
        });
        let _ = self.started.send(event.seq);
        std::future::pending::<()>().await;
        Ok(())
    }
}

fn stuck() -> (
    Stuck,
    mpsc::UnboundedReceiver<u64>,
    mpsc::UnboundedReceiver<u64>,
    mpsc::UnboundedReceiver<u64>,
) {
    let (started, started_rx) = mpsc::unbounded_channel();
    let (cancelled, cancelled_rx) = mpsc::unbounded_channel();
    let (dropped, dropped_rx) = mpsc::unbounded_channel();
    (
        Stuck {
            started,
            cancelled,
            dropped,
        },
        started_rx,
        cancelled_rx,
        dropped_rx,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_past_its_timeout_is_cancelled_and_its_entry_stays_pending() {
    let server = start_server().await;
    let (handler, mut started, mut cancelled, mut dropped) = stuck();
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .handler_timeout(Duration::from_millis(200))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();

    assert_eq!(recv(&mut started, "the handler to start").await, 1);
    assert_eq!(
        recv(&mut dropped, "the handler future to be dropped").await,
        1
    );
    assert_eq!(recv(&mut cancelled, "the context to be cancelled").await, 1);
    assert_eq!(pending_count(&server, "user.created", "tests").await, 1);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    assert_eq!(pending_count(&server, "user.created", "tests").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_consumer_handles_its_own_pending_entries_before_new_ones() {
    let server = start_server().await;
    let mut conn = server.connection().await;
    let _: () = within(
        "XGROUP CREATE",
        STEP,
        redis::cmd("XGROUP")
            .arg(&["CREATE", "user.created", "tests", "0", "MKSTREAM"])
            .query_async(&mut conn),
    )
    .await
    .unwrap();
    let publisher = within(
        "build publisher",
        STEP,
        EventBus::builder().url(server.url()).build(),
    )
    .await
    .unwrap();
    for seq in 0..3 {
        within("publish", STEP, publisher.publish(&user(seq)))
            .await
            .unwrap();
    }
    // The previous life of consumer-1 read these three and died before acknowledging.
    let _: redis::Value = within(
        "XREADGROUP as the crashed consumer",
        STEP,
        redis::cmd("XREADGROUP")
            .arg(&[
                "GROUP",
                "tests",
                "consumer-1",
                "COUNT",
                "10",
                "STREAMS",
                "user.created",
                ">",
            ])
            .query_async(&mut conn),
    )
    .await
    .unwrap();
    for seq in 3..5 {
        within("publish", STEP, publisher.publish(&user(seq)))
            .await
            .unwrap();
    }

    let (handler, mut seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        bus(&server).max_concurrent(1).handler(handler).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..5 {
        let delivery = recv(&mut seen, "a delivery").await;
        order.push((delivery.event.seq, delivery.delivery_count));
    }
    assert_eq!(order, [(0, 2), (1, 2), (2, 2), (3, 1), (4, 1)]);
    until_nothing_pending(&server, "user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// Waits at a gate the test opens.
struct Gated {
    started: mpsc::UnboundedSender<u64>,
    finished: mpsc::UnboundedSender<u64>,
    gate: Arc<Semaphore>,
}

#[slim_bus::async_trait]
impl StreamHandler for Gated {
    type Event = UserCreated;

    async fn handle(&self, event: UserCreated, _ctx: Context) -> Result<(), HandlerError> {
        let _ = self.started.send(event.seq);
        let _pass = self.gate.acquire().await?;
        let _ = self.finished.send(event.seq);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_waits_for_running_handlers_and_acknowledges_them() {
    let server = start_server().await;
    let (started, mut started_rx) = mpsc::unbounded_channel();
    let (finished, mut finished_rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    let handler = Gated {
        started,
        finished,
        gate: gate.clone(),
    };
    let bus = within("build", STEP, bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for seq in 0..3 {
        within("publish", STEP, bus.publish(&user(seq)))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        recv(&mut started_rx, "a handler to start").await;
    }

    listener.shutdown_handle().shutdown();
    gate.add_permits(3);
    within("shutdown", STEP, listener).await.unwrap();

    let mut finished = Vec::new();
    while let Ok(seq) = finished_rx.try_recv() {
        finished.push(seq);
    }
    finished.sort_unstable();
    assert_eq!(finished, [0, 1, 2], "every running handler finished");
    assert_eq!(
        pending_count(&server, "user.created", "tests").await,
        0,
        "shutdown flushed the acks of the handlers it waited for"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_abandons_handlers_after_the_grace_period_and_leaves_their_entries_pending() {
    let server = start_server().await;
    let (handler, mut started, mut cancelled, _dropped) = stuck();
    let first = within(
        "build",
        STEP,
        bus(&server)
            .shutdown_grace(Duration::from_millis(100))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, first.listen()).await.unwrap();
    within("publish", STEP, first.publish(&user(1)))
        .await
        .unwrap();
    recv(&mut started, "the handler to start").await;

    within("shutdown past the grace period", STEP, listener.shutdown())
        .await
        .unwrap();
    assert_eq!(recv(&mut cancelled, "the context to be cancelled").await, 1);
    assert_eq!(pending_count(&server, "user.created", "tests").await, 1);

    // The next start delivers it again.
    let (handler, mut seen) = Record::<UserCreated>::new();
    let second = within("build", STEP, bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen again", STEP, second.listen()).await.unwrap();
    let delivery = recv(&mut seen, "the abandoned entry again").await;
    assert_eq!((delivery.event.seq, delivery.delivery_count), (1, 2));
    until_nothing_pending(&server, "user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

struct Panicky {
    handled: mpsc::UnboundedSender<u64>,
}

#[slim_bus::async_trait]
impl StreamHandler for Panicky {
    type Event = UserCreated;

    async fn handle(&self, event: UserCreated, _ctx: Context) -> Result<(), HandlerError> {
        if event.user_name == "boom" {
            panic!("handler bug");
        }
        let _ = self.handled.send(event.seq);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_does_not_stop_the_bus() {
    let server = start_server().await;
    let (handled, mut handled_rx) = mpsc::unbounded_channel();
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .max_concurrent(1)
            .handler(Panicky { handled })
            .build(),
    )
    .await
    .unwrap();
    let mut listener = within("listen", STEP, bus.listen()).await.unwrap();
    let mut poison = user(1);
    poison.user_name = "boom".into();
    within("publish", STEP, bus.publish(&poison)).await.unwrap();
    within("publish", STEP, bus.publish(&user(2)))
        .await
        .unwrap();

    assert_eq!(recv(&mut handled_rx, "the entry after the panic").await, 2);
    // The listener is still running, and the panicked entry is still pending.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut listener)
            .await
            .is_err(),
        "the listener stopped after a panic"
    );
    within("publish", STEP, bus.publish(&user(3)))
        .await
        .unwrap();
    assert_eq!(recv(&mut handled_rx, "an entry after that").await, 3);
    within("the panicked entry to stay pending", STEP, async {
        while pending_count(&server, "user.created", "tests").await != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_errors_leave_the_entry_pending() {
    struct Failing(mpsc::UnboundedSender<u64>);
    #[slim_bus::async_trait]
    impl StreamHandler for Failing {
        type Event = UserCreated;
        async fn handle(&self, event: UserCreated, _ctx: Context) -> Result<(), HandlerError> {
            let _ = self.0.send(event.seq);
            Err("the database is down".into())
        }
    }
    let server = start_server().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let bus = within("build", STEP, bus(&server).handler(Failing(tx)).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    recv(&mut rx, "the failing call").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    assert_eq!(pending_count(&server, "user.created", "tests").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bus_handles_several_streams_and_publishes_while_listening() {
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct UserDeleted {
        user_id: String,
    }
    impl slim_bus::Event for UserDeleted {
        const STREAM: Option<&'static str> = Some("user.deleted");
    }
    let server = start_server().await;
    let (created, mut created_rx) = Record::<UserCreated>::new();
    let (deleted, mut deleted_rx) = Record::<UserDeleted>::new();
    let (audit, mut audit_rx) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .max_concurrent(2)
            .handler(created)
            .handler(deleted)
            .handler_on("user.audit", audit)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let publisher = bus.clone();
    let published = tokio::spawn(async move {
        for seq in 0..20 {
            publisher.publish(&user(seq)).await?;
            publisher
                .publish(&UserDeleted {
                    user_id: format!("u{seq}"),
                })
                .await?;
            publisher.publish_to("user.audit", &user(seq)).await?;
        }
        Ok::<_, Error>(())
    });
    within("publishing", STEP, published)
        .await
        .unwrap()
        .unwrap();
    for _ in 0..20 {
        assert_eq!(
            recv(&mut created_rx, "user.created").await.stream,
            "user.created"
        );
        assert_eq!(
            recv(&mut deleted_rx, "user.deleted").await.stream,
            "user.deleted"
        );
        assert_eq!(recv(&mut audit_rx, "user.audit").await.stream, "user.audit");
    }
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test]
async fn invalid_settings_are_rejected_by_name() {
    let (handler, _seen) = Record::<UserCreated>::new();
    let cases: Vec<(&str, slim_bus::EventBusBuilder)> = vec![
        (
            "max_concurrent",
            EventBus::builder().consumer_group("g").max_concurrent(0),
        ),
        (
            "max_count",
            EventBus::builder().consumer_group("g").max_count(0),
        ),
        (
            "handler_timeout",
            EventBus::builder()
                .consumer_group("g")
                .handler_timeout(Duration::ZERO),
        ),
        ("consumer_group", EventBus::builder().consumer_group(" ")),
        ("consumer_name", EventBus::builder().consumer_name("")),
        ("block_time", EventBus::builder().block_time(Duration::ZERO)),
        ("url", EventBus::builder().url("")),
        ("url", EventBus::builder().url("not a url")),
        ("consumer_group", EventBus::builder().handler(handler)),
    ];
    for (setting, builder) in cases {
        match within("build", STEP, builder.build()).await {
            Err(Error::Config {
                setting: named,
                reason,
            }) => {
                assert_eq!(named, setting, "wrong setting named ({reason})")
            }
            other => panic!("expected {setting} to be rejected, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_mistakes_are_rejected_at_build() {
    let server = start_server().await;
    let (a, _) = Record::<UserCreated>::new();
    let (b, _) = Record::<UserCreated>::new();
    let err = within("build", STEP, bus(&server).handler(a).handler(b).build())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::DuplicateHandler { stream, .. } if stream == "user.created"),
        "{err}"
    );

    let (untyped, _) = Record::<std::collections::HashMap<String, String>>::new();
    let err = within("build", STEP, bus(&server).handler(untyped).build())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoHandlerStream { .. }), "{err}");

    let publisher = within("build", STEP, bus(&server).build()).await.unwrap();
    let err = within("listen", STEP, publisher.listen())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoHandlers), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_reports_a_stream_key_of_another_type() {
    let server = start_server().await;
    let mut conn = server.connection().await;
    let _: () = within(
        "SET",
        STEP,
        redis::AsyncCommands::set(&mut conn, "user.created", "oops"),
    )
    .await
    .unwrap();
    let (handler, _seen) = Record::<UserCreated>::new();
    let bus = within("build", STEP, bus(&server).handler(handler).build())
        .await
        .unwrap();
    let err = within("listen", STEP, bus.listen()).await.unwrap_err();
    assert!(
        matches!(&err, Error::WrongType { stream, actual } if stream == "user.created" && actual == "string"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "key `user.created` holds a Redis string, not a stream: delete or rename it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_fails_clearly_when_redis_is_unreachable() {
    let server = start_server().await;
    let url = server.url();
    drop(server);
    let err = within("build", STEP, EventBus::builder().url(url).build())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Redis { .. } | Error::Timeout { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("connecting to 127.0.0.1:"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_listens_once_at_a_time() {
    let server = start_server().await;
    let (handler, _seen) = Record::<UserCreated>::new();
    let bus = within("build", STEP, bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let err = within("listen again", STEP, bus.listen())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyListening), "{err}");
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    let listener = within("listen after shutdown", STEP, bus.listen())
        .await
        .unwrap();
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_connection_reads_pending_entries_and_dead_letters() {
    let server = start_server().await;
    let (handler, mut seen) = Scripted::new(|event: UserCreated, _| async move {
        match event.seq {
            0 => Ok(()),
            1 => Err(HandlerError::permanent("bad")),
            _ => Err(HandlerError::retry_after(Duration::from_secs(60), "later")),
        }
    });
    let bus = within("build", STEP, bus(&server).handler(handler).build())
        .await
        .unwrap();
    let before = within("health", STEP, bus.health()).await;
    assert!(before.connected && !before.listening);
    assert_eq!(before.since_last_read, None);

    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for seq in 0..3 {
        within("publish", STEP, bus.publish(&user(seq)))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        recv(&mut seen, "an attempt").await;
    }
    let health = within("the dead letter and the ack to land", STEP, async {
        loop {
            let health = bus.health().await;
            if health.streams[0].dead_letters == 1 && health.streams[0].pending == 1 {
                break health;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(health.connected && health.listening);
    assert!(health.since_last_read.is_some());
    let stream = &health.streams[0];
    assert_eq!(stream.stream, "user.created");
    assert_eq!(stream.lag, Some(0));
    assert!(stream.oldest_pending_idle.is_some());
    within("shutdown", STEP, listener.shutdown()).await.unwrap();

    drop(server);
    let gone = within("health without redis", STEP, bus.health()).await;
    assert!(!gone.connected && !gone.listening);
    assert!(gone.streams.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_stops_with_an_error_when_redis_refuses_the_credentials() {
    let server = start_server().await;
    let (handler, _seen) = Record::<UserCreated>::new();
    let bus = within("build", STEP, bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let mut conn = server.connection().await;
    // Require a password, and drop every connection so that the bus must log in again.
    let _: () = within(
        "CONFIG SET requirepass",
        STEP,
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("requirepass")
            .arg("s3cret")
            .query_async(&mut conn),
    )
    .await
    .unwrap();
    let _: redis::Value = within(
        "CLIENT KILL",
        STEP,
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .query_async(&mut conn),
    )
    .await
    .unwrap_or(redis::Value::Nil);
    let err = within("the listener to give up", STEP, listener)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("NOAUTH") || err.to_string().to_lowercase().contains("auth"),
        "{err}"
    );
}
