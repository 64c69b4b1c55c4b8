"""One typed settings object for the whole service (DESIGN section 8).

Every part (`lmstream serve`, `deploy/serve.yaml`, the KubeRay manifest, the tests) builds the
app from a `Settings`; values come from arguments, then ``LMSTREAM_*`` environment variables,
then the defaults below. `Settings.from_env()` reads the environment.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

REPO = Path(__file__).resolve().parents[1]
#: the most warm decoder actors a service keeps (`Settings.warm_decoders`; `lmstream serve --warm-decoders`)
MAX_WARM_DECODERS = 64
#: requests one Ingress replica takes at once (its Serve `max_ongoing_requests`, `deploy/app.py`): past it the
#: Serve proxy queues every request, `/health` too, so long-lived connections must leave room under it
INGRESS_MAX_ONGOING_REQUESTS = 256


class Limits(BaseModel):
    """What one client can ask of the service; past a limit it gets 413/422/429, never a hang."""

    max_upload_bytes: int = Field(2 << 30, ge=1, description="largest upload (413 past it)")
    upload_idle_timeout_s: float = Field(60.0, gt=0, description="longest wait for an upload's next bytes (422 "
                                         "past it, its job slot freed: a stalled client holds none for good)")
    upload_min_bytes_per_s: float = Field(8192.0, ge=0, description="slowest average rate an upload may keep once "
                                          "upload_idle_timeout_s has passed (422 under it, its job slot freed: "
                                          "a byte every minute held a slot for good); 0: none")
    body_timeout_s: float = Field(30.0, gt=0, description="longest a request body other than an upload may take "
                                  "to arrive (422 past it)")
    max_body_reads: int = Field(32, ge=1, le=INGRESS_MAX_ONGOING_REQUESTS // 4, description=(
        "request bodies other than uploads being received at once on one Ingress replica (429 past it, nothing "
        "read): each holds one of its requests at once until whole or body_timeout_s, and 300 slow bodies left "
        "no room for any other request"))
    max_duration_s: float = Field(6 * 3600.0, gt=0, description="longest video a job ingests (s of video)")
    max_frames_per_job: int = Field(100_000, ge=1, description="most frames sampled from one file")
    max_concurrent_jobs: int = Field(4, ge=1, description="file jobs queued or ingesting at once (429 past it)")
    max_uploads_receiving: int = Field(2, ge=1, description="uploads whose bytes are still arriving at once, of "
                                       "max_concurrent_jobs (429 past it, before a byte is read): four uploads "
                                       "trickling just above upload_min_bytes_per_s held every job slot")
    max_queued_questions: int = Field(16, ge=1, description="questions waiting or running at once (429 past it)")
    max_asks_per_socket: int = Field(4, ge=1, description="questions one /v1/live socket may have waiting or "
                                     "running at once (E_BUSY past it: one socket's 200 asks took every slot of "
                                     "max_queued_questions from every other client)")
    max_tokens: int = Field(512, ge=1, description="largest max_tokens a question may ask for")
    max_question_chars: int = Field(8000, ge=1, description="longest question text")
    max_fps: float = Field(30.0, gt=0, description="largest sampling rate a job may ask for")
    retry_after_s: int = Field(5, ge=1, description="Retry-After seconds sent with 429")
    max_ws_message_bytes: int = Field(8 << 20, ge=1024, description="largest WebSocket message (close 1009)")
    max_ws_backlog_bytes: int = Field(32 << 20, ge=1024, description=(
        "bytes a /v1/live socket may send ahead of what the service has taken (close 1009 past it; one message "
        "is always taken): its messages wait in the Ingress's memory, and a client that sent 300 MB in 10 s "
        "grew it by 360 MB"))
    # 1 MiB: a question (max_question_chars) plus its choices is ~50 KB of JSON even in 4-byte UTF-8,
    # so this only stops bodies no route reads, before they are read
    max_json_bytes: int = Field(1 << 20, ge=1024, description="largest request body other than an upload (413 "
                                "past it, from Content-Length before reading, or while reading a chunked one)")
    live_capacity_frames: int = Field(86_400, ge=1, description="default ring of a live stream (24 h at 1 fps)")
    max_live_streams: int = Field(64, ge=1, description="live streams (cameras + sockets) at once (429 past it)")
    max_live_connections: int = Field(128, ge=1, le=INGRESS_MAX_ONGOING_REQUESTS - 64, description=(
        "open /v1/live sockets and watch-event streams (GET /v1/streams/{id}/events) at once on one Ingress "
        "replica: a socket past it is closed 1013, an event stream is 429. Each holds one of the Ingress's "
        f"{INGRESS_MAX_ONGOING_REQUESTS} requests at once for as long as it is open: 256 idle sockets left no "
        "room for any other request, /health included"))
    max_watches_per_stream: int = Field(16, ge=1, description="watches of one stream (429 past it: each is fused "
                                        "with every frame and stored with it, ~0.2 MB a frame at 8B)")


def _keys(v: str) -> list[str]:
    keys = [k.strip() for k in v.split(",") if k.strip()]
    if not keys:                                        # ' , ' was read as no key: one generated, unsaid
        raise ValueError("no key in it")
    return keys


def _flag(v: str) -> bool:
    """A yes/no variable: "maybe" or "enabled" were read as no, silently."""
    x = v.strip().lower()
    if x in ("1", "true", "yes", "on"):
        return True
    if x in ("0", "false", "no", "off"):
        return False
    raise ValueError("not a yes or a no")


class Settings(BaseModel):
    """The service's settings.

    Fields:
        model: checkpoint folder in the official layout (default: the demo checkpoint).
        vision_tower: CLIP folder (default: the checkpoint's mm_vision_tower).
        device: "cpu" | "cuda" (default: cuda when present).
        dtype: torch dtype name or None for the checkpoint's.
        redis_url: the frame cache and job store.
        data_dir: uploads (and, for `lmstream serve`, Redis' AOF and Ray's temp folder).
        allowed_dirs: folders whose files `POST /v1/videos {"path"}` may name.
        api_keys: accepted bearer keys (at least one).
        fps: default sampling rate for file jobs.
        encode_batch: most frames per Encoder batch (across requests and streams).
        encoder_replicas, answerer_replicas: Serve replicas; each loads the model once.
        gpus_per_replica: `num_gpus` of each model replica (0 on a CPU machine).
        service_resources: Ray custom resources each Serve replica (Ingress, Encoder, Answerer) asks
            for, e.g. {"head_node": 0.01} keeps them on the nodes started with that resource.
        camera_resources: Ray custom resources each camera actor (StreamSource) asks for; cameras are
            spread over the alive nodes that have them (all nodes when empty).
        serve_batch, serve_batch_wait_s: the Encoder's Serve batching across requests (streams, file
            jobs): at most this many requests per batched pass, waiting this long for more (1: one
            pass per request, the per-stream baseline of `lmstream bench load`).
        local_kv_bytes: budget of each Answerer's local keys/values tier (`frame_cache.local_tier`:
            memory-mapped files of the full records its questions read, refilled from Redis);
            0 turns it off (every question reads keys/values from Redis).
        local_kv_dir: folder of that tier's (nameless) files (default: data_dir/kv-tier).
        answer_context_bytes: budget of each Answerer's LLM keys/values of recent windows' [prefix rows, frame
            tokens] (`model.ContextCache`, in host memory: a reuse copies the head to the model's device): a
            question over the same frames as an earlier one runs only its own rows through the LLM. 0 keeps
            none. At 8B about 1.3 GB per 10,000 frames; with the demo model about 20 MB.
        warm_decoders: file-job decoder actors (`FileSource`) kept started and idle, so that a new job
            starts at once instead of waiting ~3 s for a Ray worker to start and import torch, PyAV and
            the service; each costs one idle worker process (~340 MB). A decoder whose job ended goes back to
            this pool (`RayBackend._give_back`). 0: none kept idle (a fresh actor per job, unless a busy
            decoder frees first).
        limits: `Limits`.
    """

    model_config = ConfigDict(extra="forbid")     # a misspelt setting is refused, not left at its default

    model: str = str(REPO / "checkpoints" / "demo")
    vision_tower: str | None = None
    device: str | None = None
    dtype: str | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    data_dir: str = str(REPO / ".lmstream")
    allowed_dirs: list[str] = Field(default_factory=list)
    api_keys: list[str] = Field(default_factory=list)
    fps: float = 1.0
    encode_batch: int = Field(32, ge=1)
    encoder_replicas: int = Field(1, ge=1)
    answerer_replicas: int = Field(1, ge=1)
    gpus_per_replica: float = Field(0.0, ge=0)
    allow_private_sources: bool = False     # rtsp:// to loopback/private addresses (a lab, the tests)
    service_resources: dict[str, float] = Field(default_factory=dict)
    camera_resources: dict[str, float] = Field(default_factory=dict)
    serve_batch: int = Field(16, ge=1, le=1024)
    serve_batch_wait_s: float = Field(0.02, ge=0, le=10)
    local_kv_bytes: int = Field(8 << 30, ge=0)
    local_kv_dir: str | None = None
    answer_context_bytes: int = Field(2 << 30, ge=0)
    warm_decoders: int = Field(1, ge=0, le=MAX_WARM_DECODERS)
    limits: Limits = Field(default_factory=Limits)

    @field_validator("allowed_dirs")
    @classmethod
    def _real_dirs(cls, v: list[str]) -> list[str]:
        return [os.path.realpath(os.path.expanduser(d)) for d in v]

    @property
    def upload_dir(self) -> Path:
        return Path(self.data_dir) / "uploads"

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Defaults, then LMSTREAM_* variables, then `overrides` (None values ignored).

        Raises `BadArgument` naming the variable (or argument) and the field for a value that does not
        parse or is out of range, and for a key `LMSTREAM_LIMITS` does not know (a misspelt limit would
        otherwise leave its default in force, unnoticed)."""
        import json
        from lmcore.errors import BadArgument
        env = os.environ
        d: dict = {}
        source: dict[str, str] = {}                     # field -> the variable it came from

        def take(name: str, var: str, parse=None, what: str = "") -> None:
            raw = env.get(var)
            if not raw:
                return
            try:
                d[name] = parse(raw) if parse else raw
            except ValueError as e:
                raise BadArgument(f"expected {var} to be {what}, got {raw!r} ({e})") from None
            source[name] = var

        for name, var in (("model", "LMSTREAM_MODEL"), ("vision_tower", "LMSTREAM_VISION_TOWER"),
                          ("device", "LMSTREAM_DEVICE"), ("dtype", "LMSTREAM_DTYPE"),
                          ("redis_url", "LMSTREAM_REDIS_URL"), ("data_dir", "LMSTREAM_DATA_DIR"),
                          ("local_kv_dir", "LMSTREAM_LOCAL_KV_DIR")):
            take(name, var)
        take("api_keys", "LMSTREAM_API_KEYS", _keys, "comma-separated keys")
        take("allow_private_sources", "LMSTREAM_ALLOW_PRIVATE_SOURCES", _flag, "1, true, yes, on or 0, false, no, off")
        take("limits", "LMSTREAM_LIMITS", json.loads, 'a JSON object such as {"max_upload_bytes": 1000000}')
        take("service_resources", "LMSTREAM_SERVICE_RESOURCES", json.loads,
             'a JSON object such as {"head_node": 0.01}')
        take("camera_resources", "LMSTREAM_CAMERA_RESOURCES", json.loads,
             'a JSON object such as {"camera_node": 0.01}')
        take("serve_batch", "LMSTREAM_SERVE_BATCH", int, "an integer")
        take("serve_batch_wait_s", "LMSTREAM_SERVE_BATCH_WAIT_S", float, "a number of seconds")
        take("local_kv_bytes", "LMSTREAM_LOCAL_KV_BYTES", int, "an integer number of bytes")
        take("answer_context_bytes", "LMSTREAM_ANSWER_CONTEXT_BYTES", int, "an integer number of bytes")
        take("warm_decoders", "LMSTREAM_WARM_DECODERS", int, "an integer")
        take("allowed_dirs", "LMSTREAM_ALLOWED_DIRS", lambda v: [p for p in v.split(os.pathsep) if p])
        unknown = sorted(set(overrides) - set(cls.model_fields))
        if unknown:                                     # serve.yaml's args: `encoder_replica: 3` did nothing
            raise BadArgument(f"expected only known settings ({', '.join(cls.model_fields)}), got "
                              f"{', '.join(map(repr, unknown))}")
        for name, v in overrides.items():
            if v is not None:
                d[name] = v
                source.pop(name, None)
        if "limits" in d and isinstance(d["limits"], dict):
            unknown = sorted(set(d["limits"]) - set(Limits.model_fields))
            if unknown:
                raise BadArgument(f"expected {source.get('limits', 'limits')} to name only known limits "
                                  f"({', '.join(Limits.model_fields)}), got {', '.join(map(repr, unknown))}")
        try:
            return cls(**d)
        except ValidationError as e:
            err = e.errors()[0]
            loc = [str(x) for x in err.get("loc", ())]
            field = ".".join(loc) or "settings"
            where = source.get(loc[0]) if loc else None
            name = f"{where} ({field})" if where else field
            raise BadArgument(f"expected {name} to be valid: {err.get('msg', 'a valid value')}, "
                              f"got {err.get('input')!r}") from None

    def with_generated_key(self) -> tuple["Settings", str | None]:
        """These settings, plus a fresh random API key when none is configured (returned too)."""
        if self.api_keys:
            return self, None
        key = "lms-" + secrets.token_urlsafe(24)
        return self.model_copy(update={"api_keys": [key]}), key

    def replica_resources(self) -> dict:
        """Ray actor options for a model replica: a GPU each when the settings ask for one, and the
        `service_resources` (which pin the replicas to some nodes)."""
        opts: dict = {"num_gpus": self.gpus_per_replica} if self.gpus_per_replica else {"num_cpus": 0}
        if self.service_resources:
            opts["resources"] = dict(self.service_resources)
        return opts
