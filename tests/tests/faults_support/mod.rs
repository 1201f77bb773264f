//! The fault-injection suite's tools: the ledger of handled entries, a paced publisher that
//! survives the faults, consumer processes, and the end-of-case check.
#![allow(unreachable_pub, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::ops::Range;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use slim_bus::{Context, EntryId, EventBus, EventBusBuilder, HandlerError, StreamHandler};
use slim_bus_tests::{RedisServer, within};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long any single awaited step may take.
pub const STEP: Duration = Duration::from_secs(15);
/// How long a whole case may take to hand every entry to a handler once the fault is over.
pub const SETTLE: Duration = Duration::from_secs(40);

pub const STREAM: &str = "user.created";
pub const GROUP: &str = "tests";
/// The dead-letter stream of [`STREAM`]: the bus adds a hash tag so both share a slot.
pub const DEAD_LETTERS: &str = "{user.created}:dlq";

/// The suite's short timings, shared with the `ledger` mode of `slim-bus-test-consumer`.
pub const BLOCK_TIME: Duration = Duration::from_millis(200);
pub const HANDLER_TIMEOUT: Duration = Duration::from_secs(1);
pub const CLAIM_MIN_IDLE: Duration = Duration::from_secs(2);
pub const CLAIM_INTERVAL: Duration = Duration::from_millis(200);
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// Both `max_concurrent` and `max_count` of every consumer of the suite.
pub const MAX_IN_FLIGHT: usize = 16;

/// What one consumer can hold unacknowledged when a fault strikes, each of which may be
/// handled again: the entries whose handlers run (`max_concurrent`) plus those handled
/// whose acks are on their way, taken as one read's worth (`max_count`); acks are flushed
/// as soon as one arrives, so the latter stay well below it.
pub const IN_FLIGHT_WINDOW: u64 = (MAX_IN_FLIGHT + MAX_IN_FLIGHT) as u64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserCreated {
    pub user_id: String,
    pub user_name: String,
    pub seq: u64,
}

impl slim_bus::Event for UserCreated {
    const STREAM: Option<&'static str> = Some(STREAM);
}

/// A bus named `consumer` with the suite's timings, connecting to `url` (a server or a proxy).
pub fn fault_bus(url: &str, consumer: &str) -> EventBusBuilder {
    EventBus::builder()
        .url(url)
        .consumer_group(GROUP)
        .consumer_name(consumer)
        .block_time(BLOCK_TIME)
        .handler_timeout(HANDLER_TIMEOUT)
        .claim_min_idle(CLAIM_MIN_IDLE)
        .claim_interval(CLAIM_INTERVAL)
        .command_timeout(COMMAND_TIMEOUT)
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .max_concurrent(MAX_IN_FLIGHT)
        .max_count(MAX_IN_FLIGHT)
}

pub async fn start_server(builder: slim_bus_tests::RedisServerBuilder) -> RedisServer {
    init_tracing();
    within("redis-server to start", STEP, builder.start())
        .await
        .expect("redis-server starts")
}

/// What the bus logged, kept for the checks of what it logs during faults.
struct Log {
    text: Arc<Mutex<Vec<u8>>>,
    installed: bool,
}

static LOG: OnceLock<Log> = OnceLock::new();

/// Writes each log line both to the test's output (captured per test, like
/// `with_test_writer`) and into [`LOG`].
#[derive(Clone)]
struct Tee(Arc<Mutex<Vec<u8>>>);

impl io::Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        print!("{}", String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Tee {
    type Writer = Tee;

    fn make_writer(&'a self) -> Tee {
        self.clone()
    }
}

/// Installs a subscriber that keeps what it logs (at `RUST_LOG`, `warn` by default) for
/// [`log_lines`]; only the first call does anything.
pub fn init_tracing() {
    LOG.get_or_init(|| {
        let text = Arc::default();
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let installed = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(Tee(Arc::clone(&text)))
            .try_init()
            .is_ok();
        Log { text, installed }
    });
}

/// Where the log ends now, for [`log_lines`].
pub fn log_mark() -> usize {
    init_tracing();
    LOG.get().map_or(0, |log| log.text.lock().unwrap().len())
}

/// The lines logged since `mark` that contain any of `needles`. Tests that run in one
/// process (`cargo test`) share the log, so the needles should name what only the caller uses.
pub fn log_lines(mark: usize, needles: &[&str]) -> Vec<String> {
    let log = LOG.get().expect("init_tracing ran");
    assert!(
        log.installed,
        "another tracing subscriber was installed first: the log cannot be checked"
    );
    let text = log.text.lock().unwrap();
    String::from_utf8_lossy(&text[mark.min(text.len())..])
        .lines()
        .filter(|line| needles.iter().any(|needle| line.contains(needle)))
        .map(str::to_owned)
        .collect()
}

/// Every handling of every entry, by entry id and sequence number (the same sequence number
/// can sit in two entries when a publish was retried after its reply was lost).
#[derive(Debug, Default)]
pub struct Ledger {
    inner: Mutex<LedgerInner>,
}

#[derive(Debug, Default)]
struct LedgerInner {
    entries: HashMap<(EntryId, u64), Handlings>,
    by_consumer: BTreeMap<String, u64>,
    total: u64,
    /// When each handler run finished, in order.
    finished_at: Vec<Instant>,
}

#[derive(Debug)]
struct Handlings {
    count: u32,
    first_at: Instant,
    /// The delivery count of the first handling: above 1 when an earlier delivery never
    /// reached a handler (its reply was lost, or a killed consumer held it).
    first_delivery: u64,
}

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, LedgerInner> {
        self.inner.lock().unwrap()
    }

    pub fn record(&self, id: EntryId, seq: u64, consumer: &str, delivery_count: u64) {
        let mut inner = self.lock();
        inner.total += 1;
        inner.finished_at.push(Instant::now());
        *inner.by_consumer.entry(consumer.to_owned()).or_default() += 1;
        inner
            .entries
            .entry((id, seq))
            .and_modify(|h| h.count += 1)
            .or_insert(Handlings {
                count: 1,
                first_at: Instant::now(),
                first_delivery: delivery_count,
            });
    }

    /// Entries first handled on a later delivery than the first.
    pub fn redelivered_before_handled(&self) -> usize {
        self.lock()
            .entries
            .values()
            .filter(|h| h.first_delivery > 1)
            .count()
    }

    /// Handler runs that finished, duplicates included.
    pub fn total(&self) -> u64 {
        self.lock().total
    }

    pub fn contains(&self, id: EntryId) -> bool {
        self.lock()
            .entries
            .keys()
            .any(|(handled, _)| *handled == id)
    }

    /// Entries of `expected` that no handler has finished.
    pub fn missing(&self, expected: &[(EntryId, u64)]) -> Vec<(EntryId, u64)> {
        let inner = self.lock();
        expected
            .iter()
            .filter(|key| !inner.entries.contains_key(key))
            .copied()
            .collect()
    }

    /// Handler runs beyond the first of each entry.
    pub fn duplicates(&self) -> u64 {
        self.lock()
            .entries
            .values()
            .map(|h| u64::from(h.count - 1))
            .sum()
    }

    pub fn by_consumer(&self) -> BTreeMap<String, u64> {
        self.lock().by_consumer.clone()
    }

    /// When the first entry with a sequence number of at least `seq` was handled.
    pub fn first_handled_from_seq(&self, seq: u64) -> Option<Instant> {
        self.lock()
            .entries
            .iter()
            .filter(|((_, s), _)| *s >= seq)
            .map(|(_, h)| h.first_at)
            .min()
    }

    /// When the `n`th handler run (counting from 1) finished.
    pub fn finished_at(&self, n: u64) -> Option<Instant> {
        let index = usize::try_from(n.checked_sub(1)?).ok()?;
        self.lock().finished_at.get(index).copied()
    }

    pub async fn until_total(&self, total: u64, what: &str) {
        within(what, SETTLE, async {
            while self.total() < total {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }
}

/// Tracks how many handlers of one consumer run at once.
#[derive(Debug, Default)]
pub struct Gauge {
    running: AtomicUsize,
    max: AtomicUsize,
}

impl Gauge {
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }
}

/// Records each entry in the ledger after `work`; never fails.
pub struct LedgerHandler {
    pub ledger: Arc<Ledger>,
    pub work: Duration,
    pub gauge: Arc<Gauge>,
}

impl LedgerHandler {
    pub fn new(ledger: &Arc<Ledger>, work: Duration) -> Self {
        LedgerHandler {
            ledger: ledger.clone(),
            work,
            gauge: Arc::default(),
        }
    }
}

#[slim_bus::async_trait]
impl StreamHandler for LedgerHandler {
    type Event = UserCreated;

    async fn handle(&self, event: UserCreated, ctx: Context) -> Result<(), HandlerError> {
        let running = self.gauge.running.fetch_add(1, Ordering::AcqRel) + 1;
        self.gauge.max.fetch_max(running, Ordering::AcqRel);
        if !self.work.is_zero() {
            tokio::time::sleep(self.work).await;
        }
        self.ledger.record(
            ctx.entry_id(),
            event.seq,
            ctx.consumer(),
            ctx.delivery_count(),
        );
        self.gauge.running.fetch_sub(1, Ordering::AcqRel);
        Ok(())
    }
}

/// How fast the publisher goes: `batch` entries per pipelined round trip, one round trip
/// per `interval` at most.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    pub batch: u64,
    pub interval: Duration,
}

/// Appends numbered entries with raw pipelined `XADD`s from a task, retrying a batch on a
/// new connection when the fault breaks the old one.
pub struct Publisher {
    unsent: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
    task: JoinHandle<Vec<(EntryId, u64)>>,
}

impl Publisher {
    pub fn start(client: redis::Client, seqs: Range<u64>, pacing: Pacing) -> Publisher {
        let unsent = Arc::new(AtomicU64::new(seqs.start));
        let retries = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(publish(
            client,
            seqs,
            pacing,
            unsent.clone(),
            retries.clone(),
        ));
        Publisher {
            unsent,
            retries,
            task,
        }
    }

    /// The lowest sequence number not sent yet: every entry from it on is appended after
    /// this call.
    pub fn unsent(&self) -> u64 {
        self.unsent.load(Ordering::Acquire)
    }

    /// Batches sent again after an error.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Acquire)
    }

    /// Waits for the last batch; returns the entries whose `XADD` answered an id.
    pub async fn finish(self) -> Vec<(EntryId, u64)> {
        within("the publisher to finish", SETTLE, self.task)
            .await
            .expect("the publisher task does not panic")
    }
}

async fn publish(
    client: redis::Client,
    seqs: Range<u64>,
    pacing: Pacing,
    unsent: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
) -> Vec<(EntryId, u64)> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT));
    let mut added = Vec::with_capacity((seqs.end - seqs.start) as usize);
    let mut connection: Option<MultiplexedConnection> = None;
    let mut ticker = tokio::time::interval(pacing.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut start = seqs.start;
    while start < seqs.end {
        ticker.tick().await;
        let end = (start + pacing.batch).min(seqs.end);
        let mut pipe = redis::pipe();
        for seq in start..end {
            pipe.cmd("XADD")
                .arg(STREAM)
                .arg("*")
                .arg("user_id")
                .arg(format!("u{seq}"))
                .arg("user_name")
                .arg(format!("User {seq}"))
                .arg("seq")
                .arg(seq);
        }
        unsent.store(end, Ordering::Release);
        loop {
            let conn = match &mut connection {
                Some(conn) => conn,
                None => match client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                {
                    Ok(conn) => connection.insert(conn),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            match pipe.query_async::<Vec<String>>(conn).await {
                Ok(ids) => {
                    added.extend(ids.iter().map(|id| id.parse().unwrap()).zip(start..end));
                    break;
                }
                Err(_) => {
                    // The reply may be lost after the entries were added: sending the batch
                    // again can add a sequence number twice, as a real producer would.
                    retries.fetch_add(1, Ordering::AcqRel);
                    connection = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        start = end;
    }
    added
}

/// A `slim-bus-test-consumer` process in `ledger` mode whose lines go into a ledger.
pub struct ConsumerProcess {
    child: tokio::process::Child,
    output: JoinHandle<()>,
}

impl ConsumerProcess {
    /// Starts the process and waits until it listens.
    pub async fn start(url: &str, name: &str, work_millis: u64, ledger: &Arc<Ledger>) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_slim-bus-test-consumer"))
            .arg(url)
            .arg(name)
            .arg(format!("ledger:{work_millis}:{MAX_IN_FLIGHT}"))
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the consumer process starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (listening, listens) = oneshot::channel();
        let (ledger, owner) = (ledger.clone(), name.to_owned());
        let output = tokio::spawn(async move {
            let mut listening = Some(listening);
            while let Ok(Some(line)) = lines.next_line().await {
                let words: Vec<&str> = line.split(' ').collect();
                match words.as_slice() {
                    ["listening"] => {
                        if let Some(listening) = listening.take() {
                            let _ = listening.send(());
                        }
                    }
                    ["ledger", id, seq, delivery_count] => ledger.record(
                        id.parse().unwrap(),
                        seq.parse().unwrap(),
                        &owner,
                        delivery_count.parse().unwrap(),
                    ),
                    // Its log lines: show them with the test's output.
                    _ => eprintln!("[{owner}] {line}"),
                }
            }
        });
        within(&format!("{name} to listen"), STEP, listens)
            .await
            .expect("the consumer process prints `listening`");
        ConsumerProcess { child, output }
    }

    /// `kill -9`, then reads what the process printed before it died.
    pub async fn kill(mut self) {
        within("kill -9", STEP, self.child.kill()).await.unwrap();
        within("the killed process's last lines", STEP, self.output)
            .await
            .unwrap();
    }
}

/// A direct connection for the checks; each command is bounded with [`within`].
pub async fn direct(server: &RedisServer) -> MultiplexedConnection {
    within("a direct connection", STEP, server.connection()).await
}

/// Every entry of the stream, as (id, seq).
pub async fn stream_entries(conn: &mut MultiplexedConnection) -> Vec<(EntryId, u64)> {
    let reply: redis::streams::StreamRangeReply = within(
        "XRANGE of the whole stream",
        STEP,
        redis::cmd("XRANGE")
            .arg(STREAM)
            .arg("-")
            .arg("+")
            .query_async(conn),
    )
    .await
    .unwrap();
    reply
        .ids
        .iter()
        .map(|entry| {
            let seq: String = entry.get("seq").expect("every entry has a seq");
            (entry.id.parse().unwrap(), seq.parse().unwrap())
        })
        .collect()
}

/// How many entries the suite's group holds pending; `None` while the group does not exist.
pub async fn pending_count(conn: &mut MultiplexedConnection) -> Option<u64> {
    pending_count_of(conn, STREAM, GROUP).await
}

/// How many entries `group` holds pending on `stream`; `None` while the group does not exist.
pub async fn pending_count_of(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
) -> Option<u64> {
    let reply: redis::RedisResult<redis::Value> = within(
        "XPENDING summary",
        STEP,
        redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .query_async(conn),
    )
    .await;
    let reply = match reply {
        Ok(reply) => reply,
        Err(error) if error.code() == Some("NOGROUP") => return None,
        Err(error) => panic!("XPENDING failed: {error}"),
    };
    Some(match reply {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            other => panic!("unexpected XPENDING summary: {other:?}"),
        },
        other => panic!("unexpected XPENDING reply: {other:?}"),
    })
}

/// The ids `consumer` holds pending.
pub async fn pending_of(conn: &mut MultiplexedConnection, consumer: &str) -> Vec<EntryId> {
    let reply: redis::streams::StreamPendingCountReply = within(
        "XPENDING of one consumer",
        STEP,
        redis::cmd("XPENDING")
            .arg(STREAM)
            .arg(GROUP)
            .arg("-")
            .arg("+")
            .arg(100_000)
            .arg(consumer)
            .query_async(conn),
    )
    .await
    .unwrap();
    reply.ids.iter().map(|p| p.id.parse().unwrap()).collect()
}

pub async fn stream_len(conn: &mut MultiplexedConnection, stream: &str) -> u64 {
    within(
        "XLEN",
        STEP,
        redis::cmd("XLEN").arg(stream).query_async(conn),
    )
    .await
    .unwrap()
}

/// What a case ends with once every expected entry is handled and nothing is pending.
#[derive(Debug)]
pub struct Settled {
    pub entries: usize,
    pub duplicates: u64,
    /// Entries whose first delivery never reached a handler.
    pub late: usize,
    pub dead_lettered: u64,
    pub at: Instant,
}

/// Waits until every entry of `expected` was handled at least once and the group holds
/// nothing pending, then checks the dead-letter stream: these handlers never fail, so
/// nothing may be there.
pub async fn settle(server: &RedisServer, ledger: &Ledger, expected: &[(EntryId, u64)]) -> Settled {
    let mut conn = direct(server).await;
    let deadline = Instant::now() + SETTLE;
    loop {
        let missing = ledger.missing(expected);
        let pending = pending_count(&mut conn).await;
        if missing.is_empty() && pending == Some(0) {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "after {SETTLE:?}, {} of {} entries were never handled (first: {:?}); pending: {pending:?} \
                 (None: the group does not exist)\n{}",
                missing.len(),
                expected.len(),
                &missing[..missing.len().min(10)],
                server.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at = Instant::now();
    let dead_lettered = stream_len(&mut conn, DEAD_LETTERS).await;
    assert_eq!(
        dead_lettered, 0,
        "entries were dead-lettered although every handler succeeds: the bus gave up on \
         deliveries that had no outcome"
    );
    Settled {
        entries: expected.len(),
        duplicates: ledger.duplicates(),
        late: ledger.redelivered_before_handled(),
        dead_lettered,
        at,
    }
}

/// Checks that no entry whose `XADD` answered an id is missing from the stream.
pub fn assert_nothing_lost(published: &[(EntryId, u64)], in_stream: &[(EntryId, u64)]) {
    let in_stream: std::collections::HashSet<_> = in_stream.iter().collect();
    let lost: Vec<_> = published
        .iter()
        .filter(|entry| !in_stream.contains(entry))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged XADDs are not in the stream (first: {:?})",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

/// The one-line record of a case, printed to stdout (`--no-capture` shows it).
pub struct Figures<'a> {
    pub case: &'a str,
    pub settled: &'a Settled,
    pub duplicate_bound: u64,
    /// From the end of the fault until the bus handled entries it read after the fault.
    pub recovered: Option<Duration>,
    pub fault_end: Instant,
    pub started: Instant,
    pub notes: String,
}

impl fmt::Display for Figures<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fault case | {} | entries {} | duplicates {} (bound {}) | first delivery lost {} | \
             dead-lettered {} | recovered in {} | settled {:.2?} after the fault | duration {:.2?}",
            self.case,
            self.settled.entries,
            self.settled.duplicates,
            self.duplicate_bound,
            self.settled.late,
            self.settled.dead_lettered,
            self.recovered
                .map_or_else(|| "n/a".to_owned(), |d| format!("{d:.2?}")),
            self.settled.at.saturating_duration_since(self.fault_end),
            self.started.elapsed(),
        )?;
        if !self.notes.is_empty() {
            write!(f, " | {}", self.notes)?;
        }
        Ok(())
    }
}

impl Figures<'_> {
    /// Prints the line, then checks the duplicate bound.
    pub fn report(&self) {
        println!("{self}");
        assert!(
            self.settled.duplicates <= self.duplicate_bound,
            "{} duplicates exceed the in-flight bound of {}",
            self.settled.duplicates,
            self.duplicate_bound
        );
    }
}

/// When the bus was working again after a fault that ended at `fault_end`, with
/// `total_at_fault_end` handler runs finished by then: when a run finished that needed a
/// read after the fault. Up to `max_concurrent` entries may have been read before and still
/// be running, so that is the run `max_concurrent + 1` after the fault.
pub fn recovered(ledger: &Ledger, total_at_fault_end: u64, fault_end: Instant) -> Option<Duration> {
    ledger
        .finished_at(total_at_fault_end + MAX_IN_FLIGHT as u64 + 1)
        .map(|at| at.saturating_duration_since(fault_end))
}
