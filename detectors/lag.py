"""Pipeline self-health: when the detectors fall behind, say so once instead of paging for every
agent.

Each tick the engine measures how far the detector workers are behind: Redis time minus the
*horizon* (the oldest event not yet applied: undelivered, or delivered but not acknowledged).
While they are behind, silence and stall checks only judge deadlines before the horizon (see
timers.py), so agents that kept beating through a worker outage are not declared dead while
their beats wait in the stream. Instead, one ``lag`` incident for the agent ``agentwatch``:

* fires when the lag exceeds ``after``, or when a tick finds nobody ran the checks for longer
  than ``after`` (every worker, or Redis itself, was down: checks then restart from the end of
  the gap, see ``blind_after`` and timers.py);
* resolves once the lag has stayed under ``after`` / 2 for ``recover``.

And one ``trimmed`` incident (same agent) when events were trimmed from a stream before the
detectors read them (a flooding agent, a small ``MAXLEN``, workers down for longer than the
retention: horizon.py tells), counted in ``trimmed`` of the pipeline agent's clock hash; it
resolves once the detectors caught up and lost nothing more for ``recover``.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import Field

from agentwatch.alerts import PIPELINE_AGENT
from agentwatch.config import Seconds, format_duration
from agentwatch.keys import shard_of
from detectors import intents
from detectors.base import DetectorConfig
from detectors.engine import BuiltinDetector
from detectors.horizon import Positions

Severity = Literal["info", "warning", "error", "critical"]


class LagConfig(DetectorConfig):
    # Above [worker] claim_idle (30 s) plus a reclaim round: a SIGKILLed worker's unacknowledged
    # batch holds the horizon back until another worker takes it over, and that alone should not page.
    after_s: Seconds = Field(60.0, alias="after", gt=0, description="detectors this far behind: alert")
    recover_s: Seconds = Field(5.0, alias="recover", ge=0, description="under after/2 this long: resolved")
    blind_after_s: Seconds = Field(
        5.0, alias="blind_after", gt=0, description="no check for this long: restart checks from now"
    )
    severity: Severity = "error"


# KEYS: clock of the pipeline agent's shard, its intents. ARGV: owner, lease, now, behind ms,
# gap ms, waiting, after ms, recover ms, agent, then per event stream its losses in all (-1:
# not known now; horizon.py). Returns the owned intents keys.
_CHECK: Final = """
local OWNER, LEASE = ARGV[1], tonumber(ARGV[2])
local now, behind, gap, waiting = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local after, recover, agent = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
local st = redis.call('HMGET', KEYS[1], 'lag_open', 'lag_ok', 'lag_peak')
local is_open, ok, peak = st[1] == '1', tonumber(st[2]) or 0, tonumber(st[3]) or 0
if not is_open then
  if behind > after or gap > after then
    emit(agent, 'lag', 'f', now, {behind = behind, gap = gap, waiting = waiting})
    redis.call('HSET', KEYS[1], 'lag_open', 1, 'lag_ok', 0, 'lag_peak', math.max(behind, gap))
  end
else
  if behind > peak then redis.call('HSET', KEYS[1], 'lag_peak', behind); peak = behind end
  if behind <= after / 2 then
    if ok == 0 then ok = now; redis.call('HSET', KEYS[1], 'lag_ok', ok) end
    if now - ok >= recover then
      emit(agent, 'lag', 'r', now, {behind = behind, peak = peak})
      redis.call('HSET', KEYS[1], 'lag_open', 0, 'lag_ok', 0, 'lag_peak', 0)
    end
  elseif ok ~= 0 then
    redis.call('HSET', KEYS[1], 'lag_ok', 0)
  end
end
-- Trimmed unread: each stream's losses only grow, so what exceeds its high-water mark is new.
local new = 0
for i = 10, #ARGV do
  local lost, mark = tonumber(ARGV[i]), 'trim_mark:' .. (i - 10)
  if lost >= 0 then
    local seen = tonumber(redis.call('HGET', KEYS[1], mark)) or 0
    if lost > seen then new = new + lost - seen; redis.call('HSET', KEYS[1], mark, lost) end
  end
end
local t = redis.call('HMGET', KEYS[1], 'trim_open', 'trim_ok', 'trim_n')
local t_open, t_ok, t_n = t[1] == '1', tonumber(t[2]) or 0, tonumber(t[3]) or 0
if new > 0 then
  redis.call('HINCRBY', KEYS[1], 'trimmed', new)
  if not t_open then emit(agent, 'trimmed', 'f', now, {count = new}) end
  redis.call('HSET', KEYS[1], 'trim_open', 1, 'trim_ok', 0, 'trim_n', t_n + new)
elseif t_open and behind <= after / 2 then
  if t_ok == 0 then t_ok = now; redis.call('HSET', KEYS[1], 'trim_ok', t_ok) end
  if now - t_ok >= recover then
    emit(agent, 'trimmed', 'r', now, {count = t_n})
    redis.call('HSET', KEYS[1], 'trim_open', 0, 'trim_ok', 0, 'trim_n', 0)
  end
elseif t_open and t_ok ~= 0 then
  redis.call('HSET', KEYS[1], 'trim_ok', 0)
end
return flush_ops(KEYS[2], OWNER, LEASE)
"""


class Lag(BuiltinDetector[LagConfig]):
    """Detector workers behind (or down): one pipeline alert instead of an alert storm."""

    Config = LagConfig
    kinds = ("lag", "trimmed")

    def check(self, now_ms: int, behind_ms: int, gap_ms: int, positions: Positions) -> None:
        script = self.ctx.shared.get("lag-check")
        if script is None:
            script = self.ctx.shared["lag-check"] = self.ctx.client.register_script(intents.LUA_EMIT + _CHECK)
        shard = shard_of(PIPELINE_AGENT, self.ctx.keys.shards)
        cfg = self.config
        owned = script(
            keys=[self.ctx.keys.clock(shard), self.ctx.keys.intents(shard)],
            args=[self.engine.owner, self.engine.lease_ms, now_ms, behind_ms, gap_ms, positions.waiting,
                  int(cfg.after_s * 1000), int(cfg.recover_s * 1000), PIPELINE_AGENT,
                  *(-1 if lost is None else lost for lost in positions.lost)],
        )  # fmt: skip
        if owned:
            self.engine.publisher.publish(shard, owned)

    def render(self, agent: str, kind: str, op: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        f = op["f"]
        if kind == "trimmed":
            count = int(f["count"])
            if op["o"] == "r":
                summary = f"agentwatch pipeline caught up; {count:,} events were trimmed unread in all"
                return self.config.severity, summary, {"trimmed": count}
            summary = (
                f"agentwatch pipeline lost events: {count:,} events were trimmed before detectors read them: "
                "raise the producers' MAXLEN (AGENTWATCH_MAXLEN) or add detector workers"
            )
            return self.config.severity, summary, {"trimmed": count}
        if op["o"] == "r":
            return (
                self.config.severity,
                (
                    f"agentwatch pipeline caught up (detectors {format_duration(f['behind'] / 1000)} behind, "
                    f"at worst {format_duration(f['peak'] / 1000)})"
                ),
                {"behind_s": f["behind"] / 1000, "peak_s": f["peak"] / 1000},
            )
        details = {"behind_s": f["behind"] / 1000, "gap_s": f["gap"] / 1000, "waiting": f["waiting"]}
        if f["gap"] > f["behind"]:
            gap = format_duration(f["gap"] / 1000)
            summary = (f"agentwatch pipeline lagging: no detector worker ran for {gap}; "
                       "silence and stall checks restart from now")  # fmt: skip
        else:
            behind = format_duration(f["behind"] / 1000)
            summary = (f"agentwatch pipeline lagging: detector workers are {behind} "
                       f"behind ({f['waiting']:,} events waiting); silence and stall alerts held back "
                       "until they catch up")  # fmt: skip
        return self.config.severity, summary, details
