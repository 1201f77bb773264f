//! Exponential backoff with jitter, for retrying Redis after errors without a busy loop.

use std::time::Duration;

pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next delay: doubling from `base` up to `cap`, each drawn at random from its
    /// upper half so that many consumers failing together do not retry together.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = exponential(self.base, self.cap, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many delays were drawn since the last reset.
    pub(crate) fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// The delay before attempt `attempt` (from 0): `base` doubled that many times, capped at
/// `cap`, then drawn at random from its upper half so that failures that happened together
/// do not retry together.
pub(crate) fn exponential(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(20)).min(cap);
    let half = ceiling / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_restart_after_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<_> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400) && delays[3] <= Duration::from_millis(800));
        for delay in &delays[4..] {
            assert!(*delay >= Duration::from_millis(500) && *delay <= Duration::from_secs(1));
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
