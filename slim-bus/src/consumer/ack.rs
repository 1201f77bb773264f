//! Batched acknowledgements: one `XACK` per stream per flush, all streams in one round trip.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::event::EntryId;

use super::backoff::Backoff;
use super::in_flight::Held;

/// Acks are flushed as soon as one arrives; while a flush is on the wire the next ones
/// gather, so the batch size follows the load without a timer. The cap bounds one command.
const MAX_ACKS_PER_FLUSH: usize = 4096;

/// One handled entry to acknowledge; its place among the held entries is freed once the
/// acknowledgement is flushed.
type Ack = (usize, EntryId, Held);

/// Sends the ack of one handled entry to the acker.
#[derive(Clone)]
pub(crate) struct AckSender(mpsc::UnboundedSender<Ack>);

impl AckSender {
    pub(crate) fn ack(&self, stream_index: usize, id: EntryId, held: Held) {
        // After the acker stopped (shutdown) the entry stays pending and is delivered again.
        let _ = self.0.send((stream_index, id, held));
    }
}

pub(crate) struct Acker {
    broker: Arc<dyn Broker>,
    group: Arc<str>,
    batch: Vec<(Arc<str>, Vec<EntryId>)>,
    /// The places of the entries in `batch`, freed when it is flushed.
    held: Vec<Held>,
    receiver: mpsc::UnboundedReceiver<Ack>,
}

impl Acker {
    pub(crate) fn new(
        broker: Arc<dyn Broker>,
        group: Arc<str>,
        streams: &[Arc<str>],
    ) -> (Self, AckSender) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let acker = Acker {
            broker,
            group,
            batch: streams.iter().map(|s| (s.clone(), Vec::new())).collect(),
            held: Vec::new(),
            receiver,
        };
        (acker, AckSender(sender))
    }

    /// Flushes acks until `close` is cancelled and every ack sent by then is flushed, or
    /// until `give_up_after` has passed since `close` while Redis still refuses them.
    ///
    /// It stops on its own signal rather than when every sender is dropped: a handler
    /// that blocks its thread at shutdown keeps a sender alive for as long as it blocks.
    pub(crate) async fn run(mut self, close: CancellationToken, give_up_after: Duration) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut closed_at: Option<Instant> = None;
        loop {
            if self.pending() == 0 {
                if closed_at.is_some() {
                    // Acks sent before the close are in the channel still.
                    match self.receiver.try_recv() {
                        Ok(ack) => self.add(ack),
                        Err(_) => return,
                    }
                    continue;
                }
                tokio::select! {
                    biased;
                    received = self.receiver.recv() => match received {
                        Some(ack) => self.add(ack),
                        None => return,
                    },
                    () = close.cancelled() => {
                        closed_at = Some(Instant::now());
                        continue;
                    }
                }
            }
            if closed_at.is_none() && close.is_cancelled() {
                closed_at = Some(Instant::now());
            }
            let mut taken = self.pending();
            while taken < MAX_ACKS_PER_FLUSH {
                match self.receiver.try_recv() {
                    Ok(ack) => {
                        self.add(ack);
                        taken += 1;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed_at.get_or_insert_with(Instant::now);
                        break;
                    }
                }
            }
            match self.broker.ack(&self.group, &self.batch).await {
                Ok(()) => {
                    if backoff.attempts() > 0 {
                        tracing::info!(
                            failed_attempts = backoff.attempts(),
                            "acknowledging works again after a failure"
                        );
                    }
                    backoff.reset();
                    for (_, ids) in &mut self.batch {
                        ids.clear();
                    }
                    for held in self.held.drain(..) {
                        held.settle();
                    }
                }
                Err(error) => {
                    let pending = self.pending();
                    if closed_at.is_some_and(|at| at.elapsed() >= give_up_after) {
                        tracing::error!(
                            error = &error as &dyn std::error::Error,
                            pending,
                            "giving up on acknowledgements at shutdown; these entries will be delivered again"
                        );
                        return;
                    }
                    let delay = backoff.next_delay();
                    // As the reader does: the first failure at WARN, the next ones at
                    // DEBUG until an acknowledgement goes through (one INFO line then).
                    if backoff.attempts() == 1 {
                        tracing::warn!(error = &error as &dyn std::error::Error, pending, retry_in = ?delay, "acknowledging failed; will retry, further failures at DEBUG until it works again");
                    } else {
                        tracing::debug!(error = &error as &dyn std::error::Error, pending, attempt = backoff.attempts(), retry_in = ?delay, "acknowledging failed again");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = close.cancelled(), if closed_at.is_none() => {
                            closed_at = Some(Instant::now());
                        }
                    }
                }
            }
        }
    }

    fn add(&mut self, (stream, id, held): Ack) {
        self.batch[stream].1.push(id);
        self.held.push(held);
    }

    fn pending(&self) -> usize {
        self.batch.iter().map(|(_, ids)| ids.len()).sum()
    }
}
