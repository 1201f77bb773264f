//! Competing consumers: 1, 2 and 3 bus processes in one consumer group sharing a stream of
//! [`PARTITIONS`] partitions, measured together as entries/s of the whole group.
//!
//! Each process is a child of this binary (`--child compete`): it builds its bus, says
//! `ready`, starts listening when the suite writes `go` to its stdin, and shuts down on
//! `stop`, reporting how many entries it handled. The clock runs from `go` until the group
//! has read and acknowledged every entry of every partition (polled with `XINFO GROUPS`).

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

/// One run: how long the group took, and how many entries each process handled.
#[derive(Debug)]
pub(crate) struct CompeteRun {
    pub(crate) elapsed: Duration,
    pub(crate) handled: Vec<u64>,
}

/// Fills the partitions of `stream` with `entries` entries in all (the group created on
/// each), runs `processes` consumer processes until the group is done, and removes the
/// partitions.
pub(crate) async fn run(
    url: &str,
    conn: &mut MultiplexedConnection,
    stream: &str,
    entries: u64,
    processes: usize,
) -> anyhow::Result<CompeteRun> {
    let partitions: Vec<String> = (0..PARTITIONS)
        .map(|partition| partition_stream(stream, partition))
        .collect();
    let result = fill_and_run(url, conn, stream, &partitions, entries, processes).await;
    for partition in &partitions {
        raw::delete(conn, partition).await?;
    }
    result
}

async fn fill_and_run(
    url: &str,
    conn: &mut MultiplexedConnection,
    stream: &str,
    partitions: &[String],
    entries: u64,
    processes: usize,
) -> anyhow::Result<CompeteRun> {
    let per_partition = entries / u64::from(PARTITIONS);
    for partition in partitions {
        raw::prefill(conn, partition, per_partition, false).await?;
        raw::create_group(conn, partition).await?;
    }
    let entries = per_partition * u64::from(PARTITIONS);
    let mut children = Vec::with_capacity(processes);
    for index in 0..processes {
        children.push(ConsumerChild::start(url, stream, index).await?);
    }
    let start = Instant::now();
    for child in &mut children {
        child.say("go").await?;
    }
    let limit = STEP + Duration::from_millis(entries / 2);
    bounded("the group to handle every entry", limit, async {
        while !done(conn, partitions).await? {
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

/// Whether the group has read and acknowledged every entry of every partition.
async fn done(conn: &mut MultiplexedConnection, partitions: &[String]) -> anyhow::Result<bool> {
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
    async fn start(url: &str, stream: &str, index: usize) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this benchmark's binary")?;
        let mut child = tokio::process::Command::new(exe)
            .args(["--child", "compete", "--url", url, "--stream", stream])
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

/// The child's side: a bus on the partitioned stream, named after its index (`--entries`).
pub(crate) async fn child(args: &ChildArgs) -> anyhow::Result<()> {
    let handled = Arc::new(AtomicU64::new(0));
    let bus = EventBus::builder()
        .url(&args.url)
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
