"""Turning a bad pipeline.toml (or environment override) into lines a user can act on.

Each problem is one line naming the key as it is written in the file (``[worker] block``,
``[[notifiers]][1] url``), the variable when the value came from the environment, what is
wrong in the key's own terms ("at most 1.5s, got 5s", not "less than or equal to 1.5"), and
for an unknown key the valid keys *at that level* with a did-you-mean. Values of secret keys
and secret-bearing URLs are never echoed: error output ends up in CI logs and chat.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from pydantic import BaseModel, PlainSerializer
from pydantic.fields import FieldInfo

from agentwatch.urls import mask_url

# -- naming keys ------------------------------------------------------------------------------


def key_path(path: tuple[str | int, ...]) -> str:
    """('detectors', 'silence', 'after') -> '[detectors.silence] after'; ``[[notifiers]]`` entries by
    their index counted from 0, as in ``AGENTWATCH_NOTIFIERS__0__URL`` (one rule everywhere)."""
    parts = [str(p) for p in path]
    if len(parts) <= 1:
        return f"[{parts[0]}]" if parts else "(top level)"
    if parts[0] == "notifiers" and parts[1].isdigit():
        head = f"[[notifiers]][{int(parts[1])}]"
        return head + (f" {'.'.join(parts[2:])}" if parts[2:] else "")
    return f"[{'.'.join(_quote(p) for p in parts[:-1])}] {parts[-1]}"


def _quote(part: str) -> str:
    return part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else f'"{part}"'


def env_name(path: tuple[str | int, ...]) -> str:
    """The variable that overrides a key: ``AGENTWATCH_<SECTION>__<KEY>``."""
    return "AGENTWATCH_" + "__".join(str(p).upper() for p in path)


def valid_keys(model: type[BaseModel], exclude: Iterable[str] = ()) -> list[str]:
    skip = set(exclude)
    keys = [info.alias or name for name, info in model.model_fields.items()]
    return [key for key in keys if key not in skip]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key(where: str, key: str, choices: list[str]) -> str:
    return f"{where}: unknown key{did_you_mean(key, choices)}; valid keys: {', '.join(choices)}"


# -- finding the model and field an error is about --------------------------------------------


def field_info(model: type[BaseModel], key: str | int) -> FieldInfo | None:
    """The field a key (as written: the alias, or the name) refers to."""
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info
    return None


def _models_in(annotation: Any) -> tuple[type[BaseModel] | None, int]:
    """The model inside ``annotation``, and how many path parts (list index, dict key) the
    containers around it take: ``Match | None`` -> (Match, 0); ``dict[str, Cfg]`` -> (Cfg, 1)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, 0
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            model, skip = _models_in(arg)
            if model is not None:
                return model, skip
    elif origin in (list, tuple, set, frozenset) and args:
        model, skip = _models_in(args[0])
        return model, skip + 1
    elif origin is dict and len(args) == 2:
        model, skip = _models_in(args[1])
        return model, skip + 1
    elif origin is typing.Annotated and args:
        return _models_in(args[0])
    return None, 0


def model_at(model: type[BaseModel], path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model that holds the key at ``path + (key,)``, descending through nested models,
    lists and dicts of models; None where the path leaves typed models (a free-form dict)."""
    current: type[BaseModel] = model
    parts = list(path)
    while parts:
        info = field_info(current, parts.pop(0))
        if info is None:
            return None
        inner, skip = _models_in(info.annotation)
        if inner is None or len(parts) < skip:
            return None
        del parts[:skip]
        current = inner
    return current


def serializer(info: FieldInfo | None) -> Callable[[Any], Any] | None:
    """How a key's value is written in the file (durations, sizes), from its PlainSerializer."""
    for meta in info.metadata if info else ():
        if isinstance(meta, PlainSerializer):
            return typing.cast("Callable[[Any], Any]", meta.func)
    return None


# -- secrets ----------------------------------------------------------------------------------

_SECRET_KEYS: Final = frozenset(
    {"secret", "password", "passwd", "token", "routing_key", "integration_key", "api_key", "apikey",
     "auth", "authorization", "headers", "env", "ping_key"}
)  # fmt: skip
_SECRET_SUFFIXES: Final = ("_token", "_secret", "_password", "_api_key")
_URL_RE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_secret(key: str) -> bool:
    """Keys whose values are never printed: exact secret-like names, not every key containing
    "token" (``min_tokens`` is a threshold). ``headers`` and ``env`` hold secrets as values."""
    lowered = key.lower()
    return lowered in _SECRET_KEYS or lowered.endswith(_SECRET_SUFFIXES)


def looks_like_url(value: object) -> bool:
    return isinstance(value, str) and _URL_RE.match(value) is not None


# -- one error, one line ----------------------------------------------------------------------

_BOUNDS: Final = {
    "greater_than": ("gt", "more than"),
    "greater_than_equal": ("ge", "at least"),
    "less_than": ("lt", "less than"),
    "less_than_equal": ("le", "at most"),
}
_SHAPE_HINTS: Final = {
    ("notifiers", "list_type"): (
        "each notifier is its own [[notifiers]] table (double brackets: a list of tables), "
        "not one [notifiers] table"
    ),
    ("detectors", "dict_type"): "detectors are [detectors.<name>] tables (e.g. [detectors.silence])",
}


def describe_error(
    err: Mapping[str, Any],
    env: Mapping[str, str],
    prefix: tuple[str | int, ...] = (),
    *,
    model: type[BaseModel],
    exclude: Iterable[str] = (),
) -> str:
    """One pydantic error -> one line. ``model`` validated the data at ``prefix``; ``exclude``
    are keys that exist on the model but cannot be written at this place (per-agent overrides)."""
    rel = tuple(err["loc"])
    loc = (*prefix, *rel)
    where = key_path(loc)
    variable = env_name(loc)
    origin = f" (from environment {variable})" if variable in env else ""
    if err["type"] == "extra_forbidden":
        if not prefix and len(rel) == 1:
            choices = valid_keys(model)
            hint = did_you_mean(str(rel[0]), choices)
            return f"unknown section [{rel[0]}]{hint}; valid sections: {', '.join(choices)}{origin}"
        holder = model_at(model, rel[:-1])
        if holder is not None:
            skip = exclude if len(rel) == 1 else ()
            return unknown_key(where, str(rel[-1]), valid_keys(holder, skip)) + origin
    shape = _SHAPE_HINTS.get((str(loc[0]) if loc else "", str(err["type"]))) if len(loc) == 1 else None
    if shape:
        return f"{key_path(loc)}: {shape}{origin}"
    holder = model_at(model, rel[:-1]) if rel else None
    info = field_info(holder, rel[-1]) if holder is not None and rel else None
    key = str(loc[-1]) if loc else ""
    value = err.get("input")
    message = str(err["msg"]).removeprefix("Value error, ")
    show = serializer(info)
    bound = _BOUNDS.get(str(err["type"]))
    ctx = err.get("ctx") or {}
    if show is not None and bound is not None and bound[0] in ctx:
        # "at most 1.5s, got 5s": the bound and the value in the key's own units
        return f"{where}: must be {bound[1]} {show(ctx[bound[0]])}, got {show(value)}{origin}"
    if isinstance(value, dict | list) or is_secret(key) or repr(value) in message:
        shown = ""
    elif isinstance(value, str) and looks_like_url(value):
        shown = f" (got {mask_url(value, path=loc[:1] != ('redis',))!r})"
    else:
        shown = f" (got {value!r})"
    return f"{where}: {message}{shown}{origin}"
