"""OpenTelemetry ingest: OTLP/HTTP exports from instrumented agents -> protocol events.

decode.py (bodies), wire.py (lazy views of trace requests), conventions.py (every attribute name
read), spans.py and metrics.py (what an export holds), fold.py (-> events, with state.py's memory
of each process), receiver.py (one export end to end). The routes are agentwatch/http/otlp.py;
docs/opentelemetry.md is the user's side. This module imports nothing, so the notifiers can
know the alert's detector name without loading protobuf.
"""

from typing import Final

CAP_DETECTOR: Final = "otlp"
"""The ``detector`` of the alert (agent ``agentwatch``) raised while ``[otlp] max_agents``
refuses exporters' new agents."""
