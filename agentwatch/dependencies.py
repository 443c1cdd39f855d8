"""Dependencies between agents: ``depends_on = "<glob>"`` on the silence detector, per agent glob.

``[detectors.silence.agents."web-*"] depends_on = "db-main"`` says: when a ``web-*`` agent goes
silent while ``db-main`` is down (or the pipeline itself is lagging), the web agent's silence is
a consequence, not news. Its page is held and attached to the parent (``status`` lists it under
the parent) instead of paging; when the parent recovers and the child is still silent one
allowance later, it pages on its own. The decision is taken with the maintenance windows' in
one place, notifiers/holds.py; this module holds the config key, the check that refuses
cycles at start-up, and the shared record of which silences are held for which parent.

Cycles are refused because two agents that each wait for the other to recover would never page.
Globs are compared as written: a dependency names the first per-agent glob that matches it
(file order, as the overrides themselves apply), and a dependency glob that only partly
overlaps other globs links to each of them and to the section's own keys.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Final

from pydantic import Field, field_validator

from agentwatch.config_errors import key_path
from agentwatch.keys import Keys
from agentwatch.labels import GLOB_RE
from agentwatch.plugins import DetectorConfig
from agentwatch.redisconn import Client

SECTION_NODE: Final = "*"
"""The section's own keys, for agents no per-agent glob matches."""
MAX_CHAIN: Final = 16
"""Parents followed when checking at run time that holding a silence would not close a cycle."""


class DependsOnConfig(DetectorConfig):
    """The ``depends_on`` key (the silence detector's config derives from this)."""

    depends_on: str = Field(
        "", description='glob of the agents this one needs, e.g. "db-*"; "" (default): none'
    )

    @field_validator("depends_on")
    @classmethod
    def _glob(cls, value: str) -> str:
        if value and GLOB_RE.fullmatch(value) is None:
            raise ValueError(f"{value[:60]!r} is not an agent name or glob (A-Za-z0-9._:@/- and * ? [ ] !)")
        return value


def cycle_problems(name: str, config: DependsOnConfig) -> list[str]:
    """check-config lines for dependency cycles among the globs of ``[detectors.<name>]``."""
    nodes: dict[str, str] = {SECTION_NODE: config.depends_on}
    for glob in config.agents:
        nodes.setdefault(glob, _override(config, glob))
    edges = {
        node: _targets(target, [g for g in nodes if g != SECTION_NODE]) for node, target in nodes.items()
    }
    cycle = _find_cycle(edges)
    if cycle is None:
        return []
    where = ("detectors", name) if cycle[0] == SECTION_NODE else ("detectors", name, "agents", cycle[0])
    path = " -> ".join(_shown(node) for node in cycle)
    return [f"{key_path((*where, 'depends_on'))}: dependency cycle {path}: agents that wait for each "
            "other to recover would never page"]  # fmt: skip


def _override(config: DependsOnConfig, glob: str) -> str:
    for pattern, resolved in config._overrides:
        if pattern == glob and isinstance(resolved, DependsOnConfig):
            return resolved.depends_on
    return config.depends_on


def _targets(dependency: str, globs: list[str]) -> list[str]:
    """The nodes whose agents ``dependency`` may name (see the module docstring)."""
    if not dependency:
        return []
    covering = next((glob for glob in globs if fnmatch.fnmatchcase(dependency, glob)), None)
    if covering is not None:
        return [covering]
    partial = [glob for glob in globs if fnmatch.fnmatchcase(glob, dependency)]
    return [*partial, SECTION_NODE]


def _find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """A cycle of ``edges`` as a path that ends where it starts, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in edges.get(node, []):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in edges:
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def _shown(node: str) -> str:
    return "(the section)" if node == SECTION_NODE else repr(node)


# -- the shared record of held silences -----------------------------------------------------------
@dataclass(frozen=True)
class Held:
    """A silence held for a parent: which parent, since when, and (once the parent recovered)
    until when the child's fresh allowance runs (``free_at_ms``; 0 while the parent is down)."""

    child: str
    parent: str
    since_ms: int
    free_at_ms: int = 0
    alert: str = ""
    """The id of the child's firing alert this is about: a record left from an earlier incident
    (its resolve never routed) says nothing about a new one."""


class Dependents:
    """The hash ``<prefix>:dependents``: ``<child>/silence`` -> :class:`Held` (a few entries)."""

    def __init__(self, client: Client, keys: Keys) -> None:
        self.redis: Any = client
        self.keys = keys

    def get(self, dedup_key: str) -> Held | None:
        return _decode(self.redis.hget(self.keys.dependents, dedup_key))

    def put(self, dedup_key: str, held: Held) -> None:
        self.redis.hset(self.keys.dependents, dedup_key, json.dumps(asdict(held), separators=(",", ":")))

    def drop(self, dedup_key: str) -> None:
        self.redis.hdel(self.keys.dependents, dedup_key)

    def all(self) -> dict[str, Held]:
        out = {}
        for key, raw in self.redis.hgetall(self.keys.dependents).items():
            held = _decode(raw)
            if held is not None:
                out[key.decode() if isinstance(key, bytes) else str(key)] = held
        return out

    def by_parent(self, open_keys: Iterable[str]) -> dict[str, list[str]]:
        """parent -> the children whose silence is held for it and still open (``status``)."""
        still = set(open_keys)
        out: dict[str, list[str]] = {}
        for key, held in self.all().items():
            if key in still and not held.free_at_ms:
                out.setdefault(held.parent, []).append(held.child)
        return {parent: sorted(children) for parent, children in out.items()}


def _decode(raw: bytes | str | None) -> Held | None:
    if raw is None:
        return None
    try:
        held = Held(**json.loads(raw))
    except (ValueError, TypeError):
        return None  # hand-edited: treated as absent, replaced on the next decision
    texts, numbers = (held.child, held.parent, held.alert), (held.since_ms, held.free_at_ms)
    if not all(isinstance(t, str) for t in texts) or not all(type(n) is int for n in numbers):
        return None
    return held
