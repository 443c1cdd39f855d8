"""The update script's ``apply()`` (state.py, with tokens.py's and memory.py's parts) in numpy,
restricted to segments for which it decides nothing: see fastpath.py for why that is exact.

Each step below mirrors the script's statement of the same meaning, with the same float64
operations in the same order, so the results round identically; float32 record fields are
rounded once, when the record is packed, as ``struct.pack`` does in Lua. Where the script would
do anything more than arithmetic (open or close an incident, fold a closed RSS bucket, take a
late batch, store a stack, judge beats one by one), ``Plan.ok`` is False and the segment goes to
the script.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, NamedTuple

import numpy as np

from detectors import layout as lo
from detectors import record
from detectors.segments import Segments
from detectors.state import PROFILE

_NUMPY: Final = {"B": "u1", "H": "<u2", "I": "<u4", "f": "<f4", "d": "<f8"}
DTYPE: Final = np.dtype([(name, _NUMPY[code]) for name, code, _ in record.FIELDS])
"""A record (record.FIELDS) as a numpy structured type: a batch of records decodes in one call."""
assert DTYPE.itemsize == record.SIZE
P: Final = {name: i for i, name in enumerate(PROFILE)}
_UINT32: Final = 2.0**32
_FLOAT32_SAFE: Final = 3.4e38  # rounds to a finite float32
TOK_MARGIN: Final = 1 - 1e-9
"""tokens.LUA's TOK_MARGIN."""

PowOf = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(alpha, n) -> (1 - alpha)^n as the server's ``math.pow`` computes it (fastpath.Decays)."""


class Plan(NamedTuple):
    """What the fast path writes for the candidates it keeps (``ok``)."""

    ok: np.ndarray
    records: np.ndarray  # DTYPE, the new records of the kept candidates
    due: np.ndarray  # per kept candidate: new timer score (0: none), or -1 to remove it
    seen: np.ndarray  # per kept candidate: new fleet-index score (0: none)


class Columns:
    """The candidates' segment numbers, column by column (layout.S_*): a view where the
    candidates are every segment (one shard, nothing left out), else a gathered copy."""

    def __init__(self, numbers: np.ndarray, rows: np.ndarray) -> None:
        self.numbers, self.rows = numbers, rows
        self.every = len(rows) == len(numbers)  # rows are sorted and distinct: then all of them
        self._cache: dict[int, np.ndarray] = {}

    def __getitem__(self, k: int) -> np.ndarray:
        found = self._cache.get(k)
        if found is None:
            found = self._cache[k] = self.numbers[:, k] if self.every else self.numbers[self.rows, k]
        return found


class Step(NamedTuple):
    s: Columns  # the segments' numbers
    p: np.ndarray  # their profiles (state.PROFILE), a row per candidate
    segs: Segments
    rows: np.ndarray  # the candidates' rows in segs


def decay(pow_of: PowOf, alpha: np.ndarray, n: np.ndarray) -> np.ndarray:
    """tokens.LUA ``ewma``'s decay: 1 - alpha for one beat, else math.pow(1 - alpha, n)."""
    out = 1.0 - alpha
    many = n != 1
    if many.any():
        out[many] = pow_of(alpha[many], n[many])
    return out


def plan_batch(  # noqa: PLR0917 - one batch's inputs
    old: np.ndarray,
    segs: Segments,
    rows: np.ndarray,
    profiles: np.ndarray,
    pow_of: PowOf,
    into: np.ndarray | None = None,
) -> Plan:
    """The update script's ``apply()`` for segments ``rows`` on records ``old`` (one each),
    restricted to what it does when nothing happens; ``ok`` marks where that is all it does.
    ``into``: bytes (rows of record.SIZE, at least len(old)) to build the new records in."""
    s = Columns(segs.numbers, rows)
    r = {name: old[name].astype(np.float64) for name in DTYPE.names or ()}
    p = profiles[s[lo.S_PROFILE].astype(np.int64) - 1]
    step = Step(s, p, segs, rows)
    on = {name: p[:, P[name]] == 1 for name in ("sil_on", "stall_on", "tok_on", "loop_on", "mem_on")}
    flags = old["flags"]

    # The script's class must be CUR, applied in order, with no flag it would act on.
    ok = (r["run"] != 0) & (r["run"] == s[lo.S_RUN]) & (s[lo.S_LO] > r["hw"])
    ok &= (flags & ~np.uint32(record.HAS_RSS | record.NO_SILENCE)) == 0
    ok &= ((flags & np.uint32(record.NO_SILENCE)) != 0) == ~on["sil_on"]  # else the script sets it
    # retro_gaps: SIGHT only shortens the gaps it measures, so with SIGHT = 0 these bound them.
    gap = np.maximum(s[lo.S_FIRST] - np.maximum(r["seen"], r["xu"]), s[lo.S_GB] - s[lo.S_GA])
    ok &= ~on["sil_on"] | (gap <= r["sa"])
    gap = np.maximum(s[lo.S_FBEAT] - np.maximum(np.maximum(r["beat"], r["start"]), r["xu"]),
                     s[lo.S_BB] - s[lo.S_BA])  # fmt: skip
    ok &= ~on["stall_on"] | (s[lo.S_FBEAT] <= 0) | (gap <= r["ta"])

    new = dict(r)
    hw = r["hw"]
    gapped = (hw >= 0) & (s[lo.S_LO] > hw + 1)
    new["g2a"], new["g2b"] = np.where(gapped, r["g1a"], r["g2a"]), np.where(gapped, r["g1b"], r["g2b"])
    new["g1a"], new["g1b"] = np.where(gapped, hw + 1, r["g1a"]), np.where(gapped, s[lo.S_LO], r["g1b"])
    new["hw"] = s[lo.S_HI]
    new["seen"] = np.where(s[lo.S_LAST] > r["seen"], s[lo.S_LAST], r["seen"])
    new["beat"] = np.where(s[lo.S_BEAT] > r["beat"], s[lo.S_BEAT], r["beat"])
    # live_from(): back after a gap in which nothing proved the process alive (the class is CUR)
    live = np.maximum(np.where(r["pg"] > 0, 2.5 * r["pg"], r["sa"] / 2), r["ta"] / 2)  # dead_after()
    back = np.where((r["seen"] > 0) & (s[lo.S_FIRST] - r["seen"] > live), s[lo.S_FIRST], 0.0)
    back = np.where(s[lo.S_GB] - s[lo.S_GA] > live, np.maximum(back, s[lo.S_GB]), back)
    pulsed = s[lo.S_PULSE] > r["pulse"]
    since = np.where(r["pulse"] > 0, s[lo.S_PULSE] - r["pulse"], 0.0)
    pgap = np.where(s[lo.S_PGAP] > 0, s[lo.S_PGAP], since)
    learnt = pulsed & (pgap > 0) & ((back == 0) | (pgap <= live))
    new["pg"] = np.where(learnt, pgap, r["pg"])
    new["pulse"] = np.where(pulsed, s[lo.S_PULSE], r["pulse"])
    xu = s[lo.S_XU]
    new["xu"] = np.where(s[lo.S_XBEAT] == 1, np.where(s[lo.S_BEAT] >= r["beat"], xu, r["xu"]),
                         np.where(xu > r["xu"], xu, r["xu"]))  # fmt: skip
    new["xu"] = np.maximum(new["xu"], back)
    new["iv"] = np.where(s[lo.S_IV] >= 0, s[lo.S_IV], r["iv"])  # a pulse repeating the interval
    new["sa"] = np.maximum(p[:, P["sil_after"]], 3000 * new["iv"])
    new["ta"] = np.maximum(p[:, P["stall_after"]], 3000 * new["iv"])
    new["bt"] = r["bt"] + s[lo.S_NBEAT]
    ok &= _memory(new, step, on["mem_on"])
    ok &= _tokens(new, step, on["tok_on"], pow_of)
    ok &= _loop(new, step, on["loop_on"])

    due = np.where(on["sil_on"], np.maximum(new["seen"], new["xu"]) + new["sa"], 0.0)
    td = np.maximum(np.maximum(new["beat"], r["start"]), new["xu"]) + new["ta"]
    stall = on["stall_on"] & (new["pulse"] > new["beat"]) & ((due == 0) | (td < due))
    due = np.where(stall, td, due)
    armed = r["armed"]
    write = np.where(
        due == 0, np.where(armed > 0, -1.0, 0.0), np.where((armed == 0) | (due < armed), due, 0.0)
    )
    new["armed"] = np.where(due == 0, 0.0, np.where(write > 0, due, armed))
    indexed = new["seen"] - r["idx"] >= 1000
    new["idx"] = np.where(indexed, new["seen"], r["idx"])

    changed = [name for name in DTYPE.names or () if new[name] is not r[name]]
    for name in changed:  # what the record can hold (the checks above keep it so; cheap to be sure)
        values = new[name]
        if DTYPE[name].kind == "u":
            ok &= (values >= 0) & (values < _UINT32) & (values == np.floor(values))
        elif DTYPE[name].kind == "f" and DTYPE[name].itemsize == 4:
            ok &= np.abs(values) <= _FLOAT32_SAFE  # also False for nan
    kept = np.flatnonzero(ok)
    target = None if into is None else into[: len(kept)]
    rows_out = np.take(old.view(np.uint8).reshape(len(old), record.SIZE), kept, axis=0, out=target)
    out = rows_out.view(DTYPE).reshape(-1)
    for name in changed:
        out[name] = new[name][ok].astype(DTYPE[name])
    return Plan(ok, out, write[ok], np.where(indexed, new["seen"], 0.0)[ok])


def _items(
    arrays: tuple[np.ndarray, ...], width: int, segs: Segments, rows: np.ndarray
) -> tuple[np.ndarray, ...]:
    """The items of segments ``rows`` in ``arrays`` (windows, runs or RSS samples: ``width``
    arrays, the first the segment, sorted by it), as (candidate, rank in its segment, *the rest)."""
    if not arrays:
        return tuple(np.zeros(0, dtype=np.int64) for _ in range(width + 1))
    position = np.full(len(segs), -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    of = position[arrays[0]]
    chosen = np.flatnonzero(of >= 0)
    of = of[chosen]
    first = np.ones(len(of), dtype=bool)
    first[1:] = of[1:] != of[:-1]
    if first.all():  # one item per segment (one beat per agent): every rank is 0
        return (of, np.zeros(len(of), dtype=np.int64), *(a[chosen] for a in arrays[1:]))
    starts = np.flatnonzero(first)
    rank = np.arange(len(of)) - np.repeat(starts, np.diff(np.append(starts, len(of))))
    return (of, rank, *(a[chosen] for a in arrays[1:]))


def _memory(new: dict[str, np.ndarray], step: Step, on: np.ndarray) -> np.ndarray:
    """memory_track() when no RSS bucket closes (a closed bucket is judged: not the fast path)."""
    s, p, segs, rows = step
    ok = np.ones(len(rows), dtype=bool)
    of, rank, ms, kb_int = _items(segs.rss, 3, segs, rows)
    if not len(of):
        return ok
    n, kb = len(rows), kb_int.astype(np.float64)
    has = s[lo.S_RMS] != 0  # the script's test; the same segments as those with samples
    firsts = np.flatnonzero(rank == 0)
    lasts = np.append(firsts[1:], len(of)) - 1
    bucket = np.floor(ms / p[of, P["bucket"]])
    kb0, ms0, b0, last, top = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    kb0[of[firsts]], ms0[of[firsts]], b0[of[firsts]] = kb[firsts], ms[firsts], bucket[firsts]
    last[of[lasts]] = kb[lasts]
    np.maximum.at(top, of, kb)
    ok &= top < _UINT32
    init = has & (new["r0"] == 0)
    zero = np.zeros(n, dtype=bool)
    zero[of[kb == 0]] = True
    ok &= ~(init & zero)  # a first RSS of 0 KiB leaves r0 "unset" for the next sample: the script's
    new["r0"], new["t0"] = np.where(init, kb0, new["r0"]), np.where(init, ms0, new["t0"])
    new["rl"] = np.where(has, last, new["rl"])
    new["rpk"] = np.where(has, np.maximum(new["rpk"], top), new["rpk"])
    tracked = has & on
    current = np.where(new["bk"] == 0, b0, new["bk"])  # an empty bucket takes the first sample's
    closing = np.zeros(n, dtype=bool)
    closing[of[(bucket > current[of]) | (bucket == 0)]] = True  # 0: "no bucket yet" to the script
    ok &= ~(tracked & closing)
    low = np.where(new["bk"] == 0, np.inf, new["bm"])
    same = bucket == current[of]
    np.minimum.at(low, of[same], kb[same])
    new["bk"] = np.where(tracked, current, new["bk"])
    new["bm"] = np.where(tracked, low, new["bm"])
    return ok


def _ewma(
    num: np.ndarray, weight: np.ndarray, decay: np.ndarray, folded: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """tokens.LUA ``ewma`` with its decay given, in its order of operations."""
    return decay * num + folded, decay * weight + 1 - decay


def _tokens(new: dict[str, np.ndarray], step: Step, on: np.ndarray, pow_of: PowOf) -> np.ndarray:
    """tokens_apply() where tok_safe() holds (judging the beats one by one would decide nothing)
    and so the script folds them (tok_fold; one beat: tok_beat, the same arithmetic then)."""
    s, p, segs, rows = step
    tn, tsum, tmax, tw = (s[k] for k in (lo.S_TN, lo.S_TSUM, lo.S_TMAX, lo.S_TW))
    cn, csum, cmax, cw = (s[k] for k in (lo.S_CN, lo.S_CSUM, lo.S_CMAX, lo.S_CW))
    tok, cost = tn > 0, cn > 0
    new["tt"] = np.where(tok, new["tt"] + tsum, new["tt"])
    new["ct"] = np.where(cost, new["ct"] + csum, new["ct"])
    active = on & (tok | cost)
    if not active.any():
        return np.ones(len(rows), dtype=bool)
    alpha, factor, w = p[:, P["alpha"]], p[:, P["factor"]], p[:, P["window"]]
    # tok_safe: no beat judged before the last, or none anomalous against any baseline reachable
    judged = new["tn"] + s[lo.S_UN] - 1 >= p[:, P["warmup"]]
    base_t = np.divide(new["tb"], new["tw"], out=np.zeros(len(rows)), where=new["tw"] > 0)
    base_c = np.divide(new["cb"], new["cw"], out=np.zeros(len(rows)), where=new["cw"] > 0)
    low_t, low_c = np.minimum(s[lo.S_TMIN], base_t), np.minimum(s[lo.S_CMIN], base_c)
    hot = judged & tok & (tmax >= p[:, P["min_tokens"]]) & (tmax > factor * low_t * TOK_MARGIN)
    hot |= judged & cost & (cmax >= p[:, P["min_cost"]]) & (cmax > factor * low_c * TOK_MARGIN)
    of, rank, start, total = _items(segs.windows, 3, segs, rows)
    windowed = active & (s[lo.S_WS] > 0)
    ws, wt, rb, rw, rn, pws, pwt = (new[k].copy() for k in ("ws", "wt", "rb", "rw", "rn", "pws", "pwt"))
    for k in range(int(rank.max()) + 1 if len(rank) else 0):  # tok_window, window by window
        at = np.flatnonzero((rank == k) & windowed[of])
        c: Any = of[at]
        begin, tokens = start[at], total[at]
        if len(c) == len(rows):  # every candidate (in order): whole columns, no gathering
            c = slice(None)
        closes, had = begin > ws[c], ws[c] > 0
        hot[c] |= begin < ws[c]  # a window older than the current one: never in order; the script's
        folds = closes & had & (wt[c] > 0)  # (a hot or firing segment is refused whatever it folds)
        a = alpha[c]
        rb_new, rw_new = _ewma(rb[c], rw[c], 1 - a, a * wt[c] * 1000 / w[c])
        rb[c], rw[c] = np.where(folds, rb_new, rb[c]), np.where(folds, rw_new, rw[c])
        rn[c] = np.where(folds, np.minimum(rn[c] + 1, 65535), rn[c])
        pws[c] = np.where(closes & had, np.where(folds, ws[c], -ws[c]), pws[c])
        pwt[c] = np.where(closes & had, wt[c], pwt[c])
        ws[c], wt[c] = np.where(closes, begin, ws[c]), np.where(closes, 0, wt[c])
        wt[c] = np.where(begin == ws[c], wt[c] + tokens, wt[c])
        rated = judged[c] & (rn[c] >= 2) & (rw[c] > 0)
        expected = np.divide(rb[c], rw[c], out=np.zeros(len(at)), where=rated) * w[c] / 1000
        hot[c] |= rated & (wt[c] >= p[c, P["min_tokens"]]) & (wt[c] > factor[c] * expected * TOK_MARGIN)
    new.update(ws=ws, wt=wt, rb=rb, rw=rw, rn=rn, pws=pws, pwt=pwt)
    new["hot"] = np.where(active, 0, new["hot"])
    learn = active & tok
    if learn.any():
        tb, tw_new = _ewma(new["tb"], new["tw"], decay(pow_of, alpha, np.where(learn, tn, 1)), tw)
        new["tb"], new["tw"] = np.where(learn, tb, new["tb"]), np.where(learn, tw_new, new["tw"])
    learn = active & cost
    if learn.any():
        cb, cw_new = _ewma(new["cb"], new["cw"], decay(pow_of, alpha, np.where(learn, cn, 1)), cw)
        new["cb"], new["cw"] = np.where(learn, cb, new["cb"]), np.where(learn, cw_new, new["cw"])
    new["tn"] = np.where(active, np.minimum(new["tn"] + s[lo.S_UN], 4e9), new["tn"])
    ok: np.ndarray = ~(active & hot)
    return ok


def _loop(new: dict[str, np.ndarray], step: Step, on: np.ndarray) -> np.ndarray:
    """The loop part of tokens_apply() when no fingerprint repeats ``repeat`` times."""
    s, p, segs, rows = step
    active = on & (s[lo.S_FPC] > 0)
    if not active.any():
        return np.ones(len(rows), dtype=bool)
    repeat = p[:, P["repeat"]]
    h1, c1 = s[lo.S_FPH], s[lo.S_FPC]
    same = (h1 != 0) & (h1 == new["fp"])
    fc = np.where(same, np.minimum(new["fc"] + c1, 4e9), c1)
    hot = (h1 != 0) & (fc >= repeat)
    fp = h1.copy()
    of, rank, _, length, h = _items(segs.runs, 4, segs, rows)
    later = np.flatnonzero(rank > 0)  # consecutive runs differ: each later run starts afresh
    if len(later):
        c, hl, cl = of[later], h[later].astype(np.float64), length[later].astype(np.float64)
        hot[c[(hl != 0) & (cl >= repeat[c])]] = True
        last = np.append(c[1:] != c[:-1], True)  # each segment's last run sets fp and fc
        fp[c[last]], fc[c[last]] = hl[last], cl[last]
    new["fp"], new["fc"] = np.where(active, fp, new["fp"]), np.where(active, fc, new["fc"])
    ok: np.ndarray = ~(active & hot)
    return ok
