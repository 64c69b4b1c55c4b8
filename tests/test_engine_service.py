"""Engine features the service relies on: token streaming that stops when the consumer goes away,
questions from several threads, and frames of several streams encoded in one batch."""
from __future__ import annotations

import threading

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


def test_closing_the_stream_runs_no_more_llm_steps(tiny_model, monkeypatch):
    m = tiny_model
    st = m.encode_frames(frames(3, seed=9))
    calls = {"n": 0}
    real = m._llm

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(m, "_llm", counting)
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
