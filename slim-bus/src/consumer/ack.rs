//! Batched acknowledgements: one `XACK` per stream per flush, all streams in one round trip.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::broker::Broker;
use crate::event::EntryId;

use super::backoff::Backoff;

/// Acks are flushed as soon as one arrives; while a flush is on the wire the next ones
/// gather, so the batch size follows the load without a timer. The cap bounds one command.
const MAX_ACKS_PER_FLUSH: usize = 4096;

/// Sends the ack of one handled entry to the acker.
#[derive(Clone)]
pub(crate) struct AckSender(mpsc::UnboundedSender<(usize, EntryId)>);

impl AckSender {
    pub(crate) fn ack(&self, stream_index: usize, id: EntryId) {
        // The acker outlives every handler task, so the channel is open while acks come.
        let _ = self.0.send((stream_index, id));
    }
}

pub(crate) struct Acker {
    broker: Arc<dyn Broker>,
    group: Arc<str>,
    batch: Vec<(Arc<str>, Vec<EntryId>)>,
    receiver: mpsc::UnboundedReceiver<(usize, EntryId)>,
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
            receiver,
        };
        (acker, AckSender(sender))
    }

    /// Flushes acks until every [`AckSender`] is dropped and all acks are sent, or until
    /// `give_up` fires after the senders are gone and Redis still refuses them.
    pub(crate) async fn run(mut self, give_up_after: Duration) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut closed_at: Option<Instant> = None;
        loop {
            if self.pending() == 0 {
                match self.receiver.recv().await {
                    Some((stream, id)) => self.batch[stream].1.push(id),
                    None => return,
                }
            }
            let mut taken = self.pending();
            while taken < MAX_ACKS_PER_FLUSH {
                match self.receiver.try_recv() {
                    Ok((stream, id)) => {
                        self.batch[stream].1.push(id);
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
                    backoff.reset();
                    for (_, ids) in &mut self.batch {
                        ids.clear();
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
                    tracing::warn!(error = &error as &dyn std::error::Error, pending, retry_in = ?delay, "acknowledging failed; will retry");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn pending(&self) -> usize {
        self.batch.iter().map(|(_, ids)| ids.len()).sum()
    }
}
