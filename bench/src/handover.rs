//! The cases of what a consumer holds: `handover` (a consumer that shuts down with handlers
//! longer than its grace and entries waiting for a retry, next to a live one) and
//! `long-handlers` (handlers longer than `claim_min_idle` next to a consumer that scans).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use slim_bus::{Context, EventBus, HandlerError, StartFrom, StreamHandler};
use tokio::sync::Notify;

use crate::bus::UserEvent;
use crate::raw::{GROUP, STEP, bounded};

/// How often the consumers of both cases scan for stale entries.
pub(crate) const CLAIM_INTERVAL: Duration = Duration::from_millis(250);
/// `handover`: long enough that without the hand-over the live consumer would wait it out.
pub(crate) const HANDOVER_CLAIM_MIN_IDLE: Duration = Duration::from_secs(30);
/// `handover`: the grace of the consumer that leaves, shorter than its handlers.
pub(crate) const HANDOVER_GRACE: Duration = Duration::from_millis(200);
/// `handover`: every this many entries, one waits for its retry when the consumer stops,
/// up to [`RETRIES`] of them.
pub(crate) const RETRY_EVERY: u64 = 16;
/// `handover`: how many entries wait for their retry. Fewer than the different entries
/// whose failures in a row pause reading a stream: the consumer must read every entry.
pub(crate) const RETRIES: u64 = 4;
/// The handler slots of each consumer of both cases: as many as the largest `holding` size,
/// since a handler that never ends keeps its slot and a consumer reads no more entries
/// than it has slots for.
pub(crate) const MAX_CONCURRENT: usize = 256;
/// `long-handlers`: the idle time after which an entry counts as stale.
pub(crate) const LONG_CLAIM_MIN_IDLE: Duration = Duration::from_secs(1);
/// `long-handlers`: each handler runs this many times `LONG_CLAIM_MIN_IDLE`.
pub(crate) const LONG_HANDLER_FACTOR: u32 = 3;

/// Every delivery seen, by `seq`: which consumers ran it, and with which delivery counts.
#[derive(Default)]
struct Ledger {
    runs: Mutex<HashMap<u64, Vec<(String, u64)>>>,
    /// Handler calls that ran to their end.
    finished: AtomicUsize,
    changed: Notify,
}

impl Ledger {
    fn record(&self, seq: u64, ctx: &Context) {
        self.runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(seq)
            .or_default()
            .push((ctx.consumer().to_owned(), ctx.delivery_count()));
        self.changed.notify_waiters();
    }

    fn finish(&self) {
        self.finished.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    fn count(&self, mut matching: impl FnMut(&[(String, u64)]) -> bool) -> usize {
        self.runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|runs| matching(runs))
            .count()
    }

    /// Waits until `done` holds of the ledger, or `limit` passes.
    async fn until(
        &self,
        what: &str,
        limit: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> anyhow::Result<()> {
        bounded(what, limit, async {
            loop {
                let changed = self.changed.notified();
                if done(self) {
                    return;
                }
                changed.await;
            }
        })
        .await
    }
}

/// What a handler of these cases does with an entry, after recording it.
#[derive(Clone, Copy)]
enum Work {
    /// Succeeds at once.
    Quick,
    /// Runs for this long, then succeeds.
    For(Duration),
    /// Every [`RETRY_EVERY`]th entry, [`RETRIES`] in all, asks for a retry long after the grace; the others
    /// never finish.
    Outlast,
}

struct Recording {
    ledger: Arc<Ledger>,
    work: Work,
}

#[slim_bus::async_trait]
impl StreamHandler for Recording {
    type Event = UserEvent;

    async fn handle(&self, event: UserEvent, ctx: Context) -> Result<(), HandlerError> {
        self.ledger.record(event.seq, &ctx);
        match self.work {
            Work::Quick => Ok(()),
            Work::For(duration) => {
                tokio::time::sleep(duration).await;
                self.ledger.finish();
                Ok(())
            }
            Work::Outlast
                if !event.seq.is_multiple_of(RETRY_EVERY) || event.seq / RETRY_EVERY >= RETRIES =>
            {
                std::future::pending().await
            }
            Work::Outlast => Err(HandlerError::retry_after(
                Duration::from_secs(600),
                std::io::Error::other("not now"),
            )),
        }
    }
}

fn consumer(
    url: &str,
    stream: &str,
    name: &str,
    claim_min_idle: Duration,
    ledger: &Arc<Ledger>,
    work: Work,
) -> slim_bus::EventBusBuilder {
    EventBus::builder()
        .url(url)
        .consumer_group(GROUP)
        .consumer_name(name)
        .start_from(StartFrom::Beginning)
        // Handlers that never end keep their slots: one for each entry the case holds.
        .max_concurrent(MAX_CONCURRENT)
        .claim_min_idle(claim_min_idle)
        .claim_interval(CLAIM_INTERVAL)
        .retry_backoff(Duration::from_millis(10), claim_min_idle / 2)
        .handler_timeout(Duration::from_secs(3600))
        .handler_on(
            stream,
            Recording {
                ledger: ledger.clone(),
                work,
            },
        )
}

async fn publish(url: &str, stream: &str, entries: u64) -> anyhow::Result<()> {
    let publisher = crate::bus::publisher(url).await?;
    for seq in 0..entries {
        bounded(
            "publish",
            STEP,
            publisher.publish_to(stream, &UserEvent::new(seq)),
        )
        .await??;
    }
    Ok(())
}

/// `handover`: how long after the leaving consumer's `shutdown()` the live one has handled
/// every entry the leaving one held.
pub(crate) async fn handover(url: &str, stream: &str, entries: u64) -> anyhow::Result<Duration> {
    let ledger = Arc::new(Ledger::default());
    let leaving = consumer(
        url,
        stream,
        "leaving",
        HANDOVER_CLAIM_MIN_IDLE,
        &ledger,
        Work::Outlast,
    )
    .shutdown_grace(HANDOVER_GRACE)
    .build();
    let leaving = bounded("building the leaving bus", STEP, leaving).await??;
    let leaving = bounded("listen", STEP, leaving.listen()).await??;
    publish(url, stream, entries).await?;
    let total = usize::try_from(entries).context("entries fit a usize")?;
    ledger
        .until("the leaving consumer to hold every entry", STEP, |ledger| {
            ledger.count(|runs| runs.iter().any(|(name, _)| name == "leaving")) == total
        })
        .await?;
    let staying = consumer(
        url,
        stream,
        "staying",
        HANDOVER_CLAIM_MIN_IDLE,
        &ledger,
        Work::Quick,
    )
    .build();
    let staying = bounded("building the staying bus", STEP, staying).await??;
    let staying = bounded("listen", STEP, staying.listen()).await??;
    let start = Instant::now();
    bounded("the leaving consumer's shutdown", STEP, leaving.shutdown())
        .await?
        .context("the leaving consumer stopped with an error")?;
    ledger
        .until(
            "the live consumer to handle what was handed over",
            STEP,
            |ledger| ledger.count(|runs| runs.iter().any(|(name, _)| name == "staying")) == total,
        )
        .await?;
    let took = start.elapsed();
    bounded("the live consumer's shutdown", STEP, staying.shutdown())
        .await?
        .context("the live consumer stopped with an error")?;
    Ok(took)
}

/// What `long-handlers` found.
pub(crate) struct LongHandlers {
    /// Entries whose handler ran more than once.
    pub(crate) run_twice: usize,
    /// Entries that Redis delivered more than once (a claim of a running handler).
    pub(crate) claimed: usize,
    pub(crate) elapsed: Duration,
}

/// `long-handlers`: two consumers of one group scanning every [`CLAIM_INTERVAL`], with
/// handlers running [`LONG_HANDLER_FACTOR`] times `claim_min_idle`.
pub(crate) async fn long_handlers(
    url: &str,
    stream: &str,
    entries: u64,
) -> anyhow::Result<LongHandlers> {
    let ledger = Arc::new(Ledger::default());
    let work = Work::For(LONG_CLAIM_MIN_IDLE * LONG_HANDLER_FACTOR);
    let mut listeners = Vec::new();
    for name in ["first", "second"] {
        let bus = consumer(url, stream, name, LONG_CLAIM_MIN_IDLE, &ledger, work).build();
        let bus = bounded("building a bus", STEP, bus).await??;
        listeners.push(bounded("listen", STEP, bus.listen()).await??);
    }
    let start = Instant::now();
    publish(url, stream, entries).await?;
    let total = usize::try_from(entries).context("entries fit a usize")?;
    // Both consumers scan all along: a claim of a running handler would start it again.
    ledger
        .until("every handler to end", STEP, |ledger| {
            ledger.finished.load(Ordering::Acquire) >= total
        })
        .await?;
    for listener in listeners {
        bounded("a listener's shutdown", STEP, listener.shutdown())
            .await?
            .context("a consumer stopped with an error")?;
    }
    let elapsed = start.elapsed();
    if elapsed < LONG_CLAIM_MIN_IDLE * LONG_HANDLER_FACTOR {
        bail!("the handlers ended after {elapsed:?}, before they could have run their time");
    }
    Ok(LongHandlers {
        run_twice: ledger.count(|runs| runs.len() > 1),
        claimed: ledger.count(|runs| runs.iter().any(|(_, count)| *count > 1)),
        elapsed,
    })
}
