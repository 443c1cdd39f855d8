"""``GET /metrics``: the fleet and the pipeline in Prometheus' text format.

Read at scrape time from what ``agentwatch status`` reads (:func:`agentwatch.fleet.fleet_status`,
cached for a second) and the notifiers' counters, so every server behind a load balancer
answers the same, and an agent the detectors forgot (``[detectors.silence] forget``) disappears
from the next scrape: series per agent are bounded by the fleet itself.

Per agent (label ``agent``):
  agentwatch_agent_state{state}             1 for the agent's state, 0 for the others (a state set)
  agentwatch_agent_last_beat_age_seconds    since its last beat
  agentwatch_agent_beats_total, agentwatch_agent_tokens_total, agentwatch_agent_cost_usd_total
  agentwatch_agent_open_incidents, agentwatch_agent_in_maintenance (1 while a window covers it)
Fleet and pipeline:
  agentwatch_open_incidents{detector}, agentwatch_agents{state}
  agentwatch_pipeline_lag_events, agentwatch_pipeline_pending_events,
  agentwatch_pipeline_oldest_pending_seconds, agentwatch_pipeline_detecting,
  agentwatch_deadletter_entries, agentwatch_failed_deliveries_entries,
  agentwatch_deliveries_total{notifier, outcome}, agentwatch_deliveries_retrying{notifier},
  agentwatch_workers{kind}, agentwatch_maintenance_windows (windows in force)
This server: agentwatch_http_pings_total{outcome}, agentwatch_http_denied_total,
  agentwatch_http_redis_errors_total; and agentwatch_redis_up (0 while Redis is away: the other
  series are then left out rather than reported as zeros).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, StateSetMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agentwatch.fleet import STATES
from agentwatch.http.server import Server
from agentwatch.redisconn import RECOVERABLE


class FleetCollector(Collector):
    """Builds every fleet and pipeline series at scrape time (see the module docstring)."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("agentwatch_redis_up", "1 when this server could read Redis for this scrape.")
        try:
            status = self.server.fleet.get()
            stats = self.server.client.hgetall(self.server.keys.notify_stats)
        except RECOVERABLE:
            self.server.metrics.redis_error()
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _agents(status["agents"])
        yield from _pipeline(status["pipeline"], status["agents"])
        windows = GaugeMetricFamily("agentwatch_maintenance_windows", "Maintenance windows in force.")
        windows.add_metric([], len(status.get("maintenance", [])))
        yield windows
        yield _deliveries(stats)
        yield _retrying(stats, status["pipeline"].get("deliveries", []))


def _agents(agents: list[dict[str, Any]]) -> Iterator[Metric]:
    state = StateSetMetricFamily(
        "agentwatch_agent_state", "The agent's state (as in `agentwatch status`).", labels=["agent"]
    )
    age = GaugeMetricFamily(
        "agentwatch_agent_last_beat_age_seconds", "Seconds since the agent's last beat.", labels=["agent"]
    )
    beats = CounterMetricFamily("agentwatch_agent_beats", "Beats of the agent, all runs.", labels=["agent"])
    tokens = CounterMetricFamily("agentwatch_agent_tokens", "Tokens used, all runs.", labels=["agent"])
    cost = CounterMetricFamily("agentwatch_agent_cost_usd", "Cost in USD, all runs.", labels=["agent"])
    incidents = GaugeMetricFamily(
        "agentwatch_agent_open_incidents", "Incidents open for the agent.", labels=["agent"]
    )
    maintenance = GaugeMetricFamily(
        "agentwatch_agent_in_maintenance", "1 while a maintenance window covers the agent.", labels=["agent"]
    )
    for agent in agents:
        name = [agent["agent"]]
        state.add_metric(name, {s: agent["state"] == s for s in STATES})
        if agent["last_beat_age_s"] is not None:
            age.add_metric(name, agent["last_beat_age_s"])
        beats.add_metric(name, agent["beats_total"])
        tokens.add_metric(name, agent["tokens_total"])
        cost.add_metric(name, agent["cost_total"])
        incidents.add_metric(name, len(agent["incidents"]))
        maintenance.add_metric(name, int(agent.get("maintenance") is not None))
    yield from (state, age, beats, tokens, cost, incidents, maintenance)


def _pipeline(pipeline: dict[str, Any], agents: list[dict[str, Any]]) -> Iterator[Metric]:
    by_state = Tally(agent["state"] for agent in agents)
    counts = GaugeMetricFamily("agentwatch_agents", "Agents by state.", labels=["state"])
    for state in STATES:
        counts.add_metric([state], by_state.get(state, 0))
    yield counts
    open_by = Tally(i["detector"] for agent in agents for i in agent["incidents"])
    open_by.update(i["detector"] for i in pipeline["incidents"])
    open_incidents = GaugeMetricFamily(
        "agentwatch_open_incidents", "Open incidents by detector.", labels=["detector"]
    )
    for detector, count in sorted(open_by.items()):
        open_incidents.add_metric([detector], count)
    yield open_incidents
    for name, text, value in (
        ("agentwatch_pipeline_lag_events", "Events no detector worker has read yet.", pipeline["lag"]),
        ("agentwatch_pipeline_pending_events", "Events read but not yet acknowledged.", pipeline["pending"]),
        (
            "agentwatch_pipeline_oldest_pending_seconds",
            "Age of the oldest unacknowledged event.",
            pipeline["oldest_pending_s"],
        ),
        ("agentwatch_pipeline_detecting", "1 while a detector worker runs.", int(pipeline["detecting"])),
        ("agentwatch_deadletter_entries", "Entries in the dead-letter stream.", pipeline["deadletter"]),
        (
            "agentwatch_failed_deliveries_entries",
            "Deliveries that failed for good (kept, capped).",
            pipeline["failed_deliveries"],
        ),
    ):
        gauge = GaugeMetricFamily(name, text)
        gauge.add_metric([], value)
        yield gauge
    workers = GaugeMetricFamily("agentwatch_workers", "Live workers by kind.", labels=["kind"])
    for kind in ("detectors", "notifiers"):
        workers.add_metric([kind], pipeline["workers_alive"].get(kind, 0))
    yield workers


def _deliveries(stats: dict[Any, Any]) -> Metric:
    family = CounterMetricFamily(
        "agentwatch_deliveries", "Alert deliveries by notifier and outcome.", labels=["notifier", "outcome"]
    )
    for field, value in sorted(stats.items()):
        text = field.decode(errors="replace") if isinstance(field, bytes) else str(field)
        notifier, _, outcome = text.rpartition(":")
        if notifier:
            family.add_metric([notifier, outcome], int(value))
    return family


def _retrying(stats: dict[Any, Any], troubled: list[dict[str, Any]]) -> Metric:
    """0 for every notifier that ever counted an outcome, so ``> 0`` alerting rules see the
    series before the first failure, not only from it."""
    family = GaugeMetricFamily(
        "agentwatch_deliveries_retrying",
        "Deliveries waiting for another attempt after a failed one.",
        labels=["notifier"],
    )
    counts = {entry["notifier"]: int(entry["retrying"]) for entry in troubled}
    for field in stats:
        text = field.decode(errors="replace") if isinstance(field, bytes) else str(field)
        counts.setdefault(text.rpartition(":")[0], 0)
    for notifier, count in sorted(counts.items()):
        if notifier:
            family.add_metric([notifier], count)
    return family


async def metrics(request: Request) -> Response:
    server: Server = request.app.state.server
    body = await run_in_threadpool(generate_latest, server.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


routes = [Route("/metrics", metrics)]
