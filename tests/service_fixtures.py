"""One `lmstream serve` (Ray Serve), its redis-server and its allowed media folder, per test session:
tests/test_service.py and tests/test_web_page.py drive the same service (the Ray group's worker runs
them one after the other; each service of its own cost a minute to start on 2 cores). The fixtures
are registered by conftest.py, so that both files share one instance of each."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from frame_cache.redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "checkpoints" / "demo"
KEY = "test-key-123"


class Service:
    """`lmstream serve` in a subprocess, stopped by its PID (SIGTERM, then SIGKILL)."""

    def __init__(self, data_dir: Path, redis_url: str, allowed: Path, limits: dict | None = None):
        self.data_dir, self.redis_url, self.allowed, self.limits = data_dir, redis_url, allowed, limits or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240.0) -> "Service":
        from lmstream.serve_cmd import start_serve_process
        env = dict(os.environ, LMSTREAM_LIMITS=json.dumps(self.limits),
                   LMSTREAM_ALLOW_PRIVATE_SOURCES="1")              # the test camera is on loopback
        env.pop("LMSTREAM_API_KEYS", None)
        self.proc, _ = start_serve_process(
            ["--port", self.port, "--model", DEMO, "--redis", self.redis_url, "--data-dir", self.data_dir,
             "--api-key", KEY, "--allowed-dir", self.allowed, "--num-cpus", "2"],
            self.data_dir / f"serve-{self.port}.log", env=env, timeout=timeout)
        return self

    def stop(self) -> None:
        from lmcore.procs import stop_child
        p, self.proc = self.proc, None
        if p is None:                                       # never started, or stopped already
            return
        stop_child(p, 60)
        rest = p.stdout.read().decode(errors="replace")     # stdout after the ready line: only our JSON lines
        p.stdout.close()                                    # (Ray's "(raylet) ..." lines were appended to it)
        assert all(l.startswith("{") and json.loads(l) for l in rest.splitlines()), rest

    def redis_client(self):
        """A plain redis-py client of the service's Redis."""
        import redis
        return redis.Redis.from_url(self.redis_url, socket_timeout=10)

    def client(self, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    from stream.synthetic import make_scene, write_video
    d = tmp_path_factory.mktemp("allowed")
    spec = make_scene(11, 40, size=(64, 64))
    write_video(spec, d / "scene.mp4")
    write_video(make_scene(12, 150, size=(64, 64)), d / "long.mp4")
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(20000))
    return d


@pytest.fixture(scope="session")
def redis_srv(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


_SHARED: list[Service] = []        # the session's service, for `stop_when_done`


@pytest.fixture(scope="session")
def shared_service(tmp_path_factory, redis_srv, media):
    """The one `Service` of the session (started by `service` when a module first needs it), stopped at
    the end of the session unless `stop_when_done` stopped it before."""
    data = tmp_path_factory.mktemp("svc")
    svc = Service(data, redis_srv.url, media, limits={"max_upload_bytes": 3_000_000, "max_concurrent_jobs": 2,
                                                      # under 64, the default of a question that sends none
                                                      "max_tokens": 48, "max_ws_message_bytes": 300_000,
                                                      "max_live_streams": 4, "max_json_bytes": 100_000,
                                                      "max_watches_per_stream": 3, "max_live_connections": 10,
                                                      "max_ws_backlog_bytes": 1_000_000, "max_uploads_receiving": 1})
    _SHARED.append(svc)
    yield svc
    _SHARED.remove(svc)
    svc.stop()


@pytest.fixture(scope="module")
def service(shared_service, redis_srv):
    """The shared service, running: started for the first module that asks, and again for a later one
    when it was stopped in between (`stop_when_done`), or left stopped or without its Redis by a failed
    test of an earlier module (the restart test stops both), so one file's failure is not the next's."""
    if redis_srv.proc is None or redis_srv.proc.poll() is not None:
        redis_srv.start()
    if shared_service.proc is not None and shared_service.proc.poll() is not None:
        shared_service.proc = None                          # it died: start it again
    if shared_service.proc is None:
        shared_service.start()
    return shared_service


def stop_when_done(item, nextitem) -> None:
    """After each test (conftest.py's `pytest_runtest_teardown`): the shared service stops as soon as the
    next test is in another module that does not use it (the end of test_web_page.py in a full run), not
    at the end of the session: idle, its Ray, Serve replicas and decoders would hold memory and CPU that
    the tests after them on this worker need, and another file's Ray could start beside it. A module that
    defines a `service` of its own (test_cluster.py) does not use this one."""
    if nextitem is not None and (nextitem.module is item.module or (
            "service" in nextitem.fixturenames and not hasattr(nextitem.module, "service"))):
        return
    for svc in _SHARED:
        svc.stop()
