"""An export's processes, their folds, and the script calls that write them (receiver.py).

Each process (one resource: one SDK in one process) has a *home* stream: the stream of the agent
its resource names (``service.name``), else one picked by its hash. Its state lives in that
stream's OTLP buckets, so for the usual process, one agent named by its resource, the state and the
agent's events are in one stream and one Cluster slot: one script writes both, all or nothing
(:func:`local_groups`). An agent whose events come from processes homed in other streams (a
PydanticAI agent named by ``gen_ai.agent.name`` in a sharded deployment, say) is written once
every process's state is stored (:func:`remote_groups`): a failure in between loses those
events' tool-call fingerprints and metric deltas to the retry, which the single-stream case
cannot.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from agentwatch.config import OtlpSection
from agentwatch.ingest import Group, Item
from agentwatch.keys import shard_of
from agentwatch.otlp.fold import Draft, fold_metrics, fold_spans, interval_of, start_facts
from agentwatch.otlp.metrics import MetricBatch
from agentwatch.otlp.resource import Origin
from agentwatch.otlp.spans import SpanBatch
from agentwatch.otlp.state import ProcessState


@dataclass(slots=True)
class AgentWrite:
    """One agent's events of an export (one run): one item of a writer's call."""

    agent: str
    run: str | None
    interval_s: float
    facts: dict[str, Any]
    shard: int
    events: list[Draft] = field(default_factory=list)
    items: int = 0
    """Spans (or data points) behind these events: what is rejected if the agent is refused."""
    local: bool = True
    """Every process its events come from is homed in the agent's own stream."""


class Process:
    """One process's part of an export and what folding it from a state gave."""

    __slots__ = ("after", "batches", "before", "drafts", "items", "origin", "shard", "state", "tally")

    def __init__(self, origin: Origin, shards: int) -> None:
        self.origin = origin
        self.shard = shard_of(origin.agent if origin.agent is not None else origin.key.hex(), shards)
        self.batches: list[Any] = []
        self.state = ProcessState()
        self.before: bytes | None = None
        """The state folded from: as this server last stored or read it."""
        self.after: bytes | None = None
        self.drafts: list[Draft] = []
        self.items: Counter[str] = Counter()
        self.tally: Counter[str] = Counter()

    @property
    def key(self) -> bytes:
        return self.origin.key

    def named(self) -> list[str]:
        """The agents the telemetry itself names (read before the state is known)."""
        names: list[str] = [] if self.origin.agent is None else [self.origin.agent]
        for batch in self.batches:
            if isinstance(batch, SpanBatch):
                names += (step.agent for step in batch.steps)
            else:
                names += (point.agent for point in batch.points if point.agent is not None)
        return list(dict.fromkeys(names))

    def fold(self, settings: OtlpSection, now: float) -> None:
        """Fold every batch from :attr:`before`, the state as Redis holds it (None: no state)."""
        self.state = state = ProcessState.unpack(self.before, own=self.origin.agent)
        self.drafts, self.items, self.tally = [], Counter(), Counter()
        for batch in self.batches:
            if isinstance(batch, SpanBatch):
                self.drafts += fold_spans(batch, state.trace, state.metric, settings, self.tally)
                self.items.update(step.agent for step in batch.steps)
                continue
            assert isinstance(batch, MetricBatch)
            found = fold_metrics(batch, state.trace, state.metric, settings, now_ms=int(now * 1000),
                                 tally=self.tally)  # fmt: skip
            if found:  # the points behind an agent's events (a process's points go to its agents)
                self.drafts += found
                self.items.update({agent: len(batch.points) for agent in {draft.agent for draft in found}})
        expires = int(now + settings.forget_s) + 1
        self.after = None if state.empty() else state.pack(expires, own=self.origin.agent)


def collect(processes: list[Process], settings: OtlpSection, shards: int) -> list[AgentWrite]:
    """The export's writes, one per agent and run, their events in the export's order."""
    writes: dict[tuple[str, str | None], AgentWrite] = {}
    first: dict[str, AgentWrite] = {}
    for p in processes:
        for draft in p.drafts:
            write = writes.get((draft.agent, draft.run))
            if write is None:
                interval = interval_of(draft.agent, p.state.metric, settings)
                write = AgentWrite(draft.agent, draft.run, interval, start_facts(p.origin),
                                   shard_of(draft.agent, shards))  # fmt: skip
                writes[(draft.agent, draft.run)] = write
                first.setdefault(draft.agent, write)
            write.local = write.local and p.shard == write.shard
            write.events.append(draft)
        for agent, count in p.items.items():
            if agent in first:
                first[agent].items += count
    return list(writes.values())


@dataclass(slots=True)
class Members:
    """What one call carries, to settle its result."""

    processes: list[Process] = field(default_factory=list)
    writes: list[AgentWrite] = field(default_factory=list)
    """The admitted writes, in the order of the call's items."""
    refused: list[tuple[AgentWrite, str]] = field(default_factory=list)
    """The writes of refused agents, and why (``agents_refused``...)."""


def local_groups(
    processes: list[Process], writes: list[AgentWrite], verdicts: dict[str, str | None], settings: OtlpSection
) -> list[tuple[Group, Members]]:
    """One call per home stream: its processes' new states and their local agents. Every process
    is guarded, changed or not: its agents' events were folded from its state, which must still
    be the state in Redis (even a process that is no agent: another server may just have seen it
    become one)."""
    calls: dict[int, tuple[Group, Members]] = {}
    for p in processes:
        group, members = calls.setdefault(p.shard, (Group(p.shard), Members()))
        members.processes.append(p)
        group.guards.append((p.key, p.before, p.after))
    for write in writes:
        if write.local:
            group, members = calls.setdefault(write.shard, (Group(write.shard), Members()))
            _place(group, members, write, verdicts, settings)
    return list(calls.values())


def remote_groups(
    writes: list[AgentWrite], verdicts: dict[str, str | None], settings: OtlpSection
) -> list[tuple[Group, Members]]:
    """One call per stream for the agents whose events come from processes homed elsewhere."""
    calls: dict[int, tuple[Group, Members]] = {}
    for write in writes:
        if not write.local:
            group, members = calls.setdefault(write.shard, (Group(write.shard), Members()))
            _place(group, members, write, verdicts, settings)
    return list(calls.values())


def _place(
    group: Group, members: Members, write: AgentWrite, verdicts: dict[str, str | None], settings: OtlpSection
) -> None:
    reason = verdicts.get(write.agent)
    if reason is not None:
        members.refused.append((write, reason))
        return
    events = [(draft.kind, draft.fields) for draft in write.events]
    item = Item(
        write.agent,
        events,
        run=write.run,
        interval_s=write.interval_s,
        start_facts=write.facts,
        ttl_s=settings.forget_s,
        counted=True,
        trusted=True,
    )
    group.items.append(item)
    members.writes.append(write)
