//! Group-aware retention: trimming from streams what every consumer group is done with.
//!
//! `XACK` never deletes an entry, so a stream grows until something trims it. A cap at
//! publish (`MAXLEN`) deletes what a slow group has not read yet; this deletes only the
//! entries every group of the stream has been delivered and has acknowledged.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use crate::broker::Broker;
use crate::telemetry;

/// The most entries one trim deletes: one script call, which holds the server while it
/// runs (an `XTRIM` of 10k entries takes a few milliseconds).
pub(crate) const TRIM_ACKED_MAX_PER_CALL: usize = 10_000;
/// The most calls per stream and interval: a stream that has more to trim than that
/// (the first trim of a long retained stream) goes on at the next interval.
const TRIM_ACKED_MAX_CALLS: usize = 10;

/// Trims each of `streams` every `interval`, the first time at once, until dropped. A
/// failed trim is logged and tried again at the next interval: nothing is lost by waiting.
pub(super) async fn trim_acked_periodically(
    broker: Arc<dyn Broker>,
    streams: Arc<[Arc<str>]>,
    interval: Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        for stream in streams.iter() {
            trim_acked(&*broker, stream).await;
        }
    }
}

/// Trims `stream` in calls of at most [`TRIM_ACKED_MAX_PER_CALL`] entries, each its own
/// script, so that commands of other clients run in between; at most
/// [`TRIM_ACKED_MAX_CALLS`] calls.
async fn trim_acked(broker: &dyn Broker, stream: &str) {
    for _ in 0..TRIM_ACKED_MAX_CALLS {
        match broker.trim_acked(stream, TRIM_ACKED_MAX_PER_CALL).await {
            Ok(0) => return,
            Ok(trimmed) => {
                tracing::debug!(
                    stream,
                    trimmed,
                    "trimmed the entries every consumer group acknowledged"
                );
                telemetry::trimmed(stream, trimmed);
                if trimmed < TRIM_ACKED_MAX_PER_CALL as u64 {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(
                    stream,
                    error = &error as &dyn std::error::Error,
                    "trimming the entries every consumer group acknowledged failed; trying again at the next interval"
                );
                return;
            }
        }
    }
}
