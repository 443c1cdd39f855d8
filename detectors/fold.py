"""Segments folded with numpy: the common segment (beats and pulses only) and the token folds.

A batch of a large fleet holds about one event per agent, so a per-event Python loop that keeps
~45 numbers per segment costs more than everything else the worker does with the event. Most
segments hold nothing but beats (tokens, cost, fingerprint) and pulses (RSS): for those, every
number of the segment is an order statistic of its events (first, last, count, the longest gap),
which numpy computes for the whole batch at once. Segments with anything else (a ``start``, an
``exit``, a stack, an ``extend``, a zero entry time) are *complex*: segments.py folds them event
by event as before. The results are identical; tests/test_detect_fold.py checks both folds
against each other on random batches. The token and cost folds (:func:`ewma_terms`,
:func:`rate_windows`) run over every segment's beats, complex or not.

Arrays here are in *segment order*: the batch's events stably sorted by segment, so each
segment's events are one contiguous run in stream order, from ``starts[i]`` to ``ends[i]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from detectors import layout

_BIG: Final = np.iinfo(np.int64).max
BEAT, PULSE, START, EXIT = 0, 1, 2, 3
"""Event kinds as codes."""


@dataclass(frozen=True, eq=False)
class Events:
    """The batch's events in segment order (see the module docstring)."""

    seg: np.ndarray  # segment of each event
    ms: np.ndarray  # entry time (Redis ms)
    seq: np.ndarray
    kind: np.ndarray  # BEAT, PULSE, START, EXIT
    starts: np.ndarray  # per segment: its first event
    ends: np.ndarray  # per segment: one past its last event

    def first(self, mask: np.ndarray) -> np.ndarray:
        """Per segment: the position of its first event where ``mask`` holds (_BIG: none)."""
        pos = np.arange(len(self.seg))
        return np.minimum.reduceat(np.where(mask, pos, _BIG), self.starts)

    def last(self, mask: np.ndarray) -> np.ndarray:
        """Per segment: the position of its last event where ``mask`` holds (-1: none)."""
        pos = np.arange(len(self.seg))
        return np.maximum.reduceat(np.where(mask, pos, -1), self.starts)

    def at(self, values: np.ndarray, index: np.ndarray, default: float = 0) -> np.ndarray:
        """``values[index]`` where ``index`` names an event, else ``default``."""
        found = (index >= 0) & (index < len(values))
        out = np.full(len(index), default, dtype=values.dtype)
        out[found] = values[index[found]]
        return out


def longest_gap(ev: Events, mask: np.ndarray, gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per segment, the first event where ``gaps`` (time since an earlier event, 0 where none)
    is largest and positive, as (its position, found): the sequential rule "a gap longer than
    the longest so far replaces it" keeps exactly that one."""
    gaps = np.where(mask, gaps, 0)
    top = np.maximum.reduceat(gaps, ev.starts)
    where = ev.first((gaps == top[ev.seg]) & (gaps > 0))
    return where, where != _BIG


def fold_simple(numbers: np.ndarray, ev: Events) -> None:
    """Write every number of every segment that does not come from the token folds (those are
    segments._fold and _windows) into ``numbers`` (one row per segment), as if each segment
    held only beats and pulses. Rows of complex segments are overwritten by the caller.

    Returns per-event helpers the caller needs for the list fields: ``beat`` (mask).
    """
    ms, kind = ev.ms, ev.kind
    beat, pulse = kind == BEAT, kind == PULSE
    if len(ms) == len(ev.starts):
        _fold_single(numbers, ev, beat, pulse)
        return
    numbers[:, layout.S_LO] = np.minimum.reduceat(ev.seq, ev.starts)
    numbers[:, layout.S_HI] = np.maximum.reduceat(ev.seq, ev.starts)
    numbers[:, layout.S_FIRST] = ms[ev.starts]
    numbers[:, layout.S_LAST] = ms[ev.ends - 1]
    numbers[:, layout.S_NEV] = ev.ends - ev.starts
    numbers[:, layout.S_START] = 0
    numbers[:, layout.S_IV] = -1
    numbers[:, layout.S_CHILD] = 0

    # The longest gap between two events of the segment.
    since_prev = np.zeros_like(ms)
    since_prev[1:] = ms[1:] - ms[:-1]
    since_prev[ev.starts] = 0
    where, found = longest_gap(ev, np.ones(len(ms), dtype=bool), since_prev)
    numbers[:, layout.S_GA] = np.where(found, ev.at(ms, where - 1), 0)
    numbers[:, layout.S_GB] = np.where(found, ev.at(ms, where), 0)

    first_beat, last_beat = ev.first(beat), ev.last(beat)
    numbers[:, layout.S_FBEAT] = ev.at(ms, first_beat)
    numbers[:, layout.S_BEAT] = ev.at(ms, last_beat)
    nbeat = np.add.reduceat(beat.astype(np.int64), ev.starts)
    numbers[:, layout.S_NBEAT] = nbeat
    numbers[:, layout.S_XU] = 0  # no extend in a simple segment: a beat ends any
    numbers[:, layout.S_XBEAT] = nbeat > 0
    numbers[:, layout.S_STACKMS] = 0

    # Pulses: the last one, the time since the one before it, before the first beat / after the last.
    pulse_pos = np.flatnonzero(pulse)
    gap = np.zeros_like(ms)
    if len(pulse_pos) > 1:
        same = ev.seg[pulse_pos[1:]] == ev.seg[pulse_pos[:-1]]
        gap[pulse_pos[1:][same]] = ms[pulse_pos[1:][same]] - ms[pulse_pos[:-1][same]]
    last_pulse = ev.last(pulse)
    numbers[:, layout.S_PULSE] = ev.at(ms, last_pulse)
    numbers[:, layout.S_PGAP] = ev.at(gap, last_pulse)
    numbers[:, layout.S_PBF] = ev.first(pulse) < first_beat
    numbers[:, layout.S_PSB] = (last_beat >= 0) & (last_pulse > last_beat)

    # The longest gap between two beats with a pulse in between.
    beat_pos = np.flatnonzero(beat)
    beat_gap = np.zeros_like(ms)
    pulses_before = np.cumsum(pulse)
    if len(beat_pos) > 1:
        cur, prev = beat_pos[1:], beat_pos[:-1]
        ok = (ev.seg[cur] == ev.seg[prev]) & (pulses_before[cur] > pulses_before[prev])
        beat_gap[cur[ok]] = ms[cur[ok]] - ms[prev[ok]]
    prev_beat = np.zeros_like(ms)
    if len(beat_pos) > 1:
        prev_beat[beat_pos[1:]] = ms[beat_pos[:-1]]
    where, found = longest_gap(ev, beat, beat_gap)
    numbers[:, layout.S_BA] = np.where(found, ev.at(prev_beat, where), 0)
    numbers[:, layout.S_BB] = np.where(found, ev.at(ms, where), 0)


def _fold_single(numbers: np.ndarray, ev: Events, beat: np.ndarray, pulse: np.ndarray) -> None:
    """:func:`fold_simple` when every segment holds one event (a large fleet): no gaps, and the
    event is the first and last of everything it is."""
    ms = ev.ms
    numbers[:, layout.S_LO] = numbers[:, layout.S_HI] = ev.seq
    numbers[:, layout.S_FIRST] = numbers[:, layout.S_LAST] = ms
    numbers[:, layout.S_NEV] = 1
    numbers[:, layout.S_IV] = -1
    numbers[:, layout.S_FBEAT] = numbers[:, layout.S_BEAT] = np.where(beat, ms, 0)
    numbers[:, layout.S_NBEAT] = numbers[:, layout.S_XBEAT] = beat
    numbers[:, layout.S_PULSE] = np.where(pulse, ms, 0)
    numbers[:, layout.S_PBF] = pulse


def fp_runs(ev: Events, beat: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal fingerprint hashes over each segment's beats, in order: (segment, first
    beat of the run (event position), length)."""
    beat_pos = np.flatnonzero(beat)
    if not len(beat_pos):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    seg, h = ev.seg[beat_pos], hashes[beat_pos]
    new = np.ones(len(beat_pos), dtype=bool)
    new[1:] = (seg[1:] != seg[:-1]) | (h[1:] != h[:-1])
    first = np.flatnonzero(new)
    length = np.diff(np.append(first, len(beat_pos)))
    return seg[first], beat_pos[first], length


def ewma_terms(  # noqa: PLR0917 - one fold's columns
    numbers: np.ndarray, seg: np.ndarray, x: np.ndarray, slot: int, alphas: Sequence[float], low: int
) -> None:
    """Per segment, from ``slot`` on: n, sum, max, W where W = sum_i alpha (1-alpha)^(n-1-i) x_i;
    and the smallest value in ``low``.

    With the EWMA numerator b and weight w kept in the record, k beats fold in as
    b' = (1-alpha)^k b + W and w' = (1-alpha)^k w + 1 - (1-alpha)^k: the script applies a whole
    batch of an agent's beats in two multiplications.
    """
    count = len(numbers)
    n = np.bincount(seg, minlength=count)
    alpha: Any
    if n.max() <= 1:  # one beat per agent (a large fleet): the sums below, for a single term
        alpha = (
            alphas[0]
            if len(alphas) == 1
            else np.asarray(alphas)[numbers[seg, layout.S_PROFILE].astype(np.int64) - 1]
        )
        numbers[seg, slot], numbers[seg, slot + 1], numbers[seg, slot + 2] = 1, 0.0 + x, x
        numbers[seg, low] = x
        numbers[seg, slot + 3] = 0.0 + alpha * 1.0 * x  # bincount adds to 0.0; (1 - alpha)^0 = 1
        return
    # stable sort by segment: each segment's beats become one run, still in stream order
    if len(seg) < 2 or (seg[1:] >= seg[:-1]).all():
        xs, ss = x, seg  # already in order (one beat per agent)
    else:
        sorter = np.argsort(seg, kind="stable")
        xs, ss = x[sorter], seg[sorter]
    ends = np.cumsum(n)
    from_end = ends[ss] - 1 - np.arange(len(ss))  # beats after this one in its segment
    if len(alphas) == 1:
        alpha = alphas[0]
    else:
        profile = numbers[:, layout.S_PROFILE].astype(np.int64)
        alpha = np.asarray(alphas, dtype=np.float64)[profile - 1][ss]
    weighted = np.bincount(ss, weights=alpha * np.power(1.0 - alpha, from_end) * xs, minlength=count)
    total = np.bincount(ss, weights=xs, minlength=count)
    present = n > 0
    starts = (ends - n)[present]
    numbers[present, slot] = n[present]
    numbers[present, slot + 1] = total[present]
    numbers[present, slot + 2] = np.maximum.reduceat(xs, starts)
    numbers[present, low] = np.minimum.reduceat(xs, starts)
    numbers[present, slot + 3] = weighted[present]


def rate_windows(
    numbers: np.ndarray, seg: np.ndarray, times: np.ndarray, values: np.ndarray, widths: Sequence[float]
) -> tuple[np.ndarray, ...]:
    """Tokens per rate window of each segment, by segment then window start, so that a batch
    holding many of an agent's beats (a backlog) still closes every window it spans. The first
    window of a segment goes to WS/WT, the others to WINX; returns (segment, start, tokens)."""
    if len(widths) == 1:
        width: Any = int(widths[0])
    else:
        profile = numbers[seg, layout.S_PROFILE].astype(np.int64)
        width = np.asarray(widths, dtype=np.int64)[profile - 1]
    start = times // width * width
    # one key per (segment, window); keys sort by segment, then time
    low = int(start.min())
    keys = seg * (1 << 44) + (start - low)
    if len(keys) < 2 or (keys[1:] > keys[:-1]).all():
        inverse = np.arange(len(keys))  # already unique and sorted (one beat per agent)
    else:
        keys, inverse = np.unique(keys, return_inverse=True)
    sums = np.bincount(inverse, weights=values)
    of, starts = keys >> 44, (keys & ((1 << 44) - 1)) + low
    first = np.ones(len(keys), dtype=bool)
    first[1:] = of[1:] != of[:-1]
    # A window starting at 0 (times within the first window of the epoch) reads as "none yet":
    # the next window of its segment takes its place, as the per-window fold always did.
    lost = first & (starts == 0) & np.append(of[1:] == of[:-1], False)
    if lost.any():
        of, starts, sums = of[~lost], starts[~lost], sums[~lost]
        first = np.ones(len(of), dtype=bool)
        first[1:] = of[1:] != of[:-1]
    numbers[of[first], layout.S_WS] = starts[first]
    numbers[of[first], layout.S_WT] = sums[first]
    return of, starts, sums
