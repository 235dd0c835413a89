//! The store's durability level, read from Redis itself each time it is asked: `CONFIG GET
//! appendonly` and `CONFIG GET appendfsync` (two commands: Redis 6.2 takes one parameter per
//! `CONFIG GET`), and `connected_slaves` from `INFO replication`. On a cluster every master is
//! asked and the weakest answer counts: an append may land on any of them.
//!
//! `CONFIG` is often disabled on managed Redis (renamed away, or denied by an ACL). Then the
//! settings cannot be read and the level is the weakest that cannot be excluded (`memory`, or
//! `replicated` when appends `WAIT` for replicas); that is logged once, at warn, with Redis's
//! answer, and again only after the settings were readable in between. While Redis does not
//! answer at all, the last level read stands (an outage changes no setting; the next read
//! after it sees a restart's new settings).
//!
//! Must not: change a Redis setting (zerodrop only reads them), or decide a level (that rule
//! is `crate::durability`'s).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use ::redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
use ::redis::{Cmd, RedisError, Value};

use super::conn::{Conn, as_str, fields};
use super::health::is_outage;
use super::{Shared, lock};
use crate::{RedisPersistence, StoreDurability, Unread};

/// One master's reply: the master's address (empty for a single server) and what it said.
type Replies = Vec<(String, Result<Value, RedisError>)>;

impl Shared {
    pub(super) async fn durability(&self) -> StoreDurability {
        let read = tokio::time::timeout(self.opts.command_timeout, self.read_persistence()).await;
        let why = match read {
            Ok(Ok(p)) => {
                self.note_durability(&p);
                *lock(&self.durability) = Some(p.clone());
                return StoreDurability::Redis(p);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        let last = lock(&self.durability).clone();
        StoreDurability::Redis(last.unwrap_or_else(|| {
            RedisPersistence::unread(self.opts.wait_replicas, Unread::Unreachable(why))
        }))
    }

    /// Every master's settings, the weakest of them returned. `Err` only when Redis could not
    /// be asked (an outage); a refusal is a fact of the answer.
    async fn read_persistence(&self) -> Result<RedisPersistence, RedisError> {
        let config_get = |name: &str| {
            let mut c = ::redis::cmd("CONFIG");
            c.arg("GET").arg(name);
            c
        };
        let appendonly = self.ask_masters(config_get("appendonly")).await?;
        let appendfsync = self.ask_masters(config_get("appendfsync")).await?;
        let mut info = ::redis::cmd("INFO");
        info.arg("replication");
        let replication: BTreeMap<String, Result<Value, RedisError>> =
            self.ask_masters(info).await?.into_iter().collect();
        let mut appendfsync: BTreeMap<String, Result<Value, RedisError>> =
            appendfsync.into_iter().collect();
        let wait = self.opts.wait_replicas;
        let nodes = appendonly.into_iter().map(|(node, appendonly)| {
            let appendfsync = appendfsync
                .remove(&node)
                .unwrap_or_else(|| Err(RedisError::from(std::io::Error::other("no answer"))));
            let connected_replicas = match replication.get(&node) {
                Some(Ok(v)) => as_str(v).and_then(connected_slaves),
                _ => None,
            };
            let setting = |name: &str, reply: Result<Value, RedisError>| match reply {
                Ok(v) => fields(v)
                    .and_then(|mut f| f.remove(name))
                    .ok_or_else(|| format!("CONFIG GET {name} answered no value")),
                Err(e) => Err(e.to_string()),
            };
            match (
                setting("appendonly", appendonly),
                setting("appendfsync", appendfsync),
            ) {
                (Ok(appendonly), Ok(appendfsync)) => RedisPersistence {
                    appendonly: Some(appendonly),
                    appendfsync: Some(appendfsync),
                    wait_replicas: wait,
                    connected_replicas,
                    unread: None,
                },
                (Err(why), _) | (_, Err(why)) => RedisPersistence {
                    connected_replicas,
                    ..RedisPersistence::unread(wait, Unread::Refused(why))
                },
            }
        });
        Ok(nodes
            .min_by_key(|p| (p.level(), p.connected_replicas))
            .unwrap_or_else(|| {
                RedisPersistence::unread(wait, Unread::Refused("no master answered".into()))
            }))
    }

    /// `cmd` sent to the single server, or to every master of a cluster. A failed connection
    /// is the `Err`; a master that refused the command has its refusal as its reply.
    async fn ask_masters(&self, cmd: Cmd) -> Result<Replies, RedisError> {
        let mut conn = self.conn.clone();
        match &mut conn {
            c @ (Conn::Single(_) | Conn::Sentinel(_)) => match cmd.query_async::<Value>(c).await {
                Ok(v) => Ok(vec![(String::new(), Ok(v))]),
                Err(e) if is_outage(&e) => Err(e),
                Err(e) => Ok(vec![(String::new(), Err(e))]),
            },
            Conn::Cluster(c) => {
                let every_master =
                    RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                match c.route_command(cmd, every_master).await? {
                    Value::Map(replies) => Ok(replies
                        .into_iter()
                        .map(|(node, reply)| {
                            let node = as_str(&node).unwrap_or_default().to_string();
                            let reply = match reply {
                                Value::ServerError(e) => Err(e.into()),
                                v => Ok(v),
                            };
                            (node, reply)
                        })
                        .collect()),
                    one => Ok(vec![(String::new(), Ok(one))]),
                }
            }
        }
    }

    /// What is worth a log line, once per change: `CONFIG GET` refused, fewer replicas
    /// connected than `WAIT` asks for.
    fn note_durability(&self, p: &RedisPersistence) {
        let refused = match &p.unread {
            Some(Unread::Refused(why)) => Some(why),
            _ => None,
        };
        if let Some(why) = refused {
            if !self.config_refused.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    error = %why,
                    durability = p.level().as_str(),
                    "redis refused to tell its persistence settings (CONFIG GET appendonly, \
                     appendfsync), so the durability level is the weakest that cannot be \
                     excluded; allow CONFIG GET to zerodrop's Redis user for the real level"
                );
            }
        } else {
            self.config_refused.store(false, Ordering::Relaxed);
        }
        if p.short_of_replicas() {
            if !self.short_of_replicas.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    connected = p.connected_replicas.unwrap_or(0),
                    wait = p.wait_replicas,
                    "fewer replicas are connected to redis than --redis-wait-replicas asks for: \
                     every publish answers 503 STORE_UNAVAILABLE until enough are"
                );
            }
        } else if self.short_of_replicas.swap(false, Ordering::Relaxed) {
            tracing::info!(
                connected = p.connected_replicas.unwrap_or(0),
                wait = p.wait_replicas,
                "enough replicas are connected to redis again"
            );
        }
    }
}

/// `connected_slaves:<n>` from `INFO replication`.
fn connected_slaves(info: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix("connected_slaves:"))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connected_replicas_come_from_info_replication() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
                    slave0:ip=127.0.0.1,port=6380,state=online,offset=42,lag=0\r\n";
        assert_eq!(connected_slaves(info), Some(2));
        assert_eq!(
            connected_slaves("# Replication\r\nrole:master\r\nconnected_slaves:0\r\n"),
            Some(0)
        );
        assert_eq!(connected_slaves("# Replication\r\nrole:slave\r\n"), None);
    }
}
