"""Run a ``citadel.web`` app under uvicorn (uvloop, httptools): what ``citadel serve NAME`` does
for every service but the gateway. SIGTERM or SIGINT stops it gracefully: no new connections,
requests in flight get ``grace`` seconds, then the app's shutdown hooks run. A ``ConfigError``
raised by a start-up hook (a rule Prometheus refuses, say) is raised again from ``serve``, so the
CLI prints it as one line naming the key and exits 2, as for a bad citadel.yaml."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import FrameType

import uvicorn
from litestar import Litestar

from citadel.errors import ConfigError
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
    refused: list[ConfigError] = []
    app.on_startup[:] = [_noting(hook, refused) for hook in app.on_startup]
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
        # No permessage-deflate: the WebSocket messages here are small JSON (subscription events,
        # chunks), and compressing each one for each subscriber was a tenth of the GraphQL
        # service's time in a 1,000-subscriber fan-out (bench/graphql_api.py), its clients' too.
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=int(grace),
    )
    server = _Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn's way of saying that start-up failed (status 3)
        if refused:
            raise refused[0] from None
        raise
    # uvicorn reports a failed start-up (a hook that raised) only by not having started.
    return 0 if server.started else 1


def _noting(hook: Callable[..., object], refused: list[ConfigError]) -> Callable[..., object]:
    """``hook``, noting the ConfigError it raises (uvicorn would only log it)."""

    async def run(app: Litestar) -> None:
        try:
            result = hook(app) if inspect.signature(hook).parameters else hook()
            if inspect.isawaitable(result):
                await result
        except ConfigError as exc:
            refused.append(exc)
            raise

    return run
