"""A small agent whose ending is chosen on the command line: ``python scripted.py MODE``.

Configured only through ``AGENTWATCH_*`` variables (the zero-setup path). ``AW_BEATS`` beats
(default 3) ``AW_PERIOD`` seconds apart (default 0.01) come first, then MODE decides the end.
``AW_QUEUE_SIZE`` calls ``producers.init(queue_size=...)`` first; ``AW_ECHO=1`` prints each beat's
number to stdout, so a test can count beats without Redis. MODE:

forever       keep beating until killed
exit          return normally
exit3         sys.exit(3)
raise         an uncaught ValueError from run_job()
shutdown      producers.shutdown(), then a few (ignored) beats, then return
recv          block forever in fetch_from_api() on a socket recv that never returns
thread-raise  the work loop runs in a thread that dies of an exception; main exits normally
takeover      like thread-raise, but a second thread takes over the work and beats on
own-sigterm   the program handles SIGTERM itself (prints, exits 0), then beats forever
chain-sigterm like own-sigterm, but the handler first calls the one it replaced, as some
              frameworks do (the producer's, here: it must not end the process)
thread-forever the work loop runs forever in a thread; the main thread only waits for it
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import producers
from producers import heartbeat

BEATS = int(os.environ.get("AW_BEATS", "3"))
PERIOD = float(os.environ.get("AW_PERIOD", "0.01"))
ECHO = os.environ.get("AW_ECHO") == "1"
count = 0


def beat_some(beats: int = BEATS) -> None:
    global count
    for step in range(beats):
        heartbeat(tokens=10 + step)
        count += 1
        if ECHO:
            print(count, flush=True)
        time.sleep(PERIOD)


def beat_forever() -> None:
    while True:
        beat_some(1)


def run_job() -> None:
    raise ValueError("boom in run_job")


def fetch_from_api(conn: socket.socket) -> bytes:
    return conn.recv(4096)  # the peer never writes: this never returns


def thread_work() -> None:
    beat_some()
    run_job()


def main(mode: str) -> None:
    if os.environ.get("AW_QUEUE_SIZE"):
        producers.init(queue_size=int(os.environ["AW_QUEUE_SIZE"]))
    if mode in {"own-sigterm", "chain-sigterm"}:
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: object) -> None:
            if mode == "chain-sigterm" and callable(previous):
                previous(signum, frame)
            print("own handler ran", flush=True)
            sys.exit(0)

        signal.signal(signal.SIGTERM, on_term)
    if mode == "thread-forever":
        worker = threading.Thread(target=beat_forever, name="work-loop", daemon=True)
        worker.start()
        worker.join()
        return
    if mode in {"thread-raise", "takeover"}:
        worker = threading.Thread(target=thread_work, name="work-loop")
        worker.start()
        worker.join()
        if mode == "takeover":
            successor = threading.Thread(target=beat_some, name="work-loop-2")
            successor.start()
            successor.join()
        return
    beat_some()
    if mode in {"forever", "own-sigterm", "chain-sigterm"}:
        beat_forever()
    elif mode == "exit3":
        sys.exit(3)
    elif mode == "raise":
        run_job()
    elif mode == "shutdown":
        producers.shutdown()
        beat_some(3)
    elif mode == "recv":
        here, _there = socket.socketpair()
        fetch_from_api(here)
    elif mode != "exit":
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1])
