#![doc = include_str!("docs/crate.md")]

mod asyncapi;
mod batch;
mod broker;
mod bus;
mod codec;
mod config;
mod consumer;
mod context;
mod dead_letter;
mod emit;
mod error;
mod event;
mod handler;
mod headers;
mod health;
mod inspect;
mod lease;
mod listener;
mod middleware;
#[cfg(feature = "opentelemetry")]
mod otel;
mod partition;
mod publisher;
mod spans;
mod telemetry;
pub mod testing;
mod tls;

pub use crate::asyncapi::ASYNCAPI_ENV;
pub use crate::batch::{BatchHandler, BatchOutcome};
pub use crate::broker::memory::MemoryBroker;
pub use crate::bus::{EventBus, EventBusBuilder};
pub use crate::config::{EventBusConfig, StartFrom};
pub use crate::context::Context;
pub use crate::dead_letter::{DeadLetter, DeadLetterReason, DeadLetters};
pub use crate::emit::Emit;
pub use crate::error::{
    BoxError, DecodeError, Error, HandlerError, InvalidSetting, RedisSource, Result, Retry,
};
pub use crate::event::{EntryId, Event, ParseEntryIdError};
pub use crate::handler::{HandlerCall, Handlers, StreamHandler, StreamService};
pub use crate::headers::Headers;
pub use crate::health::{Health, StreamHealth};
pub use crate::inspect::{ConsumerStatus, GroupStatus, PendingEntry, StreamEntry, StreamStatus};
pub use crate::listener::{Listener, ShutdownHandle};
pub use crate::middleware::{AnyEvent, BusService, HandlerRequest, HandlerService, Layered};
pub use crate::partition::{partition_for_key, partition_stream};
pub use crate::publisher::Publisher;

/// Re-exported so that handler impls need no dependency of their own:
/// `#[slim_bus::async_trait]`.
pub use async_trait::async_trait;

/// The Redis client slim-bus is built on, re-exported so that
/// [`EventBusBuilder::client`] takes a `slim_bus::redis::Client` without a dependency of
/// your own (or with one of the same version).
pub use redis;

#[doc = include_str!("docs/macros/event.md")]
pub use slim_bus_derive::Event;
#[doc = include_str!("docs/macros/handlers.md")]
pub use slim_bus_derive::handlers;
#[doc = include_str!("docs/macros/stream.md")]
pub use slim_bus_derive::stream;

/// Items the macros' generated code uses. Not public API: may change in any release.
#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

/// The README's examples, compiled as doctests so that it keeps showing the real API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
