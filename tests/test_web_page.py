"""The web page at / (deploy/web/index.html) driven in Debian's Chromium (Playwright, fake webcam) against
one real `lmstream serve`: one socket at a time, frames sent with their own pts, attached streams'
frames, unknown words, Enter, "over the last" checked, asking after Stop, a failed attach (the defects
a new user found driving the page with Playwright).

LMSTREAM_TEST_PAGE=FILE serves FILE at / instead (Playwright intercepts the request), to check that
these tests fail on another version of the page, e.g. `git show HEAD~1:deploy/web/index.html`."""
from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service_fixtures import KEY  # media, redis_srv, service: registered by conftest.py
from tests.test_service import _push_frames, _ws_url

# one pytest worker runs every file that starts Ray (run-tests.sh: --dist loadgroup), never two Ray at once
pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("ray")]
CHROMIUM_ARGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--no-sandbox",
                 "--disable-gpu", "--no-first-run", "--disable-background-networking"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        args = CHROMIUM_ARGS[:]
        if os.environ.get("LMSTREAM_TEST_PAGE"):   # a page Playwright fulfils has no address: let it reach loopback
            args.append("--disable-features=LocalNetworkAccessChecks")
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=args)
        yield b
        b.close()


class Page:
    """A fresh page (its own browser context) at the service's /, the key typed in, and every WebSocket
    message it sends recorded per socket: `sent[i]` is socket i's list of str (JSON) or bytes."""

    def __init__(self, browser, service):
        self.service = service
        self.page = browser.new_page()
        self.sent: list[list] = []
        self.page.on("websocket", self._socket)
        alt = os.environ.get("LMSTREAM_TEST_PAGE")
        if alt:
            html = Path(alt).read_text()
            self.page.route(service.url + "/", lambda route: route.fulfill(body=html, content_type="text/html"))
        self.page.goto(service.url + "/")
        self.page.fill("#key", KEY)

    def _socket(self, ws):
        msgs: list = []
        self.sent.append(msgs)
        ws.on("framesent", lambda payload: msgs.append(payload))

    def text(self, sel: str) -> str:
        return self.page.text_content(sel)

    def wait(self, js: str, timeout: float = 30) -> None:
        self.page.wait_for_function(js, timeout=timeout * 1000)

    def wait_frames(self, n: int, timeout: float = 30) -> None:
        self.wait(f"Number(document.getElementById('frames').textContent) >= {n}", timeout)

    def attach(self, sid: str) -> None:
        self.page.fill("#attachId", sid)
        self.page.click("#attach")

    def ask(self, question: str, last_s: str = "60", enter: bool = False) -> None:
        self.page.evaluate("delete document.body.dataset.answered")
        self.page.fill("#question", question)
        self.page.fill("#lastS", last_s)
        if enter:
            self.page.press("#question", "Enter")
        else:
            self.page.click("#ask")

    def answered(self, timeout: float = 60) -> str:
        self.wait("document.body.dataset.answered === '1'", timeout)
        return self.text("#answer")

    def close(self) -> None:
        self.page.context.close()


@pytest.fixture
def open_page(browser, service):
    pages: list[Page] = []

    def make() -> Page:
        pages.append(Page(browser, service))
        return pages[-1]
    yield make
    for p in pages:
        p.close()


@pytest.fixture(scope="module")
def fed(service, media) -> str:
    """A stopped push stream of 12 frames of the test scene (pts 0..11), fed by a websockets client."""
    import asyncio
    import websockets
    from stream.decode import VideoSource
    frames = [(f.pts, f.rgb) for f in VideoSource(media / "scene.mp4", fps=1.0, resize_to=64)][:12]

    async def push() -> str:
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 1}))
            sid = json.loads(await ws.recv())["stream_id"]
            await _push_frames(ws, frames)
            await ws.send(json.dumps({"type": "stop"}))
            assert json.loads(await ws.recv())["frames"] == len(frames)
            return sid
    with ThreadPoolExecutor(1) as pool:            # Playwright's sync API holds this thread's event loop
        return pool.submit(asyncio.run, push()).result()


def _stream(service, sid: str) -> dict:
    with service.client() as c:
        return c.get(f"/v1/streams/{sid}").json()


def _wait_status(service, sid: str, status: str, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while (d := _stream(service, sid))["status"] != status and time.monotonic() < deadline:
        time.sleep(0.5)
    return d


def _types(msgs: list) -> list[str]:
    return [json.loads(m)["type"] if isinstance(m, str) else "<binary>" for m in msgs]


def test_each_frame_goes_with_its_own_pts_so_none_is_shed_over_fps(open_page, service):
    """Each JPEG follows {"type": "frame", "pts": S} with S its own time since the first frame, one frame
    per 1/fps slot: timer and network jitter cannot make the 1 fps sampler shed one (it did at every start)."""
    p = open_page()
    p.page.click("#connect")
    p.wait_frames(5)
    sid = p.text("#streamId")
    (msgs,) = p.sent
    types = _types(msgs)
    assert types[0] == "start" and set(types[1::2]) == {"frame"} and set(types[2::2]) == {"<binary>"}, types
    pts = [json.loads(m)["pts"] for m in msgs[1::2]]
    slots = [math.floor(x + 1e-6) for x in pts]                  # the sampler keeps the first frame of each
    assert pts[0] == 0 and all(a < b for a, b in zip(slots, slots[1:])), pts
    assert pts[-1] < len(pts) + 1, pts                           # 1 frame/s, not fewer
    d = _stream(service, sid)
    # frames sampled out by fps are the record's skipped_by_fps, not dropped: both must be 0
    assert d["dropped"] == 0 and d.get("skipped_by_fps", 0) == 0 and p.text("#dropped") == "0", (d, p.text("#log"))


def test_starting_or_attaching_again_ends_the_previous_socket(open_page, service):
    """A second Start stops the first stream (its slot freed, one frame timer left); Attach while
    streaming stops the stream and sends no frame on the read-only socket; Stop then detaches."""
    p = open_page()
    p.page.click("#connect")
    p.wait_frames(2)
    sid1 = p.text("#streamId")
    p.page.click("#connect")
    p.wait(f"document.getElementById('streamId').textContent.startsWith('live-') && "
           f"document.getElementById('streamId').textContent !== '{sid1}'")
    sid2 = p.text("#streamId")
    assert _wait_status(service, sid1, "stopped")["status"] == "stopped", _stream(service, sid1)
    p.wait_frames(3)
    time.sleep(1.5)
    d2 = _stream(service, sid2)                                  # one timer: nothing shed, nothing over fps
    assert d2["dropped"] == 0 and d2.get("skipped_by_fps", 0) == 0, (d2, p.text("#log"))
    assert [_types(s)[0] for s in p.sent] == ["start", "start"] and p.sent[0][-1] == '{"type":"stop"}'
    p.attach(sid1)
    p.wait("document.getElementById('status').textContent.startsWith('attached')")
    assert p.text("#streamId") == sid1
    assert _wait_status(service, sid2, "stopped")["status"] == "stopped", _stream(service, sid2)
    time.sleep(2.5)                                              # a leftover timer would send frames by now
    assert _types(p.sent[2]) == ["attach"], _types(p.sent[2])
    assert "before frames" not in p.text("#log"), p.text("#log")
    assert p.text("#stop") == "Detach"
    p.page.click("#stop")
    p.wait("document.getElementById('status').textContent.startsWith('detached')", 10)
    assert p.page.is_disabled("#ask") and p.text("#streamId") == "-"


def test_an_attached_page_shows_the_streams_frames_as_they_grow(open_page, service):
    """An attached socket gets no "ingested" messages: the page reads the stream's frames from GET
    /v1/streams/{id} while attached (it stayed at the count of the moment it attached)."""
    feeder = open_page()
    feeder.page.click("#connect")
    feeder.wait_frames(1)
    sid = feeder.text("#streamId")
    watcher = open_page()
    watcher.attach(sid)
    watcher.wait("document.getElementById('status').textContent.startsWith('attached')")
    at_attach = int(watcher.text("#frames"))
    watcher.wait_frames(at_attach + 3, 20)
    assert "the stream is live" in watcher.text("#status"), watcher.text("#status")
    assert watcher.text("#lastPts") != "-"


def test_an_answer_names_the_words_the_model_does_not_know(open_page, fed):
    """docs/service.md "Unknown words": the demo model knows 93 words; "tell me ..." gets a warning
    naming them beside the answer, and a question in its words none."""
    p = open_page()
    p.attach(fed)
    p.wait("!document.getElementById('ask').disabled")
    p.ask("tell me the colour of the circle ?")
    p.answered()
    assert p.page.is_visible("#unknown"), (p.text("#answer"), p.text("#meta"))
    warning = p.text("#unknown")
    assert '"tell"' in warning and '"me"' in warning and "may be off" in warning, warning
    p.ask("what colour is the circle ?")
    p.answered()
    assert not p.page.is_visible("#unknown"), p.text("#unknown")


def test_enter_in_the_question_box_asks(open_page, fed):
    """Enter in the question box asks, over the window typed beside it (Enter did nothing)."""
    p = open_page()
    p.attach(fed)
    p.wait("!document.getElementById('ask').disabled")
    p.ask("what colour is the circle ?", last_s="5", enter=True)
    assert p.answered(30) and p.text("#meta").startswith("5 frames (7-11 s)"), p.text("#meta")
    assert json.loads(p.sent[0][-1])["last_s"] == 5


def test_a_window_of_zero_seconds_is_refused_in_words(open_page, fed):
    """An "over the last" of 0 s (or below, or none) silently became 60 s; now the page says why it
    does not ask, and sends nothing."""
    p = open_page()
    p.attach(fed)
    p.wait("!document.getElementById('ask').disabled")
    for bad in ("0", "-5", ""):
        p.ask("what colour is the circle ?", last_s=bad)
        time.sleep(0.5)
        assert f'above 0, got "{bad}"' in p.text("#answer"), p.text("#answer")
    assert "ask" not in _types(p.sent[0]), _types(p.sent[0])


def test_after_stop_the_page_still_asks_about_the_stream(open_page, service):
    """Stop stores the frames and attaches to the stopped stream, so Ask stays enabled (it was disabled)."""
    p = open_page()
    p.page.click("#connect")
    p.wait_frames(3)
    sid = p.text("#streamId")
    p.page.click("#stop")
    p.wait("document.getElementById('status').textContent.startsWith('stopped')", 15)
    p.wait("!document.getElementById('ask').disabled", 15)
    assert p.text("#streamId") == sid and "ask about it here" in p.text("#status"), p.text("#status")
    n = _stream(service, sid)["frames"]
    assert n >= 3 and p.text("#frames") == str(n)
    p.ask("what is in the video ?")
    p.answered()
    assert p.text("#meta").startswith(f"{n} frames"), p.text("#meta")


def test_a_failed_attach_says_so_and_shows_no_stale_stream(open_page, fed):
    """E_NOT_FOUND is shown; with nothing attached the stream fields are cleared, and a stream already
    attached stays attached and answers (the old page showed the old status and id, and asked on a
    socket attached to nothing)."""
    p = open_page()
    p.attach("nope-123")
    p.wait("document.getElementById('status').textContent.includes('E_NOT_FOUND')", 10)
    assert p.text("#status").startswith("not attached to nope-123: E_NOT_FOUND"), p.text("#status")
    assert p.text("#streamId") == "-" and p.page.is_disabled("#ask")
    p.attach(fed)
    p.wait("document.getElementById('status').textContent.startsWith('attached')")
    p.attach("nope-456")
    p.wait("document.getElementById('status').textContent.includes('E_NOT_FOUND')", 10)
    assert p.text("#status").startswith("could not attach to nope-456: E_NOT_FOUND"), p.text("#status")
    assert p.text("#status").endswith(f"still attached to {fed}") and p.text("#streamId") == fed
    p.ask("what colour is the circle ?")
    p.answered()
    assert p.text("#meta").startswith("12 frames"), p.text("#meta")


def test_attaching_to_a_video_asks_no_stream_route_and_a_lost_service_is_said_in_words(open_page, service, media):
    """A video's id attached: the page asked GET /v1/streams/{id} first, a 404 in the console every 2 s; the
    `attached` reply now says the kind. A socket that drops (the service stopped or restarted) showed only
    "closed (1006)"; it is now said in words."""
    with service.client() as c:
        with open(media / "scene.mp4", "rb") as f:
            vid = c.post("/v1/videos", files={"file": ("scene.mp4", f, "video/mp4")}).json()["id"]
        deadline = time.monotonic() + 120
        while c.get(f"/v1/videos/{vid}").json()["status"] != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.5)
    p = open_page()
    statuses: list[tuple[int, str]] = []
    p.page.on("response", lambda r: statuses.append((r.status, r.url)))
    p.attach(vid)
    p.wait("document.getElementById('status').textContent.includes('the video is ready')", 20)
    assert p.page.is_disabled("#watch")                         # a video has no watches
    assert not [s for s in statuses if s[0] >= 400], statuses
    assert any(f"/v1/videos/{vid}" in u for _, u in statuses) and not any("/v1/streams/" in u for _, u in statuses)
    # the socket dropped without a close frame, as when the service goes away
    p.page.evaluate("cur.ws.dispatchEvent(new CloseEvent('close', {code: 1006}))")
    p.wait("document.getElementById('status').textContent.startsWith('the connection to the service was lost')", 5)
    assert "(1006)" in p.text("#status") and "press Start or Attach to connect again" in p.text("#status")
