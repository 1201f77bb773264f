//! Testing handlers without Redis: a bus on the in-memory backend that runs until its work
//! is done, and what became of each entry.
//!
//! [`TestBus`] takes the builder a service uses (handlers and settings unchanged), runs it
//! on a private [`MemoryBroker`], and answers per entry whether it was acknowledged, how
//! often it was delivered, or why it was dead-lettered. Retries, timeouts and claims wait
//! on tokio's clock, so with paused time (`#[tokio::test(start_paused = true)]`, which
//! needs tokio's `test-util` feature in your dev-dependencies) a test that goes through
//! five retries with backoff takes no real time.
//!
//! For several services or consumers in one test, build buses on one shared
//! [`MemoryBroker`] with [`EventBusBuilder::memory`] instead, and inspect it with
//! [`MemoryBroker::pending`] and [`MemoryBroker::entries`].

use std::time::Duration;

use tokio::time::Instant;

use crate::broker::memory::MemoryBroker;
use crate::bus::{EventBus, EventBusBuilder};
use crate::dead_letter::DeadLetterReason;
use crate::error::{Error, Result};
use crate::event::{EntryId, Event};
use crate::listener::Listener;

pub use crate::inspect::PendingEntry;

/// How long [`TestBus::run_until_idle`] runs by default before it gives up: long enough
/// for the default retries and claims, and free with paused time.
const DEFAULT_IDLE_LIMIT: Duration = Duration::from_secs(600);

/// What became of one entry in the test bus's consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Nothing is known of the entry in the group: no stream of the bus has it (never
    /// added, or deleted before it was delivered), or the group started after it.
    Unknown,
    /// The entry waits in its stream: the group has not read it yet.
    Unread,
    /// Delivered and not acknowledged yet: being handled, or waiting for its retry.
    Pending {
        /// Deliveries so far, the first included.
        deliveries: u64,
    },
    /// A handler succeeded and the entry was acknowledged.
    Acked {
        /// Deliveries it took: 1 when the first attempt succeeded.
        deliveries: u64,
    },
    /// Moved to the stream's dead-letter stream.
    DeadLettered {
        /// Deliveries before it was given up on.
        deliveries: u64,
        /// Why, as in [`DeadLetter::reason`](crate::DeadLetter::reason).
        reason: Option<DeadLetterReason>,
        /// The last error, as in [`DeadLetter::error`](crate::DeadLetter::error).
        error: String,
    },
}

impl Outcome {
    /// How often the entry was delivered (0 when it never was).
    pub fn deliveries(&self) -> u64 {
        match self {
            Outcome::Pending { deliveries }
            | Outcome::Acked { deliveries }
            | Outcome::DeadLettered { deliveries, .. } => *deliveries,
            Outcome::Unknown | Outcome::Unread => 0,
        }
    }
}

/// A bus on a private in-memory broker, for testing a service's handlers.
///
/// It takes the service's own builder: handlers and settings stay as they are, the
/// backend becomes a fresh [`MemoryBroker`] (unless the builder names one with
/// [`EventBusBuilder::memory`] or a `memory://` URL; a Redis URL or client is ignored), and
/// the consumer group and name default to `test`. Publish events, call
/// [`run_until_idle`](Self::run_until_idle), then assert on each entry's
/// [`outcome`](Self::outcome).
///
/// # Examples
///
/// A handler that fails twice before it books a payment, and gives up on empty ones:
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use slim_bus::testing::{Outcome, TestBus};
/// use slim_bus::{Context, DeadLetterReason, EventBus, HandlerError};
///
/// #[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
/// #[event(stream = "payment.received")]
/// struct PaymentReceived {
///     order_id: String,
///     cents: u64,
/// }
///
/// #[slim_bus::stream]
/// async fn book(event: PaymentReceived, ctx: Context) -> Result<(), HandlerError> {
///     if event.cents == 0 {
///         return Err(HandlerError::permanent("nothing to book"));
///     }
///     if ctx.delivery_count() < 3 {
///         return Err("the ledger is unavailable".into());
///     }
///     Ok(())
/// }
///
/// #[tokio::main(flavor = "current_thread", start_paused = true)]
/// async fn main() -> slim_bus::Result<()> {
///     let mut bus = TestBus::new(EventBus::builder().handler(book)).await?;
///     let paid = bus.publish(&PaymentReceived { order_id: "o-1".into(), cents: 1999 }).await?;
///     let empty = bus.publish(&PaymentReceived { order_id: "o-2".into(), cents: 0 }).await?;
///
///     // Two retries with the default backoff (1 s, then 2 s): no real waiting, as time is paused.
///     bus.run_until_idle().await?;
///
///     assert_eq!(bus.outcome(paid), Outcome::Acked { deliveries: 3 });
///     assert_eq!(
///         bus.outcome(empty),
///         Outcome::DeadLettered {
///             deliveries: 1,
///             reason: Some(DeadLetterReason::Permanent),
///             error: "nothing to book".into(),
///         }
///     );
///     bus.shutdown().await
/// }
/// ```
#[derive(Debug)]
#[must_use = "a test bus does nothing until it runs"]
pub struct TestBus {
    bus: EventBus,
    broker: MemoryBroker,
    listener: Option<Listener>,
    idle_limit: Duration,
}

impl TestBus {
    /// Builds the bus of `builder` on the in-memory backend; it starts listening on the
    /// first [`run_until_idle`](Self::run_until_idle) or [`run_for`](Self::run_for).
    ///
    /// # Errors
    ///
    /// What [`EventBusBuilder::build`] rejects: invalid settings, duplicate handlers.
    pub async fn new(builder: EventBusBuilder) -> Result<Self> {
        let (builder, broker) = builder.in_memory_for_tests();
        Ok(TestBus {
            bus: builder.build().await?,
            broker,
            listener: None,
            idle_limit: DEFAULT_IDLE_LIMIT,
        })
    }

    /// How long (on tokio's clock) [`run_until_idle`](Self::run_until_idle) may run
    /// before it panics; 10 minutes by default.
    pub fn idle_limit(mut self, limit: Duration) -> Self {
        self.idle_limit = limit;
        self
    }

    /// The bus: publish with it, read its dead letters, check its health.
    pub fn bus(&self) -> &EventBus {
        &self.bus
    }

    /// The broker the bus runs on, to inspect its streams and pending lists or to share it
    /// with another bus.
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }

    /// Publishes `event` to its stream, returning the entry's id for
    /// [`outcome`](Self::outcome). `bus().publish_to(..)` and `bus().send(..)` publish
    /// elsewhere or untyped fields.
    ///
    /// # Errors
    ///
    /// As [`EventBus::publish`].
    pub async fn publish<E: Event>(&self, event: &E) -> Result<EntryId> {
        self.bus.publish(event).await
    }

    /// Publishes `event` to its stream with `headers`, returning the entry's id for
    /// [`outcome`](Self::outcome).
    ///
    /// # Errors
    ///
    /// As [`EventBus::publish_with_headers`].
    pub async fn publish_with_headers<E: Event>(
        &self,
        event: &E,
        headers: &crate::Headers,
    ) -> Result<EntryId> {
        self.bus.publish_with_headers(event, headers).await
    }

    /// Runs the bus until its consumer group has nothing left to do on any of its
    /// streams: every entry read, none pending or waiting for a retry, so each is
    /// acknowledged or dead-lettered. Starts listening first if it does not yet.
    ///
    /// # Errors
    ///
    /// What [`EventBus::listen`] returns, or the error that stopped the listener.
    ///
    /// # Panics
    ///
    /// When the bus is still busy after the [idle limit](Self::idle_limit), naming the
    /// entries still pending: a handler that never settles, or a retry delay longer than
    /// the limit.
    pub async fn run_until_idle(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.idle_limit;
        let group = self.bus.consumer_group().unwrap_or_default().to_owned();
        let listener = listening(&self.bus, &mut self.listener).await?;
        let stopped = loop {
            // Created before looking, so that a change in between is not missed.
            let changed = self.broker.changed();
            if self.broker.is_idle(self.bus.streams(), &group) {
                return Ok(());
            }
            tokio::select! {
                stopped = &mut *listener => break stopped,
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => panic!(
                    "the test bus was not idle after {:?}; still pending: {:?}",
                    self.idle_limit,
                    self.broker.pending_ids(self.bus.streams(), &group),
                ),
            }
        };
        self.listener = None;
        Err(stopped.err().unwrap_or_else(|| Error::Internal {
            detail: "the test bus's listener stopped before the bus was idle".to_owned(),
        }))
    }

    /// Runs the bus for `duration` of tokio's clock, e.g. to let a retry come due or a
    /// claim happen. Starts listening first if it does not yet.
    ///
    /// # Errors
    ///
    /// What [`EventBus::listen`] returns, or the error that stopped the listener.
    pub async fn run_for(&mut self, duration: Duration) -> Result<()> {
        let listener = listening(&self.bus, &mut self.listener).await?;
        tokio::select! {
            stopped = &mut *listener => {
                self.listener = None;
                Err(stopped.err().unwrap_or_else(|| Error::Internal {
                    detail: "the test bus's listener stopped".to_owned(),
                }))
            }
            () = tokio::time::sleep(duration) => Ok(()),
        }
    }

    /// What became of entry `id` of one of the bus's streams in its consumer group.
    pub fn outcome(&self, id: EntryId) -> Outcome {
        let group = self.bus.consumer_group().unwrap_or_default();
        self.bus
            .streams()
            .find_map(|stream| self.broker.outcome(stream, group, id))
            .unwrap_or(Outcome::Unknown)
    }

    /// Shuts the listener down gracefully, if it runs.
    ///
    /// # Errors
    ///
    /// The error that had stopped the listener, if any.
    pub async fn shutdown(self) -> Result<()> {
        match self.listener {
            Some(listener) => listener.shutdown().await,
            None => Ok(()),
        }
    }
}

/// The running listener of `bus`, started if `slot` holds none.
async fn listening<'a>(bus: &EventBus, slot: &'a mut Option<Listener>) -> Result<&'a mut Listener> {
    let listener = match slot.take() {
        Some(listener) => listener,
        None => bus.listen().await?,
    };
    Ok(slot.insert(listener))
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::{Context, HandlerError, StreamHandler};

    #[derive(Debug, Serialize, Deserialize)]
    struct Paid {
        cents: u64,
    }

    impl Event for Paid {
        const STREAM: Option<&'static str> = Some("paid");
    }

    /// Fails twice, then books; gives up on zero; never finishes on one cent.
    struct Book;

    #[async_trait::async_trait]
    impl StreamHandler for Book {
        type Event = Paid;

        async fn handle(&self, event: Paid, ctx: Context) -> Result<(), HandlerError> {
            match event.cents {
                0 => Err(HandlerError::permanent("nothing to book")),
                1 => std::future::pending().await,
                2 => Err(HandlerError::retry_after(
                    Duration::from_secs(3600),
                    "later",
                )),
                _ if ctx.delivery_count() < 3 => Err("the ledger is unavailable".into()),
                _ => Ok(()),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_tell_acks_after_retries_and_dead_letters_with_their_reason() {
        let mut bus = TestBus::new(EventBus::builder().handler(Book))
            .await
            .expect("valid settings");
        let paid = bus.publish(&Paid { cents: 1999 }).await.expect("published");
        let empty = bus.publish(&Paid { cents: 0 }).await.expect("published");
        let stuck = bus.publish(&Paid { cents: 1 }).await.expect("published");
        let poison = bus
            .bus()
            .send("paid", [("cents", "a lot")])
            .await
            .expect("published");
        assert_eq!(bus.outcome(paid), Outcome::Unread);
        assert_eq!(bus.outcome(EntryId::new(1, 0)), Outcome::Unknown);
        let started = Instant::now();

        bus.run_until_idle().await.expect("the listener runs");

        assert_eq!(bus.outcome(paid), Outcome::Acked { deliveries: 3 });
        assert_eq!(
            bus.outcome(empty),
            Outcome::DeadLettered {
                deliveries: 1,
                reason: Some(DeadLetterReason::Permanent),
                error: "nothing to book".to_owned(),
            }
        );
        // Five handler timeouts of 30 s and four backoffs: minutes of tokio time.
        assert_eq!(
            bus.outcome(stuck),
            Outcome::DeadLettered {
                deliveries: 5,
                reason: Some(DeadLetterReason::Timeout),
                error: "the handler did not finish within 30s".to_owned(),
            }
        );
        assert!(started.elapsed() >= Duration::from_secs(150));
        match bus.outcome(poison) {
            Outcome::DeadLettered {
                deliveries: 1,
                reason: Some(DeadLetterReason::Decode),
                error,
            } => assert!(error.contains("cents"), "{error}"),
            other => panic!("the poison entry was not dead-lettered for decoding: {other:?}"),
        }
        assert_eq!(
            bus.bus()
                .dead_letters("paid")
                .len()
                .await
                .expect("in memory"),
            3
        );
        bus.shutdown().await.expect("clean shutdown");
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_waiting_for_its_retry_is_pending_until_the_retry_is_due() {
        let mut bus = TestBus::new(EventBus::builder().handler(Book))
            .await
            .expect("valid settings");
        let later = bus.publish(&Paid { cents: 2 }).await.expect("published");
        bus.run_for(Duration::from_secs(60))
            .await
            .expect("the listener runs");
        assert_eq!(bus.outcome(later), Outcome::Pending { deliveries: 1 });
        assert_eq!(bus.outcome(later).deliveries(), 1);
        let pending = bus.broker().pending("paid", "test");
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].consumer, "test");
        // Held by this consumer, it is kept fresh: its idle time is reset every third of
        // claim_min_idle (60 s by default), so no other consumer claims it meanwhile.
        assert!(
            pending[0].idle <= Duration::from_secs(20),
            "{:?}",
            pending[0].idle
        );
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "the test bus was not idle after 60s")]
    async fn running_until_idle_gives_up_after_its_limit() {
        let mut bus = TestBus::new(EventBus::builder().handler(Book))
            .await
            .expect("valid settings")
            .idle_limit(Duration::from_secs(60));
        bus.publish(&Paid { cents: 2 }).await.expect("published");
        let _ = bus.run_until_idle().await;
    }
}
