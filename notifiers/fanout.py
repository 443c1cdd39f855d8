"""Queueing a batch of alerts for every notifier in one round trip.

Why: a notifier worker's main thread used to spend 83-89 % of its wall time waiting on one
EVALSHA per alert per notifier (benchmarks/NOTES.md, ``## notifiers_latency``). Redis answers
each in ~40 us; the rest was waiting for the reply and then for the GIL, which the notifiers'
delivery threads hold while they build requests and parse answers. With four notifiers at 200
alerts/s the main thread fell behind and alerts waited seconds in the stream before they were
even queued. Round trips on a thread that shares its GIL are what costs, so the main thread
makes as few as possible: per XREADGROUP batch, one pipeline reads the clock, the mutes and
whether ad-hoc maintenance windows exist, and one pipeline carries every notifier's enqueue
scripts.

How: the worker runs :class:`QueueFanout` just before the notifiers. It routes every alert of
the batch for every notifier in memory (:meth:`Notifier.plan <notifiers.base.Notifier.plan>`),
stages each notifier's steps in stream order, runs them in one pipeline, and marks the batch as
done for each notifier whose steps all went through (:attr:`~notifiers.base.Notifier.prequeued`),
so the notifier's own ``on_batch`` skips it. With ``[grouping]``, the batch's alerts that group
(and its resolves) first go through one group script call per notifier, all in one pipeline
(notifiers/grouping.py), and :meth:`Notifier.grouped <notifiers.base.Notifier.grouped>` turns
each reply into what to queue: the grouped path costs two round trips per batch, not one or
more per alert. A notifier whose batch needs more than queueing (an alert to hold for a mute,
an alert recorded as stale, reminders), that overrides ``on_batch``, or whose planning or
scripts failed, is left to its own ``on_batch``: the same effects per alert, with the runtime's
isolation (entry-by-entry retries, dead letters). The fast path only ever takes a notifier's
whole batch, so per notifier the order of effects is the stream's either way, and everything
is idempotent, so running a step twice is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import redis

from agentwatch.alerts import Alert
from agentwatch.handler import Handler, Message
from agentwatch.redisconn import RECOVERABLE, Client
from notifiers.grouping import GroupCall, Grouper
from notifiers.queue import EnqueueCall, queued
from notifiers.routing import Mutes

if TYPE_CHECKING:
    from notifiers.base import Notifier, Step

log = logging.getLogger("agentwatch.notifiers")


class QueueFanout(Handler[Alert]):
    """Queues each batch for every queueing notifier in one pipeline (module docstring)."""

    name = "notifier-queue"

    def __init__(self, client: Client, notifiers: Sequence[Notifier[Any]]) -> None:
        from notifiers.base import Notifier  # noqa: PLC0415 - base imports this module's users

        self.client: Any = client
        # Only notifiers that queue and route with the base class's on_batch: any other keeps
        # its own path.
        self.notifiers = [n for n in notifiers if n.queues and type(n).on_batch is Notifier.on_batch]
        self.mutes = Mutes(client, notifiers[0].ctx.keys) if notifiers else None

    def on_start(self) -> None:
        if self.notifiers:
            self.notifiers[0].queue.load_scripts()  # one script for all notifiers
        for notifier in self.notifiers:
            if notifier.grouper is not None:
                notifier.grouper.load_scripts()

    def on_batch(self, messages: Sequence[Message[Alert]]) -> None:
        """Never raises but for Redis being away: a fault here must not dead-letter alerts that
        the notifiers' own ``on_batch`` can still queue (they do, as nothing is marked done)."""
        try:
            self._fan_out(messages)
        except RECOVERABLE:
            raise
        except Exception:
            log.exception("queueing a batch for every notifier failed; each notifier queues it itself")

    def _fan_out(self, messages: Sequence[Message[Alert]]) -> None:
        if not self.notifiers or self.mutes is None:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        pipe.hvals(self.mutes.keys.mutes)
        pipe.exists(self.mutes.keys.maintenance)  # ad-hoc windows (notifiers/holds.py)
        (seconds, micros), raw_mutes, adhoc = pipe.execute()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        mutes = self.mutes.active_from(raw_mutes, now_ms)
        holds = self.notifiers[0].ctx.holds
        view = holds.view(now_ms, adhoc=bool(adhoc)) if holds is not None else None  # one for all
        plans: list[tuple[Notifier[Any], list[Step]]] = []
        for notifier in self.notifiers:
            try:
                steps = notifier.plan(messages, now_ms, mutes, view)
                if steps is not None:
                    plans.append((notifier, steps))
            except RECOVERABLE:
                raise
            except Exception:
                # Its own on_batch does the same work and raises again, isolated by the runtime.
                log.exception("notifier %s: planning a batch failed; it queues it itself", notifier.name)
        if not plans:
            return
        replies = self._group(plans, now_ms)
        pipe = self.client.pipeline(transaction=False)
        jobs: dict[str, str] = {}  # alert id -> its job's JSON: the same for every notifier
        staged: list[tuple[Notifier[Any], list[Staged]]] = []
        for notifier, steps in plans:
            try:
                items = self._stage(pipe, notifier, steps, replies, now_ms=now_ms, jobs=jobs)
                staged.append((notifier, items))
            except RECOVERABLE:
                raise
            except Exception:
                log.exception("notifier %s: queueing a batch failed; it queues it itself", notifier.name)
        results = pipe.execute(raise_on_error=False)
        for notifier, items in staged:
            self._settle(notifier, items, results, messages)

    def _group(
        self, plans: list[tuple[Notifier[Any], list[Step]]], now_ms: int
    ) -> dict[tuple[str, int], Any]:
        """Run the ``group`` steps (notifiers/grouping.py) of each grouping notifier as one script
        call, all in one pipeline, ahead of the queueing: (notifier, step index) -> its reply.
        Groups and queues are separate keys, so running a batch's group steps first changes
        nothing a queue sees."""
        calls: list[tuple[str, list[int], Grouper, GroupCall]] = []
        pipe = self.client.pipeline(transaction=False)
        for notifier, steps in plans:
            grouper = notifier.grouper
            if grouper is None:
                continue
            indexes: list[int] = []
            ops: list[list[Any]] = []
            for index, (kind, alert) in enumerate(steps):
                op = grouper.op(alert) if kind == "group" else None
                if op is not None:
                    indexes.append(index)
                    ops.append(op)
            if ops:
                call = grouper.call(ops, now_ms)
                grouper.stage(pipe, call)
                calls.append((notifier.name, indexes, grouper, call))
        if not calls:
            return {}
        replies: dict[tuple[str, int], Any] = {}
        results = pipe.execute(raise_on_error=False)
        for (name, indexes, grouper, call), result in zip(calls, results, strict=True):
            if isinstance(result, redis.exceptions.NoScriptError):
                result = grouper.run(call)  # noqa: PLW2901 - Redis lost its scripts (a restart)
            if isinstance(result, Exception):
                replies.update(((name, index), result) for index in indexes)
            else:
                replies.update(((name, index), reply) for index, reply in zip(indexes, result, strict=True))
        return replies

    def _stage(
        self, pipe: Any, notifier: Notifier[Any], steps: list[Step], replies: dict[tuple[str, int], Any],
        *, now_ms: int, jobs: dict[str, str],
    ) -> list[Staged]:  # fmt: skip
        """Stage one notifier's queue effects in ``pipe``, in stream order: each with the index
        of its reply. A ``group`` step becomes what :meth:`Notifier.grouped` makes of its reply
        (its delivery-log entries go into ``pipe`` too, their replies unread)."""
        items: list[Staged] = []
        for step_no, (kind, alert) in enumerate(steps):
            out: Alert | None = alert
            if kind == "group":
                reply = replies.get((notifier.name, step_no))
                if reply is not None:
                    if isinstance(reply, Exception):
                        raise reply  # its on_batch runs the script again, isolated by the runtime
                    out = notifier.grouped(alert, reply, now_ms, pipe=pipe)
                if out is None:
                    continue
            index = len(pipe)
            if kind == "drop":
                notifier.queue.stage_drop_held(pipe, alert.dedup_key)
                items.append(Staged("drop", alert, None, index))
            elif out is alert:
                call = _call(notifier, alert, jobs)
                notifier.queue.stage(pipe, call)
                items.append(Staged("send", alert, call, index))
            elif out is not None:  # the group's resolve (its last open member resolved)
                job_json = notifier.job(out).to_json()
                call = notifier.queue.enqueue_call(out.id, job_json, out.dedup_key, "resolve")
                notifier.queue.stage(pipe, call)
                items.append(Staged("group", out, call, index))
        return items

    def _settle(
        self, notifier: Notifier[Any], items: list[Staged], results: list[Any],
        messages: Sequence[Message[Alert]],
    ) -> None:  # fmt: skip
        """Read one notifier's replies in order; mark its batch done if every step went through."""
        fresh = 0
        try:
            for item in items:
                reply = results[item.index]
                if isinstance(reply, redis.exceptions.NoScriptError) and item.call is not None:
                    reply = notifier.queue.run(item.call)  # Redis lost its scripts (a restart): load it
                if isinstance(reply, Exception):
                    raise reply  # RECOVERABLE (a full Redis...): the runtime waits, re-reads the batch
                if item.kind == "send":
                    fresh += notifier.queued(item.alert, queued(int(reply)))
                elif item.kind == "group":
                    fresh += bool(queued(int(reply)))
        except RECOVERABLE:
            raise
        except Exception:
            log.exception("notifier %s: queueing a batch failed; it queues the batch itself", notifier.name)
            return
        finally:
            if fresh and notifier.deliverer is not None:
                notifier.deliverer.wake(fresh)
        notifier.prequeued = messages


@dataclass(frozen=True)
class Staged:
    """One queue effect in the batch's pipeline: ``send`` a routed alert, ``drop`` what a mute
    held for an incident that ended, or queue a ``group``'s resolve; ``index``: its reply's."""

    kind: Literal["send", "drop", "group"]
    alert: Alert
    call: EnqueueCall | None
    index: int


def _call(notifier: Notifier[Any], alert: Alert, jobs: dict[str, str]) -> EnqueueCall:
    """The enqueue call of a routed alert."""
    job_json = jobs.get(alert.id)
    if job_json is None:
        job_json = jobs[alert.id] = notifier.job(alert).to_json()
    queue = notifier.queue
    if alert.status == "resolved":
        return queue.enqueue_call(alert.id, job_json, alert.dedup_key, "resolve", park_ms=notifier.park_ms)
    return queue.enqueue_call(alert.id, job_json, alert.dedup_key)
