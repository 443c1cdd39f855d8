"""Stack and exception text for the wire: standard traceback format, innermost frames kept.

A stall alert wants to say "blocked in api_client.py:47 fetch_from_api -> ssl.py do_handshake",
so the text keeps Python's own ``File "...", line N, in func`` lines (easy to parse, familiar to
read) and, when it must be cut to the protocol's cap, drops *outer* frames: the innermost frames
are where the work thread is stuck.
"""

from __future__ import annotations

import sys
import threading
import traceback
from types import FrameType, TracebackType
from typing import Final

from agentwatch.codec import MAX_STACK_CHARS, MAX_TEXT_CHARS

_FRAME_CHARS: Final = 1024
"""Cap on one formatted frame, so one very long source line cannot push out the others."""


def thread_stack(ident: int, late_s: float, limit: int = MAX_STACK_CHARS) -> str:
    """The current stack of thread ``ident`` (most recent call last), trimmed to ``limit`` chars."""
    name = _thread_name(ident)
    frame: FrameType | None = sys._current_frames().get(ident)
    if frame is None:
        return trim_frames(f"Thread {name!r} has ended; last beat {late_s:.1f}s ago\n", [], limit)
    frames = traceback.format_list(traceback.extract_stack(frame))
    del frame  # don't keep the other thread's frames alive from ours
    header = f"Thread {name!r}, last beat {late_s:.1f}s ago (most recent call last):\n"
    return trim_frames(header, frames, limit)


def exception_text(
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> tuple[str, str]:
    """``("ExcType: message", traceback text)`` for an exit event, each within its cap."""
    name = str(getattr(exc_type, "__qualname__", None) or "Exception")
    module = getattr(exc_type, "__module__", "builtins")
    if module not in {"builtins", "__main__", None}:
        name = f"{module}.{name}"
    message = _safe_str(exc)
    error = f"{name}: {message}" if message else name
    frames = traceback.format_list(traceback.extract_tb(tb)) if tb is not None else []
    text = trim_frames("Traceback (most recent call last):\n", frames, MAX_STACK_CHARS,
                       footer=error + "\n")  # fmt: skip
    return error[:MAX_TEXT_CHARS], text


def trim_frames(header: str, frames: list[str], limit: int, footer: str = "") -> str:
    """``header`` + as many innermost ``frames`` as fit + ``footer``, at most ``limit`` chars."""
    footer = footer[: limit // 4]
    budget = limit - len(header) - len(footer)
    kept: list[str] = []
    omitted = len(frames)
    for frame_text in reversed(frames):
        text = frame_text
        if len(text) > _FRAME_CHARS:
            text = text[: _FRAME_CHARS - 4] + "...\n"
        note = len(f"  ... {omitted - 1} outer frames omitted\n") if omitted > 1 else 0
        if len(text) + note > budget:
            break
        kept.append(text)
        budget -= len(text)
        omitted -= 1
    body = "".join(reversed(kept))
    if omitted:
        body = f"  ... {omitted} outer frames omitted\n" + body
    return (header + body + footer)[:limit]


def _thread_name(ident: int) -> str:
    for thread in threading.enumerate():
        if thread.ident == ident:
            return thread.name
    return str(ident)


def _safe_str(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"
