"""Labels: from ``init(labels=...)``/``AGENTWATCH_LABELS`` to ``start``, kept per run with the
start facts, with ``host`` added; on alerts as ``details.labels``; ``match`` routes on them;
``status --label`` filters on them. Bad pairs are dropped and counted, never the agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import msgpack
import pytest
import redis
from agents_detect.kit import Agent, fired, pipeline_for, resolved, worker_for

from agentwatch import codec, labels
from agentwatch.alerts import Alert
from agentwatch.facts import LABELS_DROPPED, read_facts
from agentwatch.keys import Keys
from notifiers.routing import Match

from helpers import running, wait_for


def test_clean_keeps_safe_pairs_and_says_why_it_dropped_the_others() -> None:
    kept, dropped = labels.clean(
        {"team": "search", "tier": "1", "bad key": "x", "x": "<b>", "y": "a" * 129, "z": 3, "0k": "v"}
    )
    assert kept == {"team": "search", "tier": "1"}
    assert len(dropped) == 5 and any("'bad key'" in reason for reason in dropped)
    many, over = labels.clean({f"k{i:02d}": "v" for i in range(20)})
    assert len(many) == labels.MAX_LABELS and len(over) == 4
    assert labels.clean("team=x") == ({}, ["labels must be a map of strings, got str"])


def test_the_environment_form_and_the_host_label() -> None:
    assert labels.parse(" team=search, tier=1 ,,") == ({"team": "search", "tier": "1"}, [])
    assert labels.parse("oops")[1] == ["'oops' is not key=value"]
    assert labels.effective({"team": "x"}, "worker-3") == {"host": "worker-3", "team": "x"}
    assert labels.effective({"host": "node-a"}, "c0ffee") == {"host": "node-a"}
    assert labels.effective(None, "bad host\x1b[31m") == {"host": "bad_host__31m"}
    assert labels.selector("team=se*") == ("team", "se*")
    with pytest.raises(ValueError, match="not key=value"):
        labels.selector("team")


def test_a_producer_sends_its_labels_and_host_on_start(redis_url: str, prefix: str, r: redis.Redis) -> None:
    script = textwrap.dedent(
        f"""
        import producers
        producers.init("labelled", redis_url={redis_url!r}, prefix={prefix!r},
                       labels={{"team": "search", "bad key": "x"}})
        producers.heartbeat()
        producers.shutdown()
        """
    )
    env = {**os.environ, "AGENTWATCH_LABELS": "tier=1"}  # the explicit argument wins
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "dropped 1 label(s): key 'bad key'" in done.stderr
    events = [msgpack.unpackb(fields[b"d"]) for _, fields in r.xrange(Keys(prefix).events())]
    start = next(e for e in events if e["kind"] == "start")
    assert start["labels"] == {"team": "search"} and start["host"]


def test_the_environment_variable_labels_a_producer(redis_url: str, prefix: str, r: redis.Redis) -> None:
    script = f"import producers\nproducers.init('envy', redis_url={redis_url!r}, prefix={prefix!r})\n"
    env = {**os.environ, "AGENTWATCH_LABELS": "team=ops,tier=2"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    start = msgpack.unpackb(r.xrange(Keys(prefix).events())[0][1][b"d"])
    assert start["labels"] == {"team": "ops", "tier": "2"}


def test_alerts_carry_the_labels_of_the_agents_run(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    worker = worker_for(pipeline_for(prefix, redis_url, silence={"after": "500ms"}), redis_url)
    bot = Agent(r, keys, "bot")
    with running(worker):
        bot.start(host="worker-3", labels={"team": "search", "evil": "<script>", "x y": "1"})
        bot.beat()
        alert = wait_for(lambda: fired(r, keys, "silence"), timeout=5, what="silence alert")[0]
        assert alert.details["labels"] == {"host": "worker-3", "team": "search"}
        bot.beat()
        back = wait_for(lambda: resolved(r, keys, "silence"), timeout=5, what="resolved")[0]
        assert back.details["labels"] == {"host": "worker-3", "team": "search"}
    fact = read_facts(r, keys, ["bot"])["bot"]
    assert fact["labels"] == {"team": "search"} and fact["labels_dropped"] == 2
    assert r.hget(keys.stats, LABELS_DROPPED) == b"2"


def test_labels_that_are_not_a_map_are_dropped_and_the_agent_still_monitored(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    worker = worker_for(pipeline_for(prefix, redis_url, silence={"after": "500ms"}), redis_url)
    bot = Agent(r, keys, "bot")
    with running(worker):
        bot.start(host="h1", labels="team=x")
        bot.beat()
        alert = wait_for(lambda: fired(r, keys, "silence"), timeout=5, what="silence alert")[0]
    assert alert.details["labels"] == {"host": "h1"}
    assert r.hget(keys.stats, LABELS_DROPPED) == b"1" and r.xlen(keys.deadletter) == 0


def test_a_match_selects_on_labels() -> None:
    def alert(found: object) -> Alert:
        return Alert(id="1", agent="a", detector="silence", status="firing", severity="error",
                     summary="s", dedup_key="a/silence", at="2026-01-01T00:00:00.000Z",
                     details={} if found is None else {"labels": found})  # fmt: skip

    match = Match(labels={"team": "search", "host": "worker-*"})
    assert match.matches(alert({"team": "search", "host": "worker-3"}))
    assert not match.matches(alert({"team": "ads", "host": "worker-3"}))
    assert not match.matches(alert({"team": "search"}))  # a label it lacks does not match
    assert not match.matches(alert(None)) and not match.matches(alert("team=search"))
    assert Match().matches(alert(None))


def test_a_label_matcher_compiled_once_matches_every_label_it_names() -> None:
    test = labels.matcher({"team": "search", "host": "worker-[0-9]*"})
    assert test({"team": "search", "host": "worker-3", "tier": "1"})
    assert not test({"team": "Search", "host": "worker-3"})  # case matters, as in fnmatchcase
    assert not test({"team": "search", "host": "worker-x"})
    assert not test({"team": "search"})  # a label it lacks does not match
    assert not test({"team": 1, "host": "worker-3"}) and not test(None) and not test("team=search")
    assert labels.matcher({})({}) and not labels.matcher({})(None)  # no selector: any map of labels


def test_status_filters_on_labels(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    worker = worker_for(pipeline_for(prefix, redis_url), redis_url)
    with running(worker):
        for name, team in (("a1", "search"), ("a2", "ads"), ("a3", "search")):
            Agent(r, keys, name).start(host="h1", labels={"team": team})
        wait_for(lambda: len(read_facts(r, keys)) == 3, timeout=10, what="facts")
    config = tmp_path / "pipeline.toml"
    config.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n')
    run = [sys.executable, "-m", "agentwatch", "status", "--config", str(config), "--json"]
    done = subprocess.run([*run, "--label", "team=search"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["agents"]
    assert sorted(row["agent"] for row in rows) == ["a1", "a3"]
    assert rows[0]["labels"] == {"host": "h1", "team": "search"}
    bad = subprocess.run([*run, "--label", "team"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--label" in bad.stderr


def test_labels_are_meta_to_the_codec() -> None:
    event = {"v": 1, "agent": "a", "kind": "start", "ts": 0.0, "run": "r", "seq": 0, "labels": {"t": "x"}}
    assert codec.decode(codec.encode(event))["labels"] == {"t": "x"}
