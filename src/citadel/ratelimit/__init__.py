"""The rate-limiting service (:9098): users, teams, API keys, tiers and quotas over HTTP, and
``/v1/check`` + ``/v1/reconcile`` for gateways that share Citadel's limits."""

from citadel.ratelimit.app import RateLimitDeps, create_app, default_deps

__all__ = ["RateLimitDeps", "create_app", "default_deps"]
