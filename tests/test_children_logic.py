"""The child watch's decisions (detectors/children.py) as pure logic: hand-built agents and child
runs, decisions recorded, no Redis. The texts are the ones tests/test_children.py reads end to end."""

from __future__ import annotations

import logging
from typing import Any, cast

import pytest

from agentwatch.plugins import load_detectors
from detectors import agent as agent_state
from detectors.base import Agent, ChildRun, DetectorContext, Event, RecordedDecisions
from detectors.children import DETECTOR, KEEP_EXITED_MS, KEEP_ORPHANS_MS, Children, ChildState
from detectors.silence import SilenceConfig

T0 = 1_000_000
AFTER = 1000  # silence's after, ms
OVER = "bot: the run whose worker died is over"


def watch(config: SilenceConfig | None = None) -> Children:
    config = config or SilenceConfig.model_validate({"after": f"{AFTER}ms"})
    return Children("children", config, cast(DetectorContext, None))  # the logic never needs the context


def ops(children: Children) -> list[tuple[str, str, dict[str, Any]]]:
    return cast(RecordedDecisions, children.decisions).ops


def pool(name: str = "bot", *, workers: int = 2, interval: float = 0.0) -> Agent:
    """An agent whose run ``parent-1`` has ``workers`` children, all last seen at T0."""
    agent = Agent(name, run="parent-1", started_ms=T0 - 100, seen_ms=T0)
    for k in range(workers):
        child = ChildRun("parent-1", started_ms=T0 - 50, last_seq=3, seen_ms=T0, interval_s=interval)
        child.pid, child.host = 4700 + k, "h1"
        agent.children[f"worker-{k}"] = child
    return agent


def run_until(children: Children, agent: Agent, until_ms: int, *, parent_beats: bool = True) -> None:
    """Time passes to ``until_ms`` in steps of 100 ms; the parent beats at each (if told to),
    and the watch is asked whenever its due time has come (as the engine would)."""
    now = agent.seen_ms
    while now < until_ms:
        now += 100
        if parent_beats:
            agent.seen_ms = agent.beat_ms = now
        due = children.due_ms(agent)
        if due and due <= now:
            children.on_due(agent, now, now, 0)


def test_a_worker_silent_past_the_allowance_while_its_parent_beats_is_one_incident() -> None:
    children, agent = watch(), pool()
    agent.children["worker-1"].seen_ms = T0 + 5000  # the other worker lives on
    assert children.due_ms(agent) == 0  # the agent not seen since: nothing to judge yet
    run_until(children, agent, T0 + AFTER)
    assert ops(children) == []  # exactly the allowance: not yet
    run_until(children, agent, T0 + AFTER + 100)
    (name, kind, op), *more = ops(children)
    assert (name, kind, op["o"], op["at"], more) == ("bot", DETECTOR, "f", T0 + AFTER, [])
    assert op["f"] == {"pid": 4700, "run": "worker-0", "parent": "parent-1", "host": "h1",
                       "silent_s": 1.1, "allowance_s": 1.0}  # fmt: skip
    severity, summary, details = children.render("bot", DETECTOR, op)
    assert severity == "critical"  # silence's
    assert summary == (
        "bot: worker process 4700 (run worker-0, child of run parent-1) gone without a goodbye: "
        "no event for 1s while its parent kept running (SIGKILL, OOM killer?)"
    )
    assert details == op["f"]
    assert agent.is_open(DETECTOR) and cast(ChildState, agent.states["children"]).dead_parent == "parent-1"
    run_until(children, agent, T0 + 4000)
    assert len(ops(children)) == 1  # told once


def test_later_dead_workers_while_it_is_open_are_logged_only(caplog: pytest.LogCaptureFixture) -> None:
    children, agent = watch(), pool(workers=2)
    agent.children["worker-1"].seen_ms = T0 + 500
    with caplog.at_level(logging.WARNING, logger="agentwatch.detectors.children"):
        run_until(children, agent, T0 + 3000)
    assert [op["f"]["run"] for _, _, op in ops(children)] == ["worker-0"]
    assert [r.getMessage() for r in caplog.records] == [
        "'bot: worker process 4701 (run worker-1, child of run parent-1) gone without a goodbye: "
        "no event for 1s while its parent kept running (SIGKILL, OOM killer?)' "
        "(a child incident of this agent is open already)"
    ]
    assert list(cast(ChildState, agent.states["children"]).told) == ["worker-0", "worker-1"]


def test_run_ids_from_the_agent_reach_the_log_escaped(caplog: pytest.LogCaptureFixture) -> None:
    """A run id is any text the agent chose: in the log (a terminal) its control characters
    are escapes, never a screen-clearing or title-setting sequence."""
    children, agent = watch(), pool(workers=2)
    agent.children["worker-1"].seen_ms = T0 + 500
    agent.children["\x1b]0;pwned\x07"] = agent.children.pop("worker-1")
    with caplog.at_level(logging.WARNING, logger="agentwatch.detectors.children"):
        run_until(children, agent, T0 + 3000)
    (message,) = [r.getMessage() for r in caplog.records]
    assert "\x1b" not in message and "\\x1b]0;pwned\\x07" in message


def test_a_worker_that_exited_raises_nothing_and_its_record_goes_after_a_minute() -> None:
    children, agent = watch(), pool(workers=1)
    agent.children["worker-0"].exited = True
    run_until(children, agent, T0 + 5000)
    assert ops(children) == [] and "worker-0" in agent.children
    assert children.due_ms(agent) == T0 + KEEP_EXITED_MS + 1
    run_until(children, agent, T0 + KEEP_EXITED_MS + 100)
    assert ops(children) == [] and agent.children == {}
    assert children.due_ms(agent) == 0


def test_the_allowance_is_three_intervals_when_that_is_longer() -> None:
    children, agent = watch(), pool(workers=1, interval=2.0)
    run_until(children, agent, T0 + 6000)
    assert ops(children) == []
    run_until(children, agent, T0 + 6100)
    op = ops(children)[0][2]
    assert op["at"] == T0 + 6000 and op["f"]["allowance_s"] == 6.0
    assert "no event for 6s" in children.render("bot", DETECTOR, op)[1]


def test_no_death_without_the_parent_seen_since() -> None:
    """The whole agent went quiet (the parent too): that is silence's to tell, not a child's."""
    children, agent = watch(), pool(workers=1)
    run_until(children, agent, T0 + 5000, parent_beats=False)
    assert ops(children) == [] and children.due_ms(agent) == 0
    agent.seen_ms = T0 + AFTER // 2  # seen, but not after half the allowance past the child's last
    assert children.due_ms(agent) == 0
    agent.seen_ms = T0 + AFTER // 2 + 1
    assert children.due_ms(agent) == T0 + AFTER + 1
    children.on_due(agent, T0 + 5000, T0 + 5000, 0)
    assert [op["f"]["silent_s"] for _, _, op in ops(children)] == [5.0]


@pytest.mark.parametrize("how", ["retired", "exited", "another run", "its exit event"])
def test_children_of_a_run_that_is_over_are_not_watched(how: str) -> None:
    children, agent = watch(), pool(workers=1)
    if how == "retired":
        agent.retired = True
    elif how == "exited":
        agent.exited = True
    elif how == "another run":
        agent.run = "parent-2"
    else:
        children.on_event(agent, exit_of("parent-1"), T0, None)
    run_until(children, agent, T0 + 5000)
    assert ops(children) == []
    assert children.due_ms(agent) == T0 + KEEP_EXITED_MS + 1  # kept a while for its late events


def test_children_of_an_agent_with_no_run_yet_wait_for_it_then_go() -> None:
    """A worker's events can come before its parent's start: kept (its parent may still come),
    never judged, and forgotten after ten minutes."""
    children, agent = watch(), pool(workers=1)
    agent.run = ""
    run_until(children, agent, T0 + KEEP_ORPHANS_MS)
    assert ops(children) == [] and "worker-0" in agent.children
    run_until(children, agent, T0 + KEEP_ORPHANS_MS + 100)
    assert agent.children == {}


def dead(children: Children, agent: Agent) -> None:
    """Make worker-0 of ``agent`` die and be told."""
    run_until(children, agent, T0 + AFTER + 100)
    assert [(kind, op["o"]) for _, kind, op in ops(children)] == [(DETECTOR, "f")]


def exit_of(run: str, code: int = 0) -> Event:
    return {"agent": "bot", "kind": "exit", "run": run, "seq": 9, "reason": "exit", "code": code}


def resolutions(children: Children) -> list[tuple[int, str]]:
    out = []
    for _, _, op in ops(children):
        if op["o"] == "r":
            out.append((op["at"], children.render("bot", DETECTOR, op)[1]))
    return out


def test_it_resolves_when_the_agent_starts_a_new_run() -> None:
    children, agent = watch(), pool()
    agent.children["worker-1"].seen_ms = T0 + 100_000
    dead(children, agent)
    children.on_new_run(agent, T0 + 2000)
    agent.run, agent.children = "parent-2", {}  # what the engine does
    assert resolutions(children) == [(T0 + 2000, f"{OVER} (replaced by a new run)")]
    severity, _, details = children.render("bot", DETECTOR, ops(children)[-1][2])
    assert (severity, details) == ("critical", {})
    state = cast(ChildState, agent.states["children"])
    assert (state.told, state.dead_parent, agent.open) == ([], "", set())


def test_it_resolves_when_the_agent_retires() -> None:
    children, agent = watch(), pool()
    dead(children, agent)
    agent.retired = True
    children.on_retire(agent, T0 + 2000)
    assert resolutions(children) == [(T0 + 2000, f"{OVER} (retired or exited)")]
    assert children.due_ms(agent) == T0 + KEEP_EXITED_MS + 1  # nothing left but forgetting


def test_it_resolves_when_the_parent_run_exits_but_not_when_a_worker_does() -> None:
    children, agent = watch(), pool()
    dead(children, agent)
    worker = agent.children["worker-1"]
    children.on_event(agent, exit_of("worker-1"), T0 + 1500, worker)
    assert resolutions(children) == []
    children.on_event(agent, exit_of("parent-1", 137), T0 + 1600, None)
    assert resolutions(children) == [(T0 + 1600, f"{OVER} (retired or exited)")]


def test_an_exit_of_an_older_run_ends_nothing() -> None:
    children, agent = watch(), pool()
    dead(children, agent)
    children.on_event(agent, exit_of("parent-0", 1), T0 + 1600, None)
    assert resolutions(children) == [] and agent.is_open(DETECTOR)


@pytest.mark.parametrize(
    ("change", "how"), [("exited", "retired or exited"), ("run", "replaced by a new run")]
)
def test_a_run_found_over_at_a_check_resolves_it_then(change: str, how: str) -> None:
    """The hooks end it first; a check that finds its run over without them ends it all the same."""
    children, agent = watch(), pool()
    dead(children, agent)
    if change == "exited":
        agent.exited = True
    else:
        agent.run, agent.children = "parent-2", {}
    assert 0 < children.due_ms(agent) <= agent.seen_ms
    children.on_due(agent, T0 + 3000, T0 + 3000, 0)
    assert resolutions(children) == [(T0 + 3000, f"bot: the run whose worker died is over ({how})")]


def test_due_is_the_earliest_deadline_of_a_watched_worker() -> None:
    children, agent = watch(), pool(workers=3)
    agent.children["worker-0"].seen_ms = T0 + 300
    agent.children["worker-1"].interval_s = 1.0  # allowance 3 s
    agent.children["worker-2"].exited = True
    agent.seen_ms = T0 + 900
    assert children.due_ms(agent) == T0 + 300 + AFTER + 1
    agent.seen_ms = T0 + 1200  # after half worker-0's allowance, not worker-1's
    assert children.due_ms(agent) == T0 + 300 + AFTER + 1
    agent.children["worker-0"].seen_ms = T0 + 1200
    assert children.due_ms(agent) == T0 + KEEP_EXITED_MS + 1  # only worker-2's record to forget
    agent.seen_ms = T0 + 1501
    assert children.due_ms(agent) == T0 + 3000 + 1  # worker-1 (worker-0 not judged before a later event)


def test_no_deadline_after_the_limit_is_judged() -> None:
    """The checks may not be caught up: a worker's event may be waiting, unread, after ``limit``."""
    children, agent = watch(), pool(workers=1)
    agent.seen_ms = T0 + 900
    children.on_due(agent, T0 + 5000, T0 + AFTER, 0)
    assert ops(children) == []
    children.on_due(agent, T0 + 5000, T0 + AFTER + 1, 0)
    op = ops(children)[0][2]
    assert (op["at"], op["f"]["silent_s"]) == (T0 + AFTER, 1.001)


def test_no_allowance_counts_time_nobody_watched() -> None:
    children, agent = watch(), pool(workers=1)
    agent.seen_ms = T0 + 4400
    sight = T0 + 4000
    children.on_due(agent, T0 + 4500, T0 + 4500, sight)
    assert ops(children) == []
    assert children.due_ms(agent) == 0  # the parent not seen after half an allowance from sight
    agent.seen_ms = sight + AFTER // 2 + 1
    assert children.due_ms(agent) == sight + AFTER + 1
    children.on_due(agent, sight + AFTER + 1, sight + AFTER + 1, sight)
    op = ops(children)[0][2]
    assert (op["at"], op["f"]["silent_s"], op["f"]["allowance_s"]) == (sight + AFTER, 5.001, 1.0)


def test_facts_left_unknown_are_told_as_such() -> None:
    children, agent = watch(), pool(workers=1)
    agent.children["worker-0"].pid, agent.children["worker-0"].host = 0, ""
    dead(children, agent)
    op = ops(children)[0][2]
    assert (op["f"]["pid"], op["f"]["host"]) == (None, None)
    summary = children.render("bot", DETECTOR, op)[1]
    assert summary.startswith("bot: worker process ? (run worker-0, child of run parent-1) gone")


def test_the_allowance_and_severity_are_the_agents_own() -> None:
    overrides = {"slow-*": {"after": "10s", "severity": "error"}}
    loaded, problems = load_detectors({"silence": {"after": "1s", "agents": overrides}})
    assert problems == []
    silence = next(plugin for plugin in loaded if plugin.name == "silence")
    children = watch(cast(SilenceConfig, silence.config))
    slow, quick = pool("slow-1", workers=1), pool("quick-1", workers=1)
    for agent in (slow, quick):
        run_until(children, agent, T0 + 2000)
    assert [name for name, _, _ in ops(children)] == ["quick-1"]
    run_until(children, slow, T0 + 10_100)
    name, _, op = ops(children)[-1]
    assert (name, op["f"]["allowance_s"]) == ("slow-1", 10.0)
    assert children.render("slow-1", DETECTOR, op)[0] == "error"
    assert children.render("quick-1", DETECTOR, ops(children)[0][2])[0] == "critical"


def test_an_agent_without_children_costs_nothing() -> None:
    children, agent = watch(), Agent("bot", run="r1", seen_ms=T0)
    assert children.due_ms(agent) == 0
    children.on_new_run(agent, T0)
    children.on_retire(agent, T0)
    assert agent.states == {} and ops(children) == []


def test_what_was_told_is_checkpointed_with_the_agent() -> None:
    """The next owner of the shard neither tells a dead worker again nor loses the open incident."""
    children, agent = watch(), pool()
    agent.children["worker-1"].seen_ms = T0 + 100_000
    dead(children, agent)
    back = agent_state.unpack("bot", agent_state.pack(agent), {"children": ChildState})
    assert back is not None and back.open == {DETECTOR} and back.children == agent.children
    assert back.states["children"] == ChildState(told=["worker-0"], dead_parent="parent-1", sight_ms=0)
    successor = watch()
    run_until(successor, back, T0 + 4000)
    successor.on_retire(back, T0 + 4100)
    assert [(op["o"], op["at"]) for _, _, op in ops(successor)] == [("r", T0 + 4100)]
