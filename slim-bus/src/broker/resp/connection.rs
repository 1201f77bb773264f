//! A connection that speaks RESP2 over a [`Transport`]:
//! requests written in one buffer, replies parsed straight from the bytes received.

use std::io;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::decode::{Parsed, Scan, Simple, parse_entry_id, parse_read_reply_bytes, parse_simple};
use super::encode::encode_command;
use crate::broker::StreamDeliveries;
use crate::broker::transport::{self, Endpoint, Transport, within};
use crate::event::EntryId;

/// Why a request on a connection failed.
#[derive(Debug)]
pub(crate) enum RespError {
    /// The connection broke or timed out; it must be opened again.
    Io(io::Error),
    /// The server answered with an error reply (the whole line, e.g. `-NOGROUP ...`).
    Server(Vec<u8>),
    /// The server answered something the request cannot be answered with.
    Protocol(String),
}

impl From<io::Error> for RespError {
    fn from(error: io::Error) -> Self {
        RespError::Io(error)
    }
}

impl From<transport::OpenError> for RespError {
    fn from(error: transport::OpenError) -> Self {
        match error {
            transport::OpenError::Io(error) => RespError::Io(error),
            transport::OpenError::Unsupported(detail) => RespError::Protocol(detail),
        }
    }
}

/// Whether an error reply line (`-CODE detail`) carries a code that calls for a new
/// connection ([`is_failover_code`](crate::broker::is_failover_code)).
pub(crate) fn is_failover_line(line: &[u8]) -> bool {
    let line = line.strip_prefix(b"-").unwrap_or(line);
    let code = line.split(|&b| b == b' ').next().unwrap_or_default();
    crate::broker::is_failover_code(code)
}

impl RespError {
    /// As a redis-rs error, so that callers classify it like any other (e.g. by its code).
    pub(crate) fn into_redis(self) -> redis::RedisError {
        match self {
            RespError::Io(error) => error.into(),
            RespError::Server(line) => {
                let mut reply = line;
                reply.extend_from_slice(b"\r\n");
                match redis::parse_redis_value(&reply).and_then(|value| value.extract_error()) {
                    Err(error) => error,
                    Ok(_) => io::Error::other(String::from_utf8_lossy(&reply).into_owned()).into(),
                }
            }
            RespError::Protocol(detail) => {
                io::Error::new(io::ErrorKind::InvalidData, detail).into()
            }
        }
    }
}

/// One connection to the server, used by one task at a time: for reads of new entries, or
/// for publishes.
pub(crate) struct RespConnection {
    transport: Pin<Box<dyn Transport>>,
    /// Bytes received; those before `start` are parsed already.
    buffer: Vec<u8>,
    start: usize,
    /// The server's id for this connection, which `CLIENT UNBLOCK` takes (0 unless it was
    /// asked for, see [`RespConnection::connect_with_id`]).
    client_id: i64,
    /// A request was sent and its reply not read to the end (the future doing it was
    /// dropped, or reading failed), or more than the reply arrived: the connection's
    /// state is unknown and it must not be used again.
    dirty: bool,
}

impl RespConnection {
    /// A connection over a transport that is open already, before any request.
    pub(super) fn over(transport: Pin<Box<dyn Transport>>) -> Self {
        RespConnection {
            transport,
            buffer: Vec::with_capacity(64 * 1024),
            start: 0,
            client_id: 0,
            dirty: false,
        }
    }

    /// Connects, logs in and selects the database as `endpoint` says, by `deadline`.
    pub(crate) async fn connect(endpoint: &Endpoint, deadline: Instant) -> Result<Self, RespError> {
        let info = &endpoint.info;
        let transport = transport::open(endpoint, deadline).await?;
        let mut connection = RespConnection::over(transport);
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(username) = settings.username() {
                auth.push(username.as_bytes());
            }
            auth.push(password.as_bytes());
            connection.simple(&auth, deadline).await?;
        }
        if settings.db() != 0 {
            let db = settings.db().to_string();
            connection
                .simple(&[b"SELECT", db.as_bytes()], deadline)
                .await?;
        }
        Ok(connection)
    }

    /// Connects as [`connect`](Self::connect) does, and asks the server for the
    /// connection's id, which a blocked read needs to be woken.
    pub(crate) async fn connect_with_id(
        endpoint: &Endpoint,
        deadline: Instant,
    ) -> Result<Self, RespError> {
        let mut connection = Self::connect(endpoint, deadline).await?;
        connection.client_id = match connection.simple(&[b"CLIENT", b"ID"], deadline).await? {
            Simple::Int(id) => id,
            Simple::Status => {
                return Err(RespError::Protocol(
                    "CLIENT ID did not answer an integer".to_owned(),
                ));
            }
        };
        Ok(connection)
    }

    pub(crate) fn client_id(&self) -> i64 {
        self.client_id
    }

    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Whether the server closed the connection, or sent something nobody asked for,
    /// since the last reply. Looks without waiting: between requests nothing should be
    /// there to read.
    pub(crate) fn closed_while_idle(&mut self) -> bool {
        let mut probe = [0u8; 1];
        let mut probe = tokio::io::ReadBuf::new(&mut probe);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        self.transport
            .as_mut()
            .poll_read(&mut cx, &mut probe)
            .is_ready()
    }

    /// Sends `XREADGROUP` with `args` (everything after the command name) and parses the
    /// reply into deliveries, waiting for it until `deadline`.
    pub(crate) async fn read_group(
        &mut self,
        args: &[&[u8]],
        streams: &[Arc<str>],
        deadline: Instant,
    ) -> Result<Vec<StreamDeliveries>, RespError> {
        self.send(args, deadline).await?;
        let batches = self
            .receive(deadline, |bytes| parse_read_reply_bytes(bytes, streams))
            .await;
        self.settle(batches)
    }

    /// Sends `commands`, `count` `XADD`s encoded by [`encode_xadd`](super::encode_xadd), and pushes each one's
    /// reply onto `replies` as it arrives: the new entry's id, or the error line of an
    /// `XADD` the server refused. An `Err` means the connection broke (or the deadline
    /// passed) after `replies` received the replies that did arrive.
    pub(crate) async fn add_entries(
        &mut self,
        commands: &[u8],
        count: usize,
        deadline: Instant,
        replies: &mut Vec<Result<EntryId, Vec<u8>>>,
    ) -> Result<(), RespError> {
        self.dirty = true;
        self.write(commands, deadline).await?;
        for _ in 0..count {
            match self.receive(deadline, parse_entry_id).await {
                Ok(id) => replies.push(Ok(id)),
                Err(RespError::Server(line)) => replies.push(Err(line)),
                Err(error) => return Err(error),
            }
        }
        self.dirty = self.start < self.buffer.len();
        Ok(())
    }

    /// `ASKING`: the next command on this connection is served for a slot the node is
    /// importing (after an `ASK` redirect).
    pub(crate) async fn asking(&mut self, deadline: Instant) -> Result<(), RespError> {
        self.simple(&[b"ASKING"], deadline).await.map(drop)
    }

    /// A command whose reply is `+OK`-like or an integer.
    async fn simple(&mut self, args: &[&[u8]], deadline: Instant) -> Result<Simple, RespError> {
        self.send(args, deadline).await?;
        let reply = self.receive(deadline, parse_simple).await;
        self.settle(reply)
    }

    async fn send(&mut self, args: &[&[u8]], deadline: Instant) -> Result<(), RespError> {
        let mut request = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
        encode_command(&mut request, args.len(), args.iter().copied());
        self.dirty = true;
        self.write(&request, deadline).await
    }

    /// Writes `bytes` out. The flush matters for TLS, where written bytes may wait in
    /// the session until then; for TCP and Unix sockets it does nothing.
    async fn write(&mut self, bytes: &[u8], deadline: Instant) -> Result<(), RespError> {
        within(deadline, async {
            self.transport.write_all(bytes).await?;
            self.transport.flush().await
        })
        .await??;
        Ok(())
    }

    /// After the whole reply to a request: the connection can serve the next request if
    /// the reply was read to its end (an error reply included) and nothing followed it.
    fn settle<T>(&mut self, reply: Result<T, RespError>) -> Result<T, RespError> {
        if matches!(reply, Ok(_) | Err(RespError::Server(_))) {
            self.dirty = self.start < self.buffer.len();
        }
        reply
    }

    /// Reads until a whole reply is there, then parses it with `parse`.
    async fn receive<T>(
        &mut self,
        deadline: Instant,
        parse: impl FnOnce(&[u8]) -> Parsed<T>,
    ) -> Result<T, RespError> {
        let mut scan = Scan::start();
        let len = loop {
            match scan.reply_len(&self.buffer[self.start..]) {
                Ok(Some(len)) => break len,
                Err(detail) => return Err(RespError::Protocol(detail)),
                Ok(None) => {
                    // Replies to a pipeline are parsed one after another from one buffer:
                    // parsed bytes are dropped only here, before reading more, and not
                    // after each reply, which would move the rest of the buffer each time.
                    self.buffer.drain(..self.start);
                    self.start = 0;
                    self.buffer.reserve(16 * 1024);
                    let read =
                        within(deadline, self.transport.read_buf(&mut self.buffer)).await??;
                    if read == 0 {
                        return Err(RespError::Io(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
            }
        };
        let outcome = match parse(&self.buffer[self.start..self.start + len]) {
            Parsed::Done(value, used) if used == len => Ok(value),
            Parsed::ServerError(line, used) if used == len => Err(RespError::Server(line)),
            Parsed::Done(..) | Parsed::ServerError(..) => Err(RespError::Protocol(
                "a reply holds more than the request can be answered with".to_owned(),
            )),
            Parsed::Invalid(detail) => Err(RespError::Protocol(detail)),
            Parsed::Incomplete => Err(RespError::Protocol(
                "a reply is shorter than its headers say".to_owned(),
            )),
        };
        self.consume(len);
        outcome
    }

    fn consume(&mut self, used: usize) {
        self.start += used;
        if self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        }
    }
}
