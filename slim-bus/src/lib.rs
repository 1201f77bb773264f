#![doc = include_str!("docs/crate.md")]

mod broker;
mod bus;
mod codec;
mod config;
mod consumer;
mod context;
mod dead_letter;
mod error;
mod event;
mod handler;
mod health;
mod listener;

pub use crate::bus::{EventBus, EventBusBuilder};
pub use crate::config::{EventBusConfig, StartFrom};
pub use crate::context::Context;
pub use crate::dead_letter::{DeadLetter, DeadLetterReason, DeadLetters};
pub use crate::error::{BoxError, DecodeError, Error, HandlerError, Result, Retry};
pub use crate::event::{EntryId, Event, ParseEntryIdError};
pub use crate::handler::{Handlers, StreamHandler, StreamService};
pub use crate::health::{Health, StreamHealth};
pub use crate::listener::{Listener, ShutdownHandle};

/// Re-exported so that handler impls need no dependency of their own:
/// `#[slim_bus::async_trait]`.
pub use async_trait::async_trait;

/// Items the macros' generated code uses. Not public API: may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use async_trait::async_trait;
    pub use serde;
}
