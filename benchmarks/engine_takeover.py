"""Engine takeover: how long a worker takes to load a shard it has just leased, and to save one.

When a shard's owner dies, another worker leases the shard and loads its checkpoint (every agent
with its detectors' states) before it applies a single event: that load is the takeover's cost,
and alerts about the shard's agents wait for it. Measured on a private server, same run:

* **load** - :meth:`detectors.checkpoint.Checkpoints.load` of a shard of ``--agents`` agents
  (each with two detector states, one child run and two open incidents), against the baseline
  of reading the same hash raw (the same HSCAN, no decoding). Figures: load time per 100,000
  agents (goal <= 5 s; ``--quick`` loads 20,000) and load / raw read.
* **save** - one fenced :meth:`Checkpoints.save` of every agent (the worst checkpoint: all dirty).
* **takeover** - a lease holder stops renewing (``--lease-ms``); from the lease's expiry until
  the other worker holds the shard and has loaded it.

    python benchmarks/engine_takeover.py [--agents 100000] [--rounds 3] [--lease-ms 1000] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import drop_prefix, figure, median, redis_server, report

from agentwatch.keys import Keys
from agentwatch.redisconn import server_time_ms
from detectors.agent import Agent, ChildRun
from detectors.checkpoint import SCAN_COUNT, Checkpoints
from detectors.leases import ShardLeases

GOAL_S_PER_100K = 5.0


@dataclass
class SilenceLike:
    """A detector state of the size the built-ins keep (a few numbers and a reason)."""

    fired_ms: int = 0
    allowance_s: float = 0.0
    reason: str = ""
    armed: bool = False


@dataclass
class MemoryLike:
    window: list[int] = field(default_factory=list)
    fired_ms: int = 0


STATES: dict[str, type[Any]] = {"silence": SilenceLike, "memory": MemoryLike}


def agent(n: int) -> Agent:
    made = Agent(f"agent-{n:06d}", run=f"run-{n:x}", last_seq=n % 5000, started_ms=1_795_000_000_000,
                 seen_ms=1_795_000_100_000 + n, beat_ms=1_795_000_099_000 + n, pulse_ms=1_795_000_100_000 + n,
                 pulse_period_ms=1000, interval_s=30.0, open={"silence", "tokens"}, beats=n, tokens=n * 12.5,
                 cost=n * 0.001, rss_first=50_000_000, rss_last=60_000_000, rss_peak=70_000_000)  # fmt: skip
    made.children[f"child-{n:x}"] = ChildRun(made.run, started_ms=1_795_000_000_500, last_seq=7, pid=4242)
    made.states["silence"] = SilenceLike(1_795_000_090_000, 60.0, "no beat", True)
    made.states["memory"] = MemoryLike([50_000_000 + k for k in range(8)], 0)
    return made


def raw_read(client: Any, keys: Keys) -> int:
    """The baseline: the same HSCAN as load, the records left undecoded."""
    cursor, count = 0, 0
    while True:
        cursor, page = client.hscan(keys.states(0), cursor, count=SCAN_COUNT)
        count += len(page)
        if not cursor:
            return count


def takeover_s(client: Any, keys: Keys, lease_ms: int) -> float:
    """From the dead holder's lease expiry until the successor holds the shard and has loaded it."""
    dead = ShardLeases(client, keys, "dead", lease_ms)
    dead.refresh(server_time_ms(client))
    expires = time.perf_counter() + client.pttl(keys.lease(0)) / 1000
    successor = ShardLeases(client, keys, "successor", lease_ms)
    checkpoints = Checkpoints(client, keys)
    while not successor.holds(0):
        successor.refresh(server_time_ms(client))
        time.sleep(0.01)
    loaded = checkpoints.load(0, STATES)
    done = time.perf_counter()
    successor.release_all()
    assert loaded.skipped == 0
    return done - expires


def one_round(url: str, prefix: str, agents: list[Agent], lease_ms: int) -> dict[str, float]:
    client = redis.Redis.from_url(url)
    keys = Keys(prefix)
    leases = ShardLeases(client, keys, "bench", 60_000)
    leases.refresh(server_time_ms(client))
    checkpoints = Checkpoints(client, keys)
    start = time.perf_counter()
    assert checkpoints.save(0, leases.held[0], agents, [], last_id="1-0", meta={"tick_ms": 1}, decided=[])
    save = time.perf_counter() - start
    leases.release_all()
    start = time.perf_counter()
    assert raw_read(client, keys) == len(agents)
    raw = time.perf_counter() - start
    start = time.perf_counter()
    loaded = checkpoints.load(0, STATES)
    load = time.perf_counter() - start
    assert len(loaded.agents) == len(agents) and loaded.skipped == 0
    takeover = takeover_s(client, keys, lease_ms)
    drop_prefix(client, prefix)
    client.close()
    return {"save": save, "raw": raw, "load": load, "takeover": takeover}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lease-ms", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke test")
    parser.add_argument("--redis-url", default=None, help="default: a private server (embedded launcher)")
    args = parser.parse_args()
    if args.quick:
        args.agents, args.rounds, args.lease_ms = 20_000, 1, 300
    agents = [agent(n) for n in range(args.agents)]
    runs: list[dict[str, float]] = []
    with redis_server(args.redis_url) as url:
        for round_no in range(args.rounds):
            runs.append(one_round(url, f"benchet{round_no}", agents, args.lease_ms))
    med = {what: median([run[what] for run in runs]) for what in runs[0]}
    rows = [
        {"measure": what, "agents": args.agents, "s (median)": round(med[what], 3),
         "agents/s": round(args.agents / med[what]) if what != "takeover" else "",
         "rounds": [round(run[what], 3) for run in runs]}
        for what in ("raw", "load", "save", "takeover")
    ]  # fmt: skip
    per_100k = 100_000 / args.agents
    figures = [
        figure("checkpoint load, s per 100,000 agents", round(med["load"] * per_100k, 3), "s",
               goal=GOAL_S_PER_100K, issue=12),
        figure("checkpoint load / raw HSCAN of the same hash", round(med["load"] / med["raw"], 2), "ratio"),
        figure("checkpoint save of every agent, s per 100,000 agents", round(med["save"] * per_100k, 3), "s"),
        figure("lease expiry -> successor has loaded the shard, s per 100,000 agents",
               round(med["takeover"] * per_100k, 3), "s", goal=GOAL_S_PER_100K, issue=12),
    ]  # fmt: skip
    report("engine_takeover", rows, {"args": vars(args)}, figures)
    for item in figures:
        print(f"{item['figure']}: {item['value']} {item['unit']} (goal {item['better']} than {item['goal']})")


if __name__ == "__main__":
    main()
