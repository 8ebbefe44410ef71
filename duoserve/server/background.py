"""Serve an app from a background thread of this process (benchmarks and tests).

`duoserve serve` runs uvicorn on the main thread; a benchmark that drives the engine between
runs (switching expert policies, reading counters) serves the same app from a thread
instead and talks to it over 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from duoserve.server.cli import DrainingServer


@dataclass
class BackgroundServer:
    """A uvicorn server running `app` on a daemon thread."""

    url: str
    app: FastAPI
    uv: uvicorn.Server
    thread: threading.Thread

    @property
    def bridge(self):
        return self.app.state.bridge

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask uvicorn to exit (the app's lifespan stops the engine thread) and join it."""
        self.uv.should_exit = True
        self.thread.join(timeout_s)


def start_background_server(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 0,
    drain_timeout_s: float | None = None,
    log_level: str = "warning",
    start_timeout_s: float = 60.0,
) -> BackgroundServer:
    """Serve `app` on host:port (0: an ephemeral port); return once it listens.

    With `drain_timeout_s`, the first SIGTERM-equivalent (`uv.handle_exit(SIGTERM)`) drains
    as `duoserve serve` does; otherwise it is plain uvicorn.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    if drain_timeout_s is not None:
        uv: uvicorn.Server = DrainingServer(config, app.state.bridge, drain_timeout_s)
    else:
        uv = uvicorn.Server(config)
    thread = threading.Thread(
        target=uv.run, kwargs={"sockets": [sock]}, name="duoserve-http", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the background server did not start")
        time.sleep(0.02)
    bound_host, bound_port = sock.getsockname()[:2]
    return BackgroundServer(f"http://{bound_host}:{bound_port}", app, uv, thread)
