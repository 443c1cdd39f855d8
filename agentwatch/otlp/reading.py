"""Which of a span's attributes the receiver reads for what, decided once per set of names.

conventions.py lists, per meaning, every attribute name in use, first found wins. Deciding that
per span costs a lookup per name (about 30 per LLM call); but the spans of one instrumentation
carry the same names, call after call. So the receiver takes the set of wanted names a span
holds (one C-level intersection) and asks :func:`reading_of` how to read a span with exactly that
set: the answer is computed the first time and reused for every span with the same set, so a
span costs only the lookups of the values it actually has.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final

from agentwatch.otlp import conventions as conv

MAX_READINGS: Final = 4096
"""Distinct name sets remembered (an exporter inventing names cannot grow this without bound)."""


@dataclass(frozen=True, slots=True)
class Reading:
    """How to read a span that holds exactly one set of the wanted attribute names."""

    usage: bool
    """It holds a token count: an LLM call, unless its operation or kind says otherwise."""
    operation: str | None
    kind: str | None
    """The OpenInference span kind attribute, when present."""
    agents: tuple[str, ...]
    """The ``[otlp] agent_from`` names present, in their configured order."""
    tokens: tuple[tuple[str, str], ...]
    """(protocol key, attribute) of each token class present: its first name found."""
    total: str | None
    cost: str | None
    model: str | None
    provider: str | None
    tool_name: str | None
    tool_arguments: str | None


def wanted(agent_from: tuple[str, ...]) -> frozenset[str]:
    """Every attribute name read from a span."""
    return conv.SPAN_KEYS | frozenset(agent_from)


@functools.cache
def _readings(agent_from: tuple[str, ...]) -> dict[frozenset[str], Reading]:
    return {}


def reading_of(present: frozenset[str], agent_from: tuple[str, ...]) -> Reading:
    """How to read a span holding the wanted names ``present`` (with ``agent_from`` configured)."""
    known = _readings(agent_from)
    found = known.get(present)
    if found is None:
        if len(known) >= MAX_READINGS:
            known.clear()
        found = known[present] = _decide(present, agent_from)
    return found


def _decide(present: frozenset[str], agent_from: tuple[str, ...]) -> Reading:
    def first(names: tuple[str, ...]) -> str | None:
        return next((name for name in names if name in present), None)

    tokens = []
    for key, names in conv.TOKEN_CLASSES.items():
        name = first(names)
        if name is not None:
            tokens.append((key, name))
    return Reading(
        usage=not conv.USAGE.isdisjoint(present),
        operation=conv.OPERATION if conv.OPERATION in present else None,
        kind=conv.OPENINFERENCE_KIND if conv.OPENINFERENCE_KIND in present else None,
        agents=tuple(name for name in agent_from if name in present),
        tokens=tuple(tokens),
        total=first(conv.TOTAL_TOKENS),
        cost=first(conv.COST),
        model=first(conv.MODEL),
        provider=first(conv.PROVIDER),
        tool_name=first(conv.TOOL_NAME),
        tool_arguments=first(conv.TOOL_ARGUMENTS),
    )
