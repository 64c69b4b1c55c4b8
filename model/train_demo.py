"""Train the demo LLaVA-Mini on synthetic videos (LLaVA-Mini's recipe in miniature).

    python -m model.train_demo --out DIR --seed 0       # the base model, ~32 min on 2 CPU cores
    scripts/train_demo.sh DIR                            # the committed checkpoint: the base, then 37
                                                         # runs with issue 11's levers, six of them
                                                         # blended with the weights they started
                                                         # from, model/blend.py (~14 h)
    python -m model.train_demo --out /tmp/d --vision-steps 20 --steps 20  # a smoke run

What it builds (the released design at toy sizes, `model/tiny.py` layout):
  * a CLIP-like vision tower (HF `CLIPVisionModel`, 64x64 frames, 8x8 patches -> 64 patches),
    trained from scratch here, saved to `<out>/clip-vision` (config names it `clip-vision`);
  * the compressor (one query, 8 heads, nq = 1), the mlp2x_gelu projector, the pre-fusion
    layers and a small Llama LLM, all in the official key layout (`model.safetensors`);
  * a word-level tokenizer (`tokenizers`) with the Llama-3 chat template.

The training forward computes exactly what inference computes (`LlavaMini.generate`), just
differentiably and batched over questions (`check_exact` holds it to the engine):
  ingest   per frame [P(V), P(c), prefix] through the pre-fusion layers (`DecoderLayer.full`),
           keeping each layer's keys/values; the vision token is the compressor row's output;
  fuse     each question's rows (the prompt after the <image> placeholder) through the pre-fusion
           layers against every frame's cached rows (`DecoderLayer.cached` with the PyTorch
           fusion attention), averaged over frames in float32 (the prefix rows likewise);
  LLM      [fused prefix, T frame tokens, fused question rows, answer rows]; the answer rows are
           plain embeddings (masked out of pre-fusion, as the official training masks them with
           `input_ids * (labels == -100)` and as generated tokens are at inference), the answer is
           followed by `<|eot_id|>`. The [prefix, frames] part is question-independent, so it runs
           once per video and all its questions attend to its keys/values (same numbers).

Recipe (LLaVA-Mini's in miniature; the real CLIP comes pretrained, ours is pretrained first):
  stage 0 "vision" (--vision-steps): the CLIP-like tower, the compressor and the projector learn
           what is where from exact frame labels: per-patch colour and kind classifiers on P(V)
           and a multi-label (kind, colour) head on P(c), plus a small penalty that keeps those
           features O(1) and centred over frames (otherwise a large common offset survives the
           RMS norms downstream and the LLM cannot see the content). The heads are dropped.
           The tower is then frozen, as LLaVA-Mini keeps CLIP frozen (--train-vision to not).
  stage 1 "align" (first --stage1 = 30 % of --steps): sparse clips of 1-6 frames (1-2 frames
           with 1-2 objects in its first half), caption-like questions (what is in the video,
           colour, shape, exists, star, count); compressor, projector, pre-fusion and LLM train.
  stage 2 "instruct": 1-fps clips of 8-64 frames (windows of 10-150 s scenes, 40 % whole 60 s
           videos) with every question family, plus every third step a long pseudo-video
           (300 -> 3000 frames: two dozen distinct frames of a 10 min - 3 h scene, each repeated
           over its span, with or without the 3-5 s needle as 1-3 frames of its own) whose frame
           part runs without gradient; its questions (needle, exists, colour, shape, count,
           order) still train the fusion and the LLM, so the needle is found among thousands of
           frame tokens.
  auxiliary (stages 1-2, --aux): the LLM output at each frame row (unused at inference) names the
           colours and kinds that frame shows (binary cross-entropy on those words' logits).
           Without it the randomly initialised LLM never learned to read the single vision token
           within the budget (measured: colour of a lone object at chance after 300 steps; with
           it 89 %).
Issue 11's levers, all off by default so that `--seed 0` alone still gives the base model (the
chain in scripts/train_demo.sh turns them on; measured in docs/demo-history.md):
  binding (stages 1-2, --bind): training-only linear read-outs (dropped when saving, like stage 0's
           heads) hold the model to what colour, shape and existence questions need, the (kind,
           colour) pair, not colours and kinds apart: the frame token must name the pairs its frame
           shows, and each frame row after --bind-layer LLM layers the pairs shown so far and how
           many objects so far (what "is there", "which appeared first" and "how many" read).
  data     --hard-negatives: that share of the "is there a <colour> <kind>?" negatives is hard (a
           shown kind in another shown colour); --order-hard (--order-hard-read for stage 0r's
           clips): that share of the "which appeared first" questions names two objects that both
           appear after the clip's first one, and that share of those whose answer is the clip's
           first-shown object is dropped (M4 answered the video's first object whatever was asked;
           not in the committed chain: see docs/demo-history.md);
           --short-objects P: that share of the colour and shape questions is about an object
           the clip shows on fewer than 20 frames, when it has one (the eval's weakest slice);
           --whole-videos: that share of the instruct clips
           are whole 60 s videos; --paraphrase: that share of the colour, shape, exists and count
           questions is asked in other everyday phrasings ("how many objects?", "count the
           objects.", "does the video show a red circle?", ...), their words join the vocabulary.
           Always: the tokenizer maps "color" to "colour" (no weight depends on it).
  local    --local: the question rows fused with one frame must already say what that frame shows
           about the question (a training-only read-out of the referent word's row: the colour of
           the named kind, the kind of the named colour, "yes" when the named pair is on screen,
           "none" otherwise), and the same read-out of the frame-averaged row the answer: the
           route by which colour, shape and "is there" are answered without the frame token.
  null     --null W (stage 0c and --local): the question rows of frames that do not show what is
           asked about (the referent word's row and every later one; --null-rows referent: that
           word's only) must all be one row per question, so those frames add nothing but a
           constant to the frame average (other objects' colours no longer leak in).
  count    --fusion-count W (stage 0c): the last rows of "how many objects are there?" fused with
           one frame must name the (kind, colour) pairs it shows (a training-only read-out), and
           their weighted average over 4 frames every pair any of them shows, so the average the
           LLM sees lists every object seen (not in the committed chain: see docs/demo-history.md).
  long     --decoys N: N more runs of 1-3 frames of other moments in each long pseudo-video (the
           needle is then not the only short run); --long-anchors N: N distinct frames instead of
           24; --long-grad: gradient through the LLM over the long video's frame rows (tokens
           fixed), and with --bind their "pairs seen so far" read-out there too.
  stage 0  --pair-loss: a per-patch classifier over the (kind, colour) pairs themselves on P(V)
           (binding at patch level: colour and kind are otherwise classified apart);
           --set-weight: the weight of the set loss on P(c); --token-set: the same set loss on the
           frame token itself, after the pre-fusion layers (which then train in stage 0 too). The
           end of stage 0 logs a held-out probe: how often P(c) (and the token) name exactly the
           pairs on screen, by how many are on screen. --compressor-only: stage 0 trains only the
           compressor (tower, projector and so the patch rows unchanged). --slot-loss W: the
           compressor's heads become colour slots (head h, from its own attention output, names
           the kinds of the colour-h objects on screen; `SlotHead`), so the one frame token can
           hold several objects (not in the committed chain: see docs/demo-history.md).
  stage 0r --read-steps N (or --read-extra N clips in every instruct step): the LLM alone answers
           many colour, shape, "is there", count and order questions about clips of 1-4 frames,
           mostly with two or more objects on screen (the kind word's fused row holds the kind's
           colour; the LLM had answered with whichever colour the frame token held).
  stage 0n --needle-steps N (or --needle-every N in the instruct steps): the LLM alone finds a
           3-5 s star among --needle-shortest to --needle-longest frames: one scene a step, with
           and without its star (--needle-anchors-min to --needle-anchors distinct frames, each
           repeated over its span, plus --decoys single frames), "is there a <colour> star?".
  order    --read-order N: N whole 60 s videos a step asked the order of every pair of their
           objects (--order-attn W: a head of the answer row looks at the earlier object's frames;
           --read-order-hard P: that share of the pairs with the video's first object dropped);
           --cand-set W: where a question names its possible answers (order: its two objects), -W
           log of the mass each answer position puts on them, whichever is right, so that the
           model names one of them instead of a third object (tenth session: not learned in 400
           steps; not in the committed chain: see docs/demo-history.md).
  words    --word-scale K: after the warm start the colour words' input embedding rows times K; the
           pre-fusion layers read rows through an RMS norm, so the fused colour-word rows then
           keep their word as a large direction (K = 20: cosine with the word 0.65-0.75 instead of
           0.02), and with --cand-set the LLM learns to name one of the two objects asked about
           (eleventh session: 71 of 71; order 75 % after 550 steps), but shape, count and the
           needle lost ground (not in the committed chain: see docs/demo-history.md).
  stage 0k --keep-steps N: the pre-fusion layers learn to keep the colour words of order questions
           in their fused rows (each becomes a frozen copy's row plus --keep-gain times its norm
           along the word's embedding), while every other row of every question, the frame tokens
           and the fused prefix stay the frozen copy's (--keep-hold: the weight on the other
           questions' colour-word rows); then --llm-only steps with --cand-set teach the LLM to
           copy the colour of the object it picks (fourteenth session: see docs/demo-history.md);
           --keep-count W: the count question's last rows are not held but get --fusion-count's
           read-out (with --keep-gain 0 they are the only rows that move).
  --llm-only: the instruct steps train only the LLM's layers, final norm and output head; the
           frame tokens and fused question rows stay what the earlier runs made them.
  stage 0q --cached-steps N: the LLM alone (as in stages 0r and 0n) on --cached-videos whole 60 s
           videos (1-5 objects in turn) encoded once: their frame tokens, fused prefix and each
           question's fused rows (count, every order pair, colour, shape, "is there", needle) are
           what the LLM reads, so a step costs the LLM's forward and backward only (on this CPU
           0.7 s for 16 videos on one thread, against 8.4 s for a step of V2's recipe, which
           re-encodes its clips);
           --cached-weight on the count and order losses, --cand-set applies too; the weights best
           on --cached-val other videos' count and order are kept; --cached-file keeps the
           encoded videos for the next run (seventeenth session: see docs/demo-history.md).
           --cached-prefix W: each step also asks "how many" of the first k frames of as many
           training videos (k from --cached-prefix-lengths, one per step), its loss per answer
           token times W added: the count question's rows and the prefix rows are cached at those
           lengths as exact frame averages, so one encoded video gives five count answers, not
           one (twenty-fifth session).
           --cached-windows W: the same for a window of k frames that starts later (k from
           --cached-window-lengths, its start drawn per video): "how many objects in these k
           frames?", as `ask(window=...)` puts it, with objects already moving and partly
           gone, not the video's opening (thirty-eighth session).
           --cached-seen W: each frame row's own output (through the LLM's head; unused at
           inference) must name how many objects the video has shown up to that frame, its
           cross-entropy times W added per video (thirty-sixth session).
           --cached-curriculum F: a curriculum from few to many objects: over the first F of the
           steps a step draws only videos of at most 2, then 3, then 4 objects (the prefix and
           window counts too), then every video (forty-third session).
           --oracle-sets (a diagnostic; the saved checkpoint cannot use it): each frame token plus a
           learned linear map, from zero at --oracle-lr, of the frame's true (kind, colour) set, in
           training and validation: how well the LLM counts when the token names every object
           (thirty-seventh session: 0.750 against 0.680 on validation without it).
  --count-balance P (stages 0q and 0e): that share of whole videos is drawn so that the mean
           number of objects on screen does not give the count away (COUNT_DENSITY; thirty-sixth
           session: R7's count misses lean on it).
  stage 0e --e2e-steps N: stage 0q's whole 60 s videos and questions (--cached-weight,
           --cached-replay, --cached-prefix, --needle-every / --needle-weight apply) trained end to
           end: the frames are rendered and encoded every step with gradient, so the count and
           order losses reach what makes the frame token and the fused question rows (embeddings,
           compressor, projector, pre-fusion layers: --e2e-front times --e2e-lr) and, with
           --e2e-tower above 0, the vision tower, not only the LLM; --e2e-batch videos a step (about
           6 s for 8 on this CPU, against 0.7 s for 16 cached ones), the weights best on --e2e-val
           other videos' count and order kept (thirty-fifth session: see docs/demo-history.md).
  --layers above the warm start's: the new LLM layers start as the identity (attention and MLP
           outputs zero), so the warm start answers as before.
  warm start (--init-from DIR): every matching weight of an earlier demo checkpoint, the vision
           tower included, new words' embeddings fresh; with --vision-steps > 0 stage 0 continues
           from those weights (fresh read-out heads).
AdamW, linear warm-up, cosine decay, gradient clipping at 1; --ema saves an exponential moving
average of the weights; --save-every writes the checkpoint and the log every N steps;
--stop-after N stops (and saves) after N steps of the --steps schedule. Data are a pure function of
(--seed, step): scene seeds are drawn below 10**6 (evaluation uses 10**9 + i). Deterministic
for a seed on one device and thread count (`torch.use_deterministic_algorithms`).
`--minutes` is a guard: if the wall clock runs out first, training stops, saves and says so.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stream import synthetic as S

from .compressor import interpolate_pos
from .config import IMAGE_TOKEN_INDEX, LlavaMiniConfig
from .llava_mini import LlavaMini, LlavaMiniNet
from .prompt import build_input_ids
from .tiny import build_tokenizer, readable, save_weights, tiny_config
from .vision import CLIP_MEAN, CLIP_STD, VisionTower

TRAIN_SEED_LIMIT = 10 ** 6          # training scene seeds are < this; evaluation uses 10**9 + i
CAPTION_Q = "what is in the video?"

DEFAULTS = dict(
    image_size=64, patch=8, clip_hidden=64, clip_layers=4, clip_heads=4,
    hidden=128, layers=4, heads=4, kv_heads=2, inter=256, prefusion=2, max_pos=16384,
)


_LOG_FILE: list[Path] = []


def say(msg: str) -> None:
    """Print a progress line and append it to <out>/train.log."""
    print(msg, flush=True)
    for f in _LOG_FILE:
        with open(f, "a") as fh:
            fh.write(msg + "\n")


# =========================================================================== data
@dataclass
class QA:
    family: str
    question: str
    answer: str
    cands: tuple = ()               # the answers the question itself names (order: its two objects)


@dataclass
class Sample:
    """A video for training: distinct frames (times into `spec`) and how many consecutive
    frames of the video each one stands for (1 for a real 1-fps clip)."""

    spec: S.SceneSpec
    times: list[float]
    reps: list[int]
    qas: list[QA]
    kind: str                       # "sparse" | "clip" | "long"
    codec: bool = False             # frames through `codec_like` (H.264-like chroma loss)
    needle_times: set = field(default_factory=set)
    attn: list | None = None        # per question: distinct frames its answer row should look at (--order-attn)


def _name(kind: str, colour: str) -> str:
    return f"{colour} {kind}"


def count_answer(items: list[str]) -> str:
    """The answer to "how many objects?" given the objects shown, named in the order they first
    appear: the number, or with --count-list (`RECIPE["count_list"]`) the objects named first and
    then the number ("red circle and blue square . 2"), so that the LLM counts what it has just
    listed rather than in one step."""
    if RECIPE["count_list"]:
        return " and ".join(items) + f" . {len(items)}"
    return str(len(items))


def prefix_objects(spec: S.SceneSpec, times: list[float]) -> list[list[str]]:
    """For each k, the objects the first k frames (`times`, in order) show, in the order they first
    appear, each named by its colour there (the needle star not counted, as "how many" counts)."""
    named: dict[int, str] = {}
    out: list[list[str]] = [[]]
    for t in times:
        for i in S.visible_objects(spec, t):
            if i not in named:
                named[i] = _name(spec.objects[i].kind, spec.objects[i].colour_at(t))
        out.append(list(named.values()))
    return out


def prefix_answers(spec: S.SceneSpec, times: list[float]) -> list[str]:
    """For each k, `count_answer` for the first k frames (`prefix_objects`)."""
    return [count_answer(names) for names in prefix_objects(spec, times)]


def clip_questions(spec: S.SceneSpec, times: list[float], rng: np.random.Generator, *,
                   contiguous: bool, families: tuple[str, ...], caption: bool = False,
                   paraphrase: float = 0.0, order_hard: float | None = None) -> list[QA]:
    """Questions whose answers are what the given frames (in order) show, with the templates of
    `stream.synthetic.questions`. `contiguous`: the frames are a 1-fps video from its start
    (frame index == second), so "when" questions make sense. `order_hard`: --order-hard's share
    (None: `RECIPE["order_hard"]`)."""
    oh = RECIPE["order_hard"] if order_hard is None else order_hard
    objs = spec.objects
    first: dict[int, int] = {}                  # object -> first frame index showing it
    shown: dict[int, int] = {}                  # object -> frames showing it
    first_colour: dict[int, str] = {}
    seen_colours: dict[int, list[str]] = {}
    held: set[tuple[str, str]] = set()
    needle_first = None
    for fi, t in enumerate(times):
        for i in S.visible_objects(spec, t):
            c = objs[i].colour_at(t)
            if i not in first:
                first[i], first_colour[i] = fi, c
            shown[i] = shown.get(i, 0) + 1
            if c not in seen_colours.setdefault(i, []):
                seen_colours[i].append(c)
            held.add((objs[i].kind, c))
        if spec.needle is not None and spec.needle.visible(t) and needle_first is None:
            needle_first = fi
    present = sorted(first, key=lambda i: (first[i], i))
    out: list[QA] = []

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    def short_first(cands, obj=lambda x: x):
        """--short-objects: with that share, only the candidates the clip shows on fewer than
        SHORT_FRAMES frames (when there are any): the questions eval-demo misses most."""
        if not RECIPE["short_objects"]:
            return cands
        short = [x for x in cands if shown[obj(x)] < SHORT_FRAMES]
        return short if short and rng.random() < RECIPE["short_objects"] else cands

    def add(fam, q, a, cands=()):
        if all(x.question != q for x in out):
            out.append(QA(fam, q, a, cands))

    colour_users: dict[str, int] = {}
    for i in present:
        for c in seen_colours[i]:
            colour_users[c] = colour_users.get(c, 0) + 1
    if needle_first is not None:
        colour_users[spec.needle.colour] = colour_users.get(spec.needle.colour, 0) + 1
    for fam in families:
        if fam == "caption" and caption and (present or needle_first is not None):
            items = [_name(objs[i].kind, first_colour[i]) for i in present]
            if needle_first is not None:
                items.insert(sum(first[i] <= needle_first for i in present), _name("star", spec.needle.colour))
            add("caption", CAPTION_Q, " and ".join(items))
        elif fam == "colour":
            kinds = [k for k in S.KINDS if sum(objs[i].kind == k for i in present) == 1]
            cands = [i for i in present if objs[i].kind in kinds and len(seen_colours[i]) == 1]
            if cands:
                i = pick(short_first(cands))
                add(fam, S._T_COLOUR.format(kind=objs[i].kind), seen_colours[i][0])
        elif fam == "shape":
            cands = [(i, c) for i in present for c in seen_colours[i] if colour_users.get(c) == 1]
            if cands:
                i, c = pick(short_first(cands, lambda x: x[0]))
                add(fam, S._T_SHAPE.format(colour=c), objs[i].kind)
        elif fam == "exists":
            if rng.random() < 0.5 and held:
                k, c = pick(sorted(held))
                ans = "yes"
            else:
                absent = [(k, c) for k in S.KINDS for c in S.COLOUR_NAMES if (k, c) not in held]
                # hard negatives: mostly a shown kind in another shown colour (the binding itself)
                near = [(k, c) for (k, c) in absent if any(k == hk for hk, _ in held) and any(c == hc for _, hc in held)]
                k, c = pick(near if near and RECIPE["hard_negatives"] and rng.random() < RECIPE["hard_negatives"]
                            else absent)
                ans = "no"
            add(fam, S._T_EXISTS.format(article=S._article(c), colour=c, kind=k), ans)
        elif fam == "count" and present:
            add(fam, S._T_COUNT, count_answer([_name(objs[i].kind, first_colour[i]) for i in present]))
        elif fam == "order":
            gap = 3 if contiguous else 1
            pairs = [(i, j) for i in present for j in present if i != j and abs(first[i] - first[j]) >= gap]
            # --order-hard: that share of the pairs leaves out what the clip shows first, so "name
            # the first object seen" (the shortcut M4 learned) is no answer to them
            if oh:
                later = [(i, j) for (i, j) in pairs if min(first[i], first[j]) > first[present[0]]]
                if later and rng.random() < oh:
                    pairs = later
            if pairs:
                i, j = pick(pairs)
                a, b = _name(objs[i].kind, first_colour[i]), _name(objs[j].kind, first_colour[j])
                # --order-hard, too: that share of the questions whose answer is a first-shown
                # object are dropped, so the first-shown object is the answer about half the time
                if not (min(first[i], first[j]) == first[present[0]] and oh and rng.random() < oh):
                    add(fam, S._T_ORDER.format(a=a, b=b), a if first[i] < first[j] else b, (a, b))
        elif fam == "when" and contiguous and present:
            i = pick(present)
            add(fam, S._T_WHEN.format(colour=first_colour[i], kind=objs[i].kind), str(first[i]))
        elif fam == "needle":
            if needle_first is not None:
                c = spec.needle.colour
                if rng.random() < 0.15:           # a star is there, but of another colour
                    c = pick([x for x in S.COLOUR_NAMES if x != spec.needle.colour])
                    add(fam, S._T_EXISTS.format(article=S._article(c), colour=c, kind="star"), "no")
                else:
                    add(fam, S._T_EXISTS.format(article=S._article(c), colour=c, kind="star"), "yes")
                    if contiguous and rng.random() < 0.5:
                        add("needle_when", S._T_WHEN.format(colour=c, kind="star"), str(needle_first))
            else:
                c = pick(S.COLOUR_NAMES)
                add(fam, S._T_EXISTS.format(article=S._article(c), colour=c, kind="star"), "no")
        elif fam == "change" and contiguous:
            for i in present:
                if len(seen_colours[i]) == 2:
                    add(fam, S._T_CHANGE.format(colour=seen_colours[i][0], kind=objs[i].kind), seen_colours[i][1])
                    break
        elif fam == "collide" and contiguous:
            n = len(times)
            t0, t1 = times[0], times[-1] + 1e-6
            hit = sorted({e.objects for e in spec.events if e.kind == "collide" and e.t < t1 and e.t_end > t0})
            if rng.random() < 0.5:
                cands = hit
                ans = "yes"
            else:
                vis = [set(S.visible_objects(spec, t)) for t in times]
                cands = [(i, j) for i in present for j in present if i < j and (i, j) not in hit
                         and any(i in v and j in v for v in vis)]
                ans = "no"
            if cands and n:
                i, j = pick(cands)
                if rng.random() < 0.5:
                    i, j = j, i
                add(fam, S._T_COLLIDE.format(a=_name(objs[i].kind, first_colour[i]),
                                             b=_name(objs[j].kind, first_colour[j])), ans)
    if paraphrase:
        for q in out:
            if rng.random() < paraphrase:
                q.question = rephrase(q, rng)
    return out


# ordinary phrasings users type (training only; the evaluation asks the templates). "color" is
# mapped to "colour" by the tokenizer's normalizer; these add words the templates lack.
PARAPHRASES = {
    "count": ["count the objects.", "what is the number of objects?", "how many objects does the video show?",
              "how many objects?"],
    "colour": ["which colour is the {kind}?", "what is the colour of the {kind}?"],
    "shape": ["which shape is the {colour} object?", "what kind of shape is the {colour} object?"],
    "exists": ["does the video show {article} {colour} {kind}?", "is there {article} {colour} {kind} in the video?"],
}
# the data levers of issue 11 (set from the command line by `main`; the defaults reproduce the
# committed checkpoint's data exactly: every lever off draws nothing from the random streams)
RECIPE = {"hard_negatives": 0.0, "order_hard": 0.0, "order_hard_read": 0.0, "read_order_hard": 0.0,
          "paraphrase": 0.0, "whole_videos": 0.4, "decoys": 0, "long_anchors": 24, "short_objects": 0.0,
          "canvas": 0.0, "shades": 0.0, "filler": 0.0, "count_balance": 0.0, "count_list": False}
# --filler: words no checkpoint's vocabulary holds (so each reads as the unknown token), put around
# stage 0q's questions the way users pad theirs ("please, ...", "... in this clip?"); none of them
# is a word of eval-demo --phrasings, which measures phrasings training never showed
FILLER_WORDS = ("please", "hey", "okay", "so", "now", "quickly", "here", "clip", "footage", "exactly",
                "just", "actually", "basically", "um", "well", "honestly")


def add_filler(question: str, rng: np.random.Generator) -> str:
    """The question with one or two `FILLER_WORDS` before it, after it (before its "?" or "."), or
    both; the words it asks about stay together and in order."""
    def words() -> str:
        return " ".join(FILLER_WORDS[int(i)] for i in rng.integers(len(FILLER_WORDS), size=int(rng.integers(1, 3))))
    where = rng.random()
    q = question
    if where < 0.7:
        q = f"{words()}, {q}"
    if where >= 0.5:
        body, end = (q[:-1], q[-1]) if q[-1:] in "?." else (q, "")
        q = f"{body} {words()}{end}"
    return q


SHORT_FRAMES = 20     # --short-objects: "on screen briefly", as eval-demo's breakdown splits it
PARAPHRASE_WORDS = ["count", "number", "of", "does", "show", "kind", "in", "video"]
# --canvas: frame sizes a training scene may be drawn at instead of 64x64 (width, height; even, for
# the codec-like chroma pass); the pipeline squashes every frame to 64x64 (nearest, aspect ratio
# not kept, as the official video path does), so 16:9 and 4:3 footage reaches the model squeezed
CANVASES = ((112, 64), (128, 72), (96, 54), (160, 90), (96, 72), (84, 64), (64, 112), (72, 96),
            (96, 96), (128, 128))
# --shades: the renderings a colour name is drawn between (stream.synthetic.PALETTES); "vivid" is
# left out, so eval-demo --palette vivid measures shades training never showed
SHADE_SOURCES = ("default", "css")


def shaded_palette(rng: np.random.Generator) -> dict[str, tuple[int, int, int]]:
    """A palette for one training scene: each colour name a random mix of its renderings in
    SHADE_SOURCES, 0.7-1.0 as bright, jittered by a few levels per channel."""
    out = {}
    for name in S.COLOUR_NAMES:
        a, b = (np.array(S.PALETTES[k][name], dtype=np.float64) for k in rng.choice(SHADE_SOURCES, 2))
        w = rng.random()
        c = (w * a + (1 - w) * b) * rng.uniform(0.7, 1.0) + rng.normal(0.0, 8.0, 3)
        out[name] = tuple(int(v) for v in np.clip(np.rint(c), 0, 255))
    return out


def train_scene(seed: int, duration_s: float, **kw) -> S.SceneSpec:
    """`S.make_scene` for the training samplers, plus --canvas (that share of scenes drawn at a size
    from CANVASES) and --shades (that share painted with a `shaded_palette`). The draws come from
    their own generator seeded by the scene, so with both off the samplers draw exactly as before."""
    if not (RECIPE["canvas"] or RECIPE["shades"]):
        return S.make_scene(seed, duration_s, **kw)
    r = np.random.default_rng([int(seed), 0xCA75, int(duration_s)])
    if r.random() < RECIPE["canvas"]:
        kw["size"] = CANVASES[int(r.integers(len(CANVASES)))]
    spec = S.make_scene(seed, duration_s, **kw)
    if r.random() < RECIPE["shades"]:
        spec.palette = shaded_palette(r)
    return spec


def rephrase(q: QA, rng: np.random.Generator) -> str:
    fam = "exists" if q.family == "needle" and q.question.startswith("is there") else q.family
    if fam not in PARAPHRASES:
        return q.question
    w = S.tokenize_words(q.question)
    tpl = PARAPHRASES[fam][int(rng.integers(len(PARAPHRASES[fam])))]
    if fam == "colour":
        return tpl.format(kind=w[-1])
    if fam == "shape":
        return tpl.format(colour=w[-2])
    if fam == "exists":
        return tpl.format(article=w[2], colour=w[3], kind=w[4])
    return tpl


def sparse_sample(rng, max_objects: int | None = None, max_frames: int = 6) -> Sample:
    d = int(rng.integers(8, 121))
    knobs = {} if max_objects is None else {"n_objects": int(rng.integers(1, max_objects + 1))}
    spec = train_scene(int(rng.integers(TRAIN_SEED_LIMIT)), d, needle=bool(rng.random() < 0.5), **knobs)
    T = int(rng.integers(1, max_frames + 1))
    busy = [i for i in range(spec.n_frames) if S.visible_objects(spec, float(i))]
    pool = busy if busy and rng.random() < 0.8 else list(range(spec.n_frames))
    times = sorted(float(x) for x in rng.choice(pool, size=min(T, len(pool)), replace=False))
    if spec.needle is not None and rng.random() < 0.6:
        n = spec.needle
        times[int(rng.integers(len(times)))] = float(rng.integers(int(n.t_appear), int(n.t_leave)))
        times = sorted(set(times))
    fams = ("caption", "colour", "shape", "exists", "exists", "needle", "count", "order")
    qas = clip_questions(spec, times, rng, contiguous=False, families=fams, caption=True, paraphrase=RECIPE["paraphrase"])
    return Sample(spec, times, [1] * len(times), qas, "sparse")


def clip_sample(rng, max_frames: int = 64) -> Sample:
    r = rng.random()
    w = RECIPE["whole_videos"]
    if r < w:
        d, T, start = 60, 60, 0                                  # the evaluation's 60 s videos
    else:
        d = int(rng.integers(10, 151))
        T = int(rng.integers(8, min(d, max_frames) + 1))
        start = int(rng.integers(0, d - T + 1)) if r < 0.75 + 0.5 * (w - 0.4) else 0
    spec = train_scene(int(rng.integers(TRAIN_SEED_LIMIT)), d, needle=bool(rng.random() < 0.5))
    T = min(T, spec.n_frames - start)
    times = [float(start + i) for i in range(T)]
    fams = ("colour", "shape", "exists", "exists", "count", "count", "order", "order", "when", "needle",
            "change", "collide")
    qas = clip_questions(spec, times, rng, contiguous=True, families=fams, caption=rng.random() < 0.2,
                         paraphrase=RECIPE["paraphrase"])
    return Sample(spec, times, [1] * T, qas, "clip")


def long_sample(rng, length: int, anchors: int = 24) -> Sample:
    """A long video seen through `anchors` distinct frames, each repeated over its span of the
    `length` frames, plus (when the scene has one) the needle as 1-3 frames of its own."""
    d = int(rng.integers(600, 10801))
    spec = train_scene(int(rng.integers(TRAIN_SEED_LIMIT)), d, needle=bool(rng.random() < 0.5))
    anchors = min(anchors, length)
    step = d / anchors
    off = rng.random()
    times = [math.floor((k + off) * step) for k in range(anchors)]
    base = length // anchors
    reps = [base + (1 if k < length - base * anchors else 0) for k in range(anchors)]
    if spec.needle is not None:
        n = spec.needle
        tn = float(rng.integers(int(n.t_appear), int(n.t_leave)))
        times = [t for t in times if not n.visible(t)]
        reps = reps[:len(times)]
        k = sum(t < tn for t in times)
        times.insert(k, tn)
        reps.insert(k, int(rng.integers(1, 4)))
    if RECIPE["decoys"]:
        # --decoys: other moments of the video as short runs of 1-3 frames too, so that "a frame
        # unlike its neighbours" is not a shortcut to the needle (in a real video every frame differs)
        for _ in range(RECIPE["decoys"]):
            td = int(rng.integers(d))
            if spec.needle is not None and spec.needle.visible(float(td)):
                continue
            k = sum(t <= td for t in times)
            times.insert(k, td)
            reps.insert(k, int(rng.integers(1, 4)))
    times = [float(t) for t in times]
    fams = ("needle", "needle", "exists", "colour", "shape", "count", "order")
    qas = clip_questions(spec, times, rng, contiguous=False, families=fams)
    return Sample(spec, times, reps, qas, "long")


# --workers N: frames are drawn on the CPU with numpy (about 0.5 ms a frame, and 3-4 ms to build a
# scene), which on a GPU is most of a step; N forked processes render them instead. Only pure
# functions of their arguments run there, and every random draw stays in this process, so a run is
# the same with or without workers.
_POOL: list = []
POOL_CHUNK = 32             # frames per task when one long sample is split over the workers


def start_workers(n: int) -> None:
    """Fork `n` rendering processes (before CUDA is touched: the children never use it)."""
    stop_workers()
    if n > 0:
        import multiprocessing as mp
        _POOL.append(mp.get_context("fork").Pool(n))


def stop_workers() -> None:
    while _POOL:
        p = _POOL.pop()
        p.terminate()
        p.join()


def _render_times(job: tuple[S.SceneSpec, list[float]]) -> np.ndarray:
    spec, times = job
    return np.stack([S.render_frame(spec, t) for t in times])


def render(sample: Sample) -> np.ndarray:
    if _POOL and len(sample.times) > POOL_CHUNK:
        jobs = [(sample.spec, sample.times[i:i + POOL_CHUNK]) for i in range(0, len(sample.times), POOL_CHUNK)]
        frames = np.concatenate(_POOL[0].map(_render_times, jobs))
    else:
        frames = _render_times((sample.spec, sample.times))
    if sample.codec:
        frames = codec_like(frames, np.random.default_rng([sample.spec.seed, len(sample.times)]))
    return frames


def codec_like(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Roughly what an H.264 yuv420p round trip does to a frame: BT.601 YCbCr with the chroma
    averaged over 2x2 blocks (nearest upsampling back) and a little luma noise."""
    x = frames.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb, cr = (b - y) * 0.564, (r - y) * 0.713
    T, H, W = y.shape

    def down_up(c):
        c = c.reshape(T, H // 2, 2, W // 2, 2).mean((2, 4))
        return np.repeat(np.repeat(c, 2, 1), 2, 2)
    cb, cr = down_up(cb), down_up(cr)
    y = y + rng.normal(0, 0.8, y.shape).astype(np.float32)
    r2, b2 = y + cr / 0.713, y + cb / 0.564
    g2 = (y - 0.299 * r2 - 0.114 * b2) / 0.587
    return np.clip(np.rint(np.stack([r2, g2, b2], -1)), 0, 255).astype(np.uint8)


def preprocess(frames: np.ndarray, size: int) -> torch.Tensor:
    """Official video preprocessing (stream.preprocess): nearest resize, /255, CLIP mean/std."""
    try:
        from stream.preprocess import preprocess_video_frames
        return preprocess_video_frames(frames, size, CLIP_MEAN, CLIP_STD)
    except ImportError:                                        # pragma: no cover
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size))
        x = x.float() / 255
        return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


# =========================================================================== model
def build(out: Path, a) -> tuple[LlavaMiniNet, VisionTower, LlavaMiniConfig, object, dict, torch.nn.ModuleList]:
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from .checkpoint import load_tokenizer
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out, S.vocabulary() + ["and", "star"] + (PARAPHRASE_WORDS if a.paraphrase else []),
                            join_digits=True)                   # numbers over 9 are one digit a token
    from tokenizers import Tokenizer, normalizers
    t = Tokenizer.from_file(str(out / "tokenizer.json"))        # "color" is "colour" to this model
    t.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace("color", "colour")])
    t.save(str(out / "tokenizer.json"))
    tok = load_tokenizer(out)
    eos = [vocab["<|eot_id|>"], vocab["<|end_of_text|>"]]
    cfgd = tiny_config(len(vocab), hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads,
                       inter=a.inter, prefusion=a.prefusion, compressor_size=1, vision_width=a.clip_hidden,
                       vision_tower="clip-vision", dtype="float32", max_pos=a.max_pos,
                       bos=vocab["<|begin_of_text|>"], eos=eos)
    cfg = LlavaMiniConfig.from_dict(cfgd)
    torch.manual_seed(a.seed)
    vc = CLIPVisionConfig(hidden_size=a.clip_hidden, intermediate_size=4 * a.clip_hidden,
                          num_hidden_layers=a.clip_layers, num_attention_heads=a.clip_heads,
                          image_size=a.image_size, patch_size=a.patch, projection_dim=a.clip_hidden)
    vc._attn_implementation = "sdpa"
    clip = CLIPVisionModel(vc)
    vm = getattr(clip, "vision_model", clip)
    with torch.no_grad():                                     # 2-D sin-cos positions (MAE-style init)
        from .compressor import sincos_pos_embed_2d
        pe = vm.embeddings.position_embedding.weight
        pe[1:] = torch.from_numpy(sincos_pos_embed_2d(a.clip_hidden, a.image_size // a.patch))
        pe[0] = 0
    enc = vm.encoder
    all_layers = enc.layers                                   # restored before saving
    vision = VisionTower(clip, cfg.mm_vision_select_layer)
    net = LlavaMiniNet(cfg, a.clip_hidden)
    _init(net, cfg)
    return net, vision, cfg, tok, cfgd, all_layers


def _init(net: LlavaMiniNet, cfg: LlavaMiniConfig):
    n_blocks = cfg.num_hidden_layers + cfg.prefusion_layer_num
    for name, p in net.named_parameters():
        if name.endswith("compressor.pos_embed"):
            continue
        if "norm" in name or name.endswith(("ln_q.weight", "ln_kv.weight")):
            continue
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif "embed_tokens" in name:
            torch.nn.init.normal_(p, std=0.3)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_blocks))
        elif p.dim() >= 2 or name.endswith("compressor.query"):
            torch.nn.init.normal_(p, std=0.02)


class Trainer:
    """The differentiable LLaVA-Mini forward (same computation as `LlavaMini`)."""

    def __init__(self, net: LlavaMiniNet, vision: VisionTower, cfg: LlavaMiniConfig, tok, device):
        from triton_kernels.fusion_attention import fusion_attention_reference
        self.net, self.vision, self.cfg, self.tok, self.device = net, vision, cfg, tok, device
        self.fusion = fusion_attention_reference
        ids = build_input_ids(tok, "x")[0].tolist()
        p = ids.index(IMAGE_TOKEN_INDEX)
        self.prefix = torch.tensor(ids[:p], device=device)
        assert (self.prefix > 0).all(), "prefix ids must be real tokens (id 0 is masked)"
        self.eot = tok.convert_tokens_to_ids("<|eot_id|>")
        self._qcache: dict[str, list[int]] = {}
        self.aux_words = list(S.COLOUR_NAMES) + list(S.ALL_KINDS)
        self.aux_ids = torch.tensor(tok.convert_tokens_to_ids(self.aux_words), device=device)
        self.cand_set = 0.0         # --cand-set: weight of the candidate-set loss (questions with `cands`)
        # --cached-seen: the digit token of each count 0..MAX_OBJECTS (CPU; indexed by a count tensor)
        self.digit_ids = torch.tensor(tok.convert_tokens_to_ids([str(c) for c in range(S.MAX_OBJECTS + 1)]))
        # --oracle-sets (stage 0q, a diagnostic): a linear map of each frame's true (kind, colour)
        # set added to its frame token (`cached_frames_pass`); None when off
        self.oracle: torch.nn.Linear | None = None

    def frame_words(self, spec: S.SceneSpec, times: list[float]) -> torch.Tensor:
        """(K, len(aux_words)) multi-hot: the colour and kind words of what each frame shows."""
        out = torch.zeros(len(times), len(self.aux_words))
        for k, t in enumerate(times):
            for kind, colour in frame_items(spec, t):
                out[k, self.aux_words.index(kind)] = 1
                out[k, self.aux_words.index(colour)] = 1
        return out.to(self.device)

    def frame_pairs(self, spec: S.SceneSpec, times: list[float]):
        """Binding targets per frame (training only): (K, 35) the (kind, colour) pairs the frame
        shows, (K, 35) the pairs shown by this or any earlier frame of the sample, (K,) how many
        distinct objects (the needle not counted) this and the earlier frames showed."""
        K = len(times)
        now = torch.zeros(K, N_PAIRS)
        seen_objs: set[int] = set()
        cnt = torch.zeros(K, dtype=torch.long)
        for k, t in enumerate(times):
            for i in S.visible_objects(spec, t):
                o = spec.objects[i]
                now[k, pair_index(o.kind, o.colour_at(t))] = 1
                seen_objs.add(i)
            if spec.needle is not None and spec.needle.visible(t):
                now[k, pair_index("star", spec.needle.colour)] = 1
            cnt[k] = min(len(seen_objs), S.MAX_OBJECTS)
        cum = torch.cummax(now, 0).values
        return now.to(self.device), cum.to(self.device), cnt.to(self.device)

    # -- token ids -------------------------------------------------------------------------------
    def question_rows(self, question: str) -> list[int]:
        """Prompt ids after the placeholder (the question's own rows), cached per question text."""
        if question not in self._qcache:
            ids = build_input_ids(self.tok, question)[0].tolist()
            self._qcache[question] = ids[ids.index(IMAGE_TOKEN_INDEX) + 1:]
        return self._qcache[question]

    def referent_row(self, qa: QA, rows: list[int]) -> int:
        """The question row of the word that names what is asked about (the kind of a colour or
        "is there" question, the colour of a shape question): after the first pre-fusion layer
        it has looked at the frame's patches for that word."""
        words = set(S.COLOUR_NAMES) if qa.family == "shape" else set(S.ALL_KINDS)
        ids = {self.tok.convert_tokens_to_ids(w) for w in words}
        return max(i for i, t in enumerate(rows) if t in ids)

    def padded_ids(self, rows: list[list[int]]) -> torch.Tensor:
        """Token id rows padded with <|eot_id|> to the longest: (len(rows), max length), on the device."""
        qid = torch.full((len(rows), max(len(r) for r in rows)), self.eot, dtype=torch.long)
        for b, r in enumerate(rows):
            qid[b, :len(r)] = torch.tensor(r)
        return qid.to(self.device)

    def fuse_rows(self, rows: list[list[int]], ks, vs) -> torch.Tensor:
        """Question rows (padded with <|eot_id|>) through the pre-fusion layers, row b against the
        cached keys/values ks[l][b], vs[l][b] of its frame: (len(rows), max length, H)."""
        m = self.net.model
        qid = self.padded_ids(rows)
        Sq = qid.shape[1]
        x = m.embed_tokens(qid)
        C = ks[0].shape[2]
        cos, sin = self.net.rotary(torch.arange(C, C + Sq, device=self.device), x.dtype)
        for l, layer in enumerate(m.prefusion_layers):
            x = layer.cached(x, cos, sin, ks[l], vs[l], self.fusion)
        return x

    def fuse_questions(self, qid: torch.Tensor, ks, vs, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Question ids (Bq, Sq) through the pre-fusion layers against each of the K frames'
        cached keys/values: the rows per frame (K * Bq, Sq, H) and their average over the frames
        weighted by `w` (K,) (Bq, Sq, H), in float32 as `LlavaMini` averages them."""
        m, H = self.net.model, self.cfg.hidden_size
        K, (Bq, Sq) = ks[0].shape[0], qid.shape
        x = m.embed_tokens(qid)[None].expand(K, -1, -1, -1).reshape(K * Bq, Sq, H)
        C = ks[0].shape[2]
        cos, sin = self.net.rotary(torch.arange(C, C + Sq, device=self.device), x.dtype)
        for l, layer in enumerate(m.prefusion_layers):
            x = layer.cached(x, cos, sin, ks[l].repeat_interleave(Bq, 0), vs[l].repeat_interleave(Bq, 0), self.fusion)
        fused = ((x.float().view(K, Bq, Sq, H) * w[:, None, None, None]).sum(0) / w.sum()).to(x.dtype)
        return x, fused

    def cand_loss(self, logits: torch.Tensor, qas: list[QA], qrows: list[list[int]], ans: list[list[int]]):
        """--cand-set (training only): where a question names its possible answers (order: "the red
        circle or the blue square?"), -log of the mass each answer position puts on the tokens that
        continue one of them (given the right answer's tokens so far), whichever is right, summed:
        the model names one of the two objects asked about, not a third one. Also per such
        position ("cand_in", its most likely token is one of them)."""
        lp, total, res = None, 0.0, []
        for b, (qa, r, a) in enumerate(zip(qas, qrows, ans)):
            if not qa.cands:
                continue
            cids = [self.answer_ids(c) for c in qa.cands]
            for t in range(len(a)):
                allow = sorted({c[t] for c in cids if len(c) > t and c[:t] == a[:t]})
                if len(allow) < 2:
                    continue
                if lp is None:
                    lp = logits.log_softmax(-1)
                row = lp[b, len(r) - 1 + t]
                total = total - row[allow].logsumexp(0)
                res.append(("cand_in", bool(int(row.argmax()) in allow)))
        return total, res

    def answer_rows(self, fused: torch.Tensor, qrows: list[list[int]], ans: list[list[int]]):
        """The rows after the frame tokens, one sequence per question: its fused question rows,
        then its answer's plain embeddings (all but the last token), padded with zeros; and the
        targets (-100 where none): ((Bq, L, H), (Bq, L))."""
        m, dev, H = self.net.model, self.device, self.cfg.hidden_size
        L = max(len(r) + len(a) - 1 for r, a in zip(qrows, ans))
        rows, tgt = [], torch.full((len(qrows), L), -100, dtype=torch.long)
        for b, (r, a) in enumerate(zip(qrows, ans)):
            parts = [fused[b, :len(r)]]
            if len(a) > 1:
                parts.append(m.embed_tokens(torch.tensor(a[:-1], device=dev)))
            seq = torch.cat(parts, 0)
            if seq.shape[0] < L:
                seq = torch.cat([seq, seq.new_zeros(L - seq.shape[0], H)], 0)
            rows.append(seq)
            tgt[b, len(r) - 1:len(r) - 1 + len(a)] = torch.tensor(a)
        return torch.stack(rows, 0), tgt.to(dev)

    def suffix_logits(self, y: torch.Tensor, bk: list, bv: list, N0: int, qv: torch.Tensor | None = None,
                      hook=None) -> torch.Tensor:
        """The LLM over the rows `y` (Bq, L, H) that follow N0 rows whose keys/values per layer are
        bk[i], bv[i] (Bv, nkv, N0, D): with `qv` (Bq,) row b follows video qv[b]'s rows, else
        the one video's (Bv = 1). `hook(att, q, kk, mask)` sees each layer's queries and keys
        (--star-attn). Logits (Bq, L, V) in float32."""
        m, dev = self.net.model, self.device
        Bq, L = y.shape[:2]
        cos, sin = self.net.rotary(torch.arange(N0, N0 + L, device=dev), y.dtype)
        mask = torch.cat([torch.ones(L, N0, dtype=torch.bool),
                          torch.ones(L, L, dtype=torch.bool).tril()], 1).to(dev)
        for i, layer in enumerate(m.layers):
            att = layer.self_attn
            q, k, v = att._qkv(layer.input_layernorm(y), cos, sin)
            ck, cv = (bk[i].expand(Bq, -1, -1, -1), bv[i].expand(Bq, -1, -1, -1)) if qv is None else (bk[i][qv], bv[i][qv])
            kk = torch.cat([ck, k], 2)
            vv = torch.cat([cv, v], 2)
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=att.scale,
                                               enable_gqa=att.nh != att.nkv)
            if hook is not None:
                hook(att, q, kk, mask)
            y = layer._finish(y, att._out(o))
        return self.net.lm_head(m.norm(y)).float()

    def answer_ids(self, answer: str) -> list[int]:
        words = S.tokenize_words(answer)
        return self.tok.convert_tokens_to_ids(words) + [self.eot]

    # -- ingest ----------------------------------------------------------------------------------
    def encode(self, px: torch.Tensor, V: torch.Tensor | None = None):
        """pixels (B,3,S,S) -> tokens (B,nq,H), keys/values per layer (B,nkv,C,D), prefix_out (B,P,H).
        `V`: the tower's patch features of `px`, when the caller already has them (`px` may then be
        None)."""
        if V is None:
            V = self.vision(px)
        return prefuse(self.net, self.net.model.compressor, V, self.prefix)

    # -- one video, all its questions -------------------------------------------------------------
    def video_loss(self, tokens, ks, vs, prefix_out, reps: torch.Tensor, qas: list[QA], *,
                   frame_grad: bool = True, frame_words: torch.Tensor | None = None, aux: list | None = None,
                   pairs=None, heads=None, bind: list | None = None, local=None, local_out: list | None = None,
                   star: tuple[list[int], list] | None = None, length: float = 0.0,
                   weights: dict[str, float] | None = None):
        """Summed cross-entropy over the answer tokens of `qas` (with `weights`, each question's
        times its family's weight, 1 when not named), the number of target tokens, and
        per-question (family, first-token correct). `star` = (indices of distinct frames, each
        shown once: the needle star's, or one list per question; out list): appends, per LLM
        layer, the log of the attention mass (Bq, heads) that each question's last row (the one
        that predicts the answer) puts on those frames' rows (--star-attn, --order-attn; -inf for
        a question with no frames); with `length` > the rows there are, as if every other row were
        repeated to make the video that long (the mass a 3-hour video would leave)."""
        m, dev = self.net.model, self.device
        H = self.cfg.hidden_size
        K = tokens.shape[0]
        w = reps.to(dev, torch.float32)
        n = w.sum()
        # fused prefix (question-independent) and the frame tokens, repeated over their spans
        pre = ((prefix_out.float() * w[:, None, None]).sum(0) / n).to(tokens.dtype)         # (P, H)
        vis = torch.repeat_interleave(tokens.reshape(K, -1), reps.to(dev), dim=0)           # (T, H)
        base = torch.cat([pre, vis], 0)[None]                                               # (1, N0, H)
        N0 = base.shape[1]
        with torch.set_grad_enabled(frame_grad and torch.is_grad_enabled()):
            cos, sin = self.net.rotary(torch.arange(N0, device=dev), base.dtype)
            h, bk, bv = base, [], []
            want_bind = pairs is not None and heads is not None and bind is not None and torch.is_grad_enabled()
            r = reps.to(dev)
            idx = pre.shape[0] + torch.cumsum(r, 0) - r                     # each distinct frame's first row
            for li, layer in enumerate(m.layers):
                h, k, v = layer.full(h, cos, sin)
                bk.append(k)
                bv.append(v)
                if want_bind and li + 1 == heads.layer:
                    # binding (training only): after `heads.layer` LLM layers each frame row holds
                    # the (kind, colour) pairs seen so far and how many objects, for the question
                    # rows' later layers to read
                    hh = _rms(h[0, idx]).float()
                    cum_loss = F.binary_cross_entropy_with_logits(heads.cum(hh), pairs[1], reduction="sum") \
                        + F.cross_entropy(heads.cnt(hh), pairs[2], reduction="sum")
            if want_bind:
                # the frame token itself names the (kind, colour) pairs its frame shows
                now_loss = F.binary_cross_entropy_with_logits(heads.now(_rms(tokens.reshape(K, -1)).float()),
                                                              pairs[0], reduction="sum")
                bind.append(now_loss + cum_loss)
                bind.append(K)
            if frame_words is not None and aux is not None and torch.is_grad_enabled():
                # auxiliary (training only; the outputs at frame rows are unused at inference):
                # each frame row's own LLM output names the colours and kinds it shows
                fl = self.net.lm_head(m.norm(h[0, idx]))[:, self.aux_ids].float()
                aux.append(F.binary_cross_entropy_with_logits(fl, frame_words, reduction="sum") / fl.shape[1])
                aux.append(fl.shape[0])        # question rows, padded; fused with every distinct frame
        qrows = [self.question_rows(q.question) for q in qas]
        ans = [self.answer_ids(q.answer) for q in qas]
        qid = self.padded_ids(qrows)
        Bq, Sq = qid.shape
        x, fused = self.fuse_questions(qid, ks, vs, w)
        if local is not None and local_out is not None and torch.is_grad_enabled():
            # --local (training only): the question's referent row, fused with each frame, names
            # what that frame shows about it; the same read-out of the average names the answer
            head, spec, times = local
            xs = x.view(K, Bq, Sq, H)
            for b, qa in enumerate(qas):
                tg = local_targets(spec, times, qa)
                if tg is None:
                    continue
                row = self.referent_row(qa, qrows[b])
                per = F.cross_entropy(head.lin(_rms(xs[:, b, row]).float()), torch.tensor(tg[0], device=dev),
                                      reduction="none")
                vid = F.cross_entropy(head.lin(_rms(fused[b, row]).float())[None], torch.tensor([tg[1]], device=dev))
                term = (per * w).sum() / n + vid
                none = [k for k, y in enumerate(tg[0]) if y == 0]
                if head.null and len(none) >= 2:
                    ii = torch.tensor(none, device=dev)
                    span = null_span(row, len(qrows[b]), head.null_rows)
                    R = len(span)
                    tail = xs[ii, b, span.start:span.stop].reshape(len(none) * R, H)
                    term = term + head.null * null_spread(tail, list(range(R)) * len(none),
                                                          w[ii].repeat_interleave(R)) / (n * R)
                local_out.append(term)
        y, tgt = self.answer_rows(fused, qrows, ans)
        L = y.shape[1]
        hook = None
        if star is not None:
            # (Bq, N0 + L): the rows each question's answer row should look at
            first_row = (pre.shape[0] + torch.cumsum(reps, 0) - reps).tolist()
            per_q = star[0] if star[0] and isinstance(star[0][0], list) else [star[0]] * Bq
            on = torch.zeros(Bq, N0 + L, dtype=torch.bool, device=dev)
            for b, ks_ in enumerate(per_q):
                on[b, [first_row[k] for k in ks_]] = True
            on = on[:, None]
            last = torch.tensor([len(r) - 1 for r in qrows], device=dev)

            def hook(att, q, kk, mask):
                ql = q[torch.arange(Bq, device=dev), :, last]                               # (Bq, nh, D)
                kx = kk.repeat_interleave(att.nh // att.nkv, 1)                             # (Bq, nh, N, D)
                sc = torch.einsum("bhd,bhnd->bhn", ql, kx).float() * att.scale
                sc = sc.masked_fill(~mask[last][:, None], float("-inf"))
                lse_on = sc.masked_fill(~on, float("-inf")).logsumexp(-1)
                # the other rows as if the video were `length` frames long (each repeated)
                lse_off = sc.masked_fill(on, float("-inf")).logsumexp(-1) + math.log(max(1.0, length / N0))
                star[1].append(lse_on - torch.logaddexp(lse_on, lse_off))                 # (Bq, nh) log-mass
        logits = self.suffix_logits(y, bk, bv, N0, hook=hook)                               # (Bq, L, V)
        if weights is None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                                   reduction="sum")
        else:
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                                 reduction="none").view(tgt.shape)
            loss = (ce.sum(1) * torch.tensor([weights.get(q.family, 1.0) for q in qas], device=dev)).sum()
        with torch.no_grad():
            pred = logits.argmax(-1)
            ok = ((pred == tgt) | (tgt == -100)).all(1).tolist()
        res = [(q.family, bool(c)) for q, c in zip(qas, ok)]
        if self.cand_set and torch.is_grad_enabled():
            extra, more = self.cand_loss(logits, qas, qrows, ans)
            loss, res = loss + self.cand_set * extra, res + more
        return loss, int((tgt != -100).sum()), res


def check_exact(trainer: Trainer, px: torch.Tensor, question: str, answer: str) -> float:
    """Max |logit difference| between the training forward and the inference engine
    (`LlavaMini.fuse_question` + its LLM, the answer fed as generated tokens)."""
    net, vision = trainer.net, trainer.vision
    was = net.training
    eng = LlavaMini(net, vision, trainer.cfg, trainer.tok)
    from triton_kernels.fusion_attention import fusion_attention_reference
    eng.fusion_attention = fusion_attention_reference
    net.model.compressor.invalidate()
    with torch.no_grad():
        states = eng.encode_frames(px)
        embeds, _ = eng.fuse_question(eng.prompt_ids(question), states)
        a = trainer.answer_ids(answer)
        full = torch.cat([embeds, net.model.embed_tokens(torch.tensor([a[:-1]], device=trainer.device))], 1)
        ref = eng._llm(full, None, all_logits=True)[0, embeds.shape[1] - 1:]
        tokens, ks, vs, po = trainer.encode(px)
        qa = QA("check", question, answer)
        # re-run the training forward and capture its logits
        logits = _train_logits(trainer, tokens, ks, vs, po, qa)
    net.train(was)
    net.model.compressor.invalidate()
    return float((logits - ref).abs().max())


def _train_logits(trainer: Trainer, tokens, ks, vs, po, qa: QA) -> torch.Tensor:
    captured = {}
    orig = trainer.net.lm_head.forward

    def hook(x):
        out = orig(x)
        captured["l"] = out
        return out
    trainer.net.lm_head.forward = hook
    try:
        trainer.video_loss(tokens, ks, vs, po, torch.ones(tokens.shape[0], dtype=torch.long), [qa])
    finally:
        trainer.net.lm_head.forward = orig
    r = len(trainer.question_rows(qa.question))
    n = len(trainer.answer_ids(qa.answer))
    return captured["l"][0, r - 1:r - 1 + n].float()


# =========================================================================== stage 0: vision
N_COLOURS = len(S.COLOUR_NAMES)
N_CLASSES = 1 + len(S.ALL_KINDS) * N_COLOURS          # background + (kind incl. star) x colour
N_PAIRS = N_CLASSES - 1                                # (kind incl. star, colour)


def pair_index(kind: str, colour: str) -> int:
    return S.ALL_KINDS.index(kind) * N_COLOURS + S.COLOUR_NAMES.index(colour)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class BindHeads(torch.nn.Module):
    """Training-only linear read-outs (dropped when saving, like stage 0's heads): `now` on the
    frame token (pairs in the frame), `cum` and `cnt` on the frame rows after `layer` LLM layers
    (pairs seen so far, objects seen so far)."""

    def __init__(self, hidden: int, layer: int):
        super().__init__()
        self.layer = layer
        self.now = torch.nn.Linear(hidden, N_PAIRS)
        self.cum = torch.nn.Linear(hidden, N_PAIRS)
        self.cnt = torch.nn.Linear(hidden, S.MAX_OBJECTS + 1)


class LocalHead(torch.nn.Module):
    """Training-only (dropped when saving): reads `LOCAL_CLASSES` from a question's referent row
    (`Trainer.referent_row`) fused with one frame, and from the average over frames that the LLM
    sees. One linear map for both, so an absent object's frames must read "none" and leave the
    present frames' class on top of the average (a short appearance's dilution cannot flip it)."""

    def __init__(self, hidden: int, null: float = 0.0, null_rows: str = "rest"):
        super().__init__()
        self.lin = torch.nn.Linear(hidden, len(LOCAL_CLASSES))
        self.null = null                   # --null: weight of `null_spread` on the "none" frames
        self.null_rows = null_rows         # --null-rows: "rest" (referent word on) or "referent"


# --local: what one frame says about a question, for a training-only read-out of the question's
# referent row fused with that frame (before the average over frames)
LOCAL_CLASSES = ("none",) + S.COLOUR_NAMES + S.ALL_KINDS + ("yes",)
LOCAL_FAMILIES = ("colour", "shape", "exists", "needle")


def null_span(ref: int, n_rows: int, mode: str) -> range:
    """The question rows --null holds to one row: the referent word's and every later one of the
    question's `n_rows` ("rest"), or the referent word's only ("referent", --null-rows)."""
    return range(ref, ref + 1 if mode == "referent" else n_rows)


def null_spread(rows: torch.Tensor, groups: list, weights: torch.Tensor | None = None) -> torch.Tensor:
    """--null: how far the question rows (the referent word's and every later one) of frames that
    do not show what is asked about ("none") spread around their own mean, per group (one question
    and row): sum of w * mean((rms(row) - mean)^2) over rows. Those frames then add the same row
    to the frame average whatever else they show, so the average leans only toward the frames that
    do show it (no other object's colour leaks in). `rows` (N, H), `groups` one key per row,
    `weights` (N,) or None (all 1)."""
    x = _rms(rows).float()
    w = torch.ones(len(groups), device=rows.device) if weights is None else weights.float()
    total = x.new_zeros(())
    keys: dict = {}
    for i, g in enumerate(groups):
        keys.setdefault(g, []).append(i)
    for idx in keys.values():
        if len(idx) < 2:
            continue
        ii = torch.tensor(idx, device=rows.device)
        xw, ww = x[ii], w[ii]
        mean = (xw * ww[:, None]).sum(0) / ww.sum()
        total = total + (ww * ((xw - mean) ** 2).mean(-1)).sum()
    return total


def local_targets(spec: S.SceneSpec, times: list[float], qa: QA) -> tuple[list[int], int] | None:
    """Per-frame and whole-video classes of `LOCAL_CLASSES` for a colour, shape or "is there"
    question: the colour of the named kind / the kind of the named colour / "yes" when the named
    (colour, kind) is on screen in that frame, else "none"; the whole video's class is the
    answer ("none" for a "no"). None for other questions."""
    if qa.family not in LOCAL_FAMILIES:
        return None
    words = S.tokenize_words(qa.question)
    cols = [w for w in words if w in S.COLOUR_NAMES]
    kinds = [w for w in words if w in S.ALL_KINDS]
    if qa.family == "colour" and len(kinds) == 1:
        key = lambda items: next((LOCAL_CLASSES.index(c) for k, c in items if k == kinds[0]), 0)  # noqa: E731
        video = LOCAL_CLASSES.index(qa.answer) if qa.answer in LOCAL_CLASSES else None
    elif qa.family == "shape" and len(cols) == 1:
        key = lambda items: next((LOCAL_CLASSES.index(k) for k, c in items if c == cols[0]), 0)  # noqa: E731
        video = LOCAL_CLASSES.index(qa.answer) if qa.answer in LOCAL_CLASSES else None
    elif qa.family in ("exists", "needle") and len(cols) == 1 and len(kinds) == 1 and qa.answer in ("yes", "no"):
        key = lambda items: LOCAL_CLASSES.index("yes") if (kinds[0], cols[0]) in items else 0  # noqa: E731
        video = LOCAL_CLASSES.index("yes") if qa.answer == "yes" else 0
    else:
        return None
    if video is None:
        return None
    return [key(frame_items(spec, t)) for t in times], video


def frame_labels(spec: S.SceneSpec, t: float, patch: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch class (the object covering most of the patch, if >= 1/8 of it; else background)
    and the frame's multi-hot set of (kind, colour) items, from the exact label map (squashed to
    `size` x `size` with the nearest-neighbour rule the frame's pixels go through, for --canvas)."""
    lab = S.label_map(spec, t).astype(np.int64)                       # -1 bg, i, needle_label
    if lab.shape != (size, size):
        lab = F.interpolate(torch.from_numpy(lab)[None, None].double(), size=(size, size))[0, 0].long().numpy()
    cls_of = np.zeros(len(spec.objects) + 2, dtype=np.int64)           # index lab + 1
    for i, o in enumerate(spec.objects):
        cls_of[i + 1] = 1 + S.ALL_KINDS.index(o.kind) * N_COLOURS + S.COLOUR_NAMES.index(o.colour_at(t))
    if spec.needle is not None:
        cls_of[spec.needle_label + 1] = 1 + S.ALL_KINDS.index("star") * N_COLOURS + S.COLOUR_NAMES.index(spec.needle.colour)
    cl = cls_of[lab + 1]                                               # (H, W) class per pixel
    H, W = cl.shape
    g = cl.reshape(H // patch, patch, W // patch, patch).transpose(0, 2, 1, 3).reshape(-1, patch * patch)
    counts = np.bincount((np.arange(g.shape[0])[:, None] * N_CLASSES + g).reshape(-1),
                         minlength=g.shape[0] * N_CLASSES).reshape(g.shape[0], N_CLASSES)
    fg = counts[:, 1:]
    best = fg.argmax(1)
    patch_cls = np.where(fg.max(1) * 8 >= patch * patch, best + 1, 0)
    present = np.zeros(N_CLASSES - 1, dtype=np.float32)
    ids = np.unique(cl[cl > 0])
    present[ids - 1] = 1
    return patch_cls, present


def render_square(spec: S.SceneSpec, t: float, size: int = 64) -> np.ndarray:
    """The frame at `t`, squashed to `size` x `size` as the pipeline squashes it (a --canvas scene
    is drawn larger or non-square), so frames of different canvases stack into one batch."""
    f = S.render_frame(spec, t)
    if f.shape[:2] != (size, size):
        from stream.preprocess import resize_frame_nearest
        f = resize_frame_nearest(f, size)
    return f


def random_scene(rng: np.random.Generator) -> S.SceneSpec:
    """A training scene of 10-199 s (seed below TRAIN_SEED_LIMIT), with a needle half the time."""
    return train_scene(int(rng.integers(TRAIN_SEED_LIMIT)), int(rng.integers(10, 200)),
                       needle=bool(rng.random() < 0.5))


def random_time(spec: S.SceneSpec, rng: np.random.Generator, p_needle: float) -> float:
    """A frame time of `spec`: while its needle shows with probability `p_needle` (scenes with one),
    else anywhere."""
    if spec.needle is not None and rng.random() < p_needle:
        return float(rng.integers(int(spec.needle.t_appear), int(spec.needle.t_leave)))
    return float(rng.integers(spec.n_frames))


def vision_batch(rng: np.random.Generator, n: int, patch: int):
    frames, pcls, pres = [], [], []
    while len(frames) < n:
        spec = random_scene(rng)
        for _ in range(8):
            t = random_time(spec, rng, 0.5)
            frames.append(render_square(spec, t))
            a, b = frame_labels(spec, t, patch)
            pcls.append(a)
            pres.append(b)
    frames = np.stack(frames[:n])
    if rng.random() < 0.5:
        frames = codec_like(frames, rng)
    return frames, torch.from_numpy(np.stack(pcls[:n])), torch.from_numpy(np.stack(pres[:n]))


def pretrain_vision(net: LlavaMiniNet, vision: VisionTower, a, dev, log: dict, t_start: float, tok=None, cfg=None) -> None:
    """Stage 0: the CLIP-like tower (and the compressor) learn what is where, from exact frame
    labels: per-patch colour and kind classifiers on the selected layer's patch features and a
    multi-label (kind, colour) head on the compressor's output. The heads are then dropped:
    the real CLIP comes pretrained, ours is pretrained here."""
    nk = len(S.ALL_KINDS)
    H = net.model.embed_tokens.weight.shape[1]
    colour_head = torch.nn.Linear(H, N_COLOURS + 1).to(dev)
    kind_head = torch.nn.Linear(H, nk + 1).to(dev)
    set_head = torch.nn.Linear(H, N_CLASSES - 1).to(dev)
    # issue 11's stage-0 levers (made only when on, so the default run draws the same numbers)
    pair_head = torch.nn.Linear(H, N_CLASSES).to(dev) if a.pair_loss else None     # background + pairs
    tok_head = torch.nn.Linear(H, N_PAIRS).to(dev) if a.token_set else None        # on the frame token
    slot_head = SlotHead(net.model.compressor).to(dev) if a.slot_loss else None      # per-head colour slots
    comp, proj = net.model.compressor, net.model.mm_projector
    trained = [comp] if a.compressor_only else [vision, comp, proj]
    heads = [colour_head, kind_head, set_head]
    if a.pair_loss:
        heads.append(pair_head)
    if a.token_set:
        trained += [net.model.prefusion_layers, net.model.embed_tokens]
        heads.append(tok_head)
    if slot_head is not None:
        heads.append(slot_head)
    params = [p for mod in trained for p in mod.parameters() if p.requires_grad] + \
        [p for h in heads for p in h.parameters()]
    trainer = Trainer(net, vision, cfg, tok, dev) if a.token_set else None
    wp = torch.ones(N_CLASSES, device=dev)
    wp[0] = 0.2
    opt = torch.optim.AdamW(params, lr=a.vision_lr, betas=(0.9, 0.98), weight_decay=0.01)
    wc = torch.ones(N_COLOURS + 1, device=dev)
    wk = torch.ones(nk + 1, device=dev)
    wc[0] = wk[0] = 0.2
    curve = []
    for step in range(a.vision_steps):
        rng = np.random.default_rng([a.seed, 0x0715, step])
        frames, pcls, pres = vision_batch(rng, a.vision_batch, a.patch)
        px = preprocess(frames, a.image_size).to(dev)
        pc = pcls.to(dev).reshape(-1)
        col = torch.where(pc > 0, (pc - 1) % N_COLOURS + 1, 0)
        kin = torch.where(pc > 0, (pc - 1) // N_COLOURS + 1, 0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.vision_steps, a.vision_lr, 50)
        with torch.set_grad_enabled(not a.compressor_only):
            V = vision(px)
        c = proj(comp.forward_mha(V))[:, 0]            # the frame token's start, P(c)
        Vf = proj(V).reshape(-1, H)                     # the patch rows, P(V)
        lc = F.cross_entropy(colour_head(Vf), col, weight=wc)
        lk = F.cross_entropy(kind_head(Vf), kin, weight=wk)
        ls = F.binary_cross_entropy_with_logits(set_head(c), pres.to(dev))
        # keep features O(1) and centred over frames: the RMS norms downstream then see the
        # content, not a large common offset
        act = V.pow(2).mean() + Vf.pow(2).mean() + c.pow(2).mean() + \
            10 * (c.mean(0).pow(2).mean() + Vf.mean(0).pow(2).mean())
        loss = lc + lk + a.set_weight * ls + a.act_penalty * act
        if a.pair_loss:
            loss = loss + a.pair_loss * F.cross_entropy(pair_head(Vf), pc, weight=wp)
        if slot_head is not None:
            slot_l, slot_ok = slot_head.loss(comp, V, pres.to(dev))
            loss = loss + a.slot_loss * slot_l
        if a.token_set:
            tokens = trainer.encode(px)[0][:, 0]
            loss = loss + a.token_set * F.binary_cross_entropy_with_logits(tok_head(_rms(tokens)), pres.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % a.log_every == 0 or step == a.vision_steps - 1:
            with torch.no_grad():
                fg = pc > 0
                ok_c = colour_head(Vf).argmax(-1) == col
                ok_k = kind_head(Vf).argmax(-1) == kin
                kind_acc = float(ok_k[fg].float().mean()) if fg.any() else float("nan")
                col_acc = float(ok_c[fg].float().mean()) if fg.any() else float("nan")
                sets = float(((set_head(c) > 0).float() == pres.to(dev)).all(1).float().mean())
            el = time.perf_counter() - t_start
            curve.append({"step": step, "loss": round(float(loss.detach()), 4), "set_loss": round(float(ls.detach()), 4),
                          "object_patch_colour_acc": round(col_acc, 3), "object_patch_kind_acc": round(kind_acc, 3),
                          "frame_set_exact": round(sets, 3), "feature_rms": round(float(V.detach().pow(2).mean().sqrt()), 3),
                          "elapsed_s": round(el, 1)})
            if slot_head is not None:
                curve[-1]["slot_loss"] = round(float(slot_l.detach()), 4)
                curve[-1]["slot_exact"] = round(float(slot_ok), 3)
            say(f"[train_demo] vision {step:5d}/{a.vision_steps} loss {float(loss.detach()):.3f} "
                f"set {float(ls.detach()):.4f} patch colour {col_acc:.2f} kind {kind_acc:.2f} "
                f"frame-set exact {sets:.2f} feature rms {float(V.detach().pow(2).mean().sqrt()):.2f}"
                + (f" slots {float(slot_l.detach()):.4f} exact {float(slot_ok):.2f}" if slot_head is not None else "")
                + f" {el / 60:5.1f} min")
    log["vision_curve"] = curve
    if a.vision_steps:
        log["vision_probe"] = set_probe(net, vision, set_head, tok_head if a.token_set else None, trainer, a, dev)


def adapt_tower(vision: VisionTower, a, dev, log: dict, t_start: float) -> None:
    """Stage 0a (--tower-adapt N): teach the trained tower squashed frames (--canvas's CANVASES) and
    other shades of the colour names (`shaded_palette`) without changing what it already gives the
    layers after it. A frozen copy of the tower is the teacher. Each step draws `--tower-batch`
    scenes at one moment each and renders each three ways: native (64x64, this palette), shaded
    (the same frame in a shaded palette: pixel for pixel the same geometry) and on another canvas
    (squashed, shaded half the time). Loss: the student's patch features of the native frame and
    of the shaded one must equal the teacher's of the native frame (mean squared error), and those
    of the squashed frame must be read as the right patch class by a linear read-out fitted on the
    teacher's features and kept fixed (cross-entropy), and lie near the teacher's mean feature of
    that class (mean squared error). Only the tower trains."""
    teacher = copy.deepcopy(vision).eval().requires_grad_(False)
    vision.train().requires_grad_(True)
    B, patch, size = a.tower_batch, a.patch, a.image_size

    def draw(rng):
        nat, shd, can, lab_n, lab_c = [], [], [], [], []
        while len(nat) < B:
            seed, d = int(rng.integers(TRAIN_SEED_LIMIT)), int(rng.integers(10, 200))
            spec = S.make_scene(seed, d, needle=bool(rng.random() < 0.5))
            t = random_time(spec, rng, 0.3)
            wide = S.make_scene(seed, d, size=CANVASES[int(rng.integers(len(CANVASES)))],
                                needle=spec.needle is not None)
            if rng.random() < 0.5:
                wide.palette = shaded_palette(rng)
            nat.append(S.render_frame(spec, t))
            shd.append(S.render_frame(dataclasses.replace(spec, palette=shaded_palette(rng)), t))
            can.append(render_square(wide, t, size))
            lab_n.append(frame_labels(spec, t, patch, size)[0])
            lab_c.append(frame_labels(wide, t, patch, size)[0])
        return (np.stack(nat), np.stack(shd), np.stack(can), torch.from_numpy(np.stack(lab_n)).to(dev),
                torch.from_numpy(np.stack(lab_c)).to(dev))

    # the teacher's read-out: class means and a linear classifier of its patch features
    rng = np.random.default_rng([a.seed, 0x70AD])
    feats, labs = [], []
    with torch.no_grad():
        for _ in range(max(1, 2048 // B)):
            nat, _, _, lab_n, _ = draw(rng)
            feats.append(teacher(preprocess(nat, size).to(dev)).reshape(-1, vision.width))
            labs.append(lab_n.reshape(-1))
    feats, labs = torch.cat(feats), torch.cat(labs)
    counts = torch.bincount(labs, minlength=N_CLASSES)
    means = torch.zeros(N_CLASSES, vision.width, device=dev).index_add_(0, labs, feats)
    means /= counts.clamp(min=1).unsqueeze(1).float()
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    head = torch.nn.Linear(vision.width, N_CLASSES).to(dev)
    hopt = torch.optim.LBFGS(head.parameters(), max_iter=300)
    xs = (feats - mu) / sd

    def closure():
        hopt.zero_grad()
        loss = F.cross_entropy(head(xs), labs) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        hopt.step(closure)
    head.requires_grad_(False)
    with torch.no_grad():
        fit_acc = float((head(xs).argmax(1) == labs).float().mean())
    opt = torch.optim.AdamW(vision.parameters(), lr=a.tower_lr, weight_decay=0.0)
    curve = []
    say(f"[train_demo] tower-adapt: teacher read-out on {len(labs)} patches {fit_acc:.3f}, "
        f"{int((counts > 0).sum())} classes seen")
    for step in range(a.tower_adapt):
        rng = np.random.default_rng([a.seed, 0x70AE, step])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.tower_adapt, a.tower_lr, 20)
        nat, shd, can, lab_n, lab_c = draw(rng)
        if rng.random() < 0.5:
            nat, shd, can = (codec_like(x, rng) for x in (nat, shd, can))
        px = preprocess(np.concatenate([nat, shd, can]), size).to(dev)
        with torch.no_grad():
            target = teacher(px[:B])
        f = vision(px)
        keep = F.mse_loss(f[:B], target) + F.mse_loss(f[B:2 * B], target)
        fc = f[2 * B:].reshape(-1, vision.width)
        lc = lab_c.reshape(-1)
        logits = head((fc - mu) / sd)
        ce = F.cross_entropy(logits, lc)
        near = F.mse_loss(fc, means[lc])
        clipped_step(opt, list(vision.parameters()), keep + ce + near)
        if step % a.log_every == 0 or step == a.tower_adapt - 1:
            with torch.no_grad():
                acc_c = float((logits.argmax(1) == lc)[lc > 0].float().mean())
                ln = lab_n.reshape(-1)
                acc_s = float((head((f[B:2 * B].reshape(-1, vision.width) - mu) / sd).argmax(1) == ln)[ln > 0]
                              .float().mean())
            row = {"step": step, "keep": float(keep.detach()), "ce": float(ce.detach()),
                   "near": float(near.detach()), "canvas_object_patch_acc": acc_c, "shaded_object_patch_acc": acc_s}
            curve.append(row)
            say(f"[train_demo] tower {step:5d}/{a.tower_adapt} keep {row['keep']:.4f} ce {row['ce']:.3f} "
                f"near {row['near']:.4f} | object patches read right: canvas {acc_c:.2f} shaded {acc_s:.2f} "
                f"{(time.perf_counter() - t_start) / 60:5.1f} min")
    log["tower_adapt"] = {"teacher_readout_acc": fit_acc, "curve": curve}
    vision.eval()


class SlotHead(torch.nn.Module):
    """--slot-loss (stage 0, training only): the compressor's one query has 8 heads; head h < 7
    must name the kinds (the star included) of the colour-h objects on screen, from its own
    attention output alone. A head can only do that by attending to colour-h patches, so the
    frame token becomes 7 colour slots, each holding what has that colour (one token per frame
    then keeps every object on screen, not about one: the one-object limit issue 11's count
    and order questions ran into). Head 7 stays free."""

    def __init__(self, comp):
        super().__init__()
        self.nh, self.hd = comp.num_heads, comp.embed_dim // comp.num_heads
        if self.nh < N_COLOURS:
            raise ValueError(f"--slot-loss needs >= {N_COLOURS} compressor heads, got {self.nh}")
        nk = len(S.ALL_KINDS)
        self.w = torch.nn.Parameter(torch.randn(N_COLOURS, self.hd, nk) / math.sqrt(self.hd))
        self.b = torch.nn.Parameter(torch.zeros(N_COLOURS, nk))

    @staticmethod
    def head_outputs(comp, V: torch.Tensor) -> torch.Tensor:
        """(B, heads, head_dim): each head's attention output before out_proj, the same numbers
        `nn.MultiheadAttention` forms inside `comp.forward_mha`."""
        E, nh = comp.embed_dim, comp.num_heads
        hd = E // nh
        W, b = comp.attn.in_proj_weight, comp.attn.in_proj_bias
        pos_kv = interpolate_pos(comp.pos_embed, V.size(1)).type_as(V)
        kv = comp.ln_kv(V)
        q0 = comp.ln_q(comp.query)[:1] + comp.pos_embed[:1].type_as(V)               # (1, E)
        q = (q0 @ W[:E].T + b[:E]).view(nh, hd)
        k = ((kv + pos_kv) @ W[E:2 * E].T + b[E:2 * E]).view(V.size(0), -1, nh, hd)
        v = (kv @ W[2 * E:].T + b[2 * E:]).view(V.size(0), -1, nh, hd)
        att = torch.einsum("hd,bnhd->bhn", q, k).mul(hd ** -0.5).softmax(-1)
        return torch.einsum("bhn,bnhd->bhd", att, v)

    @staticmethod
    def targets(pres: torch.Tensor) -> torch.Tensor:
        """(B, colours, kinds) from the frames' (kind, colour) multi-hot sets (`pair_index` order):
        slot c, entry k is 1 when a kind-k object of colour c is on screen."""
        return pres.view(-1, len(S.ALL_KINDS), N_COLOURS).transpose(1, 2)

    def loss(self, comp, V: torch.Tensor, pres: torch.Tensor):
        """BCE of every colour slot's kinds against the frame's (kind, colour) set; and the share
        of frames whose every slot is right."""
        o = self.head_outputs(comp, V)[:, :N_COLOURS]                                # (B, 7, hd)
        logits = torch.einsum("bch,chk->bck", o, self.w) + self.b                   # (B, 7, kinds)
        tgt = self.targets(pres)                                                    # (B, 7, kinds)
        with torch.no_grad():
            ok = ((logits > 0).float() == tgt).flatten(1).all(1).float().mean()
        return F.binary_cross_entropy_with_logits(logits, tgt), ok


def set_probe(net, vision, set_head, tok_head, trainer, a, dev, n: int = 512) -> dict:
    """Held-out frames (scene seeds >= 10**9): how often stage 0's set heads name exactly the
    (kind, colour) pairs on screen, by how many are on screen (what one frame token holds)."""
    rng = np.random.default_rng(123)
    frames, pres = [], []
    while len(frames) < n:
        spec = S.make_scene(10 ** 9 + int(rng.integers(10 ** 6)), int(rng.integers(10, 200)),
                            needle=bool(rng.random() < 0.5))
        for _ in range(4):
            t = float(rng.integers(spec.n_frames))
            frames.append(S.render_frame(spec, t))
            pres.append(frame_labels(spec, t, a.patch)[1])
    px = preprocess(np.stack(frames[:n]), a.image_size).to(dev)
    pres = torch.from_numpy(np.stack(pres[:n])).to(dev)
    k = pres.sum(1)
    out = {}
    with torch.no_grad():
        reads = {"P(c)": set_head(net.model.mm_projector(net.model.compressor.forward_mha(vision(px)))[:, 0])}
        if tok_head is not None:
            reads["token"] = tok_head(_rms(trainer.encode(px)[0][:, 0]))
        for name, logits in reads.items():
            out[name] = {str(c): {"exact": v, "frames": int((k == c).sum())}
                         for c, v in exact_sets(logits, pres, k).items()}
            say(f"[train_demo] vision probe {name}: exact (kind, colour) set by pairs on screen "
                + " ".join(f"{c}: {v['exact']:.2f} ({v['frames']})" for c, v in out[name].items()))
    return out


# =========================================================================== stage 0t: the tower tells objects apart
class SetReader(torch.nn.Module):
    """A read-out of a frame's or a video's rows: a class row before `length` input rows of width
    `d_in` (learned positions, drawn with `pos_std` or zero), two transformer layers of width 128,
    `n_out` logits from the class row. Stage 0t's (and `probe_demo --sets`') set read-out over the
    tower's 64 patch features; `probe_demo`'s count read-out over a video's frame tokens."""

    def __init__(self, d_in: int, length: int, n_out: int, dropout: float, pos_std: float):
        super().__init__()
        self.inp = torch.nn.Linear(d_in, 128)
        self.enc = torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(128, 4, 256, dropout, batch_first=True), 2)
        self.out = torch.nn.Linear(128, n_out)
        self.pos = torch.nn.Parameter(torch.randn(length, 128) * pos_std if pos_std else torch.zeros(length, 128))
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.cls.expand(len(x), -1, -1), self.inp(x) + self.pos], 1)
        return self.out(self.enc(h)[:, 0])


SET_SCENE_S = 60            # set_batch's scenes: seconds, and frames at 1 fps


def set_batch(seed0: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """`n` frames with at least one object on screen, of 60 s scenes with 2-5 objects (seeds
    `seed0` + [0, 10**6): 0 for training, 10**9 for held-out frames), no needle: the frames (n, S,
    S, 3), the (kind, colour) pairs on screen (n, N_PAIRS) and how many there are (n,)."""
    imgs, ys, counts = [], [], []

    def draw() -> tuple[int, int, float]:
        # the frame's moment does not depend on the scene (SET_SCENE_S frames at 1 fps), so a
        # candidate's three draws can be made before its scene is built, here or in a worker
        return (seed0 + int(rng.integers(10 ** 6)), int(rng.integers(2, S.MAX_OBJECTS + 1)),
                float(rng.integers(SET_SCENE_S)))

    while len(imgs) < n:
        if _POOL:
            snap = rng.bit_generator.state
            cands = [draw() for _ in range(max(8, 2 * (n - len(imgs))))]
            done = _POOL[0].map(_set_frame, cands, chunksize=8)
        else:
            cands = [draw()]
            done = [_set_frame(cands[0])]
        for used, got in enumerate(done, 1):
            if got is None:
                continue
            img, items = got
            y = torch.zeros(N_PAIRS)
            for kind, colour in items:
                y[pair_index(kind, colour)] = 1
            imgs.append(img)
            ys.append(y)
            counts.append(len(items))
            if len(imgs) == n:
                if _POOL and used < len(cands):    # leave rng where drawing one by one would have
                    rng.bit_generator.state = snap
                    for _ in range(used):
                        draw()
                break
    return np.stack(imgs), torch.stack(ys), torch.tensor(counts)


def _set_frame(cand: tuple[int, int, float]) -> tuple[np.ndarray, list[tuple[str, str]]] | None:
    """`set_batch`'s candidate (scene seed, objects, moment): its frame and what is on screen, or
    None when nothing is."""
    seed, n_objects, t = cand
    spec = S.make_scene(seed, SET_SCENE_S, needle=False, n_objects=n_objects, events=False)
    assert spec.n_frames == SET_SCENE_S, spec.n_frames
    items = frame_items(spec, t)
    return (S.render_frame(spec, t), items) if items else None


def exact_sets(logits: torch.Tensor, y: torch.Tensor, k: torch.Tensor) -> dict:
    """Share of frames whose whole set (`logits` > 0) equals `y`, by objects on screen `k`."""
    exact = ((logits > 0) == y.bool()).all(-1)
    return {int(c): round(float(exact[k == c].float().mean()), 3) for c in sorted(set(k.tolist()))}


def in_chunks(f, x: torch.Tensor, size: int = 500) -> torch.Tensor:
    """`f` over `x` in slices of `size` rows, concatenated (bounds memory on thousands of frames)."""
    return torch.cat([f(x[b:b + size]) for b in range(0, len(x), size)])


def train_tower_sets(tower: VisionTower, read: SetReader, steps: int, batch: int, lr: float, rng,
                     teacher: VisionTower | None = None, keep: float = 0.0, codec: bool = False,
                     then=None, every: int = 0, check=None, report=None, deadline: float | None = None) -> dict:
    """The tower and a `SetReader` on its patch features train together on the set loss (mean
    binary cross-entropy of the frame's (kind, colour) pairs), `batch` fresh training frames a
    step (`set_batch`; with `codec`, half the batches through `codec_like`), AdamW (the tower at
    `lr`, the read-out at 1e-3), gradients clipped at 1. With a `teacher` (a frozen copy of the
    tower as it was), `keep` times the mean squared difference of the two towers' patch features
    on the same frames is added: what the layers after the tower read stays near where it was.
    `then(features, pairs)`, if given, runs after each step on that step's (detached) features and
    returns a dict of its own losses. Every `every` steps and at the end `check(tower, read)` ->
    dict is recorded with the step's losses and passed to `report(step, row)`. Past `deadline` (a
    `time.perf_counter()` value) the step in hand is checked and training stops. Returns {step: row}."""
    tower.train()
    params = list(read.parameters()) + list(tower.parameters())
    opt = torch.optim.AdamW([{"params": read.parameters(), "lr": 1e-3}, {"params": tower.parameters(), "lr": lr}])
    dev = next(tower.parameters()).device
    curve = {}
    for step in range(1, steps + 1):
        frames, y, _ = set_batch(0, batch, rng)
        if codec and rng.random() < 0.5:
            frames = codec_like(frames, rng)
        px = preprocess(frames, tower.image_size).to(dev)
        y = y.to(dev)
        f = tower(px)
        losses = {"set": F.binary_cross_entropy_with_logits(read(f), y)}
        if teacher is not None and keep:
            with torch.no_grad():
                target = teacher(px)
            losses["keep"] = F.mse_loss(f, target)
        opt.zero_grad()
        (losses["set"] + keep * losses.get("keep", 0.0)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if then is not None:
            losses.update(then(f.detach(), y))
        late = deadline is not None and time.perf_counter() > deadline
        if check is not None and every and (step % every == 0 or step == steps or late):
            tower.eval(), read.eval()
            with torch.no_grad():
                row = check(tower, read)
            tower.train(), read.train()
            curve[step] = {**row, **{k: round(float(v.detach()), 5) for k, v in losses.items()}}
            if report is not None:
                report(step, curve[step])
        if late:
            break
    tower.eval()
    return curve


def prefuse(net: LlavaMiniNet, comp, V: torch.Tensor, prefix: torch.Tensor):
    """Patch features `V` (B, 64, width) through compressor `comp`, the projector and the pre-fusion
    layers beside the prompt's ids `prefix`, as the engine does: the frame tokens (B, nq, H), the
    keys/values per layer (B, nkv, C, D) and the prompt's fused rows (B, P, H) (`Trainer.encode`)."""
    m = net.model
    pv, pc = m.mm_projector(V), m.mm_projector(comp.forward_mha(V))
    n_vis = pv.shape[1] + pc.shape[1]
    x = torch.cat([pv, pc, m.embed_tokens(prefix).expand(len(V), -1, -1)], dim=1)
    cos, sin = net.rotary(torch.arange(x.shape[1], device=V.device), x.dtype)
    ks, vs = [], []
    for layer in m.prefusion_layers:
        x, k, v = layer.full(x, cos, sin)
        ks.append(k)
        vs.append(v)
    return x[:, pv.shape[1]:n_vis], ks, vs, x[:, n_vis:]


def token_row(net: LlavaMiniNet, comp, V: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """The frame token of patch features `V` with compressor `comp`: P(c), the projected compressor
    output (`prefix` None), or, given the prompt's ids `prefix`, the row the LLM reads: P(c) after
    the pre-fusion layers (`prefuse`). (B, H)."""
    if prefix is None:
        return net.model.mm_projector(comp.forward_mha(V))[:, 0]
    return prefuse(net, comp, V, prefix)[0][:, 0]


def tower_sets(net: LlavaMiniNet, vision: VisionTower, a, dev, log: dict, t_start: float,
               prefix: torch.Tensor | None = None) -> None:
    """Stage 0t (--tower-sets N): the tower learns to tell two and three objects on one frame apart.
    V2's frozen tower names the whole (kind, colour) set of held-out 2- and 3-object frames for 77
    and 41 % even through a transformer over all its patches (`probe_demo --sets`), and count and
    order are built from those sets; a copy trained with such a read-out reached 92 and 74 %. Here
    the tower itself trains that way (`train_tower_sets`: --sets-batch frames a step, --tower-lr,
    codec-like frames half the time), its patch features held to a frozen copy's by --tower-keep
    (the compressor and the question rows read them), and after each step the compressor (at
    --tower-lr; the head at 1e-3) learns on the same frames, through a linear set head on the
    RMS-normed P(c) (the frame token's start), to carry the set into the one token, its P(c) held
    to the frozen compressor's by the same weight. Nothing else trains; the read-out and the head
    are dropped. The tower's and compressor's gradients are left as the stages before it leave
    them (`main` freezes the tower after stage 0 unless --train-vision; `isolated` gives the
    compressor back its own). With --token-row fused the set head and the hold read the row the
    LLM reads instead of P(c) (`token_row`). Logged: held-out exact sets by objects on screen (600
    frames of scene seeds >= 10**9), of the patch read-out and of the token head, and the losses."""
    teacher = copy.deepcopy(vision).eval().requires_grad_(False)
    comp = net.model.compressor
    comp0 = copy.deepcopy(comp).eval().requires_grad_(False)
    vision.requires_grad_(True)
    comp.requires_grad_(True)
    comp.pos_embed.requires_grad_(False)
    torch.manual_seed(a.seed)
    read = SetReader(vision.width, vision.n_patches, N_PAIRS, dropout=0.0, pos_std=0.02).to(dev)
    head = torch.nn.Linear(net.model.embed_tokens.weight.shape[1], N_PAIRS).to(dev)
    comp_params = [p for p in comp.parameters() if p.requires_grad]
    cparams = list(head.parameters()) + comp_params
    token_keep = a.tower_keep if a.token_keep is None else a.token_keep
    token_lr = a.tower_lr if a.token_lr is None else a.token_lr
    copt = torch.optim.AdamW([{"params": head.parameters(), "lr": 1e-3},     # as the patch read-out
                              {"params": comp_params, "lr": token_lr}], betas=(0.9, 0.98), weight_decay=0.0)
    fte, yte, kte = set_batch(10 ** 9, 600, np.random.default_rng([a.seed, 0x5E70]))
    pte = preprocess(fte, a.image_size).to(dev)

    # --token-row: the set head reads P(c) ("compressor", as the sixteenth session ran it) or the
    # row after the pre-fusion layers ("fused"), which is what the LLM reads (the gradient then
    # reaches the compressor through the frozen pre-fusion layers)
    row_prefix = prefix if a.token_row == "fused" else None

    def token_start(c, V):
        return token_row(net, c, V, row_prefix)

    def compressor_step(V, y) -> dict:
        c = token_start(comp, V)
        with torch.no_grad():
            c0 = token_start(comp0, V)
        out = {"token_set": F.binary_cross_entropy_with_logits(head(_rms(c)), y), "token_keep": F.mse_loss(c, c0)}
        clipped_step(copt, cparams, out["token_set"] + token_keep * out["token_keep"])
        return {k: v.detach() for k, v in out.items()}

    def check(tower, read) -> dict:
        V = in_chunks(tower, pte)
        return {"patches": exact_sets(in_chunks(read, V).cpu(), yte, kte),
                "token_head": exact_sets(head(_rms(token_start(comp, V))).cpu(), yte, kte)}

    def report(step, row):
        say(f"[train_demo] tower-sets {step:5d}/{a.tower_sets} " + " ".join(
            f"{k} {v:.4f}" for k, v in row.items() if not isinstance(v, dict))
            + " | held-out exact sets by objects: patches " + " ".join(f"{k}:{v:.2f}" for k, v in row["patches"].items())
            + ("  P(c) head " if row_prefix is None else "  token head ") + " ".join(f"{k}:{v:.2f}" for k, v in row["token_head"].items())
            + f"  {(time.perf_counter() - t_start) / 60:5.1f} min")

    curve = train_tower_sets(vision, read, a.tower_sets, a.sets_batch, a.tower_lr,
                             np.random.default_rng([a.seed, 0x5E75]), teacher=teacher, keep=a.tower_keep,
                             codec=True, then=compressor_step, every=max(1, a.log_every * 10), check=check,
                             report=report, deadline=t_start + a.minutes * 60)
    last = max(curve) if curve else 0
    if last < a.tower_sets:
        say(f"[train_demo] tower-sets: stopped by --minutes after {last} of {a.tower_sets} steps")
    log["tower_sets"] = {"held_out_frames": {int(k): int((kte == k).sum()) for k in sorted(set(kte.tolist()))},
                         "curve": curve, "steps_done": last, "token_keep": token_keep, "token_lr": token_lr,
                         "token_row": a.token_row}


# =========================================================================== stage 0c: question fusion
def frame_questions(spec: S.SceneSpec, t: float, rng: np.random.Generator) -> list[tuple[str, int]]:
    """Four questions about one frame and what the frame answers (a `LOCAL_CLASSES` index): two
    "is there a <colour> <kind>?" (the star included; present, absent, or half the absent ones
    hard: a shown kind in another shown colour), one colour and one shape question (about a kind
    or colour shown once, or one not shown: "none")."""
    items = frame_items(spec, t)
    out = []
    for _ in range(2):
        if items and rng.random() < 0.5:
            k, c = items[int(rng.integers(len(items)))]
            y = LOCAL_CLASSES.index("yes")
        else:
            absent = [(k, c) for k in S.ALL_KINDS for c in S.COLOUR_NAMES if (k, c) not in items]
            near = [(k, c) for (k, c) in absent if any(k == a for a, _ in items) and any(c == b for _, b in items)]
            pool = near if near and rng.random() < 0.5 else absent
            k, c = pool[int(rng.integers(len(pool)))]
            y = 0
        out.append((S._T_EXISTS.format(article=S._article(c), colour=c, kind=k), y))
    once_k = [k for k in S.KINDS if sum(a == k for a, _ in items) == 1]
    k, y = _once_or_absent(S.KINDS, once_k, {a for a, _ in items}, lambda k: next(c for a, c in items if a == k), rng)
    if y is not None:
        out.append((S._T_COLOUR.format(kind=k), y))
    once_c = [c for c in S.COLOUR_NAMES if sum(b == c for a, b in items if a != "star") == 1
              and all(not (a == "star" and b == c) for a, b in items)]
    c, y = _once_or_absent(S.COLOUR_NAMES, once_c, {b for _, b in items}, lambda c: next(a for a, b in items if b == c), rng)
    if y is not None:
        out.append((S._T_SHAPE.format(colour=c), y))
    return out


def _once_or_absent(names, once, shown, partner, rng) -> tuple[str, int | None]:
    """60 %: a name shown exactly once, and its partner's class (the colour of a kind, the kind of
    a colour); else any name: "none" if it is not shown, None (skip) if it is."""
    if once and rng.random() < 0.6:
        n = once[int(rng.integers(len(once)))]
        return n, LOCAL_CLASSES.index(partner(n))
    n = names[int(rng.integers(len(names)))]
    return n, (0 if n not in shown else None)


def frame_items(spec: S.SceneSpec, t: float) -> list[tuple[str, str]]:
    """(kind, colour) of everything on screen at `t`, the needle star included."""
    items = [(spec.objects[i].kind, spec.objects[i].colour_at(t)) for i in S.visible_objects(spec, t)]
    if spec.needle is not None and spec.needle.visible(t):
        items.append(("star", spec.needle.colour))
    return items


FUSION_SCENE_FRAMES = 4     # stage 0c draws this many frames of each scene (--fusion-count's groups)


def scene_frames(rng: np.random.Generator, n: int, ask) -> tuple[np.ndarray, list, list]:
    """Stages 0c and 0k: `n` frames of training scenes, `FUSION_SCENE_FRAMES` moments of each
    (a needle-visible moment 30 % of the time), each asked `ask(spec, t, rng)`: the frames (n, S,
    S, 3; half the batches through `codec_like`), what `ask` returned per frame, and (spec, t) per
    frame."""
    frames, asked, seen = [], [], []
    while len(frames) < n:
        spec = random_scene(rng)
        for _ in range(FUSION_SCENE_FRAMES):
            t = random_time(spec, rng, 0.3)
            frames.append(render_square(spec, t))
            asked.append(ask(spec, t, rng))
            seen.append((spec, t))
    out = np.stack(frames[:n])
    if rng.random() < 0.5:
        out = codec_like(out, rng)
    return out, asked[:n], seen[:n]


def pretrain_fusion(trainer: "Trainer", a, dev, log: dict, t_start: float) -> None:
    """Stage 0c (--fusion-steps): the pre-fusion layers learn, on single frames, to answer in the
    question's referent row what that frame shows about a colour, shape or "is there" question
    (the per-frame half of --local, on many independent frames instead of a few videos; the
    frozen tower's patches are what they read). A training-only head, dropped."""
    net = trainer.net
    head = LocalHead(trainer.cfg.hidden_size).to(dev)
    mods = [net.model.prefusion_layers, net.model.embed_tokens]
    for mod in mods:
        mod.requires_grad_(True)
    params = [p for mod in mods for p in mod.parameters()] + list(head.parameters())
    count_head = make_count_head(trainer, params) if a.fusion_count else None
    opt = torch.optim.AdamW(params, lr=a.fusion_lr, betas=(0.9, 0.98), weight_decay=0.01)
    yes = LOCAL_CLASSES.index("yes")
    curve, hist = [], []
    for step in range(a.fusion_steps):
        rng = np.random.default_rng([a.seed, 0xF05E, step])
        frames, qs, seen = scene_frames(rng, a.fusion_batch, frame_questions)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.fusion_steps, a.fusion_lr, 50)
        px = preprocess(frames, a.image_size).to(dev)
        _, ks, vs, _ = trainer.encode(px)
        fi = [f for f, q in enumerate(qs) for _ in q]
        flat = [x for q in qs for x in q]
        rows = [trainer.question_rows(q) for q, _ in flat]
        idx = torch.tensor(fi, device=dev)
        x = trainer.fuse_rows(rows, [k[idx] for k in ks], [v[idx] for v in vs])
        ref = [trainer.referent_row(QA("shape" if q.startswith("what shape") else "x", q, ""), r)
               for (q, _), r in zip(flat, rows)]
        sel = x[torch.arange(len(rows), device=dev), torch.tensor(ref, device=dev)]
        logits = head.lin(_rms(sel).float())
        tgt = torch.tensor([y for _, y in flat], device=dev)
        loss = F.cross_entropy(logits, tgt)
        spread = None
        if a.null:
            # per question and row (`null_span`); normalised per row
            none = [i for i, (_, y) in enumerate(flat) if y == 0]
            if none:
                spans = {i: null_span(ref[i], len(rows[i]), a.null_rows) for i in none}
                bi = [i for i in none for _ in spans[i]]
                ri = [j for i in none for j in spans[i]]
                tail = x[torch.tensor(bi, device=dev), torch.tensor(ri, device=dev)]
                spread = null_spread(tail, [(flat[i][0], j) for i, j in zip(bi, ri)]) / len(bi)
                loss = loss + a.null * spread
        cstats = (0.0, 0.0)
        if a.fusion_count:
            closs, cstats = count_fusion_loss(trainer, count_head, ks, vs, seen,
                                              np.random.default_rng([a.seed, 0xC0C7, step]))
            loss = loss + a.fusion_count * closs
        clipped_step(opt, params, loss)
        with torch.no_grad():
            ok = (logits.argmax(-1) == tgt)
            exist = torch.tensor([q.startswith("is there") for q, _ in flat], device=dev)
            colour_q = torch.tensor([q.startswith("what colour") for q, _ in flat], device=dev)
            hist.append((float(ok[exist].float().mean()), float(ok[~exist].float().mean()),
                         float(ok[exist & (tgt == yes)].float().mean()),
                         float(ok[colour_q & (tgt != 0)].float().mean()) if bool((colour_q & (tgt != 0)).any()) else 0.0,
                         float(spread.detach()) if spread is not None else 0.0) + cstats)
        if step % a.log_every == 0 or step == a.fusion_steps - 1:
            r = np.mean(hist[-50:], 0)
            el = time.perf_counter() - t_start
            curve.append({"step": step, "loss": round(float(loss.detach()), 4), "exists_acc": round(float(r[0]), 3),
                          "colour_shape_acc": round(float(r[1]), 3), "colour_shown_acc": round(float(r[3]), 3),
                          "null_spread": float(f"{r[4]:.4g}"), "elapsed_s": round(el, 1)})
            if a.fusion_count:
                curve[-1].update(count_frame_exact=round(float(r[5]), 3), count_clip_exact=round(float(r[6]), 3))
            say(f"[train_demo] fusion {step:5d}/{a.fusion_steps} loss {float(loss.detach()):.3f} per-frame "
                f"is-there {r[0]:.2f} (yes {r[2]:.2f}) colour/shape {r[1]:.2f} (colour shown {r[3]:.2f}) "
                f"null {r[4]:.3f}" + (f" count set: frame {r[5]:.2f} clip {r[6]:.2f}" if a.fusion_count else "")
                + f" {el / 60:5.1f} min")
    log["fusion_curve"] = curve


def hold_questions(spec: S.SceneSpec, t: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Stage 0k's questions about one frame: (every kind the evaluation and training ask, whose
    fused rows are held; two order questions, whose colour-word rows learn to keep their word).
    Held: `frame_questions`' four, the count question (a paraphrase a quarter of the time), a
    colour, shape or "is there" paraphrase; the order pairs are the scene's objects half the time,
    else any two (kind, colour) pairs."""
    held = [q for q, _ in frame_questions(spec, t, rng)]
    held.append(S._T_COUNT if rng.random() < 0.75 else
                PARAPHRASES["count"][int(rng.integers(len(PARAPHRASES["count"])))])
    fam = ("colour", "shape", "exists")[int(rng.integers(3))]
    k, c = S.KINDS[int(rng.integers(len(S.KINDS)))], S.COLOUR_NAMES[int(rng.integers(len(S.COLOUR_NAMES)))]
    tmpl = PARAPHRASES[fam][int(rng.integers(len(PARAPHRASES[fam])))]
    held.append(tmpl.format(kind=k, colour=c, article=S._article(c)))
    mine = [(o.kind, o.colour) for o in spec.objects]
    every = [(k, c) for k in S.KINDS for c in S.COLOUR_NAMES]
    order = []
    for _ in range(2):
        pool = mine if len(mine) >= 2 and rng.random() < 0.5 else every
        i, j = rng.choice(len(pool), size=2, replace=False)
        order.append(S._T_ORDER.format(a=_name(*pool[int(i)]), b=_name(*pool[int(j)])))
    return held, order


def keep_words(trainer: "Trainer", a, dev, log: dict, t_start: float) -> None:
    """Stage 0k (--keep-steps N): the pre-fusion layers learn to keep the colour words of order
    questions ("which appeared first, the red circle or the blue square?") in their fused rows,
    and nothing else moves. The tenth session found those rows hold their word only as a small
    direction (cosine +0.02 with its embedding), so the LLM cannot copy the colour of the object
    it picks and names the video's first object instead; scaling the words' embeddings
    (--word-scale) made it copy, but moved every row with a colour word (shape, "is there", the
    needle) and the LLM lost those. Here a frozen copy of the pre-fusion layers is the teacher:
    on frames of training scenes, each order question's colour-word rows must become the
    teacher's row plus the word's unit embedding times --keep-gain times the batch's mean norm of
    those rows (--keep-scale row: each row's own norm), while every other row of
    every question (`hold_questions`), the frame tokens and the fused prompt prefix must stay
    the teacher's (relative squared error; the colour-word rows of the other questions, few among
    many rows, as a term of their own weighted --keep-hold: without it the layers added the word
    to every colour word's row). Only the pre-fusion layers train; the LLM then has
    to learn the copy (--llm-only steps with --cand-set). --keep-count W frees the count
    question's last `COUNT_ROWS` rows from the hold and gives them --fusion-count's read-out
    (`count_fusion_loss`, weight W); with --keep-gain 0 they are then the only rows meant to move."""
    net = trainer.net
    teacher = Trainer(copy.deepcopy(net).eval().requires_grad_(False), trainer.vision, trainer.cfg,
                      trainer.tok, dev)
    net.model.prefusion_layers.requires_grad_(True)
    params = list(net.model.prefusion_layers.parameters())
    colour_ids = {trainer.tok.convert_tokens_to_ids(w) for w in S.COLOUR_NAMES}
    emb = net.model.embed_tokens.weight.detach()
    count_head = make_count_head(trainer, params) if a.keep_count else None
    opt = torch.optim.AdamW(params, lr=a.keep_lr, betas=(0.9, 0.98), weight_decay=0.0)
    curve, hist = [], []

    def rel(x, t):
        return ((x.float() - t.float()) ** 2).sum(-1) / (t.float() ** 2).sum(-1).clamp_min(1e-6)

    for step in range(a.keep_steps):
        rng = np.random.default_rng([a.seed, 0x4EE9, step])
        frames, asked, seen = scene_frames(rng, a.keep_batch, hold_questions)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.keep_steps, a.keep_lr, 20)
        px = preprocess(frames, a.image_size).to(dev)
        qs = [held + order for held, order in asked]
        fi = torch.tensor([f for f, q in enumerate(qs) for _ in q], device=dev)
        texts = [x for q in qs for x in q]
        rows = [trainer.question_rows(q) for q in texts]
        with torch.no_grad():
            V = trainer.vision(px)          # the frozen tower both share: run once
            t_tok, t_ks, t_vs, t_po = teacher.encode(px, V)
            t_x = teacher.fuse_rows(rows, [k[fi] for k in t_ks], [v[fi] for v in t_vs])
        tok, ks, vs, po = trainer.encode(px, V)
        x = trainer.fuse_rows(rows, [k[fi] for k in ks], [v[fi] for v in vs])
        # per (question, row): 2 where a colour word of an order question, 3 a colour word of any
        # other question (the rows a shortcut, "add the word to every colour word", would move),
        # 1 any other row, 0 padding
        kind = torch.zeros(x.shape[:2], dtype=torch.long)
        ids = torch.zeros(x.shape[:2], dtype=torch.long)
        for b, (q, r) in enumerate(zip(texts, rows)):
            c = 2 if q.startswith("which appeared first") else 3
            kind[b, :len(r)] = torch.tensor([c if i in colour_ids else 1 for i in r])
            ids[b, :len(r)] = torch.tensor(r)
            if count_head is not None and q in COUNT_TEXTS:
                kind[b, len(r) - COUNT_ROWS:len(r)] = 0        # --keep-count: these rows are free
        kind, ids = kind.to(dev), ids.to(dev)
        e = F.normalize(emb[ids].float(), dim=-1)
        norm = t_x.float().norm(dim=-1, keepdim=True)
        if a.keep_scale == "batch":     # one length for every row: the batch's mean norm of those rows
            norm = norm[kind == 2].mean().expand_as(norm)
        target = t_x.float() + a.keep_gain * norm * e
        hold = rel(x[kind == 1], t_x[kind == 1]).mean()
        hold_c = rel(x[kind == 3], t_x[kind == 3]).mean()
        frame = rel(tok, t_tok).mean() + rel(po, t_po).mean()
        copy_ = rel(x[kind == 2], target[kind == 2]).mean()
        loss = hold + a.keep_hold * hold_c + frame + copy_
        cstats = (0.0, 0.0)
        if count_head is not None:
            closs, cstats = count_fusion_loss(trainer, count_head, ks, vs, seen,
                                              np.random.default_rng([a.seed, 0xC0C8, step]))
            loss = loss + a.keep_count * closs
        clipped_step(opt, params, loss)
        with torch.no_grad():
            cw = F.cosine_similarity(x[kind == 2].float(), e[kind == 2], dim=-1).mean()
            cw_t = F.cosine_similarity(t_x[kind == 2].float(), e[kind == 2], dim=-1).mean()
            hist.append((float(hold), float(frame), float(copy_), float(cw), float(cw_t), float(hold_c)) + cstats)
        if step % a.log_every == 0 or step == a.keep_steps - 1:
            r = np.mean(hist[-20:], 0)
            el = time.perf_counter() - t_start
            curve.append({"step": step, "hold_rel": float(f"{r[0]:.4g}"), "hold_colour_rel": float(f"{r[5]:.4g}"),
                          "frame_rel": float(f"{r[1]:.4g}"),
                          "copy_rel": float(f"{r[2]:.4g}"), "order_colour_cos": round(float(r[3]), 3),
                          "teacher_cos": round(float(r[4]), 3), "elapsed_s": round(el, 1)})
            if count_head is not None:
                curve[-1].update(count_frame_exact=round(float(r[6]), 3), count_clip_exact=round(float(r[7]), 3))
            say(f"[train_demo] keep {step:5d}/{a.keep_steps} held rows rel err {r[0]:.4f} (colour words of other "
                f"questions {r[5]:.4f}) frame tokens+prefix "
                f"{r[1]:.4f} order colour rows: rel err {r[2]:.3f}, cosine with the word {r[3]:+.2f} "
                f"(teacher {r[4]:+.2f})" + (f" count set: frame {r[6]:.2f} clip {r[7]:.2f}" if count_head is not None
                                           else "") + f" {el / 60:5.1f} min")
    log["keep_curve"] = curve


COUNT_ROWS = 4      # --fusion-count reads the question's last rows (the shortest phrasing has 5)
COUNT_TEXTS = frozenset([S._T_COUNT, *PARAPHRASES["count"]])    # --keep-count frees their last rows


def make_count_head(trainer: "Trainer", params: list) -> torch.nn.Linear:
    """--fusion-count's and --keep-count's training-only read-out (`count_fusion_loss`), its
    parameters appended to `params`. Made only when asked: its initialisation draws from torch's
    generator."""
    head = torch.nn.Linear(COUNT_ROWS * trainer.cfg.hidden_size, N_PAIRS).to(trainer.device)
    params += list(head.parameters())
    return head


def count_fusion_loss(trainer: "Trainer", head: torch.nn.Linear, ks, vs, seen: list, rng: np.random.Generator):
    """--fusion-count (stage 0c): "how many objects are there?" (or a paraphrase) fused with each
    frame, whose last `COUNT_ROWS` question rows together (one vector held about one object in the
    frame token's case) must name (a training-only linear read-out, BCE) the (kind, colour) pairs
    the frame shows, the star not counted; and the same read-out of a weighted
    average over the `FUSION_SCENE_FRAMES` frames of a scene (weights 1-20, as a 1-fps video
    repeats a moment) every pair any of them shows. The average the LLM sees then holds each
    object seen, however briefly, and counting is counting what it names. `seen`: (spec, t) per
    frame, in groups of `FUSION_SCENE_FRAMES` per scene (as `pretrain_fusion` draws them).
    Returns the loss and (per-frame, per-group) exact-set accuracy."""
    dev = trainer.device
    n, g = len(seen), FUSION_SCENE_FRAMES
    texts = [S._T_COUNT if rng.random() < 0.75 else PARAPHRASES["count"][int(rng.integers(len(PARAPHRASES["count"])))]
             for _ in range(0, n, g)]
    rows = [trainer.question_rows(texts[f // g]) for f in range(n)]
    x = trainer.fuse_rows(rows, ks, vs)
    at = torch.tensor([[len(r) - COUNT_ROWS + j for j in range(COUNT_ROWS)] for r in rows], device=dev)
    last = x[torch.arange(n, device=dev)[:, None], at].float()                      # (n, COUNT_ROWS, H)
    tgt = torch.zeros(n, N_PAIRS)
    for f, (spec, t) in enumerate(seen):
        for kind, colour in frame_items(spec, t):
            if kind != "star":                                  # "how many" does not count the star
                tgt[f, pair_index(kind, colour)] = 1
    tgt = tgt.to(dev)
    per = head(_rms(last).flatten(1))
    loss = F.binary_cross_entropy_with_logits(per, tgt, reduction="sum") / n
    G = n // g
    w = torch.tensor(rng.integers(1, 21, size=(G, g)), dtype=torch.float32, device=dev)
    avg = (last[:G * g].view(G, g, COUNT_ROWS, -1) * w[..., None, None]).sum(1) / w.sum(1)[:, None, None]
    union = tgt[:G * g].view(G, g, -1).amax(1)
    vid = head(_rms(avg).flatten(1))
    loss = loss + F.binary_cross_entropy_with_logits(vid, union, reduction="sum") / G
    with torch.no_grad():
        fe = float(((per > 0) == (tgt > 0)).all(1).float().mean())
        ve = float(((vid > 0) == (union > 0)).all(1).float().mean())
    return loss, (fe, ve)


def adamw(params: list, lr: float) -> torch.optim.AdamW:
    """The instruct optimiser: AdamW, weight decay 0.01 on matrices only."""
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-8)


def isolated(net: LlavaMiniNet, stage, *args) -> None:
    """Run a stage that switches on the gradients of what it trains, from everything frozen;
    then give every weight back the requires_grad it had."""
    was = [p.requires_grad for p in net.parameters()]
    net.requires_grad_(False)
    stage(*args)
    for p, w in zip(net.parameters(), was):
        p.requires_grad_(w)


def llm_modules(net: LlavaMiniNet) -> list[torch.nn.Module]:
    """What stages 0r and 0n and --llm-only train: the LLM's layers, final norm and output head
    (not the embeddings, which the pre-fusion layers read too)."""
    return [net.model.layers, net.model.norm, net.lm_head]


def llm_alone_optimiser(net: LlavaMiniNet, lr: float) -> tuple[list, torch.optim.AdamW]:
    """Stages 0r and 0n (run `isolated`, everything else frozen): switch on the gradients of
    `llm_modules` and return their parameters and an AdamW over them (weight decay 0.01 on every
    weight, norm gains included, as these stages have always run; `adamw` spares them)."""
    mods = llm_modules(net)
    for mod in mods:
        mod.requires_grad_(True)
    params = [p for mod in mods for p in mod.parameters()]
    return params, torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)


def clipped_step(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor) -> None:
    """One optimiser step on `loss`, gradients clipped to norm 1 (stages 0a, 0c, 0k, 0r and 0n)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def needle_pair(rng: np.random.Generator, length: int, anchors: int, decoys: int) -> tuple[Sample, Sample]:
    """Stage 0n's data: one scene of `length` seconds seen as `length` frames, twice: with its
    needle star (every frame of its 3-5 s, as a real 1-fps video shows it) and without it (the
    same frames at those times, star-free). The rest of the video is `anchors` spans, each
    showing its first frame over its length; `decoys` of them are split around a single real
    frame of another moment (the span's rest then shows the frame a second later): identical in
    both videos, and every frame sits at its own second of the video.
    The star video is asked about the star's colour ("yes", and with probability 0.3 about another
    colour, "no"); the star-free one about a random colour ("no"), as `eval-demo` asks."""
    spec = train_scene(int(rng.integers(TRAIN_SEED_LIMIT)), length, needle=True)
    n = spec.needle
    star = [float(t) for t in range(int(math.ceil(n.t_appear)), length) if n.visible(float(t))]
    free = [t for t in range(length) if not n.visible(float(t))]
    anchors = min(anchors, len(free))
    # spans over the star-free seconds, as (first position in `free`, frames); each shows its
    # first frame
    cut = sorted((1 + rng.choice(len(free) - 1, anchors - 1, replace=False)).tolist()) if anchors > 1 else []
    starts = [0] + cut
    spans = [(p, q - p) for p, q in zip(starts, starts[1:] + [len(free)])]
    # decoys: single real frames of other moments inside a span (the span is split around them)
    for td in sorted(rng.choice(len(free), min(decoys, len(free)), replace=False).tolist()):
        k = max(i for i, (p, _) in enumerate(spans) if p <= td)
        p, r = spans[k]
        if td == p:
            continue
        spans[k:k + 1] = [(p, td - p), (td, 1)] + ([(td + 1, p + r - td - 1)] if td + 1 < p + r else [])
    # the needle's seconds go where they are in the video: the span running over them is split
    b = sum(t < star[0] for t in free)
    k = max(i for i, (p, _) in enumerate(spans) if p <= b) if b < len(free) else len(spans) - 1
    p, r = spans[k]
    if p < b < p + r:
        spans[k:k + 1] = [(p, b - p), (b, p + r - b)]
    times = [float(free[p]) for p, _ in spans]
    reps = [r for _, r in spans]
    k = sum(t < star[0] for t in times)
    yes_times = times[:k] + star + times[k:]
    yes_reps = reps[:k] + [1] * len(star) + reps[k:]
    no_spec = dataclasses.replace(spec, needle=None)
    c = n.colour
    q_yes = [QA("needle", S._T_EXISTS.format(article=S._article(c), colour=c, kind="star"), "yes")]
    if rng.random() < 0.3:
        o = str(rng.choice([x for x in S.COLOUR_NAMES if x != c]))
        q_yes.append(QA("needle", S._T_EXISTS.format(article=S._article(o), colour=o, kind="star"), "no"))
    o = str(rng.choice(S.COLOUR_NAMES))
    q_no = [QA("needle", S._T_EXISTS.format(article=S._article(o), colour=o, kind="star"), "no")]
    return (Sample(spec, yes_times, yes_reps, q_yes, "long"),
            Sample(no_spec, list(yes_times), list(yes_reps), q_no, "long"))


def needle_length(rng: np.random.Generator, f: float, longest: int, shortest: int = 60) -> int:
    """Stage 0n's video length at fraction f of the stage: log-uniform from `shortest` frames up
    to a maximum that grows from 10 x `shortest` to `longest` over the first 60 % of the stage."""
    lo = shortest
    top = min(longest, 10 * lo) * (longest / min(longest, 10 * lo)) ** min(1.0, f / 0.6)
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(max(lo + 1, top))))))


def needle_anchors_min(a) -> int:
    """The fewest distinct frames a stage-0n video draws (--needle-anchors-min; a quarter of
    --needle-anchors unless given)."""
    return a.needle_anchors // 4 if a.needle_anchors_min is None else a.needle_anchors_min


def needle_encode(trainer: "Trainer", pair: tuple[Sample, Sample], codec: bool, size: int, dev):
    """Encode a `needle_pair` without gradient, sharing the frames the two videos have in common:
    the star-free video's frames at the star's seconds are encoded on their own and put in place
    (frames are encoded independently, so without `codec` this is what encoding it whole would
    give, up to the float rounding a different batch size can bring; with `codec`, those frames
    get their own draw of the codec-like noise)."""
    yes, no = pair
    yes.codec = no.codec = codec
    with torch.no_grad():
        tok, ks, vs, po = trainer.encode(preprocess(render(yes), size).to(dev))
        idx = [k for k, t in enumerate(yes.times) if yes.spec.needle.visible(t)]
        sub = Sample(no.spec, [no.times[k] for k in idx], [1] * len(idx), [], "long", codec)
        t2, k2, v2, p2 = trainer.encode(preprocess(render(sub), size).to(dev))
        ii = torch.tensor(idx, device=dev)
        ntok, npo = tok.clone(), po.clone()
        ntok[ii], npo[ii] = t2, p2
        nks, nvs = [k.clone() for k in ks], [v.clone() for v in vs]
        for l in range(len(ks)):
            nks[l][ii], nvs[l][ii] = k2[l], v2[l]
    return (tok, ks, vs, po), (ntok, nks, nvs, npo)


def attn_loss(masses: list, weight: float, keep: list[int] | None = None) -> tuple[torch.Tensor, list[bool]]:
    """--star-attn / --order-attn from `video_loss`'s `star` output: per question (those in
    `keep`, default all), -log of the largest attention mass any head of any layer puts on its
    frames (floored at 1e-3), summed and times `weight` (answer-token units); and per question
    whether that mass is over one half (logged)."""
    best = torch.stack(masses, 0).amax(dim=(0, 2))                                           # (Bq,)
    if keep is not None:
        best = best[keep]
    loss = -weight * torch.logaddexp(best, torch.full_like(best, math.log(1e-3))).sum()
    return loss, [b > math.log(0.5) for b in best.tolist()]


def needle_loss(trainer: "Trainer", a, rng: np.random.Generator, length: int, dev, total=0.0, ntok: int = 0,
                seeds: list | None = None):
    """Stage 0n's loss for one `needle_pair` of `length` frames drawn from `rng` (also
    --needle-every), added to `total` / `ntok`; the pair's scene seed is appended to `seeds`.
    Returns (total, ntok, per-question (QA, correct))."""
    pair = needle_pair(rng, length, int(rng.integers(needle_anchors_min(a), a.needle_anchors + 1)), a.decoys)
    if seeds is not None:
        seeds.append(pair[0].spec.seed)
    codec = bool(rng.random() < 0.5)
    results = []
    for s, enc in zip(pair, needle_encode(trainer, pair, codec, a.image_size, dev)):
        masses: list = []
        on = [k for k, t in enumerate(s.times) if s.spec.needle is not None and s.spec.needle.visible(t)]
        l, n, r = trainer.video_loss(*enc, torch.tensor(s.reps), s.qas,
                                     star=(on, masses) if on and a.star_attn else None,
                                     length=a.star_attn_length)
        star_ok: list[bool] = []
        if masses:
            # --star-attn: each question about the star video, its best-placed head (any layer)
            # must look at the star's frames, the mass taken as in a --star-attn-length video (a
            # 3-5 s star keeps its weight at 3 h)
            extra, star_ok = attn_loss(masses, a.star_attn)
            l = l + extra
        total, ntok, results = total + l, ntok + n, results + [(q, ok) for (_, ok), q in zip(r, s.qas)]
        results = results + [(QA("star_attn", "", ""), ok) for ok in star_ok]      # logged as "star_attn"
    return total, ntok, results


def pretrain_needle(trainer: "Trainer", a, dev, log: dict, t_start: float) -> None:
    """Stage 0n (--needle-steps): the LLM learns to find a 3-5 s star among up to `--needle-longest`
    frame tokens. The question rows' frame average cannot carry a few frames of 10,800 (the star
    is 0.05 % of it), so the answer has to come from attending to the star's frame tokens; each
    step shows one scene with and without its star (same other frames), so only the star tells
    the two apart. The LLM alone trains (tower, compressor, projector, pre-fusion layers and
    embeddings stay as they are, so the frame tokens and the fused question rows do not change)."""
    params, opt = llm_alone_optimiser(trainer.net, a.needle_lr)
    curve, hist = [], []
    seeds = log.setdefault("stage_scene_seeds", [])         # the training log's scene_seeds
    for step in range(a.needle_steps):
        rng = np.random.default_rng([a.seed, 0x57A2, step])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.needle_steps, a.needle_lr, 20)
        L = needle_length(rng, step / max(1, a.needle_steps), a.needle_longest, a.needle_shortest)
        total, ntok, r = needle_loss(trainer, a, rng, L, dev, seeds=seeds)
        res = [(L, q.answer, ok) for q, ok in r if q.family == "needle"]
        loss = total / ntok
        clipped_step(opt, params, loss)
        hist.extend(res)
        if step % a.log_every == 0 or step == a.needle_steps - 1:
            recent = hist[-120:]
            acc = float(np.mean([ok for _, _, ok in recent]))
            acc_long = [ok for L_, _, ok in recent if L_ >= 1000]
            acc_yes = [ok for _, y, ok in recent if y == "yes"]
            el = time.perf_counter() - t_start
            curve.append({"step": step, "loss": round(float(loss.detach()), 4), "length": L,
                          "acc": round(acc, 3), "acc_1000_plus": round(float(np.mean(acc_long)), 3) if acc_long else None,
                          "acc_yes": round(float(np.mean(acc_yes)), 3) if acc_yes else None,
                          "elapsed_s": round(el, 1)})
            say(f"[train_demo] needle {step:5d}/{a.needle_steps} loss {float(loss.detach()):.3f} length {L:5d} "
                f"acc {acc:.2f} (>=1000 frames {np.mean(acc_long) if acc_long else float('nan'):.2f}, "
                f"yes {np.mean(acc_yes) if acc_yes else float('nan'):.2f}) {el / 60:5.1f} min")
    log["needle_curve"] = curve


READ_FAMILIES = ("colour", "colour", "shape", "exists", "count", "order")


def read_batch(rng: np.random.Generator, n: int) -> list[Sample]:
    """Stage 0r's data: `n` clips of 1-4 frames of scenes with 1-5 objects (mostly frames with two
    or more on screen, where one object's colour must not be mistaken for another's), each asked
    its colour (up to two kinds), shape, "is there", count and order questions."""
    out = []
    while len(out) < n:
        spec = train_scene(int(rng.integers(TRAIN_SEED_LIMIT)), int(rng.integers(10, 121)),
                            needle=bool(rng.random() < 0.3), n_objects=int(rng.integers(1, S.MAX_OBJECTS + 1)))
        crowd = [t for t in range(spec.n_frames) if len(S.visible_objects(spec, float(t))) >= 2]
        busy = [t for t in range(spec.n_frames) if S.visible_objects(spec, float(t))]
        pool = crowd if crowd and rng.random() < 0.75 else (busy or list(range(spec.n_frames)))
        T = int(rng.integers(1, 5))
        times = sorted(float(x) for x in rng.choice(pool, size=min(T, len(pool)), replace=False))
        fams = READ_FAMILIES + (("order",) if RECIPE["order_hard_read"] else ())   # a second pair: fewer are kept
        qas = clip_questions(spec, times, rng, contiguous=False, families=fams,
                             paraphrase=RECIPE["paraphrase"], order_hard=RECIPE["order_hard_read"])
        if qas:
            out.append(Sample(spec, times, [1] * len(times), qas, "sparse", codec=bool(rng.random() < 0.5)))
    return out


def order_batch(rng: np.random.Generator, n: int) -> list[Sample]:
    """--read-order's data: `n` whole 60 s videos (1 fps from 0 s, as the evaluation samples them)
    with 2-5 objects, each asked about every pair of objects whose first appearances are at least
    3 s apart (which name comes first in the sentence by a coin, so either name is the answer
    half the time, and pairs that leave out the video's first object are common), plus how many
    objects.
    Stage 0r's clips of 1-4 frames ask one pair, answered by an object of their first frame 97 %
    of the time; from them M4 learned to name the video's first object whatever is asked."""
    out = []
    while len(out) < n:
        spec = train_scene(int(rng.integers(TRAIN_SEED_LIMIT)), 60, needle=bool(rng.random() < 0.5),
                            n_objects=int(rng.integers(2, S.MAX_OBJECTS + 1)))
        times = [float(t) for t in range(spec.n_frames)]
        qas, attn = order_pairs(spec, times, rng)
        if not qas:
            continue
        qas += clip_questions(spec, times, rng, contiguous=True, families=("count",),
                              paraphrase=RECIPE["paraphrase"])
        attn += [[] for _ in range(len(qas) - len(attn))]
        out.append(Sample(spec, times, [1] * len(times), qas, "clip", codec=bool(rng.random() < 0.5), attn=attn))
    return out


def order_pairs(spec: S.SceneSpec, times: list[float], rng: np.random.Generator) -> tuple[list[QA], list[list[int]]]:
    """"Which appeared first?" about every pair of the objects a 1-fps clip shows whose first
    appearances are at least 3 s apart (which name comes first in the sentence by a coin), and per
    question the frames --order-attn points its answer row at."""
    vis = [S.visible_objects(spec, t) for t in times]                   # per frame, drawing order
    first: dict[int, int] = {}
    colour: dict[int, str] = {}
    for fi, t in enumerate(times):
        for i in vis[fi]:
            if i not in first:
                first[i], colour[i] = fi, spec.objects[i].colour_at(t)
    shown = sorted(first, key=lambda i: (first[i], i))
    qas, attn = [], []
    for x, i in enumerate(shown):
        for j in shown[x + 1:]:
            if first[j] - first[i] < 3:
                continue
            # --read-order-hard: that share of the pairs with the video's first object dropped,
            # so the questions it does not answer ("name the first object seen") weigh more
            if x == 0 and RECIPE["read_order_hard"] and rng.random() < RECIPE["read_order_hard"]:
                continue
            a, b = (i, j) if rng.random() < 0.5 else (j, i)
            na, nb = _name(spec.objects[a].kind, colour[a]), _name(spec.objects[b].kind, colour[b])
            qas.append(QA("order", S._T_ORDER.format(a=na, b=nb), na if first[a] < first[b] else nb, (na, nb)))
            # --order-attn: the earlier object's frames before the other one first shows
            attn.append([k for k in range(first[i], first[j]) if i in vis[k]])
    return qas, attn


def clips_loss(trainer: "Trainer", samples: list[Sample], size: int, dev, total=0.0, ntok: int = 0,
               heads: "BindHeads | None" = None, bind: list | None = None, order_attn: float = 0.0):
    """Stage 0r's loss over short clips (also --read-extra, --read-order): their frames encoded in
    one batch without gradient, each clip's questions through `video_loss` (with `heads`, --bind's
    read-outs of the frame rows too, appended to `bind`; with `order_attn`, --order-attn's
    attention loss on the questions a sample's `attn` names frames for); added to `total` / `ntok`.
    Returns (total, ntok, per-question (family, first-token correct))."""
    with torch.no_grad():
        tokens, ks, vs, po = trainer.encode(torch.cat([preprocess(render(s), size) for s in samples]).to(dev))
    results, o = [], 0
    for s in samples:
        sl = slice(o, o + len(s.times))
        o += len(s.times)
        masses: list = []
        want = order_attn and s.attn is not None and any(s.attn)
        l, n, r = trainer.video_loss(tokens[sl], [k[sl] for k in ks], [v[sl] for v in vs], po[sl],
                                     torch.tensor(s.reps), s.qas, heads=heads, bind=bind,
                                     pairs=trainer.frame_pairs(s.spec, s.times) if heads is not None else None,
                                     star=(s.attn, masses) if want else None)
        if masses:
            # --order-attn: the best-placed head (any layer) of each order question's answer row
            # looks at the earlier object's frames
            extra, oks = attn_loss(masses, order_attn, [k for k, f in enumerate(s.attn) if f])
            l = l + extra
            r = r + [("order_attn", ok) for ok in oks]
        total, ntok, results = total + l, ntok + n, results + r
    return total, ntok, results


def pretrain_read(trainer: "Trainer", a, dev, log: dict, t_start: float) -> None:
    """Stage 0r (--read-steps): the LLM alone learns to answer from the fused question rows of
    short clips with several objects on screen. The kind word's row of "what colour is the
    circle?" holds the circle's colour (a linear read-out of that row, one frame of two to five
    objects: 94 % for run H), but H's LLM answered with whichever object's colour its frame token
    carries (one frame, two objects: 59 %); many such questions a step, nothing else moving."""
    params, opt = llm_alone_optimiser(trainer.net, a.read_lr)
    curve, hist = [], {}
    for step in range(a.read_steps):
        rng = np.random.default_rng([a.seed, 0x8EAD, step])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.read_steps, a.read_lr, 20)
        total, ntok, r = clips_loss(trainer, read_batch(rng, a.read_batch), a.image_size, dev)
        if a.read_order:
            total, ntok, ro = clips_loss(trainer, order_batch(np.random.default_rng([a.seed, 0x0DE2, step]),
                                                              a.read_order), a.image_size, dev, total, ntok,
                                         order_attn=a.order_attn)
            r = r + [(f + "_60s", ok) for f, ok in ro]
        for fam, ok in r:
            hist.setdefault(fam, []).append(int(ok))
        loss = total / ntok
        clipped_step(opt, params, loss)
        if step % a.log_every == 0 or step == a.read_steps - 1:
            recent = {f: round(float(np.mean(v[-200:])), 3) for f, v in sorted(hist.items())}
            el = time.perf_counter() - t_start
            curve.append({"step": step, "loss": round(float(loss.detach()), 4), "first_token_acc": recent,
                          "elapsed_s": round(el, 1)})
            say(f"[train_demo] read {step:5d}/{a.read_steps} loss {float(loss.detach()):.3f} "
                + " ".join(f"{f}={v:.2f}" for f, v in recent.items()) + f" {el / 60:5.1f} min")
    log["read_curve"] = curve


# =========================================================================== stage 0q: the LLM alone, cached videos
Q_REPLAY = ("colour", "shape", "exists", "exists", "needle")
REPLAYABLE = ("colour", "shape", "exists", "needle", "change", "when", "collide")


def replay_families(text: str) -> tuple[str, ...]:
    """--cached-replay's value: comma-separated families `clip_questions` asks of a whole video."""
    fams = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in fams if f not in REPLAYABLE]
    if not fams or bad:
        raise argparse.ArgumentTypeError(f"expected families among {', '.join(REPLAYABLE)}, got {text!r}")
    return fams


def whole_video(rng: np.random.Generator, n_objects: int, replay: tuple[str, ...] = Q_REPLAY) -> Sample:
    """Stage 0q's data: one whole 60 s video (1 fps from 0 s, as the evaluation samples it) with
    `n_objects` objects, a needle star half the time, through `codec_like` half the time; asked
    how many objects, the order of every pair `order_pairs` keeps, and (so that nothing the LLM
    answered before is forgotten) `clip_questions`' questions of the `replay` families (--cached-replay;
    by default colour, shape, "is there" twice and needle)."""
    if RECIPE["count_balance"] and rng.random() < RECIPE["count_balance"]:   # --count-balance (off: no draws)
        needle = bool(rng.random() < 0.5)
        spec = train_scene(density_balanced_seed(rng, n_objects, needle), 60, needle=needle, n_objects=n_objects)
    else:
        spec = train_scene(int(rng.integers(TRAIN_SEED_LIMIT)), 60, needle=bool(rng.random() < 0.5),
                           n_objects=n_objects)
    times = [float(t) for t in range(spec.n_frames)]
    qas, _ = order_pairs(spec, times, rng)
    qas += clip_questions(spec, times, rng, contiguous=True, families=("count",) + tuple(replay),
                          paraphrase=RECIPE["paraphrase"])
    if RECIPE["filler"]:                       # --filler (off: no draws, the videos as before)
        for q in qas:
            if rng.random() < RECIPE["filler"]:
                q.question = add_filler(q.question, rng)
    return Sample(spec, times, [1] * len(times), qas, "clip", codec=bool(rng.random() < 0.5))


# --count-balance: per number of objects, the range of mean objects on screen its videos are drawn
# uniformly over (about the 2nd-98th percentiles of the generator's own 60 s scenes, wider at the low
# end for 5 objects). The generator ties the two: its 2-object videos show 0.8 objects a frame on
# average (median), its 5-object ones 1.8, so how full the screen is predicts the count; R7's count
# answers follow it (too many where objects stay long, too few where they pass quickly: the
# thirty-sixth session's breakdown). Drawn this way, a video's mean objects on screen says little
# about its count between 0.9 and 1.9, where 2-5 objects each cover it.
COUNT_DENSITY = {1: (0.15, 1.0), 2: (0.3, 1.9), 3: (0.5, 2.5), 4: (0.7, 2.6), 5: (0.9, 2.7)}


def mean_on_screen(spec: S.SceneSpec, times) -> float:
    """Objects on screen per frame at `times` (the needle star not counted), on average."""
    times = list(times)
    return sum(len(S.visible_objects(spec, t)) for t in times) / max(1, len(times))


def density_balanced_seed(rng: np.random.Generator, n_objects: int, needle: bool, tries: int = 400,
                          within: float = 0.05) -> int:
    """--count-balance: a training scene seed whose 60 s video with `n_objects` objects shows, on
    average over its 60 frames, a number of objects on screen near a target drawn uniformly from
    COUNT_DENSITY[n_objects] (rejection sampling over scenes drawn without events, which is cheap;
    after `tries` the nearest)."""
    lo, hi = COUNT_DENSITY[n_objects]
    target = float(rng.uniform(lo, hi))
    best = (math.inf, 0)
    for _ in range(tries):
        seed = int(rng.integers(TRAIN_SEED_LIMIT))
        gap = abs(mean_on_screen(train_scene(seed, 60, needle=needle, n_objects=n_objects, events=False),
                                 range(60)) - target)
        if gap < best[0]:
            best = (gap, seed)
        if gap <= within:
            break
    return best[1]


def prefix_counts(spec: S.SceneSpec, times: list[float]) -> list[int]:
    """For each k, how many objects the first k frames (`times`, in order) show: the answer to
    "how many objects?" about that prefix (`clip_questions`' count: objects visible on a frame)."""
    return [len(names) for names in prefix_objects(spec, times)]


def frame_counts(text: str) -> tuple[int, ...]:
    """--cached-prefix-lengths' value: comma-separated whole numbers of frames."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated frame counts such as 20,30,40,50, got {text!r}")


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    `cache_videos` keeps a few small tensors per video among the large ones each batch frees, and
    glibc keeps the pages between them: 14,200 encoded videos held 19 GB of a 24 GB machine, 13 GB
    of it free heap (thirty-third session; one malloc_trim gave it back). Trimming every 200 videos
    keeps the process near what it holds; it changes no number."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)       # the C library already loaded, as lmcore/procs.py reaches prctl
    except (OSError, AttributeError):
        pass


def cache_videos(trainer: "Trainer", n: int, rng: np.random.Generator, size: int, dev, what: str,
                 t_start: float, per_batch: int = 4, replay: tuple[str, ...] = Q_REPLAY,
                 prefix: tuple[int, ...] = (), windows: tuple[int, ...] = ()) -> list[dict]:
    """`n` of `whole_video`'s videos (the number of objects cycling 1..5, so each count answer is
    as common) encoded once, without gradient, into what the LLM reads: per video the frame
    tokens (K, nq, H), the fused prefix and each question's fused rows, averaged over the frames
    exactly as `video_loss` averages them (`cached_loss` reads them). `prefix` (--cached-prefix):
    for each length k in it also the count question's fused rows and the fused prefix averaged
    over the first k frames alone, and that prefix's count ("prefix": {k: (pre, fused, answer)}).
    `windows` (--cached-windows): the same over k frames from a start drawn in 1..K-k from the
    video's seed ("window": {k: (start, pre, fused, answer)}), the count of what those frames show."""
    out: list[dict] = []
    was = trainer.net.training
    trainer.net.eval()
    ahead: list = []                        # (sample, frames) drawn and rendered ahead (--workers)
    with torch.no_grad():
        while len(out) < n:
            if not ahead:
                # the same draws in the same order either way; with workers 16 batches are rendered at once
                k = min(per_batch * (16 if _POOL else 1), n - len(out))
                drawn = [whole_video(rng, 1 + (len(out) + i) % S.MAX_OBJECTS, replay) for i in range(k)]
                ahead = list(zip(drawn, _POOL[0].map(render, drawn) if _POOL else [render(s) for s in drawn]))
            batch, frames = [s for s, _ in ahead[:per_batch]], [f for _, f in ahead[:per_batch]]
            ahead = ahead[per_batch:]
            tokens, ks, vs, po = trainer.encode(torch.cat([preprocess(f, size) for f in frames]).to(dev))
            o = 0
            for s in batch:
                sl = slice(o, o + len(s.times))
                o += len(s.times)
                w = torch.ones(len(s.times), device=dev)
                qid = trainer.padded_ids([trainer.question_rows(q.question) for q in s.qas])
                rows, fused = trainer.fuse_questions(qid, [k[sl] for k in ks], [v[sl] for v in vs], w)
                firsts = prefix_objects(s.spec, s.times)     # what each prefix shows: its count and its answer
                out.append({"tokens": tokens[sl].clone(), "pre": po[sl].float().mean(0).to(po.dtype),
                            "fused": fused, "qas": s.qas, "objects": len(s.spec.objects), "seed": s.spec.seed,
                            "seen": torch.tensor([len(f) for f in firsts[1:]]),            # --cached-seen
                            "sets": trainer.frame_pairs(s.spec, s.times)[0].to("cpu", torch.uint8)})  # --oracle-sets
                ci = next((i for i, q in enumerate(s.qas) if q.family == "count"), None)
                if (prefix or windows) and ci is not None:
                    K, Sq = len(s.times), qid.shape[1]
                    crow = rows.view(K, len(s.qas), Sq, -1)[:, ci].float()          # (K, Sq, H), per frame
                    pf = po[sl].float()
                    # the mean over the first k frames, as `fuse_questions` and the prefix average take it
                    if prefix:
                        out[-1]["prefix"] = {k: (pf[:k].mean(0).to(po.dtype), crow[:k].mean(0).to(rows.dtype)[None],
                                                 count_answer(firsts[k])) for k in prefix if 0 < k < K and firsts[k]}
                    wr = np.random.default_rng([s.spec.seed, 0x3D0])
                    for wk in windows:          # (names of their own: k and n are this loop's batch and total)
                        if not 0 < wk < K:
                            continue
                        w0 = int(wr.integers(1, K - wk + 1))
                        shown = len({o for t in s.times[w0:w0 + wk] for o in S.visible_objects(s.spec, t)})
                        if shown:
                            out[-1].setdefault("window", {})[wk] = (
                                w0, pf[w0:w0 + wk].mean(0).to(po.dtype), crow[w0:w0 + wk].mean(0).to(rows.dtype)[None],
                                shown)
            if len(out) % 200 < per_batch:
                trim_heap()
                say(f"[train_demo] cached {what} videos {len(out):5d}/{n} {(time.perf_counter() - t_start) / 60:5.1f} min")
    trainer.net.train(was)
    return out


def cached_frames_pass(trainer: "Trainer", videos: list[dict]):
    """The LLM over cached videos' prefix and frame rows (entries of `cache_videos`, all of one
    length), batched: the last layer's hidden rows (B, N0, H) and each layer's keys and values, which
    the questions' rows then attend to (`cached_loss`)."""
    dev = trainer.device
    tokens = [v["tokens"].reshape(v["tokens"].shape[0], -1) for v in videos]
    if trainer.oracle is not None:
        # --oracle-sets: each frame token plus a learned linear map of the frame's true set
        if any("sets" not in v for v in videos):
            raise SystemExit("--oracle-sets: these cached videos carry no per-frame sets (a --cached-file "
                             "written before --oracle-sets existed); encode them afresh")
        tokens = [t + trainer.oracle(v["sets"].to(dev, t.dtype)) for t, v in zip(tokens, videos)]
    base = torch.stack([torch.cat([v["pre"], t], 0) for v, t in zip(videos, tokens)])
    cos, sin = trainer.net.rotary(torch.arange(base.shape[1], device=dev), base.dtype)
    h, bk, bv = base, [], []
    for layer in trainer.net.model.layers:
        h, k, v = layer.full(h, cos, sin)
        bk.append(k)
        bv.append(v)
    return h, bk, bv


def frame_row_logits(trainer: "Trainer", videos: list[dict], h: torch.Tensor) -> torch.Tensor:
    """--cached-seen: the LLM's output at each cached frame row (after the prefix rows), (B, K, V),
    from `cached_frames_pass`'s hidden rows `h`."""
    return trainer.net.lm_head(trainer.net.model.norm(h[:, videos[0]["pre"].shape[0]:])).float()


def cached_loss(trainer: "Trainer", videos: list[dict], weights: dict[str, float], seen: float = 0.0):
    """The answer loss over `videos` (entries of `cache_videos`, all of one length), all in one
    batch: the same computation as `Trainer.video_loss` on each video, its frames encoded and its
    questions fused in the call. Returns the summed loss (each question's times its family's
    weight, 1 when not named), the number of answer tokens, and per question (family, all answer
    tokens right).

    `seen` (--cached-seen, training only; the LLM's outputs at frame rows are unused at inference):
    each frame row's own output must name, as the count answer's digit, how many objects the video
    has shown up to that frame; the mean cross-entropy over a video's frames, times `seen`, is added
    per video (one answer token's worth), and each video adds ("seen", its last frame named right)
    to the results: the whole count, said where the last frame is, for the question to copy."""
    dev = trainer.device
    h, bk, bv = cached_frames_pass(trainer, videos)
    N0 = h.shape[1]
    seen_loss, seen_res = None, []
    if seen:
        if any("seen" not in v for v in videos):
            raise SystemExit("--cached-seen: these cached videos carry no per-frame counts (a --cached-file "
                             "written before --cached-seen existed); encode them afresh")
        tgt_seen = torch.stack([trainer.digit_ids[v["seen"]] for v in videos]).to(dev)         # (B, K)
        fl = frame_row_logits(trainer, videos, h)                                               # (B, K, V)
        seen_loss = F.cross_entropy(fl.transpose(1, 2), tgt_seen, reduction="none").mean(1).sum() * seen
        with torch.no_grad():
            seen_res = [("seen", bool(c)) for c in (fl[:, -1].argmax(-1) == tgt_seen[:, -1]).tolist()]
    qas = [q for v in videos for q in v["qas"]]
    qv = torch.tensor([i for i, v in enumerate(videos) for _ in v["qas"]], device=dev)
    Sq = max(v["fused"].shape[1] for v in videos)
    fused = torch.cat([F.pad(v["fused"], (0, 0, 0, Sq - v["fused"].shape[1])) for v in videos], 0)
    qrows, ans = [trainer.question_rows(q.question) for q in qas], [trainer.answer_ids(q.answer) for q in qas]
    y, tgt = trainer.answer_rows(fused, qrows, ans)
    logits = trainer.suffix_logits(y, bk, bv, N0, qv=qv)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                         reduction="none").view(tgt.shape)
    wq = torch.tensor([weights.get(q.family, 1.0) for q in qas], device=dev)
    with torch.no_grad():
        ok = ((logits.argmax(-1) == tgt) | (tgt == -100)).all(1).tolist()
    loss, res = (ce.sum(1) * wq).sum(), [(q.family, bool(c)) for q, c in zip(qas, ok)] + seen_res
    if seen_loss is not None:
        loss = loss + seen_loss
    if trainer.cand_set and torch.is_grad_enabled():
        extra, more = trainer.cand_loss(logits, qas, qrows, ans)          # --cand-set
        loss, res = loss + trainer.cand_set * extra, res + more
    return loss, int((tgt != -100).sum()), res


def span_batch(videos: list[dict], k: int, field: str = "prefix") -> list[dict]:
    """`videos`' cached `k`-frame spans as `k`-frame videos asked only "how many objects?" (the
    video's own count question, the span's answer), for `cached_loss`. field "prefix"
    (--cached-prefix): the first k frames, entries (pre, fused, answer); "window"
    (--cached-windows): k frames from a later start, entries (start, pre, fused, answer)."""
    out = []
    for v in videos:
        e = v[field][k]
        w0, pre, fused, n = (0, *e) if field == "prefix" else e
        q = next(q for q in v["qas"] if q.family == "count")
        out.append({"tokens": v["tokens"][w0:w0 + k], "pre": pre, "fused": fused,
                    "qas": [dataclasses.replace(q, answer=str(n))],
                    **({"sets": v["sets"][w0:w0 + k]} if "sets" in v else {})})
    return out


def cached_accuracy(trainer: "Trainer", videos: list[dict], seen: bool = False) -> dict[str, float]:
    """Per family, the share of questions whose answer tokens are all right (teacher-forced; count
    answers are one token), over `videos`; no gradient. `seen` (--cached-seen): also "seen", the
    share of videos whose last frame row names their count."""
    hist: dict[str, list[int]] = {}
    with torch.no_grad():
        for i in range(0, len(videos), 16):
            _, _, r = cached_loss(trainer, videos[i:i + 16], {}, seen=1.0 if seen else 0.0)
            for fam, ok in r:
                hist.setdefault(fam, []).append(int(ok))
    return {f: round(float(np.mean(v)), 4) for f, v in sorted(hist.items())}


def read_cache(f: Path, key: dict, must: dict) -> tuple[list[dict], list[dict]]:
    """The training and validation videos of a --cached-file, whose key must agree with `must`
    (each named field), or a SystemExit that says what differs."""
    if not f.exists():
        raise SystemExit(f"--cached-file {f}: expected a file written by an earlier stage 0q run, got none")
    saved = torch.load(f, weights_only=False)
    bad = {k: (saved["key"].get(k), v) for k, v in must.items() if saved["key"].get(k) != v}
    if bad:
        raise SystemExit(f"--cached-file {f} was made for another run: (file, this run) {bad}; give another "
                         f"file or the same seed, counts and warm start (this run: {key})")
    return saved["train"], saved["val"]


def keep_best_stage(name: str, flag: str, steps: int, stop_after: int, a, log: dict, t_start: float,
                    measure, snapshot, restore, train_step) -> None:
    """Stages 0q and 0e's loop around `train_step(step)` (which returns (loss, [(family, ok)])): the
    log line every --log-every steps, a measurement (`measure()`: per-family accuracy) before the
    first step, every --cached-eval-every steps, after the last and where --minutes or
    `stop_after` (the option `flag`) stops the stage, the weights best on the mean of count and
    order kept (`snapshot()`, put back by `restore(...)` at the end); the curve, the measurements
    and the kept and stopping steps go into `log` under `name`_*."""
    def score(acc: dict) -> float:
        return (acc.get("count", 0.0) + acc.get("order", 0.0)) / 2

    acc0 = measure()
    best = (score(acc0), 0, snapshot())
    curve, evals, hist = [], [{"step": 0, "val": acc0}], {}
    say(f"[train_demo] {name} val step 0: " + " ".join(f"{f}={v:.3f}" for f, v in acc0.items()))
    for step in range(steps):
        loss, r = train_step(step)
        for fam, ok in r:
            hist.setdefault(fam, []).append(int(ok))
        el = time.perf_counter() - t_start
        if step % a.log_every == 0 or step == steps - 1:
            recent = {f: round(float(np.mean(v[-300:])), 3) for f, v in sorted(hist.items())}
            curve.append({"step": step, "loss": round(float(loss.detach()), 4), "first_token_acc": recent,
                          "elapsed_s": round(el, 1)})
            say(f"[train_demo] {name} {step:5d}/{steps} loss {float(loss.detach()):.3f} "
                + " ".join(f"{f}={v:.2f}" for f, v in recent.items()) + f" {el / 60:5.1f} min")
        out_of_time = el > a.minutes * 60 or step + 1 == stop_after          # measure, keep the best, stop
        if (step + 1) % a.cached_eval_every == 0 or step == steps - 1 or out_of_time:
            acc = measure()
            evals.append({"step": step + 1, "val": acc, "elapsed_s": round(el, 1)})
            kept = score(acc) > best[0]
            if kept:
                best = (score(acc), step + 1, snapshot())
            say(f"[train_demo] {name} val step {step + 1}: " + " ".join(f"{f}={v:.3f}" for f, v in acc.items())
                + (" (best so far)" if kept else ""))
        if out_of_time:
            by = flag if step + 1 == stop_after else "--minutes"
            say(f"[train_demo] {name}: stopped by {by} after {step + 1} of {steps} steps")
            log[f"{name}_stopped_at"] = step + 1
            break
    restore(best[2])
    say(f"[train_demo] {name}: keeping the weights of step {best[1]} (validation count and order {best[0]:.3f})")
    log[f"{name}_curve"] = curve
    log[f"{name}_val"] = evals
    log[f"{name}_kept_step"] = best[1]


def add_needle_pair(trainer: "Trainer", a, nrng: np.random.Generator, dev, total, ntok: int, seeds: list, f: float):
    """--needle-every in stages 0q and 0e: a stage-0n star / no-star pair (encoded afresh: up to
    --needle-longest frames, the length drawn at fraction `f` of the stage), so the long needle is
    not forgotten (60 s videos alone took the 3-hour needle from 88 to 50 %: seventeenth session).
    Without --needle-weight its answer tokens are pooled with the videos'; with it, the pair's mean
    loss per answer token times the weight is added to the videos' mean (pooled, its 2-3 answer
    tokens weigh against some 500 of the videos': Q4 kept the 3-hour needle at 58 %, seventeenth
    session). Returns (total, ntok, per-question (family + "_long", ok))."""
    L = needle_length(nrng, f, a.needle_longest, a.needle_shortest)
    if a.needle_weight is None:
        total, ntok, rn = needle_loss(trainer, a, nrng, L, dev, total, ntok, seeds=seeds)
    else:
        nt, nn, rn = needle_loss(trainer, a, nrng, L, dev, seeds=seeds)
        total = total + a.needle_weight * nt * ntok / nn
    return total, ntok, [(q.family + "_long", ok) for q, ok in rn]


def curriculum_top(step: int, steps: int, share: float) -> int:
    """--cached-curriculum: the most objects a training video may show at `step` of `steps`: 2 at
    the start, one more each third of the first `share` of the steps, every video (MAX_OBJECTS)
    from there on; MAX_OBJECTS throughout when `share` is 0."""
    ramp = share * steps
    if ramp <= 0 or step >= ramp:
        return S.MAX_OBJECTS
    return min(S.MAX_OBJECTS, 2 + int((S.MAX_OBJECTS - 2) * step / ramp))


def pretrain_cached(trainer: "Trainer", a, dev, log: dict, t_start: float) -> None:
    """Stage 0q (--cached-steps): the LLM alone, for many steps, on whole 60 s videos encoded once.

    Nothing before the LLM trains in stages 0r and 0n either, yet they re-encode every clip
    every step, so on this CPU a session fits 150-500 of their steps; count and order sat at
    53-66 % through all of them (sixteen sessions). Here --cached-videos videos are encoded once
    (the frame tokens and each question's fused rows, exactly what the LLM reads) and the LLM
    trains on them for --cached-steps steps of --cached-batch videos: count, every order pair and
    the families it already answers, the count and order losses times --cached-weight. Every
    --cached-eval-every steps it is measured on --cached-val other videos; the weights with the
    best mean count and order accuracy there are kept (early stopping: the training videos are
    seen many times)."""
    params, opt = llm_alone_optimiser(trainer.net, a.cached_lr)
    if a.oracle_sets:
        # --oracle-sets: the map starts at zero (the LLM answers as before) and learns at --oracle-lr
        H = trainer.net.model.embed_tokens.weight.shape[1]
        trainer.oracle = torch.nn.Linear(N_PAIRS, H, bias=False).to(dev)
        torch.nn.init.zeros_(trainer.oracle.weight)
        opt.add_param_group({"params": list(trainer.oracle.parameters()), "lr": a.oracle_lr, "peak_lr": a.oracle_lr,
                             "weight_decay": 0.0})
        params = params + list(trainer.oracle.parameters())
        say("[train_demo] --oracle-sets: each frame token gets a learned map of its frame's true (kind, colour) "
            "set (a diagnostic: the saved checkpoint cannot use it)")
    # what the cache depends on: the weights before the LLM, the draws and the tokenizer's ids
    seed = a.seed if a.cached_seed is None else a.cached_seed
    key = {"seed": seed, "videos": a.cached_videos, "val": a.cached_val, "paraphrase": RECIPE["paraphrase"],
           "weights": state_hash(trainer.net, trainer.vision, before_llm=True), "vocab": len(trainer.tok.get_vocab())}
    if a.cached_replay != Q_REPLAY:            # files made with the default replay have no such field
        key["replay"] = list(a.cached_replay)
    for k in ("canvas", "shades", "filler", "count_balance", "count_list"):   # nor do files made from native frames in the generator's shades
        if RECIPE[k]:
            key[k] = RECIPE[k]
    prefix = tuple(a.cached_prefix_lengths) if a.cached_prefix else ()
    if prefix:                                 # nor do files made without prefix counts
        key["prefix"] = list(prefix)
    windows = tuple(a.cached_window_lengths) if a.cached_windows else ()
    if windows:                                # nor those made without window counts
        key["windows"] = list(windows)
    files = a.cached_file or []
    f = files[0] if files else None
    if f is not None and f.exists():
        train, val = read_cache(f, key, key)
        say(f"[train_demo] cached videos read from {f}: {len(train)} training, {len(val)} validation")
    else:
        train = cache_videos(trainer, a.cached_videos, np.random.default_rng([seed, 0xCAC4E]), a.image_size, dev,
                             "training", t_start, replay=a.cached_replay, prefix=prefix, windows=windows)
        val = cache_videos(trainer, a.cached_val, np.random.default_rng([seed, 0x7A1]), a.image_size, dev,
                           "validation", t_start, replay=a.cached_replay)
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "train": train, "val": val}, f)
            say(f"[train_demo] cached videos written to {f} ({f.stat().st_size / 2 ** 20:.0f} MiB)")
    for g in files[1:]:
        # more training videos, encoded by runs with other seeds from the same weights
        more, _ = read_cache(g, key, {k: key.get(k) for k in ("paraphrase", "weights", "vocab", "replay", "canvas", "shades",
                                                                "prefix", "windows", "count_balance", "filler")})
        train = train + more
        say(f"[train_demo] cached videos read from {g}: {len(more)} more training videos ({len(train)} in all)")
    weights = {"count": a.cached_weight, "order": a.cached_weight}
    # the scene seeds this stage trains on (the training log's scene_seeds; a cache file written
    # before the seeds were kept adds none of its own)
    seeds = log.setdefault("stage_scene_seeds", [])
    seeds.extend(v["seed"] for v in train if "seed" in v)

    rng = np.random.default_rng([a.seed, 0x57E9])
    with_prefix = {k: [v for v in train if k in v.get("prefix", {})] for k in prefix}   # --cached-prefix
    with_window = {k: [v for v in train if k in v.get("window", {})] for k in windows}  # --cached-windows

    def train_step(step: int):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.cached_steps, g.get("peak_lr", a.cached_lr), 50)
        top = curriculum_top(step, a.cached_steps, a.cached_curriculum)
        pool = train if top >= S.MAX_OBJECTS else [v for v in train if v["objects"] <= top]
        pick = [pool[int(i)] for i in rng.choice(len(pool), size=min(a.cached_batch, len(pool)), replace=False)]
        total, ntok, r = cached_loss(trainer, pick, weights, seen=a.cached_seen)
        if a.needle_every and step % a.needle_every == 0:
            total, ntok, rn = add_needle_pair(trainer, a, np.random.default_rng([a.seed, 0x57A3, step]), dev, total,
                                              ntok, seeds, step / max(1, a.cached_steps))
            r = r + rn
        # --cached-prefix: "how many" of the first k frames of as many videos (one k per step: the batch
        # is one length), the mean loss per answer token times the weight, added; --cached-windows: the
        # same of k frames from a later start
        for lengths, have_k, field, w, salt, label in ((prefix, with_prefix, "prefix", a.cached_prefix, 0x9F1C,
                                                        "count_prefix"),
                                                       (windows, with_window, "window", a.cached_windows, 0x3D01,
                                                        "count_window")):
            if not lengths:
                continue
            prng = np.random.default_rng([a.seed, salt, step])
            k = lengths[int(prng.integers(len(lengths)))]
            have = have_k[k] if top >= S.MAX_OBJECTS else [v for v in have_k[k] if v["objects"] <= top]
            if have:
                sub = [have[int(i)] for i in prng.choice(len(have), size=min(a.cached_batch, len(have)), replace=False)]
                pt, pn, rp = cached_loss(trainer, span_batch(sub, k, field), {})
                total = total + w * pt * ntok / pn
                r = r + [(label, ok) for _, ok in rp]
        loss = total / ntok
        clipped_step(opt, params, loss)
        return loss, r

    # --oracle-sets: the validation tokens' RMS (they do not change), against which the map's size is told
    tok_rms = float(torch.cat([v["tokens"].reshape(-1) for v in val[:50]]).float().pow(2).mean().sqrt()) \
        if trainer.oracle is not None else 1.0

    def measure() -> dict:
        acc = cached_accuracy(trainer, val, seen=a.cached_seen > 0)
        if trainer.oracle is not None:
            # how large the map has grown against the frame tokens it is added to (the RMS of the
            # map's output for one pair, over the RMS of the validation tokens)
            acc["oracle_scale"] = round(float(trainer.oracle.weight.detach().float().pow(2).mean().sqrt()) / tok_rms, 4)
        return acc

    keep_best_stage("cached", "--cached-stop-after", a.cached_steps, a.cached_stop_after, a, log, t_start,
                    measure, lambda: weights_copy(trainer.net),
                    trainer.net.load_state_dict, train_step)
    if trainer.oracle is not None:
        # --oracle-sets ends with stage 0q: the map is not part of the model, and a later stage (0e)
        # must not read frame tokens with it; its size at the end goes into the log
        log["oracle_sets"] = {"lr": a.oracle_lr, "final_weight_rms": round(float(trainer.oracle.weight.detach().pow(2).mean().sqrt()), 5)}
        trainer.oracle = None


# =========================================================================== stage 0e: end to end, whole videos
def e2e_groups(net: LlavaMiniNet, vision: VisionTower, lr: float, front: float, tower: float) -> list[dict]:
    """Stage 0e's parameter groups, gradients switched on: the LLM (`llm_modules`) at `lr`; the
    embeddings, compressor, projector and pre-fusion layers (what makes the frame token and the
    fused question rows) at `lr` x `front`; the vision tower at `lr` x `tower` (0: frozen). Each
    group's "scale" is that factor, for the schedule."""
    llm = [p for mod in llm_modules(net) for p in mod.parameters()]
    ids = {id(p) for p in llm}
    rest = [p for n, p in net.named_parameters() if id(p) not in ids and not n.endswith("compressor.pos_embed")]
    groups = [(llm, 1.0)] + ([(rest, front)] if front > 0 else []) + \
        ([(list(vision.parameters()), tower)] if tower > 0 else [])
    out = []
    for ps, k in groups:
        for p in ps:
            p.requires_grad_(True)
        out += [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.01, "scale": k},
                {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0, "scale": k}]
    return out


def pretrain_e2e(trainer: "Trainer", a, dev, log: dict, t_start: float) -> None:
    """Stage 0e (--e2e-steps): whole 60 s videos (stage 0q's, `whole_video`: count, every order
    pair and the --cached-replay families) trained end to end: the frames are rendered and encoded
    every step with gradient, so the count and order losses reach the compressor, the projector,
    the pre-fusion layers and the embeddings (--e2e-front times the LLM's learning rate) and, with
    --e2e-tower above 0, the vision tower, instead of the LLM alone reading tokens fixed by a
    proxy objective (stage 0t's sets). The frame token and the fused question rows then learn
    what the LLM needs to tell the objects of a crowded video apart. --needle-every adds stage
    0n's star / no-star pair (its frames without gradient), weighed as in stage 0q by
    --needle-weight. Every --cached-eval-every steps the model is measured on --e2e-val other
    videos encoded afresh (teacher-forced, as stage 0q measures); the weights best on their mean
    count and order accuracy are kept."""
    net, vision = trainer.net, trainer.vision
    vision_was = [p.requires_grad for p in vision.parameters()]
    groups = e2e_groups(net, vision, a.e2e_lr, a.e2e_front, a.e2e_tower)
    opt = torch.optim.AdamW(groups, lr=a.e2e_lr, betas=(0.9, 0.98), eps=1e-8)
    params = [p for g in groups for p in g["params"]]
    if a.e2e_tower > 0:
        vision.train()
    weights = {"count": a.cached_weight, "order": a.cached_weight}
    seeds = log.setdefault("stage_scene_seeds", [])
    val_rng = lambda: np.random.default_rng([a.seed, 0xE2E7A1])          # the same videos every time

    def measure() -> dict[str, float]:
        return cached_accuracy(trainer, cache_videos(trainer, a.e2e_val, val_rng(), a.image_size, dev, "validation",
                                                     t_start, replay=a.cached_replay))

    def train_step(step: int):
        rng = np.random.default_rng([a.seed, 0xE2E, step])
        for g in opt.param_groups:
            g["lr"] = g["scale"] * lr_at(step, a.e2e_steps, a.e2e_lr, 20)
        batch = [whole_video(rng, int(rng.integers(1, S.MAX_OBJECTS + 1)), a.cached_replay) for _ in range(a.e2e_batch)]
        seeds.extend(s.spec.seed for s in batch)
        frames = _POOL[0].map(render, batch) if _POOL else [render(s) for s in batch]
        tokens, ks, vs, po = trainer.encode(torch.cat([preprocess(f, a.image_size) for f in frames]).to(dev))
        total, ntok, r, o, prefix_terms = 0.0, 0, [], 0, []
        for s in batch:
            sl = slice(o, o + len(s.times))
            o += len(s.times)
            l, n, rr = trainer.video_loss(tokens[sl], [k[sl] for k in ks], [v[sl] for v in vs], po[sl],
                                          torch.tensor(s.reps), s.qas, weights=weights)
            total, ntok, r = total + l, ntok + n, r + rr
            if a.cached_prefix:
                # --cached-prefix: "how many" of the video's first k frames too (k from
                # --cached-prefix-lengths), the same frames' tokens and rows, its mean loss per
                # answer token times the weight
                shown = prefix_objects(s.spec, s.times)
                ks_ = [k for k in a.cached_prefix_lengths if 0 < k < len(s.times) and shown[k]]
                if ks_:
                    k = ks_[int(rng.integers(len(ks_)))]
                    q = next(q for q in s.qas if q.family == "count")
                    psl = slice(sl.start, sl.start + k)
                    pl, pn, pr = trainer.video_loss(tokens[psl], [x[psl] for x in ks], [x[psl] for x in vs], po[psl],
                                                    torch.ones(k, dtype=torch.long),
                                                    [dataclasses.replace(q, answer=count_answer(shown[k]))])
                    prefix_terms.append(pl / pn)
                    r = r + [("count_prefix", ok) for _, ok in pr]
        if prefix_terms:
            total = total + a.cached_prefix * torch.stack(prefix_terms).mean() * ntok
        if a.needle_every and step % a.needle_every == 0:
            total, ntok, rn = add_needle_pair(trainer, a, np.random.default_rng([a.seed, 0xE2E5, step]), dev, total,
                                              ntok, seeds, 1.0)
            r = r + rn
        loss = total / ntok
        clipped_step(opt, params, loss)
        return loss, r

    keep_best_stage("e2e", "--e2e-stop-after", a.e2e_steps, a.e2e_stop_after, a, log, t_start, measure,
                    lambda: (weights_copy(net), weights_copy(vision)),
                    lambda best: (net.load_state_dict(best[0]), vision.load_state_dict(best[1])), train_step)
    net.model.compressor.invalidate()
    for p, w in zip(vision.parameters(), vision_was):
        p.requires_grad_(w)
    vision.eval()


# =========================================================================== saving
def save_checkpoint(out: Path, net: LlavaMiniNet, vision: VisionTower, cfgd: dict, all_layers, a) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfgd, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfgd["bos_token_id"], "eos_token_id": cfgd["eos_token_id"], "do_sample": False}, indent=1))
    sd = {k: v.detach().float().cpu() for k, v in net.state_dict().items()}
    save_weights(out, sd)
    clip = vision.clip
    enc = getattr(clip, "vision_model", clip).encoder
    used = enc.layers
    enc.layers = all_layers                                   # the full tower, as released CLIP folders are
    clip_dir = out / "clip-vision"
    clip_dir.mkdir(parents=True, exist_ok=True)
    clip.config._attn_implementation = "eager"
    clip.cpu().save_pretrained(str(clip_dir), safe_serialization=True)
    readable(clip_dir)
    enc.layers = used
    (clip_dir / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": a.image_size, "width": a.image_size}, "size": {"shortest_edge": a.image_size},
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_center_crop": True,
        "do_normalize": True, "do_resize": True, "image_processor_type": "CLIPImageProcessor"}, indent=1))


def init_from(src: Path, net: LlavaMiniNet, vision: VisionTower, all_layers, tok) -> dict:
    """Warm start from a trained demo checkpoint: every weight whose name and shape match, the
    vision tower included; token embeddings and the LM head row by row for the words both
    vocabularies hold (new words keep their fresh initialisation)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import CLIPVisionModel
    clip = CLIPVisionModel.from_pretrained(str(src / "clip-vision"))
    enc = getattr(vision.clip, "vision_model", vision.clip).encoder
    used = enc.layers
    enc.layers = all_layers
    vision.clip.load_state_dict(clip.state_dict())
    enc.layers = used
    sd = load_file(str(src / "model.safetensors"))
    old_vocab = Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab()
    new_vocab = tok.get_vocab()
    rows = [(new_vocab[w], i) for w, i in old_vocab.items() if w in new_vocab]
    own = net.state_dict()
    copied, skipped = 0, []
    with torch.no_grad():
        for k, v in sd.items():
            if k not in own:
                skipped.append(k)
            elif k in ("model.embed_tokens.weight", "lm_head.weight"):
                dst, srcr = zip(*rows)
                own[k][list(dst)] = v[list(srcr)].to(own[k].device, own[k].dtype)
                copied += 1
            elif own[k].shape == v.shape:
                own[k].copy_(v)
                copied += 1
            else:
                skipped.append(k)
        # LLM layers the source does not have (--layers above its own) start as the identity
        # (their attention and MLP outputs zero), so the warm start answers exactly as the source
        # did; their other weights keep the fresh initialisation, so they can learn
        new_layers = sorted({int(k.split(".")[2]) for k in own if k.startswith("model.layers.")}
                            - {int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")})
        for i in new_layers:
            layer = net.model.layers[i]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    net.model.compressor.invalidate()
    sha = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()[:16]
    say(f"[train_demo] warm start from {src} (model.safetensors sha256 {sha}): {copied} tensors, "
        f"{len(rows)} of {len(new_vocab)} token rows, skipped {skipped}"
        + (f", new LLM layers {new_layers} start as the identity" if new_layers else ""))
    return {"from": str(src), "model_safetensors_sha256_16": sha, "tensors": copied,
            "token_rows": len(rows), "skipped": skipped, "identity_layers": new_layers}


def scale_words(net: LlavaMiniNet, tok, words, k: float) -> None:
    """--word-scale: multiply these words' input embedding rows by k. The pre-fusion layers read
    a row through an RMS norm, so their first layer adds the same to it whatever k is, while the
    row itself carries k times more of its word: a question's colour words then stay a large
    direction of their fused rows (k = 20 on P5: cosine with the word's embedding 0.75 instead of
    0.02; eleventh session), which the LLM needs to copy a colour out of the question."""
    vocab = tok.get_vocab()
    ids = [vocab[w] for w in words]
    with torch.no_grad():
        net.model.embed_tokens.weight[ids] *= k
    say(f"[train_demo] --word-scale: embedding rows of {len(ids)} words x {k:g}")


def state_hash(net: LlavaMiniNet, vision: VisionTower, before_llm: bool = False) -> str:
    """sha256 (16 hex digits) of every weight; `before_llm`: of those the LLM's input depends on
    only (not the LLM's layers, final norm and output head)."""
    h = hashlib.sha256()
    skip = ("model.layers.", "model.norm.", "lm_head.") if before_llm else ()
    for mod in (net, vision):
        for k, v in sorted(mod.state_dict().items()):
            if mod is net and skip and k.startswith(skip):
                continue
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# =========================================================================== training
def make_step(step: int, steps: int, seed: int, a_stage1: float = 0.3, long_every: int = 3) -> list[Sample]:
    rng = np.random.default_rng([seed, 0xDA7A, step])
    f = step / max(1, steps)
    if f < a_stage1:
        easy = f < a_stage1 / 2
        out = [sparse_sample(rng, max_objects=2 if easy else None, max_frames=2 if easy else 6) for _ in range(8)]
        for s in out:
            s.codec = bool(rng.random() < 0.5)
        return [s for s in out if s.qas]
    out = [sparse_sample(rng) for _ in range(2)]
    if step % long_every == 0:
        length = int(300 + (3000 - 300) * min(1.0, (f - a_stage1) / (0.85 - a_stage1)))
        length = int(rng.integers(length // 2, length + 1))
        out.append(long_sample(rng, length, RECIPE["long_anchors"]))
        out.append(clip_sample(rng, max_frames=24))
    else:
        out.append(clip_sample(rng))
        if rng.random() < 0.5:
            out.append(clip_sample(rng, max_frames=24))
    for s in out:
        s.codec = bool(rng.random() < 0.5)
    return [s for s in out if s.qas]


def weights_copy(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every weight (`load_state_dict` puts it back): the EMA's average, the kept best."""
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m model.train_demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("checkpoints/demo"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3600, help="optimizer steps (the schedule's length)")
    ap.add_argument("--minutes", type=float, default=40.0,
                    help="wall-clock guard: stop, save and say so if reached before --steps (stage 0q: before "
                         "--cached-steps, keeping its best weights so far)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0,
                    help="processes that render the training frames (0: this one); the run is the same either way. "
                         "On a GPU, where rendering is most of a step, use the CPU cores")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--vision-steps", type=int, default=4000, help="stage 0 steps (vision pretraining)")
    ap.add_argument("--vision-batch", type=int, default=64)
    ap.add_argument("--vision-lr", type=float, default=1e-3)
    ap.add_argument("--act-penalty", type=float, default=0.01, help="stage 0: weight of mean(feature^2)")
    ap.add_argument("--set-weight", type=float, default=4.0,
                    help="stage 0: weight of the (kind, colour) set loss on P(c) (mean binary cross-entropy)")
    ap.add_argument("--pair-loss", type=float, default=0.0,
                    help="stage 0: weight of a per-patch (kind, colour) classifier on P(V), the binding at "
                         "patch level (0: off, colour and kind are classified apart)")
    ap.add_argument("--slot-loss", type=float, default=0.0,
                    help="stage 0: weight of the colour-slot loss on the compressor's heads (head h names "
                         "the kinds of the colour-h objects on screen; see SlotHead); 0 = off")
    ap.add_argument("--compressor-only", action="store_true",
                    help="stage 0: train only the compressor (tower, projector and so the patch rows the "
                         "question rows read stay as they are): the set losses then teach the frame token "
                         "to hold every object on screen")
    ap.add_argument("--token-set", type=float, default=0.0,
                    help="stage 0: weight of the (kind, colour) set loss on the frame token itself (after the "
                         "pre-fusion layers, which then train in stage 0 too; 0: off)")
    ap.add_argument("--aux", type=float, default=1.0,
                    help="weight of the auxiliary loss: each frame row's LLM output names what the frame shows")
    ap.add_argument("--hard-negatives", type=float, default=0.0,
                    help="share of 'is there' negatives that name a shown kind in another shown colour "
                         "(0: absent pairs drawn uniformly)")
    ap.add_argument("--tower-adapt", type=int, default=0,
                    help="stage 0a: steps teaching the trained tower squashed frames and other shades, its "
                         "features on native frames held to a frozen copy's (see adapt_tower; 0: off)")
    ap.add_argument("--tower-batch", type=int, default=32, help="stage 0a: scenes a step (each drawn three ways)")
    ap.add_argument("--tower-lr", type=float, default=3e-4, help="stages 0a and 0t: (peak) learning rate")
    ap.add_argument("--tower-sets", type=int, default=0,
                    help="stage 0t: steps teaching the tower (and the compressor) to name every (kind, colour) "
                         "pair on a frame, features held to a frozen copy's by --tower-keep (see tower_sets; 0: off)")
    ap.add_argument("--tower-keep", type=float, default=1.0,
                    help="stage 0t: weight of the squared difference from the frozen tower's patch features "
                         "(and, unless --token-keep, the frozen compressor's P(c))")
    ap.add_argument("--token-keep", type=float, default=None,
                    help="stage 0t: weight of the squared difference of P(c) (the frame token's start) from the "
                         "frozen compressor's (default: --tower-keep); lower lets the token carry the set, and the "
                         "LLM must then relearn the token")
    ap.add_argument("--token-row", choices=("compressor", "fused"), default="compressor",
                    help="stage 0t: the token its set head reads: the compressor's projected output P(c), or that "
                         "row after the pre-fusion layers (what the LLM reads)")
    ap.add_argument("--token-lr", type=float, default=None, help="stage 0t: the compressor's learning rate "
                    "(default: --tower-lr)")
    ap.add_argument("--sets-batch", type=int, default=128, help="stage 0t: frames a step")
    ap.add_argument("--canvas", type=float, default=0.0,
                    help="share of training scenes drawn at another frame size (16:9, 4:3, portrait, larger "
                         "squares; CANVASES) and squashed to the model's input as the pipeline does (0: 64x64)")
    ap.add_argument("--shades", type=float, default=0.0,
                    help="share of training scenes whose colours are painted in other shades (mixes of this "
                         "repository's and the CSS named colours, dimmed and jittered; 0: the default palette)")
    ap.add_argument("--short-objects", type=float, default=0.0,
                    help="share of colour and shape questions asked about an object the clip shows on fewer "
                         "than 20 frames, when it has one (0: the object drawn uniformly)")
    ap.add_argument("--order-hard", type=float, default=0.0,
                    help="share of 'which appeared first' questions (when the clip allows one) about two "
                         "objects that both appear after the clip's first one, and of those whose answer is "
                         "the clip's first-shown object that share is dropped (0: any pair, none dropped)")
    ap.add_argument("--order-hard-read", type=float, default=0.0,
                    help="--order-hard for stage 0r's short clips (--read-steps, --read-extra), whose order "
                         "answers are almost always the first-shown object")
    ap.add_argument("--paraphrase", type=float, default=0.0,
                    help="share of colour/shape/exists/count questions asked in other everyday phrasings "
                         "(> 0 adds their words to the vocabulary)")
    ap.add_argument("--filler", type=float, default=0.0,
                    help="stage 0q: share of questions padded with words outside the vocabulary (FILLER_WORDS, "
                         "read as the unknown token) before or after them, as users pad theirs (0: none)")
    ap.add_argument("--count-balance", type=float, default=0.0,
                    help="stages 0q and 0e: share of whole videos drawn so that how full the screen is "
                         "(mean objects on screen) does not give away how many objects there are: per "
                         "count, uniform over COUNT_DENSITY's range (0: the generator's own draw)")
    ap.add_argument("--count-list", action="store_true",
                    help="stages 0q and 0e: answer 'how many objects?' by naming the objects in the order "
                         "they first appear, then the number ('red circle and blue square . 2'), prefix counts "
                         "too (default: the number alone)")
    ap.add_argument("--whole-videos", type=float, default=0.4, help="share of instruct clips that are whole 60 s videos")
    ap.add_argument("--bind", type=float, default=0.0,
                    help="weight of the binding loss: (kind, colour) pairs per frame token, pairs and objects "
                         "seen so far after --bind-layer LLM layers (0: off)")
    ap.add_argument("--bind-layer", type=int, default=2)
    ap.add_argument("--local", type=float, default=0.0,
                    help="weight of the per-frame loss on the fused question rows: the referent word's row of a "
                         "colour, shape or 'is there' question fused with one frame names what that frame shows "
                         "about it, and the same read-out of the average over frames the answer (0: off)")
    ap.add_argument("--null", type=float, default=0.0,
                    help="stage 0c and --local: the question rows (--null-rows) of frames that do not show "
                         "what is asked about must all be the same row (weight of their spread), so the "
                         "frame average leans only toward the frames that do")
    ap.add_argument("--null-rows", choices=("rest", "referent"), default="rest",
                    help="--null's rows: the referent word's and every later question row (rest), or the "
                         "referent word's only (runs E0 and E of the chain)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="warm start: every matching weight of this demo checkpoint (the vision tower too); "
                         "use with --vision-steps 0")
    ap.add_argument("--decoys", type=int, default=0,
                    help="stage 2: short runs (1-3 frames) of other moments in each long pseudo-video, "
                         "so only the needle's content tells it apart; stage 0n and --needle-every: that "
                         "many single frames")
    ap.add_argument("--long-anchors", type=int, default=24,
                    help="stage 2: distinct frames in a long pseudo-video (each repeated over its span)")
    ap.add_argument("--long-grad", action="store_true",
                    help="stage 2: gradient through the LLM over the long pseudo-videos' frame rows too "
                         "(with --bind: each must name the pairs seen so far, the needle included)")
    ap.add_argument("--long-every", type=int, default=3, help="stage 2: a long pseudo-video every N steps")
    ap.add_argument("--ema", type=float, default=0.0,
                    help="save an exponential moving average of the weights with this decay (0: the weights)")
    ap.add_argument("--save-every", type=int, default=0,
                    help="also save the checkpoint (and the log so far) every N steps")
    ap.add_argument("--keep-steps", type=int, default=0,
                    help="stage 0k: steps teaching the pre-fusion layers to keep the colour words of order "
                         "questions in their fused rows, every other row held to a frozen copy's (0: off)")
    ap.add_argument("--keep-gain", type=float, default=1.0,
                    help="stage 0k: the word's unit embedding added to those rows, times this and a norm "
                         "(--keep-scale)")
    ap.add_argument("--keep-hold", type=float, default=4.0,
                    help="stage 0k: weight of holding the colour-word rows of the other questions (shape, "
                         "'is there', the needle: the rows a shortcut would move)")
    ap.add_argument("--keep-scale", choices=("batch", "row"), default="batch",
                    help="stage 0k: the added word's length is --keep-gain times the batch's mean norm of the "
                         "order colour-word rows (batch), or of each row's own (row: rows of a colour on "
                         "screen are 5-20 times longer, and then were left as they were)")
    ap.add_argument("--keep-count", type=float, default=0.0,
                    help="stage 0k: weight of --fusion-count's read-out on the count question's last rows, "
                         "which are then not held (0: off; with --keep-gain 0 nothing but those rows moves)")
    ap.add_argument("--keep-batch", type=int, default=48, help="stage 0k: frames a step (8 questions each)")
    ap.add_argument("--keep-lr", type=float, default=3e-4, help="stage 0k: peak learning rate")
    ap.add_argument("--fusion-steps", type=int, default=0,
                    help="stage 0c: steps of per-frame question-fusion training (pre-fusion layers and "
                         "embeddings; 0: none)")
    ap.add_argument("--fusion-batch", type=int, default=96, help="stage 0c: frames per step (4 questions each)")
    ap.add_argument("--fusion-lr", type=float, default=1e-3)
    ap.add_argument("--fusion-count", type=float, default=0.0,
                    help="stage 0c: weight of the count read-out (the last 4 rows of 'how many objects are "
                         "there?' name the pairs its frame shows, and their average over frames every pair "
                         "seen; 0: off)")
    ap.add_argument("--cached-steps", type=int, default=0,
                    help="stage 0q: steps of LLM-only training on whole 60 s videos encoded once (count, "
                         "order and the other families; 0: none)")
    ap.add_argument("--cached-videos", type=int, default=2000, help="stage 0q: training videos encoded")
    ap.add_argument("--cached-stop-after", type=int, default=0,
                    help="stage 0q: measure, keep the best and stop after this many steps of the --cached-steps "
                         "schedule, as --minutes would there (0: run it all); what makes a run that --minutes "
                         "cut short repeatable on a faster or slower machine")
    ap.add_argument("--cached-val", type=int, default=200,
                    help="stage 0q: validation videos (the weights best on their count and order are kept)")
    ap.add_argument("--cached-batch", type=int, default=16, help="stage 0q: videos per step")
    ap.add_argument("--cached-lr", type=float, default=5e-4)
    ap.add_argument("--cached-weight", type=float, default=2.0,
                    help="stage 0q: weight of the count and order questions' loss (the others: 1)")
    ap.add_argument("--cached-file", type=Path, nargs="+", default=None,
                    help="stage 0q: read the encoded videos from the first file when it exists (made by a "
                         "run with the same seed, counts and weights before the LLM), else write them there; "
                         "more files (made from the same weights with other seeds) add training videos")
    ap.add_argument("--cached-seed", type=int, default=None,
                    help="stage 0q: the seed of the videos' draws (default: --seed, which also draws the "
                         "training order), so that runs with other seeds can share one --cached-file")
    ap.add_argument("--cached-seen", type=float, default=0.0,
                    help="stage 0q: weight of a training-only loss on the LLM's output at each frame row: "
                         "how many objects the video has shown up to that frame, as the count answer's "
                         "digit (0: off)")
    ap.add_argument("--cached-curriculum", type=float, default=0.0,
                    help="stage 0q: a curriculum from few to many objects: over the first F of the steps the "
                         "most objects a training video may show rises from 2 to all (1-2, 1-3, 1-4, then "
                         "every video); the prefix and window counts follow it (0: off)")
    ap.add_argument("--cached-eval-every", type=int, default=100, help="stage 0q: validation every N steps")
    ap.add_argument("--oracle-sets", action="store_true",
                    help="stage 0q, a diagnostic: add to each frame token a learned linear map (from zero) of the "
                         "frame's true (kind, colour) set, in training and validation, to measure how well the LLM "
                         "counts when the frame token names every object; the saved checkpoint cannot use it")
    ap.add_argument("--oracle-lr", type=float, default=3e-3, help="stage 0q: --oracle-sets' map's (peak) learning rate")
    ap.add_argument("--cached-prefix", type=float, default=0.0,
                    help="stage 0q: weight of 'how many objects?' asked of the first k frames of the training "
                         "videos (k from --cached-prefix-lengths; their rows cached as exact averages over those "
                         "frames), added to each step's loss per answer token (0: off)")
    ap.add_argument("--cached-prefix-lengths", type=frame_counts,
                    default=(20, 30, 40, 50), help="stage 0q: the prefix lengths of --cached-prefix, in frames, "
                                                   "comma-separated (default 20,30,40,50)")
    ap.add_argument("--cached-windows", type=float, default=0.0,
                    help="stage 0q: weight of 'how many objects?' asked of k frames from a later start of the "
                         "training videos (k from --cached-window-lengths, the start drawn per video; rows cached "
                         "as exact averages over those frames), added as --cached-prefix is (0: off)")
    ap.add_argument("--cached-window-lengths", type=frame_counts, default=(5, 10, 20, 30),
                    help="stage 0q: the window lengths of --cached-windows, in frames (default 5,10,20,30)")
    ap.add_argument("--cached-replay", type=replay_families, default=Q_REPLAY,
                    help="stage 0q: the families each cached video is also asked, besides count and every "
                         "order pair, so that the LLM keeps them (comma-separated, a family twice asks it "
                         f"twice; one of {', '.join(REPLAYABLE)}; default {','.join(Q_REPLAY)}; Q5 of the "
                         "eighteenth session lost the change questions without 'change')")
    ap.add_argument("--e2e-steps", type=int, default=0,
                    help="stage 0e: steps of end-to-end training on whole 60 s videos encoded afresh with gradient "
                         "(stage 0q's questions; --cached-weight, --cached-replay, --cached-eval-every and "
                         "--needle-every / --needle-weight apply; 0: none)")
    ap.add_argument("--e2e-batch", type=int, default=8, help="stage 0e: videos per step")
    ap.add_argument("--e2e-stop-after", type=int, default=0,
                    help="stage 0e: measure, keep the best and stop after this many steps of the --e2e-steps "
                         "schedule, as --minutes would there (0: run it all); repeats a run that --minutes cut")
    ap.add_argument("--e2e-lr", type=float, default=2e-4, help="stage 0e: the LLM's peak learning rate")
    ap.add_argument("--e2e-front", type=float, default=0.5,
                    help="stage 0e: learning rate of the embeddings, compressor, projector and pre-fusion layers, "
                         "as a multiple of --e2e-lr (0: frozen)")
    ap.add_argument("--e2e-tower", type=float, default=0.0,
                    help="stage 0e: the vision tower's learning rate as a multiple of --e2e-lr (0: frozen)")
    ap.add_argument("--e2e-val", type=int, default=200,
                    help="stage 0e: validation videos (encoded afresh at each measurement; the weights best on "
                         "their count and order are kept)")
    ap.add_argument("--read-steps", type=int, default=0,
                    help="stage 0r: steps of LLM-only training on colour, shape, 'is there', count and order "
                         "questions about short clips with several objects (0: none)")
    ap.add_argument("--read-batch", type=int, default=32, help="stage 0r: clips per step")
    ap.add_argument("--read-lr", type=float, default=5e-4)
    ap.add_argument("--read-extra", type=int, default=0,
                    help="stage 2: add this many of stage 0r's clips to every step (0: none)")
    ap.add_argument("--read-order", type=int, default=0,
                    help="stage 0r and stage 2: add this many whole 60 s videos to every step, each asked "
                         "the order of every pair of its objects (either name the answer half the time) and "
                         "how many objects (0: none)")
    ap.add_argument("--read-order-hard", type=float, default=0.0,
                    help="--read-order: drop this share of the pairs that include the video's first object "
                         "(those the habit of naming the first object seen answers)")
    ap.add_argument("--order-attn", type=float, default=0.0,
                    help="--read-order: weight of the order-attention loss (each order question's last row: "
                         "-log of the largest attention mass any LLM head puts on the frames that show the "
                         "earlier object before the other one appears; 0: off)")
    ap.add_argument("--needle-steps", type=int, default=0,
                    help="stage 0n: steps of long-video needle training (the LLM alone, on one scene with and "
                         "without its 3-5 s star per step; 0: none)")
    ap.add_argument("--star-attn", type=float, default=0.0,
                    help="stage 0n and --needle-every: weight of the star-attention loss (each question "
                         "about the star video: -log of the largest attention mass any LLM head puts from "
                         "the question's last row on the star's frames; 0: off)")
    ap.add_argument("--word-scale", type=float, default=1.0,
                    help="after the warm start, multiply the colour words' input embedding rows by this, so "
                         "that their rows keep the word through the pre-fusion layers (docs/demo-history.md)")
    ap.add_argument("--cand-set", type=float, default=0.0,
                    help="weight of the candidate-set loss: where a question names its possible answers "
                         "(order: its two objects), -log of the mass the answer puts on them, whichever "
                         "is right, so it names one of them rather than a third object (0: off)")
    ap.add_argument("--star-attn-length", type=float, default=10800.0,
                    help="--star-attn: count the attention mass as if the video were this many frames "
                         "long (the other frames repeated), so short videos train the margin 3 h needs")
    ap.add_argument("--needle-lr", type=float, default=5e-4)
    ap.add_argument("--needle-anchors", type=int, default=200,
                    help="stage 0n and --needle-every: at most this many spans per video, each showing one "
                         "frame (--decoys and the star add their own frames)")
    ap.add_argument("--needle-anchors-min", type=int, default=None,
                    help="stage 0n and --needle-every: at least this many spans (default a quarter of "
                         "--needle-anchors)")
    ap.add_argument("--needle-shortest", type=int, default=60,
                    help="stage 0n and --needle-every: the shortest video, in frames")
    ap.add_argument("--needle-longest", type=int, default=10800,
                    help="stage 0n and --needle-every: the longest video, in frames (stage 0n reaches it "
                         "after 60 %% of its steps)")
    ap.add_argument("--needle-every", type=int, default=0,
                    help="stage 2 and stage 0q: add stage 0n's star / no-star pair (--needle-shortest to --needle-longest "
                         "frames) every N steps (0: never)")
    ap.add_argument("--needle-weight", type=float, default=None,
                    help="stage 0q with --needle-every: the star / no-star pair's mean loss per answer token, times "
                         "this, is added to the videos' mean loss (default: its answer tokens pooled with theirs)")
    ap.add_argument("--llm-only", action="store_true",
                    help="stage 2: train the LLM alone (layers, final norm, output head); tower, compressor, "
                         "projector, pre-fusion layers and embeddings stay as they are")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="stop (and save) after this many steps of the --steps schedule (0: run it all)")
    ap.add_argument("--stage1", type=float, default=0.3, help="fraction of --steps in stage 1 (align)")
    ap.add_argument("--train-vision", action="store_true",
                    help="keep training the CLIP tower after stage 0 (LLaVA-Mini keeps it frozen)")
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = ap.parse_args(argv)
    if a.needle_anchors_min is not None and not 1 <= a.needle_anchors_min <= a.needle_anchors:
        ap.error(f"--needle-anchors-min must be between 1 and --needle-anchors ({a.needle_anchors}); "
                 f"got {a.needle_anchors_min}")
    if a.needle_weight is not None and not ((a.cached_steps or a.e2e_steps) and a.needle_every):
        ap.error(f"--needle-weight weighs stage 0q's or 0e's star / no-star pairs: it needs --cached-steps or "
                 f"--e2e-steps, and --needle-every, above 0; got --cached-steps {a.cached_steps}, --e2e-steps "
                 f"{a.e2e_steps}, --needle-every {a.needle_every}")
    if a.cached_prefix and not (a.cached_steps or a.e2e_steps):
        ap.error(f"--cached-prefix weighs stage 0q's or 0e's prefix counts: it needs --cached-steps or --e2e-steps "
                 f"above 0; got --cached-steps {a.cached_steps}, --e2e-steps {a.e2e_steps}")
    if a.cached_windows and not a.cached_steps or a.cached_windows < 0 or \
            not a.cached_window_lengths or not all(0 < k < 60 for k in a.cached_window_lengths):
        ap.error(f"--cached-windows weighs stage 0q's window counts: it needs --cached-steps above 0, a weight >= 0 "
                 f"and --cached-window-lengths between 1 and 59 frames; got --cached-steps {a.cached_steps}, "
                 f"--cached-windows {a.cached_windows}, lengths {','.join(map(str, a.cached_window_lengths))}")
    if a.cached_curriculum and not a.cached_steps or not 0 <= a.cached_curriculum <= 1:
        ap.error("--cached-curriculum needs --cached-steps above 0 and a share of the steps in 0..1; got "
                 f"--cached-steps {a.cached_steps}, --cached-curriculum {a.cached_curriculum}")
    if a.count_list and (a.cached_windows or a.cached_seen or a.keep_count or a.fusion_count):
        ap.error("--count-list answers 'how many' with the objects' names and then the number; --cached-windows, "
                 "--cached-seen, --keep-count and --fusion-count teach the number alone: use one or the other")
    if a.cached_seen and not a.cached_steps or a.cached_seen < 0:
        ap.error(f"--cached-seen weighs stage 0q's per-frame counts: it needs --cached-steps above 0 and a weight "
                 f">= 0; got --cached-steps {a.cached_steps}, --cached-seen {a.cached_seen}")
    if a.oracle_sets and (not a.cached_steps or a.oracle_lr <= 0):
        ap.error(f"--oracle-sets adds to stage 0q's frame tokens: it needs --cached-steps above 0 and --oracle-lr "
                 f"above 0; got --cached-steps {a.cached_steps}, --oracle-lr {a.oracle_lr}")
    if not 0 <= a.count_balance <= 1:
        ap.error(f"--count-balance is a share of videos: expected 0..1, got {a.count_balance}")
    if a.cached_prefix < 0 or not a.cached_prefix_lengths or not all(0 < k < 60 for k in a.cached_prefix_lengths):
        ap.error(f"--cached-prefix must be >= 0 and --cached-prefix-lengths frame counts between 1 and 59 (the cached "
                 f"videos have 60 frames); got {a.cached_prefix} and {','.join(map(str, a.cached_prefix_lengths))}")
    if not 60 <= a.needle_shortest <= a.needle_longest:
        ap.error(f"--needle-shortest must be between 60 and --needle-longest ({a.needle_longest}); "
                 f"got {a.needle_shortest}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    start_workers(a.workers)
    try:
        return train(a)
    finally:
        stop_workers()


def train(a: argparse.Namespace) -> int:
    RECIPE.update(hard_negatives=a.hard_negatives, order_hard=a.order_hard, order_hard_read=a.order_hard_read,
                  read_order_hard=a.read_order_hard, short_objects=a.short_objects, canvas=a.canvas,
                  shades=a.shades, filler=a.filler, count_balance=a.count_balance, count_list=a.count_list, paraphrase=a.paraphrase, whole_videos=a.whole_videos, decoys=a.decoys,
                  long_anchors=a.long_anchors)
    t_start = time.perf_counter()
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    if dev.type == "cpu":
        torch.set_num_threads(a.threads)
        torch.set_flush_denormal(True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_grad_enabled(True)
    torch.manual_seed(a.seed)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.log").write_text("")
    _LOG_FILE[:] = [out / "train.log"]
    net, vision, cfg, tok, cfgd, all_layers = build(out, a)
    net.to(dev).train()
    vision.to(dev).train()
    warm = init_from(a.init_from, net, vision, all_layers, tok) if a.init_from is not None else None
    if a.word_scale != 1.0:
        scale_words(net, tok, S.COLOUR_NAMES, a.word_scale)
    net.model.compressor.pos_embed.requires_grad_(False)
    trainer = Trainer(net, vision, cfg, tok, dev)
    trainer.cand_set = a.cand_set
    heads = BindHeads(cfg.hidden_size, a.bind_layer).to(dev) if a.bind else None
    local_head = LocalHead(cfg.hidden_size, a.null, a.null_rows).to(dev) if a.local else None
    extra = (list(heads.parameters()) if heads is not None else []) + \
        (list(local_head.parameters()) if local_head is not None else [])
    params = [p for p in list(net.parameters()) + list(vision.parameters()) + extra if p.requires_grad]
    opt = adamw(params, a.lr)
    n_params = sum(p.numel() for p in net.parameters()) + sum(p.numel() for p in vision.parameters())

    # the training forward equals the inference engine's (random weights, a 5-frame clip)
    rng0 = np.random.default_rng([a.seed, 1])
    s0 = clip_sample(rng0)
    px0 = preprocess(render(s0)[:5], a.image_size).to(dev)
    exact_diff = check_exact(trainer, px0, "which appeared first, the red circle or the blue square?", "red circle")
    net.train()
    vision.train()
    say(f"[train_demo] params {n_params:,}  device {dev}  check_exact max|dlogit| {exact_diff:.2e}")
    if exact_diff > 1e-3:
        raise SystemExit(f"training forward differs from the engine by {exact_diff}")

    log = {"args": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
                    for k, v in vars(a).items()},
           "config": cfgd, "params": n_params, "device": str(dev), "threads": torch.get_num_threads(),
           "check_exact_max_abs_logit_diff": exact_diff, "train_seed_limit": TRAIN_SEED_LIMIT,
           "data": "scene seeds drawn from numpy default_rng([seed, 0xDA7A, step]) in [0, 10**6)",
           "curve": [], "family_first_token_acc": {}}
    pretrain_vision(net, vision, a, dev, log, t_start, tok, cfg)
    if a.tower_adapt:
        adapt_tower(vision, a, dev, log, t_start)
    if a.tower_sets:
        isolated(net, tower_sets, net, vision, a, dev, log, t_start, trainer.prefix)
    if not a.train_vision:                     # LLaVA-Mini's recipe: the vision tower stays frozen
        vision.requires_grad_(False)
        vision.eval()
    if a.fusion_steps:
        isolated(net, pretrain_fusion, trainer, a, dev, log, t_start)
        params = [p for p in params if p.requires_grad]
        opt = adamw(params, a.lr)
    if a.keep_steps:
        isolated(net, keep_words, trainer, a, dev, log, t_start)
        params = [p for p in params if p.requires_grad]
        opt = adamw(params, a.lr)
    if a.cached_steps:
        isolated(net, pretrain_cached, trainer, a, dev, log, t_start)
    if a.e2e_steps:
        isolated(net, pretrain_e2e, trainer, a, dev, log, t_start)
    if a.read_steps:
        isolated(net, pretrain_read, trainer, a, dev, log, t_start)
    if a.needle_steps:
        isolated(net, pretrain_needle, trainer, a, dev, log, t_start)
    if a.llm_only:
        # --llm-only: the instruct steps train the LLM alone (its layers, final norm and output
        # head); the frame tokens and fused question rows stay what the earlier runs made them
        net.requires_grad_(False)
        for mod in llm_modules(net):
            mod.requires_grad_(True)
        params = [p for p in list(net.parameters()) + extra if p.requires_grad]
        opt = adamw(params, a.lr)
    seeds_used = log.pop("stage_scene_seeds", [])       # stages 0n and 0q's scenes, then the steps'
    ema = None
    fam_hist: dict[str, list[int]] = {}
    stopped_early = False
    step = 0
    averaged = weights_copy(net) if a.ema else None

    def write_out(steps_done: int, stopped_early: bool, final: bool) -> None:
        """Save the checkpoint (the averaged weights with --ema) and the log so far."""
        wall = time.perf_counter() - t_start
        was = net.training
        net.eval()
        vision.eval()
        live = None
        if averaged is not None:
            live = weights_copy(net)
            net.load_state_dict(averaged)
        save_checkpoint(out, net, vision, cfgd, all_layers, a)
        vision.to(dev)
        log.update({"steps_done": steps_done, "stopped_early": stopped_early, "final": final,
                    "wall_time_s": round(wall, 1), "train_loop_s": round(time.perf_counter() - t_loop, 1),
                    "final_loss_ema": round(ema, 4) if ema is not None else None,
                    "saved_weights": f"exponential moving average, decay {a.ema}" if a.ema else "last step",
                    "warm_start": warm,
                    "family_first_token_acc": {f: round(float(np.mean(v[-300:])), 3) for f, v in sorted(fam_hist.items())},
                    "scene_seeds": {"count": len(seeds_used), "distinct": len(set(seeds_used)),
                                    "min": int(min(seeds_used)) if seeds_used else None,
                                    "max": int(max(seeds_used)) if seeds_used else None,
                                    "sha256": hashlib.sha256(np.array(seeds_used, dtype=np.int64).tobytes()).hexdigest()[:16]},
                    "weights_sha256_16": state_hash(net, vision), "torch": torch.__version__,
                    "machine": {"cpus": os.cpu_count(), "platform": sys.platform}})
        (out / "training_log.json").write_text(json.dumps(log, indent=1))
        say(f"[train_demo] saved {out}  steps {steps_done}  wall {wall / 60:.1f} min  "
            f"loss_ema {ema}  weights {log['weights_sha256_16']}" + ("  (stopped by --minutes)" if stopped_early else "")
            + ("" if final else "  (snapshot)"))
        if live is not None:
            net.load_state_dict(live)
        net.train(was)
        if was and not a.train_vision:
            vision.eval()
        elif was:
            vision.train()

    t_loop = time.perf_counter()
    stopped_at = None
    for step in range(a.steps):
        if time.perf_counter() - t_start > a.minutes * 60:
            stopped_early = True
            break
        if a.stop_after and step >= a.stop_after:
            stopped_at = step
            break
        samples = make_step(step, a.steps, a.seed, a.stage1, a.long_every)
        seeds_used.extend(s.spec.seed for s in samples)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.lr, a.warmup)
        grad_samples = [s for s in samples if s.kind != "long"]
        total, ntok, results, aux, bind, loc = 0.0, 0, [], [], [], []
        if grad_samples:
            px = torch.cat([preprocess(render(s), a.image_size) for s in grad_samples]).to(dev)
            tokens, ks, vs, po = trainer.encode(px)
            o = 0
            for s in grad_samples:
                K = len(s.times)
                sl = slice(o, o + K)
                o += K
                l, n, r = trainer.video_loss(tokens[sl], [k[sl] for k in ks], [v[sl] for v in vs], po[sl],
                                             torch.tensor(s.reps), s.qas, aux=aux,
                                             frame_words=trainer.frame_words(s.spec, s.times) if a.aux else None,
                                             pairs=trainer.frame_pairs(s.spec, s.times) if heads is not None else None,
                                             heads=heads, bind=bind, local_out=loc,
                                             local=(local_head, s.spec, s.times) if local_head is not None else None)
                total, ntok, results = total + l, ntok + n, results + r
        for s in samples:
            if s.kind != "long":
                continue
            px = preprocess(render(s), a.image_size).to(dev)
            with torch.no_grad():
                tokens, ks, vs, po = trainer.encode(px)
            # --long-grad: the LLM's frame rows train on the long video too (the tokens stay fixed),
            # and with --bind every frame row there must name what the video showed so far
            lg = a.long_grad and heads is not None
            l, n, r = trainer.video_loss(tokens, ks, vs, po, torch.tensor(s.reps), s.qas, frame_grad=a.long_grad,
                                         pairs=trainer.frame_pairs(s.spec, s.times) if lg else None,
                                         heads=heads if lg else None, bind=bind if lg else None,
                                         local_out=loc,
                                         local=(local_head, s.spec, s.times) if local_head is not None else None)
            total, ntok, results = total + l, ntok + n, results + r
        if a.read_extra:
            # --read-extra: stage 0r's clips in the instruct mix (frames encoded without gradient)
            rs = read_batch(np.random.default_rng([a.seed, 0x8EAE, step]), a.read_extra)
            total, ntok, r = clips_loss(trainer, rs, a.image_size, dev, total, ntok)
            results = results + [(f + "_read", ok) for f, ok in r]
        if a.read_order:
            # --read-order: whole 60 s videos asked every pair's order (and the count)
            os_ = order_batch(np.random.default_rng([a.seed, 0x0DE2, step]), a.read_order)
            total, ntok, r = clips_loss(trainer, os_, a.image_size, dev, total, ntok, heads=heads, bind=bind,
                                        order_attn=a.order_attn)
            results = results + [(f + "_60s", ok) for f, ok in r]
        if a.needle_every and step % a.needle_every == 0:
            # --needle-every: stage 0n's pair (one scene with and without its star, up to
            # --needle-longest frames) in the instruct mix, so the other families keep their LLM
            nrng = np.random.default_rng([a.seed, 0x57A3, step])
            L = needle_length(nrng, 1.0, a.needle_longest, a.needle_shortest)
            total, ntok, r = needle_loss(trainer, a, nrng, L, dev, total, ntok, seeds=seeds_used)
            results = results + [("needle_long" if q.family == "needle" else q.family, ok) for q, ok in r]
        loss = total / max(1, ntok)
        aux_loss = sum(aux[0::2]) / max(1, sum(aux[1::2])) if aux else None
        bind_loss = sum(bind[0::2]) / max(1, sum(bind[1::2])) if bind else None
        local_loss = sum(loc) / len(loc) if loc else None
        opt.zero_grad(set_to_none=True)
        objective = loss
        if aux_loss is not None:
            objective = objective + a.aux * aux_loss
        if bind_loss is not None:
            objective = objective + a.bind * bind_loss
        if local_loss is not None:
            objective = objective + a.local * local_loss
        objective.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if averaged is not None:
            with torch.no_grad():
                d = min(a.ema, (1 + step) / (10 + step))
                for k, v in net.state_dict().items():
                    if v.is_floating_point():
                        averaged[k].mul_(d).add_(v.detach(), alpha=1 - d)
        lv = float(loss.detach())
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        for fam, ok in results:
            fam_hist.setdefault(fam, []).append(int(ok))
        if step % a.log_every == 0 or step == a.steps - 1:
            el = time.perf_counter() - t_start
            recent = {f: round(float(np.mean(v[-200:])), 3) for f, v in sorted(fam_hist.items())}
            log["curve"].append({"step": step, "loss": round(lv, 4), "loss_ema": round(ema, 4),
                                 "aux_loss": None if aux_loss is None else round(float(aux_loss.detach()), 4),
                                 "bind_loss": None if bind_loss is None else round(float(bind_loss.detach()), 4),
                                 "local_loss": None if local_loss is None else round(float(local_loss.detach()), 4),
                                 "lr": round(opt.param_groups[0]["lr"], 6), "grad_norm": round(float(gn), 3),
                                 "elapsed_s": round(el, 1), "first_token_acc": recent})
            acc = " ".join(f"{f}={v:.2f}" for f, v in recent.items())
            say(f"[train_demo] step {step:5d}/{a.steps} loss {lv:.4f} ema {ema:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"gn {float(gn):.2f} aux {float(aux_loss.detach()) if aux_loss is not None else 0:.3f} bind {float(bind_loss.detach()) if bind_loss is not None else 0:.2f} "
                f"local {float(local_loss.detach()) if local_loss is not None else 0:.2f} {el / 60:5.1f} min | {acc}")
        if a.save_every and step and step % a.save_every == 0 and step != a.steps - 1:
            write_out(step + 1, False, final=False)
    steps_done = stopped_at if stopped_at is not None else step + (0 if stopped_early or a.steps == 0 else 1)
    write_out(steps_done, stopped_early, final=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
