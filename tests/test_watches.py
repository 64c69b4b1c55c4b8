"""Watches: a standing question fused with each frame at ingest answers exactly over any window from
its stored rows, with no keys/values read."""
from __future__ import annotations

import torch

from conftest import frames


def _prefused(m, q, st, lo, hi):
    rows = m.watch_rows(q, st)                                   # at ingest: (T, S, H) per frame
    win = st.select(slice(lo, hi))
    return m.prefused(q, rows_sum=rows[lo:hi].float().sum(0), prefix_sum=win.prefix_out.float().sum(0),
                      n_fused=hi - lo, tokens=win.tokens, n_vision_rows=st.n_vision_rows, prefix_ids=st.prefix_ids,
                      pts=win.pts), win


def test_watch_rows_answer_equals_the_plain_exact_answer(tiny_model):
    m = tiny_model
    st = m.encode_frames(frames(9, seed=21), pts=[float(i) for i in range(9)])
    for q in ("what colour is the circle ?", "is there a red square ?"):
        for lo, hi in ((0, 9), (2, 7), (8, 9)):
            pre, win = _prefused(m, q, st, lo, hi)
            ids = m.prompt_ids(q)
            want = m.next_token_logits(ids, win)
            got = m.next_token_logits(ids, pre)
            assert torch.allclose(got, want, atol=1e-5, rtol=0), (q, lo, hi, (got - want).abs().max())
            a, b = m.ask(pre, q, max_new_tokens=5), m.ask(win, q, max_new_tokens=5)
            assert a.token_ids == b.token_ids and a.frames == b.frames == hi - lo
            assert a.policy.startswith("exact (watch")


def test_a_watch_answers_only_its_own_question(tiny_model):
    import pytest
    from lmcore.errors import BadArgument
    m = tiny_model
    st = m.encode_frames(frames(3, seed=22), pts=[0.0, 1.0, 2.0])
    pre, _ = _prefused(m, "what colour is the circle ?", st, 0, 3)
    with pytest.raises(BadArgument, match="watch"):
        m.next_token_logits(m.prompt_ids("how many objects are there ?"), pre)
