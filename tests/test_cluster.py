"""Scale-out with the real parts: the service on a 2-node Ray cluster and a 3-master Redis Cluster.

One scenario, in order (each step needs the state the previous one left):

1. `ray start --head` (its own temp folder, no dashboard, usage stats off, RAY_AUTH_MODE=disabled,
   the resource ``head_node``) and a worker node (``ray start --address``, the resource
   ``worker_node``), each in its own process group; a 3-master Redis Cluster; Debian's GStreamer
   RTSP server with 4 mounts; `lmstream serve --ray-address ... --redis <cluster url>` with the
   Serve replicas pinned to the head (``--service-resources``).
2. 4 cameras: they spread over both nodes (2 and 2), all live.
3. kill -9 of every process of the worker node (its process group: raylet, agents, workers): its
   cameras are restarted on the head within seconds, take the stream over (writer fencing) and
   append on; every frame stored before the kill is still there, byte for byte; an answer over the
   stream reports the outage in `gaps`; the head's cameras never stopped.
4. kill -9 of one Redis master: questions about the streams on its slots answer 503
   E_CACHE_UNAVAILABLE at once, the other streams keep ingesting and answering; the master restarted
   from its append-only file has every frame acknowledged before the last fsync (everysec), and its
   cameras resume with the outage as a gap.
5. stopping `lmstream serve` leaves the cluster it attached to running.

Figures (detection, restart, gap, frames) are printed (``pytest -s``) and asserted only loosely.
Everything started is stopped by its own PID / process group; files stay under pytest's tmp folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from frame_cache.redis_server import RedisClusterServers, free_port
from lmcore.procs import die_with_parent, stop_child

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "checkpoints" / "demo"
KEY = "cluster-key-1"
RAY = str(Path(sys.executable).parent / "ray")
# one pytest worker runs every file that starts Ray (run-tests.sh: --dist loadgroup), never two Ray at once
pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("ray")]   # 600: room for 2 more node starts


# ------------------------------------------------------------------------------------------ Ray nodes
def _procs() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every live (not zombie) process."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] not in ("Z", "X"):
                out[int(name)] = (int(fields[1]), int(fields[2]))
    return out


def _node_pids(pgid: int) -> set[int]:
    """The processes of group `pgid` and all their descendants (Ray's raylet starts each worker in a
    session of its own, so the workers are found as the raylet's children, not by group)."""
    procs = _procs()
    out = {p for p, (_, g) in procs.items() if g == pgid}
    grew = True
    while grew:
        more = {p for p, (pp, _) in procs.items() if pp in out and p not in out}
        out |= more
        grew = bool(more)
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class RayStartError(RuntimeError):
    """`ray start` did not bring its node up (exited, or no "Ray runtime started" in time)."""


class RayNode:
    """One `ray start --block` node in its own process group (session): every process of the node
    (raylet, agents, workers) is in that group, so the test kills exactly this node and nothing else."""

    def __init__(self, folder: Path, args: list[str], env: dict):
        self.folder, self.args, self.env = folder, args, env
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "RayNode":
        log = open(self.folder / "ray-start.log", "ab")
        self.proc = subprocess.Popen([RAY, "start", "--block", *self.args], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env, cwd=self.folder,
                                     start_new_session=True, preexec_fn=die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout
        while b"Ray runtime started" not in (self.folder / "ray-start.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.folder / "ray-start.log").read_text(errors="replace")[-2000:]
                logs = self.log_tails()                  # before stop(): not our own shutdown's lines
                self.stop()
                raise RayStartError(f"expected `ray start` to start a node in {self.folder}, got:\n{tail}{logs}")
            time.sleep(0.2)
        return self

    def log_tails(self, chars: int = 1500) -> str:
        """The ends of the node's GCS and raylet logs: why a node that never registered did not."""
        out = []
        for f in sorted(self.folder.glob("session_*/logs/*")):
            if f.name.startswith(("gcs_server.", "raylet.")) and f.suffix in (".out", ".err") and f.stat().st_size:
                out.append(f"\n--- {f.relative_to(self.folder)} (last {chars} characters):\n"
                           f"{f.read_text(errors='replace')[-chars:]}")
        return "".join(out)

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def pids(self) -> set[int]:
        return _node_pids(self.pgid) if self.proc is not None else set()

    def node_id(self) -> str:
        for pid in self.pids():
            for a in _cmdline(pid):
                if a.startswith("--node_id=") and "raylet" in _cmdline(pid)[0]:
                    return a.split("=", 1)[1]
        raise AssertionError(f"expected a raylet in process group {self.pgid}, got none")

    def _signal_all(self, sig: int) -> set[int]:
        pids = self.pids()
        for p in pids:
            try:
                os.kill(p, signal.SIGSTOP)        # frozen first: nothing forks or notices while we list
            except ProcessLookupError:
                pass
        pids |= self.pids()
        for p in pids:
            try:
                os.kill(p, sig)
                if sig != signal.SIGKILL:
                    os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
        return pids

    def kill9(self) -> None:
        """SIGKILL to every process of the node at once (raylet, agents, workers: a machine that
        loses power), each by its PID."""
        self._signal_all(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM to every process of the node, then SIGKILL to what is left after 5 s."""
        if self.proc is None:
            return
        pids = self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while set(_procs()) & pids and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in pids | self.pids():
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def _ray_env(repo: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONPATH=str(repo),
               # the GCS declares a node dead after 4 failed health checks 0.5 s apart (default ~15 s)
               RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="1000",
               RAY_health_check_failure_threshold="4",
               RAY_agent_register_timeout_ms="120000")     # a busy 2-core machine starts agents slowly
    return env


def _node_ports() -> list[str]:
    """Every port a node would otherwise take by default (two nodes share this machine)."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def rtsp(tmp_path_factory):
    from rtsp_server import RtspServer
    srv = RtspServer(tmp_path_factory.mktemp("rtsp"), mounts=("c1", "c2", "c3", "c4"), width=160, height=120,
                      fps=2).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    cl = RedisClusterServers(tmp_path_factory.mktemp("rc")).start()
    for node in cl.nodes:      # a dead master stops only its own slots (the default stops the whole cluster)
        c = node.client()
        c.config_set("cluster-require-full-coverage", "no")
        c.close()
    yield cl
    cl.stop()


def _start_ray_cluster(root: Path, env: dict, attempts: int = 3) -> tuple[RayNode, RayNode, int]:
    """A head and a worker node, started in turn. A node that does not come up is stopped and the
    pair is started again, on fresh ports and in fresh folders, at most `attempts` times; each
    failure is printed with its GCS and raylet log ends. (CI once lost the head: the metrics port
    it was given had been taken on the machine's own IP between `free_port` and the bind, the
    reporter agent died, and the raylet never registered within Ray's fixed 30 s. `free_port` now
    draws outside the kernel's ephemeral range and checks every address; this covers what is left.)
    What the test checks (failover) starts only after both nodes are up."""
    for attempt in range(1, attempts + 1):
        port = free_port()
        head = RayNode(root / f"h{attempt}", [
            "--head", f"--port={port}", "--node-ip-address=127.0.0.1", f"--temp-dir={root}/h{attempt}",
            "--include-dashboard=false", "--disable-usage-stats", "--num-cpus=2", '--resources={"head_node": 100}',
            f"--ray-client-server-port={free_port()}", *_node_ports()], env)
        worker = RayNode(root / f"w{attempt}", [
            f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", f"--temp-dir={root}/w{attempt}",
            "--disable-usage-stats", "--num-cpus=1", '--resources={"worker_node": 8}', *_node_ports()], env)
        try:
            head.start(timeout=60)
            worker.start(timeout=60)
            return head, worker, port
        except BaseException as e:               # a timeout or Ctrl-C too: nothing of this pair left running
            worker.stop()
            head.stop()
            if not isinstance(e, RayStartError) or attempt == attempts:
                raise
            print(f"\nray_cluster: attempt {attempt} of {attempts} did not start, starting again: {e}", flush=True)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")         # short: Ray's socket paths must stay under 107 bytes
    head, worker, port = _start_ray_cluster(root, _ray_env(REPO))
    try:
        yield {"address": f"127.0.0.1:{port}", "head": head, "worker": worker, "root": root}
    finally:
        worker.stop()
        head.stop()
        time.sleep(0.5)
        left = head.pids() | worker.pids()
        assert not left, f"processes of the test's Ray cluster still running: {sorted(left)}"


@pytest.fixture(scope="module")
def service(tmp_path_factory, ray_cluster, redis_cluster):
    from deploy.serving import LiveStore
    from lmstream.serve_cmd import start_serve_process
    store = LiveStore(redis_cluster.url)      # fails in a second, instead of a service that never gets ready
    assert store.ping(), f"expected the service's stores (deploy/serving.py) to reach the Redis Cluster {redis_cluster.url}"
    data = tmp_path_factory.mktemp("svc")
    port = free_port()
    env = dict(os.environ, LMSTREAM_ALLOW_PRIVATE_SOURCES="1", LMSTREAM_LIMITS=json.dumps({"max_tokens": 16}))
    env.pop("LMSTREAM_API_KEYS", None)
    proc, ready = start_serve_process(
        ["--port", port, "--model", DEMO, "--redis", redis_cluster.url, "--data-dir", data, "--api-key", KEY,
         "--ray-address", ray_cluster["address"], "--service-resources", '{"head_node": 0.01}'],
        data / "serve.log", env=env, timeout=240)
    svc = {"proc": proc, "url": f"http://127.0.0.1:{port}", "log": data / "serve.log"}
    yield svc
    stop_child(svc["proc"], 60)


# ------------------------------------------------------------------------------------------ helpers
def _client(svc) -> httpx.Client:
    return httpx.Client(base_url=svc["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=180)


def _live_record(rc, sid: str) -> dict:
    """The stream's record as the service keeps it (``lms:{sid}:live``), read from Redis directly."""
    raw = rc.hgetall(f"lms:{{{sid}}}:live")
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def _stored(cache, sid: str) -> dict[int, tuple[float, str]]:
    """seq -> (pts, sha1 of the light record) of every stored frame."""
    w = cache.window(sid)
    seqs = list(w.seqs())
    blobs = cache.read(sid, seqs, light=True)
    return {q: (p, hashlib.sha1(b).hexdigest() if b is not None else None) for q, p, b in zip(seqs, w.pts_list, blobs)}


def _wait(pred, timeout: float, what: str, every: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except (httpx.HTTPError, OSError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"expected {what} within {timeout:g} s, got {last!r}")


def _ids_on_masters(cl: RedisClusterServers, victim_port: int) -> list[str]:
    """Four stream ids: the first on `victim_port`'s slots, the others on the other masters."""
    import redis.cluster
    from redis.crc import key_slot
    rc = redis.cluster.RedisCluster(host="127.0.0.1", port=cl.nodes[0].port)
    try:
        def port_of(sid):
            return rc.nodes_manager.get_node_from_slot(key_slot(sid.encode())).port
        on, off, i = [], [], 0
        while len(on) < 1 or len(off) < 3:
            sid = f"cam{i}"
            (on if port_of(sid) == victim_port else off).append(sid)
            i += 1
        return [on[0], *off[:3]]
    finally:
        rc.close()


# ------------------------------------------------------------------------------------------ the test
def test_worker_node_and_redis_master_die_during_ingest(service, ray_cluster, redis_cluster, rtsp):
    import redis.cluster
    from frame_cache import open_cache
    from redis.crc import key_slot

    head, worker = ray_cluster["head"], ray_cluster["worker"]
    head_id, worker_id = head.node_id(), worker.node_id()
    rc = redis.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port, socket_timeout=3)
    # the victim master: the one holding the job list (the camera list and the cache's stream list live
    # on the other two: which registry a dead master takes with it is reported, not tested here)
    victim = next(n for n in redis_cluster.nodes
                  if rc.nodes_manager.get_node_from_slot(key_slot(b"lms:jobs")).port == n.port)
    ids = _ids_on_masters(redis_cluster, victim.port)
    on_victim = {s for s in ids if rc.nodes_manager.get_node_from_slot(key_slot(s.encode())).port == victim.port}
    cache = open_cache(redis_cluster.url)
    figures: dict = {}
    t_start = time.monotonic()

    def phase(what: str) -> None:
        print(f"\n[{time.monotonic() - t_start:6.1f} s] {what}", flush=True)

    try:
        with _client(service) as c:
            # -- 2. four cameras, spread over both nodes ------------------------------------------------
            for sid, mount in zip(ids, ("c1", "c2", "c3", "c4")):
                r = c.post("/v1/streams", json={"source": rtsp.url(mount), "fps": 1, "id": sid})
                assert r.status_code == 201, r.text
            for sid in ids:
                _wait(lambda: (d := c.get(f"/v1/streams/{sid}").json())["status"] == "live" and d["frames"] >= 3,
                      90, f"{sid} live with 3 frames")
            phase("4 cameras live")
            nodes = {sid: _live_record(rc, sid)["node"] for sid in ids}
            assert sorted(nodes.values()) == sorted([head_id, head_id, worker_id, worker_id]), nodes
            on_worker = [s for s in ids if nodes[s] == worker_id]
            on_head = [s for s in ids if nodes[s] == head_id]

            # -- 3. the worker node dies ---------------------------------------------------------------
            before = {sid: _stored(cache, sid) for sid in on_worker}
            head_frames = {sid: c.get(f"/v1/streams/{sid}").json()["frames"] for sid in on_head}
            t_kill = time.monotonic()
            worker.kill9()
            kill_pts = {sid: _stored(cache, sid) for sid in on_worker}        # what the killed cameras left
            detect, moved, back = {}, {}, {}
            deadline = t_kill + 60
            while len(back) < len(on_worker) and time.monotonic() < deadline:
                now = time.monotonic() - t_kill
                for sid in on_worker:
                    d = _live_record(rc, sid)
                    if sid not in detect and d.get("restarts"):
                        detect[sid] = now
                    if sid not in moved and d.get("node") not in (None, worker_id):
                        moved[sid] = now
                    if sid in moved and sid not in back and d["status"] == "live" and \
                            d["frames"] > max(kill_pts[sid]) + 2:
                        back[sid] = now
                time.sleep(0.1)
            phase("worker cameras back")
            assert set(back) == set(on_worker), (detect, moved, back, {s: _live_record(rc, s) for s in on_worker})
            for sid in on_worker:
                d = _live_record(rc, sid)
                assert d["node"] == head_id and d["restarts"] == 1, d
                after = _stored(cache, sid)
                lost = [q for q in kill_pts[sid] if after.get(q) != kill_pts[sid][q]]
                assert not lost, f"{sid}: frames stored before the kill changed or vanished: {lost}"
                assert set(before[sid]) <= set(after) and len(after) > len(kill_pts[sid])
                ans = c.post(f"/v1/streams/{sid}/questions", json={"question": "what is in the video ?",
                                                                   "max_tokens": 2})
                assert ans.status_code == 200, ans.text
                ans = ans.json()
                last_before = max(p for p, _ in kill_pts[sid].values())
                first_after = min(p for p, _ in after.values() if p > last_before)
                gap = next((g for g in ans["gaps"] if g[0] <= last_before + 1.0 and g[1] >= first_after - 1.0), None)
                assert gap is not None, (sid, last_before, first_after, ans["gaps"])
                assert ans["frames"] >= len(after), ans
                figures[sid] = {"detected_s": round(detect.get(sid, float("nan")), 2), "moved_s": round(moved[sid], 2),
                                "live_again_s": round(back[sid], 2), "frames_at_kill": len(kill_pts[sid]),
                                "frames_now": len(after), "gap": [round(g, 2) for g in gap],
                                "gap_s": round(gap[1] - gap[0], 2), "pts_jump": round(first_after - last_before, 2)}
            for sid in on_head:                                   # never interrupted
                d = _live_record(rc, sid)
                assert d["node"] == head_id and not d.get("restarts"), d
                assert c.get(f"/v1/streams/{sid}").json()["frames"] >= head_frames[sid] + 3
            print("\nworker node killed:", json.dumps(figures, indent=1))

            # -- 4. a Redis master dies --------------------------------------------------------------------
            phase("killing a Redis master")
            others = [s for s in ids if s not in on_victim]
            pre = {sid: _stored(cache, sid) for sid in on_victim}
            victim.kill9()
            t_kill = time.monotonic()
            fail_s = {}
            for sid in on_victim:
                t0 = time.monotonic()
                r = c.post(f"/v1/streams/{sid}/questions", json={"question": "what is in the video ?",
                                                                 "max_tokens": 2})
                fail_s[sid] = round(time.monotonic() - t0, 2)
                assert r.status_code == 503 and r.json()["error"]["code"] == "E_CACHE_UNAVAILABLE", r.text
                assert fail_s[sid] < 10, fail_s
            ready = c.get("/ready")                               # reported: PING reaches one node, not all
            n_others = {sid: c.get(f"/v1/streams/{sid}").json()["frames"] for sid in others}
            alive = next(n for n in redis_cluster.nodes if n is not victim).client()
            _wait(lambda: "fail" in alive.cluster("nodes")[f"127.0.0.1:{victim.port}"]["flags"].split(","), 30,
                  "the cluster to mark the master failed")
            t_failed = time.monotonic() - t_kill
            alive.close()
            per_master = {rc.nodes_manager.get_node_from_slot(key_slot(s.encode())).port: s for s in others}
            for sid in per_master.values():                       # the other masters go on: answers...
                r = c.post(f"/v1/streams/{sid}/questions", json={"question": "what is in the video ?", "max_tokens": 2})
                assert r.status_code == 200, r.text
            for sid in others:                                    # ... and frames, with the master marked failed
                _wait(lambda: c.get(f"/v1/streams/{sid}").json()["frames"] >= n_others[sid] + 3, 30,
                      f"{sid} to go on ingesting")
            down_s = time.monotonic() - t_kill
            victim.start()                                        # same port and folder: its AOF replayed
            t_up = time.monotonic()
            vc = victim.client()
            _wait(lambda: vc.cluster("info").get("cluster_state") == "ok", 60,
                  "the restarted master to rejoin (cluster_state:ok)")
            vc.close()
            t_ok = time.monotonic()
            master = {}
            for sid in on_victim:
                kept = _stored(cache, sid)
                lost = [q for q in pre[sid] if kept.get(q) != pre[sid][q]]
                _wait(lambda: (d := c.get(f"/v1/streams/{sid}").json())["status"] == "live" and
                      d["frames"] >= len(kept) + 2, 60, f"{sid} ingesting again after the master came back")
                now = _stored(cache, sid)
                ans = c.post(f"/v1/streams/{sid}/questions", json={"question": "what is in the video ?",
                                                                   "max_tokens": 2}).json()
                last_kept = max(p for q, (p, _) in pre[sid].items() if q in kept)     # the last frame before the kill
                master[sid] = {"answer_503_after_s": fail_s[sid], "frames_before_kill": len(pre[sid]),
                               "frames_read_after_rejoin": len(kept), "lost": len(lost),
                               "rejoined_after_s": round(t_ok - t_up, 2),
                               "back_after_restart_s": round(time.monotonic() - t_up, 2),
                               "gaps": ans["gaps"], "down_s": round(down_s, 1),
                               "ready_during_outage": [ready.status_code, ready.json()],
                               "marked_fail_after_s": round(t_failed, 2)}
                print("redis master killed:", json.dumps(master, indent=1))
                assert not lost, (sid, lost)          # kill -9 of the process: its AOF writes were in the OS already
                assert any(g[0] <= last_kept + 2.0 and g[1] > last_kept + 0.5 * down_s for g in ans["gaps"]), \
                    (sid, ans["gaps"], last_kept, down_s)
                assert len(now) > len(kept)
            phase("done")
    finally:
        rc.close()
        cache.close()

    # -- 5. the service goes, the cluster it attached to stays ------------------------------------------
    stop_child(service["proc"], 60)
    assert service["proc"].returncode == 0, service["log"].read_text()[-2000:]
    assert head.proc.poll() is None and head.node_id() == head_id
    host, port = ray_cluster["address"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5):
        pass                                                      # the GCS still answers
