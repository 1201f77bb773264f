//! Handler slots and places among the held entries, reserved before a read or a claim so
//! that nothing is fetched that could not be held.

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::Reader;
use crate::consumer::in_flight::take_free;

/// How many times a read of new entries lets running handlers finish before it goes out
/// with fewer slots than half the limit.
const BATCH_YIELDS: usize = 4;

/// Handler slots and places among the held entries, taken together for one read: one of
/// each per entry it may return.
pub(super) struct Reservation {
    pub(super) slots: OwnedSemaphorePermit,
    pub(super) places: OwnedSemaphorePermit,
}

impl Reservation {
    /// How many entries the reservation covers.
    pub(super) fn len(&self) -> usize {
        self.places.num_permits()
    }
}

impl Reader<'_> {
    /// Reserves slots and places for a read of new entries: like
    /// [`reserve`](Self::reserve), but when only a few slots are free while handlers run,
    /// it lets them finish for a moment first, so that a busy bus reads in batches instead
    /// of one entry per freed slot. Measured with the no-op handler of the benchmark,
    /// reading as soon as one slot was free made reads a third of the size they could be
    /// and cost 3x the round trips.
    pub(super) async fn reserve_batch(&mut self, wanted: usize) -> Option<Reservation> {
        let target = wanted.min((self.consumer.max_concurrent / 2).max(1));
        let mut slots = self.reserve_slots(wanted).await;
        for _ in 0..BATCH_YIELDS {
            if slots.num_permits() >= target {
                break;
            }
            tokio::task::yield_now().await;
            self.take_free_slots(&mut slots, wanted);
        }
        // A read of every stream at once may bring more entries than there are free slots
        // (they wait for a slot, held): it reserves a place for each.
        let places_wanted = wanted.max(self.streams.len());
        self.with_places(slots, places_wanted).await
    }

    /// Waits for one free slot, takes up to `wanted` of those free right now, and as many
    /// places; waits for a place only as long as nothing else is due.
    pub(super) async fn reserve(&mut self, wanted: usize) -> Option<Reservation> {
        let slots = self.reserve_slots(wanted).await;
        let wanted = slots.num_permits();
        self.with_places(slots, wanted).await
    }

    /// As [`reserve`](Self::reserve), for work that is due now: gives up at once when no
    /// place is free.
    pub(super) async fn take_reservation(&mut self, wanted: usize) -> Option<Reservation> {
        let mut slots = self.reserve_slots(wanted).await;
        let places = take_free(&self.places, slots.num_permits())?;
        if slots.num_permits() > places.num_permits() {
            drop(slots.split(slots.num_permits() - places.num_permits()));
        }
        Some(Reservation { slots, places })
    }

    /// Adds up to `wanted` places to `slots`. When every place is taken (entries wait for
    /// their retry or their acknowledgement), it waits for one to free up, for a retry or
    /// claim scan to be due, or for a new retry request, no longer than a blocking read,
    /// and returns `None`: the read loop goes round again (a chosen wait: `is_live` counts
    /// it as a turn).
    pub(super) async fn with_places(
        &mut self,
        slots: OwnedSemaphorePermit,
        wanted: usize,
    ) -> Option<Reservation> {
        if let Some(places) = take_free(&self.places, wanted) {
            return Some(Reservation { slots, places });
        }
        drop(slots);
        let wake_at = self
            .wake_at()
            .min(Instant::now() + self.consumer.block_time);
        tokio::select! {
            place = self.places.clone().acquire_owned() => drop(place),
            () = tokio::time::sleep_until(wake_at) => {}
            () = self.retries.wait_incoming() => {}
        }
        self.consumer.last_read.record_turn();
        None
    }

    /// Adds the slots free right now to `slots`, up to `wanted` in all.
    pub(super) fn take_free_slots(&self, slots: &mut OwnedSemaphorePermit, wanted: usize) {
        if let Some(extra) = take_free(&self.slots, wanted.saturating_sub(slots.num_permits())) {
            slots.merge(extra);
        }
    }

    /// Waits for one free slot, then takes up to `wanted` of those free right now.
    pub(super) async fn reserve_slots(&self, wanted: usize) -> OwnedSemaphorePermit {
        let Ok(mut slots) = self.slots.clone().acquire_owned().await else {
            unreachable!("the semaphore is never closed")
        };
        self.take_free_slots(&mut slots, wanted);
        slots
    }
}
