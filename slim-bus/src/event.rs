//! The `Event` trait and stream entry ids.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A typed event: a serde struct whose fields become the fields of one stream entry.
///
/// `STREAM` is the stream the event is published to and handled from. An event type
/// without one (`None`) is published with [`EventBus::publish_to`](crate::EventBus::publish_to)
/// and handled with [`EventBusBuilder::handler_on`](crate::EventBusBuilder::handler_on).
/// See the crate docs for how fields are written to the stream.
///
/// # Examples
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize)]
/// struct UserCreated {
///     user_id: String,
///     user_name: String,
/// }
///
/// impl slim_bus::Event for UserCreated {
///     const STREAM: Option<&'static str> = Some("user.created");
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an event",
    label = "not a slim-bus event",
    note = "derive it with `#[derive(Serialize, Deserialize, slim_bus::Event)]` and name its stream with `#[event(stream = \"...\")]`"
)]
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stream this event is published to, if it has one of its own.
    const STREAM: Option<&'static str>;

    /// A cap on the length of [`STREAM`](Event::STREAM), applied as each event of this type
    /// is published (`XADD ... MAXLEN ~ N`): the oldest entries are deleted, whether every
    /// consumer group has handled them or not. `None` (the default): no cap.
    /// [`EventBusBuilder::stream_max_len`](crate::EventBusBuilder::stream_max_len) sets
    /// another one for the stream; see the README's "Retention" for the group-aware way.
    ///
    /// `#[derive(Event)]` sets it with `#[event(stream = "...", max_len = N)]`.
    const MAX_LEN: Option<usize> = None;

    /// The number of partitions of [`STREAM`](Event::STREAM), when it is a partitioned
    /// stream: one logical stream stored as the Redis streams `STREAM:{0}` ...
    /// `STREAM:{N-1}` (see the README's "Partitioned streams"). `None` (the default): one
    /// Redis stream. Must be at least 1.
    /// [`EventBusBuilder::stream_partitions`](crate::EventBusBuilder::stream_partitions)
    /// sets it for a stream on the bus; the two must agree.
    ///
    /// `#[derive(Event)]` sets it with `#[event(stream = "...", partitions = N)]`.
    const PARTITIONS: Option<u32> = None;

    /// The name of the field whose value picks the partition of a partitioned stream, as
    /// it is stored in the entry (after serde's renames): events with the same value go
    /// to the same partition ([`partition_for_key`](crate::partition_for_key)). `None`
    /// (the default): publishes take the partitions in turn.
    ///
    /// `#[derive(Event)]` sets it with `#[event(key = "order_id")]`, naming a field.
    const PARTITION_KEY: Option<&'static str> = None;
}

/// Untyped events: every field as text, for streams whose shape is not known in advance,
/// like the `map[string]interface{}` of the Go original.
impl Event for std::collections::HashMap<String, String> {
    const STREAM: Option<&'static str> = None;
}

/// Untyped events, ordered by field name.
impl Event for std::collections::BTreeMap<String, String> {
    const STREAM: Option<&'static str> = None;
}

/// The id of a stream entry, `<milliseconds>-<sequence>` as Redis writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EntryId {
    millis: u64,
    seq: u64,
}

impl EntryId {
    /// The smallest id, `0-0`.
    pub const MIN: EntryId = EntryId { millis: 0, seq: 0 };

    /// An id from its two parts.
    pub const fn new(millis: u64, seq: u64) -> Self {
        EntryId { millis, seq }
    }

    /// The milliseconds part: the Unix time at which Redis added the entry, for generated ids.
    pub const fn millis(&self) -> u64 {
        self.millis
    }

    /// The sequence part: which entry within that millisecond.
    pub const fn seq(&self) -> u64 {
        self.seq
    }

    /// Parses `<u64>-<u64>` straight from a reply's bytes; the consumer does this for
    /// every entry it reads.
    pub(crate) fn parse_bytes(bytes: &[u8]) -> Option<Self> {
        let dash = bytes.iter().position(|&b| b == b'-')?;
        Some(EntryId {
            millis: parse_u64(&bytes[..dash])?,
            seq: parse_u64(&bytes[dash + 1..])?,
        })
    }

    /// Writes the id as Redis does, without going through `core::fmt`: acks write every
    /// handled entry's id.
    fn write_ascii(&self, buffer: &mut [u8; 41]) -> usize {
        let (mut millis, mut seq) = (itoa::Buffer::new(), itoa::Buffer::new());
        let (millis, seq) = (
            millis.format(self.millis).as_bytes(),
            seq.format(self.seq).as_bytes(),
        );
        let end = millis.len() + 1 + seq.len();
        buffer[..millis.len()].copy_from_slice(millis);
        buffer[millis.len()] = b'-';
        buffer[millis.len() + 1..end].copy_from_slice(seq);
        end
    }
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    digits.iter().try_fold(0u64, |value, &digit| {
        if !digit.is_ascii_digit() {
            return None;
        }
        value.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.millis, self.seq)
    }
}

/// The error of parsing an [`EntryId`] from text that is not `<u64>-<u64>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not a stream entry id (expected `<milliseconds>-<sequence>`)")]
pub struct ParseEntryIdError {
    input: String,
}

impl FromStr for EntryId {
    type Err = ParseEntryIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = || ParseEntryIdError {
            input: s.to_owned(),
        };
        EntryId::parse_bytes(s.as_bytes()).ok_or_else(error)
    }
}

impl redis::ToRedisArgs for EntryId {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        let mut buffer = [0u8; 41];
        let len = self.write_ascii(&mut buffer);
        out.write_arg(&buffer[..len]);
    }
}

impl redis::ToSingleRedisArg for EntryId {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_parse_print_and_order_like_redis() {
        let id: EntryId = "1526919030474-55".parse().expect("valid id");
        assert_eq!(id, EntryId::new(1_526_919_030_474, 55));
        assert_eq!(id.to_string(), "1526919030474-55");
        for id in [id, EntryId::new(0, 0), EntryId::new(u64::MAX, u64::MAX)] {
            let args = redis::ToRedisArgs::to_redis_args(&id);
            assert_eq!(
                args,
                vec![id.to_string().into_bytes()],
                "as a command argument"
            );
        }
        assert!(EntryId::new(5, 10) < EntryId::new(6, 0));
        assert!(EntryId::new(5, 9) < EntryId::new(5, 10));
        for bad in [
            "",
            "12",
            "12-",
            "-1",
            "a-1",
            "1-2-3",
            "18446744073709551616-0",
        ] {
            assert!(bad.parse::<EntryId>().is_err(), "{bad:?} parsed");
        }
    }
}
