//! Publishing: `XADD`s encoded once and sent in pipelines over a connection of their own.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{RedisBroker, classify};
use crate::broker::Publishing;
use crate::broker::resp::{RespConnection, RespError, encode_xadd, is_failover_line, xadd_len};
use crate::broker::transport::Endpoint;
use crate::codec::EncodedField;
use crate::error::{Error, Result};
use crate::event::EntryId;

/// Encoded `XADD`s waiting to be sent, from one `publish` or `publish_batch`.
pub(super) struct PublishRequest {
    stream: Box<str>,
    /// `count` commands, as [`encode_xadd`] writes them.
    commands: Vec<u8>,
    count: usize,
    /// The call's command timeout runs out here, however long it waited in the queue.
    deadline: Instant,
    reply: PublishReply,
}

pub(super) enum PublishReply {
    One(oneshot::Sender<Result<EntryId>>),
    Batch(oneshot::Sender<Result<Vec<EntryId>>>),
}

impl PublishRequest {
    /// Answers with one outcome per `XADD` the request carries, in order. A publisher may
    /// have stopped waiting (its future dropped): `send` fails then, and that is fine.
    fn answer(self, mut outcome: impl FnMut() -> std::result::Result<EntryId, redis::RedisError>) {
        let stream = &*self.stream;
        let mut next = || {
            outcome().map_err(|error| {
                classify(stream, error, || format!("publishing to stream `{stream}`"))
            })
        };
        match self.reply {
            PublishReply::One(reply) => {
                let _ = reply.send(next());
            }
            PublishReply::Batch(reply) => {
                // Every outcome of the batch is taken, so that the next request's
                // outcomes start where they should, whatever failed.
                let ids: Vec<Result<EntryId>> = (0..self.count).map(|_| next()).collect();
                let _ = reply.send(ids.into_iter().collect());
            }
        }
    }
}

/// The most `XADD`s sent in one pipeline, unless one batch holds more.
const MAX_PUBLISH_PIPELINE: usize = 512;

/// Buffers above this size are given back after their pipeline (one large batch should
/// not hold its memory for the bus's lifetime).
const KEPT_BUFFER: usize = 1 << 20;

/// Sends publishes in pipelines over a connection of its own: all that arrived while the
/// previous pipeline was on the wire go out together. Concurrent publishers then share
/// round trips and syscalls; with 64 tasks publishing, each publish on its own reached
/// 0.40x of a hand-written pipelined XADD loop (BENCHMARKS.md). The connection is opened
/// on the first publish and again after it broke. A pipeline, connecting included, ends
/// by the earliest deadline among its requests. Ends when the broker is dropped.
async fn publish_in_pipelines(
    endpoint: &Endpoint,
    timeout: Duration,
    requests: &mut mpsc::UnboundedReceiver<PublishRequest>,
) {
    let mut connection: Option<RespConnection> = None;
    let mut batch = Vec::new();
    let mut wire = Vec::new();
    let mut replies = Vec::new();
    while let Some(first) = requests.recv().await {
        let mut count = first.count;
        batch.push(first);
        // The publish that woke this task is often the first of many: the replies to the
        // previous pipeline woke each of its publishers, and tokio runs a task woken by a
        // running task right after it. So gather while yielding brings more: with 64
        // tasks publishing, pipelines then carry 63 XADDs on average, against 32 when
        // sent at once and 50 after a single yield.
        loop {
            tokio::task::yield_now().await;
            let before = count;
            while count < MAX_PUBLISH_PIPELINE
                && let Ok(request) = requests.try_recv()
            {
                count += request.count;
                batch.push(request);
            }
            if count == before || count >= MAX_PUBLISH_PIPELINE {
                break;
            }
        }
        // Requests that spent their whole timeout queued behind a stuck pipeline are not
        // sent any more.
        let now = Instant::now();
        for late in batch.extract_if(.., |request| request.deadline <= now) {
            late.answer(|| Err(timed_out(timeout).into()));
        }
        let Some(deadline) = batch.iter().map(|request| request.deadline).min() else {
            continue;
        };
        let count = batch.iter().map(|request| request.count).sum();
        wire.clear();
        for request in &batch {
            wire.extend_from_slice(&request.commands);
        }
        replies.clear();
        let failed = send_pipeline(
            &mut connection,
            endpoint,
            &wire,
            count,
            deadline,
            &mut replies,
        )
        .await
        .err()
        .map(|failure| {
            connection = None;
            failure.into_redis(endpoint.info.addr(), timeout)
        });
        if replies
            .iter()
            .any(|reply| matches!(reply, Err(line) if is_failover_line(line)))
        {
            tracing::warn!(addr = %endpoint.info.addr(), "the server refused publishes as a replica, loading, or without its primary; replacing the publishing connection");
            connection = None;
        }
        let mut answers = replies.drain(..);
        for request in batch.drain(..) {
            request.answer(|| match answers.next() {
                Some(Ok(id)) => Ok(id),
                Some(Err(line)) => Err(RespError::Server(line).into_redis()),
                None => Err(failed
                    .clone()
                    .unwrap_or_else(|| std::io::Error::other("the pipeline ended early").into())),
            });
        }
        if wire.capacity() > KEPT_BUFFER {
            wire = Vec::new();
        }
    }
}

/// Runs [`publish_in_pipelines`] until the broker is dropped. A panic there (a bug) fails
/// the publishes of its pipeline, not every publish after it: the loop starts again on
/// a new connection with the requests still queued.
pub(super) async fn keep_publishing(
    endpoint: Endpoint,
    timeout: Duration,
    mut requests: mpsc::UnboundedReceiver<PublishRequest>,
) {
    use futures_util::FutureExt;
    while let Err(panic) =
        std::panic::AssertUnwindSafe(publish_in_pipelines(&endpoint, timeout, &mut requests))
            .catch_unwind()
            .await
    {
        let message = crate::error::panic_message(&*panic);
        tracing::error!(panic = %message, "the publishing task panicked; starting it again");
    }
}

/// Why a pipeline of `XADD`s got no reply, or not every reply.
enum PipelineFailure {
    /// Connecting failed: nothing was sent.
    Connect(RespError),
    /// The connection broke or timed out after the pipeline was sent: the entries whose
    /// replies did not arrive may or may not have been written.
    Unanswered(RespError),
}

impl PipelineFailure {
    fn into_redis(self, addr: &redis::ConnectionAddr, timeout: Duration) -> redis::RedisError {
        let (error, sent) = match self {
            PipelineFailure::Connect(error) => (error, false),
            PipelineFailure::Unanswered(error) => (error, true),
        };
        let error = match error {
            RespError::Io(error) if error.kind() == std::io::ErrorKind::TimedOut => {
                RespError::Io(timed_out(timeout))
            }
            other => other,
        };
        if !sent {
            // Redis is down, or not up yet: say so, nothing was written.
            return match error {
                RespError::Io(error) => std::io::Error::new(
                    error.kind(),
                    format!("not connected to {addr}: {error}; nothing was written"),
                )
                .into(),
                other => other.into_redis(),
            };
        }
        let (kind, cause) = match error {
            RespError::Io(error) => (error.kind(), error.to_string()),
            RespError::Protocol(detail) => (std::io::ErrorKind::InvalidData, detail),
            RespError::Server(line) => (
                std::io::ErrorKind::InvalidData,
                String::from_utf8_lossy(&line).into_owned(),
            ),
        };
        std::io::Error::new(
            kind,
            format!("{cause}; the entry was sent and may or may not have been written"),
        )
        .into()
    }
}

fn timed_out(timeout: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("redis did not answer within {timeout:?}"),
    )
}

/// Sends one pipeline of `XADD`s, connecting first if there is no usable connection.
async fn send_pipeline(
    connection: &mut Option<RespConnection>,
    endpoint: &Endpoint,
    wire: &[u8],
    count: usize,
    deadline: Instant,
    replies: &mut Vec<std::result::Result<EntryId, Vec<u8>>>,
) -> std::result::Result<(), PipelineFailure> {
    // A connection idle since its last pipeline may have been closed by the server (its
    // `timeout` setting) or by something in between: sending on it would fail publishes
    // that a new connection can carry.
    if connection
        .as_mut()
        .is_some_and(|open| open.is_dirty() || open.closed_while_idle())
    {
        *connection = None;
    }
    let open = match connection {
        Some(open) => open,
        None => connection.insert(
            RespConnection::connect(endpoint, deadline)
                .await
                .map_err(PipelineFailure::Connect)?,
        ),
    };
    open.add_entries(wire, count, deadline, replies)
        .await
        .map_err(PipelineFailure::Unanswered)
}

impl RedisBroker {
    pub(super) fn send_to_publisher(
        &self,
        stream: &str,
        commands: Vec<u8>,
        count: usize,
        reply: PublishReply,
    ) -> Result<()> {
        let request = PublishRequest {
            stream: stream.into(),
            commands,
            count,
            deadline: Instant::now() + self.command_timeout,
            reply,
        };
        self.publisher
            .send(request)
            .map_err(|_| publisher_stopped())
    }
}

pub(super) fn publisher_stopped() -> Error {
    Error::Internal {
        detail: "the publishing task stopped".to_owned(),
    }
}

#[async_trait]
impl Publishing for RedisBroker {
    async fn publish(
        &self,
        stream: &str,
        max_len: Option<usize>,
        fields: Vec<EncodedField>,
    ) -> Result<EntryId> {
        let mut commands = Vec::with_capacity(xadd_len(stream, max_len, &fields));
        encode_xadd(&mut commands, stream, max_len, &fields);
        let (reply, answer) = oneshot::channel();
        self.send_to_publisher(stream, commands, 1, PublishReply::One(reply))?;
        answer.await.map_err(|_| publisher_stopped())?
    }

    async fn publish_batch(
        &self,
        stream: &str,
        max_len: Option<usize>,
        entries: &[Vec<EncodedField>],
    ) -> Result<Vec<EntryId>> {
        let len = entries
            .iter()
            .map(|fields| xadd_len(stream, max_len, fields))
            .sum();
        let mut commands = Vec::with_capacity(len);
        for fields in entries {
            encode_xadd(&mut commands, stream, max_len, fields);
        }
        let (reply, answer) = oneshot::channel();
        self.send_to_publisher(stream, commands, entries.len(), PublishReply::Batch(reply))?;
        answer.await.map_err(|_| publisher_stopped())?
    }
}
