"""Facts about this process for pulses and the start event, from the standard library only.

No psutil: the producer must not pull a compiled dependency into every agent. On Linux the
resident set comes from ``/proc/self/statm`` (current value, one small read); elsewhere
``resource.getrusage`` gives the *peak* resident set, which still shows a leak growing.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from types import ModuleType
from typing import Any, Final

from agentwatch import __version__
from agentwatch.runfile import process_start

resource: ModuleType | None
try:
    import resource
except ImportError:  # Windows
    resource = None

_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM: Final = "/proc/self/statm"


def rss_bytes() -> int | None:
    """Resident memory of this process in bytes, or ``None`` where it cannot be read."""
    try:
        with open(_STATM, "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        pass
    if resource is None:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux and the BSDs report kilobytes, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024)


def hostname() -> str:
    try:
        return socket.gethostname()[:255] or "unknown"
    except OSError:
        return "unknown"


def start_fields(
    interval: float | None, pid: int, parent_run: str | None, labels: tuple[tuple[str, str], ...] = ()
) -> dict[str, Any]:
    """The ``start`` event of a run (``parent``: the run this process was forked or spawned
    from, so the pipeline can tell a worker process from a restart; ``labels``: the agent's)."""
    start: dict[str, Any] = {
        "kind": "start",
        "ts": time.monotonic(),
        "pid": pid,
        "host": hostname(),
        "version": __version__,
    }
    started = process_start(pid)  # with the run file, what lets a restart notifier signal us
    if started is not None:
        start["pid_start"] = started
    if interval is not None:
        start["interval"] = interval
    if parent_run:
        start["parent"] = parent_run
    if labels:
        start["labels"] = dict(labels)
    return start
