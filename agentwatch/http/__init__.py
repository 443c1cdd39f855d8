"""The HTTP front door (``agentwatch serve``): dashboard, ``/metrics``, badges and the ping API.

docs/http.md is the user's guide; app.py assembles the routes, access.py decides who may see
and do what, server.py holds what the routes share, ingest (agentwatch/ingest.py) writes the
events that pings become.
"""

from typing import Any, Final

SERVER_OPTIONS: Final[dict[str, Any]] = {"access_log": False, "server_header": False}
"""The uvicorn options ``agentwatch serve`` runs the app with, besides its address and log
level: no access log (a ping URL carries ``[http] ping_key``, which must not land in a log
file), no ``Server`` header. benchmarks/http_ping.py serves both of its apps with them."""
