//! The read loop: it alone takes handler slots and places among the held entries for new
//! work (new entries, own pending entries, claims, retries), so that nothing is fetched that
//! could not be held.

mod claims;
mod new_entries;
mod recovery;
mod reservation;
mod retries;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use self::claims::ClaimScan;
use self::recovery::Recovery;
use self::reservation::Reservation;
use super::dispatch::{Dispatcher, Job};
use super::in_flight::Held;
use super::keep_fresh::{HeldId, HeldIds};
use super::read_window::ReadWindow;
use super::retry::{BlockedRead, RetryQueue, RetryRequest};
use super::{Backoff, Consumer, Route};
use crate::broker::Delivery;
use crate::error::{Error, Result};
use crate::event::EntryId;

/// The read loop. It alone takes handler slots and places for new work (new entries, own
/// pending entries, claims, retries), so that nothing is fetched that could not be held.
pub(super) struct Reader<'a> {
    consumer: &'a Consumer,
    streams: Arc<[Arc<str>]>,
    /// Handler slots: `max_concurrent`.
    slots: Arc<Semaphore>,
    /// Places among the entries this consumer holds pending: `max_in_flight`.
    places: Arc<Semaphore>,
    dispatcher: Dispatcher,
    retries: RetryQueue,
    claims: ClaimScan,
    recovery: Option<Recovery>,
    window: ReadWindow,
    blocked_read: Arc<BlockedRead>,
    backoff: Backoff,
    /// The highest id delivered to this consumer on each stream since it started: where a
    /// lost group is created again.
    delivered_up_to: Vec<Option<EntryId>>,
    /// The ids this consumer holds, kept fresh on the server.
    held_ids: Arc<HeldIds>,
    /// Streams whose claim lost its reply: their own pending entries not held are looked
    /// for, first stream first.
    lost: Vec<usize>,
}

impl<'a> Reader<'a> {
    pub(super) fn new(
        consumer: &'a Consumer,
        streams: Arc<[Arc<str>]>,
        dispatcher: Dispatcher,
        blocked_read: Arc<BlockedRead>,
        retry_requests: mpsc::UnboundedReceiver<RetryRequest>,
        held_ids: Arc<HeldIds>,
    ) -> Self {
        Reader {
            consumer,
            slots: Arc::new(Semaphore::new(consumer.max_concurrent)),
            places: Arc::new(Semaphore::new(consumer.max_in_flight)),
            claims: ClaimScan {
                next_at: Instant::now() + consumer.claim_interval,
                stream_index: 0,
                cursor: EntryId::MIN,
            },
            recovery: Some(Recovery {
                stream_index: 0,
                after: EntryId::MIN,
                recovered: 0,
                then: (1..streams.len()).collect(),
            }),
            retries: RetryQueue::new(retry_requests),
            window: ReadWindow::new(streams.len()),
            delivered_up_to: vec![None; streams.len()],
            streams,
            dispatcher,
            blocked_read,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            held_ids,
            lost: Vec::new(),
        }
    }
}

impl Reader<'_> {
    pub(super) async fn run(mut self) -> Result<()> {
        loop {
            self.retries.collect();
            self.run_due_retries().await?;
            self.claim_if_due().await?;
            self.claim_lost().await?;
            if self.recovery.is_some() {
                self.recover_own_pending().await?;
            } else {
                self.read_new().await?;
            }
        }
    }

    fn route(&self, stream_index: usize) -> &Route {
        &self.consumer.routes[stream_index]
    }

    /// When the reader must be back from a blocking read or a wait: the next retry or
    /// claim scan needs it.
    fn wake_at(&self) -> Instant {
        let mut wake_at = self.claims.next_at;
        if let Some(due) = self.retries.next_due() {
            wake_at = wake_at.min(due);
        }
        wake_at
    }

    /// Starts handling `deliveries`, each with a slot and a place of `reservation`. A
    /// well-behaved server returns no more entries than were asked for, so a place is
    /// always there; an entry beyond them stays pending with this consumer unhandled (it
    /// is delivered again when the consumer restarts, or claimed by another) rather than
    /// exceed `max_in_flight`. An entry without a free slot waits for one.
    async fn dispatch(
        &mut self,
        stream_index: usize,
        deliveries: Vec<Delivery>,
        reservation: &mut Reservation,
    ) {
        let state = self.route(stream_index).state.clone();
        if let Some(highest) = deliveries.iter().map(|delivery| delivery.id).max() {
            let known = &mut self.delivered_up_to[stream_index];
            *known = (*known).max(Some(highest));
        }
        let mut jobs = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let Some(id) = HeldId::register(
                &self.held_ids,
                stream_index,
                delivery.id,
                delivery.delivered_at,
            ) else {
                // Delivered again while this consumer works on it (a recovery read of its
                // own pending entries): one entry, one run. The delivery reset its idle
                // time, which a retry claim measures from.
                self.held_ids
                    .refreshed(stream_index, delivery.id, delivery.delivered_at);
                tracing::debug!(stream = %self.streams[stream_index], entry_id = %delivery.id, "entry delivered again while held; not running it a second time");
                continue;
            };
            let Some(place) = reservation.places.split(1) else {
                tracing::error!(stream = %self.streams[stream_index], entry_id = %delivery.id, "the server returned more entries than were asked for; leaving this one pending");
                continue;
            };
            let slot = match reservation.slots.split(1) {
                Some(slot) => slot,
                None => {
                    self.dispatcher.spawn(std::mem::take(&mut jobs));
                    self.reserve_slots(1).await
                }
            };
            jobs.push(Job {
                stream_index,
                delivery,
                slot,
                held: Held::new(place, state.clone(), id),
            });
        }
        self.dispatcher.spawn(jobs);
    }

    /// A command succeeded: says so at INFO when commands failed before, and starts the
    /// backoff over.
    fn recovered(&mut self) {
        let failed_attempts = self.backoff.attempts();
        if failed_attempts > 0 {
            tracing::info!(
                group = %self.consumer.group,
                consumer = %self.consumer.consumer,
                failed_attempts,
                "redis answers the listener again after a failure"
            );
            self.backoff.reset();
        }
    }

    /// Deals with a failed command: recreates a vanished group, waits out a transient
    /// error with backoff, or gives up on an error that cannot heal.
    async fn heal(&mut self, error: Error) -> Result<Healed> {
        let c = self.consumer;
        match &error {
            Error::WrongType { stream, .. } => {
                let Some(index) = self.streams.iter().position(|s| **s == **stream) else {
                    return Err(error);
                };
                c.set_stream_aside(index, &error);
                if c.set_aside.all() {
                    return Err(error);
                }
                return Ok(Healed::Retry);
            }
            Error::Redis { source, .. } if is_refused_access(source) => return Err(error),
            Error::Redis { .. } if error.server_code().as_deref() == Some("NOGROUP") => {
                let streams: Vec<&str> = self.streams.iter().map(|s| &**s).collect();
                tracing::warn!(
                    group = %c.group,
                    ?streams,
                    error = &error as &dyn std::error::Error,
                    "consumer group or stream is gone (deleted, flushed, or Redis restarted without persistence); creating the group again where it is gone"
                );
                match c.recreate_groups(&self.delivered_up_to).await {
                    Ok(()) => return Ok(Healed::GroupRecreated),
                    Err(error @ Error::WrongType { .. }) => return Err(error),
                    Err(error) => tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        "recreating the consumer group failed"
                    ),
                }
            }
            _ => {}
        }
        let delay = self.backoff.next_delay();
        // The first failure at WARN, the next ones, until a command succeeds again (one
        // INFO line then, see `recovered`), at DEBUG: a failover or an outage is a few
        // lines that say what happened, not one per backoff step.
        if self.backoff.attempts() == 1 {
            tracing::warn!(error = &error as &dyn std::error::Error, retry_in = ?delay, "redis command failed; retrying with backoff, further failures at DEBUG until redis answers again");
        } else {
            tracing::debug!(error = &error as &dyn std::error::Error, attempt = self.backoff.attempts(), retry_in = ?delay, "redis command failed again");
        }
        tokio::time::sleep(delay).await;
        Ok(Healed::Retry)
    }
}

/// Errors that waiting cannot heal: the server refuses these credentials or commands.
pub(crate) fn is_refused_access(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(
            crate::error::server_code(error).as_deref(),
            Some("NOAUTH" | "WRONGPASS" | "NOPERM")
        )
}

#[derive(Debug, PartialEq, Eq)]
enum Healed {
    Retry,
    GroupRecreated,
}
