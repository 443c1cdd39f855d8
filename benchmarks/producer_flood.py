"""Flood: events/s one producer delivers into Redis from a tight loop, vs raw redis-py.

Issue 3 goal: ratio >= 0.7. Baseline, same server, same run: a redis-py pipeline of 1000
``XADD <stream> MAXLEN ~ <the producer's default cap> * d <payload>`` per ``execute()``,
payloads pre-encoded (the baseline pays no encoding; the producer encodes every event).
Contender: ``heartbeat(tokens=n)`` called back to back for ``--seconds``; delivered events/s =
events added to the stream (XINFO ``entries-added``, unaffected by trimming) / time from the
first call until ``shutdown()`` returned (the queue fully flushed).

A tight loop outruns any sender, so the producer drops the excess and counts it (reason
``queue_full``): both the calls made and the drops reported in the stream are printed.

    python benchmarks/producer_flood.py [--redis-url URL] [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import redis
from _common import median, redis_server, report

import producers
from agentwatch.codec import FIELD, decode, encode
from producers._config import DEFAULT_MAXLEN

GOAL_RATIO = 0.7
RAW_EVENTS = 200_000


def raw_rate(client: redis.Redis, stream: str) -> float:
    beat = {"v": 1, "agent": "bench-flood", "kind": "beat", "run": "0123456789abcdef"}
    payloads = [encode({**beat, "ts": time.time(), "seq": n, "tokens": n}) for n in range(RAW_EVENTS)]
    start = time.perf_counter()
    for offset in range(0, RAW_EVENTS, 1000):
        pipe = client.pipeline(transaction=False)
        for payload in payloads[offset : offset + 1000]:
            pipe.xadd(stream, {FIELD: payload}, maxlen=DEFAULT_MAXLEN, approximate=True)
        pipe.execute()
    return RAW_EVENTS / (time.perf_counter() - start)


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
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    raws, runs = [], []
    with redis_server(args.redis_url) as url, redis.Redis.from_url(url) as client:
        for round_ in range(args.rounds):  # interleaved, so noise hits both loops alike
            stream = f"bench-raw{time.time_ns()}:events"
            raws.append(raw_rate(client, stream))
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
    report("producer_flood", rows, {"verdict": verdict})
    print(f"\nflood: producer delivers {verdict['producer_events_per_s_median']:,.0f} events/s, raw "
          f"redis-py pipeline {verdict['raw_events_per_s_median']:,.0f}: ratio {ratio:.2f} "
          f"(goal >= {GOAL_RATIO})")  # fmt: skip


if __name__ == "__main__":
    main()
