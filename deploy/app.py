"""The one Ray Serve application (DESIGN section 8): Ingress -> Encoder / Answerer, Sources.

    serve run deploy/serve.yaml                      # or: lmstream serve (starts Redis and Ray too)
    app = build_app(Settings(...)); serve.run(app)   # from Python

Roles:
* `Ingress`  - FastAPI routes (`deploy/routes.py`), auth and limits; no model.
* `Encoder`  - one model per replica; `encode` is a `@serve.batch` method, so requests from any
               number of file jobs (streams) share one batched pass; writes the Redis ring.
* `Answerer` - one model per replica; `answer` streams a question's events (token by token).
* `FileSource` - a Ray actor per file job: decode, sample, shrink frames, send them to the Encoder.

Concurrency on a model replica: encoding batches and questions run on worker threads and take the
model's lock per forward pass, so a replica runs one forward at a time (questions interleave their
decode steps; a batch of frames runs between them). More throughput = more replicas (one per GPU).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray
from ray import serve

from .routes import build_api, set_backend
from .serving import (
    AnswerCore,
    EncodeItem,
    EncoderCore,
    FileJob,
    JobStore,
    LiveStore,
    WatchStore,
    answer_events_in_thread,
    run_file_job,
    run_rtsp_stream,
)
from .settings import Settings

log = logging.getLogger("lmstream.serve")

api = build_api()


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=30)
class Encoder:
    def __init__(self, settings: dict):
        self.core = EncoderCore(Settings.model_validate(settings))

    def info(self) -> dict:
        return self.core.info()

    def ready(self) -> bool:
        return True

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def encode(self, requests: list[list[EncodeItem]]) -> list[list[dict]]:
        """Each request: one or more streams' frames. All of them go through one batched pass."""
        flat = [it for req in requests for it in req]
        res = await asyncio.to_thread(self.core.encode, flat)
        out, i = [], 0
        for req in requests:
            out.append(res[i:i + len(req)])
            i += len(req)
        return out

    def stats(self) -> dict:
        return {"frames_encoded": self.core.frames_encoded, "batches": self.core.batches}


@serve.deployment(max_ongoing_requests=32, health_check_period_s=10, health_check_timeout_s=30)
class Answerer:
    def __init__(self, settings: dict):
        self.core = AnswerCore(Settings.model_validate(settings))

    def ready(self) -> bool:
        return True

    async def answer(self, req: dict):
        """Streams the question's events; stops between tokens when the caller goes away."""
        req = dict(req)
        sid = req.pop("stream_id")
        question = req.pop("question")
        async for ev in answer_events_in_thread(lambda: self.core.answer(sid, question, **req)):
            yield ev


@ray.remote(num_cpus=0, max_restarts=0)
class FileSource:
    """One file job: decode -> Encoder batches -> ring; status in Redis."""

    def run(self, job: FileJob, encoder, settings: dict) -> dict:
        from frame_cache import open_cache
        s = Settings.model_validate(settings)
        store = JobStore(s.redis_url)
        cache = open_cache(s.redis_url)
        try:
            return run_file_job(job, lambda items: encoder.encode.remote(items).result(), store, cache)
        finally:
            cache.close()


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=4)
class StreamSource:
    """One camera: RTSP -> sampled frames -> Encoder -> ring; reconnects; status in Redis."""

    def __init__(self):
        import threading
        self.stop_flag = threading.Event()

    def run(self, sid: str, url: str, fps: float, size: int, encoder, settings: dict) -> dict:
        from frame_cache import open_cache
        s = Settings.model_validate(settings)
        live, cache = LiveStore(s.redis_url), open_cache(s.redis_url)
        try:
            return run_rtsp_stream(sid, url, fps, size, lambda items: encoder.encode.remote(items).result(),
                                   live, cache, self.stop_flag)
        finally:
            cache.close()

    def stop(self) -> None:
        self.stop_flag.set()


class RayBackend:
    """The routes' `Backend` inside the Ingress replica."""

    def __init__(self, settings: Settings, encoder, answerer):
        from frame_cache import open_cache
        self.settings = settings
        self.store = JobStore(settings.redis_url)
        self.live = LiveStore(settings.redis_url)
        self.watches = WatchStore(settings.redis_url)
        self._last_eval: dict[tuple[str, str], float] = {}
        self.cache = open_cache(settings.redis_url)
        self._streams: dict[str, Any] = {}
        self.encoder, self.answerer = encoder, answerer
        self._info: dict | None = None
        self._sources: dict[str, Any] = {}

    async def encoder_info(self) -> dict:
        if self._info is None:
            self._info = await self.encoder.info.remote()
        return self._info

    async def models_ready(self) -> bool:
        a, b = await asyncio.gather(self.encoder.ready.remote(), self.answerer.ready.remote())
        return bool(a and b)

    async def start_job(self, job: FileJob) -> None:
        self._reap()
        actor = FileSource.options(name=f"lms-src-{job.job_id}").remote()
        ref = actor.run.remote(job, self.encoder, self.settings.model_dump())
        self._sources[job.job_id] = (actor, ref)

    def _reap(self) -> None:
        done = [j for j, (_, ref) in self._sources.items() if ray.wait([ref], timeout=0)[0]]
        for j in done:
            actor, _ = self._sources.pop(j)
            ray.kill(actor)

    async def encode(self, items: list[EncodeItem]) -> list[dict]:
        return await self.encoder.encode.remote(items)

    async def start_stream(self, sid: str, url: str, fps: float) -> None:
        info = await self.encoder_info()
        old = self._streams.pop(sid, None)
        if old is not None:
            ray.kill(old[0])
        actor = StreamSource.options(name=f"lms-cam-{sid}").remote()
        ref = actor.run.remote(sid, url, fps, info["size"], self.encoder, self.settings.model_dump())
        self._streams[sid] = (actor, ref)

    async def stop_stream(self, sid: str) -> None:
        got = self._streams.pop(sid, None)
        if got is None:
            return
        actor, ref = got
        await actor.stop.remote()
        try:
            await asyncio.wait_for(ref, 30)
        except Exception:                      # noqa: BLE001 - stopping regardless
            pass
        ray.kill(actor)

    def model_prompt_check(self, question: str) -> None:
        if not question.strip():
            from lmcore.errors import InvalidRequest
            raise InvalidRequest("expected a non-empty watch question, got only whitespace")

    async def evaluate_watches(self) -> None:
        """Every second: each watch that is due is answered over its last `last_s` (exactly, from its
        rows fused at ingest); a changed answer becomes an event (SSE and attached sockets)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                sids = await asyncio.to_thread(self.live.ids)
            except Exception:                      # noqa: BLE001 - Redis down: try again later
                continue
            for sid in sids:
                try:
                    watches = await asyncio.to_thread(self.watches.all, sid)
                except Exception:                  # noqa: BLE001
                    continue
                for wid, w in watches.items():
                    now = time.monotonic()
                    if now - self._last_eval.get((sid, wid), 0.0) < float(w.get("every_s") or 5):
                        continue
                    self._last_eval[(sid, wid)] = now
                    await self._evaluate(sid, wid, w)

    async def _evaluate(self, sid: str, wid: str, w: dict) -> None:
        req = {"stream_id": sid, "question": w["question"], "last_s": w.get("last_s") or 10, "max_tokens": 16,
               "watch": wid}
        ans = None
        try:
            async for ev in self.answer_events(req):
                if ev["type"] == "answer":
                    ans = ev
        except Exception:                          # noqa: BLE001 - no frames fused yet, Redis down...
            return
        if ans is None or ans["text"] == w.get("last_text"):
            return
        ev = {"type": "event", "watch": wid, "question": w["question"], "text": ans["text"],
              "previous": w.get("last_text"), "time_span": ans["time_span"], "frames": ans["frames"],
              "frames_fused": ans["frames_fused"], "policy": ans["policy"], "at": time.time()}
        await asyncio.to_thread(self.watches.push_event, sid, ev)
        await asyncio.to_thread(self.watches.update, sid, wid, last_text=ans["text"])

    def answer_events(self, req: dict):
        gen = self.answerer.options(stream=True).answer.remote(req)

        async def events():
            try:
                async for ev in gen:
                    yield ev
            finally:
                gen.cancel()                  # the client went away: the replica stops generating
        return events()


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    async def __init__(self, encoder, answerer, settings: dict):
        s = Settings.model_validate(settings)
        self.backend = RayBackend(s, encoder, answerer)
        failed = self.backend.store.fail_interrupted() if self.backend.store.ping() else []
        if failed:
            log.warning("marked %d interrupted video jobs failed (their frames stay): %s", len(failed), failed)
        set_backend(self.backend)
        loop = asyncio.get_running_loop()
        self._resume = loop.create_task(self._resume_cameras()) if self.backend.store.ping() else None
        self._watcher = loop.create_task(self.backend.evaluate_watches())

    async def _resume_cameras(self):
        """Cameras registered before a restart reconnect (their frames are in Redis already)."""
        for sid in await asyncio.to_thread(self.backend.live.ids):
            try:
                d = await asyncio.to_thread(self.backend.live.get, sid)
                if d.get("kind") == "rtsp" and d.get("status") not in ("stopped", "failed"):
                    await asyncio.to_thread(self.backend.live.update, sid, status="reconnecting")
                    await self.backend.start_stream(sid, d["source"], float(d.get("fps") or 1.0))
            except Exception as e:             # noqa: BLE001 - one camera must not stop the others
                log.warning("could not resume camera %s: %s", sid, e)


def build_app(settings: Settings):
    """The application graph for `serve.run` (Ingress bound to the two model deployments)."""
    d = settings.model_dump()
    opts = settings.replica_resources()
    enc = Encoder.options(num_replicas=settings.encoder_replicas, ray_actor_options=opts).bind(d)
    ans = Answerer.options(num_replicas=settings.answerer_replicas, ray_actor_options=opts).bind(d)
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(enc, ans, d)


def app_builder(args: dict[str, Any]):
    """`serve run deploy/serve.yaml` entry point: YAML `args` override LMSTREAM_* and defaults."""
    return build_app(Settings.from_env(**(args or {})))
