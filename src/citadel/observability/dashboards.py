"""Grafana dashboards generated from the catalogue with grafana-foundation-sdk (11.6 builds).

Pure: no I/O. ``DASHBOARDS`` holds the panel definitions (title, queries, unit) — the one source
the Grafana JSON (``grafana_json``) and the console read. A dashboard's ``ledger`` panels are
drawn by the console from the usage ledger (custom-metrics' analytics API, :9091), so the
business numbers show with embedded defaults and no Prometheus; Grafana shows the same numbers
from the business gauges :9091 exports. Queries over recording rules come from
``names.RECORDED``; raw queries name a ``MetricSpec``. Every query filters by the template
variables it uses; the Prometheus data source is the ``$datasource`` variable, never a uid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as gm

from citadel import metrics as m
from citadel.observability.names import record

FOLDER = "Citadel"
FOLDER_UID = "citadel"
_DS = gm.DataSourceRef(type_val="prometheus", uid="${datasource}")
_MODEL = 'model=~"$model"'
_DEPLOYMENT = 'deployment=~"$deployment"'
_TEAM = 'team=~"$team"'


@dataclass(frozen=True, kw_only=True, slots=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Panel:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class LedgerPanel:
    """A panel read from one of :9091's analytics calls: ``path`` with ``params`` (the range is
    added), one series (or bar group) per distinct ``series`` field, one value per ``values``
    field; ``timeseries`` rows carry an hourly ``bucket``, ``bars`` rows are categories."""

    title: str
    unit: str
    path: str
    params: tuple[tuple[str, str], ...]
    series: str
    values: tuple[str, ...]
    kind: Literal["timeseries", "bars"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Dashboard:
    uid: str
    title: str
    panels: tuple[Panel, ...]
    variables: tuple[str, ...] = ("model", "deployment")
    ledger: tuple[LedgerPanel, ...] = ()


def _q(expr: str, legend: str) -> Query:
    return Query(expr=expr, legend=legend)


def _p(title: str, unit: str, *queries: Query) -> Panel:
    return Panel(title=title, unit=unit, queries=queries)


def _rate(spec: m.MetricSpec, matchers: str, by: str, suffix: str = "") -> str:
    return f"sum by ({by}) (rate({spec.name}{suffix}{{{matchers}}}[$__rate_interval]))"


def _quantile(spec: m.MetricSpec, q: str, matchers: str, by: str) -> str:
    return f"histogram_quantile({q}, {_rate(spec, matchers, f'{by}, le', '_bucket')})"


def _gauge(spec: m.MetricSpec, matchers: str, by: str) -> str:
    return f"sum by ({by}) ({spec.name}{{{matchers}}})"


def _rec(name: str, matchers: str, by: str) -> str:
    return f"sum by ({by}) ({record(name).name}{{{matchers}}})"


_ROUTE = f"{_MODEL},{_DEPLOYMENT}"
_SIM = 'model_name=~"$model"'


def _overview() -> Dashboard:
    req = "model_deployment:citadel_gateway_requests:rate5m"
    latency = "model_deployment:gen_ai_server_request_duration_seconds:p{}_5m"
    ttft = "model_deployment:gen_ai_server_time_to_first_token_seconds:p{}_5m"
    return Dashboard(
        uid="citadel-overview",
        title="Citadel / Overview",
        panels=(
            _p("Requests/s", "reqps", _q(_rec(req, _ROUTE, "model"), "{{model}}")),
            _p(
                "Error ratio (5xx)",
                "percentunit",
                _q(_rec("model:citadel_gateway_errors:ratio_rate5m", _MODEL, "model"), "{{model}}"),
            ),
            _p(
                "Latency",
                "s",
                *(
                    _q(_rec(latency.format(q), _ROUTE, "model"), f"p{q} {{{{model}}}}")
                    for q in ("50", "95", "99")
                ),
            ),
            _p(
                "Time to first token",
                "s",
                *(
                    _q(_rec(ttft.format(q), _ROUTE, "model"), f"p{q} {{{{model}}}}")
                    for q in ("50", "95", "99")
                ),
            ),
            _p(
                "Time per output token p95",
                "s",
                _q(_quantile(m.GATEWAY_TPOT, "0.95", _ROUTE, "model"), "{{model}}"),
            ),
            _p(
                "Tokens/s",
                "short",
                _q(
                    _rec(
                        "model_deployment:citadel_gateway_tokens:rate5m",
                        _ROUTE,
                        "model, token_type",
                    ),
                    "{{model}} {{token_type}}",
                ),
            ),
            _p(
                "Tokens per request (mean)",
                "short",
                _q(
                    f"{_rate(m.GATEWAY_TOKENS, _ROUTE, 'token_type', '_sum')} / "
                    f"{_rate(m.GATEWAY_TOKENS, _ROUTE, 'token_type', '_count')}",
                    "{{token_type}}",
                ),
            ),
            _p("In flight", "short", _q(_gauge(m.GATEWAY_IN_FLIGHT, _MODEL, "model"), "{{model}}")),
            _p(
                "Client disconnects/s",
                "reqps",
                _q(_rate(m.GATEWAY_CLIENT_DISCONNECTS, _MODEL, "model"), "{{model}}"),
            ),
            _p(
                "Authentication failures/s",
                "reqps",
                _q(_rate(m.AUTH_FAILURES, 'reason=~".+"', "reason"), "{{reason}}"),
            ),
            _p(
                "SLO error budget remaining",
                "percentunit",
                _q(f"min by (slo) (slo:error_budget_remaining:ratio{{{_MODEL}}})", "{{slo}}"),
            ),
            _p(
                "Service API requests/s",
                "reqps",
                _q(
                    _rate(m.HTTP_REQUESTS, 'service=~".+"', "service, status"),
                    "{{service}} {{status}}",
                ),
            ),
            _p(
                "Services running",
                "short",
                _q(f'count by (service) ({m.SERVICE_INFO.name}{{service=~".+"}})', "{{service}}"),
            ),
        ),
    )


def _deployments() -> Dashboard:
    return Dashboard(
        uid="citadel-deployments",
        title="Citadel / Deployments and routing",
        panels=(
            _p(
                "Share of traffic",
                "percentunit",
                _q(
                    f"{_rate(m.ROUTING_DECISIONS, _ROUTE, 'deployment')} / ignoring (deployment) "
                    f"group_left () sum({_rate(m.ROUTING_DECISIONS, _ROUTE, 'model')})",
                    "{{deployment}}",
                ),
            ),
            _p(
                "Upstream errors/s",
                "reqps",
                _q(
                    _rec(
                        "model_deployment:citadel_gateway_upstream_errors:rate5m",
                        _ROUTE,
                        "deployment, kind",
                    ),
                    "{{deployment}} {{kind}}",
                ),
            ),
            _p(
                "Retries and fallbacks/s",
                "reqps",
                _q(_rate(m.ROUTING_RETRIES, _MODEL, "model, outcome"), "{{model}} {{outcome}}"),
            ),
            _p(
                "Breaker state (0 closed, 2 open)",
                "short",
                _q(_gauge(m.BREAKER_STATE, _DEPLOYMENT, "deployment"), "{{deployment}}"),
            ),
            _p(
                "Breaker transitions/s",
                "short",
                _q(
                    _rate(m.BREAKER_TRANSITIONS, _DEPLOYMENT, "deployment, to_state"),
                    "{{deployment}} → {{to_state}}",
                ),
            ),
            _p(
                "Healthy",
                "short",
                _q(_gauge(m.DEPLOYMENT_HEALTHY, _DEPLOYMENT, "deployment"), "{{deployment}}"),
            ),
            _p(
                "Model server: running and waiting",
                "short",
                _q(_gauge(m.SIM_RUNNING, _SIM, "model_name"), "running {{model_name}}"),
                _q(_gauge(m.SIM_WAITING, _SIM, "model_name"), "waiting {{model_name}}"),
            ),
            _p(
                "Model server: KV-cache use",
                "percentunit",
                _q(f"max by (model_name) ({m.SIM_KV_CACHE.name}{{{_SIM}}})", "{{model_name}}"),
            ),
            _p(
                "Model server: TTFT p95 (its view vs the gateway's)",
                "s",
                _q(_quantile(m.SIM_TTFT, "0.95", _SIM, "model_name"), "server {{model_name}}"),
                _q(_quantile(m.GATEWAY_TTFT, "0.95", _ROUTE, "model"), "gateway {{model}}"),
            ),
            _p(
                "Model server: TPOT and end-to-end p95",
                "s",
                _q(_quantile(m.SIM_TPOT, "0.95", _SIM, "model_name"), "tpot {{model_name}}"),
                _q(_quantile(m.SIM_E2E, "0.95", _SIM, "model_name"), "e2e {{model_name}}"),
            ),
            _p(
                "Model server: tokens/s",
                "short",
                _q(_rate(m.SIM_PROMPT_TOKENS, _SIM, "model_name"), "prompt {{model_name}}"),
                _q(_rate(m.SIM_GENERATION_TOKENS, _SIM, "model_name"), "generated {{model_name}}"),
            ),
            _p(
                "Model server: requests/s",
                "reqps",
                _q(
                    _rate(m.SIM_REQUESTS, _SIM, "model_name, finished_reason"),
                    "{{model_name}} {{finished_reason}}",
                ),
                _q(_rate(m.SIM_ABORTED, _SIM, "model_name"), "aborted {{model_name}}"),
            ),
            _p(
                "Faults injected/s",
                "short",
                _q(_rate(m.SIM_FAULTS, 'kind=~".+"', "kind"), "{{kind}}"),
            ),
        ),
    )


def _users() -> Dashboard:
    return Dashboard(
        uid="citadel-users",
        title="Citadel / Users, teams and limits",
        variables=("model", "team"),
        panels=(
            _p(
                "Refusal ratio by tier",
                "percentunit",
                _q(
                    _rec("tier:citadel_limiter_refusals:ratio_rate5m", 'tier=~".+"', "tier"),
                    "{{tier}}",
                ),
            ),
            _p(
                "Admissions/s by decision",
                "reqps",
                _q(
                    _rate(m.LIMITER_DECISIONS, 'tier=~".+"', "tier, decision"),
                    "{{tier}} {{decision}}",
                ),
            ),
            _p(
                "Limiter failures/s",
                "short",
                _q(
                    _rate(m.LIMITER_FAILURES, 'mode=~".+"', "operation, mode"),
                    "{{operation}} {{mode}}",
                ),
            ),
            _p(
                "Budget used",
                "percentunit",
                _q(
                    f"max by (scope, id, name) "
                    f'({m.BUSINESS_BUDGET_UTILISATION.name}{{scope=~".+"}})',
                    "{{scope}} {{name}} ({{id}})",
                ),
            ),
            _p(
                "Top teams by spend this month",
                "currencyUSD",
                _q(
                    f"topk(10, {_gauge(m.BUSINESS_SPEND, f'{_TEAM},{_MODEL}', 'team, team_name')})",
                    "{{team_name}} ({{team}})",
                ),
            ),
            _p(
                "Top teams by tokens this month",
                "short",
                _q(
                    "topk(10, "
                    f"{_gauge(m.BUSINESS_TOKENS, f'{_TEAM},{_MODEL}', 'team, team_name')})",
                    "{{team_name}} ({{team}})",
                ),
            ),
            _p(
                "Requests this month by tier",
                "short",
                _q(_gauge(m.BUSINESS_REQUESTS, f"{_TEAM},{_MODEL}", "tier"), "{{tier}}"),
            ),
            _p(
                "Active users (24 h)",
                "short",
                _q(_gauge(m.BUSINESS_ACTIVE_USERS, 'tier=~".+"', "tier"), "{{tier}}"),
            ),
        ),
    )


def _hourly(title: str, unit: str, by: str, value: str) -> LedgerPanel:
    return LedgerPanel(
        title=title,
        unit=unit,
        path="/v1/usage",
        params=(("group_by", by), ("bucket", "hour")),
        series=by,
        values=(value,),
        kind="timeseries",
    )


LEDGER_PANELS: tuple[LedgerPanel, ...] = (
    _hourly("Ledger: spend per hour by team", "currencyUSD", "team", "cost_usd"),
    _hourly("Ledger: tokens per hour by model", "short", "model", "total_tokens"),
    LedgerPanel(
        title="Ledger: real cost per 1k tokens by deployment (GPU-hours) and price charged",
        unit="currencyUSD",
        path="/v1/deployments/costs",
        params=(),
        series="deployment",
        values=("infra_per_1k_usd", "charged_per_1k_usd"),
        kind="bars",
    ),
    LedgerPanel(
        title="Ledger: reference cost, infrastructure cost and savings by model",
        unit="currencyUSD",
        path="/v1/savings",
        params=(),
        series="model",
        values=("reference_usd", "infra_usd", "charged_usd", "savings_usd"),
        kind="bars",
    ),
    LedgerPanel(
        title="Ledger: top users by tokens",
        unit="short",
        path="/v1/top",
        params=(("by", "user"), ("metric", "tokens"), ("limit", "10")),
        series="name",
        values=("prompt_tokens", "completion_tokens"),
        kind="bars",
    ),
)


def _business() -> Dashboard:
    return Dashboard(
        uid="citadel-business",
        title="Citadel / Business intelligence",
        variables=("model", "team"),
        ledger=LEDGER_PANELS,
        panels=(
            _p(
                "Spend this month by team and model",
                "currencyUSD",
                _q(
                    _gauge(m.BUSINESS_SPEND, f"{_TEAM},{_MODEL}", "team, model"),
                    "{{team}} {{model}}",
                ),
            ),
            _p(
                "Spend rate by team (USD/s)",
                "currencyUSD",
                _q(
                    _rec(
                        "team_model:citadel_business_spend_usd:deriv1h", f"{_TEAM},{_MODEL}", "team"
                    ),
                    "{{team}}",
                ),
            ),
            _p(
                "Cost per 1k tokens",
                "currencyUSD",
                _q(
                    _gauge(m.BUSINESS_COST_PER_1K, _MODEL, "deployment, kind"),
                    "{{deployment}} {{kind}}",
                ),
            ),
            _p(
                "Infrastructure cost this month",
                "currencyUSD",
                _q(_gauge(m.BUSINESS_INFRA_COST, _MODEL, "deployment"), "{{deployment}}"),
            ),
            _p(
                "Reference cost and savings",
                "currencyUSD",
                _q(_gauge(m.BUSINESS_REFERENCE_COST, _MODEL, "model"), "reference {{model}}"),
                _q(_gauge(m.BUSINESS_SAVINGS, _MODEL, "model"), "savings {{model}}"),
            ),
            _p("Ledger lag", "short", _q(f"max({m.LEDGER_LAG.name})", "events waiting")),
            _p(
                "Ledger writer errors/s",
                "short",
                _q(f"sum(rate({m.LEDGER_WRITER_ERRORS.name}[$__rate_interval]))", "errors"),
            ),
            _p(
                "Streaming connections",
                "short",
                _q(f"sum({m.STREAMING_CONNECTIONS.name})", "open"),
            ),
            _p(
                "Streaming sent/s, lagged and cancelled",
                "short",
                *(
                    _q(f"sum(rate({spec.name}[$__rate_interval]))", label)
                    for spec, label in (
                        (m.STREAMING_MESSAGES, "messages"),
                        (m.STREAMING_BYTES, "bytes"),
                        (m.STREAMING_LAGGED, "lagged events"),
                        (m.STREAMING_CANCELLED, "cancellations"),
                    )
                ),
            ),
            _p(
                "GraphQL operations/s by name and outcome",
                "reqps",
                _q(
                    _rate(m.GRAPHQL_OPERATIONS, "", "operation, outcome"),
                    "{{operation}} {{outcome}}",
                ),
            ),
            _p(
                "GraphQL operation p99 duration",
                "s",
                _q(
                    _quantile(m.GRAPHQL_OPERATION_DURATION, "0.99", "", "operation"),
                    "{{operation}}",
                ),
            ),
            _p(
                "GraphQL operation cost p50 and p99",
                "short",
                _q(_quantile(m.GRAPHQL_OPERATION_COST, "0.5", "", "kind"), "p50 {{kind}}"),
                _q(_quantile(m.GRAPHQL_OPERATION_COST, "0.99", "", "kind"), "p99 {{kind}}"),
            ),
            _p(
                "GraphQL refusals/s by reason",
                "reqps",
                _q(_rate(m.GRAPHQL_REFUSALS, "", "reason"), "{{reason}}"),
            ),
        ),
    )


def _predictive() -> Dashboard:
    return Dashboard(
        uid="citadel-predictive",
        title="Citadel / Predictive alerting",
        variables=(),
        panels=(
            _p(
                "Rule evaluations/s",
                "short",
                _q(
                    _rate(m.ALERTING_EVALUATIONS, 'rule=~".+"', "rule, outcome"),
                    "{{rule}} {{outcome}}",
                ),
                _q(
                    f"sum(rate({m.ALERTING_ROUNDS_SKIPPED.name}[$__rate_interval]))",
                    "rounds skipped",
                ),
            ),
            _p(
                "Evaluation time p95",
                "s",
                _q(
                    _quantile(m.ALERTING_EVALUATION_DURATION, "0.95", 'rule=~".+"', "rule"),
                    "{{rule}}",
                ),
            ),
            _p(
                "Forecast model backtest error",
                "short",
                _q(
                    _gauge(m.ALERTING_MODEL_ERROR, 'rule=~".+"', "rule, model"),
                    "{{rule}} {{model}}",
                ),
            ),
            _p(
                "Alerts firing",
                "short",
                _q(_gauge(m.ALERTING_ALERTS_FIRING, 'rule=~".+"', "rule, severity"), "{{rule}}"),
                _q('count by (alertname) (ALERTS{alertstate="firing"})', "rules: {{alertname}}"),
            ),
            _p(
                "Alert deliveries/s",
                "short",
                _q(_rate(m.ALERTING_ALERTS_SENT, 'state=~".+"', "state"), "sent {{state}}"),
                _q(f"sum(rate({m.ALERTING_ALERTS_DROPPED.name}[$__rate_interval]))", "dropped"),
                _q(f"sum(rate({m.ALERTING_DELIVERY_FAILURES.name}[$__rate_interval]))", "failed"),
            ),
        ),
    )


DASHBOARDS: tuple[Dashboard, ...] = (
    _overview(),
    _deployments(),
    _users(),
    _business(),
    _predictive(),
)
BY_UID = {d.uid: d for d in DASHBOARDS}

VARIABLE_QUERIES = {
    "model": f"label_values({m.GATEWAY_REQUESTS.name}, model)",
    "deployment": f'label_values({m.GATEWAY_REQUESTS.name}{{model=~"$model"}}, deployment)',
    "team": f"label_values({m.BUSINESS_SPEND.name}, team)",
}


def _variable(name: str) -> gd.QueryVariable:
    return (
        gd.QueryVariable(name)
        .label(name.title())
        .query(VARIABLE_QUERIES[name])
        .datasource(_DS)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .refresh(gm.VariableRefresh.ON_TIME_RANGE_CHANGED)
    )


def builder(board: Dashboard) -> gd.Dashboard:
    """The SDK's typed builder for one dashboard."""
    out = (
        gd.Dashboard(board.title)
        .uid(board.uid)
        .tags(["citadel"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(gd.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .link(
            gd.DashboardLink("Citadel")
            .type(gm.DashboardLinkType.DASHBOARDS)
            .tags(["citadel"])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )
    for name in board.variables:
        out = out.with_variable(_variable(name))
    for i, panel in enumerate(board.panels):
        ts = (
            timeseries.Panel()
            .title(panel.title)
            .unit(panel.unit)
            .datasource(_DS)
            .grid_pos(gm.GridPos(h=8, w=12, x=12 * (i % 2), y=8 * (i // 2)))
        )
        for j, q in enumerate(panel.queries):
            ts = ts.with_target(
                prometheus.Dataquery()
                .expr(q.expr)
                .legend_format(q.legend)
                .ref_id(chr(ord("A") + j))
                .datasource(_DS)
            )
        out = out.with_panel(ts)
    return out


# The SDK writes an interval variable's fields on every variable; the published schema
# (@grafana/schema's VariableModel, checked with tsc in tests/observability/test_schema_tsc.py)
# has them on none, and Grafana ignores them elsewhere.
INTERVAL_ONLY = ("auto", "auto_min", "auto_count")


def grafana_json(board: Dashboard) -> dict[str, Any]:
    """The classic dashboard JSON (what Grafana 11/12's HTTP API and file provisioning take)."""
    data: dict[str, Any] = json.loads(json.dumps(builder(board).build(), cls=JSONEncoder))
    for variable in data.get("templating", {}).get("list", []):
        if variable.get("type") != "interval":
            for key in INTERVAL_ONLY:
                variable.pop(key, None)
    return data
