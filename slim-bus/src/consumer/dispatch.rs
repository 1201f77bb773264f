//! Runs one delivery: decode, call the handler under its timeout with panics caught, and
//! acknowledge on success.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Route;
use super::ack::AckSender;
use crate::broker::Delivery;
use crate::context::Context;
use crate::error::{DecodeError, HandlerError};

pub(super) struct Dispatcher {
    pub(super) routes: Arc<[Route]>,
    pub(super) group: Arc<str>,
    pub(super) consumer: Arc<str>,
    pub(super) handler_timeout: Duration,
    pub(super) acks: AckSender,
    pub(super) tasks: TaskTracker,
    pub(super) abandon: CancellationToken,
}

/// How one delivery ended.
enum Outcome {
    Handled,
    /// The entry was deleted or trimmed from the stream while pending.
    Deleted,
    Decode(DecodeError),
    Failed(HandlerError),
    TimedOut,
    Panicked(String),
    /// Shutdown's grace period ended first.
    Abandoned,
}

impl Dispatcher {
    /// Starts a task for `delivery`, holding `slot` (or waiting for one) until it ends.
    pub(super) fn spawn(
        &self,
        stream_index: usize,
        delivery: Delivery,
        slot: Option<OwnedSemaphorePermit>,
        slots: Arc<Semaphore>,
    ) {
        let routes = self.routes.clone();
        let group = self.group.clone();
        let consumer = self.consumer.clone();
        let handler_timeout = self.handler_timeout;
        let acks = self.acks.clone();
        let cancellation = self.abandon.child_token();
        self.tasks.spawn(async move {
            let _slot = match slot {
                Some(slot) => slot,
                None => match slots.acquire_owned().await {
                    Ok(slot) => slot,
                    Err(_) => unreachable!("the semaphore is never closed"),
                },
            };
            let route = &routes[stream_index];
            let id = delivery.id;
            let outcome = run(route, group, consumer, delivery, handler_timeout, cancellation).await;
            let stream = &*route.stream;
            match outcome {
                Outcome::Handled => acks.ack(stream_index, id),
                Outcome::Deleted => {
                    tracing::warn!(stream, entry_id = %id, "pending entry was deleted from the stream; acknowledging it");
                    acks.ack(stream_index, id);
                }
                Outcome::Decode(error) => {
                    tracing::error!(stream, entry_id = %id, %error, "entry does not decode; it stays pending");
                }
                Outcome::Failed(error) => {
                    tracing::warn!(stream, entry_id = %id, %error, "handler failed; the entry stays pending");
                }
                Outcome::TimedOut => {
                    tracing::warn!(stream, entry_id = %id, timeout = ?handler_timeout, "handler timed out and was cancelled; the entry stays pending");
                }
                Outcome::Panicked(message) => {
                    tracing::error!(stream, entry_id = %id, panic = %message, "handler panicked; the entry stays pending");
                }
                Outcome::Abandoned => {
                    tracing::warn!(stream, entry_id = %id, "handler abandoned at shutdown; the entry stays pending");
                }
            }
        });
    }
}

async fn run(
    route: &Route,
    group: Arc<str>,
    consumer: Arc<str>,
    delivery: Delivery,
    handler_timeout: Duration,
    cancellation: CancellationToken,
) -> Outcome {
    let Some(fields) = delivery.fields else {
        return Outcome::Deleted;
    };
    let deadline = Instant::now() + handler_timeout;
    let ctx = Context::new(
        route.stream.clone(),
        group,
        consumer,
        delivery.id,
        delivery.delivery_count,
        deadline,
        cancellation.clone(),
    );
    // Decoding runs inside the catch too: a panicking `Deserialize` impl is a handler bug
    // like any other and must not take the bus down.
    let call = AssertUnwindSafe(async {
        match route.handler.call(&fields, ctx) {
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
    let outcome = tokio::select! {
        result = tokio::time::timeout_at(deadline, call) => match result {
            Ok(Ok(Ok(Ok(())))) => Outcome::Handled,
            Ok(Ok(Ok(Err(error)))) => Outcome::Failed(error),
            Ok(Ok(Err(error))) => Outcome::Decode(error),
            Ok(Err(panic)) => Outcome::Panicked(panic_message(&*panic)),
            Err(_) => Outcome::TimedOut,
        },
        () = cancellation.cancelled() => Outcome::Abandoned,
    };
    if matches!(outcome, Outcome::TimedOut) {
        // The handler's future is gone; this stops what it spawned and tied to its context.
        cancellation.cancel();
    }
    outcome
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "a panic without a message".to_owned()
    }
}
