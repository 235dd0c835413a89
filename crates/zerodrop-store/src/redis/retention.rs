//! Age retention, at least every second: streams due (by the age index) are trimmed by the
//! `AGE` script against the server's clock; and once a minute, ended sessions leave the stats
//! index. (Count and size limits trim inside the append script.)
//!
//! Must not: hold Redis for long: a sweep visits a bounded number of streams and events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::Value;
use zerodrop_core::{Epoch, StreamId};

use super::Shared;
use super::conn::{Call, as_array, as_u64, unexpected};
use super::keys::{BASE_EPOCH_KEY, CHANNEL, SESSIONS_INDEX, STREAMS_INDEX, log_key, meta_key};
use crate::StoreResult;
use crate::rules::cutoff;

/// How often age retention runs.
pub(super) const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// Streams visited per age sweep step, and events removed per stream per call.
pub(super) const SWEEP_BATCH: usize = 256;
pub(super) const SWEEP_CAP: u64 = 10_000;
/// How often expired sessions leave the stats index.
pub(super) const SESSION_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Age retention at least every second, and the session index's housekeeping.
pub(super) async fn sweep_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_session_sweep = Instant::now();
    loop {
        tick.tick().await;
        if shared.sweep_age().await.is_err() {
            continue;
        }
        if Instant::now() >= next_session_sweep {
            next_session_sweep = Instant::now() + SESSION_SWEEP_EVERY;
            let mut conn = shared.conn.clone();
            let _ = shared
                .run("session sweep", async {
                    ::redis::cmd("ZREMRANGEBYSCORE")
                        .arg(SESSIONS_INDEX)
                        .arg("-inf")
                        .arg(shared.opts.clock.now_ms())
                        .query_async::<Value>(&mut conn)
                        .await
                })
                .await;
        }
    }
}

impl Shared {
    pub(super) async fn sweep_age(&self) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let (secs, micros): (u64, u64) = self
            .run("time", async {
                ::redis::cmd("TIME").query_async(&mut conn).await
            })
            .await?;
        let age_cut = cutoff(secs * 1000 + micros / 1000, self.opts.retention.max_age_ms);
        // Bounded: a sweep never runs longer than a few batches.
        for _ in 0..8 {
            let due: Vec<String> = self
                .run("age index", async {
                    ::redis::cmd("ZRANGEBYSCORE")
                        .arg(STREAMS_INDEX)
                        .arg("-inf")
                        .arg(format!("({age_cut}"))
                        .arg("LIMIT")
                        .arg(0)
                        .arg(SWEEP_BATCH)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            for name in &due {
                let Ok(stream) = StreamId::new(name) else {
                    continue;
                };
                let call = Call::new(&self.scripts.age)
                    .key(meta_key(&stream))
                    .key(log_key(&stream));
                let call = if self.cluster {
                    call
                } else {
                    call.key(BASE_EPOCH_KEY)
                };
                let call = call
                    .arg(stream.as_str())
                    .arg(Epoch::generate().as_str())
                    .arg("")
                    .arg(0)
                    .arg(if self.cluster { "0" } else { "1" })
                    .arg(CHANNEL)
                    .arg(self.opts.retention.max_age_ms)
                    .arg(SWEEP_CAP);
                let v = as_array(self.eval("age retention", &call).await?)
                    .ok_or_else(|| unexpected("age retention"))?;
                let score = v
                    .first()
                    .and_then(as_u64)
                    .ok_or_else(|| unexpected("age retention"))?;
                self.run("age index", async {
                    ::redis::cmd("ZADD")
                        .arg(STREAMS_INDEX)
                        .arg("XX")
                        .arg(score)
                        .arg(name)
                        .query_async::<Value>(&mut conn)
                        .await
                })
                .await?;
            }
            if due.len() < SWEEP_BATCH {
                break;
            }
        }
        Ok(())
    }
}
