//! The crate's error type, and the error a handler returns.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::event::EntryId;

/// A boxed error that can cross tasks.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Everything that can go wrong in slim-bus outside of a handler.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting of the builder or of [`EventBusConfig`](crate::EventBusConfig) is invalid;
    /// `build()` reports every invalid setting in one error, the first here and the
    /// others in `also`.
    #[error("invalid setting `{setting}`: {reason}{}", also_invalid(.also))]
    Config {
        /// The name of the setting, as in [`EventBusConfig`](crate::EventBusConfig).
        setting: &'static str,
        /// What is wrong with it and what is expected instead.
        reason: String,
        /// The other invalid settings, in the order of [`EventBusConfig`](crate::EventBusConfig)'s
        /// checks; empty when only one is.
        also: Vec<InvalidSetting>,
    },

    /// Two handlers were registered on the same stream of one bus.
    #[error(
        "two handlers are registered on stream `{stream}` (`{first}` and `{second}`): a consumer group delivers each entry once, so use one handler per stream, or a second bus with its own consumer group"
    )]
    DuplicateHandler {
        /// The stream both handlers were registered on.
        stream: String,
        /// The type of the first handler.
        first: &'static str,
        /// The type of the second handler.
        second: &'static str,
    },

    /// A handler was registered whose event type names no stream, without an explicit stream.
    #[error(
        "handler `{handler}` has no stream: its event type names none, so register it with `handler_on(stream, handler)`"
    )]
    NoHandlerStream {
        /// The type of the handler.
        handler: &'static str,
    },

    /// [`EventBus::listen`](crate::EventBus::listen) was called on a bus without handlers.
    #[error(
        "the bus has no handlers: register at least one with `handler` or `handler_on` before listening"
    )]
    NoHandlers,

    /// [`EventBus::listen`](crate::EventBus::listen) was called while the bus is already listening.
    #[error("the bus is already listening: a bus runs at most one listener at a time")]
    AlreadyListening,

    /// An event type without a stream was published with [`EventBus::publish`](crate::EventBus::publish).
    #[error("event type `{event}` names no stream: publish it with `publish_to(stream, &event)`")]
    NoEventStream {
        /// The event type.
        event: &'static str,
    },

    /// A stream name is empty.
    #[error("stream names must not be empty")]
    EmptyStream,

    /// The dead letters of a partitioned stream were asked for by the stream's logical
    /// name: each partition has dead letters of its own.
    #[error(
        "stream `{stream}` is partitioned ({partitions} partitions, `{stream}:{{0}}` ...), and each partition has its own dead letters: ask for those of a partition, like `dead_letters(\"{stream}:{{0}}\")`"
    )]
    PartitionedStream {
        /// The logical stream.
        stream: String,
        /// How many partitions it has: `{stream}:{0}` to `{stream}:{partitions - 1}`.
        partitions: u32,
    },

    /// An event could not be turned into stream fields.
    #[error("cannot encode event for stream `{stream}`: {reason}")]
    Encode {
        /// The stream the event was meant for.
        stream: String,
        /// Why encoding failed, naming the field where one is known.
        reason: String,
    },

    /// A header name cannot be stored (see [`Headers`](crate::Headers) for what a name
    /// is made of); nothing was published.
    #[error("invalid header name `{name}`: {reason}")]
    InvalidHeader {
        /// The header name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A stream entry could not be decoded into the handler's event type.
    #[error(transparent)]
    Decode(#[from] DecodeError),

    /// The server runs an older Redis than slim-bus needs (7.0, for `XAUTOCLAIM` reporting
    /// deleted entries).
    #[error("the server at {addr} runs Redis {version}; slim-bus needs Redis {required} or newer")]
    UnsupportedServer {
        /// The server's address.
        addr: String,
        /// The `redis_version` it reports in `INFO server`.
        version: String,
        /// The oldest version slim-bus works with.
        required: &'static str,
    },

    /// Another live process listens under this consumer name in this group: two
    /// processes sharing a name would take each other's entries for their own.
    #[error(
        "consumer name `{consumer}` of group `{group}` is in use by another live process ({holder}): give each process its own consumer_name"
    )]
    ConsumerNameTaken {
        /// The consumer group.
        group: String,
        /// The consumer name.
        consumer: String,
        /// The process holding the name's lease: its pid and host.
        holder: String,
    },

    /// A key the bus uses as a stream (a stream it handles, or a dead-letter stream) holds
    /// another Redis type, so the bus cannot use it. The key named is the one that is
    /// wrong: the dead-letter stream, not its live stream, when that is the one.
    #[error("key `{stream}` holds a Redis {actual}, not a stream: delete or rename it")]
    WrongType {
        /// The key of the other type.
        stream: String,
        /// The Redis type found at the key.
        actual: String,
    },

    /// Redis Cluster refused (`CROSSSLOT`) a command or script whose keys are in different
    /// hash slots. The keys the bus derives from a stream are in its slot, so this comes
    /// from a configuration (a key named by hand, a cluster in front of a proxy that hashes
    /// otherwise); trying again cannot help.
    #[error(
        "keys {} are in different Redis Cluster hash slots, so one command cannot use them: give them a common hash tag",
        .keys.iter().map(|key| format!("`{key}`")).collect::<Vec<_>>().join(", ")
    )]
    CrossSlot {
        /// The keys of the refused command or script.
        keys: Vec<String>,
    },

    /// An inspected stream does not exist (its key is missing).
    #[error("stream `{stream}` does not exist")]
    StreamNotFound {
        /// The stream.
        stream: String,
    },

    /// An inspected consumer group does not exist on its stream.
    #[error("consumer group `{group}` does not exist on stream `{stream}`")]
    GroupNotFound {
        /// The stream.
        stream: String,
        /// The consumer group.
        group: String,
    },

    /// Redis could not be reached or answered with an error.
    ///
    /// The message says what the bus was doing; the Redis error is its
    /// [`source`](std::error::Error::source), which error reporters (`anyhow`, `tracing`)
    /// print after it.
    #[error("redis error while {action}")]
    Redis {
        /// What the bus was doing, e.g. "publishing to stream `user.created`".
        action: String,
        /// The error from the Redis client (a [`RedisSource`], which derefs to
        /// [`redis::RedisError`]).
        #[source]
        source: RedisSource,
    },

    /// Redis did not answer in time.
    #[error("redis did not answer within {timeout:?} while {action}")]
    Timeout {
        /// What the bus was doing.
        action: String,
        /// How long the bus waited.
        timeout: Duration,
    },

    /// A task of the bus failed in a way that is a bug in slim-bus.
    #[error("internal error: {detail}")]
    Internal {
        /// What failed.
        detail: String,
    },

    /// Redis answered with something the bus did not expect.
    #[error("unexpected reply from redis while {action}: {detail}")]
    UnexpectedReply {
        /// What the bus was doing.
        action: String,
        /// What was wrong with the reply.
        detail: String,
    },
}

/// The redis-rs error behind an [`Error::Redis`]; it derefs to [`redis::RedisError`].
///
/// A redis-rs error prints its cause (an I/O or a server error) as its own message and
/// also returns it as its source, so reporters that follow the chain (`anyhow`, the
/// `error.sources` of `tracing`) printed that cause twice. As a source this one skips that
/// repetition: each cause is printed once.
#[derive(Debug, Clone)]
pub struct RedisSource(redis::RedisError);

impl RedisSource {
    /// The redis-rs error.
    pub fn get_ref(&self) -> &redis::RedisError {
        &self.0
    }

    /// Takes the redis-rs error.
    pub fn into_inner(self) -> redis::RedisError {
        self.0
    }
}

impl std::ops::Deref for RedisSource {
    type Target = redis::RedisError;

    fn deref(&self) -> &redis::RedisError {
        &self.0
    }
}

impl fmt::Display for RedisSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for RedisSource {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        let cause = self.0.source()?;
        if cause.to_string() == self.0.to_string() {
            cause.source()
        } else {
            Some(cause)
        }
    }
}

/// One invalid setting, beyond the first, of an [`Error::Config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSetting {
    setting: &'static str,
    reason: String,
}

impl InvalidSetting {
    /// The name of the setting, as in [`EventBusConfig`](crate::EventBusConfig).
    pub fn setting(&self) -> &'static str {
        self.setting
    }

    /// What is wrong with it and what is expected instead.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for InvalidSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid setting `{}`: {}", self.setting, self.reason)
    }
}

fn also_invalid(also: &[InvalidSetting]) -> String {
    also.iter().map(|invalid| format!("; {invalid}")).collect()
}

/// The code of the server error inside `error` (`NOGROUP`, `WRONGTYPE`, ...), also when it
/// came back from a pipeline, where redis-rs reports no code of its own.
pub(crate) fn server_code(error: &redis::RedisError) -> Option<String> {
    if let Some(code) = error.code() {
        return Some(code.to_owned());
    }
    let errors = error.clone().into_server_errors()?;
    errors.first().map(|(_, server)| server.code().to_owned())
}

/// A shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The code of the Redis server error behind this error, if any.
    pub(crate) fn server_code(&self) -> Option<String> {
        match self {
            Error::Redis { source, .. } => server_code(source),
            _ => None,
        }
    }

    pub(crate) fn config(setting: &'static str, reason: impl Into<String>) -> Self {
        Error::Config {
            setting,
            reason: reason.into(),
            also: Vec::new(),
        }
    }

    /// One [`Error::Config`] for every invalid setting of `errors` (each an
    /// `Error::Config`; others are passed through first), or `Ok` when there is none.
    pub(crate) fn configs(errors: Vec<Error>) -> Result<()> {
        let mut invalid = Vec::new();
        for error in errors {
            match error {
                Error::Config {
                    setting,
                    reason,
                    also,
                } => {
                    invalid.push(InvalidSetting { setting, reason });
                    invalid.extend(also);
                }
                other => return Err(other),
            }
        }
        let mut invalid = invalid.into_iter();
        match invalid.next() {
            None => Ok(()),
            Some(first) => Err(Error::Config {
                setting: first.setting,
                reason: first.reason,
                also: invalid.collect(),
            }),
        }
    }

    pub(crate) fn redis(action: impl Into<String>, source: redis::RedisError) -> Self {
        Error::Redis {
            action: action.into(),
            source: RedisSource(source),
        }
    }
}

/// A stream entry that does not decode into the handler's event type.
///
/// Decoding can never succeed on a later attempt, so such entries are not retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode entry {entry_id} of stream `{stream}`{}: {reason}", field_suffix(.field))]
pub struct DecodeError {
    pub(crate) stream: String,
    pub(crate) entry_id: EntryId,
    pub(crate) field: Option<String>,
    pub(crate) reason: String,
}

fn field_suffix(field: &Option<String>) -> String {
    match field {
        Some(field) => format!(", field `{field}`"),
        None => String::new(),
    }
}

impl DecodeError {
    /// The stream the entry belongs to.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The id of the entry.
    pub fn entry_id(&self) -> EntryId {
        self.entry_id
    }

    /// The field that failed, when the failure belongs to one field.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }

    /// Why the entry did not decode.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// What should happen to an entry after its handler failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Retry {
    /// Leave it to the bus: the entry stays pending and is delivered again.
    Default,
    /// Deliver the entry again no earlier than after this delay.
    After(Duration),
    /// Never deliver the entry again: it can't succeed.
    Never,
}

/// The error a handler returns.
///
/// Any error type converts into it with `?` (anything that converts into
/// `Box<dyn Error + Send + Sync>`: `std` errors, `anyhow::Error`, `String`, `&str`).
/// By default a failed entry stays pending and is delivered again; [`HandlerError::retry_after`]
/// and [`HandlerError::permanent`] say otherwise.
///
/// `HandlerError` itself does not implement [`std::error::Error`], so that the blanket
/// conversion above can exist (the same trade-off as `anyhow::Error`); [`HandlerError::source_error`]
/// gives the error inside.
///
/// # Examples
///
/// ```
/// use slim_bus::HandlerError;
/// use std::time::Duration;
///
/// fn parse(input: &str) -> Result<u32, HandlerError> {
///     let value: u32 = input.parse()?; // any error converts
///     if value == 0 {
///         return Err(HandlerError::permanent("zero is never valid"));
///     }
///     if value > 100 {
///         return Err(HandlerError::retry_after(Duration::from_secs(5), "rate limited"));
///     }
///     Ok(value)
/// }
/// assert!(parse("x").is_err());
/// ```
pub struct HandlerError {
    source: BoxError,
    retry: Retry,
}

impl HandlerError {
    /// A failure with the default retry behaviour.
    pub fn new(error: impl Into<BoxError>) -> Self {
        HandlerError {
            source: error.into(),
            retry: Retry::Default,
        }
    }

    /// A failure after which the entry should be delivered again no earlier than `delay`.
    pub fn retry_after(delay: Duration, error: impl Into<BoxError>) -> Self {
        HandlerError {
            source: error.into(),
            retry: Retry::After(delay),
        }
    }

    /// A failure that can never succeed: the entry is not delivered again.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        HandlerError {
            source: error.into(),
            retry: Retry::Never,
        }
    }

    /// What the handler asked for.
    pub fn retry(&self) -> Retry {
        self.retry
    }

    /// The error inside.
    pub fn source_error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.source
    }

    /// Takes the error inside.
    pub fn into_source(self) -> BoxError {
        self.source
    }
}

impl<E: Into<BoxError>> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError::new(error)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("source", &self.source)
            .field("retry", &self.retry)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&report(&*self.source))
    }
}

/// `error` and every cause in its source chain, joined as error reporters join them, each
/// cause once: a redis-rs error prints its cause in its own message and also returns it
/// as its source, and a cause already in the text is not repeated.
pub(crate) fn report(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// What a caught panic said, if it said it with a string.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message of `error`'s chain, as error reporters join them.
    fn report(error: impl StdError + Send + Sync + 'static) -> String {
        format!("{:#}", anyhow::Error::new(error))
    }

    #[test]
    fn a_cause_a_message_already_holds_is_reported_once() {
        let server: redis::RedisError =
            redis::parse_redis_value(b"-WRONGPASS invalid username-password pair\r\n")
                .and_then(|value| value.extract_error())
                .expect_err("an error reply");
        let error = Error::redis("publishing to stream `user.created`", server);
        let text = super::report(&error);
        assert_eq!(
            text.matches("invalid username-password pair").count(),
            1,
            "{text}"
        );
        assert!(text.starts_with("redis error while publishing"), "{text}");

        #[derive(Debug, thiserror::Error)]
        #[error("the payment service failed: {0}")]
        struct Embeds(#[source] std::io::Error);
        let handler = HandlerError::new(Embeds(std::io::Error::other("connection reset")));
        assert_eq!(
            handler.to_string(),
            "the payment service failed: connection reset"
        );
    }

    #[test]
    fn a_reporter_prints_the_cause_of_a_redis_error_once() {
        let refused =
            || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused by peer");
        let error = Error::redis("publishing to stream `user.created`", refused().into());
        assert_eq!(
            error.to_string(),
            "redis error while publishing to stream `user.created`"
        );
        // redis-rs itself prints its I/O cause and also gives it as its source.
        let redis_alone = redis::RedisError::from(refused());
        assert_eq!(report(redis_alone).matches("refused by peer").count(), 2);
        let text = report(error);
        assert_eq!(
            text,
            "redis error while publishing to stream `user.created`: refused by peer"
        );
        let Error::Redis { source, .. } = Error::redis("pinging", refused().into()) else {
            unreachable!("a redis error")
        };
        assert!(
            source.is_connection_refusal(),
            "derefs to the redis-rs error"
        );
    }
}
