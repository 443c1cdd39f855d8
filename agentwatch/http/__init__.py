"""The HTTP front door (``agentwatch serve``): dashboard, ``/metrics``, badges and the ping API.

docs/http.md is the user's guide; app.py assembles the routes, access.py decides who may see
and do what, server.py holds what the routes share, ingest (agentwatch/ingest.py) writes the
events that pings become.
"""
