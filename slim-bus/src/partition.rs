//! Partitioned streams: one logical stream stored as N Redis streams, and which of them an
//! entry goes to.
//!
//! Partition `k` of the logical stream `orders` is the Redis stream `orders:{k}`. The
//! partition number is the key's hash tag, so Redis Cluster spreads the partitions over
//! its slots (and masters), and each partition's dead-letter stream, `orders:{k}:dlq`,
//! shares its slot.
//!
//! An event type that names a key field (`#[event(key = "order_id")]`) goes to partition
//! `crc32(value) % N`, where `value` is the field's value as stored in the entry (the
//! bytes of the flat wire format, e.g. `o-17` for a `String`, `42` for an integer; empty
//! when the field is left out as `None`) and `crc32` is CRC-32/ISO-HDLC: the checksum of
//! zlib, PNG and Ethernet, Go's `crc32.ChecksumIEEE` and Python's `zlib.crc32`. Without a
//! key, a bus spreads its publishes over the partitions in turn.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::codec::EncodedField;
use crate::error::{Error, Result};
use crate::event::Event;

/// The name of partition `partition` of the logical stream `stream`: `stream:{partition}`.
///
/// # Examples
///
/// ```
/// assert_eq!(slim_bus::partition_stream("orders", 3), "orders:{3}");
/// ```
pub fn partition_stream(stream: &str, partition: u32) -> String {
    format!("{stream}:{{{partition}}}")
}

/// The partition (of `partitions`) that an entry whose key field holds `key` goes to:
/// CRC-32 (ISO-HDLC, as zlib computes it) of `key`, modulo `partitions`.
///
/// `key` is the field's value as stored in the entry, so a publisher in another language
/// computes the same partition: in Go, `crc32.ChecksumIEEE(key) % partitions`; in Python,
/// `zlib.crc32(key) % partitions`.
///
/// # Panics
///
/// When `partitions` is 0.
///
/// # Examples
///
/// ```
/// assert_eq!(slim_bus::partition_for_key(b"o-17", 8), 0x0C74_4F47 % 8);
/// ```
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(
        partitions > 0,
        "a partitioned stream has at least 1 partition"
    );
    crc32(key) % partitions
}

/// CRC-32/ISO-HDLC (reflected polynomial `0xEDB88320`, initial value and final xor all
/// ones), computed a byte at a time from a table built at compile time.
fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut index = 0;
        while index < 256 {
            let mut crc = index as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
                bit += 1;
            }
            table[index] = crc;
            index += 1;
        }
        table
    };
    let crc = bytes.iter().fold(u32::MAX, |crc, &byte| {
        TABLE[usize::from((crc as u8) ^ byte)] ^ (crc >> 8)
    });
    !crc
}

/// What an event type declares about the stream it is published to.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Declared {
    /// [`Event::MAX_LEN`].
    pub(crate) max_len: Option<usize>,
    /// [`Event::PARTITIONS`].
    pub(crate) partitions: Option<u32>,
    /// [`Event::PARTITION_KEY`].
    pub(crate) key: Option<&'static str>,
    /// The event type's name, for errors.
    pub(crate) event: &'static str,
}

impl Declared {
    /// What `E` declares.
    pub(crate) fn of<E: Event>() -> Self {
        Declared {
            max_len: E::MAX_LEN,
            partitions: E::PARTITIONS,
            key: E::PARTITION_KEY,
            event: std::any::type_name::<E>(),
        }
    }
}

/// How many partitions each partitioned logical stream of a bus has, from its
/// `stream_partitions` setting and its handlers' event types, and where the round robin
/// of each stays.
#[derive(Debug, Default)]
pub(crate) struct Partitions {
    counts: BTreeMap<String, u32>,
    /// The partition the next keyless entry of each logical stream goes to. One counter
    /// per stream: a shared one would send every entry of one stream to the same partition
    /// whenever publishes to two streams alternate.
    next: Mutex<HashMap<Box<str>, u32>>,
}

impl Partitions {
    /// The bus's setting, checked: at least 1 partition, and a name without a hash tag of
    /// its own (Redis Cluster would hash every partition by that tag, into one slot).
    pub(crate) fn new(configured: &BTreeMap<String, u32>) -> Result<Self> {
        for (stream, &count) in configured {
            check_partitioned(stream, count, "stream_partitions")?;
        }
        Ok(Partitions {
            counts: configured.clone(),
            next: Mutex::default(),
        })
    }

    /// Records that the event type `event`, handled on `stream`, declares `count`
    /// partitions for it.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the bus's setting says another number, or the count is 0.
    pub(crate) fn declare(&mut self, stream: &str, count: u32, event: &str) -> Result<()> {
        check_partitioned(stream, count, "partitions")?;
        match self.counts.get(stream) {
            Some(&known) if known != count => Err(conflict(stream, known, count, event)),
            Some(_) => Ok(()),
            None => {
                self.counts.insert(stream.to_owned(), count);
                Ok(())
            }
        }
    }

    /// The partition count of the logical stream `stream`, if it is partitioned.
    pub(crate) fn count(&self, stream: &str) -> Option<u32> {
        if self.counts.is_empty() {
            return None;
        }
        self.counts.get(stream).copied()
    }

    /// Every partitioned logical stream and its count.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, u32)> {
        self.counts
            .iter()
            .map(|(stream, &count)| (stream.as_str(), count))
    }

    /// The partition count of `stream` for an event type that declares `declared`.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the bus and the event type disagree.
    pub(crate) fn count_for(&self, stream: &str, declared: &Declared) -> Result<Option<u32>> {
        match (self.count(stream), declared.partitions) {
            (Some(known), Some(count)) if known != count => {
                Err(conflict(stream, known, count, declared.event))
            }
            (Some(known), _) => Ok(Some(known)),
            (None, Some(count)) => {
                check_partitioned(stream, count, "partitions")?;
                Ok(Some(count))
            }
            (None, None) => Ok(None),
        }
    }

    /// The partition an entry of `fields` goes to: by the key field's value when the
    /// event type names one, else the next in turn.
    pub(crate) fn pick(
        &self,
        stream: &str,
        count: u32,
        key: Option<&str>,
        fields: &[EncodedField],
    ) -> u32 {
        if let Some(key) = key {
            return partition_for_key(key_value(key, fields), count);
        }
        let mut next = self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let turn = match next.get_mut(stream) {
            Some(turn) => turn,
            None => next.entry(stream.into()).or_insert(0),
        };
        let picked = *turn % count;
        *turn = turn.wrapping_add(1);
        picked
    }
}

/// The stored value of the field `key` in `fields`, empty when the field was left out.
fn key_value<'a>(key: &str, fields: &'a [EncodedField]) -> &'a [u8] {
    // The codec stores a field named `@x` as `@@x`.
    let escaped = key.starts_with('@');
    fields
        .iter()
        .find(|(name, _)| match name.strip_prefix('@') {
            Some(rest) if escaped => rest == key,
            _ => !escaped && &**name == key,
        })
        .map_or(&[][..], |(_, value)| value.as_slice())
}

/// Checks a partitioned stream's name and count, as `setting` gives them.
pub(crate) fn check_partitioned(stream: &str, count: u32, setting: &'static str) -> Result<()> {
    if stream.is_empty() {
        return Err(Error::config(setting, "names an empty stream"));
    }
    if count == 0 {
        return Err(Error::config(
            setting,
            format!(
                "must be at least 1 (stream `{stream}`): a stream with no partitions could hold no entry"
            ),
        ));
    }
    if stream.contains('{') || stream.contains('}') {
        return Err(Error::config(
            setting,
            format!(
                "stream `{stream}` is partitioned, so its name can't hold `{{` or `}}`: its partitions are `{}` ..., and a hash tag of its own would put them all in one Redis Cluster slot",
                partition_stream(stream, 0)
            ),
        ));
    }
    Ok(())
}

fn conflict(stream: &str, known: u32, declared: u32, event: &str) -> Error {
    Error::config(
        "stream_partitions",
        format!(
            "stream `{stream}` has {known} partitions on this bus, but event type `{event}` declares `partitions = {declared}`: publishers and consumers must agree, or entries would land in partitions nobody reads"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_the_checksum_of_zlib() {
        // The check value of CRC-32/ISO-HDLC, and values Python's zlib.crc32 gives.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"a"), 0xE8B7_BE43);
        assert_eq!(crc32(b"o-17"), 0x0C74_4F47);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
    }

    #[test]
    fn a_key_always_picks_the_same_partition_and_keys_spread() {
        let mut used = [0u32; 8];
        for n in 0..800 {
            let key = format!("order-{n}");
            let partition = partition_for_key(key.as_bytes(), 8);
            assert_eq!(partition, partition_for_key(key.as_bytes(), 8));
            used[partition as usize] += 1;
        }
        assert!(used.iter().all(|&count| count > 50), "{used:?}");
        assert_eq!(partition_for_key(b"anything", 1), 0);
    }

    #[test]
    fn partition_names_carry_the_number_as_hash_tag() {
        assert_eq!(partition_stream("orders", 0), "orders:{0}");
        assert_eq!(partition_stream("orders", 12), "orders:{12}");
        assert_eq!(
            crate::dead_letter::dead_letter_stream(&partition_stream("orders", 3), ":dlq"),
            "orders:{3}:dlq"
        );
    }

    #[test]
    fn the_key_is_the_stored_field_value_and_empty_when_left_out() {
        let fields: Vec<EncodedField> = vec![
            ("order_id".into(), b"o-17".to_vec()),
            ("@@at".into(), b"x".to_vec()),
        ];
        assert_eq!(key_value("order_id", &fields), b"o-17");
        assert_eq!(key_value("@at", &fields), b"x");
        assert_eq!(key_value("at", &fields), b"");
        assert_eq!(key_value("missing", &fields), b"");
    }

    #[test]
    fn without_a_key_publishes_go_round_robin() {
        let partitions = Partitions::default();
        let picked: Vec<u32> = (0..6)
            .map(|_| partitions.pick("orders", 3, None, &[]))
            .collect();
        assert_eq!(picked, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn each_stream_takes_its_partitions_in_turn_of_its_own() {
        let partitions = Partitions::default();
        let picked: Vec<(u32, u32)> = (0..4)
            .map(|_| {
                (
                    partitions.pick("clicks", 2, None, &[]),
                    partitions.pick("views", 2, None, &[]),
                )
            })
            .collect();
        assert_eq!(picked, [(0, 0), (1, 1), (0, 0), (1, 1)]);
    }

    #[test]
    fn settings_and_declarations_are_checked() {
        let configured = BTreeMap::from([("orders".to_owned(), 4)]);
        let mut partitions = Partitions::new(&configured).expect("valid");
        partitions.declare("orders", 4, "Order").expect("agrees");
        let error = partitions
            .declare("orders", 8, "Order")
            .expect_err("disagrees");
        assert!(
            error
                .to_string()
                .contains("stream `orders` has 4 partitions"),
            "{error}"
        );
        partitions
            .declare("payments", 2, "Payment")
            .expect("new stream");
        assert_eq!(partitions.count("payments"), Some(2));
        for (stream, count) in [("orders", 0), ("", 2), ("{orders}", 2)] {
            let configured = BTreeMap::from([(stream.to_owned(), count)]);
            assert!(Partitions::new(&configured).is_err(), "{stream:?} {count}");
        }
        let declared = Declared {
            partitions: Some(8),
            event: "Invoice",
            ..Declared::default()
        };
        assert!(partitions.count_for("orders", &declared).is_err());
        assert_eq!(
            partitions.count_for("invoices", &declared).expect("ok"),
            Some(8)
        );
        assert_eq!(
            partitions
                .count_for("invoices", &Declared::default())
                .expect("ok"),
            None
        );
    }
}
