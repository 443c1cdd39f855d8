"""The sender thread: everything that touches Redis happens here, never on the agent's thread.

The agent's thread only appends small dicts to :attr:`Sender.queue`. This thread wakes every
``flush_interval`` (or as soon as ``WAKE_AT`` events wait), stamps each event (``v``, agent,
run, wall-clock ``ts``, ``seq`` in stream order), encodes it and writes the whole batch as one
pipeline of ``XADD ... MAXLEN ~ 100000 * d <msgpack>`` on a single connection.

Why the commands are packed here rather than by a redis-py ``Pipeline``: a flooding agent and
this thread share one GIL, so every microsecond of per-event work here is a microsecond the agent
cannot run. Packing RESP for a fixed command shape costs a fraction of redis-py's generic path;
redis-py still owns the connection (URL forms, TLS, AUTH, Unix sockets) and parses the replies.

Failure model: a batch that Redis refuses or that dies in flight is dropped and counted by
reason. When Redis cannot be reached at all, events wait in the (bounded) queue and the thread
only PINGs, with backoff, until it answers: a hung server then costs this thread one socket
timeout per try and the agent nothing. Drops travel as ``dropped`` on the next delivered event.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

from agentwatch.codec import MAX_ENTRY_BYTES, MAX_STACK_CHARS, VERSION, encode
from producers._config import Settings, redact
from producers._fields import RESERVED
from producers._guard import internal_error, logger, warn_once
from producers._stack import thread_stack, trim_frames
from producers._system import rss_bytes

MAXLEN: Final = 100_000
BATCH_MAX: Final = 10_000
"""Events per pipeline. Large, because under a flood every extra round trip hands the GIL to
the agent's thread for up to a switch interval (5 ms) before this thread gets it back."""
WAKE_FRACTION: Final = 8
"""Wake the sender early when 1/WAKE_FRACTION of the queue is full."""
BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 1.0
OUTAGE_LOG_EVERY: Final = 60.0
_PING: Final = b"*1\r\n$4\r\nPING\r\n"

class Wakeup:
    """A wake-up call any thread may make at any moment, even from a signal handler.

    ``threading.Event`` holds a Python-level lock inside ``set()`` and ``wait()``. A Python
    signal handler runs between bytecodes of the interrupted main thread, possibly inside those
    methods; if it then waits for this thread, and this thread needs that lock, both wait until
    the deadline (or forever, for a re-entered ``wait()``). A bare ``Lock`` used as a binary
    semaphore has no such window: ``release()`` and ``acquire()`` are single C calls.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # held = "nothing to do"; release() = "wake up"

    def set(self) -> None:
        with contextlib.suppress(RuntimeError):  # already released: one pending wake is enough
            self._lock.release()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds or until woken; consumes the wake-up."""
        return self._lock.acquire(timeout=max(timeout, 0.0))


def wait_done(senders: list[Sender], deadline: float) -> bool:
    """Wait until every sender has flushed its final event or ``deadline`` (monotonic) passes.

    Polls a plain flag: safe in a signal handler (see :class:`Wakeup`), and the 5 ms steps are
    nothing next to the deadline.
    """
    while not all(sender.done for sender in senders):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(0.005, remaining))
    return True


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
    ) -> None:
        self.settings = settings
        self.run = run
        self.queue: deque[dict[str, Any]] = deque()
        self.overflow = itertools.count()  # next() is atomic under the GIL: no lock on the hot path
        self.wake = Wakeup()
        self.wake_at = max(1, settings.queue_size // WAKE_FRACTION)
        self.extends: deque[float] = deque()
        self._beat_info = beat_info
        key = stream.encode()
        self._head = (
            b"*8\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$6\r\nMAXLEN\r\n$1\r\n~\r\n$%d\r\n%d\r\n"
            b"$1\r\n*\r\n$1\r\nd\r\n" % (len(key), key, len(str(MAXLEN)), MAXLEN)
        )
        self._start: dict[str, Any] | None = start
        self._start_payload: bytes | None = None
        self._seq = 0
        self._drops: dict[str, int] = {}
        self._overflow_seen = 0
        self._conn: Any = None
        self._failing: str | None = None  # reason of the current outage, None while healthy
        self._failures = 0
        self._retry_at = 0.0
        self._last_outage_log = -OUTAGE_LOG_EVERY
        self._next_pulse = time.monotonic() + settings.pulse_interval
        self._final: dict[str, Any] | None = None
        self.finished = False
        self._thread: threading.Thread | None = None

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

    @property
    def done(self) -> bool:
        """The final event was delivered or given up on, or there is no thread to send it."""
        return self.finished or self._thread is None or not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self.finished:
            try:
                self._step()
            except Exception:
                internal_error("sender")
                time.sleep(0.1)  # a persistent bug must not become a hot loop
        self._disconnect()

    def _wait(self) -> None:
        """Sleep until the next flush, pulse or retry is due, or until woken."""
        if self._final is not None:
            return
        now = time.monotonic()
        if self._failing is not None:
            delay = self._retry_at - now  # a full queue must not turn an outage into a spin
        elif len(self.queue) >= self.wake_at or self.extends:
            return
        else:
            delay = min(self.settings.flush_interval, self._next_pulse - now)
        if delay > 0:
            self.wake.wait(delay)

    def _step(self) -> None:
        settings = self.settings
        self._wait()
        final = self._final
        now = time.monotonic()
        if self._failing is not None:
            if now < self._retry_at and final is None:
                return
            if not self._probe():
                if final is not None:
                    self._give_up()
                return
        items: list[dict[str, Any]] = []
        queue = self.queue
        for _ in range(min(len(queue), BATCH_MAX)):
            items.append(queue.popleft())
        while self.extends:
            items.append(self._pulse(now, extend=self.extends.popleft()))
        if now >= self._next_pulse and final is None:  # no pulse in the goodbye batch
            items.append(self._pulse(now))
            self._next_pulse = now + settings.pulse_interval
        last = final is not None and not queue
        if last:
            assert final is not None
            items.append(final)
        if items or self._start is not None:
            self._deliver(items)
        if last:
            self.finished = True

    def _pulse(self, now: float, extend: float | None = None) -> dict[str, Any]:
        pulse: dict[str, Any] = {"kind": "pulse", "ts": now}
        rss = rss_bytes()
        if rss is not None:
            pulse["rss"] = rss
        if extend is not None:
            pulse["extend"] = extend
        last_beat, ident, death = self._beat_info()
        late = now - last_beat
        if ident and late > self.settings.stack_after:
            if death is not None:
                pulse["stack"] = death
            else:
                pulse["stack"] = thread_stack(ident, late)
        return pulse

    # -- encoding --------------------------------------------------------------------------
    def _deliver(self, items: list[dict[str, Any]]) -> None:
        offset = time.time() - time.monotonic()
        payloads: list[bytes] = []
        kinds: list[str] = []
        if self._start is not None:
            if self._start_payload is None:
                self._start_payload = self._encode(self._start, offset)
            if self._start_payload is None:  # cannot happen (start is small); never block on it
                self._start = None
            else:
                payloads.append(self._start_payload)
                kinds.append("start")
        drops = self._take_drops()
        carrier = -1
        for fields in items:
            data = self._encode(fields, offset, drops if carrier < 0 else None)
            if data is None:
                continue
            if carrier < 0 and drops:
                carrier = len(payloads)
            payloads.append(data)
            kinds.append(fields["kind"])
        if carrier < 0 and drops:  # nothing carried them: keep for the next batch
            self._add_drops(drops)
        if not payloads:
            return
        head = self._head
        buffer = b"".join([head + b"$%d\r\n" % len(p) + p + b"\r\n" for p in payloads])
        failures = self._pipeline(buffer, len(payloads))
        for index, reason in enumerate(failures):
            if reason is None:
                if kinds[index] == "start":
                    self._start = self._start_payload = None
                continue
            if index == carrier:
                self._add_drops(drops)
            if kinds[index] != "start":  # start stays pending and is sent again
                self._drops[reason] = self._drops.get(reason, 0) + 1

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
        data = encode(fields)
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
        data = encode(fields)
        return data if len(data) <= MAX_ENTRY_BYTES else None

    # -- drop accounting -------------------------------------------------------------------
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

    # -- Redis -----------------------------------------------------------------------------
    def _connection(self) -> Any:
        if self._conn is None:
            timeout = self.settings.socket_timeout
            options: dict[str, Any] = {
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
                "retry": Retry(NoBackoff(), 0),  # we retry on our own schedule, never inline
                "health_check_interval": 0,
                "socket_read_size": 256 * 1024,
            }
            # No CLIENT SETINFO on connect: the producer needs only XADD and PING, so an ACL
            # user limited to those works. redis-py >= 7 spells it driver_info, older lib_name.
            try:
                pool = redis.ConnectionPool.from_url(
                    self.settings.redis_url, driver_info=None, **options
                )
                self._conn = pool.make_connection()
            except TypeError:
                pool = redis.ConnectionPool.from_url(
                    self.settings.redis_url, lib_name=None, lib_version=None, **options
                )
                self._conn = pool.make_connection()
        return self._conn

    def _pipeline(self, buffer: bytes, count: int) -> list[str | None]:
        """Send ``count`` packed commands; the failure reason of each (``None``: delivered)."""
        conn = self._connection()
        results: list[str | None] = []
        # A connection idle for a while may have been closed by the server or a proxy: one
        # immediate resend on a fresh connection before anything counts as lost.
        attempts = 2 if conn.is_connected else 1
        for attempt in range(attempts):
            try:
                conn.send_packed_command([buffer], check_health=False)
                break
            except (RedisError, OSError) as exc:
                conn.disconnect()
                if attempt + 1 == attempts:
                    self._failed(exc)
                    return [_reason(exc)] * count
        for index in range(count):
            try:
                conn.read_response()
                results.append(None)
            except ResponseError as exc:  # one command refused (OOM, WRONGTYPE...): go on
                results.append(_reason(exc))
                warn_once(f"reply:{results[-1]}", "agentwatch: Redis refused an event (%s); "
                          "such events are dropped and counted", exc)  # fmt: skip
            except (RedisError, OSError) as exc:
                conn.disconnect()
                self._failed(exc)
                results.extend([_reason(exc)] * (count - index))
                return results
        if self._failing is None and self._failures:
            self._recovered()
        return results

    def _probe(self) -> bool:
        """PING on a fresh connection during an outage; True once Redis answers again."""
        conn = self._connection()
        try:
            conn.send_packed_command([_PING], check_health=False)
            conn.read_response()
        except (RedisError, OSError) as exc:
            conn.disconnect()
            self._failed(exc)
            self._absorb_overflow()  # overflow so far is the outage's doing, not queue_full
            return False
        self._absorb_overflow()  # still attributed to the outage that just ended
        self._failing = None
        self._recovered()
        return True

    def _failed(self, exc: BaseException) -> None:
        reason = _reason(exc)
        self._failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (self._failures - 1))
        self._retry_at = time.monotonic() + delay
        if self._failing is None:
            self._failing = reason
            now = time.monotonic()
            if now - self._last_outage_log >= OUTAGE_LOG_EVERY:
                self._last_outage_log = now
                logger.warning(
                    "agentwatch: cannot deliver events to Redis at %s (%s: %s); events wait in "
                    "memory (up to %d) and drops are counted until it answers",
                    redact(self.settings.redis_url),
                    type(exc).__name__,
                    exc,
                    self.settings.queue_size,
                )

    def _recovered(self) -> None:
        if self._failures:
            logger.info("agentwatch: Redis at %s answers again", redact(self.settings.redis_url))
        self._failures = 0

    def _give_up(self) -> None:
        """Exit requested while Redis is unreachable: report what is lost, then stop."""
        lost = len(self.queue) + 1
        logger.warning("agentwatch: %d event(s), including the exit event, could not be "
                       "delivered before exit", lost)  # fmt: skip
        self.finished = True

    def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # the process is ending or the socket is gone
                self._conn.disconnect()


def _reason(exc: BaseException) -> str:
    """A short, stable drop reason for a Redis failure (what ``dropped`` is keyed by)."""
    errors = redis.exceptions
    text = str(exc)
    # redis-py maps an error reply's code (OOM, NOAUTH...) to a class and strips it from the
    # message; older versions keep it in the text. Check both.
    if isinstance(exc, errors.AuthenticationError | errors.AuthorizationError):
        return "redis_auth"
    if isinstance(exc, errors.NoPermissionError) or text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
        return "redis_auth"
    if isinstance(exc, errors.OutOfMemoryError) or text.startswith("OOM"):
        return "redis_oom"
    if isinstance(exc, errors.ReadOnlyError) or text.startswith("READONLY"):
        return "redis_readonly"
    if isinstance(exc, errors.TimeoutError | TimeoutError):
        return "redis_timeout"
    if isinstance(exc, errors.ConnectionError | OSError):
        return "redis_down"
    return "redis_error"


def _counter_value(counter: itertools.count[int]) -> int:
    """How many times ``next()`` was called on a fresh ``itertools.count()``, without calling it."""
    return int(repr(counter)[6:-1])
