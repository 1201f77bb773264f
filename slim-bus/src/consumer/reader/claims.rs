//! The claim scan: entries other consumers have held for longer than `claim_min_idle`, and
//! this consumer's own entries that a claim whose reply was lost left untracked.

use tokio::time::Instant;

use super::{Healed, Reader};
use crate::broker::Delivery;
use crate::broker::Unowned;
use crate::consumer::sweep;
use crate::error::{Error, Result};
use crate::event::EntryId;
use crate::telemetry;

/// Where the scan for entries of dead consumers stands. It goes through the pending list
/// of one stream after the other, a page per turn of the read loop so that a long list
/// does not hold up new entries, and keeps its cursor until a whole pass is done.
pub(super) struct ClaimScan {
    pub(super) next_at: Instant,
    pub(super) stream_index: usize,
    pub(super) cursor: EntryId,
}

impl Reader<'_> {
    /// Remembers to look for what a claim of `stream_index` whose reply was lost may have
    /// given this consumer (see [`claim_lost`](Self::claim_lost)).
    pub(super) fn find_own_pending_again(&mut self, stream_index: usize) {
        if !self.lost.contains(&stream_index) {
            self.lost.push(stream_index);
        }
    }

    /// Claims back what a claim whose reply was lost (a timeout: Redis may have run it)
    /// may have given this consumer: its own pending entries of the stream that it does not
    /// hold. They are listed with `XPENDING`, which counts no delivery, so the entries this
    /// consumer holds are not delivered again, and each is claimed only if it is still this
    /// consumer's, so one that another consumer claimed meanwhile is left to it.
    pub(super) async fn claim_lost(&mut self) -> Result<()> {
        let Some(&stream_index) = self.lost.first() else {
            return Ok(());
        };
        let c = self.consumer;
        if c.set_aside.is_set(stream_index) {
            // Its key holds another type: nothing of it is pending any more.
            self.lost.remove(0);
            return Ok(());
        }
        let stream = self.streams[stream_index].clone();
        // Every entry held could come first in the list: enough for a page besides them.
        let listed = c.max_in_flight.saturating_add(c.max_count);
        let pending = match c
            .broker
            .pending_entries(&stream, &c.group, Some(&c.consumer), listed)
            .await
        {
            Ok(pending) => pending,
            Err(Error::GroupNotFound { .. }) => {
                // Nothing is pending in a group that is gone; the read recreates it.
                self.lost.remove(0);
                return Ok(());
            }
            Err(error) => return self.heal(error).await.map(drop),
        };
        let lost: Vec<_> = pending
            .into_iter()
            .filter(|entry| !self.held_ids.is_held(stream_index, entry.id))
            .collect();
        if lost.is_empty() {
            self.lost.remove(0);
            return Ok(());
        }
        let Some(mut reservation) = self.take_reservation(lost.len().min(c.max_count)).await else {
            // Every place is taken: the next turn tries again.
            return Ok(());
        };
        let taken = &lost[..reservation.len()];
        let requests: Vec<_> = taken
            .iter()
            .map(|entry| (stream.clone(), entry.id))
            .collect();
        // An entry pending with no one now was acknowledged since it was listed.
        match c
            .broker
            .claim_own(&c.group, &c.consumer, &requests, Unowned::Leave)
            .await
        {
            Ok(claimed) => {
                self.recovered();
                let deliveries: Vec<Delivery> = taken
                    .iter()
                    .zip(claimed)
                    .filter_map(|(entry, fields)| {
                        Some(Delivery {
                            id: entry.id,
                            fields: Some(fields?),
                            delivery_count: entry.delivery_count + 1,
                            delivered_at: Instant::now(),
                        })
                    })
                    .collect();
                if !deliveries.is_empty() {
                    tracing::info!(stream = %stream, found = deliveries.len(), "found this consumer's pending entries that a lost reply left untracked; handling them");
                }
                if taken.len() == lost.len() {
                    self.lost.remove(0);
                }
                self.dispatch(stream_index, deliveries, &mut reservation)
                    .await;
                Ok(())
            }
            Err(error) => {
                drop(reservation);
                self.heal(error).await.map(drop)
            }
        }
    }

    /// Claims a page of entries that other consumers have held for longer than
    /// `claim_min_idle`, when a scan is due. On a stream whose reading is paused it claims
    /// one entry at a time, and only when none is held: that entry probes the handler like
    /// a new one would, and entries of dead consumers are not left unclaimed for as long
    /// as the pause lasts (with nothing new to read, a probe would never come).
    pub(super) async fn claim_if_due(&mut self) -> Result<()> {
        if Instant::now() < self.claims.next_at {
            return Ok(());
        }
        let c = self.consumer;
        let stream_index = self.claims.stream_index;
        let state = &self.route(stream_index).state;
        let page_size = if state.is_paused() {
            if state.held() > 0 {
                self.next_claim_stream(EntryId::MIN);
                return Ok(());
            }
            1
        } else {
            c.max_count
        };
        let stream = self.streams[stream_index].clone();
        if c.set_aside.is_set(stream_index) {
            // Its turn in the scan is when a set-aside stream is looked at again: once its
            // key is a stream again (deleted, or renamed away), the group is created there
            // and it is consumed.
            match c.broker.ensure_group(&stream, &c.group, c.start_from).await {
                Ok(()) => {
                    c.set_aside.clear(stream_index);
                    tracing::info!(stream = %stream, "the stream's key is a stream again; consuming it");
                }
                Err(Error::WrongType { .. }) => {}
                Err(error) => {
                    tracing::debug!(stream = %stream, error = &error as &dyn std::error::Error, "checking a set-aside stream again failed")
                }
            }
            self.next_claim_stream(EntryId::MIN);
            return Ok(());
        }
        let Some(mut reservation) = self.take_reservation(page_size).await else {
            // Every place is taken: this consumer has enough to do.
            self.claims.next_at = Instant::now() + c.claim_interval;
            return Ok(());
        };
        let count = reservation.len();
        match c
            .broker
            .claim_stale(
                &stream,
                &c.group,
                &c.consumer,
                c.claim_min_idle,
                self.claims.cursor,
                count,
            )
            .await
        {
            Ok(page) => {
                self.recovered();
                if !page.deleted.is_empty() {
                    tracing::warn!(
                        stream = %stream,
                        entry_ids = ?page.deleted,
                        "pending entries were deleted from the stream; dropped them from the pending list"
                    );
                }
                // An entry this consumer holds went stale (its process stalled for longer
                // than claim_min_idle): it is running or settling here already, and must
                // not run a second time; the claim reset its idle time, which a retry
                // claim measures from. Others of its own were left by an earlier run under
                // its name.
                let deliveries: Vec<Delivery> = page
                    .deliveries
                    .into_iter()
                    .filter(|d| {
                        let held = self.held_ids.is_held(stream_index, d.id);
                        if held {
                            self.held_ids.refreshed(stream_index, d.id, d.delivered_at);
                        }
                        !held
                    })
                    .collect();
                let own = deliveries
                    .iter()
                    .filter(|d| page.own.contains(&d.id))
                    .count();
                let from_others = deliveries.len() - own;
                if own > 0 {
                    tracing::info!(stream = %stream, recovered = own, "claimed entries this consumer left pending in an earlier run");
                }
                if from_others > 0 {
                    tracing::info!(stream = %stream, claimed = from_others, "claimed entries from stopped consumers");
                    telemetry::claimed(&stream, &c.group, from_others);
                }
                self.dispatch(stream_index, deliveries, &mut reservation)
                    .await;
                if page.next_cursor == EntryId::MIN {
                    // A claim pass over the stream is done: what is left of stopped
                    // consumers now is their names.
                    sweep::remove_idle_consumers(
                        &*c.broker,
                        &stream,
                        &c.group,
                        &c.consumer,
                        c.consumer_idle_removal,
                    )
                    .await;
                }
                self.next_claim_stream(page.next_cursor);
                Ok(())
            }
            Err(error) => {
                drop(reservation);
                // Try again at the next interval, not on every turn of the loop.
                self.claims.next_at = Instant::now() + c.claim_interval;
                if self.heal(error).await? == Healed::Retry {
                    self.find_own_pending_again(stream_index);
                }
                Ok(())
            }
        }
    }

    /// Moves the claim scan on to `cursor`, or to the next stream once a stream's scan
    /// is through; after the last stream the scan rests until the next interval.
    pub(super) fn next_claim_stream(&mut self, cursor: EntryId) {
        self.claims.cursor = cursor;
        if cursor == EntryId::MIN {
            self.claims.stream_index = (self.claims.stream_index + 1) % self.streams.len();
            if self.claims.stream_index == 0 {
                self.claims.next_at = Instant::now() + self.consumer.claim_interval;
            }
        }
    }
}
