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

    pub(crate) fn parse_bytes(bytes: &[u8]) -> Option<Self> {
        std::str::from_utf8(bytes).ok()?.parse().ok()
    }
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
        let (millis, seq) = s.split_once('-').ok_or_else(error)?;
        Ok(EntryId {
            millis: millis.parse().map_err(|_| error())?,
            seq: seq.parse().map_err(|_| error())?,
        })
    }
}

impl redis::ToRedisArgs for EntryId {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg_fmt(self)
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
