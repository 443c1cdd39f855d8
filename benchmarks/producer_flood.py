"""Flood: events/s one producer delivers into Redis from a tight loop, vs raw redis-py.

Issue 3 goal: ratio >= 0.7. Baseline, same server, same run: a redis-py pipeline of 1000
``XADD <stream> MAXLEN ~ <the producer's default cap> * d <payload>`` per ``execute()``,
payloads pre-encoded (the baseline pays no encoding; the producer encodes every event).
Contender: ``heartbeat(tokens=n)`` called back to back for ``--seconds``; delivered events/s =
events added to the stream (XINFO ``entries-added``, unaffected by trimming) / time from the
first call until ``shutdown()`` returned (the queue fully flushed).

A tight loop outruns any sender, so the producer drops the excess and counts it (reason
``queue_full``): both the calls made and the drops reported in the stream are printed.

    python benchmarks/producer_flood.py [--redis-url URL] [--seconds 3] [--rounds 3] [--quick]

``--quick``: 1 s of flood and 50,000 baseline events, 2 rounds (run_all's quick mode).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import redis
from _common import figure, median, redis_server, report

import producers
from agentwatch.codec import FIELD, decode, encode
from producers._config import DEFAULT_MAXLEN

GOAL_RATIO = 0.7
RAW_EVENTS = 200_000


def raw_rate(client: redis.Redis, stream: str, events: int = RAW_EVENTS) -> float:
    beat = {"v": 1, "agent": "bench-flood", "kind": "beat", "run": "0123456789abcdef"}
    payloads = [encode({**beat, "ts": time.time(), "seq": n, "tokens": n}) for n in range(events)]
    start = time.perf_counter()
    for offset in range(0, events, 1000):
        pipe = client.pipeline(transaction=False)
        for payload in payloads[offset : offset + 1000]:
            pipe.xadd(stream, {FIELD: payload}, maxlen=DEFAULT_MAXLEN, approximate=True)
        pipe.execute()
    return events / (time.perf_counter() - start)


def producer_rate(client: redis.Redis, url: str, prefix: str, seconds: float) -> dict[str, float]:
    producers.init("bench-flood", redis_url=url, prefix=prefix, pulse_interval=600)
    heartbeat = producers.heartbeat
    calls = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        for n in range(1000):
            heartbeat(tokens=n)
        calls += 1000
    producers.shutdown()
    elapsed = time.perf_counter() - start
    stream = f"{prefix}:events"
    added = int(client.xinfo_stream(stream)["entries-added"])
    dropped = 0
    for _id, fields in client.xrange(stream):  # all of them, unless over the MAXLEN cap
        dropped += sum(decode(fields[FIELD]).get("dropped", {}).values())
    client.delete(stream)
    return {"calls": calls, "added": added, "dropped": dropped, "rate": added / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", help="default: a private server (agentwatch.embedded)")
    parser.add_argument("--seconds", type=float, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (--quick: 2)")
    parser.add_argument("--quick", action="store_true", help="1 s of flood, 50,000 baseline events, 2 rounds")
    args = parser.parse_args()
    args.seconds = args.seconds or (1.0 if args.quick else 3.0)
    args.rounds = args.rounds or (2 if args.quick else 3)
    raw_events = 50_000 if args.quick else RAW_EVENTS
    raws, runs = [], []
    with redis_server(args.redis_url) as url, redis.Redis.from_url(url) as client:
        for round_ in range(args.rounds):  # interleaved, so noise hits both loops alike
            stream = f"bench-raw{time.time_ns()}:events"
            raws.append(raw_rate(client, stream, raw_events))
            client.delete(stream)
            runs.append(producer_rate(client, url, f"bench-flood{round_}{time.time_ns()}", args.seconds))
    rows = []
    for index, (raw, run) in enumerate(zip(raws, runs, strict=True)):
        rows.append(
            {
                "round": index + 1,
                "raw redis-py events/s": raw,
                "producer delivered events/s": run["rate"],
                "ratio": run["rate"] / raw,
                "heartbeat() calls": run["calls"],
                "delivered": run["added"],
                "dropped (reported)": run["dropped"],
            }
        )
    ratio = median([row["ratio"] for row in rows])
    verdict = {
        "raw_events_per_s_median": median(raws),
        "producer_events_per_s_median": median([run["rate"] for run in runs]),
        "ratio_median": ratio,
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio >= GOAL_RATIO,
    }
    figures = [
        figure("producer delivered / raw redis-py pipeline, events/s", ratio, "ratio", goal=GOAL_RATIO,
               better="higher", issue=3),
        figure("producer delivered events/s, tight loop", verdict["producer_events_per_s_median"], "events/s",
               issue=3),
    ]  # fmt: skip
    report("producer_flood", rows, {"verdict": verdict, "raw_events": raw_events}, figures)
    print(f"\nflood: producer delivers {verdict['producer_events_per_s_median']:,.0f} events/s, raw "
          f"redis-py pipeline {verdict['raw_events_per_s_median']:,.0f}: ratio {ratio:.2f} "
          f"(goal >= {GOAL_RATIO})")  # fmt: skip


if __name__ == "__main__":
    main()
