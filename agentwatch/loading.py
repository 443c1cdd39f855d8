"""Loading a pipeline: read pipeline.toml, expand ``${VAR}``, validate, load the plugins.

Apart from agentwatch/config.py (the settings models) because loading ASSEMBLES: it imports the
plugin registry, ``depends_on`` and maintenance checks and the notifiers' routing rules, which
all import config.py themselves. Config stays at the bottom of the spine; this module sits on top
with the other assemblers (tests/test_import_graph.py).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from agentwatch.config import (
    BUILTIN_SOURCE,
    Pipeline,
    PipelineSettings,
    RedisSection,
    find_config,
)
from agentwatch.config_env import DetectorSections, notifier_overrides, unknown_sections
from agentwatch.config_errors import describe_error, key_path, valid_keys
from agentwatch.errors import ConfigError


def load(path: str | Path | None = None, *, plugins: bool = True) -> Pipeline:
    """Read, expand, validate; raise :class:`ConfigError` listing every bad key.

    Environment overrides come from ``os.environ`` (pydantic-settings reads it directly).
    """
    env = os.environ
    config_path = find_config(path, env)
    source = str(config_path) if config_path else BUILTIN_SOURCE
    raw: dict[str, Any] = {}
    if config_path is not None:
        try:
            raw = tomllib.loads(config_path.read_text())
        except FileNotFoundError:
            raise ConfigError(source, ["file not found"]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(source, [f"cannot read: {exc}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    unset: list[str] = []  # keys whose ${VAR} is not set: reported once, not again as invalid
    problems: list[str] = []
    raw = _expand(raw, (), env, problems, unset)
    problems += unknown_sections(env, valid_keys(PipelineSettings))
    raw = notifier_overrides(raw, env, problems)
    settings: PipelineSettings | None = None
    try:
        settings = _producer_env_fallbacks(PipelineSettings(**raw), raw, env, problems)
    except ValidationError as exc:
        problems += [describe_error(err, env, model=PipelineSettings) for err in exc.errors()]
    detectors: list[Any] = []
    notifiers: list[Any] = []
    if plugins:  # check plugin sections even when the rest failed: report everything in one go
        detectors, notifiers = _load_plugins(settings, raw, env, problems)
    problems += _schedule_problems(settings, detectors)
    problems = [p for p in problems if not any(p.startswith(f"{w}: ") for w in unset) or "is not set" in p]
    if problems or settings is None:
        raise ConfigError(source, problems)
    return Pipeline(settings=settings, source=source, detectors=detectors, notifiers=notifiers)


def _load_plugins(
    settings: PipelineSettings | None, raw: dict[str, Any], env: Mapping[str, str], problems: list[str]
) -> tuple[list[Any], list[Any]]:
    from agentwatch import plugins as registry  # noqa: PLC0415 - CLI start: only with plugins=True

    if settings is not None:
        sections: Any = settings.detectors
        entries: Any = settings.notifiers
    else:
        entries = raw.get("notifiers", [])
        try:
            sections = DetectorSections(detectors=raw.get("detectors", {})).detectors
        except ValidationError:
            sections = raw.get("detectors", {})
    detectors: list[Any] = []
    notifiers: list[Any] = []
    if isinstance(sections, dict) and all(isinstance(v, dict) for v in sections.values()):
        detectors, bad = registry.load_detectors(sections, env)
        problems += bad
    if isinstance(entries, list) and all(isinstance(v, dict) for v in entries):
        notifiers, bad = registry.load_notifiers(entries, env)
        problems += bad
    if notifiers and isinstance(sections, dict):
        problems += _unknown_detector_refs(sections, notifiers)
    return detectors, notifiers


def _schedule_problems(settings: PipelineSettings | None, detectors: list[Any]) -> list[str]:
    """What only the whole file can tell: ``[[maintenance]]`` windows that never end (or whose
    schedule fails in ``[report] timezone``), and ``depends_on`` cycles (agentwatch/dependencies.py)."""
    problems: list[str] = []
    # Each check imports its module only when there is something to check: `status` and
    # `alerts` load the settings without plugins, and most files have no [[maintenance]], so
    # neither pays for the plugin base classes or the cron parser at start (issue 10).
    if settings is not None and settings.maintenance:
        from agentwatch.maintenance import config_problems  # noqa: PLC0415 - CLI start

        problems += config_problems(settings.maintenance, settings.report.timezone)
    if detectors:
        from agentwatch.dependencies import DependsOnConfig, cycle_problems  # noqa: PLC0415 - CLI start

        for plugin in detectors:
            if isinstance(plugin.config, DependsOnConfig):
                problems += cycle_problems(plugin.name, plugin.config)
    return problems


def _unknown_detector_refs(sections: Mapping[str, Any], notifiers: list[Any]) -> list[str]:
    """A notifier filtering on a detector this pipeline has not (``on = ["silense"]``) would match
    nothing, silently: name it at start-up, like any other bad key."""
    from notifiers.routing import known_detectors, unknown_detectors  # noqa: PLC0415 - CLI start

    known = known_detectors(sections)
    problems = []
    for index, plugin in enumerate(notifiers):
        referenced = getattr(plugin.config, "referenced_detectors", None)  # a plugin's own config may lack it
        if referenced is None:
            continue
        for problem in unknown_detectors(sorted(referenced()), known):
            problems.append(f"{key_path(('notifiers', index))} ({plugin.name}): {problem}")
    return problems


_FALLBACKS: Final = {"url": "AGENTWATCH_REDIS_URL", "prefix": "AGENTWATCH_PREFIX"}


def _producer_env_fallbacks(
    settings: PipelineSettings, raw: dict[str, Any], env: Mapping[str, str], problems: list[str]
) -> PipelineSettings:
    redis = settings.redis
    updates: dict[str, Any] = {}
    if redis.url is None and env.get("AGENTWATCH_REDIS_URL"):
        updates["url"] = env["AGENTWATCH_REDIS_URL"]
    explicit_prefix = "prefix" in raw.get("redis", {}) or "AGENTWATCH_REDIS__PREFIX" in env
    if not explicit_prefix and env.get("AGENTWATCH_PREFIX"):
        updates["prefix"] = env["AGENTWATCH_PREFIX"]
    if not updates:
        return settings
    try:
        RedisSection.model_validate(updates)  # check just these values; the rest are valid already
    except ValidationError as exc:
        for err in exc.errors():
            line = describe_error(err, {}, ("redis",), model=RedisSection)
            problems.append(f"{line} (from environment {_FALLBACKS[str(err['loc'][0])]})")
        return settings
    return settings.model_copy(update={"redis": redis.model_copy(update=updates)})


_VAR_RE: Final = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(
    value: Any, path: tuple[str, ...], env: Mapping[str, str], problems: list[str], unset: list[str]
) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string; ``$$`` is a literal ``$``."""
    if isinstance(value, dict):
        return {k: _expand(v, (*path, str(k)), env, problems, unset) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, (*path, str(i)), env, problems, unset) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        where = key_path(path)
        unset.append(where)
        problems.append(
            f"{where}: environment variable {name} is not set (export it, or write ${{{name}:-default}})"
        )
        return ""

    return _VAR_RE.sub(substitute, value)
