//! Removing the consumers of the group that are gone: idle for long, holding nothing.
//!
//! A consumer is created by its first read and stays in the group until removed, so
//! without this every pod name ever used would stay in `XINFO CONSUMERS`.

use std::time::Duration;

use crate::broker::Broker;

/// Removes the consumers of `group` on `stream`, other than `consumer`, idle for at least
/// `idle` and holding no pending entries. A live consumer reads at least every block time
/// and so never looks idle; one removed by mistake would hold nothing, and its next read
/// creates it again.
pub(super) async fn remove_idle_consumers(
    broker: &dyn Broker,
    stream: &str,
    group: &str,
    consumer: &str,
    idle: Duration,
) {
    match broker
        .remove_idle_consumers(stream, group, idle, consumer)
        .await
    {
        Ok(removed) if removed.is_empty() => {}
        Ok(removed) => tracing::info!(
            stream,
            group,
            ?removed,
            idle_for_at_least = ?idle,
            "removed consumers of the group that were idle and held no pending entries"
        ),
        // The claim scan this runs after meets the same outage and backs off.
        Err(error) => tracing::debug!(
            stream,
            error = &error as &dyn std::error::Error,
            "removing idle consumers failed"
        ),
    }
}
