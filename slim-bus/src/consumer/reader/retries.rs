//! Entries whose retry is due, claimed back to this consumer and run again.

use tokio::time::Instant;

use super::Reader;
use crate::broker::Delivery;
use crate::broker::Unowned;
use crate::consumer::dispatch::Job;
use crate::error::Result;

impl Reader<'_> {
    /// Claims the entries whose retry is due back to this consumer and runs them again.
    /// They hold their places already, so only handler slots are taken here.
    pub(super) async fn run_due_retries(&mut self) -> Result<()> {
        if self
            .retries
            .next_due()
            .is_none_or(|due| due > Instant::now())
        {
            return Ok(());
        }
        // Runs on every turn of the read loop, so it only peeks at the earliest request;
        // what does not fit in the slots reserved here waits for the next turn.
        let mut slots = self
            .reserve_slots(self.retries.len().min(self.consumer.max_count))
            .await;
        let taken = self.retries.pop_due(Instant::now(), slots.num_permits());
        if taken.is_empty() {
            return Ok(());
        }
        let held_ids = self.held_ids.clone();
        let mut lost = Vec::new();
        let mut still_held = Vec::with_capacity(taken.len());
        for request in taken {
            match held_ids.fresh_since(request.stream_index, request.id) {
                Some(_) => still_held.push(request),
                None => lost.push(request),
            }
        }
        for request in lost {
            tracing::debug!(
                stream = %self.streams[request.stream_index],
                entry_id = %request.id,
                "entry due for retry is no longer pending with this consumer (claimed by another, or deleted); leaving it"
            );
            request.held.settle();
        }
        let taken = still_held;
        if taken.is_empty() {
            return Ok(());
        }
        // Claimed back only where the entry is still pending with this consumer: an idle
        // time could not tell a claim by another consumer from this consumer's own
        // commands that reached the server or not.
        let requests: Vec<_> = taken
            .iter()
            .map(|r| (self.streams[r.stream_index].clone(), r.id))
            .collect();
        let c = self.consumer;
        // Pending with no one, it was in a group that was lost: it goes back under this
        // consumer, which holds it.
        match c
            .broker
            .claim_own(&c.group, &c.consumer, &requests, Unowned::PutBack)
            .await
        {
            Ok(claimed) => {
                self.recovered();
                let claimed_at = Instant::now();
                let mut jobs = Vec::with_capacity(taken.len());
                for (request, fields) in taken.into_iter().zip(claimed) {
                    match fields {
                        Some(fields) => {
                            let Some(slot) = slots.split(1) else {
                                unreachable!("no more requests are taken than slots reserved")
                            };
                            held_ids.refreshed(request.stream_index, request.id, claimed_at);
                            jobs.push(Job {
                                stream_index: request.stream_index,
                                delivery: Delivery {
                                    id: request.id,
                                    fields: Some(fields),
                                    delivery_count: request.delivery_count + 1,
                                    delivered_at: claimed_at,
                                },
                                slot,
                                held: request.held,
                            });
                        }
                        None => {
                            tracing::debug!(
                                stream = %self.streams[request.stream_index],
                                entry_id = %request.id,
                                "entry due for retry was claimed by another consumer or deleted; leaving it"
                            );
                            request.held.settle();
                        }
                    }
                }
                self.dispatcher.spawn(jobs);
                Ok(())
            }
            Err(error) => {
                drop(slots);
                for mut request in taken {
                    request.due = Instant::now();
                    self.retries.push(request);
                }
                self.heal(error).await.map(drop)
            }
        }
    }
}
