//! Entries whose retry is due, claimed back to this consumer and run again.

use tokio::time::Instant;

use super::Reader;
use crate::broker::Delivery;
use crate::consumer::dispatch::Job;
use crate::consumer::retry::RetryRequest;
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
        // A touch of the held entries must not land between the least idle time measured
        // here and the claim: the claim would find the entry fresher than measured.
        let held_ids = self.held_ids.clone();
        let touching = held_ids.touching.lock().await;
        let now = Instant::now();
        let mut lost = Vec::new();
        let mut taken_fresh = Vec::with_capacity(taken.len());
        for request in taken {
            match held_ids.fresh_since(request.stream_index, request.id) {
                Some(since) => taken_fresh.push((request, since)),
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
        let (taken, fresh_since): (Vec<RetryRequest>, Vec<Instant>) =
            taken_fresh.into_iter().unzip();
        if taken.is_empty() {
            return Ok(());
        }
        let requests: Vec<_> = taken
            .iter()
            .zip(&fresh_since)
            .map(|(r, since)| {
                (
                    self.streams[r.stream_index].clone(),
                    r.id,
                    // The entry is kept fresh while held: claiming with the time since it
                    // was last confirmed fresh as the least idle time only succeeds if
                    // nobody has claimed it since.
                    now.saturating_duration_since(*since),
                )
            })
            .collect();
        let c = self.consumer;
        match c
            .broker
            .claim_for_retry(&c.group, &c.consumer, &requests)
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
                // The claim may have run on the server (its reply lost, or one slot of a
                // cluster failing): that reset the idle time of the entries it claimed,
                // and a least idle time measured from before it would find them claimed
                // by someone else. Measured from now it is no longer than their idle time
                // either way.
                let failed_at = Instant::now();
                for request in &taken {
                    held_ids.refreshed(request.stream_index, request.id, failed_at);
                }
                drop(touching);
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
