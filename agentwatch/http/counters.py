"""This server's own counters (pings by outcome, refused logins, Redis errors), in the
Prometheus registry that ``/metrics`` serves beside the fleet's numbers.

Per process, as Prometheus expects: several servers behind a load balancer are several scrape
targets, and ``sum(rate(agentwatch_http_pings_total[5m]))`` adds them up.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics

PING_OUTCOMES: Final = ("ok", "bad_key", "bad_request", "too_large", "flooded", "unavailable")


class Counters:
    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # ``*_created`` doubles every series
        self.registry = CollectorRegistry(auto_describe=True)
        self._pings = Counter(
            "agentwatch_http_pings",
            "Ping API calls answered by this server, by outcome (bad_key: 404 for a wrong key).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in PING_OUTCOMES:  # every series exists from the start: rate() needs a zero
            self._pings.labels(outcome)
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

    def ping(self, outcome: str) -> None:
        self._pings.labels(outcome).inc()

    def denied(self) -> None:
        self._denied.inc()

    def redis_error(self) -> None:
        self._redis_errors.inc()
