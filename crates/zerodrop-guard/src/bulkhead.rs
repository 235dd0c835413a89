//! Bulkhead for one upstream (SPEC §7): at most `max_in_flight` calls at once, each holding a
//! lease with a TTL, so a worker that crashed mid-call frees its slot when the lease expires.
//! Saturation is an error carrying `retry_after_ms` (the server answers 503 with
//! `Retry-After`). Expiry is decided lazily on the next query, like every machine here.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::circuit::InvalidSetting;
use crate::clock::Clock;

/// Settings of one bulkhead; every field has a documented default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BulkheadSettings {
    /// Calls in flight at most. Default 16.
    pub max_in_flight: u32,
    /// A lease not released within this time expires and frees its slot. Default 30000 ms.
    pub lease_ttl_ms: u64,
    /// The smallest `retry_after_ms` a saturated bulkhead answers. Default 1000 ms.
    pub retry_after_floor_ms: u64,
}

impl Default for BulkheadSettings {
    fn default() -> Self {
        BulkheadSettings {
            max_in_flight: 16,
            lease_ttl_ms: 30_000,
            retry_after_floor_ms: 1_000,
        }
    }
}

impl BulkheadSettings {
    /// Refuses settings the bulkhead cannot run with, naming the first bad setting.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let bad = |setting, message: &str| {
            Err(InvalidSetting {
                setting,
                message: message.to_string(),
            })
        };
        if self.max_in_flight == 0 {
            return bad("max_in_flight", "must be at least 1");
        }
        if self.lease_ttl_ms == 0 {
            return bad("lease_ttl_ms", "must be at least 1");
        }
        if self.retry_after_floor_ms == 0 {
            return bad("retry_after_floor_ms", "must be at least 1");
        }
        Ok(())
    }
}

/// One slot held; release it with [`Bulkhead::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    pub id: u64,
    pub acquired_at_ms: u64,
    pub expires_at_ms: u64,
}

/// Every slot is taken; retry after `retry_after_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bulkhead full ({in_flight}/{max_in_flight} in flight): retry after {retry_after_ms} ms")]
pub struct Saturated {
    pub in_flight: u32,
    pub max_in_flight: u32,
    pub retry_after_ms: u64,
}

/// What `GET /admin/bulkheads?provider=P&limit=N` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkheadSnapshot {
    pub provider: String,
    pub max: u32,
    pub in_flight: u32,
    /// Oldest first, at most `limit`.
    pub leases: Vec<Lease>,
    pub rejected: u64,
    pub expired: u64,
}

#[derive(Debug, Default)]
struct Inner {
    /// By id; ids grow, so this is also acquisition order.
    leases: BTreeMap<u64, Lease>,
    next_id: u64,
    rejected: u64,
    expired: u64,
}

/// A bulkhead; `&self` methods, safe to share between tasks.
pub struct Bulkhead {
    provider: String,
    settings: BulkheadSettings,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Bulkhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bulkhead")
            .field("provider", &self.provider)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Bulkhead {
    pub fn new(
        provider: impl Into<String>,
        settings: BulkheadSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Bulkhead, InvalidSetting> {
        settings.validate()?;
        Ok(Bulkhead {
            provider: provider.into(),
            settings,
            clock,
            inner: Mutex::new(Inner {
                next_id: 1,
                ..Inner::default()
            }),
        })
    }

    pub fn provider(&self) -> &str {
        &self.provider
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while the lock is held; a poisoned lock still holds consistent state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn expire(inner: &mut Inner, now: u64) {
        let before = inner.leases.len();
        inner.leases.retain(|_, l| l.expires_at_ms > now);
        inner.expired += (before - inner.leases.len()) as u64;
    }

    /// Takes a slot, or says when one is sure to be free: when the earliest lease expires
    /// (a release may free one sooner), never less than the floor.
    pub fn acquire(&self) -> Result<Lease, Saturated> {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        Self::expire(&mut inner, now);
        let in_flight = inner.leases.len() as u32;
        if in_flight >= self.settings.max_in_flight {
            inner.rejected += 1;
            let earliest = inner.leases.values().map(|l| l.expires_at_ms).min();
            let until = earliest.unwrap_or(now).saturating_sub(now);
            return Err(Saturated {
                in_flight,
                max_in_flight: self.settings.max_in_flight,
                retry_after_ms: until.max(self.settings.retry_after_floor_ms),
            });
        }
        let lease = Lease {
            id: inner.next_id,
            acquired_at_ms: now,
            expires_at_ms: now.saturating_add(self.settings.lease_ttl_ms),
        };
        inner.next_id += 1;
        inner.leases.insert(lease.id, lease);
        Ok(lease)
    }

    /// Frees the slot. False, and nothing changes, when the lease already expired or was
    /// already released.
    pub fn release(&self, lease: &Lease) -> bool {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        Self::expire(&mut inner, now);
        inner.leases.remove(&lease.id).is_some()
    }

    pub fn in_flight(&self) -> u32 {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        Self::expire(&mut inner, now);
        inner.leases.len() as u32
    }

    /// What the admin route shows, with at most `limit` leases (oldest first).
    pub fn snapshot(&self, limit: usize) -> BulkheadSnapshot {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        Self::expire(&mut inner, now);
        BulkheadSnapshot {
            provider: self.provider.clone(),
            max: self.settings.max_in_flight,
            in_flight: inner.leases.len() as u32,
            leases: inner.leases.values().take(limit).copied().collect(),
            rejected: inner.rejected,
            expired: inner.expired,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use proptest::prelude::*;

    fn bulkhead(max: u32) -> (Bulkhead, ManualClock) {
        let clock = ManualClock::new(1_000);
        let settings = BulkheadSettings {
            max_in_flight: max,
            lease_ttl_ms: 10_000,
            retry_after_floor_ms: 500,
        };
        let b = Bulkhead::new("stripe", settings, Arc::new(clock.clone())).unwrap();
        (b, clock)
    }

    #[test]
    fn defaults_are_the_documented_ones_and_invalid_settings_are_refused() {
        let d = BulkheadSettings::default();
        assert_eq!(
            (d.max_in_flight, d.lease_ttl_ms, d.retry_after_floor_ms),
            (16, 30_000, 1_000)
        );
        assert_eq!(d.validate(), Ok(()));
        for (s, msg) in [
            (
                BulkheadSettings {
                    max_in_flight: 0,
                    ..d.clone()
                },
                "invalid setting `max_in_flight`: must be at least 1",
            ),
            (
                BulkheadSettings {
                    lease_ttl_ms: 0,
                    ..d.clone()
                },
                "invalid setting `lease_ttl_ms`: must be at least 1",
            ),
            (
                BulkheadSettings {
                    retry_after_floor_ms: 0,
                    ..d.clone()
                },
                "invalid setting `retry_after_floor_ms`: must be at least 1",
            ),
        ] {
            let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(0));
            assert_eq!(Bulkhead::new("p", s, clock).unwrap_err().to_string(), msg);
        }
    }

    #[test]
    fn settings_deserialize_with_defaults_and_refuse_unknown_keys() {
        let s: BulkheadSettings = serde_json::from_str(r#"{"max_in_flight":4}"#).unwrap();
        assert_eq!(s.max_in_flight, 4);
        assert_eq!(s.lease_ttl_ms, 30_000);
        assert!(serde_json::from_str::<BulkheadSettings>(r#"{"max":4}"#).is_err());
    }

    #[test]
    fn at_most_max_in_flight_and_release_frees_a_slot() {
        let (b, clock) = bulkhead(2);
        let a = b.acquire().unwrap();
        clock.advance(2_000);
        let c = b.acquire().unwrap();
        let e = b.acquire().unwrap_err();
        // The earliest lease (a) expires at 11_000; now is 3_000.
        assert_eq!(
            e,
            Saturated {
                in_flight: 2,
                max_in_flight: 2,
                retry_after_ms: 8_000
            }
        );
        assert!(b.release(&a));
        let d = b.acquire().unwrap();
        assert_ne!(d.id, a.id);
        assert_eq!(b.in_flight(), 2);
        assert!(b.release(&c) && b.release(&d));
        assert_eq!(b.in_flight(), 0);
        assert_eq!(b.snapshot(10).rejected, 1);
    }

    #[test]
    fn an_expired_lease_frees_its_slot_and_releasing_it_later_is_a_no_op() {
        let (b, clock) = bulkhead(1);
        let crashed = b.acquire().unwrap();
        assert_eq!(crashed.expires_at_ms, 11_000);
        clock.advance(9_999);
        assert!(b.acquire().is_err());
        clock.advance(1);
        let next = b.acquire().expect("the crashed worker's lease expired");
        assert!(!b.release(&crashed), "expired");
        assert_eq!(
            b.in_flight(),
            1,
            "the late release did not free the new lease's slot"
        );
        assert!(b.release(&next));
        assert!(!b.release(&next), "already released");
        assert_eq!(b.snapshot(10).expired, 1);
    }

    #[test]
    fn retry_after_never_goes_below_the_floor() {
        let (b, clock) = bulkhead(1);
        let _a = b.acquire().unwrap();
        clock.advance(9_800);
        assert_eq!(
            b.acquire().unwrap_err().retry_after_ms,
            500,
            "200 ms left < floor"
        );
    }

    #[test]
    fn the_snapshot_is_bounded_by_limit_oldest_first_and_serializes() {
        let (b, clock) = bulkhead(3);
        let a = b.acquire().unwrap();
        clock.advance(10);
        let _b2 = b.acquire().unwrap();
        clock.advance(10);
        let _c = b.acquire().unwrap();
        assert!(b.acquire().is_err());
        let s = b.snapshot(2);
        assert_eq!(s.in_flight, 3);
        assert_eq!(s.leases.len(), 2);
        assert_eq!(s.leases[0], a);
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            serde_json::json!({
                "provider": "stripe",
                "max": 3,
                "inFlight": 3,
                "leases": [
                    {"id": 1, "acquiredAtMs": 1000, "expiresAtMs": 11000},
                    {"id": 2, "acquiredAtMs": 1010, "expiresAtMs": 11010},
                ],
                "rejected": 1,
                "expired": 0,
            })
        );
    }

    #[test]
    fn many_threads_never_hold_more_than_max() {
        let (b, _clock) = bulkhead(3);
        let peak = std::sync::atomic::AtomicU32::new(0);
        let granted = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..6 {
                s.spawn(|| {
                    for _ in 0..200 {
                        if let Ok(l) = b.acquire() {
                            granted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            peak.fetch_max(b.in_flight(), std::sync::atomic::Ordering::SeqCst);
                            assert!(b.release(&l));
                        }
                    }
                });
            }
        });
        assert!(peak.into_inner() <= 3);
        assert!(granted.into_inner() >= 1);
        let s = b.snapshot(10);
        assert_eq!(s.in_flight, 0);
        assert_eq!(s.expired, 0);
    }

    proptest! {
        #[test]
        fn in_flight_never_exceeds_max(ops in proptest::collection::vec((0u8..3, 0u64..6_000), 1..200)) {
            let (b, clock) = bulkhead(3);
            let mut held: Vec<Lease> = Vec::new();
            for (kind, n) in ops {
                match kind {
                    0 => match b.acquire() {
                        Ok(l) => held.push(l),
                        Err(e) => {
                            prop_assert_eq!(e.in_flight, 3);
                            prop_assert!(e.retry_after_ms >= 500);
                        }
                    },
                    1 if !held.is_empty() => {
                        let l = held.remove(n as usize % held.len());
                        let live = l.expires_at_ms > clock.now_ms();
                        prop_assert_eq!(b.release(&l), live);
                    }
                    _ => clock.advance(n),
                }
                let now = clock.now_ms();
                let live = held.iter().filter(|l| l.expires_at_ms > now).count() as u32;
                prop_assert_eq!(b.in_flight(), live);
                prop_assert!(live <= 3);
            }
        }
    }
}
