"""A service stopped while a file job ingests, then started again on the same data folder and Redis: the job
is `failed` with E_INTERRUPTED (never E_INTERNAL), its frames stay and answer, and its upload is removed.

Its own module (its own Redis and service, started twice) so that no other test's service runs beside it."""
from __future__ import annotations

import pytest

from frame_cache.redis_server import RedisServer
from test_service import QUESTIONS, Service, upload_until_frames, wait_ready

pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("ray")]


def test_a_stopped_services_job_fails_interrupted_keeping_its_frames_and_not_its_upload(tmp_path, tmp_path_factory):
    from stream.synthetic import make_scene, write_video
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    write_video(make_scene(13, 1800, size=(64, 64)), allowed / "half-hour.mp4")   # 1,800 frames at 1 fps
    redis = RedisServer(tmp_path / "redis").start()
    svc = Service(tmp_path_factory.mktemp("svc"), redis.url, allowed)   # a short path: Ray's socket names
    try:
        svc.start()
        with svc.client() as c:
            vid = upload_until_frames(c, allowed / "half-hour.mp4")
        uploads = svc.data_dir / "uploads"
        assert [p.name for p in uploads.iterdir()] == [f"{vid}.mp4"]
        svc.stop()                                    # SIGTERM mid-ingest
        svc.start()                                   # the same data folder and Redis
        with svc.client() as c:
            d = c.get(f"/v1/videos/{vid}").json()
            # was E_INTERNAL "SystemExit: 1" when the decoder saw the stop first, and the upload stayed for good
            assert d["status"] == "failed" and d["error"]["code"] == "E_INTERRUPTED", d
            assert 0 < d["frames"] < 1800 and "frames stored stay" in d["error"]["message"], d
            assert list(uploads.iterdir()) == []
            a = c.post(f"/v1/videos/{vid}/questions", json={"question": QUESTIONS[0], "max_tokens": 2})
            assert a.status_code == 200 and a.json()["job"]["status"] == "failed", a.text
            # the record counts what the ring holds (it lagged by a progress update: 96 said, 128 stored)
            assert a.json()["frames"] == d["frames"] and f"the {d['frames']} frames" in d["error"]["message"], \
                (a.json()["frames"], d)
            r = c.post("/v1/videos", json={"path": str(allowed / "half-hour.mp4"), "window": [0, 5]})
            assert r.status_code == 202 and wait_ready(c, r.json()["id"])["status"] == "ready", r.text
    finally:
        svc.stop()
        redis.stop()
