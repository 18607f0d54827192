"""Run a ``citadel.web`` app under uvicorn (uvloop, httptools): what ``citadel serve NAME`` does
for every service but the gateway. SIGTERM or SIGINT stops it gracefully: no new connections,
requests in flight get ``grace`` seconds, then the app's shutdown hooks run."""

from __future__ import annotations

from types import FrameType

import uvicorn
from litestar import Litestar

from citadel.service import check_bindable

__all__ = ["serve"]


class _Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM that stopped it gracefully is a clean exit (0), as for
    the gateway, rather than re-raised once the server has stopped."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def serve(app: Litestar, *, host: str, port: int, grace: float = 30.0) -> int:
    """Serve the app in this process until SIGTERM/SIGINT; return an exit code."""
    check_bindable(host, port)  # one clear line for the CLI if the port is taken
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=None,  # citadel.log configured logging already
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=int(grace),
    )
    server = _Server(config)
    server.run()
    # uvicorn reports a failed start-up (a hook that raised) only by not having started.
    return 0 if server.started else 1
