"""Finding detectors and notifiers, and validating each one's own config section.

A plugin is named three ways, tried in this order:

1. a built-in alias, from ``detectors.BUILTINS`` / ``notifiers.BUILTINS`` (the one list);
2. an alias an installed package registers in the entry-point group ``agentwatch.detectors``
   or ``agentwatch.notifiers``;
3. a dotted path ``"package.module:Class"``.

Every plugin class has a ``Config`` attribute: a pydantic model (subclass of
:class:`DetectorConfig` or :class:`NotifierConfig`) for its section, so a mistyped key fails at
start-up with the file, the key and the valid choices.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Literal, Self, cast

from pydantic import Field, PrivateAttr, ValidationError

from agentwatch.config import Section
from agentwatch.config_errors import describe_error, did_you_mean, key_path
from agentwatch.errors import PluginError

Group = Literal["detectors", "notifiers"]
_OVERRIDE_CACHE_MAX = 100_000


class PluginConfig(Section):
    """Base of every plugin's config model (unknown keys are errors, models are frozen)."""


class DetectorConfig(PluginConfig):
    """Keys every detector section has, beside its own.

    ``agents`` maps a glob on the agent name to overrides of this section's keys, e.g.
    ``[detectors.silence.agents."scraper-*"] after = "10m"``. The first glob that matches, in
    file order, wins; its keys are laid over the section's.
    """

    enabled: bool = True
    class_: str | None = Field(None, alias="class", description='"package.module:Class"')
    agents: dict[str, dict[str, Any]] = Field(default_factory=dict)

    _overrides: list[tuple[str, DetectorConfig]] = PrivateAttr(default_factory=list)
    _by_agent: dict[str, DetectorConfig] = PrivateAttr(default_factory=dict)

    def for_agent(self, agent: str) -> Self:
        """This section's settings as they apply to ``agent`` (cached per agent).

        Called for nearly every event, so it reads the private attributes from pydantic's
        dict directly: through the model's ``__getattr__`` each read costs ~1 µs."""
        private = self.__pydantic_private__ or {}
        overrides = private.get("_overrides")
        if not overrides:
            return self
        by_agent: dict[str, DetectorConfig] = private["_by_agent"]
        found = by_agent.get(agent)
        if found is None:
            found = next((cfg for glob, cfg in overrides if fnmatch.fnmatchcase(agent, glob)), self)
            if len(by_agent) >= _OVERRIDE_CACHE_MAX:
                by_agent.clear()
            by_agent[agent] = found
        return cast(Self, found)


class NotifierConfig(PluginConfig):
    """Keys every ``[[notifiers]]`` entry has, beside its own."""

    type: str
    name: str | None = Field(None, description="label in logs and CLI; default: the type")


@dataclass(frozen=True)
class LoadedPlugin:
    """A plugin class with its validated config, ready to instantiate in a worker."""

    name: str
    cls: type[Any]
    config: PluginConfig


def builtins(group: Group) -> Mapping[str, str]:
    module = importlib.import_module(group)
    table: Mapping[str, str] = module.BUILTINS
    return table


def available(group: Group) -> list[str]:
    """Every alias a user can write: built-ins, then installed entry points."""
    names = list(builtins(group))
    names += [ep.name for ep in entry_points(group=f"agentwatch.{group}") if ep.name not in names]
    return names


def resolve(group: Group, ref: str) -> type[Any]:
    """Alias or ``"pkg.mod:Class"`` -> the plugin class, or :class:`PluginError` naming choices."""
    target = builtins(group).get(ref)
    if target is None:
        for ep in entry_points(group=f"agentwatch.{group}"):
            if ep.name == ref:
                target = ep.value
                break
    if target is None and ":" not in ref:
        choices = available(group)
        raise PluginError(
            f"unknown {group[:-1]} {ref!r}{did_you_mean(ref, choices)}; available: {', '.join(choices)} "
            f'(or a "package.module:Class" path)'
        )
    module_name, _, attr = (target or ref).partition(":")
    try:
        cls: type[Any] = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise PluginError(f"cannot import {module_name!r} for {group[:-1]} {ref!r}: {exc}") from None
    except AttributeError:
        raise PluginError(f"module {module_name!r} has no {attr!r} (for {group[:-1]} {ref!r})") from None
    base = DetectorConfig if group == "detectors" else NotifierConfig
    config_cls = getattr(cls, "Config", None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, base)):
        raise PluginError(f"{ref!r} is not a {group[:-1]}: it needs a Config subclass of {base.__name__}")
    return cls


def load_detectors(
    sections: Mapping[str, Mapping[str, Any]], env: Mapping[str, str] | None = None
) -> tuple[list[LoadedPlugin], list[str]]:
    """Built-ins are on unless ``enabled = false``; other detectors run when they have a section.

    ``env``: the environment the sections' overrides came from, so an error names the variable.
    """
    env = env or {}
    loaded: list[LoadedPlugin] = []
    problems: list[str] = []
    for name in dict.fromkeys([*builtins("detectors"), *sections]):
        section = dict(sections.get(name, {}))
        where = key_path(("detectors", name, "class"))
        try:
            cls = resolve("detectors", section.get("class") or name)
        except PluginError as exc:
            problems.append(f"{where.rsplit(' ', 1)[0]}: {exc}")
            continue
        config = _validate(cls.Config, section, ("detectors", name), env=env, problems=problems)
        if config is None:
            continue
        assert isinstance(config, DetectorConfig)
        _attach_overrides(cls.Config, config, section, name, env=env, problems=problems)
        if config.enabled:
            loaded.append(LoadedPlugin(name=name, cls=cls, config=config))
    return loaded, problems


def load_notifiers(
    entries: Sequence[Mapping[str, Any]], env: Mapping[str, str] | None = None
) -> tuple[list[LoadedPlugin], list[str]]:
    env = env or {}
    loaded: list[LoadedPlugin] = []
    problems: list[str] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = key_path(("notifiers", index))
        kind = entry.get("type")
        if not isinstance(kind, str):
            problems.append(f"{where}: missing key 'type'; available: {', '.join(available('notifiers'))}")
            continue
        try:
            cls = resolve("notifiers", kind)
        except PluginError as exc:
            problems.append(f"{where} type: {exc}")
            continue
        config = _validate(cls.Config, dict(entry), ("notifiers", index), env=env, problems=problems)
        if config is None:
            continue
        assert isinstance(config, NotifierConfig)
        name = config.name or (kind if kind not in seen else f"{kind}-{index + 1}")
        if name in seen:
            problems.append(f"{where} name: {name!r} is used by another notifier")
            continue
        seen.add(name)
        loaded.append(LoadedPlugin(name=name, cls=cls, config=config))
    return loaded, problems


def _validate(
    model: type[PluginConfig],
    data: dict[str, Any],
    loc: tuple[str | int, ...],
    *,
    env: Mapping[str, str],
    problems: list[str],
    exclude: frozenset[str] = frozenset(),
) -> PluginConfig | None:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems += [describe_error(err, env, loc, model=model, exclude=exclude) for err in exc.errors()]
        return None


_NOT_OVERRIDABLE = frozenset({"enabled", "class", "agents"})


def _attach_overrides(
    model: type[PluginConfig],
    config: DetectorConfig,
    section: dict[str, Any],
    name: str,
    *,
    env: Mapping[str, str],
    problems: list[str],
) -> None:
    base = {k: v for k, v in section.items() if k not in _NOT_OVERRIDABLE}
    for glob, override in config.agents.items():
        loc = ("detectors", name, "agents", glob)
        bad = sorted(_NOT_OVERRIDABLE & set(override))
        if bad:
            problems.append(f"{key_path((*loc, bad[0]))}: cannot be set per agent")
            continue
        resolved = _validate(
            model, {**base, **override}, loc, env=env, problems=problems, exclude=_NOT_OVERRIDABLE
        )
        if resolved is not None:
            assert isinstance(resolved, DetectorConfig)
            config._overrides.append((glob, resolved))
