"""The restart notifier, fed alerts directly: argv substitution, start limits, timeouts, signals."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from agents_detect.kit import pipeline_for, worker_for

from agentwatch import codec, plugins
from agentwatch.alerts import Incidents, decode_alert
from agentwatch.keys import Keys

from helpers import running, wait_for
from notify_kit import fire, notifier_running, pipeline_with, resolve, stream

RECORD = """
import json, sys
with open(sys.argv[1], "a") as out:
    out.write(json.dumps(sys.argv[2:]) + "\\n")
print("restarting", *sys.argv[2:])
"""


@pytest.fixture
def recorder(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "record.py"
    script.write_text(RECORD)
    return script, tmp_path / "calls.jsonl"


def calls(path: Path) -> list[list[str]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def restart(command: list[str], **extra: Any) -> dict[str, Any]:
    return {"type": "restart", "command": command, "backoff": "50ms", "restart_backoff": "0s", **extra}


def loop_alerts(r: redis.Redis, keys: Keys) -> list[Any]:
    alerts = [decode_alert(fields[b"d"]) for _, fields in r.xrange(keys.alerts)]
    return [a for a in alerts if a.detector == "restart_loop"]


def test_command_gets_placeholders_per_element_and_an_audit_record(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, recorder: tuple[Path, Path]
) -> None:
    script, out = recorder
    command = [
        sys.executable,
        str(script),
        str(out),
        "--agent={agent}",
        "{detector}",
        "{pid}",
        "{host}",
        "{run}",
    ]
    with notifier_running(pipeline_with(prefix, redis_url, [restart(command)]), redis_url):
        alert = fire(r, keys, "team/bot-1", details={"pid": 4242, "host": "box-1", "run": "r-9"})
        wait_for(lambda: calls(out), what="the restart command")
        wait_for(lambda: stream(r, keys.notify_log), what="the delivered record")
    assert calls(out) == [["--agent=team/bot-1", "silence", "4242", "box-1", "r-9"]]
    (audit,) = stream(r, keys.notify_audit)
    assert audit["action"] == "restarted" and audit["exit"] == "0" and audit["alert"] == alert.id
    assert json.loads(audit["argv"])[3] == "--agent=team/bot-1"
    assert audit["output"].startswith("restarting --agent=team/bot-1 silence 4242")


def test_only_detectors_listed_in_on_and_only_open_incidents_restart(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, recorder: tuple[Path, Path]
) -> None:
    script, out = recorder
    fire(r, keys, "gone-already")
    resolve(r, keys, "gone-already")  # came back before any worker looked: leave it alone
    entry = restart([sys.executable, str(script), str(out), "{agent}", "{detector}"], on=["silence"])
    with notifier_running(pipeline_with(prefix, redis_url, [entry]), redis_url):
        fire(r, keys, "hot", "tokens", severity="warning")
        fire(r, keys, "dead")
        wait_for(lambda: calls(out), what="the restart of 'dead'")
        wait_for(lambda: len(stream(r, keys.notify_audit)) >= 2, what="both audit records")
    assert calls(out) == [["dead", "silence"]]
    actions = {(a["agent"], a["action"]) for a in stream(r, keys.notify_audit)}
    assert actions == {("gone-already", "skipped"), ("dead", "restarted")}
    skipped = next(a for a in stream(r, keys.notify_audit) if a["action"] == "skipped")
    assert "no longer open" in skipped["detail"]


def test_start_limit_yields_exactly_one_restart_loop_alert(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, recorder: tuple[Path, Path]
) -> None:
    script, out = recorder
    entry = restart([sys.executable, str(script), str(out), "{agent}"], start_limit_burst=2)
    with notifier_running(pipeline_with(prefix, redis_url, [entry]), redis_url):
        for n in (1, 2):  # crash, restart, come back - twice
            fire(r, keys, "looper")
            wait_for(lambda n=n: len(calls(out)) == n, what=f"restart {n}")
            resolve(r, keys, "looper")
        fire(r, keys, "looper")  # the third crash in the window: no restart, one loop alert
        wait_for(lambda: loop_alerts(r, keys), what="the restart loop alert")
        fire(r, keys, "looper", "stall")  # another detector while looping: held off, no 2nd alert
        wait_for(lambda: any(a["detector"] == "stall" for a in stream(r, keys.notify_audit)), what="stall")
        (loop,) = loop_alerts(r, keys)
        assert len(calls(out)) == 2
        assert loop.severity == "critical" and loop.status == "firing" and loop.agent == "looper"
        assert "2 restarts within 10m" in loop.summary and loop.details["trigger"] == "silence"
        # The agent recovers (its silence resolves): the loop resolves and restarts resume.
        resolve(r, keys, "looper")
        wait_for(lambda: len(loop_alerts(r, keys)) == 2, what="the loop resolved")
        assert [a.status for a in loop_alerts(r, keys)] == ["firing", "resolved"]
        fire(r, keys, "looper")
        wait_for(lambda: len(calls(out)) == 3, what="restarts resumed")
    assert Incidents(r, keys).open("looper", "restart_loop") is None


def test_the_restart_loop_ends_only_when_the_agent_recovers_not_on_an_older_incident(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, recorder: tuple[Path, Path]
) -> None:
    script, out = recorder
    entry = restart([sys.executable, str(script), str(out), "{agent}", "{detector}"], start_limit_burst=2)

    def handled(alert: Any) -> dict[str, str]:
        """The audit record of the restart notifier's handling of ``alert``."""

        def records() -> list[dict[str, str]]:
            return [a for a in stream(r, keys.notify_audit) if a["alert"] == alert.id]

        return wait_for(records, what=f"{alert.detector} {alert.status} handled")[0]

    def into_a_loop(agent: str) -> None:
        fire(r, keys, agent, "stall")
        wait_for(lambda: [agent, "stall"] in calls(out), what="restart 1, for the stall")
        fire(r, keys, agent, "exit")  # the restarted agent crashes
        wait_for(lambda: [agent, "exit"] in calls(out), what="restart 2, for the exit")
        fire(r, keys, agent, "silence")  # and stays silent: the third restart hits the limit
        wait_for(lambda: [a for a in loop_alerts(r, keys) if a.agent == agent], what="the loop alert")

    incidents = Incidents(r, keys)
    with notifier_running(pipeline_with(prefix, redis_url, [entry]), redis_url):
        into_a_loop("a")
        # The old stall ends while the agent is still dead: not a recovery (the audit's bug).
        kept = handled(resolve(r, keys, "a", "stall"))
        assert kept["action"] == "skipped" and "silence, exit still open" in kept["detail"]
        assert incidents.open("a", "restart_loop") is not None
        # The incident that hit the limit ends (heartbeats are back): recovered, although the
        # exit incident is still open.
        assert handled(resolve(r, keys, "a", "silence"))["action"] == "recovered"
        assert incidents.open("a", "restart_loop") is None and incidents.open("a", "exit") is not None

        # Without a record of which incident hit the limit (its worker died before writing it),
        # the loop ends once no incident of a detector in `on` is open any more.
        into_a_loop("b")
        # The record is written just after the loop alert is fired: wait for it, then lose it.
        starts = keys.notifier_starts("restart")
        wait_for(lambda: r.hexists(starts, "b|loop"), what="the loop's trigger recorded")
        r.hdel(starts, "b|loop")
        assert handled(resolve(r, keys, "b", "silence"))["action"] == "skipped"
        assert handled(resolve(r, keys, "b", "stall"))["action"] == "skipped"
        assert handled(resolve(r, keys, "b", "exit"))["action"] == "recovered"
        assert incidents.open("b", "restart_loop") is None
    assert [a.status for a in loop_alerts(r, keys)] == ["firing", "resolved", "firing", "resolved"]
    assert len(calls(out)) == 4  # two restarts each, none while looping


def test_restarts_back_off_and_a_command_that_hangs_is_killed_at_its_timeout(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "starts"
    hang = (  # no braces: the command's elements are templates ({agent}...)
        f"import time; open({str(marker)!r}, 'a').write(str(time.time()) + chr(10)); "
        "print('starting', flush=True); time.sleep(30)"
    )
    entry = restart(
        [sys.executable, "-c", hang], timeout="500ms", restart_backoff="700ms", start_limit_burst=3
    )
    with notifier_running(pipeline_with(prefix, redis_url, [entry]), redis_url):
        fire(r, keys, "stuck")
        wait_for(lambda: loop_alerts(r, keys), 15, what="three timed-out restarts, then the loop")
    runs = [a for a in stream(r, keys.notify_audit) if a["action"] == "failed"]
    assert len(runs) == 3
    assert all(a["timed_out"] == "1" and a["exit"] == "" and "starting" in a["output"] for a in runs)
    assert all(500 <= int(a["ms"]) < 3000 for a in runs)  # killed at its timeout, not left to run
    # The backoff runs from when a restart began (the start limit's record, Redis time), not from
    # when the previous command was killed: restart n waits 700 ms x 2**(n-2) after restart n-1.
    began = [start["ms"] for start in json.loads(r.hget(keys.notifier_starts("restart"), "stuck") or b"[]")]
    assert len(began) == 3 and began[1] - began[0] >= 700 and began[2] - began[1] >= 1400
    # And the commands really started apart (each Python start-up may vary by 250 ms on a loaded
    # box; without the backoff they would start one 500 ms timeout after another).
    started = [float(line) for line in marker.read_text().split()]
    assert len(started) == 3 and started[1] - started[0] >= 0.45 and started[2] - started[1] >= 1.15


def test_signal_mode_acts_on_this_host_only(r: redis.Redis, keys: Keys, prefix: str, redis_url: str) -> None:
    """The proof that a pid is the agent's run (a run file, its owner, the start time) is in
    test_restart_signal.py; before any of it, an agent on another host is not this worker's."""
    entry = {"type": "restart", "signal": "term", "on": ["stall"], "backoff": "50ms"}
    with notifier_running(pipeline_with(prefix, redis_url, [entry]), redis_url):
        fire(r, keys, "elsewhere", "stall", details={"host": "some-other-box", "pid": 4242, "run": "r1"})
        wait_for(lambda: r.xlen(keys.notify_failed), what="the other host's failure")
    (failed,) = stream(r, keys.notify_failed)
    assert failed["agent"] == "elsewhere"
    assert (
        failed["reason"]
        == f"agent runs on host some-other-box, this worker on {socket.gethostname()}: cannot signal it"
    )
    assert [a["action"] for a in stream(r, keys.notify_audit)] == ["failed"]


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"command": ["restart", "{agnet}"]}, "unknown placeholder {agnet}"),
        ({"command": ["x"], "signal": "SIGTERM"}, "exactly one of command"),
        ({}, "exactly one of command"),
        ({"signal": "SIGNOPE"}, "unknown signal"),
        ({"command": "systemctl restart x"}, "command"),
        ({"command": ["x"], "start_limit_burst": 0}, "start_limit_burst"),
        ({"command": ["x"], "send_resolved": False}, "needs resolved alerts"),
        ({"command": ["x"], "match": {"statuses": ["firing"]}}, "needs resolved alerts"),
    ],
)
def test_bad_config_fails_at_start_up_naming_the_key(entry: dict[str, Any], needle: str) -> None:
    loaded, problems = plugins.load_notifiers([{"type": "restart", **entry}])
    assert not loaded and needle in " ".join(problems), problems


def test_facts_come_from_the_agents_last_start_as_the_detectors_recorded_it(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, recorder: tuple[Path, Path]
) -> None:
    for run, pid in (("run-41", 1), ("run-42", 31337)):  # restarted once: the latest start counts
        start = {"v": 1, "agent": "bot", "kind": "start", "ts": time.time(), "run": run, "seq": 0,
                 "interval": 1.0, "pid": pid, "host": "box-9"}  # fmt: skip
        r.xadd(keys.events(), {"d": codec.encode(start)})
    detectors = worker_for(pipeline_for(prefix, redis_url), redis_url)
    with running(detectors):
        wait_for(lambda: b"run-42" in (r.hget(keys.facts(0), "bot") or b""), what="the facts recorded")
    detectors.client.close()
    script, out = recorder
    entry = restart([sys.executable, str(script), str(out), "{run}", "{host}", "{pid}"])
    with notifier_running(pipeline_with(prefix, redis_url, [entry]), redis_url):
        fire(r, keys, "bot")
        wait_for(lambda: calls(out), what="the restart")
    assert calls(out) == [["run-42", "box-9", "31337"]]
