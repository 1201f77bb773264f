//! The `tracing` spans of deliveries and publishes, at the level the bus is configured with.
//!
//! Their fields are the OpenTelemetry messaging attributes. A span's level is part of its
//! static metadata in `tracing`, so each level has a callsite of its own here.

use tracing::{Level, Span};

use crate::event::EntryId;

/// Expands to the span `$name` with `$fields` at the runtime level `$level`.
macro_rules! span_at {
    ($level:expr, $name:literal, $($fields:tt)*) => {
        match $level {
            Level::ERROR => tracing::span!(Level::ERROR, $name, $($fields)*),
            Level::WARN => tracing::span!(Level::WARN, $name, $($fields)*),
            Level::INFO => tracing::span!(Level::INFO, $name, $($fields)*),
            Level::DEBUG => tracing::span!(Level::DEBUG, $name, $($fields)*),
            _ => tracing::span!(Level::TRACE, $name, $($fields)*),
        }
    };
}

/// The span one delivery runs in, which the handler's own events and spans nest under.
pub(crate) fn process_span(
    level: Level,
    stream: &str,
    group: &str,
    consumer: &str,
    id: EntryId,
    delivery_count: u64,
) -> Span {
    span_at!(
        level,
        "slim_bus.process",
        messaging.system = "redis",
        messaging.operation.type = "process",
        messaging.destination.name = stream,
        messaging.consumer.group.name = group,
        consumer = consumer,
        messaging.message.id = %id,
        delivery_count = delivery_count,
    )
}

/// The span one call of a batch handler runs in, for the `entries` entries it is given.
pub(crate) fn batch_process_span(
    level: Level,
    stream: &str,
    group: &str,
    consumer: &str,
    entries: usize,
) -> Span {
    span_at!(
        level,
        "slim_bus.process",
        messaging.system = "redis",
        messaging.operation.type = "process",
        messaging.destination.name = stream,
        messaging.consumer.group.name = group,
        consumer = consumer,
        messaging.batch.message_count = entries,
    )
}

/// The span of one publish call of `entries` entries; the entry id is recorded once known.
pub(crate) fn send_span(level: Level, stream: &str, entries: usize) -> Span {
    span_at!(
        level,
        "slim_bus.send",
        messaging.system = "redis",
        messaging.operation.type = "send",
        messaging.destination.name = stream,
        messaging.batch.message_count = entries,
        messaging.message.id = tracing::field::Empty,
    )
}
