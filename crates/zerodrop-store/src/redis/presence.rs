//! Presence in Redis, shared by every instance: the rules of `crate::presence`, each
//! operation one Lua script on the stream's slot, so that a join, a renewal and a leave are
//! atomic with the presence log they append to, and a member whose lease ran out leaves once
//! whichever instances sweep at the same moment.
//!
//! Keys of a stream `S` (all tagged `{S}`): `zd:{S}:pm` members (session id → member JSON),
//! `zd:{S}:ph` their holders, `zd:{S}:pd` their lease ends (sorted set, Redis `TIME` in ms),
//! `zd:{S}:pz` their ids for paging (sorted set, all scores 0: ordered by id), `zd:{S}:pl`
//! the presence log (a list of entry JSON, the newest `LOG_KEEP`), `zd:{S}:pq` its bounds
//! (`epoch seq first`; a missing hash — Redis restarted empty — starts a new epoch).
//! `zd:presence` is the set of streams that may have members, read by the sweep: a stream
//! leaves it only once a sweep found it empty, and a join puts it back after its script, so no
//! member is ever out of the sweep's sight. Every change rings `p|<stream>` on `zd:live`.
//!
//! Leases are measured on the Redis server's clock (`TIME`), so instances with skewed clocks
//! agree on when a member lapses.
//!
//! Must not: decide who may be a member (the server does).

use ::redis::Value;
use async_trait::async_trait;
use zerodrop_core::{Epoch, SessionId, StreamId};

use super::Shared;
use super::conn::{Call, Lua, as_str, as_u64, unexpected};
use crate::StoreResult;
use crate::presence::{
    Claimed, LOG_KEEP, Member, PAGE_MAX, PresenceClaim, PresenceEntry, PresenceLog, PresencePage,
    PresenceStats, PresenceStore, page_of,
};

/// Streams that may have members.
const STREAMS: &str = "zd:presence";

fn keys(s: &StreamId) -> [String; 6] {
    ["pm", "ph", "pd", "pz", "pl", "pq"].map(|k| format!("zd:{{{s}}}:{k}"))
}

/// Shared by the scripts: the time, the log's epoch (created when missing) and `append`.
const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function epoch_of(q, fresh)
  local e = redis.call('HGET', q, 'epoch')
  if not e then
    e = fresh
    redis.call('HSET', q, 'epoch', e, 'seq', 0, 'first', 1)
  end
  return e
end
-- Appends one entry (the seq is the next; the newest `keep` are kept) and rings the doorbell.
local function append(K, stream, epoch, action, member, keep)
  local seq = redis.call('HINCRBY', K[6], 'seq', 1)
  local e = '{"stream":"' .. stream .. '","seq":' .. seq .. ',"epoch":"' .. epoch ..
    '","action":"' .. action .. '","member":' .. member .. ',"occupancy":' ..
    redis.call('HLEN', K[1]) .. '}'
  local len = redis.call('RPUSH', K[5], e)
  if len > keep then
    redis.call('LTRIM', K[5], len - keep, -1)
    len = keep
  end
  redis.call('HSET', K[6], 'first', seq - len + 1)
  redis.call('PUBLISH', 'zd:live', 'p|' .. stream)
  return e
end
local function drop(K, sid)
  local m = redis.call('HGET', K[1], sid)
  if not m then return nil end
  redis.call('HDEL', K[1], sid)
  redis.call('HDEL', K[2], sid)
  redis.call('ZREM', K[3], sid)
  redis.call('ZREM', K[4], sid)
  return m
end
"#;

/// Join or renew. ARGV: sid, member JSON up to `since`, its end, holder, lease ms, max,
/// a fresh epoch, stream, keep, take (1/0). Returns `{0}` renewed, `{2}` full, `{1, entry}`
/// joined.
const CLAIM: &str = r#"
local sid = ARGV[1]
if redis.call('HEXISTS', KEYS[1], sid) == 1 then
  if ARGV[10] == '1' or redis.call('HGET', KEYS[2], sid) == ARGV[4] then
    redis.call('HSET', KEYS[2], sid, ARGV[4])
    redis.call('ZADD', KEYS[3], 'GT', now + tonumber(ARGV[5]), sid)
  end
  return {0}
end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[6]) then return {2} end
local epoch = epoch_of(KEYS[6], ARGV[7])
local member = ARGV[2] .. now .. ARGV[3]
redis.call('HSET', KEYS[1], sid, member)
redis.call('HSET', KEYS[2], sid, ARGV[4])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), sid)
redis.call('ZADD', KEYS[4], 0, sid)
return {1, append(KEYS, ARGV[8], epoch, 'join', member, tonumber(ARGV[9]))}
"#;

/// ARGV: sid, holder, lease ms. Shortens the lease if the holder still holds it.
const RELEASE: &str = r#"
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then
  local until_ms = now + tonumber(ARGV[3])
  local cur = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if cur and until_ms < tonumber(cur) then
    redis.call('ZADD', KEYS[3], until_ms, ARGV[1])
  end
end
return 0
"#;

/// ARGV: sid, a fresh epoch, stream, keep. Returns the leave entry or nil.
const LEAVE: &str = r#"
local m = drop(KEYS, ARGV[1])
if not m then return false end
return append(KEYS, ARGV[3], epoch_of(KEYS[6], ARGV[2]), 'leave', m, tonumber(ARGV[4]))
"#;

/// ARGV: a fresh epoch, stream, keep. Every lapsed member leaves (at most 1,000 a call).
/// Returns `{members left, 1 if every entry's webhooks are done, entry…}`.
const SWEEP: &str = r#"
local out = {0, 0}
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)
for _, sid in ipairs(gone) do
  local m = drop(KEYS, sid)
  if m then
    table.insert(out, append(KEYS, ARGV[2], epoch_of(KEYS[6], ARGV[1]), 'leave', m, tonumber(ARGV[3])))
  end
end
out[1] = redis.call('HLEN', KEYS[1])
local q = redis.call('HMGET', KEYS[6], 'seq', 'hooked')
if tonumber(q[2] or 0) >= tonumber(q[1] or 0) then out[2] = 1 end
return out
"#;

/// ARGV: epoch, seq. Moves the webhook cursor forward within the epoch.
const HOOKED: &str = r#"
local q = redis.call('HMGET', KEYS[6], 'epoch', 'seq', 'hooked')
if q[1] == ARGV[1] then
  local to = math.min(tonumber(ARGV[2]), tonumber(q[2] or 0))
  if to > tonumber(q[3] or 0) then redis.call('HSET', KEYS[6], 'hooked', to) end
end
return 0
"#;

/// ARGV: after (`-` for the first page, else `(<id>`), limit + 1, a fresh epoch.
/// Returns `{epoch, seq, occupancy, member…}`.
const MEMBERS: &str = r#"
local epoch = epoch_of(KEYS[6], ARGV[3])
local ids = redis.call('ZRANGEBYLEX', KEYS[4], ARGV[1], '+', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {epoch, redis.call('HGET', KEYS[6], 'seq'), redis.call('HLEN', KEYS[1])}
if #ids > 0 then
  for _, m in ipairs(redis.call('HMGET', KEYS[1], unpack(ids))) do
    if m then table.insert(out, m) end
  end
end
return out
"#;

/// ARGV: after, limit, a fresh epoch. Returns `{epoch, head, first, entry…}`.
const READ: &str = r#"
local epoch = epoch_of(KEYS[6], ARGV[3])
local head = tonumber(redis.call('HGET', KEYS[6], 'seq'))
local first = tonumber(redis.call('HGET', KEYS[6], 'first'))
local out = {epoch, head, first}
local limit = tonumber(ARGV[2])
if limit > 0 then
  local from = math.max(tonumber(ARGV[1]) + 1, first) - first
  for _, e in ipairs(redis.call('LRANGE', KEYS[5], from, from + limit - 1)) do
    table.insert(out, e)
  end
end
return out
"#;

pub(super) struct PresenceScripts {
    claim: Lua,
    release: Lua,
    leave: Lua,
    sweep: Lua,
    members: Lua,
    read: Lua,
    hooked: Lua,
}

impl PresenceScripts {
    pub(super) fn new() -> PresenceScripts {
        let with = |body: &str| Lua::new(format!("{PRELUDE}{body}"));
        PresenceScripts {
            claim: with(CLAIM),
            release: with(RELEASE),
            leave: with(LEAVE),
            sweep: with(SWEEP),
            members: with(MEMBERS),
            read: with(READ),
            hooked: with(HOOKED),
        }
    }
}

fn call<'a>(lua: &'a Lua, stream: &StreamId) -> Call<'a> {
    keys(stream).into_iter().fold(Call::new(lua), Call::key)
}

fn entry(v: &Value) -> StoreResult<PresenceEntry> {
    as_str(v)
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| unexpected("a presence entry"))
}

fn items(v: Value) -> StoreResult<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        _ => Err(unexpected("a presence script")),
    }
}

fn epoch(v: Option<&Value>) -> StoreResult<Epoch> {
    v.and_then(as_str)
        .and_then(Epoch::parse)
        .ok_or_else(|| unexpected("a presence epoch"))
}

/// The member's JSON around its `since`, which the script fills in with the server's time.
fn member_parts(m: &Member) -> (String, String) {
    let mut v = serde_json::to_value(m).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("since");
    }
    let json = v.to_string();
    // `{…}` → `{…,"since":` + now + `}`; an object with no other field cannot occur.
    let head = json.strip_suffix('}').unwrap_or("{");
    (format!("{head},\"since\":"), "}".to_string())
}

impl Shared {
    /// The streams that may have members (the sweep's set).
    async fn presence_streams(&self) -> StoreResult<Vec<StreamId>> {
        let mut conn = self.conn.clone();
        let streams: Vec<String> = self
            .run("presence streams", async {
                ::redis::cmd("SMEMBERS")
                    .arg(STREAMS)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(streams
            .iter()
            .filter_map(|s| StreamId::new(s).ok())
            .collect())
    }

    /// Puts the stream in the sweep's set again if it has members after all (see the module
    /// doc: a join racing the removal).
    async fn forget_if_empty(&self, stream: &StreamId) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let members = keys(stream)[0].clone();
        self.run("presence streams", async {
            ::redis::cmd("SREM")
                .arg(STREAMS)
                .arg(stream.as_str())
                .query_async::<Value>(&mut conn)
                .await?;
            let n: u64 = ::redis::cmd("HLEN")
                .arg(&members)
                .query_async(&mut conn)
                .await?;
            if n > 0 {
                ::redis::cmd("SADD")
                    .arg(STREAMS)
                    .arg(stream.as_str())
                    .query_async::<Value>(&mut conn)
                    .await?;
            }
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl PresenceStore for Shared {
    async fn presence_claim(&self, claim: PresenceClaim, max_members: u32) -> StoreResult<Claimed> {
        let (head, tail) = member_parts(&claim.member);
        let c = call(&self.scripts.presence.claim, &claim.stream)
            .arg(claim.member.session_id.as_str())
            .arg(head)
            .arg(tail)
            .arg(claim.holder.as_str())
            .arg(claim.lease_ms)
            .arg(max_members)
            .arg(Epoch::generate().as_str())
            .arg(claim.stream.as_str())
            .arg(LOG_KEEP)
            .arg(if claim.take { "1" } else { "0" });
        let out = items(self.eval("presence claim", &c).await?)?;
        let claimed = match out.first().and_then(as_u64) {
            Some(0) => Claimed::Renewed,
            Some(2) => return Ok(Claimed::Full { max: max_members }),
            Some(1) => Claimed::Joined(entry(out.get(1).unwrap_or(&Value::Nil))?),
            _ => return Err(unexpected("presence claim")),
        };
        // In the sweep's set after every claim, renewals included: a join whose `SADD` met an
        // outage is put there by its next renewal.
        let mut conn = self.conn.clone();
        self.run("presence streams", async {
            ::redis::cmd("SADD")
                .arg(STREAMS)
                .arg(claim.stream.as_str())
                .query_async::<Value>(&mut conn)
                .await
        })
        .await?;
        Ok(claimed)
    }

    async fn presence_release(
        &self,
        stream: &StreamId,
        session: &SessionId,
        holder: &str,
        lease_ms: u64,
    ) -> StoreResult<()> {
        let c = call(&self.scripts.presence.release, stream)
            .arg(session.as_str())
            .arg(holder)
            .arg(lease_ms);
        self.eval("presence release", &c).await?;
        Ok(())
    }

    async fn presence_leave(
        &self,
        stream: &StreamId,
        session: &SessionId,
    ) -> StoreResult<Option<PresenceEntry>> {
        let c = call(&self.scripts.presence.leave, stream)
            .arg(session.as_str())
            .arg(Epoch::generate().as_str())
            .arg(stream.as_str())
            .arg(LOG_KEEP);
        match self.eval("presence leave", &c).await? {
            Value::Nil => Ok(None),
            v => entry(&v).map(Some),
        }
    }

    async fn presence_unhooked(&self) -> StoreResult<Vec<(StreamId, Epoch, u64)>> {
        let mut out = Vec::new();
        for stream in self.presence_streams().await? {
            let mut conn = self.conn.clone();
            let bounds = keys(&stream)[5].clone();
            let (epoch, seq, hooked): (Option<String>, Option<u64>, Option<u64>) = self
                .run("presence hooks", async {
                    ::redis::cmd("HMGET")
                        .arg(&bounds)
                        .arg("epoch")
                        .arg("seq")
                        .arg("hooked")
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            let (Some(epoch), hooked) =
                (epoch.as_deref().and_then(Epoch::parse), hooked.unwrap_or(0))
            else {
                continue;
            };
            if seq.unwrap_or(0) > hooked {
                out.push((stream, epoch, hooked));
            }
        }
        Ok(out)
    }

    async fn presence_hooked(&self, stream: &StreamId, epoch: &Epoch, seq: u64) -> StoreResult<()> {
        let c = call(&self.scripts.presence.hooked, stream)
            .arg(epoch.as_str())
            .arg(seq);
        self.eval("presence hooked", &c).await?;
        Ok(())
    }

    async fn presence_sweep(&self, hooks: bool) -> StoreResult<Vec<PresenceEntry>> {
        let mut left = Vec::new();
        for stream in self.presence_streams().await? {
            let c = call(&self.scripts.presence.sweep, &stream)
                .arg(Epoch::generate().as_str())
                .arg(stream.as_str())
                .arg(LOG_KEEP);
            let out = items(self.eval("presence sweep", &c).await?)?;
            for v in out.iter().skip(2) {
                left.push(entry(v)?);
            }
            let settled = !hooks || out.get(1).and_then(as_u64) == Some(1);
            if out.first().and_then(as_u64) == Some(0) && settled {
                self.forget_if_empty(&stream).await?;
            }
        }
        Ok(left)
    }

    async fn presence_members(
        &self,
        stream: &StreamId,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<PresencePage> {
        let limit = limit.clamp(1, PAGE_MAX);
        let from = after.map_or_else(|| "-".to_string(), |a| format!("({a}"));
        let c = call(&self.scripts.presence.members, stream)
            .arg(from)
            .arg(limit + 1)
            .arg(Epoch::generate().as_str());
        let out = items(self.eval("presence members", &c).await?)?;
        let members = out
            .iter()
            .skip(3)
            .map(|v| {
                as_str(v)
                    .and_then(|s| serde_json::from_str::<Member>(s).ok())
                    .ok_or_else(|| unexpected("a presence member"))
            })
            .collect::<StoreResult<Vec<Member>>>()?;
        let (members, next) = page_of(members, limit);
        Ok(PresencePage {
            epoch: epoch(out.first())?,
            seq: out.get(1).and_then(as_u64).unwrap_or(0),
            occupancy: out.get(2).and_then(as_u64).unwrap_or(0),
            members,
            next,
        })
    }

    async fn presence_read(
        &self,
        stream: &StreamId,
        after: u64,
        limit: usize,
    ) -> StoreResult<PresenceLog> {
        let c = call(&self.scripts.presence.read, stream)
            .arg(after)
            .arg(limit)
            .arg(Epoch::generate().as_str());
        let out = items(self.eval("presence read", &c).await?)?;
        let entries = out
            .iter()
            .skip(3)
            .map(entry)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(PresenceLog {
            epoch: epoch(out.first())?,
            head: out.get(1).and_then(as_u64).unwrap_or(0),
            first: out.get(2).and_then(as_u64).unwrap_or(1),
            entries,
        })
    }

    async fn presence_stats(&self) -> StoreResult<PresenceStats> {
        let mut s = PresenceStats::default();
        for id in self.presence_streams().await? {
            let mut conn = self.conn.clone();
            let key = keys(&id)[0].clone();
            let n: u64 = self
                .run("presence stats", async {
                    ::redis::cmd("HLEN").arg(&key).query_async(&mut conn).await
                })
                .await?;
            if n > 0 {
                s.streams += 1;
                s.members += n;
            }
        }
        Ok(s)
    }
}
