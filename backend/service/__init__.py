"""The MiniGPT-Pancreas HTTP service (FastAPI + uvicorn): `create_app(engine)` builds it, `minigpt-pancreas serve`
runs it.

Modules: app (the factory and its lifespan), server (the uvicorn server: connection limits, graceful shutdown),
routes (the endpoints of protocol.py), worker (the one engine thread and its bounded queues), jobs (sweep jobs),
volumes (uploaded volumes in memory), bodies (reading bodies within limits), engine_calls (request options ->
engine calls, engine results -> protocol messages), security (token, API version, which hosts need a token),
errors (the error body, the last-resort handler), state (what the routes share).
"""

from __future__ import annotations

from .app import create_app
from .state import ServiceLimits

__all__ = ["create_app", "ServiceLimits"]
