//! Connections that speak RESP2 directly: the one that reads new entries, so that a read's
//! reply is parsed straight from the socket's bytes into deliveries, and the one that
//! publishes, so that an `XADD` goes from the event's fields to the socket in one buffer.
//!
//! The consumer spends most of its time reading. redis-rs first turns every reply into a
//! tree of `Value`s, which took about 13k instructions per 3-field entry, 47% of the
//! consumer's time in the `consume` benchmark (see BENCHMARKS.md); parsing the few reply
//! shapes a read can have, here, takes a fraction of that. Publishing this way skips
//! building redis-rs commands and the multiplexer's extra task: 64 concurrent publishers
//! went from 0.66x to 0.89x of a hand-written pipelined loop. Everything else (acks,
//! claims, scripts, group management) still goes through redis-rs.
//!
//! For `rediss://` URLs the same connections run over rustls (`tokio-rustls` around the
//! TCP stream), configured from the same settings as the redis-rs client.

use std::io;
use std::pin::Pin;
use std::sync::Arc;

use redis::{ConnectionAddr, ConnectionInfo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::{Delivery, StreamDeliveries};
use crate::codec::EncodedField;
use crate::event::EntryId;

/// A byte stream to the server: TCP, TLS over TCP, or a Unix socket.
trait Transport: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Transport for T {}

/// Where the connections go and how: the server's address and credentials, and for a
/// `rediss://` server the TLS connector.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub(crate) info: ConnectionInfo,
    pub(crate) tls: Option<TlsConnector>,
}

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

/// Whether an error reply line (`-CODE detail`) carries a code that calls for a new
/// connection ([`is_failover_code`](super::is_failover_code)).
pub(crate) fn is_failover_line(line: &[u8]) -> bool {
    let line = line.strip_prefix(b"-").unwrap_or(line);
    let code = line.split(|&b| b == b' ').next().unwrap_or_default();
    super::is_failover_code(code)
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
    /// Connects, logs in and selects the database as `endpoint` says, by `deadline`.
    pub(crate) async fn connect(endpoint: &Endpoint, deadline: Instant) -> Result<Self, RespError> {
        let info = &endpoint.info;
        let transport: Pin<Box<dyn Transport>> = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Box::pin(tcp(host, *port, deadline).await?),
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                ..
            } => {
                let Some(connector) = &endpoint.tls else {
                    return Err(RespError::Protocol(
                        "a TLS address without TLS settings".to_owned(),
                    ));
                };
                let name = rustls::pki_types::ServerName::try_from(host.as_str())
                    .map_err(|e| {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("`{host}` is not a name TLS can verify: {e}"),
                        )
                    })?
                    .to_owned();
                let stream = tcp(host, *port, deadline).await?;
                Box::pin(within(deadline, connector.connect(name, stream)).await??)
            }
            #[cfg(unix)]
            ConnectionAddr::Unix(path) => {
                Box::pin(within(deadline, tokio::net::UnixStream::connect(path)).await??)
            }
            other => {
                return Err(RespError::Protocol(format!(
                    "slim-bus speaks to Redis over TCP, TLS with a verified certificate or a Unix socket, not {other}"
                )));
            }
        };
        let mut connection = RespConnection {
            transport,
            buffer: Vec::with_capacity(64 * 1024),
            start: 0,
            client_id: 0,
            dirty: false,
        };
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

    /// Sends `commands`, `count` `XADD`s encoded by [`encode_xadd`], and pushes each one's
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

/// Appends a command of `len` arguments to `out`, as RESP: an array of bulk strings.
fn encode_command<'a>(out: &mut Vec<u8>, len: usize, args: impl IntoIterator<Item = &'a [u8]>) {
    encode_header(out, b'*', len);
    for arg in args {
        encode_bulk(out, arg);
    }
}

fn encode_header(out: &mut Vec<u8>, kind: u8, len: usize) {
    out.push(kind);
    out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn encode_bulk(out: &mut Vec<u8>, arg: &[u8]) {
    encode_header(out, b'$', arg.len());
    out.extend_from_slice(arg);
    out.extend_from_slice(b"\r\n");
}

/// Appends `XADD stream [MAXLEN ~ max_len] * name value ...` to `out`.
pub(crate) fn encode_xadd(
    out: &mut Vec<u8>,
    stream: &str,
    max_len: Option<usize>,
    fields: &[EncodedField],
) {
    let cap_args = if max_len.is_some() { 3 } else { 0 };
    encode_header(out, b'*', 3 + cap_args + 2 * fields.len());
    encode_bulk(out, b"XADD");
    encode_bulk(out, stream.as_bytes());
    if let Some(max_len) = max_len {
        encode_bulk(out, b"MAXLEN");
        encode_bulk(out, b"~");
        encode_bulk(out, itoa::Buffer::new().format(max_len).as_bytes());
    }
    encode_bulk(out, b"*");
    for (name, value) in fields {
        encode_bulk(out, name.as_bytes());
        encode_bulk(out, value);
    }
}

/// How many bytes [`encode_xadd`] appends, at most.
pub(crate) fn xadd_len(stream: &str, max_len: Option<usize>, fields: &[EncodedField]) -> usize {
    // A header is a type byte, at most 20 digits and CRLF.
    const HEADER: usize = 23;
    let bulk = |len: usize| HEADER + len + 2;
    let cap = if max_len.is_some() {
        bulk(6) + bulk(1) + bulk(20)
    } else {
        0
    };
    HEADER
        + bulk(4)
        + bulk(stream.len())
        + cap
        + bulk(1)
        + fields
            .iter()
            .map(|(name, value)| bulk(name.len()) + bulk(value.len()))
            .sum::<usize>()
}

async fn tcp(host: &str, port: u16, deadline: Instant) -> io::Result<tokio::net::TcpStream> {
    let stream = within(deadline, tokio::net::TcpStream::connect((host, port))).await??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn within<T>(deadline: Instant, future: impl Future<Output = T>) -> io::Result<T> {
    tokio::time::timeout_at(deadline, future)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "redis did not answer in time"))
}

/// The outcome of parsing the start of a buffer.
#[derive(Debug, PartialEq)]
enum Parsed<T> {
    /// A whole reply, and how many bytes it took.
    Done(T, usize),
    /// An error reply (its line without `\r\n`), and how many bytes it took.
    ServerError(Vec<u8>, usize),
    /// The reply goes on past the buffer's end.
    Incomplete,
    Invalid(String),
}

#[derive(Debug, PartialEq)]
enum Simple {
    Status,
    Int(i64),
}

/// One entry's field names and values, kept as Redis sends them: RESP bulk strings one
/// after another in one buffer. A delivery then costs one allocation for its fields, not
/// one per name and value.
#[derive(Clone, PartialEq, Eq, Default)]
pub(crate) struct EntryFields {
    resp: Vec<u8>,
    /// How many name-value pairs `resp` holds.
    pairs: usize,
    /// Whether a name starts with `@`, noted while the names go by anyway, so that most
    /// deliveries need no second walk through their fields to look for headers.
    reserved_names: bool,
}

impl EntryFields {
    pub(crate) fn from_pairs<N: AsRef<[u8]>, V: AsRef<[u8]>>(
        pairs: impl IntoIterator<Item = (N, V)>,
    ) -> Self {
        let mut fields = EntryFields::default();
        for (name, value) in pairs {
            fields.reserved_names |= name.as_ref().starts_with(b"@");
            encode_bulk(&mut fields.resp, name.as_ref());
            encode_bulk(&mut fields.resp, value.as_ref());
            fields.pairs += 1;
        }
        fields
    }

    /// Whether a field name starts with `@`: one of the bus's own fields (a header), or
    /// an event's field with such a name, escaped.
    pub(crate) fn has_reserved_names(&self) -> bool {
        self.reserved_names
    }

    /// The `(name, value)` pairs, in the entry's order.
    pub(crate) fn pairs(&self) -> FieldPairs<'_> {
        FieldPairs {
            cursor: Cursor {
                bytes: &self.resp,
                at: 0,
            },
            left: self.pairs,
        }
    }
}

impl std::fmt::Debug for EntryFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.pairs().map(|(name, value)| {
                (
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(value),
                )
            }))
            .finish()
    }
}

/// The pairs of an [`EntryFields`].
pub(crate) struct FieldPairs<'a> {
    cursor: Cursor<'a>,
    left: usize,
}

impl<'a> Iterator for FieldPairs<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        self.left = self.left.checked_sub(1)?;
        // `EntryFields` only ever holds as many pairs of whole bulk strings as it says.
        let pair = (
            self.cursor.bulk().ok().flatten()?,
            self.cursor.bulk().ok().flatten()?,
        );
        debug_assert!(self.left > 0 || self.cursor.remaining() == 0);
        Some(pair)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for FieldPairs<'_> {}

/// A position in a buffer holding the start of a reply.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// Parsing stopped: the reply is incomplete (`None`) or invalid.
type Stop = Option<String>;

impl<'a> Cursor<'a> {
    /// Bytes not parsed yet.
    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    /// The next line, without its `\r\n`.
    fn line(&mut self) -> Result<&'a [u8], Stop> {
        let rest = &self.bytes[self.at..];
        // Header, status and error lines hold no CR of their own.
        let end = rest.iter().position(|&b| b == b'\r').ok_or(None)?;
        match rest.get(end + 1) {
            None => Err(None),
            Some(b'\n') => {
                self.at += end + 2;
                Ok(&rest[..end])
            }
            Some(_) => Err(Some("a CR without LF ends a line".to_owned())),
        }
    }

    /// A header line: its type byte and number (`*3`, `$5`, `:42`). Parsed byte by byte
    /// in one pass: every name and value of every entry starts with one.
    fn header(&mut self) -> Result<(u8, i64), Stop> {
        let bytes = self.bytes;
        let &kind = bytes.get(self.at).ok_or(None)?;
        if kind == b'-' || kind == b'+' {
            self.line()?;
            return Ok((kind, 0));
        }
        let bad = || {
            let line = &bytes[self.at..];
            let line = &line[..line.len().min(24)];
            Some(format!("a bad header `{}`", String::from_utf8_lossy(line)))
        };
        let negative = bytes.get(self.at + 1) == Some(&b'-');
        let digits = self.at + 1 + usize::from(negative);
        let mut end = digits;
        let mut number: i64 = 0;
        loop {
            match bytes.get(end) {
                None => return Err(None),
                // At most 18 digits: no RESP length or integer a publish or read gets
                // back comes near that, and the number cannot overflow.
                Some(&digit @ b'0'..=b'9') if end - digits < 18 => {
                    number = number * 10 + i64::from(digit - b'0');
                    end += 1;
                }
                Some(b'\r') if end > digits => break,
                Some(_) => return Err(bad()),
            }
        }
        match bytes.get(end + 1) {
            None => Err(None),
            Some(b'\n') => {
                self.at = end + 2;
                Ok((kind, if negative { -number } else { number }))
            }
            Some(_) => Err(bad()),
        }
    }

    /// An array's length; `None` for a nil array.
    fn array(&mut self) -> Result<Option<usize>, Stop> {
        match self.header()? {
            (b'*', -1) => Ok(None),
            (b'*', len) => usize::try_from(len)
                .map(Some)
                .map_err(|_| Some("a negative array length".to_owned())),
            (kind, _) => Err(Some(format!("expected an array, got `{}`", kind as char))),
        }
    }

    /// A bulk string's bytes; `None` for nil.
    fn bulk(&mut self) -> Result<Option<&'a [u8]>, Stop> {
        match self.header()? {
            (b'$', -1) => Ok(None),
            (b'$', len) => {
                let len = usize::try_from(len)
                    .map_err(|_| Some("a negative string length".to_owned()))?;
                if self.bytes.len() < self.at + len + 2 {
                    return Err(None);
                }
                let value = &self.bytes[self.at..self.at + len];
                if &self.bytes[self.at + len..self.at + len + 2] != b"\r\n" {
                    return Err(Some("a string is not followed by CRLF".to_owned()));
                }
                self.at += len + 2;
                Ok(Some(value))
            }
            (kind, _) => Err(Some(format!("expected a string, got `{}`", kind as char))),
        }
    }
}

/// How much of the reply at the start of the unparsed bytes is known to be there: its
/// elements up to `at` arrived whole, `left` more are due. Arrays only add to the
/// count, so a single number tracks any nesting.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Scan {
    at: usize,
    left: usize,
}

impl Scan {
    fn start() -> Scan {
        Scan { at: 0, left: 1 }
    }

    /// Goes on checking `bytes` (the same reply's bytes, perhaps more of them than last
    /// time) and returns the reply's length once all of it is there. A read's reply
    /// often arrives over several socket reads: checking only what is new keeps that
    /// linear, where parsing the whole reply again after each read was not.
    fn reply_len(&mut self, bytes: &[u8]) -> Result<Option<usize>, String> {
        let mut cursor = Cursor { bytes, at: self.at };
        while self.left > 0 {
            let children = match cursor.header() {
                Err(None) => return Ok(None),
                Err(Some(detail)) => return Err(detail),
                Ok((b'*', len)) => usize::try_from(len).unwrap_or(0),
                Ok((b'$', len)) => {
                    if let Ok(len) = usize::try_from(len) {
                        if cursor.remaining() < len + 2 {
                            return Ok(None);
                        }
                        cursor.at += len + 2;
                    }
                    0
                }
                Ok((b':' | b'+' | b'-', _)) => 0,
                Ok((kind, _)) => {
                    return Err(format!("a reply of unknown type `{}`", kind as char));
                }
            };
            // A corrupt header could claim more elements than memory can hold.
            self.left = (self.left - 1)
                .checked_add(children)
                .ok_or_else(|| "a reply claims too many elements".to_owned())?;
            self.at = cursor.at;
        }
        Ok(Some(self.at))
    }
}

/// Runs `parse` over the buffer, turning an error reply at its start into `ServerError`.
fn parse_reply<T>(
    bytes: &[u8],
    parse: impl FnOnce(&mut Cursor<'_>) -> Result<T, Stop>,
) -> Parsed<T> {
    match bytes.first() {
        None => return Parsed::Incomplete,
        Some(b'-') => {
            let mut cursor = Cursor { bytes, at: 0 };
            return match cursor.line() {
                Ok(line) => Parsed::ServerError(line.to_vec(), cursor.at),
                Err(_) => Parsed::Incomplete,
            };
        }
        Some(_) => {}
    }
    let mut cursor = Cursor { bytes, at: 0 };
    match parse(&mut cursor) {
        Ok(value) => Parsed::Done(value, cursor.at),
        Err(None) => Parsed::Incomplete,
        Err(Some(detail)) => Parsed::Invalid(detail),
    }
}

fn parse_simple(bytes: &[u8]) -> Parsed<Simple> {
    parse_reply(bytes, |cursor| match cursor.header()? {
        (b'+', _) => Ok(Simple::Status),
        (b':', n) => Ok(Simple::Int(n)),
        (kind, _) => Err(Some(format!(
            "expected a status or an integer, got `{}`",
            kind as char
        ))),
    })
}

/// Parses an `XADD` reply: the new entry's id.
fn parse_entry_id(bytes: &[u8]) -> Parsed<EntryId> {
    parse_reply(bytes, |cursor| {
        let id = cursor
            .bulk()?
            .ok_or_else(|| Some("XADD answered nil, not an entry id".to_owned()))?;
        EntryId::parse_bytes(id).ok_or_else(|| {
            Some(format!(
                "XADD answered `{}`, not an entry id",
                String::from_utf8_lossy(id)
            ))
        })
    })
}

/// Parses an `XREADGROUP` reply: nil when a block timed out, else `[stream, entries]`
/// pairs, each entry `[id, [field, value, ...]]` (the fields nil for an entry that is
/// pending but was deleted).
fn parse_read_reply_bytes(bytes: &[u8], streams: &[Arc<str>]) -> Parsed<Vec<StreamDeliveries>> {
    parse_reply(bytes, |cursor| {
        let Some(count) = cursor.array()? else {
            return Ok(Vec::new());
        };
        if count > streams.len() {
            return Err(Some(format!(
                "the reply has {count} streams, {} were read",
                streams.len()
            )));
        }
        let delivered_at = Instant::now();
        let mut batches = Vec::with_capacity(count);
        for _ in 0..count {
            if cursor.array()? != Some(2) {
                return Err(Some("a stream reply is not a pair".to_owned()));
            }
            let name = cursor
                .bulk()?
                .ok_or_else(|| Some("a nil stream name".to_owned()))?;
            let stream_index = streams
                .iter()
                .position(|s| s.as_bytes() == name)
                .ok_or_else(|| {
                    Some(format!(
                        "the reply names stream `{}`, which was not read",
                        String::from_utf8_lossy(name)
                    ))
                })?;
            let entries = cursor.array()?.unwrap_or(0);
            // Lengths come from the server: allocate for what the buffer can hold at most,
            // so a corrupt header cannot ask for gigabytes.
            let mut deliveries = Vec::with_capacity(entries.min(cursor.remaining() / 8));
            for _ in 0..entries {
                if cursor.array()? != Some(2) {
                    return Err(Some("an entry is not a pair".to_owned()));
                }
                let id = cursor
                    .bulk()?
                    .ok_or_else(|| Some("a nil entry id".to_owned()))?;
                let id = EntryId::parse_bytes(id).ok_or_else(|| {
                    Some(format!(
                        "`{}` is not an entry id",
                        String::from_utf8_lossy(id)
                    ))
                })?;
                let fields = match cursor.array()? {
                    None => None,
                    Some(flat) if flat % 2 == 0 => {
                        let start = cursor.at;
                        let mut reserved_names = false;
                        for at in 0..flat {
                            let part = cursor
                                .bulk()?
                                .ok_or_else(|| Some("a nil field name or value".to_owned()))?;
                            reserved_names |= at % 2 == 0 && part.first() == Some(&b'@');
                        }
                        Some(EntryFields {
                            resp: cursor.bytes[start..cursor.at].to_vec(),
                            pairs: flat / 2,
                            reserved_names,
                        })
                    }
                    Some(_) => {
                        return Err(Some(format!(
                            "entry {id} has an odd number of field names and values"
                        )));
                    }
                };
                deliveries.push(Delivery {
                    id,
                    fields,
                    delivery_count: 1,
                    delivered_at,
                });
            }
            batches.push(StreamDeliveries {
                stream_index,
                deliveries,
            });
        }
        Ok(batches)
    })
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    fn streams() -> Vec<Arc<str>> {
        vec!["a".into(), "user.created".into()]
    }

    const REPLY: &[u8] = b"*1\r\n*2\r\n$12\r\nuser.created\r\n*2\r\n\
        *2\r\n$3\r\n5-1\r\n*4\r\n$7\r\nuser_id\r\n$2\r\nu1\r\n$3\r\nseq\r\n$1\r\n1\r\n\
        *2\r\n$3\r\n6-0\r\n*-1\r\n";

    #[test]
    fn a_read_reply_parses_into_deliveries_by_stream() {
        let Parsed::Done(batches, used) = parse_read_reply_bytes(REPLY, &streams()) else {
            panic!("the reply did not parse");
        };
        assert_eq!(used, REPLY.len());
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].stream_index, 1);
        let deliveries = &batches[0].deliveries;
        assert_eq!(deliveries[0].id, EntryId::new(5, 1));
        assert_eq!(
            deliveries[0].fields,
            Some(EntryFields::from_pairs([("user_id", "u1"), ("seq", "1")]))
        );
        let pairs: Vec<_> = deliveries[0]
            .fields
            .as_ref()
            .expect("fields")
            .pairs()
            .collect();
        assert_eq!(
            pairs,
            [(&b"user_id"[..], &b"u1"[..]), (&b"seq"[..], &b"1"[..])]
        );
        assert_eq!(deliveries[1].id, EntryId::new(6, 0));
        assert_eq!(deliveries[1].fields, None, "a deleted entry has nil fields");
    }

    #[test]
    fn every_cut_short_reply_is_incomplete_and_what_follows_a_reply_is_left() {
        for end in 0..REPLY.len() {
            assert!(
                matches!(
                    parse_read_reply_bytes(&REPLY[..end], &streams()),
                    Parsed::Incomplete
                ),
                "cut at {end}"
            );
        }
        let mut two = REPLY.to_vec();
        two.extend_from_slice(b"*-1\r\n");
        assert!(
            matches!(parse_read_reply_bytes(&two, &streams()), Parsed::Done(_, used) if used == REPLY.len())
        );
    }

    #[test]
    fn nil_errors_and_other_replies_are_told_apart() {
        assert!(
            matches!(parse_read_reply_bytes(b"*-1\r\n", &streams()), Parsed::Done(b, 5) if b.is_empty())
        );
        let error = b"-NOGROUP No such key 'x' or consumer group 'g'\r\n";
        match parse_read_reply_bytes(error, &streams()) {
            Parsed::ServerError(line, used) => {
                assert_eq!(used, error.len());
                let redis_error = RespError::Server(line).into_redis();
                assert_eq!(redis_error.code(), Some("NOGROUP"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_read_reply_bytes(b"+OK\r\n", &streams()),
            Parsed::Invalid(_)
        ));
        assert!(matches!(
            parse_read_reply_bytes(b"*1\r\n*2\r\n$1\r\nz\r\n*0\r\n", &streams()),
            Parsed::Invalid(detail) if detail.contains("`z`")
        ));
        assert_eq!(parse_simple(b"+OK\r\n"), Parsed::Done(Simple::Status, 5));
        assert_eq!(parse_simple(b":42\r\n"), Parsed::Done(Simple::Int(42), 5));
        assert_eq!(parse_simple(b":4"), Parsed::Incomplete);
        assert_eq!(parse_simple(b":4\r"), Parsed::Incomplete);
        assert_eq!(parse_simple(b":-5\r\n"), Parsed::Done(Simple::Int(-5), 5));
        for bad in [
            &b":\r\n"[..],
            b":-\r\n",
            b":1x\r\n",
            b":12\rx",
            b":1234567890123456789\r\n",
        ] {
            assert!(matches!(parse_simple(bad), Parsed::Invalid(_)), "{bad:?}");
        }
    }

    #[test]
    fn error_lines_of_a_replica_or_a_loading_server_call_for_a_new_connection() {
        for line in [
            &b"-READONLY You can't write against a read only replica."[..],
            b"-LOADING Redis is loading the dataset in memory",
            b"-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            b"READONLY",
        ] {
            assert!(is_failover_line(line), "{}", String::from_utf8_lossy(line));
        }
        for line in [
            &b"-NOGROUP No such key"[..],
            b"-ERR READONLY is not the code",
            b"-READONLYX",
            b"",
        ] {
            assert!(!is_failover_line(line), "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn an_xadd_is_encoded_as_redis_rs_encodes_it_within_its_estimated_length() {
        let fields: Vec<EncodedField> = vec![
            ("user_id".into(), b"u1".to_vec()),
            ("user_name".into(), "Jöhn\r\nDoe".as_bytes().to_vec()),
            ("empty".into(), Vec::new()),
        ];
        let mut encoded = b"left alone".to_vec();
        encode_xadd(&mut encoded, "user.created", None, &fields);
        let expected = redis::cmd("XADD")
            .arg("user.created")
            .arg("*")
            .arg("user_id")
            .arg("u1")
            .arg("user_name")
            .arg("Jöhn\r\nDoe")
            .arg("empty")
            .arg("")
            .get_packed_command();
        assert_eq!(&encoded[..10], b"left alone");
        assert_eq!(
            String::from_utf8_lossy(&encoded[10..]),
            String::from_utf8_lossy(&expected)
        );
        assert!(xadd_len("user.created", None, &fields) >= expected.len());
    }

    #[test]
    fn a_capped_xadd_is_encoded_as_redis_rs_encodes_it_within_its_estimated_length() {
        let fields: Vec<EncodedField> = vec![("user_id".into(), b"u1".to_vec())];
        let mut encoded = Vec::new();
        encode_xadd(&mut encoded, "user.created", Some(usize::MAX), &fields);
        let expected = redis::cmd("XADD")
            .arg("user.created")
            .arg("MAXLEN")
            .arg("~")
            .arg(usize::MAX)
            .arg("*")
            .arg("user_id")
            .arg("u1")
            .get_packed_command();
        assert_eq!(
            String::from_utf8_lossy(&encoded),
            String::from_utf8_lossy(&expected)
        );
        assert!(xadd_len("user.created", Some(usize::MAX), &fields) >= expected.len());
    }

    #[test]
    fn xadd_replies_parse_into_ids_errors_or_complaints() {
        assert_eq!(
            parse_entry_id(b"$15\r\n1700000000000-7\r\n$3\r\n1-0\r\n"),
            Parsed::Done(EntryId::new(1_700_000_000_000, 7), 22)
        );
        assert_eq!(
            parse_entry_id(b"$15\r\n1700000000000-7\r"),
            Parsed::Incomplete
        );
        assert!(matches!(
            parse_entry_id(b"-WRONGTYPE Operation against a key\r\n:1\r\n"),
            Parsed::ServerError(line, 36) if line.starts_with(b"-WRONGTYPE")
        ));
        assert!(matches!(parse_entry_id(b"$-1\r\n"), Parsed::Invalid(d) if d.contains("nil")));
        assert!(
            matches!(parse_entry_id(b"$2\r\nab\r\n"), Parsed::Invalid(d) if d.contains("`ab`"))
        );
        assert!(matches!(parse_entry_id(b":1\r\n"), Parsed::Invalid(_)));
    }

    #[test]
    fn a_reply_is_found_whole_however_it_arrives() {
        for cut in 0..REPLY.len() {
            let mut scan = Scan::start();
            assert_eq!(scan.reply_len(&REPLY[..cut]), Ok(None), "cut at {cut}");
            let mut more = REPLY.to_vec();
            more.extend_from_slice(b"$3\r\nnext\r\n");
            assert_eq!(scan.reply_len(&more), Ok(Some(REPLY.len())), "cut at {cut}");
        }
        for reply in [
            &b"*-1\r\n"[..],
            b"$-1\r\n",
            b":42\r\n",
            b"+OK\r\n",
            b"-ERR no\r\n",
            b"*0\r\n",
        ] {
            assert_eq!(Scan::start().reply_len(reply), Ok(Some(reply.len())));
        }
        assert!(
            Scan::start().reply_len(b"%2\r\n").is_err(),
            "RESP3 maps are not spoken"
        );
        assert!(Scan::start().reply_len(b"*x\r\n").is_err());
        let claims = b"*999999999999999999\r\n".repeat(20);
        assert!(
            Scan::start().reply_len(&claims).is_err(),
            "nested lengths that overflow are refused, not wrapped"
        );
        // Whole as far as lengths go, but not RESP: the parser has the last word.
        let bad = b"$3\r\nabcXY";
        assert_eq!(Scan::start().reply_len(bad), Ok(Some(bad.len())));
        assert!(matches!(parse_entry_id(bad), Parsed::Invalid(_)));
    }
}
