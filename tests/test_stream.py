"""Tests for stream.decode (sampling, robustness, errors) and stream.preprocess.

All media is generated inside ``tmp_path`` with PyAV / Pillow; nothing binary
is committed.  Video frames carry their own index as a colour code in a flat
top half (``index_of`` reads it back), so a test can check *which* source
frame was sampled, not only its timestamp.
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lmcore.errors import BadArgument, InputNotFound, LmsError, NoFrames, NotAVideo, NoVideoStream
from stream.decode import DecodeReport, Frame, VideoSource, _TimeSampler, open_video
from stream.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    NotAnImage,
    expand2square,
    load_image,
    preprocess_image,
    preprocess_video_frames,
)

W, H = 64, 64  # small frames keep encoding fast; even sizes for yuv420p
FPS = 25
N_FRAMES = 130  # 5.2 s at 25 fps


# ---------------------------------------------------------------------------
# media helpers
# ---------------------------------------------------------------------------


def colour_of(i: int) -> tuple[int, int, int]:
    """Colour that encodes frame index ``i`` (0 <= i < 256), robust to lossy coding."""
    return (16 * (i % 16) + 8, 128, 16 * (i // 16) + 8)


def index_of(rgb: np.ndarray) -> int:
    """Read back the index written by `make_frame` from the flat top half."""
    r, _, b = rgb[4 : H // 2 - 4, 8:-8].reshape(-1, 3).mean(axis=0)
    return int(round((r - 8) / 16)) + 16 * int(round((b - 8) / 16))


def make_frame(i: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame ``i``: colour code in the top half; noise in the bottom half when ``rng`` is given
    (noise makes packets big, so corrupted bytes land in video data)."""
    a = np.empty((H, W, 3), np.uint8)
    a[...] = colour_of(i)
    if rng is not None:
        a[H // 2 :] = rng.integers(0, 256, (H - H // 2, W, 3), dtype=np.uint8)
    return a


def write_video(
    path: Path,
    times: list[float] | None = None,
    *,
    codec: str = "libx264",
    fmt: str | None = None,
    time_base: Fraction = Fraction(1, FPS),
    gop: int | None = None,
    noise: bool = False,
    options: dict | None = None,
) -> list[float]:
    """Encode frames whose index is colour coded, at presentation ``times`` (seconds).

    Default: 130 frames at 25 fps (5.2 s).  Returns the times written.
    """
    times = [i / FPS for i in range(N_FRAMES)] if times is None else times
    rng = np.random.default_rng(0) if noise else None
    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        s = c.add_stream(codec, rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.time_base = time_base
        s.codec_context.time_base = time_base
        s.codec_context.bit_rate = 4_000_000  # generous: keeps the colour code exact for every codec
        if gop:
            s.codec_context.gop_size = gop
        for i, t in enumerate(times):
            f = av.VideoFrame.from_ndarray(make_frame(i, rng), format="rgb24")
            f.pts, f.time_base = round(t / time_base), time_base
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return times


def write_audio(path: Path, codec: str = "pcm_s16le", fmt: str | None = None) -> None:
    """One second of a 440 Hz tone, audio stream only."""
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=16000)
        s.layout = "mono"
        n = 0
        for _ in range(16):
            samples = (np.sin(2 * np.pi * 440 * (n + np.arange(1024)) / 16000) * 8000).astype(np.int16)
            f = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
            f.sample_rate, f.pts = 16000, n
            n += 1024
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def expected_pick(times: list[float], fps: float, start: float = 0.0, end: float | None = None) -> list[int]:
    """Reference sampler: for t_k = start + k/fps, the first frame with time >= t_k (no duplicates)."""
    picked: list[int] = []
    k = 0
    for i, t in enumerate(times):  # times are sorted
        if t < start - 1e-9 or (end is not None and t >= end - 1e-9):
            continue
        if t >= start + k / fps - 1e-9:
            picked.append(i)
            k = math.floor((t - start) * fps + 1e-9) + 1
    return picked


def has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def mp4_25fps(tmp_path_factory) -> Path:
    """H.264 MP4, 25 fps, 5.2 s, keyframe every 10 frames (so seeking lands mid-file)."""
    path = tmp_path_factory.mktemp("media") / "cfr25.mp4"
    write_video(path, gop=10)
    return path


# ---------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------


def test_1fps_samples_by_presentation_time(mp4_25fps):
    src = VideoSource(mp4_25fps)  # fps=1.0 by default
    frames = list(src)
    assert [f.pts for f in frames] == pytest.approx([0, 1, 2, 3, 4, 5], abs=1e-6)
    assert [f.index for f in frames] == list(range(6))
    assert [index_of(f.rgb) for f in frames] == [0, 25, 50, 75, 100, 125]
    for f in frames:
        assert isinstance(f, Frame) and f.rgb.shape == (H, W, 3) and f.rgb.dtype == np.uint8
    r = src.report
    assert isinstance(r, DecodeReport)
    assert (r.frames_decoded, r.frames_sampled, r.gaps, r.errors, r.is_image) == (130, 6, [], [], False)
    assert (r.codec_name, r.width, r.height) == ("h264", W, H)
    assert "mp4" in r.format_name
    assert r.source_fps == pytest.approx(25.0)
    assert r.duration_s == pytest.approx(5.2, abs=0.05)
    assert "6/130 frames sampled" in r.summary() and "\n" not in r.summary()
    assert src.info.codec_name == "h264"


def test_every_frame_and_reiteration(mp4_25fps):
    src = open_video(mp4_25fps, fps=None)
    first = [f.pts for f in src]
    assert len(first) == N_FRAMES
    assert np.allclose(first, np.arange(N_FRAMES) / FPS, atol=1e-6)
    second = list(VideoSource(mp4_25fps, fps=0))  # 0 also means every frame
    assert len(second) == N_FRAMES
    assert [f.pts for f in src] == first  # a source can be iterated again


def test_fps2_with_start_end_window(mp4_25fps):
    frames = list(VideoSource(mp4_25fps, fps=2, start=1.0, end=3.0))
    # targets 1.0, 1.5, 2.0, 2.5 (end is exclusive); at 25 fps there is no frame at 1.5 s,
    # so the first frame at or after it (1.52 s) is taken
    assert [f.pts for f in frames] == pytest.approx([1.0, 1.52, 2.0, 2.52], abs=1e-6)
    assert [index_of(f.rgb) for f in frames] == [25, 38, 50, 63]

    # a start between frames and between keyframes: seek backwards, skip pre-roll frames
    src = VideoSource(mp4_25fps, fps=2, start=1.3, end=3.0)
    frames = list(src)
    assert [f.pts for f in frames] == pytest.approx([1.32, 1.8, 2.32, 2.8], abs=1e-6)
    assert [index_of(f.rgb) for f in frames] == [33, 45, 58, 70]
    assert src.report.frames_decoded < N_FRAMES  # it seeked instead of decoding from 0
    assert src.report.gaps == []


def test_variable_frame_rate_sampled_by_presentation_time(tmp_path):
    # 30 frames at 60 fps, then one frame every 0.37 s: counter-based sampling
    # (index / nominal fps) would pick entirely different frames
    times = [i / 60 for i in range(30)] + [0.5 + 0.37 * i for i in range(1, 15)]
    times = [round(t, 3) for t in times]
    path = tmp_path / "vfr.mkv"
    write_video(path, times, codec="mpeg4", fmt="matroska", time_base=Fraction(1, 1000))

    src = VideoSource(path, fps=1.0)
    frames = list(src)
    want = expected_pick(times, 1.0)
    assert [index_of(f.rgb) for f in frames] == want
    assert [f.pts for f in frames] == pytest.approx([times[i] for i in want], abs=1e-6)
    assert [f.pts for f in frames] == pytest.approx([0.0, 1.24, 2.35, 3.09, 4.2, 5.31], abs=1e-6)
    assert src.report.gaps == []  # irregular timing is not damage

    frames = list(VideoSource(path, fps=4.0, start=0.1))
    assert [index_of(f.rgb) for f in frames] == expected_pick(times, 4.0, start=0.1)


#: a VFR clip: 30 frames at 60 fps, then one frame every 0.37 s up to 5.68 s
VFR_TIMES = [round(t, 3) for t in [i / 60 for i in range(30)] + [0.5 + 0.37 * i for i in range(1, 15)]]


def test_vfr_mp4_whose_header_ends_before_its_frames_gets_the_frames_duration(tmp_path):
    """FFmpeg's own MP4 muxer gives a VFR H.264 stream (B-frames) the span of its decode times as
    its duration: 5.01 s, while its last frame is at 5.68 s.  The duration a user sees is the
    frames' (the last frame's time plus its own 0.37 s), said in an error line; `VideoInfo` keeps
    the header's, all that is known before decoding, and so does a read that stops before it."""
    path = tmp_path / "vfr.mp4"
    write_video(path, VFR_TIMES, codec="libx264", fmt="mp4", time_base=Fraction(1, 1000))
    src = VideoSource(path, fps=1.0)
    declared = src.info.duration_s
    assert declared is not None and declared < VFR_TIMES[-1] - 0.5, f"the muxer wrote a consistent header: {declared}"
    frames = list(src)
    assert [f.pts for f in frames] == pytest.approx([VFR_TIMES[i] for i in expected_pick(VFR_TIMES, 1.0)], abs=1e-6)
    r = src.report
    assert r.duration_s == pytest.approx(VFR_TIMES[-1] + 0.37, abs=1e-3), r.summary()
    assert r.gaps == [] and r.errors == [
        f"frame at 5.31 s lies past the duration the file declares, {declared:.2f} s: "
        "the header is wrong, the duration follows the frames"
    ]
    assert " 6.0 s;" in r.summary()
    # a window that ends before the header's end finds nothing better; one read after a seek does
    src = VideoSource(path, fps=1.0, end=3.0)
    assert len(list(src)) == 3 and src.report.duration_s == declared and src.report.errors == []
    src = VideoSource(path, fps=1.0, start=5.0)
    assert [f.pts for f in src] == pytest.approx([5.31]) and src.report.duration_s == pytest.approx(6.05, abs=1e-3)


def test_matroska_written_live_declares_no_duration_and_gets_the_frames(tmp_path):
    """A live-written Matroska (a browser's recording is one, VFR too) has no duration in its header;
    once the whole file is read the frames give it (their span: the last at 5.68 s, shown 0.04 s)."""
    path = tmp_path / "live.mkv"
    write_video(path, VFR_TIMES, codec="mpeg4", fmt="matroska", time_base=Fraction(1, 1000), options={"live": "1"})
    src = VideoSource(path, fps=1.0, end=2.0)
    assert src.info.duration_s is None
    assert len(list(src)) == 2 and src.report.duration_s is None  # stopped before the end: still unknown
    src = VideoSource(path, fps=1.0)
    assert len(list(src)) == 6
    assert src.report.duration_s == pytest.approx(5.72, abs=1e-6)
    assert src.report.errors == [] and src.report.gaps == []


def test_vfr_sampler_consumes_targets_without_duplicates():
    s = _TimeSampler(fps=1.0, start=0.0, end=None)
    kept = [t for t in [0.0, 0.5, 0.999_999_9, 1.2, 4.7, 4.9, 5.0, 5.01] if s.wants(t)]
    assert kept == [0.0, 0.999_999_9, 4.7, 5.0]  # 4.7 serves targets 2, 3 and 4 once
    s = _TimeSampler(fps=None, start=1.0, end=2.0)
    assert [t for t in [0.9, 1.0, 1.5, 1.99] if s.wants(t)] == [1.0, 1.5, 1.99]
    assert s.past_end(2.0) and not s.past_end(1.999)


@pytest.mark.skipif(not has_encoder("libvpx"), reason="no VP8 encoder in this PyAV build")
def test_webm_vp8(tmp_path):
    path = tmp_path / "clip.webm"
    write_video(path, codec="libvpx", fmt="webm", time_base=Fraction(1, 1000))
    src = VideoSource(path, fps=1.0)
    frames = list(src)
    assert [f.pts for f in frames] == pytest.approx([0, 1, 2, 3, 4, 5], abs=1e-6)
    assert [index_of(f.rgb) for f in frames] == [0, 25, 50, 75, 100, 125]
    assert src.report.codec_name == "vp8" and src.report.gaps == []


def test_png_image_is_one_frame(tmp_path):
    img = np.random.default_rng(1).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    path = tmp_path / "still.png"
    Image.fromarray(img).save(path)
    src = VideoSource(path, fps=3.0)
    frames = list(src)
    assert len(frames) == 1
    assert (frames[0].index, frames[0].pts) == (0, 0.0)
    assert np.array_equal(frames[0].rgb, img)
    r = src.report
    assert r.is_image and src.info.is_image
    # one frame at 0 s and no length (fps is ignored): a duration of 0.0, declared and found, never None
    assert (r.width, r.height, r.frames_sampled, r.duration_s, r.source_fps) == (20, 10, 1, 0.0, None)
    assert src.info.duration_s == 0.0
    assert "image 20x10" in r.summary()
    # a window that holds 0 s keeps the frame; one that starts later cannot hold it, and is refused
    assert len(list(VideoSource(path, start=0.0, end=20.0))) == 1
    with pytest.raises(BadArgument, match="expected a window that starts at 0 s for a still image.*got one from 10 s"):
        VideoSource(path, start=10.0, end=20.0)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_renamed_mp4_is_a_still_with_duration_zero(tmp_path, fmt):
    """A user's photo renamed .mp4: FFmpeg reads what the bytes are, not the name; it ingests as one
    frame, and its duration is 0.0 (was None, shown as null in the job record)."""
    path = tmp_path / "holiday.mp4"
    Image.fromarray(make_frame(7)).save(path, format=fmt)
    src = VideoSource(path, fps=2.0)
    frames = list(src)
    assert src.info.is_image and src.info.format_name in ("png_pipe", "jpeg_pipe")
    assert [(f.index, f.pts, index_of(f.rgb)) for f in frames] == [(0, 0.0, 7)]
    assert (src.info.duration_s, src.report.duration_s) == (0.0, 0.0)
    assert src.report.errors == [] and src.report.gaps == []


def test_decoding_streams_lazily(mp4_25fps):
    src = VideoSource(mp4_25fps, fps=None)
    it = iter(src)
    first = next(it)
    assert first.pts == 0.0 and src.report.frames_sampled == 1  # yielded before the file is read
    assert src.report.frames_decoded < N_FRAMES
    it.close()  # abandoning the iteration closes the container and raises nothing
    with VideoSource(mp4_25fps) as again:
        assert len(list(again)) == 6


def test_progress_bar_only_for_long_videos(tmp_path, capsys):
    path = tmp_path / "long.mp4"
    write_video(path, [float(i) for i in range(70)], time_base=Fraction(1, 1))  # 70 s at 1 fps
    assert len(list(VideoSource(path, fps=0.5, progress=True))) == 35
    err = capsys.readouterr().err
    assert "decoding video" in err and "100%" in err
    # stderr is no terminal here: plain lines at each tenth, no carriage returns (a bar's, in a log)
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == 10, lines
    total = VideoSource(path).info.duration_s                 # as the container says: 69 s
    assert lines[0].startswith(f"decoding video:  10% ({0.1 * total:.0f}/{total:.0f} s of video, ") \
        and lines[-1].startswith(f"decoding video: 100% ({total:.0f}/{total:.0f} s of video, "), lines
    list(VideoSource(path, fps=1, end=30, progress=True))  # a 30 s window: no bar
    list(VideoSource(path, fps=1, progress=False))
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def test_missing_file_raises_input_not_found(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(InputNotFound) as e:
        VideoSource(path)
    assert str(path) in e.value.message and "expected an existing" in e.value.message
    assert str(e.value).startswith("error[E_INPUT_NOT_FOUND]: ")


@pytest.mark.parametrize("content", [b"hello, this is not a video\n" * 20, b""], ids=["text", "empty"])
def test_text_file_raises_not_a_video(tmp_path, content):
    path = tmp_path / "notes.mp4"
    path.write_bytes(content)
    with pytest.raises(NotAVideo) as e:
        VideoSource(path)
    msg = e.value.message
    assert msg.startswith(f"expected a video or image file that FFmpeg can read, got {path} (")
    assert "Invalid data" in msg and "\n" not in msg


def test_directory_raises_not_a_video(tmp_path):
    with pytest.raises(NotAVideo, match="a directory"):
        VideoSource(tmp_path)


@pytest.mark.parametrize("name,codec,fmt", [("tone.wav", "pcm_s16le", None), ("tone.m4a", "aac", "mp4")])
def test_audio_only_raises_no_video_stream(tmp_path, name, codec, fmt):
    path = tmp_path / name
    write_audio(path, codec, fmt)
    with pytest.raises(NoVideoStream) as e:
        VideoSource(path)
    msg = e.value.message
    assert msg.startswith(f"expected a video stream in {path}, got none (streams found: #0 audio/")
    assert codec.split("_")[0] in msg


def test_bad_arguments(mp4_25fps):
    with pytest.raises(BadArgument, match=r"expected fps .* got -1"):
        VideoSource(mp4_25fps, fps=-1)
    with pytest.raises(BadArgument, match=r"expected end > start, got start=3 s and end=2 s"):
        VideoSource(mp4_25fps, start=3, end=2)
    with pytest.raises(BadArgument, match=r"expected start .* got nan"):
        VideoSource(mp4_25fps, start=float("nan"))
    with pytest.raises(BadArgument, match="got int"):
        VideoSource(123)


def test_start_past_the_end_raises_no_frames(mp4_25fps):
    with pytest.raises(NoFrames) as e:
        list(VideoSource(mp4_25fps, start=9.0))
    msg = e.value.message
    assert f"expected at least one decodable video frame in {mp4_25fps} between 9 s and the end, got 0" in msg
    assert "past the duration 5.20 s" in msg


def _find_box(data: bytes, name: bytes) -> int:
    at = data.find(name)
    assert at >= 4, f"no {name!r} box"
    return at - 4  # box starts with its 4-byte size


def write_garbage_mp4(path: Path) -> Path:
    """An MP4 whose header opens (moov first, faststart) but whose media data is all garbage."""
    write_video(path, options={"movflags": "faststart"})
    data = bytearray(path.read_bytes())
    payload = _find_box(bytes(data), b"mdat") + 8
    data[payload:] = np.random.default_rng(2).integers(0, 256, len(data) - payload, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def test_garbage_video_data_raises_no_frames(tmp_path):
    path = write_garbage_mp4(tmp_path / "garbage.mp4")

    src = VideoSource(path)  # opening works: the header is intact
    with pytest.raises(NoFrames) as e:
        list(src)
    msg = e.value.message
    assert msg.startswith(f"expected at least one decodable video frame in {path}, got 0 (")
    assert "packets failed" in msg
    assert src.report.packets_failed > 0 and src.report.frames_sampled == 0


def test_header_only_file_raises_no_frames(tmp_path):
    path = tmp_path / "header_only.mkv"
    write_video(path, codec="mpeg4", fmt="matroska")
    data = path.read_bytes()
    path.write_bytes(data[: data.find(bytes.fromhex("1F43B675"))])  # cut at the first Cluster
    with pytest.raises(NoFrames) as e:
        list(VideoSource(path))
    assert e.value.message.startswith(f"expected at least one decodable video frame in {path}, got 0 (")


def test_errors_are_lms_errors_with_codes(tmp_path):
    with pytest.raises(LmsError) as e:
        VideoSource(tmp_path / "missing.webm")
    assert e.value.to_dict()["code"] == "E_INPUT_NOT_FOUND"


# ---------------------------------------------------------------------------
# damaged files
# ---------------------------------------------------------------------------


def _damage(path: Path, frac: float = 0.5, span: float = 0.08) -> tuple[int, int]:
    """Overwrite ``span`` of the file at ``frac`` with random bytes; returns the byte range."""
    data = bytearray(path.read_bytes())
    a, n = int(len(data) * frac), int(len(data) * span)
    data[a : a + n] = np.random.default_rng(3).integers(0, 256, n, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return a, a + n


def _packet_times_in(path: Path, lo: int, hi: int) -> list[float]:
    """Presentation times of the video packets stored (at least partly) in bytes [lo, hi)."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        origin = v.start_time or 0
        return [
            float((p.pts - origin) * v.time_base)
            for p in c.demux(v)
            if p.pts is not None and p.pos is not None and p.pos < hi and p.pos + p.size > lo
        ]


@pytest.mark.parametrize(
    "fmt,codec,ext",
    [
        ("mp4", "libx264", "mp4"),  # damaged packets fail to decode
        ("matroska", "mpeg4", "mkv"),  # the demuxer silently resyncs, skipping bytes
        ("mpegts", "libx264", "ts"),  # lost TS packets: continuity errors, missing frames
    ],
)
def test_corruption_in_the_middle_is_survived_and_reported(tmp_path, fmt, codec, ext):
    path = tmp_path / f"damaged.{ext}"
    write_video(path, codec=codec, fmt=fmt, gop=25, noise=True)
    clean = path.with_name("clean." + ext)
    clean.write_bytes(path.read_bytes())
    lo, hi = _damage(path)
    hit = _packet_times_in(clean, lo, hi)
    assert hit, "the garbage must land in video packets"
    damaged = (min(hit), max(hit))

    src = VideoSource(path, fps=None)
    frames = list(src)
    got = [f.pts for f in frames]
    gaps = src.report.gaps
    assert gaps, src.report.summary()
    # frames before and after the damage are still delivered, in order, with the right content
    assert any(t < damaged[0] - 0.2 for t in got) and any(t > damaged[1] + 0.2 for t in got)
    assert got == sorted(got)
    assert [index_of(f.rgb) for f in frames if not (damaged[0] - 0.3 < f.pts < damaged[1] + 1.1)] == [
        round(f.pts * FPS) for f in frames if not (damaged[0] - 0.3 < f.pts < damaged[1] + 1.1)
    ]
    # every frame that went missing lies in a reported gap; gaps sit at the damage (which
    # can spread up to the next keyframe, 1 s later, as frames lose their references)
    missing = sorted({i / FPS for i in range(N_FRAMES)} - {round(t * FPS) / FPS for t in got})
    assert missing
    for t in missing:
        assert any(a - 1e-6 <= t <= b + 1e-6 for a, b in gaps), (t, gaps)
    assert any(a <= damaged[0] + 0.1 and b >= damaged[1] - 0.1 for a, b in gaps) or (
        gaps[0][0] <= damaged[0] + 0.1 and gaps[-1][1] >= damaged[1] - 0.1
    ), (gaps, damaged)
    for a, b in gaps:
        assert damaged[0] - 0.5 < a and b < damaged[1] + 1.5, (gaps, damaged)
        assert not any(a + 1e-6 < t < b - 1e-6 for t in got), "no delivered frame lies inside a gap"
    assert src.report.errors and all("\n" not in e for e in src.report.errors)
    assert "gaps" in src.report.summary()
    # frames a decoder puts out of order after damage are counted, but no joined recordings are suspected
    assert not any("recordings" in e for e in src.report.errors), src.report.errors

    # the 1 fps sampler still yields a frame for every second of the clean part
    sampled = list(VideoSource(path, fps=1.0))
    assert [round(f.pts) for f in sampled if f.pts < damaged[0] - 0.5] == [
        k for k in range(6) if k < damaged[0] - 0.5
    ]
    assert any(f.pts > damaged[1] for f in sampled)


def test_truncated_file_keeps_decoded_frames_and_reports_tail(tmp_path):
    path = tmp_path / "cut.mkv"
    write_video(path, codec="mpeg4", fmt="matroska", noise=True)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    src = VideoSource(path)
    frames = list(src)
    assert [round(f.pts) for f in frames] == list(range(len(frames))) and 2 <= len(frames) <= 4
    (a, b), = src.report.gaps
    assert a == pytest.approx(frames[-1].pts, abs=1.0) and b == pytest.approx(5.2, abs=0.05)
    assert "truncated" in src.report.errors[0]
    assert src.report.duration_s == src.info.duration_s  # a lost tail: the declared duration stands


def test_a_window_inside_a_hole_in_the_timestamps_says_where_the_frames_are(tmp_path):
    """Frames at 0-9.5 s and 40-49.5 s: a window of 15-35 s has none, and the error said only "(20 frames
    decoded)"; it now names the hole."""
    path = tmp_path / "hole.mp4"
    write_video(path, [i / 2 for i in range(20)] + [40 + i / 2 for i in range(20)], time_base=Fraction(1, 10))
    with pytest.raises(NoFrames) as e:
        list(VideoSource(path, fps=1, start=15, end=35))
    assert e.value.message.endswith("the file has no frame from 9.50 s to 40.00 s)"), e.value.message
    assert [f.pts for f in VideoSource(path, fps=1, start=35, end=41)] == [40.0]


def _late_video(path: Path, late_s: float, fmt: str) -> None:
    """Audio from 0 s, video frames (colour-coded by index, at 5 fps) from `late_s` to `late_s + 4` s."""
    with av.open(str(path), "w", format=fmt) as c:
        a = c.add_stream("pcm_s16le" if fmt == "matroska" else "aac", rate=16000)
        a.layout = "mono"
        v = c.add_stream("libx264", rate=5)
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        v.time_base = v.codec_context.time_base = Fraction(1, 5)
        n = 0
        while n < 16000 * (late_s + 4):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.int16), format="s16", layout="mono")
            f.sample_rate, f.pts = 16000, n
            n += 1024
            for p in a.encode(f):
                c.mux(p)
        for i in range(20):
            f = av.VideoFrame.from_ndarray(make_frame(i), format="rgb24")
            f.pts = round(late_s * 5) + i
            for p in v.encode(f):
                c.mux(p)
        for s_ in (a, v):
            for p in s_.encode():
                c.mux(p)


@pytest.mark.parametrize("fmt, ext", [("matroska", "mkv"), ("mp4", "mp4")])
def test_a_video_that_starts_after_its_audio_keeps_the_files_timeline(tmp_path, fmt, ext):
    """Audio from 0 s, video from 10 s (a player shows the first frame at 10 s): frames were timed from the
    video's own start, 0-4 s, so a window of 12-14 s found nothing and one of 2-4 s got the frames shown at
    12-14 s. They now count from the file's start, as a player shows them."""
    path = tmp_path / f"late.{ext}"
    _late_video(path, 10.0, fmt)
    src = VideoSource(path, fps=None)
    got = [(round(f.pts, 3), index_of(f.rgb)) for f in src]
    assert got == [(round(10 + i / 5, 3), i) for i in range(20)], got
    assert src.info.duration_s == pytest.approx(14.0, abs=0.25) and not src.report.gaps, src.report
    window = [(round(f.pts, 3), index_of(f.rgb)) for f in VideoSource(path, fps=None, start=12, end=13)]
    assert window == [(round(12 + i / 5, 3), 10 + i) for i in range(5)], window


def test_recordings_joined_end_to_end_say_how_many_frames_went_back_in_time(tmp_path):
    """Two MPEG-TS recordings that each start at 0, joined byte for byte (`cat a.ts b.ts`): the second's
    frames go back in time and are skipped (time order only; the last, at the first's last time, too: it
    came out twice). That lost half the file with nothing said but a corrupt packet at the join; now the
    report counts them and says where time went back."""
    a, b = tmp_path / "a.ts", tmp_path / "b.ts"
    write_video(a, fmt="mpegts")
    write_video(b, fmt="mpegts")
    joined = tmp_path / "joined.ts"
    joined.write_bytes(a.read_bytes() + b.read_bytes())
    src = VideoSource(joined, fps=0)
    frames = list(src)
    n = len(frames)
    assert n >= N_FRAMES - 3 and all(x.pts < y.pts for x, y in zip(frames, frames[1:]))
    said = [e for e in src.report.errors if "did not move forward" in e]
    assert len(said) == 1 and said[0].startswith(f"{src.report.frames_decoded - n - src.report.frames_corrupt} "
                                                 "frame(s) skipped whose timestamps did not move forward (first "
                                                 "from "), said
    assert said[0].endswith("a file joined from recordings that each start again needs its timestamps remade "
                            "to be read whole"), said
    assert src.report.frames_decoded - n >= N_FRAMES - 3, src.report


class _DemuxFailsAfter:
    """Wraps an open container so that demuxing raises after ``n`` packets (an I/O error mid-file)."""

    def __init__(self, real, n: int):
        self._real, self._n = real, n

    def __getattr__(self, name):
        return getattr(self._real, name)

    def demux(self, *streams):
        for i, packet in enumerate(self._real.demux(*streams)):
            if i == self._n:
                raise av.error.InvalidDataError(-1094995529, "Invalid data found when processing input")
            yield packet


def test_demuxer_error_mid_file_keeps_decoded_frames(mp4_25fps):
    src = VideoSource(mp4_25fps, fps=None)
    take = src._take_container
    src._take_container = lambda: (lambda c, v: (_DemuxFailsAfter(c, 60), v))(*take())
    frames = list(src)
    r = src.report
    # every packet read before the error is decoded, including frames the decoder still buffered
    assert r.frames_decoded == len(frames) == 60
    assert [f.pts for f in frames] == sorted(f.pts for f in frames)
    assert [index_of(f.rgb) for f in frames] == [round(f.pts * FPS) for f in frames]
    (a, b), = r.gaps
    assert a == pytest.approx(frames[-1].pts) and b == pytest.approx(5.2, abs=0.05)
    assert r.errors[0].startswith("demuxing stopped after 2.") and "Invalid data" in r.errors[0]


# ---------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------


def _norm(v: float, c: int) -> float:
    return (v / 255 - CLIP_MEAN[c]) / CLIP_STD[c]


def test_interpolate_accepts_uint8_nearest():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.uint8).view(2, 3, 4, 6)
    y = F.interpolate(x, size=(2, 2))
    assert y.dtype == torch.uint8
    assert torch.equal(y, x[:, :, [0, 2]][:, :, :, [0, 3]])  # rows floor(i*4/2), cols floor(j*6/2)


def test_preprocess_video_frames_hand_computed():
    frame = np.array([[[0, 255, 10], [20, 30, 40]], [[255, 255, 255], [1, 2, 3]]], np.uint8)  # (2, 2, 3)
    out = preprocess_video_frames(np.stack([frame, frame[::-1]]), size=4)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    for y in range(4):
        for x in range(4):
            for c in range(3):
                assert out[0, c, y, x].item() == pytest.approx(_norm(frame[y // 2, x // 2, c], c), abs=1e-6)
                assert out[1, c, y, x].item() == pytest.approx(_norm(frame[1 - y // 2, x // 2, c], c), abs=1e-6)
    assert out[0, 0, 0, 0].item() == pytest.approx(-0.48145466 / 0.26862954, abs=1e-6)

    # downsampling with nearest picks rows floor(i*H/S), cols floor(j*W/S); aspect ratio is not kept
    big = np.random.default_rng(4).integers(0, 256, (1, 4, 6, 3), dtype=np.uint8)
    small = preprocess_video_frames(torch.from_numpy(big), size=2)
    ref = preprocess_video_frames(big[:, [0, 2]][:, :, [0, 3]], size=2)
    assert torch.equal(small, ref)
    # a list of Frames works too
    as_frames = [Frame(index=0, pts=0.0, rgb=big[0])]
    assert torch.equal(preprocess_video_frames(as_frames, size=2), small)


def test_rescale_is_bit_identical_to_float64_path():
    v = torch.arange(256)
    mean = torch.tensor(CLIP_MEAN).view(3, 1)
    std = torch.tensor(CLIP_STD).view(3, 1)
    ref = ((v.to(torch.float64) * (1 / 255)).to(torch.float32) - mean) / std  # CLIPImageProcessor's order
    x = v.to(torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256).permute(0, 2, 3, 1).contiguous()  # (1,1,256,3)
    ours = preprocess_video_frames(x.expand(1, 256, 256, 3).contiguous(), size=256)[0, :, 0, :]
    assert torch.equal(ours, ref)


def test_preprocess_image_hand_computed():
    bg = tuple(int(x * 255) for x in CLIP_MEAN)
    assert bg == (122, 116, 104)
    wide = np.full((2, 4, 3), 200, np.uint8)  # h=2, w=4 -> rows 0 and 3 are padding
    out = preprocess_image(wide, size=4)
    assert out.shape == (1, 3, 4, 4) and out.dtype == torch.float32
    for c in range(3):
        assert out[0, c, [0, 3]].flatten().tolist() == pytest.approx([_norm(bg[c], c)] * 8, abs=1e-6)
        assert out[0, c, [1, 2]].flatten().tolist() == pytest.approx([_norm(200, c)] * 8, abs=1e-6)
    tall = Image.fromarray(np.full((4, 2, 3), 50, np.uint8))  # w=2, h=4 -> columns 0 and 3 are padding
    out = preprocess_image(tall, size=4)
    assert out[0, 1, :, [0, 3]].flatten().tolist() == pytest.approx([_norm(bg[1], 1)] * 8, abs=1e-6)
    assert out[0, 1, :, [1, 2]].flatten().tolist() == pytest.approx([_norm(50, 1)] * 8, abs=1e-6)


def _official_expand2square(pil_img, background_color):
    """LLaVA's expand2square, verbatim semantics, as the reference."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def _clip_processor(size: int):
    """The PIL-based CLIPImageProcessor, constructed offline (no download)."""
    pytest.importorskip("transformers")
    try:  # transformers >= 5: the PIL backend has its own class
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Proc
    except ImportError:  # older transformers: CLIPImageProcessor is the PIL ("slow") one
        from transformers import CLIPImageProcessor as Proc
    return Proc(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@pytest.mark.parametrize("size", [336, 33])
def test_preprocess_matches_clip_image_processor(size):
    proc = _clip_processor(size)
    rng = np.random.default_rng(5)
    bg = tuple(int(x * 255) for x in proc.image_mean)
    for h, w in [(90, 157), (200, 61), (48, 48), (35, 31)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = preprocess_image(img, size=size)
        ref = proc(images=_official_expand2square(img, bg), return_tensors="np")["pixel_values"]
        assert ours.shape == ref.shape == (1, 3, size, size)
        np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-5)
        assert expand2square(img, bg).tobytes() == _official_expand2square(img, bg).tobytes()
    video = rng.integers(0, 256, (3, 72, 128, 3), dtype=np.uint8)
    ours = preprocess_video_frames(video, size=size)
    squashed = F.interpolate(torch.from_numpy(video).permute(0, 3, 1, 2), size=(size, size))
    ref = proc(images=list(squashed.permute(0, 2, 3, 1).numpy()), return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-5)


def test_preprocess_rejects_bad_input():
    with pytest.raises(BadArgument, match=r"expected uint8 frames, got dtype torch.float32"):
        preprocess_video_frames(torch.zeros(1, 4, 4, 3))
    with pytest.raises(BadArgument, match=r"expected frames of shape \(T, H, W, 3\), got \(4, 4, 3\)"):
        preprocess_video_frames(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(BadArgument, match="got an empty list"):
        preprocess_video_frames([])
    with pytest.raises(BadArgument, match="positive integer, got 0"):
        preprocess_image(np.zeros((4, 4, 3), np.uint8), size=0)


def test_load_image(tmp_path):
    path = tmp_path / "rgba.png"
    Image.fromarray(np.full((3, 5, 4), 77, np.uint8)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (5, 3)
    with pytest.raises(InputNotFound) as e:
        load_image(tmp_path / "missing.jpg")
    assert f"got {tmp_path / 'missing.jpg'} (no such file)" in e.value.message
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(NotAnImage) as e:
        load_image(text)
    assert isinstance(e.value, NotAVideo) and e.value.code == "E_NOT_AN_IMAGE"
    assert e.value.message.startswith(f"expected an image file that Pillow can read, got {text} (")


def test_frame_seconds_without_a_frame_duration():
    """A frame the file gives no duration (0, as PyAV 15's frames of a VFR H.264 MP4 had) shows for one
    nominal interval; one with a duration shows for it."""
    from types import SimpleNamespace

    from stream.decode import _frame_seconds
    assert _frame_seconds(SimpleNamespace(duration=0, time_base=Fraction(1, 1000)), 0.25) == 0.25
    assert _frame_seconds(SimpleNamespace(duration=500, time_base=Fraction(1, 1000)), 0.25) == 0.5
