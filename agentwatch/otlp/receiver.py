"""One OTLP export, end to end: decode, read, fold with what Redis remembers, admit, write.

The HTTP routes (agentwatch/http/otlp.py) call :meth:`Receiver.export` with a request's body and
answer with what it returns. An export is one hop to a thread of the receiver's and, usually, one round trip
to Redis: the receiver folds each process's telemetry from the state this server stored after
the process's previous export (state.py), and one script per event stream (the event writer's,
agentwatch/ingest.py) writes the agents' events together with the processes' new state, all or
nothing, and only if that state is still the one in Redis. When another server behind the same
load balancer handled the process in between, the script writes nothing and returns the state
as it is, and the export is folded again from it. So usage is never counted from a stale state,
and nothing is counted twice.

More round trips happen only for what this server has not seen: a process or an agent new to it
is read first (one more round trip, with the count the agent cap needs), and with several event
streams (``[streams] shards``), an agent whose events come from a process homed in another
stream is written after the state is stored (agentwatch/otlp/plan.py).

**Admission.** Agent names come from whoever holds the ingest token, so they are bounded: a name
must match ``[otlp] accept``; one export may name at most ``[otlp] max_agents_per_export``; and
at most ``[otlp] max_agents`` agents are known through OTLP at once (counted in the streams' OTLP
hashes; an agent unseen for ``[otlp] forget`` is forgotten, its record swept). A refused agent's
telemetry is dropped and reported in the export's partial success; refusals for the cap also
raise an ``otlp`` incident on the agent ``agentwatch``, resolved once the count is back under.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from agentwatch import codec
from agentwatch.alerts import PIPELINE_AGENT, Incidents
from agentwatch.config import OtlpSection
from agentwatch.errors import InvalidEntry
from agentwatch.ingest import Contended, EventWriter, Flooded
from agentwatch.ingest_records import MISSING, Cache, Record, _Missing
from agentwatch.keys import Keys
from agentwatch.otlp import CAP_DETECTOR
from agentwatch.otlp.decode import decode_metrics, trace_bytes
from agentwatch.otlp.metrics import read_metrics
from agentwatch.otlp.plan import AgentWrite, Members, Process, collect, local_groups, remote_groups
from agentwatch.otlp.spans import read_traces
from agentwatch.redisconn import Client

Signal = Literal["traces", "metrics"]
RESOLVE_CHECK_S: Final = 60.0
"""How often, at most, a server that refuses nothing looks for an open cap incident to resolve."""
THREADS: Final = 1
"""Exports run in a thread of their own, one after the other: warm (measured about 8 % cheaper per
export than the event loop's shared pool, where successive exports land on different threads),
and never starving the other routes' threads. Their CPU is the GIL's anyway: one thread keeps up
with about a thousand exports of 512 spans a second (benchmarks/otlp_ingest.py)."""
ATTEMPTS: Final = 20
"""Folds of one export from a state another server had just changed, before answering 503."""


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
        self.states: Cache[bytes, bytes | None] = Cache(max(4 * settings.max_agents, 4096))
        """Process hash -> the state this server last stored or read (None: none in Redis)."""
        self._last_resolve_check = 0.0
        self._threads = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="otlp")

    def close(self) -> None:
        """Let the export threads finish (the HTTP server's shutdown)."""
        self._threads.shutdown(wait=True)

    async def export(
        self, signal: Signal, body: bytes, content_type: str | None, content_encoding: str | None
    ) -> Outcome:
        """Decode and ingest one export. Raises OtlpRejected (4xx) for a body that is not OTLP,
        Contended or Redis errors (the route answers 503 with Retry-After)."""
        work = functools.partial(self.ingest, signal, body, content_type, content_encoding)
        return await asyncio.get_running_loop().run_in_executor(self._threads, work)

    def ingest(self, signal: Signal, body: bytes, content_type: str | None, encoding: str | None) -> Outcome:
        """:meth:`export`, in the calling thread."""
        outcome = Outcome(signal)
        processes = self._read(signal, body, content_type, encoding, outcome)
        if processes:
            self._prefetch(processes)
            self._write(processes, outcome, time.time())
        _explain(outcome, self.settings)
        return outcome

    # -- decode and read ----------------------------------------------------------------------
    def _read(
        self, signal: Signal, body: bytes, content_type: str | None, encoding: str | None, outcome: Outcome
    ) -> list[Process]:
        cap = self.settings.max_body_bytes
        found: dict[bytes, Process] = {}
        batches: Sequence[Any]
        if signal == "traces":
            traces = read_traces(trace_bytes(body, content_type, encoding, cap), self.settings)
            outcome.tally.update(traces.tally)
            outcome.rejected += traces.rejected
            batches = [batch for batch in traces.batches if batch.steps or batch.spans]
        else:
            metrics = read_metrics(decode_metrics(body, content_type, encoding, cap), self.settings)
            outcome.tally.update(metrics.tally)
            outcome.rejected += metrics.rejected
            batches = metrics.batches
        for batch in batches:
            origin = batch.origin
            process = found.get(origin.key)
            if process is None:
                process = found[origin.key] = Process(origin, self.keys.shards)
            process.batches.append(batch)
        return list(found.values())

    def _prefetch(self, processes: list[Process]) -> None:
        """Each process's state as this server last stored it, else as Redis holds it, and the
        records of the agents the telemetry names that this server has not seen (one round trip
        for whatever it does not hold)."""
        unknown: list[Process] = []
        with self.states.lock:
            for p in processes:
                known = self.states.get(p.key)
                if isinstance(known, _Missing):
                    unknown.append(p)
                else:
                    p.before = known
        names = {name for p in processes for name in p.named()}
        agents = [name for name in names if self.writer.known(name) is MISSING]
        if not unknown and not agents:
            return
        pipe = self.client.pipeline(transaction=False)
        for p in unknown:
            pipe.hget(self.keys.otlp_for(p.shard, p.key), p.key)
        self.writer.load(agents, pipe)
        replies = pipe.execute()
        for p, raw in zip(unknown, replies, strict=False):
            p.before = raw or None
            self._remember(p.key, p.before)
        self.writer.loaded(agents, replies[len(unknown) :])

    def _remember(self, key: bytes, state: bytes | None) -> None:
        with self.states.lock:
            self.states.put(key, state)

    # -- fold, admit, write -------------------------------------------------------------------
    def _write(self, processes: list[Process], outcome: Outcome, now: float) -> None:
        shards = self.keys.shards
        verdicts: dict[str, str | None] = {}
        todo = processes
        remote = False
        for _ in range(ATTEMPTS):
            for p in todo:
                p.fold(self.settings, now)
            writes = collect(todo, self.settings, shards)
            remote = remote or any(not write.local for write in writes)
            self._admit(writes, verdicts, outcome)
            groups = local_groups(todo, writes, verdicts, self.settings)
            results = self.writer.commit([group for group, _ in groups])
            todo = []
            for (_, members), result in zip(groups, results, strict=True):
                if result.conflicts:  # another server stored these states: fold again from them
                    for p in members.processes:
                        if p.key in result.conflicts:
                            p.before = result.conflicts[p.key]
                            self._remember(p.key, p.before)
                    todo += members.processes
                    continue
                for p in members.processes:
                    self._remember(p.key, p.after)
                self._settle(members, result.outcomes, outcome)
            if not todo:
                break
        else:
            raise Contended("the exporting process's state changed under every attempt; retry later")
        for p in processes:
            outcome.tally.update(p.tally)
        later = (
            remote_groups(collect(processes, self.settings, shards), verdicts, self.settings)
            if remote
            else []
        )
        if later:  # every process's state is stored: the agents homed in other streams
            for (_, members), result in zip(later, self.writer.commit([g for g, _ in later]), strict=True):
                self._settle(members, result.outcomes, outcome)
        self._cap_incident(outcome)

    def _settle(self, members: Members, outcomes: Sequence[Any], outcome: Outcome) -> None:
        for write, reason in members.refused:
            self._refuse(outcome, write, reason)
        for write, result in zip(members.writes, outcomes, strict=True):
            if isinstance(result, Flooded):
                self._refuse(outcome, write, "agents_flooded")
            else:
                outcome.tally["events"] += result.events

    def _admit(self, writes: list[AgentWrite], verdicts: dict[str, str | None], outcome: Outcome) -> None:
        """Decide, once per agent and export, whether its events may be written (``accept``, the
        per-export and global caps); the refused writes are counted when their call is settled."""
        settings = self.settings
        admitted = sum(1 for verdict in verdicts.values() if verdict is None)
        fresh: list[str] = []
        for write in writes:
            agent = write.agent
            if agent in verdicts or agent in fresh:
                continue
            if not fnmatch.fnmatchcase(agent, settings.accept):
                verdicts[agent] = "agents_not_accepted"
            elif admitted + len(fresh) >= settings.max_agents_per_export:
                verdicts[agent] = "agents_over_export_cap"
            else:
                try:
                    codec.check_agent(agent)
                except InvalidEntry as exc:  # a name the protocol refuses (one starting with '-')
                    verdicts[agent] = "agents_invalid"
                    outcome.problems.append(f"agent {agent[:64]!r} refused: {exc}")
                    continue
                fresh.append(agent)
        unknown = [agent for agent in fresh if self.writer.known(agent) is MISSING]
        if unknown:
            pipe = self.client.pipeline(transaction=False)
            self.writer.load(unknown, pipe)
            self.writer.loaded(unknown, pipe.execute())
        newcomers = [agent for agent in fresh if not _counted(self.writer.known(agent))]
        room = settings.max_agents - self.writer.counted() if newcomers else 0
        for agent in fresh:
            if agent in newcomers:
                verdicts[agent] = None if room > 0 else "agents_refused"
                room -= 1
            else:
                verdicts[agent] = None

    @staticmethod
    def _refuse(outcome: Outcome, write: AgentWrite, reason: str) -> None:
        names = outcome.refused.setdefault(reason, [])
        if write.agent not in names:
            names.append(write.agent)
            outcome.tally[reason] += 1
        outcome.rejected += write.items

    # -- the cap's incident --------------------------------------------------------------------
    def _cap_incident(self, outcome: Outcome) -> None:
        refused = outcome.tally.get("agents_refused", 0)
        cap = self.settings.max_agents
        now_ms = int(time.time() * 1000)
        if refused:
            first = outcome.refused["agents_refused"][0][:64]
            summary = (
                f"OTLP exporters named more agents than [otlp] max_agents ({cap:,}) allows: their "
                f"telemetry is refused (first refused: {first!r})"
            )
            self.incidents.fire(
                PIPELINE_AGENT,
                CAP_DETECTOR,
                severity="error",
                summary=summary,
                at_ms=now_ms,
                details={"max_agents": cap, "refused": refused},
            )
            self._last_resolve_check = 0.0
            return
        if now_ms / 1000 - self._last_resolve_check < RESOLVE_CHECK_S:
            return
        self._last_resolve_check = now_ms / 1000
        if self.incidents.open(PIPELINE_AGENT, CAP_DETECTOR) is None:
            return
        if self.writer.counted() < cap:
            self.incidents.resolve(
                PIPELINE_AGENT,
                CAP_DETECTOR,
                summary=f"OTLP agents are back under [otlp] max_agents ({cap:,})",
                at_ms=now_ms,
            )


def _counted(record: Record | object | None) -> bool:
    return isinstance(record, Record) and record.counted and record.exp_s >= time.time()


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
