"""The example agents are documentation: they must run as written and report what they claim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis
from agents.testkit import agent_env, assert_no_internal_errors, kinds, of_kind, read_events

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "agents"
pytestmark = pytest.mark.slow


def test_examples_run_and_report(redis_url: str, prefix: str, r: redis.Redis) -> None:
    env = agent_env(redis_url, prefix)
    names = ["loop_agent", "async_agent", "openai_style_agent"]
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(EXAMPLES / f"{name}.py")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    }  # all at once: each spends most of its time in (simulated) work
    for process in processes.values():
        _, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        assert_no_internal_errors(err)

    events = read_events(r, f"{prefix}:events")
    by_agent = {name: [e for e in events if e["agent"] == name.replace("_", "-")] for name in names}
    loop, asyncio_, llm = (by_agent[name] for name in names)
    assert kinds(loop) == ["start"] + ["beat"] * 20 + ["exit"]
    assert len(of_kind(asyncio_, "beat")) == 30
    assert {e["worker"] for e in of_kind(asyncio_, "beat")} <= {"w0", "w1", "w2"}
    beats = of_kind(llm, "beat")
    assert all(b["tokens"] == b["tokens_in"] + b["tokens_out"] for b in beats[:5])
    assert {b["model"] for b in beats[:5]} == {"gpt-4o-mini"}
    assert [p["extend"] for p in of_kind(llm, "pulse") if "extend" in p] == [60.0]
    for agent in (loop, asyncio_, llm):  # finite examples end on purpose: no "exited" alert
        assert agent[-1]["kind"] == "exit" and agent[-1]["reason"] == "shutdown"
