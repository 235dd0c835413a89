//! Redis's clock as this instance estimates it, sent with each append so that the append
//! script does not read `TIME`.
//!
//! Event stamps are on the Redis server's clock: one clock for every instance, which the age
//! cut (`AGE`) reads too. Reading it inside the append script cost Redis about a tenth of the
//! script's work (a command dispatched from Lua, its two-value reply, two `strtod`s), so the
//! instance measures the offset between its time line and Redis's `TIME` when it starts and
//! every [`CLOCK_EVERY`] (a reading is kept only when its round trip took at most
//! [`CLOCK_ROUND_TRIP`]: the estimate is off by at most half of it), and each append sends
//! its time line plus that offset. The script stamps the event with the later of the
//! estimate and the stream's last stamp, so a stream's stamps never go back, whichever
//! instance appends. Without an estimate (none measured yet, or a cluster, whose masters
//! each have a clock of their own) the script reads `TIME` as before.
//!
//! Must not: send an estimate made from a reading that took longer than
//! [`CLOCK_ROUND_TRIP`].

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use super::Shared;

/// How often the offset is measured again.
const CLOCK_EVERY: Duration = Duration::from_secs(10);
/// The longest round trip of a `TIME` reading that is kept.
const CLOCK_ROUND_TRIP: u64 = 20;

/// Redis's clock minus this instance's time line, in ms: none yet.
pub(super) struct ClockOffset(AtomicI64);

impl ClockOffset {
    const UNKNOWN: i64 = i64::MIN;

    pub(super) fn new() -> ClockOffset {
        ClockOffset(AtomicI64::new(Self::UNKNOWN))
    }

    pub(super) fn get(&self) -> Option<i64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&o| o != Self::UNKNOWN)
    }
}

impl Shared {
    /// Redis's clock now, in ms, as estimated from the last kept reading.
    pub(super) fn redis_now_ms(&self) -> Option<u64> {
        let offset = self.clock_offset.get()?;
        Some(
            (self.opts.clock.now_ms() as i64)
                .saturating_add(offset)
                .max(0) as u64,
        )
    }

    /// Reads `TIME` and keeps the offset when the round trip was short enough.
    async fn read_clock(&self) {
        let mut conn = self.conn.clone();
        let before = self.opts.clock.now_ms();
        let cmd = ::redis::cmd("TIME");
        let time = cmd.query_async::<(u64, u64)>(&mut conn);
        let Ok(Ok((secs, micros))) = tokio::time::timeout(self.opts.command_timeout, time).await
        else {
            return;
        };
        let after = self.opts.clock.now_ms();
        if after.saturating_sub(before) > CLOCK_ROUND_TRIP {
            return;
        }
        let redis_ms = secs.saturating_mul(1000).saturating_add(micros / 1000);
        let ours = before + (after - before) / 2;
        let offset = redis_ms as i64 - ours as i64;
        self.clock_offset.0.store(offset, Ordering::Relaxed);
    }
}

/// Measures the offset at once and every [`CLOCK_EVERY`]. A cluster keeps none: its masters'
/// clocks may differ.
pub(super) async fn clock_loop(shared: Arc<Shared>) {
    if shared.cluster {
        return;
    }
    let mut tick = tokio::time::interval(CLOCK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        shared.read_clock().await;
    }
}
