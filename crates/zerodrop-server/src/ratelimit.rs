//! HTTP rate limits (SPEC §7): GCRA per route and key (`governor`), every verdict recorded
//! in the guardrails' ledger for `/admin/ratelimit/*` and the snapshot.
//!
//! A key is who the request is from: `api-key` for the api key, `sub:<sub>` for a valid
//! connect token (all of one user's tokens share it), `ip:<address>` for a request with no
//! credential, and otherwise (resume tokens, unknown credentials) the first 12 hex digits of
//! the credential's SHA-256, so no secret ever reaches the ledger, a log or an admin answer.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use zerodrop_guard::ratelimit::{AlertRule, Ledger};
use zerodrop_guard::{Clock, SystemClock};

/// Minutes of counts the ledger keeps (the longest `?minutes=` a summary can cover).
pub const KEEP_MINUTES: u64 = 60;
/// Block events the ledger keeps.
pub const KEEP_EVENTS: usize = 1000;

pub struct HttpLimits {
    limiter: DefaultKeyedRateLimiter<(String, String)>,
    clock: DefaultClock,
    ledger: Mutex<Ledger>,
}

impl HttpLimits {
    /// `per_sec` requests per second per route and key, bursts of twice that; `None` when
    /// the limit is off (0).
    pub fn new(per_sec: u32) -> Option<HttpLimits> {
        let per_sec = NonZeroU32::new(per_sec)?;
        let burst = per_sec.saturating_mul(NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN));
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        Some(HttpLimits {
            limiter: RateLimiter::keyed(Quota::per_second(per_sec).allow_burst(burst)),
            clock: DefaultClock::default(),
            ledger: Mutex::new(Ledger::new(
                clock,
                AlertRule::default(),
                KEEP_MINUTES,
                KEEP_EVENTS,
            )),
        })
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One request of `bucket` (`"METHOD /route"`) by `credential`: `Err(seconds to wait)`
    /// when it is over the limit.
    pub fn check(&self, bucket: &str, credential: Option<&str>) -> Result<(), u64> {
        self.check_key(bucket, label(credential))
    }

    /// One request of `bucket` by the key `key` (see the module doc for the labels).
    pub fn check_key(&self, bucket: &str, key: String) -> Result<(), u64> {
        let verdict = self
            .limiter
            .check_key(&(bucket.to_string(), key.clone()))
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(self.clock.now());
                wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
            })
            .map_err(|s| s.max(1));
        self.ledger().record(bucket, &key, verdict.is_ok());
        verdict
    }

    /// Forgets keys that are back to a full burst (call periodically).
    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
    }

    pub fn summary(&self, minutes: u64) -> Value {
        json!(self.ledger().summary(minutes.clamp(1, KEEP_MINUTES)))
    }

    pub fn alerts(&self, limit: usize) -> Value {
        json!(self.ledger().alerts(limit))
    }

    pub fn events(&self, limit: usize) -> Value {
        json!(self.ledger().events(limit))
    }
}

/// `--max-new-streams-per-minute`: how many streams that do not exist yet each publisher may
/// create per minute (GCRA, bursts of the same number), keyed by [`crate::app::Publisher`].
/// Per instance: with several instances a publisher may create up to that many on each.
pub struct NewStreamLimit {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl NewStreamLimit {
    /// `None` when the limit is off (0).
    pub fn new(per_minute: u32) -> Option<NewStreamLimit> {
        let per_minute = NonZeroU32::new(per_minute)?;
        Some(NewStreamLimit {
            limiter: RateLimiter::keyed(Quota::per_minute(per_minute)),
            clock: DefaultClock::default(),
        })
    }

    /// One new stream by `publisher`: `Err(seconds to wait)` when it is over the limit.
    pub fn check(&self, publisher: String) -> Result<(), u64> {
        self.limiter.check_key(&publisher).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
        })
    }

    /// Forgets publishers that are back to a full burst (call periodically).
    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
    }
}

/// A credential's label: never the credential itself.
pub fn label(credential: Option<&str>) -> String {
    match credential {
        None | Some("") => "anonymous".into(),
        Some(c) => hex::encode(&Sha256::digest(c.as_bytes())[..6]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_the_burst_a_key_waits_and_other_keys_do_not() {
        let l = HttpLimits::new(1).unwrap();
        let b = "POST /v1/streams/{stream}/events";
        assert!(l.check(b, Some("k1")).is_ok());
        assert!(l.check(b, Some("k1")).is_ok());
        assert_eq!(
            l.check(b, Some("k1")),
            Err(1),
            "burst of 2, then a second's wait"
        );
        assert!(l.check(b, Some("k2")).is_ok(), "another key");
        assert!(
            l.check("GET /v1/streams/{stream}", Some("k1")).is_ok(),
            "another route"
        );
        let s = l.summary(15);
        assert_eq!(s[0]["blocked"], 0);
        let events = l.events(10);
        assert_eq!(events.as_array().unwrap().len(), 1);
        assert_ne!(events[0]["key"], "k1", "a key is labelled, never shown");
        assert_eq!(events[0]["key"].as_str().unwrap().len(), 12);
        assert!(HttpLimits::new(0).is_none(), "0 is off");
    }

    #[test]
    fn new_streams_per_minute_are_counted_per_publisher() {
        let l = NewStreamLimit::new(2).unwrap();
        assert!(l.check("api-key".into()).is_ok());
        assert!(l.check("api-key".into()).is_ok());
        let wait = l.check("api-key".into()).unwrap_err();
        assert!((1..=30).contains(&wait), "one more after 30 s: {wait}");
        assert!(l.check("sub:u1".into()).is_ok(), "another publisher");
        assert!(NewStreamLimit::new(0).is_none(), "0 is off");
    }
}
