"""Memory: the leak that precedes the OOM kill, caught while there is still time.

Pulses carry the process's RSS. Per agent (:class:`MemoryState`, current run only) the detector
keeps the lowest RSS of each time bucket (``window`` / ``points`` long; the minimum, so GC
spikes and short bursts do not look like growth) and the last ``points`` closed buckets. Each
time a pulse closes a bucket, that agent's window is judged at once with a Theil-Sen trend (the
median of all pairwise slopes: robust to outliers). An evaluation is *hot* when

* at least ``min_points`` buckets exist,
* at least ``rising`` of the pairwise slopes are positive (sustained growth, not a sawtooth), and
* the trend reaches ``limit`` within ``horizon`` (or is already past it and still growing).

``fire_after`` hot evaluations in a row open a ``memory`` incident ("RSS 210 MB -> 3.9 GB over
3 days; 4 GB limit in ~2 h"); ``recover_after`` *cool* ones in a row, or a restart, resolve it.
Cool is not merely "not hot": the same test deciding both would flap on a noisy leak whose
projection wanders around the horizon. An evaluation is cool when the growth has plainly
stopped: the trend is flat or falling, or fewer than half of the pairwise slopes rise, or the
limit is more than twice the horizon away (:data:`COOL_HORIZONS`). In between, an evaluation
neither opens nor resolves anything, and breaks both counts.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal

from pydantic import BeforeValidator, Field, PlainSerializer

from agentwatch.config import Seconds, format_duration
from detectors.base import Agent, ChildRun, Detector, DetectorConfig, Event

Severity = Literal["info", "warning", "error", "critical"]

_SIZE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?", re.IGNORECASE)
_SIZE_UNITS: Final = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
                      "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}  # fmt: skip


def parse_bytes(value: object) -> int:
    """``"4GB"`` (10^9), ``"4GiB"``/``"4Gi"`` (2^30), ``"512MB"``, ``1048576`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f'expected a size like "4GB", got {type(value).__name__}')
    match = _SIZE_RE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f'bad size {value!r}: use e.g. "512MB", "4GB", "4GiB"')
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def format_bytes(size: float) -> str:
    """Decimal units, two significant-ish digits: 209715200 -> "210 MB", 3.9e9 -> "3.9 GB"."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(size) >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{size:.0f} B"


def _size_text(size: int) -> str:
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


Bytes = Annotated[int, BeforeValidator(parse_bytes), PlainSerializer(_size_text)]
"""A size key: ``"4GB"`` in the file, bytes in code."""


class MemoryConfig(DetectorConfig):
    limit: Bytes = Field(4 * 10**9, gt=0, description="the RSS the agent must not reach")
    horizon_s: Seconds = Field(6 * 3600.0, alias="horizon", gt=0, description="alert this long before")
    window_s: Seconds = Field(3600.0, alias="window", gt=0, description="the trend is fitted over this")
    points: int = Field(12, ge=3, le=32, description="buckets per window")
    min_points: int = Field(6, ge=3, le=32, description="buckets needed before judging")
    rising: float = Field(0.7, gt=0.5, le=1.0, description="share of rising pairwise slopes")
    fire_after: int = Field(2, ge=1, le=100, description="hot evaluations in a row to fire")
    recover_after: int = Field(3, ge=1, le=100, description="cool evaluations in a row to resolve")
    severity: Severity = "warning"


COOL_HORIZONS: Final = 2.0
"""An evaluation projecting the limit further away than this many horizons is cool."""
COOL_RISING: Final = 0.5
"""... and so is one with fewer rising pairwise slopes than this share."""
HOT, BETWEEN, COOL = 2, 1, 0
"""The verdicts of one evaluation (see the module docstring)."""
COUNT_CAP: Final = 255
"""Hot and cool counts stop here: only ``>= fire_after`` / ``>= recover_after`` matters."""


@dataclass(slots=True)
class MemoryState:
    """One agent's RSS buckets and verdict counts (current run only: a restart resets it).

    RSS values are bytes, times Redis ms. Bucket ``k`` covers ``[k * length, (k + 1) * length)``
    with ``length = window / points`` (a float: a window need not divide evenly)."""

    bucket: int = -1
    """Index of the open bucket (``floor(ms / length)``); -1: no RSS seen in this run yet."""
    bucket_low: int = 0
    """The lowest RSS of the open bucket, bytes (the minimum: a GC spike is not growth)."""
    closed: list[list[float]] = field(default_factory=list)
    """The closed buckets of the window, oldest first, at most ``points``: [end ms, lowest RSS
    bytes]. The end is ``(index + 1) * length``, a float like the length."""
    hot: int = 0
    """Hot evaluations in a row (capped at :data:`COUNT_CAP`)."""
    cool: int = 0
    """Cool evaluations in a row (capped at :data:`COUNT_CAP`)."""


def bucket_ms(cfg: MemoryConfig) -> float:
    """The length of one bucket: the window split in ``points`` (at least 1 ms)."""
    return max(1.0, cfg.window_s * 1000 / cfg.points)


def theil_sen(times: Sequence[float], values: Sequence[float]) -> tuple[float, float, float]:
    """(slope, intercept, share of rising pairs) of the points (times[k], values[k]): the
    median of all pairwise slopes, robust to outliers. Needs two points of different times.
    Plain Python: a window holds at most 32 points (496 pairs), and numpy's median of so small
    an array costs more than the sort."""
    n = len(times)
    slopes = [(values[j] - values[i]) / (times[j] - times[i])
              for i in range(n) for j in range(i + 1, n) if times[j] != times[i]]  # fmt: skip
    slope = statistics.median(slopes)
    intercept = statistics.median(v - slope * t for t, v in zip(times, values, strict=True))
    rising = sum(1 for s in slopes if s > 0) / len(slopes)
    return slope, intercept, rising


def judge(closed: list[list[float]], cfg: MemoryConfig, agent: Agent) -> tuple[int, dict[str, Any]]:
    """(verdict, facts) of the window ``closed`` (not empty) of ``agent``.

    Hot and cool are two tests, not one and its negation (see the module docstring); too few
    buckets is cool (nothing is on course yet). The facts quote the run's first and last RSS
    (kept by the engine in ``agent``) and the trend's level at the last bucket's end."""
    at = closed[-1][0]
    enough = len(closed) >= max(2, cfg.min_points)
    if enough:
        times, values = [float(p[0]) for p in closed], [float(p[1]) for p in closed]
        slope, intercept, rising = theil_sen(times, values)  # bytes per ms
        level = intercept + slope * at
    else:
        slope, level, rising = 0.0, float(agent.rss_last), 0.0
    horizon_ms = cfg.horizon_s * 1000
    eta_ms = (cfg.limit - level) / slope if slope > 0 else float("inf")
    hot = enough and slope > 0 and rising >= cfg.rising and eta_ms <= horizon_ms
    cool = not enough or slope <= 0 or rising < COOL_RISING or eta_ms > COOL_HORIZONS * horizon_ms
    facts = {
        "r0": agent.rss_first, "t0": agent.rss_first_ms, "rl": agent.rss_last, "level": level,
        "limit": cfg.limit, "slope_per_h": slope * 3_600_000,
        "eta_s": max(0.0, eta_ms / 1000) if hot else -1, "at": float(at),
    }  # fmt: skip
    return (HOT if hot else COOL if cool else BETWEEN), facts


class Memory(Detector[MemoryConfig]):
    """Sustained RSS growth that will reach ``limit`` within ``horizon``."""

    Config = MemoryConfig
    State = MemoryState
    kinds = ("memory",)
    listens = frozenset({"pulse"})

    def on_event(self, agent: Agent, event: Event, at_ms: int, child: ChildRun | None) -> None:
        """A pulse of the current run with an RSS: into its bucket; a bucket that this pulse
        closes is judged at once. (A worker process's RSS is its own, not the agent's.)"""
        rss = event.get("rss")
        if child is not None or rss is None:
            return
        cfg = self.config.for_agent(agent.name)
        state: MemoryState = self.state(agent)
        length = bucket_ms(cfg)
        bucket = math.floor(at_ms / length)
        if state.bucket < 0:
            state.bucket, state.bucket_low = bucket, rss
        elif bucket == state.bucket:
            state.bucket_low = min(state.bucket_low, rss)
        elif bucket > state.bucket:
            state.closed.append([(state.bucket + 1) * length, state.bucket_low])
            del state.closed[: max(0, len(state.closed) - cfg.points)]
            state.bucket, state.bucket_low = bucket, rss
            self._evaluate(agent, state, cfg)

    def _evaluate(self, agent: Agent, state: MemoryState, cfg: MemoryConfig) -> None:
        """Judge the window; ``fire_after`` hot verdicts in a row open the incident,
        ``recover_after`` cool ones close it, one in between breaks both counts."""
        verdict, facts = judge(state.closed, cfg, agent)
        at_ms = int(facts["at"])
        if verdict == HOT:
            state.hot, state.cool = min(state.hot + 1, COUNT_CAP), 0
            if state.hot >= cfg.fire_after:
                self.decisions.open(agent, "memory", at_ms, facts)
        elif verdict == COOL:
            state.hot, state.cool = 0, min(state.cool + 1, COUNT_CAP)
            if state.cool >= cfg.recover_after:
                self.decisions.close(agent, "memory", at_ms, facts)
        else:
            state.hot, state.cool = 0, 0

    def on_new_run(self, agent: Agent, at_ms: int) -> None:
        """A restart frees the memory: the incident ends, quoting the old run's last RSS (so
        the engine calls this before it resets the run's RSS fields), and the trend starts over."""
        if "memory" in agent.open:  # (most new runs have nothing to close: no facts to make)
            facts = {"at": at_ms, "restarted": 1, "rl": agent.rss_last, "r0": agent.rss_first}
            self.decisions.close(agent, "memory", at_ms, facts)
        agent.states.pop(self.name, None)

    def on_retire(self, agent: Agent, at_ms: int) -> None:
        """A shutdown: nothing will reach the limit."""
        self.decisions.close(agent, "memory", at_ms, {"at": at_ms, "shutdown": 1})

    def render(self, agent: str, kind: str, op: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        f = op["f"]
        severity = self.config.for_agent(agent).severity
        if op["o"] == "r":
            if f.get("restarted"):
                return severity, f"{agent}: restarted (RSS was {format_bytes(f.get('rl', 0))})", {}
            if f.get("shutdown"):
                return severity, f"{agent}: shut down", {}
            return severity, f"{agent}: RSS no longer on course for {format_bytes(f['limit'])}", {
                "rss": f["rl"], "trend_per_h": round(f["slope_per_h"]),
            }  # fmt: skip
        span = format_duration(max(0.0, (f["at"] - f["t0"]) / 1000)) if f["t0"] else "?"
        growth = f"RSS {format_bytes(f['r0'])} -> {format_bytes(f['rl'])} over {span}"
        if f["level"] >= f["limit"]:
            outlook = f"over the {format_bytes(f['limit'])} limit and still growing"
        else:
            outlook = f"{format_bytes(f['limit'])} limit in ~{format_duration(f['eta_s'])}"
        details = {
            "rss": f["rl"], "rss_start": f["r0"], "limit": f["limit"],
            "trend_per_h": round(f["slope_per_h"]), "eta_s": round(f["eta_s"], 1),
        }  # fmt: skip
        return severity, f"{agent}: {growth}; {outlook}", details
