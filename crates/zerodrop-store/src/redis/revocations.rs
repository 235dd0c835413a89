//! Revocations in Redis: one hash (id → the record as JSON) and a version counter bumped in
//! the same transaction as every change, both tagged `{rev}` (one cluster slot). Instances
//! poll the counter and re-read the hash only when it moved.
//!
//! Streams' records ([`crate::Store::stream_record`]) are here too: one string key per
//! stream, in the stream's slot.
//!
//! Must not: decide what a revocation covers (the server does).

use std::collections::HashMap;

use ::redis::Value;

use super::Shared;
use super::keys::{REVOCATIONS, REVOCATIONS_VERSION, record_key};
use crate::{Revocation, StoreResult};
use zerodrop_core::StreamId;

impl Shared {
    pub(super) async fn put_revocation(&self, r: &Revocation) -> StoreResult<()> {
        let record = serde_json::to_string(r).unwrap_or_default();
        let mut conn = self.conn.clone();
        self.run("put revocation", async {
            ::redis::pipe()
                .atomic()
                .hset(REVOCATIONS, &r.id, record)
                .incr(REVOCATIONS_VERSION, 1)
                .query_async::<Value>(&mut conn)
                .await
        })
        .await?;
        Ok(())
    }

    pub(super) async fn delete_revocation(&self, id: &str) -> StoreResult<bool> {
        let mut conn = self.conn.clone();
        let (deleted, _): (u64, u64) = self
            .run("delete revocation", async {
                ::redis::pipe()
                    .atomic()
                    .hdel(REVOCATIONS, id)
                    .incr(REVOCATIONS_VERSION, 1)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(deleted > 0)
    }

    pub(super) async fn stream_record(&self, stream: &StreamId) -> StoreResult<Option<String>> {
        let mut conn = self.conn.clone();
        let key = record_key(stream);
        self.run("read stream record", async {
            ::redis::cmd("GET").arg(&key).query_async(&mut conn).await
        })
        .await
    }

    pub(super) async fn put_stream_record(
        &self,
        stream: &StreamId,
        record: Option<String>,
    ) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let key = record_key(stream);
        self.run("write stream record", async {
            match &record {
                Some(r) => {
                    ::redis::cmd("SET")
                        .arg(&key)
                        .arg(r)
                        .query_async::<Value>(&mut conn)
                        .await
                }
                None => {
                    ::redis::cmd("DEL")
                        .arg(&key)
                        .query_async::<Value>(&mut conn)
                        .await
                }
            }
        })
        .await?;
        Ok(())
    }

    pub(super) async fn revocations(&self) -> StoreResult<Vec<Revocation>> {
        let mut conn = self.conn.clone();
        let all: HashMap<String, String> = self
            .run("read revocations", async {
                ::redis::cmd("HGETALL")
                    .arg(REVOCATIONS)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        // A revocation lapses only once both readings of the clock say so.
        let now = self.opts.clock.restriction_now_ms();
        let (mut active, mut lapsed) = (Vec::new(), Vec::new());
        for (id, json) in all {
            match serde_json::from_str::<Revocation>(&json) {
                Ok(r) if r.active(now) => active.push(r),
                _ => lapsed.push(id),
            }
        }
        if !lapsed.is_empty() {
            // Pruned quietly: they cover nothing any more, and every instance skips them.
            let mut conn = self.conn.clone();
            let _ = self
                .run("prune revocations", async {
                    ::redis::cmd("HDEL")
                        .arg(REVOCATIONS)
                        .arg(&lapsed)
                        .query_async::<Value>(&mut conn)
                        .await
                })
                .await;
        }
        Ok(active)
    }

    pub(super) async fn revocations_version(&self) -> StoreResult<Option<u64>> {
        let mut conn = self.conn.clone();
        let v: Option<u64> = self
            .run("revocations version", async {
                ::redis::cmd("GET")
                    .arg(REVOCATIONS_VERSION)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(Some(v.unwrap_or(0)))
    }
}
