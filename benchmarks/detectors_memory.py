"""Redis memory per monitored agent: everything the detectors keep, over ``--agents`` agents.

Each agent (default 100,000) sends what a real one does in its first quarter minute: a ``start``,
beats with tokens, cost, model and fingerprint, and 13 pulses with RSS one second apart, so its
memory window is full (``[detectors.memory] window = "12s"``: 12 one-second buckets; the
default window is 1 h in 12 five-minute buckets: the same 12 points). The fleet is healthy: no
incident is open at the end (their records would count too). One detector worker in this
process applies them all. Then the event stream (not detector state: producers cap it and the
workers trim it) is deleted and memory is measured two ways:

* ``MEMORY USAGE <key> SAMPLES 0`` summed over every detector key (states, timers, fleet index,
  checkpoint, undelivered decisions, lease, clock, incidents, outbox);
* ``INFO memory`` ``used_memory`` minus the same figure before the first event (this includes
  the start facts the same worker records for status and reports, ``{0}:facts``, shown apart).

Target (issues 4 and 12): <= 1 KB per agent.

    python benchmarks/detectors_memory.py [--agents 100000] [--quick] [--baseline-json PATH]

``--quick``: 10,000 agents (run_all's quick mode; fixed costs weigh a little more per agent).
``--baseline-json``: another commit's JSON of this script (``benchmarks/old_engine.py`` stores the
pre-rewrite engine's), shown beside this run's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, report_beside

from agentwatch import codec, config, plugins
from agentwatch.embedded import EmbeddedRedis
from agentwatch.redisconn import connect
from agentwatch.workers import detector_worker
from detectors.agent import read_agents

PULSES = 13
SECTIONS = {
    "silence": {"after": "10m"},  # the run lasts longer than the agents' simulated life
    "stall": {"after": "10m"},
    "memory": {"window": "12s", "horizon": "72s"},  # the defaults' 1 h and 6 h, scaled down
}


def fill(client: redis.Redis, stream: str, agents: int) -> int:
    """Every agent's first 14 s, as entries with explicit (past) ids, one simulated ms apart per 100."""
    base_ms = int(time.time() * 1000) - (PULSES + 2) * 1000
    per_ms = max(1, 2 * agents // 1000)  # a round's events spread over its second
    sent, in_round = 0, 0
    pipe = client.pipeline(transaction=False)

    def add(n_round: int, agent_no: int, event: dict[str, object]) -> None:
        nonlocal sent, in_round
        if agent_no == 0 and event["kind"] != "beat":
            in_round = 0
        ms = base_ms + n_round * 1000 + in_round // per_ms
        pipe.xadd(stream, {"d": codec.encode(event)}, id=f"{ms}-{in_round % per_ms}")
        in_round += 1
        sent += 1
        if sent % 5000 == 0:
            pipe.execute()

    for n_round in range(PULSES + 1):
        for agent_no in range(agents):
            agent = f"fleet-agent-{agent_no:06d}"
            head = {"v": 1, "agent": agent, "ts": 0.0, "run": f"{agent_no:016x}", "seq": 0}
            if n_round == 0:
                add(0, agent_no, {**head, "kind": "start", "interval": 5.0, "pid": 4242, "host": "h"})
                continue
            seq = 2 * n_round - 1
            rss = (180 << 20) + ((agent_no + n_round) % 5) * 300_000  # steady, a little noise
            add(n_round, agent_no, {**head, "seq": seq, "kind": "pulse", "rss": rss, "interval": 5.0})
            tokens = 250 + (agent_no * 31 + n_round * 7) % 400
            beat = {"kind": "beat", "tokens": tokens, "cost": tokens * 3e-6, "model": "gpt-x",
                    "fp": f"ticket-{agent_no}-{n_round}"}  # fmt: skip
            add(n_round, agent_no, {**head, "seq": seq + 1, **beat})
    pipe.execute()
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=None, help="default 100,000 (--quick: 10,000)")
    parser.add_argument("--quick", action="store_true", help="10,000 agents")
    parser.add_argument(
        "--baseline-json", type=Path, default=None, help="an earlier commit's JSON to show beside"
    )
    args = parser.parse_args()
    args.agents = args.agents or (10_000 if args.quick else 100_000)
    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="aw-bench-"))).start()
    client = redis.Redis.from_url(server.url)
    prefix = "benchmem"
    try:
        before = int(client.info("memory")["used_memory"])
        detectors, problems = plugins.load_detectors(SECTIONS)
        assert not problems, problems
        settings = config.PipelineSettings().model_copy(
            update={"redis": config.RedisSection(prefix=prefix), "detectors": SECTIONS}
        )
        pipeline = config.Pipeline(settings=settings, source="bench", detectors=detectors)
        keys = pipeline.keys
        events = fill(client, keys.events(), args.agents)
        client.xgroup_create(keys.events(), "detectors", id="0")
        worker = detector_worker(pipeline, connect(settings, server.url))
        started = time.perf_counter()
        while worker.stats.processed < events:
            worker.run_once()
        applied_s = time.perf_counter() - started
        alerts = client.xlen(keys.alerts)  # the pipeline-lag alert only: these events are a backlog
        client.delete(keys.events(), keys.alerts)  # not detector state (see the docstring)
        detector_keys = [keys.states(0), keys.checkpoint(0), keys.decided(0), keys.lease(0), keys.epoch(0),
                         keys.clock(0), keys.incidents(0), keys.outbox(0)]  # fmt: skip
        usage = {key: int(client.memory_usage(key, samples=0) or 0) for key in detector_keys}
        # Not detector state, but written by the same worker (agentwatch/facts.py): shown apart.
        facts = int(client.memory_usage(keys.facts(0), samples=0) or 0)
        after = int(client.info("memory")["used_memory"])
        windows = sum(1 for a in read_agents(client, keys).values() if "memory" in a["states"])
        worker.client.close()
    finally:
        client.close()
        server.cleanup()
    per_agent = sum(usage.values()) / args.agents
    rows: list[dict[str, Any]] = [
        {"key": key.split(":", 1)[1], "bytes per agent": round(size / args.agents, 1)}
        for key, size in usage.items()
    ]
    rows.append({"key": "all detector keys (MEMORY USAGE)", "bytes per agent": round(per_agent, 1)})
    facts_row = {"key": "{0}:facts (start facts; not detector state)"}
    rows.append({**facts_row, "bytes per agent": round(facts / args.agents, 1)})
    rows.append(
        {
            "key": "used_memory delta (INFO memory)",
            "bytes per agent": round((after - before) / args.agents, 1),
        }
    )
    extra = {"agents": args.agents, "events": events, "applied_s": round(applied_s, 1),
             "rss_windows": windows, "alerts": alerts, "target_bytes": 1024}  # fmt: skip
    figures = [
        figure("Redis memory per agent, detector keys (MEMORY USAGE)", per_agent, "B", goal=1024, issue=12),
        figure("Redis memory per agent, used_memory delta (with start facts)", (after - before) / args.agents,
               "B", issue=12),
    ]  # fmt: skip
    report_beside("detectors_memory", rows, extra, figures, args.baseline_json)
    print(f"{per_agent:.0f} bytes per agent (target <= 1024); {events:,} events applied in {applied_s:.1f}s")


if __name__ == "__main__":
    main()
