"""An agent that beats at a steady pace and times its own ``heartbeat()`` calls, until SIGUSR1.

Configured from ``AGENTWATCH_*`` and: ``AW_INIT`` (JSON keyword arguments for ``init()``),
``AW_PERIOD`` (seconds between beats, default 0.002). Every 10th beat it prints the count of
beats so far (for :class:`agents.testkit.Echo`). On SIGUSR1 it stops, prints one JSON line of
statistics over every call (median, p99 and max in ns, RSS growth since the first beat, beats)
and then ``{"end": <monotonic time just before returning>}``, and returns normally: what is left
is the interpreter's exit, with the producer's exit flush.
"""

from __future__ import annotations

import json
import os
import signal
import time

import producers
from producers import heartbeat

PERIOD = float(os.environ.get("AW_PERIOD", "0.002"))
stopping = False


def rss() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def on_usr1(signum: int, frame: object) -> None:
    global stopping
    stopping = True


def main() -> None:
    signal.signal(signal.SIGUSR1, on_usr1)
    producers.init(**json.loads(os.environ.get("AW_INIT", "{}")))
    clock = time.perf_counter_ns
    durations: list[int] = []
    rss_start = rss()
    while not stopping:
        start = clock()
        heartbeat(tokens=len(durations))
        durations.append(clock() - start)
        if len(durations) % 10 == 0:
            print(len(durations), flush=True)
        time.sleep(PERIOD)
    rss_growth = rss() - rss_start
    ordered = sorted(durations)
    stats = {
        "beats": len(durations),
        "median_ns": ordered[len(ordered) // 2],
        "p99_ns": ordered[len(ordered) * 99 // 100],
        "max_ns": ordered[-1],
        "rss_growth": rss_growth,
    }
    print(json.dumps(stats), flush=True)
    print(json.dumps({"end": time.monotonic()}), flush=True)


if __name__ == "__main__":
    main()
