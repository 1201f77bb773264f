//! Consumer groups: blocking reads of new entries (woken early on demand), the consumer's
//! own pending entries, acks, claims, and keeping the group and its stream tidy.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;
use tokio::time::Instant;

use super::replies::{parse_autoclaim, parse_entry, parse_pending_counts, parse_read_reply_value};
use super::{CONNECT_TIMEOUT, RedisBroker, classify, millis};
use crate::broker::resp::{RespConnection, RespError, is_failover_line};
use crate::broker::{
    BUSY_GROUP, ClaimPage, Delivery, EntryFields, GroupReading, StreamDeliveries, WRONG_TYPE,
};
use crate::config::StartFrom;
use crate::error::{Error, Result, server_code};
use crate::event::EntryId;

/// How often a wake retries before the reader's block reaches the server (1 ms apart).
const WAKE_ATTEMPTS: usize = 100;

#[derive(Default)]
pub(super) struct ReaderState {
    /// The client id of the blocking connection while a read blocks on it.
    blocked: Option<i64>,
    /// A wake arrived while no read blocked: the next read must not block.
    woken: bool,
}

fn lock(state: &Mutex<ReaderState>) -> std::sync::MutexGuard<'_, ReaderState> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Marks the reader as blocked for as long as it lives.
struct BlockedReader<'a>(&'a Mutex<ReaderState>);

impl<'a> BlockedReader<'a> {
    /// Marks the reader blocked, unless a wake is waiting to be seen: then `None`, and the
    /// read must not block.
    fn set(state: &'a Mutex<ReaderState>, client_id: i64) -> Option<Self> {
        let mut guard = lock(state);
        if std::mem::take(&mut guard.woken) {
            return None;
        }
        guard.blocked = Some(client_id);
        Some(BlockedReader(state))
    }
}

impl Drop for BlockedReader<'_> {
    fn drop(&mut self) {
        lock(self.0).blocked = None;
    }
}

#[async_trait]
impl GroupReading for RedisBroker {
    async fn ensure_group(&self, stream: &str, group: &str, start: StartFrom) -> Result<()> {
        let start_id = match start {
            StartFrom::Beginning => "0",
            StartFrom::NewOnly => "$",
        };
        let result: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg(start_id)
            .arg("MKSTREAM")
            .query_async(&mut self.commands())
            .await;
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(BUSY_GROUP) => Ok(()),
            Err(e) if e.code() == Some(WRONG_TYPE) => Err(self.wrong_type(stream).await),
            Err(e) => Err(Error::redis(
                format!("creating consumer group `{group}` on stream `{stream}`"),
                e,
            )),
        }
    }

    async fn read_new(
        &self,
        group: &str,
        consumer: &str,
        streams: &[Arc<str>],
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StreamDeliveries>> {
        let action = || format!("reading new entries for group `{group}`");
        // The connection is taken out of its slot for the read and put back only after a
        // whole reply: if this future is dropped mid-read (at shutdown), the socket closes,
        // and with it the server's side of a blocked read, which would otherwise go on
        // taking entries for nobody.
        let mut slot = self.read_connection.lock().await;
        let mut connection = match slot.take() {
            Some(connection) if !connection.is_dirty() => connection,
            _ => RespConnection::connect_with_id(
                self.topology.endpoint(),
                Instant::now() + CONNECT_TIMEOUT,
            )
            .await
            .map_err(|e| {
                let addr = self.topology.endpoint().info.addr().to_string();
                Error::redis(format!("connecting to {addr}"), e.into_redis())
            })?,
        };
        let blocked = block.and_then(|block| {
            BlockedReader::set(&self.reader, connection.client_id()).map(|guard| (guard, block))
        });
        let count = count.to_string();
        let block_millis = blocked
            .as_ref()
            .map(|(_, block)| millis(*block).max(1).to_string());
        let mut args: Vec<&[u8]> = Vec::with_capacity(8 + 2 * streams.len());
        args.extend([
            b"XREADGROUP".as_slice(),
            b"GROUP",
            group.as_bytes(),
            consumer.as_bytes(),
        ]);
        args.extend([b"COUNT".as_slice(), count.as_bytes()]);
        if let Some(block_millis) = &block_millis {
            args.extend([b"BLOCK".as_slice(), block_millis.as_bytes()]);
        }
        args.push(b"STREAMS");
        args.extend(streams.iter().map(|s| s.as_bytes()));
        args.extend(streams.iter().map(|_| b">".as_slice()));
        let wait = blocked.as_ref().map_or(Duration::ZERO, |(_, block)| *block);
        let deadline = Instant::now() + wait + self.command_timeout;
        let result = connection.read_group(&args, streams, deadline).await;
        drop(blocked);
        match result {
            Ok(batches) => {
                *slot = Some(connection);
                Ok(batches)
            }
            Err(error) => {
                // An error reply leaves the connection usable, unless it says the server
                // behind it cannot serve reads now: a new connection may reach one that can.
                if matches!(&error, RespError::Server(line) if !is_failover_line(line)) {
                    *slot = Some(connection);
                }
                drop(slot);
                let error = error.into_redis();
                if server_code(&error).as_deref() == Some(WRONG_TYPE) {
                    // The reply does not say which of the streams it is about.
                    return Err(self.find_wrong_type(streams, error, action).await);
                }
                Err(Error::redis(action(), error))
            }
        }
    }

    async fn wake_reader(&self) -> Result<()> {
        // The blocking read travels on another connection than this command, so it may
        // not have reached the server yet when CLIENT UNBLOCK does: then try again until
        // it blocks there, or has returned.
        for _ in 0..WAKE_ATTEMPTS {
            let client_id = {
                let mut state = lock(&self.reader);
                match state.blocked {
                    Some(client_id) => client_id,
                    None => {
                        state.woken = true;
                        return Ok(());
                    }
                }
            };
            let unblocked: i64 = redis::cmd("CLIENT")
                .arg("UNBLOCK")
                .arg(client_id)
                .query_async(&mut self.commands())
                .await
                .map_err(|e| Error::redis("waking the blocked reader", e))?;
            if unblocked == 1 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
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
        // XPENDING first, then the XREADGROUP that delivers the same entries again, in one
        // round trip: re-reading history increments each entry's delivery count, so the
        // count XPENDING reports plus one is the count of this delivery.
        let mut pipe = redis::pipe();
        pipe.cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg(format!("({after}"))
            .arg("+")
            .arg(count)
            .arg(consumer);
        pipe.cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(stream)
            .arg(after);
        let action = || format!("reading pending entries of stream `{stream}`");
        let (pending, read): (Value, Value) = match pipe.query_async(&mut self.commands()).await {
            Ok(replies) => replies,
            Err(e) => return Err(self.name_type(classify(stream, e, action)).await),
        };
        let counts = parse_pending_counts(pending).map_err(|detail| Error::UnexpectedReply {
            action: action(),
            detail,
        })?;
        let streams = [Arc::<str>::from(stream)];
        let mut batches =
            parse_read_reply_value(read, &streams).map_err(|detail| Error::UnexpectedReply {
                action: action(),
                detail,
            })?;
        let mut deliveries = batches.pop().map(|b| b.deliveries).unwrap_or_default();
        for delivery in &mut deliveries {
            delivery.delivery_count = counts.get(&delivery.id).map_or(1, |count| count + 1);
        }
        Ok(deliveries)
    }

    async fn ack(&self, group: &str, acks: &[(Arc<str>, Vec<EntryId>)]) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (stream, ids) in acks.iter().filter(|(_, ids)| !ids.is_empty()) {
            pipe.cmd("XACK").arg(stream.as_ref()).arg(group).arg(ids);
        }
        let action = || format!("acknowledging entries for group `{group}`");
        let replies: Vec<redis::RedisResult<Value>> = pipe
            .query_async(&mut self.commands())
            .await
            .map_err(|e| Error::redis(action(), e))?;
        // A key that holds another type by now has no group and no pending entries left
        // to acknowledge; failing the whole batch for it would retry it for ever.
        match replies
            .into_iter()
            .filter_map(Result::err)
            .find(|e| server_code(e).as_deref() != Some(WRONG_TYPE))
        {
            Some(error) => Err(Error::redis(action(), error)),
            None => Ok(()),
        }
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
        let action = || format!("claiming stale entries of stream `{stream}`");
        let reply: redis::RedisResult<Value> = redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(group)
            .arg(consumer)
            .arg(millis(min_idle))
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.commands())
            .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => return Err(self.name_type(classify(stream, e, action)).await),
        };
        let mut page = parse_autoclaim(reply).map_err(|detail| Error::UnexpectedReply {
            action: action(),
            detail,
        })?;
        if page.deliveries.is_empty() {
            return Ok(page);
        }
        // XAUTOCLAIM does not say how often an entry was delivered; the pending list does.
        let mut pipe = redis::pipe();
        for delivery in &page.deliveries {
            pipe.cmd("XPENDING")
                .arg(stream)
                .arg(group)
                .arg(delivery.id)
                .arg(delivery.id)
                .arg(1)
                .arg(consumer);
        }
        let rows: Vec<Value> = pipe
            .query_async(&mut self.commands())
            .await
            .map_err(|e| classify(stream, e, action))?;
        for (delivery, row) in page.deliveries.iter_mut().zip(rows) {
            let counts = parse_pending_counts(row).map_err(|detail| Error::UnexpectedReply {
                action: action(),
                detail,
            })?;
            delivery.delivery_count = counts.get(&delivery.id).copied().unwrap_or(1);
        }
        Ok(page)
    }

    async fn claim_for_retry(
        &self,
        group: &str,
        consumer: &str,
        requests: &[(Arc<str>, EntryId, Duration)],
    ) -> Result<Vec<Option<EntryFields>>> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (stream, id, min_idle) in requests {
            pipe.cmd("XCLAIM")
                .arg(stream.as_ref())
                .arg(group)
                .arg(consumer)
                .arg(millis(*min_idle))
                .arg(*id);
        }
        let action = || format!("claiming entries for their retry in group `{group}`");
        let replies: Vec<redis::RedisResult<Value>> = pipe
            .query_async(&mut self.commands())
            .await
            .map_err(|e| Error::redis(action(), e))?;
        let replies = replies
            .into_iter()
            .map(|reply| match reply {
                // The entry went with its stream when the key was given another type.
                Err(e) if server_code(&e).as_deref() == Some(WRONG_TYPE) => Ok(Value::Nil),
                other => other,
            })
            .collect::<redis::RedisResult<Vec<Value>>>()
            .map_err(|e| Error::redis(action(), e))?;
        replies
            .into_iter()
            .map(|reply| match reply {
                Value::Nil => Ok(None),
                Value::Array(entries) => match entries.into_iter().next() {
                    None => Ok(None),
                    Some(entry) => parse_entry(entry).map(|delivery| delivery.fields),
                },
                other => Err(format!("XCLAIM did not answer an array: {other:?}")),
            })
            .collect::<Result<_, String>>()
            .map_err(|detail| Error::UnexpectedReply {
                action: action(),
                detail,
            })
    }

    async fn remove_idle_consumers(
        &self,
        stream: &str,
        group: &str,
        min_idle: Duration,
        except: &str,
    ) -> Result<Vec<String>> {
        let mut invocation = self.scripts.remove_idle_consumers.key(stream);
        invocation.arg(group).arg(millis(min_idle)).arg(except);
        invocation
            .invoke_async(&mut self.commands())
            .await
            .map_err(|e| {
                Error::redis(
                    format!("removing idle consumers of group `{group}` on stream `{stream}`"),
                    e,
                )
            })
    }

    async fn trim_acked(&self, stream: &str) -> Result<u64> {
        let action = || format!("trimming what every group acknowledged from stream `{stream}`");
        match self
            .scripts
            .trim_acked
            .key(stream)
            .invoke_async(&mut self.commands())
            .await
        {
            Ok(trimmed) => Ok(trimmed),
            Err(e) => Err(self.name_type(classify(stream, e, action)).await),
        }
    }
}
