"""Issue 11's attacks on the restart notifier's placeholders, end to end: forged events XADDed to
the real stream, a real detector worker deciding, a real notifier worker running real commands.

Each attack worked before (``../evil`` ran another directory's script, ``-oProxyCommand=...``
ran a local command through ssh, ``; touch`` ran through ``sh -c``); now the value is refused,
nothing runs, and the audit record says why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from agents_detect.kit import pipeline_for, worker_for

from agentwatch import codec, plugins
from agentwatch.keys import Keys

from helpers import running, wait_for
from notify_kit import fire, notifier_running, pipeline_with, stream

RECORD = "import json, sys; open(sys.argv[1], 'a').write(json.dumps(sys.argv[2:]) + chr(10))"


def forge(r: redis.Redis, keys: Keys, agent: str, **start: Any) -> None:
    """What anyone who can XADD can do: a start with chosen facts, then a crash exit."""
    crash = {"kind": "exit", "reason": "exception", "code": 1, "error": "E"}
    for seq, event in enumerate(({"kind": "start", "interval": 1.0, "pid": 4242, **start}, crash)):
        full = {"v": 1, "agent": agent, "ts": time.time(), "run": "forged", "seq": seq, **event}
        r.xadd(keys.events_for(agent), {"d": codec.encode(full)})


def refusals(r: redis.Redis, keys: Keys) -> list[dict[str, str]]:
    return [a for a in stream(r, keys.notify_audit) if a["action"] == "refused"]


def restart(command: list[str], **extra: Any) -> dict[str, Any]:
    return {"type": "restart", "command": command, "on": ["exit"], "backoff": "50ms", **extra}


@pytest.mark.parametrize("program", ["ssh", "recorder"])
@pytest.mark.parametrize(
    ("host", "why"),
    [("-oProxyCommand=touch {marker}", "has characters outside A-Za-z0-9._:@/-"),
     ("-F{config}", "starts with '-' (it could be read as an option)")],  # within the charset
)  # fmt: skip
def test_a_forged_host_that_is_an_option_never_reaches_the_command(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, tmp_path: Path, program: str, host: str, why: str
) -> None:
    marker, calls, config = tmp_path / "pwned", tmp_path / "calls", tmp_path / "evil_config"
    config.write_text(f"ProxyCommand touch {marker}\n")  # what `ssh -F<it> true` would run
    if program == "ssh":
        if shutil.which("ssh") is None:
            pytest.skip("no ssh client")
        command = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=1", "{host}", "true"]
    else:
        command = [sys.executable, "-c", RECORD, str(calls), "{host}"]
    forge(r, keys, "victim", host=host.format(marker=marker, config=config))
    detectors = worker_for(pipeline_for(prefix, redis_url), redis_url)
    notifiers = pipeline_with(prefix, redis_url, [restart(command)])
    with running(detectors), notifier_running(notifiers, redis_url):
        (audit,) = wait_for(lambda: refusals(r, keys), what="the refusal")
    detectors.client.close()
    assert not marker.exists() and not calls.exists()
    assert audit["agent"] == "victim" and audit["argv"] == ""
    assert audit["detail"].startswith("refused to run the command: {host} '-") and why in audit["detail"]
    (failed,) = stream(r, keys.notify_failed)  # not retried: the value will not change
    assert failed["reason"] == audit["detail"]


def test_an_agent_name_climbing_out_of_its_directory_runs_nothing(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, tmp_path: Path
) -> None:
    scripts = tmp_path / "agents"
    for name, body in (("good", "echo good"), ("../evil", f"touch {tmp_path / 'pwned'}")):
        script = scripts / name / "restart"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    # As an event, the name never gets in: the detectors dead-letter it.
    forge(r, keys, "../evil")
    detectors = worker_for(pipeline_for(prefix, redis_url), redis_url)
    with running(detectors):
        wait_for(lambda: r.xlen(keys.deadletter) == 2, what="both forged events dead-lettered")
    detectors.client.close()
    reasons = {fields[b"reason"].decode() for _, fields in r.xrange(keys.deadletter)}
    assert reasons == {"'agent' '../evil' has a '.' or '..' path segment"}
    # And an alert naming it (from wherever it came) is refused by the notifier itself.
    entry = restart(["./{agent}/restart"], cwd=str(scripts), on=["silence"])
    with notifier_running(pipeline_with(prefix, redis_url, [entry]), redis_url):
        fire(r, keys, "../evil")
        (audit,) = wait_for(lambda: refusals(r, keys), what="the refusal")
    assert not (tmp_path / "pwned").exists()
    assert audit["detail"] == "refused to run the command: {agent} '../evil' has a '.' or '..' path segment"


def test_a_shell_script_with_placeholders_is_refused_at_check_config(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text('[[notifiers]]\ntype = "restart"\ncommand = ["sh", "-c", "ssh {host} go {agent}"]\n')
    done = subprocess.run([sys.executable, "-m", "agentwatch", "check-config", str(config)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "[[notifiers]][0]: command: 'sh' runs 'ssh {host} go {agent}' as a script" in done.stderr
    assert "allow_shell = true" in done.stderr


@pytest.mark.parametrize(
    "command",
    [["sh", "-c", "x {host}"], ["/bin/bash", "-lc", "x {agent}"], ["env", "FOO=1", "zsh", "-c", "{run}"],
     ["sudo", "-u", "ops", "sh", "-ec", "restart {agent}"], ["python3.11", "-c", "print('{agent}')"],
     ["node", "-e", "run('{host}')"], ["cmd.exe", "/c", "restart {agent}"]],
)  # fmt: skip
def test_every_way_of_handing_placeholders_to_a_shell_is_refused(command: list[str]) -> None:
    loaded, problems = plugins.load_notifiers([{"type": "restart", "command": command}])
    assert not loaded and "as a script, with placeholders in it" in " ".join(problems), problems
    loaded, problems = plugins.load_notifiers([{"type": "restart", "command": command, "allow_shell": True}])
    assert loaded and not problems


@pytest.mark.parametrize(
    "command",
    [["sh", "-c", 'systemctl restart "agent@$AW_AGENT"'], ["bash", "/opt/restart.sh", "{agent}"],
     ["sh", "-c", 'systemctl restart "agent@$1"', "sh", "{agent}"],
     [sys.executable, "restart.py", "{agent}", "{host}"],
     ["ssh", "{host}", "systemctl", "restart", "agent@{agent}"]],
)  # fmt: skip
def test_commands_that_pass_values_as_arguments_or_environment_are_accepted(command: list[str]) -> None:
    loaded, problems = plugins.load_notifiers([{"type": "restart", "command": command}])
    assert loaded and not problems, problems


def test_with_allow_shell_a_host_carrying_a_shell_construct_is_still_refused(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    forge(r, keys, "victim", host=f"box; touch {marker}")
    entry = restart(["sh", "-c", "echo restarting on {host}"], allow_shell=True)
    detectors = worker_for(pipeline_for(prefix, redis_url), redis_url)
    with running(detectors), notifier_running(pipeline_with(prefix, redis_url, [entry]), redis_url):
        (audit,) = wait_for(lambda: refusals(r, keys), what="the refusal")
    detectors.client.close()
    assert not marker.exists()
    assert "has characters outside A-Za-z0-9._:@/-" in audit["detail"]
    assert json.loads(audit["argv"] or "null") is None
