//! The Redis backend: stream commands over two managed connections, one for commands and
//! one for blocking reads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Value};
use tokio::sync::OnceCell;

use super::{Broker, Delivery, RawFields, StreamDeliveries};
use crate::codec::EncodedField;
use crate::config::StartFrom;
use crate::error::{Error, Result};
use crate::event::EntryId;

/// How long connecting may take before it counts as a failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct RedisBroker {
    client: Client,
    /// Publishes, acks and group management. Never blocks on the server, so its response
    /// timeout can stay short.
    commands: ConnectionManager,
    /// `XREADGROUP ... BLOCK`, which holds its connection for the whole block time, so it
    /// gets a connection of its own whose response timeout is above the block time.
    blocking: OnceCell<ConnectionManager>,
    command_timeout: Duration,
    block_time: Duration,
}

impl RedisBroker {
    pub(crate) async fn connect(
        client: Client,
        command_timeout: Duration,
        block_time: Duration,
    ) -> Result<Self> {
        let commands = manager(&client, command_timeout).await?;
        Ok(RedisBroker {
            client,
            commands,
            blocking: OnceCell::new(),
            command_timeout,
            block_time,
        })
    }

    async fn blocking(&self) -> Result<ConnectionManager> {
        let response_timeout = self.block_time + self.command_timeout;
        self.blocking
            .get_or_try_init(|| manager(&self.client, response_timeout))
            .await
            .cloned()
    }

    fn commands(&self) -> ConnectionManager {
        self.commands.clone()
    }
}

async fn manager(client: &Client, response_timeout: Duration) -> Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(response_timeout))
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(2))
        .set_number_of_retries(3);
    let action = || format!("connecting to {}", client.get_connection_info().addr());
    match tokio::time::timeout(
        CONNECT_TIMEOUT * 2,
        ConnectionManager::new_with_config(client.clone(), config),
    )
    .await
    {
        Ok(Ok(manager)) => Ok(manager),
        Ok(Err(source)) => Err(Error::redis(action(), source)),
        Err(_) => Err(Error::Timeout {
            action: action(),
            timeout: CONNECT_TIMEOUT * 2,
        }),
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, stream: &str, fields: &[EncodedField]) -> Result<EntryId> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        for (name, value) in fields {
            cmd.arg(name.as_ref()).arg(value.as_slice());
        }
        let action = || format!("publishing to stream `{stream}`");
        let reply: Value = cmd
            .query_async(&mut self.commands())
            .await
            .map_err(|e| classify(stream, e, action))?;
        entry_id(&reply)
            .ok_or_else(|| unexpected(action(), "XADD did not return an entry id", &reply))
    }

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
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) if e.code() == Some("WRONGTYPE") => Err(self.wrong_type(stream).await),
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
        block: Duration,
    ) -> Result<Vec<StreamDeliveries>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS");
        for stream in streams {
            cmd.arg(stream.as_ref());
        }
        for _ in streams {
            cmd.arg(">");
        }
        let reply: Value = cmd
            .query_async(&mut self.blocking().await?)
            .await
            .map_err(|e| {
                let stream = streams.first().map(|s| s.as_ref()).unwrap_or_default();
                classify(stream, e, || {
                    format!("reading new entries for group `{group}`")
                })
            })?;
        parse_read_reply(reply, streams).map_err(|detail| Error::UnexpectedReply {
            action: format!("reading new entries for group `{group}`"),
            detail,
        })
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
        let (pending, read): (Value, Value) = pipe
            .query_async(&mut self.commands())
            .await
            .map_err(|e| classify(stream, e, action))?;
        let counts = parse_pending_counts(pending).map_err(|detail| Error::UnexpectedReply {
            action: action(),
            detail,
        })?;
        let streams = [Arc::<str>::from(stream)];
        let mut batches =
            parse_read_reply(read, &streams).map_err(|detail| Error::UnexpectedReply {
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
        for (stream, ids) in acks.iter().filter(|(_, ids)| !ids.is_empty()) {
            pipe.cmd("XACK")
                .arg(stream.as_ref())
                .arg(group)
                .arg(ids)
                .ignore();
        }
        pipe.query_async::<()>(&mut self.commands())
            .await
            .map_err(|e| Error::redis(format!("acknowledging entries for group `{group}`"), e))
    }
}

impl RedisBroker {
    /// The error for a key of the wrong type, naming the type found there.
    async fn wrong_type(&self, stream: &str) -> Error {
        let actual: String = redis::cmd("TYPE")
            .arg(stream)
            .query_async(&mut self.commands())
            .await
            .unwrap_or_else(|_| "value of another type".to_owned());
        Error::WrongType {
            stream: stream.to_owned(),
            actual,
        }
    }
}

/// Turns a WRONGTYPE reply into [`Error::WrongType`]; everything else into [`Error::Redis`].
fn classify(stream: &str, error: redis::RedisError, action: impl FnOnce() -> String) -> Error {
    if error.code() == Some("WRONGTYPE") {
        return Error::WrongType {
            stream: stream.to_owned(),
            actual: "value of another type".to_owned(),
        };
    }
    Error::redis(action(), error)
}

fn unexpected(action: String, what: &str, reply: &Value) -> Error {
    Error::UnexpectedReply {
        action,
        detail: format!("{what}: {reply:?}"),
    }
}

fn entry_id(value: &Value) -> Option<EntryId> {
    match value {
        Value::BulkString(bytes) => EntryId::parse_bytes(bytes),
        Value::SimpleString(text) => text.parse().ok(),
        _ => None,
    }
}

/// Parses an `XREADGROUP` reply. RESP2 answers an array of `[stream, entries]` pairs,
/// RESP3 a map; a timed-out block answers nil.
fn parse_read_reply(reply: Value, streams: &[Arc<str>]) -> Result<Vec<StreamDeliveries>, String> {
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(pairs) => pairs,
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Array(pair) if pair.len() == 2 => {
                    let mut pair = pair.into_iter();
                    match (pair.next(), pair.next()) {
                        (Some(name), Some(entries)) => Ok((name, entries)),
                        _ => Err("a stream reply is not a pair".to_owned()),
                    }
                }
                other => Err(format!("a stream reply is not a pair: {other:?}")),
            })
            .collect::<Result<_, _>>()?,
        other => return Err(format!("not an array of streams: {other:?}")),
    };
    let mut batches = Vec::with_capacity(pairs.len());
    for (name, entries) in pairs {
        let name = match &name {
            Value::BulkString(bytes) => bytes.as_slice(),
            Value::SimpleString(text) => text.as_bytes(),
            other => return Err(format!("stream name is not a string: {other:?}")),
        };
        let stream_index = streams
            .iter()
            .position(|s| s.as_bytes() == name)
            .ok_or_else(|| {
                format!(
                    "reply names stream `{}` that was not read",
                    String::from_utf8_lossy(name)
                )
            })?;
        let Value::Array(entries) = entries else {
            return Err(format!("entries are not an array: {entries:?}"));
        };
        let deliveries = entries
            .into_iter()
            .map(parse_entry)
            .collect::<Result<Vec<_>, _>>()?;
        batches.push(StreamDeliveries {
            stream_index,
            deliveries,
        });
    }
    Ok(batches)
}

/// Parses one `[id, [field, value, ...]]` entry; the fields are nil when the entry is
/// pending but was deleted from the stream.
fn parse_entry(entry: Value) -> Result<Delivery, String> {
    let Value::Array(parts) = entry else {
        return Err(format!("an entry is not an array: {entry:?}"));
    };
    let mut parts = parts.into_iter();
    let id = parts
        .next()
        .as_ref()
        .and_then(entry_id)
        .ok_or_else(|| "an entry has no valid id".to_owned())?;
    let fields = match parts.next() {
        None | Some(Value::Nil) => None,
        Some(Value::Array(flat)) => Some(pair_up(flat)?),
        Some(Value::Map(pairs)) => Some(
            pairs
                .into_iter()
                .map(|(k, v)| Ok((bytes(k)?, bytes(v)?)))
                .collect::<Result<RawFields, String>>()?,
        ),
        Some(other) => return Err(format!("fields of entry {id} are not an array: {other:?}")),
    };
    Ok(Delivery {
        id,
        fields,
        delivery_count: 1,
    })
}

fn pair_up(flat: Vec<Value>) -> Result<RawFields, String> {
    if !flat.len().is_multiple_of(2) {
        return Err("an entry has an odd number of field names and values".to_owned());
    }
    let mut fields = Vec::with_capacity(flat.len() / 2);
    let mut flat = flat.into_iter();
    while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
        fields.push((bytes(name)?, bytes(value)?));
    }
    Ok(fields)
}

fn bytes(value: Value) -> Result<Vec<u8>, String> {
    match value {
        Value::BulkString(bytes) => Ok(bytes),
        Value::SimpleString(text) => Ok(text.into_bytes()),
        Value::Int(n) => Ok(n.to_string().into_bytes()),
        other => Err(format!("a field is not a string: {other:?}")),
    }
}

/// Parses the extended `XPENDING` reply into delivery counts by entry id.
fn parse_pending_counts(reply: Value) -> Result<HashMap<EntryId, u64>, String> {
    let Value::Array(rows) = reply else {
        return Err(format!("XPENDING did not answer an array: {reply:?}"));
    };
    let mut counts = HashMap::with_capacity(rows.len());
    for row in rows {
        let Value::Array(row) = row else {
            return Err("an XPENDING row is not an array".to_owned());
        };
        match row.as_slice() {
            [id, _consumer, _idle, Value::Int(count)] => {
                let id =
                    entry_id(id).ok_or_else(|| "an XPENDING row has no valid id".to_owned())?;
                counts.insert(id, u64::try_from(*count).unwrap_or(0));
            }
            _ => return Err(format!("unexpected XPENDING row: {row:?}")),
        }
    }
    Ok(counts)
}
