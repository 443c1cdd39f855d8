"""The ``agentwatch`` command. Each group of subcommands lives in its own module here.

Exit codes (SPEC section 6): 0 ok, 1 runtime failure, 2 bad usage or bad config.

Start-up is lazy: importing this package loads only typer. A subcommand's module (and with it
Redis, the configuration models, the HTTP server, the price table ...) is imported when that
subcommand runs, so ``agentwatch --version``, ``status`` and ``alerts`` do not pay for ``serve``
or ``up`` (issue 10, point 12; ``benchmarks/cli_start.py`` measures it). ``--help`` and an
unknown command load every module, so the list of commands and the suggestions stay complete.

The cyclic garbage collector is paused while the command starts (:func:`main` to the root
callback): the imports allocate hundreds of thousands of objects that live as long as the
process, and the collector scanned them again and again (about 50 ms of a ``status`` run, 130
collections, measured with ``gc.callbacks``). Once the subcommand's module is loaded, what was
allocated is frozen (``gc.freeze``: later collections skip it) and the collector runs again, so
the long-running commands (``up``, ``worker``, ``serve``, ``status --watch``) collect as usual.
Only :func:`main` pauses it: ``app`` called in-process (tests, ``CliRunner``) leaves it alone.
"""

from __future__ import annotations

import gc
import importlib
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from agentwatch import __version__

# Which module registers which command, in the order ``--help`` lists them. A command missing
# here still works (an unknown name loads every module first); tests/test_cli_start.py checks
# that this table matches what the modules register.
COMMANDS: dict[str, str] = {
    "agent-key": "acl",
    "acl": "acl",
    "alerts": "alerts",
    "check-config": "config_cmd",
    "demo": "demo",
    "halt": "halt",
    "resume": "halt",
    "halts": "halt",
    "mute": "mute",
    "unmute": "mute",
    "mutes": "mute",
    "maintenance": "maintenance",
    "prices": "prices",
    "serve": "serve",
    "worker": "run",
    "up": "run",
    "status": "status",
    "report": "status",
}
MODULES: tuple[str, ...] = tuple(dict.fromkeys(COMMANDS.values()))


class _LazyGroup(TyperGroup):
    """The root command: imports a subcommand's module the first time that command is needed."""

    def _load(self, modules: tuple[str, ...]) -> None:
        for module in modules:
            # The module registers its commands on ``app`` when imported (once per process).
            importlib.import_module(f"{__name__}.{module}")
        built = typer.main.get_command(app)
        assert isinstance(built, TyperGroup)
        for name, command in built.commands.items():
            self.commands.setdefault(name, command)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands:
            module = COMMANDS.get(cmd_name)
            # An unknown name (a typo) loads everything: its suggestions come from the full list.
            self._load((module,) if module else MODULES)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: Any) -> list[str]:
        self._load(MODULES)
        order = list(COMMANDS)
        return sorted(self.commands, key=lambda name: order.index(name) if name in order else len(order))


app = typer.Typer(
    name="agentwatch",
    cls=_LazyGroup,
    help="Monitor long-running AI agents: silent death, stalled work loops, runaway token use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's own help layout: typer's rich one shows a type (`<bool>`) beside every plain flag.
    rich_markup_mode=None,
)


_paused_collector = False


def pause_collector() -> None:
    """Stop the cyclic collector for the start-up (module docstring); :func:`resume_collector`."""
    global _paused_collector  # one flag per process, set only by main()
    gc.disable()
    _paused_collector = True


def resume_collector() -> None:
    """Freeze what start-up allocated and collect again, if :func:`pause_collector` stopped it."""
    global _paused_collector
    if _paused_collector:
        _paused_collector = False
        gc.freeze()
        gc.enable()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"agentwatch {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """agentwatch: catch the failures process checks miss."""
    # Click calls this once the subcommand is resolved (its module imported), before its body.
    resume_collector()


def load_all() -> None:
    """Import every subcommand module (for code that inspects ``app``'s registered commands)."""
    for module in MODULES:
        importlib.import_module(f"{__name__}.{module}")


def main() -> None:
    pause_collector()
    app()
