//! Runs the selected cases, interleaved within each repetition, against one Redis server.

use std::fmt::Write as _;
use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use redis::aio::MultiplexedConnection;
use slim_bus_tests::{RedisCluster, RedisServer, TestCertificates};

use crate::bus::{self, ConsumeSettings};
use crate::cases::{Case, Measurement, Reading, Row, Sizes, Target, Unit, count};
use crate::cli::{ChildKind, Options};
use crate::compete::{self, Endpoint};
use crate::handover;
use crate::memory;
use crate::raw::{self, CommandStats, PUBLISH_PIPELINE, READ_COUNT};
use crate::report::{self, Report};

/// The wait of the I/O-bound handler.
const IO_WAIT: Duration = Duration::from_millis(1);
/// What the handler of the `cpu-1` and `cpu-2` cases computes for per entry.
const CPU_WORK: Duration = Duration::from_micros(200);
/// Tasks of the concurrent publish case.
const PUBLISH_TASKS: u64 = 64;

/// Runs the suite and prints the table; `Ok(false)` when a case failed.
pub(crate) async fn run(options: Options) -> anyhow::Result<bool> {
    // Kept alive until the end of the run; killed and reaped on drop.
    let tls = options.cases.iter().any(|case| case.is_tls());
    let (url, server, origin) = match &options.redis_url {
        Some(_) if tls => bail!("the *-tls cases run on a throwaway redis-server: unset REDIS_URL"),
        Some(url) => (url.clone(), None, "REDIS_URL"),
        None => {
            let mut builder = RedisServer::builder();
            let certs = if tls {
                let certs = TestCertificates::generate()?;
                builder = builder.tls(&certs, false);
                raw::trust_tls_ca(certs.ca());
                Some(certs)
            } else {
                None
            };
            let server = builder
                .start()
                .await
                .context("starting a throwaway redis-server (or set REDIS_URL)")?;
            (
                server.url(),
                Some((server, certs)),
                "throwaway redis-server",
            )
        }
    };
    let tls_url = server
        .as_ref()
        .and_then(|(server, _)| server.tls_port().map(|_| server.tls_url()));
    let cluster = if options.cases.contains(&Case::CompeteCluster) {
        Some(ClusterBench::start().await?)
    } else {
        None
    };
    let mut suite = Suite {
        conn: raw::connect(&url).await?,
        url,
        tls_url,
        cluster,
        sizes: options.sizes.clone(),
        run_id: run_id(),
    };
    let version = raw::server_version(&mut suite.conn).await?;
    println!("{}", header(&options, &version, origin));
    if let Some(cluster) = &suite.cluster {
        println!("{}", cluster.describe(&suite.run_id).await?);
    }

    let mut report = Report::default();
    let mut traffic: Vec<Traffic> = Vec::new();
    let mut failed = 0;
    for rep in 1..=options.reps {
        for &case in &options.cases {
            match suite.run(case, rep).await {
                Ok(run) => {
                    let mut summary: Vec<String> =
                        run.measurements.iter().map(|m| summary(case, m)).collect();
                    if let Some(t) = &run.traffic {
                        summary.push(format!("[{}]", traffic_summary(t)));
                        traffic.retain(|old| old.case != case);
                        traffic.push(t.clone());
                    }
                    eprintln!(
                        "rep {rep}/{}  {case:<16} {}",
                        options.reps,
                        summary.join(", ")
                    );
                    report.add(rep, run.measurements);
                }
                Err(error) => {
                    failed += 1;
                    eprintln!("rep {rep}/{}  {case:<16} FAILED: {error:#}", options.reps);
                }
            }
        }
    }
    println!("\n{}", report.table());
    println!("load average at the end: {}\n", load_average());
    println!("{}", traffic_table(&traffic));
    if failed > 0 {
        println!("{failed} case run(s) failed; see the lines above");
    }
    Ok(failed == 0)
}

fn header(options: &Options, redis_version: &str, origin: &str) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let cases: Vec<&str> = options.cases.iter().map(|c| c.name()).collect();
    format!(
        "slim-bus benchmarks: {} sizes, {} rep(s), cases interleaved per rep\n\
         machine: {cpus} CPUs ({cpu_model}); redis {redis_version} ({origin}); load average {}\n\
         cases: {}",
        options.sizes.name,
        options.reps,
        load_average(),
        cases.join(" ")
    )
}

/// The 1, 5 and 15 minute load averages: other work on the machine skews every number.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|avg| avg.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn summary(case: Case, m: &Measurement) -> String {
    let name = if m.row.id == case.name() {
        String::new()
    } else {
        format!("{} ", m.row.id)
    };
    match &m.outcome {
        Reading::Value(v) => format!("{name}{}", report::format_value(*v, m.row.unit)),
    }
}

fn traffic_summary(t: &Traffic) -> String {
    let reads = t.commands.get("xreadgroup").calls;
    let acks = t.commands.get("xack").calls;
    let adds = t.commands.get("xadd").calls;
    let mut parts = Vec::new();
    if reads > 0 {
        parts.push(format!("{reads} XREADGROUP"));
    }
    if acks > 0 {
        parts.push(format!("{acks} XACK"));
    }
    if adds > 0 {
        parts.push(format!("{adds} XADD"));
    }
    parts.push(format!(
        "redis busy {:.0}% of {:.2} s",
        busy_share(t) * 100.0,
        t.elapsed.as_secs_f64()
    ));
    parts.join(", ")
}

/// The share of the wall time the server spent executing stream commands.
fn busy_share(t: &Traffic) -> f64 {
    t.commands.stream_usec() as f64 / 1e6 / t.elapsed.as_secs_f64()
}

/// What the server did per case, from its `INFO commandstats` (the last repetition).
fn traffic_table(traffic: &[Traffic]) -> String {
    let mut out = String::from(
        "Server side, last repetition (INFO commandstats; \"busy\" = time in stream commands / wall time):\n\n\
         | case | entries | XREADGROUP calls | entries/read | XACK calls | ids/XACK | XADD calls | redis busy |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for t in traffic {
        let reads = t.commands.get("xreadgroup").calls;
        let acks = t.commands.get("xack").calls;
        let per = |calls: u64| {
            if calls == 0 {
                "-".to_owned()
            } else {
                format!("{:.1}", t.entries as f64 / calls as f64)
            }
        };
        let _ = writeln!(
            out,
            "| {} | {} | {reads} | {} | {acks} | {} | {} | {:.0}% |",
            t.case,
            t.entries,
            per(reads),
            per(acks),
            t.commands.get("xadd").calls,
            busy_share(t) * 100.0
        );
    }
    out
}

/// Tells the keys of this run from those of another run on the same server.
fn run_id() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{}-{millis}", std::process::id())
}

struct Suite {
    url: String,
    /// The throwaway server's TLS port, when a `*-tls` case is selected.
    tls_url: Option<String>,
    conn: MultiplexedConnection,
    /// The throwaway cluster, when `compete-cluster` is selected.
    cluster: Option<ClusterBench>,
    sizes: Sizes,
    run_id: String,
}

fn rate(entries: u64, elapsed: Duration) -> f64 {
    entries as f64 / elapsed.as_secs_f64()
}

fn value(row: Row, value: f64) -> Measurement {
    Measurement {
        row,
        outcome: Reading::Value(value),
    }
}

/// One case run: its rows, and the server's work during the timed part.
struct CaseRun {
    measurements: Vec<Measurement>,
    traffic: Option<Traffic>,
}

impl CaseRun {
    fn new(measurements: Vec<Measurement>) -> Self {
        CaseRun {
            measurements,
            traffic: None,
        }
    }

    fn with_traffic(
        mut self,
        case: Case,
        entries: u64,
        elapsed: Duration,
        commands: CommandStats,
    ) -> Self {
        self.traffic = Some(Traffic {
            case,
            entries,
            elapsed,
            commands,
        });
        self
    }
}

fn throughput(row: Row, entries: u64, elapsed: Duration) -> Measurement {
    value(row, rate(entries, elapsed))
}

impl Suite {
    /// Runs one case on a fresh stream, and removes the stream whatever happened.
    async fn run(&mut self, case: Case, rep: usize) -> anyhow::Result<CaseRun> {
        let stream = format!("slim-bus-bench:{}:{case}:{rep}", self.run_id);
        let result = self.run_on(case, &stream).await;
        let mut cleanup = raw::delete(&mut self.conn, &stream).await;
        if cleanup.is_ok() {
            cleanup = raw::delete(&mut self.conn, &raw::dead_letter_stream(&stream)).await;
        }
        let run = result?;
        cleanup?;
        Ok(run)
    }

    async fn run_on(&mut self, case: Case, stream: &str) -> anyhow::Result<CaseRun> {
        let sizes = self.sizes.clone();
        let url = if case.is_tls() {
            self.tls_url
                .as_deref()
                .context("the *-tls cases need the server's TLS port")?
        } else {
            self.url.as_str()
        };
        let stats = self.conn.clone();
        let conn = &mut self.conn;
        let traffic = |entries, (elapsed, commands), rows| {
            CaseRun::new(rows).with_traffic(case, entries, elapsed, commands)
        };
        // A case whose one row is `entries` over the timed part's duration.
        let rated = |entries, observed: (Duration, CommandStats), row| {
            let measurement = throughput(row, entries, observed.0);
            traffic(entries, observed, vec![measurement])
        };
        // A TLS case's row, and a second row of the same run against the case it repeats
        // over plain TCP: the cost of TLS.
        let rated_with_tls_cost =
            |entries, observed: (Duration, CommandStats), row: Row, plain: &'static str| {
                let against_plain = Row::new(
                    format!("{}/plain", row.id),
                    format!(
                        "the same run of {}, against {plain} (the cost of TLS)",
                        row.id
                    ),
                    Unit::EntriesPerSec,
                )
                .vs(plain);
                let rows = vec![
                    throughput(row, entries, observed.0),
                    throughput(against_plain, entries, observed.0),
                ];
                traffic(entries, observed, rows)
            };
        Ok(match case {
            Case::Baseline => {
                let entries = sizes.consume;
                fill(conn, stream, entries, false).await?;
                let (elapsed, commands) =
                    observed(&stats, raw::consume(conn, stream, entries)).await?;
                expect_pending(conn, stream, 0).await?;
                let row = Row::new(
                    "baseline",
                    format!(
                        "hand-written redis-rs loop: XREADGROUP COUNT {READ_COUNT} + one XACK per batch, {} backlog",
                        count(entries)
                    ),
                    Unit::EntriesPerSec,
                );
                traffic(
                    entries,
                    (elapsed, commands),
                    vec![throughput(row, entries, elapsed)],
                )
            }
            Case::Consume => {
                let entries = sizes.consume;
                let observed =
                    consume_case(url, conn, &stats, stream, entries, false, &no_op()).await?;
                let row = Row::new(
                    "consume",
                    format!(
                        "slim-bus, no-op typed handler, max_concurrent 64, max_count {READ_COUNT}, {} backlog",
                        count(entries)
                    ),
                    Unit::EntriesPerSec,
                )
                .vs("baseline")
                .target(Target::RatioAtLeast(1.3));
                rated(entries, observed, row)
            }
            Case::ConsumeObserved => {
                let entries = sizes.consume;
                let observed = {
                    let _on = crate::observe::Observed::start();
                    consume_case(url, conn, &stats, stream, entries, false, &no_op()).await?
                };
                let row = Row::new(
                    "consume-observed",
                    format!(
                        "as consume, with a metrics recorder (metrics-util's DebuggingRecorder) and an INFO fmt subscriber into a sink, {} backlog",
                        count(entries)
                    ),
                    Unit::EntriesPerSec,
                )
                .vs("consume")
                .target(Target::RatioAtLeast(0.9));
                rated(entries, observed, row)
            }
            Case::ConsumeTraced => {
                let entries = sizes.consume;
                let settings = ConsumeSettings {
                    span_level: Some(tracing::Level::INFO),
                    ..no_op()
                };
                let observed = {
                    let _on = crate::observe::Observed::start();
                    consume_case(url, conn, &stats, stream, entries, false, &settings).await?
                };
                let row = Row::new(
                    "consume-traced",
                    format!(
                        "as consume-observed, with span_level INFO: a span per delivery formatted by the subscriber, {} backlog",
                        count(entries)
                    ),
                    Unit::EntriesPerSec,
                )
                .vs("consume");
                rated(entries, observed, row)
            }
            Case::ConsumeLayered => {
                let entries = sizes.consume;
                let settings = ConsumeSettings {
                    layered: true,
                    ..no_op()
                };
                let observed =
                    consume_case(url, conn, &stats, stream, entries, false, &settings).await?;
                let row = Row::new(
                    "consume-layered",
                    format!(
                        "as consume, with a pass-through tower layer (`Identity`) on the bus: the layered call path (a boxed event, a service clone and `oneshot` per call), {} backlog",
                        count(entries)
                    ),
                    Unit::EntriesPerSec,
                )
                .vs("consume")
                .target(Target::RatioAtLeast(0.9));
                rated(entries, observed, row)
            }
            Case::Poison => {
                let entries = sizes.consume;
                let handled = entries - raw::poisoned_count(entries);
                let observed =
                    consume_case(url, conn, &stats, stream, entries, true, &no_op()).await?;
                let row = Row::new(
                    "poison",
                    format!(
                        "as consume, 1% undecodable `seq` (dead-lettered or left pending); rate of the {} handled",
                        count(handled)
                    ),
                    Unit::EntriesPerSec,
                )
                .vs("consume");
                let measurement = throughput(row, handled, observed.0);
                traffic(entries, observed, vec![measurement])
            }
            Case::Transient => {
                let entries = sizes.consume;
                let settings = ConsumeSettings {
                    fail_once_every: Some(100),
                    retry_backoff: Some((Duration::from_millis(10), Duration::from_millis(100))),
                    ..no_op()
                };
                let observed =
                    consume_case(url, conn, &stats, stream, entries, false, &settings).await?;
                let row = Row::new(
                    "transient",
                    format!(
                        "as consume, 1% of entries fail once and succeed on their retry (backoff 10 to 100 ms); until every entry succeeded, {} backlog",
                        count(entries)
                    ),
                    Unit::EntriesPerSec,
                )
                .vs("consume")
                .target(Target::RatioAtLeast(0.8));
                rated(entries, observed, row)
            }
            Case::Cpu1 | Case::Cpu2 => {
                let (id, workers) = if case == Case::Cpu1 {
                    ("cpu-1", 1)
                } else {
                    ("cpu-2", 2)
                };
                let entries = sizes.cpu;
                let settings = ConsumeSettings {
                    cpu_work: Some(CPU_WORK),
                    workers: Some(workers),
                    ..no_op()
                };
                let observed =
                    consume_case(url, conn, &stats, stream, entries, false, &settings).await?;
                let mut row = Row::new(
                    id,
                    format!(
                        "handler computes for 200 µs, max_concurrent 64, runtime with {workers} worker(s), {} backlog",
                        count(entries)
                    ),
                    Unit::EntriesPerSec,
                );
                if case == Case::Cpu2 {
                    row = row.vs("cpu-1").target(Target::RatioAtLeast(1.7));
                }
                rated(entries, observed, row)
            }
            Case::Io64 | Case::Io512 => {
                let (id, max_concurrent) = if case == Case::Io64 {
                    ("io-64", 64)
                } else {
                    ("io-512", 512)
                };
                let entries = sizes.io;
                let settings = ConsumeSettings {
                    max_concurrent,
                    io_wait: Some(IO_WAIT),
                    ..ConsumeSettings::default()
                };
                let observed =
                    consume_case(url, conn, &stats, stream, entries, false, &settings).await?;
                let row = Row::new(
                    id,
                    format!(
                        "handler awaits 1 ms, max_concurrent {max_concurrent}, {} backlog",
                        count(entries)
                    ),
                    Unit::EntriesPerSec,
                )
                .vs("baseline");
                rated(entries, observed, row)
            }
            Case::PublishRaw => {
                let entries = sizes.publish;
                let observed =
                    observed(&stats, raw::publish_pipelined(conn, stream, entries)).await?;
                expect_len(conn, stream, entries).await?;
                let row = Row::new(
                    "publish-raw",
                    format!(
                        "hand-written XADD loop, pipelines of {}, {} entries",
                        raw::PUBLISH_PIPELINE,
                        count(entries)
                    ),
                    Unit::EntriesPerSec,
                );
                rated(entries, observed, row)
            }
            Case::PublishRawSeq => {
                let entries = sizes.publish_seq;
                let observed =
                    observed(&stats, raw::publish_one_by_one(conn, stream, entries)).await?;
                expect_len(conn, stream, entries).await?;
                let row = Row::new(
                    "publish-raw-seq",
                    format!(
                        "hand-written XADD, one awaited at a time, {} entries",
                        count(entries)
                    ),
                    Unit::EntriesPerSec,
                )
                .vs("publish-raw");
                rated(entries, observed, row)
            }
            Case::PublishSeq => {
                let entries = sizes.publish_seq;
                let bus = bus::publisher(url).await?;
                let observed =
                    observed(&stats, bus::publish_one_by_one(&bus, stream, entries)).await?;
                expect_len(conn, stream, entries).await?;
                let row = Row::new(
                    "publish-seq",
                    format!(
                        "slim-bus publish, one awaited at a time, {} entries",
                        count(entries)
                    ),
                    Unit::EntriesPerSec,
                )
                .vs("publish-raw");
                rated(entries, observed, row)
            }
            Case::Publish64 => {
                let entries = sizes.publish;
                let bus = bus::publisher(url).await?;
                let observed = observed(
                    &stats,
                    bus::publish_concurrently(&bus, stream, entries, PUBLISH_TASKS),
                )
                .await?;
                expect_len(conn, stream, entries).await?;
                let row = Row::new(
                    "publish-64",
                    format!(
                        "slim-bus publish from {PUBLISH_TASKS} tasks, one bus, {} entries",
                        count(entries)
                    ),
                    Unit::EntriesPerSec,
                )
                .vs("publish-raw")
                .target(Target::RatioAtLeast(0.7));
                rated(entries, observed, row)
            }
            Case::PublishBatch => {
                let entries = sizes.publish;
                let bus = bus::publisher(url).await?;
                let observed =
                    observed(&stats, bus::publish_in_batches(&bus, stream, entries)).await?;
                expect_len(conn, stream, entries).await?;
                let row = Row::new(
                    "publish-batch",
                    format!(
                        "slim-bus publish_batch of {PUBLISH_PIPELINE} events, {} entries",
                        count(entries)
                    ),
                    Unit::EntriesPerSec,
                )
                .vs("publish-raw")
                .target(Target::RatioAtLeast(0.9));
                rated(entries, observed, row)
            }
            Case::BaselineTls => {
                let entries = sizes.consume;
                fill(conn, stream, entries, false).await?;
                let mut tls = raw::connect(url).await?;
                let (elapsed, commands) =
                    observed(&stats, raw::consume(&mut tls, stream, entries)).await?;
                expect_pending(conn, stream, 0).await?;
                let row = Row::new(
                    "baseline-tls",
                    format!("as baseline, over TLS (rustls), {} backlog", count(entries)),
                    Unit::EntriesPerSec,
                )
                .vs("baseline");
                traffic(
                    entries,
                    (elapsed, commands),
                    vec![throughput(row, entries, elapsed)],
                )
            }
            Case::ConsumeTls => {
                let entries = sizes.consume;
                let observed =
                    consume_case(url, conn, &stats, stream, entries, false, &no_op()).await?;
                let row = Row::new(
                    "consume-tls",
                    format!("as consume, over TLS, {} backlog", count(entries)),
                    Unit::EntriesPerSec,
                )
                .vs("baseline-tls")
                .target(Target::RatioAtLeast(1.3));
                rated_with_tls_cost(entries, observed, row, "consume")
            }
            Case::PublishRawTls => {
                let entries = sizes.publish;
                let mut tls = raw::connect(url).await?;
                let observed =
                    observed(&stats, raw::publish_pipelined(&mut tls, stream, entries)).await?;
                expect_len(conn, stream, entries).await?;
                let row = Row::new(
                    "publish-raw-tls",
                    format!("as publish-raw, over TLS, {} entries", count(entries)),
                    Unit::EntriesPerSec,
                )
                .vs("publish-raw");
                rated(entries, observed, row)
            }
            Case::Publish64Tls => {
                let entries = sizes.publish;
                let bus = bus::publisher(url).await?;
                let observed = observed(
                    &stats,
                    bus::publish_concurrently(&bus, stream, entries, PUBLISH_TASKS),
                )
                .await?;
                expect_len(conn, stream, entries).await?;
                let row = Row::new(
                    "publish-64-tls",
                    format!("as publish-64, over TLS, {} entries", count(entries)),
                    Unit::EntriesPerSec,
                )
                .vs("publish-raw-tls")
                .target(Target::RatioAtLeast(0.7));
                rated_with_tls_cost(entries, observed, row, "publish-64")
            }
            Case::LatencyRaw | Case::Latency => {
                latency_case(case, url, conn, &stats, stream, &sizes).await?
            }
            Case::RssRaw | Case::Rss | Case::RssBacklog => {
                memory_case(case, url, conn, &stats, stream, &sizes).await?
            }
            Case::Compete => compete_case(url, conn, stream, &sizes).await?,
            Case::Handover => handover_case(url, stream, &sizes).await?,
            Case::LongHandlers => long_handlers_case(url, stream, &sizes).await?,
            Case::CompeteCluster => {
                let cluster = self
                    .cluster
                    .as_ref()
                    .context("compete-cluster needs the throwaway cluster")?;
                compete_cluster_case(cluster, stream, &sizes).await?
            }
        })
    }
}

/// The `handover` case: the time from the leaving consumer's shutdown until the live one
/// has handled what it held, against `claim_interval` (the bound the hand-over aims at)
/// and `claim_min_idle` (what it took without one).
async fn handover_case(url: &str, stream: &str, sizes: &Sizes) -> anyhow::Result<CaseRun> {
    let took = handover::handover(url, stream, sizes.holding).await?;
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    let setting = |id: &str, name: &str, d: Duration| {
        value(
            Row::new(
                format!("handover {id}"),
                format!("the setting {name} of both consumers"),
                Unit::Micros,
            ),
            micros(d),
        )
    };
    let what = format!(
        "from shutdown() of a consumer holding {} entries ({} waiting for a retry, the others in handlers longer than its {:?} grace) until a live consumer has handled them",
        sizes.holding,
        handover::RETRIES,
        handover::HANDOVER_GRACE
    );
    let row = |id: &str, reference: &str| {
        Row::new(id.to_owned(), what.clone(), Unit::Micros).vs(format!("handover {reference}"))
    };
    Ok(CaseRun::new(vec![
        setting("claim-interval", "claim_interval", handover::CLAIM_INTERVAL),
        setting(
            "claim-min-idle",
            "claim_min_idle",
            handover::HANDOVER_CLAIM_MIN_IDLE,
        ),
        value(
            row("handover", "claim-interval").target(Target::RatioAtMost(4.0)),
            micros(took),
        ),
        value(row("handover/min-idle", "claim-min-idle"), micros(took)),
    ]))
}

/// The `long-handlers` case: entries whose handler ran twice, and entries Redis delivered
/// twice, when handlers run longer than `claim_min_idle` next to a scanning consumer.
async fn long_handlers_case(url: &str, stream: &str, sizes: &Sizes) -> anyhow::Result<CaseRun> {
    let found = handover::long_handlers(url, stream, sizes.holding).await?;
    let what = format!(
        "{} entries, two consumers scanning every {:?}, handlers of {}x claim_min_idle ({:?}), in {:.1} s",
        sizes.holding,
        handover::CLAIM_INTERVAL,
        handover::LONG_HANDLER_FACTOR,
        handover::LONG_CLAIM_MIN_IDLE,
        found.elapsed.as_secs_f64()
    );
    Ok(CaseRun::new(vec![
        value(
            Row::new(
                "long-handlers run-twice",
                format!("entries run twice: {what}"),
                Unit::Entries,
            )
            .target(Target::AtMost(0.0)),
            found.run_twice as f64,
        ),
        value(
            Row::new(
                "long-handlers claimed",
                format!("entries delivered more than once: {what}"),
                Unit::Entries,
            )
            .target(Target::AtMost(0.0)),
            found.claimed as f64,
        ),
    ]))
}

/// The `compete` case: a run with each number of consumer processes, one row each.
async fn compete_case(
    url: &str,
    conn: &mut MultiplexedConnection,
    stream: &str,
    sizes: &Sizes,
) -> anyhow::Result<CaseRun> {
    let mut rows = Vec::new();
    for processes in compete::PROCESSES {
        let stream = format!("{stream}-{processes}");
        let mut nodes = [compete::Node {
            name: "the server".to_owned(),
            conn: conn.clone(),
            partitions: compete::partitions(&stream),
        }];
        let before = [raw::command_stats(conn).await?];
        let run = compete::run(
            Endpoint::Server(url),
            &stream,
            &mut nodes,
            sizes.compete,
            processes,
            async { Ok(()) },
        )
        .await?;
        let after = [raw::command_stats(conn).await?];
        eprintln!(
            "          compete-{processes}: entries per process {:?} in {:.2} s; {}",
            run.handled,
            run.elapsed.as_secs_f64(),
            traffic_per_node(&nodes, &before, &after, sizes.compete)
        );
        let row = Row::new(
            format!("compete-{processes}"),
            format!(
                "{processes} slim-bus process(es) in one group, a stream of {} partitions, {} backlog in all, no-op handler, max_concurrent 64 each",
                compete::PARTITIONS,
                count(sizes.compete)
            ),
            Unit::EntriesPerSec,
        )
        .vs("baseline");
        rows.push(throughput(row, run.handled.iter().sum(), run.elapsed));
    }
    Ok(CaseRun::new(rows))
}

/// The `compete-cluster` case: the hand-written loop per master, then a run with each
/// number of consumer processes, on the throwaway cluster; each run's rows against the
/// loop of this repetition, and against `compete-N` (one server) of this repetition.
async fn compete_cluster_case(
    cluster: &ClusterBench,
    stream: &str,
    sizes: &Sizes,
) -> anyhow::Result<CaseRun> {
    let masters = cluster.masters.len();
    let raw_stream = format!("{stream}-raw");
    let mut nodes = cluster.nodes(&raw_stream).await?;
    let before = cluster.command_stats(&mut nodes).await?;
    let run = compete::run_raw(&mut nodes, sizes.compete, cluster.replicated()).await?;
    let after = cluster.command_stats(&mut nodes).await?;
    eprintln!(
        "          compete-cluster-raw: entries per master {:?} in {:.2} s; {}",
        run.handled,
        run.elapsed.as_secs_f64(),
        traffic_per_node(&nodes, &before, &after, sizes.compete)
    );
    let raw_row = Row::new(
        "compete-cluster-raw",
        format!(
            "hand-written redis-rs loop per master, all {masters} at once: per round a pipeline of XREADGROUP COUNT {READ_COUNT} (one per partition it serves), then a pipeline of XACK; {} partitions, {} backlog in all",
            compete::PARTITIONS,
            count(sizes.compete)
        ),
        Unit::EntriesPerSec,
    )
    .vs("baseline");
    let mut rows = vec![throughput(raw_row, run.handled.iter().sum(), run.elapsed)];
    for processes in compete::PROCESSES {
        let stream = format!("{stream}-{processes}");
        let mut nodes = cluster.nodes(&stream).await?;
        let before = cluster.command_stats(&mut nodes).await?;
        let run = compete::run(
            Endpoint::Cluster(&cluster.seed),
            &stream,
            &mut nodes,
            sizes.compete,
            processes,
            cluster.replicated(),
        )
        .await?;
        let after = cluster.command_stats(&mut nodes).await?;
        eprintln!(
            "          compete-cluster-{processes}: entries per process {:?} in {:.2} s; {}",
            run.handled,
            run.elapsed.as_secs_f64(),
            traffic_per_node(&nodes, &before, &after, sizes.compete)
        );
        let entries = run.handled.iter().sum();
        let id = format!("compete-cluster-{processes}");
        let row = Row::new(
            id.clone(),
            format!(
                "{processes} slim-bus process(es) on the {masters}-master cluster (`.cluster([seed])`), one group, a stream of {} partitions, {} backlog in all, no-op handler, max_concurrent 64 each",
                compete::PARTITIONS,
                count(sizes.compete)
            ),
            Unit::EntriesPerSec,
        )
        .vs("compete-cluster-raw");
        let single = format!("compete-{processes}");
        let against_single = Row::new(
            format!("{id}/single"),
            format!("the same run of {id}, against {single} (one server)"),
            Unit::EntriesPerSec,
        )
        .vs(single);
        rows.push(throughput(row, entries, run.elapsed));
        rows.push(throughput(against_single, entries, run.elapsed));
    }
    Ok(CaseRun::new(rows))
}

/// Per node, what its stream commands did between `before` and `after` of a run of
/// `entries` in all: `:PORT (P partitions): N XREADGROUP (E per read), M XACK (I per ack)`.
fn traffic_per_node(
    nodes: &[compete::Node],
    before: &[CommandStats],
    after: &[CommandStats],
    entries: u64,
) -> String {
    let per_partition = entries / u64::from(compete::PARTITIONS);
    let per_node: Vec<String> = nodes
        .iter()
        .zip(before.iter().zip(after))
        .map(|(node, (before, after))| {
            let commands = after.since(before);
            let on_node = per_partition * node.partitions.len() as u64;
            let per = |calls: u64| on_node as f64 / calls.max(1) as f64;
            let reads = commands.get("xreadgroup").calls;
            let acks = commands.get("xack").calls;
            format!(
                "{} ({} partition(s)): {reads} XREADGROUP ({:.1} per read), {acks} XACK ({:.1} per ack)",
                node.name,
                node.partitions.len(),
                per(reads),
                per(acks)
            )
        })
        .collect();
    per_node.join("; ")
}

/// The throwaway Redis Cluster of `compete-cluster`: six nodes, three masters with a
/// replica each (the test harness's), and a connection to each master.
struct ClusterBench {
    /// Kept alive until the end of the run; dropping it kills and reaps every node.
    cluster: RedisCluster,
    /// The seed node the consumer processes are given (`EventBusBuilder::cluster`).
    seed: String,
    /// Each master's port and a connection to it, in port order.
    masters: Vec<(u16, MultiplexedConnection)>,
}

impl ClusterBench {
    async fn start() -> anyhow::Result<Self> {
        let cluster = RedisCluster::start()
            .await
            .context("starting a throwaway Redis Cluster (six redis-server nodes, redis-cli)")?;
        let mut masters = Vec::new();
        for port in cluster.masters().await? {
            masters.push((port, raw::connect(&cluster.node(port).url()).await?));
        }
        let seed = cluster
            .urls()
            .into_iter()
            .next()
            .context("the cluster has no running node")?;
        Ok(ClusterBench {
            cluster,
            seed,
            masters,
        })
    }

    /// The masters holding the partitions of `stream`, each with the partitions it serves
    /// (asked of the cluster: `CLUSTER KEYSLOT`, `CLUSTER NODES`); masters serving none
    /// are left out.
    async fn nodes(&self, stream: &str) -> anyhow::Result<Vec<compete::Node>> {
        let mut nodes: Vec<compete::Node> = self
            .masters
            .iter()
            .map(|(port, conn)| compete::Node {
                name: format!(":{port}"),
                conn: conn.clone(),
                partitions: Vec::new(),
            })
            .collect();
        for partition in compete::partitions(stream) {
            let port = self.cluster.master_of(&partition).await?;
            let index = self
                .masters
                .iter()
                .position(|(master, _)| *master == port)
                .with_context(|| format!("{partition} is on {port}, not a known master"))?;
            nodes[index].partitions.push(partition);
        }
        nodes.retain(|node| !node.partitions.is_empty());
        Ok(nodes)
    }

    /// Waits until every master's replica has what the master has now: after a fill, so
    /// that the replicas' catching up does not take CPU from the timed part.
    async fn replicated(&self) -> anyhow::Result<()> {
        for (port, _) in &self.masters {
            self.cluster.wait_for_replication(*port).await?;
        }
        Ok(())
    }

    /// Every node's command statistics, in the order of `nodes`.
    async fn command_stats(
        &self,
        nodes: &mut [compete::Node],
    ) -> anyhow::Result<Vec<CommandStats>> {
        let mut stats = Vec::with_capacity(nodes.len());
        for node in nodes {
            stats.push(raw::command_stats(&mut node.conn).await?);
        }
        Ok(stats)
    }

    /// Which master serves each partition (and slot) of this run's streams: the hash tag
    /// `{N}` of a partition decides its slot, so every stream of the run is laid out alike.
    async fn describe(&self, run_id: &str) -> anyhow::Result<String> {
        let ports: Vec<String> = self.masters.iter().map(|(p, _)| p.to_string()).collect();
        let mut out = format!(
            "cluster: {} masters (ports {}) with a replica each; seed {}\n",
            self.masters.len(),
            ports.join(", "),
            self.seed
        );
        let example = format!("slim-bus-bench:{run_id}:compete-cluster");
        for partition in compete::partitions(&example) {
            let slot = self.cluster.slot_of(&partition).await?;
            let port = self.cluster.master_of_slot(slot).await?;
            let _ = writeln!(out, "  {partition}: slot {slot}, master :{port}");
        }
        for node in self.nodes(&example).await? {
            let _ = writeln!(
                out,
                "  master {}: {} of {} partitions",
                node.name,
                node.partitions.len(),
                compete::PARTITIONS
            );
        }
        Ok(out)
    }
}

/// What the server did during the timed part of one case run.
#[derive(Debug, Clone)]
struct Traffic {
    case: Case,
    entries: u64,
    elapsed: Duration,
    commands: CommandStats,
}

/// Runs the timed part `fut`, reading the server's command statistics around it on a
/// connection of its own.
async fn observed<T>(
    stats_conn: &MultiplexedConnection,
    fut: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, CommandStats)> {
    let mut stats_conn = stats_conn.clone();
    let before = raw::command_stats(&mut stats_conn).await?;
    let output = fut.await?;
    let after = raw::command_stats(&mut stats_conn).await?;
    Ok((output, after.since(&before)))
}

/// Fills `stream` and creates the group, outside the timed part.
async fn fill(
    conn: &mut MultiplexedConnection,
    stream: &str,
    entries: u64,
    poison: bool,
) -> anyhow::Result<()> {
    raw::prefill(conn, stream, entries, poison).await?;
    raw::create_group(conn, stream).await
}

async fn expect_pending(
    conn: &mut MultiplexedConnection,
    stream: &str,
    expected: u64,
) -> anyhow::Result<()> {
    let pending = raw::pending_count(conn, stream).await?;
    if pending != expected {
        bail!("XPENDING counts {pending} pending entries, expected {expected}");
    }
    Ok(())
}

async fn expect_len(
    conn: &mut MultiplexedConnection,
    stream: &str,
    expected: u64,
) -> anyhow::Result<()> {
    let len = raw::stream_len(conn, stream).await?;
    if len != expected {
        bail!("the stream holds {len} entries, expected {expected}");
    }
    Ok(())
}

/// The settings of the `consume` case: a no-op handler, `max_concurrent` 64.
fn no_op() -> ConsumeSettings {
    ConsumeSettings {
        max_concurrent: 64,
        ..ConsumeSettings::default()
    }
}

/// Fills `stream`, consumes it with slim-bus and checks that every decodable entry was
/// handled once and acknowledged, and every poisoned one is left pending.
async fn consume_case(
    url: &str,
    conn: &mut MultiplexedConnection,
    stats: &MultiplexedConnection,
    stream: &str,
    entries: u64,
    poison: bool,
    settings: &ConsumeSettings,
) -> anyhow::Result<(Duration, CommandStats)> {
    fill(conn, stream, entries, poison).await?;
    let poisoned = if poison {
        raw::poisoned_count(entries)
    } else {
        0
    };
    let expected = entries - poisoned;
    let (run, commands) = observed(stats, bus::consume(url, stream, expected, settings)).await?;
    if run.handled != expected {
        bail!("handled {} entries, expected {expected}", run.handled);
    }
    if poison {
        // Depending on the slim-bus version an undecodable entry stays pending, or is moved
        // to the dead-letter stream; either way none may be lost or handled.
        let pending = raw::pending_count(conn, stream).await?;
        let dead = raw::stream_len(conn, &raw::dead_letter_stream(stream)).await?;
        if pending + dead != poisoned {
            bail!(
                "of {poisoned} undecodable entries {pending} are pending and {dead} dead-lettered"
            );
        }
        eprintln!("    poison: {dead} undecodable entries dead-lettered, {pending} left pending");
    } else {
        expect_pending(conn, stream, 0).await?;
    }
    Ok((run.elapsed, commands))
}

/// The latency of the hand-written loop (`latency-raw`) or of slim-bus (`latency`) under
/// the same paced publisher; slim-bus's rows are compared with the loop's of the same
/// repetition.
async fn latency_case(
    case: Case,
    url: &str,
    conn: &mut MultiplexedConnection,
    stats: &MultiplexedConnection,
    stream: &str,
    sizes: &Sizes,
) -> anyhow::Result<CaseRun> {
    raw::create_group(conn, stream).await?;
    let (rate, duration) = (sizes.latency_rate, sizes.latency_duration);
    let raw_loop = case == Case::LatencyRaw;
    let start = Instant::now();
    let (mut latencies, commands) = if raw_loop {
        observed(stats, raw::latency(url, stream, rate, duration)).await?
    } else {
        observed(stats, bus::latency(url, stream, rate, duration)).await?
    };
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    let what = if raw_loop {
        format!(
            "XADD to receipt, hand-written XREADGROUP COUNT {READ_COUNT} BLOCK loop, {}/s for {duration:?}",
            count(rate)
        )
    } else {
        format!("XADD to handler start, {}/s for {duration:?}", count(rate))
    };
    let mut rows = Vec::new();
    for (suffix, p, target, reference) in [
        ("p50", 50.0, Some(250.0), "latency-raw p50"),
        ("p99", 99.0, Some(1_500.0), "latency-raw p99"),
        ("p99.9", 99.9, None, "latency-raw p99.9"),
        ("max", 100.0, None, "latency-raw max"),
    ] {
        let Some(ns) = report::percentile(&latencies, p) else {
            bail!("no latency was recorded");
        };
        let mut row = Row::new(format!("{case} {suffix}"), what.clone(), Unit::Micros);
        if !raw_loop {
            row = row.vs(reference);
            if let Some(target) = target {
                row = row.target(Target::AtMost(target));
            }
        }
        rows.push(value(row, ns as f64 / 1_000.0));
    }
    let entries = latencies.len() as u64;
    Ok(CaseRun::new(rows).with_traffic(case, entries, elapsed, commands))
}

async fn memory_case(
    case: Case,
    url: &str,
    conn: &mut MultiplexedConnection,
    stats: &MultiplexedConnection,
    stream: &str,
    sizes: &Sizes,
) -> anyhow::Result<CaseRun> {
    let (kind, entries, id, reference, target) = match case {
        Case::RssRaw => (ChildKind::Raw, sizes.rss, "rss-raw", None, None),
        Case::Rss => (
            ChildKind::Consume,
            sizes.rss,
            "rss",
            Some("rss-raw"),
            Some(Target::AtMost(12.0)),
        ),
        _ => (
            ChildKind::Consume,
            sizes.rss_backlog,
            "rss-backlog",
            Some("rss"),
            Some(Target::RatioAtMost(1.1)),
        ),
    };
    fill(conn, stream, entries, false).await?;
    let (run, commands) = observed(stats, memory::run_in_child(kind, url, stream, entries)).await?;
    if run.handled != entries {
        bail!(
            "the child handled {} entries, expected {entries}",
            run.handled
        );
    }
    expect_pending(conn, stream, 0).await?;
    let who = if kind == ChildKind::Raw {
        "hand-written loop"
    } else {
        "slim-bus consume"
    };
    let mut rss = Row::new(
        id,
        format!(
            "peak RSS (VmHWM) of a child process: {who}, {} backlog",
            count(entries)
        ),
        Unit::MiB,
    );
    if let Some(reference) = reference {
        rss = rss.vs(reference);
    }
    if let Some(target) = target {
        rss = rss.target(target);
    }
    let mut rate_row = Row::new(
        format!("{id} rate"),
        format!(
            "throughput of that child: {who}, {} backlog",
            count(entries)
        ),
        Unit::EntriesPerSec,
    );
    if let Some(reference) = reference {
        rate_row = rate_row.vs(match reference {
            "rss-raw" => "rss-raw rate",
            _ => "rss rate",
        });
    }
    let elapsed = Duration::from_secs_f64(run.seconds);
    Ok(CaseRun::new(vec![
        value(rss, run.vm_hwm_kib as f64 / 1_024.0),
        throughput(rate_row, entries, elapsed),
    ])
    .with_traffic(case, entries, elapsed, commands))
}
