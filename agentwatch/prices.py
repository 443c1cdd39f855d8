"""The cost of a beat: what the agent said it cost, else its tokens priced by genai-prices.

The pipeline prices beats, not the producer: prices change while agents stay deployed, and one
table upgraded here (``pip install -U genai-prices``) reprices every agent. The table is the
one genai-prices ships inside the package, so pricing needs no network (genai-prices can also
fetch newer prices at run time; agentwatch never asks it to). ``[prices."<model>"]`` in
pipeline.toml replaces a model's rates (negotiated prices, fine-tunes the table cannot know).

What a beat costs (:meth:`PriceBook.cost_of`):

* its ``cost`` when the agent passed one: the agent knows best (a gateway's bill, say);
* ``0.0`` when it reports no tokens at all (a bare ``heartbeat()`` spends nothing);
* otherwise its token classes priced at its ``model``'s rates, or ``None`` (*unknown*, never
  ``0.0``) when that cannot be done: no model, a model neither the table nor ``[prices]`` knows,
  only a total with no input/output split, or classes that do not add up (more cache reads than
  input tokens). :meth:`PriceBook.quote` says which.

Token classes (PROTOCOL.md): ``tokens_in`` counts every input token, ``tokens_cache_read`` and
``tokens_cache_write`` are the shares of it read from and written to a prompt cache;
``tokens_out`` counts every output token, ``tokens_reasoning`` the share spent on reasoning.
That is genai-prices' own model (cache reads are part of ``input_tokens``), so a beat is priced
exactly as genai-prices prices the same usage.

Speed: genai-prices prices one usage in ~100 us (Decimal arithmetic, unit registry, price
selection), too slow for a detector worker's hot path. Its price is affine in the token counts
for a given price record and tier band (a fixed fee plus a rate per token of each class), so the
book asks genai-prices once per (model, price record, band) for the fee and the five rates, and
then prices each beat with five Decimal products: the same exact sum genai-prices computes, in
a few microseconds. Tests check the two agree on random usages of real models.
"""

from __future__ import annotations

import fnmatch
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from agentwatch.codec import MAX_COST, TOKEN_CLASSES

if TYPE_CHECKING:
    from agentwatch.config import ModelRates

CLASSES: Final = ("tokens_in", "tokens_out", *TOKEN_CLASSES)
"""A beat's token counts in the order priced: input, output, cache read, cache write, reasoning."""
TOKEN_KEYS: Final = ("tokens", *CLASSES)
_RATE_KEYS: Final = {
    "input": "input_mtok",
    "output": "output_mtok",
    "cache_read": "cache_read_mtok",
    "cache_write": "cache_write_mtok",
    "output_reasoning": "output_reasoning_mtok",
}
"""``[prices]`` key -> genai-prices price key (USD per 1M tokens)."""
_MODELS_MAX: Final = 10_000
"""Model names remembered (hit or miss); agent-supplied, so bounded: the cache is cleared when full."""

_ZERO: Final = Decimal(0)


@dataclass(frozen=True, slots=True)
class Quote:
    """A beat's cost and where it came from.

    ``source``: ``agent`` (the beat's own ``cost``), ``none`` (no tokens reported: 0.0),
    ``table`` (genai-prices), ``override`` (``[prices]``); or, with ``cost`` None, why it is
    unknown: ``no-model``, ``unknown-model``, ``no-split``, ``inconsistent``, ``too-large``.
    """

    cost: float | None
    source: str
    model: str | None = None
    """The table's id of the model that priced the beat (``gpt-4o`` for ``gpt-4o-2024-08-06``)."""


@dataclass(frozen=True, slots=True)
class _Rates:
    """One price record in one tier band: the fixed fee and USD per token of each leaf class
    (plain input, cache read, cache write, plain output, reasoning)."""

    fee: Decimal
    per_token: tuple[Decimal, Decimal, Decimal, Decimal, Decimal]


class _Model:
    """One priced model: its price records (by time) and their rates per tier band."""

    __slots__ = ("_bands", "_info", "_rates", "model_id", "source")

    def __init__(self, info: Any, source: str, model_id: str) -> None:
        self._info = info  # genai_prices.types.ModelInfo, or a stand-in with get_prices()
        self.source = source
        self.model_id = model_id
        self._rates: dict[tuple[int, int], tuple[Any, _Rates]] = {}
        self._bands: dict[int, tuple[Any, list[int]]] = {}

    def rates(self, at: datetime, tokens_in: int) -> _Rates:
        price = self._info.get_prices(at)  # a plain record, or the one in force at `at`
        key = id(price)
        starts = self._bands.get(key)
        if starts is None or starts[0] is not price:
            starts = self._bands[key] = (price, _tier_starts(price))
        band = bisect_left(starts[1], tokens_in)  # genai-prices: tier applies when input > start
        cached = self._rates.get((key, band))
        if cached is None or cached[0] is not price:  # (the record is kept: its id stays its own)
            # The fewest input tokens in the band: band 0 is input <= the first start (which
            # may be 0: then only 0 input tokens fall in it).
            probe = starts[1][band - 1] + 1 if band else min([1, *starts[1][:1]])
            cached = self._rates[(key, band)] = (price, _probe(price, probe))
        return cached[1]


class PriceBook:
    """Prices beats for one pipeline: the genai-prices table, with ``[prices]`` overrides.

    Build one per worker (``PriceBook(settings.prices)``) and keep it: it caches each model's
    rates. Thread-safe in the sense the workers need (caches are only ever added to or cleared).
    """

    def __init__(self, overrides: Mapping[str, ModelRates] | None = None) -> None:
        self._overrides = dict(overrides or {})
        self._models: dict[str, _Model | None] = {}

    def cost_of(self, event: Mapping[str, Any], at_ms: int | None = None) -> float | None:
        """USD the beat cost; None when unknown (see the module docstring). ``at_ms`` (the
        entry's Redis time) picks the prices in force then; default now."""
        return self.quote(event, at_ms).cost

    def quote(self, event: Mapping[str, Any], at_ms: int | None = None) -> Quote:
        """:meth:`cost_of` with its source, or the reason it is unknown."""
        cost = event.get("cost")
        if cost is not None:
            return Quote(float(cost), "agent")
        if not any(event.get(key) for key in TOKEN_KEYS):
            return Quote(0.0, "none")
        name = event.get("model")
        if not isinstance(name, str) or not name:
            return Quote(None, "no-model")
        tokens_in, tokens_out = event.get("tokens_in"), event.get("tokens_out")
        if tokens_in is None and tokens_out is None:
            return Quote(None, "no-split", name)  # a total alone: input and output cost differently
        model = self.model(name)
        if model is None:
            return Quote(None, "unknown-model")
        counts = [int(event.get(key) or 0) for key in CLASSES]
        tin, tout, read, write, reasoning = counts
        leaves = (tin - read - write, read, write, tout - reasoning, reasoning)
        if min(leaves) < 0:
            return Quote(None, "inconsistent", model.model_id)
        at = datetime.now(tz=UTC) if at_ms is None else datetime.fromtimestamp(at_ms / 1000, tz=UTC)
        rates = model.rates(at, tin)
        total = rates.fee
        for count, rate in zip(leaves, rates.per_token, strict=True):
            if count:
                total += count * rate
        value = float(total)
        if not value <= MAX_COST:
            return Quote(None, "too-large", model.model_id)
        return Quote(value, model.source, model.model_id)

    def model(self, name: str) -> _Model | None:
        """The priced model ``name`` refers to (override first, then the table), or None."""
        if name in self._models:
            return self._models[name]
        found = self._find(name)
        if len(self._models) >= _MODELS_MAX:
            self._models.clear()
        self._models[name] = found
        return found

    def rates_of(self, name: str, at_ms: int | None = None, tokens_in: int = 0) -> dict[str, float] | None:
        """USD per 1M tokens of each ``[prices]`` class for ``name`` (``agentwatch prices``)."""
        model = self.model(name)
        if model is None:
            return None
        at = datetime.now(tz=UTC) if at_ms is None else datetime.fromtimestamp(at_ms / 1000, tz=UTC)
        rates = model.rates(at, tokens_in)
        plain_in, read, write, plain_out, reasoning = (float(r * 1_000_000) for r in rates.per_token)
        shown = {"input": plain_in, "output": plain_out, "cache_read": read, "cache_write": write,
                 "output_reasoning": reasoning}  # fmt: skip
        if rates.fee:
            shown["per_request"] = float(rates.fee)
        return shown

    def _find(self, name: str) -> _Model | None:
        table = _table_model(name)
        override = self._overrides.get(name)
        if override is None:
            override = next(
                (rates for glob, rates in self._overrides.items() if fnmatch.fnmatchcase(name, glob)), None
            )
        if override is None:
            return None if table is None else _Model(table, "table", table.id)
        return _Model(_Overridden(table, override), "override", table.id if table is not None else name)


class _Overridden:
    """A model's price records with the ``[prices]`` rates put over them (or alone, for a
    model the table does not know), so the override is priced by the same code."""

    def __init__(self, table: Any, rates: ModelRates) -> None:
        from genai_prices.types import ModelPrice  # noqa: PLC0415 - 0.03 s: only workers pay it

        self._table = table
        given = rates.model_dump().items()
        self._rates = {_RATE_KEYS[key]: Decimal(repr(value)) for key, value in given if value is not None}
        self._alone = ModelPrice(**self._rates) if table is None else None
        self._made: dict[int, tuple[Any, Any]] = {}

    def get_prices(self, at: datetime) -> Any:
        if self._alone is not None:
            return self._alone
        base = self._table.get_prices(at)
        made = self._made.get(id(base))
        if made is None or made[0] is not base:
            from genai_prices.types import ModelPrice  # noqa: PLC0415

            merged = {key: value for key, value in base.__dict__.items() if value is not None}
            made = self._made[id(base)] = (base, ModelPrice(**{**merged, **self._rates}))
        return made[1]


def _table_model(name: str) -> Any:
    """genai-prices' ModelInfo for a model reference, or None when the table has no such model."""
    from genai_prices import data_snapshot  # noqa: PLC0415 - imports the 1.6 MB table

    try:
        return data_snapshot.get_snapshot().find_provider_model(name, None, None, None)[1]
    except LookupError:
        return None


def _tier_starts(price: Any) -> list[int]:
    """Input-token thresholds at which any of the record's rates changes (sorted)."""
    from genai_prices.types import TieredPrices  # noqa: PLC0415

    starts = {tier.start for value in price.__dict__.values() if isinstance(value, TieredPrices)
              for tier in value.tiers}  # fmt: skip
    return sorted(starts)


def _probe(price: Any, tokens_in: int) -> _Rates:
    """The fee and per-token rates of ``price`` in the tier band of ``tokens_in``, asked of
    genai-prices itself: within a band its price is affine in the counts, so differences of
    a few calls give every coefficient exactly (Decimal arithmetic, no rounding)."""
    from genai_prices.types import Usage  # noqa: PLC0415

    def calc(**counts: int) -> Decimal:
        total: Decimal = price.calc_price(Usage(**counts))["total_price"]
        return total

    fee = calc()
    base = calc(input_tokens=tokens_in)
    if tokens_in:
        plain_in = (base - fee) / tokens_in
        read = calc(input_tokens=tokens_in, cache_read_tokens=1) - base + plain_in
        write = calc(input_tokens=tokens_in, cache_write_tokens=1) - base + plain_in
    else:  # a band of no input at all: input rates never apply in it
        plain_in = read = write = _ZERO
    plain_out = calc(input_tokens=tokens_in, output_tokens=1) - base
    reasoning = calc(input_tokens=tokens_in, output_tokens=1, output_reasoning_tokens=1) - base
    return _Rates(fee, (plain_in, read, write, plain_out, reasoning))
