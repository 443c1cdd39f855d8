"""What a notifier is: a worker handler fed with alerts, with a config model and a context.

Subclass :class:`Notifier`, declare a ``Config`` (a subclass of :class:`NotifierConfig`), and
override the hooks you need; each is a no-op here:

* :meth:`Notifier.deliver` - send one alert; return :class:`Delivered`, :class:`Retry` or
  :class:`Failed`. Runs on the notifier's own delivery threads, never on the worker loop.
* :meth:`Notifier.wants` - routing beyond ``match`` (the restart notifier's ``on``).
* :meth:`Notifier.open` / :meth:`Notifier.close` - resources such as an HTTP client.

The base class does the rest: routing (``match``, ``send_resolved``, mutes and what happens when
they end, ``max_age``),
queueing per notifier in Redis (notifiers/queue.py), at-least-once delivery with backoff, rate
limits and dead letters (notifiers/delivery.py), and ``repeat`` reminders. A notifier that
overrides ``on_batch`` instead of ``deliver`` runs synchronously on the worker loop, like any
worker handler (no queue, no retries beyond the runtime's own).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, Generic, Literal, TypeVar

from pydantic import Field, model_validator

from agentwatch import plugins
from agentwatch.alerts import Alert, Incidents
from agentwatch.config import PerSecond, PipelineSettings, Seconds
from agentwatch.keys import Keys
from agentwatch.redisconn import Client, server_time_ms
from agentwatch.worker import Handler, Message, Stats
from notifiers.delivery import Delivered, Deliverer, Delivery, Failed, Outcome, Retry
from notifiers.grouping import Grouper
from notifiers.holds import Hold, Holds, HoldView
from notifiers.journal import Journal
from notifiers.queue import DeliveryQueue, Job
from notifiers.reminders import Reminders, reminder_of
from notifiers.routing import Match, Mute, Mutes, muted_by

__all__ = [
    "Alert", "Delivered", "Delivery", "Failed", "Message", "Notifier", "NotifierConfig",
    "NotifierContext", "Outcome", "Retry",
]  # fmt: skip

C = TypeVar("C", bound="NotifierConfig")

_TRIM_SEEN_EVERY_S = 60.0
_HELD_EVERY_S = 1.0
"""How often a worker looks for held alerts whose mute ended (one HGETALL when none is held)."""
_STOP_WAIT_S = 1.5
"""How long a stopping worker waits for deliveries in flight (the runtime exits within ~2 s)."""


class NotifierConfig(plugins.NotifierConfig):
    """Keys every ``[[notifiers]]`` entry has: routing and delivery policy. Defaults suit paging."""

    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]{1,64}$", description="label in logs, keys and CLI; default: the type"
    )
    match: Match = Field(default_factory=Match)
    send_resolved: bool = True
    repeat_s: Seconds | None = Field(None, alias="repeat", gt=0, description="remind while still firing")
    max_age_s: Seconds = Field(86400.0, alias="max_age", gt=0, description="older alerts are not sent")
    concurrency: int = Field(2, ge=1, le=32, description="delivery threads per worker")
    retry_for_s: Seconds = Field(
        86400.0, alias="retry_for", gt=0, description="keep retrying this long after it was queued"
    )
    max_attempts: int | None = Field(
        None, ge=1, le=100_000, description="also give up after this many attempts; default: no cap"
    )
    backoff_s: Seconds = Field(1.0, alias="backoff", gt=0)
    backoff_max_s: Seconds = Field(300.0, alias="backoff_max", gt=0)
    retry_after_max_s: Seconds = Field(
        3600.0, alias="retry_after_max", gt=0, description="cap on Retry-After"
    )
    rate_limit: PerSecond | None = Field(None, description='e.g. "120/min"; none: unlimited')
    burst: int = Field(10, ge=1, le=100_000, description="requests allowed at once under rate_limit")
    reports: bool = Field(False, description="also deliver the scheduled fleet report ([report])")
    group: bool = Field(True, description="with [grouping] enabled: group this notifier's alerts")

    reports_supported: ClassVar[bool] = False
    """Set by notifier types that can carry a report (webhook JSON or text, apprise text)."""
    grouping_supported: ClassVar[bool] = True
    """False for notifier types that act on one agent per alert (restart): they never group."""

    def referenced_detectors(self) -> set[str]:
        """The detector names this entry filters on (``match.detectors``; the restart notifier
        adds ``on``): the pipeline checks each against the detectors it has, so a misspelt name
        fails at start-up instead of silently matching nothing (notifiers/routing.py,
        ``known_detectors`` and ``unknown_detectors``)."""
        return set(self.match.detectors)

    @model_validator(mode="after")
    def _reports(self) -> NotifierConfig:
        if self.reports and not self.reports_supported:
            raise ValueError(
                f"reports: a {self.type} notifier cannot deliver reports (webhook and apprise can)"
            )
        return self


@dataclass(frozen=True)
class NotifierContext:
    """What the worker gives every notifier: Redis, the key schema, settings and live counters,
    plus incidents (reminders check an incident is still open; restart raises "restart loop")."""

    client: Client
    keys: Keys
    settings: PipelineSettings
    stats: Stats
    incidents: Incidents | None = None
    poll_s: float = 1.0
    stop_by: list[float] = field(default_factory=list)
    holds: Holds | None = None
    """Maintenance windows and dependencies (notifiers/holds.py): alerts that wait for a fresh
    allowance instead of paging. None: nothing is held but by mutes."""
    """Set by the first notifier to stop: one deadline for all, so a worker with several hung
    notifiers still exits within the runtime's ~2 s, not 1.5 s per notifier."""


Verdict = Literal["send", "muted", "stale", "maintenance", "dependency"]
HELD_VERDICTS: tuple[Verdict, ...] = ("muted", "maintenance", "dependency")
"""Verdicts that hold an alert back for later rather than drop it (see ``_release_held``)."""
Step = tuple[Literal["send", "drop", "group"], Alert]
"""One step of a batch queued by notifiers/fanout.py (see :meth:`Notifier.plan`)."""


class Notifier(Handler[Alert], Generic[C]):
    """Base class of every notifier: ``on_batch`` receives ``(entry id, Alert)`` pairs."""

    Config: ClassVar[type[NotifierConfig]] = NotifierConfig

    def __init__(self, name: str, config: C, ctx: NotifierContext) -> None:
        self.name = name
        self.config = config
        self.ctx = ctx
        self.log = logging.getLogger(f"agentwatch.notifiers.{name}")
        streams = ctx.settings.streams
        self.queue = DeliveryQueue(ctx.client, ctx.keys, name)
        self.journal = Journal(ctx.client, ctx.keys, max_len=streams.alerts_max_len,
                               failed_max_len=streams.deadletter_max_len)  # fmt: skip
        self.mutes = Mutes(ctx.client, ctx.keys)
        self.reminders = Reminders(ctx.client, ctx.keys, name, config.repeat_s) if config.repeat_s else None
        self.deliverer: Deliverer | None = None
        self._next_trim = 0.0
        self._next_held = 0.0
        self.prequeued: Sequence[Message[Alert]] | None = None
        """The batch notifiers/fanout.py already queued for this notifier (on_batch skips it)."""
        grouping = ctx.settings.grouping
        self.grouper = (
            Grouper(ctx.client, ctx.keys, name, grouping)
            if grouping.enabled and config.group and config.grouping_supported
            else None
        )

    # -- hooks for subclasses ----------------------------------------------------------------------
    def open(self) -> None:
        """Once, before the delivery threads start: open clients, check binaries."""

    def close(self) -> None:
        """Once, after the delivery threads stopped (also after a failed start)."""

    def wants(self, alert: Alert) -> bool:
        """Routing beyond ``match`` and ``send_resolved``; every alert by default."""
        return True

    def deliver(self, delivery: Delivery) -> Outcome:
        """Send one alert (on a delivery thread). May be called again for the same alert after a
        crash: receivers de-duplicate on ``delivery.id``. Raising counts as a retryable failure."""
        return Delivered()

    @property
    def attempt_budget_s(self) -> float:
        """Longest one :meth:`deliver` call may take (its timeouts); sizes the lease."""
        return 30.0

    # -- derived ------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.config.type

    @property
    def lease_ms(self) -> int:
        """How long a claimed delivery stays ours: past it, another worker may take it over."""
        budget = self.attempt_budget_s
        return int((budget + max(1.0, budget / 4)) * 1000)

    def _queues(self) -> bool:
        return type(self).deliver is not Notifier.deliver

    @property
    def queues(self) -> bool:
        """Delivers from its queue (overrides ``deliver``), rather than in ``on_batch``."""
        return self._queues()

    # -- worker hooks -------------------------------------------------------------------------------
    def on_start(self) -> None:
        if not self._queues():
            return
        self.open()
        self.deliverer = Deliverer(self, self.queue)
        self.deliverer.start()

    def on_stop(self) -> None:
        if not self.ctx.stop_by:
            self.ctx.stop_by.append(time.monotonic() + _STOP_WAIT_S)
        try:
            if self.deliverer is not None:
                self.deliverer.stop(max(0.0, self.ctx.stop_by[0] - time.monotonic()))
        finally:
            self.close()

    def on_batch(self, messages: Sequence[Message[Alert]]) -> None:
        """Route each alert and queue it for delivery; the delivery threads take it from there.
        Idempotent: an alert the stream delivers twice is queued once."""
        if not self._queues():
            return
        if self.prequeued is messages:  # queued with every notifier's in one round trip
            self.prequeued = None
            return
        now_ms = server_time_ms(self.ctx.client)
        mutes = self.mutes.active(now_ms)
        holds = self.ctx.holds.view(now_ms) if self.ctx.holds is not None else None
        queued = False
        # Every alert is routed before any is queued: a parent's alert then lists the dependents
        # held for it in the same batch (the host that took both).
        routed = [(alert, self.route(alert, now_ms, mutes, holds)) for _, alert in messages]
        for alert, verdict in routed:
            if self.reminders is not None and alert.status == "resolved":
                self.reminders.cancel(alert.dedup_key)
            if verdict == "send":
                queued = self._send(alert, now_ms) or queued
            elif verdict in HELD_VERDICTS:
                hold = holds.why(alert) if holds is not None and verdict != "muted" else None
                self._mute(alert, now_ms, mutes, hold)
            else:
                if verdict is not None:
                    self._skip(alert, verdict, now_ms, mutes)
                if alert.status == "resolved":  # the incident is over: nothing held may go out
                    self.queue.drop_held(alert.dedup_key)
        if queued and self.deliverer is not None:
            self.deliverer.wake()

    def on_tick(self, now_ms: int) -> None:
        if not self._queues():
            return
        if self.reminders is not None:
            self._remind()
        if self.grouper is not None:
            self._flush_groups(now_ms)
        now = time.monotonic()
        if now >= self._next_held:
            self._next_held = now + _HELD_EVERY_S
            self._release_held(now_ms)
        if now >= self._next_trim:
            self._next_trim = now + _TRIM_SEEN_EVERY_S
            # Redeliveries come within minutes; anything older than max_age is stale anyway.
            keep_ms = int((self.config.max_age_s + 3600) * 1000)
            self.queue.trim_seen(now_ms - keep_ms)

    # -- routing and queueing -----------------------------------------------------------------------
    def plan(
        self, messages: Sequence[Message[Alert]], now_ms: int, mutes: list[Mute], holds: HoldView | None
    ) -> list[Step] | None:
        """What :meth:`on_batch` would do with ``messages``, as steps for notifiers/fanout.py to
        run in one pipeline with every other notifier's, when the batch needs nothing but
        queueing: ``("send", alert)`` queues it (see :meth:`queued`), ``("drop", alert)`` forgets
        what a mute held for an incident that ended, ``("group", alert)`` runs its group's script
        (with ``[grouping]``: a firing alert that groups, or any resolve) and then does what
        :meth:`grouped` makes of the reply. None: the batch takes :meth:`on_batch`'s own path
        (an alert to hold, an alert recorded as stale, reminders). ``holds``:
        the maintenance windows and dependencies as of ``now_ms`` (one view for every notifier)."""
        if self.reminders is not None:
            return None
        steps: list[Step] = []
        grouper = self.grouper
        for _, alert in messages:
            verdict = self.route(alert, now_ms, mutes, holds)
            if verdict == "send":
                grouping = grouper is not None and (alert.status == "resolved" or grouper.group_of(alert))
                steps.append(("group" if grouping else "send", alert))
            elif verdict is not None:
                return None
            elif alert.status == "resolved":  # the incident is over: nothing held may go out
                steps.append(("drop", alert))
        return steps

    def queued(self, alert: Alert, outcome: bool | None) -> bool:
        """Record what queueing a routed ``alert`` did (``outcome``: queue.queued's); True if it
        was queued now."""
        if outcome is None:
            why = (
                "its firing was held (muted, maintenance or a dependency) and never sent"
                if alert.status == "resolved" else
                "its resolve went out before it came (a worker died holding it): it would reopen it"
            )  # fmt: skip
            self.journal.skipped(self.name, "skipped", alert, why)
        elif outcome and alert.status == "firing" and self.reminders is not None:
            self.reminders.schedule(alert)
        return bool(outcome)

    def route(
        self, alert: Alert, now_ms: int, mutes: list[Mute], holds: HoldView | None = None
    ) -> Verdict | None:
        """``"send"``; ``"stale"`` (recorded, not sent); ``"muted"``, ``"maintenance"``,
        ``"dependency"`` (recorded, held for later: notifiers/holds.py); None: not for this notifier."""
        cfg = self.config
        if not cfg.match.matches(alert):
            return None
        if alert.status == "resolved" and not cfg.send_resolved:
            return None
        if not self.wants(alert):
            return None
        if now_ms - alert.at_ms > cfg.max_age_s * 1000:
            return "stale"
        if muted_by(alert, mutes, now_ms) is not None:
            return "muted"
        hold = holds.why(alert) if holds is not None else None
        return hold.kind if hold is not None else "send"

    def enqueue(self, alert: Alert, *, extra: dict[str, object] | None = None) -> bool:
        """Queue ``alert`` for delivery (False: it was queued before, or came after its resolve)."""
        queued = self.queue.enqueue(self.job(alert, extra), alert.dedup_key)
        if queued is None:
            why = "its resolve went out before it came (a worker died holding it): it would reopen it"
            self.journal.skipped(self.name, "skipped", alert, why)
        return bool(queued)

    @property
    def park_ms(self) -> int:
        """How long a resolve waits for its firing when this notifier has not queued that yet: a
        worker that died holding the firing leaves it to the others after ``claim_idle``, and
        they look every quarter of that (queue.PARKED_NOTE)."""
        return int((2 * self.ctx.settings.worker.claim_idle_s + 5) * 1000)

    def job(self, alert: Alert, extra: dict[str, object] | None = None) -> Job:
        """The delivery job of ``alert`` (queued under the alert id). A parent's alert lists the
        dependents held for it (``details.held``: notifiers/holds.py)."""
        held = self.ctx.holds.held_details(alert) if self.ctx.holds is not None else None
        if held:
            alert = replace(alert, details={**alert.details, **held})
        return Job(alert.id, _alert_dict(alert), int(time.time() * 1000), extra=dict(extra or {}))

    def _send(self, alert: Alert, now_ms: int) -> bool:
        """Queue a routed alert; True if it was queued now. With grouping, a firing alert joins
        its group instead (the group sends it, or a grouped alert, once its wait is over)."""
        if self.grouper is not None and self._grouped(alert, now_ms):
            return False
        return self._queue_alert(alert)

    def _grouped(self, alert: Alert, now_ms: int) -> bool:
        """True if ``alert`` was taken by its group (recorded as ``grouped``, not queued here)."""
        assert self.grouper is not None
        op = self.grouper.op(alert)
        if op is None:
            return False
        out = self.grouped(alert, self.grouper.run(self.grouper.call([op], now_ms))[0], now_ms)
        if out is alert:
            return False
        if out is not None:
            sent = self.queue.enqueue_resolve(self.job(out), out.dedup_key)
            if sent and self.deliverer is not None:
                self.deliverer.wake()
        return True

    def grouped(self, alert: Alert, reply: object, now_ms: int, *, pipe: object = None) -> Alert | None:
        """What the group script's ``reply`` for ``alert`` means (:meth:`Grouper.op
        <notifiers.grouping.Grouper.op>`), recorded in the delivery log (in ``pipe`` when
        given): ``alert`` itself to queue it as routed (it does not group, too many groups are
        open, or its resolve is not a group member's), the group's resolve to queue (its last
        open member resolved), or None (its group took it). The one reading of those replies,
        for :meth:`on_batch` and notifiers/fanout.py alike."""
        assert self.grouper is not None
        if alert.status == "firing":
            joined = self.grouper.joined(reply)
            if joined == "full":
                self.journal.count(self.name, "ungrouped", pipe=pipe)
                self.log.warning("%s: %d alert groups are open (max_groups); sent alone",
                                 alert.dedup_key, self.grouper.config.max_groups)  # fmt: skip
                return alert
            if joined != "dup":
                self.journal.skipped(self.name, "grouped", alert, "waiting with its group", pipe=pipe)
            return None
        outcome, group_alert = self.grouper.resolved(reply, now_ms)
        if outcome == "pass":
            return alert
        self.journal.skipped(self.name, "grouped", alert, f"group {outcome}", pipe=pipe)
        return group_alert

    def _flush_groups(self, now_ms: int) -> None:
        """Queue what groups whose wait (or interval) is over have to say."""
        assert self.grouper is not None
        queued = False
        for flushed in self.grouper.due(now_ms):
            queued = (
                self.enqueue(flushed.alert) if flushed.grouped else self._queue_alert(flushed.alert)
            ) or queued
        if queued and self.deliverer is not None:
            self.deliverer.wake()

    def _queue_alert(self, alert: Alert) -> bool:
        if alert.status == "resolved":
            return self.queued(alert, self.queue.enqueue_resolve(self.job(alert), alert.dedup_key,
                                                                 park_ms=self.park_ms))  # fmt: skip
        return self.queued(alert, self.queue.enqueue(self.job(alert), alert.dedup_key))

    def _mute(self, alert: Alert, now_ms: int, mutes: list[Mute], hold: Hold | None = None) -> None:
        """Record a muted alert (or one a maintenance window or a dependency holds: ``hold``) and
        hold it for when that ends (see :meth:`_release_held`). Reminders keep their schedule
        while muted; each is checked against the mutes when due."""
        verdict, detail = (hold.kind, hold.detail) if hold is not None else ("muted", None)
        if not self._skip(alert, verdict, now_ms, mutes, detail):
            return  # a redelivered entry: held (and perhaps released) the first time
        self.queue.hold(alert.to_json(), alert.dedup_key, alert.status)
        if alert.status == "firing" and self.reminders is not None:
            self.reminders.schedule(alert)

    def _skip(
        self, alert: Alert, verdict: str, now_ms: int, mutes: list[Mute], detail: str | None = None
    ) -> bool:
        """Record an alert that is not sent, once even when the stream redelivers it (False
        then). The marker is not the alert id: a held alert may still be queued under its id."""
        if not self.ctx.client.zadd(self.queue.seen, {f"{alert.id}:{verdict}": now_ms}, nx=True):
            return False
        if detail is None:
            mute = muted_by(alert, mutes, now_ms)
            detail = f"muted by {mute.agent} ({mute.detector or 'all detectors'})" if mute else ""
        if verdict == "stale":
            detail = f"{(now_ms - alert.at_ms) / 1000:.0f}s old (max_age {self.config.max_age_s:.0f}s)"
        self.journal.skipped(self.name, verdict, alert, detail)
        return True

    def _release_held(self, now_ms: int) -> None:
        """Deliver what mutes (and holds: maintenance, dependencies) held back once they end, as
        Alertmanager does when a silence ends: a firing alert whose incident is still open (into
        its group, with ``[grouping]``), or the resolve of an incident the receiver was told
        about. An incident that ended while muted says nothing."""
        held = self.queue.held_alerts()
        if not held:
            return
        mutes = self.mutes.active(now_ms)
        holds = self.ctx.holds.view(now_ms) if self.ctx.holds is not None else None
        incidents = self.ctx.incidents
        queued = False
        for dedup_key, raw in held.items():
            try:
                alert = Alert(**json.loads(raw))
            except (ValueError, TypeError):
                self.queue.drop_held(dedup_key, raw)  # not ours: never block the others on it
                continue
            if muted_by(alert, mutes, now_ms) is not None:
                continue
            if holds is not None and holds.why(alert, releasing=True) is not None:
                continue  # a maintenance window (or its fresh allowance) or a down parent
            if alert.status == "firing" and incidents is not None:
                incident = incidents.open(alert.agent, alert.detector)
                if not incident or incident.get("alert") != alert.id:
                    self.queue.drop_held(dedup_key, raw)  # resolved (or replaced) while muted
                    continue
            if alert.status == "firing" and self.grouper is not None and self.grouper.group_of(alert):
                # Many agents still down at a window's end are one grouped page, not a storm.
                if self.queue.drop_held(dedup_key, raw):
                    if self.reminders is not None:
                        self.reminders.cancel(alert.dedup_key)  # rescheduled if it goes alone
                    queued = self._send(alert, now_ms) or queued
                continue
            if self.queue.release(self.job(alert), dedup_key, raw):
                self.log.info("%s %s: no longer muted or held; delivering it", alert.dedup_key, alert.status)
                queued = True
        if queued and self.deliverer is not None:
            self.deliverer.wake()

    def _remind(self) -> None:
        assert self.reminders is not None
        now_ms, due = self.reminders.pop_due()
        if not due:
            return
        # A mute that just ended: its held firing goes first, so no reminder overtakes it.
        self._release_held(now_ms)
        mutes = self.mutes.active(now_ms)
        holds = self.ctx.holds.view(now_ms) if self.ctx.holds is not None else None
        queued = False
        for alert, n in due:
            incident = self.ctx.incidents.open(alert.agent, alert.detector) if self.ctx.incidents else None
            if not incident or incident.get("alert") != alert.id:
                self.reminders.cancel(alert.dedup_key)  # resolved (or a newer incident took over)
                continue
            reminder = reminder_of(alert, n, now_ms)
            if muted_by(reminder, mutes, now_ms) is not None:
                self._skip(reminder, "muted", now_ms, mutes)
                continue
            hold = holds.why(reminder) if holds is not None else None
            if hold is not None:  # a maintenance window pages nobody, reminders included
                self._skip(reminder, hold.kind, now_ms, mutes, hold.detail)
                continue
            queued = self.enqueue(reminder, extra={"reminder": n}) or queued
        if queued and self.deliverer is not None:
            self.deliverer.wake()


def _alert_dict(alert: Alert) -> dict[str, object]:
    return {name: getattr(alert, name) for name in Alert.__dataclass_fields__}
