//! Items the macros' generated code uses. Not public API: may change in any release.
//!
//! Generated code names everything through this module (`::slim_bus::__private::...`), so
//! users need no imports of their own and no direct dependency on `async-trait`.

use std::future::Future;
use std::pin::Pin;

pub use async_trait::async_trait;
pub use serde;

pub use crate::batch::{BatchHandler, BatchOutcome};
pub use crate::context::Context;
pub use crate::emit::Emit;
pub use crate::error::HandlerError;
pub use crate::event::Event;
pub use crate::handler::{HandlerCall, Handlers, StreamHandler, StreamService};

/// Every key the bus keeps next to `stream` for consumer group `group` (its dead letters
/// with suffix `dead_letter_suffix`, their trimmed count, the due times of retries), for
/// tests that hold them to the stream's Redis Cluster hash slot.
pub fn keys_next_to_stream(stream: &str, dead_letter_suffix: &str, group: &str) -> Vec<String> {
    crate::broker::keys_next_to(stream, dead_letter_suffix, group)
}

/// A type `#[derive(Event)]` is given must derive `Serialize`; this says so when it does
/// not. The bound alone would be reported as one of `Event`'s supertraits, which rustc
/// calls "sealed" (serde_core, where it lives, is out of the user's reach).
#[diagnostic::on_unimplemented(
    message = "`{Self}` derives `slim_bus::Event` but not `serde::Serialize`",
    label = "an event needs `Serialize`",
    note = "an event's fields are written to stream entries with serde: derive `Serialize` and `Deserialize` too, `#[derive(serde::Serialize, serde::Deserialize, slim_bus::Event)]`"
)]
pub trait EventSerialize {}

impl<T: serde::Serialize> EventSerialize for T {}

/// As [`EventSerialize`], for `Deserialize`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` derives `slim_bus::Event` but not `serde::Deserialize`",
    label = "an event needs `Deserialize`",
    note = "an event's fields are read from stream entries with serde: derive `Serialize` and `Deserialize` too, `#[derive(serde::Serialize, serde::Deserialize, slim_bus::Event)]`"
)]
pub trait EventDeserialize {}

impl<T: serde::de::DeserializeOwned> EventDeserialize for T {}

/// Compiles only for a type that implements `Serialize`, else fails with
/// [`EventSerialize`]'s message.
pub const fn event_derives_serialize<T: EventSerialize>() {}

/// Compiles only for a type that implements `Deserialize`, else fails with
/// [`EventDeserialize`]'s message.
pub const fn event_derives_deserialize<T: EventDeserialize>() {}

/// What a handler function may return: `()`, or `Result<T, E>` for any error that
/// converts into [`HandlerError`] (so `HandlerError` itself, std errors, `anyhow::Error`,
/// `String`, `&str`) and a `T` that says which events to publish ([`IntoEmit`]: `()`,
/// an event, an `Option` or a `Vec` of events, or an [`Emit`]).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a handler's return type",
    label = "a slim-bus handler returns `()`, `Result<(), E>`, or `Result<T, E>` with events to publish",
    note = "return `Result<(), E>` with any error that converts into `Box<dyn Error + Send + Sync>` (std errors, `anyhow::Error`, `String`), or `slim_bus::HandlerError` for retry-later / give-up outcomes",
    note = "to publish events before the entry is acknowledged, return them as `Result<MyEvent, E>`, `Result<Option<MyEvent>, E>`, `Result<Vec<MyEvent>, E>` or `Result<slim_bus::Emit, E>`"
)]
pub trait IntoHandlerResult {
    /// The outcome as the runtime sees it.
    fn into_handler_result(self) -> Result<Emit, HandlerError>;
}

impl IntoHandlerResult for () {
    fn into_handler_result(self) -> Result<Emit, HandlerError> {
        Ok(Emit::new())
    }
}

impl<T: IntoEmit, E: Into<HandlerError>> IntoHandlerResult for Result<T, E> {
    fn into_handler_result(self) -> Result<Emit, HandlerError> {
        self.map_err(Into::into)?.into_emit()
    }
}

/// What a handler's `Ok` may hold: nothing to publish (`()`), or events to publish before
/// the entry is acknowledged.
#[diagnostic::on_unimplemented(
    message = "a handler can't return `{Self}` in its `Ok`",
    label = "not `()` or events to publish",
    note = "return `Ok(())`, or the events to publish before the entry is acknowledged: an event type (`#[derive(slim_bus::Event)]` with a stream), an `Option` or `Vec` of one, or a `slim_bus::Emit`"
)]
pub trait IntoEmit {
    /// The events, encoded; an event that does not encode fails the attempt for good.
    fn into_emit(self) -> Result<Emit, HandlerError>;
}

impl IntoEmit for () {
    fn into_emit(self) -> Result<Emit, HandlerError> {
        Ok(Emit::new())
    }
}

impl IntoEmit for Emit {
    fn into_emit(self) -> Result<Emit, HandlerError> {
        Ok(self)
    }
}

impl<T: Event> IntoEmit for T {
    fn into_emit(self) -> Result<Emit, HandlerError> {
        Some(self).into_emit()
    }
}

impl<T: Event> IntoEmit for Option<T> {
    fn into_emit(self) -> Result<Emit, HandlerError> {
        let mut emit = Emit::new();
        if let Some(event) = self {
            emit.push(&event).map_err(HandlerError::permanent)?;
        }
        Ok(emit)
    }
}

impl<T: Event> IntoEmit for Vec<T> {
    fn into_emit(self) -> Result<Emit, HandlerError> {
        let mut emit = Emit::new();
        for event in &self {
            emit.push(event).map_err(HandlerError::permanent)?;
        }
        Ok(emit)
    }
}

/// What a batch handler function may return: `()` (every entry succeeded),
/// `Result<(), E>` (for every entry), `Vec<Result<(), E>>` (one per entry, in order), or a
/// [`BatchOutcome`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a batch handler's return type",
    label = "a slim-bus batch handler returns `()`, `Result<(), E>`, `Vec<Result<(), E>>` or `slim_bus::BatchOutcome`",
    note = "`Result<(), E>` is the outcome of every entry; `Vec<Result<(), E>>` has one per entry, in the order of the batch"
)]
pub trait IntoBatchOutcome {
    /// The outcome as the runtime sees it.
    fn into_batch_outcome(self) -> BatchOutcome;
}

impl IntoBatchOutcome for () {
    fn into_batch_outcome(self) -> BatchOutcome {
        BatchOutcome::ok()
    }
}

impl IntoBatchOutcome for BatchOutcome {
    fn into_batch_outcome(self) -> BatchOutcome {
        self
    }
}

impl<E: Into<HandlerError>> IntoBatchOutcome for Result<(), E> {
    fn into_batch_outcome(self) -> BatchOutcome {
        self.into()
    }
}

impl<E: Into<HandlerError>> IntoBatchOutcome for Vec<Result<(), E>> {
    fn into_batch_outcome(self) -> BatchOutcome {
        self.into()
    }
}

/// Turns a batch handler's return value into the runtime's outcome.
pub fn into_batch_outcome<R: IntoBatchOutcome>(result: R) -> BatchOutcome {
    result.into_batch_outcome()
}

/// As [`handler_needs_a_stream`], for a batch handler.
#[track_caller]
pub const fn batch_handler_needs_a_stream<H: BatchHandler>(message: &'static str) {
    if <H::Event as Event>::STREAM.is_none() {
        panic!("{}", message);
    }
}

/// A handler's optional second argument. Only [`Context`] is one; the trait exists so that
/// a wrong type gets an error on the argument itself rather than a type mismatch in
/// generated code.
#[diagnostic::on_unimplemented(
    message = "a handler's second argument must be `slim_bus::Context`, not `{Self}`",
    label = "not `slim_bus::Context`",
    note = "a handler takes the event, optionally followed by `ctx: slim_bus::Context`; keep other state in a `#[slim_bus::handlers]` service struct"
)]
pub trait HandlerContext: Sized {
    /// The argument, made from the delivery's context.
    fn from_context(ctx: Context) -> Self;
}

impl HandlerContext for Context {
    fn from_context(ctx: Context) -> Self {
        ctx
    }
}

/// Boxes a handler's future, requiring it to be `Send` where the macro put the call (on
/// the handler's name), so a non-`Send` handler gets one error there, naming this
/// function. The result's type does not mention the future's, so the bound is not
/// checked again, with more errors, wherever the result is used.
pub fn handler_future_must_be_send<'a, T, F>(
    future: F,
) -> Pin<Box<dyn Future<Output = T> + Send + 'a>>
where
    F: Future<Output = T> + Send + 'a,
{
    Box::pin(future)
}

/// Turns a handler's return value into the runtime's outcome.
pub fn into_handler_result<R: IntoHandlerResult>(result: R) -> Result<Emit, HandlerError> {
    result.into_handler_result()
}

/// Fails the build with `message` when the handler `H` reads no stream: its attribute
/// names none (else this is not called) and neither does its event type. Generic, so an
/// event type that is not an `Event` is reported on the handler's impl alone.
#[track_caller]
pub const fn handler_needs_a_stream<H: StreamHandler>(message: &'static str) {
    if <H::Event as Event>::STREAM.is_none() {
        panic!("{}", message);
    }
}

/// Fails the build with `message` when the handlers `A` and `B` of one service read the
/// same stream: the one their attribute names (`a`, `b`), else their event type's.
#[track_caller]
pub const fn distinct_streams<A: StreamHandler, B: StreamHandler>(
    a: Option<&str>,
    b: Option<&str>,
    message: &'static str,
) {
    let a = match a {
        Some(stream) => Some(stream),
        None => <A::Event as Event>::STREAM,
    };
    let b = match b {
        Some(stream) => Some(stream),
        None => <B::Event as Event>::STREAM,
    };
    if same_stream(a, b) {
        panic!("{}", message);
    }
}

/// Whether two handlers read the same stream; a missing stream matches nothing (it is
/// reported on its own).
pub const fn same_stream(a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            let (a, b) = (a.as_bytes(), b.as_bytes());
            if a.len() != b.len() {
                return false;
            }
            let mut i = 0;
            while i < a.len() {
                if a[i] != b[i] {
                    return false;
                }
                i += 1;
            }
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Custom;

    impl std::fmt::Display for Custom {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("custom failure")
        }
    }

    impl std::error::Error for Custom {}

    #[test]
    fn handler_return_values_become_outcomes() {
        assert!(into_handler_result(()).is_ok());
        assert!(into_handler_result(Ok::<(), Custom>(())).is_ok());

        let error = into_handler_result(Err::<(), _>(Custom)).expect_err("an error");
        assert_eq!(error.to_string(), "custom failure");
        assert_eq!(error.retry(), crate::Retry::Default);

        let error = into_handler_result(Err::<(), _>("plain text")).expect_err("an error");
        assert_eq!(error.to_string(), "plain text");
    }

    #[test]
    fn handler_errors_keep_their_retry_decision() {
        let delay = std::time::Duration::from_secs(3);
        let error = into_handler_result(Err::<(), _>(HandlerError::retry_after(delay, Custom)))
            .expect_err("an error");
        assert_eq!(error.retry(), crate::Retry::After(delay));

        let error = into_handler_result(Err::<(), _>(HandlerError::permanent(Custom)))
            .expect_err("an error");
        assert_eq!(error.retry(), crate::Retry::Never);
    }

    #[test]
    fn streams_match_by_name_and_missing_streams_match_nothing() {
        // Usable where generated code uses it: in constants.
        const { assert!(same_stream(Some("user.created"), Some("user.created"))) };
        assert!(!same_stream(Some("user.created"), Some("user.deleted")));
        assert!(!same_stream(Some("user"), Some("user.created")));
        assert!(!same_stream(None, Some("user.created")));
        assert!(!same_stream(None, None));
    }

    #[tokio::test]
    async fn required_send_futures_pass_their_output_through() {
        let output = handler_future_must_be_send(async { 7 }).await;
        assert_eq!(output, 7);
    }
}
