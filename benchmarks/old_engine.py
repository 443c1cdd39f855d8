"""The engine this one replaced, measured now: the old commit's own scripts, on this machine.

Issue 12 asks for every figure of the shard-owner engine next to the figure of the engine it
replaced, measured in the same session. This script extracts the last ``main`` before the rewrite
(``--commit``, default 97772c7: Lua over packed records, fast path, timers) with ``git archive``
into a temporary directory, and runs *that tree's* detectors_throughput.py, detectors_memory.py
and detectors_silence_delay.py there, each with that tree on ``PYTHONPATH`` (its own engine, its
own version of the script, nothing of this commit), then collects their figures:

* here, as figures named ``old engine (<commit>): <figure>`` without goals (the goal is judged on
  this commit's figure of the same name), so run_all prints them beside the new ones;
* in ``results/old_engine/<script>.json``, labelled ``old engine (<commit>), measured <date>``,
  for the new scripts' ``--baseline-json`` (their table then shows both engines), with each old
  script's output beside it (``<script>-<n>.log``). The extracted tree is removed at the end.

The old throughput script names its figure "detector worker / raw loop, N agents" (one worker,
one stream): it is renamed to the new script's "detector workers / raw loops, N agents, 1 worker".
The old scripts have no CPU-time figure and no 2-worker mode (the old engine had no shard leases:
two workers on one stream split its entries, not its agents).

    python benchmarks/old_engine.py [--commit 97772c7] [--tree PATH] [--quick] [--no-100k]

``--quick``: each old script's ``--quick``; the throughput script also once at 100,000 agents
(200,000 events, as the new script's quick mode; full mode: 600,000), unless ``--no-100k``.
``--tree``: an existing checkout of the commit instead of ``git archive`` (must be clean).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, report

REPO = Path(__file__).resolve().parent.parent
COMMIT = "97772c7"
TIMEOUT_S = 900
_OLD_RATIO = re.compile(r"^detector worker / raw loop, (?P<agents>[\d,]+) agents$")


def extract(commit: str, into: Path) -> Path:
    """``commit``'s tree, as ``git archive`` gives it, in ``into``."""
    tar = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit], check=True,
                         capture_output=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    return into


def run_old(tree: Path, script: str, args: list[str], out: Path, log: Path) -> dict[str, Any]:
    """Run ``tree``'s ``benchmarks/<script>.py`` with ``tree``'s code; its JSON (output in ``log``)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
    env.update(PYTHONPATH=str(tree), BENCH_RESULTS_DIR=str(out))
    argv = [sys.executable, str(tree / "benchmarks" / f"{script}.py"), *args]
    print(f"old engine: {' '.join(argv[1:])}", flush=True)
    done = subprocess.run(
        argv, check=False, cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise SystemExit(f"the old {script}.py failed (exit {done.returncode}):\n" + "\n".join(tail))
    found: dict[str, Any] = json.loads((out / f"{script}.json").read_text())
    return found


def renamed(item: dict[str, Any]) -> dict[str, Any]:
    """An old figure under the name the new script gives the same measurement."""
    found = _OLD_RATIO.match(item["figure"])
    if found:
        return {**item, "figure": f"detector workers / raw loops, {found['agents']} agents, 1 worker"}
    return item


def run_all_old(
    tree: Path, runs: list[tuple[str, list[str]]], scratch: Path, stored: Path, commit: str
) -> dict[str, dict[str, Any]]:
    """Each old script's runs, their rows and (renamed) figures gathered per script."""
    collected: dict[str, dict[str, Any]] = {}
    for number, (script, script_args) in enumerate(runs):
        result = run_old(
            tree, script, script_args, scratch / f"run{number}", stored / f"{script}-{number}.log"
        )
        mine = collected.setdefault(script, {"benchmark": script, "commit": commit, "runs": [], "rows": [],
                                             "figures": []})  # fmt: skip
        mine["runs"].append({"argv": result.get("argv"), "machine": result.get("machine"),
                             "loadavg": result.get("loadavg")})  # fmt: skip
        mine["rows"] += result.get("rows", [])
        mine["figures"] += [renamed(item) for item in result.get("figures", [])]
        mine["machine"] = result.get("machine")
    return collected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commit", default=COMMIT, help=f"the old engine's commit (default {COMMIT})")
    parser.add_argument("--tree", type=Path, default=None, help="a clean checkout of --commit to use")
    parser.add_argument("--quick", action="store_true", help="each old script's --quick")
    parser.add_argument("--no-100k", action="store_true", help="skip the throughput run at 100,000 agents")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.commit], check=True,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    quick = ["--quick"] if args.quick else []
    runs: list[tuple[str, list[str]]] = [
        ("detectors_throughput", quick),
        ("detectors_memory", quick),
        ("detectors_silence_delay", quick),
    ]
    if not args.no_100k:
        events = "200000" if args.quick else "600000"
        runs.insert(1, ("detectors_throughput", [*quick, "--agents", "100000", "--events", events]))
    stored = RESULTS / "old_engine"
    stored.mkdir(parents=True, exist_ok=True)
    label = f"old engine ({commit}), measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    scratch = Path(tempfile.mkdtemp(prefix="aw-old-engine-"))
    try:
        tree = args.tree.resolve() if args.tree else extract(args.commit, scratch / "tree")
        collected = run_all_old(tree, runs, scratch, stored, commit)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    figure_label = f"old engine ({commit})"
    rows: list[dict[str, Any]] = []
    figures: list[dict[str, Any]] = []
    for script, mine in collected.items():
        mine.update(label=label, figure_label=figure_label)
        (stored / f"{script}.json").write_text(json.dumps(mine, indent=2) + "\n")
        for item in mine["figures"]:
            rows.append({"script": script, "figure": item["figure"], "value": item["value"],
                         "unit": item["unit"], "old goal": item.get("goal"),
                         "old issue": item.get("issue")})  # fmt: skip
            figures.append({**item, "figure": f"{figure_label}: {item['figure']}", "goal": None, "met": None,
                            "issue": None})  # fmt: skip
    source = str(args.tree) if args.tree else f"git archive {commit}"
    report("old_engine", rows, {"label": label, "commit": commit, "tree": source,
                                "stored": str(stored)}, figures)  # fmt: skip
    print(
        f"{label}: {len(figures)} figures; the new scripts' --baseline-json {stored}/<script>.json "
        "shows them beside theirs"
    )


if __name__ == "__main__":
    main()
