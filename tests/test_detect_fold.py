"""The vectorised fold (detectors/fold.py) against the per-event fold, on random batches: every
segment the update script receives must be the same, byte for byte, whichever fold built it."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import numpy as np
import pytest

from detectors import fold, layout, segments

T0 = 1_795_000_000_000


def random_batch(rng: random.Random, size: int, agents: int, runs: int, rare: float) -> list[Any]:
    """Events of every kind and shape the protocol allows; ``rare``: share of starts, exits,
    stacks and extends (segments the vectorised fold leaves to the per-event one)."""
    out: list[Any] = []
    ms = T0
    for _ in range(size):
        ms += rng.choice([0, 1, 5, 100, 1000, 70_000, -3000])  # -3000: ids from two streams
        ev: dict[str, Any] = {"v": 1, "agent": f"a{rng.randrange(agents)}", "run": f"r{rng.randrange(runs)}",
                              "ts": 0.0, "seq": rng.randrange(40)}  # fmt: skip
        x = rng.random()
        if x < rare / 2:
            ev.update(kind="start", **rng.choice([{}, {"interval": 1.0}, {"interval": 3}, {"parent": "p"}]))
        elif x < rare:
            ev.update(kind="exit", reason=rng.choice(["exit", "shutdown", "signal"]))
            if rng.random() < 0.8:  # without: the producer could not know it
                ev["code"] = rng.randrange(3)
        elif x < 0.65:
            ev["kind"] = "beat"
            y = rng.random()
            if y < 0.6:
                ev["tokens"] = rng.randrange(2000)
            elif y < 0.7:
                ev["tokens_in"] = rng.randrange(100)
            elif y < 0.75:
                ev["tokens_out"] = rng.randrange(100)
            if rng.random() < 0.5:
                ev["cost"] = rng.choice([rng.random(), rng.randrange(3)])
            if rng.random() < 0.7:
                ev["fp"] = rng.choice(["x", "y", "", "job-" + "z" * 100])
        else:
            ev["kind"] = "pulse"
            if rng.random() < 0.7:
                ev["rss"] = rng.randrange(10**10)
            if rng.random() < rare:
                ev["stack"] = rng.choice(["", "File x"])
            if rng.random() < 0.5:  # pulses repeat the declared interval
                ev["interval"] = rng.choice([0.5, 2, 7.25])
        if rng.random() < rare / 2:
            ev["extend"] = rng.choice([0, 1.5, 3])
        out.append((f"{ms}-{rng.randrange(3)}".encode(), ev))
    return out


def packed(batch: list[Any], *, vectorised: bool, profiles: int) -> bytes:
    alphas, widths = [0.1, 0.3][:profiles], [60_000.0, 1000.0][:profiles]
    profile_of = None if profiles == 1 else (lambda agent: 1 + int(agent[1:]) % 2)
    segs = segments.build_segments(batch, profile_of, alphas, widths, vectorised=vectorised)
    return segments.pack(segs, np.arange(len(segs)))


@pytest.mark.parametrize("seed", range(400))
def test_the_vectorised_fold_equals_the_per_event_fold(seed: int) -> None:
    rng = random.Random(seed)
    batch = random_batch(
        rng, rng.choice([1, 2, 7, 50, 400]), agents=rng.choice([1, 3, 30, 400]), runs=rng.choice([1, 2]),
        rare=rng.choice([0.0, 0.0, 0.05, 0.3]),
    )  # fmt: skip
    if seed % 10 == 9:  # times in the first minute of the epoch: rate windows starting at 0
        batch = [(f"{rng.randrange(1, 200_000)}-0".encode(), ev) for _, ev in batch]
    profiles = 1 + seed % 2
    fast, reference = (packed(batch, vectorised=v, profiles=profiles) for v in (True, False))
    if fast != reference:
        ours, theirs = msgpack.unpackb(fast), msgpack.unpackb(reference)
        a, b = (np.frombuffer(x[0]).reshape(-1, layout.NUMBERS) for x in (ours, theirs))
        diff = [(int(r), layout.SEGMENT_NUMBERS[c], a[r, c], b[r, c]) for r, c in np.argwhere(a != b)]
        assert diff == []
        assert ours[1] == theirs[1]
        assert fast == reference


def test_a_large_fleets_batch_is_simple_and_one_row_per_agent() -> None:
    batch = [(f"{T0 + n}-0".encode(), {"v": 1, "agent": f"agent-{n}", "run": "r", "ts": 0.0, "seq": 3,
              "kind": "beat", "tokens": 100 + n, "fp": f"job-{n}"}) for n in range(1000)]  # fmt: skip
    segs = segments.build_segments(batch, None, [0.1], [60_000.0])
    assert len(segs) == 1000 and segs.simple.all() and not segs.complex
    assert segs.numbers[:, layout.S_TSUM].tolist() == [100.0 + n for n in range(1000)]
    assert segs.numbers[:, layout.S_FPC].tolist() == [1.0] * 1000
    assert packed(batch, vectorised=True, profiles=1) == packed(batch, vectorised=False, profiles=1)


def test_entry_times_of_any_length() -> None:
    ids = [b"1795000000000-0", b"1795000000001-12", b"5-0", b"99999999999999-3"]
    assert segments.entry_times(ids).tolist() == [1795000000000, 1795000000001, 5, 99999999999999]
    assert segments.entry_times(ids[:2]).tolist() == [1795000000000, 1795000000001]


@pytest.mark.parametrize("alphas", [[0.1], [0.2, 0.05]])
def test_the_one_beat_shortcuts_equal_the_general_folds(alphas: list[float]) -> None:
    """A batch with one beat per agent takes shortcuts in the token folds; an agent with two
    beats in the same batch forces the general path: the single agents' numbers must not differ."""
    rng = np.random.default_rng(3)
    size = 300
    values = np.concatenate([rng.integers(0, 5000, size // 2).astype(float), rng.random(size // 2) * 3])
    values[::7] = 0.0
    times = T0 + rng.integers(0, 600_000, size)
    folded = []
    for extra in (0, 2):  # extra: two more beats for one more agent
        numbers = np.zeros((size + 1, layout.NUMBERS), order="F")
        numbers[:, layout.S_PROFILE] = np.arange(size + 1) % len(alphas) + 1
        seg = np.append(np.arange(size), np.full(extra, size))
        x = np.append(values, [5.0, 7.0][:extra])
        ms = np.append(times, np.array([T0, T0 + 1][:extra], dtype=np.int64))  # one window: np.unique
        fold.ewma_terms(numbers, seg, x, layout.S_TN, alphas, low=layout.S_TMIN)
        windows = fold.rate_windows(numbers, seg, ms, x, [60_000.0, 1000.0][: len(alphas)])
        folded.append((numbers[:size].tobytes(), [w[:size].tobytes() for w in windows]))
    assert folded[0] == folded[1]
