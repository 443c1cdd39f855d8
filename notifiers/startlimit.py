"""Start limits for the restart notifier, after systemd's ``StartLimitBurst``/``StartLimitIntervalSec``.

Per agent, the times of its recent restarts (within the interval) and the alert each answered.
One Lua step decides, so two workers handling two alerts of the same agent (say ``exit`` and then
``silence`` for one crash) never both restart it:

* ``done`` - the agent was already restarted after this alert fired, for another alert;
* ``loop`` - ``burst`` restarts within the interval: stop restarting, raise "restart loop";
* ``wait`` - too soon after the previous restart: the n-th restart in the window waits
  ``backoff * 2**(n-2)`` (capped at ``backoff_max``) after the one before began, so a crash loop
  slows down (the 2nd waits ``backoff``, the 3rd twice that...);
* ``go``   - recorded as started now; run the command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from agentwatch.keys import Keys
from agentwatch.redisconn import Client

_RESERVE: Final = """
local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local agent, alert_id, alert_at = ARGV[1], ARGV[2], tonumber(ARGV[3])
local burst, interval = tonumber(ARGV[4]), tonumber(ARGV[5])
local backoff, backoff_max = tonumber(ARGV[6]), tonumber(ARGV[7])
local raw = redis.call('HGET', KEYS[1], agent)
local kept = {}
if raw then
  for _, e in ipairs(cjson.decode(raw)) do
    if e['ms'] > now - interval then table.insert(kept, e) end
  end
end
for _, e in ipairs(kept) do
  if e['ms'] >= alert_at and e['alert'] ~= alert_id then return {'done', now, e['ms'], #kept} end
end
if #kept >= burst then return {'loop', now, 0, #kept} end
if #kept > 0 then
  local need = math.min(backoff_max, backoff * 2 ^ (#kept - 1))
  local ready = kept[#kept]['ms'] + need
  if now < ready then return {'wait', now, math.ceil(ready - now), #kept} end
end
table.insert(kept, {ms = now, alert = alert_id})
redis.call('HSET', KEYS[1], agent, cjson.encode(kept))
return {'go', now, 0, #kept}
"""


@dataclass(frozen=True)
class Decision:
    verdict: str  # go | wait | loop | done
    now_ms: int
    value_ms: int  # wait: ms to wait; done: when the earlier restart happened
    restarts: int  # restarts in the window, including this one when it is "go"


class StartLimit:
    def __init__(self, client: Client, keys: Keys, notifier: str, *, burst: int, interval_s: float,
                 backoff_s: float, backoff_max_s: float) -> None:  # fmt: skip
        self.client: Any = client
        self.key = keys.notifier_starts(notifier)
        self.args = [burst, int(interval_s * 1000), int(backoff_s * 1000), int(backoff_max_s * 1000)]
        self._reserve = self.client.register_script(_RESERVE)

    def reserve(self, agent: str, alert_id: str, alert_at_ms: int) -> Decision:
        reply = self._reserve(keys=[self.key], args=[agent, alert_id, alert_at_ms, *self.args])
        verdict = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        return Decision(verdict, int(reply[1]), int(reply[2]), int(reply[3]))

    def looping(self, agent: str, trigger: str) -> None:
        """Remember which detector's alert hit the limit: its recovery ends the loop."""
        self.client.hset(self.key, _loop_field(agent), trigger)

    def loop_trigger(self, agent: str) -> str | None:
        """The detector that hit the limit, or None if not known (a worker died in between)."""
        raw = self.client.hget(self.key, _loop_field(agent))
        return raw.decode() if isinstance(raw, bytes) else raw

    def forget(self, agent: str) -> None:
        """A fresh budget (after the agent recovered from a restart loop)."""
        self.client.hdel(self.key, agent, _loop_field(agent))


def _loop_field(agent: str) -> str:
    return f"{agent}|loop"  # "|" cannot occur in an agent name (codec.AGENT_RE)
