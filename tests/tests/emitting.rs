//! Handlers that return events: the events are published before the entry is
//! acknowledged, and a failed publish leaves the entry unacknowledged and retried.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use slim_bus::{Context, Emit, HandlerCall, HandlerError, StreamHandler};
use slim_bus_tests::within;
use support::*;
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "welcome.requested")]
struct WelcomeRequested {
    user_id: String,
    cause: String,
}

/// Asks for a welcome mail and an audit record per new user, as returned events.
#[slim_bus::stream]
async fn on_user_created(event: UserCreated, ctx: Context) -> Result<Emit, HandlerError> {
    let mut emit = Emit::new();
    emit.push(&WelcomeRequested {
        user_id: event.user_id.clone(),
        cause: ctx.entry_id().to_string(),
    })?
    .push_to("user.audit", &event)?;
    Ok(emit)
}

conformance!(events_a_handler_returns_are_published_and_its_entry_acknowledged);
async fn events_a_handler_returns_are_published_and_its_entry_acknowledged(backend: Backend) {
    let bus = within(
        "build",
        STEP,
        backend.bus().handler(on_user_created).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let id = within("publish", STEP, bus.publish(&user(4)))
        .await
        .unwrap();

    within("the returned events", STEP, async {
        while backend.stream_len("user.audit").await < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    backend.until_nothing_pending("user.created", "tests").await;
    let welcome = backend.entries("welcome.requested").await;
    assert_eq!(welcome.len(), 1, "{welcome:?}");
    let fields = &welcome[0].1;
    assert!(
        fields.contains(&("user_id".into(), "u4".into())),
        "{fields:?}"
    );
    assert!(
        fields.contains(&("cause".into(), id.to_string())),
        "{fields:?}"
    );
    let audit = backend.entries("user.audit").await;
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert!(audit[0].1.contains(&("seq".into(), "4".into())));
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// Returns one follow-up event per delivery and reports each delivery count.
struct FollowUp {
    attempts: mpsc::UnboundedSender<u64>,
}

#[slim_bus::async_trait]
impl StreamHandler for FollowUp {
    type Event = UserCreated;

    async fn handle(&self, event: UserCreated, ctx: Context) -> Result<(), HandlerError> {
        self.handle_and_emit(event, ctx).await.map(drop)
    }

    fn handle_and_emit(&self, event: UserCreated, ctx: Context) -> HandlerCall<'_> {
        HandlerCall::new(async move {
            let _ = self.attempts.send(ctx.delivery_count());
            let mut emit = Emit::new();
            emit.push(&WelcomeRequested {
                user_id: event.user_id,
                cause: ctx.entry_id().to_string(),
            })?;
            Ok(emit)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_of_returned_events_leaves_the_entry_unacknowledged_until_it_succeeds() {
    let server = start_server().await;
    let mut conn = server.connection().await;
    // The target stream's key holds a string: every XADD to it fails with WRONGTYPE.
    let _: () = within("SET", STEP, conn.set("welcome.requested", "not a stream"))
        .await
        .unwrap();
    let (attempts, mut seen) = mpsc::unbounded_channel();
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .max_deliveries(5)
            .retry_backoff(Duration::from_millis(50), Duration::from_millis(100))
            .handler(FollowUp { attempts })
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();

    assert_eq!(recv(&mut seen, "the first attempt").await, 1);
    assert_eq!(recv(&mut seen, "the retry").await, 2);
    assert_eq!(
        pending_count(&server, "user.created", "tests").await,
        1,
        "the entry is not acknowledged while its events are not published"
    );
    assert!(
        bus.dead_letters("user.created")
            .list(None, 1)
            .await
            .unwrap()
            .is_empty()
    );

    // Once the key is free, the next retry publishes and only then acknowledges.
    let _: () = within("DEL", STEP, conn.del("welcome.requested"))
        .await
        .unwrap();
    until_nothing_pending(&server, "user.created", "tests").await;
    let welcome = entries(&server, "welcome.requested").await;
    assert_eq!(welcome.len(), 1, "{welcome:?}");
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}
