"""The sections of Citadel's settings: frozen, typed dataclasses with keyword-only fields.

Each class is one section of citadel.yaml (``ports:``, ``routing.breaker:``, a model, a tier...)
and ``Settings`` holds them all; a field's default is the setting's default. What each YAML key
accepts is in ``citadel.settings.schema``; ``citadel.settings.load_settings`` builds the whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from citadel.errors import ConfigError
from citadel.observability.names import Slo

ENVS = ("development", "test", "staging", "production")
KINDS = ("chat", "completion", "embedding")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

BALANCERS = (
    "round_robin",
    "weighted_random",
    "least_outstanding",
    "power_of_two",
    "peak_ewma",
    "cost_optimised",
)


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
    # The server speaks the Responses API itself (vLLM does): /v1/responses is forwarded as-is
    # rather than translated to Chat Completions.
    responses: bool = False


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
    prometheus: int = 9090  # `citadel up`'s own Prometheus (when none is configured)
    alertmanager: int = 9099  # and Alertmanager (its usual 9093 is grafana-dashboards here)


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
    # A key that reads what the admin key reads on the read-only routes (the console, its query
    # proxy, the dashboards' JSON) and nothing else; CITADEL_READONLY_KEY sets it.
    readonly_key: str | None = None
    max_body_bytes: int = 1_048_576
    workers: int = 1
    shutdown_grace_seconds: float = 30.0
    keepalive_timeout_seconds: float = 75.0
    access_log: bool = False
    max_connections_per_deployment: int = 256
    # Browser origins allowed to call the gateway (CORS); "*" allows any. The loader defaults it
    # to ("*",) in development and to none elsewhere.
    cors_origins: tuple[str, ...] = ()
    # Peers whose X-Forwarded-For names the client (addresses or networks, e.g. 10.0.0.0/8).
    trusted_proxies: tuple[str, ...] = ()
    # An address that fails authentication this often within the window gets a 429 (0: never).
    auth_failure_limit: int = 20
    auth_failure_window_seconds: float = 60.0


@dataclass(frozen=True, kw_only=True, slots=True)
class MetricsSettings:
    """Who may scrape ``/metrics`` (every service): the panels carry per-team spend."""

    token: str | None = None  # the bearer token a scrape must send (Prometheus: `authorization`)
    # Whether a token is required when `token` is unset (the admin key then serves); the loader
    # sets it: on outside development and test unless `metrics.require_token: false`.
    require_token: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class GrafanaSettings:
    """How the dashboards service signs in to Grafana (``endpoints.grafana``) to provision:
    a service account token (``GRAFANA_TOKEN``), else basic auth (``GRAFANA_USER``,
    ``GRAFANA_PASSWORD``)."""

    token: str | None = None
    user: str | None = None
    password: str | None = None


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
    # Stored events stay in the stream this long (the event feed's usage retention, for resume).
    stream_keep_seconds: float = 600.0
    batch_size: int = 10_000  # events per ledger write (and per XADD pipeline of a gateway)
    flush_seconds: float = 0.5  # the longest an event waits in the gateway before it is sent
    spool_path: str = "citadel-usage.spool"  # the gateway's file for events while Redis is down
    # Each usage event is also written here (segments <path>.<pid>.*) before its response ends,
    # so a killed gateway loses none (citadel.metering.journal); `journal: false` turns it off.
    journal: bool = True
    journal_path: str = "citadel-usage.journal"
    journal_fsync: bool = False  # fsync each segment when rotated (each flush), not per event
    database: str | None = None  # the ledger's SQL database; None: accounts.database


@dataclass(frozen=True, kw_only=True, slots=True)
class AccountsSettings:
    """Where users and keys live."""

    database: str = "sqlite+aiosqlite:///citadel.db"  # SQL_DATABASE_ENDPOINT sets a PostgreSQL one
    key_cache_ttl_seconds: float = 5.0  # how long a key lookup is trusted (revocation delay)
    key_cache_size: int = 100_000  # known keys kept (least recently used evicted first)
    # Keys made before the checksummed format (citadel.accounts.keyformat) are still looked up.
    accept_legacy_keys: bool = True
    default_tier: str = "free"


@dataclass(frozen=True, kw_only=True, slots=True)
class ObservabilitySettings:
    """Prometheus and Alertmanager as Citadel generates them (citadel.observability)."""

    rules_dir: str = "citadel-rules"  # where `citadel rules generate` and :9094 write rule files
    data_dir: str = "citadel-data"  # `citadel up`'s Prometheus and Alertmanager keep data here
    scrape_interval_seconds: float = 15.0  # the generated prometheus.yml's scrape and evaluation
    # Every rule window and `for` divided by this: an SLO burn in seconds, for tests and demos.
    speedup: float = 1.0


@dataclass(frozen=True, kw_only=True, slots=True)
class GraphQLSettings:
    """The GraphQL API's protections (citadel.graphql.protect)."""

    max_depth: int = 10  # the deepest selection a query may nest
    max_cost: int = 50_000  # the most a single operation may cost (objects in its answer)
    # The cost a key may spend per minute, through the limiter (0: no budget); a query's cost is
    # reserved before it runs and settled to what its answer held.
    cost_per_minute: int = 200_000


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
    metrics: MetricsSettings = MetricsSettings()
    grafana: GrafanaSettings = GrafanaSettings()
    # The `alerting:` section as read; citadel.alerting.definitions validates it into typed
    # objects (the alerting service owns its schema), naming keys like alerting.rules[0].query.
    alerting: Mapping[str, Any] = field(default_factory=dict)
    # `slos:` as read (None: not given; citadel.observability.services.slos_for gives defaults).
    slos: tuple[Slo, ...] | None = None
    observability: ObservabilitySettings = ObservabilitySettings()
    graphql: GraphQLSettings = GraphQLSettings()
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

    def metrics_token(self) -> str | None:
        """The bearer token ``/metrics`` requires, or None when it is open to anyone.

        ``metrics.token`` when set; else the admin key when a token is required (by default
        outside development and test); else None.
        """
        if self.metrics.token:
            return self.metrics.token
        return self.gateway.admin_key if self.metrics.require_token else None

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
