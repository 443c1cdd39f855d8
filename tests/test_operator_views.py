"""``status --json``, ``alerts --json`` and ``report --json`` against a scenario with known incidents.

Real agent processes (the producer), a real detector worker, real CLI subprocesses. The scenario:
``steady`` beats throughout; ``flaky`` is SIGKILLed and restarted 3 s later (a known outage);
``quitter`` shuts down deliberately; ``crasher`` dies of an uncaught exception.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from agents_detect.kit import fired, pipeline_for, resolved, worker_for

from agentwatch.codec import decode, entry_ms
from agentwatch.keys import Keys
from detectors.agent import read_agents

from helpers import caught_up, running, wait_for

pytestmark = pytest.mark.slow

AGENT = Path(__file__).resolve().parent / "agents_detect" / "agent.py"
OUTAGE_S = 3.0


def spawn(redis_url: str, prefix: str, name: str, mode: str) -> subprocess.Popen[bytes]:
    # Declared interval 0.5 s, a beat every 0.1 s: `status` calls an agent late after two
    # declared intervals without a beat, and 1 s holds for a live agent on a loaded box (with
    # the interval at 0.1 s that was 0.2 s, a margin a busy CPU can eat).
    env = {**os.environ, "AGENTWATCH_REDIS_URL": redis_url, "AGENTWATCH_PREFIX": prefix,
           "AGENTWATCH_AGENT": name, "AGENTWATCH_INTERVAL": "0.5", "AW_PACE": "0.1",
           "AGENTWATCH_PULSE_INTERVAL": "0.1", "AW_WARMUP": "5"}  # fmt: skip
    return subprocess.Popen([sys.executable, str(AGENT), mode], env=env, stderr=subprocess.DEVNULL)


def cli(redis_url: str, prefix: str, *args: str) -> Any:
    env = {**os.environ, "AGENTWATCH_REDIS__URL": redis_url, "AGENTWATCH_REDIS__PREFIX": prefix}
    result = subprocess.run(
        [sys.executable, "-m", "agentwatch", *args], env=env, capture_output=True, text=True, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def scenario(redis_url: str, prefix: str, r: redis.Redis) -> Iterator[dict[str, Any]]:
    """Runs the scenario with a detector worker; yields the known facts (times in Redis ms)."""
    keys = Keys(prefix)
    pipeline = pipeline_for(prefix, redis_url, silence={"after": "1s"}, stall={"after": "1s"})
    worker = worker_for(pipeline, redis_url)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with running(worker):
            processes += [spawn(redis_url, prefix, name, mode) for name, mode in
                          [("steady", "steady"), ("quitter", "shutdown"), ("crasher", "crash")]]  # fmt: skip
            flaky = spawn(redis_url, prefix, "flaky", "steady")
            processes.append(flaky)
            wait_for(lambda: _beats(r, keys, "flaky") >= 10, what="flaky to beat")
            flaky.kill()
            flaky.wait()
            last_before = wait_for(lambda: _last_event_ms(r, keys, "flaky"), what="flaky's last event")
            wait_for(lambda: fired(r, keys, "silence", "flaky"), timeout=10, what="silence for flaky")
            time.sleep(max(0.0, OUTAGE_S - 1.5))  # stay down for ~3 s in all (1.5 s: the allowance)
            again = spawn(redis_url, prefix, "flaky", "steady")
            processes.append(again)
            wait_for(lambda: resolved(r, keys, "silence", "flaky"), timeout=10, what="flaky back")
            back = min(entry_ms(e) for e, f in r.xrange(keys.events(), min=f"{last_before + 1}-0")
                       if b"flaky" in f[b"d"])  # fmt: skip
            wait_for(lambda: fired(r, keys, "exit", "crasher"), timeout=10, what="crasher's exit alert")
            wait_for(lambda: _retired(r, keys, "quitter"), timeout=10, what="quitter retired")
            yield {"down_ms": back - last_before, "keys": keys, "steady": processes[0], "r": r}
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()


def _beats(r: redis.Redis, keys: Keys, agent: str) -> int:
    return sum(1 for _, f in r.xrange(keys.events()) if b"\xa4beat" in f[b"d"] and agent.encode() in f[b"d"])


def _last_event_ms(r: redis.Redis, keys: Keys, agent: str) -> int:
    ids = [e for e, f in r.xrange(keys.events()) if agent.encode() in f[b"d"]]
    return entry_ms(ids[-1]) if ids else 0


def _retired(r: redis.Redis, keys: Keys, agent: str) -> bool:
    return bool(read_agents(r, keys).get(agent, {}).get("retired"))


def test_status_alerts_and_report_tell_the_scenario_as_it_happened(
    scenario: dict[str, Any], redis_url: str, prefix: str
) -> None:
    status = json.loads(cli(redis_url, prefix, "status", "--json"))
    states = {a["agent"]: a["state"] for a in status["agents"]}
    assert states == {"steady": "ok", "flaky": "ok", "quitter": "retired", "crasher": "exited"}
    by_name = {a["agent"]: a for a in status["agents"]}
    crasher = by_name["crasher"]
    assert [i["detector"] for i in crasher["incidents"]] == ["exit"]
    assert "ValueError" in crasher["incidents"][0]["summary"]
    steady = by_name["steady"]
    assert steady["interval_s"] == 0.5 and steady["last_beat_age_s"] < 2
    # beats carry tokens but no model and no cost: the cost is unknown, never $0.00
    assert steady["tokens_total"] > 0 and steady["cost_today"] is None
    assert steady["unpriced_beats_today"] > 0
    assert steady["host"] and steady["pid"] and steady["run"]
    health = status["pipeline"]
    assert health["workers_alive"] == {"detectors": 1} and health["deadletter"] == 0
    assert (health["detecting"], health["detecting_reason"]) == (True, None)
    assert isinstance(health["lag"], int) and isinstance(health["pending"], int)

    lines = [json.loads(line) for line in cli(redis_url, prefix, "alerts", "--json").splitlines()]
    seen = [(a["agent"], a["detector"], a["status"]) for a in lines]
    assert ("flaky", "silence", "firing") in seen and ("flaky", "silence", "resolved") in seen
    assert ("crasher", "exit", "firing") in seen
    assert not [s for s in seen if s[0] in ("steady", "quitter")]

    report = json.loads(cli(redis_url, prefix, "report", "--json", "--since", "5m"))
    rows = {row["agent"]: row for row in report["agents"]}
    flaky = rows["flaky"]
    observed_s = (_ms(report["to"]) - _ms(rows["flaky"]["first_seen"])) / 1000
    known_uptime = 100 * (1 - scenario["down_ms"] / 1000 / observed_s)
    assert abs(flaky["uptime_pct"] - known_uptime) <= 1.0, (flaky, scenario["down_ms"], observed_s)
    assert abs(flaky["down_s"] - scenario["down_ms"] / 1000) <= 0.3
    (outage,) = [i for i in flaky["incidents"] if i["detector"] == "silence"]
    assert not outage["open"] and abs(outage["duration_s"] - scenario["down_ms"] / 1000) <= 0.3
    assert rows["steady"]["uptime_pct"] == 100.0 and rows["steady"]["incidents"] == []
    assert rows["crasher"]["uptime_pct"] < 100.0  # down since its crash, still open
    assert [i["open"] for i in rows["crasher"]["incidents"]] == [True]
    assert report["fleet"]["agents"] == 4 and report["fleet"]["incidents"] == 2
    assert report["fleet"]["beats"] == sum(row["beats"] for row in rows.values()) > 0

    # Exact counts: stop the steady agent, let the worker catch up, compare with the stream.
    scenario["steady"].kill()
    scenario["steady"].wait()
    r, keys = scenario["r"], scenario["keys"]
    wait_for(lambda: caught_up(r, keys), what="the detector group to apply every event")
    report = json.loads(cli(redis_url, prefix, "report", "--json", "--since", "5m", "--agent", "steady"))
    (steady_row,) = report["agents"]
    beats, tokens = _beats_of(redis_url, keys, "steady")
    assert (steady_row["beats"], steady_row["tokens"]) == (beats, tokens)


def _ms(iso: str) -> int:
    return round(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def _beats_of(redis_url: str, keys: Keys, agent: str) -> tuple[int, int]:
    """(beats, tokens) of ``agent`` on the events stream."""
    client = redis.Redis.from_url(redis_url)
    try:
        events = [decode(f[b"d"]) for _, f in client.xrange(keys.events())]
    finally:
        client.close()
    beats = [e for e in events if e["agent"] == agent and e["kind"] == "beat"]
    return len(beats), sum(e.get("tokens", 0) for e in beats)
