"""This server's own counters (pings by outcome, refused logins, Redis errors), in the
Prometheus registry that ``/metrics`` serves beside the fleet's numbers.

Per process, as Prometheus expects: several servers behind a load balancer are several scrape
targets, and ``sum(rate(agentwatch_http_pings_total[5m]))`` adds them up.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, Metric

PING_OUTCOMES: Final = ("ok", "bad_key", "not_accepted", "bad_request", "too_large", "flooded", "unavailable")
OTLP_OUTCOMES: Final = ("ok", "partial", "off", "unauthorized", "bad_request", "too_large", "unsupported",
                        "unavailable")  # fmt: skip
OTLP_ITEMS: Final = (
    "spans", "calls", "tool_calls", "calls_nested", "metrics", "usage_points", "events",
    "counts_dropped", "spans_without_agent", "points_without_agent", "usage_unattributed",
    "agents_not_accepted", "agents_over_export_cap", "agents_refused", "agents_flooded", "agents_invalid",
)  # fmt: skip
"""What OTLP exports held and what was dropped (agentwatch/otlp/receiver.py names each)."""


class Counters:
    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # ``*_created`` doubles every series
        self.registry = CollectorRegistry(auto_describe=True)
        # a plain int per outcome, summed at scrape time: prometheus-client's Counter.inc takes a
        # lock on every ping (the route called most; the event loop is its only writer). Every
        # series exists from the start (rate() needs a zero).
        self.pings: dict[str, int] = dict.fromkeys(PING_OUTCOMES, 0)
        self.registry.register(_PingCollector(self.pings))
        self._denied = Counter(
            "agentwatch_http_denied",
            "Requests refused for a missing or wrong [http] token (401), and failed logins.",
            registry=self.registry,
        )
        self._redis_errors = Counter(
            "agentwatch_http_redis_errors",
            "Requests answered 503 because Redis was unavailable.",
            registry=self.registry,
        )

        self._otlp = Counter(
            "agentwatch_otlp_requests",
            "OTLP exports answered by this server, by signal and outcome (partial: some parts refused).",
            ["signal", "outcome"],
            registry=self.registry,
        )
        self._otlp_items = Counter(
            "agentwatch_otlp_items",
            "What OTLP exports held (spans, LLM and tool calls, events written) and what was dropped, "
            "by signal and item (counts_dropped, spans_without_agent, agents_refused...).",
            ["signal", "item"],
            registry=self.registry,
        )
        for signal in ("traces", "metrics"):
            for outcome in OTLP_OUTCOMES:
                self._otlp.labels(signal, outcome)

    def otlp(self, signal: str, outcome: str, items: Mapping[str, int] | None = None) -> None:
        self._otlp.labels(signal, outcome).inc()
        for item, count in (items or {}).items():
            if item in OTLP_ITEMS and count:
                self._otlp_items.labels(signal, item).inc(count)

    def ping(self, outcome: str) -> None:
        self.pings[outcome] += 1

    def denied(self) -> None:
        self._denied.inc()

    def redis_error(self) -> None:
        self._redis_errors.inc()


class _PingCollector:
    """``agentwatch_http_pings_total{outcome}`` from :attr:`Counters.pings`. The ints are only
    changed on the event loop; a scrape (a worker thread) reads each one atomically, and a
    counter read a moment early is still a counter."""

    def __init__(self, pings: dict[str, int]) -> None:
        self.pings = pings

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily("agentwatch_http_pings", _PINGS_HELP, labels=["outcome"])]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("agentwatch_http_pings", _PINGS_HELP, labels=["outcome"])
        for outcome, count in list(self.pings.items()):
            family.add_metric([outcome], count)
        yield family


_PINGS_HELP: Final = "Ping API calls answered by this server, by outcome (bad_key: 404 for a wrong key)."
