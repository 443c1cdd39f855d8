"""Delivery threads: drain one notifier's queue, retry with backoff, dead-letter what cannot go.

Each notifier has its own threads (``concurrency`` of them) and its own HTTP connections, so a
webhook that hangs ties up only its own threads: PagerDuty's keep running. A notifier's
:meth:`~notifiers.base.Notifier.deliver` says what happened with an :data:`Outcome`:

* :class:`Delivered` - done; logged.
* :class:`Retry` - try again after exponential backoff with jitter, or after ``after_s`` when the
  receiver said so (``Retry-After``); ``pause`` holds back the whole notifier (a 429 means
  every request would be refused, not just this one).
* :class:`Failed` - permanent (e.g. PagerDuty's 400): to ``<prefix>:notify:failed`` at once.

A retry becomes a failure once ``retry_for`` has passed since the alert was queued (by
default a day: a receiver down for hours still gets every alert), or after ``max_attempts``
when that optional cap is set, whichever comes first.

An attempt counts from the moment it is claimed, so one that died with its worker (SIGKILL, OOM)
still counts: the next try says ``attempt 2``, the log and the dead letter say how many requests
were really made. A delivery that keeps killing its worker (claimed again and again without an
outcome) is failed too.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agentwatch.alerts import Alert
from agentwatch.redisconn import RECOVERABLE
from notifiers.queue import Claimed, DeliveryQueue, Job, roundtrip

if TYPE_CHECKING:
    from notifiers.base import Notifier

log = logging.getLogger("agentwatch.notifiers")

_REDIS_BACKOFF_MAX_S = 5.0
_EXTRA_CLAIMS = 3
"""Claims beyond the attempts recorded that mark a delivery as one that crashes its worker."""


@dataclass(frozen=True)
class Delivery:
    """What a notifier delivers: the alert, and which attempt this is (1 for the first, counting
    attempts that died with their worker). ``extra`` holds what the queue carries beside the
    alert, including what a :class:`Retry` asked to keep (``progress``)."""

    id: str
    alert: Alert
    attempt: int
    first_ms: int
    extra: dict[str, Any]


@dataclass(frozen=True)
class Delivered:
    status: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class Retry:
    reason: str
    status: int | None = None
    body: str = ""
    after_s: float | None = None
    pause: bool = False
    progress: dict[str, Any] | None = None
    """Merged into the delivery's ``extra`` for the next attempt: e.g. which of several
    destinations already got it, so a retry sends only to the others."""


@dataclass(frozen=True)
class Failed:
    reason: str
    status: int | None = None
    body: str = ""


Outcome = Delivered | Retry | Failed


@dataclass(frozen=True)
class _Done:
    """A delivery the receiver took, to log and finish with the thread's next claim."""

    claimed: Claimed
    outcome: Delivered
    attempts: int
    until: float
    """monotonic: past it the lease has run out and another worker may deliver it again."""


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, so many deliveries that
    failed together do not all come back together, yet none retries almost at once."""
    ceiling = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    return float(ceiling / 2 + random.uniform(0, ceiling / 2))


class Deliverer:
    """The delivery threads of one notifier in one worker process."""

    def __init__(self, notifier: Notifier[Any], queue: DeliveryQueue) -> None:
        self.notifier = notifier
        self.queue = queue
        self.config = notifier.config
        self._stop = threading.Event()
        self._abandoned = False
        self._idle = threading.Condition()
        self._tickets = 0
        """Wake-ups owed: threads that wait take one and claim at once (see :meth:`wake`)."""
        self._threads: list[threading.Thread] = []
        self._inflight: dict[str, Claimed] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        for index in range(self.config.concurrency):
            thread = threading.Thread(
                target=self._run, name=f"notify-{self.notifier.name}-{index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def wake(self, count: int | None = None) -> None:
        """``count`` new deliveries were queued (None: any number): as many idle threads look now
        rather than at the next poll. Waking only as many as there are deliveries spares the
        others a claim that finds nothing, a script call each on a GIL the worker's main thread
        needs. A wake-up no thread was waiting for is kept (up to one per thread), so one that
        comes just before a thread starts to wait is not lost."""
        with self._idle:
            threads = len(self._threads)
            count = threads if count is None else min(count, threads)
            self._tickets = min(threads, self._tickets + count)
            self._idle.notify(count)

    def _sleep(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for a wake-up (or the stop)."""
        with self._idle:
            if self._tickets == 0 and not self._stop.is_set():
                self._idle.wait(wait_s)
            if self._tickets > 0:
                self._tickets -= 1

    def stop(self, timeout_s: float) -> None:
        """Stop claiming; wait up to ``timeout_s`` for deliveries in flight, then release the
        ones still running so another worker takes them at once instead of after the lease."""
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            stuck = list(self._inflight.values())
            self._inflight.clear()
            # Threads still blocked in a delivery must not touch Redis once we return: the
            # worker closes its client next. Their deliveries are handed back here instead.
            self._abandoned = True
        for claimed in stuck:
            job = claimed.job
            # The request may have reached the receiver: the attempt counts, but it ended here
            # on purpose, so it does not count as one that crashed its worker, nor as a failed
            # one: a delivery that was failing keeps its last error (the views show it).
            error = job.last_error or "handed over at a worker's stop"
            handed = Job(job.id, job.alert, job.first_ms, job.attempts + 1, error, job.last_status, job.extra)
            with contextlib.suppress(*RECOVERABLE):  # else the lease runs out by itself
                self.queue.retry(Claimed(handed, claimed.token, claimed.claims), 0, failed=False)

    @property
    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        """Claim, deliver, repeat: one round trip per delivery. A delivery the receiver took is
        logged and finished together with the next claim (:meth:`DeliveryQueue.finish_and_claim`),
        which follows at once."""
        redis_delay = 0.1
        poll_s = self.notifier.ctx.poll_s
        done: _Done | None = None  # delivered: log and finish it with the next claim
        while not self._stop.is_set():
            try:
                finished, got = self.queue.finish_and_claim(
                    done.claimed if done else None, self.notifier.lease_ms,
                    rate_per_s=self.config.rate_limit or 0.0, burst=self.config.burst,
                    before=self._log_delivered(done) if done else (),
                )  # fmt: skip
                if done is not None and not finished:
                    log.warning("notifier %s: %s was delivered after its lease ran out: another worker "
                                "may deliver it again", self.notifier.name, done.claimed.job.id)  # fmt: skip
                done = None
                redis_delay = 0.1
            except RECOVERABLE as exc:
                log.warning("notifier %s: Redis unavailable (%s); retrying", self.notifier.name, exc)
                if done is not None and time.monotonic() > done.until:
                    self._unrecorded(done.claimed, exc)
                    done = None
                self._stop.wait(redis_delay * random.uniform(0.5, 1.0))
                redis_delay = min(redis_delay * 2, _REDIS_BACKOFF_MAX_S)
                continue
            except Exception as exc:
                log.exception("notifier %s: claiming failed; retrying in 1s", self.notifier.name)
                if done is not None:
                    self._unrecorded(done.claimed, exc)
                    done = None
                self._stop.wait(1.0)
                continue
            if isinstance(got, Claimed):
                done = self._handle(got)
                continue
            # Nothing due: sleep until the earliest delivery is due, a new one is queued here,
            # or the poll comes round (deliveries queued by other workers, expired leases).
            self._sleep(poll_s if got < 0 else min(poll_s, got / 1000))
        with self._lock:
            if self._abandoned:
                return  # the worker is closing its client
        if done is not None:
            with contextlib.suppress(*RECOVERABLE):
                roundtrip(self.queue.client, self._log_delivered(done))
                self.queue.finish(done.claimed)

    def _log_delivered(self, done: _Done) -> list[tuple[Any, ...]]:
        """The commands logging a delivery the receiver took. They go just before the delivery
        is finished, in the same round trip: logged even if its lease ran out meanwhile
        (another worker may then deliver it again, and log that too)."""
        journal, outcome = self.notifier.journal, done.outcome
        return journal.delivered_commands(
            self.notifier.name, done.claimed.job, done.attempts, outcome.status, outcome.detail
        )

    def _unrecorded(self, claimed: Claimed, exc: Exception) -> None:
        log.warning(
            "notifier %s: could not record the outcome of %s (%s); it will be retried when its "
            "lease runs out", self.notifier.name, claimed.job.id, exc,
        )  # fmt: skip

    def _handle(self, claimed: Claimed) -> _Done | None:
        """Attempt one delivery and record its outcome; when it was delivered, what finishes it
        (see :meth:`_record`), else None."""
        job = claimed.job
        with self._lock:
            self._inflight[job.id] = claimed
        try:
            outcome = self._attempt(claimed)
            return self._settle(claimed, outcome)
        finally:
            with self._lock:
                self._inflight.pop(job.id, None)

    def _attempt(self, claimed: Claimed) -> Outcome:
        job = claimed.job
        if claimed.claims > job.attempts + _EXTRA_CLAIMS:
            died = claimed.claims - 1 - job.attempts
            return Failed(f"{died} attempts ended without an outcome: it may crash its workers")
        try:
            alert = Alert(**job.alert)
        except TypeError as exc:
            return Failed(f"queued alert is malformed: {exc}")
        delivery = Delivery(job.id, alert, claimed.claims, job.first_ms, job.extra)
        try:
            return self.notifier.deliver(delivery)
        except RECOVERABLE:
            raise
        except Exception as exc:
            # A bug in a notifier must not drop the alert: count it, retry with backoff, and let
            # the attempts budget dead-letter it with the error if it never goes through.
            log.exception("notifier %s raised delivering %s", self.notifier.name, job.id)
            return Retry(f"notifier raised {type(exc).__name__}: {exc}")

    def _settle(self, claimed: Claimed, outcome: Outcome) -> _Done | None:
        """Write the outcome; keep trying while Redis is away (until our lease is about to go).
        Returns :meth:`_record`'s pipeline, if any."""
        with self._lock:
            if self._abandoned:
                return None  # released by stop(): whoever claims it next decides
        deadline = time.monotonic() + self.notifier.lease_ms / 1000
        delay = 0.05
        while True:
            try:
                return self._record(claimed, outcome)
            except RECOVERABLE as exc:
                if time.monotonic() > deadline or self._stop.is_set():
                    self._unrecorded(claimed, exc)
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _record(self, claimed: Claimed, outcome: Outcome) -> _Done | None:
        """Write the outcome. A delivery the receiver took is not finished here: it is returned,
        and the thread logs and finishes it with its next claim, which follows at once (:meth:`_run`)."""
        job, cfg, journal = claimed.job, self.config, self.notifier.journal
        attempts = claimed.claims  # every attempt started, including any that died with a worker
        if isinstance(outcome, Retry):
            age_s = time.time() - job.first_ms / 1000
            capped = cfg.max_attempts is not None and attempts >= cfg.max_attempts
            if capped or age_s >= cfg.retry_for_s:
                why = f"gave up after {attempts} attempts over {age_s:.0f}s: {outcome.reason}"
                outcome = Failed(why, outcome.status, outcome.body)
        if isinstance(outcome, Delivered):
            return _Done(claimed, outcome, attempts, time.monotonic() + self.notifier.lease_ms / 1000)
        if isinstance(outcome, Failed):
            # Dead-letter first, then forget: a crash in between repeats the dead letter, never
            # loses it.
            journal.failed(self.notifier.name, self.notifier.kind, job, attempts, outcome)
            self.queue.finish(claimed)
            log.warning("notifier %s: delivery %s failed: %s", self.notifier.name, job.id, outcome.reason)
        else:
            after_s = outcome.after_s
            if after_s is None:
                after_s = backoff_s(attempts, cfg.backoff_s, cfg.backoff_max_s)
            after_s = min(after_s, cfg.retry_after_max_s)
            extra = {**job.extra, **(outcome.progress or {})}
            # ``attempts`` in the job counts attempts that ended with an outcome; the claims
            # beyond it died with their worker (see _attempt).
            retried = Job(job.id, job.alert, job.first_ms, job.attempts + 1, outcome.reason[:500],
                          outcome.status, extra)  # fmt: skip
            pause_ms = int(after_s * 1000) if outcome.pause else 0
            self.queue.retry(Claimed(retried, claimed.token, claimed.claims), int(after_s * 1000),
                             pause_ms=pause_ms)  # fmt: skip
            journal.count(self.notifier.name, "retried")
            log.info("notifier %s: %s attempt %d: %s; retrying in %.1fs", self.notifier.name, job.id,
                     attempts, outcome.reason, after_s)  # fmt: skip
        return None
