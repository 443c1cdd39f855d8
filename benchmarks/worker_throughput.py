"""Worker runtime throughput vs a raw redis-py consumer loop, same server, same run.

Baseline: XREADGROUP COUNT 1000 + ``msgpack.unpackb`` per entry + one XACK per batch, with
redis-py's default reply parsing. Contender: :class:`agentwatch.worker.Worker` with the real
event codec (decode + validate every event) and a handler that does nothing.
Target (issue 2): contender / baseline >= 0.8.

    python benchmarks/worker_throughput.py [--events 200000] [--rounds 3] [--quick] [--redis-url URL]

``--quick``: 50,000 events x 2 rounds (run_all's quick mode).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import msgpack
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, median, redis_server, report

from agentwatch import codec, loading
from agentwatch.redisconn import connect
from agentwatch.worker import Handler, Worker


def fill(client: redis.Redis, stream: str, events: int) -> None:
    client.delete(stream)
    pipe = client.pipeline(transaction=False)
    for i in range(events):
        event = {"v": 1, "agent": f"agent-{i % 1000}", "kind": "beat", "ts": time.time(), "run": "r1",
                 "seq": i, "tokens": 200 + i % 50, "cost": 0.002, "model": "gpt-x"}  # fmt: skip
        pipe.xadd(stream, {"d": codec.encode(event)})
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    client.xgroup_create(stream, "g", id="0")


def raw_loop(url: str, stream: str, events: int) -> float:
    client = redis.Redis.from_url(url)
    start = time.perf_counter()
    done = 0
    while done < events:
        reply = client.xreadgroup("g", "raw", {stream: ">"}, count=1000, block=100)
        if not reply:
            continue
        entries = reply[0][1]
        for _entry_id, fields in entries:
            msgpack.unpackb(fields[b"d"])
        client.xack(stream, "g", *[e[0] for e in entries])
        done += len(entries)
    elapsed = time.perf_counter() - start
    client.close()
    return events / elapsed


class Noop(Handler[codec.Event]):
    name = "noop"


def runtime(url: str, prefix: str, events: int) -> float:
    pipeline = loading.load(None, plugins=False)
    settings = pipeline.settings.model_copy(
        update={"redis": pipeline.settings.redis.model_copy(update={"prefix": prefix})}
    )
    client = connect(settings, url)
    worker: Worker[codec.Event] = Worker(
        client, settings, kind="bench", streams=[f"{prefix}:events"], group="g",
        decode=codec.decode, handlers=[Noop()], retention_s=86400,
    )  # fmt: skip
    worker.run_once()  # groups, timers and the first health write happen outside the timing
    untimed = done = worker.stats.processed  # ... and so does the first batch it read
    start = time.perf_counter()
    while done < events:
        worker.run_once()
        done = worker.stats.processed
    elapsed = time.perf_counter() - start
    client.close()
    return (done - untimed) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=None, help="default 200,000 (--quick: 50,000)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (--quick: 2)")
    parser.add_argument("--quick", action="store_true", help="50,000 events x 2 rounds")
    parser.add_argument("--redis-url", default=None, help="default: a private server (embedded launcher)")
    args = parser.parse_args()
    args.events = args.events or (50_000 if args.quick else 200_000)
    args.rounds = args.rounds or (2 if args.quick else 3)
    raw_rates, rt_rates = [], []
    with redis_server(args.redis_url) as url, redis.Redis.from_url(url) as client:
        try:
            for _ in range(args.rounds):
                fill(client, "bench:raw", args.events)
                raw_rates.append(raw_loop(url, "bench:raw", args.events))
                fill(client, "benchrt:events", args.events)
                rt_rates.append(runtime(url, "benchrt", args.events))
        finally:
            for key in client.scan_iter("bench*"):
                client.delete(key)
    raw, rt = median(raw_rates), median(rt_rates)
    rows = [
        {
            "loop": "raw redis-py (baseline)",
            "events/s (median)": raw,
            "rounds": [round(x) for x in raw_rates],
        },
        {
            "loop": "agentwatch Worker + codec",
            "events/s (median)": rt,
            "rounds": [round(x) for x in rt_rates],
        },
    ]
    figures = [
        figure("worker runtime / raw consumer, events/s", rt / raw, "ratio", goal=0.8, better="higher",
               issue=2),
        figure("worker runtime + codec, events/s", rt, "events/s", issue=2),
    ]  # fmt: skip
    report("worker_throughput", rows, {"ratio": rt / raw, "target": 0.8, "events": args.events}, figures)
    print(f"ratio runtime/raw = {rt / raw:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
