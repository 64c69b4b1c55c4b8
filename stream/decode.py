"""Streaming, damage-tolerant video decoding with presentation-time sampling.

`VideoSource` opens a video (or a still image) with PyAV/FFmpeg, validates it
on construction and, when iterated, yields `Frame`s sampled at ``fps`` frames
per second of *presentation time*:

* target times are ``t_k = start + k / fps`` (k = 0, 1, 2, ...); each target
  takes the first decoded frame whose presentation time is ``>= t_k``.  Times
  come from ``frame.pts * time_base`` relative to the stream start, never from
  frame counters, so variable-frame-rate files are sampled correctly.  When a
  single frame satisfies several pending targets (a long still section of a
  VFR file) it is yielded once and all those targets are consumed;
* decoding streams packet by packet: memory stays bounded by one decoded
  frame plus the decoder's reorder buffer, however long the file is;
* damaged input does not abort decoding: packets that fail to decode, packets
  or frames flagged corrupt, bytes skipped by the demuxer while resyncing, a
  demuxer error mid-file and a stream that ends before its declared duration
  are all recorded in `DecodeReport.gaps` / `DecodeReport.errors`, and
  decoding continues with the next good packet.  Only when no frame at all
  can be produced is `NoFrames` raised;
* frames come out upright, as ffplay shows them: a display matrix (the
  rotation a phone records in an MP4's ``tkhd``, an EXIF orientation) is
  applied to every frame, and `VideoInfo` gives the upright width and height;
* with ``resize_to=S`` each video frame is squashed to ``S x S`` right after
  decoding, bit for bit as `stream.preprocess.preprocess_video_frames` would
  do it later, so that a batch of 8K frames never sits in memory;
* the path is checked before FFmpeg sees it: a FIFO, socket, device, folder,
  symbolic link loop or unreadable file is refused (`InputUnreadable`)
  instead of blocking or being reported as missing; FFmpeg opens it through
  its ``file:`` protocol only (a file named ``pipe:0`` is a file), reads no
  other file on its behalf (playlists such as HLS or ffconcat, image-sequence
  patterns) and every failure becomes an `LmsError` subclass.

Example::

    src = VideoSource("talk.mp4", fps=1.0, progress=True)
    for frame in src:            # Frame(index, pts, rgb (H, W, 3) uint8)
        consume(frame)
    print(src.report.summary())
"""
from __future__ import annotations

import errno
import functools
import math
import numbers
import os
import re
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import av
import av.error
import av.format
import numpy as np

from lmcore.errors import (
    BadArgument,
    InputNotFound,
    InputUnreadable,
    NoFrames,
    NotAVideo,
    NoVideoStream,
    PayloadTooLarge,
)

__all__ = [
    "Frame",
    "VideoInfo",
    "DecodeReport",
    "VideoSource",
    "check_input_path",
    "open_video",
]

#: Tolerance (seconds) when comparing presentation times with sampling targets,
#: so that a frame at 0.999999999 s (rounding in time_base arithmetic) still
#: counts as the frame for the 1 s target.
_TIME_EPS = 1e-6
#: A step back in frame time longer than this (seconds) is timestamps starting over, not reordering.
_JOIN_BACK_S = 1.0

#: Videos longer than this (seconds) get a progress bar when ``progress=True``.
_PROGRESS_MIN_DURATION_S = 60.0

#: At most this many error lines are kept in a report; the rest are counted.
_MAX_ERROR_LINES = 20

#: Container formats whose packets lie back to back in the file, so that a jump
#: in byte position between consecutive packets means the demuxer skipped
#: unreadable bytes while resyncing (Matroska/WebM resync silently, without an
#: error).  Index-based (MP4) and packetised (MPEG-TS/PS) formats are excluded:
#: their packets are legitimately non-contiguous, and damage to them shows up as
#: decode errors or corrupt-packet flags instead.
_CONTIGUOUS_FORMATS = ("matroska", "webm")

#: A byte jump larger than this between consecutive packets of a contiguous
#: format counts as skipped (unreadable) data.  Healthy Matroska files have
#: gaps of a few dozen bytes (block and cluster headers).
_BYTE_SKIP_SLACK = 1024

#: After evidence of damage (skipped bytes, a corrupt or undecodable packet), a
#: jump in decode timestamps within this many video packets means packets were
#: lost.  Jumps without such evidence are normal in variable-frame-rate files.
_SUSPECT_PACKETS = 3

#: Frame rate assumed for estimating a missing pts when the stream declares none.
_FALLBACK_FPS = 25.0


def _end_slack(nominal: float) -> float:
    """How far (seconds) the last frame may end before a declared duration without the file's tail
    counting as missing: a few frame intervals, plus half a second for a long last frame."""
    return 3 * nominal + 0.5


@dataclass(frozen=True, eq=False)
class Frame:
    """One sampled video frame.

    Attributes:
        index: 0-based position of this frame among the *sampled* frames of one
            iteration (not its index in the source file).
        pts: presentation time in seconds, relative to the start of the video
            stream (the first frame of a normal file has ``pts == 0.0``).
        rgb: the picture, upright, shape ``(H, W, 3)`` (``(S, S, 3)`` for a video
            read with ``resize_to=S``), dtype ``uint8``, RGB order.

    Frames compare by identity (``eq=False``): comparing pixel arrays with
    ``==`` has no single truth value.
    """

    index: int
    pts: float
    rgb: np.ndarray

    def __repr__(self) -> str:  # never dump pixel data
        return f"Frame(index={self.index}, pts={self.pts:.3f}, rgb={tuple(self.rgb.shape)} {self.rgb.dtype})"


@dataclass(frozen=True)
class VideoInfo:
    """Static facts about an opened input, known before decoding.

    Attributes:
        path: the input path as given (``str``).
        format_name: FFmpeg container (demuxer) name, e.g. ``"mov,mp4,m4a,3gp,3g2,mj2"``.
        codec_name: FFmpeg decoder name of the chosen video stream, e.g. ``"h264"``.
        duration_s: the duration the file declares for its video stream, in seconds
            (its header: all that is known before decoding), ``None`` if it declares
            none; ``0.0`` for a still image (one frame, at 0 s, with no length).
            Decoding may find it wrong: see `DecodeReport.duration_s`.
        source_fps: average frame rate declared by the file, ``None`` if unknown
            or for still images.
        width: width in pixels of the upright picture (after the display
            matrix, before any ``resize_to``); for a video rotated by 90 degrees
            this is the coded height.
        height: height in pixels of the upright picture.
        is_image: True for a still image (PNG, JPEG, ...), which yields exactly one frame.
        stream_index: index of the chosen video stream within the container.
    """

    path: str
    format_name: str
    codec_name: str
    duration_s: float | None
    source_fps: float | None
    width: int
    height: int
    is_image: bool
    stream_index: int


@dataclass
class DecodeReport:
    """What happened while decoding one iteration of a `VideoSource`.

    Filled in as frames are yielded; complete once the iteration finishes.

    Attributes:
        path, format_name, codec_name, source_fps, width, height, is_image:
            copied from `VideoInfo`.
        duration_s: the video's duration in seconds as far as decoding has
            found it.  It starts as the declared one (`VideoInfo.duration_s`);
            a frame more than half a frame interval past that end shows the
            header wrong, and from then on the frames say it (the latest
            frame's time plus how long it shows), with an error line.  Once
            the whole file has been read, it is the frames' span too when the
            file declares no duration, or declares one its frames fall short
            of while the file is known complete (a Matroska/WebM segment that
            holds every byte it declares), again with an error line.  A file
            that may be cut short keeps its declared duration, and its missing
            tail is a gap (``truncated file?``).  ``0.0`` for a still image.
        frames_decoded: every frame the decoder produced (including frames not
            sampled, pre-roll frames before ``start`` and frames flagged corrupt).
        frames_sampled: frames yielded to the caller.
        packets_failed: video packets the decoder rejected.
        frames_corrupt: decoded frames that FFmpeg flagged as corrupt; they are
            skipped (never yielded) and counted as damage.
        pts_estimated: frames without a pts whose time was estimated from the
            dts or from the previous frame plus one nominal frame interval.
        gaps: sorted, non-overlapping ``(start_s, end_s)`` presentation-time
            ranges with no usable video because of damage: from the last good
            frame before the damage to the first good frame after it (or to the
            declared end for damage at the very end).
        errors: one line per problem, at most 20 kept (``errors_dropped`` counts the rest).
        errors_dropped: number of error lines not kept.
        dropped_frames: sampled frames a capacity limit overwrote after they were stored
            (set by the ingest pipeline; their span is also in ``gaps``).
    """

    path: str
    format_name: str
    codec_name: str
    duration_s: float | None
    source_fps: float | None
    width: int
    height: int
    is_image: bool
    frames_decoded: int = 0
    frames_sampled: int = 0
    packets_failed: int = 0
    frames_corrupt: int = 0
    pts_estimated: int = 0
    gaps: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    errors_dropped: int = 0
    dropped_frames: int = 0

    @classmethod
    def from_info(cls, info: VideoInfo) -> DecodeReport:
        """An empty report for one iteration over the input described by ``info``."""
        return cls(
            path=info.path,
            format_name=info.format_name,
            codec_name=info.codec_name,
            duration_s=info.duration_s,
            source_fps=info.source_fps,
            width=info.width,
            height=info.height,
            is_image=info.is_image,
        )

    def add_error(self, line: str, *, keep: bool = False) -> None:
        """Record one problem (newlines are folded so each entry stays one line). `keep`: a summary that
        must be read, kept in place of the last line when the list is full (that one is counted dropped)."""
        line = " ".join(line.split())
        if len(self.errors) < _MAX_ERROR_LINES:
            self.errors.append(line)
        else:
            if keep:
                self.errors[-1] = line
            self.errors_dropped += 1

    def add_gap(self, start_s: float, end_s: float) -> None:
        """Record a damaged time range, merging it with the ranges it overlaps.

        Ranges that merely touch stay separate: the shared end point is a good
        frame that was decoded between two damaged stretches.
        """
        if not (math.isfinite(start_s) and math.isfinite(end_s)):
            return
        start_s, end_s = min(start_s, end_s), max(start_s, end_s)
        merged: list[tuple[float, float]] = []
        for a, b in sorted([*self.gaps, (start_s, end_s)]):
            if merged and a < merged[-1][1] - _TIME_EPS:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.gaps = merged

    @property
    def damaged_s(self) -> float:
        """Total length in seconds of all gaps."""
        return sum(b - a for a, b in self.gaps)

    def summary(self) -> str:
        """One line for logs, e.g. ``talk.mp4: h264 1280x720 25.00 fps 63.2 s; 64/1580 frames sampled; ok``."""
        if self.is_image:
            media = f"{self.codec_name} image {self.width}x{self.height}"
        else:
            fps = f"{self.source_fps:.2f} fps" if self.source_fps else "? fps"
            dur = f"{self.duration_s:.1f} s" if self.duration_s is not None else "? s"
            media = f"{self.codec_name} {self.width}x{self.height} {fps} {dur}"
        problems = []
        if self.packets_failed:
            problems.append(f"{self.packets_failed} packets failed")
        if self.frames_corrupt:
            problems.append(f"{self.frames_corrupt} corrupt frames skipped")
        if self.gaps:
            problems.append(f"{len(self.gaps)} gaps ({self.damaged_s:.2f} s damaged)")
        if self.pts_estimated:
            problems.append(f"{self.pts_estimated} frame times estimated")
        n_err = len(self.errors) + self.errors_dropped
        if n_err:
            problems.append(f"{n_err} errors, first: {self.errors[0]}")
        status = "; ".join(problems) if problems else "ok"
        return (
            f"{os.path.basename(self.path)}: {media}; "
            f"{self.frames_sampled}/{self.frames_decoded} frames sampled; {status}"
        )


# ---------------------------------------------------------------------------
# the input path
# ---------------------------------------------------------------------------


class _DirectoryGiven(InputUnreadable, NotAVideo):
    """A folder given where a file was expected.

    An `InputUnreadable` (its code, exit status and HTTP status), and also a
    `NotAVideo`, which is what a folder was reported as before, so that callers
    catching that keep working.
    """


#: File types that are not regular files, as they are named in messages.
_SPECIAL_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _check_mode(path: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), f"a special file (mode {mode:o})")
    cls = _DirectoryGiven if stat.S_ISDIR(mode) else InputUnreadable
    raise cls(f"expected a regular file, got {kind} at {path}")


def _link_chain(path: str, limit: int = 40) -> str:
    """``a -> b -> a``: the symbolic links followed from ``path`` until one repeats (best effort)."""
    seen: list[str] = []
    here = os.path.abspath(path)
    try:
        for _ in range(limit):
            if here in seen:
                break
            seen.append(here)
            if not os.path.islink(here):
                return ""  # the loop is in a parent folder, not in this chain
            here = os.path.normpath(os.path.join(os.path.dirname(here), os.readlink(here)))
        else:
            return ""
    except OSError:
        return ""
    return " -> ".join([*seen, here])


def _path_error(path: str, exc: OSError, what: str) -> InputNotFound | InputUnreadable:
    """The error for an `OSError` raised while looking at or opening ``path``."""
    code = exc.errno
    if code in (errno.ENOENT, errno.ENOTDIR):
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return InputNotFound(
                f"expected an existing {what}, got {path} (a symbolic link to {target}, which does not exist)"
            )
        return InputNotFound(f"expected an existing {what}, got {path} (no such file)")
    if code == errno.ELOOP:
        chain = _link_chain(path)
        return InputUnreadable(
            f"expected a regular file, got a symbolic link loop at {path} "
            f"({chain or 'too many levels of symbolic links'})"
        )
    if code in (errno.EACCES, errno.EPERM):
        return InputUnreadable(f"expected a readable {what}, got {path} (permission denied)")
    return InputUnreadable(f"expected a readable {what}, got {path} ({exc.strerror or exc})")


def check_input_path(path: str | os.PathLike[str], what: str = "video or image file") -> str:
    """Check that ``path`` is a regular file this process can read; returns it as a ``str``.

    Looks before anything opens the path, so that nothing blocks on it: a FIFO
    without a writer would stall FFmpeg (or Pillow) forever.  The final check
    opens the file non-blocking and looks at what was actually opened, so a
    FIFO put in its place after the first look is refused too.

    Raises:
        BadArgument: ``path`` is not a str / os.PathLike, or holds a NUL byte.
        InputNotFound: nothing at ``path`` (or a symbolic link to nothing).
        InputUnreadable: a folder, FIFO, socket, device, a symbolic link loop,
            or a file without read permission.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise BadArgument(f"expected a file path (str or os.PathLike), got {type(path).__name__}")
    try:
        path = os.fspath(path)
    except TypeError as exc:
        raise BadArgument(f"expected a file path (str or os.PathLike), got {type(path).__name__}") from exc
    if not isinstance(path, str):
        raise BadArgument(f"expected a file path as str, got {type(path).__name__}")
    if "\0" in path:
        raise BadArgument(f"expected a file path without NUL characters, got {path!r}")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _path_error(path, exc, what) from exc
    _check_mode(path, st.st_mode)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _path_error(path, exc, what) from exc
    try:
        _check_mode(path, os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    return path


#: Demuxers that open further files or network addresses named inside the input
#: (playlists, concatenation scripts, session descriptions).  A hostile file of
#: such a format can make FFmpeg read any local file (a FIFO blocks forever), so
#: they are not offered to FFmpeg's format probe.
_REFERRING_DEMUXERS = frozenset({"hls", "applehttp", "concat", "dash", "imf", "sdp", "rtp", "rtsp", "tee"})
#: Demuxers that render text as pictures (FFmpeg's ``tty`` reads any text file as ANSI art): a
#: notes.txt is not a video, and must not be answered about as one.
_TEXT_DEMUXERS = frozenset({"tty", "ansi", "bintext", "xbin", "adf", "idf"})


@functools.lru_cache(maxsize=1)
def _container_options() -> dict[str, str]:
    """Options for opening inputs: only the ``file`` protocol, no referring demuxers,
    no image-sequence patterns (``img%d.png`` is one file, not a sequence)."""
    names = []
    for name in sorted(av.formats_available):
        try:
            av.format.ContainerFormat(name, "r")
        except Exception:  # a muxer only
            continue
        if not set(name.split(",")) & (_REFERRING_DEMUXERS | _TEXT_DEMUXERS):
            names.append(name)
    return {"format_whitelist": ",".join(names), "protocol_whitelist": "file", "pattern_type": "none"}


def _mp4_hint(path: str) -> str:
    """For an MP4/MOV that FFmpeg cannot open: the likely reason (its index is missing)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return ""
    if head[4:8] in (b"ftyp", b"mdat", b"wide", b"free"):
        return "; an MP4/MOV without a readable index (moov box): cut off while being written?"
    return ""


# ---------------------------------------------------------------------------
# orientation (display matrix) and per-frame resizing
# ---------------------------------------------------------------------------

#: How each orientation puts a decoded ``(H, W, 3)`` picture upright (numpy views, no copy).
#: Names follow FFmpeg's ``transpose`` filter: ``clock`` turns 90 degrees clockwise,
#: ``cclock`` counter-clockwise, ``transpose`` is ``cclock_flip`` (swap axes) and
#: ``antitranspose`` is ``clock_flip``.
_ORIENT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "clock": lambda a: np.rot90(a, -1),
    "cclock": lambda a: np.rot90(a, 1),
    "transpose": lambda a: a.transpose(1, 0, 2),
    "antitranspose": lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1],
    "rot180": lambda a: a[::-1, ::-1],
}

#: EXIF orientation tag (1-8) -> the operation that puts the picture upright.
_EXIF_ORIENT = {1: None, 2: "hflip", 3: "rot180", 4: "vflip", 5: "transpose", 6: "clock", 7: "antitranspose", 8: "cclock"}


def _c_round(x: float) -> float:
    """C's ``round``: halves away from zero."""
    return math.copysign(math.floor(abs(x) + 0.5), x)


def _orientation_of_matrix(m: tuple[int, ...] | None) -> str | None:
    """The operation that displays a frame with display matrix ``m`` upright, exactly as
    ffplay / ffmpeg's autorotate choose it (``get_rotation`` + transpose/hflip/vflip);
    ``"rotate:<degrees>"`` for an angle that is not a multiple of 90 degrees."""
    if m is None:
        return None
    a, b, c, d = (v / 65536.0 for v in (m[0], m[1], m[3], m[4]))
    s0, s1 = math.hypot(a, c), math.hypot(b, d)
    if s0 == 0.0 or s1 == 0.0:
        theta = math.nan  # av_display_rotation_get gives NaN: no turn, maybe a flip below
    else:
        rotation = -math.degrees(math.atan2(b / s1, a / s0))  # av_display_rotation_get
        theta = -_c_round(rotation)
        theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1.0:
        return "transpose" if m[3] > 0 else "clock"
    if abs(theta - 180) < 1.0:
        h, v = m[0] < 0, m[4] < 0
        return "rot180" if h and v else "hflip" if h else "vflip" if v else None
    if abs(theta - 270) < 1.0:
        return "antitranspose" if m[3] < 0 else "cclock"
    if abs(theta) > 1.0:
        return f"rotate:{theta:g}"
    return "vflip" if m[4] < 0 else None


def _rotation_matrix(degrees_ccw: float) -> tuple[int, ...]:
    """A pure rotation display matrix (av_display_rotation_set(-degrees_ccw))."""
    r = math.radians(degrees_ccw)
    cos, sin = round(math.cos(r) * 65536), round(math.sin(r) * 65536)
    return (cos, -sin, 0, sin, cos, 0, 0, 0, 1 << 30)


def _exif_orientation(path: str) -> int | None:
    """The EXIF orientation tag of an image file, read with Pillow (header only)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            value = im.getexif().get(0x0112)
    except Exception:  # best effort: no Pillow, not an image Pillow knows, bad EXIF
        return None
    return int(value) if isinstance(value, int) and value in _EXIF_ORIENT else None


def _frame_orientation(frame: av.VideoFrame, path: str, is_image: bool) -> str | None:
    """The operation that puts ``frame`` upright, from its display matrix side data.

    Lists the frame's side data, which (PyAV) makes a reference cycle through the
    frame: call it once per rotation angle, not for every frame (see `VideoSource._picture`).
    """
    try:
        sd = frame.side_data.get("DISPLAYMATRIX")
    except (ValueError, KeyError, TypeError):
        # PyAV cannot name some side data of newer FFmpeg (EXIF, for one) and then lists
        # none; the rotation angle is still readable, flips are not
        rotation = frame.rotation
        if is_image:
            tag = _exif_orientation(path)
            if tag is not None:
                return _EXIF_ORIENT[tag]
        return _orientation_of_matrix(_rotation_matrix(rotation)) if rotation else None
    if sd is None:
        return None
    raw = bytes(sd)
    if len(raw) < 36:
        return None
    return _orientation_of_matrix(struct.unpack("=9i", raw[:36]))


def _check_resize_to(resize_to: int | None) -> int | None:
    if resize_to is None:
        return None
    if isinstance(resize_to, bool) or not isinstance(resize_to, numbers.Integral) or resize_to <= 0:
        raise BadArgument(f"expected resize_to to be None or a positive integer (pixels), got {resize_to!r}")
    return int(resize_to)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _ffmpeg_reason(exc: BaseException) -> str:
    """FFmpeg's own reason for an error, without errno and path decorations."""
    reason = getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(reason).split())


def _check_window(
    fps: float | None, start: float | None, end: float | None
) -> tuple[float | None, float, float | None]:
    """Validate the sampling arguments; returns ``(fps or None, start, end)``."""
    if fps is not None:
        if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps) or fps < 0:
            raise BadArgument(f"expected fps to be None, 0 (every frame) or a positive finite number, got {fps!r}")
        fps = float(fps) or None
    for name, value in (("start", start), ("end", end)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0
        ):
            raise BadArgument(f"expected {name} to be None or a non-negative number of seconds, got {value!r}")
    start_s = float(start) if start is not None else 0.0
    end_s = float(end) if end is not None else None
    if end_s is not None and end_s <= start_s:
        raise BadArgument(f"expected end > start, got start={start_s:g} s and end={end_s:g} s")
    return fps, start_s, end_s


def _is_attached_picture(stream: av.stream.Stream) -> bool:
    """True for cover art (an image attached to an audio file), which is not video."""
    try:
        return bool(stream.disposition & av.stream.Disposition.attached_pic)
    except (AttributeError, TypeError):  # pragma: no cover - very old PyAV
        return False


def _describe_streams(container: av.container.InputContainer) -> str:
    parts = []
    for s in container.streams:
        ctx = getattr(s, "codec_context", None)
        codec = getattr(ctx, "name", None) or "unknown codec"
        extra = " (attached picture, not video)" if s.type == "video" and _is_attached_picture(s) else ""
        if ctx is None and s.type == "video":
            extra += " (no decoder)"
        parts.append(f"#{s.index} {s.type}/{codec}{extra}")
    return ", ".join(parts) if parts else "no streams"


def _parse_hms(text: str) -> float | None:
    """Parse a Matroska ``DURATION`` tag such as ``"00:01:05.200000000"``."""
    m = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2}(?:\.\d*)?)\s*", text or "")
    if not m:
        return None
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def _stream_duration(
    container: av.container.InputContainer, vs: av.video.stream.VideoStream
) -> tuple[float | None, bool]:
    """Duration of the video stream in seconds and whether it is specific to the video stream.

    The second value is False when only the container-wide duration is known
    (it may include a longer audio track, so it is not used to detect truncation).
    """
    if vs.duration is not None and vs.time_base is not None and vs.duration > 0:
        return float(vs.duration * vs.time_base), True
    tag = _parse_hms(vs.metadata.get("DURATION", "")) if vs.metadata else None
    if tag:
        return tag, True
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base, False
    return None, False


def _late_start(container: av.container.InputContainer, vs: av.video.stream.VideoStream, fps: float | None) -> float:
    """Seconds by which the video starts after the file does (its audio first, say): a player shows its
    first frame that late, so frame times count from the file's start. 0.0 when the two are within a frame
    interval (audio priming of a few ms moves no frame), or either start is unknown."""
    if vs.start_time is None or container.start_time is None or not vs.time_base:
        return 0.0
    late = float(vs.start_time * vs.time_base) - container.start_time / av.time_base
    return late if late > (1.0 / fps if fps else 1.0 / _FALLBACK_FPS) else 0.0


def _is_image_container(container: av.container.InputContainer, vs: av.video.stream.VideoStream) -> bool:
    """Still images open with an image demuxer (``png_pipe``, ``jpeg_pipe``, ``image2`` ...),
    or carry the ``still_image`` disposition (e.g. HEIF/AVIF items)."""
    name = container.format.name
    if name == "image2" or name.endswith("_pipe"):
        return True
    still = getattr(av.stream.Disposition, "still_image", None)
    return bool(still is not None and vs.disposition & still)


def _drain(vs: av.video.stream.VideoStream) -> list[av.VideoFrame]:
    """Flush the decoder: the frames it still holds (reordering, frame threads)."""
    try:
        return list(vs.codec_context.decode(None))
    except av.FFmpegError:
        return []


def _frame_seconds(frame: av.VideoFrame, nominal: float) -> float:
    """How long ``frame`` shows, in seconds: its own duration from the file, else one nominal frame interval."""
    d, tb = frame.duration, frame.time_base
    return float(d * tb) if d and d > 0 and tb else nominal


def _ebml_size(data: bytes, i: int) -> tuple[int, int, bool] | None:
    """The EBML size field at ``data[i:]``: (value, its width in bytes, whether it says "unknown")."""
    if i >= len(data) or data[i] == 0:
        return None
    width = 9 - data[i].bit_length()  # 1 leading zero bit per extra byte
    if i + width > len(data):
        return None
    value = data[i] & (0xFF >> width)
    for b in data[i + 1 : i + width]:
        value = value << 8 | b
    return value, width, value == (1 << (7 * width)) - 1


def _matroska_segment_complete(path: str) -> bool | None:
    """Whether a Matroska/WebM file holds every byte its Segment declares: True, False (cut short),
    or None when it declares no size (written live) or does not start as Matroska does."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    i = 0
    for element in (b"\x1a\x45\xdf\xa3", b"\x18\x53\x80\x67"):  # the EBML header, then the Segment
        field = _ebml_size(head, i + 4) if head[i : i + 4] == element else None
        if field is None:
            return None
        n, width, unknown = field
        i += 4 + width
        if element == b"\x18\x53\x80\x67":
            return None if unknown else i + n <= size
        i += n
    return None


def _open_container(path: str) -> av.container.InputContainer:
    """Check ``path`` and open it with FFmpeg, mapping failures to the shared error types.

    FFmpeg gets ``file:<path>``, so that a name such as ``pipe:0`` or
    ``concat:a|b`` is read as the file it is, and options that keep it from
    opening anything else (see `_container_options`).
    """
    check_input_path(path)
    try:
        return av.open("file:" + path, mode="r", container_options=dict(_container_options()))
    except av.error.FileNotFoundError as exc:  # raced with deletion
        raise InputNotFound(f"expected an existing file, got {path} ({_ffmpeg_reason(exc)})") from exc
    except (av.error.PermissionError, av.error.IsADirectoryError) as exc:  # raced with a change
        raise InputUnreadable(f"expected a readable regular file, got {path} ({_ffmpeg_reason(exc)})") from exc
    except av.error.EOFError as exc:  # a recognised container that ends before any media data
        raise NoFrames(
            f"expected at least one decodable video frame in {path}, got 0 "
            f"(the file ends inside its header: {_ffmpeg_reason(exc)})"
        ) from exc
    except av.error.ArgumentError as exc:  # a demuxer that is not on the whitelist
        raise NotAVideo(
            f"expected a video or image file that FFmpeg can read, got {path} ({_ffmpeg_reason(exc)}: "
            "not a video container: playlists and other formats that name further files to read (HLS, ffconcat, SDP), and text files, are refused)"
        ) from exc
    except (av.FFmpegError, OSError, UnicodeError, ValueError, OverflowError) as exc:
        raise NotAVideo(
            f"expected a video or image file that FFmpeg can read, got {path} ({_ffmpeg_reason(exc)}{_mp4_hint(path)})"
        ) from exc


def _peek_frame(
    container: av.container.InputContainer,
    vs: av.video.stream.VideoStream,
    max_packets: int = 64,
    max_other_packets: int = 4096,
) -> av.VideoFrame | None:
    """The first frame the decoder gives for ``vs``, or None when none comes within
    ``max_packets`` of its packets (or ``max_other_packets`` of other streams': a
    video track whose data sits after hours of audio is not read twice).
    Reads the container: rewind it (or reopen the file) before decoding for real."""
    seen = other = 0
    try:
        for packet in container.demux():
            if packet.stream.index != vs.index:
                other += 1
                if other >= max_other_packets:
                    return None
                continue
            try:
                frames = packet.decode()  # the empty packet at the end drains the decoder
            except (av.FFmpegError, ValueError):
                frames = []
            if frames:
                return frames[0]
            seen += 1
            if seen >= max_packets:
                break
        frames = _drain(vs)
        return frames[0] if frames else None
    except (av.FFmpegError, OSError, ValueError):
        return None


#: the largest video frame (width x height) a file may hold: DCI 8K (8192 x 4320; UHD 8K, 7680 x 4320, is
#: under it). Each decoded frame is width x height x 1.5-3 bytes, and FFmpeg holds several: an 8192 x 8192
#: H.264 file cost the decoder 1.4 GB and 0.5 s of CPU a frame, whatever the model's input size.
MAX_PIXELS = 8192 * 4320
#: the largest still image: 8192 x 8192 (a 50 MP photo, 8000 x 6000, fits), decoded once; a 31 KB PNG of
#: 16000 x 16000 cost the decoder 1.1 GB. As a pushed live frame's (`deploy.serving.decode_image`).
MAX_IMAGE_PIXELS = 8192 * 8192


def _pixel_limit(max_pixels: int | None, is_image: bool) -> int:
    """`max_pixels`, or the default for the file's kind: `MAX_IMAGE_PIXELS` for a still image, else `MAX_PIXELS`."""
    if max_pixels is not None:
        return max_pixels
    return MAX_IMAGE_PIXELS if is_image else MAX_PIXELS


def _limit_words(max_pixels: int) -> str:
    return {MAX_PIXELS: " (8192x4320, DCI 8K)", MAX_IMAGE_PIXELS: " (8192x8192)"}.get(max_pixels, "")


def _check_pixels(path: str, width: int, height: int, max_pixels: int, what: str = "pictures") -> None:
    if width * height > max_pixels:
        raise PayloadTooLarge(f"expected {what} of at most {max_pixels} pixels{_limit_words(max_pixels)}, got "
                              f"{width}x{height} = {width * height} in {path}")


def _probe(path: str, container: av.container.InputContainer,
           max_pixels: int | None = None) -> tuple[VideoInfo, av.video.stream.VideoStream]:
    """Choose the video stream of an open container and describe it.

    Decodes the first frame (a display matrix travels with decoded frames) to
    give the upright size: the container is left somewhere in the file. A
    picture declared larger than ``max_pixels`` (None: `MAX_PIXELS` for a video,
    `MAX_IMAGE_PIXELS` for a still image) is refused before anything is decoded
    (`PayloadTooLarge`).
    """
    candidates = [s for s in container.streams.video if not _is_attached_picture(s)]
    if not candidates:
        found = _describe_streams(container)
        hint = _mp4_hint(path) if not container.streams else ""
        raise NoVideoStream(f"expected a video stream in {path}, got none (streams found: {found}{hint})")
    decodable = [s for s in candidates if s.codec_context is not None]
    if not decodable:
        raise NoVideoStream(
            f"expected a video stream that FFmpeg can decode in {path}, got none "
            f"(streams found: {_describe_streams(container)})"
        )
    default = [s for s in decodable if s.disposition & av.stream.Disposition.default]
    vs = (default or decodable)[0]
    ctx = vs.codec_context
    is_image = _is_image_container(container, vs)
    if is_image:
        duration, fps = 0.0, None  # one frame at 0 s: no length, whatever the sampling rate
    else:
        duration, video_specific = _stream_duration(container, vs)
        rate = vs.average_rate or vs.guessed_rate or vs.base_rate
        fps = float(rate) if rate else None
        if fps is not None and not (math.isfinite(fps) and fps > 0):
            fps = None
        if duration is not None and video_specific:      # the video's own length, from the file's start
            duration += _late_start(container, vs, fps)
    width, height = int(ctx.width or 0), int(ctx.height or 0)
    max_pixels = _pixel_limit(max_pixels, is_image)
    _check_pixels(path, width, height, max_pixels)          # as declared, before a frame is decoded
    first = _peek_frame(container, vs)
    if first is not None:
        width, height = int(first.width), int(first.height)
        _check_pixels(path, width, height, max_pixels)
        op = _frame_orientation(first, path, is_image)
        if op in ("clock", "cclock", "transpose", "antitranspose"):
            width, height = height, width
    info = VideoInfo(
        path=path,
        format_name=container.format.name,
        codec_name=ctx.name,
        duration_s=duration,
        source_fps=fps,
        width=width,
        height=height,
        is_image=is_image,
        stream_index=vs.index,
    )
    return info, vs


class _TimeSampler:
    """Decides which frames to keep: targets ``start + k / fps``, window ``[start, end)``."""

    def __init__(self, fps: float | None, start: float, end: float | None):
        self.fps, self.start, self.end = fps, start, end
        self._k = 0  # index of the next pending target

    def past_end(self, t: float) -> bool:
        """True once ``t`` lies at or after the (exclusive) window end."""
        return self.end is not None and t >= self.end - _TIME_EPS

    def wants(self, t: float) -> bool:
        """Whether the frame at ``t`` is the first one at or after the next pending target."""
        if t < self.start - _TIME_EPS or self.past_end(t):
            return False
        if self.fps is None:
            return True
        if t < self.start + self._k / self.fps - _TIME_EPS:
            return False
        # consume every target this frame satisfies (no duplicates across a VFR hole)
        self._k = math.floor((t - self.start) * self.fps + _TIME_EPS) + 1
        return True


class _Progress:
    """Progress in seconds of video on stderr, or nothing: a tqdm bar on a terminal; elsewhere (a log, a
    pipe, CI) one plain line at each tenth of the way, as a bar's carriage returns make no sense there."""

    def __init__(self, enabled: bool | str, start: float, stop: float | None):
        self._bar = None
        self._lines: tuple[str, float, float] | None = None   # (what, total, monotonic start) in line mode
        self._start, self._done, self._tenth = start, 0.0, 0
        if enabled and stop is not None and stop - start > _PROGRESS_MIN_DURATION_S:
            desc = enabled if isinstance(enabled, str) else "decoding video"
            total = round(stop - start, 1)
            if not _is_tty(sys.stderr):
                self._lines = (desc, total, time.monotonic())
                return
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                unit="s",
                desc=desc,
                file=sys.stderr,
                dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]",
            )

    def update(self, t: float) -> None:
        if self._bar is not None:
            done = min(max(t - self._start, 0.0), self._bar.total)
            if done > self._done:
                self._bar.update(done - self._done)
                self._done = done
        elif self._lines is not None:
            desc, total, _ = self._lines
            self._done = max(self._done, min(max(t - self._start, 0.0), total))
            tenth = int(10 * self._done / total) if total > 0 else 10
            if tenth > self._tenth and tenth < 10:           # 100 % is said once, by close()
                self._tenth = tenth
                self._line()

    def _line(self) -> None:
        desc, total, t0 = self._lines
        print(f"{desc}: {100 * self._done / total:3.0f}% ({self._done:.0f}/{total:.0f} s of video, "
              f"{time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._lines is not None:
            if self._done > 0:
                self._line()
            self._lines = None


def _is_tty(f) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):     # a replaced stream without isatty, a closed one
        return False


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


class VideoSource:
    """A validated video (or still image) that yields sampled `Frame`s when iterated.

    Args:
        path: a local file path (``str`` or ``os.PathLike``).
        fps: frames to sample per second of presentation time; ``None`` or
            ``0`` yields every decoded frame.  Ignored for still images.
        start: first presentation time (seconds) of the window; seeks there.
        end: exclusive end (seconds) of the window; ``None`` means to the end.
        progress: show progress on stderr (seconds of video decoded) when the
            window is known to be longer than 60 s: a tqdm bar on a terminal, else a
            plain line at each tenth; a string is its label (default "decoding
            video"; `stream.ingest` says "ingesting video", as the frames are
            encoded between reads).
        resize_to: if given, each sampled video frame is squashed to
            ``resize_to x resize_to`` as soon as it is decoded (after being put
            upright), with the very nearest-neighbour resize of
            `stream.preprocess.preprocess_video_frames` (same pixels, bit for
            bit), so only small frames are ever held.  Still images are not
            resized: they go through `preprocess_image`, which needs the whole
            picture.
        max_pixels: the largest picture (width x height) accepted, declared or
            decoded (default: `MAX_PIXELS`, DCI 8K, for a video, `MAX_IMAGE_PIXELS`,
            8192 x 8192, for a still image): a larger one raises `PayloadTooLarge`,
            on construction when the file declares it.

    Raises (on construction):
        BadArgument: invalid ``path`` type, ``fps``, ``start``, ``end`` or ``resize_to``.
        InputNotFound: ``path`` does not exist (or is a symbolic link to nothing).
        InputUnreadable: ``path`` is a folder, FIFO, socket, device, a symbolic
            link loop or a file without read permission (nothing blocks on it).
            A folder's error is also a `NotAVideo`.
        NotAVideo: FFmpeg cannot open ``path`` as a media file (text, empty,
            an MP4 cut off before its index, a playlist ...).
        NoVideoStream: the file has no video stream that FFmpeg can decode
            (audio only, cover art only, an unknown codec).
        NoFrames: the file is cut off inside its header (no media data at all).
        PayloadTooLarge: the file declares pictures over ``max_pixels``.

    Iterating raises `NoFrames` at the end if no frame at all could be
    sampled.  Each iteration re-reads the file from the start (or seeks to
    ``start``) and replaces `report`.  The source can be used as a context
    manager; the container of an unfinished iteration is closed on exit.

    Attributes:
        info: `VideoInfo` about the input (available right after construction).
        report: `DecodeReport` of the current / last iteration.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: float | None = 1.0,
        start: float | None = None,
        end: float | None = None,
        progress: bool | str = False,
        resize_to: int | None = None,
        max_pixels: int | None = None,
    ):
        self._container: av.container.InputContainer | None = None
        if not isinstance(path, (str, os.PathLike)):
            raise BadArgument(f"expected a file path (str or os.PathLike), got {type(path).__name__}")
        self.path = os.fspath(path)
        if not isinstance(self.path, str):
            raise BadArgument(f"expected a file path as str, got {type(self.path).__name__}")
        self.fps, self.start, self.end = _check_window(fps, start, end)
        self.progress = progress if isinstance(progress, str) and progress else bool(progress)
        self.resize_to = _check_resize_to(resize_to)
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                       or max_pixels < 1):
            raise BadArgument(f"expected max_pixels as an int >= 1, got {max_pixels!r}")
        container = _open_container(self.path)  # checks the path first
        try:
            self.info, _ = _probe(self.path, container, max_pixels)
        finally:
            container.close()  # probing decoded the first frame: iterations open their own
        if self.info.is_image and self.start:
            raise BadArgument(f"expected a window that starts at 0 s for a still image (its one frame is at 0 s), "
                              f"got one from {self.start:g} s ({self.path})")
        self.max_pixels = _pixel_limit(max_pixels, self.info.is_image)
        self.report = DecodeReport.from_info(self.info)
        self._unapplied: set[str] = set()  # orientations that could not be applied, reported once
        self._orient_by_rotation: dict[int, str | None] = {}  # frame.rotation -> how to put it upright
        self._around: list[float | None] = [None, None]  # the frames just before and just after the window

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Release any file handle held (validation closes its own now, as do iterations: kept for callers)."""
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the real API
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        extra = f", resize_to={self.resize_to}" if self.resize_to is not None else ""
        return f"VideoSource({self.path!r}, fps={self.fps}, start={self.start}, end={self.end}{extra})"

    # -- iteration ---------------------------------------------------------

    def __iter__(self) -> Iterator[Frame]:
        return self._frames()

    def _take_container(self) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
        container, self._container = self._container, None
        if container is None:
            container = _open_container(self.path)
        try:
            streams = container.streams
            i = self.info.stream_index
            vs = streams[i] if 0 <= i < len(streams) else None
            if vs is None or vs.type != "video" or vs.codec_context is None:
                raise NotAVideo(
                    f"expected {self.path} to hold the video stream #{i} found when it was opened, got "
                    f"{_describe_streams(container)} (the file changed?)"
                )
            return container, vs
        except BaseException:
            container.close()
            raise

    def _picture(self, frame: av.VideoFrame, report: DecodeReport, t: float) -> np.ndarray:
        """The upright RGB picture of ``frame`` (squashed to ``resize_to`` for videos).

        The full-size array lives only inside this call: what is returned for a
        resized frame is a new ``(S, S, 3)`` array that shares nothing with it.
        """
        rgb = frame.to_ndarray(format="rgb24")
        # PyAV's frame.side_data ties the frame into a reference cycle, so a frame whose side
        # data was listed lives until the garbage collector runs (dozens of 8K frames); the
        # rotation angle is read without that, and the side data only once per angle
        rotation = frame.rotation
        op = self._orient_by_rotation.get(rotation, "?")
        if op == "?":
            op = self._orient_by_rotation[rotation] = _frame_orientation(frame, self.path, self.info.is_image)
        if op is not None and op.startswith("rotate:"):
            if op not in self._unapplied:
                self._unapplied.add(op)
                report.add_error(
                    f"display rotation of {op[7:]} degrees clockwise at {t:.2f} s not applied (only multiples of 90 are)"
                )
            op = None
        if op is not None:
            rgb = _ORIENT[op](rgb)  # a view
        if self.resize_to is not None and not self.info.is_image:
            from .preprocess import resize_frame_nearest

            return resize_frame_nearest(rgb, self.resize_to)
        return np.ascontiguousarray(rgb) if op is not None else rgb

    def _frames(self) -> Iterator[Frame]:
        report = self.report = DecodeReport.from_info(self.info)
        self._unapplied, self._orient_by_rotation = set(), {}
        container, vs = self._take_container()
        try:
            if self.info.is_image:
                yield from self._image_frames(container, vs, report)
            else:
                yield from self._video_frames(container, vs, report)
        finally:
            container.close()
        if report.frames_sampled == 0:
            raise NoFrames(self._no_frames_message(report))

    def _no_frames_message(self, r: DecodeReport) -> str:
        where = self.path
        if self.start > 0 or self.end is not None:
            end = f"{self.end:g} s" if self.end is not None else "the end"
            where += f" between {self.start:g} s and {end}"
        details = []
        if r.packets_failed:
            details.append(f"{r.packets_failed} packets failed: {r.errors[0] if r.errors else 'decode error'}")
        details.append(f"{r.frames_decoded} frames decoded")
        if r.errors and not r.packets_failed:
            details.append(r.errors[0])
        duration = self.info.duration_s
        if (r.frames_decoded and not r.packets_failed and duration is not None and self.start >= duration
                and not self.info.is_image):               # an image's 0.0 is no length a start can pass
            details.append(f"start {self.start:g} s is past the duration {duration:.2f} s")
        elif None not in self._around and not r.packets_failed and not r.gaps:   # a hole in its timestamps
            details.append(f"the file has no frame from {self._around[0]:.2f} s to {self._around[1]:.2f} s")
        return f"expected at least one decodable video frame in {where}, got 0 ({'; '.join(details)})"

    def _image_frames(self, container, vs, report: DecodeReport) -> Iterator[Frame]:
        """A still image: the first decodable frame, at pts 0.0."""
        try:
            for packet in container.demux(vs):
                try:
                    frames = packet.decode()
                except (av.FFmpegError, ValueError) as exc:
                    report.packets_failed += 1
                    report.add_error(f"image data failed to decode: {_ffmpeg_reason(exc)}")
                    continue
                for frame in frames:
                    report.frames_decoded += 1
                    _check_pixels(self.path, frame.width, frame.height, self.max_pixels, "frames")  # as decoded
                    try:
                        rgb = self._picture(frame, report, 0.0)
                    except (av.FFmpegError, ValueError) as exc:
                        report.add_error(f"the image could not be converted to RGB: {_ffmpeg_reason(exc)}")
                        continue
                    report.frames_sampled += 1
                    yield Frame(index=0, pts=0.0, rgb=rgb)
                    return
        except (av.FFmpegError, OSError) as exc:
            report.add_error(f"reading the image failed: {_ffmpeg_reason(exc)}")

    def _video_frames(self, container, vs, report: DecodeReport) -> Iterator[Frame]:
        """Demux and decode packet by packet, sampling by presentation time.

        Damage bookkeeping: every piece of evidence (a packet the decoder
        rejects, a packet or frame flagged corrupt, a jump in decode timestamps
        right after such evidence or after bytes the demuxer skipped, a demuxer
        error) leaves a *damage point*: the presentation time of the lost
        content, or ``-inf`` when unknown.  Decoders emit frames late (B-frame
        reordering, frame threads), so a point is closed only by the first good
        frame *after* it, giving the gap ``(last good frame, that frame)``.
        Points still open at the end run to the declared end of the stream.

        Duration: frames past the declared end, or a whole file read that ends
        short of it with nothing missing, set ``report.duration_s`` from the
        frames (see `DecodeReport`).
        """
        vs.thread_type = "AUTO"  # frame + slice threads; frames still come out in pts order
        self._around = [None, None]
        tb = vs.time_base or Fraction(1, 1)
        origin = vs.start_time
        if origin is None and container.start_time is not None:
            origin = int(container.start_time / av.time_base / tb)
        origin = origin or 0
        late = _late_start(container, vs, self.info.source_fps)   # times on the file's (a player's) timeline
        origin -= round(late / tb)
        nominal = 1.0 / self.info.source_fps if self.info.source_fps else 1.0 / _FALLBACK_FPS
        slack = _end_slack(nominal)
        declared_end, video_specific = _stream_duration(container, vs)
        if declared_end is not None and video_specific:
            declared_end += late
        check_bytes = any(name in container.format.name for name in _CONTIGUOUS_FORMATS)

        def seconds(ts: int | None, time_base: Fraction | None = None) -> float | None:
            return None if ts is None else float((ts - origin) * (time_base or tb))

        sampler = _TimeSampler(self.fps, self.start, self.end)
        stop = self.end if self.end is not None else declared_end
        progress = _Progress(self.progress, self.start, stop)

        if self.start > 0:
            try:
                container.seek(origin + int(math.floor(self.start / tb)), stream=vs, backward=True, any_frame=False)
                vs.codec_context.flush_buffers()
            except (av.FFmpegError, OSError, OverflowError, ValueError) as exc:
                # unseekable input, or a target beyond what a timestamp can hold: decode from the start and skip
                report.add_error(f"seek to {self.start:g} s failed, decoding from the start: {_ffmpeg_reason(exc)}")

        last_good: float | None = None  # presentation time of the last good frame
        last_shown = nominal  # how long the last good frame shows, seconds (its own duration)
        header_wrong = False  # a frame lay past the declared end
        damage: list[float] = []  # open damage points (presentation times, -inf = unknown)
        suspect = 0  # packets left during which a decode-time jump counts as lost packets
        skipped = 0  # bytes the demuxer skipped before the current packet
        skip_bytes, skip_point = 0, None  # bytes skipped recently, and where the loss began
        prev_end: int | None = None  # byte offset just past the previous packet (any stream)
        prev_dts: float | None = None  # decode time of the previous video packet
        prev_dur = 0.0  # duration of the previous video packet, seconds
        max_pts = -math.inf  # latest presentation time among video packets read so far
        last_t: float | None = None  # last frame time (good or not), for pts estimates
        went_back, went_back_at = 0, (0.0, 0.0)  # frames skipped whose time went back; the first such jump
        went_back_most = 0.0  # the longest step back, seconds
        reached_end = False
        index = 0

        def close_gap(t_next: float) -> None:
            """Record damage as a gap from the last good frame to ``t_next`` (clipped to the window)."""
            a = max(last_good if last_good is not None else self.start, self.start)
            b = min(t_next, self.end) if self.end is not None else t_next
            if b > a:
                report.add_gap(a, b)

        demuxer = container.demux()
        demux_failed = False
        try:
            while not reached_end and not demux_failed:
                try:
                    packet = next(demuxer)
                except StopIteration:
                    break
                except (av.FFmpegError, OSError) as exc:  # truncated or unreadable tail: keep what was decoded
                    report.add_error(f"demuxing stopped after {max(max_pts, 0.0):.2f} s: {_ffmpeg_reason(exc)}")
                    damage.append(max_pts + nominal / 2 if max_pts > -math.inf else -math.inf)
                    demux_failed = True
                    frames = _drain(vs)  # frames still buffered in the decoder are good
                else:
                    pos, size = packet.pos, packet.size
                    if check_bytes and pos is not None and pos >= 0 and size:
                        if prev_end is not None and pos > prev_end + _BYTE_SKIP_SLACK:
                            skipped += pos - prev_end
                        prev_end = pos + size
                    if packet.stream.index != vs.index:
                        continue

                    p_pts = seconds(packet.pts if packet.pts is not None else packet.dts)
                    p_dts = seconds(packet.dts)
                    expected = prev_dur if prev_dur > 0 else nominal
                    # content read so far ends at max_pts; anything lost lies after it
                    lost_after = (max_pts if max_pts > -math.inf else (prev_dts or 0.0)) + expected / 2
                    if skipped:  # the demuxer resynced: whatever was lost lies before this packet
                        skip_bytes += skipped
                        skip_point = lost_after if skip_point is None else skip_point
                        suspect = _SUSPECT_PACKETS
                    if packet.is_corrupt:
                        report.add_error(f"corrupt packet near {p_pts if p_pts is not None else 0.0:.2f} s")
                        damage.append(p_pts if p_pts is not None else -math.inf)
                        suspect = _SUSPECT_PACKETS + 1
                    if (
                        suspect
                        and p_dts is not None
                        and prev_dts is not None
                        and p_dts - prev_dts > 1.5 * expected + _TIME_EPS
                    ):
                        # a jump in decode time right after evidence of damage: packets were lost
                        how = f"{skip_bytes} unreadable bytes skipped" if skip_bytes else "packets lost"
                        report.add_error(f"{how} between {prev_dts:.2f} s and {p_dts:.2f} s")
                        damage.append(skip_point if skip_point is not None else lost_after)
                        suspect = 0
                    if p_dts is not None:
                        prev_dts = p_dts
                    prev_dur = float(packet.duration * tb) if packet.duration else 0.0
                    if p_pts is not None:
                        max_pts = max(max_pts, p_pts)
                    skipped = 0
                    suspect = max(suspect - 1, 0)
                    if not suspect:
                        skip_point, skip_bytes = None, 0

                    try:
                        frames = packet.decode()  # an empty flush packet at the end drains the decoder
                    except (av.FFmpegError, ValueError) as exc:
                        report.packets_failed += 1
                        where = f"{p_pts:.2f} s" if p_pts is not None else "unknown time"
                        report.add_error(f"packet at {where} failed to decode: {_ffmpeg_reason(exc)}")
                        damage.append(p_pts if p_pts is not None else -math.inf)
                        suspect = _SUSPECT_PACKETS + 1
                        continue

                for frame in frames:
                    report.frames_decoded += 1
                    # a size that grew past the header's: refused as decoded, sampled or not
                    _check_pixels(self.path, frame.width, frame.height, self.max_pixels, "frames")
                    t = seconds(frame.pts, frame.time_base)
                    if t is None:  # no pts: fall back to the dts, else one interval after the previous frame
                        report.pts_estimated += 1
                        t = seconds(frame.dts, frame.time_base)
                        if t is None:
                            t = round(last_t + nominal, 6) if last_t is not None else 0.0  # no float drift
                        if report.pts_estimated == 1:
                            report.add_error(
                                f"frame without pts at about {t:.2f} s: time estimated from dts/frame rate"
                            )
                    last_t = t
                    if frame.is_corrupt:
                        report.frames_corrupt += 1
                        report.add_error(f"corrupt frame at {t:.2f} s skipped")
                        damage.append(t)
                        continue
                    if last_good is not None and t < last_good + _TIME_EPS:
                        # out of order (seen after damage), timestamps that start over (recordings joined end
                        # to end), a repeated one: time only moves forward; say how many frames that left out
                        if not went_back:
                            went_back_at = (last_good, t)
                        went_back += 1
                        went_back_most = max(went_back_most, last_good - t)
                        continue
                    if damage and min(damage) <= t + _TIME_EPS:
                        # from the last good frame to this one; none when they are neighbours (this frame
                        # at the damaged packet's own time came out after all: nothing between them is missing,
                        # and `[15, 16]` between two stored frames said a second of video was)
                        if last_good is None or t - last_good > 1.5 * nominal + _TIME_EPS:
                            close_gap(t)
                        damage = [p for p in damage if p > t + _TIME_EPS]
                    last_good = t
                    last_shown = _frame_seconds(frame, nominal)
                    if t < self.start:
                        self._around[0] = t  # the last frame before the window (an empty window's message)
                    if declared_end is not None and t > declared_end + nominal / 2:
                        if not header_wrong:
                            header_wrong = True
                            report.add_error(
                                f"frame at {t:.2f} s lies past the duration the file declares, {declared_end:.2f} s: "
                                "the header is wrong, the duration follows the frames"
                            )
                        report.duration_s = max(report.duration_s or 0.0, t + min(last_shown, slack))
                    progress.update(t)

                    if sampler.past_end(t):
                        self._around[1] = t  # the first frame after the window
                        reached_end = True
                        break
                    if not sampler.wants(t):
                        continue
                    try:
                        rgb = self._picture(frame, report, t)  # full size only inside the call
                    except (av.FFmpegError, ValueError) as exc:
                        report.add_error(f"frame at {t:.2f} s could not be converted to RGB: {_ffmpeg_reason(exc)}")
                        continue
                    report.frames_sampled += 1
                    yield Frame(index=index, pts=t, rgb=rgb)
                    index += 1
            if last_good is not None:  # the last frame covers one more frame interval
                progress.update(last_good + nominal)
        finally:
            progress.close()
            if went_back:
                # a step back of over a second is timestamps starting over (recordings joined end to end), not
                # the frames a decoder puts out of order after damage (a frame or two, a fraction of a second)
                hint = ("; a file joined from recordings that each start again needs its timestamps remade to be "
                        "read whole" if went_back_most > _JOIN_BACK_S else "")
                report.add_error(
                    f"{went_back} frame(s) skipped whose timestamps did not move forward (first from "
                    f"{went_back_at[0]:.2f} s to {went_back_at[1]:.2f} s): frames are taken in time order "
                    f"only{hint}", keep=True)

        if reached_end:
            return
        if damage:
            # damage that no good frame followed: the gap runs to the declared end
            # of the stream, or one frame interval when that is unknown
            tail = last_good if last_good is not None else self.start
            close_gap(declared_end if declared_end is not None and declared_end > tail else tail + nominal)
        elif last_good is not None and declared_end is None:
            report.duration_s = round(last_good + min(last_shown, slack), 6)  # nothing declared: the frames say it
        elif (
            video_specific
            and declared_end is not None
            and last_good is not None
            and declared_end - (last_good + last_shown) > slack  # a long last frame may reach it
            and (self.end is None or self.end > last_good + slack)
        ):
            # the frames end short of the declared end: a tail lost, or a wrong header (only a complete
            # Matroska segment tells them apart; an MP4's index gives FFmpeg its duration, a cut one
            # keeps its full index)
            if check_bytes and _matroska_segment_complete(self.path):
                report.duration_s = last_good + min(last_shown, slack)
                report.add_error(
                    f"video ended at {last_good:.2f} s with no frame missing, but the file declares "
                    f"{declared_end:.2f} s: the header is wrong, the duration is {report.duration_s:.2f} s"
                )
            else:
                report.add_error(
                    f"video ended at {last_good:.2f} s but the file declares {declared_end:.2f} s (truncated file?)"
                )
                close_gap(declared_end)


def open_video(
    path: str | os.PathLike[str],
    fps: float | None = 1.0,
    start: float | None = None,
    end: float | None = None,
    progress: bool = False,
    resize_to: int | None = None,
) -> VideoSource:
    """Validate ``path`` and return a `VideoSource`; see that class for arguments and errors."""
    return VideoSource(path, fps=fps, start=start, end=end, progress=progress, resize_to=resize_to)
