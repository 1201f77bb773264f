//! The Redis backend: reads of new entries and publishes over connections of their own
//! (see [`super::resp`]), everything else over a managed redis-rs connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Value};
use tokio::time::Instant;

use self::commands::{CommandConnection, TimedConnection};
use super::resp::{Endpoint, RespConnection, RespError, encode_xadd, is_failover_line, xadd_len};
use super::{
    Broker, ClaimPage, DeadLetterMove, Delivery, EntryFields, GroupStats, LeaseState, RawFields,
    StreamDeliveries, is_supported_version, trimmed_count_key,
};
use crate::codec::EncodedField;
use crate::config::StartFrom;
use crate::dead_letter::{dlq_error, unpack_fields};
use crate::error::{Error, Result, server_code};
use crate::event::EntryId;
use crate::inspect::{PendingEntry, StreamStatus};
use crate::tls::Tls;

mod commands;
mod inspect;

/// How often a wake retries before the reader's block reaches the server (1 ms apart).
const WAKE_ATTEMPTS: usize = 100;

#[cfg(unix)]
fn is_unix_socket(addr: &redis::ConnectionAddr) -> bool {
    matches!(addr, redis::ConnectionAddr::Unix(_))
}

#[cfg(not(unix))]
fn is_unix_socket(_: &redis::ConnectionAddr) -> bool {
    false
}

/// How long connecting may take before it counts as a failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct RedisBroker {
    /// Where the read and publish connections go.
    endpoint: Endpoint,
    /// Acks, claims, scripts and group management. Never blocks on the server, so its
    /// response timeout can stay short.
    commands: Arc<CommandConnection>,
    /// `XREADGROUP ... BLOCK`, which holds its connection for the whole block time, so it
    /// gets a connection of its own, opened on first use and again after it broke.
    read_connection: tokio::sync::Mutex<Option<RespConnection>>,
    /// `XREAD ... BLOCK` of [`Broker::read_after`], for the same reason.
    tail_connection: tokio::sync::Mutex<Option<RespConnection>>,
    command_timeout: Duration,
    dead_letter_script: redis::Script,
    replay_script: redis::Script,
    idle_consumers_script: redis::Script,
    hold_lease_script: redis::Script,
    release_lease_script: redis::Script,
    trim_acked_script: redis::Script,
    /// Whether a read blocks, and whether a wake came while none did.
    reader: Mutex<ReaderState>,
    /// Publishes go to a task that sends them in pipelines.
    publisher: mpsc::UnboundedSender<PublishRequest>,
}

/// Encoded `XADD`s waiting to be sent, from one `publish` or `publish_batch`.
struct PublishRequest {
    stream: Box<str>,
    /// `count` commands, as [`encode_xadd`] writes them.
    commands: Vec<u8>,
    count: usize,
    /// The call's command timeout runs out here, however long it waited in the queue.
    deadline: Instant,
    reply: PublishReply,
}

enum PublishReply {
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
async fn keep_publishing(
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

#[derive(Default)]
struct ReaderState {
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

impl RedisBroker {
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
        let (new_id,): (Value,) = pipe
            .query_async(&mut self.commands())
            .await
            .map_err(|e| dlq_error("replaying from", dead_letters, e))?;
        entry_id(&new_id).ok_or_else(|| {
            unexpected(
                format!("replaying from dead-letter stream `{dead_letters}`"),
                "XADD did not return an entry id",
                &new_id,
            )
        })
    }

    /// A broker for the server `client` names, connecting in the background: this
    /// fails only for an address the bus cannot use, never because Redis is down.
    pub(crate) fn new(client: Client, tls: Option<Tls>, command_timeout: Duration) -> Result<Self> {
        let addr = client.get_connection_info().addr();
        let supported = match addr {
            redis::ConnectionAddr::Tcp(..) => true,
            redis::ConnectionAddr::TcpTls { insecure, .. } => !insecure && tls.is_some(),
            other => is_unix_socket(other),
        };
        if !supported {
            return Err(Error::config(
                "url",
                format!(
                    "{addr} is not supported: use redis:// (TCP), rediss:// (TLS, without #insecure) or a Unix socket"
                ),
            ));
        }
        let endpoint = Endpoint {
            info: client.get_connection_info().clone(),
            tls: tls.map(|tls| tls.connector),
        };
        let commands = CommandConnection::open_in_background(client.clone(), command_timeout);
        let (publisher, requests) = mpsc::unbounded_channel();
        tokio::spawn(keep_publishing(endpoint.clone(), command_timeout, requests));
        Ok(RedisBroker {
            endpoint,
            commands,
            publisher,
            read_connection: tokio::sync::Mutex::new(None),
            tail_connection: tokio::sync::Mutex::new(None),
            command_timeout,
            dead_letter_script: redis::Script::new(DEAD_LETTER_SCRIPT),
            replay_script: redis::Script::new(REPLAY_SCRIPT),
            idle_consumers_script: redis::Script::new(IDLE_CONSUMERS_SCRIPT),
            hold_lease_script: redis::Script::new(HOLD_LEASE_SCRIPT),
            release_lease_script: redis::Script::new(RELEASE_LEASE_SCRIPT),
            trim_acked_script: redis::Script::new(include_str!("../scripts/trim_acked.lua")),
            reader: Mutex::new(ReaderState::default()),
        })
    }

    fn send_to_publisher(
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

    fn commands(&self) -> TimedConnection {
        self.commands.handle()
    }
}

fn publisher_stopped() -> Error {
    Error::Internal {
        detail: "the publishing task stopped".to_owned(),
    }
}

/// What a failed first connection may mean when its URL and the port disagree about TLS
/// (a TLS port closes on the plain bytes of `redis://`, a plain port answers a TLS
/// handshake with nothing or with something that is not TLS), or when the handshake
/// failed: which setting to look at.
fn wrong_transport_hint(addr: &redis::ConnectionAddr, error: &redis::RedisError) -> &'static str {
    match addr {
        redis::ConnectionAddr::Tcp(..)
            if error.is_connection_dropped() && !error.is_connection_refusal() =>
        {
            " (the server closed the connection at once: if this port wants TLS, use a rediss:// URL)"
        }
        // rustls reports bytes that are not TLS as a corrupt message.
        redis::ConnectionAddr::TcpTls { .. }
            if error.is_timeout() || error.to_string().contains("corrupt message") =>
        {
            " over TLS (no TLS handshake came back: if this port does not speak TLS, use a redis:// URL)"
        }
        redis::ConnectionAddr::TcpTls { .. }
            if error.to_string().contains("invalid peer certificate") =>
        {
            " over TLS (the server's certificate is not trusted: check tls_ca_cert)"
        }
        redis::ConnectionAddr::TcpTls { .. }
            if error.to_string().contains("received fatal alert") =>
        {
            " over TLS (the server refused the handshake: check tls_client_cert and tls_client_key)"
        }
        _ => "",
    }
}

pub(super) async fn manager(
    client: &Client,
    response_timeout: Duration,
) -> Result<ConnectionManager> {
    // The bus's own loops back off between attempts, so a reconnect fails within the
    // command timeout rather than holding every caller through rounds of retries: redis-rs
    // makes two connection attempts even without retries, each given half of it.
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT.min(response_timeout / 2)))
        .set_response_timeout(Some(response_timeout))
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1))
        .set_number_of_retries(0);
    let action = || format!("connecting to {}", client.get_connection_info().addr());
    match tokio::time::timeout(
        CONNECT_TIMEOUT * 2,
        ConnectionManager::new_with_config(client.clone(), config),
    )
    .await
    {
        Ok(Ok(manager)) => Ok(manager),
        Ok(Err(source)) => {
            let hint = wrong_transport_hint(client.get_connection_info().addr(), &source);
            Err(Error::redis(format!("{}{hint}", action()), source))
        }
        Err(_) => Err(Error::Timeout {
            action: action(),
            timeout: CONNECT_TIMEOUT * 2,
        }),
    }
}

#[async_trait]
impl Broker for RedisBroker {
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
            _ => RespConnection::connect_with_id(&self.endpoint, Instant::now() + CONNECT_TIMEOUT)
                .await
                .map_err(|e| {
                    let addr = self.endpoint.info.addr().to_string();
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
                if server_code(&error).as_deref() == Some("WRONGTYPE") {
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
            .find(|e| server_code(e).as_deref() != Some("WRONGTYPE"))
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
                Err(e) if server_code(&e).as_deref() == Some("WRONGTYPE") => Ok(Value::Nil),
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
        let mut invocation = self.dead_letter_script.key(stream);
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
        let (moved, trimmed): (i64, u64) = invocation
            .invoke_async(&mut self.commands())
            .await
            .map_err(|e| dlq_error("moving an entry to", dead_letters, e))?;
        Ok(match moved {
            1 => DeadLetterMove::Moved { trimmed },
            -1 => DeadLetterMove::Deleted,
            _ => DeadLetterMove::NotPending,
        })
    }

    async fn trim_acked(&self, stream: &str) -> Result<u64> {
        let action = || format!("trimming what every group acknowledged from stream `{stream}`");
        match self
            .trim_acked_script
            .key(stream)
            .invoke_async(&mut self.commands())
            .await
        {
            Ok(trimmed) => Ok(trimmed),
            Err(e) => Err(self.name_type(classify(stream, e, action)).await),
        }
    }

    async fn stream_len(&self, stream: &str) -> Result<u64> {
        redis::cmd("XLEN")
            .arg(stream)
            .query_async(&mut self.commands())
            .await
            .map_err(|e| classify(stream, e, || format!("measuring stream `{stream}`")))
    }

    async fn ping(&self) -> Result<()> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.commands())
            .await
            .map_err(|e| Error::redis("pinging the server", e))
    }

    async fn remove_idle_consumers(
        &self,
        stream: &str,
        group: &str,
        min_idle: Duration,
        except: &str,
    ) -> Result<Vec<String>> {
        let mut invocation = self.idle_consumers_script.key(stream);
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

    async fn check_version(&self) -> Result<()> {
        let addr = self.endpoint.info.addr().to_string();
        let info: String = match redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.commands())
            .await
        {
            Ok(info) => info,
            // A user without the right to INFO may still have all it needs.
            Err(e) if server_code(&e).as_deref() == Some("NOPERM") => {
                tracing::debug!(%addr, "INFO is not permitted; not checking the server's version");
                return Ok(());
            }
            Err(e) => {
                return Err(Error::redis(
                    format!("reading the version of the server at {addr}"),
                    e,
                ));
            }
        };
        // Valkey reports the Redis version it is compatible with here too.
        match info
            .lines()
            .find_map(|line| line.strip_prefix("redis_version:"))
        {
            Some(version) if !is_supported_version(version) => Err(Error::UnsupportedServer {
                addr,
                version: version.trim().to_owned(),
                required: "7.0",
            }),
            _ => Ok(()),
        }
    }

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
            Err(e) if e.code() == Some("ERR") => None,
            Err(e) => return Err(self.name_type(classify(stream, e, action)).await),
        };
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(stream);
        pipe.cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg("-")
            .arg("+")
            .arg(1);
        pipe.cmd("XLEN").arg(dead_letters);
        pipe.cmd("GET").arg(trimmed_count_key(dead_letters));
        let (length, oldest, dead, trimmed): (u64, Value, u64, Option<u64>) = match info {
            Some(_) => pipe
                .query_async(&mut self.commands())
                .await
                .map_err(|e| classify(stream, e, action))?,
            None => (0, Value::Nil, 0, None),
        };
        let oldest_pending_idle = match oldest {
            Value::Array(rows) => rows.into_iter().next().and_then(|row| match row {
                Value::Array(row) => match row.get(2) {
                    Some(Value::Int(idle)) => {
                        Some(Duration::from_millis(u64::try_from(*idle).unwrap_or(0)))
                    }
                    _ => None,
                },
                _ => None,
            }),
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

    async fn replay(
        &self,
        dead_letters: &str,
        origin: &str,
        id: EntryId,
    ) -> Result<Option<EntryId>> {
        let mut invocation = self.replay_script.key(dead_letters);
        invocation.key(origin).arg(id);
        let reply: Value = invocation
            .invoke_async(&mut self.commands())
            .await
            .map_err(|e| dlq_error("replaying from", dead_letters, e))?;
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

    async fn hold_lease(&self, key: &str, holder: &str, ttl: Duration) -> Result<LeaseState> {
        let mut invocation = self.hold_lease_script.key(key);
        invocation.arg(holder).arg(millis(ttl).max(1));
        let action = || format!("taking the lease `{key}`");
        let reply: Value = invocation
            .invoke_async(&mut self.commands())
            .await
            .map_err(|e| Error::redis(action(), e))?;
        match reply {
            Value::Array(items) => match items.as_slice() {
                [Value::Int(1)] => Ok(LeaseState::Held),
                [Value::Int(0), holder, Value::Int(remaining)] => {
                    let holder = match holder {
                        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                        other => format!("{other:?}"),
                    };
                    Ok(LeaseState::Taken {
                        holder,
                        remaining: Duration::from_millis(u64::try_from(*remaining).unwrap_or(0)),
                    })
                }
                _ => Err(unexpected(action(), "a lease state", &Value::Array(items))),
            },
            other => Err(unexpected(action(), "a lease state", &other)),
        }
    }

    async fn release_lease(&self, key: &str, holder: &str) -> Result<()> {
        let mut invocation = self.release_lease_script.key(key);
        invocation.arg(holder);
        invocation
            .invoke_async::<i64>(&mut self.commands())
            .await
            .map(drop)
            .map_err(|e| Error::redis(format!("releasing the lease `{key}`"), e))
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

    async fn delete_key(&self, stream: &str) -> Result<()> {
        redis::cmd("DEL")
            .arg(stream)
            .query_async(&mut self.commands())
            .await
            .map_err(|e| Error::redis(format!("deleting stream `{stream}`"), e))
    }
}

impl RedisBroker {
    /// Names the type found at the key of an [`Error::WrongType`], which the server's
    /// reply does not say.
    async fn name_type(&self, error: Error) -> Error {
        match error {
            Error::WrongType { stream, .. } => self.wrong_type(&stream).await,
            other => other,
        }
    }

    /// The error for a read of several streams that one holds another type in: names the
    /// first key that is neither a stream nor missing, or is the read's own error when
    /// every key is a stream again by now.
    async fn find_wrong_type(
        &self,
        streams: &[Arc<str>],
        error: redis::RedisError,
        action: impl FnOnce() -> String,
    ) -> Error {
        let mut pipe = redis::pipe();
        for stream in streams {
            pipe.cmd("TYPE").arg(stream.as_ref());
        }
        let types: Vec<String> = match pipe.query_async(&mut self.commands()).await {
            Ok(types) => types,
            Err(_) => return Error::redis(action(), error),
        };
        streams
            .iter()
            .zip(types)
            .find(|(_, actual)| actual != "stream" && actual != "none")
            .map_or_else(
                || Error::redis(action(), error),
                |(stream, actual)| Error::WrongType {
                    stream: stream.to_string(),
                    actual,
                },
            )
    }

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
    if server_code(&error).as_deref() == Some("WRONGTYPE") {
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

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Parses an `XAUTOCLAIM` reply: `[next cursor, entries, deleted ids]`.
fn parse_autoclaim(reply: Value) -> Result<ClaimPage, String> {
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
    })
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
fn parse_read_reply_value(
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
fn parse_entry(entry: Value) -> Result<Delivery, String> {
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
fn parse_raw_entry(entry: Value) -> Result<(EntryId, Option<RawFields>), String> {
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

/// Moves a pending entry to its dead-letter stream, in one step so that it is never both
/// pending and dead-lettered, nor dead-lettered twice.
/// KEYS: origin stream, dead-letter stream, trimmed count. ARGV: group, consumer, id, max
/// len (empty for none), then metadata names and values. Returns {1, trimmed} moved,
/// {0, 0} not pending with this consumer, {-1, 0} deleted.
const DEAD_LETTER_SCRIPT: &str = r"
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #pending == 0 or pending[1][2] ~= ARGV[2] then
  return {0, 0}
end
local entry = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
if #entry == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
  return {-1, 0}
end
local fields = entry[1][2]
local args = {'XADD', KEYS[2]}
local before = 0
if ARGV[4] ~= '' then
  before = redis.call('XLEN', KEYS[2])
  args[#args + 1] = 'MAXLEN'
  args[#args + 1] = '~'
  args[#args + 1] = ARGV[4]
end
args[#args + 1] = '*'
-- unpack() takes about 8000 values at most: a larger entry's fields are packed into one
-- value, each name and value as its length, ':' and its bytes.
if #fields + #ARGV > 7900 then
  local packed = {}
  for i = 1, #fields do
    packed[i] = #fields[i] .. ':' .. fields[i]
  end
  args[#args + 1] = '@fields'
  args[#args + 1] = table.concat(packed)
else
  for i = 1, #fields, 2 do
    local name = fields[i]
    if string.sub(name, 1, 1) == '@' then
      name = '@' .. name
    end
    args[#args + 1] = name
    args[#args + 1] = fields[i + 1]
  end
end
for i = 5, #ARGV do
  args[#args + 1] = ARGV[i]
end
-- XADD before XACK: a script that fails half way is not rolled back, and an entry must
-- never be acknowledged without having been dead-lettered.
redis.call(unpack(args))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
local trimmed = 0
if ARGV[4] ~= '' then
  trimmed = before + 1 - redis.call('XLEN', KEYS[2])
  if trimmed > 0 then
    redis.call('INCRBY', KEYS[3], trimmed)
  end
end
return {1, trimmed}
";

/// Removes the consumers of a group that have been idle long enough and hold no pending
/// entries, in one step so that none gets an entry between the check and the removal
/// (`XGROUP DELCONSUMER` drops a consumer's pending entries with it).
/// KEYS: stream. ARGV: group, least idle time in ms, the calling consumer (kept).
/// Returns the names removed.
const IDLE_CONSUMERS_SCRIPT: &str = r"
local removed = {}
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then
  -- No such stream or group: nothing to remove.
  return removed
end
for _, consumer in ipairs(consumers) do
  local info = {}
  for i = 1, #consumer, 2 do
    info[consumer[i]] = consumer[i + 1]
  end
  local name = info['name']
  if name ~= ARGV[3] and info['idle'] >= tonumber(ARGV[2])
    and #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, name) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    removed[#removed + 1] = name
  end
end
return removed
";

/// Moves a dead letter back to its origin stream: original fields only, escaped names
/// restored. KEYS: dead-letter stream, origin stream. ARGV: id. Returns the new id or nil.
const REPLAY_SCRIPT: &str = r"
local entry = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #entry == 0 then
  return false
end
local fields = entry[1][2]
for i = 1, #fields, 2 do
  if fields[i] == '@fields' then
    -- Too many fields for one command from a script: the caller adds them.
    return {'@fields', fields[i + 1]}
  end
end
local args = {'XADD', KEYS[2], '*'}
for i = 1, #fields, 2 do
  local name = fields[i]
  if string.sub(name, 1, 2) == '@@' then
    args[#args + 1] = string.sub(name, 2)
    args[#args + 1] = fields[i + 1]
  elseif string.sub(name, 1, 1) ~= '@' then
    args[#args + 1] = name
    args[#args + 1] = fields[i + 1]
  end
end
if #args == 3 then
  return redis.error_reply('dead letter ' .. ARGV[1] .. ' has no original fields')
end
local id = redis.call(unpack(args))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
";

/// Takes or renews a lease (KEYS[1]) for holder ARGV[1], for ARGV[2] ms: `{1}` when the
/// caller has it now, else `{0, holder, remaining ms}`.
const HOLD_LEASE_SCRIPT: &str = r"
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return {1}
end
return {0, current, redis.call('PTTL', KEYS[1])}
";

/// Deletes a lease (KEYS[1]) if holder ARGV[1] has it.
const RELEASE_LEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
";
