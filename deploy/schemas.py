"""Request and response bodies of the HTTP API (DESIGN section 8), as pydantic models.

A request that does not fit answers 422 E_INVALID_REQUEST with the field named (`routes.py` reshapes
FastAPI's validation error into the service's `{"error": {"code", "message"}}` form). Numbers in a
request are finite (JSON's 1e309 reads as inf: refused here, not deep in the frame cache) and JSON numbers
(strict: "2" and true are no number, as pydantic's lax mode read them; 2 is a float too).
"""
from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator

from frame_cache import STREAM_ID_PATTERN
from lmcore.limits import MAX_CHOICES


class RequestBody(BaseModel):
    """A request body: unknown fields refused, numbers finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _finite_window(w):
    """A window [start, end] whose numbers are not finite, refused in one message with the field
    named (before pydantic's per-item "window.1: Input should be a finite number")."""
    if isinstance(w, (list, tuple)) and len(w) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in w) and not all(map(math.isfinite, w)):
        raise ValueError(f"expected window [start, end] of finite seconds, got {list(w)}")
    return w


def _window_order(w):
    if w is not None and not (0 <= w[0] < w[1]):
        raise ValueError(f"expected window [start, end] with 0 <= start < end, got {list(w)}")
    return w


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class VideoCreate(RequestBody):
    """`POST /v1/videos` as JSON: a file inside an allowed folder."""

    path: str = Field(min_length=1, max_length=4096)
    fps: StrictFloat | None = Field(None, gt=0)
    window: tuple[StrictFloat, StrictFloat] | None = None
    kv_policy: Literal["exact", "fp8"] = "exact"
    retain: dict | None = None

    _finite = field_validator("window", mode="before")(_finite_window)
    _window = field_validator("window")(_window_order)


class VideoStatus(BaseModel):
    id: str
    status: Literal["queued", "ingesting", "ready", "failed"]
    frames: int = 0
    duration_s: float | None = None
    progress: float = 0.0
    gaps: list[list[float | None]] = Field(default_factory=list)
    error: ErrorBody | None = None
    decode_errors: list[str] = Field(default_factory=list)
    source: str | None = None
    created: float | None = None


class StreamCreate(RequestBody):
    """`POST /v1/streams`: a camera."""

    source: str = Field(min_length=8, max_length=2048)
    id: str | None = None
    fps: StrictFloat | None = Field(None, gt=0)
    capacity_frames: StrictInt | None = Field(None, ge=1, le=1 << 20)
    retain: dict | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, sid):
        # one message for every id the frame cache would refuse ("" and "../../etc" alike)
        if sid is not None and STREAM_ID_PATTERN.fullmatch(sid) is None:
            raise ValueError(f"expected id of 1-128 characters from [A-Za-z0-9._:-], got {json.dumps(sid)}")
        return sid


class WatchCreate(RequestBody):
    """`POST /v1/streams/{id}/watches`: a standing question."""

    question: str = Field(min_length=1, max_length=2000)
    every_s: StrictFloat = Field(5.0, ge=0.5, le=86400)
    last_s: StrictFloat = Field(10.0, gt=0, le=86400 * 7)


class Question(RequestBody):
    """`POST /v1/videos/{id}/questions` (and streams')."""

    question: str = Field(min_length=1)
    window: tuple[StrictFloat, StrictFloat] | None = None
    last_s: StrictFloat | None = Field(None, gt=0)
    policy: str = "exact"
    max_tokens: StrictInt | None = Field(None, ge=1)     # None: 64, or the service's limit when lower
    stream: StrictBool = False               # true or false: "yes", 1 or "true" are refused, not read as true
    # candidate answers: the reply is the one the model gives the highest probability (nothing is
    # generated), with every candidate's log-probability in the answer's "choices"
    choices: list[str] | None = Field(None, min_length=2, max_length=MAX_CHOICES)

    _finite = field_validator("window", mode="before")(_finite_window)
    _window = field_validator("window")(_window_order)

    @field_validator("question")
    @classmethod
    def _not_blank(cls, q: str | None) -> str | None:
        if q is not None and not q.strip():
            raise ValueError("expected a non-empty question, got only whitespace")
        return q

    @model_validator(mode="after")
    def _one_window(self):
        if self.window is not None and self.last_s is not None:
            raise ValueError("expected at most one of window and last_s, got both")
        return self


class WatchQuestion(Question):
    """`POST /v1/streams/{id}/watches/{wid}/questions`: a watch answers its own question (its rows were
    fused at ingest), so `question` may be left out; one that is sent must be the watch's (the route
    refuses another, rather than answer a question nobody asked)."""

    question: str | None = None


class AnswerBody(BaseModel):
    """Every answer, as JSON or as the last message of a stream."""

    text: str
    token_ids: list[int]
    frames: int
    frames_fused: int
    time_span: list[float] | None
    policy: str
    kv_policy: str
    gaps: list[list[float | None]]
    dropped: int = 0
    timings: dict[str, float]
    prompt_tokens: int
    llm_tokens: int
    llm_rows_run: int | None = None       # rows the LLM ran: fewer than llm_tokens when the head was reused
    finish_reason: Literal["stop", "length"] = "stop"
    choices: list[dict[str, Any]] | None = None     # with a question's choices: [{"text", "logprob", "share"}]
    job: dict[str, Any] | None = None     # a video whose job failed part way: {"status", "error", "frames", "progress"}


# -- OpenAI-compatible chat -------------------------------------------------------------------
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


#: OpenAI (and vLLM) request fields this service does not implement, with the values that ask for nothing:
#: any other value is refused (422/400 naming the field) rather than silently ignored (a 200 whose
#: answer did not do what was asked). Other unknown fields (user, metadata, store, ...) change nothing
#: an answer holds and are accepted and ignored.
UNSUPPORTED_CHAT_FIELDS: dict[str, tuple] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "repetition_penalty": (None, 1),
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "best_of": (None, 1), "top_k": (None, 0, -1), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,),
    "guided_grammar": (None,), "include_stop_str_in_output": (None, False), "stop_token_ids": (None, []),
    "min_tokens": (None, 0), "ignore_eos": (None, False),
}


def _same(value, a) -> bool:
    """`value` is the harmless value `a`: 0 and 0.0 alike, but false is no 0 and 1 no true."""
    if a is None or value is None:
        return value is a
    if isinstance(a, bool) or isinstance(value, bool):
        return type(value) is type(a) and value == a
    return value == a


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)   # other OpenAI fields: UNSUPPORTED_CHAT_FIELDS
    model: str | None = None                 # None: the served one; another is 404 (the route checks it)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool | None = False        # OpenAI's schema allows null (not streamed)
    stream_options: StreamOptions | None = None
    n: int | None = None                     # one choice per request: 1 or null
    # strict: true or "5" is no number of tokens (pydantic's lax mode read true as 1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0, le=2)     # strict: 1 and 1.0 alike, "1" and true no
    top_p: StrictFloat | None = Field(None, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)    # what torch's manual_seed takes
    stop: str | list[str] | None = None      # cut the answer before the first of these (at most 16)
    lmstream_policy: str | None = Field(None, alias="lmstream_policy")
    lmstream_choices: list[str] | None = Field(None, min_length=2, max_length=MAX_CHOICES, alias="lmstream_choices")

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > 16 or not all(0 < len(x) <= 256 for x in stops)):
            raise ValueError(f"expected stop to be a string or a list of at most 16 strings of 1-256 characters, "
                             f"got {json.dumps(stop)[:200]}")
        return stop

    @model_validator(mode="after")
    def _supported(self):
        from pydantic_core import PydanticCustomError

        def unsupported(param: str, value) -> PydanticCustomError:
            return PydanticCustomError("unsupported", "expected no {param} (this service does not support it; "
                                       "leave it out), got {got}", {"param": param, "got": json.dumps(value)[:120]})
        for name, value in (self.model_extra or {}).items():
            allowed = UNSUPPORTED_CHAT_FIELDS.get(name)
            if allowed is not None and not any(_same(value, a) for a in allowed):
                raise unsupported(name, value)
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("stream_options", "expected stream_options only with stream true, got it "
                                      "without", {"param": "stream_options"})
        more = (self.stream_options.model_extra or {}) if self.stream_options is not None else {}
        if more.get("continuous_usage_stats") not in (None, False):      # vLLM's: usage in every chunk
            raise unsupported("stream_options.continuous_usage_stats", more["continuous_usage_stats"])
        return self

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @field_validator("n", mode="before")
    @classmethod
    def _one_choice(cls, n):
        if n is not None and (type(n) is not int or n != 1):      # before pydantic reads true or "1" as 1
            raise ValueError(f"expected n 1, got {json.dumps(n)} (one choice per request)")
        return n
