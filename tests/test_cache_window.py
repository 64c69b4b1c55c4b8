"""Questions read their frames from the cache in chunks, on both backends, and give the same
numbers as the in-memory path; frames lost to a ring are reported, never mixed in."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import frames
from frame_cache import FrameCache, InProcessFrameCache
from lmcore.errors import NoFrames
from model import FrameSource
from stream.ingest import CapacityWarning, ingest_video, states_to_records
from stream.window import CachedFrames


def _store(cache: FrameCache, states, sid: str = "s", capacity: int = 64) -> None:
    cache.create_stream(sid, capacity)
    cache.append_many(sid, states_to_records(states))


class CountingCache:
    """Wraps a FrameCache and records how many records each read asked for."""

    def __init__(self, inner: FrameCache):
        self.inner, self.reads = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read(self, stream_id, seqs, *, light=False, tokens=False):
        seqs = list(seqs)
        self.reads.append((len(seqs), "light" if light else "tokens" if tokens else "full"))
        return self.inner.read(stream_id, seqs, light=light, tokens=tokens)


@pytest.mark.parametrize("policy,kv", [("exact", "exact"), ("budget:3", "exact"), ("exact", "fp8")])
def test_cached_window_equals_in_memory_path(tiny_model, any_cache, policy, kv):
    m = tiny_model
    T = 11
    states = m.encode_frames(frames(T, seed=5), pts=[float(i) for i in range(T)], kv_policy=kv)
    _store(any_cache, states)
    counting = CountingCache(any_cache)
    src = CachedFrames(counting, "s", read_chunk=4)
    assert isinstance(src, FrameSource) and len(src) == T
    assert torch.equal(src.vision_tokens("cpu"), states.tokens)
    ids = m.prompt_ids("what colour is the circle ?")
    old = m.question_chunk
    m.question_chunk = 3
    try:
        got = m.next_token_logits(ids, src, policy)
        want = m.next_token_logits(ids, states, policy)
        assert torch.equal(got, want)            # same numbers, not merely close
        a = m.ask(src, "what colour is the circle ?", max_new_tokens=5, policy=policy)
        b = m.ask(states, "what colour is the circle ?", max_new_tokens=5, policy=policy)
    finally:
        m.question_chunk = old
    assert a.token_ids == b.token_ids and a.policy == b.policy and a.frames_fused == b.frames_fused
    assert a.time_span == (0.0, float(T - 1))
    full = [n for n, part in counting.reads if part == "full"]
    assert full and max(full) <= 3               # never more than a chunk of keys/values at once
    assert max(n for n, part in counting.reads if part == "tokens") <= 4
    # every frame's token is read as a token record: the light records (fused prefix rows, 46x the token
    # at 8B shapes) are a watch's, never read by a question
    assert sum(n for n, part in counting.reads if part == "tokens") == T
    assert not [r for r in counting.reads if r[1] == "light"]


def test_window_is_half_open_and_empty_window_is_an_error(tiny_model, any_cache):
    states = tiny_model.encode_frames(frames(6, seed=1), pts=[0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    _store(any_cache, states)
    src = CachedFrames(any_cache, "s", 1.0, 4.0)
    assert src.pts.tolist() == [1.0, 2.0, 3.0]
    # an empty window says where it lies against what the stream holds (it said only "got none")
    with pytest.raises(NoFrames, match=r"in the window 10:20 s, got none \(its stored frames span 0-5 s; the "
                                       r"window starts after the newest\)"):
        CachedFrames(any_cache, "s", 10.0, 20.0)
    with pytest.raises(NoFrames, match=r"span 0-5 s; the window ends before the oldest\)"):
        CachedFrames(any_cache, "s", -5.0, -1.0)
    with pytest.raises(NoFrames, match=r"span 0-5 s; none falls in the window: a gap"):
        CachedFrames(any_cache, "s", 1.2, 1.8)


def test_frames_overwritten_in_a_half_open_window_are_counted_as_it_is_read(tiny_model, any_cache):
    """A ring of 3 holding frames 3-5 of 0-5: the window [0, 2) lost 2 frames, not 3 (the cache's windows are
    closed, so the overwritten frame at 2 s, outside the window, was counted too: "(21 were overwritten
    already)" for [0, 20) at 1 fps); [1, 4) lost 2 and holds one."""
    states = tiny_model.encode_frames(frames(6, seed=2), pts=[0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    any_cache.create_stream("r", 3, on_full="overwrite")
    from stream.ingest import states_to_records
    any_cache.append_many("r", states_to_records(states))
    with pytest.raises(NoFrames, match=r"in the window 0:2 s, got none \(2 were overwritten already\)"):
        CachedFrames(any_cache, "r", 0.0, 2.0)
    src = CachedFrames(any_cache, "r", 1.0, 4.0)
    assert src.pts.tolist() == [3.0] and src.dropped_before == 2


def test_frames_overwritten_mid_read_are_reported_not_mixed_in(tiny_model, any_cache):
    m = tiny_model
    T = 8
    states = m.encode_frames(frames(T + 3, seed=2), pts=[float(i) for i in range(T + 3)])
    any_cache.create_stream("r", T)
    any_cache.append_many("r", states_to_records(states.select(slice(0, T))))
    src = CachedFrames(any_cache, "r")                        # tokens of frames 0..7 read
    any_cache.append_many("r", states_to_records(states.select(slice(T, T + 3))))   # 0, 1, 2 overwritten
    ids = m.prompt_ids("how many objects are there ?")
    got = m.next_token_logits(ids, src)
    # the oracle of what must happen: tokens of all 8 frames, question fused with frames 3..7 only
    embeds, info = m.fuse_question(ids, src)
    assert info["frames"] == T and info["frames_fused"] == T - 3
    assert "3 of 8 frames overwritten while read" in info["policy"]
    sub = states.select(slice(3, T))
    e_sub, _ = m.fuse_question(ids, sub)
    p = (ids[0] == -200).nonzero().item()
    text_rows = torch.cat([embeds[0, :p], embeds[0, p + T:]])
    want_rows = torch.cat([e_sub[0, :p], e_sub[0, p + T - 3:]])
    assert torch.allclose(text_rows, want_rows, atol=1e-6)    # averaged over the 5 frames that were read
    assert torch.equal(embeds[0, p:p + T], states.tokens[:T, 0])   # every frame's token still in the LLM
    assert got.shape == (1, m.cfg.vocab_size)


def test_long_question_is_fused_in_bounded_passes(tiny_model):
    """A question of thousands of rows fuses fewer frames per pass (and the attention takes rows in
    blocks), with the same numbers as one pass."""
    import importlib
    fa = importlib.import_module("triton_kernels.fusion_attention")
    m = tiny_model
    states = m.encode_frames(frames(5, seed=3))
    words = m.tokenizer("what colour is the circle ?", add_special_tokens=False).input_ids
    ids = m.prompt_ids("what colour is the circle ?")
    long = torch.cat([ids, torch.tensor([words * 150])], dim=1)          # ~900 more rows
    S = long.shape[1]
    old_mem, old_budget, old_attn = m.question_mem_bytes, fa.REFERENCE_SCORE_BUDGET, m.fusion_attention
    m.fusion_attention = fa.fusion_attention_reference         # the CPU path (Triton blocks on its own)
    try:
        want = m.next_token_logits(long, states)
        m.question_mem_bytes = 1
        fa.REFERENCE_SCORE_BUDGET = 64 * S
        assert m.frames_per_pass(S) == 1
        got = m.next_token_logits(long, states)
    finally:
        m.question_mem_bytes, fa.REFERENCE_SCORE_BUDGET, m.fusion_attention = old_mem, old_budget, old_attn
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    assert int(got.argmax()) == int(want.argmax())


def test_ingest_never_drops_silently(tiny_model, tmp_path):
    from stream.synthetic import make_scene, write_video
    video = tmp_path / "v.mp4"
    write_video(make_scene(1, 20, size=(64, 64)), video)
    cache = InProcessFrameCache()
    rep = ingest_video(tiny_model, video, cache, "all", fps=1.0)                # default: keep everything
    assert cache.stream_info("all").count == rep.frames_sampled == 20
    assert cache.stream_info("all").on_full == "error"
    with pytest.warns(CapacityWarning, match="8 of the 20 frames sampled were overwritten"):
        rep = ingest_video(tiny_model, video, cache, "ring", fps=1.0, capacity=12)
    assert cache.stream_info("ring").count == 12
    assert rep.gaps and rep.gaps[0][0] == 0.0 and rep.gaps[0][1] == 8.0
    assert any("W_CAPACITY_DROP" in e for e in rep.errors)


def test_ask_on_a_file_reports_video_decode_time_apart_from_generation(tiny_model, tmp_path):
    from stream.synthetic import make_scene, write_video
    video = tmp_path / "v.mp4"
    write_video(make_scene(2, 30, size=(64, 64)), video)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapacityWarning)
        ans = tiny_model.ask(video, "what colour is the circle ?", max_new_tokens=3)
    assert {"decode_s", "encode_s", "fuse_s", "prefill_s", "generate_s"} <= set(ans.timings)
    assert ans.frames == 30 and ans.time_span == (0.0, 29.0)
    # the same frames in memory give the same tokens
    from stream.ingest import encode_video
    states, _ = encode_video(tiny_model, video)
    assert tiny_model.ask(states, "what colour is the circle ?", max_new_tokens=3).token_ids == ans.token_ids
