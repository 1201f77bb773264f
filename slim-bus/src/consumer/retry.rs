//! Entries waiting for their retry: failed deliveries that stay pending with this consumer
//! until their backoff has passed, holding no handler slot meanwhile.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::event::EntryId;

/// A failed delivery to run again at `due`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RetryRequest {
    pub(crate) due: Instant,
    pub(crate) stream_index: usize,
    pub(crate) id: EntryId,
    /// The delivery count of the attempt that failed.
    pub(crate) delivery_count: u64,
    /// When this consumer got the entry for that attempt.
    pub(crate) delivered_at: Instant,
}

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

    use super::*;

    fn request(due: Instant, seq: u64) -> RetryRequest {
        RetryRequest {
            due,
            stream_index: 0,
            id: EntryId::new(1, seq),
            delivery_count: 1,
            delivered_at: due,
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
}
