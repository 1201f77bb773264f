//! Competing consumers: 1, 2 and 3 bus processes in one consumer group sharing a stream of
//! [`PARTITIONS`] partitions, measured together as entries/s of the whole group, on one
//! server or on a Redis Cluster.
//!
//! Each process is a child of this binary (`--child compete`): it builds its bus, says
//! `ready`, starts listening when the suite writes `go` to its stdin, and shuts down on
//! `stop`, reporting how many entries it handled. The clock runs from `go` until the group
//! has read and acknowledged every entry of every partition (polled with `XINFO GROUPS`).
//! On a cluster the same partitions are also consumed by [`run_raw`]: a hand-written loop
//! per master, all at once, the ceiling of a client there.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use redis::Value;
use redis::aio::MultiplexedConnection;
use slim_bus::{Context, EventBus, HandlerError, StreamHandler, partition_stream};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

use crate::bus::UserEvent;
use crate::cli::ChildArgs;
use crate::raw::{self, GROUP, READ_COUNT, STEP, bounded};

/// The partitions of the shared stream.
pub(crate) const PARTITIONS: u32 = 6;
/// The processes of the runs: one run per count.
pub(crate) const PROCESSES: [usize; 3] = [1, 2, 3];
/// How often the suite looks whether the group is done.
const POLL: Duration = Duration::from_millis(2);

/// Where the consumer processes connect.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Endpoint<'a> {
    /// One server, at this URL.
    Server(&'a str),
    /// A Redis Cluster, through this seed node (`EventBusBuilder::cluster`).
    Cluster(&'a str),
}

impl<'a> Endpoint<'a> {
    /// The child's arguments that say it: `--url URL` or `--cluster SEED`.
    fn child_args(self) -> [&'a str; 2] {
        match self {
            Endpoint::Server(url) => ["--url", url],
            Endpoint::Cluster(seed) => ["--cluster", seed],
        }
    }
}

/// A node holding some partitions of the shared stream, with a connection to it (without
/// a response timeout, see [`raw::connect`]): the one server, or one master of a cluster.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// How the node is named in the output, e.g. `127.0.0.1:7001`.
    pub(crate) name: String,
    pub(crate) conn: MultiplexedConnection,
    /// The names of the partitions this node serves.
    pub(crate) partitions: Vec<String>,
}

/// The Redis streams of the partitions of `stream`, in partition order.
pub(crate) fn partitions(stream: &str) -> Vec<String> {
    (0..PARTITIONS)
        .map(|partition| partition_stream(stream, partition))
        .collect()
}

/// One run: how long it took, and how many entries each process (or loop) handled.
#[derive(Debug)]
pub(crate) struct CompeteRun {
    pub(crate) elapsed: Duration,
    pub(crate) handled: Vec<u64>,
}

/// Fills the partitions of `stream` on `nodes` (see [`partitions`]) with `entries` entries
/// in all, the group created on each, awaits `settle` (on a cluster: the replicas catching
/// up with the fill, which would otherwise take CPU from the timed part), runs `processes`
/// consumer processes on `endpoint` until the group is done, and removes the partitions.
pub(crate) async fn run(
    endpoint: Endpoint<'_>,
    stream: &str,
    nodes: &mut [Node],
    entries: u64,
    processes: usize,
    settle: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<CompeteRun> {
    let result = fill_and_run(endpoint, stream, nodes, entries, processes, settle).await;
    let cleanup = delete(nodes).await;
    let run = result?;
    cleanup?;
    Ok(run)
}

async fn fill_and_run(
    endpoint: Endpoint<'_>,
    stream: &str,
    nodes: &mut [Node],
    entries: u64,
    processes: usize,
    settle: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<CompeteRun> {
    let entries = fill(nodes, entries).await?;
    settle.await?;
    let mut children = Vec::with_capacity(processes);
    for index in 0..processes {
        children.push(ConsumerChild::start(endpoint, stream, index).await?);
    }
    let start = Instant::now();
    for child in &mut children {
        child.say("go").await?;
    }
    let limit = STEP + Duration::from_millis(entries / 2);
    bounded("the group to handle every entry", limit, async {
        while !done(nodes).await? {
            tokio::time::sleep(POLL).await;
        }
        anyhow::Ok(())
    })
    .await??;
    let elapsed = start.elapsed();
    let mut handled = Vec::with_capacity(processes);
    for child in children {
        handled.push(child.stop().await?);
    }
    if handled.iter().sum::<u64>() != entries {
        bail!("the processes handled {handled:?} entries, expected {entries} in all");
    }
    Ok(CompeteRun { elapsed, handled })
}

/// The hand-written reference of a cluster: fills the partitions on `nodes` and awaits
/// `settle` as [`run`] does, then runs [`raw::consume_partitions`] on every node at once,
/// each over the partitions that node serves, until all are consumed; removes the
/// partitions. `handled` is per node, in the order of `nodes`; `elapsed` runs until the
/// last loop is done.
pub(crate) async fn run_raw(
    nodes: &mut [Node],
    entries: u64,
    settle: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<CompeteRun> {
    let result = fill_and_run_raw(nodes, entries, settle).await;
    let cleanup = delete(nodes).await;
    let run = result?;
    cleanup?;
    Ok(run)
}

async fn fill_and_run_raw(
    nodes: &mut [Node],
    entries: u64,
    settle: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<CompeteRun> {
    let entries = fill(nodes, entries).await?;
    settle.await?;
    let per_partition = entries / u64::from(PARTITIONS);
    let mut loops = tokio::task::JoinSet::new();
    let start = Instant::now();
    for (index, node) in nodes.iter().enumerate() {
        let (mut conn, partitions) = (node.conn.clone(), node.partitions.clone());
        loops.spawn(async move {
            let consumed = raw::consume_partitions(&mut conn, &partitions, per_partition).await;
            (
                index,
                consumed.map(|_| per_partition * partitions.len() as u64),
            )
        });
    }
    let mut handled = vec![0; nodes.len()];
    while let Some(joined) = loops.join_next().await {
        let (index, consumed) = joined.context("a hand-written loop panicked")?;
        handled[index] = consumed.with_context(|| format!("the loop on {}", nodes[index].name))?;
    }
    let elapsed = start.elapsed();
    for node in nodes.iter_mut() {
        for partition in &node.partitions {
            let pending = raw::pending_count(&mut node.conn, partition).await?;
            if pending != 0 {
                bail!("{pending} entries of {partition} are still pending after the loop");
            }
        }
    }
    Ok(CompeteRun { elapsed, handled })
}

/// Fills every partition on `nodes` with an equal share of `entries` and creates the group
/// on it; returns how many entries that made in all (a multiple of [`PARTITIONS`]).
async fn fill(nodes: &mut [Node], entries: u64) -> anyhow::Result<u64> {
    let per_partition = entries / u64::from(PARTITIONS);
    let mut filled = 0;
    for node in nodes.iter_mut() {
        for partition in &node.partitions {
            raw::prefill(&mut node.conn, partition, per_partition, false).await?;
            raw::create_group(&mut node.conn, partition).await?;
            filled += 1;
        }
    }
    if filled != PARTITIONS {
        bail!("the nodes hold {filled} partitions, expected {PARTITIONS}");
    }
    Ok(per_partition * u64::from(PARTITIONS))
}

/// Removes every partition on `nodes`.
async fn delete(nodes: &mut [Node]) -> anyhow::Result<()> {
    for node in nodes.iter_mut() {
        for partition in &node.partitions {
            raw::delete(&mut node.conn, partition).await?;
        }
    }
    Ok(())
}

/// Whether the group has read and acknowledged every entry of every partition: one
/// pipeline of `XINFO GROUPS` per node. A partition once done stays done (nothing is
/// added during a run), so asking the nodes one after the other is enough.
async fn done(nodes: &mut [Node]) -> anyhow::Result<bool> {
    for node in nodes.iter_mut() {
        if !node_done(&mut node.conn, &node.partitions).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn node_done(
    conn: &mut MultiplexedConnection,
    partitions: &[String],
) -> anyhow::Result<bool> {
    let mut pipe = redis::pipe();
    for partition in partitions {
        pipe.cmd("XINFO").arg("GROUPS").arg(partition);
    }
    let replies: Vec<Value> = raw::query(conn, "XINFO GROUPS", &pipe).await?;
    for reply in replies {
        let group = match reply {
            Value::Array(groups) => groups.into_iter().next(),
            other => bail!("XINFO GROUPS answered {other:?}"),
        }
        .ok_or_else(|| anyhow!("a partition has no consumer group"))?;
        let (lag, pending) = (field(&group, "lag"), field(&group, "pending"));
        if lag != Some(0) || pending != Some(0) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The integer field `name` of one group of an `XINFO GROUPS` reply (RESP2 or RESP3).
fn field(group: &Value, name: &str) -> Option<i64> {
    let is_name = |key: &Value| {
        matches!(key, Value::BulkString(bytes) if bytes == name.as_bytes())
            || matches!(key, Value::SimpleString(text) if text == name)
    };
    let value = match group {
        Value::Array(pairs) => pairs
            .chunks(2)
            .find(|pair| is_name(&pair[0]))
            .and_then(|pair| pair.get(1)),
        Value::Map(pairs) => pairs
            .iter()
            .find(|(key, _)| is_name(key))
            .map(|(_, value)| value),
        _ => None,
    };
    match value? {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

/// One consumer process of a run.
struct ConsumerChild {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl ConsumerChild {
    /// Starts it and waits until its bus is built.
    async fn start(endpoint: Endpoint<'_>, stream: &str, index: usize) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this benchmark's binary")?;
        let mut child = tokio::process::Command::new(exe)
            .args(["--child", "compete"])
            .args(endpoint.child_args())
            .args(["--stream", stream])
            .args(["--entries", &index.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a consumer process")?;
        let stdout = child.stdout.take().context("the child's stdout")?;
        let mut consumer = ConsumerChild {
            child,
            lines: BufReader::new(stdout).lines(),
        };
        let ready = consumer.next_line().await?;
        if ready != "ready" {
            bail!("the consumer process said {ready:?}, not ready");
        }
        Ok(consumer)
    }

    async fn next_line(&mut self) -> anyhow::Result<String> {
        bounded(
            "a line from a consumer process",
            STEP,
            self.lines.next_line(),
        )
        .await??
        .context("the consumer process ended")
    }

    async fn say(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.child.stdin.as_mut().context("the child's stdin")?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Stops it gracefully; returns how many entries it handled.
    async fn stop(mut self) -> anyhow::Result<u64> {
        self.say("stop").await?;
        let line = self.next_line().await?;
        let handled = line
            .strip_prefix("handled ")
            .and_then(|count| count.parse().ok())
            .ok_or_else(|| anyhow!("the consumer process said {line:?}, not `handled N`"))?;
        bounded("the consumer process to exit", STEP, self.child.wait()).await??;
        Ok(handled)
    }
}

/// Counts what it handles.
struct NoOp {
    handled: Arc<AtomicU64>,
}

#[slim_bus::async_trait]
impl StreamHandler for NoOp {
    type Event = UserEvent;

    async fn handle(&self, event: UserEvent, _: Context) -> Result<(), HandlerError> {
        std::hint::black_box(&event);
        self.handled.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The child's side: a bus on the partitioned stream, named after its index (`--entries`),
/// on the server or (`--cluster`) the cluster of `args.url`.
pub(crate) async fn child(args: &ChildArgs) -> anyhow::Result<()> {
    let handled = Arc::new(AtomicU64::new(0));
    let builder = EventBus::builder();
    let builder = if args.cluster {
        builder.cluster([args.url.as_str()])
    } else {
        builder.url(&args.url)
    };
    let bus = builder
        .consumer_group(GROUP)
        .consumer_name(format!("c{}", args.entries))
        .max_count(READ_COUNT)
        .max_concurrent(64)
        .stream_partitions(&args.stream, PARTITIONS)
        .handler_on(
            &args.stream,
            NoOp {
                handled: handled.clone(),
            },
        )
        .build();
    let bus = bounded("building the bus", STEP, bus).await??;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    println!("ready");
    let go = stdin.next_line().await?.unwrap_or_default();
    if go != "go" {
        bail!("expected `go`, got {go:?}");
    }
    let listener = bounded("listen", STEP, bus.listen()).await??;
    let _stop = stdin.next_line().await?;
    bounded("the listener's shutdown", STEP, listener.shutdown())
        .await?
        .context("the listener stopped with an error")?;
    println!("handled {}", handled.load(Ordering::Relaxed));
    Ok(())
}
