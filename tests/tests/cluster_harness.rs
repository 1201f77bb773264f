//! The Redis Cluster harness itself (`slim_bus_tests::RedisCluster`): the cluster forms
//! with three masters, keys of three slots land on three masters, a killed master's
//! replica takes over with the data, and a migrated slot is answered by its new owner.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use redis::AsyncCommands;
use slim_bus_tests::{RedisCluster, within};

/// Six nodes starting and agreeing on a loaded 2-core machine.
const START: Duration = Duration::from_secs(120);
/// A failover waits for the node timeout (2 s) and an election.
const FAILOVER: Duration = Duration::from_secs(90);
const STEP: Duration = Duration::from_secs(15);

async fn start() -> RedisCluster {
    slim_bus_tests::init_tracing();
    within("the cluster to start", START, RedisCluster::start())
        .await
        .unwrap()
}

/// A key for each master: names `key-0`, `key-1`, ... until each master serves one.
async fn key_per_master(cluster: &RedisCluster) -> Vec<(String, u16)> {
    let masters = cluster.masters().await.unwrap();
    let mut found: Vec<(String, u16)> = Vec::new();
    for n in 0.. {
        let key = format!("key-{n}");
        let owner = cluster.master_of(&key).await.unwrap();
        if !found.iter().any(|(_, port)| *port == owner) {
            found.push((key, owner));
        }
        if found.len() == masters.len() {
            return found;
        }
    }
    unreachable!()
}

/// `GET key` on the node at `port`: the value, or where the node redirects to.
async fn get_on(
    cluster: &RedisCluster,
    port: u16,
    key: &str,
) -> Result<Option<String>, (String, u16)> {
    let mut connection = within(
        "a connection",
        STEP,
        cluster.node(port).server().connection(),
    )
    .await;
    match within("GET", STEP, connection.get::<_, Option<String>>(key)).await {
        Ok(value) => Ok(value),
        Err(error) => match error.redirect_node() {
            Some((addr, slot)) => Err((addr.to_owned(), slot)),
            None => panic!("GET {key} on {port} failed: {error}"),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_three_masters_serves_keys_on_each_and_moves_a_slot() {
    let cluster = start().await;
    let masters = cluster.masters().await.unwrap();
    assert_eq!(masters.len(), 3, "three masters serve slots");
    assert_eq!(cluster.nodes().len(), 6);

    let keys = key_per_master(&cluster).await;
    let owners: BTreeSet<u16> = keys.iter().map(|(_, port)| *port).collect();
    assert_eq!(owners.len(), 3, "the keys land on three masters: {keys:?}");
    for (key, owner) in &keys {
        let mut connection = within(
            "a connection",
            STEP,
            cluster.node(*owner).server().connection(),
        )
        .await;
        within("SET", STEP, connection.set::<_, _, ()>(key, "v1"))
            .await
            .unwrap();
        assert_eq!(
            get_on(&cluster, *owner, key).await,
            Ok(Some("v1".to_owned()))
        );
        let other = masters.iter().find(|port| *port != owner).unwrap();
        let slot = cluster.slot_of(key).await.unwrap();
        assert_eq!(
            get_on(&cluster, *other, key).await,
            Err((format!("127.0.0.1:{owner}"), slot)),
            "another master redirects to the owner"
        );
    }

    let (key, from) = keys[0].clone();
    let to = keys[1].1;
    let slot = cluster.slot_of(&key).await.unwrap();
    within(
        "the slot to migrate",
        STEP * 2,
        cluster.migrate_slot(slot, to),
    )
    .await
    .unwrap();
    assert_eq!(cluster.master_of_slot(slot).await.unwrap(), to);
    assert_eq!(
        get_on(&cluster, to, &key).await,
        Ok(Some("v1".to_owned())),
        "the key moved with its slot"
    );
    assert_eq!(
        get_on(&cluster, from, &key).await,
        Err((format!("127.0.0.1:{to}"), slot)),
        "the old owner sends clients to the new one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_by_its_replica_with_the_data() {
    let mut cluster = start().await;
    let key = "orders";
    let master = cluster.master_of(key).await.unwrap();
    let mut connection = within(
        "a connection",
        STEP,
        cluster.node(master).server().connection(),
    )
    .await;
    within("SET", STEP, connection.set::<_, _, ()>(key, "paid"))
        .await
        .unwrap();
    // The write reached the replica before the master dies.
    let replicas: i64 = within(
        "WAIT",
        STEP,
        redis::cmd("WAIT")
            .arg(1)
            .arg(5000)
            .query_async(&mut connection),
    )
    .await
    .unwrap();
    assert_eq!(replicas, 1);

    let promoted = within("the failover", FAILOVER, cluster.kill_master(master))
        .await
        .unwrap();
    assert_ne!(promoted, master);
    assert!(!cluster.node(master).is_running());
    assert_eq!(cluster.master_of(key).await.unwrap(), promoted);
    assert_eq!(
        cluster.masters().await.unwrap().len(),
        3,
        "three masters serve slots again"
    );
    assert_eq!(
        get_on(&cluster, promoted, key).await,
        Ok(Some("paid".to_owned()))
    );
    assert_eq!(cluster.urls().len(), 5, "seed URLs name the running nodes");
}
