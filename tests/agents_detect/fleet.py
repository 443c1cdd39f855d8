"""A process running a slice of a healthy fleet with the real producer:
``python fleet.py FIRST COUNT SECONDS``.

``COUNT`` agents (``fleet-<FIRST>`` ...), each a :class:`producers.Producer` of its own (its own
run, sender thread and connection), configured from ``AGENTWATCH_*`` (URL, prefix, interval,
pulse interval). One work loop drives them all, as a process hosting several agents would:
each beats every interval +-30%, with a few hundred to a couple of thousand tokens per beat
(+-30%, and now and then a 3x step: bursty but normal). After ``SECONDS`` every agent shuts down
(a deliberate stop: no alert), and the process prints how many beats it sent.
"""

from __future__ import annotations

import heapq
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import producers


def main(first: int, count: int, seconds: float) -> None:
    interval = float(os.environ["AGENTWATCH_INTERVAL"])
    rng = random.Random(first)
    fleet = [producers.Producer(f"fleet-{first + n:04d}") for n in range(count)]
    appetite = [rng.randint(100, 2000) for _ in fleet]  # some agents are hungrier than others
    start = time.monotonic()
    due = [(start + rng.uniform(0, interval), n) for n in range(count)]
    heapq.heapify(due)
    beats = 0
    while due[0][0] < start + seconds:
        at, n = heapq.heappop(due)
        delay = at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        burst = 3 if rng.random() < 0.1 else 1
        tokens = int(appetite[n] * rng.uniform(0.7, 1.3) * burst)
        fleet[n].heartbeat(tokens=tokens, cost=tokens * 2e-6, fp=f"item-{first + n}-{beats}")
        beats += 1
        heapq.heappush(due, (at + interval * rng.uniform(0.7, 1.3), n))
    # All at once: closed one after another (~5 ms each, more on a loaded box), the last of 250
    # would pulse without beating for longer than the stall allowance while waiting their turn.
    with ThreadPoolExecutor(max_workers=64) as pool:
        list(pool.map(producers.Producer.close, fleet))
    print(beats, flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
