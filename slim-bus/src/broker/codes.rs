//! Words both backends speak: the error codes the runtime tells apart, the Redis versions
//! it runs on, the keys that sit next to a stream, and the limits of its Lua scripts that
//! the in-memory backend imitates. One place, so the Redis backend (and its scripts) and
//! the in-memory one cannot drift apart.

/// The stream or the consumer group does not exist (`XREADGROUP`, `XACK`, `XPENDING`...).
pub(crate) const NO_GROUP: &str = "NOGROUP";
/// The key holds another type than a stream.
pub(crate) const WRONG_TYPE: &str = "WRONGTYPE";
/// `XGROUP CREATE` of a group that exists.
pub(crate) const BUSY_GROUP: &str = "BUSYGROUP";
/// A generic error reply (e.g. `XINFO GROUPS` of a missing key, a script's own error).
pub(crate) const GENERIC_ERROR: &str = "ERR";
/// The ACL user may not run the command.
pub(crate) const NO_PERMISSION: &str = "NOPERM";
/// Redis Cluster: the keys of one command or script are in different hash slots.
pub(crate) const CROSS_SLOT: &str = "CROSSSLOT";

/// The `TYPE` of a stream key, and of a missing key.
pub(crate) const TYPE_STREAM: &str = "stream";
pub(crate) const TYPE_NONE: &str = "none";

/// `unpack()` in Lua takes about 8000 values at most: the dead-letter script
/// (`scripts/dead_letter.lua`) packs the fields of an entry whose names and values plus
/// the script's arguments exceed this into one `@fields` value, and the in-memory backend
/// writes the same dead letter.
pub(crate) const DEAD_LETTER_SCRIPT_MAX_VALUES: usize = 7900;

/// The oldest Redis the runtime works with, as `(major, minor)`: 7.0 is the first whose
/// `XAUTOCLAIM` reports the pending entries it found deleted.
pub(crate) const MIN_REDIS_VERSION: (u64, u64) = (7, 0);

/// Whether a `redis_version` is at least [`MIN_REDIS_VERSION`]; a version that does not
/// read as `MAJOR.MINOR...` counts as new enough, rather than refuse a fork that numbers
/// its releases otherwise.
pub(crate) fn is_supported_version(version: &str) -> bool {
    let mut parts = version.trim().split('.').map(str::parse::<u64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= MIN_REDIS_VERSION,
        _ => true,
    }
}

/// Whether a server error code says the connection reaches a server that cannot serve the
/// bus now but another one behind the same address may: a replica (`READONLY`, e.g. a
/// demoted primary after a failover), a server loading its data (`LOADING`), or a replica
/// that lost its primary (`MASTERDOWN`). Such a connection is replaced by a new one, which
/// resolves the address again.
pub(crate) fn is_failover_code(code: &[u8]) -> bool {
    FAILOVER_CODES
        .iter()
        .any(|failover| failover.as_bytes() == code)
}

/// The codes of [`is_failover_code`].
pub(crate) const FAILOVER_CODES: [&str; 3] = ["READONLY", "LOADING", "MASTERDOWN"];

/// The key counting the dead letters the cap trimmed from `dead_letters`: in the same
/// Redis Cluster hash slot, since `dead_letters` carries its stream's hash tag.
pub(crate) fn trimmed_count_key(dead_letters: &str) -> String {
    format!("{dead_letters}:trimmed")
}

/// The hash of the due times (unix milliseconds, by entry id) of the retries that
/// `group`'s consumers asked for with `retry_after` on `stream`, so that a consumer that
/// restarts does not run them early: in `stream`'s hash slot, whatever the names.
pub(crate) fn retry_due_key(stream: &str, group: &str) -> String {
    super::key_in_slot_of(stream, &format!(":retry_at:{group}"))
}

/// Every key the bus keeps next to `stream` for `group`, all in `stream`'s hash slot: the
/// dead-letter stream, its trimmed count, and the due times of `retry_after` retries.
pub(crate) fn keys_next_to(stream: &str, dead_letter_suffix: &str, group: &str) -> Vec<String> {
    let dead_letters = crate::dead_letter::dead_letter_stream(stream, dead_letter_suffix);
    vec![
        trimmed_count_key(&dead_letters),
        dead_letters,
        retry_due_key(stream, group),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_next_to_a_stream_is_in_its_slot() {
        for stream in [
            "user.created",
            "a{}b",
            "x}y",
            "}{",
            "{}",
            "{a}b",
            "a{b}c{d}",
        ] {
            for group in ["tests", "g{x}", "}"] {
                for key in keys_next_to(stream, ":dlq", group) {
                    assert_eq!(
                        crate::broker::key_slot(key.as_bytes()),
                        crate::broker::key_slot(stream.as_bytes()),
                        "{stream} -> {key}"
                    );
                }
            }
        }
        assert_eq!(
            keys_next_to("user.created", ":dlq", "tests"),
            [
                "{user.created}:dlq:trimmed",
                "{user.created}:dlq",
                "{user.created}:retry_at:tests"
            ]
        );
    }

    #[test]
    fn versions_from_redis_7_0_on_are_supported() {
        for old in ["6.2.14", "6.0.0", "5.0.7", "2.8.24"] {
            assert!(!is_supported_version(old), "{old}");
        }
        // Valkey 8 and 9 report `redis_version:7.2.4`.
        for new in [
            "7.0.0", "7.0.15", "7.2.4", "7.4.0", "8.0.2", "10.1.0", " 7.0.0\r",
        ] {
            assert!(is_supported_version(new), "{new}");
        }
        for unknown in ["", "unstable", "7"] {
            assert!(
                is_supported_version(unknown),
                "{unknown:?} is given the benefit of the doubt"
            );
        }
    }
}
