//! The bus: its builder, publishing, and listening.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::asyncapi::{self, Contract};
use crate::batch::BatchHandler;
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::{Broker, is_failover_code};
use crate::codec::{self, EncodedField};
use crate::config::{EventBusConfig, StartFrom, default_consumer_name, redacted_url};
use crate::consumer::Backoff;
use crate::consumer::{Consumer, Route, is_refused_access};
use crate::dead_letter::{DeadLetters, dead_letter_stream};
use crate::emit::{Emit, EmittedEntry};
use crate::error::HandlerError;
use crate::error::{Error, Result};
use crate::event::{EntryId, Event};
use crate::handler::{Handlers, RegisteredHandler, StreamHandler, StreamService};
use crate::headers::{Headers, NO_HEADERS};
use crate::health::{Health, LastRead, SetAside, StreamHealth};
use crate::lease::ConsumerLease;
use crate::listener::Listener;
use crate::middleware::{self, BusLayer, BusService, HandlerRequest};
use crate::partition::{Declared, Partitions, partition_stream};
use crate::publisher::Publisher;
use crate::spans;
use crate::telemetry;
use crate::tls::{Tls, reject_without_tls};

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
    listening: Arc<AtomicBool>,
    last_read: Arc<LastRead>,
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

    /// Publishes `event` to its stream ([`Event::STREAM`]), returning the new entry's id.
    ///
    /// For a partitioned stream the entry goes to one partition (`orders:{3}`): the one its
    /// key field's value picks ([`Event::PARTITION_KEY`]), else the next in turn. See the
    /// README's "Partitioned streams".
    ///
    /// # Errors
    ///
    /// [`Error::NoEventStream`] when the event type names no stream, [`Error::Encode`] when
    /// the event does not serialize into stream fields, [`Error::Config`] when the event
    /// type and the bus's `stream_partitions` disagree on the stream's partitions, and
    /// Redis errors (bounded by the command timeout, time queued behind other publishes
    /// included).
    ///
    /// # Cancellation
    ///
    /// Publishes from all tasks are sent together in pipelines: dropping this future does
    /// not take the publish back once it is queued, and the entry may still be written.
    pub async fn publish<E: Event>(&self, event: &E) -> Result<EntryId> {
        let stream = E::STREAM.ok_or(Error::NoEventStream {
            event: std::any::type_name::<E>(),
        })?;
        self.publish_encoded(stream, Declared::of::<E>(), event, &NO_HEADERS)
            .await
    }

    /// Publishes `event` to `stream`, whatever stream its type names.
    ///
    /// When `stream` is the logical name of a stream this bus knows as partitioned (from
    /// [`stream_partitions`](EventBusBuilder::stream_partitions) or a handled event type),
    /// the entry goes to its partitions in turn; a partition's own name (`orders:{3}`) is
    /// published to unchanged.
    ///
    /// # Errors
    ///
    /// As [`publish`](Self::publish).
    pub async fn publish_to<E: Serialize + ?Sized>(
        &self,
        stream: &str,
        event: &E,
    ) -> Result<EntryId> {
        self.publish_encoded(stream, Declared::default(), event, &NO_HEADERS)
            .await
    }

    /// Publishes `event` to its stream with `headers`: metadata the handler reads from
    /// [`Context::headers`](crate::Context::headers), stored next to the event's fields as
    /// `@h.NAME` (see [`Headers`]).
    ///
    /// # Errors
    ///
    /// As [`publish`](Self::publish), and [`Error::InvalidHeader`] for a header name
    /// that cannot be stored.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
    /// # #[event(stream = "user.created")]
    /// # struct UserCreated { user_id: String }
    /// # async fn run(bus: slim_bus::EventBus) -> slim_bus::Result<()> {
    /// let mut headers = slim_bus::Headers::new();
    /// headers.insert("request-id", "r-42");
    /// bus.publish_with_headers(&UserCreated { user_id: "1a2b3c".into() }, &headers).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn publish_with_headers<E: Event>(
        &self,
        event: &E,
        headers: &Headers,
    ) -> Result<EntryId> {
        let stream = E::STREAM.ok_or(Error::NoEventStream {
            event: std::any::type_name::<E>(),
        })?;
        self.publish_encoded(stream, Declared::of::<E>(), event, headers)
            .await
    }

    /// Publishes `event` to `stream` with `headers`; see
    /// [`publish_with_headers`](Self::publish_with_headers).
    ///
    /// # Errors
    ///
    /// As [`publish_with_headers`](Self::publish_with_headers).
    pub async fn publish_to_with_headers<E: Serialize + ?Sized>(
        &self,
        stream: &str,
        event: &E,
        headers: &Headers,
    ) -> Result<EntryId> {
        self.publish_encoded(stream, Declared::default(), event, headers)
            .await
    }

    /// Publishes `event` to `stream` (or one of its partitions) with `headers`.
    async fn publish_encoded<E: Serialize + ?Sized>(
        &self,
        stream: &str,
        declared: Declared,
        event: &E,
        headers: &Headers,
    ) -> Result<EntryId> {
        if stream.is_empty() {
            return Err(Error::EmptyStream);
        }
        headers.validate()?;
        let fields = codec::to_fields(event).map_err(|error| Error::Encode {
            stream: stream.to_owned(),
            reason: error.to_string(),
        })?;
        self.append(stream, &declared, fields, headers).await
    }

    /// The cap on the length of `target` (`stream` itself, or one of its partitions) at
    /// publish: the bus's for `target`, else the bus's for `stream` (a cap on a
    /// partitioned stream caps each partition), else the event type's.
    fn max_len(&self, target: &str, stream: &str, event_max_len: Option<usize>) -> Option<usize> {
        let caps = &self.inner.config.stream_max_len;
        if caps.is_empty() {
            return event_max_len;
        }
        caps.get(target)
            .or_else(|| caps.get(stream))
            .copied()
            .or(event_max_len)
    }

    /// The Redis stream an entry of `fields` published to `stream` goes to: `stream`
    /// itself, or the partition its key (or the round robin) picks when `stream` is a
    /// partitioned stream.
    fn target<'a>(
        &self,
        stream: &'a str,
        declared: &Declared,
        fields: &[EncodedField],
    ) -> Result<Cow<'a, str>> {
        let partitions = &self.inner.partitions;
        Ok(match partitions.count_for(stream, declared)? {
            None => Cow::Borrowed(stream),
            Some(count) => Cow::Owned(partition_stream(
                stream,
                partitions.pick(count, declared.key, fields),
            )),
        })
    }

    /// Publishes several events of one type to their stream in one round trip, in order,
    /// returning their ids. Much faster than awaiting `publish` for each.
    ///
    /// # Errors
    ///
    /// As [`publish`](Self::publish). An encoding error publishes nothing; a Redis error
    /// may leave some events of the batch published (Redis pipelines are not
    /// transactions): an `XADD` the server refuses does not stop the ones after it.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Serialize, Deserialize)]
    /// # struct UserCreated { user_id: String }
    /// # impl slim_bus::Event for UserCreated { const STREAM: Option<&'static str> = Some("user.created"); }
    /// # async fn run(bus: slim_bus::EventBus) -> slim_bus::Result<()> {
    /// let users: Vec<UserCreated> = (0..100).map(|i| UserCreated { user_id: i.to_string() }).collect();
    /// let ids = bus.publish_batch(&users).await?;
    /// assert_eq!(ids.len(), 100);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn publish_batch<E: Event>(&self, events: &[E]) -> Result<Vec<EntryId>> {
        let stream = E::STREAM.ok_or(Error::NoEventStream {
            event: std::any::type_name::<E>(),
        })?;
        self.publish_batch_encoded(stream, Declared::of::<E>(), events)
            .await
    }

    /// Publishes several events to `stream` in one round trip; see
    /// [`publish_batch`](Self::publish_batch).
    ///
    /// # Errors
    ///
    /// As [`publish_batch`](Self::publish_batch).
    pub async fn publish_batch_to<E: Serialize>(
        &self,
        stream: &str,
        events: &[E],
    ) -> Result<Vec<EntryId>> {
        self.publish_batch_encoded(stream, Declared::default(), events)
            .await
    }

    async fn publish_batch_encoded<E: Serialize>(
        &self,
        stream: &str,
        declared: Declared,
        events: &[E],
    ) -> Result<Vec<EntryId>> {
        if stream.is_empty() {
            return Err(Error::EmptyStream);
        }
        let mut entries = Vec::with_capacity(events.len());
        for event in events {
            let fields = codec::to_fields(event).map_err(|error| Error::Encode {
                stream: stream.to_owned(),
                reason: error.to_string(),
            })?;
            if fields.is_empty() {
                return Err(empty_entry(stream));
            }
            entries.push(EmittedEntry {
                stream: stream.to_owned(),
                declared,
                fields,
            });
        }
        self.append_routed(entries).await
    }

    /// Publishes encoded entries, each to its stream or the partition it picks: one batch
    /// per Redis stream, each in order, all sent at once so that they share the pipeline.
    /// Returns the ids in the order of `entries`. Nothing is published when an entry's
    /// stream cannot be resolved.
    pub(crate) async fn append_routed(&self, entries: Vec<EmittedEntry>) -> Result<Vec<EntryId>> {
        struct Batch {
            target: String,
            max_len: Option<usize>,
            positions: Vec<usize>,
            entries: Vec<Vec<EncodedField>>,
        }
        let count = entries.len();
        let mut batches: Vec<Batch> = Vec::new();
        for (position, entry) in entries.into_iter().enumerate() {
            let target = self.target(&entry.stream, &entry.declared, &entry.fields)?;
            let max_len = self.max_len(&target, &entry.stream, entry.declared.max_len);
            let batch = match batches.iter().position(|batch| batch.target == *target) {
                Some(index) => &mut batches[index],
                None => {
                    batches.push(Batch {
                        target: target.into_owned(),
                        max_len: None,
                        positions: Vec::new(),
                        entries: Vec::new(),
                    });
                    batches.last_mut().ok_or_else(|| Error::Internal {
                        detail: "a batch just pushed is missing".to_owned(),
                    })?
                }
            };
            // The cap of the first event type that has one for the stream.
            batch.max_len = batch.max_len.or(max_len);
            batch.positions.push(position);
            batch.entries.push(entry.fields);
        }
        let published = futures_util::future::try_join_all(batches.iter_mut().map(|batch| {
            let entries = std::mem::take(&mut batch.entries);
            self.append_batch(&batch.target, batch.max_len, entries)
        }))
        .await?;
        let mut ids = vec![EntryId::MIN; count];
        for (batch, batch_ids) in batches.iter().zip(published) {
            for (&position, id) in batch.positions.iter().zip(batch_ids) {
                ids[position] = id;
            }
        }
        Ok(ids)
    }

    /// Publishes encoded entries to the Redis stream `stream` in one round trip, capped at
    /// about `max_len` entries.
    async fn append_batch(
        &self,
        stream: &str,
        max_len: Option<usize>,
        entries: Vec<Vec<EncodedField>>,
    ) -> Result<Vec<EntryId>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let span = spans::send_span(self.inner.config.span_level, stream, entries.len());
        #[cfg(feature = "opentelemetry")]
        let entries = {
            let mut entries = entries;
            if let Some(trace) = crate::otel::trace_context(&span) {
                for fields in &mut entries {
                    trace.encode_into(fields);
                }
            }
            entries
        };
        let started = tokio::time::Instant::now();
        let published = self
            .inner
            .broker
            .publish_batch(stream, max_len, &entries)
            .instrument(span)
            .await;
        telemetry::sent(stream, entries.len(), started.elapsed(), published.is_ok());
        published
    }

    /// Appends an entry of untyped fields to `stream`, like the Go original's `Send`.
    ///
    /// The names are written as given, like `XADD` would: those that start with `@` are
    /// read as the bus's own (see the README's "Wire format": `@h.NAME` is header `NAME`,
    /// `@@x` is the event's field `@x`, other `@` names are not handed to handlers).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(bus: slim_bus::EventBus) -> slim_bus::Result<()> {
    /// bus.send("user.created", [("user_id", "1a2b3c"), ("user_name", "John Doe")]).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] for an empty field list (Redis rejects entries without fields),
    /// and Redis errors.
    pub async fn send<K, V>(
        &self,
        stream: &str,
        fields: impl IntoIterator<Item = (K, V)>,
    ) -> Result<EntryId>
    where
        K: AsRef<str>,
        V: AsRef<[u8]>,
    {
        if stream.is_empty() {
            return Err(Error::EmptyStream);
        }
        let fields: Vec<EncodedField> = fields
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_owned().into(), v.as_ref().to_vec()))
            .collect();
        self.append(stream, &Declared::default(), fields, &NO_HEADERS)
            .await
    }

    /// Writes one entry to `stream` or the partition it picks: the event's `fields`, then
    /// the `headers`' fields.
    async fn append(
        &self,
        stream: &str,
        declared: &Declared,
        mut fields: Vec<EncodedField>,
        headers: &Headers,
    ) -> Result<EntryId> {
        if fields.is_empty() {
            return Err(empty_entry(stream));
        }
        let target = self.target(stream, declared, &fields)?;
        let max_len = self.max_len(&target, stream, declared.max_len);
        let stream = &*target;
        let span = spans::send_span(self.inner.config.span_level, stream, 1);
        #[cfg(feature = "opentelemetry")]
        let traced = crate::otel::with_trace_context(&span, headers);
        #[cfg(feature = "opentelemetry")]
        let headers = traced.as_ref().unwrap_or(headers);
        headers.encode_into(&mut fields);
        let started = tokio::time::Instant::now();
        let published = self
            .inner
            .broker
            .publish(stream, max_len, fields)
            .instrument(span.clone())
            .await;
        if let Ok(id) = &published {
            span.record("messaging.message.id", tracing::field::display(id));
        }
        telemetry::sent(stream, 1, started.elapsed(), published.is_ok());
        published
    }

    /// The streams `trim_acked` and `trim_acked_streams` name, each once.
    fn trim_acked_streams(&self) -> Arc<[Arc<str>]> {
        let config = &self.inner.config;
        let handled = config
            .trim_acked
            .then(|| self.streams())
            .into_iter()
            .flatten();
        let mut streams: Vec<Arc<str>> = Vec::new();
        for stream in handled.chain(config.trim_acked_streams.iter().map(String::as_str)) {
            if !streams.iter().any(|known| &**known == stream) {
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
    /// by default `listen()` waits for it), refused credentials, a server older than
    /// Redis 7.0 ([`Error::UnsupportedServer`]), or every
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
        if self.inner.listening.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadyListening);
        }
        let guard = ListeningGuard(self.inner.listening.clone());
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
            retry_base: config.retry_base,
            retry_max: config.retry_max,
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
            config.consumer_lease_ttl,
        );
        self.prepare_when_reachable(&consumer, &lease).await?;
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
                let run = consumer.run(shutdown.clone());
                tokio::pin!(run);
                let outcome = tokio::select! {
                    outcome = &mut run => outcome,
                    error = lease.keep() => {
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
                lease.acquire().await?;
                let prepared = consumer.prepare().await;
                if prepared.is_err() {
                    lease.release().await;
                }
                prepared
            }
            .await;
            match attempt {
                Err(error) if self.inner.config.wait_for_redis && is_unreachable(&error) => {
                    let delay = backoff.next_delay();
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
    /// partitions with [`partitions`](Self::partitions) and
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
    /// or a handler's event type); its partitions are `stream:{0}` ... (see
    /// [`partition_stream`](crate::partition_stream)).
    pub fn partitions(&self, stream: &str) -> Option<u32> {
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
                telemetry::stream_gauges(&health, group);
                streams.push(health);
            }
        }
        Health {
            connected,
            listening: inner.listening.load(Ordering::Acquire),
            since_last_read: inner.last_read.elapsed(),
            read_stall_after: self.read_stall_after(),
            streams,
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

/// The error for an entry without fields, which Redis cannot store.
fn empty_entry(stream: &str) -> Error {
    Error::Encode {
        stream: stream.to_owned(),
        reason: "an entry needs at least one field (every field is empty or None)".to_owned(),
    }
}

/// The span of one publish of `entries` entries; the entry id is recorded when known.
/// Clears the listening flag when a listener's run ends, however it ends.
struct ListeningGuard(Arc<AtomicBool>);

impl Drop for ListeningGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

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

    /// How long an entry must sit with another consumer before this one claims it
    /// (default 60 s); must exceed the handler timeout.
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
    /// can be cancelled by dropping it ([`EventBus::run_until`]'s signal does). With
    /// `false`, `listen()` fails at once with the connection error.
    pub fn wait_for_redis(mut self, wait: bool) -> Self {
        self.config.wait_for_redis = wait;
        self
    }

    /// How long the lease of the consumer name lasts without renewal (default 5 s; at
    /// least 100 ms). While a bus listens, the key `slim-bus:consumer:{group}:{name}`
    /// holds a token of this process, renewed every third of this TTL and deleted at
    /// shutdown; `listen()` fails with [`Error::ConsumerNameTaken`] while another live
    /// process holds it, and after a crash the restarted process waits up to this long
    /// for its previous lease to lapse, then recovers its pending entries.
    pub fn consumer_lease_ttl(mut self, ttl: Duration) -> Self {
        self.config.consumer_lease_ttl = ttl;
        self
    }

    /// Failed deliveries before an entry is dead-lettered (default 5).
    pub fn max_deliveries(mut self, max_deliveries: u64) -> Self {
        self.config.max_deliveries = max_deliveries;
        self
    }

    /// The first retry delay and the longest one (default 1 s and 30 s); the longest must
    /// be shorter than [`claim_min_idle`](Self::claim_min_idle).
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.config.retry_base = base;
        self.config.retry_max = max;
        self
    }

    /// The suffix of dead-letter stream names (default `:dlq`, giving `{stream}:dlq`).
    pub fn dead_letter_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.config.dead_letter_suffix = suffix.into();
        self
    }

    /// Caps each dead-letter stream at about `max_len` entries, trimming the oldest
    /// (default: no cap, dead letters are kept until replayed or purged). Trimmed dead
    /// letters are counted in [`StreamHealth::dead_letters_trimmed`] and logged.
    pub fn dead_letter_max_len(mut self, max_len: usize) -> Self {
        self.config.dead_letter_max_len = Some(max_len);
        self
    }

    /// Caps `stream` at about `max_len` entries as entries are published to it
    /// (`XADD ... MAXLEN ~`), overriding the event type's [`Event::MAX_LEN`]. The oldest
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
    /// handles, whether it handles `stream` or not (while it listens).
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
    /// [`Error::Config`] naming an invalid setting (a URL that is not a Redis URL or uses
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
        asyncapi::write_if_asked(&routes, &self.config, &self.contract);
        let memory = match (self.memory, &self.client) {
            (Some(memory), _) => Some(memory),
            (None, None) => MemoryBroker::from_url(&self.config.url),
            (None, Some(_)) => None,
        };
        let broker: Arc<dyn Broker> = match (memory, self.client) {
            (Some(memory), _) => Arc::new(memory.connect()),
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
                listening: Arc::new(AtomicBool::new(false)),
                last_read: Arc::new(LastRead::new()),
                contract: self.contract,
                partitions,
            }),
        })
    }
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
            handler_timeout_fits(timeout, registration.handler_name, config)?;
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
fn handler_timeout_fits(timeout: Duration, handler: &str, config: &EventBusConfig) -> Result<()> {
    if timeout.is_zero() {
        return Err(Error::config(
            "handler_timeout",
            format!("of handler `{handler}` must be longer than zero"),
        ));
    }
    if timeout >= config.claim_min_idle {
        return Err(Error::config(
            "handler_timeout",
            format!(
                "of handler `{handler}` ({timeout:?}) must be shorter than claim_min_idle ({:?}), or entries still being handled would be claimed and run twice",
                config.claim_min_idle
            ),
        ));
    }
    Ok(())
}
