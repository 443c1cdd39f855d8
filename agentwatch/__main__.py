"""``python -m agentwatch`` is the CLI (``agentwatch up`` runs its workers this way)."""

import gc

gc.disable()  # already while typer is imported: agentwatch.cli.main() pauses it for the start-up

from agentwatch.cli import main  # noqa: E402 - after the collector is paused

main()
