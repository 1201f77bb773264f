//! A throwaway Redis Cluster: six `redis-server --cluster-enabled yes` nodes on loopback
//! ports (three masters with a replica each), formed with `redis-cli --cluster create`,
//! and the faults a test puts it through: a master killed with `SIGKILL` until its replica
//! takes over, a slot migrated to another master.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use redis::FromRedisValue;
use tokio::time::Instant;

use self::nodes::{NodeLine, node_view};
use crate::server::{RedisServer, free_port};

mod faults;
mod nodes;

const MASTERS: usize = 3;
const REPLICAS_PER_MASTER: usize = 1;
const SLOT_COUNT: u16 = 16384;
/// How long a node may not answer before the others count it failed. Short, so that a
/// failover takes seconds; long enough that a loaded 2-core machine does not fail nodes
/// over on its own.
const NODE_TIMEOUT: Duration = Duration::from_millis(2000);
const NODE_STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a node start is tried again with new ports (another process can take the
/// cluster bus port between its probe and the server binding it).
const NODE_START_ATTEMPTS: usize = 3;
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
const FORM_TIMEOUT: Duration = Duration::from_secs(60);
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(30);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
const POLL_INTERVAL: Duration = Duration::from_millis(50);
const LOG_TAIL_LINES: usize = 20;
/// Keys moved by one `MIGRATE`.
const MIGRATE_BATCH: usize = 100;

/// A Redis Cluster of throwaway nodes, owned by the test that started it; dropping it
/// kills and reaps every node (each a [`RedisServer`], which prints its log tail when the
/// test panics).
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use slim_bus_tests::RedisCluster;
///
/// let mut cluster = RedisCluster::start().await?;
/// let owner = cluster.master_of("orders").await?;
/// let promoted = cluster.kill_master(owner).await?;
/// assert_eq!(cluster.master_of("orders").await?, promoted);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    /// `redis-cli` (or `valkey-cli`), for `--cluster create`.
    cli: PathBuf,
    /// The CA of a cluster started with [`start_tls`](RedisCluster::start_tls).
    tls_ca: Option<PathBuf>,
}

/// One node of a [`RedisCluster`].
#[derive(Debug)]
pub struct ClusterNode {
    server: RedisServer,
    /// The node id the cluster knows it by (`CLUSTER MYID`).
    id: String,
}

impl ClusterNode {
    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// `rediss://127.0.0.1:TLS_PORT/`, for a cluster started with
    /// [`start_tls`](RedisCluster::start_tls).
    ///
    /// # Panics
    ///
    /// When the cluster was started without TLS.
    pub fn tls_url(&self) -> String {
        self.server.tls_url()
    }

    /// The node id, as `CLUSTER NODES` shows it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the process runs (it does until [`RedisCluster::kill_master`] kills it).
    pub fn is_running(&self) -> bool {
        self.server.pid().is_some()
    }

    /// The node as a plain server: its connection, client, log.
    pub fn server(&self) -> &RedisServer {
        &self.server
    }
}

impl RedisCluster {
    /// Starts six nodes, forms a cluster of three masters with a replica each, and waits
    /// (bounded) until every node reports `cluster_state:ok` with all 16384 slots served
    /// and knows all six nodes, and every master's replica is in sync (so that a write
    /// `WAIT` sees replicated survives a failover).
    ///
    /// The nodes run the binary [`RedisServer`] picks (`REDIS_SERVER_BIN`, then `PATH`);
    /// the cluster is formed with the `redis-cli` or `valkey-cli` beside it, else
    /// `REDIS_CLI_BIN`, else the one on `PATH`.
    ///
    /// # Errors
    ///
    /// When a node does not start, there is no `redis-cli`, `--cluster create` fails, or
    /// the cluster is not formed in time; the message carries what the tool printed, or the
    /// nodes' `CLUSTER INFO` and log tails.
    pub async fn start() -> io::Result<Self> {
        Self::start_with(None).await
    }

    /// [`start`](Self::start), each node also serving TLS (with `certs`' server
    /// certificate, clients not authenticated), the cluster bus and replication running
    /// over TLS: a client connected over TLS learns the nodes' TLS ports from
    /// `CLUSTER SLOTS`. The plain ports stay open for the harness's own commands.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub async fn start_tls(certs: &crate::TestCertificates) -> io::Result<Self> {
        Self::start_with(Some(certs)).await
    }

    async fn start_with(tls: Option<&crate::TestCertificates>) -> io::Result<Self> {
        let mut nodes = Vec::with_capacity(MASTERS * (1 + REPLICAS_PER_MASTER));
        for _ in 0..MASTERS * (1 + REPLICAS_PER_MASTER) {
            let server = start_node(tls).await?;
            let id: String = query(&server, redis::cmd("CLUSTER").arg("MYID")).await?;
            nodes.push(ClusterNode { server, id });
        }
        let cli = find_cli(nodes[0].server.binary())?;
        let cluster = RedisCluster {
            nodes,
            cli,
            tls_ca: tls.map(crate::TestCertificates::ca),
        };
        cluster.create().await?;
        cluster
            .wait_until_ok(FORM_TIMEOUT, "the cluster to form")
            .await?;
        cluster.wait_until_replicated().await?;
        Ok(cluster)
    }

    /// Every node, masters and replicas, in the order they were started.
    pub fn nodes(&self) -> &[ClusterNode] {
        &self.nodes
    }

    /// The node listening on `port`.
    ///
    /// # Panics
    ///
    /// When no node of this cluster listens there.
    pub fn node(&self, port: u16) -> &ClusterNode {
        match self.nodes.iter().find(|node| node.port() == port) {
            Some(node) => node,
            None => panic!("no node of this cluster listens on port {port}"),
        }
    }

    /// Seed URLs: one per running node.
    pub fn urls(&self) -> Vec<String> {
        self.running().map(ClusterNode::url).collect()
    }

    /// The `redis-cli` the cluster was formed with.
    pub fn cli(&self) -> &Path {
        &self.cli
    }

    /// The ports of the masters serving slots, as a running node sees the cluster.
    ///
    /// # Errors
    ///
    /// When no running node answers `CLUSTER NODES`.
    pub async fn masters(&self) -> io::Result<Vec<u16>> {
        let view = self.view().await?;
        let mut ports: Vec<u16> = view
            .iter()
            .filter(|line| line.is_serving_master())
            .map(|line| line.port)
            .collect();
        ports.sort_unstable();
        Ok(ports)
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    ///
    /// # Errors
    ///
    /// When no running node answers.
    pub async fn slot_of(&self, key: &str) -> io::Result<u16> {
        let node = self.any_running()?;
        query(&node.server, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).await
    }

    /// The port of the master serving `slot`, as a running node sees the cluster.
    ///
    /// # Errors
    ///
    /// When no running node answers, or none serves the slot.
    pub async fn master_of_slot(&self, slot: u16) -> io::Result<u16> {
        let view = self.view().await?;
        view.iter()
            .find(|line| line.is_serving_master() && line.serves(slot))
            .map(|line| line.port)
            .ok_or_else(|| io::Error::other(format!("no master serves slot {slot}")))
    }

    /// The port of the master serving `key`'s slot.
    ///
    /// # Errors
    ///
    /// See [`master_of_slot`](Self::master_of_slot).
    pub async fn master_of(&self, key: &str) -> io::Result<u16> {
        let slot = self.slot_of(key).await?;
        self.master_of_slot(slot).await
    }

    /// `redis-cli --cluster create` over every node, a replica for each master.
    async fn create(&self) -> io::Result<()> {
        let mut command = tokio::process::Command::new(&self.cli);
        command
            .arg("--cluster")
            .arg("create")
            .args(self.nodes.iter().map(|node| {
                // Over TLS the nodes meet at their TLS ports, the ones they announce.
                let port = match &self.tls_ca {
                    Some(_) => node.server.tls_port().unwrap_or(node.port()),
                    None => node.port(),
                };
                format!("127.0.0.1:{port}")
            }))
            .args(["--cluster-replicas", &REPLICAS_PER_MASTER.to_string()])
            .arg("--cluster-yes")
            .args(
                self.tls_ca
                    .iter()
                    .flat_map(|ca| [OsString::from("--tls"), "--cacert".into(), ca.into()]),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let describe = || format!("{} --cluster create", self.cli.display());
        let output = match tokio::time::timeout(CREATE_TIMEOUT, command.output()).await {
            Ok(output) => output.map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("could not run {}: {error}", describe()),
                )
            })?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} did not finish within {CREATE_TIMEOUT:?}\n{}",
                        describe(),
                        self.logs()
                    ),
                ));
            }
        };
        if output.status.success() {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "{} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n{}",
            describe(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.logs()
        )))
    }

    /// Waits until every serving master has its replicas connected and in sync
    /// (`INFO replication`: a `slaveN` line with `state=online` each): a cluster reports
    /// ok before its replicas finish their first sync.
    async fn wait_until_replicated(&self) -> io::Result<()> {
        let deadline = Instant::now() + FORM_TIMEOUT;
        loop {
            let mut lagging = None;
            for port in self.masters().await? {
                if self.online_replicas(port).await?.len() < REPLICAS_PER_MASTER {
                    lagging = Some(port);
                    break;
                }
            }
            let Some(port) = lagging else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(self
                    .timed_out(
                        FORM_TIMEOUT,
                        &format!("the replica of the master on {port} to be in sync"),
                    )
                    .await);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The ports of the replicas of the master on `port` that are in sync with it, from its
    /// `INFO replication` (`slave0:ip=...,port=...,state=online,...`).
    async fn online_replicas(&self, port: u16) -> io::Result<Vec<u16>> {
        let info: String = query(
            &self.node(port).server,
            redis::cmd("INFO").arg("replication"),
        )
        .await?;
        Ok(info
            .lines()
            .filter(|line| line.starts_with("slave") && line.contains("state=online"))
            .filter_map(|line| {
                line.split(',')
                    .find_map(|field| field.strip_prefix("port=")?.parse().ok())
            })
            .collect())
    }

    /// Waits until [`all_ok`](Self::all_ok), or fails naming `what` after `timeout`.
    async fn wait_until_ok(&self, timeout: Duration, what: &str) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.all_ok().await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.timed_out(timeout, what).await);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Whether every running node reports `cluster_state:ok`, all slots served, every node
    /// known and three masters; the error names the first node that does not.
    async fn all_ok(&self) -> Result<(), String> {
        for node in self.running() {
            let info: String = query(&node.server, redis::cmd("CLUSTER").arg("INFO"))
                .await
                .map_err(|error| format!("{}: {error}", node.port()))?;
            let field = |name: &str| {
                info.lines()
                    .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                    .map(str::trim)
            };
            let expected = [
                ("cluster_state", "ok".to_owned()),
                ("cluster_slots_ok", SLOT_COUNT.to_string()),
                ("cluster_known_nodes", self.nodes.len().to_string()),
                ("cluster_size", MASTERS.to_string()),
            ];
            if let Some((name, want)) = expected
                .iter()
                .find(|(name, want)| field(name) != Some(want.as_str()))
            {
                return Err(format!(
                    "node {} reports {name}:{} (waiting for {want})",
                    node.port(),
                    field(name).unwrap_or("?")
                ));
            }
        }
        Ok(())
    }

    /// The error for a wait that ran out: what each node reports, and its log.
    async fn timed_out(&self, timeout: Duration, what: &str) -> io::Error {
        let state = match self.all_ok().await {
            Ok(()) => "every node reports cluster_state:ok".to_owned(),
            Err(detail) => detail,
        };
        let mut views = String::new();
        for node in self.running() {
            match query::<String>(&node.server, redis::cmd("CLUSTER").arg("NODES")).await {
                Ok(nodes) => views.push_str(&format!(
                    "--- CLUSTER NODES on {} ---\n{nodes}",
                    node.port()
                )),
                Err(error) => {
                    views.push_str(&format!("--- {}: {error}\n", node.port()));
                }
            }
        }
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "timed out after {timeout:?} waiting for {what}: {state}\n{views}{}",
                self.logs()
            ),
        )
    }

    /// The tail of every node's log.
    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|node| {
                format!(
                    "---- node {} ({}) ----\n{}",
                    node.port(),
                    if node.is_running() {
                        "running"
                    } else {
                        "killed"
                    },
                    node.server.log_tail(LOG_TAIL_LINES)
                )
            })
            .collect()
    }

    fn running(&self) -> impl Iterator<Item = &ClusterNode> {
        self.nodes.iter().filter(|node| node.is_running())
    }

    fn any_running(&self) -> io::Result<&ClusterNode> {
        self.running()
            .next()
            .ok_or_else(|| io::Error::other("no node of the cluster runs"))
    }

    /// `CLUSTER NODES` of the first running node that answers.
    async fn view(&self) -> io::Result<Vec<NodeLine>> {
        let mut last_error = io::Error::other("no node of the cluster runs");
        for node in self.running() {
            match node_view(&node.server).await {
                Ok(view) => return Ok(view),
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }
}

/// Sends `cmd` to `server` on a connection of its own, the whole exchange bounded.
pub(super) async fn query<T: FromRedisValue>(
    server: &RedisServer,
    cmd: &redis::Cmd,
) -> io::Result<T> {
    let exchange = async {
        let mut connection = server.try_connection().await?;
        cmd.query_async::<T>(&mut connection).await
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, exchange).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(error)) => Err(io::Error::other(format!("node {}: {error}", server.port()))),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "node {} did not answer within {COMMAND_TIMEOUT:?}",
                server.port()
            ),
        )),
    }
}

/// A cluster node on a free port, its cluster bus on another free port.
async fn start_node(tls: Option<&crate::TestCertificates>) -> io::Result<RedisServer> {
    let mut last_error = None;
    for _ in 0..NODE_START_ATTEMPTS {
        let bus_port = free_port()?;
        let mut builder = RedisServer::builder();
        if let Some(certs) = tls {
            // The cluster bus always authenticates the connecting node, which presents
            // its client certificate: the server's is for server authentication only.
            builder = builder
                .tls(certs, false)
                .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                .arg("--tls-client-cert-file")
                .arg(certs.client_cert())
                .arg("--tls-client-key-file")
                .arg(certs.client_key());
        }
        let started = builder
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                &bus_port.to_string(),
                "--cluster-node-timeout",
                &millis(NODE_TIMEOUT).to_string(),
                // A replica may take over however long it was cut off from its master.
                "--cluster-replica-validity-factor",
                "0",
                // A replica's first sync starts at once, not after the 5 s a master waits
                // by default for more replicas to share a diskless transfer.
                "--repl-diskless-sync-delay",
                "0",
            ])
            .startup_timeout(NODE_STARTUP_TIMEOUT)
            .start()
            .await;
        match started {
            Ok(server) => return Ok(server),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::other("no cluster node started")))
}

/// The `redis-cli` to use with the server `server_binary`: `REDIS_CLI_BIN`, else the
/// `redis-cli` or `valkey-cli` beside the server binary (the one of the same build), else
/// one on `PATH`.
///
/// # Errors
///
/// [`io::ErrorKind::NotFound`] when there is none; the message says how to get one.
pub fn find_cli(server_binary: &Path) -> io::Result<PathBuf> {
    if let Some(explicit) = std::env::var_os("REDIS_CLI_BIN").filter(|value| !value.is_empty()) {
        let explicit = PathBuf::from(explicit);
        return if explicit.is_file() {
            Ok(explicit)
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("REDIS_CLI_BIN={} does not exist", explicit.display()),
            ))
        };
    }
    let valkey = server_binary
        .file_name()
        .is_some_and(|name| name.to_string_lossy().starts_with("valkey"));
    let names = if valkey {
        ["valkey-cli", "redis-cli"]
    } else {
        ["redis-cli", "valkey-cli"]
    };
    let beside = server_binary.parent().map(Path::to_owned);
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    beside
        .into_iter()
        .chain(on_path)
        .flat_map(|dir| names.map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no redis-cli or valkey-cli beside {} or on PATH, which forms the test \
                     cluster: install one (`apt-get install redis-tools`) or point \
                     REDIS_CLI_BIN at one",
                    server_binary.display()
                ),
            )
        })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
