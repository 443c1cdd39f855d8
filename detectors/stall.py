"""Stall: the process is alive (pulses keep coming) but its work loop is stuck (no beats) for
max(``after``, 3 x interval).

Pulses come from the producer's own thread; beats only from the work loop. Once the last beat is
late, pulses carry the work thread's stack. The alert quotes the newest one in ``details.stack``
and names where the loop is blocked: the innermost frame of the agent's own code, and the
library call it is waiting in, e.g. "blocked in api_client.py:47 fetch_from_api -> ssl.py
do_handshake". The incident resolves when beats resume: at the first beat, or, with
``recover_after`` N, once N beats in a row came on time (each within the allowance of the one
before); or when the agent restarts or shuts down.

Stall or silence: "the process is alive" needs a pulse no older than 2.5 pulse periods and one
at or after the deadline (``due_ms``: a pulse from before it does not show the process outlived
its allowance), and the allowance counts only time in which the process proved alive. A gap of the
agent's events longer than half the allowance (or 2.5 pulse periods if longer) restarts it where the
events resume (``dead_after_ms``; the engine moves ``clocks_from_ms``): a process frozen by
SIGSTOP (a suspended VM, a debugger) is silent, and when it resumes with a pulse before its
next beat, that is no stall.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Final, Literal, cast

from pydantic import Field

from agentwatch.codec import Event
from agentwatch.config import Allowance, format_duration
from detectors.agent import Agent
from detectors.base import Detector, DetectorConfig
from detectors.recovery import Recovery

SILENCE_AFTER_MS: Final = 60_000
"""Silence's default ``after``: what "alive" is measured against when silence is disabled."""

Severity = Literal["info", "warning", "error", "critical"]

_FRAME: Final = re.compile(r'^\s*File "(?P<path>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)', re.MULTILINE)
_PACKAGES: Final = re.compile(r"/(?:site|dist)-packages/(?:[^/]+\.egg/)?(?P<top>[^/]+)")
# The standard library, on any OS (paths in lower case with "/" separators): lib/pythonX.Y/ on
# POSIX (system, pyenv, conda, framework builds), or a module of the standard library directly
# under a Lib directory (Windows installs and conda: C:/Python312/Lib/ssl.py, .../Lib/asyncio/).
_STDLIB: Final = re.compile(r"/lib(?:64)?/python\d+(?:\.\d+)?t?/")
_UNDER_LIB: Final = re.compile(r"/lib/(?P<top>[^/]+)")
_STDLIB_NAMES: Final = frozenset(sys.stdlib_module_names)
INFRASTRUCTURE: Final = frozenset({
    # HTTP and sockets
    "httpx", "httpcore", "h11", "h2", "hpack", "requests", "urllib3", "aiohttp", "aiohttp_retry",
    "yarl", "multidict", "websockets", "websocket", "httplib2", "pycurl", "socks", "sockshandler",
    "certifi", "idna", "charset_normalizer", "chardet", "brotli",
    # TLS
    "ssl", "_ssl", "openssl", "truststore", "cryptography",
    # async runtimes and concurrency
    "anyio", "sniffio", "trio", "uvloop", "gevent", "eventlet", "greenlet",
    # RPC and model APIs
    "grpc", "grpcio", "google", "googleapiclient", "proto", "openai", "anthropic", "cohere",
    "mistralai", "groq", "together", "litellm", "boto3", "botocore", "aiobotocore", "s3transfer",
    # retries and clients of stores
    "tenacity", "backoff", "redis", "hiredis", "psycopg", "psycopg2", "pymongo", "motor",
    "sqlalchemy", "asyncpg", "aiomysql", "pymysql",
    # ourselves
    "producers", "agentwatch",
})  # fmt: skip
"""Packages whose frames are never "the agent's own code": the library calls the agent's work
waits in. Anything else installed (``pip install .`` puts the agent itself in site-packages) is
the agent's."""


class StallConfig(DetectorConfig):
    after_s: Allowance = Field(120.0, alias="after", description="no beat this long while pulses arrive")
    severity: Severity = "critical"
    recover_after: int = Field(1, ge=1, le=10_000, description="beats on time in a row to resolve")


def _base(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def is_library(path: str) -> bool:
    """Whether a frame's file is the standard library or a well-known infrastructure package
    (:data:`INFRASTRUCTURE`), on any OS; everything else is the agent's own code."""
    if path.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return True
    norm = path.replace("\\", "/").lower()
    installed = _PACKAGES.search(norm)
    if installed is not None:
        top = installed["top"].removesuffix(".py").split(".", 1)[0]
        return top in INFRASTRUCTURE or top.startswith("_")  # _cffi_backend, _pytest...
    if _STDLIB.search(norm):
        return True
    under = [m["top"].removesuffix(".py") for m in _UNDER_LIB.finditer(norm)]
    if under and under[-1] in _STDLIB_NAMES:
        return True
    parts = norm.rsplit("/", 2)
    return len(parts) == 3 and parts[1] == "producers" and parts[2] in _PRODUCER_FILES  # an editable install


def _producer_files() -> frozenset[str]:
    try:
        import producers  # noqa: PLC0415 - only to know its file names

        return frozenset(p.name for p in Path(producers.__file__).parent.glob("*.py"))
    except ImportError:  # pragma: no cover - installed with agentwatch
        return frozenset()


_PRODUCER_FILES: Final = _producer_files()


def blocked_in(stack: str) -> str | None:
    """Where a Python stack (``File "...", line N, in f`` lines) is blocked, in a few words.

    The innermost frame of the agent's own code (:func:`is_library`: not the standard library
    nor an infrastructure package), then, when deeper frames exist, the innermost frame of all:
    what it waits in.
    """
    frames = [(m["path"], m["line"], m["func"]) for m in _FRAME.finditer(stack)]
    if not frames:
        return None
    own = [f for f in frames if not is_library(f[0])]
    inner = frames[-1]
    if not own:
        return f"{_base(inner[0])}:{inner[1]} {inner[2]}"
    mine = own[-1]
    where = f"{_base(mine[0])}:{mine[1]} {mine[2]}"
    if mine is not inner:
        where += f" -> {_base(inner[0])} {inner[2]}"
    return where


class Stall(Detector[StallConfig]):
    """Pulses without beats: the process lives, its work loop does not move."""

    Config = StallConfig
    State = Recovery
    kinds = ("stall",)

    # -- settings --------------------------------------------------------------------------------
    def shortest_after_ms(self) -> int:
        """The shortest ``after`` of any glob (the engine skips checks no allowance can need)."""
        overrides = [cast(StallConfig, cfg) for _, cfg in self.config._overrides]
        return int(min(c.after_s for c in [self.config, *overrides]) * 1000)

    def allowance_ms(self, agent: Agent) -> int:
        """max(``after``, 3 x the declared interval), in ms."""
        return int(max(self.config.for_agent(agent.name).after_s * 1000, 3000 * agent.interval_s))

    def live_for_ms(self, agent: Agent) -> float:
        """How long a process may send nothing at all and still count as alive: 2.5 pulse
        periods, or half the silence allowance before two pulses came. Past that, nothing
        proved it alive: it may be dead, frozen (SIGSTOP, a suspended VM) or cut off, and only
        silence may judge it."""
        if agent.pulse_period_ms > 0:
            return 2.5 * agent.pulse_period_ms
        silence = self.ctx.shared["engine"].get("Silence") if self.ctx is not None else None
        allowance = (
            silence.allowance_ms(agent)
            if silence is not None
            else max(SILENCE_AFTER_MS, 3000 * agent.interval_s)
        )
        return allowance / 2

    def dead_after_ms(self, agent: Agent) -> float:
        """A gap in the agent's events longer than this proved nothing about it: the stall clock
        restarts where the events resume (the engine keeps it in ``agent.clocks_from_ms``).
        :meth:`live_for_ms`, or half the allowance when longer, so pulses a little late (or
        sparse, as an OTel agent's metric exports) never restart it, while any freeze long
        enough to pass for a stall does (beats come at least three times per allowance)."""
        return max(self.live_for_ms(agent), self.allowance_ms(agent) / 2)

    # -- decisions -------------------------------------------------------------------------------
    @staticmethod
    def _may_stall(agent: Agent) -> bool:
        """Expected to beat, pulsing since its last beat, and neither stalled nor silent already."""
        ended = agent.retired or agent.exited or bool(agent.open & {"stall", "silence"})
        return not ended and agent.pulse_ms > agent.beat_ms

    def due_ms(self, agent: Agent) -> int:
        """The deadline, once a pulse came at or after it (before that, a pulse from before
        the deadline does not show the process outlived its allowance: the next pulse re-arms)."""
        if not self._may_stall(agent):
            return 0
        deadline = max(agent.beat_ms, agent.started_ms, agent.clocks_from_ms) + self.allowance_ms(agent)
        return deadline if agent.pulse_ms >= deadline else 0

    def on_due(self, agent: Agent, now_ms: int, limit_ms: int, sight_ms: int) -> None:
        """Stuck, not dead: the newest pulse is fresh (2.5 pulse periods) and at or after the
        deadline, so the process lived through the whole allowance without a beat."""
        if not self._may_stall(agent):
            return
        allowance = self.allowance_ms(agent)
        deadline = max(agent.beat_ms, agent.started_ms, agent.clocks_from_ms, sight_ms) + allowance
        alive = now_ms - agent.pulse_ms <= self.live_for_ms(agent)
        if deadline <= limit_ms and alive and agent.pulse_ms >= deadline:
            facts = {"beat": agent.beat_ms, "start": agent.started_ms, "pulse": agent.pulse_ms,
                     "allowance": allowance, "iv": agent.interval_s, "stack": agent.stack}  # fmt: skip
            self.decisions.open(agent, "stall", now_ms, facts)

    def back(self, agent: Agent, at_ms: int, beat0: int) -> None:
        """A beat while a stall incident is open (the engine calls it): count beats on time in
        a row; ``recover_after`` of them resolve it. A beat late by more than the allowance
        starts the count again."""
        state: Recovery = self.state(agent)
        if (
            state.step(at_ms, beat0, self.allowance_ms(agent))
            >= self.config.for_agent(agent.name).recover_after
        ):
            facts = {"back": at_ms, "since": beat0, "away": state.away_ms, "on_time": state.on_time}
            self.decisions.close(agent, "stall", at_ms, facts)
            state.reset()

    def backlog(self, agent: Agent, event: Event, at_ms: int, sight_ms: int) -> None:
        """A beat after a gap longer than the allowance while pulses came, found in a backlog
        (see Silence.backlog): fire and resolve it with those times."""
        if event["kind"] != "beat" or agent.retired or agent.exited or not agent.seen_ms:
            return
        if "stall" in agent.open or agent.pulse_ms <= agent.beat_ms:
            return
        if at_ms - agent.seen_ms > self.dead_after_ms(agent):
            return  # nothing proved it alive in between: a freeze, not a stall
        since = max(agent.beat_ms, agent.started_ms, agent.clocks_from_ms, sight_ms)
        allowance = self.allowance_ms(agent)
        if at_ms - since > allowance:
            facts = {"beat": since, "start": agent.started_ms, "since": since, "allowance": allowance,
                     "iv": agent.interval_s, "stack": agent.stack}  # fmt: skip
            fired = {"o": "f", "at": since + allowance, "f": facts}
            resolved = {"o": "r", "at": at_ms, "f": {"back": at_ms, "since": since, "late": 1}}
            self.decisions.past(agent, "stall", fired, resolved)

    def on_new_run(self, agent: Agent, at_ms: int) -> None:
        if "stall" in agent.open:  # (most new runs have nothing to close: no facts to make)
            self.decisions.close(agent, "stall", at_ms, {"at": at_ms, "restarted": 1})
        agent.states.pop(self.name, None)

    def on_retire(self, agent: Agent, at_ms: int) -> None:
        self.decisions.close(agent, "stall", at_ms, {"at": at_ms, "shutdown": 1})
        agent.states.pop(self.name, None)

    # -- wording ---------------------------------------------------------------------------------

    def render(self, agent: str, kind: str, op: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        f = op["f"]
        severity = self.config.for_agent(agent).severity
        if op["o"] == "r":
            if f.get("restarted"):
                return severity, f"{agent}: restarted", {}
            if f.get("shutdown"):
                return severity, f"{agent}: shut down", {}
            stuck_s = max(0.0, float(f.get("away", f["back"] - f["since"])) / 1000)
            summary = f"{agent}: beats resumed after {format_duration(stuck_s)}"
            if f.get("on_time", 1) > 1:
                summary += f"; {f['on_time']} beats on time since"
            return severity, summary, {"stuck_s": round(stuck_s, 3)}
        last = max(f["beat"], f["start"])
        stuck_s = max(0.0, (op["at"] - last) / 1000)
        stack = f.get("stack") or ""
        summary = f"{agent}: process alive, work loop stuck for {format_duration(stuck_s)}"
        if "died of an uncaught exception" in stack.split("\n", 1)[0]:
            error = stack.rstrip().rsplit("\n", 1)[-1].strip()
            summary += f"; the work thread died: {error}"
        else:
            where = blocked_in(stack)
            if where:
                summary += f"; blocked in {where}"
        details: dict[str, Any] = {
            "stack": stack,
            "stuck_s": round(stuck_s, 3),
            "allowance_s": f["allowance"] / 1000,
        }
        if f["beat"]:
            details["last_beat_ms"] = f["beat"]
        return severity, summary, details
