//! What the runtime needs of a stream server, by role (publishing, group reading, the
//! dead-letter store, inspection, leases), and what each role answers with.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::EntryFields;
use crate::codec::EncodedField;
use crate::config::StartFrom;
use crate::error::Result;
use crate::event::EntryId;
use crate::inspect::{PendingEntry, StreamStatus};

/// The fields of one entry as stored: names and values as raw bytes.
pub(crate) type RawFields = Vec<(Vec<u8>, Vec<u8>)>;

/// One entry delivered to this consumer.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) id: EntryId,
    /// `None` when the entry is still pending but was deleted or trimmed from the stream.
    pub(crate) fields: Option<EntryFields>,
    /// How often the group has delivered the entry, this delivery included.
    pub(crate) delivery_count: u64,
    /// When the reply that delivered it arrived: no earlier than Redis delivered it.
    pub(crate) delivered_at: Instant,
}

/// The deliveries of one read, by stream.
#[derive(Debug)]
pub(crate) struct StreamDeliveries {
    /// The position of the stream in the list the read was given.
    pub(crate) stream_index: usize,
    pub(crate) deliveries: Vec<Delivery>,
}

/// Appends entries to streams.
#[async_trait]
pub(crate) trait Publishing: Send + Sync + 'static {
    /// Appends an entry, returning its id; with `max_len`, trims the stream to about that
    /// many entries, oldest first.
    async fn publish(
        &self,
        stream: &str,
        max_len: Option<usize>,
        fields: Vec<EncodedField>,
    ) -> Result<EntryId>;

    /// Appends several entries to `stream`, in order, returning their ids, trimming as
    /// [`publish`](Publishing::publish) does. A backend that can should do it in one round trip.
    async fn publish_batch(
        &self,
        stream: &str,
        max_len: Option<usize>,
        entries: &[Vec<EncodedField>],
    ) -> Result<Vec<EntryId>>;
}

/// Consumer groups: reading, acknowledging and claiming entries, and keeping a group and
/// its stream tidy.
#[async_trait]
pub(crate) trait GroupReading: Send + Sync + 'static {
    /// Creates `group` on `stream` (and the stream) unless it exists.
    async fn ensure_group(&self, stream: &str, group: &str, start: StartFrom) -> Result<()>;

    /// Creates `group` on `stream` (and the stream) unless it exists, reading on from just
    /// after `after`, or from `start` when `after` is `None`. Whether it created the group.
    async fn recreate_group(
        &self,
        stream: &str,
        group: &str,
        after: Option<EntryId>,
        start: StartFrom,
    ) -> Result<bool>;

    /// Delivers up to `count` new entries per stream to `consumer`, waiting up to `block`
    /// for the first one (not at all for `None`). An empty result is not an error.
    async fn read_new(
        &self,
        group: &str,
        consumer: &str,
        streams: &[Arc<str>],
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StreamDeliveries>>;

    /// Ends a blocking [`read_new`](GroupReading::read_new) in progress early, as if its block
    /// time had passed, so the reader can start due work; does nothing when no read blocks.
    async fn wake_reader(&self) -> Result<()>;

    /// Delivers again up to `count` of the entries `consumer` holds pending on `stream`
    /// with ids after `after`, in id order.
    async fn read_own_pending(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        after: EntryId,
        count: usize,
    ) -> Result<Vec<Delivery>>;

    /// Acknowledges entries, by stream, in one round trip.
    async fn ack(&self, group: &str, acks: &[(Arc<str>, Vec<EntryId>)]) -> Result<()>;

    /// Claims for `consumer` up to `count` entries of `stream` that have been pending with
    /// any consumer for at least `min_idle`, scanning the pending list from `cursor`.
    async fn claim_stale(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        cursor: EntryId,
        count: usize,
    ) -> Result<ClaimPage>;

    /// Claims back entries pending with `consumer`: each only if it still is (not one
    /// another consumer claimed meanwhile), counting a delivery; one pending with no one is
    /// put back under `consumer` or left, as `unowned` says. One result per request, in
    /// order: its fields, or `None` where the entry was not claimed or no longer exists.
    async fn claim_own(
        &self,
        group: &str,
        consumer: &str,
        requests: &[(Arc<str>, EntryId)],
        unowned: Unowned,
    ) -> Result<Vec<Option<EntryFields>>>;

    /// Sets to `idle` the idle time of those of `ids` that are pending with `consumer` on
    /// `stream`, keeping their delivery counts (`XCLAIM ... IDLE idle JUSTID`), and returns
    /// them. An id pending with another consumer is left alone, never taken back, and not
    /// returned, nor is one deleted from the stream; one pending with no one (acknowledged
    /// just now, or its group lost and created again) is returned, and put back under
    /// `consumer` with that idle time or left, as `unowned` says. With `idle` zero it keeps
    /// held entries from going stale; with `claim_min_idle` it hands them over to the next
    /// claim scan of any consumer.
    async fn touch_own(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ids: &[EntryId],
        idle: Duration,
        unowned: Unowned,
    ) -> Result<Vec<EntryId>>;

    /// Atomically removes the consumers of `group` on `stream`, other than `except`, that
    /// have been idle for at least `min_idle` and hold no pending entries; returns their
    /// names.
    async fn remove_idle_consumers(
        &self,
        stream: &str,
        group: &str,
        min_idle: Duration,
        except: &str,
    ) -> Result<Vec<String>>;

    /// Records in the hash `key` that the retry of entry `id` is due at `due_unix_ms`.
    async fn record_retry_due(&self, key: &str, id: EntryId, due_unix_ms: u64) -> Result<()>;

    /// Deletes the due times of `ids` from the hash `key`.
    async fn forget_retry_dues(&self, key: &str, ids: &[EntryId]) -> Result<()>;

    /// The due times (unix milliseconds) the hash `key` holds for `ids`, in order.
    async fn retry_dues(&self, key: &str, ids: &[EntryId]) -> Result<Vec<Option<u64>>>;

    /// Deletes the entries of `stream` that every consumer group of it has been delivered
    /// and has acknowledged: those before the oldest entry some group still needs (its
    /// oldest pending entry, else the last one delivered to it). Nothing when the stream
    /// has no group. At most `max_entries`, the oldest, per call: a caller that got as many
    /// calls again. Returns how many were deleted.
    async fn trim_acked(&self, stream: &str, max_entries: usize) -> Result<u64>;
}

/// Dead-letter streams: moving a failed entry there, replaying it, and reading, counting
/// and deleting what they hold.
#[async_trait]
pub(crate) trait DeadLetterStore: Send + Sync + 'static {
    /// Atomically moves entry `id` of `stream`, pending with `consumer`, to `dead_letters`:
    /// adds its fields and `meta` there (capped at about `max_len` entries, if given, the
    /// number trimmed added to the count that [`group_stats`](Inspection::group_stats)
    /// reports) and acknowledges it.
    #[allow(clippy::too_many_arguments)]
    async fn dead_letter(
        &self,
        stream: &str,
        dead_letters: &str,
        group: &str,
        consumer: &str,
        id: EntryId,
        meta: &[(&'static str, String)],
        max_len: Option<usize>,
    ) -> Result<DeadLetterMove>;

    /// Atomically adds the original fields of dead letter `id` to `origin` and deletes it
    /// from `dead_letters`; `None` when there is no such dead letter.
    async fn replay(
        &self,
        dead_letters: &str,
        origin: &str,
        id: EntryId,
    ) -> Result<Option<EntryId>>;

    /// Up to `count` entries of `stream` with ids after `after` (from the start for `None`).
    async fn range_after(
        &self,
        stream: &str,
        after: Option<EntryId>,
        count: usize,
    ) -> Result<Vec<(EntryId, RawFields)>>;

    /// The number of entries in a stream (0 when it does not exist).
    async fn stream_len(&self, stream: &str) -> Result<u64>;

    /// Deletes entries from a stream; returns how many existed.
    async fn delete(&self, stream: &str, ids: &[EntryId]) -> Result<u64>;

    /// Deletes a whole stream.
    async fn delete_key(&self, stream: &str) -> Result<()>;
}

/// What a stream, its groups and their pending lists look like, for health and for the
/// inspection API.
#[async_trait]
pub(crate) trait Inspection: Send + Sync + 'static {
    /// How far `group` is behind on `stream`, and how many dead letters it has.
    async fn group_stats(
        &self,
        stream: &str,
        group: &str,
        dead_letters: &str,
    ) -> Result<GroupStats>;

    /// The state of `stream`, its groups and their consumers, and the length of
    /// `dead_letters`; `None` when there is no such key.
    async fn stream_status(&self, stream: &str, dead_letters: &str)
    -> Result<Option<StreamStatus>>;

    /// Up to `count` entries of the pending list of `group` on `stream`, lowest id first,
    /// only those of `consumer` when given; [`Error::GroupNotFound`](crate::Error::GroupNotFound)
    /// when the stream or the group does not exist.
    async fn pending_entries(
        &self,
        stream: &str,
        group: &str,
        consumer: Option<&str>,
        count: usize,
    ) -> Result<Vec<PendingEntry>>;

    /// Up to `count` entries of `stream` with ids after `after`, waiting up to `block` for
    /// the first one (not at all for `None`), without a consumer group: like `XREAD`.
    async fn read_after(
        &self,
        stream: &str,
        after: EntryId,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<(EntryId, RawFields)>>;
}

/// Leases on names (the consumer-name lease): taken, renewed and released atomically.
#[async_trait]
pub(crate) trait Leases: Send + Sync + 'static {
    /// Takes or renews the lease at `key` for `holder`, for `ttl` from now: sets it when
    /// it is free or already `holder`'s, in one atomic step.
    async fn hold_lease(&self, key: &str, holder: &str, ttl: Duration) -> Result<LeaseState>;

    /// Deletes the lease at `key` if `holder` has it.
    async fn release_lease(&self, key: &str, holder: &str) -> Result<()>;
}

/// What the runtime needs of a stream server: every role, and the server itself. Each
/// backend implements the roles; the runtime holds an `Arc<dyn Broker>` and calls any of
/// them through it.
#[async_trait]
pub(crate) trait Broker:
    Publishing + GroupReading + DeadLetterStore + Inspection + Leases + Send + Sync + 'static
{
    /// Whether the server answers.
    async fn ping(&self) -> Result<()>;

    /// Fails with [`Error::UnsupportedServer`](crate::Error::UnsupportedServer) when the
    /// server runs a Redis older than [`MIN_REDIS_VERSION`](super::MIN_REDIS_VERSION).
    async fn check_version(&self) -> Result<()>;

    /// Fails, naming the command and the key, when the server's ACL refuses this user a
    /// command the bus sends later on `stream` (claims) or `dead_letters` (moves); checked
    /// by commands without effect.
    async fn check_permissions(
        &self,
        stream: &str,
        dead_letters: &str,
        group: &str,
        consumer: &str,
    ) -> Result<()>;
}

/// Who has a lease, after [`Leases::hold_lease`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LeaseState {
    /// The caller has it, for the TTL it asked for.
    Held,
    /// Another holder has it, for `remaining` more unless renewed.
    Taken { holder: String, remaining: Duration },
}

/// How many pending entries, lowest ids first, the longest idle time is looked for
/// among: Redis lists a pending list by id only, so the longest idle of all would take
/// reading all of it. An entry idles longest when its handler runs long or its consumer
/// died; both keep it among the lowest ids while the pending list is short, as
/// `max_in_flight` keeps it.
pub(crate) const PENDING_IDLE_PAGE: usize = 100;

/// What a group has left to do on one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GroupStats {
    /// Entries in the stream.
    pub(crate) length: u64,
    /// Entries not yet delivered to the group; `None` when the server cannot tell.
    pub(crate) lag: Option<u64>,
    pub(crate) pending: u64,
    /// The longest idle time among the [`PENDING_IDLE_PAGE`] pending entries with the
    /// lowest ids.
    pub(crate) oldest_pending_idle: Option<Duration>,
    pub(crate) dead_letters: u64,
    /// Dead letters deleted by the `dead_letter_max_len` cap, ever.
    pub(crate) dead_letters_trimmed: u64,
}

/// One page of a claim scan.
#[derive(Debug)]
pub(crate) struct ClaimPage {
    pub(crate) deliveries: Vec<Delivery>,
    /// Where the next page starts; `EntryId::MIN` when the scan went through the whole list.
    pub(crate) next_cursor: EntryId,
    /// Pending entries the scan found deleted from the stream; Redis dropped them from the
    /// pending list.
    pub(crate) deleted: Vec<EntryId>,
    /// The claimed entries that were pending with the claiming consumer already: left by
    /// an earlier run under its name, not taken from another consumer.
    pub(crate) own: Vec<EntryId>,
}

/// What became of an attempt to dead-letter an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadLetterMove {
    /// Moved; the cap deleted `trimmed` older dead letters to make room.
    Moved { trimmed: u64 },
    /// The entry is no longer pending with this consumer: another consumer claimed it, or
    /// it was acknowledged already. Nothing was written.
    NotPending,
    /// The entry was deleted from the stream; it was acknowledged, nothing was written.
    Deleted,
}

/// What [`GroupReading::claim_own`] does with an entry pending with no consumer at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unowned {
    /// Puts it back under the caller (`XCLAIM ... FORCE`): for an entry the caller held
    /// unfinished when its group was lost and created again, whose retry is due.
    PutBack,
    /// Leaves it: for an entry the caller found pending with itself a moment ago, which
    /// pending with no one now was acknowledged meanwhile.
    Leave,
}
