//! The in-memory backend: what the runtime uses of Redis Streams (entry ids, consumer
//! groups, pending lists with delivery counts and idle times, claims, trimming, dead-letter
//! moves) inside one process, for tests and demos without a Redis server.
//!
//! Each command runs under one lock, so every command is atomic like a Redis command or
//! script. Idle times follow tokio's clock, so `tokio::time::pause()` drives claims and
//! retries; entry ids follow the system clock like Redis's.
//!
//! [`state`] holds the data, [`groups`], [`dead_letters`] and [`inspect`] the commands by
//! role, and [`connection`] one bus's use of it. A [cluster-like](MemoryBroker::cluster_like)
//! broker refuses what Redis Cluster refuses.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use tokio::sync::Notify;
use tokio::time::Instant;

use self::connection::ReaderState;
use self::state::State;
use crate::config::StartFrom;
use crate::event::EntryId;
use crate::inspect::PendingEntry;
use crate::testing::Outcome;

mod connection;
mod dead_letters;
mod groups;
mod inspect;
mod state;
#[cfg(test)]
mod tests;

pub(crate) use connection::MemoryConnection;

/// The scheme of URLs that select the in-memory backend: `memory://` for a private broker,
/// `memory://NAME` for the process-wide broker called NAME.
pub(crate) const URL_SCHEME: &str = "memory://";

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
    pub(super) state: Mutex<State>,
    /// Woken when an entry is added or a stream deleted: blocked reads look again.
    pub(super) appended: Notify,
    /// Woken after every change, for [`TestBus`](crate::testing::TestBus) to see when
    /// the work is done.
    pub(super) changed: Notify,
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

    /// Makes the next run of `command` by any bus on this broker that delivers entries take
    /// effect and then fail as if its reply had been lost (a connection that timed out after the server
    /// ran the command). Supported: `XAUTOCLAIM` (a claim scan), `XCLAIM` (the claim of
    /// entries due for their retry) and `XREADGROUP` of a consumer's own pending entries
    /// (its recovery read). For fault-injection tests.
    pub fn lose_next_reply(&self, command: &str) {
        self.lock().lost_replies.push(command.to_ascii_uppercase());
    }

    /// A new, empty broker of its own that refuses what Redis Cluster refuses: a command
    /// or script whose keys are in different hash slots fails with the cluster's
    /// `CROSSSLOT` error. Everything else behaves as in [`new`](Self::new). A test suite
    /// run against it catches operations that would fail on a cluster, without one: a
    /// read of several streams at once, or a dead-letter stream outside its stream's slot.
    ///
    /// The slot of a key is Redis Cluster's: CRC16 of its hash tag (the part between the
    /// first `{` and the next `}`) or of the whole key, modulo 16384.
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn run() -> slim_bus::Result<()> {
    /// use slim_bus::{EventBus, MemoryBroker};
    ///
    /// let broker = MemoryBroker::cluster_like();
    /// let bus = EventBus::builder().memory(&broker).build().await?;
    /// bus.send("orders", [("order_id", "o-1")]).await?;
    /// assert!(broker.is_cluster_like());
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(run()).unwrap();
    /// ```
    pub fn cluster_like() -> Self {
        let broker = Self::new();
        broker.lock().cluster_like = true;
        broker
    }

    /// Whether this broker refuses cross-slot operations as Redis Cluster does (see
    /// [`cluster_like`](Self::cluster_like)).
    pub fn is_cluster_like(&self) -> bool {
        self.lock().cluster_like
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

    /// Deletes consumer group `group` of `stream` with its pending list, like
    /// `XGROUP DESTROY`. Whether it existed.
    pub fn destroy_group(&self, stream: &str, group: &str) -> bool {
        let destroyed = self
            .lock()
            .streams
            .get_mut(stream)
            .is_some_and(|s| s.groups.remove(group).is_some());
        // A read blocked on the stream looks again, and finds its group gone.
        self.store.appended.notify_waiters();
        self.store.changed.notify_waiters();
        destroyed
    }

    /// How many retries asked for with `retry_after` `group` has recorded the due time of
    /// on `stream` (the fields of the Redis backend's `retry_at` hash).
    pub fn recorded_retry_dues(&self, stream: &str, group: &str) -> usize {
        self.lock()
            .retry_dues
            .get(&crate::broker::retry_due_key(stream, group))
            .map_or(0, BTreeMap::len)
    }

    /// Deletes `stream` with its consumer groups, like `DEL`.
    pub fn delete_stream(&self, stream: &str) {
        self.lock().streams.remove(stream);
        self.store.appended.notify_waiters();
        self.store.changed.notify_waiters();
    }

    /// Deletes every stream, group, counter and lease, like `FLUSHALL` (or a restart of a
    /// server without persistence). Ids handed out later are still newer than earlier ones.
    pub fn flush_all(&self) {
        {
            let mut state = self.lock();
            state.streams.clear();
            state.trimmed.clear();
            state.retry_dues.clear();
            state.leases.clear();
        }
        self.store.appended.notify_waiters();
        self.store.changed.notify_waiters();
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
            group.pending.is_empty() && group.undelivered(&stream.entries).next().is_none()
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
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one command under the lock, then wakes who waits for changes.
    pub(super) fn command<T>(&self, command: impl FnOnce(&mut State) -> T) -> T {
        let result = command(&mut self.lock());
        self.changed.notify_waiters();
        result
    }
}
