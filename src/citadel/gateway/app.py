"""Wiring of the gateway service (:8000): ``create_app(settings, deps)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from citadel.gateway.auth import AdminKeyAuthenticator, Authenticator
from citadel.gateway.proxy import UPSTREAM_PATHS, Gateway
from citadel.http.client import HttpClient
from citadel.metering.events import UsageSink
from citadel.metrics import Registry
from citadel.service import App, DependencyHealth
from citadel.settings import Settings


@dataclass(slots=True, kw_only=True)
class GatewayDeps:
    """What the gateway talks to; built by ``default_deps`` or by a test."""

    client: HttpClient
    authenticator: Authenticator
    registry: Registry = field(default_factory=Registry)
    usage: UsageSink | None = None


def default_deps(settings: Settings) -> GatewayDeps:
    """Production wiring: a pooled upstream client and the admin-key authenticator."""
    return GatewayDeps(
        client=HttpClient(
            max_connections_per_origin=settings.gateway.max_connections_per_deployment
        ),
        authenticator=AdminKeyAuthenticator(settings.gateway.admin_key),
    )


def create_app(settings: Settings, deps: GatewayDeps) -> App:
    """The gateway: the four OpenAI endpoints, /health and /metrics."""
    app = App(
        name="gateway",
        registry=deps.registry,
        max_body_bytes=settings.gateway.max_body_bytes,
        keepalive_timeout=settings.gateway.keepalive_timeout_seconds,
    )
    gateway = Gateway(
        settings,
        client=deps.client,
        authenticator=deps.authenticator,
        registry=deps.registry,
        usage=deps.usage,
    )
    for endpoint, path in UPSTREAM_PATHS.items():
        app.route("POST", path, partial(gateway.forward, endpoint))
    app.route("GET", "/v1/models", gateway.list_models)

    async def models_configured() -> DependencyHealth:
        if not settings.models:
            return DependencyHealth("down", "no model is configured", critical=True)
        count = sum(len(m.deployments) for m in settings.models)
        return DependencyHealth("ok", f"{len(settings.models)} models, {count} deployments")

    app.health_check("models", models_configured)
    app.on_shutdown(deps.client.aclose)
    return app
