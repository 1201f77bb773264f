//! Events, handlers and helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use slim_bus::{Context, EventBus, EventBusBuilder, HandlerError, StreamHandler};
use slim_bus_tests::{RedisServer, within};
use tokio::sync::mpsc;

/// How long any single awaited step of a test may take.
pub const STEP: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserCreated {
    pub user_id: String,
    pub user_name: String,
    pub seq: u64,
}

impl slim_bus::Event for UserCreated {
    const STREAM: Option<&'static str> = Some("user.created");
}

pub fn user(seq: u64) -> UserCreated {
    UserCreated {
        user_id: format!("u{seq}"),
        user_name: format!("User {seq}"),
        seq,
    }
}

/// What a handler saw of one delivery.
#[derive(Debug, Clone)]
pub struct Seen<E> {
    pub event: E,
    pub stream: String,
    pub entry_id: slim_bus::EntryId,
    pub consumer: String,
    pub delivery_count: u64,
}

/// A handler that reports every delivery on a channel and succeeds.
pub struct Record<E> {
    pub seen: mpsc::UnboundedSender<Seen<E>>,
}

impl<E> Record<E> {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Seen<E>>) {
        let (seen, rx) = mpsc::unbounded_channel();
        (Record { seen }, rx)
    }
}

#[slim_bus::async_trait]
impl<E: slim_bus::Event + Clone> StreamHandler for Record<E> {
    type Event = E;

    async fn handle(&self, event: E, ctx: Context) -> Result<(), HandlerError> {
        let _ = self.seen.send(Seen {
            event,
            stream: ctx.stream().to_owned(),
            entry_id: ctx.entry_id(),
            consumer: ctx.consumer().to_owned(),
            delivery_count: ctx.delivery_count(),
        });
        Ok(())
    }
}

/// A bus on `server` with test-friendly timings.
pub fn bus(server: &RedisServer) -> EventBusBuilder {
    EventBus::builder()
        .url(server.url())
        .consumer_group("tests")
        .consumer_name("consumer-1")
        .block_time(Duration::from_millis(200))
        .handler_timeout(Duration::from_secs(5))
}

pub async fn start_server() -> RedisServer {
    slim_bus_tests::init_tracing();
    within("redis-server to start", STEP, RedisServer::start())
        .await
        .expect("redis-server starts")
}

pub async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    within(what, STEP, rx.recv())
        .await
        .unwrap_or_else(|| panic!("channel closed waiting for {what}"))
}

/// The number of entries the group holds pending on `stream`.
pub async fn pending_count(server: &RedisServer, stream: &str, group: &str) -> usize {
    let mut conn = server.connection().await;
    let reply: redis::Value = within(
        "XPENDING",
        STEP,
        redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .query_async(&mut conn),
    )
    .await
    .expect("XPENDING succeeds");
    match reply {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(n)) => *n as usize,
            other => panic!("unexpected XPENDING summary: {other:?}"),
        },
        other => panic!("unexpected XPENDING reply: {other:?}"),
    }
}

/// Waits until the group has nothing pending on `stream` (acks are flushed in the background).
pub async fn until_nothing_pending(server: &RedisServer, stream: &str, group: &str) {
    within("every entry to be acknowledged", STEP, async {
        while pending_count(server, stream, group).await > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

pub async fn xadd(server: &RedisServer, stream: &str, fields: &[(&str, &[u8])]) -> String {
    let mut conn = server.connection().await;
    within("XADD", STEP, conn.xadd(stream, "*", fields))
        .await
        .expect("XADD succeeds")
}

pub type Shared<T> = Arc<T>;

type Behaviour<E> = dyn Fn(
        E,
        Context,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), HandlerError>> + Send>>
    + Send
    + Sync;

/// A handler whose behaviour a test writes as a closure; every call is reported first.
pub struct Scripted<E> {
    seen: mpsc::UnboundedSender<Seen<E>>,
    behaviour: Arc<Behaviour<E>>,
    max_deliveries: Option<u64>,
}

impl<E: slim_bus::Event + Clone> Scripted<E> {
    pub fn new<F, Fut>(behaviour: F) -> (Self, mpsc::UnboundedReceiver<Seen<E>>)
    where
        F: Fn(E, Context) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let (seen, rx) = mpsc::unbounded_channel();
        let behaviour: Arc<Behaviour<E>> =
            Arc::new(move |event, ctx| Box::pin(behaviour(event, ctx)));
        (
            Scripted {
                seen,
                behaviour,
                max_deliveries: None,
            },
            rx,
        )
    }

    pub fn max_deliveries(mut self, max: u64) -> Self {
        self.max_deliveries = Some(max);
        self
    }
}

#[slim_bus::async_trait]
impl<E: slim_bus::Event + Clone> StreamHandler for Scripted<E> {
    type Event = E;

    async fn handle(&self, event: E, ctx: Context) -> Result<(), HandlerError> {
        let _ = self.seen.send(Seen {
            event: event.clone(),
            stream: ctx.stream().to_owned(),
            entry_id: ctx.entry_id(),
            consumer: ctx.consumer().to_owned(),
            delivery_count: ctx.delivery_count(),
        });
        (self.behaviour)(event, ctx).await
    }

    fn max_deliveries(&self) -> Option<u64> {
        self.max_deliveries
    }
}

/// Reads `count` entries of `stream` as consumer `name` without acknowledging them: a
/// consumer that dies right after reading.
pub async fn read_as_dead_consumer(
    server: &RedisServer,
    stream: &str,
    group: &str,
    name: &str,
    count: usize,
) {
    let mut conn = server.connection().await;
    let _: () = within(
        "XGROUP CREATE",
        STEP,
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async::<()>(&mut conn),
    )
    .await
    .or_else(|e| {
        if e.code() == Some("BUSYGROUP") {
            Ok(())
        } else {
            Err(e)
        }
    })
    .unwrap();
    let _: redis::Value = within(
        "XREADGROUP as a consumer about to die",
        STEP,
        redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg(name)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut conn),
    )
    .await
    .unwrap();
}

/// Fields of every entry of `stream`, as text.
pub async fn entries(server: &RedisServer, stream: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut conn = server.connection().await;
    within("XRANGE", STEP, conn.xrange_all(stream))
        .await
        .unwrap()
}

pub async fn stream_len(server: &RedisServer, stream: &str) -> usize {
    let mut conn = server.connection().await;
    within("XLEN", STEP, conn.xlen(stream)).await.unwrap()
}
