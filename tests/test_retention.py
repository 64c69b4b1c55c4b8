"""Retention tiers (docs/design.md section 9): frames that leave a stream's hot window keep their
keys/values in a cheaper form or none; questions inside the hot window stay exact, questions over
a mixed window equal an oracle that fuses exactly the frames that kept keys/values, and report
the mix. Both frame-cache backends."""
from __future__ import annotations

import pytest
import torch

from conftest import frames
from frame_cache import InProcessFrameCache, decode_record
from frame_cache.retention import Retention, RetentionRunner, demote_record
from lmcore.errors import BadArgument
from stream.ingest import states_to_records
from stream.window import CachedFrames

QUESTION = "how many objects are there ?"


def _stream(model, cache, retain, T=24, seed=5, sid="s", kv_policy="exact"):
    states = model.encode_frames(frames(T, seed=seed), pts=[float(i) for i in range(T)], kv_policy=kv_policy)
    cache.create_stream(sid, 256, meta={"retain": Retention.parse(retain).to_dict()})
    runner = RetentionRunner(cache, sid, Retention.parse(retain), chunk=5)
    recs = states_to_records(states)
    for i in range(0, T, 4):                           # appended in batches, demoted after each, as ingest does
        cache.append_many(sid, recs[i:i + 4])
        runner.apply()
    return states, runner


def _forms(cache, sid, T):
    return [decode_record(b).meta["kv_policy"] for b in cache.read(sid, range(T), tokens=True)]


@pytest.mark.parametrize("spec,want", [
    (None, None),
    ({"exact_s": 600, "kv": "fp8", "kv_stride": 10}, Retention(600.0, "fp8", 10)),
    ("exact_s=60,kv=none", Retention(60.0, "none", 1)),
    ('{"exact_s": 0}', Retention(0.0, "none", 1)),
    ({}, Retention(None, "none", 1)),
])
def test_parse_accepts_the_documented_forms(spec, want):
    assert Retention.parse(spec) == want


@pytest.mark.parametrize("spec,msg", [
    ({"exact_s": -1}, "exact_s to be a number of seconds >= 0"),
    ({"kv": "int4"}, "retain.kv to be one of"),
    ({"kv_stride": 0}, "kv_stride to be an integer >= 1, got 0"),
    ({"kv_stride": 2.5}, "kv_stride to be an integer >= 1, got 2.5"),
    ({"hot": 5}, "retain fields among"),
    ("exact_s", "key=value pairs"),
    ("{not json", "invalid JSON"),
    ([1], "object with exact_s"),
])
def test_parse_errors_name_the_field(spec, msg):
    with pytest.raises(BadArgument, match=msg):
        Retention.parse(spec)


def test_runner_demotes_by_age_and_stride_and_shrinks_the_ring(tiny_model, any_cache):
    T = 24
    retain = {"exact_s": 8, "kv": "fp8", "kv_stride": 3}
    before = InProcessFrameCache()
    before.create_stream("s", 256)
    states, runner = _stream(tiny_model, any_cache, retain, T)
    before.append_many("s", states_to_records(states))
    forms = _forms(any_cache, "s", T)
    newest = T - 1
    for q, f in enumerate(forms):
        if q > newest - 8:
            assert f == "exact", (q, forms)            # the hot window: the last 8 s
        else:
            assert f == ("fp8" if q % 3 == 0 else "none"), (q, forms)
    info = any_cache.stream_info("s")
    assert info.bytes_used < before.stream_info("s").bytes_used / 2
    full = any_cache.read("s", range(T))
    assert sum(len(b) for b in full) == info.bytes_used                # accounting follows the rewrites
    lights = any_cache.read("s", range(T), light=True)
    for q, f in enumerate(forms):
        if f == "none":
            assert lights[q] == full[q]                # a token-only frame is stored once: its light read is it
    tokens = any_cache.read("s", range(T), tokens=True)
    assert info.light_bytes == sum(len(lights[q]) for q, f in enumerate(forms) if f != "none") + sum(map(len, tokens))
    assert [decode_record(b).meta["kv_policy"] for b in tokens] == forms          # token copies follow the rewrites
    assert RetentionRunner(any_cache, "s", Retention.parse(retain)).apply() == 0   # a fresh runner: nothing left
    assert runner.apply() == 0
    # tokens, prefix rows (and pts) survive demotion untouched
    for q in range(T):
        r = decode_record(full[q])
        assert torch.equal(r.tensors["token"], states.tokens[q])
        assert torch.equal(r.tensors["prefix_out"], states.prefix_out[q])
        assert r.pts == float(q)


def test_fp8_demotion_equals_encoding_with_the_fp8_policy(tiny_model):
    px = frames(3, seed=9)
    exact = states_to_records(tiny_model.encode_frames(px))
    fp8 = states_to_records(tiny_model.encode_frames(px, kv_policy="fp8"))
    for e, f in zip(exact, fp8):
        d = demote_record(e, "fp8")
        assert d.meta["kv_policy"] == "fp8"
        for name in ("k", "v", "k_scale", "v_scale", "token", "prefix_out"):
            assert torch.equal(d.tensors[name].view(torch.uint8) if d.tensors[name].dtype == torch.float8_e4m3fn
                               else d.tensors[name],
                               f.tensors[name].view(torch.uint8) if f.tensors[name].dtype == torch.float8_e4m3fn
                               else f.tensors[name]), name
        assert demote_record(d, "fp8") is None and demote_record(d, "exact") is None   # never promoted
        e.tensors["w:abc"] = torch.ones(2, 3)
        n = demote_record(e, "none")
        assert set(n.tensors) == {"token", "prefix_out", "w:abc"}      # watch rows are kept for all history


def test_questions_inside_the_hot_window_are_exact(tiny_model, any_cache):
    m = tiny_model
    states, _ = _stream(m, any_cache, {"exact_s": 10, "kv": "none"})
    ids = m.prompt_ids(QUESTION)
    src = CachedFrames(any_cache, "s", 14.0, None)
    assert src.kv_policy == "exact" and src.kv_frames is None
    assert torch.equal(m.next_token_logits(ids, src), m.next_token_logits(ids, states.window(14.0, None)))
    a = m.ask(CachedFrames(any_cache, "s", 14.0, None), QUESTION, max_new_tokens=6)
    b = m.ask(states.window(14.0, None), QUESTION, max_new_tokens=6)
    assert a.token_ids == b.token_ids and a.policy == b.policy == "exact"


def test_mixed_window_equals_the_oracle_fusing_the_frames_that_kept_keys_values(tiny_model, tiny_oracle):
    """Older frames keep exact keys/values every 4th frame; the oracle (the official computation,
    transformers' modules) fuses the question with exactly those frames and the hot ones, and the
    LLM sees every frame's token. (In process: the backends' equality is the next tests' job.)"""
    any_cache = InProcessFrameCache()
    m, T = tiny_model, 16
    px = frames(T, seed=5)
    states, _ = _stream(m, any_cache, {"exact_s": 6, "kv": "exact", "kv_stride": 4}, T)
    kept = [q for q in range(T) if q > T - 1 - 6 or q % 4 == 0]
    src = CachedFrames(any_cache, "s")
    assert src.kv_frames.tolist() == kept
    ids = m.prompt_ids(QUESTION)
    emb, info = m.fuse_question(ids, src)
    assert info["frames"] == T and info["frames_fused"] == len(kept)
    assert info["policy"].startswith(f"mixed: exact {len(kept)}, token-only {T - len(kept)} (fused {len(kept)} of {T}")
    # the oracle: text fused over `kept` only, then every frame's token in place of the placeholder
    images = px[None, :, None]
    text = tiny_oracle.inputs_embeds(ids, images[:, kept])
    full = tiny_oracle.inputs_embeds(ids, images)
    p = int((ids[0] == -200).nonzero())
    want = torch.cat([text[:, :p], full[:, p:p + T], text[:, p + len(kept):]], dim=1)
    assert torch.allclose(emb, want, atol=2e-5), (emb - want).abs().max()
    got = m.ask(CachedFrames(any_cache, "s"), QUESTION, max_new_tokens=5)
    oracle_ids, e = [], want
    for _ in range(5):
        tok = int(tiny_oracle.llm(inputs_embeds=e).logits[0, -1].argmax())
        oracle_ids.append(tok)
        if tok in tiny_oracle.stop_token_ids:
            break
        e = torch.cat([e, tiny_oracle.llm.get_input_embeddings()(torch.tensor([[tok]]))], dim=1)
    assert got.token_ids == oracle_ids
    assert got.kv_policy == "mixed" and got.frames_fused == len(kept)


def test_mixed_exact_and_fp8_window_equals_fusing_the_same_forms_in_memory(tiny_model, any_cache):
    m, T = tiny_model, 20
    px = frames(T, seed=7)
    states, _ = _stream(m, any_cache, {"exact_s": 5, "kv": "fp8", "kv_stride": 2}, T, seed=7)
    hot = list(range(T - 5, T))
    old = [q for q in range(T - 5) if q % 2 == 0]
    src = CachedFrames(any_cache, "s")
    assert src.kv_counts == {"exact": 5, "fp8": len(old), "none": T - 5 - len(old)}
    ids = m.prompt_ids(QUESTION)
    emb, info = m.fuse_question(ids, src)
    # the same computation from in-memory states: hot frames exact, older kept ones encoded with fp8
    e_hot, _ = m.fuse_question(ids, states.select(hot))
    e_old, _ = m.fuse_question(ids, m.encode_frames(px[old], kv_policy="fp8"))
    p = int((ids[0] == -200).nonzero())
    n_h, n_o = len(hot), len(old)
    rows = lambda e, n: torch.cat([e[0, :p], e[0, p + n:]])
    want = (rows(e_hot, n_h) * n_h + rows(e_old, n_o) * n_o) / (n_h + n_o)
    assert torch.allclose(rows(emb, T), want, atol=2e-5)
    assert torch.equal(emb[0, p:p + T], states.tokens[:, 0])           # every frame's token in the LLM
    assert "exact 5, fp8 8, token-only 7" in info["policy"] and "fp8 on one frame in 2" in info["policy"]


def test_a_window_with_no_keys_values_left_says_so(tiny_model, any_cache):
    _stream(tiny_model, any_cache, {"exact_s": 4, "kv": "none"})
    src = CachedFrames(any_cache, "s", 0.0, 10.0)
    assert src.kv_policy == "none"
    with pytest.raises(BadArgument, match="frames that still hold keys/values.*got none of the window's 10"):
        tiny_model.ask(src, QUESTION, max_new_tokens=2)


def test_ingest_applies_the_stream_retention(tiny_model, tmp_path):
    from stream.ingest import ingest_video
    from stream.synthetic import make_scene, write_video
    video = tmp_path / "v.mp4"
    write_video(make_scene(3, 30, size=(64, 64)), video)
    cache = InProcessFrameCache()
    ingest_video(tiny_model, video, cache, "v", fps=1.0, retain="exact_s=10,kv=fp8,kv_stride=5")
    assert cache.stream_info("v").meta["retain"] == {"exact_s": 10.0, "kv": "fp8", "kv_stride": 5}
    forms = _forms(cache, "v", 30)
    assert forms.count("exact") == 10 and forms.count("fp8") == 4 and forms.count("none") == 16
    a = tiny_model.ask(CachedFrames(cache, "v"), QUESTION, max_new_tokens=3)
    assert a.policy.startswith("mixed: exact 10, fp8 4, token-only 16 (fused 14 of 30 frames; retain exact for "
                               "the last 10 s")
    # under a budget, which forms the fused frames had (the counts before are the window's): budget:4 spreads
    # its 4 over the 14 frames that hold keys/values, fp8 ones among them
    b = tiny_model.ask(CachedFrames(cache, "v"), QUESTION, max_new_tokens=3, policy="budget:4")
    fused = b.policy.split("(fused 4 of 30 frames: ")[1].split(";")[0]
    got = dict((k, int(n)) for k, n in (part.rsplit(" ", 1) for part in fused.split(", ")))
    assert b.policy.startswith("budget:4, mixed: exact 10, fp8 4, token-only 16 (fused 4 of 30 frames: "), b.policy
    assert sum(got.values()) == 4 and set(got) <= {"exact", "fp8"} and got.get("fp8", 0) >= 1, b.policy


def test_the_encoder_keeps_few_runners_and_still_demotes_a_stream_it_dropped(tiny_model, redis_server):
    """A replica that ingests many short-lived streams keeps a bounded set of retention runners
    (and of cached watch lists); a stream whose runner was dropped is demoted right on its next batch."""
    import numpy as np
    from deploy.serving import EncodeItem, EncoderCore
    from deploy.settings import Settings
    cache = InProcessFrameCache()
    core = EncoderCore(Settings(redis_url=redis_server.url), model=tiny_model, cache=cache)
    core.MAX_RUNNERS, core.watches.MAX_CACHED = 2, 2
    rng = np.random.default_rng(0)
    sids = [f"runners-{c}" for c in "abcd"]
    for sid in sids:
        cache.create_stream(sid, 64, meta={"retain": Retention.parse("exact_s=2,kv=none").to_dict()})
    for sid, t0 in [(s, 0) for s in sids] + [(sids[0], 4)]:
        out = core.encode([EncodeItem(sid, rng.integers(0, 255, (4, 56, 56, 3), dtype=np.uint8),
                                      [float(t0 + i) for i in range(4)])])
        assert "seqs" in out[0], out
        assert len(core._runners) <= 2
    assert list(core._runners) == [sids[3], sids[0]]                  # least recently used dropped first
    assert _forms(cache, sids[0], 8) == ["none"] * 6 + ["exact"] * 2   # pts 0..5 <= 7 - 2: demoted
    assert _forms(cache, sids[3], 4) == ["none"] * 2 + ["exact"] * 2
    for sid in sids:                                                  # watch lists read long ago are dropped
        core.watches.active(sid, max_age=0.0)
    assert len(core.watches._cache) <= 3
