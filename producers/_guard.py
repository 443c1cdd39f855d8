"""How the producer fails: quietly for the agent, loudly for our own tests.

The producer runs inside someone else's program. A bug in it must never become an exception in
the agent's work loop, so every entry point swallows its own errors and logs them (once per kind,
so a bug on the hot path cannot flood the agent's log). Our test suite sets
``AGENTWATCH_RAISE_INTERNAL=1`` so the same bugs fail tests instead of hiding in a log line.

Warnings about the *caller's* arguments (``tokens=-5``) follow the same once-per-kind rule: the
agent's author needs to hear about it, but not a million times from a tight loop.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

logger: Final = logging.getLogger("agentwatch.producer")

RAISE_INTERNAL: bool = os.environ.get("AGENTWATCH_RAISE_INTERNAL", "").strip().lower() in {
    "1",
    "true",
    "yes",
    "on",
}
"""Re-raise the SDK's own exceptions instead of logging them (set by the test suite)."""

_warned: set[str] = set()
_WARNED_MAX: Final = 1000  # kinds are a small closed set in practice; this is only a backstop


def warn_once(kind: str, message: str, *args: object) -> None:
    """Log ``message`` at WARNING the first time ``kind`` happens in this process."""
    if kind in _warned or len(_warned) >= _WARNED_MAX:
        return
    _warned.add(kind)
    logger.warning(message, *args)


def internal_error(where: str) -> None:
    """Handle the exception being handled by the caller: log it once per place and type.

    Call only from an ``except`` block. With ``RAISE_INTERNAL`` the exception propagates, which
    in a test process fails the test (or, on the sender thread, reaches ``threading.excepthook``).
    """
    if RAISE_INTERNAL:
        raise  # noqa: PLE0704 - re-raises the exception the caller is handling
    try:
        exc_type = sys.exc_info()[0]
        kind = f"internal:{where}:{exc_type.__name__ if exc_type else '?'}"
        if kind in _warned or len(_warned) >= _WARNED_MAX:
            return
        _warned.add(kind)
        logger.error("agentwatch producer: internal error in %s (ignored)", where, exc_info=True)
    except Exception:  # logging itself failed (closed stream at exit...): nothing left to do
        pass


@contextmanager
def capture_internal_exceptions(where: str) -> Iterator[None]:
    """Context manager form of :func:`internal_error` for code off the hot path."""
    try:
        yield
    except Exception:
        internal_error(where)
