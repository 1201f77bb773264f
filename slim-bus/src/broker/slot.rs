//! Redis Cluster's hash slots: a cluster serves each of its 16384 slots from one master,
//! and refuses (`CROSSSLOT`) a command or script whose keys are in different slots.

/// How many hash slots a Redis Cluster has.
pub(crate) const SLOT_COUNT: u16 = 16384;

/// The part of `key` that Redis Cluster hashes when the key has one: the bytes between
/// its first `{` and the first `}` after it, if there is at least one byte between them.
pub(crate) fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let rest = &key[open + 1..];
    let close = rest.iter().position(|&b| b == b'}')?;
    (close > 0).then(|| &rest[..close])
}

/// The hash slot of `key`, as Redis Cluster computes it: CRC16 (XMODEM) of the key's hash
/// tag, or of the whole key when it has none, modulo [`SLOT_COUNT`]. Keys that must be
/// used together in one command (a stream and its dead-letter stream) share a hash tag.
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    const XMODEM: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM);
    XMODEM.checksum(hash_tag(key).unwrap_or(key)) % SLOT_COUNT
}

/// The name of a key the bus keeps next to `stream` (its dead letters, say): `stream` and
/// `suffix` with a hash tag that puts the key in `stream`'s slot, so that one script may use
/// both.
///
/// - A stream with a hash tag of its own keeps it: `{user}.created` -> `{user}.created:dlq`.
/// - A stream without one and without `}` becomes the tag: `user.created` ->
///   `{user.created}:dlq`.
/// - A stream without a tag but with a `}` (`x}y`, `a{}b`) cannot be a tag, which ends at
///   the first `}`: its slot is that of its whole name, so the tag is the smallest number
///   whose slot is the same (`{N}x}y:dlq`).
pub(crate) fn key_in_slot_of(stream: &str, suffix: &str) -> String {
    if hash_tag(stream.as_bytes()).is_some() {
        return format!("{stream}{suffix}");
    }
    if !stream.contains('}') {
        return format!("{{{stream}}}{suffix}");
    }
    let slot = key_slot(stream.as_bytes());
    format!("{{{}}}{stream}{suffix}", number_in_slot(slot))
}

/// The smallest number whose decimal digits hash to `slot`. Every slot has one below
/// 2^20 (the tests go through all of them); a few hundred thousand CRCs at most, once per
/// stream when a bus is built.
fn number_in_slot(slot: u16) -> u32 {
    (0u32..)
        .find(|n| key_slot(n.to_string().as_bytes()) == slot)
        .unwrap_or_default()
}

/// The positions of `keys` grouped by hash slot, each group in order, the groups in the
/// order of their first key: what one command per slot covers.
pub(crate) fn group_by_slot<K: AsRef<str>>(keys: &[K]) -> Vec<(u16, Vec<usize>)> {
    let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
    for (index, key) in keys.iter().enumerate() {
        let slot = key_slot(key.as_ref().as_bytes());
        match groups.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, members)) => members.push(index),
            None => groups.push((slot, vec![index])),
        }
    }
    groups
}

/// The first key of `keys` whose slot differs from the first key's, if any.
pub(crate) fn cross_slot<'a>(keys: impl IntoIterator<Item = &'a [u8]>) -> Option<&'a [u8]> {
    let mut keys = keys.into_iter();
    let first = key_slot(keys.next()?);
    keys.find(|key| key_slot(key) != first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_those_redis_cluster_computes() {
        // `CLUSTER KEYSLOT` on Redis 7.0.
        for (key, slot) in [
            ("foo", 12182),
            ("bar", 5061),
            ("hello", 866),
            ("somekey", 11058),
            ("user.created", 9287),
            ("{user.created}:dlq", 9287),
            ("{user1000}.following", 3443),
            ("foo{}{bar}", 8363),
            ("foo{{bar}}zap", 4015),
            ("a{}b", 13694),
            ("", 0),
        ] {
            assert_eq!(key_slot(key.as_bytes()), slot, "{key}");
        }
    }

    #[test]
    fn a_hash_tag_is_the_first_non_empty_braced_part() {
        assert_eq!(hash_tag(b"{user1000}.following"), Some(&b"user1000"[..]));
        assert_eq!(hash_tag(b"foo{bar}{zap}"), Some(&b"bar"[..]));
        assert_eq!(hash_tag(b"foo{{bar}}zap"), Some(&b"{bar"[..]));
        // `{}` is no tag, and Redis does not look for one after it.
        assert_eq!(hash_tag(b"foo{}{bar}"), None);
        assert_eq!(hash_tag(b"foo{bar"), None);
        assert_eq!(hash_tag(b"plain"), None);
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
    }

    #[test]
    fn every_slot_has_a_number_that_hashes_to_it() {
        let mut first = vec![None; usize::from(SLOT_COUNT)];
        let mut missing = usize::from(SLOT_COUNT);
        for n in 0u32..(1 << 20) {
            let slot = usize::from(key_slot(n.to_string().as_bytes()));
            if first[slot].is_none() {
                first[slot] = Some(n);
                missing -= 1;
                if missing == 0 {
                    break;
                }
            }
        }
        assert_eq!(missing, 0, "slots without a number below 2^20");
        for slot in [0, 1, 866, 9287, 13694, SLOT_COUNT - 1] {
            assert_eq!(Some(number_in_slot(slot)), first[usize::from(slot)]);
        }
    }

    #[test]
    fn keys_next_to_a_stream_are_in_its_slot_whatever_its_name() {
        for stream in [
            "user.created",
            "a{}b",
            "x}y",
            "}{",
            "{}",
            "{a}b",
            "a{b}c{d}",
            "a{",
            "}",
            "{{}}",
            "orders:{3}",
        ] {
            for suffix in [":dlq", ":retry_at", "-dead{x}"] {
                let key = key_in_slot_of(stream, suffix);
                assert_eq!(
                    key_slot(key.as_bytes()),
                    key_slot(stream.as_bytes()),
                    "{stream} -> {key}"
                );
                assert!(key.contains(stream) && key.ends_with(suffix), "{key}");
            }
        }
        // Names that were in the stream's slot already keep them: dead letters are stored
        // under them.
        assert_eq!(key_in_slot_of("user.created", ":dlq"), "{user.created}:dlq");
        assert_eq!(
            key_in_slot_of("{user}.created", ":dlq"),
            "{user}.created:dlq"
        );
        assert_eq!(key_in_slot_of("{a}b", ":dlq"), "{a}b:dlq");
        assert_eq!(key_in_slot_of("a{b}c{d}", ":dlq"), "a{b}c{d}:dlq");
        assert_eq!(key_in_slot_of("a{", ":dlq"), "{a{}:dlq");
        let tag = number_in_slot(key_slot(b"a{}b"));
        assert_eq!(
            key_in_slot_of("a{}b", ":dlq"),
            format!("{{{tag}}}a{{}}b:dlq")
        );
    }

    #[test]
    fn keys_of_several_slots_are_told_apart() {
        assert_eq!(cross_slot([&b"a"[..]]), None);
        assert_eq!(
            cross_slot([&b"user.created"[..], b"{user.created}:dlq"]),
            None
        );
        assert_eq!(cross_slot([&b"foo"[..], b"bar"]), Some(&b"bar"[..]));
    }
}
