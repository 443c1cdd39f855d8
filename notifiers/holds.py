"""Holds: the ONE place that decides when an alert waits for a fresh allowance instead of paging.

Two reasons to hold, one mechanism. Both are decided here, in the notifiers, and nowhere else:
the detectors (a Lua engine that issue 12 will rewrite) are left exactly as they are, and keep
firing and resolving incidents on their own clocks.

**Maintenance** (``[[maintenance]]``, ``agentwatch maintenance start``; agentwatch/maintenance.py).
An alert of an agent a window covers is held when it fires (or, for an alert read late, was
raised) between the window's start and its end plus the agent's *allowance* (its silence
allowance: ``max(after, 3 x interval)``, the ``allowance_s`` a silence alert carries; a cron
agent's ``grace``). It is
released at the end of that span only if its incident is still open. That is the "fresh
allowance" of Healthchecks and Alertmanager without touching the timers: an agent stopped in the
window and back within one allowance of its end never pages; one still down then pages once,
with its original alert; one that fails after the span pages at once.

**Dependencies** (``depends_on``; agentwatch/dependencies.py). A firing *silence* (or a cron
agent's missed run, ``schedule``) of an agent with ``depends_on`` is held while an agent matching
that glob is down (an open ``silence``, ``exit``, ``stall`` or ``schedule`` incident), or the
pipeline is (an open ``lag``/``trimmed`` incident of the agent ``agentwatch``: its Redis or its
workers), and recorded under that parent in ``<prefix>:dependents`` (``status`` lists it). A
parent that is overdue but has not fired yet (a host that took both down: the child's silence
may fire first) is waited for, at most one allowance of the child's. When the parent recovers,
the child gets a fresh allowance from then; still silent after it, it pages on its own. A hold
that would close a cycle at run time (globs the start-up check could not see
through) is not taken: the child pages.

A parent's own alerts list what is held for it (``details.held``: :meth:`Holds.held_details`),
and a held dependent's reminders are held with its firing (a reminder stands for its
``first_alert``).

Held alerts ride on the mute machinery (notifiers/base.py ``_mute``/``_release_held``, the
``held`` hash of notifiers/queue.py): recorded as ``maintenance`` or ``dependency`` in the
delivery log, released when nothing holds them any more if their incident is still open, and
an incident that began and ended while held is never sent (neither its firing nor its resolve).
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from agentwatch.alerts import PIPELINE_AGENT, Alert, Incidents, iso_ms
from agentwatch.config import PipelineSettings, format_duration
from agentwatch.dependencies import MAX_CHAIN, Dependents, DependsOnConfig, Held
from agentwatch.facts import read_facts
from agentwatch.keys import Keys
from agentwatch.maintenance import Window, any_glob, covering, windows
from agentwatch.redisconn import Client

DOWN_DETECTORS: Final = ("silence", "exit", "stall", "schedule")
"""An agent with an open incident of one of these is down, for the agents that depend on it."""
PIPELINE_DOWN: Final = ("lag", "trimmed")
"""Incidents of the pipeline itself (agent ``agentwatch``) that make every dependent's silence
a consequence: the detectors or their Redis were away."""
SILENT: Final = ("silence", "schedule")
"""The alerts a dependency holds: an agent's silence, or a cron agent's missed run (the same
thing for an agent expected once per slot, detectors/schedule.py)."""
DEFAULT_ALLOWANCE_S: Final = 60.0
"""The silence detector's default ``after``: the allowance when no silence config is known."""
_NAMES_EVERY_S: Final = 10.0
"""How often the agent names a dependency glob is matched against are re-read."""
MAX_HELD_LISTED: Final = 100
"""Held dependents a parent's alert lists in ``details.held`` (the rest are counted)."""
_MAX_CANDIDATES: Final = 100
"""Parents at most read for one child while waiting for them to fire (a glob naming thousands
of agents is not a dependency)."""

Kind = Literal["maintenance", "dependency"]


@dataclass(frozen=True)
class Hold:
    """Why an alert is held: ``kind`` (the delivery log's outcome) and a line for a person."""

    kind: Kind
    detail: str


class Holds:
    """Built once per notifier worker (shared by its notifiers); :meth:`view` once per batch."""

    def __init__(
        self, client: Client, keys: Keys, settings: PipelineSettings, silence: DependsOnConfig | None
    ) -> None:
        self.client: Any = client
        self.keys = keys
        self.settings = settings
        self.silence = silence
        self.dependents = Dependents(client, keys)
        self.incidents = Incidents(client, keys)
        """Read only here (who is down), never published through: made once, not per batch."""
        self._names: list[str] = []
        self._names_at = 0.0
        overrides = silence.agents.values() if silence else []
        globs = {silence.depends_on if silence else "", *(o.get("depends_on") for o in overrides)}
        self._parent_globs = sorted(g for g in globs if isinstance(g, str) and g)
        """The ``depends_on`` globs: the agents whose alerts may list held dependents."""
        self._any_depends = bool(self._parent_globs)
        self._is_parent = any_glob(tuple(self._parent_globs)) if self._any_depends else None

    def view(self, now_ms: int, *, adhoc: bool | None = None) -> HoldView:
        """``adhoc``: whether ad-hoc windows exist, when the caller read it already (else the
        view asks Redis when it first needs to know)."""
        return HoldView(self, now_ms, adhoc)

    def allowance_ms(self, alert: Alert) -> int:
        """The agent's silence allowance: what its alert says (a silence's ``allowance_s``, a
        missed slot's ``grace_s``), else a scheduled agent's ``grace``, else ``max(after, 3 x its
        declared interval)`` from the config and its start facts."""
        for key in ("allowance_s", "grace_s"):
            said = alert.details.get(key)
            if isinstance(said, int | float) and not isinstance(said, bool) and said > 0:
                return int(said * 1000)
        config = self.silence.for_agent(alert.agent) if self.silence else None
        grace = getattr(config, "grace_s", None) if getattr(config, "schedule", None) else None
        if isinstance(grace, int | float) and grace > 0:
            return int(grace * 1000)  # a cron agent: its next run is due within a grace
        after = getattr(config, "after_s", None)
        after_s = float(after) if isinstance(after, int | float) else DEFAULT_ALLOWANCE_S
        fact = read_facts(self.client, self.keys, [alert.agent]).get(alert.agent, {})
        interval = fact.get("interval")
        interval_s = float(interval) if isinstance(interval, int | float) else 0.0
        return int(max(after_s, 3 * interval_s) * 1000)

    def held_details(self, alert: Alert) -> dict[str, Any]:
        """What a parent's alert adds to its details: ``held``, the dependents whose silence is
        held for it (``agent``, ``detector``, ``since``), so the page about the parent says what
        else is down because of it; ``held_more`` counts those past :data:`MAX_HELD_LISTED`.
        A firing (or a reminder) lists those held now; a resolve, those held during the
        incident (each gets its fresh allowance from now). Empty for any other alert: read
        from Redis only for an agent some ``depends_on`` names (or the pipeline's own)."""
        is_parent = self._is_parent  # (None: no depends_on at all)
        if is_parent is None or "group" in alert.details:
            return {}
        if alert.agent == PIPELINE_AGENT:
            if alert.detector not in PIPELINE_DOWN:
                return {}
        elif alert.detector not in DOWN_DETECTORS or is_parent(alert.agent) is None:
            return {}  # not down, or no depends_on names it (asked of every alert a notifier queues)
        firing = alert.status == "firing"
        held = sorted(
            (record.since_ms, key.rpartition("/")[2], record.child)
            for key, record in self.dependents.all().items()
            if record.parent == alert.agent and not (firing and record.free_at_ms)
        )
        if not held:
            return {}
        listed = [{"agent": child, "detector": detector, "since": iso_ms(since)}
                  for since, detector, child in held[:MAX_HELD_LISTED]]  # fmt: skip
        more = len(held) - len(listed)
        return {"held": listed, **({"held_more": more} if more > 0 else {})}

    def agent_names(self) -> list[str]:
        """Every agent with detector state (cached for a few seconds)."""
        now = time.monotonic()
        if now - self._names_at > _NAMES_EVERY_S:
            names: list[str] = []
            for shard in range(max(self.keys.shards, 1)):
                names += [_text(n) for n in self.client.hkeys(self.keys.states(shard))]
            self._names, self._names_at = names, now
        return self._names


@dataclass
class HoldView:
    """The holds as of one moment: windows read once, incidents read when first needed."""

    holds: Holds
    now_ms: int
    adhoc: bool | None = None
    """Whether ad-hoc windows exist (None: not read yet)."""
    _covering: Callable[[str, Mapping[str, str] | None], list[Window]] | None = None
    """Which windows cover an agent (``maintenance.covering``), once the windows are read."""
    _no_windows: bool = False
    """No window exists at all (the usual case): no alert is looked at for them."""
    _decided: dict[tuple[str, bool], Hold | None] = field(default_factory=dict)
    _records: dict[str, Held] | None = None
    _down: dict[str, list[str]] = field(default_factory=dict)
    _overdue: dict[str, list[str]] = field(default_factory=dict)
    _pipeline: bool | None = None
    _nothing: bool | None = None
    """Whether no dependency can hold anything now (:meth:`_idle`; None: not known yet)."""

    def why(self, alert: Alert, *, releasing: bool = False) -> Hold | None:
        """Why ``alert`` must wait, or None to send it. ``releasing``: it is already held and
        the question is whether it may go now (its own time no longer counts, only now)."""
        memo = (alert.id, releasing)
        decided = self._decided
        if memo in decided:
            return decided[memo]
        found = decided[memo] = self._maintenance(alert, releasing) or self._dependency(alert)
        return found

    # -- maintenance ------------------------------------------------------------------------------
    def _maintenance(self, alert: Alert, releasing: bool) -> Hold | None:
        if self._no_windows:
            return None
        covers = self._covering
        if covers is None:
            holds, settings = self.holds, self.holds.settings
            found_windows = (
                windows(holds.client, holds.keys, settings.maintenance, settings.report.timezone, self.now_ms)
                if settings.maintenance
                or (self.adhoc if self.adhoc is not None else holds.client.exists(holds.keys.maintenance))
                else []
            )
            self._no_windows = not found_windows
            if self._no_windows:
                return None
            covers = self._covering = covering(found_windows)
        found = alert.details.get("labels")
        mine = covers(alert.agent, found if isinstance(found, dict) else None)
        if not mine:
            return None
        holds = self.holds
        allowance = holds.allowance_ms(alert)
        times = (self.now_ms,) if releasing else (self.now_ms, alert.at_ms)
        for window in mine:
            if any(window.start_ms <= t < window.end_ms + allowance for t in times):
                what = "in force" if window.in_force(self.now_ms) else "over"
                until = iso_ms(window.end_ms + allowance)
                name = f"{window.source} {window.schedule or window.id}"
                return Hold("maintenance", f"maintenance window {name} {what}; held until {until} "
                            f"(its end + {format_duration(allowance / 1000)} allowance)")  # fmt: skip
        return None

    # -- dependencies -----------------------------------------------------------------------------
    def _dependency(self, alert: Alert) -> Hold | None:
        if self._nothing or alert.detector not in SILENT:  # (known idle: the storm's usual answer)
            return None
        holds = self.holds
        if not holds._any_depends or holds.silence is None or self._idle():
            return None
        glob = holds.silence.for_agent(alert.agent).depends_on
        if not glob:
            return None
        key = alert.dedup_key
        if alert.status == "resolved":
            if key in self.records():
                holds.dependents.drop(key)  # back: its held firing (if any) is dropped by the queue
                self.records().pop(key, None)
            return None
        # A reminder stands for its firing (``first_alert``): held while that is.
        reminder = bool(alert.details.get("reminder"))
        alert_id = str(alert.details.get("first_alert") or "") if reminder else alert.id
        record = self.records().get(key)
        if record is not None and record.alert != alert_id:
            record = None  # about an earlier incident of the child's
        if reminder and record is None:
            return None  # a reminder of a page already sent: the parent came too late to hold it
        parent = self._down_parent(alert.agent, glob)
        if parent is not None and not self._closes_cycle(parent, alert.agent):
            if record is None or record.parent != parent or record.free_at_ms:
                since = record.since_ms if record is not None else self.now_ms
                self._put(key, Held(alert.agent, parent, since, alert=alert_id))
            return Hold("dependency", f"depends on {parent!r} ({glob}), which is down")
        if record is not None:
            free_at = record.free_at_ms
            if not free_at:
                free_at = self.now_ms + holds.allowance_ms(alert)
                self._put(key, Held(alert.agent, record.parent, record.since_ms, free_at, alert_id))
            if self.now_ms < free_at:
                until = iso_ms(free_at)
                return Hold("dependency", f"{record.parent!r} recovered; a fresh allowance until {until}")
            return None
        waiting = self._going_down(alert, glob)
        if waiting is not None:
            return Hold("dependency", f"waiting for {waiting!r} ({glob}): overdue, it may be down too")
        return None

    def _idle(self) -> bool:
        """Whether no dependency can hold anything in this view: nothing held, and no agent of
        any ``depends_on`` glob (nor the pipeline) down or overdue. Then every alert of a storm
        is sent without its own look-up of its agent's glob (once per view, not per alert)."""
        if self._nothing is None:
            busy = any(self._down_of(glob) or self._overdue_of(glob) for glob in self.holds._parent_globs)
            self._nothing = not self.records() and not busy
        return self._nothing

    def _down_of(self, glob: str) -> list[str]:
        down = self._down.get(glob)
        if down is None:
            down = self._down[glob] = self._find_down(glob)
        return down

    def _overdue_of(self, glob: str) -> list[str]:
        overdue = self._overdue.get(glob)
        if overdue is None:
            overdue = self._overdue[glob] = sorted(self._find_overdue(glob))
        return overdue

    def records(self) -> dict[str, Held]:
        """The held silences (``<prefix>:dependents``, a handful), read once per view."""
        if self._records is None:
            self._records = self.holds.dependents.all()
        return self._records

    def _put(self, key: str, held: Held) -> None:
        self.holds.dependents.put(key, held)
        self.records()[key] = held

    def _down_parent(self, child: str, glob: str) -> str | None:
        """An agent matching ``glob`` (not ``child``) that is down now, or the pipeline. The down
        agents of a glob are found once per view: a host loss fires thousands of silences at
        once, and each must not scan every open incident again."""
        return _first_but(self._down_of(glob), child)

    def _find_down(self, glob: str) -> list[str]:
        """The agents matching ``glob`` with an open incident that means down, and the pipeline
        when it is down. Redis picks the incidents of the glob's agents (``HSCAN MATCH``: its
        globs read ``*`` and ``?`` as fnmatch does; a glob with ``[`` reads every key), so a
        batch does not fetch every open incident of a fleet that is partly down."""
        incidents = self.holds.incidents
        found = {PIPELINE_AGENT} if self._pipeline_down(incidents) else set()
        for key in incidents.open_keys(None if "[" in glob else f"{glob}/*"):
            agent, _, detector = key.rpartition("/")
            if detector in DOWN_DETECTORS and fnmatch.fnmatchcase(agent, glob):
                found.add(agent)
        return sorted(found)

    def _pipeline_down(self, incidents: Incidents) -> bool:
        """Whether the pipeline has an open ``lag``/``trimmed`` incident (once per view): its two
        incidents read by name, not found by a scan of every open incident of its shard, which a
        fleet-wide outage fills with thousands (benchmarks/maintenance_holds.py)."""
        if self._pipeline is None:
            self._pipeline = incidents.any_open(PIPELINE_AGENT, PIPELINE_DOWN)
        return self._pipeline

    def _closes_cycle(self, parent: str, child: str) -> bool:
        """Whether ``parent``'s own silence is held, through a chain, for ``child``."""
        seen = parent
        for _ in range(MAX_CHAIN):
            records = self.records()
            record = records.get(f"{seen}/silence") or records.get(f"{seen}/schedule")
            if record is None or record.free_at_ms:
                return False
            if record.parent == child:
                return True
            seen = record.parent
        return True

    def _going_down(self, alert: Alert, glob: str) -> str | None:
        """A parent that is overdue (no event for twice its declared interval, or half its
        allowance: the ``late`` of ``agentwatch status``) and may fire any moment: wait for its
        verdict, at most one allowance of the child's past the child's own alert."""
        candidate = _first_but(self._overdue_of(glob), alert.agent)
        if candidate is None or self.now_ms >= alert.at_ms + self.holds.allowance_ms(alert):
            return None
        return candidate

    def _find_overdue(self, glob: str) -> set[str]:
        """The agents matching ``glob`` that are overdue (once per view and glob)."""
        from detectors.agent import read_agents  # noqa: PLC0415 - notifiers import detectors lazily

        holds = self.holds
        names = [n for n in holds.agent_names() if fnmatch.fnmatchcase(n, glob)]
        overdue = set()
        for name, record in read_agents(holds.client, holds.keys, names[:_MAX_CANDIDATES]).items():
            seen, interval = int(record.get("seen_ms", 0)), float(record.get("interval_s") or 0.0)
            after = getattr(holds.silence.for_agent(name), "after_s", None) if holds.silence else None
            late_ms = 2000 * interval if interval else 500 * float(after or DEFAULT_ALLOWANCE_S)
            if not record.get("retired") and seen and self.now_ms - seen > late_ms:
                overdue.add(name)
        return overdue


def for_pipeline(client: Client, keys: Keys, settings: PipelineSettings, detectors: list[Any]) -> Holds:
    """The holds of a notifier worker: the silence config (with its per-agent ``depends_on`` and
    ``after``) from the loaded detectors, else validated from ``[detectors.silence]``."""
    silence = next((p.config for p in detectors if isinstance(p.config, DependsOnConfig)), None)
    if silence is None and not detectors:
        from agentwatch import plugins  # noqa: PLC0415

        loaded, _ = plugins.load_detectors({"silence": settings.detectors.get("silence", {})})
        silence = next((p.config for p in loaded if isinstance(p.config, DependsOnConfig)), None)
    return Holds(client, keys, settings, silence)


def _first_but(names: list[str], agent: str) -> str | None:
    """The first of sorted ``names`` that is not ``agent`` (an agent never waits for itself)."""
    for name in names[:2]:
        if name != agent:
            return name
    return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
