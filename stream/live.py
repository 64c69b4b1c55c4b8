"""Live video sources: RTSP cameras and frames pushed over a WebSocket.

Both sources look like `stream.decode.VideoSource` to the code that consumes them:
iterating yields `Frame(index, pts, rgb)` with ``pts`` in seconds of *stream time*
and ``rgb`` a ``(H, W, 3)`` uint8 RGB array (``(S, S, 3)`` with ``resize_to=S``,
squashed by `stream.preprocess.resize_frame_nearest` exactly as `VideoSource`
does).  Unlike a file they never end by themselves: iteration runs until `stop()`
(any thread), `close()` (a `PushSource` whose input is finished) or a permanent
failure.

* `RtspSource(url, fps=1.0, ...)`: one camera, read by a background thread with
  PyAV/FFmpeg over RTSP-over-TCP.  Network trouble never raises out of iteration:
  the source reconnects with a backoff, watches for stalls and records each
  outage in `gaps`.
* `PushSource(fps=1.0, ...)`: frames a client pushes, either one JPEG/PNG/WebP
  picture at a time (`push_image`) or consecutive chunks of one WebM / fragmented
  MP4 byte stream (`push_stream`), demuxed incrementally on a thread.  Bad data
  raises a clear `LmsError` from the ``push_*`` call; the source keeps working.

Common to both:

``status``
    ``"connecting"`` (no frame yet: "live" needs a decoded frame, for a `PushSource`
    a pushed one), ``"live"`` (frames flow), ``"stalled"`` (connected, but no frame
    for ``stall_after_s``; derived from the time of the last frame, so it shows even
    while the reading thread is blocked on a frozen camera; "live" again with the next
    frame), ``"reconnecting"`` (the connection was lost or could not be made; waiting
    out the backoff or opening again), ``"stopped"`` (`stop()`/`close()` was called)
    and ``"failed"`` (a permanent error, see ``last_error``; iteration has ended).
    A camera that freezes goes live -> stalled (after ``stall_after_s``, 5 s by
    default) -> reconnecting (when its read times out, about ``2 * read_timeout_s``,
    10 s) -> live (its next frame); one whose server dies goes live -> reconnecting at
    once.  A `PushSource` given ``stall_after_s`` is ``"stalled"`` once no frame was
    pushed for that long, until the next one.
``pts`` / stream time
    Seconds since the source's first frame (``0.0``), never going backwards, also
    across reconnects.  The camera's own timestamps are used while they behave;
    a missing pts (the first frame of every RTSP session has none) or a jump
    (backwards, or more than ``_PTS_JUMP_S`` away from the wall-clock time that
    passed) falls back to the wall clock and re-anchors the camera's timeline.
    `PushSource` takes the caller's pts as given (see there).
sampling
    Targets ``k / fps`` in stream time; each target takes the first frame at or
    after it, and one frame consumes every target it satisfies (no duplicates
    after an outage).  Frames between targets are skipped, counted as
    ``skipped_by_fps``: sampling, not loss, so never part of ``dropped``.
``gaps``
    Sorted ``(start_s, end_s)`` spans of stream time without frames: each outage
    (a lost connection or a stall, from the last frame before it to the first
    frame after it) and frames shed because the consumer was too slow.  While
    the source is ``reconnecting`` or ``stalled``, `status_dict` adds the outage
    going on, ``[start_s, None]`` (open at its end).
the queue
    Sampled frames wait in a bounded queue (``max_queue`` frames).  When it is
    full the *oldest* waiting frame is dropped (``dropped_why["queue_full"]``,
    and its span joins ``gaps``): a live consumer that falls behind should see
    the newest picture, not one that gets older and older.  Nothing is ever
    queued without bound.
``dropped``, ``dropped_why``
    Frames shed, by reason: ``queue_full`` (above), ``decode_error`` (a packet or
    picture that could not be decoded), ``pts_backwards`` (pushed with a pts before
    an earlier frame's).  Frames skipped by sampling are not shed and not counted
    here (``skipped_by_fps``; ``frames_received`` counts every frame the source
    delivered).
``frames``, ``last_pts``, ``lag_s``
    Frames yielded to the consumer so far, the pts of the last one, and how long the
    oldest frame still waiting in the queue has waited (0.0 while live with none
    waiting; None while not live with none waiting: no frame arrives to lag).
``last_error``, ``previous_error``
    ``last_error`` is ``{"code", "message"}`` of the problem that is current, or None:
    it is cleared by the next frame that arrives (a camera back after an outage, a good
    picture after a bad one) and kept as ``previous_error``; the outage itself stays in
    ``gaps``.
`stop()`
    Thread-safe and prompt: iteration ends within a fraction of a second (frames
    still waiting are discarded); an RTSP reading thread blocked on a frozen
    camera exits when its read times out (``read_timeout_s``) and closes its
    connection.  `status_dict()` gives everything above as one JSON-ready dict.
"""
from __future__ import annotations

import collections
import io
import math
import numbers
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence

import av
import av.error
import numpy as np

from lmcore.errors import BadArgument, InputNotFound, LmsError, NotAVideo, NoVideoStream, PayloadTooLarge
from lmcore.urls import redact_url  # the one redaction: here, in the service's records and messages

from .decode import MAX_IMAGE_PIXELS, MAX_PIXELS, Frame

__all__ = ["STATUSES", "RtspSource", "PushSource", "redact_url"]

#: Every value `status` can take.
STATUSES = ("connecting", "live", "stalled", "reconnecting", "stopped", "failed")

_TIME_EPS = 1e-6

#: A camera timestamp that moves this much more (or less) than the wall clock since
#: the previous frame is a jump: stream time re-anchors on the wall clock.
_PTS_JUMP_S = 5.0

#: Seconds without a frame after which a frame whose camera time hardly moved is one FFmpeg held back
#: (see `RtspSource._held_back`), not a sign that the camera is live.
_HELD_BACK_SILENCE_S = 1.0

#: The most a new connection's first frame is taken before it arrives (FFmpeg buffers while it probes
#: the stream): a silence of `elapsed` s between connections is at least `elapsed` minus this in stream time.
_REOPEN_LAG_S = 1.0

#: Step used for a pushed stream's frame without any timestamp.
_FALLBACK_STEP_S = 1 / 25

#: How long iteration waits on the queue between checks of `stop()` (seconds).
_POLL_S = 0.2

#: The codes `last_error` can carry besides the `lmcore.errors` ones.
E_SOURCE_UNREACHABLE = "E_SOURCE_UNREACHABLE"  # refused, unreachable, open timed out, other open failures
E_SOURCE_LOST = "E_SOURCE_LOST"  # the stream ended or broke while reading
E_SOURCE_TIMEOUT = "E_SOURCE_TIMEOUT"  # no data within read_timeout_s
E_SOURCE_STALLED = "E_SOURCE_STALLED"  # data but no decodable frame for too long
E_SOURCE_DENIED = "E_SOURCE_DENIED"  # 401/403 and other 4xx answers

#: getaddrinfo's answers that a host name does not exist (a permanent error); any other, EAI_AGAIN above
#: all (the DNS server did not answer this time), is retried
_DNS_NO_SUCH_NAME = frozenset(getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, n))

_IMAGE_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP"}
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
#: Bytes between consecutive Matroska packets beyond which the demuxer skipped damage
#: (block and cluster headers take a few dozen), as in `stream.decode`.
_BYTE_SKIP_SLACK = 1024
_MKV_CLUSTER_ID = b"\x1f\x43\xb6\x75"


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------


def _check_fps(fps) -> float | None:
    if fps is None:
        return None
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps) or fps < 0:
        raise BadArgument(f"expected fps to be None, 0 (every frame) or a positive finite number, got {fps!r}")
    return float(fps) or None


def _check_resize_to(resize_to) -> int | None:
    if resize_to is None:
        return None
    if isinstance(resize_to, bool) or not isinstance(resize_to, numbers.Integral) or resize_to <= 0:
        raise BadArgument(f"expected resize_to to be None or a positive integer (pixels), got {resize_to!r}")
    return int(resize_to)


def _check_seconds(name: str, value, *, allow_zero: bool = False) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value >= 0 if allow_zero else value > 0))
    if not ok:
        kind = "a non-negative" if allow_zero else "a positive"
        raise BadArgument(f"expected {name} to be {kind} finite number of seconds, got {value!r}")
    return float(value)


def _check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise BadArgument(f"expected {name} to be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_backoff(backoff) -> tuple[float, ...]:
    if isinstance(backoff, (str, bytes)) or not isinstance(backoff, Sequence) or not backoff:
        raise BadArgument(f"expected backoff to be a non-empty sequence of seconds, got {backoff!r}")
    return tuple(_check_seconds("each backoff delay", d, allow_zero=True) for d in backoff)


def _host_port(host: str, port: int) -> str:
    """``host:port`` as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_name_fault(exc: UnicodeError) -> str:
    """What the IDNA codec (getaddrinfo's, FFmpeg's) finds wrong with a host name, in its own words:
    "label empty or too long" for a label over 63 characters or an empty one (a..b)."""
    return str(exc).rsplit(": ", 1)[-1].rstrip(")")


def check_rtsp_url(url) -> str:
    """`url` if it is an rtsp:// or rtsps:// URL FFmpeg can take (no spaces or control characters, a host, a
    port in 1..65535), its scheme lowercased; else `BadArgument` saying what is wrong."""
    if not isinstance(url, str):
        raise BadArgument(f"expected an rtsp:// or rtsps:// URL (a str), got {type(url).__name__}")
    shown = redact_url(url)[:200]
    if len(url) > 4096 or any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise BadArgument(f"expected an rtsp:// or rtsps:// URL without spaces or control characters, got {shown!r}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number in 0..65535
    except ValueError as exc:
        raise BadArgument(f"expected an rtsp:// or rtsps:// URL, got {shown!r} ({exc})") from None
    if parts.scheme.lower() not in ("rtsp", "rtsps"):
        scheme = f"{parts.scheme}://" if parts.scheme else "no scheme"
        raise BadArgument(f"expected an rtsp:// or rtsps:// URL, got {scheme} in {shown!r}")
    if not parts.hostname:
        raise BadArgument(f"expected an rtsp:// or rtsps:// URL with a host name, got {shown!r}")
    if port == 0:
        raise BadArgument(f"expected a port in 1..65535, got 0 in {shown!r}")
    return parts.scheme.lower() + url[len(parts.scheme):]   # RTSP:// too: FFmpeg knows only rtsp://


def private_address(host: str) -> str | None:
    """The first address `host` resolves to that is not a public unicast one (loopback, private, link-local,
    shared 100.64/10, multicast, reserved), as text; None when every address is public. Raises `OSError`
    (or `UnicodeError`) when the name does not resolve. Asked by the service at POST and by a camera before
    each connection it opens, so that a host name whose DNS answer changes later (DNS rebinding) cannot
    turn a public camera into a request to the service's own network."""
    import ipaddress
    nat64 = ipaddress.ip_network("64:ff9b::/96")
    for info in socket.getaddrinfo(host, None):
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])   # an IPv6 scope ("fe80::1%eth0") dropped
        inner = [ip]
        if ip.version == 6:                          # IPv4 addresses inside IPv6 ones reach IPv4 hosts
            inner += [v4 for v4 in (ip.ipv4_mapped, ip.sixtofour, ip.teredo and ip.teredo[1],
                                    ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in nat64 else None) if v4]
        for a in inner:
            if not a.is_global or a.is_multicast:
                return str(ip)
    return None


def refuse_private(host: str, *, must_resolve: bool = False) -> None:
    """`PathNotAllowed` when `host` resolves to a private address (`private_address`). A name that does not
    resolve now is `BadArgument` with `must_resolve` (the service's POST), else let through: the camera's
    connection then fails on its own, with FFmpeg's reason, and is retried."""
    from lmcore.errors import PathNotAllowed
    try:
        ip = private_address(host)
    except (OSError, UnicodeError):
        if must_resolve:
            raise BadArgument(f"expected a resolvable camera host, got {host!r}") from None
        return
    if ip is not None:
        raise PathNotAllowed(f"expected a public camera address, got {host} ({ip}); private addresses need "
                             "allow_private_sources in the settings")


# ---------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------


class _Sampler:
    """Targets ``k / fps`` of stream time; `wants` looks, `take` consumes (so a frame that
    then fails to convert does not use up its target)."""

    def __init__(self, fps: float | None):
        self.fps = fps
        self._next: float | None = None  # the next pending target; None: the very first frame

    def wants(self, t: float) -> bool:
        return self.fps is None or self._next is None or t >= self._next - _TIME_EPS

    def take(self, t: float) -> None:
        if self.fps is not None:  # every target this frame satisfies is consumed
            self._next = (math.floor(t * self.fps + _TIME_EPS) + 1) / self.fps


class _StreamClock:
    """Source timestamps (seconds, or None) -> a stream time that starts at 0 and never goes back.

    ``offset`` maps the current connection's timeline onto stream time.  The first frame
    of a new connection (`new_source`) is placed by the wall clock: at the wall-clock time
    since the very first frame (``now - wall0``; an RTSP session starts with a burst of
    frames buffered while FFmpeg probed it, so stream time runs ahead of that by about one
    burst, and re-anchoring here keeps that lead from growing at every reconnect), never
    before the previous frame plus the wall-clock silence since it (less `_REOPEN_LAG_S`, the
    time a first frame may wait in FFmpeg's probe), so that a lead longer than an outage does
    not swallow it: such a reconnect shortens the lead by that second instead of dropping
    it.  Within a connection the source's timestamps are followed
    unless one is missing (the wall clock fills in) or jumps: backwards, more than
    ``_PTS_JUMP_S`` away from the wall-clock time elapsed since the previous frame, or,
    after a stall of ``stall_s`` or more, more than a second short of it (a camera that
    froze and resumed its timestamps where they stopped); the timeline then re-anchors at
    the previous frame plus the elapsed wall-clock time.  ``wall_check=False`` (pushed
    streams, which need not arrive in real time) only re-anchors on backward steps.
    """

    def __init__(self, wall_check: bool = True, stall_s: float | None = None):
        self.wall_check = wall_check
        self.stall_s = stall_s
        self.offset: float | None = None
        self.last_t: float | None = None
        self.last_wall: float | None = None
        self.wall0: float | None = None
        self.rebased = 0

    def new_source(self) -> None:
        """A new connection / byte stream: its timestamps start over."""
        self.offset = None

    def time(self, src_t: float | None, now: float, held_back: bool = False) -> float:
        """Stream time of a frame with source time ``src_t`` that arrived at ``now``. ``held_back``: the
        frame is one FFmpeg held back (`RtspSource._held_back`), so its arrival says nothing about when it
        was taken: it follows the source's time (never backwards) with no wall-clock check, and the wall
        time it was taken is estimated from that, so the next frame measures the silence from there."""
        if held_back and src_t is not None and self.offset is not None and self.last_t is not None:
            t = max(src_t + self.offset, self.last_t)
            self.last_t, self.last_wall = t, self.last_wall + (t - self.last_t)
            return t
        if self.last_t is None:
            t = 0.0
            self.wall0 = now
            self.offset = -src_t if src_t is not None else None
        else:
            elapsed = max(now - self.last_wall, 0.0)
            if not self.wall_check:
                by_wall = self.last_t + _FALLBACK_STEP_S
            else:
                by_wall = self.last_t + elapsed
            if self.offset is None:  # the first frame of a new connection / stream
                if self.wall_check:
                    # by the wall clock since the very first frame (dropping the lead an opening burst gave),
                    # but an outage stays one: with a lead longer than the silence, the first frame was
                    # put at the last one's time and a camera outage vanished from `gaps`
                    t = max(now - self.wall0, self.last_t + max(elapsed - _REOPEN_LAG_S, 0.0))
                else:
                    t = self.last_t + max(elapsed, _FALLBACK_STEP_S)
                if src_t is not None:
                    self.offset = t - src_t
            elif src_t is None:
                t = by_wall
            else:
                t = src_t + self.offset
                step = t - self.last_t
                jump = step < -_TIME_EPS
                if self.wall_check and not jump:
                    stalled = self.stall_s is not None and elapsed >= self.stall_s
                    jump = abs(step - elapsed) > _PTS_JUMP_S or (stalled and step < elapsed - 1.0)
                if jump:
                    t = by_wall
                    self.offset = t - src_t
                    self.rebased += 1
            t = max(t, self.last_t)
        self.last_t, self.last_wall = t, now
        return t


def _merge_gap(gaps: list[tuple[float, float]], a: float, b: float) -> list[tuple[float, float]]:
    """``gaps`` plus ``(a, b)``, overlapping spans merged (as `DecodeReport.add_gap`)."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return gaps
    a, b = min(a, b), max(a, b)
    merged: list[tuple[float, float]] = []
    for x, y in sorted([*gaps, (a, b)]):
        if merged and x < merged[-1][1] - _TIME_EPS:
            merged[-1] = (merged[-1][0], max(merged[-1][1], y))
        else:
            merged.append((x, y))
    return merged


def _reason(exc: BaseException) -> str:
    """FFmpeg's words for an error, without the ``[Errno N]`` prefix and the URL."""
    if isinstance(exc, av.FFmpegError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


class _LiveSource:
    """State and iteration shared by the live sources (not used directly)."""

    _name = "live source"

    def __init__(self, fps, resize_to, max_queue, clock: Callable[[], float], stall_after_s: float | None):
        self.fps = _check_fps(fps)
        self.resize_to = _check_resize_to(resize_to)
        self.max_queue = _check_count("max_queue", max_queue)
        if not callable(clock):
            raise BadArgument(f"expected clock to be a callable returning seconds, got {clock!r}")
        self._clock = clock
        self._stall_after_s = stall_after_s
        self._cond = threading.Condition(threading.RLock())
        self._queue: collections.deque[tuple[float, np.ndarray, float]] = collections.deque()
        #: `clock` time at which the frame iteration yielded last arrived (was queued): its consumer's lag
        self.yielded_arrival: float | None = None
        self._sampler = _Sampler(self.fps)
        self._sclock = _StreamClock(wall_check=True, stall_s=stall_after_s)
        self._status = "connecting"
        self._gaps: list[tuple[float, float]] = []
        self._frames = 0
        self._index = 0
        self._last_pts: float | None = None
        self._before_head: float | None = None  # pts of the frame before the queue's head (for drop gaps)
        self._last_error: dict | None = None
        self._previous_error: dict | None = None  # last_error as it was when frames came back
        self._dropped: dict[str, int] = {}  # frames shed, by reason (never sampling: see _skipped)
        self._skipped = 0  # frames between sampling targets
        self._frames_in = 0  # frames received from the source (before sampling)
        self._last_frame_wall: float | None = None
        self._epoch_s: float | None = None  # time.time() of stream time 0
        self._ended = False  # no more input: iteration ends once the queue is empty
        self._stopped = False
        self._iterating = False

    # -- what a caller reads (any thread) ------------------------------------------
    @property
    def status(self) -> str:
        with self._cond:
            return self._status_now()

    def _status_now(self) -> str:
        s = self._status
        if (s == "live" and self._stall_after_s is not None and self._last_frame_wall is not None
                and self._clock() - self._last_frame_wall > self._stall_after_s):
            return "stalled"
        return s

    @property
    def gaps(self) -> list[tuple[float, float]]:
        with self._cond:
            return list(self._gaps)

    @property
    def frames(self) -> int:
        with self._cond:
            return self._frames

    @property
    def last_pts(self) -> float | None:
        with self._cond:
            return self._last_pts

    @property
    def last_error(self) -> dict | None:
        with self._cond:
            return dict(self._last_error) if self._last_error else None

    @property
    def dropped(self) -> int:
        """Frames shed so far, for every reason (see `dropped_why`); not those skipped by sampling."""
        with self._cond:
            return sum(self._dropped.values())

    @property
    def dropped_why(self) -> dict[str, int]:
        """Shed frames by reason: ``queue_full`` (the consumer was too slow: the oldest waiting
        frame went), ``pts_backwards`` (pushed with a pts before an earlier frame's),
        ``decode_error`` (a packet or picture that could not be decoded)."""
        with self._cond:
            return dict(self._dropped)

    @property
    def skipped_by_fps(self) -> int:
        """Frames between sampling targets (a 10 fps camera sampled at 1 fps skips 9 in 10)."""
        with self._cond:
            return self._skipped

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def status_dict(self) -> dict:
        """Everything a status route shows, JSON-ready (see the module's docstring): ``status``,
        ``frames``, ``last_pts``, ``lag_s``, ``gaps``, ``last_error``, ``previous_error``,
        ``dropped``, ``dropped_why``, ``skipped_by_fps``, ``queued``, ``frames_received``,
        ``fps``, ``epoch_s`` (Unix time of stream time 0)."""
        with self._cond:
            now = self._clock()
            status = self._status_now()
            if self._queue:
                lag = round(max(now - self._queue[0][2], 0.0), 3)
            else:
                lag = 0.0 if status == "live" else None
            gaps = [[a, b] for a, b in self._gaps]
            if status in ("reconnecting", "stalled") and self._last_pts is not None:
                # the outage going on: open (None end) until a frame closes it as a gap; it was in no
                # answer and no record until the camera came back
                start = getattr(self, "_outage_from", None)
                gaps.append([start if start is not None else self._last_pts, None])
            return {
                "status": status,
                "frames": self._frames,
                "last_pts": self._last_pts,
                "lag_s": lag,
                "gaps": gaps,
                "last_error": dict(self._last_error) if self._last_error else None,
                "previous_error": dict(self._previous_error) if self._previous_error else None,
                "dropped": sum(self._dropped.values()),
                "dropped_why": dict(self._dropped),
                "skipped_by_fps": self._skipped,
                "queued": len(self._queue),
                "frames_received": self._frames_in,
                "fps": self.fps,
                "epoch_s": self._epoch_s,
                **self._extra_status(),
            }

    def _extra_status(self) -> dict:
        return {}

    # -- ending ----------------------------------------------------------------------
    def stop(self) -> None:
        """End iteration promptly (thread-safe, idempotent); frames still waiting are discarded."""
        with self._cond:
            self._stopped = True
            self._queue.clear()
            if self._status != "failed":
                self._status = "stopped"
            self._cond.notify_all()
        self._on_stop()

    def _on_stop(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- iteration ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[Frame]:
        with self._cond:
            if self._iterating:
                raise BadArgument(f"expected one consumer of this {self._name}, got a second iteration")
            self._iterating = True
        self._start()
        return self._iterate()

    def _start(self) -> None:
        pass

    def _iterate(self) -> Iterator[Frame]:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stopped and not self._ended:
                        self._cond.wait(_POLL_S)
                    if self._stopped or not self._queue:
                        return
                    pts, rgb, self.yielded_arrival = self._queue.popleft()
                    self._cond.notify_all()             # room: a producer waiting for it goes on
                    frame = Frame(index=self._index, pts=pts, rgb=rgb)
                    self._index += 1
                    self._frames += 1
                    self._last_pts = self._before_head = pts
                yield frame
        finally:
            with self._cond:
                self._iterating = False

    # -- for the producers (hold self._cond) ---------------------------------------------
    def _drop(self, why: str, n: int = 1) -> None:
        self._dropped[why] = self._dropped.get(why, 0) + n

    def _add_gap(self, a: float, b: float) -> None:
        if b - a > _TIME_EPS:
            self._gaps = _merge_gap(self._gaps, a, b)

    def _set_error(self, err: LmsError) -> None:
        self._last_error = err.to_dict()

    def _mark_live(self, now: float) -> None:
        """A frame arrived: the source is live (again) and the problem before it is over."""
        self._last_frame_wall = now
        if self._status in ("stopped", "failed"):  # a frame decoded after stop() ends nothing, its error stays
            return
        self._status = "live"
        if self._last_error is not None:
            self._previous_error, self._last_error = self._last_error, None

    def _enqueue(self, t: float, rgb: np.ndarray, now: float) -> None:
        """Queue a sampled frame; when full, the oldest waiting frame is dropped (and its span is a gap)."""
        if self._stopped:
            return
        if len(self._queue) >= self.max_queue:
            old_t = self._queue.popleft()[0]
            self._drop("queue_full")
            if self._before_head is None:  # nothing yielded yet: the span starts at the dropped frame
                self._before_head = old_t
            after = self._queue[0][0] if self._queue else t
            self._add_gap(min(self._before_head, old_t), after)
        self._queue.append((t, rgb, now))
        self._cond.notify_all()

    def _picture(self, frame: av.VideoFrame) -> np.ndarray:
        return self._shrink(frame.to_ndarray(format="rgb24"))

    def _shrink(self, rgb: np.ndarray) -> np.ndarray:
        if self.resize_to is None:
            return rgb
        from .preprocess import resize_frame_nearest

        return resize_frame_nearest(rgb, self.resize_to)


# ---------------------------------------------------------------------------
# RTSP
# ---------------------------------------------------------------------------


class _Disconnected(Exception):
    """The packet loop of one connection ended; carries the error to record."""

    def __init__(self, err: LmsError):
        super().__init__(err.message)
        self.err = err


class RtspSource(_LiveSource):
    """One RTSP camera, sampled at ``fps`` frames per second of stream time.

    Args:
        url: ``rtsp://`` or ``rtsps://`` (credentials in the URL are never shown:
            messages and `status_dict` carry it redacted).
        fps: frames per second to yield (None or 0: every frame).
        resize_to: squash every yielded frame to ``S x S`` (as `VideoSource`).
        open_timeout_s: longest wait for one connection to open (RTSP handshake and
            FFmpeg's probing; about 1.5-3 s on a healthy loopback camera).
        read_timeout_s: longest wait for data on an open connection: FFmpeg's socket
            timeout (``options={"timeout": microseconds}``; ``stimeout`` is ignored by
            current FFmpeg) and PyAV's read interrupt.  A frozen camera raises after
            about twice this and is then reconnected.
        stall_after_s: no frame for this long -> status ``"stalled"``.  Keep it below
            ``2 * read_timeout_s``, when a frozen camera's read times out and the status
            turns ``"reconnecting"``, else a frozen camera never shows as stalled (the
            defaults: stalled after 5 s, reconnecting after about 10 s).
        backoff: seconds to wait before each reconnect attempt in a row (the last value
            repeats); back to the first once frames flow again.
        clock: monotonic seconds (for stall detection, wall-clock fallback, ``lag_s``).
        max_queue: sampled frames that may wait for the consumer (oldest dropped first).
        give_up_after: this many *permanent* errors in a row (404 no such stream, 401/403,
            a host name that does not exist or is not a valid one, no video in the stream, a
            protocol FFmpeg lacks) -> status ``"failed"``.  Transient trouble (refused, reset,
            timed out, the server gone, a temporary DNS failure) is retried forever.
        no_frame_timeout_s: a connection that delivers data but no decodable frame for this
            long is dropped and reopened (None: ``read_timeout_s + 20``, 25 s by default).
            Keep it above a camera's longest keyframe interval: a connection joins
            mid-GOP and decodes nothing before the next keyframe.  Not tied to
            ``stall_after_s``, which only changes what the status shows.
        allow_private: False: before each connection the host is resolved and a loopback,
            private, link-local or shared address is refused (`PathNotAllowed`, a permanent
            error), as the service refuses it at ``POST /v1/streams``; the service passes
            its ``allow_private_sources`` setting.  FFmpeg resolves the name again itself
            right after, so the check narrows DNS rebinding to that moment; and FFmpeg
            follows a camera server's RTSP redirect (301/302) unchecked: hard isolation
            is the network's (an egress firewall), not this check's.

    Raises:
        BadArgument: a URL that is not ``rtsp://``/``rtsps://`` with a host, or an
            invalid number.

    The reading thread starts on the first iteration (or `start()`); iteration ends
    only after `stop()` or a permanent failure, never with an exception for network
    trouble.  `status_dict()` adds ``url`` (redacted), ``reconnects`` (connection
    attempts after the first), ``decode_errors`` (packets the decoder rejected, e.g.
    before the first keyframe) and ``pts_rebased`` (times the camera's timestamps
    jumped and stream time re-anchored on the wall clock).
    """

    _name = "RtspSource"

    def __init__(self, url: str, fps: float | None = 1.0, resize_to: int | None = None,
                 open_timeout_s: float = 15.0, read_timeout_s: float = 5.0, stall_after_s: float = 5.0,
                 backoff: Sequence[float] = (1, 2, 5, 10, 30), clock: Callable[[], float] = time.monotonic,
                 *, max_queue: int = 16, give_up_after: int = 5, no_frame_timeout_s: float | None = None,
                 allow_private: bool = True):
        self.url = check_rtsp_url(url)
        self.allow_private = bool(allow_private)
        self.open_timeout_s = _check_seconds("open_timeout_s", open_timeout_s)
        self.read_timeout_s = _check_seconds("read_timeout_s", read_timeout_s)
        self.stall_after_s = _check_seconds("stall_after_s", stall_after_s)
        self.backoff = _check_backoff(backoff)
        self.give_up_after = _check_count("give_up_after", give_up_after)
        self.no_frame_timeout_s = (self.read_timeout_s + 20.0 if no_frame_timeout_s is None
                                   else _check_seconds("no_frame_timeout_s", no_frame_timeout_s))
        super().__init__(fps, resize_to, max_queue, clock, self.stall_after_s)
        self._shown_url = redact_url(url)
        self._stop_evt = threading.Event()
        self._thread: threading.Thread | None = None
        self._outage_from: float | None = None  # stream time of the last frame before a lost connection
        self._reconnects = 0
        self._decode_errors = 0
        self._last_arrival: tuple[float | None, float] | None = None  # (camera time, clock) of the last frame
        self._stale_run = 0  # frames in a row that look held back (see _on_frame)

    def __repr__(self) -> str:
        return f"RtspSource({self._shown_url!r}, fps={self.fps}, status={self.status!r}, frames={self.frames})"

    def _extra_status(self) -> dict:
        return {"url": self._shown_url, "reconnects": self._reconnects, "decode_errors": self._decode_errors,
                "pts_rebased": self._sclock.rebased}

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> "RtspSource":
        """Start the reading thread (iteration does this itself); idempotent."""
        with self._cond:
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name=f"rtsp {self._shown_url}", daemon=True)
                self._thread.start()
        return self

    _start = start

    def close(self) -> None:
        """The same as `stop`."""
        self.stop()

    def _on_stop(self) -> None:
        self._stop_evt.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the reading thread to exit (after `stop` or a failure); True once it has."""
        t = self._thread
        if t is None:
            return True
        t.join(timeout)
        return not t.is_alive()

    # -- the reading thread -----------------------------------------------------------
    def _run(self) -> None:
        failures = 0  # connection attempts in a row that ended without a frame
        permanent = 0  # permanent errors in a row
        try:
            while not self._stop_evt.is_set():
                frames_before = self._frames_in
                err, is_permanent = self._connect_and_read()
                if self._stop_evt.is_set():
                    break
                got_frames = self._frames_in > frames_before
                if got_frames:
                    failures, permanent = 0, 0
                permanent = permanent + 1 if is_permanent else 0
                with self._cond:
                    if self._stopped:
                        break
                    self._set_error(err)
                    if self._sclock.last_t is not None and self._outage_from is None:
                        self._outage_from = self._sclock.last_t
                    if permanent >= self.give_up_after:
                        self._status = "failed"
                        self._ended = True
                        self._cond.notify_all()
                        return
                    if self._status != "stopped":
                        self._status = "reconnecting"
                delay = self.backoff[min(failures, len(self.backoff) - 1)]
                failures += 1
                if self._stop_evt.wait(delay):
                    break
                self._reconnects += 1
        except BaseException as exc:  # a bug of ours: fail visibly, never hang the consumer
            with self._cond:
                self._last_error = {"code": "E_INTERNAL",
                                    "message": f"RTSP reader crashed: {type(exc).__name__}: {exc}"}
                self._status = "failed"
                self._ended = True
                self._cond.notify_all()
            raise

    def _open(self):
        options = {
            "rtsp_transport": "tcp",
            "timeout": str(int(self.read_timeout_s * 1_000_000)),  # socket I/O timeout, microseconds
            "allowed_media_types": "video",
        }
        return av.open(self.url, mode="r", options=options, timeout=(self.open_timeout_s, self.read_timeout_s))

    def _connect_and_read(self) -> tuple[LmsError, bool]:
        """One connection: open, read until it ends; returns the error that ended it and
        whether that error is permanent."""
        if not self.allow_private:
            try:
                # again at every connection: the name may resolve elsewhere now than at POST
                refuse_private(urllib.parse.urlsplit(self.url).hostname or "")
            except LmsError as exc:
                return exc, True
        try:
            container = self._open()
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, none escapes
            return self._classify(exc, opening=True)
        try:
            if self._stop_evt.is_set():
                return LmsError("stopped", code=E_SOURCE_LOST), False
            if not container.streams.video:
                kinds = ", ".join(s.type for s in container.streams) or "no streams"
                return NoVideoStream(f"expected a video stream at {self._shown_url}, got {kinds}"), True
            vs = container.streams.video[0]
            with self._cond:
                self._sclock.new_source()
                self._last_arrival, self._stale_run = None, 0
            try:
                self._read(container, vs)
            except _Disconnected as d:
                return d.err, False
            except Exception as exc:  # noqa: BLE001
                return self._classify(exc, opening=False)
            return LmsError(f"expected {self._shown_url} to keep streaming, got the connection closed by the "
                            "server (end of the stream)", code=E_SOURCE_LOST), False
        finally:
            try:
                container.close()
            except Exception:  # noqa: BLE001 - a broken connection may not close cleanly
                pass

    def _read(self, container, vs) -> None:
        opened_at = self._clock()
        limit = self.no_frame_timeout_s
        for packet in container.demux(vs):
            if self._stop_evt.is_set():
                return
            try:
                frames = packet.decode()
            except (av.FFmpegError, ValueError):
                self._decode_errors += 1  # e.g. joining mid-GOP: P-frames before the first keyframe
                frames = ()
            for frame in frames:
                self._on_frame(frame, vs.time_base)
            now = self._clock()
            # the last frame decoded on this connection, held back or not: frames that decode are no case for
            # reopening it, even when their timestamps make them look held back (a slow or broken camera clock)
            last = self._last_arrival[1] if self._last_arrival is not None else opened_at
            if now - last > limit:
                raise _Disconnected(LmsError(
                    f"expected a decodable frame from {self._shown_url} at least every {limit:g} s, got none for "
                    f"{now - last:.1f} s (data arrives but does not decode)", code=E_SOURCE_STALLED))

    def _on_frame(self, frame: av.VideoFrame, stream_tb) -> None:
        now = self._clock()
        tb = frame.time_base or stream_tb
        src_t = float(frame.pts * tb) if frame.pts is not None and tb else None
        with self._cond:
            prev_t, prev_wall = self._sclock.last_t, self._last_frame_wall
            # decided before the frame is timed: a held-back frame arrives read_timeout_s late, and timing it
            # by its arrival would move the picture (and the start of the outage after it) seconds later.
            # Only the first such frame in a row is held back: FFmpeg holds back one frame, so a second one
            # means frames keep coming whose camera clock runs slow (a timelapse, a broken RTP clock)
            self._stale_run = self._stale_run + 1 if self._held_back(src_t, now) else 0
            stale = self._stale_run == 1
            t = self._sclock.time(src_t, now, held_back=stale)
            self._frames_in += 1
            if prev_t is None:
                self._epoch_s = time.time()
            self._last_arrival = (src_t, now)
            if not stale:
                outage_from = self._outage_from
                if outage_from is None and prev_wall is not None and now - prev_wall > self.stall_after_s:
                    outage_from = prev_t  # a stall on a connection that survived it
                if outage_from is not None:
                    self._add_gap(outage_from, t)
                    self._outage_from = None
                self._mark_live(now)
            if not self._sampler.wants(t):
                self._skipped += 1
                return
        try:
            rgb = self._picture(frame)
        except (av.FFmpegError, ValueError):
            with self._cond:
                self._drop("decode_error")
            return
        with self._cond:
            self._sampler.take(t)
            self._enqueue(t, rgb, now)

    def _held_back(self, src_t: float | None, now: float) -> bool:
        """Whether a frame is old news: FFmpeg's RTSP demuxer holds a camera's last frame until the next
        packet or a read timeout, so a camera that froze delivers the frame it sent before freezing
        ``read_timeout_s`` later.  Such a frame comes after ``_HELD_BACK_SILENCE_S`` or more without
        frames and its camera time moved on by less than half that silence; it is yielded (it is a real
        picture, at its own time) but is no sign of life: the status stays stalled.  A camera that resumes
        with its timestamps where they stopped is live with its second frame (`_on_frame` counts only the
        first of such frames in a row as held back)."""
        prev = self._last_arrival
        if prev is None or prev[0] is None or src_t is None:
            return False
        silence = now - prev[1]
        return silence >= _HELD_BACK_SILENCE_S and src_t - prev[0] < silence / 2

    def _classify(self, exc: BaseException, opening: bool) -> tuple[LmsError, bool]:
        """(the error to record, whether it is permanent) for an exception from PyAV, as "expected ..., got
        ..." in plain words: "expected a connection to URL, got connection refused (nothing listens on H:P)",
        "expected the RTSP server of URL to serve the path /cam, got 404 Not Found", "expected data from URL
        at least every 5 s, got none for 5 s (timed out)"."""
        url = self._shown_url
        why = _reason(exc)
        served = f"expected the RTSP server of {url}"
        if isinstance(exc, av.error.HTTPNotFoundError):
            path = urllib.parse.urlsplit(self.url).path or "/"
            return InputNotFound(f"{served} to serve the path {path}, got 404 Not Found"), True
        if isinstance(exc, av.error.HTTPUnauthorizedError):
            creds = urllib.parse.urlsplit(self.url).username is not None
            return LmsError(f"{served} to let this source in, got 401 Unauthorized ("
                            + ("it refused the user and password in the URL)" if creds else
                               "it wants a user and password: rtsp://USER:PASSWORD@HOST/PATH)"),
                            code=E_SOURCE_DENIED), True
        if isinstance(exc, av.error.HTTPForbiddenError):
            return LmsError(f"{served} to let this source in, got 403 Forbidden", code=E_SOURCE_DENIED), True
        if isinstance(exc, av.error.HTTPClientError):
            return LmsError(f"{served} to accept the request, got a refusal ({why})", code=E_SOURCE_DENIED), True
        if isinstance(exc, av.error.ProtocolNotFoundError):
            scheme = url.split(":", 1)[0]
            return LmsError(f"expected an FFmpeg that reads {scheme}:// (for {url}), got one without it ({why})",
                            code=E_SOURCE_UNREACHABLE), True
        if not opening:
            if isinstance(exc, (TimeoutError, av.error.ExitError)):
                return LmsError(f"expected data from {url} at least every {self.read_timeout_s:g} s, got none for "
                                f"{self.read_timeout_s:g} s (timed out)", code=E_SOURCE_TIMEOUT), False
            if not isinstance(exc, (av.FFmpegError, OSError, ValueError)):
                raise exc  # not a network or media error: a bug of ours
            return LmsError(f"expected {url} to keep streaming, got the stream broken off ({why})",
                            code=E_SOURCE_LOST), False
        if isinstance(exc, ConnectionRefusedError):
            return LmsError(f"expected a connection to {url}, got connection refused (nothing listens on "
                            f"{_host_port(*self._address())})", code=E_SOURCE_UNREACHABLE), False
        if not isinstance(exc, (av.FFmpegError, OSError, ValueError, TimeoutError)):
            raise exc  # not a network or media error: a bug of ours
        # FFmpeg's RTSP demuxer says "Invalid data found when processing input" (or times out, or EIO) for
        # most failures to open; a plain look at the host and port says which one it was. Not after stop():
        # the look may take open_timeout_s + read_timeout_s, and stop() frees the thread sooner
        if self._stop_evt.is_set():
            expected, got, permanent = f"{url} to open", None, False
        else:
            expected, got, permanent = self._probe()
        if got is None:
            # rtsps://: the probe made a TCP connection only; rtsp://: the server answered its OPTIONS
            answered = ("the RTSP server answered" if urllib.parse.urlsplit(self.url).scheme.lower() == "rtsp"
                        else "the server accepted a connection")
            if isinstance(exc, (TimeoutError, av.error.ExitError)):
                expected = f"{url} to open within {self.open_timeout_s:g} s"
                got = f"no stream in that time ({answered}; timed out)"
            else:
                expected, got = f"a readable video stream from {url}", f"{why} ({answered})"
        msg = f"expected {expected}, got {got}"
        if permanent:
            return InputNotFound(msg), True
        return LmsError(msg, code=E_SOURCE_UNREACHABLE), False

    def _address(self) -> tuple[str, int]:
        """The camera's host and port: the URL's, else the scheme's default (rtsp 554, rtsps 322)."""
        parts = urllib.parse.urlsplit(self.url)
        return parts.hostname or "", parts.port or (322 if parts.scheme.lower() == "rtsps" else 554)

    def _probe(self) -> tuple[str, str | None, bool]:
        """(what was expected, what happened in words or None, permanent) from a plain TCP connection to the
        camera's host and port, with the source's timeouts, and an RTSP OPTIONS request on it: refused, timed
        out, unreachable, a host name that does not exist or cannot be one (permanent) or that could not be
        looked up this time, a server that says nothing, closes at once or is not RTSP. None when the server
        answers RTSP (or accepts a connection: rtsps://, whose TLS the probe does not speak): the failure lies
        further on. Runs only after a failed open, so it costs a reconnect at most its timeouts more."""
        parts = urllib.parse.urlsplit(self.url)
        host, port = self._address()
        hostport = _host_port(host, port)
        connect = f"a connection to {self._shown_url}"
        try:
            sock = socket.create_connection((host, port), timeout=self.open_timeout_s)
        except socket.gaierror as exc:
            said = exc.strerror or str(exc)
            if exc.errno in _DNS_NO_SUCH_NAME:
                return connect, f"a host name that does not exist: {host!r} ({said})", True
            return connect, f"no address for the host name {host!r} this time ({said}; retried)", False
        except UnicodeError as exc:  # the IDNA codec: a label over 63 characters, an empty one, ...
            return connect, f"{host[:80]!r}, which cannot be a host name ({host_name_fault(exc)})", True
        except ConnectionRefusedError:
            return connect, f"connection refused (nothing listens on {hostport})", False
        except TimeoutError:
            return connect, f"no answer from {hostport} within {self.open_timeout_s:g} s (timed out)", False
        except OSError as exc:
            said = (exc.strerror or str(exc) or type(exc).__name__)
            return connect, f"{said[:1].lower() + said[1:]} ({hostport})", False
        answer = f"an RTSP answer from {self._shown_url}"
        with sock:
            if parts.scheme.lower() != "rtsp":
                return answer, None, False
            plain = urllib.parse.urlunsplit(parts._replace(netloc=hostport))     # no credentials on the wire
            try:
                sock.settimeout(self.read_timeout_s)
                sock.sendall(f"OPTIONS {plain} RTSP/1.0\r\nCSeq: 1\r\nUser-Agent: lmstream\r\n\r\n".encode())
                data = sock.recv(512)
            except TimeoutError:
                return answer, (f"nothing for {self.read_timeout_s:g} s (the server accepted the connection, "
                                "then sent nothing; timed out)"), False
            except (ConnectionResetError, BrokenPipeError):    # closed before our request: the kernel resets
                data = b""
            except OSError as exc:
                return answer, f"the connection broken off ({(exc.strerror or str(exc)).lower()})", False
        if not data:
            return answer, "the connection closed without an answer", False
        first = data.replace(b"\r", b"").split(b"\n", 1)[0].decode("latin-1")[:80]
        if not first.startswith("RTSP/"):
            return answer, f"{first!r} (the server is not an RTSP server)", False
        return answer, None, False


# ---------------------------------------------------------------------------
# pushed frames (the WebSocket)
# ---------------------------------------------------------------------------


class _Pipe:
    """A blocking, non-seekable file for PyAV, fed chunk by chunk by `PushSource.push_stream`.

    ``read`` returns what is there (at most ``n`` bytes) and blocks only when nothing is;
    ``b""`` (EOF) after `close`.  ``idle`` tells the feeder that every byte fed so far has
    been handed to FFmpeg and the demuxer waits for more, i.e. all that could be decoded
    from them has been.
    """

    def __init__(self):
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._waiting = False
        self.fed = 0
        self.consumed = 0

    def feed(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            self.fed += len(data)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def read(self, n: int) -> bytes:
        with self._cond:
            while not self._buf and not self._eof:
                self._waiting = True
                self._cond.notify_all()
                self._cond.wait()
            self._waiting = False
            out = bytes(self._buf[:n])
            del self._buf[:n]
            self.consumed += len(out)
            return out

    def wait_idle(self, timeout: float, done: Callable[[], bool]) -> bool:
        """Wait until the reader has taken every byte and blocks for more (or ``done()``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self._waiting and self.consumed == self.fed) and not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True


class _Demuxer:
    """One pushed byte stream being demuxed on its own thread."""

    def __init__(self, source: "PushSource", prefix: bytes, continued: bool, format: str | None):
        self.source = source
        self.format = format  # FFmpeg demuxer; None: probe
        self.pipe = _Pipe()
        self.continued = continued  # restarted with a saved header after damage: same timeline
        self.opened = False
        self.frames = 0
        self.fatal: LmsError | None = None
        self.errors: list[tuple[int, LmsError]] = []  # (sequence, error) for push_stream to raise
        self.format_name: str | None = None
        if prefix:
            self.pipe.feed(prefix)
        self.thread = threading.Thread(target=self._run, name="push-stream demux", daemon=True)
        self.thread.start()

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def _run(self) -> None:
        src = self.source
        try:
            try:
                container = av.open(self.pipe, mode="r", format=self.format,
                                    options=dict(src.demux_options), buffer_size=16384)
            except Exception as exc:  # noqa: BLE001
                self.fatal = NotAVideo(f"expected a WebM or fragmented MP4 byte stream, got data FFmpeg "
                                       f"cannot read as one ({_reason(exc)})")
                return
            try:
                if not container.streams.video:
                    kinds = ", ".join(s.type for s in container.streams) or "no streams"
                    self.fatal = NoVideoStream(f"expected a video stream in the pushed {container.format.name} "
                                               f"stream, got {kinds}")
                    return
                self.opened = True
                self.format_name = container.format.name
                vs = container.streams.video[0]
                src._stream_opened(self)
                # Matroska/WebM lay packets back to back: a jump in byte position means the
                # demuxer skipped damaged bytes while resyncing (silently), as in stream.decode
                contiguous = any(n in ("matroska", "webm") for n in container.format.name.split(","))
                next_pos: int | None = None
                demuxer = container.demux()  # every stream: audio packets lie between video ones
                while True:
                    try:
                        packet = next(demuxer)
                    except StopIteration:
                        return
                    except Exception as exc:  # noqa: BLE001
                        self.fatal = NotAVideo(f"expected the pushed stream to continue as valid "
                                               f"{container.format.name}, got {_reason(exc)} after "
                                               f"{self.frames} frames")
                        return
                    if packet.pos is not None and packet.pos >= 0 and packet.size:
                        if contiguous and next_pos is not None and packet.pos - next_pos > _BYTE_SKIP_SLACK:
                            src._stream_damage(self, NotAVideo(
                                f"expected the pushed {container.format.name} stream to continue, got "
                                f"{packet.pos - next_pos} unreadable bytes (skipped) after {self.frames} frames"),
                                drop=False)
                        next_pos = packet.pos + packet.size
                    if packet.stream.index != vs.index:
                        continue
                    try:
                        frames = packet.decode()
                    except (av.FFmpegError, ValueError) as exc:
                        src._stream_damage(self, NotAVideo(
                            f"expected a decodable video packet in the pushed stream, got {_reason(exc)}"))
                        continue
                    for frame in frames:
                        self.frames += 1
                        src._stream_frame(self, frame)
            finally:
                try:
                    container.close()
                except Exception:  # noqa: BLE001
                    pass
        except BaseException as exc:  # a bug of ours: reported by push_stream, never a hang
            self.fatal = LmsError(f"push-stream demuxer crashed: {type(exc).__name__}: {exc}")
        finally:
            self.pipe.close()
            src._stream_ended(self)


def _init_segment(head: bytes) -> bytes | None:
    """The header of a WebM (everything before the first Cluster) or fragmented MP4 (the
    boxes before the first ``moof``) at the start of ``head``; None when not (yet) found."""
    if head.startswith(_EBML_MAGIC):
        i = head.find(_MKV_CLUSTER_ID)
        return head[:i] if i > 0 else None
    if head[4:8] == b"ftyp":
        pos = 0
        while pos + 8 <= len(head):
            size = int.from_bytes(head[pos:pos + 4], "big")
            kind = head[pos + 4:pos + 8]
            if kind == b"moof":
                return head[:pos]
            if size < 8:
                return None
            pos += size
    return None


def _sniff_format(chunk: bytes) -> str | None:
    """The FFmpeg demuxer for a stream starting with ``chunk`` (so that FFmpeg does not probe:
    a damaged header then fails at once instead of after a whole probe buffer)."""
    if chunk.startswith(_EBML_MAGIC):
        return "matroska"  # FFmpeg's "matroska,webm" demuxer
    if chunk[4:8] == b"ftyp":
        return "mp4"  # FFmpeg's "mov,mp4,m4a,3gp,3g2,mj2" demuxer
    return None


def _starts_a_stream(chunk: bytes) -> bool:
    """Whether ``chunk`` begins a WebM/Matroska (EBML header) or MP4 (``ftyp`` box) stream."""
    return chunk.startswith(_EBML_MAGIC) or chunk[4:8] == b"ftyp"


class PushSource(_LiveSource):
    """Frames a client pushes (the WebSocket ``/v1/live``), sampled at ``fps``.

    Two ways in (one per source; the first ``push_*`` call picks it):

    * `push_image(data, pts=None)`: one JPEG, PNG or WebP picture.  ``pts`` is the
      caller's time in seconds, taken as given (it must not go back: an earlier pts
      is dropped as ``pts_backwards``); without one, the arrival time is used
      (monotonic ``clock``, 0 for the first frame, later ones continuing from the
      last frame's pts).  A client should send pts always or never.
    * `push_stream(chunk)`: consecutive chunks of one WebM or fragmented MP4 byte
      stream (``MediaRecorder`` output).  A thread demuxes and decodes them as they
      come; `push_stream` returns once FFmpeg has taken the whole chunk.  Times are
      the container's, relative to its first frame.  A chunk that starts a new
      stream (an EBML or ``ftyp`` header) after a stream broke starts over on a
      continuing timeline.

    Bad data raises from the ``push_*`` call that brought it, and the source keeps
    working: `NotAVideo` (not an image / not a readable stream / a damaged packet),
    `PayloadTooLarge` (a picture over ``max_pixels``), `BadArgument` (wrong types, a
    bad pts, pushing after `close`/`stop`, mixing images and a stream).  When a
    stream breaks mid-way (its demuxer gives up), the next chunk is fed to a new
    demuxer behind the stream's saved header, so it resumes at the next cluster /
    fragment; damage is recorded in `gaps`.

    `close()` ends the input: a pushed stream is flushed (its last frames come out),
    and iteration ends once every waiting frame has been yielded.  `stop()` ends
    iteration at once.

    Args:
        fps: frames per second to keep (None or 0: every frame).
        resize_to: squash every frame to ``S x S`` (as `VideoSource`).
        max_queue: sampled frames that may wait for the consumer; when full the oldest
            is dropped (counted as ``queue_full`` and recorded in `gaps`).
        wait_for_room_s: a byte stream only: when the queue is full, the demuxer waits for
            the consumer to take a frame instead (up to this long, then the oldest is dropped
            as above), and `push_stream` waits for the demuxer as long as the consumer keeps
            taking frames: a file pushed faster than real time loses nothing, its pusher is
            held back instead. None (default): drop at once, as for pictures.
        max_pixels: largest picture accepted (width x height), pushed or decoded (default:
            a pushed picture 8192 x 8192, a byte stream's frame DCI 8K, as files' still
            images and video frames: `stream.decode.MAX_IMAGE_PIXELS`, `MAX_PIXELS`).
        clock: monotonic seconds (arrival times, ``lag_s``).
        stall_after_s: no frame pushed for this long -> status ``"stalled"`` (None: never).
        chunk_timeout_s: longest `push_stream` waits for the demuxer to take a chunk.
        container_format: force FFmpeg's demuxer (``"webm"``, ``"mp4"``); default: probe.
    """

    _name = "PushSource"

    def __init__(self, fps: float | None = 1.0, resize_to: int | None = None, max_queue: int = 16, *,
                 max_pixels: int | None = None, clock: Callable[[], float] = time.monotonic,
                 stall_after_s: float | None = None, chunk_timeout_s: float = 10.0,
                 container_format: str | None = None, wait_for_room_s: float | None = None):
        self.max_pixels = _check_count("max_pixels", max_pixels) if max_pixels is not None else MAX_PIXELS
        self.max_image_pixels = self.max_pixels if max_pixels is not None else MAX_IMAGE_PIXELS
        self.wait_for_room_s = _check_seconds("wait_for_room_s", wait_for_room_s) if wait_for_room_s else None
        stall = _check_seconds("stall_after_s", stall_after_s) if stall_after_s is not None else None
        self.chunk_timeout_s = _check_seconds("chunk_timeout_s", chunk_timeout_s)
        if container_format is not None and container_format not in av.formats_available:
            raise BadArgument(f"expected container_format to be None or an FFmpeg demuxer name such as "
                              f"'webm' or 'mp4', got {container_format!r}")
        self.container_format = container_format
        # FFmpeg probes a stream's first frames before returning from open; by default it
        # reads up to 5 s / 5 MB, which would hold back the first frames of a live stream
        self.demux_options = {"probesize": str(64 << 10), "analyzeduration": str(200_000)}
        super().__init__(fps, resize_to, max_queue, clock, stall)
        self._sclock = _StreamClock(wall_check=False)
        self._push_lock = threading.Lock()  # one push at a time: sampling decisions stay ordered
        self._mode: str | None = None
        self._pushed = 0
        self._closed = False
        self._demux: _Demuxer | None = None
        self._init: bytes | None = None  # the current stream's header, to resume after damage
        self._format: str | None = container_format  # the current stream's demuxer
        self._head = bytearray()  # the first bytes of the current stream, until its header is known
        self._err_seq = 0
        self._damage_from: float | None = None  # stream time of the last good frame before damage
        self._frames_in_queued = 0  # frames the stream path queued (for push_stream's return value)

    def __repr__(self) -> str:
        return f"PushSource(fps={self.fps}, mode={self._mode}, status={self.status!r}, frames={self.frames})"

    def _extra_status(self) -> dict:
        return {"mode": self._mode, "pushed": self._pushed}

    # -- ending ------------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> None:
        """No more input: flush a pushed stream (waits up to ``timeout``, default
        ``chunk_timeout_s``, for its last frames), then iteration ends after the waiting
        frames.  Idempotent; thread-safe."""
        with self._push_lock:
            self._closed = True
            d = self._demux
            if d is not None:
                d.pipe.close()
                d.thread.join(self.chunk_timeout_s if timeout is None else timeout)
        with self._cond:
            self._ended = True
            if self._status not in ("failed",):
                self._status = "stopped"
            self._cond.notify_all()

    def _on_stop(self) -> None:
        self._closed = True
        d = self._demux
        if d is not None:
            d.pipe.close()

    def _check_open(self, what: str) -> None:
        if self._closed or self._stopped:
            raise BadArgument(f"expected an open PushSource, got {what} after close() or stop()")

    def _check_mode(self, mode: str) -> None:
        if self._mode is None:
            self._mode = mode
        elif self._mode != mode:
            raise BadArgument(f"expected {self._mode} pushes on this source (the first push chose them), "
                              f"got a {mode} push")

    # -- pictures ------------------------------------------------------------------------------
    def push_image(self, data: bytes, pts: float | None = None) -> int:
        """Push one JPEG/PNG/WebP picture; returns 1 if it was kept (queued), 0 if dropped
        (between sampling targets, or a pts before an earlier frame's).

        Raises:
            NotAVideo: ``data`` is not a picture Pillow can read in one of those formats,
                or is damaged.  The source is unchanged (its next good frame is kept).
            PayloadTooLarge: more than ``max_pixels`` pixels.
            BadArgument: ``data`` not bytes, ``pts`` not a finite number >= 0, the source
                closed, or it takes a stream.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BadArgument(f"expected the picture as bytes, got {type(data).__name__}")
        if pts is not None and (isinstance(pts, bool) or not isinstance(pts, numbers.Real)
                                or not math.isfinite(pts) or pts < 0):
            raise BadArgument(f"expected pts to be None or a finite number of seconds >= 0, got {pts!r}")
        with self._push_lock:
            self._check_open("push_image")
            self._check_mode("image")
            try:
                return self._push_image(data, pts)
            except (NotAVideo, PayloadTooLarge) as exc:
                with self._cond:
                    self._set_error(exc)
                raise

    def _push_image(self, data, pts: float | None) -> int:
        """`push_image` under the push lock: decode (when sampled), time, sample, queue."""
        from PIL import Image

        data = bytes(data)
        try:
            im = Image.open(io.BytesIO(data))  # reads the header only
            fmt = im.format
        except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for garbage
            raise NotAVideo(f"expected a JPEG, PNG or WebP picture, got {len(data)} bytes Pillow cannot "
                            f"read as an image ({_describe_bytes(data)}; {type(exc).__name__})") from None
        with im:
            if fmt not in _IMAGE_FORMATS:
                raise NotAVideo(f"expected a JPEG, PNG or WebP picture, got {fmt or 'an unknown'} image")
            w, h = im.size
            if w * h > self.max_image_pixels:
                raise PayloadTooLarge(f"expected a picture of at most {self.max_image_pixels} pixels, got "
                                      f"{w}x{h} = {w * h}")
            if w == 0 or h == 0:
                raise NotAVideo(f"expected a picture with pixels, got {w}x{h}")
            now = self._clock()
            with self._cond:
                self._pushed += 1
                self._frames_in += 1
                self._mark_live(now)
                t, keep = self._image_time(pts, now)
                if not keep:
                    self._drop("pts_backwards")
                    return 0
                if not self._sampler.wants(t):
                    self._skipped += 1
                    self._commit_time(t, now)
                    return 0
            try:
                rgb = _decode_picture(im)
            except Exception as exc:  # noqa: BLE001
                raise NotAVideo(f"expected a complete {_IMAGE_FORMATS[fmt]} picture, got a damaged one "
                                f"({type(exc).__name__}: {exc})") from None
        rgb = self._shrink(rgb)
        with self._cond:
            self._commit_time(t, now)
            self._sampler.take(t)
            self._enqueue(t, rgb, now)
        return 1

    def _image_time(self, pts: float | None, now: float) -> tuple[float, bool]:
        last_t = self._sclock.last_t
        if pts is not None:
            t = float(pts)
            if last_t is not None and t < last_t - _TIME_EPS:
                return t, False
            return t, True
        if last_t is None:
            return 0.0, True
        return last_t + max(now - self._sclock.last_wall, 0.0), True

    def _commit_time(self, t: float, now: float) -> None:
        if self._sclock.last_t is None:
            self._epoch_s = time.time()
        self._sclock.last_t, self._sclock.last_wall = t, now

    # -- a byte stream ----------------------------------------------------------------------------
    def push_stream(self, chunk: bytes) -> int:
        """Push the next chunk of a WebM / fragmented MP4 byte stream; returns how many frames
        this chunk added to the queue.  Waits (at most ``chunk_timeout_s``) until the demuxer
        has taken the whole chunk, so errors come from the call whose bytes caused them.

        Raises:
            NotAVideo / NoVideoStream: the bytes cannot be read as such a stream (the next
                chunk that starts a stream begins a new one), or they held damaged packets
                (the stream goes on).
            BadArgument: not bytes, the source closed, or it takes pictures.
        """
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise BadArgument(f"expected the stream chunk as bytes, got {type(chunk).__name__}")
        chunk = bytes(chunk)
        with self._push_lock:
            self._check_open("push_stream")
            self._check_mode("stream")
            if not chunk:
                return 0
            with self._cond:
                self._pushed += 1
                queued_before = self._frames_in_queued
                seq = self._err_seq
            d = self._demux
            if d is None or d.done or d.pipe._eof:
                try:
                    d = self._new_demuxer(chunk)
                except NotAVideo as exc:
                    with self._cond:
                        self._set_error(exc)
                    raise
            else:
                self._remember_head(chunk)
                d.pipe.feed(chunk)
            taken = self.frames
            while not d.pipe.wait_idle(self.chunk_timeout_s, lambda: d.done):
                now_taken = self.frames           # held back by a full queue: wait on while it drains
                if not self.wait_for_room_s or now_taken == taken:
                    break
                taken = now_taken
            if d.done:
                d.thread.join(1.0)
            with self._cond:
                errors = [e for s, e in d.errors if s >= seq]
                added = self._frames_in_queued - queued_before
            if d.done and d.fatal is not None:
                fatal = d.fatal
                d.fatal = None  # raised once
                if self._demux is d:
                    self._demux = None
                if not d.opened:
                    self._init = None  # never a readable stream: its bytes are no header to keep
                raise fatal
            if errors:
                first = errors[0]
                more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
                raise type(first)(first.message + more)
            return added

    def _remember_head(self, chunk: bytes) -> None:
        if self._init is None and len(self._head) < (4 << 20):
            self._head += chunk
            self._init = _init_segment(bytes(self._head))
            if self._init is not None:
                self._head = bytearray()

    def _new_demuxer(self, chunk: bytes) -> _Demuxer:
        if self._init is None and self.container_format is None and not _starts_a_stream(chunk):
            # without this FFmpeg would wait for a whole probe buffer (1 MiB) before refusing
            raise NotAVideo(f"expected the start of a WebM (EBML header 1a 45 df a3) or fragmented MP4 "
                            f"(ftyp box) stream, got {len(chunk)} bytes {_describe_bytes(chunk)}")
        if _starts_a_stream(chunk) or self._init is None:
            self._init, self._head = None, bytearray()
            self._remember_head(chunk)
            self._format = self.container_format or _sniff_format(chunk)
            d = _Demuxer(self, b"", continued=False, format=self._format)
            d.pipe.feed(chunk)
        else:  # the stream broke mid-way: resume behind its saved header
            d = _Demuxer(self, self._init, continued=True, format=self._format)
            d.pipe.feed(chunk)
        self._demux = d
        return d

    # callbacks from the demux thread
    def _stream_opened(self, d: _Demuxer) -> None:
        with self._cond:
            if not d.continued:
                self._sclock.new_source()

    def _stream_damage(self, d: _Demuxer, err: LmsError, drop: bool = True) -> None:
        with self._cond:
            if drop:
                self._drop("decode_error")
            self._record(d, err)
            if self._damage_from is None:
                self._damage_from = self._sclock.last_t

    def _record(self, d: _Demuxer, err: LmsError) -> None:
        self._set_error(err)
        d.errors.append((self._err_seq, err))
        self._err_seq += 1
        del d.errors[:-20]

    def _stream_ended(self, d: _Demuxer) -> None:
        with self._cond:
            if d.fatal is not None:
                self._set_error(d.fatal)
                if self._damage_from is None and d.opened:
                    self._damage_from = self._sclock.last_t
            self._cond.notify_all()

    def _stream_frame(self, d: _Demuxer, frame: av.VideoFrame) -> None:
        now = self._clock()
        if frame.width * frame.height > self.max_pixels:
            with self._cond:
                self._drop("decode_error")
                self._record(d, PayloadTooLarge(f"expected frames of at most {self.max_pixels} pixels, got "
                                                f"{frame.width}x{frame.height}"))
            return
        src_t = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else None
        with self._cond:
            prev_t = self._sclock.last_t
            t = self._sclock.time(src_t, now)
            if prev_t is None:
                self._epoch_s = time.time()
            self._frames_in += 1
            if self._damage_from is not None:
                self._add_gap(self._damage_from, t)
                self._damage_from = None
            self._mark_live(now)
            if not self._sampler.wants(t):
                self._skipped += 1
                return
        try:
            rgb = self._picture(frame)
        except (av.FFmpegError, ValueError) as exc:
            with self._cond:
                self._drop("decode_error")
                self._record(d, NotAVideo(f"expected a frame convertible to RGB, got {_reason(exc)}"))
            return
        with self._cond:
            if self.wait_for_room_s:              # held back, not shed, while the consumer takes frames
                deadline = time.monotonic() + self.wait_for_room_s
                while len(self._queue) >= self.max_queue and not self._stopped and time.monotonic() < deadline:
                    self._cond.wait(min(deadline - time.monotonic(), _POLL_S))
            self._sampler.take(t)
            self._enqueue(t, rgb, now)
            self._frames_in_queued += 1


def _describe_bytes(data: bytes) -> str:
    if not data:
        return "empty"
    head = data[:8].hex(" ")
    return f"starting {head}"


def _decode_picture(im) -> np.ndarray:
    """Pillow image (header read) -> upright (H, W, 3) uint8 RGB."""
    from PIL import ImageOps

    im.load()
    im = ImageOps.exif_transpose(im) or im
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.array(im, dtype=np.uint8)
