"""Tests for frame_cache: record layout, ring semantics, accounting, concurrency.

Every cache test runs on both backends (the in-process one and Redis on a real
redis-server) through the ``any_cache`` / ``any_cache_factory`` fixtures of conftest.py:
the in-process backend is the reference semantics, this file the conformance suite."""
from __future__ import annotations

import dataclasses
import json
import math
import random
import struct
import threading

import pytest
import torch

from frame_cache import (
    KV_TENSORS,
    RECORD_VERSION,
    SUPPORTED_DTYPES,
    CacheBudgetExceeded,
    CapacityExceeded,
    FrameCache,
    FrameRecord,
    FrameWindow,
    InProcessFrameCache,
    RecordFormatError,
    Snapshot,
    StreamExists,
    StaleWriter,
    StreamNotFound,
    WindowChunk,
    decode_record,
    encode_record,
    light_record,
    token_record,
    record_header,
    record_seq,
    decode_stacked,
    stream_key,
)
from lmcore.errors import BadArgument, CacheError, LmsError

# Zero-copy decoding of immutable bytes is deliberate; torch warns about it once per process.
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


# --------------------------------------------------------------------------- helpers
def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor, for bit-exact comparison (NaN payloads, -0.0)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype in (torch.int64, torch.int32, torch.uint8):
        info = torch.iinfo(dtype)
        lo, hi = max(info.min, -(2**62)), min(info.max, 2**62)
        return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64).to(dtype)
    if dtype.itemsize == 1:  # fp8: every bit pattern, NaNs included
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.int64).to(torch.uint8).view(dtype)
    x = torch.randn(shape, generator=gen) * 100
    return x.to(dtype)


def _frame(i: int, pts: float | None = None) -> FrameRecord:
    """A record whose contents are derived from ``i`` (its expected seq)."""
    return FrameRecord(
        pts=float(i) if pts is None else pts,
        tensors={
            "vision": torch.full((2, 8), float(i), dtype=torch.bfloat16),
            "idx": torch.tensor(i, dtype=torch.int64),
        },
        meta={"i": i},
    )


def _with_seq(rec: FrameRecord, seq: int) -> FrameRecord:
    """The record as the cache stores it after assigning ``seq``."""
    return FrameRecord(seq=seq, pts=rec.pts, tensors=rec.tensors, meta=rec.meta)


def _assert_same_record(a: FrameRecord, b: FrameRecord) -> None:
    assert a.pts == b.pts and a.meta == b.meta
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        x, y = a.tensors[name], b.tensors[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(_bits(x), _bits(y)), name


# --------------------------------------------------------------------------- records
@pytest.mark.parametrize("dtype", list(SUPPORTED_DTYPES.values()), ids=list(SUPPORTED_DTYPES))
def test_record_round_trip_every_dtype(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    rec = FrameRecord(
        seq=7,
        pts=12.5,
        tensors={
            "a": _random_tensor(dtype, (3, 5, 7), gen),
            "scalar": _random_tensor(dtype, (), gen),
            "empty": _random_tensor(dtype, (0, 4), gen),
            "t": _random_tensor(dtype, (4, 6), gen).t(),  # non-contiguous input
        },
        meta={"policy": "mean", "layers": [1, 2], "note": "ünïcode"},
    )
    b = encode_record(rec)
    assert isinstance(b, bytes) and b[:4] == b"LMFR"
    for copy in (False, True):
        out = decode_record(b, copy=copy)
        assert out.seq == 7
        _assert_same_record(rec, out)
        assert out.tensors["scalar"].dim() == 0
        assert out.tensors["empty"].shape == (0, 4)
    assert encode_record(out) == b  # canonical layout


def test_bf16_and_fp8_special_values_bit_exact() -> None:
    bf = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, 3.14], dtype=torch.bfloat16)
    bf_payload = torch.tensor([0x7FC1, 0xFFFF, 0x0001], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    all_e4 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    all_e5 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e5m2)
    rec = FrameRecord(pts=0.0, tensors={"bf": bf, "bfp": bf_payload, "e4": all_e4, "e5": all_e5})
    out = decode_record(encode_record(rec))
    _assert_same_record(rec, out)
    assert out.tensors["e4"].dtype == torch.float8_e4m3fn and out.tensors["e5"].dtype == torch.float8_e5m2


def test_record_layout_and_alignment() -> None:
    rec = FrameRecord(
        pts=1.0,
        tensors={"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(5, dtype=torch.float32), "c": torch.zeros(0)},
    )
    b = encode_record(rec)
    magic, version, hlen = struct.unpack_from("<4sHI", b, 0)
    assert magic == b"LMFR" and version == RECORD_VERSION == 1
    header = json.loads(b[10 : 10 + hlen])
    assert header == record_header(b)
    assert set(header) == {"seq", "pts", "meta", "tensors"}
    data_start = -(-(10 + hlen) // 64) * 64
    offsets = [t["offset"] for t in header["tensors"]]
    assert offsets == [0, 64, 128] and all((data_start + o) % 64 == 0 for o in offsets)
    assert len(b) == data_start + 128  # the empty tensor "c" sits at the next aligned offset
    # little-endian float32 1.0 at tensor "b"
    assert b[data_start + 64 : data_start + 68] == struct.pack("<f", 1.0)


def test_headers_and_the_service_routes_need_no_torch(tmp_path) -> None:
    """Reading a record's header and importing what the service's Ingress runs (the routes, the Ray app,
    the Redis backend, retention) load no torch: torch costs a process ~1.3 s and ~180 MB, and the Ingress
    never touches a tensor. The first tensor imports it, with the same dtypes as before."""
    import subprocess
    import sys
    rec = FrameRecord(seq=7, pts=2.5, tensors={n: torch.zeros(2, 3, dtype=d) for n, d in SUPPORTED_DTYPES.items()})
    (tmp_path / "rec.bin").write_bytes(encode_record(rec))
    bad = bytearray(encode_record(FrameRecord(pts=0.0, tensors={"x": torch.zeros(2)})))
    i = bad.index(b'"float32"')
    bad[i:i + 9] = b'"float33"'
    (tmp_path / "bad.bin").write_bytes(bytes(bad))
    code = f"""
import json, sys
from pathlib import Path
import deploy.app, frame_cache.redis_cache, frame_cache.retention, frame_cache.local_tier
from frame_cache import DTYPE_ITEMSIZE, RecordFormatError, record_header, record_seq
b = Path({str(tmp_path)!r}, "rec.bin").read_bytes()
h = record_header(b)
try:
    record_header(Path({str(tmp_path)!r}, "bad.bin").read_bytes())
    err = None
except RecordFormatError as e:
    err = str(e)
loaded = "torch" in sys.modules
from frame_cache import SUPPORTED_DTYPES, decode_record
print(json.dumps({{"torch_before": loaded, "seq": record_seq(b), "header": h, "err": err,
                  "sizes": {{n: d.itemsize for n, d in SUPPORTED_DTYPES.items()}}, "itemsize": DTYPE_ITEMSIZE,
                  "decoded": {{n: str(t.dtype) for n, t in decode_record(b).tensors.items()}}}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch_before"] is False
    assert got["seq"] == 7 and got["header"] == record_header(encode_record(rec))
    assert got["err"] and "dtype to be one of float32, float16, bfloat16" in got["err"] and "'float33'" in got["err"]
    assert got["sizes"] == got["itemsize"] == {n: d.itemsize for n, d in SUPPORTED_DTYPES.items()}
    assert got["decoded"] == {n: str(d) for n, d in SUPPORTED_DTYPES.items()}


def test_record_seq_reads_the_header_start_and_falls_back_to_the_whole_header() -> None:
    """`record_seq` (every read's "is this the frame asked for" check) takes the seq from the first bytes of a
    header as `encode_record` writes it, and parses the whole header otherwise: the same seq either way."""
    from frame_cache.record import RECORD_MAGIC
    for seq in (-1, 0, 7, 10 ** 17 + 3, 10 ** 19 + 1):          # the last: past the fast path's 18 digits
        b = encode_record(FrameRecord(seq=seq, pts=2.5, tensors={"token": torch.ones(1, 4)}, meta={"m": [1] * 50}))
        assert record_seq(b) == seq == record_header(b)["seq"] == decode_record(b).seq
    # a header with its keys in another order (another writer): still read, by the whole header
    h = json.dumps({"pts": 1.0, "seq": 42, "meta": {}, "tensors": []}, separators=(",", ":")).encode()
    blob = RECORD_MAGIC + struct.pack("<HI", 1, len(h)) + h
    blob += bytes(-(-len(blob) // 64) * 64 - len(blob))
    assert record_seq(blob) == 42 == decode_record(blob).seq
    with pytest.raises(RecordFormatError):
        record_seq(b"LMFX" + blob[4:])                             # not a record: the whole header's error


def _stacked_reference(blobs, name):
    """`decode_stacked`'s answer computed one `decode_record` at a time."""
    recs = [decode_record(b) for b in blobs]
    return [r.seq for r in recs], [r.pts for r in recs], [r.meta for r in recs], \
        torch.stack([r.tensors[name] for r in recs])


def test_decode_stacked_is_decode_record_one_at_a_time() -> None:
    """`decode_stacked` (a question's read of every frame's token record) gives what `decode_record` gives record
    by record: seqs, pts, metas and the named tensors stacked, bit for bit; over records of one layout (the fast
    path: one checked header), of several layouts interleaved, in other dtypes, from bytes, bytearrays and
    memoryviews, and with headers `encode_record` would not write (keys in another order: decoded whole)."""
    def tok(seq, pts, dtype=torch.bfloat16, extra=False, meta=None):
        g = torch.Generator().manual_seed(seq + 5)
        t = {"token": torch.randn(1, 8, generator=g).to(dtype)}
        if extra:
            t["prefix_out"] = torch.randn(3, 8, generator=g)
        return encode_record(FrameRecord(seq=seq, pts=pts, tensors=t, meta=meta or {"kv_policy": "exact"}))

    pts_values = [0.0, 1e-05, 12.5, 1e+20, 3.0, -2.25, 99999.0, 7.0]
    one_layout = [tok(s, p) for s, p in zip([0, 1, 9, 10, 99, 100, 10 ** 17 + 3, 10 ** 19 + 1], pts_values)]
    mixed = one_layout[:3] + [tok(20, 4.0, extra=True), tok(21, 5.0, meta={"kv_policy": "none", "light": True})] \
        + one_layout[3:]
    other_order = json.dumps({"pts": 6.0, "seq": 42, "meta": {}, "tensors": [
        {"name": "token", "dtype": "bfloat16", "shape": [1, 8], "offset": 0, "nbytes": 16}]},
        separators=(",", ":")).encode()
    blob = b"LMFR" + struct.pack("<HI", 1, len(other_order)) + other_order
    blob += bytes(-(-len(blob) // 64) * 64 - len(blob)) + torch.arange(8, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    for blobs in (one_layout, mixed, mixed + [blob], [bytearray(b) for b in mixed], [memoryview(b) for b in mixed],
                  [one_layout[0]], one_layout[:1] * 3):
        got, want = decode_stacked(blobs, "token"), _stacked_reference(blobs, "token")
        assert got[:3] == want[:3]
        assert got[3].dtype == want[3].dtype and got[3].shape == want[3].shape == (len(blobs), 1, 8)
        assert torch.equal(_bits(got[3]), _bits(want[3]))
    # tokens of another dtype among them: stacked as torch.stack stacks them, one record at a time
    f32 = [tok(1, 1.0), tok(2, 2.0, dtype=torch.float32), tok(3, 3.0)]
    got, want = decode_stacked(f32, "token"), _stacked_reference(f32, "token")
    assert got[:3] == want[:3] and got[3].dtype == want[3].dtype and torch.equal(got[3], want[3])
    # the stacked tensor owns its memory (a writable copy, not a view of immutable bytes)
    t = decode_stacked(one_layout, "token")[3]
    t.add_(1)
    assert torch.equal(_bits(decode_stacked(one_layout, "token")[3]), _bits(_stacked_reference(one_layout, "token")[3]))
    assert decode_stacked([], "token")[:3] == ([], [], [])
    with pytest.raises(BadArgument, match=r"expected a 'missing' tensor in record seq 0, got \['token'\]"):
        decode_stacked(one_layout, "missing")


def test_states_from_blobs_are_states_from_records_bit_for_bit() -> None:
    """The frames a question fuses are decoded a chunk at a time (`states_from_blobs`, over `decode_columns`):
    the same FrameStates, field by field and bit for bit, as each record decoded and stacked
    (`states_from_records`), in exact and fp8 forms, with a watch's rows in the records (not a state tensor)
    and with records of another header among them; `decode_columns` with no names reads the headers only."""
    from frame_cache import decode_columns
    from stream.ingest import STATE_TENSORS, states_from_blobs, states_from_records

    def rec(seq: int, fp8: bool, watch: bool = False, odd_meta: bool = False) -> bytes:
        g = torch.Generator().manual_seed(seq)
        kv = lambda: torch.randn(2, 2, 5, 4, generator=g).to(torch.float8_e4m3fn if fp8 else torch.bfloat16)
        t = {"token": torch.randn(1, 8, generator=g).to(torch.bfloat16), "k": kv(), "v": kv(),
             "prefix_out": torch.randn(3, 8, generator=g).to(torch.bfloat16)}
        if fp8:
            t["k_scale"], t["v_scale"] = torch.rand(2, 2, generator=g), torch.rand(2, 2, generator=g)
        if watch:
            t["w:abc"] = torch.randn(4, 8, generator=g)
        meta = {"n_vision_rows": 2, "prefix_ids": [1, 2, 3], "kv_policy": "fp8" if fp8 else "exact"}
        if odd_meta:
            meta["note"] = "another writer"
        return encode_record(FrameRecord(seq=seq, pts=seq * 0.5, tensors=t, meta=meta))

    for fp8 in (False, True):
        for blobs in ([rec(i, fp8) for i in range(6)],
                      [rec(i, fp8, watch=i % 2 == 0, odd_meta=i == 3) for i in range(6)],
                      [rec(7, fp8)]):
            got, want = states_from_blobs(blobs), states_from_records([decode_record(b) for b in blobs])
            for f in ("tokens", "keys", "values", "prefix_out", "k_scale", "v_scale"):
                a, b = getattr(got, f), getattr(want, f)
                assert (a is None) == (b is None) == (f in ("k_scale", "v_scale") and not fp8), f
                if a is not None:
                    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b)), f
            assert (got.n_vision_rows, got.prefix_ids, got.kv_policy) == (want.n_vision_rows, want.prefix_ids,
                                                                          want.kv_policy)
            assert torch.equal(got.pts, want.pts) and got.meta == want.meta
            seqs, pts, metas, cols = decode_columns(blobs, ())
            assert cols == {} and metas == [decode_record(b).meta for b in blobs]
            assert (seqs, pts) == ([decode_record(b).seq for b in blobs], [decode_record(b).pts for b in blobs])
    assert STATE_TENSORS == ("token", "k", "v", "prefix_out", "k_scale", "v_scale")
    with pytest.raises(BadArgument, match="one model, prefix and policy"):
        states_from_blobs([rec(0, False), rec(1, True)])
    with pytest.raises(BadArgument, match=r"expected a 'k_scale' tensor in record seq 1"):
        decode_columns([rec(0, True), rec(1, False)], ("k_scale",))


def test_decode_stacked_refuses_what_decode_record_refuses_after_a_good_record() -> None:
    """A record after one of the same layout gets no free pass: truncated, padded, another version or magic,
    a pts JSON reads as infinite, a header that ends as a good one does but with a second "seq" JSON reads in
    place of the first (decoded whole, its seq the one `decode_record` reads): each is refused or read as
    `decode_record` reads it."""
    good = [encode_record(FrameRecord(seq=s, pts=float(s), tensors={"token": torch.ones(1, 4)},
                                      meta={"kv_policy": "exact"})) for s in range(3)]
    with pytest.raises(RecordFormatError, match="truncated"):
        decode_stacked([good[0], good[1][:-1]], "token")
    with pytest.raises(RecordFormatError, match="trailing bytes"):
        decode_stacked([good[0], good[1] + b"\0"], "token")
    with pytest.raises(RecordFormatError, match="format version 1, got 7"):
        decode_stacked([good[0], good[1][:4] + struct.pack("<H", 7) + good[1][6:]], "token")
    with pytest.raises(RecordFormatError, match="magic"):
        decode_stacked([good[0], b"LMFX" + good[1][4:]], "token")
    def rebuilt(edit) -> bytes:                           # good[0] with its header bytes edited, data kept
        b = good[0]
        hlen = struct.unpack_from("<I", b, 6)[0]
        h = edit(b[10:10 + hlen])
        out = b"LMFR" + struct.pack("<HI", 1, len(h)) + h
        return out + bytes(-(-len(out) // 64) * 64 - len(out)) + b[-(-(10 + hlen) // 64) * 64:]
    huge = rebuilt(lambda h: h.replace(b'"pts":0.0,', b'"pts":1e999,'))
    with pytest.raises(RecordFormatError, match="finite"):
        decode_record(huge)
    with pytest.raises(RecordFormatError, match="finite"):
        decode_stacked([good[0], huge], "token")
    with pytest.raises(RecordFormatError, match="at most 1048576 bytes"):
        decode_stacked([good[0], good[1][:6] + struct.pack("<I", 1 << 21) + good[1][10:]], "token")
    # {"seq":S,"pts":..,"meta":..,"tensors":..,"seq":T}: JSON reads T
    twice = [rebuilt(lambda h: h.replace(b'"seq":0', b'"seq":%d' % s)[:-1] + b',"seq":7}') for s in (7, 8)]
    assert [decode_record(b).seq for b in twice] == [7, 7]
    assert decode_stacked(twice, "token")[0] == [7, 7]


def test_decode_is_zero_copy_and_copy_owns_memory() -> None:
    rec = FrameRecord(pts=0.0, tensors={"x": torch.arange(16, dtype=torch.float32)})
    buf = bytearray(encode_record(rec))
    view = decode_record(buf)
    owned = decode_record(buf, copy=True)
    header = record_header(buf)
    o = -(-(10 + struct.unpack_from("<I", buf, 6)[0]) // 64) * 64 + header["tensors"][0]["offset"]
    buf[o : o + 4] = struct.pack("<f", 42.0)
    assert view.tensors["x"][0].item() == 42.0  # shares memory with the buffer
    assert owned.tensors["x"][0].item() == 0.0


def test_record_meta_and_validation() -> None:
    rec = FrameRecord(pts=3, tensors={}, meta={"a": {"b": [1, 2.5, None, True]}})
    out = decode_record(encode_record(rec))
    assert out.meta == rec.meta and out.tensors == {} and out.pts == 3.0 and out.seq == -1
    with pytest.raises(BadArgument, match="dtype"):
        encode_record(FrameRecord(tensors={"c": torch.zeros(2, dtype=torch.complex64)}))
    with pytest.raises(BadArgument, match="JSON"):
        encode_record(FrameRecord(meta={"x": object()}))
    with pytest.raises(BadArgument, match="finite"):
        FrameRecord(pts=float("nan"))
    with pytest.raises(BadArgument, match="torch.Tensor"):
        FrameRecord(tensors={"x": [1, 2]})


def test_decode_errors() -> None:
    good = encode_record(_frame(3))
    with pytest.raises(RecordFormatError, match=r"expected record magic b'LMFR', got b'XXXX'"):
        decode_record(b"XXXX" + good[4:])
    bad_version = good[:4] + struct.pack("<H", 7) + good[6:]
    with pytest.raises(RecordFormatError) as ei:
        decode_record(bad_version)
    assert ei.value.message == "expected record format version 1, got 7"
    assert isinstance(ei.value, CacheError) and ei.value.code == "E_RECORD_FORMAT"
    assert "\n" not in str(ei.value)
    with pytest.raises(RecordFormatError, match=r"truncated: expected at least 10 bytes, got 3"):
        decode_record(good[:3])
    with pytest.raises(RecordFormatError, match=r"truncated: expected at least \d+ bytes for the header"):
        decode_record(good[:20])
    with pytest.raises(RecordFormatError, match=rf"truncated: expected {len(good)} bytes, got {len(good) - 1}"):
        decode_record(good[:-1])
    with pytest.raises(RecordFormatError, match="trailing bytes"):
        decode_record(good + b"\0")
    with pytest.raises(RecordFormatError, match="bytes"):
        decode_record(12345)  # type: ignore[arg-type]


def _rewrite_header(b: bytes, edit) -> bytes:
    hlen = struct.unpack_from("<I", b, 6)[0]
    header = json.loads(b[10 : 10 + hlen])
    data_start = -(-(10 + hlen) // 64) * 64
    edit(header)
    hj = json.dumps(header).encode()
    new_start = -(-(10 + len(hj)) // 64) * 64
    return b[:6] + struct.pack("<I", len(hj)) + hj + b"\0" * (new_start - 10 - len(hj)) + b[data_start:]


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda h: h["tensors"][1].update(offset=0), r"expected tensor 'idx' offset 64, got 0"),
        (lambda h: h["tensors"][0].update(nbytes=10), r"expected tensor 'vision' nbytes 32 for bfloat16\[2, 8\], got 10"),
        (lambda h: h["tensors"][0].update(shape=[2, 9]), r"'vision' nbytes 36 for bfloat16\[2, 9\], got 32"),
        (lambda h: h["tensors"][0].update(dtype="complex64"), r"dtype to be one of .*, got 'complex64'"),
        (lambda h: h["tensors"][0].update(shape=[-1, 16]), r"shape to be a list of non-negative ints"),
        (lambda h: h["tensors"][1].update(name="vision"), r"unique tensor names"),
        (lambda h: h.pop("meta"), r"header keys"),
        (lambda h: h.update(pts="soon"), r"finite number"),
    ],
)
def test_decode_rejects_inconsistent_headers(edit, pattern) -> None:
    good = encode_record(_frame(3))
    assert decode_record(_rewrite_header(good, lambda h: None)).meta == {"i": 3}
    with pytest.raises(RecordFormatError, match=pattern):
        decode_record(_rewrite_header(good, edit))


def test_decode_rejects_bad_json() -> None:
    body = b"{not json"
    b = b"LMFR" + struct.pack("<HI", 1, len(body)) + body
    with pytest.raises(RecordFormatError, match="JSON"):
        decode_record(b)


# --------------------------------------------------------------------------- ring semantics
@pytest.fixture
def cache(any_cache: FrameCache) -> FrameCache:
    """A fresh, empty cache: in-process, then Redis (see conftest.py)."""
    return any_cache


def test_interface_and_stream_key(cache: FrameCache) -> None:
    assert isinstance(cache, FrameCache)
    assert stream_key("cam-1", "slots") == "lms:{cam-1}:slots"
    assert stream_key("a.b:c_d-9", "meta") == "lms:{a.b:c_d-9}:meta"
    for bad in ("", "a/b", "x" * 129, "a{b}", None):
        with pytest.raises(BadArgument, match="stream id"):
            stream_key(bad, "slots")  # type: ignore[arg-type]
        with pytest.raises(BadArgument, match="stream id"):
            cache.create_stream(bad, 4)  # type: ignore[arg-type]
    with pytest.raises(BadArgument, match="key part"):
        stream_key("s", "a b")


def test_ring_overwrite_and_windows(cache: FrameCache) -> None:
    info = cache.create_stream("s", 5, meta={"fps": 1})
    assert (info.capacity, info.count, info.total_appended, info.oldest_pts, info.meta) == (5, 0, 0, None, {"fps": 1})
    seqs = [cache.append("s", _frame(i)) for i in range(12)]
    assert seqs == list(range(12))

    info = cache.stream_info("s")
    assert (info.count, info.total_appended, info.evicted) == (5, 12, 7)
    assert (info.oldest_seq, info.newest_seq, info.oldest_pts, info.newest_pts) == (7, 11, 7.0, 11.0)

    snap = cache.snapshot("s")
    assert snap.pts() == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert (snap.first_seq, snap.last_seq, snap.dropped_before, snap.dropped_exact) == (7, 11, 7, True)
    assert [r.seq for r in snap] == [7, 8, 9, 10, 11]
    assert [r.meta["i"] for r in snap.records] == [7, 8, 9, 10, 11]
    assert snap[0].tensors["idx"].item() == 7 and len(snap) == 5

    snap = cache.snapshot("s", 3.0, 9.0)
    assert snap.pts() == [7.0, 8.0, 9.0] and (snap.first_seq, snap.last_seq, snap.dropped_before) == (7, 9, 4)
    snap = cache.snapshot("s", 8.5, 10.0)
    assert snap.pts() == [9.0, 10.0] and snap.dropped_before == 0 and snap.seqs() == [9, 10]
    snap = cache.snapshot("s", 9.0, None)
    assert snap.pts() == [9.0, 10.0, 11.0] and snap.dropped_before == 0
    snap = cache.snapshot("s", None, 8.0)
    assert snap.pts() == [7.0, 8.0] and snap.dropped_before == 7
    snap = cache.snapshot("s", 1.0, 2.5)  # entirely overwritten
    assert len(snap) == 0 and snap.dropped_before == 2 and (snap.first_seq, snap.last_seq) == (-1, -1)
    snap = cache.snapshot("s", 20.0, 30.0)  # in the future
    assert len(snap) == 0 and snap.dropped_before == 0
    snap = cache.snapshot("s", 0.0, 100.0, max_frames=2)  # newest 2
    assert snap.pts() == [10.0, 11.0] and snap.dropped_before == 7

    lat = cache.latest("s", 3)
    assert lat.pts() == [9.0, 10.0, 11.0] and lat.dropped_before == 0
    lat = cache.latest("s", 9)
    assert lat.pts() == [7.0, 8.0, 9.0, 10.0, 11.0] and lat.dropped_before == 4
    assert len(cache.latest("s", 0)) == 0

    with pytest.raises(BadArgument, match="start <= end"):
        cache.snapshot("s", 5.0, 1.0)
    with pytest.raises(BadArgument, match="max_frames"):
        cache.snapshot("s", max_frames=-1)


def test_equal_pts_and_window_bisect(any_cache_factory) -> None:
    c = any_cache_factory()
    c.create_stream("dup", 6)
    pts = [0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert c.append_many("dup", [_frame(i, p) for i, p in enumerate(pts)]) == list(range(8))
    # retained: seqs 2..7 with pts 1,1,2,2,3,3 ; evicted pts 0,1
    snap = c.snapshot("dup", 1.0, 2.0)
    assert snap.pts() == [1.0, 1.0, 2.0, 2.0] and snap.seqs() == [2, 3, 4, 5] and snap.dropped_before == 1
    assert c.snapshot("dup", 3.0, 3.0).seqs() == [6, 7]
    assert c.snapshot("dup", 1.5, 1.9).pts() == []
    # brute-force check of window lookup against a linear scan on a wrapped ring
    c.create_stream("w", 37)
    rng = random.Random(1)
    p = 0.0
    all_pts = []
    for i in range(100):
        p += rng.choice([0.0, 0.25, 0.5, 1.0])
        all_pts.append(p)
        c.append("w", _frame(i, p))
    kept = all_pts[-37:]
    for _ in range(200):
        a, b = sorted(rng.uniform(-1, p + 1) for _ in range(2))
        snap = c.snapshot("w", a, b)
        assert snap.pts() == [x for x in kept if a <= x <= b]
        assert snap.dropped_before == len([x for x in all_pts[:-37] if a <= x <= b])
    c.close()


def test_pts_must_be_non_decreasing(cache: FrameCache) -> None:
    cache.create_stream("s", 4)
    cache.append("s", _frame(0, 5.0))
    cache.append("s", _frame(1, 5.0))  # equal is fine
    with pytest.raises(BadArgument, match=r"expected non-decreasing pts >= 5.0 for stream 's', got 4.5"):
        cache.append("s", _frame(2, 4.5))
    with pytest.raises(BadArgument, match=r"got 5.5 \(records\[2\]\)"):
        cache.append_many("s", [_frame(2, 6.0), _frame(3, 7.0), _frame(4, 5.5)])
    info = cache.stream_info("s")
    assert (info.count, info.total_appended, info.newest_pts) == (2, 2, 5.0)  # batch was all-or-nothing
    assert cache.append("s", _frame(2, 6.0)) == 2


def test_create_stream_rules(cache: FrameCache) -> None:
    cache.create_stream("s", 4, meta={"a": 1})
    assert cache.create_stream("s", 4).meta == {"a": 1}
    assert cache.create_stream("s", 4, meta={"a": 1}).capacity == 4
    with pytest.raises(BadArgument, match=r"expected capacity 4 for existing stream 's', got 8"):
        cache.create_stream("s", 8)
    with pytest.raises(BadArgument, match=r"differs \(a: 1 stored, 2 given; b: null stored, true given\)"):
        cache.create_stream("s", 4, meta={"a": 2, "b": True})
    with pytest.raises(StreamExists, match="'s'"):
        cache.create_stream("s", 4, exist_ok=False)
    # `match`: an existing stream's meta compared on those keys alone; a new stream gets the whole meta
    assert cache.create_stream("s", 4, meta={"a": 1, "fps": 2}, match=("a",)).meta == {"a": 1}
    with pytest.raises(BadArgument, match=r"differs \(a: 1 stored, 3 given\)"):
        cache.create_stream("s", 4, meta={"a": 3, "fps": 2}, match=("a",))
    assert cache.create_stream("m", 4, meta={"a": 1, "fps": 2}, match=("a",)).meta == {"a": 1, "fps": 2}
    cache.delete_stream("m")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(BadArgument, match="capacity"):
            cache.create_stream("t", bad)  # type: ignore[arg-type]
    with pytest.raises(BadArgument, match="JSON"):
        cache.create_stream("t", 2, meta={"x": {1, 2}})
    cache.create_stream("a", 1)
    assert cache.streams() == ["a", "s"]


# --------------------------------------------------------------------------- accounting
def test_memory_accounting_exact(cache: FrameCache) -> None:
    cache.create_stream("s", 3)
    cache.create_stream("t", 10)
    sizes = []
    for i in range(3):
        rec = FrameRecord(pts=float(i), tensors={"x": torch.zeros(10 * (i + 1))}, meta={"i": i})
        sizes.append(len(encode_record(_with_seq(rec, i))))
        cache.append("s", rec)
    assert cache.stream_info("s").bytes_used == sum(sizes)
    assert cache.snapshot("s").nbytes == sum(sizes)
    # overwrite the largest-but-one... with a small record: usage goes down
    small = FrameRecord(pts=10.0, tensors={"x": torch.zeros(1)})
    cache.append("s", small)
    after = sizes[1:] + [len(encode_record(_with_seq(small, 3)))]
    assert cache.stream_info("s").bytes_used == sum(after) < sum(sizes)
    assert sum(len(b) for b in cache.snapshot("s").blobs) == sum(after)

    cache.append_many("t", [_frame(i) for i in range(4)])
    t_bytes = sum(len(b) for b in cache.snapshot("t").blobs)
    st = cache.stats()
    assert st["streams"]["s"] == {**st["streams"]["s"], "frames": 3, "bytes": sum(after), "evicted": 1}
    assert st["streams"]["t"]["bytes"] == t_bytes and st["total_frames"] == 7
    assert st["total_bytes"] == sum(after) + t_bytes
    assert st["backend"] == cache.backend and st["num_streams"] == 2
    json.dumps(st)  # JSON-serialisable
    # the backend's own running total (for max_bytes_total) agrees: see test_redis_cache for Redis's
    internal = (lambda: cache._total_bytes) if isinstance(cache, InProcessFrameCache) else None
    if internal:
        assert internal() == st["total_bytes"]

    cache.delete_stream("s")
    st = cache.stats()
    assert list(st["streams"]) == ["t"] and st["total_bytes"] == t_bytes
    assert internal is None or internal() == t_bytes
    cache.delete_stream("t")
    assert cache.stats()["total_bytes"] == 0 and cache.streams() == []
    assert internal is None or internal() == 0


def test_budget_errors_do_not_lose_frames(any_cache_factory) -> None:
    one = len(encode_record(_with_seq(_frame(0), 0)))
    big = FrameRecord(pts=100.0, tensors={"x": torch.zeros(4096)})

    c = any_cache_factory(max_bytes_per_stream=one * 4)
    c.create_stream("s", 8)
    c.append_many("s", [_frame(i) for i in range(4)])
    before = c.snapshot("s")
    with pytest.raises(CacheBudgetExceeded) as ei:
        c.append("s", big)
    msg = ei.value.message
    assert msg.startswith(f"expected at most {one * 4} bytes for stream 's', would hold ")
    assert isinstance(ei.value, CacheError)
    with pytest.raises(CacheBudgetExceeded):
        c.append("s", _frame(4))  # one more same-size frame (ring not yet full) is over budget too
    after = c.snapshot("s")
    assert after.blobs == before.blobs and after.seqs() == [0, 1, 2, 3]
    assert c.stream_info("s").bytes_used == 4 * one and c.stream_info("s").total_appended == 4
    c.close()

    # a full ring can keep overwriting within budget
    c = any_cache_factory(max_bytes_per_stream=one * 4)
    c.create_stream("s", 4)
    c.append_many("s", [_frame(i) for i in range(10)])
    assert c.snapshot("s").seqs() == [6, 7, 8, 9]
    c.close()

    # global budget across streams
    c = any_cache_factory(max_bytes_total=one * 5)
    c.create_stream("a", 8)
    c.create_stream("b", 8)
    c.append_many("a", [_frame(i) for i in range(3)])
    c.append_many("b", [_frame(i) for i in range(2)])
    with pytest.raises(CacheBudgetExceeded, match=rf"expected at most {one * 5} bytes in the cache in total"):
        c.append("b", _frame(2))
    assert c.snapshot("b").seqs() == [0, 1] and c.stats()["total_bytes"] == 5 * one
    c.delete_stream("a")
    assert c.append("b", _frame(2)) == 2
    c.close()


def test_unknown_stream_errors(cache: FrameCache) -> None:
    calls = [
        lambda: cache.append("nope", _frame(0)),
        lambda: cache.append_many("nope", [_frame(0)]),
        lambda: cache.snapshot("nope"),
        lambda: cache.latest("nope", 1),
        lambda: cache.stream_info("nope"),
        lambda: cache.delete_stream("nope"),
        lambda: cache.window("nope"),
        lambda: cache.read("nope", [0]),
        lambda: cache.acquire_writer("nope"),
        lambda: cache.append_many("nope", []),
    ]
    for call in calls:
        with pytest.raises(StreamNotFound) as ei:
            call()
        e = ei.value
        assert isinstance(e, CacheError) and isinstance(e, LmsError)
        assert e.code == "E_STREAM_NOT_FOUND" and e.http_status == 404
        assert "'nope'" in e.message and e.to_dict()["code"] == "E_STREAM_NOT_FOUND"
    cache.create_stream("gone", 2)
    cache.delete_stream("gone")
    with pytest.raises(StreamNotFound, match="'gone'"):
        cache.snapshot("gone")


def test_closed_cache_rejects_calls(any_cache_factory) -> None:
    c = any_cache_factory()
    with c:
        c.create_stream("s", 2)
    with pytest.raises(CacheError, match="closed"):
        c.streams()
    with pytest.raises(CacheError, match="closed"):
        c.snapshot("s")
    for call in (lambda: c.append("s", _frame(0)), lambda: c.window("s"), lambda: c.read("s", [0]),
                 lambda: c.acquire_writer("s"), lambda: c.stats(), lambda: c.create_stream("t", 2)):
        with pytest.raises(CacheError, match="closed") as ei:
            call()
        assert ei.value.code == "E_CACHE_CLOSED"
    c.close()  # idempotent


def test_snapshot_is_immutable_after_later_writes(cache: FrameCache) -> None:
    cache.create_stream("s", 3)
    cache.append_many("s", [_frame(i) for i in range(3)])
    snap = cache.snapshot("s")
    cache.append_many("s", [_frame(i) for i in range(3, 9)])  # overwrites every slot twice
    assert [r.seq for r in snap] == [0, 1, 2] and snap.pts() == [0.0, 1.0, 2.0]
    assert isinstance(snap, Snapshot)
    # decoded tensors own their memory by default: mutating them cannot touch the cache
    snap2 = cache.latest("s", 1)
    snap2.records[0].tensors["idx"].fill_(-1)
    assert cache.latest("s", 1)[0].tensors["idx"].item() == 8


def test_dropped_before_with_trimmed_history(any_cache_factory) -> None:
    c = any_cache_factory(pts_history=4)
    c.create_stream("s", 2)
    c.append_many("s", [_frame(i) for i in range(20)])  # 18 evicted, history keeps 4..8 exactly
    snap = c.snapshot("s")
    assert snap.dropped_before == 18 and snap.dropped_exact and snap.pts() == [18.0, 19.0]
    recent = c.snapshot("s", 15.0, 19.0)
    assert recent.dropped_before == 3 and recent.dropped_exact
    old = c.snapshot("s", 2.0, 5.0)  # reaches into the collapsed part: an estimate, flagged
    assert not old.dropped_exact and abs(old.dropped_before - 4) <= 1
    st = c.stats()["streams"]["s"]
    if isinstance(c, InProcessFrameCache):
        assert st["index_bytes"] <= 8 * 8
    else:  # Redis: the evicted-pts zset keeps between pts_history and 2 * pts_history entries
        assert 4 <= st["index_frames"] <= 8 and 0 < st["index_bytes"] < 4096
    # more evictions keep the exact part bounded and the estimate flagged
    c.append_many("s", [_frame(i) for i in range(20, 60)])
    snap = c.snapshot("s")
    assert snap.dropped_before == 58 and snap.dropped_exact and snap.seqs() == [58, 59]
    recent = c.snapshot("s", 55.0, 59.0)  # evicted 55..57, all in the exact part
    assert recent.dropped_before == 3 and recent.dropped_exact
    old = c.snapshot("s", 10.0, 19.0)
    assert not old.dropped_exact and abs(old.dropped_before - 10) <= 1
    assert c.window("s", 10.0, 19.0).dropped_before == old.dropped_before
    c.close()


# --------------------------------------------------------------------------- concurrency
def test_concurrent_writer_and_readers(any_cache_factory) -> None:
    c = any_cache_factory()
    c.create_stream("live", 64)
    n_frames = 2000
    done = threading.Event()
    errors: list[BaseException] = []
    checked = [0, 0]

    def check(snap: Snapshot) -> None:
        seqs = snap.seqs()
        assert len(seqs) == len(snap) <= 64
        if not seqs:
            return
        assert seqs == list(range(snap.first_seq, snap.last_seq + 1))
        pts = snap.pts()
        assert pts == sorted(pts)
        for s, p, rec in zip(seqs, pts, snap.records):
            assert rec.seq == s and rec.pts == p == s * 0.5
            assert rec.meta == {"i": s}
            assert rec.tensors["idx"].item() == s
            assert torch.equal(rec.tensors["vision"], torch.full((2, 8), float(s), dtype=torch.bfloat16))

    def writer() -> None:
        try:
            for i in range(n_frames):
                assert c.append("live", _frame(i, i * 0.5)) == i
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    def reader(k: int) -> None:
        rng = random.Random(k)
        try:
            while not done.is_set() or checked[k] < 20:
                if rng.random() < 0.3:
                    snap = c.latest("live", rng.randint(1, 80))
                else:
                    newest = c.stream_info("live").newest_pts or 0.0
                    a = rng.uniform(max(0.0, newest - 40), newest + 1)
                    snap = c.snapshot("live", a, a + rng.uniform(0, 20))
                    if len(snap):
                        # frame s has pts s/2: frames first_seq-1, first_seq-2, ... down to ceil(2a)
                        # were requested; if any is missing from the snapshot, all of them were
                        # overwritten at the snapshot's instant and must be counted as dropped.
                        assert snap.dropped_before == max(0, snap.first_seq - math.ceil(2 * a))
                check(snap)
                checked[k] += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    assert all(n >= 20 for n in checked)
    info = c.stream_info("live")
    assert (info.total_appended, info.count, info.oldest_seq, info.newest_seq) == (n_frames, 64, n_frames - 64, n_frames - 1)
    assert info.bytes_used == c.snapshot("live").nbytes
    final = c.snapshot("live")
    check(final)
    assert final.dropped_before == n_frames - 64
    c.close()


# --------------------------------------------------------------------------- windows, light reads, writers
def _kv_frame(i: int, pts: float | None = None) -> FrameRecord:
    """A record with keys/values and their fp8 scales besides the vision token."""
    g = torch.Generator().manual_seed(i)
    return FrameRecord(
        pts=float(i) if pts is None else pts,
        tensors={
            "vision": torch.full((1, 8), float(i), dtype=torch.bfloat16),
            "k": torch.randn(2, 2, 3, 4, generator=g).to(torch.float8_e4m3fn),
            "v": torch.randn(2, 2, 3, 4, generator=g).to(torch.float8_e4m3fn),
            "k_scale": torch.rand(2, 2, generator=g),
            "v_scale": torch.rand(2, 2, generator=g),
            "prefix": torch.full((3, 8), -float(i)),
        },
        meta={"i": i},
    )


def _contents(cache: FrameCache, sid: str) -> tuple:
    """Everything observable about a stream, to show that a refused call changed nothing."""
    info = cache.stream_info(sid)
    snap = cache.snapshot(sid)
    return info.to_dict(), snap.blobs, snap.pts(), snap.seqs(), snap.dropped_before


def test_window_chunks_equal_snapshot(cache: FrameCache) -> None:
    cache.create_stream("w", 16)
    pts = [0.0, 0.5, 0.5, 1.0, 2.0, 2.0, 2.0, 3.5, 4.0, 4.0, 5.0, 6.0, 7.0, 7.5, 8.0, 8.0, 9.0, 9.5, 10.0, 11.0]
    cache.append_many("w", [_kv_frame(i, p) for i, p in enumerate(pts)])  # 4 overwritten
    for start, end, mf in [(None, None, None), (2.0, 8.0, None), (0.0, 4.0, None), (3.0, 9.0, 5),
                           (None, None, 0), (12.0, 20.0, None), (-5.0, 0.5, None)]:
        w = cache.window("w", start, end, max_frames=mf)
        snap = cache.snapshot("w", start, end, max_frames=mf)
        assert isinstance(w, FrameWindow) and len(w) == len(snap)
        assert (w.first_seq, w.last_seq, list(w.seqs())) == (snap.first_seq, snap.last_seq, snap.seqs())
        assert (list(w.pts_list), w.dropped_before, w.dropped_exact) == (snap.pts(), snap.dropped_before,
                                                                        snap.dropped_exact)
        for size in (1, 3, 100):
            for prefetch in (True, False):
                chunks = list(w.chunks(cache, size, prefetch=prefetch))
                assert all(isinstance(ch, WindowChunk) and len(ch) <= size and not ch.missing for ch in chunks)
                assert len(chunks) == -(-len(w) // size)
                assert [q for ch in chunks for q in ch.seqs] == snap.seqs()
                assert [p for ch in chunks for p in ch.pts] == snap.pts()
                assert tuple(b for ch in chunks for b in ch.blobs) == snap.blobs
    # a subset of the window, in the caller's order, and light chunks of it
    w = cache.window("w")
    pick = [w.last_seq, w.first_seq + 2, w.first_seq]
    (ch,) = w.chunks(cache, 10, seqs=pick)
    assert ch.seqs == pick and ch.blobs == cache.read("w", pick)
    assert [r.seq for r in ch.records()] == pick
    (lch,) = w.chunks(cache, 10, seqs=pick, light=True)
    assert lch.seqs == pick and all(not set(KV_TENSORS) & set(r.tensors) for r in lch.records())
    with pytest.raises(BadArgument, match="inside the window"):
        list(w.chunks(cache, 2, seqs=[w.first_seq - 1]))
    with pytest.raises(BadArgument, match="chunk size"):
        list(w.chunks(cache, 0))


def test_frames_overwritten_after_the_window_are_missing(cache: FrameCache) -> None:
    cache.create_stream("o", 6)
    cache.append_many("o", [_kv_frame(i) for i in range(6)])
    w = cache.window("o")
    before = dict(zip(w.seqs(), cache.snapshot("o").blobs))
    cache.append_many("o", [_kv_frame(i) for i in range(6, 10)])  # seqs 0..3 overwritten
    chunks = list(w.chunks(cache, 4))
    assert [ch.missing for ch in chunks] == [[0, 1, 2, 3], []]
    assert [ch.seqs for ch in chunks] == [[], [4, 5]]
    assert chunks[1].blobs == [before[4], before[5]] and chunks[1].pts == [4.0, 5.0]
    # read() itself: None for overwritten and for not-yet-written seqs, never another frame
    got = cache.read("o", [3, 4, 9, 10, 1000])
    assert got[0] is None and got[3] is None and got[4] is None
    assert record_seq(got[1]) == 4 and record_seq(got[2]) == 9
    assert cache.read("o", []) == []
    with pytest.raises(BadArgument, match="seq"):
        cache.read("o", [-1])
    with pytest.raises(StreamNotFound):
        cache.read("nope", [0])


def test_light_reads_lack_keys_values(cache: FrameCache) -> None:
    cache.create_stream("l", 4)
    recs = [_kv_frame(i) for i in range(6)]
    cache.append_many("l", recs)
    seqs = [2, 3, 4, 5]
    full = cache.read("l", seqs)
    light = cache.read("l", seqs, light=True)
    for q, fb, lb in zip(seqs, full, light):
        f, lr = decode_record(fb), decode_record(lb)
        assert f.seq == lr.seq == q and f.pts == lr.pts == float(q)
        assert set(KV_TENSORS) <= set(f.tensors)
        assert not set(KV_TENSORS) & set(lr.tensors) and list(lr.tensors) == ["vision", "prefix"]
        assert lr.meta == {"i": q, "light": True} and f.meta == {"i": q}
        for name in ("vision", "prefix"):
            assert torch.equal(_bits(lr.tensors[name]), _bits(recs[q].tensors[name]))
        assert lb == encode_record(light_record(_with_seq(recs[q], q))) and len(lb) < len(fb)
    assert cache.read("l", [0, 1], light=True) == [None, None]  # overwritten
    tokens = cache.read("l", seqs, tokens=True)
    info = cache.stream_info("l")
    assert info.light_bytes == sum(map(len, light)) + sum(map(len, tokens))   # light and token copies
    assert info.bytes_used == sum(len(b) for b in full)


def test_token_reads_hold_each_frames_token_pts_and_meta_only(cache: FrameCache) -> None:
    """What every question reads of every frame of its window: the vision token, pts and meta (the
    keys/values form), not the fused prefix rows of the light copy (46x the token at 8B shapes)."""
    cache.create_stream("t", 4)
    recs = [dataclasses.replace(_kv_frame(i), tensors={**_kv_frame(i).tensors,
                                                       "token": torch.full((1, 8), i + 0.5)}) for i in range(6)]
    cache.append_many("t", recs)
    seqs = [2, 3, 4, 5]
    toks, light = cache.read("t", seqs, tokens=True), cache.read("t", seqs, light=True)
    for q, tb, lb in zip(seqs, toks, light):
        t = decode_record(tb)
        assert (t.seq, t.pts, t.meta) == (q, float(q), {"i": q, "light": True}) and list(t.tensors) == ["token"]
        assert torch.equal(t.tensors["token"], recs[q].tensors["token"])
        assert tb == encode_record(token_record(_with_seq(recs[q], q))) and len(tb) < len(lb)
    assert cache.read("t", [0, 1, 9], tokens=True) == [None, None, None]   # overwritten, not yet written
    (ch,) = cache.window("t").chunks(cache, 8, tokens=True)
    assert ch.seqs == seqs and ch.blobs == toks
    # a rewrite (a retention demotion) rewrites the token copy too: its meta says the new form
    cache.replace_records("t", [dataclasses.replace(_with_seq(recs[3], 3), meta={"i": 3, "kv_policy": "none"})])
    assert decode_record(cache.read("t", [3], tokens=True)[0]).meta == {"i": 3, "kv_policy": "none", "light": True}
    with pytest.raises(BadArgument, match="both"):
        cache.read("t", seqs, light=True, tokens=True)


def test_acquire_writer_fences_old_writers(cache: FrameCache) -> None:
    cache.create_stream("f", 8)
    assert cache.stream_info("f").writer == 0
    t1 = cache.acquire_writer("f")
    assert cache.append("f", _frame(0), writer=t1) == 0
    t2 = cache.acquire_writer("f")
    assert t2 > t1 and cache.stream_info("f").writer == t2
    state = _contents(cache, "f")
    for call in (lambda: cache.append("f", _frame(1), writer=t1),
                 lambda: cache.append_many("f", [_frame(1), _frame(2)], writer=t1),
                 lambda: cache.append_many("f", [_frame(0)], writer=t1, seq=0)):  # even a retry
        with pytest.raises(StaleWriter) as ei:
            call()
        assert ei.value.code == "E_STALE_WRITER" and ei.value.http_status == 409
        msg = ei.value.message
        assert msg.startswith(f"expected writer token {t2} for stream 'f'") and f"got {t1}" in msg
    assert _contents(cache, "f") == state  # nothing stored, nothing evicted
    assert cache.append_many("f", [_frame(1), _frame(2)], writer=t2) == [1, 2]
    assert cache.append("f", _frame(3)) == 3  # no token: not fenced
    with pytest.raises(BadArgument, match="writer"):
        cache.append("f", _frame(4), writer="me")  # type: ignore[arg-type]
    with pytest.raises(StreamNotFound, match="'nope'"):
        cache.acquire_writer("nope")


def test_idempotent_append_with_seq(cache: FrameCache) -> None:
    cache.create_stream("i", 4)
    recs = [_frame(i) for i in range(8)]
    assert cache.append_many("i", recs[0:3], seq=0) == [0, 1, 2]
    blobs = cache.snapshot("i").blobs
    assert cache.append_many("i", recs[0:3], seq=0) == [0, 1, 2]  # a retry: nothing stored twice
    assert cache.stream_info("i").total_appended == 3 and cache.snapshot("i").blobs == blobs
    assert cache.append("i", recs[2], seq=2) == 2
    assert cache.append_many("i", recs[1:5], seq=1) == [1, 2, 3, 4]  # 1, 2 known; 3, 4 new
    info = cache.stream_info("i")
    assert (info.total_appended, info.count, info.oldest_seq) == (5, 4, 1)
    snap = cache.snapshot("i")
    assert snap.seqs() == [1, 2, 3, 4] and [r.meta["i"] for r in snap] == [1, 2, 3, 4]
    state = _contents(cache, "i")
    with pytest.raises(BadArgument, match=r"expected seq <= 5 \(the next seq of stream 'i'\), got 7"):
        cache.append_many("i", recs[7:8], seq=7)  # a gap: 5, 6 would be missing
    with pytest.raises(BadArgument, match="seq"):
        cache.append("i", recs[5], seq=-1)
    assert _contents(cache, "i") == state
    # retrying records long overwritten is still a no-op
    cache.append_many("i", recs[5:8], seq=5)
    assert cache.append_many("i", recs[0:8], seq=0) == list(range(8))
    assert cache.stream_info("i").total_appended == 8 and cache.snapshot("i").seqs() == [4, 5, 6, 7]
    assert cache.append("i", _frame(8), seq=8) == 8 and cache.append("i", _frame(8), seq=8) == 8


def test_on_full_error_refuses_with_nothing_stored(cache: FrameCache) -> None:
    info = cache.create_stream("e", 3, on_full="error")
    assert info.on_full == "error" and cache.create_stream("e", 3, on_full="error").on_full == "error"
    with pytest.raises(BadArgument, match="on_full='error'"):
        cache.create_stream("e", 3)  # exists with another on_full
    with pytest.raises(BadArgument, match="on_full"):
        cache.create_stream("x", 3, on_full="drop")
    assert cache.append_many("e", [_frame(0), _frame(1)]) == [0, 1]
    state = _contents(cache, "e")
    with pytest.raises(CapacityExceeded) as ei:
        cache.append_many("e", [_frame(2), _frame(3)])
    assert ei.value.code == "E_CAPACITY" and ei.value.http_status == 507
    assert ei.value.message == ("expected at most 3 frames in stream 'e' (its capacity; on_full='error'), "
                                "got 2 stored + 2 new")
    assert _contents(cache, "e") == state
    assert cache.append("e", _frame(2)) == 2
    with pytest.raises(CapacityExceeded):
        cache.append("e", _frame(3))
    assert cache.append_many("e", [_frame(1), _frame(2)], seq=1) == [1, 2]  # a retry is not "more"
    info = cache.stream_info("e")
    assert (info.count, info.total_appended, info.evicted) == (3, 3, 0)
    assert cache.stats()["streams"]["e"]["on_full"] == "error"


def test_counters_in_stats_and_stream_info(cache: FrameCache) -> None:
    cache.create_stream("c", 5, meta={"src": "cam"})
    cache.append_many("c", [_kv_frame(i) for i in range(3)])
    cache.append_many("c", [_kv_frame(i) for i in range(3, 9)])  # 4 overwritten
    seqs = list(range(4, 9))
    full, light = cache.read("c", seqs), cache.read("c", seqs, light=True)
    tokens = cache.read("c", seqs, tokens=True)
    info = cache.stream_info("c")
    assert (info.capacity, info.count, info.total_appended, info.evicted) == (5, 5, 9, 4)
    assert (info.oldest_seq, info.newest_seq, info.oldest_pts, info.newest_pts) == (4, 8, 4.0, 8.0)
    assert info.bytes_used == sum(map(len, full))
    assert info.light_bytes == sum(map(len, light)) + sum(map(len, tokens))
    assert 0 < info.light_bytes < info.bytes_used
    d = info.to_dict()
    assert d["light_bytes"] == info.light_bytes and d["writer"] == 0 and d["on_full"] == "overwrite"
    assert d["meta"] == {"src": "cam"} and json.loads(json.dumps(d)) == d
    st = cache.stats()
    s = st["streams"]["c"]
    assert (s["frames"], s["capacity"], s["bytes"], s["light_bytes"], s["evicted"], s["total_appended"]) == \
        (5, 5, info.bytes_used, info.light_bytes, 4, 9)
    assert st["total_frames"] == 5 and st["total_bytes"] == info.bytes_used
    json.dumps(st)
    cache.create_stream("d", 2)
    assert cache.stream_info("d").to_dict() == {**cache.stream_info("d").to_dict(), "count": 0, "light_bytes": 0,
                                                "bytes_used": 0, "oldest_pts": None, "oldest_seq": -1}


def test_spill_files_have_no_name(tmp_path) -> None:
    """A spilled ring is an unlinked file: nothing is left in the folder, even if the process is killed."""
    import torch
    from frame_cache import FrameRecord, InProcessFrameCache
    c = InProcessFrameCache(spill_dir=tmp_path)
    c.create_stream("s", 4)
    c.append_many("s", [FrameRecord(pts=float(i), tensors={"token": torch.full((3,), float(i))}) for i in range(6)])
    assert list(tmp_path.iterdir()) == []
    assert [r.tensors["token"][0].item() for r in c.snapshot("s")] == [2.0, 3.0, 4.0, 5.0]
    c.close()
