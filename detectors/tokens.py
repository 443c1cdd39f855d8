"""Token anomalies and work loops: the runaway that burns money while every beat looks healthy.

**tokens** — each agent has a baseline: an exponentially weighted moving average of tokens per
beat (and of cost per beat, where beats carry ``cost``), with span ``warmup`` (so
``alpha = 2 / (warmup + 1)``) and bias-corrected, so it is usable from the first beats. After
``warmup`` beats an observation is anomalous when

* one beat uses more than ``factor`` x the baseline and at least ``min_tokens`` (or
  ``min_cost``): a floor, so 2 -> 40 tokens is not an incident; or
* the tokens of the current ``window`` exceed ``factor`` x what the baseline rate (tokens per
  second of past windows) predicts for a whole window, and ``min_tokens``: many normal-sized
  beats in quick succession.

``fire_after`` anomalous observations in a row open the incident; it resolves after
``recover_after`` beats in a row back under ``recover_factor`` x the baseline. The baseline never
learns while an incident is open or from an anomalous beat, so a runaway cannot become normal.

**loop** — the same ``fp`` (work-item fingerprint) on ``repeat`` beats in a row: an agent retrying
one item forever. Its own incident (detector name ``loop``, dedup key ``<agent>/loop``), configured
here; it resolves after ``recover_after`` beats without that fingerprint, or on a restart.

Both decisions run inside the batch update (detectors/state.py), in the Lua function below,
atomically per agent; Python only folds each batch's beats per agent with numpy.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import Field

from agentwatch.config import Seconds, format_duration
from detectors.base import DetectorConfig
from detectors.engine import BuiltinDetector

Severity = Literal["info", "warning", "error", "critical"]


class TokensConfig(DetectorConfig):
    factor: float = Field(10.0, gt=1, description="x the baseline is anomalous")
    warmup: int = Field(20, ge=1, le=100_000, description="beats before judging; the EWMA span")
    min_tokens: int = Field(500, ge=0, description="absolute floor for a beat or a window")
    min_cost: float = Field(0.10, ge=0, description="absolute floor for a beat's cost (USD)")
    window_s: Seconds = Field(60.0, alias="window", gt=0, description="short window for the rate check")
    fire_after: int = Field(1, ge=1, le=1000, description="anomalous observations in a row to fire")
    recover_after: int = Field(5, ge=1, le=10_000, description="normal beats in a row to resolve")
    recover_factor: float = Field(2.0, gt=0, description="a beat under this x baseline is normal")
    repeat: int = Field(20, ge=2, le=1_000_000, description="same fp this many beats in a row: loop")
    loop: bool = Field(True, description="raise loop incidents at all")
    severity: Severity = "error"


# Called by the batch update for each applied segment of the agent's current run. fastplan.py
# (_tokens, _loop) mirrors what it does when nothing fires: keep the two in step.
LUA: Final = """
local function ewma(num, weight, alpha, n, folded)
  local decay = n == 1 and 1 - alpha or math.pow(1 - alpha, n)
  return decay * num + folded, decay * weight + 1 - decay
end
local function tokens_apply(a, r, p, s, late)
  local tn, tsum, tmax, tw = s[S_TN], s[S_TSUM], s[S_TMAX], s[S_TW]
  local cn, csum, cmax, cw = s[S_CN], s[S_CSUM], s[S_CMAX], s[S_CW]
  local tok, cost = tn > 0, cn > 0
  if tok then r.tt = r.tt + tsum end
  if cost then r.ct = r.ct + csum end
  if p[P_TOK_ON] == 1 and (tok or cost) then
    local base_t = r.tw > 0 and r.tb / r.tw or 0
    local base_c = r.cw > 0 and r.cb / r.cw or 0
    local factor = p[P_FACTOR]
    local warm = r.tn >= p[P_WARMUP]
    local hot, facts = false, nil
    local at = s[S_BEAT] > 0 and s[S_BEAT] or s[S_LAST]
    if warm and tok and tmax >= p[P_MIN_TOKENS] and tmax > factor * base_t then
      hot = true
      facts = {why = 'beat', tokens = tmax, base = base_t, factor = factor}
    elseif warm and cost and cmax >= p[P_MIN_COST] and cmax > factor * base_c then
      hot = true
      facts = {why = 'cost', cost = cmax, base = base_c, factor = factor}
    end
    local w, extra = p[P_WINDOW], s[S_WINX]
    if s[S_WS] > 0 and not late then
      for i = -1, extra and #extra or 0, 2 do
        local start, sum
        if i < 0 then start, sum = s[S_WS], s[S_WT] else start, sum = extra[i], extra[i + 1] end
        if start > r.ws then
          -- close the window; empty windows in between are not folded in, so a burst after an
          -- idle spell is compared with the rate while busy, not with one diluted by idling
          if r.ws > 0 and r.wt > 0 and not hot and not has(r, F_TOKENS) then
            r.rb, r.rw = ewma(r.rb, r.rw, p[P_ALPHA], 1, p[P_ALPHA] * r.wt * 1000 / w)
            r.rn = math.min(r.rn + 1, 65535)
          end
          r.ws, r.wt = start, 0
        end
        if start == r.ws then r.wt = r.wt + sum end
        if warm and not hot and r.rn >= 2 and r.rw > 0 then
          local expected = r.rb / r.rw * w / 1000
          if r.wt >= p[P_MIN_TOKENS] and r.wt > factor * expected then
            hot = true
            facts = {why = 'rate', tokens = r.wt, base = expected, factor = factor, window = w}
          end
        end
      end
    end
    local n = tok and tn or cn
    if hot then
      r.hot = math.min(r.hot + 1, 65535)
      r.calm = 0
      if r.hot >= p[P_FIRE_AFTER] then
        facts.total = r.tt
        open(a, r, F_TOKENS, 'tokens', at, facts)
      end
    else
      r.hot = 0
      if has(r, F_TOKENS) then
        local calm = (not tok or tmax <= p[P_RECOVER_FACTOR] * base_t)
          and (not cost or cmax <= p[P_RECOVER_FACTOR] * base_c)
        if calm then r.calm = math.min(r.calm + n, 65535) else r.calm = 0 end
        if r.calm >= p[P_RECOVER_AFTER] then
          r.calm = 0
          close(a, r, F_TOKENS, 'tokens', at, {base = base_t, tokens = tok and tmax or 0, total = r.tt})
        end
      end
    end
    if not hot and not has(r, F_TOKENS) then
      if tok then r.tb, r.tw = ewma(r.tb, r.tw, p[P_ALPHA], tn, tw) end
      if cost then r.cb, r.cw = ewma(r.cb, r.cw, p[P_ALPHA], cn, cw) end
      r.tn = math.min(r.tn + n, 4e9)
    end
  end
  local fpx = s[S_FPX]
  if s[S_FPC] > 0 and not late and p[P_LOOP_ON] == 1 then
    for i = -2, fpx and #fpx or 0, 3 do
      local h, c, text
      if i < 0 then h, c, text = s[S_FPH], s[S_FPC], s[S_FPTEXT]
      else h, c, text = fpx[i], fpx[i + 1], fpx[i + 2] end
      if h ~= 0 and h == r.fp then r.fc = math.min(r.fc + c, 4e9) else r.fp = h; r.fc = c end
      if has(r, F_LOOP) then
        if h == r.lf then r.lq = 0 else r.lq = math.min(r.lq + c, 65535) end
      elseif h ~= 0 and r.fc >= p[P_REPEAT] then
        r.lf = h; r.lq = 0
        open(a, r, F_LOOP, 'loop', s[S_BEAT], {fp = text, count = r.fc})
      end
    end
    if has(r, F_LOOP) and r.lq >= p[P_LOOP_RECOVER] then
      close(a, r, F_LOOP, 'loop', s[S_BEAT], {count = r.fc, quiet = r.lq})
      r.lf, r.lq = 0, 0
    end
  end
end
"""


def _n(value: float) -> str:
    if value >= 10_000:
        return f"{value:,.0f}"
    return f"{value:,.1f}".removesuffix(".0")


class Tokens(BuiltinDetector[TokensConfig]):
    """Anomalous token (or cost) use per beat or per short window; and work loops (``loop``)."""

    Config = TokensConfig
    kinds = ("tokens", "loop")

    def profile(self, config: DetectorConfig) -> dict[str, Any]:
        assert isinstance(config, TokensConfig)
        return {
            "tok_on": 1,
            "factor": config.factor,
            "min_tokens": config.min_tokens,
            "min_cost": config.min_cost,
            "warmup": config.warmup,
            "alpha": 2.0 / (config.warmup + 1),
            "fire_after": config.fire_after,
            "recover_after": config.recover_after,
            "recover_factor": config.recover_factor,
            "window": config.window_s * 1000,
            "loop_on": 1 if config.loop else 0,
            "repeat": config.repeat,
            "loop_recover": config.recover_after,
        }

    def render(self, agent: str, kind: str, op: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        f = op["f"]
        cfg = self.config.for_agent(agent)
        if kind == "loop":
            if op["o"] == "f":
                summary = (
                    f"{agent}: work loop: the same work item (fp {f['fp']!r}) {f['count']} beats in a row"
                )
                return cfg.severity, summary, {"fp": f["fp"], "count": f["count"]}
            if f.get("shutdown"):
                return cfg.severity, f"{agent}: shut down while looping", {}
            if f.get("restarted"):
                return cfg.severity, f"{agent}: restarted; the loop is over", {}
            return cfg.severity, f"{agent}: work items vary again", {"count": f.get("count", 0)}
        if op["o"] == "f":
            why = f["why"]
            details = {
                "why": why,
                "factor": f["factor"],
                "baseline": round(f["base"], 3),
                "total_tokens": f["total"],
            }
            if why == "beat":
                ratio = f["tokens"] / f["base"] if f["base"] else float("inf")
                summary = (f"{agent}: token use {_n(f['tokens'])} in one beat, {ratio:,.0f}x its "
                           f"baseline of {_n(f['base'])}/beat")  # fmt: skip
                details["tokens"] = f["tokens"]
            elif why == "cost":
                ratio = f["cost"] / f["base"] if f["base"] else float("inf")
                summary = (f"{agent}: ${f['cost']:.2f} in one beat, {ratio:,.0f}x its baseline of "
                           f"${f['base']:.3f}/beat")  # fmt: skip
                details["cost"] = f["cost"]
            else:
                window = format_duration(f["window"] / 1000)
                summary = (f"{agent}: {_n(f['tokens'])} tokens in under {window}, over "
                           f"{f['factor']:g}x the usual {_n(f['base'])} per {window}")  # fmt: skip
                details["tokens"] = f["tokens"]
                details["window_s"] = f["window"] / 1000
            return cfg.severity, summary, details
        if f.get("shutdown"):
            return cfg.severity, f"{agent}: shut down", {}
        return (
            cfg.severity,
            f"{agent}: token use back near its baseline of {_n(f['base'])}/beat",
            {
                "baseline": round(f["base"], 3),
                "total_tokens": f.get("total", 0),
            },
        )
