"""Producer hot path: what one ``heartbeat()`` call costs the agent, next to a no-op call.

Issue 3 goal: median <= 2 us, p99 <= 20 us. Every call is timed on its own with
``time.perf_counter_ns`` (so the timer's own cost is in both figures); the baseline is a no-op
Python function timed the same way in the same run. The producer delivers to a real Redis while
it is measured, so its sender thread competes for the GIL as it would in an agent.

Variants: ``heartbeat()`` back to back (the sender cannot keep up, so most calls take the
queue-full path and are counted as drops); ``heartbeat(tokens=, model=, cost=)`` back to back;
and ``heartbeat()`` paced by ~20 us of busy work per call, the path a real agent takes.

    python benchmarks/producer_heartbeat.py [--redis-url URL] [--calls 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import redis
from _common import median, percentile, redis_server, report

import producers

GOAL_MEDIAN_NS = 2_000
GOAL_P99_NS = 20_000


def noop(tokens: int | None = None) -> None:
    return None


def timed(call: Callable[[], object], calls: int, work_ns: int = 0) -> list[int]:
    clock = time.perf_counter_ns
    samples = [0] * calls
    for index in range(calls):
        start = clock()
        call()
        samples[index] = clock() - start
        if work_ns:
            until = clock() + work_ns
            while clock() < until:
                pass
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", help="default: a private server (agentwatch.embedded)")
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    heartbeat = producers.heartbeat
    variants: dict[str, tuple[Callable[[], object], int]] = {
        "no-op function (baseline)": (noop, 0),
        "heartbeat()": (heartbeat, 0),
        "heartbeat(tokens=, model=, cost=)": (
            lambda: heartbeat(tokens=512, model="gpt-4o-mini", cost=0.0004),
            0,
        ),
        "no-op, paced by 20 us of work (baseline)": (noop, 20_000),
        "heartbeat(), paced by 20 us of work": (heartbeat, 20_000),
    }
    samples: dict[str, list[int]] = {name: [] for name in variants}
    with redis_server(args.redis_url) as url:
        prefix = f"bench{time.time_ns()}"
        producers.init("bench-heartbeat", redis_url=url, prefix=prefix, pulse_interval=1.0)
        for _ in range(args.rounds):  # interleaved, so a noisy moment hits every variant
            for name, (call, work_ns) in variants.items():
                calls = args.calls if not work_ns else args.calls // 4
                samples[name] += timed(call, calls, work_ns)
        producers.shutdown()
        with redis.Redis.from_url(url) as client:
            delivered = int(client.xinfo_stream(f"{prefix}:events")["entries-added"])
            client.delete(f"{prefix}:events")
    rows = []
    for name, values in samples.items():
        rows.append(
            {
                "call": name,
                "calls": len(values),
                "median ns": median(values),
                "p99 ns": percentile(values, 99),
                "p99.9 ns": percentile(values, 99.9),
                "max ns": max(values),
            }
        )
    base, beat = rows[0], rows[1]
    verdict = {
        "median_ns": beat["median ns"],
        "p99_ns": beat["p99 ns"],
        "median_over_baseline_ns": beat["median ns"] - base["median ns"],
        "goal_median_ns": GOAL_MEDIAN_NS,
        "goal_p99_ns": GOAL_P99_NS,
        "median_goal_met": beat["median ns"] <= GOAL_MEDIAN_NS,
        "p99_goal_met": beat["p99 ns"] <= GOAL_P99_NS,
        "events_delivered_during_run": delivered,
    }
    report("producer_heartbeat", rows, {"verdict": verdict})
    print(f"\nheartbeat(): median {beat['median ns']} ns (goal <= {GOAL_MEDIAN_NS}), "
          f"p99 {beat['p99 ns']} ns (goal <= {GOAL_P99_NS}); no-op baseline median "
          f"{base['median ns']} ns; {delivered:,} events delivered meanwhile")  # fmt: skip


if __name__ == "__main__":
    main()
