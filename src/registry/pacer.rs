//! Paces the requests to one registry to a configured rate, so that a controller rebuilding many
//! bundles at once stays under a registry's (or its operator's) request limit instead of
//! collecting 429s. No bursts: requests go out evenly spaced.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

pub struct Pacer(DefaultDirectRateLimiter);

impl Pacer {
    /// `None` when `per_second` is 0: no pacing.
    pub fn new(per_second: u32) -> Option<Pacer> {
        let rate = NonZeroU32::new(per_second)?;
        Some(Pacer(RateLimiter::direct(Quota::per_second(rate).allow_burst(NonZeroU32::MIN))))
    }

    /// Waits for the next request's turn.
    pub async fn turn(&self) {
        self.0.until_ready().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[tokio::test]
    async fn requests_are_spaced_at_the_rate() {
        assert!(Pacer::new(0).is_none(), "0 turns pacing off");
        let pacer = Pacer::new(50).unwrap();
        let started = Instant::now();
        for _ in 0..11 {
            pacer.turn().await;
        }
        // The first goes at once, each of the next ten waits its 20 ms.
        assert!(started.elapsed() >= Duration::from_millis(190), "{:?}", started.elapsed());
    }
}
