"""Where a demo checkpoint loses "is there a <colour> <kind>?": a probe of one frame's fused question.

    python -m model.probe_demo checkpoints/demo [--frames 800] [--threads 1]

For held-out single frames (scene seeds >= 10**9) it asks "is there a <colour> <kind>?" (half the
time about a pair on screen; otherwise an absent pair, half of those *hard*: a kind on screen in a
colour on screen, just not together), runs the question's rows through the pre-fusion layers
against that one frame exactly as inference does, and fits a logistic regression (70 % of the
frames) on one row to predict whether the pair is on screen; it prints the accuracy on the other
30 %, split into present / easy absent / hard absent. Rows: `referent` (the kind word, which
attends to the frame's patches for that word) and `last` (the prompt's last row, which the LLM
uses to start the answer). A model that reads the frame can answer from the referent row; one
that mixes colours and kinds of different objects fails the hard absent pairs.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from stream import synthetic as S


def probe(model_dir: str, frames: int = 800, seed: int = 5) -> dict:
    from . import LlavaMini
    from . import train_demo as T
    m = LlavaMini.from_pretrained(model_dir)
    tr = T.Trainer(m.net, m.vision, m.cfg, m.tokenizer, m.device)
    rng = np.random.default_rng(seed)
    imgs, qs, ys, groups = [], [], [], []
    while len(imgs) < frames:
        spec = S.make_scene(10 ** 9 + int(rng.integers(10 ** 6)), int(rng.integers(10, 200)), needle=False)
        t = float(rng.integers(spec.n_frames))
        items = T.frame_items(spec, t)
        if not items:
            continue
        if rng.random() < 0.5:
            k, c = items[int(rng.integers(len(items)))]
            y, g = 1, "present"
        else:
            absent = [(k, c) for k in S.KINDS for c in S.COLOUR_NAMES if (k, c) not in items]
            near = [(k, c) for (k, c) in absent if any(k == a for a, _ in items) and any(c == b for _, b in items)]
            hard = bool(near) and rng.random() < 0.5
            pool = near if hard else absent
            k, c = pool[int(rng.integers(len(pool)))]
            y, g = 0, "hard absent" if hard else "easy absent"
        imgs.append(S.render_frame(spec, t))
        qs.append(S._T_EXISTS.format(article=S._article(c), colour=c, kind=k))
        ys.append(y)
        groups.append(g)
    px = T.preprocess(np.stack(imgs), m.preprocess["size"])
    feats: dict[str, list[torch.Tensor]] = {"referent": [], "last": []}
    with torch.no_grad():
        _, ks, vs, _ = tr.encode(px)
        rows = [tr.question_rows(q) for q in qs]
        for b0 in range(0, len(qs), 200):
            sl = slice(b0, b0 + 200)
            rws = rows[sl]
            x = tr.fuse_rows(rws, [k[sl] for k in ks], [v[sl] for v in vs])
            for i, (q, r) in enumerate(zip(qs[sl], rws)):
                feats["referent"].append(x[i, tr.referent_row(T.QA("exists", q, ""), r)])
                feats["last"].append(x[i, len(r) - 1])
    y = torch.tensor(ys, dtype=torch.float32)
    cut = int(len(ys) * 0.7)
    out = {"model": model_dir, "frames": len(ys), "held_out": len(ys) - cut}
    for name, f in feats.items():
        X = T._rms(torch.stack(f)).float()
        w = torch.zeros(X.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=300)

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(X[:cut] @ w + b, y[:cut]) + 1e-3 * w.pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        with torch.no_grad():
            ok = ((X[cut:] @ w + b > 0).float() == y[cut:]).tolist()
        gs = groups[cut:]
        out[name] = {"all": round(float(np.mean(ok)), 3),
                     **{g: round(float(np.mean([o for o, h in zip(ok, gs) if h == g])), 3)
                        for g in ("present", "easy absent", "hard absent")}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.probe_demo", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="checkpoint folder")
    ap.add_argument("--frames", type=int, default=800)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    r = probe(a.model, a.frames)
    print(f"{r['model']}: per-frame 'is there' read from one fused question row, held-out accuracy "
          f"({r['held_out']} of {r['frames']} frames)")
    for name in ("referent", "last"):
        v = r[name]
        print(f"  {name:8s} all {v['all']:.3f}  present {v['present']:.2f}  easy absent {v['easy absent']:.2f}  "
              f"hard absent {v['hard absent']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
