//! Unit tests of the RESP encoder, decoder and connection.

use std::sync::Arc;

use super::decode::{Parsed, Scan, Simple, parse_entry_id, parse_read_reply_bytes, parse_simple};
use super::{EntryFields, RespError, encode_xadd, is_failover_line, xadd_len};
use crate::codec::EncodedField;
use crate::event::EntryId;

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
    assert!(matches!(parse_entry_id(b"$2\r\nab\r\n"), Parsed::Invalid(d) if d.contains("`ab`")));
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
