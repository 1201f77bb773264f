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

mod connection;
mod decode;
mod encode;
mod fields;

pub(crate) use connection::{RespConnection, RespError, is_failover_line};
pub(crate) use encode::{encode_xadd, xadd_len};
pub(crate) use fields::EntryFields;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
