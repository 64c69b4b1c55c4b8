"""Cooperative cancellation of a question's work on its own thread.

A question runs on a thread (`deploy.serving.answer_events_in_thread`); when its client goes away, the
thread is told through an event, and the engine stops at its next check: while it waits for the model's
lock, between the frame chunks a question is fused with, between the LLM's layers, between tokens. Work
that no one will read stops holding the model (a question cancelled mid-prefill used to run to the end
of it, and the questions queued behind it waited). No torch: the Ingress replica imports it.
"""
from __future__ import annotations

import contextlib
import threading

__all__ = ["Cancelled", "scope", "check", "acquire"]

_local = threading.local()


class Cancelled(Exception):
    """The question's work was abandoned: its client went away. Never shown to a client (none is left)."""


@contextlib.contextmanager
def scope(event: threading.Event):
    """Work on this thread inside the block stops at its next `check` once `event` is set."""
    prev = getattr(_local, "event", None)
    _local.event = event
    try:
        yield
    finally:
        _local.event = prev


def check() -> None:
    """Raise `Cancelled` when this thread's work was cancelled (a no-op outside a `scope`)."""
    ev = getattr(_local, "event", None)
    if ev is not None and ev.is_set():
        raise Cancelled("the question's client went away")


@contextlib.contextmanager
def acquire(lock, poll_s: float = 0.05):
    """`with lock:`, but a cancelled thread stops waiting for it (checked every `poll_s`)."""
    if getattr(_local, "event", None) is None:
        with lock:
            yield
        return
    while not lock.acquire(timeout=poll_s):
        check()
    try:
        check()
        yield
    finally:
        lock.release()
