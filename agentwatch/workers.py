"""Assembling workers from a validated pipeline: which streams, which group, which handlers.

Both kinds run on the one runtime in worker.py; only what they read and whom they feed differs.
"""

from __future__ import annotations

from typing import Any

from agentwatch import codec
from agentwatch.alerts import Alert, Incidents, decode_alert
from agentwatch.codec import Event
from agentwatch.config import Pipeline
from agentwatch.facts import FactsRecorder
from agentwatch.halts import HaltExpiry, Halts
from agentwatch.keys import DETECTORS_GROUP, NOTIFIERS_GROUP, Keys, shard_of
from agentwatch.redisconn import Client
from agentwatch.rollups import Snapshotter
from agentwatch.security import AlertVerifier, EventVerifier, PipelineSecret
from agentwatch.series import SeriesRecorder
from agentwatch.worker import Handler, Message, Worker


class OutboxSweeper(Handler[Any]):
    """Publishes alerts that a worker decided but died before publishing (see alerts.py)."""

    name = "outbox"

    def __init__(self, incidents: Incidents) -> None:
        self.incidents = incidents

    def on_tick(self, now_ms: int) -> None:
        self.incidents.sweep(now_ms)


class RepeatScreen:
    """Drops copies of an event within a batch (codec.drop_repeats) before any detector, the
    spend ledger or a plugin sees them, and counts them where the detectors count the copies
    of later batches (``duplicates`` in the agent's shard clock hash: ``status`` shows the sum)."""

    def __init__(self, client: Client, keys: Keys) -> None:
        self.client, self.keys = client, keys

    def __call__(self, messages: list[Message[Event]]) -> list[Message[Event]]:
        kept, dropped = codec.drop_repeats(messages)
        if dropped:
            by_shard: dict[int, int] = {}
            for agent, count in dropped.items():
                shard = shard_of(agent, self.keys.shards)
                by_shard[shard] = by_shard.get(shard, 0) + count
            pipe = self.client.pipeline(transaction=False)
            for shard, count in by_shard.items():
                pipe.hincrby(self.keys.clock(shard), "duplicates", count)
            pipe.execute()
        return kept


def detector_worker(pipeline: Pipeline, client: Client, *, consumer: str | None = None) -> Worker[Event]:
    """A worker on every event stream, feeding every enabled detector."""
    from detectors.base import DetectorContext  # noqa: PLC0415 - detectors import the spine
    from detectors.budgets import BudgetKeeper  # noqa: PLC0415
    from detectors.engine import Engine, is_stateful  # noqa: PLC0415

    settings = pipeline.settings
    keys = pipeline.keys
    worker: Worker[Event] = Worker(
        client,
        settings,
        kind="detectors",
        streams=keys.event_streams(),
        group=DETECTORS_GROUP,
        decode=codec.decode,
        handlers=[],
        retention_s=settings.streams.events_retention_s,
        consumer=consumer,
        verify=EventVerifier(settings.security) if settings.security.agent_keys else None,
        screen=RepeatScreen(client, keys),
    )
    incidents = Incidents(
        client, keys, alerts_max_len=settings.streams.alerts_max_len, secret=settings.security.secret
    )
    ctx = DetectorContext(
        client=client, keys=keys, incidents=incidents, settings=settings, stats=worker.stats
    )
    report = settings.report
    halts = Halts(client, keys, incidents)
    detectors = [plugin.cls(plugin.name, plugin.config, ctx) for plugin in pipeline.detectors]
    budgets = BudgetKeeper(client, keys, settings, incidents, halts)
    worker.handlers += [
        # first: it prices the beats (fills in their cost) that every other handler reads
        budgets,
        OutboxSweeper(incidents),
        FactsRecorder(client, keys),
        HaltExpiry(halts),
        Snapshotter(
            client,
            keys,
            bucket_s=report.bucket_s,
            retention_s=report.retention_s,
            owner=worker.consumer,
            timezone=report.timezone,
        ),
        SeriesRecorder(
            client,
            keys,
            bucket_s=settings.http.series_bucket_s,
            span_s=settings.http.series_span_s,
            owner=worker.consumer,
        ),
    ]
    # the engine after the start facts: the restart notifier reads an exit alert's host there
    # (it adds each beat it applies to the spend and hands the batch's totals to the budgets)
    worker.handlers.append(Engine(worker, ctx, [d for d in detectors if is_stateful(d)], budgets))
    worker.handlers += [d for d in detectors if not is_stateful(d)]
    return worker


def notifier_worker(pipeline: Pipeline, client: Client, *, consumer: str | None = None) -> Worker[Alert]:
    """A worker on the alerts stream, feeding every configured notifier.

    Each notifier's handler only routes and queues alerts (fast, idempotent); its own delivery
    threads, started in ``on_start``, deliver them with retries, so one slow receiver never
    holds up the stream or another notifier (notifiers/queue.py, notifiers/delivery.py). Ahead
    of them, one handler queues each batch for every notifier in one round trip
    (notifiers/fanout.py); the notifiers' own ``on_batch`` handle what it leaves to them.
    """
    from notifiers import holds  # noqa: PLC0415 - notifiers import the spine
    from notifiers.base import NotifierContext  # noqa: PLC0415
    from notifiers.fanout import QueueFanout  # noqa: PLC0415
    from notifiers.reports import ReportScheduler  # noqa: PLC0415

    settings = pipeline.settings
    keys = pipeline.keys
    worker: Worker[Alert] = Worker(
        client,
        settings,
        kind="notifiers",
        streams=[keys.alerts],
        group=NOTIFIERS_GROUP,
        decode=decode_alert,
        handlers=[],
        retention_s=settings.streams.alerts_retention_s,
        consumer=consumer,
        verify=AlertVerifier(
            PipelineSecret(client, keys, settings.security.secret), settings.security.max_skew_s
        ),
    )
    incidents = Incidents(
        client, keys, alerts_max_len=settings.streams.alerts_max_len, secret=settings.security.secret
    )
    ctx = NotifierContext(
        client=client,
        keys=keys,
        settings=settings,
        stats=worker.stats,
        incidents=incidents,
        poll_s=settings.worker.block_s,
        holds=holds.for_pipeline(client, keys, settings, pipeline.detectors),
    )
    notifiers = [plugin.cls(plugin.name, plugin.config, ctx) for plugin in pipeline.notifiers]
    worker.handlers += [
        QueueFanout(client, notifiers),
        *notifiers,
        ReportScheduler(pipeline, client, notifiers),
    ]
    return worker
