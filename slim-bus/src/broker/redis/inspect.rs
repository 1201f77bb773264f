//! What the Redis backend tells about a stream: `XINFO GROUPS` and `CONSUMERS`,
//! `XPENDING`, and `XREAD` on a connection of its own.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::time::Instant;

use async_trait::async_trait;

use super::replies::{entry_id, parse_raw_entry};
use super::{RedisBroker, classify, millis, unexpected};
use crate::broker::resp::{RespConnection, RespError};
use crate::broker::{
    GENERIC_ERROR, GroupStats, Inspection, NO_GROUP, PENDING_IDLE_PAGE, RawFields, TYPE_NONE,
    TYPE_STREAM, WRONG_TYPE, trimmed_count_key,
};
use crate::error::{Error, Result, server_code};
use crate::event::EntryId;
use crate::inspect::{ConsumerStatus, GroupStatus, PendingEntry, StreamStatus};

impl RedisBroker {
    pub(super) async fn inspect_stream(
        &self,
        stream: &str,
        dead_letters: &str,
    ) -> Result<Option<StreamStatus>> {
        let action = || format!("reading the state of stream `{stream}`");
        let kind: String = redis::cmd("TYPE")
            .arg(stream)
            .query_async(&mut self.commands())
            .await
            .map_err(|e| Error::redis(action(), e))?;
        match kind.as_str() {
            TYPE_NONE => return Ok(None),
            TYPE_STREAM => {}
            _ => {
                return Err(Error::WrongType {
                    stream: stream.to_owned(),
                    actual: kind,
                });
            }
        }
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(stream);
        pipe.cmd("XREVRANGE")
            .arg(stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        pipe.cmd("XINFO").arg("GROUPS").arg(stream);
        pipe.cmd("XLEN").arg(dead_letters);
        let (length, last, groups, dead): (u64, Value, Value, u64) =
            match pipe.query_async(&mut self.commands()).await {
                Ok(replies) => replies,
                Err(e) if server_code(&e).as_deref() == Some(WRONG_TYPE) => {
                    let fallback = classify(stream, e, action);
                    return Err(self.find_wrong_key(&[stream, dead_letters], fallback).await);
                }
                Err(e) => return Err(Error::redis(action(), e)),
            };
        let last_entry_id = match last {
            Value::Array(entries) => match entries.into_iter().next() {
                Some(entry) => Some(
                    parse_raw_entry(entry)
                        .map_err(|detail| Error::UnexpectedReply {
                            action: action(),
                            detail,
                        })?
                        .0,
                ),
                None => None,
            },
            other => {
                return Err(unexpected(
                    action(),
                    "XREVRANGE did not answer an array",
                    &other,
                ));
            }
        };
        let Value::Array(groups) = groups else {
            return Err(unexpected(
                action(),
                "XINFO GROUPS did not answer an array",
                &groups,
            ));
        };
        let mut statuses: Vec<GroupStatus> = groups.into_iter().map(parse_group).collect();
        if !statuses.is_empty() {
            let mut pipe = redis::pipe();
            for group in &statuses {
                pipe.cmd("XPENDING")
                    .arg(stream)
                    .arg(&group.name)
                    .arg("-")
                    .arg("+")
                    .arg(PENDING_IDLE_PAGE);
                pipe.cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(stream)
                    .arg(&group.name);
            }
            let replies: Vec<Value> = pipe
                .query_async(&mut self.commands())
                .await
                .map_err(|e| classify(stream, e, action))?;
            let mut replies = replies.into_iter();
            for group in &mut statuses {
                if let Some(Value::Array(rows)) = replies.next() {
                    group.oldest_pending_idle = rows
                        .into_iter()
                        .filter_map(|row| parse_pending_row(row).map(|entry| entry.idle))
                        .max();
                }
                if let Some(Value::Array(consumers)) = replies.next() {
                    group.consumers = consumers.into_iter().map(parse_consumer).collect();
                }
            }
        }
        statuses.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Some(StreamStatus {
            stream: stream.to_owned(),
            length,
            last_entry_id,
            dead_letter_stream: dead_letters.to_owned(),
            dead_letters: dead,
            groups: statuses,
        }))
    }

    pub(super) async fn inspect_pending(
        &self,
        stream: &str,
        group: &str,
        consumer: Option<&str>,
        count: usize,
    ) -> Result<Vec<PendingEntry>> {
        let action = || format!("reading the pending entries of group `{group}` on `{stream}`");
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(stream).arg(group).arg("-").arg("+").arg(count);
        if let Some(consumer) = consumer {
            cmd.arg(consumer);
        }
        let reply: Value = match cmd.query_async(&mut self.commands()).await {
            Ok(reply) => reply,
            Err(e) if server_code(&e).as_deref() == Some(NO_GROUP) => {
                return Err(Error::GroupNotFound {
                    stream: stream.to_owned(),
                    group: group.to_owned(),
                });
            }
            Err(e) => return Err(self.name_type(classify(stream, e, action)).await),
        };
        let Value::Array(rows) = reply else {
            return Err(unexpected(
                action(),
                "XPENDING did not answer an array",
                &reply,
            ));
        };
        rows.into_iter()
            .map(|row| {
                parse_pending_row(row).ok_or_else(|| Error::UnexpectedReply {
                    action: action(),
                    detail: "an XPENDING row is not [id, consumer, idle, count]".to_owned(),
                })
            })
            .collect()
    }

    /// `XREAD` on a connection of its own, so that its block holds up no other command.
    pub(super) async fn read_entries_after(
        &self,
        stream: &str,
        after: EntryId,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<(EntryId, RawFields)>> {
        let action = || format!("reading stream `{stream}`");
        let key = self.topology.connection_key(stream);
        let count = count.to_string();
        let after = after.to_string();
        let block_millis = block.map(|block| millis(block).max(1).to_string());
        let mut args: Vec<&[u8]> = vec![b"XREAD", b"COUNT", count.as_bytes()];
        if let Some(block_millis) = &block_millis {
            args.extend([b"BLOCK".as_slice(), block_millis.as_bytes()]);
        }
        args.extend([b"STREAMS".as_slice(), stream.as_bytes(), after.as_bytes()]);
        let streams = [Arc::<str>::from(stream)];
        let deadline = Instant::now() + block.unwrap_or(Duration::ZERO) + self.command_timeout;
        // The reply to XREAD has the shape of the reply to XREADGROUP. A `MOVED` (the
        // slot was resharded) is followed once, to the master the slot map now names.
        let mut result = None;
        for _ in 0..2 {
            let mut connection = self.tail_connections.take(self, key, false).await?;
            let read = connection
                .connection
                .read_group(&args, &streams, deadline)
                .await;
            self.tail_connections
                .put_back(self, key, connection, &read)
                .await;
            let redirect = match &read {
                Err(RespError::Server(line)) => self.topology.redirect(line),
                _ => None,
            };
            result = Some(read);
            match redirect {
                // The slot map names the new master for the next round.
                Some(redirect) if !redirect.ask => {}
                // The slot migrates: asked once of the importing node, after ASKING.
                Some(redirect) => {
                    let endpoint = self.topology.endpoint(Some(&redirect.node));
                    result = Some(
                        async {
                            let mut asked = RespConnection::connect(&endpoint, deadline).await?;
                            asked.asking(deadline).await?;
                            asked.read_group(&args, &streams, deadline).await
                        }
                        .await,
                    );
                    break;
                }
                None => break,
            }
        }
        let result = result.expect("a read was made");
        match result {
            Ok(mut batches) => Ok(batches
                .pop()
                .map(|batch| batch.deliveries)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|delivery| {
                    let fields = delivery.fields?;
                    let raw = fields
                        .pairs()
                        .map(|(name, value)| (name.to_vec(), value.to_vec()))
                        .collect();
                    Some((delivery.id, raw))
                })
                .collect()),
            Err(error) => {
                let error = classify(stream, error.into_redis(), action);
                Err(self.name_type(error).await)
            }
        }
    }
}

/// The `(name, value)` pairs of a RESP2 flat array or a RESP3 map.
fn pairs(info: Value) -> Vec<(Vec<u8>, Value)> {
    let flat: Vec<(Value, Value)> = match info {
        Value::Map(pairs) => pairs,
        Value::Array(flat) => {
            let mut flat = flat.into_iter();
            std::iter::from_fn(|| Some((flat.next()?, flat.next()?))).collect()
        }
        _ => Vec::new(),
    };
    flat.into_iter()
        .filter_map(|(key, value)| match key {
            Value::BulkString(bytes) => Some((bytes, value)),
            Value::SimpleString(text) => Some((text.into_bytes(), value)),
            _ => None,
        })
        .collect()
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

fn count(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// One group of an `XINFO GROUPS` reply; its consumers and oldest pending entry are read
/// next.
fn parse_group(info: Value) -> GroupStatus {
    let mut group = GroupStatus {
        name: String::new(),
        lag: None,
        pending: 0,
        oldest_pending_idle: None,
        last_delivered_id: EntryId::MIN,
        consumers: Vec::new(),
    };
    for (key, value) in pairs(info) {
        match key.as_slice() {
            b"name" => group.name = text(&value).unwrap_or_default(),
            b"pending" => group.pending = count(&value).unwrap_or(0),
            b"lag" => group.lag = count(&value),
            b"last-delivered-id" => {
                group.last_delivered_id = entry_id(&value).unwrap_or(EntryId::MIN)
            }
            _ => {}
        }
    }
    group
}

/// One consumer of an `XINFO CONSUMERS` reply.
fn parse_consumer(info: Value) -> ConsumerStatus {
    let mut consumer = ConsumerStatus {
        name: String::new(),
        pending: 0,
        idle: Duration::ZERO,
    };
    for (key, value) in pairs(info) {
        match key.as_slice() {
            b"name" => consumer.name = text(&value).unwrap_or_default(),
            b"pending" => consumer.pending = count(&value).unwrap_or(0),
            b"idle" => consumer.idle = Duration::from_millis(count(&value).unwrap_or(0)),
            _ => {}
        }
    }
    consumer
}

/// One row of an extended `XPENDING` reply: `[id, consumer, idle, delivery count]`.
fn parse_pending_row(row: Value) -> Option<PendingEntry> {
    let Value::Array(row) = row else {
        return None;
    };
    match row.as_slice() {
        [id, consumer, idle, delivery_count] => Some(PendingEntry {
            id: entry_id(id)?,
            consumer: text(consumer)?,
            idle: Duration::from_millis(count(idle)?),
            delivery_count: count(delivery_count)?,
        }),
        _ => None,
    }
}

#[async_trait]
impl Inspection for RedisBroker {
    async fn group_stats(
        &self,
        stream: &str,
        group: &str,
        dead_letters: &str,
    ) -> Result<GroupStats> {
        let action = || format!("reading the state of group `{group}` on stream `{stream}`");
        let groups: redis::RedisResult<Value> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(&mut self.commands())
            .await;
        let info = match groups {
            Ok(reply) => find_group(reply, group),
            // The stream does not exist (yet, or any more): nothing to do there.
            Err(e) if e.code() == Some(GENERIC_ERROR) => None,
            Err(e) => return Err(self.name_type(classify(stream, e, action)).await),
        };
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(stream);
        pipe.cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg("-")
            .arg("+")
            .arg(PENDING_IDLE_PAGE);
        pipe.cmd("XLEN").arg(dead_letters);
        pipe.cmd("GET").arg(trimmed_count_key(dead_letters));
        let (length, oldest, dead, trimmed): (u64, Value, u64, Option<u64>) = match info {
            Some(_) => match pipe.query_async(&mut self.commands()).await {
                Ok(replies) => replies,
                Err(e) if server_code(&e).as_deref() == Some(WRONG_TYPE) => {
                    let counter = trimmed_count_key(dead_letters);
                    let fallback = Error::redis(
                        format!(
                            "{} (its dead letters `{dead_letters}`, their trimmed count `{counter}`)",
                            action()
                        ),
                        e,
                    );
                    return Err(self.find_wrong_key(&[stream, dead_letters], fallback).await);
                }
                Err(e) => return Err(Error::redis(action(), e)),
            },
            None => (0, Value::Nil, 0, None),
        };
        let oldest_pending_idle = match oldest {
            Value::Array(rows) => rows
                .into_iter()
                .filter_map(|row| parse_pending_row(row).map(|entry| entry.idle))
                .max(),
            _ => None,
        };
        let info = info.unwrap_or_default();
        Ok(GroupStats {
            length,
            lag: info.lag,
            pending: info.pending,
            oldest_pending_idle,
            dead_letters: dead,
            dead_letters_trimmed: trimmed.unwrap_or(0),
        })
    }

    async fn stream_status(
        &self,
        stream: &str,
        dead_letters: &str,
    ) -> Result<Option<StreamStatus>> {
        self.inspect_stream(stream, dead_letters).await
    }

    async fn pending_entries(
        &self,
        stream: &str,
        group: &str,
        consumer: Option<&str>,
        count: usize,
    ) -> Result<Vec<PendingEntry>> {
        self.inspect_pending(stream, group, consumer, count).await
    }

    async fn read_after(
        &self,
        stream: &str,
        after: EntryId,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<(EntryId, RawFields)>> {
        self.read_entries_after(stream, after, count, block).await
    }
}

/// The `lag` and `pending` of `group` in an `XINFO GROUPS` reply; `None` when the group
/// does not exist.
fn find_group(reply: Value, group: &str) -> Option<GroupStats> {
    let Value::Array(groups) = reply else {
        return None;
    };
    groups.into_iter().find_map(|info| {
        let pairs: Vec<(Value, Value)> = match info {
            Value::Map(pairs) => pairs,
            Value::Array(flat) => {
                let mut flat = flat.into_iter();
                std::iter::from_fn(|| Some((flat.next()?, flat.next()?))).collect()
            }
            _ => return None,
        };
        let mut stats = GroupStats::default();
        let mut name_matches = false;
        for (key, value) in pairs {
            let key = match &key {
                Value::BulkString(bytes) => bytes.as_slice(),
                Value::SimpleString(text) => text.as_bytes(),
                _ => continue,
            };
            match (key, value) {
                (b"name", Value::BulkString(name)) => name_matches = name == group.as_bytes(),
                (b"name", Value::SimpleString(name)) => name_matches = name == group,
                (b"pending", Value::Int(n)) => stats.pending = u64::try_from(n).unwrap_or(0),
                (b"lag", Value::Int(n)) => stats.lag = u64::try_from(n).ok(),
                _ => {}
            }
        }
        name_matches.then_some(stats)
    })
}
