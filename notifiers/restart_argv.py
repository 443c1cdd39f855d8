"""The restart command's argv: placeholders, safe by construction.

Every value a placeholder takes comes, in the end, from whoever can write an event (the agent's
name, the host and run id of its ``start``). So a value is put into the command only when it
passes the agent-name rules of the protocol (:func:`agentwatch.codec.name_problem`): the charset
``A-Za-z0-9._:@/-`` holds no shell metacharacter, a leading ``-`` is refused (it could be read as
an option: ``ssh -oProxyCommand=...``), and so is a ``.`` or ``..`` path segment (``../evil``).
A value that fails is refused, never passed, and the audit record says why.

The command runs without a shell. A command whose inline shell or interpreter script holds a
placeholder (``sh -c "... {host}"``, ``python -c``) is refused at check-config unless
``allow_shell = true``:
the values could not break out even then, but a shell string is where quoting mistakes live, and
the ``AW_*`` environment variables carry the same values without any parsing.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Final

from agentwatch.codec import name_problem

PLACEHOLDERS: Final = ("agent", "run", "host", "pid", "detector")
PLACEHOLDER_RE: Final = re.compile(r"\{([^{}]*)\}")
_MAX_LEN: Final = {"agent": 128, "run": 64, "host": 253, "detector": 128}

SHELLS: Final = frozenset(
    {"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "csh", "tcsh", "fish", "busybox", "pwsh",
     "powershell", "cmd", "cmd.exe", "powershell.exe", "pwsh.exe"}
)  # fmt: skip
"""Programs whose ``-c`` (``/c``, ``-Command``) argument is a script."""
INTERPRETERS: Final = frozenset({"python", "perl", "ruby", "node", "php", "lua", "osascript"})
"""Programs that run a string given after ``-c``/``-e``/``--eval`` (versions stripped: python3.11)."""
_SHELL_SCRIPT_FLAG: Final = re.compile(r"-[A-Za-z]*c[A-Za-z]*|/[cC]|-Command|--command")
_INLINE_CODE_FLAG: Final = re.compile(r"-[ceEpr]|--eval|--print|--command")


class UnsafeValue(ValueError):
    """A placeholder's value that must not reach the command; the message says which and why."""


def command_problem(argv: list[str], *, allow_shell: bool) -> str | None:
    """What is wrong with a configured command, or ``None`` (checked at start-up)."""
    if not argv or not argv[0].strip():
        return "the command's first element (the program) is empty"
    for element in argv:
        for name in PLACEHOLDER_RE.findall(element):
            if name not in PLACEHOLDERS:
                valid = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                return f"unknown placeholder {{{name}}}; valid: {valid}"
    if allow_shell:
        return None
    for runner, script in inline_scripts(argv):
        if PLACEHOLDER_RE.search(script):
            return (
                f"{runner!r} runs {script[:60]!r} as a script, with placeholders in it: pass each "
                "value as its own argument after the script (sh -c 'restart \"$1\"' sh {agent}) or "
                "read $AW_AGENT, $AW_HOST... inside it, or set allow_shell = true to accept it "
                "(values are still restricted to A-Za-z0-9._:@/-)"
            )
    return None


def inline_scripts(argv: list[str]) -> list[tuple[str, str]]:
    """(program, script) for every shell or interpreter in ``argv`` handed an inline script
    (``sh -c SCRIPT``, ``python -c CODE``). Every element is looked at, so wrappers (``env``,
    ``sudo``, ``nice``) do not hide one; arguments after the script are positional, not code."""
    found = []
    for index, element in enumerate(argv):
        program = PurePosixPath(element.replace("\\", "/")).name.lower()
        bare = re.sub(r"[0-9.]+$", "", program)  # python3.11 -> python
        if program in SHELLS or bare in SHELLS:
            flag = _SHELL_SCRIPT_FLAG
        elif bare in INTERPRETERS:
            flag = _INLINE_CODE_FLAG
        else:
            continue
        for position in range(index + 1, len(argv) - 1):
            if flag.fullmatch(argv[position]):
                found.append((element, argv[position + 1]))
                break
    return found


def value_problem(name: str, value: str) -> str | None:
    """Why ``value`` must not fill ``{name}``, or ``None``."""
    if name == "pid":
        return None if value.isascii() and value.isdigit() else f"{value[:40]!r} is not a process id"
    problem = name_problem(value, _MAX_LEN.get(name, 128))
    return None if problem is None else problem


def substitute(argv: list[str], facts: dict[str, str]) -> list[str]:
    """Replace placeholders inside each element. A missing fact is a :class:`KeyError` naming it;
    a value that fails :func:`value_problem` is an :class:`UnsafeValue` saying why."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        value = facts.get(name, "")
        if value == "":
            raise KeyError(name)
        problem = value_problem(name, value)
        if problem is not None:
            raise UnsafeValue(f"{{{name}}} {problem}")
        return value

    return [PLACEHOLDER_RE.sub(one, element) for element in argv]
