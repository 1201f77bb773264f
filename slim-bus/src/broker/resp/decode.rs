//! Replies parsed from RESP bytes: how long a reply is, whether it arrived whole, and the
//! few shapes the read and publish connections get (read replies, entry ids, statuses).

use std::sync::Arc;

use tokio::time::Instant;

use super::fields::EntryFields;
use crate::broker::{Delivery, StreamDeliveries};
use crate::event::EntryId;

/// The outcome of parsing the start of a buffer.
#[derive(Debug, PartialEq)]
pub(super) enum Parsed<T> {
    /// A whole reply, and how many bytes it took.
    Done(T, usize),
    /// An error reply (its line without `\r\n`), and how many bytes it took.
    ServerError(Vec<u8>, usize),
    /// The reply goes on past the buffer's end.
    Incomplete,
    Invalid(String),
}

#[derive(Debug, PartialEq)]
pub(super) enum Simple {
    Status,
    Int(i64),
}

/// A position in a buffer holding the start of a reply.
pub(super) struct Cursor<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) at: usize,
}

/// Parsing stopped: the reply is incomplete (`None`) or invalid.
pub(super) type Stop = Option<String>;

impl<'a> Cursor<'a> {
    /// Bytes not parsed yet.
    pub(super) fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    /// The next line, without its `\r\n`.
    pub(super) fn line(&mut self) -> Result<&'a [u8], Stop> {
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
    pub(super) fn header(&mut self) -> Result<(u8, i64), Stop> {
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
    pub(super) fn array(&mut self) -> Result<Option<usize>, Stop> {
        match self.header()? {
            (b'*', -1) => Ok(None),
            (b'*', len) => usize::try_from(len)
                .map(Some)
                .map_err(|_| Some("a negative array length".to_owned())),
            (kind, _) => Err(Some(format!("expected an array, got `{}`", kind as char))),
        }
    }

    /// A bulk string's bytes; `None` for nil.
    pub(super) fn bulk(&mut self) -> Result<Option<&'a [u8]>, Stop> {
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
pub(super) struct Scan {
    at: usize,
    left: usize,
}

impl Scan {
    pub(super) fn start() -> Scan {
        Scan { at: 0, left: 1 }
    }

    /// Goes on checking `bytes` (the same reply's bytes, perhaps more of them than last
    /// time) and returns the reply's length once all of it is there. A read's reply
    /// often arrives over several socket reads: checking only what is new keeps that
    /// linear, where parsing the whole reply again after each read was not.
    pub(super) fn reply_len(&mut self, bytes: &[u8]) -> Result<Option<usize>, String> {
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
pub(super) fn parse_reply<T>(
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

pub(super) fn parse_simple(bytes: &[u8]) -> Parsed<Simple> {
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
pub(super) fn parse_entry_id(bytes: &[u8]) -> Parsed<EntryId> {
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
pub(super) fn parse_read_reply_bytes(
    bytes: &[u8],
    streams: &[Arc<str>],
) -> Parsed<Vec<StreamDeliveries>> {
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
