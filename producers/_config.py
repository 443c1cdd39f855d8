"""Producer settings: explicit arguments, else ``AGENTWATCH_*`` environment, else defaults.

A bad value never stops the agent: it is reported once (a WARNING on ``agentwatch.producer``,
naming the argument or variable and what is used instead) and replaced by the default, because
a monitor that crashes its host on a typo in a deployment variable is worse than one that
reports under a default name. A variable that is set but empty counts as a bad value, not as
unset: ``AGENTWATCH_PREFIX=${PREFIX}`` with ``PREFIX`` forgotten would otherwise send the
agent's events, without a word, to a pipeline nobody watches for it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from agentwatch import labels
from agentwatch.codec import MAX_AGENT_LEN, MAX_SPAN_S, name_problem
from agentwatch.keys import PREFIX_RE
from agentwatch.runfile import DEFAULT_DIR as DEFAULT_RUN_DIR
from agentwatch.urls import display_url, redis_url_problem
from producers._guard import warn_once

DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX: Final = "aw"
DEFAULT_PULSE_INTERVAL: Final = 5.0
DEFAULT_STACK_FACTOR: Final = 2.0
"""Pulses carry the work thread's stack once the last beat is this many intervals old. Below the
stall detector's 3 x interval, so the evidence is already in the stream when the alert fires."""
DEFAULT_STACK_AFTER: Final = 30.0
"""Seconds without a beat before pulses carry the stack, for agents that declared no interval."""
DEFAULT_QUEUE_SIZE: Final = 10_000
DEFAULT_QUEUE_BYTES: Final = 4 * 2**20
"""Approximate encoded bytes of the events that carry meta, held while Redis is slow or away.
Plain beats are bounded by ``queue_size`` alone (10,000 of them take well under 1 MB)."""
DEFAULT_MAXLEN: Final = 1_000_000
"""``XADD ... MAXLEN ~`` of the shared event stream: only a safety net for a pipeline that is
down (its workers trim by age, after reading). Large, because every agent shares the stream: a
small cap lets one flooding agent trim the others' unread events."""
DEFAULT_FLUSH_INTERVAL: Final = 0.1
DEFAULT_SOCKET_TIMEOUT: Final = 1.0
DEFAULT_HALT_INTERVAL: Final = 1.0
"""How often an idle sender asks Redis whether the agent was halted (a beating one asks with
every batch it delivers anyway)."""
ON_HALT: Final = ("raise", "ignore")
MIN_PERIOD: Final = 0.01

OPTIONS: Final = frozenset(
    {
        "agent", "redis_url", "prefix", "interval", "pulse_interval", "shards", "stack_factor",
        "queue_size", "queue_bytes", "maxlen", "flush_interval", "socket_timeout", "on_halt",
        "halt_interval", "key", "run_dir", "labels",
    }
)  # fmt: skip
"""Every keyword a Producer (and ``init()``) accepts."""

ENV_VARS: Final = {
    "agent": "AGENTWATCH_AGENT",
    "redis_url": "AGENTWATCH_REDIS_URL",
    "prefix": "AGENTWATCH_PREFIX",
    "interval": "AGENTWATCH_INTERVAL",
    "pulse_interval": "AGENTWATCH_PULSE_INTERVAL",
    "shards": "AGENTWATCH_SHARDS",
    "maxlen": "AGENTWATCH_MAXLEN",
    "on_halt": "AGENTWATCH_ON_HALT",
    "halt_interval": "AGENTWATCH_HALT_INTERVAL",
    "key": "AGENTWATCH_KEY",
    "run_dir": "AGENTWATCH_RUN_DIR",
    "labels": "AGENTWATCH_LABELS",
}
"""The options that may also come from the environment, and their variables."""

INHERIT_ENV: Final = "_AGENTWATCH_INIT"
"""Where the default producer leaves its arguments and run id for multiprocessing children
started by spawn or forkserver, which re-import everything and would otherwise look like a
restart of the agent rather than a worker of it."""

_BAD_AGENT_CHARS: Final = re.compile(r"[^A-Za-z0-9._:@/-]")
_KEY_RE: Final = re.compile(r"[0-9a-f]{64}")
"""An agent key as ``agentwatch agent-key`` prints it (agentwatch/signing.py)."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything one :class:`~producers.Producer` needs; immutable once resolved."""

    agent: str
    redis_url: str
    prefix: str
    interval: float | None
    pulse_interval: float
    shards: int
    stack_factor: float
    queue_size: int
    queue_bytes: int
    maxlen: int
    flush_interval: float
    socket_timeout: float
    on_halt: str = "raise"
    """``raise``: ``heartbeat()`` raises :class:`~producers.Halted` while halted; ``ignore``: it
    never does (``producers.halted()`` still tells)."""
    halt_interval: float = DEFAULT_HALT_INTERVAL
    key: str | None = field(default=None, repr=False)
    """The agent's key: events are signed with it (never printed)."""
    run_dir: str = DEFAULT_RUN_DIR
    """Where the run file goes (agentwatch/runfile.py); "" for none."""
    labels: tuple[tuple[str, str], ...] = ()
    """Labels sent with every ``start`` (agentwatch/labels.py), sorted by key."""

    @property
    def stack_after(self) -> float:
        """Beat age (s) from which pulses carry the work thread's stack."""
        if self.interval is None:
            return DEFAULT_STACK_AFTER
        return self.interval * self.stack_factor


def sanitize_agent(name: str) -> str:
    """Map any string onto a valid agent name: characters outside the protocol's charset, a
    leading ``-`` and ``.``/``..`` path segments become ``_`` (codec.name_problem's rules)."""
    cleaned = _BAD_AGENT_CHARS.sub("_", name)[:MAX_AGENT_LEN]
    if cleaned.startswith("-"):
        cleaned = "_" + cleaned[1:]
    if "." in cleaned:
        segments = cleaned.split("/")
        cleaned = "/".join("_" * len(s) if s in (".", "..") else s for s in segments)
    return cleaned or "python"


def script_agent_name() -> str:
    """The running program's name: ``python -m pkg`` gives ``pkg``, ``agent.py`` gives ``agent``."""
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    name = ""
    if isinstance(spec_name, str) and spec_name not in {"__main__", "__mp_main__"}:
        name = spec_name.removesuffix(".__main__")
    elif sys.argv and sys.argv[0] not in {"", "-c", "-"}:
        path = Path(sys.argv[0])
        name = path.parent.name if path.stem == "__main__" else path.stem
    return sanitize_agent(name or "python")


def resolve(**explicit: Any) -> Settings:
    """Settings from explicit keyword values (``None`` = not given), the environment, defaults."""
    unknown = sorted(set(explicit) - OPTIONS)
    if unknown:
        warn_once("config:unknown", "agentwatch: unknown option(s) %s ignored (known: %s)",
                  ", ".join(unknown), ", ".join(sorted(OPTIONS)))  # fmt: skip
    given = _Given(explicit)
    return Settings(
        agent=_agent(*given.pick("agent")),
        redis_url=_redis_url(*given.pick("redis_url")),
        prefix=_prefix(*given.pick("prefix")),
        interval=_number(*given.pick("interval"), None, MAX_SPAN_S),
        pulse_interval=_number(*given.pick("pulse_interval"), DEFAULT_PULSE_INTERVAL, MAX_SPAN_S),
        shards=_count(*given.pick("shards"), 1),
        stack_factor=_number(*given.pick("stack_factor"), DEFAULT_STACK_FACTOR, MAX_SPAN_S),
        queue_size=_count(*given.pick("queue_size"), DEFAULT_QUEUE_SIZE),
        queue_bytes=_count(*given.pick("queue_bytes"), DEFAULT_QUEUE_BYTES),
        maxlen=_count(*given.pick("maxlen"), DEFAULT_MAXLEN),
        flush_interval=_number(*given.pick("flush_interval"), DEFAULT_FLUSH_INTERVAL, MAX_SPAN_S),
        socket_timeout=_number(*given.pick("socket_timeout"), DEFAULT_SOCKET_TIMEOUT, MAX_SPAN_S),
        on_halt=_choice(*given.pick("on_halt"), ON_HALT),
        halt_interval=_number(*given.pick("halt_interval"), DEFAULT_HALT_INTERVAL, MAX_SPAN_S),
        key=_key(*given.pick("key")),
        run_dir=_run_dir(*given.pick("run_dir")),
        labels=_labels(*given.pick("labels")),
    )


def export_for_children(explicit: dict[str, Any], run: str) -> None:
    """Leave the default producer's arguments and run id where multiprocessing workers look."""
    given = {key: value for key, value in explicit.items() if value is not None}
    given["parent"] = run
    with contextlib.suppress(TypeError, ValueError):  # unserialisable: warned about already
        os.environ[INHERIT_ENV] = json.dumps(given)


def inherited_from_parent() -> tuple[dict[str, Any], str | None]:
    """Arguments and run id of the parent's default producer, in a multiprocessing worker.

    Only a process that multiprocessing started (``parent_process()`` is set) takes them, so an
    unrelated program the agent runs with ``subprocess`` keeps its own identity.
    """
    raw = os.environ.get(INHERIT_ENV)
    mp = sys.modules.get("multiprocessing")
    if not raw or mp is None or mp.parent_process() is None:
        return {}, None
    try:
        value = json.loads(raw)
    except ValueError:
        return {}, None
    if not isinstance(value, dict):
        return {}, None
    parent = value.get("parent")
    options = {key: value[key] for key in value if key in OPTIONS}
    return options, parent if isinstance(parent, str) else None


class _Given:
    """Where each option's value comes from: the explicit argument, else its variable."""

    def __init__(self, explicit: dict[str, Any]) -> None:
        self._explicit = explicit

    def pick(self, key: str) -> tuple[Any, str]:
        """``(value or None, label)``; the label names the source in warnings."""
        value = self._explicit.get(key)
        if value is not None:
            return value, key
        var = ENV_VARS.get(key)
        if var is None:
            return None, key
        text = os.environ.get(var)
        return (None if text is None else text.strip()), var


def _agent(value: Any, label: str) -> str:
    if value is None:
        return script_agent_name()
    if not isinstance(value, str) or not value:
        fallback = script_agent_name()
        warn_once(f"config:{label}", "agentwatch: %s=%r is not an agent name; reporting as %r "
                  "(the script's name)", label, value, fallback)  # fmt: skip
        return fallback
    problem = name_problem(value)
    if problem is None:
        return value
    fixed = sanitize_agent(value)
    warn_once(f"config:{label}", "agentwatch: %s: agent name %s; reporting as %r", label, problem,
              fixed)  # fmt: skip
    return fixed


def _redis_url(value: Any, label: str) -> str:
    if value is None:
        return DEFAULT_REDIS_URL
    problem = redis_url_problem(value)
    if problem is None:
        return str(value)
    warn_once(
        f"config:{label}",
        "agentwatch: %s=%r is not a usable Redis URL (%s); events go to the default %s instead",
        label,
        display_url(str(value)),
        problem,
        DEFAULT_REDIS_URL,
    )
    return DEFAULT_REDIS_URL


def _prefix(value: Any, label: str) -> str:
    if value is None:
        return DEFAULT_PREFIX
    if isinstance(value, str) and PREFIX_RE.fullmatch(value):
        return value
    warn_once(
        f"config:{label}",
        "agentwatch: %s=%r is not a key prefix a pipeline can use (1-32 chars of A-Za-z0-9._-); "
        "events go to the default prefix %r instead",
        label,
        value,
        DEFAULT_PREFIX,
    )
    return DEFAULT_PREFIX


def _key(value: Any, label: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and _KEY_RE.fullmatch(value):
        return value
    # Never the value itself in the warning: it is a secret, even when malformed.
    warn_once(f"config:{label}", "agentwatch: %s is not an agent key (64 lowercase hex characters, "
              "as `agentwatch agent-key AGENT` prints it); events are sent unsigned, and a pipeline "
              "with [security] agent_keys refuses them", label)  # fmt: skip
    return None


def _run_dir(value: Any, label: str) -> str:
    if value is None:
        return DEFAULT_RUN_DIR
    if value == "" or (isinstance(value, str) and os.path.isabs(value)):
        return str(value)
    warn_once(f"config:{label}", "agentwatch: %s=%r is not an absolute directory (or \"\" for none); "
              "using %s", label, value, DEFAULT_RUN_DIR)  # fmt: skip
    return DEFAULT_RUN_DIR


def _labels(value: Any, label: str) -> tuple[tuple[str, str], ...]:
    """A map (``init(labels=...)``) or ``team=x,tier=1`` text (``AGENTWATCH_LABELS``); pairs
    outside the label rules are dropped, with one warning naming them."""
    if value is None:
        return ()
    if isinstance(value, str):
        kept, dropped = labels.parse(value)
    elif isinstance(value, (list, tuple)):  # pairs, as a spawned child inherits them
        try:
            kept, dropped = labels.clean(dict(value))
        except (TypeError, ValueError):
            kept, dropped = {}, [f"labels must be a map of strings, got {type(value).__name__}"]
    else:
        kept, dropped = labels.clean(value)
    if dropped:
        warn_once(f"config:{label}", "agentwatch: %s: dropped %d label(s): %s", label, len(dropped),
                  "; ".join(dropped))  # fmt: skip
    return tuple(sorted(kept.items()))


def _number(value: Any, label: str, default: float | None, maximum: float) -> Any:
    """A period in seconds (or a factor) within [MIN_PERIOD, maximum]. The upper bound is the
    protocol's cap for ``interval``, and keeps every other period a valid lock timeout."""
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if isinstance(value, bool) or not (MIN_PERIOD <= number <= maximum):
        warn_once(
            f"config:{label}",
            "agentwatch: %s=%r is not a number from %s to %s; %s",
            label,
            value,
            MIN_PERIOD,
            f"{maximum:.0f}",
            "ignored" if default is None else f"using {default}",
        )
        return default
    return number


def _choice(value: Any, label: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first is the default)."""
    if value is None:
        return choices[0]
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    warn_once(f"config:{label}", "agentwatch: %s=%r is not one of %s; using %r",
              label, value, ", ".join(choices), choices[0])  # fmt: skip
    return choices[0]


def _count(value: Any, label: str, default: int) -> int:
    if value is None:
        return default
    try:
        number = int(value) if not isinstance(value, (bool, float)) else -1
    except (TypeError, ValueError):
        number = -1
    if number < 1:
        warn_once(
            f"config:{label}",
            "agentwatch: %s=%r is not an integer >= 1; using %s",
            label,
            value,
            default,
        )
        return default
    return number
