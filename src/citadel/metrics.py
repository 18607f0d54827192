"""Every metric Citadel exports, and a small, fast registry that renders them for Prometheus.

The catalogue (``CATALOGUE``) defines each metric once; services record into it, and the
Prometheus rules and Grafana dashboards are generated from it, so no name can drift between them.
Names follow the OpenTelemetry GenAI semantic conventions where one exists, vLLM's names for the
simulator, and a ``citadel_`` prefix otherwise.

Theory of operation. A ``Registry`` belongs to one service process (no globals). Label values are
passed as a tuple in spec order and used as the dict key as they are, so a counter increment is a
dict update and a histogram observation a bisect plus two list updates. Nothing is validated on
that hot path: a wrong label count is a programming error that ``render`` skips and reports in a
comment, so a scrape never fails. The registry is not thread-safe; a worker records from its one
event loop.

With ``--workers N`` a scrape reaches any one worker, so ``SharedMetrics`` has each worker write
its whole state to ``<directory>/<pid>.json`` (atomically, by rename) and merges every file on a
scrape: counters, histograms and gauges sum, except ``*_info`` gauges, which take the maximum
because every worker reports the same 1. Give each run an empty directory: the files of exited
workers keep counting (counters are cumulative), and ``retire`` zeroes an exiting worker's gauges.
"""

from __future__ import annotations

import math
import os
import re
from bisect import bisect_left
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, Literal, TypeVar

import orjson

Kind = Literal["counter", "gauge", "histogram"]
_KINDS: dict[str, Kind] = {"counter": "counter", "gauge": "gauge", "histogram": "histogram"}
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


@dataclass(frozen=True, kw_only=True, slots=True)
class MetricSpec:
    """One metric: its full exposition name, type, help text, label names and histogram buckets."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms only, strictly ascending; +Inf is implied
    unit: str = ""

    def __post_init__(self) -> None:
        where = f"metric {self.name!r}"
        if not _NAME.match(self.name):
            raise ValueError(f"{where}: expected a name matching [a-zA-Z_:][a-zA-Z0-9_:]*")
        if self.kind not in _KINDS:
            raise ValueError(f"{where}: kind {self.kind!r}, expected counter, gauge or histogram")
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"{where}: a counter's name must end with _total")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{where}: duplicate label in {self.labels!r}")
        for label in self.labels:
            reserved = label.startswith("__") or (self.kind == "histogram" and label == "le")
            if reserved or not _LABEL.match(label):
                raise ValueError(f"{where}: label {label!r} is not a legal label name")
        if self.kind != "histogram":
            if self.buckets:
                raise ValueError(f"{where}: only a histogram has buckets")
            return
        ordered = all(a < b for a, b in zip(self.buckets, self.buckets[1:], strict=False))
        if not self.buckets or not ordered or not all(map(math.isfinite, self.buckets)):
            raise ValueError(f"{where}: buckets {self.buckets!r}, expected finite and ascending")


def _counter(name: str, labels: tuple[str, ...], help: str, unit: str = "") -> MetricSpec:
    return MetricSpec(name=name, kind="counter", help=help, labels=labels, unit=unit)


def _gauge(name: str, labels: tuple[str, ...], help: str) -> MetricSpec:
    return MetricSpec(name=name, kind="gauge", help=help, labels=labels)


def _histogram(
    name: str, labels: tuple[str, ...], buckets: tuple[float, ...], help: str, unit: str = "seconds"
) -> MetricSpec:
    return MetricSpec(
        name=name, kind="histogram", help=help, labels=labels, buckets=buckets, unit=unit
    )


_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0)
_TOKENS = tuple(float(4**i) for i in range(11))  # 1 .. 1,048,576
_ROUTE = ("model", "deployment")
_MODEL = ("model_name",)  # the simulator's label, as vLLM names it

GATEWAY_REQUESTS = _counter(
    "citadel_gateway_requests_total",
    ("endpoint", *_ROUTE, "status"),
    "Gateway API requests answered, by HTTP status code.",
)
GATEWAY_REQUEST_DURATION = _histogram(
    "gen_ai_server_request_duration_seconds",
    ("endpoint", *_ROUTE),
    _SECONDS,
    "Time from receiving a gateway API request to sending the last byte of its response.",
)
GATEWAY_TTFT = _histogram(
    "gen_ai_server_time_to_first_token_seconds", _ROUTE, _TTFT, "Time to the first output token."
)
GATEWAY_TPOT = _histogram(
    "gen_ai_server_time_per_output_token_seconds", _ROUTE, _TPOT, "Time per output token."
)
GATEWAY_TOKENS = _histogram(
    "gen_ai_client_token_usage",
    (*_ROUTE, "token_type"),
    _TOKENS,
    "Tokens per request, by token_type (input or output).",
    unit="tokens",
)
GATEWAY_TOKENS_TOTAL = _counter(
    "citadel_gateway_tokens_total", (*_ROUTE, "token_type"), "Tokens processed.", unit="tokens"
)
GATEWAY_IN_FLIGHT = _gauge(
    "citadel_gateway_requests_in_flight", ("model",), "Gateway requests not yet answered in full."
)
GATEWAY_UPSTREAM_ERRORS = _counter(
    "citadel_gateway_upstream_errors_total",
    (*_ROUTE, "kind"),
    "Failed upstream attempts, by kind (connect, timeout_connect, timeout_first_byte, "
    "timeout_total, status_5xx, status_4xx, malformed, disconnect).",
)
GATEWAY_CLIENT_DISCONNECTS = _counter(
    "citadel_gateway_client_disconnects_total",
    ("model",),
    "Gateway requests whose client went away before the response was complete.",
)
LIMITER_DECISIONS = _counter(
    "citadel_limiter_decisions_total",
    ("tier", "decision"),
    "Admissions by the limiter: decision is allowed, or the name of the limit that refused.",
)
LIMITER_FAILURES = _counter(
    "citadel_limiter_failures_total",
    ("operation", "mode"),
    "Limiter calls that failed because the backend was unreachable (mode: open or closed).",
)
AUTH_FAILURES = _counter(
    "citadel_gateway_auth_failures_total",
    ("reason",),
    "Requests refused by authentication: missing, malformed, invalid, expired, throttled, or "
    "store_unavailable.",
)
ROUTING_DECISIONS = _counter(
    "citadel_routing_decisions_total",
    ("model", "deployment", "balancer"),
    "Deployments chosen by the router, by balancer.",
)
ROUTING_RETRIES = _counter(
    "citadel_routing_retries_total",
    ("model", "outcome"),
    "Retries on another deployment or fallback model: attempted, or refused by the retry budget.",
)
BREAKER_TRANSITIONS = _counter(
    "citadel_breaker_transitions_total",
    ("deployment", "from_state", "to_state", "event"),
    "Circuit-breaker state changes per deployment.",
)
BREAKER_STATE = _gauge(
    "citadel_breaker_state",
    ("deployment",),
    "Circuit-breaker state per deployment: 0 closed, 1 half-open, 2 open.",
)
DEPLOYMENT_HEALTHY = _gauge(
    "citadel_deployment_healthy",
    ("deployment",),
    "1 when the deployment's active health check passes (and it is not drained), else 0.",
)
HTTP_REQUESTS = _counter(
    "citadel_http_requests_total",
    ("service", "method", "route", "status"),
    "HTTP requests to every route other than the gateway's API, by HTTP status code.",
)
SERVICE_INFO = _gauge(
    "citadel_service_info", ("service", "version"), "Always 1; the labels name the service."
)
SIM_RUNNING = _gauge("vllm:num_requests_running", _MODEL, "Simulated requests being generated.")
SIM_WAITING = _gauge(
    "vllm:num_requests_waiting",
    _MODEL,
    "Simulated requests queued for a slot (--max-num-seqs) or for KV cache (--kv-cache-tokens).",
)
SIM_KV_CACHE = _gauge(
    "vllm:kv_cache_usage_perc",
    _MODEL,
    "Share of the simulated KV cache held by running requests (1 = all of it), as vLLM v1.",
)
SIM_TTFT = _histogram(
    "vllm:time_to_first_token_seconds", _MODEL, _TTFT, "Simulated time to first token."
)
SIM_TPOT = _histogram(
    "vllm:time_per_output_token_seconds", _MODEL, _TPOT, "Simulated time per output token."
)
SIM_E2E = _histogram(
    "vllm:e2e_request_latency_seconds", _MODEL, _SECONDS, "Simulated end-to-end request latency."
)
SIM_PROMPT_TOKENS = _counter(
    "vllm:prompt_tokens_total", _MODEL, "Prompt tokens the simulator processed.", unit="tokens"
)
SIM_GENERATION_TOKENS = _counter(
    "vllm:generation_tokens_total", _MODEL, "Tokens the simulator generated.", unit="tokens"
)
SIM_REQUESTS = _counter(
    "vllm:request_success_total", (*_MODEL, "finished_reason"), "Simulated requests finished."
)
SIM_ABORTED = _counter(
    "citadel_sim_requests_aborted_total", _MODEL, "Simulated requests whose client went away."
)
SIM_FAULTS = _counter(
    "citadel_sim_faults_injected_total", ("kind",), "Faults the simulator injected, by kind."
)

# Business metrics (the custom-metrics service, :9091): computed from the usage ledger's rollups
# at scrape time. "This month" is the calendar month in limits.timezone, up to now.
_BUSINESS = ("tier", "team", "team_name", "model")  # team: its id; team_name: "" if unknown
BUSINESS_SPEND = _gauge(
    "citadel_business_spend_usd", _BUSINESS, "Charged to users this month, in USD."
)
BUSINESS_TOKENS = _gauge(
    "citadel_business_tokens",
    (*_BUSINESS, "token_type"),
    "Tokens served this month, by token_type (input or output).",
)
BUSINESS_REQUESTS = _gauge("citadel_business_requests", _BUSINESS, "Requests served this month.")
BUSINESS_ACTIVE_USERS = _gauge(
    "citadel_business_active_users",
    ("tier",),
    "Users with at least one request in the last 24 hours (to the hour), by tier.",
)
BUSINESS_BUDGET_UTILISATION = _gauge(
    "citadel_business_budget_utilisation_ratio",
    ("scope", "id", "name"),
    "This month's spend over the monthly cost budget (1 = all of it), of each user and team "
    "(scope) with a budget; name is the user's or team's.",
)
BUSINESS_INFRA_COST = _gauge(
    "citadel_business_infrastructure_cost_usd",
    ("model", "deployment"),
    "What each deployment's GPUs cost this month so far (gpu_hour_usd x gpus x hours), in USD.",
)
BUSINESS_COST_PER_1K = _gauge(
    "citadel_business_cost_per_1k_tokens_usd",
    ("model", "deployment", "kind"),
    "This month's cost of 1000 tokens on each deployment: kind infrastructure (the real cost at "
    "its utilisation) or charged (the price users pay).",
)
BUSINESS_REFERENCE_COST = _gauge(
    "citadel_business_reference_cost_usd",
    ("model",),
    "What this month's tokens would have cost at the model's commercial reference price, in USD.",
)
BUSINESS_SAVINGS = _gauge(
    "citadel_business_savings_usd",
    ("model",),
    "Reference cost less infrastructure cost this month, in USD, for models with a reference "
    "price.",
)
LEDGER_LAG = _gauge(
    "citadel_ledger_lag_events", (), "Usage events waiting to be written to the ledger."
)
LEDGER_WRITER_ERRORS = _counter(
    "citadel_ledger_writer_errors_total",
    (),
    "Ledger batches the writer failed to store (each is retried).",
)

# Predictive alerting (:9092): rule evaluations, the models behind them, and what reached
# Alertmanager.
ALERTING_EVALUATIONS = _counter(
    "citadel_alerting_evaluations_total",
    ("rule", "outcome"),
    "Alert rule evaluations, by outcome: ok, firing, insufficient_history or error.",
)
ALERTING_EVALUATION_DURATION = _histogram(
    "citadel_alerting_evaluation_duration_seconds",
    ("rule",),
    _SECONDS,
    "Time to evaluate one alert rule: the query, the model fits and the decision.",
)
ALERTING_MODEL_ERROR = _gauge(
    "citadel_alerting_model_backtest_error",
    ("rule", "model"),
    "The backtest error of the forecasting model chosen for each rule (lower is more accurate).",
)
ALERTING_ROUNDS_SKIPPED = _counter(
    "citadel_alerting_rounds_skipped_total",
    (),
    "Evaluation rounds skipped because the round before outlasted its interval.",
)
ALERTING_ALERTS_FIRING = _gauge(
    "citadel_alerting_alerts_firing", ("rule", "severity"), "Alerts firing now, by rule."
)
ALERTING_ALERTS_SENT = _counter(
    "citadel_alerting_alerts_sent_total",
    ("state",),
    "Alerts delivered to Alertmanager, by state (firing or resolved).",
)
ALERTING_ALERTS_DROPPED = _counter(
    "citadel_alerting_alerts_dropped_total",
    (),
    "Alerts dropped undelivered because the queue for an unreachable Alertmanager was full.",
)
ALERTING_DELIVERY_FAILURES = _counter(
    "citadel_alerting_alertmanager_failures_total",
    (),
    "Failed attempts to post alerts to Alertmanager (each is retried with back-off).",
)
STREAMING_CONNECTIONS = _gauge(
    "citadel_streaming_connections",
    ("protocol",),
    "Open streaming-service connections, by protocol (websocket, sse).",
)
STREAMING_MESSAGES = _counter(
    "citadel_streaming_messages_sent_total",
    ("protocol",),
    "Messages (WebSocket frames, SSE events) the streaming service sent.",
)
STREAMING_BYTES = _counter(
    "citadel_streaming_sent_bytes_total",
    ("protocol",),
    "Bytes of messages the streaming service sent.",
    unit="bytes",
)
STREAMING_LAGGED = _counter(
    "citadel_streaming_lagged_events_total",
    ("topic",),
    "Live events dropped for subscribers that fell behind (each told with a lagged message).",
)
STREAMING_CANCELLED = _counter(
    "citadel_streaming_cancellations_total",
    (),
    "Completions cancelled by a client's cancel message or its disconnect.",
)

# The GraphQL API (:9095): operations by name and outcome, their duration and cost, refusals.
_COST = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0, 100000.0)
GRAPHQL_OPERATIONS = _counter(
    "citadel_graphql_operations_total",
    ("operation", "type", "outcome"),
    "GraphQL operations answered, by operation name (anonymous: unnamed; other: past the "
    "first 200 names), type (query, mutation, subscription) and outcome: ok, error (a "
    "resolver's), invalid (did not parse or validate) or refused (depth, aliases, tokens, cost "
    "or budget).",
)
GRAPHQL_OPERATION_DURATION = _histogram(
    "citadel_graphql_operation_duration_seconds",
    ("operation", "type"),
    _SECONDS,
    "Time to answer one GraphQL operation: parse, validation, cost, resolvers.",
)
GRAPHQL_OPERATION_COST = _histogram(
    "citadel_graphql_operation_cost",
    ("kind",),
    _COST,
    "The cost of GraphQL operations (objects their answers can hold): kind requested (computed "
    "before running) or actual (held by the answer).",
    unit="objects",
)
GRAPHQL_REFUSALS = _counter(
    "citadel_graphql_refusals_total",
    ("reason",),
    "GraphQL operations refused before running, by reason: depth, aliases, tokens, cost (over "
    "the maximum) or budget (over the key's cost budget this minute).",
)

CATALOGUE: tuple[MetricSpec, ...] = (
    *(GATEWAY_REQUESTS, GATEWAY_REQUEST_DURATION, GATEWAY_TTFT, GATEWAY_TPOT, GATEWAY_TOKENS),
    *(GATEWAY_TOKENS_TOTAL, GATEWAY_IN_FLIGHT, GATEWAY_UPSTREAM_ERRORS, GATEWAY_CLIENT_DISCONNECTS),
    *(HTTP_REQUESTS, SERVICE_INFO, LIMITER_DECISIONS, LIMITER_FAILURES, AUTH_FAILURES),
    *(ROUTING_DECISIONS, ROUTING_RETRIES, BREAKER_TRANSITIONS, BREAKER_STATE, DEPLOYMENT_HEALTHY),
    *(SIM_RUNNING, SIM_WAITING, SIM_KV_CACHE, SIM_TTFT, SIM_TPOT, SIM_E2E, SIM_PROMPT_TOKENS),
    *(SIM_GENERATION_TOKENS, SIM_REQUESTS, SIM_ABORTED, SIM_FAULTS),
    *(BUSINESS_SPEND, BUSINESS_TOKENS, BUSINESS_REQUESTS, BUSINESS_ACTIVE_USERS),
    *(BUSINESS_BUDGET_UTILISATION, BUSINESS_INFRA_COST, BUSINESS_COST_PER_1K),
    *(BUSINESS_REFERENCE_COST, BUSINESS_SAVINGS, LEDGER_LAG, LEDGER_WRITER_ERRORS),
    *(ALERTING_EVALUATIONS, ALERTING_EVALUATION_DURATION, ALERTING_MODEL_ERROR),
    ALERTING_ROUNDS_SKIPPED,
    *(ALERTING_ALERTS_FIRING, ALERTING_ALERTS_SENT, ALERTING_ALERTS_DROPPED),
    ALERTING_DELIVERY_FAILURES,
    *(STREAMING_CONNECTIONS, STREAMING_MESSAGES, STREAMING_BYTES, STREAMING_LAGGED),
    STREAMING_CANCELLED,
    *(GRAPHQL_OPERATIONS, GRAPHQL_OPERATION_DURATION, GRAPHQL_OPERATION_COST, GRAPHQL_REFUSALS),
)
_BY_NAME = MappingProxyType({s.name: s for s in CATALOGUE})


def spec(name: str) -> MetricSpec:
    """Return the catalogue's spec named ``name``; KeyError names an unknown metric."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}: not in citadel.metrics.CATALOGUE") from None


def _fmt(value: float) -> str:
    if type(value) is int:
        return str(value)
    if math.isfinite(value):
        return repr(value)
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


def _escape(value: object, quote: bool = True) -> str:
    text = str(value).replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if quote else text


def _pairs(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))


Labels = tuple[str, ...]


class _Metric:
    """What every metric shares: a spec and one value per label tuple."""

    __slots__ = ("_fields", "_values", "spec")

    def __init__(self, spec: MetricSpec) -> None:
        self.spec = spec
        self._values: dict[Labels, Any] = {}
        self._fields = asdict(spec)  # made once: a snapshot is taken every second

    def _export(self) -> list[list[Any]]:
        return [[list(labels), value] for labels, value in self._values.items()]

    def _absorb(self, labels: Labels, value: Any) -> None:
        old = self._values.get(labels)
        self._values[labels] = value if old is None else old + value

    def _render(self, out: list[str]) -> None:
        s = self.spec
        out += [f"# HELP {s.name} {_escape(s.help, quote=False)}", f"# TYPE {s.name} {s.kind}"]
        items = list(self._values.items())
        good = [(labels, value) for labels, value in items if len(labels) == len(s.labels)]
        if len(good) != len(items):
            out += [f"# citadel: skipped {len(items) - len(good)} series with wrong label count"]
        for labels, value in good:
            self._render_series(out, _pairs(s.labels, labels), value)

    def _render_series(self, out: list[str], pairs: str, value: Any) -> None:
        braces = f"{{{pairs}}}" if pairs else ""
        out += [f"{self.spec.name}{braces} {_fmt(value)}"]


class Counter(_Metric):
    """A cumulative total. Label values are given in spec order and are not checked here."""

    __slots__ = ()

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        """Add ``amount`` (not negative) to the series named by ``labels``."""
        if amount < 0:
            raise ValueError(f"{self.spec.name}: counter increment {amount!r}, expected >= 0")
        values = self._values
        values[labels] = values.get(labels, 0.0) + amount


class Gauge(_Metric):
    """A value that goes up and down. Label values are given in spec order and are not checked."""

    __slots__ = ()

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        """Add ``amount`` to the series named by ``labels``."""
        values = self._values
        values[labels] = values.get(labels, 0.0) + amount

    def dec(self, labels: Labels, amount: float = 1.0) -> None:
        """Subtract ``amount`` from the series named by ``labels``."""
        values = self._values
        values[labels] = values.get(labels, 0.0) - amount

    def set(self, labels: Labels, value: float) -> None:
        """Set the series named by ``labels`` to ``value``."""
        self._values[labels] = value

    def _absorb(self, labels: Labels, value: Any) -> None:
        old = self._values.get(labels)
        if old is not None and self.spec.name.endswith("_info"):
            self._values[labels] = max(old, value)  # every worker reports the same fact
        else:
            super()._absorb(labels, value)


class Histogram(_Metric):
    """Observations counted into buckets. A series is a list: one count per bucket (not
    cumulative; the last one is +Inf), then the sum of the observations."""

    __slots__ = ("_bounds", "_le", "_width")

    def __init__(self, spec: MetricSpec) -> None:
        super().__init__(spec)
        self._bounds = list(spec.buckets)
        self._width = len(spec.buckets) + 1
        self._le = [repr(float(b)) for b in spec.buckets] + ["+Inf"]

    def observe(self, labels: Labels, value: float) -> None:
        """Count ``value`` into the series named by ``labels``."""
        series = self._values.get(labels)
        if series is None:
            series = self._values[labels] = [0] * self._width + [0.0]
        series[bisect_left(self._bounds, value)] += 1  # bucket i holds bounds[i-1] < v <= bounds[i]
        series[-1] += value

    def _export(self) -> list[list[Any]]:
        return [[list(labels), list(series)] for labels, series in self._values.items()]

    def _absorb(self, labels: Labels, value: Any) -> None:
        series = self._values.setdefault(labels, [0] * self._width + [0.0])
        for i, v in enumerate(value):
            series[i] += v

    def _render_series(self, out: list[str], pairs: str, value: Any) -> None:
        name, prefix = self.spec.name, f"{pairs}," if pairs else ""
        total = 0
        for le, count in zip(self._le, value, strict=False):
            total += count
            out += [f'{name}_bucket{{{prefix}le="{le}"}} {_fmt(total)}']
        braces = f"{{{pairs}}}" if pairs else ""
        out += [f"{name}_sum{braces} {_fmt(value[-1])}", f"{name}_count{braces} {_fmt(total)}"]


_CLASSES: dict[Kind, type[_Metric]] = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
_M = TypeVar("_M", bound=_Metric)


class Registry:
    """The metrics of one service process, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def counter(self, spec: MetricSpec) -> Counter:
        """Register the counter for ``spec``, or return the one already registered."""
        return self._register(spec, Counter)

    def gauge(self, spec: MetricSpec) -> Gauge:
        """Register the gauge for ``spec``, or return the one already registered."""
        return self._register(spec, Gauge)

    def histogram(self, spec: MetricSpec) -> Histogram:
        """Register the histogram for ``spec``, or return the one already registered."""
        return self._register(spec, Histogram)

    def _register(self, spec: MetricSpec, cls: type[_M]) -> _M:
        if _CLASSES[spec.kind] is not cls:
            raise ValueError(f"metric {spec.name!r} is a {spec.kind}, not a {cls.__name__}")
        metric = self._metrics.setdefault(spec.name, cls(spec))
        if metric.spec != spec or not isinstance(metric, cls):
            raise ValueError(f"metric {spec.name!r} is already registered with a different spec")
        return metric

    def render(self) -> bytes:
        """Return every metric in the Prometheus text exposition format, version 0.0.4."""
        out: list[str] = []
        for metric in self._metrics.values():
            metric._render(out)
        return "".join(f"{line}\n" for line in out).encode()

    def snapshot(self) -> dict[str, Any]:
        """Return the full state, specs included, as JSON-serialisable data."""
        metrics = self._metrics.values()
        return {"metrics": [{"spec": dict(m._fields), "series": m._export()} for m in metrics]}


def _number(value: Any) -> Any:
    if value is None:  # JSON has no infinities or NaN; orjson writes them as null
        return math.nan
    if type(value) not in (int, float):
        raise TypeError(f"expected a number, got {value!r}")
    return value


def _parse(snapshot: Any) -> list[tuple[MetricSpec, list[tuple[Labels, Any]]]]:
    """Read a snapshot back into specs and series, checking every shape so merging cannot fail."""
    parsed = []
    for entry in snapshot["metrics"]:
        fields = entry["spec"]
        fields["kind"] = _KINDS[fields["kind"]]
        fields["labels"] = tuple(fields["labels"])
        fields["buckets"] = tuple(float(b) for b in fields["buckets"])
        spec = MetricSpec(**fields)
        series: list[tuple[Labels, Any]] = []
        for labels, value in entry["series"]:
            if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
                raise TypeError(f"{spec.name}: label values must be a list of strings")
            if spec.kind != "histogram":
                series.append((tuple(labels), _number(value)))
            elif isinstance(value, list) and len(value) == len(spec.buckets) + 2:
                series.append((tuple(labels), [_number(v) for v in value]))
            else:
                raise ValueError(f"{spec.name}: a histogram series of the wrong shape")
        parsed.append((spec, series))
    return parsed


class SharedMetrics:
    """Each worker writes its registry snapshot to <directory>/<pid>.json; a scrape merges them."""

    def __init__(self, registry: Registry, directory: str, pid: int) -> None:
        self._registry = registry
        self._directory = directory
        self._path = os.path.join(directory, f"{pid}.json")
        self._tmp = os.path.join(directory, f"{pid}.tmp")  # not *.json: a scrape never reads it
        self._last = b""
        self._retired = False
        os.makedirs(directory, exist_ok=True)

    def flush(self) -> None:
        """Write this worker's snapshot atomically; skip the write when nothing changed."""
        snapshot = self._registry.snapshot()
        if self._retired:
            for entry in snapshot["metrics"]:
                if entry["spec"]["kind"] == "gauge":
                    entry["series"] = [[labels, 0.0] for labels, _ in entry["series"]]
        data = orjson.dumps(snapshot)
        if data == self._last:
            return
        with open(self._tmp, "wb") as f:
            f.write(data)
        os.replace(self._tmp, self._path)
        self._last = data

    def retire(self) -> None:
        """At a clean exit: zero this worker's gauges in its file, keeping its cumulative counts."""
        self._retired = True
        self.flush()

    def render(self) -> bytes:
        """Flush this worker, then render the sum of every worker's file."""
        self.flush()
        merged = Registry()
        for metric in self._registry._metrics.values():
            merged._register(metric.spec, _CLASSES[metric.spec.kind])
        with os.scandir(self._directory) as entries:
            paths = sorted(e.path for e in entries if e.name.endswith(".json"))
        for path in paths:
            try:
                with open(path, "rb") as f:
                    parsed = _parse(orjson.loads(f.read()))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a partial or foreign file: skip it rather than fail the scrape
            for spec_, series in parsed:
                try:
                    target = merged._register(spec_, _CLASSES[spec_.kind])
                except ValueError:
                    continue  # this worker's spec disagrees with ours: keep ours
                for labels, value in series:
                    target._absorb(labels, value)
        return merged.render()
