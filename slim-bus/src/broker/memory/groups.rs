//! Consumer groups in memory: reads of new and pending entries, acks, claims, and the
//! removal of idle consumers, each like the Redis command it stands for.

use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::state::{Nack, State, delivered, whole_millis};
use crate::broker::Unowned;
use crate::broker::{ClaimPage, Delivery, EntryFields, StreamDeliveries, group_by_slot};
use crate::event::EntryId;
use crate::testing::Outcome;

/// XAUTOCLAIM looks at no more than this many pending entries per entry it may return.
const AUTOCLAIM_ATTEMPTS_PER_COUNT: usize = 10;

impl State {
    /// What the bus reads of `streams`: one [`read_new`](Self::read_new) of all of them, or
    /// when this broker behaves like a cluster one per hash slot, as the Redis backend
    /// reads a cluster. Every stream is checked before any is read, so that an error
    /// leaves nothing delivered.
    pub(super) fn read_new_per_slot(
        &mut self,
        group: &str,
        consumer: &str,
        streams: &[Arc<str>],
        count: usize,
        now: Instant,
    ) -> Result<Vec<StreamDeliveries>, redis::RedisError> {
        if !self.cluster_like {
            return self.read_new(group, consumer, streams, count, now);
        }
        for stream in streams {
            self.locate(stream, group, "XREADGROUP")?;
        }
        let mut batches = Vec::new();
        for (_, members) in group_by_slot(streams) {
            let slot_streams: Vec<Arc<str>> = members.iter().map(|&i| streams[i].clone()).collect();
            for mut batch in self.read_new(group, consumer, &slot_streams, count, now)? {
                batch.stream_index = members[batch.stream_index];
                batches.push(batch);
            }
        }
        batches.sort_by_key(|batch| batch.stream_index);
        Ok(batches)
    }

    /// `XREADGROUP GROUP group consumer COUNT count STREAMS streams... > ...`.
    pub(super) fn read_new(
        &mut self,
        group: &str,
        consumer: &str,
        streams: &[Arc<str>],
        count: usize,
        now: Instant,
    ) -> Result<Vec<StreamDeliveries>, redis::RedisError> {
        self.same_slot(streams.iter().map(|stream| &**stream))?;
        // Redis checks every stream before it delivers from any.
        for stream in streams {
            self.locate(stream, group, "XREADGROUP")?;
        }
        let consumer: Arc<str> = consumer.into();
        let mut batches = Vec::new();
        for (stream_index, stream) in streams.iter().enumerate() {
            let (entries, group) = self.locate(stream, group, "XREADGROUP")?;
            group.seen(&consumer, now);
            let deliveries: Vec<Delivery> = group
                .undelivered(entries)
                .take(count)
                .map(|(id, fields)| Delivery {
                    id: *id,
                    fields: Some(delivered(fields)),
                    delivery_count: 1,
                    delivered_at: now,
                })
                .collect();
            let Some(last) = deliveries.last() else {
                continue;
            };
            group.last_delivered = last.id;
            for delivery in &deliveries {
                group.pending.insert(
                    delivery.id,
                    Nack {
                        consumer: consumer.clone(),
                        delivery_count: 1,
                        delivered_at: now,
                    },
                );
            }
            batches.push(StreamDeliveries {
                stream_index,
                deliveries,
            });
        }
        Ok(batches)
    }

    /// `XREADGROUP ... STREAMS stream after`: the consumer's own pending entries again,
    /// each delivery counted and its idle time reset; deleted entries come without fields.
    pub(super) fn read_own_pending(
        &mut self,
        stream: &str,
        group: &str,
        consumer: &str,
        after: EntryId,
        count: usize,
        now: Instant,
    ) -> Result<Vec<Delivery>, redis::RedisError> {
        let (entries, group) = self.locate(stream, group, "XPENDING")?;
        group.seen(&consumer.into(), now);
        Ok(group
            .pending
            .range_mut((Bound::Excluded(after), Bound::Unbounded))
            .filter(|(_, nack)| &*nack.consumer == consumer)
            .take(count)
            .map(|(id, nack)| {
                nack.delivery_count += 1;
                nack.delivered_at = now;
                Delivery {
                    id: *id,
                    fields: entries.get(id).map(delivered),
                    delivery_count: nack.delivery_count,
                    delivered_at: now,
                }
            })
            .collect())
    }

    /// The idle-consumer script: removes the consumers of `group` other than `except`
    /// that have been idle for at least `min_idle` and hold no pending entries.
    pub(super) fn remove_idle_consumers(
        &mut self,
        stream: &str,
        group: &str,
        min_idle: Duration,
        except: &str,
        now: Instant,
    ) -> Vec<String> {
        let Ok((_, group)) = self.locate(stream, group, "XINFO") else {
            return Vec::new();
        };
        let min_idle = whole_millis(min_idle);
        let idle: Vec<Arc<str>> = group
            .consumers
            .iter()
            .filter(|(name, seen)| {
                &***name != except
                    && now.saturating_duration_since(**seen) >= min_idle
                    && !group.pending.values().any(|nack| nack.consumer == **name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in &idle {
            group.consumers.remove(name);
        }
        idle.iter().map(|name| name.to_string()).collect()
    }

    /// `XACK stream group ids...`; a missing stream or group acknowledges nothing.
    pub(super) fn ack(&mut self, stream: &str, group: &str, ids: &[EntryId]) {
        if let Ok((_, group)) = self.locate(stream, group, "XACK") {
            for id in ids {
                if let Some(nack) = group.pending.remove(id) {
                    group.settle(
                        *id,
                        Outcome::Acked {
                            deliveries: nack.delivery_count,
                        },
                    );
                }
            }
        }
    }

    /// `XAUTOCLAIM stream group consumer min_idle cursor COUNT count`, with the delivery
    /// count of each claimed entry after the claim.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn claim_stale(
        &mut self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        cursor: EntryId,
        count: usize,
        now: Instant,
    ) -> Result<ClaimPage, redis::RedisError> {
        let (entries, group) = self.locate(stream, group, "XAUTOCLAIM")?;
        let min_idle = whole_millis(min_idle);
        let consumer: Arc<str> = consumer.into();
        group.seen(&consumer, now);
        let mut page = ClaimPage {
            deliveries: Vec::new(),
            next_cursor: EntryId::MIN,
            deleted: Vec::new(),
            own: Vec::new(),
        };
        let mut attempts = count.saturating_mul(AUTOCLAIM_ATTEMPTS_PER_COUNT);
        let mut remaining = count;
        let mut from = Bound::Included(cursor);
        loop {
            let next = group
                .pending
                .range((from, Bound::Unbounded))
                .next()
                .map(|(id, _)| *id);
            let Some(id) = next else {
                // The scan went through the whole list.
                return Ok(page);
            };
            if attempts == 0 || remaining == 0 {
                page.next_cursor = id;
                return Ok(page);
            }
            attempts -= 1;
            from = Bound::Excluded(id);
            let Some(fields) = entries.get(&id) else {
                // Deleted from the stream: Redis drops it from the pending list, and it
                // counts against COUNT.
                group.pending.remove(&id);
                page.deleted.push(id);
                remaining -= 1;
                continue;
            };
            let Some(nack) = group.pending.get_mut(&id) else {
                continue;
            };
            if !min_idle.is_zero() && now.saturating_duration_since(nack.delivered_at) < min_idle {
                continue;
            }
            if nack.consumer == consumer {
                page.own.push(id);
            }
            nack.consumer = consumer.clone();
            nack.delivered_at = now;
            nack.delivery_count += 1;
            page.deliveries.push(Delivery {
                id,
                fields: Some(delivered(fields)),
                delivery_count: nack.delivery_count,
                delivered_at: now,
            });
            remaining -= 1;
        }
    }

    /// The `touch_own` script: sets to `idle` the idle time of those of `ids` pending with
    /// `consumer`, keeping their delivery counts; drops deleted entries from the pending
    /// list, as `XCLAIM` does. Returns the ids still the caller's: those touched, and those
    /// pending with no one.
    pub(super) fn touch_own(
        &mut self,
        stream: &str,
        group: &str,
        consumer: &str,
        ids: &[EntryId],
        touch: Touch,
        now: Instant,
    ) -> Result<Vec<EntryId>, redis::RedisError> {
        let Touch { idle, unowned } = touch;
        let (entries, group) = self.locate(stream, group, "XPENDING")?;
        let idle = whole_millis(idle);
        let mut kept = Vec::with_capacity(ids.len());
        for id in ids {
            if !entries.contains_key(id) {
                group.pending.remove(id);
                continue;
            }
            let Some(nack) = group.pending.get_mut(id) else {
                // Pending with no one (acknowledged just now, or the group was lost and
                // created again): still the caller's, put back or left as asked.
                if unowned == Unowned::PutBack {
                    group.pending.insert(
                        *id,
                        Nack {
                            consumer: consumer.into(),
                            delivery_count: 1,
                            delivered_at: now.checked_sub(idle).unwrap_or(now),
                        },
                    );
                }
                kept.push(*id);
                continue;
            };
            if &*nack.consumer != consumer {
                continue;
            }
            // Early on a paused test clock, `now - idle` may be before the clock's start.
            nack.delivered_at = now.checked_sub(idle).unwrap_or(now);
            kept.push(*id);
        }
        Ok(kept)
    }

    /// `claim_own.lua` for each request: claims an entry back only if it is pending with
    /// `consumer`, or with no one and `unowned` says to put it back; drops deleted entries
    /// from the pending list.
    pub(super) fn claim_own(
        &mut self,
        group: &str,
        consumer: &str,
        requests: &[(Arc<str>, EntryId)],
        unowned: Unowned,
        now: Instant,
    ) -> Result<Vec<Option<EntryFields>>, redis::RedisError> {
        // Like a pipeline whose first error fails the whole reply.
        for (stream, _) in requests {
            self.locate(stream, group, "XCLAIM")?;
        }
        let consumer: Arc<str> = consumer.into();
        let mut claimed = Vec::with_capacity(requests.len());
        for (stream, id) in requests {
            let (entries, group) = self.locate(stream, group, "XCLAIM")?;
            group.seen(&consumer, now);
            let Some(fields) = entries.get(id) else {
                group.pending.remove(id);
                claimed.push(None);
                continue;
            };
            // Pending with no one (the group was lost and created again): put back under
            // the caller, which holds it, as `XCLAIM ... FORCE` does, when asked to.
            if unowned == Unowned::Leave && !group.pending.contains_key(id) {
                claimed.push(None);
                continue;
            }
            let nack = group.pending.entry(*id).or_insert_with(|| Nack {
                consumer: consumer.clone(),
                delivery_count: 0,
                delivered_at: now,
            });
            if nack.consumer == consumer {
                nack.delivered_at = now;
                nack.delivery_count += 1;
                claimed.push(Some(delivered(fields)));
            } else {
                claimed.push(None);
            }
        }
        Ok(claimed)
    }
}

/// What a `touch_own` sets: the idle time, and what becomes of an entry pending with no one.
#[derive(Debug, Clone, Copy)]
pub(super) struct Touch {
    pub(super) idle: Duration,
    pub(super) unowned: Unowned,
}
