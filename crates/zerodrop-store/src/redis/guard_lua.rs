//! The Lua scripts of the job queue and the webhook idempotency records: each
//! [`crate::guard::GuardStore`] operation is one of them, one atomic step on the server.
//!
//! Job scripts touch only keys tagged `{jobs}`, webhook idempotency scripts only keys tagged
//! `{idem}`, and the publish-key scripts only their stream's `{<stream>}` keys, so each runs on
//! one cluster slot. `KEYS` names the fixed keys of the slot; the per-job and per-record keys
//! are derived inside the scripts from the prefix (same tag, same slot: legal for `EVAL` on a
//! cluster, which only refuses keys of another slot).
//!
//! Numbers go back to Redis through `int()`: Lua turns a bare number argument into `%.14g`,
//! which would round a 16-digit job id.
//!
//! The layout of the keys is documented in `redis/guard.rs`.

/// Candidates (queued or with an expired lease) one claim examines per class at most.
pub const CLAIM_SCAN: usize = 512;
/// Queued jobs fetched per page while a claim walks a class queue.
pub const CLAIM_PAGE: usize = 64;
/// Expired leases per class one claim considers for redelivery (earliest expiry first).
pub const EXPIRED_SCAN: usize = 256;
/// Queued jobs (oldest `created_at_ms` first) `job_stats` looks through for a due one.
pub const STATS_SCAN: usize = 256;
/// Done jobs removed per purge step.
pub const PURGE_BATCH: usize = 1000;
/// Expired idempotency index entries removed per call (64 on the append path).
pub const IDEM_PRUNE: usize = 256;
/// Newest records of one scope whose hits `idem_scopes` adds up.
pub const IDEM_SCAN: usize = 10_000;
/// Index entries one listing looks at beyond `limit` (records gone before their index entry
/// was pruned are skipped).
pub const IDEM_LIST_SLACK: usize = 1024;

const JOB_PRELUDE: &str = r#"
local P = 'zd:{jobs}:'
local CLASSES = {'realtime', 'interactive', 'batch'}

local function int(n) return string.format('%d', n) end
local function member(id) return string.format('%020d', id) end
local function job_key(id) return P .. 'j:' .. int(id) end

-- The indexes a job is in follow its status: `s:<status>` by id (lists, counts); queued:
-- `q:<class>` by available_at and `qc` by created_at; running: `r:<class>` and `k:<kind>`
-- by lease expiry; done: `fin` by finished_at.
local function unindex(id, st, class, kind)
  local m = member(id)
  redis.call('ZREM', P .. 's:' .. st, m)
  if st == 'queued' then
    redis.call('ZREM', P .. 'q:' .. class, m)
    redis.call('ZREM', P .. 'qc', m)
  elseif st == 'running' then
    redis.call('ZREM', P .. 'r:' .. class, m)
    redis.call('ZREM', P .. 'k:' .. kind, m)
  elseif st == 'done' then
    redis.call('ZREM', P .. 'fin', m)
  end
end

-- `score`: available_at (queued), lease expiry (running), finished_at (done).
local function index(id, st, class, kind, score, created)
  local m = member(id)
  redis.call('ZADD', P .. 's:' .. st, int(id), m)
  if st == 'queued' then
    redis.call('ZADD', P .. 'q:' .. class, int(score), m)
    redis.call('ZADD', P .. 'qc', int(created), m)
  elseif st == 'running' then
    redis.call('ZADD', P .. 'r:' .. class, int(score), m)
    redis.call('ZADD', P .. 'k:' .. kind, int(score), m)
  elseif st == 'done' then
    redis.call('ZADD', P .. 'fin', int(score), m)
  end
end

-- The job if `attempt` is its current lease: running, with that attempt number.
local function leased(id, attempt)
  local key = job_key(id)
  local j = redis.call('HMGET', key, 'st', 'att', 'class', 'kind', 'cr')
  if j[1] ~= 'running' or tonumber(j[2]) ~= attempt then return nil, nil end
  return key, j
end
"#;

/// `KEYS[1]` the id counter, `KEYS[2]` the dedupe hash (key → id). `ARGV`: kind, class,
/// upstream, payload, `'1'` when a dedupe key follows, the dedupe key, max_attempts,
/// available_at, now, the class's queued cap (0 = none), `'1'` when the caller follows with
/// `WAIT`. Replies `{'new', id}`, `{'existing', id}` or `{'full'}`.
///
/// Ids are never handed out twice, even by a server that lost its data: a new id is at least
/// the server's clock in ms × 1000. A worker still holding a lease on a job the server forgot
/// is then refused (`StaleLease`) instead of completing an unrelated job with the same id.
///
/// An existing job is answered with a write to it when the caller waits (the dedupe key set
/// again, unchanged): `WAIT` then confirms only once the replicas hold the original too.
const ENQUEUE: &str = r#"
local kind, class, upstream, payload = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local dedupe = nil
if ARGV[5] == '1' then dedupe = ARGV[6] end
local max_attempts, av, now, cap = ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
if dedupe then
  local id = redis.call('HGET', KEYS[2], dedupe)
  if id and redis.call('EXISTS', P .. 'j:' .. id) == 1 then
    if ARGV[11] == '1' then redis.call('HSET', P .. 'j:' .. id, 'dd', dedupe) end
    return {'existing', tonumber(id)}
  end
end
if cap > 0 and redis.call('ZCARD', P .. 'q:' .. class) >= cap then return {'full'} end
local t = redis.call('TIME')
local floor = (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) * 1000
local id = math.max((tonumber(redis.call('GET', KEYS[1])) or 0) + 1, floor)
redis.call('SET', KEYS[1], int(id))
local key = job_key(id)
redis.call('HSET', key, 'id', int(id), 'kind', kind, 'class', class, 'up', upstream,
  'pay', payload, 'st', 'queued', 'att', 0, 'max', max_attempts, 'cr', int(now),
  'av', int(av), 'le', 0, 'fin', 0)
if dedupe then
  redis.call('HSET', key, 'dd', dedupe)
  redis.call('HSET', KEYS[2], dedupe, int(id))
end
index(id, 'queued', class, kind, av, now)
return {'new', id}
"#;

/// `KEYS[1]` the id counter (routing only). `ARGV`: worker, limit, lease_ms, now, the three
/// class caps, the default kind cap, the number n of named kind caps, then n pairs kind, cap.
/// Replies one `HGETALL` (flat field/value list) per leased job, as it is after the claim.
///
/// The order is that of the memory store: classes by priority; within a class, queued jobs
/// that are due and running jobs whose lease expired, together by (available_at, id). The
/// class queue `q:<class>` is already in that order (score available_at, member the
/// zero-padded id); expired leases come from `r:<class>` (scored by expiry) and are merged in.
/// Caps count leases that have not expired (`ZCOUNT` above now), plus what this claim hands
/// out. A job of a kind at its cap is skipped, the walk goes on.
///
/// Bounded: per class at most `EXPIRED_SCAN` expired leases (the earliest expired) are
/// considered and at most `CLAIM_SCAN` candidates examined. Beyond those bounds the order is
/// only approximately the memory store's (a class with more expired leases at once than
/// `EXPIRED_SCAN`, or more skipped jobs of capped kinds ahead of a claimable one than
/// `CLAIM_SCAN`, waits for a later claim).
const CLAIM: &str = r#"
local worker, limit = ARGV[1], tonumber(ARGV[2])
local lease_ms, now = tonumber(ARGV[3]), tonumber(ARGV[4])
local class_caps = {tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])}
local default_cap = tonumber(ARGV[8])
local kind_caps = {}
for i = 10, 9 + 2 * tonumber(ARGV[9]), 2 do kind_caps[ARGV[i]] = tonumber(ARGV[i + 1]) end
local live = '(' .. int(now)
local until_ms = now + lease_ms

local kind_running = {}
local function running_of_kind(kind)
  local n = kind_running[kind]
  if not n then
    n = redis.call('ZCOUNT', P .. 'k:' .. kind, live, '+inf')
    kind_running[kind] = n
  end
  return n
end

local function before(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end

local out = {}
for ci, class in ipairs(CLASSES) do
  if #out >= limit then break end
  local cap = class_caps[ci]
  local rkey, qkey = P .. 'r:' .. class, P .. 'q:' .. class
  local running = redis.call('ZCOUNT', rkey, live, '+inf')
  if cap == 0 or running < cap then
    local expired = {}
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', rkey, '-inf', int(now), 'LIMIT', 0, EXPIRED_SCAN)) do
      local av = tonumber(redis.call('HGET', job_key(tonumber(m)), 'av'))
      if av and av <= now then expired[#expired + 1] = {av, m} end
    end
    table.sort(expired, before)
    local page, pi, more, skipped, xi, scanned = {}, 1, true, 0, 1, 0
    while #out < limit and scanned < CLAIM_SCAN and (cap == 0 or running < cap) do
      if pi > #page and more then
        -- Claimed jobs left the queue, skipped ones are still ahead: they are the offset.
        local r = redis.call('ZRANGEBYSCORE', qkey, '-inf', int(now), 'WITHSCORES',
          'LIMIT', skipped, CLAIM_PAGE)
        page, pi = {}, 1
        for i = 1, #r, 2 do page[#page + 1] = {tonumber(r[i + 1]), r[i]} end
        more = #page == CLAIM_PAGE
      end
      local q, x = page[pi], expired[xi]
      local c, queued
      if q and (not x or before(q, x)) then
        c, queued, pi = q, true, pi + 1
      elseif x then
        c, queued, xi = x, false, xi + 1
      else
        break
      end
      scanned = scanned + 1
      local id = tonumber(c[2])
      local key = job_key(id)
      local j = redis.call('HMGET', key, 'kind', 'att', 'cr')
      local kind = j[1]
      if kind then
        local kn = running_of_kind(kind)
        local kcap = kind_caps[kind] or default_cap
        if kcap > 0 and kn >= kcap then
          if queued then skipped = skipped + 1 end
        else
          if queued then
            unindex(id, 'queued', class, kind)
            index(id, 'running', class, kind, until_ms, 0)
          else
            redis.call('ZADD', rkey, int(until_ms), c[2])
            redis.call('ZADD', P .. 'k:' .. kind, int(until_ms), c[2])
          end
          redis.call('HSET', key, 'st', 'running', 'att', int(tonumber(j[2]) + 1),
            'le', int(until_ms), 'wk', worker)
          running = running + 1
          kind_running[kind] = kn + 1
          out[#out + 1] = redis.call('HGETALL', key)
        end
      end
    end
  end
end
return out
"#;

/// `ARGV`: id, attempt, lease_ms, now. 1, or 0 when the lease is not the current one.
const HEARTBEAT: &str = r#"
local id, attempt = tonumber(ARGV[1]), tonumber(ARGV[2])
local key, j = leased(id, attempt)
if not key then return 0 end
local le = int(tonumber(ARGV[4]) + tonumber(ARGV[3]))
redis.call('HSET', key, 'le', le)
redis.call('ZADD', P .. 'r:' .. j[3], le, member(id))
redis.call('ZADD', P .. 'k:' .. j[4], le, member(id))
return 1
"#;

/// `ARGV`: id, attempt, now, then `'done'`, or `'retry'` with error, at_ms and `'1'` when the
/// attempt counts, or `'dead'` with error. 1, or 0 when the lease is not the current one.
const FINISH: &str = r#"
local id, attempt, now, how = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local key, j = leased(id, attempt)
if not key then return 0 end
local class, kind = j[3], j[4]
unindex(id, 'running', class, kind)
redis.call('HDEL', key, 'wk')
if how == 'retry' then
  local att = tonumber(j[2])
  if ARGV[7] ~= '1' then att = math.max(att - 1, 0) end
  local at = tonumber(ARGV[6])
  redis.call('HSET', key, 'st', 'queued', 'av', int(at), 'le', 0, 'err', ARGV[5],
    'att', int(att))
  index(id, 'queued', class, kind, at, tonumber(j[5]))
  return 1
end
redis.call('HSET', key, 'st', how, 'le', 0, 'fin', int(now))
if how == 'dead' then redis.call('HSET', key, 'err', ARGV[5]) end
index(id, how, class, kind, now, 0)
return 1
"#;

/// `ARGV`: id, now, budget. 1 when a dead letter was put back in the queue (with `budget` more
/// attempts: `max` = `att` + budget, `att` unchanged), else 0.
const REQUEUE: &str = r#"
local id, now, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local key = job_key(id)
local j = redis.call('HMGET', key, 'st', 'class', 'kind', 'cr', 'att')
if j[1] ~= 'dead' then return 0 end
unindex(id, 'dead', j[2], j[3])
redis.call('HSET', key, 'st', 'queued', 'max', int(tonumber(j[5]) + budget), 'av', int(now), 'fin', 0)
index(id, 'queued', j[2], j[3], now, tonumber(j[4]))
return 1
"#;

/// `ARGV`: a status or `''` for all, limit. One `HGETALL` per job, highest id first: with a
/// status, its `s:<status>` index from the top; without, the top `limit` of each status merged.
const LIST: &str = r#"
local limit = tonumber(ARGV[2])
local ms = {}
if ARGV[1] ~= '' then
  ms = redis.call('ZREVRANGE', P .. 's:' .. ARGV[1], 0, limit - 1)
else
  for _, st in ipairs({'queued', 'running', 'done', 'dead'}) do
    for _, m in ipairs(redis.call('ZREVRANGE', P .. 's:' .. st, 0, limit - 1)) do
      ms[#ms + 1] = m
    end
  end
  -- Members are zero-padded ids: the string order is the numeric order.
  table.sort(ms, function(a, b) return a > b end)
end
local out = {}
for i = 1, math.min(#ms, limit) do out[i] = redis.call('HGETALL', job_key(tonumber(ms[i]))) end
return out
"#;

/// `ARGV`: now. Replies the counts of queued, running, done, dead; queued per class; running
/// per class; then the `created_at` of the oldest due queued job, or -1.
///
/// The oldest due job is looked for among the `STATS_SCAN` oldest queued jobs (`qc`, by
/// created_at): the first one due is the answer. When none of them is due (a long backlog of
/// retries waiting out their backoff ahead) the oldest of the class queues' first due jobs
/// stands in: then the answer may be younger than the true oldest.
const STATS: &str = r#"
local now = tonumber(ARGV[1])
local out = {}
for _, st in ipairs({'queued', 'running', 'done', 'dead'}) do
  out[#out + 1] = redis.call('ZCARD', P .. 's:' .. st)
end
for _, c in ipairs(CLASSES) do out[#out + 1] = redis.call('ZCARD', P .. 'q:' .. c) end
for _, c in ipairs(CLASSES) do out[#out + 1] = redis.call('ZCARD', P .. 'r:' .. c) end
local oldest = nil
local rows = redis.call('ZRANGE', P .. 'qc', 0, STATS_SCAN - 1, 'WITHSCORES')
for i = 1, #rows, 2 do
  local av = tonumber(redis.call('HGET', job_key(tonumber(rows[i])), 'av'))
  if av and av <= now then
    oldest = tonumber(rows[i + 1])
    break
  end
end
if not oldest and #rows == 2 * STATS_SCAN then
  for _, c in ipairs(CLASSES) do
    local head = redis.call('ZRANGEBYSCORE', P .. 'q:' .. c, '-inf', int(now), 'LIMIT', 0, 1)
    if head[1] then
      local cr = tonumber(redis.call('HGET', job_key(tonumber(head[1])), 'cr'))
      if cr and (not oldest or cr < oldest) then oldest = cr end
    end
  end
end
out[#out + 1] = oldest or -1
return out
"#;

/// `KEYS[2]` the dedupe hash. `ARGV`: before. Removes up to `PURGE_BATCH` done jobs that
/// finished before `before` (their dedupe keys too); replies how many.
const PURGE: &str = r#"
local rows = redis.call('ZRANGEBYSCORE', P .. 'fin', '-inf', '(' .. ARGV[1], 'LIMIT', 0, PURGE_BATCH)
for _, m in ipairs(rows) do
  local id = tonumber(m)
  local key = job_key(id)
  local dd = redis.call('HGET', key, 'dd')
  if dd and redis.call('HGET', KEYS[2], dd) == int(id) then redis.call('HDEL', KEYS[2], dd) end
  redis.call('DEL', key)
  redis.call('ZREM', P .. 'fin', m)
  redis.call('ZREM', P .. 's:done', m)
end
return #rows
"#;

const IDEM_PRELUDE: &str = r#"
local function int(n) return string.format('%d', n) end

-- Drops up to IDEM_PRUNE records whose expiry passed (by the caller's clock: Redis' own TTL
-- on each record only collects what nobody asked about).
local function prune(created, expiry, prefix, now)
  for _, k in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', int(now), 'LIMIT', 0, IDEM_PRUNE)) do
    redis.call('ZREM', created, k)
    redis.call('ZREM', expiry, k)
    redis.call('DEL', prefix .. k)
  end
end
"#;

/// `KEYS[1]` the record hash, `KEYS[2]` the scope's index by created_at, `KEYS[3]` its index by
/// expiry, `KEYS[4]` the set of scopes. `ARGV`: scope, key, fingerprint (hex), ttl_ms,
/// claim_ms, now, the scope's record key prefix. Replies `{'fresh'}`, `{'in_progress'}`,
/// `{'done', answer, hit_count}` or `{'reused'}`.
const IDEM_BEGIN: &str = r#"
local scope, key, fp = ARGV[1], ARGV[2], ARGV[3]
local ttl, claim, now = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
prune(KEYS[2], KEYS[3], ARGV[7], now)
local r = redis.call('HMGET', KEYS[1], 'fp', 'ans', 'exp', 'claim')
if r[1] and tonumber(r[3]) > now then
  if r[1] ~= fp then return {'reused'} end
  if r[2] then
    return {'done', r[2], redis.call('HINCRBY', KEYS[1], 'hits', 1)}
  end
  if tonumber(r[4]) > now then
    redis.call('HINCRBY', KEYS[1], 'hits', 1)
    return {'in_progress'}
  end
  -- The owner's claim lapsed (it crashed): this request takes over.
  redis.call('HSET', KEYS[1], 'claim', int(now + claim))
  return {'fresh'}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fp', fp, 'hits', 0, 'cr', int(now), 'exp', int(now + ttl),
  'claim', int(now + claim))
redis.call('PEXPIRE', KEYS[1], int(math.max(ttl, 1)))
redis.call('ZADD', KEYS[2], int(now), key)
redis.call('ZADD', KEYS[3], int(now + ttl), key)
redis.call('SADD', KEYS[4], scope)
return {'fresh'}
"#;

/// `KEYS[1]` the record hash; `ARGV[1]` the answer. Stored only if the record exists.
pub const IDEM_FINISH: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'ans', ARGV[1])
return 1
"#;

/// `KEYS[1]` the scope's index by created_at, `KEYS[2]` its index by expiry, `KEYS[3]` the set
/// of scopes. `ARGV`: scope, record key prefix, now, limit, and `'list'` or
/// `'stats'`.
///
/// `list`: per unexpired record, newest first, `key, done (1/0), hit_count, created, expires`,
/// at most `limit`. `stats`: `{keys, hit_count}`, the keys counted by the expiry index, the hits
/// added up over the `IDEM_SCAN` newest records; a scope left without records leaves the set
/// of scopes.
const IDEM_SCOPE: &str = r#"
local scope, prefix, now, limit = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
prune(KEYS[1], KEYS[2], prefix, now)
if ARGV[5] == 'stats' then
  local keys = redis.call('ZCOUNT', KEYS[2], '(' .. int(now), '+inf')
  local hits = 0
  for _, k in ipairs(redis.call('ZREVRANGE', KEYS[1], 0, IDEM_SCAN - 1)) do
    local r = redis.call('HMGET', prefix .. k, 'hits', 'exp')
    if r[2] and tonumber(r[2]) > now then hits = hits + (tonumber(r[1]) or 0) end
  end
  if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('SREM', KEYS[3], scope) end
  return {keys, hits}
end
local out, offset, found = {}, 0, 0
while found < limit and offset < limit + IDEM_LIST_SLACK do
  local page = redis.call('ZREVRANGE', KEYS[1], offset, offset + 127)
  if #page == 0 then break end
  for _, k in ipairs(page) do
    offset = offset + 1
    local r = redis.call('HMGET', prefix .. k, 'ans', 'hits', 'cr', 'exp')
    if r[3] and tonumber(r[4]) > now then
      found = found + 1
      out[#out + 1] = k
      out[#out + 1] = r[1] and 1 or 0
      out[#out + 1] = tonumber(r[2]) or 0
      out[#out + 1] = tonumber(r[3])
      out[#out + 1] = tonumber(r[4])
      if found >= limit then break end
    end
  end
end
return out
"#;

/// A stream's publish `Idempotency-Key`s. `KEYS[1]` the stream's key index (`zd:{S}:ik`, key
/// → created ms), `KEYS[2]` its bounds. `ARGV`: record key prefix (`zd:{S}:i:`), hit counter prefix (`zd:{S}:ih:`),
/// now, the idempotency TTL, limit, `'list'` or `'stats'`.
///
/// `list`: per unexpired key, newest first, `key, hit_count, created`, at most `limit`.
/// `stats`: `{keys, hit_count, indexed}` (hits over the `IDEM_SCAN` newest keys; `indexed` is
/// what the index still holds, 0 once every key expired: then the bounds' `pk` flag is cleared,
/// so that the next keyed append lists the stream again).
const PUBLISH_KEYS: &str = r#"
local rec, hits_of, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local cutoff, limit = now - tonumber(ARGV[4]), tonumber(ARGV[5])
local n = redis.call('ZCOUNT', KEYS[1], '-inf', int(cutoff))
if n > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, math.min(n, IDEM_PRUNE) - 1) end
if ARGV[6] == 'stats' then
  local keys = redis.call('ZCOUNT', KEYS[1], '(' .. int(cutoff), '+inf')
  local hits = 0
  for _, k in ipairs(redis.call('ZREVRANGE', KEYS[1], 0, IDEM_SCAN - 1)) do
    hits = hits + (tonumber(redis.call('GET', hits_of .. k)) or 0)
  end
  local indexed = redis.call('ZCARD', KEYS[1])
  if indexed == 0 then redis.call('HDEL', KEYS[2], 'pk') end
  return {keys, hits, indexed}
end
local out, offset, found = {}, 0, 0
while found < limit and offset < limit + IDEM_LIST_SLACK do
  local page = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', '(' .. int(cutoff),
    'WITHSCORES', 'LIMIT', offset, 128)
  if #page == 0 then break end
  for i = 1, #page, 2 do
    offset = offset + 1
    local k = page[i]
    if redis.call('EXISTS', rec .. k) == 1 then
      found = found + 1
      out[#out + 1] = k
      out[#out + 1] = tonumber(redis.call('GET', hits_of .. k)) or 0
      out[#out + 1] = tonumber(page[i + 1])
      if found >= limit then break end
    end
  end
end
return out
"#;

fn bounds() -> String {
    format!(
        "local CLAIM_SCAN, CLAIM_PAGE, EXPIRED_SCAN = {CLAIM_SCAN}, {CLAIM_PAGE}, {EXPIRED_SCAN}\n\
         local STATS_SCAN, PURGE_BATCH = {STATS_SCAN}, {PURGE_BATCH}\n\
         local IDEM_PRUNE, IDEM_SCAN, IDEM_LIST_SLACK = {IDEM_PRUNE}, {IDEM_SCAN}, {IDEM_LIST_SLACK}\n"
    )
}

fn job(body: &str) -> String {
    format!("{}{JOB_PRELUDE}{body}", bounds())
}

fn idem(body: &str) -> String {
    format!("{}{IDEM_PRELUDE}{body}", bounds())
}

pub fn enqueue() -> String {
    job(ENQUEUE)
}

pub fn claim() -> String {
    job(CLAIM)
}

pub fn heartbeat() -> String {
    job(HEARTBEAT)
}

pub fn finish() -> String {
    job(FINISH)
}

pub fn requeue() -> String {
    job(REQUEUE)
}

pub fn list() -> String {
    job(LIST)
}

pub fn stats() -> String {
    job(STATS)
}

pub fn purge() -> String {
    job(PURGE)
}

pub fn idem_begin() -> String {
    idem(IDEM_BEGIN)
}

pub fn idem_scope() -> String {
    idem(IDEM_SCOPE)
}

pub fn publish_keys() -> String {
    format!(
        "{}local function int(n) return string.format('%d', n) end\n{PUBLISH_KEYS}",
        bounds()
    )
}
