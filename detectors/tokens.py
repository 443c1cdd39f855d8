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
``recover_after`` calm beats in a row: each back under ``recover_factor`` x the baseline, and the
tokens of the last window-length (sliding over the current and the previous window) back under
``recover_factor`` x what the baseline rate predicts, so a runaway of normal-sized beats cannot
look calm at the start of every window. The baseline never learns while an incident is open or
from an anomalous beat, so a runaway cannot become normal.

Beats are judged one by one, in stream order, whatever the batches: a batch holding many of an
agent's beats (a backlog, a busy agent) decides what one beat per batch would have. Beats that
arrive late (another worker applied later ones first) count in their own rate window if it is
still the current one or the one closed last.

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
    halt: bool = Field(False, description="halt the agent when a tokens incident fires (it stops itself)")


# Called by the batch update for each applied segment of the agent's current run. fastplan.py
# (_tokens, _loop) mirrors what it does when nothing fires: keep the two in step.
#
# The reference is one beat at a time, in stream order (tok_beat): what a worker applying one
# event per batch decides, so that how the stream is cut into batches cannot change a verdict.
# A segment of several usage beats is folded at once (tok_fold: the baselines learn all of them
# in two multiplications) only where tok_safe proves that judging them one by one would decide
# nothing: no incident open, and no beat or window that could be anomalous against any baseline
# the beats before it could have left (the EWMA is a weighted mean: it never drops below the
# smaller of the old baseline and the beats learned). Otherwise the script walks BEATX, the
# segment's usage beats one by one.
LUA: Final = """
local TOK_MARGIN = 1 - 1e-9  -- rounding in a fold of many beats cannot cross a threshold
local function ewma(num, weight, alpha, n, folded)
  local decay = n == 1 and 1 - alpha or math.pow(1 - alpha, n)
  return decay * num + folded, decay * weight + 1 - decay
end
local function tok_close(rb, rw, rn, alpha, w, folds, at, tokens)
  -- the window starting `at` closes with `tokens` in it: folded into the rate baseline when
  -- `folds` (and it had tokens); returns the baseline and the window closed last (pws, pwt)
  local fold = folds and tokens > 0
  if fold then
    rb, rw = ewma(rb, rw, alpha, 1, alpha * tokens * 1000 / w)
    rn = math.min(rn + 1, 65535)
  end
  return rb, rw, rn, fold and at or -at, tokens
end
local function tok_step(v, alpha, w, start, sum, folds)
  -- One step of the rate windows on v = {ws, wt, rb, rw, rn, pws, pwt}: the current window (ws,
  -- wt), a baseline of tokens per second over closed windows (rb / rw, rn of them) and the
  -- window closed last (pws, negative when it was not folded; pwt). Empty windows in between are
  -- not folded in, so a burst after an idle spell is compared with the rate while busy, not with
  -- one diluted by idling. ``folds``: closing a window may fold it (no anomaly, nothing open).
  local ws, wt, rb, rw, rn, pws, pwt = v[1], v[2], v[3], v[4], v[5], v[6], v[7]
  if start > ws then
    if ws > 0 then rb, rw, rn, pws, pwt = tok_close(rb, rw, rn, alpha, w, folds, ws, wt) end
    ws, wt = start, 0
  end
  if start == ws then
    wt = wt + sum
  elseif start > math.abs(pws) then
    -- Late beats (another worker applied their successors first) of a window this record
    -- never opened: it closes now, in its place (after the windows closed before it).
    rb, rw, rn, pws, pwt = tok_close(rb, rw, rn, alpha, w, folds, start, sum)
  elseif start == math.abs(pws) then
    -- late beats of the window closed last: they count there, and in the rate it was folded
    -- into (exactly: that fold is linear in its tokens)
    pwt = pwt + sum
    if pws > 0 then rb = rb + alpha * sum * 1000 / w end
  end  -- older: its window's rate is long folded
  v[1], v[2], v[3], v[4], v[5], v[6], v[7] = ws, wt, rb, rw, rn, pws, pwt
end
local function tok_window(r, p, start, sum, hot)
  local v = {r.ws, r.wt, r.rb, r.rw, r.rn, r.pws, r.pwt}
  tok_step(v, p[P_ALPHA], p[P_WINDOW], start, sum, not hot and not has(r, F_TOKENS))
  r.ws, r.wt, r.rb, r.rw, r.rn, r.pws, r.pwt = v[1], v[2], v[3], v[4], v[5], v[6], v[7]
end
local function tok_expected(r, p)
  -- tokens per window at the baseline rate, once two windows have closed (else nil)
  if r.rn >= 2 and r.rw > 0 then return r.rb / r.rw * p[P_WINDOW] / 1000 end
  return nil
end
local function tok_recent(r, w, at)
  -- the tokens of the last window-length before `at`: the current window's and the share of
  -- the window closed last that overlaps it (a sliding window, so a burst that goes on into a
  -- fresh window does not look calm at the window's start)
  local cur = math.min(1, math.max(0, (r.ws + 2 * w - at) / w))
  local prev = math.min(1, math.max(0, (math.abs(r.pws) + 2 * w - at) / w))
  return r.wt * cur + r.pwt * prev
end
local function tok_learn(r, p, t, c)
  local alpha = p[P_ALPHA]
  if t then r.tb, r.tw = ewma(r.tb, r.tw, alpha, 1, alpha * t) end
  if c then r.cb, r.cw = ewma(r.cb, r.cw, alpha, 1, alpha * c) end
  r.tn = math.min(r.tn + 1, 4e9)
end
local function tok_beat(a, r, p, at, start, t, c, late)
  -- One beat: t tokens and c cost (nil: not given), at Redis time `at`, in rate window `start`;
  -- `late`: applied after beats that came after it (another worker had them first).
  if t then r.tt = r.tt + t end
  if c then r.ct = r.ct + c end
  local base_t = r.tw > 0 and r.tb / r.tw or 0
  local base_c = r.cw > 0 and r.cb / r.cw or 0
  local factor = p[P_FACTOR]
  local warm = r.tn >= p[P_WARMUP]
  local hot, facts = false, nil
  if warm and t and t >= p[P_MIN_TOKENS] and t > factor * base_t then
    hot = true
    facts = {why = 'beat', tokens = t, base = base_t, factor = factor}
  elseif warm and c and c >= p[P_MIN_COST] and c > factor * base_c then
    hot = true
    facts = {why = 'cost', cost = c, base = base_c, factor = factor}
  end
  if t and start > 0 then
    tok_window(r, p, start, t, hot)
    local expected = warm and not hot and tok_expected(r, p)
    if expected and r.wt >= p[P_MIN_TOKENS] and r.wt > factor * expected then
      hot = true
      facts = {why = 'rate', tokens = r.wt, base = expected, factor = factor, window = p[P_WINDOW]}
    end
  end
  if late and (has(r, F_TOKENS) or at <= r.tx) then
    -- An incident open now, or one that ended after this beat, already told of this stretch:
    -- a late beat neither fires it again nor counts towards (or against) its recovery.
    if not hot and not has(r, F_TOKENS) then tok_learn(r, p, t, c) end
    return
  end
  if hot then
    r.hot = math.min(r.hot + 1, 65535)
    r.calm = 0
    if r.hot >= p[P_FIRE_AFTER] then
      facts.total = r.tt
      if open(a, r, F_TOKENS, 'tokens', at, facts) and facts.why == 'cost' then set(r, F_TOKENS_COST) end
    end
  else
    r.hot = 0
    if has(r, F_TOKENS) then
      -- calm: this beat back under recover_factor x the baselines, and so is the rate of the
      -- last window-length (a rate runaway is made of normal-sized beats)
      local rf = p[P_RECOVER_FACTOR]
      local calm = (not t or t <= rf * base_t) and (not c or c <= rf * base_c)
      local expected = calm and tok_expected(r, p)
      if expected and tok_recent(r, p[P_WINDOW], at) > rf * expected then calm = false end
      if calm then r.calm = math.min(r.calm + 1, 65535) else r.calm = 0 end
      if r.calm >= p[P_RECOVER_AFTER] then
        r.calm = 0
        local cost = has(r, F_TOKENS_COST)
        clear(r, F_TOKENS_COST)
        close(a, r, F_TOKENS, 'tokens', at, {base = cost and base_c or base_t, cost = cost and 1 or 0,
          tokens = t or 0, total = r.tt})
        r.tx = at
      end
    end
  end
  if not hot and not has(r, F_TOKENS) then tok_learn(r, p, t, c) end
end
local function tok_windows(s)
  -- the segment's rate windows as {start, tokens, start, tokens, ...}
  local out = {s[S_WS], s[S_WT]}
  local extra = s[S_WINX]
  if extra then for i = 1, #extra do out[#out + 1] = extra[i] end end
  return out
end
local function tok_safe(r, p, s)
  -- Would judging the segment's beats one by one decide nothing? (see above)
  if has(r, F_TOKENS) then return false end
  if r.tn + s[S_UN] - 1 < p[P_WARMUP] then return true end  -- no beat is judged before the last
  local factor = p[P_FACTOR]
  if s[S_TN] > 0 and s[S_TMAX] >= p[P_MIN_TOKENS] then
    local low = math.min(s[S_TMIN], r.tw > 0 and r.tb / r.tw or 0)
    if s[S_TMAX] > factor * low * TOK_MARGIN then return false end
  end
  if s[S_CN] > 0 and s[S_CMAX] >= p[P_MIN_COST] then
    local low = math.min(s[S_CMIN], r.cw > 0 and r.cb / r.cw or 0)
    if s[S_CMAX] > factor * low * TOK_MARGIN then return false end
  end
  if s[S_WS] > 0 then  -- the windows as tok_fold will step them, on a copy
    local v = {r.ws, r.wt, r.rb, r.rw, r.rn, r.pws, r.pwt}
    local alpha, w, list = p[P_ALPHA], p[P_WINDOW], tok_windows(s)
    for i = 1, #list, 2 do
      tok_step(v, alpha, w, list[i], list[i + 1], true)
      local wt, rb, rw = v[2], v[3], v[4]
      if v[5] >= 2 and rw > 0 and wt >= p[P_MIN_TOKENS] then
        if wt > factor * (rb / rw * w / 1000) * TOK_MARGIN then return false end
      end
    end
  end
  return true
end
local function tok_fold(r, p, s)
  -- Several beats at once, where tok_safe holds: the same records as one by one, up to rounding.
  local tn, cn = s[S_TN], s[S_CN]
  if tn > 0 then r.tt = r.tt + s[S_TSUM] end
  if cn > 0 then r.ct = r.ct + s[S_CSUM] end
  if s[S_WS] > 0 then
    local list = tok_windows(s)
    for i = 1, #list, 2 do tok_window(r, p, list[i], list[i + 1], false) end
  end
  r.hot = 0
  if tn > 0 then r.tb, r.tw = ewma(r.tb, r.tw, p[P_ALPHA], tn, s[S_TW]) end
  if cn > 0 then r.cb, r.cw = ewma(r.cb, r.cw, p[P_ALPHA], cn, s[S_CW]) end
  r.tn = math.min(r.tn + s[S_UN], 4e9)
end
local function loop_apply(a, r, p, s)
  -- Runs of equal fingerprints, in order; each run is judged whole (the decisions are those of
  -- its beats one by one: a run either reaches `repeat`, or ends the quiet count, or not).
  local fpx = s[S_FPX]
  for i = -2, fpx and #fpx or 0, 3 do
    local h, c, text
    if i < 0 then h, c, text = s[S_FPH], s[S_FPC], s[S_FPTEXT]
    else h, c, text = fpx[i], fpx[i + 1], fpx[i + 2] end
    if h ~= 0 and h == r.fp then r.fc = math.min(r.fc + c, 4e9) else r.fp = h; r.fc = c end
    if has(r, F_LOOP) then
      if h == r.lf then r.lq = 0 else r.lq = math.min(r.lq + c, 65535) end
      if r.lq >= p[P_LOOP_RECOVER] then
        close(a, r, F_LOOP, 'loop', s[S_BEAT], {count = r.fc, quiet = r.lq})
        r.lf, r.lq = 0, 0
      end
    end
    if not has(r, F_LOOP) and h ~= 0 and r.fc >= p[P_REPEAT] then
      r.lf = h; r.lq = 0
      open(a, r, F_LOOP, 'loop', s[S_BEAT], {fp = text, count = r.fc})
    end
  end
end
local function tokens_apply(a, r, p, s, late)
  local tn, cn = s[S_TN], s[S_CN]
  if p[P_TOK_ON] ~= 1 then
    if tn > 0 then r.tt = r.tt + s[S_TSUM] end
    if cn > 0 then r.ct = r.ct + s[S_CSUM] end
  elseif s[S_UN] > 0 and not s[S_BEATX] then  -- one beat (segments.py sends BEATX for more)
    tok_beat(a, r, p, s[S_BEAT], s[S_WS], tn > 0 and s[S_TSUM] or nil, cn > 0 and s[S_CSUM] or nil, late)
  elseif s[S_UN] > 0 then
    if tok_safe(r, p, s) then
      tok_fold(r, p, s)
    else
      local list, w = s[S_BEATX], p[P_WINDOW]
      for i = 1, #list, 3 do
        local at, t, c = list[i], list[i + 1], list[i + 2]
        tok_beat(a, r, p, at, math.floor(at / w) * w, t >= 0 and t or nil, c >= 0 and c or nil, late)
      end
    end
  end
  if s[S_FPC] > 0 and not late and p[P_LOOP_ON] == 1 then loop_apply(a, r, p, s) end
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
            "window": max(1.0, float(round(config.window_s * 1000))),  # whole ms: fold.rate_windows
            "loop_on": 1 if config.loop else 0,
            "repeat": config.repeat,
            "loop_recover": config.recover_after,
        }

    def _halt(self, agent: str, why: str) -> None:
        """``halt = true``: stop the runaway in its own loop (once: not when a halt covers it)."""
        halts = self.engine.halts
        if not halts.halting(agent):
            halts.add(agent, why.removeprefix(f"{agent}: "), by="tokens")

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
            if cfg.halt:
                self._halt(agent, summary)
            return cfg.severity, summary, details
        if f.get("shutdown"):
            return cfg.severity, f"{agent}: shut down", {}
        details = {"baseline": round(f["base"], 3), "total_tokens": f.get("total", 0)}
        if f.get("cost"):
            return cfg.severity, f"{agent}: cost back near its baseline of ${f['base']:.3f}/beat", details
        return cfg.severity, f"{agent}: token use back near its baseline of {_n(f['base'])}/beat", details
