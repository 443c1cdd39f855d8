"""``python -m agentwatch`` is the CLI (``agentwatch up`` runs its workers this way)."""

from agentwatch.cli import main

main()
