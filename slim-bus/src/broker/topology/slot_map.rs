//! Which master of a Redis Cluster serves which hash slot: the ranges `CLUSTER SLOTS`
//! answers with, and the slots `MOVED` replies placed elsewhere since.

use std::collections::HashMap;

use redis::Value;

use super::NodeAddr;

/// Which master serves which slots.
#[derive(Debug, Default)]
pub(super) struct SlotMap {
    /// `(first slot, last slot, master)`, in slot order.
    pub(super) ranges: Vec<(u16, u16, NodeAddr)>,
    /// Slots a `MOVED` reply placed elsewhere since the last `CLUSTER SLOTS`.
    pub(super) moved: HashMap<u16, NodeAddr>,
    /// A connection to a master broke: the map may be out of date (a failover).
    pub(super) stale: bool,
}

impl SlotMap {
    pub(super) fn master_of(&self, slot: u16) -> Option<&NodeAddr> {
        if let Some(moved) = self.moved.get(&slot) {
            return Some(moved);
        }
        let index = self.ranges.partition_point(|(_, last, _)| *last < slot);
        self.ranges
            .get(index)
            .filter(|(first, _, _)| *first <= slot)
            .map(|(_, _, node)| node)
    }

    pub(super) fn masters(&self) -> Vec<NodeAddr> {
        let mut masters: Vec<NodeAddr> = Vec::new();
        for (_, _, node) in &self.ranges {
            if !masters.contains(node) {
                masters.push(node.clone());
            }
        }
        masters
    }
}

/// The `(first, last, master)` ranges of a `CLUSTER SLOTS` reply, in slot order.
pub(super) fn parse_cluster_slots(
    reply: Value,
    asked: &str,
) -> Result<Vec<(u16, u16, NodeAddr)>, String> {
    let Value::Array(rows) = reply else {
        return Err(format!("CLUSTER SLOTS did not answer an array: {reply:?}"));
    };
    let mut ranges = Vec::with_capacity(rows.len());
    for row in rows {
        let Value::Array(fields) = row else {
            return Err("a CLUSTER SLOTS row is not an array".to_owned());
        };
        let mut fields = fields.into_iter();
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err("a CLUSTER SLOTS row lacks its range or master".to_owned());
        };
        let mut master = master.into_iter();
        let host = match master.next() {
            Some(Value::BulkString(host)) => String::from_utf8_lossy(&host).into_owned(),
            Some(Value::SimpleString(host)) => host,
            _ => String::new(),
        };
        // As redis-rs reads them, so that both name a node alike: `?` is a master whose
        // address is not known yet (its range is left out), an empty or wildcard host is
        // the node that answered.
        if host == "?" {
            continue;
        }
        let host = if host.is_empty() || host == "0.0.0.0" || host == "::" {
            asked.to_owned()
        } else {
            host
        };
        let Some(Value::Int(port)) = master.next() else {
            return Err("a CLUSTER SLOTS master lacks its port".to_owned());
        };
        let (Ok(first), Ok(last), Ok(port)) = (
            u16::try_from(first),
            u16::try_from(last),
            u16::try_from(port),
        ) else {
            return Err("a CLUSTER SLOTS row is out of range".to_owned());
        };
        ranges.push((
            first,
            last,
            NodeAddr {
                host: host.into(),
                port,
            },
        ));
    }
    ranges.sort_by_key(|(first, _, _)| *first);
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn row(first: i64, last: i64, host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::Int(first),
            Value::Int(last),
            Value::Array(vec![bulk(host), Value::Int(port), bulk("id")]),
            Value::Array(vec![bulk(host), Value::Int(port + 1), bulk("replica")]),
        ])
    }

    #[test]
    fn cluster_slots_give_each_slot_its_master_in_slot_order() {
        let reply = Value::Array(vec![
            row(10923, 16383, "10.0.0.3", 7002),
            row(0, 5460, "10.0.0.1", 7000),
            row(5461, 10922, "", 7001),
            row(10000, 10000, "?", 7009),
        ]);
        let ranges = parse_cluster_slots(reply, "seed").expect("a CLUSTER SLOTS reply");
        let map = SlotMap {
            ranges,
            ..SlotMap::default()
        };
        assert_eq!(
            map.master_of(0).expect("a master").to_string(),
            "10.0.0.1:7000"
        );
        assert_eq!(
            map.master_of(5460).expect("a master").to_string(),
            "10.0.0.1:7000"
        );
        assert_eq!(
            map.master_of(5461).expect("a master").to_string(),
            "seed:7001"
        );
        assert_eq!(
            map.master_of(16383).expect("a master").to_string(),
            "10.0.0.3:7002"
        );
        assert_eq!(map.masters().len(), 3);
    }

    #[test]
    fn a_moved_slot_goes_to_its_new_master_and_gaps_to_none() {
        let reply = Value::Array(vec![row(0, 99, "a", 1), row(200, 16383, "b", 2)]);
        let mut map = SlotMap {
            ranges: parse_cluster_slots(reply, "seed").expect("a CLUSTER SLOTS reply"),
            ..SlotMap::default()
        };
        assert!(map.master_of(150).is_none());
        map.moved.insert(
            5,
            NodeAddr {
                host: "b".into(),
                port: 2,
            },
        );
        assert_eq!(map.master_of(5).expect("a master").to_string(), "b:2");
        assert_eq!(map.master_of(6).expect("a master").to_string(), "a:1");
    }

    #[test]
    fn a_reply_that_is_not_cluster_slots_is_an_error() {
        assert!(parse_cluster_slots(Value::Okay, "seed").is_err());
        assert!(parse_cluster_slots(Value::Array(vec![Value::Int(1)]), "seed").is_err());
    }
}
