"""README's "Your first alert in 2 minutes", run exactly as written (issue 10, point 7).

The shell block is taken from README.md and run by bash in the repository, with real processes:
``agentwatch up``, the example receiver and agent, ``kill -9``, ``agentwatch alerts``. Only what
keeps a test from touching anything shared is changed, through the environment the README's
commands already honour: the test's Redis and a prefix of its own (the producer's
``AGENTWATCH_REDIS_URL``/``AGENTWATCH_PREFIX``, which the pipeline falls back on), a free port for
the receiver instead of 9000, and no dashboard (8787 may be taken).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]  # the block itself sleeps 15 s


def readme_block(heading: str) -> str:
    """The first ```sh block after ``heading`` in README.md."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading) :]
    match = re.search(r"```sh\n(.*?)```", after, re.S)
    assert match, f"no sh block after {heading!r}"
    return match.group(1)


def test_the_first_alert_commands_raise_and_deliver_the_alert(redis_url: str, prefix: str) -> None:
    script = readme_block("### Your first alert in 2 minutes")
    port = free_port()
    assert "receiver.py 9000" in script
    script = script.replace("receiver.py 9000", f"receiver.py {port}")
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
        AGENTWATCH_REDIS_URL=redis_url, AGENTWATCH_PREFIX=prefix,
        AGENTWATCH_NOTIFIERS__0__URL=f"http://127.0.0.1:{port}/", AGENTWATCH_HTTP__ENABLED="false",
    )  # fmt: skip
    shell = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        out, _ = shell.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)  # whatever the block left running
    assert shell.returncode == 0, out
    assert "alert FIRING silence agent 'first-agent' [critical]: first-agent: no heartbeat for " in out, out
    assert 'receiver: FIRING silence "first-agent"' in out, out
    assert "delivery webhook: delivered silence firing agent 'first-agent'" in out, out
    listed = out.split("delivery webhook: delivered", 1)[1]  # what `agentwatch alerts` printed after
    assert "first-age" in listed and "silence" in listed, out
