"""Pipeline self-health: when the detectors fall behind, say so once instead of paging for every
agent.

Each tick the engine measures how far the detector workers are behind: Redis time minus the
*horizon* (the oldest event not yet applied: undelivered, or delivered but not acknowledged).
While they are behind, silence and stall checks only judge deadlines before the horizon (the
``limit`` of ``on_due``), so agents that kept beating through a worker outage are not declared dead while
their beats wait in the stream. Instead, one ``lag`` incident for the agent ``agentwatch``:

* fires when the lag exceeds ``after``, or when a tick finds nobody ran the checks for longer
  than ``after`` (every worker, or Redis itself, was down: checks then restart from the end of
  the gap: ``blind_after``, the ``sight`` of ``on_due``);
* resolves once the lag has stayed under ``after`` / 2 for ``recover``.

And one ``trimmed`` incident (same agent) when events were trimmed from a stream before the
detectors read them (a flooding agent, a small ``MAXLEN``, workers down for longer than the
retention: horizon.py tells), counted in ``trimmed`` of the pipeline agent's clock hash; it
resolves once the detectors caught up and lost nothing more for ``recover``.

The engine calls :meth:`Lag.check` once per tick, on the worker owning the shard of the pipeline
agent (:data:`agentwatch.alerts.PIPELINE_AGENT`), whose :class:`LagState` keeps what a tick must
know of the ticks before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

from pydantic import Field

from agentwatch.alerts import PIPELINE_AGENT
from agentwatch.config import Seconds, format_duration
from agentwatch.keys import shard_of
from detectors.base import Agent, Detector, DetectorConfig
from detectors.horizon import Positions

Severity = Literal["info", "warning", "error", "critical"]


_MARK: Final = "trim_mark:"
"""Clock hash field of a stream's high-water mark of losses (the stream's index follows)."""


class LagConfig(DetectorConfig):
    # Above [worker] claim_idle (30 s) plus a reclaim round: a SIGKILLed worker's unacknowledged
    # batch holds the horizon back until another worker takes it over, and that alone should not page.
    after_s: Seconds = Field(60.0, alias="after", gt=0, description="detectors this far behind: alert")
    recover_s: Seconds = Field(5.0, alias="recover", ge=0, description="under after/2 this long: resolved")
    blind_after_s: Seconds = Field(
        5.0, alias="blind_after", gt=0, description="no check for this long: restart checks from now"
    )
    severity: Severity = "error"


@dataclass(slots=True)
class LagState:
    """The pipeline's health between ticks, kept on the pipeline agent (:data:`PIPELINE_AGENT`)."""

    calm_ms: int = 0
    """Since when the lag has stayed under ``after`` / 2 while the ``lag`` incident is open (0: it
    is not under): it resolves after ``recover`` of that."""
    peak_ms: int = 0
    """The worst lag of the open ``lag`` incident (its resolution tells it)."""
    trim_marks: list[int] = field(default_factory=list)
    """Per event stream, the losses already counted (a stream's losses only grow: horizon.py)."""
    trim_calm_ms: int = 0
    """Since when the open ``trimmed`` incident has seen no new loss with the lag under ``after``
    / 2 (0: not so)."""
    trim_count: int = 0
    """Events lost while the open ``trimmed`` incident lasts."""
    trimmed: int = 0
    """Events lost in all (``status`` shows it)."""
    seeded: bool = False
    """``trim_marks`` and ``trimmed`` were read back from the clock hash (see :meth:`Lag.check`)."""


class Lag(Detector[LagConfig]):
    """Detector workers behind (or down): one pipeline alert instead of an alert storm."""

    Config = LagConfig
    State = LagState
    kinds = ("lag", "trimmed")

    def check(self, agent: Agent, now_ms: int, behind_ms: int, gap_ms: int, positions: Positions) -> None:
        """One tick's look at the pipeline, on the worker owning ``agent`` (the pipeline agent)'s
        shard. ``behind_ms``: Redis time minus the oldest horizon; ``gap_ms``: the longest time
        nobody ran the checks, ending now (0: none)."""
        state: LagState = self.state(agent)
        if not state.seeded:
            self._seed(state)
        after_ms = int(self.config.after_s * 1000)
        recover_ms = int(self.config.recover_s * 1000)
        calm = behind_ms <= after_ms / 2
        if not agent.is_open("lag"):
            if behind_ms > after_ms or gap_ms > after_ms:
                facts = {"behind": behind_ms, "gap": gap_ms, "waiting": positions.waiting}
                self.decisions.open(agent, "lag", now_ms, facts)
                state.calm_ms, state.peak_ms = 0, max(behind_ms, gap_ms)
        else:
            state.peak_ms = max(state.peak_ms, behind_ms)
            if not calm:
                state.calm_ms = 0
            else:
                state.calm_ms = state.calm_ms or now_ms
                if now_ms - state.calm_ms >= recover_ms:
                    self.decisions.close(agent, "lag", now_ms, {"behind": behind_ms, "peak": state.peak_ms})
                    state.calm_ms, state.peak_ms = 0, 0
        new = self._newly_trimmed(state, positions.lost)
        if new > 0:
            state.trimmed += new
            self._save_trimmed(state)
            self.decisions.open(agent, "trimmed", now_ms, {"count": new})
            state.trim_calm_ms, state.trim_count = 0, state.trim_count + new
        elif agent.is_open("trimmed"):
            if not calm:
                state.trim_calm_ms = 0
            else:
                state.trim_calm_ms = state.trim_calm_ms or now_ms
                if now_ms - state.trim_calm_ms >= recover_ms:
                    self.decisions.close(agent, "trimmed", now_ms, {"count": state.trim_count})
                    state.trim_calm_ms, state.trim_count = 0, 0

    @staticmethod
    def _newly_trimmed(state: LagState, lost: list[int | None]) -> int:
        """Losses not counted yet, over all streams, raising each stream's high-water mark; a
        stream whose losses are not known now (None) counts nothing and keeps its mark."""
        marks = state.trim_marks
        if len(marks) < len(lost):
            marks.extend([0] * (len(lost) - len(marks)))
        new = 0
        for stream, count in enumerate(lost):
            if count is not None and count > marks[stream]:
                new += count - marks[stream]
                marks[stream] = count
        return new

    # -- the counts kept in Redis too -----------------------------------------------------------
    # ``status`` reads the count from the pipeline agent's clock hash (agentwatch/fleet.py), and
    # the marks are kept there beside it: a state that starts afresh (the first run of this
    # engine, a checkpoint of another layout) takes them back instead of counting every loss the
    # streams ever had as new, and paging for it. Written whole, never added to: a check replayed
    # from an older checkpoint (its owner died before saving the state) writes the same totals.
    def _clock_key(self) -> str:
        return self.ctx.keys.clock(shard_of(PIPELINE_AGENT, self.ctx.keys.shards))

    def _seed(self, state: LagState) -> None:
        saved = {_text(key): value for key, value in self.ctx.client.hgetall(self._clock_key()).items()}
        state.trimmed = int(saved.get("trimmed") or 0)
        marks = {int(key[len(_MARK) :]): int(count) for key, count in saved.items() if key.startswith(_MARK)}
        state.trim_marks = [marks.get(stream, 0) for stream in range(max(marks, default=-1) + 1)]
        state.seeded = True

    def _save_trimmed(self, state: LagState) -> None:
        fields: list[str | int] = ["trimmed", state.trimmed]
        for stream, count in enumerate(state.trim_marks):
            fields += [f"{_MARK}{stream}", count]
        self.ctx.client.hset(self._clock_key(), items=fields)

    def render(self, agent: str, kind: str, op: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        f = op["f"]
        if kind == "trimmed":
            count = int(f["count"])
            if op["o"] == "r":
                summary = f"agentwatch pipeline caught up; {count:,} events were trimmed unread in all"
                return self.config.severity, summary, {"trimmed": count}
            summary = (
                f"agentwatch pipeline lost events: {count:,} events were trimmed before detectors read them: "
                "raise the producers' MAXLEN (AGENTWATCH_MAXLEN) or add detector workers"
            )
            return self.config.severity, summary, {"trimmed": count}
        if op["o"] == "r":
            return (
                self.config.severity,
                (
                    f"agentwatch pipeline caught up (detectors {format_duration(f['behind'] / 1000)} behind, "
                    f"at worst {format_duration(f['peak'] / 1000)})"
                ),
                {"behind_s": f["behind"] / 1000, "peak_s": f["peak"] / 1000},
            )
        details = {"behind_s": f["behind"] / 1000, "gap_s": f["gap"] / 1000, "waiting": f["waiting"]}
        if f["gap"] > f["behind"]:
            gap = format_duration(f["gap"] / 1000)
            summary = (f"agentwatch pipeline lagging: no detector worker ran for {gap}; "
                       "silence and stall checks restart from now")  # fmt: skip
        else:
            behind = format_duration(f["behind"] / 1000)
            summary = (f"agentwatch pipeline lagging: detector workers are {behind} "
                       f"behind ({f['waiting']:,} events waiting); silence and stall alerts held back "
                       "until they catch up")  # fmt: skip
        return self.config.severity, summary, details


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
