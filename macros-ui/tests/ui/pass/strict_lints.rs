//! Generated code stays clean under strict lints, and the less common forms compile:
//! `cfg`'d handlers, destructured arguments, generic events, untyped events, other
//! attributes on the function, and a re-export through `crate = "..."`.
#![deny(
    missing_docs,
    unreachable_pub,
    unused,
    rust_2018_idioms,
    non_local_definitions
)]

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use slim_bus::{Context, EventBus};

mod platform {
    pub(crate) use slim_bus as events;
}

/// A generic event.
#[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "thing.changed")]
pub struct Changed<T> {
    /// The new value.
    pub value: T,
}

/// Through a re-export.
#[derive(Debug, Serialize, Deserialize, platform::events::Event)]
#[event(crate = "crate::platform::events", stream = "invoice.paid")]
pub struct InvoicePaid {
    /// Which invoice.
    pub invoice_id: String,
}

/// Counts changes.
#[slim_bus::stream]
#[inline]
pub async fn count(Changed { value }: Changed<u32>, _: Context) -> Result<(), std::io::Error> {
    let _ = value;
    Ok(())
}

/// Named like the argument it would otherwise get.
#[slim_bus::stream("events")]
pub async fn event(fields: HashMap<String, String>) {
    let _ = fields;
}

/// With settings of its own, and no await (no `clippy::unused_async` for it).
#[slim_bus::stream("events.timed", max_deliveries = 3, timeout = "2m 30s")]
pub async fn timed(fields: HashMap<String, String>) {
    let _ = fields;
}

/// Through a re-export.
#[platform::events::stream(crate = "crate::platform::events")]
pub async fn on_paid(paid: InvoicePaid) {
    let _ = paid;
}

/// A service.
pub struct Service;

#[slim_bus::handlers]
impl Service {
    /// Only in some builds.
    #[cfg(any())]
    #[stream("never.built")]
    async fn never(&self, _: InvoicePaid) {}

    #[stream("invoice.paid.service")]
    async fn on_paid(&self, InvoicePaid { invoice_id }: InvoicePaid) -> anyhow::Result<()> {
        let _ = invoice_id;
        Ok(())
    }

    #[stream]
    async fn on_changed(&self, _: Changed<String>, _ctx: Context) {}

    #[stream("invoice.paid.audit", timeout = "250ms", max_deliveries = 1)]
    async fn on_paid_audit(&self, _: InvoicePaid) {}
}

/// Builds a bus with everything.
pub async fn build() -> slim_bus::Result<EventBus> {
    EventBus::builder()
        .handler(count)
        .handler(event)
        .handler(on_paid)
        .handler(timed)
        .service(Arc::new(Service))
        .build()
        .await
}

// Built, never run: creating the future is enough to type-check it.
fn main() {
    drop(build());
}
