//! Reading new entries: the plan of which streams to read, probes of paused streams, and
//! the waits a reader chooses instead of reading.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Reader;
use crate::consumer::read_window::{self};
use crate::error::Result;

/// How late Redis may end a blocking read: it checks block timeouts about every 100 ms
/// at the default `hz`.
const REDIS_TIMER_SLACK: Duration = Duration::from_millis(100);
/// The longest the reader waits, after a read that drained its streams, for the handlers
/// it dispatched to start before it reads again (see [`let_handlers_start`]).
const HANDLER_START_WAIT: Duration = Duration::from_millis(1);

/// Lets the handlers just dispatched start before the reader sends its next read.
///
/// Otherwise the spawned batch waits on this worker until the reader has written its next
/// `XREADGROUP`: in the `latency` benchmark (1k entries/s, one per read) that put 21-33 µs
/// at p50 and 106-118 µs at p99 between dispatch and the batch's first poll; with this,
/// 4 µs and 42-44 µs. Done only when the streams are drained, where the next read would
/// just block. A yielded task resumes when this worker runs out of ready tasks, so a
/// handler that computes for long before its first await would hold the reader as long:
/// the timer bounds that, and fires on another worker while this one is busy.
pub(super) async fn let_handlers_start() {
    tokio::select! {
        biased;
        () = tokio::task::yield_now() => {}
        () = tokio::time::sleep(HANDLER_START_WAIT) => {}
    }
}

impl Reader<'_> {
    pub(super) async fn read_new(&mut self) -> Result<()> {
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
    pub(super) async fn wait_while_paused(&mut self) {
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
}
