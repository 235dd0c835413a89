//! The Lua scripts that make each store operation one atomic step on the Redis server.
//!
//! Every stream script touches only keys tagged `{<stream>}` (one cluster slot), plus, on a
//! single server, the shared base-epoch key passed as the last key. They share one prelude:
//! `load_meta` reads a stream's bounds and decides its epoch, which is where a lost or rolled
//! back log is turned into a new epoch instead of a silent hole.
//!
//! Argument layout shared by the stream scripts:
//! - `KEYS[1]` bounds hash (`epoch head first count bytes ts ix`, and `pub` when appends
//!   `WAIT`: the last seq the doorbell rang for), `KEYS[2]` the Redis Stream
//!   holding the events (entry id `0-<seq>`, fields `t` = ts, `j` = event JSON), and
//!   `KEYS[#KEYS]` the base-epoch key when `ARGV[5] == '1'`.
//! - `ARGV[1]` stream id, `ARGV[2]` a fresh random epoch to use if a new one is needed,
//!   `ARGV[3]`/`ARGV[4]` the epoch and highest head this instance has seen for the stream
//!   (`''`/`0` if none), `ARGV[5]` base-epoch flag, `ARGV[6]` the shared live channel
//!   (events go to `<it>:e:<stream>`).
//!
//! Live messages (`PUBLISH`, fields separated by `|`, which neither stream ids nor epochs may
//! contain): `e|<origin>|<stream>|<seq>|<epoch>|<ts>|<event json>` on the stream's own event
//! channel (`<channel>:e:<stream>`, heard by the instances that watch the stream), and on the
//! shared channel `t|<stream>|<first>|<count>` (trimmed), `r|<stream>|<epoch>` (the stream got
//! a new epoch: its log was lost, or erased) and `c|<stream>|<last seq>` (the stream was
//! closed).
//!
//! Must not: let a stream script touch a key outside its stream's slot (the base-epoch key
//! aside; `APPEND_BATCHES`, which runs only on a single server, binds several streams in
//! turn), or spell out a shared rule without naming the Rust function it repeats.

const PRELUDE: &str = r#"
-- The stream the functions below work on: its keys are `KEYS[ko + 1]` to `KEYS[ko + nk]` and
-- its arguments start at `ARGV[ao + 1]` (all of the script's own unless `APPEND_BATCHES` binds
-- one part after another).
local ko, ao, stream, candidate, known_epoch, known_head, channel, basekey
local function bind(key_offset, arg_offset, nk)
  ko, ao = key_offset, arg_offset
  stream, candidate, known_epoch = ARGV[ao + 1], ARGV[ao + 2], ARGV[ao + 3]
  known_head = tonumber(ARGV[ao + 4])
  channel = ARGV[ao + 6]
  basekey = nil
  if ARGV[ao + 5] == '1' then basekey = KEYS[ko + nk] end
end
bind(0, 0, #KEYS)

local function int(n) return string.format('%d', n) end

-- The live channel's messages about the bound stream (their format is in this module's doc).
-- Numbers come as text where the caller already wrote them (`seq_s`, `ts_s`): each `int` is a
-- `sprintf` inside Redis, and an append would otherwise write the same two numbers four times.
local function ring_event(origin, seq_s, epoch, ts_s, json)
  redis.call('PUBLISH', channel .. ':e:' .. stream, 'e|' .. origin .. '|' .. stream .. '|' .. seq_s .. '|' ..
    epoch .. '|' .. ts_s .. '|' .. json)
end

-- Read once per script call: the parts of one call are stamped at the same instant.
local clock_ms = nil
local function now_ms()
  if not clock_ms then
    local t = redis.call('TIME')
    clock_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return clock_ms
end

-- What the common path of an append does not need, made on first use (`cold()`): an `EVAL`
-- script's local functions are closures made anew at every call, each about 800 instructions
-- inside Redis. Scripts call these as `cold().name(…)`.
local cold_fns
local function cold()
  if cold_fns then return cold_fns end
  local function ring_trim(first, removed)
    redis.call('PUBLISH', channel, 't|' .. stream .. '|' .. int(first) .. '|' .. int(removed))
  end

  local function ring_renewed(epoch)
    redis.call('PUBLISH', channel, 'r|' .. stream .. '|' .. epoch)
  end

  local function base_epoch()
    if not basekey then return candidate end
    local e = redis.call('GET', basekey)
    if e then return e end
    redis.call('SET', basekey, candidate)
    return candidate
  end

  local function new_log(epoch, last_ts)
    redis.call('DEL', KEYS[ko + 1], KEYS[ko + 2])
    redis.call('HSET', KEYS[ko + 1], 'epoch', epoch, 'head', 0, 'first', 1, 'count', 0, 'bytes', 0,
      'ts', last_ts)
    return {epoch = epoch, head = 0, first = 1, count = 0, bytes = 0, ts = last_ts, closed = false,
      ix = 0, pk = 0}
  end

  -- Retention after appends, `zerodrop_core::retention::plan_trim` evaluated where the events
  -- are: over `max_events` or `max_bytes`, drop the oldest until a step (1/64, at least one)
  -- below the limit that was exceeded, never the newest. Moves `m`'s bounds; returns how many
  -- went.
  local function trim(m, max_events, max_bytes)
    if max_events < 1 then max_events = 1 end
    local removed, removed_bytes, through = 0, 0, 0
    local must = 0
    if m.count > max_events then
      must = m.count - (max_events + 1 - math.max(math.floor(max_events / 64), 1))
    end
    local keep_bytes = max_bytes
    if m.bytes > max_bytes then
      keep_bytes = max_bytes - math.min(math.max(math.floor(max_bytes / 64), 1), max_bytes)
    end
    if must > 0 or m.bytes > max_bytes then
      local cursor, done = m.first, false
      while not done do
        local want = math.max(must - removed, 0) + 16
        local entries = redis.call('XRANGE', KEYS[ko + 2], '0-' .. int(cursor), '+', 'COUNT', want)
        if #entries == 0 then break end
        for _, e in ipairs(entries) do
          local over_count = removed < must
          local over_bytes = m.bytes - removed_bytes > keep_bytes
          if m.count - removed <= 1 or (not over_count and not over_bytes) then
            done = true
            break
          end
          through = tonumber(string.sub(e[1], 3))
          removed = removed + 1
          removed_bytes = removed_bytes + #e[2][4]
          cursor = through + 1
        end
      end
      if removed > 0 then
        redis.call('XTRIM', KEYS[ko + 2], 'MINID', '0-' .. int(through + 1))
        m.first, m.count, m.bytes = through + 1, m.count - removed, m.bytes - removed_bytes
      end
    end
    return removed
  end

  cold_fns = {ring_trim = ring_trim, ring_renewed = ring_renewed, base_epoch = base_epoch,
    new_log = new_log, trim = trim}
  return cold_fns
end

-- The stream's bounds, and whether its log got a new epoch just now. A log that is behind a
-- head this instance saw in the same epoch, or events without bounds, or bounds that vanished
-- while this instance knew the stream, cannot be trusted: positions in it would point at
-- other events. Such a log starts again, empty, in a new epoch.
--
-- The bounds' flags come in the same read, as they stand before the caller writes: `closed`,
-- `ix` (in the age index, 1 or 0), `pk` (in the set of streams with publish keys, 1 or 0) and
-- `pub` (the doorbell's watermark, nil when unset). `ts`, the last stamp, stays text (see
-- `above`); with `lean`, so does `first` (`first_s`; `trim` reads it when it must).
local function load_meta(create, lean)
  local m = redis.call('HMGET', KEYS[ko + 1], 'epoch', 'head', 'first', 'count', 'bytes', 'ts',
    'closed', 'ix', 'pk', 'pub')
  if m[1] then
    local first = nil
    if not lean then first = tonumber(m[3]) end
    local meta = {epoch = m[1], head = tonumber(m[2]), first = first, first_s = m[3],
      count = tonumber(m[4]), bytes = tonumber(m[5]), ts = m[6] or '0',
      closed = m[7] == '1', ix = m[8] and 1 or 0, pk = m[9] and 1 or 0, pub = tonumber(m[10])}
    if meta.epoch == known_epoch and meta.head < known_head then
      local fresh = cold().new_log(candidate, meta.ts)
      cold().ring_renewed(candidate)
      return fresh, true
    end
    return meta, false
  end
  local epoch = cold().base_epoch()
  local lost = (known_head > 0 and epoch == known_epoch) or redis.call('EXISTS', KEYS[ko + 2]) == 1
  if lost then epoch = candidate end
  local renewed = lost or (known_epoch ~= '' and epoch ~= known_epoch)
  if renewed then
    cold().ring_renewed(epoch)
  end
  if create or lost or not basekey then
    return cold().new_log(epoch, '0'), renewed
  end
  return {epoch = epoch, head = 0, first = 1, count = 0, bytes = 0, ts = '0', closed = false,
    ix = 0, pk = 0}, renewed
end

"#;

/// The functions of the scripts that read a log for a caller (`INFO`, `READ`, `DELETE`,
/// `CLOSE`, `AGE`). A script's local functions are closures made at every call, so each
/// script includes only the group it uses: the appends do not make these, nor the readers
/// [`WRITERS`].
const READERS: &str = r#"
local function seq_of(id) return tonumber(string.sub(id, 3)) end

-- With appends that WAIT, the bounds a reader may see: up to the doorbell's watermark `pub`
-- (every event up to it was confirmed by WAIT before it was rung) or up to the head this
-- instance already saw in this epoch (it is shown confirmed events only), never past the head.
-- An append that WAIT has not confirmed stays out of sight: a failover may take it back, and
-- a reader that had seen it would hold an event the new primary lacks — or, once a new append
-- takes its seq, one that differs from what the log holds.
local function visible(m, waits)
  if not waits then return m end
  local p = tonumber(redis.call('HGET', KEYS[ko + 1], 'pub') or '')
  if not p then return m end
  local seen = 0
  if m.epoch == known_epoch then seen = known_head end
  local head = math.min(m.head, math.max(p, seen))
  if head >= m.head then return m end
  return {epoch = m.epoch, head = head, first = m.first,
    count = math.max(m.count - (m.head - head), 0), bytes = m.bytes, ts = m.ts}
end

local function bounds_reply(m, renewed)
  local closed = redis.call('HGET', KEYS[ko + 1], 'closed') == '1' and 1 or 0
  return {m.epoch, m.head, m.first, m.count, m.bytes, renewed and 1 or 0, closed}
end
"#;

/// The functions of the scripts that append (`APPEND`, `APPEND_BATCH`, `APPEND_BATCHES`).
const WRITERS: &str = r#"
-- `a > b` for whole numbers written as decimal text (no sign, no leading zero), without a
-- `tonumber` (a `strtod` inside Redis): the longer text, else the greater one.
local function above(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end

-- The stamp (ms, as text) of events appended after one stamped `last`: the later of `last`
-- and the clock, which is Redis's as the caller estimated it when it sent one (`clock_s`, set
-- from the script's arguments), else read here once per call. A stream's stamps never go back.
local clock_s = nil
local function stamp(last)
  if not clock_s then clock_s = int(now_ms()) end
  if above(clock_s, last) then return clock_s end
  return last
end

-- Retention after appends (`cold().trim`), called only when the bounds are over a limit.
local function trim(m, max_events, max_bytes)
  if m.count > math.max(max_events, 1) or m.bytes > max_bytes then
    if not m.first then m.first = tonumber(m.first_s) end
    return cold().trim(m, max_events, max_bytes)
  end
  return 0
end

-- One event appended at the next seq (`XADD 0-<seq>`) stamped `ts_s`; `m` moves. Returns
-- seq, json and seq as text.
local function add_event(m, data, ts_s)
  local seq = m.head + 1
  local seq_s = int(seq)
  local json = '{"stream":"' .. stream .. '","seq":' .. seq_s .. ',"epoch":"' .. m.epoch ..
    '","ts":' .. ts_s .. ',"data":' .. data .. '}'
  redis.call('XADD', KEYS[ko + 2], '0-' .. seq_s, 't', ts_s, 'j', json)
  m.head, m.count, m.bytes, m.ts = seq, m.count + 1, m.bytes + #json, ts_s
  return seq, json, seq_s
end

-- The bounds written back after appends at `ts_s` that took the head to `head_s`; `first`
-- only when a trim moved it. `count_s` and `bytes_s`: the count and size as text when the
-- caller already wrote them.
local function save_bounds(m, head_s, ts_s, removed, count_s, bytes_s)
  count_s, bytes_s = count_s or int(m.count), bytes_s or int(m.bytes)
  if removed > 0 then
    redis.call('HSET', KEYS[ko + 1], 'head', head_s, 'first', int(m.first), 'count', count_s,
      'bytes', bytes_s, 'ts', ts_s)
  else
    redis.call('HSET', KEYS[ko + 1], 'head', head_s, 'count', count_s, 'bytes', bytes_s,
      'ts', ts_s)
  end
end
"#;

/// `ARGV[7]` data (compact JSON), `ARGV[8]` max events, `ARGV[9]` max bytes, `ARGV[10]`
/// origin token, `ARGV[11]` the stamp: Redis's clock in ms as the caller estimates it (`''`:
/// the script reads `TIME`), then only as far as needed (each argument costs Redis about 600
/// instructions): `ARGV[12]` `'1'` when the caller follows with `WAIT` (absent: `'0'`), and
/// with an `Idempotency-Key`, `ARGV[13]` the body's fingerprint in hex, `ARGV[14]` the
/// idempotency TTL in ms and `ARGV[15]` the key. The event is stamped with the later of the
/// stamp and the stream's last one. With a key, `KEYS[3]` is its record, `KEYS[4]`
/// its hit counter and `KEYS[5]` the stream's key index; without, the stream's keys are the
/// first two.
///
/// Only a keyed append pays for the key's bookkeeping: a duplicate counts itself in the hit
/// counter (`INCR`, expiring with the record: `PTTL` + `PEXPIRE`); a new keyed event adds the
/// key to the index (`ZADD`) and drops at most 64 expired entries from it (`ZCOUNT`, then
/// `ZREMRANGEBYRANK` when there are any); both read the bounds' `pk` flag (a duplicate
/// with `HEXISTS`, a new event in the bounds' one `HMGET`). The
/// record keeps its format, so records written before the counter existed still answer
/// duplicates (their count starts at 0).
///
/// Without `WAIT` the event is published on the live channel here. With it, the script only
/// makes sure the bounds have a `pub` watermark, and the caller rings the doorbell with
/// [`PUBLISH_THROUGH`] once `WAIT` confirmed the append: no instance shows an event live
/// before N replicas hold it.
///
/// Replies `'ok <seq> <epoch> <ts> <indexed> <renewed> <unlisted>'` (one string, the
/// flags `0` or `1`: the common reply, parsed as one value rather than seven), `{'dup', seq,
/// epoch, unlisted}` or `{'reused'}`. `unlisted` is 1 for a keyed append while the stream is not yet
/// known to be in the set of streams with publish keys (the bounds have no `pk` flag): the
/// caller adds it there, then sets the flag ([`KEYS_LISTED`]). Until that succeeded every keyed
/// append says so again.
///
/// A `WAIT` after a duplicate must cover the original append (which may come from another
/// connection or instance and may not be replicated yet), not only this connection's own
/// earlier writes. The duplicate's hit count is a replicated write made after the original,
/// so `WAIT` acknowledges it only once the replicas also hold the original.
///
/// A closed stream (the bounds' `closed` field) answers `{'closed', head}` after the key's
/// check, so a retry of an append made before the close still gets its duplicate answer.
///
/// The trim loop (`trim`) is `zerodrop_core::retention::plan_trim`, evaluated where the
/// events are. The store's tests check it against the memory store, which calls `plan_trim`
/// itself.
const APPEND: &str = r#"
local data, origin, waits = ARGV[7], ARGV[10], ARGV[12] == '1'
local fp, idem_ttl = ARGV[13] or '', ARGV[14]
if ARGV[11] ~= '' then clock_s = ARGV[11] end
if fp ~= '' then
  local prev = redis.call('GET', KEYS[3])
  if prev then
    local pfp, pseq, pepoch = string.match(prev, '^(%S+) (%d+) (%S+)$')
    if pfp ~= fp then return {'reused'} end
    local left = redis.call('PTTL', KEYS[3])
    redis.call('INCR', KEYS[4])
    if left > 0 then redis.call('PEXPIRE', KEYS[4], left) end
    return {'dup', tonumber(pseq), pepoch, 1 - redis.call('HEXISTS', KEYS[1], 'pk')}
  end
end
local m, renewed = load_meta(true, true)
if m.closed then return {'closed', m.head} end
local ts_s = stamp(m.ts)
local seq, json, seq_s = add_event(m, data, ts_s)
-- The limits are compared as text: they need numbers only when the log is over one.
local count_s, bytes_s = int(m.count), int(m.bytes)
local removed = 0
if above(count_s, ARGV[8]) or above(bytes_s, ARGV[9]) then
  removed = trim(m, tonumber(ARGV[8]), tonumber(ARGV[9]))
  count_s, bytes_s = int(m.count), int(m.bytes)
end
save_bounds(m, seq_s, ts_s, removed, count_s, bytes_s)
local unlisted = 0
if fp ~= '' then
  redis.call('SET', KEYS[3], fp .. ' ' .. seq_s .. ' ' .. m.epoch, 'PX', idem_ttl)
  unlisted = 1 - m.pk
  redis.call('ZADD', KEYS[5], ts_s, ARGV[15])
  local expired = redis.call('ZCOUNT', KEYS[5], '-inf', int(tonumber(ts_s) - tonumber(idem_ttl)))
  if expired > 0 then redis.call('ZREMRANGEBYRANK', KEYS[5], 0, math.min(expired, 64) - 1) end
end
if waits then
  -- The doorbell rings after WAIT, from PUBLISH_THROUGH; `pub` is the last seq it rang for.
  if not m.pub then
    redis.call('HSET', KEYS[1], 'pub', int(seq - 1))
  end
else
  ring_event(origin, seq_s, m.epoch, ts_s, json)
end
if removed > 0 then
  cold().ring_trim(m.first, removed)
end
-- One string, not a table: the caller parses one bulk string instead of seven values. The
-- flags are written as the strings they are: a number in a concatenation is a `%.14g`
-- `sprintf` inside Redis.
return 'ok ' .. seq_s .. ' ' .. m.epoch .. ' ' .. ts_s .. ' ' .. (m.ix == 1 and '1' or '0') ..
  ' ' .. (renewed and '1' or '0') .. ' ' .. (unlisted == 1 and '1' or '0')
"#;

/// The live doorbell of appends that `WAIT`: publishes, in seq order, every event of the
/// stream after the bounds' `pub` field up to `ARGV[3]`, and moves `pub` there. `KEYS[1]`
/// bounds, `KEYS[2]` log; `ARGV[1]` stream, `ARGV[2]` the epoch the caller appended in (a
/// log renewed since is left alone), `ARGV[3]` through seq, `ARGV[4]` the shared live channel
/// (the events go to `<it>:e:<stream>`), `ARGV[5]`
/// origin token, `ARGV[6]` most events published in one call (older ones are skipped; the
/// live hub re-reads the log when a seq is skipped). Replies the number published.
///
/// Run only after `WAIT` confirmed the append of seq `ARGV[3]`: that `WAIT` covered every
/// earlier write on the same server, so every event up to it is held by the replicas too.
/// One atomic step with the watermark keeps the channel in seq order per stream, whichever
/// instance's `WAIT` answers first, and rings each event once.
pub const PUBLISH_THROUGH: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'epoch', 'head', 'first', 'pub')
if m[1] ~= ARGV[2] or not m[4] then return 0 end
local function int(n) return string.format('%d', n) end
local through = math.min(tonumber(ARGV[3]), tonumber(m[2]))
local from = math.max(tonumber(m[4]) + 1, tonumber(m[3]), through - tonumber(ARGV[6]) + 1)
if from > through then return 0 end
local entries = redis.call('XRANGE', KEYS[2], '0-' .. int(from), '0-' .. int(through))
for _, e in ipairs(entries) do
  redis.call('PUBLISH', ARGV[4] .. ':e:' .. ARGV[1], 'e|' .. ARGV[5] .. '|' .. ARGV[1] .. '|' ..
    string.sub(e[1], 3) .. '|' .. m[1] .. '|' .. e[2][2] .. '|' .. e[2][4])
end
redis.call('HSET', KEYS[1], 'pub', int(through))
return #entries
"#;

/// The bounds: `{epoch, head, first, count, bytes, renewed}`. `ARGV[7]` `'1'` when appends
/// `WAIT`: then the head is the last confirmed one (`visible`; `bytes` still counts the
/// unconfirmed tail).
const INFO: &str = r#"
local m, renewed = load_meta(false)
return bounds_reply(visible(m, ARGV[7] == '1'), renewed)
"#;

/// `ARGV[7]` position, `ARGV[8]` limit (negative: all), `ARGV[9]` `'1'` when appends `WAIT`
/// (events past the last confirmed one are not read: `visible`), `ARGV[10]` which events:
/// `a` (or none) seq > position, `b` seq < position newest first, `s` from the first event
/// stamped at or after the position (ms; found by bisection over the seqs, since stamps never
/// decrease along a log). The bounds, then `seq, ts, json` per event, all read in one step so
/// they describe the same log.
const READ: &str = r#"
local after, limit, mode = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[10] or 'a'
local m, renewed = load_meta(false)
m = visible(m, ARGV[9] == '1')
local out = bounds_reply(m, renewed)
local function push(entries)
  for _, e in ipairs(entries) do
    out[#out + 1] = seq_of(e[1])
    out[#out + 1] = e[2][2]
    out[#out + 1] = e[2][4]
  end
end
if mode == 'b' then
  local to = math.min(after - 1, m.head)
  if m.count > 0 and limit ~= 0 and to >= m.first then
    if limit > 0 then
      push(redis.call('XREVRANGE', KEYS[2], '0-' .. int(to), '0-' .. int(m.first), 'COUNT', limit))
    else
      push(redis.call('XREVRANGE', KEYS[2], '0-' .. int(to), '0-' .. int(m.first)))
    end
  end
  return out
end
local from = math.max(after + 1, m.first)
if mode == 's' then
  local lo, hi = m.first, m.head + 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local e = redis.call('XRANGE', KEYS[2], '0-' .. int(mid), '0-' .. int(mid))
    if #e == 0 or tonumber(e[1][2][2]) >= after then hi = mid else lo = mid + 1 end
  end
  from = lo
end
if m.count > 0 and limit ~= 0 and from <= m.head then
  local entries
  local to = '0-' .. int(m.head)
  if limit > 0 then
    entries = redis.call('XRANGE', KEYS[2], '0-' .. int(from), to, 'COUNT', limit)
  else
    entries = redis.call('XRANGE', KEYS[2], '0-' .. int(from), to)
  end
  push(entries)
end
return out
"#;

/// A batch's part for one stream, in one step (`batch_part`, over the keys and arguments
/// `bind` chose): `crate::rules::plan_items` spelled out (a key seen before answers its
/// duplicate, or refuses the whole part with another body; a key used twice in the part
/// likewise; anything new for a closed stream refuses the part), then every new event
/// appended in the part's order, the keys recorded, one trim, the bounds, and the doorbell as
/// `APPEND` rings it. A change to the rule must change both.
///
/// `KEYS[3]` the stream's key index, then per item `i` (1-based) `KEYS[3 + i]` its key's
/// record and `KEYS[3 + n + i]` its hit counter (any key of the stream for an item without a
/// key). `ARGV[7]` idempotency TTL (ms), `ARGV[8]` max events, `ARGV[9]` max bytes, `ARGV[10]`
/// origin token, `ARGV[11]` `'1'` when the caller follows with `WAIT`, `ARGV[12]` n, then per
/// item data, fingerprint (hex or `''`) and key (or `''`).
///
/// Replies `{'reused'}`, `{'closed', head}`, or `{'ok', ts, indexed, renewed, unlisted,
/// last new seq (0: none), epoch of the new events ('' if none)}` followed by `seq, epoch, dup`
/// per item.
const APPEND_BATCH: &str = r#"
local NEW = {'new'}
local function batch_part()
  local idem_ttl = ARGV[ao + 7]
  local max_events, max_bytes = tonumber(ARGV[ao + 8]), tonumber(ARGV[ao + 9])
  local origin, waits, n = ARGV[ao + 10], ARGV[ao + 11] == '1', tonumber(ARGV[ao + 12])
  local function arg(i, k) return ARGV[ao + 12 + 3 * (i - 1) + k] end
  local plan, first_of, any_new, keyed = {}, {}, false, false
  for i = 1, n do
    local fp, key = arg(i, 2), arg(i, 3)
    if fp == '' then
      plan[i] = NEW
      any_new = true
    else
      keyed = true
      local j = first_of[key]
      if j then
        if arg(j, 2) ~= fp then return {'reused'} end
        if plan[j][1] == 'dup' then plan[i] = plan[j] else plan[i] = {'same', j} end
      else
        first_of[key] = i
        local prev = redis.call('GET', KEYS[ko + 3 + i])
        if prev then
          local pfp, pseq, pepoch = string.match(prev, '^(%S+) (%d+) (%S+)$')
          if pfp ~= fp then return {'reused'} end
          plan[i] = {'dup', tonumber(pseq), pepoch}
        else
          plan[i] = NEW
          any_new = true
        end
      end
    end
  end
  local reply = {'ok', 0, 1, 0, 0, 0, ''}
  local seqs = {}
  if any_new then
    local m, renewed = load_meta(true)
    if m.closed then return {'closed', m.head} end
    local ts_s = stamp(m.ts)
    local ts = tonumber(ts_s)
    local added = 0
    for i = 1, n do
      if plan[i][1] == 'new' then
        local seq, json, seq_s = add_event(m, arg(i, 1), ts_s)
        seqs[i] = seq
        added = added + 1
        if not waits then
          ring_event(origin, seq_s, m.epoch, ts_s, json)
        end
        if arg(i, 2) ~= '' then
          redis.call('SET', KEYS[ko + 3 + i], arg(i, 2) .. ' ' .. seq_s .. ' ' .. m.epoch, 'PX',
            idem_ttl)
          redis.call('ZADD', KEYS[ko + 3], ts_s, arg(i, 3))
        end
      end
    end
    local removed = trim(m, max_events, max_bytes)
    save_bounds(m, int(m.head), ts_s, removed)
    if keyed then
      local expired = redis.call('ZCOUNT', KEYS[ko + 3], '-inf', int(ts - tonumber(idem_ttl)))
      if expired > 0 then
        redis.call('ZREMRANGEBYRANK', KEYS[ko + 3], 0, math.min(expired, 64) - 1)
      end
    end
    -- Without WAIT each new event was published after its XADD, as `APPEND` does.
    if waits and not m.pub then
      redis.call('HSET', KEYS[ko + 1], 'pub', int(m.head - added))
    end
    if removed > 0 then
      cold().ring_trim(m.first, removed)
    end
    reply = {'ok', ts, m.ix, renewed and 1 or 0, 0, m.head, m.epoch}
  end
  for i = 1, n do
    if plan[i][1] == 'dup' or plan[i][1] == 'same' then
      local left = redis.call('PTTL', KEYS[ko + 3 + i])
      redis.call('INCR', KEYS[ko + 3 + n + i])
      if left > 0 then redis.call('PEXPIRE', KEYS[ko + 3 + n + i], left) end
    end
  end
  if keyed then reply[5] = 1 - redis.call('HEXISTS', KEYS[ko + 1], 'pk') end
  for i = 1, n do
    local p = plan[i]
    if p[1] == 'new' then
      reply[#reply + 1] = seqs[i]
      reply[#reply + 1] = reply[7]
      reply[#reply + 1] = 0
    elseif p[1] == 'dup' then
      reply[#reply + 1] = p[2]
      reply[#reply + 1] = p[3]
      reply[#reply + 1] = 1
    else
      reply[#reply + 1] = seqs[p[2]]
      reply[#reply + 1] = reply[7]
      reply[#reply + 1] = 1
    end
  end
  return reply
end
"#;

/// Several streams' parts of a batch in one call, on a single server (every key in one
/// place) without `WAIT`: `ARGV[1]` the number of parts, then per part the count of its keys
/// and of its arguments, followed by its arguments; the parts' keys follow each other in
/// `KEYS`. Each part is an `APPEND_BATCH` call's keys and arguments (base-epoch key included),
/// run by the same `batch_part` in the parts' order, so each answers exactly what its own
/// `APPEND_BATCH` would have, and one refused part leaves the others as they are. Replies one
/// `APPEND_BATCH` reply per part.
const APPEND_BATCHES: &str = r#"
local parts, kat, aat, out = tonumber(ARGV[1]), 0, 1, {}
for p = 1, parts do
  local nk, na = tonumber(ARGV[aat + 1]), tonumber(ARGV[aat + 2])
  bind(kat, aat + 2, nk)
  out[p] = batch_part()
  kat, aat = kat + nk, aat + 2 + na
end
return out
"#;

/// Erases a stream: its key records (named in the key index `KEYS[3]`; `ARGV[7]` and
/// `ARGV[8]` are the prefixes of a key's record and hit counter), its log, and starts it again,
/// empty and open, in the fresh epoch `ARGV[2]`, announced like any renewal (`r|…`). Keeping
/// the bounds (rather than none) is what makes the new epoch stick: bounds that vanished would
/// let a reader fall back to the base epoch. Replies `{}` when the stream has no bounds, else
/// the new bounds.
const DELETE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local m = load_meta(false)
local keys = redis.call('ZRANGE', KEYS[3], 0, -1)
for _, k in ipairs(keys) do
  redis.call('DEL', ARGV[7] .. k, ARGV[8] .. k)
end
redis.call('DEL', KEYS[3])
local fresh = cold().new_log(candidate, m.ts)
cold().ring_renewed(candidate)
return bounds_reply(fresh, true)
"#;

/// Closes a stream at its head (the bounds' `closed` field), announced once as
/// `c|<stream>|<head>`. Replies `{}` when the stream has no bounds, else its bounds.
const CLOSE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local m, renewed = load_meta(false)
if not m.closed then
  redis.call('HSET', KEYS[1], 'closed', '1')
  redis.call('PUBLISH', channel, 'c|' .. stream .. '|' .. int(m.head))
end
return bounds_reply(m, renewed)
"#;

/// Age retention for one stream. `ARGV[7]` max age in ms, `ARGV[8]` most events removed in
/// one call. Replies `{score, removed}`: the time before which the stream needs no other age
/// check (its oldest retained event's ts, or now when it is empty).
///
/// The cutoff (`now - max age`; an event stamped before it goes) is `crate::rules::cutoff`,
/// computed here from the server's clock so that instances with skewed clocks agree.
const AGE: &str = r#"
local max_age, cap = tonumber(ARGV[7]), tonumber(ARGV[8])
local now = now_ms()
if redis.call('EXISTS', KEYS[1]) == 0 then return {now, 0} end
local m = load_meta(false)
local cutoff = now - max_age
local removed, removed_bytes, through, score = 0, 0, 0, nil
local cursor = m.first
while removed < cap and not score do
  local entries = redis.call('XRANGE', KEYS[2], '0-' .. int(cursor), '+', 'COUNT', 128)
  if #entries == 0 then break end
  for _, e in ipairs(entries) do
    local t = tonumber(e[2][2])
    if t >= cutoff then
      score = t
      break
    end
    through = seq_of(e[1])
    removed = removed + 1
    removed_bytes = removed_bytes + #e[2][4]
    cursor = through + 1
    if removed >= cap then
      score = t
      break
    end
  end
end
if removed > 0 then
  redis.call('XTRIM', KEYS[2], 'MINID', '0-' .. int(through + 1))
  m.first, m.count, m.bytes = through + 1, m.count - removed, m.bytes - removed_bytes
  redis.call('HSET', KEYS[1], 'first', int(m.first), 'count', int(m.count), 'bytes',
    int(m.bytes))
  cold().ring_trim(m.first, removed)
end
return {score or now, removed}
"#;

/// Marks the stream as present in the age index, if its bounds still exist.
pub const INDEXED: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'ix', 1) end
return 1
"#;

/// Marks the stream as present in the set of streams with publish keys, if its bounds still
/// exist.
pub const KEYS_LISTED: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'pk', 1) end
return 1
"#;

/// `KEYS[1]` session hash; `ARGV[1]` kept for (ms from now), then field/value pairs. Replaces the
/// session.
/// Fields go in chunks: `unpack` of thousands of values would overflow Lua's C stack.
pub const SESSION_CREATE: &str = r#"
redis.call('DEL', KEYS[1])
local i = 2
while i <= #ARGV do
  local j = math.min(i + 999, #ARGV)
  redis.call('HSET', KEYS[1], unpack(ARGV, i, j))
  i = j + 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"#;

/// `ARGV[1]` field, `ARGV[2]` value (`epoch ack dropped_through`); in the same epoch the larger
/// ack and dropped_through are kept. 0 when the session does not exist.
///
/// This is `crate::rules::merge_session_stream` spelled out on the server, so that reading the
/// old state and writing the new one are one step; a change to either must change both.
pub const SESSION_PUT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local new = ARGV[2]
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local oe, oa, od = string.match(old, '^(%S+) (%d+) (%d+)$')
  local ne, na, nd = string.match(new, '^(%S+) (%d+) (%d+)$')
  if oe and ne and oe == ne then
    -- Within one epoch a stream's ack never moves backwards.
    local a = math.max(tonumber(oa), tonumber(na))
    local d = math.max(tonumber(od), tonumber(nd))
    new = string.format('%s %d %d', ne, a, d)
  end
end
redis.call('HSET', KEYS[1], ARGV[1], new)
return 1
"#;

/// `ARGV[1]` expires_at_ms, `ARGV[2]` kept for (ms from now). Returns the session's `sub`, 0 when the
/// session does not exist.
/// A session's grants (`ARGV[1]`, JSON), only while the session (`KEYS[1]`) exists. Returns 1,
/// or 0 when it is gone.
pub const SESSION_GRANTS: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'grants', ARGV[1])
return 1
"#;

pub const SESSION_TOUCH: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'expires', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('HGET', KEYS[1], 'sub') or ''
"#;

/// A subject's live sessions (`KEYS[1]`, a sorted set: session id → end of its reconnect
/// window, ms), counted against the cap and joined by a new session in one step, so that
/// instances opening sessions for one subject at once never exceed it. `ARGV[1]` now (ms),
/// `ARGV[2]` the cap (0: none), `ARGV[3]` the session id, `ARGV[4]` its expires_at_ms.
/// The rule is `SessionCap`'s (`crate::rules`), spelled out on the server: live while the
/// window's end is after now (`SessionCap::is_live`); refused at `cap` live sessions other than
/// this one (`SessionCap::check`). A change to either must change both. Returns `{1}`, or `{0, <earliest end>}` when refused.
pub const SUBJECT_OPEN: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local cap = tonumber(ARGV[2])
if cap > 0 and not redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  if redis.call('ZCARD', KEYS[1]) >= cap then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, math.floor(tonumber(first[2]))}
  end
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
-- A duration, not an instant: the Redis server's clock may differ from ours.
redis.call('PEXPIRE', KEYS[1], math.max(1, math.floor(tonumber(last[2]) - tonumber(ARGV[1]))))
return {1}
"#;

/// A touched session's new window end in its subject's set (`KEYS[1]`), if it is there;
/// the set lives at least as long. `ARGV[1]` session id, `ARGV[2]` expires_at_ms, `ARGV[3]`
/// now (ms).
pub const SUBJECT_TOUCH: &str = r#"
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl >= 0 and tonumber(ARGV[3]) + ttl < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], math.floor(tonumber(ARGV[2]) - tonumber(ARGV[3])))
end
return 1
"#;

/// `ARGV[1]` field, `ARGV[2]` through. Raises `dropped_through`, never lowers it.
pub const SESSION_DROPPED: &str = r#"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local epoch, ack, dropped = string.match(v, '^(%S+) (%d+) (%d+)$')
if not epoch then return 0 end
local through = tonumber(ARGV[2])
if through > tonumber(dropped) then
  redis.call('HSET', KEYS[1], ARGV[1], epoch .. ' ' .. ack .. ' ' .. string.format('%d', through))
end
return 1
"#;

/// Compare-and-set of one session stream: `ARGV[1]` field, `ARGV[2]` expected, `ARGV[3]` new.
pub const SESSION_CAS: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"#;

pub fn append() -> String {
    format!("{PRELUDE}{WRITERS}{APPEND}")
}

pub fn append_batch() -> String {
    format!("{PRELUDE}{WRITERS}{APPEND_BATCH}return batch_part()\n")
}

pub fn append_batches() -> String {
    format!("{PRELUDE}{WRITERS}{APPEND_BATCH}{APPEND_BATCHES}")
}

pub fn delete() -> String {
    format!("{PRELUDE}{READERS}{DELETE}")
}

pub fn close() -> String {
    format!("{PRELUDE}{READERS}{CLOSE}")
}

pub fn info() -> String {
    format!("{PRELUDE}{READERS}{INFO}")
}

pub fn read() -> String {
    format!("{PRELUDE}{READERS}{READ}")
}

pub fn age() -> String {
    format!("{PRELUDE}{READERS}{AGE}")
}
