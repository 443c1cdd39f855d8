"""The agentwatch producer: one line in an agent's work loop that can never hurt the agent.

    from producers import heartbeat

    while True:
        result = do_work()
        heartbeat(tokens=result.tokens)

``heartbeat()`` appends a small event to an in-memory queue and returns (about a microsecond);
a daemon thread delivers events to Redis in batches, sends a ``pulse`` every few seconds, and
reports how the process ends. Redis being down, slow, hung or full never blocks or raises in
the agent: events are dropped, counted and the count reported once Redis answers again.

Configuration comes from ``init()`` or, without it, the ``AGENTWATCH_*`` environment; see
``docs/producer.md``. Importing this package starts no thread, opens no connection and imports
only the standard library, ``redis``, ``msgpack`` and agentwatch's codec. On the main thread it
takes over SIGTERM and SIGHUP where they still have their default action, to report them as the
run's end (a process with no handler of its own still dies by the signal, as before; see
docs/producer.md for handlers installed later that chain to the producer's).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from producers import _exitcode, _lifecycle
from producers._config import resolve
from producers._guard import internal_error
from producers._halts import Halted
from producers._producer import Producer

__all__ = ["Halted", "Producer", "extend", "halted", "heartbeat", "init", "shutdown"]

_default = Producer._deferred()
_default_lock = threading.RLock()
_lifecycle.install_signals()  # only the main thread may; the work loop may never run there
_exitcode.find_main()

heartbeat = _default.heartbeat
"""Record one unit of work on the default producer (see :meth:`Producer.heartbeat`).

The bound method itself, not a wrapper: forwarding eight keyword arguments would cost more than
the rest of the hot path. ``init()`` reconfigures this same object, so ``from producers import
heartbeat`` stays valid whatever happens later."""


def init(
    agent: str | None = None,
    *,
    redis_url: str | None = None,
    prefix: str | None = None,
    interval: float | None = None,
    pulse_interval: float | None = None,
    shards: int | None = None,
    key: str | None = None,
    labels: Mapping[str, str] | None = None,
    **options: Any,
) -> Producer:
    """Configure the default producer explicitly and start it (``start`` is sent now).

    Arguments left out fall back to the environment, then to defaults (see :class:`Producer`,
    which also lists the tuning ``options``). ``key`` (``AGENTWATCH_KEY``) signs every event
    with the agent's key, for a pipeline with ``[security] agent_keys`` (docs/security.md).
    ``labels`` (``AGENTWATCH_LABELS="team=x,tier=1"``) travel with ``start``: alerts carry them
    and notifiers route on them; the pipeline adds ``host``.
    Calling ``init()`` again with other settings retires the previous run first (``exit`` with
    reason ``shutdown``). Multiprocessing workers started with ``spawn``/``forkserver`` inherit
    these arguments and know their parent run (also without ``init()``); forked ones inherit the
    producer itself.
    """
    explicit: dict[str, Any] = {
        "agent": agent,
        "redis_url": redis_url,
        "prefix": prefix,
        "interval": interval,
        "pulse_interval": pulse_interval,
        "shards": shards,
        "key": key,
        "labels": labels,
        **options,
    }
    with _default_lock:
        try:
            _lifecycle.install_signals()
            settings = resolve(**explicit)
            if _default._running() and _default.settings == settings:
                return _default
            if _default._running():
                _default.close()
            _default._configure(explicit, settings)
            _default._begin()
        except Exception:  # an unknown option, say: never an exception in the agent
            internal_error("init")
        return _default


def extend(seconds: float) -> None:
    """Tell the pipeline a long step starts now: wait ``seconds`` longer before alerting."""
    _default.extend(seconds)


def halted() -> str | None:
    """Why this agent is halted, or None: for loops that poll rather than catch :class:`Halted`.

    ``agentwatch halt`` reaches the producer within about a second; from then on every
    ``heartbeat()`` raises :class:`Halted` (unless ``init(on_halt="ignore")``) until
    ``agentwatch resume``.
    """
    return _default.halted()


def shutdown() -> None:
    """Deliberate stop: send ``exit`` with reason ``shutdown``, flush (at most 2 s), retire.

    The pipeline then expects silence from this agent and raises no alert. Later
    ``heartbeat()`` calls are ignored until ``init()`` is called again.
    """
    _default.close()
