"""No silent mismatches (issue 10, points 5 and 6): ``status`` notes events nobody reads and
says where its Redis URL came from; ``up`` prints what agents need and whose server it uses."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from agentwatch.cli.run import _foreign_server, _print_banner
from agentwatch.loading import load


def _cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
    return subprocess.run([sys.executable, "-m", "agentwatch", *args], capture_output=True, text=True,
                          env={**clean, **env}, cwd=cwd, timeout=60)  # fmt: skip


def test_status_notes_events_arriving_on_a_prefix_nobody_reads(
    redis_url: str, prefix: str, r: redis.Redis, tmp_path: Path
) -> None:
    stray, read, left = f"{prefix}x", f"{prefix}y", f"{prefix}z"  # removed with the test's prefix
    r.xadd(f"{stray}:events", {"d": b"an agent without AGENTWATCH_PREFIX"})
    r.xadd(f"{read}:events", {"d": b"another pipeline's agent"})
    r.xgroup_create(f"{read}:events", "detectors", id="$")  # that pipeline has read everything
    r.xgroup_create(f"{left}:events:3", "detectors", id="0", mkstream=True)  # a pipeline moved away...
    r.xadd(f"{left}:events:3", {"d": b"old"}, id=f"{int(r.time()[0]) * 1000 - 60_000}-0")
    r.xadd(f"{left}:events:3", {"d": b"new"})  # ...and its agents still write: a minute unread
    env = {"AGENTWATCH_REDIS__URL": redis_url, "AGENTWATCH_REDIS__PREFIX": prefix}
    text = _cli("status", env=env, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    flat = " ".join(text.stdout.split())  # the console wraps long notes
    assert f"events are arriving on prefix '{stray}'" in flat
    assert (
        f"but this pipeline reads '{prefix}'" in flat
        and f"set AGENTWATCH_PREFIX={prefix} in the agents" in flat
    )
    assert f"prefix '{read}'" not in flat
    assert f"events are arriving on prefix '{left}' ({left}:events:3" in flat
    assert "from AGENTWATCH_REDIS__URL" in flat
    document = json.loads(_cli("status", "--json", env=env, cwd=tmp_path).stdout)
    strays = {s["prefix"]: s for s in document["unread_streams"]}
    assert strays[stray]["stream"] == f"{stray}:events" and read not in strays
    assert document["redis"]["source"] == "AGENTWATCH_REDIS__URL"
    assert document["redis"]["prefix"] == prefix and document["duplicates_dropped"] == 0


def test_status_says_the_url_came_from_the_producers_variable(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "pipeline.toml").write_text(f'[redis]\nprefix = "{prefix}"\n')
    document = json.loads(
        _cli("status", "--json", env={"AGENTWATCH_REDIS_URL": redis_url}, cwd=tmp_path).stdout
    )
    assert document["redis"]["source"] == "AGENTWATCH_REDIS_URL, the producer's variable"


def test_up_prints_what_agents_need_and_whose_server_it_is(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text(
        f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\nshards = 2\n[http]\nenabled = false\n'
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "agentwatch", "up", "-c", str(config), "--log-level", "warning"],
        stdout=subprocess.PIPE, text=True, env={**clean, "PYTHONUNBUFFERED": "1"}, cwd=tmp_path,
    )  # fmt: skip
    assert process.stdout is not None
    banner = ""
    try:
        for line in process.stdout:  # ends at "Ctrl-C to stop." or, if `up` fails, at its exit
            banner += line
            if line.startswith("Ctrl-C"):
                break
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        process.stdout.close()
    assert f"redis: {redis_url} (from [redis] url in {config})" in banner, banner
    assert "an existing server, not agentwatch's own: Redis " in banner
    assert f"agentwatch adds its {prefix}:* keys" in banner
    assert (
        f"agents need: AGENTWATCH_REDIS_URL={shlex.quote(redis_url)} "
        f"AGENTWATCH_PREFIX={prefix} AGENTWATCH_SHARDS=2" in banner
    )


def test_a_server_picked_because_it_answered_says_how_to_get_a_private_one(
    redis_url: str, prefix: str, r: redis.Redis, tmp_path: Path
) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text(f'[redis]\nprefix = "{prefix}"\n')
    r.hset(f"{prefix}:stats", "processed", 1)  # an earlier run's keys
    lines = _foreign_server(load(config, plugins=False), redis_url, told=True)
    version = r.info("server")["redis_version"]
    assert lines[0].startswith(f"an existing server, not agentwatch's own: Redis {version}; it holds ")
    assert lines[0].endswith(f"among them '{prefix}' keys of an earlier run")
    assert "event streams keep 1d of events ([streams] events_retention)" in lines[1]
    assert lines[2] == 'for a private server instead, set [redis] url = "embedded" in pipeline.toml'


def test_the_banner_prints_what_the_docs_say_it_prints(
    redis_url: str,
    prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INGEST", "0123456789abcdef" * 2)
    config = tmp_path / "pipeline.toml"
    config.write_text(
        f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n[http]\ningest_token = "${{INGEST}}"\n'
    )
    _print_banner(load(config, plugins=False), redis_url, None, "http://127.0.0.1:8787/", "[redis] url")
    banner = capsys.readouterr().out
    assert "dashboard: http://127.0.0.1:8787/\n" in banner  # docs/http.md
    assert "OTLP ingest: http://127.0.0.1:8787/v1/traces, /v1/metrics\n" in banner  # docs/opentelemetry.md
