"""A webhook receiver for trying agentwatch out: prints each alert it receives, one per line.

    python examples/receiver.py 9000

Listens on 127.0.0.1 only and answers 200 to every POST. The alert's text is printed as JSON
(control characters escaped), so an agent's name or summary cannot play tricks on the terminal.
"""

import contextlib
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            alert = json.loads(body)
            line = f"{alert['status'].upper()} {alert['detector']} {json.dumps(alert['agent'])}: "
            line += json.dumps(alert["summary"])
        except (ValueError, KeyError, TypeError, AttributeError):
            line = f"(not an alert) {body[:200]!r}"
        print(f"receiver: {line}", flush=True)
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per alert above is enough


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    server = ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    print(f"receiver: listening on http://127.0.0.1:{port}/", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: stop without a traceback
        server.serve_forever()


if __name__ == "__main__":
    main()
