"""Copies of one event (same agent, run and seq) count once, even when one batch reads them all.

PROTOCOL.md's redelivery rule: an event whose seq was applied already is dropped and counted.
A producer retrying an XADD whose reply it lost, or a shell loop repeating one event, writes such
copies back to back, so one XREADGROUP often reads several; before they were dropped per batch
(not per event), three copies of a $0.50 beat counted three beats and $1.50 against a budget.
"""

from __future__ import annotations

import itertools

import redis
from agents_detect.kit import Agent, pipeline_for, worker_for
from test_budgets import today, with_budgets

from agentwatch import codec
from agentwatch.cli.elsewhere import duplicates_dropped
from agentwatch.keys import Keys
from agentwatch.rollups import Totals
from detectors.agent import read_agents

from helpers import caught_up, running, wait_for


def _ev(agent: str, run: str, seq: int) -> tuple[bytes, dict[str, object]]:
    return (f"1-{seq}".encode(), {"agent": agent, "run": run, "seq": seq, "kind": "beat"})


def test_exact_copies_are_dropped_and_counted_per_agent_nothing_else() -> None:
    batch = [_ev("a", "r1", 1), _ev("a", "r1", 1), _ev("b", "r1", 1), _ev("a", "r2", 1),
             _ev("a", "r1", 2), _ev("a", "r1", 1), _ev("b", "r1", 1)]  # fmt: skip
    kept, dropped = codec.drop_repeats(batch)
    assert [(ev["agent"], ev["run"], ev["seq"]) for _, ev in kept] == [
        ("a", "r1", 1),
        ("b", "r1", 1),
        ("a", "r2", 1),
        ("a", "r1", 2),
    ]
    assert dropped == {"a": 2, "b": 1}


def test_a_lower_seq_after_a_higher_one_is_not_a_copy() -> None:
    batch = [_ev("a", "r1", 5), _ev("a", "r1", 4)]  # another worker's reclaim may bring it
    assert codec.drop_repeats(batch) == (batch, {})


def test_copies_read_in_one_batch_count_once_in_totals_spend_and_the_counter(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    bot = Agent(r, keys, "dup")
    bot.start(interval=1.0)
    for _ in range(3):  # written before the worker starts: its first read takes all of them
        bot.seq = itertools.count(1)
        bot.beat(tokens=100, cost=0.5)
    pipeline = with_budgets(pipeline_for(prefix, redis_url), {"limit": 100.0})
    with running(worker_for(pipeline, redis_url)):
        wait_for(lambda: caught_up(r, keys), what="the batch read and acknowledged")
        bot.seq = itertools.count(1)
        bot.beat(tokens=100, cost=0.5)  # a fourth copy, in a later batch
        wait_for(lambda: caught_up(r, keys), what="the later copy read")
        wait_for(lambda: duplicates_dropped(r, keys) == 3, what="three copies counted")
    totals = Totals.of_record(read_agents(r, keys)["dup"])
    assert (totals.beats, totals.tokens, totals.cost) == (1, 100, 0.5), totals
    assert today(r, keys, "dup").cost == 0.5
