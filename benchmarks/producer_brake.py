"""The brake: what it costs ``heartbeat()``, and how fast a halt reaches a beating agent's loop.

1. **Cost** (issue 13 goal: median and p99 within 1.1x of the bare beat path). Two producers of
   the same build in one process, delivering to the same real Redis: one with the brake in
   place (its sender polls the halts hash with every batch and once a second when idle), one
   with the brake's read disabled (its sender gets no halt watch). ``heartbeat()`` of each is
   timed call by call with ``perf_counter_ns``, paced by ~20 us of busy work per call (a real
   agent's loop), the two interleaved in rounds so a noisy moment hits both. Both run the same
   hot path, whose only brake cost is one attribute test; what differs is the sender's reads.
2. **Halt latency** (goal: p99 <= 1 s with default settings). An agent process beats every
   10 ms with default producer settings; the benchmark halts it with the code ``agentwatch halt``
   runs (``Halts.add``) and takes the time it returns; the agent takes the time ``Halted`` is
   raised in its loop (CLOCK_MONOTONIC: one clock for both processes). Then it is resumed, and
   the next halt comes after a random pause, so halts land at every phase of the sender's cycle.

    python benchmarks/producer_brake.py [--redis-url URL] [--calls 40000] [--rounds 5] [--halts 100] [--quick]

``--quick``: 20,000 calls x 3 rounds, 30 halts (run_all's quick mode).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import redis
from _common import figure, median, percentile, redis_server, report

from agentwatch.halts import Halts
from agentwatch.keys import Keys
from producers import Producer, _producer

WORK_NS = 20_000
GOAL_RATIO = 1.1
GOAL_P99_S = 1.0

AGENT = textwrap.dedent(
    """
    import sys, time
    from producers import Halted, Producer
    agent = Producer("brake-bench", redis_url=sys.argv[1], prefix=sys.argv[2])  # default settings
    print("ready", flush=True)
    while True:
        try:
            agent.heartbeat(tokens=10)
        except Halted:
            print(time.monotonic(), flush=True)
            while agent.halted() is not None:
                time.sleep(0.005)
            print("resumed", flush=True)
        time.sleep(0.01)
    """
)


def timed(call: Callable[[], object], calls: int) -> list[int]:
    clock = time.perf_counter_ns
    samples = [0] * calls
    for index in range(calls):
        start = clock()
        call()
        samples[index] = clock() - start
        until = clock() + WORK_NS
        while clock() < until:
            pass
    return samples


def bare_producer(url: str, prefix: str) -> Producer:
    """A producer whose sender never reads the halts (the brake's read disabled)."""
    made = Producer("bench-bare", redis_url=url, prefix=prefix, pulse_interval=1.0)
    original = _producer.HaltWatch
    _producer.HaltWatch = lambda *args, **kwargs: None  # type: ignore[assignment,misc]
    try:
        made.heartbeat()  # starts the sender, without a halt watch
    finally:
        _producer.HaltWatch = original  # type: ignore[misc]
    return made


def cost(url: str, calls: int, rounds: int) -> tuple[list[dict[str, Any]], float, float]:
    prefix = f"bench{time.time_ns()}"
    braked = Producer("bench-brake", redis_url=url, prefix=prefix, pulse_interval=1.0)
    braked.heartbeat()
    bare = bare_producer(url, prefix)
    samples: dict[str, list[int]] = {"bare beat path (brake's read disabled)": [], "with the brake": []}
    for _ in range(rounds):
        samples["bare beat path (brake's read disabled)"] += timed(bare.heartbeat, calls)
        samples["with the brake"] += timed(braked.heartbeat, calls)
    braked.close()
    bare.close()
    with redis.Redis.from_url(url) as client:
        client.delete(*client.keys(f"{prefix}:*"))
    rows = [{"call": name, "calls": len(values), "median ns": median(values),
             "p99 ns": percentile(values, 99), "max ns": max(values)}
            for name, values in samples.items()]  # fmt: skip
    return rows, rows[1]["median ns"] / rows[0]["median ns"], rows[1]["p99 ns"] / rows[0]["p99 ns"]


def latency(url: str, halts: int) -> list[float]:
    prefix = f"brake{time.time_ns()}"
    client = redis.Redis.from_url(url)
    brake = Halts(client, Keys(prefix))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, url, prefix], stdout=subprocess.PIPE, text=True, env=env
    )
    assert agent.stdout is not None
    found: list[float] = []
    try:
        assert agent.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        rng = random.Random(13)
        for _ in range(halts):
            time.sleep(rng.uniform(0.0, 0.3))
            brake.add("brake-bench", "benchmark", by="bench")
            returned = time.monotonic()
            raised = float(agent.stdout.readline())
            found.append(raised - returned)
            brake.remove("brake-bench", by="bench")
            assert agent.stdout.readline().strip() == "resumed"
    finally:
        agent.kill()
        agent.wait()
        client.delete(*client.keys(f"{prefix}:*"))
        client.close()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", help="default: a private server (agentwatch.embedded)")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per variant and round (40,000)")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (--quick: 3)")
    parser.add_argument("--halts", type=int, default=None, help="default 100 (--quick: 30)")
    parser.add_argument("--quick", action="store_true", help="20,000 calls x 3 rounds, 30 halts")
    args = parser.parse_args()
    args.calls = args.calls or (20_000 if args.quick else 40_000)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.halts = args.halts or (30 if args.quick else 100)
    with redis_server(args.redis_url) as url:
        rows, median_ratio, p99_ratio = cost(url, args.calls, args.rounds)
        waits = latency(url, args.halts)
    p50, p99 = percentile(waits, 50), percentile(waits, 99)
    rows.append({"call": f"halt -> Halted in the loop ({len(waits)} halts)", "calls": len(waits),
                 "median ns": round(p50 * 1e9), "p99 ns": round(p99 * 1e9),
                 "max ns": round(max(waits) * 1e9)})  # fmt: skip
    figures = [
        figure("heartbeat median, brake / bare", median_ratio, "ratio", goal=GOAL_RATIO, issue=13),
        figure("heartbeat p99, brake / bare", p99_ratio, "ratio", goal=GOAL_RATIO, issue=13),
        figure("halt latency p50", p50 * 1000, "ms", issue=13),
        figure("halt latency p99", p99 * 1000, "ms", goal=GOAL_P99_S * 1000, issue=13),
    ]
    report("producer_brake", rows, {"latencies_s": waits}, figures)
    print(f"\nheartbeat() with the brake / bare: median {median_ratio:.3f}x, p99 {p99_ratio:.3f}x "
          f"(goal <= {GOAL_RATIO}); halt -> Halted: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
          f"max {max(waits) * 1000:.0f} ms over {len(waits)} halts "
          f"(goal p99 <= {GOAL_P99_S * 1000:.0f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
