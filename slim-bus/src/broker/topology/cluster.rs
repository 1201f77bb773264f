//! A Redis Cluster: which master serves each hash slot, learnt from `CLUSTER SLOTS` and
//! corrected by `MOVED` replies, and a redis-rs cluster connection for every command but
//! reads of new entries and publishes (which go over RESP connections of their own to the
//! master of their slot).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{ConnectionAddr, ConnectionInfo, TlsCertificates, Value};
use tokio::sync::OnceCell;
use tokio_rustls::TlsConnector;

use super::slot_map::{SlotMap, parse_cluster_slots};
use crate::broker::redis::commands::wait_to_connect_again;
use crate::broker::transport::Endpoint;
use crate::error::{Error, Result};

/// How long a refresh waits for one node to answer `CLUSTER SLOTS`.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after a failed refresh the next one is tried.
const RETRY_REFRESH: Duration = Duration::from_millis(200);

/// A master's address, as the cluster announces it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct NodeAddr {
    pub(crate) host: Arc<str>,
    pub(crate) port: u16,
}

impl std::fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A Redis Cluster behind one or more seed nodes.
pub(crate) struct Cluster {
    /// The first seed's address, credentials and TLS settings: every node is reached
    /// with them.
    template: ConnectionInfo,
    seeds: Vec<NodeAddr>,
    tls: Option<TlsConnector>,
    certificates: Option<TlsCertificates>,
    client: Arc<ClusterClient>,
    commands: Arc<OnceCell<ClusterConnection>>,
    command_timeout: Duration,
    slots: RwLock<SlotMap>,
    /// Held while `CLUSTER SLOTS` is asked, so that concurrent misses ask once; holds when
    /// the last attempt failed, and why.
    refreshing: tokio::sync::Mutex<Option<(Instant, String)>>,
}

/// The address of a `redis://` or `rediss://` node.
fn node_addr(info: &ConnectionInfo) -> Option<NodeAddr> {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            Some(NodeAddr {
                host: host.as_str().into(),
                port: *port,
            })
        }
        _ => None,
    }
}

impl Cluster {
    /// The cluster behind `seeds` (at least one), its command connection opening in the
    /// background: this fails only for seeds the bus cannot use, never because the cluster
    /// is down.
    pub(crate) fn new(
        seeds: Vec<ConnectionInfo>,
        tls: Option<(TlsConnector, TlsCertificates)>,
        command_timeout: Duration,
    ) -> Result<Self> {
        let template = seeds.first().cloned().ok_or_else(|| {
            Error::config(
                "cluster_nodes",
                "must name at least one node of the cluster",
            )
        })?;
        let seed_addrs = seeds
            .iter()
            .map(|info| {
                node_addr(info).ok_or_else(|| {
                    Error::config(
                        "cluster_nodes",
                        format!("{} is not a TCP address", info.addr()),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut builder = ClusterClient::builder(seeds)
            .connection_timeout(crate::broker::redis::CONNECT_TIMEOUT.min(command_timeout))
            .response_timeout(command_timeout);
        let (tls, certificates) = match tls {
            Some((connector, certificates)) => {
                builder = builder
                    .tls(redis::TlsMode::Secure)
                    .certs(certificates.clone());
                (Some(connector), Some(certificates))
            }
            None => (None, None),
        };
        let client = builder.build().map_err(|e| {
            Error::config("cluster_nodes", format!("cannot be used as a cluster: {e}"))
        })?;
        let cluster = Cluster {
            template,
            seeds: seed_addrs,
            tls,
            certificates,
            client: Arc::new(client),
            commands: Arc::new(OnceCell::new()),
            command_timeout,
            slots: RwLock::new(SlotMap::default()),
            refreshing: tokio::sync::Mutex::new(None),
        };
        cluster.connect_in_background();
        Ok(cluster)
    }

    /// Opens the command connection in a background task, retrying with backoff, so that
    /// the first command finds it open.
    fn connect_in_background(&self) {
        let cell = Arc::downgrade(&self.commands);
        let client = self.client.clone();
        tokio::spawn(async move {
            let mut backoff =
                crate::consumer::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            loop {
                let Some(cell) = cell.upgrade() else {
                    return;
                };
                if cell.initialized() {
                    return;
                }
                match cell.get_or_try_init(|| client.get_async_connection()).await {
                    Ok(_) => {
                        tracing::info!("connected to the redis cluster");
                        return;
                    }
                    Err(error) => {
                        drop(cell);
                        wait_to_connect_again(&mut backoff, &error, "the redis cluster").await;
                    }
                }
            }
        });
    }

    /// A handle on the command connection: redis-rs routes each command by its key and
    /// follows `MOVED`, `ASK` and failovers itself.
    pub(crate) fn commands(&self) -> ClusterCommands {
        ClusterCommands {
            cell: self.commands.clone(),
            client: self.client.clone(),
            timeout: self.command_timeout,
        }
    }

    /// The address commands are described with in errors: the first seed.
    pub(crate) fn describe(&self) -> String {
        self.seeds
            .first()
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    /// The master serving `slot`: from the slot map, asking the cluster first when the
    /// map is not known or out of date (a connection broke). When no node answers, a
    /// stale map is used as it is.
    pub(crate) async fn master_of_slot(&self, slot: u16) -> Result<NodeAddr> {
        let (known, stale) = {
            let map = self.read_map();
            (map.master_of(slot).cloned(), map.stale)
        };
        if let (Some(node), false) = (&known, stale) {
            return Ok(node.clone());
        }
        // While another caller refreshes, what is known serves: a refresh can take the
        // command timeout when a node does not answer, and should cost one caller that.
        if let Some(node) = &known
            && self.refreshing.try_lock().is_err()
        {
            return Ok(node.clone());
        }
        match self.refresh().await {
            Ok(()) => {}
            Err(error) => match known {
                Some(node) => {
                    tracing::debug!(
                        error = &error as &dyn std::error::Error,
                        %node,
                        "could not refresh the cluster's slots; using what was known"
                    );
                    return Ok(node);
                }
                None => return Err(error),
            },
        }
        self.read_map().master_of(slot).cloned().ok_or_else(|| {
            Error::redis(
                format!("finding the master of hash slot {slot}"),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no master of the cluster serves it",
                )
                .into(),
            )
        })
    }

    /// The first seed node.
    pub(crate) fn first_seed(&self) -> NodeAddr {
        self.seeds[0].clone()
    }

    /// The endpoint of one node, reached with the seeds' credentials and TLS settings.
    pub(crate) fn endpoint(&self, node: &NodeAddr) -> Endpoint {
        let addr = match self.template.addr() {
            ConnectionAddr::TcpTls { .. } => ConnectionAddr::TcpTls {
                host: node.host.to_string(),
                port: node.port,
                insecure: false,
                tls_params: None,
            },
            _ => ConnectionAddr::Tcp(node.host.to_string(), node.port),
        };
        Endpoint {
            info: self.template.clone().set_addr(addr),
            tls: self.tls.clone(),
        }
    }

    /// A `MOVED` reply: `slot` is served by `node` now.
    pub(crate) fn moved(&self, slot: u16, node: NodeAddr) {
        tracing::debug!(slot, %node, "hash slot moved");
        self.write_map().moved.insert(slot, node);
    }

    /// A connection to a master broke: ask the cluster for its slots before the next
    /// connection to one of them, in case a replica took over.
    pub(crate) fn connection_lost(&self) {
        self.write_map().stale = true;
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, SlotMap> {
        self.slots
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, SlotMap> {
        self.slots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks the known masters, then the seeds, for `CLUSTER SLOTS` until one answers,
    /// unless another refresh did meanwhile, all within the command timeout. After a
    /// failed attempt, callers for [`RETRY_REFRESH`] get its error rather than each make
    /// one of their own.
    async fn refresh(&self) -> Result<()> {
        let mut last_failure = self.refreshing.lock().await;
        let candidates = {
            let map = self.read_map();
            if !map.stale && !map.ranges.is_empty() {
                return Ok(());
            }
            let mut candidates = map.masters();
            for seed in &self.seeds {
                if !candidates.contains(seed) {
                    candidates.push(seed.clone());
                }
            }
            candidates
        };
        let not_known = |cause: String| {
            Error::redis(
                "asking the cluster which master serves which slots",
                std::io::Error::new(std::io::ErrorKind::NotConnected, cause).into(),
            )
        };
        if let Some((at, cause)) = last_failure.as_ref()
            && at.elapsed() < RETRY_REFRESH
        {
            return Err(not_known(cause.clone()));
        }
        // Every candidate at once, the first answer wins: a node that does not answer
        // holds up no other.
        let asked = tokio::time::timeout(self.command_timeout, async {
            let mut asking: FuturesUnordered<_> = candidates
                .iter()
                .map(|node| async move { (node, self.cluster_slots(node).await) })
                .collect();
            let mut failures = Vec::new();
            while let Some((node, answer)) = asking.next().await {
                match answer {
                    Ok(ranges) if !ranges.is_empty() => return Ok(ranges),
                    Ok(_) => failures.push(format!("{node} serves no slots")),
                    Err(error) => failures.push(format!("{node}: {error}")),
                }
            }
            Err(failures.join("; "))
        })
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no node answered within {:?}",
                self.command_timeout
            ))
        });
        match asked {
            Ok(ranges) => {
                *last_failure = None;
                let mut map = self.write_map();
                if map.ranges != ranges {
                    tracing::debug!(masters = ranges.len(), "learnt the cluster's slots");
                }
                *map = SlotMap {
                    ranges,
                    moved: HashMap::new(),
                    stale: false,
                };
                Ok(())
            }
            Err(cause) => {
                *last_failure = Some((Instant::now(), cause.clone()));
                Err(not_known(cause))
            }
        }
    }

    async fn cluster_slots(
        &self,
        node: &NodeAddr,
    ) -> redis::RedisResult<Vec<(u16, u16, NodeAddr)>> {
        let info = self.endpoint(node).info;
        let client = match &self.certificates {
            Some(certificates) => redis::Client::build_with_tls(info, certificates.clone())?,
            None => redis::Client::open(info)?,
        };
        let reply: Value = tokio::time::timeout(REFRESH_TIMEOUT, async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async(&mut connection)
                .await
        })
        .await
        .map_err(|_| {
            redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer in time",
            ))
        })??;
        parse_cluster_slots(reply, &node.host).map_err(|detail| {
            redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::InvalidData, detail))
        })
    }
}

/// The cluster's command connection with every request bounded by the command timeout,
/// opening it first if the background task has not yet.
#[derive(Clone)]
pub(crate) struct ClusterCommands {
    cell: Arc<OnceCell<ClusterConnection>>,
    client: Arc<ClusterClient>,
    timeout: Duration,
}

impl ClusterCommands {
    async fn connection(&self) -> redis::RedisResult<ClusterConnection> {
        self.cell
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }

    fn timed_out(&self) -> redis::RedisError {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the redis cluster did not answer within {:?}", self.timeout),
        )
        .into()
    }

    /// Sends `cmd` to the node at `node`, whatever its keys: `CLIENT UNBLOCK` of a read
    /// blocked there.
    pub(crate) async fn on_node(
        &self,
        node: &NodeAddr,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<Value> {
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: node.host.to_string(),
            port: node.port,
        });
        tokio::time::timeout(self.timeout, async {
            self.connection()
                .await?
                .route_command(cmd.clone(), routing)
                .await
        })
        .await
        .unwrap_or_else(|_| Err(self.timed_out()))
    }
}

impl redis::aio::ConnectionLike for ClusterCommands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, async {
                self.connection().await?.req_packed_command(cmd).await
            })
            .await
            .unwrap_or_else(|_| Err(self.timed_out()))
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, async {
                self.connection()
                    .await?
                    .req_packed_commands(pipeline, offset, count)
                    .await
            })
            .await
            .unwrap_or_else(|_| Err(self.timed_out()))
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}
