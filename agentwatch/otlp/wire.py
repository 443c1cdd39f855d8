"""Views of ``ExportTraceServiceRequest`` that decode only what the receiver reads.

An export of 512 spans typically holds 10 % LLM calls; the rest (HTTP, database, framework
spans) only prove the process alive. Protobuf decodes a request in C quickly, but reading a span's
attributes from Python costs a wrapper object per attribute: reading every attribute of every
span costs ten times the decoding. So the receiver decodes a request through these views, built
at import from opentelemetry-proto's own descriptors (field numbers and types come from there;
only the fields named below change type, to types with the same wire format), so they read
exactly what the official classes read:

* :data:`TracesView`: ``ResourceSpans.scope_spans`` is ``repeated bytes``: protobuf hands over
  each scope's encoding untouched, and a C-level search over it says whether it holds any
  attribute name the receiver reads. The SDK batches spans by instrumentation scope, so the HTTP
  client's 460 spans are one scope, skipped with one search per name (and counted through
  :data:`ScopeSpansView`, whose ``spans`` are ``repeated bytes`` too).
* :data:`ScopeSpansLite`: a scope that does hold such a name is decoded at once, its spans'
  ``attributes`` as a ``map<string, bytes>`` (a map is a repeated key/value message on the
  wire: exactly ``KeyValue``), so the receiver asks for the few keys it reads in C and never
  touches the others (prompts, completions, HTTP details). A value stays the encoding of its
  ``AnyValue``, decoded by the official class when read (values.py: the same model name or
  operation in every call is decoded once); ``events`` and ``links`` stay bytes.
"""

from __future__ import annotations

from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FileDescriptor
from opentelemetry.proto.trace.v1 import trace_pb2

_PACKAGE: Final = "agentwatch.otlp.wire"


def _build() -> tuple[Any, Any, Any]:
    pool = descriptor_pool.DescriptorPool()
    for dependency in trace_pb2.DESCRIPTOR.dependencies:
        _add(pool, dependency)
    official: Descriptor = trace_pb2.DESCRIPTOR.message_types_by_name["TracesData"]
    resource_spans = _message(official, "resource_spans")
    scope_spans = _message(resource_spans, "scope_spans")
    span = _message(scope_spans, "spans")
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
        (scope_spans, "ScopeSpansLite"),
        (span, "SpanLite"),
    ):
        message = view.message_type.add()
        source.CopyToProto(message)
        message.name = name
        del message.nested_type[:], message.enum_type[:]
        for field in message.field:
            if field.type_name.endswith(".ResourceSpans"):
                field.type_name = f".{_PACKAGE}.ResourceSpans"
            elif name == "ScopeSpansLite" and field.name == "spans":
                field.type_name = f".{_PACKAGE}.SpanLite"
            elif name == "SpanLite" and field.name == "attributes":
                field.type_name = f".{_PACKAGE}.SpanLite.AttributesEntry"
            elif field.type_name.endswith((".ScopeSpans", ".Span", ".Event", ".Link", ".Status")):
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES  # kept as bytes
                field.ClearField("type_name")
            elif field.type_name.endswith(".SpanKind"):
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_INT32  # the same varint
                field.ClearField("type_name")
        if name == "SpanLite":
            entry = message.nested_type.add(name="AttributesEntry")
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
            entry.field.add(name="value", number=2, type=_F.TYPE_BYTES, label=_F.LABEL_OPTIONAL)
    pool.Add(view)

    def find(name: str) -> Any:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))

    return find("Traces"), find("ScopeSpans"), find("ScopeSpansLite")


_F = descriptor_pb2.FieldDescriptorProto


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


TracesView, ScopeSpansView, ScopeSpansLite = _build()
"""``TracesView.FromString(body)``: ``.resource_spans[i].resource`` (the official ``Resource``)
and ``.resource_spans[i].scope_spans`` (each scope's bytes); ``ScopeSpansView.FromString(scope)``:
``.spans`` (each span's bytes); ``ScopeSpansLite.FromString(scope).spans``: spans with the
official fields, ``attributes`` a map of key -> the encoding of its ``AnyValue``."""
