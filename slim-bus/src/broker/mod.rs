//! The narrow interface between the consumer logic and the server that stores the streams.
//!
//! Everything the runtime does with Redis goes through [`Broker`], so another backend
//! (in memory, cluster) plugs in without touching the consumer.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::codec::EncodedField;
use crate::config::StartFrom;
use crate::error::Result;
use crate::event::EntryId;

pub(crate) mod redis;

/// The fields of one entry as stored: names and values as raw bytes.
pub(crate) type RawFields = Vec<(Vec<u8>, Vec<u8>)>;

/// One entry delivered to this consumer.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) id: EntryId,
    /// `None` when the entry is still pending but was deleted or trimmed from the stream.
    pub(crate) fields: Option<RawFields>,
    /// How often the group has delivered the entry, this delivery included.
    pub(crate) delivery_count: u64,
}

/// The deliveries of one read, by stream.
#[derive(Debug)]
pub(crate) struct StreamDeliveries {
    /// The position of the stream in the list the read was given.
    pub(crate) stream_index: usize,
    pub(crate) deliveries: Vec<Delivery>,
}

/// What the runtime needs of a stream server.
#[async_trait]
pub(crate) trait Broker: Send + Sync + 'static {
    /// Appends an entry, returning its id.
    async fn publish(&self, stream: &str, fields: &[EncodedField]) -> Result<EntryId>;

    /// Creates `group` on `stream` (and the stream) unless it exists.
    async fn ensure_group(&self, stream: &str, group: &str, start: StartFrom) -> Result<()>;

    /// Delivers up to `count` new entries per stream to `consumer`, waiting up to `block`
    /// for the first one. An empty result is an idle wait, not an error.
    async fn read_new(
        &self,
        group: &str,
        consumer: &str,
        streams: &[Arc<str>],
        count: usize,
        block: Duration,
    ) -> Result<Vec<StreamDeliveries>>;

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
}
