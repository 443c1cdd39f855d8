"""PROTOCOL.md's shell examples against a real Redis and a real detector worker (issue 10, point 10).

The blocks are taken from PROTOCOL.md and run by ``sh`` (dash where it is /bin/sh) with the real
``redis-cli``; only the stream key (the test's prefix) and the server ``redis-cli`` reaches (a
wrapper on PATH) differ. The loop that counts ``seq`` up keeps its agent alive; the one-shot
example repeated has every repeat dropped as a redelivery, and counted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from agents_detect.kit import pipeline_for, transitions, worker_for

from agentwatch.cli.elsewhere import duplicates_dropped
from agentwatch.keys import Keys
from detectors.agent import read_agents

from helpers import caught_up, running, wait_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli"),
]


def protocol_block(after: str) -> str:
    """The first ```sh block of PROTOCOL.md after the text ``after``."""
    text = (ROOT / "PROTOCOL.md").read_text()
    match = re.search(r"```sh\n(.*?)```", text[text.index(after) :], re.S)
    assert match, after
    return match.group(1)


@pytest.fixture
def shell_env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    """PATH with a ``redis-cli`` that talks to the test's Redis."""
    real = shutil.which("redis-cli")
    assert real is not None
    if redis_url.startswith("unix://"):
        target = f"-s {redis_url[len('unix://') :].split('?', 1)[0]}"
        db = re.search(r"db=(\d+)", redis_url)
        target += f" -n {db.group(1)}" if db else ""
    else:
        target = f"-u {redis_url}"
    wrapper = tmp_path / "bin" / "redis-cli"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real} {target} "$@"\n')
    wrapper.chmod(0o755)
    return {**os.environ, "PATH": f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture
def shell() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def test_the_shell_loop_keeps_its_agent_alive(
    redis_url: str, prefix: str, r: redis.Redis, shell_env: dict[str, str], shell: list[subprocess.Popen[str]]
) -> None:
    keys = Keys(prefix)
    script = protocol_block("## Example: heartbeats from a shell loop").replace(
        "KEY=aw:events", f"KEY={keys.events()}"
    )
    assert "while true; do" in script and 'u32 "$SEQ"' in script
    pipeline = pipeline_for(prefix, redis_url, silence={"after": "1s"})  # silent after 3 x interval (1 s)
    with running(worker_for(pipeline, redis_url)):
        loop = subprocess.Popen(["sh", "-c", script], env=shell_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        shell.append(loop)
        # 20 beats at 0.2 s and more (each spawns redis-cli): past the 3 s silence threshold.
        wait_for(lambda: r.xlen(keys.events()) >= 21 or loop.poll() is not None, 60, what="20 beats")
        assert loop.poll() is None, loop.communicate()
        wait_for(lambda: caught_up(r, keys), 20, what="the worker to catch up")
        known = read_agents(r, keys, ["sh-bot"])  # checkpointed before the batch was acknowledged
        assert known["sh-bot"]["beats"] >= 20  # the detectors know the agent
        assert not [t for t in transitions(r, keys) if t[0] == "sh-bot"]  # and raised nothing
        assert duplicates_dropped(r, keys) == 0


def test_the_one_shot_example_repeated_is_dropped_and_counted(
    redis_url: str, prefix: str, r: redis.Redis, shell_env: dict[str, str], tmp_path: Path
) -> None:
    keys = Keys(prefix)
    once = protocol_block("One event, written out").replace("XADD aw:events", f"XADD {keys.events()}")
    pipeline = pipeline_for(prefix, redis_url)
    with running(worker_for(pipeline, redis_url)):
        for _ in range(10):  # the mistake: the same run and seq every time
            subprocess.run(["sh", "-c", once], env=shell_env, check=True, capture_output=True, timeout=30)
        wait_for(lambda: caught_up(r, keys), 20, what="the worker to catch up")
    assert r.xlen(keys.events()) == 10
    assert duplicates_dropped(r, keys) == 9
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
    result = subprocess.run(
        [sys.executable, "-m", "agentwatch", "status", "--json"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**clean, "AGENTWATCH_REDIS__URL": redis_url, "AGENTWATCH_REDIS__PREFIX": prefix}, timeout=60,
    )  # fmt: skip
    assert json.loads(result.stdout)["duplicates_dropped"] == 9, result.stderr
