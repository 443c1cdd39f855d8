"""Built-in detectors. Each is a plugin on the spine's worker runtime; see detectors/base.py.

``BUILTINS`` is the one place that maps a short alias (the ``[detectors.<alias>]`` section of
pipeline.toml) to the class implementing it.
"""

BUILTINS: dict[str, str] = {
    "silence": "detectors.silence:Silence",
    "stall": "detectors.stall:Stall",
    "exit": "detectors.exit:Exit",
    "tokens": "detectors.tokens:Tokens",
    "memory": "detectors.memory:Memory",
    "lag": "detectors.lag:Lag",
}
