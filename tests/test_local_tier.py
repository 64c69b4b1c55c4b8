"""The Answerer's local keys/values tier (frame_cache.local_tier): same bytes and same answers as
the durable cache, served locally the second time, never stale after a demotion or an overwrite,
within its byte budget, and no file left behind. Both backends as the durable cache."""
from __future__ import annotations

import os

import torch

from conftest import frames
from frame_cache import decode_record
from frame_cache.local_tier import LocalKVTier, LocalTierCache
from frame_cache.retention import Retention, RetentionRunner
from stream.ingest import states_to_records
from stream.window import CachedFrames

QUESTION = "how many objects are there ?"


def _fill(model, cache, T=12, sid="s", capacity=64, seed=3):
    states = model.encode_frames(frames(T, seed=seed), pts=[float(i) for i in range(T)])
    cache.create_stream(sid, capacity, meta={"retain": {"exact_s": 4.0, "kv": "fp8", "kv_stride": 2}})
    cache.append_many(sid, states_to_records(states))
    return states


def test_reads_equal_the_durable_cache_and_come_from_the_tier_the_second_time(tiny_model, any_cache, tmp_path):
    _fill(tiny_model, any_cache)
    tier = LocalKVTier(tmp_path, max_bytes=1 << 30)
    tiered = LocalTierCache(any_cache, tier)
    want = any_cache.read("s", range(12))
    assert [bytes(b) for b in tiered.read("s", range(12))] == want
    s1 = tier.stats()
    assert s1["misses"] == 12 and s1["hits"] == 0 and s1["bytes_remote"] == sum(map(len, want))
    assert [bytes(b) for b in tiered.read("s", range(12))] == want
    s2 = tier.stats()
    assert s2["hits"] == 12 and s2["bytes_remote"] == s1["bytes_remote"] and s2["frames"] == 12
    assert tiered.read("s", [99]) == [None]                   # never written: None, as from the cache
    assert os.listdir(tmp_path) == []                        # the tier's files are nameless
    tier.close()


def test_a_demoted_or_overwritten_frame_is_read_again_never_served_stale(tiny_model, any_cache, tmp_path):
    m = tiny_model
    _fill(m, any_cache)
    tiered = LocalTierCache(any_cache, LocalKVTier(tmp_path, max_bytes=1 << 30))
    ids = m.prompt_ids(QUESTION)
    tiered.read("s", range(12))                              # every frame exact in the tier now
    RetentionRunner(any_cache, "s", Retention.parse({"exact_s": 4.0, "kv": "fp8", "kv_stride": 2})).apply()
    got = tiered.read("s", range(12))
    assert [bytes(b) if b is not None else None for b in got] == any_cache.read("s", range(12))
    assert [decode_record(b).meta["kv_policy"] for b in got] == ["fp8", "none"] * 4 + ["exact"] * 4
    a = m.next_token_logits(ids, CachedFrames(tiered, "s"))
    b = m.next_token_logits(ids, CachedFrames(any_cache, "s"))
    assert torch.equal(a, b)
    # a ring that overwrote frames: the tier's old copies are not returned
    any_cache.create_stream("r", 4)
    st = m.encode_frames(frames(6, seed=4), pts=[float(i) for i in range(6)])
    recs = states_to_records(st)
    any_cache.append_many("r", recs[:4])
    tiered.read("r", range(4))
    any_cache.append_many("r", recs[4:])                     # seqs 0 and 1 overwritten by 4 and 5
    assert tiered.read("r", [0, 1, 4])[:2] == [None, None]
    # a stream deleted and created again under the same id starts at seq 0 again, with other frames:
    # the tier's copies of the old stream's seqs 0..3 are not returned for it
    any_cache.delete_stream("r")
    any_cache.create_stream("r", 4)
    again = states_to_records(m.encode_frames(frames(4, seed=5), pts=[float(i) for i in range(4)]))
    any_cache.append_many("r", again)
    got = tiered.read("r", range(4))
    assert [bytes(b) for b in got] == any_cache.read("r", range(4))
    assert all(not torch.equal(decode_record(bytes(b)).tensors["k"], r.tensors["k"]) for b, r in zip(got, recs))


def test_answers_through_the_tier_equal_the_durable_cache_exactly(tiny_model, any_cache, tmp_path):
    m = tiny_model
    states = m.encode_frames(frames(10, seed=8), pts=[float(i) for i in range(10)])
    any_cache.create_stream("e", 64)
    any_cache.append_many("e", states_to_records(states))
    tiered = LocalTierCache(any_cache, LocalKVTier(tmp_path, max_bytes=1 << 30))
    tiered.warm("e")
    before = tiered.tier.stats()["bytes_remote"]
    a = m.ask(CachedFrames(tiered, "e"), QUESTION, max_new_tokens=6)
    b = m.ask(states, QUESTION, max_new_tokens=6)
    assert a.token_ids == b.token_ids and a.policy == "exact"
    assert tiered.tier.stats()["bytes_remote"] == before     # warmed: no keys/values read remotely


def test_the_budget_drops_least_recently_used_streams(tiny_model, any_cache, tmp_path):
    m = tiny_model
    st = m.encode_frames(frames(4, seed=1), pts=[0.0, 1.0, 2.0, 3.0])
    recs = states_to_records(st)
    for sid in ("a", "b", "c"):
        any_cache.create_stream(sid, 8)
        any_cache.append_many(sid, recs)
    size = sum(len(b) for b in any_cache.read("a", range(4)))
    tier = LocalKVTier(tmp_path, max_bytes=2 * size)
    tiered = LocalTierCache(any_cache, tier)
    tiered.read("a", range(4))
    tiered.read("b", range(4))
    tiered.read("a", range(4))                               # "a" is now the most recently used
    tiered.read("c", range(4))
    assert tier.streams() == ["a", "c"] and tier.stats()["bytes"] <= 2 * size
    assert tier.stats()["evicted_streams"] == 1
    tier.forget("a", below_seq=2)
    assert tier.stats()["frames"] == 6
    tier.close()
    assert os.listdir(tmp_path) == []


def test_one_stream_alone_stays_within_the_budget_and_overwritten_frames_leave(tiny_model, any_cache, tmp_path):
    """An operator's 40-frame ring read by a question every 50 frames held 160 frames (21 MB) in a 3 MB
    tier: the budget only dropped other streams, never the one being read, and frames the ring had
    overwritten stayed. Now a stream over the budget alone keeps its newest frames within half of it, and a
    read that finds a frame gone from the ring drops the tier's copy."""
    m = tiny_model
    recs = states_to_records(m.encode_frames(frames(28, seed=6), pts=[float(i) for i in range(28)]))
    any_cache.create_stream("ring", 8)
    any_cache.append_many("ring", recs[:8])
    size = len(any_cache.read("ring", [0])[0])
    tier = LocalKVTier(tmp_path, max_bytes=6 * size)
    tiered = LocalTierCache(any_cache, tier)
    files = lambda: sum(os.fstat(f.fd).st_size for f in tier._files.values())     # noqa: E731
    for start in range(8, 24, 4):                        # a question over the whole ring after each 4 frames
        got = tiered.read("ring", range(max(0, start - 8), start))
        assert [bytes(b) for b in got] == any_cache.read("ring", range(max(0, start - 8), start))
        assert tier.stats()["bytes"] == files() <= 6 * size, (start, tier.stats())
        any_cache.append_many("ring", recs[start:start + 4])
    st = tier.stats()
    assert st["trimmed_frames"] > 0 and st["evicted_streams"] == 0
    kept = sorted(tier._files["ring"].index)
    assert kept == list(range(kept[0], 20)) and len(kept) <= 6, kept     # the newest frames read
    any_cache.append_many("ring", recs[24:28])                            # the ring overwrites 16..19
    assert tiered.read("ring", range(16, 20)) == [None] * 4
    assert not set(tier._files["ring"].index) & set(range(16, 20))       # and the tier let them go
    tier.close()
    assert os.listdir(tmp_path) == []


def test_dead_records_go_before_another_streams_live_ones(tiny_model, any_cache, tmp_path):
    """A ring's overwritten frames, discarded from the tier, still took their bytes until its file was more
    than 64 MB dead: under a smaller budget the next put evicted another stream whole instead (the review's
    case: B's 3 live frames went while A held 5 dead ones)."""
    m = tiny_model
    recs = states_to_records(m.encode_frames(frames(8, seed=7), pts=[float(i) for i in range(8)]))
    for sid in ("a", "b"):
        any_cache.create_stream(sid, 16)
        any_cache.append_many(sid, recs)
    size = len(any_cache.read("a", [0])[0])
    tier = LocalKVTier(tmp_path, max_bytes=10 * size)
    tiered = LocalTierCache(any_cache, tier)
    tiered.read("b", range(3))
    tiered.read("a", range(5))
    tier.discard("a", range(5))                              # gone from the ring: dead bytes in a's file
    tiered.read("a", range(5, 8))                            # 3 more: 13 frames of bytes, 6 of them live
    st = tier.stats()
    assert tier.streams() == ["b", "a"] and st["evicted_streams"] == 0 and st["frames"] == 6, st
    assert st["bytes"] == sum(os.fstat(f.fd).st_size for f in tier._files.values()) <= 10 * size
    tier.close()
