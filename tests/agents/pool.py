"""A multiprocessing agent: ``python pool.py fork|spawn|forkserver [noinit]``; prints how many
workers ran.

The parent calls ``init()`` (unless ``noinit``: then it only beats, configured from the
environment); workers only call ``heartbeat()``. Forked workers inherit the producer, spawned
ones its arguments and run id; either way each worker is its own run, a child of the parent's.
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
    if sys.argv[2:] != ["noinit"]:
        producers.init(agent="mp-agent", pulse_interval=60)
    producers.heartbeat(tokens=0)
    with mp.get_context(sys.argv[1]).Pool(2) as pool:
        pids = set(pool.map(task, range(1, 9), chunksize=1))
    print(len(pids))
