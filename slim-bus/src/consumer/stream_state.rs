//! What the consumer knows of each of its streams right now: the entries it holds, whether
//! reading is paused because attempts on several different entries failed in a row, and
//! dead-letter moves that fail.
//! `health()` reads it while the consumer writes it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::event::EntryId;

/// Once attempts on this many different entries failed in a row (handler errors,
/// timeouts, panics, with no success in between), the consumer stops reading new entries
/// of the stream. The retries of one entry never pause a stream, however many: one bad
/// payload says nothing about the handler, and pausing for it would keep the entries after
/// it waiting. Low enough that a consumer whose downstream is down takes little more than
/// one read from its group; far above what occasional failures produce (at 1% of entries
/// failing, five different ones in a row happen once in ten billion).
pub(crate) const PAUSE_AFTER_FAILED_ENTRIES: usize = 5;

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
    /// The different entries whose attempts failed since the last success, up to
    /// [`PAUSE_AFTER_FAILED_ENTRIES`].
    failed_entries: Mutex<Vec<EntryId>>,
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
        lock(&self.failed_entries).clear();
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
        lock(&self.failed_entries).clear();
        if self.paused.swap(false, Ordering::AcqRel) {
            *lock(&self.pause_reason) = None;
            tracing::info!(
                stream,
                "a handler attempt succeeded; reading new entries again"
            );
            self.resumed.notify_waiters();
        }
    }

    /// An attempt on entry `id` failed in a way that may heal (an error, a timeout, a
    /// panic): once attempts on [`PAUSE_AFTER_FAILED_ENTRIES`] different entries failed in
    /// a row, reading new entries pauses.
    pub(crate) fn record_failure(&self, stream: &str, id: EntryId, error: &str) {
        let failed_entries = {
            let mut failed = lock(&self.failed_entries);
            if !failed.contains(&id) && failed.len() < PAUSE_AFTER_FAILED_ENTRIES {
                failed.push(id);
            }
            failed.len()
        };
        if failed_entries < PAUSE_AFTER_FAILED_ENTRIES || self.paused.load(Ordering::Acquire) {
            return;
        }
        let reason = format!(
            "attempts on {failed_entries} different entries failed in a row; the last one: {error}"
        );
        tracing::warn!(
            stream,
            failed_entries,
            %error,
            "attempts on several different entries failed in a row: no new entries are read from this stream until one succeeds (retries go on)"
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
    /// test already), at once the first time, then as
    /// [`probe_read`](Self::probe_read) scheduled it after the last probe.
    pub(crate) fn take_probe(&self, now: Instant) -> bool {
        if self.held() > 0 {
            return false;
        }
        let mut probe = lock(&self.probe);
        let due = *probe.next_at.get_or_insert(now);
        now >= due
    }

    /// Schedules the next probe after the one that started at `started`. A probe that
    /// found an entry (which failed, or reading would have resumed) risked one more dead
    /// letter: the next one waits `first` (`retry_max`), then intervals that double up to
    /// [`MAX_PROBE_INTERVAL`], which keeps them few during a long outage. A probe that found
    /// nothing risked nothing, so the interval stays as it was and the stream is probed
    /// again `block_time` after this one started: a blocking probe (nothing else to read)
    /// is followed at once by the next, and a new entry of a quiet paused stream is seen
    /// within about `block_time`.
    pub(crate) fn probe_read(
        &self,
        started: Instant,
        found: bool,
        first: Duration,
        block_time: Duration,
    ) {
        let mut probe = lock(&self.probe);
        if found {
            let interval = probe.interval.unwrap_or(first);
            probe.next_at = Some(started + interval);
            probe.interval = Some((interval * 2).min(MAX_PROBE_INTERVAL.max(first)));
        } else {
            probe.next_at = Some(started + block_time);
        }
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

    fn entry(seq: u64) -> EntryId {
        EntryId::new(1, seq)
    }

    /// Pauses `state`: attempts on enough different entries fail.
    fn pause(state: &StreamState, error: &str) {
        for seq in 0..PAUSE_AFTER_FAILED_ENTRIES as u64 {
            state.record_failure("s", entry(seq), error);
        }
    }

    #[test]
    fn failures_on_different_entries_in_a_row_pause_and_one_success_resumes() {
        let state = StreamState::default();
        for seq in 1..PAUSE_AFTER_FAILED_ENTRIES as u64 {
            state.record_failure("s", entry(seq), "downstream refused");
        }
        assert!(!state.is_paused(), "fewer entries than the threshold");
        state.record_success("s");
        for seq in 1..PAUSE_AFTER_FAILED_ENTRIES as u64 {
            state.record_failure("s", entry(seq), "downstream refused");
        }
        assert!(
            !state.is_paused(),
            "a success in between starts the count again"
        );
        state.record_failure("s", entry(0), "downstream refused");
        assert!(state.is_paused());
        let reason = state.pause_reason().expect("paused with a reason");
        assert!(reason.contains("downstream refused"), "{reason}");
        assert!(reason.contains("different entries"), "{reason}");
        state.record_success("s");
        assert!(!state.is_paused());
        assert_eq!(state.pause_reason(), None);
    }

    #[test]
    fn the_retries_of_one_entry_never_pause() {
        let state = StreamState::default();
        for _ in 0..1_000 {
            state.record_failure("s", entry(7), "bad payload");
        }
        assert!(!state.is_paused());
        // Two poison entries retried in turn are still not several.
        for _ in 0..100 {
            state.record_failure("s", entry(8), "bad payload");
            state.record_failure("s", entry(7), "bad payload");
        }
        assert!(!state.is_paused());
    }

    #[test]
    fn a_paused_stream_is_probed_only_when_nothing_is_held_at_doubling_intervals() {
        let state = StreamState::default();
        pause(&state, "e");
        let first = Duration::from_secs(1);
        let block_time = Duration::from_millis(100);
        let paused_at = Instant::now();
        state.add_held();
        assert!(!state.take_probe(paused_at), "an entry is held");
        assert_eq!(state.next_probe(), None);
        state.remove_held();
        let probed_at = paused_at + first;
        assert!(state.take_probe(probed_at), "at once when nothing is held");
        state.probe_read(probed_at, true, first, block_time);
        assert!(!state.take_probe(probed_at), "one probe at a time");
        let second = probed_at + first;
        assert_eq!(state.next_probe(), Some(second));
        assert!(state.take_probe(second));
        state.probe_read(second, true, first, block_time);
        assert_eq!(
            state.next_probe(),
            Some(second + first * 2),
            "the interval doubles after a probe that found an entry"
        );
    }

    #[test]
    fn a_probe_that_found_nothing_does_not_grow_the_interval() {
        let state = StreamState::default();
        pause(&state, "e");
        let first = Duration::from_secs(1);
        let block_time = Duration::from_millis(100);
        let mut now = Instant::now();
        assert!(state.take_probe(now));
        state.probe_read(now, true, first, block_time);
        now += first;
        for _ in 0..10 {
            assert!(state.take_probe(now));
            state.probe_read(now, false, first, block_time);
            assert_eq!(
                state.next_probe(),
                Some(now + block_time),
                "an empty probe is followed by the next one a block time later"
            );
            now += block_time;
        }
        assert!(state.take_probe(now));
        state.probe_read(now, true, first, block_time);
        assert_eq!(
            state.next_probe(),
            Some(now + first * 2),
            "the empty probes left the interval as the last probe that found an entry made it"
        );
    }
}
