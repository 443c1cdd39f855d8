"""Run files: how a restart notifier proves that a pid is the agent's run before it signals it.

An event's ``pid`` is only a claim: anyone who can write the events stream can name any pid (the
issue's audit had a forged ``start`` + ``exit`` make a ``signal = "SIGTERM"`` notifier kill an
unrelated ``sleep``). So the producer also leaves a file only the agent's own user can create:
``<run dir>/<run>.pid``, holding the agent, run, pid and the process's start time as the kernel
counts it (``/proc/<pid>/stat`` field 22, clock ticks since boot; the producer reports it in
``start`` as ``pid_start`` too). The notifier signals only when all of these agree:

* the file is a regular file (no symlink) in the run dir, not writable by others;
* it names the alert's agent and run, and the pid and start time the agent reported;
* the process with that pid runs as the file's owner and started at that very tick (a pid reused
  by another process has another start time);

and it signals through a pidfd opened *before* the last check, so the process checked is the
process signalled. Whoever cannot write files as the agent's user cannot aim the signal, and one
who can could signal that user's processes anyway.

Standard library only: the producer imports this. Linux only (``/proc``); elsewhere the producer
writes no file and the notifier refuses to signal, saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

DEFAULT_DIR: Final = "/tmp/agentwatch-runs"
"""Where producers leave run files unless told otherwise (``AGENTWATCH_RUN_DIR``): one place every
user can write (mode 1777, like /tmp itself), and every file in it is judged by its owner."""
_RUN_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SWEEP_MAX: Final = 100
"""Entries a process looks at when it sweeps: stale files go a hundred per agent start, and a
process hosting many producers (one file each) sweeps once, not once per producer."""
_swept: set[str] = set()


class NotProven(Exception):
    """The pid could not be proven to be the agent's run; the message says what failed."""


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot, or None (gone, or no /proc)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # Field 2 (the command) is in parentheses and may hold spaces or ')': split after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall: starttime
    except (IndexError, ValueError):
        return None


def path_for(run_dir: str, run: str) -> Path | None:
    """The run file of ``run``, or None when the run id is not safe as a file name."""
    return Path(run_dir) / f"{run}.pid" if _RUN_RE.fullmatch(run) else None


def write(run_dir: str, record: dict[str, Any], *, sweep: bool = True) -> Path | None:
    """Leave this run's file (best effort: a monitor never breaks its agent over a file).

    ``sweep``: also sweep the directory now (once per process); the producer passes False and
    takes :func:`sweeper`'s steps itself, a few at a time.
    """
    path = path_for(run_dir, str(record.get("run", "")))
    if path is None or record.get("pid_start") is None:
        return None
    try:
        directory = Path(run_dir)
        if not directory.is_dir():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o1777)  # mkdir's mode is cut by the umask
        if sweep:
            for _ in sweeper(run_dir):
                pass
        # Written whole under a private name, then linked into place: a reader (the notifier,
        # a sweep) never sees a half-written file, and the link, like O_EXCL, never replaces
        # what is already there (a symlink planted under the run's name included).
        temp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(record, out)
            os.link(temp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        return path
    except OSError:
        return None


def remove(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def sweeper(run_dir: str) -> Iterator[None]:
    """This process's one sweep of ``run_dir``, one entry per step (nothing if it was claimed).

    Removes this user's run files whose process is gone (agents killed by SIGKILL leave them).
    Stepwise because the producer's sender thread does it while the agent's thread runs: a
    sweep of a hundred files is ~100 file reads, during which that thread holds the GIL and the
    agent's waits (up to a 5 ms switch interval at a time), ``heartbeat()`` included. One entry
    per step of the sender costs the agent nothing it could notice.
    """
    if run_dir in _swept:
        return
    _swept.add(run_dir)
    uid = os.getuid()
    try:
        with os.scandir(run_dir) as entries:
            paths = [entry.path for _, entry in zip(range(_SWEEP_MAX), entries, strict=False)
                     if entry.name.endswith(".pid")]  # fmt: skip
    except OSError:
        return
    for path in paths:
        _sweep_one(path, uid)
        yield


def _sweep_one(path: str, uid: int) -> None:
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != uid:
            return
        record = json.loads(Path(path).read_text())
        if process_start(int(record["pid"])) != record.get("pid_start"):
            os.unlink(path)
    except (OSError, ValueError, KeyError, TypeError):
        return


def send_signal(run_dir: str, *, agent: str, run: str, pid: int, pid_start: int | None, signum: int) -> None:
    """Signal ``pid`` once it is proven to be ``agent``'s run ``run``; :class:`NotProven` if not."""
    if not run:
        raise NotProven("the agent's run is unknown (no start event of it was seen)")
    path = path_for(run_dir, run)
    if path is None:
        raise NotProven(f"run id {run[:70]!r} cannot name a run file")
    record, owner = _read(path)
    claims = {"agent": agent, "run": run, "pid": pid}
    for name, value in claims.items():
        if record.get(name) != value:
            raise NotProven(
                f"the run file {path} says {name} {record.get(name)!r}, the agent's start {value!r}"
            )
    if pid_start is not None and record.get("pid_start") != pid_start:
        raise NotProven(f"the run file {path} and the agent's start disagree on when pid {pid} started")
    try:
        handle = os.pidfd_open(pid)  # from here on, this very process, whatever happens to the pid
    except ProcessLookupError:
        raise NotProven(f"pid {pid} is gone") from None
    except (AttributeError, OSError):
        handle = None  # no pidfd (old kernel): the checks below, then kill() by pid
    try:
        started = process_start(pid)
        if started is None or started != record.get("pid_start"):
            raise NotProven(f"pid {pid} is another process now (it started at tick {started}, the agent's "
                            f"run at {record.get('pid_start')})")  # fmt: skip
        try:
            runs_as = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            raise NotProven(f"pid {pid} is gone") from None
        if runs_as != owner:
            raise NotProven(f"pid {pid} runs as uid {runs_as}, the run file belongs to uid {owner}")
        if handle is not None:
            signal.pidfd_send_signal(handle, signum)
        else:
            os.kill(pid, signum)
    finally:
        if handle is not None:
            os.close(handle)


def _read(path: Path) -> tuple[dict[str, Any], int]:
    """The run file's record and owner uid, read without following a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotProven(f"no run file {path}: the agent's producer did not write one (AGENTWATCH_RUN_DIR "
                        "differs, or another host or container)") from None  # fmt: skip
    except OSError as exc:
        raise NotProven(f"cannot open the run file {path} ({exc.strerror}; a symlink?)") from None
    with os.fdopen(fd) as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise NotProven(f"{path} is not a regular file")
        if info.st_mode & 0o022:
            raise NotProven(f"{path} is writable by others than its owner")
        try:
            record = json.loads(handle.read(4096))
        except ValueError:
            raise NotProven(f"{path} is not a run file") from None
    if not isinstance(record, dict):
        raise NotProven(f"{path} is not a run file")
    return record, info.st_uid
