//! Consumer groups: reads of new entries (in [`super::new_entries`]), the consumer's own
//! pending entries, acks, claims, and keeping the group and its stream tidy.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use super::replies::{
    parse_autoclaim, parse_entry, parse_pending_counts, parse_pending_of, parse_read_reply_value,
};
use super::{RedisBroker, classify, millis};
use crate::broker::Unowned;
use crate::broker::topology::by_slot;
use crate::broker::{
    BUSY_GROUP, ClaimPage, Delivery, EntryFields, GroupReading, StreamDeliveries, WRONG_TYPE,
};
use crate::config::StartFrom;
use crate::error::{Error, Result, server_code};
use crate::event::EntryId;

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

    async fn recreate_group(
        &self,
        stream: &str,
        group: &str,
        after: Option<EntryId>,
        start: StartFrom,
    ) -> Result<bool> {
        let start_id = match (after, start) {
            (Some(after), _) => after.to_string(),
            (None, StartFrom::NewOnly) => "$".to_owned(),
            (None, _) => "0".to_owned(),
        };
        let result: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg(&start_id)
            .arg("MKSTREAM")
            .query_async(&mut self.commands())
            .await;
        match result {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some(BUSY_GROUP) => Ok(false),
            Err(e) if e.code() == Some(WRONG_TYPE) => Err(self.wrong_type(stream).await),
            Err(e) => Err(Error::redis(
                format!("creating consumer group `{group}` on stream `{stream}` at {start_id}"),
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
        self.read_new_entries(group, consumer, streams, count, block)
            .await
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
        // XAUTOCLAIM does not say whom it took an entry from: the XPENDING just before it,
        // in the same round trip, says which of them were this consumer's already (left by
        // an earlier run under its name), which are not claims from other consumers.
        let mut pipe = redis::pipe();
        pipe.cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg("IDLE")
            .arg(millis(min_idle))
            .arg(cursor)
            .arg("+")
            .arg(count);
        pipe.cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(group)
            .arg(consumer)
            .arg(millis(min_idle))
            .arg(cursor)
            .arg("COUNT")
            .arg(count);
        let (stale, reply): (Value, Value) = match pipe.query_async(&mut self.commands()).await {
            Ok(replies) => replies,
            Err(e) => return Err(self.name_type(classify(stream, e, action)).await),
        };
        let mut page = parse_autoclaim(reply).map_err(|detail| Error::UnexpectedReply {
            action: action(),
            detail,
        })?;
        let own = parse_pending_of(stale, consumer).map_err(|detail| Error::UnexpectedReply {
            action: action(),
            detail,
        })?;
        page.own = own
            .into_iter()
            .filter(|id| page.deliveries.iter().any(|d| d.id == *id))
            .collect();
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

    async fn claim_own(
        &self,
        group: &str,
        consumer: &str,
        requests: &[(Arc<str>, EntryId)],
        unowned: Unowned,
    ) -> Result<Vec<Option<EntryFields>>> {
        // One script per stream (its slot on a cluster), all at once.
        let mut streams: Vec<(&Arc<str>, Vec<usize>)> = Vec::new();
        for (index, (stream, _)) in requests.iter().enumerate() {
            match streams.iter_mut().find(|(s, _)| *s == stream) {
                Some((_, members)) => members.push(index),
                None => streams.push((stream, vec![index])),
            }
        }
        let parts = streams.into_iter().map(|(stream, members)| {
            let ids: Vec<EntryId> = members.iter().map(|&i| requests[i].1).collect();
            async move {
                let claimed = self
                    .claim_own_of_stream(stream, group, consumer, unowned, &ids)
                    .await?;
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

    async fn touch_own(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ids: &[EntryId],
        idle: Duration,
        unowned: Unowned,
    ) -> Result<Vec<EntryId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // One script per stream: the stream's slot on a cluster, and the check of who
        // holds each entry atomic with its touch.
        let mut invocation = self.scripts.touch_own.key(stream);
        invocation
            .arg(group)
            .arg(consumer)
            .arg(millis(idle))
            .arg(match unowned {
                Unowned::PutBack => "put-back",
                Unowned::Leave => "leave",
            })
            .arg(ids);
        let action = || format!("keeping the held entries of stream `{stream}` fresh");
        let kept: Vec<String> = match invocation.invoke_async(&mut self.commands()).await {
            Ok(kept) => kept,
            Err(e) => return Err(self.name_type(classify(stream, e, action)).await),
        };
        kept.iter()
            .map(|id| id.parse::<EntryId>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::UnexpectedReply {
                action: action(),
                detail: format!("the script returned ids that do not parse: {kept:?}"),
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

    async fn record_retry_due(&self, key: &str, id: EntryId, due_unix_ms: u64) -> Result<()> {
        redis::cmd("HSET")
            .arg(key)
            .arg(id)
            .arg(due_unix_ms)
            .query_async::<()>(&mut self.commands())
            .await
            .map_err(|e| self.retry_due_error("recording the due time of a retry in", key, e))
    }

    async fn forget_retry_dues(&self, key: &str, ids: &[EntryId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        redis::cmd("HDEL")
            .arg(key)
            .arg(ids)
            .query_async::<()>(&mut self.commands())
            .await
            .map_err(|e| self.retry_due_error("deleting the due times of retries from", key, e))
    }

    async fn retry_dues(&self, key: &str, ids: &[EntryId]) -> Result<Vec<Option<u64>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // HMGET of one field answers a one-element array too.
        redis::cmd("HMGET")
            .arg(key)
            .arg(ids)
            .query_async::<Vec<Option<u64>>>(&mut self.commands())
            .await
            .map_err(|e| self.retry_due_error("reading the due times of retries from", key, e))
    }

    async fn trim_acked(&self, stream: &str, max_entries: usize) -> Result<u64> {
        let action = || format!("trimming what every group acknowledged from stream `{stream}`");
        match self
            .scripts
            .trim_acked
            .key(stream)
            .arg(max_entries)
            .invoke_async(&mut self.commands())
            .await
        {
            Ok(trimmed) => Ok(trimmed),
            Err(e) => Err(self.name_type(classify(stream, e, action)).await),
        }
    }
}

impl RedisBroker {
    /// An error about the hash of retry due times `key`, naming that key.
    fn retry_due_error(&self, action: &str, key: &str, error: redis::RedisError) -> Error {
        if server_code(&error).as_deref() == Some(WRONG_TYPE) {
            return Error::redis(
                format!("{action} key `{key}`, which holds another type than a hash: delete it"),
                error,
            );
        }
        Error::redis(format!("{action} hash `{key}`"), error)
    }

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
    /// Runs `claim_own.lua` on one stream: the entries of `ids` pending with `consumer`,
    /// claimed back with their fields.
    async fn claim_own_of_stream(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        unowned: Unowned,
        ids: &[EntryId],
    ) -> Result<Vec<Option<EntryFields>>> {
        let mut invocation = self.scripts.claim_own.key(stream);
        let unowned = match unowned {
            Unowned::PutBack => "put-back",
            Unowned::Leave => "leave",
        };
        invocation.arg(group).arg(consumer).arg(unowned).arg(ids);
        let action =
            || format!("claiming entries of stream `{stream}` for their retry in group `{group}`");
        let replies: Vec<Value> = match invocation.invoke_async(&mut self.commands()).await {
            Ok(replies) => replies,
            // The entries went with their stream when the key was given another type.
            Err(e) if server_code(&e).as_deref() == Some(WRONG_TYPE) => {
                return Ok(vec![None; ids.len()]);
            }
            Err(e) => return Err(Error::redis(action(), e)),
        };
        if replies.len() != ids.len() {
            return Err(Error::UnexpectedReply {
                action: action(),
                detail: format!("{} replies for {} entries", replies.len(), ids.len()),
            });
        }
        replies
            .into_iter()
            .map(|reply| match reply {
                Value::Nil | Value::Boolean(false) => Ok(None),
                entry @ Value::Array(_) => parse_entry(entry).map(|delivery| delivery.fields),
                other => Err(format!(
                    "the claim script did not answer an entry: {other:?}"
                )),
            })
            .collect::<Result<_, String>>()
            .map_err(|detail| Error::UnexpectedReply {
                action: action(),
                detail,
            })
    }
}
