//! The read loop: it alone takes handler slots and places among the held entries for new
//! work (new entries, own pending entries, claims, retries), so that nothing is fetched that
//! could not be held.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

use super::dispatch::{Dispatcher, Job};
use super::in_flight::{Held, take_free};
use super::keep_fresh::{HeldId, HeldIds};
use super::read_window::{self, ReadWindow};
use super::retry::{BlockedRead, RetryQueue, RetryRequest};
use super::{Backoff, Consumer, Route, sweep};
use crate::broker::Delivery;
use crate::error::{Error, Result};
use crate::event::EntryId;
use crate::telemetry;

/// How late Redis may end a blocking read: it checks block timeouts about every 100 ms
/// at the default `hz`.
const REDIS_TIMER_SLACK: Duration = Duration::from_millis(100);
/// How many times a read of new entries lets running handlers finish before it goes out
/// with fewer slots than half the limit.
const BATCH_YIELDS: usize = 4;
/// The longest the reader waits, after a read that drained its streams, for the handlers
/// it dispatched to start before it reads again (see [`let_handlers_start`]).
const HANDLER_START_WAIT: Duration = Duration::from_millis(1);

/// Where the scan for entries of dead consumers stands. It goes through the pending list
/// of one stream after the other, a page per turn of the read loop so that a long list
/// does not hold up new entries, and keeps its cursor until a whole pass is done.
struct ClaimScan {
    next_at: Instant,
    stream_index: usize,
    cursor: EntryId,
}

/// Where the delivery of the entries this consumer held when it last stopped stands: a
/// page per turn of the read loop, one stream after the other, before any new entry. It
/// runs again for one stream when a claim or recovery read failed without an answer: the
/// server may have given this consumer entries whose reply was lost.
struct Recovery {
    stream_index: usize,
    after: EntryId,
    recovered: usize,
    /// The streams to go through after this one.
    then: Vec<usize>,
}

/// Handler slots and places among the held entries, taken together for one read: one of
/// each per entry it may return.
struct Reservation {
    slots: OwnedSemaphorePermit,
    places: OwnedSemaphorePermit,
}

impl Reservation {
    /// How many entries the reservation covers.
    fn len(&self) -> usize {
        self.places.num_permits()
    }
}

/// The read loop. It alone takes handler slots and places for new work (new entries, own
/// pending entries, claims, retries), so that nothing is fetched that could not be held.
pub(super) struct Reader<'a> {
    consumer: &'a Consumer,
    streams: Arc<[Arc<str>]>,
    /// Handler slots: `max_concurrent`.
    slots: Arc<Semaphore>,
    /// Places among the entries this consumer holds pending: `max_in_flight`.
    places: Arc<Semaphore>,
    dispatcher: Dispatcher,
    retries: RetryQueue,
    claims: ClaimScan,
    recovery: Option<Recovery>,
    window: ReadWindow,
    blocked_read: Arc<BlockedRead>,
    backoff: Backoff,
    /// The highest id delivered to this consumer on each stream since it started: where a
    /// lost group is created again.
    delivered_up_to: Vec<Option<EntryId>>,
    /// The ids this consumer holds, kept fresh on the server.
    held_ids: Arc<HeldIds>,
    /// Streams whose claim lost its reply: their own pending entries not held are looked
    /// for, first stream first.
    lost: Vec<usize>,
}

impl<'a> Reader<'a> {
    pub(super) fn new(
        consumer: &'a Consumer,
        streams: Arc<[Arc<str>]>,
        dispatcher: Dispatcher,
        blocked_read: Arc<BlockedRead>,
        retry_requests: mpsc::UnboundedReceiver<RetryRequest>,
        held_ids: Arc<HeldIds>,
    ) -> Self {
        Reader {
            consumer,
            slots: Arc::new(Semaphore::new(consumer.max_concurrent)),
            places: Arc::new(Semaphore::new(consumer.max_in_flight)),
            claims: ClaimScan {
                next_at: Instant::now() + consumer.claim_interval,
                stream_index: 0,
                cursor: EntryId::MIN,
            },
            recovery: Some(Recovery {
                stream_index: 0,
                after: EntryId::MIN,
                recovered: 0,
                then: (1..streams.len()).collect(),
            }),
            retries: RetryQueue::new(retry_requests),
            window: ReadWindow::new(streams.len()),
            delivered_up_to: vec![None; streams.len()],
            streams,
            dispatcher,
            blocked_read,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            held_ids,
            lost: Vec::new(),
        }
    }
}

impl Reader<'_> {
    pub(super) async fn run(mut self) -> Result<()> {
        loop {
            self.retries.collect();
            self.run_due_retries().await?;
            self.claim_if_due().await?;
            self.claim_lost().await?;
            if self.recovery.is_some() {
                self.recover_own_pending().await?;
            } else {
                self.read_new().await?;
            }
        }
    }

    fn route(&self, stream_index: usize) -> &Route {
        &self.consumer.routes[stream_index]
    }

    /// Delivers again a page of what this consumer held when it last stopped: entries it
    /// read but never acknowledged. They come before new entries.
    async fn recover_own_pending(&mut self) -> Result<()> {
        let c = self.consumer;
        let Some(recovery) = &self.recovery else {
            return Ok(());
        };
        let (stream_index, after) = (recovery.stream_index, recovery.after);
        if c.set_aside.is_set(stream_index) {
            self.next_recovery_stream();
            return Ok(());
        }
        let stream = self.streams[stream_index].clone();
        let Some(mut reservation) = self.reserve(c.max_count).await else {
            return Ok(());
        };
        let count = reservation.len();
        match c
            .broker
            .read_own_pending(&stream, &c.group, &c.consumer, after, count)
            .await
        {
            Ok(deliveries) => {
                self.recovered();
                // Recovering a long pending list is reading: a liveness probe watching
                // `since_last_read` must not take it for a stuck listener.
                c.last_read.record();
                match deliveries.last() {
                    Some(last) => {
                        let last = last.id;
                        if let Some(recovery) = &mut self.recovery {
                            recovery.after = last;
                            recovery.recovered += deliveries.len();
                        }
                        let deliveries = self
                            .wait_for_asked_retries(stream_index, deliveries, &mut reservation)
                            .await;
                        self.dispatch(stream_index, deliveries, &mut reservation)
                            .await;
                    }
                    None => self.next_recovery_stream(),
                }
                Ok(())
            }
            Err(error) => {
                drop(reservation);
                if self.heal(error).await? == Healed::GroupRecreated {
                    // A new group has no pending entries.
                    self.next_recovery_stream();
                }
                // Otherwise the next turn reads the same page again: entries a lost reply
                // delivered are still pending with this consumer after `after`.
                Ok(())
            }
        }
    }

    /// Puts the recovered entries whose `retry_after` is not due yet into the retry queue,
    /// each with a place of `reservation`, instead of running them at once; returns the
    /// others.
    async fn wait_for_asked_retries(
        &mut self,
        stream_index: usize,
        deliveries: Vec<Delivery>,
        reservation: &mut Reservation,
    ) -> Vec<Delivery> {
        let ids: Vec<EntryId> = deliveries.iter().map(|delivery| delivery.id).collect();
        let waiting = self
            .dispatcher
            .shared
            .retry_dues
            .waiting(&*self.consumer.broker, stream_index, &ids)
            .await;
        let state = self.route(stream_index).state.clone();
        let mut now_due = Vec::with_capacity(deliveries.len());
        for (delivery, wait) in deliveries.into_iter().zip(waiting) {
            let (Some(wait), Some(_)) = (wait, &delivery.fields) else {
                now_due.push(delivery);
                continue;
            };
            let Some(place) = reservation.places.split(1) else {
                now_due.push(delivery);
                continue;
            };
            let Some(held_id) = HeldId::register(
                &self.held_ids,
                stream_index,
                delivery.id,
                delivery.delivered_at,
            ) else {
                // Held already (a retry of this run): one entry, one run.
                continue;
            };
            tracing::debug!(stream = %self.streams[stream_index], entry_id = %delivery.id, retry_in = ?wait, "recovered entry waits for the retry its handler asked for");
            self.retries.push(RetryRequest {
                due: Instant::now() + wait,
                stream_index,
                id: delivery.id,
                delivery_count: delivery.delivery_count,
                held: Held::new(place, state.clone(), held_id),
            });
        }
        now_due
    }

    fn next_recovery_stream(&mut self) {
        let Some(recovery) = &mut self.recovery else {
            return;
        };
        if recovery.recovered > 0 {
            tracing::info!(stream = %self.streams[recovery.stream_index], recovered = recovery.recovered, "delivered this consumer's pending entries again");
        }
        if recovery.then.is_empty() {
            self.recovery = None;
        } else {
            let next = recovery.then.remove(0);
            recovery.stream_index = next;
            recovery.after = EntryId::MIN;
            recovery.recovered = 0;
        }
    }

    /// A claim or a recovery read of stream `stream_index` failed, maybe after the server
    /// gave this consumer entries in a reply that was lost: they are pending with it, and
    /// nothing would run them. Its own pending entries of the stream are read again (those
    /// it holds are skipped) before new entries.
    /// Remembers to look for what a claim of `stream_index` whose reply was lost may have
    /// given this consumer (see [`claim_lost`](Self::claim_lost)).
    fn find_own_pending_again(&mut self, stream_index: usize) {
        if !self.lost.contains(&stream_index) {
            self.lost.push(stream_index);
        }
    }

    /// Claims back what a claim whose reply was lost (a timeout: Redis may have run it)
    /// may have given this consumer: its own pending entries of the stream that it does not
    /// hold. They are listed with `XPENDING`, which counts no delivery, so the entries this
    /// consumer holds are not delivered again, and each is claimed only if it is still as
    /// idle as listed, so one that another consumer claimed meanwhile is left to it.
    async fn claim_lost(&mut self) -> Result<()> {
        let Some(&stream_index) = self.lost.first() else {
            return Ok(());
        };
        let c = self.consumer;
        let stream = self.streams[stream_index].clone();
        // Every entry held could come first in the list: enough for a page besides them.
        let listed = c.max_in_flight.saturating_add(c.max_count);
        let pending = match c
            .broker
            .pending_entries(&stream, &c.group, Some(&c.consumer), listed)
            .await
        {
            Ok(pending) => pending,
            Err(Error::GroupNotFound { .. }) => {
                // Nothing is pending in a group that is gone; the read recreates it.
                self.lost.remove(0);
                return Ok(());
            }
            Err(error) => return self.heal(error).await.map(drop),
        };
        let lost: Vec<_> = pending
            .into_iter()
            .filter(|entry| !self.held_ids.is_held(stream_index, entry.id))
            .collect();
        if lost.is_empty() {
            self.lost.remove(0);
            return Ok(());
        }
        let Some(mut reservation) = self.take_reservation(lost.len().min(c.max_count)).await else {
            // Every place is taken: the next turn tries again.
            return Ok(());
        };
        let taken = &lost[..reservation.len()];
        let requests: Vec<_> = taken
            .iter()
            .map(|entry| (stream.clone(), entry.id, entry.idle))
            .collect();
        match c
            .broker
            .claim_for_retry(&c.group, &c.consumer, &requests)
            .await
        {
            Ok(claimed) => {
                self.recovered();
                let deliveries: Vec<Delivery> = taken
                    .iter()
                    .zip(claimed)
                    .filter_map(|(entry, fields)| {
                        Some(Delivery {
                            id: entry.id,
                            fields: Some(fields?),
                            delivery_count: entry.delivery_count + 1,
                            delivered_at: Instant::now(),
                        })
                    })
                    .collect();
                if !deliveries.is_empty() {
                    tracing::info!(stream = %stream, found = deliveries.len(), "found this consumer's pending entries that a lost reply left untracked; handling them");
                }
                if taken.len() == lost.len() {
                    self.lost.remove(0);
                }
                self.dispatch(stream_index, deliveries, &mut reservation)
                    .await;
                Ok(())
            }
            Err(error) => {
                drop(reservation);
                self.heal(error).await.map(drop)
            }
        }
    }

    /// Claims the entries whose retry is due back to this consumer and runs them again.
    /// They hold their places already, so only handler slots are taken here.
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
        // A touch of the held entries must not land between the least idle time measured
        // here and the claim: the claim would find the entry fresher than measured.
        let held_ids = self.held_ids.clone();
        let touching = held_ids.touching.lock().await;
        let now = Instant::now();
        let mut lost = Vec::new();
        let mut taken_fresh = Vec::with_capacity(taken.len());
        for request in taken {
            match held_ids.fresh_since(request.stream_index, request.id) {
                Some(since) => taken_fresh.push((request, since)),
                None => lost.push(request),
            }
        }
        for request in lost {
            tracing::debug!(
                stream = %self.streams[request.stream_index],
                entry_id = %request.id,
                "entry due for retry is no longer pending with this consumer (claimed by another, or deleted); leaving it"
            );
            request.held.settle();
        }
        let (taken, fresh_since): (Vec<RetryRequest>, Vec<Instant>) =
            taken_fresh.into_iter().unzip();
        if taken.is_empty() {
            return Ok(());
        }
        let requests: Vec<_> = taken
            .iter()
            .zip(&fresh_since)
            .map(|(r, since)| {
                (
                    self.streams[r.stream_index].clone(),
                    r.id,
                    // The entry is kept fresh while held: claiming with the time since it
                    // was last confirmed fresh as the least idle time only succeeds if
                    // nobody has claimed it since.
                    now.saturating_duration_since(*since),
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
                self.recovered();
                let claimed_at = Instant::now();
                let mut jobs = Vec::with_capacity(taken.len());
                for (request, fields) in taken.into_iter().zip(claimed) {
                    match fields {
                        Some(fields) => {
                            let Some(slot) = slots.split(1) else {
                                unreachable!("no more requests are taken than slots reserved")
                            };
                            held_ids.refreshed(request.stream_index, request.id, claimed_at);
                            jobs.push(Job {
                                stream_index: request.stream_index,
                                delivery: Delivery {
                                    id: request.id,
                                    fields: Some(fields),
                                    delivery_count: request.delivery_count + 1,
                                    delivered_at: claimed_at,
                                },
                                slot,
                                held: request.held,
                            });
                        }
                        None => {
                            tracing::debug!(
                                stream = %self.streams[request.stream_index],
                                entry_id = %request.id,
                                "entry due for retry was claimed by another consumer or deleted; leaving it"
                            );
                            request.held.settle();
                        }
                    }
                }
                self.dispatcher.spawn(jobs);
                Ok(())
            }
            Err(error) => {
                // The claim may have run on the server (its reply lost, or one slot of a
                // cluster failing): that reset the idle time of the entries it claimed,
                // and a least idle time measured from before it would find them claimed
                // by someone else. Measured from now it is no longer than their idle time
                // either way.
                let failed_at = Instant::now();
                for request in &taken {
                    held_ids.refreshed(request.stream_index, request.id, failed_at);
                }
                drop(touching);
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
    /// `claim_min_idle`, when a scan is due. On a stream whose reading is paused it claims
    /// one entry at a time, and only when none is held: that entry probes the handler like
    /// a new one would, and entries of dead consumers are not left unclaimed for as long
    /// as the pause lasts (with nothing new to read, a probe would never come).
    async fn claim_if_due(&mut self) -> Result<()> {
        if Instant::now() < self.claims.next_at {
            return Ok(());
        }
        let c = self.consumer;
        let stream_index = self.claims.stream_index;
        let state = &self.route(stream_index).state;
        let page_size = if state.is_paused() {
            if state.held() > 0 {
                self.next_claim_stream(EntryId::MIN);
                return Ok(());
            }
            1
        } else {
            c.max_count
        };
        let stream = self.streams[stream_index].clone();
        if c.set_aside.is_set(stream_index) {
            // Its turn in the scan is when a set-aside stream is looked at again: once its
            // key is a stream again (deleted, or renamed away), the group is created there
            // and it is consumed.
            match c.broker.ensure_group(&stream, &c.group, c.start_from).await {
                Ok(()) => {
                    c.set_aside.clear(stream_index);
                    tracing::info!(stream = %stream, "the stream's key is a stream again; consuming it");
                }
                Err(Error::WrongType { .. }) => {}
                Err(error) => {
                    tracing::debug!(stream = %stream, error = &error as &dyn std::error::Error, "checking a set-aside stream again failed")
                }
            }
            self.next_claim_stream(EntryId::MIN);
            return Ok(());
        }
        let Some(mut reservation) = self.take_reservation(page_size).await else {
            // Every place is taken: this consumer has enough to do.
            self.claims.next_at = Instant::now() + c.claim_interval;
            return Ok(());
        };
        let count = reservation.len();
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
                self.recovered();
                if !page.deleted.is_empty() {
                    tracing::warn!(
                        stream = %stream,
                        entry_ids = ?page.deleted,
                        "pending entries were deleted from the stream; dropped them from the pending list"
                    );
                }
                // An entry this consumer holds went stale (its process stalled for longer
                // than claim_min_idle): it is running or settling here already, and must
                // not run a second time; the claim reset its idle time, which a retry
                // claim measures from. Others of its own were left by an earlier run under
                // its name.
                let deliveries: Vec<Delivery> = page
                    .deliveries
                    .into_iter()
                    .filter(|d| {
                        let held = self.held_ids.is_held(stream_index, d.id);
                        if held {
                            self.held_ids.refreshed(stream_index, d.id, d.delivered_at);
                        }
                        !held
                    })
                    .collect();
                let own = deliveries
                    .iter()
                    .filter(|d| page.own.contains(&d.id))
                    .count();
                let from_others = deliveries.len() - own;
                if own > 0 {
                    tracing::info!(stream = %stream, recovered = own, "claimed entries this consumer left pending in an earlier run");
                }
                if from_others > 0 {
                    tracing::info!(stream = %stream, claimed = from_others, "claimed entries from stopped consumers");
                    telemetry::claimed(&stream, &c.group, from_others);
                }
                self.dispatch(stream_index, deliveries, &mut reservation)
                    .await;
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
                }
                self.next_claim_stream(page.next_cursor);
                Ok(())
            }
            Err(error) => {
                drop(reservation);
                // Try again at the next interval, not on every turn of the loop.
                self.claims.next_at = Instant::now() + c.claim_interval;
                if self.heal(error).await? == Healed::Retry {
                    self.find_own_pending_again(stream_index);
                }
                Ok(())
            }
        }
    }

    /// Moves the claim scan on to `cursor`, or to the next stream once a stream's scan
    /// is through; after the last stream the scan rests until the next interval.
    fn next_claim_stream(&mut self, cursor: EntryId) {
        self.claims.cursor = cursor;
        if cursor == EntryId::MIN {
            self.claims.stream_index = (self.claims.stream_index + 1) % self.streams.len();
            if self.claims.stream_index == 0 {
                self.claims.next_at = Instant::now() + self.consumer.claim_interval;
            }
        }
    }

    /// When the reader must be back from a blocking read or a wait: the next retry or
    /// claim scan needs it.
    fn wake_at(&self) -> Instant {
        let mut wake_at = self.claims.next_at;
        if let Some(due) = self.retries.next_due() {
            wake_at = wake_at.min(due);
        }
        wake_at
    }

    async fn read_new(&mut self) -> Result<()> {
        let c = self.consumer;
        let Some(mut reservation) = self
            .reserve_batch(c.max_count.saturating_mul(self.streams.len()))
            .await
        else {
            return Ok(());
        };
        // Decided once the slots are reserved: the handlers that freed them have counted
        // their failures by then.
        let now = Instant::now();
        // A paused stream is read for one entry now and then, to find out whether its
        // handler recovered (when no retry of it is under way, which would tell as well);
        // see `StreamState::probe_read` for when. Every paused stream whose probe is due is
        // probed in the same read (one entry of each, as many as there are places for), so
        // that one whose probes keep finding nothing does not starve the others.
        let probe_room = reservation.len();
        let probed: Vec<usize> = (0..self.streams.len())
            .filter(|&i| {
                let state = &self.route(i).state;
                !c.set_aside.is_set(i) && state.is_paused() && state.take_probe(now)
            })
            .take(probe_room)
            .collect();
        // A stream set aside (its key holds another type) is not read at all.
        let active: Vec<bool> = (0..self.streams.len())
            .map(|i| !self.route(i).state.is_paused() && !c.set_aside.is_set(i))
            .collect();
        if probed.is_empty() && !active.contains(&true) {
            drop(reservation);
            self.wait_while_paused().await;
            return Ok(());
        }
        let plan = if probed.is_empty() {
            self.window.plan(
                &active,
                reservation.slots.num_permits(),
                reservation.len(),
                c.max_count,
            )
        } else {
            // While nothing else is read, the probe waits for a new entry as a read does:
            // on a quiet paused stream, the next entry published is the probe.
            read_window::ReadPlan::probe(probed.clone(), !active.contains(&true))
        };
        // Only what the plan may return stays reserved.
        let wanted = plan.count * plan.streams.len();
        if reservation.len() > wanted {
            drop(reservation.places.split(reservation.len() - wanted));
        }
        let slots = reservation.slots.num_permits();
        if slots > wanted {
            drop(reservation.slots.split(slots - wanted));
        }
        let window: Vec<Arc<str>> = plan
            .streams
            .iter()
            .map(|&i| self.streams[i].clone())
            .collect();
        // Wake up in time for the next retry or claim scan: they need the slots this read
        // holds.
        let now = Instant::now();
        let until_wake = self.wake_at().saturating_duration_since(now);
        // Redis checks block timeouts on its own clock (about every 100 ms at the default
        // `hz`), so a very short block can last far longer than asked: when something is
        // due already, read without blocking instead.
        // Less than a millisecond to go is slept off rather than spun away in reads: a paused
        // tokio clock (tests on the in-memory backend) only advances when nothing spins.
        if plan.block && !until_wake.is_zero() && until_wake < Duration::from_millis(1) {
            tokio::time::sleep(until_wake).await;
        }
        let block = (plan.block && until_wake >= Duration::from_millis(1))
            .then(|| c.block_time.min(until_wake));
        // Redis ends a block on its own timer, up to about 100 ms late (default `hz`).
        self.blocked_read
            .set(block.map(|block| now + block + REDIS_TIMER_SLACK));
        let read = c
            .broker
            .read_new(&c.group, &c.consumer, &window, plan.count, block)
            .await;
        self.blocked_read.set(None);
        if let Ok(batches) = &read {
            for (position, &stream_index) in probed.iter().enumerate() {
                let found = batches
                    .iter()
                    .any(|batch| batch.stream_index == position && !batch.deliveries.is_empty());
                self.route(stream_index)
                    .state
                    .probe_read(now, found, c.retry_max, c.block_time);
            }
        }
        match read {
            Ok(batches) => {
                self.recovered();
                c.last_read.record();
                let mut returned = vec![0; plan.streams.len()];
                for batch in &batches {
                    returned[batch.stream_index] = batch.deliveries.len();
                }
                for (&stream_index, &returned) in plan.streams.iter().zip(&returned) {
                    self.window.record(stream_index, returned >= plan.count);
                }
                // Fewer entries than asked for: the streams are drained, so the next read
                // will only wait for new entries.
                let drained = returned.iter().all(|&n| n < plan.count);
                let dispatched = returned.iter().any(|&n| n > 0);
                for batch in batches {
                    let stream_index = plan.streams[batch.stream_index];
                    self.dispatch(stream_index, batch.deliveries, &mut reservation)
                        .await;
                }
                if drained && dispatched {
                    // Slots left over are not needed while waiting.
                    drop(reservation);
                    let_handlers_start().await;
                }
                Ok(())
            }
            Err(error) => {
                drop(reservation);
                self.heal(error).await.map(drop)
            }
        }
    }

    /// Every stream is paused: waits for a retry, a claim scan or a probe to be due, for
    /// reading to resume, or for a new retry request, but no longer than a blocking read,
    /// so that the loop goes round as often as it would reading (what `is_live` watches).
    async fn wait_while_paused(&mut self) {
        let c = self.consumer;
        let mut until = self.wake_at().min(Instant::now() + c.block_time);
        for route in c.routes.iter() {
            if let Some(probe) = route.state.next_probe() {
                until = until.min(probe);
            }
        }
        let resumed = futures_util::future::select_all(
            c.routes.iter().map(|route| Box::pin(route.state.resumed())),
        );
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            _ = resumed => {}
            () = self.retries.wait_incoming() => {}
        }
        c.last_read.record_turn();
    }

    /// Reserves slots and places for a read of new entries: like
    /// [`reserve`](Self::reserve), but when only a few slots are free while handlers run,
    /// it lets them finish for a moment first, so that a busy bus reads in batches instead
    /// of one entry per freed slot. Measured with the no-op handler of the benchmark,
    /// reading as soon as one slot was free made reads a third of the size they could be
    /// and cost 3x the round trips.
    async fn reserve_batch(&mut self, wanted: usize) -> Option<Reservation> {
        let target = wanted.min((self.consumer.max_concurrent / 2).max(1));
        let mut slots = self.reserve_slots(wanted).await;
        for _ in 0..BATCH_YIELDS {
            if slots.num_permits() >= target {
                break;
            }
            tokio::task::yield_now().await;
            self.take_free_slots(&mut slots, wanted);
        }
        // A read of every stream at once may bring more entries than there are free slots
        // (they wait for a slot, held): it reserves a place for each.
        let places_wanted = wanted.max(self.streams.len());
        self.with_places(slots, places_wanted).await
    }

    /// Waits for one free slot, takes up to `wanted` of those free right now, and as many
    /// places; waits for a place only as long as nothing else is due.
    async fn reserve(&mut self, wanted: usize) -> Option<Reservation> {
        let slots = self.reserve_slots(wanted).await;
        let wanted = slots.num_permits();
        self.with_places(slots, wanted).await
    }

    /// As [`reserve`](Self::reserve), for work that is due now: gives up at once when no
    /// place is free.
    async fn take_reservation(&mut self, wanted: usize) -> Option<Reservation> {
        let mut slots = self.reserve_slots(wanted).await;
        let places = take_free(&self.places, slots.num_permits())?;
        if slots.num_permits() > places.num_permits() {
            drop(slots.split(slots.num_permits() - places.num_permits()));
        }
        Some(Reservation { slots, places })
    }

    /// Adds up to `wanted` places to `slots`. When every place is taken (entries wait for
    /// their retry or their acknowledgement), it waits for one to free up, for a retry or
    /// claim scan to be due, or for a new retry request, no longer than a blocking read,
    /// and returns `None`: the read loop goes round again (a chosen wait: `is_live` counts
    /// it as a turn).
    async fn with_places(
        &mut self,
        slots: OwnedSemaphorePermit,
        wanted: usize,
    ) -> Option<Reservation> {
        if let Some(places) = take_free(&self.places, wanted) {
            return Some(Reservation { slots, places });
        }
        drop(slots);
        let wake_at = self
            .wake_at()
            .min(Instant::now() + self.consumer.block_time);
        tokio::select! {
            place = self.places.clone().acquire_owned() => drop(place),
            () = tokio::time::sleep_until(wake_at) => {}
            () = self.retries.wait_incoming() => {}
        }
        self.consumer.last_read.record_turn();
        None
    }

    /// Adds the slots free right now to `slots`, up to `wanted` in all.
    fn take_free_slots(&self, slots: &mut OwnedSemaphorePermit, wanted: usize) {
        if let Some(extra) = take_free(&self.slots, wanted.saturating_sub(slots.num_permits())) {
            slots.merge(extra);
        }
    }

    /// Waits for one free slot, then takes up to `wanted` of those free right now.
    async fn reserve_slots(&self, wanted: usize) -> OwnedSemaphorePermit {
        let Ok(mut slots) = self.slots.clone().acquire_owned().await else {
            unreachable!("the semaphore is never closed")
        };
        self.take_free_slots(&mut slots, wanted);
        slots
    }

    /// Starts handling `deliveries`, each with a slot and a place of `reservation`. A
    /// well-behaved server returns no more entries than were asked for, so a place is
    /// always there; an entry beyond them stays pending with this consumer unhandled (it
    /// is delivered again when the consumer restarts, or claimed by another) rather than
    /// exceed `max_in_flight`. An entry without a free slot waits for one.
    async fn dispatch(
        &mut self,
        stream_index: usize,
        deliveries: Vec<Delivery>,
        reservation: &mut Reservation,
    ) {
        let state = self.route(stream_index).state.clone();
        if let Some(highest) = deliveries.iter().map(|delivery| delivery.id).max() {
            let known = &mut self.delivered_up_to[stream_index];
            *known = (*known).max(Some(highest));
        }
        let mut jobs = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let Some(id) = HeldId::register(
                &self.held_ids,
                stream_index,
                delivery.id,
                delivery.delivered_at,
            ) else {
                // Delivered again while this consumer works on it (a recovery read of its
                // own pending entries): one entry, one run. The delivery reset its idle
                // time, which a retry claim measures from.
                self.held_ids
                    .refreshed(stream_index, delivery.id, delivery.delivered_at);
                tracing::debug!(stream = %self.streams[stream_index], entry_id = %delivery.id, "entry delivered again while held; not running it a second time");
                continue;
            };
            let Some(place) = reservation.places.split(1) else {
                tracing::error!(stream = %self.streams[stream_index], entry_id = %delivery.id, "the server returned more entries than were asked for; leaving this one pending");
                continue;
            };
            let slot = match reservation.slots.split(1) {
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
                held: Held::new(place, state.clone(), id),
            });
        }
        self.dispatcher.spawn(jobs);
    }

    /// A command succeeded: says so at INFO when commands failed before, and starts the
    /// backoff over.
    fn recovered(&mut self) {
        let failed_attempts = self.backoff.attempts();
        if failed_attempts > 0 {
            tracing::info!(
                group = %self.consumer.group,
                consumer = %self.consumer.consumer,
                failed_attempts,
                "redis answers the listener again after a failure"
            );
            self.backoff.reset();
        }
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
                    "consumer group or stream is gone (deleted, flushed, or Redis restarted without persistence); creating the group again where it is gone"
                );
                match c.recreate_groups(&self.delivered_up_to).await {
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
        // The first failure at WARN, the next ones, until a command succeeds again (one
        // INFO line then, see `recovered`), at DEBUG: a failover or an outage is a few
        // lines that say what happened, not one per backoff step.
        if self.backoff.attempts() == 1 {
            tracing::warn!(error = &error as &dyn std::error::Error, retry_in = ?delay, "redis command failed; retrying with backoff, further failures at DEBUG until redis answers again");
        } else {
            tracing::debug!(error = &error as &dyn std::error::Error, attempt = self.backoff.attempts(), retry_in = ?delay, "redis command failed again");
        }
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
pub(crate) fn is_refused_access(error: &redis::RedisError) -> bool {
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
