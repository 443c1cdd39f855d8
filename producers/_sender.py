"""The sender thread: everything that touches Redis happens here, never on the agent's thread.

The agent's thread only appends to :attr:`Sender.queue` (a bare ``float`` timestamp for a plain
beat, a small dict otherwise). This thread wakes every ``flush_interval`` (or as soon as
``wake_at`` events wait), stamps each event (``v``, agent, run, wall-clock ``ts``, ``seq`` in
stream order), encodes it and hands the batch to :class:`~producers._transport.Transport`.

Failure model: a batch Redis refuses, or that cannot be sent, is dropped and counted by reason;
the counts ride as ``dropped`` on the next event that gets through. A batch that was sent but
whose replies never came (a timeout, a connection cut while reading) is counted as
``unconfirmed``, not as dropped: a Redis that was only slow or paused has usually written it.
When Redis cannot be reached at all, events wait in the (bounded) queue and this thread only
PINGs, with backoff, until it answers. A new or unproven connection first gets a small batch:
a hung server then costs this thread one socket timeout per try, and the agent nothing, not even
a GIL-hogging encode of the whole queue.

A hung Redis (connections accepted, nothing answered) is waited out on the connection that timed
out, kept open and watched in one blocking call (:meth:`Transport.watch`), with a new connection
tried only after 5 s, growing to 30 s. Why: this thread shares the GIL with the agent's. When it
wakes from a wait while the agent runs Python, it forces the agent's thread to hand the GIL over
(in ``heartbeat()`` as anywhere else), and that thread waits until this one blocks again: its
short socket calls in between (name lookup, connect, send, close) do not let the agent back in.
The old back-off (0.1 s doubling to 5 s, a reconnect each time) woke this thread 12 times in
the first 10 s of an outage, each time for a burst of a dozen socket calls; the watch makes it
5, and a paused Redis is noticed the moment it answers instead of at the next try.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import msgpack

from agentwatch import runfile
from agentwatch.codec import MAX_ENTRY_BYTES, MAX_STACK_CHARS, VERSION
from agentwatch.signing import Signer
from agentwatch.urls import display_url
from producers._config import Settings
from producers._fields import RESERVED
from producers._guard import internal_error, logger, warn_once
from producers._halts import HaltWatch
from producers._stack import thread_stack, trim_frames
from producers._sync import Wakeup
from producers._system import rss_bytes
from producers._transport import Replies, Transport, reason_for

BATCH_MAX: Final = 10_000
"""Events per pipeline once the connection is proven. Large, because under a flood every extra
round trip hands the GIL to the agent's thread for up to a switch interval (5 ms)."""
FIRST_BATCH: Final = 64
"""Events in the first batch on a new connection, before it has shown that Redis answers."""
WAKE_FRACTION: Final = 8
"""Wake the sender early when 1/WAKE_FRACTION of the queue is full."""
IDLE_AFTER: Final = 3
"""Empty flushes in a row after which the thread sleeps until the next pulse (or an event)."""
BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 1.0
BACKOFF_MAX_HUNG: Final = 5.0
"""Retry cap when Redis times out rather than refuses: a hung server rarely recovers in a
second, and every try costs a connection on it and a few GIL hand-overs in the agent."""
STALLED_RETRY: Final = 5.0
STALLED_RETRY_MAX: Final = 30.0
"""While a connection that timed out is watched (a paused Redis answers on it as it resumes), a
new connection is tried after 5 s, doubling to 30 s: only a server that lost the old connection
without closing it (a middlebox, a failover behind the same name) needs one."""
OUTAGE_LOG_EVERY: Final = 60.0
UNCONFIRMED: Final = "unconfirmed"
"""Drop reason of events sent to Redis whose replies never came: maybe written, maybe not."""
SIZE_KEY: Final = 0
"""Key under which a heavy beat carries its approximate size from the agent's thread to this one
(an int: it can collide with no meta key); removed before encoding."""

BeatInfo = Callable[[], tuple[float, int, str | None]]
"""Returns (monotonic time of the last beat, ident of the thread that beat, its death note)."""


class Sender:
    """Owns the queue, the connection and the thread for one producer in one process run."""

    def __init__(
        self,
        settings: Settings,
        stream: str,
        run: str,
        start: dict[str, Any],
        beat_info: BeatInfo,
        *,
        halts: HaltWatch | None = None,
    ) -> None:
        self.settings = settings
        self.run = run
        self.queue: deque[dict[str, Any] | float] = deque()
        self.overflow = itertools.count()  # next() is atomic under the GIL: no lock on the hot path
        self.wake = Wakeup()
        self.wake_at = max(1, settings.queue_size // WAKE_FRACTION)
        self.extends: deque[float] = deque()
        self.bytes_in = 0
        """Approximate bytes of heavy beats queued so far: written by the agent's threads only."""
        self.bytes_out = 0
        """... and taken off the queue so far: written by this thread only."""
        self.finished = False
        self.idle = False
        """Asleep until the next pulse: the agent's thread wakes it with the first new event."""
        self._empty_flushes = 0
        self._beat_info = beat_info
        # agentwatch.codec.encode's exact options, but one Packer kept for this thread: packb()
        # builds a new one per call, which doubles the cost of encoding a beat.
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._transport = Transport(settings.redis_url, stream, settings.socket_timeout, settings.maxlen)
        self._signer = Signer(settings.key, stream) if settings.key else None
        """Signs each batch as it is sent (agentwatch/signing.py): here, never in heartbeat()."""
        self._start: dict[str, Any] | None = start
        self._run_record = {key: start.get(key) for key in ("pid", "pid_start", "host")}
        self._run_record.update(agent=settings.agent, run=run)
        self._run_file: Path | None = None
        self._sweep: Iterator[None] | None = None
        """Stale run files still to look at (agentwatch/runfile.py), one per step of the loop."""
        self._start_payload: bytes | None = None
        self._seq = 0
        self._drops: dict[str, int] = {}
        self._overflow_seen = 0
        self._backlog = False
        self._failing: str | None = None  # reason of the current outage, None while healthy
        self._failures = 0
        self._stalls = 0  # failures in a row that left a stalled connection to watch
        self._retry_at = 0.0
        self._last_outage_log = -OUTAGE_LOG_EVERY
        self._next_pulse = time.monotonic() + settings.pulse_interval
        self._final: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._halts = halts
        """Polled with every batch, and alone when idle for its interval (producers/_halts.py)."""

    # -- called from other threads ---------------------------------------------------------
    def start(self) -> None:
        name = f"agentwatch-sender[{self.settings.agent}]"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def finish(self, exit_fields: dict[str, Any]) -> None:
        """Queue the final (``exit``) event after everything already queued; see :attr:`done`."""
        if self._final is None:
            self._final = exit_fields
        self.wake.set()
        self._transport.interrupt()  # if it waits on a silent Redis: one last try, then goodbye

    @property
    def done(self) -> bool:
        """The final event was delivered or given up on, or there is no thread to send it."""
        return self.finished or self._thread is None or not self._thread.is_alive()

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        if self.settings.run_dir:  # here, not in the agent's thread: it is file I/O
            self._run_file = runfile.write(self.settings.run_dir, self._run_record, sweep=False)
            self._sweep = runfile.sweeper(self.settings.run_dir)
        while not self.finished:
            try:
                self._step()
                # One stale run file per step, never the whole directory at once: this thread
                # holds the GIL while it reads files, and the agent's thread (in heartbeat() or
                # anywhere) waits for it, up to a 5 ms switch interval at a time.
                if self._sweep is not None and next(self._sweep, StopIteration) is StopIteration:
                    self._sweep = None
            except Exception:
                internal_error("sender")
                time.sleep(0.1)  # a persistent bug must not become a hot loop
        self._transport.close()
        runfile.remove(self._run_file)

    def _wait(self) -> None:
        """Sleep until the next flush, pulse or retry is due, or until woken.

        Every wake-up makes this thread take the GIL from the agent's thread, which on a busy
        machine can cost the agent a scheduler tick; so an idle producer does not tick.
        """
        if self._final is not None:
            return
        now = time.monotonic()
        if self._failing is not None:
            delay = self._retry_at - now  # a full queue must not turn an outage into a spin
            if delay > 0 and self._transport.stalled:
                # One blocking wait on the silent connection instead of a sleep: no wake-up,
                # hence no GIL taken from the agent, until Redis stirs or the retry is due.
                if self._transport.watch(delay):
                    self._retry_at = 0.0  # it answered (or hung up): try again now
                return
        elif self._backlog or len(self.queue) >= self.wake_at or self.extends:
            return
        else:
            if self._empty_flushes >= IDLE_AFTER:
                if not self._sleep_idle(now):
                    return  # a pulse or a halt poll is due, or extend()/exit woke us: act now
                now = time.monotonic()  # woken by an event: give the batch its window
            delay = min(self.settings.flush_interval, self._next_pulse - now)
        if delay > 0:
            self.wake.wait(delay)

    def _sleep_idle(self, now: float) -> bool:
        """Sleep until the next pulse or the first new event; True if an event woke us."""
        self.idle = True
        # Publish "idle" before looking at the queue, while the agent's thread appends before
        # looking at "idle": one of the two always sees the other (see Producer.heartbeat).
        if not self.queue and not self.extends and self._final is None:
            until = self._next_pulse if self._halts is None else min(self._next_pulse, self._halts.next_poll)
            self.wake.wait(until - now)
        self.idle = False
        return bool(self.queue) and not self.extends and self._final is None

    def _step(self) -> None:
        self._wait()
        final = self._final
        now = time.monotonic()
        if self._failing is not None:
            if now < self._retry_at and final is None:
                return
            if not self._probe():
                if final is not None:
                    logger.warning("agentwatch: %d event(s) and the exit event could not be "
                                   "delivered before exit", len(self.queue))  # fmt: skip
                    self.finished = True
                return
        queue = self.queue
        limit = BATCH_MAX if self._transport.proven else FIRST_BATCH
        items: list[dict[str, Any] | float] = [queue.popleft() for _ in range(min(len(queue), limit))]
        self._backlog = bool(queue)
        self._empty_flushes = 0 if items else self._empty_flushes + 1
        while self.extends:
            items.append(self._pulse(now, extend=self.extends.popleft()))
        if now >= self._next_pulse and final is None:  # no pulse in the goodbye batch
            items.append(self._pulse(now))
            self._next_pulse = now + self.settings.pulse_interval
        last = final is not None and not queue
        if last:
            assert final is not None
            items.append(final)
        if items or self._start is not None:
            self._deliver(items)
        elif self._halts is not None and final is None and now >= self._halts.next_poll:
            self._poll_halts()
        if last:
            self.finished = True

    def _poll_halts(self) -> None:
        """The idle poll: one small read on its own (a beating agent's rides on its batches)."""
        assert self._halts is not None
        replies = self._transport.call([self._halts.poll])
        if isinstance(replies, BaseException):  # Redis away: the next batch finds out and says so
            self._halts.next_poll = time.monotonic() + self._halts.interval
            return
        self._halts_polled(replies[0])

    def _halts_polled(self, reply: Any) -> None:
        assert self._halts is not None
        now = time.monotonic()
        if self._halts.polled(reply, now):
            self._halts.read(self._transport.call(self._halts.read_all), now)

    def _pulse(self, now: float, extend: float | None = None) -> dict[str, Any]:
        pulse: dict[str, Any] = {"kind": "pulse", "ts": now}
        if self.settings.interval is not None:
            # Repeated on every pulse, so a pipeline that lost this agent's record (a Redis
            # restarted without persistence, a new state layout) relearns the interval at
            # once instead of judging silence by its default until the next start.
            pulse["interval"] = self.settings.interval
        rss = rss_bytes()
        if rss is not None:
            pulse["rss"] = rss
        if extend is not None:
            pulse["extend"] = extend
        last_beat, ident, death = self._beat_info()
        late = now - last_beat
        if ident and late > self.settings.stack_after:
            pulse["stack"] = death if death is not None else thread_stack(ident, late)
        return pulse

    # -- encoding and accounting -----------------------------------------------------------
    def _deliver(self, items: list[dict[str, Any] | float]) -> None:
        offset = time.time() - time.monotonic()
        payloads: list[bytes] = []
        if self._start is not None:
            if self._start_payload is None:
                self._start_payload = self._encode(self._start, offset)
            if self._start_payload is None:  # cannot happen (start is small); never block on it
                self._start = None
            else:
                payloads.append(self._start_payload)
        with_start = bool(payloads)
        drops = self._take_drops()
        carrier = -1
        for item in items:
            if isinstance(item, float):
                fields = {"kind": "beat", "ts": item}
            else:
                fields = item
                size = fields.pop(SIZE_KEY, 0)  # type: ignore[call-overload]
                if size:
                    self.bytes_out += size
            data = self._encode(fields, offset, drops if carrier < 0 else None)
            if data is None:
                continue
            if carrier < 0 and drops:
                carrier = len(payloads)
            payloads.append(data)
        if carrier < 0 and drops:  # nothing carried them: keep for the next batch
            self._add_drops(drops)
        if payloads:
            signatures = None
            if self._signer is not None:  # at send time: a retried start is signed afresh
                self._signer.stamp(time.time())
                signatures = [self._signer.sign(payload) for payload in payloads]
            poll = b"" if self._halts is None or self._final is not None else self._halts.poll
            replies = self._transport.send(payloads, signatures, also=poll)
            self._account(replies, with_start, carrier, drops)
            if poll and replies.error is None:
                self._halts_polled(replies.also)

    def _account(self, replies: Replies, with_start: bool, carrier: int, drops: dict[str, int]) -> None:
        """Count what did not get through; keep what must be sent again (start, drop counts)."""
        if with_start and replies.delivered(0):
            self._start = self._start_payload = None
        if carrier >= 0 and not replies.delivered(carrier):
            self._add_drops(drops)
        for index, reason in replies.refused.items():
            if not (with_start and index == 0):  # start stays pending and is sent again
                self._drops[reason] = self._drops.get(reason, 0) + 1
        if replies.error is not None:
            lost = replies.count - replies.cut - (1 if with_start and replies.cut == 0 else 0)
            if lost:
                # Sent, no reply: Redis may well have written them (a paused server executes
                # what it had read once it resumes). Saying "dropped" would be a guess.
                reason = UNCONFIRMED if replies.sent else replies.cut_reason
                self._drops[reason] = self._drops.get(reason, 0) + lost
            self._failed(replies.error)

    def _encode(
        self, fields: dict[str, Any], offset: float, drops: dict[str, int] | None = None
    ) -> bytes | None:
        fields["v"] = VERSION
        fields["agent"] = self.settings.agent
        fields["run"] = self.run
        fields["seq"] = self._seq
        fields["ts"] = fields["ts"] + offset
        if drops:
            fields["dropped"] = drops
        data: bytes = self._pack(fields)
        if len(data) > MAX_ENTRY_BYTES:
            smaller = self._shrink(fields)
            if smaller is None:
                if drops:
                    self._add_drops(drops)
                self._drops["too_large"] = self._drops.get("too_large", 0) + 1
                return None
            data = smaller
        self._seq += 1
        return data

    def _shrink(self, fields: dict[str, Any]) -> bytes | None:
        """Make an over-cap event fit: drop meta first, then cut long texts; else give up."""
        warn_once("size", "agentwatch: an event over %d bytes lost its meta to fit",
                  MAX_ENTRY_BYTES)  # fmt: skip
        for key in [key for key in fields if key not in RESERVED and key != "parent"]:
            del fields[key]
        for key in ("stack", "traceback"):
            if key in fields:
                fields[key] = trim_frames("", [fields[key]], MAX_STACK_CHARS // 2)
        data: bytes = self._pack(fields)
        return data if len(data) <= MAX_ENTRY_BYTES else None

    def _absorb_overflow(self) -> None:
        current = _counter_value(self.overflow)
        if current > self._overflow_seen:
            # Overflow while Redis is away is caused by the outage: name the outage.
            reason = self._failing or "queue_full"
            self._drops[reason] = self._drops.get(reason, 0) + current - self._overflow_seen
            self._overflow_seen = current

    def _take_drops(self) -> dict[str, int]:
        self._absorb_overflow()
        drops, self._drops = self._drops, {}
        return drops

    def _add_drops(self, drops: dict[str, int]) -> None:
        for reason, number in drops.items():
            self._drops[reason] = self._drops.get(reason, 0) + number

    # -- outages ---------------------------------------------------------------------------
    def _probe(self) -> bool:
        """During an outage: True once Redis answers a PING again."""
        error = self._transport.ping()
        self._absorb_overflow()  # overflow so far is the outage's doing, not queue_full
        if error is not None:
            self._failed(error)
            return False
        self._failing = None
        self._failures = self._stalls = 0
        logger.info("agentwatch: Redis at %s answers again", display_url(self.settings.redis_url))
        return True

    def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        if self._transport.stalled:  # watched until then (see _wait): retries can be rare
            self._stalls += 1
            delay = min(STALLED_RETRY_MAX, STALLED_RETRY * 2 ** (self._stalls - 1))
        else:
            cap = BACKOFF_MAX_HUNG if reason_for(exc) == "redis_timeout" else BACKOFF_MAX
            delay = min(cap, BACKOFF_MIN * 2 ** (self._failures - 1))
        self._retry_at = time.monotonic() + delay
        if self._failing is not None:
            return
        self._failing = reason_for(exc)
        now = time.monotonic()
        if now - self._last_outage_log >= OUTAGE_LOG_EVERY:
            self._last_outage_log = now
            logger.warning(
                "agentwatch: cannot deliver events to Redis at %s (%s: %s); events wait in memory "
                "(up to %d) and drops are counted until it answers",
                display_url(self.settings.redis_url),
                type(exc).__name__,
                exc,
                self.settings.queue_size,
            )


def _counter_value(counter: itertools.count[int]) -> int:
    """How many times ``next()`` was called on a fresh ``itertools.count()``, without calling it."""
    return int(repr(counter)[6:-1])
