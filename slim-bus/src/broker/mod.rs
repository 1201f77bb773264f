//! The narrow interface between the consumer logic and the server that stores the streams.
//!
//! Everything the runtime does with Redis goes through [`Broker`], so another backend
//! (in memory, cluster) plugs in without touching the consumer. The folder, by concept:
//!
//! - [`roles`]: the interface, split by role ([`Publishing`], [`GroupReading`],
//!   [`DeadLetterStore`], [`Inspection`], [`Leases`]), and what the roles answer with;
//! - [`codes`]: the error codes, versions, key names and script limits both backends use;
//! - [`transport`]: how bytes get to a server (TCP, TLS, Unix socket);
//! - [`resp`]: the RESP protocol the fast read and publish paths speak over a transport;
//! - [`slot`]: Redis Cluster's hash slots ([`key_slot`](slot::key_slot)): which keys one
//!   command may use together;
//! - [`topology`]: which server a command goes to: the one server, or the master of the
//!   key's hash slot on a Redis Cluster;
//! - [`redis`] and [`memory`]: the two backends, each split by role; the Redis backend's
//!   Lua scripts are files of their own in `scripts/`.

mod codes;
pub(crate) mod memory;
pub(crate) mod redis;
mod resp;
mod roles;
mod slot;
mod topology;
mod transport;

pub(crate) use codes::*;
pub(crate) use resp::EntryFields;
pub(crate) use roles::*;
#[cfg(test)]
pub(crate) use slot::key_slot;
pub(crate) use slot::{cross_slot, group_by_slot, key_in_slot_of};
