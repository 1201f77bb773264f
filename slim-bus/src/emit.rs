//! Events a handler returns, published before its entry is acknowledged.

use serde::Serialize;

use crate::codec::{self, EncodedField};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::partition::Declared;

/// Events a handler returns to have them published before its entry is acknowledged.
///
/// The bus publishes them after the handler returned `Ok` and before it acknowledges the
/// entry, all of them together (one publish per target stream, sent at once so that they
/// share the publisher's pipeline). A failed publish fails the attempt: the entry is not
/// acknowledged and is retried like after a handler error, so it is never acknowledged
/// without its events.
///
/// # At least once
///
/// A crash (or a lost acknowledgement) between the publish and the ack delivers the entry
/// again, and its handler's events are published again. Make them idempotent for their
/// consumers, e.g. carry the id of the entry that caused them
/// ([`Context::entry_id`](crate::Context::entry_id)).
///
/// A `#[slim_bus::stream]` function or `#[slim_bus::handlers]` method returns events as
/// `Result<E, _>`, `Result<Option<E>, _>`, `Result<Vec<E>, _>` for an event type `E`, or
/// `Result<Emit, _>` for events of several types; a [`StreamHandler`](crate::StreamHandler)
/// implementation returns one from
/// [`handle_and_emit`](crate::StreamHandler::handle_and_emit) (an `async` block in a
/// [`HandlerCall`](crate::HandlerCall)).
///
/// # Examples
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
/// # #[event(stream = "order.placed")]
/// # struct OrderPlaced { order_id: String }
/// # #[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
/// # #[event(stream = "invoice.requested")]
/// # struct InvoiceRequested { order_id: String }
/// # #[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
/// # #[event(stream = "stock.reserved")]
/// # struct StockReserved { order_id: String }
/// use slim_bus::Emit;
///
/// #[slim_bus::stream]
/// async fn on_order_placed(order: OrderPlaced) -> slim_bus::Result<Emit> {
///     let mut emit = Emit::new();
///     emit.push(&InvoiceRequested { order_id: order.order_id.clone() })?
///         .push(&StockReserved { order_id: order.order_id })?;
///     Ok(emit)
/// }
/// ```
#[derive(Debug, Default)]
#[must_use = "events are published only when the handler returns them"]
pub struct Emit {
    /// Each event's stream, what its event type declares about the stream (its cap,
    /// partitions and key), and fields.
    entries: Vec<EmittedEntry>,
}

impl Emit {
    /// No events.
    pub fn new() -> Self {
        Emit::default()
    }

    /// Adds `event`, to be published to its stream ([`Event::STREAM`]); to one of its
    /// partitions when the stream is partitioned, as [`EventBus::publish`](crate::EventBus::publish) picks it.
    ///
    /// # Errors
    ///
    /// [`Error::NoEventStream`] when the event type names no stream, [`Error::Encode`]
    /// when the event does not serialize into stream fields (or into none).
    pub fn push<E: Event>(&mut self, event: &E) -> Result<&mut Self> {
        let stream = E::STREAM.ok_or(Error::NoEventStream {
            event: std::any::type_name::<E>(),
        })?;
        self.push_declared(stream, Declared::of::<E>(), event)
    }

    /// Adds `event`, to be published to `stream`; to one of its partitions in turn when
    /// the bus knows `stream` as partitioned, as [`EventBus::publish_to`](crate::EventBus::publish_to) does.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyStream`] for an empty stream name, and as [`push`](Self::push).
    pub fn push_to<E: Serialize + ?Sized>(&mut self, stream: &str, event: &E) -> Result<&mut Self> {
        self.push_declared(stream, Declared::default(), event)
    }

    fn push_declared<E: Serialize + ?Sized>(
        &mut self,
        stream: &str,
        declared: Declared,
        event: &E,
    ) -> Result<&mut Self> {
        if stream.is_empty() {
            return Err(Error::EmptyStream);
        }
        let encode_error = |reason: String| Error::Encode {
            stream: stream.to_owned(),
            reason,
        };
        let fields = codec::to_fields(event).map_err(|error| encode_error(error.to_string()))?;
        if fields.is_empty() {
            return Err(encode_error(
                "an entry needs at least one field, and every field is None".to_owned(),
            ));
        }
        self.entries.push(EmittedEntry {
            stream: stream.to_owned(),
            declared,
            fields,
        });
        Ok(self)
    }

    /// How many events there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The stream of each event, in order.
    pub fn streams(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|entry| entry.stream.as_str())
    }

    /// Adds the events of `other` after these.
    pub fn extend(&mut self, other: Emit) {
        self.entries.extend(other.entries);
    }

    /// The events, in order.
    pub(crate) fn into_entries(self) -> Vec<EmittedEntry> {
        self.entries
    }
}

/// One event of an [`Emit`], encoded.
#[derive(Debug)]
pub(crate) struct EmittedEntry {
    /// The stream it is published to: a partitioned stream's logical name, or a stream.
    pub(crate) stream: String,
    pub(crate) declared: Declared,
    pub(crate) fields: Vec<EncodedField>,
}
