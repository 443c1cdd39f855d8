"""What the notifier tests share: a real HTTP receiver on 127.0.0.1, and notifier workers.

:class:`Receiver` is a threaded ``http.server`` that records every request and answers from a
script, one reply per request (status, headers, body, or hang until closed, or bytes that are
not HTTP at all), then a default. It can stop listening and start again on the same port to
play an outage. Everything it opens is closed in :meth:`Receiver.close`, because the test
suite turns ResourceWarnings into errors.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agentwatch import plugins
from agentwatch.alerts import Alert, Incidents
from agentwatch.config import Pipeline
from agentwatch.keys import Keys
from agentwatch.redisconn import connect
from agentwatch.worker import Worker
from agentwatch.workers import notifier_worker

from helpers import running, settings_for, wait_for

FAST_DELIVERY = {"backoff": "50ms", "backoff_max": "200ms", "timeout": "1s", "connect_timeout": "500ms"}
"""Delivery settings that keep tests short: the same logic, smaller numbers."""


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] | Callable[[], dict[str, str]] = field(default_factory=dict)
    """The answer's headers, or a function that makes them when the answer is sent (a
    ``Retry-After`` date relative to the moment of the answer, not to the test's start)."""
    hang: bool = False
    garbage: bool = False


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when the request was read

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """A scripted HTTP server on 127.0.0.1 (see the module docstring)."""

    def __init__(self, check: Callable[[Request], str | None] | None = None, port: int = 0) -> None:
        self.check = check
        self.requests: list[Request] = []
        self.errors: list[str] = []
        self.script: deque[Reply] = deque()
        self.default = Reply()
        self.lock = threading.Lock()
        self.release = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = port
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def reply(self, *replies: Reply) -> None:
        with self.lock:
            self.script.extend(replies)

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as two writes; with Nagle on, the body waits for the
            # client's delayed ACK (40 ms), which real servers (nginx: tcp_nodelay) avoid.
            disable_nagle_algorithm = True

            def setup(self) -> None:
                super().setup()
                with receiver.lock:
                    receiver._sockets.add(self.connection)

            def finish(self) -> None:
                with receiver.lock:
                    receiver._sockets.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                                  time.monotonic())  # fmt: skip
                with receiver.lock:
                    receiver.requests.append(request)
                    answer = receiver.script.popleft() if receiver.script else receiver.default
                problem = receiver.check(request) if receiver.check else None
                if problem:
                    with receiver.lock:
                        receiver.errors.append(problem)
                    answer = Reply(400, json.dumps({"status": "invalid event", "errors": [problem]}).encode())
                if answer.hang:
                    receiver.release.wait()
                    self.close_connection = True
                    return
                if answer.garbage:
                    self.wfile.write(b"this is not HTTP at all\r\n\r\n")
                    self.close_connection = True
                    return
                self.send_response(answer.status)
                headers = answer.headers() if callable(answer.headers) else answer.headers
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = False  # so server_close() joins every handler thread
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and drop every open connection (the port then refuses connections)."""
        server, self._server = self._server, None
        if server is None:
            return
        self.release.set()
        server.shutdown()
        with self.lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        server.server_close()
        assert self._thread is not None
        self._thread.join(5)
        self.release = threading.Event()

    def close(self) -> None:
        self.stop()

    def bodies(self) -> list[Any]:
        with self.lock:
            return [request.json() for request in self.requests]

    def wait_requests(self, count: int, timeout: float = 10.0) -> list[Request]:
        wait_for(lambda: len(self.requests) >= count, timeout, what=f"{count} requests at {self.url}")
        with self.lock:
            return list(self.requests)


@contextmanager
def receiver(check: Callable[[Request], str | None] | None = None) -> Iterator[Receiver]:
    server = Receiver(check)
    try:
        yield server
    finally:
        server.close()


def pipeline_with(prefix: str, redis_url: str, notifiers: list[dict[str, Any]], **worker: Any) -> Pipeline:
    """A validated pipeline with these ``[[notifiers]]`` entries (as pipeline.toml would give)."""
    loaded, problems = plugins.load_notifiers(notifiers)
    assert not problems, problems
    settings = settings_for(prefix, redis_url, worker={"tick": "50ms", "block": "100ms", **worker})
    return Pipeline(settings=settings, source="test", notifiers=loaded)


@contextmanager
def notifier_running(pipeline: Pipeline, redis_url: str) -> Iterator[Worker[Alert]]:
    """A notifier worker in a thread, with its own client; stopped and closed afterwards."""
    client = connect(pipeline.settings, redis_url)
    worker = notifier_worker(pipeline, client)
    try:
        with running(worker):
            yield worker
    finally:
        client.close()


def fire(r: Any, keys: Keys, agent: str = "bot", detector: str = "silence", **kwargs: Any) -> Alert:
    """Publish a firing alert exactly as a detector does."""
    options: dict[str, Any] = {"severity": "critical", "summary": f"{agent}: no heartbeat", **kwargs}
    at_ms = options.pop("at_ms", None) or now_ms(r)
    alert = Incidents(r, keys).fire(agent, detector, at_ms=at_ms, **options)
    assert alert is not None
    return alert


def resolve(r: Any, keys: Keys, agent: str = "bot", detector: str = "silence") -> Alert:
    alert = Incidents(r, keys).resolve(agent, detector, summary=f"{agent}: back", at_ms=now_ms(r))
    assert alert is not None
    return alert


def now_ms(r: Any) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def stream(r: Any, key: str) -> list[dict[str, str]]:
    """Every entry of a stream as str -> str fields."""
    return [
        {k.decode(): v.decode(errors="replace") for k, v in fields.items()} for _, fields in r.xrange(key)
    ]
