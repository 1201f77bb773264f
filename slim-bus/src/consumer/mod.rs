//! The consumer: reads a group's streams, runs handlers under the concurrency limit and the
//! handler timeout, acknowledges what succeeded, and shuts down without losing work.

mod ack;
mod backoff;
mod dispatch;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, Delivery};
use crate::config::StartFrom;
use crate::error::{Error, Result};
use crate::event::EntryId;
use crate::handler::ErasedHandler;

use self::ack::Acker;
use self::backoff::Backoff;
use self::dispatch::Dispatcher;

/// A stream the consumer reads, with its handler.
pub(crate) struct Route {
    pub(crate) stream: Arc<str>,
    pub(crate) handler: Arc<dyn ErasedHandler>,
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
}

impl Consumer {
    /// Creates the consumer group on every stream; an existing group is fine.
    pub(crate) async fn prepare(&self) -> Result<()> {
        for route in self.routes.iter() {
            self.broker
                .ensure_group(&route.stream, &self.group, self.start_from)
                .await?;
        }
        Ok(())
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
        let dispatcher = Dispatcher {
            routes: self.routes.clone(),
            group: self.group.clone(),
            consumer: self.consumer.clone(),
            handler_timeout: self.handler_timeout,
            acks,
            tasks: tasks.clone(),
            abandon: abandon.clone(),
        };
        let reader = Reader {
            consumer: &self,
            streams,
            slots: Arc::new(Semaphore::new(self.max_concurrent)),
            dispatcher,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            rotation: 0,
        };
        let outcome = tokio::select! {
            outcome = reader.run() => outcome,
            () = shutdown.cancelled() => Ok(()),
        };
        // The reader, and with it the dispatcher's ack sender, is dropped by now; handler
        // tasks hold the remaining senders.
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
            tasks.wait().await;
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

struct Reader<'a> {
    consumer: &'a Consumer,
    streams: Arc<[Arc<str>]>,
    slots: Arc<Semaphore>,
    dispatcher: Dispatcher,
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
        loop {
            let mut slots = self.reserve_slots(c.max_count).await;
            let count = slots.num_permits();
            match c
                .broker
                .read_own_pending(&stream, &c.group, &c.consumer, after, count)
                .await
            {
                Ok(deliveries) => {
                    self.backoff.reset();
                    let Some(last) = deliveries.last() else {
                        break;
                    };
                    after = last.id;
                    recovered += deliveries.len();
                    self.dispatch(stream_index, deliveries, &mut slots);
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

    async fn read_new(&mut self) -> Result<()> {
        let c = self.consumer;
        let mut slots = self
            .reserve_slots(c.max_count.saturating_mul(self.streams.len()))
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
        let window: Vec<Arc<str>> = (0..taken)
            .map(|i| self.streams[(first + i) % self.streams.len()].clone())
            .collect();
        match c
            .broker
            .read_new(&c.group, &c.consumer, &window, count, c.block_time)
            .await
        {
            Ok(batches) => {
                self.backoff.reset();
                for batch in batches {
                    let stream_index = (first + batch.stream_index) % self.streams.len();
                    self.dispatch(stream_index, batch.deliveries, &mut slots);
                }
                Ok(())
            }
            Err(error) => self.heal(error).await.map(drop),
        }
    }

    /// Waits for one free slot, then takes up to `wanted` of those free right now.
    async fn reserve_slots(&self, wanted: usize) -> OwnedSemaphorePermit {
        let Ok(mut slots) = self.slots.clone().acquire_owned().await else {
            unreachable!("the semaphore is never closed")
        };
        let more = wanted.saturating_sub(1).min(self.slots.available_permits());
        if more > 0
            && let Ok(extra) = self.slots.clone().try_acquire_many_owned(more as u32)
        {
            slots.merge(extra);
        }
        slots
    }

    fn dispatch(
        &mut self,
        stream_index: usize,
        deliveries: Vec<Delivery>,
        slots: &mut OwnedSemaphorePermit,
    ) {
        for delivery in deliveries {
            // A well-behaved server returns at most COUNT entries per stream, so a slot
            // is always there; if not, the entry waits for one rather than exceed the limit.
            let slot = slots.split(1);
            self.dispatcher
                .spawn(stream_index, delivery, slot, self.slots.clone());
        }
    }

    /// Deals with a failed read: recreates a vanished group, waits out a transient error
    /// with backoff, or gives up on an error that cannot heal.
    async fn heal(&mut self, error: Error) -> Result<Healed> {
        let c = self.consumer;
        match &error {
            Error::WrongType { .. } => return Err(error),
            Error::Redis { source, .. } if source.code() == Some("NOGROUP") => {
                tracing::warn!(group = %c.group, %error, "consumer group or stream is gone; creating it again");
                match c.prepare().await {
                    Ok(()) => return Ok(Healed::GroupRecreated),
                    Err(error @ Error::WrongType { .. }) => return Err(error),
                    Err(error) => tracing::warn!(%error, "recreating the consumer group failed"),
                }
            }
            _ => {}
        }
        let delay = self.backoff.next_delay();
        // One line per backoff step: a lasting outage logs at a bounded rate.
        tracing::warn!(%error, attempt = self.backoff.attempts(), retry_in = ?delay, "reading from redis failed");
        tokio::time::sleep(delay).await;
        Ok(Healed::Retry)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Healed {
    Retry,
    GroupRecreated,
}
