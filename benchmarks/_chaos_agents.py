"""Agents for benchmarks/chaos.py: one process hosting the named agents, each a real
``producers.Producer`` beating at its interval with +-20 % jitter, until the process is killed.

    python benchmarks/_chaos_agents.py REDIS_URL PREFIX INTERVAL NAME [NAME ...]

Every beat carries the same token count, so the tokens detector has nothing to flag: any alert
about these agents other than the silence of one that chaos.py killed is a false alert.
"""

from __future__ import annotations

import heapq
import random
import sys
import time

import producers


def main() -> None:
    url, prefix, interval, *names = sys.argv[1:]
    period = float(interval)
    agents = {
        name: producers.Producer(name, redis_url=url, prefix=prefix, interval=period, pulse_interval=period)
        for name in names
    }
    now = time.monotonic()
    due = [(now + random.uniform(0, period), name) for name in names]
    heapq.heapify(due)
    print("ready", flush=True)
    while True:
        when, name = heapq.heappop(due)
        pause = when - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        agents[name].heartbeat(tokens=100)
        heapq.heappush(due, (when + period * random.uniform(0.8, 1.2), name))


if __name__ == "__main__":
    main()
