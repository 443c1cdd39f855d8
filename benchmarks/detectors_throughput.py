"""Detector workers (the shard-owner engine) vs raw consumer loops, same server, same run.

Baseline: XREADGROUP COUNT 1000 + ``msgpack.unpackb`` per entry + one XACK per batch + one
``ZADD GT`` per batch (agent -> entry time: the least a monitor must write), one loop per event
shard. Contender: the worker ``agentwatch worker detectors`` runs (``detector_worker``: runtime,
codec, budgets, and the engine with silence, stall, exit, tokens/loop, memory and lag at their
default settings), one per worker. Target (issue 12): contender / baseline >= 0.7, at 100, 1,000
and 100,000 agents, with 1 worker (one event stream, the default ``shards = 1``) and with 2
workers (``shards = 2``: each agent's events go to ``keys.events(shard_of(agent, 2))``, and the two
workers lease one shard each, as ``[redis] shards`` deployments do).

Every loop, baseline or contender, runs in its own process (``--child``), so two of them use two
cores: the parent fills the streams, starts the processes, waits until each is ready (built, and
for workers registered as a live engine so the two split the shards at once instead of one taking
both then handing one over), starts them together and takes the aggregate events/s from the
first start to the last finish (every stream drained). Each child also reports its process CPU
time over the run: **CPU seconds per million events** = the workers' CPU time / events * 1e6
(Redis's own CPU is not in it: the table shows it apart, from ``INFO cpu`` before and after, which
also counts the polls of the parent, idle at that point).

The stream holds a fleet's events, not a tight loop of one agent: ``--agents`` agents each sending
one event per second of Redis time (entry ids are explicit and spaced accordingly; the stream is a
backlog being caught up): every 5th a pulse with RSS (and the declared interval, as producers
repeat it), the others beats with tokens, cost, model and a fresh fingerprint, after a start.
With 1,000 agents each batch of 1,000 touches ~1,000 distinct agents; with 100 agents each agent
has ~10 events per batch; with 100,000 agents every event is of another agent and the engine holds
100,000 agents in memory.

    python benchmarks/detectors_throughput.py [--events 200000] [--agents 100 1000 100000]
        [--workers 1 2] [--rounds 3] [--quick] [--baseline-json PATH]

Events per fleet: ``--events`` (default 200,000), but at least 6 per agent (600,000 at 100,000
agents: a start, four beats and a pulse each). ``--quick`` (run_all's quick mode): 50,000 events,
and 2 per agent at 100,000 agents (200,000: a start and a beat each, so no pulse), 1 round.

``--baseline-json``: the JSON this script wrote at an earlier commit (``benchmarks/old_engine.py``
runs the pre-rewrite engine's own script and stores it); its rows and figures are shown next to
this run's, labelled with where they come from.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import drop_prefix, figure, median, redis_server, report_beside

from agentwatch import codec, config, loading
from agentwatch.keys import Keys, shard_of
from agentwatch.redisconn import connect, server_time_ms

GOAL = 0.7
PREFIX = "benchtp"


def fill(client: redis.Redis, keys: Keys, events: int, agents: int) -> list[int]:
    """``events`` entries over ``keys``' shards; agent ``i`` sends once per simulated second.
    Both consumer groups (raw, detectors) read the same entries. Returns entries per shard."""
    per_ms = max(1, agents // 1000)
    base_ms = int(time.time() * 1000) - events // per_ms - 60_000  # a backlog, in the past
    shards = max(keys.shards, 1)
    counts = [0] * shards
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
        shard = shard_of(agent, shards)
        counts[shard] += 1
        pipe.xadd(keys.events(shard), {"d": codec.encode(event)}, id=f"{base_ms + n // per_ms}-{n % per_ms}")
        if n % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    for shard in range(shards):
        for group in ("raw", "detectors"):
            client.xgroup_create(keys.events(shard), group, id="0")
    return counts


# --- the children: one loop each, in its own process ---------------------------------------------


def child_raw(spec: dict[str, Any]) -> dict[str, Any]:
    client: Any = redis.Redis.from_url(spec["url"])  # untyped: redis-py's stream stubs are loose
    stream, events, index = spec["stream"], spec["events"], spec["index"]
    _ready()
    start, cpu = time.time(), time.process_time()
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
    result = {"start": start, "end": time.time(), "cpu": time.process_time() - cpu, "events": done}
    client.close()
    return result


def child_worker(spec: dict[str, Any]) -> None:
    from agentwatch.workers import detector_worker  # noqa: PLC0415
    from detectors.engine import Engine  # noqa: PLC0415 - the child alone needs the engine

    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s worker {os.getpid()}: %(message)s")
    pipeline = loading.load(None)
    redis_settings = pipeline.settings.redis.model_copy(
        update={"prefix": spec["prefix"], "shards": spec["shards"]}
    )
    settings = pipeline.settings.model_copy(update={"redis": redis_settings})
    pipeline = config.Pipeline(settings=settings, source="bench", detectors=pipeline.detectors)
    client = connect(settings, spec["url"])
    keys = pipeline.keys
    worker = detector_worker(pipeline, client, consumer=f"bench-{os.getpid()}")
    engine = next(h for h in worker.handlers if isinstance(h, Engine))
    for handler in worker.handlers:  # as a process would (the engine waits for a lease to read)
        handler.on_start()
    # Live from the start: the workers split the shards at their first lease refresh.
    client.zadd(keys.engines, {engine.owner: server_time_ms(client) + 600_000})
    _ready()
    start, cpu = time.time(), time.process_time()
    target: int | None = None
    held: list[int] = []
    next_note = time.monotonic() + 10
    while True:
        worker.run_once()
        if time.monotonic() >= next_note:  # a worker that never drains says why
            next_note = time.monotonic() + 10
            print(f"worker {os.getpid()}: shards {sorted(engine.shards)}, processed "
                  f"{worker.stats.processed} of {target}", file=sys.stderr, flush=True)  # fmt: skip
        if target is None and engine.shards:  # its share, taken at the first refresh
            held = sorted(engine.shards)
            target = sum(spec["counts"][index] for index in held)
        if target is not None and worker.stats.processed >= target:
            break
    end, cpu = time.time(), time.process_time() - cpu
    result = {"start": start, "end": end, "cpu": cpu, "events": worker.stats.processed, "shards": held,
              "now_holds": sorted(engine.shards), "errors": sum(worker.stats.handler_errors.values()),
              "duplicates": sum(shard.duplicates for shard in engine.shards.values())}  # fmt: skip
    print(json.dumps(result), flush=True)
    # Keep the shard (renewing its lease) until every worker is done: a worker that let go now
    # would hand its shard to one still running, whose takeover would then count in its time.
    while not select.select([sys.stdin], [], [], 0)[0]:
        worker.run_once()
    engine.flush()
    engine.leases.release_all()
    client.close()


def _ready() -> None:
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("parent gone")


def redis_cpu(client: redis.Redis) -> float:
    """The server's CPU seconds so far (user + system, INFO cpu)."""
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run_children(client: redis.Redis, specs: list[dict[str, Any]]) -> dict[str, Any]:
    """Start one child per spec, start them together once all are ready; aggregate their runs."""
    script = str(Path(__file__).resolve())
    children = [
        subprocess.Popen(
            [sys.executable, script, "--child", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for spec in specs
    ]
    try:
        for child in children:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"child {child.args!r} did not get ready (exit {child.wait()})")
        server_cpu = redis_cpu(client)
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        results = []
        for child in children:  # each prints its result once its streams are drained
            assert child.stdout is not None
            line = child.stdout.readline()
            if not line.strip():
                raise RuntimeError(f"child {child.args!r} failed (exit {child.wait()})")
            results.append(json.loads(line))
        server_cpu = redis_cpu(client) - server_cpu
        for child in children:
            child.communicate("stop\n", timeout=60)
            if child.returncode != 0:
                raise RuntimeError(f"child {child.args!r} failed (exit {child.returncode})")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    events = sum(r["events"] for r in results)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    cpu = sum(r["cpu"] for r in results)
    return {"rate": events / wall, "events": events, "wall": wall, "cpu_per_m": cpu / events * 1e6,
            "redis_cpu_per_m": server_cpu / events * 1e6, "children": results}  # fmt: skip


def one_round(url: str, client: redis.Redis, events: int, agents: int, workers: int) -> dict[str, Any]:
    keys = Keys(PREFIX, shards=1 if workers == 1 else workers)
    drop_prefix(client, PREFIX)
    counts = fill(client, keys, events, agents)
    shards = max(keys.shards, 1)
    raw = run_children(client, [
        {"role": "raw", "url": url, "stream": keys.events(s), "events": counts[s],
         "index": f"{PREFIX}:rawindex"}
        for s in range(shards)
    ])  # fmt: skip
    det = run_children(client, [
        {"role": "worker", "url": url, "prefix": PREFIX, "shards": keys.shards, "counts": counts}
        for _ in range(workers)
    ])  # fmt: skip
    det["alerts"] = client.xlen(keys.alerts)
    drop_prefix(client, PREFIX)
    return {"raw": raw, "det": det}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=None, help="default 200,000 (--quick: 50,000)")
    parser.add_argument("--agents", type=int, nargs="+", default=[100, 1000, 100_000], help="fleet sizes")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument(
        "--quick", action="store_true", help="50,000 events (100,000 agents: 200,000), 1 round"
    )
    parser.add_argument(
        "--baseline-json", type=Path, default=None, help="an earlier commit's JSON to show beside"
    )
    parser.add_argument("--redis-url", default=None, help="default: a private server (embedded launcher)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        if spec["role"] == "raw":
            print(json.dumps(child_raw(spec)), flush=True)
        else:
            child_worker(spec)  # prints its result itself, then holds its shard until told
        return
    args.events = args.events or (50_000 if args.quick else 200_000)
    per_agent = 2 if args.quick else 6
    args.rounds = args.rounds or (1 if args.quick else 3)
    rows: list[dict[str, Any]] = []
    figures: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    with redis_server(args.redis_url) as url:
        client = redis.Redis.from_url(url)
        for agents in args.agents:
            events = max(args.events, per_agent * agents)
            for workers in args.workers:
                runs = [one_round(url, client, events, agents, workers) for _ in range(args.rounds)]
                raw = median([run["raw"]["rate"] for run in runs])
                det = median([run["det"]["rate"] for run in runs])
                cpu_raw = median([run["raw"]["cpu_per_m"] for run in runs])
                cpu_det = median([run["det"]["cpu_per_m"] for run in runs])
                redis_raw = median([run["raw"]["redis_cpu_per_m"] for run in runs])
                redis_det = median([run["det"]["redis_cpu_per_m"] for run in runs])
                ratio = det / raw
                where = f"{agents:,} agents, {workers} worker{'s' if workers > 1 else ''}"
                rows.append({"engine": "this commit", "agents": agents, "workers": workers, "events": events,
                             "loop": "raw: XREADGROUP+unpackb+XACK+ZADD GT", "events/s (median)": raw,
                             "rounds": [round(run["raw"]["rate"]) for run in runs],
                             "CPU s / M events": round(cpu_raw, 2),
                             "Redis CPU s / M events": round(redis_raw, 2)})  # fmt: skip
                rows.append({"engine": "this commit", "agents": agents, "workers": workers, "events": events,
                             "loop": "detector worker(s), all built-ins", "events/s (median)": det,
                             "rounds": [round(run["det"]["rate"]) for run in runs],
                             "CPU s / M events": round(cpu_det, 2),
                             "Redis CPU s / M events": round(redis_det, 2), "ratio": round(ratio, 2),
                             "alerts": [run["det"]["alerts"] for run in runs],
                             "errors": [sum(c["errors"] for c in run["det"]["children"])
                                        for run in runs]})  # fmt: skip
                summary[where] = {"ratio": ratio, "raw": raw, "det": det, "cpu_per_m": cpu_det,
                                  "raw_cpu_per_m": cpu_raw, "runs": runs}  # fmt: skip
                figures.append(figure(f"detector workers / raw loops, {where}", round(ratio, 3), "ratio",
                                      goal=GOAL, better="higher", issue=12))  # fmt: skip
                figures.append(figure(f"worker CPU s per million events, {where}", round(cpu_det, 2), "s",
                                      issue=12))  # fmt: skip
        client.close()
    extra: dict[str, Any] = {"results": summary, "target": GOAL, "events": args.events}
    report_beside("detectors_throughput", rows, extra, figures, args.baseline_json)
    for where, found in summary.items():
        print(f"{where}: ratio workers/raw = {found['ratio']:.2f} (target >= {GOAL}), "
              f"{found['cpu_per_m']:.1f} CPU s per M events")  # fmt: skip


if __name__ == "__main__":
    main()
