//! How each node sees the cluster: the lines of `CLUSTER NODES`.

use std::io;

use super::query;
use crate::server::RedisServer;

/// One line of `CLUSTER NODES`:
/// `<id> <ip:port@bus-port> <flags> <master id or -> <ping> <pong> <epoch> <link> <slots...>`.
#[derive(Debug, Clone)]
pub(super) struct NodeLine {
    pub(super) id: String,
    pub(super) port: u16,
    pub(super) flags: Vec<String>,
    /// Slot ranges served, inclusive; migration markers (`[slot->-id]`) left out.
    pub(super) slots: Vec<(u16, u16)>,
}

impl NodeLine {
    pub(super) fn parse(line: &str) -> Option<NodeLine> {
        let mut parts = line.split_whitespace();
        let id = parts.next()?.to_owned();
        let addr = parts.next()?;
        let port = addr.split('@').next()?.rsplit(':').next()?.parse().ok()?;
        let flags = parts.next()?.split(',').map(str::to_owned).collect();
        // The master id of a replica, `-` for a master.
        parts.next()?;
        let slots = parts
            .skip(4)
            .filter(|range| !range.starts_with('['))
            .filter_map(|range| match range.split_once('-') {
                Some((first, last)) => Some((first.parse().ok()?, last.parse().ok()?)),
                None => range.parse().ok().map(|slot| (slot, slot)),
            })
            .collect();
        Some(NodeLine {
            id,
            port,
            flags,
            slots,
        })
    }

    pub(super) fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    pub(super) fn is_serving_master(&self) -> bool {
        self.has_flag("master") && !self.has_flag("fail") && !self.slots.is_empty()
    }

    pub(super) fn serves(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|&(first, last)| (first..=last).contains(&slot))
    }
}

pub(super) async fn node_view(server: &RedisServer) -> io::Result<Vec<NodeLine>> {
    let nodes: String = query(server, redis::cmd("CLUSTER").arg("NODES")).await?;
    Ok(nodes.lines().filter_map(NodeLine::parse).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_parse_with_their_slots_and_roles() {
        let master = NodeLine::parse(
            "07c3 127.0.0.1:30004@40004 myself,master - 0 0 1 connected 0-5460 5462 [5461->-e7d1]",
        )
        .expect("a master line");
        assert_eq!(master.port, 30004);
        assert!(master.has_flag("myself") && master.is_serving_master());
        assert!(master.serves(0) && master.serves(5460) && master.serves(5462));
        assert!(
            !master.serves(5461),
            "a slot being migrated away is not counted"
        );
        let replica = NodeLine::parse(
            "e7d1 127.0.0.1:30005@40005,host slave 07c3 0 1426238316232 2 connected",
        )
        .expect("a replica line");
        assert!(replica.has_flag("slave"));
        assert!(!replica.is_serving_master());
        let failed = NodeLine::parse("a1 127.0.0.1:30006@40006 master,fail - 0 0 3 disconnected")
            .expect("a failed master line");
        assert!(!failed.is_serving_master());
    }
}
