//! Batch handlers: the `BatchHandler` trait, its per-entry outcome, and the type-erased
//! form the consumer runs.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::broker::EntryFields;
use crate::codec::{self, CodecError};
use crate::context::Context;
use crate::error::{HandlerError, Retry};
use crate::event::Event;

/// Handles the entries of one stream several at a time, e.g. for bulk database writes:
/// up to [`max_batch`](Self::max_batch) decoded events with their contexts per call, and
/// one outcome per entry.
///
/// A batch is made of the entries of one stream that one read (or claim, or round of
/// retries) brought, split into batches of at most `max_batch`: the bus does not wait
/// for a batch to fill, so under a light load batches are small. Each entry is settled on
/// its own: acknowledged, retried with its own backoff or dead-lettered after its own
/// `max_deliveries`, as the outcome for it says. An entry that does not decode is
/// dead-lettered at once (reason `decode`) and the others go to the handler; an entry
/// deleted from the stream while pending is acknowledged without a call.
///
/// Limits: while a batch runs, each of its entries holds one of the bus's
/// `max_concurrent` handler slots (a batch of 50 holds 50) and its place among the
/// `max_in_flight` held entries, so a batch is never larger than `max_concurrent`
/// allows, and a bus whose slots all run batches reads no more. The handler timeout
/// (the bus's, or [`handler_timeout`](Self::handler_timeout)) is for the whole call: when
/// it passes, every entry of the batch timed out. Layers
/// ([`EventBusBuilder::layer`](crate::EventBusBuilder::layer)) do not apply to batch
/// handlers, and a batch handler returns no events to publish: publish through
/// [`Context::publisher`].
///
/// Register one with
/// [`EventBusBuilder::batch_handler`](crate::EventBusBuilder::batch_handler), or write it
/// as a function with `#[slim_bus::stream(batch = N)]`.
///
/// # Examples
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use slim_bus::{BatchHandler, BatchOutcome, Context};
///
/// #[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
/// #[event(stream = "page.viewed")]
/// struct PageViewed { page: String }
///
/// struct StoreViews;
///
/// #[slim_bus::async_trait]
/// impl BatchHandler for StoreViews {
///     type Event = PageViewed;
///
///     fn max_batch(&self) -> usize {
///         100
///     }
///
///     async fn handle_batch(&self, batch: Vec<(PageViewed, Context)>) -> BatchOutcome {
///         // One INSERT for the whole batch; an error fails (and retries) every entry.
///         let rows: Vec<String> = batch.into_iter().map(|(view, _)| view.page).collect();
///         let _ = rows;
///         BatchOutcome::ok()
///     }
/// }
/// ```
#[async_trait::async_trait]
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a batch handler",
    label = "not a batch handler",
    note = "implement `slim_bus::BatchHandler` for it, or put `#[slim_bus::stream(batch = N)]` on an async fn taking `Vec<(MyEvent, slim_bus::Context)>`",
    note = "a handler of one entry at a time registers with `.handler(...)`"
)]
pub trait BatchHandler: Send + Sync + 'static {
    /// The event type entries are decoded into.
    type Event: Event;

    /// The most entries in one call; at least 1.
    fn max_batch(&self) -> usize;

    /// Handles one delivery of each entry of `batch` (in stream order within each read),
    /// returning one outcome per entry.
    async fn handle_batch(&self, batch: Vec<(Self::Event, Context)>) -> BatchOutcome;

    /// The stream this handler reads, when it is not the event type's own stream.
    fn stream(&self) -> Option<&str> {
        None
    }

    /// How many failed deliveries an entry gets before it is dead-lettered, when not the
    /// bus's `max_deliveries`.
    fn max_deliveries(&self) -> Option<u64> {
        None
    }

    /// How long one call may take, when not the bus's `handler_timeout`; it may be longer
    /// than `claim_min_idle`, as the bus's may.
    fn handler_timeout(&self) -> Option<Duration> {
        None
    }
}

/// What became of each entry of a batch: see [`BatchHandler::handle_batch`].
///
/// `Ok` acknowledges an entry; an error retries it or dead-letters it as the error's
/// [`Retry`] and the entry's delivery count say, exactly as for a single handler.
#[derive(Debug)]
#[must_use]
pub struct BatchOutcome(Outcomes);

#[derive(Debug)]
enum Outcomes {
    All(Result<(), HandlerError>),
    Each(Vec<Result<(), HandlerError>>),
}

impl BatchOutcome {
    /// Every entry succeeded.
    pub fn ok() -> Self {
        BatchOutcome(Outcomes::All(Ok(())))
    }

    /// Every entry failed with `error` (e.g. the bulk write failed).
    pub fn failed(error: impl Into<HandlerError>) -> Self {
        BatchOutcome(Outcomes::All(Err(error.into())))
    }

    /// One outcome per entry, in the order of the batch. An entry without an outcome
    /// (a shorter list) counts as failed, with an error that says so, and is retried;
    /// outcomes past the last entry are ignored.
    pub fn each(outcomes: Vec<Result<(), HandlerError>>) -> Self {
        BatchOutcome(Outcomes::Each(outcomes))
    }

    /// One outcome per entry of a batch of `len`.
    pub(crate) fn into_outcomes(self, len: usize) -> Vec<Result<(), HandlerError>> {
        match self.0 {
            Outcomes::All(Ok(())) => (0..len).map(|_| Ok(())).collect(),
            Outcomes::All(Err(error)) => {
                let mut outcomes: Vec<_> = (1..len).map(|_| Err(same_error(&error))).collect();
                outcomes.insert(0, Err(error));
                outcomes.truncate(len);
                outcomes
            }
            Outcomes::Each(mut outcomes) => {
                let given = outcomes.len();
                if given > len {
                    tracing::warn!(
                        outcomes = given,
                        entries = len,
                        "a batch handler returned more outcomes than its batch has entries; ignoring the rest"
                    );
                }
                outcomes.truncate(len);
                outcomes.extend((given..len).map(|_| {
                    Err(HandlerError::new(format!(
                        "the batch handler returned {given} outcomes for {len} entries, none for this one"
                    )))
                }));
                outcomes
            }
        }
    }
}

impl<E: Into<HandlerError>> From<Result<(), E>> for BatchOutcome {
    fn from(result: Result<(), E>) -> Self {
        BatchOutcome(Outcomes::All(result.map_err(Into::into)))
    }
}

impl<E: Into<HandlerError>> From<Vec<Result<(), E>>> for BatchOutcome {
    fn from(outcomes: Vec<Result<(), E>>) -> Self {
        BatchOutcome::each(
            outcomes
                .into_iter()
                .map(|outcome| outcome.map_err(Into::into))
                .collect(),
        )
    }
}

/// An error with the message and retry decision of `error`, for another entry.
fn same_error(error: &HandlerError) -> HandlerError {
    let text = error.to_string();
    match error.retry() {
        Retry::Never => HandlerError::permanent(text),
        Retry::After(delay) => HandlerError::retry_after(delay, text),
        _ => HandlerError::new(text),
    }
}

pub(crate) type BatchFuture<'a> = Pin<Box<dyn Future<Output = BatchOutcome> + Send + 'a>>;

/// A batch handler with its event type erased. Decoding happens here, in the batch's task.
pub(crate) trait ErasedBatchHandler: Send + Sync + 'static {
    fn max_batch(&self) -> usize;

    fn max_deliveries(&self) -> Option<u64>;

    fn handler_timeout(&self) -> Option<Duration>;

    /// Decodes each entry and calls the handler with those that decode, in order. One
    /// decode error (or `None`) per entry, and the call, when any entry decoded.
    fn call<'a>(
        &'a self,
        entries: Vec<(&EntryFields, Context)>,
    ) -> (Vec<Option<CodecError>>, Option<BatchFuture<'a>>);
}

pub(crate) struct TypedBatch<H>(pub(crate) H);

impl<H: BatchHandler> ErasedBatchHandler for TypedBatch<H> {
    fn max_batch(&self) -> usize {
        self.0.max_batch()
    }

    fn max_deliveries(&self) -> Option<u64> {
        self.0.max_deliveries()
    }

    fn handler_timeout(&self) -> Option<Duration> {
        self.0.handler_timeout()
    }

    fn call<'a>(
        &'a self,
        entries: Vec<(&EntryFields, Context)>,
    ) -> (Vec<Option<CodecError>>, Option<BatchFuture<'a>>) {
        let mut errors = Vec::with_capacity(entries.len());
        let mut batch = Vec::with_capacity(entries.len());
        for (fields, ctx) in entries {
            match codec::from_pairs::<H::Event>(fields.pairs()) {
                Ok(event) => {
                    errors.push(None);
                    batch.push((event, ctx));
                }
                Err(error) => errors.push(Some(error)),
            }
        }
        let call = (!batch.is_empty()).then(|| self.0.handle_batch(batch));
        (errors, call)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(outcomes: Vec<Result<(), HandlerError>>) -> Vec<String> {
        outcomes
            .into_iter()
            .map(|outcome| match outcome {
                Ok(()) => "ok".to_owned(),
                Err(error) => error.to_string(),
            })
            .collect()
    }

    #[test]
    fn a_whole_outcome_applies_to_every_entry_with_its_retry_decision() {
        assert_eq!(texts(BatchOutcome::ok().into_outcomes(3)), ["ok"; 3]);
        let outcomes = BatchOutcome::failed(HandlerError::permanent("db down")).into_outcomes(2);
        assert!(
            outcomes
                .iter()
                .all(|o| o.as_ref().is_err_and(|e| e.retry() == Retry::Never))
        );
        assert_eq!(texts(outcomes), ["db down"; 2]);
        assert!(BatchOutcome::failed("x").into_outcomes(0).is_empty());
    }

    #[test]
    fn missing_outcomes_are_failures_and_extra_ones_are_ignored() {
        let short = BatchOutcome::each(vec![Ok(()), Err(HandlerError::new("bad"))]);
        assert_eq!(
            texts(short.into_outcomes(3)),
            [
                "ok",
                "bad",
                "the batch handler returned 2 outcomes for 3 entries, none for this one"
            ]
        );
        let long = BatchOutcome::from(vec![Ok::<(), String>(()), Ok(()), Err("extra".into())]);
        assert_eq!(texts(long.into_outcomes(2)), ["ok", "ok"]);
    }
}
