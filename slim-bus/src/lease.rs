//! The consumer-name lease: at most one live process listens under a consumer name.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::broker::{Broker, LeaseState};
use crate::error::{Error, Result};
use crate::health::StartupWait;

/// The lease of one consumer name in one group: a key holding a random token of this
/// process, which it renews every third of the TTL while it listens and deletes when it
/// stops. A process that died without deleting it leaves it to lapse within the TTL.
pub(crate) struct ConsumerLease {
    broker: Arc<dyn Broker>,
    key: String,
    group: Arc<str>,
    consumer: Arc<str>,
    /// This process's token, then its pid and host for the error another process shows.
    holder: String,
    ttl: Duration,
}

impl ConsumerLease {
    pub(crate) fn new(
        broker: Arc<dyn Broker>,
        group: Arc<str>,
        consumer: Arc<str>,
        ttl: Duration,
    ) -> Self {
        let host = gethostname::gethostname();
        ConsumerLease {
            broker,
            key: lease_key(&group, &consumer),
            holder: format!(
                "{:032x} pid {} on {}",
                fastrand::u128(..),
                std::process::id(),
                host.to_string_lossy()
            ),
            group,
            consumer,
            ttl,
        }
    }

    /// Takes the lease. When another process holds it, waits for it to lapse, which a
    /// lease left by a process that died does within the TTL; a lease that is renewed
    /// meanwhile belongs to a live process, and that is [`Error::ConsumerNameTaken`].
    /// `wait` tells `health()` whose lease it waits for.
    pub(crate) async fn acquire(&self, wait: &StartupWait) -> Result<()> {
        let poll = (self.ttl / 10).clamp(Duration::from_millis(10), Duration::from_millis(250));
        let tolerance = self.ttl / 10;
        let mut first_seen: Option<(String, Instant)> = None;
        loop {
            let (holder, remaining) = match self
                .broker
                .hold_lease(&self.key, &self.holder, self.ttl)
                .await?
            {
                LeaseState::Held => return Ok(()),
                LeaseState::Taken { holder, remaining } => (holder, remaining),
            };
            let lapses = Instant::now() + remaining;
            match &first_seen {
                None => {
                    tracing::info!(
                        group = %self.group,
                        consumer = %self.consumer,
                        holder = describe(&holder),
                        lapses_in = ?remaining,
                        "the consumer name is leased by another process; waiting for its lease to lapse, as that of a process that stopped without releasing it does"
                    );
                    wait.waiting(
                        "consumer_lease",
                        format!(
                            "the consumer name `{}` of group `{}` is leased by {} (lapses in {remaining:?} unless renewed)",
                            self.consumer,
                            self.group,
                            describe(&holder)
                        ),
                    );
                    first_seen = Some((holder, lapses));
                }
                // A live holder renews every third of its TTL, which moves the lapse
                // later; a dead one's stays where it was.
                Some((first, first_lapses))
                    if *first != holder || lapses > *first_lapses + tolerance =>
                {
                    return Err(self.taken(&holder));
                }
                Some(_) => {}
            }
            tokio::time::sleep(poll.min(remaining + Duration::from_millis(1))).await;
        }
    }

    /// Renews the lease every third of the TTL; returns only when another process has
    /// taken it (which needs Redis to have been unreachable from here for longer than the
    /// TTL). Renewals that fail are logged and tried again on the next beat.
    pub(crate) async fn keep(&self) -> Error {
        loop {
            tokio::time::sleep(self.ttl / 3).await;
            match self
                .broker
                .hold_lease(&self.key, &self.holder, self.ttl)
                .await
            {
                Ok(LeaseState::Held) => {}
                Ok(LeaseState::Taken { holder, .. }) => {
                    let error = self.taken(&holder);
                    tracing::error!(
                        error = &error as &dyn std::error::Error,
                        "another process took this consumer name while its lease could not be renewed; shutting down: running handlers get the shutdown grace to finish, and nothing more is read"
                    );
                    return error;
                }
                Err(error) => tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "renewing the consumer-name lease failed; trying again"
                ),
            }
        }
    }

    /// Deletes the lease if this process still holds it.
    pub(crate) async fn release(&self) {
        if let Err(error) = self.broker.release_lease(&self.key, &self.holder).await {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "releasing the consumer-name lease failed; it lapses by itself"
            );
        }
    }

    fn taken(&self, holder: &str) -> Error {
        Error::ConsumerNameTaken {
            group: self.group.to_string(),
            consumer: self.consumer.to_string(),
            holder: describe(holder).to_owned(),
        }
    }
}

/// The key of the lease of `consumer` in `group`: `slim-bus:consumer:{group}:{consumer}`
/// with `\` and `:` escaped by a `\` in both names, so that `a:b` + `c` and `a` + `b:c`
/// get two keys. Names without either keep the key they always had.
pub(crate) fn lease_key(group: &str, consumer: &str) -> String {
    format!(
        "slim-bus:consumer:{}:{}",
        escape_key_part(group),
        escape_key_part(consumer)
    )
}

fn escape_key_part(name: &str) -> std::borrow::Cow<'_, str> {
    if !name.contains([':', '\\']) {
        return name.into();
    }
    let mut escaped = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c == ':' || c == '\\' {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped.into()
}

/// A holder without its token: `pid 1234 on host-a`.
fn describe(holder: &str) -> &str {
    holder.split_once(' ').map_or(holder, |(_, rest)| rest)
}

#[cfg(test)]
mod tests {
    use super::lease_key;

    #[test]
    fn lease_keys_of_names_holding_colons_or_backslashes_do_not_collide() {
        assert_eq!(
            lease_key("billing", "pod-1"),
            "slim-bus:consumer:billing:pod-1"
        );
        assert_ne!(lease_key("a:b", "c"), lease_key("a", "b:c"));
        assert_eq!(lease_key("a:b", "c"), r"slim-bus:consumer:a\:b:c");
        assert_eq!(lease_key("a", "b:c"), r"slim-bus:consumer:a:b\:c");
        assert_ne!(lease_key("a\\", ":b"), lease_key("a\\:", "b"));
    }
}
