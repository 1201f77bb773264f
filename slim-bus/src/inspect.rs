//! Inspection of any stream, as an operator sees it: its consumer groups and their
//! consumers, pending entries, and new entries as they arrive, read without a group.

use std::time::Duration;

use futures_util::Stream;
use serde::Serialize;
use serde::ser::SerializeMap;

use crate::bus::EventBus;
use crate::dead_letter::dead_letter_stream;
use crate::error::{Error, Result};
use crate::event::EntryId;

/// How many entries [`EventBus::tail`] asks for per read.
const TAIL_COUNT: usize = 100;

/// A stream, its consumer groups and its dead letters, from [`EventBus::stream_status`].
///
/// # Serialization
///
/// Serializes (with `serde`) like [`Health`](crate::Health): durations as whole
/// milliseconds in fields named with a `_ms` suffix, entry ids as their `ms-seq` text,
/// `None` as `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StreamStatus {
    /// The stream.
    pub stream: String,
    /// Entries in the stream.
    pub length: u64,
    /// The id of the newest entry in the stream; `None` when it is empty.
    #[serde(serialize_with = "optional_id")]
    pub last_entry_id: Option<EntryId>,
    /// The name of its dead-letter stream, e.g. `{user.created}:dlq`.
    pub dead_letter_stream: String,
    /// Entries in its dead-letter stream.
    pub dead_letters: u64,
    /// Its consumer groups, by name.
    pub groups: Vec<GroupStatus>,
}

/// One consumer group of a stream, in a [`StreamStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GroupStatus {
    /// The group's name.
    pub name: String,
    /// Entries not yet delivered to the group; `None` when Redis cannot tell (after
    /// entries were deleted from the middle of the stream).
    pub lag: Option<u64>,
    /// Entries delivered to a consumer of the group and not acknowledged yet.
    pub pending: u64,
    /// How long the longest-idle pending entry has waited since its last delivery, among
    /// the 100 pending entries with the lowest ids (all of them when no more are pending);
    /// `None` when nothing is pending.
    #[serde(rename = "oldest_pending_idle_ms", serialize_with = "optional_millis")]
    pub oldest_pending_idle: Option<Duration>,
    /// The id of the last entry delivered to the group.
    #[serde(serialize_with = "id")]
    pub last_delivered_id: EntryId,
    /// The group's consumers, by name.
    pub consumers: Vec<ConsumerStatus>,
}

/// One consumer of a group, in a [`GroupStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ConsumerStatus {
    /// The consumer's name.
    pub name: String,
    /// Entries it holds pending.
    pub pending: u64,
    /// How long ago it last read or claimed.
    #[serde(rename = "idle_ms", serialize_with = "millis")]
    pub idle: Duration,
}

/// One entry of a consumer group's pending list, from [`EventBus::pending_entries`] and
/// [`MemoryBroker::pending`](crate::MemoryBroker::pending).
///
/// Serializes as [`StreamStatus`] does: `id` as text, `idle_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PendingEntry {
    /// The entry.
    #[serde(serialize_with = "id")]
    pub id: EntryId,
    /// The consumer that holds it.
    pub consumer: String,
    /// How often the group has delivered it.
    pub delivery_count: u64,
    /// How long ago it was last delivered (on tokio's clock for the in-memory backend).
    #[serde(rename = "idle_ms", serialize_with = "millis")]
    pub idle: Duration,
}

/// One entry of a stream, as [`EventBus::read_after`] and [`EventBus::tail`] read it.
///
/// Serializes as `{"id": "ms-seq", "fields": {name: value}}`, each value as text (bytes
/// that are not UTF-8 replaced by `U+FFFD`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StreamEntry {
    /// The entry's id.
    #[serde(serialize_with = "id")]
    pub id: EntryId,
    /// Its fields, in the order they were written.
    #[serde(serialize_with = "fields")]
    pub fields: Vec<(String, Vec<u8>)>,
}

impl StreamEntry {
    pub(crate) fn from_raw(id: EntryId, fields: crate::broker::RawFields) -> Self {
        StreamEntry {
            id,
            fields: fields
                .into_iter()
                .map(|(name, value)| (String::from_utf8_lossy(&name).into_owned(), value))
                .collect(),
        }
    }

    /// The field `name`, as text if it is UTF-8.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

impl EventBus {
    /// The state of any stream: its length and newest entry, its dead letters, and per
    /// consumer group the lag, pending entries, the idle time of the oldest one, the last
    /// delivered id and the consumers. Needs no consumer group or handler of this bus:
    /// a bus built with only a URL inspects every stream.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run() -> slim_bus::Result<()> {
    /// let bus = slim_bus::EventBus::builder().url("redis://127.0.0.1:6379/").build().await?;
    /// let status = bus.stream_status("user.created").await?;
    /// for group in &status.groups {
    ///     println!("{}: lag {:?}, {} pending", group.name, group.lag, group.pending);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::StreamNotFound`] when there is no such key, [`Error::WrongType`] when the
    /// key holds another type, and Redis errors (each command bounded by the command
    /// timeout).
    pub async fn stream_status(&self, stream: &str) -> Result<StreamStatus> {
        let dead_letters = dead_letter_stream(stream, &self.config().dead_letter_suffix);
        self.broker()
            .stream_status(stream, &dead_letters)
            .await?
            .ok_or_else(|| Error::StreamNotFound {
                stream: stream.to_owned(),
            })
    }

    /// Up to `count` entries of the pending list of `group` on `stream`, lowest id first:
    /// who holds each, since when, and how often it was delivered; only those of
    /// `consumer` when given. Like `XPENDING stream group - + count [consumer]`.
    ///
    /// # Errors
    ///
    /// [`Error::GroupNotFound`] when the stream or the group does not exist, and Redis
    /// errors.
    pub async fn pending_entries(
        &self,
        stream: &str,
        group: &str,
        consumer: Option<&str>,
        count: usize,
    ) -> Result<Vec<PendingEntry>> {
        self.broker()
            .pending_entries(stream, group, consumer, count.max(1))
            .await
    }

    /// Up to `count` entries of `stream` with ids after `after`, oldest first, waiting up
    /// to `block` for the first one when there is none yet (not at all for `None`). Like
    /// `XREAD`: not through a consumer group, so it takes nothing from anyone, and an
    /// empty result is not an error (nor is a stream that does not exist yet). The wait
    /// runs on a connection of its own, so it holds up no other command of the bus.
    ///
    /// # Errors
    ///
    /// [`Error::WrongType`] when the key holds another type, and Redis errors.
    pub async fn read_after(
        &self,
        stream: &str,
        after: EntryId,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StreamEntry>> {
        Ok(self
            .broker()
            .read_after(stream, after, count.max(1), block)
            .await?
            .into_iter()
            .map(|(id, fields)| StreamEntry::from_raw(id, fields))
            .collect())
    }

    /// The entries of `stream` as they arrive, in order: those after `from` (`EntryId::MIN`
    /// for every entry there is), or with `None` those added after this call returns
    /// (also to a stream that does not exist yet). Reads with
    /// [`read_after`](Self::read_after), waiting up to `block_time` per read, so it takes
    /// nothing from any consumer group. The stream ends after the first error it yields;
    /// dropping it stops reading.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(bus: slim_bus::EventBus) -> slim_bus::Result<()> {
    /// use futures_util::StreamExt;
    ///
    /// let mut entries = std::pin::pin!(bus.tail("user.created", None).await?);
    /// while let Some(entry) = entries.next().await {
    ///     let entry = entry?;
    ///     println!("{} {:?}", entry.id, entry.field("user_id"));
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// With `None`, the errors of [`stream_status`](Self::stream_status) but
    /// [`Error::StreamNotFound`]; later errors come from the stream.
    pub async fn tail(
        &self,
        stream: &str,
        from: Option<EntryId>,
    ) -> Result<impl Stream<Item = Result<StreamEntry>> + Send + 'static> {
        struct Tail {
            bus: EventBus,
            stream: String,
            after: EntryId,
            ready: std::collections::VecDeque<StreamEntry>,
            failed: bool,
        }
        let after = match from {
            Some(from) => from,
            None => match self.stream_status(stream).await {
                Ok(status) => status.last_entry_id.unwrap_or(EntryId::MIN),
                Err(Error::StreamNotFound { .. }) => EntryId::MIN,
                Err(error) => return Err(error),
            },
        };
        let block = self.config().block_time;
        let state = Tail {
            bus: self.clone(),
            stream: stream.to_owned(),
            after,
            ready: Default::default(),
            failed: false,
        };
        Ok(futures_util::stream::unfold(
            state,
            move |mut state| async move {
                if state.failed {
                    return None;
                }
                loop {
                    if let Some(entry) = state.ready.pop_front() {
                        return Some((Ok(entry), state));
                    }
                    match state
                        .bus
                        .read_after(&state.stream, state.after, TAIL_COUNT, Some(block))
                        .await
                    {
                        Ok(entries) => {
                            if let Some(last) = entries.last() {
                                state.after = last.id;
                            }
                            state.ready.extend(entries);
                        }
                        Err(error) => {
                            state.failed = true;
                            return Some((Err(error), state));
                        }
                    }
                }
            },
        ))
    }
}

pub(crate) fn id<S: serde::Serializer>(id: &EntryId, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(id)
}

pub(crate) fn optional_id<S: serde::Serializer>(
    id: &Option<EntryId>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => serializer.collect_str(id),
        None => serializer.serialize_none(),
    }
}

pub(crate) fn millis<S: serde::Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

fn optional_millis<S: serde::Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => millis(duration, serializer),
        None => serializer.serialize_none(),
    }
}

/// Fields as a JSON object of text values, in their order.
pub(crate) fn fields<S: serde::Serializer>(
    fields: &[(String, Vec<u8>)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut map = serializer.serialize_map(Some(fields.len()))?;
    for (name, value) in fields {
        map.serialize_entry(name, &String::from_utf8_lossy(value))?;
    }
    map.end()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_ids_as_text_and_durations_as_milliseconds() {
        let status = StreamStatus {
            stream: "orders".into(),
            length: 3,
            last_entry_id: Some(EntryId::new(5, 1)),
            dead_letter_stream: "{orders}:dlq".into(),
            dead_letters: 1,
            groups: vec![GroupStatus {
                name: "billing".into(),
                lag: None,
                pending: 1,
                oldest_pending_idle: Some(Duration::from_micros(1_500_900)),
                last_delivered_id: EntryId::new(4, 0),
                consumers: vec![ConsumerStatus {
                    name: "pod-1".into(),
                    pending: 1,
                    idle: Duration::from_millis(20),
                }],
            }],
        };
        assert_eq!(
            serde_json::to_value(&status).expect("serializes"),
            serde_json::json!({
                "stream": "orders",
                "length": 3,
                "last_entry_id": "5-1",
                "dead_letter_stream": "{orders}:dlq",
                "dead_letters": 1,
                "groups": [{
                    "name": "billing",
                    "lag": null,
                    "pending": 1,
                    "oldest_pending_idle_ms": 1500,
                    "last_delivered_id": "4-0",
                    "consumers": [{"name": "pod-1", "pending": 1, "idle_ms": 20}],
                }],
            })
        );
        let entry = StreamEntry {
            id: EntryId::new(7, 0),
            fields: vec![
                ("user_id".into(), b"u1".to_vec()),
                ("bin".into(), vec![255]),
            ],
        };
        assert_eq!(
            serde_json::to_value(&entry).expect("serializes"),
            serde_json::json!({"id": "7-0", "fields": {"user_id": "u1", "bin": "\u{fffd}"}})
        );
    }
}
