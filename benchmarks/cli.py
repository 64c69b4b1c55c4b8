"""`lmstream bench {flops,cpu,gpu,cache,memory,load,jobs}`: the benchmarks behind the command line (see docs/benchmarks.md).

    lmstream bench flops [--frames 1000,10000,20000] [--budget 512] [--json]   # 8B FLOPs and bytes, meta tensors
    lmstream bench cpu [--plot out/bench_cpu.png] [--json]                       # CPU wall clock, small config
    lmstream bench gpu [--cap-gb 24] [--json] | lmstream bench gpu --tiny         # lent GPU, 8B shapes
    lmstream bench cache [--redis URL] [--json]                                  # frame cache: in-process vs Redis
    lmstream bench memory [--frames 10000,20000] [--cap-gb 24] [--json]            # GPU peak, bytes per stream-hour
    lmstream bench load [--max-n 32] [--duration 30] [--kinds rtsp,ws] [--json]   # N cameras into the service
    lmstream bench jobs [--warm 0,1] [--videos 3,60] [--repeats 3] [--json]      # file-job latency, warm decoders
"""
from __future__ import annotations

# Argument definitions live here, not in the benchmark modules, so that building `lmstream`'s parser
# imports nothing heavy (no torch): the modules are imported only when a benchmark runs.
import argparse


def flops_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=_frame_counts, default="1000,10000,20000", help="frame counts per question")
    p.add_argument("--budget", type=_positive_int, default=512, help="N of the budget:N fusion policy (default 512)")
    p.add_argument("--prefix-rows", type=_positive_int, default=45, help="prompt rows before <image> (default 45)")
    p.add_argument("--question-rows", type=_positive_int, default=24, help="prompt rows after <image> (default 24)")
    p.add_argument("--tiny", action="store_true", help="toy shapes instead of the 8B ones (a quick check)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    p.add_argument("--out", help="also write the JSON to this file")


def cpu_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=_positive_int, default=5, help="interleaved ingest repeats (latency: repeats//2+1)")
    p.add_argument("--ingest-frames", type=_positive_int, default=32, help="frames per ingest measurement")
    p.add_argument("--frames", type=_frame_counts, default="16,64,256,1024", help="frame counts for question latency")
    p.add_argument("--official-frames", type=_frame_counts, default="16,64,256", help="frame counts at which the official path also runs")
    p.add_argument("--budget", type=_positive_int, default=64, help="N of budget:N at this small scale (default 64)")
    p.add_argument("--plot", default="out/bench_cpu.png", help="PNG path for the latency plot ('' for none)")
    p.add_argument("--shapes-from", default=None,
                   help="a checkpoint folder whose sizes to use (random weights), e.g. checkpoints/demo")
    p.add_argument("--threads", type=_whole_number, default=1,
                   help="torch CPU threads (default 1: see the module docstring; 0 keeps torch's default)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    p.add_argument("--out", help="also write the JSON to this file")


def gpu_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true", help="toy shapes on the CPU (exercises the script's logic)")
    p.add_argument("--cap-gb", type=_non_negative_float, default=24.0, help="GPU memory cap in GiB (0: none)")
    p.add_argument("--batch-sizes", default="1,8,32,64")
    p.add_argument("--frames", type=_frame_counts, default="1000,10000,20000")
    p.add_argument("--budget", type=_positive_int, default=512)
    p.add_argument("--chunk", type=_positive_int, default=64, help="frames per question-time fusion pass (and host chunk)")
    p.add_argument("--repeats", type=_positive_int, default=2, help="timed runs per case (after one warm-up per kind)")
    p.add_argument("--min-frames", type=_positive_int, default=64, help="frames per ingest measurement (at least)")
    p.add_argument("--clip-attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--eager-batch", type=_whole_number, default=32, help="also time ingest with eager CLIP attention at "
                   "this batch (0: skip)")
    p.add_argument("--variants", default="streamed,resident,streamed-fp8kv,streamed-mmap,engine-as-shipped")
    p.add_argument("--mmap-frames", type=_positive_int, default=1024, help="frames in the memory-mapped K/V file of the "
                   "streamed-mmap variant (1024 at 8B: 10.8 GB; frame t reads file frame t mod this)")
    p.add_argument("--mmap-dir", default=None, help="folder for that file (default: the temporary folder)")
    p.add_argument("--engine-frames", type=_positive_int, default=1000, help="largest T for the engine-as-shipped variant")
    p.add_argument("--peak-tflops", type=_positive_float, default=798.0)
    p.add_argument("--section-timeout", type=_positive_float, default=420.0, help="seconds per section")
    p.add_argument("--case-timeout", type=_positive_float, default=150.0, help="seconds per time-to-first-token case")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    p.add_argument("--out", default=None, help="JSON file (default out/bench_gpu.json, --tiny: none)")


def cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", default=None, help="redis://HOST:PORT/DB to measure (default: start a local "
                                                  "redis-server in a temporary folder, AOF everysec)")
    p.add_argument("--frames-small", type=_positive_int, default=2000, help="frames per stream at the demo record size")
    p.add_argument("--frames-8b", type=_positive_int, default=48, help="frames per stream at the 8B record sizes")
    p.add_argument("--frames-window", type=_positive_int, default=10_000,
                   help="frames of the window whose per-frame read (token vs light records) is timed (default 10000)")
    p.add_argument("--repeats", type=_positive_int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    p.add_argument("--out", default="out/bench_cache.json", help="also write the JSON to this file ('' for none)")


def load_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-n", type=_positive_int, default=32, help="largest N (cameras per kind), doubling from 1 (default 32)")
    p.add_argument("--duration", type=_positive_float, default=30.0, help="seconds of the steady window per N (default 30)")
    p.add_argument("--warmup", type=_non_negative_float, default=5.0, help="seconds after every stream stores frames (default 5)")
    p.add_argument("--kinds", default="rtsp,ws", help="rtsp (GStreamer cameras), ws (/v1/live pushers) or both")
    p.add_argument("--questions", type=int, default=4, help="streamed questions per N during the window")
    p.add_argument("--lag-tolerance", type=_non_negative_float, default=1.0, help="lag growth (s) over the window still 'no growth'")
    p.add_argument("--keep-going", action="store_true", help="measure every N up to --max-n even after lag grows")
    p.add_argument("--no-batching", action="store_true", help="skip the cross-stream vs per-stream batch comparison")
    p.add_argument("--plot", default=None, help="also draw a PNG here")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    p.add_argument("--out", default="benchmarks/results/bench_load.json", help="also write the JSON here ('' for none)")


def jobs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warm", type=_warm_settings, default="0,1",
                   help="warm_decoders settings, one service each, the first the baseline (default 0,1)")
    p.add_argument("--videos", type=_durations, default="3,60", help="video durations in s, >= 3 (default 3,60)")
    p.add_argument("--size", type=_positive_int, default=64, help="video width and height in pixels (default 64)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="one-at-a-time jobs per video and setting (default 3)")
    p.add_argument("--bursts", type=_whole_number, default=2,
                   help="bursts per setting, of the shortest video (default 2; 0: none)")
    p.add_argument("--burst-size", type=_positive_int, default=4,
                   help="jobs posted together in a burst, at most the job limit (default 4)")
    p.add_argument("--pause", type=_non_negative_float, default=6.0,
                   help="seconds after each job or burst (and then until no decoder is starting), for taken "
                        "warm decoders to be replaced (default 6)")
    p.add_argument("--poll", type=_positive_float, default=0.05, help="seconds between status polls (default 0.05)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    p.add_argument("--out", default="benchmarks/results/bench_jobs.json", help="also write the JSON here ('' for none)")


def memory_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=_frame_counts, default="10000,20000", help="frames per exact question (default 10000,20000)")
    p.add_argument("--chunks", default="32,64,128", help="frames per fusion pass / K/V chunk (default 32,64,128)")
    p.add_argument("--cap-gb", type=_positive_float, default=24.0, help="GPU memory cap in GiB (default 24)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="answer tokens the LLM KV buffer holds (default 64)")
    p.add_argument("--watches", default="0,1,4", help="watches per stream for the bytes per stream-hour")
    p.add_argument("--redis-gb", type=_positive_float, default=64.0, help="Redis memory for the stream-hours (GiB, default 64)")
    p.add_argument("--host-gb", type=_positive_float, default=512.0, help="host memory for the K/V tier (GiB, default 512)")
    p.add_argument("--redis", default="auto", choices=["auto", "yes", "no"],
                   help="also store frames in a real redis-server and read MEMORY USAGE (auto: if installed)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    p.add_argument("--out", default=None, help="also write the JSON to this file")


def _runner(module: str):
    def fn(args) -> int:
        import importlib
        if getattr(args, "out", None):             # a folder, or one that cannot be made, before any work (it
            from lmstream.cli import check_out_file   # failed E_INTERNAL after it, leaving DIR.tmp behind)
            check_out_file(args.out, "the JSON", make_parent=True)
        return importlib.import_module(f"benchmarks.{module}").run(args) or 0
    return fn


def _frame_counts(text: str) -> str:
    """A comma-separated list of whole numbers >= 1 (kept as written: the benchmarks parse it)."""
    parts = [t.strip() for t in text.split(",")]
    if not parts or not all(t.isdigit() and int(t) >= 1 for t in parts):
        raise argparse.ArgumentTypeError(f"expected frame counts, whole numbers >= 1 separated by commas, "
                                         f"got {text!r}")
    return text


def _warm_settings(text: str) -> str:
    """A comma-separated list of warm_decoders settings, whole numbers 0..MAX_WARM_DECODERS (kept as written)."""
    from deploy.settings import MAX_WARM_DECODERS
    parts = [t.strip() for t in text.split(",")]
    if not all(t.isdigit() and int(t) <= MAX_WARM_DECODERS for t in parts):
        raise argparse.ArgumentTypeError(f"expected warm_decoders settings, whole numbers 0..{MAX_WARM_DECODERS} "
                                         f"separated by commas, got {text!r}")
    return text


def _durations(text: str) -> str:
    """A comma-separated list of video durations, numbers of seconds >= 3 (`make_scene`'s shortest; kept as written)."""
    try:
        ok = all(3 <= float(t) < float("inf") for t in text.split(","))
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected durations in s, numbers >= 3 separated by commas, got {text!r}")
    return text


def _int_at_least(minimum: int):
    def check(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = minimum - 1
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return v
    return check


_positive_int = _int_at_least(1)
_whole_number = _int_at_least(0)             # where 0 means something: --threads (torch's default), --eager-batch (skip)


def _finite_float(zero_ok: bool):
    """An argparse type: a finite number > 0, or >= 0 with `zero_ok` (nan and words refused)."""
    def check(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if not ((v >= 0 if zero_ok else v > 0) and v < float("inf")):
            raise argparse.ArgumentTypeError(f"expected a number {'>=' if zero_ok else '>'} 0, got {text!r}")
        return v
    return check


_positive_float = _finite_float(zero_ok=False)
_non_negative_float = _finite_float(zero_ok=True)  # where 0 means something: --cap-gb (none), pauses


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks: FLOPs and bytes at 8B, CPU and GPU wall clock, frame "
                                       "cache, memory at 8B, load on the service, file-job latency",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="bench", required=True)
    for name, add, text in (("flops", flops_arguments, "machine-independent FLOPs and bytes at the 8B shapes "
                                                       "(meta tensors)"),
                            ("cpu", cpu_arguments, "CPU wall clock at a small configuration, baselines in the same run"),
                            ("gpu", gpu_arguments, "the lent GPU at 8B shapes with random bf16 weights "
                                                   "(--tiny: the same code at toy shapes on the CPU)"),
                            ("cache", cache_arguments, "frame cache append and chunked-read throughput, "
                                                       "in-process vs Redis, demo and 8B record sizes"),
                            ("memory", memory_arguments, "memory proof at the 8B shapes: GPU peak of an exact "
                                                         "question (meta tensors), host and Redis bytes per "
                                                         "stream-hour per retention policy"),
                            ("load", load_arguments, "N synthetic cameras (RTSP + WebSocket) at 1 fps into the real "
                                                     "service: ingest, lag, drops, time to first token, Redis memory"),
                            ("jobs", jobs_arguments, "file-job latency through the real service (upload -> ingesting "
                                                     "-> ready), warm_decoders 0 (a fresh decoder actor per job) "
                                                     "against 1, one at a time and in bursts")):
        q = sub.add_parser(name, help=text, description=text)
        add(q)
        q.set_defaults(fn=_runner(name))
    return p
