//! A snapshot of how a bus is doing, for a service's health endpoint.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How a bus is doing, from [`EventBus::health`](crate::EventBus::health).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// Whether Redis answered just now.
    pub connected: bool,
    /// Whether the bus is listening.
    pub listening: bool,
    /// How long ago the listener last read from Redis successfully (an idle read that
    /// found nothing counts, and so does each page of the entries this consumer held
    /// when it last stopped, which it reads again first); `None` before the first read.
    pub since_last_read: Option<Duration>,
    /// Each stream the bus handles, in registration order; empty when not connected.
    pub streams: Vec<StreamHealth>,
}

/// What the consumer group has left to do on one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamHealth {
    /// The stream.
    pub stream: String,
    /// Entries not yet delivered to the group (`None` when Redis cannot tell, e.g. after
    /// entries were deleted from the middle of the stream).
    pub lag: Option<u64>,
    /// Entries delivered to a consumer of the group and not acknowledged yet.
    pub pending: u64,
    /// How long the oldest pending entry has waited since its last delivery.
    pub oldest_pending_idle: Option<Duration>,
    /// Entries in the stream's dead-letter stream.
    pub dead_letters: u64,
    /// Dead letters deleted by the opt-in `dead_letter_max_len` cap, ever (kept in Redis
    /// next to the dead-letter stream, so every process reports the same count).
    pub dead_letters_trimmed: u64,
    /// Why this consumer has stopped reading new entries of the stream, if it has: every
    /// recent handler attempt failed. Retries go on, and reading resumes when one succeeds.
    pub paused: Option<String>,
    /// Entries of this consumer whose move to the dead-letter stream failed and is being
    /// tried again (their handler is not run again).
    pub dead_letter_moves_failing: u64,
    /// Why the stream is not being consumed (its key holds another Redis type), or why
    /// its state could not be read just now; `None` when all is well. When set, the
    /// counts above are those known, zero where none could be read.
    pub error: Option<String>,
}

/// The streams a listener has set aside because their key holds another Redis type, by
/// position in the bus's stream list, with the reason; shared between the listener and
/// `health()`.
#[derive(Debug)]
pub(crate) struct SetAside {
    reasons: Mutex<Vec<Option<String>>>,
}

impl SetAside {
    pub(crate) fn new(streams: usize) -> Self {
        SetAside {
            reasons: Mutex::new(vec![None; streams]),
        }
    }

    fn reasons(&self) -> std::sync::MutexGuard<'_, Vec<Option<String>>> {
        self.reasons
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets stream `index` aside for `reason`; `false` when it was set aside already.
    pub(crate) fn set(&self, index: usize, reason: String) -> bool {
        match self.reasons().get_mut(index) {
            Some(slot) => slot.replace(reason).is_none(),
            None => false,
        }
    }

    /// Takes stream `index` back; `false` when it was not set aside.
    pub(crate) fn clear(&self, index: usize) -> bool {
        self.reasons()
            .get_mut(index)
            .is_some_and(|slot| slot.take().is_some())
    }

    pub(crate) fn is_set(&self, index: usize) -> bool {
        self.reasons().get(index).is_some_and(Option::is_some)
    }

    /// Whether every stream is set aside.
    pub(crate) fn all(&self) -> bool {
        self.reasons().iter().all(Option::is_some)
    }

    /// Why stream `index` is set aside, if it is.
    pub(crate) fn reason(&self, index: usize) -> Option<String> {
        self.reasons().get(index).cloned().flatten()
    }
}

/// When the reader last read successfully, as milliseconds since `start` plus one (zero
/// for never), shared between the reader and `health()` without a lock.
#[derive(Debug)]
pub(crate) struct LastRead {
    start: Instant,
    millis: AtomicU64,
}

impl LastRead {
    pub(crate) fn new() -> Self {
        LastRead {
            start: Instant::now(),
            millis: AtomicU64::new(0),
        }
    }

    pub(crate) fn record(&self) {
        let since_start = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.millis
            .store(since_start.saturating_add(1), Ordering::Relaxed);
    }

    pub(crate) fn elapsed(&self) -> Option<Duration> {
        match self.millis.load(Ordering::Relaxed) {
            0 => None,
            millis => Some(
                self.start
                    .elapsed()
                    .saturating_sub(Duration::from_millis(millis - 1)),
            ),
        }
    }
}
