"""Tests for stream.synthetic: determinism, ground truth vs pixels, questions, MP4 files."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time

import numpy as np
import pytest

from stream import synthetic as S

LONG = 3 * 3600  # 10,800 frames at 1 fps


def _spec_equal(a: S.SceneSpec, b: S.SceneSpec) -> bool:
    return a.to_dict() == b.to_dict()


# --------------------------------------------------------------------------- determinism

def test_same_seed_same_scene_and_pixels():
    a, b = S.make_scene(11, 60), S.make_scene(11, 60)
    assert _spec_equal(a, b)
    assert np.array_equal(S.render_frames(a), S.render_frames(b))
    assert [dataclasses.asdict(q) for q in S.questions(a)] == \
        [dataclasses.asdict(q) for q in S.questions(b)]


def test_different_seeds_differ():
    specs = [S.make_scene(s, 60) for s in range(6)]
    dicts = [s.to_dict() for s in specs]
    assert all(dicts[i] != dicts[j] for i in range(6) for j in range(i + 1, 6))
    f0 = S.render_frames(specs[0])
    assert any(not np.array_equal(f0, S.render_frames(s)) for s in specs[1:])


def test_spec_roundtrip_and_knobs():
    spec = S.make_scene(3, 60, needle=True)
    back = S.SceneSpec.from_dict(spec.to_dict())
    assert _spec_equal(spec, back)
    assert np.array_equal(S.render_frame(spec, 17.0), S.render_frame(back, 17.0))
    with pytest.raises(TypeError):
        S.make_scene(0, 60, not_a_knob=1)
    assert len(S.make_scene(0, 60, n_objects=4).objects) == 4
    for bg in S.BACKGROUND_KINDS:
        assert S.make_scene(0, 60, background=bg).background.kind == bg


def test_palette_changes_pixels_only():
    """A palette repaints the colour names (objects and the star) and changes nothing else: same
    scene, same questions and answers, same background; it survives to_dict / from_dict; a palette
    that lacks a name or holds a bad value is a clear error."""
    plain = S.make_scene(11, 60, needle=True)
    css = S.make_scene(11, 60, needle=True, palette="css")
    assert css.palette == S.PALETTES["css"] and plain.palette is None
    assert [o.name for o in css.objects] == [o.name for o in plain.objects] and css.events == plain.events
    assert [(q.question, q.answer) for q in S.questions(css)] == [(q.question, q.answer) for q in S.questions(plain)]
    seen = 0
    for t in range(60):
        lab, a, b = S.label_map(css, t), S.render_frame(plain, t), S.render_frame(css, t)
        assert np.array_equal(a[lab < 0], b[lab < 0])
        for i, o in enumerate(plain.objects):
            if (lab == i).any():
                seen += 1
                assert (b[lab == i] == S.PALETTES["css"][o.colour_at(t)]).all()
                assert (a[lab == i] == S.COLOURS[o.colour_at(t)]).all()
    assert seen
    back = S.SceneSpec.from_dict(json.loads(json.dumps(css.to_dict())))
    assert back.palette == css.palette and np.array_equal(S.render_frame(back, 30.0), S.render_frame(css, 30.0))
    with pytest.raises(ValueError, match="lacks 'white'"):
        S.make_scene(0, 10, palette={k: v for k, v in S.COLOURS.items() if k != "white"})
    with pytest.raises(ValueError, match="three values 0..255"):
        S.make_scene(0, 10, palette={**S.COLOURS, "red": (300, 0, 0)})
    with pytest.raises(ValueError, match="unknown palette 'sepia'"):
        S.make_scene(0, 10, palette="sepia")


# --------------------------------------------------------------------------- rendering vs truth

@pytest.mark.parametrize("size", [(64, 64), (96, 96), (128, 96)])
def test_pixels_match_ground_truth(size):
    obj_rgb = {c: np.array(v, np.uint8) for c, v in S.COLOURS.items()}
    for seed in range(8):
        spec = S.make_scene(seed, 60, size=size)
        assert 1 <= len(spec.objects) <= S.MAX_OBJECTS
        for t, frame in S.iter_frames(spec):
            assert frame.shape == (size[1], size[0], 3) and frame.dtype == np.uint8
            lab = S.label_map(spec, t)
            vis = S.visible_objects(spec, t)
            assert len(vis) <= S.MAX_CONCURRENT
            present = set(np.unique(lab).tolist()) - {-1}
            allowed = set(vis) | ({spec.needle_label} if spec.needle and spec.needle.visible(t)
                                  else set())
            assert present <= allowed
            # the background never shows an object colour
            bg = frame[lab == -1]
            assert bg.size == 0 or bg.max() <= 80
            for name, rgb in obj_rgb.items():
                exact = np.all(frame == rgb, axis=-1)
                owners = [i for i in vis if spec.objects[i].colour_at(t) == name]
                if spec.needle is not None and spec.needle.visible(t) \
                        and spec.needle.colour == name:
                    owners.append(spec.needle_label)
                # a colour is on screen exactly where an object of that colour is drawn
                assert np.array_equal(exact, np.isin(lab, owners)), (seed, t, name)
            for i in vis:  # a visible object shows (unless fully covered) and in its colour
                mask = S.object_mask(spec, i, t)
                assert mask.any()
                covered = np.isin(lab[mask], [j for j in present if j != i]).all()
                assert covered or (lab == i).any()


def test_colour_change_is_rendered():
    for seed in range(200):
        spec = S.make_scene(seed, 60)
        ch = [o for o in spec.objects if o.change_t is not None]
        if ch:
            break
    else:
        pytest.fail("no colour change in 200 seeds")
    o = ch[0]
    i = spec.objects.index(o)
    ev = [e for e in spec.events if e.kind == "change_colour"]
    assert ev and ev[0].objects == (i,) and ev[0].t == o.change_t
    assert ev[0].info == {"from": o.colour, "to": o.change_colour}
    for t in (o.change_t - 1, o.change_t):
        lab = S.label_map(spec, t)
        frame = S.render_frame(spec, t)
        px = frame[lab == i]
        if len(px):
            assert (px == S.COLOURS[o.colour_at(t)]).all()
    assert o.colour_at(o.change_t - 1) == o.colour and o.colour_at(o.change_t) == o.change_colour
    # (kind, colour) pairs stay unique, colour changes included
    pairs = [(ob.kind, c) for ob in spec.objects for c in ob.colours()]
    assert len(pairs) == len(set(pairs))


def test_collisions_match_geometry():
    n_hits = 0
    for seed in range(12):
        spec = S.make_scene(seed, 60, speed=(0.05, 0.12), max_objects=5, n_objects=4)
        coll = [e for e in spec.events if e.kind == "collide"]
        n_hits += len(coll)
        in_event = set()
        for e in coll:
            assert e.t_end is not None and e.t_end > e.t
            for fi in range(round(e.t * spec.fps), round(e.t_end * spec.fps)):
                in_event.add((fi, e.objects))
        for fi, (t, _) in enumerate(S.iter_frames(spec)):
            vis = S.visible_objects(spec, t)
            masks = {i: S.object_mask(spec, i, t) for i in vis}
            for i, j in itertools.combinations(vis, 2):
                overlap = bool((masks[i] & masks[j]).any())
                assert overlap == ((fi, (i, j)) in in_event), (seed, t, i, j)
            for fi_, pair in in_event:
                if fi_ == fi:
                    assert set(pair) <= set(vis)
    assert n_hits > 0


def test_needle_consistent_with_frames():
    spec = S.make_scene(5, 600, needle=True)
    nd = spec.needle
    assert nd is not None and nd.kind == "star"
    assert all(o.kind != "star" for o in spec.objects)
    assert 3 <= nd.t_leave - nd.t_appear <= 5
    others = {c for o in spec.objects for c in o.colours()}
    if len(others) < len(S.COLOURS):
        assert nd.colour not in others
    ev = [e for e in spec.events if e.kind == "needle"]
    assert len(ev) == 1 and (ev[0].t, ev[0].t_end) == (nd.t_appear, nd.t_leave)
    star = S.object_mask(spec, spec.needle_label, 0.0)
    for t in np.arange(nd.t_appear - 3, nd.t_leave + 3):
        lab = S.label_map(spec, float(t))
        frame = S.render_frame(spec, float(t))
        on = nd.t_appear <= t < nd.t_leave
        assert ((lab == spec.needle_label).any()) == on
        if on:  # drawn on top of everything, in its colour
            assert (lab[star] == spec.needle_label).all()
            assert (frame[star] == S.COLOURS[nd.colour]).all()
    assert S.make_scene(5, 600, needle=False).needle is None


def test_long_scene_needle_and_schedule():
    spec = S.make_scene(2, LONG, needle=True)
    nd = spec.needle
    assert 0.05 * LONG <= nd.t_appear and nd.t_leave <= 0.95 * LONG
    assert (S.label_map(spec, nd.t_appear) == spec.needle_label).any()
    assert not (S.label_map(spec, nd.t_leave) == spec.needle_label).any()
    # at most MAX_CONCURRENT on screen at any event time, each visible >= 3 s
    times = sorted({e.t for e in spec.events})
    assert all(len(S.visible_objects(spec, t)) <= S.MAX_CONCURRENT for t in times)
    for o in spec.objects:
        end = o.t_leave if o.t_leave is not None else spec.duration_s
        assert end - o.t_appear >= S.MIN_VISIBLE_S
    # appearances spread over the video, not just its start
    assert max(o.t_appear for o in spec.objects) > 0.1 * LONG or len(spec.objects) == 1


# --------------------------------------------------------------------------- questions

def _all_specs():
    for d, n in ((10, 40), (60, 40), (600, 40), (LONG, 12)):
        for seed in range(n):
            yield S.make_scene(1000 + seed, d, size=(64, 64) if seed % 2 else (96, 96))


def test_questions_follow_rules_and_vocabulary():
    vocab = set(S.vocabulary())
    assert len(vocab) == len(S.vocabulary())
    seen = set()
    for spec in _all_specs():
        held = {(o.kind, c) for o in spec.objects for c in o.colours()}
        for q in S.questions(spec, per_family=2):
            seen.add(q.family)
            toks = S.tokenize_words(q.question) + S.tokenize_words(q.answer)
            for c in q.choices or []:
                toks += S.tokenize_words(c)
            assert set(toks) <= vocab, (q, set(toks) - vocab)
            assert S.score(q, q.answer)
            if q.choices is not None:
                assert q.answer in q.choices
            objs = [spec.objects[i] for i in q.meta.get("objects", [])]
            if q.family == "colour":
                o = objs[0]
                assert sum(x.kind == o.kind for x in spec.objects) == 1 and o.change_t is None
                assert q.answer == o.colour and o.kind in q.question
            elif q.family == "shape":
                assert q.answer == objs[0].kind
            elif q.family == "exists":
                assert q.answer == ("yes" if (q.meta["kind"], q.meta["colour"]) in held else "no")
            elif q.family == "count":
                assert q.answer == str(len(spec.objects)) and 1 <= int(q.answer) <= 5
            elif q.family == "order":
                a, b = objs
                assert abs(a.t_appear - b.t_appear) >= 3
                assert q.answer == min(objs, key=lambda o: o.t_appear).name
            elif q.family == "when":
                assert q.answer == str(math.floor(objs[0].t_appear))
                assert q.meta["tolerance_s"] == 2
            elif q.family == "needle":
                if spec.needle is None:
                    assert q.answer == "no" and "star" in q.question
                elif q.meta["form"] == "exists":
                    assert q.answer == "yes" and spec.needle.colour in q.question
                else:
                    assert q.answer == str(math.floor(spec.needle.t_appear))
            elif q.family == "change":
                assert q.answer == objs[0].change_colour
            elif q.family == "collide":
                hit = {e.objects for e in spec.events if e.kind == "collide"}
                i, j = sorted(q.meta["objects"])
                assert q.answer == ("yes" if (i, j) in hit else "no")
    assert seen == set(S.FAMILIES)


def test_yes_no_balance_and_count_spread():
    ans = {"exists": [], "needle": [], "collide": []}
    counts = []
    for seed in range(300):
        spec = S.make_scene(seed, 60)
        for q in S.questions(spec):
            if q.family in ans and q.answer in ("yes", "no"):
                ans[q.family].append(q.answer == "yes")
            if q.family == "count":
                counts.append(int(q.answer))
    for fam, v in ans.items():
        assert len(v) > 50 and 0.35 <= np.mean(v) <= 0.65, (fam, np.mean(v))
    assert set(counts) == {1, 2, 3, 4, 5}


def test_tokenizer_and_score():
    assert S.tokenize_words("Which appeared first, the Red circle?") == \
        ["which", "appeared", "first", "the", "red", "circle"]
    assert S.tokenize_words("10799") == ["1", "0", "7", "9", "9"]
    assert S.tokenize_words("7 color") == ["7", "colour"]
    assert S.tokenize_words("42", max_number=60) == ["42"]
    assert S.detokenize_words(["at", "1", "0", "7"]) == "at 107"
    assert "42" in S.vocabulary(max_number=60) and "42" not in S.vocabulary()
    q = S.QA("when", "when did the red circle appear?", "107", None,
             {"numeric": True, "tolerance_s": 2})
    assert S.score(q, "107") and S.score(q, "1 0 9") and S.score(q, "at 105 s")
    assert not S.score(q, "110") and not S.score(q, "no idea")
    o = S.QA("order", "?", "red circle", ["red circle", "blue square"], {})
    assert S.score(o, "The red circle.") and not S.score(o, "circle")
    assert not S.score(o, "blue square")
    c = S.QA("count", "?", "3", None, {})
    assert S.score(c, "three") and S.score(c, "3") and not S.score(c, "4")
    y = S.QA("exists", "?", "yes", ["yes", "no"], {})
    assert S.score(y, "Yes.") and not S.score(y, "no")


# --------------------------------------------------------------------------- streaming + files

def test_long_scene_is_lazy():
    t0 = time.perf_counter()
    spec = S.make_scene(9, LONG)
    it = S.iter_frames(spec)
    first = list(itertools.islice(it, 5))
    assert time.perf_counter() - t0 < 3.0
    assert spec.n_frames == 10_800
    assert [t for t, _ in first] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert first[0][1].shape == (64, 64, 3)
    last = list(S.iter_frames(spec, start=spec.n_frames - 1))
    assert len(last) == 1 and last[0][0] == 10_799.0
    with pytest.raises(ValueError):
        S.render_frames(spec)


def _decode(path):
    import av

    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        name = c.streams.video[0].codec_context.name
    return name, frames


def test_write_video_decodes(tmp_path):
    import av

    spec = S.make_scene(4, 20, fps=2.0, size=(64, 64), n_objects=2)
    out = S.write_video(spec, tmp_path / "a.mp4")
    name, frames = _decode(out)
    assert name == ("h264" if "libx264" in av.codecs_available else "mpeg4")
    assert len(frames) == spec.n_frames == 40
    assert frames[0].shape == (64, 64, 3)
    ref = S.render_frames(spec)
    err = np.mean([np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(frames, ref)])
    assert err < 12, err  # lossy but close to the source
    # a file frame rate different from the spec's: frames rendered at t = i / fps
    out2 = S.write_video(S.make_scene(4, 5, size=(96, 96)), tmp_path / "b.mp4", fps=4)
    _, frames2 = _decode(out2)
    assert len(frames2) == 20 and frames2[0].shape == (96, 96, 3)
    with pytest.raises(ValueError):
        S.write_video(S.make_scene(0, 5, size=(63, 64)), tmp_path / "odd.mp4")


def test_write_video_mpeg4_fallback(tmp_path, monkeypatch):
    import av

    monkeypatch.setattr(av, "codecs_available", frozenset({"mpeg4"}))
    spec = S.make_scene(1, 6, size=(64, 64))
    with pytest.warns(RuntimeWarning, match="mpeg4"):
        out = S.write_video(spec, tmp_path / "m.mp4")
    name, frames = _decode(out)
    assert name == "mpeg4" and len(frames) == 6


def test_cli_exits_quietly_when_its_reader_goes_away():
    """`python -m stream.synthetic ... | head -1` printed a BrokenPipeError traceback: a reader that closed
    the pipe has what it wanted, so the command ends quietly (status 0, nothing on stderr)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo))
    argv = [sys.executable, "-m", "stream.synthetic", "--seed", "3", "--duration", "60"]
    whole = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=repo, timeout=120)
    assert whole.returncode == 0 and whole.stderr == "", whole.stderr
    assert len(whole.stdout.splitlines()) >= 2 and all(json.loads(l) for l in whole.stdout.splitlines())
    # the read end closed before the first line is written (as `head -1` closes it after one): every
    # write of the child meets a pipe without a reader, deterministically
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=repo)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(120) == 0 and err == "", err
