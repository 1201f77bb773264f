//! The data of an in-memory broker: streams, their entries and consumer groups, each
//! group's pending list; and the commands that add entries and create groups.

use std::collections::btree_map;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::broker::{CROSS_SLOT, EntryFields, NO_GROUP, PENDING_IDLE_PAGE, RawFields, cross_slot};
use crate::config::StartFrom;
use crate::event::EntryId;
use crate::testing::Outcome;

/// How many settled entries (acknowledged or dead-lettered) a group remembers for
/// [`TestBus::outcome`](crate::testing::TestBus::outcome); older ones are forgotten first,
/// so a long-running demo does not grow without bound.
const MAX_SETTLED_PER_GROUP: usize = 100_000;

#[derive(Default)]
pub(super) struct State {
    pub(super) streams: HashMap<String, Stream>,
    /// The last id handed out on any stream.
    pub(super) last_id: EntryId,
    /// Dead letters the cap trimmed, by dead-letter stream (the Redis backend's counter
    /// keys).
    pub(super) trimmed: HashMap<String, u64>,
    /// The due times of retries by hash key, then entry id (the Redis backend's
    /// `retry_at` hashes).
    pub(super) retry_dues: HashMap<String, BTreeMap<EntryId, u64>>,
    /// Leases by key: the holder, and when the lease lapses on tokio's clock.
    pub(super) leases: HashMap<String, (String, Instant)>,
    /// Refuse commands and scripts whose keys are in several hash slots, as Redis Cluster
    /// does ([`MemoryBroker::cluster_like`](super::MemoryBroker::cluster_like)).
    pub(super) cluster_like: bool,
    /// Commands whose next reply is lost after they ran
    /// ([`MemoryBroker::lose_next_reply`](super::MemoryBroker::lose_next_reply)).
    pub(super) lost_replies: Vec<String>,
}

impl State {
    /// Whether the reply of this run of `command` is to be lost; each loss is used once.
    pub(super) fn loses_reply(&mut self, command: &str) -> bool {
        match self.lost_replies.iter().position(|lost| lost == command) {
            Some(index) => {
                self.lost_replies.remove(index);
                true
            }
            None => false,
        }
    }
}

#[derive(Default)]
pub(super) struct Stream {
    pub(super) entries: BTreeMap<EntryId, RawFields>,
    /// The last id added, which stays even when that entry is deleted (`$` of XGROUP).
    pub(super) last_id: EntryId,
    pub(super) groups: BTreeMap<String, Group>,
}

pub(super) struct Group {
    pub(super) last_delivered: EntryId,
    pub(super) pending: BTreeMap<EntryId, Nack>,
    /// Every consumer of the group, with when it last read or claimed (`XINFO CONSUMERS`
    /// idle time).
    pub(super) consumers: BTreeMap<Arc<str>, Instant>,
    /// What became of entries no longer pending, for tests.
    pub(super) settled: BTreeMap<EntryId, Outcome>,
}

/// One entry of a group's pending list.
pub(super) struct Nack {
    pub(super) consumer: Arc<str>,
    pub(super) delivery_count: u64,
    pub(super) delivered_at: Instant,
}

impl State {
    /// The next id: the system clock's milliseconds, or the last id's with the sequence
    /// bumped when the clock has not moved past it (or went back).
    pub(super) fn next_id(&mut self) -> EntryId {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            });
        let last = self.last_id;
        let id = if now > last.millis() {
            EntryId::new(now, 0)
        } else if last.seq() == u64::MAX {
            EntryId::new(last.millis().saturating_add(1), 0)
        } else {
            EntryId::new(last.millis(), last.seq() + 1)
        };
        self.last_id = id;
        id
    }

    /// `XADD stream * fields`, creating the stream.
    pub(super) fn add(&mut self, stream: &str, fields: RawFields) -> EntryId {
        self.add_capped(stream, None, fields)
    }

    /// `XADD stream [MAXLEN max_len] * fields`, creating the stream.
    pub(super) fn add_capped(
        &mut self,
        stream: &str,
        max_len: Option<usize>,
        fields: RawFields,
    ) -> EntryId {
        let id = self.next_id();
        let stream = self.streams.entry(stream.to_owned()).or_default();
        stream.entries.insert(id, fields);
        stream.last_id = id;
        if let Some(max_len) = max_len {
            while stream.entries.len() > max_len {
                stream.entries.pop_first();
            }
        }
        id
    }

    /// Deletes the entries before the oldest one some group of `stream` still needs: its
    /// oldest pending entry, else the last one delivered to it (kept, as Redis keeps it);
    /// at most the oldest `max_entries` of them.
    pub(super) fn trim_acked(&mut self, stream: &str, max_entries: usize) -> u64 {
        let Some(stream) = self.streams.get_mut(stream) else {
            return 0;
        };
        let Some(needed) = stream
            .groups
            .values()
            .map(|group| {
                group
                    .pending
                    .keys()
                    .next()
                    .map_or(group.last_delivered, |&oldest| {
                        oldest.min(group.last_delivered)
                    })
            })
            .min()
        else {
            return 0;
        };
        let needed = stream
            .entries
            .keys()
            .nth(max_entries)
            .map_or(needed, |&bound| bound.min(needed));
        let kept = stream.entries.split_off(&needed);
        let trimmed = stream.entries.len() as u64;
        stream.entries = kept;
        trimmed
    }

    /// The `CROSSSLOT` error of Redis Cluster when this broker behaves like one and `keys`
    /// (of one command or script) are in different hash slots.
    pub(super) fn same_slot<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), redis::RedisError> {
        if !self.cluster_like {
            return Ok(());
        }
        match cross_slot(keys.into_iter().map(str::as_bytes)) {
            None => Ok(()),
            Some(_) => Err(server_error(
                CROSS_SLOT,
                "Keys in request don't hash to the same slot",
            )),
        }
    }

    /// `XGROUP CREATE stream group 0|$ MKSTREAM`; an existing group is left as it is.
    pub(super) fn ensure_group(&mut self, stream: &str, group: &str, start: StartFrom) {
        let stream = self.streams.entry(stream.to_owned()).or_default();
        let last_delivered = match start {
            StartFrom::NewOnly => stream.last_id,
            _ => EntryId::MIN,
        };
        stream
            .groups
            .entry(group.to_owned())
            .or_insert_with(|| Group {
                last_delivered,
                pending: BTreeMap::new(),
                consumers: BTreeMap::new(),
                settled: BTreeMap::new(),
            });
    }

    /// `XGROUP CREATE stream group <after, or start> MKSTREAM`: whether it created it.
    pub(super) fn recreate_group(
        &mut self,
        stream: &str,
        group: &str,
        after: Option<EntryId>,
        start: StartFrom,
    ) -> bool {
        let exists = self
            .streams
            .get(stream)
            .is_some_and(|s| s.groups.contains_key(group));
        if exists {
            return false;
        }
        self.ensure_group(stream, group, start);
        if let (Some(after), Some(group)) = (
            after,
            self.streams
                .get_mut(stream)
                .and_then(|s| s.groups.get_mut(group)),
        ) {
            group.last_delivered = after;
        }
        true
    }

    /// The entries of `stream` and its `group`, or the NOGROUP error Redis answers.
    pub(super) fn locate(
        &mut self,
        stream: &str,
        group: &str,
        command: &str,
    ) -> Result<(&BTreeMap<EntryId, RawFields>, &mut Group), redis::RedisError> {
        let missing = || no_group(stream, group, command);
        let Stream {
            entries, groups, ..
        } = self.streams.get_mut(stream).ok_or_else(missing)?;
        let group = groups.get_mut(group).ok_or_else(missing)?;
        Ok((entries, group))
    }

    /// `XDEL stream ids...`: how many existed.
    pub(super) fn delete(&mut self, stream: &str, ids: &[EntryId]) -> u64 {
        let Some(stream) = self.streams.get_mut(stream) else {
            return 0;
        };
        ids.iter()
            .filter(|id| stream.entries.remove(id).is_some())
            .count() as u64
    }
}

impl Group {
    /// The entries of a stream's `entries` this group has not been delivered yet: what
    /// `XREADGROUP ... >` reads next, lowest id first.
    pub(super) fn undelivered<'a>(
        &self,
        entries: &'a BTreeMap<EntryId, RawFields>,
    ) -> btree_map::Range<'a, EntryId, RawFields> {
        entries.range((Bound::Excluded(self.last_delivered), Bound::Unbounded))
    }

    /// The longest time since the last delivery among the [`PENDING_IDLE_PAGE`] pending
    /// entries with the lowest ids, as the Redis backend reads it, in whole milliseconds.
    pub(super) fn oldest_pending_idle(&self, now: Instant) -> Option<Duration> {
        self.pending
            .values()
            .take(PENDING_IDLE_PAGE)
            .map(|nack| whole_millis(now.saturating_duration_since(nack.delivered_at)))
            .max()
    }

    /// Records that `consumer` read or claimed just now, adding it to the group if new.
    pub(super) fn seen(&mut self, consumer: &Arc<str>, now: Instant) {
        self.consumers.insert(consumer.clone(), now);
    }

    pub(super) fn settle(&mut self, id: EntryId, outcome: Outcome) {
        self.settled.insert(id, outcome);
        while self.settled.len() > MAX_SETTLED_PER_GROUP {
            self.settled.pop_first();
        }
    }
}

/// A stored entry's fields as a delivery carries them.
pub(super) fn delivered(fields: &RawFields) -> EntryFields {
    EntryFields::from_pairs(fields.iter().map(|(name, value)| (name, value)))
}

/// Durations as Redis takes them: whole milliseconds.
pub(super) fn whole_millis(duration: Duration) -> Duration {
    Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

/// The NOGROUP error Redis answers for a missing stream or group, which the consumer
/// heals by creating the group again.
pub(super) fn no_group(stream: &str, group: &str, command: &str) -> redis::RedisError {
    let mut detail = format!("No such key '{stream}' or consumer group '{group}'");
    if command == "XREADGROUP" {
        detail.push_str(" in XREADGROUP with GROUP option");
    }
    server_error(NO_GROUP, &detail)
}

/// A Redis error reply with `code`, as the Redis backend would get it from the server, so
/// that the runtime treats both backends' errors alike.
pub(super) fn server_error(code: &str, detail: &str) -> redis::RedisError {
    let reply = format!("-{code} {}\r\n", detail.replace(['\r', '\n'], " "));
    match redis::parse_redis_value(reply.as_bytes()).and_then(redis::Value::extract_error) {
        Err(error) => error,
        Ok(_) => redis::RedisError::from((
            redis::ErrorKind::Client,
            "in-memory broker error",
            format!("{code} {detail}"),
        )),
    }
}
