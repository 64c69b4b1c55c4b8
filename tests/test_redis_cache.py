"""Redis-only tests of `RedisFrameCache` on real redis-server processes (no mocks).

The conformance suite (tests/test_frame_cache.py) already runs every cache test on Redis;
here: the key layout and its invariants, concurrent writers and readers, kill -9 with AOF
``everysec`` and a restart, a Redis that is down, frozen or out of memory, and a 3-master
Redis Cluster. Servers live in the test's temporary folder and are stopped by their pid.
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import uuid
from dataclasses import replace

import pytest
import redis
import torch

from frame_cache import (
    KV_TENSORS,
    CacheBudgetExceeded,
    CacheUnavailable,
    FrameRecord,
    StreamNotFound,
    decode_record,
    encode_record,
    open_cache,
    record_seq,
    stream_key,
    token_record,
)
from frame_cache.redis_cache import RedisFrameCache
from lmcore.errors import BadArgument, CacheError
from redis.crc import key_slot
from redis_servers import RedisClusterServers, RedisServer, redis_binaries_missing

pytestmark = [pytest.mark.filterwarnings("ignore:The given buffer is not writable"), pytest.mark.timeout(120)]

PARTS = ("meta", "slots", "light", "pts", "evicted", "tokens")


@pytest.fixture
def server(tmp_path):
    """A redis-server of this test's own (it may be killed), in the test's temp folder."""
    missing = redis_binaries_missing()
    if missing:
        pytest.fail(missing, pytrace=False)
    with RedisServer(tmp_path / "redis") as srv:
        yield srv


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def _rec(i: int, pts: float | None = None, kv: int = 64) -> FrameRecord:
    """Frame ``i``: contents derived from ``i``; ``kv`` float32 values in each of k and v."""
    return FrameRecord(
        pts=float(i) if pts is None else pts,
        tensors={
            "vision": torch.full((1, 16), float(i)),
            "k": torch.full((kv,), float(i)),
            "v": torch.full((kv,), -float(i)),
            "idx": torch.tensor(i, dtype=torch.int64),
        },
        meta={"i": i},
    )


def check_integrity(r: redis.Redis, prefix: str, sid: str) -> dict:
    """Assert every invariant of one stream's keys, reading them raw; returns the meta hash
    (decoded) plus ``records``: {seq: decoded record} of the retained frames.

    Invariants: retained seqs are exactly next_seq-count .. next_seq-1 (zset members), each
    slot seq % capacity holds a record that decodes with that seq and the zset's pts, its light
    copy decodes with the same seq and no keys/values, its token copy with the same seq, pts and
    meta and only the vision token, bytes_used / light_bytes are the sums of the stored lengths, and the evicted zset plus its collapsed count is every overwritten frame.
    """
    k = {p: stream_key(sid, p, prefix=prefix) for p in PARTS}
    h = {a.decode(): b.decode() for a, b in r.hgetall(k["meta"]).items()}
    assert h, f"no meta hash for stream {sid!r}"
    cap, count, nxt = int(h["capacity"]), int(h["count"]), int(h["next_seq"])
    members = r.zrange(k["pts"], 0, -1, withscores=True)
    seqs = [int(m) for m, _ in members]
    assert seqs == list(range(nxt - count, nxt)), (seqs[:5], nxt, count)
    assert count <= cap and r.hlen(k["slots"]) == count == r.hlen(k["light"]) == r.hlen(k["tokens"])
    records, used, lused = {}, 0, 0
    for (m, score), q in zip(members, seqs):
        blob = r.hget(k["slots"], str(q % cap))
        light = r.hget(k["light"], str(q % cap))
        rec = decode_record(blob)                              # RecordFormatError if half-written
        if light == b"":                                       # a record without keys/values is stored once
            assert not set(KV_TENSORS) & set(rec.tensors)
            lrec = rec
        else:
            lrec = decode_record(light)
            assert lrec.meta.get("light") is True
        assert rec.seq == q == lrec.seq and rec.pts == score == lrec.pts
        assert not set(KV_TENSORS) & set(lrec.tensors)
        tok = r.hget(k["tokens"], str(q % cap))
        assert tok == encode_record(token_record(rec))        # the token copy of this very record
        used, lused = used + len(blob), lused + len(light) + len(tok)
        records[q] = rec
    assert int(h["bytes_used"]) == used and int(h["light_bytes"]) == lused
    assert int(h["evicted"]) == nxt - count == r.zcard(k["evicted"]) + int(h["ev_collapsed"])
    if count:
        assert float(h["last_pts"]) == members[-1][1]
    return {**h, "records": records}


# --------------------------------------------------------------------------- layout
def test_key_layout_hash_tags_and_total_counter(redis_server) -> None:
    prefix = _prefix()
    cache = RedisFrameCache.from_url(redis_server.url, prefix=prefix)
    r = redis_server.client()
    try:
        cache.create_stream("cam-1", 4, meta={"fps": 2})
        cache.create_stream("b.2", 3)
        cache.append_many("cam-1", [_rec(i) for i in range(7)])
        cache.append_many("b.2", [_rec(i) for i in range(2)])
        keys = sorted(k.decode() for k in r.scan_iter(match=f"{prefix}:*"))
        assert keys == sorted([f"{prefix}:streams", f"{prefix}:total_bytes"]
                              + [f"{prefix}:{{cam-1}}:{p}" for p in PARTS]
                              + [f"{prefix}:{{b.2}}:{p}" for p in PARTS if p != "evicted"])  # none evicted yet
        for sid in ("cam-1", "b.2"):  # one hash tag per stream: one cluster slot
            slots = {key_slot(stream_key(sid, p, prefix=prefix).encode()) for p in PARTS}
            assert len(slots) == 1
        assert r.type(f"{prefix}:{{cam-1}}:meta") == b"hash" and r.type(f"{prefix}:{{cam-1}}:pts") == b"zset"
        assert r.zrange(f"{prefix}:{{cam-1}}:pts", 0, -1) == [b"%016d" % q for q in range(3, 7)]
        assert r.zrange(f"{prefix}:{{cam-1}}:evicted", 0, -1) == [b"%016d" % q for q in range(3)]
        h = check_integrity(r, prefix, "cam-1")
        assert json.loads(h["meta"]) == {"fps": 2} and h["version"] == "1" and h["on_full"] == "overwrite"
        check_integrity(r, prefix, "b.2")
        total = cache.stats()["total_bytes"]
        assert int(r.get(f"{prefix}:total_bytes")) == total > 0
        cache.delete_stream("cam-1")
        assert int(r.get(f"{prefix}:total_bytes")) == cache.stream_info("b.2").bytes_used
        assert not list(r.scan_iter(match=f"{prefix}:{{cam-1}}:*"))
        # the listing set may hold an id whose meta is gone (a crash between two commands)
        r.sadd(f"{prefix}:streams", "ghost")
        assert cache.streams() == ["b.2"] and list(cache.stats()["streams"]) == ["b.2"]
        with pytest.raises(StreamNotFound, match="'ghost'"):
            cache.stream_info("ghost")
        st = cache.stats()
        assert st["backend"] == "redis" and st["redis"]["used_memory"] > 0 and st["streams"]["b.2"]["redis_bytes"] > 0
    finally:
        cache.close()
        r.close()


def test_from_url_open_cache_and_arguments(redis_server) -> None:
    c = open_cache(redis_server.url, prefix=_prefix(), pts_history=16)
    assert isinstance(c, RedisFrameCache) and c.backend == "redis" and c.pts_history == 16 and not c.cluster
    c.close()
    with pytest.raises(CacheError, match="closed"):
        c.streams()
    with pytest.raises(BadArgument, match="decode_responses"):
        RedisFrameCache(redis.Redis(port=redis_server.port, decode_responses=True))
    with pytest.raises(BadArgument, match="key prefix"):
        RedisFrameCache.from_url(redis_server.url, prefix="a{b}")
    with pytest.raises(BadArgument, match="cluster"):
        RedisFrameCache.from_url(redis_server.url + "?cluster=maybe")
    with pytest.raises(BadArgument, match="Redis URL"):
        RedisFrameCache.from_url("localhost:6379")
    # a client the caller made stays the caller's: close() leaves it open
    mine = redis_server.client()
    c = RedisFrameCache(mine, prefix=_prefix())
    c.create_stream("s", 2)
    c.close()
    assert mine.ping()
    mine.close()
    # nobody listening: CacheUnavailable at once, naming the URL and the operation, no password
    dead = RedisFrameCache.from_url(f"redis://user:secret@127.0.0.1:{_closed_port()}/0", prefix=_prefix())
    t0 = time.monotonic()
    with pytest.raises(CacheUnavailable) as ei:
        dead.stream_info("s")
    assert time.monotonic() - t0 < 3
    assert "redis://user@127.0.0.1:" in ei.value.message and "secret" not in ei.value.message
    assert "reading the info of stream 's'" in ei.value.message and "\n" not in str(ei.value)
    dead.close()


def _closed_port() -> int:
    from redis_servers import free_port
    return free_port()


def test_resent_append_is_not_stored_twice(redis_server) -> None:
    """A lost reply: redis-py re-sends the very same EVALSHA; the batch id makes it a no-op."""
    prefix = _prefix()
    cache = RedisFrameCache.from_url(redis_server.url, prefix=prefix)
    r = redis_server.client()
    try:
        cache.create_stream("s", 8)
        cache.append("s", _rec(0))
        from frame_cache import encode_record, light_record
        from dataclasses import replace
        full = replace(_rec(1), seq=1)
        args = ["", 1, "batch-1", 100, "", 1, repr(1.0), encode_record(full), encode_record(light_record(full)),
                encode_record(token_record(full))]
        keys = cache._keys("s", total=True)
        assert cache._s_append(keys=keys, args=args) == [b"OK", b"1"]
        assert cache._s_append(keys=keys, args=args) == [b"DONE", b"1", b"1"]  # the re-send
        assert cache._s_append(keys=keys, args=[*args[:2], "batch-2", *args[3:]]) == [b"RETRY", b"2"]
        assert cache.stream_info("s").total_appended == 2 and cache.append("s", _rec(2)) == 2
        check_integrity(r, prefix, "s")
    finally:
        cache.close()
        r.close()


def test_a_stream_stored_before_token_copies_reads_its_tokens_from_its_light_copies(redis_server) -> None:
    """Redis data kept from a version without the ``tokens`` hash (an AOF across an upgrade): a token read
    of such a frame gives its light copy (which holds the token too), frames appended since give their
    token copies, and the byte counters stay the sums of what is stored as the old frames are overwritten."""
    prefix = _prefix()
    cache = RedisFrameCache.from_url(redis_server.url, prefix=prefix)
    r = redis_server.client()
    try:
        cache.create_stream("old", 4)
        cache.append_many("old", [_rec(i) for i in range(4)])
        light = cache.read("old", range(4), light=True)
        k = {p: stream_key("old", p, prefix=prefix) for p in PARTS}
        r.delete(k["tokens"])                                  # as the older version stored it
        r.hset(k["meta"], "light_bytes", sum(map(len, light)))
        assert cache.read("old", range(4), tokens=True) == light
        cache.append_many("old", [_rec(4), _rec(5)])          # overwrite seqs 0 and 1
        got = cache.read("old", range(6), tokens=True)
        assert got[:2] == [None, None] and got[2:4] == light[2:4]
        assert [(decode_record(b).seq, decode_record(b).meta) for b in got[4:]] == \
            [(4, {"i": 4, "light": True}), (5, {"i": 5, "light": True})]
        assert got[4] == encode_record(token_record(replace(_rec(4), seq=4)))
        lused = sum(map(len, cache.read("old", range(2, 6), light=True))) + len(got[4]) + len(got[5])
        assert cache.stream_info("old").light_bytes == lused
        # a slot whose token copy is another frame's (an older writer replaced the record, not its token
        # copy): the light copy again, never "overwritten"
        r.hset(k["tokens"], "2", got[4])
        assert cache.read("old", [2, 3, 4], tokens=True) == [light[2], light[3], got[4]]
    finally:
        cache.close()
        r.close()


def test_large_snapshots_and_chunked_snapshot_reads(redis_server) -> None:
    """Snapshots over ``snapshot_script_bytes`` are read in chunks, each record checked
    against its seq and the whole read redone when a frame was overwritten meanwhile; the
    result is the same as one script's. Also: more fields than one Lua ``unpack`` takes."""
    prefix = _prefix()
    one = RedisFrameCache.from_url(redis_server.url, prefix=prefix)
    chunked = RedisFrameCache.from_url(redis_server.url, prefix=prefix, snapshot_script_bytes=1)
    try:
        one.create_stream("big", 1500)
        n = 1200
        for i in range(0, n, 200):
            one.append_many("big", [_rec(j, j * 0.5, kv=4) for j in range(i, i + 200)])
        a = one.snapshot("big")
        b = chunked.snapshot("big")
        assert a.seqs() == b.seqs() == list(range(n)) and a.blobs == b.blobs and a.pts() == b.pts()
        assert chunked.snapshot("big", 10.0, 20.0, max_frames=5).seqs() == list(range(36, 41))
        assert chunked.latest("big", 7).blobs == a.blobs[-7:]
        assert [record_seq(x) for x in one.read("big", range(n))] == list(range(n))
        assert one.read("big", range(n), light=True)[n - 1] is not None

        # a writer overwriting a small ring while big chunked snapshots are taken
        one.create_stream("ring", 30)
        one.append_many("ring", [_rec(j, j * 0.5) for j in range(30)])
        stop, errors = threading.Event(), []

        def writer() -> None:
            j = 30
            try:
                while not stop.is_set():
                    one.append("ring", _rec(j, j * 0.5))
                    j += 1
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=writer)
        t.start()
        try:
            for _ in range(30):
                snap = chunked.snapshot("ring")
                assert len(snap) == 30 and [r.seq for r in snap] == snap.seqs()
                assert all(r.meta["i"] == q and r.pts == q * 0.5 for q, r in zip(snap.seqs(), snap.records))
                assert snap.dropped_before == snap.first_seq
        finally:
            stop.set()
            t.join(timeout=20)
        assert not errors, repr(errors[0])
    finally:
        one.close()
        chunked.close()


# --------------------------------------------------------------------------- concurrency
def test_concurrent_writers_and_readers(redis_server) -> None:
    """Fenced writers on their own streams, two unfenced writers racing on one stream (the
    RETRY path), readers taking snapshots, windows + chunks and latest; every view checked."""
    prefix = _prefix()
    shared = RedisFrameCache.from_url(redis_server.url, prefix=prefix)
    r = redis_server.client()
    own_streams, n_own, n_race = ["a", "b", "c"], 300, 150
    for sid in own_streams:
        shared.create_stream(sid, 40)
    shared.create_stream("race", 2 * n_race)
    errors: list[BaseException] = []
    done = threading.Event()
    checked = {"snap": 0, "chunks": 0, "missing": 0}

    def check_snapshot(sid: str, snap) -> None:
        seqs = snap.seqs()
        assert len(snap) <= 40 and snap.pts() == sorted(snap.pts())
        for q, p, rec in zip(seqs, snap.pts(), snap.records):
            assert rec.seq == q and rec.pts == p == q * 0.5 and rec.meta == {"i": q}
            assert rec.tensors["idx"].item() == q and torch.equal(rec.tensors["k"], torch.full((64,), float(q)))

    def own_writer(sid: str) -> None:
        c = RedisFrameCache.from_url(redis_server.url, prefix=prefix)  # like another process
        try:
            tok = c.acquire_writer(sid)
            i = 0
            while i < n_own:
                k = random.Random(i).randint(1, 3)
                batch = [_rec(j, j * 0.5) for j in range(i, min(n_own, i + k))]
                assert c.append_many(sid, batch, writer=tok, seq=i) == list(range(i, i + len(batch)))
                i += len(batch)
        except BaseException as e:
            errors.append(e)
        finally:
            c.close()

    def racer(w: int) -> None:
        try:
            for j in range(n_race):
                rec = FrameRecord(pts=0.0, tensors={"x": torch.tensor([w, j])}, meta={"w": w, "j": j})
                shared.append("race", rec)
        except BaseException as e:
            errors.append(e)

    def reader(k: int) -> None:
        rng = random.Random(k)
        try:
            while not done.is_set() or checked["snap"] < 10:
                sid = rng.choice(own_streams)
                x = rng.random()
                if x < 0.3:
                    check_snapshot(sid, shared.latest(sid, rng.randint(1, 50)))
                elif x < 0.6:
                    a = rng.uniform(0, n_own * 0.5)
                    snap = shared.snapshot(sid, a, a + rng.uniform(0, 15))
                    check_snapshot(sid, snap)
                    if len(snap):  # frames requested but missing must have been overwritten
                        assert snap.dropped_before == max(0, snap.first_seq - int(-(-2 * a // 1)))
                    checked["snap"] += 1
                else:
                    w = shared.window(sid)
                    chunks = list(w.chunks(shared, 7, light=rng.random() < 0.5))
                    for ch in chunks:  # overwritten frames are the oldest ones: missing come first
                        assert ch.missing + ch.seqs == list(range(ch.missing[0] if ch.missing else ch.seqs[0],
                                                                  (ch.seqs or ch.missing)[-1] + 1))
                        for q, p, rec in zip(ch.seqs, ch.pts, ch.records()):
                            assert rec.seq == q and rec.pts == p == q * 0.5 and rec.meta["i"] == q
                    assert [q for ch in chunks for q in ch.missing + ch.seqs] == list(w.seqs())
                    checked["chunks"] += 1
                    checked["missing"] += sum(len(ch.missing) for ch in chunks)
        except BaseException as e:
            errors.append(e)

    writers = [threading.Thread(target=own_writer, args=(s,)) for s in own_streams]
    writers += [threading.Thread(target=racer, args=(w,)) for w in range(2)]
    readers = [threading.Thread(target=reader, args=(k,)) for k in range(2)]
    try:
        for t in writers + readers:
            t.start()
        for t in writers:
            t.join(timeout=60)
        done.set()
        for t in readers:
            t.join(timeout=60)
        assert not errors, repr(errors[0])
        assert checked["snap"] >= 10 and checked["chunks"] >= 1
        retries = shared.stats()["append_retries"]
        print(f"\nconcurrency: {checked}, append retries {retries}")
        assert retries > 0, "expected the two unfenced writers of 'race' to collide at least once"
        for sid in own_streams:
            h = check_integrity(r, prefix, sid)
            assert int(h["next_seq"]) == n_own and sorted(h["records"]) == list(range(n_own - 40, n_own))
            assert int(h["writer"]) == 1
        h = check_integrity(r, prefix, "race")
        got = [(rec.meta["w"], rec.meta["j"]) for _, rec in sorted(h["records"].items())]
        assert len(got) == 2 * n_race and len(set(got)) == 2 * n_race  # every append exactly once
        for w in range(2):  # and each writer's appends in its own order
            assert [j for ww, j in got if ww == w] == list(range(n_race))
    finally:
        shared.close()
        r.close()


# --------------------------------------------------------------------------- crash and outage
def test_lmstream_serve_starts_its_own_redis_again_when_it_dies(tmp_path, capsys, monkeypatch) -> None:
    """`lmstream serve`'s own redis-server, killed: it stayed a zombie and the service answered 503 until
    restarted by hand, nothing said. The serve loop's `_restart_redis` starts it again on its port with its
    AOF (what was written is there, a client of the old one goes on), and gives up with `E_CACHE_UNAVAILABLE`
    (exit 6) when it keeps dying."""
    from lmstream import serve_cmd
    from lmcore.errors import CacheUnavailable as Unavailable
    monkeypatch.setattr(serve_cmd, "_redis_restarts", [])
    srv = RedisServer(tmp_path / "redis").start()
    try:
        c = srv.client()
        c.set("kept", "1")
        c.execute_command("BGREWRITEAOF")                  # durable before the kill (AOF fsync every second)
        time.sleep(1.5)
        port, pid = srv.port, srv.pid
        os.kill(pid, signal.SIGKILL)
        srv.proc.wait(10)
        assert srv.proc.poll() is not None
        serve_cmd._restart_redis(srv, tmp_path / "redis")
        assert srv.port == port and srv.pid != pid and c.get("kept") == b"1"      # the old client reconnects
        err = capsys.readouterr().err
        assert f"redis-server pid {pid} exited with status -9; starting it again on {srv.url}" in err, err
        monkeypatch.setattr(serve_cmd, "REDIS_RESTARTS", 1)
        srv.kill9()
        with pytest.raises(Unavailable, match="expected the service's redis-server to keep running, got it "
                                              "exited 2 times in 300 s"):
            serve_cmd._restart_redis(srv, tmp_path / "redis")
        c.close()
    finally:
        srv.stop()


def test_kill9_with_aof_everysec_then_restart(server: RedisServer) -> None:
    prefix = _prefix()
    cache = RedisFrameCache.from_url(server.url, prefix=prefix)
    cache.create_stream("live", 100_000)
    acked: list[tuple[int, float]] = []  # (seq, monotonic time its append returned)
    failed: list[BaseException] = []
    stop = threading.Event()
    nxt = [0]

    def writer() -> None:
        while not stop.is_set():
            i = nxt[0]
            try:  # every 10th frame is large (256 KB of k/v): real AOF traffic
                seqs = cache.append_many("live", [_rec(i, kv=32768 if i % 10 == 0 else 64)], seq=i)
            except CacheUnavailable as e:
                failed.append(e)
                return
            acked.append((seqs[0], time.monotonic()))
            nxt[0] = i + 1

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(2.5)
    t_kill = time.monotonic()
    server.kill9()
    t.join(timeout=20)
    stop.set()
    assert not t.is_alive() and failed, "expected the writer to get CacheUnavailable once Redis was killed"
    assert len(acked) > 50
    server.start()  # same folder: replays the AOF
    r = server.client()
    try:
        h = check_integrity(r, prefix, "live")  # no half-written record, counters match the slots
        total = int(h["next_seq"])
        assert any(ta < t_kill - 1.5 for _, ta in acked), "expected appends acknowledged > 1.5 s before the kill"
        lost = [(q, round(t_kill - ta, 3)) for q, ta in acked if q >= total]
        assert all(ago < 1.5 for _, ago in lost), f"expected every append acknowledged > 1.5 s before the kill " \
            f"back, got {total} frames; lost (seq, s before the kill): {lost[:5]}"
        assert all(h["records"][q].meta == {"i": q} for q in range(total))
        print(f"\nkill -9: {len(acked)} appends acknowledged, {total} frames back, {len(lost)} acknowledged lost")
        # the writer's pending append (its reply lost in the crash) retried with seq=: stored once
        i = min(nxt[0], total)
        assert cache.append_many("live", [_rec(i)], seq=i) == [i]  # the same cache object reconnects
        assert cache.append_many("live", [_rec(i)], seq=i) == [i]
        h = check_integrity(r, prefix, "live")
        assert int(h["next_seq"]) == i + 1 and all(rec.meta == {"i": q} for q, rec in h["records"].items())
    finally:
        cache.close()
        r.close()


def _aof_written(server: RedisServer, timeout: float = 10.0) -> None:
    """Wait until Redis has written its AOF buffer to the file, so a SIGKILL keeps what was acked.
    With `appendfsync everysec` it may hold the buffer up to 2 s while a background fsync runs (a
    busy disk): an append acked just before a kill -9 can then be lost, which is the documented
    trade-off (test_kill9_with_aof_everysec_then_restart holds appends acked > 1.5 s before the
    kill), not a bug."""
    r = server.client()
    deadline = time.monotonic() + timeout
    try:
        while True:
            info = r.info("persistence")
            written = info["aof_buffer_length"] == 0 and info["aof_pending_bio_fsync"] == 0
            if written and not info["aof_rewrite_in_progress"]:
                return
            assert time.monotonic() < deadline, f"expected Redis to write its AOF within {timeout} s, got {info}"
            time.sleep(0.05)
    finally:
        r.close()


def test_redis_down_frozen_and_out_of_memory(server: RedisServer) -> None:
    prefix = _prefix()
    cache = RedisFrameCache.from_url(server.url, prefix=prefix)
    cache.create_stream("s", 8)
    cache.append_many("s", [_rec(i) for i in range(5)])
    before = cache.snapshot("s").blobs
    _aof_written(server)

    # -- down: every method raises CacheUnavailable quickly, nothing hangs
    server.kill9()
    calls = {
        "create_stream": lambda: cache.create_stream("t", 2),
        "acquire_writer": lambda: cache.acquire_writer("s"),
        "append": lambda: cache.append("s", _rec(5)),
        "append_many": lambda: cache.append_many("s", [_rec(5), _rec(6)], seq=5),
        "window": lambda: cache.window("s"),
        "read": lambda: cache.read("s", [1, 2]),
        "snapshot": lambda: cache.snapshot("s", 0.0, 3.0),
        "latest": lambda: cache.latest("s", 2),
        "stream_info": lambda: cache.stream_info("s"),
        "streams": lambda: cache.streams(),
        "delete_stream": lambda: cache.delete_stream("s"),
        "stats": lambda: cache.stats(),
    }
    for name, call in calls.items():
        t0 = time.monotonic()
        with pytest.raises(CacheUnavailable) as ei:
            call()
        took = time.monotonic() - t0
        e = ei.value
        assert took < 3, f"{name} took {took:.1f} s to fail"
        assert e.code == "E_CACHE_UNAVAILABLE" and e.http_status == 503 and e.exit_code == 6
        assert f"127.0.0.1:{server.port}" in e.message and e.message.startswith("expected ")
        assert "\n" not in str(e) and "Traceback" not in str(e)
    server.start()
    assert cache.snapshot("s").blobs == before  # still there after the restart (AOF)
    assert cache.streams() == ["s"] and cache.append("s", _rec(5)) == 5

    # -- frozen (SIGSTOP): a short socket timeout turns into CacheUnavailable, no hang
    quick = RedisFrameCache.from_url(server.url, prefix=prefix, socket_timeout=0.5, socket_connect_timeout=0.5)
    server.pause()
    try:
        for call in (lambda: quick.snapshot("s"), lambda: quick.append("s", _rec(6), seq=6)):
            t0 = time.monotonic()
            with pytest.raises(CacheUnavailable, match="Timeout"):
                call()
            assert time.monotonic() - t0 < 3
    finally:
        server.resume()
    # the append may or may not have reached Redis: a retry with seq= settles it, no duplicate
    assert quick.append("s", _rec(6), seq=6) == 6
    info = quick.stream_info("s")
    assert info.total_appended == 7 and [rec.meta["i"] for rec in quick.snapshot("s")] == list(range(7))
    quick.close()

    # -- out of memory (maxmemory below what is used, noeviction): writes refused, reads fine
    r = server.client()
    try:
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", max(1 << 20, int(r.info("memory")["used_memory"]) - 1))
        snap = cache.snapshot("s")
        with pytest.raises(CacheBudgetExceeded, match="maxmemory") as ei:
            cache.append("s", _rec(7, kv=1 << 16))
        assert "nothing was stored" in ei.value.message and ei.value.code == "E_CACHE_BUDGET"
        with pytest.raises(CacheBudgetExceeded):
            cache.create_stream("new", 4)
        assert cache.snapshot("s").blobs == snap.blobs and cache.stream_info("s").total_appended == 7
        assert [record_seq(b) for b in cache.read("s", [5, 6], light=True)] == [5, 6]
        cache.delete_stream("s")  # deleting is allowed under OOM: the way out
        assert cache.streams() == []
    finally:
        r.config_set("maxmemory", 0)
        r.close()
    cache.create_stream("s", 2)
    assert cache.append("s", _rec(0)) == 0
    r = server.client()
    check_integrity(r, prefix, "s")
    r.close()
    cache.close()


# --------------------------------------------------------------------------- Redis Cluster
def _exists_here(node: redis.Redis, key: str) -> bool:
    """Whether this cluster node holds ``key`` (a node not serving its slot answers MOVED)."""
    try:
        return bool(node.exists(key))
    except redis.exceptions.MovedError:
        return False


def test_redis_cluster_three_masters(tmp_path) -> None:
    missing = redis_binaries_missing()
    if missing:
        pytest.fail(missing, pytrace=False)
    with RedisClusterServers(tmp_path / "cluster") as cl:
        with pytest.raises(BadArgument, match="max_bytes_total"):
            RedisFrameCache.from_url(cl.url, max_bytes_total=1 << 20)
        detected = RedisFrameCache.from_url(cl.nodes[2].url)  # no ?cluster=1: asks the server
        assert detected.cluster and detected.url.endswith("?cluster=1")
        detected.close()
        cache = RedisFrameCache.from_url(cl.url, max_bytes_per_stream=1 << 20)
        plain = [node.client() for node in cl.nodes]
        try:
            assert cache.cluster and cache.url.endswith("?cluster=1")
            sids = [f"cam-{k}" for k in range(12)]
            holders = set()
            for n, sid in enumerate(sids):
                keyslots = {plain[0].execute_command("CLUSTER", "KEYSLOT", stream_key(sid, p)) for p in PARTS}
                assert len(keyslots) == 1, (sid, keyslots)
                cache.create_stream(sid, 6, meta={"n": n})
                tok = cache.acquire_writer(sid)
                assert cache.append_many(sid, [_rec(i) for i in range(4)], writer=tok) == [0, 1, 2, 3]
                assert cache.append_many(sid, [_rec(i) for i in range(3, 9)], writer=tok, seq=3) == list(range(3, 9))
                # all of the stream's keys are on the one master that owns its slot
                on = [i for i, c in enumerate(plain) if _exists_here(c, stream_key(sid, "meta"))]
                assert len(on) == 1 and all(plain[on[0]].exists(stream_key(sid, p)) for p in PARTS[1:4])
                holders.add(on[0])
            assert len(holders) >= 2, "expected 12 streams to spread over several masters"
            assert cache.streams() == sorted(sids)
            for sid in sids:
                w = cache.window(sid, 1.0, 5.0)  # frames 0, 1, 2 overwritten
                assert list(w.seqs()) == [3, 4, 5] and w.dropped_before == 2 and w.pts_list == (3.0, 4.0, 5.0)
                assert [ch.seqs for ch in w.chunks(cache, 2)] == [[3, 4], [5]]
                snap = cache.snapshot(sid)
                assert snap.seqs() == [3, 4, 5, 6, 7, 8] and [r.meta["i"] for r in snap] == list(range(3, 9))
                assert cache.latest(sid, 2).seqs() == [7, 8]
                lights = cache.read(sid, [2, 3, 8], light=True)
                assert lights[0] is None and [record_seq(b) for b in lights[1:]] == [3, 8]
                info = cache.stream_info(sid)
                assert (info.total_appended, info.count, info.writer, info.max_bytes) == (9, 6, 1, 1 << 20)
            st = cache.stats()
            assert st["num_streams"] == 12 and st["total_frames"] == 72 and st["redis"]["nodes"] == 3
            with pytest.raises(CacheBudgetExceeded, match="for stream 'cam-0'"):
                cache.append("cam-0", _rec(9, kv=1 << 18))
            for sid in sids[:6]:
                cache.delete_stream(sid)
            assert cache.streams() == sorted(sids[6:])
            with pytest.raises(StreamNotFound):
                cache.snapshot(sids[0])
            # one master dies (and the others forgot their scripts): streams on the others still
            # work, at least until the cluster marks itself failed (node timeout 5 s); its own
            # streams fail fast with CacheUnavailable
            home = {sid: next(i for i, c in enumerate(plain) if _exists_here(c, stream_key(sid, "meta")))
                    for sid in sids[6:]}
            dead = home[sids[6]]
            for i, c in enumerate(plain):
                if i != dead:
                    c.script_flush()
            cl.nodes[dead].kill9()
            t0 = time.monotonic()
            for sid, i in home.items():
                if i == dead:
                    with pytest.raises(CacheUnavailable, match=f"stream '{sid}'"):
                        cache.latest(sid, 1)
                else:
                    assert cache.latest(sid, 1).seqs() == [8] and cache.append(sid, _rec(9)) == 9
            assert time.monotonic() - t0 < 3
        finally:
            cache.close()
            for c in plain:
                c.close()

