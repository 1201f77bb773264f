//! Commands as RESP bytes: arrays of bulk strings, and `XADD`s written straight from an
//! event's encoded fields.

use crate::codec::EncodedField;

/// Appends a command of `len` arguments to `out`, as RESP: an array of bulk strings.
pub(super) fn encode_command<'a>(
    out: &mut Vec<u8>,
    len: usize,
    args: impl IntoIterator<Item = &'a [u8]>,
) {
    encode_header(out, b'*', len);
    for arg in args {
        encode_bulk(out, arg);
    }
}

pub(super) fn encode_header(out: &mut Vec<u8>, kind: u8, len: usize) {
    out.push(kind);
    out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub(super) fn encode_bulk(out: &mut Vec<u8>, arg: &[u8]) {
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
