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
so the notifier's own ``on_batch`` skips it. A notifier whose batch needs more than queueing (an
alert to hold for a mute, an alert recorded as stale, grouping, reminders), that overrides
``on_batch``, or whose planning or scripts failed, is left to its own ``on_batch``: the same
effects per alert, with the runtime's isolation (entry-by-entry retries, dead letters). The fast
path only ever takes a notifier's whole batch, so per notifier the order of effects is the
stream's either way, and everything is idempotent, so running a step twice is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis

from agentwatch.alerts import Alert
from agentwatch.handler import Handler, Message
from agentwatch.redisconn import RECOVERABLE, Client
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
        plans: list[tuple[Notifier[Any], list[tuple[Step, EnqueueCall | None]]]] = []
        jobs: dict[str, str] = {}  # alert id -> its job's JSON: the same for every notifier
        for notifier in self.notifiers:
            try:
                steps = notifier.plan(messages, now_ms, mutes, view)
                if steps is None:
                    continue
                plans.append((notifier, [(step, _call(notifier, step, jobs)) for step in steps]))
            except RECOVERABLE:
                raise
            except Exception:
                # Its own on_batch does the same work and raises again, isolated by the runtime.
                log.exception("notifier %s: planning a batch failed; it queues it itself", notifier.name)
        if not plans:
            return
        pipe = self.client.pipeline(transaction=False)
        for notifier, staged in plans:
            for (_, alert), call in staged:
                if call is None:
                    notifier.queue.stage_drop_held(pipe, alert.dedup_key)
                else:
                    notifier.queue.stage(pipe, call)
        replies = iter(pipe.execute(raise_on_error=False))
        for notifier, staged in plans:
            results = [next(replies) for _ in staged]
            self._settle(notifier, staged, results, messages)

    def _settle(
        self, notifier: Notifier[Any], staged: list[tuple[Step, EnqueueCall | None]], results: list[Any],
        messages: Sequence[Message[Alert]],
    ) -> None:  # fmt: skip
        """Read one notifier's replies in order; mark its batch done if every step went through."""
        fresh = 0
        try:
            for ((_, alert), call), result in zip(staged, results, strict=True):
                reply = result
                if isinstance(reply, redis.exceptions.NoScriptError) and call is not None:
                    reply = notifier.queue.run(call)  # Redis lost its scripts (a restart): load it
                if isinstance(reply, Exception):
                    raise reply  # RECOVERABLE (a full Redis...): the runtime waits, re-reads the batch
                if call is not None and notifier.queued(alert, queued(int(reply))):
                    fresh += 1
        except RECOVERABLE:
            raise
        except Exception:
            log.exception("notifier %s: queueing a batch failed; it queues the batch itself", notifier.name)
            return
        finally:
            if fresh and notifier.deliverer is not None:
                notifier.deliverer.wake(fresh)
        notifier.prequeued = messages


def _call(notifier: Notifier[Any], step: Step, jobs: dict[str, str]) -> EnqueueCall | None:
    """The enqueue call of a ``send`` step (None for a ``drop``)."""
    kind, alert = step
    if kind != "send":
        return None
    job_json = jobs.get(alert.id)
    if job_json is None:
        job_json = jobs[alert.id] = notifier.job(alert).to_json()
    queue = notifier.queue
    if alert.status == "resolved":
        return queue.enqueue_call(alert.id, job_json, alert.dedup_key, "resolve", park_ms=notifier.park_ms)
    return queue.enqueue_call(alert.id, job_json, alert.dedup_key)
