"""Shared by every benchmark script: print a table, write JSON, report machine facts.

Each script measures agentwatch against a baseline taken in the same run on the same server, and
states its figure as a ratio, so results compare across machines. Scripts are run directly
(``python benchmarks/<name>.py``); results land in ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agentwatch.embedded import EmbeddedRedis

RESULTS = Path(__file__).resolve().parent / "results"


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


def report(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Path:
    """Print ``rows`` as an aligned table and write them (with machine facts) as JSON."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_fmt(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(col), *(len(c[i]) for c in cells)) for i, col in enumerate(columns)]
    print(" | ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row_cells in cells:
        print(" | ".join(c.ljust(w) for c, w in zip(row_cells, widths, strict=True)))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "argv": sys.argv, "machine": machine(), "rows": rows}
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
