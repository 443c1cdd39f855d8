"""The scheduled fleet report: built once per ``[report]`` slot, delivered by opted-in notifiers.

Which notifiers: those with ``reports = true`` (webhook: the report as JSON, or as text with
``format = "slack"``; apprise: text). When: ``[report] every = "24h"`` (slots are multiples of
the period since the epoch) or ``at = "09:00"`` in ``timezone`` (one slot a day).

Exactly one report per slot, however many notifier workers run: the report is queued on each
notifier's own delivery queue (notifiers/queue.py) under an id derived from the slot, and that
queue already refuses an id it has seen. So two workers that both decide to send it queue it
once, and a worker that dies half way leaves the slot unmarked for the next tick to finish.
A deployment's first slot is skipped: a report of the few minutes since start-up helps nobody.
The record of sent slots keeps only the latest few (a slot is only ever checked while due), so
it does not grow by one field per report forever.
"""

from __future__ import annotations

from typing import Any, Final

from agentwatch.alerts import PIPELINE_AGENT, Alert, iso_ms
from agentwatch.config import Pipeline, format_duration
from agentwatch.report import build_report, due_slot, fleet_summary
from agentwatch.worker import Handler
from notifiers.base import Notifier

# KEYS[1] = the sent slots; ARGV = slot, now (ms). 1: send this slot's report. Atomic, so of
# several workers ticking at once only one can find the record empty and skip the first slot
# (checked and marked separately, a second worker could read "not sent" before the mark and
# "not empty" after it, and send the start-up report).
_DECIDE: Final = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], ARGV[1], 'skipped:' .. ARGV[2])
  return 0
end
return 1
"""
KEEP_SLOTS: Final = 8
"""Sent slots remembered: the current one is what matters; a few more help whoever looks."""


class ReportScheduler(Handler[Alert]):
    """Notifier-worker handler: on each tick, send the due slot's report if nobody has yet."""

    name = "reports"

    def __init__(self, pipeline: Pipeline, client: Any, notifiers: list[Notifier[Any]]) -> None:
        self.pipeline = pipeline
        self.client: Any = client
        self.notifiers = [n for n in notifiers if n.config.reports]
        self._sent: str | None = None
        self._decide = self.client.register_script(_DECIDE)

    def on_tick(self, now_ms: int) -> None:
        cfg = self.pipeline.settings.report
        slot = due_slot(now_ms, cfg)
        if slot is None or not self.notifiers or slot == self._sent:
            return
        key = self.pipeline.keys.reports_sent
        if not self._decide(keys=[key], args=[slot, now_ms]):
            self._sent = slot  # handled already, or the deployment's first slot (now skipped)
            return
        report = build_report(self.client, self.pipeline, since_s=cfg.period_s, now_ms=now_ms)
        alert = Alert(
            id=f"report-{slot}",
            agent=PIPELINE_AGENT,
            detector="report",
            status="firing",
            severity="info",
            summary=f"agentwatch report, last {format_duration(cfg.period_s)}: {fleet_summary(report)}",
            dedup_key=f"{PIPELINE_AGENT}/report:{slot}",
            at=iso_ms(now_ms),
        )
        for notifier in self.notifiers:
            notifier.enqueue(alert, extra={"report": report})
            if notifier.deliverer is not None:
                notifier.deliverer.wake()
        self.client.hset(key, slot, now_ms)
        self._sent = slot
        self._trim(key)

    def _trim(self, key: str) -> None:
        """Forget all but the latest :data:`KEEP_SLOTS` slots (by when each was recorded)."""
        sent = self.client.hgetall(key)
        if len(sent) <= KEEP_SLOTS:
            return

        def recorded(value: bytes) -> int:
            text = value.decode(errors="replace").rpartition(":")[2]  # "skipped:<ms>" or "<ms>"
            return int(text) if text.isdigit() else 0

        by_age = sorted(sent, key=lambda field: recorded(sent[field]))
        self.client.hdel(key, *by_age[: len(by_age) - KEEP_SLOTS])
