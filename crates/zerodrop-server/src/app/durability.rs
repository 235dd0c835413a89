//! The store's durability level as this instance serves with it: read from the store before
//! the instance serves (`server::build`), again every `durability_recheck` (10 s) and whenever
//! the store answers again after failing (the health loop in `server.rs`); exported as
//! `zerodrop_store_durability{level}`, shown by `/health`, held against
//! `--require-durability` by readiness, and logged when it changes.
//!
//! Must not: decide a level (the store reads its settings, `zerodrop_store::durability` maps
//! them), or refuse a request for it (a level below the requirement makes the instance not
//! ready; what a publish answers is the store's business).

use std::time::Instant;

use zerodrop_store::{Durability, StoreDurability};

use super::{App, lock};

/// The level last read, and when.
pub struct DurabilityState {
    current: StoreDurability,
    /// `None` until the first read (`server::build` makes it before the instance serves).
    read_at: Option<Instant>,
}

impl DurabilityState {
    pub(super) fn new() -> DurabilityState {
        DurabilityState {
            // Replaced by the first read, before anything is served.
            current: StoreDurability::Memory,
            read_at: None,
        }
    }
}

impl App {
    /// What the store's settings make a 201, as last read.
    pub fn durability(&self) -> StoreDurability {
        lock(&self.durability).current.clone()
    }

    /// `--require-durability`, if any.
    pub fn required_durability(&self) -> Option<Durability> {
        self.cfg.require_durability.level()
    }

    /// The level last read is below `--require-durability`: not ready.
    pub fn durability_below_required(&self) -> bool {
        self.required_durability()
            .is_some_and(|want| self.durability().level() < want)
    }

    /// Reads the level from the store now and records it (gauge, `/health`, readiness). A
    /// change from the previous read is logged: at warn when the level fell, at info when it
    /// rose; the first level actually read after a store that could not be asked yet is
    /// announced as at start ([`App::announce_durability`]).
    pub async fn read_durability(&self) -> StoreDurability {
        let now = self.store.durability().await;
        let before = {
            let mut state = lock(&self.durability);
            let first = state.read_at.is_none();
            state.read_at = Some(Instant::now());
            let before = std::mem::replace(&mut state.current, now.clone());
            (!first).then_some(before)
        };
        self.metrics.store_durability(now.level());
        match before {
            Some(b) if b.unreachable() && !now.unreachable() => self.announce_durability(&now),
            Some(b) => self.log_change(&b, &now),
            // The start-up (`server::build`) announces the first read.
            None => {}
        }
        now
    }

    /// Reads the level again when `durability_recheck` has passed since the last read, when
    /// nothing could be read yet, or at once when the store just answered again after failing
    /// (`back`): a Redis that restarted may have come back with other settings.
    pub async fn recheck_durability(&self, back: bool) {
        let due = back || {
            let state = lock(&self.durability);
            state.current.unreachable()
                || state
                    .read_at
                    .is_none_or(|t| t.elapsed() >= self.cfg.durability_recheck)
        };
        if due {
            self.read_durability().await;
        }
    }

    /// The first level read: one error line when it is below `--require-durability`
    /// (readiness answers 503 until it is not; at start the instance refuses to start
    /// instead), else one warning when a 201 is neither fsync- nor replica-durable, naming the
    /// level, the setting that causes it and how to raise it.
    pub fn announce_durability(&self, d: &StoreDurability) {
        let level = d.level();
        if let Some(want) = self.required_durability().filter(|want| level < *want) {
            tracing::error!(
                durability = level.as_str(),
                required = want.as_str(),
                setting = %d.cause(),
                raise = %d.how_to_reach(want).unwrap_or_default(),
                "the store's durability level is below --require-durability: readiness answers \
                 503 (durability_below_required) until it is raised"
            );
        } else if !level.survives_machine_loss() {
            tracing::warn!(
                durability = level.as_str(),
                setting = %d.cause(),
                raise = %d.how_to_reach(Durability::Replicated).unwrap_or_default(),
                "a 201 is not fsync- or replica-durable: a crash of the store's machine (at level \
                 memory, of the store itself) can take back acknowledged events"
            );
        }
    }

    fn log_change(&self, before: &StoreDurability, now: &StoreDurability) {
        let (was, level) = (before.level(), now.level());
        if was == level {
            return;
        }
        let below = self.required_durability().filter(|want| level < *want);
        if level > was {
            tracing::info!(
                durability = level.as_str(),
                was = was.as_str(),
                setting = %now.cause(),
                "the store's durability level rose"
            );
            return;
        }
        let how = now
            .how_to_reach(below.unwrap_or(Durability::Replicated))
            .unwrap_or_default();
        match below {
            Some(want) => tracing::error!(
                durability = level.as_str(),
                was = was.as_str(),
                required = want.as_str(),
                setting = %now.cause(),
                raise = %how,
                "the store's durability level fell below --require-durability: readiness answers \
                 503 (durability_below_required) until it is back"
            ),
            None if !level.survives_machine_loss() => tracing::warn!(
                durability = level.as_str(),
                was = was.as_str(),
                setting = %now.cause(),
                raise = %how,
                "the store's durability level fell: a 201 is not fsync- or replica-durable"
            ),
            None => tracing::warn!(
                durability = level.as_str(),
                was = was.as_str(),
                setting = %now.cause(),
                "the store's durability level fell"
            ),
        }
    }
}
