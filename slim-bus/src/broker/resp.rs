//! The connection that reads new entries: RESP2 spoken directly, so that a read's reply is
//! parsed straight from the socket's bytes into deliveries.
//!
//! The consumer spends most of its time reading. redis-rs first turns every reply into a
//! tree of `Value`s, which took about 13k instructions per 3-field entry, 47% of the
//! consumer's time in the `consume` benchmark (see BENCHMARKS.md); parsing the few reply
//! shapes a read can have, here, takes a fraction of that. Everything else still goes
//! through redis-rs.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::{Delivery, RawFields, StreamDeliveries};
use crate::event::EntryId;

/// A byte stream to the server: TCP or a Unix socket.
trait Transport: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Transport for T {}

/// Why a request on the read connection failed.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The connection broke or timed out; it must be opened again.
    Io(io::Error),
    /// The server answered with an error reply (the whole line, e.g. `-NOGROUP ...`).
    Server(Vec<u8>),
    /// The server answered something a read cannot answer.
    Protocol(String),
}

impl From<io::Error> for ReadError {
    fn from(error: io::Error) -> Self {
        ReadError::Io(error)
    }
}

impl ReadError {
    /// As a redis-rs error, so that callers classify it like any other (e.g. by its code).
    pub(crate) fn into_redis(self) -> redis::RedisError {
        match self {
            ReadError::Io(error) => error.into(),
            ReadError::Server(line) => {
                let mut reply = line;
                reply.extend_from_slice(b"\r\n");
                match redis::parse_redis_value(&reply).and_then(|value| value.extract_error()) {
                    Err(error) => error,
                    Ok(_) => io::Error::other(String::from_utf8_lossy(&reply).into_owned()).into(),
                }
            }
            ReadError::Protocol(detail) => {
                io::Error::new(io::ErrorKind::InvalidData, detail).into()
            }
        }
    }
}

/// One connection used only for reads of new entries.
pub(crate) struct ReadConnection {
    transport: Pin<Box<dyn Transport>>,
    buffer: Vec<u8>,
    /// The server's id for this connection, which `CLIENT UNBLOCK` takes.
    client_id: i64,
    /// A request was sent and its reply not read to the end: the future doing it was
    /// dropped, so the connection's state is unknown and it must not be used again.
    dirty: bool,
}

impl ReadConnection {
    /// Connects, logs in and selects the database as `info` says, within `timeout`.
    pub(crate) async fn connect(
        info: &ConnectionInfo,
        timeout: Duration,
    ) -> Result<Self, ReadError> {
        let deadline = Instant::now() + timeout;
        let transport: Pin<Box<dyn Transport>> = match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let stream = within(
                    deadline,
                    tokio::net::TcpStream::connect((host.as_str(), *port)),
                )
                .await??;
                stream.set_nodelay(true)?;
                Box::pin(stream)
            }
            #[cfg(unix)]
            ConnectionAddr::Unix(path) => {
                Box::pin(within(deadline, tokio::net::UnixStream::connect(path)).await??)
            }
            other => {
                return Err(ReadError::Protocol(format!(
                    "slim-bus reads over TCP or a Unix socket, not {other}"
                )));
            }
        };
        let mut connection = ReadConnection {
            transport,
            buffer: Vec::with_capacity(64 * 1024),
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
        connection.client_id = match connection.simple(&[b"CLIENT", b"ID"], deadline).await? {
            Simple::Int(id) => id,
            Simple::Status => {
                return Err(ReadError::Protocol(
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

    /// Sends `XREADGROUP` with `args` (everything after the command name) and parses the
    /// reply into deliveries, waiting for it until `deadline`.
    pub(crate) async fn read_group(
        &mut self,
        args: &[&[u8]],
        streams: &[Arc<str>],
        deadline: Instant,
    ) -> Result<Vec<StreamDeliveries>, ReadError> {
        self.send(args, deadline).await?;
        let batches = self
            .receive(deadline, |bytes| parse_read_reply(bytes, streams))
            .await?;
        Ok(batches)
    }

    /// A command whose reply is `+OK`-like or an integer.
    async fn simple(&mut self, args: &[&[u8]], deadline: Instant) -> Result<Simple, ReadError> {
        self.send(args, deadline).await?;
        self.receive(deadline, parse_simple).await
    }

    async fn send(&mut self, args: &[&[u8]], deadline: Instant) -> Result<(), ReadError> {
        let mut request = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
        request.push(b'*');
        request.extend_from_slice(args.len().to_string().as_bytes());
        request.extend_from_slice(b"\r\n");
        for arg in args {
            request.push(b'$');
            request.extend_from_slice(arg.len().to_string().as_bytes());
            request.extend_from_slice(b"\r\n");
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        self.dirty = true;
        within(deadline, self.transport.write_all(&request)).await??;
        Ok(())
    }

    /// Reads until `parse` finds a whole reply at the start of the buffer.
    async fn receive<T>(
        &mut self,
        deadline: Instant,
        mut parse: impl FnMut(&[u8]) -> Parsed<T>,
    ) -> Result<T, ReadError> {
        loop {
            match parse(&self.buffer) {
                Parsed::Done(value, used) => {
                    self.buffer.drain(..used);
                    self.dirty = !self.buffer.is_empty();
                    return Ok(value);
                }
                Parsed::ServerError(line, used) => {
                    self.buffer.drain(..used);
                    self.dirty = !self.buffer.is_empty();
                    return Err(ReadError::Server(line));
                }
                Parsed::Invalid(detail) => return Err(ReadError::Protocol(detail)),
                Parsed::Incomplete => {
                    self.buffer.reserve(16 * 1024);
                    let read =
                        within(deadline, self.transport.read_buf(&mut self.buffer)).await??;
                    if read == 0 {
                        return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
            }
        }
    }
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
        let end = rest.windows(2).position(|w| w == b"\r\n").ok_or(None)?;
        self.at += end + 2;
        Ok(&rest[..end])
    }

    /// A header line: its type byte and number (`*3`, `$5`, `:42`).
    fn header(&mut self) -> Result<(u8, i64), Stop> {
        let line = self.line()?;
        let (&kind, number) = line
            .split_first()
            .ok_or_else(|| Some("an empty line".to_owned()))?;
        if kind == b'-' || kind == b'+' {
            return Ok((kind, 0));
        }
        let number = std::str::from_utf8(number)
            .ok()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Some(format!("a bad header `{}`", String::from_utf8_lossy(line))))?;
        Ok((kind, number))
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

/// Parses an `XREADGROUP` reply: nil when a block timed out, else `[stream, entries]`
/// pairs, each entry `[id, [field, value, ...]]` (the fields nil for an entry that is
/// pending but was deleted).
fn parse_read_reply(bytes: &[u8], streams: &[Arc<str>]) -> Parsed<Vec<StreamDeliveries>> {
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
                        let mut fields: RawFields =
                            Vec::with_capacity((flat / 2).min(cursor.remaining() / 8));
                        for _ in 0..flat / 2 {
                            let name = cursor
                                .bulk()?
                                .ok_or_else(|| Some("a nil field name".to_owned()))?;
                            let value = cursor
                                .bulk()?
                                .ok_or_else(|| Some("a nil field value".to_owned()))?;
                            fields.push((name.to_vec(), value.to_vec()));
                        }
                        Some(fields)
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
        let Parsed::Done(batches, used) = parse_read_reply(REPLY, &streams()) else {
            panic!("the reply did not parse");
        };
        assert_eq!(used, REPLY.len());
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].stream_index, 1);
        let deliveries = &batches[0].deliveries;
        assert_eq!(deliveries[0].id, EntryId::new(5, 1));
        assert_eq!(
            deliveries[0].fields,
            Some(vec![
                (b"user_id".to_vec(), b"u1".to_vec()),
                (b"seq".to_vec(), b"1".to_vec())
            ])
        );
        assert_eq!(deliveries[1].id, EntryId::new(6, 0));
        assert_eq!(deliveries[1].fields, None, "a deleted entry has nil fields");
    }

    #[test]
    fn every_cut_short_reply_is_incomplete_and_what_follows_a_reply_is_left() {
        for end in 0..REPLY.len() {
            assert!(
                matches!(
                    parse_read_reply(&REPLY[..end], &streams()),
                    Parsed::Incomplete
                ),
                "cut at {end}"
            );
        }
        let mut two = REPLY.to_vec();
        two.extend_from_slice(b"*-1\r\n");
        assert!(
            matches!(parse_read_reply(&two, &streams()), Parsed::Done(_, used) if used == REPLY.len())
        );
    }

    #[test]
    fn nil_errors_and_other_replies_are_told_apart() {
        assert!(
            matches!(parse_read_reply(b"*-1\r\n", &streams()), Parsed::Done(b, 5) if b.is_empty())
        );
        let error = b"-NOGROUP No such key 'x' or consumer group 'g'\r\n";
        match parse_read_reply(error, &streams()) {
            Parsed::ServerError(line, used) => {
                assert_eq!(used, error.len());
                let redis_error = ReadError::Server(line).into_redis();
                assert_eq!(redis_error.code(), Some("NOGROUP"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_read_reply(b"+OK\r\n", &streams()),
            Parsed::Invalid(_)
        ));
        assert!(matches!(
            parse_read_reply(b"*1\r\n*2\r\n$1\r\nz\r\n*0\r\n", &streams()),
            Parsed::Invalid(detail) if detail.contains("`z`")
        ));
        assert_eq!(parse_simple(b"+OK\r\n"), Parsed::Done(Simple::Status, 5));
        assert_eq!(parse_simple(b":42\r\n"), Parsed::Done(Simple::Int(42), 5));
        assert_eq!(parse_simple(b":4"), Parsed::Incomplete);
    }
}
