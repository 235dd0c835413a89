//! Age retention, at least every second: streams due (by the age index) are trimmed by the
//! `AGE` script against the server's clock; and once a minute, ended sessions leave the stats
//! index. (Count and size limits trim inside the append script, with each stream's own.)
//!
//! The age index scores a stream by its oldest event's ts plus its *age shift*: how much
//! longer than the shortest age of any stream it keeps events (0 for every stream when all
//! keep the same age). A stream is due once its score is older than the shortest age, i.e.
//! exactly when its oldest event is older than its own age, so one range query finds the due
//! streams whatever their ages. A score written under other settings is corrected by the
//! stream's next sweep (a score too low makes it due early: the script finds nothing to trim
//! and scores it again); after a pattern's age was shortened, a stream indexed under the
//! longer age is trimmed when that older score falls due, or at its next new log.
//!
//! Must not: hold Redis for long: a sweep visits a bounded number of streams and events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::Value;
use zerodrop_core::{Epoch, Retention, StreamId};

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
    /// The retention limits of `stream`: its most specific pattern's, else the global ones.
    pub(super) fn limits(&self, stream: &StreamId) -> &Retention {
        self.opts
            .retention_patterns
            .resolve(stream.as_str())
            .map_or(&self.opts.retention, |r| r.value)
    }

    /// The shortest age any stream keeps.
    fn shortest_age_ms(&self) -> u64 {
        self.opts
            .retention_patterns
            .values()
            .map(|r| r.max_age_ms)
            .fold(self.opts.retention.max_age_ms, u64::min)
    }

    /// How much longer than the shortest age `stream` keeps events: added to its score in
    /// the age index, so that the index orders streams by when they are due.
    pub(super) fn age_shift(&self, stream: &StreamId) -> u64 {
        if self.opts.retention_patterns.is_empty() {
            return 0;
        }
        self.limits(stream).max_age_ms - self.shortest_age_ms()
    }

    pub(super) async fn sweep_age(&self) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let (secs, micros): (u64, u64) = self
            .run("time", async {
                ::redis::cmd("TIME").query_async(&mut conn).await
            })
            .await?;
        let age_cut = cutoff(secs * 1000 + micros / 1000, self.shortest_age_ms());
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
                    .arg(self.limits(&stream).max_age_ms)
                    .arg(SWEEP_CAP);
                let v = as_array(self.eval("age retention", &call).await?)
                    .ok_or_else(|| unexpected("age retention"))?;
                let score = v
                    .first()
                    .and_then(as_u64)
                    .ok_or_else(|| unexpected("age retention"))?
                    .saturating_add(self.age_shift(&stream));
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
