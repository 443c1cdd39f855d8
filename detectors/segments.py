"""A batch of events as *segments*: the events of one agent and one run, folded in Python.

This is the detector worker's hot path. One pass over the batch folds each agent's events into
a few numbers (seq range, first and last event, last beat and pulse, gaps, extend, the exit,
the newest late stack); afterwards numpy folds every agent's token and cost numbers at once (the
EWMA terms, per-window sums). The update script (state.py) then applies a whole segment to the
agent's record in one step, however many events it holds.

Segments travel to Lua as one packed binary string of numbers for the whole batch plus a short
list of the other fields (:func:`pack`): decoding ~40 msgpack values per agent cost more than
the decisions themselves.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgpack
import numpy as np

from agentwatch.codec import Event
from agentwatch.keys import shard_of
from agentwatch.worker import Message

# Segment layout, shared with the update script (Lua indexes are these + 1). The numbers travel as
# one packed binary string for the whole batch (one struct.unpack per segment in Lua, instead of
# decoding ~40 msgpack values); the few other fields as a msgpack list.
SEGMENT_NUMBERS: Final = (
    "PROFILE", "RUN", "LO", "HI", "FIRST", "LAST", "START", "IV", "CHILD", "BEAT", "NBEAT", "PULSE",
    "XU", "XBEAT", "STACKMS", "PGAP", "GA", "GB", "FBEAT", "PBF", "PSB", "BA", "BB",
    "TN", "TSUM", "TMAX", "TW", "CN", "CSUM", "CMAX", "CW", "FPH", "FPC", "WS", "WT", "RMS", "RKB",
    "INDEX",
)  # fmt: skip
SEGMENT_OTHERS: Final = ("AGENT", "EXIT", "FPTEXT", "FPX", "RSSX", "STACK", "WINX")
(S_PROFILE, S_RUN, S_LO, S_HI, S_FIRST, S_LAST, S_START, S_IV, S_CHILD, S_BEAT, S_NBEAT, S_PULSE,
 S_XU, S_XBEAT, S_STACKMS, S_PGAP, S_GA, S_GB, S_FBEAT, S_PBF, S_PSB, S_BA, S_BB,
 S_TN, S_TSUM, S_TMAX, S_TW, S_CN, S_CSUM, S_CMAX, S_CW, S_FPH, S_FPC, S_WS, S_WT, S_RMS, S_RKB,
 S_INDEX, S_AGENT, S_EXIT, S_FPTEXT, S_FPX, S_RSSX, S_STACK, S_WINX) = range(45)  # fmt: skip
# GA..GB: the longest gap between two events of the segment; BA..BB: the longest gap between
# two beats with a pulse in between; FBEAT: the first beat; PBF: a pulse came before it; PSB: a
# pulse came since the last beat (bookkeeping for BA..BB). TN..TW and CN..CW: the tokens and
# cost folds (count, sum, max, EWMA term; count 0: none). Lists are run-length encoded and start
# in numbers, so the common segment (one beat, one pulse) carries no list at all: FPH/FPC/FPTEXT
# the first run of equal fingerprints and FPX the others ([hash, count, text, ...]); WS/WT the
# tokens of the first rate window and WINX the others; RMS/RKB the first RSS sample (KiB) and
# RSSX the others. INDEX: position in the batch.
_NUMBERS: Final = len(SEGMENT_NUMBERS)
_SEGMENT: Final = struct.Struct("<" + "d" * _NUMBERS)
FP_TEXT_CHARS: Final = 80
"""How much of a looping fingerprint the loop alert quotes."""

_run_hashes: dict[str, int] = {}


def run_hash(run: str) -> int:
    """48 bits of BLAKE2b: exact as a Lua number, the same on every worker."""
    value = _run_hashes.get(run)
    if value is None:
        value = int.from_bytes(hashlib.blake2b(run.encode(), digest_size=6).digest(), "big")
        if len(_run_hashes) > 100_000:
            _run_hashes.clear()
        _run_hashes[run] = value
    return value


def fp_hash(fp: str) -> int:
    """A fingerprint's crc32, never 0 (0 means "this beat had no fingerprint")."""
    return zlib.crc32(fp.encode()) or 1


def build_segments(
    messages: Sequence[Message[Event]],
    profile_of: Callable[[str], int],
    alphas: Sequence[float],
    windows: Sequence[float],
) -> list[list[Any]]:
    """Fold a batch into segments (one per agent and run, in order of first appearance).

    This is the worker's hot path: one pass, a handful of dict lookups per event. The token
    and cost EWMA terms are computed afterwards for the whole batch at once with numpy.
    """
    segs: dict[tuple[str, str], list[Any]] = {}
    order: list[list[Any]] = []
    tok_seg: list[int] = []
    tok_val: list[int] = []
    tok_ms: list[int] = []
    cost_seg: list[int] = []
    cost_val: list[float] = []
    for entry_id, ev in messages:
        agent = ev["agent"]
        run = ev["run"]
        key = (agent, run)
        seg = segs.get(key)
        ms = int(entry_id[: entry_id.index(b"-")])
        seq = ev["seq"]
        if seg is None:
            seg = [profile_of(agent), run_hash(run), seq, seq, ms, ms, 0, -1, 0, 0, 0, 0,
                   0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                   0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, len(order),
                   agent, False, False, False, False, False, False]  # fmt: skip
            segs[key] = seg
            order.append(seg)
        else:
            if seq > seg[S_HI]:
                seg[S_HI] = seq
            elif seq < seg[S_LO]:
                seg[S_LO] = seq
            if ms - seg[S_LAST] > seg[S_GB] - seg[S_GA]:
                seg[S_GA] = seg[S_LAST]
                seg[S_GB] = ms
            seg[S_LAST] = ms
        kind = ev["kind"]
        extend = ev.get("extend")
        if kind == "beat":
            if not seg[S_BEAT]:
                seg[S_FBEAT] = ms
            elif seg[S_PSB] and ms - seg[S_BEAT] > seg[S_BB] - seg[S_BA]:
                seg[S_BA] = seg[S_BEAT]
                seg[S_BB] = ms
            seg[S_PSB] = 0
            seg[S_BEAT] = ms
            seg[S_NBEAT] += 1
            # A beat ends any extension announced before it (PROTOCOL.md: extend).
            seg[S_XU] = ms + int(extend * 1000) if extend else 0
            seg[S_XBEAT] = 1
            seg[S_STACK] = False
            tokens = ev.get("tokens")
            if tokens is None and ("tokens_in" in ev or "tokens_out" in ev):
                tokens = ev.get("tokens_in", 0) + ev.get("tokens_out", 0)
            if tokens is not None:
                tok_seg.append(seg[S_INDEX])
                tok_val.append(tokens)
                tok_ms.append(ms)
            cost = ev.get("cost")
            if cost is not None:
                cost_seg.append(seg[S_INDEX])
                cost_val.append(cost)
            fp = ev.get("fp")
            _add_fp(seg, fp)
            continue
        if extend:
            seg[S_XU] = max(seg[S_XU], ms + int(extend * 1000))
        if kind == "pulse":
            if seg[S_PULSE]:
                seg[S_PGAP] = ms - seg[S_PULSE]
            seg[S_PULSE] = ms
            if seg[S_BEAT]:
                seg[S_PSB] = 1
            else:
                seg[S_PBF] = 1
            rss = ev.get("rss")
            if rss is not None:
                if not seg[S_RMS]:
                    seg[S_RMS] = ms
                    seg[S_RKB] = rss // 1024
                elif seg[S_RSSX] is False:
                    seg[S_RSSX] = [ms, rss // 1024]
                else:
                    seg[S_RSSX] += (ms, rss // 1024)
            stack = ev.get("stack")
            if stack:
                seg[S_STACK] = stack
                seg[S_STACKMS] = ms
        elif kind == "start":
            seg[S_START] = ms
            interval = ev.get("interval")
            seg[S_IV] = float(interval) if interval is not None else -1
            seg[S_CHILD] = 1 if "parent" in ev else 0
        else:  # exit
            seg[S_EXIT] = [ms, ev.get("reason", "exit"), ev.get("code", 0), ev.get("error") or "",
                           ev.get("traceback") or ""]  # fmt: skip
    if tok_seg:
        _fold(order, tok_seg, tok_val, S_TN, alphas)
        _windows(order, tok_seg, tok_ms, tok_val, windows)
    if cost_seg:
        _fold(order, cost_seg, cost_val, S_CN, alphas)
    return order


def _add_fp(seg: list[Any], fp: str | None) -> None:
    """Run-length encode the beats' fingerprints (hash 0: a beat without one)."""
    h = (zlib.crc32(fp.encode()) or 1) if fp else 0
    extra = seg[S_FPX]
    if not seg[S_FPC]:
        seg[S_FPH], seg[S_FPC], seg[S_FPTEXT] = h, 1, fp[:FP_TEXT_CHARS] if fp else ""
    elif extra is False:
        if seg[S_FPH] == h:
            seg[S_FPC] += 1
        else:
            seg[S_FPX] = [h, 1, fp[:FP_TEXT_CHARS] if fp else ""]
    elif extra[-3] == h:
        extra[-2] += 1
    else:
        extra += (h, 1, fp[:FP_TEXT_CHARS] if fp else "")


def _fold(
    order: list[list[Any]], seg_ids: list[int], values: Sequence[float], slot: int, alphas: Sequence[float]
) -> None:
    """Per segment, from ``slot`` on: n, sum, max, W where W = sum_i alpha (1-alpha)^(n-1-i) x_i.

    With the EWMA numerator b and weight w kept in the record, k beats fold in as
    b' = (1-alpha)^k b + W and w' = (1-alpha)^k w + 1 - (1-alpha)^k: the script applies a whole
    batch of an agent's beats in two multiplications.
    """
    seg = np.asarray(seg_ids, dtype=np.int64)
    x = np.asarray(values, dtype=np.float64)
    count = len(order)
    n = np.bincount(seg, minlength=count)
    # stable sort by segment: each segment's beats become one run, still in stream order
    sorter = np.argsort(seg, kind="stable")
    xs, ss = x[sorter], seg[sorter]
    ends = np.cumsum(n)
    from_end = ends[ss] - 1 - np.arange(len(ss))  # beats after this one in its segment
    if len(alphas) == 1:
        alpha: Any = alphas[0]
    else:
        profile = np.fromiter((order[i][S_PROFILE] for i in range(count)), dtype=np.int64, count=count)
        alpha = np.asarray(alphas, dtype=np.float64)[profile - 1][ss]
    weighted = np.bincount(ss, weights=alpha * np.power(1.0 - alpha, from_end) * xs, minlength=count)
    total = np.bincount(ss, weights=xs, minlength=count)
    present = n > 0
    starts = (ends - n)[present]
    top = np.maximum.reduceat(xs, starts) if len(starts) else np.zeros(0)
    for i, k, s, t, w in zip(np.flatnonzero(present).tolist(), n[present].tolist(), total[present].tolist(),
                             top.tolist(), weighted[present].tolist(), strict=True):  # fmt: skip
        order[i][slot : slot + 4] = (k, s, t, w)


def _windows(
    order: list[list[Any]], seg_ids: list[int], times: list[int], values: list[int], widths: Sequence[float]
) -> None:
    """Per segment: tokens per rate window, [window start, tokens, ...] in time order, so that a
    batch holding many of an agent's beats (a backlog) still closes every window it spans."""
    seg = np.asarray(seg_ids, dtype=np.int64)
    if len(widths) == 1:
        width: Any = int(widths[0])
    else:
        profile = np.fromiter((order[i][S_PROFILE] for i in seg_ids), dtype=np.int64, count=len(seg_ids))
        width = np.asarray(widths, dtype=np.int64)[profile - 1]
    start = np.asarray(times, dtype=np.int64) // width * width
    # one key per (segment, window); keys sort by segment, then time
    key = seg * (1 << 44) + (start - int(start.min()))
    keys, inverse = np.unique(key, return_inverse=True)
    sums = np.bincount(inverse, weights=np.asarray(values, dtype=np.float64))
    index_of = (keys >> 44).tolist()
    start_of = ((keys & ((1 << 44) - 1)) + int(start.min())).tolist()
    for index, window_start, total in zip(index_of, start_of, sums.tolist(), strict=True):
        row = order[index]
        if not row[S_WS]:
            row[S_WS], row[S_WT] = window_start, total
        elif row[S_WINX] is False:
            row[S_WINX] = [window_start, total]
        else:
            row[S_WINX] += (window_start, total)


def group_by_shard(segments: list[list[Any]], shards: int) -> dict[int, list[list[Any]]]:
    if shards <= 1:
        return {0: segments} if segments else {}
    out: dict[int, list[list[Any]]] = {}
    for seg in segments:
        out.setdefault(shard_of(seg[S_AGENT], shards), []).append(seg)
    return out


def pack(segments: list[list[Any]]) -> bytes:
    """[numbers of every segment as one binary string, the other fields of every segment]."""
    pack_numbers = _SEGMENT.pack
    numbers = b"".join([pack_numbers(*seg[:_NUMBERS]) for seg in segments])
    others = [value for seg in segments for value in seg[_NUMBERS:]]
    packed: bytes = msgpack.packb([numbers, others], use_bin_type=False)  # Lua: no bin type
    return packed


def segment_lua() -> str:
    names = [*SEGMENT_NUMBERS, *SEGMENT_OTHERS]
    lines = [f"local S_{name} = {i + 1}" for i, name in enumerate(names)]
    lines.append(
        f"local SEG_FORMAT, SEG_NUMBERS, SEG_OTHERS = '<{'d' * _NUMBERS}', {_NUMBERS}, {len(SEGMENT_OTHERS)}"
    )
    lines.append(f"local SEG_SIZE = {_SEGMENT.size}")
    return "\n".join(lines)
