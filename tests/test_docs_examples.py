"""The documentation's examples are checked by the real code, so they cannot drift (issue 10, point 11).

* Every ```toml block of README.md and docs/*.md (and the shipped pipeline files) is loaded by
  the real config loader, plugins included. ``${VAR}`` references get a plausible value (a long
  token, a URL, a PagerDuty-shaped key) and certificate paths a real empty file: the example must
  be valid as soon as its variables and files exist. A block that is a ``pyproject.toml`` snippet
  (``[project...]``, ``[build-system]``, ``[tool...]``) is only parsed as TOML. A block meant to
  show a mistake says so with a ``# invalid:`` comment, and must fail.
* Every ``agentwatch ...`` command line of a ```sh/bash block is parsed by the real CLI (command,
  options and arguments must exist and be well-formed), without running it.
* ``--help`` shows no ``<bool>`` beside a plain flag, nor a Python type (``<list[str]>``).
"""

from __future__ import annotations

import os
import re
import shlex
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer

from agentwatch import loading
from agentwatch.cli import app
from agentwatch.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "PROTOCOL.md", *sorted((ROOT / "docs").glob("*.md"))]
PIPELINE_FILES = [ROOT / "pipeline.toml", *sorted((ROOT / "examples").glob("*.toml"))]
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")
_PEM = re.compile(r"/etc/agentwatch/[\w.-]+")
_NOT_A_PIPELINE = re.compile(r"^\[(project|build-system|tool)[.\]]", re.M)


def blocks(language: str) -> list[tuple[str, str]]:
    """(where, text) of every fenced block in that language, ``where`` being ``file:line``."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in re.finditer(rf"^[ \t]*```{language}\n(.*?)^[ \t]*```", text, re.S | re.M):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{doc.relative_to(ROOT)}:{line}", textwrap.dedent(match.group(1))))
    return found


def _value_for(name: str) -> str:
    if name.endswith("URL"):
        return "https://hooks.example.com/agentwatch"
    if "ROUTING_KEY" in name:
        return "0123456789abcdef0123456789abcdef"
    return "0123456789abcdef" * 4  # long enough for every secret and token


TOML_BLOCKS = blocks("toml")
SHELL_LINES = [
    (where, line.strip())
    for language in ("sh", "bash", "shell")
    for where, text in blocks(language)
    for line in text.splitlines()
    if "agentwatch " in line and not line.strip().startswith("#")
]


def test_the_docs_have_examples_to_check() -> None:
    assert len(TOML_BLOCKS) >= 8 and len(SHELL_LINES) >= 15


@pytest.mark.parametrize(("where", "text"), TOML_BLOCKS, ids=[w for w, _ in TOML_BLOCKS])
def test_every_toml_example_is_valid(
    where: str, text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if _NOT_A_PIPELINE.search(text):
        tomllib.loads(text)  # a pyproject.toml snippet: TOML, not a pipeline
        return
    for name in [n for n in os.environ if n.startswith("AGENTWATCH_")]:
        monkeypatch.delenv(name)  # the example alone, not the test run's settings
    for name in _VAR.findall(text):
        monkeypatch.setenv(name, _value_for(name))
    for path in set(_PEM.findall(text)):
        (tmp_path / Path(path).name).touch()
        text = text.replace(path, str(tmp_path / Path(path).name))
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    if "# invalid:" in text:
        with pytest.raises(ConfigError):
            loading.load(path)
        return
    try:
        loading.load(path)
    except ConfigError as exc:
        pytest.fail(f"{where}: the example is not a valid pipeline:\n{exc.render()}")


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=[p.name for p in PIPELINE_FILES])
def test_the_shipped_pipeline_files_are_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("AGENTWATCH_")]:
        monkeypatch.delenv(name)
    loading.load(path)


def command_words(line: str) -> list[str] | None:
    """The words of the ``agentwatch`` command on a shell line (after ``;`` or ``&&``, inside
    ``$(...)``), up to the next operator or comment; None when the line runs none."""
    found = re.search(r"(?:^|[\s;&|(])agentwatch\s(.*)", line)
    if found is None:
        return None
    command = re.split(r"\s#|;|&&|\|\||\||\s&|\)", found.group(1))[0]
    return shlex.split(command)


@pytest.mark.parametrize(("where", "line"), SHELL_LINES, ids=[w for w, _ in SHELL_LINES])
def test_every_agentwatch_command_in_the_docs_parses(where: str, line: str) -> None:
    words = command_words(line)
    if words is None:  # e.g. "pip install ... puts `agentwatch` on PATH"
        return
    group: Any = typer.main.get_command(app)  # typer's own copy of click: no click import here
    try:
        if words[0].startswith("-"):  # --version, --help
            group.make_context("agentwatch", words).close()
            return
        with group.make_context("agentwatch", [], resilient_parsing=True) as ctx:
            command = group.get_command(ctx, words[0])
            assert command is not None, f"{where}: no command {words[0]!r} in `{line}`"
            command.make_context(words[0], words[1:], parent=ctx).close()
    except typer.Exit as exc:  # --version, --help: valid
        assert exc.exit_code == 0
    except Exception as exc:
        if not hasattr(exc, "format_message"):  # a usage error has one
            raise
        pytest.fail(f"{where}: `agentwatch {' '.join(words)}` does not parse: {exc.format_message()}")


def test_help_shows_no_type_beside_plain_flags() -> None:
    group: Any = typer.main.get_command(app)
    with group.make_context("agentwatch", [], resilient_parsing=True) as ctx:
        texts = [group.get_help(ctx)]
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            assert command is not None
            with command.make_context(name, [], parent=ctx, resilient_parsing=True) as sub:
                texts.append(command.get_help(sub))
    joined = "\n".join(texts)
    assert "<bool>" not in joined and "--json" in joined and "--quiet" in joined
    # nor a Python type where the value's form helps: `--label <key=glob>`, not `<list[str]>`
    assert "<list[" not in joined and " range>" not in joined and "--label <key=glob>" in joined
