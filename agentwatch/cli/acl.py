"""Credentials: ``agentwatch agent-key`` (an agent's signing key) and ``agentwatch acl`` (Redis users
per role). docs/security.md says who holds which, and what each lets its holder do."""

from __future__ import annotations

from typing import Annotated

import typer

from agentwatch.cli import app
from agentwatch.cli.common import EXIT_USAGE, ConfigOption, fail, load_pipeline
from agentwatch.codec import name_problem
from agentwatch.signing import agent_key


@app.command("agent-key")
def agent_key_command(
    agent: Annotated[str, typer.Argument(help="The agent's name, exactly as it reports it.")],
    config: ConfigOption = None,
) -> None:
    """Print the key AGENT signs its events with (AGENTWATCH_KEY, or init(key=...)).

    It derives from [security] secret, so it needs that, and it speaks for AGENT only: give each
    agent its own. It is printed alone on stdout, for `export AGENTWATCH_KEY=$(agentwatch agent-key bot)`.
    """
    problem = name_problem(agent)
    if problem is not None:
        fail(f"not an agent name: {problem}", EXIT_USAGE)
    secret = load_pipeline(config, plugins=False).settings.security.secret
    if secret is None:
        fail(
            "agent keys derive from [security] secret, which is not set: set it in pipeline.toml "
            '(secret = "${AGENTWATCH_SECRET}") or as AGENTWATCH_SECURITY__SECRET',
            EXIT_USAGE,
        )
    typer.echo(agent_key(secret, agent))
