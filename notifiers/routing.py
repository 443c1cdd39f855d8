"""Which alerts reach which notifier: each notifier's ``match``, and mutes shared by all of them.

A ``match`` is static config (agent globs, detectors, a minimum severity, statuses). A mute is
operator state in Redis (``agentwatch mute "scraper-*" --for 1h``): it silences matching alerts
for every notifier until it expires by itself. Muted alerts are still on the alerts stream and
recorded in the delivery log as ``muted``; they are not sent while the mute lasts, and what is
still true when it ends is sent then (notifiers/base.py, ``_release_held``).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

from pydantic import Field

from agentwatch import labels, plugins
from agentwatch.alerts import SEVERITIES, Alert
from agentwatch.config import Section
from agentwatch.errors import PluginError
from agentwatch.halts import DETECTOR as HALT_DETECTOR
from agentwatch.keys import Keys
from agentwatch.otlp import CAP_DETECTOR as OTLP_DETECTOR
from agentwatch.redisconn import Client, server_time_ms

Severity = Literal["info", "warning", "error", "critical"]
StatusName = Literal["firing", "resolved"]
_STATUSES: tuple[StatusName, ...] = ("firing", "resolved")


class Match(Section):
    """``match = { agents = ["prod-*"], detectors = ["silence"], severity = "error",
    labels = { team = "search" } }``."""

    agents: list[str] = Field(default_factory=lambda: ["*"], description="globs on the agent name")
    detectors: list[str] = Field(default_factory=list, description="detector names; empty: all")
    severity: Severity = Field("info", description="minimum severity")
    statuses: list[StatusName] = Field(default_factory=lambda: list(_STATUSES))
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="label -> glob on its value (details.labels); every one must match, and an "
        "alert without that label does not",
    )

    def matches(self, alert: Alert) -> bool:
        if alert.status not in self.statuses:
            return False
        if self.detectors and alert.detector not in self.detectors:
            return False
        if _rank(alert.severity) < _rank(self.severity):
            return False
        if self.labels and not labels.matches(self.labels, alert.details.get("labels")):
            return False
        return any(fnmatch.fnmatchcase(alert.agent, glob) for glob in self.agents)


def _rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else len(SEVERITIES)


# -- detector names -------------------------------------------------------------------------------
LOOP_DETECTOR: Final = "restart_loop"
"""The detector name of the restart notifier's own "restart loop" alerts."""


def known_detectors(sections: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Every ``detector`` name an alert of this pipeline can carry: each built-in detector's alert
    names (``tokens`` words ``tokens`` and ``loop``), the ``[detectors.<name>]`` sections (plugin
    detectors alert under their section's name, plus any names their class lists in ``kinds``),
    the restart notifier's ``restart_loop``, the brake's ``halt``, the OTLP receiver's
    ``otlp``, and the names of the silence detector's companions (made per instance, so not in
    its class's ``kinds``): ``child`` (a worker process that died, detectors/children.py),
    ``schedule`` and ``runtime`` (cron agents, detectors/schedule.py). ``sections`` is
    ``settings.detectors``."""
    from detectors.children import DETECTOR as CHILD_DETECTOR  # noqa: PLC0415 - detectors import numpy
    from detectors.schedule import MISSED, OVERRAN  # noqa: PLC0415

    names = {LOOP_DETECTOR, HALT_DETECTOR, OTLP_DETECTOR, CHILD_DETECTOR, MISSED, OVERRAN}
    for name in {*plugins.builtins("detectors"), *sections}:
        names.add(name)
        ref = sections.get(name, {}).get("class") or name
        try:
            cls = plugins.resolve("detectors", str(ref))
        except PluginError:
            continue  # config validation reports a class that does not load
        names.update(str(kind) for kind in getattr(cls, "kinds", ()))
    return names


def unknown_detectors(names: Iterable[str], known: set[str]) -> list[str]:
    """A message for each name that is not a known detector, with the closest known name."""
    problems = []
    for name in dict.fromkeys(names):
        if name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"unknown detector {name!r}{hint}; known: {', '.join(sorted(known))}")
    return problems


# -- mutes --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mute:
    """Silence alerts of agents matching ``agent`` (a glob), of one detector or all, until ``until_ms``."""

    agent: str
    detector: str | None
    until_ms: int
    created_ms: int
    reason: str = ""
    by: str = ""

    @property
    def field(self) -> str:
        return mute_field(self.agent, self.detector)

    def covers(self, alert: Alert, now_ms: int) -> bool:
        if now_ms >= self.until_ms:
            return False
        if self.detector is not None and self.detector != alert.detector:
            return False
        return fnmatch.fnmatchcase(alert.agent, self.agent)


def mute_field(agent: str, detector: str | None) -> str:
    return f"{agent}|{detector or '*'}"


class Mutes:
    """The mutes of one deployment, in one hash (a handful of entries: read whole, every batch)."""

    def __init__(self, client: Client, keys: Keys) -> None:
        self.client: Any = client
        self.keys = keys

    def add(self, agent: str, for_s: float, *, detector: str | None = None, reason: str = "",
            by: str = "") -> Mute:  # fmt: skip
        """Mute (or re-mute, replacing the expiry) ``agent``/``detector`` for ``for_s`` seconds."""
        now = server_time_ms(self.client)
        mute = Mute(agent, detector, now + int(for_s * 1000), now, reason, by)
        self.client.hset(self.keys.mutes, mute.field, json.dumps(asdict(mute), separators=(",", ":")))
        return mute

    def remove(self, agent: str | None = None, detector: str | None = None) -> list[Mute]:
        """Remove the mutes with exactly this glob (and detector, when given); None: every mute."""
        gone = [
            mute
            for mute in self._all()
            if (agent is None or mute.agent == agent) and (detector is None or mute.detector == detector)
        ]
        if gone:
            self.client.hdel(self.keys.mutes, *[mute.field for mute in gone])
        return gone

    def active(self, now_ms: int | None = None) -> list[Mute]:
        """Mutes in force; expired ones are deleted on the way (they expire by themselves)."""
        now = server_time_ms(self.client) if now_ms is None else now_ms
        return self.active_from(self.client.hvals(self.keys.mutes), now)

    def active_from(self, values: list[Any], now_ms: int) -> list[Mute]:
        """:meth:`active` from the hash's values read by the caller (with other reads, in one
        pipeline: notifiers/fanout.py)."""
        now = now_ms
        mutes = _parse(values)
        expired = [mute.field for mute in mutes if mute.until_ms <= now]
        if expired:
            self.client.hdel(self.keys.mutes, *expired)
        return [mute for mute in mutes if mute.until_ms > now]

    def _all(self) -> list[Mute]:
        return _parse(self.client.hvals(self.keys.mutes))


def _parse(values: list[Any]) -> list[Mute]:
    out = []
    for raw in values:
        try:
            out.append(Mute(**json.loads(raw)))
        except (ValueError, TypeError):
            continue  # a hand-edited entry: ignore rather than stop every delivery
    return out


def muted_by(alert: Alert, mutes: list[Mute], now_ms: int) -> Mute | None:
    return next((mute for mute in mutes if mute.covers(alert, now_ms)), None)
