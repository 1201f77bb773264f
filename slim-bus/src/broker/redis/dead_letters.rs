//! The dead-letter store: moving a failed entry to its dead-letter stream and replaying it,
//! both atomic in a script, and reading, counting and deleting entries.

use async_trait::async_trait;
use redis::Value;

use super::replies::{entry_id, parse_raw_entry};
use super::{RedisBroker, classify, unexpected};
use crate::broker::{DeadLetterMove, DeadLetterStore, RawFields, WRONG_TYPE, trimmed_count_key};
use crate::dead_letter::{dlq_error, unpack_fields};
use crate::error::{Error, Result, server_code};
use crate::event::EntryId;

impl RedisBroker {
    /// The error of a failed replay: a `WRONGTYPE` names whichever of the two keys holds
    /// another type.
    async fn replay_error(
        &self,
        dead_letters: &str,
        origin: &str,
        error: redis::RedisError,
    ) -> Error {
        let wrong_type = server_code(&error).as_deref() == Some(WRONG_TYPE);
        let error = dlq_error(
            "replaying from",
            dead_letters,
            &[dead_letters, origin],
            error,
        );
        if wrong_type {
            return self.find_wrong_key(&[dead_letters, origin], error).await;
        }
        error
    }

    /// Replays a dead letter whose original fields were packed into one value: adds them
    /// to `origin` and deletes the dead letter in one `MULTI`/`EXEC`, from here because a
    /// script cannot pass that many values to one command. Two replays of the same dead
    /// letter at the same moment can both add it.
    async fn replay_packed(
        &self,
        dead_letters: &str,
        origin: &str,
        id: EntryId,
        fields: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<EntryId> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        let add = pipe.cmd("XADD").arg(origin).arg("*");
        for (name, value) in fields {
            add.arg(name.as_slice()).arg(value.as_slice());
        }
        pipe.cmd("XDEL").arg(dead_letters).arg(id).ignore();
        let (new_id,): (Value,) = match pipe.query_async(&mut self.commands()).await {
            Ok(reply) => reply,
            Err(e) => return Err(self.replay_error(dead_letters, origin, e).await),
        };
        entry_id(&new_id).ok_or_else(|| {
            unexpected(
                format!("replaying from dead-letter stream `{dead_letters}`"),
                "XADD did not return an entry id",
                &new_id,
            )
        })
    }
}

#[async_trait]
impl DeadLetterStore for RedisBroker {
    async fn dead_letter(
        &self,
        stream: &str,
        dead_letters: &str,
        group: &str,
        consumer: &str,
        id: EntryId,
        meta: &[(&'static str, String)],
        max_len: Option<usize>,
    ) -> Result<DeadLetterMove> {
        let mut invocation = self.scripts.dead_letter.key(stream);
        invocation
            .key(dead_letters)
            .key(trimmed_count_key(dead_letters))
            .arg(group)
            .arg(consumer)
            .arg(id)
            .arg(max_len.map_or_else(String::new, |max_len| max_len.to_string()));
        for (name, value) in meta {
            invocation.arg(*name).arg(value.as_str());
        }
        let (moved, trimmed): (i64, u64) = match invocation.invoke_async(&mut self.commands()).await
        {
            Ok(reply) => reply,
            Err(e) => {
                let counter = trimmed_count_key(dead_letters);
                let wrong_type = server_code(&e).as_deref() == Some(WRONG_TYPE);
                let error = dlq_error(
                    "moving an entry to",
                    dead_letters,
                    &[stream, dead_letters, &counter],
                    e,
                );
                return Err(if wrong_type {
                    // The server does not say which key: name the one that is wrong, which
                    // is rarely the live stream.
                    self.find_wrong_key(&[dead_letters, stream], error).await
                } else {
                    error
                });
            }
        };
        Ok(match moved {
            1 => DeadLetterMove::Moved { trimmed },
            -1 => DeadLetterMove::Deleted,
            _ => DeadLetterMove::NotPending,
        })
    }

    async fn replay(
        &self,
        dead_letters: &str,
        origin: &str,
        id: EntryId,
    ) -> Result<Option<EntryId>> {
        let mut invocation = self.scripts.replay.key(dead_letters);
        invocation.key(origin).arg(id);
        let reply: Value = match invocation.invoke_async(&mut self.commands()).await {
            Ok(reply) => reply,
            Err(e) => return Err(self.replay_error(dead_letters, origin, e).await),
        };
        match reply {
            Value::Nil => Ok(None),
            Value::Array(parts) if parts.len() == 2 => {
                let fields = match &parts[1] {
                    Value::BulkString(packed) => unpack_fields(packed),
                    _ => None,
                };
                let Some(fields) = fields else {
                    return Err(unexpected(
                        format!("replaying from dead-letter stream `{dead_letters}`"),
                        "a dead letter's packed fields do not unpack",
                        &Value::Array(parts),
                    ));
                };
                self.replay_packed(dead_letters, origin, id, &fields)
                    .await
                    .map(Some)
            }
            other => entry_id(&other).map(Some).ok_or_else(|| {
                unexpected(
                    format!("replaying from dead-letter stream `{dead_letters}`"),
                    "the replay did not return an entry id",
                    &other,
                )
            }),
        }
    }

    async fn range_after(
        &self,
        stream: &str,
        after: Option<EntryId>,
        count: usize,
    ) -> Result<Vec<(EntryId, RawFields)>> {
        let start = match after {
            Some(id) => format!("({id}"),
            None => "-".to_owned(),
        };
        let action = || format!("reading stream `{stream}`");
        let reply: Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.commands())
            .await
            .map_err(|e| classify(stream, e, action))?;
        let Value::Array(entries) = reply else {
            return Err(unexpected(
                action(),
                "XRANGE did not answer an array",
                &reply,
            ));
        };
        entries
            .into_iter()
            .map(|entry| {
                parse_raw_entry(entry).map(|(id, fields)| (id, fields.unwrap_or_default()))
            })
            .collect::<Result<_, String>>()
            .map_err(|detail| Error::UnexpectedReply {
                action: action(),
                detail,
            })
    }

    async fn stream_len(&self, stream: &str) -> Result<u64> {
        redis::cmd("XLEN")
            .arg(stream)
            .query_async(&mut self.commands())
            .await
            .map_err(|e| classify(stream, e, || format!("measuring stream `{stream}`")))
    }

    async fn delete(&self, stream: &str, ids: &[EntryId]) -> Result<u64> {
        redis::cmd("XDEL")
            .arg(stream)
            .arg(ids)
            .query_async(&mut self.commands())
            .await
            .map_err(|e| {
                classify(stream, e, || {
                    format!("deleting entries of stream `{stream}`")
                })
            })
    }

    async fn delete_key(&self, stream: &str) -> Result<()> {
        redis::cmd("DEL")
            .arg(stream)
            .query_async(&mut self.commands())
            .await
            .map_err(|e| Error::redis(format!("deleting stream `{stream}`"), e))
    }
}
