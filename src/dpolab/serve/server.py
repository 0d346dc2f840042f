"""Serving the app with waitress (a production WSGI server; Flask's dev server is not one).

waitress runs each request on one of its threads; a streaming answer holds a thread for its
whole generation, so the pool must cover every admitted job (running + queued) plus some for
the page, /healthz and /metrics, or a full queue would starve the health check.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from flask import Flask

EXTRA_THREADS = 4
SHUTDOWN_TIMEOUT_S = 10  # for responses to finish writing, then for the loop to end


def make_server(app: Flask, host: str = "127.0.0.1", port: int = 8000) -> Any:
    """A bound (not yet running) waitress server; ``port=0`` picks a free port (``server.effective_port``)."""
    from waitress.server import create_server

    engine = app.extensions["dpolab.engine"]
    return create_server(
        app, host=host, port=port, threads=engine.workers + engine.max_queue + EXTRA_THREADS,
        # Keep reading the socket while the app runs: that is how waitress notices a client that
        # hung up (environ["waitress.client_disconnected"]), which cancels its generation.
        channel_request_lookahead=1,
        # Answers are streamed; a long poll between tokens must not be cut by the server.
        channel_timeout=max(120, int(app.config["REQUEST_TIMEOUT_S"]) + 30),
        ident="dpolab")


class ServerThread:
    """waitress in a background thread (`dpolab serve`, tests, notebooks): ``with ServerThread(app) as url: ...``."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.server = make_server(app, host, port)
        self.url = f"http://{host}:{self.server.effective_port}"
        self._thread = threading.Thread(target=self.server.run, name="waitress", daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.close()

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def close(self) -> None:
        """Stop in an order that never touches a closed descriptor.

        1. Cancel every generation, so each response still being written ends at once.
        2. Stop waitress's request threads once their current response is written. A request thread
           tells the loop about new output by writing to the loop's wake-up pipe (``pull_trigger``);
           a thread still running when step 3 closed that pipe got EBADF (the warning seen once in
           ten test runs), or worse, wrote into whatever file had reused the descriptor number.
        3. Close every socket from inside the loop thread (closing them from this thread while that
           one sits in select() makes select fail with EBADF), open keep-alive connections included:
           the loop only ends when its socket map is empty.
        """
        self.app.extensions["dpolab.engine"].close()
        from waitress import wasyncore

        if self._thread.is_alive():
            self.server.task_dispatcher.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
            # OSError: the trigger is already closed, the loop is ending on its own.
            with contextlib.suppress(OSError):
                self.server.trigger.pull_trigger(lambda: wasyncore.close_all(self.server._map))
            self._thread.join(timeout=SHUTDOWN_TIMEOUT_S)
