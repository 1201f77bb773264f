//! The ids this consumer holds, by stream, kept fresh on the server while it holds them and
//! handed over to the group when it stops without finishing them.
//!
//! An entry is held from the read or claim that delivered it until it is settled
//! (acknowledged, dead-lettered, or found to be another consumer's): while it waits for a
//! handler slot, while its handler runs, while it waits for its retry and while its
//! dead-letter move is tried again. Every third of `claim_min_idle` one
//! `XCLAIM ... JUSTID` per stream resets the idle time of what is held (without counting a
//! delivery), so no claim scan takes an entry from a live consumer however long its handler
//! or its dead-letter move takes, while a stopped consumer's entries go stale as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::broker::{Broker, Unowned};
use crate::event::EntryId;

/// What this consumer knows of one entry it holds.
#[derive(Debug, Clone, Copy)]
struct HeldEntry {
    /// When the server last confirmed the entry pending with this consumer with its idle
    /// time reset: its idle time is at most the time since.
    fresh_since: Instant,
    /// The server found it no longer pending with this consumer (another consumer claimed
    /// it, or it is settled already): it is not touched again.
    lost: bool,
}

#[derive(Debug, Default)]
struct StreamHeld {
    held: HashMap<EntryId, HeldEntry>,
    /// Entries given up unfinished (abandoned at shutdown, waiting for a retry or a slot
    /// when the reader stopped): pending with this consumer, for the hand-over.
    left: Vec<EntryId>,
}

/// The ids this consumer holds, by stream index.
#[derive(Debug)]
pub(crate) struct HeldIds {
    streams: Box<[Mutex<StreamHeld>]>,
}

impl HeldIds {
    pub(crate) fn new(streams: usize) -> Self {
        HeldIds {
            streams: (0..streams).map(|_| Mutex::default()).collect(),
        }
    }

    fn stream(&self, stream_index: usize) -> MutexGuard<'_, StreamHeld> {
        self.streams[stream_index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `id` as held, delivered at `delivered_at`; `false` when it is held already
    /// (a claim scan found an entry this consumer is still working on).
    pub(crate) fn register(&self, stream_index: usize, id: EntryId, delivered_at: Instant) -> bool {
        let mut stream = self.stream(stream_index);
        if stream.held.contains_key(&id) {
            return false;
        }
        stream.left.retain(|left| *left != id);
        stream.held.insert(
            id,
            HeldEntry {
                fresh_since: delivered_at,
                lost: false,
            },
        );
        true
    }

    pub(crate) fn is_held(&self, stream_index: usize, id: EntryId) -> bool {
        self.stream(stream_index).held.contains_key(&id)
    }

    /// Since when the entry is known fresh with this consumer; `None` when the server said
    /// it is no longer pending with it.
    pub(crate) fn fresh_since(&self, stream_index: usize, id: EntryId) -> Option<Instant> {
        self.stream(stream_index)
            .held
            .get(&id)
            .filter(|entry| !entry.lost)
            .map(|entry| entry.fresh_since)
    }

    /// A claim or read delivered the held entry to this consumer again (or may have, in a
    /// reply that was lost), no earlier than `at`: that reset its idle time, and it is
    /// pending with this consumer.
    pub(crate) fn refreshed(&self, stream_index: usize, id: EntryId, at: Instant) {
        if let Some(entry) = self.stream(stream_index).held.get_mut(&id) {
            entry.fresh_since = at;
            entry.lost = false;
        }
    }

    fn settle(&self, stream_index: usize, id: EntryId) {
        self.stream(stream_index).held.remove(&id);
    }

    fn leave(&self, stream_index: usize, id: EntryId) {
        let mut stream = self.stream(stream_index);
        if stream.held.remove(&id).is_some_and(|entry| !entry.lost) {
            stream.left.push(id);
        }
    }

    /// The held ids of a stream still to keep fresh.
    fn to_touch(&self, stream_index: usize) -> Vec<EntryId> {
        self.stream(stream_index)
            .held
            .iter()
            .filter(|(_, entry)| !entry.lost)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The server reset the idle time of `kept` (confirmed before `at`); the others of
    /// `sent` are not pending with this consumer any more.
    fn touched(&self, stream_index: usize, sent: &[EntryId], kept: &[EntryId], at: Instant) {
        let mut stream = self.stream(stream_index);
        for id in sent {
            if let Some(entry) = stream.held.get_mut(id) {
                if kept.contains(id) {
                    entry.fresh_since = at;
                } else {
                    entry.lost = true;
                }
            }
        }
    }

    /// Takes the entries left unfinished on a stream.
    fn take_left(&self, stream_index: usize) -> Vec<EntryId> {
        std::mem::take(&mut self.stream(stream_index).left)
    }
}

/// One held id, registered in [`HeldIds`] for as long as this lives. Dropped without
/// [`settle`](HeldId::settle) it is left unfinished, to be handed over at shutdown.
#[derive(Debug)]
pub(crate) struct HeldId {
    ids: Arc<HeldIds>,
    stream_index: usize,
    id: EntryId,
    settled: bool,
}

impl HeldId {
    /// `None` when `id` is held already.
    pub(crate) fn register(
        ids: &Arc<HeldIds>,
        stream_index: usize,
        id: EntryId,
        delivered_at: Instant,
    ) -> Option<Self> {
        ids.register(stream_index, id, delivered_at)
            .then(|| HeldId {
                ids: ids.clone(),
                stream_index,
                id,
                settled: false,
            })
    }

    /// The entry is no longer this consumer's to finish: acknowledged, dead-lettered, or
    /// found to be another consumer's.
    pub(crate) fn settle(&mut self) {
        self.settled = true;
    }
}

impl Drop for HeldId {
    fn drop(&mut self) {
        if self.settled {
            self.ids.settle(self.stream_index, self.id);
        } else {
            self.ids.leave(self.stream_index, self.id);
        }
    }
}

/// What keeping entries fresh and handing them over needs.
pub(crate) struct Freshness {
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) group: Arc<str>,
    pub(crate) consumer: Arc<str>,
    pub(crate) streams: Arc<[Arc<str>]>,
    pub(crate) ids: Arc<HeldIds>,
    pub(crate) claim_min_idle: Duration,
    pub(crate) command_timeout: Duration,
}

impl Freshness {
    /// Touches every held entry every third of `claim_min_idle`, until aborted. A touch
    /// that fails is tried again at the next round, well before the entries go stale.
    pub(crate) async fn keep_fresh(self: Arc<Self>) {
        let every = (self.claim_min_idle / 3).max(Duration::from_millis(1));
        loop {
            tokio::time::sleep(every).await;
            for stream_index in 0..self.streams.len() {
                self.touch(stream_index).await;
            }
        }
    }

    async fn touch(&self, stream_index: usize) {
        let ids = self.ids.to_touch(stream_index);
        if ids.is_empty() {
            return;
        }
        let stream = &self.streams[stream_index];
        let touched = tokio::time::timeout(
            self.command_timeout,
            self.broker
                // Never put back: an entry pending with no one may have been acknowledged
                // since its ids were taken.
                .touch_own(
                    stream,
                    &self.group,
                    &self.consumer,
                    &ids,
                    Duration::ZERO,
                    Unowned::Leave,
                ),
        )
        .await;
        match touched {
            Ok(Ok(kept)) => {
                if kept.len() < ids.len() {
                    tracing::debug!(stream = %stream, held = ids.len(), kept = kept.len(), "some held entries are no longer pending with this consumer");
                }
                self.ids.touched(stream_index, &ids, &kept, Instant::now());
            }
            Ok(Err(error)) => {
                tracing::warn!(stream = %stream, held = ids.len(), error = &error as &dyn std::error::Error, "keeping the held entries fresh failed; trying again in a third of claim_min_idle");
            }
            Err(_) => {
                tracing::warn!(stream = %stream, held = ids.len(), timeout = ?self.command_timeout, "keeping the held entries fresh timed out; trying again in a third of claim_min_idle");
            }
        }
    }

    /// Hands the entries left unfinished over to the group: their idle time is set to
    /// `claim_min_idle` (their delivery counts unchanged), so the next claim scan of any
    /// consumer takes them instead of waiting for them to go stale.
    pub(crate) async fn hand_over(&self) {
        // All streams at once: shutdown waits one command timeout at most, not one per
        // stream, when Redis does not answer.
        let streams = self
            .streams
            .iter()
            .enumerate()
            .map(|(stream_index, stream)| {
                let ids = self.ids.take_left(stream_index);
                async move {
                    if !ids.is_empty() {
                        self.hand_over_stream(stream, &ids).await;
                    }
                }
            });
        futures_util::future::join_all(streams).await;
    }

    async fn hand_over_stream(&self, stream: &str, ids: &[EntryId]) {
        let handed = tokio::time::timeout(
            self.command_timeout,
            self.broker.touch_own(
                stream,
                &self.group,
                &self.consumer,
                ids,
                self.claim_min_idle,
                // What is handed over was given up unfinished, no acknowledgement on its
                // way: pending with no one, it was in a group that was lost.
                Unowned::PutBack,
            ),
        )
        .await;
        match handed {
            Ok(Ok(handed)) => {
                tracing::info!(stream = %stream, handed_over = handed.len(), "handed the unfinished entries over to the group's next claim scan")
            }
            Ok(Err(error)) => {
                tracing::warn!(stream = %stream, entries = ids.len(), error = &error as &dyn std::error::Error, "handing the unfinished entries over failed; they are claimed after claim_min_idle")
            }
            Err(_) => {
                tracing::warn!(stream = %stream, entries = ids.len(), timeout = ?self.command_timeout, "handing the unfinished entries over timed out; they are claimed after claim_min_idle")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_held_once_and_left_or_settled_when_dropped() {
        let ids = Arc::new(HeldIds::new(1));
        let now = Instant::now();
        let id = EntryId::new(1, 1);
        let held = HeldId::register(&ids, 0, id, now).expect("not held yet");
        assert!(HeldId::register(&ids, 0, id, now).is_none(), "held already");
        drop(held);
        assert!(!ids.is_held(0, id));
        assert_eq!(ids.take_left(0), [id], "dropped unsettled: left");

        let mut held = HeldId::register(&ids, 0, id, now).expect("not held any more");
        held.settle();
        drop(held);
        assert!(ids.take_left(0).is_empty(), "settled: nothing left");
    }

    #[test]
    fn an_entry_the_server_no_longer_has_with_this_consumer_is_not_touched_again() {
        let ids = Arc::new(HeldIds::new(1));
        let now = Instant::now();
        let (a, b) = (EntryId::new(1, 1), EntryId::new(1, 2));
        let _a = HeldId::register(&ids, 0, a, now);
        let b_held = HeldId::register(&ids, 0, b, now);
        let later = now + Duration::from_secs(1);
        ids.touched(0, &[a, b], &[a], later);
        assert_eq!(ids.fresh_since(0, a), Some(later));
        assert_eq!(ids.fresh_since(0, b), None);
        assert_eq!(ids.to_touch(0), [a]);
        drop(b_held);
        assert!(
            ids.take_left(0).is_empty(),
            "a lost entry is not handed over"
        );
    }
}
