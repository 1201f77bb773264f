//! The core runtime: round trips, concurrency, timeouts, pending recovery, graceful
//! shutdown, panics, and configuration errors. Each `conformance!` test runs against a real
//! redis-server and against the in-memory backend (`name::redis`, `name::memory`); the
//! others need a server to break (unreachable, wrong key type, refused credentials).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use slim_bus::{Context, Error, EventBus, HandlerError, StreamHandler};
use slim_bus_tests::within;
use support::*;
use tokio::sync::{Semaphore, mpsc};

conformance!(
    published_events_reach_their_handler_typed_and_are_acknowledged,
    tls
);
async fn published_events_reach_their_handler_typed_and_are_acknowledged(backend: Backend) {
    let (handler, mut seen) = Record::<UserCreated>::new();
    let bus = within("build", STEP, backend.bus().handler(handler).build())
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
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(entries_published_before_the_group_existed_are_handled);
async fn entries_published_before_the_group_existed_are_handled(backend: Backend) {
    let publisher = within("build publisher", STEP, backend.builder().build())
        .await
        .unwrap();
    for seq in 0..3 {
        within("publish", STEP, publisher.publish(&user(seq)))
            .await
            .unwrap();
    }

    let (handler, mut seen) = Record::<UserCreated>::new();
    let bus = within("build", STEP, backend.bus().handler(handler).build())
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

conformance!(the_concurrency_limit_is_reached_and_never_exceeded);
async fn the_concurrency_limit_is_reached_and_never_exceeded(backend: Backend) {
    let (done, mut finished) = mpsc::unbounded_channel();
    let busy = Arc::new(Busy {
        running: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
        done,
    });
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
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
    backend.until_nothing_pending("user.created", "tests").await;
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

conformance!(a_handler_past_its_timeout_is_cancelled_and_its_entry_stays_pending);
async fn a_handler_past_its_timeout_is_cancelled_and_its_entry_stays_pending(backend: Backend) {
    let (handler, mut started, mut cancelled, mut dropped) = stuck();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
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
    assert_eq!(backend.pending_count("user.created", "tests").await, 1);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    assert_eq!(backend.pending_count("user.created", "tests").await, 1);
}

conformance!(after_a_restart_a_consumer_handles_its_own_pending_entries_before_new_ones);
async fn after_a_restart_a_consumer_handles_its_own_pending_entries_before_new_ones(
    backend: Backend,
) {
    let publisher = within("build publisher", STEP, backend.builder().build())
        .await
        .unwrap();
    for seq in 0..3 {
        within("publish", STEP, publisher.publish(&user(seq)))
            .await
            .unwrap();
    }
    // The previous life of consumer-1 read these three and died before acknowledging.
    backend
        .read_as_dead_consumer("user.created", "tests", "consumer-1", 10)
        .await;
    for seq in 3..5 {
        within("publish", STEP, publisher.publish(&user(seq)))
            .await
            .unwrap();
    }

    let (handler, mut seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend.bus().max_concurrent(1).handler(handler).build(),
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
    backend.until_nothing_pending("user.created", "tests").await;
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

conformance!(
    graceful_shutdown_waits_for_running_handlers_and_acknowledges_them,
    tls
);
async fn graceful_shutdown_waits_for_running_handlers_and_acknowledges_them(backend: Backend) {
    let (started, mut started_rx) = mpsc::unbounded_channel();
    let (finished, mut finished_rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    let handler = Gated {
        started,
        finished,
        gate: gate.clone(),
    };
    let bus = within("build", STEP, backend.bus().handler(handler).build())
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
        backend.pending_count("user.created", "tests").await,
        0,
        "shutdown flushed the acks of the handlers it waited for"
    );
}

conformance!(shutdown_abandons_handlers_after_the_grace_period_and_leaves_their_entries_pending);
async fn shutdown_abandons_handlers_after_the_grace_period_and_leaves_their_entries_pending(
    backend: Backend,
) {
    let (handler, mut started, mut cancelled, _dropped) = stuck();
    let first = within(
        "build",
        STEP,
        backend
            .bus()
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
    assert_eq!(backend.pending_count("user.created", "tests").await, 1);

    // The next start delivers it again.
    let (handler, mut seen) = Record::<UserCreated>::new();
    let second = within("build", STEP, backend.bus().handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen again", STEP, second.listen()).await.unwrap();
    let delivery = recv(&mut seen, "the abandoned entry again").await;
    assert_eq!((delivery.event.seq, delivery.delivery_count), (1, 2));
    backend.until_nothing_pending("user.created", "tests").await;
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

conformance!(a_panicking_handler_does_not_stop_the_bus);
async fn a_panicking_handler_does_not_stop_the_bus(backend: Backend) {
    let (handled, mut handled_rx) = mpsc::unbounded_channel();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
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
        while backend.pending_count("user.created", "tests").await != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(handler_errors_leave_the_entry_pending);
async fn handler_errors_leave_the_entry_pending(backend: Backend) {
    struct Failing(mpsc::UnboundedSender<u64>);
    #[slim_bus::async_trait]
    impl StreamHandler for Failing {
        type Event = UserCreated;
        async fn handle(&self, event: UserCreated, _ctx: Context) -> Result<(), HandlerError> {
            let _ = self.0.send(event.seq);
            Err("the database is down".into())
        }
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let bus = within("build", STEP, backend.bus().handler(Failing(tx)).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    recv(&mut rx, "the failing call").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    assert_eq!(backend.pending_count("user.created", "tests").await, 1);
}

conformance!(every_consumer_group_gets_every_entry);
async fn every_consumer_group_gets_every_entry(backend: Backend) {
    let (mailer, mut mailed) = Record::<UserCreated>::new();
    let (accounts, mut opened) = Record::<UserCreated>::new();
    let mailer = within(
        "build",
        STEP,
        backend
            .bus()
            .consumer_group("mailer")
            .handler(mailer)
            .build(),
    )
    .await
    .unwrap();
    let accounts = within(
        "build",
        STEP,
        backend
            .bus()
            .consumer_group("accounts")
            .handler(accounts)
            .build(),
    )
    .await
    .unwrap();
    let mailer_listener = within("listen", STEP, mailer.listen()).await.unwrap();
    let accounts_listener = within("listen", STEP, accounts.listen()).await.unwrap();
    for seq in 0..10 {
        within("publish", STEP, mailer.publish(&user(seq)))
            .await
            .unwrap();
    }
    for seen in [&mut mailed, &mut opened] {
        let mut seqs = Vec::new();
        for _ in 0..10 {
            seqs.push(recv(seen, "a delivery").await.event.seq);
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (0..10).collect::<Vec<_>>());
    }
    backend
        .until_nothing_pending("user.created", "mailer")
        .await;
    backend
        .until_nothing_pending("user.created", "accounts")
        .await;
    within("shutdown", STEP, mailer_listener.shutdown())
        .await
        .unwrap();
    within("shutdown", STEP, accounts_listener.shutdown())
        .await
        .unwrap();
}

conformance!(competing_consumers_in_one_group_handle_each_entry_once);
async fn competing_consumers_in_one_group_handle_each_entry_once(backend: Backend) {
    let (done, mut finished) = mpsc::unbounded_channel();
    let slow = |done: mpsc::UnboundedSender<(String, u64)>| {
        Scripted::new(move |event: UserCreated, ctx: Context| {
            let done = done.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let _ = done.send((ctx.consumer().to_owned(), event.seq));
                Ok(())
            }
        })
        .0
    };
    let mut listeners = Vec::new();
    for name in ["pod-a", "pod-b"] {
        let bus = within(
            "build",
            STEP,
            backend
                .bus()
                .consumer_name(name)
                .max_concurrent(1)
                .handler(slow(done.clone()))
                .build(),
        )
        .await
        .unwrap();
        listeners.push(within("listen", STEP, bus.listen()).await.unwrap());
    }
    let publisher = within("build", STEP, backend.builder().build())
        .await
        .unwrap();
    for seq in 0..40 {
        within("publish", STEP, publisher.publish(&user(seq)))
            .await
            .unwrap();
    }
    let mut seqs = Vec::new();
    let mut consumers = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let (consumer, seq) = recv(&mut finished, "a handled entry").await;
        consumers.insert(consumer);
        seqs.push(seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (0..40).collect::<Vec<_>>(), "each entry once");
    assert_eq!(
        consumers.into_iter().collect::<Vec<_>>(),
        ["pod-a", "pod-b"],
        "both consumers got entries"
    );
    backend.until_nothing_pending("user.created", "tests").await;
    for listener in listeners {
        within("shutdown", STEP, listener.shutdown()).await.unwrap();
    }
    assert!(finished.try_recv().is_err(), "no entry was handled twice");
}

conformance!(
    one_bus_handles_several_streams_and_publishes_while_listening,
    tls
);
async fn one_bus_handles_several_streams_and_publishes_while_listening(backend: Backend) {
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct UserDeleted {
        user_id: String,
    }
    impl slim_bus::Event for UserDeleted {
        const STREAM: Option<&'static str> = Some("user.deleted");
    }
    let (created, mut created_rx) = Record::<UserCreated>::new();
    let (deleted, mut deleted_rx) = Record::<UserDeleted>::new();
    let (audit, mut audit_rx) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
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
        // Redis keeps the whitespace: another group, another consumer.
        (
            "consumer_group",
            EventBus::builder().consumer_group(" billing"),
        ),
        (
            "consumer_group",
            EventBus::builder().consumer_group("billing\n"),
        ),
        ("consumer_name", EventBus::builder().consumer_name("pod-1 ")),
        (
            "consumer_name",
            EventBus::builder().consumer_name("\tpod-1"),
        ),
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
                ..
            }) => {
                assert_eq!(named, setting, "wrong setting named ({reason})")
            }
            other => panic!("expected {setting} to be rejected, got {other:?}"),
        }
    }
}

conformance!(registration_mistakes_are_rejected_at_build);
async fn registration_mistakes_are_rejected_at_build(backend: Backend) {
    let (a, _) = Record::<UserCreated>::new();
    let (b, _) = Record::<UserCreated>::new();
    let err = within("build", STEP, backend.bus().handler(a).handler(b).build())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::DuplicateHandler { stream, .. } if stream == "user.created"),
        "{err}"
    );

    let (untyped, _) = Record::<std::collections::HashMap<String, String>>::new();
    let err = within("build", STEP, backend.bus().handler(untyped).build())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoHandlerStream { .. }), "{err}");

    let publisher = within("build", STEP, backend.bus().build()).await.unwrap();
    let err = within("listen", STEP, publisher.listen())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoHandlers), "{err}");
}

/// Makes `key` hold a string, where the bus expects a stream.
async fn string_key(server: &slim_bus_tests::RedisServer, key: &str) {
    let mut conn = server.connection().await;
    let _: () = within(
        "SET",
        STEP,
        redis::AsyncCommands::set(&mut conn, key, "oops"),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_reports_a_stream_key_of_another_type() {
    let server = start_server().await;
    string_key(&server, "user.created").await;
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

/// When the dead-letter key holds another type, health names that key, not the live
/// stream: an operator who deletes what the message names must not delete the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_names_the_dead_letter_key_that_holds_another_type_not_the_stream() {
    let server = start_server().await;
    string_key(&server, "{user.created}:dlq").await;
    let (handler, mut seen) = Scripted::<UserCreated>::new(|_, _| async {
        Err(HandlerError::permanent("the downstream refuses it"))
    });
    let bus = within("build", STEP, bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    recv(&mut seen, "the entry to fail").await;
    let health = within("health", STEP, bus.health()).await;
    let error = health.streams[0].error.as_deref().unwrap_or_default();
    assert_eq!(
        error, "key `{user.created}:dlq` holds a Redis string, not a stream: delete or rename it",
        "{health:?}"
    );
    assert_eq!(
        stream_len(&server, "user.created").await,
        1,
        "the stream is still there"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// A replay into a live stream whose key holds another type names that key, not the
/// dead-letter stream it replays from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_into_a_key_of_another_type_names_that_key() {
    let server = start_server().await;
    let (handler, mut seen) = Scripted::<UserCreated>::new(|_, _| async {
        Err(HandlerError::permanent("the downstream refuses it"))
    });
    let bus = within("build", STEP, bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    recv(&mut seen, "the entry to fail").await;
    let dead_letters = bus.dead_letters("user.created");
    within("the dead letter", STEP, async {
        while dead_letters.len().await.unwrap() < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    let mut conn = server.connection().await;
    let _: () = within(
        "DEL",
        STEP,
        redis::AsyncCommands::del(&mut conn, "user.created"),
    )
    .await
    .unwrap();
    string_key(&server, "user.created").await;
    let error = within("replay", STEP, dead_letters.replay_all())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::WrongType { stream, actual } if stream == "user.created" && actual == "string"),
        "{error}"
    );
    assert_eq!(
        dead_letters.len().await.unwrap(),
        1,
        "the dead letter is kept"
    );
}

/// A stream whose key is given another type while the bus reads it is set aside: the
/// error names that key (not the first stream of the read), the other streams go on, and
/// once the key is gone the stream is consumed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_key_of_another_type_is_set_aside_and_the_other_streams_go_on() {
    let server = start_server().await;
    let (users, mut seen_users) = Record::<UserCreated>::new();
    let (audits, mut seen_audits) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .claim_interval(Duration::from_millis(200))
            .handler(users)
            .handler_on("audit.user", audits)
            .build(),
    )
    .await
    .unwrap();
    let mut listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish_to("audit.user", &user(1)))
        .await
        .unwrap();
    recv(&mut seen_audits, "the audit entry").await;

    let mut conn = server.connection().await;
    let _: () = within(
        "DEL",
        STEP,
        redis::AsyncCommands::del(&mut conn, "audit.user"),
    )
    .await
    .unwrap();
    string_key(&server, "audit.user").await;
    let health = within("the stream to be set aside", STEP, async {
        loop {
            let health = bus.health().await;
            if health.streams[1].error.is_some() {
                break health;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(health.streams[0].stream, "user.created");
    assert_eq!(health.streams[0].error, None, "{health:?}");
    assert_eq!(health.streams[1].stream, "audit.user");
    assert_eq!(
        health.streams[1].error.as_deref(),
        Some("key `audit.user` holds a Redis string, not a stream: delete or rename it")
    );

    within("publish", STEP, bus.publish(&user(2)))
        .await
        .unwrap();
    assert_eq!(recv(&mut seen_users, "a user entry").await.event.seq, 2);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut listener)
            .await
            .is_err(),
        "the listener goes on"
    );

    let _: () = within(
        "DEL",
        STEP,
        redis::AsyncCommands::del(&mut conn, "audit.user"),
    )
    .await
    .unwrap();
    within("publish", STEP, bus.publish_to("audit.user", &user(3)))
        .await
        .unwrap();
    assert_eq!(
        recv(
            &mut seen_audits,
            "the audit entry after the key was deleted"
        )
        .await
        .event
        .seq,
        3
    );
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(health.streams[1].error, None, "{health:?}");
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// `health()` shows why a stream's state could not be read, before listening too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_why_a_streams_state_could_not_be_read() {
    let server = start_server().await;
    string_key(&server, "audit.user").await;
    let (users, _seen_users) = Record::<UserCreated>::new();
    let (audits, _seen_audits) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .handler(users)
            .handler_on("audit.user", audits)
            .build(),
    )
    .await
    .unwrap();
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(health.streams.len(), 2, "{health:?}");
    assert_eq!(health.streams[0].error, None);
    let error = health.streams[1].error.as_deref().unwrap_or_default();
    assert!(error.contains("`audit.user`"), "{error}");

    // Listening consumes the healthy stream and sets the other aside.
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(
        health.streams[1].error.as_deref(),
        Some("key `audit.user` holds a Redis string, not a stream: delete or rename it")
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// Concurrent publishes travel together in pipelines; each publisher must still get its
/// own entry's id, or its own error, whatever its neighbours in the pipeline got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_each_get_their_own_id_or_error() {
    let server = start_server().await;
    string_key(&server, "taken").await;
    let bus = within("build", STEP, bus(&server).build()).await.unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for seq in 0..300u64 {
        let bus = bus.clone();
        tasks.spawn(async move {
            let outcome = match seq % 3 {
                0 => bus.publish_to("taken", &user(seq)).await.map(|id| vec![id]),
                1 => bus.publish(&user(seq)).await.map(|id| vec![id]),
                _ => bus.publish_batch(&[user(seq), user(seq + 1_000)]).await,
            };
            (seq, outcome)
        });
    }
    let mut expected = std::collections::BTreeMap::new();
    while let Some(joined) = within("a publish", STEP, tasks.join_next()).await {
        let (seq, outcome) = joined.unwrap();
        match (seq % 3, outcome) {
            (0, Err(Error::WrongType { stream, .. })) => assert_eq!(stream, "taken"),
            (1, Ok(ids)) => {
                assert_eq!(ids.len(), 1);
                expected.insert(ids[0].to_string(), seq);
            }
            (2, Ok(ids)) => {
                assert_eq!(ids.len(), 2);
                assert!(ids[0] < ids[1], "a batch keeps its order");
                expected.insert(ids[0].to_string(), seq);
                expected.insert(ids[1].to_string(), seq + 1_000);
            }
            (_, outcome) => panic!("publish {seq} returned {outcome:?}"),
        }
    }
    let written: std::collections::BTreeMap<String, u64> = entries(&server, "user.created")
        .await
        .into_iter()
        .map(|(id, fields)| {
            let seq = fields.iter().find(|(name, _)| name == "seq").unwrap();
            (id, seq.1.parse().unwrap())
        })
        .collect();
    assert_eq!(
        written.len(),
        300,
        "100 single publishes and 100 batches of 2"
    );
    assert_eq!(
        written, expected,
        "each id names the entry its publisher wrote"
    );
}

async fn require_password(conn: &mut redis::aio::MultiplexedConnection, password: &str) {
    let _: () = within(
        "CONFIG SET requirepass",
        STEP,
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("requirepass")
            .arg(password)
            .query_async(conn),
    )
    .await
    .unwrap();
}

/// A URL's password and database apply to every connection of the bus: publishes, reads
/// and acks all land in database 2 of a server that requires a password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_and_database_in_the_url_apply_to_every_connection() {
    let server = start_server().await;
    let mut conn = server.connection().await;
    require_password(&mut conn, "s3cret").await;
    let url = format!("redis://:s3cret@127.0.0.1:{}/2", server.port());
    let (handler, mut seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        EventBus::builder()
            .url(url.as_str())
            .consumer_group("tests")
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    within(
        "publish a batch",
        STEP,
        bus.publish_batch(&[user(2), user(3)]),
    )
    .await
    .unwrap();
    let mut seqs = Vec::new();
    for _ in 0..3 {
        seqs.push(recv(&mut seen, "a delivery").await.event.seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, [1, 2, 3]);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();

    let connect = |url: String| async move {
        within(
            "connect",
            STEP,
            redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection(),
        )
        .await
        .unwrap()
    };
    let mut db2 = connect(url.clone()).await;
    let len: usize = within(
        "XLEN",
        STEP,
        redis::AsyncCommands::xlen(&mut db2, "user.created"),
    )
    .await
    .unwrap();
    assert_eq!(len, 3);
    let pending: redis::Value = within(
        "XPENDING",
        STEP,
        redis::cmd("XPENDING")
            .arg("user.created")
            .arg("tests")
            .query_async(&mut db2),
    )
    .await
    .unwrap();
    assert!(
        matches!(&pending, redis::Value::Array(summary) if summary.first() == Some(&redis::Value::Int(0))),
        "every entry acknowledged in database 2: {pending:?}"
    );
    let mut db0 = connect(format!("redis://:s3cret@127.0.0.1:{}/0", server.port())).await;
    let exists: bool = within(
        "EXISTS",
        STEP,
        redis::AsyncCommands::exists(&mut db0, "user.created"),
    )
    .await
    .unwrap();
    assert!(!exists, "nothing written to database 0");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_publishes_and_consumes_over_a_unix_socket() {
    slim_bus_tests::init_tracing();
    let socket_dir = tempfile::tempdir().unwrap();
    let socket = socket_dir.path().join("redis.sock");
    let server = within(
        "redis-server to start",
        STEP,
        slim_bus_tests::RedisServer::builder()
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--unixsocketperm")
            .arg("700")
            .start(),
    )
    .await
    .unwrap();
    let (handler, mut seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        EventBus::builder()
            .url(format!("unix://{}", socket.display()))
            .consumer_group("tests")
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let id = within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    let batch = within("publish a batch", STEP, bus.publish_batch(&[user(2)]))
        .await
        .unwrap();
    let mut handled = vec![
        recv(&mut seen, "a delivery").await.entry_id,
        recv(&mut seen, "a delivery").await.entry_id,
    ];
    handled.sort_unstable();
    assert_eq!(handled, [id, batch[0]]);
    until_nothing_pending(&server, "user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(a_bus_listens_once_at_a_time);
async fn a_bus_listens_once_at_a_time(backend: Backend) {
    let (handler, _seen) = Record::<UserCreated>::new();
    let bus = within("build", STEP, backend.bus().handler(handler).build())
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

conformance!(
    health_reports_connection_reads_pending_entries_and_dead_letters,
    tls
);
async fn health_reports_connection_reads_pending_entries_and_dead_letters(backend: Backend) {
    let (handler, mut seen) = Scripted::new(|event: UserCreated, _| async move {
        match event.seq {
            0 => Ok(()),
            1 => Err(HandlerError::permanent("bad")),
            _ => Err(HandlerError::retry_after(Duration::from_secs(60), "later")),
        }
    });
    let bus = within("build", STEP, backend.bus().handler(handler).build())
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
    assert_eq!(stream.error, None);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();

    match backend {
        Backend::Redis(server) | Backend::Tls(server, _) => {
            drop(server);
            let gone = within("health without redis", STEP, bus.health()).await;
            assert!(!gone.connected && !gone.listening);
            assert!(gone.streams.is_empty());
        }
        // An in-memory broker cannot go away while a bus holds it.
        Backend::Memory(_) => {
            let stopped = within("health after shutdown", STEP, bus.health()).await;
            assert!(stopped.connected && !stopped.listening);
        }
    }
}

conformance!(health_is_served_as_json_and_tells_ready_and_live);
async fn health_is_served_as_json_and_tells_ready_and_live(backend: Backend) {
    let (handler, _seen) = Record::<UserCreated>::new();
    let bus = within("build", STEP, backend.bus().handler(handler).build())
        .await
        .unwrap();
    let before = within("health", STEP, bus.health()).await;
    assert!(before.is_ready(), "{before:?}");
    assert!(!before.is_live(), "not listening yet: {before:?}");
    let json = serde_json::to_value(&before).unwrap();
    assert_eq!(json["listening"], false);
    assert_eq!(json["since_last_read_ms"], serde_json::Value::Null);
    assert_eq!(json["streams"][0]["stream"], "user.created");

    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let listening = within("a first read", STEP, async {
        loop {
            let health = bus.health().await;
            if health.since_last_read.is_some() {
                break health;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(listening.is_ready() && listening.is_live(), "{listening:?}");
    let json = serde_json::to_value(&listening).unwrap();
    let since_ms = json["since_last_read_ms"].as_u64().unwrap();
    assert!(since_ms <= STEP.as_millis() as u64, "{json}");
    assert_eq!(
        json["read_stall_after_ms"].as_u64().unwrap(),
        listening.read_stall_after.as_millis() as u64
    );
    assert_eq!(
        json["streams"][0]["oldest_pending_idle_ms"],
        serde_json::Value::Null
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();

    let stopped = within("health after shutdown", STEP, bus.health()).await;
    assert!(!stopped.is_live(), "{stopped:?}");
    if let Backend::Redis(server) = backend {
        drop(server);
        let gone = within("health without redis", STEP, bus.health()).await;
        assert!(!gone.is_ready(), "{gone:?}");
        assert_eq!(serde_json::to_value(&gone).unwrap()["connected"], false);
    }
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
    require_password(&mut conn, "s3cret").await;
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
    // The server's refusal is the error's source, which a report prints after it.
    let report = format!("{:#}", anyhow::Error::new(err));
    assert!(
        report.contains("NOAUTH") || report.to_lowercase().contains("auth"),
        "{report}"
    );
}

conformance!(a_handler_publishes_a_follow_up_event_through_its_context);
async fn a_handler_publishes_a_follow_up_event_through_its_context(backend: Backend) {
    let (welcomer, _) = Scripted::<UserCreated>::new(|event, ctx: Context| async move {
        let follow_up = UserCreated {
            user_name: format!("welcomed after {}", ctx.entry_id()),
            ..event
        };
        ctx.publisher()
            .publish_to("user.welcomed", &follow_up)
            .await?;
        Ok(())
    });
    let (welcomed, mut seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .handler(welcomer)
            .handler_on("user.welcomed", welcomed)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let id = within("publish", STEP, bus.publish(&user(3)))
        .await
        .unwrap();

    let delivery = recv(&mut seen, "the follow-up event").await;
    assert_eq!(delivery.stream, "user.welcomed");
    assert_eq!(delivery.event.seq, 3);
    assert_eq!(delivery.event.user_name, format!("welcomed after {id}"));
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(since_last_read_advances_while_a_long_pending_list_is_recovered);
async fn since_last_read_advances_while_a_long_pending_list_is_recovered(backend: Backend) {
    // The entries this consumer held when it last stopped, read again before new ones.
    let users: Vec<UserCreated> = (0..200).map(user).collect();
    let publisher = within("build a publisher", STEP, backend.builder().build())
        .await
        .unwrap();
    within("publish", STEP, publisher.publish_batch(&users))
        .await
        .unwrap();
    backend
        .read_as_dead_consumer("user.created", "tests", "consumer-1", 200)
        .await;

    // Handlers finish only as the test lets them.
    let gate = Arc::new(Semaphore::new(0));
    let (finished, mut done) = mpsc::unbounded_channel();
    let (handler, _started) = Scripted::new({
        let gate = gate.clone();
        move |event: UserCreated, _| {
            let gate = gate.clone();
            let finished = finished.clone();
            async move {
                gate.acquire().await.unwrap().forget();
                let _ = finished.send(event.seq);
                Ok(())
            }
        }
    });
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .max_concurrent(4)
            .max_count(4)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    finish(&gate, &mut done, 40).await;
    let health = within("health", STEP, bus.health()).await;
    assert!(
        health.since_last_read.is_some(),
        "the recovery's reads count: {health:?}"
    );
    // The recovery waits for free slots; once they come, it reads on and the time
    // since the last read starts again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stalled = within("health", STEP, bus.health()).await.since_last_read;
    assert!(stalled >= Some(Duration::from_millis(300)), "{stalled:?}");
    finish(&gate, &mut done, 20).await;
    let health = within("health", STEP, bus.health()).await;
    assert!(
        health.since_last_read < Some(Duration::from_millis(300)),
        "{health:?}"
    );
    assert!(
        backend.pending_count("user.created", "tests").await > 100,
        "still recovering"
    );
    gate.add_permits(1_000);
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// Lets `count` gated handlers finish, and waits until they have.
async fn finish(gate: &Semaphore, done: &mut mpsc::UnboundedReceiver<u64>, count: usize) {
    gate.add_permits(count);
    for _ in 0..count {
        recv(done, "a recovered entry to be handled").await;
    }
}
