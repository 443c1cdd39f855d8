"""What the engine knows about one agent: named fields, kept in memory by its shard's owner.

The shard owner (detectors/engine.py) holds one :class:`Agent` per agent of the shards it leases.
The fields here are the ones every detector shares: which run is current, when the agent was
last seen, beating and pulsing, its declared interval, which incidents are open. Each detector
keeps what only it needs in its own ``State`` (a dataclass), in :attr:`Agent.states` under the
detector's name.

A checkpoint (detectors/checkpoint.py) writes an agent as one msgpack list: the fields of
:data:`FIELDS` in order, then ``{detector name: [its state's fields in order]}``. A record written
by another layout version is treated as absent: the agent starts afresh.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final

import msgpack

from agentwatch.alerts import PIPELINE_AGENT
from agentwatch.keys import Keys, shard_of
from agentwatch.spend import Tally

VERSION: Final = 1
"""Layout version of a checkpointed agent (first element of its list)."""


@dataclass(slots=True)
class ChildRun:
    """A worker process of the agent (``fork``, a ``multiprocessing`` pool): a run whose ``start``
    named the agent's current run as its ``parent`` (PROTOCOL.md)."""

    parent: str
    """The run id of the parent process."""
    started_ms: int = 0
    last_seq: int = -1
    """Highest seq applied of this child run (its events are counted once)."""
    seen_ms: int = 0
    """Its last event."""
    interval_s: float = 0.0
    exited: bool = False
    """It sent an ``exit`` (any reason): it ended on purpose, nothing to watch."""
    pid: int = 0
    host: str = ""


@dataclass(slots=True)
class Agent:
    """The shared state of one agent (see the module docstring). Times are Redis ms."""

    name: str
    run: str = ""
    """The current run (one process's life); "" until its first event."""
    prev_run: str = ""
    """The run before it: its late ``exit`` still alerts (as a crash processed after a restart)."""
    last_seq: int = -1
    """Highest ``seq`` applied of the current run: an event at or below it is a repeat."""
    started_ms: int = 0
    seen_ms: int = 0
    """Last event of any kind, any run."""
    beat_ms: int = 0
    """Last beat of the current run (the work loop moved)."""
    pulse_ms: int = 0
    """Last pulse of the current run (the process lives)."""
    pulse_period_ms: int = 0
    """Time between its last two pulses: how fresh a pulse must be to prove life."""
    interval_s: float = 0.0
    """Declared interval (``init(interval=...)``, repeated by every pulse); 0: none."""
    clocks_from_ms: int = 0
    """Silence and stall clocks start no earlier: an ``extend()``, or a return after a gap that
    proved nothing about the agent (it was frozen, or nobody watched)."""
    retired: bool = False
    """It called ``shutdown()``: nothing more is expected of this run."""
    exited: bool = False
    """The run ended without ``shutdown()`` (the exit detector told of it)."""
    open: set[str] = field(default_factory=set)
    """Incidents open for this agent, by detector name (``silence``, ``tokens``...)."""
    beats: int = 0
    """Beats applied, all runs (reports take differences of totals)."""
    tokens: float = 0.0
    """Tokens, all runs, children included."""
    cost: float = 0.0
    """Cost in USD, all runs, children included."""
    rss_first: int = 0
    """First RSS of the run, bytes (the silence alert names a memory death from these)."""
    rss_first_ms: int = 0
    rss_last: int = 0
    rss_peak: int = 0
    stack: str = ""
    """The newest stack a pulse carried while the last beat was late (the stall alert quotes it)."""
    stack_ms: int = 0
    children: dict[str, ChildRun] = field(default_factory=dict)
    """Worker processes of the current run, by run id."""
    states: dict[str, Any] = field(default_factory=dict)
    """Each detector's own state, by detector name."""
    spent: Tally | None = None
    """Spend per calendar window (agentwatch/spend.py), None until its first priced or unpriced
    beat: checkpointed apart from the record, into the shard's spend ledger that views read."""

    def is_open(self, kind: str) -> bool:
        return kind in self.open


FIELDS: Final = tuple(f.name for f in fields(Agent) if f.name not in ("name", "children", "states", "spent"))
_CHILD_FIELDS: Final = tuple(f.name for f in fields(ChildRun))


_NAMES: dict[type[Any], tuple[str, ...]] = {}
_GETTERS: dict[type[Any], Any] = {}


def _names(cls: type[Any]) -> tuple[str, ...]:
    found = _NAMES.get(cls)
    if found is None:
        found = _NAMES[cls] = tuple(f.name for f in fields(cls))
    return found


def _getter(cls: type[Any]) -> Any:
    """All fields of dataclass ``cls`` as a tuple, in one C-level call (checkpoints pack every
    changed agent; msgpack packs a tuple as the list :func:`load_state` reads back)."""
    found = _GETTERS.get(cls)
    if found is None:
        names = _names(cls)
        get = operator.attrgetter(*names)
        found = _GETTERS[cls] = (lambda obj: (get(obj),)) if len(names) == 1 else get
    return found


def dump_state(state: Any) -> list[Any]:
    """A detector's state dataclass as the list of its fields' values, in declaration order."""
    return list(_getter(type(state))(state))


def load_state(cls: type[Any], values: list[Any]) -> Any:
    """The inverse of :func:`dump_state`; a list of another length (a changed state class)
    gives a fresh state instead of a wrong one."""
    names = _names(cls)
    if len(values) != len(names):
        return cls()
    return cls(*values)


_CORE = operator.attrgetter(*FIELDS)
_OPEN = FIELDS.index("open")


def pack(agent: Agent, packb: Callable[[Any], bytes] | None = None) -> bytes:
    """One agent as checkpointed (see the module docstring). ``packb``: a reused
    ``msgpack.Packer(use_bin_type=True).pack`` of the caller's (default: one per call)."""
    core = list(_CORE(agent))
    core[_OPEN] = sorted(agent.open)
    children = {run: _getter(ChildRun)(c) for run, c in agent.children.items()} if agent.children else {}
    states = {name: _getter(type(state))(state) for name, state in agent.states.items()}
    record = [VERSION, core, children, states]
    if packb is not None:
        return packb(record)
    out: bytes = msgpack.packb(record, use_bin_type=True)
    return out


def unpack(
    name: str, raw: bytes, state_classes: dict[str, type[Any]], *, keep_unknown: bool = False
) -> Agent | None:
    """The agent ``name`` from :func:`pack`'s bytes, or None if unreadable or of another layout.
    ``state_classes``: detector name -> its ``State`` class. States of other names are dropped
    (a detector since disabled), or with ``keep_unknown`` kept as their raw lists (views)."""
    try:
        version, core, children, states = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        if version != VERSION or len(core) != len(FIELDS):
            return None
        agent = Agent(name, **dict(zip(FIELDS, core, strict=True)))
        agent.open = set(agent.open)
        agent.children = {run: ChildRun(*values) for run, values in children.items()}
        agent.states = {
            det: load_state(state_classes[det], values) if det in state_classes else values
            for det, values in states.items()
            if det in state_classes or keep_unknown
        }
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    return agent


def describe(agent: Agent) -> dict[str, Any]:
    """The agent as a plain dict for views (``status``, reports, the dashboard): the shared
    fields by name, ``open`` as a sorted list, and each detector's state as a dict."""
    out: dict[str, Any] = {name: getattr(agent, name) for name in FIELDS}
    out["open"] = sorted(agent.open)
    out["children"] = {run: {n: getattr(c, n) for n in _CHILD_FIELDS} for run, c in agent.children.items()}
    out["states"] = {
        det: {f.name: getattr(s, f.name) for f in fields(s)} if not isinstance(s, list) else s
        for det, s in agent.states.items()
    }
    return out


def read_agents(
    client: Any, keys: Keys, agents: Sequence[str] | None = None, states: dict[str, type[Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """The checkpointed agents (``agents``, or all when None) as :func:`describe` dicts, for
    ``status``, reports, the dashboard and tests; the detector states named in ``states``
    (detector name -> its State class; views import only what they show) as dicts, the others
    as raw lists (that one exists says something: a ``schedule`` state, a scheduled agent). What the owner has
    not checkpointed yet (at most a batch or half a second) is not in it."""
    classes = states or {}
    out: dict[str, dict[str, Any]] = {}
    for shard in range(max(keys.shards, 1)):
        if agents is None:
            pairs = client.hscan_iter(keys.states(shard), count=1000)
        else:
            names = [a for a in agents if shard_of(a, keys.shards) == shard]
            pairs = zip(names, client.hmget(keys.states(shard), names) if names else [], strict=True)
        for name, raw in pairs:
            text = name.decode() if isinstance(name, bytes) else name
            if text == PIPELINE_AGENT:
                continue  # the monitor's own state (detectors/lag.py), not an agent's
            agent = unpack(text, raw, classes, keep_unknown=True) if raw is not None else None
            if agent is not None:
                out[text] = describe(agent)
    return out
