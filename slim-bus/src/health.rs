//! A snapshot of how a bus is doing, for a service's health endpoint.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// How a bus is doing, from [`EventBus::health`](crate::EventBus::health).
///
/// # States
///
/// - **not connected** (Redis did not answer the `PING` of this call): `connected` is
///   `false` and `streams` is empty; `listening` and `since_last_read` still describe the
///   listener, which goes on trying to reconnect.
/// - **not listening** (no [`listen`](crate::EventBus::listen) yet, e.g. a bus that only
///   publishes, or a `listen()` that is still waiting for Redis): `listening` is `false`
///   and `since_last_read` is `None`; `streams` still shows each handled stream's group as
///   Redis sees it.
/// - **stopped** (the listener was shut down, or ended on an error it cannot recover
///   from): `listening` is `false` and `since_last_read` keeps growing from the last read.
/// - **waiting to listen** (a [`listen`](crate::EventBus::listen) that has not returned
///   yet, waiting for Redis with [`wait_for_redis`](crate::EventBusBuilder::wait_for_redis)
///   or for the lease of the consumer name to lapse): `listening` is `false`, `waiting_for`
///   says what `listen()` waits for and `last_error` why it is still waiting.
///
/// # Serialization
///
/// Serializes (with `serde`) to the JSON a health endpoint serves. Durations are whole
/// milliseconds, in fields named with a `_ms` suffix (`since_last_read_ms`,
/// `read_stall_after_ms`, `oldest_pending_idle_ms`); `None` is `null`. The other fields
/// keep their Rust names.
///
/// # Examples
///
/// ```no_run
/// # async fn probe(bus: slim_bus::EventBus) -> serde_json::Result<()> {
/// let health = bus.health().await;
/// let status = if health.is_ready() { 200 } else { 503 };
/// let body = serde_json::to_string(&health)?;
/// # let _ = (status, body);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Health {
    /// Whether Redis answered just now; `false` when it did not within `command_timeout`.
    pub connected: bool,
    /// Whether the bus is listening: `true` from a successful
    /// [`listen`](crate::EventBus::listen) until the listener stops (shut down, or ended by
    /// an error it cannot recover from); `false` before and after, and while `listen()`
    /// still waits for Redis ([`wait_for_redis`](crate::EventBusBuilder::wait_for_redis)).
    pub listening: bool,
    /// How long ago the listener last read from Redis successfully (an idle read that
    /// found nothing counts, and so does each page of the entries this consumer held
    /// when it last stopped, which it reads again first); `None` before the first read.
    /// While not connected it grows, and after the listener stopped it keeps growing from
    /// its last read.
    ///
    /// A listener that chose not to read (see [`StreamHealth::paused`]) lets it grow while
    /// it is alive: [`is_live`](Self::is_live) watches
    /// [`since_last_turn`](Self::since_last_turn) instead.
    #[serde(rename = "since_last_read_ms", serialize_with = "millis")]
    pub since_last_read: Option<Duration>,
    /// How long ago the listener's read loop last went round: a successful read, or a wait
    /// it chose instead of reading (every stream paused, every `max_in_flight` place taken
    /// by entries waiting for their retry, a probe not due yet), each such wait no longer
    /// than the block time. `None` before the first; it grows like `since_last_read` while
    /// Redis does not answer (failed reads do not count) and after the listener stopped.
    #[serde(rename = "since_last_turn_ms", serialize_with = "millis")]
    pub since_last_turn: Option<Duration>,
    /// How long without a turn of the read loop ([`since_last_turn`](Self::since_last_turn))
    /// [`is_live`](Self::is_live) takes for a stuck listener while Redis answers: twice the
    /// block time and the command timeout, plus the longest handler timeout (while every
    /// handler slot is busy, the listener waits for one). The same in every state.
    #[serde(rename = "read_stall_after_ms", serialize_with = "millis_always")]
    pub read_stall_after: Duration,
    /// Each stream the bus handles, in registration order; empty when not connected, and
    /// for a bus without a consumer group.
    pub streams: Vec<StreamHealth>,
    /// While a [`listen`](crate::EventBus::listen) waits before it listens, what it waits
    /// for: `"redis"` (a server that does not answer or is loading its data, see
    /// [`wait_for_redis`](crate::EventBusBuilder::wait_for_redis)) or `"consumer_lease"`
    /// (the lease of the consumer name, left by a process that stopped, to lapse); `None`
    /// otherwise. Refused credentials and other errors waiting cannot fix are not waited
    /// for: `listen()` fails with them.
    pub waiting_for: Option<&'static str>,
    /// While `waiting_for` is set, the error of the last attempt (with its causes), or who
    /// holds the consumer name's lease; `None` otherwise.
    pub last_error: Option<String>,
}

impl Health {
    /// Whether the bus can do its work now: Redis answered, and no handled stream has an
    /// [`error`](StreamHealth::error) (a key of another type, or a state that could not be
    /// read). Made for a readiness probe: an unready instance should get no traffic, but
    /// restarting it would not help.
    pub fn is_ready(&self) -> bool {
        self.connected && self.streams.iter().all(|stream| stream.error.is_none())
    }

    /// Whether the listener is alive: it is listening, and, while Redis answers, its read
    /// loop went round within [`read_stall_after`](Self::read_stall_after) (or has not yet,
    /// just after `listen`).
    ///
    /// A listener that chose not to read is alive: reading paused because attempts on
    /// several different entries failed ([`StreamHealth::paused`]), every `max_in_flight`
    /// place taken by entries waiting for their retry, or waiting for the next probe of a
    /// paused stream. Each of those waits ends within the block time, and the loop goes
    /// round, so a long pause never turns a liveness probe red (a restart would only take
    /// a fresh batch to fail and dead-letter). Not live are a listener that stopped (shut
    /// down, or ended on an error), and one whose read loop is stuck, or whose reads fail,
    /// while Redis answers. A Redis outage alone does not make the bus not live, since
    /// restarting the process would not bring Redis back. Made for a liveness probe; a bus
    /// that only publishes is never live (use [`is_ready`](Self::is_ready)).
    pub fn is_live(&self) -> bool {
        let stalled = self.connected
            && self
                .since_last_turn
                .is_some_and(|since| since > self.read_stall_after);
        self.listening && !stalled
    }
}

/// What the consumer group has left to do on one stream.
///
/// Present only while Redis answers (see [`Health::streams`]); before `listen` and after
/// the listener stopped it shows the group as Redis sees it (zero counts when the group
/// does not exist yet). Serializes as [`Health`] does: `oldest_pending_idle_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StreamHealth {
    /// The stream.
    pub stream: String,
    /// Entries in the stream, handled or not: what it takes of Redis' memory, next to
    /// `lag`. Zero when the group does not exist yet. It only shrinks when something
    /// trims the stream (see the README's "Retention").
    pub length: u64,
    /// Entries not yet delivered to the group (`None` when Redis cannot tell, e.g. after
    /// entries were deleted from the middle of the stream, or when the group does not
    /// exist yet).
    pub lag: Option<u64>,
    /// Entries delivered to a consumer of the group and not acknowledged yet, by every
    /// consumer of the group (so also those a stopped listener left pending).
    pub pending: u64,
    /// How long the longest-idle pending entry has waited since its last delivery (a
    /// handler that runs long, a consumer that died holding it), among the 100 pending
    /// entries with the lowest ids (all of them when no more are pending: Redis lists a
    /// pending list by id only); `None` when nothing is pending.
    #[serde(rename = "oldest_pending_idle_ms", serialize_with = "millis")]
    pub oldest_pending_idle: Option<Duration>,
    /// Entries in the stream's dead-letter stream, whatever the listener's state.
    pub dead_letters: u64,
    /// Dead letters deleted by the opt-in `dead_letter_max_len` cap, ever (kept in Redis
    /// next to the dead-letter stream, so every process reports the same count).
    pub dead_letters_trimmed: u64,
    /// Why this consumer has stopped reading new entries of the stream, if it has:
    /// attempts on five different entries failed in a row, with no success in between
    /// (the retries of one entry, however many, never pause a stream). Retries go on, and
    /// reading resumes when one succeeds. While nothing of the stream is held, it is probed
    /// for one entry, a blocking read when no other stream is read: at once the first
    /// time and after a probe that found nothing (so a new entry on a quiet paused stream
    /// is seen within about the block time), at intervals from `retry_max` doubling up to
    /// 5 minutes after probes whose entry failed. `None` before the first `listen`; after
    /// the listener stopped, as it was then.
    ///
    /// A paused listener is alive: [`Health::is_live`] stays `true` however long the pause
    /// lasts, while its read loop goes round (see
    /// [`since_last_turn`](Health::since_last_turn)).
    pub paused: Option<String>,
    /// Entries of this consumer whose move to the dead-letter stream failed and is being
    /// tried again (their handler is not run again); zero when not listening.
    pub dead_letter_moves_failing: u64,
    /// Why the stream is not being consumed (its key holds another Redis type), why
    /// its state could not be read just now, or, while `dead_letter_moves_failing` is not
    /// zero, the error of the last failed move (naming the dead-letter key, e.g. a
    /// `NOPERM`); `None` when all is well. When set, the
    /// counts above are those known, zero where none could be read.
    pub error: Option<String>,
}

fn millis<S: serde::Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => millis_always(duration, serializer),
        None => serializer.serialize_none(),
    }
}

fn millis_always<S: serde::Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
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

/// What a `listen()` in progress waits for, and the last error of its wait, shared with
/// `health()`.
#[derive(Debug, Default)]
pub(crate) struct StartupWait(Mutex<Option<(&'static str, String)>>);

impl StartupWait {
    /// `listen()` waits for `what` after `error`.
    pub(crate) fn waiting(&self, what: &'static str, error: String) {
        *self.lock() = Some((what, error));
    }

    /// `listen()` waits no more (it listens, or failed).
    pub(crate) fn done(&self) {
        *self.lock() = None;
    }

    pub(crate) fn get(&self) -> (Option<&'static str>, Option<String>) {
        match &*self.lock() {
            Some((what, error)) => (Some(what), Some(error.clone())),
            None => (None, None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(&'static str, String)>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// When the reader last read successfully, and when its loop last went round (a read, or
/// a wait it chose), shared between the reader and `health()` without a lock.
#[derive(Debug)]
pub(crate) struct LastRead {
    start: Instant,
    read: Moment,
    turn: Moment,
}

impl LastRead {
    pub(crate) fn new() -> Self {
        LastRead {
            start: Instant::now(),
            read: Moment::default(),
            turn: Moment::default(),
        }
    }

    /// A read succeeded: the read loop went round as well.
    pub(crate) fn record(&self) {
        self.read.record(self.start);
        self.turn.record(self.start);
    }

    /// The read loop went round without reading, by choice: it waited (reading paused,
    /// every place taken, a probe not due), for no longer than a blocking read.
    pub(crate) fn record_turn(&self) {
        self.turn.record(self.start);
    }

    pub(crate) fn elapsed(&self) -> Option<Duration> {
        self.read.elapsed(self.start)
    }

    pub(crate) fn since_turn(&self) -> Option<Duration> {
        self.turn.elapsed(self.start)
    }
}

/// A moment as milliseconds since a start plus one (zero for never).
#[derive(Debug, Default)]
struct Moment(AtomicU64);

impl Moment {
    fn record(&self, start: Instant) {
        let since_start = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0
            .store(since_start.saturating_add(1), Ordering::Relaxed);
    }

    fn elapsed(&self, start: Instant) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            millis => Some(
                start
                    .elapsed()
                    .saturating_sub(Duration::from_millis(millis - 1)),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(connected: bool, listening: bool, since_last_turn: Option<u64>) -> Health {
        Health {
            connected,
            listening,
            since_last_read: since_last_turn.map(Duration::from_millis),
            since_last_turn: since_last_turn.map(Duration::from_millis),
            read_stall_after: Duration::from_millis(1000),
            streams: Vec::new(),
            waiting_for: None,
            last_error: None,
        }
    }

    #[test]
    fn live_while_listening_unless_reads_stall_while_redis_answers() {
        assert!(health(true, true, None).is_live());
        assert!(health(true, true, Some(1000)).is_live());
        assert!(!health(true, true, Some(1001)).is_live());
        // An outage: restarting would not help.
        assert!(health(false, true, Some(60_000)).is_live());
        assert!(!health(true, false, Some(10)).is_live());
        assert!(!health(false, false, None).is_live());
    }

    #[test]
    fn live_while_the_loop_turns_however_long_since_the_last_read() {
        let mut paused = health(true, true, Some(10));
        paused.since_last_read = Some(Duration::from_secs(3_600));
        assert!(paused.is_live(), "a deliberate wait is alive");
        paused.since_last_turn = Some(Duration::from_millis(1001));
        assert!(!paused.is_live(), "a loop that stopped turning is stuck");
    }

    #[test]
    fn ready_when_redis_answers_and_no_stream_has_an_error() {
        let mut ready = health(true, false, None);
        ready.streams.push(StreamHealth {
            stream: "s".into(),
            length: 0,
            lag: Some(0),
            pending: 0,
            oldest_pending_idle: None,
            dead_letters: 0,
            dead_letters_trimmed: 0,
            paused: None,
            dead_letter_moves_failing: 0,
            error: None,
        });
        assert!(ready.is_ready());
        assert!(!health(false, true, None).is_ready());
        let mut wrong_type = ready.clone();
        wrong_type.streams[0].error = Some("WRONGTYPE".into());
        assert!(!wrong_type.is_ready());
    }

    #[test]
    fn serializes_durations_as_milliseconds() {
        let mut snapshot = health(true, true, Some(1500));
        snapshot.streams.push(StreamHealth {
            stream: "orders".into(),
            length: 7,
            lag: None,
            pending: 2,
            oldest_pending_idle: Some(Duration::from_micros(2_500_900)),
            dead_letters: 1,
            dead_letters_trimmed: 0,
            paused: Some("the handler timed out".into()),
            dead_letter_moves_failing: 0,
            error: None,
        });
        let json = serde_json::to_value(&snapshot).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "connected": true,
                "waiting_for": null,
                "last_error": null,
                "listening": true,
                "since_last_read_ms": 1500,
                "since_last_turn_ms": 1500,
                "read_stall_after_ms": 1000,
                "streams": [{
                    "stream": "orders",
                    "length": 7,
                    "lag": null,
                    "pending": 2,
                    "oldest_pending_idle_ms": 2500,
                    "dead_letters": 1,
                    "dead_letters_trimmed": 0,
                    "paused": "the handler timed out",
                    "dead_letter_moves_failing": 0,
                    "error": null,
                }],
                "waiting_for": null,
                "last_error": null,
            })
        );
    }
}
