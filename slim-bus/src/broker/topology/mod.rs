//! Which server a command goes to: the one server behind the URL ([`SingleServer`]), or
//! the master of the key's hash slot in a Redis Cluster ([`Cluster`]), whose slot map is
//! learnt from the cluster and corrected by `MOVED` replies.

mod cluster;
mod single;
mod slot_map;

use redis::Value;

pub(crate) use cluster::{Cluster, ClusterCommands, NodeAddr};
pub(crate) use single::SingleServer;

use crate::broker::redis::commands::TimedConnection;
use crate::broker::slot::{group_by_slot, key_slot};
use crate::broker::transport::Endpoint;
use crate::error::Result;

/// The server (or servers) a broker talks to.
// One per broker, never moved after it is built: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Topology {
    Single(SingleServer),
    Cluster(Cluster),
}

/// Which connection, of a bus's read or tail connections, serves a key: the one per
/// hash slot on a cluster, the one on a single server.
pub(crate) type ConnectionKey = Option<u16>;

impl Topology {
    /// A handle on the connection for acks, claims, scripts and group management.
    pub(crate) fn commands(&self) -> Commands {
        match self {
            Topology::Single(single) => Commands::Single(single.commands()),
            Topology::Cluster(cluster) => Commands::Cluster(cluster.commands()),
        }
    }

    pub(crate) fn cluster(&self) -> Option<&Cluster> {
        match self {
            Topology::Single(_) => None,
            Topology::Cluster(cluster) => Some(cluster),
        }
    }

    /// The server named in errors and logs: the URL's, or the first seed's.
    pub(crate) fn describe(&self) -> String {
        match self {
            Topology::Single(single) => single.endpoint().info.addr().to_string(),
            Topology::Cluster(cluster) => cluster.describe(),
        }
    }

    /// Which of the bus's own connections serve `key`.
    pub(crate) fn connection_key(&self, key: &str) -> ConnectionKey {
        match self {
            Topology::Single(_) => None,
            Topology::Cluster(_) => Some(key_slot(key.as_bytes())),
        }
    }

    /// The node that serves keys of `connection`: the master of its slot on a cluster
    /// (asking the cluster when the slot map is not known or out of date), `None` on a
    /// single server.
    pub(crate) async fn node(&self, connection: ConnectionKey) -> Result<Option<NodeAddr>> {
        match (self, connection) {
            (Topology::Cluster(cluster), Some(slot)) => {
                Ok(Some(cluster.master_of_slot(slot).await?))
            }
            (Topology::Cluster(cluster), None) => Ok(Some(cluster.master_of_slot(0).await?)),
            (Topology::Single(_), _) => Ok(None),
        }
    }

    /// Where a read or publish connection to `node` goes (the one server for `None`).
    pub(crate) fn endpoint(&self, node: Option<&NodeAddr>) -> Endpoint {
        match (self, node) {
            (Topology::Cluster(cluster), Some(node)) => cluster.endpoint(node),
            (Topology::Cluster(cluster), None) => cluster.endpoint(&cluster.first_seed()),
            (Topology::Single(single), _) => single.endpoint().clone(),
        }
    }

    /// A connection of the bus's own to `node` (or the one server) broke.
    pub(crate) fn connection_lost(&self) {
        if let Topology::Cluster(cluster) = self {
            cluster.connection_lost();
        }
    }

    /// A `MOVED` reply: `slot` is served by `node` now.
    pub(crate) fn moved(&self, slot: u16, node: NodeAddr) {
        if let Topology::Cluster(cluster) = self {
            cluster.moved(slot, node);
        }
    }

    /// Takes note of an error reply to a command on a bus's own connection: a `MOVED` names
    /// the slot's new master. Returns where to send the command again: the new master for
    /// `MOVED`, the importing one (with `ASKING`) for `ASK`.
    pub(crate) fn redirect(&self, line: &[u8]) -> Option<Redirect> {
        let cluster = self.cluster()?;
        let redirect = Redirect::parse(line)?;
        if !redirect.ask {
            cluster.moved(redirect.slot, redirect.node.clone());
        }
        Some(redirect)
    }
}

/// A `MOVED` or `ASK` error reply: `-MOVED 3999 127.0.0.1:6381`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Redirect {
    pub(crate) ask: bool,
    pub(crate) slot: u16,
    pub(crate) node: NodeAddr,
}

impl Redirect {
    pub(crate) fn parse(line: &[u8]) -> Option<Redirect> {
        let line = std::str::from_utf8(line.strip_prefix(b"-").unwrap_or(line)).ok()?;
        let mut words = line.split_ascii_whitespace();
        let ask = match words.next()? {
            "MOVED" => false,
            "ASK" => true,
            _ => return None,
        };
        let slot = words.next()?.parse().ok()?;
        let (host, port) = words.next()?.rsplit_once(':')?;
        Some(Redirect {
            ask,
            slot,
            node: NodeAddr {
                host: host.into(),
                port: port.parse().ok()?,
            },
        })
    }
}

/// The command connection of either topology.
#[derive(Clone)]
pub(crate) enum Commands {
    Single(TimedConnection),
    Cluster(ClusterCommands),
}

impl Commands {
    /// Sends `cmd` to `node` (the one server when `None`), whatever its keys.
    pub(crate) async fn on_node(
        &mut self,
        node: Option<&NodeAddr>,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<Value> {
        match (self, node) {
            (Commands::Cluster(cluster), Some(node)) => cluster.on_node(node, cmd).await,
            (this, _) => cmd.query_async(this).await,
        }
    }
}

impl redis::aio::ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Commands::Single(single) => single.req_packed_command(cmd),
            Commands::Cluster(cluster) => cluster.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Commands::Single(single) => single.req_packed_commands(pipeline, offset, count),
            Commands::Cluster(cluster) => cluster.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Commands::Single(single) => single.get_db(),
            Commands::Cluster(cluster) => cluster.get_db(),
        }
    }
}

/// Groups `keys` by the slot they are in, on a cluster; one group of all on a single
/// server. Each group holds the positions of its keys in `keys`, in order.
pub(crate) fn by_slot<K: AsRef<str>>(
    topology: &Topology,
    keys: &[K],
) -> Vec<(ConnectionKey, Vec<usize>)> {
    match topology {
        Topology::Single(_) if keys.is_empty() => Vec::new(),
        Topology::Single(_) => vec![(None, (0..keys.len()).collect())],
        Topology::Cluster(_) => group_by_slot(keys)
            .into_iter()
            .map(|(slot, members)| (Some(slot), members))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_and_ask_replies_name_the_slot_and_node() {
        assert_eq!(
            Redirect::parse(b"-MOVED 3999 127.0.0.1:6381"),
            Some(Redirect {
                ask: false,
                slot: 3999,
                node: NodeAddr {
                    host: "127.0.0.1".into(),
                    port: 6381
                }
            })
        );
        let ask = Redirect::parse(b"ASK 1 ::1:7000").expect("an ASK");
        assert!(ask.ask);
        assert_eq!(ask.node.host.as_ref(), "::1");
        assert_eq!(Redirect::parse(b"-NOGROUP no such group"), None);
        assert_eq!(Redirect::parse(b"-MOVED x y"), None);
    }
}
