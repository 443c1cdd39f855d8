"""Producer hot path: what one ``heartbeat()`` call costs the agent, next to a no-op call.

Issue 3 goal: median <= 2 us, p99 <= 20 us. Every call is timed on its own with
``time.perf_counter_ns`` (so the timer's own cost is in both figures); the baseline is a no-op
Python function timed the same way in the same run. The producer delivers to a real Redis while
it is measured, so its sender thread competes for the GIL as it would in an agent.

Variants: ``heartbeat()`` back to back (the sender cannot keep up, so most calls take the
queue-full path and are counted as drops); ``heartbeat(tokens=, model=, cost=)`` back to back;
and ``heartbeat()`` paced by ~20 us of busy work per call, the path a real agent takes. The
paced call is also timed on a second producer that signs its events (``key=``, issue 11): the
signing happens on the sender thread, so the figure "signed / unsigned" should stay near 1.
Last, a beat carrying a huge meta value (a 256 x 256 nested list): dropped whole once the walk
reaches the per-call budget, so it costs tens of microseconds, not a walk of the whole value
(tests/test_producer_fields.py checks that the walk stops; this row is its price).

    python benchmarks/producer_heartbeat.py [--redis-url URL] [--calls 100000] [--rounds 3] [--quick]

``--quick``: 30,000 calls per variant x 2 rounds (run_all's quick mode).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import redis
from _common import figure, median, percentile, redis_server, report

import producers
from agentwatch.signing import agent_key

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
    parser.add_argument("--calls", type=int, default=None, help="default 100,000 (--quick: 30,000)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (--quick: 2)")
    parser.add_argument("--quick", action="store_true", help="30,000 calls per variant x 2 rounds")
    args = parser.parse_args()
    args.calls = args.calls or (30_000 if args.quick else 100_000)
    args.rounds = args.rounds or (2 if args.quick else 3)
    heartbeat = producers.heartbeat
    with redis_server(args.redis_url) as url:
        prefix = f"bench{time.time_ns()}"
        producers.init("bench-heartbeat", redis_url=url, prefix=prefix, pulse_interval=1.0)
        key = agent_key("benchmark secret, at least 32 characters", "bench-signed")
        signed = producers.Producer("bench-signed", redis_url=url, prefix=prefix, pulse_interval=1.0, key=key)
        variants: dict[str, tuple[Callable[[], object], int]] = {
            "no-op function (baseline)": (noop, 0),
            "heartbeat()": (heartbeat, 0),
            "heartbeat(tokens=, model=, cost=)": (
                lambda: heartbeat(tokens=512, model="gpt-4o-mini", cost=0.0004),
                0,
            ),
            "no-op, paced by 20 us of work (baseline)": (noop, 20_000),
            "heartbeat(), paced by 20 us of work": (heartbeat, 20_000),
            "heartbeat(), paced, signing producer": (signed.heartbeat, 20_000),
        }
        huge = [[n] * 256 for n in range(256)]
        heavy = "heartbeat(response=<256 x 256 list>), cut at the budget"
        samples: dict[str, list[int]] = {name: [] for name in [*variants, heavy]}
        for _ in range(args.rounds):  # interleaved, so a noisy moment hits every variant
            for name, (call, work_ns) in variants.items():
                calls = args.calls if not work_ns else args.calls // 4
                samples[name] += timed(call, calls, work_ns)
            samples[heavy] += timed(lambda: heartbeat(response=huge), max(100, args.calls // 100))
        producers.shutdown()
        signed.close()
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
    paced, paced_signed = rows[4], rows[5]
    signed_ratio = paced_signed["median ns"] / paced["median ns"]
    verdict = {
        "median_ns": beat["median ns"],
        "p99_ns": beat["p99 ns"],
        "median_over_baseline_ns": beat["median ns"] - base["median ns"],
        "goal_median_ns": GOAL_MEDIAN_NS,
        "goal_p99_ns": GOAL_P99_NS,
        "median_goal_met": beat["median ns"] <= GOAL_MEDIAN_NS,
        "p99_goal_met": beat["p99 ns"] <= GOAL_P99_NS,
        "events_delivered_during_run": delivered,
        "signed_over_unsigned_median": signed_ratio,
    }
    figures = [
        figure("heartbeat() median", beat["median ns"] / 1000, "us", goal=GOAL_MEDIAN_NS / 1000, issue=3),
        figure("heartbeat() p99", beat["p99 ns"] / 1000, "us", goal=GOAL_P99_NS / 1000, issue=3),
        figure("heartbeat() median, huge meta value", rows[6]["median ns"] / 1000, "us"),
        figure(
            "heartbeat() median, signing / unsigned (paced)",
            round(signed_ratio, 3),
            "ratio",
            goal=1.1,
            issue=11,
        ),
    ]
    report("producer_heartbeat", rows, {"verdict": verdict}, figures=figures)
    print(f"\nheartbeat(): median {beat['median ns']} ns (goal <= {GOAL_MEDIAN_NS}), "
          f"p99 {beat['p99 ns']} ns (goal <= {GOAL_P99_NS}); no-op baseline median "
          f"{base['median ns']} ns; {delivered:,} events delivered meanwhile")  # fmt: skip
    print(f"paced heartbeat() median: signing producer {paced_signed['median ns']} ns, unsigned "
          f"{paced['median ns']} ns ({signed_ratio:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
