//! Reads of new entries: one blocking `XREADGROUP` of every stream on a single server; on
//! a cluster one per hash slot, all at once, each on a connection of its own to the
//! slot's master, as one read (the first to return ends the others' blocks). Woken early
//! on demand with `CLIENT UNBLOCK` on the node each read blocks on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis::Value;
use tokio::time::Instant;

use super::connections::NodeConnection;
use super::{CONNECT_TIMEOUT, RedisBroker, millis};
use crate::broker::resp::{RespConnection, RespError};
use crate::broker::topology::{ConnectionKey, NodeAddr, by_slot};
use crate::broker::{StreamDeliveries, WRONG_TYPE};
use crate::error::{Error, Result, server_code};

/// How often a wake retries before the reader's block reaches the server (1 ms apart).
const WAKE_ATTEMPTS: usize = 100;
/// The longest a read redirected by `ASK` (its slot migrating) blocks on the importing
/// node. Such a read is not woken early, so this bounds how late it sees a wake.
const ASK_BLOCK: Duration = Duration::from_millis(100);

/// A read's connection as a wake finds it: the node (`None` on a single server) and the
/// connection's client id there. Ids are counted per node, so both name one connection.
type BlockedOn = (Option<NodeAddr>, i64);

#[derive(Default)]
pub(super) struct ReaderState {
    /// The connections the reads of a `read_new` block on.
    blocked: Vec<BlockedOn>,
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
        connections: impl IntoIterator<Item = BlockedOn>,
    ) -> Option<Self> {
        let mut guard = lock(state);
        if std::mem::take(&mut guard.woken) {
            return None;
        }
        guard.blocked.extend(connections);
        Some(BlockedReads(state))
    }

    /// The read on `connection` returned: a wake need not unblock it.
    fn returned(&self, connection: &BlockedOn) {
        lock(self.0).blocked.retain(|blocked| blocked != connection);
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
    /// The connection as it was marked blocked (a `MOVED` replaces `connection`).
    blocked_on: BlockedOn,
}

/// `XREADGROUP` of `streams` with `args`, blocking for `block` milliseconds if given.
fn xreadgroup<'a>(
    args: &'a ReadArgs<'_>,
    streams: &'a [Arc<str>],
    block: Option<&'a str>,
) -> Vec<&'a [u8]> {
    let mut command: Vec<&[u8]> = Vec::with_capacity(10 + 2 * streams.len());
    command.extend([
        b"XREADGROUP".as_slice(),
        b"GROUP",
        args.group.as_bytes(),
        args.consumer.as_bytes(),
        b"COUNT",
        args.count.as_bytes(),
    ]);
    if let Some(millis) = block {
        command.extend([b"BLOCK".as_slice(), millis.as_bytes()]);
    }
    command.push(b"STREAMS");
    command.extend(streams.iter().map(|s| s.as_bytes()));
    command.extend(streams.iter().map(|_| b">".as_slice()));
    command
}

/// What one [`SlotRead`] gave: its connection back and the outcome.
struct SlotOutcome {
    read: SlotRead,
    result: std::result::Result<Vec<StreamDeliveries>, RespError>,
}

/// The reads' settings, shared by every slot's read.
struct ReadArgs<'a> {
    group: &'a str,
    consumer: &'a str,
    count: String,
    block_millis: Option<String>,
    deadline: Instant,
}

impl RedisBroker {
    /// [`GroupReading::read_new`](crate::broker::GroupReading::read_new).
    pub(super) async fn read_new_entries(
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
        // one read per slot. Every connection is there before any read blocks, so that a
        // wake finds them all; a slot whose master cannot be reached is left out of this
        // read, its error reported after what the others deliver.
        let slots = by_slot(&self.topology, streams);
        let several = slots.len() > 1;
        let mut reads = Vec::with_capacity(slots.len());
        let mut unreachable = None;
        let connections = if several {
            futures_util::future::join_all(
                slots
                    .iter()
                    .map(|(key, _)| self.read_connections.take(self, *key, true)),
            )
            .await
        } else {
            let (key, _) = &slots[0];
            vec![self.read_connections.take(self, *key, true).await]
        };
        for ((key, members), connection) in slots.into_iter().zip(connections) {
            let connection = match connection {
                Ok(connection) => connection,
                Err(error) if several => {
                    unreachable.get_or_insert(error);
                    continue;
                }
                Err(error) => return Err(error),
            };
            let blocked_on = (connection.node.clone(), connection.connection.client_id());
            let slot_streams = if several {
                members.iter().map(|&i| streams[i].clone()).collect()
            } else {
                streams.to_vec()
            };
            reads.push(SlotRead {
                key,
                members,
                streams: slot_streams,
                connection,
                blocked_on,
            });
        }
        if reads.is_empty() {
            return Err(unreachable.unwrap_or_else(|| Error::Internal {
                detail: "a read of no streams".to_owned(),
            }));
        }
        let blocked = block.and_then(|block| {
            BlockedReads::set(&self.reader, reads.iter().map(|r| r.blocked_on.clone()))
                .map(|guard| (guard, block))
        });
        let wait = blocked.as_ref().map_or(Duration::ZERO, |(_, block)| *block);
        let args = ReadArgs {
            group,
            consumer,
            count: count.to_string(),
            block_millis: blocked
                .as_ref()
                .map(|(_, block)| millis(*block).max(1).to_string()),
            deadline: Instant::now() + wait + self.command_timeout,
        };
        let outcomes = if reads.len() == 1 {
            let read = reads.pop().expect("one read");
            vec![self.read_slot(read, &args).await]
        } else {
            self.read_slots(reads, &args, blocked.as_ref().map(|(guard, _)| guard))
                .await
        };
        drop(blocked);
        let mut deliveries = Vec::new();
        let mut first_error = unreachable;
        for SlotOutcome { read, result } in outcomes {
            self.read_connections
                .put_back(self, read.key, read.connection, &result)
                .await;
            match result {
                Ok(batches) if !several => deliveries = batches,
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
        if several {
            deliveries.sort_by_key(|batch| batch.stream_index);
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

    /// Runs the reads of several slots at once. The first that returns something (or
    /// fails) ends the blocks of the others, as one `XREADGROUP` of every stream would
    /// have returned then, while they are still polled: each that returns drops out of
    /// what the wake unblocks. The outcomes in stream order.
    async fn read_slots(
        &self,
        reads: Vec<SlotRead>,
        args: &ReadArgs<'_>,
        blocked: Option<&BlockedReads<'_>>,
    ) -> Vec<SlotOutcome> {
        let mut pending: FuturesUnordered<_> = reads
            .into_iter()
            .map(|read| self.read_slot(read, args))
            .collect();
        let mut outcomes = Vec::with_capacity(pending.len());
        let record = |outcome: SlotOutcome, outcomes: &mut Vec<SlotOutcome>| {
            if let Some(blocked) = blocked {
                blocked.returned(&outcome.read.blocked_on);
            }
            let ends_the_read = !matches!(&outcome.result, Ok(batches) if batches.is_empty());
            outcomes.push(outcome);
            ends_the_read
        };
        while let Some(outcome) = pending.next().await {
            if record(outcome, &mut outcomes) && blocked.is_some() && !pending.is_empty() {
                let drain = async {
                    while let Some(outcome) = pending.next().await {
                        record(outcome, &mut outcomes);
                    }
                };
                let unblock = async {
                    if let Err(error) = self.unblock_reads(false).await {
                        tracing::debug!(
                            error = &error as &dyn std::error::Error,
                            "could not end the other reads' blocks"
                        );
                    }
                };
                futures_util::future::join(drain, unblock).await;
            }
        }
        outcomes.sort_by_key(|outcome| outcome.read.members[0]);
        outcomes
    }

    /// Sends one `XREADGROUP` on `read`'s connection, following a `MOVED` or `ASK` reply
    /// to the node it names. After a `MOVED` that second attempt does not block (the
    /// slot map names the new master for the next read); after an `ASK` it blocks for at
    /// most [`ASK_BLOCK`], on a connection not kept, so that a stream read alone does not
    /// spin while its slot migrates.
    async fn read_slot(&self, mut read: SlotRead, args: &ReadArgs<'_>) -> SlotOutcome {
        let streams = &read.streams;
        let ask_block = args.block_millis.as_deref().map(|block| {
            block
                .parse::<u64>()
                .unwrap_or(0)
                .min(millis(ASK_BLOCK))
                .to_string()
        });
        let result = read
            .connection
            .connection
            .read_group(
                &xreadgroup(args, streams, args.block_millis.as_deref()),
                streams,
                args.deadline,
            )
            .await;
        let redirect = match &result {
            Err(RespError::Server(line)) => self.topology.redirect(line),
            _ => None,
        };
        let (Some(redirect), Some(cluster)) = (redirect, self.topology.cluster()) else {
            return SlotOutcome { read, result };
        };
        let endpoint = cluster.endpoint(&redirect.node);
        let again = xreadgroup(
            args,
            streams,
            if redirect.ask {
                ask_block.as_deref()
            } else {
                None
            },
        );
        let result = async {
            let mut connection =
                RespConnection::connect_with_id(&endpoint, Instant::now() + CONNECT_TIMEOUT)
                    .await?;
            if redirect.ask {
                connection.asking(args.deadline).await?;
            }
            let batches = connection.read_group(&again, streams, args.deadline).await;
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
    /// or has returned. A node that fails the command does not keep the others blocked.
    pub(super) async fn unblock_reads(&self, remember: bool) -> Result<()> {
        let mut failure = None;
        for _ in 0..WAKE_ATTEMPTS {
            let blocked = {
                let mut state = lock(&self.reader);
                if state.blocked.is_empty() {
                    state.woken |= remember;
                    break;
                }
                state.blocked.clone()
            };
            let mut waiting = false;
            let unblocks = blocked.iter().map(|(node, client_id)| async move {
                self.commands()
                    .on_node(
                        node.as_ref(),
                        redis::cmd("CLIENT").arg("UNBLOCK").arg(*client_id),
                    )
                    .await
            });
            let outcomes = futures_util::future::join_all(unblocks).await;
            for (connection, unblocked) in blocked.into_iter().zip(outcomes) {
                match unblocked {
                    Ok(Value::Int(1)) => lock(&self.reader)
                        .blocked
                        .retain(|blocked| *blocked != connection),
                    Ok(_) => waiting = true,
                    Err(error) => {
                        lock(&self.reader)
                            .blocked
                            .retain(|blocked| *blocked != connection);
                        failure.get_or_insert(error);
                    }
                }
            }
            if !waiting {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        match failure {
            None => Ok(()),
            Some(error) => Err(Error::redis("waking the blocked reader", error)),
        }
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
