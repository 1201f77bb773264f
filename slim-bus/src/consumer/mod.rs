//! The consumer: reads a group's streams, runs handlers under the concurrency limit and the
//! handler timeout, acknowledges what succeeded, retries and dead-letters what failed,
//! claims what dead consumers left, keeps what it holds fresh, and shuts down without
//! losing work, handing over what it will not finish.

mod ack;
mod backoff;
mod batch;
mod dispatch;
mod in_flight;
mod keep_fresh;
mod read_window;
mod reader;
mod retention;
mod retry;
mod retry_due;
mod stream_state;
mod sweep;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::config::StartFrom;
use crate::error::{Error, Result};
use crate::event::EntryId;
use crate::handler::RegisteredHandler;
use crate::health::{LastRead, SetAside};
use crate::publisher::Publisher;
use crate::telemetry::StreamMetrics;

use self::ack::Acker;
pub(crate) use self::backoff::Backoff;
use self::dispatch::{DeliveryEnv, Dispatcher};
use self::keep_fresh::{Freshness, HeldIds};
use self::reader::Reader;
pub(crate) use self::reader::is_refused_access;
use self::retry::BlockedRead;
use self::retry_due::RetryDues;
pub(crate) use self::stream_state::StreamState;

/// How long shutdown waits for abandoned handlers to stop.
const ABANDON_WAIT: Duration = Duration::from_secs(1);

/// A stream the consumer reads, with its handler and failure settings.
pub(crate) struct Route {
    /// The Redis stream read: a stream, or one partition of a partitioned stream.
    pub(crate) stream: Arc<str>,
    /// Which partition `stream` is, when it is one.
    pub(crate) partition: Option<u32>,
    pub(crate) handler: RegisteredHandler,
    pub(crate) dead_letters: Arc<str>,
    pub(crate) max_deliveries: u64,
    /// The handler's own timeout, when it is not the bus's.
    pub(crate) handler_timeout: Option<Duration>,
    /// What the consumer knows of the stream right now; `health()` reads it.
    pub(crate) state: Arc<StreamState>,
}

/// Everything one listening run needs.
pub(crate) struct Consumer {
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) group: Arc<str>,
    pub(crate) consumer: Arc<str>,
    pub(crate) routes: Arc<[Route]>,
    pub(crate) max_count: usize,
    pub(crate) max_concurrent: usize,
    pub(crate) max_in_flight: usize,
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
    pub(crate) dead_letter_max_len: Option<usize>,
    pub(crate) last_read: Arc<LastRead>,
    /// The streams not consumed because their key holds another Redis type.
    pub(crate) set_aside: Arc<SetAside>,
    /// What handlers publish through (`Context::publisher`).
    pub(crate) publisher: Publisher,
    /// The streams trimmed of what every group acknowledged, every `trim_acked_interval`.
    pub(crate) trim_acked: Arc<[Arc<str>]>,
    pub(crate) trim_acked_interval: Duration,
    /// The level of each delivery's span.
    pub(crate) span_level: tracing::Level,
}

impl Consumer {
    /// Creates the consumer group on every stream; an existing group is fine. A stream
    /// whose key holds another type is set aside, and the others go on; only when every
    /// stream is set aside is that an error.
    pub(crate) async fn prepare(&self) -> Result<()> {
        let mut wrong_type = None;
        for (index, route) in self.routes.iter().enumerate() {
            let ready = self
                .broker
                .ensure_group(&route.stream, &self.group, self.start_from)
                .await;
            self.group_ready(index, ready, &mut wrong_type)?;
        }
        self.unless_all_set_aside(wrong_type)
    }

    /// Creates again the groups that are gone (deleted, flushed, lost in a restart without
    /// persistence): on each stream, just after `delivered_up_to[index]`, the last entry
    /// this consumer knows was delivered to it there, so that nothing published since is
    /// skipped and nothing handled is handled again; at `start_from` where it knows none.
    /// The entries consumers held, in the lost pending list only, are put back there by
    /// their holders (see `touch_own.lua` and `claim_own.lua`).
    pub(crate) async fn recreate_groups(&self, delivered_up_to: &[Option<EntryId>]) -> Result<()> {
        let mut wrong_type = None;
        for (index, route) in self.routes.iter().enumerate() {
            let after = delivered_up_to.get(index).copied().flatten();
            let created = self
                .broker
                .recreate_group(&route.stream, &self.group, after, self.start_from)
                .await;
            if let Ok(true) = created {
                match after {
                    Some(after) => {
                        tracing::warn!(stream = %route.stream, group = %self.group, after = %after, "consumer group was gone; created it again just after the last entry delivered to this consumer")
                    }
                    None => {
                        tracing::warn!(stream = %route.stream, group = %self.group, start_from = ?self.start_from, "consumer group was gone and no entry of the stream was delivered to this consumer; created it again at start_from")
                    }
                }
            }
            self.group_ready(index, created.map(drop), &mut wrong_type)?;
        }
        self.unless_all_set_aside(wrong_type)
    }

    /// Takes in how making the group of stream `index` ready went: a stream whose key is a
    /// stream again is consumed again; one whose key holds another type is set aside (the
    /// first such error kept in `wrong_type`) and the others go on; any other error ends it.
    fn group_ready(
        &self,
        index: usize,
        ready: Result<()>,
        wrong_type: &mut Option<Error>,
    ) -> Result<()> {
        match ready {
            Ok(()) => {
                if self.set_aside.clear(index) {
                    tracing::info!(stream = %self.routes[index].stream, "the stream's key is a stream again; consuming it");
                }
                Ok(())
            }
            Err(error @ Error::WrongType { .. }) => {
                self.set_stream_aside(index, &error);
                wrong_type.get_or_insert(error);
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Only when every stream is set aside is a key of another type an error.
    fn unless_all_set_aside(&self, wrong_type: Option<Error>) -> Result<()> {
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
    ///
    /// `name_taken` is cancelled (with `shutdown`) when another process took the lease of
    /// this consumer's name: the entries pending under the name are then that process's
    /// too, so they are neither kept fresh nor handed over from here any more.
    pub(crate) async fn run(
        self,
        shutdown: CancellationToken,
        name_taken: CancellationToken,
    ) -> Result<()> {
        for route in self.routes.iter() {
            route.state.reset();
        }
        let streams: Arc<[Arc<str>]> = self.routes.iter().map(|r| r.stream.clone()).collect();
        let (acker, acks) = Acker::new(self.broker.clone(), self.group.clone(), &streams);
        let close_acks = CancellationToken::new();
        let acker = tokio::spawn(acker.run(close_acks.clone(), self.command_timeout));
        let tasks = TaskTracker::new();
        // Cancelled when the grace period is over: handlers still running are abandoned.
        let abandon = CancellationToken::new();
        let (retry_sender, retry_requests) = mpsc::unbounded_channel();
        let blocked_read = Arc::new(BlockedRead::default());
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
                blocked_read: blocked_read.clone(),
                publisher: self.publisher.clone(),
                span_level: self.span_level,
                metrics: self
                    .routes
                    .iter()
                    .map(|route| StreamMetrics::new(&route.stream, &self.group))
                    .collect(),
                retry_dues: RetryDues::new(
                    self.routes.iter().map(|route| &*route.stream),
                    &self.group,
                ),
                shutting_down: shutdown.clone(),
            }),
            tasks: tasks.clone(),
            abandon: abandon.clone(),
        };
        // Aborted at shutdown: a trim is one atomic script, done or not done.
        let retention = (!self.trim_acked.is_empty()).then(|| {
            tokio::spawn(retention::trim_acked_periodically(
                self.broker.clone(),
                self.trim_acked.clone(),
                self.trim_acked_interval,
            ))
            .abort_handle()
        });
        let held_ids = Arc::new(HeldIds::new(streams.len()));
        let freshness = Arc::new(Freshness {
            broker: self.broker.clone(),
            group: self.group.clone(),
            consumer: self.consumer.clone(),
            streams: streams.clone(),
            ids: held_ids.clone(),
            claim_min_idle: self.claim_min_idle,
            command_timeout: self.command_timeout,
        });
        // Runs until every handler has stopped: a handler running through the grace
        // period stays fresh, so no other consumer runs its entry meanwhile.
        let keep_fresh = tokio::spawn({
            let freshness = freshness.clone();
            let name_taken = name_taken.clone();
            async move {
                tokio::select! {
                    () = freshness.keep_fresh() => {}
                    () = name_taken.cancelled() => {}
                }
            }
        })
        .abort_handle();
        let reader = Reader::new(
            &self,
            streams,
            dispatcher,
            blocked_read,
            retry_requests,
            held_ids,
        );
        let outcome = tokio::select! {
            outcome = reader.run() => outcome,
            () = shutdown.cancelled() => Ok(()),
        };
        if let Some(retention) = retention {
            retention.abort();
        }
        // The reader is dropped by now, and with it the entries waiting for a retry or a
        // handler slot: they stay pending, handed over at once to the other consumers.
        if !name_taken.is_cancelled() {
            freshness.hand_over().await;
        }
        tracing::info!(group = %self.group, consumer = %self.consumer, running = tasks.len(), "shutting down");
        tasks.close();
        if tokio::time::timeout(self.shutdown_grace, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = tasks.len(),
                grace = ?self.shutdown_grace,
                "grace period over: abandoning running handlers, their entries are handed over"
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
        // The acker flushes what the handlers sent and stops, giving up after the command
        // timeout if Redis refuses; the margin covers the flush in progress.
        close_acks.cancel();
        if tokio::time::timeout(self.command_timeout * 2, acker)
            .await
            .is_err()
        {
            tracing::error!(
                "acknowledgements were not flushed in time; their entries will be delivered again"
            );
        }
        keep_fresh.abort();
        // What was abandoned, or not acknowledged in time, goes to the other consumers.
        if !name_taken.is_cancelled() {
            freshness.hand_over().await;
        }
        tracing::info!(group = %self.group, consumer = %self.consumer, "stopped");
        outcome
    }
}
