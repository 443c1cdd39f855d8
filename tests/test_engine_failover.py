"""The shard-owner engine's failover guarantees, with real detector worker processes on a real Redis
(docs/operations.md, "Detector workers, shards and failover"):

* a lease-holder frozen past its lease is replaced; its successor applies what it had not
  checkpointed, alerts go on, and the frozen one, resumed, can write nothing under its old lease;
* a SIGKILLed owner delays a silence by at most the lease plus a second (plus a margin);
* a worker refuses the state of another ``[redis] shards``, and ``status`` shows why nothing
  is watched;
* two workers share four shards 2/2, and the survivor of a clean stop owns all four at once;
* the status board's ``shards 0-3: <owner>`` wording.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from agents_detect.kit import Agent, duplicates, fired, transitions
from typer.testing import CliRunner

from agentwatch.alerts import decode_alert
from agentwatch.cli import app
from agentwatch.cli.status import _ranges, _shard_parts
from agentwatch.keys import Keys, shard_of
from detectors.agent import read_agents
from detectors.engine import LEASE_MS
from detectors.leases import parse_lease

from helpers import drained, wait_for

pytestmark = pytest.mark.slow

SILENCE_AFTER_MS = 1000
CONFIG_AFTER = """
[redis]
url = "{url}"
prefix = "{prefix}"
shards = {shards}
[worker]
tick = "50ms"
block = "50ms"
claim_idle = "500ms"
[detectors.silence]
after = "%s"
"""
"""A fast worker's pipeline file; ``%`` the silence allowance, then ``format`` url/prefix/shards."""
CONFIG = CONFIG_AFTER % "1s"
LOADED_MARGIN_MS = 1000
"""Added to every failover bound: a 2-core box under load (xdist, CI, other jobs) may hold a
worker process off the CPU for most of a second at the wrong moment (its tick, its takeover)."""


class Workers:
    """Detector worker processes (``agentwatch worker detectors``) on one prefix; their stderr
    goes to files (read back for what they logged)."""

    def __init__(self, tmp_path: Path, url: str, prefix: str, template: str = CONFIG) -> None:
        """``template``: the pipeline.toml, with ``{url}``, ``{prefix}`` and ``{shards}``."""
        self.tmp_path, self.url, self.prefix, self.template = tmp_path, url, prefix, template
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    def start(self, shards: int) -> subprocess.Popen[bytes]:
        config = self.tmp_path / f"pipeline-{shards}.toml"
        config.write_text(self.template.format(url=self.url, prefix=self.prefix, shards=shards))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
        log = self.tmp_path / f"worker-{len(self.procs)}.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agentwatch", "worker", "detectors", "--config", str(config)],
                env=env, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def stderr(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[proc.pid].read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # (a frozen one could not handle SIGTERM)
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(tmp_path: Path, redis_url: str, prefix: str) -> Iterator[Workers]:
    found = Workers(tmp_path, redis_url, prefix)
    yield found
    found.stop_all()


def status(tmp_path: Path, redis_url: str, prefix: str, shards: int, *args: str) -> str:
    """``agentwatch status`` through the CLI (80 columns, as a pipe shows it)."""
    config = tmp_path / f"status-{shards}.toml"
    config.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\nshards = {shards}\n')
    result = CliRunner().invoke(app, ["status", *args, "--config", str(config)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


def lease(r: redis.Redis, keys: Keys, shard: int) -> tuple[int, str] | None:
    return parse_lease(r.get(keys.lease(shard)))


def token(r: redis.Redis, keys: Keys, shard: int) -> int:
    """The fencing token of the lease of ``shard`` (0: nobody holds it)."""
    held = lease(r, keys, shard)
    return held[0] if held else 0


def pid_of(owner: str) -> int:
    """The process id in an engine's owner name (host-pid-random)."""
    return int(owner.rsplit("-", 2)[1])


def owned(r: redis.Redis, keys: Keys) -> dict[int, int]:
    """Shard -> pid of the worker holding its lease (shards nobody holds left out)."""
    out = {}
    for shard in range(keys.shards):
        held = lease(r, keys, shard)
        if held is not None:
            out[shard] = pid_of(held[1])
    return out


def agent_on(shard: int, shards: int, stem: str, skip: int = 0) -> str:
    """The ``skip``-th agent name ``<stem>-<n>`` whose events go to ``shard``."""
    names = (f"{stem}-{n}" for n in range(10_000))
    return (
        [name for name in names if shard_of(name, shards) == shard][skip] if shards > 1 else f"{stem}-{skip}"
    )


def entry_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


class Beater:
    """Agents beating every 0.1 s in a thread until told to stop (one by one or all)."""

    def __init__(self, r: redis.Redis, keys: Keys, names: list[str]) -> None:
        self.agents = {name: Agent(r, keys, name) for name in names}
        self.sent = dict.fromkeys(names, 0)
        self.last: dict[str, bytes] = {}
        self.quiet: set[str] = set()
        self.halt = threading.Event()
        self.lock = threading.Lock()
        for agent in self.agents.values():
            agent.start(interval=0.1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.halt.is_set():
            with self.lock:
                for name, agent in self.agents.items():
                    if name not in self.quiet:
                        self.last[name] = agent.beat()
                        self.sent[name] += 1
            self.halt.wait(0.1)

    def silence(self, name: str, *, last_beat: bool = False) -> bytes:
        """Stop ``name`` beating (after one more beat now if ``last_beat``); the entry id of
        its last beat."""
        with self.lock:
            if last_beat:
                self.last[name] = self.agents[name].beat()
                self.sent[name] += 1
            self.quiet.add(name)
            return self.last[name]

    def stop(self) -> None:
        self.halt.set()
        self.thread.join(5)


# -- 1. a frozen lease-holder ----------------------------------------------------------------------


def test_a_frozen_owner_is_replaced_and_can_write_nothing_when_it_wakes(
    r: redis.Redis, redis_url: str, prefix: str, tmp_path: Path, workers: Workers
) -> None:
    """Two workers on two shards, one each. The owner of shard X is frozen (SIGSTOP) while it
    holds entries it has read but not checkpointed; past its lease the other worker takes X,
    applies those entries (every beat counted exactly once) and pages the agent that went
    silent meanwhile. Resumed (SIGCONT), the frozen worker finds its lease gone: the checkpoint
    of X keeps its successor's token, no alert is repeated, and it takes the shard the other
    rebalances to it under a NEW token."""
    keys = Keys(prefix, shards=2)
    a, b = workers.start(2), workers.start(2)
    wait_for(lambda: set(owned(r, keys).values()) == {a.pid, b.pid}, timeout=20, what="a shard each")
    x = next(shard for shard, pid in owned(r, keys).items() if pid == a.pid)
    steady = [agent_on(x, 2, "steady", n) for n in range(3)]
    goner = agent_on(x, 2, "goner")
    other = agent_on(1 - x, 2, "elsewhere")
    beater = Beater(r, keys, [*steady, goner, other])
    try:

        def applied() -> bool:
            seen = read_agents(r, keys, steady)
            return len(seen) == len(steady) and all(rec["beats"] >= 2 for rec in seen.values())

        wait_for(applied, timeout=10, what="a applying and checkpointing the beats of X")
        old_token = token(r, keys, x)
        freeze: dict[str, Any] = {}

        def caught_holding_work() -> bool:
            """Freeze a; keep it frozen only if it read entries of X it has not checkpointed
            (else its successor would have nothing of its to apply, proving nothing)."""
            a.send_signal(signal.SIGSTOP)
            group = next(g for g in r.xinfo_groups(keys.events(x)) if g["name"] == b"detectors")
            through: Any = r.hget(keys.checkpoint(x), "last_id") or b"0-0"
            delivered: bytes = group["last-delivered-id"]
            held = [int(p) for p in delivered.split(b"-")] > [int(p) for p in through.split(b"-")]
            if not held:
                a.send_signal(signal.SIGCONT)
                time.sleep(0.02)
            else:
                freeze.update(delivered=delivered, expires=time.monotonic() + r.pttl(keys.lease(x)) / 1000)
            return held

        wait_for(caught_holding_work, timeout=10, interval=0.003, what="a caught with work in hand")
        beater.silence(goner)
        wait_for(lambda: owned(r, keys).get(x) == b.pid, timeout=LEASE_MS / 1000 + 5, what="b taking X")
        assert time.monotonic() >= freeze["expires"] - 0.05  # not before a's lease ran out
        new_token = token(r, keys, x)
        assert new_token > old_token
        document = json.loads(status(tmp_path, redis_url, prefix, 2, "--json"))
        shown = {s["shard"]: s["owner"] for s in document["pipeline"]["shards"]}
        assert pid_of(shown[x]) == b.pid and shown[x] == lease(r, keys, x)[1]  # type: ignore[index]
        # alerts go on: b pages the agent that went silent during the freeze
        wait_for(lambda: fired(r, keys, "silence", goner), timeout=5, what="the silence of the goner")

        a.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        tokens: set[bytes] = set()

        def a_back_with_a_new_token() -> bool:
            tokens.add(bytes(r.hget(keys.checkpoint(x), "token") or b""))  # type: ignore[arg-type]
            mine = [s for s, pid in owned(r, keys).items() if pid == a.pid]
            # (watched for longer than a checkpoint interval: a stale save would show meanwhile)
            return (
                time.monotonic() - resumed > 0.7
                and bool(mine)
                and all(token(r, keys, s) > old_token or s != x for s in mine)
            )

        # (a's share is one of two shards again: b hands one over, a takes it under a new token)
        wait_for(a_back_with_a_new_token, timeout=10, interval=0.005, what="a owning a rebalanced shard")
        for shard, pid in owned(r, keys).items():
            if pid == a.pid:
                held = token(r, keys, shard)
                assert int(r.get(keys.epoch(shard)) or 0) == held and (shard != x or held > new_token)
    finally:
        beater.stop()
    first, second = drained(r, keys, 0), drained(r, keys, 1)
    wait_for(lambda: first() and second(), timeout=10, what="both shards checkpointed")
    assert str(old_token).encode() not in tokens, tokens  # a never wrote X's checkpoint after its lease
    through: Any = r.hget(keys.checkpoint(x), "last_id")
    assert [int(p) for p in through.split(b"-")] >= [int(p) for p in freeze["delivered"].split(b"-")]
    assert int(r.hget(keys.checkpoint(x), "token") or 0) == token(r, keys, x)  # (its owner's now)
    woke = workers.stderr(a)
    assert f"lost the lease of shard {x}" in woke, woke
    assert "Traceback" not in woke, woke
    # Every beat applied exactly once: what a read but had not checkpointed was applied by b
    beats = {name: rec["beats"] for name, rec in read_agents(r, keys).items()}
    assert beats == beater.sent
    assert duplicates(r, keys) == []
    mine = [t for t in transitions(r, keys) if t[0] != "pipeline"]
    assert (goner, "silence", "firing") in mine
    assert [t for t in mine if t[0] != goner] == []  # the freeze paged nobody that kept beating
    assert a.poll() is None and b.poll() is None


# -- 2. the silence delay across a SIGKILL --------------------------------------------------------


def test_a_silence_during_a_failover_is_late_by_at_most_the_lease_and_a_second(
    r: redis.Redis, redis_url: str, prefix: str, workers: Workers
) -> None:
    """The owner is SIGKILLed and an agent beats once more right after, then goes silent: the
    standby takes the shard when the lease runs out and pages within LEASE_MS + 1 s of the
    agent's deadline (last beat + after), plus LOADED_MARGIN_MS for a loaded box."""
    keys = Keys(prefix)
    a, b = workers.start(1), workers.start(1)
    by_pid = {a.pid: a, b.pid: b}
    wait_for(lambda: r.zcard(keys.engines) == 2 and owned(r, keys).get(0) in by_pid, timeout=20,
             what="two workers, one owning the shard")  # fmt: skip
    beater = Beater(r, keys, ["watched", "steady"])
    try:
        wait_for(drained(r, keys, 0), timeout=10, what="the beats applied")
        victim = by_pid[owned(r, keys)[0]]
        victim.send_signal(signal.SIGKILL)
        last = beater.silence("watched", last_beat=True)  # its last beat comes right after the kill
        deadline = entry_ms(last) + SILENCE_AFTER_MS
        wait_for(lambda: fired(r, keys, "silence", "watched"), timeout=15, what="the silence")
    finally:
        beater.stop()
    entries: Any = r.xrange(keys.alerts)
    (entry,) = [eid for eid, fields in entries if decode_alert(fields[b"d"]).agent == "watched"]
    delay = entry_ms(entry) - deadline
    print(f"silence paged {delay} ms after the agent's deadline (lease {LEASE_MS} ms)")
    assert 0 <= delay <= LEASE_MS + 1000 + LOADED_MARGIN_MS, delay
    assert victim.wait(timeout=5) == -signal.SIGKILL
    assert owned(r, keys) == {0: (b if victim is a else a).pid}
    assert [t for t in transitions(r, keys) if t[0] == "steady"] == []


# -- 3. another shard count under existing state --------------------------------------------------


def test_a_worker_refuses_state_written_under_another_shard_count(
    r: redis.Redis, redis_url: str, prefix: str, tmp_path: Path, workers: Workers
) -> None:
    one = Keys(prefix)
    first = workers.start(1)
    bot = Agent(r, one, "bot")
    bot.start(interval=1.0)
    bot.beat()
    wait_for(drained(r, one, 0), timeout=20, what="a checkpoint under shards = 1")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=10) == 0
    two = Keys(prefix, shards=2)
    second = workers.start(2)
    wait_for(lambda: "takes no shard" in workers.stderr(second), timeout=20, what="the refusal logged")
    log = workers.stderr(second)
    assert "the detector state was written with [redis] shards = 1" in log and "configured with 2" in log, log
    time.sleep(0.3)  # (several ticks: it still takes nothing)
    assert second.poll() is None and owned(r, two) == {}
    assert r.hget(two.checkpoint(0), "token") is not None  # the old state is left as it was
    board = " ".join(status(tmp_path, redis_url, prefix, 2).split())
    assert "shards without an owner (not watched until a detector worker takes them): 0-1" in board, board
    shards = json.loads(status(tmp_path, redis_url, prefix, 2, "--json"))["pipeline"]["shards"]
    assert [(s["shard"], s["owner"]) for s in shards] == [(0, None), (1, None)]


# -- 4. sharing and a clean handover --------------------------------------------------------------


def test_two_workers_split_four_shards_and_a_clean_stop_hands_them_over_at_once(
    r: redis.Redis, redis_url: str, prefix: str, tmp_path: Path, workers: Workers
) -> None:
    keys = Keys(prefix, shards=4)
    a, b = workers.start(4), workers.start(4)

    def split() -> bool:
        shards = json.loads(status(tmp_path, redis_url, prefix, 4, "--json"))["pipeline"]["shards"]
        owners = [s["owner"] for s in shards]
        return None not in owners and sorted(owners.count(o) for o in set(owners)) == [2, 2]

    wait_for(split, timeout=20, interval=0.1, what="two shards each")
    before = owned(r, keys)
    assert set(before.values()) == {a.pid, b.pid}
    tokens = {shard: token(r, keys, shard) for shard in range(4)}
    bots = [Agent(r, keys, agent_on(shard, 4, "bot")) for shard in range(4)]
    for bot in bots:
        bot.start(interval=1.0)
        bot.beat()
    saved = [drained(r, keys, shard) for shard in range(4)]
    wait_for(lambda: all(each() for each in saved), timeout=10, what="the beats saved")
    a.send_signal(signal.SIGTERM)
    assert a.wait(timeout=10) == 0
    # Handed over, not left to expire: by the time a has exited its leases are gone (released
    # or already taken by b), whatever the load; b then takes them at its next ticks.
    assert all(owned(r, keys).get(shard) in (None, b.pid) for shard in range(4)), owned(r, keys)
    wait_for(lambda: owned(r, keys) == dict.fromkeys(range(4), b.pid), timeout=5, what="b owning all four")
    for shard in range(4):  # b kept its own shards' leases; it took a's under higher tokens
        assert (
            token(r, keys, shard) == tokens[shard]
            if before[shard] == b.pid
            else token(r, keys, shard) > tokens[shard]
        )
    for bot in bots:
        bot.beat()
    saved = [drained(r, keys, shard) for shard in range(4)]
    wait_for(lambda: all(each() for each in saved), timeout=10, what="the beats saved")
    assert {name: rec["beats"] for name, rec in read_agents(r, keys).items()} == dict.fromkeys(
        [bot.name for bot in bots], 2
    )  # (a's agents carried over by its last checkpoint: nothing lost, nothing applied twice)
    board = " ".join(status(tmp_path, redis_url, prefix, 4).split())
    owner = lease(r, keys, 0)[1]  # type: ignore[index]
    assert f"shards 0-3: {owner}" in board, board
    assert "without an owner" not in board


# -- 5. the board's wording -------------------------------------------------------------------------


def test_the_board_names_each_owner_with_its_shard_ranges() -> None:
    assert _ranges([0, 1, 2, 5]) == "0-2, 5"
    assert _ranges([3, 1, 0, 2]) == "0-3"
    assert _ranges([0, 2, 4]) == "0, 2, 4"
    assert _ranges([7]) == "7" and _ranges([]) == ""

    def row(shard: int, owner: str | None, age: float | None = 0.3) -> dict[str, Any]:
        return {"shard": shard, "owner": owner, "lease_left_s": 2.5, "checkpoint_age_s": age,
                "applied_through": None}  # fmt: skip

    shards = [row(0, "h-41-aa"), row(1, "h-41-aa", 1.2), row(2, "h-42-bb", None), row(3, "h-41-aa"),
              row(4, None, None), row(5, "h-42-bb", 0.1)]  # fmt: skip
    parts = _shard_parts(shards)
    assert len(parts) == 2
    assert parts[0].startswith("shards 0-1, 3: h-41-aa (checkpoint ") and "1" in parts[0]
    assert parts[1].startswith("shards 2, 5: h-42-bb (checkpoint ")
    assert _shard_parts([row(0, "solo", None)]) == ["shards 0: solo"]  # no checkpoint yet: no age
    assert _shard_parts([row(0, None), row(1, None)]) == []  # nobody owns them: the alarm says so


# -- 6. a frozen Redis is an outage, not a failover -------------------------------------------------


def test_a_redis_frozen_past_the_lease_pages_no_healthy_agent(
    tmp_path: Path, prefix: str, spawn_redis: Any
) -> None:
    """Redis SIGSTOPped for 4 s (past the 3 s lease): when it resumes, the lease has run out and
    the owner takes its shard again. Nobody could watch (or beat) meanwhile, so the clocks restart
    from the end of the gap: no agent that beats on afterwards is called silent. (A takeover
    after an owner's death is no such gap: the standby kept ticking. benchmarks/chaos.py
    redis-sigstop found 28 false silences when a takeover was always taken for a failover.)"""
    server = spawn_redis()
    keys = Keys(prefix)
    client = redis.Redis.from_url(server.url)
    workers = Workers(tmp_path, server.url, prefix)
    try:
        workers.start(1)
        wait_for(lambda: lease(client, keys, 0) is not None, timeout=20, what="the shard owned")
        beater = Beater(client, keys, [f"healthy-{n}" for n in range(5)])
        wait_for(lambda: len(read_agents(client, keys)) == 5, timeout=10, what="the agents known")
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        time.sleep(LEASE_MS / 1000 + 1)  # the outage itself: nothing to await
        server.process.send_signal(signal.SIGCONT)
        # the owner comes back to a lease that ran out, takes the shard again and checks on
        wait_for(lambda: token(client, keys, 0) >= 2, timeout=20, what="the shard taken again")
        time.sleep(3 * SILENCE_AFTER_MS / 1000)  # three allowances of beating after the gap
        beater.stop()
        assert fired(client, keys, "silence") == [], transitions(client, keys)
    finally:
        workers.stop_all()
        client.close()
