"""The schema of citadel.yaml: which keys each section has, what each accepts, and the sections
that are lists or cross-check one another (models and their deployments, tiers, routing).

Each table maps a YAML key to its parser (``citadel.settings.parsers``); a key set to null or left
out takes the default of its field in ``citadel.settings.sections``.
"""

from __future__ import annotations

import dataclasses

from citadel.errors import ConfigError
from citadel.limits.maths import MAX_COUNT, MAX_RATE
from citadel.settings.parsers import (
    Parser,
    at_most,
    base_url,
    boolean,
    choice,
    fraction,
    http_url,
    integer,
    mapping,
    names,
    networks,
    non_negative,
    optional,
    parse_keys,
    parse_section,
    port,
    positive,
    store,
    text,
    uri,
)
from citadel.settings.sections import (
    BALANCERS,
    DEFAULT_TIERS,
    ENVS,
    KINDS,
    LOG_LEVELS,
    BreakerSettings,
    Deployment,
    Endpoints,
    HealthSettings,
    Model,
    Ports,
    Price,
    RoutingSettings,
    Tier,
    Timeouts,
)

__all__ = [
    "ACCOUNTS",
    "ENDPOINTS",
    "GATEWAY",
    "GRAFANA",
    "LIMITS",
    "METERING",
    "METRICS",
    "OBSERVABILITY",
    "PORTS",
    "SCALARS",
    "TIMEOUTS",
    "TOP",
    "parse_models",
    "parse_routing",
    "parse_tiers",
]

_PRICE = {"input_per_1k": non_negative, "output_per_1k": non_negative}


def _price(value: object, key: str) -> Price:
    return Price(**parse_section(value, key, _PRICE))


SCALARS = {
    "env": choice(ENVS),
    "host": text,
    "hostname": text,
    "log_level": choice(LOG_LEVELS),
}
TOP = (
    *SCALARS,
    "ports",
    "endpoints",
    "gateway",
    "timeouts",
    "models",
    "tiers",
    "limits",
    "accounts",
    "routing",
    "metering",
    "metrics",
    "grafana",
    "alerting",
    "slos",
    "observability",
    "graphql",
)
PORTS = {f.name: port for f in dataclasses.fields(Ports)}
ENDPOINTS: dict[str, Parser] = {f.name: http_url for f in dataclasses.fields(Endpoints)}
ENDPOINTS |= {"sql_database": store, "redis": store}  # postgresql://..., redis://..., host:port
GATEWAY = {
    "admin_key": text,
    "readonly_key": text,
    "max_body_bytes": integer(1),
    "workers": integer(1),
    "shutdown_grace_seconds": non_negative,
    "keepalive_timeout_seconds": positive,
    "access_log": boolean,
    "max_connections_per_deployment": integer(1),
    "cors_origins": names,
    "trusted_proxies": networks,
    "auth_failure_limit": integer(0),
    "auth_failure_window_seconds": positive,
}
METRICS = {"token": text, "require_token": boolean}
OBSERVABILITY = {
    "rules_dir": text,
    "data_dir": text,
    "scrape_interval_seconds": at_most(positive, 3600, "an hour"),
    "speedup": at_most(positive, 3600, "one hour per second"),
}
GRAPHQL = {
    "max_depth": integer(1, 100),
    "max_cost": integer(1),
    "cost_per_minute": integer(0),
}
GRAFANA = {"token": text, "user": text, "password": text}
TIMEOUTS = {f.name: positive for f in dataclasses.fields(Timeouts)}
_MODEL = {
    "name": text,
    "kind": choice(KINDS),
    "context_window": integer(1),
    "specialties": names,
    "aliases": names,
    "price": _price,
    "balancer": choice(BALANCERS),
    "fallbacks": names,
    "reference_price": _price,
}
_MODEL_KEYS = (*_MODEL, "timeouts", "deployments")
_DEPLOYMENT = {
    "name": text,
    "url": base_url,
    "model": text,
    "weight": positive,
    "max_concurrency": integer(0),
    "api_key": text,
    "tags": names,
    "price": _price,
    "gpu_hour_usd": non_negative,
    "gpus": integer(1),
    "responses": boolean,
}
# Bounded by what the limiter's exact arithmetic can hold (citadel.limits.maths): a larger limit
# would pass start-up and then fail every request of its tier.
_RATE = integer(1, MAX_RATE, "the most the limiter can represent")
_COUNT = integer(1, MAX_COUNT, "the most the limiter can represent")
_TIER = {
    "requests_per_minute": _RATE,
    "tokens_per_minute": _RATE,
    "concurrent_requests": _COUNT,
    "tokens_per_day": _COUNT,
    "tokens_per_month": _COUNT,
    "cost_per_month_usd": at_most(
        non_negative, MAX_COUNT // 1_000_000, "micro-USD the limiter can represent"
    ),
    "models": names,
}
LIMITS = {
    "backend": uri,
    "failure_mode": choice(("open", "closed")),
    "timezone": text,
    "default_max_tokens": integer(1),
    "lease_ttl_seconds": positive,
    "store_timeout_seconds": positive,
}
_BREAKER = {
    "window_seconds": positive,
    "minimum_calls": integer(1),
    "failure_rate_threshold": fraction,
    "consecutive_failures": integer(1),
    "slow_call_seconds": positive,
    "slow_call_rate_threshold": fraction,
    "open_seconds": positive,
    "backoff_multiplier": positive,
    "max_open_seconds": positive,
    "half_open_probes": integer(1),
    "probes_to_close": integer(1),
}
_HEALTH = {
    "enabled": boolean,
    "interval_seconds": positive,
    "timeout_seconds": positive,
    "path": text,
    "unhealthy_after": integer(1),
    "healthy_after": integer(1),
}
_ROUTING = {
    "balancer": choice(BALANCERS),
    "latency_target_seconds": positive,
    "max_attempts": integer(1),
    "retry_budget_ratio": non_negative,
    "virtual_models": names,
}


def parse_routing(value: object, models: tuple[Model, ...]) -> RoutingSettings:
    doc = mapping(value if value is not None else {}, "routing", (*_ROUTING, "breaker", "health"))
    fields = parse_keys(doc, "routing", _ROUTING)
    breaker = BreakerSettings(**parse_section(doc.get("breaker"), "routing.breaker", _BREAKER))
    health = HealthSettings(**parse_section(doc.get("health"), "routing.health", _HEALTH))
    known = {name for m in models for name in (m.name, *m.aliases)}
    for i, name in enumerate(fields.get("virtual_models", ())):
        if name in known:
            raise ConfigError(f"routing.virtual_models[{i}]", name, "a name no model uses")
    for m_index, model in enumerate(models):
        for i, fallback in enumerate(model.fallbacks):
            if fallback not in known or fallback in (model.name, *model.aliases):
                raise ConfigError(
                    f"models[{m_index}].fallbacks[{i}]", fallback, "another configured model"
                )
    return RoutingSettings(**fields, breaker=breaker, health=health)


METERING = {
    "stream": text,
    "group": text,
    "stream_keep_seconds": non_negative,
    "batch_size": integer(1),
    "flush_seconds": positive,
    "spool_path": text,
    "journal": boolean,
    "journal_path": text,
    "journal_fsync": boolean,
    "database": uri,
}

ACCOUNTS = {
    "database": uri,
    "key_cache_ttl_seconds": non_negative,
    "key_cache_size": integer(1),
    "accept_legacy_keys": boolean,
    "default_tier": text,
}


def parse_tiers(value: object, models: tuple[Model, ...]) -> tuple[Tier, ...]:
    """Tiers by name; a tier's limits left out are unlimited. No `tiers:` = the default tiers."""
    if value is None:
        return DEFAULT_TIERS
    if not isinstance(value, dict) or not value:
        raise ConfigError("tiers", value, "a mapping of tier names to their limits")
    known = {name for m in models for name in (m.name, *m.aliases)}
    tiers = []
    for name, body in value.items():
        key = f"tiers.{name}"
        doc = mapping(body if body is not None else {}, key, tuple(_TIER))
        fields = {k: optional(_TIER[k])(v, f"{key}.{k}") for k, v in doc.items()}
        if fields.get("models") is None:
            fields.pop("models", None)
        for i, model in enumerate(fields.get("models", ())):
            if models and model != "*" and model not in known:
                raise ConfigError(f"{key}.models[{i}]", model, "a configured model or alias, or *")
        tiers.append(Tier(name=str(name), **fields))
    return tuple(tiers)


def parse_models(value: object, timeouts: Timeouts) -> tuple[Model, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError("models", value, "a list of models")
    return tuple(_model(item, f"models[{i}]", timeouts) for i, item in enumerate(value))


def _model(value: object, key: str, timeouts: Timeouts) -> Model:
    doc = mapping(value, key, _MODEL_KEYS)
    if doc.get("name") is None:
        raise ConfigError(f"{key}.name", None, "a model name")
    fields = parse_keys(doc, key, _MODEL)
    own_timeouts = parse_section(doc.get("timeouts"), f"{key}.timeouts", TIMEOUTS)
    return Model(
        **fields,
        timeouts=dataclasses.replace(timeouts, **own_timeouts),
        deployments=_deployments(doc.get("deployments"), f"{key}.deployments", fields["name"]),
    )


def _deployments(value: object, key: str, model: str) -> tuple[Deployment, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(key, value, "a non-empty list of deployments")
    deployments = []
    for i, item in enumerate(value):
        fields = parse_section(item, f"{key}[{i}]", _DEPLOYMENT)
        if "url" not in fields:
            raise ConfigError(f"{key}[{i}].url", None, "an http:// or https:// URL")
        fields.setdefault("name", f"{model}-{i}")
        fields["upstream_model"] = fields.pop("model", model)
        deployments.append(Deployment(**fields))
    return tuple(deployments)
