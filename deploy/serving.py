"""The service's work, free of HTTP and Ray: each class is usable (and tested) on its own.

* `JobStore`     - file jobs' status in Redis (``lms:{<id>}:job``, beside the stream's frames).
* `EncoderCore`  - frames of any number of streams -> one batched `encode_frames_multi` -> each
                   stream's records appended to the ring (writer token + seq: idempotent).
* `AnswerCore`   - a question over a window of a stream: `CachedFrames` (chunked reads) ->
                   `LlavaMini.stream_answer`; events ``{"type": "token"}`` ... ``{"type": "answer"}``.
* `run_file_job` - the Source's loop for a file: decode, sample, shrink each frame to the tower's
                   size, hand batches to an encode function, keep the job's status current.
* `answer_events_in_thread` - runs a blocking answer generator on a thread and hands its events to
                   asyncio, stopping it between tokens when the consumer goes away.

The Ray Serve wiring (`deploy/app.py`) and the routes (`deploy/routes.py`) only call these.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from lmcore import cancel
from lmcore.errors import (
    BadArgument,
    CacheBudgetExceeded,
    CacheUnavailable,
    Interrupted,
    InvalidRequest,
    JobRunning,
    LmsError,
    NoFrames,
    NotFound,
    NotReady,
    PayloadTooLarge,
)

from .settings import Settings

log = logging.getLogger("lmstream.serve")

JOB_STATES = ("queued", "ingesting", "ready", "failed")


def error_dict(e: BaseException) -> dict:
    if isinstance(e, LmsError):
        return {"code": e.code, "message": e.message}
    return {"code": "E_INTERNAL", "message": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


# ------------------------------------------------------------------------------------------ jobs
class JobStore:
    """File jobs in Redis: a hash per job (status, frames, duration_s, progress, gaps, error, ...)
    and the set ``lms:jobs``. Survives a restart of the service with the frames themselves."""

    def __init__(self, redis_url: str, *, timeout: float = 5.0):
        from lmcore.urls import redact_redis_url
        self.url = redact_redis_url(redis_url)          # for messages: clients read them (no password)
        self.r = redis_client(redis_url, timeout)

    def _call(self, what: str, fn):
        import redis
        try:
            return fn()
        except redis.exceptions.OutOfMemoryError:           # over maxmemory: not an outage (503), a full cache
            from frame_cache.redis_cache import oom_message
            raise CacheBudgetExceeded(oom_message(self.r, self.url, what)) from None
        except redis.RedisError as e:
            raise CacheUnavailable(f"expected a reachable Redis at {self.url} for {what}, got "
                                   f"{type(e).__name__}: {e}") from None

    #: the record's key part (``lms:{<id>}:<PART>``), the set listing the ids, what a record is called,
    #: what its ids name in errors, and the fields a new record starts with.
    PART, SET, NOUN, ID_OF = "job", "lms:jobs", "job", "video"
    DEFAULTS = {"status": "queued", "frames": 0, "progress": 0.0, "gaps": [], "error": None}
    #: the statuses that hold a slot of the limits (`active_ids`)
    ACTIVE = ("queued", "ingesting")

    def _key(self, rid: str) -> str:
        from frame_cache import stream_key
        return stream_key(rid, self.PART)

    #: a new record replaces whatever the key held, in one step (no field of an older record survives)
    #: A script with a shebang is refused whole over maxmemory; without one, Redis refused only its first write
    #: that needs room, and DEL needs none: the HSET went in, the SADD after it was refused, and every 507'd
    #: create left a record in no list
    _CREATE = "#!lua\nredis.call('DEL', KEYS[1]) redis.call('HSET', KEYS[1], unpack(ARGV)) return 1"
    #: fields change only on a record that exists: a write racing a delete must not bring back a hash of
    #: the fields it wrote (a purged stream answering 200 with no kind or status)
    _UPDATE = ("if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], unpack(ARGV)) "
               "return 1 end return 0")
    #: an update runs when Redis is over its maxmemory too (``allow-oom``: a few hundred bytes past it): a job
    #: that fails because the cache is full must say so, not stay `ingesting` with its status write refused
    _UPDATE = "#!lua flags=allow-oom\n" + _UPDATE

    def _hset_script(self, script: str, rid: str, fields: dict) -> int:
        args = [x for kv in _enc(fields).items() for x in kv]
        return int(self.r.eval(script, 1, self._key(rid), *args)) if args else 0

    def create(self, rid: str, fields: dict) -> None:
        d = {**self.DEFAULTS, "created": time.time(), **fields}
        self._call(f"creating a {self.NOUN}", lambda: (self._hset_script(self._CREATE, rid, d),
                                                       self.r.sadd(self.SET, rid)))

    def update(self, rid: str, **fields) -> bool:
        """Change fields of an existing record; False (nothing written) when it is gone (deleted)."""
        return bool(self._call(f"updating a {self.NOUN}", lambda: self._hset_script(self._UPDATE, rid, fields)))

    def get(self, rid: str) -> dict:
        raw = self._call(f"reading a {self.NOUN}", lambda: self.r.hgetall(self._key(rid)))
        if not raw:
            raise NotFound(f"expected a known {self.ID_OF} id, got {rid!r}")
        d = {k.decode(): json.loads(v) for k, v in raw.items()}
        d["id"] = rid
        return d

    def ids(self) -> list[str]:
        return sorted(x.decode() for x in self._call(f"listing {self.NOUN}s", lambda: self.r.smembers(self.SET)))

    def delete(self, rid: str) -> None:
        self._call(f"deleting a {self.NOUN}", lambda: (self.r.delete(self._key(rid)), self.r.srem(self.SET, rid)))

    def active_ids(self) -> list[str]:
        """Records whose status is one of `ACTIVE` now (jobs queued or ingesting, streams fed)."""
        out = []
        for rid in self.ids():
            try:
                if self.get(rid)["status"] in self.ACTIVE:
                    out.append(rid)
            except NotFound:
                pass
        return out

    def active(self) -> int:
        """Jobs queued or ingesting now."""
        return len(self.active_ids())

    def fail_interrupted(self, cache=None) -> list[str]:
        """Jobs left queued/ingesting by a service that stopped: failed, their frames kept. With `cache`, the
        frames counted are those the job's ring holds (`stored_frames`)."""
        out = []
        for jid in self.ids():
            try:
                d = self.get(jid)
            except NotFound:
                continue
            if d["status"] in ("queued", "ingesting"):
                frames = stored_frames(cache, jid, int(d.get("frames") or 0))
                self.update(jid, status="failed", frames=frames, error={"code": Interrupted.code, "message":
                            f"expected the job to finish, got the service stopped at {d.get('progress', 0):.0%}; "
                            f"{frames_kept(frames)}"})
                out.append(jid)
        return out

    @staticmethod
    def remove_uploads(upload_dir, job_ids) -> int:
        """The uploads of these jobs still in `upload_dir` (``<job id><ext>``, ext from the client's filename):
        removed, for jobs that will never run (a stopped service's, a deleted one's). Returns how many."""
        from pathlib import Path
        n = 0
        for jid in job_ids:
            for f in Path(upload_dir).glob(f"{jid}*"):
                if f.name == jid or f.name.startswith(jid + "."):
                    try:
                        f.unlink()
                        n += 1
                    except OSError:
                        pass
        return n

    def ping(self) -> bool:
        """Redis answers; on a Redis Cluster, every master does (a dead master takes its streams)."""
        try:
            import redis
            if isinstance(self.r, redis.cluster.RedisCluster):
                return bool(self.r.ping(target_nodes=redis.cluster.RedisCluster.PRIMARIES))
            return bool(self.r.ping())
        except Exception:
            return False


def remove_stream(cache, sid: str, redis_url: str | None = None) -> str:
    """`lmstream cache rm ID`: the stream's frames and, when the cache is the service's Redis
    (`redis_url`), what the service keeps of that id beside them: a file job's record, a live stream's
    record, its watches and events. So afterwards the service says 404 for the id (`GET /v1/videos/ID`,
    `GET /v1/streams/ID`), as after `DELETE /v1/videos/ID` or `DELETE /v1/streams/ID?purge=true`, not a
    `ready` video whose questions find no frames. An id whose frames are gone but whose records stay
    (removed by an older `cache rm`) loses its records. Refused, nothing removed, while a file job is
    queued or ingesting or a source feeds the stream (409 `E_JOB_RUNNING`): this command cannot stop a
    decoder; `DELETE /v1/videos/ID` cancels a running job, `DELETE /v1/streams/ID` stops a stream.
    Raises `StreamNotFound` when neither frames nor records exist. Returns what was removed, in words."""
    from frame_cache import StreamNotFound, validate_stream_id
    validate_stream_id(sid)
    stores: list[JobStore] = []
    held: dict[str, dict] = {}
    if redis_url and redis_url.split("://", 1)[0] in ("redis", "rediss", "unix"):
        stores = [JobStore(redis_url), LiveStore(redis_url), WatchStore(redis_url)]
        for st in stores[:2]:
            try:
                held[st.PART] = st.get(sid)
            except NotFound:
                pass
    job, feed = held.get(JobStore.PART), held.get(LiveStore.PART)
    if job is not None and job["status"] in JobStore.ACTIVE:
        raise JobRunning(f"expected a finished job to remove, got video {sid!r} still {job['status']}; cancel it "
                         f"with DELETE /v1/videos/{sid}, or wait for it to finish (a service that stopped marks it "
                         "failed when it starts again)")
    if feed is not None and feed["status"] in LiveStore.ACTIVE:
        raise JobRunning(f"expected a stopped stream to remove, got stream {sid!r} {feed['status']} (fed by its "
                         f"{'camera' if feed.get('kind') == 'rtsp' else 'socket'}); stop it first: "
                         f"DELETE /v1/streams/{sid}")
    said = []
    try:
        n = cache.stream_info(sid).count
        cache.delete_stream(sid)
        said.append(f"{n} frames")
    except StreamNotFound:
        if not held:
            raise
    if stores:
        stores[0].delete(sid)
        stores[1].delete(sid)
        stores[2].forget(sid)
    said += [f"the service's record of {'video' if part == JobStore.PART else 'live stream'} {sid}"
             for part in held]
    return f"removed stream {sid}: " + " and ".join(said)


def redis_client(url: str, timeout: float = 5.0):
    """A redis-py client for `url`, as the frame cache makes it: a `RedisCluster` for a Redis Cluster
    (``?cluster=1``, or a node that says it runs in cluster mode), else a plain `Redis`."""
    from frame_cache.redis_cache import client_from_url
    return client_from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)[0]


def _enc(d: dict) -> dict:
    return {k: json.dumps(v) for k, v in d.items()}


class ReplicaStats:
    """What the model replicas count, kept in Redis so that `/metrics` shows the whole deployment, not the
    one replica a handle call happens to reach (with two Encoder replicas, each scrape had read one of them
    at random: a "total" that went up and down).

    * counters (frames encoded, batched passes, the local tier's hits and misses...): each replica sends its
      running totals; one Lua step adds what grew since the totals Redis last took from that replica
      (``lms:{stats}:sent``) to one hash, ``lms:{stats}:totals``, so they only grow, across replica restarts
      and whichever Ingress reads them. A report Redis did not take goes with the next one, and a report
      taken whose reply was lost adds nothing when sent again (it was counted twice);
    * gauges (the local tier's bytes, frames, streams and capacity): each replica's latest values in
      ``lms:{stats}:replicas`` (one field per replica, with the time it wrote them); a reader sums those
      written in the last `TTL_S` seconds and removes older ones (a replica that died).

    Reports never raise: metrics must not fail an encode, an answer or Serve's health check. Both keys share
    one hash tag, so a Redis Cluster keeps them on one node."""

    TOTALS, REPLICAS, SENT = "lms:{stats}:totals", "lms:{stats}:replicas", "lms:{stats}:sent"
    TTL_S = 60.0
    #: a replica's last taken totals are forgotten after this long unheard (they only guard against resends)
    SENT_TTL_S = 7 * 86400.0
    #: KEYS: totals, sent. ARGV: replica id, its running totals (JSON), now. Adds the growth past the largest
    #: totals taken from this replica, and keeps those largest: a resend of a report already taken adds nothing,
    #: and an older report that arrives after a newer one (two threads report) takes nothing away.
    #: The totals kept are strings: cjson writes numbers with 14 significant digits (10**14 + 7 came back as
    #: 10**14 + 10, and a resend then added nothing, or the rounding again).
    _ADD = ("local old = redis.call('HGET', KEYS[2], ARGV[1]) "
            "local prev = {} if old then prev = cjson.decode(old)['c'] end "
            "local cur = cjson.decode(ARGV[2]) "
            "for k, v in pairs(cur) do local p = tonumber(prev[k] or 0) "
            "if v > p then redis.call('HINCRBY', KEYS[1], k, string.format('%d', v - p)) "
            "prev[k] = string.format('%d', v) end end "
            "redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({c = prev, t = tonumber(ARGV[3])})) return 1")
    #: both run when Redis is over its maxmemory too (``allow-oom``; a few fields a replica, overwritten): the
    #: metrics an operator reads to see the cache full kept the figures of before it filled
    _ADD = "#!lua flags=allow-oom\n" + _ADD
    _SET_GAUGES = "#!lua flags=allow-oom\nredis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) return 1"
    #: how long a report may wait on Redis (a health check calls it: Serve's timeout there is 30 s)
    TIMEOUT_S = 2.0

    def __init__(self, redis_url: str, role: str):
        import uuid
        self.url, self.role = redis_url, role
        self.replica = f"{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._r = None
        self._lock = threading.Lock()
        self._warned = 0.0

    def _client(self):
        if self._r is None:
            self._r = redis_client(self.url, self.TIMEOUT_S)
        return self._r

    def report(self, counters: dict[str, int], gauges: dict[str, float] | None = None) -> bool:
        """Adds what `counters` (running totals of this replica) grew by since the last report Redis took,
        and stores `gauges`. False (logged at most once a minute) when Redis did not take it."""
        with self._lock:
            try:
                r = self._client()
                p = r.pipeline(transaction=False)
                p.eval(self._ADD, 2, self.TOTALS, self.SENT, self.replica,
                       json.dumps({k: int(v) for k, v in counters.items()}), time.time())
                if gauges is not None:
                    p.eval(self._SET_GAUGES, 1, self.REPLICAS, self.replica,
                           json.dumps({"role": self.role, "t": time.time(), "gauges": gauges}))
                p.execute()
            except Exception as e:                          # noqa: BLE001 - Redis down or slow: next time
                if time.monotonic() - self._warned > 60:
                    self._warned = time.monotonic()
                    log.warning("%s: metrics not reported to Redis (%s: %s); kept for the next report",
                                self.replica, type(e).__name__, e)
                return False
            return True

    @classmethod
    def read(cls, r, now: float | None = None, within_s: float | None = None, since: float | None = None
             ) -> tuple[dict[str, int], dict[str, dict[str, float]]]:
        """(totals, {role: summed gauges, with "replicas": how many reported}) from Redis client `r`;
        replicas silent for `TTL_S` are left out and removed (those silent for `within_s`, or whose last
        report is before the Unix time `since`, when given, only left out)."""
        import redis
        now = time.time() if now is None else now
        try:
            totals = {k.decode(): int(v) for k, v in r.hgetall(cls.TOTALS).items()}
            replicas = r.hgetall(cls.REPLICAS)
        except redis.RedisError as e:
            raise CacheUnavailable(f"expected a reachable Redis for the replicas' metrics, got "
                                   f"{type(e).__name__}: {e}") from None
        roles: dict[str, dict[str, float]] = {}
        stale = []
        for rid, raw in replicas.items():
            try:
                d = json.loads(raw)
                age = now - float(d["t"])
            except (ValueError, KeyError, TypeError):
                age = math.inf
            if age > cls.TTL_S:
                stale.append(rid)
            if age > (cls.TTL_S if within_s is None else min(within_s, cls.TTL_S)):
                continue
            if since is not None and float(d["t"]) < since:
                continue
            agg = roles.setdefault(str(d.get("role")), {"replicas": 0})
            agg["replicas"] += 1
            for k, v in (d.get("gauges") or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    agg[k] = agg.get(k, 0) + v
        try:
            if stale:
                r.hdel(cls.REPLICAS, *stale)
            old = []
            for rid, raw in r.hgetall(cls.SENT).items():        # one small entry per replica ever started
                try:
                    if now - float(json.loads(raw)["t"]) > cls.SENT_TTL_S:
                        old.append(rid)
                except (ValueError, KeyError, TypeError):
                    old.append(rid)
            if old:
                r.hdel(cls.SENT, *old)
        except redis.RedisError:
            pass                                                # removed by the next read
        return totals, roles


# ------------------------------------------------------------------------------------------ model
def load_model(settings: Settings):
    import torch
    from model import LlavaMini
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    m = LlavaMini.from_pretrained(settings.model, vision_tower=settings.vision_tower, dtype=settings.dtype,
                                  device=device, batch_size=settings.encode_batch)
    torch.set_grad_enabled(False)
    return m


@dataclass
class EncodeItem:
    """Frames of one stream for the Encoder.

    frames: (n, S, S, 3) uint8 RGB, already at the tower's size (or any size: resized here).
    pts: n presentation times (s). writer: the stream's writer token. seq: the seq of frames[0]
    (so a retried request stores nothing twice)."""

    stream_id: str
    frames: np.ndarray
    pts: list[float]
    writer: int | None = None
    seq: int | None = None
    kv_policy: str = "exact"


class EncoderCore:
    """One model replica's ingest side."""

    MAX_RUNNERS = 1024          # retention runners kept (one per recently ingested stream)

    def __init__(self, settings: Settings, model=None, cache=None):
        from frame_cache import open_cache
        self.settings = settings
        self.model = model or load_model(settings)
        self.cache = cache or open_cache(settings.redis_url)
        self.watches = WatchStore(settings.redis_url)
        self.frames_encoded = 0
        self.batches = 0
        self.stats = ReplicaStats(settings.redis_url, "encoder")
        # retention runners of the streams this replica ingested lately, least recently used first; a
        # dropped one is made again (a fresh runner skips what was demoted already), so a replica that
        # sees many short-lived streams (file jobs) does not keep one per stream forever
        self._runners: "collections.OrderedDict[str, Any]" = collections.OrderedDict()

    def info(self) -> dict:
        m = self.model
        return {"model": m.name, "size": int(m.preprocess["size"]), "dtype": str(m.dtype), "device": str(m.device)}

    def encode(self, items: list[EncodeItem]) -> list[dict]:
        """Encode the frames of every item in shared batches; append each stream's records.
        Returns per item {"seqs": [...]} or {"error": {...}}: one stream's failure is its own."""
        import torch
        from stream.ingest import append_retrying, states_to_records
        from stream.preprocess import preprocess_video_frames
        prep = self.model.preprocess
        out: list[dict] = [{} for _ in items]
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.kv_policy, []).append(i)
        for kv, idx in groups.items():
            try:
                px = [preprocess_video_frames(items[i].frames, **prep) for i in idx]
                states = self.model.encode_frames_multi(px, [items[i].pts for i in idx], kv_policy=kv)
            except Exception as e:                              # a bad frame batch fails its items only
                for i in idx:
                    out[i] = {"error": error_dict(e)}
                continue
            self.batches += 1
            for i, st in zip(idx, states):
                it = items[i]
                try:
                    recs = states_to_records(st)
                    for wid, w in self.watches.active(it.stream_id).items():    # standing questions, fused now
                        rows = self.model.watch_rows(w["question"], st)          # (n, S, H)
                        for r, row in zip(recs, rows):
                            r.tensors[f"w:{wid}"] = row.cpu()
                    seqs = append_retrying(self.cache, it.stream_id, recs, writer=it.writer, seq=it.seq)
                except Exception as e:
                    out[i] = {"error": error_dict(e)}
                    continue
                out[i] = {"seqs": seqs}
                self.frames_encoded += len(seqs)
                try:                        # stored: an error here must not say they were not (a socket counted
                    self._apply_retention(it.stream_id)      # them lost); the next batch demotes what this did not
                except Exception as e:                       # noqa: BLE001
                    log.warning("stream %s: retention not applied after a batch (%s: %s); the next batch "
                                "applies it", it.stream_id, type(e).__name__, e)
            del px, states
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        self.report_stats()
        return out

    def report_stats(self) -> bool:
        """This replica's frames encoded and batched passes, added to the deployment's totals in Redis."""
        return self.stats.report({"encoder_frames": self.frames_encoded, "encoder_batches": self.batches}, {})


    def _apply_retention(self, sid: str) -> None:
        """Demote the frames of `sid` that left its hot window (its `retain`, docs/design.md section 9).
        A failure here is logged, not the frames' failure: they are stored, only not demoted yet."""
        from frame_cache.retention import RetentionRunner, retention_of
        try:
            if sid not in self._runners:
                ret = retention_of(self.cache.stream_info(sid).meta)
                self._runners[sid] = None if ret is None or ret.keeps_everything else \
                    RetentionRunner(self.cache, sid, ret)
                while len(self._runners) > self.MAX_RUNNERS:
                    self._runners.popitem(last=False)
            self._runners.move_to_end(sid)
            if self._runners[sid] is not None:
                self._runners[sid].apply()
        except Exception as e:                                  # noqa: BLE001 - retried after the next batch
            self._runners.pop(sid, None)
            log.warning("retention of stream %s: %s", sid, e)


def readable_no_frames(e: NoFrames, start: float | None, end: float | None) -> NoFrames:
    """`CachedFrames`' "no frame in the whole stream" error with what a client of a live stream needs to know:
    a frame counts once it is stored. Other NoFrames errors unchanged."""
    if start is None and end is None and e.message.endswith("in the whole stream, got none"):
        return NoFrames(e.message + " yet (a frame counts once it is stored: on /v1/live, once an `ingested` "
                                    "message acknowledges it)")
    return e


class AnswerCore:
    """One model replica's question side."""

    def __init__(self, settings: Settings, model=None, cache=None):
        from frame_cache import open_cache
        from frame_cache.local_tier import LocalKVTier, LocalTierCache
        self.settings = settings
        self.model = model or load_model(settings)
        self.cache = cache or open_cache(settings.redis_url)
        self.tier = None
        self.reader = self.cache               # what questions read keys/values through
        if settings.local_kv_bytes > 0:
            folder = settings.local_kv_dir or os.path.join(settings.data_dir, "kv-tier")
            self.tier = LocalKVTier(folder, max_bytes=settings.local_kv_bytes)
            self.reader = LocalTierCache(self.cache, self.tier)
        self.stats = ReplicaStats(settings.redis_url, "answerer")
        from model.llava_mini import ContextCache
        # the LLM's keys/values of [prefix rows, frame tokens] of recent windows: a second question over the same
        # frames (a video's, a stream's past window) runs only its own rows through the LLM
        self.contexts = ContextCache(settings.answer_context_bytes)

    #: the local tier's counts that only grow (sent as deployment totals) and its levels (summed over replicas)
    TIER_COUNTERS = ("hits", "misses", "evicted_streams", "trimmed_frames", "bytes_local", "bytes_remote")
    TIER_GAUGES = ("bytes", "max_bytes", "frames", "streams")

    def report_stats(self) -> bool:
        """The local tier's counts added to the deployment's totals in Redis, its levels stored as this
        replica's (Serve's health check calls this every 10 s, and each answer when it ends)."""
        st = self.tier.stats() if self.tier is not None else {}
        cx = self.contexts.stats()
        return self.stats.report({**{f"local_kv_{k}": st[k] for k in self.TIER_COUNTERS if k in st},
                                  "answer_context_hits": cx["hits"], "answer_context_misses": cx["misses"]},
                                 {**{f"local_kv_{k}": st[k] for k in self.TIER_GAUGES if k in st},
                                  "answer_context_bytes": cx["bytes"]})

    def forget_stream(self, stream_id: str) -> None:
        """This replica no longer holds the stream's lease (Serve unloaded it): drop its local keys/values."""
        if self.tier is not None:
            self.tier.forget(stream_id)
        self.contexts.discard_stream(stream_id)

    def bounds(self, stream_id: str, window=None, last_s: float | None = None,
               until: float | None = None) -> tuple[float | None, float | None]:
        """(start, end) in stream seconds of a question's window: `window` [s, e), or the newest
        `last_s` seconds (newest - last_s, newest], or everything (None, None). `until`: frames after it
        are left out (a job still ingesting: what it had stored when the question came, which its answer's
        gaps say the rest of)."""
        cap = None if until is None else float(until) + 1e-6          # half-open: the frame at `until` is in
        if window is not None:
            start, end = float(window[0]), float(window[1])
            return start, end if cap is None else min(end, cap)
        if last_s is None:
            return None, cap
        info = self.cache.stream_info(stream_id)
        if info.count == 0:
            raise NoFrames(f"expected stored frames of stream {stream_id!r} in its newest {float(last_s):g} s, "
                           "got none: it has no frame yet")
        newest = info.newest_pts if until is None else min(info.newest_pts, float(until))
        return newest - float(last_s) + 1e-6, cap     # 30 frames at 1 fps for last_s 30

    def window(self, stream_id: str, window=None, last_s: float | None = None, until: float | None = None):
        from stream.window import CachedFrames
        start, end = self.bounds(stream_id, window, last_s, until)
        try:
            return CachedFrames(self.reader, stream_id, start, end, dtype=self.model.dtype)
        except NoFrames as e:
            raise readable_no_frames(e, start, end) from None

    def watch_source(self, stream_id: str, wid: str, question: str, window=None, last_s=None):
        """A watch's window as `PrefusedRows`: light records only (tokens, fused prefix rows and the
        watch's rows stored at ingest), summed chunk by chunk; no keys/values are read."""
        import torch
        from frame_cache import decode_record
        from stream.window import closed_end, stored_span_words, window_words
        start, end = self.bounds(stream_id, window, last_s)
        win = self.cache.window(stream_id, start, closed_end(start, end))     # half-open, as `CachedFrames`
        name = f"w:{wid}"
        rows = prefix = None
        n, toks, pts, meta, light = 0, [], [], None, 0
        for ch in win.chunks(self.cache, 256, light=True):
            for p, b in zip(ch.pts, ch.blobs):
                if end is not None and p >= end:
                    continue
                light += len(b)
                r = decode_record(b)
                meta = meta or r.meta
                toks.append(r.tensors["token"])
                pts.append(p)
                if name in r.tensors:
                    x, y = r.tensors[name].float(), r.tensors["prefix_out"].float()
                    rows = x.clone() if rows is None else rows.add_(x)
                    prefix = y.clone() if prefix is None else prefix.add_(y)
                    n += 1
        if not toks:
            raise NoFrames(f"expected stored frames of stream {stream_id!r} in {window_words(start, end)}, got none"
                           + stored_span_words(self.cache, stream_id, start, end))
        if n == 0:
            raise NoFrames(f"expected frames fused with watch {wid!r} in {window_words(start, end)}, got none "
                           f"(frames stored before the watch was made are not fused with it; {len(toks)} were)")
        src = self.model.prefused(question, rows_sum=rows, prefix_sum=prefix, n_fused=n, tokens=torch.stack(toks),
                                  n_vision_rows=int(meta["n_vision_rows"]), prefix_ids=meta["prefix_ids"],
                                  pts=torch.tensor(pts, dtype=torch.float64), kv_policy=str(meta["kv_policy"]),
                                  dropped_before=win.dropped_before)
        src.light_bytes_read = light            # the answer's read_light_MB: a watch reads light records
        return src

    def answer(self, stream_id: str, question: str, *, window=None, last_s=None, policy: str = "exact",
               max_tokens: int = 64, gaps=(), sampling: dict | None = None, watch: str | None = None,
               choices: list[str] | None = None, stop: list[str] | None = None,
               until: float | None = None) -> Iterator[dict]:
        """Events: {"type": "token", "text", "token_id"} ... {"type": "answer", **answer fields}.
        `gaps`: the stream's recorded ones (outages, frames shed or lost, decode damage); `stop`: strings
        that end generation where one is first complete (the chat route's `stop`); `until`: the newest frame
        time to read (`bounds`)."""
        t0 = time.perf_counter()
        if watch is not None:
            src = self.watch_source(stream_id, watch, question, window, last_s)
            src.time_span, src.bytes_read = (float(src.pts[0]), float(src.pts[-1])), 0
        else:
            src = self.window(stream_id, window, last_s, until)
        window_s = time.perf_counter() - t0         # every frame's token record read: its own line of the timings
        # the stream's gaps in the window asked about, not only between its first and last stored frame: a
        # truncated file's missing tail, or an outage going on after the newest frame, is a gap of the answer
        if window is not None:
            lo, hi = float(window[0]), float(window[1])
        elif last_s is not None:
            lo, hi = src.time_span[1] - float(last_s), math.inf
        else:
            lo, hi = -math.inf, math.inf
        inside = [list(g) for g in gaps if (g[1] is None or g[1] > lo) and (g[0] is None or g[0] < hi)]
        first = None
        # the LLM's head is kept for frames that will be asked about again: a video's (the ring of a file job,
        # once it has stopped growing) or a past window of a stream; not a window that ends at a live stream's
        # newest frame, which the next frame makes other frames (a copy per question, never reused)
        key = None
        if getattr(src, "fingerprint", None) is not None and until is None:      # a watch's rows: nothing to keep
            from frame_cache import StreamNotFound
            try:
                si = self.cache.stream_info(stream_id)
            except StreamNotFound:                  # deleted since its window was read: answer, keep nothing
                si = None
            if si is not None and (si.on_full == "error" or src.time_span[1] < si.newest_pts):
                key = (stream_id, src.fingerprint)
        for kind, *rest in self.model.stream_answer(src, question, max_new_tokens=max_tokens, policy=policy,
                                                    extra_gaps=inside, choices=choices, stop=stop or (),
                                                    contexts=self.contexts, context_key=key,
                                                    **(sampling or {})):
            if kind == "token":
                if first is None:
                    first = time.perf_counter() - t0
                yield {"type": "token", "text": rest[1], "token_id": rest[0]}
            else:
                a = rest[0]
                d = answer_fields(a)
                d["gaps"] = clip_gaps(merge_gaps(finite_gaps(d["gaps"], window, last_s, d["time_span"])), lo, hi)
                d["timings"]["first_token_s"] = round(first if first is not None else time.perf_counter() - t0, 4)
                d["timings"]["read_MB"] = round(src.bytes_read / 1e6, 3)
                d["timings"]["read_local_MB"] = round(getattr(src, "bytes_local", 0) / 1e6, 3)
                # before fusion, each frame's token record is read (a watch: its light record, with the
                # watch's rows): at 10,800 frames 0.12-0.21 s of a 1.7-2.0 s budget:64 answer on a 2-core CPU
                d["timings"]["window_s"] = round(window_s, 4)
                d["timings"]["read_light_MB"] = round(getattr(src, "light_bytes_read", 0) / 1e6, 3)
                yield {"type": "answer", **d}


def answer_fields(a) -> dict:
    """The answer fields of DESIGN section 8 from an `Answer`."""
    return {"text": a.text, "token_ids": list(a.token_ids), "frames": a.frames, "frames_fused": a.frames_fused,
            "time_span": list(a.time_span) if a.time_span else None, "policy": a.policy, "kv_policy": a.kv_policy,
            "gaps": [list(g) for g in a.gaps], "dropped": a.dropped, "timings": dict(a.timings),
            "prompt_tokens": a.prompt_tokens, "llm_tokens": a.llm_tokens, "llm_rows_run": a.llm_rows_run,
            "finish_reason": a.finish_reason,
            **({"choices": a.choices} if a.choices is not None else {}),
            **({"unknown_words": list(a.unknown_words)} if a.unknown_words else {})}


#: A stream record keeps at most this many gaps apart: past it, gaps that touch are given as one (a socket that
#: sheds every other frame for an hour would otherwise keep 3,600 gaps, the list rewritten with each frame).
MAX_RECORD_GAPS = 256


def merge_gaps(gaps: list, *, touching: bool = False) -> list:
    """Gaps sorted by start, those that overlap made one (`[[103, 128], [120, 129]]` -> `[[103, 129]]`); a None
    end (still open) covers everything after its start. Two that only touch stay two: a gap's ends are stored
    frames (the last before it, the first after), so where two meet there is a frame (frames shed on both
    sides of the one stored at 25 s are `[[0, 25], [25, 46]]`, not `[[0, 46]]`, which said none was there).
    `touching`: those are made one too (a record past `MAX_RECORD_GAPS`)."""
    inf = float("inf")
    out: list[list] = []
    for g in sorted(([g[0], g[1]] for g in gaps), key=lambda g: -inf if g[0] is None else g[0]):
        if out and (out[-1][1] is None or (g[0] is not None and (g[0] <= out[-1][1] if touching else
                                                                 g[0] < out[-1][1]))):
            if out[-1][1] is not None and (g[1] is None or g[1] > out[-1][1]):
                out[-1][1] = g[1]
        else:
            out.append(g)
    return out


def finite_gaps(gaps: list, window, last_s, span) -> list:
    """An answer's gaps with the ring's overwritten span made finite: the engine says frames overwritten
    before the window's first stored frame as `[None, first_pts]`; here that gap starts where the asked
    window starts (`window`'s start; `newest - last_s` for `last_s`; 0, the stream's start, for the
    whole stream), never after the first stored frame. The span holds no frame either way."""
    out = []
    for g in gaps:
        if g[0] is None and g[1] is not None:
            if window is not None:
                start = float(window[0])
            elif last_s is not None and span:
                start = max(0.0, float(span[1]) - float(last_s))
            else:
                start = 0.0
            g = [min(start, float(g[1])), g[1]]
        out.append(g)
    return out


def clip_gaps(gaps: list, lo: float, hi: float) -> list:
    """Gaps cut to the window asked about, [lo, hi) (infinite ends: no cut there): an outage from 9 s to 19 s
    is `[9, 12]` in a question about [0, 12), and a gap still open (None end) ends at a finite `hi`. What the
    answer says is missing is then what is missing from its window."""
    out = []
    for a, b in gaps:
        a = max(a, lo) if a is not None else (lo if math.isfinite(lo) else None)
        b = hi if b is None and math.isfinite(hi) else (min(b, hi) if b is not None else None)
        if b is None or a is None or b > a:
            out.append([a, b])
    return out


def answer_events_in_thread(make_events: Callable[[], Iterator[dict]]):
    """An async iterator over `make_events()`'s events, the generator running on its own thread.

    When the consumer stops early (client gone, task cancelled), a flag stops the work at its next
    check (`lmcore.cancel`): waiting for the model's lock, between fused frame chunks and LLM layers,
    before the next token; no further LLM step runs. Errors become one ``{"type": "error", ...}`` event."""

    async def agen():
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def post(ev) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, ev)
            except RuntimeError:                          # the loop is closed: no one is left to tell
                stop.set()

        def work():
            gen = None
            try:
                with cancel.scope(stop):                  # the engine stops at its next check once `stop` is set
                    gen = make_events()
                    for ev in gen:
                        post(ev)
                        if stop.is_set():
                            break
            except cancel.Cancelled:
                pass                                      # no one is left to tell
            except BaseException as e:                    # noqa: BLE001 - reported to the client
                post({"type": "error", **error_dict(e), "status": getattr(e, "http_status", 500)})
            finally:
                if gen is not None:
                    gen.close()
                post(None)

        th = threading.Thread(target=work, name="lms-answer", daemon=True)
        th.start()
        try:
            while True:
                ev = await q.get()
                if ev is None:
                    return
                yield ev
        finally:
            stop.set()

    return agen()


# ------------------------------------------------------------------------------------------ file jobs
@dataclass
class FileJob:
    job_id: str
    path: str
    fps: float = 1.0
    window: tuple[float, float] | None = None
    kv_policy: str = "exact"
    retain: dict | None = None                 # retention tiers (frame_cache.retention), None: all exact
    size: int | None = None                    # the tower's frame size (frames shrink as decoded)
    batch: int = 16
    max_frames: int = 100_000
    max_duration_s: float = 6 * 3600.0
    delete_after: bool = False                 # an upload: remove the file when done
    extra: dict[str, Any] = field(default_factory=dict)
    file_id: list[int] | None = None           # a `path` job: the identity of the file the request checked

    def drop_upload(self) -> None:
        """Removes the job's upload (nothing for a `path` job, or one removed already)."""
        import os
        if self.delete_after:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def job_progress(newest_pts: float, start: float, span: float | None) -> float:
    """How far a job's stored frames reach: the newest one's place in its window (or file) of `span` seconds
    from `start`, in [0, 0.999] (1.0 only once the job is ready); 0.0 when the span is unknown."""
    return round(max(min(0.999, (newest_pts - start) / span), 0.0), 4) if span else 0.0


def run_file_job(job: FileJob, encode: Callable[[list[EncodeItem]], list[dict]], store: JobStore, cache) -> dict:
    """Decode `job.path`, sample at `job.fps`, hand batches to `encode`, keep `store` current.
    Returns the final job record. Never raises for bad input: the job ends `failed` with the
    decoder's error code, and frames stored before the error stay stored."""
    import os
    from stream.decode import VideoSource
    store.update(job.job_id, status="ingesting")
    sid = job.job_id
    frames = 0
    progress = 0.0                                      # how far the frames stored reach: kept when the job fails
    src = None
    pinned = contextlib.ExitStack()
    read_as = job.path
    try:
        kw = {"resize_to": job.size} if job.size else {}
        start, end = job.window if job.window else (None, None)
        read_as = pinned.enter_context(opened_as_checked(job))     # the very file the request checked
        try:
            src = VideoSource(read_as, fps=job.fps, start=start, end=end, **kw)
        except BadArgument as e:                       # the request's own (a window after a still image's one
            raise InvalidRequest(e.message) from None  # frame): as every route says the request's faults
        dur = src.info.duration_s
        if dur is not None and dur > job.max_duration_s and (job.window is None or
                                                              job.window[1] - job.window[0] > job.max_duration_s):
            raise PayloadTooLarge(f"expected a video of at most {job.max_duration_s:g} s, got {dur:.0f} s "
                                  "(ask for a window, or raise the limit)")
        span = ((end or dur or 0.0) - (start or 0.0)) or None
        store.update(job.job_id, duration_s=dur, source_fps=src.info.source_fps, width=src.info.width,
                     height=src.info.height)
        meta = {"source": _shown_name(job), "fps": job.fps}
        if job.retain is not None:
            meta["retain"] = job.retain
        cache.create_stream(sid, capacity=job.max_frames, meta=meta, exist_ok=True, on_full="error")
        writer = cache.acquire_writer(sid)
        seq = cache.stream_info(sid).total_appended
        buf: list[np.ndarray] = []
        pts: list[float] = []
        last_update = 0.0

        def flush():
            nonlocal seq, frames, progress
            item = EncodeItem(sid, np.stack(buf), list(pts), writer=writer, seq=seq, kv_policy=job.kv_policy)
            res = encode([item])[0]
            if "error" in res:
                err = res["error"]
                raise LmsError(err["message"], code=err["code"])
            seq += len(res["seqs"])
            frames += len(res["seqs"])
            progress = job_progress(pts[-1], start or 0.0, span)
            buf.clear()
            pts.clear()

        for f in src:
            if frames + len(buf) >= job.max_frames:
                if buf:                                          # the frames within the limit are kept
                    flush()
                raise PayloadTooLarge(f"expected at most {job.max_frames} frames per video at {job.fps:g} fps, got "
                                      "more (ask for a window or a lower fps)")
            if f.pts - (start or 0.0) > job.max_duration_s:     # a header that said less (or nothing): the frames
                if buf:                                          # decide; those within the limit are kept
                    flush()
                said = f"{dur:.0f} s" if dur is not None else "no duration"
                raise PayloadTooLarge(f"expected a video of at most {job.max_duration_s:g} s, got a frame at "
                                      f"{f.pts:.0f} s (the file declares {said}; ask for a window, or raise the limit)")
            if f.rgb.ndim == 2 or f.rgb.shape[-1] != 3:
                raise BadArgument(f"expected RGB frames, got shape {tuple(f.rgb.shape)}")
            buf.append(f.rgb if job.size is None or f.rgb.shape[:2] == (job.size, job.size) else
                       _nearest(f.rgb, job.size))
            pts.append(f.pts)
            if len(buf) >= job.batch:
                flush()
                now = time.monotonic()
                if now - last_update > 0.5:
                    store.update(job.job_id, frames=frames, progress=progress)
                    last_update = now
        if buf:
            flush()
        rep = src.report                                    # its duration_s: the frames' where the header was wrong
        store.update(job.job_id, status="ready", frames=frames, progress=1.0,
                     gaps=[list(g) for g in rep.gaps], decode_errors=rep.errors[:5],
                     duration_s=rep.duration_s if rep.duration_s is not None else dur)
    except BaseException as e:                          # noqa: BLE001 - the job says what happened
        # a stop inside `flush` (SystemExit in the encoder's call) can leave its batch stored but uncounted
        frames = stored_frames(cache, sid, frames)
        err = error_dict(e) if isinstance(e, Exception) else {   # the decoder stopped (the service stopping)
            "code": Interrupted.code, "message": f"expected the job to finish, got its decoder stopped "
            f"({type(e).__name__}); {frames_kept(frames)}"}
        # never the server's upload path, nor the name it stored the upload under (vid-....mp4): the
        # client's own name for the file, as every other error says it
        shown = _shown_name(job)
        err["message"] = err["message"].replace(read_as, shown).replace(job.path, shown)
        if job.delete_after:                           # an upload: its stored name is the job's, unique
            err["message"] = err["message"].replace(os.path.basename(job.path), shown)
        fields = {}
        if src is not None:        # what decoding found so far (frames past a header that declared less)
            seen = [x for x in (src.report.duration_s, src.info.duration_s) if x is not None]
            fields = {"decode_errors": src.report.errors[:5], **({"duration_s": max(seen)} if seen else {})}
        if frames:                                     # where the frames stored reach, not the last update's
            fields["progress"] = progress
        store.update(job.job_id, status="failed", frames=frames, error=err,
                     gaps=[list(g) for g in (src.report.gaps if src is not None else [])], **fields)
        if not isinstance(e, Exception):
            raise
    finally:
        if src is not None:
            src.close()
        pinned.close()
        job.drop_upload()
    return store.get(job.job_id)


def stored_frames(cache, sid: str, known: int) -> int:
    """The frames a failed job keeps: the larger of `known` (its record's count, written with each progress
    update, so up to a batch behind when its decoder stopped between two) and what the ring of `sid` holds;
    `known` where the ring cannot be read (no cache given, nothing stored, Redis gone)."""
    if cache is None:
        return known
    try:
        return max(known, int(cache.stream_info(sid).count))
    except Exception:                                   # noqa: BLE001 - the record's own count then stands
        return known


def frames_kept(frames: int) -> str:
    """What a failed job's message says of its frames."""
    return f"the {frames} frames stored stay and can be asked about; send the file again (a new video, ingested " \
        "from its start) for the rest" if frames else "no frame was stored; send the file again"


def _shown_name(job: FileJob) -> str:
    """A job's file as its client named it: the path it sent, the upload's filename, or, for an upload
    sent without one (curl -F file=<v.mp4), "the uploaded file"; never the name the service stored it under."""
    if job.extra.get("source"):
        return str(job.extra["source"])
    return "the uploaded file" if job.delete_after else os.path.basename(job.path)


def _nearest(rgb: np.ndarray, size: int) -> np.ndarray:
    """The preprocessing's own nearest resize (bit-identical to `preprocess_video_frames`)."""
    from stream.preprocess import resize_frame_nearest
    return resize_frame_nearest(rgb, size)


def check_allowed(path: str, allowed: list[str]) -> str:
    """The real path of `path` if it lies inside one of `allowed`, else `PathNotAllowed`."""
    import os
    from lmcore.errors import InvalidRequest, PathNotAllowed
    if "\x00" in path:
        raise InvalidRequest(f"expected path without NUL bytes, got {path!r}")

    def inside(p: str) -> bool:
        return any(p == d or p.startswith(d.rstrip(os.sep) + os.sep) for d in allowed)
    real = os.path.realpath(os.path.expanduser(path))
    if inside(real):
        return real
    shown = ", ".join(allowed) if allowed else "none configured (lmstream serve --allowed-dir DIR)"
    # a link inside that leads out: said so (the path shown is inside), where it leads not said
    plain = os.path.abspath(os.path.expanduser(path))
    how = " (a symbolic link along it leads outside them)" if inside(plain) else ""
    raise PathNotAllowed(f"expected a path inside the allowed folders ({shown}), got {path!r}{how}")


def check_regular_file(real: str, shown: str) -> list[int]:
    """`real` (a job's resolved `path`) is a regular file the service may read: 404 `E_NOT_FOUND` when
    nothing is there, 422 `E_INPUT_UNREADABLE` for a directory, a FIFO (the decoder would wait on it for
    a writer), a socket or a device, or a file it may not read. Said at once, not by a job that fails
    later. `shown` is the path as the client wrote it (never the resolved one). Returns the file's identity
    (`file_identity`), which the decoder checks on the file it opens."""
    import stat
    from lmcore.errors import InputUnreadable
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise NotFound(f"expected a file at {shown!r} inside the allowed folders, got none") from None
    except OSError as e:
        raise InputUnreadable(f"expected a readable file at {shown!r}, got {e.strerror or type(e).__name__}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"),
                                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                                       (stat.S_ISBLK, "block device")) if test(st.st_mode)), "special file")
        raise InputUnreadable(f"expected a regular file at {shown!r}, got a {kind}")
    if not os.access(real, os.R_OK):
        raise InputUnreadable(f"expected a file the service may read at {shown!r}, got one it may not "
                              "(permission denied)")
    if st.st_size == 0:                              # as an empty upload is refused, at once (not a failed job)
        from lmcore.errors import NotAVideo
        raise NotAVideo(f"expected a video file at {shown!r}, got an empty file (0 bytes)")
    return file_identity(st)


def file_identity(st: os.stat_result) -> list[int]:
    """[inode]: what a decoder, perhaps on another node of a shared volume (where st_dev differs), compares
    with the file it opened. Not the size: a file still being written when its job was queued is the same
    file."""
    return [int(st.st_ino)]


#: the folder name prefix of `opened_as_checked`'s links, one folder per decoder process (`_link_folder`)
READ_LINKS_PREFIX = "lms-read-"


_LINK_FOLDER: list[str | None] = []            # `_link_folder`'s answer, once per process


def _link_folder() -> str | None:
    """This process' folder for `opened_as_checked`'s links (0700, its own), made on first use; folders of
    processes that are gone (a decoder killed mid-job never ran its clean-up) are removed then, once per
    process, not at every job. None when none can be made (a full or read-only temp folder)."""
    if not _LINK_FOLDER:
        _LINK_FOLDER.append(_make_link_folder())
    return _LINK_FOLDER[0]


def _make_link_folder() -> str | None:
    import shutil
    import tempfile
    tmp = tempfile.gettempdir()
    mine = os.path.join(tmp, f"{READ_LINKS_PREFIX}{os.getpid()}")
    try:
        for name in os.listdir(tmp):
            pid = name[len(READ_LINKS_PREFIX):]
            if name.startswith(READ_LINKS_PREFIX) and pid.isdigit() and int(pid) != os.getpid():
                try:
                    os.kill(int(pid), 0)
                except ProcessLookupError:
                    shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
                except OSError:
                    pass                                # another user's process: not ours to judge
        try:
            os.mkdir(mine, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(mine)                             # ours, a real folder, no one else's to write
        if not (os.path.isdir(mine) and not os.path.islink(mine) and st.st_uid == os.getuid()
                and st.st_mode & 0o077 == 0):
            return None
        return mine
    except OSError:
        return None


@contextlib.contextmanager
def opened_as_checked(job: "FileJob"):
    """The path a `path` job's decoder reads: a link to `/proc/self/fd/N` of the file it opened, once that file
    is the one the request checked (`job.file_id`, and, where `/proc` says, the same resolved path). The
    check was on the path and the decoder opened it later, so a folder inside an allowed one replaced
    meanwhile by a link to elsewhere had it read a file outside them. The open descriptor pins the file:
    FFmpeg's own opens reach the same one, and the link, in a folder of this process' own, keeps the file's
    name (FFmpeg tells some formats by their extension; without that folder, `/proc/self/fd/N` itself).
    Uploads (the service's own files) and jobs without an identity: the path itself."""
    import shutil
    import tempfile
    from lmcore.errors import PathNotAllowed
    from stream.decode import check_input_path
    if job.delete_after or job.file_id is None:
        yield job.path
        return
    check_input_path(job.path)              # gone, unreadable, a FIFO put there: said in the decoder's words
    try:
        fd = os.open(job.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        check_input_path(job.path)          # raced away between the two: its own error
        raise
    folder = None
    try:
        pinned = f"/proc/self/fd/{fd}"
        have_proc = os.path.exists(pinned)
        # the inode (unique within a file system only) and, where /proc shows it, the path the descriptor
        # resolves to now: a folder swapped for a link to another file system cannot pass both
        if file_identity(os.fstat(fd)) != list(job.file_id) or (have_proc and os.readlink(pinned) != job.path):
            raise PathNotAllowed(f"expected the file the request named, got another at {job.path} (the file or a "
                                 "folder along its path was replaced after the request was checked)")
        if not have_proc:                   # no /proc (not Linux): the path, checked just now
            yield job.path
            return
        parent = _link_folder()
        if parent is not None:
            try:
                folder = tempfile.mkdtemp(dir=parent)
                link = os.path.join(folder, os.path.basename(job.path))
                os.symlink(pinned, link)
            except OSError:
                link = pinned
        else:
            link = pinned
        yield link
    finally:
        os.close(fd)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def fps_ok(fps: float | None, settings: Settings) -> float:
    """The frames per second asked for (a JSON number: a string or a boolean is refused, as on every
    route), the settings' default when None."""
    from lmcore.errors import InvalidRequest
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))):
        raise InvalidRequest(f"expected fps as a number in (0, {settings.limits.max_fps:g}], got "
                             f"{json.dumps(fps)[:40]}")
    fps = settings.fps if fps is None else float(fps)
    if not math.isfinite(fps) or fps <= 0 or fps > settings.limits.max_fps:
        raise InvalidRequest(f"expected fps in (0, {settings.limits.max_fps:g}], got {fps}")
    return fps


def video_status(d: dict) -> dict:
    """A job record as the API shows it (`schemas.VideoStatus`)."""
    return {"id": d["id"], "status": d["status"], "frames": int(d.get("frames") or 0),
            "duration_s": d.get("duration_s"), "progress": float(d.get("progress") or 0.0),
            "gaps": d.get("gaps") or [], "error": d.get("error"), "decode_errors": d.get("decode_errors") or [],
            "source": d.get("source"), "created": d.get("created")}


def require_answerable(d: dict, stored: int | None = None) -> None:
    """A video's questions are answered once it is ready, and over what a job still ingesting or one that
    failed has stored (its answers carry the job's status, `video_answer_context`: a 3-hour file was 409 for
    its whole ingest, over frames stored already); 409 `E_NOT_READY` while it is queued or before it stored a
    frame. `stored`: the frames its ring holds (the cache's count; the record's `frames` lags by one
    progress update), else the record's."""
    st = d["status"]
    if stored is None:
        stored = int(d.get("frames") or 0)
    if st == "ready" or (st in ("failed", "ingesting") and stored > 0):
        return
    if st == "failed":
        err = d.get("error") or {}
        raise NotReady(f"expected video {d['id']!r} to be ready or to have stored frames, got status 'failed' with "
                       f"no frame stored: {err.get('code')} {err.get('message')}")
    raise NotReady(f"expected video {d['id']!r} to be ready or to have stored frames, got status {st!r} with none "
                   f"stored yet (GET /v1/videos/{d['id']} says its progress)")


def video_answer_context(d: dict, newest_pts: float | None) -> tuple[list, dict | None]:
    """(gaps, job) for a question over video `d`: its decode gaps, and for a job still ingesting or one that
    failed part way the span it has not stored, `[pts of its last stored frame, end]` (end: the job's window
    end, no later than the file's duration; no such gap when neither is known or nothing is missing), with
    `job` = {"status", "error", "frames", "progress"} for the answer to carry. A ready video: its gaps and
    None."""
    gaps = [list(g) for g in d.get("gaps") or []]
    if d["status"] == "ready":
        return gaps, None
    window = d.get("window")
    end = float(window[1]) if window else d.get("duration_s")
    if window and d.get("duration_s") is not None:  # a window past the file's end: the gap ends with the file
        end = min(end, float(d["duration_s"]))
    if newest_pts is not None and end is not None and float(end) > newest_pts:
        gaps.append([float(newest_pts), float(end)])
    job = {"status": d["status"], "error": d.get("error"), "frames": int(d.get("frames") or 0),
           "progress": float(d.get("progress") or 0.0)}
    return gaps, job


# ------------------------------------------------------------------------------------------ live streams
class LiveStore(JobStore):
    """Live streams' status in Redis (``lms:{<id>}:live``, set ``lms:live``): source, kind (rtsp |
    push), fps, status, frames, last_pts, lag_s, gaps, last_error, dropped (frames shed, by reason in
    dropped_why; never those skipped by fps sampling: skipped_by_fps), last_wall (Unix time of the newest
    stored frame), and for cameras frames_received, previous_error. The counts are the stream's totals over
    its sources (a camera's restarts, each socket that continues it: `carried_counts`). Same storage and
    errors as jobs.
    A socket writes "connecting" at its start (clearing last_wall) and last_pts / last_wall with each stored
    frame, never "live" (a write racing a DELETE could bring a stopped stream back): `stream_status` derives
    connecting / live / stalled from last_wall."""

    PART, SET, NOUN, ID_OF = "live", "lms:live", "stream", "stream"
    DEFAULTS = {"status": "connecting", "frames": 0, "last_pts": None, "lag_s": None, "gaps": [],
                "last_error": None, "dropped": 0}
    #: streams that hold a slot of `max_live_streams`: a stopped or failed one keeps its frames, not a slot
    ACTIVE = ("connecting", "live", "stalled", "reconnecting")
    #: a pushed stream without a stored frame for this long shows as stalled (`stream_status`), as a camera does
    #: (`stream.live.RtspSource`'s stall_after_s); at an fps below 2 / PUSH_STALL_S, two sampling periods
    PUSH_STALL_S = 5.0

    @classmethod
    def push_stall_s(cls, fps) -> float:
        """Seconds without a stored frame after which a pushed stream shows as stalled: PUSH_STALL_S, or two
        sampling periods at a low fps (at fps 0.1 a socket pushing 30 frames a second stores one frame
        every 10 s: stalled at 5 s, it would flip live -> stalled -> live between samples)."""
        try:
            fps = float(fps)
        except (TypeError, ValueError):
            return cls.PUSH_STALL_S
        return max(cls.PUSH_STALL_S, 2.0 / fps) if fps > 0 else cls.PUSH_STALL_S

    def update(self, rid: str, **fields) -> bool:
        """As `JobStore.update`, and keeps ``last_wall`` for writers that do not give it (a socket's): an
        update that reports a stored frame (``last_pts``) stamps it now, one that makes a stream connecting
        or live without a frame (a socket's start) clears it, as nothing is stored from that source yet.
        ``newest_wall`` is the same time of the newest stored frame, never cleared (`continued_timeline`)."""
        if "last_wall" not in fields:
            if fields.get("last_pts") is not None:
                fields["last_wall"] = time.time()
            elif fields.get("status") in ("connecting", "live") and "last_pts" not in fields:
                fields["last_wall"] = None
        if fields.get("last_pts") is not None and fields.get("last_wall") and "newest_wall" not in fields:
            fields["newest_wall"] = fields["last_wall"]   # never cleared: where a continued stream's time goes on
        return super().update(rid, **fields)


def newest_wall(d: dict) -> float | None:
    """Unix time a stream record's newest stored frame was stored: `newest_wall` (never cleared), else
    `last_wall` (records written before there was `newest_wall`)."""
    return d.get("newest_wall") or d.get("last_wall")


def continued_timeline(newest_pts: float | None, last_wall: float | None, fps: float,
                       now: float | None = None) -> tuple[float, list | None]:
    """Where a new source of a stream that has frames (a camera after a service restart, a WebSocket that
    continues a stream) puts its time 0: the stream's time goes on with the wall clock, so its newest
    frame's pts plus the time since that frame was stored (`last_wall`; at least one frame period). Returns
    (offset, outage): the outage `[newest_pts, offset]` when more than 1.5 frame periods passed with no
    frame (a gap, as a camera's), else None. A stream with no frame: (0.0, None)."""
    if newest_pts is None:
        return 0.0, None
    away = ((time.time() if now is None else now) - float(last_wall)) if last_wall else 0.0
    offset = float(newest_pts) + max(1.0 / fps, away)
    return offset, ([float(newest_pts), offset] if away > 1.5 / fps else None)


def stream_status(d: dict, now: float | None = None) -> dict:
    """A stream record as GET /v1/streams/{id} (and /metrics) shows it. A pushed stream's record says
    "connecting" while its socket is open (older records: "live"): it shows as "connecting" until a frame is
    stored, "live", and "stalled" once none was for `LiveStore.push_stall_s` (a camera's status comes from
    its source, see `run_rtsp_stream`).
    ``lag_s`` is None while it is connecting, stalled or reconnecting: no frame arrives, so none lags (a
    stopped or failed stream keeps its last one)."""
    keys = ("id", "kind", "source", "fps", "status", "frames", "last_pts", "lag_s", "gaps", "last_error", "dropped",
            "dropped_why", "node", "restarts", "created")
    out = {k: d.get(k) for k in keys}
    out.update({k: d[k] for k in ("skipped_by_fps", "frames_received", "previous_error") if k in d})
    if out["status"] in ("connecting", "live") and d.get("kind") == "push":
        wall = d.get("last_wall")
        now = time.time() if now is None else now
        if wall is None:
            out["status"] = "connecting"
        elif now - wall > LiveStore.push_stall_s(d.get("fps")):
            out["status"] = "stalled"
        else:
            out["status"] = "live"
    if out["status"] in ("connecting", "stalled", "reconnecting"):
        out["lag_s"] = None
    return out


def carried_counts(d: dict) -> tuple[dict, int]:
    """A stream record's counts that its next source goes on from (a camera's source started again, a socket
    that continues the stream): (dropped_why, skipped_by_fps). The record keeps the stream's totals across
    its sources, so each adds its own to these. A record written before sampling was told apart from
    shedding has the sampled-out frames in dropped_why: "rate" (a camera's), "over fps" (a socket's)."""
    why = {k: int(v) for k, v in (d.get("dropped_why") or {}).items()}
    return why, int(d.get("skipped_by_fps") or 0) + why.pop("rate", 0) + why.pop("over fps", 0)


class FrameSampler:
    """Keeps frames at most `fps` per second of their pts (the first frame at or after each
    target time, like the file decoder), and counts the rest as dropped."""

    def __init__(self, fps: float):
        self.fps, self.t0, self.next_t, self.dropped = fps, None, None, 0
        self.last: float | None = None                               # pts of the newest frame kept

    def want(self, pts: float) -> bool:
        if self.t0 is None:
            self.t0 = pts
        if self.next_t is not None and pts < self.next_t - 1e-6:
            self.dropped += 1
            return False
        k = math.floor((pts - self.t0) * self.fps + 1e-6) + 1        # every target <= pts is consumed
        self.next_t = self.t0 + k / self.fps
        self.last = pts
        return True


#: pictures over this many pixels are decoded at most two at a time in the Ingress, on threads of their own
#: (`routes._decode_pushed`; each holds width x height x 3 bytes and more while it is converted): three sockets
#: pushing 8000 x 8000 PNGs of 8 KB each took the Ingress, which serves every client, from 188 MB to 2.2 GB
BIG_PICTURE_PIXELS = 1920 * 1080


def picture_pixels(data: bytes) -> int:
    """Width x height of a pushed JPEG/PNG from its header alone (0 when it has none: `decode_image` says why)."""
    import io
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            return int(im.size[0]) * int(im.size[1])
    except Exception:                                   # noqa: BLE001 - not a picture: decode_image tells it
        return 0


def decode_image(data: bytes, size: int | None) -> np.ndarray:
    """One JPEG/PNG message -> (S, S, 3) uint8 RGB, shrunk like the file decoder's frames. At most
    `stream.decode.MAX_IMAGE_PIXELS` (8192 x 8192), as a file's still images."""
    import io
    from PIL import Image, UnidentifiedImageError
    from lmcore.errors import NotAVideo
    from stream.decode import MAX_IMAGE_PIXELS
    too_big = f"expected a frame of at most {MAX_IMAGE_PIXELS} pixels (8192x8192), got "
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ("JPEG", "PNG", "WEBP"):
                raise NotAVideo(f"expected a JPEG or PNG frame, got {im.format} data")
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise PayloadTooLarge(f"{too_big}{w}x{h}")
            rgb = np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as e:              # PIL refuses to open one far past our limit
        import re
        n = re.search(r"\((\d+) pixels\)", str(e))
        raise PayloadTooLarge(f"{too_big}{n.group(1) + ' pixels' if n else 'far more'}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise NotAVideo(f"expected a JPEG or PNG frame, got {len(data)} bytes that are not an image "
                        f"({type(e).__name__})") from None
    return rgb if size is None or rgb.shape[:2] == (size, size) else _nearest(rgb, size)


def run_rtsp_stream(sid: str, url: str, fps: float, size: int, encode: Callable[[list[EncodeItem]], list[dict]],
                    live: LiveStore, cache, stop: threading.Event, *, allow_private: bool = True) -> dict:
    """A camera's loop (the StreamSource actor): `stream.live.RtspSource` frames -> `encode` -> ring,
    the stream's status (connecting / live / stalled / reconnecting / stopped / failed), frames,
    last_pts, lag_s and outage gaps kept current in `live`. Ends when `stop` is set. `allow_private` False:
    the camera's host is checked again before each connection (the settings' `allow_private_sources`)."""
    from stream.live import RtspSource
    src = RtspSource(url, fps=fps, resize_to=size, allow_private=allow_private)
    writer = cache.acquire_writer(sid)
    seq = cache.stream_info(sid).total_appended
    info = cache.stream_info(sid)
    before = live.get(sid)
    # outages of earlier sources of this stream; one still open (its source died reconnecting) is closed by
    # this start's outage below, not carried open for good
    carried = [list(g) for g in before.get("gaps") or [] if g[1] is not None]
    offset, outage = continued_timeline(info.newest_pts, newest_wall(before), fps)
    if outage is not None:                               # a resumed stream (service restart, actor moved)
        carried.append(outage)                          # no source ran: the outage is a gap
    # the record's last_error (an actor restart's E_UNAVAILABLE, the camera's error before a service restart)
    # stays until this source has its own word: an error of its own or a frame; then it is previous_error
    state = {"last": 0.0, "last_pts": info.newest_pts, "lag_s": None, "last_wall": before.get("last_wall"),
             "stored": False, "store_error": None, "carried_error": before.get("last_error"),
             "previous_error": before.get("previous_error"), "final": False,
             # frames the Encoder did not store (a full Redis, the Encoder away): counted as a socket's are
             # ("not stored"), and each run of them a gap from the stored frame before to the one after (open:
             # to the newest refused); they were neither, and a question over the span said `gaps: []`
             "not_stored": 0, "loss": [], "open_loss": None}
    # one publish at a time, snapshot to write: the status thread's snapshot taken before the first frame was
    # stored ("connecting") must not land after the frame loop's "live"; none after the final status
    lock = threading.RLock()
    why0, skipped0 = carried_counts(before)             # counts of earlier sources of this stream go on
    received0 = int(before.get("frames_received") or 0)

    def publish(force: bool = False):
        with lock:
            if not state["final"]:
                _publish(force)

    def _publish(force: bool):
        now = time.monotonic()
        if force or now - state["last"] >= 1.0:
            st = src.status_dict()
            # sorted and merged: an outage carried from a source that died overlaps the one its restart adds
            gaps = merge_gaps(carried + [[g[0] + offset, g[1] + offset if g[1] is not None else None]
                                         for g in st.get("gaps", [])]
                              + state["loss"] + ([list(state["open_loss"])] if state["open_loss"] else []))
            status = st["status"]
            if status == "live" and not state["stored"]:
                status = "connecting"                    # a frame decoded, none stored yet: no frame to ask about
            lag = state["lag_s"]                         # the last stored frame's (kept once stopped)
            if status == "live":                         # or longer while frames wait in the source's queue
                lag = max(lag or 0.0, st.get("lag_s") or 0.0)
            elif status != "stopped" and status != "failed":
                lag = None                               # no frame arrives, so none lags
            why = dict(why0)
            for k, v in (st.get("dropped_why") or {}).items():
                why[k] = why.get(k, 0) + v
            if state["not_stored"]:
                why["not stored"] = why.get("not stored", 0) + state["not_stored"]
            err = st.get("last_error") or state["store_error"]
            if state["carried_error"] is not None and (err is not None or st.get("frames_received", 0) > 0):
                state["previous_error"], state["carried_error"] = state["carried_error"], None
            err = err or state["carried_error"]
            live.update(sid, status=status, frames=seq, gaps=gaps, last_error=err,
                        previous_error=st.get("previous_error") or state["previous_error"],
                        last_pts=state["last_pts"], lag_s=lag,
                        dropped=sum(why.values()), dropped_why=why,
                        skipped_by_fps=skipped0 + st.get("skipped_by_fps", 0),
                        frames_received=received0 + st.get("frames_received", 0), last_wall=state["last_wall"])
            state["last"] = now

    watcher = threading.Thread(target=lambda: (stop.wait(), src.stop()), daemon=True, name="lms-cam-stop")
    watcher.start()
    pub = threading.Thread(target=lambda: _publish_loop(publish, stop), daemon=True, name="lms-cam-status")
    pub.start()
    try:
        for f in src:
            if stop.is_set():
                break
            pts = f.pts + offset
            t_arrive = time.monotonic()
            res = encode([EncodeItem(sid, f.rgb[None], [pts], writer=writer, seq=seq)])[0]
            if "error" in res:
                if res["error"]["code"] == "E_STALE_WRITER":
                    with lock:
                        state["store_error"] = res["error"]
                        live.update(sid, last_error=res["error"])
                    break
                with lock:
                    state["store_error"] = res["error"]          # shown until a frame is stored again
                    state["not_stored"] += 1
                    lo = state["open_loss"]
                    start = lo[0] if lo else state["last_pts"] if state["last_pts"] is not None else pts
                    state["open_loss"] = [start, pts]
                    publish(force=True)                         # the error, the count and the span at once
                continue
            seq += len(res["seqs"])
            if state["open_loss"] is not None:                  # frames flow again: the span is closed
                with lock:
                    state["loss"] = merge_gaps([*state["loss"], [state["open_loss"][0], pts]])
                    if len(state["loss"]) > MAX_RECORD_GAPS:        # bounded, as a socket's
                        state["loss"] = merge_gaps(state["loss"], touching=True)
                    state["open_loss"] = None
                    state["previous_error"] = state["store_error"] or state["previous_error"]
            queued_s = src.status_dict().get("lag_s") or 0.0          # waited in the source's queue
            state["last_pts"], state["lag_s"] = pts, round(time.monotonic() - t_arrive + queued_s, 3)
            first = not state["stored"]
            state["last_wall"], state["stored"], state["store_error"] = time.time(), True, None
            publish(force=first)                                      # the first stored frame shows at once
    except Exception as e:                               # noqa: BLE001 - the status says what happened
        live.update(sid, status="failed", last_error=error_dict(e))
        raise
    finally:
        asked = stop.is_set()                            # DELETE /v1/streams/ID, not a service going down
        stop.set()
        src.stop()
        final = "failed" if src.status_dict()["status"] == "failed" else ("stopped" if asked else "reconnecting")
        try:
            with lock:                                   # the status thread may still be in a publish
                state["final"] = True                    # and none of its may land after this
                _publish(True)
                live.update(sid, status=final, **({"lag_s": None} if final == "reconnecting" else {}))
            # "reconnecting": the next service start resumes it
        except LmsError:
            pass
    return live.get(sid)


def _publish_loop(publish, stop: threading.Event) -> None:
    """Status changes (stalled, reconnecting) show even while no frame arrives."""
    while not stop.wait(1.0):
        try:
            publish(force=True)
        except Exception:                                # noqa: BLE001 - Redis down: next time
            pass



class WatchStore(JobStore):
    """Watches per stream (``lms:{<id>}:watches``: id -> {"question", "every_s", "last_s", "last_text"})
    and their events (``lms:{<id>}:events``, newest first, capped; ``lms:{<id>}:event_seq``)."""

    MAX_EVENTS = 1000
    MAX_CACHED = 1024           # streams whose watches `active` keeps (those read over `max_age` ago go first)
    MAX_AGE_S = 1.0             # how stale `active`'s copy may be: a new watch reaches the Encoder within it

    def _k(self, sid: str, part: str) -> str:
        from frame_cache import stream_key
        return stream_key(sid, part)

    #: a watch added only while the stream has fewer than ARGV[3]: the count and the add in one step, so that
    #: concurrent POSTs cannot pass the limit (each read the count, then all added)
    _ADD_UNDER = ("local n = redis.call('HLEN', KEYS[1]) if n >= tonumber(ARGV[3]) then return n end "
                  "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) return -1")

    def add(self, sid: str, wid: str, w: dict, limit: int | None = None) -> int | None:
        """Add a watch; with `limit`, only while the stream has fewer: returns how many it has when it is
        refused, None when added."""
        if limit is None:
            self._call("adding a watch", lambda: self.r.hset(self._k(sid, "watches"), wid, json.dumps(w)))
            n = -1
        else:
            n = int(self._call("adding a watch", lambda: self.r.eval(self._ADD_UNDER, 1, self._k(sid, "watches"),
                                                                     wid, json.dumps(w), int(limit))))
        self._cache.pop(sid, None)
        return None if n < 0 else n

    def all(self, sid: str) -> dict[str, dict]:
        raw = self._call("reading watches", lambda: self.r.hgetall(self._k(sid, "watches")))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def active(self, sid: str, max_age: float = MAX_AGE_S) -> dict[str, dict]:
        """The stream's watches, re-read at most every `max_age` s (the Encoder asks per batch)."""
        now = time.monotonic()
        got = self._cache.get(sid)
        if got is None or now - got[0] > max_age:
            got = (now, self.all(sid))
            self._cache[sid] = got
            if len(self._cache) > self.MAX_CACHED:            # streams seen once (file jobs) do not pile up
                for k in [k for k, (t, _) in self._cache.items() if now - t > max_age]:
                    del self._cache[k]
        return got[1]

    def remove(self, sid: str, wid: str) -> bool:
        self._cache.pop(sid, None)
        return bool(self._call("removing a watch", lambda: self.r.hdel(self._k(sid, "watches"), wid)))

    def forget(self, sid: str) -> None:
        """Drop a stream's watches and events (its purge: a stream created again under the id starts
        with none)."""
        self._cache.pop(sid, None)
        self._call("deleting watches", lambda: self.r.delete(*(self._k(sid, p) for p in
                                                                ("watches", "events", "event_seq"))))

    #: a watch's fields written only while it exists: an evaluation ending after a DELETE must not bring it back
    _SET_IF_THERE = ("if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then "
                     "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) return 1 end return 0")

    def update(self, sid: str, wid: str, **fields) -> None:
        w = self.all(sid).get(wid)
        if w is not None:
            w.update(fields)
            self._call("updating a watch", lambda: self.r.eval(self._SET_IF_THERE, 1, self._k(sid, "watches"), wid,
                                                               json.dumps(w)))

    def push_event(self, sid: str, ev: dict) -> dict:
        def do():
            seq = self.r.incr(self._k(sid, "event_seq"))
            e = {**ev, "seq": int(seq)}
            pipe = self.r.pipeline()
            pipe.lpush(self._k(sid, "events"), json.dumps(e))
            pipe.ltrim(self._k(sid, "events"), 0, self.MAX_EVENTS - 1)
            pipe.execute()
            return e
        return self._call("storing an event", do)

    def events_after(self, sid: str, seq: int) -> list[dict]:
        raw = self._call("reading events", lambda: self.r.lrange(self._k(sid, "events"), 0, self.MAX_EVENTS - 1))
        evs = [json.loads(x) for x in raw]
        return sorted((e for e in evs if e["seq"] > seq), key=lambda e: e["seq"])

    def __init__(self, redis_url: str, *, timeout: float = 5.0):
        super().__init__(redis_url, timeout=timeout)
        self._cache: dict[str, tuple[float, dict]] = {}
