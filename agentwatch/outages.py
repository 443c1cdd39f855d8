"""Telling a Redis outage from a late check, by what the worker's own thread went through.

A check that comes late proves nothing by its lateness: the worker may have been starved of CPU
(a loaded box), busy with a backlog, or Redis may have been away (restarted, loading, frozen)
so that agents could not send either. Only the last one must excuse the agents: while Redis is
away their beats wait in their producers, and arrive late through nobody's fault. So the worker
keeps, for the stretch between two marks (about one loop: a read, a batch, a tick), where its
thread's time went (Linux ``/proc/thread-self/schedstat``):

* on the CPU, or waiting in the run queue for one: the worker's own slowness (a batch, a loaded
  box). Not an outage: the agents' events are in the stream, and the horizon (detectors/horizon.py)
  keeps the checks from judging what is not read yet;
* asleep: waiting for Redis (or for the BLOCK of its own read, which it asked for). Asleep longer
  than its BLOCK by more than :attr:`Outages.stall_ms`, with one call among them that waited that
  long by itself, means Redis did not answer in time: frozen (SIGSTOP, a suspended VM, a blocking
  fsync), or restarting while redis-py reconnected with backoff inside the call. That stretch is
  an *outage*. (Many short round trips that add up on a loaded host are not: each delays a
  producer's write by as little; hence the single call, timed by :meth:`Outages.watch`.)
* a recoverable Redis error that reached the worker (refused, LOADING, timed out, read-only, out
  of memory): the stretch from the last mark until Redis took the set-up again is an outage,
  however short.

Without schedstat (not Linux) the run-queue wait cannot be told from a stall, and only a wait
longer than :data:`FALLBACK_STALL_MS` counts (the floor the gap rule used to have).
"""

from __future__ import annotations

import math
import time
from typing import Any, Final

SCHEDSTAT: Final = "/proc/thread-self/schedstat"
STALL_MS: Final = 250
"""Asleep this much longer than the BLOCK asked for: Redis did not answer in time. Well above the
round trips of one loop on a loaded host; a handler whose allowances leave less room for a late
beat lowers it (the detector engine: a quarter of its shortest allowance), not below
:data:`STALL_MIN_MS`."""
STALL_MIN_MS: Final = 50
MIN_ALLOWANCE_S: Final = 0.25
"""The shortest silence or stall ``after`` a pipeline accepts (issue 11: no false silence after a
Redis outage, whatever the thresholds). Below it, a stall too short to count as an outage
(:data:`STALL_MIN_MS`) plus one beat interval and a producer's flush fills the allowance, so a
healthy agent could be paged after a short outage: such a file is refused with this reason
(docs/detectors.md, "Redis outages")."""
FALLBACK_STALL_MS: Final = 1500
"""Without schedstat a thread starved of CPU looks asleep: only a longer stall counts then."""
PAIRED_WITHIN_S: Final = 0.002
"""How far apart the clock and the thread's times may be read to count as one instant (see
:func:`sample`)."""
SAMPLE_TRIES: Final = 3


def thread_times() -> tuple[float, float] | None:
    """(seconds on the CPU, seconds waiting in the run queue) of the calling thread, or None
    where the kernel does not say (not Linux, no schedstat)."""
    try:
        with open(SCHEDSTAT, "rb") as f:
            cpu_ns, queued_ns, _ = f.read().split(maxsplit=2)
        return int(cpu_ns) / 1e9, int(queued_ns) / 1e9
    except (OSError, ValueError):
        return None


def sample() -> tuple[float, tuple[float, float] | None]:
    """The monotonic clock and :func:`thread_times` read as one instant.

    Why: a thread preempted between the two reads has the preemption in one and not the other.
    At the end of a stretch asleep that is charged to its run queue but not to its wall time, so
    the sleep looks that much shorter (on a loaded 2-core box, 0.8 s asleep was once taken for
    0.25 s). So the clock is read on both sides and the read is tried again when they are more
    than :data:`PAIRED_WITHIN_S` apart; the closest of :data:`SAMPLE_TRIES` is kept."""
    gap, now, times = math.inf, 0.0, None
    for _ in range(SAMPLE_TRIES):
        start = time.monotonic()
        read = thread_times()
        end = time.monotonic()
        if end - start < gap:
            gap, now, times = end - start, end, read
        if gap <= PAIRED_WITHIN_S:
            break
    return now, times


class Outages:
    """What the worker loop observed of Redis' availability: each outage, counted once.

    Used by one thread (the worker loop); :attr:`count` and :attr:`last_ms` are read by its
    handlers (the detector engine, at its tick, on the same thread)."""

    def __init__(self) -> None:
        self.precise = thread_times() is not None
        """Whether a starved thread can be told from one kept waiting (schedstat readable)."""
        self.stall_ms = STALL_MS
        """The stall that counts (see :data:`STALL_MS`)."""
        self.count = 0
        """Outages observed since the worker started."""
        self.last_ms = 0
        """How long the last one lasted (ms, an upper bound: the whole stretch it fell in)."""
        self.total_ms = 0
        self._t0 = 0.0
        self._times: tuple[float, float] | None = None
        self._longest = 0.0
        self._watched = False
        self.mark()

    def watch(self, client: Any) -> None:
        """Time every command and pipeline ``client`` runs (whoever runs them: the worker, its
        handlers): the longest single wait since the last mark, less the BLOCK a read asked for."""
        execute = client.execute_command
        make_pipeline = client.pipeline

        def timed_execute(*args: Any, **options: Any) -> Any:
            start = time.monotonic()
            try:
                return execute(*args, **options)
            finally:
                self._note(time.monotonic() - start - _block_s(args))

        def timed_pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = make_pipeline(*args, **kwargs)
            run = pipe.execute

            def timed_run(*run_args: Any, **run_kwargs: Any) -> Any:
                start = time.monotonic()
                try:
                    return run(*run_args, **run_kwargs)
                finally:
                    self._note(time.monotonic() - start)

            pipe.execute = timed_run
            return pipe

        client.execute_command = timed_execute
        client.pipeline = timed_pipeline
        self._watched = True

    def _note(self, seconds: float) -> None:
        self._longest = max(self._longest, seconds)

    def mark(self) -> None:
        """Start a new stretch here."""
        if self.precise:
            self._t0, self._times = sample()
        else:
            self._t0, self._times = time.monotonic(), None
        self._longest = 0.0

    def check(self, expected_wait_s: float) -> bool:
        """End the stretch since the last mark, in which the thread meant to sleep at most
        ``expected_wait_s`` (its read's BLOCK); True if it was an outage. Marks again."""
        before = self._times
        now, after = sample() if before is not None else (time.monotonic(), None)
        wall = now - self._t0
        asleep = wall  # (without schedstat: all of it, starvation included)
        if before is not None and after is not None:
            asleep = wall - (after[0] - before[0]) - (after[1] - before[1])
        floor_ms = self.stall_ms if before is not None else FALLBACK_STALL_MS
        stalled = (asleep - expected_wait_s) * 1000 > floor_ms
        if self._watched and self._longest * 1000 <= floor_ms:
            stalled = False  # (only short round trips: a slow host, not an outage)
        if stalled:
            self._record(wall)
        self.mark()
        return stalled

    def failed(self) -> None:
        """The stretch since the last mark ended in a Redis error and a wait until Redis took
        the set-up again: an outage, whatever its length. Marks again."""
        self._record(time.monotonic() - self._t0)
        self.mark()

    def _record(self, seconds: float) -> None:
        self.count += 1
        self.last_ms = int(seconds * 1000)
        self.total_ms += self.last_ms


def _block_s(args: tuple[Any, ...]) -> float:
    """The BLOCK (s) an XREADGROUP/XREAD command asks for, else 0: a read waits that long by design."""
    if not args or args[0] not in ("XREADGROUP", "XREAD"):
        return 0.0
    for i, arg in enumerate(args[:-1]):
        if arg in (b"BLOCK", "BLOCK"):
            return float(args[i + 1]) / 1000
    return 0.0
