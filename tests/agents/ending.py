"""A script that ends in its module body, in the way named on the command line.

``python ending.py MODE``, configured through ``AGENTWATCH_*`` only. Each mode beats once, then:

raise-literal      raise SystemExit(4)
raise-main         raise SystemExit(main()), main() returning 4 (the common idiom)
raise-class        raise SystemExit (no code: exit 0)
builtin-exit       exit(4), the site builtin
in-function        a function raises SystemExit(5) (the code is unknowable on 3.11)
thread-exit        a thread calls sys.exit(3), which ends only that thread; the script ends
caught-exit        sys.exit(3) is caught; the script ends normally
stale-error        an error is handled the way IPython does (sys.last_value and friends set,
                   sys.excepthook called by hand); the script then ends normally
"""

from __future__ import annotations

import contextlib
import sys
import threading

from producers import heartbeat


def main() -> int:
    heartbeat(tokens=1)
    return 4


def fail_deep() -> None:
    raise SystemExit(5)


mode = sys.argv[1]
if mode == "raise-main":
    raise SystemExit(main())
heartbeat(tokens=1)
if mode == "raise-literal":
    raise SystemExit(4)
elif mode == "raise-class":
    raise SystemExit
elif mode == "builtin-exit":
    exit(4)
elif mode == "in-function":
    fail_deep()
elif mode == "thread-exit":
    worker = threading.Thread(target=sys.exit, args=(3,))
    worker.start()
    worker.join()
elif mode == "caught-exit":
    with contextlib.suppress(SystemExit):
        sys.exit(3)
elif mode == "stale-error":
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError as exc:
        sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, exc.__traceback__
        if sys.version_info >= (3, 12):
            sys.last_exc = exc
        sys.excepthook(type(exc), exc, exc.__traceback__)
else:
    raise SystemExit(f"unknown mode {mode!r}")
