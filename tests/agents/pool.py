"""A multiprocessing agent: ``python pool.py fork|spawn|forkserver``; prints how many workers ran.

The parent calls ``init()``; workers only call ``heartbeat()``. Forked workers inherit the
producer, spawned ones its ``init()`` arguments; either way each worker is its own run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

import producers


def task(n: int) -> int:
    producers.heartbeat(tokens=n)
    producers.heartbeat(tokens=n)
    return os.getpid()


if __name__ == "__main__":
    producers.init(agent="mp-agent", pulse_interval=60)
    producers.heartbeat(tokens=0)
    with mp.get_context(sys.argv[1]).Pool(2) as pool:
        pids = set(pool.map(task, range(1, 9), chunksize=1))
    print(len(pids))
