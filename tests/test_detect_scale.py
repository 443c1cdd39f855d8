"""Scale and correctness across workers.

* A healthy fleet of 1,000 agents, real producers in four processes, beating with +-30%
  jitter and bursty-but-normal token use, pulsing their RSS, for the whole test: zero alerts.
* The same scripted failures fed to one worker process and, in parallel, to two worker
  processes of which one is SIGKILLed mid-run, caught holding unacknowledged entries or
  unpublished decisions: once nothing is left to reclaim or publish, both produced exactly the
  expected alerts, none duplicated, none missing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from agents_detect.kit import duplicates, pipeline_for, transitions, worker_for

from agentwatch import codec
from agentwatch.keys import Keys
from detectors.agent import read_agents
from detectors.leases import parse_lease
from detectors.tokens import TokenState

from helpers import running, wait_for

pytestmark = pytest.mark.slow
MB = 1 << 20


FLEET = Path(__file__).resolve().parent / "agents_detect" / "fleet.py"


def test_a_healthy_fleet_of_200_agents_raises_nothing(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    """Four agent processes, 50 real producers each (tests/agents_detect/fleet.py), beating
    every 0.5 s +-30% with bursty-but-normal token use and pulsing their process's RSS, for 7 s
    against two detector workers: past every warm-up, and not one alert.

    200, not 1,000: a thousand producer threads on a loaded 2-core box starve the agents' own
    work loops for seconds (their stalls are then real, not false). The fleet at scale, with its
    false alarms counted, is benchmarks/chaos.py's ``fleet`` scenario."""
    pipeline = pipeline_for(
        prefix, redis_url,
        # 10 x the interval: +-30% jitter never comes near it, and a 2-core box running the
        # fleet, two workers and other load (CI's, a CPU hog) can starve a process's work loop
        # for a second or two.
        silence={"after": "5s"}, stall={"after": "5s"}, lag={"after": "5s"},
        tokens={"warmup": 6, "window": "1s"},
        memory={"window": "4s", "points": 8, "min_points": 6, "horizon": "8s"},
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
    env.update(AGENTWATCH_REDIS_URL=redis_url, AGENTWATCH_PREFIX=prefix, AGENTWATCH_INTERVAL="0.5",
               AGENTWATCH_PULSE_INTERVAL="1.0")  # fmt: skip
    with running(worker_for(pipeline, redis_url, "w1")), running(worker_for(pipeline, redis_url, "w2")):
        fleet = [subprocess.Popen([sys.executable, str(FLEET), str(first), "50", "7"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for first in range(0, 200, 50)]  # fmt: skip
        try:
            outputs = [proc.communicate(timeout=30) for proc in fleet]
        finally:
            for proc in fleet:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        assert [proc.returncode for proc in fleet] == [0] * 4, [err for _, err in outputs]
        stream = keys.events()

        def drained() -> bool:
            return r.xpending(stream, "detectors")["pending"] == 0 and not r.xinfo_groups(stream)[0]["lag"]

        wait_for(drained, timeout=10, what="every event applied")
    beats = sum(int(out.split()[-1]) for out, _ in outputs)
    assert beats > 2_000  # about 14 beats per agent
    records = read_agents(r, keys, states={"tokens": TokenState})
    assert len(records) == 200 and all(rec["retired"] for rec in records.values())  # shut down at the end
    learned = [rec["states"]["tokens"]["learned"] for rec in records.values()]
    assert min(learned) > 6  # every baseline past its warm-up: judged
    assert transitions(r, keys) == []


# -- one worker vs two workers with one SIGKILLed ------------------------------------------------

INCIDENTS = [
    ("dies", "silence"),
    ("crashes", "exit"),
    ("spikes", "tokens"),
    ("loops", "loop"),
    ("stalls", "stall"),
]
EXPECTED = sorted(
    (agent, detector, status) for agent, detector in INCIDENTS for status in ("firing", "resolved")
)

CONFIG = """
[redis]
url = "{url}"
prefix = "{prefix}"
[worker]
tick = "50ms"
block = "50ms"
claim_idle = "500ms"
[detectors.silence]
after = "800ms"
[detectors.stall]
after = "800ms"
[detectors.tokens]
warmup = 5
recover_after = 3
repeat = 10
"""


SPIKE_BEATS = 6
"""Beats of 5000 tokens (a 0.3 s spike at the script's 50 ms pace)."""
LOOP_BEATS = 20
"""Beats repeating one item (1 s of them at the script's pace; ``repeat = 10`` fires)."""


class Script:
    """Scripted agents, mirrored into several pipelines' streams at once (same times, same events)."""

    def __init__(self, r: redis.Redis, streams: list[str]) -> None:
        self.r, self.streams = r, streams
        self.seqs: dict[tuple[str, str], int] = {}
        self.halt = threading.Event()

    def send(self, agent: str, kind: str, run: str = "r1", **fields: Any) -> None:
        seq = self.seqs.get((agent, run), 0)
        self.seqs[(agent, run)] = seq + 1
        event = {"v": 1, "agent": agent, "kind": kind, "ts": 0.0, "run": run, "seq": seq, **fields}
        data = codec.encode(event)
        pipe = self.r.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xadd(stream, {"d": data})
        pipe.execute()

    def run(self) -> None:
        """About 4.5 s: every failure happens once, everyone ends healthy and beating.

        Silence, exit and stall are about time, so their phases are time windows; the token
        spike and the repeated item are about counts (beats over a baseline, repeats of one
        fp), so they are counted beats: a loaded box that stretches the 50 ms steps leaves
        fewer steps in a window, never fewer spikes or repeats."""
        healthy = [f"ok-{i}" for i in range(20)]
        everyone = ["dies", "crashes", "spikes", "loops", "stalls", *healthy]
        for agent in everyone:
            self.send(agent, "start", interval=0.1)
        runs = {agent: "r1" for agent in everyone}
        t0 = time.monotonic()
        step = spiked = looped = after_loop = 0
        while not self.halt.is_set():
            t = time.monotonic() - t0
            if t > 4.5 and looped == LOOP_BEATS and after_loop >= 5:
                break
            for agent in everyone:
                run = runs[agent]
                if agent == "dies" and 1.0 < t < 2.5:
                    continue  # silent for 1.5 s: gone, then back
                if agent == "crashes" and 1.2 < t < 2.4:
                    if runs[agent] == "r1":
                        self.send(agent, "exit", run=run, reason="exception", code=1, error="ValueError: x")
                        runs[agent] = "r2"
                    continue
                if agent == "crashes" and runs[agent] == "r2" and ("crashes", "r2") not in self.seqs:
                    self.send(agent, "start", run="r2", interval=0.1)
                if agent == "stalls" and 1.0 < t < 2.6:
                    self.send(agent, "pulse", run=run, stack='  File "/app/x.py", line 3, in work\n')
                    continue
                tokens = 200 + step % 7 * 10
                if agent == "spikes" and t > 1.5 and spiked < SPIKE_BEATS:
                    tokens, spiked = 5000, spiked + 1
                fp = f"{agent}-{step}"
                if agent == "loops" and t > 1.0:
                    if looped < LOOP_BEATS:
                        fp, looped = "same-item", looped + 1
                    else:
                        after_loop += 1
                self.send(agent, "beat", run=run, tokens=tokens, fp=fp)
            step += 1
            self.halt.wait(0.05)
        for agent in everyone:  # retire everyone: nothing may follow the script's own alerts
            self.send(agent, "exit", run=runs[agent], reason="shutdown", code=0)


def owner_pid(r: redis.Redis, keys: Keys) -> int | None:
    """The pid of the worker holding shard 0's lease (owners are named host-pid-random)."""
    lease = parse_lease(r.get(keys.lease(0)))
    return int(lease[1].rsplit("-", 2)[1]) if lease else None


def holds(r: redis.Redis, keys: Keys, pid: int) -> bool:
    """Whether the worker process ``pid`` owns the shard and holds unacknowledged entries or
    decisions it has not published."""
    if owner_pid(r, keys) != pid:
        return False
    consumers = r.xinfo_consumers(keys.events(), "detectors")
    if any(f"-{pid}-" in str(c["name"]) and c["pending"] for c in consumers):
        return True
    return bool(r.llen(keys.decided(0)))


def settled(r: redis.Redis, keys: Keys) -> bool:
    """No decision pending anywhere: every entry acknowledged, every decision and alert published."""
    pending = r.xpending(keys.events(), "detectors")["pending"]
    return pending == 0 and r.llen(keys.decided(0)) == 0 and r.hlen(keys.outbox(0)) == 0


def start_worker(config: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
    return subprocess.Popen(
        [sys.executable, "-m", "agentwatch", "worker", "detectors", "--config", str(config)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_two_workers_one_sigkilled_alert_exactly_like_one(
    redis_url: str, r: redis.Redis, tmp_path: Path, processes: list[subprocess.Popen[bytes]],
    prefix: str, request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    solo, duo = Keys(prefix + "a"), Keys(prefix + "b")

    def cleanup() -> None:
        for keys in (solo, duo):
            for key in r.scan_iter(f"{keys.prefix}:*"):
                r.delete(key)

    request.addfinalizer(cleanup)
    for keys in (solo, duo):
        path = tmp_path / f"{keys.prefix}.toml"
        path.write_text(CONFIG.format(url=redis_url, prefix=keys.prefix))
        processes += [start_worker(path) for _ in range(1 if keys is solo else 2)]
    ready: Callable[[], bool] = lambda: r.zcard(solo.workers) == 1 and r.zcard(duo.workers) == 2  # noqa: E731
    wait_for(ready, timeout=20, what="three workers up")
    script = Script(r, [solo.events(), duo.events()])
    thread = threading.Thread(target=script.run, daemon=True)
    thread.start()
    time.sleep(1.6)  # in the middle of it all: silence, exit, tokens and loop under way
    duo_pids = {p.pid: p for p in processes[1:]}
    wait_for(lambda: owner_pid(r, duo) in duo_pids, timeout=5, what="a duo worker owning the shard")
    victim = duo_pids[owner_pid(r, duo)]  # the owner: killing the standby would prove nothing

    def caught_holding_work() -> bool:
        """Freeze the victim; keep it frozen (to be killed) only if it holds entries it has not
        acknowledged or decisions it has not published: else the kill would prove nothing."""
        victim.send_signal(signal.SIGSTOP)
        held = holds(r, duo, victim.pid)
        if not held:
            victim.send_signal(signal.SIGCONT)
        return held

    wait_for(caught_holding_work, timeout=5, interval=0.003, what="the victim caught with work in hand")
    victim.send_signal(signal.SIGKILL)
    thread.join(10)
    for keys in (solo, duo):
        done = lambda keys=keys: len(transitions(r, keys)) >= len(EXPECTED) and settled(r, keys)  # noqa: E731
        try:
            wait_for(done, timeout=30)
        except AssertionError:
            name = "one worker" if keys is solo else "two workers"
            raise AssertionError(
                f"{name}: alerts {sorted(transitions(r, keys))} (expected {EXPECTED}); settled: "
                f"{settled(r, keys)}, pending {r.xpending(keys.events(), 'detectors')['pending']}, "
                f"decided {r.llen(keys.decided(0))}, lease {r.get(keys.lease(0))!r}"
            ) from None
    assert sorted(transitions(r, solo)) == sorted(transitions(r, duo)) == EXPECTED
    assert duplicates(r, solo) == duplicates(r, duo) == []
    assert victim.wait(timeout=5) == -signal.SIGKILL
    assert all(p.poll() is None for p in processes if p is not victim)
