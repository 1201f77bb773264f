//! Runs the deliveries of a batch handler's stream: one call per batch, then each entry
//! settled on its own, as a single handler's would be.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::join_all;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::dispatch::{Attempt, AttemptOutcome, DeliveryEnv, Dispatcher, Job, Task};
use crate::batch::ErasedBatchHandler;
use crate::context::Context;
use crate::error::{DecodeError, panic_message};
use crate::handler::RegisteredHandler;
use crate::headers::Headers;
use crate::spans;
use crate::telemetry::Outcome;

impl Dispatcher {
    /// Takes the jobs of batch handlers' streams out of `jobs` and starts them, in batches
    /// of at most each handler's `max_batch`; the rest is left for single handlers.
    pub(super) fn spawn_batches(&self, jobs: &mut Vec<Job>) {
        let routes = &self.shared.routes;
        let is_batch = |job: &Job| {
            matches!(
                routes[job.stream_index].handler,
                RegisteredHandler::Batch(_)
            )
        };
        if !jobs.iter().any(is_batch) {
            return;
        }
        let (batched, single): (Vec<Job>, Vec<Job>) =
            std::mem::take(jobs).into_iter().partition(is_batch);
        *jobs = single;
        let mut by_stream: Vec<(usize, Vec<Job>)> = Vec::new();
        for job in batched {
            match by_stream
                .iter_mut()
                .find(|(index, _)| *index == job.stream_index)
            {
                Some((_, jobs)) => jobs.push(job),
                None => by_stream.push((job.stream_index, vec![job])),
            }
        }
        for (stream_index, mut jobs) in by_stream {
            let RegisteredHandler::Batch(handler) = &routes[stream_index].handler else {
                continue;
            };
            let max_batch = handler.max_batch().max(1);
            while !jobs.is_empty() {
                let rest = jobs.split_off(max_batch.min(jobs.len()));
                let batch = std::mem::replace(&mut jobs, rest);
                self.tasks.spawn(run_batch(
                    self.shared.clone(),
                    self.abandon.clone(),
                    stream_index,
                    handler.clone(),
                    batch,
                ));
            }
        }
    }
}

/// One batch: settles what needs no call (deleted, exhausted), calls the handler with the
/// rest under the timeout, and settles each entry by its own outcome.
async fn run_batch(
    shared: Arc<DeliveryEnv>,
    abandon: CancellationToken,
    stream_index: usize,
    handler: Arc<dyn ErasedBatchHandler>,
    jobs: Vec<Job>,
) {
    let cancellation = abandon.child_token();
    let route = &shared.routes[stream_index];
    let span = spans::batch_process_span(
        shared.span_level,
        &route.stream,
        &shared.group,
        &shared.consumer,
        jobs.len(),
    );
    async {
        let started = Instant::now();
        let deadline = started + route.handler_timeout.unwrap_or(shared.handler_timeout);
        // The batch has a timer of its own: the shared one is for single handlers.
        let unused_timer = CancellationToken::new();
        let task = Task {
            shared: &shared,
            stream_index,
            cancellation: cancellation.clone(),
            abandon: abandon.clone(),
            timed_out: &unused_timer,
            deadline,
            own_timeout: true,
        };
        let metrics = &shared.metrics[stream_index];
        let mut settled = Vec::with_capacity(jobs.len());
        let mut called = Vec::with_capacity(jobs.len());
        for job in jobs {
            let delivery = job.delivery;
            let attempt = Attempt {
                id: delivery.id,
                delivery_count: delivery.delivery_count,
                slot: job.slot,
                held: job.held,
            };
            match delivery.fields {
                None => settled.push((AttemptOutcome::Deleted, attempt)),
                Some(_) if delivery.delivery_count > route.max_deliveries => {
                    settled.push((AttemptOutcome::Exhausted, attempt));
                }
                Some(fields) => {
                    let ctx = Context::new(
                        route.stream.clone(),
                        shared.group.clone(),
                        shared.consumer.clone(),
                        delivery.id,
                        delivery.delivery_count,
                        deadline,
                        cancellation.clone(),
                        shared.publisher.clone(),
                    )
                    .with_headers(Headers::of_entry(&fields))
                    .with_partition(route.partition);
                    metrics.started(delivery.id);
                    called.push((fields, ctx, attempt));
                }
            }
        }
        let outcomes = if called.is_empty() {
            Vec::new()
        } else {
            call(&task, &*handler, &called).await
        };
        let took = started.elapsed();
        for ((_, _, attempt), outcome) in called.into_iter().zip(outcomes) {
            metrics.finished(took, metric_outcome(&outcome));
            settled.push((outcome, attempt));
        }
        join_all(settled.into_iter().map(|(outcome, attempt)| {
            // Each entry settles in a span of its own inside the batch's, so that
            // its retry or dead-letter lines carry its id.
            let span = spans::process_span(
                shared.span_level,
                &route.stream,
                &shared.group,
                &shared.consumer,
                attempt.id,
                attempt.delivery_count,
            );
            task.conclude(outcome, started, attempt).instrument(span)
        }))
        .await;
    }
    .instrument(span)
    .await;
}

/// What became of a batch call as a whole, when it did not return an outcome per entry.
enum CallEnd {
    TimedOut,
    Abandoned,
    Panicked(String),
}

impl CallEnd {
    fn outcome(&self) -> AttemptOutcome {
        match self {
            CallEnd::TimedOut => AttemptOutcome::TimedOut,
            CallEnd::Abandoned => AttemptOutcome::Abandoned,
            CallEnd::Panicked(message) => AttemptOutcome::Panicked(message.clone()),
        }
    }
}

/// Decodes and calls; one outcome per entry of `called`, in order. An entry that does not
/// decode is a decode failure whatever becomes of the call of the others (a panic, the
/// timeout): it can never decode on a later delivery, so it is never retried.
async fn call(
    task: &Task<'_>,
    handler: &dyn ErasedBatchHandler,
    called: &[(crate::broker::EntryFields, Context, Attempt)],
) -> Vec<AttemptOutcome> {
    let route = &task.shared.routes[task.stream_index];
    let entries = called
        .iter()
        .map(|(fields, ctx, _)| (fields, ctx.clone()))
        .collect();
    // Decoding is caught too, as for single handlers: a panicking `Deserialize` fails the
    // whole batch, there being no decode result to tell the entries apart.
    let (decode_errors, call) =
        match std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(entries))) {
            Ok(parts) => parts,
            Err(panic) => {
                let message = panic_message(&*panic);
                return called
                    .iter()
                    .map(|_| AttemptOutcome::Panicked(message.clone()))
                    .collect();
            }
        };
    let decoded = decode_errors.iter().filter(|error| error.is_none()).count();
    let outcomes = match call {
        None => Ok(Vec::new()),
        Some(call) => {
            let run = AssertUnwindSafe(call).catch_unwind();
            tokio::select! {
                result = run => result
                    .map(|outcome| outcome.into_outcomes(decoded))
                    .map_err(|panic| CallEnd::Panicked(panic_message(&*panic))),
                () = tokio::time::sleep_until(task.deadline) => {
                    // The handler's future is gone; this stops what it spawned and tied to
                    // its context.
                    task.cancellation.cancel();
                    Err(CallEnd::TimedOut)
                }
                () = task.cancellation.cancelled() => Err(CallEnd::Abandoned),
            }
        }
    };
    let mut outcomes = outcomes.map(Vec::into_iter);
    decode_errors
        .into_iter()
        .zip(called)
        .map(|(error, (_, _, attempt))| match error {
            Some(error) => AttemptOutcome::Decode(DecodeError {
                stream: route.stream.to_string(),
                entry_id: attempt.id,
                field: error.field,
                reason: error.reason,
            }),
            None => match &mut outcomes {
                Err(end) => end.outcome(),
                Ok(outcomes) => match outcomes.next() {
                    Some(Ok(())) => AttemptOutcome::Handled,
                    Some(Err(error)) => AttemptOutcome::Failed(error),
                    None => unreachable!("into_outcomes gives one outcome per decoded entry"),
                },
            },
        })
        .collect()
}

fn metric_outcome(outcome: &AttemptOutcome) -> Option<Outcome> {
    match outcome {
        AttemptOutcome::Handled => Some(Outcome::Ok),
        AttemptOutcome::Failed(_) => Some(Outcome::Error),
        AttemptOutcome::TimedOut => Some(Outcome::Timeout),
        AttemptOutcome::Panicked(_) => Some(Outcome::Panic),
        AttemptOutcome::Decode(_) => Some(Outcome::Decode),
        _ => None,
    }
}
