"""The brake: `agentwatch halt` reaches a beating agent's loop as producers.Halted, and back.

Real Redis, real producers, the real CLI. The agents' fleet index (which agents exist) is the
sorted set the detectors keep; tests that need "seen" agents write it as the detectors would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from agents.testkit import of_kind, read_events
from typer.testing import CliRunner

from agentwatch.cli import app
from agentwatch.embedded import EmbeddedRedis
from agentwatch.halts import HaltExpiry, Halts
from agentwatch.keys import Keys
from detectors.agent import Agent, pack
from producers import Halted, Producer

from helpers import wait_for


@pytest.fixture
def cli(tmp_path: Path, redis_url: str, prefix: str) -> Callable[..., str]:
    config = tmp_path / "pipeline.toml"
    config.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n')
    runner = CliRunner()

    def run(*args: str, code: int = 0, config_path: Path = config) -> str:
        result = runner.invoke(app, [*args, "--config", str(config_path)], env={"COLUMNS": "250"})
        assert result.exit_code == code, result.output
        return result.output

    return run


@pytest.fixture
def make(redis_url: str, prefix: str) -> Iterator[Callable[..., Producer]]:
    made: list[Producer] = []

    def producer(agent: str, **options: Any) -> Producer:
        made.append(Producer(agent, redis_url=redis_url, prefix=prefix, flush_interval=0.01, **options))
        return made[-1]

    yield producer
    for item in made:
        item.close()


def beat_until_halted(producer: Producer, timeout: float = 10.0, **work: Any) -> Halted:
    """Beat every 10 ms until heartbeat() raises Halted; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            producer.heartbeat(**work)
        except Halted as halt:
            return halt
        time.sleep(0.01)
    raise AssertionError(f"heartbeat() did not raise Halted within {timeout}s")


def halt_alerts(r: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    found = [json.loads(fields[b"d"]) for _, fields in r.xrange(keys.alerts)]
    return [alert for alert in found if alert["detector"] == "halt"]


def seen(r: redis.Redis, keys: Keys, *agents: str) -> None:
    """As the detectors record agents they have seen (their checkpointed state)."""
    r.hset(keys.states(0), mapping={agent: pack(Agent(agent)) for agent in agents})


def test_a_halt_reaches_a_beating_loop_and_a_resume_lifts_it(
    cli: Callable[..., str], make: Callable[..., Producer], r: redis.Redis, keys: Keys, prefix: str
) -> None:
    scraper, other = make("scraper-1"), make("writer-1")
    scraper.heartbeat()
    other.heartbeat()
    seen(r, keys, "scraper-1", "writer-1")

    out = cli("halt", "scraper-*", "--reason", "spent $50 in 40 minutes")
    assert "halted 'scraper-*': spent $50 in 40 minutes" in out and "1 agent(s) seen so far: scraper-1" in out
    halt = beat_until_halted(scraper, tokens=100)
    assert (halt.reason, halt.pattern) == ("spent $50 in 40 minutes", "scraper-*")
    assert scraper.halted() == "spent $50 in 40 minutes"
    other.heartbeat()  # not matched: works on
    assert other.halted() is None

    # An agent that catches Halted and beats on keeps getting it, and its spending still counts.
    for _ in range(3):
        with pytest.raises(Halted):
            scraper.heartbeat(tokens=7, cost=0.25)

    def spent() -> int:
        return sum(1 for e in of_kind(read_events(r, keys.events()), "beat") if e.get("cost") == 0.25)

    wait_for(lambda: spent() == 3, what="the halted agent's three beats")

    assert "resumed 'scraper-*'" in cli("resume", "scraper-*")
    wait_for(lambda: scraper.halted() is None, what="the resume to reach the producer")
    scraper.heartbeat()  # no longer raises

    firing, resolved = halt_alerts(r, keys)
    assert (firing["status"], firing["severity"], firing["agent"], firing["dedup_key"]) == (
        "firing", "info", "scraper-*", "scraper-*/halt")  # fmt: skip
    assert firing["details"]["reason"] == "spent $50 in 40 minutes" and firing["details"]["by"]
    assert resolved["status"] == "resolved" and resolved["summary"].startswith("scraper-*: resumed by ")


def test_an_idle_agent_learns_of_a_halt_within_its_halt_interval(
    cli: Callable[..., str], make: Callable[..., Producer]
) -> None:
    agent = make("idle-bot", halt_interval=0.2, pulse_interval=60)
    agent.heartbeat()
    time.sleep(0.5)  # long enough for the sender to go idle (it sleeps until the next poll)
    cli("halt", "idle-bot", "--reason", "maintenance")
    started = time.monotonic()
    wait_for(lambda: agent.halted() == "maintenance", timeout=5, what="the idle producer to poll")
    assert time.monotonic() - started < 2.0  # 0.2 s polls: well within, even on a loaded box
    with pytest.raises(Halted, match="maintenance"):
        agent.heartbeat()


def test_on_halt_ignore_never_raises_but_still_tells(
    cli: Callable[..., str], make: Callable[..., Producer]
) -> None:
    agent = make("stubborn", on_halt="ignore")
    agent.heartbeat()
    cli("halt", "stubborn")
    wait_for(lambda: agent.halted() is not None, what="the halt to arrive")
    agent.heartbeat()  # no exception
    assert str(agent.halted()).startswith("halted by ")  # no --reason: who halted it


def test_a_halt_for_a_while_expires_and_its_incident_resolves(
    cli: Callable[..., str], make: Callable[..., Producer], r: redis.Redis, keys: Keys
) -> None:
    agent = make("brief")
    agent.heartbeat()
    cli("halt", "brief", "--for", "1500ms", "--reason", "cool down")
    beat_until_halted(agent)
    wait_for(lambda: agent.halted() is None, timeout=10, what="the halt to lapse on the agent's side")
    agent.heartbeat()
    expiry = HaltExpiry(Halts(r, keys))
    expiry.on_tick(int(r.time()[0]) * 1000 + 2000)  # what every detector worker runs on its tick
    assert r.hlen(keys.halts(0)) == 1  # only the epoch is left
    assert [a["status"] for a in halt_alerts(r, keys)] == ["firing", "resolved"]
    assert halt_alerts(r, keys)[1]["summary"] == "brief: halt expired"
    assert "no halts in force" in cli("halts")


def test_halting_again_replaces_the_halt_and_records_both(
    cli: Callable[..., str], r: redis.Redis, keys: Keys
) -> None:
    cli("halt", "job-*", "--reason", "first")
    out = cli("halt", "job-*", "--reason", "second")
    assert "(replaces the halt by" in out and ": first)" in out
    assert [(a["status"], a["details"]["reason"]) for a in halt_alerts(r, keys)] == [
        ("firing", "first"), ("resolved", "first"), ("firing", "second")]  # fmt: skip
    (listed,) = [json.loads(line) for line in cli("halts", "--json").splitlines()]
    assert (listed["pattern"], listed["reason"], listed["until_ms"]) == ("job-*", "second", None)


def test_what_the_cli_says_about_odd_requests(cli: Callable[..., str], r: redis.Redis, keys: Keys) -> None:
    seen(r, keys, "scraper-1", "scraper-2")
    assert "warning: 'scrapr-*' matches no agent seen so far" in cli("halt", "scrapr-*")
    assert "note: agent 'newbie' has never been seen; it is halted as soon as it starts" in cli(
        "halt", "newbie"
    )
    out = cli("halt", "scraper-*", "--reason", "budget")
    assert "2 agent(s) seen so far: scraper-1, scraper-2" in out
    # One agent of a glob halt cannot be resumed alone: say which halt holds it.
    out = cli("resume", "scraper-2", code=1)
    assert "'scraper-2' has no halt of its own: it is halted by 'scraper-*'" in out
    assert "no halt matches 'nothing-*'" in cli("resume", "nothing-*", code=1)
    # A glob resume lifts the halts of the agents it matches, and an identical glob's.
    cli("halt", "scraper-1", "--reason", "by name")
    lifted = cli("resume", "scraper-*")
    assert "resumed 'scraper-*'" in lifted and "resumed 'scraper-1'" in lifted
    everything = cli("resume", "*")
    assert "resumed 'scrapr-*'" in everything and "resumed 'newbie'" in everything
    assert "no halts in force" in cli("halts")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["halt", "two words"], "is not an agent name or glob"),
        (["halt", "bot", "--reason", "line\nbreak"], "--reason: printable text only"),
        (["halt", "bot", "--reason", "x" * 501], "--reason: at most 500 characters"),
        (["halt", "bot", "--for", "soon"], "--for: bad duration"),
        (["resume", "#epoch"], "is not an agent name or glob"),
    ],
)
def test_bad_requests_exit_2(cli: Callable[..., str], args: list[str], message: str) -> None:
    assert message in cli(*args, code=2)


def test_redis_down_while_halting_is_a_clear_error(cli: Callable[..., str], tmp_path: Path) -> None:
    config = tmp_path / "down.toml"
    config.write_text('[redis]\nurl = "redis://127.0.0.1:1/0"\n')
    out = cli("halt", "bot", config_path=config, code=1)
    assert "Redis does not answer at redis://127.0.0.1:1/0" in out


def test_halts_survive_a_redis_restart_with_persistence(
    spawn_redis: Callable[..., EmbeddedRedis], tmp_path: Path
) -> None:
    server = spawn_redis(persist=True)
    config = tmp_path / "pipeline.toml"
    config.write_text(f'[redis]\nurl = "{server.url}"\nprefix = "kept"\n')
    result = CliRunner().invoke(app, ["halt", "night-*", "--reason", "over budget", "--config", str(config)])
    assert result.exit_code == 0, result.output
    server.stop()
    server.start()
    agent = Producer("night-1", redis_url=server.url, prefix="kept", flush_interval=0.01)
    try:
        halt = beat_until_halted(agent)
        assert halt.reason == "over budget"
    finally:
        agent.close()


def test_a_sharded_deployment_halts_agents_of_every_shard(
    redis_url: str, prefix: str, r: redis.Redis, make: Callable[..., Producer]
) -> None:
    keys = Keys(prefix, shards=4)
    agents = [f"worker-{n}" for n in range(8)]
    assert len({keys.halts_for(a) for a in agents}) > 1  # they really are spread over copies
    producers = [make(agent, shards=4) for agent in agents]
    Halts(r, keys).add("worker-*", "drain", by="test")
    for producer in producers:
        assert beat_until_halted(producer).reason == "drain"
