"""Live sources (stream.live): RTSP cameras from a real GStreamer RTSP server, and frames pushed
as pictures or as a WebM byte stream.

The RTSP server is Debian's (tests/rtsp_server.py, run by /usr/bin/python3); when its packages
are missing the tests fail, with a message saying to run ./run-tests.sh, and never skip.
Every wait is bounded (and pytest-timeout bounds each test), so a regression fails instead of
hanging; consumers run on daemon threads that record what they saw and any exception.
"""
from __future__ import annotations

import io
import threading
import time
import types
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from lmcore.errors import BadArgument, LmsError, NotAVideo, PayloadTooLarge
from stream.live import STATUSES, PushSource, RtspSource
from stream.preprocess import resize_frame_nearest


# --------------------------------------------------------------------------- helpers
def wait_for(pred, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


class Consumer:
    """Iterates a source on a daemon thread: frames (with arrival times) and any exception."""

    def __init__(self, src):
        self.src, self.frames, self.error = src, [], None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for f in self.src:
                self.frames.append((time.monotonic(), f))
        except BaseException as exc:  # recorded: the test asserts there was none
            self.error = exc

    def pts(self) -> list[float]:
        return [f.pts for _, f in list(self.frames)]

    def count(self) -> int:
        return len(self.frames)

    def finish(self, timeout: float = 2.0) -> None:
        self.src.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "iteration did not end after stop()"
        assert self.error is None, f"iteration raised {self.error!r}"


def assert_sampled(pts: list[float], fps: float, what: str) -> None:
    """Strictly increasing; consecutive frames about 1/fps apart (a 10 fps camera: +-0.1 s)."""
    assert len(pts) >= 2, f"{what}: too few frames {pts}"
    steps = np.diff(pts)
    assert (steps > 0).all(), f"{what}: pts not increasing: {pts}"
    assert (steps > 1 / fps - 0.15).all() and (np.median(steps) < 1 / fps + 0.15), f"{what}: steps {steps}"


def jpeg(i: int, w: int = 64, h: int = 48, quality: int = 90) -> bytes:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = (i * 37) % 256
    a[:, i % w, 1] = 255
    b = io.BytesIO()
    Image.fromarray(a).save(b, "JPEG", quality=quality)
    return b.getvalue()


def png_of(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, "PNG")
    return b.getvalue()


def vp8_webm(n: int = 30, fps: int = 10, w: int = 96, h: int = 64) -> bytes:
    """A short VP8 WebM made in memory (noise, so that it spans many 4 KB chunks)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as c:
        s = c.add_stream("libvpx", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            a = np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def chunks(data: bytes, size: int = 4096) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.fixture(scope="module")
def webm_bytes() -> bytes:
    return vp8_webm()


# --------------------------------------------------------------------------- the RTSP server
def _server(folder, mounts):
    from rtsp_server import RtspServer, rtsp_server_missing

    missing = rtsp_server_missing()
    if missing:
        pytest.fail(missing, pytrace=False)
    return RtspServer(folder, mounts=mounts)


@pytest.fixture(scope="module")
def cameras(tmp_path_factory):
    """One server with two cameras for the tests that do not disturb it."""
    with _server(tmp_path_factory.mktemp("rtsp-shared"), ("cam1", "cam2")) as srv:
        yield srv


@pytest.fixture
def camera(tmp_path):
    """A server of the test's own, to kill, freeze and restart."""
    with _server(tmp_path / "rtsp", ("cam",)) as srv:
        yield srv


# --------------------------------------------------------------------------- RTSP
@pytest.mark.timeout(60)
def test_two_cameras_at_fps_live(cameras):
    a = RtspSource(cameras.url("cam1"), fps=2, open_timeout_s=15, read_timeout_s=3)
    b = RtspSource(cameras.url("cam2"), fps=2, resize_to=48, open_timeout_s=15, read_timeout_s=3)
    assert a.status == "connecting"
    ca, cb = Consumer(a), Consumer(b)
    try:
        assert wait_for(lambda: ca.count() >= 8 and cb.count() >= 8, 25), (a.status_dict(), b.status_dict())
        assert a.status == "live" and b.status == "live"
        first_live = ca.frames[0][0]
        assert wait_for(lambda: ca.count() >= 12, 6)
        pa, pb = ca.pts(), cb.pts()
        assert pa[0] == 0.0 and pb[0] == 0.0
        assert_sampled(pa, 2, "cam1")
        assert_sampled(pb, 2, "cam2")
        # ~2 frames per second of wall time once the opening burst is out
        late = [t for t, _ in ca.frames if t > first_live + 0.5]
        if len(late) >= 3:
            rate = (len(late) - 1) / (late[-1] - late[0])
            assert 1.3 < rate < 3.0, rate
        fa, fb = ca.frames[-1][1], cb.frames[-1][1]
        assert fa.rgb.shape == (240, 320, 3) and fa.rgb.dtype == np.uint8
        assert fb.rgb.shape == (48, 48, 3) and fb.rgb.dtype == np.uint8
        assert [f.index for _, f in ca.frames] == list(range(ca.count()))
        # two different scenes (ball vs colour bars)
        assert abs(float(fa.rgb.mean()) - float(fb.rgb.mean())) > 10
        d = a.status_dict()
        assert d["status"] == "live" and d["frames"] == ca.count() and d["last_pts"] == pa[-1]
        assert d["gaps"] == [] and d["url"] == cameras.url("cam1")
        # a 10 fps camera at 2 fps: 4 in 5 frames skipped by sampling, none shed (`dropped` said 852 for
        # what was sampling alone)
        assert d["skipped_by_fps"] >= 3 * d["frames"] and d["dropped"] == 0 and d["dropped_why"] == {}, d
        assert d["frames_received"] >= d["skipped_by_fps"] + d["frames"], d
        assert d["lag_s"] is not None and d["last_error"] is None, d
    finally:
        ca.finish()
        cb.finish()
    assert a.status == "stopped" and b.status == "stopped"
    assert a.join(5) and b.join(5)


@pytest.mark.timeout(60)
def test_server_killed_reconnects_and_restarted_is_live_with_one_gap(camera):
    src = RtspSource(camera.url(), fps=2, open_timeout_s=15, read_timeout_s=3, stall_after_s=10,
                     backoff=(0.2, 0.5))
    c = Consumer(src)
    try:
        assert wait_for(lambda: c.count() >= 4, 20), src.status_dict()
        assert src.status == "live"
        camera.kill()
        killed_at = time.monotonic()
        assert wait_for(lambda: src.status == "reconnecting", 5), src.status_dict()
        n_before = c.count()
        pts_before = c.pts()[-1]
        time.sleep(1.5)
        assert src.status == "reconnecting" and c.thread.is_alive() and c.error is None
        assert src.last_error and src.last_error["code"].startswith("E_SOURCE_")
        down = src.status_dict()
        assert down["lag_s"] is None, down         # no frame arrives: nothing lags (it said 0.083 throughout)
        # the outage going on is a gap open at its end (it was in no record and no answer until the camera
        # came back): from the last frame before it
        assert down["gaps"] == [[pytest.approx(pts_before, abs=0.6), None]], (down, pts_before)
        camera.start()
        assert wait_for(lambda: src.status == "live" and c.count() >= n_before + 3, 20), src.status_dict()
        outage_s = time.monotonic() - killed_at
        back = src.status_dict()                   # live again: the error is history, the outage a gap
        assert back["last_error"] is None and back["previous_error"] == down["last_error"], back
        assert back["lag_s"] is not None and len(back["gaps"]) == 1, back
    finally:
        c.finish()
    pts = c.pts()
    assert all(b > a for a, b in zip(pts, pts[1:])), pts
    gaps = src.gaps
    assert len(gaps) == 1, gaps
    g0, g1 = gaps[0]
    assert g0 <= pts_before + 0.6 and g0 >= pts_before - 0.6, (gaps, pts_before)
    assert 0.5 < g1 - g0 < outage_s + 1, (gaps, outage_s)
    assert not any(g0 < p < g1 for p in pts), (gaps, pts)  # no frame inside the outage
    d = src.status_dict()
    assert d["reconnects"] >= 1 and d["gaps"] == [[g0, g1]] and d["status"] == "stopped"


@pytest.mark.timeout(60)
def test_server_frozen_stalls_then_recovers_and_stop_never_hangs(camera):
    src = RtspSource(camera.url(), fps=2, open_timeout_s=6, read_timeout_s=3, stall_after_s=1.5,
                     backoff=(0.2,))
    c = Consumer(src)
    seen: list[str] = []

    def status_is(s):
        now = src.status
        assert now in STATUSES
        if not seen or seen[-1] != now:
            seen.append(now)
        return now == s

    try:
        assert wait_for(lambda: c.count() >= 3, 20), src.status_dict()
        camera.freeze()
        frozen_at = time.monotonic()
        assert wait_for(lambda: status_is("stalled"), 1.5 + 2.0), (seen, src.status_dict())
        assert time.monotonic() - frozen_at < 4.0
        assert c.thread.is_alive() and c.error is None
        camera.thaw()
        n = c.count()
        assert wait_for(lambda: status_is("live") and c.count() >= n + 2, 20), (seen, src.status_dict())
        assert src.gaps, src.status_dict()  # the stall is an outage
        # frozen again: stop() must end iteration at once although the reader is blocked
        camera.freeze()
        assert wait_for(lambda: status_is("stalled") or status_is("reconnecting"), 8), seen
        t0 = time.monotonic()
        src.stop()
        c.thread.join(1.5)
        assert not c.thread.is_alive(), "iteration still running 1.5 s after stop()"
        assert time.monotonic() - t0 < 1.5
        assert src.status == "stopped"
    finally:
        camera.thaw()
        c.finish()
    assert src.join(2 * 3 + 6 + 2), "the reader thread did not exit after its timeouts"
    pts = c.pts()
    assert all(b > a for a, b in zip(pts, pts[1:])), pts


@pytest.mark.timeout(60)
def test_a_frozen_camera_with_the_default_timeouts_is_stalled_before_it_is_reconnected(camera):
    """With the defaults a frozen (SIGSTOPped) camera went live -> reconnecting after ~10 s (its read timing
    out) and never showed `stalled`, which waited for 20 s. Now: live -> stalled (5 s without a frame)
    -> reconnecting (the read times out) -> live once it runs again, with lag_s None while no frame comes."""
    src = RtspSource(camera.url(), fps=2, backoff=(0.2,))
    assert src.stall_after_s < 2 * src.read_timeout_s
    c = Consumer(src)
    seen: list[tuple[float, str]] = []

    def note():
        d = src.status_dict()
        if not seen or seen[-1][1] != d["status"]:
            seen.append((time.monotonic(), d["status"]))
        return d

    try:
        assert wait_for(lambda: c.count() >= 2 and note()["status"] == "live", 20), src.status_dict()
        camera.freeze()
        frozen_at = time.monotonic()
        assert wait_for(lambda: note()["status"] == "stalled", 10), seen
        before = c.pts()[-1]                       # every frame but the one FFmpeg holds back is in
        assert wait_for(lambda: note()["status"] == "reconnecting", 20), seen
        stalled = [t for t, st in seen if st == "stalled"]
        assert [st for _, st in seen[-3:]] == ["live", "stalled", "reconnecting"], seen
        assert 4.0 < stalled[0] - frozen_at < 6.5, (seen, frozen_at)
        d = note()
        assert d["lag_s"] is None and d["last_error"]["code"] == "E_SOURCE_TIMEOUT", d
        camera.thaw()
        assert wait_for(lambda: note()["status"] == "live", 30), seen
        assert src.status_dict()["last_error"] is None
    finally:
        camera.thaw()
        c.finish()
    # the outage starts at the last picture before the freeze (the held-back one, 0.1 s after a 10 fps
    # camera's previous: sampled at 2 fps, within 0.6 s of the last yielded before), not when FFmpeg
    # delivered that picture, read_timeout_s (5 s) later
    gaps, pts = src.gaps, c.pts()
    assert len(gaps) == 1 and before - 0.01 <= gaps[0][0] <= before + 0.6, (gaps, before, pts)
    assert not any(gaps[0][0] < p < gaps[0][1] for p in pts), (gaps, pts)


def test_push_source_connecting_live_stalled_and_live_again():
    """A PushSource with stall_after_s: connecting until the first picture, stalled when none came for
    that long, live with the next (the clock is the test's)."""
    now = [0.0]
    src = PushSource(fps=None, stall_after_s=5, clock=lambda: now[0])
    assert src.status == "connecting" and src.status_dict()["lag_s"] is None
    src.push_image(jpeg(0))
    assert src.status == "live"
    now[0] = 4.9
    assert src.status == "live"
    now[0] = 5.2
    d = src.status_dict()
    assert d["status"] == "stalled" and d["queued"] == 1 and d["lag_s"] == 5.2, d  # one waits, unread
    list(zip(range(1), src))                          # the consumer takes it: nothing waits, nothing lags
    d = src.status_dict()
    assert d["status"] == "stalled" and d["lag_s"] is None, d
    src.push_image(jpeg(1))
    assert src.status == "live" and src.status_dict()["lag_s"] == 0.0
    src.stop()


@pytest.mark.timeout(30)
def test_no_such_stream_fails_and_refused_keeps_retrying(cameras):
    from rtsp_server import free_port

    src = RtspSource(cameras.url("no-such-mount"), backoff=(0.05,), give_up_after=2)
    c = Consumer(src)
    c.thread.join(10)
    assert not c.thread.is_alive() and c.error is None and c.frames == []
    assert src.status == "failed"
    assert src.last_error["code"] == "E_INPUT_NOT_FOUND" and "404" in src.last_error["message"]

    down = RtspSource(f"rtsp://user:secret@127.0.0.1:{free_port()}/cam", backoff=(0.05,), give_up_after=2)
    c2 = Consumer(down)
    assert wait_for(lambda: down.status_dict()["reconnects"] >= 3, 5), down.status_dict()
    d = down.status_dict()
    assert d["status"] == "reconnecting" and d["last_error"]["code"] == "E_SOURCE_UNREACHABLE"
    assert "secret" not in repr(d) and "secret" not in repr(down), d
    c2.finish(1.0)
    assert down.status == "stopped" and down.join(3)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/cam", "file:///etc/passwd", "rtsp://", "rtsp:///cam", "rtmp://host/live",
    "rtsp://host:99999/x", "rtsp://ho st/x", "rtsp://host/x\n", "", 42, None, b"rtsp://host/x",
])
def test_invalid_url_is_bad_argument(url):
    with pytest.raises(BadArgument) as ei:
        RtspSource(url)
    assert ei.value.code == "E_BAD_ARGUMENT" and "expected" in ei.value.message


def test_bad_arguments_and_redaction():
    with pytest.raises(BadArgument) as ei:
        RtspSource("https://user:hunter2@host/cam")
    assert "hunter2" not in ei.value.message
    with pytest.raises(BadArgument) as ei:             # urlsplit cannot read the port: the URL is still shown
        RtspSource("rtsp://user:hunter2@Cam.Example:99999/x")
    assert "'rtsp://user:***@Cam.Example:99999/x'" in ei.value.message and "hunter2" not in ei.value.message
    for kw in ({"fps": -1}, {"resize_to": 0}, {"stall_after_s": 0}, {"backoff": ()}, {"backoff": (1, -2)},
               {"read_timeout_s": float("nan")}, {"max_queue": 0}, {"give_up_after": 0}):
        with pytest.raises(BadArgument):
            RtspSource("rtsp://127.0.0.1/cam", **kw)
    with pytest.raises(BadArgument):
        PushSource(max_queue=0)


@pytest.mark.parametrize("url, shown", [
    ("rtsp://u:s3cret@host/x", "rtsp://u:***@host/x"),
    ("rtsp://u:s3@cret@host/x", "rtsp://u:***@host/x"),          # the routes' regex left "cret@" in
    ("rtsp://u:s3#cret@host/x", "rtsp://u:***@host/x"),          # urlsplit ends the host at "#" and "?":
    ("rtsp://u:s3?cret@host/x", "rtsp://u:***@host/x"),          # its redaction left these whole
    ("rtsp://u:s3:cret@host/x", "rtsp://u:***@host/x"),
    ("rtsps://u:s3%40cret@host/x", "rtsps://u:***@host/x"),
    ("rtsp://u:s3cret@host", "rtsp://u:***@host"),
    ("rtsp://u:s3cret@host?a=1", "rtsp://u:***@host?a=1"),
    ("rtsp://:s3cret@host/x", "rtsp://:***@host/x"),
    ("rtsp://u:@host/x", "rtsp://u:***@host/x"),
    ("RTSP://u:s3cret@Cam.Example:8554/x", "RTSP://u:***@Cam.Example:8554/x"),   # kept as written (urlsplit:
    ("rtsp://u:s3cret@host:99999/x", "rtsp://u:***@host:99999/x"),               # lower case, and
    ("rtsp://u:s3cret@[bad/x", "rtsp://u:***@[bad/x"),                           # "<unparsable URL>" for these)
    ("rtsp://u:s3cret@[::1]:554/x", "rtsp://u:***@[::1]:554/x"),
    ("rtsp://u@host/x", "rtsp://u@host/x"),
    ("rtsp://host/x@y:1", "rtsp://host/x@y:1"),                  # an "@" in the path is no password
    ("rtsp://host/x?next=//a:b@c", "rtsp://host/x?next=//a:b@c"),
    ("websocket", "websocket"),
    ("", ""),
])
def test_redact_url_hides_the_whole_password_of_odd_urls(url, shown):
    """`stream.live.redact_url`, the one redaction (cameras' messages and status, the service's routes):
    the service had a regex beside it and each left part of a password in for some URLs."""
    from stream.live import redact_url
    assert redact_url(url) == shown


# --------------------------------------------------------------------------- a simulated camera (a fake clock)
class _Frame:
    """What RtspSource reads of a decoded av.VideoFrame: pts (milliseconds) and the picture."""

    time_base = Fraction(1, 1000)

    def __init__(self, t: float):
        self.pts = round(t * 1000)

    def to_ndarray(self, format):
        return np.zeros((4, 4, 3), np.uint8)


class _Connection:
    """One scripted RTSP connection as PyAV's container (see `_ScriptedCamera`)."""

    def __init__(self, cam, steps):
        self.cam, self.steps = cam, steps
        self.streams = types.SimpleNamespace(video=[types.SimpleNamespace(time_base=Fraction(1, 1000), type="video")])

    def demux(self, vs):
        for wall, what in self.steps:
            self.cam.now[0] = wall
            self.cam.seen.append(self.cam.src.status_dict())
            if isinstance(what, BaseException):
                raise what
            if callable(what):
                yield types.SimpleNamespace(decode=what)
            else:
                frames = [] if what is None else [_Frame(what)]
                yield types.SimpleNamespace(decode=lambda frames=frames: frames)

    def close(self):
        pass


class _ScriptedCamera:
    """A camera scripted on a fake clock, in place of FFmpeg: `RtspSource._open` returns the next of
    ``connections``, each a list of steps ``(wall, what)``: at clock ``wall`` a packet arrives that decodes
    to a frame with camera time ``what`` (seconds; None: to nothing; a callable: its ``decode``), or the
    read fails with ``what`` (an exception). A connection whose steps are done ends (the server closed it);
    once none is left, opening waits for stop() (`done` is set then). ``seen[i]`` is `status_dict()` at step
    ``i``'s clock, before its packet: what a client polling then reads."""

    def __init__(self, monkeypatch, connections, **kw):
        self.now, self.seen, self.done = [0.0], [], threading.Event()
        kw = {"fps": None, "backoff": (0,), "max_queue": 10_000, **kw}
        self.src = RtspSource("rtsp://127.0.0.1:9/cam", clock=lambda: self.now[0], **kw)
        todo = iter(connections)

        def open_():
            steps = next(todo, None)
            if steps is None:
                self.done.set()
                self.src._stop_evt.wait(30)
                raise ConnectionRefusedError("stopped")
            self.now[0] = steps[0][0]
            return _Connection(self, steps)

        monkeypatch.setattr(self.src, "_open", open_)

    def run(self) -> "_ScriptedCamera":
        self.src.start()
        assert self.done.wait(20), self.src.status_dict()
        return self

    def pts(self) -> list[float]:
        return [t for t, _, _ in list(self.src._queue)]

    def close(self) -> None:
        self.src.stop()
        assert self.src.join(5)


def test_a_frozen_cameras_held_back_frame_keeps_its_time_and_the_outage_starts_there(monkeypatch):
    """A 10 fps camera freezes after the picture taken at 1.1 s; FFmpeg delivers that picture when its read
    times out, 5 s later, and the connection drops; the camera is back at 12 s. The picture is at 1.1 and the
    outage (1.1, 12.0): the stall re-anchor (stall_after_s 5) stamped it 6.2, on arrival, and the gap
    (6.2, 12.0) lost 5 s of the outage."""
    frames = [(100.0 + i / 10, i / 10) for i in range(11)]                 # 0.0 .. 1.0 on time
    cam = _ScriptedCamera(monkeypatch, [
        frames + [(106.2, 1.1), (106.2, TimeoutError("read timed out"))],  # 1.1, held back 5 s
        [(112.0 + i / 10, 50.0 + i / 10) for i in range(5)],               # a new session: its own timeline
    ]).run()
    try:
        pts, d = cam.pts(), cam.src.status_dict()
        assert pts[:12] == pytest.approx([i / 10 for i in range(12)]), pts
        assert pts[12:] == pytest.approx([12.0, 12.1, 12.2, 12.3, 12.4]), pts
        assert d["gaps"] == [[pytest.approx(1.1), pytest.approx(12.0)]], d
        assert d["pts_rebased"] == 0, d
        at_timeout = cam.seen[12]                                        # after the held-back frame: no life
        assert at_timeout["status"] == "stalled", cam.seen
    finally:
        cam.close()


def test_frames_whose_camera_clock_runs_slow_keep_the_camera_live(monkeypatch):
    """A timelapse camera (or a broken RTP clock): a frame every 1.5 s whose timestamps move 0.5 s. Every
    frame after the first looked held back, so the source showed stalled from 5 s on and its watchdog
    dropped the connection ("data arrives but does not decode") over and over. Only the first such frame in
    a row is held back: the camera is live throughout, on one connection, without gaps."""
    cam = _ScriptedCamera(monkeypatch, [[(100.0 + 1.5 * i, 0.5 * i) for i in range(20)]]).run()
    try:
        assert [s["status"] for s in cam.seen[1:]] == ["live"] * 19, [(s["status"], s["last_error"]) for s in cam.seen]
        assert all(s["last_error"] is None and s["gaps"] == [] for s in cam.seen), cam.seen
        d = cam.src.status_dict()
        assert d["frames_received"] == 20 and d["reconnects"] == 1, d   # the one reconnect: the script's end
        assert d["last_error"]["code"] == "E_SOURCE_LOST" and "closed by the server" in d["last_error"]["message"]
        pts = cam.pts()
        assert len(pts) == 20 and all(b > a for a, b in zip(pts, pts[1:])), pts
    finally:
        cam.close()


def test_a_long_gop_is_waited_for_and_a_stream_that_never_decodes_is_reopened(monkeypatch):
    """Joined mid-GOP, a camera with an 18 s keyframe interval decodes nothing for 18 s. The watchdog
    (stall_after_s + read_timeout_s: 10 s since stall_after_s became 5) reopened it before its keyframe,
    forever; it is its own setting again, read_timeout_s + 20 (25 s). Data with no frame for longer than
    that is still dropped and reopened."""
    gop = [(100.0 + i, None) for i in range(19)] + [(118.5 + i / 10, i / 10) for i in range(5)]
    cam = _ScriptedCamera(monkeypatch, [gop]).run()
    try:
        d = cam.src.status_dict()
        assert d["frames_received"] == 5 and all(s["last_error"] is None for s in cam.seen), cam.seen
        assert d["last_error"]["code"] == "E_SOURCE_LOST", d                   # the script's end, not the watchdog
        assert cam.src.no_frame_timeout_s == 25.0
    finally:
        cam.close()
    cam = _ScriptedCamera(monkeypatch, [[(100.0 + i, None) for i in range(40)]]).run()
    try:
        assert cam.src.status_dict()["last_error"] == {"code": "E_SOURCE_STALLED", "message": (
            "expected a decodable frame from rtsp://127.0.0.1:9/cam at least every 25 s, got none for 26.0 s "
            "(data arrives but does not decode)")}
        assert len(cam.seen) == 27                                             # dropped after the packet at 26 s
    finally:
        cam.close()
    with pytest.raises(BadArgument):
        RtspSource("rtsp://127.0.0.1/cam", no_frame_timeout_s=0)


def test_a_frame_decoded_after_stop_keeps_the_error_and_the_status(monkeypatch):
    """stop() while a packet decodes: the frame still reaches _mark_live, which cleared last_error although
    the source stays stopped."""
    cam = _ScriptedCamera(monkeypatch, [
        [(100.0, 0.0), (100.1, TimeoutError("read timed out"))],
        [(107.0, lambda: (cam.src.stop(), [_Frame(0.0)])[1])],
    ])
    cam.src.start()
    assert cam.src.join(10)
    d = cam.src.status_dict()
    assert d["status"] == "stopped" and d["frames_received"] == 2, d
    assert d["last_error"] is not None and d["last_error"]["code"] == "E_SOURCE_TIMEOUT", d


@pytest.mark.timeout(30)
def test_stop_does_not_wait_for_the_probe(monkeypatch):
    """A failed open classified after stop() looked at the host with its own timeouts first (up to
    open_timeout_s + read_timeout_s, 20 s), keeping the thread; after stop() the look is skipped."""
    probed = []
    src = RtspSource("rtsp://127.0.0.1:9/cam", backoff=(0,))

    def open_():
        src.stop()
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(src, "_open", open_)
    monkeypatch.setattr(src, "_probe", lambda: probed.append(1) or time.sleep(3) or ("x", None, False))
    src.start()
    assert src.join(1.5) and probed == [] and src.status == "stopped"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("errno_name, permanent", [("EAI_AGAIN", False), ("EAI_FAIL", False),
                                                   ("EAI_NONAME", True), ("EAI_NODATA", True)])
def test_only_a_host_name_that_does_not_exist_is_permanent(monkeypatch, errno_name, permanent):
    """Every DNS failure failed the camera for good after give_up_after tries, a temporary one (EAI_AGAIN:
    the DNS server did not answer this time) too; that one is retried now."""
    import socket
    errno = getattr(socket, errno_name)
    src = RtspSource("rtsp://cam.example/cam", backoff=(0.01,), give_up_after=2)
    monkeypatch.setattr(src, "_open", lambda: (_ for _ in ()).throw(OSError(5, "Input/output error")))

    def no_address(*a, **kw):
        raise socket.gaierror(errno, f"{errno_name} said")

    monkeypatch.setattr(socket, "create_connection", no_address)
    src.start()
    try:
        if permanent:
            assert src.join(5) and src.status == "failed", src.status_dict()
            assert src.last_error == {"code": "E_INPUT_NOT_FOUND", "message": "expected a connection to "
                                      f"rtsp://cam.example/cam, got a host name that does not exist: 'cam.example' "
                                      f"({errno_name} said)"}
        else:
            assert wait_for(lambda: src.status_dict()["reconnects"] >= 4, 5), src.status_dict()
            assert src.status == "reconnecting" and src.last_error == {
                "code": "E_SOURCE_UNREACHABLE", "message": "expected a connection to rtsp://cam.example/cam, got "
                f"no address for the host name 'cam.example' this time ({errno_name} said; retried)"}
    finally:
        src.stop()
        assert src.join(5)


@pytest.mark.parametrize("host, private", [
    ("127.0.0.1", True), ("10.1.2.3", True), ("100.64.0.1", True), ("169.254.169.254", True), ("::1", True),
    ("::ffff:127.0.0.1", True), ("2002:7f00:1::", True), ("64:ff9b::7f00:1", True), ("64:ff9b::a9fe:a9fe", True),
    ("8.8.8.8", False), ("2001:4860:4860::8888", False), ("64:ff9b::808:808", False), ("2002:808:808::", False),
])
def test_private_addresses_inside_ipv6_ones_are_private(host, private):
    """6to4 (2002::/16) and NAT64 (64:ff9b::/96) addresses reach the IPv4 address inside them: 127.0.0.1 in
    one of them was taken as a public camera address."""
    from stream.live import private_address
    assert (private_address(host) is not None) is private


@pytest.mark.timeout(60)
def test_a_camera_host_that_resolves_to_a_private_address_later_is_refused_before_connecting(cameras, monkeypatch):
    """The service checked a camera's address only at POST: a host name whose DNS answer changed afterwards
    (DNS rebinding, or a name moved to an inside address) had the camera connect into the service's own
    network. The camera now resolves and checks it again before each connection it opens."""
    import socket
    from deploy.routes import check_source

    real = socket.getaddrinfo
    answers = iter(["93.184.216.34"])          # the first answer public (POST), every later one loopback

    def rebinding(host, *a, **kw):
        if host != "cam.example":
            return real(host, *a, **kw)
        ip = next(answers, "127.0.0.1")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 0))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = "rtsp://cam.example:554/cam"
    assert check_source(url, allow_private=False) == url             # public at POST
    src = RtspSource(url, backoff=(0.05,), give_up_after=2, allow_private=False)
    opened = []
    monkeypatch.setattr(src, "_open", lambda: opened.append(1) or (_ for _ in ()).throw(OSError(111, "refused")))
    src.start()
    try:
        assert src.join(10) and src.status == "failed", src.status_dict()
        assert opened == [] and src.frames == 0
        assert src.last_error == {"code": "E_PATH_NOT_ALLOWED", "message": "expected a public camera address, got "
                                  "cam.example (127.0.0.1); private addresses need allow_private_sources in the "
                                  "settings"}
    finally:
        src.stop()
    with pytest.raises(LmsError) as e:                                  # POST now refuses it too
        check_source(url, allow_private=False)
    assert e.value.code == "E_PATH_NOT_ALLOWED"

    # a real camera on loopback: refused without allow_private, read with it (the service's default is off)
    shut = RtspSource(cameras.url("cam1"), backoff=(0.05,), give_up_after=1, allow_private=False)
    shut.start()
    assert shut.join(10) and shut.status == "failed" and shut.last_error["code"] == "E_PATH_NOT_ALLOWED"
    assert "(127.0.0.1)" in shut.last_error["message"] and shut.frames == 0


# --------------------------------------------------------------------------- pushed pictures
def test_push_jpeg_sampled_with_caller_pts_and_drop_counts():
    src = PushSource(fps=2, max_queue=64)
    kept = [src.push_image(jpeg(i), pts=i * 0.1) for i in range(30)]  # 10 fps, 3 s
    assert sum(kept) == 6
    src.close()
    frames = list(src)
    assert [f.pts for f in frames] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert [f.index for f in frames] == list(range(6))
    assert all(f.rgb.shape == (48, 64, 3) and f.rgb.dtype == np.uint8 for f in frames)
    assert src.skipped_by_fps == 24 and src.dropped == 0 and src.dropped_why == {}   # sampling is not loss
    d = src.status_dict()
    assert d["frames"] == 6 and d["last_pts"] == 2.5 and d["frames_received"] == 30 and d["status"] == "stopped"
    assert d["skipped_by_fps"] == 24 and d["dropped"] == 0


def test_push_arrival_time_and_backwards_pts():
    now = [100.0]
    src = PushSource(fps=1, clock=lambda: now[0])
    for i in range(8):  # no pts: arrival time, relative to the first frame
        src.push_image(jpeg(i))
        now[0] += 0.3
    src.close()
    assert [round(f.pts, 6) for f in src] == [0.0, 1.2, 2.1]

    src = PushSource(fps=None)
    assert src.push_image(jpeg(0), pts=5.0) == 1
    assert src.push_image(jpeg(1), pts=4.0) == 0  # before an earlier frame
    assert src.push_image(jpeg(2), pts=5.5) == 1
    assert src.dropped_why == {"pts_backwards": 1}
    for bad in (-1.0, float("nan"), float("inf"), "1.0", True):
        with pytest.raises(BadArgument):
            src.push_image(jpeg(3), pts=bad)


def test_push_bounded_queue_drops_oldest():
    src = PushSource(fps=None, max_queue=3)
    for i in range(10):
        src.push_image(jpeg(i), pts=float(i))
    assert src.queued == 3 and src.dropped_why == {"queue_full": 7}
    assert src.gaps == [(0.0, 7.0)]
    src.close()
    assert [f.pts for f in src] == [7.0, 8.0, 9.0]


def test_push_garbage_is_a_clear_error_and_the_next_frame_works():
    src = PushSource(fps=2)
    assert src.push_image(jpeg(0), pts=0.0) == 1
    with pytest.raises(NotAVideo) as ei:
        src.push_image(b"this is not a picture" * 10, pts=0.5)
    assert ei.value.code == "E_NOT_A_VIDEO" and ei.value.message.startswith("expected a JPEG, PNG or WebP")
    assert src.last_error == ei.value.to_dict()
    big = jpeg(1, w=320, h=240)
    with pytest.raises(NotAVideo, match="expected a complete JPEG picture, got a damaged one"):
        src.push_image(big[: len(big) * 3 // 4], pts=0.5)  # a truncated JPEG at a sampling target
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    with pytest.raises(NotAVideo, match="got GIF"):
        src.push_image(gif.getvalue(), pts=0.5)
    with pytest.raises(BadArgument):
        src.push_image("not bytes", pts=0.5)
    with pytest.raises(PayloadTooLarge):
        PushSource(max_pixels=1000).push_image(jpeg(0))  # 64 x 48 = 3072 pixels
    assert src.last_error["code"] == "E_NOT_A_VIDEO"                  # the GIF's
    assert src.push_image(jpeg(2), pts=0.5) == 1  # the target the bad ones missed is still open
    assert src.last_error is None and src.status_dict()["previous_error"]["code"] == "E_NOT_A_VIDEO"
    with pytest.raises(BadArgument, match="image pushes"):
        src.push_stream(b"\x1a\x45\xdf\xa3")
    src.close()
    assert [f.pts for f in src] == [0.0, 0.5]
    with pytest.raises(BadArgument, match="after close"):
        src.push_image(jpeg(3), pts=1.0)


def test_resize_to_is_bit_identical_to_resize_frame_nearest(webm_bytes):
    rng = np.random.default_rng(7)
    pictures = [rng.integers(0, 255, (48 + 8 * i, 64 + 12 * i, 3), dtype=np.uint8) for i in range(3)]
    src = PushSource(fps=None, resize_to=40)
    for i, a in enumerate(pictures):
        src.push_image(png_of(a), pts=float(i))
    src.close()
    out = list(src)
    assert len(out) == 3
    for a, f in zip(pictures, out):
        assert f.rgb.shape == (40, 40, 3) and np.array_equal(f.rgb, resize_frame_nearest(a, 40))

    full, small = PushSource(fps=None, max_queue=64), PushSource(fps=None, max_queue=64, resize_to=32)
    for s in (full, small):
        for ch in chunks(webm_bytes):
            s.push_stream(ch)
        s.close()
    fa, fs = list(full), list(small)
    assert len(fa) == len(fs) == 30
    for x, y in zip(fa, fs):
        assert x.pts == y.pts and np.array_equal(y.rgb, resize_frame_nearest(x.rgb, 32))


# --------------------------------------------------------------------------- pushed byte streams
def test_push_webm_stream_in_4k_chunks(webm_bytes):
    src = PushSource(fps=2, max_queue=64)
    c = Consumer(src)
    parts = chunks(webm_bytes)
    assert len(parts) >= 8
    added = [src.push_stream(p) for p in parts]
    assert sum(added[: len(parts) // 2]) >= 2  # frames come out while the stream is still arriving
    assert wait_for(lambda: c.count() >= 2, 5)
    src.close()
    c.thread.join(5)
    assert not c.thread.is_alive() and c.error is None
    pts = c.pts()
    assert pts == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5]), pts
    assert all(f.rgb.shape == (64, 96, 3) for _, f in c.frames)
    d = src.status_dict()
    assert d["frames_received"] == 30 and d["skipped_by_fps"] == 24 and d["dropped"] == 0 and d["gaps"] == []
    assert d["mode"] == "stream" and d["status"] == "stopped"


def test_a_byte_stream_pushed_faster_than_it_is_taken_is_held_back_not_shed(webm_bytes):
    """A whole file pushed at once, its consumer slower (an Encoder storing one frame at a time): every
    frame is kept and `push_stream` returns once they are all queued or taken. A socket's byte stream had
    its frames shed `queue full` (5 of 10 of a 3 KB MP4 sent as one message)."""
    for wait, kept in ((None, False), (30.0, True)):
        src = PushSource(fps=10, max_queue=2, wait_for_room_s=wait)
        got = []

        def slow():
            for f in src:
                time.sleep(0.02)
                got.append(f.pts)
        t = threading.Thread(target=slow, daemon=True)
        t.start()
        src.push_stream(webm_bytes)
        src.close()
        t.join(10)
        assert not t.is_alive()
        if kept:
            assert len(got) == 30 and src.dropped == 0 and src.gaps == [], (len(got), src.dropped_why)
        else:                                          # the default: pictures' rule, the oldest waiting shed
            assert len(got) < 30 and src.dropped_why.get("queue_full"), src.dropped_why
    with pytest.raises(BadArgument, match="wait_for_room_s"):
        PushSource(wait_for_room_s=-1)
    # held back mid-chunk, `stop` (a service stopping) ends it at once: `close` would wait on the push's lock
    src = PushSource(fps=10, max_queue=1, wait_for_room_s=30.0)
    it = iter(src)
    pushing = threading.Thread(target=lambda: src.push_stream(webm_bytes), daemon=True)
    pushing.start()
    next(it)                                          # one frame taken, then none: the push waits for room
    assert wait_for(lambda: src.queued == 1, 5)
    time.sleep(0.3)
    assert pushing.is_alive()                         # held back, not shedding
    t0 = time.monotonic()
    src.stop()
    pushing.join(5)
    assert not pushing.is_alive() and time.monotonic() - t0 < 2


def test_push_fragmented_mp4_stream():
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4", options={"movflags": "frag_keyframe+empty_moov+default_base_moof"}) as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt, s.options = 96, 64, "yuv420p", {"g": "5", "bf": "0"}
        for i in range(20):
            a = np.random.default_rng(i).integers(0, 255, (64, 96, 3), dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    parts = chunks(buf.getvalue())
    src = PushSource(fps=2, max_queue=64)
    added = [src.push_stream(p) for p in parts]
    assert sum(added[: len(parts) // 2]) >= 1, added  # not held back by FFmpeg's probing
    src.close()
    assert [f.pts for f in src] == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert src.last_error is None


def test_push_stream_garbage_then_a_good_stream(webm_bytes):
    src = PushSource(fps=None, max_queue=64)
    with pytest.raises(NotAVideo) as ei:
        src.push_stream(b"\x00garbage bytes, no header\xff" * 200)
    assert "expected the start of a WebM" in ei.value.message and "got 5200 bytes" in ei.value.message
    with pytest.raises(NotAVideo, match="expected a WebM or fragmented MP4 byte stream, got data FFmpeg cannot"):
        src.push_stream(b"\x1a\x45\xdf\xa3" + b"\x00 not matroska" * 300)  # a header that is not one
    for p in chunks(webm_bytes):  # a new stream (EBML header) works
        src.push_stream(p)
    src.close()
    assert len(list(src)) == 30


def test_push_stream_damaged_mid_way_raises_records_a_gap_and_goes_on(webm_bytes):
    src = PushSource(fps=None, max_queue=64)
    parts = chunks(webm_bytes)
    half = len(parts) // 2
    errors = []
    for p in parts[:half] + [b"\x00\x13 damaged \x37" * 400] + parts[half:]:
        try:
            src.push_stream(p)
        except NotAVideo as exc:
            errors.append(exc)
    src.close()
    pts = [f.pts for f in src]
    assert len(errors) == 1 and "unreadable bytes" in errors[0].message, errors
    assert 10 < len(pts) < 30 and pts[-1] == pytest.approx(2.9), pts
    assert len(src.gaps) == 1
    g0, g1 = src.gaps[0]
    assert not any(g0 < p < g1 for p in pts) and g1 - g0 > 0.15
    assert src.last_error is None and src.status_dict()["previous_error"]["code"] == "E_NOT_A_VIDEO"


def test_stop_ends_a_waiting_iteration_promptly():
    src = PushSource()
    c = Consumer(src)
    time.sleep(0.2)
    assert c.thread.is_alive()
    t0 = time.monotonic()
    src.stop()
    c.thread.join(1.0)
    assert not c.thread.is_alive() and time.monotonic() - t0 < 1.0 and c.error is None
    assert src.status == "stopped"
    with pytest.raises(LmsError):
        src.push_image(jpeg(0))


# --------------------------------------------------------------------------- what an unreachable camera says
class _TcpServer:
    """A loopback TCP server on a daemon thread that treats each connection with `reply(conn)`: the
    kinds of "camera" a wrong URL reaches (nothing that answers RTSP)."""

    def __init__(self, reply):
        import socket
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.reply, self.conns = reply, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self.reply, args=(conn,), daemon=True).start()

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def _http_answer(conn):
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


def _first_error(url: str, **kw) -> dict:
    src = RtspSource(url, backoff=(0.05,), give_up_after=2, open_timeout_s=2.0, read_timeout_s=1.0, **kw)
    c = Consumer(src)
    assert wait_for(lambda: src.last_error is not None, 15), src.status_dict()
    err = src.last_error
    c.finish(1.0)
    assert src.join(10)
    return err


@pytest.mark.timeout(60)
def test_an_unreachable_camera_says_what_happened_in_plain_words(cameras):
    """`last_error` of a camera that cannot be opened said "InvalidDataError: Invalid data found when
    processing input" for anything but a refused connection or a 404 (FFmpeg's RTSP demuxer reports most
    failures so); now each case in plain words, as "expected ..., got ...": refused, a port that accepts but
    never answers, a server that closes at once, a server that is not RTSP, a path the RTSP server does not
    serve."""
    from rtsp_server import free_port
    port = free_port()
    url = f"rtsp://user:secret@127.0.0.1:{port}/cam"
    shown = f"rtsp://user:***@127.0.0.1:{port}/cam"
    assert _first_error(url) == {"code": "E_SOURCE_UNREACHABLE", "message":
                                 f"expected a connection to {shown}, got connection refused (nothing listens on "
                                 f"127.0.0.1:{port})"}
    cases = ((lambda conn: None, "nothing for 1 s (the server accepted the connection, then sent nothing; timed out)"),
             (lambda conn: conn.close(), "the connection closed without an answer"),
             (_http_answer, "'HTTP/1.1 400 Bad Request' (the server is not an RTSP server)"))
    for reply, says in cases:
        srv = _TcpServer(reply)
        try:
            err = _first_error(f"rtsp://127.0.0.1:{srv.port}/cam")
        finally:
            srv.close()
        assert err == {"code": "E_SOURCE_UNREACHABLE",
                       "message": f"expected an RTSP answer from rtsp://127.0.0.1:{srv.port}/cam, got {says}"}
    err = _first_error(cameras.url("no-such-mount"))
    assert err == {"code": "E_INPUT_NOT_FOUND", "message": "expected the RTSP server of "
                   f"{cameras.url('no-such-mount')} to serve the path /no-such-mount, got 404 Not Found"}


@pytest.mark.timeout(30)
def test_a_host_name_that_cannot_be_one_fails_in_plain_words():
    """A 64-character label cannot be IDNA-encoded: the probe's create_connection raised UnicodeError, which
    crashed the reader ("RTSP reader crashed", E_INTERNAL). It is a permanent error saying so."""
    host = "a" * 64 + ".example"
    src = RtspSource(f"rtsp://{host}/cam", backoff=(0.05,), give_up_after=2)
    c = Consumer(src)
    c.thread.join(10)
    assert not c.thread.is_alive() and c.error is None and src.join(5)
    assert src.status == "failed" and src.last_error == {"code": "E_INPUT_NOT_FOUND", "message": (
        f"expected a connection to rtsp://{host}/cam, got {host!r}, which cannot be a host name "
        "(label empty or too long)")}, src.status_dict()


@pytest.mark.timeout(30)
def test_rtsps_says_the_server_accepted_a_connection_not_that_it_answered_rtsp():
    """For rtsps:// the probe only connects (it does not speak TLS), so it cannot say "the RTSP server
    answered" as it does for rtsp://."""
    srv = _TcpServer(lambda conn: conn.close())
    try:
        err = _first_error(f"rtsps://127.0.0.1:{srv.port}/cam")
    finally:
        srv.close()
    assert err["code"] == "E_SOURCE_UNREACHABLE", err
    assert err["message"].startswith(f"expected a readable video stream from rtsps://127.0.0.1:{srv.port}/cam, got ")
    assert err["message"].endswith(" (the server accepted a connection)") and "RTSP server" not in err["message"]


# --------------------------------------------------------------------------- the service's stream record
@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    from frame_cache.redis_server import RedisServer

    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv.url
    srv.stop()


class _Ring:
    """What `deploy.serving.run_rtsp_stream` needs of the frame cache, in memory."""

    def __init__(self):
        self.pts: list[float] = []

    def acquire_writer(self, sid):
        return 1

    def stream_info(self, sid):
        import types
        return types.SimpleNamespace(total_appended=len(self.pts), newest_pts=self.pts[-1] if self.pts else None)


@pytest.mark.timeout(90)
def test_a_cameras_stream_record_says_what_its_frames_do(camera, redis_url):
    """GET /v1/streams/{id} of a camera (`deploy.serving.run_rtsp_stream` -> `LiveStore` -> `stream_status`),
    with the Encoder and ring replaced by a list: `connecting` until a frame is stored (it said live with
    frames 0 and last_pts null), `dropped` 0 for a 10 fps camera at 1 fps (it said 852, the fps sampling,
    now `skipped_by_fps`), lag_s None and last_error set while the camera is away, last_error cleared
    (kept as previous_error) once it is live again, the outage a gap."""
    from deploy.serving import LiveStore, run_rtsp_stream, stream_status

    live, ring, sid = LiveStore(redis_url), _Ring(), "cam-record"
    live.delete(sid)
    live.create(sid, {"kind": "rtsp", "source": camera.url(), "fps": 1.0})
    gate = threading.Event()                       # the first frame is stored only once the test opens it
    encode = _storing(ring, gate)
    stop = threading.Event()
    runner = threading.Thread(target=run_rtsp_stream, args=(sid, camera.url(), 1.0, 32, encode, live, ring, stop),
                              daemon=True)
    runner.start()
    shown = lambda: stream_status(live.get(sid))   # noqa: E731
    try:
        # the camera opens and its first frame waits on the gate
        assert wait_for(lambda: (shown().get("frames_received") or 0) >= 1, 20), shown()
        d = shown()
        assert d["status"] == "connecting" and d["frames"] == 0 and d["last_pts"] is None, d
        assert d["frames_received"] >= 1 and d["lag_s"] is None, d
        gate.set()
        assert wait_for(lambda: shown()["frames"] >= 4, 20), shown()
        d = shown()
        assert d["status"] == "live" and d["last_pts"] is not None and d["lag_s"] is not None, d
        assert d["dropped"] == 0 and d["dropped_why"] == {} and d["skipped_by_fps"] >= 6 * d["frames"], d
        camera.kill()
        assert wait_for(lambda: shown()["status"] == "reconnecting", 10), shown()
        time.sleep(1.5)
        down = shown()
        assert down["lag_s"] is None and down["last_error"]["code"].startswith("E_SOURCE_"), down
        camera.start()
        n = shown()["frames"]
        assert wait_for(lambda: shown()["status"] == "live" and shown()["frames"] >= n + 2, 30), shown()
        back = shown()
        assert back["last_error"] is None and back["previous_error"] == down["last_error"], back
        assert len(back["gaps"]) == 1 and back["lag_s"] is not None and back["dropped"] == 0, back
    finally:
        gate.set()
        stop.set()
        runner.join(15)
    assert not runner.is_alive()
    d = shown()
    assert d["status"] == "stopped" and d["lag_s"] is not None, d       # its last frame's, kept
    live.delete(sid)


@pytest.mark.timeout(90)
def test_a_cameras_frames_the_encoder_refuses_are_counted_and_a_gap_as_a_sockets_are(camera, redis_url):
    """A camera whose frames the Encoder refuses (a full Redis: E_CACHE_BUDGET) kept only the error: no frame
    counted, no gap, so a question over the span said `gaps: []`. Now they are "not stored" in `dropped_why`,
    the span from the last stored frame to the newest refused one is a gap while it lasts, closed at the next
    stored frame, and the error is `previous_error` once frames are stored again, as a socket's."""
    from deploy.serving import LiveStore, stream_status

    live, ring, sid = LiveStore(redis_url), _Ring(), "cam-refused"
    live.delete(sid)
    live.create(sid, {"kind": "rtsp", "source": camera.url(), "fps": 1.0})
    full = threading.Event()
    store = _storing(ring)
    full_err = {"code": "E_CACHE_BUDGET", "message": "expected Redis at ... to have memory, got it full"}
    encode = lambda items: [{"error": full_err} for _ in items] if full.is_set() else store(items)   # noqa: E731
    runner, stop = _run_camera(sid, camera.url(), live, ring, encode)
    shown = lambda: stream_status(live.get(sid))   # noqa: E731
    try:
        assert wait_for(lambda: shown()["frames"] >= 2, 20), shown()
        full.set()
        last = ring.pts[-1]
        assert wait_for(lambda: (shown().get("dropped_why") or {}).get("not stored", 0) >= 3, 20), shown()
        d = shown()
        assert d["last_error"] == full_err and d["dropped"] == d["dropped_why"]["not stored"], d
        assert d["gaps"] and d["gaps"][-1][0] == last and d["gaps"][-1][1] >= last + 2, d
        full.clear()
        n = len(ring.pts)
        assert wait_for(lambda: len(ring.pts) >= n + 2 and shown()["last_error"] is None, 20), shown()
        back = shown()
        after = next(p for p in ring.pts if p > last)
        assert back["previous_error"] == full_err and [last, after] in back["gaps"], (back, ring.pts)
        assert back["dropped_why"]["not stored"] >= d["dropped_why"]["not stored"], back
    finally:
        full.clear()
        stop.set()
        runner.join(15)
    assert not runner.is_alive()
    live.delete(sid)


def test_a_pushed_streams_record_is_connecting_live_then_stalled(redis_url):
    """A socket's stream (deploy/routes.py writes "connecting" at its start, then frames as they are stored,
    never "live"): `connecting` until the first frame is stored, `live`, `stalled` once none was stored for
    LiveStore.PUSH_STALL_S (it stayed live forever), live with the next; lag_s None while stalled."""
    from deploy.serving import LiveStore, stream_status

    live, sid = LiveStore(redis_url), "sock-record"
    live.delete(sid)
    live.create(sid, {"kind": "push", "source": "websocket", "fps": 1.0})
    live.update(sid, status="connecting", fps=1.0)                # the socket's start
    assert stream_status(live.get(sid))["status"] == "connecting"
    live.update(sid, frames=1, last_pts=0.0, dropped=0, dropped_why={}, lag_s=0.02)
    d = live.get(sid)
    at = d["last_wall"]
    assert abs(at - time.time()) < 5
    assert stream_status(d, now=at + 1)["status"] == "live" and stream_status(d, now=at + 1)["lag_s"] == 0.02
    late = stream_status(d, now=at + LiveStore.PUSH_STALL_S + 0.5)
    assert late["status"] == "stalled" and late["lag_s"] is None, late
    live.update(sid, status="stopped")
    d = stream_status(live.get(sid), now=at + 60)
    assert d["status"] == "stopped" and d["lag_s"] == 0.02, d                  # its last frame's, kept
    live.update(sid, status="connecting", fps=1.0)                # a new socket takes it over: no frame yet
    assert stream_status(live.get(sid), now=at + 60)["status"] == "connecting"
    live.update(sid, status="live", fps=1.0)                      # what a socket wrote before: the same
    assert stream_status(live.get(sid), now=at + 60)["status"] == "connecting"
    live.delete(sid)


def test_a_record_written_after_its_delete_stays_gone(redis_url):
    """A socket's frame update that lands after DELETE ?purge=true (the Encoder answered before the fence)
    wrote a hash of frames/last_pts alone: GET said 200 with kind and status null, and a stream created again
    under the id merged into it. An update now writes only to a record that exists; create replaces."""
    from deploy.serving import LiveStore, NotFound

    live, sid = LiveStore(redis_url), "sock-purged"
    live.create(sid, {"kind": "push", "source": "websocket", "fps": 1.0})
    assert live.update(sid, frames=1, last_pts=0.0) is True
    live.delete(sid)
    assert live.update(sid, frames=2, last_pts=1.0, dropped=0, skipped_by_fps=3) is False
    with pytest.raises(NotFound):
        live.get(sid)
    live.r.hset(live._key(sid), mapping={"skipped_by_fps": "7", "frames": "9"})    # left by an older service
    live.create(sid, {"kind": "rtsp", "source": "rtsp://h/x", "fps": 2.0})
    d = live.get(sid)
    assert d["kind"] == "rtsp" and d["frames"] == 0 and "skipped_by_fps" not in d, d
    live.delete(sid)


def test_a_pushed_stream_at_a_low_fps_stays_live_between_its_samples(redis_url):
    """At fps 0.1 a socket pushing 30 frames a second stores one every 10 s: it showed stalled 5 s after
    each (live -> stalled -> live while frames arrived). A pushed stream stalls after max(5 s, 2 / fps)."""
    from deploy.serving import LiveStore, stream_status

    live, sid = LiveStore(redis_url), "sock-slow"
    live.delete(sid)
    live.create(sid, {"kind": "push", "source": "websocket", "fps": 0.1})
    live.update(sid, status="connecting", fps=0.1)
    live.update(sid, frames=1, last_pts=0.0, lag_s=0.02)
    at = live.get(sid)["last_wall"]
    assert LiveStore.push_stall_s(0.1) == 20.0 and LiveStore.push_stall_s(1.0) == LiveStore.PUSH_STALL_S
    assert LiveStore.push_stall_s(None) == LiveStore.PUSH_STALL_S
    for dt, want in ((1, "live"), (9.9, "live"), (15, "live"), (20.5, "stalled")):
        d = stream_status(live.get(sid), now=at + dt)
        assert d["status"] == want and (d["lag_s"] is None) == (want == "stalled"), (dt, d)
    live.delete(sid)


def _run_camera(sid, url, live, ring, encode):
    """`deploy.serving.run_rtsp_stream` on a daemon thread; returns (thread, stop event)."""
    from deploy.serving import run_rtsp_stream

    stop = threading.Event()
    runner = threading.Thread(target=run_rtsp_stream, args=(sid, url, 1.0, 32, encode, live, ring, stop), daemon=True)
    runner.start()
    return runner, stop


def _storing(ring, gate=None):
    def encode(items):
        if gate is not None:
            gate.wait(30)
        out = []
        for it in items:
            ring.pts.extend(it.pts)
            out.append({"seqs": list(range(len(ring.pts) - len(it.pts), len(ring.pts)))})
        return out
    return encode


@pytest.mark.timeout(60)
def test_a_restarted_cameras_last_error_stays_until_its_source_has_its_own(redis_url):
    """The error a camera's record holds when its source (re)starts (the supervisor's E_UNAVAILABLE after
    an actor restart, the camera's error before a service restart) was wiped by the first publish, 1 s in,
    while the camera stayed unreachable. It stays until the new source records an error of its own or
    receives a frame, and is then previous_error."""
    import socket
    from deploy.serving import LiveStore, stream_status

    live = LiveStore(redis_url)
    was = {"code": "E_UNAVAILABLE", "message": "expected the camera's source on node n1 to keep running, got it "
                                               "ended (ActorDiedError: ...); restarting"}
    before = {"code": "E_SOURCE_TIMEOUT", "message": "an older one"}
    silent = socket.socket()                        # the kernel accepts; nothing answers: no word for 15 s
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    refused = socket.socket()                       # bound, never listening: connection refused at once
    refused.bind(("127.0.0.1", 0))
    runs = []
    try:
        for sid, port in (("cam-silent", silent.getsockname()[1]), ("cam-refused", refused.getsockname()[1])):
            live.delete(sid)
            live.create(sid, {"kind": "rtsp", "source": f"rtsp://127.0.0.1:{port}/cam", "fps": 1.0})
            live.update(sid, status="reconnecting", last_error=was, previous_error=before)
            runs.append(_run_camera(sid, f"rtsp://127.0.0.1:{port}/cam", live, _Ring(), _storing(_Ring())))
        shown = lambda sid: stream_status(live.get(sid))   # noqa: E731
        time.sleep(2.5)                                 # two publishes at least; FFmpeg waits 5 s for an answer
        d = shown("cam-silent")
        assert d["status"] in ("connecting", "reconnecting") and d["frames_received"] == 0, d
        assert d["last_error"] == was and d["previous_error"] == before, d
        assert wait_for(lambda: (shown("cam-refused")["last_error"] or {}).get("code") == "E_SOURCE_UNREACHABLE",
                        20), shown("cam-refused")
        d = shown("cam-refused")
        assert d["last_error"]["message"].startswith("expected a connection to rtsp://127.0.0.1:"), d
        assert d["previous_error"] == was, d
    finally:
        for runner, stop in runs:
            stop.set()
        for runner, stop in runs:
            runner.join(20)
        silent.close()
        refused.close()
    assert not any(runner.is_alive() for runner, _ in runs)
    live.delete("cam-silent")
    live.delete("cam-refused")


@pytest.mark.timeout(90)
def test_a_stale_status_snapshot_never_lands_after_the_first_stored_frame(camera, redis_url):
    """`publish` runs on the status thread and on the frame loop: a snapshot the status thread took before
    the first frame was stored ("connecting", frames 0) could be written after the frame loop's "live", so
    the stream showed connecting for up to a second with a frame stored. One publish at a time now. Also:
    the error carried from before is previous_error once frames arrive, before one is stored."""
    from deploy.serving import LiveStore, stream_status

    writes: list = []
    slow, in_write, written = threading.Event(), threading.Event(), threading.Event()

    class SlowLive(LiveStore):
        def update(self, rid, **fields):
            held = fields.get("status") == "connecting" and slow.is_set()
            if held:
                slow.clear()
                in_write.set()
                time.sleep(1.5)                         # the status thread's write, held up
            super().update(rid, **fields)
            if "status" in fields:
                writes.append((fields["status"], fields.get("frames")))
            if held:
                written.set()

    live, ring, sid, gate = SlowLive(redis_url), _Ring(), "cam-race", threading.Event()
    live.delete(sid)
    live.create(sid, {"kind": "rtsp", "source": camera.url(), "fps": 1.0})
    was = {"code": "E_UNAVAILABLE", "message": "restarting"}
    live.update(sid, status="reconnecting", last_error=was)
    runner, stop = _run_camera(sid, camera.url(), live, ring, _storing(ring, gate))
    shown = lambda: stream_status(live.get(sid))   # noqa: E731
    try:
        assert wait_for(lambda: (shown().get("frames_received") or 0) >= 1, 20), shown()
        assert wait_for(lambda: shown()["last_error"] is None, 5), shown()
        d = shown()
        assert d["status"] == "connecting" and d["frames"] == 0 and d["previous_error"] == was, d
        slow.set()
        assert in_write.wait(5)                          # a "connecting" snapshot (frames 0) is on its way
        gate.set()                                       # meanwhile the first frame is stored
        assert written.wait(5) and wait_for(lambda: shown()["frames"] >= 2, 20), shown()
        first_live = next(i for i, (st, _) in enumerate(writes) if st == "live")
        assert all(st != "connecting" for st, _ in writes[first_live:]), writes
        assert shown()["status"] == "live", shown()
    finally:
        gate.set()
        stop.set()
        runner.join(15)
    assert not runner.is_alive()
    live.delete(sid)


def test_metrics_show_a_stream_as_get_does(redis_url):
    """/metrics read the raw record: a stalled socket stream kept exporting its last lag (GET shows null),
    and `lms_stream_frames_dropped` was the ring's overwrites while GET's `dropped` is frames shed. Now the
    lag goes through `stream_status`, dropped is the record's shed count, overwrites and frames sampled out
    by fps have metrics of their own; those that only grow are counters (``_total``), as Prometheus
    expects of them (they were gauges)."""
    import re
    from deploy.routes import Metrics
    from deploy.serving import LiveStore

    live, sid = LiveStore(redis_url), "sock-metrics"
    live.delete(sid)
    live.create(sid, {"kind": "push", "source": "websocket", "fps": 1.0})
    live.update(sid, status="connecting", fps=1.0)
    live.update(sid, frames=10, last_pts=9.0, lag_s=0.5, dropped=2, dropped_why={"bad frame": 2},
                skipped_by_fps=7)
    info = types.SimpleNamespace(count=3, total_appended=10, evicted=7, bytes_used=100, light_bytes=10)
    cache = types.SimpleNamespace(streams=lambda: [sid], stream_info=lambda s: info)
    b = types.SimpleNamespace(cache=cache, store=types.SimpleNamespace(ids=lambda: []), live=live)

    def gauges() -> dict:
        text = Metrics().render(b).decode()
        return {m[0]: float(m[1]) for m in re.findall(r'^(lms_stream_\w+)\{stream="sock-metrics"\} (\S+)$', text, re.M)}
    try:
        g = gauges()
        assert g == {"lms_stream_frames": 3, "lms_stream_frames_ingested_total": 10,
                     "lms_stream_frames_overwritten_total": 7, "lms_stream_frames_dropped_total": 2,
                     "lms_stream_frames_skipped_by_fps_total": 7, "lms_stream_bytes": 110,
                     "lms_stream_lag_seconds": 0.5}, g
        live.update(sid, last_wall=time.time() - 60)               # the socket stalled: GET shows lag_s null
        g = gauges()
        assert "lms_stream_lag_seconds" not in g and g["lms_stream_frames_dropped_total"] == 2, g
    finally:
        live.delete(sid)


def test_a_reconnect_after_an_opening_burst_keeps_the_outage_in_stream_time():
    """A session's opening burst puts stream time ahead of the wall clock (here by 3.2 s: frames 0-4 s of
    camera time arrive within 0.8 s). A new connection's first frame was placed at the wall-clock time since
    the first frame, never before the previous frame: after a 2 s silence that is 4.0, the previous frame's
    time, and the outage vanished from `gaps` (the service test of a camera killed and restarted at once
    failed so under load). It is now at least the silence less `_REOPEN_LAG_S` later."""
    from stream.live import _REOPEN_LAG_S, _StreamClock
    clock = _StreamClock(wall_check=True)
    assert clock.time(0.0, 100.0) == 0.0
    for i, src_t in enumerate((1.0, 2.0, 3.0, 4.0), 1):
        assert clock.time(src_t, 100.0 + 0.2 * i) == src_t
    clock.new_source()
    t = clock.time(0.0, 102.8)                         # 2 s after the previous frame's arrival
    assert t == pytest.approx(4.0 + 2.0 - _REOPEN_LAG_S), t
    assert clock.time(1.0, 103.8) == pytest.approx(t + 1.0)
    clock.new_source()                                 # each reconnect shortens the lead by _REOPEN_LAG_S
    assert clock.time(0.0, 160.0) == pytest.approx(t + 1.0 + (160.0 - 103.8) - _REOPEN_LAG_S)
    for _ in range(3):                                 # until the wall clock since the first frame rules
        clock.new_source()
        last = clock.last_t
        clock.time(0.0, 200.0 + 10 * _)
    assert clock.last_t == pytest.approx(220.0 - 100.0) and clock.last_t > last
