"""Errors a user can cause, each with a stable code, a CLI exit status and an HTTP status.

Every layer (decoding, model loading, the frame cache, the CLI, the service) raises a
subclass of `LmsError`; the CLI prints ``error[CODE]: message`` and exits with
``exit_code``; the service answers ``http_status`` with
``{"error": {"code": ..., "message": ...}}``. Messages say what was expected and what
was found. `error_table()` lists every code (the README's table is made from it).

Exit statuses: 1 our fault, 2 bad argument or input path, 3 not a usable video,
4 checkpoint, 5 context too long, 6 frame cache, 7 service busy or unavailable.
"""
from __future__ import annotations

__all__ = [
    "LmsError", "InputNotFound", "InputUnreadable", "NotAVideo", "NoVideoStream", "NoFrames",
    "BadArgument", "DeviceUnavailable", "CheckpointError", "ContextTooLong", "CacheError",
    "CacheUnavailable", "CacheClosed", "StreamNotFound", "StreamExists", "CacheBudgetExceeded",
    "CapacityExceeded", "StaleWriter", "RecordFormatError", "Unauthorized", "PathNotAllowed", "NotFound",
    "NotReady", "JobRunning", "StreamStopped", "Interrupted", "PayloadTooLarge", "InvalidRequest", "Busy",
    "ServiceUnavailable", "error_table",
]


class LmsError(Exception):
    """Base class: an internal fault unless a subclass says otherwise."""

    code = "E_INTERNAL"
    exit_code = 1
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}

    def __str__(self) -> str:  # one line, never a traceback
        return f"error[{self.code}]: {self.args[0] if self.args else ''}"


# -- input ------------------------------------------------------------------------------
class InputNotFound(LmsError):
    """No file at the path given."""

    code, exit_code, http_status = "E_INPUT_NOT_FOUND", 2, 404


class InputUnreadable(LmsError):
    """A path that exists but cannot be read as a file: FIFO, device, folder, symlink loop,
    permission denied."""

    code, exit_code, http_status = "E_INPUT_UNREADABLE", 2, 422


class NotAVideo(LmsError):
    """FFmpeg cannot read the file as a container."""

    code, exit_code, http_status = "E_NOT_A_VIDEO", 3, 422


class NoVideoStream(LmsError):
    """A readable container with no video stream (audio only, say)."""

    code, exit_code, http_status = "E_NO_VIDEO_STREAM", 3, 422


class NoFrames(LmsError):
    """A video stream from which no frame could be decoded (in the window asked for)."""

    code, exit_code, http_status = "E_NO_FRAMES", 3, 422


class BadArgument(LmsError):
    """An argument out of range or of the wrong kind (window, policy, ids, sizes).

    The service answers one that reaches a route from a request as `InvalidRequest` (422, same words):
    a value a client got wrong is one code there (`deploy.routes.client_error`)."""

    code, exit_code, http_status = "E_BAD_ARGUMENT", 2, 400


class DeviceUnavailable(LmsError):
    """A device asked for that this machine does not have (``--device cuda`` without CUDA)."""

    code, exit_code, http_status = "E_DEVICE_UNAVAILABLE", 2, 400


# -- model ------------------------------------------------------------------------------
class CheckpointError(LmsError):
    """Unknown checkpoint layout, a missing or mis-shaped key, a wrong vision tower."""

    code, exit_code, http_status = "E_CHECKPOINT", 4, 422


class ContextTooLong(LmsError):
    """Question plus frame tokens longer than the LLM's context."""

    code, exit_code, http_status = "E_CONTEXT_TOO_LONG", 5, 413


# -- frame cache ------------------------------------------------------------------------
class CacheError(LmsError):
    """The frame cache refused or failed an operation."""

    code, exit_code, http_status = "E_CACHE", 6, 503


class CacheUnavailable(CacheError):
    """The cache's server (Redis) cannot be reached or answered with an error; frames
    already stored there are untouched."""

    code, exit_code, http_status = "E_CACHE_UNAVAILABLE", 6, 503


class CacheClosed(CacheError):
    """Any use of a cache after `FrameCache.close`."""

    code, exit_code, http_status = "E_CACHE_CLOSED", 6, 503


class StreamNotFound(CacheError):
    """A stream id that the cache does not hold."""

    code, exit_code, http_status = "E_STREAM_NOT_FOUND", 2, 404


class StreamExists(CacheError):
    """``create_stream(..., exist_ok=False)`` for a stream that already exists."""

    code, exit_code, http_status = "E_STREAM_EXISTS", 2, 409


class CacheBudgetExceeded(CacheError):
    """An append that would take a stream (or the cache) over its byte budget; nothing is
    stored or evicted."""

    code, exit_code, http_status = "E_CACHE_BUDGET", 6, 507


class CapacityExceeded(CacheError):
    """More frames than a stream's ring holds, where overwriting the oldest was not allowed
    (``on_full="error"``); nothing is stored or evicted."""

    code, exit_code, http_status = "E_CAPACITY", 6, 507


class StaleWriter(CacheError):
    """An append from a writer that a newer writer of the same stream has fenced off."""

    code, exit_code, http_status = "E_STALE_WRITER", 6, 409


class RecordFormatError(CacheError):
    """Bytes that are not a valid frame record of a supported version."""

    code, exit_code, http_status = "E_RECORD_FORMAT", 6, 500


# -- service ----------------------------------------------------------------------------
class Unauthorized(LmsError):
    """No API key, or one the service does not know."""

    code, exit_code, http_status = "E_UNAUTHORIZED", 2, 401


class PathNotAllowed(LmsError):
    """A `path` outside the service's allowed folders."""

    code, exit_code, http_status = "E_PATH_NOT_ALLOWED", 2, 403


class NotFound(LmsError):
    """A video, stream or route id the service does not hold."""

    code, exit_code, http_status = "E_NOT_FOUND", 2, 404


class NotReady(LmsError):
    """A question about a video that is not ingested yet (or failed)."""

    code, exit_code, http_status = "E_NOT_READY", 2, 409


class JobRunning(NotReady):
    """A removal of a video whose job still runs, or of a stream a source still feeds: stop it first."""

    code = "E_JOB_RUNNING"


class StreamStopped(NotReady):
    """Frames sent to a stream that `DELETE /v1/streams/ID` stopped (told on the socket that fed it)."""

    code = "E_STREAM_STOPPED"


class Interrupted(LmsError):
    """Work stopped before it finished: Ctrl-C or SIGTERM on the command line, or a job whose decoder the
    service lost (a restart); a job's record keeps what it stored."""

    code, exit_code, http_status = "E_INTERRUPTED", 130, 503


class PayloadTooLarge(LmsError):
    """An upload, a video or a message over the service's limits."""

    code, exit_code, http_status = "E_TOO_LARGE", 2, 413


class InvalidRequest(LmsError):
    """A request body that does not fit its schema (the field is named)."""

    code, exit_code, http_status = "E_INVALID_REQUEST", 2, 422


class Busy(LmsError):
    """Too many jobs or questions at once: try again after Retry-After seconds."""

    code, exit_code, http_status = "E_BUSY", 7, 429

    def __init__(self, message: str, *, retry_after: int | None = 5, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after          # None: a limit that waiting does not lift (no Retry-After)


class ServiceUnavailable(LmsError):
    """The service is starting, or a part it needs (model replica) is down."""

    code, exit_code, http_status = "E_UNAVAILABLE", 7, 503


def error_table() -> list[tuple[str, int, int, str]]:
    """(code, exit status, HTTP status, one-line meaning) for every error type, base first."""
    seen, out, todo = set(), [], [LmsError]
    while todo:
        cls = todo.pop(0)
        if cls.code not in seen:
            seen.add(cls.code)
            out.append((cls.code, cls.exit_code, cls.http_status, (cls.__doc__ or "").split("\n\n")[0].strip()))
        todo.extend(cls.__subclasses__())
    return out
