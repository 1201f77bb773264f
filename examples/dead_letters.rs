//! Failure handling: retries with backoff, a poison entry dead-lettered at once, a handler
//! that gives up, and the dead-letter API to inspect and replay what failed.
//!
//! Run with:
//!
//! ```sh
//! cargo run -p slim-bus-examples --example dead-letters
//! ```
//!
//! It uses the Redis at `REDIS_URL` when that is set; otherwise it starts a throwaway
//! `redis-server` (which must be installed) for the length of the run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slim_bus::{Context, EventBus, HandlerError, StreamHandler};
use tokio::sync::mpsc;

#[derive(Debug, Serialize, Deserialize)]
struct PaymentReceived {
    order_id: String,
    cents: u64,
}

impl slim_bus::Event for PaymentReceived {
    const STREAM: Option<&'static str> = Some("payment.received");
}

/// Books payments; the ledger is flaky at first and rejects negative orders for good.
struct BookPayment {
    ledger_up: Arc<AtomicBool>,
    done: mpsc::UnboundedSender<String>,
}

#[slim_bus::async_trait]
impl StreamHandler for BookPayment {
    type Event = PaymentReceived;

    async fn handle(&self, event: PaymentReceived, ctx: Context) -> Result<(), HandlerError> {
        println!(
            "attempt {} for order {}",
            ctx.delivery_count(),
            event.order_id
        );
        if event.order_id.starts_with("refund-") {
            self.done.send(event.order_id)?;
            return Err(HandlerError::permanent("refunds are not booked here"));
        }
        if !self.ledger_up.load(Ordering::SeqCst) {
            // Any error converts with `?`; this one retries after the bus's backoff.
            return Err("ledger unavailable".into());
        }
        self.done.send(event.order_id)?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let (url, _server) = slim_bus_examples::redis_for_the_example().await?;

    let ledger_up = Arc::new(AtomicBool::new(false));
    let (done, mut finished) = mpsc::unbounded_channel();
    let bus = EventBus::builder()
        .url(&url)
        .consumer_group("billing")
        .consumer_name("dead-letters-example")
        .handler_timeout(Duration::from_secs(2))
        .retry_backoff(Duration::from_millis(100), Duration::from_secs(1))
        .max_deliveries(5)
        .handler(BookPayment {
            ledger_up: ledger_up.clone(),
            done,
        })
        .build()
        .await?;
    let listener = bus.listen().await?;

    bus.publish(&PaymentReceived {
        order_id: "o-1".into(),
        cents: 1999,
    })
    .await?;
    bus.publish(&PaymentReceived {
        order_id: "refund-7".into(),
        cents: 500,
    })
    .await?;
    // Written by some other producer: `cents` is not a number, so it can never decode.
    bus.send(
        "payment.received",
        [("order_id", "o-2"), ("cents", "a lot")],
    )
    .await?;

    let refund = tokio::time::timeout(Duration::from_secs(10), finished.recv()).await?;
    println!("gave up on {refund:?} for good");
    tokio::time::sleep(Duration::from_millis(250)).await;
    println!("the ledger is back");
    ledger_up.store(true, Ordering::SeqCst);
    let booked = tokio::time::timeout(Duration::from_secs(10), finished.recv()).await?;
    println!("booked {booked:?} after retries");

    let dead = bus.dead_letters("payment.received");
    for letter in dead.list(None, 10).await? {
        println!(
            "dead letter {} (was {} in {}): reason {}, after {} deliveries: {}",
            letter.id,
            letter
                .origin_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            letter.origin_stream,
            letter.reason.map(|r| r.to_string()).unwrap_or_default(),
            letter.delivery_count,
            letter.error,
        );
    }
    println!(
        "look at them with: redis-cli XRANGE '{}' - +",
        dead.stream()
    );

    listener.shutdown().await?;
    Ok(())
}
