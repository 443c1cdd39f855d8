"""The one consumer loop every detector and notifier worker runs on.

Delivery is at least once. A batch is read with XREADGROUP, decoded, handed to every handler,
and acknowledged only after the handlers returned, i.e. after their effects are written. So:

* a worker SIGKILLed mid-batch leaves its entries pending; any other worker reclaims them with
  XAUTOCLAIM once they have been idle for ``claim_idle`` and processes them again;
* handlers must make their effects idempotent; entry ids (and the producer's per-run ``seq``)
  are what they key that on;
* an entry that does not decode, or fails its ``verify`` check (a missing or bad signature,
  security.py: counted as ``rejected``), or that makes a handler raise ``max_attempts`` times, or
  that was delivered more than ``max_attempts`` times without an ack (it keeps killing workers),
  goes to the dead-letter stream with its reason and is acknowledged: it never blocks the stream;
* a handler that raises is isolated: logged, counted, retried entry by entry, and the other
  handlers and the worker carry on;
* a handler that fails on every entry is *broken*, not fed bad data: after a few entries in a
  row have failed alone (and been dead-lettered), its breaker opens, and while it stays open
  the entries it cannot handle are acked without it and counted per handler, not
  dead-lettered, so a broken plugin cannot flood the dead-letter stream (breaker.py);
* Redis going away, or refusing writes (full, read-only), is not an error in the data: the
  worker waits with backoff, keeps its unacknowledged entries, and re-reads them once Redis
  takes writes again; a dead letter is acknowledged only once it was written;
* Redis away for a moment (an error that reached the loop, or a call that kept the loop asleep
  well past its BLOCK: frozen, or restarting while redis-py reconnected inside the call) is an
  *outage* (outages.py), told apart from the loop's own slowness (CPU, a starved box) by where
  its thread's time went; once Redis answers, the loop ticks before it hands anything read
  after the outage to the handlers, so the detectors restart their clocks first;
* a stop (SIGTERM, SIGINT) finishes the batch, acknowledges it and exits; if Redis hangs, the
  connection is cut shortly after the stop request, so the process still exits within 2 s
  and what it had not acknowledged stays pending for another worker.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import redis

from agentwatch.breaker import Breaker
from agentwatch.codec import entry_key, entry_ms
from agentwatch.config import PipelineSettings
from agentwatch.deadletter import entry_field, letter
from agentwatch.errors import InvalidEntry, Unauthenticated
from agentwatch.handler import Handler, Message, Stats
from agentwatch.keys import Keys
from agentwatch.outages import Outages
from agentwatch.redisconn import (
    RECOVERABLE,
    Client,
    consumer_name,
    disconnect,
    responsive,
    retry_until_available,
    server_time_ms,
)
from agentwatch.upkeep import Upkeep

__all__ = ["Handler", "Message", "Stats", "Worker"]  # Handler, Message, Stats: handler.py

log = logging.getLogger("agentwatch.worker")

T = TypeVar("T")

Verify = Callable[[str, bytes, Any, bytes, T], None]
"""``(stream, entry id, fields, d bytes, decoded) -> None``: a check of each decoded entry before
any handler sees it (security.py's signatures); it raises :class:`InvalidEntry` to refuse one."""

Screen = Callable[[list[Message[T]]], list[Message[T]]]
"""The decoded batch -> what every handler gets: entries it leaves out are not errors (no dead
letter) and are acknowledged with the rest (the detectors: repeats of an event, workers.py)."""

_TRIM_EVERY_S = 60.0
_ERROR_LOG_EVERY_S = 60.0
_STOP_PROBE_AFTER_S = 0.5
_STOP_PROBE_TIMEOUT_S = 0.5
"""A worker still running this long after a stop request probes Redis (a PING on a fresh
socket); one that does not answer within the timeout is hung, and the worker's connections are
cut, so the process exits within 2 s however long the socket timeout."""


def _raw_reply(response: Any, **_: Any) -> Any:
    """Keep XREADGROUP's reply as hiredis parsed it: converting every entry's field list into a
    dict (redis-py's default) costs more than our whole validation of the event."""
    return response


class Worker(Generic[T]):
    """Consume ``streams`` in consumer group ``group`` and feed ``handlers`` until stopped."""

    def __init__(
        self,
        client: Client,
        settings: PipelineSettings,
        *,
        kind: str,
        streams: Sequence[str],
        group: str,
        decode: Callable[[bytes], T],
        handlers: Sequence[Handler[T]],
        retention_s: float,
        consumer: str | None = None,
        verify: Verify[T] | None = None,
        screen: Screen[T] | None = None,
    ) -> None:
        # redis-py's stubs type stream replies loosely (and differently per RESP version); the
        # runtime handles both shapes itself, so it talks to Redis through an untyped alias.
        self.client: Any = client
        self.settings = settings
        self.opts = settings.worker
        self.keys = Keys(settings.redis.prefix, settings.redis.shards)
        self.kind = kind
        self.streams = list(streams)
        self.group = group
        self.decode = decode
        self.verify = verify
        self.screen = screen
        self.handlers = list(handlers)
        self.retention_s = retention_s
        self.consumer = consumer or consumer_name(kind)
        self.stats = Stats()
        self.started_ms = int(time.time() * 1000)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._running = False
        self._cut = False  # the stop watchdog cut the connections: no more Redis I/O
        self._redis_ok = True  # False from a recoverable error until Redis answered again
        self._breakers: dict[int, Breaker] = {}
        self._recover_own = False
        self._started = False
        self._next_tick = 0.0
        self._next_health = 0.0
        self._next_claim = 0.0
        self._next_trim = 0.0
        self._error_logged: dict[tuple[str, str], float] = {}
        self.outages = Outages()
        """Redis outages this loop observed (the detector engine restarts its clocks after each)."""
        self.outages.watch(client)
        self._outage_logged = -math.inf
        self._single_node = isinstance(client, redis.Redis)
        client.set_response_callback("XREADGROUP", _raw_reply)
        self.upkeep = Upkeep(self)
        self.read_through: dict[str, bytes] = {}
        """Per stream, the newest entry processed (applied, dead-lettered or skipped)."""
        self.trim_floor: Callable[[str], int | None] | None = None
        """Stream -> the oldest entry time (ms) a handler still needs beyond what the consumer
        group needs (the detector engine's replay start), or None: trimming respects it."""

    # -- lifecycle -------------------------------------------------------------------------------
    def run(self, *, install_signals: bool = True) -> None:
        """Run until :meth:`stop` (or SIGTERM/SIGINT when ``install_signals``); then clean up."""
        if install_signals and threading.current_thread() is threading.main_thread():
            self._install_signals()
        log.info("%s worker %s starting on %s", self.kind, self.consumer, ", ".join(self.streams))
        self._running = True
        try:
            self._until_connected(self._setup)
            self.outages.mark()  # (waiting for Redis before the first set-up watched nothing)
            while not self._stop.is_set():
                self._run_guarded()
            self._finish()
        finally:
            self._done.set()

    def _run_guarded(self) -> None:
        try:
            self.run_once()
            self._redis_ok = True
        except RECOVERABLE as exc:
            self._redis_ok = False
            if not self._stop.is_set():
                self._until_connected(self._setup, first_error=exc)
                if self._redis_ok:
                    self._outage()
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                log.warning("consumer group vanished (Redis restarted without data?); recreating")
                self._until_connected(self._setup)
                if self._redis_ok:
                    self._outage()
            else:
                self._unexpected(exc)
        except Exception as exc:
            if self._cut:  # the stop watchdog closed a socket under us: not a fault
                self._redis_ok = False
            else:
                self._unexpected(exc)

    def _unexpected(self, exc: Exception) -> None:
        """A fault in the runtime itself: log it, count it, pause, carry on. Unacknowledged
        entries stay pending and are read again, so nothing is lost; the pause keeps a
        persistent fault from spinning."""
        log.error("worker loop failed; retrying in 1s", exc_info=exc)
        self.stats.errors += 1
        self._recover_own = True
        self._stop.wait(1.0)
        self.outages.mark()  # (the pause is ours, not Redis')

    def _outage(self, stalled: bool = False) -> None:
        """Redis is back after an outage (an error, or a call that stalled): record it, and
        tick before anything read after it is processed (the handlers learn of it first)."""
        if not stalled:
            self.outages.failed()
        self._next_tick = 0.0
        now = time.monotonic()
        if now - self._outage_logged >= _ERROR_LOG_EVERY_S:
            self._outage_logged = now
            log.warning(
                "%s worker %s: Redis did not answer for up to %.1fs (outage %d seen by this worker; "
                "the detectors restart their clocks after it; logged at most once a minute)",
                self.kind, self.consumer, self.outages.last_ms / 1000, self.outages.count,
            )  # fmt: skip

    def stop(self) -> None:
        """Ask the loop to finish its current batch, acknowledge it and return.

        If Redis hangs, the loop would wait out its socket timeout (and the final writes
        theirs): a watchdog probes Redis while the loop is still running, and once Redis does
        not answer, cuts the client's connections and keeps them cut until the loop returned.
        What was not acknowledged stays pending; another worker reclaims it (at least once). A
        slow handler on a healthy Redis is left to finish its batch.
        """
        if self._stop.is_set():
            return
        self._stop.set()
        if self._running and not self._done.is_set():
            threading.Thread(target=self._cut_when_late, name="agentwatch-stop", daemon=True).start()

    def _cut_when_late(self) -> None:
        if self._done.wait(_STOP_PROBE_AFTER_S):
            return
        while responsive(self.client, _STOP_PROBE_TIMEOUT_S) is not False:
            if self._done.wait(0.25):  # Redis answers (or cannot be probed): let the batch finish
                return
        log.warning(
            "%s worker %s: Redis does not answer while the worker stops; closing its connections "
            "(unacknowledged entries stay pending for another worker)", self.kind, self.consumer,
        )  # fmt: skip
        self._cut = True
        while not self._done.is_set():
            disconnect(self.client)
            self._done.wait(0.05)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run_once(self) -> int:
        """One iteration: timers when due, then one read-process-ack. Returns entries handled."""
        now = time.monotonic()
        if now >= self._next_tick:
            if self.outages.check(0.0):
                # Redis kept the last batch's processing waiting (frozen while a handler wrote):
                # the handlers hear of that outage in this tick, before they judge any clock.
                self._outage(stalled=True)
            self._tick(now)
        handled = 0
        while self._recover_own:  # entries we read before Redis went away, never acknowledged
            entries = self._read("0", block_ms=None)
            if not entries:
                self._recover_own = False
            handled += self.process(entries)
        block_ms = max(1, int(min(self.opts.block_s, self._next_tick - time.monotonic()) * 1000))
        entries = self._read(">", block_ms=block_ms)
        if self.outages.check(block_ms / 1000):
            # Redis kept this loop waiting (frozen, or reconnected inside a call): what it just
            # gave may be what agents could only send once it answered again. The handlers hear
            # of the outage (a tick) before they see those entries.
            self._outage(stalled=True)
            self._tick(time.monotonic())
        handled += self.process(entries)
        return handled

    def _setup(self) -> None:
        for stream in self.streams:
            try:
                self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        if not self._started:
            self.started_ms = server_time_ms(self.client)  # the clock `status` compares it with
            for handler in self.handlers:
                self._guarded(handler, "on_start")
            self._started = True
        self._recover_own = True

    def _finish(self) -> None:
        for handler in self.handlers:
            try:
                self._guarded(handler, "on_stop")
            except RECOVERABLE as exc:
                log.warning("%s %r: Redis unavailable in on_stop (%s)", self.kind, handler.name, exc)
        if self._cut or not self._redis_ok:
            # A write now would wait out the socket timeout on a hung server. The health key
            # expires by itself and other workers prune our registry entry.
            log.info("%s worker %s: Redis unavailable, final health write skipped", self.kind, self.consumer)
        else:
            try:
                pipe = self.client.pipeline(transaction=False)
                self.upkeep.publish_final(pipe)
                pipe.execute()
            except RECOVERABLE:
                pass  # the health key expires by itself
            except Exception:
                if not self._cut:
                    raise
        log.info("%s worker %s stopped (%s)", self.kind, self.consumer, self._summary())

    def _install_signals(self) -> None:
        def on_signal(signum: int, _frame: object) -> None:
            if self._stop.is_set():
                raise SystemExit(1)  # a second Ctrl-C: stop now; pending entries get reclaimed
            log.info("%s: finishing the current batch, then exiting", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _until_connected(self, action: Callable[[], None], first_error: Exception | None = None) -> None:
        """Run ``action`` (the set-up) once Redis takes it, waiting with backoff (redisconn.py)."""
        self._redis_ok = retry_until_available(
            action, self._stop, first_error, note="pending entries are kept"
        )

    # -- reading and processing ------------------------------------------------------------------
    def _read(self, start: str, block_ms: int | None) -> list[tuple[str, bytes, Any]]:
        """One XREADGROUP over all streams -> [(stream, entry id, field list)]."""
        if not self.streams:  # a detector worker holding no shard: a standby (detectors/engine.py)
            if block_ms:
                self._stop.wait(block_ms / 1000)
            return []
        streams = {stream: start for stream in self.streams}
        if not self._single_node and len(streams) > 1:  # cluster: one slot per command
            # The wait is shared out over the streams, never below 1 ms: BLOCK 0 would wait for
            # ever on an idle shard, and the timer checks (silence!) with it. Once one stream
            # gave entries, the others are only looked at.
            each = None if block_ms is None else max(1, block_ms // len(streams))
            out: list[tuple[str, bytes, Any]] = []
            for stream in self.streams:
                out += self._read_streams({stream: start}, None if out else each)
            return out
        return self._read_streams(streams, block_ms)

    def _read_streams(self, streams: dict[str, str], block_ms: int | None) -> list[tuple[str, bytes, Any]]:
        reply = self.client.xreadgroup(
            self.group,
            self.consumer,
            streams,
            count=self.opts.batch,
            block=block_ms,
        )
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3 or a cluster client that merged replies
            reply = list(reply.items())
        out: list[tuple[str, bytes, Any]] = []
        for stream, entries in reply:
            name = stream.decode() if isinstance(stream, bytes) else stream
            out += [(name, entry[0], entry[1]) for entry in entries]
        return out

    def process(self, entries: list[tuple[str, bytes, Any]]) -> int:
        """Decode, hand to handlers, dead-letter what failed, acknowledge everything."""
        if not entries:
            return 0
        good: list[Message[T]] = []
        dead: list[tuple[str, bytes, Any, str]] = []
        decode, verify = self.decode, self.verify
        for stream, entry_id, fields in entries:
            try:
                # [b"d", bytes] is the common shape: the fast path
                data = fields[1] if fields.__class__ is list and fields[0] == b"d" else entry_field(fields)
                item = decode(data)
                if verify is not None:
                    verify(stream, entry_id, fields, data, item)
                good.append((entry_id, item))
            except InvalidEntry as exc:
                dead.append((stream, entry_id, fields, str(exc)))
                if exc.__class__ is Unauthenticated:
                    self.stats.rejected += 1
        if good and self.screen is not None:
            good = self.screen(good)  # what it drops is acknowledged with the rest
        if good:
            poisoned: dict[bytes, str] = {}
            for handler in self.handlers:
                self._feed(handler, good, poisoned)
            if poisoned:
                by_id = {entry_id: (stream, fields) for stream, entry_id, fields in entries}
                dead += [(by_id[eid][0], eid, by_id[eid][1], why) for eid, why in poisoned.items()]
        self.acknowledge(entries, dead)
        newest = {stream: entry_id for stream, entry_id, _ in entries}  # (in order per stream)
        for stream, entry_id in newest.items():
            known = self.read_through.get(stream)
            if known is None or entry_key(entry_id) > entry_key(known):
                self.read_through[stream] = entry_id
        self.stats.batches += 1
        self.stats.last_entry_ms = entry_ms(entries[-1][1])
        return len(entries)

    def _feed(self, handler: Handler[T], good: list[Message[T]], poisoned: dict[bytes, str]) -> None:
        """Run one handler on the batch; on failure isolate the entries that make it raise.

        Each entry is retried alone ``max_attempts`` times and dead-lettered if it keeps
        failing: it is poison for this handler. A handler that fails on every entry is
        broken instead (breaker.py): once its breaker is open, what it cannot handle is
        acked without it and counted, not dead-lettered, until it passes a batch again.
        """
        breaker = self._breakers.get(id(handler))
        if breaker is None:
            breaker = self._breakers[id(handler)] = Breaker(handler.name, self.stats)
        try:
            handler.on_batch(good)
            breaker.passed()
            return
        except RECOVERABLE:
            raise
        except Exception:
            self._count_error(handler, "on_batch")
        done: set[int] = set()
        if breaker.is_open:
            # Still broken, or was only one entry of this batch bad? Its first few entries alone
            # decide, in order (one bad entry must not keep a recovered handler skipped).
            error: Exception | None = None
            for probe in range(min(3, len(good))):
                if good[probe][0] in poisoned:
                    continue
                error = self._attempt(handler, good[probe])
                if error is None:
                    done.add(probe)
                    break
            if error is not None and not done:
                breaker.skip(sum(1 for m in good if m[0] not in poisoned), error)
                return
            if done:
                breaker.passed()
        for index in range(len(good)):
            message = good[index]
            if index in done or message[0] in poisoned:
                continue
            error = self._retry_alone(handler, message)
            if error is None:
                breaker.passed()
                continue
            poisoned[message[0]] = (
                f"handler {handler.name!r} raised {type(error).__name__}: {error} "
                f"({self.opts.max_attempts} attempts)"
            )
            if breaker.failed(error):  # it just opened: the rest of the batch goes without it
                breaker.skip(sum(1 for m in good[index + 1 :] if m[0] not in poisoned), error)
                return

    def _attempt(self, handler: Handler[T], message: Message[T]) -> Exception | None:
        try:
            handler.on_batch([message])
            return None
        except RECOVERABLE:
            raise
        except Exception as exc:
            return exc

    def _retry_alone(self, handler: Handler[T], message: Message[T]) -> Exception | None:
        """Feed one entry up to ``max_attempts`` times; the last error, or None once it passed."""
        error: Exception | None = None
        for _ in range(self.opts.max_attempts):
            error = self._attempt(handler, message)
            if error is None:
                return None
        return error

    def acknowledge(
        self, entries: list[tuple[str, bytes, Any]], dead: list[tuple[str, bytes, Any, str]]
    ) -> None:
        """XACK ``entries``; those in ``dead`` only once their dead letter is written.

        The dead letters go first and their replies are checked one by one: in one
        non-transactional pipeline, an XADD refused (a full Redis) next to an XACK accepted
        would ack an entry that was neither applied nor kept. (MULTI would make the two atomic,
        but the streams live in different Cluster slots.) An entry whose dead letter was
        refused for a passing reason (full, read-only: :data:`RECOVERABLE`) stays pending, and
        the refusal is raised: the worker backs off and retries. Refused for good (the
        dead-letter key holds another type, an ACL forbids it), retrying would wedge the worker
        on the same entries forever: the entry is logged with its reason and acked, and counted
        in ``errors``.
        """
        refused: set[bytes] = set()
        unlettered = 0  # refused for good: acked without a dead letter
        failure: Exception | None = None
        if dead:
            cap = self.settings.streams.deadletter_max_bytes
            pipe = self.client.pipeline(transaction=False)
            for stream, entry_id, fields, reason in dead:
                pipe.xadd(
                    self.keys.deadletter,
                    letter(
                        stream, entry_id, fields, reason, group=self.group, consumer=self.consumer, cap=cap
                    ),
                    maxlen=self.settings.streams.deadletter_max_len,
                    approximate=True,
                )
            replies = pipe.execute(raise_on_error=False)
            for (stream, entry_id, _, reason), reply in zip(dead, replies, strict=True):
                if isinstance(reply, RECOVERABLE):
                    refused.add(entry_id)
                    failure = failure or reply
                elif isinstance(reply, Exception):
                    unlettered += 1
                    log.error(
                        "cannot dead-letter %s %s (%s: %s); acknowledged without it, its reason "
                        "was: %s", stream, entry_id.decode(), type(reply).__name__, reply, reason,
                    )  # fmt: skip
                else:
                    log.warning("dead-lettered %s %s: %s", stream, entry_id.decode(), reason)
        acked = [e for e in entries if e[1] not in refused] if refused else entries
        if acked:
            pipe = self.client.pipeline(transaction=False)
            if len(self.streams) == 1:
                pipe.xack(self.streams[0], self.group, *[e[1] for e in acked])
            else:
                by_stream: dict[str, list[bytes]] = {}
                for stream, entry_id, _ in acked:
                    by_stream.setdefault(stream, []).append(entry_id)
                for stream, ids in by_stream.items():
                    pipe.xack(stream, self.group, *ids)
            pipe.execute()
        lettered = len(dead) - len(refused) - unlettered
        self.stats.deadlettered += lettered
        self.stats.errors += unlettered
        self.stats.processed += len(acked) - lettered - unlettered
        if failure is not None:
            raise failure

    # -- timers: tick, health, reclaiming, trimming ----------------------------------------------
    def _tick(self, now: float) -> None:
        self._next_tick = now + self.opts.tick_s
        now_ms = server_time_ms(self.client)
        for handler in self.handlers:
            self._guarded(handler, "on_tick", now_ms)
        if now >= self._next_claim:
            self._next_claim = now + max(1.0, self.opts.claim_idle_s / 4)
            self.upkeep.reclaim()
        if now >= self._next_health:
            self._next_health = now + 1.0
            self.upkeep.refresh_health(now_ms)
        if now >= self._next_trim:
            self._next_trim = now + _TRIM_EVERY_S
            self.trim(now_ms)

    def trim(self, now_ms: int) -> None:
        """Trim the streams by age, never past what a consumer group still needs (upkeep.py)."""
        self.upkeep.trim(now_ms)

    # -- error accounting ------------------------------------------------------------------------
    def _guarded(self, handler: Handler[T], hook: str, *args: Any) -> None:
        try:
            getattr(handler, hook)(*args)
        except RECOVERABLE:
            raise
        except Exception:
            self._count_error(handler, hook)

    def _count_error(self, handler: Handler[T], hook: str) -> None:
        # A broken on_tick raises four times a second: log the traceback once a minute per hook.
        now = time.monotonic()
        if now - self._error_logged.get((handler.name, hook), -math.inf) >= _ERROR_LOG_EVERY_S:
            self._error_logged[(handler.name, hook)] = now
            log.exception(
                "%s %r raised in %s (isolated; the worker carries on; repeats are counted, "
                "logged at most once a minute)",
                self.kind, handler.name, hook,
            )  # fmt: skip
        self.stats.errors += 1
        self.stats.handler_errors[handler.name] = self.stats.handler_errors.get(handler.name, 0) + 1

    def _summary(self) -> str:
        s = self.stats
        return (
            f"processed={s.processed} dead-lettered={s.deadlettered} "
            f"reclaimed={s.reclaimed} errors={s.errors} skipped={s.skipped}"
        )
