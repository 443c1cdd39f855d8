"""Start facts: the latest start wins, whatever order batches arrive in; first sighting only moves earlier."""

from __future__ import annotations

from typing import Any

import redis

from agentwatch.facts import FactsRecorder, read_facts
from agentwatch.keys import Keys


def start(run: str, pid: int, **extra: Any) -> dict[str, Any]:
    return {"v": 1, "agent": "bot", "kind": "start", "ts": 1.0, "run": run, "seq": 0, "pid": pid,
            "host": "box", "interval": 2.5, **extra}  # fmt: skip


def test_the_newest_start_wins_and_a_late_old_batch_cannot_roll_it_back(r: redis.Redis, keys: Keys) -> None:
    recorder = FactsRecorder(r, keys)
    recorder.on_batch([(b"2000-0", start("run-2", 22))])
    recorder.on_batch([(b"1000-0", start("run-1", 11))])  # reclaimed after its successor
    recorder.on_batch([(b"2000-0", start("run-2", 22))])  # and a redelivery
    facts = read_facts(r, keys)["bot"]
    assert (facts["run"], facts["pid"], facts["host"], facts["interval"]) == ("run-2", 22, "box", 2.5)
    assert (facts["started_ms"], facts["first_ms"]) == (2000, 1000)


def test_two_starts_in_one_millisecond_keep_stream_order(r: redis.Redis, keys: Keys) -> None:
    recorder = FactsRecorder(r, keys)
    recorder.on_batch([(b"5000-0", start("a", 1)), (b"5000-1", start("b", 2))])
    assert read_facts(r, keys)["bot"]["run"] == "b"


def test_a_forked_workers_start_does_not_speak_for_the_agent(r: redis.Redis, keys: Keys) -> None:
    recorder = FactsRecorder(r, keys)
    recorder.on_batch([(b"1000-0", start("main", 1)), (b"3000-0", start("child", 2, parent="main"))])
    assert read_facts(r, keys)["bot"]["run"] == "main"
    assert read_facts(r, keys, ["bot", "nobody"]) == {"bot": read_facts(r, keys)["bot"]}
