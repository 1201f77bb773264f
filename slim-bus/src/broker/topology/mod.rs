//! Which server a command goes to. Today that is always the one server behind the URL
//! ([`SingleServer`]). A Redis Cluster topology belongs next to it: a map from hash slots
//! (by key hash slot) to the masters serving them, each with
//! connections of its own, refreshed on `MOVED` and after a failover.

mod single;

pub(crate) use single::SingleServer;
