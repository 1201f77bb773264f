//! Replies that come through redis-rs as `Value`s: read, claim and pending-list replies.

use std::collections::HashMap;
use std::sync::Arc;

use redis::Value;
use tokio::time::Instant;

use crate::broker::{ClaimPage, Delivery, EntryFields, RawFields, StreamDeliveries};
use crate::event::EntryId;

/// Parses an `XAUTOCLAIM` reply: `[next cursor, entries, deleted ids]`.
pub(super) fn parse_autoclaim(reply: Value) -> Result<ClaimPage, String> {
    let Value::Array(parts) = reply else {
        return Err(format!("XAUTOCLAIM did not answer an array: {reply:?}"));
    };
    let mut parts = parts.into_iter();
    let next_cursor = parts
        .next()
        .as_ref()
        .and_then(entry_id)
        .ok_or_else(|| "XAUTOCLAIM answered no cursor".to_owned())?;
    let deliveries = match parts.next() {
        Some(Value::Array(entries)) => entries
            .into_iter()
            .map(parse_entry)
            .filter(|d| !matches!(d, Ok(Delivery { fields: None, .. })))
            .collect::<Result<Vec<_>, _>>()?,
        other => return Err(format!("XAUTOCLAIM entries are not an array: {other:?}")),
    };
    let deleted = match parts.next() {
        Some(Value::Array(ids)) => ids.iter().filter_map(entry_id).collect(),
        _ => Vec::new(),
    };
    Ok(ClaimPage {
        deliveries,
        next_cursor,
        deleted,
        own: Vec::new(),
    })
}

pub(super) fn entry_id(value: &Value) -> Option<EntryId> {
    match value {
        Value::BulkString(bytes) => EntryId::parse_bytes(bytes),
        Value::SimpleString(text) => text.parse().ok(),
        _ => None,
    }
}

/// Parses an `XREADGROUP` reply. RESP2 answers an array of `[stream, entries]` pairs,
/// RESP3 a map; a timed-out block answers nil.
pub(super) fn parse_read_reply_value(
    reply: Value,
    streams: &[Arc<str>],
) -> Result<Vec<StreamDeliveries>, String> {
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

/// Parses one `[id, [field, value, ...]]` entry into a delivery.
pub(super) fn parse_entry(entry: Value) -> Result<Delivery, String> {
    let (id, fields) = parse_raw_entry(entry)?;
    Ok(Delivery {
        id,
        fields: fields.map(EntryFields::from_pairs),
        delivery_count: 1,
        delivered_at: Instant::now(),
    })
}

/// Parses one `[id, [field, value, ...]]` entry; the fields are nil when the entry is
/// pending but was deleted from the stream.
pub(super) fn parse_raw_entry(entry: Value) -> Result<(EntryId, Option<RawFields>), String> {
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
    Ok((id, fields))
}

pub(super) fn pair_up(flat: Vec<Value>) -> Result<RawFields, String> {
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

pub(super) fn bytes(value: Value) -> Result<Vec<u8>, String> {
    match value {
        Value::BulkString(bytes) => Ok(bytes),
        Value::SimpleString(text) => Ok(text.into_bytes()),
        Value::Int(n) => Ok(n.to_string().into_bytes()),
        other => Err(format!("a field is not a string: {other:?}")),
    }
}

/// Parses the extended `XPENDING` reply into delivery counts by entry id.
/// The ids among the rows of an `XPENDING` reply that are pending with `consumer`.
pub(super) fn parse_pending_of(reply: Value, consumer: &str) -> Result<Vec<EntryId>, String> {
    let Value::Array(rows) = reply else {
        return Err(format!("XPENDING did not answer an array: {reply:?}"));
    };
    let mut own = Vec::new();
    for row in rows {
        let Value::Array(row) = row else {
            return Err("an XPENDING row is not an array".to_owned());
        };
        match row.as_slice() {
            [id, Value::BulkString(name), _idle, _count] => {
                let id =
                    entry_id(id).ok_or_else(|| "an XPENDING row has no valid id".to_owned())?;
                if name.as_slice() == consumer.as_bytes() {
                    own.push(id);
                }
            }
            _ => return Err(format!("unexpected XPENDING row: {row:?}")),
        }
    }
    Ok(own)
}

pub(super) fn parse_pending_counts(reply: Value) -> Result<HashMap<EntryId, u64>, String> {
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
