"""Who may write what: the pipeline secret, per-agent event signatures, signed alerts.

Three checks, each in the decode step of the runtime (worker.py), so no detector or notifier
ever sees an entry that fails one; the entry is dead-lettered with the reason and counted in
the worker's ``rejected`` (docs/security.md has the threat model):

* **Events** (opt-in, ``[security] agent_keys = true``): every event must carry the signature of
  its agent's key (:func:`agentwatch.signing.agent_key`), so one leaked agent key speaks for
  that agent only, and its signed time must lie within ``max_skew`` of the time Redis added the
  entry. A signed entry copied within that window is the same (agent, run, seq) again, which
  the detectors already drop as a duplicate.
* **Alerts** (always): detector workers sign what they publish to ``<prefix>:alerts`` with the
  alerts key, notifier workers deliver only what carries a valid signature. An entry XADDed by
  anyone else (an event writer with too wide a Redis credential, say) pages no one and closes
  no incident.
* **The secret**: ``[security] secret`` when configured (required with ``agent_keys``: agents'
  keys must not change when Redis loses its data). Without one, the first worker generates a
  random secret and keeps it in ``<prefix>:secret``, which only the detector and notifier roles
  may read (``agentwatch acl``).
"""

from __future__ import annotations

import secrets as random_tokens
import time
from datetime import UTC, datetime
from typing import Any, Final

from agentwatch.codec import entry_ms
from agentwatch.config import SecuritySection, format_duration
from agentwatch.errors import Unauthenticated
from agentwatch.keys import Keys
from agentwatch.signing import BadSignature, Signer, agent_key, alerts_key, check, signature_of

_KEY_CACHE_MAX: Final = 200_000


class PipelineSecret:
    """The pipeline secret: the configured one, else the one kept in Redis (made on first use)."""

    def __init__(self, client: Any, keys: Keys, configured: str | None) -> None:
        self.client = client
        self.keys = keys
        self.configured = configured
        self._value: str | None = configured

    def get(self) -> str:
        if self._value is None:
            self._value = self._read()
        return self._value

    def reread(self) -> bool:
        """Read a Redis-kept secret again; True if it changed. A notifier does so when a signature
        fails: Redis may have lost its data and a detector made a new secret. (One GET per bad
        entry, which also costs a dead letter: no amplification.)"""
        if self.configured is not None:
            return False
        before, self._value = self._value, self._read()
        return self._value != before

    def _read(self) -> str:
        value = self.client.get(self.keys.secret)
        if value is None:
            self.client.set(self.keys.secret, random_tokens.token_hex(32), nx=True)
            value = self.client.get(self.keys.secret)
        return value.decode() if isinstance(value, bytes) else str(value)


class AlertSigner:
    """Signs alerts as a detector worker publishes them (alerts.py ``Incidents._publish``)."""

    def __init__(self, secret: PipelineSecret) -> None:
        self.secret = secret
        self._signer: Signer | None = None

    def sign(self, data: bytes) -> bytes:
        if self._signer is None:
            self._signer = Signer(alerts_key(self.secret.get()), self.secret.keys.alerts)
        self._signer.stamp(time.time())
        return self._signer.sign(data)


class AlertVerifier:
    """The notifier worker's check of each alerts-stream entry (the runtime's ``verify`` hook)."""

    def __init__(self, secret: PipelineSecret, max_skew_s: float) -> None:
        self.secret = secret
        self.max_skew_s = max_skew_s
        self._key: str | None = None

    def __call__(self, stream: str, entry_id: bytes, fields: Any, data: bytes, _alert: object) -> None:
        signature = signature_of(fields)
        if self._key is None:
            self._key = alerts_key(self.secret.get())
        try:
            signed_s = check(self._key, stream, data, signature)
        except BadSignature as exc:
            if signature is None or not self.secret.reread():
                raise Unauthenticated(
                    f"alert refused: {exc}; alerts come from the pipeline, which holds the secret"
                ) from None
            self._key = alerts_key(self.secret.get())  # regenerated: try once more with it
            try:
                signed_s = check(self._key, stream, data, signature)
            except BadSignature as again:
                raise Unauthenticated(
                    f"alert refused: {again}; alerts come from the pipeline, which holds the secret"
                ) from None
        _check_time("alert", signed_s, entry_id, self.max_skew_s)


class EventVerifier:
    """The detector worker's check of each event with ``agent_keys`` on (``verify`` hook)."""

    def __init__(self, security: SecuritySection) -> None:
        assert security.secret is not None, "agent_keys requires [security] secret (config.py checks)"
        self.secret = security.secret
        self.max_skew_s = security.max_skew_s
        self._keys: dict[str, str] = {}

    def __call__(self, stream: str, entry_id: bytes, fields: Any, data: bytes, event: dict[str, Any]) -> None:
        agent = event["agent"]
        key = self._keys.get(agent)
        if key is None:
            if len(self._keys) >= _KEY_CACHE_MAX:
                self._keys.clear()
            key = self._keys[agent] = agent_key(self.secret, agent)
        try:
            signed_s = check(key, stream, data, signature_of(fields))
        except BadSignature as exc:
            raise Unauthenticated(
                f"event of agent {agent!r} refused: {exc} ([security] agent_keys: sign with the key "
                "`agentwatch agent-key` prints for it)"
            ) from None
        _check_time(f"event of agent {agent!r}", signed_s, entry_id, self.max_skew_s)


def _check_time(what: str, signed_s: int, entry_id: bytes, max_skew_s: float) -> None:
    """Refuse an entry whose signed time is far from when Redis added it (a replay, or a clock
    that is off). Signed times are whole seconds: one more second of slack."""
    added_s = entry_ms(entry_id) / 1000
    if abs(added_s - signed_s) <= max_skew_s + 1:
        return
    signed = datetime.fromtimestamp(signed_s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    gap = format_duration(abs(added_s - signed_s))
    when = "later" if added_s > signed_s else "earlier"
    raise Unauthenticated(
        f"{what} refused: signed at {signed}, added to the stream {gap} {when}: more than "
        f"[security] max_skew ({format_duration(max_skew_s)}); a replayed entry, or a clock that is off"
    )
