"""The CLI starts light: a command imports what it needs, not what the other commands need.

Behaviour, not speed: each check looks at ``sys.modules`` in a fresh interpreter. The start-up
times themselves are measured by benchmarks/cli_start.py.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from agentwatch import cli
from agentwatch.cli import COMMANDS

# Heavy, and needed by other commands only: the HTTP server (serve, up), numpy (detectors), the
# OTLP decoder, the price table, the apprise notifier, the detectors and notifiers themselves
# (`mute` reads notifiers.routing, the mutes' key layout, which is light).
HEAVY = ("starlette", "uvicorn", "numpy", "genai_prices", "apprise", "jinja2", "prometheus_client",
         "google", "opentelemetry.proto", "agentwatch.http", "agentwatch.workers", "detectors",
         "notifiers.webhook", "notifiers.pagerduty", "notifiers.restart", "notifiers.apprise_notifier",
         "httpx", "psutil")  # fmt: skip
# What no command needs just to parse its arguments.
SETUP = ("redis", "pydantic_settings", "pydantic", "rich", "msgpack", "agentwatch.config")


def _modules_after(code: str) -> list[str]:
    # redis-py imports the OpenTelemetry SDK whenever it is installed (it is, for the OTLP tests):
    # redis-py's choice. A user's machine without the SDK is what counts, so it is made
    # unimportable, as in test_producer_config.py.
    prelude = 'import sys\nsys.modules["opentelemetry.sdk"] = None\n'
    report = "\nprint(__import__('json').dumps(sorted(sys.modules)))\n"
    result = subprocess.run(
        [sys.executable, "-c", prelude + code + report],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout.splitlines()[-1]))


def _run(*args: str) -> str:
    """Code that runs the CLI with ``args`` in-process and returns (help and --version exit)."""
    return f"from agentwatch.cli import app\ntry:\n    app({list(args)!r})\nexcept SystemExit:\n    pass"


def _loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return sorted({name for name in names for m in modules if m == name or m.startswith(name + ".")})


def test_importing_the_cli_loads_no_subcommand_and_nothing_heavy() -> None:
    modules = _modules_after("import agentwatch.cli")
    assert _loaded(modules, HEAVY + SETUP) == []
    assert [m for m in modules if m.startswith("agentwatch.cli.")] == []


def test_version_loads_no_subcommand() -> None:
    modules = _modules_after(_run("--version"))
    assert _loaded(modules, HEAVY + SETUP) == []


@pytest.mark.parametrize("command", ["status", "alerts", "report", "mutes", "halts"])
def test_operator_commands_load_their_own_module_and_nothing_heavy(command: str) -> None:
    # --help parses the command line and stops: the imports are what running it would need.
    modules = _modules_after(_run(command, "--help"))
    assert _loaded(modules, HEAVY) == []
    loaded = {m.removeprefix("agentwatch.cli.") for m in modules if m.startswith("agentwatch.cli.")}
    assert loaded - {"common"} == {COMMANDS[command]}


def test_the_table_of_commands_matches_what_the_modules_register() -> None:
    """A command the table misses would still run (an unknown name loads every module), but it
    would load everything; a stale entry would point at the wrong module."""
    cli.load_all()
    registered = {
        info.name or typer.main.get_command_name(info.callback.__name__): info.callback.__module__
        for info in cli.app.registered_commands
        if info.callback is not None
    }
    for group in cli.app.registered_groups:  # `maintenance start/stop/list`: a group of its own
        assert group.name is not None and group.typer_instance is not None
        (module,) = {c.callback.__module__ for c in group.typer_instance.registered_commands if c.callback}
        registered[group.name] = module
    assert registered == {name: f"agentwatch.cli.{module}" for name, module in cli.COMMANDS.items()}


def test_help_lists_every_command_and_a_typo_gets_a_suggestion() -> None:
    runner = CliRunner()
    listed = runner.invoke(cli.app, ["--help"], terminal_width=200)
    assert listed.exit_code == 0
    for name in cli.COMMANDS:
        assert f" {name} " in listed.output
    typo = runner.invoke(cli.app, ["stauts"])
    assert typo.exit_code == 2 and "Did you mean 'status'?" in typo.output


_COLLECTOR_PROBE = """
import gc, json, sys
from agentwatch import cli

seen = {}

@cli.app.command("probe-collector")
def _probe() -> None:
    seen.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count())

sys.argv = ["agentwatch", "probe-collector"]
try:
    cli.main()
except SystemExit:
    pass
print(json.dumps(seen))
"""


def test_main_pauses_the_collector_for_the_start_and_runs_the_command_with_it_on() -> None:
    """A long-running command (``up``, ``worker``, ``serve``) must collect as usual: main()
    pauses the collector only while the command starts, and freezes what start-up allocated."""
    result = subprocess.run(
        [sys.executable, "-c", _COLLECTOR_PROBE], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["enabled"] is True
    assert seen["frozen"] > 10_000  # typer, click and the subcommand's imports, frozen once


def test_the_app_called_in_process_leaves_the_collector_alone() -> None:
    """Tests and embedders call ``app`` directly: no pause, no freeze in their process (the root
    callback, which resumes the collector after main(), runs before ``status --help`` exits)."""
    frozen = gc.get_freeze_count()
    result = CliRunner().invoke(cli.app, ["status", "--help"])
    assert result.exit_code == 0
    assert gc.isenabled() and gc.get_freeze_count() == frozen
