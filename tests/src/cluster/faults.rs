//! The faults a test puts a [`RedisCluster`] through: a master killed with `SIGKILL` until
//! its replica takes over (after waiting for the replica to catch up, if asked), and a
//! slot migrated to another master, optionally held between its keys and its slot.

use std::io;

use tokio::time::Instant;

use super::nodes::node_view;
use super::{
    COMMAND_TIMEOUT, FAILOVER_TIMEOUT, MIGRATE_BATCH, MIGRATE_TIMEOUT, POLL_INTERVAL, RedisCluster,
    millis, query,
};

impl RedisCluster {
    /// Kills the master on `port` with `SIGKILL` and waits (bounded) until its replica
    /// has been promoted: the replica calls itself a master, and every running node
    /// reports `cluster_state:ok` with all slots served again. Returns the promoted
    /// replica's port. The killed node stays down.
    ///
    /// # Errors
    ///
    /// When `port` is not a running master with a replica, or the failover does not
    /// complete in time (the message carries the nodes' state and logs).
    pub async fn kill_master(&mut self, port: u16) -> io::Result<u16> {
        let view = self.view().await?;
        let master = view
            .iter()
            .find(|line| line.port == port && line.is_serving_master())
            .ok_or_else(|| io::Error::other(format!("port {port} is not a serving master")))?;
        // The master's own word on its replicas: another node's view may lag behind.
        let replica = self
            .online_replicas(master.port)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                io::Error::other(format!("the master on {port} has no replica in sync"))
            })?;
        let index = self
            .nodes
            .iter()
            .position(|node| node.port() == port)
            .ok_or_else(|| io::Error::other(format!("port {port} is no node of this cluster")))?;
        self.nodes[index].server.kill()?;
        let deadline = Instant::now() + FAILOVER_TIMEOUT;
        loop {
            let promoted = match node_view(&self.node(replica).server).await {
                Ok(view) => view
                    .iter()
                    .any(|line| line.has_flag("myself") && line.is_serving_master()),
                Err(_) => false,
            };
            if promoted && self.all_ok().await.is_ok() {
                return Ok(replica);
            }
            if Instant::now() >= deadline {
                return Err(self
                    .timed_out(
                        FAILOVER_TIMEOUT,
                        &format!(
                            "the replica on {replica} to take over from the killed master on {port}"
                        ),
                    )
                    .await);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Moves `slot`, and every key in it, from the master serving it to the master on
    /// `to`, as `redis-cli --cluster reshard` does: `CLUSTER SETSLOT ... IMPORTING` on the
    /// target and `MIGRATING` on the source, `MIGRATE` of its keys in batches, then
    /// `CLUSTER SETSLOT ... NODE` on every master. Waits (bounded) until every running
    /// node sees the target serve the slot. While keys move, the source answers `ASK` for
    /// those already moved; afterwards it answers `MOVED`.
    ///
    /// # Errors
    ///
    /// When `to` is not a serving master, a step fails, or the nodes do not agree in time.
    pub async fn migrate_slot(&self, slot: u16, to: u16) -> io::Result<()> {
        self.migrate_slot_with(slot, to, async {}).await
    }

    /// [`migrate_slot`](Self::migrate_slot), awaiting `meanwhile` after the slot's keys
    /// moved and before the slot does: while it runs the source answers `ASK` for every
    /// key of the slot, which is now on the target.
    ///
    /// # Errors
    ///
    /// As [`migrate_slot`](Self::migrate_slot).
    pub async fn migrate_slot_with<T>(
        &self,
        slot: u16,
        to: u16,
        meanwhile: impl Future<Output = T>,
    ) -> io::Result<T> {
        let view = self.view().await?;
        let source = view
            .iter()
            .find(|line| line.is_serving_master() && line.serves(slot))
            .ok_or_else(|| io::Error::other(format!("no master serves slot {slot}")))?;
        let target = view
            .iter()
            .find(|line| line.port == to && line.has_flag("master") && !line.has_flag("fail"))
            .ok_or_else(|| io::Error::other(format!("port {to} is not a master")))?;
        if source.port == target.port {
            return Ok(meanwhile.await);
        }
        let (source_node, target_node) = (&self.node(source.port).server, &self.node(to).server);
        let setslot = |state: &str, id: &str| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
            cmd
        };
        query::<()>(target_node, &setslot("IMPORTING", &source.id)).await?;
        query::<()>(source_node, &setslot("MIGRATING", &target.id)).await?;
        loop {
            let keys: Vec<String> = query(
                source_node,
                redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(MIGRATE_BATCH),
            )
            .await?;
            if keys.is_empty() {
                break;
            }
            query::<()>(
                source_node,
                redis::cmd("MIGRATE")
                    .arg("127.0.0.1")
                    .arg(to)
                    .arg("")
                    .arg(0)
                    .arg(millis(COMMAND_TIMEOUT))
                    .arg("KEYS")
                    .arg(&keys),
            )
            .await?;
        }
        let outcome = meanwhile.await;
        // The target first, so that it serves the slot before the source sends clients
        // there for good.
        query::<()>(target_node, &setslot("NODE", &target.id)).await?;
        query::<()>(source_node, &setslot("NODE", &target.id)).await?;
        for line in view
            .iter()
            .filter(|line| line.is_serving_master() && line.port != source.port && line.port != to)
        {
            query::<()>(&self.node(line.port).server, &setslot("NODE", &target.id)).await?;
        }
        let deadline = Instant::now() + MIGRATE_TIMEOUT;
        loop {
            let mut agreed = true;
            for node in self.running() {
                let sees_target = node_view(&node.server).await.is_ok_and(|view| {
                    view.iter()
                        .any(|line| line.id == target.id && line.serves(slot))
                });
                agreed &= sees_target;
            }
            if agreed {
                return Ok(outcome);
            }
            if Instant::now() >= deadline {
                return Err(self
                    .timed_out(
                        MIGRATE_TIMEOUT,
                        &format!("every node to see slot {slot} served by the master on {to}"),
                    )
                    .await);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits (bounded) until every replica of the master on `port` has everything the
    /// master had when this was called (its `master_repl_offset`): a write before the call
    /// then survives a failover.
    ///
    /// # Errors
    ///
    /// When the master does not answer, or a replica does not catch up in time.
    pub async fn wait_for_replication(&self, port: u16) -> io::Result<()> {
        let replication = || async {
            let info: String = query(
                &self.node(port).server,
                redis::cmd("INFO").arg("replication"),
            )
            .await?;
            let field = |line: &str, name: &str| -> Option<u64> {
                line.split(',')
                    .find_map(|field| field.strip_prefix(name)?.trim().parse().ok())
            };
            let master = info
                .lines()
                .find_map(|line| {
                    line.strip_prefix("master_repl_offset:")?
                        .trim()
                        .parse()
                        .ok()
                })
                .unwrap_or(0u64);
            let replicas: Vec<u64> = info
                .lines()
                .filter(|line| line.starts_with("slave") && line.contains("state=online"))
                .filter_map(|line| field(line, "offset="))
                .collect();
            io::Result::Ok((master, replicas))
        };
        let (target, _) = replication().await?;
        let deadline = Instant::now() + FAILOVER_TIMEOUT;
        loop {
            let (_, replicas) = replication().await?;
            if !replicas.is_empty() && replicas.iter().all(|&offset| offset >= target) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self
                    .timed_out(
                        FAILOVER_TIMEOUT,
                        &format!("the replicas of the master on {port} to reach offset {target}"),
                    )
                    .await);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}
