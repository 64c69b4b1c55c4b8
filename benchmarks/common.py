"""Helpers shared by the benchmarks: configurations, the kernel switch, tables, timing, JSON.

Nothing here times or counts anything by itself; `flops.py`, `cpu.py` and `gpu.py` do.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from model.config import IMAGE_TOKEN_INDEX, LlavaMiniConfig

# The prompt the per-question numbers use (DESIGN section 2: the llava_llama_3_1 chat prompt).
# Rows before the <image> placeholder: <|begin_of_text|> <|start_header_id|> system <|end_header_id|> "\n\n",
# the 35 words and stops of the system text, <|eot_id|> <|start_header_id|> user <|end_header_id|> "\n\n"
# = 45 (one token per word or stop, as Llama 3's BPE writes these common words; the exact count needs
# the real tokenizer, which cannot be downloaded here). Rows after it: "\n", a ~22-token question,
# <|eot_id|> = 24 (DESIGN's "about 24 question rows"). Both are options of every benchmark.
PREFIX_ROWS = 45
QUESTION_ROWS = 24

# H100 figures from DESIGN section 4, used only for lower bounds and the achieved fraction.
H100_PEAK_TFLOPS = 798.0
H100_HBM_GBPS = 3350.0
HOST_LINK_GBPS = 55.0


def clip_vit_l14_336():
    """openai/clip-vit-large-patch14-336's vision config (width 1024, 24 layers, 16 heads, 336 px, patch 14)."""
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)


def tiny_configs():
    """Toy shapes (CPU seconds) with the 8B structure: GQA, 4 pre-fusion layers, select layer -2."""
    from transformers import CLIPVisionConfig
    cfg = LlavaMiniConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536,
                          mm_hidden_size=32, compressor_heads=8)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                          image_size=56, patch_size=14, projection_dim=32)
    return cfg, vc


def prompt_ids(prefix_rows: int = PREFIX_ROWS, question_rows: int = QUESTION_ROWS, vocab: int = 128256):
    """(prefix ids, (1, L) input ids) with positive synthetic ids: FLOPs and bytes depend on counts only."""
    prefix = tuple(1 + (i * 7919) % (vocab - 1) for i in range(prefix_rows))
    question = [1 + (i * 104729 + 17) % (vocab - 1) for i in range(question_rows)]
    return prefix, torch.tensor([list(prefix) + [IMAGE_TOKEN_INDEX] + question])


@contextlib.contextmanager
def reference_kernels():
    """Make the kernel dispatchers pick the plain-PyTorch references on a CPU or meta tensor.

    The tests set TRITON_INTERPRET=1 at import, which makes the dispatchers run the Triton
    interpreter on CPU tensors; the interpreter cannot run on meta tensors and is far slower than
    the references on real ones. The dispatch rule reads the variable at call time, so clearing it
    here is enough (on CUDA the compiled kernels are used either way)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in str(text).replace(" ", "").split(",") if x]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def sync(device=None):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device=None):
    """(result, seconds) with the device synchronised on both sides."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def si(x: float, unit: str = "FLOP", digits: int = 3) -> str:
    """1.41e12 -> '1.41 TFLOP'."""
    if x is None or x != x:
        return "-"
    for p, s in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:.{digits}g} {s}{unit}"
    return f"{x:.{digits}g} {unit}"


def table(rows: list[list], header: list[str], title: str | None = None) -> str:
    """A plain text table, columns right-aligned except the first."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))
    out = ([title] if title else []) + [line(cells[0]), "  ".join("-" * x for x in w)] + [line(r) for r in cells[1:]]
    return "\n".join(out)


def markdown_table(rows: list[list], header: list[str]) -> str:
    out = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)


def write_json(obj, path: str | Path | None) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(p)


def emit(result: dict, text: str, as_json: bool, out_path: str | None = None) -> None:
    """--json: JSON on stdout (and nothing else); otherwise the tables. --out: JSON to a file as well."""
    write_json(result, out_path)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=1, default=str) + "\n")
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()
    if out_path:                    # several benchmarks write one by default: say where it went
        print(f"the JSON is also in {out_path}", file=sys.stderr)


def machine() -> dict:
    import platform
    d = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
         "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    d["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d
