"""Engine features the service relies on: token streaming that stops when the consumer goes away,
questions from several threads, and frames of several streams encoded in one batch."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from conftest import frames


def test_streamed_pieces_concatenate_to_the_answer(tiny_model):
    m = tiny_model
    st = m.encode_frames(frames(4, seed=8), pts=[0.0, 1.0, 2.0, 3.0])
    events = list(m.stream_answer(st, "what colour is the circle ?", max_new_tokens=6))
    kinds = [e[0] for e in events]
    assert kinds == ["token"] * (len(events) - 1) + ["answer"]
    ans = events[-1][1]
    assert "".join(e[2] for e in events[:-1]) == ans.text
    assert [e[1] for e in events[:-1]] == ans.token_ids
    assert ans.token_ids == m.ask(st, "what colour is the circle ?", max_new_tokens=6).token_ids
    assert ans.finish_reason in ("stop", "length")


def _count_llm_calls(m, monkeypatch) -> dict:
    """{"n": LLM forward passes of `m` so far}, counted from now on (a prefill is 1, each later token 1)."""
    calls = {"n": 0}
    real = m._llm

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(m, "_llm", counting)
    return calls


def test_closing_the_stream_runs_no_more_llm_steps(tiny_model, monkeypatch):
    m = tiny_model
    st = m.encode_frames(frames(3, seed=9))
    calls = _count_llm_calls(m, monkeypatch)
    m.stop_token_ids, saved = [], m.stop_token_ids        # no stop token: it would run all 20 steps
    try:
        gen = m.stream_answer(st, "what is in the video ?", max_new_tokens=20)
        assert next(gen)[0] == "token"
        after_first = calls["n"]                          # the prefill (1 call)
        gen.close()
        assert calls["n"] == after_first == 1
        full = list(m.stream_answer(st, "what is in the video ?", max_new_tokens=20))
        assert len(full) == 21 and calls["n"] == 1 + 20   # the first run's prefill; this run's prefill + 19 steps
    finally:
        m.stop_token_ids = saved


def test_a_stop_string_ends_generation_at_the_token_that_completes_it(tiny_model, monkeypatch):
    """`stop` (the chat route's): the answer ends before the first stop string complete, finish_reason
    "stop", and no LLM step runs after the token completing it (the model had run on to its own end)."""
    from lmcore.stops import cut_at_stop
    m = tiny_model
    st = m.encode_frames(frames(3, seed=11))
    calls = _count_llm_calls(m, monkeypatch)
    monkeypatch.setattr(m, "stop_token_ids", [])          # no stop token: 20 steps unless a stop string
    q = "what is in the video ?"
    full = list(m.stream_answer(st, q, max_new_tokens=20))
    pieces = [e[2] for e in full[:-1]]
    text = full[-1][1].text
    assert len(text) >= 6, text
    stop = text[len(text) // 2:len(text) // 2 + 2]           # two characters from the middle
    k = next(i for i in range(1, len(pieces) + 1) if cut_at_stop("".join(pieces[:i]), [stop])[1])
    calls["n"] = 0
    got = list(m.stream_answer(st, q, max_new_tokens=20, stop=[stop, "never-said"]))
    ans = got[-1][1]
    assert len(got) == k + 1 and calls["n"] == k, (k, calls, stop, text)   # prefill + k-1 steps
    assert ans.text == text[:text.find(stop)] and ans.finish_reason == "stop", (ans.text, stop, text)
    assert ans.token_ids == full[-1][1].token_ids[:k] and k < 20
    assert list(m.stream_answer(st, q, max_new_tokens=20, stop=["never-said"]))[-1][1].text == text


def test_a_cancelled_question_stops_mid_fusion_and_while_waiting_for_the_model(tiny_model, monkeypatch):
    """A question whose client went away stops at the engine's next check: between the frame chunks it is
    fused with, and while it waits for the model's lock behind other questions. It had run its whole
    prefill (a helper measured minutes of fusion for long questions over 342 frames, every later question
    waiting behind it)."""
    import asyncio
    import time

    from deploy.serving import answer_events_in_thread
    from lmcore import cancel
    m = tiny_model
    st = m.encode_frames(frames(6, seed=12))
    calls = {"n": 0}
    real = m._fuse_chunk
    ev = threading.Event()

    def counting(*a, **k):
        calls["n"] += 1
        ev.set()                                          # the client goes away during the first chunk
        return real(*a, **k)

    monkeypatch.setattr(m, "_fuse_chunk", counting)
    monkeypatch.setattr(m, "question_chunk", 2)            # 6 frames: 3 chunks
    with cancel.scope(ev), pytest.raises(cancel.Cancelled):
        list(m.stream_answer(st, "what is in the video ?", max_new_tokens=4))
    assert calls["n"] == 1
    ev.clear()
    assert list(m.stream_answer(st, "what is in the video ?", max_new_tokens=1))[-1][0] == "answer"
    assert calls["n"] == 4                                  # outside a scope: no check stops it

    # a question queued behind the model's lock: its consumer goes away, its thread ends without fusing
    def events():
        for kind, *_ in m.stream_answer(st, "what is in the video ?", max_new_tokens=4):
            yield {"type": kind}

    async def main():
        agen = answer_events_in_thread(events)
        task = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0.3)
        assert not task.done()                             # waiting for the lock
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await agen.aclose()

    calls["n"] = 0
    m.lock.acquire()
    try:
        before = {t for t in threading.enumerate() if t.name == "lms-answer"}
        asyncio.run(main())
        workers = [t for t in threading.enumerate() if t.name == "lms-answer" and t not in before]
        t0 = time.monotonic()
        for t in workers:
            t.join(5)
        assert not any(t.is_alive() for t in workers) and time.monotonic() - t0 < 2, workers
    finally:
        m.lock.release()
    assert calls["n"] == 0                                  # it never fused: it stopped while waiting


def test_questions_from_threads_equal_serial_answers(tiny_model):
    m = tiny_model
    st = m.encode_frames(frames(6, seed=10))
    qs = ["what colour is the circle ?", "how many objects are there ?", "is there a red square ?"] * 2
    serial = [m.ask(st, q, max_new_tokens=5).token_ids for q in qs]
    out = [None] * len(qs)

    def work(i):
        out[i] = m.ask(st, qs[i], max_new_tokens=5).token_ids

    ths = [threading.Thread(target=work, args=(i,)) for i in range(len(qs))]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert out == serial


def test_frames_of_several_streams_in_one_batch(tiny_model):
    m = tiny_model
    a, b, c = frames(3, seed=1), frames(5, seed=2), frames(1, seed=3)
    parts = m.encode_frames_multi([a, b, c], [[0.0, 1.0, 2.0], [10.0 + i for i in range(5)], [7.0]], batch_size=4)
    assert [len(p) for p in parts] == [3, 5, 1]
    for px, got, pts in zip((a, b, c), parts, ([0.0, 1.0, 2.0], [10.0 + i for i in range(5)], [7.0])):
        want = m.encode_frames(px, pts=pts)
        assert torch.allclose(got.tokens, want.tokens, atol=1e-6) and torch.allclose(got.keys, want.keys, atol=1e-6)
        assert got.pts.tolist() == pts


@pytest.mark.filterwarnings("ignore::DeprecationWarning")    # Ray Serve's own pydantic fields, at import
def test_file_jobs_take_decoders_in_the_order_they_asked(monkeypatch):
    """The Ingress's decoder pool (`RayBackend._take_source`), without Ray: decoders stand in as objects
    whose `warm` has ended. Three jobs wait while every decoder is busy; one arrives as the first decoder
    is given back. Each decoder given back goes to the job that has waited longest: before, the newcomer,
    whose first look came before the waiters woke, took it."""
    import asyncio
    import collections
    import itertools
    from types import SimpleNamespace

    from deploy import app as A

    monkeypatch.setattr(A, "REFILL_AFTER_S", 3600.0)      # no decoder starts for the waiters meanwhile

    async def scenario() -> list[str]:
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)

        def decoder(name):
            return (SimpleNamespace(name=name, ping=SimpleNamespace(remote=lambda: done)), name, done)

        b = object.__new__(A.RayBackend)
        b.settings = SimpleNamespace(warm_decoders=0)
        b._spares, b._waiting, b._born, b._pool_changed = [], 0, {}, asyncio.Event()
        b._line, b._tickets = collections.deque(), itertools.count()
        b._sources = {"running": (None, object())}         # a decoder is busy
        b._started = lambda entry: entry[2].done()
        b._new_source = lambda warm=True: pytest.fail("no decoder should start here")
        got: list[str] = []

        async def job(label):
            actor, name = await b._take_source()
            got.append(f"{label}:{name}")

        async def until(cond):
            for _ in range(1000):
                if cond():
                    return
                await asyncio.sleep(0.01)
            pytest.fail(f"the pool did not get there: got {got}, line {list(b._line)}")

        tasks = []
        for label in "ABC":                                # they ask one after the other, each then waits
            tasks.append(asyncio.create_task(job(label)))
            await until(lambda: b._waiting == len(tasks))
        b._give_back(*decoder("d1"))                       # as a fourth job arrives
        tasks.append(asyncio.create_task(job("D")))
        for i, name in enumerate(("d2", "d3", "d4")):      # each given back once the one before was taken
            await until(lambda: len(got) == i + 1)
            b._give_back(*decoder(name))
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert not b._line and b._waiting == 0
        return got

    assert asyncio.run(scenario()) == ["A:d1", "B:d2", "C:d3", "D:d4"]


def test_answer_gaps_merge_and_where_a_continued_stream_starts():
    """`merge_gaps`: one gap for those that overlap, two for two that only touch (where they meet is a stored
    frame: shed frames around the one stored at 25 s were merged into a gap over it);
    `continued_timeline`: a new source of a stream starts after its newest frame by the time nothing fed
    it, the outage a gap; `clip_gaps`: an answer's gaps are those inside its window, cut at its edges (an
    operator's 40 s window said `[[184.63, 568.33]]`, an outage merged with the ring's overwritten span)."""
    import math
    from deploy.serving import clip_gaps, continued_timeline, merge_gaps
    assert merge_gaps([[120.0, 129.0], [103.0, 128.0]]) == [[103.0, 129.0]]
    assert merge_gaps([[25.0, 46.0], [0.0, 25.0], [46.0, 56.0]]) == [[0.0, 25.0], [25.0, 46.0], [46.0, 56.0]]
    assert merge_gaps([[25.0, 46.0], [0.0, 25.0], [47.0, 56.0]], touching=True) == [[0.0, 46.0], [47.0, 56.0]]
    assert merge_gaps([[5.0, 6.0], [None, 2.0], [1.0, 3.0], [10.0, None], [12.0, 13.0]]) == [
        [None, 3.0], [5.0, 6.0], [10.0, None]]
    assert merge_gaps([]) == [] and merge_gaps([[1.0, 2.0], [3.0, 4.0]]) == [[1.0, 2.0], [3.0, 4.0]]
    assert clip_gaps([[184.63, 568.33]], 560.0, 600.0) == [[560.0, 568.33]]
    assert clip_gaps([[9.0, 19.04]], 0.0, 12.0) == [[9.0, 12.0]] and clip_gaps([[9.0, 19.04]], 11.0, 24.0) == [[11.0, 19.04]]
    assert clip_gaps([[1.0, 2.0], [30.0, None]], 5.0, 40.0) == [[30.0, 40.0]]          # before it: gone; open: to its end
    assert clip_gaps([[1.0, 2.0], [30.0, None]], 0.0, math.inf) == [[1.0, 2.0], [30.0, None]]
    assert clip_gaps([[None, 3.0]], -math.inf, math.inf) == [[None, 3.0]] and clip_gaps([[None, 3.0]], 1.0, 9.0) == [[1.0, 3.0]]
    assert continued_timeline(None, None, 1.0) == (0.0, None)
    assert continued_timeline(10.0, 1000.0, 1.0, now=1000.4) == (11.0, None)      # back at once: one period on
    assert continued_timeline(10.0, 1000.0, 2.0, now=1000.5) == (10.5, None)      # under 1.5 periods: no gap
    assert continued_timeline(10.0, 1000.0, 1.0, now=1020.0) == (30.0, [10.0, 30.0])
    assert continued_timeline(10.0, None, 1.0, now=1020.0) == (11.0, None)        # no wall time kept: one period


def test_serve_yaml_args_misspelt_or_without_a_key_are_refused(monkeypatch):
    """`serve run deploy/serve.yaml` took `encoder_replica: 3` (misspelt) and left the default, and with no
    API key deployed a service that refused every request 401. Both are refused with what was expected."""
    from deploy.app import app_builder
    from deploy.settings import Settings
    from lmcore.errors import BadArgument
    monkeypatch.delenv("LMSTREAM_API_KEYS", raising=False)
    with pytest.raises(BadArgument, match=r"expected only known settings \(model, .*\), got 'encoder_replica'"):
        app_builder({"encoder_replica": 3, "api_keys": ["k"]})
    with pytest.raises(BadArgument, match="expected at least one API key .* got none: every request would be "
                                          "refused 401"):
        app_builder({"model": "checkpoints/demo"})
    with pytest.raises(Exception, match="extra"):              # the model itself: a dump with a stray field
        Settings.model_validate({**Settings().model_dump(), "encoder_replica": 3})


def test_service_settings_name_the_variable_a_bad_value_came_from(monkeypatch):
    from deploy.settings import Settings
    from lmcore.errors import BadArgument
    monkeypatch.setenv("LMSTREAM_SERVE_BATCH_WAIT_S", "soon")
    with pytest.raises(BadArgument, match=r"expected LMSTREAM_SERVE_BATCH_WAIT_S to be a number of seconds, "
                                          r"got 'soon'"):
        Settings.from_env()
    monkeypatch.setenv("LMSTREAM_SERVE_BATCH_WAIT_S", "20")
    with pytest.raises(BadArgument, match=r"LMSTREAM_SERVE_BATCH_WAIT_S \(serve_batch_wait_s\) to be valid: Input "
                                          r"should be less than or equal to 10, got 20"):
        Settings.from_env()
    assert Settings.from_env(serve_batch_wait_s=0.5).serve_batch_wait_s == 0.5     # an argument overrides it
    monkeypatch.delenv("LMSTREAM_SERVE_BATCH_WAIT_S")
    monkeypatch.setenv("LMSTREAM_LIMITS", '{"max_tokens": 7}')
    assert Settings.from_env().limits.max_tokens == 7
    with pytest.raises(BadArgument, match=r"expected limits to name only known limits .*got 'max_tokenz'"):
        Settings.from_env(limits={"max_tokenz": 3})


def test_metrics_count_every_model_replica_not_the_one_a_scrape_reaches(tiny_model, redis_server, tmp_path):
    """/metrics asked one Encoder replica for its totals through a handle, which reaches any replica: with
    two, each scrape showed one of them, a "total" going up and down. The replicas now add what they count
    to totals in Redis and report their levels there; /metrics reads those: two Encoders' frames are one
    counter, a report Redis did not take is sent with the next one, and a replica silent for a minute stops
    being counted."""
    import re
    import types

    import numpy as np
    from deploy.routes import Metrics
    from deploy.serving import AnswerCore, EncodeItem, EncoderCore, JobStore, ReplicaStats
    from deploy.settings import Settings
    from frame_cache.memory import InProcessFrameCache

    settings = Settings(redis_url=redis_server.url)
    store = JobStore(redis_server.url)
    store.r.delete(ReplicaStats.TOTALS, ReplicaStats.REPLICAS, ReplicaStats.SENT)
    cache = InProcessFrameCache()
    b = types.SimpleNamespace(cache=cache, store=store, live=types.SimpleNamespace(ids=lambda: []))

    def scrape() -> dict:
        text = Metrics().render(b).decode()
        names = r"^(lms_(?:encoder|local_kv|model|answer_context)\w*)(\{[^}]*\})? (\S+)$"
        return {f"{m[0]}{m[1]}": float(m[2]) for m in re.findall(names, text, re.M)}

    rng = np.random.default_rng(0)
    encoders = [EncoderCore(settings, model=tiny_model, cache=cache) for _ in range(2)]
    for i, (core, n) in enumerate(zip(encoders, (3, 5))):
        cache.create_stream(f"replicas-{i}", 64)
        out = core.encode([EncodeItem(f"replicas-{i}", rng.integers(0, 255, (n, 56, 56, 3), dtype=np.uint8),
                                      [float(t) for t in range(n)])])
        assert "seqs" in out[0], out
    m = scrape()
    assert m["lms_encoder_frames_total"] == 8 and m["lms_encoder_batches_total"] == 2, m
    assert m['lms_model_replicas{role="encoder"}'] == 2 and m['lms_model_replicas{role="answerer"}'] == 0, m

    # an answerer with a local tier: its hits and misses are counters, its bytes a level summed over replicas
    tiered = Settings(redis_url=redis_server.url, local_kv_bytes=1 << 20, data_dir=str(tmp_path))
    ans = AnswerCore(tiered, model=tiny_model, cache=cache)
    for _ in range(2):                                   # the first reads from the cache, the second locally
        events = list(ans.answer("replicas-1", "what colour is the circle ?", max_tokens=2, window=[0, 3]))
        assert events[-1]["type"] == "answer"
        assert ans.report_stats()
    m = scrape()
    st = ans.tier.stats()
    assert m["lms_local_kv_hits_total"] == st["hits"] > 0 and m["lms_local_kv_misses_total"] == st["misses"] > 0, m
    assert m["lms_local_kv_bytes"] == st["bytes"] > 0 and m["lms_local_kv_max_bytes"] == 1 << 20, m
    assert m['lms_local_kv_read_bytes_total{tier="local"}'] == st["bytes_local"] > 0, m
    assert m['lms_model_replicas{role="answerer"}'] == 1, m
    # the second question reused the first one's LLM head: a counter; the head's bytes a level
    cx = ans.contexts.stats()
    assert m["lms_answer_context_hits_total"] == cx["hits"] == 1 and m["lms_answer_context_misses_total"] == 1, m
    assert m["lms_answer_context_bytes"] == cx["bytes"] > 0, m

    # Redis did not take a report: nothing lost, it goes with the next one
    core = encoders[0]
    good = core.stats._client()
    core.stats._r = JobStore("redis://127.0.0.1:1/0", timeout=0.2).r
    core.frames_encoded += 4
    assert core.report_stats() is False
    core.stats._r = good
    assert core.report_stats() is True
    assert scrape()["lms_encoder_frames_total"] == 12
    # a report Redis took but whose reply was lost is sent again: counted once (it was added twice)
    core.frames_encoded += 2
    real = core.stats._client()

    class LostReply:
        def __getattr__(self, name):
            return getattr(real, name)

        def pipeline(self, **kw):
            p = real.pipeline(**kw)
            run = p.execute

            def execute():
                run()
                raise ConnectionError("reply lost")
            p.execute = execute
            return p
    core.stats._r = LostReply()
    assert core.report_stats() is False                 # taken by Redis, but the replica cannot know
    core.stats._r = real
    assert core.report_stats() is True
    assert scrape()["lms_encoder_frames_total"] == 14
    # an older report arriving after a newer one (the health check's thread and a batch's) takes nothing away
    assert core.stats.report({"encoder_frames": 3, "encoder_batches": 1}, {}) is True
    assert scrape()["lms_encoder_frames_total"] == 14
    # byte counters past 10**14 stay exact (cjson keeps 14 digits of a number): resends add exactly nothing
    big = ReplicaStats(redis_server.url, "answerer")
    for n in (10**14 + 7, 10**14 + 9, 10**14 + 9):
        assert big.report({"test_big_counter": n}, None)
    assert int(store.r.hget(ReplicaStats.TOTALS, "test_big_counter")) == 10**14 + 9

    # a replica silent for TTL_S is no longer counted, and its entry is removed
    totals, roles = ReplicaStats.read(store.r, now=time.time() + ReplicaStats.TTL_S + 1)
    assert roles == {} and totals["encoder_frames"] == 14 and store.r.hlen(ReplicaStats.REPLICAS) == 0
    assert store.r.hlen(ReplicaStats.SENT) == 4          # kept a week: a late resend still adds nothing
    ReplicaStats.read(store.r, now=time.time() + ReplicaStats.SENT_TTL_S + 1)
    assert store.r.hlen(ReplicaStats.SENT) == 0


def test_a_full_redis_refuses_new_records_with_e_cache_budget_and_still_takes_status_and_metrics(tmp_path):
    """Over Redis's maxmemory (noeviction) a new job or stream was refused as 503 E_CACHE_UNAVAILABLE ("expected
    a reachable Redis"), and a running job's own status write was refused too: a job failing because the cache
    was full could not say so. Now a new record is 507 E_CACHE_BUDGET naming maxmemory; an existing record's
    update (a job's end) and the replicas' metrics still land (``allow-oom``, a few hundred bytes); delete works
    (the way out)."""
    import redis
    from deploy.serving import JobStore, ReplicaStats
    from frame_cache.redis_server import RedisServer
    from lmcore.errors import CacheBudgetExceeded
    with RedisServer(tmp_path / "redis") as srv:
        store, stats = JobStore(srv.url), ReplicaStats(srv.url, "encoder")
        store.create("j1", {"status": "ingesting"})
        assert stats.report({"encoder_frames": 3}, {"local_kv_bytes": 1.0})
        r = srv.client()
        r.set("filler", b"x" * (2 << 20))                   # frames: over the 1 MB Redis takes as its least cap
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", int(r.info("memory")["used_memory"]) - 1)
        with pytest.raises(CacheBudgetExceeded, match="to have memory for creating a job, got it full \\(it holds .* MiB of its maxmemory") as ei:
            store.create("j2", {})
        assert ei.value.code == "E_CACHE_BUDGET" and ei.value.http_status == 507 and "script" not in ei.value.message
        assert not r.exists(store._key("j2")) and store.ids() == ["j1"]      # nothing of it (a record was left)
        with pytest.raises(redis.exceptions.OutOfMemoryError):      # a plain write is still refused: the cap holds
            r.hset("lms:test", "f", "v" * 1000)
        assert store.update("j1", status="failed", error={"code": "E_CACHE_BUDGET", "message": "m" * 300})
        assert store.get("j1")["status"] == "failed" and store.get("j1")["error"]["message"] == "m" * 300
        assert stats.report({"encoder_frames": 8}, {"local_kv_bytes": 2.0})
        totals, roles = ReplicaStats.read(store.r)
        assert totals["encoder_frames"] == 8 and roles["encoder"]["local_kv_bytes"] == 2.0, (totals, roles)
        store.delete("j1")
        assert store.ids() == []
        r.close()


def test_an_unknown_field_is_refused_in_words_that_do_not_ask_for_it():
    """`{"bogus": 1}` was refused as "expected bogus: Extra inputs are not permitted, got 1", which reads as
    though `bogus` were the field expected."""
    from deploy.routes import validation_message
    extra = {"type": "extra_forbidden", "msg": "Extra inputs are not permitted"}
    assert validation_message({**extra, "loc": ("body", "bogus"), "input": 1}) == \
        "expected no field bogus (unknown), got bogus = 1"
    assert validation_message({**extra, "loc": ("body", "retain", "foo"), "input": "x"}) == \
        'expected no field foo in retain (unknown), got retain.foo = "x"'


def test_a_watch_deleted_while_it_is_evaluated_stays_deleted(redis_server):
    """An evaluation ends by writing the watch's fields (last_text, last_error); one that ended after the
    watch's DELETE wrote the whole watch back."""
    from deploy.serving import WatchStore
    ws = WatchStore(redis_server.url)
    ws.forget("wd")
    ws.add("wd", "w-1", {"question": "q", "every_s": 5, "last_s": 10, "last_text": None})
    ws.update("wd", "w-1", last_text="red")
    assert ws.all("wd")["w-1"]["last_text"] == "red"
    w = ws.all("wd")["w-1"]
    assert ws.remove("wd", "w-1")
    ws.all = lambda sid: {"w-1": dict(w)}            # what the evaluation read before the DELETE
    ws.update("wd", "w-1", last_error={"code": "E_NO_FRAMES", "message": "m"})
    del ws.all
    assert ws.all("wd") == {}


def test_concurrent_watch_posts_cannot_pass_the_limit(redis_server):
    """The limit was a count read and then an add: 12 POSTs at once could all read 0 and all add. The count
    and the add are now one Redis step, so exactly `limit` watches are added, the rest told how many there are."""
    from concurrent.futures import ThreadPoolExecutor
    from deploy.serving import WatchStore
    ws = WatchStore(redis_server.url)
    ws.forget("wl")
    with ThreadPoolExecutor(12) as ex:
        got = list(ex.map(lambda i: WatchStore(redis_server.url).add("wl", f"w-{i}", {"question": "q"}, 4),
                          range(12)))
    assert sum(g is None for g in got) == 4 and all(g == 4 for g in got if g is not None), got
    assert len(ws.all("wl")) == 4
    assert ws.remove("wl", sorted(ws.all("wl"))[0])        # one of the 4 that won (w-0 need not be one)
    assert ws.add("wl", "w-new", {"question": "q"}, 4) is None and len(ws.all("wl")) == 4   # room again after one goes
    ws.forget("wl")


def test_ready_says_busy_not_down_when_the_replicas_slots_are_full(redis_server, monkeypatch):
    """`/ready` asks the model replicas through their handles, a call that queues behind the requests filling
    their slots: a service busy answering said 503, and a readiness probe took it out of rotation. A call that
    times out now falls back on the replicas' reports on Serve's health check: both roles heard from lately is
    ready (and "busy"); a role not heard from is 503 as before, and so is a service whose replicas never
    answered it (starting) or whose reports predate it (the last run's, on the same Redis)."""
    import asyncio
    import json
    import types
    from fastapi.testclient import TestClient
    from deploy import routes
    from deploy.serving import JobStore, ReplicaStats
    from deploy.settings import Settings

    monkeypatch.setattr(routes, "READY_MODEL_WAIT_S", 0.2)
    store = JobStore(redis_server.url)
    store.r.delete(ReplicaStats.TOTALS, ReplicaStats.REPLICAS, ReplicaStats.SENT)

    slow = {"on": False}

    async def models_ready():                             # when `slow`, the call waits behind full slots
        if slow["on"]:
            await asyncio.sleep(5)
        return True
    b = types.SimpleNamespace(settings=Settings(redis_url=redis_server.url, api_keys=["k"]), store=store,
                              models_ready=models_ready)
    prev, started = routes.current_backend(), dict(routes._MODELS)
    routes.set_backend(b)
    try:
        with TestClient(routes.build_api()) as c:
            get = lambda: c.get("/ready", headers={"Authorization": "Bearer k"})     # noqa: E731
            enc, ans = ReplicaStats(redis_server.url, "encoder"), ReplicaStats(redis_server.url, "answerer")
            assert enc.report({"encoder_frames": 1}, {}) and ans.report({}, {"bytes": 0})
            routes._MODELS["answered"], slow["on"] = False, True
            r = get()                                     # never answered this Ingress: starting, not busy
            assert r.status_code == 503 and r.json()["model"] is False, r.json()
            slow["on"] = False
            assert get().json() == {"ready": True, "redis": True, "model": True}
            slow["on"] = True
            r = get()
            assert r.status_code == 200 and r.json() == {"ready": True, "redis": True, "model": True, "busy": True}
            routes._MODELS["started"] = time.time() + 1   # reports from before this Ingress started: not its own
            assert get().status_code == 503
            routes._MODELS["started"] = started["started"]
            # an Answerer last heard from 40 s ago (past READY_HEARD_WITHIN_S) is not taken as alive
            store.r.hset(ReplicaStats.REPLICAS, ans.replica, json.dumps({"role": "answerer", "t": time.time() - 40,
                                                                         "gauges": {}}))
            r = get()
            assert r.status_code == 503 and r.json()["model"] is False, r.json()
            assert store.r.hexists(ReplicaStats.REPLICAS, ans.replica)   # still summed by /metrics (TTL_S 60 s)
    finally:
        routes.set_backend(prev)
        routes._MODELS.update(started)
        store.r.delete(ReplicaStats.TOTALS, ReplicaStats.REPLICAS, ReplicaStats.SENT)


def test_a_redis_password_is_not_shown_in_the_errors_clients_read():
    """The job, stream and watch records' errors named the Redis URL as given, password and all: a client
    asking while Redis was down read it in the 503."""
    import pytest
    from deploy.serving import JobStore, LiveStore, WatchStore
    from lmcore.errors import CacheUnavailable
    for cls in (JobStore, LiveStore, WatchStore):
        store = cls("redis://:S3cretPW@127.0.0.1:1/0", timeout=0.2)
        with pytest.raises(CacheUnavailable) as e:
            store.ids()
        assert "S3cretPW" not in str(e.value) and "redis://:***@127.0.0.1:1/0" in str(e.value), e.value
    from lmcore.urls import redact_redis_url      # the form for unix sockets, in the query too
    assert redact_redis_url("unix:///tmp/r.sock?db=0&password=S3cretPW") == "unix:///tmp/r.sock?db=0&password=***"


def test_streams_started_together_cannot_pass_max_live_streams(redis_server):
    """The live-stream limit was a count read, then the stream's record made several awaits later: 8 sockets
    starting at once were all `started` with a limit of 2. A start now holds a slot from its check until its
    record counts."""
    import asyncio
    import types
    from deploy import routes
    from deploy.serving import LiveStore
    from deploy.settings import Limits, Settings
    from lmcore.errors import Busy

    live = LiveStore(redis_server.url)
    for sid in live.ids():
        live.delete(sid)
    b = types.SimpleNamespace(settings=Settings(redis_url=redis_server.url, limits=Limits(max_live_streams=2)),
                              live=live)

    async def start(sid, after=0.0):
        try:
            async with routes._live_slot(b, sid):
                await asyncio.sleep(0.05)                  # the start's awaits before its record exists
                await asyncio.to_thread(live.create, sid, {"kind": "push"})
                await asyncio.sleep(after)                 # and after it (a camera's actor placed, "started" sent)
            return "started"
        except Busy as e:
            return str(e)

    async def run(starts):
        return await asyncio.gather(*starts)

    async def later(coro, s):
        await asyncio.sleep(s)
        return await coro
    got = asyncio.run(run([start(f"race-{i}") for i in range(8)]))
    assert got.count("started") == 2 and len(live.active_ids()) == 2, got
    assert all("expected at most 2 live streams fed at once, got 2" in g for g in got if g != "started"), got
    assert not routes._LIVE_STARTING
    for sid in live.ids():
        live.delete(sid)
    # a stream whose record counts while its start goes on is counted once: a second start has room
    got = asyncio.run(run([start("cam-a", after=0.4), later(start("cam-b"), 0.2)]))
    assert got == ["started", "started"], got
    assert asyncio.run(run([start("cam-a")])) == ["started"]          # a stream fed now, taken over: its own slot
    assert "got 2" in asyncio.run(run([start("cam-c")]))[0]
    for sid in live.ids():
        live.delete(sid)


def test_pushed_pictures_over_8k_are_refused_and_big_ones_decoded_two_at_a_time(monkeypatch):
    """A pushed frame is bounded as a file's still images are (8192 x 8192), and pictures over
    BIG_PICTURE_PIXELS are decoded at most two at a time (three sockets of 8000 x 8000 PNGs took the Ingress
    to 2.2 GB), on threads of their own: small ones never wait behind them."""
    import asyncio
    import io
    import numpy as np
    import pytest
    from PIL import Image
    from deploy import routes, serving
    from lmcore.errors import PayloadTooLarge

    def png(w, h, mode="RGB"):
        buf = io.BytesIO()
        Image.new(mode, (w, h)).save(buf, "PNG")
        return buf.getvalue()
    with pytest.raises(PayloadTooLarge, match=r"at most 67108864 pixels \(8192x8192\), got 9000x8000"):
        serving.decode_image(png(9000, 8000, "1"), 64)
    small_png, big_png = png(40, 30), png(2000, 1200)
    assert serving.picture_pixels(big_png) == 2000 * 1200 > serving.BIG_PICTURE_PIXELS
    assert serving.picture_pixels(b"not a picture") == 0

    inside, most = [0], [0]
    real = serving._nearest
    lock = threading.Lock()

    def slow_nearest(rgb, size):                 # a decode, held open to see who overlaps and who waits
        big = rgb.shape[0] > 100
        if big:
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.3)
            with lock:
                inside[0] -= 1
        return real(rgb, size)
    monkeypatch.setattr(serving, "_nearest", slow_nearest)

    async def run():
        bigs = [asyncio.ensure_future(routes._decode_pushed(big_png, 64)) for _ in range(6)]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        small = await routes._decode_pushed(small_png, 16)
        waited = time.monotonic() - t0
        await asyncio.gather(*bigs)
        return small, waited
    small, waited = asyncio.run(run())
    assert small.shape == (16, 16, 3) and small.dtype == np.uint8
    assert most[0] == 2 and waited < 0.25, (most, waited)     # 6 big ones take 0.9 s; the small one did not wait



def test_frames_the_encoder_did_not_store_are_counted_told_and_a_gap(redis_server):
    """A socket's frames whose Encoder call raised something other than the service's own errors (a replica
    killed: ActorDiedError) ended its sending task: 40 frames sent, 12 stored and 26 dropped, 2 never told and
    no gap. Frames not stored are now `dropped` "not stored", told, in the record's counts and, once a stored
    frame follows, a gap."""
    import asyncio
    import json
    import types
    import numpy as np
    from deploy import routes
    from deploy.serving import LiveStore

    live = LiveStore(redis_server.url)
    calls = []

    async def encode(items):
        calls.append(items[0].pts)
        if len(calls) == 2:
            raise RuntimeError("ActorDiedError: the actor died unexpectedly")     # not an LmsError
        if len(calls) == 3:
            return [{"error": {"code": "E_CACHE_UNAVAILABLE", "message": "expected a reachable Redis"}}]
        return [{"seqs": list(range(len(items[0].pts)))}]

    sent = []
    ws = types.SimpleNamespace(send_text=lambda t: asyncio.sleep(0, sent.append(json.loads(t))))
    b = types.SimpleNamespace(encode=encode, live=live)
    sess = routes._LiveSession(b, ws, None)
    sess.sid, sess.token, sess.writer, sess.fps = "nstored", 1, True, 1.0
    live.delete("nstored") if "nstored" in live.ids() else None
    live.create("nstored", {"kind": "push"})
    rgb = np.zeros((8, 8, 3), np.uint8)

    async def run():
        for t in (0.0, 1.0, 2.0, 3.0):
            await sess.encode(rgb, t)
        await sess.report_drops()
    asyncio.run(run())
    assert calls == [[0.0], [1.0], [2.0], [3.0]]
    assert sess.frames == 2 and sess.dropped["not stored"] == 2, (sess.frames, sess.dropped)
    errors = [m for m in sent if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["E_INTERNAL", "E_CACHE_UNAVAILABLE"], errors
    assert "ActorDiedError" in errors[0]["message"]
    told = sum(m["frames"] for m in sent if m["type"] == "dropped")
    assert told == 2 and all(set(m["by_reason"]) == {"not stored"} for m in sent if m["type"] == "dropped"), sent
    rec = live.get("nstored")
    assert rec["dropped_why"] == {"not stored": 2} and rec["gaps"] == [[0.0, 3.0]], rec
    live.delete("nstored")


def test_a_stopping_service_lets_questions_in_flight_finish_and_refuses_new_ones(redis_server):
    """`lmstream serve` on SIGTERM went from closing the sockets straight to Serve's shutdown: HTTP questions
    in flight were cut with no response at all. `drain_for_stop` now refuses new questions and jobs (503
    `E_UNAVAILABLE`, saying why) and waits for those in flight. The API goes through the pickling Serve gives
    it (its routes by value: a count they held directly was a copy, and the drain read 0)."""
    import asyncio
    import threading as th
    import types
    import ray.cloudpickle as cloudpickle
    from fastapi.testclient import TestClient
    from ray._common.serialization import pickle_dumps
    from ray.serve._private.utils import ensure_serialization_context
    from deploy import routes
    from deploy.serving import JobStore, LiveStore
    from deploy.settings import Settings

    store = JobStore(redis_server.url)
    store.create("v-1", {"status": "ready", "frames": 10, "progress": 1.0, "duration_s": 10.0})
    go = th.Event()

    async def answer_events(req):                     # an answer that takes until `go`
        while not go.is_set():
            await asyncio.sleep(0.02)
        yield {"type": "answer", "text": "red", "token_ids": [1], "frames": 10}
    b = types.SimpleNamespace(settings=Settings(redis_url=redis_server.url, api_keys=["k"]), store=store,
                              live=LiveStore(redis_server.url), answer_events=answer_events)
    prev = routes.current_backend()
    routes.set_backend(b)
    ensure_serialization_context()                    # as `serve.ingress` freezes it (ray/serve/api.py)
    api = cloudpickle.loads(pickle_dumps(routes.build_api(), error_msg="the API"))
    h = {"Authorization": "Bearer k"}
    try:
        with TestClient(api) as c:
            got = {}
            asking = th.Thread(target=lambda: got.update(r=c.post("/v1/videos/v-1/questions", headers=h,
                                                                  json={"question": "what colour is it?"})))
            asking.start()
            deadline = time.monotonic() + 10
            while routes._questions() == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert routes._questions() == 1                  # counted where the drain reads it
            th.Timer(0.5, go.set).start()
            t0 = time.monotonic()
            done = asyncio.run(routes.drain_for_stop(deadline_s=10))
            took = time.monotonic() - t0
            asking.join(10)
            assert done == {"sockets": 0, "questions": 0} and 0.4 <= took < 5, (done, took)
            assert got["r"].status_code == 200 and got["r"].json()["text"] == "red", got["r"].text
            for path, body in (("/v1/videos/v-1/questions", {"question": "what colour is it?"}),
                               ("/v1/videos", {"path": "/nowhere.mp4"})):
                r = c.post(path, json=body, headers=h)
                assert r.status_code == 503 and r.json()["error"]["code"] == "E_UNAVAILABLE", (path, r.text)
                assert "got it stopping" in r.json()["error"]["message"] and r.headers.get("retry-after"), r.text
            r = c.get("/ready", headers=h)                   # a probe takes it out of rotation as it stops
            assert r.status_code == 503 and r.json()["error"]["message"].endswith("got it stopping"), r.text
    finally:
        go.set()
        routes._STOPPING["on"] = False
        routes.set_backend(prev)
        store.delete("v-1")


def test_ready_answers_within_seconds_when_redis_hangs(tmp_path):
    """A Redis that hangs (SIGSTOP) made /ready take 10 s to say 503: its ping waited on the client's 5 s
    timeout twice. It now answers within READY_MODEL_WAIT_S, saying Redis did not answer."""
    import signal
    import types
    from fastapi.testclient import TestClient
    from deploy import routes
    from deploy.serving import JobStore
    from deploy.settings import Settings
    from frame_cache.redis_server import RedisServer

    srv = RedisServer(tmp_path / "redis").start()
    prev = routes.current_backend()

    async def models_ready():
        return True
    try:
        b = types.SimpleNamespace(settings=Settings(redis_url=srv.url, api_keys=["k"]), store=JobStore(srv.url),
                                  models_ready=models_ready)
        routes.set_backend(b)
        with TestClient(routes.build_api()) as c:
            h = {"Authorization": "Bearer k"}
            assert c.get("/ready", headers=h).status_code == 200
            os.kill(srv.proc.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                r = c.get("/ready", headers=h)
                took = time.monotonic() - t0
            finally:
                os.kill(srv.proc.pid, signal.SIGCONT)
            assert r.status_code == 503 and r.json()["redis"] is False and r.json()["model"] is True, r.text
            assert took < routes.READY_MODEL_WAIT_S + 1.5, took
    finally:
        routes.set_backend(prev)
        srv.stop()


def test_one_socket_cannot_take_every_question_slot():
    """One socket that sent 200 asks held every slot of max_queued_questions: other clients got 429 for as
    long as it went on. A socket's questions waiting or being answered are now capped
    (`limits.max_asks_per_socket`); past it the ask is told E_BUSY under its id."""
    import asyncio
    import json
    import types
    from deploy import routes
    from deploy.settings import Limits, Settings

    sent = []
    ws = types.SimpleNamespace(send_text=lambda t: asyncio.sleep(0, sent.append(json.loads(t))))
    b = types.SimpleNamespace(settings=Settings(limits=Limits(max_asks_per_socket=2)))
    sess = routes._LiveSession(b, ws, None)
    release = None

    async def run():
        nonlocal release
        release = asyncio.Event()

        async def answer(m, qid, key=None):           # a question being answered until released
            await release.wait()
        sess.answer = answer
        for i in range(5):
            await sess.ask({"type": "ask", "id": f"q{i}", "question": "what colour?"})
        busy = [m for m in sent if m["type"] == "error"]
        release.set()
        await asyncio.sleep(0.05)
        await sess.ask({"type": "ask", "id": "again", "question": "what colour?"})    # room again
        n_after = len(sess.asking)
        release.set()
        await asyncio.sleep(0.05)
        return busy, n_after
    busy, n_after = asyncio.run(run())
    assert [m["id"] for m in busy] == ["q2", "q3", "q4"], busy
    assert all(m["code"] == "E_BUSY" and "limits.max_asks_per_socket" in m["message"] for m in busy), busy
    assert n_after == 1


def test_a_path_job_reads_the_file_its_request_checked(tmp_path):
    """The allowed-folder check resolved the path at the request and the decoder opened it later: a folder
    inside an allowed one replaced meanwhile by a link to elsewhere had a file outside ingested. The decoder
    now opens the file, checks it is the one the request checked, and reads it through that descriptor."""
    from pathlib import Path
    import pytest
    from deploy import serving
    from deploy.serving import FileJob, check_allowed, check_regular_file, opened_as_checked
    from lmcore.errors import InputNotFound, PathNotAllowed
    from stream.decode import VideoSource
    from stream.synthetic import make_scene, write_video
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "d").mkdir(parents=True)
    outside.mkdir()
    write_video(make_scene(1, 5, size=(64, 64)), allowed / "d" / "clip.mp4")
    write_video(make_scene(2, 3, size=(64, 64)), outside / "clip.mp4")
    path = check_allowed(str(allowed / "d" / "clip.mp4"), [str(allowed)])
    job = FileJob(job_id="vid-x", path=path, file_id=check_regular_file(path, "d/clip.mp4"))
    with opened_as_checked(job) as read_as:
        assert os.readlink(read_as).startswith("/proc/self/fd/") and read_as.endswith("/clip.mp4")   # its name kept
        (allowed / "d").rename(allowed / "d.orig")          # swapped while it is read: the pinned file goes on
        (allowed / "d").symlink_to(outside)
        assert len(list(VideoSource(read_as, fps=1.0))) == 5
    assert not os.path.exists(read_as)                      # its link's folder removed
    with pytest.raises(PathNotAllowed, match="was replaced after the request was checked"):
        with opened_as_checked(job):                        # swapped before the decoder opened it
            pass
    import subprocess
    import sys
    import tempfile
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()                                             # a decoder killed mid-job left its links' folder
    left = Path(tempfile.gettempdir()) / f"lms-read-{gone.pid}"
    (left / "x").mkdir(parents=True, exist_ok=True)
    (allowed / "d").unlink()
    (allowed / "d.orig").rename(allowed / "d")
    serving._LINK_FOLDER.clear()                            # a decoder process started after it: sweeps once
    with opened_as_checked(job) as read_as:                 # the next job's decoder removes it
        assert Path(read_as).parent.parent == Path(tempfile.gettempdir()) / f"lms-read-{os.getpid()}"
    assert not left.exists()
    with open(allowed / "d" / "clip.mp4", "ab") as f:       # grown since the request: still the same file
        f.write(b"\0")
    with opened_as_checked(job) as read_as:
        pass
    (allowed / "d" / "clip.mp4").unlink()                   # gone since: said as the decoder says it, not E_INTERNAL
    with pytest.raises(InputNotFound):
        with opened_as_checked(job):
            pass
    upload = FileJob(job_id="vid-y", path=str(outside / "clip.mp4"), delete_after=True)
    with opened_as_checked(upload) as read_as:              # the service's own upload: read by its path
        assert read_as == upload.path


def test_a_question_whose_call_fails_at_once_gives_its_slot_back(redis_server):
    """The question slot was taken before the call to the Answerer was made, outside the block that gives it
    back: a handle that raised at once (shut down as the service stops) kept the slot for good; 16 such made
    every question 429, and the stop's drain waited its whole deadline for them."""
    import types
    from fastapi.testclient import TestClient
    from deploy import routes
    from deploy.serving import JobStore, LiveStore
    from deploy.settings import Settings

    store = JobStore(redis_server.url)
    store.create("v-2", {"status": "ready", "frames": 10, "progress": 1.0, "duration_s": 10.0})

    def answer_events(req):                               # raises when called, before any iteration
        raise RuntimeError("the handle is shut down")
    b = types.SimpleNamespace(settings=Settings(redis_url=redis_server.url, api_keys=["k"]), store=store,
                              live=LiveStore(redis_server.url), answer_events=answer_events)
    prev, before = routes.current_backend(), routes._questions()
    routes.set_backend(b)
    try:
        with TestClient(routes.build_api(), raise_server_exceptions=False) as c:
            r = c.post("/v1/videos/v-2/questions", json={"question": "what colour?"},
                       headers={"Authorization": "Bearer k"})
            assert r.status_code == 500, r.text
        assert routes._questions() == before
    finally:
        routes.set_backend(prev)
        store.delete("v-2")


def test_a_question_over_a_job_still_ingesting_reads_only_what_was_stored_when_it_came():
    """An ingesting job's answer reads the frames stored when the question came (`until`): frames the job
    stores meanwhile are not in it, so the gap its answer gives for the rest, from that newest frame on,
    holds none of the frames it answered from."""
    import types
    from deploy.serving import AnswerCore
    from frame_cache.memory import InProcessFrameCache
    cache = InProcessFrameCache()
    cache.create_stream("ing", 64)
    from frame_cache import FrameRecord
    for t in range(10):
        cache.append("ing", FrameRecord(pts=float(t), tensors={"token": torch.zeros(1, 4)}, meta={}))
    core = types.SimpleNamespace(cache=cache)
    bounds = lambda **kw: AnswerCore.bounds(core, "ing", **kw)                    # noqa: E731
    assert bounds() == (None, None)
    assert bounds(until=6.0) == (None, 6.0 + 1e-6)                                 # frames 0..6
    assert bounds(window=[2, 8], until=6.0) == (2.0, 6.0 + 1e-6)
    assert bounds(window=[2, 5], until=6.0) == (2.0, 5.0)
    start, end = bounds(last_s=3, until=6.0)                                         # the newest 3 s of 0..6
    assert abs(start - (3.0 + 1e-6)) < 1e-9 and end == 6.0 + 1e-6
    start, end = bounds(last_s=3)
    assert abs(start - (6.0 + 1e-6)) < 1e-9 and end is None


def test_a_second_question_over_the_same_frames_runs_only_its_own_rows(tiny_model, redis_server):
    """The Answerer keeps the LLM's keys/values of [prefix rows, frame tokens] of the frames it answered about
    (`ContextCache`, keyed by the token records read): the next question over the same frames and policy runs
    only its own rows through the LLM, and says so (`llm_rows_run`); its answer is the plain one. New frames,
    another window or policy are other frames: the whole pass again. A video's frames (a file job's stream)
    are kept; of a live stream only a window before its newest frame."""
    import numpy as np
    from deploy.serving import AnswerCore, EncodeItem, EncoderCore
    from deploy.settings import Settings
    from frame_cache.memory import InProcessFrameCache
    from stream.window import CachedFrames

    settings = Settings(redis_url=redis_server.url, local_kv_bytes=0)
    cache = InProcessFrameCache()
    cache.create_stream("v", 64, on_full="error")            # as a file job's stream
    enc = EncoderCore(settings, model=tiny_model, cache=cache)
    rng = np.random.default_rng(3)
    px = rng.integers(0, 255, (13, 56, 56, 3), dtype=np.uint8)
    assert "seqs" in enc.encode([EncodeItem("v", px[:12], [float(t) for t in range(12)])])[0]
    ans = AnswerCore(settings, model=tiny_model, cache=cache)
    P = len(tiny_model.default_prefix_ids)
    own = lambda q: tiny_model.prompt_ids(q).shape[1] - P - 1          # the question's rows after the placeholder

    def ask(q, **kw):
        events = list(ans.answer("v", q, max_tokens=4, **kw))
        assert events[-1]["type"] == "answer", events[-1]
        return events[-1]

    qs = ["what colour is the circle ?", "how many objects are there ?", "is there a red square ?"]
    for policy in ("exact", "budget:4"):
        for i, q in enumerate(qs):
            a = ask(q, policy=policy)
            want = tiny_model.ask(CachedFrames(cache, "v"), q, max_new_tokens=4, policy=policy)
            assert a["token_ids"] == want.token_ids and a["policy"] == want.policy, (policy, q, a, want)
            assert a["llm_rows_run"] == (a["llm_tokens"] if i == 0 else own(q)), (policy, i, a["llm_rows_run"])
    st = ans.contexts.stats()
    assert st["contexts"] == 2 and st["hits"] == 4 and 0 < st["bytes"] <= st["max_bytes"], st
    # choices read the same head; another window is other frames
    c = list(ans.answer("v", qs[0], choices=["red", "blue", "green"]))[-1]
    assert c["llm_rows_run"] == own(qs[0]) and c["text"] in ("red", "blue", "green"), c
    w = ask(qs[1], window=[0, 6])
    assert w["frames"] == 6 and w["llm_rows_run"] == w["llm_tokens"]
    # a new frame makes the whole stream other frames
    assert "seqs" in enc.encode([EncodeItem("v", px[12:], [12.0])])[0]
    a = ask(qs[1])
    assert a["frames"] == 13 and a["llm_rows_run"] == a["llm_tokens"]
    assert a["token_ids"] == tiny_model.ask(CachedFrames(cache, "v"), qs[1], max_new_tokens=4).token_ids
    # a live stream (a ring): a window that ends at its newest frame is not kept, a past one is; the stream's
    # heads go with it when this replica lets the stream go
    cache.create_stream("live", 64)
    assert "seqs" in enc.encode([EncodeItem("live", px, [float(t) for t in range(13)])])[0]
    for q in qs[:2]:
        a = list(ans.answer("live", q, max_tokens=4))[-1]
        assert a["llm_rows_run"] == a["llm_tokens"], a
    past = [list(ans.answer("live", q, max_tokens=4, window=[2, 9]))[-1] for q in qs[:2]]
    assert past[0]["llm_rows_run"] == past[0]["llm_tokens"] and past[1]["llm_rows_run"] == own(qs[1]), past
    before = ans.contexts.stats()["contexts"]
    ans.forget_stream("live")
    assert ans.contexts.stats()["contexts"] == before - 1
    # 0 bytes keeps nothing
    off = AnswerCore(Settings(redis_url=redis_server.url, local_kv_bytes=0, answer_context_bytes=0),
                     model=tiny_model, cache=cache)
    for q in qs[:2]:
        a = list(off.answer("v", q, max_tokens=4))[-1]
        assert a["llm_rows_run"] == a["llm_tokens"]
