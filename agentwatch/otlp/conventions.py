"""Which OpenTelemetry attributes mean what: every naming generation read, in one table.

The GenAI semantic conventions are still moving (usage names changed in semconv 1.27, the
provider attribute in 1.37, metrics in the separate GenAI repository), and instrumentations
outside OpenTelemetry use their own names (OpenInference for Phoenix, OpenLLMetry, OpenLIT,
PydanticAI). A receiver that reads only the newest names sees nothing from most agents running
today, so each meaning below lists every name in use, first match wins (newest first).

Nothing outside this module names an attribute: spans.py and metrics.py ask these tables.
docs/opentelemetry.md lists the same names for users; keep the two in step.
"""

from __future__ import annotations

from typing import Final

# -- what a span is ---------------------------------------------------------------------------
OPERATION: Final = "gen_ai.operation.name"
OPENINFERENCE_KIND: Final = "openinference.span.kind"

TOOL_OPERATIONS: Final = frozenset({"execute_tool"})
AGGREGATE_OPERATIONS: Final = frozenset({"invoke_agent", "invoke_workflow", "create_agent"})
"""Spans around a whole agent run: usage there (older PydanticAI put it there) sums its children."""
OPENINFERENCE_CALLS: Final = frozenset({"LLM", "EMBEDDING"})
OPENINFERENCE_TOOL: Final = "TOOL"

# -- usage of one LLM call (token classes as PROTOCOL.md names them) --------------------------
INPUT_TOKENS: Final = (
    "gen_ai.usage.input_tokens",  # semconv >= 1.27
    "gen_ai.usage.prompt_tokens",  # semconv <= 1.26 (deprecated), OpenLLMetry before 0.40
    "llm.token_count.prompt",  # OpenInference
)
OUTPUT_TOKENS: Final = (
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.completion_tokens",
    "llm.token_count.completion",
)
TOTAL_TOKENS: Final = (
    "gen_ai.usage.total_tokens",  # OpenLLMetry
    "llm.token_count.total",  # OpenInference
    "llm.usage.total_tokens",  # OpenLLMetry before 0.40
)
CACHE_READ_TOKENS: Final = (
    "gen_ai.usage.cache_read.input_tokens",  # semconv >= 1.37, PydanticAI, OpenLLMetry
    "gen_ai.usage.cache_read_input_tokens",  # OpenLLMetry before the semconv name
    "llm.token_count.prompt_details.cache_read",
)
CACHE_WRITE_TOKENS: Final = (
    "gen_ai.usage.cache_creation.input_tokens",
    "gen_ai.usage.cache_creation_input_tokens",
    "llm.token_count.prompt_details.cache_write",
)
REASONING_TOKENS: Final = (
    "gen_ai.usage.reasoning.output_tokens",
    "gen_ai.usage.reasoning_tokens",  # OpenLLMetry
    "gen_ai.usage.details.reasoning_tokens",  # PydanticAI
    "llm.token_count.completion_details.reasoning",
)
TOKEN_CLASSES: Final = {
    "tokens_in": INPUT_TOKENS,
    "tokens_out": OUTPUT_TOKENS,
    "tokens_cache_read": CACHE_READ_TOKENS,
    "tokens_cache_write": CACHE_WRITE_TOKENS,
    "tokens_reasoning": REASONING_TOKENS,
}
"""Protocol key -> the attributes that carry it, newest name first."""

COST: Final = (
    "gen_ai.usage.cost",  # OpenLIT
    "operation.cost",  # PydanticAI (priced with genai-prices, like the pipeline)
)
MODEL: Final = (
    "gen_ai.response.model",  # what answered: the most exact name to price
    "gen_ai.request.model",
    "llm.model_name",  # OpenInference
)
PROVIDER: Final = (
    "gen_ai.provider.name",  # semconv >= 1.37
    "gen_ai.system",  # before
    "llm.provider",  # OpenInference
    "llm.system",
)

# -- tool calls (the work-item fingerprint) -----------------------------------------------------
TOOL_NAME: Final = ("gen_ai.tool.name", "tool.name")
TOOL_ARGUMENTS: Final = (
    "gen_ai.tool.call.arguments",  # semconv, PydanticAI >= 1.0
    "tool_arguments",  # PydanticAI before
    "input.value",  # OpenInference TOOL spans
)

USAGE: Final = frozenset(name for names in TOKEN_CLASSES.values() for name in names) | frozenset(TOTAL_TOKENS)
"""Any of these on a span makes it an LLM call (unless it sums a whole agent run)."""
SPAN_KEYS: Final = (
    USAGE
    | frozenset(COST)
    | frozenset(MODEL)
    | frozenset(PROVIDER)
    | frozenset(TOOL_NAME)
    | frozenset(TOOL_ARGUMENTS)
    | {OPERATION, OPENINFERENCE_KIND}
)
"""Every span attribute the receiver reads (besides the configured agent attributes)."""
SPAN_MARKERS: Final = ("gen_ai.", "openinference.", "llm.token_count.", "llm.usage.")
"""A span is an LLM call only with a :data:`USAGE` name and a tool call only with
:data:`OPERATION` or :data:`OPENINFERENCE_KIND`, and each of those starts with one of these: a
span whose encoding holds none of them (nor a configured agent attribute) is none of those, and
is not decoded (wire.py). The other names (model, cost, tool name...) are read only on spans that
are one. Long markers are searched faster (the search skips by the marker's length)."""

# -- metrics -----------------------------------------------------------------------------------
TOKEN_USAGE_HISTOGRAM: Final = "gen_ai.client.token.usage"
"""semconv <= 1.40: one histogram, ``gen_ai.token.type`` = ``input`` | ``output`` (the sum is
the tokens; cumulative by default)."""
TOKEN_TYPE: Final = "gen_ai.token.type"
TOKEN_TYPES: Final = {"input": "tokens_in", "output": "tokens_out"}
USAGE_COUNTERS: Final = {
    "gen_ai.client.inference.usage.input_tokens": "tokens_in",
    "gen_ai.client.inference.usage.output_tokens": "tokens_out",
    "gen_ai.client.inference.usage.cache_read.input_tokens": "tokens_cache_read",
    "gen_ai.client.inference.usage.cache_write.input_tokens": "tokens_cache_write",
    "gen_ai.client.inference.usage.reasoning.output_tokens": "tokens_reasoning",
}
"""The newer GenAI conventions: one monotonic counter per token class (per modality)."""
METRIC_COST: Final = ("gen_ai.usage.cost", "operation.cost")
"""Cost histograms (OpenLIT, PydanticAI), in USD."""

# -- who sent it -------------------------------------------------------------------------------
SERVICE_NAME: Final = "service.name"
UNKNOWN_SERVICE: Final = "unknown_service"
"""The SDKs' default ``service.name`` (``unknown_service:python``...): no name at all, in effect."""
HOST_NAME: Final = "host.name"
SERVICE_VERSION: Final = "service.version"
