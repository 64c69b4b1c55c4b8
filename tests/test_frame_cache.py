"""Tests for frame_cache: record layout, ring semantics, accounting, concurrency."""
from __future__ import annotations

import json
import math
import random
import struct
import threading

import pytest
import torch

from frame_cache import (
    RECORD_VERSION,
    SUPPORTED_DTYPES,
    CacheBudgetExceeded,
    FrameCache,
    FrameRecord,
    InProcessFrameCache,
    RecordFormatError,
    Snapshot,
    StreamExists,
    StreamNotFound,
    decode_record,
    encode_record,
    record_header,
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
def cache():
    c = InProcessFrameCache()
    yield c
    c.close()


def test_interface_and_stream_key(cache: InProcessFrameCache) -> None:
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


def test_ring_overwrite_and_windows(cache: InProcessFrameCache) -> None:
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


def test_equal_pts_and_window_bisect() -> None:
    c = InProcessFrameCache()
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


def test_pts_must_be_non_decreasing(cache: InProcessFrameCache) -> None:
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


def test_create_stream_rules(cache: InProcessFrameCache) -> None:
    cache.create_stream("s", 4, meta={"a": 1})
    assert cache.create_stream("s", 4).meta == {"a": 1}
    assert cache.create_stream("s", 4, meta={"a": 1}).capacity == 4
    with pytest.raises(BadArgument, match=r"expected capacity 4 for existing stream 's', got 8"):
        cache.create_stream("s", 8)
    with pytest.raises(BadArgument, match="meta"):
        cache.create_stream("s", 4, meta={"a": 2})
    with pytest.raises(StreamExists, match="'s'"):
        cache.create_stream("s", 4, exist_ok=False)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(BadArgument, match="capacity"):
            cache.create_stream("t", bad)  # type: ignore[arg-type]
    with pytest.raises(BadArgument, match="JSON"):
        cache.create_stream("t", 2, meta={"x": {1, 2}})
    cache.create_stream("a", 1)
    assert cache.streams() == ["a", "s"]


# --------------------------------------------------------------------------- accounting
def test_memory_accounting_exact(cache: InProcessFrameCache) -> None:
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
    assert st["total_bytes"] == sum(after) + t_bytes == cache._total_bytes
    json.dumps(st)  # JSON-serialisable

    cache.delete_stream("s")
    st = cache.stats()
    assert list(st["streams"]) == ["t"] and st["total_bytes"] == t_bytes == cache._total_bytes
    cache.delete_stream("t")
    assert cache.stats()["total_bytes"] == 0 == cache._total_bytes


def test_budget_errors_do_not_lose_frames() -> None:
    one = len(encode_record(_with_seq(_frame(0), 0)))
    big = FrameRecord(pts=100.0, tensors={"x": torch.zeros(4096)})

    c = InProcessFrameCache(max_bytes_per_stream=one * 4)
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
    c = InProcessFrameCache(max_bytes_per_stream=one * 4)
    c.create_stream("s", 4)
    c.append_many("s", [_frame(i) for i in range(10)])
    assert c.snapshot("s").seqs() == [6, 7, 8, 9]
    c.close()

    # global budget across streams
    c = InProcessFrameCache(max_bytes_total=one * 5)
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


def test_unknown_stream_errors(cache: InProcessFrameCache) -> None:
    calls = [
        lambda: cache.append("nope", _frame(0)),
        lambda: cache.append_many("nope", [_frame(0)]),
        lambda: cache.snapshot("nope"),
        lambda: cache.latest("nope", 1),
        lambda: cache.stream_info("nope"),
        lambda: cache.delete_stream("nope"),
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


def test_closed_cache_rejects_calls() -> None:
    c = InProcessFrameCache()
    with c:
        c.create_stream("s", 2)
    with pytest.raises(CacheError, match="closed"):
        c.streams()
    with pytest.raises(CacheError, match="closed"):
        c.snapshot("s")
    c.close()  # idempotent


def test_snapshot_is_immutable_after_later_writes(cache: InProcessFrameCache) -> None:
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


def test_dropped_before_with_trimmed_history() -> None:
    c = InProcessFrameCache(pts_history=4)
    c.create_stream("s", 2)
    c.append_many("s", [_frame(i) for i in range(20)])  # 18 evicted, history keeps 4..8 exactly
    snap = c.snapshot("s")
    assert snap.dropped_before == 18 and snap.dropped_exact and snap.pts() == [18.0, 19.0]
    recent = c.snapshot("s", 15.0, 19.0)
    assert recent.dropped_before == 3 and recent.dropped_exact
    old = c.snapshot("s", 2.0, 5.0)  # reaches into the collapsed part: an estimate, flagged
    assert not old.dropped_exact and abs(old.dropped_before - 4) <= 1
    assert c.stats()["streams"]["s"]["index_bytes"] <= 8 * 8
    c.close()


# --------------------------------------------------------------------------- concurrency
def test_concurrent_writer_and_readers() -> None:
    c = InProcessFrameCache()
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
