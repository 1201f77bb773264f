//! Events, handlers and helpers shared by the integration tests.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    unused_macros,
    unused_imports
)]

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use slim_bus::{Context, EventBus, EventBusBuilder, HandlerError, MemoryBroker, StreamHandler};
use slim_bus_tests::{RedisServer, TestCertificates, within};
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

/// One handler for several streams, all reporting on one channel.
impl<E> Clone for Record<E> {
    fn clone(&self) -> Self {
        Record {
            seen: self.seen.clone(),
        }
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

/// One behaviour for several streams, all reporting on one channel.
impl<E> Clone for Scripted<E> {
    fn clone(&self) -> Self {
        Scripted {
            seen: self.seen.clone(),
            behaviour: self.behaviour.clone(),
            max_deliveries: self.max_deliveries,
        }
    }
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

/// Where a behaviour test runs: a throwaway redis-server, or an in-memory broker. Tests
/// written once against it run on both (see [`conformance!`]); a difference in behaviour
/// is a bug in the in-memory backend.
pub enum Backend {
    Redis(RedisServer),
    /// A redis-server the bus reaches over mutual TLS only (its `rediss://` port, which
    /// requires a client certificate); the helpers inspect it over its plain port.
    Tls(RedisServer, TestCertificates),
    Memory(MemoryBroker),
}

/// A redis-server with TLS on a second port, and the certificates it was started with.
pub async fn start_tls_server(auth_clients: bool) -> (RedisServer, TestCertificates) {
    slim_bus_tests::init_tracing();
    let certs = TestCertificates::generate().expect("test certificates");
    let server = within(
        "redis-server with TLS to start",
        STEP,
        RedisServer::builder().tls(&certs, auth_clients).start(),
    )
    .await
    .expect("redis-server with TLS starts");
    (server, certs)
}

/// A builder for `server`'s TLS port, trusting the test CA and presenting its client
/// certificate.
pub fn tls_builder(server: &RedisServer, certs: &TestCertificates) -> EventBusBuilder {
    EventBus::builder()
        .url(server.tls_url())
        .tls_ca_cert(certs.ca())
        .tls_client_cert(certs.client_cert())
        .tls_client_key(certs.client_key())
}

impl Backend {
    pub async fn redis() -> Self {
        Backend::Redis(start_server().await)
    }

    pub async fn tls() -> Self {
        let (server, certs) = start_tls_server(true).await;
        Backend::Tls(server, certs)
    }

    pub fn memory() -> Self {
        slim_bus_tests::init_tracing();
        Backend::Memory(MemoryBroker::new())
    }

    /// An in-memory broker that refuses what Redis Cluster refuses: commands and scripts
    /// whose keys are in different hash slots fail with `CROSSSLOT`.
    pub fn memory_cluster_like() -> Self {
        slim_bus_tests::init_tracing();
        Backend::Memory(MemoryBroker::cluster_like())
    }

    /// A builder on this backend with nothing else set.
    pub fn builder(&self) -> EventBusBuilder {
        match self {
            Backend::Redis(server) => EventBus::builder().url(server.url()),
            Backend::Tls(server, certs) => tls_builder(server, certs),
            Backend::Memory(broker) => EventBus::builder().memory(broker),
        }
    }

    /// A bus on this backend with test-friendly timings, like [`bus`].
    pub fn bus(&self) -> EventBusBuilder {
        self.builder()
            .consumer_group("tests")
            .consumer_name("consumer-1")
            .block_time(Duration::from_millis(200))
            .handler_timeout(Duration::from_secs(5))
    }

    pub fn server(&self) -> Option<&RedisServer> {
        match self {
            Backend::Redis(server) | Backend::Tls(server, _) => Some(server),
            Backend::Memory(_) => None,
        }
    }

    /// The number of entries the group holds pending on `stream`.
    pub async fn pending_count(&self, stream: &str, group: &str) -> usize {
        match self {
            Backend::Redis(server) | Backend::Tls(server, _) => {
                pending_count(server, stream, group).await
            }
            Backend::Memory(broker) => broker.pending(stream, group).len(),
        }
    }

    /// The number of entries `consumer` holds pending on `stream`, like
    /// `XPENDING stream group - + 100000 consumer`.
    pub async fn pending_of(&self, stream: &str, group: &str, consumer: &str) -> usize {
        match self {
            Backend::Redis(server) | Backend::Tls(server, _) => {
                let mut conn = server.connection().await;
                let rows: Vec<redis::Value> = within(
                    "XPENDING of one consumer",
                    STEP,
                    redis::cmd("XPENDING")
                        .arg(stream)
                        .arg(group)
                        .arg("-")
                        .arg("+")
                        .arg(100_000)
                        .arg(consumer)
                        .query_async(&mut conn),
                )
                .await
                .expect("XPENDING succeeds");
                rows.len()
            }
            Backend::Memory(broker) => broker
                .pending(stream, group)
                .iter()
                .filter(|entry| entry.consumer == consumer)
                .count(),
        }
    }

    /// Waits until the group has nothing pending on `stream`.
    pub async fn until_nothing_pending(&self, stream: &str, group: &str) {
        within("every entry to be acknowledged", STEP, async {
            while self.pending_count(stream, group).await > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    /// Adds an entry of raw fields, like `XADD stream * ...`; returns its id.
    pub async fn xadd(&self, stream: &str, fields: &[(&str, &[u8])]) -> String {
        match self {
            Backend::Redis(server) | Backend::Tls(server, _) => xadd(server, stream, fields).await,
            Backend::Memory(_) => {
                let publisher = within("build a publisher", STEP, self.builder().build())
                    .await
                    .unwrap();
                within("send", STEP, publisher.send(stream, fields.iter().copied()))
                    .await
                    .unwrap()
                    .to_string()
            }
        }
    }

    /// Deletes entries, like `XDEL`; returns how many existed.
    pub async fn xdel(&self, stream: &str, ids: &[&str]) -> usize {
        match self {
            Backend::Redis(server) | Backend::Tls(server, _) => {
                let mut conn = server.connection().await;
                within("XDEL", STEP, conn.xdel(stream, ids)).await.unwrap()
            }
            Backend::Memory(broker) => {
                let ids: Vec<slim_bus::EntryId> =
                    ids.iter().map(|id| id.parse().unwrap()).collect();
                broker.delete_entries(stream, &ids) as usize
            }
        }
    }

    /// Reads `count` entries of `stream` as consumer `name` without acknowledging them: a
    /// consumer that dies right after reading. Creates the group from the start if needed.
    pub async fn read_as_dead_consumer(&self, stream: &str, group: &str, name: &str, count: usize) {
        match self {
            Backend::Redis(server) | Backend::Tls(server, _) => {
                read_as_dead_consumer(server, stream, group, name, count).await
            }
            Backend::Memory(broker) => {
                broker.read_unacknowledged(stream, group, name, count);
            }
        }
    }

    /// Every entry of `stream` with its fields as text, like `XRANGE stream - +`.
    pub async fn entries(&self, stream: &str) -> Vec<(String, Vec<(String, String)>)> {
        match self {
            Backend::Redis(server) | Backend::Tls(server, _) => entries(server, stream).await,
            Backend::Memory(broker) => broker
                .entries(stream)
                .into_iter()
                .map(|(id, fields)| {
                    let fields = fields
                        .into_iter()
                        .map(|(name, value)| (name, String::from_utf8(value).unwrap()))
                        .collect();
                    (id.to_string(), fields)
                })
                .collect(),
        }
    }

    /// The names of the consumers of `group` on `stream`, sorted, like `XINFO CONSUMERS`.
    pub async fn consumers(&self, stream: &str, group: &str) -> Vec<String> {
        let mut names = match self {
            Backend::Redis(server) | Backend::Tls(server, _) => {
                let mut conn = server.connection().await;
                let reply: redis::streams::StreamInfoConsumersReply =
                    within("XINFO CONSUMERS", STEP, conn.xinfo_consumers(stream, group))
                        .await
                        .unwrap();
                reply.consumers.into_iter().map(|c| c.name).collect()
            }
            Backend::Memory(broker) => broker.consumers(stream, group),
        };
        names.sort();
        names
    }

    /// The number of entries in `stream`, like `XLEN`.
    pub async fn stream_len(&self, stream: &str) -> usize {
        match self {
            Backend::Redis(server) | Backend::Tls(server, _) => stream_len(server, stream).await,
            Backend::Memory(broker) => broker.stream_len(stream) as usize,
        }
    }
}

/// Runs the behaviour test `async fn $name(backend: Backend)` on both backends, as
/// `$name::redis` (a throwaway redis-server, multi-threaded runtime) and `$name::memory`
/// (an in-memory broker, tokio's clock paused: waiting for claims and retries costs no
/// real time, and a test that hangs fails at its `within` bound at once). With `tls`, also
/// as `$name::tls`: the redis-server over mutual TLS. Each also runs as
/// `$name::memory_cluster_like`, on an in-memory broker that refuses multi-key operations
/// across hash slots as Redis Cluster does.
macro_rules! conformance {
    ($name:ident) => {
        $crate::support::conformance!(@tests $name, []);
    };
    ($name:ident, tls) => {
        $crate::support::conformance!(@tests $name, [tls]);
    };
    (@tests $name:ident, [$($tls:ident)?]) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$name(super::Backend::redis().await).await
            }

            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $tls() {
                    super::$name(super::Backend::tls().await).await
                }
            )?

            #[tokio::test(start_paused = true)]
            async fn memory() {
                super::$name(super::Backend::memory()).await
            }

            #[tokio::test(start_paused = true)]
            async fn memory_cluster_like() {
                super::$name(super::Backend::memory_cluster_like()).await
            }
        }
    };
}
pub(crate) use conformance;
