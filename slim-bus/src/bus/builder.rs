//! The builder: settings, handlers and layers, validated into an [`EventBus`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::asyncapi::{self, Contract};
use crate::batch::BatchHandler;
use crate::broker::Broker;
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::config::{EventBusConfig, StartFrom, default_consumer_name, redacted_url};
use crate::consumer::Route;
use crate::dead_letter::dead_letter_stream;
use crate::emit::Emit;
use crate::error::HandlerError;
use crate::error::{Error, Result};
use crate::handler::{Handlers, RegisteredHandler, StreamHandler, StreamService};
use crate::health::{LastRead, SetAside, StartupWait};
use crate::middleware::{self, BusLayer, BusService, HandlerRequest};
use crate::partition::{Partitions, partition_stream};
use crate::telemetry;
use crate::tls::{Tls, reject_without_tls};

use super::{EventBus, Inner};

/// Builds an [`EventBus`]; every setting has a default but the consumer group, which
/// listening needs.
#[must_use = "a builder does nothing until `build` is awaited"]
#[derive(Default)]
pub struct EventBusBuilder {
    config: EventBusConfig,
    client: Option<redis::Client>,
    memory: Option<MemoryBroker>,
    handlers: Handlers,
    layers: Vec<BusLayer>,
    pub(crate) contract: Contract,
    /// A [`TestBus`](crate::testing::TestBus)'s: never ends the process for
    /// [`ASYNCAPI_ENV`](crate::ASYNCAPI_ENV), so a test run in that environment still runs
    /// its tests.
    for_tests: bool,
}

impl std::fmt::Debug for EventBusBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBusBuilder")
            .field("config", &self.config)
            .field("handlers", &self.handlers)
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

impl EventBusBuilder {
    /// Takes every setting from `config`, replacing those set before.
    pub fn config(mut self, config: EventBusConfig) -> Self {
        self.config = config;
        self
    }

    /// The Redis server to use, e.g. `redis://127.0.0.1:6379/`.
    ///
    /// `memory://` runs the bus on a private in-memory broker instead, and `memory://NAME`
    /// on the process-wide one called NAME ([`MemoryBroker::named`]), shared by every bus
    /// with that URL: for tests and demos without Redis.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.config.url = url.into();
        self
    }

    /// A Redis Cluster, reached through these seed nodes (one is enough; the bus
    /// discovers the others), instead of [`url`](Self::url): e.g.
    /// `["redis://user:pass@10.0.0.1:7000/", "redis://user:pass@10.0.0.2:7000/"]`, or
    /// `rediss://` URLs with the `tls_*` settings. See
    /// [`EventBusConfig::cluster_nodes`].
    pub fn cluster<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.cluster_nodes = nodes.into_iter().map(Into::into).collect();
        self
    }

    /// For a `rediss://` URL: trust the CA (or CAs) in this PEM file instead of the
    /// system's root certificates.
    pub fn tls_ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.tls_ca_cert = Some(path.into());
        self
    }

    /// For a `rediss://` URL whose server authenticates clients (mutual TLS): present the
    /// certificate in this PEM file, with the key of [`tls_client_key`](Self::tls_client_key).
    pub fn tls_client_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.tls_client_cert = Some(path.into());
        self
    }

    /// The PEM file of the private key of [`tls_client_cert`](Self::tls_client_cert).
    pub fn tls_client_key(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.tls_client_key = Some(path.into());
        self
    }

    /// An existing Redis client to use instead of [`url`](Self::url). For a TLS client,
    /// the bus's own read and publish connections take their trust and identity from the
    /// `tls_*` settings (redis-rs does not expose the client's).
    pub fn client(mut self, client: redis::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Runs the bus on `broker`, in this process, instead of Redis (taking precedence over
    /// [`url`](Self::url) and [`client`](Self::client)). Buses given clones of one broker
    /// share its streams: several services in one test, or competing consumers.
    pub fn memory(mut self, broker: &MemoryBroker) -> Self {
        self.memory = Some(broker.clone());
        self
    }

    /// For [`TestBus`](crate::testing::TestBus): in memory (on the broker set or named by
    /// the URL, else a fresh one), with a consumer group and name unless set.
    pub(crate) fn in_memory_for_tests(mut self) -> (Self, MemoryBroker) {
        let broker = match self.memory.take() {
            Some(broker) => broker,
            None => MemoryBroker::from_url(&self.config.url).unwrap_or_default(),
        };
        self.memory = Some(broker.clone());
        self.for_tests = true;
        self.config
            .consumer_group
            .get_or_insert_with(|| "test".to_owned());
        self.config
            .consumer_name
            .get_or_insert_with(|| "test".to_owned());
        (self, broker)
    }

    /// The consumer group to listen through; every process of one service uses the same.
    pub fn consumer_group(mut self, group: impl Into<String>) -> Self {
        self.config.consumer_group = Some(group.into());
        self
    }

    /// This process's name within the group (default: the host name). Two processes must
    /// never share a consumer name, so set it when several run on one host; a listening
    /// bus holds a lease on its name, and `listen()` fails with
    /// [`Error::ConsumerNameTaken`] under a name another live process holds (see
    /// [`consumer_lease_ttl`](Self::consumer_lease_ttl)).
    pub fn consumer_name(mut self, name: impl Into<String>) -> Self {
        self.config.consumer_name = Some(name.into());
        self
    }

    /// The most entries asked for per stream and read (default 100).
    pub fn max_count(mut self, max_count: usize) -> Self {
        self.config.max_count = max_count;
        self
    }

    /// How long one handler call may take (default 30 s).
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.config.handler_timeout = timeout;
        self
    }

    /// The most handler calls running at once (default 64).
    pub fn max_concurrent(mut self, max_concurrent: usize) -> Self {
        self.config.max_concurrent = max_concurrent;
        self
    }

    /// The most entries this consumer holds pending at once, counting entries being
    /// handled, waiting for their retry or being dead-lettered (default: four times
    /// `max_concurrent`); at least `max_concurrent`.
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.config.max_in_flight = Some(max_in_flight);
        self
    }

    /// How long one blocking read waits for new entries (default 2 s).
    pub fn block_time(mut self, block_time: Duration) -> Self {
        self.config.block_time = block_time;
        self
    }

    /// How long shutdown waits for running handlers (default: the handler timeout).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.config.shutdown_grace = Some(grace);
        self
    }

    /// Where a consumer group that does not exist yet starts (default: the beginning).
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.config.start_from = start;
        self
    }

    /// How long a command may wait for Redis (default 5 s).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.config.command_timeout = timeout;
        self
    }

    /// How long an entry must sit idle with another consumer before this one claims it
    /// (default 60 s). A live consumer keeps what it holds fresh, so this may be shorter
    /// than the handler timeout. The retry delays follow it unless set: the longest is half
    /// of it, at most 30 s (see [`retry_backoff`](Self::retry_backoff)).
    pub fn claim_min_idle(mut self, min_idle: Duration) -> Self {
        self.config.claim_min_idle = min_idle;
        self
    }

    /// How often to look for entries of stopped consumers (default 10 s).
    pub fn claim_interval(mut self, interval: Duration) -> Self {
        self.config.claim_interval = interval;
        self
    }

    /// How long another consumer of the group must have been idle, holding no pending
    /// entries, before this one removes it from the group (default one day): pods that
    /// are gone do not stay in `XINFO CONSUMERS` for ever.
    pub fn consumer_idle_removal(mut self, idle: Duration) -> Self {
        self.config.consumer_idle_removal = idle;
        self
    }

    /// Whether [`EventBus::listen`] waits for Redis when it does not answer (default
    /// `true`): it retries with backoff, one log line per step, until Redis answers, and
    /// can be cancelled by dropping it ([`EventBus::run_until`]'s signal does); meanwhile
    /// [`EventBus::health`] shows `waiting_for` and `last_error`. Only a server that does
    /// not answer or is loading its data is waited for: refused credentials and a
    /// rejected TLS handshake fail `listen()` at once. With `false`, `listen()` fails at
    /// once with the connection error.
    pub fn wait_for_redis(mut self, wait: bool) -> Self {
        self.config.wait_for_redis = wait;
        self
    }

    /// How long the lease of the consumer name lasts without renewal (default 5 s, or
    /// twice [`command_timeout`](Self::command_timeout) when that is longer; at least
    /// 100 ms and at least twice the command timeout, so that one slow renewal does not
    /// let it lapse). While a bus listens, the key `slim-bus:consumer:{group}:{name}`
    /// holds a token of this process, renewed every third of this TTL and deleted at
    /// shutdown; `listen()` fails with [`Error::ConsumerNameTaken`] while another live
    /// process holds it, and after a crash the restarted process waits up to this long
    /// for its previous lease to lapse, then recovers its pending entries.
    pub fn consumer_lease_ttl(mut self, ttl: Duration) -> Self {
        self.config.consumer_lease_ttl = Some(ttl);
        self
    }

    /// Failed deliveries before an entry is dead-lettered (default 5).
    pub fn max_deliveries(mut self, max_deliveries: u64) -> Self {
        self.config.max_deliveries = max_deliveries;
        self
    }

    /// The first retry delay and the longest one. Unset, the longest is half of
    /// [`claim_min_idle`](Self::claim_min_idle), at most 30 s, and the first 1 s (or the
    /// longest, when shorter). Set, the longest must not be shorter than the first; it may
    /// be longer than `claim_min_idle`, since an entry waiting for its retry is kept fresh.
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.config.retry_base = Some(base);
        self.config.retry_max = Some(max);
        self
    }

    /// The suffix of dead-letter stream names (default `:dlq`, giving `{stream}:dlq`).
    pub fn dead_letter_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.config.dead_letter_suffix = suffix.into();
        self
    }

    /// Caps each dead-letter stream at about `max_len` entries, trimming the oldest
    /// (default: no cap, dead letters are kept until replayed or purged). Trimmed dead
    /// letters are counted in [`StreamHealth::dead_letters_trimmed`](crate::StreamHealth::dead_letters_trimmed) and logged.
    pub fn dead_letter_max_len(mut self, max_len: usize) -> Self {
        self.config.dead_letter_max_len = Some(max_len);
        self
    }

    /// Caps `stream` at about `max_len` entries as entries are published to it
    /// (`XADD ... MAXLEN ~`), overriding the event type's [`Event::MAX_LEN`](crate::Event::MAX_LEN). The oldest
    /// entries are deleted whether every consumer group has handled them or not:
    /// [`trim_acked`](Self::trim_acked) deletes only what every group is done with.
    pub fn stream_max_len(mut self, stream: impl Into<String>, max_len: usize) -> Self {
        self.config.stream_max_len.insert(stream.into(), max_len);
        self
    }

    /// Makes `stream` a partitioned stream of `partitions` partitions: one logical stream
    /// stored as the Redis streams `stream:{0}` ... `stream:{partitions - 1}`. Publishes to
    /// `stream` go to one of them (by the event type's key, else in turn), and a handler of
    /// `stream` reads them all. The same as `#[event(stream = "...", partitions = N)]` on
    /// the event type, for streams whose event types do not say it (untyped events,
    /// `publish_to`); where both say it, they must agree. See the README's "Partitioned
    /// streams".
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run() -> slim_bus::Result<()> {
    /// let bus = slim_bus::EventBus::builder()
    ///     .stream_partitions("orders", 8)
    ///     .build()
    ///     .await?;
    /// bus.send("orders", [("order_id", "o-17")]).await?; // to one of orders:{0} ... orders:{7}
    /// # Ok(())
    /// # }
    /// ```
    pub fn stream_partitions(mut self, stream: impl Into<String>, partitions: u32) -> Self {
        self.config
            .stream_partitions
            .insert(stream.into(), partitions);
        self
    }

    /// Trims every stream this bus handles, while it listens, of the entries that every
    /// consumer group of the stream has been delivered and has acknowledged, every
    /// [`trim_acked_interval`](Self::trim_acked_interval). Nothing a group has not been
    /// delivered yet, and nothing pending in any group, is deleted. See the README's
    /// "Retention".
    pub fn trim_acked(mut self) -> Self {
        self.config.trim_acked = true;
        self
    }

    /// Trims `stream` as [`trim_acked`](Self::trim_acked) trims the streams this bus
    /// handles, whether it handles `stream` or not (while it listens). A partitioned stream
    /// whose partition count the bus knows ([`stream_partitions`](Self::stream_partitions),
    /// or an event type it handles or publishes) is trimmed partition by partition.
    pub fn trim_acked_on(mut self, stream: impl Into<String>) -> Self {
        self.config.trim_acked_streams.push(stream.into());
        self
    }

    /// How often [`trim_acked`](Self::trim_acked) trims (default 1 minute).
    pub fn trim_acked_interval(mut self, interval: Duration) -> Self {
        self.config.trim_acked_interval = interval;
        self
    }

    /// The level of the `tracing` spans of deliveries (`slim_bus.process`) and publishes
    /// (`slim_bus.send`); default `DEBUG`. At `INFO` (or below the level the subscriber
    /// lets through), a handler's own events and spans nest under its delivery's span; that
    /// costs a no-op handler about a fifth of its throughput (BENCHMARKS.md,
    /// `consume-traced`), a real handler much less.
    pub fn span_level(mut self, level: tracing::Level) -> Self {
        self.config.span_level = level;
        self
    }

    /// Registers `handler` on its stream: the one it names, else its event type's.
    pub fn handler<H: StreamHandler>(mut self, handler: H) -> Self {
        self.handlers.handler(handler);
        self
    }

    /// Registers `handler` on `stream`.
    pub fn handler_on<H: StreamHandler>(mut self, stream: impl Into<String>, handler: H) -> Self {
        self.handlers.handler_on(stream, handler);
        self
    }

    /// Registers the batch handler `handler` on its stream: the one it names, else its
    /// event type's. A stream has one handler, of either kind.
    pub fn batch_handler<H: BatchHandler>(mut self, handler: H) -> Self {
        self.handlers.batch_handler(handler);
        self
    }

    /// Registers the batch handler `handler` on `stream`.
    pub fn batch_handler_on<H: BatchHandler>(
        mut self,
        stream: impl Into<String>,
        handler: H,
    ) -> Self {
        self.handlers.batch_handler_on(stream, handler);
        self
    }

    /// Registers every handler of a service, sharing the service among them.
    pub fn service<S: StreamService>(mut self, service: Arc<S>) -> Self {
        service.register(&mut self.handlers);
        self
    }

    /// Puts `layer`, a [`tower::Layer`], around every handler call of this bus, outside
    /// the handlers' own layers ([`StreamHandler::layer`]); a layer added later goes
    /// outside those added before, as with axum's `Router::layer`.
    ///
    /// Its service gets a [`HandlerRequest`] for each call: the context and the decoded
    /// event, type-erased as an [`AnyEvent`](crate::AnyEvent) (an entry that does not
    /// decode is dead-lettered without reaching it). It answers with the events to
    /// publish ([`Emit`]) or a [`HandlerError`], and may time, retry, limit or enrich
    /// the call, or short-circuit it: an error is a failed attempt (retried, then
    /// dead-lettered, as the error's [`Retry`](crate::Retry) says), and `Ok` without
    /// calling the inner service acknowledges the entry. A bus without layers calls its
    /// handlers as it would without this feature.
    ///
    /// The service is cloned for each call, readied (`poll_ready`), then called, as
    /// tower's `oneshot` does; a clone must share what calls share (tower's
    /// `ConcurrencyLimit` does; put a service that is not `Clone`, like `RateLimit`,
    /// behind a `Buffer`).
    ///
    /// A call waiting for a service that is not ready holds what the handler call would:
    /// one of the [`max_concurrent`](Self::max_concurrent) handler slots and the entry's
    /// place among the [`max_in_flight`](Self::max_in_flight) held entries, and its wait
    /// counts against the [`handler_timeout`](Self::handler_timeout), which runs from the
    /// start of the attempt (`Context::deadline` says when it ends). A service that stays
    /// not ready for that long times the attempt out, and the entry is retried like after
    /// any timeout. So a concurrency limit below `max_concurrent` leaves the other slots
    /// waiting for it; set `max_concurrent` to the limit (or lower it) when the limit is
    /// meant for the whole bus, and mind the handler timeout under a rate limit.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
    /// # #[event(stream = "user.created")]
    /// # struct UserCreated { user_id: String }
    /// # #[slim_bus::stream]
    /// # async fn send_welcome_mail(user: UserCreated) {}
    /// use tower::limit::ConcurrencyLimitLayer;
    ///
    /// # async fn run() -> slim_bus::Result<()> {
    /// let bus = slim_bus::EventBus::builder()
    ///     .consumer_group("mailer")
    ///     .handler(send_welcome_mail)
    ///     .layer(ConcurrencyLimitLayer::new(4))
    ///     .build()
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<BusService> + Send + Sync + 'static,
        L::Service: tower::Service<HandlerRequest, Response = Emit> + Clone + Send + Sync + 'static,
        <L::Service as tower::Service<HandlerRequest>>::Error: Into<HandlerError>,
        <L::Service as tower::Service<HandlerRequest>>::Future: Send + 'static,
    {
        self.layers.push(middleware::bus_layer(layer));
        self
    }

    /// Checks the settings and handlers, and starts connecting to Redis in the background
    /// (or connects to the in-memory broker). It does not wait for Redis: a service
    /// starts, and serves [`EventBus::health`] (`connected: false`), while Redis is down;
    /// the connection is retried with backoff, one log line per step. Until it is open,
    /// a publish fails within [`command_timeout`](Self::command_timeout), and
    /// [`EventBus::listen`] waits or fails as [`wait_for_redis`](Self::wait_for_redis)
    /// says.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming every invalid setting (a URL that is not a Redis URL or uses
    /// an unsupported scheme included, and a stream whose partition count the bus and a
    /// handler's event type disagree on), [`Error::DuplicateHandler`],
    /// [`Error::NoHandlerStream`] and [`Error::EmptyStream`].
    pub async fn build(self) -> Result<EventBus> {
        self.config.validate()?;
        telemetry::describe();
        let mut partitions = Partitions::new(&self.config.stream_partitions)?;
        let routes = routes(self.handlers, &self.layers, &self.config, &mut partitions)?;
        if !routes.is_empty() && self.config.consumer_group.is_none() {
            return Err(Error::config(
                "consumer_group",
                "must be set when the bus has handlers",
            ));
        }
        self.contract.validate()?;
        // `publish_to` and `send` with the logical name route by these too.
        for (stream, count, event) in self.contract.published_partitions() {
            partitions.declare(stream, count, event)?;
        }
        if !self.for_tests {
            asyncapi::write_if_asked(&routes, &self.config, &self.contract);
        }
        let memory = match (self.memory, &self.client) {
            (Some(memory), _) => Some(memory),
            (None, None) => MemoryBroker::from_url(&self.config.url),
            (None, Some(_)) => None,
        };
        let cluster = !self.config.cluster_nodes.is_empty();
        if cluster && (memory.is_some() || self.client.is_some()) {
            return Err(Error::config(
                "cluster_nodes",
                "cannot be used with a redis::Client or an in-memory broker",
            ));
        }
        let broker: Arc<dyn Broker> = match (memory, self.client) {
            (Some(memory), _) => Arc::new(memory.connect()),
            (None, None) if cluster => {
                let (seeds, tls) = cluster_seeds(&self.config)?;
                Arc::new(RedisBroker::cluster(
                    seeds,
                    tls,
                    self.config.command_timeout,
                )?)
            }
            (None, client) => {
                let (client, tls) = match client {
                    Some(client) => {
                        let tls = match client.get_connection_info().addr() {
                            redis::ConnectionAddr::TcpTls { .. } => Some(Tls::load(&self.config)?),
                            _ => {
                                reject_without_tls(&self.config)?;
                                None
                            }
                        };
                        (client, tls)
                    }
                    None => open_client(&self.config)?,
                };
                Arc::new(RedisBroker::new(client, tls, self.config.command_timeout)?)
            }
        };
        let consumer_name = self
            .config
            .consumer_name
            .clone()
            .unwrap_or_else(default_consumer_name);
        Ok(EventBus {
            inner: Arc::new(Inner {
                broker,
                config: self.config,
                consumer_name: consumer_name.into(),
                set_aside: Arc::new(SetAside::new(routes.len())),
                routes,
                listening: Arc::default(),
                last_read: Arc::new(LastRead::new()),
                startup_wait: StartupWait::default(),
                contract: self.contract,
                partitions,
            }),
        })
    }
}

/// The connection info of each of `config.cluster_nodes`, and the TLS settings for
/// `rediss://` nodes.
fn cluster_seeds(config: &EventBusConfig) -> Result<(Vec<redis::ConnectionInfo>, Option<Tls>)> {
    let seeds = config
        .cluster_nodes
        .iter()
        .map(|node| {
            let info = redis::IntoConnectionInfo::into_connection_info(node.as_str()).map_err(|e| {
                Error::config(
                    "cluster_nodes",
                    format!("`{}` is not a Redis URL: {e}", redacted_url(node)),
                )
            })?;
            if let redis::ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
                return Err(Error::config(
                    "cluster_nodes",
                    "`#insecure` (TLS without verifying the server's certificate) is not supported: set tls_ca_cert to the PEM file of the CA that signed it",
                ));
            }
            if info.redis_settings().db() != 0 {
                return Err(Error::config(
                    "cluster_nodes",
                    format!(
                        "`{}` names database {}: a cluster has only database 0",
                        redacted_url(node),
                        info.redis_settings().db()
                    ),
                ));
            }
            Ok(info)
        })
        .collect::<Result<Vec<_>>>()?;
    let tls = match seeds.first().map(redis::ConnectionInfo::addr) {
        Some(redis::ConnectionAddr::TcpTls { .. }) => Some(Tls::load(config)?),
        _ => {
            reject_without_tls(config)?;
            None
        }
    };
    Ok((seeds, tls))
}

/// The redis-rs client for `config.url`, and its TLS settings for a `rediss://` URL.
fn open_client(config: &EventBusConfig) -> Result<(redis::Client, Option<Tls>)> {
    let not_a_url = |e: redis::RedisError| {
        Error::config(
            "url",
            format!("`{}` is not a Redis URL: {e}", redacted_url(&config.url)),
        )
    };
    let info =
        redis::IntoConnectionInfo::into_connection_info(config.url.as_str()).map_err(not_a_url)?;
    if let redis::ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
        return Err(Error::config(
            "url",
            "`#insecure` (TLS without verifying the server's certificate) is not supported: set tls_ca_cert to the PEM file of the CA that signed it",
        ));
    }
    if !matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
        reject_without_tls(config)?;
        return Ok((redis::Client::open(info).map_err(not_a_url)?, None));
    }
    let tls = Tls::load(config)?;
    let client =
        redis::Client::build_with_tls(info, tls.certificates.clone()).map_err(not_a_url)?;
    Ok((client, Some(tls)))
}

/// Resolves every registration's stream, rejecting missing, empty and duplicate ones; a
/// handler of a partitioned stream gets a route per partition. Records in `partitions` the
/// partitions the handlers' event types declare.
fn routes(
    handlers: Handlers,
    layers: &[BusLayer],
    config: &EventBusConfig,
    partitions: &mut Partitions,
) -> Result<Arc<[Route]>> {
    let mut seen: HashMap<String, &'static str> = HashMap::new();
    let mut routes = Vec::with_capacity(handlers.registrations.len());
    for registration in handlers.registrations {
        let Some(stream) = registration.stream else {
            return Err(Error::NoHandlerStream {
                handler: registration.handler_name,
            });
        };
        if stream.is_empty() {
            return Err(Error::EmptyStream);
        }
        if let (Some(event_stream), Some(count)) =
            (registration.event_stream, registration.declared.partitions)
            && event_stream == stream
        {
            partitions.declare(&stream, count, registration.declared.event)?;
        }
        let streams: Vec<(String, Option<u32>)> = match partitions.count(&stream) {
            None => vec![(stream, None)],
            Some(count) => (0..count)
                .map(|partition| (partition_stream(&stream, partition), Some(partition)))
                .collect(),
        };
        for (stream, _) in &streams {
            if let Some(first) = seen.insert(stream.clone(), registration.handler_name) {
                return Err(Error::DuplicateHandler {
                    stream: stream.clone(),
                    first,
                    second: registration.handler_name,
                });
            }
        }
        let max_deliveries = registration
            .handler
            .max_deliveries()
            .unwrap_or(config.max_deliveries);
        if max_deliveries == 0 {
            return Err(Error::config(
                "max_deliveries",
                format!(
                    "of handler `{}` must be at least 1",
                    registration.handler_name
                ),
            ));
        }
        if let RegisteredHandler::Batch(handler) = &registration.handler
            && handler.max_batch() == 0
        {
            return Err(Error::config(
                "max_batch",
                format!(
                    "of batch handler `{}` must be at least 1",
                    registration.handler_name
                ),
            ));
        }
        let handler_timeout = registration.handler.handler_timeout();
        if let Some(timeout) = handler_timeout {
            handler_timeout_fits(timeout, registration.handler_name)?;
        }
        let handler = match registration.handler {
            RegisteredHandler::One(handler) => {
                RegisteredHandler::One(middleware::with_bus_layers(handler, layers))
            }
            batch => batch,
        };
        for (stream, partition) in streams {
            routes.push(Route {
                dead_letters: dead_letter_stream(&stream, &config.dead_letter_suffix).into(),
                stream: stream.into(),
                partition,
                handler: handler.clone(),
                max_deliveries,
                handler_timeout: handler_timeout
                    .filter(|timeout| *timeout != config.handler_timeout),
                state: Arc::default(),
            });
        }
    }
    Ok(routes.into())
}

/// Checks a handler's own timeout as `build()` checks the bus's.
fn handler_timeout_fits(timeout: Duration, handler: &str) -> Result<()> {
    if timeout.is_zero() {
        return Err(Error::config(
            "handler_timeout",
            format!("of handler `{handler}` must be longer than zero"),
        ));
    }
    Ok(())
}
