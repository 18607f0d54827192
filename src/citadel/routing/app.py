"""Wiring of the routing service (:9097): ``create_app(settings, deps)``.

The service runs a ``Router`` of its own over the same settings as the gateways, with its own
active health checks (``HealthProber``) and, when Redis is configured, the shared routing state
(``SyncLoop``): it sees the breakers the gateway replicas open and the drains that operators set.
Its admin API (deployment state, the dry run of ``POST /v1/route``, drain and restore) is
``citadel.routing.api``; the dry run itself ``citadel.routing.dryrun``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from litestar import Litestar

from citadel.http.client import HttpClient
from citadel.metrics import Registry
from citadel.routing.api import CONTROLLERS, Routing
from citadel.routing.health import HealthProber
from citadel.routing.router import Router
from citadel.routing.shared import SharedRoutingState, SyncLoop
from citadel.settings import Settings
from citadel.web import create_service, provide

__all__ = ["RoutingDeps", "create_app", "default_deps"]

Hook = Callable[[], Awaitable[None]]


@dataclass(slots=True, kw_only=True)
class RoutingDeps:
    """What the service talks to; built by ``default_deps`` or by a test."""

    client: HttpClient  # for the health probes
    registry: Registry = field(default_factory=Registry)
    shared: SharedRoutingState | None = None  # None: no Redis, this service's own view only
    clock: Callable[[], float] = time.monotonic  # the router's clock
    sync_interval: float = 1.0  # seconds between syncs of the shared state


def default_deps(settings: Settings) -> RoutingDeps:
    """Production wiring: a small HTTP client for the probes, the shared state on the Redis of
    ``endpoints.redis`` (or a redis:// ``limits.backend``) if there is one."""
    replica = f"routing-api@{socket.gethostname()}:{os.getpid()}"
    return RoutingDeps(
        client=HttpClient(max_connections_per_origin=4),
        shared=SharedRoutingState.from_settings(settings, replica=replica),
    )


def create_app(settings: Settings, deps: RoutingDeps) -> Litestar:
    """The routing service: its admin API, /docs, /openapi.json, /health and /metrics."""
    shared = deps.shared
    router = Router(
        settings,
        registry=deps.registry,
        on_transition=shared.on_transition if shared is not None else None,
    )
    loop = (
        None
        if shared is None
        # push=False: this service serves no traffic, so it is not one of the replicas listed.
        else SyncLoop(shared, router, interval=deps.sync_interval, clock=deps.clock, push=False)
    )
    routing = Routing(settings, router, shared, loop, deps.clock)
    prober = HealthProber(settings, deps.client, router.set_health)
    startup: list[Hook] = [prober.start]
    shutdown: list[Hook] = [deps.client.aclose]  # run last first
    if shared is not None and loop is not None:
        startup.insert(0, loop.start)
        shutdown += [shared.aclose, loop.stop]
    shutdown.append(prober.stop)
    return create_service(
        "routing-api",
        title="Citadel routing",
        description="Deployment state (breakers, health, latency, load), dry-run routing "
        "decisions, and draining. Authenticate with the admin key.",
        settings=settings,
        registry=deps.registry,
        admin=CONTROLLERS,
        dependencies={"routing": provide(routing)},
        health={"deployments": routing.deployments_health, "shared_state": routing.shared_health},
        on_startup=startup,
        on_shutdown=shutdown,
    )
