"""Agent labels: ``team=search``, ``tier=1``, ``host=worker-3``; what alerts route and group on.

A producer sends its labels on each ``start`` event (a map of strings, PROTOCOL.md); the
pipeline keeps the latest run's labels with its start facts (facts.py) and adds the ``host``
label from the start's ``host`` unless the producer set one. Alerts carry them in
``details.labels``; notifiers' ``match`` can select on them; ``agentwatch status --label``
filters on them.

Labels are agent-supplied text, so the rules are narrow on purpose: a key is a short identifier,
a value is a short string of the agent-name charset (no spaces, no markup, no escapes). A pair
outside these rules is dropped and counted (the agent is still monitored); so are pairs over
the count cap. This module is imported by the producer: standard library only.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from agentwatch.keys import Keys, shard_of

MAX_LABELS: Final = 16
"""Labels kept per run; further pairs are dropped (sorted by key, so the same ones each time)."""
MAX_KEY_CHARS: Final = 64
MAX_VALUE_CHARS: Final = 128
KEY_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
VALUE_RE: Final = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")
HOST_LABEL: Final = "host"
_HOST_BAD: Final = re.compile(r"[^A-Za-z0-9._:@/-]")


def pair_problem(key: object, value: object) -> str | None:
    """Why ``key=value`` cannot be a label, or None."""
    if not isinstance(key, str) or KEY_RE.fullmatch(key) is None:
        return f"key {_short(key)} is not 1-{MAX_KEY_CHARS} chars of A-Za-z0-9_.- starting with a letter or _"
    if not isinstance(value, str) or VALUE_RE.fullmatch(value) is None:
        return f"value of {key!r} is not 1-{MAX_VALUE_CHARS} chars of A-Za-z0-9._:@/-"
    return None


_CLEANED: dict[tuple[tuple[object, object], ...], tuple[dict[str, str], list[str]]] = {}
_CLEANED_MAX: Final = 4096
"""Label sets already judged: a fleet sends a few distinct ones, again with every start."""


def clean(raw: object) -> tuple[dict[str, str], list[str]]:
    """(the valid labels of ``raw``, a reason per dropped pair). ``raw`` should be a map of
    strings; anything else is dropped whole with one reason. Returns fresh containers."""
    if raw is None:
        return {}, []
    if not isinstance(raw, Mapping):
        return {}, [f"labels must be a map of strings, got {type(raw).__name__}"]
    try:
        key = tuple(raw.items())
        known = _CLEANED.get(key)
    except TypeError:  # an unhashable value: judged below, not remembered
        key, known = (), None
    if known is None:
        known = _judge(raw)
        if key:
            if len(_CLEANED) >= _CLEANED_MAX:
                _CLEANED.clear()
            _CLEANED[key] = known
    return dict(known[0]), list(known[1])


def _judge(raw: Mapping[Any, Any]) -> tuple[dict[str, str], list[str]]:
    kept: dict[str, str] = {}
    dropped: list[str] = []
    for key in sorted(raw, key=str):
        value = raw[key]
        problem = pair_problem(key, value)
        if problem is not None:
            dropped.append(problem)
        elif len(kept) >= MAX_LABELS:
            dropped.append(f"label {key!r} is over the cap of {MAX_LABELS} labels")
        else:
            kept[key] = value
    return kept, dropped


def parse(text: str) -> tuple[dict[str, str], list[str]]:
    """``team=search,tier=1`` (``AGENTWATCH_LABELS``) -> (labels, reasons for dropped pairs)."""
    pairs: dict[str, str] = {}
    dropped: list[str] = []
    for part in text.split(","):
        item = part.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            dropped.append(f"{_short(item)} is not key=value")
            continue
        pairs[key.strip()] = value.strip()
    kept, more = clean(pairs)
    return kept, dropped + more


def effective(labels: object, host: object) -> dict[str, str]:
    """The labels an agent's alerts carry: what its run sent (already cleaned), plus ``host``
    from the start's host name unless the run set a ``host`` label itself."""
    out = dict(labels) if isinstance(labels, Mapping) else {}
    if HOST_LABEL not in out and isinstance(host, str) and host:
        value = _HOST_BAD.sub("_", host)[:MAX_VALUE_CHARS]
        if VALUE_RE.fullmatch(value):
            out[HOST_LABEL] = value
    return {str(k): str(v) for k, v in sorted(out.items())}


def matches(wanted: Mapping[str, str], labels: object) -> bool:
    """True when every ``key -> glob`` of ``wanted`` matches a label of ``labels`` (an alert's
    ``details.labels``, an agent's effective labels); a missing label does not match. The one
    label matcher: notifiers' ``match.labels``, maintenance windows and ``status --label``."""
    return matcher(wanted)(labels)


def matcher(wanted: Mapping[str, str]) -> Callable[[object], bool]:
    """:func:`matches` with ``wanted`` fixed: its globs compiled once (``fnmatchcase``'s rule:
    case matters, the whole value). A maintenance window asks it for every alert of a storm,
    each of a different agent, so the per-call cost is what counts (notifiers/holds.py)."""
    tests = _compiled(tuple(wanted.items()))

    def match(labels: object) -> bool:
        if type(labels) is not dict and not isinstance(labels, Mapping):
            return False
        for key, test in tests:
            value = labels.get(key)
            if not isinstance(value, str) or test(value) is None:
                return False
        return True

    return match


@functools.lru_cache(maxsize=256)
def _compiled(wanted: tuple[tuple[str, str], ...]) -> tuple[tuple[str, Callable[[str], object]], ...]:
    return tuple((key, re.compile(fnmatch.translate(glob)).match) for key, glob in wanted)


GLOB_RE: Final = re.compile(r"[A-Za-z0-9._:@/*?\[\]!-]{1,128}")
"""A glob on an agent name or a label value as config and the CLI accept it: the name charset
plus ``* ? [ ] !``."""


def selector(text: str) -> tuple[str, str]:
    """``key=glob`` (``status --label``) -> (key, glob); ValueError with the reason if malformed."""
    key, sep, glob = text.partition("=")
    key = key.strip()
    if not sep or KEY_RE.fullmatch(key) is None or not glob.strip():
        raise ValueError(f"{_short(text)} is not key=value (a label key, '=', a value or glob)")
    return key, glob.strip()


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read(client: Any, keys: Keys, agent: str) -> dict[str, str]:
    """One agent's labels from its start facts (one HGET): what its alerts carry."""
    raw = client.hget(keys.facts(shard_of(agent, keys.shards)), agent)
    if not raw:
        return {}
    try:
        fact = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(fact, dict):
        return {}
    return effective(fact.get("labels"), fact.get("host"))
