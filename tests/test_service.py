"""The service with its real parts: `lmstream serve` (Ray Serve) as a user starts it, a real
redis-server, real HTTP (httpx) and the official `openai` client. One service per test session,
shared with test_web_page.py (tests/service_fixtures.py: it takes about a minute to come up on 2
cores); a restart and a Redis outage are tested at the end."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from frame_cache.redis_server import free_port
from service_fixtures import DEMO, KEY, REPO  # media, redis_srv, service: registered by conftest.py
# one pytest worker runs every file that starts Ray (run-tests.sh: --dist loadgroup), never two Ray at once
pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("ray")]


@pytest.fixture(scope="module")
def demo_model():
    from model import LlavaMini
    return LlavaMini.from_pretrained(DEMO)


def upload_until_frames(c: httpx.Client, path: Path, timeout: float = 120) -> str:
    """Uploads `path` as a file job and waits until it has stored frames (still queued or ingesting):
    its id."""
    with open(path, "rb") as f:
        r = c.post("/v1/videos", files={"file": (path.name, f, "video/mp4")})
    assert r.status_code == 202, r.text
    vid = r.json()["id"]
    deadline = time.monotonic() + timeout
    while (d := c.get(f"/v1/videos/{vid}").json())["frames"] == 0:
        assert d["status"] in ("queued", "ingesting") and time.monotonic() < deadline, d
        time.sleep(0.1)
    return vid


def wait_ready(c: httpx.Client, vid: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = c.get(f"/v1/videos/{vid}").json()
        if d["status"] in ("ready", "failed"):
            return d
        time.sleep(0.5)
    raise AssertionError(f"video {vid} not ready after {timeout} s: {d}")


@pytest.fixture(scope="module")
def uploaded(service, media):
    with service.client() as c:
        with open(media / "scene.mp4", "rb") as f:
            r = c.post("/v1/videos", files={"file": ("scene.mp4", f, "video/mp4")})
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "queued"
        d = wait_ready(c, r.json()["id"])
    assert d["status"] == "ready", d
    return d


QUESTIONS = ["what colour is the circle ?", "how many objects are there ?", "is there a red square ?"]


def test_health_needs_no_key_everything_else_does(service):
    with service.client(key=None) as c:
        assert c.get("/health").json() == {"status": "ok"}
        for method, path in (("GET", "/ready"), ("GET", "/v1/videos"), ("GET", "/metrics"), ("GET", "/v1/models"),
                             ("POST", "/v1/chat/completions"), ("POST", "/v1/videos")):
            r = c.request(method, path)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == "E_UNAUTHORIZED"
        for path in ("/docs", "/redoc", "/nowhere"):     # the key comes first: no path is told apart without one
            assert c.get(path).status_code == 401, path
        r = c.get("/openapi.json")                       # was 200 without a key
        assert r.status_code == 401 and r.json()["error"]["code"] == "E_UNAUTHORIZED", r.text
    with service.client(key="wrong") as c:
        assert c.get("/v1/videos").status_code == 401
    with service.client() as c:
        assert c.get("/ready").json() == {"ready": True, "redis": True, "model": True}
        assert "/v1/videos/{vid}/questions" in c.get("/openapi.json").json()["paths"]
        for path in ("/docs", "/redoc"):                 # no Swagger pages: they could not send a key
            assert c.get(path).status_code == 404, path


def test_upload_then_answers_equal_the_engine_token_for_token(service, uploaded, media, demo_model):
    assert uploaded["frames"] == 40 and uploaded["duration_s"] == pytest.approx(40.0) and uploaded["progress"] == 1.0
    with service.client() as c:
        for q in QUESTIONS:
            r = c.post(f"/v1/videos/{uploaded['id']}/questions", json={"question": q, "max_tokens": 8})
            assert r.status_code == 200, r.text
            got = r.json()
            want = demo_model.ask(media / "scene.mp4", q, max_new_tokens=8)
            assert got["token_ids"] == want.token_ids and got["text"] == want.text, q
            assert got["frames"] == 40 and got["frames_fused"] == 40 and got["time_span"] == [0.0, 39.0]
            assert got["policy"] == "exact" and got["kv_policy"] == "exact" and got["gaps"] == []
            assert {"fuse_s", "prefill_s", "generate_s", "first_token_s"} <= set(got["timings"])
        # a window and a budget policy, reported
        r = c.post(f"/v1/videos/{uploaded['id']}/questions",
                   json={"question": QUESTIONS[0], "window": [10, 20], "policy": "budget:4"})
        d = r.json()
        assert d["time_span"] == [10.0, 19.0] and d["frames"] == 10 and d["frames_fused"] == 4
        assert d["policy"].startswith("budget:4")


def test_streamed_tokens_concatenate_to_the_answer(service, uploaded):
    with service.client() as c:
        plain = c.post(f"/v1/videos/{uploaded['id']}/questions", json={"question": QUESTIONS[1]}).json()
        with c.stream("POST", f"/v1/videos/{uploaded['id']}/questions",
                      json={"question": QUESTIONS[1], "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events, kind = [], None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line[6:])))
    assert [k for k, _ in events[:-1]] == ["token"] * (len(events) - 1) and events[-1][0] == "answer"
    assert "".join(d["text"] for _, d in events[:-1]) == plain["text"] == events[-1][1]["text"]
    assert [d["token_id"] for _, d in events[:-1]] == plain["token_ids"] == events[-1][1]["token_ids"]


def test_choices_answer_the_likeliest_candidate_as_the_engine_does(service, uploaded, media, demo_model):
    """`choices`: nothing is generated; the reply is the candidate the model finds likeliest, with
    every candidate's log-probability, the same as the in-process engine's over the same video."""
    q, choices = "what colour is the circle?", ["red", "green", "blue", "yellow", "white", "purple", "orange"]
    want = demo_model.ask(media / "scene.mp4", q, choices=choices)
    with service.client() as c:
        got = c.post(f"/v1/videos/{uploaded['id']}/questions", json={"question": q, "choices": choices}).json()
        assert got["text"] == want.text and got["token_ids"] == want.token_ids
        assert [d["text"] for d in got["choices"]] == choices
        assert [d["logprob"] for d in got["choices"]] == pytest.approx([d["logprob"] for d in want.choices], abs=1e-3)
        assert got["text"] == max(got["choices"], key=lambda d: d["logprob"])["text"]
        with c.stream("POST", f"/v1/videos/{uploaded['id']}/questions",
                      json={"question": q, "choices": choices, "stream": True}) as r:
            kinds = [ln[7:] for ln in r.iter_lines() if ln.startswith("event: ")]
        assert kinds == ["answer"]
        plain = c.post(f"/v1/videos/{uploaded['id']}/questions", json={"question": q}).json()
        assert "choices" not in plain                                   # only when asked for
        assert "unknown_words" not in plain                             # every word known
        told = c.post(f"/v1/videos/{uploaded['id']}/questions", json={"question": "tell me the colour of the circle."})
        assert told.json()["unknown_words"] == ["tell", "me"], told.text
        r = c.post(f"/v1/videos/{uploaded['id']}/questions", json={"question": q, "choices": ["red"]})
        assert r.status_code == 422 and "choices" in r.json()["error"]["message"]
        r = c.post(f"/v1/videos/{uploaded['id']}/questions", json={"question": q, "choices": ["red", "  "]})
        assert r.status_code == 422 and "choice 1 blank" in r.json()["error"]["message"]
        r = c.post(f"/v1/videos/{uploaded['id']}/questions", json={"question": q, "choices": ["red", "cyan"]})
        assert r.status_code == 422 and "cyan" in r.json()["error"]["message"], r.text   # a word it does not know
        content = [{"type": "text", "text": q},
                   {"type": "video_url", "video_url": {"url": f"lms://videos/{uploaded['id']}"}}]
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                    "lmstream_choices": choices}).json()
        assert chat["choices"][0]["message"]["content"] == want.text and chat["lmstream"]["choices"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                 "lmstream_choices": choices, "temperature": 0.7})
        assert r.status_code == 400 and "lmstream_choices or a temperature" in r.json()["error"]["message"]


def test_openai_client_unchanged(service, uploaded):
    import openai
    client = openai.OpenAI(base_url=service.url + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["demo"]
    content = [{"type": "text", "text": QUESTIONS[0]},
               {"type": "video_url", "video_url": {"url": f"lms://videos/{uploaded['id']}"}}]
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": content}], max_tokens=8)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
    extra = r.model_extra["lmstream"]
    assert extra["frames"] == 40 and extra["text"] == text and extra["policy"] == "exact"
    chunks = list(client.chat.completions.create(model="demo", messages=[{"role": "user", "content": content}],
                                                 max_tokens=8, stream=True))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # an answer read from choices has no tokens: its text still comes in the deltas' content
    chunks = list(client.chat.completions.create(model="demo", messages=[{"role": "user", "content": content}],
                                                 stream=True, extra_body={"lmstream_choices": ["red", "blue"]}))
    picked = chunks[-1].model_extra["lmstream"]["text"]
    assert picked in ("red", "blue") and "".join(ch.choices[0].delta.content or "" for ch in chunks) == picked
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=service.url + "/v1", api_key="nope").models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": [
            {"type": "text", "text": "q"}, {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}]}])
    with pytest.raises(openai.BadRequestError, match="expected video_url lms://videos/ID"):   # was a 500
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": [
            {"type": "text", "text": "q"}, {"type": "video_url", "video_url": {"url": "lms://videos[/x"}}]}])


def test_chat_video_url_windows_are_checked_like_the_questions_route(service, uploaded):
    """The window in an lms:// URL: a half window, a negative start, both a window and last_s, a last_s
    that is not a positive finite number or an unknown parameter were answered over the whole video (or
    another window) without a word; now each is 422 naming it, and a whole window still answers."""
    def ask(query: str):
        content = [{"type": "text", "text": QUESTIONS[0]},
                   {"type": "video_url", "video_url": {"url": f"lms://videos/{uploaded['id']}{query}"}}]
        return c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                    "max_tokens": 4})
    with service.client() as c:
        for query, says in (("?start=5", "both start and end"), ("?end=10", "got only end"),
                            ("?start=-5&end=10", "0 <= start < end"), ("?start=5&end=5", "0 <= start < end"),
                            ("?last_s=-3", "last_s > 0 seconds"), ("?last_s=1e400", "one finite number"),
                            ("?last_s=10&start=0&end=5", "at most one of start/end and last_s"),
                            ("?foo=1", "only start, end or last_s"), ("?start=1&start=2&end=9", "one finite number")):
            r = ask(query)
            assert r.status_code == 400 and r.json()["error"]["code"] == "E_INVALID_REQUEST", (query, r.text)
            msg = r.json()["error"]["message"]
            assert msg.startswith("expected ") and says in msg, (query, msg)
        r = ask("?start=5&end=10")
        assert r.status_code == 200 and r.json()["lmstream"]["frames"] == 5, r.text
        r = c.post(f"/v1/videos/{uploaded['id']}/questions", json={"question": "q", "policy": "budget:0"})
        assert r.status_code == 422 and r.json()["error"]["message"].startswith("expected "), r.text


def test_an_answer_names_the_gaps_in_its_window_a_truncated_files_missing_tail_too(service, media):
    """A 60 s Matroska file cut in half: its job records the missing tail as a gap, but answers said
    `gaps: []`, as they kept only gaps between their first and last frame. Now an answer names every gap
    of the stream inside the window asked about (the whole video when none)."""
    import av
    from stream.synthetic import make_scene, write_video
    mp4, path = media / "whole-60s.mp4", media / "cut-in-half.mkv"
    write_video(make_scene(13, 60, size=(64, 64)), mp4)
    with av.open(str(mp4)) as src, av.open(str(path), "w", format="matroska") as dst:   # remuxed, no re-encode
        out = dst.add_stream_from_template(src.streams.video[0])
        for pkt in src.demux(src.streams.video[0]):
            if pkt.dts is not None:
                pkt.stream = out
                dst.mux(pkt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with service.client() as c:
        r = c.post("/v1/videos", json={"path": str(path), "fps": 0.3})    # the last frame taken before the cut
        assert r.status_code == 202, r.text
        d = wait_ready(c, r.json()["id"])
        assert d["status"] == "ready" and d["gaps"], d
        tail = d["gaps"][-1]
        assert 20 < tail[0] < 40 and tail[1] == pytest.approx(60, abs=0.5), d
        for body, has in (({}, True), ({"window": [10, 60]}, True), ({"window": [0, 10]}, False)):
            a = c.post(f"/v1/videos/{d['id']}/questions", json={"question": QUESTIONS[0], "max_tokens": 2, **body})
            assert a.status_code == 200, a.text
            a = a.json()
            assert (tail in a["gaps"]) is has and a["time_span"][1] < tail[0], (body, a["gaps"], tail)
        c.delete(f"/v1/videos/{d['id']}")


def test_paths_limits_and_validation(service, media, tmp_path):
    with service.client() as c:
        r = c.post("/v1/videos", json={"path": "/etc/passwd"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "E_PATH_NOT_ALLOWED"
        r = c.post("/v1/videos", json={"path": str(media / "../" / media.name / ".." / "x.mp4")})
        assert r.status_code in (403, 404)
        r = c.post("/v1/videos", json={"path": str(media / "scene.mp4"), "fps": -1})
        assert r.status_code == 422 and "fps" in r.json()["error"]["message"]
        r = c.post("/v1/videos", json={"path": str(media / "scene.mp4"), "surprise": 1})
        assert r.status_code == 422 and "surprise" in r.json()["error"]["message"]
        r = c.post("/v1/videos/vid-nope/questions", json={"question": "q"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "E_NOT_FOUND"
        # a folder or a FIFO in the allowed folder: refused at once (was 202, then a job that failed or hung)
        (media / "a-folder").mkdir(exist_ok=True)
        fifo = media / "a.fifo"
        if not fifo.exists():
            os.mkfifo(fifo)
        for p, kind in ((media / "a-folder", "directory"), (fifo, "FIFO (named pipe)")):
            r = c.post("/v1/videos", json={"path": str(p)})
            assert r.status_code == 422 and r.json()["error"] == {
                "code": "E_INPUT_UNREADABLE", "message": f"expected a regular file at {str(p)!r}, got a {kind}"}, r.text
        r = c.post("/v1/videos", json={"path": str(media / "nothing-here.mp4")})
        assert r.status_code == 404 and r.json()["error"]["code"] == "E_NOT_FOUND"
        # an empty file: refused at once, as an empty upload is (it was 202, then a failed job)
        (media / "empty.mp4").write_bytes(b"")
        r = c.post("/v1/videos", json={"path": str(media / "empty.mp4")})
        assert r.status_code == 422 and r.json()["error"] == {"code": "E_NOT_A_VIDEO", "message": "expected a video "
                                                              f"file at {str(media / 'empty.mp4')!r}, got an empty "
                                                              "file (0 bytes)"}, r.text
        r = c.post("/v1/videos", files={"file": ("empty.mp4", b"", "video/mp4")})      # an upload says the same
        assert r.status_code == 422 and r.json()["error"] == {"code": "E_NOT_A_VIDEO", "message": "expected a video "
                                                              "file, got an empty file 'empty.mp4' (0 bytes)"}, r.text
        r = c.post("/v1/videos", files={"file": (None, b"")})                      # a form with no file chosen
        assert r.status_code == 422 and r.json()["error"]["code"] == "E_INVALID_REQUEST", r.text
        # a link inside the allowed folder that leads out: said so (the path shown is inside), not where to
        out = media / "leads-out.mp4"
        if not out.is_symlink():
            out.symlink_to("/etc/hostname")
        r = c.post("/v1/videos", json={"path": str(out)})
        assert r.status_code == 403 and r.json()["error"]["message"].endswith(
            f"got {str(out)!r} (a symbolic link along it leads outside them)"), r.text
        assert "/etc" not in r.json()["error"]["message"]
        r = c.post("/v1/videos/vid-nope/questions", json={"max_tokens": 2})    # pydantic's words reshaped
        assert r.status_code == 422 and r.json()["error"]["message"] == "expected question (required), got none"
        r = c.post("/v1/videos", files={"file": ("big.mp4", b"\0" * 3_500_000, "video/mp4")})
        assert r.status_code == 413 and r.json()["error"]["code"] == "E_TOO_LARGE"
        r = c.post("/v1/videos", content=b"x", headers={"content-type": "text/plain"})
        assert r.status_code == 422
        r = c.post("/v1/videos/x/questions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422


def test_concurrent_jobs_are_bounded_with_retry_after(service, media):
    with service.client() as c:
        ids, limited = [], None
        for _ in range(4):
            r = c.post("/v1/videos", json={"path": str(media / "long.mp4")})
            if r.status_code == 429:
                limited = r
                break
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        assert limited is not None and int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["error"]["code"] == "E_BUSY" and len(ids) <= 2
        for vid in ids:
            d = wait_ready(c, vid)
            assert d["status"] == "ready", d
        assert c.get(f"/v1/videos/{ids[0]}").json()["frames"] == 150


def test_corrupt_upload_fails_with_the_decoders_code_and_others_still_answer(service, media, uploaded):
    with service.client() as c:
        with open(media / "corrupt.mp4", "rb") as f:
            r = c.post("/v1/videos", files={"file": ("corrupt.mp4", f, "video/mp4")})
        assert r.status_code == 202
        d = wait_ready(c, r.json()["id"])
        assert d["status"] == "failed" and d["error"]["code"] in ("E_NOT_A_VIDEO", "E_NO_FRAMES", "E_NO_VIDEO_STREAM")
        assert d["error"]["message"].startswith("expected")
        r2 = c.post(f"/v1/videos/{d['id']}/questions", json={"question": "q"})
        assert r2.status_code == 409 and r2.json()["error"]["code"] == "E_NOT_READY"
        assert "with no frame stored" in r2.json()["error"]["message"], r2.text
        # an upload sent without a filename (curl -F file=<v.mp4) whose window holds no frame: the error
        # named the file the service stored it under (vid-....mp4)
        with open(media / "scene.mp4", "rb") as f:
            r = c.post("/v1/videos", files={"file": (None, f.read())}, data={"window": "100,200"})
        assert r.status_code == 202, r.text
        d = wait_ready(c, r.json()["id"])
        assert d["status"] == "failed" and d["error"]["code"] == "E_NO_FRAMES", d
        assert "in the uploaded file between 100 s and 200 s" in d["error"]["message"], d
        assert "vid-" not in d["error"]["message"] and "uploads" not in d["error"]["message"], d
        assert c.post(f"/v1/videos/{uploaded['id']}/questions", json={"question": QUESTIONS[0]}).status_code == 200


def test_metrics_are_prometheus_text(service, uploaded):
    with service.client() as c:
        text = c.get("/metrics").text
    assert "lms_time_to_first_token_seconds_count" in text
    assert f'lms_stream_frames{{stream="{uploaded["id"]}"}} 40.0' in text
    assert 'lms_jobs{status="ready"}' in text
    import re
    m = {k: float(v) for k, v in re.findall(r'^(lms_(?:encoder|local_kv|model)\w*(?:\{[^}]*\})?) (\S+)$', text, re.M)}
    assert m["lms_encoder_frames_total"] >= 40 and 1 <= m["lms_encoder_batches_total"] <= m["lms_encoder_frames_total"]
    assert m["lms_local_kv_max_bytes"] > 0, text[-2000:]
    assert m['lms_model_replicas{role="encoder"}'] == 1 and m['lms_model_replicas{role="answerer"}'] == 1, m
    from prometheus_client.parser import text_string_to_metric_families
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["lms_encoder_frames"] == types["lms_stream_frames_ingested"] == "counter", types


def test_the_ingress_replica_answers_without_loading_torch(service, uploaded):
    """The Ingress (routes, jobs, metrics) never touches a tensor, so its replica does not import torch:
    ~180 MB and ~1.3 s less a replica (frame_cache reads headers and metadata without it)."""
    with service.client() as c:
        assert c.post(f"/v1/videos/{uploaded['id']}/questions", json={"question": QUESTIONS[0], "max_tokens": 2}
                      ).status_code == 200
        assert c.get("/metrics").status_code == 200 and c.get(f"/v1/videos/{uploaded['id']}").status_code == 200
    ingress = _descendants_titled(service.proc.pid, "ray::ServeReplica:lmstream:Ingress")
    encoder = _descendants_titled(service.proc.pid, "ray::ServeReplica:lmstream:Encoder")
    assert ingress and encoder
    maps = lambda pid: Path(f"/proc/{pid}/maps").read_text()   # noqa: E731
    assert all("libtorch" not in maps(p) for p in ingress)
    assert all("libtorch" in maps(p) for p in encoder)        # (the check can see torch where it is loaded)


def test_unknown_routes_and_methods_are_named_in_the_error(service):
    """A path no route has, or a method a route does not take, is told with the request's own method and
    path (it was "expected a route of this API, got Not Found"), a 405 with the methods it takes. A JSON
    body sent as text/plain is told so (it was "expected body: Field required, got nothing")."""
    with service.client() as c:
        r = c.get("/v1/nope/x")
        assert r.status_code == 404 and r.json()["error"] == {
            "code": "E_NOT_FOUND", "message": "expected a route of this API, got GET /v1/nope/x (Not Found)"}
        r = c.put("/v1/videos")
        assert r.status_code == 405 and r.json()["error"]["code"] == "E_METHOD_NOT_ALLOWED", r.text
        assert r.json()["error"]["message"].startswith("expected a route of this API, got PUT /v1/videos (Method "
                                                       "Not Allowed; it takes "), r.text
        assert "POST" in r.headers["allow"] and "POST" in r.json()["error"]["message"], (r.headers, r.text)
        r = c.post("/v1/videos/vid-x/questions", content=json.dumps({"question": "q"}),
                   headers={"content-type": "text/plain"})              # JSON, not labelled so: FastAPI reads none
        assert r.status_code == 422 and r.json()["error"] == {"code": "E_INVALID_REQUEST", "message":
            "expected a JSON body (Content-Type: application/json), got Content-Type text/plain"}, r.text


def test_delete_frees_the_frames(service, media):
    from frame_cache import open_cache
    with service.client() as c:
        vid = c.post("/v1/videos", json={"path": str(media / "scene.mp4")}).json()["id"]
        assert wait_ready(c, vid)["status"] == "ready"
        cache = open_cache(service.redis_url)
        assert cache.stream_info(vid).count == 40
        assert c.delete(f"/v1/videos/{vid}").json() == {"id": vid, "deleted": True, "cancelled": False}
        assert vid not in cache.streams()
        cache.close()
        assert c.get(f"/v1/videos/{vid}").status_code == 404


def test_a_full_redis_fails_what_fills_it_with_e_cache_budget_keeps_its_frames_and_serves_the_rest(service, media,
                                                                                                    uploaded):
    """Redis at its maxmemory (noeviction), through the service: a live socket's frames are refused with one
    E_CACHE_BUDGET error (not one per frame) and `dropped` messages, and its record says so as it happens
    (`last_error`, `dropped`, the span in `gaps`: it said nothing until the stop); new jobs are 507, questions
    and /ready still answer and /metrics shows the cap; a file job that fills it ends `failed` E_CACHE_BUDGET
    (its status write was refused too: it stayed `ingesting`) with its stored frames answering; DELETE of a
    running job or a fed stream frees room while full (the writer's fence was refused: 507, nothing freed)."""
    import asyncio
    import websockets
    r = service.redis_client()
    used = lambda: int(r.info("memory")["used_memory"])      # noqa: E731
    png = _png(np.full((64, 64, 3), 120, np.uint8))
    c = service.client()
    try:
        r.config_set("maxmemory-policy", "noeviction")

        async def live():
            async with websockets.connect(_ws_url(service), max_size=None) as ws:
                await ws.send(json.dumps({"type": "start", "fps": 1, "format": "png"}))
                sid = json.loads(await ws.recv())["stream_id"]
                await _push_frames(ws, [(0.0, np.full((64, 64, 3), 120, np.uint8)), (1.0, np.zeros((64, 64, 3), np.uint8))])
                r.config_set("maxmemory", used() - (4 << 20))   # full from here on: every write refused
                for pts in (2.0, 3.0, 4.0):
                    await ws.send(json.dumps({"type": "frame", "pts": pts}))
                    await ws.send(png)
                msgs = []
                try:
                    while True:
                        msgs.append(json.loads(await asyncio.wait_for(ws.recv(), 2.5)))
                except asyncio.TimeoutError:
                    pass
                rec = await asyncio.to_thread(lambda: c.get(f"/v1/streams/{sid}").json())
                job = await asyncio.to_thread(lambda: c.post("/v1/videos", json={"path": str(media / "scene.mp4")}))
                up = await asyncio.to_thread(lambda: c.post("/v1/videos", files={
                    "file": ("scene.mp4", (media / "scene.mp4").read_bytes(), "video/mp4")}))
                ans = await asyncio.to_thread(lambda: c.post(f"/v1/videos/{uploaded['id']}/questions",
                                                             json={"question": QUESTIONS[0]}))
                r.config_set("maxmemory", used() + (64 << 20))     # room again: frames flow, the error is history
                await _push_frames(ws, [(5.0, np.zeros((64, 64, 3), np.uint8))])
                await ws.send(json.dumps({"type": "stop"}))
                while (m := json.loads(await ws.recv()))["type"] != "stopped":
                    msgs.append(m)
                r.config_set("maxmemory", used() - (4 << 20))
                return sid, msgs, rec, (job, up), ans, m

        sid, msgs, rec, job, ans, stopped = asyncio.run(live())
        errors = [m for m in msgs if m["type"] == "error"]
        assert [m["code"] for m in errors] == ["E_CACHE_BUDGET"], msgs          # told once, not once a frame
        assert "got it full (it holds" in errors[0]["message"] and "script" not in errors[0]["message"], errors
        assert sum(m["frames"] for m in msgs if m["type"] == "dropped") == 3, msgs
        assert {m["why"] for m in msgs if m["type"] == "dropped"} == {"not stored"}, msgs
        assert rec["last_error"]["code"] == "E_CACHE_BUDGET" and rec["dropped"] == 3, rec
        assert rec["frames"] == 2 and rec["gaps"] and rec["gaps"][-1][0] == 1.0 and rec["gaps"][-1][1] >= 4.0, rec
        assert stopped["frames"] == 3 and stopped["dropped"] == 3, stopped
        job, up = job
        assert job.status_code == 507 and job.json()["error"]["code"] == "E_CACHE_BUDGET", job.text
        assert "to have memory for creating a job" in job.json()["error"]["message"], job.text
        assert up.status_code == 507 and "nothing of the upload was read" in up.json()["error"]["message"], up.text
        assert _uploads(service) == []
        assert ans.status_code == 200 and ans.json()["frames"] == 40, ans.text       # reading needs no room
        assert c.get("/ready").status_code == 200
        cap = int(r.config_get("maxmemory")["maxmemory"])
        text = c.get("/metrics").text
        assert float(re.search(r"^lms_redis_maxmemory_bytes (\S+)$", text, re.M).group(1)) == cap, text[-600:]
        assert float(re.search(r"^lms_redis_used_memory_bytes (\S+)$", text, re.M).group(1)) > cap
        d = c.get(f"/v1/streams/{sid}").json()                   # its frames kept, answerable
        assert d["frames"] == 3 and d["last_error"] is None and d["previous_error"]["code"] == "E_CACHE_BUDGET", d
        assert d["gaps"] == [[1.0, 5.0]], d
        assert c.post(f"/v1/streams/{sid}/questions", json={"question": QUESTIONS[0]}).json()["frames"] == 3

        # a file job that fills it: ~16 MB of room, a 150-frame video needs ~24 MB (and a batch's request ~5 MB)
        r.config_set("maxmemory", used() + (16 << 20))
        vid = c.post("/v1/videos", json={"path": str(media / "long.mp4")}).json()["id"]
        d = wait_ready(c, vid)
        assert d["status"] == "failed" and d["error"]["code"] == "E_CACHE_BUDGET", d
        assert 0 < d["frames"] < 150 and "got it full" in d["error"]["message"], d
        a = c.post(f"/v1/videos/{vid}/questions", json={"question": QUESTIONS[1]})
        assert a.status_code == 200 and a.json()["frames"] == d["frames"], a.text
        assert a.json()["job"]["status"] == "failed" and a.json()["gaps"][-1][1] == 150.0, a.json()
        # deleting while full is the way out: a failed job, a stream, and a job still running (its writer fenced)
        r.config_set("maxmemory", used() - (4 << 20))
        before = used()
        assert c.delete(f"/v1/videos/{vid}").status_code == 200
        assert c.delete(f"/v1/streams/{sid}", params={"purge": "true"}).status_code == 200
        assert used() < before - (5 << 20), (used(), before)
        r.config_set("maxmemory", 0)
        vid = c.post("/v1/videos", json={"path": str(media / "long.mp4"), "fps": 4}).json()["id"]   # 600 frames
        while (d := c.get(f"/v1/videos/{vid}").json())["frames"] == 0:
            assert d["status"] in ("queued", "ingesting"), d
            time.sleep(0.05)
        r.config_set("maxmemory", used() - (4 << 20))
        assert c.delete(f"/v1/videos/{vid}").json() == {"id": vid, "deleted": True, "cancelled": True}
        r.config_set("maxmemory", 0)
        time.sleep(2)                                        # a batch still at the Encoder is refused, not stored
        assert c.get(f"/v1/videos/{vid}").status_code == 404 and vid.encode() not in r.smembers("lms:jobs")
        from frame_cache import open_cache
        cache = open_cache(service.redis_url)
        assert vid not in cache.streams(), "a batch of the deleted job was stored after its delete"
        cache.close()
    finally:
        r.config_set("maxmemory", 0)
        r.close()
        c.close()


def _uploads(service) -> list[str]:
    d = service.data_dir / "uploads"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _descendants_titled(root: int, prefix: str) -> list[int]:
    """Processes below `root` (this test's service: its Ray raylet and workers) whose title starts
    with `prefix` (Ray sets it: ``ray::Class.method``); never another test's or user's processes."""
    parent, title = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
                title[int(d.name)] = (d / "cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                pass
    out = []
    for pid in parent:
        p, seen = pid, 0
        while p in parent and p != root and seen < 64:
            p, seen = parent[p], seen + 1
        if p == root and pid != root and title[pid].startswith(prefix.encode()):
            out.append(pid)
    return out


def test_a_job_whose_decoder_actor_dies_fails_at_once_and_frees_its_slot(service, media, tmp_path):
    """kill -9 of a file job's FileSource actor mid-ingest (as an out-of-memory kill would): the job is
    `failed` with E_INTERRUPTED and its frames so far, not `ingesting` for good holding a job slot,
    and its upload is removed."""
    import signal
    from stream.synthetic import make_scene, write_video
    write_video(make_scene(13, 1800, size=(64, 64)), tmp_path / "half-hour.mp4")    # 1,800 frames at 1 fps
    before = _uploads(service)
    spares = _idle_decoders(service)                  # `warm_decoders` (1) started before any job asks
    assert len(spares) == 1, spares
    with service.client() as c:
        with open(tmp_path / "half-hour.mp4", "rb") as f:
            r = c.post("/v1/videos", files={"file": ("half-hour.mp4", f, "video/mp4")})
        assert r.status_code == 202, r.text
        vid = r.json()["id"]
        deadline = time.monotonic() + 120
        while True:                                   # ingesting, some frames stored, its actor found
            d = c.get(f"/v1/videos/{vid}").json()
            assert d["status"] in ("queued", "ingesting") and time.monotonic() < deadline, d
            pids = _descendants_titled(service.proc.pid, "ray::FileSource.run")
            if d["status"] == "ingesting" and d["frames"] > 0 and pids:
                break
            time.sleep(0.1)
        assert pids == spares                         # the job runs on the warm decoder, not a new worker
        for p in pids:
            os.kill(p, signal.SIGKILL)
        d = wait_ready(c, vid, timeout=60)
        assert d["status"] == "failed" and d["error"]["code"] == "E_INTERRUPTED", d
        assert "got it lost at" in d["error"]["message"] and 0 < d["frames"] < 1800, d
        assert _uploads(service) == before
        # its stored frames answer (was 409 E_NOT_READY), the answer saying the job failed and what is missing
        a = c.post(f"/v1/videos/{vid}/questions", json={"question": QUESTIONS[0], "max_tokens": 2})
        assert a.status_code == 200, a.text
        a = a.json()
        # (the record counts what the ring holds, not its last progress update)
        assert d["frames"] == a["frames"] == a["time_span"][1] + 1 < 1800, a        # the ring's count
        # counted once the job's writer is fenced (a batch the dead decoder left at the Encoder, stored after the
        # count, left the record 32 frames short for good), and its progress is how far those frames reach
        assert d["progress"] == pytest.approx(a["time_span"][1] / d["duration_s"], abs=1e-3), (d, a)
        assert f"lost at {d['progress']:.0%}" in d["error"]["message"], d      # the same figure in its words
        assert a["job"] == {"status": "failed", "error": d["error"], "frames": d["frames"], "progress": d["progress"]}
        assert a["gaps"][-1] == [a["time_span"][1], pytest.approx(d["duration_s"])] and d["duration_s"] > 1700, a
        content = [{"type": "text", "text": QUESTIONS[0]}, {"type": "video_url", "video_url": {"url": f"lms://videos/{vid}"}}]
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "max_tokens": 2})
        assert chat.status_code == 200 and chat.json()["lmstream"]["job"]["status"] == "failed", chat.text
        r = c.post("/v1/videos", json={"path": str(media / "scene.mp4")})       # and jobs go on
        assert r.status_code == 202 and wait_ready(c, r.json()["id"])["status"] == "ready"
        # DELETE of a job while it ingests cancels it (was 409 E_JOB_RUNNING): its decoder stops, frames,
        # record and upload go, and nothing of it comes back
        vid = upload_until_frames(c, tmp_path / "half-hour.mp4")
        r = c.delete(f"/v1/videos/{vid}")
        assert r.status_code == 200 and r.json() == {"id": vid, "deleted": True, "cancelled": True}, r.text
        from frame_cache import open_cache
        cache = open_cache(service.redis_url)
        try:
            for _ in range(2):                         # now, and after a batch still on its way could land
                assert c.get(f"/v1/videos/{vid}").status_code == 404 and vid not in cache.streams()
                assert vid not in [v["id"] for v in c.get("/v1/videos").json()["data"]]
                time.sleep(3)
        finally:
            cache.close()
        assert _uploads(service) == before and not _descendants_titled(service.proc.pid, "ray::FileSource.run")
        assert len(_idle_decoders(service)) == 1     # taken spares were replaced; the jobs' own actors are gone
        # a warm decoder that dies idle (an out-of-memory kill) is passed over, not handed the next job (which
        # then failed E_INTERRUPTED at 0 %, its upload removed): the job runs on a new one
        for p in _idle_decoders(service):
            os.kill(p, signal.SIGKILL)
        time.sleep(1)
        r = c.post("/v1/videos", json={"path": str(media / "scene.mp4")})
        assert r.status_code == 202 and (d := wait_ready(c, r.json()["id"]))["status"] == "ready", d
        assert len(_idle_decoders(service)) == 1


def test_a_decoder_whose_job_ended_takes_the_next_and_a_queued_job_can_be_cancelled(service, media):
    """A decoder whose job ended goes back to the pool and takes the next job (before, each job's actor was
    killed, and a burst of jobs waited for a new worker each: ~3.5 s to import torch, 11-13 s for four at
    once on 2 cores); the pool settles back to `warm_decoders` idle. A job that waits for a decoder is
    `queued` and DELETE cancels it there: its record and upload go, and no decoder runs it."""
    from deploy.serving import JobStore
    jobs = JobStore(service.redis_url)
    before, spares = _uploads(service), _idle_decoders(service)
    assert len(spares) == 1, spares
    with service.client() as c:
        names = []
        for _ in range(2):                            # one after the other: both on the same decoder
            r = c.post("/v1/videos", json={"path": str(media / "scene.mp4")})
            assert r.status_code == 202, r.text
            assert wait_ready(c, r.json()["id"])["status"] == "ready"
            names.append(jobs.get(r.json()["id"])["decoder"])
            assert _idle_decoders(service) == spares  # the one given back stays, the refill is stopped
        assert names[0] == names[1], names
        # two jobs at once: the first takes the idle decoder, the second waits for the one starting for it
        r = c.post("/v1/videos", json={"path": str(media / "long.mp4")})
        assert r.status_code == 202, r.text
        first = r.json()["id"]
        with open(media / "scene.mp4", "rb") as f:
            r = c.post("/v1/videos", files={"file": ("scene.mp4", f, "video/mp4")})
        assert r.status_code == 202, r.text
        queued = r.json()["id"]
        assert c.get(f"/v1/videos/{queued}").json()["status"] == "queued"
        r = c.delete(f"/v1/videos/{queued}")
        assert r.status_code == 200 and r.json() == {"id": queued, "deleted": True, "cancelled": True}, r.text
        assert c.get(f"/v1/videos/{queued}").status_code == 404
        assert wait_ready(c, first)["status"] == "ready"
        time.sleep(2)                                 # a decoder of the cancelled job would have run it by now
        assert c.get(f"/v1/videos/{queued}").status_code == 404
        assert queued not in [v["id"] for v in c.get("/v1/videos").json()["data"]]
    assert _uploads(service) == before
    assert not _descendants_titled(service.proc.pid, "ray::FileSource.run")
    assert len(_idle_decoders(service)) == 1


def _idle_decoders(service, expect: int = 1, timeout: float = 90.0) -> list[int]:
    """The service's FileSource actors started and idle (title ``ray::FileSource`` with no method), once
    there are `expect` of them (a replacement's worker has no such title while it starts), or after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        every = _descendants_titled(service.proc.pid, "ray::FileSource")
        idle = sorted(set(every) - set(_descendants_titled(service.proc.pid, "ray::FileSource.")))
        if len(idle) == expect or time.monotonic() > deadline:
            return idle
        time.sleep(0.2)


def test_uploads_stream_to_the_data_folder_and_rejects_leave_nothing(service, media):
    before = _uploads(service)
    with service.client() as c:
        def chunks():                                            # chunked: no Content-Length to refuse early
            yield b"--XB\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.mp4\"\r\n\r\n"
            for _ in range(8):
                yield b"\0" * 500_000
            yield b"\r\n--XB--\r\n"
        r = c.post("/v1/videos", content=chunks(), headers={"content-type": "multipart/form-data; boundary=XB"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "E_TOO_LARGE"
        with open(media / "scene.mp4", "rb") as f:
            data = f.read()
        for form in ({"kv_policy": "int2"}, {"fps": "abc"}, {"window": "5,3"}, {"fps": "1000"}):
            r = c.post("/v1/videos", files={"file": ("scene.mp4", data, "video/mp4")}, data=form)
            assert r.status_code == 422, (form, r.text)
        r = c.post("/v1/videos", json={"path": str(media / "scene.mp4") + "\u0000.txt"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "E_INVALID_REQUEST"
        r = c.post("/v1/videos/x/questions", content=b"{bad", headers={"content-type": "application/json"})
        assert r.status_code == 422 and "invalid JSON" in r.json()["error"]["message"]
        # JSON Python cannot read (a 5,000-digit number, nesting 5,000 deep) was a 500 with a traceback here
        jtype = {"content-type": "application/json"}
        for body, words in ((b'{"path": "x", "fps": ' + b"9" * 5000 + b"}", "Python can read"),
                            (b'{"path": "x", "retain": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", "nested too deep")):
            r = c.post("/v1/videos", content=body, headers=jtype)
            assert r.status_code == 422 and words in r.json()["error"]["message"], r.text
        r = c.post("/v1/videos/x/questions", json={"question": "q", "window": [40, 10]})
        msg = r.json()["error"]["message"]                       # our validator's own words, said once
        assert r.status_code == 422 and msg == "expected window [start, end] with 0 <= start < end, got [40.0, 10.0]"
    assert _uploads(service) == before                           # nothing left behind


def test_policy_errors_are_422_and_streams_urls_respect_job_status(service, uploaded):
    import openai
    with service.client() as c:
        r = c.post(f"/v1/videos/{uploaded['id']}/questions", json={"question": "q", "policy": "bogus"})
        assert r.status_code == 422 and "policy" in r.json()["error"]["message"]
        # a job queued, nothing stored for it yet: not an answer yet (a real upload could already have stored
        # frames by the time the question came, which are answered now: the record alone says queued)
        from deploy.serving import JobStore
        vid = "vid-queued-chat"
        JobStore(service.redis_url).create(vid, {"status": "queued", "frames": 0, "progress": 0.0})
        client = openai.OpenAI(base_url=service.url + "/v1", api_key=KEY)
        content = [{"type": "text", "text": "q"}, {"type": "video_url", "video_url": {"url": f"lms://videos/{vid}"}}]
        try:
            with pytest.raises(openai.ConflictError):
                client.chat.completions.create(model="demo", messages=[{"role": "user", "content": content}])
        finally:
            JobStore(service.redis_url).delete(vid)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="demo", messages=[{"role": "user", "content": [
                {"type": "text", "text": "q"}, {"type": "video_url", "video_url": {"url": "lms://streams/nope"}}]}])


def test_json_bodies_must_be_utf8_and_are_bounded_before_they_are_read(service, uploaded):
    """A JSON body that is not UTF-8 is 422 E_INVALID_REQUEST saying so on every JSON route (it was a bare
    500 on /v1/videos and 400 "expected a route of this API" on the others); a body over max_json_bytes
    (100,000 here) is 413 E_TOO_LARGE from its Content-Length before it is read, or as soon as a chunked
    one passes it; the service answers questions as before."""
    routes = ("/v1/videos", f"/v1/videos/{uploaded['id']}/questions", "/v1/chat/completions", "/v1/streams")
    big = json.dumps({"question": "x" * 150_000}).encode()
    jtype = {"content-type": "application/json"}

    def chunks():                                          # chunked: no Content-Length to refuse early
        for _ in range(4):
            yield b" " * 50_000
    with service.client() as c:
        for path in routes:
            r = c.post(path, content=b"\xff\xfe{", headers=jtype)
            assert _err(r) == {                           # 400 on the OpenAI route, as OpenAI's clients expect
                "status": 400 if "chat" in path else 422, "code": "E_INVALID_REQUEST",
                "message": "expected a UTF-8 JSON body, got bytes that are not UTF-8 (0xff at byte 0)"}, (path, r.text)
            r = c.post(path, content=big, headers=jtype)
            assert _err(r) == {
                "status": 413, "code": "E_TOO_LARGE", "message": "expected a request body of at most 100000 bytes "
                f"(limits.max_json_bytes), got {len(big)} (Content-Length)"}, (path, r.text)
            r = c.post(path, content=chunks(), headers=jtype)
            err = r.json()["error"]
            assert r.status_code == 413 and err["code"] == "E_TOO_LARGE", (path, r.text)
            assert err["message"].startswith("expected a request body of at most 100000 bytes (limits.max_json_bytes), "
                                             "got more (") and "without Content-Length" in err["message"], err
        r = c.post(routes[1], json={"question": QUESTIONS[0], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["frames"] == 40, r.text


def test_upload_field_errors_name_the_field_and_carry_one_code(service, media):
    """`curl -F other=@v.mp4` is told the video goes in `file` (it was "expected a short form field
    'other', got over 4096 bytes"); an unknown field is named; a bad `retain` is one code and one
    message (it embedded "error[E_BAD_ARGUMENT]: ..." in an E_INVALID_REQUEST); nothing is kept."""
    before = _uploads(service)
    data = (media / "scene.mp4").read_bytes()
    with service.client() as c:
        r = c.post("/v1/videos", files={"other": ("scene.mp4", data, "video/mp4")})
        assert r.status_code == 422 and r.json()["error"] == {
            "code": "E_INVALID_REQUEST",
            "message": "expected the video in form field 'file' (curl -F file=@VIDEO), got it in field 'other'"}, r.text
        r = c.post("/v1/videos", files={"file": ("scene.mp4", data, "video/mp4")}, data={"fpss": "2"})
        assert r.status_code == 422 and r.json()["error"]["message"] == \
            "expected form fields among file, fps, window, kv_policy, retain, got 'fpss'", r.text
        r = c.post("/v1/videos", files={"file": ("scene.mp4", data, "video/mp4")}, data={"retain": "exact_s=-1"})
        assert r.status_code == 422 and r.json()["error"] == {
            "code": "E_INVALID_REQUEST",
            "message": "expected retain.exact_s to be a number of seconds >= 0 or null, got -1.0"}, r.text
        r = c.post("/v1/videos", json={"path": str(media / "scene.mp4"), "retain": {"kv": "int2"}})
        msg = r.json()["error"]["message"]
        assert r.status_code == 422 and msg.startswith("expected retain.kv to be one of") and "error[" not in msg, r.text
    assert _uploads(service) == before
    # a field after the file part (curl -F file=@v.mp4 -F fps=1) took the file's name away: "source" null
    bnd = "lmsboundary7"
    body = (f"--{bnd}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"after.mp4\"\r\n"
            "Content-Type: video/mp4\r\n\r\n").encode() + data + \
        f"\r\n--{bnd}\r\nContent-Disposition: form-data; name=\"fps\"\r\n\r\n1\r\n--{bnd}--\r\n".encode()
    with service.client() as c:
        r = c.post("/v1/videos", content=body, headers={"content-type": f"multipart/form-data; boundary={bnd}"})
        assert r.status_code == 202, r.text
        d = wait_ready(c, r.json()["id"])
        assert d["status"] == "ready" and d["source"] == "after.mp4", d
        c.delete(f"/v1/videos/{d['id']}")


def test_cache_rm_removes_the_video_from_the_service_too(service, media):
    """`lmstream cache rm ID` against the service's Redis removes the job record with the frames, so
    the video is 404 everywhere (it stayed `ready` with 40 frames while questions were 404
    E_STREAM_NOT_FOUND); refused while the job runs; a record left by a frames-only removal goes too."""
    import sys
    from deploy.serving import remove_stream
    from frame_cache import open_cache
    from lmcore.errors import NotReady

    def cache_rm(sid):
        return subprocess.run([sys.executable, "-m", "lmstream.cli", "cache", "rm", sid, "--cache", service.redis_url],
                              capture_output=True, text=True, timeout=300, cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    with service.client() as c, open_cache(service.redis_url) as cache:
        vid = c.post("/v1/videos", json={"path": str(media / "scene.mp4")}).json()["id"]
        assert wait_ready(c, vid)["status"] == "ready"
        running = c.post("/v1/videos", json={"path": str(media / "long.mp4")}).json()["id"]
        with pytest.raises(NotReady) as e:                     # as DELETE says: 409 while it ingests
            remove_stream(cache, running, service.redis_url)
        assert e.value.code == "E_JOB_RUNNING" and "still" in e.value.message
        assert c.get(f"/v1/videos/{running}").status_code == 200
        r = cache_rm(vid)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"removed stream {vid}: 40 frames and the service's record of video {vid}"
        assert vid not in cache.streams()
        r = c.get(f"/v1/videos/{vid}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "E_NOT_FOUND", r.text
        assert vid not in [d["id"] for d in c.get("/v1/videos").json()["data"]]
        assert c.post(f"/v1/videos/{vid}/questions", json={"question": "q"}).status_code == 404
        r = cache_rm(vid)                                      # nothing left: one line, its code
        assert r.returncode == 2 and r.stderr.strip().startswith("error[E_STREAM_NOT_FOUND]: expected"), r.stderr
        assert wait_ready(c, running)["status"] == "ready"
        cache.delete_stream(running)                           # what `cache rm` did before: the frames alone
        assert c.get(f"/v1/videos/{running}").json()["status"] == "ready"
        r = cache_rm(running)
        assert r.returncode == 0 and r.stdout.strip() == \
            f"removed stream {running}: the service's record of video {running}", r.stdout + r.stderr
        assert c.get(f"/v1/videos/{running}").status_code == 404


def _png(rgb) -> bytes:
    import io
    from PIL import Image
    b = io.BytesIO()
    Image.fromarray(rgb).save(b, format="PNG")
    return b.getvalue()


async def _push_frames(ws, frames) -> None:
    """Each (pts, rgb) frame as a PNG after its {"type": "frame"} message, waiting for its "ingested"."""
    for pts, rgb in frames:
        await ws.send(json.dumps({"type": "frame", "pts": pts}))
        await ws.send(_png(rgb))
        while json.loads(await ws.recv())["type"] != "ingested":
            pass


def _ws_url(service, token=KEY) -> str:
    return service.url.replace("http://", "ws://") + "/v1/live" + (f"?token={token}" if token else "")


def test_websocket_push_ask_attach_stop(service, media, demo_model):
    """A websockets client pushes a video's frames (PNG, explicit pts) and asks; the answer equals the
    in-process engine over the same frames. A second socket attaches and asks too."""
    import asyncio
    import websockets
    from stream.decode import VideoSource
    from stream.preprocess import preprocess_video_frames
    size = demo_model.preprocess["size"]
    frames = [(f.pts, f.rgb) for f in VideoSource(media / "scene.mp4", fps=1.0, resize_to=size)]
    q = "how many objects are there ?"
    states = demo_model.encode_frames(preprocess_video_frames(np.stack([r for _, r in frames]), **demo_model.preprocess),
                                      pts=[p for p, _ in frames])
    want = demo_model.ask(states, q, max_new_tokens=8)

    async def session():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "stream_id": None, "fps": 1, "format": "jpeg"}))
            started = json.loads(await ws.recv())
            assert started["type"] == "started"
            sid = started["stream_id"]
            for pts, rgb in frames:                       # one at a time: the server never queues
                await ws.send(json.dumps({"type": "frame", "pts": pts}))
                await ws.send(_png(rgb))
                while True:
                    m = json.loads(await ws.recv())
                    if m["type"] == "ingested":
                        break
                    assert m["type"] == "dropped", m
            await ws.send(json.dumps({"type": "frame", "pts": frames[-1][0] + 0.2}))   # over the 1 fps rate
            await ws.send(_png(frames[-1][1]))
            await ws.send(json.dumps({"type": "ask", "id": "q1", "question": q, "max_tokens": 8}))
            toks, ans, dropped = [], None, None
            while ans is None:
                m = json.loads(await ws.recv())
                if m["type"] == "token":
                    assert m["id"] == "q1"
                    toks.append(m["text"])
                elif m["type"] == "answer":
                    ans = m
                elif m["type"] == "dropped":
                    dropped = m
            assert dropped is not None and dropped["why"] == "over fps"
            async with websockets.connect(_ws_url(service), max_size=None) as other:
                await other.send(json.dumps({"type": "attach", "stream_id": sid}))
                att = json.loads(await other.recv())
                assert att == {"type": "attached", "stream_id": sid, "frames": len(frames), "kind": "stream"}
                await other.send(json.dumps({"type": "ask", "id": "a", "question": q, "max_tokens": 8,
                                             "last_s": 10}))
                while (m := json.loads(await other.recv()))["type"] != "answer":
                    pass
                assert m["frames"] == 10 and m["id"] == "a"                # pts 30..39: (39 - 10, 39]
                await other.send(json.dumps({"type": "ask", "id": "c", "question": q, "choices": ["1", "2", "3"]}))
                m = json.loads(await other.recv())                         # no tokens: the answer alone
                assert m["type"] == "answer" and m["id"] == "c" and m["text"] in ("1", "2", "3"), m
                assert [c["text"] for c in m["choices"]] == ["1", "2", "3"]
                await other.send(json.dumps({"type": "ask", "id": "d", "question": q, "choices": ["1", ""]}))
                m = json.loads(await other.recv())
                assert m["type"] == "error" and m["code"] == "E_INVALID_REQUEST" and "choice 1 blank" in m["message"]
                # the HTTP routes' checks, over the socket too: the question's length and the policy
                await other.send(json.dumps({"type": "ask", "id": "e", "question": "x" * 8001}))
                m = json.loads(await other.recv())
                assert m["type"] == "error" and m["id"] == "e" and m["code"] == "E_TOO_LARGE", m
                assert "at most 8000 characters, got 8001" in m["message"]
                await other.send(json.dumps({"type": "ask", "id": "f", "question": q, "policy": "sometimes"}))
                m = json.loads(await other.recv())
                assert m["type"] == "error" and m["id"] == "f" and m["code"] == "E_INVALID_REQUEST", m
                assert m["message"].startswith("expected fusion policy"), m
            await ws.send(json.dumps({"type": "stop"}))
            stopped = json.loads(await ws.recv())
            assert stopped["type"] == "stopped" and stopped["frames"] == len(frames)
            await ws.wait_closed()
            assert ws.close_code == 1000
            return sid, toks, ans

    sid, toks, ans = asyncio.run(session())
    assert ans["token_ids"] == want.token_ids and ans["text"] == want.text == "".join(toks)
    assert ans["frames"] == len(frames) == 40 and ans["time_span"] == [0.0, 39.0]
    with service.client() as c:
        d = c.get(f"/v1/streams/{sid}").json()
        assert d["status"] == "stopped" and d["frames"] == 40 and d["kind"] == "push"
        r = c.post(f"/v1/streams/{sid}/questions", json={"question": q, "max_tokens": 8})
        assert r.json()["token_ids"] == want.token_ids                  # the frames stay after the socket
        assert c.delete(f"/v1/streams/{sid}?purge=true").json()["purged"] is True
        assert c.get(f"/v1/streams/{sid}").status_code == 404


def test_retention_over_a_websocket_stream_reports_the_mix_and_stays_exact_in_the_hot_window(service, media,
                                                                                              demo_model):
    """A live stream with `retain` (docs/design.md section 9): the last 10 s keep exact keys/values, older
    frames none. A question over the last 10 s equals the engine's exact answer; one over the whole
    stream equals the engine fusing exactly those 10 frames (the LLM still sees all 40 tokens), and
    says so in `policy`. A bad `retain` is refused with the field named."""
    import asyncio
    import websockets
    from frame_cache import InProcessFrameCache
    from frame_cache.retention import Retention, RetentionRunner
    from stream.decode import VideoSource
    from stream.ingest import states_to_records
    from stream.preprocess import preprocess_video_frames
    from stream.window import CachedFrames
    size = demo_model.preprocess["size"]
    frames = [(f.pts, f.rgb) for f in VideoSource(media / "scene.mp4", fps=1.0, resize_to=size)]
    q = "how many objects are there ?"
    retain = {"exact_s": 10, "kv": "none"}
    states = demo_model.encode_frames(preprocess_video_frames(np.stack([r for _, r in frames]), **demo_model.preprocess),
                                      pts=[p for p, _ in frames])
    local = InProcessFrameCache()
    local.create_stream("x", 64, meta={"retain": retain})
    local.append_many("x", states_to_records(states))
    RetentionRunner(local, "x", Retention.parse(retain)).apply()
    want_all = demo_model.ask(CachedFrames(local, "x"), q, max_new_tokens=8)
    want_hot = demo_model.ask(states.window(29.5, None), q, max_new_tokens=8)

    async def ask(ws, qid, **kw):
        await ws.send(json.dumps({"type": "ask", "id": qid, "question": q, "max_tokens": 8, **kw}))
        while (m := json.loads(await ws.recv()))["type"] != "answer":
            assert m["type"] in ("token", "dropped"), m
        return m

    async def session():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 1, "format": "png", "retain": {"kv": "zip"}}))
            err = json.loads(await ws.recv())
            assert err["type"] == "error" and "retain.kv to be one of" in err["message"], err
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 1, "format": "png", "retain": retain}))
            sid = json.loads(await ws.recv())["stream_id"]
            await _push_frames(ws, frames)
            hot = await ask(ws, "hot", last_s=10)
            whole = await ask(ws, "all")
            again = await ask(ws, "again")                # the second read comes from the local tier
            await ws.send(json.dumps({"type": "stop"}))
        # continued at another rate with the same `retain`: accepted (it was refused as "a different meta");
        # with another `retain`: refused, the stored one named
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "stream_id": sid, "fps": 2, "format": "png",
                                      "retain": retain}))
            m = json.loads(await ws.recv())
            assert m["type"] == "started" and m["stream_id"] == sid, m
            await ws.send(json.dumps({"type": "stop"}))
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "stream_id": sid, "fps": 1, "format": "png",
                                      "retain": {**retain, "exact_s": 5}}))
            err = json.loads(await ws.recv())
            assert err["type"] == "error" and err["code"] == "E_INVALID_REQUEST", err
            assert err["message"].startswith("expected retain {") and "for existing stream" in err["message"], err
        return hot, whole, again, sid

    hot, whole, again, sid = asyncio.run(session())
    assert hot["policy"] == "exact" and hot["frames"] == 10 and hot["token_ids"] == want_hot.token_ids
    assert whole["frames"] == 40 and whole["frames_fused"] == 10 and whole["kv_policy"] == "mixed"
    assert whole["policy"] == want_all.policy and whole["policy"].startswith("mixed: exact 10, token-only 30")
    assert whole["token_ids"] == want_all.token_ids and again["token_ids"] == whole["token_ids"]
    # the same replica answered (stream affinity) and read the keys/values from its local tier
    assert again["timings"]["read_MB"] > 0 and again["timings"]["read_local_MB"] == again["timings"]["read_MB"]
    # every frame's token record (not its light record, 20x it here) is read before fusion, timed and counted
    # apart from the keys/values
    from frame_cache import open_cache
    with open_cache(service.redis_url) as cache:
        win = cache.window(sid)
        toks = sum(map(len, cache.read(sid, win.seqs(), tokens=True)))
        light = sum(map(len, cache.read(sid, win.seqs(), light=True)))
    assert again["timings"]["window_s"] > 0 and again["timings"]["read_light_MB"] == round(toks / 1e6, 3), \
        (again["timings"], toks, light)
    assert toks < light / 5
    with service.client() as c:
        r = c.post("/v1/streams", json={"source": "rtsp://127.0.0.1:1/x", "retain": {"kv_stride": 0}})
        assert r.status_code == 422 and "kv_stride to be an integer >= 1, got 0" in r.json()["error"]["message"]


def test_websocket_frames_sent_back_to_back_wait_in_line_instead_of_being_shed(service, media, demo_model):
    """Frames that arrive while earlier ones are being stored wait (up to 8) and are stored together,
    in order; none is shed as `encoder busy`."""
    import asyncio
    import websockets
    from stream.decode import VideoSource
    size = demo_model.preprocess["size"]
    frames = [(f.pts, f.rgb) for f in VideoSource(media / "scene.mp4", fps=1.0, resize_to=size)][:7]

    async def session():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 1, "format": "png"}))
            sid = json.loads(await ws.recv())["stream_id"]
            for pts, rgb in frames:                        # no waiting for acknowledgements
                await ws.send(json.dumps({"type": "frame", "pts": pts}))
                await ws.send(_png(rgb))
            acks = []
            while not acks or acks[-1]["frames"] < len(frames):
                m = json.loads(await ws.recv())
                assert m["type"] == "ingested", m            # no `dropped`
                acks.append(m)
            await ws.send(json.dumps({"type": "stop"}))
            return sid, acks

    sid, acks = asyncio.run(session())
    assert acks[-1]["last_pts"] == frames[-1][0] and len(acks) < len(frames)   # some went as one request
    with service.client() as c:
        st = c.get(f"/v1/streams/{sid}").json()
        assert st["frames"] == len(frames) and st["dropped"] == 0 and st["lag_s"] is not None


def test_websocket_stop_stores_what_it_received_and_stopped_streams_free_their_slot(service, media, demo_model):
    """`stop` right after frames sent back to back answers once all of them are stored (it answered
    at once and dropped the queued ones); a socket that streams cannot attach elsewhere; the live
    stream limit counts streams fed now, not stopped ones (after 4 sockets ever, every start was
    429); DELETE fences a socket's stream; a purge forgets the stream's watches."""
    import asyncio
    import websockets
    from stream.decode import VideoSource
    size = demo_model.preprocess["size"]
    frames = [(f.pts, f.rgb) for f in VideoSource(media / "scene.mp4", fps=1.0, resize_to=size)][:6]

    async def recv_until(ws, kind):
        while (m := json.loads(await ws.recv()))["type"] != kind:
            assert m["type"] in ("ingested", "dropped"), m
        return m

    async def start(ws, sid=None):
        await ws.send(json.dumps({"type": "start", "stream_id": sid, "fps": 1, "format": "png"}))
        return json.loads(await ws.recv())

    async def session():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            sid = (await start(ws))["stream_id"]
            await ws.send(json.dumps({"type": "attach", "stream_id": sid}))
            m = json.loads(await ws.recv())
            assert m["type"] == "error" and m["code"] == "E_INVALID_REQUEST" and "not streaming" in m["message"]
            for pts, rgb in frames:                        # no waiting for acknowledgements, then stop
                await ws.send(json.dumps({"type": "frame", "pts": pts}))
                await ws.send(_png(rgb))
            await ws.send(json.dumps({"type": "stop"}))
            stopped = await recv_until(ws, "stopped")
            assert stopped["frames"] == len(frames), stopped
        with service.client() as c:
            assert c.get(f"/v1/streams/{sid}").json()["frames"] == len(frames)
            assert c.post(f"/v1/streams/{sid}/watches", json={"question": "is there a red circle ?"}).status_code == 201
        # the limit (4 here) counts streams fed now: the stopped ones (this module's, socks[0]) hold no slot
        socks = [await websockets.connect(_ws_url(service), max_size=None) for _ in range(5)]
        try:
            got = [await start(w) for w in socks[:4]]
            assert all(g["type"] == "started" for g in got), got
            busy = await start(socks[4])
            assert busy["type"] == "error" and busy["code"] == "E_BUSY", busy
            assert "at most 4 live streams fed at once, got 4" in busy["message"]
            await socks[0].send(json.dumps({"type": "stop"}))
            await recv_until(socks[0], "stopped")
            assert (await start(socks[4]))["type"] == "started"
            # DELETE of a socket's stream fences it and tells the socket (it was told "another writer
            # took the stream over" at its next frame), then closes it; none is added
            w, wsid = socks[1], got[1]["stream_id"]
            await w.send(json.dumps({"type": "frame", "pts": 0.0}))
            await w.send(_png(frames[0][1]))
            assert (await recv_until(w, "ingested"))["frames"] == 1
            with service.client() as c:
                assert c.delete(f"/v1/streams/{wsid}").json()["status"] == "stopped"
            m = await asyncio.wait_for(recv_until(w, "error"), 30)
            assert m["code"] == "E_STREAM_STOPPED" and "got the stream deleted" in m["message"], m
            assert "its frames stay" in m["message"], m
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(w.recv(), 30)
            assert w.close_code == 1000
            with service.client() as c:
                d = c.get(f"/v1/streams/{wsid}").json()
                assert d["frames"] == 1 and d["status"] == "stopped", d
        finally:
            for w in socks:                                # stopped, not just closed: no slot held after
                try:
                    await w.send(json.dumps({"type": "stop"}))
                    await recv_until(w, "stopped")
                except (websockets.ConnectionClosed, AssertionError):
                    pass
                await w.close()
        # a purge forgets the watches: the id created again starts with none
        with service.client() as c:
            assert c.delete(f"/v1/streams/{sid}?purge=true").json()["purged"] is True
            r = c.get(f"/v1/streams/{sid}/watches")               # gone, as on every route of the id
            assert r.status_code == 404 and r.json()["error"]["code"] == "E_NOT_FOUND", r.text
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            assert (await start(ws, sid))["stream_id"] == sid
            with service.client() as c:
                assert c.get(f"/v1/streams/{sid}/watches").json()["data"] == []
            await ws.send(json.dumps({"type": "stop"}))
            await recv_until(ws, "stopped")

    asyncio.run(session())


def test_open_sockets_and_event_streams_are_bounded_and_leave_room_for_every_other_request(service):
    """256 idle sockets with a key held every request the Ingress takes at once (Serve's `max_ongoing_requests`):
    `GET /health` then waited past 15 s, and the 257th socket hung. Open sockets and watch-event streams
    together are now bounded by `limits.max_live_connections` (10 here): past it a socket is accepted and
    closed 1013 with the reason, an event stream is 429 `E_BUSY` with `Retry-After`, and every other route
    still answers. A closed socket or event stream frees its place (`lms_live_connections`)."""
    import asyncio
    import websockets

    def connections(c) -> int:
        return int(_metric(c.get("/metrics").text, "lms_live_connections"))

    def settle(c, want: int) -> None:            # the Ingress sees a close within a second or so
        for _ in range(100):
            if connections(c) == want:
                return
            time.sleep(0.1)
        assert connections(c) == want

    async def session():
        with service.client() as c:
            n0 = connections(c)
        socks = [await websockets.connect(_ws_url(service), max_size=None) for _ in range(10 - n0)]
        sid = None
        try:
            await socks[0].send(json.dumps({"type": "start", "stream_id": None, "fps": 1, "format": "png"}))
            sid = json.loads(await socks[0].recv())["stream_id"]
            with service.client() as c:
                assert connections(c) == 10
            extra = await websockets.connect(_ws_url(service), max_size=None)
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(extra.recv(), 30)
            assert extra.close_code == 1013, (extra.close_code, extra.close_reason)
            assert extra.close_reason == ("expected at most 10 open sockets and event streams, got 10: close one "
                                          "(limits.max_live_connections)"), extra.close_reason
            with service.client() as c:
                r = c.get(f"/v1/streams/{sid}/events")
                assert r.status_code == 429 and r.headers.get("retry-after"), r.text
                assert r.json()["error"]["code"] == "E_BUSY" and "got 10" in r.json()["error"]["message"], r.text
                assert c.get("/health").status_code == 200 and c.get("/v1/streams").status_code == 200
                assert c.get(f"/v1/streams/{sid}").json()["status"] in ("connecting", "live", "stalled")
            for w in socks[-2:]:                             # two places freed: an event stream takes one
                await w.close()
            socks = socks[:-2]
            with service.client() as c:
                settle(c, 8)
                with c.stream("GET", f"/v1/streams/{sid}/events") as ev:
                    assert ev.status_code == 200 and ev.headers["content-type"].startswith("text/event-stream")
                    assert connections(c) == 9
                    socks.append(await websockets.connect(_ws_url(service), max_size=None))
                    await socks[-1].send(json.dumps({"type": "attach", "stream_id": sid}))
                    assert json.loads(await socks[-1].recv())["type"] == "attached"
                    assert connections(c) == 10
                    refused = await websockets.connect(_ws_url(service), max_size=None)
                    with pytest.raises(websockets.ConnectionClosed):
                        await asyncio.wait_for(refused.recv(), 30)
                    assert refused.close_code == 1013
                settle(c, 9)                                 # the event stream's place, freed with it
        finally:
            if sid is not None:                              # stopped, not just closed: no stream slot held after
                await socks[0].send(json.dumps({"type": "stop"}))
                while json.loads(await asyncio.wait_for(socks[0].recv(), 30))["type"] != "stopped":
                    pass
            for w in socks:
                await w.close()
        with service.client() as c:
            settle(c, n0)
            if sid is not None:
                assert c.delete(f"/v1/streams/{sid}?purge=true").status_code == 200

    asyncio.run(session())


def test_websocket_tells_every_dropped_frame_before_stopped_and_names_open_windows_in_words(service):
    """Frames shed faster than once a second are all told before `stopped` (only the first was: one
    `dropped` of 1 frame, then `stopped` said 46): the `frames` of the `dropped` messages add up to
    the stop's `dropped`. The stream's record calls only the shed frames dropped (the bad one, any
    encoder busy), the 45 over fps `skipped_by_fps` (it counted them as dropped), as a camera's. An ask before any frame is stored names its
    window in words, not -inf:inf."""
    import asyncio
    import itertools
    import websockets
    png = _png(np.full((64, 64, 3), 200, np.uint8))

    async def session():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 1, "format": "png"}))
            sid = json.loads(await ws.recv())["stream_id"]
            for qid, extra, words in (("all", {}, "in the whole stream, got none yet"),
                                      ("win", {"window": [5, 10]}, "in the window 5:10 s, got none"),
                                      ("last", {"last_s": 10}, "in its newest 10 s, got none: it has no frame")):
                await ws.send(json.dumps({"type": "ask", "id": qid, "question": "what colour is the circle ?", **extra}))
                m = json.loads(await ws.recv())
                assert m["type"] == "error" and m["id"] == qid and m["code"] == "E_NO_FRAMES", m
                assert f"expected stored frames of stream {sid!r} {words}" in m["message"] and "inf" not in m["message"], m
            await ws.send(json.dumps({"type": "frame", "pts": 0.0}))
            await ws.send(b"not an image")                     # shed as a bad frame (and an error)
            for k in range(60):                                # 15 s at 4 fps: 45 over the 1 fps rate
                await ws.send(json.dumps({"type": "frame", "pts": 1.0 + k * 0.25}))
                await ws.send(png)
            msgs = []
            try:                                               # no stop yet: what the second's timer tells
                while True:
                    msgs.append(json.loads(await asyncio.wait_for(ws.recv(), 2.5)))
            except asyncio.TimeoutError:
                pass
            before_stop = [m for m in msgs if m["type"] == "dropped"]
            await ws.send(json.dumps({"type": "stop"}))
            while (m := json.loads(await ws.recv()))["type"] != "stopped":
                msgs.append(m)
            return m, msgs, before_stop, sid

    stopped, msgs, before_stop, sid = asyncio.run(session())
    assert len(before_stop) >= 2, before_stop       # the first at once, the rest of its second when it ends
    drops = [m for m in msgs if m["type"] == "dropped"]
    assert {m["type"] for m in msgs} <= {"dropped", "ingested", "error"}, msgs
    assert [m["code"] for m in msgs if m["type"] == "error"] == ["E_NOT_A_VIDEO"], msgs
    assert len(drops) >= 2 and sum(m["frames"] for m in drops) == stopped["dropped"], (drops, stopped)
    assert stopped["frames"] + stopped["dropped"] == 61, stopped           # every frame stored or told shed
    assert [m["total"] for m in drops] == list(itertools.accumulate(m["frames"] for m in drops)), drops
    by: dict = {}
    for m in drops:
        assert sum(m["by_reason"].values()) == m["frames"] and m["why"] in m["by_reason"], m
        for k, v in m["by_reason"].items():
            by[k] = by.get(k, 0) + v
    assert by["over fps"] == 45 and by["bad frame"] == 1, by
    with service.client() as c:
        d = c.get(f"/v1/streams/{sid}").json()
    assert d["status"] == "stopped" and d["frames"] == stopped["frames"], (d, stopped)
    shed = {k: v for k, v in by.items() if k != "over fps"}             # bad frame, and encoder busy if any
    assert d["dropped"] == stopped["dropped"] - 45 == sum(shed.values()) and d["dropped_why"] == shed, (d, by)
    assert d["skipped_by_fps"] == 45, d


def test_a_stream_continued_on_a_new_socket_adds_its_counts_to_the_records(service):
    """A socket that continues a stream (`start` with its id, as after a reconnect) adds its shed and
    sampled-out frames to the stream record's `dropped` / `skipped_by_fps`: the record holds the stream's
    totals (it had the new socket's counts alone, the earlier socket's forgotten), from the new socket's
    first stored frame to its stop. Its own `stopped` still counts its own frames."""
    import asyncio
    import websockets
    rgb = np.full((64, 64, 3), 90, np.uint8)
    png = _png(rgb)

    async def feed(ws):
        """pts 0 stored, 0.5 over the 1 fps rate, 1.0 not an image, 2.0 stored: 1 shed, 1 skipped."""
        await _push_frames(ws, [(0.0, rgb)])
        for pts, data in ((0.5, png), (1.0, b"not an image")):
            await ws.send(json.dumps({"type": "frame", "pts": pts}))
            await ws.send(data)
        await _push_frames(ws, [(2.0, rgb)])           # its record update carries the two above

    def record(c, sid):
        d = c.get(f"/v1/streams/{sid}").json()
        return {k: d[k] for k in ("status", "frames", "dropped", "dropped_why", "skipped_by_fps")}

    async def session():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 1, "format": "png"}))
            sid = json.loads(await ws.recv())["stream_id"]
            await feed(ws)
        # the socket went away without stop: its release marks the record stopped with its counts
        with service.client() as c:
            deadline = time.monotonic() + 30
            while (first := record(c, sid))["status"] != "stopped" and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
        async with websockets.connect(_ws_url(service), max_size=None) as ws:   # the reconnect
            await ws.send(json.dumps({"type": "start", "stream_id": sid, "fps": 1, "format": "png"}))
            assert json.loads(await ws.recv()) == {"type": "started", "stream_id": sid}
            await feed(ws)
            with service.client() as c:
                fed = record(c, sid)                   # while the second socket is open
            await ws.send(json.dumps({"type": "stop"}))
            while (stopped := json.loads(await ws.recv()))["type"] != "stopped":
                assert stopped["type"] in ("dropped", "error"), stopped
        with service.client() as c:
            return first, fed, stopped, record(c, sid)

    first, fed, stopped, last = asyncio.run(session())
    assert first == {"status": "stopped", "frames": 2, "dropped": 1, "dropped_why": {"bad frame": 1},
                     "skipped_by_fps": 1}, first
    totals = {"frames": 4, "dropped": 2, "dropped_why": {"bad frame": 2}, "skipped_by_fps": 2}
    assert fed == {"status": fed["status"], **totals} and fed["status"] in ("live", "stalled"), fed
    assert last == {"status": "stopped", **totals}, last
    assert stopped["frames"] == 2 and stopped["dropped"] == 2, stopped     # the socket's own: 1 shed, 1 over fps


def test_a_continued_stream_goes_on_with_the_wall_clock_and_answers_name_its_missing_frames(service):
    """A socket that continues a stream after an outage puts its time 0 after the stream's newest frame by
    the time no socket fed it (it was newest + one period: a 3 s outage vanished, and the client's next
    frames were told apart from the old by 1 s only), and the outage is one of the stream's gaps. A frame
    the socket had to store and lost (pts 2 does not decode) is a gap of the stream and of its answers
    (they said `gaps: []`). A pts that goes back is refused as a bad frame saying both times (it was
    counted "over fps"). Frames the client never sent are no gap: the service cannot know of them. A
    socket that continues the stream and stores nothing does not hide the outage after it."""
    import asyncio
    import websockets
    rgb = np.full((64, 64, 3), 120, np.uint8)

    async def session():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 1, "format": "png"}))
            sid = json.loads(await ws.recv())["stream_id"]
            await _push_frames(ws, [(0.0, rgb), (1.0, rgb)])
            await ws.send(json.dumps({"type": "frame", "pts": 2.0}))                    # lost: not an image
            await ws.send(b"not an image")
            await _push_frames(ws, [(3.0, rgb), (4.0, rgb)])
            await ws.send(json.dumps({"type": "frame", "pts": 3.5}))                    # back in time
            await ws.send(_png(rgb))
            while (m := json.loads(await ws.recv()))["type"] != "error":
                assert m["type"] == "dropped", m
            back = m
            await ws.send(json.dumps({"type": "stop"}))
            while json.loads(await ws.recv())["type"] != "stopped":
                pass
        t_stop = time.time()
        async with websockets.connect(_ws_url(service), max_size=None) as ws:   # a reconnect that stores nothing
            await ws.send(json.dumps({"type": "start", "stream_id": sid, "fps": 1, "format": "png"}))
            assert json.loads(await ws.recv())["type"] == "started"             # (it cleared last_wall: the
        await asyncio.sleep(3.0)                                                # outage after it was lost)
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "stream_id": sid, "fps": 1, "format": "png"}))
            assert json.loads(await ws.recv())["type"] == "started"
            away = time.time() - t_stop
            lasts = []
            for pts in (0.0, 1.0):                                                       # the client's own 0 again
                await ws.send(json.dumps({"type": "frame", "pts": pts}))
                await ws.send(_png(rgb))
                while (m := json.loads(await ws.recv()))["type"] != "ingested":
                    pass
                lasts.append(m["last_pts"])
            await ws.send(json.dumps({"type": "stop"}))
            while json.loads(await ws.recv())["type"] != "stopped":
                pass
        return sid, back, away, lasts

    sid, back, away, lasts = asyncio.run(session())
    assert back["code"] == "E_INVALID_REQUEST" and "after 4 s" in back["message"] and "got 3.5" in back["message"]
    assert 4.0 + 3.0 <= lasts[0] <= 4.0 + away + 0.5 and lasts[1] == lasts[0] + 1.0, (lasts, away)
    with service.client() as c:
        d = c.get(f"/v1/streams/{sid}").json()
        assert d["gaps"] == [[1.0, 3.0], [4.0, lasts[0]]] and d["frames"] == 6, d
        assert d["dropped_why"] == {"bad frame": 2}, d
        a = c.post(f"/v1/streams/{sid}/questions", json={"question": QUESTIONS[1], "max_tokens": 2}).json()
        assert a["frames"] == 6 and a["gaps"] == [[1.0, 3.0], [4.0, lasts[0]]], a
        a = c.post(f"/v1/streams/{sid}/questions", json={"question": QUESTIONS[1], "max_tokens": 2,
                                                          "window": [0.0, 3.5]}).json()
        assert a["frames"] == 3 and a["gaps"] == [[1.0, 3.0]], a
        r = c.delete(f"/v1/streams/{sid}", params={"purge": "on"})       # a destructive flag: true or false only
        assert r.status_code == 422 and "expected purge=true or purge=false, got purge='on'" in r.text, r.text
        assert c.get(f"/v1/streams/{sid}").json()["frames"] == 6
        assert c.delete(f"/v1/streams/{sid}", params={"purge": "true"}).json()["purged"] is True


def test_chunks_that_are_no_webm_are_told_once_and_kept_as_the_streams_error(service):
    """Three chunks that are no WebM on a `format: webm` socket: three identical E_NOT_A_VIDEO messages, and
    the stream's `last_error` null after `stop`. Now one message, and `last_error` keeps it."""
    import asyncio
    import websockets

    async def session():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 1, "format": "webm"}))
            sid = json.loads(await ws.recv())["stream_id"]
            for _ in range(3):
                await ws.send(b"this is no webm at all " * 40)
            await ws.send(json.dumps({"type": "stop"}))
            told = []
            while (m := json.loads(await ws.recv()))["type"] != "stopped":
                told.append(m)
            return sid, told

    sid, told = asyncio.run(session())
    errors = [m for m in told if m["type"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] == "E_NOT_A_VIDEO", told
    with service.client() as c:
        d = c.get(f"/v1/streams/{sid}").json()
        assert d["status"] == "stopped" and d["last_error"]["code"] == "E_NOT_A_VIDEO", d
        assert d["last_error"]["message"] == errors[0]["message"], d
        c.delete(f"/v1/streams/{sid}", params={"purge": "true"})


def test_frames_shed_in_a_burst_are_a_gap_from_the_stored_frame_before_them_to_the_one_after(service):
    """20 frames pushed at once: the first are queued for the Encoder, the rest shed ("encoder busy"). The
    gap was closed when the first queued frame was stored, before the shed ones: `[[9.0, 9.0]]`, a gap of no
    length. Now each shed frame lies inside a gap from the stored frame before it to the stored frame after
    it (one sampling period past the last frame when none follows)."""
    import asyncio
    import websockets
    rgb = np.full((64, 64, 3), 90, np.uint8)

    async def session():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 1, "format": "png"}))
            sid = json.loads(await ws.recv())["stream_id"]
            for pts in range(20):                                   # no wait for "ingested": a burst
                await ws.send(json.dumps({"type": "frame", "pts": float(pts)}))
                await ws.send(_png(rgb))
            await ws.send(json.dumps({"type": "stop"}))
            while (m := json.loads(await ws.recv()))["type"] != "stopped":
                pass
            return sid, m["frames"]

    sid, stored = asyncio.run(session())
    with service.client() as c:
        d = c.get(f"/v1/streams/{sid}").json()
        shed = d["dropped_why"].get("encoder busy", 0)
        assert shed > 0 and stored + shed == 20, d
        assert d["gaps"] and all(b > a for a, b in d["gaps"]), d["gaps"]
        assert sum(b - a for a, b in d["gaps"]) >= shed, d["gaps"]          # each shed second inside a gap
        assert all(0 <= a and b <= 20 for a, b in d["gaps"]), d["gaps"]
        a = c.post(f"/v1/streams/{sid}/questions", json={"question": QUESTIONS[1], "max_tokens": 2}).json()
        assert a["frames"] == stored and a["gaps"] == d["gaps"], a
        c.delete(f"/v1/streams/{sid}", params={"purge": "true"})


def test_a_byte_stream_ffmpeg_cannot_read_is_told_on_the_socket_and_kept_as_the_streams_error(service, media):
    """format mp4 with a plain (not fragmented) MP4's first bytes, then garbage: FFmpeg says it cannot read
    them only at the end; the socket is told E_NOT_A_VIDEO before `stopped` and the record keeps it as
    `last_error` (there was no message at all, and last_error null)."""
    import asyncio
    import websockets
    head = (media / "scene.mp4").read_bytes()[:4000]

    async def run():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 1, "format": "mp4"}))
            sid = json.loads(await ws.recv())["stream_id"]
            await ws.send(head)
            await ws.send(b"garbage" * 1000)
            await ws.send(json.dumps({"type": "stop"}))
            got = []
            while (m := json.loads(await ws.recv()))["type"] != "stopped":
                got.append(m)
            return sid, got, m

    sid, got, stopped = asyncio.run(run())
    errors = [m for m in got if m["type"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] == "E_NOT_A_VIDEO", got
    assert "expected a WebM or fragmented MP4 byte stream" in errors[0]["message"], errors
    assert stopped["frames"] == 0
    with service.client() as c:
        d = c.get(f"/v1/streams/{sid}").json()
        assert d["last_error"] == {"code": errors[0]["code"], "message": errors[0]["message"]}, d
        c.delete(f"/v1/streams/{sid}", params={"purge": "true"})


def test_a_socket_attached_to_a_purged_stream_is_told_and_its_ask_is_not_found_as_over_http(service):
    """The stream a socket attached to is purged: the socket is told at once (E_STREAM_STOPPED; it was told
    nothing), and its next ask is E_NOT_FOUND saying so, as the HTTP routes answer an unknown id (it was the
    library's E_STREAM_NOT_FOUND)."""
    import asyncio
    import websockets
    rgb = np.full((64, 64, 3), 60, np.uint8)

    async def run():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 1, "format": "png"}))
            sid = json.loads(await ws.recv())["stream_id"]
            await _push_frames(ws, [(0.0, rgb)])
            await ws.send(json.dumps({"type": "stop"}))
            while json.loads(await ws.recv())["type"] != "stopped":
                pass
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "attach", "stream_id": sid}))
            assert json.loads(await ws.recv())["type"] == "attached"
            with service.client() as c:
                assert c.delete(f"/v1/streams/{sid}", params={"purge": "true"}).status_code == 200
            told = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await ws.send(json.dumps({"type": "ask", "id": "q1", "question": QUESTIONS[1], "max_tokens": 2}))
            while (m := json.loads(await ws.recv()))["type"] != "error":
                pass
            return sid, told, m

    sid, told, m = asyncio.run(run())
    assert told == {"type": "error", "code": "E_STREAM_STOPPED", "message": f"expected stream {sid!r} to go on, "
                    f"got it deleted (DELETE /v1/streams/{sid}; purged: its frames are gone)"}, told
    assert m["id"] == "q1" and m["code"] == "E_NOT_FOUND", m
    assert m["message"] == f"expected a stream or video to ask about, got {sid!r} deleted since this socket attached"


def test_websocket_webm_byte_stream(service):
    """format webm: MediaRecorder-style chunks of one VP8 WebM stream, demuxed as they come. Frames
    sampled out by fps are told on the socket as "over fps", as a JPEG socket's (they were not told at
    all), and the record counts them as skipped_by_fps, not dropped."""
    import asyncio
    import websockets
    from test_live_sources import vp8_webm
    data = vp8_webm(n=40, fps=10)                    # 4 s of video: 4 frames at 1 fps

    async def run():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 1, "format": "webm"}))
            sid = json.loads(await ws.recv())["stream_id"]
            for i in range(0, len(data), 4096):
                await ws.send(data[i:i + 4096])
            await ws.send(json.dumps({"type": "stop"}))
            while (m := json.loads(await ws.recv()))["type"] != "stopped":
                assert m["type"] in ("ingested", "dropped"), m
                if m["type"] == "dropped":
                    told[0] += m["frames"]
                    assert set(m["by_reason"]) == {"over fps"} and m["why"] == "over fps", m
            return sid, m

    told = [0]
    sid, stopped = asyncio.run(run())
    assert stopped["frames"] == 4 and stopped["dropped"] == told[0] == 36, (stopped, told)   # 40 frames: 4 at 1 fps
    with service.client() as c:
        d = c.get(f"/v1/streams/{sid}").json()
        assert d["dropped"] == 0 and d["dropped_why"] == {} and d["skipped_by_fps"] == 36, d
        assert d["status"] == "stopped" and d["lag_s"] is not None and 0 <= d["lag_s"] < 60, d   # was null
        ans = c.post(f"/v1/streams/{sid}/questions", json={"question": "what is in the video ?", "max_tokens": 4})
        assert ans.json()["frames"] == 4 and ans.json()["time_span"] == [0.0, 3.0]

    # the whole file in one message at its own rate, far faster than real time: every frame stored, none shed
    # (the socket is read as fast as frames are stored; half a 10-frame file was shed `queue full`)
    async def whole():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 10, "format": "webm"}))
            sid = json.loads(await ws.recv())["stream_id"]
            await ws.send(data)
            await ws.send(json.dumps({"type": "stop"}))
            while (m := json.loads(await ws.recv()))["type"] != "stopped":
                assert m["type"] == "ingested", m
            return sid, m

    sid, stopped = asyncio.run(whole())
    assert stopped["frames"] == 40 and stopped["dropped"] == 0, stopped
    with service.client() as c:
        d = c.get(f"/v1/streams/{sid}").json()
        assert d["frames"] == 40 and d["dropped"] == 0 and d["gaps"] == [], d


def test_a_socket_that_sends_far_ahead_is_closed_and_one_whose_client_left_ends_at_once(service):
    """A WebM socket's messages waited unread in the Ingress while a chunk's frames were stored: a client that
    sent 300 MB in 10 s grew it by 360 MB, and one that sent a long file and went away kept storing it for 22
    minutes, holding its places. The socket is now read apart from its handling: past
    `limits.max_ws_backlog_bytes` (1 MB here) sent ahead of what is taken it is closed 1009 saying so (1008 is a bad key's), and a
    client that goes away is seen at once (its byte stream stopped, what it sent and was not taken left): its
    place (`lms_live_connections`) is free and its stream stopped within seconds, the frames stored kept."""
    import asyncio
    import websockets
    from test_live_sources import vp8_webm
    data = vp8_webm(n=600, fps=10)                   # 60 s of noise at 10 fps, 1.8 MB
    parts = [data[i:i + 250_000] for i in range(0, len(data), 250_000)]

    def connections(c) -> int:
        return int(_metric(c.get("/metrics").text, "lms_live_connections"))

    def record(sid):
        with service.client() as c:
            return c.get(f"/v1/streams/{sid}").json()

    async def start(ws):
        await ws.send(json.dumps({"type": "start", "fps": 10, "format": "webm"}))
        return json.loads(await ws.recv())["stream_id"]

    async def run():
        with service.client() as c:
            n0 = connections(c)
        async with websockets.connect(_ws_url(service), max_size=None) as ws:      # far ahead: closed
            sid1 = await start(ws)
            for p in parts:
                await ws.send(p)
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    m = json.loads(await asyncio.wait_for(ws.recv(), 60))
                    assert m["type"] in ("ingested", "dropped"), m
            assert ws.close_code == 1009, (ws.close_code, ws.close_reason)
            assert ws.close_reason == ("expected at most 0.953674 MiB sent ahead of what is taken, got more: wait "
                                       "for ingested (max_ws_backlog_bytes)"), ws.close_reason
        ws = await websockets.connect(_ws_url(service), max_size=None)             # sends, then goes away
        sid2 = await start(ws)
        for p in parts[:4]:                                                         # 1 MB: within the backlog
            await ws.send(p)
        with service.client() as c:                                   # some stored: then it goes away
            t0 = time.monotonic()
            while record(sid2)["frames"] == 0 and time.monotonic() - t0 < 30:
                await asyncio.sleep(0.1)
        await ws.close()
        t0 = time.monotonic()
        with service.client() as c:
            while connections(c) != n0 and time.monotonic() - t0 < 60:
                await asyncio.sleep(0.2)
            freed = time.monotonic() - t0
        return sid1, sid2, freed

    sid1, sid2, freed = asyncio.run(run())
    assert freed < 15, f"the socket's place was held {freed:.1f} s after its client left"
    assert 0 < record(sid2)["frames"] < 600
    for sid in (sid1, sid2):
        deadline = time.monotonic() + 30
        while (d := record(sid))["status"] != "stopped" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert d["status"] == "stopped" and d["frames"] < 600, (sid == sid1, d)     # frames stored so far kept
        with service.client() as c:
            assert c.delete(f"/v1/streams/{sid}?purge=true").status_code == 200


def test_web_page_in_headless_chromium(service, tmp_path):
    """The page at / in Debian's Chromium (Playwright, fake webcam): it streams the camera over
    /v1/live and an answer streams into the page."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--no-sandbox", "--disable-gpu",
            "--no-first-run", "--disable-background-networking"])   # Playwright makes and removes its own profile
        try:
            page = browser.new_page()
            page.goto(service.url + "/")
            page.fill("#key", KEY)
            page.click("#connect")
            page.wait_for_function("Number(document.getElementById('frames').textContent) >= 3", timeout=60_000)
            assert page.text_content("#streamId").startswith("live-")
            page.fill("#question", "what is in the video ?")
            page.fill("#lastS", "60")
            page.click("#ask")
            page.wait_for_function("document.body.dataset.answered === '1'", timeout=60_000)
            meta = page.text_content("#meta")
            assert "frames" in meta and "policy exact" in meta, meta
            page.fill("#question", "is there a red square ?")      # the same, picked from candidates
            page.fill("#choices", "yes, no")
            page.click("#ask")
            page.wait_for_function("document.body.dataset.answered === '1'", timeout=60_000)
            assert page.text_content("#answer") in ("yes", "no")
            assert re.search(r"choices yes \d+ %, no \d+ %", page.text_content("#meta")), page.text_content("#meta")
            page.fill("#watchQ", "what is in the video ?")
            page.fill("#watchEvery", "1")
            page.click("#watch")
            page.wait_for_selector("#watches li", timeout=10_000)
            page.wait_for_selector("#events .event", timeout=60_000)      # the watch's first answer, live
            page.click("#stop")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('stopped')",
                                   timeout=30_000)
        finally:
            browser.close()


def test_watches_fused_at_ingest_answer_exactly_and_emit_events(service, media):
    """A watch on a live stream: frames pushed after it (right after its 201: they were not, for about a
    second, while the Encoder's copy of the stream's watches was stale) are fused with its question at ingest; its
    answer over a window equals the plain exact answer over the same frames, token for token; events
    arrive over SSE and on an attached socket."""
    import asyncio
    import websockets
    from stream.decode import VideoSource
    frames = [(f.pts, f.rgb) for f in VideoSource(media / "scene.mp4", fps=1.0, resize_to=64)][:16]
    q = "what colour is the circle ?"

    async def push(ws, part):
        for pts, rgb in part:
            await ws.send(json.dumps({"type": "frame", "pts": pts}))
            await ws.send(_png(rgb))
            while json.loads(await ws.recv())["type"] != "ingested":
                pass

    async def run():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 1}))
            sid = json.loads(await ws.recv())["stream_id"]
            await push(ws, frames[:6])
            with service.client() as c:
                r = c.post(f"/v1/streams/{sid}/watches", json={"question": q, "every_s": 1, "last_s": 100})
                assert r.status_code == 201, r.text
                wid = r.json()["id"]
            await push(ws, frames[6:])                      # at once: the 201 comes once the Encoder has it
            async with websockets.connect(_ws_url(service), max_size=None) as other:
                await other.send(json.dumps({"type": "attach", "stream_id": sid}))
                assert json.loads(await other.recv())["type"] == "attached"
                with service.client() as c:
                    wid2 = c.post(f"/v1/streams/{sid}/watches", json={"question": "how many objects are there ?",
                                                                      "every_s": 1, "last_s": 100}).json()["id"]
                    await push(ws, [(16.0, frames[-1][1]), (17.0, frames[-1][1])])
                ev = None
                while ev is None:
                    m = json.loads(await asyncio.wait_for(other.recv(), 60))
                    if m["type"] == "event" and m["watch"] == wid2:
                        ev = m
            await ws.send(json.dumps({"type": "stop"}))
            return sid, wid, ev

    sid, wid, ev = asyncio.run(run())
    assert ev["text"] and ev["policy"].startswith("watch: fused at ingest with "), ev      # frames since wid2
    with service.client() as c:
        w = c.post(f"/v1/streams/{sid}/watches/{wid}/questions", json={"window": [6, 16], "max_tokens": 8}).json()
        p = c.post(f"/v1/streams/{sid}/questions", json={"question": q, "window": [6, 16], "max_tokens": 8}).json()
        assert w["token_ids"] == p["token_ids"] and w["frames"] == p["frames"] == 10, (w, p)
        assert w["policy"] == "exact (watch: fused at ingest)" and p["policy"] == "exact"
        # a watch reads the window's light records (with its rows), a question their token records
        assert w["timings"]["read_light_MB"] > 5 * p["timings"]["read_light_MB"] > 0, (w["timings"], p["timings"])
        with c.stream("POST", f"/v1/streams/{sid}/watches/{wid}/questions",
                      json={"question": q, "window": [6, 16], "max_tokens": 8, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream"), r.headers
            streamed = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ")]
        assert [e["token_id"] for e in streamed[:-1]] == w["token_ids"] == streamed[-1]["token_ids"]
        r = c.post(f"/v1/streams/{sid}/watches/{wid}/questions", json={"policy": "budget:4"})
        assert r.status_code == 422 and "expected policy 'exact'" in r.json()["error"]["message"], r.text
        r = c.post(f"/v1/streams/{sid}/watches/{wid}/questions", json={"question": "is there a red square ?"})
        assert r.status_code == 422 and r.json()["error"]["message"] == (     # another question: refused
            f"expected no question, or the watch's own ({q!r}: a watch answers only the question fused at ingest), "
            "got 'is there a red square ?'"), r.text
        mixed = c.post(f"/v1/streams/{sid}/watches/{wid}/questions", json={"window": [0, 16]}).json()
        assert mixed["frames"] == 16 and mixed["frames_fused"] == 10 and "10 of 16" in mixed["policy"]
        got = []
        with c.stream("GET", f"/v1/streams/{sid}/events?after=0", timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(json.loads(line[6:]))
                    if {e["watch"] for e in got} >= {wid}:
                        break
        assert any(e["watch"] == wid and e["text"] for e in got)
        assert [x["id"] for x in c.get(f"/v1/streams/{sid}/watches").json()["data"]] == sorted([wid, ev["watch"]])
        assert c.delete(f"/v1/streams/{sid}/watches/{wid}").json()["deleted"] is True
        # a watch made after the stream's last frame has no frame fused with it: its evaluations said nothing,
        # ever (the error was swallowed); the watch now says why. Past limits.max_watches_per_stream (3 here):
        # 429, the limit named
        late = c.post(f"/v1/streams/{sid}/watches", json={"question": q, "every_s": 1, "last_s": 100}).json()["id"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            w = {x["id"]: x for x in c.get(f"/v1/streams/{sid}/watches").json()["data"]}[late]
            if w.get("last_error"):
                break
            time.sleep(0.5)
        assert w["last_error"]["code"] == "E_NO_FRAMES" and "fused with watch" in w["last_error"]["message"], w
        assert c.post(f"/v1/streams/{sid}/watches", json={"question": q}).status_code == 201     # the third
        r = c.post(f"/v1/streams/{sid}/watches", json={"question": q})
        assert r.status_code == 429 and r.json()["error"]["message"].startswith(
            f"expected at most 3 watches of stream {sid!r}, got 3 already"), r.text
        assert "retry-after" not in r.headers, r.headers            # waiting does not lift this limit


def test_websocket_auth_size_limit_and_bad_messages(service):
    import asyncio
    import websockets

    async def run():
        async with websockets.connect(_ws_url(service, token="wrong")) as ws:
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008 and ws.close_reason == ("expected a valid API key, got one the service "
                                                                 "does not know")
        async with websockets.connect(_ws_url(service, token=None)) as ws:       # no key at all
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008 and ws.close_reason.endswith("got none")
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send("{not json")
            m = json.loads(await ws.recv())
            assert m["type"] == "error" and m["code"] == "E_INVALID_REQUEST"
            await ws.send(b"\x89PNG but no start")
            m = json.loads(await ws.recv())
            assert m["type"] == "error" and "start" in m["message"]
            await ws.send(json.dumps({"type": "start", "fps": 1}))
            assert json.loads(await ws.recv())["type"] == "started"
            await ws.send(b"not an image at all")
            m = json.loads(await ws.recv())
            assert m["type"] == "error" and m["code"] == "E_NOT_A_VIDEO"
            await ws.send(b"\0" * 400_000)                       # over max_ws_message_bytes
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await ws.recv()
            assert ws.close_code == 1009
    asyncio.run(run())


def test_socket_messages_that_broke_it_are_told_and_it_goes_on(service, uploaded):
    """What a user of the socket found: `"fps": "abc"` and a 15000x15000 PNG of 700 KB (PIL's decompression
    bomb) closed the socket 1006 with nothing said, `"fps": "2"` was read as 2, a `frame` message before
    `start` got no reply, `start` on an attached socket started a second stream beside the attachment,
    `start` with a video's id said "expected capacity ...", two asks in flight under one id mixed their
    tokens, `stop` while an ask was answered dropped it (no answer, no error), and a pause of the client
    (pts 1 -> 10 at 1 fps, as long as makes the stream `stalled`) was no gap. Each is now told or kept."""
    import asyncio
    import io

    import websockets
    from PIL import Image
    rgb = np.full((64, 64, 3), 90, np.uint8)
    bomb = io.BytesIO()
    Image.new("1", (15000, 15000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 2 ** 20

    async def reply(ws):
        return json.loads(await asyncio.wait_for(ws.recv(), 120))

    async def run():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "frame", "pts": 1}))
            m = await reply(ws)
            assert (m["type"], m["code"]) == ("error", "E_INVALID_REQUEST") and "start" in m["message"], m
            for bad in ("abc", "2", True, [1], {"x": 1}):
                await ws.send(json.dumps({"type": "start", "fps": bad, "format": "png"}))
                m = await reply(ws)
                assert (m["type"], m["code"]) == ("error", "E_INVALID_REQUEST"), (bad, m)
                assert m["message"].startswith("expected fps as a number in (0, "), m
            await ws.send(json.dumps({"type": "start", "stream_id": uploaded["id"], "format": "png"}))
            m = await reply(ws)
            assert m["code"] == "E_INVALID_REQUEST" and "which is a video" in m["message"], m
            await ws.send(json.dumps({"type": "start", "fps": 1, "format": "png"}))
            assert (await reply(ws))["type"] == "started"
            await ws.send(bomb.getvalue())
            m = await reply(ws)
            assert (m["type"], m["code"]) == ("error", "E_TOO_LARGE") and "225000000 pixels" in m["message"], m
            assert (await reply(ws))["type"] == "dropped"
            await ws.send(json.dumps({"type": "ask", "question": "is there a red square ?"}))
            m = await reply(ws)                                  # the socket goes on: told it has no frame
            assert (m["type"], m["code"]) == ("error", "E_NO_FRAMES"), m
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 1, "format": "png"}))
            sid = (await reply(ws))["stream_id"]
            await _push_frames(ws, [(0.0, rgb), (1.0, rgb), (10.0, rgb), (11.0, rgb)])   # paused 1 -> 10
            ask = {"type": "ask", "id": "A", "question": "what colour is the circle ?", "max_tokens": 3}
            await ws.send(json.dumps(ask))
            await ws.send(json.dumps(ask))
            await ws.send(json.dumps({**ask, "id": "B"}))
            await ws.send(json.dumps({"type": "stop"}))
            got = []
            while (m := await reply(ws))["type"] != "stopped":
                got.append(m)
            ends = [(m["type"], m.get("id")) for m in got if m["type"] in ("answer", "error")]
            assert sorted(ends, key=str) == [("answer", "A"), ("answer", "B"), ("error", None)], got
            dup = next(m for m in got if m["type"] == "error")
            assert dup["message"] == ('expected an id not in use by a question still being answered, got "A" (this '
                                      'ask is not answered)'), dup
            answer = next(m for m in got if m["type"] == "answer")
            assert answer["gaps"] == [[1.0, 10.0]] and answer["frames"] == 4, answer
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "attach", "stream_id": sid}))
            assert (await reply(ws))["type"] == "attached"
            await ws.send(json.dumps({"type": "start", "fps": 1, "format": "png"}))
            m = await reply(ws)
            assert m["code"] == "E_INVALID_REQUEST" and "attached to" in m["message"], m
            await ws.send(json.dumps({"type": "ask", "id": 1, "question": "is there a red square ?",
                                      "max_tokens": 2}))
            while (m := await reply(ws))["type"] == "token":
                pass
            assert m["type"] == "answer" and m["frames"] == 4, m    # the socket went on after each of those
            # an id is free again once its answer is sent: the same id asked at once is answered
            await ws.send(json.dumps({"type": "ask", "id": 1, "question": "is there a red square ?",
                                      "max_tokens": 2}))
            while (m := await reply(ws))["type"] == "token":
                pass
            assert (m["type"], m["id"]) == ("answer", 1), m
        return sid

    sid = asyncio.run(run())
    with service.client() as c:
        d = c.get(f"/v1/streams/{sid}").json()
    assert d["gaps"] == [[1.0, 10.0]] and d["frames"] == 4, d


def test_private_camera_addresses_are_refused_unless_allowed():
    from deploy.routes import check_source
    from lmcore.errors import InvalidRequest, PathNotAllowed
    for url in ("rtsp://127.0.0.1:8554/cam", "rtsp://10.1.2.3/x", "rtsp://[::1]:554/x", "rtsp://169.254.1.1/x",
                "rtsp://100.64.0.1/c"):                 # (shared address space, RFC 6598: was let through)
        with pytest.raises(PathNotAllowed, match="private"):
            check_source(url, allow_private=False)
        assert check_source(url, allow_private=True) == url
    with pytest.raises(InvalidRequest, match="rtsp://"):
        check_source("file:///etc/passwd", allow_private=True)
    for url in (" rtsp://127.0.0.1/cam", "rtsp://127.0.0.1/c am", "rtsp://127.0.0.1/cam\n"):   # were 201, then an
        with pytest.raises(InvalidRequest, match="without spaces or control characters"):   # actor crash-looping
            check_source(url, allow_private=True)
    assert check_source("RTSP://127.0.0.1:8554/Cam", allow_private=True) == "rtsp://127.0.0.1:8554/Cam"
    with pytest.raises(InvalidRequest) as e:            # the cameras' redaction: the whole password hidden
        check_source("http://cam:s3@cret@host/x", allow_private=True)
    assert "'http://cam:***@host/x'" in e.value.message and "cret" not in e.value.message, e.value
    # urlparse's own ValueError (an unclosed '[', a port that is no port) was a 500: now 422 saying why
    for url, why in (("rtsp://h[bad/x", "invalid ipv6 url"), ("rtsp://[::1/x", "invalid ipv6 url"),
                     ("rtsp://cam:99999/x", "port out of range"), ("rtsp://u:pw@cam:abc/x", "port could not be cast")):
        for allow in (False, True):
            with pytest.raises(InvalidRequest) as e:
                check_source(url, allow_private=allow)
            assert e.value.message.startswith("expected source rtsp://HOST[:PORT]/PATH") and why in e.value.message
            assert "pw" not in e.value.message, e.value


def test_a_camera_host_that_cannot_be_a_host_name_is_422():
    """A host name the IDNA codec refuses (a 64-character label, an empty one) raised UnicodeError out of
    getaddrinfo: POST /v1/streams answered 500. It is 422, allowed private addresses or not."""
    from deploy.routes import check_source
    from lmcore.errors import InvalidRequest
    for host, why in (("a" * 64 + ".example", "label empty or too long"), ("cam..example", "label empty")):
        for allow in (False, True):
            with pytest.raises(InvalidRequest) as e:
                check_source(f"rtsp://{host}/cam", allow_private=allow)
            assert e.value.code == "E_INVALID_REQUEST", e.value
            assert e.value.message.startswith(f"expected a host name, got {host!r}, which cannot be one ("), e.value
            assert why in e.value.message, e.value


def _err(r, keep: bool = False) -> dict:
    """The error body of a response, with its status under "status". The OpenAI-compatible routes' errors
    carry OpenAI's `type` (checked against the status here) and `param` too: left out unless `keep`."""
    e = {"status": r.status_code, **r.json()["error"]}
    if r.request.url.path in ("/v1/chat/completions", "/v1/models") or r.request.url.path.startswith("/v1/models/"):
        want = "server_error" if r.status_code >= 500 else "invalid_request_error"
        assert e.get("type") == want and "param" in e, e
        if not keep:
            del e["type"], e["param"]
    else:
        assert "type" not in e and "param" not in e, e
    return e


def _camera_stream(c, source: str) -> str:
    """A camera stream (its record, no frames needed) whose source is `source`."""
    r = c.post("/v1/streams", json={"source": source, "fps": 1})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_a_client_mistake_is_422_invalid_request_naming_the_field_on_every_route(service, uploaded, media):
    """One rule for a value the client got wrong: 422 E_INVALID_REQUEST, "expected <field> ..., got ...".
    A window [0, 1e309] was 400 E_BAD_ARGUMENT (from the frame cache) where [30, 10] was 422; a stream id
    "../../etc" 400 where "" was 422; a window [0, inf] on a job by path or an upload was accepted (202);
    a malformed id in an lms:// URL or a socket's attach was 404; a socket's start with a bad id was
    E_BAD_ARGUMENT; a choice the tokenizer cannot spell was 400."""
    import asyncio
    import websockets
    vid = uploaded["id"]
    jtype = {"content-type": "application/json"}
    before = _uploads(service)
    with service.client() as c:
        def ask(body: bytes, path=f"/v1/videos/{vid}/questions"):
            return _err(c.post(path, content=body, headers=jtype))
        for body, says in ((b'{"question": "q", "window": [0, 1e309]}', "expected window [start, end] of finite"),
                           (b'{"question": "q", "window": [30, 10]}', "expected window [start, end] with 0 <="),
                           (b'{"question": "q", "last_s": 1e309}', "expected last_s")):
            e = ask(body)
            assert (e["status"], e["code"]) == (422, "E_INVALID_REQUEST") and e["message"].startswith(says), (body, e)
        for sid in ("../../etc", "", "a" * 129, "bad id!", "bad id/with slash"):
            e = _err(c.post("/v1/streams", json={"source": "rtsp://127.0.0.1:9/cam", "id": sid}))
            assert e == {"status": 422, "code": "E_INVALID_REQUEST", "message": "expected id of 1-128 characters "
                         f"from [A-Za-z0-9._:-], got {json.dumps(sid)}"}, e
        e = _err(c.post("/v1/videos", content=json.dumps({"path": str(media / "scene.mp4")})[:-1].encode()
                        + b', "window": [0, 1e309]}', headers=jtype))
        assert (e["status"], e["code"]) == (422, "E_INVALID_REQUEST") and "window" in e["message"], e
        data = (media / "scene.mp4").read_bytes()
        for window in ("0,inf", "nan,5"):
            e = _err(c.post("/v1/videos", files={"file": ("scene.mp4", data, "video/mp4")}, data={"window": window}))
            assert e == {"status": 422, "code": "E_INVALID_REQUEST",
                         "message": f"expected window as START,END finite seconds, got {window!r}"}, e
        for url in ("lms://videos/bad!id", "lms://streams/bad!id"):
            e = _err(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
                {"type": "text", "text": "q"}, {"type": "video_url", "video_url": {"url": url}}]}]}), keep=True)
            assert e["status"] == 400 and e["code"] == "E_INVALID_REQUEST" and "bad!id" in e["message"], e
            assert e["message"].startswith("expected video_url.url"), e
            assert (e["type"], e["param"]) == ("invalid_request_error", "messages"), e
        e = _err(c.post(f"/v1/videos/{vid}/questions", json={"question": "what colour is the circle?",
                                                            "choices": ["red", "cyan"]}))
        assert (e["status"], e["code"]) == (422, "E_INVALID_REQUEST") and "'cyan'" in e["message"], e
        e = _err(c.post(f"/v1/videos/{vid}/questions", json={"question": "q", "choices": ["red", "cyan"],
                                                            "stream": True}))
        assert (e["status"], e["code"]) == (422, "E_INVALID_REQUEST"), e
    assert _uploads(service) == before                           # the refused uploads left nothing

    async def socket():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            for m in ({"type": "start", "stream_id": "../x", "fps": 1}, {"type": "attach", "stream_id": "bad id!"}):
                await ws.send(json.dumps(m))
                got = json.loads(await ws.recv())
                assert got["type"] == "error" and got["code"] == "E_INVALID_REQUEST", got
                assert got["message"].startswith(f"expected {m['type']}.stream_id of 1-128 characters"), got
    asyncio.run(socket())


def test_lms_urls_and_question_routes_say_which_kind_an_id_is(service, uploaded):
    """lms://streams/ID names a stream and lms://videos/ID a video, as the question routes do: a video
    asked about as lms://streams/ID was answered (while POST /v1/streams/ID/questions was 404); now 404
    on both, saying what the id is and what to use; so are DELETE, watches and events, and the video and
    the stream are still there afterwards."""
    vid = uploaded["id"]

    def chat(c, url):
        return c.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "text", "text": QUESTIONS[0]}, {"type": "video_url", "video_url": {"url": url}}]}]})
    with service.client() as c:
        sid = _camera_stream(c, f"rtsp://127.0.0.1:{free_port()}/cam")
        try:
            for got, kind, other, use in (
                    (chat(c, f"lms://streams/{vid}"), "stream", "video", f"lms://videos/{vid}"),
                    (c.post(f"/v1/streams/{vid}/questions", json={"question": "q"}), "stream", "video",
                     f"POST /v1/videos/{vid}/questions"),
                    (chat(c, f"lms://videos/{sid}"), "video", "stream", f"lms://streams/{sid}"),
                    (c.post(f"/v1/videos/{sid}/questions", json={"question": "q"}), "video", "stream",
                     f"POST /v1/streams/{sid}/questions"),
                    # DELETE and a stream's watches and events too (they said "expected a known ... id")
                    (c.delete(f"/v1/videos/{sid}"), "video", "stream", f"DELETE /v1/streams/{sid}"),
                    (c.delete(f"/v1/streams/{vid}"), "stream", "video", f"DELETE /v1/videos/{vid}"),
                    (c.post(f"/v1/streams/{vid}/watches", json={"question": QUESTIONS[0]}), "stream", "video",
                     f"a video's questions, POST /v1/videos/{vid}/questions (a watch is a live stream's)"),
                    (c.get(f"/v1/streams/{vid}/events"), "stream", "video",
                     f"GET /v1/videos/{vid} (watch events are a live stream's)")):
                rid = vid if other == "video" else sid
                assert _err(got) == {"status": 404, "code": "E_NOT_FOUND", "message":
                                     f"expected a {kind} id, got {rid!r}, which is a {other}: use {use}"}, got.text
            for url, kind in (("lms://streams/nope", "stream"), ("lms://videos/nope", "video")):
                assert _err(chat(c, url)) == {"status": 404, "code": "E_NOT_FOUND",
                                              "message": f"expected a known {kind} id, got 'nope'"}
            r = chat(c, f"lms://videos/{vid}")
            assert r.status_code == 200 and r.json()["lmstream"]["frames"] == 40, r.text
            assert c.get(f"/v1/streams/{sid}").status_code == 200
        finally:
            c.delete(f"/v1/streams/{sid}", params={"purge": "true"})


def test_chat_refuses_n_other_than_1_and_models_it_does_not_serve(service, uploaded):
    """`n: 2` answered one choice, and any `model` name was answered; now n != 1 is refused (400, as OpenAI
    and vLLM, which OpenAI's client raises as BadRequestError; it was 422) and a model other than the one
    GET /v1/models lists is 404 naming it (what vLLM answers); no model at all still answers."""
    import openai
    content = [{"type": "text", "text": QUESTIONS[0]},
               {"type": "video_url", "video_url": {"url": f"lms://videos/{uploaded['id']}"}}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    with service.client() as c:
        served = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert served == ["demo"]
        for n in (2, 0, True, "1"):
            e = _err(c.post("/v1/chat/completions", json={**body, "n": n}), keep=True)
            assert e == {"status": 400, "code": "E_INVALID_REQUEST", "type": "invalid_request_error", "param": "n",
                         "message": f"expected n 1, got {json.dumps(n)} (one choice per request)"}, e
        e = _err(c.post("/v1/chat/completions", json={**body, "model": "gpt-4o"}))
        assert e == {"status": 404, "code": "E_NOT_FOUND",
                     "message": "expected model 'demo' (GET /v1/models), got 'gpt-4o'"}, e
        for extra in ({}, {"n": 1}, {"model": "demo"}, {"n": None, "model": None}):
            r = c.post("/v1/chat/completions", json={**body, **extra})
            assert r.status_code == 200 and len(r.json()["choices"]) == 1 and r.json()["model"] == "demo", r.text
    client = openai.OpenAI(base_url=service.url + "/v1", api_key=KEY)
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        client.chat.completions.create(model="gpt-4o", messages=body["messages"], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="expected n 1") as e:
        client.chat.completions.create(model="demo", messages=body["messages"], max_tokens=2, n=2)
    assert (e.value.type, e.value.param, e.value.code) == ("invalid_request_error", "n", "E_INVALID_REQUEST")


def test_a_streamed_answer_is_cut_at_the_same_stop_string_as_the_whole_one():
    """`_chat_chunks` holds back text that may begin a stop string and cuts where one is complete; joined,
    its deltas are `cut_at_stop` of the whole answer, however the answer is split into tokens (a stop
    string inside another, `["abcd", "c"]` over "ab|c|d", was "ab" streamed and "" whole)."""
    import asyncio
    import random
    from deploy.routes import _chat_chunks, cut_at_stop

    def streamed(tokens, stops):
        async def events():
            for t in tokens:
                yield {"type": "token", "text": t}
            yield {"type": "answer", "text": "".join(tokens), "finish_reason": "length", "token_ids": []}

        async def run():
            return [c async for c in _chat_chunks(events(), "id", 0, "m", stops)]
        chunks = [json.loads(c[6:]) for c in asyncio.run(run()) if c.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        return text, chunks[-1]["choices"][0]["finish_reason"]

    assert streamed(["ab", "c", "d"], ["abcd", "c"]) == ("ab", "stop") and cut_at_stop("abcd", ["abcd", "c"]) == \
        ("ab", True)
    rng = random.Random(7)
    for _ in range(300):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 12)))
        stops = ["".join(rng.choice("abc ") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 5)))) if len(text) > 1 else []
        tokens = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        want, cut = cut_at_stop(text, stops)
        assert streamed(tokens, stops) == (want, "stop" if cut else "length"), (text, tokens, stops)


def test_chat_as_openais_client_uses_it_stop_usage_follow_ups_and_what_it_refuses(service, uploaded):
    """What a user coming from vLLM found with OpenAI's own client: `stop` was ignored (the answer went on
    past it), `stream_options.include_usage` sent no usage chunk, logprobs / response_format / tools /
    penalties were accepted and silently ignored, a seed past 64 bits was a 500, `models.retrieve` was 404,
    `created` was 0, a follow-up question without the video part was refused, and a text part of 123 was
    answered. Now: stop cuts (streamed too, a stop string split across tokens held back), the usage chunk
    comes, unsupported fields and bad types are 400 naming the `param`, the video comes from an earlier turn.
    A stop string also ends generation (the model had run on to its own end, `usage` counting it all)."""
    import openai
    vid = uploaded["id"]
    video = {"type": "video_url", "video_url": {"url": f"lms://videos/{vid}"}}
    order = "which appeared first, the blue cross or the blue circle?"       # the scene's: two words back
    msgs = [{"role": "user", "content": [{"type": "text", "text": order}, video]}]
    client = openai.OpenAI(base_url=service.url + "/v1", api_key=KEY, max_retries=0)
    full = client.chat.completions.create(model="demo", messages=msgs, max_tokens=8)
    text = full.choices[0].message.content
    assert len(text.split()) >= 2 and full.usage.completion_tokens == len(full.lmstream["token_ids"]), full
    assert full.usage.prompt_tokens == full.lmstream["llm_tokens"] and full.lmstream["text"] == text
    stop = " " + text.split()[1][:2]                       # the second word's start: a token split apart
    want = text[:text.find(stop)]
    r = client.chat.completions.create(model="demo", messages=msgs, max_tokens=8, stop=[stop, "zzz-never"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop"), (stop, text, r)
    # generation ended at the stop string: the tokens up to the one completing it, no LLM step after it
    k = len(r.lmstream["token_ids"])
    assert r.lmstream["token_ids"] == full.lmstream["token_ids"][:k] and r.usage.completion_tokens == k, (r, full)
    assert k < len(full.lmstream["token_ids"]) or full.choices[0].finish_reason == "length", (r, full)
    assert r.lmstream["text"] == want and r.lmstream["finish_reason"] == "stop", r
    chunks = list(client.chat.completions.create(model="demo", messages=msgs, max_tokens=8, stop=stop,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want, chunks
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"] and chunks[-1].choices == [], chunks
    assert chunks[-1].usage.model_dump() == r.usage.model_dump() and all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(model="demo", messages=msgs, max_tokens=8, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in plain) == text
    assert all(c.choices and "usage" not in c.model_dump(exclude_unset=True) for c in plain)

    # a follow-up: the video from the first turn, the question from the last
    follow = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": order}]
    again = client.chat.completions.create(model="demo", messages=follow, max_tokens=8)
    assert again.choices[0].message.content == text and again.lmstream["frames"] == 40, again

    m = client.models.retrieve("demo")
    assert m.id == "demo" and abs(m.created - time.time()) < 24 * 3600, m
    assert [x.created for x in client.models.list().data] == [m.created]
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.type == "invalid_request_error" and "expected model 'demo'" in e.value.message
    assert client.models.retrieve("demo/").id == "demo"
    with service.client() as c:                                    # /v1/models/ is the list, as it was
        assert c.get("/v1/models/").json()["data"][0]["id"] == "demo"

    for extra, param, says in (
            ({"logprobs": True}, "logprobs", "expected no logprobs (this service does not support it; leave it "
                                             "out), got true"),
            ({"response_format": {"type": "json_object"}}, "response_format", "expected no response_format"),
            ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "expected no tools"),
            ({"presence_penalty": 0.5}, "presence_penalty", "expected no presence_penalty"),
            ({"logit_bias": {"61": -100}}, "logit_bias", "expected no logit_bias"),
            ({"seed": 2 ** 70, "temperature": 1}, "seed", "expected seed: Input should be less than or equal to "
                                                          "18446744073709551615"),
            ({"max_tokens": True}, "max_tokens", "expected max_tokens: Input should be a valid integer, got true"),
            ({"temperature": "1"}, "temperature", "expected temperature"),
            ({"stream_options": {"include_usage": True}}, "stream_options", "expected stream_options only with "
                                                                            "stream true"),
            ({"stop": [""]}, "stop", "expected stop to be a string or a list of at most 16 strings"),
            ({"extra_body": {"include_stop_str_in_output": True}}, "include_stop_str_in_output", "expected no "
                                                                                  "include_stop_str_in_output"),
            ({"stream": True, "stream_options": {"continuous_usage_stats": True}},
             "stream_options.continuous_usage_stats", "expected no stream_options.continuous_usage_stats")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": "demo", "messages": msgs, "max_tokens": 2, **extra})
        assert (e.value.status_code, e.value.param, e.value.code) == (400, param, "E_INVALID_REQUEST"), (extra, e.value)
        assert e.value.body["message"].startswith(says), (extra, e.value.body)
    # harmless values of those fields, and fields that change nothing, are taken
    ok = client.chat.completions.create(model="demo", messages=msgs, max_tokens=8, logprobs=False,
                                        presence_penalty=0, response_format={"type": "text"}, user="u1",
                                        extra_body={"top_k": -1})
    assert ok.choices[0].message.content == text

    for content, says in (
            (None, "expected messages[0].content to be text or a list of text and video_url parts, got null"),
            ([{"type": "text", "text": 123}, video], "expected messages[0].content[0].text to be a string, got 123"),
            ([{"type": "text", "text": "q"}, {"type": "video_url", "video_url": f"lms://videos/{vid}"}],
             "expected messages[0].content[1].video_url to be an object"),
            ([{"type": "text", "text": "q"}, video, video], "expected at most one video_url part in messages[0]"),
            ("what colour ?", "expected a video_url part (lms://videos/ID or lms://streams/ID) in a user message")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="demo", messages=[{"role": "user", "content": content}], max_tokens=2)
        assert e.value.body["message"].startswith(says) and e.value.param == "messages", (content, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:                 # an image_url in the first of two turns
        client.chat.completions.create(model="demo", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
            {"role": "assistant", "content": "ok"}, msgs[0]])
    assert e.value.body["message"] == ('expected content parts of type text or video_url, got "image_url" at '
                                       "messages[0].content[0]"), e.value.body


def test_booleans_and_numbers_in_request_bodies_are_strict(service, uploaded, media):
    """`"stream": "yes"` (or 1, or "true") was read as true by pydantic's lax bool, and `"fps": "2"` or
    `"max_tokens": true` as numbers; now 422 naming the field, on the question routes, chat, the job, camera
    and watch routes and a socket's ask."""
    import asyncio
    import websockets
    vid = uploaded["id"]
    content = [{"type": "text", "text": "q"}, {"type": "video_url", "video_url": {"url": f"lms://videos/{vid}"}}]
    with service.client() as c:
        for bad in ("yes", 1, "true", 0, "false"):
            for path, body in ((f"/v1/videos/{vid}/questions", {"question": "q"}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": content}]})):
                e = _err(c.post(path, json={**body, "stream": bad, "max_tokens": 2}))
                assert e == {"status": 400 if "chat" in path else 422, "code": "E_INVALID_REQUEST", "message":
                             f"expected stream: Input should be a valid boolean, got {json.dumps(bad)}"}, (path, e)
        assert c.post(f"/v1/videos/{vid}/questions", json={"question": "q", "stream": False,
                                                          "max_tokens": 2}).status_code == 200
        # OpenAI's schema allows "stream": null (not streamed); our own routes' stream is true or false
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "stream": None,
                                                 "max_tokens": 2})
        assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text
        for path, body, field, bad, kind in (
                (f"/v1/videos/{vid}/questions", {"question": "q"}, "max_tokens", "2", "a valid integer"),
                (f"/v1/videos/{vid}/questions", {"question": "q"}, "max_tokens", True, "a valid integer"),
                (f"/v1/videos/{vid}/questions", {"question": "q"}, "last_s", "10", "a valid number"),
                ("/v1/videos", {"path": str(media / "scene.mp4")}, "fps", "2", "a valid number"),
                ("/v1/streams", {"source": "rtsp://127.0.0.1:9/cam"}, "capacity_frames", "100", "a valid integer")):
            e = _err(c.post(path, json={**body, field: bad}))
            assert e == {"status": 422, "code": "E_INVALID_REQUEST", "message":
                         f"expected {field}: Input should be {kind}, got {json.dumps(bad)}"}, (path, e)
        r = c.post(f"/v1/videos/{vid}/questions", json={"question": "q", "max_tokens": 2, "window": [0, 10.5]})
        assert r.status_code == 200 and r.json()["frames"] == 11, r.text       # whole numbers and floats alike
        # the service's limit is 48 here: over it is refused; a question that sends none gets 48, not the 64
        # that was refused ("expected max_tokens <= 48, got 64", on every route and the socket)
        e = _err(c.post(f"/v1/videos/{vid}/questions", json={"question": "q", "max_tokens": 49}))
        assert e == {"status": 422, "code": "E_INVALID_REQUEST", "message": "expected max_tokens <= 48, got 49"}, e
        assert c.post(f"/v1/videos/{vid}/questions", json={"question": "q"}).status_code == 200
        assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]}).status_code \
            == 200

    async def socket():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "attach", "stream_id": vid}))
            assert json.loads(await ws.recv())["type"] == "attached"
            await ws.send(json.dumps({"type": "ask", "id": "b", "question": "q", "stream": "yes"}))
            m = json.loads(await ws.recv())
            assert m["type"] == "error" and m["id"] == "b" and m["code"] == "E_INVALID_REQUEST", m
            assert m["message"] == 'expected stream: Input should be a valid boolean, got "yes"', m
    asyncio.run(socket())


def test_a_socket_attached_to_a_video_answers_as_the_video_route(service, uploaded):
    """A video's id names no stream, but `/v1/live` `attach` takes one (to ask about a file over the
    socket): the answer is the one POST /v1/videos/{id}/questions gives, its checks and context included
    (a queued job is 409 on both; one ingesting answers over its stored frames on both)."""
    import asyncio
    import websockets
    vid, q = uploaded["id"], {"question": "what is in the video ?", "max_tokens": 4, "last_s": 20}
    with service.client() as c:
        want = c.post(f"/v1/videos/{vid}/questions", json=q).json()

    async def socket(then=None):
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "attach", "stream_id": vid}))
            assert json.loads(await ws.recv()) == {"type": "attached", "stream_id": vid, "frames": 40, "kind": "video"}
            if then is not None:
                then()
            await ws.send(json.dumps({"type": "ask", "id": "v", **q}))
            while (m := json.loads(await ws.recv()))["type"] not in ("answer", "error"):
                assert m["type"] == "token", m
            return m
    got = asyncio.run(socket())
    for k in ("text", "frames", "time_span", "gaps", "policy"):
        assert got[k] == want[k], (k, got, want)
    from deploy.serving import JobStore
    jobs = JobStore(service.redis_url)
    try:
        # a job still ingesting: both answer over the frames it has stored, saying so (a 3-hour file was 409
        # for its whole ingest), the span not stored yet a gap
        got = asyncio.run(socket(then=lambda: jobs.update(vid, status="ingesting")))
        with service.client() as c:
            http = c.post(f"/v1/videos/{vid}/questions", json=q).json()
        assert got["job"]["status"] == http["job"]["status"] == "ingesting" and got["job"]["frames"] == 40, got
        for k in ("text", "frames", "time_span", "gaps", "policy"):
            assert got[k] == http[k], (k, got, http)
        assert got["gaps"][-1][0] == 39.0, got
        # queued, nothing stored for it yet: 409 on both
        got = asyncio.run(socket(then=lambda: jobs.update(vid, status="queued")))
        with service.client() as c:
            e = _err(c.post(f"/v1/videos/{vid}/questions", json=q))
        assert e["status"] == 409 and got["code"] == e["code"] == "E_NOT_READY", (got, e)
        assert got["message"] == e["message"] and got["id"] == "v", (got, e)
    finally:
        jobs.update(vid, status="ready")

    async def nothing_there():                            # an error of the answer itself (no frame in the window)
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "attach", "stream_id": vid}))
            json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "ask", "id": "w", "question": "q", "window": [500, 600]}))
            return json.loads(await ws.recv())
    got = asyncio.run(nothing_there())
    # the protocol's fields only (it carried the HTTP route's "status": 422 too)
    assert set(got) == {"type", "code", "message", "id"} and got["code"] == "E_NO_FRAMES", got


def test_an_unreachable_camera_says_why_in_plain_words(service):
    """GET /v1/streams/ID of a camera whose port accepts connections but never answers said
    "InvalidDataError: Invalid data found when processing input"; now it says it timed out, and a
    refused one that nothing listens there."""
    import socket
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)                                  # the kernel accepts; nothing ever answers
    port = free_port()
    with service.client() as c:
        ids = [_camera_stream(c, f"rtsp://127.0.0.1:{silent.getsockname()[1]}/cam"),
               _camera_stream(c, f"rtsp://127.0.0.1:{port}/cam")]
        try:
            deadline, errs = time.monotonic() + 90, {}
            while len(errs) < 2 and time.monotonic() < deadline:
                for sid in ids:
                    d = c.get(f"/v1/streams/{sid}").json()
                    if d["last_error"]:
                        errs[sid] = d["last_error"]
                time.sleep(0.5)
            assert len(errs) == 2, errs
            assert errs[ids[0]] == {"code": "E_SOURCE_UNREACHABLE", "message":
                                    f"expected an RTSP answer from rtsp://127.0.0.1:{silent.getsockname()[1]}/cam, got "
                                    "nothing for 5 s (the server accepted the connection, then sent nothing; "
                                    "timed out)"}, errs
            assert errs[ids[1]] == {"code": "E_SOURCE_UNREACHABLE", "message":
                                    f"expected a connection to rtsp://127.0.0.1:{port}/cam, got connection refused "
                                    f"(nothing listens on 127.0.0.1:{port})"}, errs
        finally:
            for sid in ids:
                c.delete(f"/v1/streams/{sid}", params={"purge": "true"})
            silent.close()


def test_streams_routes_validate_sources(service):
    with service.client() as c:
        r = c.post("/v1/streams", json={"source": "http://example.com/cam"})
        assert r.status_code == 422 and "rtsp://" in r.json()["error"]["message"]
        r = c.post("/v1/streams", json={"source": f"rtsp://{'a' * 64}.example/cam"})     # was 500 (UnicodeError)
        assert r.status_code == 422 and r.json()["error"]["code"] == "E_INVALID_REQUEST", r.text
        assert r.json()["error"]["message"].startswith("expected a host name, got 'aaaa"), r.text
        assert c.get("/v1/streams/nope").status_code == 404
        assert c.get("/").status_code == 200 and "/v1/live" in c.get("/").text   # the web page


def test_rtsp_camera_live_outage_gap_and_two_cameras(service, tmp_path):
    """Two cameras from a real GStreamer RTSP server: frames flow (batched across cameras by the
    Encoder), a killed server makes the stream reconnect, and an answer over the outage reports it in
    `gaps`; DELETE stops the source and keeps the frames."""
    from rtsp_server import RtspServer

    def status(c, sid):
        return c.get(f"/v1/streams/{sid}").json()

    def wait(c, sid, pred, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            d = status(c, sid)
            if pred(d):
                return d
            time.sleep(0.5)
        raise AssertionError(f"stream {sid} never reached the state: {d}")

    with RtspServer(tmp_path / "rtsp", mounts=("cam1", "cam2")) as cam, service.client() as c:
        ids = []
        for m in ("cam1", "cam2"):
            r = c.post("/v1/streams", json={"source": cam.url(m), "fps": 1, "id": f"test-{m}"})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        for sid in ids:
            d = wait(c, sid, lambda d: d["status"] == "live" and d["frames"] >= 3)
            assert d["kind"] == "rtsp" and d["last_pts"] is not None
        assert {s["id"] for s in c.get("/v1/streams").json()["data"]} >= set(ids)
        assert 'lms_stream_lag_seconds{stream="test-cam1"}' in c.get("/metrics").text
        cam.kill()
        d = wait(c, ids[0], lambda d: d["status"] in ("reconnecting", "stalled"))
        cam.restart()
        d = wait(c, ids[0], lambda d: d["status"] == "live" and d["gaps"], timeout=120)
        n = d["frames"]
        wait(c, ids[0], lambda d: d["frames"] >= n + 2)
        ans = c.post(f"/v1/streams/{ids[0]}/questions", json={"question": "what is in the video ?",
                                                               "max_tokens": 4}).json()
        assert ans["gaps"] and ans["frames"] >= 5, ans                     # the outage is inside the window
        g = ans["gaps"][0]
        assert ans["time_span"][0] <= g[1] and g[0] <= ans["time_span"][1]
        chat = c.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is in the video ?"},
            {"type": "video_url", "video_url": {"url": f"lms://streams/{ids[0]}?last_s=600"}}]}]}).json()
        assert chat["lmstream"]["gaps"] and chat["lmstream"]["gaps"][0] == g          # the same outage
        for sid in ids:
            r = c.delete(f"/v1/streams/{sid}")
            assert r.json()["status"] == "stopped"
            frames = status(c, sid)["frames"]
            time.sleep(2)
            assert status(c, sid)["frames"] == frames                    # stopped: no more frames
            assert c.post(f"/v1/streams/{sid}/questions", json={"question": "q", "max_tokens": 2}).status_code == 200


def _descendants(pid: int) -> set[int]:
    """`pid` and every process below it, from /proc."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass                                   # ended while we looked
    out, todo = {pid}, [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in out]
        out.update(kids)
        todo.extend(kids)
    return out


def _listening(pids: set[int]) -> list[tuple[int, "ipaddress.IPv4Address | ipaddress.IPv6Address", int]]:
    """(pid, local address, port) of every listening TCP socket those processes hold (/proc/net/tcp{,6})."""
    import ipaddress
    addr_of: dict[str, tuple] = {}
    for name, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":                           # LISTEN
                continue
            hexip, port = f[1].split(":")
            raw = bytes.fromhex(hexip)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))   # host-order words
            addr_of[f[9]] = (ipaddress.ip_address(raw), int(port, 16))
    out = []
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            m = re.fullmatch(r"socket:\[(\d+)\]", link)
            if m and m.group(1) in addr_of:
                out.append((pid, *addr_of[m.group(1)]))
    return out


def _idle_jobs(c: httpx.Client, timeout: float = 180) -> None:
    """Waits until no video job is queued or ingesting (earlier tests' jobs hold slots of the limit)."""
    deadline = time.monotonic() + timeout
    while any(v["status"] in ("queued", "ingesting") for v in c.get("/v1/videos").json()["data"]):
        assert time.monotonic() < deadline, "video jobs still running"
        time.sleep(0.5)


def test_jobs_arriving_together_are_bounded_by_the_job_limit(service, media):
    """max_concurrent_jobs (2 here) holds for requests that arrive together: 12 simultaneous jobs by
    path all got 202 (each counted the running jobs before any had created its record), 6 uploads too.
    Now at most 2 are accepted, the rest 429 E_BUSY with Retry-After, an upload before its bytes are read."""
    import asyncio
    data = (media / "scene.mp4").read_bytes()

    async def burst(n: int, upload: bool) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=service.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=120) as ac:
            if upload:
                reqs = [ac.post("/v1/videos", files={"file": ("scene.mp4", data, "video/mp4")}) for _ in range(n)]
            else:
                reqs = [ac.post("/v1/videos", json={"path": str(media / "long.mp4")}) for _ in range(n)]
            return await asyncio.gather(*reqs)

    before = _uploads(service)
    with service.client() as c:
        for n, upload in ((8, False), (5, True)):
            _idle_jobs(c)
            rs = asyncio.run(burst(n, upload))
            ok = [r.json()["id"] for r in rs if r.status_code == 202]
            busy = [r for r in rs if r.status_code != 202]
            assert 1 <= len(ok) <= 2, ([r.status_code for r in rs], upload)
            for r in busy:
                e = r.json()["error"]
                assert r.status_code == 429 and e["code"] == "E_BUSY" and int(r.headers["Retry-After"]) >= 1, r.text
                assert e["message"].startswith("expected at most 2 video jobs at once, got 2 running") or (
                    upload and e["message"].startswith("expected at most 1 uploads being received at once")), e
            for vid in ok:
                assert wait_ready(c, vid)["status"] == "ready"
        r = c.post("/v1/videos", json={"path": str(media / "scene.mp4")})      # the slots are free again
        assert r.status_code == 202 and wait_ready(c, r.json()["id"])["status"] == "ready"
    assert _uploads(service) == before                            # refused uploads left nothing


def test_uploads_still_arriving_hold_at_most_max_uploads_receiving_job_slots(service, media):
    """Four uploads trickling just above `upload_min_bytes_per_s` held every job slot (`max_concurrent_jobs`)
    for as long as they liked: another client's job by path was 429 for the whole time. Uploads whose bytes
    are still arriving now hold at most `limits.max_uploads_receiving` (1 here) of them: a second upload is
    429 saying so before a byte of it is read, a job by path still starts, and the slot is free again once
    the slow upload is done with."""
    import socket
    host, port = service.url.split("//")[1].split(":")
    head = (b"--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"v.mp4\"\r\n"
            b"Content-Type: video/mp4\r\n\r\n")
    before = _uploads(service)
    slow = socket.create_connection((host, int(port)), timeout=30)
    try:
        slow.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                     b"\r\nContent-Type: multipart/form-data; boundary=XX\r\nContent-Length: 1000000\r\n\r\n" + head)
        with service.client() as c:
            _idle_jobs(c)
            deadline = time.monotonic() + 20
            while True:                                  # the slow upload has its slot once this one is refused
                r = c.post("/v1/videos", files={"file": ("scene.mp4", (media / "scene.mp4").read_bytes(), "video/mp4")})
                if r.status_code == 429 or time.monotonic() > deadline:
                    break
                assert r.status_code == 202, r.text
                wait_ready(c, r.json()["id"])
                time.sleep(0.2)
            e = r.json()["error"]
            assert r.status_code == 429 and e["code"] == "E_BUSY" and r.headers.get("retry-after"), r.text
            assert e["message"] == ("expected at most 1 uploads being received at once, got 1 "
                                    "(limits.max_uploads_receiving): try again later, or send a path"), e
            r = c.post("/v1/videos", json={"path": str(media / "scene.mp4")})
            assert r.status_code == 202 and wait_ready(c, r.json()["id"])["status"] == "ready", r.text
    finally:
        slow.close()                                     # gone mid-upload: its slot is freed
    with service.client() as c:
        deadline = time.monotonic() + 30
        while (r := c.post("/v1/videos", files={"file": ("scene.mp4", (media / "scene.mp4").read_bytes(),
                                                         "video/mp4")})).status_code == 429:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.5)
        assert r.status_code == 202 and wait_ready(c, r.json()["id"])["status"] == "ready", r.text
    assert _uploads(service) == before                            # the cut-off upload left nothing


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_socket_and_chat_questions_are_measured_like_http_ones(service, media):
    """Every question from the web page comes over /v1/live: they were missing from /metrics (no
    lms_questions_total, time to first token and tokens unchanged). Now the socket's, the chat route's
    and the HTTP routes' questions take one path that measures them."""
    import asyncio
    import websockets
    from stream.decode import VideoSource
    frames = [(f.pts, f.rgb) for f in VideoSource(media / "scene.mp4", fps=1.0, resize_to=64)][:4]
    with service.client() as c:
        before = c.get("/metrics").text

    async def run():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 1, "format": "png"}))
            sid = json.loads(await ws.recv())["stream_id"]
            await _push_frames(ws, frames)
            answers = []
            for i in range(2):
                await ws.send(json.dumps({"type": "ask", "id": f"q{i}", "question": QUESTIONS[i], "max_tokens": 4}))
                while (m := json.loads(await ws.recv()))["type"] != "answer":
                    assert m["type"] in ("token", "event", "dropped"), m
                answers.append(m)
            await ws.send(json.dumps({"type": "stop"}))
            while json.loads(await ws.recv())["type"] != "stopped":
                pass
            return sid, answers

    sid, answers = asyncio.run(run())
    with service.client() as c:
        content = [{"type": "text", "text": QUESTIONS[0]},
                   {"type": "video_url", "video_url": {"url": f"lms://streams/{sid}"}}]
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                    "max_tokens": 4}).json()
        after = c.get("/metrics").text
    toks = [len(a["token_ids"]) for a in answers] + [chat["usage"]["completion_tokens"]]

    def delta(name):
        return _metric(after, name) - _metric(before, name)
    assert delta('lms_questions_total{kind="socket"}') == 2, after
    assert delta('lms_questions_total{kind="chat"}') == 1, after
    assert delta("lms_answer_tokens_total") == sum(toks) > 0
    assert delta("lms_time_to_first_token_seconds_count") == len(toks)    # every answer, one with no token too


def test_watch_events_sse_resumes_from_last_event_id_and_ends_when_its_stream_is_purged(service, media):
    """A reconnecting EventSource sends Last-Event-ID: it was ignored (only ?after= counted), so every event
    came again; the larger of the two counts now. An SSE connection to a stream purged meanwhile stayed open
    with keep-alives for good while a new GET was 404: one `event: error` ends it now. The socket feeding
    the stream was told "another writer took the stream over" (E_STALE_WRITER) at its next frame; now it
    is told the stream was deleted, and closed."""
    import asyncio
    import websockets
    from deploy.serving import WatchStore
    from stream.decode import VideoSource
    rgb = next(iter(VideoSource(media / "scene.mp4", fps=1.0, resize_to=64))).rgb

    def seqs(lines):
        return [json.loads(ln[6:])["seq"] for ln in lines if ln.startswith("data: ")]

    async def run():
        async with websockets.connect(_ws_url(service), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "fps": 1, "format": "png"}))
            sid = json.loads(await ws.recv())["stream_id"]
            await ws.send(json.dumps({"type": "frame", "pts": 0.0}))
            await ws.send(_png(rgb))
            while json.loads(await ws.recv())["type"] != "ingested":
                pass
            store = WatchStore(service.redis_url)
            for i in range(3):
                store.push_event(sid, {"type": "event", "watch": "w-test", "text": f"answer {i}"})
            async with httpx.AsyncClient(base_url=service.url, headers={"Authorization": f"Bearer {KEY}"},
                                         timeout=30) as ac:
                for params, last, want in (({}, "1", [2, 3]), ({"after": 2}, "1", [3]), ({"after": 1}, "2", [3]),
                                           ({}, None, [1, 2, 3])):
                    headers = {"Last-Event-ID": last} if last else {}
                    got: list[str] = []
                    async with ac.stream("GET", f"/v1/streams/{sid}/events", params=params, headers=headers) as r:
                        assert r.status_code == 200
                        async for ln in r.aiter_lines():
                            got.append(ln)
                            if seqs(got) and seqs(got)[-1] == 3:
                                break
                    assert seqs(got) == want, (params, last, got)
                for bad in ("x", b"\xb2"):                # '\xb2' is '²': isdigit() yet no int (it was a 500)
                    r = await ac.get(f"/v1/streams/{sid}/events", headers={"Last-Event-ID": bad})
                    assert r.status_code == 422 and "Last-Event-ID" in r.json()["error"]["message"], r.text
                async with ac.stream("GET", f"/v1/streams/{sid}/events", headers={"Last-Event-ID": "3"}) as r:
                    lines = r.aiter_lines()
                    assert (await ac.delete(f"/v1/streams/{sid}", params={"purge": "true"})).status_code == 200
                    t0 = time.monotonic()
                    rest = await asyncio.wait_for(_all(lines), 15)
                    took = time.monotonic() - t0
            told = {"type": "event"}
            while told["type"] == "event":               # the three events pushed above come to the socket too
                told = json.loads(await asyncio.wait_for(ws.recv(), 10))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            return sid, rest, took, told, closed.value

    sid, rest, took, told, closed = asyncio.run(run())
    assert "event: error" in rest and took < 10, (rest, took)
    err = json.loads(next(ln for ln in rest if ln.startswith("data: "))[6:])
    assert err["code"] == "E_NOT_FOUND" and "deleted" in err["message"], err
    assert told["type"] == "error" and told["code"] == "E_STREAM_STOPPED", told
    assert told["message"].startswith(f"expected to keep streaming to {sid!r}, got the stream deleted"), told
    assert "purged" in told["message"] and closed.rcvd.code == 1000, (told, closed)
    with service.client() as c:                 # no record left behind by the socket's end
        assert c.get(f"/v1/streams/{sid}").status_code == 404


def test_a_socket_taken_over_stops_nothing_of_its_successor_and_stop_after_a_delete_is_quiet(service, media):
    """A socket whose stream a second socket took over was told E_STALE_WRITER but stayed the writer: its
    stop wrote status "stopped" over the new writer's record (freeing its slot), so a DELETE then neither
    fenced nor told the real writer. A `stop` racing a DELETE's close closed the socket twice (an ASGI
    exception); it ends quietly now (a race this test gives a chance, not a certainty)."""
    import asyncio
    import websockets
    from stream.decode import VideoSource
    rgb = next(iter(VideoSource(media / "scene.mp4", fps=1.0, resize_to=64))).rgb
    sid = "take-over-" + os.urandom(3).hex()

    async def frame(ws, pts):
        await ws.send(json.dumps({"type": "frame", "pts": pts}))
        await ws.send(_png(rgb))
        while True:
            m = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if m["type"] in ("ingested", "error"):
                return m

    async def run():
        hdr = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=service.url, headers=hdr, timeout=30) as ac, \
                websockets.connect(_ws_url(service), max_size=None) as old, \
                websockets.connect(_ws_url(service), max_size=None) as new:
            await old.send(json.dumps({"type": "start", "fps": 1, "format": "png", "stream_id": sid}))
            assert json.loads(await old.recv())["type"] == "started"
            assert (await frame(old, 0.0))["type"] == "ingested"
            await new.send(json.dumps({"type": "start", "fps": 1, "format": "png", "stream_id": sid}))
            assert json.loads(await new.recv())["type"] == "started"
            assert (await frame(new, 0.0))["type"] == "ingested"
            stale = await frame(old, 1.0)
            assert stale["type"] == "error" and stale["code"] == "E_STALE_WRITER", stale
            await old.send(json.dumps({"type": "stop"}))
            while json.loads(await asyncio.wait_for(old.recv(), 30))["type"] != "stopped":
                pass
            d = (await ac.get(f"/v1/streams/{sid}")).json()
            assert d["status"] in ("connecting", "live") and d["kind"] == "push", d
            assert (await ac.delete(f"/v1/streams/{sid}", params={"purge": "true"})).status_code == 200
            try:                                     # a stop racing the delete's close: no second close
                await new.send(json.dumps({"type": "stop"}))
            except websockets.ConnectionClosed:
                pass
            told = json.loads(await asyncio.wait_for(new.recv(), 10))
            assert told["type"] == "error" and told["code"] == "E_STREAM_STOPPED", told
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(new.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000, closed.value
            assert (await ac.get(f"/v1/streams/{sid}")).status_code == 404

    asyncio.run(run())


def test_a_job_record_left_without_a_decoder_is_deleted(service):
    """A request that ended between creating its job's record and starting its decoder left the record
    "queued" for good, holding a slot of max_concurrent_jobs: DELETE said 409 E_JOB_RUNNING forever. A
    record with no decoder anywhere, over ORPHAN_AFTER_S old, is fenced and deleted; a fresh one is not."""
    from deploy.routes import ORPHAN_AFTER_S
    from deploy.serving import JobStore
    store = JobStore(service.redis_url)
    old, young = "vid-orphan" + os.urandom(3).hex(), "vid-young" + os.urandom(3).hex()
    store.create(old, {"source": "x.mp4", "fps": 1.0, "created": time.time() - ORPHAN_AFTER_S - 5})
    store.create(young, {"source": "x.mp4", "fps": 1.0})
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        r = c.delete(f"/v1/videos/{old}")
        assert r.status_code == 200 and r.json()["deleted"] is True, r.text
        assert c.get(f"/v1/videos/{old}").status_code == 404
        r = c.delete(f"/v1/videos/{young}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "E_JOB_RUNNING", r.text
    store.delete(young)


async def _all(lines) -> list[str]:
    return [ln async for ln in lines]


def test_a_ring_overwrite_gap_has_a_finite_start(service, demo_model, media):
    """A window whose oldest frames the ring overwrote reported the gap as [null, first stored pts]; it
    starts where the asked window starts now (the window's start, newest - last_s, or 0 for the whole
    stream)."""
    from deploy.serving import JobStore
    from frame_cache import open_cache
    from stream.ingest import ingest_video
    sid = "vid-ring" + os.urandom(4).hex()
    cache = open_cache(service.redis_url)
    try:
        with pytest.warns(Warning, match="30 of the 40 frames sampled were overwritten"):
            ingest_video(demo_model, media / "scene.mp4", cache, sid, capacity=10)   # the last 10 of 40 kept
    finally:
        cache.close()
    JobStore(service.redis_url).create(sid, {"status": "ready", "frames": 10, "progress": 1.0, "duration_s": 40.0})
    with service.client() as c:
        for body, gap in (({}, [0.0, 30.0]), ({"window": [20, 40]}, [20.0, 30.0]), ({"last_s": 15}, [24.0, 30.0])):
            a = c.post(f"/v1/videos/{sid}/questions", json={"question": QUESTIONS[0], "max_tokens": 2, **body}).json()
            assert a["time_span"][0] == 30.0 and a["gaps"][0] == gap, (body, a)
        assert c.delete(f"/v1/videos/{sid}").status_code == 200


def test_one_service_per_data_dir_and_ray_listens_on_loopback_only(service):
    import sys
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "lmstream.cli", "serve", "--port", str(free_port()), "--model", DEMO,
                        "--redis", service.redis_url, "--data-dir", service.data_dir, "--api-key", KEY],
                       capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert r.returncode == 2, r.stderr
    assert f"error[E_BAD_ARGUMENT]: expected --data-dir {service.data_dir} to be used by no other service, got it " \
           f"locked by `lmstream serve` pid {service.proc.pid}" in r.stderr, r.stderr
    assert "redis: started" not in r.stderr and "ray:" not in r.stderr    # refused before starting anything
    socks = _listening(_descendants(service.proc.pid))
    assert service.port in {port for *_, port in socks} and len(socks) >= 5, socks   # proxy, GCS, raylet, ...
    exposed = [(pid, f"{ip}:{port}") for pid, ip, port in socks
               if not (ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped and ip.ipv4_mapped.is_loopback))]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_restart_keeps_the_frames_and_a_redis_outage_is_503_then_200(service, uploaded, redis_srv, tmp_path):
    """A service stopped and started again on the same data folder and Redis: a camera reconnects, a socket's
    stream is stopped, a video ingesting at the stop is `failed` E_INTERRUPTED (never E_INTERNAL) with its
    frames kept, counted as its ring holds them, and its upload removed; then Redis killed under it is 503
    and back to 200, and a job ingesting as it died is marked failed (E_CACHE_UNAVAILABLE) once it is back."""
    from rtsp_server import RtspServer
    from stream.synthetic import make_scene, write_video
    long_video = tmp_path / "half-hour.mp4"
    write_video(make_scene(13, 1800, size=(64, 64)), long_video)     # 1,800 frames: still ingesting at the stop
    uploads = service.data_dir / "uploads"
    cam = RtspServer(tmp_path / "rtsp", mounts=("door",)).start()
    try:
        with service.client() as c:
            before = c.post(f"/v1/videos/{uploaded['id']}/questions", json={"question": QUESTIONS[2]}).json()
            assert c.post("/v1/streams", json={"source": cam.url("door"), "id": "door"}).status_code == 201
            deadline = time.monotonic() + 90
            while c.get("/v1/streams/door").json()["frames"] < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            n = c.get("/v1/streams/door").json()["frames"]
            assert n >= 2
            job = upload_until_frames(c, long_video)
            assert f"{job}.mp4" in [p.name for p in uploads.iterdir()]
        from websockets.sync.client import connect           # a socket still streaming when the service stops
        with connect(_ws_url(service), max_size=None) as ws:
            ws.send(json.dumps({"type": "start", "stream_id": "sock", "fps": 1, "format": "png"}))
            assert json.loads(ws.recv())["type"] == "started"
            ws.send(json.dumps({"type": "frame", "pts": 0.0}))
            ws.send(_png(np.full((64, 64, 3), 90, np.uint8)))
            assert json.loads(ws.recv())["type"] == "ingested"
            service.stop()                                    # stopped in order: the socket's stream says so
            # and the socket is told, then closed 1001 (it was cut with no close frame: 1006, a network fault)
            m = json.loads(ws.recv(timeout=10))
            assert m["type"] == "error" and m["code"] == "E_UNAVAILABLE" and m["message"].startswith(
                "expected the service to keep running, got it stopping: the 1 frames it acknowledged are stored; "
                "once it is back, start with stream_id 'sock' to go on"), m
            from websockets.exceptions import ConnectionClosed
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
            assert ws.close_code == 1001 and ws.close_reason == "the service is stopping", (ws.close_code,
                                                                                            ws.close_reason)
        from deploy.serving import JobStore, LiveStore
        live = LiveStore(service.redis_url)
        assert live.get("sock")["status"] == "stopped"
        # the job it was ingesting is marked as the service stops, not at its next start (it said `ingesting`
        # meanwhile, with nothing running it)
        d = JobStore(service.redis_url).get(job)
        assert d["status"] == "failed" and d["error"]["code"] == "E_INTERRUPTED", d
        live.update("sock", status="live")                    # what a crash (kill -9) leaves behind
        service.start()
        with service.client() as c:                           # its socket died with the old service: stopped,
            deadline = time.monotonic() + 30                  # its frame kept, and it can be removed
            while (d := c.get("/v1/streams/sock").json())["status"] != "stopped" and time.monotonic() < deadline:
                time.sleep(0.5)                               # (the Ingress checks as it starts, beside /ready)
            assert d["status"] == "stopped" and d["frames"] == 1, d
            assert d["last_error"] == {"code": "E_SOURCE_LOST", "message":   # the same {code, message} shape
                                       "expected the socket feeding this stream to stay open, got it closed "
                                       "by a service restart"}, d                                   # as others
            assert c.delete("/v1/streams/sock?purge=true").status_code in (200, 204)
            d = c.get(f"/v1/videos/{job}").json()
            # was E_INTERNAL "SystemExit: 1" when the decoder saw the stop first, and the upload stayed for good
            assert d["status"] == "failed" and d["error"]["code"] == "E_INTERRUPTED", d
            assert 0 < d["frames"] < 1800 and f"the {d['frames']} frames stored stay" in d["error"]["message"], d
            assert not [p for p in uploads.iterdir() if p.name.startswith(job)]
            a = c.post(f"/v1/videos/{job}/questions", json={"question": QUESTIONS[0], "max_tokens": 2})
            # its frames answer, and the record counts what the ring holds (it lagged a progress update: 32 said,
            # 64 stored)
            assert a.status_code == 200 and a.json()["job"]["status"] == "failed", a.text
            assert a.json()["frames"] == d["frames"], (a.json()["frames"], d)
            assert c.delete(f"/v1/videos/{job}").status_code == 200
            r = c.post("/v1/videos", json={"path": str(service.allowed / "scene.mp4")})    # new jobs run again
            assert r.status_code == 202 and wait_ready(c, r.json()["id"])["status"] == "ready", r.text
            assert c.delete(f"/v1/videos/{r.json()['id']}").status_code == 200
        with service.client() as c:                           # the camera reconnects by itself after a restart
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                d = c.get("/v1/streams/door").json()
                if d["status"] == "live" and d["frames"] >= n + 2:
                    break
                time.sleep(0.5)
            assert d["status"] == "live" and d["frames"] >= n + 2, d
            c.delete("/v1/streams/door?purge=true")
    finally:
        cam.stop()
    with service.client() as c:
        assert c.get(f"/v1/videos/{uploaded['id']}").json()["status"] == "ready"
        after = c.post(f"/v1/videos/{uploaded['id']}/questions", json={"question": QUESTIONS[2]}).json()
        assert after["token_ids"] == before["token_ids"] and after["frames"] == 40
        job = upload_until_frames(c, long_video)                  # ingesting as Redis dies
        redis_srv.proc.kill()                                     # kill -9 under a running service
        redis_srv.proc.wait()
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["redis"] is False and r.headers.get("retry-after") == "5"
        r = c.post(f"/v1/videos/{uploaded['id']}/questions", json={"question": QUESTIONS[2]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "E_CACHE_UNAVAILABLE"
        assert r.headers.get("retry-after") == "5", r.headers          # it had none: when to try again
        # Redis stays down until the job's decoder has met the outage and ended (a fixed 3 s was not always
        # enough: a decoder waiting on a busy Encoder made no Redis call in it, and simply went on)
        deadline = time.monotonic() + 90
        while _descendants_titled(service.proc.pid, "ray::FileSource.run") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _descendants_titled(service.proc.pid, "ray::FileSource.run"), "the decoder went on without Redis"
        redis_srv.proc = None
        redis_srv.start()                                         # same folder: the AOF brings the frames back
        deadline = time.monotonic() + 30
        while c.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert c.get("/ready").status_code == 200
        again = c.post(f"/v1/videos/{uploaded['id']}/questions", json={"question": QUESTIONS[2]}).json()
        assert again["token_ids"] == before["token_ids"]
        # the job's end, which Redis could not take as it happened, is written once Redis is back: it stayed
        # "ingesting" for good, holding a slot of the job limit, until the service restarted
        deadline = time.monotonic() + 30
        while (d := c.get(f"/v1/videos/{job}").json())["status"] == "ingesting" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert d["status"] == "failed" and d["error"]["code"] == "E_CACHE_UNAVAILABLE", d
        assert d["error"]["message"].startswith("expected Redis to stay reachable while the job ran, got it lost"), d
        a = c.post(f"/v1/videos/{job}/questions", json={"question": QUESTIONS[0], "max_tokens": 2})
        assert a.status_code == 200 and a.json()["frames"] == d["frames"] > 0, (a.text, d)
        assert not [p for p in uploads.iterdir() if p.name.startswith(job)]
        assert c.delete(f"/v1/videos/{job}").status_code == 200


def test_a_stalled_upload_is_refused_after_upload_idle_timeout_s(tmp_path):
    """The job slot is reserved before an upload's body is read, and the body had no idle limit: a client
    that sent part of a file and then nothing held a slot of max_concurrent_jobs for good. After
    `limits.upload_idle_timeout_s` without bytes the upload is refused (422, naming the setting)."""
    import asyncio
    import types
    from starlette.requests import Request
    from deploy.routes import _save_upload
    from deploy.settings import Limits
    from lmcore.errors import InvalidRequest

    head = (b"--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"v.mp4\"\r\n"
            b"Content-Type: video/mp4\r\n\r\n" + b"\0" * 1000)
    sent = []

    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": head, "more_body": True}
        await asyncio.sleep(3600)                # the client sends nothing more

    scope = {"type": "http", "method": "POST", "path": "/v1/videos", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=XX")]}
    b = types.SimpleNamespace(settings=types.SimpleNamespace(limits=Limits(upload_idle_timeout_s=0.5),
                                                             upload_dir=tmp_path / "up"))

    async def run():
        t0 = time.monotonic()
        with pytest.raises(InvalidRequest) as e:
            await asyncio.wait_for(_save_upload(Request(scope, receive), b, "vid-stall"), 10)
        return e.value, time.monotonic() - t0

    err, took = asyncio.run(run())
    assert "upload_idle_timeout_s=0.5" in str(err) and "after 1000 bytes" in str(err) and took < 5, (err, took)
    assert list((tmp_path / "up").iterdir()) == []          # its partial file is gone


def test_a_dripping_upload_is_refused_under_upload_min_bytes_per_s(tmp_path):
    """A byte sent just inside each idle timeout held a job slot for good (two such uploads kept every other
    POST /v1/videos at 429). Past `upload_idle_timeout_s`, an upload that averages under
    `limits.upload_min_bytes_per_s` is refused (422, naming the setting)."""
    import asyncio
    import types
    from starlette.requests import Request
    from deploy.routes import _save_upload
    from deploy.settings import Limits
    from lmcore.errors import InvalidRequest

    head = (b"--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"v.mp4\"\r\n"
            b"Content-Type: video/mp4\r\n\r\n")

    async def receive():                         # the headers, then one byte every 0.1 s: never idle for 0.5 s
        if not receive.sent:
            receive.sent = 1
            return {"type": "http.request", "body": head, "more_body": True}
        await asyncio.sleep(0.1)
        return {"type": "http.request", "body": b"\0", "more_body": True}
    receive.sent = 0

    scope = {"type": "http", "method": "POST", "path": "/v1/videos", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=XX")]}
    b = types.SimpleNamespace(settings=types.SimpleNamespace(
        limits=Limits(upload_idle_timeout_s=0.5, upload_min_bytes_per_s=1000), upload_dir=tmp_path / "up"))

    async def run():
        with pytest.raises(InvalidRequest) as e:
            await asyncio.wait_for(_save_upload(Request(scope, receive), b, "vid-drip"), 10)
        return e.value

    err = asyncio.run(run())
    assert "at least 1000 bytes/s" in str(err) and "upload_min_bytes_per_s" in str(err), err
    assert list((tmp_path / "up").iterdir()) == []


def test_a_body_is_not_read_without_a_key_nor_waited_for_past_body_timeout_s():
    """The body reader ran before the routes' key check, with no deadline: 300 connections without a key,
    each sending one byte of a 100 kB body, held every request slot and stalled /health. A request without a
    valid key is now refused before its body is read, and a body not whole within `limits.body_timeout_s`
    is refused too."""
    import asyncio
    import types
    from deploy import routes
    from deploy.settings import Limits, Settings

    reads = []

    async def receive():                         # one byte, then nothing: a slow client
        reads.append(1)
        if len(reads) == 1:
            return {"type": "http.request", "body": b"{", "more_body": True}
        await asyncio.sleep(3600)

    async def call(headers, path="/v1/chat/completions"):
        sent = []

        async def send(m):
            sent.append(m)

        async def app(scope, receive, send):     # the routes: never reached without a whole body
            raise AssertionError("the route ran")
        scope = {"type": "http", "method": "POST", "path": path, "query_string": b"", "headers": headers}
        await asyncio.wait_for(routes.BoundedBody(app)(scope, receive, send), 10)
        return sent[0]["status"], json.loads(sent[1]["body"])

    b = types.SimpleNamespace(settings=Settings(api_keys=["k"], limits=Limits(body_timeout_s=0.5)))
    prev = routes.current_backend()
    routes.set_backend(b)
    try:
        ctype = (b"content-type", b"application/json")
        status, body = asyncio.run(call([ctype, (b"content-length", b"100000")]))
        assert status == 401 and reads == [], (status, body, reads)          # refused before a byte is read
        status, body = asyncio.run(call([ctype, (b"authorization", b"Bearer nope")]))
        assert status == 401 and reads == []
        t0 = time.monotonic()
        status, body = asyncio.run(call([ctype, (b"authorization", b"Bearer k")], "/v1/videos/v-1/questions"))
        assert status == 422 and "limits.body_timeout_s=0.5 s, got 1 bytes" in body["error"]["message"], body
        assert time.monotonic() - t0 < 5
    finally:
        routes.set_backend(prev)


def test_slow_bodies_are_bounded_and_bodyless_methods_read_none():
    """300 slow bodies with a key, each inside `body_timeout_s`, held every request the Ingress takes at once:
    `/health` answered after 28 s, and a GET with `Content-Length: 10` and no bytes held a slot for 30 s.
    Bodies being received at once are now bounded by `limits.max_body_reads` (2 here: the third is 429
    `E_BUSY` with Retry-After, before a byte of it is read), a finished or failed read frees its place, and
    GET / DELETE go to their route without a body read or waited for."""
    import asyncio
    import types
    from deploy import routes
    from deploy.settings import Limits, Settings

    async def slow():                            # one byte, then nothing
        if not slow.sent:
            slow.sent = True
            return {"type": "http.request", "body": b"{", "more_body": True}
        await asyncio.sleep(3600)

    async def whole():
        return {"type": "http.request", "body": b'{"question": "q"}', "more_body": False}

    async def never():
        raise AssertionError("a body was read")

    ran = []

    async def app(scope, receive, send):         # the routes: answer 200 with the body they were given
        body = b"" if scope["method"] in ("GET", "DELETE") else (await receive())["body"]
        ran.append((scope["method"], body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def call(receive, method="POST", path="/v1/videos/v-1/questions", extra=()):
        sent = []

        async def send(m):
            sent.append(m)
        scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": [
            (b"content-type", b"application/json"), (b"authorization", b"Bearer k"), *extra]}
        await routes.BoundedBody(app)(scope, receive, send)
        head = dict(sent[0].get("headers") or [])
        return sent[0]["status"], json.loads(sent[1]["body"]), head

    async def run():
        slow.sent = False
        holders = [asyncio.ensure_future(call(slow)) for _ in range(2)]
        await asyncio.sleep(0.2)
        assert routes._BODY_READS["n"] == 2
        status, body, head = await asyncio.wait_for(call(never), 5)
        assert status == 429 and body["error"]["code"] == "E_BUSY" and head.get(b"retry-after"), (status, body)
        assert body["error"]["message"] == ("expected at most 2 request bodies being received at once, got 2 "
                                            "(limits.max_body_reads): send it again in a moment"), body
        for method, path in (("GET", "/v1/streams"), ("DELETE", "/v1/videos/v-1")):
            status, _, _ = await asyncio.wait_for(call(never, method, path, [(b"content-length", b"10")]), 5)
            assert status == 200 and ran[-1] == (method, b"")
        for h in holders:
            h.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        assert routes._BODY_READS["n"] == 0                  # a cancelled read frees its place
        status, _, _ = await asyncio.wait_for(call(whole), 5)
        assert status == 200 and ran[-1] == ("POST", b'{"question": "q"}') and routes._BODY_READS["n"] == 0

    b = types.SimpleNamespace(settings=Settings(api_keys=["k"], limits=Limits(max_body_reads=2, body_timeout_s=60)))
    prev = routes.current_backend()
    routes.set_backend(b)
    try:
        asyncio.run(run())
    finally:
        routes.set_backend(prev)


def test_metrics_scrapes_share_a_render_on_a_thread_of_their_own():
    """60 concurrent `GET /metrics` (a Redis call per stream each, 0.4 s with 400 streams) held the thread pool
    every route shares: `/ready` said "expected Redis to answer, got no answer" with Redis healthy, and a
    video's status took 14.6 s. Scrapes that arrive while one renders now get that render, on a thread of
    its own, and `/ready`'s ping runs on threads of its own; a scrape after it renders afresh."""
    import asyncio
    import threading
    import types
    from deploy import routes

    calls = []

    def render(b):
        calls.append(threading.current_thread().name)
        time.sleep(0.3)
        return f"render {len(calls)}".encode()

    async def run():
        m = types.SimpleNamespace(render=render)
        got = await asyncio.gather(*(routes._render_shared(m, None) for _ in range(10)))
        assert got == [b"render 1"] * 10 and len(calls) == 1 and calls[0].startswith("lms-metrics"), (got, calls)
        assert await routes._render_shared(m, None) == b"render 2"
        name = await routes._on_own_threads("ping", lambda: threading.current_thread().name)
        assert name.startswith("lms-ping"), name

    asyncio.run(run())


def test_a_failed_jobs_missing_span_ends_with_the_file_and_its_frames_are_the_rings():
    """A failed job's answers: the span never stored ended at the window's end even past the file's end;
    whether it is answerable went by the record's frames, one progress update behind the ring."""
    from deploy.serving import require_answerable, video_answer_context
    from lmcore.errors import NotReady
    d = {"id": "vid-x", "status": "failed", "window": [0.0, 100.0], "duration_s": 30.0, "frames": 0,
         "error": {"code": "E_DECODE", "message": "bad"}}
    assert video_answer_context(d, 12.0)[0] == [[12.0, 30.0]]
    assert video_answer_context({**d, "window": [0.0, 20.0]}, 12.0)[0] == [[12.0, 20.0]]
    assert video_answer_context({**d, "window": None}, 12.0)[0] == [[12.0, 30.0]]
    require_answerable(d, stored=5)                  # the ring holds frames the record does not count yet
    with pytest.raises(NotReady):
        require_answerable({**d, "frames": 3}, stored=0)
    # a job still ingesting answers over what it has stored (the rest a gap); queued, or nothing stored: 409
    ing = {**d, "status": "ingesting", "error": None}
    require_answerable(ing, stored=5)
    assert video_answer_context(ing, 12.0) == ([[12.0, 30.0]], {"status": "ingesting", "error": None, "frames": 0,
                                                                "progress": 0.0})
    for st, n in (("ingesting", 0), ("queued", 0)):
        with pytest.raises(NotReady, match="with none stored yet"):
            require_answerable({**d, "status": st}, stored=n)
