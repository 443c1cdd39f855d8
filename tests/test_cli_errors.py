"""What a user sees when something is wrong: which URL failed, which flag, which key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port


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
