"""The per-event fold: a segment built event by event, in stream order.

segments.py folds the common segment (beats and pulses only) column by column with numpy
(fold.py). A segment holding anything else (a ``start``, an ``exit``, a stack, an ``extend``, a
zero entry time) is *complex* and folded here instead, one event at a time, with the rule each
number of layout.SEGMENT_NUMBERS is defined by. This is also the reference the vectorised fold
is tested against (tests/test_detect_fold.py: ``vectorised=False`` folds every segment here).

Token and cost numbers (layout.TOKEN_NUMBERS) are left to the batch-wide folds in fold.py,
which run over every segment's beats, complex or not.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

from agentwatch.codec import Event
from agentwatch.worker import Message
from detectors.layout import (
    FP_TEXT_CHARS,
    NUMBERS,
    S_BA,
    S_BB,
    S_BEAT,
    S_CHILD,
    S_EXIT,
    S_FBEAT,
    S_FIRST,
    S_FPC,
    S_FPH,
    S_FPTEXT,
    S_FPX,
    S_GA,
    S_GB,
    S_HI,
    S_INDEX,
    S_IV,
    S_LAST,
    S_LO,
    S_NBEAT,
    S_NEV,
    S_PBF,
    S_PGAP,
    S_PSB,
    S_PULSE,
    S_RKB,
    S_RMS,
    S_RSSX,
    S_STACK,
    S_STACKMS,
    S_START,
    S_XBEAT,
    S_XU,
    SEGMENT_OTHERS,
    run_hash,
)


def fp_text(fp: str | None) -> str:
    """What a loop alert quotes of a fingerprint."""
    return fp[:FP_TEXT_CHARS] if fp else ""


def _new(index: int, agent: str, seq: int, ms: int) -> list[Any]:
    seg: list[Any] = [0] * NUMBERS
    seg[S_LO] = seg[S_HI] = seq
    seg[S_FIRST] = seg[S_LAST] = ms
    seg[S_IV] = -1
    seg[S_INDEX] = index
    seg += [agent, *([False] * (len(SEGMENT_OTHERS) - 1))]
    return seg


def fold_events(
    messages: Sequence[Message[Event]], index: dict[tuple[str, str], int]
) -> dict[int, list[Any]]:
    """The segments of ``messages`` (whatever they hold) by segment number (``index``: agent
    and run -> segment), as lists of layout.SEGMENT_NUMBERS then layout.SEGMENT_OTHERS."""
    segs: dict[int, list[Any]] = {}
    for entry_id, ev in messages:
        agent = ev["agent"]
        i = index[(agent, ev["run"])]
        seg = segs.get(i)
        ms = int(entry_id[: entry_id.index(b"-")])
        seq = ev["seq"]
        if seg is None:
            seg = segs[i] = _new(i, agent, seq, ms)
        else:
            if seq > seg[S_HI]:
                seg[S_HI] = seq
            elif seq < seg[S_LO]:
                seg[S_LO] = seq
            if ms - seg[S_LAST] > seg[S_GB] - seg[S_GA]:
                seg[S_GA] = seg[S_LAST]
                seg[S_GB] = ms
            seg[S_LAST] = ms
        seg[S_NEV] += 1
        kind = ev["kind"]
        extend = ev.get("extend")
        interval = ev.get("interval")
        if interval is not None:  # a start declares it; pulses repeat it (PROTOCOL.md)
            seg[S_IV] = float(interval)
        if kind == "beat":
            if not seg[S_BEAT]:
                seg[S_FBEAT] = ms
            elif seg[S_PSB] and ms - seg[S_BEAT] > seg[S_BB] - seg[S_BA]:
                seg[S_BA] = seg[S_BEAT]
                seg[S_BB] = ms
            seg[S_PSB] = 0
            seg[S_BEAT] = ms
            seg[S_NBEAT] += 1
            # A beat ends any extension announced before it (PROTOCOL.md: extend).
            seg[S_XU] = ms + int(extend * 1000) if extend else 0
            seg[S_XBEAT] = 1
            seg[S_STACK] = False
            _add_fp(seg, ev.get("fp"))
            continue
        if extend:
            seg[S_XU] = max(seg[S_XU], ms + int(extend * 1000))
        if kind == "pulse":
            if seg[S_PULSE]:
                seg[S_PGAP] = ms - seg[S_PULSE]
            seg[S_PULSE] = ms
            if seg[S_BEAT]:
                seg[S_PSB] = 1
            else:
                seg[S_PBF] = 1
            rss = ev.get("rss")
            if rss is not None:
                if not seg[S_RMS]:
                    seg[S_RMS] = ms
                    seg[S_RKB] = rss // 1024
                elif seg[S_RSSX] is False:
                    seg[S_RSSX] = [ms, rss // 1024]
                else:
                    seg[S_RSSX] += (ms, rss // 1024)
            stack = ev.get("stack")
            if stack:
                seg[S_STACK] = stack
                seg[S_STACKMS] = ms
        elif kind == "start":
            seg[S_START] = ms
            if interval is None:
                seg[S_IV] = -1  # a start without one declares none: the run has no interval
            parent = ev.get("parent")
            seg[S_CHILD] = run_hash(parent) if isinstance(parent, str) and parent else 0
        else:  # exit
            # No code: the producer could not know it (PROTOCOL.md); false, never a made-up 0.
            seg[S_EXIT] = [ms, ev.get("reason", "exit"), ev.get("code", False), ev.get("error") or "",
                           ev.get("traceback") or ""]  # fmt: skip
    return segs


def _add_fp(seg: list[Any], fp: str | None) -> None:
    """Run-length encode the beats' fingerprints (hash 0: a beat without one)."""
    h = (zlib.crc32(fp.encode()) or 1) if fp else 0
    extra = seg[S_FPX]
    if not seg[S_FPC]:
        seg[S_FPH], seg[S_FPC], seg[S_FPTEXT] = h, 1, fp_text(fp)
    elif extra is False:
        if seg[S_FPH] == h:
            seg[S_FPC] += 1
        else:
            seg[S_FPX] = [h, 1, fp_text(fp)]
    elif extra[-3] == h:
        extra[-2] += 1
    else:
        extra += (h, 1, fp_text(fp))
