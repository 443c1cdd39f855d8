"""One OTLP export, end to end: decode, read, fold with what Redis remembers, admit, write.

The HTTP routes (agentwatch/http/otlp.py) call :meth:`Receiver.export` with a request's body and
answer with what it returns. Per export, whatever its size, the receiver makes four round trips
to Redis: it reads the state of the exporting processes, checks the agents against the cap, has
the event writer (agentwatch/ingest.py: runs, seqs, flood limit) write each agent's events, and
stores the processes' new state. Events go before state: if Redis fails in between, the exporter
is told to retry and the retry is folded from the old state (the same cumulative totals give the
same usage), instead of state that claims usage nobody wrote.

**Admission.** Agent names come from whoever holds the ingest token, so they are bounded: a name
must match ``[otlp] accept``; one export may name at most ``[otlp] max_agents_per_export``; and
at most ``[otlp] max_agents`` agents are known through OTLP at once (``Keys.otlp_agents``, agents
unseen for ``[otlp] forget`` drop out). A refused agent's telemetry is dropped and reported in
the export's partial success; refusals for the cap also raise an ``otlp`` incident on the agent
``agentwatch``, resolved once the count is back under the cap.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from agentwatch.alerts import PIPELINE_AGENT, Incidents
from agentwatch.config import OtlpSection
from agentwatch.errors import InvalidEntry
from agentwatch.ingest import EventWriter, Flooded
from agentwatch.keys import Keys
from agentwatch.otlp import CAP_DETECTOR
from agentwatch.otlp.decode import decode_metrics, trace_bytes
from agentwatch.otlp.fold import Draft, fold_metrics, fold_spans, interval_of, start_facts
from agentwatch.otlp.metrics import read_metrics
from agentwatch.otlp.resource import Origin
from agentwatch.otlp.spans import read_traces
from agentwatch.otlp.state import MetricState, TraceState
from agentwatch.redisconn import Client

Signal = Literal["traces", "metrics"]
RESOLVE_CHECK_S: Final = 60.0
"""How often, at most, a server that refuses nothing looks for an open cap incident to resolve."""


@dataclass(slots=True)
class AgentWrite:
    """One agent's events of an export: one call of the event writer."""

    agent: str
    run: str | None
    interval_s: float
    facts: dict[str, Any]
    events: list[Draft] = field(default_factory=list)
    items: int = 0
    """Spans (or data points) behind these events: what is rejected if the agent is refused."""


@dataclass(slots=True)
class Outcome:
    """What an export came to: OTLP's partial success (``rejected`` and a message), counters."""

    signal: Signal
    rejected: int = 0
    tally: Counter[str] = field(default_factory=Counter)
    refused: dict[str, list[str]] = field(default_factory=dict)
    """Why agents were refused (``agents_refused``...) -> the agents refused for it."""
    problems: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        return "; ".join(self.problems)


@dataclass(slots=True)
class _Fold:
    """The part of an export done in a worker thread: events to write, state to store."""

    outcome: Outcome
    writes: list[AgentWrite]
    states: dict[str, tuple[str, bytes]]
    """process key -> (field, packed state) to store after the events are written."""
    now_ms: int


class Receiver:
    """Turns OTLP exports into protocol events for one HTTP server (see the module docstring)."""

    def __init__(
        self,
        client: Client,
        keys: Keys,
        settings: OtlpSection,
        writer: EventWriter,
        *,
        secret: str | None = None,
    ) -> None:
        self.client: Any = client
        self.keys = keys
        self.settings = settings
        self.writer = writer
        self.incidents = Incidents(client, keys, secret=secret)  # [security] secret signs its alerts
        self._last_resolve_check = 0.0

    async def export(
        self, signal: Signal, body: bytes, content_type: str | None, content_encoding: str | None
    ) -> Outcome:
        """Decode and ingest one export. Raises OtlpRejected (4xx) for a body that is not OTLP,
        and Redis errors (the route answers 503 with Retry-After)."""
        folded = await asyncio.to_thread(self._fold, signal, body, content_type, content_encoding)
        written = await asyncio.gather(*(self._write(w, folded.outcome) for w in folded.writes))
        done = [write for write, ok in zip(folded.writes, written, strict=True) if ok]
        await asyncio.to_thread(self._store, folded, done)
        _explain(folded.outcome, self.settings)
        return folded.outcome

    # -- in a worker thread: CPU and the two reads --------------------------------------------------
    def _fold(self, signal: Signal, body: bytes, content_type: str | None, encoding: str | None) -> _Fold:
        cap = self.settings.max_body_bytes
        outcome = Outcome(signal)
        if signal == "traces":
            traces = read_traces(trace_bytes(body, content_type, encoding, cap), self.settings)
            origins = [batch.origin for batch in traces.batches if batch.steps or batch.spans]
            outcome.tally.update(traces.tally)
            outcome.rejected += traces.rejected
        else:
            metrics = read_metrics(decode_metrics(body, content_type, encoding, cap), self.settings)
            origins = [batch.origin for batch in metrics.batches]
            outcome.tally.update(metrics.tally)
            outcome.rejected += metrics.rejected
        now_ms, loaded = self._load(origins)
        writes: dict[tuple[str, str | None], AgentWrite] = {}
        states: dict[str, tuple[str, bytes]] = {}
        if signal == "traces":
            for batch in traces.batches:
                if not (batch.steps or batch.spans):
                    continue
                trace, metric = loaded[batch.origin.key]
                drafts = fold_spans(batch, trace, metric, self.settings, outcome.tally)
                items = Counter(step.agent for step in batch.steps)
                self._collect(writes, drafts, batch.origin, metric, items)
                if trace != TraceState():  # a process that is no agent leaves nothing behind
                    states[batch.origin.key.hex()] = ("t", trace.pack())
        else:
            for mbatch in metrics.batches:
                trace, metric = loaded[mbatch.origin.key]
                found = fold_metrics(mbatch, trace, metric, self.settings, now_ms=now_ms, tally=outcome.tally)
                if found is None:
                    continue  # not an agent: nothing kept about it
                # the points behind an agent's events (a process's points go to its agents)
                items = Counter({draft.agent: len(mbatch.points) for draft in found})
                self._collect(writes, found, mbatch.origin, metric, items)
                states[mbatch.origin.key.hex()] = ("m", metric.pack())
        admitted = self._admit(list(writes.values()), outcome, now_ms)
        return _Fold(outcome, admitted, states, now_ms)

    def _load(self, origins: list[Origin]) -> tuple[int, dict[bytes, tuple[TraceState, MetricState]]]:
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        unique = list(dict.fromkeys(origin.key for origin in origins))
        for key in unique:
            pipe.hmget(self.keys.otlp_process(key.hex()), "t", "m")
        replies = pipe.execute()
        seconds, micros = replies[0]
        loaded = {
            key: (TraceState.unpack(reply[0]), MetricState.unpack(reply[1]))
            for key, reply in zip(unique, replies[1:], strict=True)
        }
        return int(seconds) * 1000 + int(micros) // 1000, loaded

    def _collect(
        self,
        writes: dict[tuple[str, str | None], AgentWrite],
        drafts: list[Draft],
        origin: Origin,
        metric: MetricState,
        items: Counter[str],
    ) -> None:
        for draft in drafts:
            key = (draft.agent, draft.run)
            write = writes.get(key)
            if write is None:
                interval = interval_of(draft.agent, metric, self.settings)
                write = writes[key] = AgentWrite(draft.agent, draft.run, interval, start_facts(origin))
                write.items = items.get(draft.agent, 0)
            write.events.append(draft)

    def _admit(self, writes: list[AgentWrite], outcome: Outcome, now_ms: int) -> list[AgentWrite]:
        """The writes whose agent may be written (``accept``, per-export and global caps)."""
        settings = self.settings
        allowed: list[AgentWrite] = []
        named: set[str] = set()
        for write in writes:
            if not fnmatch.fnmatchcase(write.agent, settings.accept):
                self._refuse(outcome, write, "agents_not_accepted")
            elif write.agent not in named and len(named) >= settings.max_agents_per_export:
                self._refuse(outcome, write, "agents_over_export_cap")
            else:
                named.add(write.agent)
                allowed.append(write)
        names = list(dict.fromkeys(write.agent for write in allowed))
        if not names:
            return allowed
        pipe = self.client.pipeline(transaction=False)
        pipe.zremrangebyscore(self.keys.otlp_agents, "-inf", now_ms - int(settings.forget_s * 1000))
        pipe.zcard(self.keys.otlp_agents)
        pipe.zmscore(self.keys.otlp_agents, names)
        _, known_count, scores = pipe.execute()
        room = settings.max_agents - int(known_count)
        admitted: set[str] = set()
        for name, score in zip(names, scores, strict=True):
            if score is not None:
                admitted.add(name)
            elif room > 0:
                admitted.add(name)
                room -= 1
        result = []
        for write in allowed:
            if write.agent in admitted:
                result.append(write)
            else:
                self._refuse(outcome, write, "agents_refused")
        return result

    @staticmethod
    def _refuse(outcome: Outcome, write: AgentWrite, reason: str) -> None:
        names = outcome.refused.setdefault(reason, [])
        if write.agent not in names:
            names.append(write.agent)
            outcome.tally[reason] += 1
        outcome.rejected += write.items

    # -- on the event loop: the writes ------------------------------------------------------------
    async def _write(self, write: AgentWrite, outcome: Outcome) -> bool:
        events = [(draft.kind, draft.fields) for draft in write.events]
        try:
            await self.writer.awrite_events(
                write.agent, events, run=write.run, interval_s=write.interval_s, start_facts=write.facts
            )
        except Flooded:
            self._refuse(outcome, write, "agents_flooded")
            return False
        except InvalidEntry as exc:  # a name the protocol refuses (e.g. one starting with '-')
            self._refuse(outcome, write, "agents_invalid")
            outcome.problems.append(f"agent {write.agent[:64]!r} refused: {exc}")
            return False
        outcome.tally["events"] += len(events)
        return True

    # -- in a worker thread: state, the cap's bookkeeping and alert -------------------------------
    def _store(self, folded: _Fold, written: list[AgentWrite]) -> None:
        ttl_ms = int(self.settings.forget_s * 1000)
        pipe = self.client.pipeline(transaction=False)
        for key, (name, packed) in folded.states.items():
            redis_key = self.keys.otlp_process(key)
            pipe.hset(redis_key, name, packed)
            pipe.pexpire(redis_key, ttl_ms)
        agents = {write.agent: folded.now_ms for write in written}
        if agents:
            pipe.zadd(self.keys.otlp_agents, agents)
        pipe.execute()
        self._cap_incident(folded)

    def _cap_incident(self, folded: _Fold) -> None:
        refused = folded.outcome.tally.get("agents_refused", 0)
        cap = self.settings.max_agents
        if refused:
            first = folded.outcome.refused["agents_refused"][0][:64]
            summary = (
                f"OTLP exporters named more agents than [otlp] max_agents ({cap:,}) allows: their "
                f"telemetry is refused (first refused: {first!r})"
            )
            self.incidents.fire(
                PIPELINE_AGENT,
                CAP_DETECTOR,
                severity="error",
                summary=summary,
                at_ms=folded.now_ms,
                details={"max_agents": cap, "refused": refused},
            )
            self._last_resolve_check = 0.0
            return
        if folded.now_ms / 1000 - self._last_resolve_check < RESOLVE_CHECK_S:
            return
        self._last_resolve_check = folded.now_ms / 1000
        if self.incidents.open(PIPELINE_AGENT, CAP_DETECTOR) is None:
            return
        if int(self.client.zcard(self.keys.otlp_agents)) < cap:
            self.incidents.resolve(
                PIPELINE_AGENT,
                CAP_DETECTOR,
                summary=f"OTLP agents are back under [otlp] max_agents ({cap:,})",
                at_ms=folded.now_ms,
            )


def _explain(outcome: Outcome, settings: OtlpSection) -> None:
    """What the exporter is told about the parts it sent that were not used (partial success)."""
    tally, say = outcome.tally, outcome.problems.append
    if tally["spans_without_agent"]:
        say(
            f"{tally['spans_without_agent']} GenAI span(s) name no agent: set gen_ai.agent.name or "
            "service.name (OTEL_SERVICE_NAME)"
        )
    if tally["points_without_agent"]:
        count = tally["points_without_agent"]
        say(f"{count} usage point(s) name no agent: set service.name (OTEL_SERVICE_NAME)")
    if tally["counts_dropped"]:
        say(
            f"{tally['counts_dropped']} token count(s) or cost(s) dropped: not a whole number from 0 to "
            f"[otlp] max_tokens ({settings.max_tokens:,}), or a cost that is not a finite USD amount"
        )
    for reason, text in (
        ("agents_not_accepted", f"not matching [otlp] accept ({settings.accept!r})"),
        ("agents_over_export_cap", f"over [otlp] max_agents_per_export ({settings.max_agents_per_export})"),
        ("agents_refused", f"over [otlp] max_agents ({settings.max_agents:,})"),
        ("agents_flooded", "over the flood limit ([http] ping_rate, ping_burst): retry later"),
    ):
        names = outcome.refused.get(reason)
        if names:
            say(f"{len(names)} agent(s) refused, {text}, e.g. {names[0][:64]!r}")
    if tally["usage_unattributed"]:
        say("usage metrics of a process running several agents cannot be told apart: send usage in spans")
