"""What a user sees when something is wrong: which URL failed, which flag, which key."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result  # typer bundles its own click (0.20+): not a dependency

from agentwatch.cli import app
from agentwatch.embedded import EmbeddedRedis

from conftest import free_port
from notify_kit import receiver


def agentwatch(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentwatch", *args], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, cwd=cwd, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("command", [["status"], ["alerts"], ["report"], ["mutes"]])
def test_redis_unreachable_names_the_url_and_the_way_out(command: list[str], tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = agentwatch(*command, env={"AGENTWATCH_REDIS__URL": url}, cwd=tmp_path)
    assert result.returncode == 1
    assert f"Redis does not answer at {url}" in result.stderr
    assert "agentwatch up" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["status", "--watch", "--json"], "--watch and --json do not go together"),
        (["report", "--since", "yesterday"], "--since: bad duration 'yesterday'"),
        (["alerts", "--since", "10"], "--since: bad duration '10': use e.g."),
        (["status", "--colour"], "No such option: --colour"),
    ],
)
def test_bad_flags_say_what_was_expected(args: list[str], expected: str, tmp_path: Path) -> None:
    result = agentwatch(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    """The CLI in-process (fast): exit code, stdout and stderr apart."""
    return CliRunner().invoke(app, list(args), env=env)


@pytest.mark.parametrize("command", [["status"], ["report"], ["alerts"], ["alerts", "--failed"]])
def test_agent_followed_by_another_flag_is_refused_not_taken_as_the_glob(command: list[str]) -> None:
    result = run(*command, "--agent", "--json")
    assert result.exit_code == 2
    assert "--agent needs an agent name or glob, got the option '--json'" in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["status", "--agent"], "Option '--agent' requires an argument"),
        (["report", "--agent"], "Option '--agent' requires an argument"),
        (["alerts", "--failed", "--agent"], "Option '--agent' requires an argument"),
        (["alerts", "--failed", "--since", "0s"], "--since must be longer than zero, got '0s'"),
        (["report", "--since", "0s"], "--since must be longer than zero, got '0s'"),
        (["report", "--json", "--text"], "--json and --text do not go together"),
        (["status", "--watch", "--refresh", "0s"], "--refresh must be longer than zero"),
        (["status", "--watch", "--refresh", "often"], "--refresh: bad duration 'often'"),
        (["status", "--refresh", "1s"], "--refresh goes with --watch"),
        (["status", "--watch", "--json"], "--watch and --json do not go together"),
        (["mute"], "Missing argument 'agent'"),
        (["mute", "bot"], "Missing option '--for'"),
        (["mute", "bot", "--for", "0s"], "--for must be longer than zero"),
        (["mute", "bot", "--for", "a while"], "--for: bad duration 'a while'"),
        (["unmute"], "give an agent glob to unmute, or --all (not both)"),
        (["unmute", "bot", "--all"], "give an agent glob to unmute, or --all (not both)"),
    ],
)
def test_bad_flag_combinations_exit_2_and_say_what_was_expected(args: list[str], expected: str) -> None:
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr


def test_unmute_of_nothing_is_a_runtime_failure_naming_the_glob(redis_url: str, prefix: str) -> None:
    result = run(
        "unmute", "nobody-*", env={"AGENTWATCH_REDIS__URL": redis_url, "AGENTWATCH_REDIS__PREFIX": prefix}
    )
    assert result.exit_code == 1
    assert "no mute matches 'nobody-*'" in result.stderr


def _redis_at(url: str) -> dict[str, str]:
    return {"AGENTWATCH_REDIS__URL": url, "AGENTWATCH_REDIS__PREFIX": "never-written"}


def test_a_wrong_password_says_so_with_the_password_masked(spawn_redis: Callable[..., EmbeddedRedis]) -> None:
    host = f"127.0.0.1:{spawn_redis(port=free_port()).port}"  # a TCP URL, on a server of its own
    result = agentwatch("status", env=_redis_at(f"redis://nobody:s3cret@{host}/0"))
    assert result.returncode == 2
    assert f"Redis at redis://***@{host}/0 refused the credentials: authentication failed" in result.stderr
    assert "AGENTWATCH_REDIS__URL" in result.stderr
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr


def test_a_database_the_server_does_not_have_is_named(spawn_redis: Callable[..., EmbeddedRedis]) -> None:
    host = f"127.0.0.1:{spawn_redis(port=free_port()).port}"  # a TCP URL, on a server of its own
    result = agentwatch("alerts", env=_redis_at(f"redis://{host}/99"))
    assert result.returncode == 2
    assert f"Redis at redis://{host}/99 has no database 99: it has " in result.stderr
    assert "does not answer" not in result.stderr and "Traceback" not in result.stderr


def test_a_url_that_is_not_a_redis_url_is_bad_config(tmp_path: Path) -> None:
    result = agentwatch("report", env=_redis_at("http://127.0.0.1:6379"), cwd=tmp_path)
    assert result.returncode == 2
    assert "http://127.0.0.1:6379" in result.stderr and "Traceback" not in result.stderr


def test_a_configured_url_that_does_not_answer_is_not_told_that_up_embeds_one(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    (tmp_path / "pipeline.toml").write_text(f'[redis]\nurl = "{url}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
    result = subprocess.run([sys.executable, "-m", "agentwatch", "status"], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert (
        f"Redis does not answer at {url} (from [redis] url in pipeline.toml); is it running?" in result.stderr
    )
    assert 'Start Redis at that URL, or remove [redis] url (or set url = "embedded")' in result.stderr
    assert "`agentwatch up` embeds one" not in result.stderr


def test_a_url_from_the_producers_variable_is_blamed_on_it_not_on_the_file(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    (tmp_path / "pipeline.toml").write_text('[redis]\nprefix = "nc1"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
    result = subprocess.run([sys.executable, "-m", "agentwatch", "alerts"], capture_output=True, text=True,
                            env={**env, "AGENTWATCH_REDIS_URL": url}, cwd=tmp_path, timeout=60)  # fmt: skip
    assert result.returncode == 1
    said = (
        f"Redis does not answer at {url} (from AGENTWATCH_REDIS_URL, the producer's variable); is it running?"
    )
    assert said in result.stderr
    assert "unset AGENTWATCH_REDIS_URL in this shell" in result.stderr
    assert "remove [redis] url" not in result.stderr


def test_httpx_request_lines_are_kept_out_of_the_logs() -> None:
    # At INFO, httpx logs "HTTP Request: POST <full URL>": for Slack the URL is the secret.
    with receiver() as hook:
        secret = hook.url + "/T000/B000/XXXXSECRET"
        code = (
            "import logging, httpx\n"
            "from agentwatch.cli.common import setup_logging\n"
            "setup_logging('info')\n"
            f"httpx.post({secret!r}, json={{}})\n"
            "logging.getLogger('agentwatch.test').info('delivered')\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        hook.wait_requests(1)
    assert result.returncode == 0, result.stderr
    assert "agentwatch.test: delivered" in result.stderr  # INFO still logs...
    assert "XXXXSECRET" not in result.stderr and "HTTP Request" not in result.stderr  # ...not httpx's
