//! Talking to Redis: one connection type for a single server, a cluster or the primary that
//! Sentinel names (`sentinel.rs`), the Lua scripts
//! (sent by hash, by source when the server lost its cache), a script call's keys and
//! arguments, `EVAL` with or without a following `WAIT` on the same connection, and decoding
//! replies.
//!
//! Must not: retry a call that may have run (a repeated append would be a duplicate), or judge
//! a failure (`health.rs` does).

use std::collections::HashMap;

use ::redis::aio::{ConnectionLike, ConnectionManager};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use ::redis::{
    Arg, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Script, ServerErrorKind, ToRedisArgs,
    Value,
};

use super::sentinel::Primary;
use super::{Shared, guard, lua};
use crate::{StoreError, StoreResult};

/// One connection that may be a single server's, a cluster's or a Sentinel-elected primary's;
/// each pipelines and is `Clone`.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Primary),
}

impl Conn {
    /// The server answered but is not the primary (`ROLE` says replica): a Sentinel-elected
    /// connection asks the sentinels again at its next command. Nothing to do otherwise.
    pub(super) fn not_primary(&self) {
        if let Conn::Sentinel(p) = self {
            p.forget(None);
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
        }
    }
}

/// A script and its source (`EVAL` needs the source when the server lost its script cache).
pub(super) struct Lua {
    script: Script,
    body: String,
}

impl Lua {
    pub(super) fn new(body: impl Into<String>) -> Lua {
        let body = body.into();
        Lua {
            script: Script::new(&body),
            body,
        }
    }
}

pub(super) struct Scripts {
    pub(super) append: Lua,
    pub(super) append_batch: Lua,
    pub(super) append_batches: Lua,
    pub(super) delete: Lua,
    pub(super) close: Lua,
    pub(super) info: Lua,
    pub(super) read: Lua,
    pub(super) age: Lua,
    pub(super) indexed: Lua,
    pub(super) session_create: Lua,
    pub(super) session_put: Lua,
    pub(super) session_touch: Lua,
    pub(super) session_grants: Lua,
    pub(super) session_dropped: Lua,
    pub(super) session_cas: Lua,
    pub(super) subject_open: Lua,
    pub(super) subject_touch: Lua,
    pub(super) publish_through: Lua,
    pub(super) keys_listed: Lua,
    pub(super) guard: guard::GuardScripts,
    pub(super) presence: super::presence::PresenceScripts,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            append: Lua::new(lua::append()),
            append_batch: Lua::new(lua::append_batch()),
            append_batches: Lua::new(lua::append_batches()),
            delete: Lua::new(lua::delete()),
            close: Lua::new(lua::close()),
            info: Lua::new(lua::info()),
            read: Lua::new(lua::read()),
            age: Lua::new(lua::age()),
            indexed: Lua::new(lua::INDEXED),
            session_create: Lua::new(lua::SESSION_CREATE),
            session_put: Lua::new(lua::SESSION_PUT),
            session_touch: Lua::new(lua::SESSION_TOUCH),
            session_grants: Lua::new(lua::SESSION_GRANTS),
            session_dropped: Lua::new(lua::SESSION_DROPPED),
            session_cas: Lua::new(lua::SESSION_CAS),
            subject_open: Lua::new(lua::SUBJECT_OPEN),
            subject_touch: Lua::new(lua::SUBJECT_TOUCH),
            publish_through: Lua::new(lua::PUBLISH_THROUGH),
            keys_listed: Lua::new(lua::KEYS_LISTED),
            guard: guard::GuardScripts::new(),
            presence: super::presence::PresenceScripts::new(),
        }
    }
}

/// One script call: keys and arguments, sent as `EVALSHA` (or `EVAL` once the server said it
/// does not know the script — nothing ran then, so sending it again is safe).
pub(super) struct Call<'a> {
    lua: &'a Lua,
    keys: Vec<String>,
    /// The arguments, one after another in one buffer (a `Cmd` used as a list of them).
    args: Cmd,
}

impl<'a> Call<'a> {
    pub(super) fn new(lua: &'a Lua) -> Call<'a> {
        Call {
            lua,
            keys: Vec::new(),
            args: Cmd::with_capacity(16, 512),
        }
    }

    pub(super) fn key(mut self, k: impl Into<String>) -> Self {
        self.keys.push(k.into());
        self
    }

    pub(super) fn arg(mut self, a: impl ToRedisArgs) -> Self {
        self.args.arg(a);
        self
    }

    fn args(&self) -> impl ExactSizeIterator<Item = &[u8]> {
        self.args.args_iter().map(|a| match a {
            Arg::Simple(b) => b,
            // Only `Cmd::cursor_arg` makes another kind, which no call uses.
            _ => &[],
        })
    }

    /// Another call's keys and arguments as one part of this one: the counts of its keys and
    /// arguments, then the arguments; its keys follow the keys before it.
    pub(super) fn part(mut self, other: Call<'_>) -> Self {
        self = self.arg(other.keys.len()).arg(other.args().len());
        for a in other.args() {
            self.args.arg(a);
        }
        self.keys.extend(other.keys);
        self
    }

    pub(super) fn cmd(&self, by_hash: bool) -> Cmd {
        // Sized once: the command is written without growing its buffers.
        let (name, script) = if by_hash {
            ("EVALSHA", self.lua.script.get_hash())
        } else {
            ("EVAL", self.lua.body.as_str())
        };
        let bytes = name.len()
            + script.len()
            + 20
            + self.keys.iter().map(String::len).sum::<usize>()
            + self.args().map(<[u8]>::len).sum::<usize>();
        let mut c = Cmd::with_capacity(3 + self.keys.len() + self.args().len(), bytes);
        c.arg(name).arg(script);
        c.arg(self.keys.len()).arg(&self.keys);
        for a in self.args() {
            c.arg(a);
        }
        c
    }
}

pub(super) fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

pub(super) fn unexpected(what: &str) -> StoreError {
    StoreError::Unavailable(format!("redis: unexpected reply to {what}"))
}

pub(super) fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

pub(super) fn as_str(v: &Value) -> Option<&str> {
    as_bytes(v).and_then(|b| std::str::from_utf8(b).ok())
}

pub(super) fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        _ => as_str(v)?.parse().ok(),
    }
}

pub(super) fn as_array(v: Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(a) => Some(a),
        _ => None,
    }
}

impl Shared {
    pub(super) async fn eval(&self, what: &str, call: &Call<'_>) -> StoreResult<Value> {
        let mut conn = self.conn.clone();
        self.run(what, async {
            match call.cmd(true).query_async::<Value>(&mut conn).await {
                Err(e) if is_noscript(&e) => call.cmd(false).query_async(&mut conn).await,
                other => other,
            }
        })
        .await
    }

    /// A script and `WAIT` in one pipeline, so both run on the same connection (the waiting
    /// one, on the master of `route_key`'s slot) and `WAIT` covers the script's writes — and
    /// every earlier write on that server, replication being one ordered stream. Replies the
    /// script's value and how many replicas acknowledged; judging that is the caller's.
    pub(super) async fn eval_waiting(
        &self,
        what: &str,
        route_key: &str,
        call: &Call<'_>,
    ) -> StoreResult<(Value, u64)> {
        let n = self.opts.wait_replicas;
        let timeout_ms = self.opts.wait_timeout.as_millis() as u64;
        let mut conn = self.wait_conn.clone().unwrap_or_else(|| self.conn.clone());
        let route =
            SingleNodeRoutingInfo::SpecificNode(Route::with_key(route_key, SlotAddr::Master));
        let send = |by_hash: bool| {
            let mut p = ::redis::pipe();
            p.ignore_errors();
            p.add_command(call.cmd(by_hash));
            p.cmd("WAIT").arg(n).arg(timeout_ms);
            p
        };
        let mut values = Vec::new();
        for by_hash in [true, false] {
            let p = send(by_hash);
            let limit = self.opts.command_timeout + self.opts.wait_timeout;
            values = self
                .run_within(limit, what, async {
                    match &mut conn {
                        Conn::Cluster(c) => c.route_pipeline(p, 0, 2, route.clone()).await,
                        other => p.query_async::<Vec<Value>>(other).await,
                    }
                })
                .await?;
            match values.first() {
                Some(Value::ServerError(e)) if e.kind() == Some(ServerErrorKind::NoScript) => {
                    continue;
                }
                _ => break,
            }
        }
        let mut it = values.into_iter();
        let (Some(script), Some(acks)) = (it.next(), it.next()) else {
            return Err(unexpected(what));
        };
        if let Value::ServerError(e) = &script {
            return Err(self.failed(what, e.clone().into()));
        }
        Ok((script, as_u64(&acks).unwrap_or(0)))
    }
}

/// A hash as a script or `HGETALL` returns it: a flat field/value list (RESP2) or a map.
pub(super) fn fields(v: Value) -> Option<HashMap<String, String>> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Array(a) => {
            let mut it = a.into_iter();
            let mut pairs = Vec::new();
            while let Some(k) = it.next() {
                pairs.push((k, it.next()?));
            }
            pairs
        }
        Value::Map(m) => m,
        _ => return None,
    };
    pairs
        .iter()
        .map(|(k, v)| Some((as_str(k)?.to_string(), as_str(v)?.to_string())))
        .collect()
}
