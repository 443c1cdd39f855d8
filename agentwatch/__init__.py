"""agentwatch: catch silent death, stalled work loops and runaway token use in long-running agents.

The spine lives here: configuration, the wire codec, the key schema, the consumer-group worker
runtime, alerts and the CLI. Agents import :mod:`producers`; detectors and notifiers are plugins
in :mod:`detectors` and :mod:`notifiers`.
"""

__version__ = "0.1.0"
"""The package version (pyproject.toml reads it from here). A constant, not
``importlib.metadata.version()``: that import alone costs 100-300 ms of every CLI start."""
