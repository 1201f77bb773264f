//! The dead-letter store in memory: the same dead letters the Redis backend's scripts write
//! (escaped names, packed fields past the script's limit), replays, and entry deletion.

use std::ops::Bound;

use async_trait::async_trait;

use super::MemoryConnection;
use super::state::{State, server_error};
use crate::broker::{
    DEAD_LETTER_SCRIPT_MAX_VALUES, DeadLetterMove, DeadLetterStore, GENERIC_ERROR, RawFields,
    trimmed_count_key,
};
use crate::dead_letter::{
    DeadLetter, META_PACKED_FIELDS, META_PREFIX, dlq_error, pack_fields, unpack_fields,
};
use crate::error::Result;
use crate::event::EntryId;
use crate::testing::Outcome;

impl State {
    /// The dead-letter script: if entry `id` is pending with `consumer`, acknowledges it
    /// and, unless it was deleted, adds its fields (`@` names escaped) and `meta` to
    /// `dead_letters`, trimmed to `max_len`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dead_letter(
        &mut self,
        stream: &str,
        dead_letters: &str,
        group: &str,
        consumer: &str,
        id: EntryId,
        meta: &[(&'static str, String)],
        max_len: Option<usize>,
    ) -> Result<DeadLetterMove, redis::RedisError> {
        let trimmed_count = trimmed_count_key(dead_letters);
        self.same_slot([stream, dead_letters, &trimmed_count])?;
        let (entries, group) = self.locate(stream, group, "XPENDING")?;
        let Some(nack) = group
            .pending
            .get(&id)
            .filter(|nack| &*nack.consumer == consumer)
        else {
            return Ok(DeadLetterMove::NotPending);
        };
        let deliveries = nack.delivery_count;
        group.pending.remove(&id);
        let Some(original) = entries.get(&id) else {
            group.settle(id, Outcome::Acked { deliveries });
            return Ok(DeadLetterMove::Deleted);
        };
        let script_values = 2 * original.len() + 4 + 2 * meta.len();
        let mut fields: RawFields = if script_values > DEAD_LETTER_SCRIPT_MAX_VALUES {
            vec![(
                META_PACKED_FIELDS.as_bytes().to_vec(),
                pack_fields(original),
            )]
        } else {
            original
                .iter()
                .map(|(name, value)| {
                    let name = if name.starts_with(META_PREFIX.as_bytes()) {
                        [META_PREFIX.as_bytes(), name].concat()
                    } else {
                        name.clone()
                    };
                    (name, value.clone())
                })
                .collect()
        };
        fields.extend(
            meta.iter()
                .map(|(name, value)| (name.as_bytes().to_vec(), value.as_bytes().to_vec())),
        );
        let letter = DeadLetter::parse(id, fields.clone());
        group.settle(
            id,
            Outcome::DeadLettered {
                deliveries,
                reason: letter.reason,
                error: letter.error,
            },
        );
        self.add(dead_letters, fields);
        let mut trimmed = 0;
        if let (Some(dead), Some(max_len)) = (self.streams.get_mut(dead_letters), max_len) {
            while dead.entries.len() > max_len {
                dead.entries.pop_first();
                trimmed += 1;
            }
        }
        if trimmed > 0 {
            *self.trimmed.entry(dead_letters.to_owned()).or_default() += trimmed;
        }
        Ok(DeadLetterMove::Moved { trimmed })
    }

    /// The replay script: adds the original fields of dead letter `id` (escaped names
    /// restored, metadata dropped) to `origin` and deletes the dead letter.
    pub(super) fn replay(
        &mut self,
        dead_letters: &str,
        origin: &str,
        id: EntryId,
    ) -> Result<Option<EntryId>, redis::RedisError> {
        self.same_slot([dead_letters, origin])?;
        let Some(letter) = self
            .streams
            .get(dead_letters)
            .and_then(|s| s.entries.get(&id))
        else {
            return Ok(None);
        };
        let prefix = META_PREFIX.as_bytes();
        let packed = letter
            .iter()
            .find(|(name, _)| name == META_PACKED_FIELDS.as_bytes())
            .and_then(|(_, packed)| unpack_fields(packed));
        let fields: RawFields = packed.unwrap_or_else(|| {
            letter
                .iter()
                .filter_map(|(name, value)| match name.strip_prefix(prefix) {
                    Some(rest) if rest.starts_with(prefix) => Some((rest.to_vec(), value.clone())),
                    Some(_) => None,
                    None => Some((name.clone(), value.clone())),
                })
                .collect()
        });
        if fields.is_empty() {
            return Err(server_error(
                GENERIC_ERROR,
                &format!("dead letter {id} has no original fields"),
            ));
        }
        let new_id = self.add(origin, fields);
        self.delete(dead_letters, &[id]);
        Ok(Some(new_id))
    }
}

#[async_trait]
impl DeadLetterStore for MemoryConnection {
    async fn dead_letter(
        &self,
        stream: &str,
        dead_letters: &str,
        group: &str,
        consumer: &str,
        id: EntryId,
        meta: &[(&'static str, String)],
        max_len: Option<usize>,
    ) -> Result<DeadLetterMove> {
        let moved = self
            .store
            .command(|state| {
                state.dead_letter(stream, dead_letters, group, consumer, id, meta, max_len)
            })
            .map_err(|e| {
                let counter = trimmed_count_key(dead_letters);
                dlq_error(
                    "moving an entry to",
                    dead_letters,
                    &[stream, dead_letters, &counter],
                    e,
                )
            })?;
        if matches!(moved, DeadLetterMove::Moved { .. }) {
            self.store.appended.notify_waiters();
        }
        Ok(moved)
    }

    async fn replay(
        &self,
        dead_letters: &str,
        origin: &str,
        id: EntryId,
    ) -> Result<Option<EntryId>> {
        let replayed = self
            .store
            .command(|state| state.replay(dead_letters, origin, id))
            .map_err(|e| dlq_error("replaying from", dead_letters, &[dead_letters, origin], e))?;
        if replayed.is_some() {
            self.store.appended.notify_waiters();
        }
        Ok(replayed)
    }

    async fn range_after(
        &self,
        stream: &str,
        after: Option<EntryId>,
        count: usize,
    ) -> Result<Vec<(EntryId, RawFields)>> {
        let state = self.store.lock();
        let Some(stream) = state.streams.get(stream) else {
            return Ok(Vec::new());
        };
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(stream
            .entries
            .range((start, Bound::Unbounded))
            .take(count)
            .map(|(id, fields)| (*id, fields.clone()))
            .collect())
    }

    async fn stream_len(&self, stream: &str) -> Result<u64> {
        Ok(self
            .store
            .lock()
            .streams
            .get(stream)
            .map_or(0, |s| s.entries.len() as u64))
    }

    async fn delete(&self, stream: &str, ids: &[EntryId]) -> Result<u64> {
        Ok(self.store.command(|state| state.delete(stream, ids)))
    }

    async fn delete_key(&self, stream: &str) -> Result<()> {
        self.store.command(|state| state.streams.remove(stream));
        // A read blocked on the stream looks again, and finds its group gone.
        self.store.appended.notify_waiters();
        Ok(())
    }
}
