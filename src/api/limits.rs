//! The API's limits: upload size, module count and size, and the request rate of each token.

use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::envelope::ApiError;

#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest upload body, multipart framing included.
    pub max_upload_bytes: usize,
    /// Most modules in one upload.
    pub max_modules: usize,
    /// Largest single module.
    pub max_module_bytes: usize,
    /// Requests one token may make per minute (bursts up to the same number).
    pub requests_per_minute: u32,
}

impl Default for Limits {
    /// 10 MiB is Cloudflare's limit for a worker on the paid plan.
    fn default() -> Self {
        Limits {
            max_upload_bytes: 10 << 20,
            max_modules: 256,
            max_module_bytes: 10 << 20,
            requests_per_minute: 600,
        }
    }
}

/// One GCRA bucket per token (by hash: the limiter never holds a token).
pub struct RateLimits {
    per_minute: u32,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
}

impl RateLimits {
    /// `per_minute == 0` turns the limit off.
    pub fn new(per_minute: u32) -> Self {
        let limiter = NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n)));
        RateLimits { per_minute, limiter }
    }

    pub fn check(&self, token_hash: &str) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        limiter.check_key(&token_hash.to_owned()).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ApiError::RateLimited { per_minute: self.per_minute, retry_after_secs: wait.as_secs().max(1) }
        })?;
        // Buckets of tokens that went quiet are dropped now and then, so the map stays small.
        if limiter.len() > 10_000 {
            limiter.retain_recent();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_token_has_its_own_budget() {
        let limits = RateLimits::new(2);
        assert!(limits.check("a").is_ok());
        assert!(limits.check("a").is_ok());
        let err = limits.check("a").unwrap_err();
        assert!(matches!(err, ApiError::RateLimited { per_minute: 2, .. }), "{err:?}");
        assert!(limits.check("b").is_ok(), "another token is not slowed down");
        let unlimited = RateLimits::new(0);
        for _ in 0..100 {
            assert!(unlimited.check("a").is_ok());
        }
    }
}
