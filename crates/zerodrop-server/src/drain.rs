//! Drain: taking an instance out of service without dropping anything.
//!
//! `active → draining → drained`. While draining, readiness is 503, new WebSocket/SSE
//! connections are refused with `DRAINING` (and counted), and every connected client is told
//! to `reconnect` (with a fresh resume token) at a moment spread over
//! `max_session_age_seconds`, so the other instances absorb the load gradually. The state turns
//! `drained` by itself when the last connection is gone, or at once on `complete`, which
//! closes whatever remains. HTTP publish, reads, checkpoints and reconnects keep working
//! throughout: only new long-lived connections are refused.
//!
//! Connections learn about the phase through a `watch` channel ([`Drain::watch`]); they pick
//! their own reconnect moment with [`DrainPhase::deadline_for`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use zerodrop_core::now_ms;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainState {
    Active,
    Draining,
    Drained,
}

impl DrainState {
    pub fn as_str(self) -> &'static str {
        match self {
            DrainState::Active => "active",
            DrainState::Draining => "draining",
            DrainState::Drained => "drained",
        }
    }

    pub fn gauge(self) -> u8 {
        match self {
            DrainState::Active => 0,
            DrainState::Draining => 1,
            DrainState::Drained => 2,
        }
    }
}

/// What connections watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainPhase {
    Active,
    /// Reconnect at `started + spread × (your fraction)`.
    Draining {
        started: Instant,
        spread: Duration,
    },
    /// Close now.
    Closing,
}

impl DrainPhase {
    /// When a connection whose spread fraction is `fraction` (0..1) should be told to go.
    pub fn deadline_for(self, fraction: f64) -> Option<Instant> {
        match self {
            DrainPhase::Active => None,
            DrainPhase::Draining { started, spread } => {
                Some(started + spread.mul_f64(fraction.clamp(0.0, 1.0)))
            }
            DrainPhase::Closing => Some(Instant::now()),
        }
    }
}

struct Info {
    state: DrainState,
    reason: Option<String>,
    started_at_ms: Option<u64>,
    deadline_ms: Option<u64>,
}

/// Told every state change, under the drain's lock (so calls arrive in order).
type OnState = Box<dyn Fn(DrainState) + Send + Sync>;

pub struct Drain {
    phase: watch::Sender<DrainPhase>,
    info: Mutex<Info>,
    blocked: AtomicU64,
    on_state: OnState,
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

impl Drain {
    pub fn new() -> Drain {
        Drain::observed(|_| {})
    }

    /// A drain that reports every state change to `on_state` (the `zerodrop_drain_state`
    /// gauge), whoever made it: the admin API, a signal, or the last connection leaving.
    pub fn observed(on_state: impl Fn(DrainState) + Send + Sync + 'static) -> Drain {
        Drain {
            on_state: Box::new(on_state),
            phase: watch::Sender::new(DrainPhase::Active),
            info: Mutex::new(Info {
                state: DrainState::Active,
                reason: None,
                started_at_ms: None,
                deadline_ms: None,
            }),
            blocked: AtomicU64::new(0),
        }
    }

    fn info(&self) -> std::sync::MutexGuard<'_, Info> {
        self.info.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn watch(&self) -> watch::Receiver<DrainPhase> {
        self.phase.subscribe()
    }

    pub fn state(&self) -> DrainState {
        self.info().state
    }

    /// Whether new long-lived connections are refused.
    pub fn is_refusing(&self) -> bool {
        self.state() != DrainState::Active
    }

    /// Starts draining (a second call while draining changes nothing but is not an error).
    pub fn start(&self, reason: &str, spread: Duration) -> DrainState {
        let mut info = self.info();
        if info.state == DrainState::Active {
            let now = now_ms();
            info.state = DrainState::Draining;
            info.reason = Some(reason.to_string());
            info.started_at_ms = Some(now);
            info.deadline_ms = Some(now + spread.as_millis() as u64);
            self.phase.send_replace(DrainPhase::Draining {
                started: Instant::now(),
                spread,
            });
            (self.on_state)(info.state);
            tracing::warn!(reason, spread_sec = spread.as_secs_f64(), "drain started");
        }
        info.state
    }

    /// Ends the drain: closes what remains and reports `drained`.
    pub fn complete(&self) {
        let mut info = self.info();
        if info.state == DrainState::Active {
            let now = now_ms();
            info.reason = Some("complete".into());
            info.started_at_ms = Some(now);
            info.deadline_ms = Some(now);
        }
        if info.state != DrainState::Drained {
            tracing::warn!("drain completed");
        }
        info.state = DrainState::Drained;
        (self.on_state)(info.state);
        self.phase.send_replace(DrainPhase::Closing);
    }

    /// Called when the connection count changes: a drain with nothing left is drained.
    pub fn on_connections(&self, remaining: usize) {
        if remaining == 0 {
            let mut info = self.info();
            if info.state == DrainState::Draining {
                info.state = DrainState::Drained;
                (self.on_state)(info.state);
                tracing::warn!("drain finished: no connection remains");
            }
        }
    }

    pub fn blocked_upgrade(&self) {
        self.blocked.fetch_add(1, Ordering::Relaxed);
    }

    pub fn blocked_total(&self) -> u64 {
        self.blocked.load(Ordering::Relaxed)
    }

    pub fn status(&self, sessions_remaining: usize) -> Value {
        self.on_connections(sessions_remaining);
        let info = self.info();
        json!({
            "state": info.state,
            "reason": info.reason,
            "startedAt": info.started_at_ms,
            "deadline": info.deadline_ms,
            "sessionsRemaining": sessions_remaining,
            "upgradesBlocked": self.blocked_total(),
        })
    }

    /// Seconds a refused client should wait before trying elsewhere.
    pub fn retry_after_sec(&self) -> u64 {
        1
    }
}

/// Counts WebSocket and SSE connections against `--max-connections`.
pub struct Connections {
    count: AtomicUsize,
    max: usize,
}

impl Connections {
    pub fn new(max: usize) -> Connections {
        Connections {
            count: AtomicUsize::new(0),
            max,
        }
    }

    pub fn current(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Takes a slot unless the limit is reached.
    pub fn try_acquire(&self) -> bool {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives a slot back; returns how many remain taken.
    pub fn release(&self) -> usize {
        self.count.fetch_sub(1, Ordering::AcqRel).saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle() {
        let d = Drain::new();
        let c = Connections::new(2);
        assert!(c.try_acquire() && c.try_acquire());
        assert!(!c.try_acquire(), "over capacity");
        let rx = d.watch();
        assert_eq!(
            d.start("rolling_deployment", Duration::from_secs(10)),
            DrainState::Draining
        );
        assert!(matches!(*rx.borrow(), DrainPhase::Draining { .. }));
        assert_eq!(d.status(2)["state"], "draining");
        d.on_connections(c.release());
        assert_eq!(d.state(), DrainState::Draining);
        d.on_connections(c.release());
        assert_eq!(
            d.state(),
            DrainState::Drained,
            "drained once nothing remains"
        );
        d.complete();
        assert_eq!(*rx.borrow(), DrainPhase::Closing);
    }

    #[test]
    fn every_state_change_is_reported() {
        use std::sync::Arc;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let d = Drain::observed(move |s| log.lock().unwrap().push(s.gauge()));
        d.on_connections(0);
        d.start("test", Duration::from_secs(1));
        d.start("again", Duration::from_secs(1));
        d.on_connections(1);
        d.on_connections(0);
        assert_eq!(*seen.lock().unwrap(), vec![1, 2], "drained by itself");
        d.complete();
        assert_eq!(seen.lock().unwrap().last(), Some(&2));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let d = Drain::observed(move |s| log.lock().unwrap().push(s.gauge()));
        d.complete();
        assert_eq!(*seen.lock().unwrap(), vec![2], "completed without a start");
    }

    #[test]
    fn deadlines_spread_over_the_window() {
        let started = Instant::now();
        let p = DrainPhase::Draining {
            started,
            spread: Duration::from_secs(60),
        };
        assert_eq!(p.deadline_for(0.0), Some(started));
        assert_eq!(p.deadline_for(0.5), Some(started + Duration::from_secs(30)));
        assert_eq!(p.deadline_for(2.0), Some(started + Duration::from_secs(60)));
        assert_eq!(DrainPhase::Active.deadline_for(0.3), None);
    }
}
