"""A beat's cost: the agent's own, else its token classes priced exactly as genai-prices does.

The reference is genai-prices itself, called the documented way (``extract_usage`` on the SDK
response, ``calc_price`` on a ``Usage``); the PriceBook must give the same float.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import genai_prices
import pytest
import redis
from agents.testkit import of_kind, read_events, wait_for
from genai_prices import Usage, calc_price
from test_usage import anthropic_message, chat_usage, responses_usage
from typer.testing import CliRunner

from agentwatch import loading
from agentwatch.cli import app
from agentwatch.codec import TOKEN_CLASSES
from agentwatch.config import ModelRates
from agentwatch.prices import PriceBook
from producers import Producer

BOOK = PriceBook()


def reference(model: str, tin: int, tout: int, read: int = 0, write: int = 0, reasoning: int = 0) -> float:
    usage = Usage(input_tokens=tin, output_tokens=tout, cache_read_tokens=read, cache_write_tokens=write,
                  output_reasoning_tokens=reasoning)  # fmt: skip
    return float(calc_price(usage, model).total_price)


def beat(model: str | None, tin: int, tout: int, *classes: int) -> dict[str, Any]:
    """A beat's fields; ``classes``: cache read, cache write, reasoning (0: left out)."""
    event: dict[str, Any] = {"tokens_in": tin, "tokens_out": tout, "tokens": tin + tout}
    if model is not None:
        event["model"] = model
    for key, value in zip(TOKEN_CLASSES, classes, strict=False):
        if value:
            event[key] = value
    return event


MODELS = ["gpt-4o", "gpt-4o-mini", "o3", "gpt-5", "claude-sonnet-4-5", "claude-3-5-haiku",
          "gemini-2.5-pro", "gemini-2.5-flash", "deepseek-chat"]  # fmt: skip


@pytest.mark.parametrize("model", MODELS)
def test_random_usages_are_priced_as_genai_prices_prices_them(model: str) -> None:
    rng = random.Random(model)
    edges = [0, 1, 128_000, 128_001, 200_000, 200_001]  # tier starts of the tiered models
    for _ in range(300):
        tin = rng.choice([*edges, rng.randrange(0, 500_000)])
        read = rng.randrange(0, tin + 1)
        write = rng.randrange(0, tin - read + 1)
        tout = rng.randrange(0, 60_000)
        reasoning = rng.randrange(0, tout + 1)
        expected = reference(model, tin, tout, read, write, reasoning)
        priced = BOOK.cost_of(beat(model, tin, tout, read, write, reasoning))
        assert priced == expected, (tin, tout, read, write, reasoning)


def test_a_dated_model_name_is_priced_as_its_model() -> None:
    quote = BOOK.quote(beat("gpt-4o-2024-08-06", 1_000, 100))
    assert (quote.source, quote.model) == ("table", "gpt-4o")
    assert quote.cost == reference("gpt-4o-2024-08-06", 1_000, 100)


# -- real SDK objects, through a real producer and Redis ------------------------------------------


@pytest.fixture
def producer(redis_url: str, prefix: str) -> Iterator[Producer]:
    made = Producer("priced-bot", redis_url=redis_url, prefix=prefix, flush_interval=0.01)
    yield made
    made.close()


def delivered(r: redis.Redis, prefix: str, count: int) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        found = of_kind(read_events(r, f"{prefix}:events"), "beat")
        return found if len(found) >= count else None

    return wait_for(enough, what=f"{count} beats")


def test_real_sdk_usage_is_priced_exactly_as_genai_prices_prices_the_response(
    producer: Producer, r: redis.Redis, prefix: str
) -> None:
    anthropic = anthropic_message()
    chat = {"model": "gpt-4o", "usage": chat_usage().model_dump()}
    responses = {"model": "o3", "usage": responses_usage().model_dump()}
    producer.heartbeat(usage=chat_usage(), model="gpt-4o")
    producer.heartbeat(usage=responses_usage(), model="o3")
    producer.heartbeat(usage=anthropic, model=anthropic.model)
    first, second, third = delivered(r, prefix, 3)

    def genai(response: dict[str, Any], provider: str, flavor: str) -> float:
        extracted = genai_prices.extract_usage(response, provider_id=provider, api_flavor=flavor)
        return float(extracted.calc_price().total_price)

    assert BOOK.cost_of(first) == genai(chat, "openai", "chat") > 0
    assert BOOK.cost_of(second) == genai(responses, "openai", "responses") > 0
    assert BOOK.cost_of(third) == genai(anthropic.model_dump(), "anthropic", "default") > 0


# -- what is unknown stays unknown ------------------------------------------------------------------


def test_unknown_costs_are_none_never_zero() -> None:
    assert BOOK.quote(beat("my-own-finetune", 100, 10)).source == "unknown-model"
    assert BOOK.cost_of(beat("my-own-finetune", 100, 10)) is None
    assert BOOK.quote(beat(None, 100, 10)).source == "no-model"
    assert BOOK.quote({"tokens": 500, "model": "gpt-4o"}).source == "no-split"
    assert BOOK.quote(beat("gpt-4o", 100, 10, 90, 20)).source == "inconsistent"
    assert BOOK.quote(beat("gpt-4o", 100, 10, 0, 0, 11)).source == "inconsistent"
    assert all(BOOK.cost_of(e) is None for e in ({"tokens": 500, "model": "gpt-4o"}, beat(None, 1, 1)))


def test_the_agents_cost_wins_and_a_beat_without_tokens_costs_nothing() -> None:
    assert BOOK.quote({**beat("gpt-4o", 1_000, 100), "cost": 0.5}) == BOOK.quote({"cost": 0.5})
    assert BOOK.quote({"cost": 0.5}).source == "agent"
    assert BOOK.quote({}).cost == 0.0 and BOOK.quote({"model": "gpt-4o", "tokens": 0}).cost == 0.0


def test_an_absurd_priced_cost_is_unknown() -> None:
    book = PriceBook({"pricey": ModelRates(input=1_000_000)})
    assert book.quote(beat("pricey", 2**52, 0)).source == "too-large"


# -- [prices] overrides ---------------------------------------------------------------------------------


def test_an_override_prices_a_model_the_table_does_not_know() -> None:
    book = PriceBook({"my-finetune": ModelRates(input=3.0, output=15.0)})
    quote = book.quote(beat("my-finetune", 1_000_000, 100_000))
    assert (quote.cost, quote.source) == (3.0 + 1.5, "override")
    # Classes it leaves out cost their parent's rate, as in genai-prices.
    assert book.cost_of(beat("my-finetune", 1_000_000, 100_000, 400_000, 0, 50_000)) == 4.5


def test_an_override_replaces_only_the_rates_it_gives() -> None:
    book = PriceBook({"gpt-4o": ModelRates(input=2.0)})
    table = BOOK.rates_of("gpt-4o")
    assert table is not None
    # gpt-4o has no cache-write rate in the table: such tokens cost its input rate, now 2.0.
    assert book.rates_of("gpt-4o") == {**table, "input": 2.0, "cache_write": 2.0}
    expected = 2.0 * 0.5 + table["output"] * 0.1 + table["cache_read"] * 0.25
    assert book.cost_of(beat("gpt-4o", 750_000, 100_000, 250_000)) == pytest.approx(expected, rel=1e-12)


def test_overrides_match_by_exact_name_first_then_glob() -> None:
    book = PriceBook({"ft:gpt-4o-mini:*": ModelRates(input=1.0, output=1.0),
                      "ft:gpt-4o-mini:acme:special": ModelRates(input=9.0, output=9.0)})  # fmt: skip
    assert book.cost_of(beat("ft:gpt-4o-mini:acme::abc123", 1_000_000, 0)) == 1.0
    assert book.cost_of(beat("ft:gpt-4o-mini:acme:special", 1_000_000, 0)) == 9.0


def test_prices_in_pipeline_toml_are_validated_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text('[prices."my-ft"]\ninput = 3.0\noutput = 15\n')
    assert loading.load(path, plugins=False).settings.prices["my-ft"] == ModelRates(input=3.0, output=15.0)
    bad = '[prices."my-ft"]\ninput = -3.0\nreasoning = 2\n[prices."other"]\noutput = "15"\n[prices.empty]\n'
    path.write_text(bad)
    result = CliRunner().invoke(app, ["check-config", str(path)])
    assert result.exit_code == 2
    assert "[prices.my-ft] reasoning: unknown key (did you mean 'output_reasoning'?)" in result.output
    assert "[prices.my-ft] input: Input should be greater than or equal to 0" in result.output
    assert "[prices.other] output: a rate is a number" in result.output
    assert "[prices] empty: give at least one of input, output" in result.output


def test_the_prices_command_shows_a_models_rates_and_their_source(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text('[prices."my-ft"]\ninput = 3.0\noutput = 15\n')
    runner = CliRunner()
    shown = runner.invoke(app, ["prices", "gpt-4o", "--json", "--config", str(path)])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output) == {"model": "gpt-4o", "priced_as": "gpt-4o", "source": "table",
                                        **(BOOK.rates_of("gpt-4o") or {})}  # fmt: skip
    mine = runner.invoke(app, ["prices", "my-ft", "--config", str(path)])
    assert "from [prices] in the config" in mine.output and "input             3" in mine.output
    unknown = runner.invoke(app, ["prices", "no-such-model", "--config", str(path)])
    assert unknown.exit_code == 1 and "no price known for 'no-such-model'" in unknown.output
