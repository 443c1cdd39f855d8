"""Producer settings: explicit arguments, else ``AGENTWATCH_*`` environment, else defaults.

A bad value never stops the agent: it is reported once (a WARNING on ``agentwatch.producer``)
and replaced by the default, because a monitor that crashes its host on a typo in a deployment
variable is worse than one that reports under a default name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import redis

from agentwatch.codec import AGENT_RE, MAX_AGENT_LEN
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
DEFAULT_FLUSH_INTERVAL: Final = 0.1
DEFAULT_SOCKET_TIMEOUT: Final = 1.0
MIN_PERIOD: Final = 0.01

OPTIONS: Final = frozenset(
    {
        "agent", "redis_url", "prefix", "interval", "pulse_interval", "shards", "stack_factor",
        "queue_size", "flush_interval", "socket_timeout",
    }
)  # fmt: skip
"""Every keyword a Producer (and ``init()``) accepts."""

INHERIT_ENV: Final = "_AGENTWATCH_INIT"
"""Where ``init()`` leaves its arguments for multiprocessing children started by spawn or
forkserver, which re-import everything and would otherwise fall back to the environment."""

_BAD_AGENT_CHARS: Final = re.compile(r"[^A-Za-z0-9._:@/-]")


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
    flush_interval: float
    socket_timeout: float

    @property
    def stack_after(self) -> float:
        """Beat age (s) from which pulses carry the work thread's stack."""
        if self.interval is None:
            return DEFAULT_STACK_AFTER
        return self.interval * self.stack_factor


def sanitize_agent(name: str) -> str:
    """Map any string onto the protocol's agent charset (bad characters become ``_``)."""
    cleaned = _BAD_AGENT_CHARS.sub("_", name)[:MAX_AGENT_LEN]
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
    env = os.environ
    unknown = sorted(set(explicit) - OPTIONS)
    if unknown:
        warn_once("config:unknown", "agentwatch: unknown option(s) %s ignored (known: %s)",
                  ", ".join(unknown), ", ".join(sorted(OPTIONS)))  # fmt: skip
    agent = _agent(_pick(explicit, "agent", env, "AGENTWATCH_AGENT"))
    return Settings(
        agent=agent,
        redis_url=_redis_url(_pick(explicit, "redis_url", env, "AGENTWATCH_REDIS_URL")),
        prefix=_prefix(_pick(explicit, "prefix", env, "AGENTWATCH_PREFIX")),
        interval=_number("interval", _pick(explicit, "interval", env, "AGENTWATCH_INTERVAL"), None),
        pulse_interval=_number(
            "pulse_interval",
            _pick(explicit, "pulse_interval", env, "AGENTWATCH_PULSE_INTERVAL"),
            DEFAULT_PULSE_INTERVAL,
        ),
        shards=_count("shards", _pick(explicit, "shards", env, "AGENTWATCH_SHARDS"), 1),
        stack_factor=_number("stack_factor", explicit.get("stack_factor"), DEFAULT_STACK_FACTOR),
        queue_size=_count("queue_size", explicit.get("queue_size"), DEFAULT_QUEUE_SIZE),
        flush_interval=_number("flush_interval", explicit.get("flush_interval"), DEFAULT_FLUSH_INTERVAL),
        socket_timeout=_number("socket_timeout", explicit.get("socket_timeout"), DEFAULT_SOCKET_TIMEOUT),
    )


def export_for_children(explicit: dict[str, Any], run: str) -> None:
    """Leave ``init()``'s arguments where spawned multiprocessing workers will find them."""
    given = {key: value for key, value in explicit.items() if value is not None}
    given["parent"] = run
    with contextlib.suppress(TypeError, ValueError):  # unserialisable: warned about already
        os.environ[INHERIT_ENV] = json.dumps(given)


def inherited_from_parent() -> tuple[dict[str, Any], str | None]:
    """``init()`` arguments and run id of the parent, when this is a multiprocessing worker.

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


def _pick(explicit: dict[str, Any], key: str, env: os._Environ[str], var: str) -> Any:
    value = explicit.get(key)
    if value is not None:
        return value
    text = env.get(var)
    if text is None or not text.strip():
        return None
    return text.strip()


def _agent(value: Any) -> str:
    if value is None:
        return script_agent_name()
    if not isinstance(value, str):
        warn_once("config:agent", "agentwatch: agent name %r is not a string; using the script name",
                  value)  # fmt: skip
        return script_agent_name()
    if AGENT_RE.fullmatch(value):
        return value
    fixed = sanitize_agent(value)
    warn_once(
        "config:agent",
        "agentwatch: agent name %r has characters outside A-Za-z0-9._:@/- or is over %d chars; "
        "reporting as %r",
        value,
        MAX_AGENT_LEN,
        fixed,
    )
    return fixed


def _redis_url(value: Any) -> str:
    if value is None:
        return DEFAULT_REDIS_URL
    if isinstance(value, str) and value.startswith(("redis://", "rediss://", "unix://")):
        try:
            redis.ConnectionPool.from_url(value)  # parses only; connects on first use
            return value
        except (ValueError, TypeError):
            pass
    warn_once(
        "config:redis_url",
        "agentwatch: invalid Redis URL %r (expected redis://, rediss:// or unix://); using %s",
        redact(str(value)),
        DEFAULT_REDIS_URL,
    )
    return DEFAULT_REDIS_URL


def _prefix(value: Any) -> str:
    if value is None:
        return DEFAULT_PREFIX
    if isinstance(value, str) and AGENT_RE.fullmatch(value):
        return value
    warn_once("config:prefix", "agentwatch: invalid key prefix %r; using %r", value, DEFAULT_PREFIX)
    return DEFAULT_PREFIX


def _number(name: str, value: Any, default: float | None) -> Any:
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (MIN_PERIOD <= number < math.inf):
        warn_once(
            f"config:{name}",
            "agentwatch: %s=%r is not a number >= %s; using %s",
            name,
            value,
            MIN_PERIOD,
            default,
        )
        return default
    return number


def _count(name: str, value: Any, default: int) -> int:
    if value is None:
        return default
    try:
        number = int(value) if not isinstance(value, (bool, float)) else -1
    except (TypeError, ValueError):
        number = -1
    if number < 1:
        warn_once(
            f"config:{name}",
            "agentwatch: %s=%r is not an integer >= 1; using %s",
            name,
            value,
            default,
        )
        return default
    return number


def redact(url: str) -> str:
    """The URL with any password replaced, for log lines."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)
