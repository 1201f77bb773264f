//! The bus: its builder, publishing, and listening.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::asyncapi::Contract;
use crate::broker::{Broker, is_failover_code};
use crate::config::EventBusConfig;
use crate::consumer::Backoff;
use crate::consumer::{Consumer, Route, is_refused_access};
use crate::dead_letter::DeadLetters;
use crate::error::{Error, Result};
use crate::health::{Health, LastRead, SetAside, StartupWait, StreamHealth};
use crate::lease::ConsumerLease;
use crate::listener::{Listener, ListenerPhase};
use crate::partition::{Partitions, partition_stream};
use crate::publisher::Publisher;
use crate::telemetry;

mod builder;
mod publish;

pub use self::builder::EventBusBuilder;

/// A typed event bus over Redis Streams: publishes events, and listens to its streams
/// through a consumer group.
///
/// Cheap to clone (clones share one set of connections), `Send` and `Sync`, so a service
/// keeps one in its HTTP state and publishes from request handlers while the same bus
/// listens.
///
/// # Examples
///
/// ```no_run
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Serialize, Deserialize)]
/// # struct UserCreated { user_id: String }
/// # impl slim_bus::Event for UserCreated { const STREAM: Option<&'static str> = Some("user.created"); }
/// # struct Welcome;
/// # #[slim_bus::async_trait]
/// # impl slim_bus::StreamHandler for Welcome {
/// #     type Event = UserCreated;
/// #     async fn handle(&self, _: UserCreated, _: slim_bus::Context) -> Result<(), slim_bus::HandlerError> { Ok(()) }
/// # }
/// # async fn run() -> slim_bus::Result<()> {
/// let bus = slim_bus::EventBus::builder()
///     .url("redis://127.0.0.1:6379/")
///     .consumer_group("mailer")
///     .handler(Welcome)
///     .build()
///     .await?;
///
/// bus.publish(&UserCreated { user_id: "1a2b3c".into() }).await?;
/// bus.run_until(async { tokio::signal::ctrl_c().await.ok(); }).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

struct Inner {
    broker: Arc<dyn Broker>,
    config: EventBusConfig,
    consumer_name: Arc<str>,
    routes: Arc<[Route]>,
    listening: Arc<ListenerPhase>,
    last_read: Arc<LastRead>,
    /// What a `listen()` in progress waits for.
    startup_wait: StartupWait,
    /// The streams the listener does not consume, and why.
    set_aside: Arc<SetAside>,
    contract: Contract,
    /// The partitioned streams this bus knows, and its round robin over their partitions.
    partitions: Partitions,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("consumer_group", &self.inner.config.consumer_group)
            .field("consumer_name", &self.inner.consumer_name)
            .field("streams", &self.streams().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl EventBus {
    /// Starts building a bus.
    pub fn builder() -> EventBusBuilder {
        EventBusBuilder::default()
    }

    /// The streams `trim_acked` and `trim_acked_streams` name, each once: a partitioned
    /// stream by its partitions, which are the keys that hold its entries.
    fn trim_acked_streams(&self) -> Arc<[Arc<str>]> {
        let config = &self.inner.config;
        let handled = config
            .trim_acked
            .then(|| self.streams())
            .into_iter()
            .flatten()
            .map(str::to_owned);
        let named = config.trim_acked_streams.iter().flat_map(|stream| {
            match self.inner.partitions.count(stream) {
                Some(count) => (0..count)
                    .map(|partition| partition_stream(stream, partition))
                    .collect(),
                None => vec![stream.clone()],
            }
        });
        let mut streams: Vec<Arc<str>> = Vec::new();
        for stream in handled.chain(named) {
            if !streams.iter().any(|known| **known == *stream) {
                streams.push(stream.into());
            }
        }
        streams.into()
    }

    /// Starts listening: creates the consumer group on every stream (an existing group is
    /// fine), then reads and handles entries in the background until the returned
    /// [`Listener`] is shut down or dropped.
    ///
    /// # Errors
    ///
    /// [`Error::NoHandlers`], [`Error::AlreadyListening`],
    /// [`Error::ConsumerNameTaken`] while another live process listens under this
    /// consumer name (see [`consumer_lease_ttl`](EventBusBuilder::consumer_lease_ttl)),
    /// and startup errors: Redis
    /// unreachable (only with [`wait_for_redis`](EventBusBuilder::wait_for_redis) off;
    /// by default `listen()` waits for it, and [`health`](Self::health) says so in
    /// [`Health::waiting_for`]), refused credentials (at once, naming the URL with its
    /// password hidden), a rejected TLS handshake, a command the user's ACL refuses on a
    /// stream or its dead-letter stream (naming the command and the key), a server older
    /// than Redis 7.0 ([`Error::UnsupportedServer`]), or every
    /// stream key holding another type ([`Error::WrongType`]). When
    /// only some do, those streams are set aside (see [`StreamHealth::error`]) and the
    /// others are consumed.
    pub async fn listen(&self) -> Result<Listener> {
        if self.inner.routes.is_empty() {
            return Err(Error::NoHandlers);
        }
        let Some(group) = self.inner.config.consumer_group.as_deref() else {
            return Err(Error::config("consumer_group", "must be set to listen"));
        };
        let Some(guard) = self.inner.listening.start() else {
            return Err(Error::AlreadyListening);
        };
        let config = &self.inner.config;
        let consumer = Consumer {
            broker: self.inner.broker.clone(),
            group: group.into(),
            consumer: self.inner.consumer_name.clone(),
            routes: self.inner.routes.clone(),
            max_count: config.max_count,
            max_concurrent: config.max_concurrent,
            max_in_flight: config.effective_max_in_flight(),
            handler_timeout: config.handler_timeout,
            block_time: config.block_time,
            shutdown_grace: config.effective_shutdown_grace(),
            command_timeout: config.command_timeout,
            start_from: config.start_from,
            claim_min_idle: config.claim_min_idle,
            claim_interval: config.claim_interval,
            consumer_idle_removal: config.consumer_idle_removal,
            retry_base: config.effective_retry_base(),
            retry_max: config.effective_retry_max(),
            dead_letter_max_len: config.dead_letter_max_len,
            last_read: self.inner.last_read.clone(),
            set_aside: self.inner.set_aside.clone(),
            publisher: self.publisher(),
            trim_acked: self.trim_acked_streams(),
            trim_acked_interval: config.trim_acked_interval,
            span_level: config.span_level,
        };
        let lease = ConsumerLease::new(
            self.inner.broker.clone(),
            group.into(),
            self.inner.consumer_name.clone(),
            config.effective_consumer_lease_ttl(),
        );
        let prepared = self.prepare_when_reachable(&consumer, &lease).await;
        self.inner.startup_wait.done();
        prepared?;
        guard.listening();
        self.warn_of_unread_partitions().await;
        tracing::info!(
            group,
            consumer = %self.inner.consumer_name,
            streams = ?self.streams().collect::<Vec<_>>(),
            "listening"
        );
        let shutdown = CancellationToken::new();
        let gauges = CancellationToken::new();
        tokio::spawn(self.clone().refresh_gauges(gauges.clone()));
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let _guard = guard;
                let _gauges = gauges.drop_guard();
                let group = consumer.group.clone();
                let name_taken = CancellationToken::new();
                let run = consumer.run(shutdown.clone(), name_taken.clone());
                tokio::pin!(run);
                let outcome = tokio::select! {
                    outcome = &mut run => outcome,
                    error = lease.keep() => {
                        name_taken.cancel();
                        shutdown.cancel();
                        let _ = run.await;
                        Err(error)
                    }
                };
                lease.release().await;
                if let Err(error) = &outcome {
                    tracing::error!(
                        group = %group,
                        error = error as &dyn std::error::Error,
                        "the listener stopped on an error it cannot recover from; nothing is consumed until listen() is called again"
                    );
                }
                outcome
            }
        });
        Ok(Listener::new(task, shutdown))
    }

    /// Checks the server's version, takes the consumer name's lease and creates the
    /// consumer groups; while Redis does not
    /// answer, waits for it with backoff when [`wait_for_redis`](EventBusBuilder::wait_for_redis)
    /// is set.
    async fn prepare_when_reachable(
        &self,
        consumer: &Consumer,
        lease: &ConsumerLease,
    ) -> Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let attempt = async {
                self.inner.broker.check_version().await?;
                lease.acquire(&self.inner.startup_wait).await?;
                let prepared = match consumer.prepare().await {
                    Ok(()) => self.check_permissions(consumer).await,
                    Err(error) => Err(error),
                };
                if prepared.is_err() {
                    lease.release().await;
                }
                prepared
            }
            .await;
            match attempt {
                Err(error) if self.inner.config.wait_for_redis && is_unreachable(&error) => {
                    let delay = backoff.next_delay();
                    self.inner
                        .startup_wait
                        .waiting("redis", crate::error::report(&error));
                    tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        attempt = backoff.attempts(),
                        retry_in = ?delay,
                        "redis does not answer; waiting for it to listen (wait_for_redis)"
                    );
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
    }

    /// Checks that the server lets this user run, on every stream consumed, the commands
    /// the claim scan and the dead-letter move send (see the README's "Redis ACL").
    async fn check_permissions(&self, consumer: &Consumer) -> Result<()> {
        for (index, route) in self.inner.routes.iter().enumerate() {
            if self.inner.set_aside.is_set(index) {
                continue;
            }
            self.inner
                .broker
                .check_permissions(
                    &route.stream,
                    &route.dead_letters,
                    &consumer.group,
                    &consumer.consumer,
                )
                .await?;
        }
        Ok(())
    }

    /// Logs a warning for each partitioned stream this bus handles whose partitions beyond
    /// its count (left from a larger count) still hold entries: nothing reads those. Looks
    /// at the partitions up to 4 times the count, and at least up to 64.
    async fn warn_of_unread_partitions(&self) {
        for (stream, count) in self.inner.partitions.iter() {
            let first = partition_stream(stream, 0);
            if !self
                .inner
                .routes
                .iter()
                .any(|route| *route.stream == *first)
            {
                continue;
            }
            let beyond = count..count.saturating_mul(4).max(64);
            let lengths = futures_util::future::join_all(beyond.map(|partition| async move {
                let name = partition_stream(stream, partition);
                let length = self.inner.broker.stream_len(&name).await;
                (name, length)
            }))
            .await;
            let unread: Vec<(String, u64)> = lengths
                .into_iter()
                .filter_map(|(name, length)| match length {
                    Ok(0) => None,
                    Ok(length) => Some((name, length)),
                    Err(error) => {
                        tracing::debug!(stream = %name, error = &error as &dyn std::error::Error, "could not look for entries in a partition beyond the count");
                        None
                    }
                })
                .collect();
            if !unread.is_empty() {
                tracing::warn!(
                    stream,
                    partitions = count,
                    unread = ?unread,
                    "partition streams beyond the stream's partition count still hold entries, and nothing reads them: drain them (a bus whose partition count covers them, or a handler on each such partition stream) or delete them; see the README's \"Partitioned streams\""
                );
            }
        }
    }

    /// Refreshes the per-stream gauges every [`GAUGE_REFRESH`](telemetry::GAUGE_REFRESH)
    /// until `stop` is cancelled (when the listener's run ends).
    async fn refresh_gauges(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(telemetry::GAUGE_REFRESH) => {}
            }
            tokio::select! {
                () = stop.cancelled() => return,
                _ = self.health() => {}
            }
        }
    }

    /// Listens until `signal` resolves, then shuts down gracefully: the one-liner for a
    /// service's `main`. The signal also ends the wait for Redis at startup, if
    /// `listen()` waits ([`wait_for_redis`](EventBusBuilder::wait_for_redis)).
    ///
    /// # Errors
    ///
    /// As [`listen`](Self::listen), and the error that stopped the listener early, if any.
    pub async fn run_until(&self, signal: impl Future<Output = ()>) -> Result<()> {
        let mut signal = std::pin::pin!(signal);
        let mut listener = tokio::select! {
            listener = self.listen() => listener?,
            () = &mut signal => return Ok(()),
        };
        tokio::select! {
            result = &mut listener => result,
            () = signal => listener.shutdown().await,
        }
    }

    /// The dead letters of `stream`: list, replay and purge them.
    ///
    /// Each partition of a partitioned stream has its own dead letters, replayed into the
    /// partition they came from: ask for those of `orders:{3}`. Asked for by the logical
    /// name (`orders`), every call fails with [`Error::PartitionedStream`]; go over the
    /// partitions with [`partition_count`](Self::partition_count) and
    /// [`partition_stream`](crate::partition_stream) instead.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(bus: slim_bus::EventBus) -> slim_bus::Result<()> {
    /// let dead = bus.dead_letters("user.created");
    /// for letter in dead.list(None, 100).await? {
    ///     println!("{} failed ({:?}): {}", letter.origin_id.unwrap_or_default(), letter.reason, letter.error);
    /// }
    /// dead.replay_all().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn dead_letters(&self, stream: &str) -> DeadLetters {
        let dead_letters = DeadLetters::new(
            self.inner.broker.clone(),
            stream,
            &self.inner.config.dead_letter_suffix,
        );
        match self.inner.partitions.count(stream) {
            Some(partitions) => dead_letters.of_partitioned(partitions),
            None => dead_letters,
        }
    }

    /// How many partitions the logical stream `stream` has, when this bus knows it as a
    /// partitioned stream (from [`stream_partitions`](EventBusBuilder::stream_partitions)
    /// a handler's event type, or an event type it [`publishes`](EventBusBuilder::publishes));
    /// its partitions are `stream:{0}` ... (see
    /// [`partition_stream`](crate::partition_stream)).
    pub fn partition_count(&self, stream: &str) -> Option<u32> {
        self.inner.partitions.count(stream)
    }

    /// A snapshot of the bus's health: whether Redis answers, when the listener last read,
    /// and per handled stream the group's lag, pending entries and dead letters, or the
    /// error that keeps the stream from being consumed or its state from being read. Made
    /// for a service's health endpoint; it never fails (an unreachable Redis is
    /// `connected: false`) and each Redis call is bounded by the command timeout.
    pub async fn health(&self) -> Health {
        let inner = &self.inner;
        let connected = inner.broker.ping().await.is_ok();
        let mut streams = Vec::new();
        if let (true, Some(group)) = (connected, inner.config.consumer_group.as_deref()) {
            for (index, route) in inner.routes.iter().enumerate() {
                let mut health = StreamHealth {
                    stream: route.stream.to_string(),
                    length: 0,
                    lag: None,
                    pending: 0,
                    oldest_pending_idle: None,
                    dead_letters: 0,
                    dead_letters_trimmed: 0,
                    paused: route.state.pause_reason(),
                    dead_letter_moves_failing: route.state.dead_letter_moves_failing(),
                    error: inner.set_aside.reason(index),
                };
                if health.error.is_none() {
                    match inner
                        .broker
                        .group_stats(&route.stream, group, &route.dead_letters)
                        .await
                    {
                        Ok(stats) => {
                            health.length = stats.length;
                            health.lag = stats.lag;
                            health.pending = stats.pending;
                            health.oldest_pending_idle = stats.oldest_pending_idle;
                            health.dead_letters = stats.dead_letters;
                            health.dead_letters_trimmed = stats.dead_letters_trimmed;
                        }
                        Err(error) => health.error = Some(crate::error::report(&error)),
                    }
                }
                if health.error.is_none() {
                    // A dead-letter move that keeps failing (a missing permission on the
                    // dead-letter key, a key of another type) needs an operator too.
                    health.error = route.state.dead_letter_move_error();
                }
                telemetry::stream_gauges(&health, group);
                streams.push(health);
            }
        }
        let (waiting_for, last_error) = inner.startup_wait.get();
        Health {
            connected,
            listening: inner.listening.is_listening(),
            since_last_read: inner.last_read.elapsed(),
            since_last_turn: inner.last_read.since_turn(),
            read_stall_after: self.read_stall_after(),
            streams,
            waiting_for,
            last_error,
        }
    }

    /// See [`Health::read_stall_after`].
    fn read_stall_after(&self) -> Duration {
        let config = &self.inner.config;
        let longest_handler = self
            .inner
            .routes
            .iter()
            .filter_map(|route| route.handler_timeout)
            .fold(config.handler_timeout, Duration::max);
        (config.block_time + config.command_timeout) * 2 + longest_handler
    }

    /// A handle that publishes through this bus, as handlers get from
    /// [`Context::publisher`](crate::Context::publisher).
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.clone())
    }

    /// The Redis streams this bus handles: for a partitioned stream, each partition
    /// (`orders:{0}`, `orders:{1}`, ...).
    pub fn streams(&self) -> impl Iterator<Item = &str> {
        self.inner.routes.iter().map(|r| &*r.stream)
    }

    /// The consumer group this bus listens through, if set.
    pub fn consumer_group(&self) -> Option<&str> {
        self.inner.config.consumer_group.as_deref()
    }

    /// This process's consumer name within the group.
    pub fn consumer_name(&self) -> &str {
        &self.inner.consumer_name
    }

    pub(crate) fn broker(&self) -> &Arc<dyn Broker> {
        &self.inner.broker
    }

    pub(crate) fn config(&self) -> &EventBusConfig {
        &self.inner.config
    }

    pub(crate) fn routes(&self) -> &[Route] {
        &self.inner.routes
    }

    pub(crate) fn contract(&self) -> &Contract {
        &self.inner.contract
    }
}

/// Whether `error` says Redis is down or cannot be reached for now (refused, timed out,
/// dropped connections, or a server still loading its data), rather than refusing the
/// bus for good.
fn is_unreachable(error: &Error) -> bool {
    if is_misconfigured(error) {
        return false;
    }
    match error {
        Error::Timeout { .. } => true,
        Error::Redis { source, .. } => {
            !is_refused_access(source)
                && (source.is_io_error()
                    || source.is_connection_refusal()
                    || source.is_timeout()
                    || source.is_connection_dropped()
                    || error
                        .server_code()
                        .is_some_and(|code| is_failover_code(code.as_bytes())))
        }
        _ => false,
    }
}

/// Whether `error` comes from settings that waiting cannot fix: a TLS handshake that
/// failed on a certificate (refused by either side), or a URL whose scheme does not match
/// the port (`redis://` at a TLS port, `rediss://` at a plain one). rustls reports these as
/// I/O errors, so they are told apart by what their chain says.
fn is_misconfigured(error: &Error) -> bool {
    const MARKS: [&str; 4] = [
        "invalid peer certificate",
        "received fatal alert",
        "use a rediss:// URL",
        "use a redis:// URL",
    ];
    let mut cause: Option<&dyn std::error::Error> = Some(error);
    while let Some(current) = cause {
        let text = current.to_string();
        if MARKS.iter().any(|mark| text.contains(mark)) {
            return true;
        }
        cause = current.source();
    }
    false
}
