"""A real agent process for the detector end-to-end tests: ``python agent.py MODE``.

Configured only through ``AGENTWATCH_*`` variables, beating every ``AGENTWATCH_INTERVAL``
seconds (or every ``AW_PACE`` seconds when set: faster than the declared interval, as an agent
may) with a few hundred tokens per beat (+-30%). ``AW_WARMUP`` normal beats (default 10) come
first; then MODE:

steady    keep beating normally until killed
leak      keep beating while RSS climbs by ``AW_LEAK_MB`` per beat up to ``AW_LEAK_TO_MB``,
          then SIGKILL itself (what the OOM killer does) once a pulse has carried the RSS
hang      block in fetch_from_api() on an HTTP server that accepts and never answers
          (``AW_HANG_URL``) until the ``AW_HANG_TIMEOUT`` socket timeout, then beat normally
loop      retry one work item (the same fp) ``AW_LOOP`` times at 30x the usual tokens, then
          beat normally (varied fps), then shut down
crash     an uncaught ValueError from run_job()
shutdown  producers.shutdown() and return
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import time
import urllib.request

import producers
from producers import heartbeat

INTERVAL = float(os.environ.get("AW_PACE") or os.environ.get("AGENTWATCH_INTERVAL", "0.1"))
PULSE = float(os.environ.get("AGENTWATCH_PULSE_INTERVAL", "0.1"))
WARMUP = int(os.environ.get("AW_WARMUP", "10"))
rng = random.Random(os.getpid())
item = 0


def work(tokens: int = 300, fp: str | None = None) -> None:
    global item
    item += 1
    heartbeat(tokens=int(tokens * rng.uniform(0.7, 1.3)), fp=fp or f"item-{item}", model="gpt-x")
    time.sleep(INTERVAL)


def fetch_from_api(url: str) -> bytes:
    timeout = float(os.environ.get("AW_HANG_TIMEOUT", "3"))
    with urllib.request.urlopen(url, timeout=timeout) as response:  # the server never answers
        return bytes(response.read())


def run_job() -> None:
    raise ValueError("boom in run_job")


def main(mode: str) -> None:
    for _ in range(WARMUP):
        work()
    if mode == "steady":
        while True:
            work()
    elif mode == "leak":
        hoard: list[bytearray] = []
        step_mb, top_mb = int(os.environ.get("AW_LEAK_MB", "25")), int(os.environ.get("AW_LEAK_TO_MB", "300"))
        while len(hoard) * step_mb < top_mb:
            hoard.append(bytearray(b"x" * (step_mb << 20)))  # touched: resident, not just reserved
            work()
        time.sleep(3 * PULSE)  # let a pulse carry the final RSS
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "hang":
        with contextlib.suppress(OSError):  # timed out at last: back to work
            fetch_from_api(os.environ["AW_HANG_URL"])
        while True:
            work()
    elif mode == "loop":
        for _ in range(int(os.environ.get("AW_LOOP", "200"))):
            heartbeat(tokens=9000, fp="ticket-4711")  # the same item again, and again
            time.sleep(0.005)
        for _ in range(10):
            work()
        producers.shutdown()
    elif mode == "crash":
        run_job()
    elif mode == "shutdown":
        producers.shutdown()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1])
