"""Thin HTTP routes (DESIGN section 8): auth, validation, limits, then the `Backend` does the work.

`build_api()` returns the FastAPI app; the process that serves it installs a `Backend` with
`set_backend` (the Ray Serve ingress does, in `deploy/app.py`). Every error a user can cause is
``{"error": {"code": "E_...", "message": "expected ..., got ..."}}`` with its 4xx status; 429 and 503 carry
Retry-After.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import secrets
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol
from urllib.parse import parse_qs, urlparse

from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmcore.errors import (
    BadArgument,
    Busy,
    Interrupted,
    InvalidRequest,
    JobRunning,
    LmsError,
    NotFound,
    NotReady,
    PayloadTooLarge,
    ServiceUnavailable,
    StaleWriter,
    StreamStopped,
    Unauthorized,
)
from lmcore.stops import cut_at_stop

from .schemas import ChatRequest, Question, StreamCreate, VideoCreate, WatchCreate, WatchQuestion
from .serving import (
    EncodeItem,
    FileJob,
    FrameSampler,
    JobStore,
    MAX_RECORD_GAPS,
    LiveStore,
    WatchStore,
    carried_counts,
    continued_timeline,
    merge_gaps,
    newest_wall,
    check_allowed,
    BIG_PICTURE_PIXELS,
    check_regular_file,
    decode_image,
    error_dict,
    fps_ok,
    picture_pixels,
    require_answerable,
    stream_status,
    video_answer_context,
    video_status,
)
from .settings import Settings


class Backend(Protocol):
    """What the routes need from the deployment around them."""

    settings: Settings
    store: JobStore
    cache: Any

    async def encoder_info(self) -> dict: ...
    async def start_job(self, job: FileJob) -> None: ...
    async def cancel_job(self, job_id: str) -> bool: ...
    async def job_runs(self, job_id: str) -> bool: ...
    def answer_events(self, req: dict) -> AsyncIterator[dict]: ...
    async def models_ready(self) -> bool: ...
    async def encode(self, items: list) -> list[dict]: ...
    async def start_stream(self, sid: str, url: str, fps: float) -> None: ...
    async def stop_stream(self, sid: str) -> None: ...
    watches: WatchStore
    def model_prompt_check(self, question: str) -> None: ...


_backend: Backend | None = None


def set_backend(b: Backend) -> None:
    global _backend
    _backend = b


def current_backend() -> Backend | None:
    return _backend


def backend() -> Backend:
    if _backend is None:
        raise ServiceUnavailable("expected the service to be started, got no backend yet (starting up)")
    return _backend


def client_error(e: LmsError) -> LmsError:
    """An error as a client is told it. `E_BAD_ARGUMENT` is the library's (and the CLI's) code for an argument it
    refuses; behind a route the argument came from the request (a window, a choice the tokenizer cannot spell,
    an id), so it is the request's fault like any field the schemas refuse: 422 `E_INVALID_REQUEST`, the same
    words. Every other error unchanged."""
    return InvalidRequest(e.message) if e.code == BadArgument.code else e


def client_error_dict(d: dict) -> dict:
    """`client_error` for an error as a dict: an answer's error event (with its HTTP `status`), an Encoder
    result's error."""
    if d.get("code") != BadArgument.code:
        return d
    d = {**d, "code": InvalidRequest.code}
    if "status" in d:
        d["status"] = InvalidRequest.http_status
    return d


def error_response(e: LmsError, *, openai: bool = False, param: str | None = None) -> JSONResponse:
    """`{"error": {"code", "message"}}` with the error's status. `openai` (the OpenAI-compatible routes,
    `is_openai_path`): the shape OpenAI's clients read, `type` and `param` beside our code and message, and a
    request the service refuses is 400 there (their `BadRequestError`), as OpenAI and vLLM answer it."""
    e = client_error(e)
    # 429 (busy) and 503 (Redis or a model replica away for now): when to try again, as RFC 9110 lets them say
    after = getattr(e, "retry_after", 5)
    headers = {"Retry-After": str(after)} if after is not None and (isinstance(e, Busy) or e.http_status == 503) \
        else None
    body, status = e.to_dict(), e.http_status
    if openai:
        status = 400 if status == 422 else status
        body = {**body, "type": openai_error_type(status), "param": param}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def is_openai_path(path: str) -> bool:
    """The routes an OpenAI client calls: their errors take OpenAI's shape (`error_response(openai=True)`)."""
    return path == "/v1/chat/completions" or path == "/v1/models" or path.startswith("/v1/models/")


def openai_error_type(status: int) -> str:
    """The `type` OpenAI's API gives an error of this HTTP status: `invalid_request_error` for a request it
    refuses (a bad key and an unknown model too, told apart by `code`), `server_error` for its own faults."""
    return "server_error" if status >= 500 else "invalid_request_error"


class Metrics:
    """Prometheus metrics of this ingress process, plus stream and job gauges read at scrape time."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lms_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.questions = Counter("lms_questions", "questions answered", ["kind"], registry=r)
        self.ttft = Histogram("lms_time_to_first_token_seconds", "time to the first answer token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tokens = Counter("lms_answer_tokens", "answer tokens generated", registry=r)
        self.tps = Gauge("lms_tokens_per_second", "tokens/s of the last answer", registry=r)
        self.inflight = Gauge("lms_questions_inflight", "questions queued or running (the queue depth)",
                              registry=r)
        self.jobs_started = Counter("lms_jobs_started", "file jobs started", registry=r)
        self.connections = Gauge("lms_live_connections", "open /v1/live sockets and watch-event streams of this "
                                 "Ingress (limits.max_live_connections bounds them)", registry=r)

    def render(self, b: Backend | None) -> bytes:
        from prometheus_client import CollectorRegistry, Gauge, generate_latest
        out = generate_latest(self.registry)
        if b is None:
            return out
        extra = CollectorRegistry()
        scraped = _ScrapedCounters()
        extra.register(scraped)
        frames = Gauge("lms_stream_frames", "frames stored per stream", ["stream"], registry=extra)
        ingested = scraped.family("lms_stream_frames_ingested", "frames ever ingested per stream", ["stream"])
        overwritten = scraped.family("lms_stream_frames_overwritten", "frames the ring overwrote (its oldest) per "
                                     "stream", ["stream"])
        dropped = scraped.family("lms_stream_frames_dropped", "live streams: frames shed (never stored: queue "
                                 "full, encoder busy, undecodable), as GET /v1/streams/{id} dropped; frames sampled "
                                 "out by fps are not", ["stream"])
        skipped = scraped.family("lms_stream_frames_skipped_by_fps", "live streams: frames sampled out by fps",
                                 ["stream"])
        nbytes = Gauge("lms_stream_bytes", "cache bytes per stream (records + light records)", ["stream"],
                       registry=extra)
        jobs = Gauge("lms_jobs", "file jobs by status", ["status"], registry=extra)
        lag = Gauge("lms_stream_lag_seconds", "live streams: seconds from a frame's arrival to its storage",
                    ["stream"], registry=extra)
        up = Gauge("lms_cache_up", "1 when the frame cache answers", registry=extra)
        try:
            self._replica_stats(b, scraped, extra)
            mem = getattr(b.cache, "server_memory", None)       # Redis: how near its maxmemory it is
            try:                                    # (an ACL user without INFO: the other figures all the same)
                m = mem() if mem is not None else None
            except LmsError:
                m = None
            if m is not None:
                Gauge("lms_redis_used_memory_bytes", "Redis's used_memory (summed over a Cluster's masters)",
                      registry=extra).set(m["used_memory"])
                Gauge("lms_redis_maxmemory_bytes", "Redis's maxmemory, 0 when it has none: past it new frames are "
                      "refused (E_CACHE_BUDGET), stored ones kept", registry=extra).set(m["maxmemory"])
            for sid in b.cache.streams():
                i = b.cache.stream_info(sid)
                frames.labels(sid).set(i.count)
                ingested.add_metric([sid], i.total_appended)
                overwritten.add_metric([sid], i.evicted)
                nbytes.labels(sid).set(i.bytes_used + i.light_bytes)
            counts: dict[str, int] = {}
            for jid in b.store.ids():
                try:
                    st = b.store.get(jid)["status"]
                except NotFound:
                    continue
                counts[st] = counts.get(st, 0) + 1
            for st in ("queued", "ingesting", "ready", "failed"):
                jobs.labels(st).set(counts.get(st, 0))
            for sid in b.live.ids():
                try:
                    d = stream_status(b.live.get(sid))        # as GET shows it: no lag while stalled
                except NotFound:
                    continue
                dropped.add_metric([sid], int(d.get("dropped") or 0))
                if d.get("skipped_by_fps") is not None:
                    skipped.add_metric([sid], int(d["skipped_by_fps"]))
                if d.get("lag_s") is not None and d.get("status") not in ("stopped", "failed"):
                    lag.labels(sid).set(float(d["lag_s"]))
            up.set(1)
        except LmsError:
            up.set(0)
        return out + generate_latest(extra)

    #: the model replicas' counters (deployment totals in Redis, `serving.ReplicaStats`): metric, what
    #: it counts, the key the replicas add to
    REPLICA_COUNTERS = (
        ("lms_encoder_frames", "frames the Encoder replicas encoded", "encoder_frames"),
        ("lms_encoder_batches", "batched passes of the Encoder replicas (frames/pass = the batch formed across "
         "streams)", "encoder_batches"),
        ("lms_local_kv_hits", "frames whose keys/values an Answerer read from its local tier", "local_kv_hits"),
        ("lms_local_kv_misses", "frames whose keys/values an Answerer read from Redis", "local_kv_misses"),
        ("lms_local_kv_evicted_streams", "streams the local tiers dropped to stay within their bytes",
         "local_kv_evicted_streams"),
        ("lms_local_kv_trimmed_frames", "frames the local tiers dropped from a stream over the budget alone",
         "local_kv_trimmed_frames"),
        ("lms_answer_context_hits", "questions whose LLM head [prefix rows, frame tokens] an Answerer had kept from "
         "an earlier question over the same frames", "answer_context_hits"),
        ("lms_answer_context_misses", "questions that looked for a kept LLM head and ran the whole pass",
         "answer_context_misses"),
    )
    #: the local tier's levels, summed over the Answerer replicas that reported in the last minute
    REPLICA_GAUGES = (
        ("lms_local_kv_bytes", "bytes the Answerers' local keys/values tiers hold", "local_kv_bytes"),
        ("lms_local_kv_max_bytes", "the local tiers' capacity, bytes", "local_kv_max_bytes"),
        ("lms_local_kv_frames", "frames the local tiers hold", "local_kv_frames"),
        ("lms_local_kv_streams", "streams the local tiers hold", "local_kv_streams"),
        ("lms_answer_context_bytes", "bytes of LLM heads the Answerers keep for repeated questions",
         "answer_context_bytes"),
    )

    def _replica_stats(self, b: Backend, scraped: "_ScrapedCounters", registry) -> None:
        """The model replicas' counters and levels, as they reported them to Redis (whichever replica this
        Ingress would reach, and whichever Ingress is scraped, the figures are the deployment's)."""
        from prometheus_client import Gauge
        from .serving import ReplicaStats
        r = getattr(b.store, "r", None)
        if r is None:                                          # a backend without Redis: nothing reported
            return
        totals, roles = ReplicaStats.read(r)
        for name, doc, key in self.REPLICA_COUNTERS:
            scraped.family(name, doc).add_metric([], totals.get(key, 0))
        fam = scraped.family("lms_local_kv_read_bytes", "keys/values bytes the Answerers read, by where from",
                             ["tier"])
        fam.add_metric(["local"], totals.get("local_kv_bytes_local", 0))
        fam.add_metric(["remote"], totals.get("local_kv_bytes_remote", 0))
        answerers = roles.get("answerer", {})
        for name, doc, key in self.REPLICA_GAUGES:
            Gauge(name, doc, registry=registry).set(answerers.get(key, 0))
        reps = Gauge("lms_model_replicas", "model replicas that reported in the last minute, by role", ["role"],
                     registry=registry)
        for role in ("encoder", "answerer"):
            reps.labels(role).set(roles.get(role, {}).get("replicas", 0))


class _ScrapedCounters:
    """Counters whose values are read at scrape time (from Redis or a stream's record), not counted in this
    process (prometheus_client's `Counter` only counts its own `inc()`): exposed as ``<name>_total``."""

    def __init__(self):
        self.families: list = []

    def family(self, name: str, doc: str, labels: list[str] | None = None):
        from prometheus_client.core import CounterMetricFamily
        self.families.append(CounterMetricFamily(name, doc, labels=labels or []))
        return self.families[-1]

    def collect(self):
        return iter(self.families)


def _retain(spec) -> dict | None:
    """A request's `retain` (docs/design.md section 9) checked and normalised for the stream's meta (a bad
    one: the library's `E_BAD_ARGUMENT`, which `client_error` makes 422 where the client is told)."""
    from frame_cache.retention import Retention
    r = Retention.parse(spec)
    return None if r is None else r.to_dict()


def validation_message(err: dict) -> str:
    """One pydantic error in the service's words, the field named: "expected stream: Input should be a valid
    boolean, got \"yes\"" (our own validators' messages already say expected and got: kept as they are)."""
    msg = err.get("msg", "a valid value")
    for prefix in ("Value error, ", "Assertion failed, "):        # pydantic's words around our validators'
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if msg.startswith("expected"):
        return msg
    where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
    loc = err.get("loc") or ("",)
    if err.get("type") == "missing" and isinstance(loc[-1], str):    # a field left out: its "input" is the body
        return f"expected {where} (required), got none"
    if err.get("type") == "extra_forbidden":       # "expected bogus: Extra inputs are not permitted" read as wanted
        parent = ".".join(str(x) for x in loc[:-1] if x != "body")
        return f"expected no field {loc[-1]!s}{' in ' + parent if parent else ''} (unknown), got {where} = " + \
            _shown(err.get("input"))
    return f"expected {where}: {msg}, got {_shown(err.get('input'))}"


def _shown(got) -> str:
    """A request value as an error shows it: JSON, 200 characters at most."""
    try:
        return json.dumps(got)[:200] if got is not None and not isinstance(got, (bytes, bytearray)) else "nothing"
    except (TypeError, ValueError):
        return repr(got)[:200]


def _not_utf8(e: UnicodeDecodeError) -> InvalidRequest:
    return InvalidRequest(f"expected a UTF-8 JSON body, got bytes that are not UTF-8 (0x{e.object[e.start]:02x} at "
                          f"byte {e.start})")


def _is_json(ctype: str) -> bool:
    """application/json or application/*+json, as FastAPI decides to parse a body as JSON."""
    media = ctype.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def key_error(authorization: str, token: str | None, settings: Settings) -> Unauthorized | None:
    """Why a request's API key is refused (`Authorization: Bearer KEY`, else `?token=KEY`), or None: one
    check for the routes, the body reader before them and the WebSocket. Compared in constant time."""
    key = authorization[7:].strip() if authorization.lower().startswith("bearer ") else token
    if not key:
        return Unauthorized("expected an API key (Authorization: Bearer KEY), got none")
    if not any(secrets.compare_digest(key.encode(), k.encode()) for k in settings.api_keys):
        return Unauthorized("expected a valid API key, got one the service does not know")
    return None


#: paths served without a key (the web page asks for one and sends it on the socket; a liveness probe)
OPEN_PATHS = ("/", "/health")


class BoundedBody:
    """ASGI middleware: every request body but an upload is read here first, at most
    `limits.max_json_bytes` of it, then handed to the route as one message.

    * over the bound: 413 `E_TOO_LARGE`, from Content-Length before a byte is read, or as soon as a
      chunked body passes it (the rest is never read);
    * a JSON body that is not UTF-8: 422 `E_INVALID_REQUEST` (FastAPI itself would answer 400 "There
      was an error parsing the body", and `request.json()` raise a bare 500);
    * no valid API key: 401 before a byte of the body is read (a client without one held a request slot
      for as long as it sent its body, and 300 such slow bodies stalled every route);
    * a body still not whole after `limits.body_timeout_s`: 422, its slot freed;
    * more than `limits.max_body_reads` bodies being received at once: 429 `E_BUSY` at once, nothing read
      (300 slow bodies, each inside its timeout, held every request the Ingress takes at once: `/health`
      answered after 28 s);
    * GET, HEAD, DELETE and OPTIONS: no route of theirs reads a body, so none is read or waited for (a GET
      with `Content-Length: 10` and no bytes held a slot for 30 s).

    An upload (multipart `POST /v1/videos`) streams to disk past it, bounded by `max_upload_bytes` in
    `_save_upload`. The bound comes from the installed backend's settings, read per request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        b = current_backend()
        if scope["type"] != "http" or b is None:     # WebSocket (its own bound), lifespan; not started: 503 later
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        ctype = headers.get("content-type", "")
        openai = is_openai_path(scope["path"])

        def refuse(e: LmsError) -> JSONResponse:
            return error_response(e, openai=openai)

        if scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)   # no route of theirs reads a body: none is read here
        from starlette.datastructures import QueryParams   # as `auth` reads `?token=` (the last one given)
        token = QueryParams(scope.get("query_string", b"")).get("token")
        bad = key_error(headers.get("authorization", ""), token, b.settings)
        if bad is not None:
            return await refuse(bad)(scope, receive, send)
        if (scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/v1/videos")
                and ctype.lower().startswith("multipart/form-data")):
            return await self.app(scope, receive, send)
        if scope["method"] in BODYLESS_METHODS:          # nothing reads it: not waited for, holds no slot
            return await self.app(scope, receive, send)
        limit = b.settings.limits.max_json_bytes
        clen = headers.get("content-length", "").strip()
        if clen.isascii() and clen.isdigit() and int(clen) > limit:
            return await refuse(PayloadTooLarge(
                f"expected a request body of at most {limit} bytes (limits.max_json_bytes), got {int(clen)} "
                "(Content-Length)"))(scope, receive, send)
        cap = b.settings.limits.max_body_reads
        if _BODY_READS["n"] >= cap:
            return await refuse(Busy(
                f"expected at most {cap} request bodies being received at once, got {_BODY_READS['n']} "
                "(limits.max_body_reads): send it again in a moment", retry_after=b.settings.limits.retry_after_s,
            ))(scope, receive, send)
        _BODY_READS["n"] += 1
        try:
            body = await _read_body(receive, limit, b.settings.limits.body_timeout_s)
        except LmsError as e:
            return await refuse(e)(scope, receive, send)
        finally:
            _BODY_READS["n"] -= 1
        if body and _is_json(ctype):
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as e:
                return await refuse(_not_utf8(e))(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()                   # after the body: the disconnect, as the server says it
        await self.app(scope, replay, send)


#: thread pools of their own (`_on_own_threads`), apart from the default one every route's `asyncio.to_thread` shares
_OWN_THREADS: "dict[str, concurrent.futures.ThreadPoolExecutor]" = {}
#: the /metrics render in flight, which scrapes that arrive meanwhile share (`_render_shared`)
_RENDERING: dict = {"task": None}


def _on_own_threads(name: str, fn, *args, workers: int = 2):
    """`fn(*args)` on pool `name`'s threads: the Redis ping of `/ready` (60 concurrent `/metrics` scrapes, each a
    Redis call per stream on the shared pool, made it time out: "expected Redis to answer" with Redis healthy)
    and the `/metrics` render (so scrapes never take the threads other routes wait on)."""
    import concurrent.futures
    ex = _OWN_THREADS.get(name)
    if ex is None:
        ex = _OWN_THREADS[name] = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"lms-{name}")
    return asyncio.get_running_loop().run_in_executor(ex, fn, *args)


async def _render_shared(metrics: "Metrics", b) -> bytes:
    """`metrics.render(b)` on one thread of its own; a scrape that arrives while one renders gets that render
    (60 at once cost 60 renders, about 1 ms a stream each, and held the shared threads)."""
    task = _RENDERING["task"]
    if task is None or task.done():
        task = _RENDERING["task"] = asyncio.ensure_future(_on_own_threads("metrics", metrics.render, b, workers=1))
    return await asyncio.shield(task)


#: methods whose routes never read a body (`BoundedBody` passes them on without reading or waiting for one)
BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
#: request bodies `BoundedBody` is receiving now (`limits.max_body_reads` bounds them); one Ingress process's
_BODY_READS = {"n": 0}


async def _read_body(receive, limit: int, deadline: float) -> bytes:
    """A request body, whole: 413 past `limit` bytes, 422 when not whole within `deadline` seconds or cut off
    by a disconnect (an answer no one reads, so that the middleware around sees one, not a 500)."""
    chunks, n, more = [], 0, True
    t_end = asyncio.get_running_loop().time() + deadline
    while more:
        try:
            msg = await asyncio.wait_for(receive(), max(0.0, t_end - asyncio.get_running_loop().time()))
        except TimeoutError:
            raise InvalidRequest(f"expected the whole request body within limits.body_timeout_s={deadline:g} s, "
                                 f"got {n} bytes by then") from None
        if msg["type"] == "http.disconnect":
            raise InvalidRequest(f"expected the whole request body, got a disconnect after {n} bytes")
        chunk = msg.get("body", b"")
        n += len(chunk)
        if n > limit:
            raise PayloadTooLarge(f"expected a request body of at most {limit} bytes (limits.max_json_bytes), got "
                                  f"more ({n} bytes read of a body sent without Content-Length)")
        chunks.append(chunk)
        more = msg.get("more_body", False)
    return b"".join(chunks)


def build_api() -> FastAPI:
    # no /docs or /redoc pages and no open /openapi.json: every route but /health (and the page) needs a
    # key, the schema too (below); a browser's Swagger page could not send one
    api = FastAPI(title="LLaVA-Mini Stream", version="0.3.0", docs_url=None, redoc_url=None, openapi_url=None,
                  description="Questions about live and very long videos, one vision token per frame.")
    metrics = Metrics()
    asking: dict[str, Any] = {}              # `_events` below, for the sockets' questions
    started = int(time.time())               # GET /v1/models' `created`
    api.add_middleware(BoundedBody)          # inside `_count` below: its 413s are counted (no route matched yet)

    # -- errors ---------------------------------------------------------------------------------
    @api.exception_handler(LmsError)
    async def _lms(req: Request, e: LmsError):
        return error_response(e, openai=is_openai_path(req.url.path), param=getattr(e, "param", None))

    @api.exception_handler(RequestValidationError)
    async def _invalid(req: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        ctype = req.headers.get("content-type", "")
        if tuple(first.get("loc", ())) == ("body",) and "json" not in ctype.split(";")[0].lower():
            # the whole body refused and not sent as JSON: FastAPI did not read it as JSON at all
            empty = req.headers.get("content-length", "0" if "transfer-encoding" not in req.headers else "") == "0"
            if ctype:
                got = f"Content-Type {ctype[:80]}"
            else:
                got = "an empty body" if empty else "a body with no Content-Type"
            err = InvalidRequest(f"expected a JSON body (Content-Type: application/json), got {got}")
        elif first.get("type") == "json_invalid":
            pos = first.get("loc", ("body", "?"))[-1]
            err = InvalidRequest(f"expected a JSON body, got invalid JSON (error at position {pos})")
        else:
            err = InvalidRequest(validation_message(first))
        # OpenAI's `param`: the field refused (a model validator names its own; none for a body not JSON)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        param = None if first.get("type") == "json_invalid" else (first.get("ctx") or {}).get("param") or where or None
        return error_response(err, openai=is_openai_path(req.url.path), param=param)

    @api.exception_handler(StarletteHTTPException)
    async def _http(req: Request, e: StarletteHTTPException):
        if e.status_code == 400:             # FastAPI could not parse a body: the body's fault, not the route's
            cause = e.__cause__
            if isinstance(cause, UnicodeDecodeError):
                return error_response(_not_utf8(cause), openai=is_openai_path(req.url.path))
            why = f"{type(cause).__name__}: {cause}" if cause is not None else str(e.detail)
            return error_response(InvalidRequest(f"expected a well-formed request body, got one that could not be "
                                                 f"parsed ({why[:200]})"), openai=is_openai_path(req.url.path))
        code = {404: "E_NOT_FOUND", 405: "E_METHOD_NOT_ALLOWED"}.get(e.status_code, "E_HTTP")
        allow = (e.headers or {}).get("Allow")
        takes = f"; it takes {allow}" if allow else ""
        body = {"code": code, "message": f"expected a route of this API, got {req.method} {req.url.path[:200]} "
                                         f"({e.detail}{takes})"}
        if is_openai_path(req.url.path):
            body.update(type=openai_error_type(e.status_code), param=None)
        return JSONResponse({"error": body}, status_code=e.status_code, headers={"Allow": allow} if allow else None)

    @api.middleware("http")
    async def _count(request: Request, call_next):
        resp = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(resp.status_code)).inc()
        return resp

    # -- auth -------------------------------------------------------------------------------------
    def auth(request: Request) -> Backend:
        b = backend()
        bad = key_error(request.headers.get("authorization", ""), request.query_params.get("token"), b.settings)
        if bad is not None:
            raise bad
        return b

    # -- the web page (no key to load it; the page asks for one and sends it on the socket) -----------
    @api.get("/", include_in_schema=False)
    async def page():
        from fastapi.responses import HTMLResponse
        return HTMLResponse((Path(__file__).parent / "web" / "index.html").read_text())

    # -- health -----------------------------------------------------------------------------------
    @api.get("/health")
    async def health():
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(b: Backend = Depends(auth)):
        if _stopping():                      # a probe takes it out of rotation while questions in flight finish
            return JSONResponse({"ready": False, "redis": None, "model": None, "error": {
                "code": "E_UNAVAILABLE", "message": "expected a running service, got it stopping"}},
                status_code=503, headers={"Retry-After": "5"})
        async def ping() -> bool:            # a hung Redis: its client waits 5 s twice, and /ready took 10 s
            try:                             # on threads of its own: 60 scrapes of /metrics on the shared pool
                return await asyncio.wait_for(_on_own_threads("ping", b.store.ping), READY_MODEL_WAIT_S)
            except asyncio.TimeoutError:
                return False
        pinged = asyncio.ensure_future(ping())
        busy = False
        try:
            # within a probe's usual timeout: a replica that died answers nothing, and the probe gave up first
            models_ok = await asyncio.wait_for(b.models_ready(), READY_MODEL_WAIT_S)
            if models_ok:
                _models_answered()
            redis_ok = await pinged
        except asyncio.TimeoutError:
            redis_ok = await pinged
            # the call queues behind the requests that fill the replicas' slots: a service busy answering said
            # 503. Once the replicas have answered this Ingress, replicas of both roles that reported since
            # it started and in the last 25 s (each reports to Redis on Serve's health check, every 10 s, and
            # after its work) are busy, not gone; a service still starting is not ready on older reports
            models_ok = busy = redis_ok and await asyncio.to_thread(_models_heard_from, b.store.r)
        except Exception:
            models_ok, redis_ok = False, await pinged
        body = {"ready": redis_ok and models_ok, "redis": redis_ok, "model": models_ok,
                **({"busy": True} if busy else {})}
        if not body["ready"]:
            what = " and ".join(n for n, ok in (("Redis", redis_ok), ("a model replica", models_ok)) if not ok)
            body["error"] = {"code": "E_UNAVAILABLE", "message": f"expected {what} to answer, got no answer"}
        # a 503 says when to ask again, as every other 503 of the service does
        return JSONResponse(body, status_code=200 if body["ready"] else 503,
                            headers=None if body["ready"] else {"Retry-After": "5"})

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_schema(b: Backend = Depends(auth)):
        return api.openapi()

    @api.get("/metrics")
    async def prom(b: Backend = Depends(auth)):
        metrics.inflight.set(_questions())
        metrics.connections.set(live_connections())
        data = await _render_shared(metrics, b)
        return PlainTextResponse(data, media_type="text/plain; version=0.0.4")

    # -- videos -----------------------------------------------------------------------------------
    # `max_concurrent_jobs` counts the jobs queued or ingesting (their records in Redis) plus the requests
    # that passed the check and have not created their record yet (an upload being received): both are
    # read and changed under one lock, so requests arriving together cannot all pass a count that none of
    # them has raised yet. An asyncio lock, not Redis: one Ingress replica takes every request (`build_app`
    # runs one; the question limit and the cameras' supervision are per Ingress too), and a Redis-side
    # count over the job records could not be one atomic step on a Redis Cluster (each record hashes to
    # its own slot).
    jobs_lock = asyncio.Lock()
    jobs_reserved = {"n": 0, "uploads": 0}            # slots held by requests still starting; of them, uploads

    async def _reserve_job(b: Backend, upload: bool = False) -> dict:
        """A slot of the job limit for this request (429 `E_BUSY` when none is free), held until `_start`
        creates the job's record or the request fails: `_release_job`. An upload's is held while its bytes
        arrive, and at most `max_uploads_receiving` are: four uploads trickling at 12 KB/s (above
        `upload_min_bytes_per_s`) held every job slot for as long as they liked."""
        lim = b.settings.limits
        _refuse_if_stopping("send the video again")      # its decoder would be stopped at once
        async with jobs_lock:
            active = await asyncio.to_thread(b.store.active)
            held = active + jobs_reserved["n"]
            if held >= lim.max_concurrent_jobs:
                starting = f" ({jobs_reserved['n']} of them starting)" if jobs_reserved["n"] else ""
                raise Busy(f"expected at most {lim.max_concurrent_jobs} video jobs at once, got {held} running"
                           f"{starting}: try again later", retry_after=lim.retry_after_s)
            if upload and jobs_reserved["uploads"] >= lim.max_uploads_receiving:
                raise Busy(f"expected at most {lim.max_uploads_receiving} uploads being received at once, got "
                           f"{jobs_reserved['uploads']} (limits.max_uploads_receiving): try again later, or "
                           "send a path", retry_after=lim.retry_after_s)
            jobs_reserved["n"] += 1
            jobs_reserved["uploads"] += upload
        return {"held": True, "upload": upload}

    def _release_job(slot: dict | None) -> None:
        if slot is not None and slot["held"]:
            slot["held"] = False
            jobs_reserved["n"] -= 1
            jobs_reserved["uploads"] -= slot["upload"]

    @api.post("/v1/videos", status_code=202)
    async def create_video(request: Request, b: Backend = Depends(auth)):
        _refuse_if_stopping("send the video again")
        lim = b.settings.limits
        ctype = request.headers.get("content-type", "")
        job_id = "vid-" + uuid.uuid4().hex[:16]
        slot, path, delete_after = None, None, False
        try:
            if ctype.startswith("multipart/form-data"):
                clen = request.headers.get("content-length")
                if clen and clen.isascii() and clen.isdigit() and int(clen) > lim.max_upload_bytes + 65536:
                    raise PayloadTooLarge(f"expected an upload of at most {lim.max_upload_bytes} bytes, got {clen}")
                slot = await _reserve_job(b, upload=True)   # before the body is read: a refused one sends none
                full = getattr(b.cache, "refuse_if_full", None)
                if full is not None:                 # 2 GB received, then 507 for its record: refused first
                    await asyncio.to_thread(full, "a new video (nothing of the upload was read)")
                path, opts = await _save_upload(request, b, job_id)
                delete_after = True
            elif ctype.startswith("application/json"):
                try:
                    body = VideoCreate.model_validate(await request.json())
                except json.JSONDecodeError as e:
                    raise InvalidRequest(f"expected a JSON body, got invalid JSON ({e.msg} at {e.pos})") from None
                except RecursionError:               # `[[[[...` 100,000 deep: was a 500 and a traceback
                    raise InvalidRequest("expected a JSON body, got one nested too deep to parse") from None
                except Exception as e:
                    from pydantic import ValidationError
                    if isinstance(e, ValidationError):
                        raise RequestValidationError(e.errors()) from None
                    if isinstance(e, ValueError):    # a 5,000-digit number: Python's int limit (was a 500)
                        raise InvalidRequest(f"expected a JSON body Python can read, got {str(e)[:160]}") from None
                    raise
                path = check_allowed(body.path, b.settings.allowed_dirs)
                file_id = await asyncio.to_thread(check_regular_file, path, body.path)
                opts = {"fps": body.fps, "window": body.window, "kv_policy": body.kv_policy, "source": body.path,
                        "retain": _retain(body.retain), "file_id": file_id}
                slot = await _reserve_job(b)
            else:
                raise InvalidRequest(f"expected multipart/form-data (file=) or application/json ({{\"path\"}}), "
                                     f"got content-type {ctype or 'none'!r}")
            return await _start(b, job_id, path, opts, delete_after, slot)
        except BaseException:
            if delete_after and path is not None:    # nothing left behind by a request that failed
                Path(path).unlink(missing_ok=True)
            raise
        finally:
            _release_job(slot)

    async def _start(b: Backend, job_id: str, path: str, opts: dict, delete_after: bool, slot: dict):
        lim = b.settings.limits
        fps = fps_ok(opts.get("fps"), b.settings)
        info = await b.encoder_info()
        job = FileJob(job_id=job_id, path=path, fps=fps, window=opts.get("window"), kv_policy=opts["kv_policy"],
                      retain=opts.get("retain"),
                      size=info["size"], batch=b.settings.encode_batch, max_frames=lim.max_frames_per_job,
                      max_duration_s=lim.max_duration_s, delete_after=delete_after,
                      extra={"source": opts.get("source")}, file_id=opts.get("file_id"))
        async with jobs_lock:                # the record counts from now on, the reservation no longer
            made = asyncio.ensure_future(asyncio.to_thread(
                b.store.create, job_id, {"source": opts.get("source"), "fps": fps, "kv_policy": job.kv_policy,
                                         "window": job.window}))
            try:                             # a client gone meanwhile leaves no "queued" record without a job
                await asyncio.shield(made)
            except asyncio.CancelledError:
                _undo_later(made, lambda: b.store.delete(job_id))
                raise
            _release_job(slot)
        try:
            await b.start_job(job)
        except BaseException:                # a job that could not start holds no slot of the job limit
            await asyncio.to_thread(b.store.delete, job_id)
            raise
        metrics.jobs_started.inc()
        return JSONResponse({"id": job_id, "status": "queued"}, status_code=202)

    @api.get("/v1/videos")
    async def list_videos(b: Backend = Depends(auth)):
        return await _listing(b.store, video_status)

    @api.get("/v1/videos/{vid}")
    async def get_video(vid: str, b: Backend = Depends(auth)):
        _check_id(vid)
        return video_status(await _record(b, "video", vid, "GET /v1/streams/{id}"))

    @api.delete("/v1/videos/{vid}")
    async def delete_video(vid: str, b: Backend = Depends(auth)):
        _check_id(vid)
        d = await _record(b, "video", vid, "DELETE /v1/streams/{id}")
        cancelled = False
        if d["status"] in JobStore.ACTIVE:   # stop its decoder first: nothing of it writes after the delete
            if not await b.cancel_job(vid) and not await _orphaned(b, vid, d):
                raise JobRunning(f"expected a job this service runs to cancel, got video {vid!r} {d['status']} "
                                 "but its decoder not found here (starting, or run by another Ingress): try again")
            cancelled = True                 # (or a record no decoder will ever finish: fenced all the same)
        from frame_cache import StreamNotFound

        def drop():
            try:
                if cancelled:                # fence: a batch still at the Encoder is refused, not stored
                    b.cache.acquire_writer(vid)
                b.cache.delete_stream(vid)
            except StreamNotFound:
                pass
            b.store.delete(vid)
            JobStore.remove_uploads(b.settings.upload_dir, [vid])    # one a stopped decoder left behind
        await asyncio.to_thread(drop)
        return {"id": vid, "deleted": True, "cancelled": cancelled}

    async def _orphaned(b: Backend, vid: str, d: dict) -> bool:
        """A queued/ingesting record with no decoder anywhere, created over `ORPHAN_AFTER_S` ago (one
        younger may be starting on another Ingress): left by a request that ended before its job started."""
        if time.time() - float(d.get("created") or 0) < ORPHAN_AFTER_S:
            return False
        return not await b.job_runs(vid)

    @api.post("/v1/videos/{vid}/questions")
    async def ask_video(vid: str, q: Question, b: Backend = Depends(auth)):
        _check_id(vid)
        d = await _record(b, "video", vid, "POST /v1/streams/{id}/questions")
        req = await _video_question(b, d, lambda gaps: _question_req(b, vid, q.question, q.window, q.last_s, q.policy,
                                                                      q.max_tokens, gaps, q.choices))
        if q.stream:
            return await _sse(b, req, _sse_events)
        return await _json_answer(b, req)

    # -- live streams -------------------------------------------------------------------------------
    def _live(b: Backend) -> LiveStore:
        return b.live

    @api.post("/v1/streams", status_code=201)
    async def create_stream(body: StreamCreate, b: Backend = Depends(auth)):
        retain = _retain(body.retain)
        url = await asyncio.to_thread(check_source, body.source, b.settings.allow_private_sources)
        fps = fps_ok(body.fps, b.settings)
        sid = body.id or "cam-" + uuid.uuid4().hex[:12]      # body.id is checked by the schema
        async with _live_slot(b, sid):
            return await _start_camera(b, body, sid, url, fps, retain)

    async def _start_camera(b: Backend, body: StreamCreate, sid: str, url: str, fps: float, retain):
        ids = await asyncio.to_thread(_live(b).ids)
        if sid in ids:
            from frame_cache import StreamExists
            raise StreamExists(f"expected a new stream id, got {sid!r}, which exists")
        cap = body.capacity_frames or b.settings.limits.live_capacity_frames
        from stream.live import redact_url
        meta = {"source": redact_url(url), "fps": fps}
        if retain is not None:
            meta["retain"] = retain
        await asyncio.to_thread(b.cache.create_stream, sid, cap, meta)
        try:
            await asyncio.to_thread(_live(b).create, sid, {"kind": "rtsp", "source": url, "fps": fps,
                                                          "capacity_frames": cap})
            await b.start_stream(sid, url, fps)
        except BaseException:                # a camera that could not start leaves no stream behind
            await asyncio.to_thread(_drop_stream, b, sid)
            raise
        return JSONResponse({"id": sid, "status": "connecting"}, status_code=201)

    @api.get("/v1/streams")
    async def list_streams(b: Backend = Depends(auth)):
        return await _listing(_live(b), lambda d: _public(stream_status(d)))

    @api.get("/v1/streams/{sid}")
    async def get_stream(sid: str, b: Backend = Depends(auth)):
        _check_id(sid, "stream")
        return _public(stream_status(await _record(b, "stream", sid, "GET /v1/videos/{id}")))

    @api.delete("/v1/streams/{sid}")
    async def delete_stream(sid: str, purge: str = "false", b: Backend = Depends(auth)):
        _check_id(sid, "stream")
        if purge.lower() not in ("true", "false"):    # a destructive flag: not FastAPI's 1 / on / yes
            raise InvalidRequest(f"expected purge=true or purge=false, got purge={purge!r}")
        purge = purge.lower() == "true"
        d = await _record(b, "stream", sid, "DELETE /v1/videos/{id}")
        writer = None
        if d.get("kind") == "rtsp":
            await b.stop_stream(sid)
        elif d.get("status") in LiveStore.ACTIVE:     # a socket's stream: fence its writer, so no frame of
            from frame_cache import StreamNotFound    # it lands after this, and tell the socket (below)
            writer = _writer_of(sid)
            try:
                await asyncio.to_thread(b.cache.acquire_writer, sid)
            except StreamNotFound:
                pass
        await asyncio.to_thread(_live(b).update, sid, status="stopped")
        if purge:
            await asyncio.to_thread(_drop_stream, b, sid)
        if writer is not None:
            await writer.stream_deleted(purge)
        for reader in _attached_to(sid):              # sockets attached to it (read only) are told too
            reader.stream_deleted_attached(purge)
        return {"id": sid, "status": "stopped", "purged": purge}

    @api.post("/v1/streams/{sid}/questions")
    async def ask_stream(sid: str, q: Question, b: Backend = Depends(auth)):
        _check_id(sid, "stream")
        d = await _record(b, "stream", sid, "POST /v1/videos/{id}/questions")
        req = _question_req(b, sid, q.question, q.window, q.last_s, q.policy, q.max_tokens, d.get("gaps") or [],
                            q.choices)
        if q.stream:
            return await _sse(b, req, _sse_events)
        return await _json_answer(b, req)

    @api.post("/v1/streams/{sid}/watches", status_code=201)
    async def create_watch(sid: str, w: WatchCreate, b: Backend = Depends(auth)):
        """A standing question: fused with every frame from now on (at ingest), evaluated every `every_s`
        over the last `last_s`, exactly, from the stored rows; an event when the answer changes."""
        _check_id(sid, "stream")
        await _record(b, "stream", sid, "a video's questions, POST /v1/videos/{id}/questions (a watch is a live "
                      "stream's)")
        b.model_prompt_check(w.question)
        lim = b.settings.limits.max_watches_per_stream
        wid = "w-" + uuid.uuid4().hex[:10]
        have = await asyncio.to_thread(b.watches.add, sid, wid, {"question": w.question, "every_s": w.every_s,
                                                                   "last_s": w.last_s, "last_text": None,
                                                                   "created": time.time()}, lim)
        if have is not None:                               # counted and refused in one step (no race past it)
            raise Busy(f"expected at most {lim} watches of stream {sid!r}, got {have} already (delete one, or raise "
                       "limits.max_watches_per_stream)", retry_after=None)     # waiting does not lift it
        # the Encoder reads a stream's watches at most WatchStore.MAX_AGE_S old: answered once it has them,
        # every frame stored after the 201 is fused with the watch (frames pushed in the second after it
        # were not, and a question over them said "stored before the watch was made")
        await asyncio.sleep(WatchStore.MAX_AGE_S + 0.05)
        return JSONResponse({"id": wid, "stream_id": sid, "question": w.question, "every_s": w.every_s,
                             "last_s": w.last_s}, status_code=201)

    @api.get("/v1/streams/{sid}/watches")
    async def list_watches(sid: str, b: Backend = Depends(auth)):
        _check_id(sid, "stream")
        ws_ = await asyncio.to_thread(b.watches.all, sid)
        if not ws_ and sid not in await asyncio.to_thread(b.cache.streams):   # as every route of an unknown id
            raise NotFound(f"expected a known stream id, got {sid!r}")
        return {"object": "list", "data": [{"id": k, **v} for k, v in sorted(ws_.items())]}

    @api.delete("/v1/streams/{sid}/watches/{wid}")
    async def delete_watch(sid: str, wid: str, b: Backend = Depends(auth)):
        _check_id(sid, "stream")
        if not await asyncio.to_thread(b.watches.remove, sid, wid):
            raise NotFound(f"expected a watch of stream {sid!r}, got unknown id {wid!r}")
        return {"id": wid, "deleted": True}

    @api.post("/v1/streams/{sid}/watches/{wid}/questions")
    async def ask_watch(sid: str, wid: str, q: WatchQuestion, b: Backend = Depends(auth)):
        """The watch's question over any window, exactly, from its rows fused at ingest (no keys/values).
        The body needs no `question` (the watch's own is answered); one that is sent must be the watch's,
        another is refused, not silently ignored, as a policy other than exact is; `stream` gives SSE as
        on the other question routes."""
        _check_id(sid, "stream")
        if q.policy != "exact":
            raise InvalidRequest(f"expected policy 'exact' for a watch's question (its rows are fused with every "
                                 f"frame at ingest, so it is always answered exactly), got {q.policy!r}")
        w = (await asyncio.to_thread(b.watches.all, sid)).get(wid)
        if w is None:
            raise NotFound(f"expected a watch of stream {sid!r}, got unknown id {wid!r}")
        if q.question is not None and q.question.strip() != w["question"].strip():
            raise InvalidRequest(f"expected no question, or the watch's own ({w['question']!r}: a watch answers only "
                                 f"the question fused at ingest), got {q.question!r}")
        d = await asyncio.to_thread(_live(b).get, sid)
        req = _question_req(b, sid, w["question"], q.window, q.last_s, "exact", q.max_tokens, d.get("gaps") or [],
                            q.choices)
        req["watch"] = wid
        if q.stream:
            return await _sse(b, req, _sse_events)
        return await _json_answer(b, req)

    @api.get("/v1/streams/{sid}/events")
    async def events(sid: str, request: Request, after: int = 0, b: Backend = Depends(auth)):
        """Watch events as SSE (`event: event`, `id: SEQ`), from the one after seq `after` (`?after=`, or the
        `Last-Event-ID` header a reconnecting EventSource sends: the larger of the two, so nothing is told
        twice); a comment every 15 s keeps it open. When the stream is purged meanwhile, one `event: error`
        (`E_NOT_FOUND`) ends it, as a new request for the id would be 404."""
        _check_id(sid, "stream")
        last = request.headers.get("last-event-id", "").strip()
        if last:
            if not (last.isascii() and last.isdigit()):
                raise InvalidRequest(f"expected header Last-Event-ID to be an event's seq (an integer >= 0), got "
                                     f"{last[:40]!r}")
            after = max(after, int(last))
        await _record(b, "stream", sid, "GET /v1/videos/{id} (watch events are a live stream's)")

        async def gone() -> bool:
            try:
                await asyncio.to_thread(_live(b).get, sid)
            except NotFound:
                return True
            except LmsError:                 # Redis away for a moment: not known to be gone
                pass
            return False

        async def follow():
            seq, idle, since_check = after, 0.0, 0.0
            while not await request.is_disconnected():
                evs = await asyncio.to_thread(b.watches.events_after, sid, seq)
                for e in evs:
                    seq = e["seq"]
                    yield f"event: event\nid: {seq}\ndata: {json.dumps(e)}\n\n"
                idle = 0.0 if evs else idle + 0.5
                since_check += 0.5
                if since_check >= 2 and not evs:
                    since_check = 0.0
                    if await gone():
                        err = {"code": NotFound.code, "message": f"expected stream {sid!r} to exist, got it deleted "
                                                                 "(DELETE /v1/streams/ID?purge=true): no more events"}
                        yield f"event: error\ndata: {json.dumps(err)}\n\n"
                        return
                if idle >= 15:
                    idle = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(0.5)

        async def gen(place: _EventStream):
            try:
                async for chunk in follow():
                    yield chunk
            finally:                                 # ended: the client went, or the stream was purged
                _event_stream_closed(place)

        if (full := _connections_full(b)) is not None:
            raise Busy(full, retry_after=b.settings.limits.retry_after_s)
        body = gen(_event_stream_opened())           # counted until it ends (or, never started, is freed)
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @api.websocket("/v1/live")
    async def live(ws: WebSocket):
        """Push frames and ask at any time on one socket (DESIGN section 8):

        1. `{"type": "start", "stream_id": null | ID, "fps": 1, "format": "jpeg"}` -> `{"type": "started",
           "stream_id"}`; an existing id is continued (this socket becomes its writer; an older writer
           is fenced off). Optional `"retain": {"exact_s", "kv", "kv_stride"}` (docs/design.md section 9)
           for a new stream.
        2. binary messages, one JPEG/PNG frame each, timestamped by a preceding `{"type": "frame",
           "pts": S}` or by arrival time; sampled at `fps`; `{"type": "ingested", "frames", "last_pts"}`
           when frames are stored (frames waiting behind the one being stored, up to 8, go in one request
           and are acknowledged together); `{"type": "dropped", "frames", "why", "by_reason", "total"}` when
           frames are not stored (sampled out: "over fps", for JPEG and WebM alike; shed: 8 already waiting,
           a bad image, a byte stream's queue full: never an unbounded queue), at most one a second:
           `frames` (and `by_reason`) count the frames since the previous one, `total` those of the whole
           socket; every such frame is reported before `stopped`. The stream's record keeps the shed ones
           as `dropped`, the sampled-out ones as `skipped_by_fps` (`record_counts`), totals over every
           socket that fed the stream (a continued stream's go on from what it had).
        3. `{"type": "ask", "id", "question", "last_s" | "window", "policy", "max_tokens", "choices"}` at any time ->
           `{"type": "token", "id", "text"}` ... `{"type": "answer", "id", ...answer fields}`.
        4. `{"type": "attach", "stream_id"}`: ask about a stream someone else feeds (read only); a video's id
           too, its questions then answered as `POST /v1/videos/{id}/questions` answers them.
        5. `{"type": "stop"}` -> `{"type": "stopped", "frames"}`, close 1000. Errors: `{"type": "error",
           "code", "message"}`; a message over the limit closes 1009, bad credentials 1008.
        A disconnect cancels the session's questions and releases its writer; frames taken are stored and stay,
        messages not taken yet are left (the socket is read apart from their handling, `_read`); more than
        `max_ws_backlog_bytes` sent ahead of what is taken closes it 1009 (over the limit, as a message over
        `max_ws_message_bytes`; 1008 stays bad credentials).
        `DELETE /v1/streams/ID` of the stream a socket feeds: `{"type": "error", "code": "E_STREAM_STOPPED"}`,
        close 1000. Questions are admitted and measured as the HTTP routes' (`_events`).
        """
        b = current_backend()            # a module function: closures here are shipped to Ray by value
        await ws.accept()
        if b is None:
            await ws.close(code=1011)
            return
        bad = key_error(ws.headers.get("authorization", ""), ws.query_params.get("token"), b.settings)
        if bad is not None:
            await ws.close(code=1008, reason=bad.args[0].replace("(Authorization: Bearer KEY)",
                                                              "(?token= or Authorization)"))
            return
        if (full := _connections_full(b)) is not None:     # 256 idle sockets held every request of the Ingress
            await ws.close(code=1013, reason=full)            # 1013: try again later
            return
        sess = _LiveSession(b, ws, asking["events"])
        _session_opened(sess, True)
        try:
            await sess.run()
        finally:
            _session_opened(sess, False)
            await sess.release()

    # -- OpenAI-compatible ------------------------------------------------------------------------
    def model_card(info: dict) -> dict:
        return {"id": info["model"], "object": "model", "created": started, "owned_by": "lmstream"}

    @api.get("/v1/models")
    async def models(b: Backend = Depends(auth)):
        return {"object": "list", "data": [model_card(await b.encoder_info())]}

    @api.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str, b: Backend = Depends(auth)):
        info = await b.encoder_info()
        model_id = model_id.rstrip("/")                # /v1/models/demo/ as /v1/models/demo
        if not model_id:                               # /v1/models/ (Starlette redirected it to the list)
            return await models(b)
        if model_id != info["model"]:
            raise NotFound(f"expected model {info['model']!r} (GET /v1/models), got {model_id[:200]!r}")
        return model_card(info)

    @api.post("/v1/chat/completions")
    async def chat(body: ChatRequest, b: Backend = Depends(auth)):
        info = await b.encoder_info()
        if body.model is not None and body.model != info["model"]:     # as vLLM: a model it does not serve
            raise NotFound(f"expected model {info['model']!r} (GET /v1/models), got {body.model!r}")
        try:
            question, ref = _chat_parts(body)
        except InvalidRequest as e:
            e.param = "messages"                       # OpenAI's `param`: the message names the part
            raise
        kind, sid, window, last_s = ref
        # lms://videos/ID names a video and lms://streams/ID a stream, as the question routes read them
        max_tokens = body.max_completion_tokens or body.max_tokens      # None: `_question_req`'s default
        sampling = {}
        if body.temperature is not None and body.temperature > 0:
            sampling = {"do_sample": True, "temperature": body.temperature, "top_p": body.top_p or 1.0,
                        "seed": body.seed}
        if sampling and body.lmstream_choices is not None:
            raise InvalidRequest("expected either lmstream_choices or a temperature above 0, got both")

        def req_of(gaps):
            return _question_req(b, sid, question, window, last_s, body.lmstream_policy or "exact", max_tokens, gaps,
                                 body.lmstream_choices)
        if kind == "videos":                 # as its questions route: ready, or what a failed job stored
            req = await _video_question(b, await _record(b, "video", sid, "lms://streams/{id}"), req_of)
        else:                                # a live stream: its outage gaps, as its questions route says
            req = req_of((await _record(b, "stream", sid, "lms://videos/{id}")).get("gaps") or [])
        req["sampling"] = sampling
        model = info["model"]
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        stops = body.stop_strings()
        if stops:
            req["stop"] = stops                # generation ends at the first one complete (usage counts up to it)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _sse(b, req, lambda evs: _chat_chunks(evs, cid, created, model, stops, usage), "chat")
        ans = await _collect(b, req, "chat")
        text, cut = cut_at_stop(ans["text"], stops)
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop" if cut else ans["finish_reason"], "logprobs": None}],
                "usage": chat_usage(ans), "lmstream": ans}

    # -- helpers ----------------------------------------------------------------------------------
    def _admit(b: Backend):
        lim = b.settings.limits
        _refuse_if_stopping("ask again")     # the answers in flight finish; new ones go to the next start
        if _questions() >= lim.max_queued_questions:
            raise Busy(f"expected at most {lim.max_queued_questions} questions queued at once, got "
                       f"{_questions()} queued already: try again later", retry_after=lim.retry_after_s)
        _questions(+1)

    async def _events(b: Backend, req: dict, kind: str):
        """A question's events, the one path every question takes (HTTP JSON or SSE, chat, the `/v1/live`
        socket): admitted against `max_queued_questions` when first iterated (429 `E_BUSY` past it), and
        measured: time to the first token, tokens, tokens/s, and `lms_questions_total{kind}` once
        answered. The HTTP routes await the first event before a response starts, so an error can still
        become an HTTP status."""
        _admit(b)                            # here, not before: a generator never started holds no slot
        t0 = time.perf_counter()
        n = 0
        first = None
        extra = req.get("answer_extra")      # fields the answer carries beside the model's (a failed job's status)
        agen = None
        try:                                 # the slot is given back whatever happens from here (a handle that
            agen = b.answer_events({k: v for k, v in req.items() if k != "answer_extra"})   # raised kept it)
            async for ev in agen:
                if ev["type"] == "token":
                    n += 1
                    if first is None:
                        first = time.perf_counter() - t0
                        metrics.ttft.observe(first)
                elif ev["type"] == "answer":
                    if first is None:        # an answer with no token (`choices`): its time counts too
                        first = time.perf_counter() - t0
                        metrics.ttft.observe(first)
                    metrics.questions.labels(kind).inc()
                    if extra:
                        ev = {**ev, **extra}
                elif ev["type"] == "error":
                    ev = client_error_dict(ev)
                yield ev
        finally:
            _questions(-1)
            metrics.tokens.inc(n)
            if first is not None and n > 1:
                metrics.tps.set((n - 1) / max(time.perf_counter() - t0 - first, 1e-6))
            if agen is not None:
                await agen.aclose()

    async def _first(b: Backend, req: dict, kind: str):
        it = _events(b, req, kind).__aiter__()
        try:
            ev = await it.__anext__()
        except StopAsyncIteration:
            raise ServiceUnavailable("expected an answer from the model replica, got nothing") from None
        if ev["type"] == "error":
            await it.aclose()
            raise _status_error(ev)
        return ev, it

    async def _collect(b: Backend, req: dict, kind: str = "json") -> dict:
        ev, it = await _first(b, req, kind)
        try:
            while ev["type"] != "answer":
                if ev["type"] == "error":
                    raise _status_error(ev)
                ev = await it.__anext__()
        finally:
            await it.aclose()
        return {k: v for k, v in ev.items() if k != "type"}

    async def _json_answer(b: Backend, req: dict):
        return await _collect(b, req, "json")

    async def _sse(b: Backend, req: dict, fmt, kind: str = "stream"):
        ev, it = await _first(b, req, kind)

        async def chain():
            yield ev
            async for e in it:
                yield e

        async def body():
            try:
                async for chunk in fmt(chain()):
                    yield chunk
            finally:
                await it.aclose()
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    asking["events"] = _events               # the `/v1/live` socket's questions take the same path
    return api


async def _video_question(b: Backend, d: dict, req_of) -> dict:
    """A question's request over video record `d` (`req_of(gaps)` makes it): a ready video, or what a job
    still ingesting or one that failed has stored, its answer then carrying `job` (its status, progress) and
    the span not stored in `gaps`; an ingesting job's answer reads the frames stored when the question came
    (`until`), so that span is the one missing from it. The video question routes' and a `/v1/live`
    socket's attached to a video."""
    newest, stored = None, None
    if d["status"] != "ready":
        from frame_cache import StreamNotFound
        try:
            info = await asyncio.to_thread(b.cache.stream_info, d["id"])
            newest, stored = info.newest_pts, info.count
        except StreamNotFound:
            stored = 0
    require_answerable(d, stored)
    gaps, job = video_answer_context(d, newest)
    req = req_of(gaps)
    if job is not None:
        req["answer_extra"] = {"job": {**job, "frames": max(job["frames"], stored or 0)}}
        if d["status"] == "ingesting":
            req["until"] = newest
    return req


async def _record(b: Backend, kind: str, rid: str, use: str) -> dict:
    """The record of video (file job) or stream (live) `rid`. 404 when there is none, saying so when `rid` is
    the other kind: `use` is how that kind is asked about ("lms://streams/{id}")."""
    store, other, other_store = (b.store, "stream", b.live) if kind == "video" else (b.live, "video", b.store)
    try:
        return await asyncio.to_thread(store.get, rid)
    except NotFound:
        try:
            await asyncio.to_thread(other_store.get, rid)
        except NotFound:
            raise NotFound(f"expected a known {kind} id, got {rid!r}") from None
        raise NotFound(f"expected a {kind} id, got {rid!r}, which is a {other}: use {use.format(id=rid)}") from None


async def _listing(store: JobStore, shape) -> dict:
    """An OpenAI-style list of a store's records (jobs or live streams), each shaped by `shape`;
    records deleted while listing are left out."""
    out = []
    for rid in await asyncio.to_thread(store.ids):
        try:
            out.append(shape(await asyncio.to_thread(store.get, rid)))
        except NotFound:
            pass
    return {"object": "list", "data": out}


def _status_error(ev: dict) -> LmsError:
    e = LmsError(ev["message"], code=ev["code"])
    e.http_status = int(ev.get("status", 500))
    return e


def default_max_tokens(b: Backend) -> int:
    """A question's `max_tokens` when the client sends none: 64, or the service's limit when that is lower
    (a limit of 4 refused every question that left it out: "expected max_tokens <= 4, got 64")."""
    return min(64, b.settings.limits.max_tokens)


def _question_req(b: Backend, sid, question, window, last_s, policy, max_tokens, gaps, choices=None) -> dict:
    """A question's request for `Backend.answer_events`, checked against the limits first (the HTTP
    routes and the WebSocket's ask alike): max_tokens, the question's length, the policy, choices (a bad
    policy: the library's `E_BAD_ARGUMENT`, which `client_error` makes 422 where the client is told).
    `max_tokens` None: `default_max_tokens`."""
    lim = b.settings.limits
    max_tokens = default_max_tokens(b) if max_tokens is None else max_tokens
    if max_tokens > lim.max_tokens:
        raise InvalidRequest(f"expected max_tokens <= {lim.max_tokens}, got {max_tokens}")
    if len(question) > lim.max_question_chars:
        raise PayloadTooLarge(f"expected a question of at most {lim.max_question_chars} characters, "
                              f"got {len(question)}")
    from lmcore.policy import FusionPolicy
    FusionPolicy.parse(policy)
    req = {"stream_id": sid, "question": question, "window": list(window) if window else None,
           "last_s": last_s, "policy": policy, "max_tokens": max_tokens, "gaps": gaps}
    return _with_choices(req, lim, choices)


def _with_choices(req: dict, lim, choices) -> dict:
    """`req` with a question's candidate answers, stripped, when it has them (their number is checked
    by the schema: 2 to MAX_CHOICES); none may be blank, all together no longer than a question."""
    if choices is None:
        return req
    for i, c in enumerate(choices):
        if not c.strip():
            raise InvalidRequest(f"expected every choice to be non-empty text, got choice {i} blank")
    n = sum(len(c) for c in choices)
    if n > lim.max_question_chars:
        raise PayloadTooLarge(f"expected choices of at most {lim.max_question_chars} characters in all, got {n}")
    return {**req, "choices": [c.strip() for c in choices]}


#: ids of live streams whose start passed the limit and has not ended (`_live_slot`), and the lock their check
#: and count share (one Ingress takes every request, as for `max_concurrent_jobs`)
_LIVE_STARTING: "collections.Counter[str]" = collections.Counter()
_LIVE_LOCKS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]" = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def _live_slot(b: "Backend", sid: str):
    """A slot of `max_live_streams` for stream `sid` starting (a camera's POST, a socket's `start`), held until
    the block ends. 429 when that many streams are fed now (connecting, live, stalled, reconnecting) or
    starting, and `sid` is not one of them: stopped and failed streams keep their frames, not a slot. The
    check and the count are one step (8 sockets starting at once all passed a limit of 2), and a stream is
    counted once, whether its record already counts or it is still starting."""
    lock = _LIVE_LOCKS.setdefault(asyncio.get_running_loop(), asyncio.Lock())    # an asyncio lock is one loop's
    lim = b.settings.limits
    async with lock:
        fed = set(await asyncio.to_thread(b.live.active_ids)) | set(_LIVE_STARTING)
        if sid not in fed and len(fed) >= lim.max_live_streams:
            raise Busy(f"expected at most {lim.max_live_streams} live streams fed at once, got {len(fed)} "
                       "(stop one, or raise limits.max_live_streams)", retry_after=lim.retry_after_s)
        _LIVE_STARTING[sid] += 1
    try:
        yield
    finally:
        _LIVE_STARTING[sid] -= 1
        if _LIVE_STARTING[sid] <= 0:
            del _LIVE_STARTING[sid]


def _drop_stream(b: "Backend", sid: str) -> None:
    """A stream's frames, status record, watches and events, gone (blocking)."""
    from frame_cache import StreamNotFound
    try:
        b.cache.delete_stream(sid)
    except StreamNotFound:
        pass
    b.live.delete(sid)
    b.watches.forget(sid)


#: What an id may be (`frame_cache.STREAM_ID_PATTERN`), in words.
ID_RULE = "1-128 characters from [A-Za-z0-9._:-]"


def _check_id(rid: str, kind: str = "video") -> None:
    """An id in a route's path. One that cannot exist is 404 like one that does not (the URL names no
    resource, as a route this API does not have is 404), not 422: a path is not a request value."""
    from frame_cache import STREAM_ID_PATTERN
    if STREAM_ID_PATTERN.fullmatch(rid) is None:
        raise NotFound(f"expected a {kind} id of {ID_RULE}, got {rid!r}")


def _request_id(value, field: str) -> str:
    """An id inside a request (a socket message's field): 422 naming the field when it cannot be one."""
    from frame_cache import STREAM_ID_PATTERN
    if not isinstance(value, str) or STREAM_ID_PATTERN.fullmatch(value) is None:
        raise InvalidRequest(f"expected {field} of {ID_RULE}, got {json.dumps(value)}")
    return value


async def _sse_events(events):
    async for ev in events:
        kind = ev["type"]
        data = {k: v for k, v in ev.items() if k != "type"}
        yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"


def _held_back(text: str, stops: list[str]) -> int:
    """How many of `text`'s last characters may begin a stop string (kept back from a streamed delta until
    the next token says whether they do)."""
    return max((k for x in stops for k in range(min(len(x) - 1, len(text)), 0, -1) if x.startswith(text[-k:])),
               default=0)


def chat_usage(ans: dict) -> dict:
    """OpenAI's `usage`: the LLM's input (the question's text and one token per frame: the answer's
    `llm_tokens`) and the tokens it generated (up to the one completing a `stop` string, where it stopped)."""
    n = len(ans["token_ids"])
    return {"prompt_tokens": ans["llm_tokens"], "completion_tokens": n, "total_tokens": ans["llm_tokens"] + n}


async def _chat_chunks(events, cid: str, created: int, model: str, stops: list[str] = (), usage: bool = False):
    """`chat.completion.chunk`s: the role, the text (held back while it may begin a `stops` string, cut before
    one), the finish with the answer's fields under `lmstream`, with `usage` one more chunk of no choices
    (OpenAI's `stream_options.include_usage`; then every chunk carries `"usage": null`), `[DONE]`."""
    stops = list(stops)

    def chunk(delta: dict | None, finish=None, extra=None):
        d = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                   "logprobs": None}]}
        if usage:
            d["usage"] = None
        if extra:
            d.update(extra)
        return f"data: {json.dumps(d)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    sent, pending, stopped = False, "", False
    async for ev in events:
        if ev["type"] == "token":
            if stopped or not ev["text"]:
                continue                       # the engine stops at a stop string: nothing comes after it
            pending, stopped = cut_at_stop(pending + ev["text"], stops)
            keep = 0 if stopped else _held_back(pending, stops)
            out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
            if out:
                sent = True
                yield chunk({"content": out})
        elif ev["type"] == "answer":
            ans = {k: v for k, v in ev.items() if k != "type"}
            # an answer read from choices has no tokens: its text comes in the last delta, so a client
            # that joins the deltas' content gets it
            rest, cut = cut_at_stop(pending if sent or pending else ans.get("text") or "", stops)
            yield chunk({"content": rest} if rest else {}, "stop" if cut or stopped else ans["finish_reason"],
                        {"lmstream": ans})
            if usage:
                yield chunk(None, extra={"usage": chat_usage(ans)})
        elif ev["type"] == "error":
            err = {"code": ev["code"], "message": ev["message"], "type": openai_error_type(ev.get("status", 500)),
                   "param": None}
            yield f"data: {json.dumps({'error': err})}\n\n"
            break
    yield "data: [DONE]\n\n"


def _chat_parts(body: ChatRequest):
    """(question text, (kind, id, window, last_s)): the question is the last user message's text; the video
    the last video_url part of the user messages (the last one's, or an earlier turn's, so that a follow-up
    question may leave it out)."""
    users = [(i, m) for i, m in enumerate(body.messages) if m.role == "user"]
    if not users:
        raise InvalidRequest("expected a user message, got none")
    parts = [_user_parts(m.content, i) for i, m in users]
    refs = [ref for _, ref in parts if ref is not None]
    question = " ".join(t for t in parts[-1][0] if t.strip()).strip()
    last = users[-1][0]
    if not question:
        raise InvalidRequest(f"expected the question as text in the last user message (messages[{last}]), got "
                             "none")
    if not refs:
        raise InvalidRequest("expected a video_url part (lms://videos/ID or lms://streams/ID) in a user message, "
                             "got none")
    return question, refs[-1]


def _user_parts(content, i: int):
    """A user message's (text parts, the lms:// reference of its video_url part or None)."""
    if isinstance(content, str):
        return [content], None
    if content is None:
        raise InvalidRequest(f"expected messages[{i}].content to be text or a list of text and video_url parts, "
                             "got null")
    texts, refs = [], []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        t = part.get("type") if isinstance(part, dict) else None
        if t == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"expected {where}.text to be a string, got {json.dumps(text)[:80]}")
            texts.append(text)
        elif t == "video_url":
            v = part.get("video_url")
            if not isinstance(v, dict):
                raise InvalidRequest(f"expected {where}.video_url to be an object {{\"url\": \"lms://videos/ID\"}}, "
                                     f"got {json.dumps(v)[:120]}")
            refs.append(_parse_lms_url(v.get("url"), where))
        else:
            raise InvalidRequest(f"expected content parts of type text or video_url, got {json.dumps(t)} at {where}")
    if len(refs) > 1:
        raise InvalidRequest(f"expected at most one video_url part in messages[{i}] (lms://videos/ID), got "
                             f"{len(refs)}")
    return texts, refs[0] if refs else None


def _parse_lms_url(url, where: str):
    if not isinstance(url, str):
        raise InvalidRequest(f"expected {where}.video_url.url to be a string, got {json.dumps(url)[:120]}")
    try:
        u = urlparse(url)
    except ValueError:                                 # an unclosed '[' ("Invalid IPv6 URL")
        u = None
    parts = [p for p in (u.netloc + u.path).split("/") if p] if u is not None else []
    if u is None or u.scheme != "lms" or len(parts) != 2 or parts[0] not in ("videos", "streams"):
        raise InvalidRequest(f"expected video_url lms://videos/ID or lms://streams/ID, got {url!r} (the service "
                             "never fetches other URLs)")
    q = parse_qs(u.query, keep_blank_values=True)
    unknown = sorted(set(q) - {"start", "end", "last_s"})
    if unknown:
        raise InvalidRequest(f"expected only start, end or last_s in {url!r}'s query, got {', '.join(unknown)}")
    nums = {}
    for k, v in q.items():
        try:
            x = float(v[0]) if len(v) == 1 else math.nan
        except ValueError:
            x = math.nan
        if not math.isfinite(x):
            raise InvalidRequest(f"expected {k} in {url!r} to be one finite number of seconds, got "
                                 f"{', '.join(v) or 'nothing'}")
        nums[k] = x
    if "last_s" in nums and ("start" in nums or "end" in nums):
        raise InvalidRequest(f"expected at most one of start/end and last_s in {url!r}, got both")
    if ("start" in nums) != ("end" in nums):
        raise InvalidRequest(f"expected both start and end in {url!r} (a window [start, end) in seconds), got only "
                             f"{'start' if 'start' in nums else 'end'}")
    window = (nums["start"], nums["end"]) if "start" in nums else None
    if window is not None and not 0 <= window[0] < window[1]:
        raise InvalidRequest(f"expected 0 <= start < end in {url!r}, got start {window[0]:g} and end {window[1]:g}")
    last_s = nums.get("last_s")
    if last_s is not None and last_s <= 0:
        raise InvalidRequest(f"expected last_s > 0 seconds in {url!r}, got {last_s:g}")
    from frame_cache import STREAM_ID_PATTERN
    if STREAM_ID_PATTERN.fullmatch(parts[1]) is None:     # a value of the request: 422, as a window's
        raise InvalidRequest(f"expected video_url.url lms://{parts[0]}/ID with an ID of {ID_RULE}, got {url!r}")
    return parts[0], parts[1], window, last_s


#: An upload's form fields beside `file` (docs/service.md, `POST /v1/videos`); any other name is refused.
UPLOAD_FIELDS = ("fps", "window", "kv_policy", "retain")


async def _save_upload(request: Request, b: Backend, job_id: str):
    """Stream a multipart upload straight into the upload folder as it arrives (never spooled to
    /tmp, never held in memory); 413 as soon as the file passes the limit; a rejected upload
    leaves no file behind. Small form fields (fps, window, kv_policy) are read beside it."""
    from python_multipart.multipart import MultipartParser, parse_options_header
    lim = b.settings.limits
    b.settings.upload_dir.mkdir(parents=True, exist_ok=True)
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidRequest("expected a multipart/form-data body with a boundary, got none")
    st: dict[str, Any] = {"fields": {}, "name": None, "filename": None, "headers": {}, "hfield": b"",
                          "hvalue": b"", "buf": b"", "out": None, "dest": None, "size": 0, "error": None}

    def on_header_field(data, start, end):
        st["hfield"] += data[start:end]

    def on_header_value(data, start, end):
        st["hvalue"] += data[start:end]

    def on_header_end():
        st["headers"][st["hfield"].decode("latin-1").lower()] = st["hvalue"]
        st["hfield"], st["hvalue"] = b"", b""

    def on_headers_finished():
        _, p = parse_options_header(st["headers"].get("content-disposition", b""))
        st["name"] = p.get(b"name", b"").decode("utf-8", "replace")
        fn = p.get(b"filename")
        st["filename"] = None if fn is None else fn.decode("utf-8", "replace")
        st["buf"] = b""
        if st["error"] is not None:
            return
        if st["name"] != "file" and st["name"] not in UPLOAD_FIELDS:    # said at once, before its bytes
            if st["filename"] is not None:                            # curl -F other=@v.mp4
                st["error"] = InvalidRequest(f"expected the video in form field 'file' (curl -F file=@VIDEO), got "
                                             f"it in field {st['name']!r}")
            else:
                st["error"] = InvalidRequest(f"expected form fields among file, {', '.join(UPLOAD_FIELDS)}, got "
                                             f"{st['name']!r}")
            return
        if st["name"] == "file":          # with a filename (curl -F file=@v.mp4) or without (-F file=<v.mp4)
            if st["out"] is not None:
                st["error"] = InvalidRequest("expected one file= part, got several")
                return
            ext = os.path.splitext(st["filename"] or "")[1][:10]
            ext = ext if ext[1:].isalnum() else ""
            st["dest"] = b.settings.upload_dir / f"{job_id}{ext}"
            st["out"] = open(st["dest"], "wb")
            st["file_name"] = st["filename"]   # the file part's own: a field after it (-F fps=1) has none

    def on_part_data(data, start, end):
        if st["error"] is not None:
            return
        chunk = data[start:end]
        if st["name"] == "file" and st["out"] is not None:
            st["size"] += len(chunk)
            if st["size"] > lim.max_upload_bytes:
                st["error"] = PayloadTooLarge(f"expected an upload of at most {lim.max_upload_bytes} bytes, got more")
                return
            st["out"].write(chunk)
        else:
            st["buf"] += chunk
            if len(st["buf"]) > 4096:
                st["error"] = InvalidRequest(f"expected form field {st['name']!r} of at most 4096 bytes, got more")

    def on_part_end():
        if st["name"] != "file" and st["name"]:
            st["fields"][st["name"]] = st["buf"].decode("utf-8", "replace").strip()
        st["headers"] = {}

    parser = MultipartParser(boundary, {"on_header_field": on_header_field, "on_header_value": on_header_value,
                                        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
                                        "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        try:
            chunks = request.stream().__aiter__()
            t0, got = time.monotonic(), 0
            while True:
                try:                               # the job slot is held while the body comes: not for ever
                    chunk = await asyncio.wait_for(chunks.__anext__(), lim.upload_idle_timeout_s)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise InvalidRequest(f"expected the upload's next bytes within upload_idle_timeout_s="
                                         f"{lim.upload_idle_timeout_s:g} s, got none for that long (after "
                                         f"{st['size']} bytes of the file)") from None
                got += len(chunk)
                took = time.monotonic() - t0       # a byte just inside each idle timeout held the slot for good
                if took > lim.upload_idle_timeout_s and got < lim.upload_min_bytes_per_s * took:
                    raise InvalidRequest(f"expected an upload of at least {lim.upload_min_bytes_per_s:g} bytes/s on "
                                         f"average (limits.upload_min_bytes_per_s), got {got} bytes in {took:.0f} s")
                parser.write(chunk)
                if st["error"] is not None:
                    raise st["error"]
            parser.finalize()
        except LmsError:
            raise
        except Exception as e:                     # a malformed body
            raise InvalidRequest(f"expected a well-formed multipart body, got {type(e).__name__}: {e}") from None
        if st["out"] is None:
            got = ", ".join(repr(k) for k in st["fields"])
            raise InvalidRequest(f"expected a multipart field file= holding the video, got "
                                 f"{'only ' + got if got else 'no field'}")
        st["out"].close()
        if st["size"] == 0:                            # a file chosen that is empty: what a path job says of one
            if st.get("file_name"):
                from lmcore.errors import NotAVideo
                raise NotAVideo(f"expected a video file, got an empty file {st['file_name'][:200]!r} (0 bytes)")
            raise InvalidRequest("expected a non-empty file=, got 0 bytes")   # a form sent with no file chosen
        f = st["fields"]
        opts: dict[str, Any] = {"source": st.get("file_name"), "kv_policy": f.get("kv_policy") or "exact"}
        if opts["kv_policy"] not in ("exact", "fp8"):
            raise InvalidRequest(f"expected kv_policy exact or fp8, got {opts['kv_policy']!r}")
        if f.get("retain"):
            opts["retain"] = _retain(f["retain"])
        if f.get("fps"):
            try:
                opts["fps"] = float(f["fps"])
            except ValueError:
                raise InvalidRequest(f"expected fps to be a number, got {f['fps']!r}") from None
            fps_ok(opts["fps"], b.settings)
        if f.get("window"):
            try:
                s0, e0 = (float(x) for x in f["window"].split(","))
            except ValueError:
                raise InvalidRequest(f"expected window as START,END seconds, got {f['window']!r}") from None
            if not (math.isfinite(s0) and math.isfinite(e0)):
                raise InvalidRequest(f"expected window as START,END finite seconds, got {f['window']!r}")
            if not 0 <= s0 < e0:
                raise InvalidRequest(f"expected window with 0 <= START < END, got {f['window']!r}")
            opts["window"] = (s0, e0)
        return str(st["dest"]), opts
    except BaseException:
        if st["out"] is not None:
            st["out"].close()
        if st["dest"] is not None:
            st["dest"].unlink(missing_ok=True)
        raise


def check_source(url: str, allow_private: bool) -> str:
    """Only rtsp:// and rtsps:// URLs, and no loopback/private/link-local host unless allowed (the camera
    checks the address again before each connection: `stream.live.RtspSource(allow_private=...)`)."""
    from stream.live import check_rtsp_url, redact_url
    try:
        u = urlparse(url)
        u.port                                         # raises for a port that is no number or over 65535
    except ValueError as e:                            # "Invalid IPv6 URL" (an unclosed '['), the port
        raise InvalidRequest(f"expected source rtsp://HOST[:PORT]/PATH or rtsps://..., got {redact_url(url)!r} "
                             f"({str(e).lower()})") from None
    if u.scheme not in ("rtsp", "rtsps") or not u.hostname:
        raise InvalidRequest(f"expected source rtsp://HOST[:PORT]/PATH or rtsps://..., got {redact_url(url)!r}")
    try:                                               # the camera's own check: spaces and control characters
        url = check_rtsp_url(url)                      # (urlparse drops some: a 201, then a crash-looping actor),
    except BadArgument as e:                           # port 0; RTSP:// given as rtsp://, as FFmpeg needs it
        raise client_error(e) from None
    try:                                               # what getaddrinfo (and the camera's FFmpeg) would do
        u.hostname.encode("idna")
    except UnicodeError as e:                          # a label over 63 characters, an empty one (a..b), ...
        from stream.live import host_name_fault
        raise InvalidRequest(f"expected a host name, got {u.hostname[:80]!r}, which cannot be one "
                             f"({host_name_fault(e)})") from None
    if not allow_private:                              # loopback, private, link-local, shared (100.64/10)...
        from stream.live import refuse_private
        try:
            refuse_private(u.hostname, must_resolve=True)
        except BadArgument as e:
            raise client_error(e) from None
    return url


def _public(d: dict) -> dict:
    from stream.live import redact_url                 # the cameras' own: one redaction for messages and records
    d = dict(d)
    if isinstance(d.get("source"), str):
        d["source"] = redact_url(d["source"])
    return d


#: The `/v1/live` sockets of this Ingress that feed a stream, by stream id (the newest writer): a
#: `DELETE /v1/streams/ID` tells its socket the stream was stopped and closes it. Routes read it through
#: `_writer_of`: Serve ships `build_api`'s closures by value, with copies of the globals they name.
_WRITERS: "dict[str, _LiveSession]" = {}
log = logging.getLogger("lms.routes")

#: A byte stream's demuxer waits this long for room in its queue (frames being stored) before shedding one
PUSH_WAIT_FOR_ROOM_S = 30.0

#: How long `/ready` waits for the model replicas' answer (it waited 10 s, past a readiness probe's 1-5 s).
READY_MODEL_WAIT_S = 3.0
#: A replica that reported on Serve's health check (every 10 s) this recently counts as alive for `/ready`.
READY_HEARD_WITHIN_S = 25.0


#: when this Ingress process started, and whether its model replicas have answered `/ready` since
_MODELS = {"started": time.time(), "answered": False}


def _models_answered() -> None:
    _MODELS["answered"] = True


def _models_heard_from(r) -> bool:
    """Whether, the replicas having answered this Ingress once, an Encoder and an Answerer replica both
    reported within `READY_HEARD_WITHIN_S` and since this Ingress started (`ReplicaStats`: a restarted
    service, or a new pod of a rolling update, must not read the last run's reports as its own)."""
    from deploy.serving import ReplicaStats
    if not _MODELS["answered"]:
        return False
    try:
        _, roles = ReplicaStats.read(r, within_s=READY_HEARD_WITHIN_S, since=_MODELS["started"])
    except LmsError:
        return False
    return all(roles.get(role, {}).get("replicas", 0) > 0 for role in ("encoder", "answerer"))

#: a job record this old with no decoder actor anywhere is an orphan `DELETE /v1/videos/ID` removes
ORPHAN_AFTER_S = 10.0
#: clean-ups of work a cancelled request left running (kept referenced until they end)
_UNDOING: "set[asyncio.Task]" = set()


def _undo_later(fut: "asyncio.Future", undo: Callable[[], object]) -> None:
    """Once `fut` (a thread's work that a cancelled request no longer awaits) ends well, run `undo` in a thread."""
    async def run():
        try:
            await fut
        except BaseException:                          # noqa: BLE001 - nothing was made
            return
        try:
            await asyncio.to_thread(undo)
        except Exception:                              # noqa: BLE001 - an orphan DELETE removes it
            log.warning("could not undo the work of a cancelled request", exc_info=True)
    task = asyncio.get_running_loop().create_task(run())
    _UNDOING.add(task)
    task.add_done_callback(_UNDOING.discard)


def _check_continued_retain(cache, sid: str | None, meta: dict) -> None:
    """A socket's `start` with `retain` of an existing stream: its `retain` must be the one given (its other
    meta, such as the `fps` it was first started at, need not match: a client that reconnects at another rate
    was refused, in terms of "meta"). A different `retain` is refused, in these words: a stream's frames keep
    what its `retain` said when it was created. (`create_stream` checks it again, atomically.)"""
    from frame_cache import StreamNotFound
    if sid is None:
        return
    try:
        old = cache.stream_info(sid).meta
    except StreamNotFound:
        return
    if (old or {}).get("retain") != meta["retain"]:
        raise InvalidRequest(f"expected retain {json.dumps((old or {}).get('retain'))} for existing stream {sid!r} "
                             f"(fixed when it was created; leave it out to continue the stream), got "
                             f"{json.dumps(meta['retain'])}")


def _writer_of(sid: str) -> "_LiveSession | None":
    return _WRITERS.get(sid)


#: The `/v1/live` sockets of this Ingress attached to a stream (read only), by stream id: a `DELETE
#: /v1/streams/ID` tells them too. Read through `_attached_to`, as `_WRITERS`.
_ATTACHED: "dict[str, set[_LiveSession]]" = {}
#: Every open `/v1/live` socket of this Ingress (`close_live_sockets` tells them when the service stops); the
#: routes change it through `_session_opened`, as `_WRITERS` through its functions.
_SESSIONS: "set[_LiveSession]" = set()


def _session_opened(sess: "_LiveSession", is_open: bool) -> None:
    (_SESSIONS.add if is_open else _SESSIONS.discard)(sess)


class _EventStream:
    """One watch-event SSE body's place among the Ingress's long-lived connections."""


#: the watch-event SSE bodies of this Ingress still open (`GET /v1/streams/{id}/events`): each body's place is
#: given back when it ends (`_event_stream_closed`, its `finally`), or, for a body never started, when it is
#: freed (a weak set). Freed alone, a body that ended could hold its place for as long as the cyclic garbage
#: collector took to reach it: a clean-clone CI run saw a closed stream still counted 10 s later
_EVENT_STREAMS: "weakref.WeakSet" = weakref.WeakSet()


def _event_stream_opened() -> _EventStream:
    place = _EventStream()
    _EVENT_STREAMS.add(place)
    return place


def _event_stream_closed(place: _EventStream) -> None:
    _EVENT_STREAMS.discard(place)


def live_connections() -> int:
    """Open `/v1/live` sockets and watch-event streams of this Ingress: what `limits.max_live_connections`
    bounds (each holds one of the Ingress's requests at once for as long as it is open)."""
    return len(_SESSIONS) + len(_EVENT_STREAMS)


def _connections_full(b: "Backend") -> str | None:
    """Why one more long-lived connection is refused (`limits.max_live_connections` reached), or None; short
    enough for a WebSocket close reason (at most 123 bytes)."""
    lim, n = b.settings.limits.max_live_connections, live_connections()
    if n < lim:
        return None
    return f"expected at most {lim} open sockets and event streams, got {n}: close one (limits.max_live_connections)"


#: questions queued or running in this Ingress (one API per Ingress process), and whether it is stopping
#: (`drain_for_stop`: new questions and jobs are 503 from then on). Read and changed only through module
#: functions (`_questions`, `_refuse_if_stopping`): Serve pickles `build_api`'s routes by value, so a dict
#: they held directly would be a copy, and the drain read a count that stayed 0.
_INFLIGHT = {"n": 0}
_STOPPING = {"on": False}


def _questions(delta: int = 0) -> int:
    """The count of questions queued or running, after adding `delta`."""
    _INFLIGHT["n"] += delta
    return _INFLIGHT["n"]


def _refuse_if_stopping(then: str) -> None:
    if _STOPPING["on"]:
        raise ServiceUnavailable(f"expected a running service, got it stopping: {then} once it is back")


def _stopping() -> bool:
    return _STOPPING["on"]


async def drain_for_stop(deadline_s: float = 30.0) -> dict:
    """The service is stopping (`lmstream serve` on SIGTERM or Ctrl-C, before Serve shuts down): new questions
    and video jobs are refused (503 `E_UNAVAILABLE`, `Retry-After`; `/ready` 503 too), open `/v1/live` sockets
    store what they received, are told and closed 1001 (`close_live_sockets`), and the HTTP questions in
    flight may finish (they were cut with no response at all); all of it within `deadline_s`. Returns
    {"sockets": open sockets told, "questions": questions still going when it stopped waiting}."""
    _STOPPING["on"] = True
    loop = asyncio.get_running_loop()
    t_end = loop.time() + deadline_s
    told = await close_live_sockets(deadline_s)
    while _INFLIGHT["n"] > 0 and loop.time() < t_end:
        await asyncio.sleep(0.05)
    return {"sockets": told, "questions": _INFLIGHT["n"]}


async def close_live_sockets(timeout: float = 20.0) -> int:
    """The service is stopping (`lmstream serve` on SIGTERM or Ctrl-C, before Serve shuts down): every open
    socket stores the frames it received, is told `E_UNAVAILABLE` in words and closed 1001 ("going away").
    They were cut with no close frame (1006), which reads as a network fault, not a planned stop. Returns how
    many were open."""
    sessions = list(_SESSIONS)
    if sessions:
        await asyncio.wait([asyncio.create_task(s.service_stopping()) for s in sessions], timeout=timeout)
    return len(sessions)


def _attached_to(sid: str) -> "list[_LiveSession]":
    return list(_ATTACHED.get(sid, ()))

_IMAGE_POOLS: "dict[bool, ThreadPoolExecutor]" = {}


async def _decode_pushed(data: bytes, size: int | None):
    """A pushed JPEG/PNG frame decoded off the event loop, on threads of their own, not the default executor's
    (every `asyncio.to_thread` of the Ingress shares it: a few sockets of big pictures held every worker, and
    Redis calls stalled behind them). Pictures over `BIG_PICTURE_PIXELS` (read from the header) go to a pool
    of 2 threads, so at most two are decoded at once, and never hold up the small ones' pool of 4."""
    big = picture_pixels(data) > BIG_PICTURE_PIXELS         # its header only: microseconds
    if big not in _IMAGE_POOLS:
        _IMAGE_POOLS[big] = ThreadPoolExecutor(2 if big else 4, thread_name_prefix="lms-image-" + "sb"[big])
    return await asyncio.get_running_loop().run_in_executor(_IMAGE_POOLS[big], decode_image, data, size)


#: Frames a `/v1/live` socket may have waiting behind the one being stored; more are dropped
#: ("encoder busy"). Waiting frames go to the Encoder together, as one request.
LIVE_QUEUE_FRAMES = 8


class _LiveSession:
    """One `/v1/live` socket's state; see `live` in `build_api` for the protocol."""

    def __init__(self, b, ws: WebSocket, events):
        self.b, self.ws, self.events = b, ws, events        # events: `_events` of `build_api`
        self.sid: str | None = None
        self.writer = False
        self.token: int | None = None
        self.seq = 0
        self.fps = 1.0
        self.sampler: FrameSampler | None = None
        self.pending_pts: float | None = None
        self.t0 = time.monotonic()
        self.offset = 0.0
        self.frames = 0
        self.dropped = {"over fps": 0, "encoder busy": 0, "bad frame": 0}
        self.why0: dict[str, int] = {}                # the stream's counts before this socket (`record_counts`)
        self.skipped0 = 0
        self.reported: dict[str, int] = {}            # of `dropped`, what `dropped` messages have said so far
        self.push_seen: dict[str, int] = {}           # of a byte stream's PushSource counts, what is told
        self.last_dropped_msg = 0.0
        self.drop_timer: asyncio.Task | None = None    # reports drops of the current second when it ends
        self.last_why = ""
        self.busy = False
        self.queue: list = []                          # frames waiting while the Encoder has earlier ones
        self.tasks: set[asyncio.Task] = set()             # answers and event followers: cancelled at the end
        self.asking: dict[asyncio.Task, Any] = {}        # answers still going on -> the ask's id
        self.open_ids: set[str] = set()                  # ask ids (as JSON) whose answer or error is not sent yet
        self.drains: set[asyncio.Task] = set()            # frames on their way to the ring: waited for
        self._pool: ThreadPoolExecutor | None = None
        self.send_lock = asyncio.Lock()
        self.size: int | None = None
        self.closed = False
        self.gone = asyncio.Event()                    # no more messages read: the client went away, or was closed
        self.backlog = 0                               # bytes received and not taken yet (`_read`)
        self.ending = False                            # the client's `stop` is being handled
        self.stopping = False                          # `service_stopping`: no frame taken from then on
        self.push = None                               # PushSource for webm/mp4 byte streams
        self.push_told: dict | None = None             # its last_error as last told on the socket
        self.kept_error: dict | None = None            # the record's last_error this socket set (cleared by a
                                                       # stored frame, then the record's previous_error)
        self.gaps_base: list = []                      # the stream's gaps when this socket started (+ its outage)
        self.gaps: list = []                           # ... and those of this socket: what the record holds
        self.loss_gaps: list = []                      # spans where this socket lost frames it had to store
        self.last_stored: float | None = None          # pts of the stream's newest stored frame
        self.lost: list[float] = []                    # pts of frames lost since then (shed, undecodable)
        self.consumer = None
        self.close_task: asyncio.Task | None = None    # a delete's close of the socket

    async def send(self, msg: dict, last: bool = False) -> None:
        if self.closed and not last:
            return
        async with self.send_lock:
            try:
                await self.ws.send_text(json.dumps(msg))
            except Exception:              # the socket went away: the receive loop ends it
                self.closed = True

    async def error(self, e: BaseException, qid: str | None = None, last: bool = False) -> None:
        await self.send_error(error_dict(client_error(e) if isinstance(e, LmsError) else e), qid, last)

    async def send_error(self, d: dict, qid: str | None = None, last: bool = False) -> None:
        """`d` (an error's dict, an answer's error event) as the protocol's `{"type": "error", "code",
        "message"}` (with the question's `id`): nothing else of it, no HTTP status."""
        msg = {"type": "error", "code": d["code"], "message": d["message"]}
        if qid is not None:
            msg["id"] = qid
        await self.send(msg, last)

    async def _receive(self) -> dict | None:
        """The client's next message, None once it has gone."""
        try:
            msg = await self.ws.receive()
        except (WebSocketDisconnect, RuntimeError):
            return None
        return None if msg["type"] == "websocket.disconnect" else msg

    async def _read(self, inbox: asyncio.Queue) -> None:
        """Task: the client's messages into `inbox` as they come, None after the last. The socket is read
        apart from their handling, so that (1) what it sends ahead of what is taken is bounded
        (`limits.max_ws_backlog_bytes`: Serve's proxy queues every message unread, and a client that sent
        300 MB in 10 s grew the Ingress by 360 MB), and (2) a client that goes away is seen at once: its byte
        stream is stopped and the messages not taken yet are left (a WebM socket whose client had gone kept
        storing its backlog for 22 minutes, holding its slots)."""
        lim = self.b.settings.limits
        try:
            while True:
                if (msg := await self._receive()) is None:
                    if self.push is not None and not self.ending:   # a chunk waiting for room gives up now
                        self.push.stop()                # (after `stop`, its flush goes on: release waits)
                    return
                data, text = msg.get("bytes"), msg.get("text")
                size = len(data) if data is not None else len((text or "").encode())
                if size > lim.max_ws_message_bytes:
                    reason = f"expected messages of at most {lim.max_ws_message_bytes} bytes, got {size}"
                    await self.ws.close(code=1009, reason=reason)
                    self.closed = True
                    return
                if self.backlog and self.backlog + size > lim.max_ws_backlog_bytes:
                    mib = lim.max_ws_backlog_bytes / (1 << 20)
                    await self.ws.close(code=1009, reason=f"expected at most {mib:g} MiB sent ahead of what is taken, "
                                                          "got more: wait for ingested (max_ws_backlog_bytes)")
                    self.closed = True
                    if self.push is not None:
                        self.push.stop()
                    return
                self.backlog += size
                inbox.put_nowait((msg, size))
        finally:
            inbox.put_nowait(None)
            self.gone.set()

    async def run(self) -> None:
        inbox: asyncio.Queue = asyncio.Queue()
        reader = asyncio.create_task(self._read(inbox))
        try:
            await self._handle(inbox)
        finally:
            reader.cancel()

    async def _handle(self, inbox: asyncio.Queue) -> None:
        while True:
            if (item := await inbox.get()) is None or self.gone.is_set():
                return                                 # gone: what it sent and was not taken is left
            msg, size = item
            self.backlog -= size
            data, text = msg.get("bytes"), msg.get("text")
            try:
                if text is not None:
                    if await self.on_text(text):
                        return
                elif data is not None:
                    await self.on_frame(data)
            except LmsError as e:
                await self.error(e)
            except Exception as e:                     # noqa: BLE001 - our fault: told, and the socket goes on
                log.exception("live socket %s: a message failed", self.sid)
                await self.error(e)

    async def on_text(self, text: str) -> bool:
        try:
            m = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"expected a JSON message, got invalid JSON ({e.msg})") from None
        if not isinstance(m, dict) or not isinstance(m.get("type"), str):
            raise InvalidRequest(f"expected a JSON object with a type, got {text[:80]!r}")
        t = m["type"]
        if t == "start":
            await self.start(m)
        elif t == "frame":
            if not self.writer:
                raise InvalidRequest("expected {\"type\": \"start\"} before frames, got a frame message")
            pts = m.get("pts")
            if not isinstance(pts, (int, float)) or isinstance(pts, bool) or not (pts >= 0 and pts < 1e9):
                raise InvalidRequest(f"expected frame pts as seconds >= 0 and under 1e9, got {pts!r}")
            self.pending_pts = float(pts)
        elif t == "ask":
            await self.ask(m)
        elif t == "attach":
            sid = _request_id(m.get("stream_id"), "attach.stream_id")
            if self.writer:
                raise InvalidRequest(f"expected attach on a socket that is not streaming, got one streaming to "
                                     f"{self.sid!r} (ask about another stream on a second socket)")
            if sid not in await asyncio.to_thread(self.b.cache.streams):
                raise NotFound(f"expected a known stream id to attach to, got {sid!r}")
            self._detach()
            self.sid, self.writer = sid, False
            _ATTACHED.setdefault(sid, set()).add(self)
            info = await asyncio.to_thread(self.b.cache.stream_info, sid)
            await self.send({"type": "attached", "stream_id": sid, "frames": info.count,
                             "kind": await self._kind(sid)})
            self._follow_events()
        elif t == "stop":
            self.ending = True
            if self.push is not None:                  # flush a byte stream's last frames first
                await self._end_push(lambda: self.push.close(10.0), 60)
                self._count_push_drops()               # what the flush shed: told below with the rest
                await self._tell_push_error()          # bytes that only the end showed were no stream
            await self._flush()                        # frames received and waiting in line are stored
            await self._finish_answers()               # and questions asked are answered
            if self.drop_timer is not None:
                self.drop_timer.cancel()
                self.drop_timer = None
            await self.report_drops()                  # every shed frame is told before the reply
            if self._owns():                           # and the record says so once the client hears `stopped`
                await self._mark_stopped()
            await self.send({"type": "stopped", "stream_id": self.sid, "frames": self.frames,
                             "dropped": sum(self.dropped.values())})
            if not self.closed and self.close_task is None:   # a delete closed it already
                try:
                    await self.ws.close(code=1000)
                except (RuntimeError, WebSocketDisconnect):
                    pass
            self.closed = True
            return True
        else:
            raise InvalidRequest(f"expected type start, frame, ask, attach or stop, got {t!r}")
        return False

    async def start(self, m: dict) -> None:
        b = self.b
        if self.writer:
            raise InvalidRequest(f"expected one start per socket, got another (streaming to {self.sid!r})")
        if self.sid is not None:
            raise InvalidRequest(f"expected start on a socket that is not attached, got one attached to "
                                 f"{self.sid!r} (stream on a second socket)")
        fmt = m.get("format", "jpeg")
        if fmt not in ("jpeg", "png", "webm", "mp4"):
            raise InvalidRequest(f"expected format jpeg, png, webm or mp4, got {fmt!r}")
        self.fps = fps_ok(m.get("fps"), b.settings)
        sid = m.get("stream_id")
        live = b.live
        if sid is not None:
            _request_id(sid, "start.stream_id")
            try:
                await asyncio.to_thread(b.store.get, sid)
            except NotFound:
                pass
            else:
                raise InvalidRequest(f"expected a live stream's id to start, got {sid!r}, which is a video (ask "
                                     "about it with attach, or start a stream of another id)")
        # a stream fed now (and taken over) holds its slot; this one's is held from the check until its record
        # says "connecting" (sockets starting together all passed a check none of them had counted in yet)
        sid = sid or "live-" + uuid.uuid4().hex[:12]
        async with _live_slot(b, sid):
            await self._begin(b, m, sid, fmt, live)

    async def _begin(self, b: Backend, m: dict, sid: str, fmt: str, live) -> None:
        """`start`'s work once the stream has a slot: its frames, its record, this socket as its writer."""
        cap = b.settings.limits.live_capacity_frames
        meta = None
        if m.get("retain") is not None:
            meta = {"source": "websocket", "fps": self.fps, "retain": _retain(m["retain"])}
            await asyncio.to_thread(_check_continued_retain, b.cache, sid, meta)
        # found or created in one step, the existing stream's meta compared on retain alone: a stream purged
        # after the check above is created again with this retain, not bare
        info = await asyncio.to_thread(b.cache.create_stream, sid, cap, meta, True, match=("retain",))
        try:
            await asyncio.to_thread(live.get, sid)
        except NotFound:
            await asyncio.to_thread(live.create, sid, {"kind": "push", "source": "websocket", "fps": self.fps,
                                                       "capacity_frames": info.capacity})
        self.token = await asyncio.to_thread(b.cache.acquire_writer, sid)
        # the counts of the stream's earlier sockets go on: read once the older writer is fenced (its frames
        # are refused from now on, so it writes no newer counts but those of a frame stored before this)
        before = await asyncio.to_thread(live.get, sid)
        self.why0, self.skipped0 = carried_counts(before)
        info = await asyncio.to_thread(b.cache.stream_info, sid)
        self._check_token(sid, info)
        self.seq = info.total_appended
        # a continued stream's time goes on with the wall clock, as a camera's after a restart: this socket's
        # times (arrival times, a byte stream's, `frame` pts) count from its start, placed after the stream's
        # newest frame by the time no socket fed it; that outage is one of the stream's gaps
        self.offset, outage = continued_timeline(info.newest_pts, newest_wall(before), self.fps)
        self.gaps_base = merge_gaps([*(g for g in before.get("gaps") or [] if g[1] is not None),
                                     *([outage] if outage else [])])
        self.gaps = list(self.gaps_base)
        self.last_stored = info.newest_pts
        if outage is not None:
            await asyncio.to_thread(live.update, sid, gaps=self.gaps)
        self.sid, self.writer = sid, True
        _WRITERS[sid] = self                           # an older writer of the stream (fenced now) is not told
        self.sampler = FrameSampler(self.fps)
        self.size = (await b.encoder_info())["size"]
        if fmt in ("webm", "mp4"):                     # a byte stream: demuxed as it comes, sampled at fps
            from stream.live import PushSource
            # held back, not shed: a file pushed faster than real time is demuxed as fast as its frames are
            # stored, and this socket read no faster (its chunks waited in a queue of 4 frames and half a
            # 10-frame file was shed `queue full`); frames are shed only when none is stored for 30 s
            self.push = PushSource(fps=self.fps, resize_to=self.size, max_queue=4,
                                   wait_for_room_s=PUSH_WAIT_FOR_ROOM_S)
            loop = asyncio.get_running_loop()
            # its own threads: the consumer blocks for the socket's life and a chunk's push while frames are
            # stored, which in the default executor would take a worker from every asyncio.to_thread of this
            # Ingress (a few such sockets starved them all)
            self._pool = ThreadPoolExecutor(2, thread_name_prefix=f"lms-push-{sid[:20]}")
            self.consumer = loop.run_in_executor(self._pool, self._consume, loop)
        # "connecting" (and no last_wall) until a frame is stored: `stream_status` shows live / stalled from then;
        # not by a socket fenced meanwhile (taken over or deleted): that record is no longer this socket's
        try:
            self._check_token(sid, await asyncio.to_thread(b.cache.stream_info, sid))
        except StaleWriter:
            self._fenced()
            raise
        # (`fps` too: a stream continued at another rate shows this socket's)
        await asyncio.to_thread(live.update, sid, status="connecting", fps=self.fps)
        await self.send({"type": "started", "stream_id": sid})
        self._follow_events()

    async def _kind(self, sid: str) -> str:
        """"video" for a file job's id, else "stream" (a camera's or a socket's, or frames with no record)."""
        try:
            await asyncio.to_thread(self.b.live.get, sid)
            return "stream"
        except NotFound:
            pass
        try:
            await asyncio.to_thread(self.b.store.get, sid)
            return "video"
        except NotFound:
            return "stream"

    def _check_token(self, sid: str, info) -> None:
        if info.writer != self.token:
            raise StaleWriter(f"expected to be the writer of stream {sid!r} (epoch {self.token}), got it taken "
                              f"over (epoch {info.writer}) while starting: start again to take it back")

    def _consume(self, loop) -> None:
        """Thread: frames the PushSource demuxed -> the Encoder, one at a time (its queue is bounded)."""
        for f in self.push:                            # (its arrival: the stream's lag_s, as a JPEG socket's)
            fut = asyncio.run_coroutine_threadsafe(
                self._encode_now(f.rgb, f.pts + self.offset, self.push.yielded_arrival), loop)
            try:
                fut.result()
            except Exception:                          # noqa: BLE001 - reported on the socket already
                pass

    async def _encode_now(self, rgb, pts: float, t_arrive: float | None = None) -> None:
        self.busy = True
        await self.encode(rgb, pts, t_arrive)

    async def on_frame(self, data: bytes) -> None:
        if self.stopping:                              # the service is stopping: told so, nothing more taken
            return
        if not self.writer:
            raise InvalidRequest("expected {\"type\": \"start\"} before frames, got a frame")
        if self.push is not None:                      # a WebM/fMP4 chunk
            try:
                await asyncio.get_running_loop().run_in_executor(self._pool, self.push.push_stream, data)
            except LmsError as e:
                err = self.push.last_error or client_error_dict(e.to_dict())
                if err == self.push_told:              # the same unreadable stream chunk after chunk: told once
                    return
                self.push_told = err
                await self._keep_push_error(err)
                raise                                  # told by `run`, which gets it next
            await self._tell_push_error()
            why = self._count_push_drops()
            if why is not None:
                await self.note_drop(why)
            return
        t_arrive = time.monotonic()
        pts = self.pending_pts if self.pending_pts is not None else t_arrive - self.t0
        self.pending_pts = None
        if self.sampler.last is not None and pts + self.offset <= self.sampler.last:   # time went back
            self.dropped["bad frame"] += 1
            await self.error(InvalidRequest(f"expected frame pts after {self.sampler.last - self.offset:g} s (the "
                                            f"last frame taken at this fps, stored or shed), got {pts:g}"))
            return await self.note_drop("bad frame")
        pts += self.offset
        if not self.sampler.want(pts):
            self.dropped["over fps"] += 1
            return await self.note_drop("over fps")
        if self.busy and len(self.queue) >= LIVE_QUEUE_FRAMES:   # shed load: never queue without bound
            self.dropped["encoder busy"] += 1
            self.lost.append(pts)
            return await self.note_drop("encoder busy")
        try:
            rgb = await _decode_pushed(data, self.size)
        except LmsError as e:
            self.dropped["bad frame"] += 1
            self.lost.append(pts)
            await self.error(e)                        # why it was shed, then counted with the other shed frames
            return await self.note_drop("bad frame")
        if self.busy:                                   # the Encoder has the previous frames: wait in line
            self.queue.append((rgb, pts, t_arrive))
            return
        self.busy = True
        task = asyncio.create_task(self._drain([(rgb, pts, t_arrive)]))
        self.drains.add(task)
        task.add_done_callback(self.drains.discard)

    async def _drain(self, batch: list) -> None:
        """Store `batch`, then whatever queued meanwhile as one request, until the queue is empty:
        frames stay in order (one request at a time) and a slow round trip batches instead of shedding."""
        try:
            while batch:
                await self.encode_many(batch)
                batch, self.queue = self.queue, []
        except BaseException:
            # frames this task held are not stored: counted and told, not thrown away unsaid (a socket that
            # closes meanwhile is told nothing more, but its record counts them)
            left = [*batch, *self.queue]
            if left:
                self._not_stored(left)
                try:
                    await self.note_drop("not stored")
                except Exception:                      # noqa: BLE001 - the socket is gone
                    pass
            raise
        finally:
            self.queue = []
            self.busy = False

    def _not_stored(self, frames: list) -> None:
        """Frames the Encoder did not store (it refused them, or could not be reached): shed, counted under
        "not stored", and a span of the stream without frames once a stored one follows."""
        self.dropped["not stored"] = self.dropped.get("not stored", 0) + len(frames)
        self.lost += [f[1] for f in frames]

    async def _tell_push_error(self) -> None:
        """The byte stream's error its demuxer met between pushes or at the end (a stream it could not read:
        FFmpeg says so only once it has seen enough bytes, or at `close`), told once on the socket and kept
        as the stream's `last_error`."""
        err = self.push.last_error
        if not err or err == self.push_told:
            return
        self.push_told = err
        await self.send_error(client_error_dict(err))
        await self._keep_push_error(err)

    async def _keep_push_error(self, err: dict) -> None:
        """The byte stream's error as the stream's `last_error` (cleared once frames flow)."""
        if self._owns():
            try:
                await asyncio.to_thread(self.b.live.update, self.sid, last_error=err)
                self.kept_error = err
            except LmsError:
                pass

    async def _keep_store_error(self, err: dict) -> None:
        """The Encoder did not store frames (a full cache: `E_CACHE_BUDGET`; the Encoder unreachable): the
        record says so now, as the stream's `last_error` (cleared once frames are stored again), with the frames
        shed counted and the span without frames so far in its gaps. It said `stalled` with no error, nothing
        dropped and no gap for as long as frames were refused, and a question then answered `gaps: []`."""
        if not self._owns() or err.get("code") == "E_CACHE_UNAVAILABLE":    # Redis away: no record to write
            return
        before = self.gaps
        try:
            await asyncio.to_thread(self.b.live.update, self.sid, last_error=err, **self.record_counts(),
                                    **self._gaps_update(pending=True))
            self.kept_error = err
        except LmsError:
            self.gaps = before                         # not written: the next update writes them

    #: a byte stream's reasons (`stream.live.PushSource.dropped_why`) in this socket's words
    PUSH_REASONS = {"over_fps": "over fps", "queue_full": "queue full", "pts_backwards": "bad frame",
                    "decode_error": "bad frame"}

    def _count_push_drops(self) -> str | None:
        """Adds the frames the byte stream's PushSource skipped by sampling (`skipped_by_fps`, told as "over
        fps", as a JPEG socket's) or shed since the last look to `dropped`, under their reasons; returns the
        last new reason, a shed one before "over fps" (None: nothing new)."""
        last = None
        now = {"over_fps": self.push.skipped_by_fps, **self.push.dropped_why}     # "over fps" first: see above
        for k, v in now.items():
            new = v - self.push_seen.get(k, 0)
            if new > 0:
                last = self.PUSH_REASONS.get(k, k.replace("_", " "))
                self.dropped[last] = self.dropped.get(last, 0) + new
        self.push_seen = now
        return last

    async def note_drop(self, why: str) -> None:
        """A frame was shed (counted in `dropped` already): told now, or, within a second of the last
        `dropped` message, by a timer when that second ends, together with whatever is shed meanwhile."""
        self.last_why = why
        wait = self.last_dropped_msg + 1.0 - time.monotonic()
        if wait <= 0:
            if self.drop_timer is not None:           # overdue but not yet run: this message says it all
                self.drop_timer.cancel()
                self.drop_timer = None
            await self.report_drops()
        elif self.drop_timer is None:
            async def later():
                await asyncio.sleep(wait)
                self.drop_timer = None
                await self.report_drops()
            self.drop_timer = asyncio.create_task(later())
            self.tasks.add(self.drop_timer)
            self.drop_timer.add_done_callback(self.tasks.discard)

    async def report_drops(self) -> None:
        """One `dropped` message for the frames shed since the last one (none: no message). So the
        `frames` of all of a socket's `dropped` messages add up to its `stopped` message's `dropped`."""
        new = {k: v - self.reported.get(k, 0) for k, v in self.dropped.items() if v > self.reported.get(k, 0)}
        if not new:
            return
        self.reported = dict(self.dropped)             # before the await: a timer and a drop never tell twice
        self.last_dropped_msg = time.monotonic()
        why = self.last_why if self.last_why in new else max(new, key=new.get)
        await self.send({"type": "dropped", "frames": sum(new.values()), "why": why, "by_reason": new,
                         "total": sum(self.dropped.values())})

    def record_counts(self) -> dict:
        """The stream's counts as its record keeps them: `dropped` / `dropped_why` the frames shed (encoder
        busy, bad frame, queue full), `skipped_by_fps` those sampled out, each the stream's total: what it
        had when this socket started (earlier sockets that fed it, `carried_counts`) plus this socket's.
        The socket's `dropped` messages tell both of its own (a client pushing faster than fps learns it);
        the record, as a camera's, calls sampling no loss."""
        shed = dict(self.why0)
        for k, v in self.dropped.items():
            if k != "over fps" and v:
                shed[k] = shed.get(k, 0) + v
        return {"dropped": sum(shed.values()), "dropped_why": shed,
                "skipped_by_fps": self.skipped0 + self.dropped["over fps"]}

    async def encode(self, rgb, pts: float, t_arrive: float | None = None) -> None:
        try:
            await self.encode_many([(rgb, pts, t_arrive)])
        finally:
            self.busy = False

    async def encode_many(self, frames: list) -> None:
        """Store frames [(rgb, pts, t_arrive)] in one request; t_arrive (monotonic, or None) gives the
        stream's ingest lag (the oldest frame's arrival -> stored)."""
        import numpy as np
        pts = frames[-1][1]
        arrivals = [t for _, _, t in frames if t is not None]
        t_arrive = min(arrivals) if arrivals else None
        try:
            item = EncodeItem(self.sid, np.stack([f[0] for f in frames]), [f[1] for f in frames], writer=self.token,
                              seq=self.seq)
            try:
                res = (await self.b.encode([item]))[0]
            except StaleWriter:
                raise
            except LmsError as e:                      # the Encoder (or the way to it) failed: nothing stored
                res = {"error": error_dict(e)}
            except Exception as e:                     # noqa: BLE001 - it ended this socket's sending task
                res = {"error": {"code": "E_INTERNAL", "message": f"expected the Encoder to store frames "
                                 f"{frames[0][1]:g}-{pts:g} s, got {type(e).__name__}: {str(e)[:200]}"}}
            if "error" in res:
                err = res["error"]
                if err.get("code") == StaleWriter.code:
                    self._fenced()
                    await self.send_error(client_error_dict(err))
                    return
                self._not_stored(frames)               # counted, and a span of the stream without frames
                err = client_error_dict(err)
                if (self.kept_error or {}).get("code") != err.get("code"):
                    await self.send_error(err)         # told once while it goes on (a full Redis refused every
                                                       # frame: an error each), the `dropped` messages go on
                await self._keep_store_error(err)
                await self.note_drop("not stored")
                return
            self.seq += len(res["seqs"])
            self.frames += len(res["seqs"])
            self._close_loss([f[1] for f in frames])
            first = frames[0][1]
            if self.last_stored is not None and first - self.last_stored > LiveStore.push_stall_s(self.fps):
                # a pause as long as the record's `stalled` (the client sent nothing, the socket open): a span
                # of the stream without frames, as a camera's stall is
                self.loss_gaps = merge_gaps([*self.loss_gaps, [self.last_stored, first]])
            self.last_stored = pts
            lag = {"lag_s": round(time.monotonic() - t_arrive, 3)} if t_arrive is not None else {}
            cleared = {}
            if self.kept_error is not None:        # frames flow again: the error that stopped them is history
                cleared, self.kept_error = {"last_error": None, "previous_error": self.kept_error}, None
            if self.writer:                        # not once fenced or told of a delete: the record is another's
                await asyncio.to_thread(self.b.live.update, self.sid, frames=self.seq, last_pts=pts,
                                        **self.record_counts(), **lag, **cleared, **self._gaps_update())
            await self.send({"type": "ingested", "frames": self.frames, "last_pts": pts})
        except LmsError as e:
            if isinstance(e, StaleWriter):
                self._fenced()
            await self.error(e)

    def _close_loss(self, stored: list[float] | None) -> None:
        """Frames were lost (shed, undecodable, refused by the Encoder): each lost frame that a stored one now
        follows makes the span from the stored frame before it to the stored frame after it one of the stream's
        gaps. `stored`: the pts just stored (frames queued before a shed one are stored before it: a lost
        frame waits for a stored frame after it); None at the end: every lost frame, to one sampling period
        after it."""
        if not self.lost:
            return
        keep, gaps = [], []
        for p in self.lost:
            after = [t for t in stored or () if t > p]
            if stored is not None and not after:
                keep.append(p)                          # no stored frame after it yet
                continue
            before = [t for t in [*(stored or ()), self.last_stored] if t is not None and t < p]
            gaps.append([max(before) if before else p, min(after) if after else p + 1.0 / self.fps])
        self.lost = keep
        if gaps:
            self.loss_gaps = merge_gaps([*self.loss_gaps, *gaps])

    def _gaps_update(self, pending: bool = False) -> dict:
        """{"gaps": ...} for the record when this socket's losses or its byte stream's gaps (queue full,
        damage: `PushSource.gaps`, in its own time) changed them, else {}. `pending` (frames just refused): the
        frames lost with no stored frame after them yet, from the last stored frame to the newest of them, as
        far as no frame still waits to be stored before them (frames queued may yet be stored: a gap over them
        would be taken back)."""
        pushed = [[a + self.offset, b + self.offset] for a, b in self.push.gaps] if self.push is not None else []
        waiting = min((f[1] for f in self.queue), default=None)
        lost = [p for p in self.lost if waiting is None or p < waiting] if pending else []
        if lost:
            first = min(lost)
            start = self.last_stored if self.last_stored is not None and self.last_stored < first else first
            lost = [[start, max(lost)]]
        gaps = merge_gaps([*self.gaps_base, *self.loss_gaps, *pushed, *lost])
        if len(gaps) > MAX_RECORD_GAPS:                # bounded: past it, touching gaps are given as one
            gaps = merge_gaps(gaps, touching=True)
        if gaps == self.gaps:
            return {}
        self.gaps = gaps
        return {"gaps": gaps}

    def _fenced(self) -> None:
        """Another socket (or a DELETE) took the stream over: this one writes nothing of it from now on, its
        stop or end marks no record stopped and frees no slot of the new writer's."""
        self.writer = False
        self._unlist()

    def _unlist(self) -> None:
        """No longer this Ingress's writer of its stream (`_WRITERS`): a DELETE does not tell this socket."""
        if self.sid is not None and _WRITERS.get(self.sid) is self:
            del _WRITERS[self.sid]

    def _owns(self) -> bool:
        return self.writer and self.sid is not None and _WRITERS.get(self.sid) is self

    def _follow_events(self) -> None:
        """Watch events of this socket's stream arrive as {"type": "event", ...} messages."""
        async def follow(sid: str):
            seq = None
            while not self.closed and self.sid == sid:
                try:
                    evs = await asyncio.to_thread(self.b.watches.events_after, sid, seq or 0)
                    if seq is None:                    # only events from now on
                        seq = evs[-1]["seq"] if evs else 0
                    else:
                        for e in evs:
                            seq = e["seq"]
                            await self.send({**e, "type": "event"})
                except LmsError:
                    pass
                await asyncio.sleep(0.5)
        task = asyncio.create_task(follow(self.sid))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    #: How long `stop` waits for the socket's questions still being answered before it cuts them off.
    STOP_ANSWER_WAIT_S = 120.0

    async def ask(self, m: dict) -> None:
        qid = m.get("id")
        key = None if qid is None else json.dumps(qid, sort_keys=True)
        if key in self.open_ids:
            # two answers under one id could not be told apart: their tokens would interleave. Told without
            # the id: an error with it would read as the end of the question still being answered
            await self.error(InvalidRequest(f"expected an id not in use by a question still being answered, got "
                                            f"{key[:80]} (this ask is not answered)"))
            return
        lim = self.b.settings.limits.max_asks_per_socket
        if len(self.asking) >= lim:                    # a share of the service's question slots, not all of them
            await self.error(Busy(f"expected at most {lim} questions of one socket waiting or being answered, got "
                                  f"{len(self.asking)} already (limits.max_asks_per_socket): ask again once one is "
                                  "answered", retry_after=None), qid)
            return
        if key is not None:
            self.open_ids.add(key)                     # until its answer or error is sent (`answer`)
        task = asyncio.create_task(self.answer(m, qid, key))
        self.tasks.add(task)
        self.asking[task] = qid
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(lambda t: self.asking.pop(t, None))

    async def _finish_answers(self) -> None:
        """`stop`'s wait for the questions still being answered (each ends with its answer or error before
        `stopped`); one not done in `STOP_ANSWER_WAIT_S` is cut off and told so."""
        if not self.asking:
            return
        # nothing else reads the socket meanwhile: a client gone during the wait ends it (its questions are
        # cancelled, as a disconnect cancels them); what a client sends after `stop` is not read
        gone = asyncio.create_task(self._until_disconnect())
        try:
            deadline = time.monotonic() + self.STOP_ANSWER_WAIT_S
            while self.asking and not gone.done() and (left := deadline - time.monotonic()) > 0:
                await asyncio.wait([*self.asking, gone], timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if gone.done() and not gone.cancelled():
            self.closed = True
            for t in list(self.asking):
                t.cancel()
            return
        late = list(self.asking)
        for t in late:
            qid = self.asking.pop(t, None)
            t.cancel()
            await self.error(Interrupted(f"expected the answer before stop's reply, got it cut off after "
                                         f"{self.STOP_ANSWER_WAIT_S:g} s"), qid)

    async def _until_disconnect(self) -> None:
        """Returns once the client has gone (`_read` sees it; messages it sends meanwhile are not taken)."""
        await self.gone.wait()

    async def answer(self, m: dict, qid, key: str | None = None) -> None:
        from pydantic import ValidationError
        try:
            if self.sid is None:
                raise InvalidRequest("expected start or attach before ask, got ask first")
            try:
                q = Question.model_validate({k: v for k, v in m.items() if k not in ("type", "id")})
            except ValidationError as e:
                raise InvalidRequest(validation_message(e.errors()[0])) from None
            b = self.b
            # the same checks as the HTTP question routes (max_tokens, length, policy, choices)
            def req_of(gaps):
                return _question_req(b, self.sid, q.question, q.window, q.last_s, q.policy, q.max_tokens, gaps,
                                     q.choices)
            try:
                req = req_of((await asyncio.to_thread(b.live.get, self.sid)).get("gaps") or [])
            except NotFound:                           # attached to a video: answered as its HTTP route answers
                try:
                    req = await _video_question(b, await asyncio.to_thread(b.store.get, self.sid), req_of)
                except NotFound:                       # neither (deleted meanwhile): the ring says what is left
                    from frame_cache import StreamNotFound
                    try:
                        await asyncio.to_thread(b.cache.stream_info, self.sid)
                    except StreamNotFound:             # purged: told as the HTTP routes tell an unknown id
                        raise NotFound(f"expected a stream or video to ask about, got {self.sid!r} deleted "
                                       "since this socket attached") from None
                    req = req_of([])
            agen = self.events(b, req, "socket")     # admitted and measured as the HTTP routes' questions
            try:
                async for ev in agen:
                    if ev["type"] == "token":
                        await self.send({"type": "token", "id": qid, "text": ev["text"], "token_id": ev["token_id"]})
                        continue
                    self.open_ids.discard(key)         # its id is free once its last message is sent
                    if ev["type"] == "error":          # the HTTP status it carries is the routes' business
                        await self.send_error(ev, qid)
                    else:                              # the answer
                        await self.send({**ev, "id": qid})
            finally:
                await agen.aclose()
        except LmsError as e:
            self.open_ids.discard(key)
            await self.error(e, qid)
        finally:
            self.open_ids.discard(key)

    async def _flush(self, timeout: float = 60.0) -> None:
        """Wait until the frames this socket received are stored (or failed with an error sent)."""
        if self.drains:
            await asyncio.wait(list(self.drains), timeout=timeout)

    async def stream_deleted(self, purged: bool) -> None:
        """`DELETE /v1/streams/ID` stopped the stream this socket feeds (its writer fenced already): the
        socket is told so, as an error, and closed 1000; its frames still on the way are refused."""
        sid = self.sid
        self._fenced()                                 # release() must not mark (or re-create) the record
        kept = "purged: its frames are gone" if purged else "its frames stay"
        told = StreamStopped(f"expected to keep streaming to {sid!r}, got the stream deleted (DELETE "
                             f"/v1/streams/{sid}; {kept}): start a new stream to go on")
        self.closed = True                             # nothing else is sent from now on, but `told`

        # not awaited: the error's send and the closing handshake may wait on a client that does not read, and
        # the DELETE must not; kept (not in `tasks`: release() must not cancel it)
        self.close_task = asyncio.create_task(self._tell_and_close(told, 1000, "the stream was deleted"))

    async def service_stopping(self) -> None:
        """`close_live_sockets`: frames received are stored (a byte stream's flushed), then the client is told
        and the socket closed 1001; `release` marks the stream stopped as for a client that went away."""
        if self.closed:
            return
        self.stopping = True                           # frames that arrive from now on are not taken
        if self.writer and self.push is not None:      # at once: a chunk mid-push would hold `close` (its lock)
            await self._end_push(self.push.stop, 10)
        if self.writer:
            await self._flush(10.0)
            what = (f"the {self.frames} frames it acknowledged are stored; once it is back, start with stream_id "
                    f"{self.sid!r} to go on")
        elif self.sid is not None:
            what = f"stream {self.sid!r} keeps its frames; attach again once it is back"
        else:
            what = "connect again once it is back"
        self.closed = True                             # nothing else is sent from now on, but this
        await self._tell_and_close(ServiceUnavailable(f"expected the service to keep running, got it stopping: "
                                                      f"{what}"), 1001, "the service is stopping")

    async def _end_push(self, end: Callable[[], None], wait_s: float) -> None:
        """A byte stream ended (`close`: its last frames flushed first; `stop`: at once), then the frame its
        consumer is storing stored (at most `wait_s`)."""
        await asyncio.to_thread(end)
        try:
            await asyncio.wait_for(asyncio.shield(self.consumer), wait_s)
        except Exception:                              # noqa: BLE001 - ending regardless
            pass

    async def _tell_and_close(self, err: LmsError, code: int, reason: str) -> None:
        """`err` as the socket's last message (a client that does not read holds it 10 s at most), then the
        close with `code`."""
        try:
            await asyncio.wait_for(self.error(err, last=True), 10)
        except Exception:                              # noqa: BLE001 - gone, or not reading
            pass
        try:
            await self.ws.close(code=code, reason=reason)
        except Exception:                              # noqa: BLE001 - gone already
            pass

    async def _mark_stopped(self) -> None:
        """The stream's record: stopped, with its counts (`record_counts`) and gaps (frames lost at the end
        too); a record already gone stays gone."""
        self._close_loss(None)
        try:
            await asyncio.to_thread(self.b.live.update, self.sid, status="stopped", **self.record_counts(),
                                    **self._gaps_update())
        except LmsError:
            pass

    def _detach(self) -> None:
        """No longer among the sockets attached to its stream (`_ATTACHED`)."""
        if self.sid is not None and not self.writer and self in _ATTACHED.get(self.sid, ()):
            _ATTACHED[self.sid].discard(self)
            if not _ATTACHED[self.sid]:
                del _ATTACHED[self.sid]

    def stream_deleted_attached(self, purged: bool) -> None:
        """`DELETE /v1/streams/ID` stopped the stream this socket is attached to: told as an error (not
        awaited: a client that does not read must not hold the DELETE); the socket stays open, and asks
        about what is left (nothing once purged: `E_NOT_FOUND`)."""
        sid = self.sid
        kept = "purged: its frames are gone" if purged else "its frames stay and can be asked about"
        told = StreamStopped(f"expected stream {sid!r} to go on, got it deleted (DELETE /v1/streams/{sid}; {kept})")

        async def tell():
            try:
                await asyncio.wait_for(self.error(told), 10)
            except Exception:                          # noqa: BLE001 - gone, or not reading
                pass
        task = asyncio.create_task(tell())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def release(self) -> None:
        self._detach()
        owned = self._owns()                           # before the entry goes: a fenced socket marks nothing
        self._unlist()                                 # not `_fenced`: the flush below still writes the record
        if self.push is not None:
            self.push.stop()
        for t in list(self.tasks):
            t.cancel()
        await self._flush()                            # a socket that went away still stores what it sent
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        if owned and self.writer and _WRITERS.get(self.sid) is None:   # not taken over while flushing
            await self._mark_stopped()
