"""Environment overrides beyond what pydantic-settings does by itself.

* ``AGENTWATCH_NOTIFIERS__<n>__<KEY>`` changes the n-th ``[[notifiers]]`` of the file (from 0):
  pydantic-settings would build a dict from such variables and replace the whole list.
* A variable that looks like an override (``AGENTWATCH_<SECTION>__...``, double underscore) but
  names no section is an error: a typo must not be ignored without a word.
* The detector sections with their overrides can be read on their own, so a bad value in
  another section does not hide a bad override of a detector.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any, Final

from pydantic import Field
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from agentwatch.config_errors import did_you_mean

ENV_PREFIX: Final = "AGENTWATCH_"


class Environment(EnvSettingsSource):
    """The environment, except ``AGENTWATCH_NOTIFIERS__<n>__<KEY>``: pydantic-settings would
    turn those into a dict that replaces the file's whole list of notifiers, so load() applies
    them to the n-th entry itself. (A whole list as JSON in ``AGENTWATCH_NOTIFIERS`` stays.)"""

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        if isinstance(data.get("notifiers"), dict):
            del data["notifiers"]
        return data


class DetectorSections(BaseSettings):
    """Only the detector sections with their environment overrides: what the plugin check sees
    when another part of the file is invalid (so one pass reports problems of both)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore")

    detectors: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)


def unknown_sections(env: Mapping[str, str], sections: list[str]) -> list[str]:
    """``AGENTWATCH_<SECTION>__<KEY>`` variables whose section does not exist (a typo would
    otherwise be ignored without a word). Only double-underscore names are overrides: the
    producer's variables (``AGENTWATCH_REDIS_URL``, ``AGENTWATCH_AGENT``, ...) and a user's own
    (``AGENTWATCH_WEBHOOK_SECRET`` for ``${...}``) have single underscores and are left alone."""
    problems = []
    for name in sorted(env):
        rest = name[len(ENV_PREFIX) :] if name.upper().startswith(ENV_PREFIX) else ""
        if "__" not in rest:
            continue
        section = rest.split("__", 1)[0].lower()
        if section not in sections:
            problems.append(
                f"environment variable {name}: unknown section {section!r}{did_you_mean(section, sections)}; "
                f"valid sections: {', '.join(sections)} (overrides are {ENV_PREFIX}<SECTION>__<KEY>)"
            )
    return problems


def notifier_overrides(raw: dict[str, Any], env: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    """Apply ``AGENTWATCH_NOTIFIERS__<n>__<KEY>[__<SUBKEY>]`` to the n-th ``[[notifiers]]``."""
    start = f"{ENV_PREFIX}NOTIFIERS__"
    found = sorted((name, value) for name, value in env.items() if name.upper().startswith(start))
    entries = raw.get("notifiers", [])
    if not found or not isinstance(entries, list):
        return raw  # a malformed [notifiers] is reported by the validation
    entries = copy.deepcopy(entries)
    for name, value in found:
        index, *path = name[len(start) :].split("__")
        if not index.isdigit() or not path or not all(path):
            problems.append(
                f"environment variable {name}: write {start}<n>__<KEY>, where n counts the "
                "file's [[notifiers]] from 0"
            )
            continue
        if int(index) >= len(entries) or not isinstance(entries[int(index)], dict):
            problems.append(
                f"environment variable {name}: the file declares {len(entries)} [[notifiers]] "
                f"(numbered from 0), so there is no [[notifiers]][{index}] to override"
            )
            continue
        target = entries[int(index)]
        keys = [key.lower() for key in path]
        for key in keys[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[keys[-1]] = _env_value(value)
    return {**raw, "notifiers": entries}


def _env_value(value: str) -> Any:
    """As pydantic-settings reads a complex value: JSON for a list or table, else the string."""
    if value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value
