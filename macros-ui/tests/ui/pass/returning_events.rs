//! Handlers that return events to publish before their entry is acknowledged.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use slim_bus::{Context, Emit, EventBus, HandlerError};

#[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "order.placed")]
struct OrderPlaced {
    order_id: String,
}

#[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "invoice.requested")]
struct InvoiceRequested {
    order_id: String,
}

#[slim_bus::stream]
async fn one(order: OrderPlaced) -> anyhow::Result<InvoiceRequested> {
    Ok(InvoiceRequested {
        order_id: order.order_id,
    })
}

#[slim_bus::stream("orders.maybe")]
async fn maybe(order: OrderPlaced) -> Result<Option<InvoiceRequested>, HandlerError> {
    Ok((!order.order_id.is_empty()).then_some(InvoiceRequested {
        order_id: order.order_id,
    }))
}

#[slim_bus::stream("orders.many")]
async fn many(order: OrderPlaced, _ctx: Context) -> Result<Vec<InvoiceRequested>, String> {
    Ok(vec![InvoiceRequested {
        order_id: order.order_id,
    }])
}

#[slim_bus::stream("orders.mixed")]
async fn mixed(order: OrderPlaced) -> slim_bus::Result<Emit> {
    let mut emit = Emit::new();
    emit.push(&InvoiceRequested {
        order_id: order.order_id.clone(),
    })?
    .push_to("audit", &order)?;
    Ok(emit)
}

struct Billing;

#[slim_bus::handlers]
impl Billing {
    #[stream("orders.billing")]
    async fn on_placed(&self, order: OrderPlaced) -> anyhow::Result<Vec<InvoiceRequested>> {
        Ok(vec![InvoiceRequested {
            order_id: order.order_id,
        }])
    }
}

fn main() {
    let _ = EventBus::builder()
        .handler(one)
        .handler(maybe)
        .handler(many)
        .handler(mixed)
        .service(Arc::new(Billing));
}
