//! A sample service for the AsyncAPI tests: the events it handles and publishes, and its
//! bus, shared by the tests and the `slim-bus-test-asyncapi` binary that runs it.

use std::collections::HashMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use slim_bus::{EventBus, EventBusBuilder};

/// A postal address, nested in [`OrderPlaced`]: one field of JSON text on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Address {
    /// The city.
    pub city: String,
    /// The postal code.
    pub postal_code: String,
}

/// The plan an order is for: a unit enum, its variant's name on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Plan {
    /// Billed monthly.
    ProMonthly,
    /// Billed yearly.
    ProYearly,
}

/// Published by the service, with a schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, slim_bus::Event)]
#[event(stream = "order.placed")]
pub struct OrderPlaced {
    /// The order.
    pub order_id: String,
    /// Its total, in cents.
    pub cents: u64,
    /// Whether it was paid up front.
    pub prepaid: bool,
    /// A coupon, if any: no field at all without one.
    pub coupon: Option<String>,
    /// The plan.
    pub plan: Plan,
    /// Where it goes.
    pub shipping: Address,
    /// Free-form tags.
    pub tags: Vec<String>,
}

/// Handled by the service, with a schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, slim_bus::Event)]
#[event(stream = "payment.received")]
pub struct PaymentReceived {
    /// The order paid for.
    pub order_id: String,
    /// How much, in cents.
    pub cents: u64,
}

/// Published by the service, without a schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "audit.logged")]
pub struct AuditLogged {
    /// What happened.
    pub action: String,
}

/// Handles `payment.received`.
#[slim_bus::stream]
pub async fn on_payment(_event: PaymentReceived) {}

/// The service's bus on `url`: handles `payment.received` (with a schema) and
/// `legacy.orders` (untyped), publishes `OrderPlaced` (with a schema) and `AuditLogged`.
pub fn builder(url: &str) -> EventBusBuilder {
    EventBus::builder()
        .url(url)
        .consumer_group("billing")
        .asyncapi_info("billing", "2.1.0")
        .handler(on_payment)
        .event_schema::<PaymentReceived>()
        .handler(on_legacy_order)
        .publishes_with_schema::<OrderPlaced>()
        .publishes::<AuditLogged>()
}

/// Handles `legacy.orders`, whose entries are any fields.
#[slim_bus::stream("legacy.orders")]
async fn on_legacy_order(_event: HashMap<String, String>) {}
