"""What the receiver remembers about each process between exports (tens of bytes).

Exports are independent requests, possibly to different servers behind a load balancer, so what
one export leaves for the next lives in Redis: one field per process in the OTLP buckets of a stream
(``Keys.otlp``; the stream of the process's own agent, so that the usual export, one process of
one agent, is one script in one Cluster slot), holding a :class:`ProcessState`:

* its :class:`TraceState`: the agents the process's spans named, whether its spans carry usage,
  and the tool calls of its latest trace that no LLM call has read yet;
* its :class:`MetricState`: when its last metrics export arrived, the export interval learnt
  from their cadence, and the last total of each cumulative usage series;

packed in one msgpack array after a 4-byte expiry (Unix seconds: ``[otlp] forget`` after the
process's last export), with the defaults left out and the agent the process's resource names
(which every export names again) packed as nil, so a process of one agent whose spans carry
usage costs 8 bytes. Traces and metrics of one process may arrive at the same moment (the
SDK exports them from separate threads): the receiver writes a state only if it is still the one
it folded from (agentwatch/ingest_records.py, guards), and folds again otherwise.

A state that does not decode (written by another version, or damaged) is read as empty: the cost
is one export's fingerprint or usage, never a failed request.
"""

from __future__ import annotations

import struct
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


@dataclass(slots=True)
class Series:
    start_ns: int
    total: float


@dataclass(slots=True)
class MetricState:
    first_ms: int = 0
    """When the receiver first saw the process's metrics (ms, the receiving server's clock)."""
    last_ms: int = 0
    """When its latest metrics export arrived."""
    exports: int = 0
    interval_s: float = 0.0
    """The export interval learnt from the cadence (0: not learnt yet)."""
    agents: list[str] = field(default_factory=list)
    """Agents named by metrics alone (a process whose spans name none)."""
    series: dict[bytes, Series] = field(default_factory=dict)


EXPIRY: Final = struct.Struct(">I")
"""The first 4 bytes of a stored state: when it expires (Unix seconds), read by the sweep
(agentwatch/ingest_records.py) without decoding the rest."""


@dataclass(slots=True)
class ProcessState:
    """Everything remembered about one process (see the module docstring)."""

    trace: TraceState = field(default_factory=TraceState)
    metric: MetricState = field(default_factory=MetricState)

    def empty(self) -> bool:
        """Nothing worth keeping: a process that is no agent leaves nothing behind."""
        return self.trace == TraceState() and self.metric == MetricState()

    def pack(self, exp_s: int, own: str | None = None) -> bytes:
        """The stored form. ``own``: the agent the process's resource names, packed as nil
        wherever it appears (one byte instead of its name: it is the usual process's only
        agent, and every export of the process names it again; the process's key hashes it,
        agentwatch/otlp/resource.py, so a state is always unpacked with the ``own`` it was
        packed with)."""
        t, m = self.trace, self.metric
        series = {key: [s.start_ns, s.total] for key, s in list(m.series.items())[-MAX_SERIES:]}
        interval = int(m.interval_s) if m.interval_s.is_integer() else m.interval_s
        pending_agent = None if own and t.pending_agent == own else t.pending_agent
        data: list[Any] = [_short(t.agents, own), t.span_usage, t.trace, t.pending, pending_agent,
                           m.first_ms, m.last_ms, m.exports, interval, _short(m.agents[-MAX_AGENTS:], own),
                           series]  # fmt: skip
        while data and data[-1] == _DEFAULTS[len(data) - 1]:
            data.pop()
        return EXPIRY.pack(exp_s) + _pack(data)

    @classmethod
    def unpack(cls, raw: bytes | None, own: str | None = None) -> ProcessState:
        """A stored state (:meth:`pack` with the same ``own``), empty if none or unreadable."""
        if not raw or len(raw) < EXPIRY.size:
            return cls()
        data = _unpack(raw[EXPIRY.size :])
        if not isinstance(data, list):
            return cls()
        a, u, t, p, pa, f, last, n, i, ma, series = [*data, *_DEFAULTS[len(data) :]][: len(_DEFAULTS)]
        try:
            trace = TraceState(
                agents=_long(a, own)[-MAX_AGENTS:],
                span_usage=bool(u),
                trace=bytes(t),
                pending=[str(x) for x in p][:MAX_PENDING],
                pending_agent=(own or "") if pa is None else str(pa),
            )
            metric = MetricState(
                first_ms=int(f),
                last_ms=int(last),
                exports=int(n),
                interval_s=float(i),
                agents=_long(ma, own)[-MAX_AGENTS:],
                series={bytes(key): Series(int(v[0]), float(v[1])) for key, v in dict(series).items()},
            )
        except (TypeError, ValueError, IndexError):
            return cls()
        return cls(trace, metric)


def _short(agents: list[str], own: str | None) -> list[str | None]:
    return [None if own and agent == own else agent for agent in agents]


def _long(packed: Any, own: str | None) -> list[str]:
    """:func:`_short` undone (a nil without an ``own`` agent is dropped: read as no agent)."""
    return [str(x) if x is not None else own for x in packed if x is not None or own]  # type: ignore[misc]


_DEFAULTS: Final[tuple[Any, ...]] = ([], False, b"", [], "", 0, 0, 0, 0, [], {})
"""What each position of a packed state holds when left out (trailing defaults are)."""


def _pack(data: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


def _unpack(raw: bytes) -> Any:
    try:
        return msgpack.unpackb(raw, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types for bad input
        return None
