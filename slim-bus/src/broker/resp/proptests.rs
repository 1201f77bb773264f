//! Property tests of the RESP read-reply parser: any reply a read can get, arriving split
//! at any byte boundaries, parses to the value it encodes.

use std::sync::Arc;

use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::{RespConnection, RespError};
use crate::broker::StreamDeliveries;
use crate::broker::transport::Transport;
use crate::event::EntryId;

/// The streams every generated reply may name.
const STREAMS: [&str; 3] = ["user.created", "a", "{orders}.paid"];

/// An entry as a reply carries it: nil fields for a pending entry that was deleted.
type Entry = (EntryId, Option<Vec<(Vec<u8>, Vec<u8>)>>);

/// A reply to `XREADGROUP`.
#[derive(Debug, Clone)]
enum Reply {
    /// A block that timed out.
    Nil,
    /// An error line, without its `-` and CRLF.
    Error(String),
    /// Entries by stream (an index into [`STREAMS`], each at most once).
    Streams(Vec<(usize, Vec<Entry>)>),
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    // Any bytes, CR and LF included: lengths, not delimiters, frame a bulk string.
    prop::collection::vec(any::<u8>(), 0..24)
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        any::<u64>(),
        any::<u64>(),
        prop::option::weighted(0.9, prop::collection::vec((bytes(), bytes()), 0..6)),
    )
        .prop_map(|(ms, seq, fields)| (EntryId::new(ms, seq), fields))
}

fn reply() -> impl Strategy<Value = Reply> {
    let streams = prop::sample::subsequence((0..STREAMS.len()).collect::<Vec<_>>(), 1..=3)
        .prop_flat_map(|indexes| {
            let count = indexes.len();
            (
                Just(indexes),
                prop::collection::vec(prop::collection::vec(entry(), 0..5), count),
            )
        })
        .prop_map(|(indexes, entries)| Reply::Streams(indexes.into_iter().zip(entries).collect()));
    prop_oneof![
        1 => Just(Reply::Nil),
        1 => "(NOGROUP|ERR|BUSY|READONLY) [a-z ']{0,30}".prop_map(Reply::Error),
        8 => streams,
    ]
}

fn bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", bytes.len()).as_bytes());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

fn encode(reply: &Reply) -> Vec<u8> {
    let mut out = Vec::new();
    match reply {
        Reply::Nil => out.extend_from_slice(b"*-1\r\n"),
        Reply::Error(line) => out.extend_from_slice(format!("-{line}\r\n").as_bytes()),
        Reply::Streams(streams) => {
            out.extend_from_slice(format!("*{}\r\n", streams.len()).as_bytes());
            for (index, entries) in streams {
                out.extend_from_slice(b"*2\r\n");
                bulk(&mut out, STREAMS[*index].as_bytes());
                out.extend_from_slice(format!("*{}\r\n", entries.len()).as_bytes());
                for (id, fields) in entries {
                    out.extend_from_slice(b"*2\r\n");
                    bulk(&mut out, id.to_string().as_bytes());
                    match fields {
                        None => out.extend_from_slice(b"*-1\r\n"),
                        Some(fields) => {
                            out.extend_from_slice(format!("*{}\r\n", 2 * fields.len()).as_bytes());
                            for (name, value) in fields {
                                bulk(&mut out, name);
                                bulk(&mut out, value);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// What a parsed reply says, without the arrival times.
fn parsed(batches: &[StreamDeliveries]) -> Vec<(usize, Vec<Entry>)> {
    batches
        .iter()
        .map(|batch| {
            let entries = batch
                .deliveries
                .iter()
                .map(|delivery| {
                    let fields = delivery.fields.as_ref().map(|fields| {
                        fields
                            .pairs()
                            .map(|(name, value)| (name.to_vec(), value.to_vec()))
                            .collect()
                    });
                    (delivery.id, fields)
                })
                .collect();
            (batch.stream_index, entries)
        })
        .collect()
}

/// Sorted, deduplicated cut points inside `len` bytes.
fn cuts(len: usize, raw: &[prop::sample::Index]) -> Vec<usize> {
    let mut cuts: Vec<usize> = raw.iter().map(|index| index.index(len.max(1))).collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// Sends `wire` to a connection in the pieces `cuts` make, and returns what its read of
/// `XREADGROUP` made of them.
fn receive_in_pieces(wire: &[u8], cuts: &[usize]) -> Result<Vec<StreamDeliveries>, RespError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let (ours, mut theirs) = tokio::io::duplex(1 << 20);
        let transport: std::pin::Pin<Box<dyn Transport>> = Box::pin(ours);
        let mut connection = RespConnection::over(transport);
        let streams: Vec<Arc<str>> = STREAMS.iter().map(|s| Arc::from(*s)).collect();
        let pieces: Vec<Vec<u8>> = std::iter::once(0)
            .chain(cuts.iter().copied())
            .zip(cuts.iter().copied().chain(std::iter::once(wire.len())))
            .map(|(from, to)| wire[from..to].to_vec())
            .collect();
        let server = async move {
            for piece in pieces {
                theirs.write_all(&piece).await.expect("the pipe takes it");
                theirs.flush().await.expect("the pipe takes it");
                // Each piece its own socket read.
                tokio::task::yield_now().await;
            }
            theirs
        };
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let args = [b"XREADGROUP".as_slice()];
        let (read, _theirs) =
            tokio::join!(connection.read_group(&args, &streams, deadline), server);
        read
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_read_reply_split_anywhere_parses_to_what_it_encodes(
        reply in reply(),
        raw_cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let wire = encode(&reply);
        let cuts = cuts(wire.len(), &raw_cuts);
        let outcome = receive_in_pieces(&wire, &cuts);
        match (&reply, outcome) {
            (Reply::Nil, Ok(batches)) => prop_assert!(batches.is_empty()),
            (Reply::Error(line), Err(RespError::Server(got))) => {
                prop_assert_eq!(got, format!("-{line}").into_bytes());
            }
            (Reply::Streams(streams), Ok(batches)) => {
                prop_assert_eq!(&parsed(&batches), streams);
            }
            (reply, outcome) => prop_assert!(false, "{reply:?} read as {outcome:?}"),
        }
    }

    #[test]
    fn a_read_reply_cut_short_anywhere_is_incomplete(reply in reply(), cut in any::<prop::sample::Index>()) {
        let wire = encode(&reply);
        let end = cut.index(wire.len());
        let streams: Vec<Arc<str>> = STREAMS.iter().map(|s| Arc::from(*s)).collect();
        prop_assert_eq!(super::decode::Scan::start().reply_len(&wire[..end]), Ok(None));
        prop_assert!(matches!(
            super::decode::parse_read_reply_bytes(&wire[..end], &streams),
            super::decode::Parsed::Incomplete
        ));
    }
}
