"""A checkpoint's weight files, without torch: listed from `model.safetensors` or its shards' index
(`weight_files`, the loader's list), and their safetensors headers checked against their sizes
(`check_weight_files`: `lmstream serve` does it before Ray starts, so a truncated or corrupt file is
`E_CHECKPOINT` at once, not "Deploying application lmstream failed" a minute later)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CheckpointError


def weight_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"expected {index} to hold a 'weight_map', got: {e}") from None
        files = sorted({ckpt / f for f in wm.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"expected the shards listed in {index.name}, missing: {', '.join(missing)}")
        return files
    single = ckpt / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else []
    raise CheckpointError(
        f"expected model.safetensors or model.safetensors.index.json in {ckpt}, found: {found[:12]}")


#: safetensors refuses a header over 100 MB: a corrupt length field must not make this read gigabytes.
MAX_HEADER_BYTES = 100_000_000


def check_weight_files(ckpt: Path) -> None:
    """Each weight file's safetensors header read and its tensors' extent checked against the file's size
    (what safetensors checks when it opens one); `CheckpointError` naming the file and what is wrong."""
    for f in weight_files(ckpt):
        try:
            with open(f, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                n = int.from_bytes(fh.read(8), "little")
                if size < 8 or not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
                    raise ValueError(f"a header of {n} bytes in a file of {size} bytes")
                header = json.loads(fh.read(n))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            if 8 + n + max(ends, default=0) != size:
                raise ValueError(f"tensors ending at byte {8 + n + max(ends, default=0)}, in a file of {size} bytes "
                                 "(cut short, or not a safetensors file)")
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise CheckpointError(f"expected a readable safetensors file at {f}, got: {e}") from None
