//! Publishing without the rest of the bus: what a handler gets from its context.

use serde::Serialize;

use crate::bus::EventBus;
use crate::emit::Emit;
use crate::error::Result;
use crate::event::{EntryId, Event};
use crate::headers::Headers;

/// Publishes events through a bus's connection: what a handler gets from
/// [`Context::publisher`](crate::Context::publisher) to publish follow-up events, with no
/// global or `OnceLock` holding the bus.
///
/// Cheap to clone. Its methods are those of [`EventBus`] of the same names.
///
/// # At least once
///
/// An entry is acknowledged after its handler returns `Ok`, so what a handler publishes
/// before a failure, a timeout or a crash is published again when the entry is delivered
/// again. Make follow-up events idempotent for their consumers (e.g. carry the id of the
/// entry that caused them, [`Context::entry_id`](crate::Context::entry_id)).
///
/// # Examples
///
/// ```no_run
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
/// # #[event(stream = "order.placed")]
/// # struct OrderPlaced { order_id: String }
/// # #[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
/// # #[event(stream = "invoice.requested")]
/// # struct InvoiceRequested { order_id: String, cause: String }
/// #[slim_bus::stream]
/// async fn request_invoice(order: OrderPlaced, ctx: slim_bus::Context) -> slim_bus::Result<()> {
///     let cause = ctx.entry_id().to_string();
///     ctx.publisher().publish(&InvoiceRequested { order_id: order.order_id, cause }).await?;
///     Ok(())
/// }
/// ```
#[derive(Clone, Debug)]
pub struct Publisher {
    bus: EventBus,
}

impl Publisher {
    pub(crate) fn new(bus: EventBus) -> Self {
        Publisher { bus }
    }

    /// As [`EventBus::publish`].
    ///
    /// # Errors
    ///
    /// As [`EventBus::publish`].
    pub async fn publish<E: Event>(&self, event: &E) -> Result<EntryId> {
        self.bus.publish(event).await
    }

    /// As [`EventBus::publish_to`].
    ///
    /// # Errors
    ///
    /// As [`EventBus::publish_to`].
    pub async fn publish_to<E: Serialize + ?Sized>(
        &self,
        stream: &str,
        event: &E,
    ) -> Result<EntryId> {
        self.bus.publish_to(stream, event).await
    }

    /// As [`EventBus::publish_with_headers`].
    ///
    /// # Errors
    ///
    /// As [`EventBus::publish_with_headers`].
    pub async fn publish_with_headers<E: Event>(
        &self,
        event: &E,
        headers: &Headers,
    ) -> Result<EntryId> {
        self.bus.publish_with_headers(event, headers).await
    }

    /// As [`EventBus::publish_to_with_headers`].
    ///
    /// # Errors
    ///
    /// As [`EventBus::publish_to_with_headers`].
    pub async fn publish_to_with_headers<E: Serialize + ?Sized>(
        &self,
        stream: &str,
        event: &E,
        headers: &Headers,
    ) -> Result<EntryId> {
        self.bus
            .publish_to_with_headers(stream, event, headers)
            .await
    }

    /// As [`EventBus::publish_batch`].
    ///
    /// # Errors
    ///
    /// As [`EventBus::publish_batch`].
    pub async fn publish_batch<E: Event>(&self, events: &[E]) -> Result<Vec<EntryId>> {
        self.bus.publish_batch(events).await
    }

    /// As [`EventBus::send`].
    ///
    /// # Errors
    ///
    /// As [`EventBus::send`].
    pub async fn send<K, V>(
        &self,
        stream: &str,
        fields: impl IntoIterator<Item = (K, V)>,
    ) -> Result<EntryId>
    where
        K: AsRef<str>,
        V: AsRef<[u8]>,
    {
        self.bus.send(stream, fields).await
    }

    /// Publishes the events a handler returned, each to its stream or the partition it
    /// picks, all sent at once.
    pub(crate) async fn publish_emitted(&self, emit: Emit) -> Result<Vec<EntryId>> {
        self.bus.append_routed(emit.into_entries()).await
    }
}
