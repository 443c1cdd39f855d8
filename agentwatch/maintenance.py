"""Maintenance windows: stretches of time during which nothing pages for the agents they cover.

Two kinds, one shape (:class:`Window`):

* recurring, from ``[[maintenance]]`` in pipeline.toml: a cron ``schedule`` of start times in
  ``[report] timezone`` (agentwatch/cron.py, the one parser) and a ``duration``;
* ad hoc, from ``agentwatch maintenance start`` for a deploy: kept in the hash
  ``<prefix>:maintenance`` until a day after it ended, and ended early by
  ``agentwatch maintenance stop`` (which moves its end to now rather than deleting it: the fresh
  allowance after a window counts from its end, so the record must outlive the window).

A window covers an agent by agent glob and/or label globs (``labels.matches``, the same rule
as a notifier's ``match.labels``). Windows may overlap: what they cover is their union. What a
window *does* to alerts (hold them, then a fresh allowance) is decided in one place,
notifiers/holds.py; this module only says which windows exist and whom they cover.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

from agentwatch import labels as labels_mod
from agentwatch.config import MAX_MAINTENANCE_S, MaintenanceEntry, duration_text
from agentwatch.cron import Cron, CronError
from agentwatch.keys import Keys
from agentwatch.redisconn import Client, server_time_ms

KEEP_ENDED_MS: Final = 86_400_000
"""How long an ended ad-hoc window is kept: its fresh allowance runs from its end, and an
allowance longer than a day is a batch job's, which a deploy window does not need to cover."""
_NEVER_ENDS_SLOTS: Final = 512
"""Start times looked at to tell a schedule whose windows never end (each starting before the
previous one is over): enough for a year of daily windows or a week of ``*/20`` ones."""

Source = Literal["schedule", "adhoc"]


@dataclass(frozen=True)
class Window:
    """One maintenance window: whom it covers, from ``start_ms`` until ``end_ms`` (Redis time)."""

    id: str
    agents: tuple[str, ...]
    labels: dict[str, str]
    start_ms: int
    end_ms: int
    source: Source
    reason: str = ""
    by: str = ""
    stopped: bool = False
    schedule: str | None = None

    def covers(self, agent: str, agent_labels: Mapping[str, str] | None) -> bool:
        """Whether this window is about ``agent`` (its name, and its labels when it has a
        ``labels`` selector): every selector given must match."""
        named = self._named
        if named is not None and named(agent) is None:
            return False
        labelled = self._labelled
        return labelled is None or labelled(agent_labels)

    @functools.cached_property
    def _named(self) -> Callable[[str], re.Match[str] | None] | None:
        """Its agent globs as one compiled test (None: it names no agent), made once a window."""
        return any_glob(self.agents) if self.agents else None

    @functools.cached_property
    def _labelled(self) -> Callable[[object], bool] | None:
        """Its label selector compiled (None: it has none), made once a window."""
        return labels_mod.matcher(self.labels) if self.labels else None

    def in_force(self, now_ms: int) -> bool:
        return self.start_ms <= now_ms < self.end_ms

    def to_dict(self) -> dict[str, Any]:
        """The ``status --json`` / ``maintenance list --json`` shape (times in ms and ISO)."""
        from agentwatch.alerts import iso_ms  # noqa: PLC0415 - alerts imports the signing stack

        out = asdict(self)
        out["agents"] = list(self.agents)
        out["start"], out["end"] = iso_ms(self.start_ms), iso_ms(self.end_ms)
        return out


@functools.lru_cache(maxsize=256)
def any_glob(globs: tuple[str, ...]) -> Callable[[str], re.Match[str] | None]:
    """A test of a name against every glob of ``globs`` at once (``fnmatchcase``'s rule: case
    matters, the whole name): one compiled regex, built once per set of globs. A notifier asks
    it for every alert of a storm, each of a different agent, which no per-agent cache helps;
    one ``match`` costs a third of the ``fnmatchcase`` calls it replaces."""
    return re.compile("|".join(fnmatch.translate(glob) for glob in globs)).match


def covering(windows: Sequence[Window]) -> Callable[[str, Mapping[str, str] | None], list[Window]]:
    """A test of which of ``windows`` cover an agent (its name, its labels), made once for a set
    of windows (notifiers/holds.py: once per batch) and asked for every alert: mostly, in a storm,
    of agents no window is about. One regex of every window's agent globs answers for all the
    windows that name agents at once; only the windows that name none (labels alone) are asked
    one by one; the windows' own :meth:`Window.covers` decides whatever passes."""
    named = tuple(sorted({glob for window in windows for glob in window.agents}))
    any_named = any_glob(named) if named else None
    unnamed = [(window, window._labelled) for window in windows if not window.agents]

    def of(agent: str, agent_labels: Mapping[str, str] | None) -> list[Window]:
        if any_named is not None and any_named(agent) is not None:
            return [window for window in windows if window.covers(agent, agent_labels)]
        found = []
        for window, labelled in unnamed:  # (covers(), for a window that names no agent; a loop:
            if labelled is None or labelled(agent_labels):  # ~0.3 us less than a comprehension)
                found.append(window)
        return found

    return of


def never_ends_problem(entry: MaintenanceEntry, timezone: str = "UTC") -> str | None:
    """Why the windows of ``entry`` would never end (every one starts before the one before it
    is over, so their union is endless), or None. Overlapping windows are fine otherwise."""
    cron = Cron.parse(entry.schedule, timezone)
    t = time.time()  # no Redis at check-config; only the shape of the schedule matters here
    previous_end: float | None = None
    for _ in range(_NEVER_ENDS_SLOTS):
        start = cron.next_after(t)
        if previous_end is not None and start > previous_end:
            return None
        previous_end = start + entry.duration_s
        t = start
    return (
        f"windows of {duration_text(entry.duration_s)} starting {entry.schedule!r} never end: each "
        "one starts before the one before it is over; make duration shorter than the time between starts"
    )


def config_problems(entries: Sequence[MaintenanceEntry], timezone: str) -> list[str]:
    """check-config lines for ``[[maintenance]]`` entries that parse but cannot work: a schedule
    whose windows never end, or one that does not parse in ``[report] timezone``."""
    problems = []
    for index, entry in enumerate(entries):
        try:
            problem = never_ends_problem(entry, timezone)
        except CronError as exc:
            problem = str(exc)
        if problem is not None:
            problems.append(f"[maintenance.{index}] schedule: {problem}")
    return problems


def scheduled(entries: Sequence[MaintenanceEntry], timezone: str, now_ms: int) -> list[Window]:
    """The latest window of each ``[[maintenance]]`` entry that started at or before ``now_ms``
    (in force or already over: its fresh allowance may still run). The latest start has the
    latest end, so overlapping windows of one entry need no more than it."""
    out = []
    for index, entry in enumerate(entries):
        start = _latest_start(entry.schedule, timezone, now_ms / 1000)
        out.append(
            Window(
                id=f"schedule:{index}",
                agents=tuple(entry.agents),
                labels=dict(entry.labels),
                start_ms=int(start * 1000),
                end_ms=int((start + entry.duration_s) * 1000),
                source="schedule",
                reason=entry.reason,
                schedule=entry.schedule,
            )
        )
    return out


_LATEST: dict[tuple[str, str], tuple[float, float]] = {}
"""(schedule, timezone) -> (its latest start, the start after it): the same until then."""


def _latest_start(schedule: str, timezone: str, now_s: float) -> float:
    """``Cron.last_at_or_before(now_s)`` of a window's schedule, computed once per window, not
    per call: a notifier asks at every batch (notifiers/holds.py), ~0.1 ms a schedule."""
    key = (schedule, timezone)
    known = _LATEST.get(key)
    if known is not None and known[0] <= now_s < known[1]:
        return known[0]
    cron = Cron.parse(schedule, timezone)
    start = cron.last_at_or_before(now_s)
    if len(_LATEST) >= 256:
        _LATEST.clear()
    _LATEST[key] = (start, cron.next_after(start))
    return start


def next_start_ms(entry: MaintenanceEntry, timezone: str, now_ms: int) -> int:
    """When the next window of ``entry`` begins (for ``maintenance list``)."""
    return int(Cron.parse(entry.schedule, timezone).next_after(now_ms / 1000) * 1000)


class AdhocWindows:
    """The ad-hoc windows of one deployment, in one small hash (read whole)."""

    def __init__(self, client: Client, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._redis: Any = client

    def start(
        self,
        for_s: float,
        *,
        agents: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
        reason: str = "",
        by: str = "",
    ) -> Window:
        """Open a window now for ``for_s`` seconds (0 < for_s <= 7 days)."""
        if not 0 < for_s <= MAX_MAINTENANCE_S:
            most = duration_text(MAX_MAINTENANCE_S)
            raise ValueError(f"a maintenance window lasts more than 0s and at most {most}")
        if not agents and not labels:
            raise ValueError("say whom it covers: an agent glob and/or a label")
        now = server_time_ms(self.client)
        window = Window(
            id=os.urandom(4).hex(),
            agents=tuple(agents),
            labels=dict(labels or {}),
            start_ms=now,
            end_ms=now + int(for_s * 1000),
            source="adhoc",
            reason=reason,
            by=by,
        )
        self._redis.hset(self.keys.maintenance, window.id, _encode(window))
        return window

    def stop(self, window_id: str | None = None) -> list[Window]:
        """End the windows in force now (all of them, or the one with ``window_id``); their
        fresh allowance starts now. Returns the windows stopped."""
        now = server_time_ms(self.client)
        stopped = []
        for window in self.all(now):
            if (window_id is None or window.id == window_id) and window.in_force(now):
                done = Window(**{**asdict(window), "agents": window.agents, "end_ms": now, "stopped": True})
                self._redis.hset(self.keys.maintenance, window.id, _encode(done))
                stopped.append(done)
        return stopped

    def all(self, now_ms: int) -> list[Window]:
        """Every ad-hoc window in force or ended less than a day ago; older ones are deleted."""
        out, old = [], []
        for raw_id, raw in self._redis.hgetall(self.keys.maintenance).items():
            window = _decode(raw)
            if window is None or window.end_ms + KEEP_ENDED_MS <= now_ms:
                old.append(raw_id)
            else:
                out.append(window)
        if old:
            self._redis.hdel(self.keys.maintenance, *old)
        return sorted(out, key=lambda w: w.start_ms)


def windows(client: Client, keys: Keys, entries: Sequence[MaintenanceEntry], timezone: str,
            now_ms: int) -> list[Window]:  # fmt: skip
    """Every window that may matter at ``now_ms``: each entry's latest, and the ad-hoc ones."""
    return [*scheduled(entries, timezone, now_ms), *AdhocWindows(client, keys).all(now_ms)]


def _encode(window: Window) -> str:
    return json.dumps(asdict(window), separators=(",", ":"))


def _decode(raw: bytes | str) -> Window | None:
    """A stored window, or None for an entry that is not one (hand-edited: ignored, deleted)."""
    try:
        data = json.loads(raw)
        data["agents"] = tuple(str(glob) for glob in data.get("agents") or ())
        window = Window(**data)
    except (ValueError, TypeError, AttributeError):
        return None
    shapes = [(window.start_ms, int), (window.end_ms, int), (window.id, str), (window.reason, str),
              (window.by, str), (window.labels, dict)]  # fmt: skip
    if not all(isinstance(value, kind) and not isinstance(value, bool) for value, kind in shapes):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in window.labels.items()):
        return None
    return window
