"""How a process run ends, told to the pipeline as one ``exit`` event per producer.

Hooks are chained, never replaced in behaviour: the previous ``sys.excepthook`` and
``threading.excepthook`` still print their tracebacks, ``sys.exit`` still exits with its code,
and a default-handled SIGTERM/SIGHUP still kills the process *by that signal* (we restore the
default disposition and re-send the signal after flushing). Handlers a program installed itself
are left alone: wrapping them breaks identity checks such as asyncio's "is my SIGINT handler
still installed?", and a program that handles SIGTERM decides itself how it exits.

Signal handlers go in as early as possible: at ``import producers`` on the main thread (else at
``Producer()``/``init()``/first use there), because Python lets only the main thread install
them, and an agent whose work loop runs in a thread may never call the producer from the main
thread at all.

The exit flush has one deadline (:data:`EXIT_DEADLINE`) for all producers together, so a hung
Redis costs the exiting process at most that long. The exit code is worked out by
:mod:`producers._exitcode`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Final, NoReturn

from agentwatch.codec import MAX_COUNT
from producers import _exitcode, _lostsignals
from producers._guard import internal_error, logger
from producers._stack import exception_text
from producers._sync import wait_done

if TYPE_CHECKING:
    from producers._producer import Producer

EXIT_DEADLINE: Final = 2.0
_SIGNALS: Final = ("SIGTERM", "SIGHUP", "SIGINT")
"""Signals whose *default* action ends the process, reported as reason ``signal``. SIGHUP: the
terminal or SSH session closed. SIGINT normally has Python's own handler (KeyboardInterrupt,
reported from the exception); it is SIG_DFL only when the program or its parent set it so."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """Why the process (or one producer) stops: the ``exit`` event's fields."""

    reason: str
    code: int | None
    """``None``: the exit code cannot be known (see :mod:`producers._exitcode`); sent without."""
    error: str | None = None
    traceback: str | None = None

    @classmethod
    def from_exception(cls, exc: BaseException, tb: TracebackType | None = None) -> Outcome:
        """The outcome of an exception that ends the process (or a ``with Producer()`` block)."""
        if isinstance(exc, SystemExit):
            return cls("exit", _exitcode.as_exit_code(exc.code))
        if isinstance(exc, KeyboardInterrupt):  # what the default SIGINT handler raises
            return cls("signal", 128 + signal.SIGINT, "SIGINT")
        error, text = exception_text(type(exc), exc, tb or exc.__traceback__)
        return cls("exception", 1, error, text)

    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"kind": "exit", "reason": self.reason}
        if self.code is not None and -MAX_COUNT <= self.code <= MAX_COUNT:  # sys.exit(2**64): no
            fields["code"] = self.code
        if self.error is not None:
            fields["error"] = self.error
        if self.traceback is not None:
            fields["traceback"] = self.traceback
        return fields


_producers: dict[int, Producer] = {}
_installed = False
_signals_installed = False
_handling = False
"""A fatal signal's handler has started in this process (the lost-signal net stops re-sending)."""
_fork_masks: dict[int, set[int | signal.Signals]] = {}
"""Forking thread -> its signal mask before :func:`_before_fork` blocked our signals in it."""
_mp_hooked_pid = 0
_hooked_exc: BaseException | None = None
_previous_excepthook: Callable[..., Any] = sys.excepthook
_previous_thread_hook: Callable[[threading.ExceptHookArgs], Any] = threading.excepthook
_previous_exit: Callable[..., NoReturn] = sys.exit
_previous_handlers: dict[int, Any] = {}


def register(producer: Producer) -> None:
    """Track a started producer and make sure the process-wide hooks are in place."""
    _producers[id(producer)] = producer
    global _installed, _previous_excepthook, _previous_thread_hook, _previous_exit
    if not _installed:
        _installed = True
        atexit.register(_at_exit)
        # Chain whatever is installed *now*: the program may have set its own hooks already.
        _previous_excepthook, sys.excepthook = sys.excepthook, _excepthook
        _previous_thread_hook, threading.excepthook = threading.excepthook, _thread_excepthook
        _previous_exit, sys.exit = sys.exit, _sys_exit
    install_signals(begun=True)
    _exitcode.watch()
    _hook_multiprocessing_exit()


def _hook_multiprocessing_exit() -> None:
    """In a multiprocessing child, flush from multiprocessing's own exit finalizers.

    Pool and Process children end with ``os._exit()``, which skips ``atexit``; the finalizers
    run just before it. The registry is cleared in each new child, so register per process.
    """
    global _mp_hooked_pid
    pid = os.getpid()
    mp = sys.modules.get("multiprocessing")
    util = sys.modules.get("multiprocessing.util")
    if _mp_hooked_pid == pid or mp is None or util is None or mp.parent_process() is None:
        return
    _mp_hooked_pid = pid
    util.Finalize(None, _at_multiprocessing_exit, exitpriority=100)
    _lostsignals.install(_waiting)  # Pool.terminate() must end this worker: see there


def _in_multiprocessing_child() -> bool:
    """A ``multiprocessing`` child: started, or (spawn, forkserver) importing the main module."""
    process = sys.modules.get("multiprocessing.process")
    if process is None:
        return False
    current = process.current_process()
    return process.parent_process() is not None or bool(getattr(current, "_inheriting", False))


def _waiting(signum: int) -> bool:
    """Has fatal signal ``signum`` a handler of ours that has not started yet?"""
    return signum in _previous_handlers and not _handling and signal.getsignal(signum) is _on_fatal_signal


def _at_multiprocessing_exit() -> None:
    """Runs inside ``Process._bootstrap``'s ``finally``: an in-flight exception is the cause."""
    try:
        exc = sys.exc_info()[1]
        finish_all(Outcome("exit", 0) if exc is None else Outcome.from_exception(exc))
    except Exception:
        internal_error("multiprocessing exit")


def unregister(producer: Producer) -> None:
    _producers.pop(id(producer), None)


def finish_all(outcome: Outcome) -> None:
    """Send every live producer's exit event and wait for delivery, up to the deadline.

    Safe to call from a signal handler that interrupted anything, including itself: it takes
    no lock (see :class:`producers._sender.Wakeup`).
    """
    deadline = time.monotonic() + EXIT_DEADLINE
    senders = []
    for producer in list(_producers.values()):
        sender = producer._finish(outcome)
        if sender is not None:
            senders.append(sender)
    if senders and not wait_done(senders, deadline):
        logger.warning("agentwatch: exit flush gave up after %.1fs (Redis slow or hung)",
                       EXIT_DEADLINE)  # fmt: skip


def exit_outcome() -> Outcome:
    """The outcome of a process exit, judged at ``atexit`` time."""
    # Python stores an uncaught main-thread exception in sys.last_exc/last_value before calling
    # sys.excepthook; it is the only trace of it left once atexit handlers run. Our excepthook
    # covers embedders that call the hook without setting it. Either may be stale (an error an
    # IPython shell displayed, a hook called by hand): only one that left the main program counts.
    for exc in (_hooked_exc, getattr(sys, "last_exc", None), getattr(sys, "last_value", None)):
        if isinstance(exc, BaseException) and _exitcode.through_main(exc):
            return Outcome.from_exception(exc)
    return Outcome("exit", _exitcode.exit_code())


def _at_exit() -> None:
    try:
        finish_all(exit_outcome())
    except Exception:
        internal_error("atexit")


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    global _hooked_exc
    if threading.current_thread() is threading.main_thread():
        _hooked_exc = exc
    _previous_excepthook(exc_type, exc, tb)


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    try:
        thread = args.thread
        if thread is not None and args.exc_type is not SystemExit:
            for producer in list(_producers.values()):
                producer._thread_died(thread, args.exc_type, args.exc_value, args.exc_traceback)
    except Exception:
        internal_error("threading.excepthook")
    _previous_thread_hook(args)


def _sys_exit(status: object = None) -> NoReturn:
    """``sys.exit`` that remembers the code: atexit handlers cannot see it otherwise."""
    _exitcode.requested(status)
    _previous_exit(status)


def install_signals(*, begun: bool = False) -> None:
    """Report default-handled fatal signals (see :data:`_SIGNALS`); once, on the main thread.

    Only handlers still at ``SIG_DFL`` are taken over; ignored signals and a program's own
    handlers stay as they are. In a ``multiprocessing`` worker only once its run ``begun``
    (not at import or ``init()``): before, it has nothing to report, and ``Pool.terminate()``
    must be able to end it (see :func:`_release_signals`).
    """
    global _signals_installed
    if _signals_installed or threading.current_thread() is not threading.main_thread():
        return
    if not begun and _in_multiprocessing_child():
        return
    _signals_installed = True
    for name in _SIGNALS:
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        try:
            current = signal.getsignal(signum)
            if current is signal.SIG_DFL:
                _previous_handlers[signum] = current
                signal.signal(signum, _on_fatal_signal)
        except (ValueError, OSError):  # not the main interpreter, or an unusual platform
            pass


def _on_fatal_signal(signum: int, frame: FrameType | None) -> None:
    """A signal whose default action is to terminate: report, then die by it as before."""
    if signal.getsignal(signum) is not _on_fatal_signal:
        # A handler installed after ours called us as "the previous handler". Without us it
        # would have found SIG_DFL, which it cannot call: it decides how the process ends.
        return
    global _handling
    _handling = True
    try:
        name = signal.Signals(signum).name
        finish_all(Outcome("signal", 128 + signum, name))
    except Exception:
        internal_error("signal")
    finally:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _release_signals() -> None:
    """In a forked child: give the signals we took back their default action, until a run
    begins in this process (:func:`register` takes them again, on the main thread).

    Until then the child has nothing to report, and a Python-level handler only makes its death
    unreliable: CPython runs it later, on the main thread, when a blocking call returns EINTR.
    A ``multiprocessing`` pool worker waiting for a task sits in ``sem_wait`` on the queue's
    lock; when ``Pool.terminate()`` wakes it (a sibling released the lock, the parent took it)
    and its SIGTERM lands before it runs again, glibc goes back to waiting without EINTR, the
    handler never runs, and the parent's ``terminate()`` waits for that worker forever. With
    the default action the kernel ends it, as ``multiprocessing`` expects.
    """
    global _signals_installed
    _signals_installed = False
    for signum in list(_previous_handlers):
        try:
            if signal.getsignal(signum) is _on_fatal_signal:
                signal.signal(signum, signal.SIG_DFL)
        except (ValueError, OSError):  # not the main thread (cannot be, after fork): keep it
            _signals_installed = True
            return
        del _previous_handlers[signum]


def _before_fork() -> None:
    """Block our signals in the forking thread, so that the child starts with them blocked.

    A signal that reaches a child before its after-fork hooks ran would find our handler, and
    CPython discards what arrived until then (``_PySignal_AfterFork``): ``Pool.terminate()``
    right after the pool forked a worker killed nothing, and waited for that worker for ever.
    Blocked, such a signal waits in the child until :func:`_release_signals` gave it its
    default action, and then ends the child. In the parent, only the forking thread blocks it
    for the moment of the fork; another thread takes it meanwhile.
    """
    ours = [signum for signum in _previous_handlers if signal.getsignal(signum) is _on_fatal_signal]
    if ours:
        with contextlib.suppress(ValueError, OSError):
            _fork_masks[threading.get_ident()] = signal.pthread_sigmask(signal.SIG_BLOCK, ours)


def _restore_fork_mask() -> None:
    """After the fork, in the parent and (after :func:`_release_signals`) in the child."""
    mask = _fork_masks.pop(threading.get_ident(), None)
    if mask is not None:
        with contextlib.suppress(ValueError, OSError):
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _after_fork_in_child() -> None:
    """A forked child is a new run: forget the parent's outcome, reset every producer."""
    global _hooked_exc, _handling
    _exitcode.forget()
    _hooked_exc = None
    _handling = False
    _lostsignals.after_fork_in_child()
    _release_signals()
    _restore_fork_mask()  # after the release: a SIGTERM waiting here now ends the child
    for producer in list(_producers.values()):
        producer._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_restore_fork_mask,
                        after_in_child=_after_fork_in_child)  # fmt: skip
