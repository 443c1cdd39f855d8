"""Budgets end to end: real agent processes, real detector worker processes, real Redis.

A budget with ``halt = true`` warns, then exceeds, then halts a spending agent inside its own
loop, with two detector workers of which one is SIGKILLed mid-run; the day's total is still
exactly the sum of the beats' costs (nothing lost with the dead worker, nothing counted twice
when its batches are applied again). A halted agent that exits with a failing code is
``halted`` in status and pages nobody; one that catches ``Halted`` and keeps beating keeps
getting it, and its spending still counts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
from typer.testing import CliRunner

from agentwatch.cli import app
from agentwatch.keys import Keys
from agentwatch.redisconn import server_time_ms
from agentwatch.spend import Ledger, Spent, window_of

from helpers import caught_up, wait_for

pytestmark = pytest.mark.slow

SPENDER = Path(__file__).resolve().parent / "agents" / "spender.py"
UTC = ZoneInfo("UTC")


@pytest.fixture
def config(tmp_path: Path, redis_url: str, prefix: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(
        f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n'
        '[worker]\ntick = "50ms"\nblock = "50ms"\nclaim_idle = "1s"\n'
        '[[budgets]]\nagents = "spender-*"\nper = "day"\nlimit = 1.0\nwarn_at = 0.5\nhalt = true\n'
    )
    return path


@pytest.fixture
def procs() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(args: list[str], **env: str) -> subprocess.Popen[str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
        environ.update(PYTHONUNBUFFERED="1", **env)
        proc = subprocess.Popen(args, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.communicate(timeout=10)


def spent_today(r: redis.Redis, keys: Keys, agent: str) -> Spent:
    wid = window_of("day", server_time_ms(r), UTC).id
    return Ledger(r, keys, UTC).read([agent]).get(agent, {}).get(wid) or Spent()


def alerts(r: redis.Redis, keys: Keys, agent: str) -> list[dict[str, Any]]:
    found = [json.loads(fields[b"d"]) for _, fields in r.xrange(keys.alerts)]
    return [a for a in found if a["agent"] == agent]


def spender(start: Callable[..., subprocess.Popen[str]], redis_url: str, prefix: str, name: str,
            **env: str) -> subprocess.Popen[str]:  # fmt: skip
    settings = {"AGENTWATCH_REDIS_URL": redis_url, "AGENTWATCH_PREFIX": prefix, "AGENTWATCH_AGENT": name,
                "AGENTWATCH_INTERVAL": "0.05", "AGENTWATCH_PULSE_INTERVAL": "0.2"}  # fmt: skip
    return start([sys.executable, str(SPENDER)], **settings, **env)


def test_a_budget_warns_exceeds_and_halts_with_a_worker_killed_mid_run(
    config: Path, procs: Callable[..., subprocess.Popen[str]], redis_url: str, prefix: str,
    r: redis.Redis, keys: Keys,
) -> None:  # fmt: skip
    worker = [sys.executable, "-m", "agentwatch", "worker", "detectors", "--config", str(config)]
    doomed, survivor = procs(worker), procs(worker)
    wait_for(lambda: r.zcard(keys.workers) >= 2, timeout=30, what="two detector workers up")
    agent = spender(procs, redis_url, prefix, "spender-1")
    wait_for(lambda: spent_today(r, keys, "spender-1").cost >= 0.3, timeout=30, what="some spending")
    doomed.kill()  # SIGKILL: whatever it had read and not acknowledged stays pending
    assert agent.wait(timeout=60) == 3, agent.stderr.read() if agent.stderr else ""
    told = json.loads((agent.stdout.read() if agent.stdout else "").strip().splitlines()[-1])
    assert told["raised"] == 1 and "budget" in told["reason"]
    wait_for(lambda: caught_up(r, keys), timeout=30, what="the survivor applied everything, reclaimed too")
    assert survivor.poll() is None

    spent = spent_today(r, keys, "spender-1")
    assert spent.beats == told["beats"]  # every beat counted once: none lost, none twice
    assert spent.cost == pytest.approx(0.05 * told["beats"], rel=1e-9)

    mine = alerts(r, keys, "spender-1")
    budget = [(a["status"], a["severity"]) for a in mine if a["detector"] == "budget"]
    assert budget == [("firing", "warning"), ("firing", "critical")], mine
    halts = [a for a in mine if a["detector"] == "halt"]
    assert [a["details"]["by"] for a in halts] == ["budget"]
    assert not [a for a in mine if a["detector"] in ("exit", "silence", "stall")]  # halted: nobody paged

    runner = CliRunner()
    result = runner.invoke(app, ["status", "--json", "--config", str(config)])
    assert result.exit_code == 0, result.output
    row = next(a for a in json.loads(result.output)["agents"] if a["agent"] == "spender-1")
    assert row["state"] == "halted" and row["halt"]["by"] == "budget"
    assert row["cost_today"] == pytest.approx(spent.cost)
    assert row["budget"]["used_pct"] >= 100


def test_an_agent_that_catches_halted_keeps_getting_it_and_its_spend_counts(
    config: Path, procs: Callable[..., subprocess.Popen[str]], redis_url: str, prefix: str,
    r: redis.Redis, keys: Keys,
) -> None:  # fmt: skip
    procs([sys.executable, "-m", "agentwatch", "worker", "detectors", "--config", str(config)])
    agent = spender(procs, redis_url, prefix, "spender-2", AW_STUBBORN="10")
    assert agent.wait(timeout=60) == 3
    told = json.loads((agent.stdout.read() if agent.stdout else "").strip().splitlines()[-1])
    assert told["raised"] == 11  # the first Halted and every one of the 10 beats after it
    wait_for(lambda: spent_today(r, keys, "spender-2").beats == told["beats"], timeout=30,
             what="every beat counted, the halted ones too")  # fmt: skip
    assert spent_today(r, keys, "spender-2").cost == pytest.approx(0.05 * told["beats"], rel=1e-9)
