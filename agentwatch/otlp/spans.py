"""Spans -> the LLM calls and tool calls of each agent, in the order they ended.

What a span is, decided here and only here:

* an **LLM call** carries usage (any token attribute of conventions.py) and is not a span around
  a whole agent run (``invoke_agent``; an OpenInference ``AGENT``/``CHAIN``), whose usage sums its
  children's. An LLM call whose parent span, in the same export, is an LLM call too is the same
  call seen by a second instrumentation (PydanticAI over the OpenAI client, say): only the outer
  one counts.
* a **tool call** is ``gen_ai.operation.name = execute_tool`` (or OpenInference ``TOOL``): its
  fingerprint is the tool name and a hash of its arguments (never the arguments themselves,
  which may hold anything).
* anything else only proves that the process is alive.

The agent of a GenAI span: the first ``[otlp] agent_from`` attribute found on the span, else on
its nearest ancestor in the same export (PydanticAI names the agent on every span; others only on
the ``invoke_agent`` span), else on the resource. An SDK's default ``unknown_service:...`` is no
name. Names are mapped onto the protocol's charset as the producer maps them (``Weather Bot`` ->
``Weather_Bot``). A GenAI span with no name at all is counted (``spans_without_agent``) and
reported back to the exporter, never guessed.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from google.protobuf.message import DecodeError

from agentwatch.config import OtlpSection
from agentwatch.errors import OtlpRejected
from agentwatch.otlp import conventions as conv
from agentwatch.otlp import reading
from agentwatch.otlp.resource import Origin, origin_of
from agentwatch.otlp.values import Bad, amount_of, count_of, plain_of, text_of
from agentwatch.otlp.wire import ScopeSpansLite, ScopeSpansView, TracesView

MAX_ANCESTRY: Final = 64
"""Parent links followed to find an ancestor naming the agent (a cycle or a deep tree stops here)."""
MAX_TOOL_NAME: Final = 64


@dataclass(slots=True)
class Call:
    """One LLM call: its usage becomes one beat of its agent."""

    agent: str
    trace: bytes
    end_ns: int
    usage: dict[str, int]
    cost: float | None = None
    model: str | None = None
    provider: str | None = None


@dataclass(slots=True)
class ToolCall:
    """One tool execution: part of the fingerprint of the next LLM call of its trace."""

    agent: str
    trace: bytes
    end_ns: int
    fp: str


Step = Call | ToolCall


@dataclass(slots=True)
class SpanBatch:
    """One process's GenAI steps in an export, in the order they ended."""

    origin: Origin
    steps: list[Step] = field(default_factory=list)
    spans: int = 0


@dataclass(slots=True)
class Traces:
    """What an export of spans holds, per process, and what could not be used (``tally``)."""

    batches: list[SpanBatch] = field(default_factory=list)
    tally: Counter[str] = field(default_factory=Counter)
    rejected: int = 0
    """Spans not accepted (GenAI spans naming no agent): OTLP's partial success ``rejected_spans``."""


def read_traces(body: bytes, settings: OtlpSection) -> Traces:
    """Every process's LLM and tool calls in an ``ExportTraceServiceRequest``'s protobuf
    encoding, with counters of what was dropped. Only scopes whose bytes hold a name the receiver
    reads are decoded, and of their spans only those names (wire.py); the others are counted."""
    try:
        request = TracesView.FromString(body)
    except DecodeError as exc:
        raise OtlpRejected(
            400, f"body is not a protobuf ExportTraceServiceRequest ({exc or 'malformed'})"
        ) from None
    out = Traces()
    agent_from = tuple(settings.agent_from)
    needles = _needles(agent_from)
    for resource_spans in request.resource_spans:
        batch = SpanBatch(origin_of(resource_spans.resource.attributes, settings))
        scopes = resource_spans.scope_spans
        spans, skipped = _decoded(scopes, needles)
        batch.spans = len(spans) + skipped
        out.tally["spans"] += batch.spans
        found = _found(spans, agent_from)
        _steps(batch, found, scopes, settings, out)
        out.batches.append(batch)
    return out


def _found(spans: list[Any], agent_from: tuple[str, ...]) -> list[_Found]:
    """The spans holding a name the receiver reads, each with how to read it."""
    wanted = reading.wanted(agent_from)
    found: list[_Found] = []
    for span in spans:
        attributes = span.attributes
        present = wanted.intersection(attributes)
        if present:  # else a span of a GenAI scope that is not itself one (an HTTP call, say)
            found.append((span, attributes, reading.reading_of(present, agent_from)))
    return found


def _steps(
    batch: SpanBatch, found: list[_Found], scopes: Sequence[bytes], settings: OtlpSection, out: Traces
) -> None:
    """The LLM and tool calls among ``found``, each with its agent, into ``batch`` in the order
    they ended; spans naming no agent are counted as refused."""
    named = _span_agents(found, scopes)
    calls = {span.span_id for span, attributes, how in found if _is_call(attributes, how)}
    for one in found:
        step = _step(one, calls, settings, out.tally)
        if step is None:
            continue
        agent = _agent(one[0], named, batch.origin)
        if agent is None:
            out.tally["spans_without_agent"] += 1
            out.rejected += 1
            continue
        step.agent = agent
        batch.steps.append(step)
    batch.steps.sort(key=lambda step: step.end_ns)


@functools.cache
def _needles(agent_from: tuple[str, ...]) -> tuple[bytes, ...]:
    """What a scope's encoding must contain to be worth decoding: conventions.SPAN_MARKERS and the
    configured agent attributes they do not cover (a match inside a value only costs a decode)."""
    extra = [name for name in agent_from if not name.startswith(conv.SPAN_MARKERS)]
    return tuple(dict.fromkeys(name.encode() for name in (*conv.SPAN_MARKERS, *extra)))


def _decoded(scopes: Sequence[bytes], needles: tuple[bytes, ...]) -> tuple[list[Any], int]:
    """The spans of the scopes that hold a needle, decoded, and how many spans the others hold.
    A scope holding none (an HTTP client's, a database driver's) costs one search per needle and
    a count, never a Python object per span."""
    spans: list[Any] = []
    skipped = 0
    try:
        for scope in scopes:
            if _holds(scope, needles):
                spans += ScopeSpansLite.FromString(scope).spans
            else:
                skipped += len(ScopeSpansView.FromString(scope).spans)
    except DecodeError as exc:
        raise OtlpRejected(400, f"a scope of spans is not valid protobuf ({exc or 'malformed'})") from None
    return spans, skipped


_Found = tuple[Any, Any, reading.Reading]
"""A span the receiver reads: the span, its attributes (a map), how to read them."""


def _holds(scope: bytes, needles: tuple[bytes, ...]) -> bool:
    """Whether a scope's encoding holds any needle: one C-level search per needle."""
    return any(needle in scope for needle in needles)


def _is_call(attributes: Any, how: reading.Reading) -> bool:
    if not how.usage:
        return False
    if how.operation is not None and text_of(attributes[how.operation]) in conv.AGGREGATE_OPERATIONS:
        return False
    return how.kind is None or text_of(attributes[how.kind]) in conv.OPENINFERENCE_CALLS


def _is_tool(attributes: Any, how: reading.Reading) -> bool:
    if how.operation is not None:
        return text_of(attributes[how.operation]) in conv.TOOL_OPERATIONS
    return how.kind is not None and text_of(attributes[how.kind]) == conv.OPENINFERENCE_TOOL


def _step(found: _Found, calls: set[bytes], settings: OtlpSection, tally: Counter[str]) -> Step | None:
    span, attributes, how = found
    if span.span_id in calls:
        if span.parent_span_id and span.parent_span_id in calls:
            tally["calls_nested"] += 1  # the same call, seen by a second instrumentation
            return None
        tally["calls"] += 1
        return _call(span, attributes, how, settings.max_tokens, tally)
    if _is_tool(attributes, how):
        tally["tool_calls"] += 1
        return ToolCall(agent="", trace=bytes(span.trace_id), end_ns=span.end_time_unix_nano,
                        fp=tool_fp(attributes, how))  # fmt: skip
    return None


def _call(span: Any, attributes: Any, how: reading.Reading, cap: int, tally: Counter[str]) -> Call:
    usage: dict[str, int] = {}
    for key, name in how.tokens:
        number = count_of(attributes[name], cap)
        if number.__class__ is Bad:
            tally["counts_dropped"] += 1
        else:
            usage[key] = number  # type: ignore[assignment]
    if "tokens_in" in usage or "tokens_out" in usage:
        usage["tokens"] = usage.get("tokens_in", 0) + usage.get("tokens_out", 0)
        if usage["tokens"] > cap:  # each part under the cap, their sum over it: garbage too
            tally["counts_dropped"] += 1
            usage = {}
    elif how.total is not None:
        number = count_of(attributes[how.total], cap)
        if number.__class__ is Bad:
            tally["counts_dropped"] += 1
        else:
            usage["tokens"] = number  # type: ignore[assignment]
    cost: float | None = None
    if how.cost is not None:
        priced = amount_of(attributes[how.cost])
        if priced.__class__ is Bad:
            tally["counts_dropped"] += 1
        else:
            cost = priced  # type: ignore[assignment]
    return Call(
        agent="",
        trace=bytes(span.trace_id),
        end_ns=span.end_time_unix_nano,
        usage=usage,
        cost=cost,
        model=text_of(attributes[how.model]) if how.model is not None else None,
        provider=text_of(attributes[how.provider]) if how.provider is not None else None,
    )


def tool_fp(attributes: Any, how: reading.Reading) -> str:
    """``name(hash of the arguments)``: the same tool with the same arguments, the same text."""
    name = (text_of(attributes[how.tool_name]) if how.tool_name is not None else None) or "tool"
    arguments = plain_of(attributes[how.tool_arguments]).encode() if how.tool_arguments is not None else b""
    digest = hashlib.blake2b(arguments, digest_size=4)
    return f"{name[:MAX_TOOL_NAME]}({digest.hexdigest()})"


def _span_agents(found: list[_Found], scopes: Sequence[bytes]) -> dict[bytes, str]:
    """span id -> the agent its own attributes (or its nearest ancestor's) name."""
    named: dict[bytes, str] = {}
    for span, attributes, how in found:
        for key in how.agents:
            name = text_of(attributes[key])
            if name is not None and not name.startswith(conv.UNKNOWN_SERVICE):
                named[span.span_id] = name
                break
    if not named or len(named) == len(found):
        return named
    parents = {span.span_id: span.parent_span_id for span, _, _ in found}
    if any(span.parent_span_id not in parents for span, _, _ in found if span.span_id not in named):
        # an ancestor among the spans that were not read (a plain "step" span between the
        # agent's span and its calls): decode every scope, for the ids (rare: most
        # instrumentations name the agent on every span, or on none)
        every = [span for scope in scopes for span in ScopeSpansLite.FromString(scope).spans]
        parents = {span.span_id: span.parent_span_id for span in every}
    for span, _, _ in found:
        if span.span_id not in named:
            inherited = _ancestor_agent(span.parent_span_id, parents, named)
            if inherited is not None:
                named[span.span_id] = inherited
    return named


def _ancestor_agent(parent: bytes, parents: dict[bytes, bytes], named: dict[bytes, str]) -> str | None:
    for _ in range(MAX_ANCESTRY):
        if not parent:
            return None
        found = named.get(parent)
        if found is not None:
            return found
        parent = parents.get(parent, b"")
    return None


def _agent(span: Any, named: dict[bytes, str], origin: Origin) -> str | None:
    own = named.get(span.span_id)
    return origin.agent_name(own) if own is not None else origin.agent
