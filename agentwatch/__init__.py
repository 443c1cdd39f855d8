"""agentwatch: catch silent death, stalled work loops and runaway token use in long-running agents.

The spine lives here: configuration, the wire codec, the key schema, the consumer-group worker
runtime, alerts and the CLI. Agents import :mod:`producers`; detectors and notifiers are plugins
in :mod:`detectors` and :mod:`notifiers`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("agentwatch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
