//! The consumer: reads a group's streams, runs handlers under the concurrency limit and the
//! handler timeout, acknowledges what succeeded, retries and dead-letters what failed,
//! claims what dead consumers left, and shuts down without losing work.

mod ack;
mod backoff;
mod dispatch;
mod retry;
mod sweep;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, Delivery};
use crate::config::StartFrom;
use crate::error::{Error, Result};
use crate::event::EntryId;
use crate::handler::ErasedHandler;
use crate::health::{LastRead, SetAside};
use crate::publisher::Publisher;

use self::ack::Acker;
pub(crate) use self::backoff::Backoff;
use self::dispatch::{DeliveryEnv, Dispatcher, Job};
use self::retry::RetryQueue;

/// How long shutdown waits for abandoned handlers to stop.
const ABANDON_WAIT: Duration = Duration::from_secs(1);

/// How many times a read of new entries lets running handlers finish before it goes out
/// with fewer slots than half the limit.
const BATCH_YIELDS: usize = 4;

/// The longest the reader waits, after a read that drained its streams, for the handlers
/// it dispatched to start before it reads again (see [`let_handlers_start`]).
const HANDLER_START_WAIT: Duration = Duration::from_millis(1);

/// A stream the consumer reads, with its handler and failure settings.
pub(crate) struct Route {
    pub(crate) stream: Arc<str>,
    pub(crate) handler: Arc<dyn ErasedHandler>,
    pub(crate) dead_letters: Arc<str>,
    pub(crate) max_deliveries: u64,
    /// The handler's own timeout, when it is not the bus's.
    pub(crate) handler_timeout: Option<Duration>,
}

/// Everything one listening run needs.
pub(crate) struct Consumer {
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) group: Arc<str>,
    pub(crate) consumer: Arc<str>,
    pub(crate) routes: Arc<[Route]>,
    pub(crate) max_count: usize,
    pub(crate) max_concurrent: usize,
    pub(crate) handler_timeout: Duration,
    pub(crate) block_time: Duration,
    pub(crate) shutdown_grace: Duration,
    pub(crate) command_timeout: Duration,
    pub(crate) start_from: StartFrom,
    pub(crate) claim_min_idle: Duration,
    pub(crate) claim_interval: Duration,
    /// Other consumers of the group idle this long, holding nothing, are removed.
    pub(crate) consumer_idle_removal: Duration,
    pub(crate) retry_base: Duration,
    pub(crate) retry_max: Duration,
    pub(crate) dead_letter_max_len: usize,
    pub(crate) last_read: Arc<LastRead>,
    /// The streams not consumed because their key holds another Redis type.
    pub(crate) set_aside: Arc<SetAside>,
    /// What handlers publish through (`Context::publisher`).
    pub(crate) publisher: Publisher,
}

impl Consumer {
    /// Creates the consumer group on every stream; an existing group is fine. A stream
    /// whose key holds another type is set aside, and the others go on; only when every
    /// stream is set aside is that an error.
    pub(crate) async fn prepare(&self) -> Result<()> {
        let mut wrong_type = None;
        for (index, route) in self.routes.iter().enumerate() {
            match self
                .broker
                .ensure_group(&route.stream, &self.group, self.start_from)
                .await
            {
                Ok(()) => {
                    if self.set_aside.clear(index) {
                        tracing::info!(stream = %route.stream, "the stream's key is a stream again; consuming it");
                    }
                }
                Err(error @ Error::WrongType { .. }) => {
                    self.set_stream_aside(index, &error);
                    wrong_type.get_or_insert(error);
                }
                Err(error) => return Err(error),
            }
        }
        match wrong_type {
            Some(error) if self.set_aside.all() => Err(error),
            _ => Ok(()),
        }
    }

    /// Stops consuming stream `index`, whose key holds another type, logging it once.
    fn set_stream_aside(&self, index: usize, error: &Error) {
        if self.set_aside.set(index, error.to_string()) {
            tracing::error!(
                stream = %self.routes[index].stream,
                error = error as &dyn std::error::Error,
                "not consuming this stream until its key is a stream again; the other streams go on"
            );
        }
    }

    /// Runs until `shutdown` is cancelled or an error that cannot heal, then shuts down
    /// gracefully: no new reads, running handlers get the grace period, acks are flushed.
    pub(crate) async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let streams: Arc<[Arc<str>]> = self.routes.iter().map(|r| r.stream.clone()).collect();
        let (acker, acks) = Acker::new(self.broker.clone(), self.group.clone(), &streams);
        let acker = tokio::spawn(acker.run(self.command_timeout));
        let tasks = TaskTracker::new();
        // Cancelled when the grace period is over: handlers still running are abandoned.
        let abandon = CancellationToken::new();
        let (retry_sender, retry_requests) = mpsc::unbounded_channel();
        let dispatcher = Dispatcher {
            shared: Arc::new(DeliveryEnv {
                broker: self.broker.clone(),
                routes: self.routes.clone(),
                group: self.group.clone(),
                consumer: self.consumer.clone(),
                handler_timeout: self.handler_timeout,
                retry_base: self.retry_base,
                retry_max: self.retry_max,
                dead_letter_max_len: self.dead_letter_max_len,
                acks,
                retries: retry_sender,
                publisher: self.publisher.clone(),
            }),
            tasks: tasks.clone(),
            abandon: abandon.clone(),
        };
        let reader = Reader {
            consumer: &self,
            slots: Arc::new(Semaphore::new(self.max_concurrent)),
            claims: ClaimScan {
                next_at: Instant::now() + self.claim_interval,
                stream_index: 0,
                cursor: EntryId::MIN,
            },
            retries: RetryQueue::new(retry_requests),
            streams,
            dispatcher,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            rotation: 0,
        };
        let outcome = tokio::select! {
            outcome = reader.run() => outcome,
            () = shutdown.cancelled() => Ok(()),
        };
        // The reader, and with it the dispatcher's ack sender, is dropped by now; handler
        // tasks hold the remaining senders. Entries waiting for a retry stay pending.
        tracing::info!(group = %self.group, consumer = %self.consumer, running = tasks.len(), "shutting down");
        tasks.close();
        if tokio::time::timeout(self.shutdown_grace, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = tasks.len(),
                grace = ?self.shutdown_grace,
                "grace period over: abandoning running handlers, their entries stay pending"
            );
            abandon.cancel();
            // Abandoned handlers stop at their next await; one that blocks its thread
            // cannot be stopped, and must not hold up the shutdown for ever.
            if tokio::time::timeout(ABANDON_WAIT, tasks.wait())
                .await
                .is_err()
            {
                tracing::error!(
                    running = tasks.len(),
                    "handlers did not stop when abandoned (blocking their thread?); shutting down without them"
                );
            }
        }
        // Every ack sender is gone, so the acker flushes what it has and stops.
        if tokio::time::timeout(self.command_timeout * 3, acker)
            .await
            .is_err()
        {
            tracing::error!(
                "acknowledgements were not flushed in time; their entries will be delivered again"
            );
        }
        tracing::info!(group = %self.group, consumer = %self.consumer, "stopped");
        outcome
    }
}

/// Where the scan for entries of dead consumers stands. It goes through the pending list
/// of one stream after the other, a page per turn of the read loop so that a long list
/// does not hold up new entries, and keeps its cursor until a whole pass is done.
struct ClaimScan {
    next_at: Instant,
    stream_index: usize,
    cursor: EntryId,
}

/// The read loop. It alone takes handler slots for new work (new entries, own pending
/// entries, claims, retries), so that nothing is fetched that could not start at once.
struct Reader<'a> {
    consumer: &'a Consumer,
    streams: Arc<[Arc<str>]>,
    slots: Arc<Semaphore>,
    dispatcher: Dispatcher,
    retries: RetryQueue,
    claims: ClaimScan,
    backoff: Backoff,
    /// Where the next read starts when there are fewer free slots than streams.
    rotation: usize,
}

impl Reader<'_> {
    async fn run(mut self) -> Result<()> {
        for stream_index in 0..self.streams.len() {
            self.recover_own_pending(stream_index).await?;
        }
        loop {
            self.retries.collect();
            self.run_due_retries().await?;
            self.claim_if_due().await?;
            self.read_new().await?;
        }
    }

    /// Delivers again what this consumer held when it last stopped: entries it read but
    /// never acknowledged. They come before new entries.
    async fn recover_own_pending(&mut self, stream_index: usize) -> Result<()> {
        let c = self.consumer;
        let stream = self.streams[stream_index].clone();
        let mut after = EntryId::MIN;
        let mut recovered = 0usize;
        while !c.set_aside.is_set(stream_index) {
            let mut slots = self.reserve_slots(c.max_count).await;
            let count = slots.num_permits();
            match c
                .broker
                .read_own_pending(&stream, &c.group, &c.consumer, after, count)
                .await
            {
                Ok(deliveries) => {
                    self.backoff.reset();
                    // A liveness probe must see a long recovery make progress.
                    c.last_read.record();
                    let Some(last) = deliveries.last() else {
                        break;
                    };
                    after = last.id;
                    recovered += deliveries.len();
                    self.dispatch(stream_index, deliveries, &mut slots).await;
                }
                Err(error) => {
                    if self.heal(error).await? == Healed::GroupRecreated {
                        // A new group has no pending entries.
                        break;
                    }
                }
            }
        }
        if recovered > 0 {
            tracing::info!(stream = %stream, recovered, "delivered this consumer's pending entries again");
        }
        Ok(())
    }

    /// Claims the entries whose retry is due back to this consumer and runs them again.
    async fn run_due_retries(&mut self) -> Result<()> {
        if self
            .retries
            .next_due()
            .is_none_or(|due| due > Instant::now())
        {
            return Ok(());
        }
        // Runs on every turn of the read loop, so it only peeks at the earliest request;
        // what does not fit in the slots reserved here waits for the next turn.
        let mut slots = self
            .reserve_slots(self.retries.len().min(self.consumer.max_count))
            .await;
        let taken = self.retries.pop_due(Instant::now(), slots.num_permits());
        if taken.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let requests: Vec<_> = taken
            .iter()
            .map(|r| {
                (
                    self.streams[r.stream_index].clone(),
                    r.id,
                    // Claiming with the time since this consumer got the entry as the
                    // least idle time only succeeds if nobody has claimed it since.
                    now.saturating_duration_since(r.delivered_at),
                )
            })
            .collect();
        let c = self.consumer;
        match c
            .broker
            .claim_for_retry(&c.group, &c.consumer, &requests)
            .await
        {
            Ok(claimed) => {
                self.backoff.reset();
                for (request, fields) in taken.into_iter().zip(claimed) {
                    match fields {
                        Some(fields) => {
                            let delivery = Delivery {
                                id: request.id,
                                fields: Some(fields),
                                delivery_count: request.delivery_count + 1,
                                delivered_at: Instant::now(),
                            };
                            self.dispatch(request.stream_index, vec![delivery], &mut slots)
                                .await;
                        }
                        None => tracing::debug!(
                            stream = %self.streams[request.stream_index],
                            entry_id = %request.id,
                            "entry due for retry was claimed by another consumer or deleted; leaving it"
                        ),
                    }
                }
                Ok(())
            }
            Err(error) => {
                drop(slots);
                for mut request in taken {
                    request.due = Instant::now();
                    self.retries.push(request);
                }
                self.heal(error).await.map(drop)
            }
        }
    }

    /// Claims a page of entries that other consumers have held for longer than
    /// `claim_min_idle`, when a scan is due.
    async fn claim_if_due(&mut self) -> Result<()> {
        if Instant::now() < self.claims.next_at {
            return Ok(());
        }
        let c = self.consumer;
        let stream_index = self.claims.stream_index;
        let stream = self.streams[stream_index].clone();
        if c.set_aside.is_set(stream_index) {
            // Its turn in the scan is when a set-aside stream is looked at again: once its
            // key is a stream again (deleted, or renamed away), the group is created there
            // and it is consumed.
            let route = &c.routes[stream_index];
            match c.broker.ensure_group(&stream, &c.group, c.start_from).await {
                Ok(()) => {
                    c.set_aside.clear(stream_index);
                    tracing::info!(stream = %route.stream, "the stream's key is a stream again; consuming it");
                }
                Err(Error::WrongType { .. }) => {}
                Err(error) => {
                    tracing::debug!(stream = %stream, error = &error as &dyn std::error::Error, "checking a set-aside stream again failed")
                }
            }
            self.claims.cursor = EntryId::MIN;
            self.claims.stream_index = (stream_index + 1) % self.streams.len();
            if self.claims.stream_index == 0 {
                self.claims.next_at = Instant::now() + c.claim_interval;
            }
            return Ok(());
        }
        let mut slots = self.reserve_slots(c.max_count).await;
        let count = slots.num_permits();
        match c
            .broker
            .claim_stale(
                &stream,
                &c.group,
                &c.consumer,
                c.claim_min_idle,
                self.claims.cursor,
                count,
            )
            .await
        {
            Ok(page) => {
                self.backoff.reset();
                if !page.deleted.is_empty() {
                    tracing::warn!(
                        stream = %stream,
                        entry_ids = ?page.deleted,
                        "pending entries were deleted from the stream; dropped them from the pending list"
                    );
                }
                if !page.deliveries.is_empty() {
                    tracing::info!(stream = %stream, claimed = page.deliveries.len(), "claimed entries from stopped consumers");
                }
                self.dispatch(stream_index, page.deliveries, &mut slots)
                    .await;
                self.claims.cursor = page.next_cursor;
                if page.next_cursor == EntryId::MIN {
                    // A claim pass over the stream is done: what is left of stopped
                    // consumers now is their names.
                    sweep::remove_idle_consumers(
                        &*c.broker,
                        &stream,
                        &c.group,
                        &c.consumer,
                        c.consumer_idle_removal,
                    )
                    .await;
                    self.claims.stream_index = (stream_index + 1) % self.streams.len();
                    if self.claims.stream_index == 0 {
                        self.claims.next_at = Instant::now() + c.claim_interval;
                    }
                }
                Ok(())
            }
            Err(error) => {
                drop(slots);
                // Try again at the next interval, not on every turn of the loop.
                self.claims.next_at = Instant::now() + c.claim_interval;
                self.heal(error).await.map(drop)
            }
        }
    }

    async fn read_new(&mut self) -> Result<()> {
        let c = self.consumer;
        let mut slots = self
            .reserve_batch(c.max_count.saturating_mul(self.streams.len()))
            .await;
        // COUNT applies to each stream of a read, so a read may return up to COUNT times
        // the number of streams: it asks no stream for more than its share of the free
        // slots, so nothing is read that could not start at once.
        let free = slots.num_permits();
        let (first, taken, count) = if free >= self.streams.len() {
            (
                0,
                self.streams.len(),
                (free / self.streams.len()).min(c.max_count),
            )
        } else {
            self.rotation = (self.rotation + free) % self.streams.len();
            (self.rotation, free, 1)
        };
        let window: Vec<usize> = (0..taken)
            .map(|i| (first + i) % self.streams.len())
            .filter(|&index| !c.set_aside.is_set(index))
            .collect();
        let window_streams: Vec<Arc<str>> = window
            .iter()
            .map(|&index| self.streams[index].clone())
            .collect();
        if window.is_empty() {
            // Every stream of this window is set aside; the next turn reads another.
            return Ok(());
        }
        // Wake up in time for the next retry or claim scan: they need the slots this read
        // holds.
        let now = Instant::now();
        let mut wake_at = self.claims.next_at;
        if let Some(due) = self.retries.next_due() {
            wake_at = wake_at.min(due);
        }
        // Redis checks block timeouts on its own clock (about every 100 ms at the default
        // `hz`), so a very short block can last far longer than asked: when something is
        // due already, read without blocking instead.
        let until_wake = wake_at.saturating_duration_since(now);
        // Less than a millisecond to go is slept off rather than spun away in reads: a paused
        // tokio clock (tests on the in-memory backend) only advances when nothing spins.
        if !until_wake.is_zero() && until_wake < Duration::from_millis(1) {
            tokio::time::sleep(until_wake).await;
        }
        let block = (until_wake >= Duration::from_millis(1)).then(|| c.block_time.min(until_wake));
        match c
            .broker
            .read_new(&c.group, &c.consumer, &window_streams, count, block)
            .await
        {
            Ok(batches) => {
                self.backoff.reset();
                c.last_read.record();
                // Fewer entries than asked for: the streams are drained, so the next read
                // will only wait for new entries.
                let drained = batches.iter().all(|b| b.deliveries.len() < count);
                let mut dispatched = false;
                for batch in batches {
                    dispatched |= !batch.deliveries.is_empty();
                    let stream_index = window[batch.stream_index];
                    self.dispatch(stream_index, batch.deliveries, &mut slots)
                        .await;
                }
                if drained && dispatched {
                    // Slots left over are not needed while waiting.
                    drop(slots);
                    let_handlers_start().await;
                }
                Ok(())
            }
            Err(error) => {
                drop(slots);
                self.heal(error).await.map(drop)
            }
        }
    }

    /// Reserves slots for a read of new entries: like [`reserve_slots`](Self::reserve_slots),
    /// but when only a few slots are free while handlers run, it lets them finish for a
    /// moment first, so that a busy bus reads in batches instead of one entry per freed
    /// slot. Measured with the no-op handler of the benchmark, reading as soon as one slot
    /// was free made reads a third of the size they could be and cost 3x the round trips.
    async fn reserve_batch(&self, wanted: usize) -> OwnedSemaphorePermit {
        let target = wanted.min((self.consumer.max_concurrent / 2).max(1));
        let mut slots = self.reserve_slots(wanted).await;
        for _ in 0..BATCH_YIELDS {
            if slots.num_permits() >= target {
                break;
            }
            tokio::task::yield_now().await;
            self.take_free(&mut slots, wanted);
        }
        slots
    }

    /// Adds the slots free right now to `slots`, up to `wanted` in all.
    fn take_free(&self, slots: &mut OwnedSemaphorePermit, wanted: usize) {
        let more = wanted
            .saturating_sub(slots.num_permits())
            .min(self.slots.available_permits());
        if more > 0
            && let Ok(extra) = self
                .slots
                .clone()
                .try_acquire_many_owned(u32::try_from(more).unwrap_or(u32::MAX))
        {
            slots.merge(extra);
        }
    }

    /// Waits for one free slot, then takes up to `wanted` of those free right now.
    async fn reserve_slots(&self, wanted: usize) -> OwnedSemaphorePermit {
        let Ok(mut slots) = self.slots.clone().acquire_owned().await else {
            unreachable!("the semaphore is never closed")
        };
        self.take_free(&mut slots, wanted);
        slots
    }

    /// Starts handling `deliveries`, each with one of `slots`. A well-behaved server
    /// returns no more entries than were asked for, so a slot is always there; if not,
    /// the rest wait here for free slots rather than exceed the limit.
    async fn dispatch(
        &mut self,
        stream_index: usize,
        deliveries: Vec<Delivery>,
        slots: &mut OwnedSemaphorePermit,
    ) {
        let mut jobs = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let slot = match slots.split(1) {
                Some(slot) => slot,
                None => {
                    self.dispatcher.spawn(std::mem::take(&mut jobs));
                    self.reserve_slots(1).await
                }
            };
            jobs.push(Job {
                stream_index,
                delivery,
                slot,
            });
        }
        self.dispatcher.spawn(jobs);
    }

    /// Deals with a failed command: recreates a vanished group, waits out a transient
    /// error with backoff, or gives up on an error that cannot heal.
    async fn heal(&mut self, error: Error) -> Result<Healed> {
        let c = self.consumer;
        match &error {
            Error::WrongType { stream, .. } => {
                let Some(index) = self.streams.iter().position(|s| **s == **stream) else {
                    return Err(error);
                };
                c.set_stream_aside(index, &error);
                if c.set_aside.all() {
                    return Err(error);
                }
                return Ok(Healed::Retry);
            }
            Error::Redis { source, .. } if is_refused_access(source) => return Err(error),
            Error::Redis { .. } if error.server_code().as_deref() == Some("NOGROUP") => {
                let streams: Vec<&str> = self.streams.iter().map(|s| &**s).collect();
                tracing::warn!(
                    group = %c.group,
                    ?streams,
                    error = &error as &dyn std::error::Error,
                    "consumer group or stream is gone (deleted, flushed, or Redis restarted without persistence); creating the group again on every stream"
                );
                match c.prepare().await {
                    Ok(()) => return Ok(Healed::GroupRecreated),
                    Err(error @ Error::WrongType { .. }) => return Err(error),
                    Err(error) => tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        "recreating the consumer group failed"
                    ),
                }
            }
            _ => {}
        }
        let delay = self.backoff.next_delay();
        // One line per backoff step: a lasting outage logs at a bounded rate.
        tracing::warn!(error = &error as &dyn std::error::Error, attempt = self.backoff.attempts(), retry_in = ?delay, "redis command failed");
        tokio::time::sleep(delay).await;
        Ok(Healed::Retry)
    }
}

/// Lets the handlers just dispatched start before the reader sends its next read.
///
/// Otherwise the spawned batch waits on this worker until the reader has written its next
/// `XREADGROUP`: in the `latency` benchmark (1k entries/s, one per read) that put 21-33 µs
/// at p50 and 106-118 µs at p99 between dispatch and the batch's first poll; with this,
/// 4 µs and 42-44 µs. Done only when the streams are drained, where the next read would
/// just block. A yielded task resumes when this worker runs out of ready tasks, so a
/// handler that computes for long before its first await would hold the reader as long:
/// the timer bounds that, and fires on another worker while this one is busy.
async fn let_handlers_start() {
    tokio::select! {
        biased;
        () = tokio::task::yield_now() => {}
        () = tokio::time::sleep(HANDLER_START_WAIT) => {}
    }
}

/// Errors that waiting cannot heal: the server refuses these credentials or commands.
fn is_refused_access(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(
            crate::error::server_code(error).as_deref(),
            Some("NOAUTH" | "WRONGPASS" | "NOPERM")
        )
}

#[derive(Debug, PartialEq, Eq)]
enum Healed {
    Retry,
    GroupRecreated,
}
