//! The bus's metrics, emitted through the `metrics` facade: names, labels, descriptions,
//! and the handles deliveries update.
//!
//! Names follow the OpenTelemetry messaging metrics (`messaging.client.consumed.messages`,
//! `messaging.process.duration`, ...) written the Prometheus way: a `slim_bus_` prefix,
//! underscores, and the unit in the name. Labels are the OpenTelemetry attribute names
//! with underscores (`messaging_destination_name`, `messaging_consumer_group_name`) and
//! small fixed sets of words (`outcome`, `reason`).

use std::time::{Duration, SystemTime};

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};

use crate::dead_letter::DeadLetterReason;
use crate::event::EntryId;
use crate::health::StreamHealth;

/// The label holding the stream (OpenTelemetry's `messaging.destination.name`).
pub(crate) const DESTINATION: &str = "messaging_destination_name";
/// The label holding the consumer group (`messaging.consumer.group.name`).
pub(crate) const GROUP: &str = "messaging_consumer_group_name";

pub(crate) const CONSUMED: &str = "slim_bus_consumed_messages_total";
pub(crate) const RETRIED: &str = "slim_bus_retried_messages_total";
pub(crate) const DEAD_LETTERED: &str = "slim_bus_dead_lettered_messages_total";
pub(crate) const CLAIMED: &str = "slim_bus_claimed_messages_total";
pub(crate) const SENT: &str = "slim_bus_sent_messages_total";
pub(crate) const SEND_FAILURES: &str = "slim_bus_send_failures_total";
pub(crate) const PROCESS_DURATION: &str = "slim_bus_process_duration_seconds";
pub(crate) const DELIVERY_DELAY: &str = "slim_bus_delivery_delay_seconds";
pub(crate) const SEND_DURATION: &str = "slim_bus_send_duration_seconds";
pub(crate) const IN_FLIGHT: &str = "slim_bus_in_flight_messages";
pub(crate) const LAG: &str = "slim_bus_lag_messages";
pub(crate) const PENDING: &str = "slim_bus_pending_messages";
pub(crate) const OLDEST_PENDING_AGE: &str = "slim_bus_oldest_pending_age_seconds";
pub(crate) const DEAD_LETTERS: &str = "slim_bus_dead_letters_messages";
pub(crate) const STREAM_LENGTH: &str = "slim_bus_stream_length_messages";
pub(crate) const TRIMMED: &str = "slim_bus_trimmed_messages_total";

/// How often a listening bus refreshes the per-stream gauges on its own (`health()`
/// refreshes them too).
pub(crate) const GAUGE_REFRESH: Duration = Duration::from_secs(15);

/// Describes every metric to the installed recorder; called when a bus is built, so an
/// exporter installed before that shows the help texts.
pub(crate) fn describe() {
    describe_counter!(
        CONSUMED,
        Unit::Count,
        "Handler attempts that ended, by stream, group and outcome (ok, error, timeout, panic, decode)"
    );
    describe_counter!(
        RETRIED,
        Unit::Count,
        "Failed attempts scheduled for a retry, by stream and group"
    );
    describe_counter!(
        DEAD_LETTERED,
        Unit::Count,
        "Entries moved to their dead-letter stream, by stream, group and reason"
    );
    describe_counter!(
        CLAIMED,
        Unit::Count,
        "Entries claimed from stopped consumers of the group, by stream and group"
    );
    describe_counter!(SENT, Unit::Count, "Entries published, by stream");
    describe_counter!(
        SEND_FAILURES,
        Unit::Count,
        "Publishes that failed, by stream"
    );
    describe_histogram!(
        PROCESS_DURATION,
        Unit::Seconds,
        "How long handler attempts took, by stream and group"
    );
    describe_histogram!(
        DELIVERY_DELAY,
        Unit::Seconds,
        "From the time in the entry id to the handler's start, by stream and group"
    );
    describe_histogram!(
        SEND_DURATION,
        Unit::Seconds,
        "Publish round trips, by stream"
    );
    describe_gauge!(
        IN_FLIGHT,
        Unit::Count,
        "Handlers running now, by stream and group"
    );
    describe_gauge!(
        LAG,
        Unit::Count,
        "Entries not yet delivered to the group, by stream and group; NaN when Redis cannot tell"
    );
    describe_gauge!(
        PENDING,
        Unit::Count,
        "Entries delivered and not acknowledged, by stream and group"
    );
    describe_gauge!(
        OLDEST_PENDING_AGE,
        Unit::Seconds,
        "How long the longest-idle pending entry has waited since its last delivery (among the 100 lowest pending ids), by stream and group"
    );
    describe_gauge!(
        DEAD_LETTERS,
        Unit::Count,
        "Entries in the stream's dead-letter stream, by stream and group"
    );
    describe_gauge!(
        STREAM_LENGTH,
        Unit::Count,
        "Entries in the stream, by stream and group"
    );
    describe_counter!(
        TRIMMED,
        Unit::Count,
        "Entries deleted by trim_acked because every consumer group acknowledged them, by stream"
    );
}

/// How a handler attempt ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    Ok,
    Error,
    Timeout,
    Panic,
    Decode,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::Error,
        Outcome::Timeout,
        Outcome::Panic,
        Outcome::Decode,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::Panic => "panic",
            Outcome::Decode => "decode",
        }
    }
}

const REASONS: [DeadLetterReason; 5] = [
    DeadLetterReason::Decode,
    DeadLetterReason::Handler,
    DeadLetterReason::Timeout,
    DeadLetterReason::Panic,
    DeadLetterReason::Permanent,
];

/// The handles of one stream's consumer metrics, registered once when listening starts:
/// the deliveries only update them (with no recorder installed, a no-op).
pub(crate) struct StreamMetrics {
    consumed: [Counter; 5],
    retried: Counter,
    dead_lettered: [Counter; 5],
    process_duration: Histogram,
    delivery_delay: Histogram,
    pub(crate) in_flight: Gauge,
}

impl StreamMetrics {
    pub(crate) fn new(stream: &str, group: &str) -> Self {
        let labels = [(DESTINATION, stream.to_owned()), (GROUP, group.to_owned())];
        StreamMetrics {
            consumed: Outcome::ALL.map(|outcome| {
                counter!(CONSUMED, DESTINATION => stream.to_owned(), GROUP => group.to_owned(), "outcome" => outcome.as_str())
            }),
            retried: counter!(RETRIED, &labels),
            dead_lettered: REASONS
                .map(|reason| counter!(DEAD_LETTERED, DESTINATION => stream.to_owned(), GROUP => group.to_owned(), "reason" => reason.as_str())),
            process_duration: histogram!(PROCESS_DURATION, &labels),
            delivery_delay: histogram!(DELIVERY_DELAY, &labels),
            in_flight: gauge!(IN_FLIGHT, &labels),
        }
    }

    /// A handler is about to start on entry `id`.
    pub(crate) fn started(&self, id: EntryId) {
        self.in_flight.increment(1.0);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        // Entry ids carry Redis' clock, which may be a little ahead of ours.
        let delay = now.saturating_sub(Duration::from_millis(id.millis()));
        self.delivery_delay.record(delay);
    }

    /// The attempt ended after `took`, with `outcome` when the handler ran to an end.
    pub(crate) fn finished(&self, took: Duration, outcome: Option<Outcome>) {
        self.in_flight.decrement(1.0);
        self.process_duration.record(took);
        if let Some(outcome) = outcome {
            self.consumed[outcome as usize].increment(1);
        }
    }

    pub(crate) fn retried(&self) {
        self.retried.increment(1);
    }

    pub(crate) fn dead_lettered(&self, reason: DeadLetterReason) {
        if let Some(index) = REASONS.iter().position(|known| *known == reason) {
            self.dead_lettered[index].increment(1);
        }
    }
}

/// Entries claimed from stopped consumers.
pub(crate) fn claimed(stream: &str, group: &str, count: usize) {
    counter!(CLAIMED, DESTINATION => stream.to_owned(), GROUP => group.to_owned())
        .increment(count as u64);
}

/// `trim_acked` deleted `count` entries of `stream`.
pub(crate) fn trimmed(stream: &str, count: u64) {
    counter!(TRIMMED, DESTINATION => stream.to_owned()).increment(count);
}

/// A publish of `entries` entries to `stream` ended after `took`.
pub(crate) fn sent(stream: &str, entries: usize, took: Duration, ok: bool) {
    let stream = stream.to_owned();
    histogram!(SEND_DURATION, DESTINATION => stream.clone()).record(took);
    if ok {
        counter!(SENT, DESTINATION => stream).increment(entries as u64);
    } else {
        counter!(SEND_FAILURES, DESTINATION => stream).increment(1);
    }
}

/// Sets the per-stream gauges from a health snapshot of `group`.
pub(crate) fn stream_gauges(health: &StreamHealth, group: &str) {
    let labels = [
        (DESTINATION, health.stream.clone()),
        (GROUP, group.to_owned()),
    ];
    // NaN when Redis cannot tell (entries deleted from the middle of the stream): a value
    // left from an earlier snapshot would look current, and zero would say "caught up".
    gauge!(LAG, &labels).set(health.lag.map_or(f64::NAN, |lag| lag as f64));
    gauge!(PENDING, &labels).set(health.pending as f64);
    gauge!(OLDEST_PENDING_AGE, &labels).set(
        health
            .oldest_pending_idle
            .map_or(0.0, |idle| idle.as_secs_f64()),
    );
    gauge!(DEAD_LETTERS, &labels).set(health.dead_letters as f64);
    gauge!(STREAM_LENGTH, &labels).set(health.length as f64);
}
