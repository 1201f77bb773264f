//! One bus's connection to an in-memory broker: the shared data, and a blocking read and
//! its wake of its own. Publishing, group reading and leases.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Store;
use super::groups::Touch;
use super::state::whole_millis;
use crate::broker::Unowned;
use crate::broker::{
    Broker, ClaimPage, Delivery, EntryFields, GroupReading, LeaseState, Leases, Publishing,
    StreamDeliveries,
};
use crate::codec::EncodedField;
use crate::config::StartFrom;
use crate::error::{Error, Result};
use crate::event::EntryId;

/// One bus's use of a [`MemoryBroker`](super::MemoryBroker): the data is shared, the
/// blocking read is its own.
pub(crate) struct MemoryConnection {
    pub(super) store: Arc<Store>,
    pub(super) reader: Mutex<ReaderState>,
    /// Ends this connection's blocking read early.
    pub(super) wake: Notify,
}

/// Whether a read blocks, and whether a wake came while none did.
#[derive(Default)]
pub(super) struct ReaderState {
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
impl Publishing for MemoryConnection {
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
}

#[async_trait]
impl GroupReading for MemoryConnection {
    async fn ensure_group(&self, stream: &str, group: &str, start: StartFrom) -> Result<()> {
        self.store
            .command(|state| state.ensure_group(stream, group, start));
        Ok(())
    }

    async fn recreate_group(
        &self,
        stream: &str,
        group: &str,
        after: Option<EntryId>,
        start: StartFrom,
    ) -> Result<bool> {
        Ok(self
            .store
            .command(|state| state.recreate_group(stream, group, after, start)))
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
                    .read_new_per_slot(group, consumer, streams, count, Instant::now())
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
        let action = || format!("reading pending entries of stream `{stream}`");
        self.store
            .command(|state| {
                let read =
                    state.read_own_pending(stream, group, consumer, after, count, Instant::now());
                if read.as_ref().is_ok_and(|read| !read.is_empty())
                    && state.loses_reply("XREADGROUP")
                {
                    return Err(lost_reply());
                }
                read
            })
            .map_err(|e| Error::redis(action(), e))
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
                let page = state.claim_stale(
                    stream,
                    group,
                    consumer,
                    min_idle,
                    cursor,
                    count,
                    Instant::now(),
                );
                if page.as_ref().is_ok_and(|page| !page.deliveries.is_empty())
                    && state.loses_reply("XAUTOCLAIM")
                {
                    return Err(lost_reply());
                }
                page
            })
            .map_err(|e| Error::redis(format!("claiming stale entries of stream `{stream}`"), e))
    }

    async fn claim_own(
        &self,
        group: &str,
        consumer: &str,
        requests: &[(Arc<str>, EntryId)],
        unowned: Unowned,
    ) -> Result<Vec<Option<EntryFields>>> {
        self.store
            .command(|state| {
                let claimed = state.claim_own(group, consumer, requests, unowned, Instant::now());
                if claimed
                    .as_ref()
                    .is_ok_and(|claimed| claimed.iter().any(Option::is_some))
                    && state.loses_reply("XCLAIM")
                {
                    return Err(lost_reply());
                }
                claimed
            })
            .map_err(|e| {
                Error::redis(
                    format!("claiming entries for their retry in group `{group}`"),
                    e,
                )
            })
    }

    async fn touch_own(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ids: &[EntryId],
        idle: Duration,
        unowned: Unowned,
    ) -> Result<Vec<EntryId>> {
        self.store
            .command(|state| {
                let touch = Touch { idle, unowned };
                state.touch_own(stream, group, consumer, ids, touch, Instant::now())
            })
            .map_err(|e| {
                Error::redis(
                    format!("keeping the held entries of stream `{stream}` fresh"),
                    e,
                )
            })
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

    async fn record_retry_due(&self, key: &str, id: EntryId, due_unix_ms: u64) -> Result<()> {
        self.store.command(|state| {
            state
                .retry_dues
                .entry(key.to_owned())
                .or_default()
                .insert(id, due_unix_ms)
        });
        Ok(())
    }

    async fn forget_retry_dues(&self, key: &str, ids: &[EntryId]) -> Result<()> {
        self.store.command(|state| {
            if let Some(dues) = state.retry_dues.get_mut(key) {
                for id in ids {
                    dues.remove(id);
                }
                if dues.is_empty() {
                    state.retry_dues.remove(key);
                }
            }
        });
        Ok(())
    }

    async fn retry_dues(&self, key: &str, ids: &[EntryId]) -> Result<Vec<Option<u64>>> {
        Ok(self.store.command(|state| {
            let dues = state.retry_dues.get(key);
            ids.iter()
                .map(|id| dues.and_then(|dues| dues.get(id).copied()))
                .collect()
        }))
    }

    async fn trim_acked(&self, stream: &str, max_entries: usize) -> Result<u64> {
        Ok(self
            .store
            .command(|state| state.trim_acked(stream, max_entries)))
    }
}

/// What a command whose reply was lost fails with: a timeout, as on Redis.
fn lost_reply() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the reply was lost (MemoryBroker::lose_next_reply)",
    ))
}

#[async_trait]
impl Leases for MemoryConnection {
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
}

#[async_trait]
impl Broker for MemoryConnection {
    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn check_version(&self) -> Result<()> {
        Ok(())
    }

    // The in-memory broker has no users.
    async fn check_permissions(&self, _: &str, _: &str, _: &str, _: &str) -> Result<()> {
        Ok(())
    }
}
