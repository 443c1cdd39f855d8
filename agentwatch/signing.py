"""Entry signatures: the one key derivation and the one signature format (PROTOCOL.md "Signed
entries"), for every writer of events and alerts and every reader that checks them.

Standard library only: the producer imports this inside the agent's process, and so can the HTTP
ping API and the OTLP receiver, which write events on an agent's behalf.

* **Keys.** One pipeline secret (``[security] secret``) derives a key per agent
  (:func:`agent_key`) and one key for alerts (:func:`alerts_key`), each an HMAC-SHA256 of a
  label under the secret. A leaked agent key speaks for that agent only, and no agent key is
  the alerts key. A key is 64 lowercase hex characters, used as the HMAC key exactly as printed
  (its ASCII bytes), so any language signs with the string it was given.
* **Signatures.** A signed entry carries a second field ``s`` beside ``d``:
  ``v1.<unix seconds>.<hex HMAC-SHA256>`` over ``agentwatch-entry-v1\\n<stream>\\n<seconds>\\n``
  followed by the ``d`` bytes exactly as sent. ``d`` holds the agent, run and seq (what makes an
  event unique), so a copy re-added anywhere is the same event again and the detectors drop it;
  the stream name stops a copy into another stream (an alert into the events, a shard into
  another); the time lets a reader refuse an entry whose signed time is far from the time Redis
  added it (an old run replayed after a newer one, say).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Final

FIELD: Final = b"s"
"""The entry field holding the signature, beside ``d``."""
VERSION: Final = b"v1"
_CONTEXT: Final = b"agentwatch-entry-v1\n"
_AGENT_LABEL: Final = b"agentwatch agent key v1\n"
_ALERTS_LABEL: Final = b"agentwatch alerts key v1"
_SIGNATURE_RE: Final = re.compile(rb"v1\.(\d{1,12})\.([0-9a-f]{64})")
MIN_SECRET_CHARS: Final = 32


class BadSignature(ValueError):
    """An entry whose signature is missing, malformed or wrong; the message says which."""


def agent_key(secret: str, agent: str) -> str:
    """The key only ``agent`` (and the pipeline) has: what ``agentwatch agent-key AGENT`` prints,
    what the producer takes as ``init(key=...)`` / ``AGENTWATCH_KEY``, and what an HTTP or OTLP
    front door derives to write events for ``agent``."""
    return hmac.new(secret.encode(), _AGENT_LABEL + agent.encode(), hashlib.sha256).hexdigest()


def alerts_key(secret: str) -> str:
    """The key detector workers sign alerts with and notifier workers check them with."""
    return hmac.new(secret.encode(), _ALERTS_LABEL, hashlib.sha256).hexdigest()


class Signer:
    """Signs entries for one stream with one key. :meth:`stamp` once per batch, then
    :meth:`sign` per entry: the common prefix of the MAC is computed once per batch."""

    __slots__ = ("_base", "_key", "_stamp", "_stream")

    def __init__(self, key: str, stream: str) -> None:
        self._key = key.encode()
        self._stream = stream.encode()
        self._stamp = b""
        self._base = hmac.new(self._key, b"", hashlib.sha256)

    def stamp(self, now_s: float) -> None:
        """Sign what follows as written at ``now_s`` (Unix seconds)."""
        self._stamp = b"%d" % int(now_s)
        self._base = hmac.new(
            self._key, _CONTEXT + self._stream + b"\n" + self._stamp + b"\n", hashlib.sha256
        )

    def sign(self, data: bytes) -> bytes:
        """The ``s`` field for an entry whose ``d`` field is ``data``."""
        mac = self._base.copy()
        mac.update(data)
        return VERSION + b"." + self._stamp + b"." + mac.hexdigest().encode()


def check(key: str, stream: str, data: bytes, signature: bytes | None) -> int:
    """Verify one entry; the signed time (Unix seconds), or :class:`BadSignature` saying why."""
    if signature is None:
        raise BadSignature("unsigned (no 's' field)")
    match = _SIGNATURE_RE.fullmatch(signature)
    if match is None:
        raise BadSignature(f"malformed signature {signature[:40]!r} (expected v1.<unix seconds>.<64 hex>)")
    stamp, mac = match.groups()
    expected = hmac.new(
        key.encode(), _CONTEXT + stream.encode() + b"\n" + stamp + b"\n" + data, hashlib.sha256
    )
    if not hmac.compare_digest(expected.hexdigest().encode(), mac):
        raise BadSignature("bad signature")
    return int(stamp)


def signature_of(fields: object) -> bytes | None:
    """The ``s`` field of an entry as the worker read it (a flat list or a dict), if any."""
    if isinstance(fields, list):
        for index in range(0, len(fields) - 1, 2):
            if fields[index] == FIELD:
                value = fields[index + 1]
                return value if isinstance(value, bytes) else str(value).encode()
        return None
    if isinstance(fields, dict):
        value = fields.get(FIELD, fields.get("s"))
        return None if value is None else value if isinstance(value, bytes) else str(value).encode()
    return None
