//! The Lua scripts of the Redis backend, each a file of its own in `broker/scripts/`
//! (which says what its KEYS and ARGV are, and how to run it with `redis-cli --eval`).

/// Every script, loaded once per broker: redis-rs sends `EVALSHA` and falls back to `EVAL`
/// when the server does not know the script yet.
pub(super) struct Scripts {
    pub(super) dead_letter: redis::Script,
    pub(super) replay: redis::Script,
    pub(super) remove_idle_consumers: redis::Script,
    pub(super) hold_lease: redis::Script,
    pub(super) release_lease: redis::Script,
    pub(super) trim_acked: redis::Script,
    pub(super) touch_own: redis::Script,
    pub(super) claim_own: redis::Script,
}

/// The sources, for the scripts and for tests that hold them to the constants in
/// [`crate::broker::codes`].
pub(crate) const DEAD_LETTER: &str = include_str!("../scripts/dead_letter.lua");
pub(crate) const REPLAY: &str = include_str!("../scripts/replay.lua");
pub(crate) const REMOVE_IDLE_CONSUMERS: &str = include_str!("../scripts/remove_idle_consumers.lua");
pub(crate) const HOLD_LEASE: &str = include_str!("../scripts/hold_lease.lua");
pub(crate) const RELEASE_LEASE: &str = include_str!("../scripts/release_lease.lua");
pub(crate) const TRIM_ACKED: &str = include_str!("../scripts/trim_acked.lua");
pub(crate) const TOUCH_OWN: &str = include_str!("../scripts/touch_own.lua");
pub(crate) const CLAIM_OWN: &str = include_str!("../scripts/claim_own.lua");

impl Scripts {
    pub(super) fn load() -> Self {
        Scripts {
            dead_letter: redis::Script::new(DEAD_LETTER),
            replay: redis::Script::new(REPLAY),
            remove_idle_consumers: redis::Script::new(REMOVE_IDLE_CONSUMERS),
            hold_lease: redis::Script::new(HOLD_LEASE),
            release_lease: redis::Script::new(RELEASE_LEASE),
            trim_acked: redis::Script::new(TRIM_ACKED),
            touch_own: redis::Script::new(TOUCH_OWN),
            claim_own: redis::Script::new(CLAIM_OWN),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::DEAD_LETTER_SCRIPT_MAX_VALUES;
    use crate::dead_letter::{META_PACKED_FIELDS, META_PREFIX};

    #[test]
    fn the_dead_letter_script_packs_and_escapes_as_the_shared_constants_say() {
        // The in-memory backend writes the same dead letters from these constants.
        assert!(DEAD_LETTER.contains(&format!(
            "#fields + #ARGV > {DEAD_LETTER_SCRIPT_MAX_VALUES}"
        )));
        assert!(DEAD_LETTER.contains(&format!("'{META_PACKED_FIELDS}'")));
        assert!(DEAD_LETTER.contains(&format!("string.sub(name, 1, 1) == '{META_PREFIX}'")));
        assert!(REPLAY.contains(&format!("fields[i] == '{META_PACKED_FIELDS}'")));
        assert!(REPLAY.contains(&format!(
            "string.sub(name, 1, 2) == '{META_PREFIX}{META_PREFIX}'"
        )));
    }

    #[test]
    fn every_script_says_what_its_keys_and_arguments_are_and_how_to_run_it() {
        for script in [
            DEAD_LETTER,
            REPLAY,
            REMOVE_IDLE_CONSUMERS,
            HOLD_LEASE,
            RELEASE_LEASE,
            TRIM_ACKED,
            TOUCH_OWN,
        ] {
            let header: Vec<&str> = script
                .lines()
                .take_while(|line| line.starts_with("--"))
                .collect();
            assert!(
                header.iter().any(|line| line.contains("KEYS[1]")),
                "{script}"
            );
            assert!(
                header.iter().any(|line| line.contains("redis-cli --eval")),
                "{script}"
            );
        }
    }
}
