"""Running an app on uvicorn: in the foreground (`lopa serve`) or in a background thread (tests, benchmarks).

Shutdown is graceful: uvicorn stops accepting, lets open requests finish for ``graceful_s`` seconds and
cancels the rest (their handlers abort them in the engine), then the app's lifespan stops and joins the
engine thread.
"""

from __future__ import annotations

import threading

import uvicorn


def _config(app, host: str, port: int, graceful_s: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=graceful_s)


def serve(app, host: str, port: int, graceful_s: int = 30, log_level: str = "info") -> None:
    """Serve until SIGINT / SIGTERM."""
    uvicorn.Server(_config(app, host, port, graceful_s, log_level)).run()


class BackgroundServer:
    """``with BackgroundServer(app) as url:`` serves on 127.0.0.1:<free port> in a thread."""

    def __init__(self, app, graceful_s: int = 10) -> None:
        self.server = uvicorn.Server(_config(app, "127.0.0.1", 0, graceful_s, "warning"))
        self.thread = threading.Thread(target=self.server.run, name="lopa-http", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            self.thread.join(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self, timeout_s: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __exit__(self, *exc) -> None:
        self.stop()
