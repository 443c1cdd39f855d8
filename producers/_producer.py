"""One monitored agent: the hot path (``heartbeat``) and the run's life from start to exit.

``heartbeat()`` is called from the agent's work loop, possibly millions of times, so it does the
least possible: a pid comparison (which also catches forks and the lazy first start), the
event (a bare float for a plain beat), two attribute stores for stall evidence, and a bounded
append. No lock, no I/O, no
syscall beyond the clock. Everything else happens on the sender thread (:mod:`._sender`).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from agentwatch.codec import MAX_SPAN_S, MAX_STACK_CHARS
from agentwatch.keys import Keys
from producers import _lifecycle
from producers._config import (
    INHERIT_ENV,
    OPTIONS,
    Settings,
    export_for_children,
    inherited_from_parent,
    resolve,
)
from producers._fields import add_work_fields, amount, clean_meta
from producers._guard import internal_error, warn_once
from producers._halts import Halt, Halted, HaltWatch, current
from producers._lifecycle import EXIT_DEADLINE, Outcome
from producers._sender import SIZE_KEY, Sender
from producers._stack import exception_text, trim_frames
from producers._sync import Wakeup, wait_done
from producers._system import start_fields

_monotonic = time.monotonic
_get_ident = threading.get_ident

_PID = os.getpid()
"""This process's pid, refreshed in forked children by an at-fork hook. ``os.getpid()`` is a real
system call on current glibc (~0.2 us, a fifth of a beat), so the hot path compares with this."""


def _refresh_pid() -> None:
    global _PID
    _PID = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_refresh_pid)

HEAVY_EVENT = 512
"""Approximate encoded bytes above which a beat counts towards ``queue_bytes``. Lighter beats
are bounded well enough by ``queue_size``, and skip the accounting."""


class Producer:
    """Reports one agent's liveness, work and exit to the agentwatch pipeline.

    Arguments left out (``None``) come from the ``AGENTWATCH_*`` environment, then defaults:
    ``agent`` (the script's name), ``redis_url`` (``redis://127.0.0.1:6379/0``), ``prefix``
    (``aw``), ``interval`` (seconds between beats the agent means to keep; none by default),
    ``pulse_interval`` (5 s), ``shards`` (1), ``maxlen`` (the stream's ``MAXLEN ~`` cap,
    1,000,000). Tuning: ``queue_size`` (events held while Redis is slow or away, 10000),
    ``queue_bytes`` (approximate encoded bytes of the beats with meta among them, 4 MiB),
    ``flush_interval`` (0.1 s), ``socket_timeout`` (1 s), ``stack_factor`` (pulses carry the
    work thread's stack once the last beat is this many intervals old, 2.0; 30 s without a
    declared interval). The brake: ``on_halt`` (``"raise"``: ``heartbeat()`` raises
    :class:`~producers.Halted` while the agent is halted; ``"ignore"``: it never does),
    ``halt_interval`` (how often an idle agent asks whether it was halted, 1 s). ``key``
    (``AGENTWATCH_KEY``): the agent's key from ``agentwatch agent-key``; every event is then
    signed with it, on the sender thread. ``run_dir`` (``AGENTWATCH_RUN_DIR``): where the run
    file goes that lets a ``signal`` restart notifier prove this process is the agent's run.

    Nothing is sent until first use: the first ``heartbeat()`` or ``extend()`` sends ``start``
    and starts the sender thread. ``close()`` retires the agent (an ``exit`` with reason
    ``shutdown``). No method ever raises because of Redis or a bad argument.
    """

    def __init__(
        self,
        agent: str | None = None,
        *,
        redis_url: str | None = None,
        prefix: str | None = None,
        interval: float | None = None,
        pulse_interval: float | None = None,
        shards: int | None = None,
        maxlen: int | None = None,
        stack_factor: float | None = None,
        queue_size: int | None = None,
        queue_bytes: int | None = None,
        flush_interval: float | None = None,
        socket_timeout: float | None = None,
        on_halt: str | None = None,
        halt_interval: float | None = None,
        key: str | None = None,
        run_dir: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        explicit = {key: value for key, value in locals().items() if key in OPTIONS}
        self._setup()
        self._configure(explicit)
        _lifecycle.install_signals()  # now, if on the main thread: first use may be elsewhere

    @classmethod
    def _deferred(cls) -> Producer:
        """The module's default producer: configured from the environment on first use, so a
        program may still set ``AGENTWATCH_*`` variables after ``import producers``."""
        producer = cls.__new__(cls)
        producer._setup()
        producer._exports = True
        return producer

    def _setup(self) -> None:
        self._settings: Settings | None = None
        self._explicit: dict[str, Any] = {}
        self._exports = False
        """The default producer: leaves its arguments and run for multiprocessing children."""
        self._stream = ""
        self._lock = threading.RLock()
        self._pid = 0  # the process whose sender runs; anything else means "start (again)"
        self._closed = False
        self._exit_sent = False
        self._exit_fields: dict[str, Any] = {}
        self._run = ""
        self._parent_run: str | None = None
        self._sender: Sender | None = None
        self._queue: deque[dict[str, Any] | float] = deque()
        self._overflow = itertools.count()
        self._wake = Wakeup()
        self._cap = 0
        self._queue_bytes = 0
        self._wake_at = 0
        self._last_beat = _monotonic()
        self._work_thread = 0
        self._death: tuple[float, str, Outcome] | None = None  # (when, pulse note, outcome)
        self._halts: tuple[Halt, ...] = ()
        """Halts covering this agent, as the sender last read them (replaced whole, never edited)."""

    def _configure(self, explicit: dict[str, Any], settings: Settings | None = None) -> None:
        """(Re)configure; a closed or finished producer becomes usable again (``init()``)."""
        if settings is None:
            try:
                settings = resolve(**explicit)
            except Exception:
                internal_error("config")
                settings = resolve()
        self._settings = settings
        self._explicit = explicit
        self._stream = Keys(settings.prefix, settings.shards).events_for(settings.agent)
        self._closed = False
        self._exit_sent = False
        self._pid = 0

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            inherited, self._parent_run = inherited_from_parent()
            self._configure(inherited)
            assert self._settings is not None
        return self._settings

    # -- the hot path ----------------------------------------------------------------------
    def heartbeat(
        self,
        tokens: int | None = None,
        *,
        tokens_in: int | None = None,
        tokens_out: int | None = None,
        cost: float | None = None,
        model: str | None = None,
        fp: str | None = None,
        usage: object = None,
        **meta: Any,
    ) -> None:
        """Record one unit of work. Call it from the work loop itself, not from a side thread:
        a beat is the proof that the *loop* moves (pulses already prove the process lives).

        ``tokens``/``tokens_in``/``tokens_out`` and ``cost`` are what this unit of work used;
        ``usage`` takes an OpenAI or Anthropic usage object (or dict) instead; ``model`` names
        the model, ``fp`` fingerprints the work item (repeats mean a loop); other keywords are
        meta passed to detectors. Never blocks, never raises.
        """
        try:
            if self._pid != _PID and not self._begin():
                return
            now = _monotonic()
            event: dict[str, Any] | float
            if (
                tokens is None
                and tokens_in is None
                and tokens_out is None
                and cost is None
                and model is None
                and fp is None
                and usage is None
                and not meta
            ):
                # A bare beat travels as its timestamp: cheaper than a dict, and a float is no
                # GC container, so this call can never be the one that triggers a GC pass.
                event = now
                size = 0
            else:
                event = {"kind": "beat", "ts": now}
                size = add_work_fields(
                    event,
                    tokens=tokens,
                    tokens_in=tokens_in,
                    tokens_out=tokens_out,
                    cost=cost,
                    model=model,
                    fp=fp,
                    usage=usage,
                )
                if meta:
                    size += clean_meta(meta, event)
            self._last_beat = now
            self._work_thread = _get_ident()
            queue = self._queue
            if len(queue) < self._cap and (size <= HEAVY_EVENT or self._reserve(event, size)):  # type: ignore[arg-type]
                queue.append(event)
                queued = len(queue)
                # Wake the sender when a batch is ready, or when this is the first event for
                # a sender that sleeps until the next pulse (it set `idle` before checking the
                # queue; we appended before checking `idle`: one of us sees the other).
                if queued == self._wake_at or (queued == 1 and self._sender.idle):  # type: ignore[union-attr]
                    self._wake.set()
            else:
                next(self._overflow)
        except Exception:
            internal_error("heartbeat")
        if self._halts:  # the brake's only cost on the hot path: one attribute test
            self._halt_check()

    def _halt_check(self) -> None:
        halt = current(self._halts)
        if halt is not None and self.settings.on_halt == "raise":
            raise Halted(halt.reason, halt.pattern)

    def halted(self) -> str | None:
        """Why this agent is halted (``agentwatch halt``, a budget), or None while it may work.

        What the sender last read from Redis: within about a second of the halt (or resume).
        """
        halt = current(self._halts)
        return None if halt is None else halt.reason or "halted"

    def _set_halts(self, halts: tuple[Halt, ...]) -> None:
        """Called on the sender thread: one reference store, which the agent's thread reads."""
        self._halts = halts

    def _reserve(self, event: dict[Any, Any], size: int) -> bool:
        """Room in ``queue_bytes`` for a heavy beat? If so it is counted (the sender uncounts it
        when it takes the beat). No lock: the bound is approximate (threads beating one producer
        at once may each miss the other's bytes), which a memory cap can afford and the hot path
        cannot afford to pay for."""
        sender = self._sender
        assert sender is not None
        if sender.bytes_in - sender.bytes_out + size > self._queue_bytes:
            return False
        event[SIZE_KEY] = size
        sender.bytes_in += size
        return True

    # -- the rest of the API ---------------------------------------------------------------
    def extend(self, seconds: float) -> None:
        """Announce a long step: silence and stall detection wait ``seconds`` longer from now.

        Like systemd's ``EXTEND_TIMEOUT_USEC``: call it before a step you know will outlast the
        usual interval (a long download, a batch job); the next beat ends the extension.
        """
        try:
            value = amount("extend", seconds)
            if value is not None and value > MAX_SPAN_S:
                warn_once("arg:extend:cap", "agentwatch: extend(%s) is over 365 days; sent as %d s",
                          seconds, MAX_SPAN_S)  # fmt: skip
                value = MAX_SPAN_S
            if value is None or (self._pid != _PID and not self._begin()):
                return
            assert self._sender is not None
            self._sender.extends.append(value)
            self._sender.wake.set()
        except Exception:
            internal_error("extend")

    def close(self) -> None:
        """Retire the agent: send ``exit`` with reason ``shutdown`` and flush (at most 2 s).

        After ``close()`` the pipeline treats silence from this agent as expected, and further
        calls on this producer do nothing.
        """
        self._stop(Outcome("shutdown", 0))

    shutdown = close

    def _stop(self, outcome: Outcome) -> None:
        try:
            sender = self._finish(outcome)
            self._closed = True
            deadline = _monotonic() + EXIT_DEADLINE
            if sender is not None and not wait_done([sender], deadline):
                warn_once("close", "agentwatch: shutdown flush gave up after %.1fs",
                          EXIT_DEADLINE)  # fmt: skip
            _lifecycle.unregister(self)
            if self._exports:  # spawned workers of a retired run must not claim it as parent
                os.environ.pop(INHERIT_ENV, None)
        except Exception:
            internal_error("close")

    def _running(self) -> bool:
        """Started in this process and not finished."""
        return self._pid == _PID and not self._closed

    @property
    def agent(self) -> str:
        return self.settings.agent

    @property
    def run(self) -> str:
        """Id of the current process run ('' before the first use)."""
        return self._run

    def __enter__(self) -> Producer:
        if self._pid != _PID:
            self._begin()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """A clean exit (or ``sys.exit``) retires the agent; an exception reports it."""
        if exc is None or isinstance(exc, GeneratorExit | SystemExit):
            self.close()
        else:
            self._stop(Outcome.from_exception(exc, tb))

    def __repr__(self) -> str:
        return f"<Producer agent={self.settings.agent!r} run={self._run!r} stream={self._stream!r}>"

    # -- internals -------------------------------------------------------------------------
    def _begin(self) -> bool:
        """Start this run in this process: run id, ``start`` event, sender thread, hooks."""
        with self._lock:
            pid = os.getpid()
            if pid != _PID:  # forked by something that skipped os.register_at_fork hooks
                _refresh_pid()
            settings = self.settings
            if self._closed:
                warn_once("closed", "agentwatch: this producer was closed; further calls ignored")
                return False
            if self._pid == pid:
                return True
            if self._exit_sent:  # this run already said goodbye (process exit in progress)
                return False
            if self._pid != 0:  # forked by something that skipped os.register_at_fork hooks
                self._after_fork()
            self._run = os.urandom(8).hex()
            if self._exports:
                # Spawn and forkserver children re-import everything: this is how they learn
                # they are workers of this run, not a restart of the agent (also without init()).
                export_for_children(self._explicit, self._run)
            start = start_fields(settings.interval, pid, self._parent_run, settings.labels)
            halts = Keys(settings.prefix, settings.shards).halts_for(settings.agent)
            watch = HaltWatch(settings.agent, halts, settings.halt_interval, self._set_halts)
            sender = Sender(settings, self._stream, self._run, start, self._beat_info, halts=watch)
            try:
                sender.start()
            except RuntimeError as exc:  # no more threads, or the interpreter is shutting down
                # Carry on without a sender: events fill the bounded queue and overflow. Retrying
                # on every beat would put thread creation on the hot path.
                warn_once("thread", "agentwatch: cannot start the sender thread (%s); this run "
                          "reports nothing", exc)  # fmt: skip
            self._queue = sender.queue
            self._overflow = sender.overflow
            self._wake = sender.wake
            self._cap = settings.queue_size
            self._queue_bytes = settings.queue_bytes
            self._wake_at = sender.wake_at
            self._last_beat = _monotonic()
            self._work_thread = _get_ident()
            self._sender = sender
            _lifecycle.register(self)
            self._pid = pid
            return True

    def _beat_info(self) -> tuple[float, int, str | None]:
        death = self._current_death()
        return self._last_beat, self._work_thread, death[1] if death else None

    def _current_death(self) -> tuple[float, str, Outcome] | None:
        """The work thread's death, unless work resumed since (a new thread beat)."""
        death = self._death
        return death if death is not None and self._last_beat <= death[0] else None

    def _finish(self, outcome: Outcome) -> Sender | None:
        """Queue this run's ``exit`` (once); the sender to wait on (``done``), if any."""
        sender = self._sender
        if sender is None or self._closed:
            return None
        if self._exit_sent:
            # Already on its way (say, SIGTERM arrived during the atexit flush): the caller
            # still waits for that flush before the process goes. Queue it again (the first
            # one queued wins): the signal may have interrupted the first call before it did,
            # and then nothing would be flushed while the handler waits (Pool.terminate()'s
            # SIGTERM in a worker running its exit finalizer).
            sender.finish(self._exit_fields)
            return sender
        if self._pid != _PID:
            return None
        death = self._current_death()
        if outcome.reason == "exit" and death is not None:
            # The process ends normally, but this agent's work thread died of an exception:
            # that, not the clean exit, is what stopped the agent.
            outcome = Outcome("exception", outcome.code, death[2].error, death[2].traceback)
        fields = outcome.fields()
        fields["ts"] = _monotonic()
        self._exit_fields = fields  # before the flag: a nested call queues these
        self._exit_sent = True
        self._pid = -1  # later beats of this run are ignored: the exit must stay last
        sender.finish(fields)
        return sender

    def _thread_died(
        self,
        thread: threading.Thread,
        exc_type: type[BaseException],
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Called by ``threading.excepthook``: note it if the thread was our work thread."""
        if thread.ident != self._work_thread or self._pid != _PID:
            return
        error, text = exception_text(exc_type, exc, tb)
        header = f"Thread {thread.name!r} (the work thread) died of an uncaught exception:\n"
        note = trim_frames(header, [text], MAX_STACK_CHARS)
        self._death = (_monotonic(), note, Outcome("exception", 1, error, text))

    def _after_fork(self) -> None:
        """In a forked child: drop the parent's run, queue and thread; start afresh on use."""
        self._lock = threading.RLock()
        if self._run:
            self._parent_run = self._run
        self._pid = 0
        self._sender = None
        self._queue = deque()
        self._cap = 0
        self._exit_sent = False
        self._death = None
