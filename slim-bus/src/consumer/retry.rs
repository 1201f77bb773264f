//! Entries waiting for their retry: failed deliveries that stay pending with this consumer
//! until their backoff has passed, holding no handler slot meanwhile (but their place
//! among the held entries).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::in_flight::Held;
use crate::event::EntryId;

/// A failed delivery to run again at `due`.
#[derive(Debug)]
pub(crate) struct RetryRequest {
    pub(crate) due: Instant,
    pub(crate) stream_index: usize,
    pub(crate) id: EntryId,
    /// The delivery count of the attempt that failed.
    pub(crate) delivery_count: u64,
    /// The entry's place among those this consumer holds.
    pub(crate) held: Held,
}

impl PartialEq for RetryRequest {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for RetryRequest {}

impl Ord for RetryRequest {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.stream_index, self.id).cmp(&(other.due, other.stream_index, other.id))
    }
}

impl PartialOrd for RetryRequest {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// When the reader's blocking read returns on its own, while one is on the wire.
#[derive(Debug, Default)]
pub(crate) struct BlockedRead(Mutex<Option<Instant>>);

impl BlockedRead {
    pub(crate) fn set(&self, until: Option<Instant>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = until;
    }

    /// Whether a blocking read is on the wire that returns after `at`.
    pub(crate) fn returns_after(&self, at: Instant) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|until| until > at)
    }
}

/// Retry requests from handler tasks, ordered by when they are due.
pub(crate) struct RetryQueue {
    incoming: mpsc::UnboundedReceiver<RetryRequest>,
    waiting: BinaryHeap<Reverse<RetryRequest>>,
}

impl RetryQueue {
    pub(crate) fn new(incoming: mpsc::UnboundedReceiver<RetryRequest>) -> Self {
        RetryQueue {
            incoming,
            waiting: BinaryHeap::new(),
        }
    }

    /// Takes in the requests handler tasks have sent since the last call.
    pub(crate) fn collect(&mut self) {
        while let Ok(request) = self.incoming.try_recv() {
            self.waiting.push(Reverse(request));
        }
    }

    /// Waits for the next request from a handler task and takes it in. Never resolves
    /// once every sender is gone.
    pub(crate) async fn wait_incoming(&mut self) {
        match self.incoming.recv().await {
            Some(request) => self.waiting.push(Reverse(request)),
            None => std::future::pending().await,
        }
    }

    pub(crate) fn push(&mut self, request: RetryRequest) {
        self.waiting.push(Reverse(request));
    }

    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.waiting.peek().map(|Reverse(r)| r.due)
    }

    /// How many requests wait, due or not.
    pub(crate) fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Removes and returns up to `limit` requests due at `now`, earliest first.
    pub(crate) fn pop_due(&mut self, now: Instant, limit: usize) -> Vec<RetryRequest> {
        let mut due = Vec::new();
        while due.len() < limit {
            match self.waiting.peek() {
                Some(Reverse(r)) if r.due <= now => {
                    if let Some(Reverse(r)) = self.waiting.pop() {
                        due.push(r);
                    }
                }
                _ => break,
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use std::sync::Arc;

    use tokio::sync::Semaphore;

    use super::*;
    use crate::consumer::keep_fresh::{HeldId, HeldIds};

    fn request(due: Instant, seq: u64) -> RetryRequest {
        let permit = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("a fresh semaphore has a permit");
        RetryRequest {
            due,
            stream_index: 0,
            id: EntryId::new(1, seq),
            delivery_count: 1,
            held: Held::new(
                permit,
                Arc::default(),
                HeldId::register(&Arc::new(HeldIds::new(1)), 0, EntryId::new(1, seq), due)
                    .expect("a fresh registry holds nothing"),
            ),
        }
    }

    #[test]
    fn due_requests_come_out_earliest_first_and_no_more_than_asked() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut queue = RetryQueue::new(rx);
        let now = Instant::now();
        tx.send(request(now + Duration::from_secs(5), 1))
            .expect("the queue is open");
        tx.send(request(now, 2)).expect("the queue is open");
        tx.send(request(now - Duration::from_secs(1), 3))
            .expect("the queue is open");
        queue.collect();
        assert_eq!(queue.next_due(), Some(now - Duration::from_secs(1)));
        assert_eq!(queue.len(), 3);
        let first = queue.pop_due(now, 1);
        assert_eq!(first.iter().map(|r| r.id.seq()).collect::<Vec<_>>(), [3]);
        let rest = queue.pop_due(now, 10);
        assert_eq!(rest.iter().map(|r| r.id.seq()).collect::<Vec<_>>(), [2]);
        assert_eq!(queue.next_due(), Some(now + Duration::from_secs(5)));
        assert!(queue.pop_due(now, 10).is_empty(), "only two were due");
        assert_eq!(queue.len(), 1);
    }

    #[test]
    fn only_a_retry_due_before_the_blocking_read_returns_wakes_the_reader() {
        let blocked = BlockedRead::default();
        let now = Instant::now();
        assert!(!blocked.returns_after(now), "no read is blocking");
        blocked.set(Some(now + Duration::from_secs(2)));
        assert!(blocked.returns_after(now + Duration::from_secs(1)));
        assert!(!blocked.returns_after(now + Duration::from_secs(3)));
        blocked.set(None);
        assert!(!blocked.returns_after(now));
    }
}
