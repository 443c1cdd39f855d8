"""``agentwatch prices MODEL``: what the pipeline charges for a model, and where the rate comes from."""

from __future__ import annotations

import json
from importlib.metadata import version
from typing import Annotated

import typer

from agentwatch.cli import app
from agentwatch.cli.common import ConfigOption, fail, load_pipeline
from agentwatch.prices import PriceBook


@app.command()
def prices(
    model: Annotated[str, typer.Argument(help='A model name as agents send it, e.g. "gpt-4o".')],
    tokens_in: Annotated[
        int, typer.Option("--tokens-in", help="Input tokens of a call (tiered prices).")
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    config: ConfigOption = None,
) -> None:
    """Show the USD per 1M tokens a model's beats are priced at ([prices] or genai-prices)."""
    book = PriceBook(load_pipeline(config, plugins=False).settings.prices)
    found = book.model(model)
    rates = book.rates_of(model, tokens_in=max(tokens_in, 0))
    if found is None or rates is None:
        fail(f"no price known for {model!r}: its beats' cost is unknown unless agents pass cost= "
             f'or pipeline.toml has [prices."{model}"] (genai-prices {version("genai-prices")})')  # fmt: skip
    source = (
        "[prices] in the config" if found.source == "override" else f"genai-prices {version('genai-prices')}"
    )
    if as_json:
        typer.echo(json.dumps({"model": model, "priced_as": found.model_id, "source": found.source, **rates}))
        return
    typer.echo(f"{model}: priced as {found.model_id!r}, from {source}; USD per 1M tokens:")
    for key, value in rates.items():
        typer.echo(f"  {key:<17} {value:g}" if key != "per_request" else f"  {key:<17} {value:g} USD")
