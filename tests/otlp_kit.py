"""Real parts for the OpenTelemetry tests: a local server answering like the OpenAI API, and a
local OTLP/HTTP server that keeps every request it is sent.

Both are plain ``http.server`` servers on 127.0.0.1 with a free port: the real ``openai`` client
talks HTTP to the first, the real OTLP exporters of ``opentelemetry-sdk`` to the second. This
module imports neither ``openai`` nor OpenTelemetry, so the recorder (tests/data/otlp/record.py)
can use it from a virtual environment holding an older instrumentation.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Usage:
    """What the fake API reports for every completion (OpenAI's usage object)."""

    prompt: int = 120
    completion: int = 30
    cached: int = 100
    reasoning: int = 10

    def as_openai(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning},
        }


@dataclass
class FakeOpenAI:
    """``POST /v1/chat/completions`` answered like the OpenAI API, on 127.0.0.1.

    With ``tools`` in the request and no tool result yet in the conversation, the answer calls
    the first tool with ``tool_arguments``; otherwise it answers with text. ``loop = True``
    makes it call the tool again after every tool result (a model stuck in a loop)."""

    usage: Usage = field(default_factory=Usage)
    tool_arguments: str = '{"city": "Paris"}'
    loop: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length))
                owner.requests.append(request)
                body = json.dumps(owner.answer(request)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        tools = request.get("tools") or []
        last = request["messages"][-1]
        calls_tool = bool(tools) and (self.loop or last.get("role") != "tool")
        message: dict[str, Any] = {"role": "assistant", "content": "sunny all week"}
        finish = "stop"
        if calls_tool:
            name = tools[0]["function"]["name"]
            call = {"id": f"call_{len(self.requests)}", "type": "function"}
            call["function"] = {"name": name, "arguments": self.tool_arguments}
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            finish = "tool_calls"
        return {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": f"{request['model']}-2024-08-06",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": self.usage.as_openai(),
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Received:
    path: str
    content_type: str
    content_encoding: str | None
    body: bytes


@dataclass
class OtlpCapture:
    """An OTLP/HTTP endpoint that answers 200 and keeps each request (path, headers, body)."""

    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                owner.received.append(
                    Received(
                        self.path,
                        self.headers.get("Content-Type", ""),
                        self.headers.get("Content-Encoding"),
                        self.rfile.read(length),
                    )
                )
                self.send_response(200)
                self.send_header("Content-Type", self.headers.get("Content-Type", "application/x-protobuf"))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def bodies(self, signal: str) -> list[Received]:
        """What was sent to ``/v1/<signal>`` (``traces`` or ``metrics``), in arrival order."""
        return [item for item in self.received if item.path == f"/v1/{signal}"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
