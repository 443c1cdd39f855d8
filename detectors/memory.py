"""Memory: the leak that precedes the OOM kill, caught while there is still time.

Pulses carry the process's RSS. Per agent the batch update keeps the lowest RSS of each time
bucket (``window`` / ``points`` long; the minimum, so GC spikes and short bursts do not look
like growth) and the last ``points`` buckets. Each time a bucket closes, that window is judged
with a Theil-Sen trend (the median of all pairwise slopes: robust to outliers), vectorised with
numpy over every agent judged in the batch. An evaluation is *hot* when

* at least ``min_points`` buckets exist,
* at least ``rising`` of the pairwise slopes are positive (sustained growth, not a sawtooth), and
* the trend reaches ``limit`` within ``horizon`` (or is already past it and still growing).

``fire_after`` hot evaluations in a row open a ``memory`` incident ("RSS 210 MB -> 3.9 GB over
3 days; 4 GB limit in ~2 h"); ``recover_after`` *cool* ones in a row, or a restart, resolve it.
Cool is not merely "not hot": the same test deciding both would flap on a noisy leak whose
projection wanders around the horizon. An evaluation is cool when the growth has plainly
stopped: the trend is flat or falling, or fewer than half of the pairwise slopes rise, or the
limit is more than twice the horizon away (:data:`COOL_HORIZONS`). In between, an evaluation
neither opens nor resolves anything, and breaks both counts.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

import msgpack
import numpy as np
from pydantic import BeforeValidator, Field, PlainSerializer

from agentwatch.config import Seconds, format_duration
from detectors.base import DetectorConfig
from detectors.engine import BuiltinDetector, lua_prelude, register

Severity = Literal["info", "warning", "error", "critical"]

_SIZE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?", re.IGNORECASE)
_SIZE_UNITS: Final = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
                      "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}  # fmt: skip


def parse_bytes(value: object) -> int:
    """``"4GB"`` (10^9), ``"4GiB"``/``"4Gi"`` (2^30), ``"512MB"``, ``1048576`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f'expected a size like "4GB", got {type(value).__name__}')
    match = _SIZE_RE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f'bad size {value!r}: use e.g. "512MB", "4GB", "4GiB"')
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def format_bytes(size: float) -> str:
    """Decimal units, two significant-ish digits: 209715200 -> "210 MB", 3.9e9 -> "3.9 GB"."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(size) >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{size:.0f} B"


def _size_text(size: int) -> str:
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


Bytes = Annotated[int, BeforeValidator(parse_bytes), PlainSerializer(_size_text)]
"""A size key: ``"4GB"`` in the file, bytes in code."""


class MemoryConfig(DetectorConfig):
    limit: Bytes = Field(4 * 10**9, gt=0, description="the RSS the agent must not reach")
    horizon_s: Seconds = Field(6 * 3600.0, alias="horizon", gt=0, description="alert this long before")
    window_s: Seconds = Field(3600.0, alias="window", gt=0, description="the trend is fitted over this")
    points: int = Field(12, ge=3, le=32, description="buckets per window")
    min_points: int = Field(6, ge=3, le=32, description="buckets needed before judging")
    rising: float = Field(0.7, gt=0.5, le=1.0, description="share of rising pairwise slopes")
    fire_after: int = Field(2, ge=1, le=100, description="hot evaluations in a row to fire")
    recover_after: int = Field(3, ge=1, le=100, description="cool evaluations in a row to resolve")
    severity: Severity = "warning"


# Batch update part (detectors/state.py). memory_track runs for every applied segment and keeps
# the run's first/last/peak RSS (the silence alert quotes them even with this detector off);
# memory_flush appends closed buckets to the rss hash and returns the windows to judge.
# fastplan.py (_memory) mirrors memory_track when no bucket closes: keep the two in step.
LUA: Final = """
local MEM_CLOSED, MEM_ORDER, MEM_K = {}, {}, {}
local function memory_track(a, r, p, s, late)
  if s[S_RMS] == 0 or late then return end
  local bucket, extra = p[P_BUCKET], s[S_RSSX]
  for i = -1, extra and #extra or 0, 2 do
    local ms, kb
    if i < 0 then ms, kb = s[S_RMS], s[S_RKB] else ms, kb = extra[i], extra[i + 1] end
    if r.r0 == 0 then r.r0 = kb; r.t0 = ms end
    r.rl = kb
    if kb > r.rpk then r.rpk = kb end
    if p[P_MEM_ON] == 1 then
      local b = math.floor(ms / bucket)
      if r.bk == 0 then r.bk, r.bm = b, kb
      elseif b == r.bk then
        if kb < r.bm then r.bm = kb end
      elseif b > r.bk then
        local list = MEM_CLOSED[a]
        if not list then list = {}; MEM_CLOSED[a] = list; MEM_ORDER[#MEM_ORDER + 1] = a end
        list[#list + 1] = {(r.bk + 1) * bucket, r.bm}
        MEM_K[a] = p[P_POINTS]
        r.bk, r.bm = b, kb
      end
    end
  end
end
local function memory_flush(key, R)
  local out = {}
  for _, a in ipairs(MEM_ORDER) do
    local r = R[a]
    local pts = {}
    local raw = has(r, F_HAS_RSS) and redis.call('HGET', key, a)
    if raw then
      local pos = 1
      while pos + 11 <= #raw do
        local t, kb
        t, kb, pos = struct.unpack('<dI4', raw, pos)
        pts[#pts + 1] = {t, kb}
      end
    end
    for _, pt in ipairs(MEM_CLOSED[a]) do pts[#pts + 1] = pt end
    while #pts > MEM_K[a] do table.remove(pts, 1) end
    local buf = {}
    for i, pt in ipairs(pts) do buf[i] = struct.pack('<dI4', pt[1], math.floor(pt[2])) end
    redis.call('HSET', key, a, table.concat(buf))
    set(r, F_HAS_RSS)
    out[#out + 1] = {a, r.run, pts, r.r0, r.t0, r.rl}
  end
  return out
end
"""

COOL_HORIZONS: Final = 2.0
"""An evaluation projecting the limit further away than this many horizons is cool."""
COOL_RISING: Final = 0.5
"""... and so is one with fewer rising pairwise slopes than this share."""
HOT, BETWEEN, COOL = 2, 1, 0

# Apply verdicts. KEYS: states, intents. ARGV: owner, lease, verdicts (msgpack list of
# [agent, run, verdict (HOT, BETWEEN or COOL), at, fire_after, recover_after, facts]). A verdict
# about a run that has since been replaced is dropped.
_TRANSITION: Final = """
local OWNER, LEASE = ARGV[1], tonumber(ARGV[2])
local V = cmsgpack.unpack(ARGV[3])
for _, v in ipairs(V) do
  local a = v[1]
  local raw = redis.call('HGET', KEYS[1], a)
  if raw then
    local r = rec_load(raw)
    if r.run == v[2] then
      if v[3] == 2 then
        r.mh = math.min(r.mh + 1, 255); r.mc = 0
        if r.mh >= v[5] then open(a, r, F_MEMORY, 'memory', v[4], v[7]) end
      elseif v[3] == 0 then
        r.mc = math.min(r.mc + 1, 255); r.mh = 0
        if r.mc >= v[6] then close(a, r, F_MEMORY, 'memory', v[4], v[7]) end
      else
        r.mh, r.mc = 0, 0
      end
      redis.call('HSET', KEYS[1], a, rec_dump(r))
    end
  end
end
return flush_ops(KEYS[2], OWNER, LEASE)
"""


def theil_sen(t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of (t, y) padded with NaN -> (slope, intercept, share of rising pairs) per row.

    Every row needs at least two points (callers filter).
    """
    i, j = np.triu_indices(t.shape[1], 1)
    dt = t[:, j] - t[:, i]
    dy = y[:, j] - y[:, i]
    valid = ~np.isnan(dt) & (dt != 0)
    slopes = np.where(valid, dy / np.where(valid, dt, 1.0), np.nan)
    slope = np.nanmedian(slopes, axis=1)
    rising = np.sum(valid & (slopes > 0), axis=1) / np.maximum(np.sum(valid, axis=1), 1)
    intercept = np.nanmedian(y - slope[:, None] * t, axis=1)
    return slope, intercept, rising


class Memory(BuiltinDetector[MemoryConfig]):
    """Sustained RSS growth that will reach ``limit`` within ``horizon``."""

    Config = MemoryConfig
    kinds = ("memory",)

    def profile(self, config: DetectorConfig) -> dict[str, Any]:
        assert isinstance(config, MemoryConfig)
        return {
            "mem_on": 1,
            "bucket": max(1.0, config.window_s * 1000 / config.points),
            "points": config.points,
        }

    def evaluate(self, shard: int, windows: list[list[Any]]) -> None:
        """Judge the windows whose bucket just closed; record the verdicts atomically."""
        configs = [self.config.for_agent(w[0]) for w in windows]
        keep = [k for k, w in enumerate(windows) if len(w[2]) >= max(2, configs[k].min_points)]
        verdicts: list[list[Any]] = []
        if keep:
            width = max(len(windows[k][2]) for k in keep)
            t = np.full((len(keep), width), np.nan)
            y = np.full((len(keep), width), np.nan)
            for row, k in enumerate(keep):
                points = np.asarray(windows[k][2], dtype=np.float64)
                t[row, : len(points)] = points[:, 0]
                y[row, : len(points)] = points[:, 1] * 1024.0
            slope, intercept, rising = theil_sen(t, y)  # bytes per ms
            last_t = np.nanmax(t, axis=1)
            level = intercept + slope * last_t
            for row, k in enumerate(keep):
                verdicts.append(
                    self._verdict(windows[k], configs[k], slope[row], level[row], rising[row], last_t[row])
                )
        for k, window in enumerate(windows):
            if k not in keep:  # too few buckets yet: a cool evaluation
                verdicts.append(
                    self._verdict(window, configs[k], 0.0, window[5] * 1024.0, 0.0, window[2][-1][0])
                )
        script = self._script()
        owned = script(
            keys=[self.ctx.keys.states(shard), self.ctx.keys.intents(shard)],
            args=[self.engine.owner, self.engine.lease_ms, msgpack.packb(verdicts)],
        )
        if owned:
            self.engine.publisher.publish(shard, owned)

    def _verdict(  # noqa: PLR0917 - one row of the vectorised fit
        self, window: list[Any], cfg: MemoryConfig, slope: float, level: float, rising: float, at: float
    ) -> list[Any]:
        agent, run, points, r0, t0, rl = window
        horizon_ms = cfg.horizon_s * 1000
        eta_ms = (cfg.limit - level) / slope if slope > 0 else float("inf")
        enough = len(points) >= cfg.min_points
        hot = enough and slope > 0 and rising >= cfg.rising and eta_ms <= horizon_ms
        cool = not enough or slope <= 0 or rising < COOL_RISING or eta_ms > COOL_HORIZONS * horizon_ms
        facts = {
            "r0": r0 * 1024, "t0": t0, "rl": rl * 1024, "level": float(level), "limit": cfg.limit,
            "slope_per_h": float(slope) * 3_600_000, "eta_s": max(0.0, eta_ms / 1000) if hot else -1,
            "at": float(at),
        }  # fmt: skip
        verdict = HOT if hot else COOL if cool else BETWEEN
        return [agent, run, verdict, int(at), cfg.fire_after, cfg.recover_after, facts]

    def _script(self) -> Any:
        script = self.ctx.shared.get("memory-transition")
        if script is None:
            script = self.ctx.shared["memory-transition"] = register(
                self.ctx.client, lua_prelude(), _TRANSITION
            )
        return script

    def render(self, agent: str, kind: str, op: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        f = op["f"]
        severity = self.config.for_agent(agent).severity
        if op["o"] == "r":
            if f.get("restarted"):
                return severity, f"{agent}: restarted (RSS was {format_bytes(f.get('rl', 0))})", {}
            if f.get("shutdown"):
                return severity, f"{agent}: shut down", {}
            return severity, f"{agent}: RSS no longer on course for {format_bytes(f['limit'])}", {
                "rss": f["rl"], "trend_per_h": round(f["slope_per_h"]),
            }  # fmt: skip
        span = format_duration(max(0.0, (f["at"] - f["t0"]) / 1000)) if f["t0"] else "?"
        growth = f"RSS {format_bytes(f['r0'])} -> {format_bytes(f['rl'])} over {span}"
        if f["level"] >= f["limit"]:
            outlook = f"over the {format_bytes(f['limit'])} limit and still growing"
        else:
            outlook = f"{format_bytes(f['limit'])} limit in ~{format_duration(f['eta_s'])}"
        details = {
            "rss": f["rl"], "rss_start": f["r0"], "limit": f["limit"],
            "trend_per_h": round(f["slope_per_h"]), "eta_s": round(f["eta_s"], 1),
        }  # fmt: skip
        return severity, f"{agent}: {growth}; {outlook}", details
