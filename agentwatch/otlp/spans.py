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
from dataclasses import dataclass, field
from typing import Final

from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from agentwatch.config import OtlpSection
from agentwatch.errors import OtlpRejected
from agentwatch.otlp import conventions as conv
from agentwatch.otlp.resource import Origin, origin_of
from agentwatch.otlp.values import Bad, amount, count, plain, text
from agentwatch.otlp.wire import ScopeSpansView, TracesView

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
    encoding, with counters of what was dropped. Only spans whose bytes hold an attribute name the
    receiver reads are decoded (wire.py); the others are counted."""
    try:
        request = TracesView.FromString(body)
    except DecodeError as exc:
        raise OtlpRejected(
            400, f"body is not a protobuf ExportTraceServiceRequest ({exc or 'malformed'})"
        ) from None
    out = Traces()
    wanted = conv.SPAN_KEYS | frozenset(settings.agent_from)
    needles = _needles(tuple(settings.agent_from))
    for resource_spans in request.resource_spans:
        origin = origin_of(resource_spans.resource.attributes, settings)
        batch = SpanBatch(origin)
        raws, genai = _span_bytes(resource_spans.scope_spans, needles)
        batch.spans = len(raws)
        out.tally["spans"] += len(raws)
        spans = [_decode(raw) for raw in genai]
        found = [_attributes(span.attributes, wanted) for span in spans]
        named = _span_agents(spans, found, settings.agent_from, raws)
        calls = {span.span_id for span, attrs in zip(spans, found, strict=True) if _is_call(attrs)}
        for span, attrs in zip(spans, found, strict=True):
            if not attrs:
                continue
            step = _step(span, attrs, calls, settings, out.tally)
            if step is None:
                continue
            agent = _agent(span, named, origin)
            if agent is None:
                out.tally["spans_without_agent"] += 1
                out.rejected += 1
                continue
            step.agent = agent
            batch.steps.append(step)
        batch.steps.sort(key=lambda step: step.end_ns)
        out.batches.append(batch)
    return out


@functools.cache
def _needles(agent_from: tuple[str, ...]) -> tuple[bytes, ...]:
    """What a scope's or span's encoding must contain to be worth decoding: the prefixes of every
    attribute name in conventions.py, and the configured agent attributes. (A match inside a value
    only costs a decode.)"""
    return tuple(dict.fromkeys(name.encode() for name in (*conv.SPAN_PREFIXES, *agent_from)))


def _span_bytes(scopes: list[bytes], needles: tuple[bytes, ...]) -> tuple[list[bytes], list[bytes]]:
    """Every span's encoding in the resource's scopes, and those holding a needle. A scope holding
    none (an HTTP client's, a database driver's) is skipped with one search per needle."""
    every: list[bytes] = []
    genai: list[bytes] = []
    for scope_bytes in scopes:
        try:
            spans = ScopeSpansView.FromString(scope_bytes).spans
        except DecodeError as exc:
            raise OtlpRejected(
                400, f"a scope of spans is not valid protobuf ({exc or 'malformed'})"
            ) from None
        every += spans
        if any(needle in scope_bytes for needle in needles):
            genai += [raw for raw in spans if any(needle in raw for needle in needles)]
    return every, genai


def _decode(raw: bytes) -> Span:
    try:
        return Span.FromString(raw)
    except DecodeError as exc:
        raise OtlpRejected(400, f"a span is not valid protobuf ({exc or 'malformed'})") from None


def _attributes(attributes: object, wanted: frozenset[str]) -> dict[str, AnyValue]:
    """The span's attributes the receiver reads; the rest (prompts, HTTP details) never leave
    protobuf."""
    found: dict[str, AnyValue] = {}
    kv: KeyValue
    for kv in attributes:  # type: ignore[attr-defined]
        if kv.key in wanted:
            found[kv.key] = kv.value
    return found


def _is_call(attrs: dict[str, AnyValue]) -> bool:
    if not attrs or conv.USAGE.isdisjoint(attrs):
        return False
    operation = attrs.get(conv.OPERATION)
    if operation is not None and text(operation) in conv.AGGREGATE_OPERATIONS:
        return False
    kind = attrs.get(conv.OPENINFERENCE_KIND)
    return kind is None or text(kind) in conv.OPENINFERENCE_CALLS


def _is_tool(attrs: dict[str, AnyValue]) -> bool:
    operation = attrs.get(conv.OPERATION)
    if operation is not None:
        return text(operation) in conv.TOOL_OPERATIONS
    kind = attrs.get(conv.OPENINFERENCE_KIND)
    return kind is not None and text(kind) == conv.OPENINFERENCE_TOOL


def _step(
    span: Span, attrs: dict[str, AnyValue], calls: set[bytes], settings: OtlpSection, tally: Counter[str]
) -> Step | None:
    if span.span_id in calls:
        if span.parent_span_id and span.parent_span_id in calls:
            tally["calls_nested"] += 1  # the same call, seen by a second instrumentation
            return None
        tally["calls"] += 1
        return _call(span, attrs, settings.max_tokens, tally)
    if _is_tool(attrs):
        tally["tool_calls"] += 1
        return ToolCall(
            agent="", trace=bytes(span.trace_id), end_ns=span.end_time_unix_nano, fp=tool_fp(attrs)
        )
    return None


def _call(span: Span, attrs: dict[str, AnyValue], cap: int, tally: Counter[str]) -> Call:
    usage: dict[str, int] = {}
    for key, names in conv.TOKEN_CLASSES.items():
        value = _first(attrs, names)
        if value is None:
            continue
        number = count(value, cap)
        if isinstance(number, Bad):
            tally["counts_dropped"] += 1
        else:
            usage[key] = number
    if "tokens_in" in usage or "tokens_out" in usage:
        usage["tokens"] = usage.get("tokens_in", 0) + usage.get("tokens_out", 0)
    else:
        total = _first(attrs, conv.TOTAL_TOKENS)
        if total is not None:
            number = count(total, cap)
            if isinstance(number, Bad):
                tally["counts_dropped"] += 1
            else:
                usage["tokens"] = number
    cost: float | None = None
    found = _first(attrs, conv.COST)
    if found is not None:
        priced = amount(found)
        if isinstance(priced, Bad):
            tally["counts_dropped"] += 1
        else:
            cost = priced
    model = _first(attrs, conv.MODEL)
    provider = _first(attrs, conv.PROVIDER)
    return Call(
        agent="",
        trace=bytes(span.trace_id),
        end_ns=span.end_time_unix_nano,
        usage=usage,
        cost=cost,
        model=text(model) if model is not None else None,
        provider=text(provider) if provider is not None else None,
    )


def tool_fp(attrs: dict[str, AnyValue]) -> str:
    """``name(hash of the arguments)``: the same tool with the same arguments, the same text."""
    name_value = _first(attrs, conv.TOOL_NAME)
    name = (text(name_value) if name_value is not None else None) or "tool"
    arguments = _first(attrs, conv.TOOL_ARGUMENTS)
    digest = hashlib.blake2b(plain(arguments).encode() if arguments is not None else b"", digest_size=4)
    return f"{name[:MAX_TOOL_NAME]}({digest.hexdigest()})"


def _span_agents(
    spans: list[Span], found: list[dict[str, AnyValue]], agent_from: list[str], raws: list[bytes]
) -> dict[bytes, str]:
    """span id -> the agent its own attributes (or its nearest ancestor's) name."""
    named: dict[bytes, str] = {}
    for span, attrs in zip(spans, found, strict=True):
        for key in agent_from:
            value = attrs.get(key)
            name = text(value) if value is not None else None
            if name is not None and not name.startswith(conv.UNKNOWN_SERVICE):
                named[span.span_id] = name
                break
    if not named or len(named) == len(spans):
        return named
    parents = {span.span_id: span.parent_span_id for span in spans}
    if any(span.parent_span_id not in parents for span in spans if span.span_id not in named):
        # an ancestor among the spans that were not decoded (a plain "step" span between the
        # agent's span and its calls): decode them all, for their ids (rare: most instrumentations
        # name the agent on every span, or on none)
        parents = {span.span_id: span.parent_span_id for span in map(_decode, raws)}
    for span in spans:
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


def _agent(span: Span, named: dict[bytes, str], origin: Origin) -> str | None:
    own = named.get(span.span_id)
    return origin.agent_name(own) if own is not None else origin.agent


def _first(attrs: dict[str, AnyValue], names: tuple[str, ...]) -> AnyValue | None:
    for name in names:
        value = attrs.get(name)
        if value is not None:
            return value
    return None
