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
//! `redis-server` for the length of the run if one is installed, and else runs on the
//! in-memory backend (`memory://`), so no Redis is needed at all.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slim_bus::{Context, EventBus, EventBusBuilder, HandlerError, StreamHandler};
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

/// The billing service's bus, without a backend: `main` runs it on Redis, the tests below
/// in memory, with the same handler and settings.
fn billing(handler: BookPayment) -> EventBusBuilder {
    EventBus::builder()
        .consumer_group("billing")
        .consumer_name("dead-letters-example")
        .handler_timeout(Duration::from_secs(2))
        .retry_backoff(Duration::from_millis(100), Duration::from_secs(1))
        .max_deliveries(5)
        .handler(handler)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let (url, server) = slim_bus_examples::redis_for_the_example().await?;

    let ledger_up = Arc::new(AtomicBool::new(false));
    let (done, mut finished) = mpsc::unbounded_channel();
    let bus = billing(BookPayment {
        ledger_up: ledger_up.clone(),
        done,
    })
    .url(&url)
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
    listener.shutdown().await?;
    // Only a Redis that outlives this run still holds them.
    match (&server, url.starts_with("memory://")) {
        (None, false) => println!(
            "look at them with: redis-cli -u '{url}' XRANGE '{}' - +",
            dead.stream()
        ),
        _ => println!(
            "the dead letters went with {}; run with REDIS_URL set to keep them and look at them with redis-cli",
            if server.is_some() {
                "the example's throwaway redis-server"
            } else {
                "the in-memory backend"
            }
        ),
    }
    drop(server);
    Ok(())
}

/// The handler's outcomes, tested without Redis: `slim_bus::testing::TestBus` runs the
/// example's own bus in memory with tokio's clock paused, so retries with backoff take no
/// real time. Run with `cargo test -p slim-bus-examples --example dead-letters`.
#[cfg(test)]
mod tests {
    use slim_bus::DeadLetterReason;
    use slim_bus::testing::{Outcome, TestBus};

    use super::*;

    /// The example's bus in memory, with the ledger up or down, and the orders the handler
    /// finished with.
    async fn billing_bus(
        ledger_up: bool,
    ) -> (TestBus, Arc<AtomicBool>, mpsc::UnboundedReceiver<String>) {
        let ledger_up = Arc::new(AtomicBool::new(ledger_up));
        let (done, finished) = mpsc::unbounded_channel();
        let handler = BookPayment {
            ledger_up: ledger_up.clone(),
            done,
        };
        let bus = TestBus::new(billing(handler))
            .await
            .expect("the example's settings are valid");
        (bus, ledger_up, finished)
    }

    fn order(order_id: &str) -> PaymentReceived {
        PaymentReceived {
            order_id: order_id.into(),
            cents: 1999,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_payment_is_booked_at_once_while_the_ledger_is_up() {
        let (mut bus, _ledger, _finished) = billing_bus(true).await;
        let id = bus.publish(&order("o-1")).await.expect("published");
        bus.run_until_idle().await.expect("the bus runs");
        assert_eq!(bus.outcome(id), Outcome::Acked { deliveries: 1 });
    }

    #[tokio::test(start_paused = true)]
    async fn a_payment_is_retried_while_the_ledger_is_down_and_booked_once_it_is_back() {
        let (mut bus, ledger_up, _finished) = billing_bus(false).await;
        let id = bus.publish(&order("o-1")).await.expect("published");
        // The first retry comes within 100 ms, the second within 200 ms more.
        bus.run_for(Duration::from_millis(350))
            .await
            .expect("the bus runs");
        let Outcome::Pending { deliveries } = bus.outcome(id) else {
            panic!(
                "not pending while the ledger is down: {:?}",
                bus.outcome(id)
            );
        };
        assert!(deliveries >= 3, "only {deliveries} deliveries");
        ledger_up.store(true, Ordering::SeqCst);
        bus.run_until_idle().await.expect("the bus runs");
        assert_eq!(
            bus.outcome(id),
            Outcome::Acked {
                deliveries: deliveries + 1
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_payment_is_dead_lettered_when_the_ledger_stays_down_for_five_deliveries() {
        let (mut bus, _ledger, _finished) = billing_bus(false).await;
        let id = bus.publish(&order("o-1")).await.expect("published");
        bus.run_until_idle().await.expect("the bus runs");
        assert_eq!(
            bus.outcome(id),
            Outcome::DeadLettered {
                deliveries: 5,
                reason: Some(DeadLetterReason::Handler),
                error: "ledger unavailable".into(),
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refunds_are_given_up_on_at_once_and_poison_entries_never_reach_the_handler() {
        let (mut bus, _ledger, mut finished) = billing_bus(true).await;
        let refund = bus.publish(&order("refund-7")).await.expect("published");
        let poison = bus
            .bus()
            .send(
                "payment.received",
                [("order_id", "o-2"), ("cents", "a lot")],
            )
            .await
            .expect("published");
        bus.run_until_idle().await.expect("the bus runs");
        assert_eq!(
            bus.outcome(refund),
            Outcome::DeadLettered {
                deliveries: 1,
                reason: Some(DeadLetterReason::Permanent),
                error: "refunds are not booked here".into(),
            }
        );
        let Outcome::DeadLettered {
            deliveries: 1,
            reason: Some(DeadLetterReason::Decode),
            error,
        } = bus.outcome(poison)
        else {
            panic!(
                "the poison entry was not dead-lettered: {:?}",
                bus.outcome(poison)
            );
        };
        assert!(error.contains("field `cents`"), "{error}");
        let letters = bus
            .bus()
            .dead_letters("payment.received")
            .list(None, 10)
            .await
            .expect("in memory");
        assert_eq!(letters.len(), 2);
        assert_eq!(finished.try_recv().ok().as_deref(), Some("refund-7"));
        assert!(
            finished.try_recv().is_err(),
            "the poison entry reached the handler"
        );
    }
}
