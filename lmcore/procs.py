"""Child processes this program starts and stops by their own PID (redis-server, the RTSP server of
the tests, `lmstream serve` under the demo and the tests)."""
from __future__ import annotations

import os
import signal
import subprocess

__all__ = ["die_with_parent", "stop_child"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """A ``preexec_fn``: on Linux the child gets SIGTERM when the thread that started it exits, so a
    parent that crashes or is killed leaves no child running; elsewhere a no-op."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def stop_child(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGCONT (in case it is stopped), SIGTERM, wait up to `grace` s, then SIGKILL; always reaped."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass
