"""A batch of events as *segments*: the events of one agent and one run, folded in Python.

This is the detector worker's hot path. The batch is read column by column (C-level passes
over the event dicts, no Python loop per event), and every number of every segment is computed
with numpy for the whole batch at once (fold.py): the order statistics (first and last event,
last beat and pulse, gaps) and the token and cost folds (the EWMA terms, per-window sums).

A segment holding anything but beats and pulses (a start, an exit, a stack, an extend) is
*complex*: it is folded event by event instead (eventfold.py, the fold every segment used to
get), and only the token folds come from the arrays. Such segments are rare. The update
script (state.py), or the fast path (fastpath.py), then applies a whole segment to the agent's
record in one step, however many events it holds.

The layout of a segment is in layout.py. Its numbers live in one float64 matrix (a row per
segment), so packing them for Lua is one ``tobytes``; the other fields are built only for the
segments that go to the update script (:meth:`Segments.others`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count as counter
from itertools import repeat
from operator import contains, is_not, itemgetter
from typing import Any, Final

import msgpack
import numpy as np

from agentwatch.codec import Event
from agentwatch.keys import shard_of
from agentwatch.worker import Message
from detectors import fold
from detectors.eventfold import fold_events, fp_text
from detectors.layout import (
    NUMBERS,
    RUN_HASHES,
    S_AGENT,
    S_CMIN,
    S_CN,
    S_FPC,
    S_FPH,
    S_INDEX,
    S_IV,
    S_NBEAT,
    S_PROFILE,
    S_RKB,
    S_RMS,
    S_RUN,
    S_STACK,
    S_TMIN,
    S_TN,
    S_UN,
    TOKEN_NUMBERS,
    run_hash,
)

_KINDS: Final = {"beat": fold.BEAT, "pulse": fold.PULSE, "start": fold.START, "exit": fold.EXIT}
_AGENT, _RUN, _SEQ, _KIND = itemgetter("agent"), itemgetter("run"), itemgetter("seq"), itemgetter("kind")
_FROM_EVENTS: Final = [i for i in range(NUMBERS) if i not in TOKEN_NUMBERS]


def fp_hash(fp: str) -> int:
    """A fingerprint's crc32, never 0 (0 means "this beat had no fingerprint")."""
    return zlib.crc32(fp.encode()) or 1


@dataclass(eq=False)
class Segments:
    """The segments of a batch, in order of first appearance (row ``i`` is segment ``i``)."""

    numbers: np.ndarray
    """float64, one row of layout.SEGMENT_NUMBERS per segment."""
    agents: list[str]
    simple: np.ndarray
    """Per segment: only beats and pulses (folded by fold.py; the fast path takes only these)."""
    complex: dict[int, list[Any]] = field(default_factory=dict)
    """The other segments as the per-event fold built them (numbers and other fields)."""
    fps: list[str | None] = field(default_factory=list)
    """Per event, in segment order: the fingerprint."""
    runs: tuple[np.ndarray, ...] = ()
    """Fingerprint runs over each segment's beats: (segment, first event, length, hash)."""
    rss: tuple[np.ndarray, ...] = ()
    """RSS samples of each segment, in order: (segment, ms, KiB)."""
    windows: tuple[np.ndarray, ...] = ()
    """Tokens per rate window, by segment then window start: (segment, start, tokens)."""
    usage: tuple[np.ndarray, ...] = ()
    """Every beat with tokens or cost, in stream order: (segment, ms, tokens, cost; -1: none)."""

    def __len__(self) -> int:
        return len(self.agents)

    def agents_of(self, rows: np.ndarray) -> list[str]:
        agents = self.agents
        return agents if len(rows) == len(agents) else [agents[i] for i in rows.tolist()]

    def others(self, rows: np.ndarray) -> list[Any]:
        """The fields of layout.SEGMENT_OTHERS of segments ``rows``, one after the other."""
        wanted = rows.tolist()
        fpx: dict[int, list[Any]] = {}
        fptext: dict[int, Any] = {}
        if self.runs:
            chosen = np.flatnonzero(np.isin(self.runs[0], rows))
            run_seg, run_pos, run_len, run_h = (a[chosen].tolist() for a in self.runs)
            fps = self.fps
            for i, pos, length, h in zip(run_seg, run_pos, run_len, run_h, strict=True):
                text = fp_text(fps[pos])
                if i not in fptext:
                    fptext[i] = text
                else:
                    fpx.setdefault(i, []).extend((h, length, text))
        rssx, winx, beatx = _tails(self.rss, rows), _tails(self.windows, rows), self._beats(rows)
        out: list[Any] = []
        for i in wanted:
            seg = self.complex.get(i)
            if seg is not None:
                out += (*seg[S_AGENT : S_STACK + 1], winx.get(i, False), beatx.get(i, False))
            else:
                out += (self.agents[i], False, fptext.get(i, False), fpx.get(i, False),
                        rssx.get(i, False), False, winx.get(i, False), beatx.get(i, False))  # fmt: skip
        return out

    def _beats(self, rows: np.ndarray) -> dict[int, list[Any]]:
        """BEATX of the segments of ``rows`` with usage and more than one beat: [ms, tokens,
        cost, ...] of each usage beat in stream order (tokens.py judges them one by one when it
        must; a single beat is judged from the numbers, its time being the segment's last beat)."""
        out: dict[int, list[Any]] = {}
        numbers = self.numbers
        many = rows[(numbers[rows, S_UN] > 0) & (numbers[rows, S_NBEAT] > 1)]
        if not len(many) or not self.usage:
            return out
        of, ms, tok, cost = self.usage
        chosen = np.flatnonzero(np.isin(of, many))
        chosen = chosen[np.argsort(of[chosen], kind="stable")]
        items = zip(of[chosen].tolist(), ms[chosen].tolist(), tok[chosen].tolist(), cost[chosen].tolist(),
                    strict=True)  # fmt: skip
        for i, at, t, c in items:
            out.setdefault(i, []).extend((at, t, c))
        return out


def by_shard(agents: list[str], shards: int) -> dict[int, np.ndarray]:
    """Rows (segments, in batch order) of each shard's agents."""
    rows = np.arange(len(agents))
    if shards <= 1:
        return {0: rows} if len(rows) else {}
    of = np.fromiter((shard_of(a, shards) for a in agents), dtype=np.int64, count=len(rows))
    return {int(shard): rows[of == shard] for shard in np.unique(of)}


def _tails(arrays: tuple[np.ndarray, ...], rows: np.ndarray) -> dict[int, list[Any]]:
    """Per segment of ``rows``: its items after the first, flattened ([a, b, a, b, ...]) as
    Python numbers; ``arrays`` are (segment, a, b), sorted by segment."""
    out: dict[int, list[Any]] = {}
    if not arrays:
        return out
    of = arrays[0]
    tail = np.ones(len(of), dtype=bool)
    tail[1:] = of[1:] == of[:-1]
    tail[0] = False
    chosen = np.flatnonzero(tail & np.isin(of, rows))
    items = zip(of[chosen].tolist(), arrays[1][chosen].tolist(), arrays[2][chosen].tolist(), strict=True)
    for i, a, b in items:
        out.setdefault(i, []).extend((a, b))
    return out


_DIGITS: Final = 10 ** np.arange(12, -1, -1, dtype=np.int64)


def entry_times(ids: list[bytes]) -> np.ndarray:
    """The ms part of stream entry ids ("<ms>-<seq>"). Redis time has 13 digits until 2286: read
    those as digits, a few array operations for the whole batch, and parse others one by one."""
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    if len(ids) and lens.min() >= 15:
        blob = np.frombuffer(b"".join(ids), dtype=np.uint8)
        starts = np.cumsum(lens) - lens
        digits = blob[starts[:, None] + np.arange(13)] - 48  # anything but a digit wraps past 9
        if (digits <= 9).all() and (blob[starts + 13] == ord("-")).all():
            times: np.ndarray = digits.astype(np.int64) @ _DIGITS
            return times
    return np.array([int(i[: i.index(b"-")]) for i in ids], dtype=np.int64)


def build_segments(
    messages: Sequence[Message[Event]],
    profile_of: Callable[[str], int] | None,
    alphas: Sequence[float],
    windows: Sequence[float],
    *,
    vectorised: bool = True,
    on_agents: Callable[[list[str]], None] | None = None,
) -> Segments:
    """Fold a batch into segments (one per agent and run, in order of first appearance).

    ``profile_of`` None: every agent has profile 1. ``vectorised=False`` folds every segment
    event by event: the reference the tests compare the vectorised fold with. ``on_agents`` is
    called with the segments' agents as soon as they are known (to start reading their state)."""
    evs = [message[1] for message in messages]
    agents, runs = list(map(_AGENT, evs)), list(map(_RUN, evs))
    keys = list(zip(agents, runs, strict=True))
    firsts = dict.fromkeys(keys)
    count, n = len(firsts), len(evs)
    index = None
    if count == n:  # one event per agent and run (a large fleet): segment i is event i
        seg = np.arange(n)
    else:
        index = dict(zip(firsts, counter()))
        seg = np.fromiter(map(index.__getitem__, keys), dtype=np.int64, count=n)
        agents, runs = [key[0] for key in firsts], [key[1] for key in firsts]
    if on_agents is not None:
        on_agents(agents)
    ms = entry_times([m[0] for m in messages])
    kind = np.fromiter(map(_KINDS.__getitem__, map(_KIND, evs)), dtype=np.int64, count=n)
    beat, pulse = kind == fold.BEAT, kind == fold.PULSE
    tokens: list[Any] = list(map(dict.get, evs, repeat("tokens")))
    if any(map(contains, evs, repeat("tokens_in"))) or any(map(contains, evs, repeat("tokens_out"))):
        for k in np.flatnonzero(beat).tolist():  # the producer may send the two parts instead
            ev = evs[k]
            if tokens[k] is None and ("tokens_in" in ev or "tokens_out" in ev):
                tokens[k] = ev.get("tokens_in", 0) + ev.get("tokens_out", 0)
    tok = np.array(tokens, dtype=np.float64)  # None: nan
    cost = np.array(list(map(dict.get, evs, repeat("cost"))), dtype=np.float64)
    rss_raw = list(map(dict.get, evs, repeat("rss")))
    has_rss = np.fromiter(map(is_not, rss_raw, repeat(None)), dtype=bool, count=n) & pulse
    rare = (kind >= fold.START) | (ms == 0) | (not vectorised)
    try:
        seq = np.array(list(map(_SEQ, evs)), dtype=np.int64)
        rss = np.zeros(n, dtype=np.int64)
        found = [rss_raw[k] for k in np.flatnonzero(has_rss).tolist()]
        rss[has_rss] = np.array(found, dtype=np.int64) // 1024
    except OverflowError:  # a number beyond int64: fold the whole batch event by event
        seq, rss, rare = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), rare | True
    for name, of_kind in (("extend", None), ("stack", pulse)):
        values = list(map(dict.get, evs, repeat(name)))
        if any(values):
            truthy = np.fromiter(map(bool, values), dtype=bool, count=n)
            rare |= truthy if of_kind is None else truthy & of_kind
    simple = np.ones(count, dtype=bool)
    simple[seg[rare]] = False
    intervals = list(map(dict.get, evs, repeat("interval")))
    declared = np.fromiter(map(is_not, intervals, repeat(None)), dtype=bool, count=n)

    numbers = np.zeros((count, NUMBERS), order="F")  # written and read column by column
    order = np.argsort(seg, kind="stable") if count < n else np.arange(n)
    sseg = seg[order]
    ends = np.cumsum(np.bincount(sseg, minlength=count))
    events = fold.Events(sseg, ms[order], seq[order], kind[order], ends - np.diff(ends, prepend=0), ends)
    fold.fold_simple(numbers, events)
    if declared.any():  # pulses repeat the declared interval: the last one tells
        last = events.last(declared[order])
        iv = np.array([intervals[k] for k in order[last[last >= 0]].tolist()], dtype=np.float64)
        numbers[last >= 0, S_IV] = iv
    fps = list(map(dict.get, evs, repeat("fp")))
    out = Segments(numbers, agents, simple, fps=fps if count == n else [fps[k] for k in order])
    _fold_fp_and_rss(out, events, rss[order], has_rss[order])
    if not simple.all():
        wanted = set(np.flatnonzero(~simple).tolist())
        chosen = [m for m, s in zip(messages, seg.tolist(), strict=True) if s in wanted]
        out.complex = fold_events(chosen, index or dict(zip(firsts, counter())))
        for row, values in out.complex.items():
            numbers[row, _FROM_EVENTS] = [values[k] for k in _FROM_EVENTS]
    numbers[:, S_PROFILE] = 1 if profile_of is None else list(map(profile_of, out.agents))
    hashes = list(map(RUN_HASHES.get, runs))
    if None in hashes:
        hashes = list(map(run_hash, runs))
    numbers[:, S_RUN] = hashes
    numbers[:, S_INDEX] = np.arange(count)
    has_tok, has_cost = beat & ~np.isnan(tok), beat & ~np.isnan(cost)
    if has_tok.any():
        tok_seg = seg[has_tok]
        fold.ewma_terms(numbers, tok_seg, tok[has_tok], S_TN, alphas, low=S_TMIN)
        out.windows = fold.rate_windows(numbers, tok_seg, ms[has_tok], tok[has_tok], windows)
    if has_cost.any():
        fold.ewma_terms(numbers, seg[has_cost], cost[has_cost], S_CN, alphas, low=S_CMIN)
    usage = has_tok | has_cost
    if usage.any():
        used = seg[usage]
        numbers[:, S_UN] = np.bincount(used, minlength=count) if count < n else usage
        given = (np.nan_to_num(tok[usage], nan=-1.0), np.nan_to_num(cost[usage], nan=-1.0))  # -1: not given
        out.usage = (used, ms[usage], *given)
    return out


def _fold_fp_and_rss(out: Segments, ev: fold.Events, kb: np.ndarray, has_rss: np.ndarray) -> None:
    """FPH/FPC and RMS/RKB of every segment; the runs and samples after the first are kept for
    :meth:`Segments.others` and the fast path."""
    numbers, beat = out.numbers, ev.kind == fold.BEAT
    truthy = np.fromiter(map(bool, out.fps), dtype=bool, count=len(out.fps))
    hashes = np.zeros(len(out.fps), dtype=np.int64)
    hashes[truthy] = np.fromiter(map(zlib.crc32, map(str.encode, filter(None, out.fps))), dtype=np.int64)
    hashes[truthy & (hashes == 0)] = 1  # 0 means "no fingerprint"
    run_seg, run_pos, run_len = fold.fp_runs(ev, beat, hashes)
    if len(run_seg):
        first = np.ones(len(run_seg), dtype=bool)
        first[1:] = run_seg[1:] != run_seg[:-1]
        numbers[run_seg[first], S_FPH] = hashes[run_pos[first]]
        numbers[run_seg[first], S_FPC] = run_len[first]
        out.runs = (run_seg, run_pos, run_len, hashes[run_pos])
    samples = np.flatnonzero((ev.kind == fold.PULSE) & has_rss)
    if len(samples):
        rss_seg = ev.seg[samples]
        first = np.ones(len(samples), dtype=bool)
        first[1:] = rss_seg[1:] != rss_seg[:-1]
        numbers[rss_seg[first], S_RMS] = ev.ms[samples[first]]
        numbers[rss_seg[first], S_RKB] = kb[samples[first]]
        out.rss = (rss_seg, ev.ms[samples], kb[samples])


def pack(segs: Segments, rows: np.ndarray) -> bytes:
    """[numbers of segments ``rows`` as one binary string, their other fields] for the script."""
    numbers = np.ascontiguousarray(segs.numbers[rows], dtype="<f8").tobytes()
    others = segs.others(rows)
    packed: bytes = msgpack.packb([numbers, others], use_bin_type=False)  # Lua: no bin type
    return packed
