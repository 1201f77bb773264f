//! Events a handler returns, published before its entry is acknowledged.

use serde::Serialize;

use crate::codec::{self, EncodedField};
use crate::error::{Error, Result};
use crate::event::Event;

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
    /// Each event's stream, the cap of its event type ([`Event::MAX_LEN`]), and fields.
    entries: Vec<(String, Option<usize>, Vec<EncodedField>)>,
}

impl Emit {
    /// No events.
    pub fn new() -> Self {
        Emit::default()
    }

    /// Adds `event`, to be published to its stream ([`Event::STREAM`]).
    ///
    /// # Errors
    ///
    /// [`Error::NoEventStream`] when the event type names no stream, [`Error::Encode`]
    /// when the event does not serialize into stream fields (or into none).
    pub fn push<E: Event>(&mut self, event: &E) -> Result<&mut Self> {
        let stream = E::STREAM.ok_or(Error::NoEventStream {
            event: std::any::type_name::<E>(),
        })?;
        self.push_capped(stream, E::MAX_LEN, event)
    }

    /// Adds `event`, to be published to `stream`.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyStream`] for an empty stream name, and as [`push`](Self::push).
    pub fn push_to<E: Serialize + ?Sized>(&mut self, stream: &str, event: &E) -> Result<&mut Self> {
        self.push_capped(stream, None, event)
    }

    fn push_capped<E: Serialize + ?Sized>(
        &mut self,
        stream: &str,
        event_max_len: Option<usize>,
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
        self.entries
            .push((stream.to_owned(), event_max_len, fields));
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
        self.entries.iter().map(|(stream, _, _)| stream.as_str())
    }

    /// Adds the events of `other` after these.
    pub fn extend(&mut self, other: Emit) {
        self.entries.extend(other.entries);
    }

    /// The entries by stream, streams in the order of their first event, each stream's
    /// entries in order, with the cap of the first event type that has one for it.
    pub(crate) fn by_stream(self) -> Vec<StreamEntries> {
        let mut streams: Vec<StreamEntries> = Vec::new();
        for (stream, event_max_len, fields) in self.entries {
            match streams.iter_mut().find(|s| s.stream == stream) {
                Some(known) => {
                    known.event_max_len = known.event_max_len.or(event_max_len);
                    known.entries.push(fields);
                }
                None => streams.push(StreamEntries {
                    stream,
                    event_max_len,
                    entries: vec![fields],
                }),
            }
        }
        streams
    }
}

/// The events of an [`Emit`] for one stream.
pub(crate) struct StreamEntries {
    pub(crate) stream: String,
    pub(crate) event_max_len: Option<usize>,
    pub(crate) entries: Vec<Vec<EncodedField>>,
}
