"""`lmstream`: ask questions about videos from the command line.

    lmstream demo                                   # the main job, end to end, nothing to set up
    lmstream ask VIDEO "question" [--model DIR] [--vision-tower DIR] [--fps F]
                 [--window START:END] [--policy exact|budget:N] [--kv exact|fp8] [--json]
    lmstream make-tiny DIR                          # a random checkpoint in the official layout

Errors a user can cause print one line, `error[CODE]: expected ..., got ...`,
and exit non-zero; set LMSTREAM_DEBUG=1 for a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from lmcore.errors import BadArgument, CheckpointError, LmsError

REPO = Path(__file__).resolve().parents[1]
DEMO_CKPT = REPO / "checkpoints" / "demo"
RANDOM_CKPT = Path(os.environ.get("LMSTREAM_HOME", Path.home() / ".cache" / "lmstream")) / "tiny-random"


def parse_window(text: str | None) -> tuple[float | None, float | None] | None:
    """"START:END" in seconds, either side may be empty ("30:", ":90")."""
    if not text:
        return None
    a, sep, b = text.partition(":")
    try:
        start = float(a) if a.strip() else None
        end = float(b) if b.strip() else None
    except ValueError:
        start = end = -1.0
    if not sep or (start is not None and start < 0) or (end is not None and end < 0) or \
            (start is not None and end is not None and end <= start):
        raise BadArgument(f"expected --window START:END in seconds with START < END (e.g. 10:70), got {text!r}")
    return start, end


def default_model() -> Path | None:
    env = os.environ.get("LMSTREAM_MODEL")
    if env:
        return Path(env)
    return DEMO_CKPT if (DEMO_CKPT / "config.json").exists() else None


def random_model(announce=True) -> Path:
    from model.tiny import make_tiny_checkpoint
    if not (RANDOM_CKPT / "config.json").exists():
        make_tiny_checkpoint(RANDOM_CKPT, seed=0)
    if announce:
        print("NOTE: no trained checkpoint found, so this uses a tiny checkpoint with RANDOM weights "
              f"({RANDOM_CKPT}). Its answers are noise; only the pipeline is real.", file=sys.stderr)
    return RANDOM_CKPT


def load_model(args):
    import torch
    from model import LlavaMini
    path = Path(args.model) if args.model else default_model()
    if path is None:
        raise CheckpointError("expected --model DIR (or LMSTREAM_MODEL, or the demo checkpoint in "
                              f"{DEMO_CKPT}), got none; `lmstream make-tiny DIR` makes a random one")
    t = time.perf_counter()
    m = LlavaMini.from_pretrained(path, vision_tower=args.vision_tower, dtype=args.dtype, device=args.device,
                                  batch_size=args.batch_size)
    if m.tokenizer is None:
        raise CheckpointError(f"expected tokenizer files (tokenizer.json) in {path} to ask in words, got none")
    torch.set_grad_enabled(False)
    return m, time.perf_counter() - t


def _fmt_span(span) -> str:
    return "-" if span is None else f"{span[0]:.1f} s - {span[1]:.1f} s"


def print_answer(ans, load_s: float | None = None) -> None:
    print(f"answer: {ans.text}")
    print(f"frames: {ans.frames} ({_fmt_span(ans.time_span)}), question fused with {ans.frames_fused}; "
          f"policy {ans.policy}, keys/values {ans.kv_policy}; LLM context {ans.llm_tokens} tokens")
    parts = ([f"load {load_s:.2f} s"] if load_s is not None else []) + \
        [f"{k[:-2]} {v:.3f} s" for k, v in ans.timings.items()]
    print("time: " + ", ".join(parts))


def warn_gaps(report: dict | None) -> None:
    if report and report.get("gaps"):
        gaps = ", ".join(f"{a:.2f}-{b:.2f} s" for a, b in report["gaps"])
        print(f"warning[W_DECODE_GAP]: could not decode the video at {gaps}; answered from the frames around it "
              f"({report.get('packets_failed', 0)} packets failed)", file=sys.stderr)


def cmd_ask(args) -> int:
    window = parse_window(args.window)
    if not args.question.strip():
        raise BadArgument("expected a non-empty question, got an empty string")
    m, load_s = load_model(args)
    ans = m.ask(args.video, args.question, fps=args.fps, window=window, policy=args.policy,
                kv_policy=args.kv, max_new_tokens=args.max_new_tokens, progress=not args.json and sys.stderr.isatty())
    warn_gaps(ans.decode_report)
    if args.json:
        d = ans.to_dict()
        d["timings"]["load_s"] = round(load_s, 4)
        print(json.dumps(d, indent=1, default=str))
    else:
        print_answer(ans, load_s)
    return 0


def cmd_demo(args) -> int:
    """The main job: a synthetic video with known answers, through the whole pipeline."""
    from stream.ingest import encode_video
    from stream.synthetic import make_scene, questions, score, write_video
    if args.model is None and default_model() is None:
        args.model = str(random_model())
    m, load_s = load_model(args)
    print(f"model: {m.name} ({sum(p.numel() for p in m.net.parameters()) / 1e6:.2f} M parameters, "
          f"{m.dtype}, {m.device}), loaded in {load_s:.2f} s")
    spec = make_scene(args.seed, args.duration, size=(64, 64))
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(args.out) if args.out else Path(tmp) / f"synthetic-{args.seed}.mp4"
        write_video(spec, video)
        print(f"video: {video} ({args.duration:.0f} s synthetic scene, seed {args.seed}, H.264)")
        timings: dict = {}
        states, report = encode_video(m, video, fps=args.fps, timings=timings)
        warn_gaps(report)
        print(f"ingest: {len(states)} frames sampled at {args.fps} fps, decode {timings['decode_s']:.2f} s, "
              f"encode {timings['encode_s']:.2f} s ({len(states) / max(timings['encode_s'], 1e-9):.1f} frames/s), "
              f"{states.nbytes / 1e6:.1f} MB cached")
        t = time.perf_counter()
        ctx = m.prepare_context(states, args.policy)
        print(f"context: prompt prefix + {len(states)} frame tokens through the LLM once, "
              f"{(time.perf_counter() - t) * 1e3:.1f} ms; each question below runs only its own rows")
        qas = questions(spec, per_family=1)
        right = 0
        print()
        print(f"{'family':<8} {'question':<52} {'truth':<16} {'answer':<16} ok")
        for qa in qas:
            ans = m.ask(ctx, qa.question, max_new_tokens=8)
            ok = score(qa, ans.text)
            right += ok
            print(f"{qa.family:<8} {qa.question[:52]:<52} {qa.answer[:16]:<16} {ans.text[:16]:<16} "
                  f"{'yes' if ok else 'no'}")
        print(f"\n{right}/{len(qas)} correct; last answer: policy {ans.policy}, "
              f"fuse {ans.timings['fuse_s'] * 1e3:.1f} ms, prefill {ans.timings['prefill_s'] * 1e3:.1f} ms, "
              f"decode {ans.timings['decode_s'] * 1e3:.1f} ms")
        if Path(m.name).name == RANDOM_CKPT.name:
            print("(random weights: the answers above are noise)")
    return 0


def cmd_make_tiny(args) -> int:
    from model.tiny import make_tiny_checkpoint
    out = make_tiny_checkpoint(args.dir, seed=args.seed)
    print(f"wrote a random tiny LLaVA-Mini checkpoint (official layout) to {out}")
    return 0


def _model_args(p):
    p.add_argument("--model", help="checkpoint folder (official layout); default: the demo checkpoint")
    p.add_argument("--vision-tower", help="CLIP vision tower folder; default: config.json mm_vision_tower")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cpu)")
    p.add_argument("--batch-size", type=int, default=16, help="frames per encoding batch (bounds peak memory)")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video (default 1)")
    p.add_argument("--policy", default="exact", help="exact (default) | budget:N (fuse at most N frames)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lmstream", description="LLaVA-Mini Stream: questions about long videos")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ask", help="answer a question about a video or image file")
    p.add_argument("video")
    p.add_argument("question")
    _model_args(p)
    p.add_argument("--window", help="START:END seconds of the video to use")
    p.add_argument("--kv", default="exact", choices=["exact", "fp8"], help="cached keys/values precision")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(fn=cmd_ask)
    p = sub.add_parser("demo", help="the main job: a synthetic video with known answers, end to end")
    _model_args(p)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--out", help="keep the generated video at this path")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("make-tiny", help="write a random tiny checkpoint in the official layout")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_make_tiny)
    for name in ("lmstream.eval_demo", "benchmarks.cli"):
        try:
            mod = __import__(name, fromlist=["add_parser"])
        except ImportError:
            continue
        mod.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except LmsError as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error[E_INTERRUPTED]: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an invariant broke: still one line unless asked
        if os.environ.get("LMSTREAM_DEBUG"):
            raise
        print(f"error[E_INTERNAL]: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(set LMSTREAM_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
