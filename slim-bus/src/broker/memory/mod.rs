//! The in-memory backend: what the runtime uses of Redis Streams (entry ids, consumer
//! groups, pending lists with delivery counts and idle times, claims, trimming, dead-letter
//! moves) inside one process, for tests and demos without a Redis server.
//!
//! Each command runs under one lock, so every command is atomic like a Redis command or
//! script. Idle times follow tokio's clock, so `tokio::time::pause()` drives claims and
//! retries; entry ids follow the system clock like Redis's.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    Broker, ClaimPage, DeadLetterMove, Delivery, EntryFields, GroupStats, LeaseState, RawFields,
    StreamDeliveries,
};
use crate::codec::EncodedField;
use crate::config::StartFrom;
use crate::dead_letter::{
    DeadLetter, META_PACKED_FIELDS, META_PREFIX, dlq_error, pack_fields, unpack_fields,
};
use crate::error::{Error, Result};
use crate::event::EntryId;
use crate::inspect::{PendingEntry, StreamStatus};
use crate::testing::Outcome;

mod inspect;

/// The scheme of URLs that select the in-memory backend: `memory://` for a private broker,
/// `memory://NAME` for the process-wide broker called NAME.
pub(crate) const URL_SCHEME: &str = "memory://";

/// How many settled entries (acknowledged or dead-lettered) a group remembers for
/// [`TestBus::outcome`](crate::testing::TestBus::outcome); older ones are forgotten first,
/// so a long-running demo does not grow without bound.
const MAX_SETTLED_PER_GROUP: usize = 100_000;

/// The Redis backend's dead-letter script packs the fields of an entry whose field names
/// and values plus the script's arguments exceed this (what Lua's `unpack` takes) into one
/// value; this backend writes the same dead letter.
const DEAD_LETTER_SCRIPT_MAX_VALUES: usize = 7900;

/// XAUTOCLAIM looks at no more than this many pending entries per entry it may return.
const AUTOCLAIM_ATTEMPTS_PER_COUNT: usize = 10;

/// Streams, consumer groups and pending lists kept in this process, standing in for a
/// Redis server.
///
/// A bus built with [`EventBusBuilder::memory`](crate::EventBusBuilder::memory) (or with
/// the URL `memory://`) keeps its streams here instead of in Redis; its handlers, settings
/// and the whole runtime stay the same. The broker behaves like Redis Streams where the
/// runtime relies on it: ordered `ms-seq` entry ids, consumer groups with a start
/// position, per-consumer pending lists with delivery counts and idle times, claims by
/// idle time, blocking reads woken by new entries, capped dead-letter streams. Idle times
/// follow tokio's clock, so a test with paused time (`#[tokio::test(start_paused = true)]`)
/// reaches claims and retries without waiting.
///
/// Clones share the same data: give a clone to several buses to run several services (each
/// with its own consumer group) or competing consumers (one group, different consumer
/// names) against one broker. [`MemoryBroker::named`] and the URL `memory://NAME` reach a
/// process-wide broker by name instead, for code that only takes a URL.
///
/// Where it differs from Redis:
///
/// - `MAXLEN ~` trims streams (at publish) and dead-letter streams to exactly their cap
///   (Redis trims whole nodes, so keeps up to about a hundred more).
/// - The lag in [`Health`](crate::Health) is always known (Redis cannot tell it after
///   some deletions and reports `None`).
/// - Entry ids are unique across all streams of one broker (Redis only orders them within
///   a stream), so an id alone names an entry.
/// - Nothing is persisted: the data lives as long as a clone of the broker (a named broker
///   as long as the process).
///
/// # Examples
///
/// Two services sharing one broker, each with its own consumer group:
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
/// # #[event(stream = "user.created")]
/// # struct UserCreated { user_id: String }
/// # #[slim_bus::stream]
/// # async fn send_welcome_mail(event: UserCreated) {}
/// # #[slim_bus::stream]
/// # async fn open_account(event: UserCreated) {}
/// # async fn run() -> slim_bus::Result<()> {
/// use slim_bus::{EventBus, MemoryBroker};
///
/// let broker = MemoryBroker::new();
/// let mailer = EventBus::builder()
///     .memory(&broker)
///     .consumer_group("mailer")
///     .handler(send_welcome_mail)
///     .build()
///     .await?;
/// let accounts = EventBus::builder()
///     .memory(&broker)
///     .consumer_group("accounts")
///     .handler(open_account)
///     .build()
///     .await?;
/// let id = mailer.publish(&UserCreated { user_id: "1a2b3c".into() }).await?;
/// assert_eq!(broker.stream_len("user.created"), 1);
/// # let _ = (accounts, id);
/// # Ok(())
/// # }
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(run()).unwrap();
/// ```
#[derive(Clone)]
pub struct MemoryBroker {
    store: Arc<Store>,
}

/// The streams of a broker and the signals about them, shared by every bus on it.
struct Store {
    state: Mutex<State>,
    /// Woken when an entry is added or a stream deleted: blocked reads look again.
    appended: Notify,
    /// Woken after every change, for [`TestBus`](crate::testing::TestBus) to see when
    /// the work is done.
    changed: Notify,
}

#[derive(Default)]
struct State {
    streams: HashMap<String, Stream>,
    /// The last id handed out on any stream.
    last_id: EntryId,
    /// Dead letters the cap trimmed, by dead-letter stream (the Redis backend's counter
    /// keys).
    trimmed: HashMap<String, u64>,
    /// Leases by key: the holder, and when the lease lapses on tokio's clock.
    leases: HashMap<String, (String, Instant)>,
}

#[derive(Default)]
struct Stream {
    entries: BTreeMap<EntryId, RawFields>,
    /// The last id added, which stays even when that entry is deleted (`$` of XGROUP).
    last_id: EntryId,
    groups: BTreeMap<String, Group>,
}

struct Group {
    last_delivered: EntryId,
    pending: BTreeMap<EntryId, Nack>,
    /// Every consumer of the group, with when it last read or claimed (`XINFO CONSUMERS`
    /// idle time).
    consumers: BTreeMap<Arc<str>, Instant>,
    /// What became of entries no longer pending, for tests.
    settled: BTreeMap<EntryId, Outcome>,
}

/// One entry of a group's pending list.
struct Nack {
    consumer: Arc<str>,
    delivery_count: u64,
    delivered_at: Instant,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        let mut streams: Vec<_> = state.streams.keys().collect();
        streams.sort();
        f.debug_struct("MemoryBroker")
            .field("streams", &streams)
            .finish_non_exhaustive()
    }
}

impl MemoryBroker {
    /// A new, empty broker of its own.
    pub fn new() -> Self {
        MemoryBroker {
            store: Arc::new(Store {
                state: Mutex::new(State::default()),
                appended: Notify::new(),
                changed: Notify::new(),
            }),
        }
    }

    /// The process-wide broker called `name`, created empty on first use: the one a bus
    /// built with the URL `memory://NAME` uses. It lives as long as the process.
    ///
    /// # Examples
    ///
    /// ```
    /// use slim_bus::MemoryBroker;
    ///
    /// let broker = MemoryBroker::named("orders-demo");
    /// // Elsewhere: `EventBus::builder().url("memory://orders-demo")` shares its streams.
    /// assert_eq!(MemoryBroker::named("orders-demo").stream_len("orders"), broker.stream_len("orders"));
    /// ```
    pub fn named(name: &str) -> Self {
        static NAMED: OnceLock<Mutex<HashMap<String, MemoryBroker>>> = OnceLock::new();
        let mut named = NAMED
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        named.entry(name.to_owned()).or_default().clone()
    }

    /// The broker a `memory://` URL names: a new one for `memory://`, the named one for
    /// `memory://NAME`; `None` for other URLs.
    pub(crate) fn from_url(url: &str) -> Option<Self> {
        let name = url.strip_prefix(URL_SCHEME)?;
        Some(if name.is_empty() {
            Self::new()
        } else {
            Self::named(name)
        })
    }

    /// A connection for one bus: its blocking reads and wakes are its own.
    pub(crate) fn connect(&self) -> MemoryConnection {
        MemoryConnection {
            store: self.store.clone(),
            reader: Mutex::new(ReaderState::default()),
            wake: Notify::new(),
        }
    }

    /// The number of entries in `stream` (0 when it does not exist), like `XLEN`.
    pub fn stream_len(&self, stream: &str) -> u64 {
        self.lock()
            .streams
            .get(stream)
            .map_or(0, |s| s.entries.len() as u64)
    }

    /// Every entry of `stream` in id order, with its fields, like `XRANGE stream - +`.
    #[allow(clippy::type_complexity)]
    pub fn entries(&self, stream: &str) -> Vec<(EntryId, Vec<(String, Vec<u8>)>)> {
        self.lock()
            .streams
            .get(stream)
            .map(|s| {
                s.entries
                    .iter()
                    .map(|(id, fields)| {
                        let fields = fields
                            .iter()
                            .map(|(name, value)| {
                                (String::from_utf8_lossy(name).into_owned(), value.clone())
                            })
                            .collect();
                        (*id, fields)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The pending list of `group` on `stream` in id order: entries delivered to a
    /// consumer and not acknowledged yet, like `XPENDING stream group - + COUNT`. Empty
    /// when the stream or group does not exist.
    pub fn pending(&self, stream: &str, group: &str) -> Vec<PendingEntry> {
        let now = Instant::now();
        let state = self.lock();
        let Some(group) = state.streams.get(stream).and_then(|s| s.groups.get(group)) else {
            return Vec::new();
        };
        group
            .pending
            .iter()
            .map(|(id, nack)| PendingEntry {
                id: *id,
                consumer: nack.consumer.to_string(),
                delivery_count: nack.delivery_count,
                idle: now.saturating_duration_since(nack.delivered_at),
            })
            .collect()
    }

    /// Delivers up to `count` new entries of `stream` to `consumer` of `group` and never
    /// acknowledges them, like `XREADGROUP ... STREAMS stream >` from a process that
    /// crashes right after: they stay pending with `consumer` until claimed. Creates the
    /// group at the start of the stream when it does not exist. Returns the delivered ids.
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn run() -> slim_bus::Result<()> {
    /// use slim_bus::{EventBus, MemoryBroker};
    ///
    /// let broker = MemoryBroker::new();
    /// let publisher = EventBus::builder().memory(&broker).build().await?;
    /// publisher.send("orders", [("order_id", "o-1")]).await?;
    /// let held = broker.read_unacknowledged("orders", "billing", "crashed-pod", 10);
    /// assert_eq!(held.len(), 1);
    /// assert_eq!(broker.pending("orders", "billing")[0].consumer, "crashed-pod");
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(run()).unwrap();
    /// ```
    pub fn read_unacknowledged(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Vec<EntryId> {
        let delivered = {
            let mut state = self.lock();
            state.ensure_group(stream, group, StartFrom::Beginning);
            state
                .read_new(group, consumer, &[Arc::from(stream)], count, Instant::now())
                .unwrap_or_default()
        };
        self.store.changed.notify_waiters();
        delivered
            .into_iter()
            .flat_map(|batch| batch.deliveries)
            .map(|delivery| delivery.id)
            .collect()
    }

    /// Acknowledges entries of `stream` in `group`, like `XACK`, as another service's
    /// consumer would: e.g. after [`read_unacknowledged`](Self::read_unacknowledged).
    /// Ids not pending in the group are left alone.
    pub fn acknowledge(&self, stream: &str, group: &str, ids: &[EntryId]) {
        self.lock().ack(stream, group, ids);
        self.store.changed.notify_waiters();
    }

    /// The consumers of `group` on `stream` by name, like the names in `XINFO CONSUMERS`:
    /// every consumer that read or claimed since the group was created, until it is
    /// removed. Empty when the stream or group does not exist.
    pub fn consumers(&self, stream: &str, group: &str) -> Vec<String> {
        self.lock()
            .streams
            .get(stream)
            .and_then(|s| s.groups.get(group))
            .map(|group| {
                group
                    .consumers
                    .keys()
                    .map(|name| name.to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Deletes entries from `stream`, like `XDEL`, as trimming or an operator would:
    /// entries pending in a group stay in its pending list. Returns how many existed.
    pub fn delete_entries(&self, stream: &str, ids: &[EntryId]) -> u64 {
        let deleted = self.lock().delete(stream, ids);
        self.store.changed.notify_waiters();
        deleted
    }

    /// What became of entry `id` of `stream` in `group`.
    pub(crate) fn outcome(&self, stream: &str, group: &str, id: EntryId) -> Option<Outcome> {
        let state = self.lock();
        let stream = state.streams.get(stream)?;
        let Some(group) = stream.groups.get(group) else {
            // The group does not exist yet: it has read nothing.
            return stream.entries.contains_key(&id).then_some(Outcome::Unread);
        };
        if let Some(outcome) = group.settled.get(&id) {
            return Some(outcome.clone());
        }
        if let Some(nack) = group.pending.get(&id) {
            return Some(Outcome::Pending {
                deliveries: nack.delivery_count,
            });
        }
        (stream.entries.contains_key(&id) && id > group.last_delivered).then_some(Outcome::Unread)
    }

    /// Whether `group` has nothing left to do on `streams`: every entry delivered, none
    /// pending. `false` while a stream or the group does not exist.
    pub(crate) fn is_idle<'a>(
        &self,
        streams: impl IntoIterator<Item = &'a str>,
        group: &str,
    ) -> bool {
        let state = self.lock();
        streams.into_iter().all(|stream| {
            let Some(stream) = state.streams.get(stream) else {
                return false;
            };
            let Some(group) = stream.groups.get(group) else {
                return false;
            };
            group.pending.is_empty()
                && stream
                    .entries
                    .range((Bound::Excluded(group.last_delivered), Bound::Unbounded))
                    .next()
                    .is_none()
        })
    }

    /// The ids of the pending entries of `group` on `streams`, for messages.
    pub(crate) fn pending_ids<'a>(
        &self,
        streams: impl IntoIterator<Item = &'a str>,
        group: &str,
    ) -> Vec<(String, EntryId)> {
        streams
            .into_iter()
            .flat_map(|stream| {
                self.pending(stream, group)
                    .into_iter()
                    .map(move |entry| (stream.to_owned(), entry.id))
            })
            .collect()
    }

    /// Resolves after the next change to the broker's data; create it before looking at
    /// the data, so that no change is missed.
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.store.changed.notified()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.store.lock()
    }
}

impl Store {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one command under the lock, then wakes who waits for changes.
    fn command<T>(&self, command: impl FnOnce(&mut State) -> T) -> T {
        let result = command(&mut self.lock());
        self.changed.notify_waiters();
        result
    }
}

impl State {
    /// The next id: the system clock's milliseconds, or the last id's with the sequence
    /// bumped when the clock has not moved past it (or went back).
    fn next_id(&mut self) -> EntryId {
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
    fn add(&mut self, stream: &str, fields: RawFields) -> EntryId {
        self.add_capped(stream, None, fields)
    }

    /// `XADD stream [MAXLEN max_len] * fields`, creating the stream.
    fn add_capped(&mut self, stream: &str, max_len: Option<usize>, fields: RawFields) -> EntryId {
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
    /// oldest pending entry, else the last one delivered to it (kept, as Redis keeps it).
    fn trim_acked(&mut self, stream: &str) -> u64 {
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
        let kept = stream.entries.split_off(&needed);
        let trimmed = stream.entries.len() as u64;
        stream.entries = kept;
        trimmed
    }

    /// `XGROUP CREATE stream group 0|$ MKSTREAM`; an existing group is left as it is.
    fn ensure_group(&mut self, stream: &str, group: &str, start: StartFrom) {
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

    /// The entries of `stream` and its `group`, or the NOGROUP error Redis answers.
    fn locate(
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

    /// `XREADGROUP GROUP group consumer COUNT count STREAMS streams... > ...`.
    fn read_new(
        &mut self,
        group: &str,
        consumer: &str,
        streams: &[Arc<str>],
        count: usize,
        now: Instant,
    ) -> Result<Vec<StreamDeliveries>, redis::RedisError> {
        // Redis checks every stream before it delivers from any.
        for stream in streams {
            self.locate(stream, group, "XREADGROUP")?;
        }
        let consumer: Arc<str> = consumer.into();
        let mut batches = Vec::new();
        for (stream_index, stream) in streams.iter().enumerate() {
            let (entries, group) = self.locate(stream, group, "XREADGROUP")?;
            group.seen(&consumer, now);
            let deliveries: Vec<Delivery> = entries
                .range((Bound::Excluded(group.last_delivered), Bound::Unbounded))
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
    fn read_own_pending(
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
    fn remove_idle_consumers(
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
    fn ack(&mut self, stream: &str, group: &str, ids: &[EntryId]) {
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
    fn claim_stale(
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

    /// `XCLAIM stream group consumer min_idle id` for each request: claims an entry only
    /// if it has been idle for at least its `min_idle`; drops deleted entries from the
    /// pending list.
    fn claim_for_retry(
        &mut self,
        group: &str,
        consumer: &str,
        requests: &[(Arc<str>, EntryId, Duration)],
        now: Instant,
    ) -> Result<Vec<Option<EntryFields>>, redis::RedisError> {
        // Like a pipeline whose first error fails the whole reply.
        for (stream, _, _) in requests {
            self.locate(stream, group, "XCLAIM")?;
        }
        let consumer: Arc<str> = consumer.into();
        let mut claimed = Vec::with_capacity(requests.len());
        for (stream, id, min_idle) in requests {
            let (entries, group) = self.locate(stream, group, "XCLAIM")?;
            group.seen(&consumer, now);
            let Some(fields) = entries.get(id) else {
                group.pending.remove(id);
                claimed.push(None);
                continue;
            };
            let min_idle = whole_millis(*min_idle);
            match group.pending.get_mut(id) {
                Some(nack)
                    if min_idle.is_zero()
                        || now.saturating_duration_since(nack.delivered_at) >= min_idle =>
                {
                    nack.consumer = consumer.clone();
                    nack.delivered_at = now;
                    nack.delivery_count += 1;
                    claimed.push(Some(delivered(fields)));
                }
                _ => claimed.push(None),
            }
        }
        Ok(claimed)
    }

    /// The dead-letter script: if entry `id` is pending with `consumer`, acknowledges it
    /// and, unless it was deleted, adds its fields (`@` names escaped) and `meta` to
    /// `dead_letters`, trimmed to `max_len`.
    #[allow(clippy::too_many_arguments)]
    fn dead_letter(
        &mut self,
        stream: &str,
        dead_letters: &str,
        group: &str,
        consumer: &str,
        id: EntryId,
        meta: &[(&'static str, String)],
        max_len: Option<usize>,
    ) -> Result<DeadLetterMove, redis::RedisError> {
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
    fn replay(
        &mut self,
        dead_letters: &str,
        origin: &str,
        id: EntryId,
    ) -> Result<Option<EntryId>, redis::RedisError> {
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
                "ERR",
                &format!("dead letter {id} has no original fields"),
            ));
        }
        let new_id = self.add(origin, fields);
        self.delete(dead_letters, &[id]);
        Ok(Some(new_id))
    }

    /// `XDEL stream ids...`: how many existed.
    fn delete(&mut self, stream: &str, ids: &[EntryId]) -> u64 {
        let Some(stream) = self.streams.get_mut(stream) else {
            return 0;
        };
        ids.iter()
            .filter(|id| stream.entries.remove(id).is_some())
            .count() as u64
    }

    /// `XINFO GROUPS` and `XPENDING` as the Redis backend reads them: nothing when the
    /// stream or the group does not exist.
    fn group_stats(
        &self,
        stream: &str,
        group: &str,
        dead_letters: &str,
        now: Instant,
    ) -> GroupStats {
        let Some(stream) = self.streams.get(stream) else {
            return GroupStats::default();
        };
        let Some(group) = stream.groups.get(group) else {
            return GroupStats::default();
        };
        GroupStats {
            length: stream.entries.len() as u64,
            lag: Some(
                stream
                    .entries
                    .range((Bound::Excluded(group.last_delivered), Bound::Unbounded))
                    .count() as u64,
            ),
            pending: group.pending.len() as u64,
            // XPENDING - + 1: the entry with the lowest id, not the longest idle.
            oldest_pending_idle: group
                .pending
                .first_key_value()
                .map(|(_, nack)| whole_millis(now.saturating_duration_since(nack.delivered_at))),
            dead_letters: self
                .streams
                .get(dead_letters)
                .map_or(0, |s| s.entries.len() as u64),
            dead_letters_trimmed: self.trimmed.get(dead_letters).copied().unwrap_or(0),
        }
    }
}

impl Group {
    /// Records that `consumer` read or claimed just now, adding it to the group if new.
    fn seen(&mut self, consumer: &Arc<str>, now: Instant) {
        self.consumers.insert(consumer.clone(), now);
    }

    fn settle(&mut self, id: EntryId, outcome: Outcome) {
        self.settled.insert(id, outcome);
        while self.settled.len() > MAX_SETTLED_PER_GROUP {
            self.settled.pop_first();
        }
    }
}

/// Durations as Redis takes them: whole milliseconds.
/// A stored entry's fields as a delivery carries them.
fn delivered(fields: &RawFields) -> EntryFields {
    EntryFields::from_pairs(fields.iter().map(|(name, value)| (name, value)))
}

fn whole_millis(duration: Duration) -> Duration {
    Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

/// The NOGROUP error Redis answers for a missing stream or group, which the consumer
/// heals by creating the group again.
fn no_group(stream: &str, group: &str, command: &str) -> redis::RedisError {
    let mut detail = format!("No such key '{stream}' or consumer group '{group}'");
    if command == "XREADGROUP" {
        detail.push_str(" in XREADGROUP with GROUP option");
    }
    server_error("NOGROUP", &detail)
}

/// A Redis error reply with `code`, as the Redis backend would get it from the server, so
/// that the runtime treats both backends' errors alike.
fn server_error(code: &str, detail: &str) -> redis::RedisError {
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

/// One bus's use of a [`MemoryBroker`]: the data is shared, the blocking read is its own.
pub(crate) struct MemoryConnection {
    store: Arc<Store>,
    reader: Mutex<ReaderState>,
    /// Ends this connection's blocking read early.
    wake: Notify,
}

/// Whether a read blocks, and whether a wake came while none did.
#[derive(Default)]
struct ReaderState {
    blocked: bool,
    woken: bool,
}

impl MemoryConnection {
    fn reader(&self) -> MutexGuard<'_, ReaderState> {
        self.reader.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Marks the reader as blocked for as long as it lives.
struct BlockedReader<'a>(&'a MemoryConnection);

impl Drop for BlockedReader<'_> {
    fn drop(&mut self) {
        self.0.reader().blocked = false;
    }
}

#[async_trait]
impl Broker for MemoryConnection {
    async fn publish(
        &self,
        stream: &str,
        max_len: Option<usize>,
        fields: Vec<EncodedField>,
    ) -> Result<EntryId> {
        let fields = fields
            .into_iter()
            .map(|(name, value)| (name.into_owned().into_bytes(), value))
            .collect();
        let id = self
            .store
            .command(|state| state.add_capped(stream, max_len, fields));
        self.store.appended.notify_waiters();
        Ok(id)
    }

    async fn publish_batch(
        &self,
        stream: &str,
        max_len: Option<usize>,
        entries: &[Vec<EncodedField>],
    ) -> Result<Vec<EntryId>> {
        let ids = self.store.command(|state| {
            entries
                .iter()
                .map(|fields| {
                    let fields = fields
                        .iter()
                        .map(|(name, value)| (name.as_bytes().to_vec(), value.clone()))
                        .collect();
                    state.add_capped(stream, max_len, fields)
                })
                .collect()
        });
        self.store.appended.notify_waiters();
        Ok(ids)
    }

    async fn trim_acked(&self, stream: &str) -> Result<u64> {
        Ok(self.store.command(|state| state.trim_acked(stream)))
    }

    async fn ensure_group(&self, stream: &str, group: &str, start: StartFrom) -> Result<()> {
        self.store
            .command(|state| state.ensure_group(stream, group, start));
        Ok(())
    }

    async fn read_new(
        &self,
        group: &str,
        consumer: &str,
        streams: &[Arc<str>],
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StreamDeliveries>> {
        let deadline =
            block.map(|block| Instant::now() + whole_millis(block).max(Duration::from_millis(1)));
        loop {
            let (appended, deadline) = {
                let mut state = self.store.lock();
                let batches = state
                    .read_new(group, consumer, streams, count, Instant::now())
                    .map_err(|e| {
                        Error::redis(format!("reading new entries for group `{group}`"), e)
                    })?;
                if !batches.is_empty() {
                    drop(state);
                    self.store.changed.notify_waiters();
                    return Ok(batches);
                }
                let deadline = match deadline {
                    Some(deadline) if Instant::now() < deadline => deadline,
                    _ => return Ok(Vec::new()),
                };
                // Registered under the lock: an entry added after it wakes this read.
                (self.store.appended.notified(), deadline)
            };
            let woken = {
                let mut reader = self.reader();
                if std::mem::take(&mut reader.woken) {
                    return Ok(Vec::new());
                }
                reader.blocked = true;
                self.wake.notified()
            };
            let _blocked = BlockedReader(self);
            tokio::select! {
                () = appended => {}
                () = woken => return Ok(Vec::new()),
                () = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
            }
        }
    }

    async fn wake_reader(&self) -> Result<()> {
        let mut reader = self.reader();
        if reader.blocked {
            self.wake.notify_waiters();
        } else {
            reader.woken = true;
        }
        Ok(())
    }

    async fn read_own_pending(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        after: EntryId,
        count: usize,
    ) -> Result<Vec<Delivery>> {
        self.store
            .command(|state| {
                state.read_own_pending(stream, group, consumer, after, count, Instant::now())
            })
            .map_err(|e| Error::redis(format!("reading pending entries of stream `{stream}`"), e))
    }

    async fn ack(&self, group: &str, acks: &[(Arc<str>, Vec<EntryId>)]) -> Result<()> {
        self.store.command(|state| {
            for (stream, ids) in acks {
                state.ack(stream, group, ids);
            }
        });
        Ok(())
    }

    async fn claim_stale(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        cursor: EntryId,
        count: usize,
    ) -> Result<ClaimPage> {
        self.store
            .command(|state| {
                state.claim_stale(
                    stream,
                    group,
                    consumer,
                    min_idle,
                    cursor,
                    count,
                    Instant::now(),
                )
            })
            .map_err(|e| Error::redis(format!("claiming stale entries of stream `{stream}`"), e))
    }

    async fn claim_for_retry(
        &self,
        group: &str,
        consumer: &str,
        requests: &[(Arc<str>, EntryId, Duration)],
    ) -> Result<Vec<Option<EntryFields>>> {
        self.store
            .command(|state| state.claim_for_retry(group, consumer, requests, Instant::now()))
            .map_err(|e| {
                Error::redis(
                    format!("claiming entries for their retry in group `{group}`"),
                    e,
                )
            })
    }

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
            .map_err(|e| dlq_error("moving an entry to", dead_letters, e))?;
        if matches!(moved, DeadLetterMove::Moved { .. }) {
            self.store.appended.notify_waiters();
        }
        Ok(moved)
    }

    async fn stream_len(&self, stream: &str) -> Result<u64> {
        Ok(self
            .store
            .lock()
            .streams
            .get(stream)
            .map_or(0, |s| s.entries.len() as u64))
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn remove_idle_consumers(
        &self,
        stream: &str,
        group: &str,
        min_idle: Duration,
        except: &str,
    ) -> Result<Vec<String>> {
        Ok(self.store.command(|state| {
            state.remove_idle_consumers(stream, group, min_idle, except, Instant::now())
        }))
    }

    async fn check_version(&self) -> Result<()> {
        Ok(())
    }

    async fn group_stats(
        &self,
        stream: &str,
        group: &str,
        dead_letters: &str,
    ) -> Result<GroupStats> {
        Ok(self
            .store
            .lock()
            .group_stats(stream, group, dead_letters, Instant::now()))
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

    async fn replay(
        &self,
        dead_letters: &str,
        origin: &str,
        id: EntryId,
    ) -> Result<Option<EntryId>> {
        let replayed = self
            .store
            .command(|state| state.replay(dead_letters, origin, id))
            .map_err(|e| dlq_error("replaying from", dead_letters, e))?;
        if replayed.is_some() {
            self.store.appended.notify_waiters();
        }
        Ok(replayed)
    }

    async fn delete(&self, stream: &str, ids: &[EntryId]) -> Result<u64> {
        Ok(self.store.command(|state| state.delete(stream, ids)))
    }

    async fn hold_lease(&self, key: &str, holder: &str, ttl: Duration) -> Result<LeaseState> {
        let now = Instant::now();
        // Leases are not entries: no change a test waiting for idleness should see.
        let mut state = self.store.lock();
        match state.leases.get(key) {
            Some((current, lapses)) if current != holder && *lapses > now => {
                Ok(LeaseState::Taken {
                    holder: current.clone(),
                    remaining: *lapses - now,
                })
            }
            _ => {
                state
                    .leases
                    .insert(key.to_owned(), (holder.to_owned(), now + ttl));
                Ok(LeaseState::Held)
            }
        }
    }

    async fn release_lease(&self, key: &str, holder: &str) -> Result<()> {
        let mut state = self.store.lock();
        if state
            .leases
            .get(key)
            .is_some_and(|(current, _)| current == holder)
        {
            state.leases.remove(key);
        }
        Ok(())
    }

    async fn stream_status(
        &self,
        stream: &str,
        dead_letters: &str,
    ) -> Result<Option<StreamStatus>> {
        Ok(self
            .store
            .lock()
            .stream_status(stream, dead_letters, Instant::now()))
    }

    async fn pending_entries(
        &self,
        stream: &str,
        group: &str,
        consumer: Option<&str>,
        count: usize,
    ) -> Result<Vec<PendingEntry>> {
        self.store
            .lock()
            .pending_entries(stream, group, consumer, count, Instant::now())
    }

    async fn read_after(
        &self,
        stream: &str,
        after: EntryId,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<(EntryId, RawFields)>> {
        Ok(self.read_entries_after(stream, after, count, block).await)
    }

    async fn delete_key(&self, stream: &str) -> Result<()> {
        self.store.command(|state| state.streams.remove(stream));
        // A read blocked on the stream looks again, and finds its group gone.
        self.store.appended.notify_waiters();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn fields(pairs: &[(&'static str, &str)]) -> Vec<EncodedField> {
        pairs
            .iter()
            .map(|(name, value)| (Cow::Borrowed(*name), value.as_bytes().to_vec()))
            .collect()
    }

    fn streams(names: &[&str]) -> Vec<Arc<str>> {
        names.iter().map(|name| Arc::from(*name)).collect()
    }

    async fn publish(broker: &MemoryConnection, stream: &str, seq: u64) -> EntryId {
        broker
            .publish(stream, None, fields(&[("seq", &seq.to_string())]))
            .await
            .expect("publishing in memory succeeds")
    }

    async fn read(broker: &MemoryConnection, consumer: &str, count: usize) -> Vec<Delivery> {
        broker
            .read_new("g", consumer, &streams(&["s"]), count, None)
            .await
            .expect("the group exists")
            .into_iter()
            .flat_map(|batch| batch.deliveries)
            .collect()
    }

    fn code(error: &Error) -> Option<&str> {
        match error {
            Error::Redis { source, .. } => source.code(),
            _ => None,
        }
    }

    #[tokio::test]
    async fn ids_grow_within_a_stream_and_are_unique_across_streams() {
        let broker = MemoryBroker::new().connect();
        let mut ids = Vec::new();
        for seq in 0..50 {
            ids.push(publish(&broker, if seq % 2 == 0 { "a" } else { "b" }, seq).await);
        }
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_millis() as u64;
        assert!(ids[0].millis() <= now && ids[0].millis() + 60_000 > now);
    }

    #[tokio::test]
    async fn groups_start_at_the_beginning_or_after_the_last_entry_and_creating_twice_is_fine() {
        let broker = MemoryBroker::new().connect();
        let before = publish(&broker, "s", 1).await;
        broker
            .ensure_group("s", "g", StartFrom::Beginning)
            .await
            .expect("created");
        broker
            .ensure_group("s", "late", StartFrom::NewOnly)
            .await
            .expect("created");
        let after = publish(&broker, "s", 2).await;
        let first = read(&broker, "c", 10).await;
        assert_eq!(
            first.iter().map(|d| d.id).collect::<Vec<_>>(),
            [before, after]
        );
        // Like BUSYGROUP: the existing group keeps its position.
        broker
            .ensure_group("s", "g", StartFrom::Beginning)
            .await
            .expect("exists");
        assert!(read(&broker, "c", 10).await.is_empty());
        let late = broker
            .read_new("late", "c", &streams(&["s"]), 10, None)
            .await
            .expect("the group exists");
        assert_eq!(late[0].deliveries.len(), 1);
        assert_eq!(late[0].deliveries[0].id, after);
    }

    #[tokio::test]
    async fn a_missing_group_or_stream_is_a_nogroup_error_like_redis() {
        let broker = MemoryBroker::new().connect();
        let error = broker
            .read_new("g", "c", &streams(&["nowhere"]), 1, None)
            .await
            .expect_err("no such stream");
        assert_eq!(code(&error), Some("NOGROUP"), "{error}");
        let report = format!("{:#}", anyhow::Error::new(error));
        assert!(report.contains("nowhere"), "{report}");
        publish(&broker, "s", 1).await;
        for error in [
            broker
                .read_own_pending("s", "g", "c", EntryId::MIN, 1)
                .await
                .map(drop)
                .expect_err("no such group"),
            broker
                .claim_stale("s", "g", "c", MINUTE, EntryId::MIN, 1)
                .await
                .map(drop)
                .expect_err("no such group"),
            broker
                .claim_for_retry("g", "c", &[(Arc::from("s"), EntryId::MIN, MINUTE)])
                .await
                .map(drop)
                .expect_err("no such group"),
        ] {
            assert_eq!(code(&error), Some("NOGROUP"), "{error}");
        }
        // XACK of a missing group acknowledges nothing and is no error.
        broker
            .ack("g", &[(Arc::from("s"), vec![EntryId::MIN])])
            .await
            .expect("no error");
    }

    #[tokio::test(start_paused = true)]
    async fn reading_history_again_counts_each_delivery_and_shows_deleted_entries_without_fields() {
        let handle = MemoryBroker::new();
        let broker = handle.connect();
        broker
            .ensure_group("s", "g", StartFrom::Beginning)
            .await
            .expect("created");
        let ids = [
            publish(&broker, "s", 1).await,
            publish(&broker, "s", 2).await,
            publish(&broker, "s", 3).await,
        ];
        assert_eq!(read(&broker, "mine", 2).await.len(), 2);
        assert_eq!(read(&broker, "theirs", 2).await.len(), 1);
        tokio::time::advance(Duration::from_secs(3)).await;
        let pending = handle.pending("s", "g");
        assert_eq!(pending.len(), 3);
        assert!(
            pending
                .iter()
                .all(|p| p.delivery_count == 1 && p.idle == Duration::from_secs(3))
        );
        assert_eq!(handle.delete_entries("s", &[ids[1]]), 1);

        let again = broker
            .read_own_pending("s", "g", "mine", EntryId::MIN, 10)
            .await
            .expect("the group exists");
        assert_eq!(again.iter().map(|d| d.id).collect::<Vec<_>>(), &ids[..2]);
        assert_eq!(
            again.iter().map(|d| d.delivery_count).collect::<Vec<_>>(),
            [2, 2]
        );
        assert!(again[0].fields.is_some());
        assert!(again[1].fields.is_none(), "deleted but pending: no fields");
        let after_first = broker
            .read_own_pending("s", "g", "mine", ids[0], 10)
            .await
            .expect("the group exists");
        assert_eq!(after_first.len(), 1);
        assert_eq!(after_first[0].delivery_count, 3);
        let pending = handle.pending("s", "g");
        assert_eq!(
            pending[0].idle,
            Duration::ZERO,
            "delivering again resets the idle time"
        );
        assert_eq!(pending[2].idle, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn autoclaim_takes_only_idle_entries_pages_with_a_cursor_and_drops_deleted_ones() {
        let handle = MemoryBroker::new();
        let broker = handle.connect();
        broker
            .ensure_group("s", "g", StartFrom::Beginning)
            .await
            .expect("created");
        let mut ids = Vec::new();
        for seq in 0..5 {
            ids.push(publish(&broker, "s", seq).await);
        }
        read(&broker, "dead", 4).await;
        tokio::time::advance(Duration::from_secs(10)).await;
        read(&broker, "dead", 1).await; // ids[4]: fresh
        handle.delete_entries("s", &[ids[1]]);

        let page = broker
            .claim_stale("s", "g", "live", Duration::from_secs(5), EntryId::MIN, 2)
            .await
            .expect("the group exists");
        // ids[0] claimed, ids[1] deleted (it counts against COUNT): the next page starts at ids[2].
        assert_eq!(
            page.deliveries.iter().map(|d| d.id).collect::<Vec<_>>(),
            [ids[0]]
        );
        assert_eq!(page.deliveries[0].delivery_count, 2);
        assert_eq!(page.deleted, [ids[1]]);
        assert_eq!(page.next_cursor, ids[2]);

        let page = broker
            .claim_stale(
                "s",
                "g",
                "live",
                Duration::from_secs(5),
                page.next_cursor,
                10,
            )
            .await
            .expect("the group exists");
        assert_eq!(
            page.deliveries.iter().map(|d| d.id).collect::<Vec<_>>(),
            &ids[2..4]
        );
        assert_eq!(
            page.next_cursor,
            EntryId::MIN,
            "the scan went through the whole list"
        );
        let pending = handle.pending("s", "g");
        assert_eq!(
            pending
                .iter()
                .map(|p| (p.id, p.consumer.as_str(), p.delivery_count))
                .collect::<Vec<_>>(),
            [
                (ids[0], "live", 2),
                (ids[2], "live", 2),
                (ids[3], "live", 2),
                (ids[4], "dead", 1)
            ],
            "the deleted entry left the pending list; the fresh one stayed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn claiming_for_a_retry_needs_the_idle_time_so_a_claim_in_between_wins() {
        let handle = MemoryBroker::new();
        let broker = handle.connect();
        broker
            .ensure_group("s", "g", StartFrom::Beginning)
            .await
            .expect("created");
        let kept = publish(&broker, "s", 1).await;
        let gone = publish(&broker, "s", 2).await;
        read(&broker, "me", 2).await;
        tokio::time::advance(Duration::from_millis(500)).await;
        let s: Arc<str> = Arc::from("s");
        let too_early = broker
            .claim_for_retry("g", "me", &[(s.clone(), kept, Duration::from_millis(501))])
            .await
            .expect("the group exists");
        assert_eq!(too_early, [None]);
        handle.delete_entries("s", &[gone]);
        let claimed = broker
            .claim_for_retry(
                "g",
                "me",
                &[
                    (s.clone(), kept, Duration::from_millis(500)),
                    (s.clone(), gone, Duration::ZERO),
                ],
            )
            .await
            .expect("the group exists");
        assert!(claimed[0].is_some());
        assert_eq!(claimed[1], None);
        let pending = handle.pending("s", "g");
        assert_eq!(pending.len(), 1, "the deleted entry left the pending list");
        assert_eq!(
            (pending[0].delivery_count, pending[0].idle),
            (2, Duration::ZERO)
        );
    }

    #[tokio::test]
    async fn dead_letters_move_atomically_with_escaped_names_and_are_capped() {
        let handle = MemoryBroker::new();
        let broker = handle.connect();
        broker
            .ensure_group("s", "g", StartFrom::Beginning)
            .await
            .expect("created");
        let id = broker
            .publish("s", None, fields(&[("user", "u1"), ("@reason", "mine")]))
            .await
            .expect("published");
        read(&broker, "me", 1).await;
        let meta = [
            ("@reason", "permanent".to_owned()),
            ("@error", "no".to_owned()),
        ];
        let moved = |consumer: &'static str| {
            let broker = &broker;
            let meta = &meta;
            async move {
                broker
                    .dead_letter("s", "{s}:dlq", "g", consumer, id, meta, Some(2))
                    .await
                    .expect("the group exists")
            }
        };
        assert_eq!(moved("someone-else").await, DeadLetterMove::NotPending);
        assert_eq!(moved("me").await, DeadLetterMove::Moved { trimmed: 0 });
        assert_eq!(moved("me").await, DeadLetterMove::NotPending, "never twice");
        assert!(handle.pending("s", "g").is_empty());
        let letters = handle.entries("{s}:dlq");
        assert_eq!(letters.len(), 1);
        let names: Vec<_> = letters[0].1.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["user", "@@reason", "@reason", "@error"]);

        // Replay restores the escaped name and drops the metadata.
        let replayed = broker
            .replay("{s}:dlq", "s", letters[0].0)
            .await
            .expect("replayed")
            .expect("the dead letter exists");
        let origin = handle.entries("s");
        assert_eq!(origin.last().map(|(id, _)| *id), Some(replayed));
        assert_eq!(
            origin.last().map(|(_, fields)| fields.clone()),
            Some(vec![
                ("user".to_owned(), b"u1".to_vec()),
                ("@reason".to_owned(), b"mine".to_vec())
            ])
        );
        assert_eq!(handle.stream_len("{s}:dlq"), 0);
        assert_eq!(
            broker
                .replay("{s}:dlq", "s", letters[0].0)
                .await
                .expect("no error"),
            None
        );

        // A deleted entry is acknowledged, not moved; the cap keeps the newest.
        let deleted = publish(&broker, "s", 9).await;
        for seq in 0..4 {
            publish(&broker, "s", seq).await;
        }
        read(&broker, "me", 10).await;
        handle.delete_entries("s", &[deleted]);
        assert_eq!(
            broker
                .dead_letter("s", "{s}:dlq", "g", "me", deleted, &meta, Some(2))
                .await
                .expect("the group exists"),
            DeadLetterMove::Deleted
        );
        let rest: Vec<EntryId> = handle.pending("s", "g").iter().map(|p| p.id).collect();
        let mut trimmed = 0;
        for id in &rest {
            if let DeadLetterMove::Moved { trimmed: t } = broker
                .dead_letter("s", "{s}:dlq", "g", "me", *id, &meta, Some(2))
                .await
                .expect("the group exists")
            {
                trimmed += t;
            }
        }
        assert_eq!(rest.len(), 5, "the four published and the replayed one");
        assert_eq!(trimmed, 3, "five dead letters under a cap of two");
        assert_eq!(handle.stream_len("{s}:dlq"), 2);
        let stats = broker
            .group_stats("s", "g", "{s}:dlq")
            .await
            .expect("no error");
        // Dead-lettering leaves the entries in their stream, as Redis does.
        let length = handle.stream_len("s");
        assert_eq!(
            stats,
            GroupStats {
                length,
                lag: Some(0),
                pending: 0,
                oldest_pending_idle: None,
                dead_letters: 2,
                dead_letters_trimmed: 3,
            }
        );
    }

    #[tokio::test]
    async fn an_entry_too_large_for_the_redis_script_has_its_fields_packed_like_there() {
        let handle = MemoryBroker::new();
        let broker = handle.connect();
        broker
            .ensure_group("s", "g", StartFrom::Beginning)
            .await
            .expect("created");
        let names: Vec<String> = (0..4000).map(|i| format!("f{i}")).collect();
        let many: Vec<EncodedField> = names
            .iter()
            .map(|name| (Cow::Owned(name.clone()), b"v".to_vec()))
            .collect();
        let id = broker.publish("s", None, many).await.expect("published");
        read(&broker, "me", 1).await;
        let meta = [("@reason", "decode".to_owned())];
        assert_eq!(
            broker
                .dead_letter("s", "{s}:dlq", "g", "me", id, &meta, None)
                .await
                .expect("the group exists"),
            DeadLetterMove::Moved { trimmed: 0 }
        );
        let letters = handle.entries("{s}:dlq");
        let original: RawFields = names
            .iter()
            .map(|name| (name.as_bytes().to_vec(), b"v".to_vec()))
            .collect();
        assert_eq!(
            letters[0].1,
            [
                ("@fields".to_owned(), pack_fields(&original)),
                ("@reason".to_owned(), b"decode".to_vec())
            ]
        );
    }

    #[tokio::test]
    async fn a_dead_letter_without_original_fields_is_not_replayed() {
        let handle = MemoryBroker::new();
        let broker = handle.connect();
        let id = broker
            .publish("{s}:dlq", None, fields(&[("@reason", "decode")]))
            .await
            .expect("published");
        let error = broker
            .replay("{s}:dlq", "s", id)
            .await
            .expect_err("nothing to replay");
        let report = format!("{:#}", anyhow::Error::new(error));
        assert!(report.contains("has no original fields"), "{report}");
        assert_eq!(handle.stream_len("{s}:dlq"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_blocking_read_is_woken_by_a_new_entry_or_a_wake_and_otherwise_times_out() {
        let handle = MemoryBroker::new();
        let broker = Arc::new(handle.connect());
        let publisher = handle.connect();
        broker
            .ensure_group("s", "g", StartFrom::Beginning)
            .await
            .expect("created");
        let start = Instant::now();
        let timed_out = broker
            .read_new("g", "c", &streams(&["s"]), 10, Some(Duration::from_secs(2)))
            .await
            .expect("read");
        assert!(timed_out.is_empty());
        assert_eq!(start.elapsed(), Duration::from_secs(2));

        let reader = tokio::spawn({
            let broker = broker.clone();
            async move {
                broker
                    .read_new("g", "c", &streams(&["s"]), 10, Some(MINUTE))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let id = publish(&publisher, "s", 1).await;
        let woken = reader.await.expect("no panic").expect("read");
        assert_eq!(woken[0].deliveries[0].id, id);
        assert_eq!(start.elapsed(), Duration::from_secs(3), "woken at once");

        let reader = tokio::spawn({
            let broker = broker.clone();
            async move {
                broker
                    .read_new("g", "c", &streams(&["s"]), 10, Some(MINUTE))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        broker.wake_reader().await.expect("woken");
        assert!(reader.await.expect("no panic").expect("read").is_empty());
        assert_eq!(start.elapsed(), Duration::from_secs(4));

        // A wake while no read blocks makes the next read return without blocking.
        broker.wake_reader().await.expect("woken");
        let read = broker
            .read_new("g", "c", &streams(&["s"]), 10, Some(MINUTE))
            .await
            .expect("read");
        assert!(read.is_empty());
        assert_eq!(start.elapsed(), Duration::from_secs(4));
    }

    #[tokio::test]
    async fn named_brokers_are_shared_and_memory_urls_pick_them() {
        let named = MemoryBroker::from_url("memory://memory-unit-test").expect("a memory url");
        publish(&named.connect(), "s", 1).await;
        assert_eq!(MemoryBroker::named("memory-unit-test").stream_len("s"), 1);
        let private = MemoryBroker::from_url("memory://").expect("a memory url");
        assert_eq!(private.stream_len("s"), 0);
        assert!(MemoryBroker::from_url("redis://127.0.0.1/").is_none());
    }
}
