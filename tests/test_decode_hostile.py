"""stream.decode against awkward and hostile input: rotated phone videos, 8K-sized frames
(resized as decoded), paths that are not regular files, files that try to make FFmpeg read
something else or that lie about themselves.

Every file is made here, inside ``tmp_path``.  Tests that could block forever on a regression
(FIFOs, stdin) run the call in a thread with a deadline, so a regression fails instead of
hanging the suite.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import stream.decode as decode_mod
from lmcore.errors import (
    BadArgument,
    InputNotFound,
    InputUnreadable,
    LmsError,
    NoFrames,
    NotAVideo,
    NoVideoStream,
)
from stream.decode import VideoSource, _orientation_of_matrix, _ORIENT, check_input_path
from stream.preprocess import load_image, preprocess_video_frames, resize_frame_nearest
from test_stream import has_encoder

FPS = 25
DEADLINE_S = 20.0  # far more than any of these calls needs; only a hang reaches it


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def promptly(fn, *, fifos: tuple[Path, ...] = ()):
    """Run ``fn()`` in a thread; fail (not hang) if it has not returned within DEADLINE_S.

    On a hang, the FIFOs given are opened for writing and closed, which releases a reader
    blocked on them, so the stuck thread ends too.
    """
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(DEADLINE_S)
    if th.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        pytest.fail(f"call still blocked after {DEADLINE_S} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def pattern(h: int, w: int) -> np.ndarray:
    """An asymmetric picture: white block top-left, red block top-right, green bar bottom-left."""
    a = np.full((h, w, 3), 40, np.uint8)
    a[: h // 3, : w // 3] = 255
    a[: h // 4, w - w // 5 :] = (255, 0, 0)
    a[h - h // 6 :, : w // 2] = (0, 200, 0)
    return a


def write_rgb_video(path: Path, frames: list[np.ndarray], *, rotation: float | None = None,
                    hflip: bool = False, vflip: bool = False) -> bool:
    """Encode ``frames`` (lossless when libx264rgb exists) into an MP4, with a display matrix
    written through PyAV when ``rotation`` is given.  Returns whether coding is lossless."""
    lossless = has_encoder("libx264rgb")
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264rgb" if lossless else "mpeg4", rate=FPS)
        s.width, s.height = w, h
        s.pix_fmt = "rgb24" if lossless else "yuv420p"
        if lossless:
            s.options = {"crf": "0"}
        else:
            s.codec_context.bit_rate = 8_000_000
        if rotation is not None:
            s.set_display_rotation(rotation, hflip=hflip, vflip=vflip)
        for i, a in enumerate(frames):
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            f.pts, f.time_base = i, Fraction(1, FPS)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return lossless


def write_ffv1(path: Path, frames: list[np.ndarray]) -> None:
    """Lossless FFV1 in Matroska: any size, odd ones included."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", format="matroska") as c:
        s = c.add_stream("ffv1", rate=FPS)
        s.width, s.height, s.pix_fmt = w, h, "bgr0"
        for i, a in enumerate(frames):
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            f.pts, f.time_base = i, Fraction(1, FPS)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_plain(path: Path, n: int = 130, fmt: str | None = None, codec: str = "libx264", **options) -> None:
    """``n`` small frames at 25 fps; frame i has grey level 2*i (so its index can be read back)."""
    with av.open(str(path), "w", format=fmt, options=options) as c:
        s = c.add_stream(codec, rate=FPS)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        s.codec_context.bit_rate = 2_000_000
        for i in range(n):
            f = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 2 * i % 256, np.uint8), format="rgb24")
            f.pts, f.time_base = i, Fraction(1, FPS)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


#: the eight ways to lay a picture on the screen (numpy views)
ALL_ORIENTATIONS = {
    "none": lambda a: a,
    "cw": lambda a: np.rot90(a, -1),
    "ccw": lambda a: np.rot90(a, 1),
    "180": lambda a: a[::-1, ::-1],
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1],
    "transpose": lambda a: a.transpose(1, 0, 2),
    "antitranspose": lambda a: a[::-1, ::-1].transpose(1, 0, 2),
}


def assert_orientation(got: np.ndarray, src: np.ndarray, want: str, tol: float) -> None:
    """``got`` is ``src`` laid out as ``want``, and clearly closer to it than to any other layout."""
    err = {
        name: float(np.abs(got.astype(np.int16) - op(src).astype(np.int16)).mean())
        for name, op in ALL_ORIENTATIONS.items()
        if op(src).shape == got.shape
    }
    best = min(err, key=err.get)
    assert best == want and err[want] <= tol, err


# ---------------------------------------------------------------------------
# 1. display matrix: frames come out upright
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rotation,hflip,vflip,want",
    [
        (90, False, False, "ccw"),  # PyAV's degrees are counter-clockwise (FFmpeg's convention)
        (-90, False, False, "cw"),  # i.e. 270
        (270, False, False, "cw"),
        (180, False, False, "180"),
        (0, True, False, "hflip"),
        (0, False, True, "vflip"),
        (90, True, False, "antitranspose"),  # mirrored after turning: ffplay's clock_flip
        (270, False, True, "antitranspose"),
    ],
)
def test_display_matrix_frames_come_out_upright(tmp_path, rotation, hflip, vflip, want):
    coded = pattern(48, 80)  # landscape as stored
    path = tmp_path / "phone.mp4"
    lossless = write_rgb_video(path, [coded] * 3, rotation=rotation, hflip=hflip, vflip=vflip)
    src = VideoSource(path, fps=None)
    frames = list(src)
    upright = ALL_ORIENTATIONS[want](coded)
    assert len(frames) == 3
    for f in frames:
        assert f.rgb.shape == upright.shape and f.rgb.flags.c_contiguous
        assert_orientation(f.rgb, coded, want, tol=0.0 if lossless else 6.0)
    # the info describes the upright picture
    assert (src.info.width, src.info.height) == (upright.shape[1], upright.shape[0])
    assert (src.report.width, src.report.height) == (upright.shape[1], upright.shape[0])
    assert src.report.errors == []


def test_side_data_is_read_once_per_angle(tmp_path, monkeypatch):
    """Listing a frame's side data (PyAV) makes a reference cycle that keeps the frame alive
    until the garbage collector runs: with 8K frames, reading it for every frame piled up
    hundreds of MB.  It is read once per rotation angle per iteration."""
    path = tmp_path / "phone.mp4"
    write_rgb_video(path, [pattern(48, 80)] * 12, rotation=90)
    calls = []
    real = decode_mod._frame_orientation
    monkeypatch.setattr(decode_mod, "_frame_orientation", lambda *a: calls.append(1) or real(*a))
    src = VideoSource(path, fps=None)
    calls.clear()  # construction looked at the first frame
    frames = list(src)
    assert len(frames) == 12 and all(f.rgb.shape == (80, 48, 3) for f in frames)
    assert len(calls) == 1


def _patch_tkhd_matrix(path: Path, matrix: tuple[int, ...]) -> None:
    """Write a display matrix into the (version 0) ``tkhd`` box, where phones put it."""
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    assert at > 0 and data[at + 4] == 0, "expected a version-0 tkhd box"
    # type(4) version+flags(4) ctime mtime track_id reserved duration (5x4) reserved(8)
    # layer, alternate group, volume, reserved (4x2): the 3x3 matrix follows, big-endian
    data[at + 44 : at + 80] = struct.pack(">9i", *matrix)
    path.write_bytes(bytes(data))


def test_phone_tkhd_matrix_rotated_90_clockwise(tmp_path):
    """A matrix as an iPhone writes it for a portrait video: turn the landscape picture
    90 degrees clockwise for display (ffplay's transpose=clock)."""
    coded = pattern(48, 80)
    path = tmp_path / "iphone.mov"
    lossless = write_rgb_video(path, [coded] * 2)
    one = 1 << 16
    _patch_tkhd_matrix(path, (0, one, 0, -one, 0, 0, 0, 0, 1 << 30))
    src = VideoSource(path, fps=None, resize_to=None)
    frames = list(src)
    assert (src.info.width, src.info.height) == (48, 80)
    for f in frames:
        assert f.rgb.shape == (80, 48, 3)
        assert_orientation(f.rgb, coded, "cw", tol=0.0 if lossless else 6.0)
        # the white block that sits top-left in the stored picture is now top-right
        assert f.rgb[:10, -10:].mean() > 200 and f.rgb[:10, :10].mean() < 200


def test_orientation_of_matrix_follows_ffplay():
    one = 1 << 16

    def rot(deg_ccw):  # av_display_rotation_set(-deg_ccw)
        return decode_mod._rotation_matrix(deg_ccw)

    assert _orientation_of_matrix(None) is None
    assert _orientation_of_matrix((one, 0, 0, 0, one, 0, 0, 0, 1 << 30)) is None
    assert _orientation_of_matrix(rot(90)) == "cclock"
    assert _orientation_of_matrix(rot(-90)) == "clock"
    assert _orientation_of_matrix(rot(180)) == "rot180"
    assert _orientation_of_matrix((-one, 0, 0, 0, one, 0, 0, 0, 1 << 30)) == "hflip"
    assert _orientation_of_matrix((one, 0, 0, 0, -one, 0, 0, 0, 1 << 30)) == "vflip"
    assert _orientation_of_matrix(rot(45)).startswith("rotate:")
    # FFmpeg's transpose filter directions, on a 2x3 picture
    a = np.arange(6, dtype=np.uint8).reshape(2, 3, 1).repeat(3, axis=2)
    assert np.array_equal(_ORIENT["clock"](a)[..., 0], [[3, 0], [4, 1], [5, 2]])
    assert np.array_equal(_ORIENT["cclock"](a)[..., 0], [[2, 5], [1, 4], [0, 3]])
    assert np.array_equal(_ORIENT["transpose"](a)[..., 0], [[0, 3], [1, 4], [2, 5]])  # cclock_flip
    assert np.array_equal(_ORIENT["antitranspose"](a)[..., 0], [[5, 2], [4, 1], [3, 0]])  # clock_flip


def test_odd_rotation_angle_is_reported_not_applied(tmp_path):
    coded = pattern(48, 80)
    path = tmp_path / "tilted.mp4"
    write_rgb_video(path, [coded] * 2, rotation=30)
    src = VideoSource(path, fps=None)
    frames = list(src)
    assert [f.rgb.shape for f in frames] == [(48, 80, 3)] * 2
    assert len([e for e in src.report.errors if "not applied" in e]) == 1


@pytest.mark.parametrize("orientation", [6, 2, 5, 8])
def test_jpeg_exif_orientation_is_applied(tmp_path, orientation):
    """FFmpeg turns a JPEG's EXIF orientation into a display matrix (next to EXIF side data that
    PyAV cannot name, so reading the frame's side data must not fail the decode)."""
    src_px = pattern(48, 80)
    im = Image.fromarray(src_px)
    exif = im.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo{orientation}.jpg"
    im.save(path, exif=exif, quality=95)
    want = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    vs = VideoSource(path, resize_to=64)  # resize_to leaves still images alone
    (frame,) = list(vs)
    assert frame.rgb.shape == want.shape
    assert np.abs(frame.rgb.astype(np.int16) - want.astype(np.int16)).mean() < 3.0
    assert (vs.info.width, vs.info.height) == (want.shape[1], want.shape[0])


# ---------------------------------------------------------------------------
# 3. resize_to: frames reduced as decoded, bit-identical to preprocess
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [336, 64, 1024])
@pytest.mark.parametrize("shape", [(563, 1000), (17, 30), (336, 336)])
def test_resize_frame_nearest_is_preprocess_bit_for_bit(size, shape):
    rng = np.random.default_rng(sum(shape) + size)
    frame = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    small = resize_frame_nearest(frame, size)
    assert small.shape == (size, size, 3) and small.dtype == np.uint8 and small.flags.c_contiguous
    assert not np.shares_memory(small, frame)
    # the batch path on the full frame, and the batch path on the already-resized frame
    full = preprocess_video_frames(frame[None], size=size)
    again = preprocess_video_frames(small[None], size=size)
    assert torch.equal(full, again)
    # the pixels are those F.interpolate picks on the uint8 batch
    ref = torch.nn.functional.interpolate(torch.from_numpy(frame[None]).permute(0, 3, 1, 2), size=(size, size))
    assert torch.equal(torch.from_numpy(small), ref[0].permute(1, 2, 0))
    # a strided view (a rotated frame) resizes like its contiguous copy
    view = np.rot90(frame, -1)
    assert np.array_equal(resize_frame_nearest(view, size), resize_frame_nearest(np.ascontiguousarray(view), size))
    # in a batch with other frames: unchanged
    other = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    batch = preprocess_video_frames(np.stack([other, frame]), size=size)
    assert torch.equal(batch[1:], again)


def test_resize_frame_nearest_rejects_bad_input():
    with pytest.raises(BadArgument, match=r"expected an \(H, W, 3\) uint8 RGB frame, got shape \(4, 4\)"):
        resize_frame_nearest(np.zeros((4, 4), np.uint8), 8)
    with pytest.raises(BadArgument, match="positive integer, got 0"):
        resize_frame_nearest(np.zeros((4, 4, 3), np.uint8), 0)


@pytest.mark.parametrize("size", [336, 64])
def test_videosource_resize_to_equals_preprocess_of_full_frames(tmp_path, size):
    assert has_encoder("ffv1"), "expected the FFV1 encoder in PyAV's bundled FFmpeg (the av wheels ship it)"
    rng = np.random.default_rng(7)
    frames = [rng.integers(0, 256, (563, 1001, 3), dtype=np.uint8) for _ in range(3)]
    path = tmp_path / "odd.mkv"
    write_ffv1(path, frames)

    full = [f.rgb for f in VideoSource(path, fps=None)]
    assert all(np.array_equal(a, b) for a, b in zip(full, frames))  # lossless
    src = VideoSource(path, fps=None, resize_to=size)
    small = list(src)
    assert [f.pts for f in small] == pytest.approx([0, 0.04, 0.08])
    for f in small:
        assert f.rgb.shape == (size, size, 3) and f.rgb.dtype == np.uint8
        base = f.rgb
        while isinstance(base.base, np.ndarray):  # nothing full-size is kept alive behind the frame
            base = base.base
        assert base.nbytes <= size * size * 3
    assert (src.info.width, src.info.height) == (1001, 563)  # the source's size, not resize_to
    assert torch.equal(
        preprocess_video_frames([f.rgb for f in small], size=size), preprocess_video_frames(full, size=size)
    )
    assert "resize_to=" in repr(src)


def test_resize_to_after_rotation_matches_preprocess_of_upright(tmp_path):
    coded = np.random.default_rng(3).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    path = tmp_path / "phone.mp4"
    assert write_rgb_video(path, [coded] * 2, rotation=-90), \
        "expected the lossless libx264rgb encoder in PyAV's bundled FFmpeg (the av wheels ship it)"
    upright = [f.rgb for f in VideoSource(path, fps=None)]
    assert all(np.array_equal(u, np.rot90(coded, -1)) for u in upright)
    small = [f.rgb for f in VideoSource(path, fps=None, resize_to=36)]
    assert torch.equal(preprocess_video_frames(small, size=36), preprocess_video_frames(upright, size=36))


def test_resize_to_is_validated(tmp_path):
    path = tmp_path / "v.mp4"
    write_plain(path, n=5)
    for bad in (0, -3, 2.5, True, "336"):
        with pytest.raises(BadArgument, match="expected resize_to to be None or a positive integer"):
            VideoSource(path, resize_to=bad)
    assert list(VideoSource(path, resize_to=np.int64(8)))[0].rgb.shape == (8, 8, 3)


# ---------------------------------------------------------------------------
# 2. paths that are not regular files
# ---------------------------------------------------------------------------


def test_fifo_without_writer_is_refused_promptly(tmp_path):
    fifo = tmp_path / "camera.mp4"
    os.mkfifo(fifo)
    with pytest.raises(InputUnreadable) as e:
        promptly(lambda: VideoSource(fifo), fifos=(fifo,))
    assert e.value.message == f"expected a regular file, got a FIFO (named pipe) at {fifo}"
    assert (e.value.code, e.value.exit_code) == ("E_INPUT_UNREADABLE", 2)
    with pytest.raises(InputUnreadable, match="FIFO"):
        promptly(lambda: load_image(fifo), fifos=(fifo,))


def test_fifo_swapped_in_after_opening_is_refused_promptly(tmp_path):
    path = tmp_path / "clip.mp4"
    write_plain(path, n=10)
    src = VideoSource(path)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(InputUnreadable, match="FIFO"):
        promptly(lambda: list(src), fifos=(path,))


def test_socket_and_device_are_refused(tmp_path):
    sock_path = tmp_path / "s.sock"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(sock_path))
        with pytest.raises(InputUnreadable, match=r"expected a regular file, got a socket at "):
            promptly(lambda: VideoSource(sock_path))
    finally:
        sock.close()
    if os.path.exists("/dev/null") and stat.S_ISCHR(os.stat("/dev/null").st_mode):
        with pytest.raises(InputUnreadable, match=r"expected a regular file, got a character device at /dev/null"):
            promptly(lambda: VideoSource("/dev/null"))


def test_directory_is_unreadable_input(tmp_path):
    with pytest.raises(InputUnreadable) as e:
        VideoSource(tmp_path)
    assert e.value.message == f"expected a regular file, got a directory at {tmp_path}"
    assert e.value.code == "E_INPUT_UNREADABLE" and isinstance(e.value, NotAVideo)  # NotAVideo: as before


def test_symlink_loop_is_unreadable_not_missing(tmp_path):
    a, b, me = tmp_path / "a.mp4", tmp_path / "b.mp4", tmp_path / "me.mp4"
    os.symlink(b, a)
    os.symlink(a, b)
    os.symlink(me, me)
    with pytest.raises(InputUnreadable) as e:
        VideoSource(a)
    assert e.value.message == f"expected a regular file, got a symbolic link loop at {a} ({a} -> {b} -> {a})"
    with pytest.raises(InputUnreadable, match="symbolic link loop"):
        VideoSource(me)
    with pytest.raises(InputUnreadable, match="symbolic link loop"):
        load_image(me)


def test_dangling_symlink_and_missing_file_are_not_found(tmp_path):
    link = tmp_path / "link.mp4"
    os.symlink(tmp_path / "gone.mp4", link)
    with pytest.raises(InputNotFound) as e:
        VideoSource(link)
    assert e.value.message.startswith(f"expected an existing video or image file, got {link} (a symbolic link to ")
    with pytest.raises(InputNotFound, match=r"\(no such file\)"):
        VideoSource(tmp_path / "nothing" / "here.mp4")
    with pytest.raises(BadArgument, match="NUL"):
        VideoSource(str(tmp_path / "a\0b.mp4"))


def test_unreadable_file_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "secret.mp4"
    write_plain(path, n=3)
    if os.geteuid() != 0:
        path.chmod(0)
        try:
            with pytest.raises(InputUnreadable, match=r"expected a readable video or image file, got .* \(permission denied\)"):
                VideoSource(path)
        finally:
            path.chmod(0o644)
    else:  # root reads anything: make the open fail as it would for anyone else
        real_open = os.open

        def deny(p, flags, *args, **kwargs):
            if os.fspath(p) == str(path):
                raise PermissionError(errno.EACCES, "Permission denied", str(p))
            return real_open(p, flags, *args, **kwargs)

        monkeypatch.setattr(decode_mod.os, "open", deny)
        with pytest.raises(InputUnreadable) as e:
            check_input_path(path)
        monkeypatch.undo()
        assert e.value.message == f"expected a readable video or image file, got {path} (permission denied)"


# ---------------------------------------------------------------------------
# files that make FFmpeg read something else
# ---------------------------------------------------------------------------


def test_file_named_like_an_ffmpeg_protocol_is_read_as_a_file(tmp_path, monkeypatch):
    """``pipe:0`` would make FFmpeg read stdin (forever, when nothing writes to it)."""
    monkeypatch.chdir(tmp_path)
    write_plain(tmp_path / "clip.mp4", n=30)
    os.rename(tmp_path / "clip.mp4", tmp_path / "pipe:0")
    r, w = os.pipe()  # a stdin nobody writes to
    saved = os.dup(0)
    try:
        os.dup2(r, 0)
        frames = promptly(lambda: list(VideoSource("pipe:0")))
    finally:
        os.dup2(saved, 0)
        for fd in (saved, r, w):
            os.close(fd)
    assert [round(f.pts) for f in frames] == [0, 1]


@pytest.mark.parametrize(
    "name,text",
    [
        ("list.m3u8", "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{target}\n#EXT-X-ENDLIST\n"),
        ("list.mp4", "ffconcat version 1.0\nfile '{target}'\n"),
    ],
    ids=["hls", "ffconcat"],
)
def test_playlists_are_refused_without_reading_what_they_name(tmp_path, name, text):
    fifo = tmp_path / "seg.ts"
    os.mkfifo(fifo)
    real = tmp_path / "real.mp4"
    write_plain(real, n=5)
    for target in (fifo, real):
        path = tmp_path / name
        path.write_text(text.format(target=target.name))
        with pytest.raises(NotAVideo) as e:
            promptly(lambda: VideoSource(path), fifos=(fifo,))
        assert "playlists and other formats that name further files to read" in e.value.message


def test_image_name_with_sequence_pattern_is_one_file(tmp_path, monkeypatch):
    """``img%d.png`` is one image, not the sequence img0.png, img1.png... (here a FIFO)."""
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.full((6, 8, 3), 200, np.uint8)).save(tmp_path / "img%d.png")
    Image.fromarray(np.full((6, 8, 3), 10, np.uint8)).save(tmp_path / "img0.png")
    os.mkfifo(tmp_path / "img1.png")
    frames = promptly(lambda: list(VideoSource("img%d.png")), fifos=(tmp_path / "img1.png",))
    assert len(frames) == 1 and frames[0].rgb.shape == (6, 8, 3) and int(frames[0].rgb.mean()) == 200


# ---------------------------------------------------------------------------
# files that lie or end early
# ---------------------------------------------------------------------------


def _mp4(path: Path, **options) -> bytes:
    write_plain(path, n=50, **options)
    return path.read_bytes()


def test_cut_off_and_empty_files_raise_lms_errors(tmp_path):
    data = _mp4(tmp_path / "whole.mp4")  # moov at the end
    assert data.find(b"moov") > data.find(b"mdat")
    cases = {
        "empty.mp4": b"",
        "one_byte.mp4": b"\0",
        "ftyp_only.mp4": data[: data.find(b"mdat") - 4],
        "moov_lost.mp4": data[: int(len(data) * 0.3)],  # recording stopped before the index was written
        "moov_half.mp4": data[: data.find(b"moov") + 40],
    }
    fast = _mp4(tmp_path / "fast.mp4", movflags="faststart")  # moov first
    cases["header_only.mp4"] = fast[: fast.find(b"mdat") + 4]
    cases["header_cut.mp4"] = fast[: fast.find(b"moov") + 60]
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(LmsError) as e:
            promptly(lambda: list(VideoSource(path)))
        assert isinstance(e.value, (NotAVideo, NoFrames, NoVideoStream)), (name, e.value)
        assert e.value.message.startswith("expected ") and "\n" not in e.value.message
        if name in ("moov_lost.mp4", "moov_half.mp4"):
            assert "without a readable index (moov box)" in e.value.message, e.value.message


def test_unknown_codec_is_no_video_stream(tmp_path):
    path = tmp_path / "odd.mkv"
    write_plain(path, n=5, fmt="matroska", codec="mpeg4")
    data = path.read_bytes()
    assert b"V_MPEG4/ISO/ASP" in data
    path.write_bytes(data.replace(b"V_MPEG4/ISO/ASP", b"V_XXXXX/ISO/ASP"))
    with pytest.raises(NoVideoStream) as e:
        VideoSource(path)
    assert e.value.message.startswith(f"expected a video stream that FFmpeg can decode in {path}, got none")
    assert "(no decoder)" in e.value.message


def _set_mkv_duration(path: Path, seconds: float) -> None:
    """Make a 5.2 s Matroska file of `write_plain` declare ``seconds``: its Segment Duration (a float,
    in milliseconds at the default timecode scale) and its video track's DURATION tag."""
    data = bytearray(path.read_bytes())
    at = data.find(bytes.fromhex("448988"))  # Duration, 8-byte float
    assert at > 0
    data[at + 3 : at + 11] = struct.pack(">d", seconds * 1000.0)
    tag = data.find(b"00:00:05.2")
    assert tag > 0
    minutes, rest = divmod(seconds, 60)
    data[tag : tag + 10] = f"00:{int(minutes):02d}:{rest:04.1f}".encode()
    path.write_bytes(bytes(data))


def test_frames_past_a_short_declared_duration_are_yielded(tmp_path):
    # Matroska: Segment Duration and the DURATION tag both say 1 s; 5.2 s are there
    mkv = tmp_path / "short.mkv"
    write_plain(mkv, fmt="matroska", codec="mpeg4")
    _set_mkv_duration(mkv, 1.0)
    # MP4: mvhd and mdhd durations (version 0) set to one tick
    mp4 = tmp_path / "short.mp4"
    write_plain(mp4)
    data = bytearray(mp4.read_bytes())
    for box in (b"mvhd", b"mdhd"):
        at = data.find(box)
        assert data[at + 4] == 0
        data[at + 20 : at + 24] = struct.pack(">I", 1)  # after version, ctime, mtime, timescale
    mp4.write_bytes(bytes(data))

    for path in (mkv, mp4):
        src = VideoSource(path, fps=None, progress=True)
        assert src.info.duration_s is not None and src.info.duration_s <= 1.0
        frames = list(src)
        assert len(frames) == 130 and frames[-1].pts == pytest.approx(5.16)
        assert src.report.gaps == []
        # the header is wrong: the duration is the frames' (the last at 5.16 s, shown 0.04 s), and it says so
        assert src.report.duration_s == pytest.approx(5.2, abs=1e-6)
        assert src.report.errors[0].startswith("frame at ") and "the header is wrong" in src.report.errors[0]
        assert [round(f.pts) for f in VideoSource(path, fps=1.0)] == [0, 1, 2, 3, 4, 5]
        assert [round(f.pts, 2) for f in VideoSource(path, fps=1.0, start=3.0)] == [3.0, 4.0, 5.0]


def test_a_declared_duration_past_the_frames_of_a_complete_file_is_the_headers_mistake(tmp_path):
    """A Matroska file that declares 100 s and holds 5.2 s: its Segment holds every byte it declares,
    so nothing was lost: the header is wrong.  No gap, the duration is the frames', an error line says
    why.  The same file cut short keeps the declared 100 s and reports the lost tail as a gap."""
    mkv = tmp_path / "long.mkv"
    write_plain(mkv, fmt="matroska", codec="mpeg4")
    _set_mkv_duration(mkv, 100.0)
    src = VideoSource(mkv, fps=None)
    assert src.info.duration_s == 100.0  # before decoding, the header is all there is
    frames = list(src)
    r = src.report
    assert len(frames) == 130 and r.gaps == [] and r.duration_s == pytest.approx(5.2, abs=1e-6)
    assert r.errors == [
        "video ended at 5.16 s with no frame missing, but the file declares 100.00 s: "
        "the header is wrong, the duration is 5.20 s"
    ]

    cut = tmp_path / "cut.mkv"
    data = mkv.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    src = VideoSource(cut, fps=None)
    frames = list(src)
    (a, b), = src.report.gaps
    assert a == pytest.approx(frames[-1].pts) and b == 100.0 and src.report.duration_s == 100.0
    assert "(truncated file?)" in src.report.errors[-1]

    # an MP4 (index first) cut right after a packet ends cleanly; its index still declares 5.2 s: a lost tail too
    mp4 = tmp_path / "whole.mp4"
    write_plain(mp4, movflags="+faststart")
    with av.open(str(mp4)) as c:
        ends = sorted(p.pos + p.size for p in c.demux(video=0) if p.size)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(mp4.read_bytes()[: ends[70]])
    src = VideoSource(cut, fps=None)
    frames = list(src)
    assert src.report.gaps == [(pytest.approx(frames[-1].pts), pytest.approx(5.2))]
    assert src.report.duration_s == pytest.approx(5.2) and "(truncated file?)" in src.report.errors[0]


def test_start_beyond_any_timestamp_is_no_frames_not_overflow(tmp_path):
    path = tmp_path / "v.mp4"
    write_plain(path, n=10)
    with pytest.raises(NoFrames):
        list(VideoSource(path, start=1e15))  # start / time_base does not fit a 64-bit timestamp


def test_text_file_is_not_a_video(tmp_path):
    """FFmpeg's tty demuxer renders any text as a picture; a notes.txt must not be answered about."""
    from stream.decode import VideoSource
    from lmcore.errors import NotAVideo
    p = tmp_path / "notes.txt"
    p.write_text("hello\n" * 100)
    with pytest.raises(NotAVideo, match="text files"):
        VideoSource(p, fps=1.0)


# ---------------------------------------------------------------------------
# the service's file job: the duration its record shows, the limit it applies
# ---------------------------------------------------------------------------


def test_a_file_jobs_duration_and_limit_follow_the_frames(tmp_path, tiny_model, redis_server):
    """`deploy.serving.run_file_job` as the service runs it (the tiny model's encoder, job records in a
    real Redis; no Ray): the record's duration_s is what decoding found, not a wrong header's; a photo
    renamed .mp4 has 0.0 (was null); and `max_duration_s` stops a file whose frames run past it though
    its header declares less, keeping the frames within the limit."""
    import uuid

    from deploy.serving import EncoderCore, FileJob, JobStore, run_file_job, video_status
    from deploy.settings import Settings
    from frame_cache import InProcessFrameCache
    from test_stream import VFR_TIMES, write_video

    cache = InProcessFrameCache()
    core = EncoderCore(Settings(redis_url=redis_server.url), model=tiny_model, cache=cache)
    store = JobStore(redis_server.url)
    size = int(tiny_model.preprocess["size"])

    def run(path: Path, **options) -> dict:
        job = FileJob(job_id=f"vid-{uuid.uuid4().hex[:12]}", path=str(path), size=size, **options)
        store.create(job.job_id, {"status": "queued"})
        return run_file_job(job, core.encode, store, cache)

    vfr = tmp_path / "vfr.mp4"  # its header says 5.01 s, its last frame is at 5.68 s (test_stream)
    write_video(vfr, VFR_TIMES, codec="libx264", fmt="mp4", time_base=Fraction(1, 1000))
    d = run(vfr)
    assert d["status"] == "ready" and d["frames"] == 6 and d["duration_s"] == pytest.approx(6.05, abs=1e-3), d
    assert "the header is wrong" in d["decode_errors"][0], d
    assert video_status(d)["decode_errors"] == d["decode_errors"]     # GET /v1/videos/{id} shows it

    photo = tmp_path / "photo.mp4"
    Image.fromarray(pattern(24, 32)).save(photo, format="PNG")
    d = run(photo)
    assert (d["status"], d["frames"], d["duration_s"]) == ("ready", 1, 0.0), d

    short = tmp_path / "short.mkv"  # declares 1 s, holds 5.2 s
    write_plain(short, fmt="matroska", codec="mpeg4")
    _set_mkv_duration(short, 1.0)
    d = run(short, max_duration_s=2.5)
    assert d["status"] == "failed" and d["error"] == {
        "code": "E_TOO_LARGE",
        "message": "expected a video of at most 2.5 s, got a frame at 3 s (the file declares 1 s; "
        "ask for a window, or raise the limit)",
    }, d
    assert d["frames"] == 3 and cache.stream_info(d["id"]).total_appended == 3  # 0, 1 and 2 s: stored
    # the failed record says what decoding found (it kept the header's 1 s and no decode_errors): the frame
    # at 3 s, so an answer over it names the span never stored
    assert d["duration_s"] >= 3.0 and "the header is wrong" in d["decode_errors"][0], d
    assert run(short, max_duration_s=2.5, window=(1.0, 3.0))["status"] == "ready"  # a window within it


def test_pictures_over_max_pixels_are_refused_before_they_are_decoded(tmp_path, monkeypatch):
    """File jobs had no bound on picture size: a 31 KB PNG of 16000 x 16000 cost the decoder 1.1 GB, an
    8192 x 8192 H.264 file 1.4 GB and 0.5 s of CPU a frame. A size over the limit (still images 8192 x 8192,
    video frames DCI 8K, 8192 x 4320) is now refused from the file's header, before FFmpeg decodes a frame;
    a frame that grows past it mid-file is refused as it is decoded, sampled or not."""
    from lmcore.errors import PayloadTooLarge
    bomb = tmp_path / "bomb.png"
    Image.new("1", (16000, 16000)).save(bomb)
    assert bomb.stat().st_size < 100_000
    peeked = []
    monkeypatch.setattr(decode_mod, "_peek_frame", lambda *a: peeked.append(1))
    with pytest.raises(PayloadTooLarge, match=r"at most 67108864 pixels \(8192x8192\), got 16000x16000"):
        VideoSource(bomb)
    assert peeked == []                                  # nothing decoded
    monkeypatch.undo()
    photo = tmp_path / "photo.png"                       # a 50 MP photo is a still image within the limit
    Image.new("1", (8000, 6000)).save(photo)
    assert VideoSource(photo).info.is_image
    clip = tmp_path / "clip.mp4"
    write_plain(clip, n=5)                               # 32 x 32
    with pytest.raises(PayloadTooLarge, match=r"at most 1000 pixels, got 32x32 = 1024"):
        VideoSource(clip, max_pixels=1000)
    assert len(list(VideoSource(clip, max_pixels=1024, fps=None))) == 5
    assert VideoSource(clip).max_pixels == decode_mod.MAX_PIXELS == 8192 * 4320
    src = VideoSource(clip, fps=1.0, start=0.02)         # a frame larger than the header said: refused as decoded,
    src.max_pixels = 1000                                # at the first frame (at 0 s, before the window), not the
    with pytest.raises(PayloadTooLarge, match=r"expected frames of at most 1000 pixels"):     # first sampled one
        list(src)
    assert src.report.frames_decoded == 1 and src.report.frames_sampled == 0
    still = VideoSource(photo)                           # a still image's decoded frame too
    still.max_pixels = 1000
    with pytest.raises(PayloadTooLarge, match=r"expected frames of at most 1000 pixels, got 8000x6000"):
        list(still)
    with pytest.raises(BadArgument, match="max_pixels"):
        VideoSource(clip, max_pixels=0)


def test_damage_leaves_no_gap_between_two_neighbouring_frames(tmp_path):
    """A damaged H.264 packet whose frame came out after all closed its damage with a gap from the frame
    before: 2,000 bytes overwritten in a 40 s, 1 fps scene stored 0-12 and 15-39 s and said the gaps were
    `[[12, 15], [15, 16]]`, the second between two stored neighbours, repeated in every answer. A gap now
    holds missing frames only."""
    from stream.synthetic import make_scene, write_video
    path = tmp_path / "d.mp4"
    write_video(make_scene(11, 40, size=(64, 64)), path)
    data = bytearray(path.read_bytes())
    n = len(data) // 3
    data[n:n + 2000] = b"\x55" * 2000
    path.write_bytes(bytes(data))
    src = VideoSource(path, fps=1.0)
    pts = [f.pts for f in src]
    gaps = src.report.gaps
    assert gaps and src.report.errors, (gaps, src.report.errors)         # the damage is seen and said
    for a, b in gaps:
        inside = [p for p in pts if a < p < b]
        assert not inside, (a, b, inside)                                # no stored frame inside a gap
        assert b - a > 1.5, (a, b, pts)                                  # and some frame missing in it
    missing = [t for t in range(40) if not any(abs(p - t) < 1e-6 for p in pts)]
    assert all(any(a < t < b for a, b in gaps) for t in missing), (missing, gaps)
