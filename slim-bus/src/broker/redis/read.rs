//! Consumer groups: blocking reads of new entries (woken early on demand), the consumer's
//! own pending entries, acks, claims, and keeping the group and its stream tidy.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;
use tokio::time::Instant;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use super::connections::NodeConnection;
use super::replies::{parse_autoclaim, parse_entry, parse_pending_counts, parse_read_reply_value};
use super::{CONNECT_TIMEOUT, RedisBroker, classify, millis};
use crate::broker::resp::{RespConnection, RespError};
use crate::broker::topology::{ConnectionKey, NodeAddr, by_slot};
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
    /// The connections a read blocks on (one per hash slot read on a cluster), by node
    /// and client id.
    blocked: Vec<(Option<NodeAddr>, i64)>,
    /// A wake arrived while no read blocked: the next read must not block.
    woken: bool,
}

fn lock(state: &Mutex<ReaderState>) -> std::sync::MutexGuard<'_, ReaderState> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Marks the reads of one `read_new` as blocked for as long as it lives.
struct BlockedReads<'a>(&'a Mutex<ReaderState>);

impl<'a> BlockedReads<'a> {
    /// Marks the reads on `connections` blocked, unless a wake is waiting to be seen:
    /// then `None`, and the reads must not block.
    fn set(
        state: &'a Mutex<ReaderState>,
        connections: impl IntoIterator<Item = (Option<NodeAddr>, i64)>,
    ) -> Option<Self> {
        let mut guard = lock(state);
        if std::mem::take(&mut guard.woken) {
            return None;
        }
        guard.blocked.extend(connections);
        Some(BlockedReads(state))
    }

    /// The read on `client_id` returned: a wake need not unblock it.
    fn returned(&self, client_id: i64) {
        lock(self.0).blocked.retain(|(_, id)| *id != client_id);
    }
}

impl Drop for BlockedReads<'_> {
    fn drop(&mut self) {
        lock(self.0).blocked.clear();
    }
}

/// One `XREADGROUP` of a `read_new`: the streams of one hash slot (all of them on a
/// single server), by their positions in the read's list.
struct SlotRead {
    key: ConnectionKey,
    members: Vec<usize>,
    streams: Vec<Arc<str>>,
    connection: NodeConnection,
}

/// What one [`SlotRead`] gave: its connection back and the outcome.
struct SlotOutcome {
    read: SlotRead,
    result: std::result::Result<Vec<StreamDeliveries>, RespError>,
}

impl RedisBroker {
    /// Sends one `XREADGROUP` on `read`'s connection, following a `MOVED` or `ASK` reply
    /// to the node it names (that second attempt does not block: the reader reads again
    /// at once).
    async fn read_slot(
        &self,
        mut read: SlotRead,
        group: &str,
        consumer: &str,
        count: &str,
        block_millis: Option<&str>,
        deadline: Instant,
    ) -> SlotOutcome {
        let streams = &read.streams;
        let args = |blocking: bool| {
            let mut args: Vec<&[u8]> = Vec::with_capacity(10 + 2 * streams.len());
            args.extend([
                b"XREADGROUP".as_slice(),
                b"GROUP",
                group.as_bytes(),
                consumer.as_bytes(),
                b"COUNT",
                count.as_bytes(),
            ]);
            if let Some(millis) = block_millis.filter(|_| blocking) {
                args.extend([b"BLOCK".as_slice(), millis.as_bytes()]);
            }
            args.push(b"STREAMS");
            args.extend(streams.iter().map(|s| s.as_bytes()));
            args.extend(streams.iter().map(|_| b">".as_slice()));
            args
        };
        let result = read
            .connection
            .connection
            .read_group(&args(true), streams, deadline)
            .await;
        let redirect = match &result {
            Err(RespError::Server(line)) => self.topology.redirect(line),
            _ => None,
        };
        let Some(redirect) = redirect else {
            return SlotOutcome { read, result };
        };
        let cluster = self
            .topology
            .cluster()
            .expect("a redirect comes from a cluster");
        let endpoint = cluster.endpoint(&redirect.node);
        let again = args(false);
        let result = async {
            let mut connection =
                RespConnection::connect_with_id(&endpoint, Instant::now() + CONNECT_TIMEOUT)
                    .await?;
            if redirect.ask {
                connection.asking(deadline).await?;
            }
            let batches = connection.read_group(&again, streams, deadline).await;
            Ok((connection, batches))
        }
        .await;
        match result {
            Ok((connection, batches)) => {
                if !redirect.ask {
                    read.connection = NodeConnection {
                        node: Some(redirect.node),
                        connection,
                    };
                }
                SlotOutcome {
                    read,
                    result: batches,
                }
            }
            Err(error) => SlotOutcome {
                read,
                result: Err(error),
            },
        }
    }

    /// Unblocks the reads marked blocked, each on its node; marks a wake for the next read
    /// when none blocks and `remember` says so. A read's command may not have reached the
    /// server yet when `CLIENT UNBLOCK` does: then it tries again until it blocks there,
    /// or has returned.
    async fn unblock_reads(&self, remember: bool) -> Result<()> {
        for _ in 0..WAKE_ATTEMPTS {
            let blocked = {
                let mut state = lock(&self.reader);
                if state.blocked.is_empty() {
                    state.woken |= remember;
                    return Ok(());
                }
                state.blocked.clone()
            };
            let mut waiting = false;
            for (node, client_id) in blocked {
                let unblocked = self
                    .commands()
                    .on_node(
                        node.as_ref(),
                        redis::cmd("CLIENT").arg("UNBLOCK").arg(client_id),
                    )
                    .await
                    .map_err(|e| Error::redis("waking the blocked reader", e))?;
                match unblocked {
                    Value::Int(1) => lock(&self.reader)
                        .blocked
                        .retain(|(_, id)| *id != client_id),
                    _ => waiting = true,
                }
            }
            if !waiting {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// The error for a failed read of `streams`.
    async fn read_error(&self, group: &str, streams: &[Arc<str>], error: RespError) -> Error {
        let action = || format!("reading new entries for group `{group}`");
        let error = error.into_redis();
        if server_code(&error).as_deref() == Some(WRONG_TYPE) {
            // The reply does not say which of the streams it is about.
            return self.find_wrong_type(streams, error, action).await;
        }
        Error::redis(action(), error)
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
        if let Some(error) = self
            .deferred_read_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            return Err(error);
        }
        // On a cluster a read of several streams is CROSSSLOT unless they share a slot:
        // one read per slot, all at once, each on a connection of its own to the slot's
        // master. Every connection is there before any read blocks, so that a wake finds
        // them all.
        let mut reads = Vec::new();
        for (key, members) in by_slot(&self.topology, streams) {
            let connection = self.read_connections.take(self, key, true).await?;
            let streams = members.iter().map(|&i| streams[i].clone()).collect();
            reads.push(SlotRead {
                key,
                members,
                streams,
                connection,
            });
        }
        let blocked = block.and_then(|block| {
            BlockedReads::set(
                &self.reader,
                reads.iter().map(|read| {
                    (
                        read.connection.node.clone(),
                        read.connection.connection.client_id(),
                    )
                }),
            )
            .map(|guard| (guard, block))
        });
        let count = count.to_string();
        let block_millis = blocked
            .as_ref()
            .map(|(_, block)| millis(*block).max(1).to_string());
        let wait = blocked.as_ref().map_or(Duration::ZERO, |(_, block)| *block);
        let deadline = Instant::now() + wait + self.command_timeout;
        let mut pending: FuturesUnordered<_> = reads
            .into_iter()
            .map(|read| {
                self.read_slot(
                    read,
                    group,
                    consumer,
                    &count,
                    block_millis.as_deref(),
                    deadline,
                )
            })
            .collect();
        let mut outcomes = Vec::with_capacity(pending.len());
        let mut woke_others = false;
        while let Some(outcome) = pending.next().await {
            if let Some((guard, _)) = &blocked {
                guard.returned(outcome.read.connection.connection.client_id());
            }
            let delivered = matches!(&outcome.result, Ok(batches) if !batches.is_empty())
                || outcome.result.is_err();
            outcomes.push(outcome);
            // The first read that returns something ends the others' blocks, as one
            // XREADGROUP of every stream would have returned then.
            if delivered && !woke_others && !pending.is_empty() && blocked.is_some() {
                woke_others = true;
                if let Err(error) = self.unblock_reads(false).await {
                    tracing::debug!(
                        error = &error as &dyn std::error::Error,
                        "could not end the other reads' blocks"
                    );
                }
            }
        }
        drop(blocked);
        let mut deliveries = Vec::new();
        let mut first_error = None;
        outcomes.sort_by_key(|outcome| outcome.read.members[0]);
        for SlotOutcome { read, result } in outcomes {
            self.read_connections
                .put_back(self, read.key, read.connection, &result)
                .await;
            match result {
                Ok(batches) => deliveries.extend(batches.into_iter().map(|mut batch| {
                    batch.stream_index = read.members[batch.stream_index];
                    batch
                })),
                Err(error) if first_error.is_none() => {
                    first_error = Some(self.read_error(group, &read.streams, error).await);
                }
                Err(_) => {}
            }
        }
        match first_error {
            None => Ok(deliveries),
            // What the other slots delivered is pending with this consumer now: it is
            // handled, and the error comes with the next read.
            Some(error) if !deliveries.is_empty() => {
                *self
                    .deferred_read_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
                Ok(deliveries)
            }
            Some(error) => Err(error),
        }
    }

    async fn wake_reader(&self) -> Result<()> {
        self.unblock_reads(true).await
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
        // A cluster refuses an empty pipeline.
        let acks: Vec<&(Arc<str>, Vec<EntryId>)> =
            acks.iter().filter(|(_, ids)| !ids.is_empty()).collect();
        let keys: Vec<&str> = acks.iter().map(|(stream, _)| &**stream).collect();
        let slots = by_slot(&self.topology, &keys);
        let parts = slots.into_iter().map(|(_, members)| {
            let part: Vec<_> = members.iter().map(|&i| acks[i]).collect();
            async move { self.ack_in_one_slot(group, &part).await }
        });
        futures_util::future::join_all(parts)
            .await
            .into_iter()
            .collect()
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
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<&str> = requests.iter().map(|(stream, ..)| &**stream).collect();
        let slots = by_slot(&self.topology, &keys);
        if slots.len() <= 1 {
            return self.claim_in_one_slot(group, consumer, requests).await;
        }
        let parts = slots.into_iter().map(|(_, members)| {
            let part: Vec<_> = members.iter().map(|&i| requests[i].clone()).collect();
            async move {
                let claimed = self.claim_in_one_slot(group, consumer, &part).await?;
                Ok::<_, Error>(members.into_iter().zip(claimed))
            }
        });
        let mut claimed: Vec<Option<EntryFields>> = vec![None; requests.len()];
        for part in futures_util::future::join_all(parts).await {
            for (index, fields) in part? {
                claimed[index] = fields;
            }
        }
        Ok(claimed)
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

impl RedisBroker {
    /// Acknowledges entries of streams that share a hash slot, in one pipeline.
    async fn ack_in_one_slot(&self, group: &str, acks: &[&(Arc<str>, Vec<EntryId>)]) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (stream, ids) in acks {
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

    /// [`GroupReading::claim_for_retry`] of entries of streams that share a hash slot, in
    /// one pipeline.
    async fn claim_in_one_slot(
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
}
