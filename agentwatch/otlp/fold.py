"""One process's part of an export, plus what the receiver remembers of it -> protocol events.

The events are the ordinary ones of PROTOCOL.md, so every detector treats an OTel agent exactly
like an agent running the Python producer:

* ``start`` (with ``interval``, ``host``, ``version``) when a run begins: the event writer
  (agentwatch/ingest.py) opens one for an agent's first events, and for a new
  ``service.instance.id``, the run's name.
* ``beat`` per **LLM call**, with its usage (``tokens_in``, ``tokens_out``, ``tokens``, the
  cache and reasoning shares), ``model``, ``provider`` and ``cost`` where the span has one; no cost
  otherwise: the pipeline prices model and token classes itself. Its ``fp`` is the tool calls
  (name + hash of the arguments) the trace ran since its previous LLM call: the tool results this
  call is reading. An agent calling the same tool with the same arguments round after round
  sends beats with one ``fp``, and the ``loop`` detector sees a loop.
* ``pulse`` (with ``interval``) when a process proves alive without an LLM call: a metrics
  export, tool calls, other spans. Like the producer's pulses, pulses never stand in for beats.
* ``beat`` per agent and model with the usage a metrics export adds, when metrics are the
  source of usage (``[otlp] usage_from``; ``auto``: only for processes whose spans carry none).

The interval an agent declares: ``[otlp.agents."<glob>"] interval`` if one matches; else the
cadence of the process's metrics exports, once two of them have arrived (SDKs export metrics on a
fixed period, 60 s by default, idle or not); else ``[otlp] interval``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from agentwatch.config import OtlpSection
from agentwatch.otlp.metrics import COST, MetricBatch, Point
from agentwatch.otlp.resource import Origin
from agentwatch.otlp.spans import Call, SpanBatch, ToolCall
from agentwatch.otlp.state import MAX_AGENTS, MAX_PENDING, MetricState, Series, TraceState
from agentwatch.otlp.values import MAX_COST_USD

FIRST_SERIES_GRACE_MS: Final = 600_000
"""A cumulative series first seen by the receiver counts whole if it started no earlier than
this before the process's metrics were first seen (the receiver saw all of it, give or take the
first export); older series (a receiver that started late, state lost) only set a baseline."""
MIN_INTERVAL_S: Final = 0.1
MAX_INTERVAL_S: Final = 86_400.0
MAX_FP_TOOLS: Final = 8


@dataclass(slots=True)
class Draft:
    """A beat or pulse before the writer gives it ``v``, ``ts``, ``run`` and ``seq`` (and leads
    it with a ``start`` when a run begins)."""

    agent: str
    run: str | None
    kind: Literal["beat", "pulse"]
    fields: dict[str, Any] = field(default_factory=dict)


def start_facts(origin: Origin) -> dict[str, Any]:
    """What a run started from OTLP says about itself (``status`` shows host and version)."""
    facts: dict[str, Any] = {"source": "otlp"}
    if origin.host is not None:
        facts["host"] = origin.host
    if origin.version is not None:
        facts["version"] = origin.version
    return facts


def interval_of(agent: str, metric: MetricState, settings: OtlpSection) -> float:
    """The interval ``agent`` declares (see the module docstring)."""
    configured = settings.interval_for(agent)
    if configured is not None:
        return configured
    return metric.interval_s or settings.interval_s


def fold_spans(
    batch: SpanBatch, trace: TraceState, metric: MetricState, settings: OtlpSection, tally: Counter[str]
) -> list[Draft]:
    """The events of one process's spans; updates ``trace`` (the caller stores it)."""
    out: list[Draft] = []
    run = batch.origin.run
    pending: dict[bytes, tuple[str, list[str]]] = {}
    if trace.pending:
        pending[trace.trace] = (trace.pending_agent, list(trace.pending))
    last_tool: bytes | None = None
    beat_agents: set[str] = set()
    step_agents: list[str] = []
    for step in batch.steps:
        trace.remember(step.agent)
        step_agents.append(step.agent)
        if isinstance(step, ToolCall):
            _, fps = pending.setdefault(step.trace, (step.agent, []))
            if len(fps) < MAX_PENDING:
                fps.append(step.fp)
            last_tool = step.trace
            continue
        fields = _call_fields(step, settings)
        if step.usage:
            trace.span_usage = True
        read = pending.pop(step.trace, None)
        if read is not None and read[1]:
            fields["fp"] = round_fp(read[1])
        out.append(Draft(step.agent, run, "beat", fields))
        beat_agents.add(step.agent)
    alive = [agent for agent in dict.fromkeys(step_agents) if agent not in beat_agents]
    if not batch.steps and batch.spans:  # spans, but no LLM or tool call: the process lives
        alive = list(dict.fromkeys([*trace.agents, *metric.agents]))
        if not alive and batch.origin.explicit and batch.origin.agent is not None:
            trace.remember(batch.origin.agent)
            alive = [batch.origin.agent]
    out += [Draft(agent, run, "pulse", {"interval": interval_of(agent, metric, settings)}) for agent in alive]
    _keep_pending(trace, pending, last_tool)
    tally["beats"] += len(out) - len(alive)
    return out


def fold_metrics(
    batch: MetricBatch,
    trace: TraceState,
    metric: MetricState,
    settings: OtlpSection,
    *,
    now_ms: int,
    tally: Counter[str],
) -> list[Draft] | None:
    """The events of one process's metrics; updates ``metric``. None: the process is no agent
    (no GenAI metrics, never named as one) and nothing about it is to be kept."""
    origin = batch.origin
    named = [p.agent for p in batch.points if p.agent is not None]
    agents = list(dict.fromkeys([*named, *trace.agents, *metric.agents]))
    if not agents and not batch.genai and not origin.explicit:
        return None
    _learn_cadence(metric, now_ms)
    if not agents:
        if origin.agent is None:
            tally["points_without_agent"] += len(batch.points)
            return []
        if metric.exports < 2 and not origin.explicit:
            # Metrics alone name no agent but the service; wait one export for spans naming
            # the process's real agents (they are sent every few seconds, metrics every
            # minute) rather than invent an agent after the service that would soon go silent.
            return []
        agents = [origin.agent]
    out: list[Draft] = []
    for agent in agents:
        if agent not in trace.agents and agent not in metric.agents:
            metric.agents = [*metric.agents, agent][-MAX_AGENTS:]
        out.append(Draft(agent, origin.run, "pulse", {"interval": interval_of(agent, metric, settings)}))
    counts = settings.usage_from == "metrics" or (settings.usage_from == "auto" and not trace.span_usage)
    if not counts:
        metric.series.clear()
        return out
    usage: dict[tuple[str, str | None, str | None], dict[str, Any]] = {}
    for point in batch.points:
        delta = _delta(point, metric)
        if not delta:
            continue
        if delta > (MAX_COST_USD if point.kind == COST else settings.max_tokens):
            tally["counts_dropped"] += 1
            continue
        owner = point.agent or (agents[0] if len(agents) == 1 else None)
        if owner is None:
            tally["usage_unattributed"] += 1  # several agents in one process: whose tokens?
            continue
        fields = usage.setdefault((owner, point.model, point.provider), {})
        fields[point.kind] = fields.get(point.kind, 0) + (delta if point.kind == COST else int(delta))
    for (agent, model, provider), fields in usage.items():
        if "tokens_in" in fields or "tokens_out" in fields:
            fields["tokens"] = fields.get("tokens_in", 0) + fields.get("tokens_out", 0)
        if any(
            value > (MAX_COST_USD if key == COST else settings.max_tokens) for key, value in fields.items()
        ):
            tally["counts_dropped"] += 1  # points each under the cap, their sum over it: garbage
            continue
        if model is not None:
            fields["model"] = model
        if provider is not None:
            fields["provider"] = provider
        out.append(Draft(agent, origin.run, "beat", fields))
        tally["beats"] += 1
    return out


def round_fp(fps: list[str]) -> str:
    """The fingerprint of the tool calls one LLM call reads: order-free (parallel tool calls end
    in any order), so the same round of calls is always the same text."""
    ordered = sorted(fps)
    if len(ordered) <= MAX_FP_TOOLS:
        return " ".join(ordered)
    digest = hashlib.blake2b(" ".join(ordered).encode(), digest_size=6).hexdigest()
    return f"{len(ordered)} tool calls({digest})"


def _call_fields(call: Call, settings: OtlpSection) -> dict[str, Any]:
    fields: dict[str, Any] = dict(call.usage) if settings.usage_from != "metrics" else {}
    if call.cost is not None and settings.usage_from != "metrics":
        fields["cost"] = call.cost
    if call.model is not None:
        fields["model"] = call.model
    if call.provider is not None:
        fields["provider"] = call.provider
    return fields


def _keep_pending(trace: TraceState, pending: dict[bytes, tuple[str, list[str]]], last: bytes | None) -> None:
    """Keep the unread tool calls of the trace that ran a tool last (the next export may hold the
    LLM call reading them); older traces' are dropped (bounded state)."""
    keep = last if last is not None and last in pending else (trace.trace if trace.trace in pending else None)
    if keep is None:
        trace.trace, trace.pending, trace.pending_agent = b"", [], ""
        return
    owner, fps = pending[keep]
    trace.trace, trace.pending, trace.pending_agent = keep, fps[:MAX_PENDING], owner


def _learn_cadence(metric: MetricState, now_ms: int) -> None:
    if metric.first_ms == 0:
        metric.first_ms = now_ms
    if metric.last_ms:
        gap_s = (now_ms - metric.last_ms) / 1000
        # An export well inside the period is out of cycle (a flush at shutdown, a retry).
        if gap_s >= MIN_INTERVAL_S and (not metric.interval_s or gap_s >= metric.interval_s / 2):
            metric.interval_s = min(round(gap_s, 1), MAX_INTERVAL_S)
    metric.last_ms = now_ms
    metric.exports += 1


def _delta(point: Point, metric: MetricState) -> float:
    """What ``point`` adds since the previous export (cumulative points against the series'
    previous total)."""
    if not point.cumulative:
        return point.value
    previous = metric.series.get(point.series)
    metric.series[point.series] = Series(point.start_ns, point.value)
    if previous is None:
        started_ms = point.start_ns // 1_000_000
        return point.value if started_ms >= metric.first_ms - FIRST_SERIES_GRACE_MS else 0.0
    if previous.start_ns == point.start_ns and point.value >= previous.total:
        return point.value - previous.total
    return point.value  # the series restarted (new start time, or its total went down)
