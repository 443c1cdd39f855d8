"""Where the detector group stands in each event stream: the horizon, what waits, what was lost.

* The **horizon** of a stream: every event older than this (Redis ms) has been applied; nothing
  older is undelivered or delivered but unacknowledged. The timer checks never judge an agent
  past its shard's horizon, because its missing beat may be sitting in the stream, unread
  (detectors/engine.py, ``Engine._check``); the lag detector alerts when it falls far behind (lag.py).
* **Trimmed unread**: producers cap the stream (``XADD MAXLEN ~``) and workers trim it by age, so
  a flooding agent, or workers that fall far enough behind, can trim entries nobody has read.
  Redis counts what the group read (``entries-read``) and what was ever added to the stream
  (``entries-added``); what passed the group's position without being read is

      lost = entries-added - entries-read - (entries still in the stream after that position)

  and the last term is known exactly in two states: the group's last delivered entry is older
  than the stream's first entry (the trim overtook it: every entry in the stream is unread), or
  it is the stream's last entry (caught up: none is). ``lost`` only grows (entries-read counts
  deliveries), so lag.py counts each loss once against a high-water mark.

One pipelined round trip (XINFO GROUPS and XINFO STREAM per stream), plus an XRANGE or XPENDING
only for a stream the group is behind in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agentwatch.codec import entry_ms
from agentwatch.keys import DETECTORS_GROUP


@dataclass
class Positions:
    """The detector group's position in every event stream (see the module docstring)."""

    horizons: list[int]
    waiting: int = 0
    """Events not yet applied: undelivered and unacknowledged, over all streams."""
    lost: list[int | None] = field(default_factory=list)
    """Per stream: events trimmed before the group read them, in all (None: not known now)."""
    unread: int | None = 0
    """Events no detector has read yet, over all streams (None: Redis cannot say now)."""
    pending: int = 0
    """Events read but not yet acknowledged, over all streams."""
    oldest_pending_ms: int | None = None
    group_missing: bool = False
    """A stream holds events but no detector group ever read it (every event is unread)."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id(value: Any) -> tuple[int, int]:
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)


def read_positions(client: Any, streams: list[str], now_ms: int, lost_before: list[int]) -> Positions:
    """The group's position in ``streams`` at Redis time ``now_ms``. ``lost_before``: per stream,
    the losses known from an earlier call (to tell waiting events from lost ones while the
    exact count is not known)."""
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xinfo_groups(stream)
        pipe.xinfo_stream(stream)
    replies = pipe.execute(raise_on_error=False)
    out = Positions(horizons=[], lost=[])
    for k, stream in enumerate(streams):
        groups, info = replies[2 * k], replies[2 * k + 1]
        horizon, lost = now_ms, None
        group = None
        if not isinstance(groups, Exception):  # an error: no such stream, nothing ever sent on it
            group = next((g for g in groups if _text(g["name"]) == DETECTORS_GROUP), None)
            if group is None and isinstance(info, dict) and info.get("length"):
                out.group_missing = True  # no detector worker ever ran here
                out.waiting += int(info["length"])
                out.unread = None if out.unread is None else out.unread + int(info["length"])
                first = info.get("first-entry")
                if first:
                    horizon = min(horizon, entry_ms(first[0]))
        if group is not None:
            delivered = _id(group["last-delivered-id"])
            known = isinstance(info, dict) and info.get("entries-added") is not None
            if known:
                lost = _lost(group, info, delivered)
            behind = group.get("lag")  # None: Redis < 7, or not known after deletions
            if known:
                behind = 0 if _id(info.get("last-generated-id") or "0-0") <= delivered else behind
            if behind is None or behind > 0:
                first = client.xrange(stream, min=f"({_text(group['last-delivered-id'])}", count=1)
                if first:  # the oldest entry no worker has read yet
                    horizon = min(horizon, entry_ms(first[0][0]))
                    gone = lost if lost is not None else lost_before[k] if k < len(lost_before) else 0
                    out.waiting += max(1, int(behind or 1) - gone)
                    if behind is None or out.unread is None:
                        out.unread = None
                    else:
                        out.unread += max(1, int(behind) - gone)
            if group["pending"]:
                summary = client.xpending(stream, DETECTORS_GROUP)
                if summary and summary.get("min"):
                    oldest = entry_ms(summary["min"])
                    horizon = min(horizon, oldest)
                    out.oldest_pending_ms = min(out.oldest_pending_ms or oldest, oldest)
                out.waiting += int(group["pending"])
                out.pending += int(group["pending"])
        out.horizons.append(horizon)
        out.lost.append(lost)
    return out


def _lost(group: dict[str, Any], info: dict[str, Any], delivered: tuple[int, int]) -> int | None:
    """Events trimmed past the group's position without being read, in all; None: not known."""
    read = group.get("entries-read")
    if read is None:  # not counted yet (the group never read) or after deletions
        return None
    added, length = int(info["entries-added"]), int(info.get("length") or 0)
    first = info.get("first-entry")
    if length and first and delivered < _id(first[0]):
        unread = length  # the trim overtook the group: everything left is unread
    elif _id(info.get("last-generated-id") or "0-0") <= delivered:
        unread = 0  # caught up
    else:
        return None
    return max(0, added - int(read) - unread)
