//! Publishing: `XADD`s encoded once and sent in pipelines over a connection of their own.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{RedisBroker, classify};
use crate::broker::Publishing;
use crate::broker::resp::{RespConnection, RespError, encode_xadd, is_failover_line, xadd_len};
use crate::broker::topology::{NodeAddr, Redirect};
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
    /// One outcome per `XADD`: a cluster publish sends again those redirected elsewhere.
    Each(oneshot::Sender<Vec<Result<EntryId>>>),
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
            PublishReply::Each(reply) => {
                let _ = reply.send((0..self.count).map(|_| next()).collect());
            }
        }
    }
}

/// How long a cluster publish whose master refused the connection waits before it asks
/// again where the slot is served.
const REFUSED_WAIT: Duration = Duration::from_millis(50);

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
            failure.into_redis(&endpoint.info, timeout)
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
    fn into_redis(self, info: &redis::ConnectionInfo, timeout: Duration) -> redis::RedisError {
        let addr = info.addr();
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
                other => {
                    let error = other.into_redis();
                    if !crate::consumer::is_refused_access(&error) {
                        return error;
                    }
                    // Named with the URL (its password hidden) whose credentials these are.
                    redis::RedisError::from((
                        redis::ErrorKind::AuthenticationFailed,
                        "refused credentials",
                        format!(
                            "connecting to {}: {} {}; nothing was written",
                            super::commands::redacted_url_of(info),
                            error.code().unwrap_or("refused"),
                            error.detail().unwrap_or_default()
                        ),
                    ))
                }
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

/// The publishing tasks of a broker: one for the one server, or one per master of a
/// cluster, each started on the first publish there.
pub(super) enum Publishers {
    One(mpsc::UnboundedSender<PublishRequest>),
    PerMaster(std::sync::Mutex<HashMap<NodeAddr, mpsc::UnboundedSender<PublishRequest>>>),
}

impl Publishers {
    /// The task for the one server behind `endpoint`, started now.
    pub(super) fn one(endpoint: Endpoint, timeout: Duration) -> Self {
        let (publisher, requests) = mpsc::unbounded_channel();
        tokio::spawn(keep_publishing(endpoint, timeout, requests));
        Publishers::One(publisher)
    }

    pub(super) fn per_master() -> Self {
        Publishers::PerMaster(std::sync::Mutex::new(HashMap::new()))
    }
}

impl RedisBroker {
    /// Queues `count` encoded `XADD`s of `stream` for the publishing task of the server
    /// (the master) that serves it, to be answered by `deadline`.
    pub(super) async fn send_to_publisher(
        &self,
        stream: &str,
        commands: Vec<u8>,
        count: usize,
        deadline: Instant,
        reply: PublishReply,
    ) -> Result<()> {
        let request = PublishRequest {
            stream: stream.into(),
            commands,
            count,
            deadline,
            reply,
        };
        let publisher = match &self.publishers {
            Publishers::One(publisher) => {
                return publisher.send(request).map_err(|_| publisher_stopped());
            }
            Publishers::PerMaster(publishers) => {
                let key = self.topology.connection_key(stream);
                let node = self
                    .topology
                    .node(key)
                    .await?
                    .ok_or_else(publisher_stopped)?;
                let mut publishers = publishers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                publishers
                    .entry(node)
                    .or_insert_with_key(|node| {
                        let (publisher, requests) = mpsc::unbounded_channel();
                        let endpoint = self.topology.endpoint(Some(node));
                        tokio::spawn(keep_publishing(endpoint, self.command_timeout, requests));
                        publisher
                    })
                    .clone()
            }
        };
        publisher.send(request).map_err(|_| publisher_stopped())
    }

    /// Publishes to a stream of a cluster, one `XADD` per entry of `entries`: those the
    /// server redirects are sent again where it says, following `MOVED` (the slot's new
    /// master) and `ASK` (with `ASKING`, while the slot migrates), within the command
    /// timeout. The ids in order, or the first error that is not a redirect.
    async fn publish_on_cluster(
        &self,
        stream: &str,
        entries: Vec<Vec<u8>>,
    ) -> Result<Vec<EntryId>> {
        let deadline = Instant::now() + self.command_timeout;
        let mut ids: Vec<Option<EntryId>> = vec![None; entries.len()];
        let mut asked: Option<Redirect> = None;
        loop {
            let unsent: Vec<usize> = (0..entries.len()).filter(|&i| ids[i].is_none()).collect();
            let mut wire = Vec::new();
            if asked.is_none() {
                wire.reserve(unsent.iter().map(|&i| entries[i].len()).sum());
                for &i in &unsent {
                    wire.extend_from_slice(&entries[i]);
                }
            }
            let outcomes = match asked.take() {
                Some(redirect) => {
                    let unsent_entries: Vec<&[u8]> =
                        unsent.iter().map(|&i| entries[i].as_slice()).collect();
                    self.publish_asking(stream, &redirect, &unsent_entries, deadline)
                        .await
                }
                None => {
                    let (reply, answer) = oneshot::channel();
                    let reply = PublishReply::Each(reply);
                    self.send_to_publisher(stream, wire, unsent.len(), deadline, reply)
                        .await?;
                    answer.await.map_err(|_| publisher_stopped())?
                }
            };
            let mut redirected = None;
            let mut refused = None;
            for (&i, outcome) in unsent.iter().zip(outcomes) {
                match outcome {
                    Ok(id) => ids[i] = Some(id),
                    Err(error) => match redirect_of(&error) {
                        Some(redirect) => {
                            redirected.get_or_insert(redirect);
                        }
                        // The master refused the connection: nothing was written, and
                        // once the cluster names the slot's new master (a replica took
                        // over) it goes there, within the deadline.
                        None if is_refusal(&error) && Instant::now() < deadline => {
                            refused.get_or_insert(error);
                        }
                        None => {
                            // The master may be gone: the next publish asks the cluster
                            // where its slot is served now.
                            if matches!(&error, Error::Redis { source, .. } if source.code().is_none())
                            {
                                self.topology.connection_lost();
                            }
                            return Err(partly_written(stream, error, &ids));
                        }
                    },
                }
            }
            if refused.is_some() {
                self.topology.connection_lost();
                tokio::time::sleep(
                    REFUSED_WAIT.min(deadline.saturating_duration_since(Instant::now())),
                )
                .await;
                continue;
            }
            let Some(redirect) = redirected else {
                return Ok(ids.into_iter().flatten().collect());
            };
            if Instant::now() >= deadline {
                let written = ids.iter().flatten().count();
                return Err(Error::Timeout {
                    action: format!(
                        "publishing to stream `{stream}` while its hash slot moves ({written} of {} entries written)",
                        entries.len()
                    ),
                    timeout: self.command_timeout,
                });
            }
            if redirect.ask {
                asked = Some(redirect);
            } else {
                self.topology.moved(redirect.slot, redirect.node);
            }
        }
    }

    /// Sends `XADD`s over a connection of their own to the node an `ASK` named, each
    /// after an `ASKING` of its own (it holds for one command): during a migration the
    /// importing node serves them only then. One outcome per entry, in order.
    async fn publish_asking(
        &self,
        stream: &str,
        redirect: &Redirect,
        entries: &[&[u8]],
        deadline: Instant,
    ) -> Vec<Result<EntryId>> {
        let action = || format!("publishing to stream `{stream}`");
        let endpoint = self.topology.endpoint(Some(&redirect.node));
        let mut outcomes: Vec<Result<EntryId>> = Vec::with_capacity(entries.len());
        let mut replies = Vec::with_capacity(1);
        let sent = async {
            let mut connection = RespConnection::connect(&endpoint, deadline).await?;
            for entry in entries {
                connection.asking(deadline).await?;
                replies.clear();
                connection
                    .add_entries(entry, 1, deadline, &mut replies)
                    .await?;
                outcomes.extend(replies.drain(..).map(|reply| {
                    reply.map_err(|line| {
                        classify(stream, RespError::Server(line).into_redis(), action)
                    })
                }));
            }
            Ok::<_, RespError>(())
        }
        .await;
        if let Err(error) = sent {
            let cause = crate::error::report(&error.into_redis());
            while outcomes.len() < entries.len() {
                let error = std::io::Error::other(format!(
                    "{cause}; the entry may or may not have been written"
                ));
                outcomes.push(Err(Error::redis(action(), error.into())));
            }
        }
        outcomes
    }
}

/// Whether `error` is a refused connection: nothing was sent.
fn is_refusal(error: &Error) -> bool {
    matches!(error, Error::Redis { source, .. } if source.is_connection_refusal())
}

/// `error`, saying how many of the entries were written before it when some were (on an
/// earlier round, before a redirect).
fn partly_written(stream: &str, error: Error, ids: &[Option<EntryId>]) -> Error {
    let written = ids.iter().flatten().count();
    match error {
        Error::Redis { source, .. } if written > 0 => Error::redis(
            format!(
                "publishing to stream `{stream}` ({written} of {} entries written before this failure)",
                ids.len()
            ),
            source.into_inner(),
        ),
        other => other,
    }
}

/// The `MOVED` or `ASK` an error is, if it is one.
fn redirect_of(error: &Error) -> Option<Redirect> {
    let Error::Redis { source, .. } = error else {
        return None;
    };
    let (addr, slot) = source.redirect_node()?;
    let (host, port) = addr.rsplit_once(':')?;
    Some(Redirect {
        ask: source.code() == Some("ASK"),
        slot,
        node: NodeAddr {
            host: host.into(),
            port: port.parse().ok()?,
        },
    })
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
        if self.topology.cluster().is_some() {
            let mut ids = self.publish_on_cluster(stream, vec![commands]).await?;
            return ids.pop().ok_or_else(publisher_stopped);
        }
        let (reply, answer) = oneshot::channel();
        let deadline = Instant::now() + self.command_timeout;
        self.send_to_publisher(stream, commands, 1, deadline, PublishReply::One(reply))
            .await?;
        answer.await.map_err(|_| publisher_stopped())?
    }

    async fn publish_batch(
        &self,
        stream: &str,
        max_len: Option<usize>,
        entries: &[Vec<EncodedField>],
    ) -> Result<Vec<EntryId>> {
        if self.topology.cluster().is_some() {
            let commands = entries
                .iter()
                .map(|fields| {
                    let mut commands = Vec::with_capacity(xadd_len(stream, max_len, fields));
                    encode_xadd(&mut commands, stream, max_len, fields);
                    commands
                })
                .collect();
            return self.publish_on_cluster(stream, commands).await;
        }
        let len = entries
            .iter()
            .map(|fields| xadd_len(stream, max_len, fields))
            .sum();
        let mut commands = Vec::with_capacity(len);
        for fields in entries {
            encode_xadd(&mut commands, stream, max_len, fields);
        }
        let (reply, answer) = oneshot::channel();
        let deadline = Instant::now() + self.command_timeout;
        self.send_to_publisher(
            stream,
            commands,
            entries.len(),
            deadline,
            PublishReply::Batch(reply),
        )
        .await?;
        answer.await.map_err(|_| publisher_stopped())?
    }
}
