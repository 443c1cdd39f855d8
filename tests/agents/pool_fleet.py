"""A pool agent for the child-run tests: ``python pool_fleet.py <start method> <mode> <dir>``.

The parent (agent ``pool-agent``) beats every 50 ms with 10 tokens. Modes:

* ``map`` - 8 tasks of 4 beats x 100 tokens each in a Pool(2), then the pool is closed and joined
  and the agent shuts down (writes ``done``);
* ``busy`` - one long task that beats until killed (its pid goes to ``<dir>/worker``), while the
  parent keeps beating until ``<dir>/stop`` exists, then terminates the pool and shuts down;
* ``runaway`` - the parent beats 30 times at 100 tokens, then one task beats once with 40,000;
* ``pools`` - 40 times ``with Pool(3) as pool: pool.map(...)`` of 6 one-beat tasks: the ``with``
  ends in ``Pool.terminate()``, which SIGTERMs workers still starting up or waiting for a task.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import producers


def small(n: int) -> int:
    for _ in range(4):
        producers.heartbeat(tokens=100)
    return os.getpid()


def busy(where: str) -> None:
    Path(where, "worker").write_text(str(os.getpid()))
    for _ in range(1200):
        producers.heartbeat(tokens=5)
        time.sleep(0.05)


def tiny(_n: int) -> None:
    producers.heartbeat(tokens=1)


def runaway(_n: int) -> None:
    producers.heartbeat(tokens=40_000)


def main() -> None:
    method, mode, where = sys.argv[1:4]
    producers.init(agent="pool-agent", interval=0.2, pulse_interval=0.2)
    producers.heartbeat(tokens=10)
    if mode == "pools":
        for _ in range(40):
            with mp.get_context(method).Pool(3) as pools:
                pools.map(tiny, range(6), chunksize=1)
        producers.shutdown()
        Path(where, "done").write_text("1")
        return
    pool = mp.get_context(method).Pool(2)
    if mode == "map":
        pool.map(small, range(8), chunksize=1)
        pool.close()
        pool.join()
    elif mode == "busy":
        pool.apply_async(busy, (where,))
        while not Path(where, "stop").exists():
            producers.heartbeat(tokens=10)
            time.sleep(0.05)
        pool.terminate()
        pool.join()
    else:
        for _ in range(30):
            producers.heartbeat(tokens=100)
            time.sleep(0.02)
        pool.apply(runaway, (0,))
        time.sleep(0.5)
        pool.close()
        pool.join()
    producers.shutdown()
    Path(where, "done").write_text("1")


if __name__ == "__main__":
    main()
