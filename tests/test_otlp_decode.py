"""OTLP/HTTP bodies: both encodings, gzip, and every way a body can be refused (fast, no Redis)."""

from __future__ import annotations

import gzip
import json

import pytest

from agentwatch.errors import OtlpRejected
from agentwatch.otlp.decode import decode_metrics, decode_traces

from otlp_build import DATA, recorded

PB = "application/x-protobuf"
JSON = "application/json"
CAP = 4 * 1024 * 1024


@pytest.mark.parametrize("path", sorted(DATA.glob("*.traces*.pb")), ids=lambda p: p.name)
def test_every_recorded_protobuf_trace_payload_decodes(path):
    request = decode_traces(path.read_bytes(), PB, None, CAP)
    assert sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans) >= 1


@pytest.mark.parametrize("path", sorted(DATA.glob("*.metrics*.pb")), ids=lambda p: p.name)
def test_every_recorded_protobuf_metrics_payload_decodes(path):
    request = decode_metrics(path.read_bytes(), PB, None, CAP)
    assert sum(len(scope.metrics) for rm in request.resource_metrics for scope in rm.scope_metrics) >= 1


def test_json_from_the_real_json_exporter_keeps_hex_ids_exact():
    body = recorded("pydantic-ai-json.traces.json")
    request = decode_traces(body, "application/json; charset=utf-8", None, CAP)
    spans = [span for rs in request.resource_spans for scope in rs.scope_spans for span in scope.spans]
    wire = json.loads(body)["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert [span.trace_id.hex() for span in spans] == [item["traceId"].lower() for item in wire]
    assert [span.span_id.hex() for span in spans] == [item["spanId"].lower() for item in wire]
    assert len(spans[0].trace_id) == 16 and len(spans[0].span_id) == 8


def test_json_metrics_from_the_real_json_exporter_decode():
    request = decode_metrics(recorded("pydantic-ai-json.metrics.json"), JSON, None, CAP)
    names = {m.name for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert "gen_ai.client.token.usage" in names


def test_gzip_bodies_decode_to_the_same_request():
    body = recorded("pydantic-ai.traces.pb")
    assert decode_traces(gzip.compress(body), PB, "gzip", CAP) == decode_traces(body, PB, None, CAP)


def test_json_ignores_unknown_fields_and_takes_enum_numbers_and_string_integers():
    body = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "a"}}]},
                "futureField": {"x": 1},
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": "5B8EFFF798038103D269B633813FC60C",
                                "spanId": "EEE19B7EC3C1B174",
                                "name": "chat",
                                "kind": 3,
                                "endTimeUnixNano": "1700000000000000000",
                                "attributes": [{"key": "n", "value": {"intValue": "12"}}],
                            }
                        ]
                    }
                ],
            }
        ]
    }
    request = decode_traces(json.dumps(body).encode(), JSON, None, CAP)
    span = request.resource_spans[0].scope_spans[0].spans[0]
    assert span.trace_id.hex() == "5b8efff798038103d269b633813fc60c"
    assert span.kind == 3 and span.end_time_unix_nano == 1_700_000_000_000_000_000
    assert span.attributes[0].value.int_value == 12


@pytest.mark.parametrize(
    ("body", "content_type", "encoding", "status", "says"),
    [
        (b"\xff\xff\xff\xff garbage", PB, None, 400, "not a protobuf ExportTraceServiceRequest"),
        (b"not json", JSON, None, 400, "not JSON"),
        (b"[1, 2]", JSON, None, 400, "not an OTLP ExportTraceServiceRequest object"),
        (b'{"resourceSpans": 5}', JSON, None, 400, "not an OTLP ExportTraceServiceRequest in JSON"),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
            JSON,
            None,
            400,
            "not hex",
        ),
        (b"\x1f\x8b\x08 broken", PB, "gzip", 400, "not valid gzip"),
        (b"{}", "text/plain", None, 415, "unsupported Content-Type 'text/plain'"),
        (b"{}", None, None, 415, "unsupported Content-Type 'none'"),
        (b"{}", JSON, "br", 415, "unsupported Content-Encoding 'br'"),
    ],
    ids=[
        "garbage-protobuf",
        "not-json",
        "json-list",
        "json-wrong-shape",
        "bad-hex-id",
        "bad-gzip",
        "media",
        "no-type",
        "brotli",
    ],
)
def test_bodies_that_are_not_otlp_are_refused_with_the_status_and_a_reason(
    body, content_type, encoding, status, says
):
    with pytest.raises(OtlpRejected) as refused:
        decode_traces(body, content_type, encoding, CAP)
    assert refused.value.status == status
    assert says in refused.value.message


def test_a_body_over_the_cap_is_413():
    with pytest.raises(OtlpRejected) as refused:
        decode_traces(b"\x00" * 2049, PB, None, 2048)
    assert refused.value.status == 413
    assert "2049 bytes is over the 2048-byte cap" in refused.value.message


def test_a_small_gzip_that_inflates_past_the_cap_is_413_without_inflating_it_all():
    bomb = gzip.compress(b"\x00" * (64 * 1024 * 1024))  # 64 MiB of zeros in ~65 KB
    assert len(bomb) < 100_000
    with pytest.raises(OtlpRejected) as refused:
        decode_traces(bomb, PB, "gzip", 1024 * 1024)
    assert refused.value.status == 413
    assert "inflates past the 1048576-byte cap" in refused.value.message


def test_empty_body_is_an_empty_request():
    assert len(decode_traces(b"", PB, None, CAP).resource_spans) == 0
