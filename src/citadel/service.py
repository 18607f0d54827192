"""What every Citadel service shares: the app, /health, /metrics, request ids, error mapping, and
the process runner (graceful shutdown on SIGTERM, ``--workers N`` on one port).

An ``App`` is built by each service's ``create_app(settings, deps)``: it holds the routes, the
dependency health checks, the metrics registry and the start-up/shut-down hooks. It is the handler
the HTTP server calls. ``serve`` runs an app factory in one process, or in N forked worker processes
that each bind the same port with SO_REUSEPORT (the kernel spreads connections across them); their
metrics meet in a shared directory so that a scrape of any worker shows the sum of all.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import orjson

from citadel import __version__
from citadel.errors import ApiError, MethodNotAllowed, NotFound, PayloadTooLarge, Unauthorized
from citadel.health import DependencyHealth, HealthCheck, Status, check_all, store_scheme
from citadel.http.edge import OpenAiEdge
from citadel.http.server import AbortConnection, HttpServer, Request, Response, StreamResponse
from citadel.metrics import HTTP_REQUESTS, SERVICE_INFO, Registry, SharedMetrics

if TYPE_CHECKING:
    from citadel.settings import Settings

__all__ = [
    "App",
    "DependencyHealth",
    "HealthCheck",
    "Status",
    "check_all",
    "check_bindable",
    "serve",
    "store_scheme",
]

_log = logging.getLogger("citadel.service")

RouteHandler = Callable[[Request], Awaitable[Response | StreamResponse]]
Hook = Callable[[], Awaitable[None]]

_MAX_REQUEST_ID = 128
_UNMATCHED = "unmatched"  # the route label of a request to an unknown path


def _request_id(request: Request) -> bytes:
    given = request.headers.get(b"x-request-id")
    if given and len(given) <= _MAX_REQUEST_ID and all(32 < c < 127 for c in given):
        return given
    return os.urandom(12).hex().encode()


def service_app(name: str, settings: Settings, registry: Registry) -> App:
    """A service's ``App``, with the HTTP limits every Citadel service takes from the settings."""
    return App(
        name=name,
        registry=registry,
        max_body_bytes=settings.gateway.max_body_bytes,
        keepalive_timeout=settings.gateway.keepalive_timeout_seconds,
        metrics_token=settings.metrics_token(),
    )


class App:
    """Routes, health checks, metrics and hooks of one service; the HTTP server's handler."""

    def __init__(
        self,
        *,
        name: str,
        registry: Registry | None = None,
        max_body_bytes: int = 1_048_576,
        keepalive_timeout: float = 75.0,
        version: str = __version__,
        metrics_token: str | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.registry = registry if registry is not None else Registry()
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout = keepalive_timeout
        self._routes: dict[str, dict[str, RouteHandler]] = {}
        self._prefix_routes: list[tuple[str, dict[str, RouteHandler]]] = []
        self._checks: dict[str, HealthCheck] = {}
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self.render_metrics: Callable[[], bytes] = self.registry.render
        self.edge: OpenAiEdge | None = None  # the gateway's OpenAI conventions (citadel.http.edge)
        # None: /metrics is open; else the SHA-256 of the bearer token a scrape must send.
        self._metrics_digest = (
            hashlib.sha256(metrics_token.encode()).digest() if metrics_token else None
        )
        self._http_requests = self.registry.counter(HTTP_REQUESTS)
        self.registry.gauge(SERVICE_INFO).set((name, version), 1.0)
        self.route("GET", "/health", self._health)
        self.route("GET", "/metrics", self._metrics)

    # -- building ----------------------------------------------------------------------------

    def route(self, method: str, path: str, handler: RouteHandler) -> None:
        """Serve ``method path`` with ``handler``."""
        self._routes.setdefault(path, {})[method] = handler

    def route_prefix(self, method: str, prefix: str, handler: RouteHandler) -> None:
        """Serve every path under ``prefix`` (for resources with ids in the path)."""
        for known, methods in self._prefix_routes:
            if known == prefix:
                methods[method] = handler
                return
        self._prefix_routes.append((prefix, {method: handler}))

    def health_check(self, name: str, check: HealthCheck) -> None:
        """Report dependency ``name`` in /health by calling ``check``."""
        self._checks[name] = check

    def on_startup(self, hook: Hook) -> None:
        self._startup.append(hook)

    def on_shutdown(self, hook: Hook) -> None:
        self._shutdown.append(hook)

    async def startup(self) -> None:
        for hook in self._startup:
            await hook()

    async def shutdown(self) -> None:
        for hook in reversed(self._shutdown):
            try:
                await hook()
            except Exception:
                _log.exception("shutdown hook failed")

    # -- serving -----------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response | StreamResponse:
        edge = self.edge
        started = time.perf_counter()
        rid = _request_id(request) if edge is None else edge.request_id(request)
        request.request_id = rid.decode()
        # The route label names the route, never the raw path of an unknown one: a scan of random
        # paths must not add a metric series per path.
        route = _UNMATCHED
        try:
            preflight = edge.preflight(request) if edge is not None else None
            if preflight is not None:  # a CORS preflight, answered without auth on any path
                response: Response | StreamResponse = preflight
            else:
                methods = self._routes.get(request.path)
                if methods is None:
                    methods, route = self._match_prefix(request.path)
                else:
                    route = request.path
                handler = methods.get(request.method)
                if handler is None:
                    allowed = ", ".join(sorted(methods))
                    raise MethodNotAllowed(
                        f"Method {request.method} is not allowed on {_prefix(request.path)};"
                        f" use {allowed}.",
                        headers=((b"allow", allowed.encode()),),
                    )
                if request.body_too_large:
                    raise PayloadTooLarge(
                        f"The request body is larger than the limit of {self.max_body_bytes} bytes."
                    )
                response = await handler(request)
        except ApiError as exc:
            response = Response(exc.status, exc.body(), list(exc.headers))
        except AbortConnection:
            raise
        except Exception:
            # Answered here rather than by the server so that the 500 is counted and carries the
            # request id that the log line names.
            _log.exception(
                "unhandled error", extra={"path": request.path, "request_id": rid.decode()}
            )
            error = ApiError("The server had an error while processing your request.")
            response = Response(error.status, error.body())
        response.headers.append((b"x-request-id", rid))
        if edge is not None:
            edge.finish(request, response, started)
        self._http_requests.inc((self.name, request.method, route, str(response.status)))
        return response

    def _match_prefix(self, path: str) -> tuple[dict[str, RouteHandler], str]:
        for prefix, methods in self._prefix_routes:
            if path.startswith(prefix):
                return methods, prefix + "*"
        raise NotFound(f"Unknown path {_prefix(path)}.", code="unknown_url")

    async def _metrics(self, request: Request) -> Response:
        expected = self._metrics_digest
        if expected is not None:
            scheme, _, token = (request.headers.get(b"authorization") or b"").partition(b" ")
            given = hashlib.sha256(token.strip()).digest()
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given, expected):
                raise Unauthorized(
                    "/metrics needs 'Authorization: Bearer <metrics.token>' (or the admin key "
                    "when metrics.token is unset).",
                    code="metrics_token_required",
                    headers=((b"www-authenticate", b'Bearer realm="metrics"'),),
                )
        return Response(200, self.render_metrics(), content_type=b"text/plain; version=0.0.4")

    async def check_health(self) -> tuple[Status, dict[str, dict[str, str]]]:
        """Run every dependency check (each bounded in time) and combine them."""
        return await check_all(self._checks)

    async def _health(self, request: Request) -> Response:
        status, deps = await self.check_health()
        body = orjson.dumps(
            {"status": status, "service": self.name, "version": self.version, "dependencies": deps}
        )
        return Response(503 if status == "down" else 200, body)


# -- running ----------------------------------------------------------------------------------

AppFactory = Callable[[], App]
_FLUSH_INTERVAL = 1.0


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)
    else:
        uvloop.run(main)


def _freeze_startup_objects() -> None:
    """Keep what start-up built (modules, settings, pools: most of the process's objects) out of
    every later garbage collection. Without it, each collection of the oldest generation walked
    them all: pauses of 20-60 ms, a few per second under load, that made the gateway's p99 at
    concurrency 1 about a hundred times its p50 (bench/gateway_overhead.py)."""
    gc.collect()
    gc.freeze()


async def _serve_worker(
    factory: AppFactory,
    host: str,
    port: int,
    grace: float,
    metrics_dir: str | None,
    announce: Callable[[App, int], None] | None,
) -> None:
    app = factory()
    await app.startup()
    _freeze_startup_objects()
    server = HttpServer(
        app, max_body_bytes=app.max_body_bytes, keepalive_timeout=app.keepalive_timeout
    )
    await server.start(host, port, reuse_port=metrics_dir is not None)
    shared: SharedMetrics | None = None
    flusher: asyncio.Task[None] | None = None
    if metrics_dir is not None:
        shared = SharedMetrics(app.registry, metrics_dir, os.getpid())
        app.render_metrics = shared.render
        flusher = asyncio.create_task(_flush_forever(shared))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _log.info("listening", extra={"host": host, "port": server.port, "pid": os.getpid()})
    if announce is not None:
        announce(app, server.port)
    await stop.wait()
    _log.info("shutting down", extra={"grace_seconds": grace, "pid": os.getpid()})
    await server.shutdown(grace)
    await app.shutdown()
    if flusher is not None:
        flusher.cancel()
    if shared is not None:
        shared.retire()


async def _flush_forever(shared: SharedMetrics) -> None:
    while True:
        await asyncio.sleep(_FLUSH_INTERVAL)
        shared.flush()


def serve(
    factory: AppFactory,
    *,
    host: str,
    port: int,
    workers: int = 1,
    grace: float = 30.0,
    announce: Callable[[App, int], None] | None = None,
) -> int:
    """Run the app in this process, or in ``workers`` forked processes; return an exit code."""
    if workers <= 1:
        _run(_serve_worker(factory, host, port, grace, None, announce))
        return 0
    check_bindable(host, port)
    metrics_dir = tempfile.mkdtemp(prefix="citadel-metrics-")
    try:
        return _supervise(factory, host, port, workers, grace, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def check_bindable(host: str, port: int) -> None:
    """Raise OSError here, once, if the workers could not bind (the port is taken, say).

    Otherwise each worker would fail alike and be restarted until the supervisor gives up, a
    traceback per attempt instead of one clear error.
    """
    for family, kind, proto, _, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as probe:
            # The options the workers' listening sockets get (asyncio sets SO_REUSEADDR).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind(address)


def _spawn(factory: AppFactory, host: str, port: int, grace: float, metrics_dir: str) -> int:
    pid = os.fork()
    if pid == 0:  # the worker
        code = 0
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _run(_serve_worker(factory, host, port, grace, metrics_dir, None))
        except BaseException:
            _log.exception("worker failed")
            code = 1
        finally:
            os._exit(code)
    return pid


def _supervise(
    factory: AppFactory, host: str, port: int, workers: int, grace: float, metrics_dir: str
) -> int:
    """Start the workers, restart one that dies, and pass SIGTERM/SIGINT on to all of them."""
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    children: set[int] = set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for _ in range(workers):
        children.add(_spawn(factory, host, port, grace, metrics_dir))
    restarts: list[float] = []
    failed = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
        children.discard(pid)
        if stopping:
            continue
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        if len(restarts) > workers * 3:
            _log.error("workers keep dying; giving up", extra={"exit_status": status})
            failed = True
            on_signal(signal.SIGTERM, None)
            continue
        _log.warning("worker died; restarting", extra={"pid": pid, "exit_status": status})
        children.add(_spawn(factory, host, port, grace, metrics_dir))
    return 1 if failed else 0


def _prefix(text: str, limit: int = 64) -> str:
    """At most ``limit`` characters of client input, marked when cut: messages never echo more."""
    return text if len(text) <= limit else text[:limit] + "..."
