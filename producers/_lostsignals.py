"""A safety net for fatal signals the main thread of a ``multiprocessing`` worker never sees.

CPython runs a Python-level signal handler later, on the main thread: at its next bytecode, or
when a blocking call there returns EINTR. A wait that swallows the signal never returns. glibc's
``sem_wait``, woken by a post that another process then wins, retries in user space, and a signal
delivered at that moment interrupts nothing: the handler is never run. ``Pool.terminate()``
makes exactly that moment. It puts stop sentinels in the task queue, takes the queue's lock
itself, and sends SIGTERM to the workers still waiting for that lock, which it has just woken.
A worker that runs the exit handler (:mod:`producers._lifecycle`) then waits for the lock for
ever, and so does ``terminate()``, waiting for the worker. With ``with Pool(...)``, which calls
``terminate()``, a pool agent hung about once in 30 pools on a loaded machine.

The net: a wakeup fd, which CPython's C-level handler writes the signal number to at once, read
by a daemon thread. For a fatal signal whose handler has not started within a moment, it sends
the signal to the main thread again, until the handler starts. A new signal that reaches the
main thread inside the kernel's wait interrupts it (EINTR), and the handler runs.

Only in ``multiprocessing`` children whose run began (the processes ``Pool`` terminates), and
only if the program has no wakeup fd of its own (asyncio sets one): then it is left alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Final

KICK_EVERY: Final = 0.05
"""Seconds between two re-sends: enough for a woken main thread to start the handler."""
KICK_FOR: Final = 5.0
"""Re-sends stop after this long (the handler's flush takes at most 2 s once it runs)."""

_pid = 0
_fds: tuple[int, int] | None = None


def install(waiting: Callable[[int], bool]) -> None:
    """Watch this process's signals (once per process, on the main thread).

    ``waiting(signum)``: is a fatal signal's handler still installed and not yet started?
    """
    global _pid, _fds
    pid = os.getpid()
    if _pid == pid or threading.current_thread() is not threading.main_thread():
        return
    _pid = pid
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (ValueError, OSError):
        _close(read_fd, write_fd)
        return
    if previous != -1:  # the program's own (asyncio): put it back, no net
        signal.set_wakeup_fd(previous)
        _close(read_fd, write_fd)
        return
    main = threading.main_thread().ident
    assert main is not None
    watcher = threading.Thread(target=_watch, args=(read_fd, main, waiting), daemon=True,
                               name="agentwatch-signals")  # fmt: skip
    try:
        watcher.start()
    except RuntimeError:  # no more threads: no net
        signal.set_wakeup_fd(-1)
        _close(read_fd, write_fd)
        return
    _fds = (read_fd, write_fd)


def after_fork_in_child() -> None:
    """The wakeup fd is the parent's pipe, read by the parent's watcher: not ours to write."""
    global _pid, _fds
    if _fds is None:
        return
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    _close(*_fds)
    _pid, _fds = 0, None


def _watch(read_fd: int, main: int, waiting: Callable[[int], bool]) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        fatal = [signum for signum in data if waiting(signum)]
        if fatal:
            _kick(main, fatal[0], waiting)


def _kick(main: int, signum: int, waiting: Callable[[int], bool]) -> None:
    """Send ``signum`` to the main thread again until its handler starts (or a bound)."""
    end = time.monotonic() + KICK_FOR
    while time.monotonic() < end:
        time.sleep(KICK_EVERY)
        if not waiting(signum):
            return
        try:
            signal.pthread_kill(main, signum)
        except OSError:  # the main thread is gone: the process is ending anyway
            return


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
