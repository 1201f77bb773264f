//! Delivering again what this consumer held when it last stopped, before any new entry,
//! with the retries its handlers asked for kept to their time.

use tokio::time::Instant;

use super::{Healed, Reader, Reservation};
use crate::broker::Delivery;
use crate::consumer::in_flight::Held;
use crate::consumer::keep_fresh::HeldId;
use crate::consumer::retry::RetryRequest;
use crate::error::Result;
use crate::event::EntryId;

/// Where the delivery of the entries this consumer held when it last stopped stands: a
/// page per turn of the read loop, one stream after the other, before any new entry.
pub(super) struct Recovery {
    pub(super) stream_index: usize,
    pub(super) after: EntryId,
    pub(super) recovered: usize,
    /// The streams to go through after this one.
    pub(super) then: Vec<usize>,
}

impl Reader<'_> {
    /// Delivers again a page of what this consumer held when it last stopped: entries it
    /// read but never acknowledged. They come before new entries.
    pub(super) async fn recover_own_pending(&mut self) -> Result<()> {
        let c = self.consumer;
        let Some(recovery) = &self.recovery else {
            return Ok(());
        };
        let (stream_index, after) = (recovery.stream_index, recovery.after);
        if c.set_aside.is_set(stream_index) {
            self.next_recovery_stream();
            return Ok(());
        }
        let stream = self.streams[stream_index].clone();
        let Some(mut reservation) = self.reserve(c.max_count).await else {
            return Ok(());
        };
        let count = reservation.len();
        match c
            .broker
            .read_own_pending(&stream, &c.group, &c.consumer, after, count)
            .await
        {
            Ok(deliveries) => {
                self.recovered();
                // Recovering a long pending list is reading: a liveness probe watching
                // `since_last_read` must not take it for a stuck listener.
                c.last_read.record();
                match deliveries.last() {
                    Some(last) => {
                        let last = last.id;
                        if let Some(recovery) = &mut self.recovery {
                            recovery.after = last;
                            recovery.recovered += deliveries.len();
                        }
                        let deliveries = self
                            .wait_for_asked_retries(stream_index, deliveries, &mut reservation)
                            .await;
                        self.dispatch(stream_index, deliveries, &mut reservation)
                            .await;
                    }
                    None => self.next_recovery_stream(),
                }
                Ok(())
            }
            Err(error) => {
                drop(reservation);
                if self.heal(error).await? == Healed::GroupRecreated {
                    // A new group has no pending entries.
                    self.next_recovery_stream();
                }
                // Otherwise the next turn reads the same page again: entries a lost reply
                // delivered are still pending with this consumer after `after`.
                Ok(())
            }
        }
    }

    /// Puts the recovered entries whose `retry_after` is not due yet into the retry queue,
    /// each with a place of `reservation`, instead of running them at once; returns the
    /// others.
    pub(super) async fn wait_for_asked_retries(
        &mut self,
        stream_index: usize,
        deliveries: Vec<Delivery>,
        reservation: &mut Reservation,
    ) -> Vec<Delivery> {
        let ids: Vec<EntryId> = deliveries.iter().map(|delivery| delivery.id).collect();
        let waiting = self
            .dispatcher
            .shared
            .retry_dues
            .waiting(&*self.consumer.broker, stream_index, &ids)
            .await;
        let state = self.route(stream_index).state.clone();
        let mut now_due = Vec::with_capacity(deliveries.len());
        for (delivery, wait) in deliveries.into_iter().zip(waiting) {
            let (Some(wait), Some(_)) = (wait, &delivery.fields) else {
                now_due.push(delivery);
                continue;
            };
            let Some(place) = reservation.places.split(1) else {
                now_due.push(delivery);
                continue;
            };
            let Some(held_id) = HeldId::register(
                &self.held_ids,
                stream_index,
                delivery.id,
                delivery.delivered_at,
            ) else {
                // Held already (a retry of this run): one entry, one run.
                continue;
            };
            tracing::debug!(stream = %self.streams[stream_index], entry_id = %delivery.id, retry_in = ?wait, "recovered entry waits for the retry its handler asked for");
            self.retries.push(RetryRequest {
                due: Instant::now() + wait,
                stream_index,
                id: delivery.id,
                delivery_count: delivery.delivery_count,
                held: Held::new(place, state.clone(), held_id),
            });
        }
        now_due
    }

    pub(super) fn next_recovery_stream(&mut self) {
        let Some(recovery) = &mut self.recovery else {
            return;
        };
        if recovery.recovered > 0 {
            tracing::info!(stream = %self.streams[recovery.stream_index], recovered = recovery.recovered, "delivered this consumer's pending entries again");
        }
        if recovery.then.is_empty() {
            self.recovery = None;
        } else {
            let next = recovery.then.remove(0);
            recovery.stream_index = next;
            recovery.after = EntryId::MIN;
            recovery.recovered = 0;
        }
    }
}
