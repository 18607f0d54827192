"""Citadel's settings: one frozen, typed object, read once from a YAML file and the environment.

``load_settings(path, environ)`` is the only way in; ``cli.py`` calls it once and hands the result
to what it wires. The loader is given the environment as a mapping and never reads ``os.environ``.

Where a value comes from, strongest first: an environment variable, the YAML file, the default here.
The file is ``path`` if given, else ``$CITADEL_CONFIG``, else ``./citadel.yaml`` if it exists, else
none (all defaults, no models). An empty environment variable counts as unset, as in env files.

Every bad value raises ``ConfigError(key, value, expected)``, where ``key`` is the dotted YAML path
(``models[0].deployments[1].weight``) or the environment variable's name. Types are strict: a bool
is not a number, a string is not a list; an int is accepted where a float is expected. Unknown and
repeated YAML keys are errors too, because a misspelt key silently ignored is a setting lost. A
key set to null (or left empty) takes its default.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from citadel.errors import ConfigError

ENVS = ("development", "test", "staging", "production")
KINDS = ("chat", "completion", "embedding")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_CONFIG = "citadel.yaml"
# The admin key a development or test instance gets when none is set; refused anywhere else.
DEV_ADMIN_KEY = "sk-citadel-dev"
_INSECURE_ENVS = ("development", "test")


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeouts:
    connect: float = 5.0  # seconds to open a TCP connection upstream
    first_byte: float = 60.0  # seconds from sending the request to the first response byte
    total: float = 600.0  # the whole request


@dataclass(frozen=True, kw_only=True, slots=True)
class Price:
    input_per_1k: float = 0.0  # USD per 1000 prompt tokens
    output_per_1k: float = 0.0  # USD per 1000 completion tokens


@dataclass(frozen=True, kw_only=True, slots=True)
class Deployment:
    name: str  # unique across all models; default "<model>-<index>"
    url: str  # base URL of an OpenAI-compatible server, without a trailing "/" or "/v1"
    upstream_model: str  # the model name sent upstream; YAML key `model`; default the model's name
    weight: float = 1.0
    max_concurrency: int = 0  # 0 = unlimited
    api_key: str | None = None
    tags: tuple[str, ...] = ()
    price: Price | None = None  # overrides the model's price
    gpu_hour_usd: float = 0.0  # what one GPU of this deployment costs per hour (infrastructure)
    gpus: int = 1  # GPUs the deployment runs on


@dataclass(frozen=True, kw_only=True, slots=True)
class Model:
    name: str
    kind: str = "chat"  # one of KINDS; chat models also serve /v1/completions
    deployments: tuple[Deployment, ...]  # at least one
    context_window: int = 8192
    specialties: tuple[str, ...] = ()
    price: Price = Price()
    timeouts: Timeouts = Timeouts()  # each field falls back to the top-level `timeouts:`
    aliases: tuple[str, ...] = ()
    reference_price: Price | None = None  # a commercial API's price, for savings and ROI
    balancer: str | None = None  # None: routing.balancer
    fallbacks: tuple[str, ...] = ()  # models tried, in order, when every deployment failed


@dataclass(frozen=True, kw_only=True, slots=True)
class Ports:
    gateway: int = 8000
    custom_metrics: int = 9091
    predictive_alerting: int = 9092
    grafana_dashboards: int = 9093
    prometheus_rules: int = 9094
    graphql_api: int = 9095
    streaming_api: int = 9096
    routing_api: int = 9097
    rate_limiting_api: int = 9098
    simulator: int = 8100


@dataclass(frozen=True, kw_only=True, slots=True)
class Endpoints:
    """Where the outside services are; None means unset (the embedded default is used, if any)."""

    api_gateway: str | None = None
    prometheus: str | None = None
    grafana: str | None = None
    alertmanager: str | None = None
    sql_database: str | None = None  # a URI: postgresql://..., sqlite:///...
    redis: str | None = None  # a URI: redis://..., memory://
    metrics_server: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class GatewaySettings:
    admin_key: str
    max_body_bytes: int = 1_048_576
    workers: int = 1
    shutdown_grace_seconds: float = 30.0
    keepalive_timeout_seconds: float = 75.0
    access_log: bool = False
    max_connections_per_deployment: int = 256


@dataclass(frozen=True, kw_only=True, slots=True)
class Tier:
    """A service level: its limits (None = unlimited) and which models it may use."""

    name: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    cost_per_month_usd: float | None = None
    models: tuple[str, ...] = ("*",)  # model names or aliases; "*" = every model

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models


DEFAULT_TIERS = (
    Tier(
        name="free",
        requests_per_minute=20,
        tokens_per_minute=20_000,
        concurrent_requests=2,
        tokens_per_day=200_000,
        tokens_per_month=2_000_000,
        cost_per_month_usd=5.0,
    ),
    Tier(
        name="standard",
        requests_per_minute=120,
        tokens_per_minute=200_000,
        concurrent_requests=8,
        tokens_per_day=5_000_000,
        tokens_per_month=100_000_000,
        cost_per_month_usd=200.0,
    ),
    Tier(
        name="premium",
        requests_per_minute=600,
        tokens_per_minute=1_000_000,
        concurrent_requests=32,
        tokens_per_day=50_000_000,
        tokens_per_month=1_000_000_000,
        cost_per_month_usd=2_000.0,
    ),
    Tier(name="enterprise", requests_per_minute=6_000, concurrent_requests=256),
)


BALANCERS = (
    "round_robin",
    "weighted_random",
    "least_outstanding",
    "power_of_two",
    "peak_ewma",
    "cost_optimised",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerSettings:
    """When a deployment's circuit opens, and how it closes again (see routing/breaker.py)."""

    window_seconds: float = 30.0
    minimum_calls: int = 10
    failure_rate_threshold: float = 0.5
    consecutive_failures: int = 5
    slow_call_seconds: float = 30.0
    slow_call_rate_threshold: float = 0.8
    open_seconds: float = 5.0
    backoff_multiplier: float = 2.0
    max_open_seconds: float = 120.0
    half_open_probes: int = 2
    probes_to_close: int = 2


@dataclass(frozen=True, kw_only=True, slots=True)
class HealthSettings:
    """Active health checks: a periodic probe of each deployment."""

    enabled: bool = True
    interval_seconds: float = 10.0
    timeout_seconds: float = 2.0
    path: str = "/v1/models"
    unhealthy_after: int = 2  # consecutive failed probes
    healthy_after: int = 1  # consecutive good probes


@dataclass(frozen=True, kw_only=True, slots=True)
class RoutingSettings:
    """How requests are spread over deployments, retried and sent to the right model."""

    balancer: str = "peak_ewma"  # the default; a model may set its own
    latency_target_seconds: float = 2.0  # cost_optimised: slowest acceptable latency
    max_attempts: int = 3  # deployments tried per request, fallbacks included
    retry_budget_ratio: float = 0.2  # retries at most this share of requests (plus 1/s)
    virtual_models: tuple[str, ...] = ("auto",)  # names routed by task to the best model
    breaker: BreakerSettings = BreakerSettings()
    health: HealthSettings = HealthSettings()


@dataclass(frozen=True, kw_only=True, slots=True)
class LimitsSettings:
    """How limits are enforced."""

    backend: str = "memory://"  # memory:// or redis://host:port/db (REDIS_ENDPOINT sets it)
    failure_mode: str = "open"  # open: admit when the backend is down; closed: answer 503
    timezone: str = "UTC"  # calendar days and months of the quotas
    default_max_tokens: int = 256  # reserved for a request that gives no max_tokens
    lease_ttl_seconds: float = 600.0  # a crashed gateway's concurrency slot frees itself then
    store_timeout_seconds: float = 0.25  # one limiter call; past it the backend counts as down


@dataclass(frozen=True, kw_only=True, slots=True)
class MeteringSettings:
    """Where usage events go: a Redis Stream drained into the SQL ledger, or SQLite directly."""

    stream: str = "citadel:{usage}:events"  # the Redis Stream (hash tag: one slot in a cluster)
    group: str = "ledger"  # the consumer group of ledger writers
    batch_size: int = 10_000  # events per ledger write (and per XADD pipeline of a gateway)
    flush_seconds: float = 0.5  # the longest an event waits in the gateway before it is sent
    spool_path: str = "citadel-usage.spool"  # the gateway's file for events while Redis is down
    database: str | None = None  # the ledger's SQL database; None: accounts.database


@dataclass(frozen=True, kw_only=True, slots=True)
class AccountsSettings:
    """Where users and keys live."""

    database: str = "sqlite+aiosqlite:///citadel.db"  # SQL_DATABASE_ENDPOINT sets a PostgreSQL one
    key_cache_ttl_seconds: float = 5.0  # how long a key lookup is trusted (revocation delay)
    default_tier: str = "free"


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    env: str = "development"  # one of ENVS
    host: str = "127.0.0.1"  # the address services bind to
    hostname: str = "localhost"  # the name used in printed and advertised URLs
    log_level: str = "INFO"  # one of LOG_LEVELS
    ports: Ports = Ports()
    endpoints: Endpoints = Endpoints()
    gateway: GatewaySettings
    timeouts: Timeouts = Timeouts()  # the defaults for models
    models: tuple[Model, ...] = ()
    tiers: tuple[Tier, ...] = DEFAULT_TIERS
    limits: LimitsSettings = LimitsSettings()
    accounts: AccountsSettings = AccountsSettings()
    routing: RoutingSettings = RoutingSettings()
    metering: MeteringSettings = MeteringSettings()
    # The `alerting:` section as read; citadel.alerting.definitions validates it into typed
    # objects (the alerting service owns its schema), naming keys like alerting.rules[0].query.
    alerting: Mapping[str, Any] = field(default_factory=dict)
    config_path: str | None = None  # the file read, if any
    _index: Mapping[str, Model] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", _index_models(self.models))

    def model(self, name: str) -> Model | None:
        """The model with this name or alias, or None."""
        return self._index.get(name)

    def tier(self, name: str) -> Tier | None:
        """The tier with this name, or None."""
        return next((t for t in self.tiers if t.name == name), None)

    def with_models(self, models: tuple[Model, ...]) -> Settings:
        """A copy of these settings serving other models."""
        return dataclasses.replace(self, models=models)


def _index_models(models: tuple[Model, ...]) -> dict[str, Model]:
    """Map each model name and alias to its model; refuse a name of a model or deployment reused."""
    index: dict[str, Model] = {}
    deployments: set[str] = set()
    for i, model in enumerate(models):
        names = [(f"models[{i}].name", model.name)]
        names += [(f"models[{i}].aliases[{j}]", alias) for j, alias in enumerate(model.aliases)]
        for key, name in names:
            if name in index:
                raise ConfigError(key, name, "a model name or alias not already in use")
            index[name] = model
        for j, deployment in enumerate(model.deployments):
            if deployment.name in deployments:
                key = f"models[{i}].deployments[{j}].name"
                raise ConfigError(key, deployment.name, "a deployment name not already in use")
            deployments.add(deployment.name)
    return index


# --- Validation: each parser takes a raw value and its key, and returns the typed value or raises.

Parser = Callable[[object, str], Any]


def _key(prefix: str, name: object) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _mapping(value: object, key: str, known: tuple[str, ...]) -> dict[str, object]:
    """A YAML mapping with only known keys; a missing or empty section is an empty mapping."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, value, "a mapping")
    for name, item in value.items():
        if name not in known:
            raise ConfigError(_key(key, name), item, f"one of the known keys: {', '.join(known)}")
    return value


def _parse(doc: Mapping[str, object], key: str, parsers: Mapping[str, Parser]) -> dict[str, Any]:
    """Parse the keys set in `doc`; absent and null ones are left to the dataclass defaults."""
    return {
        name: parse(value, _key(key, name))
        for name, parse in parsers.items()
        if (value := doc.get(name)) is not None
    }


def _section(value: object, key: str, parsers: Mapping[str, Parser]) -> dict[str, Any]:
    return _parse(_mapping(value, key, tuple(parsers)), key, parsers)


def _text(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, value, "a non-empty string")
    return value.strip()


def _choice(choices: tuple[str, ...]) -> Parser:
    """One of `choices`, in any letter case, returned as spelt in `choices`."""
    by_folded = {choice.casefold(): choice for choice in choices}

    def parse(value: object, key: str) -> str:
        if not isinstance(value, str) or value.strip().casefold() not in by_folded:
            raise ConfigError(key, value, f"one of {', '.join(choices)}")
        return by_folded[value.strip().casefold()]

    return parse


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


def _number(positive: bool) -> Parser:
    expected = "a number > 0" if positive else "a number >= 0"

    def parse(value: object, key: str) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
            or (positive and value == 0)
        ):
            raise ConfigError(key, value, expected)
        return float(value)

    return parse


_positive, _non_negative = _number(positive=True), _number(positive=False)


def _fraction(value: object, key: str) -> float:
    number: float = _non_negative(value, key)
    if number > 1:
        raise ConfigError(key, value, "a number from 0 to 1")
    return number


def _integer(minimum: int) -> Parser:
    def parse(value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(key, value, f"an integer >= {minimum}")
        return value

    return parse


def _port(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(key, value, "an integer port 1-65535")
    return value


def _url(value: object, key: str) -> str:
    """An http(s) URL with a host, without trailing slashes."""
    url = value.strip().rstrip("/") if isinstance(value, str) else ""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a bad port or IPv6 literal
        ok = False
    if not ok:
        raise ConfigError(key, value, "an http:// or https:// URL")
    return url


def _base_url(value: object, key: str) -> str:
    """A deployment's base URL: the client adds "/v1/...", so a trailing "/v1" is dropped."""
    return _url(value, key).removesuffix("/v1")


_URI = re.compile(r"[a-z][a-z0-9+.-]*://\S*", re.IGNORECASE)


def _uri(value: object, key: str) -> str:
    if not isinstance(value, str) or not _URI.fullmatch(value.strip()):
        raise ConfigError(key, value, "a URI such as scheme://host:port/path")
    return value.strip()


_HOST_PORT = re.compile(r"[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}")


def _store(value: object, key: str) -> str:
    """A store's URI, or just its host:port."""
    if isinstance(value, str) and _HOST_PORT.fullmatch(value.strip()):
        return value.strip()
    return _uri(value, key)


def _names(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, value, "a list of strings")
    return tuple(_text(item, f"{key}[{i}]") for i, item in enumerate(value))


_PRICE = {"input_per_1k": _non_negative, "output_per_1k": _non_negative}


def _price(value: object, key: str) -> Price:
    return Price(**_section(value, key, _PRICE))


def _integer_text(parse: Parser) -> Parser:
    """Adapt an integer parser to an environment variable's text."""

    def parse_text(value: object, key: str) -> Any:
        text = str(value).strip()
        return parse(int(text) if re.fullmatch(r"[+-]?[0-9]+", text) else text, key)

    return parse_text


EnvTable = Mapping[str, tuple[str, Parser]]  # variable name -> (field name, parser)


def _from_env(environ: Mapping[str, str], table: EnvTable) -> dict[str, Any]:
    """The fields set by those variables of `table` that are present in `environ`."""
    values: dict[str, Any] = {}
    for var, (name, parse) in table.items():
        text = environ.get(var, "")
        if text.strip():
            try:
                values[name] = parse(text, var)
            except ConfigError as exc:  # report the text as written, not as converted
                raise ConfigError(var, text, exc.expected) from None
    return values


# --- The schema: YAML keys and environment variables, and what each one accepts.

_SCALARS = {
    "env": _choice(ENVS),
    "host": _text,
    "hostname": _text,
    "log_level": _choice(LOG_LEVELS),
}
_TOP = (
    *_SCALARS,
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
    "alerting",
)
_SCALARS_ENV = {
    "CITADEL_ENV": ("env", _SCALARS["env"]),
    "SERVER_IP": ("host", _text),
    "SERVER_HOSTNAME": ("hostname", _text),
    "CITADEL_LOG_LEVEL": ("log_level", _SCALARS["log_level"]),
}
_PORTS = {f.name: _port for f in dataclasses.fields(Ports)}
_PORTS_ENV = {
    f"{'API_GATEWAY' if name == 'gateway' else name.upper()}_PORT": (name, _integer_text(_port))
    for name in _PORTS
}
_ENDPOINTS: dict[str, Parser] = {f.name: _url for f in dataclasses.fields(Endpoints)}
_ENDPOINTS |= {"sql_database": _store, "redis": _store}  # postgresql://..., redis://..., host:port
_ENDPOINTS_ENV = {f"{name.upper()}_ENDPOINT": (name, parse) for name, parse in _ENDPOINTS.items()}
_GATEWAY = {
    "admin_key": _text,
    "max_body_bytes": _integer(1),
    "workers": _integer(1),
    "shutdown_grace_seconds": _non_negative,
    "keepalive_timeout_seconds": _positive,
    "access_log": _bool,
    "max_connections_per_deployment": _integer(1),
}
_GATEWAY_ENV = {
    "CITADEL_ADMIN_KEY": ("admin_key", _text),
    "CITADEL_MAX_BODY_BYTES": ("max_body_bytes", _integer_text(_integer(1))),
    "CITADEL_WORKERS": ("workers", _integer_text(_integer(1))),
}
_TIMEOUTS = {f.name: _positive for f in dataclasses.fields(Timeouts)}
_MODEL = {
    "name": _text,
    "kind": _choice(KINDS),
    "context_window": _integer(1),
    "specialties": _names,
    "aliases": _names,
    "price": _price,
    "balancer": _choice(BALANCERS),
    "fallbacks": _names,
    "reference_price": _price,
}
_MODEL_KEYS = (*_MODEL, "timeouts", "deployments")
_DEPLOYMENT = {
    "name": _text,
    "url": _base_url,
    "model": _text,
    "weight": _positive,
    "max_concurrency": _integer(0),
    "api_key": _text,
    "tags": _names,
    "price": _price,
    "gpu_hour_usd": _non_negative,
    "gpus": _integer(1),
}


def _optional(parse: Parser) -> Parser:
    """``parse``, letting an explicit null through as None (a limit switched off)."""

    def parse_optional(value: object, key: str) -> Any:
        return None if value is None else parse(value, key)

    return parse_optional


_TIER = {
    "requests_per_minute": _integer(1),
    "tokens_per_minute": _integer(1),
    "concurrent_requests": _integer(1),
    "tokens_per_day": _integer(1),
    "tokens_per_month": _integer(1),
    "cost_per_month_usd": _non_negative,
    "models": _names,
}
_LIMITS = {
    "backend": _uri,
    "failure_mode": _choice(("open", "closed")),
    "timezone": _text,
    "default_max_tokens": _integer(1),
    "lease_ttl_seconds": _positive,
    "store_timeout_seconds": _positive,
}
_LIMITS_ENV = {"CITADEL_LIMITS_FAILURE_MODE": ("failure_mode", _LIMITS["failure_mode"])}
_BREAKER = {
    "window_seconds": _positive,
    "minimum_calls": _integer(1),
    "failure_rate_threshold": _fraction,
    "consecutive_failures": _integer(1),
    "slow_call_seconds": _positive,
    "slow_call_rate_threshold": _fraction,
    "open_seconds": _positive,
    "backoff_multiplier": _positive,
    "max_open_seconds": _positive,
    "half_open_probes": _integer(1),
    "probes_to_close": _integer(1),
}
_HEALTH = {
    "enabled": _bool,
    "interval_seconds": _positive,
    "timeout_seconds": _positive,
    "path": _text,
    "unhealthy_after": _integer(1),
    "healthy_after": _integer(1),
}
_ROUTING = {
    "balancer": _choice(BALANCERS),
    "latency_target_seconds": _positive,
    "max_attempts": _integer(1),
    "retry_budget_ratio": _non_negative,
    "virtual_models": _names,
}


def _routing(value: object, models: tuple[Model, ...]) -> RoutingSettings:
    doc = _mapping(value if value is not None else {}, "routing", (*_ROUTING, "breaker", "health"))
    fields = _parse(doc, "routing", _ROUTING)
    breaker = BreakerSettings(**_section(doc.get("breaker"), "routing.breaker", _BREAKER))
    health = HealthSettings(**_section(doc.get("health"), "routing.health", _HEALTH))
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


_METERING = {
    "stream": _text,
    "group": _text,
    "batch_size": _integer(1),
    "flush_seconds": _positive,
    "spool_path": _text,
    "database": _uri,
}

_ACCOUNTS = {
    "database": _uri,
    "key_cache_ttl_seconds": _non_negative,
    "default_tier": _text,
}


def _tiers(value: object, models: tuple[Model, ...]) -> tuple[Tier, ...]:
    """Tiers by name; a tier's limits left out are unlimited. No `tiers:` = the default tiers."""
    if value is None:
        return DEFAULT_TIERS
    if not isinstance(value, dict) or not value:
        raise ConfigError("tiers", value, "a mapping of tier names to their limits")
    known = {name for m in models for name in (m.name, *m.aliases)}
    tiers = []
    for name, body in value.items():
        key = f"tiers.{name}"
        doc = _mapping(body if body is not None else {}, key, tuple(_TIER))
        fields = {k: _optional(_TIER[k])(v, f"{key}.{k}") for k, v in doc.items()}
        if fields.get("models") is None:
            fields.pop("models", None)
        for i, model in enumerate(fields.get("models", ())):
            if models and model != "*" and model not in known:
                raise ConfigError(f"{key}.models[{i}]", model, "a configured model or alias, or *")
        tiers.append(Tier(name=str(name), **fields))
    return tuple(tiers)


def _timezone(name: str, key: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(key, name, "an IANA time zone such as UTC or Europe/Paris") from None
    return name


def _raw_section(value: object, key: str) -> Mapping[str, Any]:
    """A section another module validates; here only: a mapping (frozen) or nothing."""
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict):
        raise ConfigError(key, value, "a mapping")
    return MappingProxyType(dict(value))


def _store_uri(value: str, scheme: str) -> str:
    """A store endpoint given as host:port becomes a URI of ``scheme``."""
    return value if "://" in value else f"{scheme}://{value}"


def load_settings(path: str | None, environ: Mapping[str, str]) -> Settings:
    """Read the settings from the YAML file (see the module docstring) and `environ`."""
    source = _config_source(path, environ)
    config_path = source[0] if source else None
    data = _read_yaml(*source) if source else None
    if not isinstance(data, dict | None):
        raise ConfigError(str(config_path), data, "a mapping of settings at the top level")
    doc = _mapping(data, "", _TOP)
    scalars = _parse(doc, "", _SCALARS) | _from_env(environ, _SCALARS_ENV)
    ports = _section(doc.get("ports"), "ports", _PORTS) | _from_env(environ, _PORTS_ENV)
    endpoints = _section(doc.get("endpoints"), "endpoints", _ENDPOINTS)
    endpoints |= _from_env(environ, _ENDPOINTS_ENV)
    gateway = _section(doc.get("gateway"), "gateway", _GATEWAY) | _from_env(environ, _GATEWAY_ENV)
    _check_admin_key(gateway, scalars.get("env", "development"))
    timeouts = Timeouts(**_section(doc.get("timeouts"), "timeouts", _TIMEOUTS))
    models = _models(doc.get("models"), timeouts)
    tiers = _tiers(doc.get("tiers"), models)
    limits = _section(doc.get("limits"), "limits", _LIMITS) | _from_env(environ, _LIMITS_ENV)
    if "backend" not in limits and endpoints.get("redis"):
        limits["backend"] = _store_uri(endpoints["redis"], "redis")
    _timezone(limits.get("timezone", "UTC"), "limits.timezone")
    accounts = _section(doc.get("accounts"), "accounts", _ACCOUNTS)
    if "database" not in accounts and endpoints.get("sql_database"):
        accounts["database"] = _store_uri(endpoints["sql_database"], "postgresql")
    default_tier = accounts.get("default_tier", "free")
    if default_tier not in {t.name for t in tiers}:
        raise ConfigError("accounts.default_tier", default_tier, "the name of a tier")
    return Settings(
        **scalars,
        ports=Ports(**ports),
        endpoints=Endpoints(**endpoints),
        gateway=GatewaySettings(**gateway),
        timeouts=timeouts,
        models=models,
        tiers=tiers,
        limits=LimitsSettings(**limits),
        accounts=AccountsSettings(**accounts),
        routing=_routing(doc.get("routing"), models),
        metering=MeteringSettings(**_section(doc.get("metering"), "metering", _METERING)),
        alerting=_raw_section(doc.get("alerting"), "alerting"),
        config_path=config_path,
    )


def _config_source(path: str | None, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """The file to read and the key naming it in errors, or None to read no file."""
    if path is not None:
        return path, "config"
    if environ.get("CITADEL_CONFIG", "").strip():
        return environ["CITADEL_CONFIG"].strip(), "CITADEL_CONFIG"
    if Path(DEFAULT_CONFIG).is_file():
        return DEFAULT_CONFIG, "config"
    return None


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key repeated in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: str, key: str) -> object:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(key, path, f"an existing, readable UTF-8 YAML file ({reason})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        lines = text.splitlines()
        line = lines[mark.line] if mark and mark.line < len(lines) else None
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(path, line, f"valid YAML: {exc.problem or exc.context}{where}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(path, None, f"valid YAML: {exc}") from exc


def _check_admin_key(gateway: dict[str, Any], env: str) -> None:
    """Give development and test instances the well-known key; demand a real one elsewhere."""
    key = gateway.get("admin_key")
    if env in _INSECURE_ENVS:
        gateway.setdefault("admin_key", DEV_ADMIN_KEY)
    elif key is None:
        raise ConfigError("gateway.admin_key", None, "an admin key (set CITADEL_ADMIN_KEY)")
    elif key == DEV_ADMIN_KEY:
        raise ConfigError("gateway.admin_key", key, f"a non-development key in {env}")


def _models(value: object, timeouts: Timeouts) -> tuple[Model, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError("models", value, "a list of models")
    return tuple(_model(item, f"models[{i}]", timeouts) for i, item in enumerate(value))


def _model(value: object, key: str, timeouts: Timeouts) -> Model:
    doc = _mapping(value, key, _MODEL_KEYS)
    if doc.get("name") is None:
        raise ConfigError(f"{key}.name", None, "a model name")
    fields = _parse(doc, key, _MODEL)
    own_timeouts = _section(doc.get("timeouts"), f"{key}.timeouts", _TIMEOUTS)
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
        fields = _section(item, f"{key}[{i}]", _DEPLOYMENT)
        if "url" not in fields:
            raise ConfigError(f"{key}[{i}].url", None, "an http:// or https:// URL")
        fields.setdefault("name", f"{model}-{i}")
        fields["upstream_model"] = fields.pop("model", model)
        deployments.append(Deployment(**fields))
    return tuple(deployments)
