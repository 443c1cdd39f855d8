"""OTLP/HTTP request bodies -> ``opentelemetry-proto`` messages, or a precise refusal.

The OTLP specification (protocol/otlp.md, "OTLP/HTTP") allows two encodings of the same messages:
binary protobuf (``Content-Type: application/x-protobuf``) and its JSON mapping
(``application/json``), either of them optionally gzipped (``Content-Encoding: gzip``). Both are
decoded by the official generated classes (``opentelemetry-proto``) and protobuf's own JSON
parser; nothing here parses protobuf by hand.

OTLP's JSON differs from protobuf's canonical JSON mapping in one way that matters for decoding:
trace and span ids are hex strings, not base64 (the spec says so explicitly). Protobuf's parser
would read a 32-digit hex id as base64 and silently produce 24 wrong bytes, so the ids are turned
into base64 first (:func:`_ids_to_base64`). Enum values may be integers or names, 64-bit integers
strings or numbers, and unknown fields are ignored, all as the spec requires of a receiver.

Every failure is an :class:`~agentwatch.errors.OtlpRejected` carrying the HTTP status the route
answers with: 400 for a body that is not OTLP, 413 for one over the size cap (checked again after
decompression, so a small gzip bomb cannot expand into gigabytes), 415 for an encoding or media
type the receiver does not speak.
"""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any, Final, Literal, TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from agentwatch.errors import OtlpRejected

Encoding = Literal["protobuf", "json"]
M = TypeVar("M", bound=Message)

PROTOBUF_TYPES: Final = frozenset({"application/x-protobuf", "application/protobuf"})
JSON_TYPES: Final = frozenset({"application/json"})

_ID_FIELDS: Final = ("traceId", "spanId", "parentSpanId")
_POINT_KINDS: Final = ("gauge", "sum", "histogram", "exponentialHistogram")


def encoding_of(content_type: str | None) -> Encoding:
    """The body's encoding from its ``Content-Type`` (parameters such as charset ignored)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in PROTOBUF_TYPES:
        return "protobuf"
    if media in JSON_TYPES:
        return "json"
    shown = media or "none"
    raise OtlpRejected(
        415, f"unsupported Content-Type {shown[:80]!r}: send application/x-protobuf or application/json"
    )


def inflate(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """The body without its ``Content-Encoding``, refused when larger than ``max_bytes`` either way."""
    if len(body) > max_bytes:
        raise OtlpRejected(413, f"body of {len(body)} bytes is over the {max_bytes}-byte cap")
    coding = (content_encoding or "identity").strip().lower()
    if coding in ("identity", ""):
        return body
    if coding != "gzip":
        raise OtlpRejected(415, f"unsupported Content-Encoding {coding[:40]!r}: send gzip or none")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header and trailer
    try:
        plain = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise OtlpRejected(400, f"body is not valid gzip ({exc})") from None
    if len(plain) > max_bytes or inflater.unconsumed_tail:
        raise OtlpRejected(413, f"body inflates past the {max_bytes}-byte cap")
    if not inflater.eof:
        raise OtlpRejected(400, "body is not valid gzip (truncated)")
    return plain


def decode_traces(
    body: bytes, content_type: str | None, content_encoding: str | None, max_bytes: int
) -> ExportTraceServiceRequest:
    """A ``POST /v1/traces`` body as an ``ExportTraceServiceRequest``."""
    return _decode(ExportTraceServiceRequest(), body, content_type, content_encoding, max_bytes)


def trace_bytes(body: bytes, content_type: str | None, content_encoding: str | None, max_bytes: int) -> bytes:
    """A ``POST /v1/traces`` body as the protobuf encoding of its request, which
    :func:`agentwatch.otlp.spans.read_traces` reads span by span (JSON is decoded, then encoded)."""
    if encoding_of(content_type) == "protobuf":
        return inflate(body, content_encoding, max_bytes)
    encoded: bytes = decode_traces(body, content_type, content_encoding, max_bytes).SerializeToString()
    return encoded


def decode_metrics(
    body: bytes, content_type: str | None, content_encoding: str | None, max_bytes: int
) -> ExportMetricsServiceRequest:
    """A ``POST /v1/metrics`` body as an ``ExportMetricsServiceRequest``."""
    return _decode(ExportMetricsServiceRequest(), body, content_type, content_encoding, max_bytes)


def _decode(message: M, body: bytes, content_type: str | None, content_encoding: str | None, cap: int) -> M:
    encoding = encoding_of(content_type)
    plain = inflate(body, content_encoding, cap)
    what = type(message).__name__
    if encoding == "protobuf":
        try:
            message.ParseFromString(plain)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise OtlpRejected(400, f"body is not a protobuf {what} ({exc or 'malformed'})") from None
        return message
    try:
        data = json.loads(plain)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OtlpRejected(400, f"body is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise OtlpRejected(400, f"body is JSON but not an OTLP {what} object")
    _ids_to_base64(data)
    try:
        json_format.ParseDict(data, message, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise OtlpRejected(400, f"body is not an OTLP {what} in JSON ({_short(str(exc))})") from None
    return message


def _ids_to_base64(data: dict[str, Any]) -> None:
    """Rewrite, in place, the hex trace/span ids of an OTLP JSON request into protobuf's base64."""
    for resource in _dicts(data.get("resourceSpans")):
        for scope in _dicts(resource.get("scopeSpans")):
            for span in _dicts(scope.get("spans")):
                _fix(span)
                for link in _dicts(span.get("links")):
                    _fix(link)
    for resource in _dicts(data.get("resourceMetrics")):
        for scope in _dicts(resource.get("scopeMetrics")):
            for metric in _dicts(scope.get("metrics")):
                for kind in _POINT_KINDS:
                    body = metric.get(kind)
                    if isinstance(body, dict):
                        for point in _dicts(body.get("dataPoints")):
                            for exemplar in _dicts(point.get("exemplars")):
                                _fix(exemplar)


def _fix(holder: dict[str, Any]) -> None:
    for name in _ID_FIELDS:
        value = holder.get(name)
        if isinstance(value, str) and value:
            try:
                holder[name] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise OtlpRejected(
                    400, f"{name} {_short(value)!r} is not hex (OTLP JSON ids are hex)"
                ) from None


def _dicts(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
