"""The OTLP/HTTP receiver (SPEC section 8): ``POST /v1/traces`` and ``POST /v1/metrics``.

Any OpenTelemetry SDK or Collector exports here with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set to the
server and ``Authorization: Bearer <[http] ingest_token>``; agentwatch/otlp/ turns GenAI spans
and metrics into protocol events (docs/opentelemetry.md). Answers, as the OTLP specification
asks of a receiver, in the encoding of the request:

* 200 with an ``Export*ServiceResponse``, whose ``partial_success`` counts the spans (data
  points) that were refused and says why: a GenAI span naming no agent, an agent over the cap...
* 400 (not OTLP), 413 (over ``[otlp] max_body_bytes``, also after gzip), 415 (another media type
  or encoding), 401 (a missing or wrong token), 404 (no ``[http] ingest_token``: ingest is off),
  each with a ``google.rpc.Status`` saying why; exporters do not retry these.
* 503 with ``Retry-After`` while Redis is away: exporters keep the batch and retry it.

Every answer is counted on ``/metrics`` (``agentwatch_otlp_requests_total``), and what the
exports held and dropped too (``agentwatch_otlp_items_total``).
"""

from __future__ import annotations

from typing import Final

from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import code_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agentwatch.errors import OtlpRejected
from agentwatch.http.access import same
from agentwatch.http.server import RETRY_AFTER_S, UNAVAILABLE, BodyTooLarge, Server, read_body
from agentwatch.ingest import Contended
from agentwatch.otlp.decode import encoding_of
from agentwatch.otlp.receiver import Outcome, Signal
from agentwatch.redisconn import explain

PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
_CODES: Final = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    404: code_pb2.UNIMPLEMENTED,
    413: code_pb2.RESOURCE_EXHAUSTED,
    415: code_pb2.INVALID_ARGUMENT,
    503: code_pb2.UNAVAILABLE,
}
_OUTCOMES: Final = {400: "bad_request", 401: "unauthorized", 404: "off", 413: "too_large", 415: "unsupported"}


def _answer_type(request: Request) -> str:
    """Answers go in the request's encoding; protobuf when that is not one OTLP has."""
    try:
        return JSON if encoding_of(request.headers.get("content-type")) == "json" else PROTOBUF
    except OtlpRejected:
        return PROTOBUF


def _encode(message: Message, media: str) -> bytes:
    if media == JSON:
        return json_format.MessageToJson(message, indent=None).encode()
    data: bytes = message.SerializeToString()
    return data


def _status(status: int, text: str, media: str, headers: dict[str, str] | None = None) -> Response:
    body = _encode(status_pb2.Status(code=_CODES.get(status, code_pb2.UNKNOWN), message=text), media)
    return Response(body, status_code=status, media_type=media, headers=headers)


def _success(signal: Signal, outcome: Outcome, media: str) -> Response:
    response: ExportTraceServiceResponse | ExportMetricsServiceResponse
    if signal == "traces":
        response = ExportTraceServiceResponse()
        if outcome.rejected or outcome.problems:
            response.partial_success.rejected_spans = outcome.rejected
            response.partial_success.error_message = outcome.message
    else:
        response = ExportMetricsServiceResponse()
        if outcome.rejected or outcome.problems:
            response.partial_success.rejected_data_points = outcome.rejected
            response.partial_success.error_message = outcome.message
    return Response(_encode(response, media), media_type=media)


async def export(request: Request, signal: Signal) -> Response:
    server: Server = request.app.state.server
    media = _answer_type(request)
    count = server.metrics.otlp
    token = server.settings.http.ingest_token
    if token is None:
        count(signal, "off")
        text = "OTLP ingest is off: set [http] ingest_token (AGENTWATCH_HTTP__INGEST_TOKEN)"
        return _status(404, text, media)
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not same(credential.strip(), token):
        count(signal, "unauthorized")
        server.metrics.denied()
        return _status(
            401,
            "a valid [http] ingest_token is needed: Authorization: Bearer <token> "
            "(OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer%20<token>)",
            media,
            {"WWW-Authenticate": 'Bearer realm="agentwatch-otlp"'},
        )
    try:
        body = await read_body(request, server.settings.otlp.max_body_bytes)
        outcome = await server.otlp.export(
            signal, body, request.headers.get("content-type"), request.headers.get("content-encoding")
        )
    except BodyTooLarge as exc:
        count(signal, "too_large")
        return _status(413, str(exc), media)
    except OtlpRejected as exc:
        count(signal, _OUTCOMES.get(exc.status, "bad_request"))
        return _status(exc.status, exc.message, media)
    except UNAVAILABLE as exc:
        count(signal, "unavailable")
        why = str(exc) if isinstance(exc, Contended) else explain(exc)
        if not isinstance(exc, Contended):
            server.metrics.redis_error()
        return _status(503, f"unavailable: {why}; retry later", media, {"Retry-After": str(RETRY_AFTER_S)})
    count(signal, "partial" if outcome.rejected or outcome.problems else "ok", outcome.tally)
    return _success(signal, outcome, media)


async def traces(request: Request) -> Response:
    return await export(request, "traces")


async def metrics(request: Request) -> Response:
    return await export(request, "metrics")


routes = [Route("/v1/traces", traces, methods=["POST"]), Route("/v1/metrics", metrics, methods=["POST"])]
