"""Redis frame cache: the service's backend.

The key layout is the one documented in `frame_cache.base` (every key of a stream
carries the hash tag ``{<stream_id>}``, so a Redis Cluster keeps a stream in one slot):

* ``<prefix>:{<sid>}:meta`` - HASH: ``capacity``, ``on_full``, ``max_bytes`` ("" =
  unlimited), ``meta`` (JSON), ``version`` (record format), ``next_seq``, ``count``,
  ``bytes_used``, ``light_bytes``, ``last_pts`` ("" before the first frame), ``writer``
  (fencing epoch), ``evicted`` (frames overwritten so far), ``ev_collapsed``/``ev_first``/
  ``ev_last`` (evicted frames whose pts were trimmed from the ``evicted`` ZSET: count and
  pts range, for the estimate of ``dropped_before``), ``batch``/``batch_seq0``/``batch_n``
  (id and seqs of the last committed append, see "Retries" below).
* ``<prefix>:{<sid>}:slots`` / ``:light`` / ``:tokens`` - HASH ``seq % capacity -> record bytes``
  (full record / light record without keys/values / token record: vision token(s), pts and
  meta only). ``light_bytes`` counts the light and token copies.
* ``<prefix>:{<sid>}:pts`` - ZSET ``member = "%016d" % seq, score = pts`` of retained frames.
* ``<prefix>:{<sid>}:evicted`` - ZSET of evicted frames, same members and scores, trimmed
  to between ``pts_history`` and ``2 * pts_history`` entries (the in-process backend's rule;
  the appending client's ``pts_history`` applies).
* ``<prefix>:streams`` - SET of stream ids (no hash tag: never touched by a script, so it is
  updated by separate commands: ``SADD`` before a stream's meta is created, ``SREM`` after it
  is deleted; a stream with a meta hash is therefore always listed, and `streams` leaves out
  listed ids whose meta is gone, e.g. after a crash between the two commands).
* ``<prefix>:total_bytes`` - STRING, the sum of every stream's ``bytes_used`` (standalone
  Redis only: a Cluster cannot update it in the same script as a stream's keys, so
  ``max_bytes_total`` is refused there).

Scripts (run with ``EVALSHA``, ``EVAL`` when the server does not know them yet; every one
reads or writes the keys of ONE stream, so Redis Cluster runs them on the stream's slot and
never answers CROSSSLOT):

* ``append``: fence check (``writer`` token == the stream's epoch, else StaleWriter) ->
  "this batch is already committed" check (``batch`` id, see below) -> ``next_seq`` still the
  one the records were encoded with (else it answers RETRY) -> pts order against ``last_pts``
  -> ``on_full="error"`` capacity -> per-stream and total byte budgets (lengths of the
  overwritten slots from ``HSTRLEN``) -> only then writes: moves the overwritten frames'
  ``pts`` members to ``evicted`` (trimming it), writes ``slots``/``light``/``tokens`` at ``seq %
  capacity``, adds the new ``pts`` members, updates the counters. Every refusal happens
  before the first write, and a script's writes reach replicas and the AOF as one
  MULTI/EXEC, so a reader, a replica or a restarted server never sees half a commit.
* ``window``: the zset range (``ZRANGEBYSCORE``, or ``ZREVRANGEBYSCORE ... LIMIT`` for
  ``max_frames``, or the newest ``n`` for `latest`), ``ZCOUNT`` of the evicted zset and the
  counters, at one instant; with blobs for `snapshot` (HMGET of the slots) when they total
  at most ``snapshot_script_bytes``.
* ``read``: ``HMGET`` of ``slots``, ``light`` or ``tokens`` for the seqs still retained.
* ``create``, ``info``, ``stats``, ``acquire``, ``delete``: the obvious.

Read scripts carry ``#!lua flags=no-writes`` (they run while Redis is over ``maxmemory``);
write scripts are refused as a whole under ``maxmemory`` (Redis's default for scripts with
a shebang), except ``delete`` and ``acquire`` (``allow-oom``; acquire rewrites one counter), so that
a full Redis can still be emptied: deleting a stream something still writes (a running job, a live
socket) fences its writer first, and that fence was refused while full (507, nothing freed).

Retries. Records are encoded in Python with their final seq (``next_seq`` read first) and
the ``append`` script is told which ``next_seq`` they were encoded for; if another writer
committed in between it answers RETRY and Python re-reads and re-encodes (each RETRY means
some other append succeeded, so no attempt is wasted without progress; it gives up after
``_MAX_COMMIT_ATTEMPTS`` with `CacheError`). Fenced writers (`acquire_writer`) never race.
Each `append_many` call carries a random batch id; the script remembers the last committed
one, so a re-send of the same call (redis-py's own retry after a lost reply) returns the seqs
already assigned instead of storing the frames twice (unless another writer committed in
between: unfenced concurrent writers should pass ``seq=``). A caller that gets
`CacheUnavailable` from an append does not know whether it was committed: it retries with
``seq=`` (idempotent, see `FrameCache.append_many`).

Errors: every redis-py connection error, timeout, "loading" reply or error reply that is not
one of ours becomes `CacheUnavailable` (naming the Redis URL and the operation), an ``OOM``
reply becomes `CacheBudgetExceeded`; frames already stored are never touched by an error path.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.cluster
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from lmcore.errors import (
    BadArgument,
    CacheError,
    CacheUnavailable,
    CapacityExceeded,
    LmsError,
    StaleWriter,
)

from .base import (
    KEY_PREFIX,
    LIGHT_SAME_AS_FULL,
    MAX_CAPACITY,
    CacheBudgetExceeded,
    CacheClosed,
    FrameCache,
    FrameWindow,
    Snapshot,
    StreamExists,
    StreamInfo,
    StreamNotFound,
    _KEY_PART_PATTERN,
    check_budget_arg as _check_budget_arg,
    check_count as _check_count,
    check_new_stream,
    check_replacements,
    check_existing_meta,
    check_window_args,
    check_read_part,
    light_copy_bytes,
    token_copy_bytes,
    stream_key,
    validate_stream_id,
)
from .memory import DEFAULT_PTS_HISTORY
from .record import RECORD_VERSION, FrameRecord, encode_record, record_seq

__all__ = ["RedisFrameCache", "DEFAULT_SNAPSHOT_SCRIPT_BYTES", "client_from_url"]

#: Largest snapshot (sum of record bytes) read by a single script; a larger one is read in
#: chunks (each record checked against its seq; the whole read redone if one was overwritten).
DEFAULT_SNAPSHOT_SCRIPT_BYTES = 256 << 20
#: Records per read call in a chunked snapshot read.
_SNAPSHOT_CHUNK = 64
#: Attempts of an append whose ``next_seq`` keeps changing under it (concurrent writers).
_MAX_COMMIT_ATTEMPTS = 64
#: Chunked snapshot reads that found a frame overwritten before falling back to one script.
_MAX_SNAPSHOT_ATTEMPTS = 3
#: The parts of a stream, in the order every script gets them as KEYS[1..6]. ``tokens`` came last (a
#: stream written before it has none: its token reads fall back to the light copies).
_PARTS = ("meta", "slots", "light", "pts", "evicted", "tokens")

# ----------------------------------------------------------------------------- Lua
# Helpers shared by the scripts. Numbers handed to redis.call are formatted with %d (Lua's
# default %.14g would round large integers); pts travel as the strings Python wrote (repr,
# exact) and come back as Redis's exact score strings, never through a Lua number.
_LUA_HELPERS = r"""
local function I(x) return string.format('%d', x) end
local function M(s) return string.format('%016d', s) end
local function INFO()
  return {redis.call('HGETALL', KEYS[1]),
          redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES'),
          redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')}
end
local function HMGET_MANY(key, fields)
  local out = {}
  for i = 1, #fields, 500 do
    local part = {}
    for j = i, math.min(i + 499, #fields) do part[#part + 1] = fields[j] end
    local v = redis.call('HMGET', key, unpack(part))
    for j = 1, #part do out[#out + 1] = v[j] end
  end
  return out
end
"""

# ARGV: capacity, on_full, max_bytes ('' = none), meta JSON, record version, exist_ok ('0'/'1').
# -> {created (0/1), INFO()}
_LUA_CREATE = "#!lua\n" + _LUA_HELPERS + r"""
local created = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  if ARGV[6] == '0' then return redis.error_reply('LMSERR EXISTS') end
else
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
  redis.call('HSET', KEYS[1], 'capacity', ARGV[1], 'on_full', ARGV[2], 'max_bytes', ARGV[3],
             'meta', ARGV[4], 'version', ARGV[5], 'next_seq', '0', 'count', '0', 'bytes_used', '0',
             'light_bytes', '0', 'last_pts', '', 'writer', '0', 'evicted', '0', 'ev_collapsed', '0',
             'ev_first', '', 'ev_last', '', 'batch', '', 'batch_seq0', '0', 'batch_n', '0')
  created = 1
end
return {created, INFO()}
"""

_LUA_INFO = "#!lua flags=no-writes\n" + _LUA_HELPERS + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('LMSERR NOSTREAM') end
return INFO()
"""

# -> {INFO(), memory usage of the 6 keys (0 when absent), ZCARD evicted}
_LUA_STATS = "#!lua flags=no-writes\n" + _LUA_HELPERS + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('LMSERR NOSTREAM') end
local mem = {}
for i = 1, 6 do mem[i] = redis.call('MEMORY', 'USAGE', KEYS[i]) or 0 end
return {INFO(), mem, redis.call('ZCARD', KEYS[5])}
"""

_LUA_ACQUIRE = "#!lua flags=allow-oom\n" + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('LMSERR NOSTREAM') end
return redis.call('HINCRBY', KEYS[1], 'writer', 1)
"""

# KEYS[7] (standalone only): the total-bytes counter.
_LUA_DELETE = "#!lua flags=allow-oom\n" + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('LMSERR NOSTREAM') end
local b = tonumber(redis.call('HGET', KEYS[1], 'bytes_used')) or 0
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
if KEYS[7] then redis.call('DECRBY', KEYS[7], string.format('%d', b)) end
return 1
"""

# ARGV: 1 writer token ('' = unfenced), 2 next_seq the records were encoded for, 3 batch id,
#       4 pts_history, 5 max_bytes_total ('' = none), 6 n, then per record i (1-based)
#       ARGV[6+4i-3] pts (repr), ARGV[6+4i-2] record bytes, ARGV[6+4i-1] light record bytes,
#       ARGV[6+4i] token record bytes. ``light_bytes`` counts the light and token copies.
# KEYS[7] (standalone only): the total-bytes counter.
# -> {'OK', seq0} | {'DONE', seq0, n} (this batch id was committed already) | {'RETRY', next_seq}
#    | error 'LMSERR <KIND> ...' with nothing written.
_LUA_APPEND = "#!lua\n" + _LUA_HELPERS + r"""
local mk, sk, lk, pk, ek, ok, tk = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
if redis.call('EXISTS', mk) == 0 then return redis.error_reply('LMSERR NOSTREAM') end
local f = redis.call('HMGET', mk, 'capacity', 'on_full', 'max_bytes', 'next_seq', 'count', 'bytes_used',
                     'light_bytes', 'last_pts', 'writer', 'batch', 'batch_seq0', 'batch_n', 'evicted',
                     'ev_collapsed')
if ARGV[1] ~= '' and ARGV[1] ~= f[9] then return redis.error_reply('LMSERR STALE ' .. f[9]) end
if ARGV[3] == f[10] then return {'DONE', f[11], f[12]} end
if ARGV[2] ~= f[4] then return {'RETRY', f[4]} end
local cap, seq0, count = tonumber(f[1]), tonumber(f[4]), tonumber(f[5])
local n, B = tonumber(ARGV[6]), 6
if f[8] ~= '' and tonumber(ARGV[B + 1]) < tonumber(f[8]) then
  return redis.error_reply('LMSERR PTS ' .. f[8])
end
if f[2] == 'error' and count + n > cap then
  return redis.error_reply('LMSERR CAPACITY ' .. f[5] .. ' ' .. f[1])
end
-- frames retained after the commit: new_oldest .. seq0 + n - 1
local oldest = seq0 - count
local new_oldest = math.max(oldest, seq0 + n - cap)
local old_last_evicted = math.min(seq0, new_oldest) - 1
local used, lused = tonumber(f[6]), tonumber(f[7])
local after, lafter = used, lused
for s = oldest, old_last_evicted do
  local slot = I(s % cap)
  after = after - redis.call('HSTRLEN', sk, slot)
  lafter = lafter - redis.call('HSTRLEN', lk, slot) - redis.call('HSTRLEN', ok, slot)
end
for i = 1, n do
  if seq0 + i - 1 >= new_oldest then
    after = after + #ARGV[B + 4 * i - 2]
    lafter = lafter + #ARGV[B + 4 * i - 1] + #ARGV[B + 4 * i]
  end
end
if f[3] ~= '' and after > tonumber(f[3]) then
  return redis.error_reply('LMSERR BUDGET ' .. f[3] .. ' ' .. I(after))
end
if tk and ARGV[5] ~= '' then
  local total = (tonumber(redis.call('GET', tk)) or 0) - used + after
  if total > tonumber(ARGV[5]) then return redis.error_reply('LMSERR TOTAL ' .. ARGV[5] .. ' ' .. I(total)) end
end
-- all checks passed: from here on, only writes
local ev_n = 0
for s = oldest, old_last_evicted do
  local m = M(s)
  local score = redis.call('ZSCORE', pk, m)
  redis.call('ZREM', pk, m)
  redis.call('ZADD', ek, score, m)
  ev_n = ev_n + 1
end
for i = 1, n do
  local s = seq0 + i - 1
  if s < new_oldest then  -- overwritten within this very batch
    redis.call('ZADD', ek, ARGV[B + 4 * i - 3], M(s))
    ev_n = ev_n + 1
  else
    local slot = I(s % cap)
    redis.call('HSET', sk, slot, ARGV[B + 4 * i - 2])
    redis.call('HSET', lk, slot, ARGV[B + 4 * i - 1])
    redis.call('HSET', ok, slot, ARGV[B + 4 * i])
    redis.call('ZADD', pk, ARGV[B + 4 * i - 3], M(s))
  end
end
if ev_n > 0 then
  local hist = tonumber(ARGV[4])
  local card = redis.call('ZCARD', ek)
  if card > 2 * hist then  -- trim in chunks (amortised O(1)), like the in-process backend
    local k = card - hist
    local collapsed = tonumber(f[14])
    if collapsed == 0 then redis.call('HSET', mk, 'ev_first', redis.call('ZRANGE', ek, 0, 0, 'WITHSCORES')[2]) end
    redis.call('HSET', mk, 'ev_last', redis.call('ZRANGE', ek, k - 1, k - 1, 'WITHSCORES')[2],
               'ev_collapsed', I(collapsed + k))
    redis.call('ZREMRANGEBYRANK', ek, 0, k - 1)
  end
end
redis.call('HSET', mk, 'next_seq', I(seq0 + n), 'count', I(math.min(cap, count + n)), 'bytes_used', I(after),
           'light_bytes', I(lafter), 'last_pts', ARGV[B + 4 * n - 3], 'evicted', I(tonumber(f[13]) + ev_n),
           'batch', ARGV[3], 'batch_seq0', I(seq0), 'batch_n', I(n))
if tk then redis.call('INCRBY', tk, I(after - used)) end
return {'OK', I(seq0)}
"""

# ARGV: 1 n, then per record i (1-based) ARGV[1+5i-4] seq, ARGV[1+5i-3] pts (repr), ARGV[1+5i-2] record
#       bytes, ARGV[1+5i-1] light record bytes, ARGV[1+5i] token record bytes. KEYS[7] (standalone only):
#       the total-bytes counter.
# -> {seq, ...} the frames rewritten (those still in the ring) | error 'LMSERR PTS seq stored'.
_LUA_REPLACE = "#!lua flags=allow-oom\n" + _LUA_HELPERS + r"""
local mk, sk, lk, pk, ok, tk = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6], KEYS[7]
if redis.call('EXISTS', mk) == 0 then return redis.error_reply('LMSERR NOSTREAM') end
local f = redis.call('HMGET', mk, 'capacity', 'bytes_used', 'light_bytes')
local cap, used, lused = tonumber(f[1]), tonumber(f[2]), tonumber(f[3])
local n, done, todo = tonumber(ARGV[1]), {}, {}
for i = 1, n do
  local seq = ARGV[5 * i - 3]
  local score = redis.call('ZSCORE', pk, M(tonumber(seq)))
  if score then
    if tonumber(score) ~= tonumber(ARGV[5 * i - 2]) then
      return redis.error_reply('LMSERR PTS ' .. seq .. ' ' .. score)
    end
    todo[#todo + 1] = i
  end
end
-- all checks passed: from here on, only writes
for _, i in ipairs(todo) do
  local seq = tonumber(ARGV[5 * i - 3])
  local slot = I(seq % cap)
  used = used - redis.call('HSTRLEN', sk, slot) + #ARGV[5 * i - 1]
  lused = lused - redis.call('HSTRLEN', lk, slot) - redis.call('HSTRLEN', ok, slot) + #ARGV[5 * i] + #ARGV[5 * i + 1]
  redis.call('HSET', sk, slot, ARGV[5 * i - 1])
  redis.call('HSET', lk, slot, ARGV[5 * i])
  redis.call('HSET', ok, slot, ARGV[5 * i + 1])
  done[#done + 1] = I(seq)
end
if tk then redis.call('INCRBY', tk, I(used - tonumber(f[2]))) end
redis.call('HSET', mk, 'bytes_used', I(used), 'light_bytes', I(lused))
return done
"""

# ARGV: 1 mode ('range' | 'latest'), 2 start score ('-inf' or repr), 3 end score ('+inf' or repr),
#       4 limit ('' = none; for 'latest' the n), 5 blob budget ('-1' = no blobs).
# -> {counters, {member, score, ...} oldest first, evicted count in [start, end],
#     blobs (when asked and within budget), 'ALL' | 'BIG' | 'NONE'}
_LUA_WINDOW = "#!lua flags=no-writes\n" + _LUA_HELPERS + r"""
local f = redis.call('HMGET', KEYS[1], 'next_seq', 'count', 'capacity', 'ev_collapsed', 'ev_first', 'ev_last')
if not f[1] then return redis.error_reply('LMSERR NOSTREAM') end
local items, zc = {}, 0
if ARGV[1] == 'latest' then
  local n = tonumber(ARGV[4])
  if n > 0 then items = redis.call('ZRANGE', KEYS[4], -n, -1, 'WITHSCORES') end
else
  if ARGV[4] == '' then
    items = redis.call('ZRANGEBYSCORE', KEYS[4], ARGV[2], ARGV[3], 'WITHSCORES')
  else
    local n = tonumber(ARGV[4])
    if n > 0 then
      local rev = redis.call('ZREVRANGEBYSCORE', KEYS[4], ARGV[3], ARGV[2], 'WITHSCORES', 'LIMIT', 0, n)
      for i = #rev - 1, 1, -2 do items[#items + 1] = rev[i]; items[#items + 1] = rev[i + 1] end
    end
  end
  zc = redis.call('ZCOUNT', KEYS[5], ARGV[2], ARGV[3])
end
local budget = tonumber(ARGV[5])
if budget < 0 or #items == 0 then return {f, items, zc, {}, 'NONE'} end
local cap, fields, total = tonumber(f[3]), {}, 0
for i = 1, #items, 2 do
  local slot = I(tonumber(items[i]) % cap)
  fields[#fields + 1] = slot
  total = total + redis.call('HSTRLEN', KEYS[2], slot)
end
if total > budget then return {f, items, zc, {}, 'BIG'} end
return {f, items, zc, HMGET_MANY(KEYS[2], fields), 'ALL'}
"""

# KEYS: meta, slots-or-light. ARGV: seqs. -> record bytes or nil per seq (nil: not retained).


class _Script:
    """A Lua script run by ``EVALSHA``, falling back to ``EVAL`` (which also caches it) when the
    server does not know it (``NOSCRIPT``: a restarted server, a new cluster node).

    Unlike redis-py's ``register_script``, which answers NOSCRIPT with ``SCRIPT LOAD`` sent to
    every master of a Cluster (so one dead master breaks streams on the healthy ones), both
    commands here go only to the node serving ``keys[0]``."""

    def __init__(self, client: Any, text: str) -> None:
        self.client = client
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def __call__(self, *, keys: list[str], args: Iterable[Any] = ()) -> Any:
        args = list(args)
        try:
            return self.client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return self.client.eval(self.text, len(keys), *keys, *args)


class _ScriptError(Exception):
    """One of our scripts refused (``LMSERR KIND args...``); nothing was written."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        parts = reply.split()
        self.kind = parts[1] if len(parts) > 1 else ""
        self.args_ = parts[2:]


def _pairs(flat: list) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def _score(x: float | None, unbounded: str) -> str:
    return unbounded if x is None else repr(float(x))


def _opt_int(b: bytes | None) -> int | None:
    return None if not b else int(b)


def _safe_url(url: str) -> str:
    """``url`` without a password and without the query (for messages)."""
    p = urlsplit(url)
    netloc = p.hostname or ""
    if p.hostname and ":" in p.hostname:
        netloc = f"[{p.hostname}]"
    if p.port:
        netloc += f":{p.port}"
    if p.username:
        netloc = f"{p.username}@{netloc}"
    return urlunsplit((p.scheme, netloc, p.path, "", ""))


def _client_url(client: Any) -> str:
    """A password-free URL describing a redis-py client, for messages."""
    try:
        if isinstance(client, redis.cluster.RedisCluster):
            nodes = sorted(client.nodes_manager.startup_nodes)
            return "redis-cluster://" + ",".join(nodes)
        kw = client.connection_pool.connection_kwargs
        if kw.get("path"):
            return f"unix://{kw['path']}?db={kw.get('db', 0)}"
        scheme = "rediss" if "ssl" in type(client.connection_pool.connection_class).__name__.lower() else "redis"
        return f"{scheme}://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
    except Exception:  # a client of an unexpected shape: still say something useful
        return f"<{type(client).__name__}>"


def _is_cluster(url: str, kw: dict[str, Any]) -> bool:
    """Whether the server at ``url`` runs in cluster mode (False when it cannot be asked)."""
    kw = {**kw, "retry": Retry(ExponentialBackoff(cap=0.1, base=0.05), 0)}
    kw["socket_timeout"] = min(kw.get("socket_timeout") or 2.0, 2.0)
    kw["socket_connect_timeout"] = min(kw.get("socket_connect_timeout") or 2.0, 2.0)
    try:
        probe = redis.Redis.from_url(url, **kw)
    except (ValueError, TypeError) as e:
        raise BadArgument(f"expected a usable Redis URL and options, got {_safe_url(url)!r}: {e}") from None
    try:
        return bool(int(probe.info("cluster").get("cluster_enabled", 0)))
    except TypeError as e:                 # an option the URL's query gave that redis-py has no such name for
        raise BadArgument(f"expected a usable Redis URL and options, got {_safe_url(url)!r}: {e}") from None
    except (redis.exceptions.RedisError, OSError, ValueError):
        return False
    finally:
        probe.close()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def memory_nodes(client) -> list[dict[str, Any]]:
    """``INFO memory`` of the server, or of each master of a Redis Cluster (one dict each)."""
    if isinstance(client, redis.cluster.RedisCluster):       # {node name: INFO} over the masters
        raw = client.info("memory", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    else:
        raw = client.info("memory")
    return list(raw.values()) if raw and all(isinstance(v, dict) for v in raw.values()) else [raw]


def oom_message(client, url: str, what: str, nodes: list[dict[str, Any]] | None = None) -> str:
    """What a write refused over ``maxmemory`` is told: the server's own figures (`nodes`, else read now; a
    write must fit under the cap with the request's own bytes, so a batch of frames is refused with room left
    for a smaller one), and the way out. Redis's own reply named the script's SHA and its Lua line (``script:
    c915..., on @user_script:1``), nothing a client can use."""
    try:
        nodes = memory_nodes(client) if nodes is None else nodes
        capped = [(int(n.get("used_memory", 0)), int(n.get("maxmemory", 0))) for n in nodes
                  if int(n.get("maxmemory", 0))]
        used, cap = max(capped, key=lambda uc: uc[0] / uc[1]) if capped else (0, 0)
        who = "it holds" if len(nodes) == 1 else "its fullest node holds"      # a Cluster: one master fills first
        figures = f"{who} {_mib(used)} of its maxmemory {_mib(cap)}" if cap else "its maxmemory is reached"
    except Exception:  # noqa: BLE001 - the figures are a courtesy: the refusal is what matters
        figures = "its maxmemory is reached"
    return (f"expected Redis at {url} to have memory for {what}, got it full ({figures}; its policy refuses "
            "writes past it); nothing was stored: delete videos or streams, or raise its maxmemory")


def client_from_url(url: str, *, cluster: bool | None = None, socket_timeout: float = 5.0,
                    socket_connect_timeout: float = 5.0, **client_kw: Any) -> tuple[Any, bool, str]:
    """(client, cluster, URL without password) for ``url``, as `RedisFrameCache.from_url` documents:
    a `RedisCluster` for a Redis Cluster (``?cluster=1``, or a server that says so), else a plain
    `Redis`. The service's other Redis state (jobs, streams, watches) uses the same clients."""
    if not isinstance(url, str) or "://" not in url:
        raise BadArgument(f"expected a Redis URL redis://HOST:PORT[/DB], got {url!r}")
    p = urlsplit(url)
    if p.scheme in ("redis", "rediss") and p.path.strip("/") and not p.path.strip("/").isdigit():
        raise BadArgument(f"expected a Redis URL redis://HOST:PORT[/DB] with DB a number, got {_safe_url(url)!r}")
    query = parse_qsl(p.query, keep_blank_values=True)
    flags = [v for k, v in query if k == "cluster"]
    if flags:
        if flags[-1].lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise BadArgument(f"expected ?cluster=1 or ?cluster=0 in the Redis URL, got cluster={flags[-1]!r}")
        from_query = flags[-1].lower() in ("1", "true", "yes")
        if cluster is not None and cluster != from_query:
            raise BadArgument(f"expected cluster={cluster} to agree with the URL's ?cluster={flags[-1]}")
        cluster = from_query
    rest = urlencode([(k, v) for k, v in query if k != "cluster"])
    if p.scheme == "unix":             # urlunsplit drops the "//" of a host-less URL: keep unix:///path
        clean = f"unix://{p.netloc}{p.path}" + (f"?{rest}" if rest else "")
    else:
        clean = urlunsplit((p.scheme, p.netloc, p.path, rest, p.fragment))
    timeouts = dict(socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout)
    if cluster is None:
        cluster = _is_cluster(clean, {**client_kw, **timeouts})
    safe = _safe_url(clean) + ("?cluster=1" if cluster else "")
    client_kw.setdefault("retry", Retry(ExponentialBackoff(cap=0.25, base=0.05), 1))
    try:
        make = redis.cluster.RedisCluster.from_url if cluster else redis.Redis.from_url
        client = make(clean, **timeouts, **client_kw)
    except (ValueError, TypeError) as e:
        raise BadArgument(f"expected a usable Redis URL and options, got {safe!r}: {e}") from None
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as e:  # a cluster connects now
        raise CacheUnavailable(f"expected a reachable Redis at {safe}, got {type(e).__name__}: {e}") from None
    return client, bool(cluster), safe


def check_reachable(url: str, timeout: float = 3.0) -> str:
    """Ask the Redis at ``url`` for a PING once: `CacheUnavailable` (where it was expected, what came
    back) when it does not answer, `BadArgument` for a URL that is not one. Returns the URL without
    its password. `lmstream serve` calls it before Ray starts, so a wrong --redis fails in seconds."""
    client, _, safe = client_from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as e:
        raise CacheUnavailable(f"expected a reachable Redis at {safe}, got {type(e).__name__}: {e}") from None
    finally:
        client.close()
    return safe


class RedisFrameCache(FrameCache):
    """`FrameCache` on Redis (standalone or Cluster), same semantics as `InProcessFrameCache`.

    Thread-safe (redis-py clients are); several processes may share a Redis and its streams.

    Args:
        client: a ``redis.Redis`` or ``redis.cluster.RedisCluster`` with
            ``decode_responses=False``. Prefer `from_url`, which sets short timeouts and a
            single quick retry.
        max_bytes_per_stream: budget for each new stream's retained records, in bytes (stored
            with the stream when it is created; None: unlimited).
        max_bytes_total: budget for all streams under ``prefix`` together (None: unlimited).
            Standalone Redis only (BadArgument with a Cluster). An append over either budget
            raises `CacheBudgetExceeded` and stores and evicts nothing.
        pts_history: evicted frames per stream whose pts are remembered exactly for
            ``Snapshot.dropped_before``; older ones give an estimate.
        prefix: first part of every key (1-64 characters of ``[A-Za-z0-9._:-]``).
        cluster: whether ``client`` is a Redis Cluster client (None: detect).
        owns_client: close ``client`` in `close` (True for caches made by `from_url`).
        url: how messages name the server (default: made from the client, no password).
        snapshot_script_bytes: largest snapshot read by one script (see
            `DEFAULT_SNAPSHOT_SCRIPT_BYTES`).
    """

    backend = "redis"

    def __init__(
        self,
        client: redis.Redis | redis.cluster.RedisCluster,
        *,
        max_bytes_per_stream: int | None = None,
        max_bytes_total: int | None = None,
        pts_history: int = DEFAULT_PTS_HISTORY,
        prefix: str = KEY_PREFIX,
        cluster: bool | None = None,
        owns_client: bool = False,
        url: str | None = None,
        snapshot_script_bytes: int = DEFAULT_SNAPSHOT_SCRIPT_BYTES,
    ) -> None:
        if not isinstance(client, (redis.Redis, redis.cluster.RedisCluster)):
            raise BadArgument("expected a redis.Redis or redis.cluster.RedisCluster client, "
                              f"got {type(client).__name__}")
        self.cluster = isinstance(client, redis.cluster.RedisCluster) if cluster is None else bool(cluster)
        if self.cluster != isinstance(client, redis.cluster.RedisCluster):
            raise BadArgument(f"expected cluster={isinstance(client, redis.cluster.RedisCluster)} for a "
                              f"{type(client).__name__} client, got cluster={cluster}")
        try:
            decode = (client.nodes_manager.connection_kwargs if self.cluster
                      else client.connection_pool.connection_kwargs).get("decode_responses", False)
        except AttributeError:
            decode = False
        if decode:
            raise BadArgument("expected a redis client with decode_responses=False (records are bytes), "
                              "got decode_responses=True")
        if not isinstance(prefix, str) or _KEY_PART_PATTERN.fullmatch(prefix) is None:
            raise BadArgument(f"expected a key prefix of 1-64 characters from [A-Za-z0-9._:-], got {prefix!r}")
        self.max_bytes_per_stream = _check_budget_arg("max_bytes_per_stream", max_bytes_per_stream)
        self.max_bytes_total = _check_budget_arg("max_bytes_total", max_bytes_total)
        if self.cluster and self.max_bytes_total is not None:
            raise BadArgument("expected max_bytes_total=None with a Redis Cluster (a cluster cannot keep one "
                              f"atomic total across slots), got {self.max_bytes_total}; use max_bytes_per_stream")
        self.pts_history = _check_count("pts_history", pts_history)
        self.snapshot_script_bytes = _check_count("snapshot_script_bytes", snapshot_script_bytes)
        self.prefix = prefix
        self.url = url if url is not None else _client_url(client)
        self._client = client
        self._owns_client = owns_client
        self._streams_key = f"{prefix}:streams"
        self._total_key = f"{prefix}:total_bytes"
        self._lock = threading.Lock()
        self._closed = False
        self._append_retries = 0  # appends re-read and re-encoded after a concurrent commit
        self._s_create, self._s_info, self._s_stats, self._s_acquire, self._s_delete = (
            _Script(client, t) for t in (_LUA_CREATE, _LUA_INFO, _LUA_STATS, _LUA_ACQUIRE, _LUA_DELETE))
        self._s_append, self._s_window, self._s_replace = (
            _Script(client, t) for t in (_LUA_APPEND, _LUA_WINDOW, _LUA_REPLACE))
        self._caps: dict[str, int] = {}

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        cluster: bool | None = None,
        max_bytes_per_stream: int | None = None,
        max_bytes_total: int | None = None,
        pts_history: int = DEFAULT_PTS_HISTORY,
        prefix: str = KEY_PREFIX,
        snapshot_script_bytes: int = DEFAULT_SNAPSHOT_SCRIPT_BYTES,
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 5.0,
        **client_kw: Any,
    ) -> "RedisFrameCache":
        """A cache on a new client for ``url`` (``redis://[user:pass@]host:port/db``,
        ``rediss://...``, ``unix:///path?db=N``).

        ``?cluster=1`` (or ``cluster=True``) makes a Redis Cluster client from one node's
        address, ``?cluster=0`` (``cluster=False``) a plain one; otherwise the server is asked
        (``INFO cluster``; a server that does not answer now is taken as standalone).
        ``socket_timeout`` and ``socket_connect_timeout`` (s) bound every call, so a dead or
        frozen Redis gives `CacheUnavailable` instead of a hang; redis-py retries a failed
        connection once. ``client_kw`` go to redis-py."""
        client, cluster, safe = client_from_url(url, cluster=cluster, socket_timeout=socket_timeout,
                                                socket_connect_timeout=socket_connect_timeout, **client_kw)
        try:
            return cls(client, cluster=cluster, max_bytes_per_stream=max_bytes_per_stream,
                       max_bytes_total=max_bytes_total, pts_history=pts_history, prefix=prefix,
                       owns_client=True, url=safe, snapshot_script_bytes=snapshot_script_bytes)
        except BaseException:
            client.close()
            raise

    # -- helpers -------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosed("expected an open frame cache, got one that was closed")

    def _keys(self, stream_id: str, *, total: bool = False) -> list[str]:
        keys = [stream_key(stream_id, part, prefix=self.prefix) for part in _PARTS]
        if total and not self.cluster:
            keys.append(self._total_key)
        return keys

    @staticmethod
    def _not_found(stream_id: str) -> StreamNotFound:
        return StreamNotFound(f"expected an existing stream, got unknown stream {stream_id!r}")

    @contextmanager
    def _redis(self, what: str, stream_id: str | None = None) -> Iterator[None]:
        """Map redis-py's exceptions: ours (``LMSERR``) to `_ScriptError` (``NOSTREAM`` to
        `StreamNotFound`), OOM to `CacheBudgetExceeded`, anything else to `CacheUnavailable`."""
        try:
            yield
        except LmsError:
            raise
        except redis.exceptions.OutOfMemoryError:
            raise CacheBudgetExceeded(oom_message(self._client, self.url, what)) from None
        except redis.exceptions.ResponseError as e:
            msg = str(e)
            if msg.startswith("LMSERR "):
                err = _ScriptError(msg)
                if err.kind == "NOSTREAM" and stream_id is not None:
                    raise self._not_found(stream_id) from None
                raise err from None
            if self._closed:
                raise CacheClosed("expected an open frame cache, got one that was closed") from None
            raise CacheUnavailable(f"expected Redis at {self.url} to carry out {what}, got an error reply: {msg}") \
                from None
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as e:
            if self._closed:
                raise CacheClosed("expected an open frame cache, got one that was closed") from None
            raise CacheUnavailable(
                f"expected a reachable Redis at {self.url} for {what}, got {type(e).__name__}: {e}") from None

    def _info_from(self, stream_id: str, res: list) -> StreamInfo:
        h, lo, hi = _pairs(res[0]), res[1], res[2]
        count, nxt = int(h[b"count"]), int(h[b"next_seq"])
        return StreamInfo(
            stream_id=stream_id,
            capacity=int(h[b"capacity"]),
            count=count,
            total_appended=nxt,
            oldest_seq=nxt - count if count else -1,
            newest_seq=nxt - 1 if count else -1,
            oldest_pts=float(lo[1]) if count and lo else None,
            newest_pts=float(hi[1]) if count and hi else None,
            bytes_used=int(h[b"bytes_used"]),
            max_bytes=_opt_int(h.get(b"max_bytes")),
            meta=json.loads(h[b"meta"]),
            on_full=h[b"on_full"].decode(),
            writer=int(h[b"writer"]),
            light_bytes=int(h[b"light_bytes"]),
        )

    # -- FrameCache ------------------------------------------------------------
    def create_stream(
        self, stream_id: str, capacity: int, meta: dict | None = None, exist_ok: bool = True,
        *, on_full: str = "overwrite", match: Iterable[str] | None = None,
    ) -> StreamInfo:
        clean_meta = check_new_stream(stream_id, capacity, meta, on_full)
        self._check_open()
        what = f"creating stream {stream_id!r}"
        # The listing set first: a stream whose meta exists is always listed (`streams`
        # ignores listed ids whose meta is gone).
        with self._redis(what, stream_id):
            self._client.sadd(self._streams_key, stream_id)
        try:
            with self._redis(what, stream_id):
                created, res = self._s_create(keys=self._keys(stream_id), args=[
                    capacity, on_full, "" if self.max_bytes_per_stream is None else self.max_bytes_per_stream,
                    json.dumps(clean_meta, separators=(",", ":")), RECORD_VERSION, int(bool(exist_ok))])
        except _ScriptError as e:
            if e.kind == "EXISTS":
                raise StreamExists(f"expected a new stream id, got existing stream {stream_id!r}") from None
            raise
        info = self._info_from(stream_id, res)
        if not created:
            if info.capacity != capacity:
                raise BadArgument(
                    f"expected capacity {info.capacity} for existing stream {stream_id!r}, got {capacity}")
            if info.on_full != on_full:
                raise BadArgument(
                    f"expected on_full={info.on_full!r} for existing stream {stream_id!r}, got {on_full!r}")
            check_existing_meta(stream_id, info.meta, None if meta is None else clean_meta, match)
        return info

    def acquire_writer(self, stream_id: str) -> int:
        validate_stream_id(stream_id)
        self._check_open()
        with self._redis(f"acquiring the writer of stream {stream_id!r}", stream_id):
            return int(self._s_acquire(keys=self._keys(stream_id)[:1]))

    def append_many(self, stream_id: str, records: Iterable[FrameRecord], *, writer: int | None = None,
                    seq: int | None = None) -> list[int]:
        """Commit ``records`` in order, atomically (one script): readers see all of them or none.

        On any error (fencing, pts order, encoding, capacity, budget, Redis) nothing is stored
        or evicted. See the module docstring for the retry logic.
        """
        recs = list(records)
        for i, r in enumerate(recs):
            if not isinstance(r, FrameRecord):
                raise BadArgument(f"expected records[{i}] to be a FrameRecord, got {type(r).__name__}")
        if writer is not None and (isinstance(writer, bool) or not isinstance(writer, int)):
            raise BadArgument(f"expected writer to be None or a token from acquire_writer, got {writer!r}")
        if seq is not None:
            _check_count("seq", seq)
        validate_stream_id(stream_id)
        self._check_open()
        keys = self._keys(stream_id, total=True)
        what = f"appending {len(recs)} frame(s) to stream {stream_id!r}"
        if not recs:
            with self._redis(what, stream_id):
                if not self._client.exists(keys[0]):
                    raise self._not_found(stream_id)
            return []
        batch = uuid.uuid4().hex
        for _ in range(_MAX_COMMIT_ATTEMPTS):
            with self._redis(what, stream_id):
                f = self._client.hmget(keys[0], "next_seq", "last_pts", "writer", "count", "capacity", "on_full")
            if f[0] is None:
                raise self._not_found(stream_id)
            seq0, cur_writer, count, cap = int(f[0]), int(f[2]), int(f[3]), int(f[4])
            last_pts = float(f[1]) if f[1] else None
            if writer is not None and writer != cur_writer:
                raise self._stale(stream_id, cur_writer, writer)
            done: list[int] = []
            todo = recs
            if seq is not None:
                if seq > seq0:
                    raise BadArgument(f"expected seq <= {seq0} (the next seq of stream {stream_id!r}), got {seq}: "
                                      f"frames {seq0}..{seq - 1} would be missing")
                skip = min(len(recs), seq0 - seq)  # an idempotent retry: these are committed already
                done, todo = list(range(seq, seq + skip)), recs[skip:]
                if not todo:
                    return done
            prev = last_pts
            for i, r in enumerate(todo):
                pts = r.pts
                if not isinstance(pts, float) or not math.isfinite(pts):
                    raise BadArgument(f"expected a finite pts for stream {stream_id!r}, got {pts!r}")
                if prev is not None and pts < prev:
                    where = f" (records[{i}])" if len(todo) > 1 else ""
                    raise BadArgument(
                        f"expected non-decreasing pts >= {prev} for stream {stream_id!r}, got {pts}{where}")
                prev = pts
            if f[5] == b"error" and count + len(todo) > cap:
                raise self._capacity(stream_id, cap, count, len(todo))
            args: list[Any] = ["" if writer is None else writer, seq0, batch, self.pts_history,
                               "" if self.max_bytes_total is None else self.max_bytes_total, len(todo)]
            for i, r in enumerate(todo):
                full = replace(r, seq=seq0 + i)
                args += [repr(r.pts), encode_record(full), light_copy_bytes(full), token_copy_bytes(full)]
            try:
                with self._redis(what, stream_id):
                    res = self._s_append(keys=keys, args=args)
            except _ScriptError as e:
                raise self._append_error(e, stream_id, todo, writer) from None
            status = res[0]
            if status == b"OK":
                return done + list(range(seq0, seq0 + len(todo)))
            if status == b"DONE":  # our own re-sent call (a lost reply): committed once already
                s0, n = int(res[1]), int(res[2])
                return done + list(range(s0, s0 + n))
            # RETRY: another writer committed since we read next_seq; read again and re-encode.
            with self._lock:
                self._append_retries += 1
        raise CacheError(f"expected to commit {len(recs)} frame(s) to stream {stream_id!r} within "
                         f"{_MAX_COMMIT_ATTEMPTS} attempts, got a concurrent commit before each; "
                         "fence writers with acquire_writer")

    @staticmethod
    def _stale(stream_id: str, current: int, got: int) -> StaleWriter:
        return StaleWriter(f"expected writer token {current} for stream {stream_id!r} (the current "
                           f"writer's), got {got}: another writer took the stream over")

    @staticmethod
    def _capacity(stream_id: str, cap: int, count: int, n: int) -> CapacityExceeded:
        return CapacityExceeded(
            f"expected at most {cap} frames in stream {stream_id!r} (its capacity; on_full='error'), "
            f"got {count} stored + {n} new")

    def _append_error(self, e: _ScriptError, stream_id: str, todo: list[FrameRecord],
                      writer: int | None) -> LmsError:
        a = e.args_
        if e.kind == "STALE":
            return self._stale(stream_id, int(a[0]), writer if writer is not None else -1)
        if e.kind == "PTS":
            return BadArgument(f"expected non-decreasing pts >= {float(a[0])} for stream {stream_id!r}, "
                               f"got {todo[0].pts}")
        if e.kind == "CAPACITY":
            return self._capacity(stream_id, int(a[1]), int(a[0]), len(todo))
        if e.kind == "BUDGET":
            return CacheBudgetExceeded(f"expected at most {a[0]} bytes for stream {stream_id!r}, would hold {a[1]}")
        if e.kind == "TOTAL":
            return CacheBudgetExceeded(f"expected at most {a[0]} bytes in the cache in total, would hold {a[1]} "
                                       f"(appending to stream {stream_id!r})")
        return CacheError(f"expected the append script to commit or refuse, got {e}")

    def replace_records(self, stream_id: str, records: Iterable[FrameRecord]) -> list[int]:
        recs = check_replacements(records)
        validate_stream_id(stream_id)
        self._check_open()
        if not recs:
            return []
        args: list[Any] = [len(recs)]
        for r in recs:
            args += [r.seq, repr(r.pts), encode_record(r), light_copy_bytes(r), token_copy_bytes(r)]
        try:
            with self._redis(f"rewriting {len(recs)} frame(s) of stream {stream_id!r}", stream_id):
                res = self._s_replace(keys=self._keys(stream_id, total=True), args=args)
        except _ScriptError as e:
            if e.kind == "PTS":
                raise BadArgument(f"expected pts {e.args_[1]} for frame {e.args_[0]} of stream {stream_id!r} "
                                  "(a rewrite keeps the frame's time), got another") from None
            raise CacheError(f"expected the rewrite script to commit or refuse, got {e}") from None
        return [int(x) for x in res]

    def _select(self, stream_id: str, start: Any, end: Any, max_frames: Any, *, blobs: bool) -> Any:
        start, end = check_window_args(start, end, max_frames)
        validate_stream_id(stream_id)
        self._check_open()
        # a stream never holds more than MAX_CAPACITY frames: clamp what the script sees
        args = ["range", _score(start, "-inf"), _score(end, "+inf"),
                "" if max_frames is None else min(max_frames, MAX_CAPACITY)]
        budget = self.snapshot_script_bytes
        for attempt in range(_MAX_SNAPSHOT_ATTEMPTS + 1):
            if attempt == _MAX_SNAPSHOT_ATTEMPTS:
                budget = 1 << 62  # the stream keeps overwriting what we read: one script, whatever the size
            res = self._window_call(stream_id, args + [budget if blobs else -1])
            f, items, zc, got, status = res
            collapsed, a, b = int(f[3]), (float(f[4]) if f[4] else 0.0), (float(f[5]) if f[5] else 0.0)
            dropped, exact = zc, True
            if collapsed:  # the in-process backend's _EvictionLog.count, on the trimmed part
                if (start is None or start <= a) and (end is None or end >= b):
                    dropped += collapsed
                elif (start is not None and start > b) or (end is not None and end < a):
                    pass
                else:
                    s = a if start is None else max(start, a)
                    e = b if end is None else min(end, b)
                    dropped += round(collapsed * (e - s) / (b - a))
                    exact = False
            out = self._build(stream_id, items, got, status, dropped, exact, blobs)
            if out is not None:
                return out
        raise AssertionError("unreachable")  # pragma: no cover

    def _window_call(self, stream_id: str, args: list) -> list:
        with self._redis(f"reading a window of stream {stream_id!r}", stream_id):
            return self._s_window(keys=self._keys(stream_id), args=args)

    def _build(self, stream_id: str, items: list, got: list, status: bytes, dropped: int, exact: bool,
               blobs: bool) -> FrameWindow | Snapshot | None:
        """The window or snapshot from a window script's answer; None when a chunked read
        found a frame overwritten (the caller reads again)."""
        seqs = [int(m) for m in items[0::2]]
        pts = tuple(float(x) for x in items[1::2])
        if seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
            raise CacheError(f"expected contiguous seqs in stream {stream_id!r}, got {seqs[:3]}...{seqs[-3:]}")
        kw = dict(stream_id=stream_id, pts_list=pts, first_seq=seqs[0] if seqs else -1,
                  last_seq=seqs[-1] if seqs else -1, dropped_before=dropped, dropped_exact=exact)
        if not blobs:
            return FrameWindow(**kw)
        if status == b"BIG":  # read chunk by chunk; each record is checked against its seq
            got = []
            for i in range(0, len(seqs), _SNAPSHOT_CHUNK):
                part = self.read(stream_id, seqs[i:i + _SNAPSHOT_CHUNK])
                if any(x is None for x in part):
                    return None
                got += part
        else:
            for q, x in zip(seqs, got):
                if x is None or record_seq(x) != q:
                    raise CacheError(f"expected the record of seq {q} in its slot of stream {stream_id!r}, "
                                     f"got {'nothing' if x is None else f'seq {record_seq(x)}'}")
        return Snapshot(blobs=tuple(got), **kw)

    def window(
        self,
        stream_id: str,
        start: float | None = None,
        end: float | None = None,
        *,
        max_frames: int | None = None,
    ) -> FrameWindow:
        return self._select(stream_id, start, end, max_frames, blobs=False)

    def snapshot(
        self,
        stream_id: str,
        start: float | None = None,
        end: float | None = None,
        *,
        max_frames: int | None = None,
    ) -> Snapshot:
        return self._select(stream_id, start, end, max_frames, blobs=True)

    def read(self, stream_id: str, seqs: Iterable[int], *, light: bool = False,
             tokens: bool = False) -> list[bytes | None]:
        """Plain HMGETs (no script: a reply of tens of MB through Lua is about 3x slower, and the
        check below makes a script unnecessary): every blob is verified against the seq asked
        for, so an overwritten slot reads as None, never as another frame. The ring's capacity
        (fixed for a stream's life) is cached; a miss re-reads it once in case the stream was
        deleted and made again with another capacity. A token read of a frame stored before
        token copies existed (no ``tokens`` field) reads its light copy, which holds the token too."""
        check_read_part(light, tokens)
        qs = list(seqs)
        for q in qs:
            _check_count("seq", q)
        validate_stream_id(stream_id)
        self._check_open()
        keys = self._keys(stream_id)
        field_key = keys[5] if tokens else keys[2] if light else keys[1]
        with self._redis(f"reading {len(qs)} frame(s) of stream {stream_id!r}", stream_id):
            for attempt in range(2):
                cap = self._ring_capacity(stream_id, keys[0], fresh=attempt > 0)
                got = self._client.hmget(field_key, [str(q % cap) for q in qs]) if qs else []
                ok = [b is not None and b != LIGHT_SAME_AS_FULL and record_seq(b) == q for q, b in zip(qs, got)]
                if tokens and not all(ok):                 # written before token copies (none, or another
                    old = [i for i, o in enumerate(ok) if not o]      # frame's left in the slot): the light copy
                    for i, b in zip(old, self._client.hmget(keys[2], [str(qs[i] % cap) for i in old])):
                        got[i] = b
                same = [i for i, b in enumerate(got) if (light or tokens) and b == LIGHT_SAME_AS_FULL]
                if same:                                   # token-only frames: the light copy is the record
                    for i, b in zip(same, self._client.hmget(keys[1], [str(qs[i] % cap) for i in same])):
                        got[i] = b
                out = [b if o or (b is not None and record_seq(b) == q) else None
                       for q, b, o in zip(qs, got, ok)]
                if all(b is not None for b in out):
                    return out
            return out

    def _ring_capacity(self, stream_id: str, meta_key: str, *, fresh: bool) -> int:
        cap = None if fresh else self._caps.get(stream_id)
        if cap is None:
            raw = self._client.hget(meta_key, "capacity")
            if raw is None:
                self._caps.pop(stream_id, None)
                raise self._not_found(stream_id)
            cap = self._caps[stream_id] = int(raw)
        return cap

    def latest(self, stream_id: str, n: int) -> Snapshot:
        _check_count("n", n)
        validate_stream_id(stream_id)
        self._check_open()
        for attempt in range(_MAX_SNAPSHOT_ATTEMPTS + 1):
            budget = self.snapshot_script_bytes if attempt < _MAX_SNAPSHOT_ATTEMPTS else 1 << 62
            f, items, _, got, status = self._window_call(
                stream_id, ["latest", "-inf", "+inf", min(n, MAX_CAPACITY), budget])
            nxt, count = int(f[0]), int(f[1])
            k = len(items) // 2
            out = self._build(stream_id, items, got, status, min(n - k, nxt - count), True, True)
            if out is not None:
                return out
        raise AssertionError("unreachable")  # pragma: no cover

    def stream_info(self, stream_id: str) -> StreamInfo:
        validate_stream_id(stream_id)
        self._check_open()
        with self._redis(f"reading the info of stream {stream_id!r}", stream_id):
            res = self._s_info(keys=self._keys(stream_id))
        return self._info_from(stream_id, res)

    def ping(self, what: str = "a ping") -> None:
        """`CacheUnavailable` (saying it was for `what`) unless Redis answers now."""
        self._check_open()
        with self._redis(what):
            self._client.ping()

    def streams(self) -> list[str]:
        self._check_open()
        with self._redis("listing streams"):
            ids = sorted(x.decode() for x in self._client.smembers(self._streams_key))
            if not ids:
                return []
            pipe = self._client.pipeline(transaction=False)
            for sid in ids:
                pipe.exists(stream_key(sid, "meta", prefix=self.prefix))
            alive = pipe.execute()
        # an id whose meta is gone: a deletion or a creation cut short; not a stream
        return [sid for sid, a in zip(ids, alive) if a]

    def delete_stream(self, stream_id: str) -> None:
        self._caps.pop(stream_id, None)
        validate_stream_id(stream_id)
        self._check_open()
        with self._redis(f"deleting stream {stream_id!r}", stream_id):
            self._s_delete(keys=self._keys(stream_id, total=True))
            self._client.srem(self._streams_key, stream_id)

    def server_memory(self, nodes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The server's ``used_memory``, ``maxmemory`` (0: none) and policy, summed over the masters of a
        Cluster (a master without a cap makes the sum's ``maxmemory`` 0: no cap in force for all of them),
        and ``nodes``. One ``INFO memory`` per master (`memory_nodes`), unless `nodes` gives what it said."""
        if nodes is None:
            with self._redis("reading INFO memory"):
                nodes = memory_nodes(self._client)
        caps = [int(n.get("maxmemory", 0)) for n in nodes]
        return {
            "url": self.url,
            "cluster": self.cluster,
            "nodes": len(nodes),
            "used_memory": sum(int(n.get("used_memory", 0)) for n in nodes),
            "maxmemory": sum(caps) if all(caps) else 0,
            "maxmemory_policy": ",".join(sorted({str(n.get("maxmemory_policy", "?")) for n in nodes})),
        }

    def refuse_if_full(self, what: str) -> None:
        """`CacheBudgetExceeded` (as a refused write says it) when Redis is at its ``maxmemory`` now: for work
        that would take long before its first write (an upload is read whole before its job's record is made)."""
        with self._redis("reading INFO memory"):
            nodes = memory_nodes(self._client)
        m = self.server_memory(nodes)
        if m["maxmemory"] and m["used_memory"] >= m["maxmemory"]:
            raise CacheBudgetExceeded(oom_message(self._client, self.url, what, nodes))   # the same figures

    def stats(self) -> dict[str, Any]:
        """Per stream: ``frames``, ``capacity``, ``bytes`` (retained records), ``light_bytes``,
        ``on_full``, ``max_bytes``, ``total_appended``, ``evicted``, ``index_bytes`` (Redis's
        ``MEMORY USAGE`` of the evicted-pts zset), ``index_frames`` (its entries) and
        ``redis_bytes`` (``MEMORY USAGE`` of the stream's keys; sampled, approximate).
        Totals, budgets, ``append_retries`` (this client's appends that found another commit
        between reading ``next_seq`` and committing, and were re-encoded), and ``redis``: the
        server's ``used_memory``/``maxmemory``/policy (summed over the masters of a Cluster)."""
        per: dict[str, dict[str, Any]] = {}
        for sid in self.streams():
            try:
                with self._redis(f"reading the stats of stream {sid!r}", sid):
                    res, mem, index_frames = self._s_stats(keys=self._keys(sid))
            except StreamNotFound:  # deleted meanwhile
                continue
            info = self._info_from(sid, res)
            per[sid] = {
                "frames": info.count,
                "capacity": info.capacity,
                "bytes": info.bytes_used,
                "light_bytes": info.light_bytes,
                "on_full": info.on_full,
                "max_bytes": info.max_bytes,
                "total_appended": info.total_appended,
                "evicted": info.evicted,
                "index_bytes": int(mem[4]),
                "index_frames": int(index_frames),
                "redis_bytes": sum(int(m) for m in mem),
            }
        server = self.server_memory()
        return {
            "backend": self.backend,
            "streams": per,
            "num_streams": len(per),
            "total_frames": sum(v["frames"] for v in per.values()),
            "total_bytes": sum(v["bytes"] for v in per.values()),
            "total_light_bytes": sum(v["light_bytes"] for v in per.values()),
            "max_bytes_total": self.max_bytes_total,
            "max_bytes_per_stream": self.max_bytes_per_stream,
            "prefix": self.prefix,
            "append_retries": self._append_retries,
            "redis": server,
        }

    def close(self) -> None:
        """Mark the cache closed (later calls raise `CacheClosed`) and, when it owns its client
        (made by `from_url`), close the client's connections. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._owns_client:
            try:
                self._client.close()
            except (redis.exceptions.RedisError, OSError):
                pass
