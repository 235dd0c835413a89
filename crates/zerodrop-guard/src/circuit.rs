//! Circuit breaker for one upstream (SPEC §7): closed → open on the failure rate or the
//! slow-call rate over a sliding window (count- or time-based, once a minimum of calls is
//! seen) → half-open when the cooldown has passed → a few trial calls decide: all succeed →
//! closed with a fresh window, any failure or slow call → open again.
//!
//! No timers: every transition that time alone causes (cooldown over, a trial lease lost) is
//! decided lazily on the next query, so a circuit is never stuck open or half-open because no
//! traffic arrives. Every call holds a [`Permit`]; a permit from before a transition is stale
//! and its completion is ignored, never counted.
//!
//! Failover: `acquire()` on the primary's breaker; on `Err(Rejected)` the caller tries the
//! secondary (or answers with `Retry-After` from `retry_after_ms`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::clock::Clock;

/// A setting refused at start-up, naming the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting `{setting}`: {message}")]
pub struct InvalidSetting {
    pub setting: &'static str,
    pub message: String,
}

fn invalid(setting: &'static str, message: impl Into<String>) -> InvalidSetting {
    InvalidSetting {
        setting,
        message: message.into(),
    }
}

/// Which calls the sliding window holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowKind {
    /// The last `window_size` calls.
    Count,
    /// The calls completed in the last `window_size` seconds.
    Time,
}

/// Settings of one circuit breaker; every field has a documented default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitSettings {
    /// Opens when at least this percentage of the calls in the window failed. Default 50.
    pub failure_rate_pct: f64,
    /// Opens when at least this percentage of the calls in the window were slow. Default 100.
    pub slow_call_rate_pct: f64,
    /// A call taking longer than this many milliseconds is slow. Default 2000.
    pub slow_call_ms: u64,
    /// Count- or time-based window. Default `count`.
    pub window_kind: WindowKind,
    /// Calls (count window) or seconds (time window) in the window. Default 20.
    pub window_size: u32,
    /// No opening before the window holds this many calls. Default 10.
    pub min_calls: u32,
    /// Time spent open before trial calls are let through. Default 30000 ms.
    pub cooldown_ms: u64,
    /// Trial calls in half-open; all must succeed to close. Default 3.
    pub half_open_trials: u32,
    /// A trial lease not completed within this time is lost and frees its slot. Default 10000 ms.
    pub trial_lease_ttl_ms: u64,
    /// Transitions kept for the snapshot, newest first. Default 20.
    pub transitions_kept: usize,
}

impl Default for CircuitSettings {
    fn default() -> Self {
        CircuitSettings {
            failure_rate_pct: 50.0,
            slow_call_rate_pct: 100.0,
            slow_call_ms: 2000,
            window_kind: WindowKind::Count,
            window_size: 20,
            min_calls: 10,
            cooldown_ms: 30_000,
            half_open_trials: 3,
            trial_lease_ttl_ms: 10_000,
            transitions_kept: 20,
        }
    }
}

impl CircuitSettings {
    /// Refuses settings the breaker cannot run with, naming the first bad setting.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        for (name, rate) in [
            ("failure_rate_pct", self.failure_rate_pct),
            ("slow_call_rate_pct", self.slow_call_rate_pct),
        ] {
            if !(rate > 0.0 && rate <= 100.0) {
                return Err(invalid(
                    name,
                    format!("must be above 0 and at most 100 (percent), got {rate}"),
                ));
            }
        }
        if self.slow_call_ms == 0 {
            return Err(invalid("slow_call_ms", "must be at least 1"));
        }
        if self.window_size == 0 {
            return Err(invalid("window_size", "must be at least 1"));
        }
        if self.min_calls == 0 {
            return Err(invalid("min_calls", "must be at least 1"));
        }
        if self.window_kind == WindowKind::Count && self.min_calls > self.window_size {
            return Err(invalid(
                "min_calls",
                format!(
                    "{} is above the count window of {} calls, so the circuit could never open",
                    self.min_calls, self.window_size
                ),
            ));
        }
        if self.cooldown_ms == 0 {
            return Err(invalid("cooldown_ms", "must be at least 1"));
        }
        if self.half_open_trials == 0 {
            return Err(invalid("half_open_trials", "must be at least 1"));
        }
        if self.trial_lease_ttl_ms == 0 {
            return Err(invalid("trial_lease_ttl_ms", "must be at least 1"));
        }
        if self.transitions_kept == 0 {
            return Err(invalid("transitions_kept", "must be at least 1"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

/// How a call ended, as the caller saw it (its duration is measured by the breaker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// The right to make one call; hand it back to [`CircuitBreaker::complete`]. Not `Clone`:
/// a call is counted once.
#[derive(Debug, PartialEq, Eq)]
pub struct Permit {
    id: u64,
    generation: u64,
    trial: bool,
    started_at_ms: u64,
}

impl Permit {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether this is a half-open trial call.
    pub fn is_trial(&self) -> bool {
        self.trial
    }
}

/// The primary may not be tried now; retry (or fail over) after `retry_after_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit {state:?}: retry after {retry_after_ms} ms")]
pub struct Rejected {
    pub state: CircuitState,
    pub retry_after_ms: u64,
}

/// One change of state, for the snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    pub from: CircuitState,
    pub to: CircuitState,
    pub at_ms: u64,
    pub reason: String,
}

/// What `GET /admin/circuits` shows of one breaker.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CircuitSnapshot {
    pub name: String,
    pub state: CircuitState,
    pub failure_rate_pct: f64,
    pub slow_call_rate_pct: f64,
    pub calls_in_window: u32,
    pub min_calls: u32,
    pub opened_at_ms: Option<u64>,
    pub next_half_open_at_ms: Option<u64>,
    pub trials_in_flight: u32,
    pub trials_succeeded: u32,
    pub rejected: u64,
    /// Newest first, at most `transitions_kept`.
    pub transitions: Vec<Transition>,
}

#[derive(Debug, Clone, Copy)]
struct Call {
    at_ms: u64,
    failed: bool,
    slow: bool,
}

#[derive(Debug, Clone, Copy)]
struct Trial {
    id: u64,
    expires_at_ms: u64,
}

#[derive(Debug)]
struct Inner {
    state: CircuitState,
    /// Bumped on every transition; a permit of another generation is stale.
    generation: u64,
    next_id: u64,
    window: VecDeque<Call>,
    opened_at_ms: Option<u64>,
    trials: Vec<Trial>,
    trials_succeeded: u32,
    rejected: u64,
    transitions: VecDeque<Transition>,
}

/// A circuit breaker; `&self` methods, safe to share between tasks.
pub struct CircuitBreaker {
    name: String,
    settings: CircuitSettings,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl CircuitBreaker {
    /// A closed breaker; refuses invalid settings.
    pub fn new(
        name: impl Into<String>,
        settings: CircuitSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<CircuitBreaker, InvalidSetting> {
        settings.validate()?;
        Ok(CircuitBreaker {
            name: name.into(),
            settings,
            clock,
            inner: Mutex::new(Inner {
                state: CircuitState::Closed,
                generation: 0,
                next_id: 1,
                window: VecDeque::new(),
                opened_at_ms: None,
                trials: Vec::new(),
                trials_succeeded: 0,
                rejected: 0,
                transitions: VecDeque::new(),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn settings(&self) -> &CircuitSettings {
        &self.settings
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while the lock is held; a poisoned lock still holds consistent state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state now, after any transition that time alone causes.
    pub fn state(&self) -> CircuitState {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        self.catch_up(&mut inner, now);
        inner.state
    }

    /// When time alone next changes the state (the cooldown's end while open), if it will.
    /// The breaker runs no timer; whoever shows its state (a gauge) asks again at that moment,
    /// and the transition happens then.
    pub fn next_change_at_ms(&self) -> Option<u64> {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        self.catch_up(&mut inner, now);
        match inner.state {
            CircuitState::Open => inner
                .opened_at_ms
                .map(|t| t.saturating_add(self.settings.cooldown_ms)),
            CircuitState::Closed | CircuitState::HalfOpen => None,
        }
    }

    /// May the upstream be called now? Closed: always. Open: no, until the cooldown is over.
    /// Half-open: while a trial slot is free.
    pub fn acquire(&self) -> Result<Permit, Rejected> {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        self.catch_up(&mut inner, now);
        let id = inner.next_id;
        match inner.state {
            CircuitState::Closed => {
                inner.next_id += 1;
                Ok(Permit {
                    id,
                    generation: inner.generation,
                    trial: false,
                    started_at_ms: now,
                })
            }
            CircuitState::Open => {
                inner.rejected += 1;
                let until = inner
                    .opened_at_ms
                    .unwrap_or(now)
                    .saturating_add(self.settings.cooldown_ms);
                Err(Rejected {
                    state: CircuitState::Open,
                    retry_after_ms: until.saturating_sub(now).max(1),
                })
            }
            CircuitState::HalfOpen => {
                let free = self.settings.half_open_trials - inner.trials_succeeded;
                if (inner.trials.len() as u32) < free {
                    inner.next_id += 1;
                    inner.trials.push(Trial {
                        id,
                        expires_at_ms: now.saturating_add(self.settings.trial_lease_ttl_ms),
                    });
                    Ok(Permit {
                        id,
                        generation: inner.generation,
                        trial: true,
                        started_at_ms: now,
                    })
                } else {
                    inner.rejected += 1;
                    let earliest = inner.trials.iter().map(|t| t.expires_at_ms).min();
                    Err(Rejected {
                        state: CircuitState::HalfOpen,
                        retry_after_ms: earliest.unwrap_or(now).saturating_sub(now).max(1),
                    })
                }
            }
        }
    }

    /// Records how the permitted call ended. Returns false (and counts nothing) when the
    /// permit is stale: issued before a transition, or a trial whose lease expired.
    pub fn complete(&self, permit: Permit, outcome: Outcome) -> bool {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        self.catch_up(&mut inner, now);
        if permit.generation != inner.generation {
            return false;
        }
        let failed = outcome == Outcome::Failure;
        let took = now.saturating_sub(permit.started_at_ms);
        let slow = took > self.settings.slow_call_ms;
        match inner.state {
            CircuitState::Closed if !permit.trial => {
                inner.window.push_back(Call {
                    at_ms: now,
                    failed,
                    slow,
                });
                self.prune(&mut inner, now);
                self.maybe_open(&mut inner, now);
                true
            }
            CircuitState::HalfOpen if permit.trial => {
                let Some(pos) = inner.trials.iter().position(|t| t.id == permit.id) else {
                    return false;
                };
                inner.trials.remove(pos);
                if failed || slow {
                    let reason = if failed {
                        "a trial call failed".to_string()
                    } else {
                        format!(
                            "a trial call was slow ({took} ms > {} ms)",
                            self.settings.slow_call_ms
                        )
                    };
                    self.open(&mut inner, now, CircuitState::HalfOpen, reason);
                } else {
                    inner.trials_succeeded += 1;
                    if inner.trials_succeeded >= self.settings.half_open_trials {
                        let reason =
                            format!("{} trial calls succeeded", self.settings.half_open_trials);
                        self.transition(&mut inner, now, CircuitState::Closed, reason);
                        inner.window.clear();
                        inner.opened_at_ms = None;
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// What `GET /admin/circuits` shows.
    pub fn snapshot(&self) -> CircuitSnapshot {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        self.catch_up(&mut inner, now);
        let (calls, failure_rate_pct, slow_call_rate_pct) = rates(&inner.window);
        let next_half_open_at_ms = match inner.state {
            CircuitState::Open => inner
                .opened_at_ms
                .map(|t| t.saturating_add(self.settings.cooldown_ms)),
            _ => None,
        };
        CircuitSnapshot {
            name: self.name.clone(),
            state: inner.state,
            failure_rate_pct,
            slow_call_rate_pct,
            calls_in_window: calls,
            min_calls: self.settings.min_calls,
            opened_at_ms: inner.opened_at_ms,
            next_half_open_at_ms,
            trials_in_flight: inner.trials.len() as u32,
            trials_succeeded: inner.trials_succeeded,
            rejected: inner.rejected,
            transitions: inner.transitions.iter().cloned().collect(),
        }
    }

    /// Applies what time alone changes: old calls leave a time window, the cooldown ends,
    /// lost trial leases free their slots.
    fn catch_up(&self, inner: &mut Inner, now: u64) {
        self.prune(inner, now);
        if inner.state == CircuitState::Open {
            let until = inner
                .opened_at_ms
                .unwrap_or(now)
                .saturating_add(self.settings.cooldown_ms);
            if now >= until {
                let reason = format!("cooldown of {} ms elapsed", self.settings.cooldown_ms);
                self.transition(inner, now, CircuitState::HalfOpen, reason);
            }
        }
        if inner.state == CircuitState::HalfOpen {
            inner.trials.retain(|t| t.expires_at_ms > now);
        }
    }

    fn prune(&self, inner: &mut Inner, now: u64) {
        match self.settings.window_kind {
            WindowKind::Count => {
                while inner.window.len() > self.settings.window_size as usize {
                    inner.window.pop_front();
                }
            }
            WindowKind::Time => {
                let span = u64::from(self.settings.window_size) * 1000;
                while inner
                    .window
                    .front()
                    .is_some_and(|c| c.at_ms.saturating_add(span) <= now)
                {
                    inner.window.pop_front();
                }
            }
        }
    }

    fn maybe_open(&self, inner: &mut Inner, now: u64) {
        let (calls, failure_rate, slow_rate) = rates(&inner.window);
        if calls < self.settings.min_calls {
            return;
        }
        let reason = if failure_rate >= self.settings.failure_rate_pct {
            format!(
                "failure rate {failure_rate:.1}% >= {}% over {calls} calls",
                self.settings.failure_rate_pct
            )
        } else if slow_rate >= self.settings.slow_call_rate_pct {
            format!(
                "slow-call rate {slow_rate:.1}% >= {}% over {calls} calls",
                self.settings.slow_call_rate_pct
            )
        } else {
            return;
        };
        self.open(inner, now, CircuitState::Closed, reason);
    }

    fn open(&self, inner: &mut Inner, now: u64, from: CircuitState, reason: String) {
        debug_assert_eq!(inner.state, from);
        self.transition(inner, now, CircuitState::Open, reason);
        inner.opened_at_ms = Some(now);
    }

    fn transition(&self, inner: &mut Inner, now: u64, to: CircuitState, reason: String) {
        let from = inner.state;
        inner.state = to;
        inner.generation += 1;
        inner.trials.clear();
        inner.trials_succeeded = 0;
        inner.transitions.push_front(Transition {
            from,
            to,
            at_ms: now,
            reason,
        });
        inner.transitions.truncate(self.settings.transitions_kept);
    }
}

/// (calls, failure rate %, slow-call rate %) of the window.
fn rates(window: &VecDeque<Call>) -> (u32, f64, f64) {
    let calls = window.len() as u32;
    if calls == 0 {
        return (0, 0.0, 0.0);
    }
    let failed = window.iter().filter(|c| c.failed).count() as f64;
    let slow = window.iter().filter(|c| c.slow).count() as f64;
    let n = f64::from(calls);
    (calls, failed * 100.0 / n, slow * 100.0 / n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use proptest::prelude::*;

    fn breaker(settings: CircuitSettings) -> (CircuitBreaker, ManualClock) {
        let clock = ManualClock::new(1_000);
        let b = CircuitBreaker::new("billing", settings, Arc::new(clock.clone())).unwrap();
        (b, clock)
    }

    fn small() -> CircuitSettings {
        CircuitSettings {
            window_size: 4,
            min_calls: 4,
            cooldown_ms: 5_000,
            half_open_trials: 2,
            trial_lease_ttl_ms: 1_000,
            slow_call_ms: 100,
            ..CircuitSettings::default()
        }
    }

    fn call(b: &CircuitBreaker, outcome: Outcome) -> bool {
        let p = b.acquire().expect("permitted");
        b.complete(p, outcome)
    }

    fn open_it(b: &CircuitBreaker) {
        for _ in 0..4 {
            assert!(call(b, Outcome::Failure));
        }
        assert_eq!(b.state(), CircuitState::Open);
    }

    #[test]
    fn defaults_are_the_documented_ones_and_valid() {
        let s = CircuitSettings::default();
        assert_eq!(s.failure_rate_pct, 50.0);
        assert_eq!(s.slow_call_rate_pct, 100.0);
        assert_eq!(s.slow_call_ms, 2000);
        assert_eq!(s.window_kind, WindowKind::Count);
        assert_eq!(s.window_size, 20);
        assert_eq!(s.min_calls, 10);
        assert_eq!(s.cooldown_ms, 30_000);
        assert_eq!(s.half_open_trials, 3);
        assert_eq!(s.trial_lease_ttl_ms, 10_000);
        assert_eq!(s.transitions_kept, 20);
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn invalid_settings_are_refused_each_with_its_message() {
        let d = CircuitSettings::default;
        let cases: Vec<(CircuitSettings, &str, &str)> = vec![
            (
                CircuitSettings {
                    failure_rate_pct: 101.0,
                    ..d()
                },
                "failure_rate_pct",
                "invalid setting `failure_rate_pct`: must be above 0 and at most 100 (percent), got 101",
            ),
            (
                CircuitSettings {
                    failure_rate_pct: -1.0,
                    ..d()
                },
                "failure_rate_pct",
                "invalid setting `failure_rate_pct`: must be above 0 and at most 100 (percent), got -1",
            ),
            (
                CircuitSettings {
                    slow_call_rate_pct: f64::NAN,
                    ..d()
                },
                "slow_call_rate_pct",
                "invalid setting `slow_call_rate_pct`: must be above 0 and at most 100 (percent), got NaN",
            ),
            (
                CircuitSettings {
                    slow_call_rate_pct: 0.0,
                    ..d()
                },
                "slow_call_rate_pct",
                "invalid setting `slow_call_rate_pct`: must be above 0 and at most 100 (percent), got 0",
            ),
            (
                CircuitSettings {
                    slow_call_ms: 0,
                    ..d()
                },
                "slow_call_ms",
                "invalid setting `slow_call_ms`: must be at least 1",
            ),
            (
                CircuitSettings {
                    window_size: 0,
                    ..d()
                },
                "window_size",
                "invalid setting `window_size`: must be at least 1",
            ),
            (
                CircuitSettings {
                    min_calls: 0,
                    ..d()
                },
                "min_calls",
                "invalid setting `min_calls`: must be at least 1",
            ),
            (
                CircuitSettings {
                    min_calls: 21,
                    ..d()
                },
                "min_calls",
                "invalid setting `min_calls`: 21 is above the count window of 20 calls, so the circuit could never open",
            ),
            (
                CircuitSettings {
                    cooldown_ms: 0,
                    ..d()
                },
                "cooldown_ms",
                "invalid setting `cooldown_ms`: must be at least 1",
            ),
            (
                CircuitSettings {
                    half_open_trials: 0,
                    ..d()
                },
                "half_open_trials",
                "invalid setting `half_open_trials`: must be at least 1",
            ),
            (
                CircuitSettings {
                    trial_lease_ttl_ms: 0,
                    ..d()
                },
                "trial_lease_ttl_ms",
                "invalid setting `trial_lease_ttl_ms`: must be at least 1",
            ),
            (
                CircuitSettings {
                    transitions_kept: 0,
                    ..d()
                },
                "transitions_kept",
                "invalid setting `transitions_kept`: must be at least 1",
            ),
        ];
        for (s, setting, message) in cases {
            let e = s.validate().unwrap_err();
            assert_eq!(e.setting, setting);
            assert_eq!(e.to_string(), message);
            let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(0));
            assert_eq!(CircuitBreaker::new("x", s, clock).unwrap_err(), e);
        }
        // A time window counts seconds, not calls: min_calls above it is fine.
        let t = CircuitSettings {
            window_kind: WindowKind::Time,
            window_size: 5,
            min_calls: 10,
            ..d()
        };
        assert_eq!(t.validate(), Ok(()));
    }

    #[test]
    fn failure_rate_opens_only_once_min_calls_are_seen() {
        let (b, clock) = breaker(small());
        for _ in 0..3 {
            assert!(call(&b, Outcome::Failure));
        }
        assert_eq!(b.state(), CircuitState::Closed, "3 calls < min_calls 4");
        assert!(call(&b, Outcome::Failure));
        assert_eq!(b.state(), CircuitState::Open);
        let r = b.acquire().unwrap_err();
        assert_eq!(
            r,
            Rejected {
                state: CircuitState::Open,
                retry_after_ms: 5_000
            }
        );
        clock.advance(1_500);
        assert_eq!(b.acquire().unwrap_err().retry_after_ms, 3_500);
        let s = b.snapshot();
        assert_eq!(s.rejected, 2);
        assert_eq!(s.opened_at_ms, Some(1_000));
        assert_eq!(s.next_half_open_at_ms, Some(6_000));
        assert_eq!(s.transitions.len(), 1);
        assert_eq!(s.transitions[0].from, CircuitState::Closed);
        assert_eq!(s.transitions[0].to, CircuitState::Open);
        assert_eq!(
            s.transitions[0].reason,
            "failure rate 100.0% >= 50% over 4 calls"
        );
    }

    #[test]
    fn below_the_failure_rate_it_stays_closed_and_the_count_window_slides() {
        let (b, _clock) = breaker(small());
        // F S S S: 25 % < 50 %.
        assert!(call(&b, Outcome::Failure));
        for _ in 0..3 {
            assert!(call(&b, Outcome::Success));
        }
        assert_eq!(b.state(), CircuitState::Closed);
        // Window is now S S S F (the first F slid out) → 25 %, then S S F F → 50 % opens.
        assert!(call(&b, Outcome::Failure));
        let s = b.snapshot();
        assert_eq!(s.calls_in_window, 4);
        assert_eq!(s.failure_rate_pct, 25.0);
        assert_eq!(s.state, CircuitState::Closed);
        assert!(call(&b, Outcome::Failure));
        assert_eq!(b.state(), CircuitState::Open);
    }

    #[test]
    fn slow_calls_open_it_even_when_they_succeed() {
        let (b, clock) = breaker(CircuitSettings {
            slow_call_rate_pct: 75.0,
            ..small()
        });
        for i in 0..4 {
            let p = b.acquire().unwrap();
            clock.advance(if i == 0 { 100 } else { 101 }); // 100 ms is not slower than 100
            assert!(b.complete(p, Outcome::Success));
        }
        assert_eq!(b.state(), CircuitState::Open);
        let s = b.snapshot();
        assert_eq!(s.slow_call_rate_pct, 75.0);
        assert_eq!(s.failure_rate_pct, 0.0);
        assert_eq!(
            s.transitions[0].reason,
            "slow-call rate 75.0% >= 75% over 4 calls"
        );
    }

    #[test]
    fn a_time_window_forgets_old_calls() {
        let (b, clock) = breaker(CircuitSettings {
            window_kind: WindowKind::Time,
            window_size: 10,
            min_calls: 3,
            ..small()
        });
        assert!(call(&b, Outcome::Failure));
        assert!(call(&b, Outcome::Failure));
        clock.advance(10_000);
        assert_eq!(b.snapshot().calls_in_window, 0, "both are 10 s old");
        assert!(call(&b, Outcome::Failure));
        assert_eq!(b.state(), CircuitState::Closed, "1 call in the window");
        clock.advance(9_999);
        assert!(call(&b, Outcome::Failure));
        assert!(call(&b, Outcome::Failure));
        assert_eq!(b.state(), CircuitState::Open, "3 failures within 10 s");
    }

    #[test]
    fn half_open_with_no_traffic_then_trials_close_it_with_a_fresh_window() {
        let (b, clock) = breaker(small());
        open_it(&b);
        clock.advance(4_999);
        assert_eq!(b.state(), CircuitState::Open);
        clock.advance(1);
        // No call arrived: asking is enough.
        assert_eq!(b.state(), CircuitState::HalfOpen);
        let t1 = b.acquire().unwrap();
        let t2 = b.acquire().unwrap();
        assert!(t1.is_trial() && t2.is_trial());
        let r = b.acquire().unwrap_err();
        assert_eq!(
            r,
            Rejected {
                state: CircuitState::HalfOpen,
                retry_after_ms: 1_000
            }
        );
        assert!(b.complete(t1, Outcome::Success));
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(b.acquire().is_err(), "1 succeeded + 1 in flight = 2 trials");
        assert!(b.complete(t2, Outcome::Success));
        assert_eq!(b.state(), CircuitState::Closed);
        let s = b.snapshot();
        assert_eq!(s.calls_in_window, 0, "fresh window");
        assert_eq!(s.opened_at_ms, None);
        let edges: Vec<_> = s.transitions.iter().map(|t| (t.from, t.to)).collect();
        use CircuitState::*;
        assert_eq!(
            edges,
            vec![(HalfOpen, Closed), (Open, HalfOpen), (Closed, Open)]
        );
        assert_eq!(s.transitions[0].reason, "2 trial calls succeeded");
        assert_eq!(s.transitions[1].reason, "cooldown of 5000 ms elapsed");
        // One failure after closing does not reopen: the window starts empty.
        assert!(call(&b, Outcome::Failure));
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[test]
    fn it_says_when_time_alone_next_moves_it() {
        let (b, clock) = breaker(small());
        assert_eq!(b.next_change_at_ms(), None, "closed: only calls move it");
        open_it(&b);
        let opened = clock.now_ms();
        assert_eq!(b.next_change_at_ms(), Some(opened + 5_000));
        clock.advance(4_999);
        assert_eq!(b.state(), CircuitState::Open);
        clock.advance(1);
        // Asked at that moment, it has moved; half-open waits for calls, not for time.
        assert_eq!(b.next_change_at_ms(), None);
        assert_eq!(b.state(), CircuitState::HalfOpen);
        let p = b.acquire().unwrap();
        b.complete(p, Outcome::Failure);
        assert_eq!(b.next_change_at_ms(), Some(clock.now_ms() + 5_000));
    }

    #[test]
    fn a_failed_or_slow_trial_reopens_with_a_new_cooldown() {
        let (b, clock) = breaker(small());
        open_it(&b);
        clock.advance(5_000);
        let t = b.acquire().unwrap();
        assert!(b.complete(t, Outcome::Failure));
        assert_eq!(b.state(), CircuitState::Open);
        assert_eq!(b.snapshot().opened_at_ms, Some(6_000));
        assert_eq!(b.acquire().unwrap_err().retry_after_ms, 5_000);
        clock.advance(5_000);
        let t = b.acquire().unwrap();
        clock.advance(101);
        assert!(b.complete(t, Outcome::Success));
        assert_eq!(b.state(), CircuitState::Open);
        assert_eq!(
            b.snapshot().transitions[0].reason,
            "a trial call was slow (101 ms > 100 ms)"
        );
    }

    #[test]
    fn a_lost_trial_lease_expires_and_frees_its_slot() {
        let (b, clock) = breaker(CircuitSettings {
            half_open_trials: 1,
            ..small()
        });
        open_it(&b);
        clock.advance(5_000);
        let lost = b.acquire().unwrap();
        assert_eq!(b.acquire().unwrap_err().retry_after_ms, 1_000);
        clock.advance(999);
        assert!(b.acquire().is_err());
        clock.advance(1);
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert_eq!(b.snapshot().trials_in_flight, 0);
        let t = b.acquire().expect("the lost lease freed its slot");
        // The lost trial coming back late is not counted, even as a failure.
        assert!(!b.complete(lost, Outcome::Failure));
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(b.complete(t, Outcome::Success));
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[test]
    fn completions_from_before_a_transition_are_ignored() {
        let (b, clock) = breaker(small());
        let early = b.acquire().unwrap();
        let from_first_closed = b.acquire().unwrap();
        open_it(&b);
        assert!(!b.complete(early, Outcome::Failure), "issued while closed");
        clock.advance(5_000);
        let t = b.acquire().unwrap();
        let t2 = b.acquire().unwrap();
        assert!(b.complete(t2, Outcome::Failure));
        assert_eq!(b.state(), CircuitState::Open);
        assert!(
            !b.complete(t, Outcome::Success),
            "trial of an earlier half-open"
        );
        clock.advance(5_000);
        let t3 = b.acquire().unwrap();
        let t4 = b.acquire().unwrap();
        assert!(b.complete(t3, Outcome::Success));
        assert!(b.complete(t4, Outcome::Success));
        assert_eq!(b.state(), CircuitState::Closed);
        // Closed again, but this permit is from the closed state before the first opening.
        assert!(!b.complete(from_first_closed, Outcome::Failure));
        assert_eq!(b.snapshot().calls_in_window, 0);
    }

    #[test]
    fn transitions_are_bounded_newest_first_and_the_snapshot_serializes() {
        let (b, clock) = breaker(CircuitSettings {
            transitions_kept: 3,
            ..small()
        });
        open_it(&b);
        clock.advance(5_000);
        let t = b.acquire().unwrap();
        assert!(b.complete(t, Outcome::Failure));
        clock.advance(5_000);
        assert_eq!(b.state(), CircuitState::HalfOpen);
        let s = b.snapshot();
        assert_eq!(s.transitions.len(), 3);
        assert_eq!(s.transitions[0].at_ms, 11_000);
        assert_eq!(s.transitions[2].at_ms, 6_000);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "billing",
                "state": "half_open",
                "failureRatePct": 100.0,
                "slowCallRatePct": 0.0,
                "callsInWindow": 4,
                "minCalls": 4,
                "openedAtMs": 6000,
                "nextHalfOpenAtMs": null,
                "trialsInFlight": 0,
                "trialsSucceeded": 0,
                "rejected": 0,
                "transitions": [
                    {"from": "open", "to": "half_open", "atMs": 11000,
                     "reason": "cooldown of 5000 ms elapsed"},
                    {"from": "half_open", "to": "open", "atMs": 6000,
                     "reason": "a trial call failed"},
                    {"from": "open", "to": "half_open", "atMs": 6000,
                     "reason": "cooldown of 5000 ms elapsed"},
                ]
            })
        );
    }

    #[test]
    fn settings_deserialize_with_defaults_for_missing_keys() {
        let s: CircuitSettings =
            serde_json::from_str(r#"{"window_kind":"time","window_size":60}"#).unwrap();
        assert_eq!(s.window_kind, WindowKind::Time);
        assert_eq!(s.window_size, 60);
        assert_eq!(s.min_calls, 10);
        assert!(serde_json::from_str::<CircuitSettings>(r#"{"windw":1}"#).is_err());
    }

    #[test]
    fn huge_settings_saturate_instead_of_overflowing() {
        let (b, clock) = breaker(CircuitSettings {
            cooldown_ms: u64::MAX,
            trial_lease_ttl_ms: u64::MAX,
            ..small()
        });
        open_it(&b);
        clock.advance(1_000_000);
        assert_eq!(b.state(), CircuitState::Open);
        assert_eq!(b.snapshot().next_half_open_at_ms, Some(u64::MAX));
    }

    #[test]
    fn shared_between_threads_every_call_is_counted_once() {
        let (b, _clock) = breaker(CircuitSettings {
            window_size: 1_000,
            min_calls: 1_000,
            ..small()
        });
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        let p = b.acquire().expect("closed never rejects");
                        assert!(b.complete(p, Outcome::Success));
                    }
                });
            }
        });
        assert_eq!(b.snapshot().calls_in_window, 400);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire,
        Complete { idx: usize, fail: bool },
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Acquire),
            3 => (0usize..8, any::<bool>()).prop_map(|(idx, fail)| Op::Complete { idx, fail }),
            2 => (0u64..3_000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        #[test]
        fn invariants_hold_for_any_sequence(
            ops in proptest::collection::vec(op(), 1..200),
            time_window in any::<bool>(),
        ) {
            let settings = CircuitSettings {
                window_kind: if time_window { WindowKind::Time } else { WindowKind::Count },
                window_size: 4,
                min_calls: 3,
                cooldown_ms: 2_000,
                half_open_trials: 2,
                trial_lease_ttl_ms: 1_500,
                slow_call_ms: 1_000,
                transitions_kept: 1_000,
                ..CircuitSettings::default()
            };
            let (b, clock) = breaker(settings);
            let mut held: Vec<Permit> = Vec::new();
            for op in ops {
                match op {
                    Op::Acquire => {
                        let before = b.state();
                        match b.acquire() {
                            Ok(p) => {
                                prop_assert_eq!(p.is_trial(), before == CircuitState::HalfOpen);
                                held.push(p);
                            }
                            Err(r) => {
                                prop_assert_ne!(before, CircuitState::Closed, "closed never rejects");
                                prop_assert!(r.retry_after_ms >= 1);
                            }
                        }
                    }
                    Op::Complete { idx, fail } => {
                        if !held.is_empty() {
                            let p = held.remove(idx % held.len());
                            let outcome = if fail { Outcome::Failure } else { Outcome::Success };
                            b.complete(p, outcome);
                        }
                    }
                    Op::Advance(ms) => clock.advance(ms),
                }
                let s = b.snapshot();
                if s.state == CircuitState::HalfOpen {
                    prop_assert!(s.trials_in_flight + s.trials_succeeded <= 2);
                } else {
                    prop_assert_eq!(s.trials_in_flight, 0);
                }
                prop_assert_eq!(s.state == CircuitState::Open, s.next_half_open_at_ms.is_some());
            }
            // Every recorded transition is an allowed edge, and they chain.
            let s = b.snapshot();
            let chain: Vec<_> = s.transitions.iter().rev().collect();
            let mut at = CircuitState::Closed;
            for t in chain {
                use CircuitState::*;
                prop_assert_eq!(t.from, at);
                prop_assert!(matches!(
                    (t.from, t.to),
                    (Closed, Open) | (Open, HalfOpen) | (HalfOpen, Open) | (HalfOpen, Closed)
                ), "edge {:?} -> {:?}", t.from, t.to);
                at = t.to;
            }
            prop_assert_eq!(at, s.state);
        }
    }
}
