"""Shared by every benchmark script: print a table, write JSON, report machine facts.

Each script measures agentwatch against a baseline taken in the same run on the same server, and
states its figure as a ratio, so results compare across machines. Scripts are run directly
(``python benchmarks/<name>.py``); results land in ``benchmarks/results/<name>.json``.

Besides its table, a script names its headline *figures* (:func:`figure`): one value each per
run, with the goal it is held to. ``benchmarks/run_all.py`` runs every script several times and
reports min / median / max of each figure, so a figure must be a single number per run. Every
script takes ``--quick`` (smaller sizes, fewer inner rounds) so that run_all's quick mode fits in
about a quarter of an hour on 2 cores; the figures say which mode produced them.

``BENCH_RESULTS_DIR`` (set by run_all for each round) redirects the JSON, so a round's output can
never be mistaken for an earlier run's.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agentwatch.embedded import EmbeddedRedis

RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


@contextmanager
def redis_server(url: str | None = None) -> Iterator[str]:
    """``url`` as given, or a private server (the embedded launcher) for the benchmark's run."""
    if url:
        yield url
        return
    with EmbeddedRedis(Path(tempfile.mkdtemp(prefix="aw-bench-"))) as server:
        yield server.url


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(on: Sequence[float], off: Sequence[float]) -> float:
    """The median of the rounds' own ratios ``on[i] / off[i]``. Each round measures both sides
    back to back (:func:`sides`), so a burst of load on a shared machine touches the pair it falls
    in, not one side's median: steadier than the ratio of the two sides' medians."""
    return median([a / b for a, b in zip(on, off, strict=True)])


def sides(round_no: int) -> tuple[bool, bool]:
    """The order of a round's two sides (on, off), alternating, so neither side always runs
    first (on a warmer cache, or a server with one round's keys less)."""
    return (True, False) if round_no % 2 == 0 else (False, True)


def abba(
    round_no: int, measure: Callable[[bool, int], tuple[float, float]]
) -> dict[bool, tuple[float, float]]:
    """One round of a throughput: ``measure(on, n)`` -> (items/s, CPU µs per item), each side
    twice in ABBA order (:func:`sides`, then the reverse; ``n``: the run's index in the round,
    for a prefix of its own). Per side: items over the total time of its two runs, and their
    mean CPU. A side takes ~0.1 s at --quick sizes, where one burst on the VM's host stretches
    a run by half (its CPU time too: 12-21 µs per event between runs of one side, at load
    average 0.2); two runs bracketing the other side's halve what one burst does to a round."""
    order = sides(round_no)
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for n, on in enumerate((*order, *reversed(order))):
        runs[on].append(measure(on, n))
    return {
        on: (len(got) / sum(1 / rate for rate, _ in got), sum(cpu for _, cpu in got) / len(got))
        for on, got in runs.items()
    }


def warm_up(measure: Callable[[bool], object]) -> None:
    """Run ``measure(on)`` once for each side, untimed, before the first round: the first run
    on a fresh server and interpreter pays what every later one finds done (Redis compiling
    the workers' Lua scripts, lazy imports, compiled globs and regexes). Round 0 measures the
    "on" side first (:func:`sides`), so that cost fell on it alone."""
    for on in (True, False):
        measure(on)


def drop_prefix(client: Any, prefix: str) -> None:
    """Delete every key of ``prefix`` (a round's keys, so the next round starts empty)."""
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


def drain_timed(worker: Any, entries: int, *, hooks: bool = False) -> tuple[float, float]:
    """Entries per second a runtime worker takes to process ``entries`` already in its streams
    (``hooks``: run its handlers' on_start/on_stop around the timed span, as a process would),
    and the CPU time the draining thread spent per entry (µs): the worker's own work, which
    other processes' load on a shared machine barely changes (the wall clock also holds its
    waits for Redis and for a core).

    The garbage of what came before (filling the streams, the previous side's worker) is
    collected first: left in the heap, it made a full collection (~20 ms, 4-7 µs per alert of
    a 5,000-alert drain) fall into whichever side's timed span happened to cross the threshold,
    by chance, not by what that side does. The timed span still pays for its own garbage."""
    gc.collect()
    if hooks:
        for handler in worker.handlers:
            handler.on_start()
    start = time.perf_counter()
    cpu = time.thread_time()
    while worker.stats.processed < entries:
        worker.run_once()
    cpu = time.thread_time() - cpu
    elapsed = time.perf_counter() - start
    if hooks:
        for handler in worker.handlers:
            handler.on_stop()
    return entries / elapsed, cpu / entries * 1e6


def figure(
    name: str,
    value: float,
    unit: str,
    *,
    goal: float | None = None,
    better: str = "lower",
    issue: int | None = None,
) -> dict[str, Any]:
    """One headline figure of a run: ``value`` in ``unit`` ("ratio", "ms", "us", "B", "events/s",
    ...), held to ``goal`` (``better`` = "lower": value <= goal; "higher": value >= goal)."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', not {better!r}")
    met = None if goal is None else (value <= goal if better == "lower" else value >= goal)
    return {"figure": name, "value": value, "unit": unit, "goal": goal, "better": better,
            "met": met, "issue": issue}  # fmt: skip


def report(
    name: str,
    rows: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
    figures: Sequence[dict[str, Any]] = (),
) -> Path:
    """Print ``rows`` as an aligned table and write them (with machine facts and the run's
    ``figures``, see :func:`figure`) as JSON."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_fmt(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(col), *(len(c[i]) for c in cells)) for i, col in enumerate(columns)]
    print(" | ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row_cells in cells:
        print(" | ".join(c.ljust(w) for c, w in zip(row_cells, widths, strict=True)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "argv": sys.argv, "machine": machine(), "rows": rows,
               "figures": list(figures), "loadavg": os.getloadavg()}  # fmt: skip
    payload.update(extra or {})
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def report_beside(
    name: str,
    rows: list[dict[str, Any]],
    extra: dict[str, Any],
    figures: Sequence[dict[str, Any]],
    baseline_path: Path | None,
) -> Path:
    """:func:`report`, with another commit's run of the same script (:func:`baseline`) beside
    this one's: rows gain an ``engine`` column ("this commit", or the other run's label)."""
    old_rows, old_figures, extra["baseline"] = baseline(baseline_path)
    mine = [{"engine": "this commit", **row} for row in rows] if old_rows else rows
    return report(name, mine + old_rows, extra, [*figures, *old_figures])


def baseline(path: Path | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Rows and figures of another commit's run of the same script (``--baseline-json``, as
    ``benchmarks/old_engine.py`` stores them), to print beside this run's: every row gains an
    ``engine`` column with the run's label, every figure's name starts with it, and figures lose
    their goals (the goal is judged on this commit's figure, named the same after the label)."""
    if path is None:
        return [], [], {}
    old = json.loads(path.read_text())
    label = old.get("label") or f"{path.name}, measured {old.get('machine', {}).get('when', '?')}"
    rows = [{"engine": label, **row} for row in old.get("rows", [])]
    figures = [{**item, "figure": f"{old.get('figure_label', label)}: {item['figure']}", "goal": None,
                "met": None, "issue": None} for item in old.get("figures", [])]  # fmt: skip
    return rows, figures, {"path": str(path), "label": label, "machine": old.get("machine")}
