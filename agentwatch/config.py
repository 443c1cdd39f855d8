"""pipeline.toml -> typed settings, with environment overrides and ``${VAR}`` expansion.

Precedence, highest first: ``AGENTWATCH_<SECTION>__<KEY>`` environment variables, the file,
built-in defaults. For convenience the producer's own variables ``AGENTWATCH_REDIS_URL`` and
``AGENTWATCH_PREFIX`` fill ``[redis] url``/``prefix`` when neither the file nor an override sets
them, so one environment serves agents and workers alike.

Every problem is reported at once, each naming the file and the key (and the variable, for a
value from the environment), because a monitor that refuses to start should say everything that
is wrong in one go (config_errors.py words each problem).

Overrides of a ``[[notifiers]]`` entry name it by its position in the file, counting from 0:
``AGENTWATCH_NOTIFIERS__0__URL``. A variable that looks like an override
(``AGENTWATCH_<SECTION>__...``) but names no section is an error, not silently ignored.
"""

from __future__ import annotations

import decimal
import fnmatch
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agentwatch.config_env import (
    ENV_PREFIX,
    Environment,
)
from agentwatch.keys import PREFIX_RE, Keys
from agentwatch.labels import KEY_RE as LABEL_KEY_RE
from agentwatch.outages import MIN_ALLOWANCE_S
from agentwatch.signing import MIN_SECRET_CHARS
from agentwatch.urls import redis_url_problem

DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
EMBEDDED: Final = "embedded"
"""``[redis] url = "embedded"``: always start (or find) the private server, never use 6379."""
DEFAULT_FILE: Final = "pipeline.toml"
BUILTIN_SOURCE: Final = "built-in defaults"

_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(value: object) -> float:
    """``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"1h30m"`` -> seconds.

    Bare numbers are refused on purpose: ``after = 60`` could mean seconds or milliseconds, and
    a monitor that guesses wrong pages people at 3 AM.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f'durations are strings with a unit, like "{value}s" or "{value}ms"')
    if not isinstance(value, str):
        raise ValueError(f'expected a duration like "30s", got {type(value).__name__}')
    text = value.strip().replace(" ", "")
    pos, total = 0, 0.0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f'bad duration {value!r}: use e.g. "500ms", "30s", "5m", "1h", "1d"')
    return total


def format_duration(seconds: float) -> str:
    """The inverse, for summaries: 63.2 -> "1m3s", 0.5 -> "500ms"."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    whole = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            count, whole = divmod(whole, size)
            parts.append(f"{count}{unit}")
    return "".join(parts[:2])


def duration_text(seconds: float) -> str:
    """A duration as one would write it ("5m", "1h30m", "1.5s", "250ms"), and an exact inverse
    of :func:`parse_duration`, so dumped settings validate again unchanged."""
    text = _compact_duration(seconds)
    if text is not None and parse_duration(text) == seconds:
        return text
    return f"{decimal.Decimal(repr(seconds)):f}s"  # the shortest exact digits, never 1e-07


def _compact_duration(seconds: float) -> str | None:
    if not 0 <= seconds < math.inf:
        return None
    if seconds < 1:
        millis = seconds * 1000
        return f"{millis:g}ms" if "e" not in f"{millis:g}" else None
    whole = int(seconds)
    if whole != seconds:
        return f"{seconds:g}s" if "e" not in f"{seconds:g}" else None
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            count, whole = divmod(whole, size)
            parts.append(f"{count}{unit}")
    return "".join(parts)


Seconds = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(duration_text)]
"""A duration key: a string with a unit in the file (and when dumped), float seconds in code."""


def _allowance(seconds: float) -> float:
    if seconds < MIN_ALLOWANCE_S:
        raise ValueError(
            f"must be at least {format_duration(MIN_ALLOWANCE_S)}: a "
            "shorter allowance cannot be kept apart from a short Redis outage, and healthy agents "
            'would be paged after one (docs/detectors.md, "Redis outages")'
        )
    return seconds


Allowance = Annotated[Seconds, AfterValidator(_allowance)]
"""A silence or stall ``after``: a duration of at least :data:`MIN_ALLOWANCE_S` (why: there)."""

_PERIODS: Final = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
                   "h": 3600.0, "hour": 3600.0}  # fmt: skip
_RATE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")


def parse_rate(value: object) -> float:
    """``"120/min"`` -> 2.0 (per second). A rate is a count over a period, never a bare number."""
    if not isinstance(value, str):
        raise ValueError('a rate is a string like "120/min", "2/s" or "1000/h"')
    match = _RATE_RE.match(value.lower())
    if not match or match.group(2) not in _PERIODS:
        raise ValueError(f'bad rate {value!r}: use e.g. "120/min", "2/s" or "1000/h"')
    per_second = float(match.group(1)) / _PERIODS[match.group(2)]
    if per_second <= 0:
        raise ValueError("a rate limit must be above zero (leave the key out for no limit)")
    return per_second


PerSecond = Annotated[float, BeforeValidator(parse_rate)]
"""A rate key: ``"120/min"`` in the file, events per second in code (notifiers' ``rate_limit``,
``[http] ping_rate``)."""


class Section(BaseModel):
    """Base of every config section and plugin config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class RedisSection(Section):
    url: str | None = Field(None, description='leave out for the default; "embedded" forces a private one')
    prefix: str = Field("aw", pattern=rf"^{PREFIX_RE.pattern}$")
    shards: int = Field(1, ge=1, le=1024, description="event stream shards (PROTOCOL.md)")
    cluster: bool = Field(False, description="connect with the Redis Cluster client")
    timeout_s: Seconds = Field(5.0, alias="timeout", gt=0)

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        """A typo here would otherwise surface as a traceback in every worker, or as a worker
        waiting for ever on a server that cannot exist."""
        if value is None or value == EMBEDDED:
            return value
        problem = redis_url_problem(value)  # the producer's own check: agents accept it too
        if problem is not None and problem.startswith("expected "):
            raise ValueError(
                "not a Redis URL: use redis://host:6379/0, rediss://host:6380/0 (TLS), "
                'unix:///path/to/redis.sock, or "embedded"'
            )
        if problem is not None:
            raise ValueError(f"not a valid Redis URL: {problem}")
        return value


class EmbeddedSection(Section):
    state_dir: Path | None = Field(None, description="socket and log; default: runtime dir")
    persist: bool = Field(True, description="keep the data across restarts: append-only file, fsync 1/s")
    data_dir: Path | None = Field(None, description="default: $XDG_STATE_HOME/agentwatch or <state_dir>/data")
    port: int = Field(6379, ge=0, le=65535, description="also listen here when free; 0: socket only")


class StreamsSection(Section):
    events_retention_s: Seconds = Field(86400.0, alias="events_retention", gt=0)
    alerts_retention_s: Seconds = Field(30 * 86400.0, alias="alerts_retention", gt=0)
    alerts_max_len: int = Field(100_000, ge=100)
    deadletter_max_len: int = Field(10_000, ge=10)
    deadletter_max_bytes: int = Field(16_384, ge=1024, description="original entry bytes kept")


class WorkerSection(Section):
    batch: int = Field(1000, ge=1, le=100_000, description="XREADGROUP COUNT")
    block_s: Seconds = Field(1.0, alias="block", gt=0, le=1.5)
    tick_s: Seconds = Field(0.25, alias="tick", gt=0, description="timer checks (silence, stall)")
    claim_idle_s: Seconds = Field(30.0, alias="claim_idle", gt=0)
    max_attempts: int = Field(3, ge=1, le=100)
    health_ttl_s: Seconds = Field(10.0, alias="health_ttl", ge=2)
    detectors: int = Field(1, ge=0, le=64, description="detector processes `up` starts")
    notifiers: int = Field(1, ge=0, le=64, description="notifier processes `up` starts")


class ReportSection(Section):
    """Fleet reports (``agentwatch report``) and the scheduled report notifiers can opt into."""

    bucket_s: Seconds = Field(3600.0, alias="bucket", ge=60, description="rollup resolution")
    retention_s: Seconds = Field(8 * 86400.0, alias="retention", gt=0, description="rollups kept")
    every_s: Seconds | None = Field(None, alias="every", ge=1, description='send one every ..., e.g. "24h"')
    at: str | None = Field(None, pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description='or daily at "HH:MM"')
    timezone: str = Field("UTC", description='for "at" and "today", e.g. "Europe/Berlin"')
    period_s: Seconds = Field(86400.0, alias="period", gt=0, description="what a scheduled report covers")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as 'Europe/Berlin')") from None
        return value

    @model_validator(mode="after")
    def _one_schedule(self) -> ReportSection:
        if self.every_s is not None and self.at is not None:
            raise ValueError('set "every" or "at", not both')
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class GroupingSection(Section):
    """Alertmanager's grouping for notifiers: incidents of one detector that open within
    ``group_wait`` for agents sharing the ``group_by`` labels reach each notifier as one
    notification with the list, and one resolve when all are over (notifiers/grouping.py)."""

    enabled: bool = Field(False, description="group alerts for notifiers (restart notifiers never group)")
    group_by: list[str] = Field(default_factory=lambda: ["host"], min_length=1, max_length=8,
                                description="label keys: agents sharing their values group")  # fmt: skip
    group_wait_s: Seconds = Field(30.0, alias="group_wait", gt=0, le=3600,
                                  description="wait this long after a group's first incident")  # fmt: skip
    group_interval_s: Seconds = Field(300.0, alias="group_interval", gt=0, le=86400,
                                      description="then at most one update per group this often")  # fmt: skip
    detectors: list[str] = Field(default_factory=list, description="detectors whose alerts group; empty: all")
    max_groups: int = Field(
        1000, ge=1, le=100_000, description="open groups per notifier; beyond: sent alone"
    )
    max_listed: int = Field(50, ge=1, le=1000, description="agents named in one grouped notification")

    @field_validator("group_by")
    @classmethod
    def _label_keys(cls, value: list[str]) -> list[str]:
        bad = [key for key in value if LABEL_KEY_RE.fullmatch(key) is None]
        if bad:
            raise ValueError(f"not label keys: {', '.join(map(repr, bad))} (1-64 chars of A-Za-z0-9_.-)")
        if len(set(value)) != len(value):
            raise ValueError("a label is named twice")
        return value


GLOB_CHARS: Final = "A-Za-z0-9._:@/- and * ? [ ] !"
MAX_MAINTENANCE_S: Final = 7 * 86400.0
"""The longest maintenance window (recurring or ad hoc): a longer one is a way of never paging."""


class MaintenanceEntry(Section):
    """One ``[[maintenance]]`` entry: a recurring window (a cron ``schedule`` in ``[report]
    timezone``, lasting ``duration``) during which nothing pages for the agents it covers, and
    after which they get a fresh allowance (agentwatch/maintenance.py, notifiers/holds.py)."""

    agents: list[str] = Field(default_factory=list, description='globs on the agent name, e.g. ["web-*"]')
    labels: dict[str, str] = Field(
        default_factory=dict, description='label -> glob on its value, e.g. { team = "search" }'
    )
    schedule: str = Field(description='cron expression of each start, e.g. "0 2 * * *"')
    duration_s: Seconds = Field(alias="duration", gt=0, le=MAX_MAINTENANCE_S, description="each window lasts")
    reason: str = Field("", max_length=200, description="shown in status and `maintenance list`")

    @field_validator("agents", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("agents")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        from agentwatch.labels import GLOB_RE  # noqa: PLC0415 - keep the import graph flat

        for glob in value:
            if GLOB_RE.fullmatch(glob) is None:
                raise ValueError(f"{glob[:60]!r} is not an agent name or glob ({GLOB_CHARS})")
        return value

    @field_validator("labels")
    @classmethod
    def _label_globs(cls, value: dict[str, str]) -> dict[str, str]:
        from agentwatch.labels import GLOB_RE  # noqa: PLC0415

        for key, glob in value.items():
            if LABEL_KEY_RE.fullmatch(key) is None:
                raise ValueError(f"{key[:60]!r} is not a label key (1-64 chars of A-Za-z0-9_.-)")
            if GLOB_RE.fullmatch(glob) is None:
                raise ValueError(f"the value of {key!r} is not a label value or glob ({GLOB_CHARS})")
        return value

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        from agentwatch.cron import Cron  # noqa: PLC0415 - cronsim only when windows are configured

        Cron.parse(value)  # the syntax; the windows' timezone is checked with [report] (load())
        return value

    @field_validator("reason")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("must be printable text (no control characters)")
        return value

    @model_validator(mode="after")
    def _someone(self) -> MaintenanceEntry:
        if not self.agents and not self.labels:
            raise ValueError('say whom it covers: agents = ["web-*"] and/or labels = { team = "search" }')
        return self


class SecuritySection(Section):
    """Signed events and alerts (agentwatch/security.py, docs/security.md)."""

    secret: str | None = Field(None, description="signs alerts, derives agent keys; default: kept in Redis")
    agent_keys: bool = Field(False, description="require every event signed with its agent's key")
    max_skew_s: Seconds = Field(300.0, alias="max_skew", gt=0, description="signed time vs Redis time")

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, value: str | None) -> str | None:
        if value is not None and len(value) < MIN_SECRET_CHARS:
            raise ValueError(
                f"must be at least {MIN_SECRET_CHARS} characters (an unset variable?); make one with "
                "python -c 'import secrets; print(secrets.token_hex(32))'"
            )
        return value

    @model_validator(mode="after")
    def _keys_need_a_secret(self) -> SecuritySection:
        if self.agent_keys and self.secret is None:
            raise ValueError(
                "agent_keys = true needs secret: every agent's key derives from it, and a secret "
                'generated in Redis would change if Redis lost its data (secret = "${AGENTWATCH_SECRET}")'
            )
        return self


class OtlpAgents(Section):
    """``[otlp.agents."<glob>"]``: settings for the OTel agents whose name matches the glob."""

    interval_s: Seconds = Field(alias="interval", gt=0, le=31_536_000, description="fixed; not learnt")


class OtlpSection(Section):
    """The OpenTelemetry receiver (``POST /v1/traces``, ``/v1/metrics``; docs/opentelemetry.md)."""

    enabled: bool = Field(True, description="serve the OTLP routes on the HTTP server")
    agent_from: list[str] = Field(
        ["gen_ai.agent.name", "service.name"], min_length=1, description="attributes naming the agent"
    )
    run_from: list[str] = Field(["service.instance.id"], description="resource attributes naming the run")
    accept: str = Field("*", min_length=1, description="glob: the agent names OTLP may write")
    interval_s: Seconds = Field(60.0, alias="interval", gt=0, le=31_536_000, description="until learnt")
    usage_from: Literal["auto", "spans", "metrics"] = "auto"
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="413 above")
    max_agents: int = Field(1000, ge=1, le=10_000_000, description="OTel-known agents at most")
    max_agents_per_export: int = Field(100, ge=1, le=100_000)
    max_tokens: int = Field(100_000_000, ge=1, le=2**53 - 1, description="a larger count is garbage")
    forget_s: Seconds = Field(7 * 86400.0, alias="forget", gt=0, description="unseen this long: not counted")
    agents: dict[str, OtlpAgents] = Field(default_factory=dict)

    def interval_for(self, agent: str) -> float | None:
        """The interval configured for ``agent`` by the first matching glob, else None (learnt)."""
        for glob, override in self.agents.items():
            if fnmatch.fnmatchcase(agent, glob):
                return override.interval_s
        return None


class HttpSection(Section):
    """``agentwatch serve`` (and ``up``): the dashboard, ``/metrics``, badges and the ping API
    (docs/http.md). Loopback by default; any other address needs ``token``."""

    enabled: bool = Field(True, description="whether `up` starts the HTTP server")
    bind: str = Field("127.0.0.1:8787", description='"host:port"; "[::1]:8787" for IPv6')
    token: str | None = Field(None, description="required for every route but /ping, /healthz, badges")
    ping_key: str | None = Field(None, description="secret in /ping/<ping_key>/...; unset: no ping API")
    ping_accept: str = Field("*", min_length=1, description="glob: the agent names the ping key may write")
    ingest_token: str | None = Field(None, description="Bearer token of OTLP exporters; unset: no OTLP")
    public_badges: bool = Field(True, description="badges readable without the token")
    max_body_bytes: int = Field(16_384, ge=256, le=16 * 1024 * 1024, description="bigger bodies get 413")
    ping_rate: PerSecond = Field(2.0, description='per agent, e.g. "120/min"; more gets 429')
    ping_burst: int = Field(60, ge=1, le=100_000, description="pings an agent may send at once")
    run_ttl_s: Seconds = Field(7 * 86400.0, alias="run_ttl", gt=0, description="a ping agent's idle run ends")
    refresh_s: Seconds = Field(2.0, alias="refresh", ge=0.2, le=3600, description="pages update every ...")
    page_size: int = Field(100, ge=10, le=5000, description="agents per fleet page")
    series_bucket_s: Seconds = Field(300.0, alias="series_bucket", ge=10, description="chart resolution")
    series_span_s: Seconds = Field(86400.0, alias="series_span", ge=600, le=31 * 86400, description="span")

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        split_bind(value)
        return value

    @field_validator("token", "ping_key", "ingest_token")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 16:
            # A short secret in a URL or a header is guessed: refuse it rather than expose the fleet.
            raise ValueError("must be at least 16 characters (e.g. `python -c 'import secrets; "
                             "print(secrets.token_urlsafe(24))'`)")  # fmt: skip
        return value

    @model_validator(mode="after")
    def _series(self) -> HttpSection:
        if self.series_span_s / self.series_bucket_s > 4096:
            raise ValueError("series_span / series_bucket: at most 4096 points per agent")
        return self

    @property
    def host(self) -> str:
        return split_bind(self.bind)[0]

    @property
    def port(self) -> int:
        return split_bind(self.bind)[1]


def split_bind(value: str) -> tuple[str, int]:
    """``"127.0.0.1:8787"`` -> ("127.0.0.1", 8787); ``"[::1]:8787"`` -> ("::1", 8787)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'bad address {value!r}: use "host:port", e.g. "127.0.0.1:8787" or "[::1]:8787"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f'bad address {value!r}: write an IPv6 address in brackets, "[::1]:8787"')
    return host, int(port)


MAX_RATE_USD: Final = 1_000_000.0
"""Cap of one ``[prices]`` rate (USD per 1M tokens): today's dearest models cost a few hundred;
a rate above this is a typo (per token written as per million, say) that would make every cost
absurd."""


def _rate_number(value: object) -> object:
    """A rate is a TOML number: ``true`` or ``"3"`` is a mistake, not 1.0 or 3.0."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError("a rate is a number: USD per 1M tokens, e.g. 3.0")
    return value


Rate = Annotated[
    float | None, BeforeValidator(_rate_number), Field(ge=0, le=MAX_RATE_USD, allow_inf_nan=False)
]


class ModelRates(Section):
    """``[prices."<model>"]``: USD per 1M tokens of each token class, replacing the price table's
    rates for a model whose name (or glob) matches. The keys are genai-prices' own price keys less
    their ``_mtok`` suffix. A class left out keeps the table's rate for a model the table knows,
    and otherwise costs what its parent costs (cache reads and writes: ``input``; reasoning:
    ``output``), as genai-prices does."""

    input: Rate = Field(None, description="USD / 1M input tokens")
    output: Rate = Field(None, description="USD / 1M output tokens")
    cache_read: Rate = Field(None, description="USD / 1M input tokens read from a prompt cache")
    cache_write: Rate = Field(None, description="USD / 1M input tokens written to a prompt cache")
    output_reasoning: Rate = Field(None, description="USD / 1M reasoning (thinking) output tokens")

    @model_validator(mode="after")
    def _some_rate(self) -> ModelRates:
        if all(value is None for value in self.model_dump().values()):
            raise ValueError("give at least one of input, output, cache_read, cache_write, output_reasoning")
        return self


MAX_BUDGET_USD: Final = 1e9
"""Cap of a budget's ``limit``: a larger number is a typo, not a budget."""


class Budget(Section):
    """One ``[[budgets]]`` entry (SPEC section 7; detectors/budgets.py enforces it): the USD the
    agents matching ``agents`` may spend per calendar ``per`` window in ``[report] timezone``."""

    agents: str = Field("*", description='glob on the agent name, e.g. "scraper-*"')
    per: Literal["hour", "day", "month"] = Field("day", description="calendar window, in [report] timezone")
    limit: float = Field(gt=0, le=MAX_BUDGET_USD, allow_inf_nan=False, description="USD per window")
    scope: Literal["each", "together"] = Field("each", description='"each" agent its own, or "together"')
    warn_at: float = Field(0.8, gt=0, le=1, description="a warning alert at this fraction of the limit")
    halt: bool = Field(False, description="at 100 %: halt the agent(s) until the window ends")

    @field_validator("limit", mode="before")
    @classmethod
    def _number(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("a limit is a number of USD, e.g. 5.00")
        return value

    @field_validator("agents")
    @classmethod
    def _glob(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._:@/*?\[\]!-]{1,128}", value):
            raise ValueError(f"{value[:60]!r} is not an agent name or glob (A-Za-z0-9._:@/- and * ? [ ] !)")
        return value


class PipelineSettings(BaseSettings):
    """The whole file. Plugin sections stay raw here; plugins.py validates each with its model."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    redis: RedisSection = RedisSection()
    embedded: EmbeddedSection = EmbeddedSection()
    streams: StreamsSection = StreamsSection()
    worker: WorkerSection = WorkerSection()
    report: ReportSection = ReportSection()
    security: SecuritySection = SecuritySection()
    http: HttpSection = HttpSection()
    prices: dict[str, ModelRates] = Field(default_factory=dict, description="per-model rates (prices.py)")
    budgets: list[Budget] = Field(default_factory=list, description="[[budgets]]: spend limits per window")
    otlp: OtlpSection = OtlpSection()
    grouping: GroupingSection = GroupingSection()
    maintenance: list[MaintenanceEntry] = Field(default_factory=list, description="[[maintenance]] windows")
    detectors: dict[str, dict[str, Any]] = Field(default_factory=dict)
    notifiers: list[dict[str, Any]] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file arrives as init kwargs; environment overrides beat it.
        return (Environment(settings_cls), init_settings)


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline: settings plus the loaded detector and notifier plugins."""

    settings: PipelineSettings
    source: str
    detectors: list[Any] = field(default_factory=list)  # plugins.LoadedPlugin
    notifiers: list[Any] = field(default_factory=list)

    @property
    def keys(self) -> Keys:
        return Keys(prefix=self.settings.redis.prefix, shards=self.settings.redis.shards)


def find_config(path: str | Path | None, env: Mapping[str, str] = os.environ) -> Path | None:
    """Explicit path, else ``AGENTWATCH_CONFIG``, else ./pipeline.toml if it exists, else None."""
    chosen = path or env.get("AGENTWATCH_CONFIG")
    if chosen:
        return Path(chosen)
    default = Path(DEFAULT_FILE)
    return default if default.is_file() else None
