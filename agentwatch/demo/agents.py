"""The demo's agents: real processes that embed the producer exactly as a user's agent would.

``python -m agentwatch.demo.agents ROLE``. The code ships inside the package (not in examples/)
so ``agentwatch demo`` works after ``pip install``, and it imports nothing but the standard
library and :mod:`producers`, as a real agent would. Every setting comes from the environment:
the producer's own ``AGENTWATCH_*`` variables, and these:

=======================  ==================================================================
``AW_DEMO_RATE``         normal token use, tokens per minute (jittered +-30%)
``AW_DEMO_READY``        beats before the agent says ``ready`` (the tokens detector's warm-up)
``AW_DEMO_LEAK_MB``      ``leaky``: MB allocated per beat...
``AW_DEMO_LEAK_TO_MB``   ...until this much is held
``AW_DEMO_RUNAWAY_RATE`` ``runaway``: tokens per minute once told to fail
``AW_DEMO_SERVER``       ``stuck``: host:port of the server that accepts and never answers
``AW_DEMO_MODEL``        the model every beat names (the pipeline prices its tokens)
=======================  ==================================================================

Roles: ``healthy`` beats forever; ``leaky`` also holds more memory every beat (really
allocated and touched, so it is resident) until the demo SIGKILLs it, as the OOM killer would;
``stuck`` and ``runaway`` behave until SIGUSR1, then block in ``recv()`` or burn tokens, until
its budget halts it: ``heartbeat()`` raises ``producers.Halted``, and it stops as a real agent
should (says ``halted <reason>``, shuts down).

The demo and its agents talk only through signals (SIGUSR1: fail now, SIGTERM: shut down
cleanly) and lines on stdout (``ready``, ``rss <bytes>``, ``peak <bytes>``, ``failing``), so
nothing but the producer touches Redis.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import sys
import time

import producers
from producers import Halted, heartbeat

INTERVAL = float(os.environ.get("AGENTWATCH_INTERVAL", "1"))
PULSE = float(os.environ.get("AGENTWATCH_PULSE_INTERVAL", "0.5"))
RATE = float(os.environ.get("AW_DEMO_RATE", "200"))
READY = int(os.environ.get("AW_DEMO_READY", "10"))
MODEL = os.environ.get("AW_DEMO_MODEL", "claude-opus-4-1")

rng = random.Random(os.getpid())
failing = False  # set by SIGUSR1
stopping = False  # set by SIGTERM
blocking = False  # inside a call that only an exception can interrupt


class Stop(Exception):
    """Raised by the SIGTERM handler to leave a call that would never return by itself."""


def on_usr1(_signum: int, _frame: object) -> None:
    global failing
    failing = True


def on_term(_signum: int, _frame: object) -> None:
    global stopping
    stopping = True
    if blocking:
        raise Stop


def say(line: str) -> None:
    print(line, flush=True)


def tokens_for(per_minute: float) -> int:
    """One beat's share of ``per_minute``, jittered; rounded at random so small rates average right."""
    share = per_minute * INTERVAL / 60 * rng.uniform(0.7, 1.3)
    whole = int(share)
    return whole + (1 if rng.random() < share - whole else 0)


def rss() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hoard(megabytes: int) -> bytearray:
    """Memory that counts: one byte written per page, so every page is resident."""
    block = bytearray(megabytes << 20)
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))
    return block


def fetch_reply(address: tuple[str, int]) -> bytes:
    """Ask the model server for a completion, with no timeout: the bug the stall alert points at."""
    global blocking
    with socket.create_connection(address) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: demo\r\nContent-Length: 0\r\n\r\n")
        blocking = True
        try:
            if stopping:  # SIGTERM came before we blocked: its handler could not interrupt us
                raise Stop
            return conn.recv(4096)  # the server accepted and never answers: this never returns
        finally:
            blocking = False


def run(role: str) -> None:
    held: list[bytearray] = []
    leak_mb = int(os.environ.get("AW_DEMO_LEAK_MB", "15"))
    leak_to_mb = int(os.environ.get("AW_DEMO_LEAK_TO_MB", "150"))
    runaway_rate = float(os.environ.get("AW_DEMO_RUNAWAY_RATE", "40000"))
    beats, peak_at, told = 0, 0.0, False
    while not stopping:
        if failing and not told:
            say("failing")
            told = True
        if failing and role == "stuck":
            host, port = os.environ["AW_DEMO_SERVER"].rsplit(":", 1)
            fetch_reply((host, int(port)))
            return  # only when the server goes away: the demo is ending
        used = tokens_for(runaway_rate if failing and role == "runaway" else RATE)
        try:
            heartbeat(tokens_in=used - used // 4, tokens_out=used // 4, model=MODEL)
        except Halted as halt:  # the brake: finish the item (done), save (nothing here), stop
            say(f"halted {halt.reason}")
            return
        beats += 1
        if role == "leaky":
            if beats == 1:
                say(f"rss {rss()}")
            if len(held) * leak_mb < leak_to_mb:
                held.append(hoard(leak_mb))
                peak_at = time.monotonic()
            # Announced once pulses have had time to carry it: the silence alert can only blame
            # memory it has seen.
            elif peak_at and time.monotonic() - peak_at >= 3 * PULSE:
                say(f"peak {rss()}")
                peak_at = 0.0
        if beats == READY:
            say("ready")
        time.sleep(INTERVAL)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in {"healthy", "leaky", "stuck", "runaway"}:
        print("usage: python -m agentwatch.demo.agents healthy|leaky|stuck|runaway", file=sys.stderr)
        return 2
    # Our own handlers, installed before the producer starts, so it leaves them alone and a
    # SIGTERM from the demo ends in a deliberate shutdown (no exit alert) rather than a kill.
    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGTERM, on_term)
    with contextlib.suppress(Stop):
        run(argv[1])
    producers.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
