"""Errors a user can cause, each with a stable code and a one-line message.

Every layer (decoding, model loading, cache, service) raises a subclass of
`LmsError`; the CLI prints ``error[CODE]: message`` and exits with
``exit_code``; the service maps ``http_status``. Messages say what was
expected and what was found.
"""
from __future__ import annotations


class LmsError(Exception):
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


class InputNotFound(LmsError):
    code, exit_code, http_status = "E_INPUT_NOT_FOUND", 2, 404


class NotAVideo(LmsError):
    code, exit_code, http_status = "E_NOT_A_VIDEO", 3, 422


class NoVideoStream(LmsError):
    code, exit_code, http_status = "E_NO_VIDEO_STREAM", 3, 422


class NoFrames(LmsError):
    code, exit_code, http_status = "E_NO_FRAMES", 3, 422


class BadArgument(LmsError):
    code, exit_code, http_status = "E_BAD_ARGUMENT", 2, 400


class CheckpointError(LmsError):
    code, exit_code, http_status = "E_CHECKPOINT", 4, 422


class ContextTooLong(LmsError):
    code, exit_code, http_status = "E_CONTEXT_TOO_LONG", 5, 413


class CacheError(LmsError):
    code, exit_code, http_status = "E_CACHE", 6, 503
