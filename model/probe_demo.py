"""Where a demo checkpoint loses "is there a <colour> <kind>?" and "which appeared first?": probes.

    python -m model.probe_demo checkpoints/demo [--frames 800] [--threads 1]
    python -m model.probe_demo checkpoints/demo --order [--videos 90]
    python -m model.probe_demo checkpoints/demo --sets [--frames 8000] [--patch-steps 900] [--row-steps 800]
    python -m model.probe_demo MODEL --seen 200

For held-out single frames (scene seeds >= 10**9) it asks "is there a <colour> <kind>?" (half the
time about a pair on screen; otherwise an absent pair, half of those *hard*: a kind on screen in a
colour on screen, just not together), runs the question's rows through the pre-fusion layers
against that one frame exactly as inference does, and fits a logistic regression (70 % of the
frames) on one row to predict whether the pair is on screen; it prints the accuracy on the other
30 %, split into present / easy absent / hard absent. Rows: `referent` (the kind word, which
attends to the frame's patches for that word) and `last` (the prompt's last row, which the LLM
uses to start the answer). A model that reads the frame can answer from the referent row; one
that mixes colours and kinds of different objects fails the hard absent pairs.

`--sets` asks what count and order are built from: whether one frame's token names every
(kind, colour) pair on screen. On training frames (scene seeds < 10**6, 2-5 objects per scene) it
fits a linear multi-label read-out (one logit per pair) on the RMS-normed frame token and reports,
on held-out frames, the share whose whole set is named exactly, by the number of objects on
screen; with `--patch-steps N` it also trains, for N steps, a two-layer transformer over the vision
tower's 64 patch features (everything the compressor and pre-fusion layers can read) to do the
same: the best the layers after the frozen tower could do; with `--tower-steps N` a copy of the
tower trains with that read-out for N steps (is the tower able to learn it?). With `--row-steps N`
copies of the layers between the tower and the row train with a linear head on the row for N steps
(the compressor alone, as stage 0t trains it; then the compressor and the pre-fusion layers): how
much more of the set the row could carry, and how far the rows a question reads move for it. With `--count-videos N` it encodes N
training videos of 60 s (1-5 objects, as `eval-demo` cycles them) and `eval-demo`'s own 60 s videos,
and trains a two-layer transformer on each video's frame tokens to answer "how many objects?":
what a read-out made for counting gets from the tokens the LLM reads, and the same read-out given
each frame's true pairs instead (whether such a read-out learns to count at all from N videos).

`--seen N` reads the LLM's own running count (`seen_probe`), for a model trained with `train_demo
--cached-seen`, whose frame rows say, as a digit, how many objects the video has shown so far: over N
60 s videos, whether the last frame row names the count, and, where a new object appears, whether the
rows' count rises with it, by how many objects are on screen then (alone, beside one, beside two).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from stream import synthetic as S

from .train_demo import SetReader, in_chunks


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


def order_probe(model_dir: str, videos: int = 90, probe_videos: int = 40) -> dict:
    """What "which appeared first, the A or the B?" answers are made of, on `eval-demo`'s own
    held-out 60 s videos (rendered, not written to MP4): the first answer token's distribution,
    split by whether the video's first object is one of the two named: how often its argmax is a
    colour of the pair (`pair`), the first object's colour (`first`) or another (`other`), and the
    mean mass on the pair's colours (`mass_pair`) and on the first object's (`mass_first`). Then
    the question's colour-word rows after fusion (the first `probe_videos` videos, each encoded
    once for both parts): their norm against the word's embedding, their cosine with it, and a
    linear probe (70 / 30 split, RMS-normed rows, questions naming random colours and kinds) of
    which colour word the row is."""
    from lmstream.eval_demo import encode_rendered, tier_video
    from . import LlavaMini
    from .config import IMAGE_TOKEN_INDEX
    m = LlavaMini.from_pretrained(model_dir)
    tok = m.tokenizer
    cid = {c: tok.convert_tokens_to_ids(c) for c in S.COLOUR_NAMES}
    label = {t: k for k, t in enumerate(cid.values())}          # colour token id -> class
    encoded: dict = {}                                          # video index -> its frame states

    def states_of(i, spec):
        if i not in encoded:
            encoded[i] = encode_rendered(m, spec)[0]
        return encoded[i]

    out = {"model": model_dir, "groups": {}}
    mass: dict = {}
    for i in range(videos):
        spec, qas = tier_video("60s", i)
        qas = [q for q in qas if q.family == "order"]
        if not qas:
            continue
        states = states_of(i, spec)
        first = min(spec.objects, key=lambda o: o.t_appear)
        for qa in qas:
            lp = m.next_token_logits(m.prompt_ids(qa.question), states)[0].log_softmax(-1)
            cols = sorted({n.split()[0] for n in qa.choices})
            top = tok.convert_ids_to_tokens([int(lp.argmax())])[0]
            g = "first object named" if first.name in qa.choices else "first object not named"
            what = "pair" if top in cols else ("first" if top == first.colour else "other")
            d = out["groups"].setdefault(g, {"questions": 0, "pair": 0, "first": 0, "other": 0})
            d["questions"] += 1
            d[what] += 1
            mass.setdefault(g, []).append((float(lp[[cid[c] for c in cols]].exp().sum()),
                                           float(lp[cid[first.colour]].exp())))
    for g, v in mass.items():
        out["groups"][g]["mass_pair"] = round(float(np.mean([a for a, _ in v])), 3)
        out["groups"][g]["mass_first"] = round(float(np.mean([b for _, b in v])), 3)
    # the colour-word rows of order questions after fusion
    E = m.net.model.embed_tokens.weight.detach().float()
    rng = np.random.default_rng(7)
    X, Y, norms = [], [], []
    for i in range(probe_videos):
        states = states_of(i, tier_video("60s", i)[0])
        for _ in range(6):
            (c1, c2), (k1, k2) = rng.choice(S.COLOUR_NAMES, 2), rng.choice(S.KINDS, 2)
            ids = m.prompt_ids(S._T_ORDER.format(a=f"{c1} {k1}", b=f"{c2} {k2}"))
            emb = m.fuse_question(ids, states, None)[0][0].float()
            lst = ids[0].tolist()
            p = lst.index(IMAGE_TOKEN_INDEX)
            for j, t in enumerate(lst[p + 1:], start=p + 1):
                if t in label:
                    row = emb[j + len(states) - 1]
                    X.append(F.rms_norm(row, (row.shape[0],)))
                    Y.append(label[t])
                    norms.append((float(row.norm()), float(E[t].norm()), float(F.cosine_similarity(row, E[t], dim=0))))
    Xt, Yt = torch.stack(X), torch.tensor(Y)
    cut = int(len(Y) * 0.7)
    torch.manual_seed(0)
    lin = torch.nn.Linear(Xt.shape[1], len(cid))
    opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(1500):
        opt.zero_grad()
        F.cross_entropy(lin(Xt[:cut]), Yt[:cut]).backward()
        opt.step()
    with torch.no_grad():
        acc = float((lin(Xt[cut:]).argmax(-1) == Yt[cut:]).float().mean())
    a = np.array(norms)
    out["colour_word_rows"] = {"rows": len(Y), "held_out": len(Y) - cut, "colours": len(cid),
                               "row_norm": round(float(a[:, 0].mean()), 2),
                               "embedding_norm": round(float(a[:, 1].mean()), 2),
                               "cosine_with_own_embedding": round(float(a[:, 2].mean()), 3),
                               "linear_probe_held_out": round(acc, 3)}
    return out


def set_frames(m, seed0: int, n: int, rng: np.random.Generator, pixels: bool = False):
    """`n` frames with at least one object (`train_demo.set_batch`): the tower's patch features
    (n, P, D) (with `pixels`: the preprocessed frames instead), the (kind, colour) pairs on screen
    (n, N_PAIRS) and how many there are (n,)."""
    from . import train_demo as T
    frames, y, counts = T.set_batch(seed0, n, rng)
    px = T.preprocess(frames, m.preprocess["size"]).to(m.device)
    if pixels:
        return px, y, counts
    with torch.no_grad():
        V = in_chunks(m.vision, px)
    return V, y, counts


def sets_probe(model_dir: str, frames: int = 8000, held_out: int = 1500, patch_steps: int = 0,
               seed: int = 11, count_videos: int = 0, held_out_videos: int = 90, tower_steps: int = 0,
               row_steps: int = 0) -> dict:
    """Per held-out frame: is the whole set of (kind, colour) pairs on screen named exactly by a
    linear read-out of the frame token (`token`) and, with `patch_steps`, by a small transformer
    trained on the tower's patch features (`patches`)? Shares by objects on screen (1, 2, 3).
    `tower_steps`: also train a copy of the tower with such a read-out (`tower_probe`)."""
    from . import LlavaMini
    from . import train_demo as T
    m = LlavaMini.from_pretrained(model_dir)
    tr = T.Trainer(m.net, m.vision, m.cfg, m.tokenizer, m.device)
    torch.manual_seed(seed)
    Vtr, Ytr, _ = set_frames(m, 0, frames, np.random.default_rng(seed))
    Vte, Yte, nte = set_frames(m, 10 ** 9, held_out, np.random.default_rng(seed + 1))

    def tokens(V):
        with torch.no_grad():
            out = in_chunks(lambda v: tr.encode(None, v)[0], V)
        out = out.reshape(len(V), -1).float()
        return F.rms_norm(out, (out.shape[1],))

    def shares(logits) -> dict:
        return T.exact_sets(logits, Yte, nte)

    Ttr, Tte = tokens(Vtr), tokens(Vte)
    lin = torch.nn.Linear(Ttr.shape[1], Ytr.shape[1])
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(500):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(lin(Ttr), Ytr).backward()
        opt.step()
    with torch.no_grad():
        out = {"model": model_dir, "frames": frames, "held_out": held_out,
               "objects": {int(k): int((nte == k).sum()) for k in sorted(set(nte.tolist()))},
               "token": shares(lin(Tte))}
    if patch_steps:
        read = SetReader(Vtr.shape[2], Vtr.shape[1], Ytr.shape[1], dropout=0.0, pos_std=0.02)
        opt = torch.optim.AdamW(read.parameters(), 1e-3)
        for _ in range(patch_steps):
            i = torch.randint(len(Vtr), (128,))
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(read(Vtr[i]), Ytr[i]).backward()
            opt.step()
        read.eval()
        with torch.no_grad():
            out["patches"] = shares(in_chunks(read, Vte))
        out["patch_steps"] = patch_steps
    if tower_steps:
        out["tower"] = tower_probe(m, tower_steps, seed, held_out, shares)
    if row_steps:
        out["row"] = {what: row_probe(m, tr, Vtr, Ytr, Vte, row_steps, seed, shares, what)
                      for what in ("compressor", "compressor+prefusion")}
    if count_videos:
        out["count"] = count_probe(m, tr, count_videos, held_out_videos, seed)
    return out


def tower_probe(m, steps: int, seed: int, held_out: int, shares, batch: int = 128, lr: float = 3e-4) -> dict:
    """Can the tower learn to tell two or three objects apart? A copy of it and a `SetReader` on
    its patches train together on the set loss (`train_demo.train_tower_sets`: `batch` fresh
    training frames a step, the tower at `lr`, the read-out at 1e-3, nothing held); `shares` of the
    same held-out frames as `sets_probe`'s (drawn again, as pixels) six times along the way.
    Nothing is saved (stage 0t, `train_demo --tower-sets`, trains the checkpoint's own tower)."""
    import copy
    from . import train_demo as T
    tower = copy.deepcopy(m.vision)
    for p in tower.parameters():
        p.requires_grad_(True)
    pte = set_frames(m, 10 ** 9, held_out, np.random.default_rng(seed + 1), pixels=True)[0]
    read = SetReader(tower.width, tower.n_patches, T.N_PAIRS, dropout=0.0, pos_std=0.02)
    curve = T.train_tower_sets(tower, read, steps, batch, lr, np.random.default_rng([seed, 0x70E4]),
                               every=max(1, steps // 6),
                               check=lambda tw, rd: {"sets": shares(in_chunks(lambda p: rd(tw(p)), pte))})
    with torch.no_grad():
        moved = sum(float((a - b).norm()) for a, b in zip(tower.parameters(), m.vision.parameters()))
    return {"steps": steps, "batch": batch, "lr": lr, "curve": {k: v["sets"] for k, v in curve.items()},
            "moved": moved}


def row_probe(m, tr, Vtr, Ytr, Vte, steps: int, seed: int, shares, what: str, batch: int = 128,
              lr: float = 1e-3) -> dict:
    """Can the row the LLM reads carry more of the frame's set? Copies of the compressor (`what`
    "compressor", what stage 0t trains) or of the compressor and the pre-fusion layers
    ("compressor+prefusion") train with a linear head on the RMS-normed row (AdamW at `lr`,
    `batch` of the training frames' patch features a step, gradients clipped at 1, nothing held);
    returns the held-out `shares` and how far the rows of a question ("is there a red circle?",
    prompt and question after the frame) move against the checkpoint's, as relative RMS, on 300
    held-out frames. Nothing is saved."""
    import copy
    from . import train_demo as T
    net0 = m.net
    net = copy.deepcopy(net0).train()
    net.requires_grad_(False)
    mods = [net.model.compressor] + ([net.model.prefusion_layers] if what == "compressor+prefusion" else [])
    for mod in mods:
        mod.requires_grad_(True)
    net.model.compressor.pos_embed.requires_grad_(False)
    torch.manual_seed(seed)
    head = torch.nn.Linear(net.model.embed_tokens.weight.shape[1], Ytr.shape[1])
    params = list(head.parameters()) + [p for mod in mods for p in mod.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr, betas=(0.9, 0.98), weight_decay=0.0)
    prefix = tr.prefix
    q = T.build_input_ids(m.tokenizer, "is there a red circle?")[0]
    q = q[q > 0].to(Vte.device)

    def row(n, V):
        return T._rms(T.token_row(n, n.model.compressor, V, prefix))

    for _ in range(steps):
        i = torch.randint(len(Vtr), (batch,))
        T.clipped_step(opt, params, F.binary_cross_entropy_with_logits(head(row(net, Vtr[i])), Ytr[i]))
    net.eval()
    with torch.no_grad():
        sh = shares(in_chunks(lambda v: head(row(net, v)), Vte))
        a, b = T.prefuse(net, net.model.compressor, Vte[:300], q)[3], T.prefuse(net0, net0.model.compressor, Vte[:300], q)[3]
        drift = float((a - b).pow(2).sum() / b.pow(2).sum()) ** 0.5
    return {"steps": steps, "batch": batch, "lr": lr, "sets": sh, "question_row_drift": round(drift, 4)}


def count_probe(m, tr, videos: int, held_out: int, seed: int, epochs: int = 40) -> dict:
    """Held-out accuracy of a two-layer transformer trained on the frame tokens of `videos`
    training videos (60 s, 1 fps, 1-5 objects in turn) to say how many objects each shows, tested
    on `eval-demo`'s first `held_out` 60 s videos, and the same on the training videos; then
    (`true_sets`) the same read-out given each frame's true (kind, colour) pairs instead of its
    token: what count could reach if every frame's token named its whole set."""
    from lmstream.eval_demo import tier_video
    from . import train_demo as T

    def tokens_of(spec):
        frames = np.stack([S.render_frame(spec, float(t)) for t in range(spec.n_frames)])
        with torch.no_grad():
            t = tr.encode(T.preprocess(frames, m.preprocess["size"]).to(m.device))[0]
        t = t.reshape(spec.n_frames, -1).float()
        return F.rms_norm(t, (t.shape[1],))

    train = [S.make_scene(i, 60, needle=bool(i % 2 == 0), n_objects=1 + i % S.MAX_OBJECTS) for i in range(videos)]
    test = [tier_video("60s", i)[0] for i in range(held_out)]
    Xtr = torch.stack([tokens_of(sp) for sp in train])
    ytr = torch.tensor([sp.n_distinct() - 1 for sp in train])
    Xte = torch.stack([tokens_of(sp) for sp in test])
    yte = torch.tensor([sp.n_distinct() - 1 for sp in test])

    def fit(Xtr, Xte) -> dict:
        torch.manual_seed(seed)
        read = SetReader(Xtr.shape[2], Xtr.shape[1], S.MAX_OBJECTS, dropout=0.1, pos_std=0.0)
        opt = torch.optim.AdamW(read.parameters(), 1e-3, weight_decay=0.05)
        for _ in range(epochs):
            read.train()
            perm = torch.randperm(len(Xtr))
            for b in range(0, len(Xtr), 50):
                i = perm[b:b + 50]
                opt.zero_grad()
                F.cross_entropy(read(Xtr[i]), ytr[i]).backward()
                opt.step()
        read.eval()
        with torch.no_grad():
            hit = read(Xte).argmax(-1) == yte
            fitted = float((read(Xtr).argmax(-1) == ytr).float().mean())
        return {"train": round(fitted, 3), "held_out_acc": round(float(hit.float().mean()), 3),
                "by_objects": {k + 1: round(float(hit[yte == k].float().mean()), 3)
                               for k in sorted(set(yte.tolist()))}}

    def true_sets(spec):
        return tr.frame_pairs(spec, [float(t) for t in range(spec.n_frames)])[0].float()

    out = {"videos": videos, "held_out": held_out, "epochs": epochs, **fit(Xtr, Xte)}
    # the same read-out on what each frame really shows: count's ceiling were every set named
    out["true_sets"] = fit(torch.stack([true_sets(sp) for sp in train]), torch.stack([true_sets(sp) for sp in test]))
    return out


def seen_probe(model_dir: str, videos: int = 200, seed: int = 777) -> dict:
    """Where the LLM's running count goes wrong (for a model trained with `train_demo --cached-seen`,
    whose frame rows name, as a digit, how many objects the video has shown so far; any other model
    reads the same way, its frame rows just not trained for it). Over `videos` of stage 0q's 60 s
    training-kind videos (1..5 objects in turn, drawn from `seed`): the share whose last frame row
    names the count, by objects in the video, and, each time a new object appears on frame k, whether
    the rows' count rises by as much from frame k-1 to frame k+3, by how many objects are on screen
    on frame k (the object alone, beside one other, beside two)."""
    from model import LlavaMini
    from model import train_demo as T
    from stream import synthetic as S
    m = LlavaMini.from_pretrained(model_dir)
    tr = T.Trainer(m.net, m.vision, m.cfg, m.tokenizer, m.device)
    rng = np.random.default_rng([seed, 1])
    cache = T.cache_videos(tr, videos, rng, m.preprocess["size"], m.device,
                           "probe", time.perf_counter())
    rng = np.random.default_rng([seed, 1])                    # the same draws: each video's scene
    specs = [T.whole_video(rng, 1 + i % S.MAX_OBJECTS).spec for i in range(videos)]
    last: dict[int, list[int]] = {}
    rise: dict[int, list[int]] = {}
    with torch.no_grad():
        for i in range(0, videos, 16):
            vids = cache[i:i + 16]
            h, _, _ = T.cached_frames_pass(tr, vids)
            pred = T.frame_row_logits(tr, vids, h)[..., tr.digit_ids].argmax(-1).tolist()
            for v, p, spec in zip(vids, pred, specs[i:i + 16]):
                seen = v["seen"].tolist()
                last.setdefault(v["objects"], []).append(int(p[-1] == seen[-1]))
                for k in range(len(seen)):
                    if seen[k] > (seen[k - 1] if k else 0):
                        k0, k1 = max(k - 1, 0), min(k + 3, len(seen) - 1)
                        on = len(S.visible_objects(spec, float(k)))
                        rise.setdefault(on, []).append(int(p[k1] - p[k0] == seen[k1] - seen[k0]))
    share = lambda d: {k: {"right": sum(v), "n": len(v)} for k, v in sorted(d.items())}   # noqa: E731
    return {"model": model_dir, "videos": videos, "last_frame": share(last), "rise_by_on_screen": share(rise)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.probe_demo", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="checkpoint folder")
    ap.add_argument("--frames", type=int, default=800)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--order", action="store_true",
                    help="probe 'which appeared first?' instead: the first answer token on eval-demo's 60 s "
                         "videos, and what the question's colour-word rows keep of the word after fusion")
    ap.add_argument("--videos", type=int, default=90, help="--order: eval-demo's first N 60 s videos")
    ap.add_argument("--sets", action="store_true",
                    help="probe whether one frame's token names every (kind, colour) pair on screen, by the "
                         "number of objects (the ceiling of count and order); --frames is then the training frames")
    ap.add_argument("--patch-steps", type=int, default=0,
                    help="--sets: also train a two-layer transformer on the tower's patch features this many steps")
    ap.add_argument("--tower-steps", type=int, default=0,
                    help="--sets: also train a copy of the vision tower with a patch read-out for the set this many "
                         "steps (128 fresh frames a step; nothing saved): can the tower learn to tell objects apart?")
    ap.add_argument("--row-steps", type=int, default=0,
                    help="--sets: also train copies of the compressor, then of the compressor and the pre-fusion "
                         "layers, with a linear head on the row the LLM reads, this many steps (128 frames a step; "
                         "nothing saved): how much more of the set the row can carry")
    ap.add_argument("--count-videos", type=int, default=0,
                    help="--sets: also train a count read-out on the frame tokens of this many 60 s training videos, "
                         "tested on eval-demo's first --videos 60 s videos")
    ap.add_argument("--seen", type=int, default=0,
                    help="probe the LLM's running count instead (models trained with train_demo --cached-seen): "
                         "over this many 60 s videos, whose last frame row names the count, and whether the rows' "
                         "count rises where a new object appears, by objects on screen then")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.seen:
        r = seen_probe(a.model, a.seen)
        fmt = lambda d: ", ".join(f"{k}: {v['right']}/{v['n']} ({v['right'] / v['n']:.0%})" for k, v in d.items())  # noqa: E731
        print(f"{r['model']}: the frame rows' running count over {r['videos']} videos of 60 s")
        print("  last frame names the count, by objects in the video: " + fmt(r["last_frame"]))
        print("  count rises by the new objects (frame k-1 to k+3) where one appears on frame k, by objects on "
              "screen on frame k: " + fmt(r["rise_by_on_screen"]))
        return 0
    if a.sets:
        r = sets_probe(a.model, a.frames, patch_steps=a.patch_steps, count_videos=a.count_videos,
                       held_out_videos=a.videos, tower_steps=a.tower_steps, row_steps=a.row_steps)
        print(f"{r['model']}: held-out frames whose whole set of (kind, colour) pairs is named exactly "
              f"(read-outs fitted on {r['frames']} training frames; {r['held_out']} held out)")

        def row(shares: dict) -> str:          # each share under its "N (frames)" heading
            return "  ".join(f"{v:>5.0%}" + " " * (len(str(r["objects"][k])) + 3) for k, v in shares.items())

        print("  objects on screen    " + "  ".join(f"{k:>5d} ({n})" for k, n in r["objects"].items()))
        print("  frame token, linear  " + row(r["token"]))
        if "patches" in r:
            print(f"  tower patches, 2-layer transformer ({r['patch_steps']} steps)")
            print("                       " + row(r["patches"]))
        if "tower" in r:
            for step, v in r["tower"]["curve"].items():
                print(f"  the tower trained with it, step {step:>5d}   " + row(v))
        for what, v in r.get("row", {}).items():
            print(f"  {what} trained for the row ({v['steps']} steps; question rows moved {v['question_row_drift']:.0%})")
            print("                       " + row(v["sets"]))
        if "count" in r:
            c = r["count"]
            print(f"  'how many objects?' from the frame tokens alone (a 2-layer transformer, {c['videos']} training "
                  f"videos, {c['epochs']} epochs): eval-demo's {c['held_out']} videos of 60 s {c['held_out_acc']:.0%} "
                  f"(training videos {c['train']:.0%}); by objects "
                  + ", ".join(f"{k}: {v:.0%}" for k, v in c["by_objects"].items()))
            c = c["true_sets"]
            print(f"  the same read-out given each frame's true (kind, colour) pairs instead: {c['held_out_acc']:.0%} "
                  f"(training videos {c['train']:.0%}); by objects "
                  + ", ".join(f"{k}: {v:.0%}" for k, v in c["by_objects"].items()))
        return 0
    if a.order:
        r = order_probe(a.model, a.videos, min(40, a.videos))
        print(f"{r['model']}: first answer token of 'which appeared first, the A or the B?' "
              f"(eval-demo's first {a.videos} videos of 60 s)")
        for g, v in r["groups"].items():
            print(f"  {g:24s} {v['questions']:3d} questions; argmax a colour of the pair {v['pair']}, "
                  f"the first object's colour {v['first']}, another {v['other']}; mean mass on the pair's "
                  f"colours {v['mass_pair']:.2f}, on the first object's {v['mass_first']:.2f}")
        w = r["colour_word_rows"]
        print(f"  colour-word rows after fusion ({w['rows']}): norm {w['row_norm']:.1f} (the word's embedding "
              f"{w['embedding_norm']:.1f}), cosine with the word's embedding {w['cosine_with_own_embedding']:+.3f}; "
              f"a linear probe names the word for {w['linear_probe_held_out']:.0%} of {w['held_out']} held-out rows "
              f"({w['colours']} colours)")
        return 0
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
