//! The bound on the entries one consumer holds pending (`max_in_flight`): a permit per
//! entry, taken before the entry is read or claimed and given back only once its
//! acknowledgement, its dead-letter move or its hand-over is settled.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::keep_fresh::HeldId;
use super::stream_state::StreamState;

/// One entry this consumer holds pending. Dropping it frees its place; dropping it without
/// [`settle`](Held::settle) leaves the entry unfinished, for the hand-over at shutdown.
#[derive(Debug)]
pub(crate) struct Held {
    _permit: OwnedSemaphorePermit,
    state: Arc<StreamState>,
    id: HeldId,
}

impl Held {
    /// Holds the entry `id` of the stream of `state` with one permit of the in-flight
    /// semaphore.
    pub(crate) fn new(permit: OwnedSemaphorePermit, state: Arc<StreamState>, id: HeldId) -> Self {
        debug_assert_eq!(permit.num_permits(), 1);
        state.add_held();
        Held {
            _permit: permit,
            state,
            id,
        }
    }

    /// The entry is no longer this consumer's to finish: acknowledged, dead-lettered, or
    /// found to be another consumer's.
    pub(crate) fn settle(mut self) {
        self.id.settle();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.state.remove_held();
    }
}

/// Takes up to `wanted` permits of `places` that are free right now.
pub(crate) fn take_free(places: &Arc<Semaphore>, wanted: usize) -> Option<OwnedSemaphorePermit> {
    let free = wanted.min(places.available_permits());
    if free == 0 {
        return None;
    }
    places
        .clone()
        .try_acquire_many_owned(u32::try_from(free).unwrap_or(u32::MAX))
        .ok()
}
