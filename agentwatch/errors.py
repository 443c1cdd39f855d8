"""One error tree for the whole pipeline (producers never raise into the agent at all)."""

from __future__ import annotations


class AgentwatchError(Exception):
    """Base of every error agentwatch raises on purpose."""


class ConfigError(AgentwatchError):
    """A pipeline.toml (or environment override) that cannot run; the CLI exits 2 with it.

    ``problems`` holds one line per bad key, each naming the file and the key, so a user fixes
    every mistake in one pass instead of one per run.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def render(self) -> str:
        lines = [f"invalid configuration in {self.source}:"]
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)


class InvalidEntry(AgentwatchError):
    """A stream entry that does not decode or validate; it is dead-lettered with this reason."""


class Unauthenticated(InvalidEntry):
    """An entry whose signature is missing, wrong or too old (security.py): dead-lettered like
    any invalid entry, and counted apart (``rejected``) because it may be an attack."""


class PluginError(AgentwatchError):
    """A detector or notifier that cannot be found or loaded."""


class RedisUnavailable(AgentwatchError):
    """Redis did not answer at the configured URL (the CLI says which one and how to fix it)."""


class EmbeddedRedisError(AgentwatchError):
    """The embedded Redis server could not be found or started."""


class OtlpRejected(AgentwatchError):
    """An OTLP/HTTP request the receiver refuses as a whole, with the HTTP status to answer.

    400: not OTLP (garbage protobuf, JSON of another shape); 413: over the size cap; 415: a media
    type or content encoding the receiver does not speak. Parts of an accepted request that are
    unusable are not errors: they are counted and reported in the response's partial success.
    """

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"{status}: {message}")
