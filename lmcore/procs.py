"""Child processes this program starts and stops by their own PID (redis-server, the RTSP server of
the tests, `lmstream serve` under the demo and the tests)."""
from __future__ import annotations

import os
import signal
import subprocess

__all__ = ["die_with_parent", "stop_child"]

_PR_SET_PDEATHSIG = 1
_SIGTERM = int(signal.SIGTERM)


def _resolve_prctl():
    """libc's prctl, looked up once in the parent (None where there is none)."""
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


#: Resolved at import, not in the child: `dlopen` (and an import) between fork and exec can deadlock a child
#: forked while another thread of the parent held the loader's lock. This alone did not stop the tests' camera
#: restarts from hanging in Popen (any Python in such a child can); the RTSP server now runs no preexec_fn.
_PRCTL = _resolve_prctl()


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """A ``preexec_fn``: on Linux the child gets SIGTERM when the thread that started it exits, so a
    parent that crashes or is killed leaves no child running; elsewhere a no-op. Only a call through a
    function pointer found beforehand: no import, no dynamic loading, in the child."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, _SIGTERM)


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
