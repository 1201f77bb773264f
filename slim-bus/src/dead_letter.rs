//! Dead letters: entries that failed for good, moved to a capped stream of their own, and
//! the API to inspect, replay and purge them.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::broker::{Broker, RawFields};
use crate::error::{Error, Result};
use crate::event::EntryId;
use crate::headers::Headers;

/// Metadata field names start with this; an original field that starts with it too is
/// stored with it doubled (`@x` as `@@x`), so metadata never collides with user fields.
pub(crate) const META_PREFIX: &str = "@";
pub(crate) const META_ORIGIN_STREAM: &str = "@origin_stream";
pub(crate) const META_ORIGIN_ID: &str = "@origin_id";
pub(crate) const META_GROUP: &str = "@group";
pub(crate) const META_CONSUMER: &str = "@consumer";
pub(crate) const META_DELIVERY_COUNT: &str = "@delivery_count";
pub(crate) const META_REASON: &str = "@reason";
pub(crate) const META_ERROR: &str = "@error";
pub(crate) const META_FAILED_AT: &str = "@failed_at_ms";
/// The original fields of an entry too large to copy field by field (a Redis script can
/// pass at most about 8000 values to one command), packed into one value by
/// [`pack_fields`].
pub(crate) const META_PACKED_FIELDS: &str = "@fields";

/// Packs fields into one value: each name and value as its length in decimal, a `:`, and
/// its bytes, one after the other. The dead-letter script writes the same.
pub(crate) fn pack_fields(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut packed = Vec::new();
    for part in fields.iter().flat_map(|(name, value)| [name, value]) {
        packed.extend_from_slice(part.len().to_string().as_bytes());
        packed.push(b':');
        packed.extend_from_slice(part);
    }
    packed
}

/// The fields [`pack_fields`] packed; `None` when `packed` is not such a value.
pub(crate) fn unpack_fields(mut packed: &[u8]) -> Option<RawFields> {
    let mut parts = Vec::new();
    while !packed.is_empty() {
        let colon = packed.iter().position(|&b| b == b':')?;
        let len: usize = std::str::from_utf8(&packed[..colon]).ok()?.parse().ok()?;
        let rest = &packed[colon + 1..];
        parts.push(rest.get(..len)?.to_vec());
        packed = &rest[len..];
    }
    if parts.len() % 2 != 0 {
        return None;
    }
    let mut parts = parts.into_iter();
    let mut fields = Vec::new();
    while let (Some(name), Some(value)) = (parts.next(), parts.next()) {
        fields.push((name, value));
    }
    Some(fields)
}

/// Error texts are cut to this many bytes, so one huge error cannot bloat Redis.
pub(crate) const MAX_ERROR_LEN: usize = 1024;

/// The name of the dead-letter stream of `stream`: in `stream`'s Redis Cluster hash slot,
/// so the move of an entry can be one atomic script (see
/// [`key_in_slot_of`](crate::broker::key_in_slot_of): `{stream}<suffix>`, or
/// `stream<suffix>` for a stream with a tag of its own).
pub(crate) fn dead_letter_stream(stream: &str, suffix: &str) -> String {
    crate::broker::key_in_slot_of(stream, suffix)
}

/// Why an entry was dead-lettered.
///
/// Serializes as its [`as_str`](Self::as_str) text, e.g. `"timeout"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The entry does not decode into the handler's event type.
    Decode,
    /// The handler returned errors until the entry reached its most deliveries.
    Handler,
    /// The handler timed out until the entry reached its most deliveries.
    Timeout,
    /// The handler panicked until the entry reached its most deliveries.
    Panic,
    /// The handler returned [`HandlerError::permanent`](crate::HandlerError::permanent).
    Permanent,
}

impl DeadLetterReason {
    /// The reason as written to the `@reason` field.
    pub fn as_str(&self) -> &'static str {
        match self {
            DeadLetterReason::Decode => "decode",
            DeadLetterReason::Handler => "handler",
            DeadLetterReason::Timeout => "timeout",
            DeadLetterReason::Panic => "panic",
            DeadLetterReason::Permanent => "permanent",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "decode" => DeadLetterReason::Decode,
            "handler" => DeadLetterReason::Handler,
            "timeout" => DeadLetterReason::Timeout,
            "panic" => DeadLetterReason::Panic,
            "permanent" => DeadLetterReason::Permanent,
            _ => return None,
        })
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the bus writes next to the original fields when it dead-letters an entry.
pub(crate) struct DeadLetterMeta<'a> {
    pub(crate) origin_stream: &'a str,
    pub(crate) origin_id: EntryId,
    pub(crate) group: &'a str,
    pub(crate) consumer: &'a str,
    pub(crate) delivery_count: u64,
    pub(crate) reason: DeadLetterReason,
    pub(crate) error: &'a str,
}

impl DeadLetterMeta<'_> {
    /// The metadata fields, in the order they are written.
    pub(crate) fn fields(&self) -> Vec<(&'static str, String)> {
        let failed_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis();
        vec![
            (META_ORIGIN_STREAM, self.origin_stream.to_owned()),
            (META_ORIGIN_ID, self.origin_id.to_string()),
            (META_GROUP, self.group.to_owned()),
            (META_CONSUMER, self.consumer.to_owned()),
            (META_DELIVERY_COUNT, self.delivery_count.to_string()),
            (META_REASON, self.reason.as_str().to_owned()),
            (META_ERROR, truncate(self.error, MAX_ERROR_LEN)),
            (META_FAILED_AT, failed_at.to_string()),
        ]
    }
}

fn unix_millis<S: serde::Serializer>(
    at: &Option<SystemTime>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match at.map(|at| at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO)) {
        Some(since) => crate::inspect::millis(&since, serializer),
        None => serializer.serialize_none(),
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// One dead-lettered entry, with its metadata parsed.
///
/// Serializes (with `serde`) with ids as their `ms-seq` text, `failed_at` as
/// `failed_at_ms` (milliseconds since the Unix epoch), and `fields` as an object of text
/// values (bytes that are not UTF-8 replaced by `U+FFFD`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The id of the entry in the dead-letter stream.
    #[serde(serialize_with = "crate::inspect::id")]
    pub id: EntryId,
    /// The stream the entry came from.
    pub origin_stream: String,
    /// The id the entry had there.
    #[serde(serialize_with = "crate::inspect::optional_id")]
    pub origin_id: Option<EntryId>,
    /// The consumer group that gave up on it.
    pub group: String,
    /// The consumer that gave up on it.
    pub consumer: String,
    /// How often it had been delivered.
    pub delivery_count: u64,
    /// Why it was dead-lettered (`None` for a reason this version does not know).
    pub reason: Option<DeadLetterReason>,
    /// The last error, cut to about 1 KiB.
    pub error: String,
    /// When it was dead-lettered.
    #[serde(rename = "failed_at_ms", serialize_with = "unix_millis")]
    pub failed_at: Option<SystemTime>,
    /// The original fields, as they were in the origin stream: the event's fields (`@x`
    /// escaped as `@@x`) and its headers' (`@h.NAME`).
    #[serde(serialize_with = "crate::inspect::fields")]
    pub fields: Vec<(String, Vec<u8>)>,
}

impl DeadLetter {
    pub(crate) fn parse(id: EntryId, raw: RawFields) -> Self {
        let mut letter = DeadLetter {
            id,
            origin_stream: String::new(),
            origin_id: None,
            group: String::new(),
            consumer: String::new(),
            delivery_count: 0,
            reason: None,
            error: String::new(),
            failed_at: None,
            fields: Vec::new(),
        };
        for (name, value) in raw {
            let name = String::from_utf8_lossy(&name).into_owned();
            if let Some(original) = name.strip_prefix(META_PREFIX) {
                if original.starts_with(META_PREFIX) {
                    letter.fields.push((original.to_owned(), value));
                    continue;
                }
                if name == META_PACKED_FIELDS
                    && let Some(fields) = unpack_fields(&value)
                {
                    letter.fields.extend(
                        fields.into_iter().map(|(name, value)| {
                            (String::from_utf8_lossy(&name).into_owned(), value)
                        }),
                    );
                    continue;
                }
                let text = String::from_utf8_lossy(&value).into_owned();
                match name.as_str() {
                    META_ORIGIN_STREAM => letter.origin_stream = text,
                    META_ORIGIN_ID => letter.origin_id = text.parse().ok(),
                    META_GROUP => letter.group = text,
                    META_CONSUMER => letter.consumer = text,
                    META_DELIVERY_COUNT => letter.delivery_count = text.parse().unwrap_or(0),
                    META_REASON => letter.reason = DeadLetterReason::parse(&text),
                    META_ERROR => letter.error = text,
                    META_FAILED_AT => {
                        letter.failed_at = text
                            .parse()
                            .ok()
                            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
                    }
                    _ => {}
                }
            } else {
                letter.fields.push((name, value));
            }
        }
        letter
    }

    /// The headers the entry was published with (see [`Headers`]); a replay restores them.
    pub fn headers(&self) -> Headers {
        Headers::decode(
            self.fields
                .iter()
                .map(|(name, value)| (name.as_bytes(), value.as_slice())),
        )
    }

    /// The original field `name`, as stored in the origin stream, as text if it is UTF-8.
    /// An event's own field `@x` is stored as `@@x`, a header `h` as `@h.h`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// The dead letters of one stream: list, replay and purge them.
///
/// Get one with [`EventBus::dead_letters`](crate::EventBus::dead_letters).
#[derive(Clone)]
pub struct DeadLetters {
    broker: Arc<dyn Broker>,
    origin: String,
    stream: String,
    /// The partition count of `origin` when it is a partitioned stream's logical name,
    /// whose dead letters are per partition.
    partitions: Option<u32>,
}

impl fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetters")
            .field("origin", &self.origin)
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl DeadLetters {
    pub(crate) fn new(broker: Arc<dyn Broker>, origin: &str, suffix: &str) -> Self {
        DeadLetters {
            broker,
            origin: origin.to_owned(),
            stream: dead_letter_stream(origin, suffix),
            partitions: None,
        }
    }

    /// The dead letters asked for by the logical name of a stream of `partitions`
    /// partitions: every call fails with [`Error::PartitionedStream`].
    pub(crate) fn of_partitioned(mut self, partitions: u32) -> Self {
        self.partitions = Some(partitions);
        self
    }

    /// Fails for a partitioned stream's logical name, which has no dead letters of its own.
    fn whole(&self) -> Result<()> {
        match self.partitions {
            Some(partitions) => Err(Error::PartitionedStream {
                stream: self.origin.clone(),
                partitions,
            }),
            None => Ok(()),
        }
    }

    /// The name of the dead-letter stream, e.g. `{user.created}:dlq`.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The stream whose dead letters these are.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// How many dead letters there are.
    ///
    /// # Errors
    ///
    /// Redis errors, and [`Error::PartitionedStream`] for a partitioned stream's logical
    /// name.
    pub async fn len(&self) -> Result<u64> {
        self.whole()?;
        self.broker.stream_len(&self.stream).await
    }

    /// Whether there are none.
    ///
    /// # Errors
    ///
    /// Redis errors, and [`Error::PartitionedStream`] for a partitioned stream's logical
    /// name.
    pub async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }

    /// Up to `count` dead letters, oldest first, after `after` (exclusive; `None` for the
    /// first page). Pass the last id of a page to get the next one.
    ///
    /// # Errors
    ///
    /// Redis errors, and [`Error::PartitionedStream`] for a partitioned stream's logical
    /// name.
    pub async fn list(&self, after: Option<EntryId>, count: usize) -> Result<Vec<DeadLetter>> {
        self.whole()?;
        let entries = self
            .broker
            .range_after(&self.stream, after, count.max(1))
            .await?;
        Ok(entries
            .into_iter()
            .map(|(id, fields)| DeadLetter::parse(id, fields))
            .collect())
    }

    /// Dead letter `id`, or `None` when there is no such dead letter.
    ///
    /// # Errors
    ///
    /// Redis errors, and [`Error::PartitionedStream`] for a partitioned stream's logical
    /// name.
    pub async fn get(&self, id: EntryId) -> Result<Option<DeadLetter>> {
        self.whole()?;
        let before = match (id.millis(), id.seq()) {
            (0, 0) => None,
            (millis, 0) => Some(EntryId::new(millis - 1, u64::MAX)),
            (millis, seq) => Some(EntryId::new(millis, seq - 1)),
        };
        let mut page = self.broker.range_after(&self.stream, before, 1).await?;
        Ok(page
            .pop()
            .filter(|(found, _)| *found == id)
            .map(|(id, fields)| DeadLetter::parse(id, fields)))
    }

    /// Moves one dead letter back to its origin stream as a new entry (original fields
    /// only) and removes it from the dead-letter stream, atomically. Returns the new
    /// entry's id, or `None` when there is no dead letter `id`.
    ///
    /// # Errors
    ///
    /// Redis errors, and [`Error::PartitionedStream`] for a partitioned stream's logical
    /// name.
    pub async fn replay(&self, id: EntryId) -> Result<Option<EntryId>> {
        self.whole()?;
        self.broker.replay(&self.stream, &self.origin, id).await
    }

    /// Replays every dead letter there is when it starts, oldest first; returns how many
    /// were replayed.
    ///
    /// # Errors
    ///
    /// Redis errors (the dead letters replayed before the error stay replayed), and
    /// [`Error::PartitionedStream`] for a partitioned stream's logical name.
    pub async fn replay_all(&self) -> Result<usize> {
        self.whole()?;
        // The dead letters there are now, listed first: entries that fail again while this
        // runs come back under new ids, and must not be replayed again and again.
        let mut ids = Vec::new();
        let mut after = None;
        loop {
            let page = self.broker.range_after(&self.stream, after, 1000).await?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = Some(*last);
            ids.extend(page.into_iter().map(|(id, _)| id));
        }
        let mut replayed = 0;
        for id in ids {
            if self.replay(id).await?.is_some() {
                replayed += 1;
            }
        }
        Ok(replayed)
    }

    /// Deletes one dead letter; returns whether it existed.
    ///
    /// # Errors
    ///
    /// Redis errors, and [`Error::PartitionedStream`] for a partitioned stream's logical
    /// name.
    pub async fn purge(&self, id: EntryId) -> Result<bool> {
        self.whole()?;
        Ok(self.broker.delete(&self.stream, &[id]).await? > 0)
    }

    /// Deletes every dead letter of the stream.
    ///
    /// # Errors
    ///
    /// Redis errors, and [`Error::PartitionedStream`] for a partitioned stream's logical
    /// name.
    pub async fn purge_all(&self) -> Result<()> {
        self.whole()?;
        self.broker.delete_key(&self.stream).await
    }
}

/// Reports a failure to talk to Redis about dead letters; used by the broker. A `CROSSSLOT`
/// refusal names `keys`, the keys of the command: it is a configuration error, which no
/// retry heals.
pub(crate) fn dlq_error(
    action: &str,
    stream: &str,
    keys: &[&str],
    source: redis::RedisError,
) -> Error {
    if crate::error::server_code(&source).as_deref() == Some(crate::broker::CROSS_SLOT) {
        return Error::CrossSlot {
            keys: keys.iter().map(|key| (*key).to_owned()).collect(),
        };
    }
    Error::redis(format!("{action} dead-letter stream `{stream}`"), source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_fields_unpack_to_the_same_fields() {
        let fields: RawFields = vec![
            (b"user_id".to_vec(), b"u:1".to_vec()),
            (b"@tag".to_vec(), Vec::new()),
            (b"bin".to_vec(), vec![0, 58, 255, 10]),
        ];
        assert_eq!(unpack_fields(&pack_fields(&fields)), Some(fields));
        assert_eq!(unpack_fields(b""), Some(Vec::new()));
        assert_eq!(unpack_fields(b"3:abc"), None, "a name without a value");
        assert_eq!(unpack_fields(b"9:abc"), None, "cut short");
        assert_eq!(unpack_fields(b"x:abc"), None);
    }

    #[test]
    fn dead_letter_streams_share_the_hash_slot_of_their_origin() {
        assert_eq!(
            dead_letter_stream("user.created", ":dlq"),
            "{user.created}:dlq"
        );
        assert_eq!(
            dead_letter_stream("{user}.created", ":dlq"),
            "{user}.created:dlq"
        );
        // `{}` is no tag: Redis hashes the whole name, which no tag can hold (a tag ends at
        // the first `}`), so the tag is another name of the same slot.
        for stream in ["a{}b", "x}y", "}{", "{}"] {
            let dead_letters = dead_letter_stream(stream, ":dlq");
            assert_eq!(
                crate::broker::key_slot(dead_letters.as_bytes()),
                crate::broker::key_slot(stream.as_bytes()),
                "{dead_letters}"
            );
        }
    }

    #[test]
    fn metadata_is_parsed_and_escaped_user_fields_are_restored() {
        let raw: RawFields = vec![
            (b"user_id".to_vec(), b"7".to_vec()),
            (b"@@handle".to_vec(), b"@zo".to_vec()),
            (b"@origin_stream".to_vec(), b"user.created".to_vec()),
            (b"@origin_id".to_vec(), b"5-1".to_vec()),
            (b"@group".to_vec(), b"mailer".to_vec()),
            (b"@consumer".to_vec(), b"pod-1".to_vec()),
            (b"@delivery_count".to_vec(), b"5".to_vec()),
            (b"@reason".to_vec(), b"timeout".to_vec()),
            (b"@error".to_vec(), b"too slow".to_vec()),
            (b"@failed_at_ms".to_vec(), b"1000".to_vec()),
        ];
        let letter = DeadLetter::parse(EntryId::new(9, 0), raw);
        assert_eq!(letter.origin_stream, "user.created");
        assert_eq!(letter.origin_id, Some(EntryId::new(5, 1)));
        assert_eq!(letter.group, "mailer");
        assert_eq!(letter.consumer, "pod-1");
        assert_eq!(letter.delivery_count, 5);
        assert_eq!(letter.reason, Some(DeadLetterReason::Timeout));
        assert_eq!(letter.error, "too slow");
        assert_eq!(letter.failed_at, Some(UNIX_EPOCH + Duration::from_secs(1)));
        assert_eq!(letter.field("user_id"), Some("7"));
        assert_eq!(letter.field("@handle"), Some("@zo"));
    }

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let text = "é".repeat(600);
        let cut = truncate(&text, MAX_ERROR_LEN);
        assert!(cut.len() <= MAX_ERROR_LEN + "…".len());
        assert!(cut.ends_with('…'));
    }
}
