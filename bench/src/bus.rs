//! The slim-bus side of the cases: events, handlers, and timed consume and publish runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use slim_bus::{Context, EventBus, HandlerError, StreamHandler};
use tokio::sync::Notify;

use crate::raw::{self, CONSUMER, GROUP, PUBLISH_PIPELINE, READ_COUNT, STEP, bounded};

/// The event of every case: the three flat fields the streams are filled with.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct UserEvent {
    pub(crate) user_id: String,
    pub(crate) user_name: String,
    pub(crate) seq: u64,
}

impl slim_bus::Event for UserEvent {
    // Every repetition uses a stream of its own, so handlers are registered with
    // `handler_on` and events published with `publish_to`.
    const STREAM: Option<&'static str> = None;
}

impl UserEvent {
    pub(crate) fn new(seq: u64) -> Self {
        UserEvent {
            user_id: raw::user_id(seq),
            user_name: raw::user_name(seq),
            seq,
        }
    }
}

/// Counts handled entries and wakes the waiting case when the expected number is reached.
struct Counter {
    handled: AtomicU64,
    expected: u64,
    done: Notify,
}

impl Counter {
    fn new(expected: u64) -> Arc<Self> {
        Arc::new(Counter {
            handled: AtomicU64::new(0),
            expected,
            done: Notify::new(),
        })
    }

    fn count(&self) {
        if self.handled.fetch_add(1, Ordering::AcqRel) + 1 == self.expected {
            // Stores a permit when nobody waits yet, so the wake cannot be missed.
            self.done.notify_one();
        }
    }

    fn handled(&self) -> u64 {
        self.handled.load(Ordering::Acquire)
    }
}

/// The typed handler of the consume cases: no-op, an I/O-bound service's wait, a
/// CPU-bound computation, or a failure on the first delivery of some entries.
struct Counting {
    counter: Arc<Counter>,
    io_wait: Option<Duration>,
    cpu_work: Option<Duration>,
    fail_once_every: Option<u64>,
}

#[slim_bus::async_trait]
impl StreamHandler for Counting {
    type Event = UserEvent;

    async fn handle(&self, event: UserEvent, ctx: Context) -> Result<(), HandlerError> {
        std::hint::black_box(&event);
        if let Some(every) = self.fail_once_every
            && event.seq.is_multiple_of(every)
            && ctx.delivery_count() == 1
        {
            return Err(HandlerError::new(std::io::Error::other("transient")));
        }
        if let Some(wait) = self.io_wait {
            tokio::time::sleep(wait).await;
        }
        if let Some(work) = self.cpu_work {
            compute_for(work);
        }
        self.counter.count();
        Ok(())
    }
}

/// Keeps the thread busy for `duration`, as a handler that parses or hashes would.
fn compute_for(duration: Duration) {
    let start = Instant::now();
    let mut x = 0u64;
    while start.elapsed() < duration {
        for _ in 0..64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

/// One timed consume run.
#[derive(Debug)]
pub(crate) struct ConsumeRun {
    /// From `listen` until the listener has shut down, acks flushed.
    pub(crate) elapsed: Duration,
    pub(crate) handled: u64,
}

/// Settings of a consume run.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConsumeSettings {
    pub(crate) max_concurrent: usize,
    pub(crate) io_wait: Option<Duration>,
    pub(crate) cpu_work: Option<Duration>,
    /// Entries whose `seq` is a multiple of this fail on their first delivery.
    pub(crate) fail_once_every: Option<u64>,
    /// Retry backoff (base, max), when not the default.
    pub(crate) retry_backoff: Option<(Duration, Duration)>,
    /// Run on a runtime of its own with this many workers, not the suite's.
    pub(crate) workers: Option<usize>,
    /// The level of the delivery spans, when not the default.
    pub(crate) span_level: Option<tracing::Level>,
    /// Put a pass-through layer (tower's `Identity`) around every handler call.
    pub(crate) layered: bool,
}

/// Consumes the backlog of `stream` (group [`GROUP`] already created) with slim-bus until
/// `expected` entries are handled, then shuts the listener down, which flushes the acks.
pub(crate) async fn consume(
    url: &str,
    stream: &str,
    expected: u64,
    settings: &ConsumeSettings,
) -> anyhow::Result<ConsumeRun> {
    let Some(workers) = settings.workers else {
        return consume_here(url, stream, expected, settings).await;
    };
    let (url, stream, settings) = (url.to_owned(), stream.to_owned(), settings.clone());
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .context("starting a runtime for the case")?;
        runtime.block_on(consume_here(&url, &stream, expected, &settings))
    })
    .await
    .context("the case's runtime panicked")?
}

/// [`consume`] on the current runtime.
async fn consume_here(
    url: &str,
    stream: &str,
    expected: u64,
    settings: &ConsumeSettings,
) -> anyhow::Result<ConsumeRun> {
    let counter = Counter::new(expected);
    let mut builder = builder(url)
        .consumer_group(GROUP)
        .consumer_name(CONSUMER)
        .max_count(READ_COUNT)
        .max_concurrent(settings.max_concurrent);
    if let Some((base, max)) = settings.retry_backoff {
        builder = builder.retry_backoff(base, max);
    }
    if let Some(level) = settings.span_level {
        builder = builder.span_level(level);
    }
    if settings.layered {
        builder = builder.layer(tower::layer::util::Identity::new());
    }
    let bus = builder
        .handler_on(
            stream,
            Counting {
                counter: counter.clone(),
                io_wait: settings.io_wait,
                cpu_work: settings.cpu_work,
                fail_once_every: settings.fail_once_every,
            },
        )
        .build();
    let bus = bounded("building the bus", STEP, bus).await??;

    let start = Instant::now();
    let listener = bounded("listen", STEP, bus.listen()).await??;
    // At least 2,000 entries/s, or the run counts as stuck.
    let limit = STEP + Duration::from_millis(expected / 2);
    if bounded("every entry handled", limit, counter.done.notified())
        .await
        .is_err()
    {
        bail!(
            "only {} of {expected} entries were handled after {limit:?}",
            counter.handled()
        );
    }
    bounded("the listener's shutdown", STEP, listener.shutdown())
        .await?
        .context("the listener stopped with an error")?;
    Ok(ConsumeRun {
        elapsed: start.elapsed(),
        handled: counter.handled(),
    })
}

/// A builder for `url`; for `rediss://`, trusting the suite's CA ([`raw::tls_ca`]).
fn builder(url: &str) -> slim_bus::EventBusBuilder {
    let builder = EventBus::builder().url(url);
    match raw::tls_ca().filter(|_| url.starts_with("rediss://")) {
        Some(ca) => builder.tls_ca_cert(ca),
        None => builder,
    }
}

/// A bus that only publishes.
pub(crate) async fn publisher(url: &str) -> anyhow::Result<EventBus> {
    Ok(bounded("building the bus", STEP, builder(url).build()).await??)
}

/// `entries` publishes to `stream`, each awaited before the next.
pub(crate) async fn publish_one_by_one(
    bus: &EventBus,
    stream: &str,
    entries: u64,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for seq in 0..entries {
        bounded(
            "publish",
            STEP,
            bus.publish_to(stream, &UserEvent::new(seq)),
        )
        .await??;
    }
    Ok(start.elapsed())
}

/// `entries` events published to `stream` with `publish_batch_to`, in batches as large
/// as the raw loop's pipelines, each awaited before the next.
pub(crate) async fn publish_in_batches(
    bus: &EventBus,
    stream: &str,
    entries: u64,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut next = 0;
    while next < entries {
        let end = (next + PUBLISH_PIPELINE).min(entries);
        let batch: Vec<UserEvent> = (next..end).map(UserEvent::new).collect();
        bounded(
            "publish a batch",
            STEP,
            bus.publish_batch_to(stream, &batch),
        )
        .await??;
        next = end;
    }
    Ok(start.elapsed())
}

/// `entries` publishes to `stream` from `tasks` concurrent tasks sharing one bus.
pub(crate) async fn publish_concurrently(
    bus: &EventBus,
    stream: &str,
    entries: u64,
    tasks: u64,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut running = Vec::new();
    for task in 0..tasks {
        let bus = bus.clone();
        let stream = stream.to_owned();
        running.push(tokio::spawn(async move {
            let mut seq = task;
            while seq < entries {
                bounded(
                    "publish",
                    STEP,
                    bus.publish_to(&stream, &UserEvent::new(seq)),
                )
                .await??;
                seq += tasks;
            }
            anyhow::Ok(())
        }));
    }
    for task in running {
        task.await.context("a publishing task panicked")??;
    }
    Ok(start.elapsed())
}

/// The latency case's event: a `UserEvent` stamped when it was sent.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StampedEvent {
    pub(crate) user_id: String,
    pub(crate) user_name: String,
    pub(crate) seq: u64,
    /// [`raw::now_ns`] taken just before the `XADD`.
    pub(crate) sent_at_ns: u64,
}

impl slim_bus::Event for StampedEvent {
    const STREAM: Option<&'static str> = None;
}

/// Records how long each entry took from `XADD` to the start of its handler.
struct Stopwatch {
    latencies_ns: Mutex<Vec<u64>>,
    counter: Arc<Counter>,
}

struct StopwatchHandler(Arc<Stopwatch>);

#[slim_bus::async_trait]
impl StreamHandler for StopwatchHandler {
    type Event = StampedEvent;

    async fn handle(&self, event: StampedEvent, _ctx: Context) -> Result<(), HandlerError> {
        let latency = raw::now_ns().saturating_sub(event.sent_at_ns);
        if let Ok(mut latencies) = self.0.latencies_ns.lock() {
            latencies.push(latency);
        }
        self.0.counter.count();
        Ok(())
    }
}

/// Runs [`raw::publish_paced`] into `stream` while slim-bus listens; returns every entry's
/// latency in nanoseconds, from just before its `XADD` to the start of its handler.
pub(crate) async fn latency(
    url: &str,
    stream: &str,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<Vec<u64>> {
    let total = raw::paced_total(rate, duration);
    let stopwatch = Arc::new(Stopwatch {
        latencies_ns: Mutex::new(Vec::with_capacity(total as usize)),
        counter: Counter::new(total),
    });
    let bus = builder(url)
        .consumer_group(GROUP)
        .consumer_name(CONSUMER)
        .max_count(READ_COUNT)
        .handler_on(stream, StopwatchHandler(stopwatch.clone()))
        .build();
    let bus = bounded("building the bus", STEP, bus).await??;
    let listener = bounded("listen", STEP, bus.listen()).await??;
    let mut conn = raw::connect(url).await?;
    raw::publish_paced(&mut conn, stream, rate, duration).await?;
    if bounded(
        "every entry handled",
        STEP,
        stopwatch.counter.done.notified(),
    )
    .await
    .is_err()
    {
        bail!(
            "only {} of {total} entries were handled",
            stopwatch.counter.handled()
        );
    }
    bounded("the listener's shutdown", STEP, listener.shutdown())
        .await?
        .context("the listener stopped with an error")?;
    let pending = raw::pending_count(&mut conn, stream).await?;
    if pending != 0 {
        bail!("{pending} entries are still pending after the latency run");
    }
    let latencies = match stopwatch.latencies_ns.lock() {
        Ok(mut latencies) => std::mem::take(&mut *latencies),
        Err(_) => bail!("a handler panicked while recording"),
    };
    Ok(latencies)
}
