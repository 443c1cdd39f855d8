"""Error rate: fire when at least ``fire_at`` of an agent's last ``window`` beats carry ``ok=False``.

A complete agentwatch detector in one file, written the way the docs recommend
(docs/writing-a-detector.md):

* **State in Redis, updated atomically.** Each agent's last ``window`` outcomes are a bit mask
  in one hash per shard (``Keys.detector(shard, "errorrate")``); one Lua script per batch
  shifts the new outcomes in. Any number of workers can share the load.
* **Idempotent.** Beats carry a per-run ``seq``; the script remembers the highest one applied, so
  a batch delivered twice (a worker died before acknowledging it) changes nothing.
* **Level-triggered alerts.** After each update the detector looks at the *current* failure
  share and asks for the incident to be open or closed. ``Incidents.fire`` does nothing for an
  incident already open, ``resolve`` nothing for one already closed, so a decision lost to a
  crash, or two workers deciding in the wrong order, is put right by the next beat.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from pydantic import Field

from agentwatch.codec import entry_ms
from agentwatch.keys import shard_of
from detectors.base import Detector, DetectorConfig, Event, Message

__all__ = ["ErrorRate", "ErrorRateConfig"]


class ErrorRateConfig(DetectorConfig):
    window: int = Field(20, ge=1, le=52, description="judge this many of the agent's last beats")
    fire_at: float = Field(0.5, gt=0, le=1, description="fire when this share of them failed")
    resolve_at: float = Field(0.25, ge=0, lt=1, description="resolve when the share drops to this")
    severity: str = Field("warning", pattern="^(info|warning|error|critical)$")


# KEYS[1]: the shard's errorrate hash. ARGV[1]: window; then per agent: name, run, then the
# beats as seq/outcome pairs, terminated by "". Returns [agent, failures, beats seen, ...].
# State per agent: "run seq mask count" (mask: 1 bits are failures, newest lowest).
_UPDATE: Final = """
local window = tonumber(ARGV[1])
local full = 2 ^ window
local out = {}
local i = 2
while i <= #ARGV do
  local agent, run = ARGV[i], ARGV[i + 1]
  i = i + 2
  local raw = redis.call('HGET', KEYS[1], agent)
  local old_run, hw, mask, seen = '', -1, 0, 0
  if raw then
    local a, b, c, d = string.match(raw, '^(%S+) (%S+) (%S+) (%S+)$')
    old_run, hw, mask, seen = a, tonumber(b), tonumber(c), tonumber(d)
  end
  if old_run ~= run then hw = -1 end  -- a new run: its seqs start again; the window carries on
  while ARGV[i] ~= '' do
    local seq, failed = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
    if seq > hw then  -- not applied before
      mask = (mask * 2 + failed) % full
      seen = math.min(seen + 1, window)
      hw = seq
    end
    i = i + 2
  end
  i = i + 1
  redis.call('HSET', KEYS[1], agent, run .. ' ' .. hw .. ' ' .. mask .. ' ' .. seen)
  local failures, m = 0, mask
  while m > 0 do failures = failures + m % 2; m = math.floor(m / 2) end
  out[#out + 1] = agent
  out[#out + 1] = failures
  out[#out + 1] = seen
end
return out
"""


class ErrorRate(Detector[ErrorRateConfig]):
    """Too many failed beats among the last ones (beat meta ``ok=False``)."""

    Config = ErrorRateConfig

    def on_start(self) -> None:
        self._update = self.ctx.client.register_script(_UPDATE)

    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        # Per shard, per agent: (run, [(seq, failed)]) of the beats that say how they went.
        shards: dict[int, dict[str, tuple[str, list[tuple[int, int]]]]] = {}
        last_ms: dict[str, int] = {}
        for entry_id, event in messages:
            ok = event.get("ok")
            if event["kind"] != "beat" or not isinstance(ok, bool):
                continue
            agent = event["agent"]
            agents = shards.setdefault(shard_of(agent, self.ctx.keys.shards), {})
            run, outcomes = agents.setdefault(agent, (event["run"], []))
            if event["run"] != run:  # the agent restarted within this batch: keep the newest run
                agents[agent] = (event["run"], outcomes := [])
            outcomes.append((event["seq"], 0 if ok else 1))
            last_ms[agent] = entry_ms(entry_id)
        for shard, agents in shards.items():
            args: list[Any] = [self.config.window]
            for agent, (run, outcomes) in agents.items():
                args += [agent, run, *[v for pair in outcomes for v in pair], ""]
            reply = self._update(keys=[self.ctx.keys.detector(shard, "errorrate")], args=args)
            for k in range(0, len(reply), 3):
                agent = reply[k].decode()
                self._judge(agent, int(reply[k + 1]), int(reply[k + 2]), last_ms[agent])

    def _judge(self, agent: str, failures: int, seen: int, at_ms: int) -> None:
        config = self.config.for_agent(agent)
        share = failures / config.window
        if failures and share >= config.fire_at:
            self.ctx.incidents.fire(
                agent,
                self.name,
                severity=config.severity,
                summary=f"{agent}: {failures} of its last {seen} beats failed (ok=False)",
                at_ms=at_ms,
                details={"failures": failures, "beats": seen, "share": round(share, 3)},
            )
        elif share <= config.resolve_at:
            self.ctx.incidents.resolve(
                agent,
                self.name,
                summary=f"{agent}: failures down to {failures} of its last {seen} beats",
                at_ms=at_ms,
            )
