"""One detector worker with every built-in detector vs a raw consumer loop, same server, same run.

Baseline: XREADGROUP COUNT 1000 + ``msgpack.unpackb`` per entry + one XACK per batch + one
``ZADD GT`` per batch (agent -> entry time: the least a monitor must write). Contender: the
worker ``agentwatch worker detectors`` runs (``detector_worker``: runtime, codec, and silence,
stall, exit, tokens/loop, memory and lag with their default settings), in this process.
Target (issue 4): contender / baseline >= 0.5.

The stream holds a fleet's events, not a tight loop of one agent: ``--agents`` agents each sending
one event per second of Redis time (entry ids are explicit and spaced accordingly; the stream is a
backlog being caught up): every 5th a pulse with RSS (and the declared interval, as producers
repeat it), the others beats with tokens, cost, model and a fresh fingerprint. Every beat moves a
token baseline and every pulse an RSS bucket. With 1,000 agents each batch of 1,000 touches
~1,000 distinct agents: one state read-modify-write per event, the worst case. With 100 agents
each agent has ~10 events per batch, folded into one update. Both are run by default.

    python benchmarks/detectors_throughput.py [--events 200000] [--agents 1000 100] [--rounds 3] [--quick]

``--quick``: 50,000 events x 1 round per fleet size (run_all's quick mode).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, median, report

from agentwatch import codec, config, loading
from agentwatch.embedded import EmbeddedRedis
from agentwatch.redisconn import connect
from agentwatch.workers import detector_worker


def fill(client: redis.Redis, stream: str, events: int, agents: int, group: str) -> None:
    """``events`` entries; agent ``i`` sends once per simulated second, starting with ``start``."""
    client.delete(stream)
    per_ms = max(1, agents // 1000)
    base_ms = int(time.time() * 1000) - events // per_ms - 60_000  # a backlog, in the past
    pipe = client.pipeline(transaction=False)
    for n in range(events):
        agent_no, round_no = n % agents, n // agents
        agent = f"agent-{agent_no:06d}"
        event = {"v": 1, "agent": agent, "ts": 0.0, "run": f"run-{agent_no}", "seq": round_no}
        if round_no == 0:
            event.update(kind="start", interval=1.0, pid=1000 + agent_no, host="bench")
        elif round_no % 5 == 0:  # pulses repeat the declared interval, as the producer sends them
            event.update(kind="pulse", rss=(200 + agent_no % 50) * 2**20 + round_no * 4096, interval=1.0)
        else:
            tokens = 300 + (n * 7919) % 900
            event.update(kind="beat", tokens=tokens, cost=tokens * 3e-6, model="gpt-x", fp=f"job-{n}")
        entry_id = f"{base_ms + n // per_ms}-{n % per_ms}"
        pipe.xadd(stream, {"d": codec.encode(event)}, id=entry_id)
        if n % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    client.xgroup_create(stream, group, id="0")


def raw_loop(url: str, stream: str, events: int, index: str) -> float:
    client = redis.Redis.from_url(url)
    start = time.perf_counter()
    done = 0
    while done < events:
        reply = client.xreadgroup("raw", "raw", {stream: ">"}, count=1000, block=100)
        if not reply:
            continue
        entries = reply[0][1]
        seen: dict[str, int] = {}
        for entry_id, fields in entries:
            event = msgpack.unpackb(fields[b"d"])
            seen[event["agent"]] = int(entry_id[: entry_id.index(b"-")])
        client.xack(stream, "raw", *[e[0] for e in entries])
        client.zadd(index, seen, gt=True)
        done += len(entries)
    elapsed = time.perf_counter() - start
    client.close()
    return events / elapsed


def contender(url: str, prefix: str, events: int) -> tuple[float, dict[str, int]]:
    pipeline = loading.load(None)
    settings = pipeline.settings.model_copy(
        update={"redis": pipeline.settings.redis.model_copy(update={"prefix": prefix})}
    )
    pipeline = config.Pipeline(settings=settings, source="bench", detectors=pipeline.detectors)
    client = connect(settings, url)
    worker = detector_worker(pipeline, client)
    start = time.perf_counter()
    while worker.stats.processed < events:
        worker.run_once()
    elapsed = time.perf_counter() - start
    alerts = client.xlen(pipeline.keys.alerts)
    errors = dict(worker.stats.handler_errors)
    client.close()
    return events / elapsed, {"alerts": alerts, "handler_errors": sum(errors.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=None, help="default 200,000 (--quick: 50,000)")
    parser.add_argument("--agents", type=int, nargs="+", default=[1000, 100], help="fleet sizes to run")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--quick", action="store_true", help="50,000 events x 1 round per fleet size")
    parser.add_argument("--redis-url", default=None, help="default: a private server (embedded launcher)")
    args = parser.parse_args()
    args.events = args.events or (50_000 if args.quick else 200_000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    server = None
    url = args.redis_url
    if url is None:
        server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="aw-bench-"))).start()
        url = server.url
    client = redis.Redis.from_url(url)
    rows: list[dict[str, object]] = []
    ratios: dict[int, float] = {}
    try:
        for agents in args.agents:
            raw_rates, det_rates, alerts = [], [], []
            for round_no in range(args.rounds):  # interleaved, so both loops share the VM's noise
                fill(client, "benchraw:events", args.events, agents, "raw")
                raw_rates.append(raw_loop(url, "benchraw:events", args.events, "benchraw:index"))
                prefix = f"benchdet{round_no}"
                fill(client, f"{prefix}:events", args.events, agents, "detectors")
                rate, note = contender(url, prefix, args.events)
                det_rates.append(rate)
                alerts.append(note["alerts"])
                for key in client.scan_iter("bench*"):
                    client.delete(key)
            raw, det = median(raw_rates), median(det_rates)
            ratios[agents] = det / raw
            rows.append({"agents": agents, "loop": "raw: XREADGROUP+unpackb+XACK+ZADD GT",
                         "events/s (median)": raw, "rounds": [round(x) for x in raw_rates]})  # fmt: skip
            rows.append({"agents": agents, "loop": "detector worker, all built-ins", "events/s (median)": det,
                         "rounds": [round(x) for x in det_rates], "ratio": round(det / raw, 2),
                         "alerts": alerts})  # fmt: skip
    finally:
        for key in client.scan_iter("bench*"):
            client.delete(key)
        client.close()
        if server:
            server.cleanup()
    figures = [
        figure(f"detector worker / raw loop, {agents:,} agents", ratio, "ratio", goal=0.5, better="higher",
               issue=4)
        for agents, ratio in ratios.items()
    ]  # fmt: skip
    report("detectors_throughput", rows, {"ratios": ratios, "target": 0.5, "events": args.events}, figures)
    for agents, ratio in ratios.items():
        print(f"{agents} agents: ratio detectors/raw = {ratio:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
