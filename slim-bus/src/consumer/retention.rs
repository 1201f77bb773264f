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

async fn trim_acked(broker: &dyn Broker, stream: &str) {
    match broker.trim_acked(stream).await {
        Ok(0) => {}
        Ok(trimmed) => {
            tracing::debug!(
                stream,
                trimmed,
                "trimmed the entries every consumer group acknowledged"
            );
            telemetry::trimmed(stream, trimmed);
        }
        Err(error) => tracing::warn!(
            stream,
            error = &error as &dyn std::error::Error,
            "trimming the entries every consumer group acknowledged failed; trying again at the next interval"
        ),
    }
}
