"""CLI start-up: wall time of ``agentwatch --version``, ``status`` and ``alerts``, process to exit.

Issue 10 (point 12) goal: each under 300 ms. Every command runs as a fresh ``python -m agentwatch``
process, as a user's shell would start it (the console script does the same imports), against a
private Redis holding a small fleet (three agents' events applied by a detector worker), so
``status`` and ``alerts`` do their real work: load the configuration, connect, read, render.
Baseline, started the same way in the same run: ``python -c pass`` (the interpreter's own
start-up, which no change to agentwatch can remove); the ratio is command / baseline. A second
reference, ``libraries alone``, imports the third-party libraries ``status`` and ``alerts`` cannot
start without (typer and the pydantic it coerces options with, redis-py, pydantic-settings) and
does nothing else: the part of the time that is not agentwatch's own code. Rounds
alternate the commands, so a burst of load on a shared machine touches all of them alike;
min / median / max per command.

Two installs, the same checkout. *user install*: a virtualenv holding only what ``pip install
agentwatch`` installs (pyproject.toml's runtime dependencies, no ``dev`` extra), built by this
script on its first run and kept in ``benchmarks/results/cli-venv-<hash>/`` (gitignored; the hash
covers the dependency list and the interpreter, so a changed dependency builds a new one); the
commands run from the checkout's root, so ``-m agentwatch`` imports the checkout's code. The goal
is held there: it is what a user waits for. *dev venv*: the interpreter running this script (the
``dev`` extra's venv, with agentwatch installed editable), kept as second rows, because it pays
for things a user's install does not have: redis-py imports the OpenTelemetry SDK (with psutil)
whenever it is installed, and the editable install's path hook and the dev packages' ``.pth``
files run at every interpreter start (``python -c pass`` 25-30 ms there, about 10 ms in the user
install). Each install has its own baseline and *libraries alone* rows, and ratios are to the
baseline of the same install. ``--no-user-venv`` measures the dev venv only (a machine without a
package index), and the figures then say so.

Bytecode: a user's install has it (pip compiles every module at install; an editable install
writes ``__pycache__`` on the first run), so a warm-up run of each command writes it before the
timed rounds. ``PYTHONDONTWRITEBYTECODE`` (set in some CI and container images) is left out of
the commands' environment for that reason: with it, and no ``__pycache__`` yet, every timed run
would compile agentwatch's own modules from source again (about 60-100 ms on a 2-core box),
which is a property of that shell, not of the CLI.

    python benchmarks/cli_start.py [--rounds 15] [--quick] [--redis-url URL] [--no-user-venv]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import redis
from _common import figure, median, redis_server, report

from agentwatch.keys import Keys

GOAL_MS = 300.0
ROOT = Path(__file__).resolve().parent.parent
VENVS = Path(__file__).resolve().parent / "results"  # not BENCH_RESULTS_DIR: built once, kept
USER, DEV = "user install", "dev venv"
_LIBRARIES = "import typer, typer._adapters, redis, pydantic_settings"
# What each install runs, as arguments after its interpreter.
COMMANDS: dict[str, list[str]] = {
    "python -c pass (baseline)": ["-c", "pass"],
    # Not a goal: the libraries every command that reads Redis needs, imported and nothing else
    # (typer with its pydantic coercion, redis-py, pydantic-settings), as a floor to compare with.
    "libraries alone (reference)": ["-c", _LIBRARIES],
    "agentwatch --version": ["-m", "agentwatch", "--version"],
    "agentwatch status": ["-m", "agentwatch", "status"],
    "agentwatch alerts": ["-m", "agentwatch", "alerts"],
}


def user_venv() -> Path:
    """The interpreter of a virtualenv holding agentwatch's runtime dependencies and nothing else
    (module docstring), built on the first run for this dependency list and interpreter."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    key = hashlib.sha256("\n".join([sys.version, *dependencies]).encode()).hexdigest()[:12]
    venv = VENVS / f"cli-venv-{key}"
    python = venv / "bin" / "python"
    if (venv / "complete").exists():
        return python
    for stale in VENVS.glob("cli-venv-*"):  # an older dependency list's, or a build cut short
        shutil.rmtree(stale, ignore_errors=True)
    print(f"building {venv.relative_to(ROOT)} (runtime dependencies only; once) ...", flush=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for argv in ([sys.executable, "-m", "venv", str(venv)], [*pip, *dependencies]):
        built = subprocess.run(argv, check=False, capture_output=True, text=True)
        if built.returncode != 0:
            raise SystemExit(f"{' '.join(argv[:4])} failed (--no-user-venv measures the dev venv "
                             f"only):\n{built.stdout}{built.stderr}")  # fmt: skip
    (venv / "complete").write_text("\n".join(dependencies) + "\n")
    return python


def seed(url: str, prefix: str) -> None:
    """Three agents' events from real producers, applied by a real detector worker, so ``status``
    has a fleet to show and ``alerts`` a stream to read."""
    from agentwatch import config, loading  # noqa: PLC0415 - this process's imports are not what is timed
    from agentwatch.redisconn import connect  # noqa: PLC0415
    from agentwatch.workers import detector_worker  # noqa: PLC0415
    from producers import Producer  # noqa: PLC0415

    for name in ("scraper-1", "scraper-2", "summarizer"):
        producer = Producer(name, redis_url=url, prefix=prefix, pulse_interval=600)
        producer.heartbeat(tokens=120)
        producer.close()
    pipeline = loading.load(None)
    settings = pipeline.settings.model_copy(
        update={"redis": pipeline.settings.redis.model_copy(update={"prefix": prefix})}
    )
    pipeline = config.Pipeline(settings=settings, source="bench", detectors=pipeline.detectors)
    client = connect(settings, url)
    worker = detector_worker(pipeline, client)
    written = sum(client.xlen(stream) for stream in Keys(prefix).event_streams())
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False})
    thread.start()
    deadline = time.monotonic() + 30
    while worker.stats.processed < written and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.stop()
    thread.join(10)
    client.close()


def run_once(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, check=False, env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    elapsed_ms = (time.perf_counter() - started) * 1000
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return elapsed_ms


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 rounds: a smoke run while developing")
    parser.add_argument("--redis-url", help="an existing server (default: a private one)")
    parser.add_argument("--no-user-venv", action="store_true", help="the dev venv only (docstring)")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    installs = {DEV: sys.executable} if args.no_user_venv else {USER: str(user_venv()), DEV: sys.executable}
    runs = {(install, name): [python, *argv] for install, python in installs.items()
            for name, argv in COMMANDS.items()}  # fmt: skip
    with redis_server(args.redis_url) as url:
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        seed(url, prefix)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # the warm-up writes the bytecode (docstring)
        env.pop("PYTHONPATH", None)  # the checkout is the working directory: -m finds it first
        env.update(AGENTWATCH_REDIS__URL=url, AGENTWATCH_REDIS__PREFIX=prefix, COLUMNS="120")
        for argv in runs.values():  # warm the file cache, write the bytecode: not what users wait on
            run_once(argv, env)
        samples: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
        for _ in range(rounds):
            for run, argv in runs.items():
                samples[run].append(run_once(argv, env))
        client = redis.Redis.from_url(url)
        try:
            for key in client.scan_iter(match=f"{prefix}:*"):
                client.delete(key)
        finally:
            client.close()
    goal_install = next(iter(installs))  # the user install, unless --no-user-venv
    rows = []
    figures = []
    for (install, name), values in samples.items():
        baseline = median(samples[install, "python -c pass (baseline)"])
        goal = name.startswith("agentwatch") and install == goal_install
        rows.append({"install": install, "command": name, "ms min": min(values),
                     "ms median": median(values), "ms max": max(values),
                     "x baseline": median(values) / baseline,
                     "goal ms": GOAL_MS if goal else ""})  # fmt: skip
        where = "" if install == USER else f", {install}"
        if goal:
            figures.append(figure(f"`{name}`, start to exit, median{where}", median(values), "ms",
                                  goal=GOAL_MS, issue=10))  # fmt: skip
        elif "libraries" in name:  # context for the goal rows: the part no change here removes
            figures.append(figure(f"{_LIBRARIES!r} alone, median{where}", median(values), "ms", issue=10))
        elif install == DEV and name in ("agentwatch status", "agentwatch alerts"):
            figures.append(figure(f"`{name}`, start to exit, median{where}", median(values), "ms", issue=10))
    report("cli_start", rows, {"rounds": rounds, "installs": installs}, figures)


if __name__ == "__main__":
    main()
