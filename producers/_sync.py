"""Signal-safe synchronisation between the agent's thread, signal handlers and the sender.

A Python signal handler runs between two bytecodes of the interrupted main thread, possibly in
the middle of ``threading.Event.set()`` or ``wait()``, which hold a Python-level lock across
several bytecodes. A handler that then waits for the sender thread (the SIGTERM exit flush does)
while the sender needs that lock would deadlock until the deadline, or for ever if the handler
re-entered the same ``wait()``. Hence these two primitives, made of single C calls and polling.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Protocol


class Finishing(Protocol):
    """Anything with a ``done`` flag: a sender flushing its exit event."""

    @property
    def done(self) -> bool: ...


class Wakeup:
    """A wake-up call any thread may make at any moment, even from a signal handler: a bare
    ``Lock`` used as a binary semaphore, whose ``release()`` and ``acquire()`` are single C calls.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # held = "nothing to do"; release() = "wake up"

    def set(self) -> None:
        with contextlib.suppress(RuntimeError):  # already released: one pending wake is enough
            self._lock.release()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds or until woken; consumes the wake-up."""
        return self._lock.acquire(timeout=max(timeout, 0.0))


def wait_done(senders: Sequence[Finishing], deadline: float) -> bool:
    """Wait until every sender has flushed its final event or ``deadline`` (monotonic) passes.

    Polls a plain flag: safe in a signal handler (see :class:`Wakeup`); 5 ms steps are nothing
    next to the deadline.
    """
    while not all(sender.done for sender in senders):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(0.005, remaining))
    return True
