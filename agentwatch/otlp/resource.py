"""The process behind an export: its OTel resource, read once per ``ResourceSpans``/``ResourceMetrics``.

A resource is one SDK in one process (``service.name``, ``service.instance.id``, ``host.name``...).
The receiver keeps a little state per process (resource state, state.py), keyed by a hash of the
attributes that identify it, so metrics exported by a process can be given to the agents its spans
named, and its export cadence learnt.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from opentelemetry.proto.common.v1.common_pb2 import KeyValue

from agentwatch.codec import MAX_AGENT_LEN
from agentwatch.config import OtlpSection
from agentwatch.otlp import conventions as conv
from agentwatch.otlp.values import text
from producers._config import sanitize_agent

MAX_RUN_LEN: Final = 64
"""The protocol's cap on a run id; a longer ``service.instance.id`` is hashed down to fit."""


@dataclass(frozen=True, slots=True)
class Origin:
    """What the resource says about the process."""

    key: bytes
    """Identity of the process for the receiver's state: a hash of its service name and run."""
    agent: str | None
    """The agent the resource names (``agent_from``, protocol charset), None if it names none."""
    explicit: bool
    """The resource names an agent by an attribute other than ``service.name``: it is an agent
    even before it sends any GenAI telemetry."""
    run: str | None
    host: str | None
    version: str | None

    @staticmethod
    def agent_name(raw: str) -> str:
        """An attribute's agent name mapped onto the protocol's agent charset."""
        return sanitize_agent(raw[: MAX_AGENT_LEN * 4])


@functools.cache
def _wanted(agent_from: tuple[str, ...], run_from: tuple[str, ...]) -> frozenset[str]:
    return frozenset({*agent_from, *run_from, conv.SERVICE_NAME, conv.HOST_NAME, conv.SERVICE_VERSION})


def origin_of(attributes: Iterable[KeyValue], settings: OtlpSection) -> Origin:
    """The :class:`Origin` of one resource's attributes."""
    wanted = _wanted(tuple(settings.agent_from), tuple(settings.run_from))
    found: dict[str, str] = {}
    for kv in attributes:
        if kv.key in wanted:
            value = text(kv.value)
            if value is not None:
                found[kv.key] = value
    agent: str | None = None
    explicit = False
    for key in settings.agent_from:
        name = found.get(key)
        if name is not None and not name.startswith(conv.UNKNOWN_SERVICE):
            agent, explicit = Origin.agent_name(name), key != conv.SERVICE_NAME
            break
    run = next((found[key] for key in settings.run_from if key in found), None)
    if run is not None and len(run) > MAX_RUN_LEN:
        run = hashlib.blake2b(run.encode(), digest_size=16).hexdigest()
    identity = "\x00".join((found.get(conv.SERVICE_NAME, ""), agent or "", run or ""))
    return Origin(
        key=hashlib.blake2b(identity.encode(), digest_size=12).digest(),
        agent=agent,
        explicit=explicit,
        run=run,
        host=found.get(conv.HOST_NAME),
        version=found.get(conv.SERVICE_VERSION),
    )
