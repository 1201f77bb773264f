//! What the in-memory backend tells about a stream: groups, consumers, pending lists, and
//! entries read without a group.

use std::ops::Bound;
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;

use super::MemoryConnection;
use super::state::{State, whole_millis};
use crate::broker::{GroupStats, Inspection, RawFields};
use crate::error::{Error, Result};
use crate::event::EntryId;
use crate::inspect::{ConsumerStatus, GroupStatus, PendingEntry, StreamStatus};

impl State {
    /// `XLEN`, `XINFO GROUPS`, `XINFO CONSUMERS` and `XPENDING` as the Redis backend
    /// reads them for [`Inspection::stream_status`].
    pub(super) fn stream_status(
        &self,
        name: &str,
        dead_letters: &str,
        now: Instant,
    ) -> Option<StreamStatus> {
        let stream = self.streams.get(name)?;
        let groups = stream
            .groups
            .iter()
            .map(|(group_name, group)| GroupStatus {
                name: group_name.clone(),
                lag: Some(group.undelivered(&stream.entries).count() as u64),
                pending: group.pending.len() as u64,
                oldest_pending_idle: group.oldest_pending_idle(now),
                last_delivered_id: group.last_delivered,
                consumers: group
                    .consumers
                    .iter()
                    .map(|(consumer, seen)| ConsumerStatus {
                        name: consumer.to_string(),
                        pending: group
                            .pending
                            .values()
                            .filter(|nack| nack.consumer == *consumer)
                            .count() as u64,
                        idle: whole_millis(now.saturating_duration_since(*seen)),
                    })
                    .collect(),
            })
            .collect();
        Some(StreamStatus {
            stream: name.to_owned(),
            length: stream.entries.len() as u64,
            last_entry_id: stream.entries.last_key_value().map(|(id, _)| *id),
            dead_letter_stream: dead_letters.to_owned(),
            dead_letters: self
                .streams
                .get(dead_letters)
                .map_or(0, |s| s.entries.len() as u64),
            groups,
        })
    }

    /// `XPENDING stream group - + count [consumer]`.
    pub(super) fn pending_entries(
        &self,
        stream: &str,
        group: &str,
        consumer: Option<&str>,
        count: usize,
        now: Instant,
    ) -> Result<Vec<PendingEntry>> {
        let Some(found) = self.streams.get(stream).and_then(|s| s.groups.get(group)) else {
            return Err(Error::GroupNotFound {
                stream: stream.to_owned(),
                group: group.to_owned(),
            });
        };
        Ok(found
            .pending
            .iter()
            .filter(|(_, nack)| consumer.is_none_or(|consumer| &*nack.consumer == consumer))
            .take(count)
            .map(|(id, nack)| PendingEntry {
                id: *id,
                consumer: nack.consumer.to_string(),
                delivery_count: nack.delivery_count,
                idle: whole_millis(now.saturating_duration_since(nack.delivered_at)),
            })
            .collect())
    }

    /// `XRANGE stream (after + COUNT count`.
    fn entries_after(
        &self,
        stream: &str,
        after: EntryId,
        count: usize,
    ) -> Vec<(EntryId, RawFields)> {
        self.streams
            .get(stream)
            .map(|s| {
                s.entries
                    .range((Bound::Excluded(after), Bound::Unbounded))
                    .take(count)
                    .map(|(id, fields)| (*id, fields.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl MemoryConnection {
    /// `XREAD COUNT count [BLOCK block] STREAMS stream after`.
    pub(super) async fn read_entries_after(
        &self,
        stream: &str,
        after: EntryId,
        count: usize,
        block: Option<Duration>,
    ) -> Vec<(EntryId, RawFields)> {
        let deadline =
            block.map(|block| Instant::now() + whole_millis(block).max(Duration::from_millis(1)));
        loop {
            let appended = {
                let state = self.store.lock();
                let entries = state.entries_after(stream, after, count);
                if !entries.is_empty() {
                    return entries;
                }
                // Registered under the lock: an entry added after it wakes this read.
                self.store.appended.notified()
            };
            let Some(deadline) = deadline.filter(|deadline| Instant::now() < *deadline) else {
                return Vec::new();
            };
            tokio::select! {
                () = appended => {}
                () = tokio::time::sleep_until(deadline) => return Vec::new(),
            }
        }
    }
}

impl State {
    /// `XINFO GROUPS` and `XPENDING` as the Redis backend reads them: nothing when the
    /// stream or the group does not exist.
    pub(super) fn group_stats(
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
            lag: Some(group.undelivered(&stream.entries).count() as u64),
            pending: group.pending.len() as u64,
            oldest_pending_idle: group.oldest_pending_idle(now),
            dead_letters: self
                .streams
                .get(dead_letters)
                .map_or(0, |s| s.entries.len() as u64),
            dead_letters_trimmed: self.trimmed.get(dead_letters).copied().unwrap_or(0),
        }
    }
}

#[async_trait]
impl Inspection for MemoryConnection {
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
}
