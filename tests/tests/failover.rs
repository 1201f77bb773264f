//! Failovers behind a stable address: the primary the bus talks to is demoted to a
//! replica and the address now leads to the promoted one, or the address leads to a
//! replica for a while. Connections that answer `READONLY` must be replaced, so that
//! publishes, reads and acks reach the primary the address leads to.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use slim_bus::EventBus;
use slim_bus_tests::{Proxy, RedisServer, within};
use support::*;

async fn command(server: &RedisServer, args: &[&str]) -> redis::Value {
    let mut conn = server.connection().await;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    within(args[0], STEP, cmd.query_async(&mut conn))
        .await
        .unwrap_or_else(|e| panic!("{args:?} failed: {e}"))
}

/// Waits until `replica` is in sync with its primary.
async fn until_linked(replica: &RedisServer) {
    within("the replica to link to its primary", STEP, async {
        loop {
            if let redis::Value::BulkString(info) = command(replica, &["INFO", "replication"]).await
                && String::from_utf8_lossy(&info).contains("master_link_status:up")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A primary with a linked replica, a proxy in front of the primary, and a bus listening
/// through the proxy that has handled its first entry.
struct Failover {
    primary: RedisServer,
    replica: RedisServer,
    proxy: Proxy,
    bus: EventBus,
    listener: slim_bus::Listener,
    seen: tokio::sync::mpsc::UnboundedReceiver<Seen<UserCreated>>,
}

impl Failover {
    async fn start() -> Self {
        slim_bus_tests::init_tracing();
        // A replica's first sync would otherwise wait 5 s for more replicas to join.
        let primary = within(
            "the primary to start",
            STEP,
            RedisServer::builder()
                .arg("--repl-diskless-sync-delay")
                .arg("0")
                .start(),
        )
        .await
        .unwrap();
        let replica = within(
            "the replica to start",
            STEP,
            RedisServer::builder()
                .arg("--replicaof")
                .arg("127.0.0.1")
                .arg(primary.port().to_string())
                .start(),
        )
        .await
        .unwrap();
        until_linked(&replica).await;
        let proxy = Proxy::start(([127, 0, 0, 1], primary.port()))
            .await
            .unwrap();
        let (handler, mut seen) = Record::<UserCreated>::new();
        let bus = within(
            "build",
            STEP,
            EventBus::builder()
                .url(proxy.url())
                .consumer_group("tests")
                .consumer_name("consumer-1")
                .block_time(Duration::from_millis(200))
                .command_timeout(Duration::from_secs(1))
                .handler(handler)
                .build(),
        )
        .await
        .unwrap();
        let listener = within("listen", STEP, bus.listen()).await.unwrap();
        within("publish", STEP, bus.publish(&user(1)))
            .await
            .unwrap();
        assert_eq!(recv(&mut seen, "the first entry").await.event.seq, 1);
        Failover {
            primary,
            replica,
            proxy,
            bus,
            listener,
            seen,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_bus_goes_on_with_the_new_primary_behind_the_same_address() {
    let Failover {
        primary,
        replica,
        proxy,
        bus,
        listener,
        mut seen,
    } = Failover::start().await;
    until_nothing_pending(&primary, "user.created", "tests").await;
    command(&primary, &["WAIT", "1", "5000"]).await;

    // The failover: the replica is promoted, the old primary follows it, and the address
    // the bus knows leads to the new primary from now on.
    command(&replica, &["REPLICAOF", "NO", "ONE"]).await;
    let replica_port = replica.port().to_string();
    command(&primary, &["REPLICAOF", "127.0.0.1", &replica_port]).await;
    proxy.set_upstream(([127, 0, 0, 1], replica.port()));

    // The publishing connection still reaches the old primary, which refuses writes now;
    // once it is replaced, a publish goes through.
    let id = within("a publish to go through after the failover", STEP, async {
        loop {
            match bus.publish(&user(2)).await {
                Ok(id) => return id,
                Err(error) => {
                    eprintln!("publish failed: {:#}", anyhow::Error::new(error));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await;
    let delivery = recv(&mut seen, "the entry published after the failover").await;
    assert_eq!((delivery.event.seq, delivery.entry_id), (2, id));
    // Acknowledged on the new primary: the command connection was replaced too.
    until_nothing_pending(&replica, "user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// Whether `server` has refused an `XREADGROUP` (as a replica refuses writes).
async fn refused_reads(server: &RedisServer) -> bool {
    let stats = match command(server, &["INFO", "commandstats"]).await {
        redis::Value::BulkString(stats) => String::from_utf8_lossy(&stats).into_owned(),
        other => panic!("INFO answered {other:?}"),
    };
    stats
        .lines()
        .find(|line| line.starts_with("cmdstat_xreadgroup:"))
        .and_then(|line| {
            line.split(',')
                .find_map(|part| part.strip_prefix("rejected_calls="))
        })
        .is_some_and(|rejected| rejected != "0")
}

/// The address leads to a replica for a while (a DNS name moved to the wrong server), then
/// back to the primary: the connections opened meanwhile reach the replica and are
/// refused with `READONLY`; they must not be kept once the address is right again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_reached_a_replica_are_replaced_once_the_address_leads_back_to_the_primary()
 {
    let Failover {
        primary,
        replica,
        proxy,
        bus,
        listener,
        mut seen,
    } = Failover::start().await;

    // Every connection the bus opens from now on reaches the replica.
    proxy.set_upstream(([127, 0, 0, 1], replica.port()));
    proxy.drop_connections();
    within("a publish to be refused by the replica", STEP, async {
        loop {
            if let Err(error) = bus.publish(&user(99)).await
                && format!("{:#}", anyhow::Error::new(error)).contains("read only replica")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    within("the reader to be refused by the replica", STEP, async {
        while !refused_reads(&replica).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    proxy.set_upstream(([127, 0, 0, 1], primary.port()));
    let id = within("a publish to reach the primary again", STEP, async {
        loop {
            match bus.publish(&user(2)).await {
                Ok(id) => return id,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    let delivery = recv(
        &mut seen,
        "the entry published after the address moved back",
    )
    .await;
    assert_eq!((delivery.event.seq, delivery.entry_id), (2, id));
    until_nothing_pending(&primary, "user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}
