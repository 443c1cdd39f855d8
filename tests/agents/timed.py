"""Measures what the producer costs the agent, wherever Redis is; prints one JSON line.

1. Loop rate: ``AW_RATE_S`` seconds of ``time.sleep(0.001)`` without heartbeat and as long with
   ``heartbeat()`` in the loop, in ten alternating slices (a loaded box that slows down for a
   moment slows both, not just one).
2. Call latency and memory: ``AW_CALLS`` back-to-back ``heartbeat()`` calls, each timed.
The last line printed is ``{"end": <monotonic time just before the interpreter exits>}``.
"""

from __future__ import annotations

import json
import os
import time

import producers
from producers import heartbeat

RATE_S = float(os.environ.get("AW_RATE_S", "0.5"))
CALLS = int(os.environ.get("AW_CALLS", "100000"))


def rss() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


SLICES = 10


def loop_rate(beat: bool) -> int:
    iterations = 0
    end = time.monotonic() + RATE_S / SLICES
    while time.monotonic() < end:
        if beat:
            heartbeat(tokens=1)
        time.sleep(0.001)
        iterations += 1
    return iterations


def main() -> None:
    producer = producers.init()
    without = with_beats = 0
    for _ in range(SLICES):
        without += loop_rate(beat=False)
        with_beats += loop_rate(beat=True)
    rss_before = rss()
    clock = time.perf_counter_ns
    durations = [0] * CALLS
    max_queue = 0
    for index in range(CALLS):
        start = clock()
        heartbeat(tokens=index)
        durations[index] = clock() - start
        if index % 1000 == 0:
            max_queue = max(max_queue, len(producer._queue))
    durations.sort()
    print(
        json.dumps(
            {
                "rate_without": without,
                "rate_with": with_beats,
                "median_ns": durations[CALLS // 2],
                "p99_ns": durations[CALLS * 99 // 100],
                "max_ns": durations[-1],
                "max_queue": max_queue,
                "queue_size": producer.settings.queue_size,
                "rss_growth": rss() - rss_before,
            }
        ),
        flush=True,
    )
    print(json.dumps({"end": time.monotonic()}), flush=True)


if __name__ == "__main__":
    main()
