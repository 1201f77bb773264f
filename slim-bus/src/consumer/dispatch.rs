//! Runs one delivery: decode, call the handler under its timeout with panics caught, then
//! acknowledge, schedule a retry, or dead-letter.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::Route;
use super::ack::AckSender;
use super::backoff::{Backoff, exponential};
use super::in_flight::Held;
use super::retry::{BlockedRead, RetryRequest};
use super::retry_due::RetryDues;
use super::stream_state::StreamState;
use crate::broker::{Broker, DeadLetterMove, Delivery};
use crate::context::Context;
use crate::dead_letter::{DeadLetterMeta, DeadLetterReason};
use crate::emit::Emit;
use crate::error::{DecodeError, Error, HandlerError, Retry, panic_message, report};
use crate::handler::RegisteredHandler;
use crate::headers::Headers;
use crate::publisher::Publisher;
use crate::spans;
use crate::telemetry::{Outcome, StreamMetrics};

/// The longest wait for a retry; longer delays (`retry_after(Duration::MAX)`) are cut to it.
/// The entry stays pending with this consumer, kept fresh, meanwhile.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Starts handler work for batches of deliveries.
pub(super) struct Dispatcher {
    pub(super) shared: Arc<DeliveryEnv>,
    pub(super) tasks: TaskTracker,
    pub(super) abandon: CancellationToken,
}

/// What every delivery's handling needs, shared by all of them.
pub(super) struct DeliveryEnv {
    pub(super) broker: Arc<dyn Broker>,
    pub(super) routes: Arc<[Route]>,
    pub(super) group: Arc<str>,
    pub(super) consumer: Arc<str>,
    pub(super) handler_timeout: Duration,
    pub(super) retry_base: Duration,
    pub(super) retry_max: Duration,
    pub(super) dead_letter_max_len: Option<usize>,
    pub(super) acks: AckSender,
    pub(super) retries: mpsc::UnboundedSender<RetryRequest>,
    /// Until when the reader's blocking read waits, so that a retry due before then can
    /// wake it (and only such a retry).
    pub(super) blocked_read: Arc<BlockedRead>,
    pub(super) publisher: Publisher,
    /// The level of each delivery's span.
    pub(super) span_level: tracing::Level,
    /// Each route's metric handles, by stream index.
    pub(super) metrics: Box<[StreamMetrics]>,
    /// The due times of `retry_after` retries, kept across restarts.
    pub(super) retry_dues: RetryDues,
    /// Cancelled when the listener starts shutting down: a retry decided after that never
    /// runs here, so its log says the entry stays pending instead.
    pub(super) shutting_down: CancellationToken,
}

/// One delivery's entry, with what it holds, between its handler's outcome and its
/// settlement.
pub(super) struct Attempt {
    pub(super) id: crate::EntryId,
    pub(super) delivery_count: u64,
    pub(super) slot: OwnedSemaphorePermit,
    pub(super) held: Held,
}

/// How one delivery ended.
pub(super) enum AttemptOutcome {
    Handled,
    /// The entry was deleted or trimmed from the stream while pending.
    Deleted,
    Decode(DecodeError),
    Failed(HandlerError),
    TimedOut,
    Panicked(String),
    /// The entry arrived with more deliveries than allowed: the consumers that held it
    /// before stopped while handling it (a crash, a kill), so it never ran to an end.
    Exhausted,
    /// Shutdown's grace period ended first.
    Abandoned,
}

impl AttemptOutcome {
    /// The outcome as the DEBUG line of each attempt says it: the `outcome` label of the
    /// metrics where there is one.
    fn word(&self) -> &'static str {
        match self {
            AttemptOutcome::Handled => "ok",
            AttemptOutcome::Deleted => "deleted",
            AttemptOutcome::Decode(_) => "decode",
            AttemptOutcome::Failed(_) => "error",
            AttemptOutcome::TimedOut => "timeout",
            AttemptOutcome::Panicked(_) => "panic",
            AttemptOutcome::Exhausted => "exhausted",
            AttemptOutcome::Abandoned => "abandoned",
        }
    }
}

/// What the task does with the entry after the handler.
enum Verdict {
    Ack,
    /// A retry after `delay`; `asked` when the handler asked for that delay
    /// (`retry_after`), whose due time is kept across restarts.
    Retry {
        delay: Duration,
        asked: bool,
    },
    DeadLetter(DeadLetterReason, String),
    Leave,
}

/// One delivery with its handler slot and its place among the held entries, ready to run.
pub(super) struct Job {
    pub(super) stream_index: usize,
    pub(super) delivery: Delivery,
    pub(super) slot: OwnedSemaphorePermit,
    pub(super) held: Held,
}

/// The handling of one delivery.
pub(super) struct Task<'a> {
    pub(super) shared: &'a DeliveryEnv,
    pub(super) stream_index: usize,
    /// Cancelled when this attempt is abandoned or times out; the handler's context holds it.
    pub(super) cancellation: CancellationToken,
    /// Cancelled when the grace period of a shutdown is over: what follows the handler (a
    /// dead-letter move tried again) stops only then, not when the attempt timed out.
    pub(super) abandon: CancellationToken,
    /// Cancelled when the batch's handler timeout has passed.
    pub(super) timed_out: &'a CancellationToken,
    pub(super) deadline: Instant,
    /// Whether the handler has a timeout of its own, timed by this task rather than by
    /// the batch's timer.
    pub(super) own_timeout: bool,
}

impl Dispatcher {
    /// Runs deliveries that start together: split into one task per runtime worker, each
    /// running its part concurrently.
    ///
    /// A task per worker rather than per delivery, and one timer per task for the common
    /// deadline rather than one per handler: with the no-op handler of the `consume`
    /// benchmark, spawning, timing and tearing down a task per entry took about a fifth
    /// of the consumer's instructions. Splitting by worker still lets the handlers of one
    /// read run in parallel on a multi-threaded runtime (the `cpu-2` benchmark case), and
    /// each handler releases its slot as soon as it is done.
    pub(super) fn spawn(&self, mut jobs: Vec<Job>) {
        self.spawn_batches(&mut jobs);
        if jobs.is_empty() {
            return;
        }
        let workers = tokio::runtime::Handle::current()
            .metrics()
            .num_workers()
            .max(1);
        let part = jobs.len().div_ceil(workers);
        while jobs.len() > part {
            let rest = jobs.split_off(part);
            self.spawn_part(std::mem::replace(&mut jobs, rest));
        }
        self.spawn_part(jobs);
    }

    fn spawn_part(&self, jobs: Vec<Job>) {
        let shared = self.shared.clone();
        let abandon = self.abandon.clone();
        self.tasks.spawn(async move {
            let started = Instant::now();
            let deadline = started + shared.handler_timeout;
            let timed_out = CancellationToken::new();
            let mut running: FuturesUnordered<_> = jobs
                .into_iter()
                .map(|job| {
                    let own_timeout = shared.routes[job.stream_index].handler_timeout;
                    let task = Task {
                        shared: &shared,
                        stream_index: job.stream_index,
                        cancellation: abandon.child_token(),
                        abandon: abandon.clone(),
                        timed_out: &timed_out,
                        deadline: own_timeout.map_or(deadline, |timeout| started + timeout),
                        own_timeout: own_timeout.is_some(),
                    };
                    task.run(job.delivery, job.slot, job.held)
                })
                .collect();
            let timer = tokio::time::sleep_until(deadline);
            tokio::pin!(timer);
            loop {
                tokio::select! {
                    biased;
                    done = running.next() => if done.is_none() {
                        break;
                    },
                    () = &mut timer, if !timed_out.is_cancelled() => timed_out.cancel(),
                }
            }
        });
    }
}

impl Task<'_> {
    fn route(&self) -> &Route {
        &self.shared.routes[self.stream_index]
    }

    fn state(&self) -> &StreamState {
        &self.route().state
    }

    fn metrics(&self) -> &StreamMetrics {
        &self.shared.metrics[self.stream_index]
    }

    /// Runs the delivery in its span, which the handler's own events and spans nest under.
    async fn run(self, delivery: Delivery, slot: OwnedSemaphorePermit, held: Held) {
        let span = spans::process_span(
            self.shared.span_level,
            &self.route().stream,
            &self.shared.group,
            &self.shared.consumer,
            delivery.id,
            delivery.delivery_count,
        );
        #[cfg(feature = "opentelemetry")]
        crate::otel::continue_trace(&span, delivery.fields.as_ref());
        self.settle(delivery, slot, held).instrument(span).await;
    }

    async fn settle(self, delivery: Delivery, slot: OwnedSemaphorePermit, held: Held) {
        let id = delivery.id;
        let delivery_count = delivery.delivery_count;
        let started = Instant::now();
        let outcome = self.call(delivery).await;
        let attempt = Attempt {
            id,
            delivery_count,
            slot,
            held,
        };
        self.conclude(outcome, started, attempt).await;
    }

    /// Acknowledges, retries or dead-letters the entry of `attempt` after its outcome.
    pub(super) async fn conclude(
        &self,
        outcome: AttemptOutcome,
        started: Instant,
        attempt: Attempt,
    ) {
        let Attempt {
            id,
            delivery_count,
            slot,
            held,
        } = attempt;
        tracing::debug!(outcome = outcome.word(), took = ?started.elapsed(), "delivery attempt ended");
        // What follows the handler (a retry's wait, a dead-letter move) holds no slot: the
        // entry stays among the held ones until it is settled.
        // Counted before the slot is free: the reader, waiting for the slot, then knows.
        self.record_attempt(id, &outcome);
        drop(slot);
        let broker = &*self.shared.broker;
        let dues = &self.shared.retry_dues;
        match self.verdict(outcome, id, delivery_count) {
            Verdict::Ack => {
                self.shared.acks.ack(self.stream_index, id, held);
                dues.forget(broker, self.stream_index, id).await;
            }
            Verdict::Leave => {}
            Verdict::Retry { delay, asked } => {
                self.metrics().retried();
                if asked {
                    let delay = delay.min(MAX_RETRY_DELAY);
                    dues.record(broker, self.stream_index, id, delay).await;
                } else {
                    dues.forget(broker, self.stream_index, id).await;
                }
                self.retry(id, delivery_count, delay, held).await;
            }
            Verdict::DeadLetter(reason, error) => {
                self.dead_letter(id, delivery_count, reason, &error, held)
                    .await;
                dues.forget(broker, self.stream_index, id).await;
            }
        }
    }

    /// Counts the attempt towards pausing reads of the stream: failures that may heal
    /// count, decode and permanent failures say nothing about the handler's health.
    fn record_attempt(&self, id: crate::EntryId, outcome: &AttemptOutcome) {
        let stream = &*self.route().stream;
        let state = self.state();
        match outcome {
            AttemptOutcome::Handled => state.record_success(stream),
            AttemptOutcome::Failed(error) if !matches!(error.retry(), Retry::Never) => {
                state.record_failure(stream, id, &error.to_string());
            }
            AttemptOutcome::TimedOut => state.record_failure(stream, id, "the handler timed out"),
            AttemptOutcome::Panicked(message) => {
                state.record_failure(stream, id, &format!("the handler panicked: {message}"))
            }
            _ => {}
        }
    }

    async fn call(&self, delivery: Delivery) -> AttemptOutcome {
        let route = self.route();
        let Some(fields) = delivery.fields else {
            return AttemptOutcome::Deleted;
        };
        if delivery.delivery_count > route.max_deliveries {
            return AttemptOutcome::Exhausted;
        }
        let ctx = Context::new(
            route.stream.clone(),
            self.shared.group.clone(),
            self.shared.consumer.clone(),
            delivery.id,
            delivery.delivery_count,
            self.deadline,
            self.cancellation.clone(),
            self.shared.publisher.clone(),
        )
        .with_headers(Headers::of_entry(&fields))
        .with_partition(route.partition);
        let metrics = self.metrics();
        metrics.started(delivery.id);
        let started = Instant::now();
        // Decoding runs inside the catch too: a panicking `Deserialize` impl is a bug like
        // any other and must not take the bus down.
        let RegisteredHandler::One(handler) = &route.handler else {
            unreachable!("batch handlers' deliveries run in batches")
        };
        let call = AssertUnwindSafe(async {
            match handler.call(&fields, ctx) {
                Ok(future) => Ok(future.await),
                Err(error) => Err(DecodeError {
                    stream: route.stream.to_string(),
                    entry_id: delivery.id,
                    field: error.field,
                    reason: error.reason,
                }),
            }
        })
        .catch_unwind();
        let (outcome, emitted) = tokio::select! {
            result = call => match result {
                Ok(Ok(Ok(emit))) => (AttemptOutcome::Handled, emit),
                Ok(Ok(Err(error))) => (AttemptOutcome::Failed(error), Emit::new()),
                Ok(Err(error)) => (AttemptOutcome::Decode(error), Emit::new()),
                Err(panic) => (AttemptOutcome::Panicked(panic_message(&*panic)), Emit::new()),
            },
            () = self.timed_out.cancelled(), if !self.own_timeout => (AttemptOutcome::TimedOut, Emit::new()),
            () = tokio::time::sleep_until(self.deadline), if self.own_timeout => (AttemptOutcome::TimedOut, Emit::new()),
            () = self.cancellation.cancelled() => (AttemptOutcome::Abandoned, Emit::new()),
        };
        // The handler's events go out before its entry is acknowledged, never after: a
        // publish that fails fails the attempt.
        let outcome = if matches!(outcome, AttemptOutcome::Handled) && !emitted.is_empty() {
            tokio::select! {
                published = self.publish_emitted(emitted) => match published {
                    Ok(()) => AttemptOutcome::Handled,
                    Err(error) => AttemptOutcome::Failed(HandlerError::new(format!(
                        "publishing the events the handler returned failed, so the entry was not acknowledged: {}",
                        report(&error)
                    ))),
                },
                () = self.cancellation.cancelled() => AttemptOutcome::Abandoned,
            }
        } else {
            outcome
        };
        metrics.finished(
            started.elapsed(),
            match &outcome {
                AttemptOutcome::Handled => Some(Outcome::Ok),
                AttemptOutcome::Failed(_) => Some(Outcome::Error),
                AttemptOutcome::TimedOut => Some(Outcome::Timeout),
                AttemptOutcome::Panicked(_) => Some(Outcome::Panic),
                AttemptOutcome::Decode(_) => Some(Outcome::Decode),
                _ => None,
            },
        );
        if matches!(outcome, AttemptOutcome::TimedOut) {
            // The handler's future is gone; this stops what it spawned and tied to its context.
            self.cancellation.cancel();
        }
        outcome
    }

    /// Publishes the events a handler returned: one batch per stream (or partition), all
    /// sent at once so that they share the publisher's pipeline.
    async fn publish_emitted(&self, emit: Emit) -> crate::Result<()> {
        self.shared.publisher.publish_emitted(emit).await.map(drop)
    }

    fn verdict(&self, outcome: AttemptOutcome, id: crate::EntryId, delivery_count: u64) -> Verdict {
        let stream = &*self.route().stream;
        let max_deliveries = self.route().max_deliveries;
        let retry_or_give_up = |reason: DeadLetterReason,
                                error: String,
                                delay: Option<Duration>| {
            if delivery_count >= max_deliveries {
                tracing::warn!(stream, entry_id = %id, delivery_count, %error, "{reason} failure on the last allowed delivery; dead-lettering");
                return Verdict::DeadLetter(reason, error);
            }
            let asked = delay.is_some();
            let delay = delay.unwrap_or_else(|| self.backoff(delivery_count));
            if self.shared.shutting_down.is_cancelled() {
                tracing::warn!(stream, entry_id = %id, delivery_count, %error, "{reason} failure while shutting down; the entry stays pending, for this consumer's next start or another consumer's claim");
            } else {
                tracing::warn!(stream, entry_id = %id, delivery_count, %error, retry_in = ?delay, "{reason} failure; will retry");
            }
            Verdict::Retry { delay, asked }
        };
        match outcome {
            AttemptOutcome::Handled => Verdict::Ack,
            AttemptOutcome::Deleted => {
                tracing::warn!(stream, entry_id = %id, "pending entry was deleted from the stream; acknowledging it");
                Verdict::Ack
            }
            AttemptOutcome::Decode(error) => {
                tracing::error!(stream, entry_id = %id, %error, "entry does not decode; dead-lettering");
                Verdict::DeadLetter(DeadLetterReason::Decode, error.to_string())
            }
            AttemptOutcome::Failed(error) => match error.retry() {
                Retry::Never => {
                    tracing::warn!(stream, entry_id = %id, %error, "permanent failure; dead-lettering");
                    Verdict::DeadLetter(DeadLetterReason::Permanent, error.to_string())
                }
                Retry::After(delay) => {
                    retry_or_give_up(DeadLetterReason::Handler, error.to_string(), Some(delay))
                }
                _ => retry_or_give_up(DeadLetterReason::Handler, error.to_string(), None),
            },
            AttemptOutcome::TimedOut => retry_or_give_up(
                DeadLetterReason::Timeout,
                format!(
                    "the handler did not finish within {:?}",
                    self.route()
                        .handler_timeout
                        .unwrap_or(self.shared.handler_timeout)
                ),
                None,
            ),
            AttemptOutcome::Panicked(message) => retry_or_give_up(
                DeadLetterReason::Panic,
                format!("the handler panicked: {message}"),
                None,
            ),
            AttemptOutcome::Exhausted => {
                let error = format!(
                    "delivered {delivery_count} times without an outcome: the consumers that held it stopped while handling it"
                );
                tracing::warn!(stream, entry_id = %id, delivery_count, "{error}; dead-lettering");
                Verdict::DeadLetter(DeadLetterReason::Handler, error)
            }
            AttemptOutcome::Abandoned => {
                tracing::warn!(stream, entry_id = %id, "handler abandoned at shutdown; the entry stays pending");
                Verdict::Leave
            }
        }
    }

    /// The delay before the retry after delivery `delivery_count`.
    fn backoff(&self, delivery_count: u64) -> Duration {
        let attempt = u32::try_from(delivery_count.saturating_sub(1)).unwrap_or(u32::MAX);
        exponential(self.shared.retry_base, self.shared.retry_max, attempt)
    }

    async fn retry(&self, id: crate::EntryId, delivery_count: u64, delay: Duration, held: Held) {
        let due = Instant::now() + delay.min(MAX_RETRY_DELAY);
        let request = RetryRequest {
            due,
            stream_index: self.stream_index,
            id,
            delivery_count,
            held,
        };
        if self.shared.retries.send(request).is_err() {
            // The reader is gone at shutdown: the entry simply stays pending.
            return;
        }
        // The reader may be blocked reading an idle stream; wake it only if the retry is
        // due before that read returns on its own. A wake that comes just before the read
        // blocks is lost, which delays the retry by at most one block time.
        if !self.shared.blocked_read.returns_after(due) {
            return;
        }
        if let Err(error) = self.shared.broker.wake_reader().await {
            tracing::debug!(
                error = &error as &dyn std::error::Error,
                "could not wake the reader for a retry"
            );
        }
    }

    /// Moves the entry to its dead-letter stream. A failed move is tried again on a
    /// backoff, never by running the handler again, until it succeeds or the grace period
    /// of a shutdown is over (the entry then stays pending, handed over). The entry stays
    /// held meanwhile, kept fresh, so no claim scan runs its handler again.
    async fn dead_letter(
        &self,
        id: crate::EntryId,
        delivery_count: u64,
        reason: DeadLetterReason,
        error: &str,
        held: Held,
    ) {
        let route = self.route();
        let meta = DeadLetterMeta {
            origin_stream: &route.stream,
            origin_id: id,
            group: &self.shared.group,
            consumer: &self.shared.consumer,
            delivery_count,
            reason,
            error,
        }
        .fields();
        let stream = &*route.stream;
        let mut backoff = Backoff::new(Duration::from_millis(100), self.shared.retry_max);
        let mut failing = false;
        let moved = loop {
            let moved = self
                .shared
                .broker
                .dead_letter(
                    &route.stream,
                    &route.dead_letters,
                    &self.shared.group,
                    &self.shared.consumer,
                    id,
                    &meta,
                    self.shared.dead_letter_max_len,
                )
                .await;
            match moved {
                Ok(moved) => break Some(moved),
                Err(move_error @ Error::CrossSlot { .. }) => {
                    // The keys do not share a slot: waiting changes nothing, so the entry
                    // stays pending and the error is for an operator.
                    tracing::error!(stream, entry_id = %id, %reason, error = &move_error as &dyn std::error::Error, "cannot move the entry to its dead-letter stream; it stays pending");
                    break None;
                }
                Err(move_error) => {
                    if !failing {
                        failing = true;
                        self.state().add_failing_move();
                    }
                    self.state().move_failed(report(&move_error));
                    let delay = backoff.next_delay();
                    tracing::warn!(stream, entry_id = %id, %reason, attempt = backoff.attempts(), error = &move_error as &dyn std::error::Error, retry_in = ?delay, "moving the entry to its dead-letter stream failed; will try the move again");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.abandon.cancelled() => break None,
                    }
                }
            }
        };
        if failing {
            self.state().remove_failing_move();
        }
        if moved.is_some() {
            held.settle();
        }
        match moved {
            Some(DeadLetterMove::Moved { trimmed }) => {
                self.metrics().dead_lettered(reason);
                tracing::info!(stream, entry_id = %id, dead_letters = %route.dead_letters, %reason, "dead-lettered");
                if trimmed > 0 {
                    tracing::warn!(stream, dead_letters = %route.dead_letters, trimmed, max_len = ?self.shared.dead_letter_max_len, "dead_letter_max_len reached: deleted the oldest dead letters");
                }
            }
            Some(DeadLetterMove::Deleted) => {
                tracing::warn!(stream, entry_id = %id, "entry to dead-letter was deleted from the stream; acknowledged it")
            }
            Some(DeadLetterMove::NotPending) => {
                tracing::info!(stream, entry_id = %id, "entry to dead-letter is no longer pending with this consumer; leaving it")
            }
            None => {
                tracing::warn!(stream, entry_id = %id, "shutting down before the entry could be dead-lettered; it stays pending")
            }
        }
    }
}
