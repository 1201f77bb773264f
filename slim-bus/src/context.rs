//! What a handler knows about the entry it is handling.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::event::EntryId;
use crate::headers::{Headers, NO_HEADERS};
use crate::publisher::Publisher;

/// The delivery a handler is working on: where the entry came from, how often it was
/// delivered, and how long the handler may take.
///
/// Cheap to clone; clones share the cancellation.
#[derive(Debug, Clone)]
pub struct Context {
    stream: Arc<str>,
    group: Arc<str>,
    consumer: Arc<str>,
    entry_id: EntryId,
    delivery_count: u64,
    deadline: Instant,
    cancellation: CancellationToken,
    publisher: Publisher,
    /// `None` when the entry has none, so that most contexts allocate nothing for them.
    headers: Option<Arc<Headers>>,
    /// Which partition `stream` is, when it is one of a partitioned stream.
    partition: Option<u32>,
}

impl Context {
    // One argument per field, from the one place that makes contexts.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        stream: Arc<str>,
        group: Arc<str>,
        consumer: Arc<str>,
        entry_id: EntryId,
        delivery_count: u64,
        deadline: Instant,
        cancellation: CancellationToken,
        publisher: Publisher,
    ) -> Self {
        Context {
            stream,
            group,
            consumer,
            entry_id,
            delivery_count,
            deadline,
            cancellation,
            publisher,
            headers: None,
            partition: None,
        }
    }

    /// The context of an entry of partition `partition` (if any) of a partitioned stream.
    pub(crate) fn with_partition(mut self, partition: Option<u32>) -> Self {
        self.partition = partition;
        self
    }

    /// The context with the entry's headers.
    pub(crate) fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = (!headers.is_empty()).then(|| Arc::new(headers));
        self
    }

    /// The entry's headers, as published with
    /// [`EventBus::publish_with_headers`](crate::EventBus::publish_with_headers) (empty
    /// when it has none).
    pub fn headers(&self) -> &Headers {
        self.headers.as_deref().unwrap_or(&NO_HEADERS)
    }

    /// Publishes through the bus that delivered this entry, e.g. a follow-up event.
    ///
    /// What a handler publishes is not taken back when it fails afterwards: a redelivered
    /// entry publishes again (see [`Publisher`]'s "At least once").
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// The Redis stream the entry was read from: for a partitioned stream, the partition's,
    /// like `orders:{3}`.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The partition the entry was read from, when the handler reads a partitioned stream
    /// (`Some(3)` for `orders:{3}`); `None` for a stream that is not partitioned.
    pub fn partition(&self) -> Option<u32> {
        self.partition
    }

    /// The consumer group that delivered the entry.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The consumer (this process) the entry was delivered to.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The id of the entry.
    pub fn entry_id(&self) -> EntryId {
        self.entry_id
    }

    /// How many times Redis has delivered this entry to the group, this delivery
    /// included: 1 the first time.
    pub fn delivery_count(&self) -> u64 {
        self.delivery_count
    }

    /// When the handler's time runs out (the handler timeout, counted from the start).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The time left until [`deadline`](Self::deadline).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Resolves when this attempt is abandoned: the handler timed out, or the bus is
    /// shutting down and its grace period ran out.
    ///
    /// The handler's own future is dropped at that point anyway; await this in work the
    /// handler spawned (background tasks, blocking threads) so that it stops too.
    ///
    /// # Cancellation safety
    ///
    /// Cancellation safe: dropping the future has no effect on the context.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.cancellation.cancelled()
    }

    /// Whether this attempt has been abandoned (see [`cancelled`](Self::cancelled)).
    pub fn is_cancelled(&self) -> bool {
        self.cancellation.is_cancelled()
    }

    /// A token that is cancelled when this attempt is abandoned, for spawned work that
    /// needs an owned handle.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.cancellation.clone()
    }
}
