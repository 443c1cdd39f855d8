"""Overspend: how much a runaway spends past its budget before ``halt = true`` stops its loop.

Issue 13's figure: an agent spending $0.05 per beat every 100 ms against a $1.00 budget with
``halt = true`` spends at most 2 beats' cost ($0.10) past the limit. The baseline, from the same
run, is the beat's own cost: the overspend is also stated in beats.

Each round starts a fresh agent process (its own name, so its own budget window) with default
producer settings that beats ``heartbeat(cost=0.05)`` every 100 ms until ``Halted`` is raised,
then prints how many beats it made and exits. One detector worker process with default settings
(``agentwatch worker detectors``) prices, totals and halts. Overspend = what the spend ledger
holds for the agent's day once the worker caught up (checked against beats x $0.05: every beat
is counted once) minus the $1.00 limit. Rounds run one after the other; the table shows each,
the figures are the worst round and the median.

    python benchmarks/budget_overspend.py [--redis-url URL] [--rounds 10] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent))
import redis
from _common import figure, median, percentile, redis_server, report

from agentwatch.keys import Keys
from agentwatch.redisconn import server_time_ms
from agentwatch.spend import Ledger, window_of

COST = 0.05
LIMIT = 1.00
PERIOD_S = 0.1
GOAL_USD = 2 * COST
PREFIX = "aw-bench-budget"

AGENT = textwrap.dedent(
    """
    import sys, time
    from producers import Halted, Producer
    agent = Producer(sys.argv[3], redis_url=sys.argv[1], prefix=sys.argv[2])  # default settings
    beats = 0
    while beats < 1000:
        beats += 1
        try:
            agent.heartbeat(cost=float(sys.argv[4]))
        except Halted:
            break
        time.sleep(float(sys.argv[5]))
    agent.close()
    print(beats, flush=True)
    """
)


def one_round(url: str, keys: Keys, r: Any, name: str) -> dict[str, Any]:
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", AGENT, url, PREFIX, name, str(COST), str(PERIOD_S)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    beats = int(out.stdout.split()[-1])
    ledger = Ledger(r, keys, ZoneInfo("UTC"))
    wid = window_of("day", server_time_ms(r), ledger.clock.zone).id
    deadline = time.monotonic() + 30
    while True:  # the worker applies the last beats (sent at the agent's exit) within a tick
        spent = ledger.read([name]).get(name, {}).get(wid)
        if (spent is not None and spent.beats >= beats) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    total = spent.cost if spent is not None else 0.0
    past = total - LIMIT
    return {
        "agent": name, "beats": beats, "counted": spent.beats if spent else 0, "spent_usd": round(total, 4),
        "past_limit_usd": round(past, 4), "past_limit_beats": round(past / COST, 2),
        "seconds": round(time.monotonic() - started, 2),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", help="default: a private server (agentwatch.embedded)")
    parser.add_argument("--rounds", type=int, default=None, help="agents, one after the other (default 10)")
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 10)
    with redis_server(args.redis_url) as url, tempfile.TemporaryDirectory(prefix="aw-bench-") as tmp:
        config = Path(tmp) / "pipeline.toml"
        config.write_text(
            f'[redis]\nurl = "{url}"\nprefix = "{PREFIX}"\n'
            f'[[budgets]]\nagents = "spender-*"\nper = "day"\nlimit = {LIMIT}\nhalt = true\n'
        )
        keys = Keys(PREFIX)
        r = redis.Redis.from_url(url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
        worker = subprocess.Popen(
            [sys.executable, "-m", "agentwatch", "worker", "detectors", "--config", str(config)], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while r.zcard(keys.workers) < 1:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise SystemExit("the detector worker did not start")
                time.sleep(0.05)
            stamp = int(time.time())
            rows = [one_round(url, keys, r, f"spender-{stamp}-{i}") for i in range(rounds)]
        finally:
            worker.terminate()
            worker.wait(30)
    past = [row["past_limit_usd"] for row in rows]
    figures = [
        figure("spend past the limit, worst round", max(past), "USD", goal=GOAL_USD, issue=13),
        figure("spend past the limit, median round", median(past), "USD", goal=GOAL_USD, issue=13),
    ]
    spread = " / ".join(f"{v:.3f}" for v in (min(past), median(past), percentile(past, 90), max(past)))
    rows.append({"agent": "min / median / p90 / max (USD past the limit)", "past_limit_usd": spread})
    extra = {"cost_per_beat_usd": COST, "limit_usd": LIMIT, "period_s": PERIOD_S}
    report("budget_overspend", rows, extra, figures)
    if any(row.get("counted") not in (None, row.get("beats")) for row in rows[:-1]):
        raise SystemExit("a beat was lost or counted twice: the ledger does not match the agent")


if __name__ == "__main__":
    main()
