"""Chaos matrix (issue 11): does every death page exactly once, in order, and nothing else?

Black box, real processes only: a private Redis (``agentwatch.embedded``), the pipeline as a user
runs it (``agentwatch up`` against that Redis, 2 detector and 2 notifier workers, restarted by
``up`` when killed), a jittered fleet of healthy agents in one process, a few *victim* agents in
their own processes, and a webhook receiver here that records every request. Each scenario
SIGKILLs some victims at known moments and freezes others (SIGSTOP) for a while, so that their
silence fires and then resolves, inflicts its faults, waits until every victim's alerts arrived
(or a deadline), then a quiet spell, and judges what the receiver got:

* **lost**: a victim whose ``silence`` firing never arrived, or a frozen one whose ``resolved``
  never did (the receiver's incident stays open for ever);
* **duplicated**: a delivery of an alert id already delivered, or a second firing of an
  incident that had not resolved;
* **out of order**: a ``resolved`` that arrived before its ``firing``;
* **false**: any firing about a healthy agent, a victim's alert from before it died or of the
  wrong kind (``stall`` for a SIGKILLed process), and a killed victim's incident resolving.
  Alerts about the pipeline itself (agent ``agentwatch``: lag, trimmed) are counted apart: they
  are true while Redis is stopped;
* **expected, no persistence**: a victim that died (or froze) before a Redis *without
  persistence* restarted, and whose alert never came. Not a fault, and not counted as lost:
  everything the pipeline knows lives in Redis (the agent's events and state, the incidents,
  the notifier queues), so a Redis that restarts empty has no trace of an agent that stopped
  before and never speaks again; no worker can alert on it. Persistence is the fix, and the
  embedded Redis has it by default (append-only file, fsync every second): the
  ``redis-restart-persist`` row loses nothing.

Scenarios: ``worker-sigkill`` (workers SIGKILLed three times), ``redis-restart-persist`` and
``redis-restart-volatile`` (Redis SIGKILLed and restarted with and without its append-only file),
``receiver`` (the receiver answers 500, then refuses connections, then hangs for 30 s while a
notifier worker is SIGKILLed), ``redis-sigstop`` (Redis frozen for 10 s), ``garbage`` (80
malformed entries), ``fleet`` (no fault: the healthy fleet alone).

    python benchmarks/chaos.py [--agents 500] [--scenario NAME ...] [--quick]

Bounded: about 8 minutes in all (``--quick``: 100 agents and halved fault durations, about 4).
Run it by hand; it prints one row per scenario and writes benchmarks/results/chaos.json.

What made it print zeros (issue 11): a frozen victim resumes with a pulse before its next beat,
which read as "pulses arrive, beats do not" and fired a false ``stall``; the stall allowance now
counts only time the process proved alive (detectors/stall.py). A notifier worker SIGKILLed
holding a firing let its resolve be delivered first; a resolve now waits for a firing not
queued yet (notifiers/queue.py, PARKED_NOTE). tests/test_detect_frozen.py and
tests/test_notify_order.py hold both with real processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import redis
from _common import figure, report

from agentwatch.embedded import EmbeddedRedis

HERE = Path(__file__).resolve().parent
SILENCE_S = 6.0
INTERVAL_S = 2.0


class Receiver:
    """A webhook receiver: records (arrival, alert) and answers as :attr:`mode` says."""

    def __init__(self) -> None:
        self.mode = "ok"  # ok | 500 | hang
        self.got: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self.listen()

    def listen(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if receiver.mode == "hang":
                    receiver.release.wait(60)
                    self.close_connection = True
                    return
                if receiver.mode == "ok":
                    with receiver.lock:
                        receiver.got.append((time.monotonic(), json.loads(body)))
                status = 200 if receiver.mode == "ok" else 500
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def refuse(self) -> None:
        """Stop listening: connections are refused until :meth:`listen`."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def set(self, mode: str) -> None:
        if mode != "hang":
            self.release.set()
            self.release = threading.Event()
        if mode == "refused":
            self.refuse()
            return
        if self.server is None:
            self.listen()
        self.mode = mode

    def close(self) -> None:
        self.release.set()
        self.refuse()


@dataclass
class Run:
    """One scenario's processes and its record of what happened when."""

    name: str
    root: Path
    persist: bool
    agents: int
    prefix: str = field(default_factory=lambda: f"chaos{random.randrange(10**6)}")
    receiver: Receiver = field(default_factory=Receiver)
    redis: EmbeddedRedis | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    victims: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    killed: dict[str, float] = field(default_factory=dict)  # victim -> wall time of its SIGKILL
    frozen: dict[str, float] = field(default_factory=dict)  # victim -> wall time of its SIGSTOP
    wiped: list[float] = field(default_factory=list)  # wall times Redis restarted without its data
    up: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        assert self.redis is not None and self.redis.tcp_url is not None
        return self.redis.tcp_url

    def start(self, victims: int) -> None:
        port = _free_port()
        self.redis = EmbeddedRedis(self.root / "redis", port=port, persist=self.persist).start()
        config = self.root / "pipeline.toml"
        config.write_text(
            f'[redis]\nurl = "{self.url}"\nprefix = "{self.prefix}"\n'
            '[worker]\ndetectors = 2\nnotifiers = 2\ntick = "100ms"\nblock = "200ms"\nclaim_idle = "3s"\n'
            f'[detectors.silence]\nafter = "{SILENCE_S:g}s"\n'
            f'[detectors.stall]\nafter = "{2 * SILENCE_S:g}s"\n'
            '[detectors.lag]\nafter = "20s"\n'
            f'[[notifiers]]\ntype = "webhook"\nurl = "http://127.0.0.1:{self.receiver.port}/hook"\n'
            'backoff = "200ms"\nbackoff_max = "2s"\ntimeout = "2s"\n'
        )
        log = (self.root / "up.log").open("wb")
        self.up = self._spawn([sys.executable, "-m", "agentwatch", "up", "--config", str(config),
                               "--log-level", "warning"], log)  # fmt: skip
        fleet = [f"fleet-{i:03d}" for i in range(self.agents)]
        self._spawn(
            [sys.executable, str(HERE / "_chaos_agents.py"), self.url, self.prefix, str(INTERVAL_S), *fleet]
        )
        for index in range(victims):
            name = f"victim-{index}"
            self.victims[name] = self._spawn(
                [sys.executable, str(HERE / "_chaos_agents.py"), self.url, self.prefix, str(INTERVAL_S), name]
            )

    def _spawn(self, argv: list[str], log: Any = None) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log or subprocess.DEVNULL,
                                   start_new_session=True)  # fmt: skip
        self.processes.append(process)
        return process

    def _next_victim(self) -> str:
        return next(n for n in self.victims if n not in self.killed and n not in self.frozen)

    def kill_victim(self) -> None:
        name = self._next_victim()
        self.victims[name].kill()
        self.killed[name] = time.time()

    def freeze_victim(self, seconds: float = 3 * SILENCE_S) -> None:
        """SIGSTOP a victim for ``seconds``, then SIGCONT: its silence fires, then resolves."""
        name = self._next_victim()
        process = self.victims[name]
        process.send_signal(signal.SIGSTOP)
        self.frozen[name] = time.time()
        threading.Timer(
            seconds, lambda: process.poll() is None and process.send_signal(signal.SIGCONT)
        ).start()

    def kill_worker(self, kind: str) -> None:
        """SIGKILL one running worker of ``kind`` (``up`` restarts it)."""
        with redis.Redis.from_url(self.url, socket_timeout=5) as client:
            for name in client.zrange(f"{self.prefix}:workers", 0, -1):
                health = client.hgetall(f"{self.prefix}:worker:{name.decode()}")
                if health.get(b"kind") == kind.encode() and health.get(b"pid"):
                    os.kill(int(health[b"pid"]), signal.SIGKILL)
                    return

    def restart_redis(self) -> None:
        assert self.redis is not None
        self.redis.kill()
        if not self.persist:
            self.wiped.append(time.time())
        self.redis.start()

    def freeze_redis(self, seconds: float) -> None:
        assert self.redis is not None and self.redis.process is not None
        os.kill(self.redis.process.pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(self.redis.process.pid, signal.SIGCONT)

    def garbage(self, count: int) -> None:
        samples = [b"\x93not msgpack", b"\xc1", json.dumps({"agent": "x"}).encode(), os.urandom(64), b""]
        with redis.Redis.from_url(self.url) as client:
            for index in range(count):
                client.xadd(f"{self.prefix}:events", {"d": samples[index % len(samples)]})

    def dead_letters(self) -> int | None:
        """Entries moved to the dead letters (None if Redis does not answer within 30 s)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                with redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5) as client:
                    return int(client.xlen(f"{self.prefix}:deadletter"))
            except redis.RedisError:
                if time.monotonic() > deadline:
                    return None
                time.sleep(1)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM if process is self.up else signal.SIGKILL)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.receiver.close()
        if self.redis is not None:
            self.redis.cleanup()


def judge(run: Run, *, final: bool = False) -> dict[str, Any]:
    with run.receiver.lock:
        got = [alert for _, alert in run.receiver.got]
    ids = Counter(alert["id"] for alert in got)
    duplicated = sum(n - 1 for n in ids.values())
    out_of_order = false = pipeline = 0
    kinds: Counter[str] = Counter()  # what the false alerts were, for the reader to tell causes apart
    state: dict[str, str] = {}
    seen: set[str] = set()
    for alert in got:
        if alert["id"] in seen:
            continue
        seen.add(alert["id"])
        key, status, agent = alert["dedup_key"], alert["status"], alert["agent"]
        if agent == "agentwatch":
            pipeline += status == "firing"
            continue
        if status == "resolved" and state.get(key) != "firing":
            out_of_order += 1
        if status == "firing" and state.get(key) == "firing":
            duplicated += 1
        state[key] = status
        at = _epoch(alert["at"])
        victim = agent in run.killed or agent in run.frozen
        since = run.killed.get(agent, run.frozen.get(agent, 0.0))
        if status == "firing" and (not victim or alert["detector"] != "silence" or at < since - 1):
            false += 1
            kinds[f"{'victim' if victim else 'healthy'} {alert['detector']}"] += 1
        if status == "resolved" and agent in run.killed:
            false += 1
            kinds["killed victim resolved"] += 1
    fired = {a["agent"] for a in got if a["status"] == "firing" and a["detector"] == "silence"}
    back = {a["agent"] for a in got if a["status"] == "resolved" and a["detector"] == "silence"}
    missing = [victim for victim in [*run.killed, *run.frozen] if victim not in fired]
    missing += [victim for victim in run.frozen if victim not in back]
    # Gone before Redis lost its memory (no persistence): nothing is left to tell it ever lived.
    expected = sum(1 for victim in missing if any(_since(run, victim) <= at for at in run.wiped))
    victims = len(run.killed) + len(run.frozen)
    return {"scenario": run.name, "victims": victims, "deliveries": len(got), "lost": len(missing) - expected,
            "expected, no persistence": expected,
            "duplicated": duplicated, "out-of-order": out_of_order, "false": false,
            "pipeline alerts": pipeline, "dead letters": run.dead_letters() if final else None,
            "false alerts were": ", ".join(f"{k} x{n}" for k, n in kinds.most_common()) or "-"}  # fmt: skip


def _since(run: Run, victim: str) -> float:
    """When ``victim`` was SIGKILLed or SIGSTOPped (wall time)."""
    return run.killed.get(victim, run.frozen.get(victim, 0.0))


def _epoch(iso: str) -> float:
    from datetime import datetime  # noqa: PLC0415

    return (
        datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=__import__("datetime").UTC).timestamp()
    )


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


Step = tuple[float, Callable[[Run], None]]


def scenarios(scale: float) -> dict[str, tuple[bool, int, list[Step]]]:
    """name -> (persist, victims, [(seconds after the start, action)])."""
    hang, freeze = 30 * scale, 10 * scale
    third = hang / 3
    restart = [(4, Run.kill_victim), (7, Run.restart_redis), (12, Run.kill_victim)]
    return {
        "worker-sigkill": (True, 4, [
            (4, Run.kill_victim), (5, lambda r: r.kill_worker("detectors")), (10, Run.kill_victim),
            (11, lambda r: r.kill_worker("notifiers")), (12, Run.freeze_victim),
            (16, lambda r: r.kill_worker("detectors")), (17, Run.kill_victim)]),
        "redis-restart-persist": (True, 2, restart),
        "redis-restart-volatile": (False, 2, restart),
        "receiver": (True, 5, [  # 500 for a third of `hang`, refused for a third, then hung for `hang`
            (3, lambda r: r.receiver.set("500")), (4, Run.kill_victim),
            (3 + third, lambda r: r.receiver.set("refused")), (4 + third, Run.kill_victim),
            (3 + 2 * third, lambda r: r.receiver.set("hang")), (4 + 2 * third, Run.kill_victim),
            (5 + 2 * third, Run.freeze_victim), (6 + 2 * third, Run.freeze_victim),
            # a notifier worker dies holding the frozen victims' firings; their resolves follow
            (12 + 2 * third, lambda r: r.kill_worker("notifiers")),
            (3 + 2 * third + hang, lambda r: r.receiver.set("ok"))]),
        "redis-sigstop": (True, 2, [(4, Run.kill_victim), (6, lambda r: r.freeze_redis(freeze)),
                                    (8 + freeze, Run.kill_victim)]),
        "garbage": (True, 1, [(3, lambda r: r.garbage(80)), (4, Run.kill_victim)]),
        "fleet": (True, 1, [(10, Run.kill_victim)]),
    }  # fmt: skip


def play(name: str, persist: bool, victims: int, steps: list[Step], agents: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="aw-chaos-") as root:
        run = Run(name, Path(root), persist, agents)
        try:
            run.start(victims)
            time.sleep(3 * INTERVAL_S)  # every agent has started and beaten (the warm-up)
            began = time.monotonic()
            for at, action in steps:
                time.sleep(max(0.0, began + at - time.monotonic()))
                action(run)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and judge(run)["lost"]:
                time.sleep(0.5)
            time.sleep(2 * SILENCE_S)  # a quiet spell: late duplicates and false alerts show up here
            row = judge(run, final=True)
        finally:
            run.stop()
    print(f"  {name}: {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--agents", type=int, default=None, help="healthy fleet size (default 500, --quick 100)"
    )
    parser.add_argument("--scenario", action="append", help="only these (repeatable)")
    parser.add_argument("--quick", action="store_true", help="100 agents, halved fault durations")
    args = parser.parse_args()
    agents = args.agents or (100 if args.quick else 500)
    matrix = scenarios(0.5 if args.quick else 1.0)
    chosen = args.scenario or list(matrix)
    unknown = sorted(set(chosen) - set(matrix))
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; scenarios: {', '.join(matrix)}")
    rows = [play(name, *matrix[name], agents) for name in chosen]
    judged = ("lost", "duplicated", "out-of-order", "false")
    totals = {key: sum(row[key] for row in rows) for key in (*judged, "expected, no persistence")}
    rows.append({"scenario": "total", **totals})
    figures = [figure(f"chaos: {key} alerts", totals[key], "alerts", goal=0, issue=11) for key in judged]
    figures.append(figure("chaos: alerts lost with a Redis without persistence (expected)",
                          totals["expected, no persistence"], "alerts", issue=11))  # fmt: skip
    report("chaos", rows, {"agents": agents, "quick": args.quick}, figures=figures)


if __name__ == "__main__":
    main()
