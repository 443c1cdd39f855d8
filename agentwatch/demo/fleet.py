"""The demo's moving parts besides the pipeline: agent processes and a server that never answers.

Agents are started like the pipeline's workers (agentwatch/supervisor.py): each in its own
session, so a terminal's Ctrl-C reaches only the demo, which then stops everything in order;
and each dies with the demo even if the demo itself is SIGKILLed (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agentwatch.demo.plan import Role
from agentwatch.embedded import die_with_parent
from agentwatch.supervisor import stop_processes


@dataclass(frozen=True)
class Line:
    """One line an agent printed, stamped when the demo read it."""

    agent: str
    text: str
    at: float  # time.monotonic()


class Fleet:
    """Starts the demo's agents, relays what they print, signals and stops them."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.lines: queue.Queue[Line] = queue.Queue()
        self._readers: list[threading.Thread] = []

    def start(self, role: Role, **extra: str) -> None:
        env = {**self.env, "AGENTWATCH_AGENT": role.agent, "AW_DEMO_RATE": str(role.rate), **extra}
        log = (self.log_dir / f"{role.agent}.log").open("w")
        with log:  # the child holds its own copy of the descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", "agentwatch.demo.agents", role.role],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - prctl must run in the child
            )
        self.procs[role.agent] = proc
        reader = threading.Thread(target=self._relay, args=(role.agent, proc), daemon=True)
        reader.start()
        self._readers.append(reader)

    def _relay(self, agent: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for text in proc.stdout:
            self.lines.put(Line(agent, text.strip(), time.monotonic()))

    def signal(self, agent: str, signum: int) -> None:
        proc = self.procs[agent]
        if proc.poll() is None:
            proc.send_signal(signum)

    def exited(self) -> dict[str, int]:
        """Agents that are no longer running, with their exit codes."""
        return {name: code for name, proc in self.procs.items() if (code := proc.poll()) is not None}

    def log_tail(self, agent: str, lines: int = 5) -> str:
        try:
            text = (self.log_dir / f"{agent}.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout_s: float = 3.0) -> None:
        """SIGTERM (each agent shuts down cleanly), then SIGKILL what is left after the timeout."""
        stop_processes(self.procs.values(), timeout_s)
        for reader in self._readers:
            reader.join(1.0)
        for proc in self.procs.values():
            if proc.stdout is not None:
                proc.stdout.close()


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and never says a word.

    The classic stall: a socket call with no timeout waiting on a peer that will never answer.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # so the accept loop notices stop()
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)

    @property
    def address(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"{host}:{port}"

    def start(self) -> SilentServer:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)  # kept open and unread: the caller waits forever

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
        for conn in [*self._held, self._listener]:
            with contextlib.suppress(OSError):
                conn.close()


def clean_env() -> dict[str, str]:
    """The demo's environment minus any agentwatch settings of the user's: the demo uses only
    its own private server and pipeline, whatever the shell says."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("AGENTWATCH_", "_AGENTWATCH_", "AW_DEMO_"))
    }
