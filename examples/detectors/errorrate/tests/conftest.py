"""Run the tests from a checkout too: without ``pip install -e``, import the package from src/."""

from __future__ import annotations

import sys
from importlib.util import find_spec
from pathlib import Path

if find_spec("agentwatch_errorrate") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
