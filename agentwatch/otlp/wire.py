"""Views of ``ExportTraceServiceRequest`` in which scopes and spans stay bytes until needed.

An export of 512 spans typically holds 10 % LLM calls; the rest (HTTP, database, framework
spans) only prove the process alive. Protobuf decodes a request in C quickly, but reading a span's
attributes from Python costs a wrapper object per attribute: reading every attribute of every
span costs ten times the decoding. So the receiver decodes a request through these views, where
``ResourceSpans.scope_spans`` and ``ScopeSpans.spans`` are ``repeated bytes``: protobuf hands over
each scope's (and span's) encoding untouched, a C-level search over it says whether it holds any
attribute name the receiver reads, and only what does is decoded further, spans by
opentelemetry-proto's own ``Span`` class. The SDK batches spans by instrumentation scope, so the
HTTP client's 460 spans are one scope, skipped with one search.

The views are built at import from opentelemetry-proto's descriptors (field numbers and types
come from there; only those two fields change type), so they read exactly the wire format the
official classes read. A span that names no GenAI attribute is counted but never decoded.
"""

from __future__ import annotations

from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FileDescriptor
from opentelemetry.proto.trace.v1 import trace_pb2

_PACKAGE: Final = "agentwatch.otlp.wire"


def _build() -> Any:
    pool = descriptor_pool.DescriptorPool()
    for dependency in trace_pb2.DESCRIPTOR.dependencies:
        _add(pool, dependency)
    official: Descriptor = trace_pb2.DESCRIPTOR.message_types_by_name["TracesData"]
    resource_spans = _message(official, "resource_spans")
    scope_spans = _message(resource_spans, "scope_spans")
    view = descriptor_pb2.FileDescriptorProto(
        name="agentwatch/otlp/wire.proto",
        package=_PACKAGE,
        syntax="proto3",
        dependency=[dependency.name for dependency in trace_pb2.DESCRIPTOR.dependencies],
    )
    for source, name in (
        (official, "Traces"),
        (resource_spans, "ResourceSpans"),
        (scope_spans, "ScopeSpans"),
    ):
        message = view.message_type.add()
        source.CopyToProto(message)
        message.name = name
        del message.nested_type[:], message.enum_type[:]
        for field in message.field:
            if field.type_name.endswith(".ResourceSpans"):
                field.type_name = f".{_PACKAGE}.ResourceSpans"
            elif field.type_name.endswith((".ScopeSpans", ".Span")):  # kept as bytes
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                field.ClearField("type_name")
    pool.Add(view)
    traces = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Traces"))
    scope = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.ScopeSpans"))
    return traces, scope


def _message(descriptor: Descriptor, field: str) -> Descriptor:
    found = descriptor.fields_by_name[field].message_type
    if found is None:
        raise TypeError(f"{descriptor.full_name}.{field} is not a message field")
    return found


def _add(pool: descriptor_pool.DescriptorPool, file: FileDescriptor) -> None:
    for dependency in file.dependencies:
        _add(pool, dependency)
    try:
        pool.FindFileByName(file.name)
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)


TracesView, ScopeSpansView = _build()
"""``TracesView.FromString(body)``: ``.resource_spans[i].resource`` (the official ``Resource``)
and ``.resource_spans[i].scope_spans`` (each scope's bytes); ``ScopeSpansView.FromString(scope)``:
``.scope`` (the official ``InstrumentationScope``) and ``.spans`` (each span's bytes, for
``opentelemetry.proto.trace.v1.trace_pb2.Span.FromString``)."""
