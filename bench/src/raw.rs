//! Plain redis-rs: the hand-written baselines, and the setup and checks around every case.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, FromRedisValue, Value};

/// The consumer group of every case.
pub(crate) const GROUP: &str = "g";
/// The consumer name of every case.
pub(crate) const CONSUMER: &str = "c";
/// Entries per `XREADGROUP` in the baseline (the bus's `max_count` is set to the same).
pub(crate) const READ_COUNT: usize = 100;
/// `XADD`s per pipeline in the raw publish baseline.
pub(crate) const PUBLISH_PIPELINE: u64 = 100;
/// `XADD`s per pipeline when filling a stream before a case (not timed).
const PREFILL_PIPELINE: u64 = 1_000;
/// The `BLOCK` of the baseline's reads; the stream is full, so it is never waited out.
const BLOCK_MS: u64 = 2_000;
/// How long one command may take; the slowest is a `DEL` of a million entries.
pub(crate) const STEP: Duration = Duration::from_secs(30);
/// Every `poison_every`-th entry of the poison case has a `seq` that is not a number.
pub(crate) const POISON_EVERY: u64 = 100;

/// Awaits `fut`, failing with a message naming `what` if it takes longer than `limit`.
pub(crate) async fn bounded<T>(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = T>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow!("timed out after {limit:?} waiting for {what}"))
}

/// Runs `cmd` (a command or a pipeline), bounded by [`STEP`].
pub(crate) async fn query<T: FromRedisValue>(
    conn: &mut MultiplexedConnection,
    what: &str,
    cmd: &(impl Queryable + ?Sized),
) -> anyhow::Result<T> {
    bounded(what, STEP, cmd.run(conn))
        .await?
        .with_context(|| format!("redis failed {what}"))
}

/// A command or a pipeline.
pub(crate) trait Queryable {
    fn run<T: FromRedisValue>(
        &self,
        conn: &mut MultiplexedConnection,
    ) -> impl Future<Output = redis::RedisResult<T>>;
}

impl Queryable for redis::Cmd {
    fn run<T: FromRedisValue>(
        &self,
        conn: &mut MultiplexedConnection,
    ) -> impl Future<Output = redis::RedisResult<T>> {
        self.query_async(conn)
    }
}

impl Queryable for redis::Pipeline {
    fn run<T: FromRedisValue>(
        &self,
        conn: &mut MultiplexedConnection,
    ) -> impl Future<Output = redis::RedisResult<T>> {
        self.query_async(conn)
    }
}

/// The CA of the throwaway server's TLS port, set once when the suite starts one: every
/// `rediss://` connection of the suite, the loops' and the buses', trusts it.
static TLS_CA: OnceLock<PathBuf> = OnceLock::new();

/// Makes `rediss://` connections trust the CA in the PEM file at `path`.
pub(crate) fn trust_tls_ca(path: PathBuf) {
    let _ = TLS_CA.set(path);
}

/// The CA set by [`trust_tls_ca`].
pub(crate) fn tls_ca() -> Option<&'static Path> {
    TLS_CA.get().map(PathBuf::as_path)
}

/// A client for `url`; for `rediss://`, trusting [`tls_ca`].
fn client(url: &str) -> anyhow::Result<Client> {
    let not_a_url = || format!("`{url}` is not a redis URL");
    match tls_ca().filter(|_| url.starts_with("rediss://")) {
        Some(ca) => {
            let root_cert =
                std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            };
            Client::build_with_tls(url, certificates).with_context(not_a_url)
        }
        None => Client::open(url).with_context(not_a_url),
    }
}

/// A multiplexed connection without a response timeout (blocking reads must outlast one),
/// so every command on it goes through [`query`] or [`bounded`].
pub(crate) async fn connect(url: &str) -> anyhow::Result<MultiplexedConnection> {
    let client = client(url)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(None);
    bounded(
        "connecting",
        Duration::from_secs(10),
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await?
    .with_context(|| format!("connecting to {url}"))
}

pub(crate) fn user_id(seq: u64) -> String {
    format!("user-{seq:08}")
}

pub(crate) fn user_name(seq: u64) -> String {
    format!("User Number {seq}")
}

/// `XADD stream * user_id .. user_name .. seq`: the entry of number `seq`, but for the
/// value of its `seq` field, which the caller appends (the poison case writes a bad one).
fn xadd_user(stream: &str, seq: u64) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream)
        .arg("*")
        .arg("user_id")
        .arg(user_id(seq))
        .arg("user_name")
        .arg(user_name(seq))
        .arg("seq");
    cmd
}

/// Appends `entries` entries with the fields `user_id`, `user_name`, `seq`, in pipelines.
/// With `poison`, every [`POISON_EVERY`]-th `seq` is not a number.
pub(crate) async fn prefill(
    conn: &mut MultiplexedConnection,
    stream: &str,
    entries: u64,
    poison: bool,
) -> anyhow::Result<()> {
    let mut next = 0;
    while next < entries {
        let end = (next + PREFILL_PIPELINE).min(entries);
        let mut pipe = redis::pipe();
        for seq in next..end {
            let mut cmd = xadd_user(stream, seq);
            if poison && is_poisoned(seq) {
                cmd.arg(format!("not-a-number-{seq}"));
            } else {
                cmd.arg(seq);
            }
            pipe.add_command(cmd).ignore();
        }
        query::<()>(conn, "filling the stream", &pipe).await?;
        next = end;
    }
    Ok(())
}

pub(crate) fn is_poisoned(seq: u64) -> bool {
    seq % POISON_EVERY == POISON_EVERY - 1
}

/// How many of `entries` prefilled entries are poisoned.
pub(crate) fn poisoned_count(entries: u64) -> u64 {
    (0..entries).filter(|&seq| is_poisoned(seq)).count() as u64
}

/// Creates [`GROUP`] on `stream` at its beginning (and the stream).
pub(crate) async fn create_group(
    conn: &mut MultiplexedConnection,
    stream: &str,
) -> anyhow::Result<()> {
    let mut cmd = redis::cmd("XGROUP");
    cmd.arg("CREATE")
        .arg(stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM");
    query(conn, "creating the consumer group", &cmd).await
}

/// The number of entries pending in [`GROUP`] on `stream` (`XPENDING` summary).
pub(crate) async fn pending_count(
    conn: &mut MultiplexedConnection,
    stream: &str,
) -> anyhow::Result<u64> {
    let mut cmd = redis::cmd("XPENDING");
    cmd.arg(stream).arg(GROUP);
    let reply: Value = query(conn, "XPENDING", &cmd).await?;
    match reply {
        Value::Array(summary) => match summary.first() {
            Some(Value::Int(count)) => Ok(u64::try_from(*count).unwrap_or(0)),
            other => bail!("XPENDING summary does not start with a count: {other:?}"),
        },
        other => bail!("XPENDING did not answer a summary: {other:?}"),
    }
}

pub(crate) async fn stream_len(
    conn: &mut MultiplexedConnection,
    stream: &str,
) -> anyhow::Result<u64> {
    let mut cmd = redis::cmd("XLEN");
    cmd.arg(stream);
    query(conn, "XLEN", &cmd).await
}

/// Where slim-bus moves the dead letters of `stream` (default suffix, no hash tag in the
/// name), so a case can count and remove them.
pub(crate) fn dead_letter_stream(stream: &str) -> String {
    format!("{{{stream}}}:dlq")
}

/// Removes `stream` (in the background on the server, so a big one does not stall it).
pub(crate) async fn delete(conn: &mut MultiplexedConnection, stream: &str) -> anyhow::Result<()> {
    let mut cmd = redis::cmd("UNLINK");
    cmd.arg(stream);
    query::<()>(conn, "deleting the stream", &cmd).await
}

/// The baseline consumer: `XREADGROUP COUNT 100 BLOCK .. STREAMS s >`, then one `XACK`
/// with every id of the batch, until `entries` entries are consumed. Decodes nothing but
/// the ids. Returns how long it took.
pub(crate) async fn consume(
    conn: &mut MultiplexedConnection,
    stream: &str,
    entries: u64,
) -> anyhow::Result<Duration> {
    let read = read_new_command(stream);
    let start = Instant::now();
    let mut consumed = 0;
    while consumed < entries {
        let reply: Value = query(conn, "XREADGROUP", &read).await?;
        let ids = entry_ids(reply)?;
        if ids.is_empty() {
            bail!("the stream ran dry after {consumed} of {entries} entries");
        }
        let mut ack = redis::cmd("XACK");
        ack.arg(stream).arg(GROUP);
        for id in &ids {
            ack.arg(id.as_slice());
        }
        let acked: u64 = query(conn, "XACK", &ack).await?;
        if acked != ids.len() as u64 {
            bail!("XACK acknowledged {acked} of {} entries", ids.len());
        }
        consumed += acked;
    }
    Ok(start.elapsed())
}

/// The baseline loop over several streams of one node, as a client of a Redis Cluster
/// would write it: a cluster refuses an `XREADGROUP` over keys of different hash slots, and
/// each partition of a stream has a slot of its own. So each round sends one pipeline with
/// the baseline's `XREADGROUP COUNT 100 BLOCK ..` for every stream with entries left, then
/// one pipeline with an `XACK` of every id read from each stream, until each stream's
/// `per_stream` entries are consumed. Decodes nothing but the ids. Returns how long it took.
pub(crate) async fn consume_partitions(
    conn: &mut MultiplexedConnection,
    streams: &[String],
    per_stream: u64,
) -> anyhow::Result<Duration> {
    let reads: Vec<redis::Cmd> = streams.iter().map(|s| read_new_command(s)).collect();
    let mut left = vec![per_stream; streams.len()];
    let start = Instant::now();
    while left.iter().any(|&n| n > 0) {
        let reading: Vec<usize> = (0..streams.len()).filter(|&i| left[i] > 0).collect();
        let mut pipe = redis::pipe();
        for &i in &reading {
            pipe.add_command(reads[i].clone());
        }
        let replies: Vec<Value> = query(conn, "pipelined XREADGROUP", &pipe).await?;
        if replies.len() != reading.len() {
            bail!("{} replies to {} reads", replies.len(), reading.len());
        }
        let mut acks = redis::pipe();
        let mut expected = Vec::with_capacity(reading.len());
        for (&i, reply) in reading.iter().zip(replies) {
            let ids = entry_ids(reply)?;
            if ids.is_empty() {
                let consumed = per_stream - left[i];
                bail!(
                    "{} ran dry after {consumed} of {per_stream} entries",
                    streams[i]
                );
            }
            let ack = acks.cmd("XACK").arg(&streams[i]).arg(GROUP);
            for id in &ids {
                ack.arg(id.as_slice());
            }
            expected.push((i, ids.len() as u64));
        }
        let acked: Vec<u64> = query(conn, "pipelined XACK", &acks).await?;
        for ((i, read), acked) in expected.into_iter().zip(acked) {
            if acked != read {
                bail!(
                    "XACK on {} acknowledged {acked} of {read} entries",
                    streams[i]
                );
            }
            left[i] = left[i].saturating_sub(acked);
        }
    }
    Ok(start.elapsed())
}

/// The entry ids of an `XREADGROUP` reply (RESP2 or RESP3), moved out without copying.
fn entry_ids(reply: Value) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut ids = Vec::new();
    for_each_entry(reply, |id, _fields| {
        ids.push(id);
        Ok(())
    })?;
    Ok(ids)
}

/// Calls `visit` with the id and the flat field list of every entry of an `XREADGROUP`
/// reply (RESP2 or RESP3), in order, moving them out without copying.
fn for_each_entry(
    reply: Value,
    mut visit: impl FnMut(Vec<u8>, Vec<Value>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let streams: Vec<Value> = match reply {
        Value::Nil => return Ok(()),
        Value::Array(pairs) => pairs
            .into_iter()
            .map(|pair| match pair {
                Value::Array(mut pair) if pair.len() == 2 => Ok(pair.swap_remove(1)),
                other => Err(anyhow!("not a [stream, entries] pair: {other:?}")),
            })
            .collect::<anyhow::Result<_>>()?,
        Value::Map(pairs) => pairs.into_iter().map(|(_, entries)| entries).collect(),
        other => bail!("XREADGROUP answered {other:?}"),
    };
    for entries in streams {
        let Value::Array(entries) = entries else {
            bail!("entries are not an array: {entries:?}");
        };
        for entry in entries {
            let Value::Array(parts) = entry else {
                bail!("an entry is not an array: {entry:?}");
            };
            let mut parts = parts.into_iter();
            let id = match parts.next() {
                Some(Value::BulkString(id)) => id,
                other => bail!("an entry has no id: {other:?}"),
            };
            let fields = match parts.next() {
                Some(Value::Array(fields)) => fields,
                // A pending entry deleted from the stream has no fields.
                Some(Value::Nil) | None => Vec::new(),
                other => bail!("an entry's fields are not an array: {other:?}"),
            };
            visit(id, fields)?;
        }
    }
    Ok(())
}

/// The publish baseline: `entries` `XADD`s in pipelines of [`PUBLISH_PIPELINE`], one
/// pipeline on the wire at a time.
pub(crate) async fn publish_pipelined(
    conn: &mut MultiplexedConnection,
    stream: &str,
    entries: u64,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut next = 0;
    while next < entries {
        let end = (next + PUBLISH_PIPELINE).min(entries);
        let mut pipe = redis::pipe();
        for seq in next..end {
            let mut cmd = xadd_user(stream, seq);
            cmd.arg(seq);
            pipe.add_command(cmd).ignore();
        }
        query::<()>(conn, "pipelined XADD", &pipe).await?;
        next = end;
    }
    Ok(start.elapsed())
}

/// `entries` `XADD`s, each awaited before the next.
pub(crate) async fn publish_one_by_one(
    conn: &mut MultiplexedConnection,
    stream: &str,
    entries: u64,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for seq in 0..entries {
        let mut cmd = xadd_user(stream, seq);
        cmd.arg(seq);
        let _id: Vec<u8> = query(conn, "XADD", &cmd).await?;
    }
    Ok(start.elapsed())
}

/// The monotonic clock both sides of the latency cases read (one process, one epoch).
pub(crate) fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The field of a latency case's entry that holds [`now_ns`] taken just before its `XADD`.
pub(crate) const SENT_AT_FIELD: &str = "sent_at_ns";

/// The publisher of the latency cases: `rate` plain `XADD`s per second for `duration`,
/// each entry stamped with [`now_ns`]. Returns how many entries it sent.
pub(crate) async fn publish_paced(
    conn: &mut MultiplexedConnection,
    stream: &str,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<u64> {
    let total = paced_total(rate, duration);
    let period_ns = 1_000_000_000 / rate.max(1);
    let start = tokio::time::Instant::now();
    for seq in 0..total {
        // A fixed schedule: a slow XADD delays the next send, but the schedule catches up.
        tokio::time::sleep_until(start + Duration::from_nanos(period_ns * seq)).await;
        let mut cmd = xadd_user(stream, seq);
        cmd.arg(seq).arg(SENT_AT_FIELD).arg(now_ns());
        let _id: Vec<u8> = query(conn, "XADD", &cmd).await?;
    }
    Ok(total)
}

/// How many entries [`publish_paced`] sends.
pub(crate) fn paced_total(rate: u64, duration: Duration) -> u64 {
    rate * duration.as_millis() as u64 / 1_000
}

/// The reference of the latency case: [`publish_paced`] into `stream` (group [`GROUP`]
/// already created) while a hand-written loop on a connection of its own reads with
/// `XREADGROUP COUNT 100 BLOCK 2000` and records `now - sent_at_ns` for each entry as soon
/// as its reply is decoded, then acknowledges the batch with one `XACK`. Returns every
/// entry's latency in nanoseconds.
pub(crate) async fn latency(
    url: &str,
    stream: &str,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<Vec<u64>> {
    let total = paced_total(rate, duration);
    let mut reader = connect(url).await?;
    let mut publisher = connect(url).await?;
    let read_stream = stream.to_owned();
    let mut receiving =
        tokio::spawn(async move { receive_stamped(&mut reader, &read_stream, total).await });
    if let Err(error) = publish_paced(&mut publisher, stream, rate, duration).await {
        receiving.abort();
        return Err(error);
    }
    let latencies = match bounded("every entry received", STEP, &mut receiving).await {
        Ok(joined) => joined.context("the reading task panicked")??,
        Err(error) => {
            receiving.abort();
            return Err(error);
        }
    };
    let pending = pending_count(&mut publisher, stream).await?;
    if pending != 0 {
        bail!("{pending} entries are still pending after the latency-raw run");
    }
    Ok(latencies)
}

/// The reading loop of [`latency`]: until `total` entries have arrived.
async fn receive_stamped(
    conn: &mut MultiplexedConnection,
    stream: &str,
    total: u64,
) -> anyhow::Result<Vec<u64>> {
    let read = read_new_command(stream);
    let mut latencies = Vec::with_capacity(total as usize);
    while (latencies.len() as u64) < total {
        let reply: Value = query(conn, "XREADGROUP", &read).await?;
        let mut ack = redis::cmd("XACK");
        ack.arg(stream).arg(GROUP);
        let mut ids = 0u64;
        for_each_entry(reply, |id, fields| {
            let sent_at_ns = sent_at_ns(&fields)?;
            latencies.push(now_ns().saturating_sub(sent_at_ns));
            ack.arg(id);
            ids += 1;
            Ok(())
        })?;
        // An empty reply is a block that timed out: nothing was sent for 2 s.
        if ids == 0 {
            continue;
        }
        let acked: u64 = query(conn, "XACK", &ack).await?;
        if acked != ids {
            bail!("XACK acknowledged {acked} of {ids} entries");
        }
    }
    Ok(latencies)
}

/// The [`SENT_AT_FIELD`] of an entry's flat field list.
fn sent_at_ns(fields: &[Value]) -> anyhow::Result<u64> {
    for pair in fields.chunks_exact(2) {
        if let [Value::BulkString(name), Value::BulkString(value)] = pair
            && name == SENT_AT_FIELD.as_bytes()
        {
            return std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| anyhow!("`{SENT_AT_FIELD}` is not a number: {value:?}"));
        }
    }
    bail!("an entry has no `{SENT_AT_FIELD}` field")
}

/// The `redis_version` from `INFO server`.
pub(crate) async fn server_version(conn: &mut MultiplexedConnection) -> anyhow::Result<String> {
    let mut cmd = redis::cmd("INFO");
    cmd.arg("server");
    let info: String = query(conn, "INFO", &cmd).await?;
    Ok(info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .unwrap_or("unknown")
        .trim()
        .to_owned())
}

/// Calls and server time by command, from `INFO commandstats`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct CommandStats(BTreeMap<String, CommandStat>);

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct CommandStat {
    pub(crate) calls: u64,
    /// Time the server spent executing the command, in microseconds.
    pub(crate) usec: u64,
}

impl CommandStats {
    /// What happened between `before` and `self`.
    pub(crate) fn since(&self, before: &CommandStats) -> CommandStats {
        CommandStats(
            self.0
                .iter()
                .map(|(name, now)| {
                    let then = before.0.get(name).copied().unwrap_or_default();
                    let delta = CommandStat {
                        calls: now.calls.saturating_sub(then.calls),
                        usec: now.usec.saturating_sub(then.usec),
                    };
                    (name.clone(), delta)
                })
                .filter(|(_, delta)| delta.calls > 0)
                .collect(),
        )
    }

    pub(crate) fn get(&self, command: &str) -> CommandStat {
        self.0.get(command).copied().unwrap_or_default()
    }

    /// Server time in the stream commands (`x*`), in microseconds.
    pub(crate) fn stream_usec(&self) -> u64 {
        self.0
            .iter()
            .filter(|(name, _)| name.starts_with('x'))
            .map(|(_, stat)| stat.usec)
            .sum()
    }

    fn parse(info: &str) -> CommandStats {
        let mut stats = BTreeMap::new();
        for line in info.lines() {
            let Some((name, fields)) = line
                .strip_prefix("cmdstat_")
                .and_then(|rest| rest.split_once(':'))
            else {
                continue;
            };
            let mut stat = CommandStat::default();
            for field in fields.trim().split(',') {
                match field.split_once('=') {
                    Some(("calls", v)) => stat.calls = v.parse().unwrap_or(0),
                    Some(("usec", v)) => stat.usec = v.parse().unwrap_or(0),
                    _ => {}
                }
            }
            stats.insert(name.to_owned(), stat);
        }
        CommandStats(stats)
    }
}

/// The server's command statistics now (reading them resets nothing).
pub(crate) async fn command_stats(
    conn: &mut MultiplexedConnection,
) -> anyhow::Result<CommandStats> {
    let mut cmd = redis::cmd("INFO");
    cmd.arg("commandstats");
    let info: String = query(conn, "INFO commandstats", &cmd).await?;
    Ok(CommandStats::parse(&info))
}

/// `XREADGROUP GROUP g c COUNT 100 BLOCK 2000 STREAMS stream >`.
fn read_new_command(stream: &str) -> redis::Cmd {
    let mut read = redis::cmd("XREADGROUP");
    read.arg("GROUP")
        .arg(GROUP)
        .arg(CONSUMER)
        .arg("COUNT")
        .arg(READ_COUNT)
        .arg("BLOCK")
        .arg(BLOCK_MS)
        .arg("STREAMS")
        .arg(stream)
        .arg(">");
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_stats_parse_and_subtract() {
        let before = CommandStats::parse(
            "# Commandstats\r\ncmdstat_xack:calls=2,usec=10,usec_per_call=5.00,rejected_calls=0,failed_calls=0\r\n",
        );
        let after = CommandStats::parse(
            "# Commandstats\r\ncmdstat_xack:calls=5,usec=40,usec_per_call=8.00\r\ncmdstat_xreadgroup:calls=3,usec=300\r\ncmdstat_info:calls=1,usec=9\r\n",
        );
        let delta = after.since(&before);
        assert_eq!(delta.get("xack"), CommandStat { calls: 3, usec: 30 });
        assert_eq!(
            delta.get("xreadgroup"),
            CommandStat {
                calls: 3,
                usec: 300
            }
        );
        assert_eq!(delta.stream_usec(), 330);
        assert_eq!(delta.get("xadd"), CommandStat::default());
    }

    #[test]
    fn one_in_a_hundred_entries_is_poisoned() {
        assert_eq!(poisoned_count(200_000), 2_000);
        assert!(!is_poisoned(0));
        assert!(is_poisoned(99));
    }

    #[test]
    fn entry_ids_come_out_of_resp2_and_resp3_replies() {
        let entry = |id: &str| {
            Value::Array(vec![
                Value::BulkString(id.as_bytes().to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"seq".to_vec()),
                    Value::BulkString(b"1".to_vec()),
                ]),
            ])
        };
        let entries = Value::Array(vec![entry("1-0"), entry("1-1")]);
        let resp2 = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"s".to_vec()),
            entries.clone(),
        ])]);
        let resp3 = Value::Map(vec![(Value::BulkString(b"s".to_vec()), entries)]);
        let want = vec![b"1-0".to_vec(), b"1-1".to_vec()];
        assert_eq!(entry_ids(resp2).ok(), Some(want.clone()));
        assert_eq!(entry_ids(resp3).ok(), Some(want));
        assert_eq!(entry_ids(Value::Nil).ok(), Some(Vec::new()));
    }

    #[test]
    fn sent_at_comes_out_of_an_entrys_fields() {
        let field = |text: &str| Value::BulkString(text.as_bytes().to_vec());
        let fields = vec![field("seq"), field("1"), field(SENT_AT_FIELD), field("42")];
        assert_eq!(sent_at_ns(&fields).ok(), Some(42));
        assert!(sent_at_ns(&fields[..2]).is_err());
        assert!(sent_at_ns(&[field(SENT_AT_FIELD), field("soon")]).is_err());
    }
}
