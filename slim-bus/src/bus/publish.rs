//! Publishing: typed events, batches and untyped entries, routed to their stream or partition.

use std::borrow::Cow;

use serde::Serialize;
use tracing::Instrument;

use crate::codec::{self, EncodedField};
use crate::emit::EmittedEntry;
use crate::error::{Error, Result};
use crate::event::{EntryId, Event};
use crate::headers::{Headers, NO_HEADERS};
use crate::partition::{Declared, partition_stream};
use crate::spans;
use crate::telemetry;

use super::EventBus;

impl EventBus {
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
    /// [`stream_partitions`](crate::EventBusBuilder::stream_partitions) or a handled event type),
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
                partitions.pick(stream, count, declared.key, fields),
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
}

/// The error for an entry without fields, which Redis cannot store.
fn empty_entry(stream: &str) -> Error {
    Error::Encode {
        stream: stream.to_owned(),
        reason: "an entry needs at least one field (every field is empty or None)".to_owned(),
    }
}
