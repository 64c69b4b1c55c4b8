"""`lmstream`: ask questions about videos from the command line.

    lmstream demo                                   # the main job, end to end, nothing to set up
    lmstream ask VIDEO "question" [--model DIR] [--vision-tower DIR] [--fps F]
                 [--window START:END] [--policy exact|budget:N] [--kv exact|fp8] [--json]
                 [--cache redis://HOST:PORT/DB [--stream ID]]
    lmstream ask --stream ID "question" --cache redis://...   # ask again, nothing re-encoded
    lmstream cache ls --cache redis://... ; cache info|rm ID --cache redis://...   # streams kept in a cache
    lmstream make-tiny DIR                          # a random checkpoint in the official layout

Arguments are checked (and the video opened) before the model loads, so a typo costs
milliseconds, not the load.

Errors a user can cause print one line, `error[CODE]: expected ..., got ...`,
and exit non-zero; set LMSTREAM_DEBUG=1 for a traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from lmcore.errors import BadArgument, CheckpointError, DeviceUnavailable, Interrupted, LmsError

REPO = Path(__file__).resolve().parents[1]
DEMO_CKPT = REPO / "checkpoints" / "demo"
MIN_DEMO_S = 3.0        # the shortest scene `stream.synthetic.make_scene` draws (MIN_VISIBLE_S)
MAX_DEMO_S = 4 * 3600.0  # the longest demo video: 14,400 frames at 1 fps (eval-demo's 3-hour tier fits)
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
        sep = ""
    if not sep or any(v is not None and not math.isfinite(v) for v in (start, end)):
        raise BadArgument(f"expected --window START:END, two numbers of seconds or one side empty (e.g. 10:70, "
                          f"30:, :90), got {text!r}")
    for name, v in (("START", start), ("END", end)):
        if v is not None and v < 0:
            raise BadArgument(f"expected --window {name} >= 0 s (seconds from the video's start), got {text!r}")
    if start is not None and end is not None and end <= start:
        raise BadArgument(f"expected --window START < END, got {text!r}")
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
    path = Path(args.model) if args.model else default_model()
    if path is None:
        raise CheckpointError("expected --model DIR (or LMSTREAM_MODEL, or the demo checkpoint in "
                              f"{DEMO_CKPT}), got none; `lmstream make-tiny DIR` makes a random one")
    if not path.expanduser().is_dir():                   # as the loader says it, before torch loads
        raise CheckpointError(f"expected a checkpoint folder, got no folder at {path.expanduser()}")
    import torch
    from model import LlavaMini
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
    if ans.choices:
        print("choices (log-probability; share of the choices' probability): " + ", ".join(
            f"{c['text']!r} {c['logprob']:.3f} ({c['share']:.0%})" for c in ans.choices))
    print(f"frames: {ans.frames} ({_fmt_span(ans.time_span)}), question fused with {ans.frames_fused}; "
          f"policy {ans.policy}, keys/values {ans.kv_policy}; LLM context {ans.llm_tokens} tokens")
    parts = ([f"load {load_s:.2f} s"] if load_s is not None else []) + \
        [f"{k[:-2]} {v:.3f} s" for k, v in ans.timings.items()]
    print("time: " + ", ".join(parts))


def warn_gaps(report: dict | None) -> None:
    """The decoder's findings as one warning line: the spans with no frame (`W_DECODE_GAP`) or, with none,
    other frames it could not use (`W_DECODE`), with its first three reasons; `--json` has them all."""
    if not report:
        return
    errors, dropped = list(report.get("errors") or []), int(report.get("errors_dropped") or 0)
    why = "; ".join(errors[:3]) + (f"; {len(errors) - 3} more in --json" if len(errors) > 3 else "") \
        + (f"; {dropped} more not kept" if dropped else "")
    if report.get("gaps"):
        gaps = ", ".join(f"{a:.2f}-{b:.2f} s" for a, b in report["gaps"])
        print(f"warning[W_DECODE_GAP]: no frames of the video at {gaps}; answered from the frames around it"
              + (f" ({why})" if why else ""), file=sys.stderr)
    elif errors:
        print(f"warning[W_DECODE]: {why}", file=sys.stderr)


#: Largest --fps accepted: above any real camera's rate every frame is sampled anyway.
MAX_FPS = 1000.0


def check_device(device: str, *, here: bool = True, name: str = "--device") -> None:
    """--device names cpu or cuda[:N] (else `BadArgument`); with ``here``, a CUDA device must exist on
    this machine (else `DeviceUnavailable`). `lmstream serve` on a Ray cluster checks only the name:
    its replicas may run on nodes with GPUs that the head node lacks."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise BadArgument(f"expected {name} cpu or cuda[:N], got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise BadArgument(f"expected {name} cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda" and here:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceUnavailable(f"expected a CUDA GPU for {name} {device}, got none on this machine "
                                    f"(torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})")
        if dev.index is not None and dev.index >= n:
            raise DeviceUnavailable(f"expected {name} cuda:0..cuda:{n - 1}, got {device}")


def check_common_args(args) -> None:
    """Cheap checks of the model and sampling arguments: before the model loads."""
    if args.batch_size is not None and args.batch_size < 1:
        raise BadArgument(f"expected --batch-size >= 1 frames, got {args.batch_size}")
    if args.dtype is not None and args.dtype.replace("torch.", "") not in ("float32", "bfloat16", "float16"):
        raise BadArgument(f"expected --dtype float32, bfloat16 or float16, got {args.dtype!r}")
    if args.device is not None:
        check_device(args.device)
    if args.fps is not None and (not math.isfinite(args.fps) or args.fps < 0 or args.fps > MAX_FPS):
        raise BadArgument(f"expected --fps in (0, {MAX_FPS:g}] frames per second, or 0 for every frame, "
                          f"got {args.fps:g}")
    from lmcore.policy import FusionPolicy
    FusionPolicy.parse(args.policy)
    if getattr(args, "retain", None) is not None:
        from frame_cache.retention import Retention
        args.retain = Retention.parse(args.retain)


def check_out_file(path, what: str, *, make_parent: bool = False) -> Path:
    """`--out PATH` checked before any work: a file path (not a folder) in a folder this user can write;
    with ``make_parent`` that folder is made when missing (else it must exist)."""
    out = Path(path)
    if out.is_dir():
        raise BadArgument(f"expected --out to be a file path for {what}, got the folder {out}")
    if make_parent:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadArgument(f"expected --out in a folder that exists or can be made, got {out} "
                              f"({e.strerror or e})") from None
        if not os.access(out.parent, os.W_OK):
            raise BadArgument(f"expected --out in a folder you can write, got {out} (no write permission)")
    elif not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise BadArgument(f"expected --out in an existing folder you can write, got {out}")
    return out


def check_question(text: str) -> str:
    """A question is non-empty UTF-8 text (argv bytes that are not UTF-8 arrive as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start:e.end].encode("utf-8", "surrogateescape")
        raise BadArgument(f"expected the question as UTF-8 text, got bytes that are not UTF-8 ({bad!r} at "
                          f"character {e.start})") from None
    if not text.strip():
        raise BadArgument("expected a non-empty question, got an empty string")
    return text


def open_cache_arg(url: str | None):
    """The cache of --cache, Redis asked once at the start: a Redis that is down is said to be the one of
    --cache, before any model loads (not "for listing streams", the first thing a command happened to do)."""
    from frame_cache import open_cache
    cache = open_cache(url)
    if hasattr(cache, "ping"):
        try:
            cache.ping("this command's --cache")
        except BaseException:
            cache.close()
            raise
    return cache


def new_stream_id(path: str) -> str:
    import hashlib
    import re
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).stem)[:40].strip("-.") or "video"
    salt = f"{Path(path).resolve()}:{time.time_ns()}:{os.getpid()}".encode()
    return f"file-{stem}-{hashlib.sha1(salt).hexdigest()[:8]}"


def cmd_ask(args) -> int:
    if args.question is None:
        if args.stream is None:
            raise BadArgument(f"expected a question after the video, got none (lmstream ask {args.video} "
                              "\"what happens?\")")
        if os.path.isfile(args.video):                   # `ask clip.mp4 --stream ID`: the question left out
            raise BadArgument(f"expected a question after the video, got none (lmstream ask {args.video} "
                              f"\"what happens?\" --stream {args.stream}; to ask about the stream's stored frames, "
                              f"give the question alone)")
        args.question, args.video = args.video, None     # `ask --stream ID "question"`: one positional
    if args.stream is not None:
        from frame_cache import validate_stream_id
        validate_stream_id(args.stream)
        if not args.cache:
            raise BadArgument("expected --cache redis://... with --stream ID (the in-process cache lives only as "
                              "long as one command), got no --cache")
    check_question(args.question)
    window = parse_window(args.window)
    check_common_args(args)
    if args.max_new_tokens < 1:
        raise BadArgument(f"expected --max-new-tokens >= 1, got {args.max_new_tokens}")
    if args.choice is not None:                      # as LlavaMini.choice_ids will, before the model loads
        from lmcore.limits import MAX_CHOICES
        if not 2 <= len(args.choice) <= MAX_CHOICES:
            raise BadArgument(f"expected --choice 2 to {MAX_CHOICES} times, got {len(args.choice)}")
        blank = [i + 1 for i, c in enumerate(args.choice) if not c.strip()]
        if blank:
            raise BadArgument(f"expected each --choice to be non-empty text, got blank choice number "
                              f"{', '.join(map(str, blank))}")
    if args.video is None and args.stream is None:
        raise BadArgument("expected a VIDEO file, or --stream ID of frames already in --cache, got neither")
    if args.video is None and not args.cache:
        raise BadArgument("expected --cache redis://... with --stream ID and no VIDEO (the in-process cache "
                          "lives only as long as one command), got no --cache")
    encode_only = sorted({"--fps", "--batch-size", "--kv", "--retain"} & getattr(args, "given", set()))
    if args.video is None and encode_only:          # they were ignored, the answer the same with or without them
        raise BadArgument(f"expected {', '.join(encode_only)} only with a VIDEO to encode, got "
                          f"{'it' if len(encode_only) == 1 else 'them'} with --stream {args.stream} and no VIDEO "
                          "(stored frames keep what they were encoded with)")
    fps = None if args.fps == 0 else args.fps
    info = None
    if args.video is not None:                       # open (and probe) the input before the model loads
        from stream.decode import VideoSource
        start, end = window if window is not None else (None, None)
        src = VideoSource(args.video, fps=fps, start=start, end=end)
        info = src.info
        src.close()
    if args.cache is None:                           # the embedded default: in-process, spilling to a temp file
        m, load_s = load_model(args)
        check_context_before_decoding(m, args.question, info, window, fps)
        ans = m.ask(args.video, args.question, fps=fps, window=window, policy=args.policy, kv_policy=args.kv,
                    retain=args.retain, max_new_tokens=args.max_new_tokens, choices=args.choice,
                    progress=not args.json)
        stream_id = None
    else:
        ans, load_s, stream_id = _ask_cached(args, window, fps, info)
    warn_gaps(ans.decode_report)
    if ans.unknown_words:
        print(f"warning: the model does not know the word(s) {', '.join(map(repr, ans.unknown_words))} of the "
              "question (each is read as an unknown token), so the answer may be off; its vocabulary is "
              "in the checkpoint's tokenizer.json", file=sys.stderr)
    if args.json:
        d = ans.to_dict()
        d["timings"]["load_s"] = round(load_s, 4)
        d["stream_id"], d["cache"] = stream_id, _redact(args.cache)
        print(json.dumps(d, indent=1, default=str))
    else:
        print_answer(ans, load_s)
        if stream_id:
            print(f"stream: {stream_id} in {_redact(args.cache)} (ask again: lmstream ask --stream {stream_id} "
                  f"\"...\" --cache {_redact(args.cache)})")
    return 0


def _redact(url: str | None) -> str | None:
    """A cache URL without its password (`user:***@`, `?password=***`)."""
    if url is None:
        return None
    from lmcore.urls import redact_redis_url
    return redact_redis_url(url)


def check_context_before_decoding(m, question: str, info, window, fps) -> None:
    """A video whose frames at `fps` over `window` cannot fit the context with the question is refused before
    it is decoded (an 18,000-frame file took 67 s of ingest to say so). The count comes from the duration the
    file declares, taken 2 % short (a header can be off; decoding still checks the real count)."""
    from lmcore.errors import ContextTooLong
    if info is None or not info.duration_s:
        return
    start = window[0] if window is not None and window[0] is not None else 0.0
    end = window[1] if window is not None and window[1] is not None else info.duration_s
    rate = fps or info.source_fps
    if not rate or end <= start:
        return
    frames = int((min(end, info.duration_s) - start) * rate * 0.98)
    try:
        m.check_context_for(question, frames)
    except ContextTooLong as e:
        raise ContextTooLong(f"{e.message}, from about {frames} frames at {rate:g} fps over {end - start:g} s "
                             "(the file's declared duration): lower --fps or ask about a --window") from None


def _ask_cached(args, window, fps, info=None):
    """`ask` through a named cache: encode VIDEO into a stream (or reuse --stream), then read the
    window back chunk by chunk."""
    from frame_cache import validate_stream_id
    from lmcore.errors import StreamExists
    from stream.ingest import ingest_video
    from stream.window import CachedFrames
    if args.stream is not None:
        validate_stream_id(args.stream)
    cache = open_cache_arg(args.cache)
    with cache:
        if args.video is not None:
            sid = args.stream or new_stream_id(args.video)
            if sid in cache.streams():
                raise StreamExists(f"expected a new stream id to encode {args.video} into, got {sid!r}, which "
                                   f"{_redact(args.cache)} holds already: ask about it without VIDEO "
                                   f"(--stream {sid}), or remove it (lmstream cache rm {sid} --cache ...)")
            start, end = window if window is not None else (None, None)
        else:
            sid = args.stream
            cache.stream_info(sid)                   # StreamNotFound before the model loads
            start, end = window if window is not None else (None, None)
        m, load_s = load_model(args)
        if args.choice is not None:
            m.choice_ids(args.choice)                # before the video is encoded into the stream
        if args.video is not None:
            check_context_before_decoding(m, args.question, info, window, fps)
        timings: dict = {}
        report = None
        if args.video is not None:
            from dataclasses import asdict
            try:
                report = asdict(ingest_video(m, args.video, cache, sid, fps=fps, window=window, kv_policy=args.kv,
                                             retain=args.retain, progress=not args.json, timings=timings))
            except (Exception, KeyboardInterrupt) as e:
                _ingest_ended(cache, sid, args, e)
                raise
            start = end = None                       # the stream holds just the window
        src = CachedFrames(cache, sid, start, end, dtype=m.dtype)
        ans = m._answer(src, args.question, args.max_new_tokens, args.policy, None, timings, report,
                        {"choices": args.choice})
    return ans, load_s, sid


def _ingest_ended(cache, sid: str, args, e: BaseException) -> None:
    """An ingest into a named cache that did not finish: a stream it left empty is removed (a retry under the
    same id was refused as existing, and asking said it had no frame); one that holds frames stays, and an
    interrupt says so (it said only "interrupted", and the stream looked complete)."""
    from frame_cache import StreamNotFound
    try:
        info = cache.stream_info(sid)
    except (StreamNotFound, LmsError):
        return
    if info.count == 0:
        try:
            cache.delete_stream(sid)
        except LmsError:
            pass
        return
    if isinstance(e, KeyboardInterrupt):
        url = _redact(args.cache)
        raise Interrupted(f"expected the ingest of {args.video} into stream {sid!r} to finish, got it interrupted "
                          f"after {info.count} frames ({info.oldest_pts:g}-{info.newest_pts:g} s): they stay in "
                          f"{url}; ask about them (lmstream ask --stream {sid} \"...\" --cache {url}), or remove "
                          f"them and ingest again (lmstream cache rm {sid} --cache {url})") from None


def cmd_cache(args) -> int:
    """List, describe or remove the streams a cache holds."""
    cache = open_cache_arg(args.cache)
    with cache:
        if args.action == "ls":
            if args.id is not None:                     # `cache ls extra` ignored the extra word
                raise BadArgument(f"expected no stream id with ls (lmstream cache ls --cache URL), got {args.id!r}")
            ids = cache.streams()
            rows = [cache.stream_info(i) for i in ids]
            if args.json:
                print(json.dumps([r.to_dict() for r in rows], indent=1))
            else:
                print(f"{'stream':<40} {'frames':>8} {'span':>22} {'MB':>10}")
                for r in rows:
                    print(f"{r.stream_id:<40} {r.count:>8} {_fmt_span((r.oldest_pts, r.newest_pts)) if r.count else '-':>22} "
                          f"{(r.bytes_used + r.light_bytes) / 1e6:>10.1f}")
        elif args.id is None:
            raise BadArgument(f"expected a stream id: lmstream cache {args.action} ID --cache URL, got none")
        elif args.action == "info":
            print(json.dumps(cache.stream_info(args.id).to_dict(), indent=1))
        else:                     # its frames and the service's records of it (job, live stream, watches)
            from deploy.serving import remove_stream
            said = remove_stream(cache, args.id, args.cache)
            print(json.dumps({"stream_id": args.id, "removed": True, "message": said}) if args.json else said)
    return 0


def cmd_demo(args) -> int:
    """The main job: a synthetic video with known answers, through the whole pipeline."""
    check_common_args(args)
    if not (math.isfinite(args.duration) and args.duration >= MIN_DEMO_S):
        raise BadArgument(f"expected --duration of at least {MIN_DEMO_S:g} s (a scene holds objects on screen for "
                          f"3 s or more), got {args.duration:g}")
    if args.duration > MAX_DEMO_S:
        raise BadArgument(f"expected --duration of at most {MAX_DEMO_S:g} s (4 h; `lmstream ask` takes a longer "
                          f"video of your own), got {args.duration:g}")
    if args.seed < 0:
        raise BadArgument(f"expected --seed >= 0, got {args.seed}")
    if args.out:
        check_out_file(args.out, "the video", make_parent=True)
        if Path(args.out).suffix.lower() != ".mp4":     # `--out demo.webm` got H.264 in MP4 under that name
            raise BadArgument(f"expected --out to end in .mp4 (the demo writes H.264 in MP4), got {args.out}")
    if args.model is None and default_model() is None:
        args.model = str(random_model())
    if args.service:
        from .demo_service import run
        return run(args)
    from stream.ingest import encode_video
    from stream.synthetic import make_scene, questions, score, write_video
    m, load_s = load_model(args)
    print(f"model: {m.name} ({sum(p.numel() for p in m.net.parameters()) / 1e6:.2f} M parameters and a "
          f"{sum(p.numel() for p in m.vision.parameters()) / 1e6:.2f} M vision tower up to its select layer, "
          f"{m.dtype}, {m.device}), loaded in {load_s:.2f} s")
    spec = make_scene(args.seed, args.duration, size=(64, 64))
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(args.out) if args.out else Path(tmp) / f"synthetic-{args.seed}.mp4"
        write_video(spec, video)
        print(f"video: {video} ({args.duration:.0f} s synthetic scene, seed {args.seed}, H.264)")
        timings: dict = {}
        states, report = encode_video(m, video, fps=args.fps, timings=timings)
        warn_gaps(report)
        # the scene is rendered at spec.fps: a higher --fps gets no more frames, said so (it claimed 2.0 fps)
        rate = (f"every frame ({spec.fps:g} fps)" if not args.fps else f"{args.fps:g} fps" if args.fps <= spec.fps
                else f"{spec.fps:g} fps (the video's own rate; --fps {args.fps:g} asked for more)")
        print(f"ingest: {len(states)} frames sampled at {rate}, decode {timings['decode_s']:.2f} s, "
              f"encode {timings['encode_s']:.2f} s ({len(states) / max(timings['encode_s'], 1e-9):.1f} frames/s), "
              f"{states.nbytes / 1e6:.1f} MB cached")
        t = time.perf_counter()
        ctx = m.prepare_context(states, args.policy)
        print(f"context: prompt prefix + {len(states)} frame tokens through the LLM once, "
              f"{(time.perf_counter() - t) * 1e3:.1f} ms; each question below runs only its own rows")
        qas = questions(spec, per_family=1)
        right, closed, picked, refused = 0, 0, 0, {}     # refused: why a question's candidates were not scored
        print()
        print(f"{'family':<8} {'question':<52} {'truth':<16} {'answer':<16} {'ok':<4} {'choice':<16} ok")
        for qa in qas:
            ans = m.ask(ctx, qa.question, max_new_tokens=8)
            ok = score(qa, ans.text)
            right += ok
            pick, pok = "-", ""
            if qa.choices and len(qa.choices) >= 2:          # a fixed answer set: the likeliest of it too
                try:
                    pick = m.ask(ctx, qa.question, choices=qa.choices).text
                except BadArgument as e:    # e.g. a candidate a random tiny model's tokenizer cannot spell
                    pick = "(not scored)"
                    refused.setdefault(e.message, []).append(qa.family)
                else:
                    pok = "yes" if score(qa, pick) else "no"
                    closed += 1
                    picked += pok == "yes"
            print(f"{qa.family:<8} {qa.question[:52]:<52} {qa.answer[:16]:<16} {ans.text[:16]:<16} "
                  f"{'yes' if ok else 'no':<4} {pick[:16]:<16} {pok}")
        print(f"\n{right}/{len(qas)} correct; of the {closed} with a fixed answer set, {picked} correct as the "
              f"likeliest candidate (`choice`: lmstream ask --choice A --choice B ...)" +
              (f"; {sum(map(len, refused.values()))} not scored" if refused else ""))
        for why, fams in refused.items():
            print(f"  not scored ({', '.join(fams)}): {why}")
        print(f"last answer: policy {ans.policy}, fuse {ans.timings['fuse_s'] * 1e3:.1f} ms, "
              f"prefill {ans.timings['prefill_s'] * 1e3:.1f} ms, generate {ans.timings['generate_s'] * 1e3:.1f} ms")
        if Path(m.name).name == RANDOM_CKPT.name:
            print("(random weights: the answers above are noise)")
    return 0


def cmd_make_tiny(args) -> int:
    d = Path(args.dir)
    if not args.dir.strip():
        raise BadArgument("expected a folder to write the checkpoint to, got an empty name")
    if d.exists() and (not d.is_dir() or any(d.iterdir())) and not args.force:
        raise BadArgument(f"expected a new or empty folder for the checkpoint, got {d}, which "
                          f"{'is a file' if not d.is_dir() else 'holds files'} (--force writes over a folder's files)")
    if args.seed < 0:
        raise BadArgument(f"expected --seed >= 0, got {args.seed}")
    from model.tiny import make_tiny_checkpoint            # (torch) once the arguments are known good
    try:
        out = make_tiny_checkpoint(d, seed=args.seed)
    except OSError as e:
        raise BadArgument(f"expected a folder that can be written, got {d} ({e.strerror or e})") from None
    print(f"wrote a random tiny LLaVA-Mini checkpoint (official layout) to {out}")
    return 0


def _model_args(p):
    p.add_argument("--model", help="checkpoint folder (official layout); default: the demo checkpoint")
    p.add_argument("--vision-tower", help="CLIP vision tower folder; default: config.json mm_vision_tower")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cpu)")
    p.add_argument("--batch-size", type=int, default=16, help="frames per encoding batch (bounds peak memory)")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video (default 1; 0: every "
                                                         "frame)")
    p.add_argument("--policy", default="exact", help="exact (default) | budget:N (fuse at most N frames)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="lmstream", description="LLaVA-Mini Stream: questions about long videos")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", required=True, parser_class=_Parser)
    p = sub.add_parser("ask", help="answer a question about a video or image file (or a stream in a cache)")
    p.add_argument("video", help="video or image file (omit with --stream ID to ask about stored frames)")
    p.add_argument("question", nargs="?", help="the question, in quotes (with --stream ID and no VIDEO: the "
                                               "second argument)")
    _model_args(p)
    p.add_argument("--cache", help="frame cache URL: redis://HOST:PORT/DB (default: in-process, for this command)")
    p.add_argument("--stream", help="stream id in --cache: the frames of VIDEO go there, or, without VIDEO, the "
                                    "stored frames to ask about")
    p.add_argument("--window", help="START:END seconds of the video to use")
    p.add_argument("--kv", default="exact", choices=["exact", "fp8"], help="cached keys/values precision")
    p.add_argument("--retain", default=None, metavar="POLICY",
                   help="retention tiers, e.g. exact_s=600,kv=fp8,kv_stride=10: frames older than exact_s keep "
                        "keys/values only every kv_stride-th frame, as kv (exact|fp8|none); questions there fuse "
                        "those frames and report the mix (default: every frame exact)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="the longest answer, in tokens (default 64)")
    p.add_argument("--choice", action="append", metavar="TEXT",
                   help="a candidate answer (give 2 to 64): the answer is the one the model finds likeliest, each "
                        "printed with its log-probability and share; nothing is generated (--max-new-tokens does "
                        "not apply); checked against the tokenizer once the model loads, before the video is read")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(fn=cmd_ask)
    p = sub.add_parser("demo", help="the main job: a synthetic video with known answers, end to end")
    _model_args(p)
    p.add_argument("--seed", type=int, default=7, help="the synthetic scene's seed (default 7)")
    p.add_argument("--duration", type=float, default=60.0,
                   help=f"seconds of video, {MIN_DEMO_S:g} to {MAX_DEMO_S:g} (default 60)")
    p.add_argument("--out", help="keep the generated video at this path (.mp4; an existing file is replaced)")
    p.add_argument("--service", action="store_true", help="through the service: start `lmstream serve`, upload, "
                                                          "ask over HTTP (one answer streamed), stop it")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("cache", help="list, describe or remove the streams in a frame cache")
    p.add_argument("action", choices=["ls", "info", "rm"])
    p.add_argument("id", nargs="?")
    p.add_argument("--cache", required=True, help="redis://HOST:PORT/DB")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_cache)
    p = sub.add_parser("make-tiny", help="write a random tiny checkpoint in the official layout")
    p.add_argument("dir", help="a new or empty folder")
    p.add_argument("--seed", type=int, default=0, help="the weights' seed (default 0)")
    p.add_argument("--force", action="store_true", help="write into a folder that already holds files")
    p.set_defaults(fn=cmd_make_tiny)
    for name in ("lmstream.serve_cmd", "lmstream.eval_demo", "benchmarks.cli"):
        try:
            mod = __import__(name, fromlist=["add_parser"])
        except ImportError:
            continue
        mod.add_parser(sub)
    return ap


class _Parser(argparse.ArgumentParser):
    """Usage errors as one `error[E_BAD_ARGUMENT]` line, like every other error."""

    def error(self, message: str):
        if "required: COMMAND" in message:
            names = ", ".join(a.dest for a in self._subparsers._group_actions[0]._choices_actions)
            message = f"no command (one of: {names})"
        prog = self.prog
        if message.startswith("unrecognized arguments"):    # the root parser says it: name the command's help
            prog = _command_of(self, getattr(self, "argv", None) or []).prog
        print(f"error[E_BAD_ARGUMENT]: expected valid arguments for `{prog}` (see `{prog} --help`), "
              f"got {message}", file=sys.stderr)
        raise SystemExit(2)


def _command_of(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)command parser `argv` names: `lmstream bench flops ...` -> that of `lmstream bench flops`."""
    for tok in argv:
        subs = parser._subparsers._group_actions[0].choices if parser._subparsers else {}
        if tok in subs:
            parser = subs[tok]
    return parser


def _terminate(signum, _frame):
    raise KeyboardInterrupt              # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C: temp files go


def main(argv: list[str] | None = None) -> int:
    import signal
    signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser()
    parser.argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if (len(extra) == 1 and not extra[0].startswith("-") and getattr(args, "fn", None) is cmd_ask
            and args.question is None):
        args.question = extra[0]     # `ask VIDEO --window 20:60 "question"`: argparse left it over
    elif extra:
        parser.parse_args(argv)      # its own error for what is left over
    args.given = {a.split("=", 1)[0] for a in parser.argv if a.startswith("--")}     # options typed, not defaults
    # a command turns autograd off for its model (load_model); called in-process (tests, embedding
    # applications), the caller gets its own grad mode back
    torch_was = sys.modules.get("torch")
    grad = torch_was.is_grad_enabled() if torch_was is not None else True
    try:
        return args.fn(args) or 0
    except LmsError as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(str(Interrupted("interrupted")), file=sys.stderr)
        return Interrupted.exit_code
    except BrokenPipeError:          # `lmstream ask ... --json | head`: the reader left; nothing to say to it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())      # so that the interpreter's final flush does not fail too
        return 141                                 # as a shell reports a command ended by SIGPIPE
    except Exception as e:  # an invariant broke: still one line unless asked
        if os.environ.get("LMSTREAM_DEBUG"):
            raise
        print(f"error[E_INTERNAL]: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(set LMSTREAM_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    finally:
        if sys.modules.get("torch") is not None:
            sys.modules["torch"].set_grad_enabled(grad)


if __name__ == "__main__":
    sys.exit(main())
