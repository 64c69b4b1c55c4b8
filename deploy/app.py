"""The one Ray Serve application (DESIGN section 8): Ingress -> Encoder / Answerer, Sources.

    serve run deploy/serve.yaml                      # or: lmstream serve (starts Redis and Ray too)
    app = build_app(Settings(...)); serve.run(app)   # from Python

Roles:
* `Ingress`  - FastAPI routes (`deploy/routes.py`), auth and limits; no model.
* `Encoder`  - one model per replica; `encode` is a `@serve.batch` method, so requests from any
               number of file jobs (streams) share one batched pass; writes the Redis ring.
* `Answerer` - one model per replica; `answer` streams a question's events (token by token).
* `FileSource` - a file job's Ray actor: decode, sample, shrink frames, send them to the Encoder;
               `Settings.warm_decoders` of them wait started, so a job starts at once, and one whose
               job ended takes the next (a burst of short jobs shares the first decoders free).

Concurrency on a model replica: encoding batches and questions run on worker threads and take the
model's lock per forward pass, so a replica runs one forward at a time (questions interleave their
decode steps; a batch of frames runs between them). More throughput = more replicas (one per GPU).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
import uuid
from typing import Any

import ray
from ray import serve

from lmcore.errors import Interrupted, LmsError, NotFound, ServiceUnavailable

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
    error_dict,
    frames_kept,
    job_progress,
    run_file_job,
    run_rtsp_stream,
    stored_frames,
)
from .settings import INGRESS_MAX_ONGOING_REQUESTS, Settings

log = logging.getLogger("lmstream.serve")

#: how long a warm decoder may take to answer before a job is given to it (an idle one answers in ms)
SPARE_PING_S = 5.0
#: how often a job waiting for a decoder looks whether one of those starting is ready
POOL_POLL_S = 0.05
#: spares found dead while one job waits before it takes a fresh, unwarmed actor (whose `run` says why)
MAX_FAILED_WARMS = 3
#: how long a decoder may take to start (its worker up, `warm` done) before it is stopped and passed over
WARM_TIMEOUT_S = 120.0
#: how long after a job takes a decoder its replacement starts, unless the job has ended by then, and how
#: long a job waits for a busy decoder to free before one more starts for it
REFILL_AFTER_S = 1.0
#: how often the end of a job that Redis could not take when it happened (failed, its decoder lost) is
#: written again, until Redis takes it: the record would otherwise stay queued or ingesting, holding a slot
#: of the job limit, until the next start of the service
MARK_RETRY_S = 2.0

api = build_api()


def _replica_rpc_on_loopback() -> None:
    """Serve starts, in each replica, an inter-deployment gRPC server on "[::]:0": every interface, with
    no setting to change it (Ray 2.60). Where this Ray node listens on loopback only (`lmstream serve`'s
    local instance), that server listens there too, so nothing outside the machine can call a replica
    past the Ingress's keys. Called first in each deployment's constructor, which Serve runs before it
    starts that server; on a cluster (a node address that is not loopback) it changes nothing."""
    try:
        from ray.serve._private import replica
    except ImportError:                 # another Ray layout: nothing to adjust
        return
    orig = getattr(replica, "add_port_to_grpc_server", None)
    if orig is None or getattr(orig, "lmstream_loopback", False):
        return
    ip = ray.util.get_node_ip_address()
    if ip not in ("127.0.0.1", "::1"):
        return
    here = "127.0.0.1:0" if ip == "127.0.0.1" else "[::1]:0"

    def add_port(server, address):
        return orig(server, here if address == "[::]:0" else address)

    add_port.lmstream_loopback = True
    replica.add_port_to_grpc_server = add_port


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=30)
class Encoder:
    def __init__(self, settings: dict):
        _replica_rpc_on_loopback()
        s = Settings.model_validate(settings)
        self.core = EncoderCore(s)
        self.encode.set_max_batch_size(s.serve_batch)            # batching across streams (Settings)
        self.encode.set_batch_wait_timeout_s(s.serve_batch_wait_s)

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

    async def check_health(self) -> None:
        """Serve's health check (every 10 s): also keeps this replica counted in `/metrics` while idle."""
        await asyncio.to_thread(self.core.report_stats)


@serve.deployment(max_ongoing_requests=32, health_check_period_s=10, health_check_timeout_s=30)
class Answerer:
    def __init__(self, settings: dict):
        _replica_rpc_on_loopback()
        self.core = AnswerCore(Settings.model_validate(settings))

    def ready(self) -> bool:
        return True

    @serve.multiplexed(max_num_models_per_replica=64)
    async def stream_lease(self, stream_id: str) -> "_StreamLease":
        """Stream-to-replica affinity: the Ingress sends a stream's questions with
        `multiplexed_model_id=stream_id`, so Serve routes them to a replica that holds this lease
        (its local keys/values tier then has the stream's records). When Serve unloads the lease
        (LRU over 64 streams per replica), the stream's local records are dropped."""
        return _StreamLease(self.core, stream_id)

    async def check_health(self) -> None:
        """Serve's health check (every 10 s): also reports the local tier's levels to `/metrics`."""
        await asyncio.to_thread(self.core.report_stats)

    async def answer(self, req: dict):
        """Streams the question's events; stops between tokens when the caller goes away."""
        req = dict(req)
        sid = req.pop("stream_id")
        if serve.get_multiplexed_model_id() == sid:
            await self.stream_lease(sid)
        question = req.pop("question")
        try:
            async for ev in answer_events_in_thread(lambda: self.core.answer(sid, question, **req)):
                yield ev
        finally:                          # the tier's hits and misses of this answer, to /metrics (not awaited)
            asyncio.get_running_loop().run_in_executor(None, self.core.report_stats)


class _StreamLease:
    """A stream held by one Answerer replica (see `Answerer.stream_lease`)."""

    def __init__(self, core: AnswerCore, stream_id: str):
        self.core, self.stream_id = core, stream_id

    def __del__(self):
        try:
            self.core.forget_stream(self.stream_id)
        except Exception:                          # noqa: BLE001 - interpreter shutdown
            pass


@ray.remote(num_cpus=0, max_restarts=0)
class FileSource:
    """A file-job decoder: decode -> Encoder batches -> ring; status in Redis. The Ingress keeps
    `Settings.warm_decoders` of them started and idle (`warm` run), so a job does not wait for a worker,
    and gives a decoder whose job ended back to that pool (one job at a time: `run` calls run in order)."""

    def __init__(self):
        self.ready = False

    def ping(self) -> bool:
        return True

    def warm(self, encoder, settings: dict) -> bool:
        """Everything `run` needs, ready before a job is given: the imports (torch came with this
        module), the Redis connections and the Encoder handle's router (one `info` call)."""
        from frame_cache import open_cache
        import stream.decode  # noqa: F401 - PyAV with it
        s = Settings.model_validate(settings)
        self.encoder, self.store, self.cache = encoder, JobStore(s.redis_url), open_cache(s.redis_url)
        encoder.info.remote().result()
        self.ready = True
        return True

    def run(self, job: FileJob, encoder, settings: dict) -> dict:
        """The job, on what `warm` made ready (a spare's `warm` ran first; one whose `warm` failed, or a
        fresh actor, does it here). The connections stay open for the decoder's next job; what the job's
        frames took goes back to the system (`_release_heap`), so an idle decoder stays small."""
        if not self.ready:
            try:
                self.warm(encoder, settings)
            except Exception as e:                     # noqa: BLE001 - said on the job, where a client looks
                try:
                    JobStore(Settings.model_validate(settings).redis_url).update(
                        job.job_id, status="failed", error=error_dict(e))
                except Exception:                      # noqa: BLE001 - Redis itself is what failed
                    pass
                raise
        try:
            return run_file_job(job, lambda items: encode_surviving(self.encoder, items), self.store, self.cache)
        finally:
            _release_heap()


#: How long a file job's batch, sent again once after its Encoder replica died, waits for a replica (Serve
#: starts another: ~10-30 s on a loaded CPU machine).
ENCODER_LOST_WAIT_S = 60.0


def _gist(e: BaseException, width: int = 240) -> str:
    """An error's first line for a message, cut at a word with " ..." when long (a cut in the middle of a
    word had made 127.0.0.1:18379 read as 127.0.0.1:1)."""
    import textwrap
    text = str(e).splitlines()[0] if str(e) else ""
    return textwrap.shorten(text, width, placeholder=" ...")


def encode_surviving(encoder, items: list) -> list[dict]:
    """`encoder.encode(items)`, sent again once when the replica died before answering (killed, out of memory,
    its node lost): a batch carries its writer and sequence number, so a batch stored before the replica died
    is not stored twice (`append_many` with `seq`, one atomic script). Once only: a batch that itself kills
    replicas must not take them down one after another. Then `E_UNAVAILABLE`, which the job's record says
    with the frames it keeps (it was `E_INTERNAL`, "ActorDiedError")."""
    try:
        return encoder.encode.remote(items).result()
    except ray.exceptions.RayError as e:
        lost = _replica_lost(e)
    t0 = time.monotonic()
    try:
        return encoder.encode.remote(items).result(timeout_s=ENCODER_LOST_WAIT_S)
    except Exception as e:                              # noqa: BLE001 - lost again, or no replica in time
        raise _lost_again(e, lost, t0, "the job's frames") from None


def _replica_lost(e: BaseException) -> str:
    """A first try's error: the Encoder's own (its code raised) or a cancelled job's is raised again; a
    replica lost (the batch is sent again once) is logged and named."""
    if isinstance(e, (ray.exceptions.RayTaskError, ray.exceptions.TaskCancelledError)):
        raise e
    log.warning("the Encoder replica was lost (%s): sending the batch again", type(e).__name__)
    return type(e).__name__


def _lost_again(e: BaseException, lost: str, t0: float, what: str) -> BaseException:
    """The second try's error: the Encoder's own as it is, anything else `E_UNAVAILABLE` naming both losses."""
    if isinstance(e, (ray.exceptions.RayTaskError, ray.exceptions.TaskCancelledError)):
        return e
    return ServiceUnavailable(f"expected the Encoder to store {what}, got its replica lost ({lost}) and the "
                              f"batch sent again failed too ({type(e).__name__} after {time.monotonic() - t0:.0f} s)")


def _release_heap() -> None:
    """glibc's `malloc_trim(0)`: freed arenas back to the system (a decoder that ingested a long video
    would otherwise idle at its peak size); nothing where glibc is not the allocator."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=4)
class StreamSource:
    """One camera: RTSP -> sampled frames -> Encoder -> ring; reconnects; status in Redis.

    Started by the Ingress on the alive node with the fewest cameras (`RayBackend.start_stream`)
    and supervised there: when the actor dies (its node died), the Ingress starts a new one on a
    surviving node, which takes the stream's writer token (the old one is fenced) and appends on."""

    def __init__(self):
        import threading
        self.stop_flag = threading.Event()

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def run(self, sid: str, url: str, fps: float, size: int, encoder, settings: dict) -> dict:
        import os
        import threading
        from frame_cache import open_cache
        self.stop_flag = threading.Event()                  # a run after one that raised starts afresh
        s = Settings.model_validate(settings)
        live, cache = LiveStore(s.redis_url), open_cache(s.redis_url)
        try:
            live.update(sid, node=self.node(), pid=os.getpid())     # where the camera runs now
            return run_rtsp_stream(sid, url, fps, size, lambda items: encoder.encode.remote(items).result(),
                                   live, cache, self.stop_flag, allow_private=s.allow_private_sources)
        finally:
            cache.close()

    def stop(self) -> None:
        self.stop_flag.set()


class _Camera:
    """One supervised camera of this Ingress: its actor, the actor's `run` ref, the node it was placed on."""

    def __init__(self, sid: str, url: str, fps: float, restarts: int = 0):
        self.sid, self.url, self.fps, self.restarts = sid, url, fps, restarts
        self.actor = self.ref = self.node = self.task = None
        self.started = 0.0


def _kill(actor) -> None:
    """`ray.kill`, for an actor that may be gone already (its worker or node lost, killed before)."""
    try:
        ray.kill(actor)
    except Exception:                                  # noqa: BLE001 - already gone
        pass


async def _failed_ref(e: BaseException):
    """An awaitable that raises `e` (a launch that failed is supervised like a lost actor)."""
    raise e


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
        self._sources: dict[str, tuple[asyncio.Task, Any]] = {}    # running jobs: (watcher task, actor)
        self._cancelled: set[str] = set()                            # jobs DELETE is cancelling
        self._spares: list[tuple[Any, str, Any]] = []                # idle decoders: (actor, name, warm ref)
        self._waiting = 0                                            # jobs waiting for a decoder
        self._line: collections.deque[int] = collections.deque()     # jobs asking for one, first come first
        self._tickets = itertools.count()                            # (their tickets, in arrival order)
        self._born: dict[str, float] = {}                            # when each starting decoder was started
        self._pool_changed = asyncio.Event()                         # a decoder was given back
        self._unmarked: dict[str, tuple[Exception, bool]] = {}       # job ends Redis did not take (retried)
        self._marker: asyncio.Task | None = None                     # the task that retries them
        self._fill_spares()

    async def encoder_info(self) -> dict:
        if self._info is None:
            self._info = await self.encoder.info.remote()
        return self._info

    async def models_ready(self) -> bool:
        a, b = await asyncio.gather(self.encoder.ready.remote(), self.answerer.ready.remote())
        return bool(a and b)

    # -- file jobs: a decoder actor each, from a pool of idle ones ----------------------------------
    # `_spares` holds idle decoders, started or still starting: `warm_decoders` of them between jobs. A job
    # takes the first that is ready: a started spare, one of those starting, or one whose job just ended
    # (`_give_back`); while it waits, a new decoder is started for it (at once when none is busy, else after
    # REFILL_AFTER_S), so a burst of long jobs still runs in parallel, and a burst of short ones reuses the
    # few decoders that finish first instead of waiting for a new worker each (~3.5 s to import torch, far
    # longer for several at once on a small machine).
    def _new_source(self, warm: bool = True) -> tuple[Any, str, Any]:
        name = "lms-src-" + uuid.uuid4().hex[:16]
        actor = FileSource.options(name=name).remote()
        if not warm:                                   # its `run` warms it, and says on the job why that failed
            return actor, name, None
        self._born[name] = time.monotonic()
        return actor, name, actor.warm.remote(self.encoder, self.settings.model_dump())

    def _drop(self, entry, listed: bool = True) -> None:
        """Kills an idle decoder (taken off `_spares` unless `listed` is False: it was already)."""
        if listed:
            self._spares.remove(entry)
        self._born.pop(entry[1], None)
        _kill(entry[0])

    def _fill_spares(self) -> None:
        """Start decoders until `warm_decoders` are idle (each starts in the background)."""
        while len(self._spares) < self.settings.warm_decoders:
            self._spares.append(self._new_source())

    def _refill(self) -> None:
        try:
            self._fill_spares()
        except Exception as e:                         # noqa: BLE001 - the GCS busy: the next job starts one
            log.warning("could not start a warm decoder (%s); the next job tries again", e)

    @staticmethod
    def _started(entry) -> bool:
        """The spare's `warm` (or, for one given back, its last `run`) has ended, well or not."""
        done, _ = ray.wait([entry[2]], timeout=0)
        return bool(done)

    def _give_back(self, actor, name: str, ref) -> None:
        """A decoder whose job ended (its `run` returned): idle again, first in line for a job waiting now
        or the next one (a decoder still starting is stopped instead when the pool is full)."""
        self._spares.insert(0, (actor, name, ref))
        self._pool_changed.set()
        self._trim_spares()

    def _trim_spares(self) -> None:
        """Back to `warm_decoders` idle decoders plus one for each job waiting (those started for jobs that
        left, cancelled or served by a decoder given back, stop), those still starting stopped first, then
        the last in line (decoders given back go first in line)."""
        while len(self._spares) > self.settings.warm_decoders + self._waiting:
            starting = [e for e in self._spares if not self._started(e)]
            self._drop(starting[-1] if starting else self._spares[-1])

    async def _take_source(self) -> tuple[Any, str]:
        """An idle decoder that answers a ping, the first ready of the spares and of the decoders whose
        jobs end meanwhile (a short job's decoder is free long before a new worker has imported torch, so
        one more is started only after `REFILL_AFTER_S` while any decoder is busy). Spares whose worker is
        gone (their `warm` failed, or they died idle: an out-of-memory kill, their node lost) or whose `warm`
        has run past `WARM_TIMEOUT_S` are killed and passed over; after `MAX_FAILED_WARMS` of them a fresh
        actor is returned unwarmed, so that its `run` reports why (Redis down, ...) on the job. Jobs take
        decoders in the order they asked (`_line`): one that arrives while others wait queues behind them,
        even for a decoder given back as it arrives."""
        waiting, failed = False, 0
        ticket = next(self._tickets)
        self._line.append(ticket)
        try:
            while True:
                now = time.monotonic()
                for entry in [e for e in self._spares if not self._started(e)
                              and now - self._born.get(e[1], now) > WARM_TIMEOUT_S]:
                    log.warning("decoder %s still starting after %.0f s; stopped", entry[1], WARM_TIMEOUT_S)
                    self._drop(entry)
                    failed += 1
                if failed >= MAX_FAILED_WARMS and self._line[0] == ticket:     # in its turn, as any other
                    actor, name, _ = self._new_source(warm=False)
                    return actor, name
                ready = [e for e in self._spares if self._started(e)]
                if ready and self._line[0] == ticket:
                    entry = ready[0]
                    self._spares.remove(entry)
                    actor, name, ref = entry
                    try:                               # a finished ref stays "done" after its actor dies
                        await ref
                        await asyncio.wait_for(actor.ping.remote(), SPARE_PING_S)
                    except asyncio.CancelledError:     # the job was cancelled: the spare stays a spare
                        self._spares.insert(0, entry)
                        raise
                    except Exception as e:             # noqa: BLE001 - dead (or not answering): never given a job
                        log.warning("warm decoder %s is gone (%s); taking another", name, type(e).__name__)
                        self._drop(entry, listed=False)
                        failed += 1
                        continue
                    self._born.pop(name, None)
                    return actor, name
                if not waiting:                        # none ready: one more starts for this job, at once when
                    waiting, since = True, time.monotonic()        # no decoder is busy, else unless a busy
                    self._waiting += 1                             # one is free within REFILL_AFTER_S
                busy = any(a is not None for _, a in self._sources.values())
                if len(self._spares) < self._waiting and (not busy or time.monotonic() - since >= REFILL_AFTER_S):
                    self._spares.append(self._new_source())
                self._pool_changed.clear()
                try:                                   # a decoder given back wakes it; a warm ending, the poll
                    await asyncio.wait_for(self._pool_changed.wait(), POOL_POLL_S)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._line.remove(ticket)
            if self._line:
                self._pool_changed.set()               # the next in line looks again at once
            if waiting:
                self._waiting -= 1
            self._trim_spares()                        # those started for waiters that left

    async def start_job(self, job: FileJob) -> None:
        """The job is queued here: it runs once a decoder is free (`_run_job`, in the background)."""
        self._sources[job.job_id] = (asyncio.get_running_loop().create_task(self._run_job(job)), None)

    async def _run_job(self, job: FileJob) -> None:
        """Takes a decoder for the job, runs it there and waits for it. `run` marks the job ready or failed
        itself, and the decoder goes back to the pool; an actor that dies first (out of memory, its node
        lost, killed) cannot, so the job is marked failed here, with its frames kept, instead of staying
        "ingesting" and holding a slot of the job limit for good."""
        actor, reuse, ran = None, False, False
        try:
            try:
                actor, name = await self._take_source()
            except asyncio.CancelledError:             # DELETE while queued
                raise
            except Exception as e:                     # noqa: BLE001 - Ray could start no decoder
                log.warning("job %s: no decoder (%s)", job.job_id, e)
                job.drop_upload()                      # gone before a client can see the job failed
                await self._mark_lost(job, e, started=False)
                return
            self._sources[job.job_id] = (self._sources[job.job_id][0], actor)
            # the next job finds one idle: a replacement starts unless this job has given its decoder back by
            # then (a short job: no worker started, to be stopped again, on the CPU the job itself needs)
            asyncio.get_running_loop().call_later(REFILL_AFTER_S, self._refill)
            ref = actor.ping.remote()                  # what `_give_back` waits on, should the job not run
            if job.job_id in self._cancelled:          # DELETE came as the decoder was handed over (a cancel
                reuse = True                           # that lands on a finished await is lost): not run
                return
            try:                                       # the record names its decoder: `job_runs` finds it
                kept = await asyncio.to_thread(self.store.update, job.job_id, decoder=name)
            except Exception as e:                     # noqa: BLE001 - Redis gone: the job cannot start
                log.warning("job %s: could not start it (%s)", job.job_id, e)
                reuse = True
                job.drop_upload()
                await self._mark_lost(job, e, started=False)
                return
            if not kept or job.job_id in self._cancelled:
                log.info("job %s: deleted while queued", job.job_id)
                reuse = True
                return
            ref = actor.run.remote(job, self.encoder, self.settings.model_dump())
            try:
                await ref
                ran = True
                reuse = job.job_id not in self._cancelled     # killed as `run` returned: not given back
            except asyncio.CancelledError:
                raise
            except Exception as e:                     # noqa: BLE001 - the actor or its node is gone
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                cancelled = job.job_id in self._cancelled  # DELETE killed it: the route removes the record
                log.warning("job %s: its decoder actor was %s (%s)", job.job_id,
                            "cancelled" if cancelled else "lost", why)
                if not cancelled:
                    job.drop_upload()
                    await self._mark_lost(job, e)
        finally:
            self._sources.pop(job.job_id, None)
            self._cancelled.discard(job.job_id)
            if actor is not None:
                if reuse:
                    self._give_back(actor, name, ref)
                else:
                    _kill(actor)
                    self._trim_spares()
            if not ran:                                # the upload `run` would have removed
                job.drop_upload()

    async def cancel_job(self, job_id: str) -> bool:
        """`DELETE /v1/videos/ID` of a job still queued or ingesting: a queued one stops waiting for a
        decoder; an ingesting one's decoder actor is killed and waited for (then nothing of it writes the
        job's record or hands the Encoder frames); the route then frees its frames and record. False when
        this Ingress does not run the job."""
        src = self._sources.get(job_id)
        if src is None:
            return False
        task, actor = src
        self._cancelled.add(job_id)
        if actor is None:
            task.cancel()
        else:
            _kill(actor)
        try:
            await asyncio.wait_for(asyncio.shield(task), 30)
        except asyncio.CancelledError:                 # the queued job's task, or this request
            if not task.done():
                raise
        except Exception:                              # noqa: BLE001 - its task reports what it can
            pass
        return True

    async def job_runs(self, job_id: str) -> bool:
        """A decoder actor for the job exists (on any Ingress), or the job is queued here: False for a
        record left by a request that ended between creating it and starting its job, which nothing will
        ever finish."""
        if job_id in self._sources:
            return True

        def look() -> bool:
            try:
                name = self.store.get(job_id).get("decoder")
            except NotFound:
                return False
            if not name:
                return False
            try:
                ray.get_actor(name)
                return True
            except ValueError:
                return False
        return await asyncio.to_thread(look)

    async def _mark_lost(self, job: FileJob, e: Exception, started: bool = True) -> None:
        """The job's record says `failed`: its decoder was lost (`started`) or it never got one. When Redis
        cannot take that now (the decoder's end was itself Redis going away), it is written again every
        MARK_RETRY_S until Redis takes it, so the record does not stay queued or ingesting, holding a slot
        of the job limit, until the service restarts."""
        if not await self._write_lost(job.job_id, e, started):
            self._unmarked[job.job_id] = (e, started)
            if self._marker is None or self._marker.done():
                self._marker = asyncio.get_running_loop().create_task(self._mark_later())

    async def _mark_later(self) -> None:
        while self._unmarked:
            await asyncio.sleep(MARK_RETRY_S)
            for jid, (e, started) in list(self._unmarked.items()):
                if await self._write_lost(jid, e, started, quiet=True):
                    self._unmarked.pop(jid, None)
                    log.info("job %s: marked failed now that Redis answers", jid)

    async def _write_lost(self, jid: str, e: Exception, started: bool, quiet: bool = False) -> bool:
        """Writes a lost job's end on its record (only while it is queued or ingesting: nothing to do for one
        deleted or finished meanwhile). False when Redis did not take it. A decoder that stopped because
        Redis went away is told as that (E_CACHE_UNAVAILABLE), not as a lost decoder; the frames counted
        are those its ring holds."""
        cause = getattr(e, "cause", None) or e         # a RayTaskError carries the decoder's own exception
        redis_gone = getattr(cause, "code", None) == "E_CACHE_UNAVAILABLE"
        try:
            d = await asyncio.to_thread(self.store.get, jid)
            if d["status"] not in JobStore.ACTIVE:
                return True
            frames, progress = await asyncio.to_thread(self._fence_and_count, jid, d)
            kept = frames_kept(frames)
            code = "E_CACHE_UNAVAILABLE" if redis_gone else Interrupted.code
            if not started:
                message = f"expected the job to start on a decoder, got {type(e).__name__}: {_gist(e)}; send the file again"
            elif redis_gone:
                message = (
                    f"expected Redis to stay reachable while the job ran, got it lost at "
                    f"{progress:.0%} ({_gist(cause) or 'no reason'}); "
                    f"{kept}")
            else:
                message = (f"expected the job's decoder to finish, got it lost at {progress:.0%} "
                           f"({type(e).__name__}); {kept}")
            await asyncio.to_thread(self.store.update, jid, status="failed", frames=frames, progress=progress,
                                    error={"code": code, "message": message})
            return True
        except NotFound:                               # deleted meanwhile: nothing to mark
            return True
        except Exception as e2:                        # noqa: BLE001 - Redis away: `_mark_later` writes it
            if not quiet:
                log.warning("job %s: could not mark it failed (%s); trying again every %.0f s", jid, e2,
                            MARK_RETRY_S)
            return False

    def _fence_and_count(self, jid: str, d: dict) -> tuple[int, float]:
        """A lost job's frames and how far they reach (`progress`), counted once its writer is fenced: a batch
        its dead decoder left at the Encoder is refused from now on, not stored after the count (the record
        said 128 frames while 160 were stored, for good)."""
        from frame_cache import StreamNotFound
        known, progress = int(d.get("frames") or 0), float(d.get("progress") or 0.0)
        try:
            self.cache.acquire_writer(jid)
            info = self.cache.stream_info(jid)
        except StreamNotFound:
            return known, progress
        except Exception:                              # noqa: BLE001 - Redis away: the record's own figures
            return stored_frames(self.cache, jid, known), progress
        window = d.get("window")
        start = float(window[0]) if window else 0.0
        end = float(window[1]) if window else d.get("duration_s")
        if info.count and end and end > start:         # how far the stored frames reach, as a running job's
            progress = job_progress(info.newest_pts, start, end - start)
        return max(known, int(info.count)), progress

    async def encode(self, items: list[EncodeItem]) -> list[dict]:
        """`encode_surviving` for the Ingress' own callers (live sockets): a batch whose Encoder replica died
        before answering is sent again once (its writer and sequence number keep it from being stored twice);
        then `E_UNAVAILABLE`. A socket's frames were lost with no word: the exception ended its sending task."""
        try:
            return await self.encoder.encode.remote(items)
        except ray.exceptions.RayError as e:
            lost = _replica_lost(e)
        t0 = time.monotonic()
        try:
            return await asyncio.wait_for(self.encoder.encode.remote(items), ENCODER_LOST_WAIT_S)
        except Exception as e:                          # noqa: BLE001 - lost again, or no replica in time
            raise _lost_again(e, lost, t0, "the frames") from None

    # -- cameras: placed over the nodes, supervised ---------------------------------------------
    def _camera_nodes(self) -> list[str]:
        """Alive nodes that have the settings' `camera_resources` (blocking: asks the GCS)."""
        need = self.settings.camera_resources
        return sorted(n["NodeID"] for n in ray.nodes()
                      if n.get("Alive") and all(n["Resources"].get(k, 0) >= v for k, v in need.items()))

    async def start_stream(self, sid: str, url: str, fps: float) -> None:
        """A camera actor on the alive node with the fewest of this Ingress' cameras, and a task
        that restarts it elsewhere when it dies."""
        info = await self.encoder_info()
        old = self._streams.pop(sid, None)
        if old is not None:
            old.task.cancel()
            ray.kill(old.actor)
        cam = _Camera(sid, url, fps, restarts=old.restarts if old is not None else 0)
        await self._launch(cam, info["size"])
        self._streams[sid] = cam
        cam.task = asyncio.get_running_loop().create_task(self._supervise(cam, info["size"]))

    async def _launch(self, cam: "_Camera", size: int, avoid: str | None = None) -> None:
        """Place the camera's actor. `avoid` is the node its last actor was lost on: the GCS may still
        list a node that just died as alive for a few seconds, so it is left out while any other node fits
        (a relaunch onto it would fail too and cost a second restart)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        try:
            nodes = await asyncio.to_thread(self._camera_nodes)
        except Exception as e:                 # noqa: BLE001 - the GCS is busy: let Ray place it
            log.warning("camera %s: could not list nodes (%s); Ray places it", cam.sid, e)
            nodes = []
        if avoid is not None and any(n != avoid for n in nodes):
            nodes = [n for n in nodes if n != avoid]
        load = {n: 0 for n in nodes}
        for other in self._streams.values():
            if other is not cam and other.node in load:
                load[other.node] += 1
        opts: dict[str, Any] = {"name": f"lms-cam-{cam.sid}-{cam.restarts}"}
        if self.settings.camera_resources:
            opts["resources"] = dict(self.settings.camera_resources)
        if nodes:
            cam.node = min(nodes, key=lambda n: (load[n], n))
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(cam.node, soft=False)
        else:
            cam.node, opts["scheduling_strategy"] = None, "SPREAD"
        cam.actor = StreamSource.options(**opts).remote()
        self._run(cam, size)

    def _run(self, cam: "_Camera", size: int) -> None:
        """Start (or re-run) the camera's `run` on its actor."""
        cam.ref = cam.actor.run.remote(cam.sid, cam.url, cam.fps, size, self.encoder, self.settings.model_dump())
        cam.started = time.monotonic()

    async def _supervise(self, cam: "_Camera", size: int) -> None:
        """Waits on the camera's `run`; when it ends with an error (its actor or node lost, or Redis /
        the Encoder unreachable), starts the camera again (with backoff) on an alive node, unless the
        stream was stopped or failed for good meanwhile. A `run` that returns (asked to stop, camera
        failed for good, writer fenced by a newer source) is left alone."""
        backoff = (0.5, 1, 2, 5, 10)
        fails = 0
        while True:
            try:
                await cam.ref
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:                     # noqa: BLE001 - the actor, its node or Redis is gone
                if self._streams.get(cam.sid) is not cam:
                    return                             # stopped or replaced meanwhile
                lost_on, why = cam.node, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                rerun = isinstance(e, ray.exceptions.RayTaskError)   # run() raised; its actor is alive
            if await self._ended_for_good(cam.sid):
                return
            cam.restarts += 1
            log.warning("camera %s: source on node %s ended (%s); restart %d", cam.sid, lost_on, why, cam.restarts)
            msg = f"expected the camera's source on node {lost_on} to keep running, got it ended ({why}); restarting"
            try:
                await asyncio.to_thread(self.live.update, cam.sid, status="reconnecting", restarts=cam.restarts,
                                        last_error={"code": "E_UNAVAILABLE", "message": msg})
            except Exception:                          # noqa: BLE001 - Redis down: the new source publishes
                pass
            if time.monotonic() - cam.started > 60:
                fails = 0
            await asyncio.sleep(backoff[min(fails, len(backoff) - 1)])
            fails += 1
            if self._streams.get(cam.sid) is not cam or await self._ended_for_good(cam.sid):
                return
            if rerun:                                  # Redis or the Encoder was unreachable: same actor
                self._run(cam, size)
                continue
            _kill(cam.actor)
            try:
                await self._launch(cam, size, avoid=lost_on)
            except Exception as e:                     # noqa: BLE001 - try again after the backoff
                cam.ref = _failed_ref(e)
                continue
            log.warning("camera %s: restarted on node %s", cam.sid, cam.node)

    async def _ended_for_good(self, sid: str) -> bool:
        """The stream's record says stopped (DELETE) or failed (the camera refused for good)."""
        try:
            d = await asyncio.to_thread(self.live.get, sid)
        except Exception:                              # noqa: BLE001 - Redis down: not known to have ended
            return False
        return d.get("status") in ("stopped", "failed")

    async def stop_stream(self, sid: str) -> None:
        cam = self._streams.pop(sid, None)
        if cam is None:
            return
        cam.task.cancel()
        try:
            await asyncio.wait_for(cam.actor.stop.remote(), 10)
            await asyncio.wait_for(cam.ref, 30)
        except Exception:                      # noqa: BLE001 - stopping regardless
            pass
        ray.kill(cam.actor)

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
                    try:
                        await self._evaluate(sid, wid, w)
                    except Exception:              # noqa: BLE001 - Redis away mid-write: the loop goes on
                        log.warning("watch %s of stream %s: evaluation not recorded", wid, sid, exc_info=True)

    async def _evaluate(self, sid: str, wid: str, w: dict) -> None:
        req = {"stream_id": sid, "question": w["question"], "last_s": w.get("last_s") or 10, "max_tokens": 16,
               "watch": wid}
        ans = err = None
        try:
            async for ev in self.answer_events(req):
                if ev["type"] == "answer":
                    ans = ev
                elif ev["type"] == "error":
                    err = {"code": ev.get("code", "E_INTERNAL"), "message": ev.get("message", "")}
        except LmsError as e:                      # no frames fused yet, Redis down...: said on the watch
            err = {"code": e.code, "message": str(e.message)}
        except Exception as e:                     # noqa: BLE001 - evaluated again next time
            err = {"code": "E_INTERNAL", "message": f"{type(e).__name__}: {e}"[:300]}
        # why it has no answer (GET .../watches `last_error`; it was swallowed: a watch of a stopped stream, or
        # made before any frame was fused with it, said nothing, ever), written when it changes
        if (err or None) != w.get("last_error"):
            try:
                await asyncio.to_thread(self.watches.update, sid, wid, last_error=err)
            except Exception:                      # noqa: BLE001 - Redis down: next time
                pass
        if ans is not None and ans.get("unknown_words") and not w.get("unknown_words"):
            await asyncio.to_thread(self.watches.update, sid, wid, unknown_words=ans["unknown_words"])
        if ans is None or ans["text"] == w.get("last_text"):
            return
        ev = {"type": "event", "watch": wid, "question": w["question"], "text": ans["text"],
              "previous": w.get("last_text"), "time_span": ans["time_span"], "frames": ans["frames"],
              "frames_fused": ans["frames_fused"], "policy": ans["policy"], "at": time.time()}
        await asyncio.to_thread(self.watches.push_event, sid, ev)
        await asyncio.to_thread(self.watches.update, sid, wid, last_text=ans["text"])

    def answer_events(self, req: dict):
        # the same replica answers a stream's questions (its local keys/values tier holds the stream)
        gen = self.answerer.options(stream=True, multiplexed_model_id=req["stream_id"]).answer.remote(req)

        async def events():
            try:
                async for ev in gen:
                    yield ev
            except ray.exceptions.RayTaskError as e:     # the replica's own code raised (it reports its errors
                yield {"type": "error", "status": 500, **error_dict(e.cause or e)}     # as events: a fault)
            except ray.exceptions.RayError as e:         # the replica died (killed, out of memory, its node lost)
                yield {"type": "error", "status": 503, "code": ServiceUnavailable.code,
                       "message": f"expected an answer from the model replica, got the replica lost while answering "
                                  f"({type(e).__name__}): ask again, Serve starts another"}
            finally:
                gen.cancel()                  # the client went away: the replica stops generating
        return events()


@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS)      # limits.max_live_connections under it
@serve.ingress(api)
class Ingress:
    async def __init__(self, encoder, answerer, settings: dict):
        _replica_rpc_on_loopback()
        s = Settings.model_validate(settings)
        self.backend = RayBackend(s, encoder, answerer)
        failed = self.backend.store.fail_interrupted(self.backend.cache) if self.backend.store.ping() else []
        if failed:
            gone = JobStore.remove_uploads(s.upload_dir, failed)     # their decoders never run again
            log.warning("marked %d interrupted video jobs failed (their frames stay; %d uploads removed): %s",
                        len(failed), gone, failed)
        set_backend(self.backend)
        loop = asyncio.get_running_loop()
        self._resume = loop.create_task(self._resume_cameras()) if self.backend.store.ping() else None
        self._watcher = loop.create_task(self.backend.evaluate_watches())

    async def drain_for_stop(self) -> dict:
        """`lmstream serve` stopping, before Serve shuts down: new questions and jobs are refused, open
        `/v1/live` sockets store what they received, are told `E_UNAVAILABLE` and closed 1001, and the
        questions in flight finish (`routes.drain_for_stop`)."""
        from .routes import drain_for_stop
        return await drain_for_stop()

    async def _resume_cameras(self):
        """Cameras registered before a restart reconnect (their frames are in Redis already). A socket's
        stream still marked live is not: its socket ended with the Ingress (build_app runs one), so it is
        marked stopped, its frames kept, and `lmstream cache rm` / DELETE may remove it."""
        for sid in await asyncio.to_thread(self.backend.live.ids):
            try:
                d = await asyncio.to_thread(self.backend.live.get, sid)
                if d.get("kind") == "push" and d.get("status") not in ("stopped", "failed"):
                    await asyncio.to_thread(self.backend.live.update, sid, status="stopped",
                                            last_error={"code": "E_SOURCE_LOST", "message":
                                                        "expected the socket feeding this stream to stay open, "
                                                        "got it closed by a service restart"})
                elif d.get("kind") == "rtsp" and d.get("status") not in ("stopped", "failed"):
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
    ingress_opts: dict[str, Any] = {"num_cpus": 0}
    if settings.service_resources:                      # e.g. the head node only: cameras go elsewhere too
        ingress_opts["resources"] = dict(settings.service_resources)
    return Ingress.options(ray_actor_options=ingress_opts).bind(enc, ans, d)


def app_builder(args: dict[str, Any]):
    """`serve run deploy/serve.yaml` entry point: YAML `args` override LMSTREAM_* and defaults. Without an API
    key it refuses to deploy (every request would be 401; `lmstream serve` makes one and prints it)."""
    settings = Settings.from_env(**(args or {}))
    if not settings.api_keys:
        from lmcore.errors import BadArgument
        raise BadArgument("expected at least one API key (LMSTREAM_API_KEYS=key1,key2 in serve run's environment, "
                          "or api_keys in serve.yaml's args), got none: every request would be refused 401")
    return build_app(settings)
