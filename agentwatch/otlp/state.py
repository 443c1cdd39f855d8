"""What the receiver remembers about each process between exports (a few hundred bytes).

Exports are independent requests, possibly to different servers behind a load balancer, so what
one export leaves for the next lives in Redis (``Keys.otlp_process``: one hash per process, which
expires when the process has not exported for ``[otlp] forget``). Traces and metrics are exported
by separate threads of the SDK and may arrive at the same moment, so each signal owns one field of
the hash and only ever writes that one:

* ``t`` (:class:`TraceState`): the agents the process's spans named, whether its spans carry
  usage, and the tool calls of its latest trace that no LLM call has read yet;
* ``m`` (:class:`MetricState`): when its last metrics export arrived, the export interval learnt
  from their cadence, and the last total of each cumulative usage series.

A field that does not decode (written by another version, or damaged) is read as empty: the cost
is one export's fingerprint or usage, never a failed request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

MAX_AGENTS: Final = 8
"""Agents remembered per process (a process hosting more is unusual; the oldest is forgotten)."""
MAX_PENDING: Final = 16
"""Tool calls remembered for the next LLM call of a trace."""
MAX_SERIES: Final = 64
"""Cumulative series remembered per process (token types x models x operations)."""


@dataclass(slots=True)
class TraceState:
    agents: list[str] = field(default_factory=list)
    """Agents the process's spans named, oldest first: its metrics prove them alive."""
    span_usage: bool = False
    """Its spans carry usage: its usage metrics describe the same calls and are not counted."""
    trace: bytes = b""
    pending: list[str] = field(default_factory=list)
    """Fingerprints of the tool calls of ``trace`` that ended after its last LLM call."""
    pending_agent: str = ""

    def remember(self, agent: str) -> None:
        """Note ``agent`` as one of the process's (the most recent last)."""
        if agent in self.agents:
            return
        self.agents.append(agent)
        del self.agents[:-MAX_AGENTS]

    def pack(self) -> bytes:
        data = {
            "a": self.agents,
            "u": self.span_usage,
            "t": self.trace,
            "p": self.pending,
            "pa": self.pending_agent,
        }
        return _pack(data)

    @classmethod
    def unpack(cls, raw: bytes | None) -> TraceState:
        data = _unpack(raw)
        try:
            return cls(
                agents=[str(a) for a in data.get("a", [])][-MAX_AGENTS:],
                span_usage=bool(data.get("u", False)),
                trace=bytes(data.get("t", b"")),
                pending=[str(p) for p in data.get("p", [])][:MAX_PENDING],
                pending_agent=str(data.get("pa", "")),
            )
        except (TypeError, ValueError):
            return cls()


@dataclass(slots=True)
class Series:
    start_ns: int
    total: float


@dataclass(slots=True)
class MetricState:
    first_ms: int = 0
    """When the receiver first saw the process's metrics (Redis time)."""
    last_ms: int = 0
    """When its latest metrics export arrived."""
    exports: int = 0
    interval_s: float = 0.0
    """The export interval learnt from the cadence (0: not learnt yet)."""
    agents: list[str] = field(default_factory=list)
    """Agents named by metrics alone (a process whose spans name none)."""
    series: dict[bytes, Series] = field(default_factory=dict)

    def pack(self) -> bytes:
        series = {key: [s.start_ns, s.total] for key, s in list(self.series.items())[-MAX_SERIES:]}
        data = {
            "f": self.first_ms,
            "l": self.last_ms,
            "n": self.exports,
            "i": self.interval_s,
            "a": self.agents[-MAX_AGENTS:],
            "s": series,
        }
        return _pack(data)

    @classmethod
    def unpack(cls, raw: bytes | None) -> MetricState:
        data = _unpack(raw)
        try:
            series = {
                bytes(key): Series(int(v[0]), float(v[1])) for key, v in dict(data.get("s", {})).items()
            }
            return cls(
                first_ms=int(data.get("f", 0)),
                last_ms=int(data.get("l", 0)),
                exports=int(data.get("n", 0)),
                interval_s=float(data.get("i", 0.0)),
                agents=[str(a) for a in data.get("a", [])][-MAX_AGENTS:],
                series=series,
            )
        except (TypeError, ValueError, IndexError):
            return cls()


def _pack(data: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


def _unpack(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        data = msgpack.unpackb(raw, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types for bad input
        return {}
    return data if isinstance(data, dict) else {}
