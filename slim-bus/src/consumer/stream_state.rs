//! What the consumer knows of each of its streams right now: the entries it holds, whether
//! reading is paused because every recent attempt failed, and dead-letter moves that fail.
//! `health()` reads it while the consumer writes it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// After this many attempts in a row that failed (handler errors, timeouts, panics), the
/// consumer stops reading new entries of the stream. Low enough that a consumer whose
/// downstream is down takes little more than one read from its group; far above what
/// occasional failures produce (at 1% of attempts failing, five in a row happen once in
/// ten billion attempts).
pub(crate) const PAUSE_AFTER_FAILURES: u32 = 5;

/// The longest wait between two probes of a paused stream.
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(300);

/// When a paused stream is read for one entry next.
#[derive(Debug, Default)]
struct Probe {
    next_at: Option<Instant>,
    interval: Option<Duration>,
}

/// The live state of one stream, shared by the consumer and `health()`.
#[derive(Debug, Default)]
pub(crate) struct StreamState {
    /// Entries of the stream this consumer holds pending (see `InFlight`).
    held: AtomicUsize,
    failures_in_a_row: AtomicU32,
    paused: AtomicBool,
    /// Why reading is paused; set while `paused` is.
    pause_reason: Mutex<Option<String>>,
    /// When the paused reader may next read one entry to see whether the handler
    /// recovered, and how long it waits after that one.
    probe: Mutex<Probe>,
    /// Entries whose dead-letter move failed and is being retried.
    dead_letter_moves_failing: AtomicU64,
    /// The error of the last failed dead-letter move, while any is being retried.
    dead_letter_move_error: Mutex<Option<String>>,
    /// Told when reading should resume.
    resumed: Notify,
}

impl StreamState {
    /// Forgets the state of an earlier listening run.
    pub(crate) fn reset(&self) {
        self.failures_in_a_row.store(0, Ordering::Relaxed);
        self.paused.store(false, Ordering::Relaxed);
        *lock(&self.pause_reason) = None;
    }

    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    pub(crate) fn add_held(&self) {
        self.held.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn remove_held(&self) {
        self.held.fetch_sub(1, Ordering::Relaxed);
    }

    /// An attempt succeeded: reading resumes if it was paused.
    pub(crate) fn record_success(&self, stream: &str) {
        self.failures_in_a_row.store(0, Ordering::Relaxed);
        if self.paused.swap(false, Ordering::AcqRel) {
            *lock(&self.pause_reason) = None;
            tracing::info!(
                stream,
                "a handler attempt succeeded; reading new entries again"
            );
            self.resumed.notify_waiters();
        }
    }

    /// An attempt failed in a way that may heal (an error, a timeout, a panic): after
    /// [`PAUSE_AFTER_FAILURES`] in a row, reading new entries pauses.
    pub(crate) fn record_failure(&self, stream: &str, error: &str) {
        let failures = self
            .failures_in_a_row
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures < PAUSE_AFTER_FAILURES || self.paused.load(Ordering::Acquire) {
            return;
        }
        let reason = format!("the last {failures} handler attempts failed; the last one: {error}");
        tracing::warn!(
            stream,
            failures,
            %error,
            "every recent handler attempt failed: no new entries are read from this stream until one succeeds (retries go on)"
        );
        *lock(&self.pause_reason) = Some(reason);
        *lock(&self.probe) = Probe::default();
        self.paused.store(true, Ordering::Release);
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Why reading is paused, if it is.
    pub(crate) fn pause_reason(&self) -> Option<String> {
        if self.is_paused() {
            lock(&self.pause_reason).clone()
        } else {
            None
        }
    }

    /// Whether a paused stream may be read for one entry now, to see whether the handler
    /// recovered: only when the consumer holds none of its entries (each retry is such a
    /// test already), and no sooner than `first` after the pause, then at intervals that
    /// double up to [`MAX_PROBE_INTERVAL`]. Each probe that fails is one more entry
    /// dead-lettered in the end; the doubling keeps them few during a long outage.
    pub(crate) fn take_probe(&self, now: Instant, first: Duration) -> bool {
        if self.held() > 0 {
            return false;
        }
        let mut probe = lock(&self.probe);
        let due = *probe.next_at.get_or_insert(now + first);
        if now < due {
            return false;
        }
        let interval = probe.interval.unwrap_or(first);
        probe.next_at = Some(now + interval);
        probe.interval = Some((interval * 2).min(MAX_PROBE_INTERVAL.max(first)));
        true
    }

    /// When the next probe may be taken, if the stream is paused, none of its entries is
    /// held, and that time is known.
    pub(crate) fn next_probe(&self) -> Option<Instant> {
        if !self.is_paused() || self.held() > 0 {
            return None;
        }
        lock(&self.probe).next_at
    }

    /// Resolves when reading resumes.
    pub(crate) async fn resumed(&self) {
        self.resumed.notified().await;
    }

    pub(crate) fn dead_letter_moves_failing(&self) -> u64 {
        self.dead_letter_moves_failing.load(Ordering::Relaxed)
    }

    pub(crate) fn add_failing_move(&self) {
        self.dead_letter_moves_failing
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn remove_failing_move(&self) {
        let mut error = lock(&self.dead_letter_move_error);
        if self
            .dead_letter_moves_failing
            .fetch_sub(1, Ordering::Relaxed)
            == 1
        {
            *error = None;
        }
    }

    /// A dead-letter move failed with `error` (with its causes), shown by `health()` while
    /// moves are failing.
    pub(crate) fn move_failed(&self, error: String) {
        *lock(&self.dead_letter_move_error) = Some(error);
    }

    pub(crate) fn dead_letter_move_error(&self) -> Option<String> {
        if self.dead_letter_moves_failing() == 0 {
            return None;
        }
        lock(&self.dead_letter_move_error).clone()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values stay consistent whatever a panicking holder did.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_in_a_row_pause_and_one_success_resumes() {
        let state = StreamState::default();
        for _ in 1..PAUSE_AFTER_FAILURES {
            state.record_failure("s", "downstream refused");
        }
        assert!(!state.is_paused(), "fewer failures than the threshold");
        state.record_success("s");
        for _ in 1..PAUSE_AFTER_FAILURES {
            state.record_failure("s", "downstream refused");
        }
        assert!(
            !state.is_paused(),
            "a success in between starts the count again"
        );
        state.record_failure("s", "downstream refused");
        assert!(state.is_paused());
        let reason = state.pause_reason().expect("paused with a reason");
        assert!(reason.contains("downstream refused"), "{reason}");
        state.record_success("s");
        assert!(!state.is_paused());
        assert_eq!(state.pause_reason(), None);
    }

    #[test]
    fn a_paused_stream_is_probed_only_when_nothing_is_held_at_doubling_intervals() {
        let state = StreamState::default();
        for _ in 0..PAUSE_AFTER_FAILURES {
            state.record_failure("s", "e");
        }
        let first = Duration::from_secs(1);
        let paused_at = Instant::now();
        assert!(!state.take_probe(paused_at, first), "not at once");
        state.add_held();
        assert!(
            !state.take_probe(paused_at + first, first),
            "an entry is held"
        );
        state.remove_held();
        assert!(state.take_probe(paused_at + first, first));
        assert!(
            !state.take_probe(paused_at + first, first),
            "one probe at a time"
        );
        let second = paused_at + first * 2;
        assert_eq!(state.next_probe(), Some(second));
        assert!(state.take_probe(second, first));
        assert_eq!(
            state.next_probe(),
            Some(second + first * 2),
            "the interval doubles"
        );
    }
}
