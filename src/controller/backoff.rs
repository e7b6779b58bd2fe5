//! Per-object retry delays: a failing object waits longer each time (so a missing S3 key or a
//! registry outage never becomes a hot loop) and starts afresh once it succeeds.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    /// Failures in a row, and when the next attempt is due.
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff { first, max, failures: Mutex::default() }
    }

    /// Records a failure of `key` and returns how long to wait before trying again.
    pub fn failed(&self, key: &str) -> Duration {
        let Ok(mut failures) = self.failures.lock() else { return self.max };
        let entry = failures.entry(key.to_owned()).or_insert((0, Instant::now()));
        entry.0 = entry.0.saturating_add(1);
        let exponent = entry.0.saturating_sub(1).min(16);
        let delay = self.first.saturating_mul(1 << exponent).min(self.max);
        // Up to 10% jitter keeps objects that failed together from retrying together.
        let delay = delay.mul_f64(1.0 - fastrand::f64() * 0.1);
        entry.1 = Instant::now() + delay;
        delay
    }

    /// How long `key` must still wait after its last failure: a watch event (our own status
    /// write among them) must not bring the next attempt forward.
    pub fn wait_left(&self, key: &str) -> Option<Duration> {
        let failures = self.failures.lock().ok()?;
        let (_, due) = failures.get(key)?;
        due.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
    }

    /// Objects still waiting out a retry delay, by kind (the first part of their key).
    pub fn waiting_by_kind(&self) -> BTreeMap<String, usize> {
        let mut waiting = BTreeMap::new();
        let Ok(failures) = self.failures.lock() else { return waiting };
        let now = Instant::now();
        for (key, _) in failures.iter().filter(|(_, (_, due))| *due > now) {
            let kind = key.split('/').next().unwrap_or_default();
            *waiting.entry(kind.to_owned()).or_default() += 1;
        }
        waiting
    }

    pub fn succeeded(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_reset_on_success() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let delays: Vec<_> = (0..6).map(|_| backoff.failed("ns/a").as_secs_f64()).collect();
        for (delay, expected) in delays.iter().zip([1.0, 2.0, 4.0, 8.0, 10.0, 10.0]) {
            assert!(*delay <= expected && *delay >= expected * 0.9, "{delays:?}");
        }
        assert!(backoff.failed("ns/b").as_secs_f64() <= 1.0, "objects back off independently");
        assert!(backoff.wait_left("ns/a").is_some_and(|d| d > Duration::from_secs(8)));
        assert!(backoff.wait_left("ns/c").is_none());
        assert_eq!(backoff.waiting_by_kind(), BTreeMap::from([("ns".to_owned(), 2)]));
        backoff.succeeded("ns/a");
        assert!(backoff.wait_left("ns/a").is_none());
        assert!(backoff.failed("ns/a").as_secs_f64() <= 1.0);
    }
}
