"""A second listener for health checks only (RunPod serverless `PORT_HEALTH`).

RunPod's load balancer probes `/ping` on `PORT_HEALTH`, which may differ from `PORT`. Serving the
whole app twice would run its lifespan twice (two engines, two model copies), so this is a tiny
separate ASGI app that reads the main app's state, run by its own uvicorn server on a daemon thread.
"""

from __future__ import annotations

import threading

import uvicorn
from fastapi import FastAPI

from app.system.router import health, ping


def health_app(main: FastAPI) -> FastAPI:
    """`/ping` and `/health` answering from `main`'s state (its routes' own functions)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state = main.state  # the routes read request.app.state: share the main app's

    app.add_api_route("/ping", ping, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    return app


def serve_in_thread(main: FastAPI, host: str, port: int, log_level: str) -> threading.Thread:
    """Start the health listener; a daemon thread, so it ends with the main server's process."""
    config = uvicorn.Config(health_app(main), host=host, port=port, log_level=log_level, lifespan="off")
    server = uvicorn.Server(config)
    # Signal handlers can only be installed on the main thread; uvicorn skips them elsewhere, so
    # SIGTERM stays with the main server, which drains and exits (taking this thread with it).
    thread = threading.Thread(target=server.run, name="health-port", daemon=True)
    thread.start()
    return thread

