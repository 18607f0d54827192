"""Wiring of the custom-metrics service (:9091): ``create_app(settings, deps)``.

Business intelligence over the usage ledger, behind the admin key (``Authorization: Bearer``):

- ``GET /v1/usage``: usage and cost grouped by any of user, team, model, deployment and tier, per
  hour, per day or over the whole range, optionally filtered on any of them;
- ``GET /v1/top``: the largest users (or teams, models, ...) by cost, tokens, requests or errors;
- ``GET /v1/budgets``: this month's spend of every user or team against its monthly budget;
- ``GET /v1/deployments/costs``: each deployment's real cost per 1000 tokens (its GPU-hours over
  the tokens it served) beside the price charged;
- ``GET /v1/savings``: per model and in all, the reference (commercial) cost of the tokens served,
  the infrastructure cost, the savings and the return on investment.

Each answers JSON, or CSV with a header row given ``?format=csv``. Ranges are ``start`` and
``end`` (RFC 3339, a date, or Unix seconds), whole UTC hours; by default the last 30 days up to
the end of the current hour. A bad parameter is a 400 naming it; the ledger unreachable a 503.

``/metrics`` adds the business metrics (``citadel_business_*``, ``citadel_ledger_*``), computed
from the rollups at most every ``metrics_ttl`` seconds, to the service's own. ``/health`` reports
the ledger database (critical), the accounts database, Redis and the ledger writer's lag. When a
ledger writer is given (Redis configured) the service runs it in-process until shut down.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, Protocol
from urllib.parse import parse_qsl

import orjson

from citadel.accounts.store import AccountStore, Team, User
from citadel.errors import BadRequest, StoreUnavailable, Unavailable
from citadel.gateway.auth import AdminKeyAuthenticator
from citadel.http.server import Request, Response
from citadel.metering.analytics import (
    BUCKETS,
    DIMENSIONS,
    METRICS,
    Analytics,
    Bucket,
    BudgetUse,
    Dimension,
    Metric,
    QueryError,
    TimeRange,
    UsageRow,
    budget_use,
    check_group_by,
    month_range,
    savings_by_model,
)
from citadel.metering.pricing import DeploymentCost, Savings, sum_savings, usd
from citadel.metering.writer import WriterStats
from citadel.metrics import (
    BUSINESS_ACTIVE_USERS,
    BUSINESS_BUDGET_UTILISATION,
    BUSINESS_COST_PER_1K,
    BUSINESS_INFRA_COST,
    BUSINESS_REFERENCE_COST,
    BUSINESS_REQUESTS,
    BUSINESS_SAVINGS,
    BUSINESS_SPEND,
    BUSINESS_TOKENS,
    LEDGER_LAG,
    LEDGER_WRITER_ERRORS,
    Registry,
)
from citadel.openapi import ApiRoutes, Operation, PathHandler
from citadel.service import App, DependencyHealth, service_app, store_scheme
from citadel.settings import Settings
from citadel.stores.redis import RedisError

__all__ = ["LedgerWriterLike", "MeteringDeps", "create_app", "default_deps"]

_log = logging.getLogger("citadel.metering")

Hook = Callable[[], Awaitable[None]]

DEFAULT_DAYS: Final = 30
MAX_TOP: Final = 1000
_CHECK_TIMEOUT: Final = 1.5  # seconds; /health gives each check 2
_LAG_DEGRADED: Final = 100_000  # events waiting beyond which the writer is falling behind
_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)


class LedgerWriterLike(Protocol):
    """The ledger writer the service runs (``citadel.metering.writer.LedgerWriter``)."""

    async def run(self, stop: asyncio.Event) -> None: ...

    async def lag(self) -> int:
        """Events waiting to be written."""
        ...

    def stats(self) -> WriterStats: ...


class Pingable(Protocol):
    async def ping(self) -> None: ...


@dataclass(slots=True, kw_only=True)
class MeteringDeps:
    """What the service talks to; built by ``default_deps`` or by a test."""

    analytics: Analytics
    accounts: AccountStore
    registry: Registry = field(default_factory=Registry)
    clock: Callable[[], float] = time.time  # Unix seconds
    writer: LedgerWriterLike | None = None  # run in-process when given
    redis: Pingable | None = None  # the usage stream's Redis, for /health
    metrics_ttl: float = 15.0  # seconds the business metrics are reused between scrapes
    startup: tuple[Hook, ...] = ()
    shutdown: tuple[Hook, ...] = ()


def ledger_uri(settings: Settings) -> str:
    return settings.metering.database or settings.accounts.database


def default_deps(settings: Settings) -> MeteringDeps:
    """Production wiring: the ledger and accounts databases, connected on first use, and a
    ledger writer draining the usage stream when Redis is configured. Embedded SQLite databases
    are created or upgraded at start; PostgreSQL ones by ``citadel migrate``."""
    import os
    import socket

    from citadel.accounts.migrate import upgrade as upgrade_accounts
    from citadel.accounts.sql import build_engine, open_store_lazily
    from citadel.errors import ConfigError
    from citadel.metering.migrate import upgrade as upgrade_ledger
    from citadel.metering.writer import LedgerWriter, redis_url
    from citadel.stores.redis import RedisClient

    uri = ledger_uri(settings)
    engine = build_engine(uri)
    accounts_uri = settings.accounts.database
    startup: list[Hook] = []
    shutdown: list[Hook] = [engine.dispose]
    if accounts_uri.startswith("sqlite"):

        async def upgrade_accounts_db() -> None:
            await upgrade_accounts(accounts_uri)

        startup.append(upgrade_accounts_db)
    if uri.startswith("sqlite"):

        async def upgrade_ledger_db() -> None:
            await upgrade_ledger(uri)

        startup.append(upgrade_ledger_db)
    redis: RedisClient | None = None
    writer: LedgerWriter | None = None
    try:
        url = redis_url(settings.endpoints.redis, settings.limits.backend)
    except ConfigError:  # no Redis: the gateway writes the ledger itself
        url = None
    if url is not None:
        metering = settings.metering
        redis = RedisClient.from_url(url, timeout=5.0)
        writer = LedgerWriter(
            redis,
            engine,
            stream=metering.stream,
            group=metering.group,
            consumer=f"{socket.gethostname()}-{os.getpid()}",
            batch_size=metering.batch_size,
        )
        shutdown.insert(0, redis.aclose)
    return MeteringDeps(
        analytics=Analytics(engine),
        accounts=open_store_lazily(accounts_uri),
        writer=writer,
        redis=redis,
        startup=tuple(startup),
        shutdown=tuple(shutdown),
    )


def create_app(settings: Settings, deps: MeteringDeps) -> App:
    """The custom-metrics service: the analytics API, /docs, /openapi.json, /health, /metrics."""
    app = service_app("custom-metrics", settings, deps.registry)
    api = ApiRoutes(
        app,
        title="Citadel custom metrics",
        description="Usage, cost, budgets, real cost per deployment and savings against a "
        "commercial API, from the usage ledger. JSON, or CSV with `?format=csv`. Authenticate "
        "with the admin key.",
    )
    service = _Service(settings, deps)
    for operation, handler in service.routes():
        api.add(operation, _guarded(service.auth, handler))
    for path, summary in (("/health", "Service and dependency health"), ("/metrics", "Metrics")):
        api.describe(
            Operation(
                method="GET",
                path=path,
                summary=summary,
                tags=("operations",),
                secured=False,
                content_type="application/json" if path == "/health" else "text/plain",
                response={"type": "object"} if path == "/health" else None,
            )
        )
    business = _BusinessMetrics(settings, deps)

    async def metrics(request: Request) -> Response:
        business_metrics = await business.render()  # first: it brings the writer's count up
        body = app.render_metrics() + business_metrics
        return Response(200, body, content_type=b"text/plain; version=0.0.4")

    async def health(request: Request) -> Response:
        status, dependencies = await app.check_health()
        lag = await _lag(deps.writer)
        body = {
            "status": status,
            "service": app.name,
            "version": app.version,
            "ledger_lag": lag,
            "dependencies": dependencies,
        }
        return Response(503 if status == "down" else 200, orjson.dumps(body))

    app.route("GET", "/metrics", metrics)
    app.route("GET", "/health", health)
    runner = None if deps.writer is None else _WriterTask(deps.writer)
    _health_checks(app, settings, deps, runner)
    _lifecycle(app, deps, runner)
    return app


def _health_checks(
    app: App, settings: Settings, deps: MeteringDeps, runner: _WriterTask | None
) -> None:
    async def bounded(check: Pingable, uri: str, critical: bool) -> DependencyHealth:
        # Bounded here, within /health's own deadline, because only a check that answers can
        # say that it is critical.
        try:
            async with asyncio.timeout(_CHECK_TIMEOUT):
                await check.ping()
        except StoreUnavailable as exc:
            return DependencyHealth("down", exc.detail, critical=critical)
        except TimeoutError:
            detail = f"no answer within {_CHECK_TIMEOUT} s"
            return DependencyHealth("down", detail, critical=critical)
        return DependencyHealth("ok", store_scheme(uri))

    async def ledger() -> DependencyHealth:
        return await bounded(deps.analytics, ledger_uri(settings), critical=True)

    async def accounts() -> DependencyHealth:
        return await bounded(deps.accounts, settings.accounts.database, critical=False)

    async def redis() -> DependencyHealth:
        if deps.redis is None:
            return DependencyHealth(
                "disabled", "no Redis configured: the ledger is written directly"
            )
        return await bounded(deps.redis, "redis://", critical=False)

    async def writer() -> DependencyHealth:
        if runner is None:
            return DependencyHealth("disabled", "no ledger writer runs in this service")
        failure = runner.failure()
        if failure is not None:
            return DependencyHealth("down", f"the ledger writer stopped: {failure}")
        lag = await _lag(runner.writer)
        if lag is None:
            return DependencyHealth("degraded", "the writer's lag is unknown (Redis unreachable?)")
        detail = f"{lag} events waiting, {runner.writer.stats().failures} failed batches"
        return DependencyHealth("degraded" if lag > _LAG_DEGRADED else "ok", detail)

    app.health_check("ledger", ledger)
    app.health_check("accounts", accounts)
    app.health_check("redis", redis)
    app.health_check("ledger_writer", writer)


class _WriterTask:
    """The ledger writer's task: started with the service, stopped first at shut-down."""

    def __init__(self, writer: LedgerWriterLike) -> None:
        self.writer = writer
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.writer.run(self._stop), name="ledger-writer")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and not self._stop.is_set():
            _log.error("the ledger writer stopped", exc_info=task.exception())

    def failure(self) -> str | None:
        """Why the writer is not running, if it stopped on its own."""
        task = self._task
        if task is None or not task.done() or self._stop.is_set():
            return None
        error = None if task.cancelled() else task.exception()
        return f"{type(error).__name__}: {error}" if error is not None else "it returned"

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:
                _log.exception("the ledger writer failed")


def _lifecycle(app: App, deps: MeteringDeps, runner: _WriterTask | None) -> None:
    """Start-up hooks, then the writer; at shut-down the writer stops first (it finishes its
    batch), then the stores close in the order given."""
    for hook in deps.startup:
        app.on_startup(hook)
    for hook in reversed(deps.shutdown):  # App runs shut-down hooks last added first
        app.on_shutdown(hook)
    app.on_shutdown(deps.accounts.aclose)
    if runner is not None:
        app.on_startup(runner.start)
        app.on_shutdown(runner.stop)


async def _lag(writer: LedgerWriterLike | None) -> int | None:
    if writer is None:
        return None
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT):
            return await writer.lag()
    except (StoreUnavailable, RedisError, TimeoutError):
        return None


def _guarded(auth: AdminKeyAuthenticator, handler: PathHandler) -> PathHandler:
    """``handler`` behind the admin key; a bad parameter a 400, an unreachable store a 503."""

    async def guarded(request: Request, params: Mapping[str, str]) -> Response:
        await auth.authenticate(request.headers.get(b"authorization"))
        try:
            return await handler(request, params)
        except QueryError as exc:
            raise BadRequest(exc.message, param=exc.param) from exc
        except StoreUnavailable as exc:
            what = "The usage ledger" if exc.store == "sql" else exc.store
            raise Unavailable(f"{what} is unavailable: {exc.detail}. Try again later.") from exc

    return guarded


# -- reading the query string ------------------------------------------------------------------


def _query(request: Request, known: Sequence[str]) -> dict[str, str]:
    """The query string's parameters; an unknown, repeated or empty one is a 400 naming it."""
    found: dict[str, str] = {}
    for name, value in parse_qsl(request.query, keep_blank_values=True):
        if name not in known:
            raise QueryError(
                name, f"Unknown query parameter '{name}'; expected: {', '.join(known)}."
            )
        if name in found:
            raise QueryError(name, f"Query parameter '{name}' is given twice.")
        if not value.strip():
            raise QueryError(name, f"Query parameter '{name}' is empty.")
        found[name] = value.strip()
    return found


def parse_time(name: str, text: str) -> datetime:
    """``text`` as an aware UTC datetime: RFC 3339 with an offset, a date (its UTC midnight) or
    Unix seconds. QueryError names ``name`` otherwise."""
    text = text.replace(" ", "+")  # a "+hh:mm" offset not percent-encoded arrives as a space
    try:
        if text.lstrip("-").isdigit():
            return datetime.fromtimestamp(int(text), UTC)
        when = datetime.fromisoformat(text)
    except (ValueError, OverflowError, OSError):
        when = None
    if when is None:
        raise QueryError(
            name,
            f"'{name}' must be an RFC 3339 time such as 2024-06-01T00:00:00Z, a date such as "
            f"2024-06-01, or Unix seconds; got {text!r}.",
        )
    if when.tzinfo is None:
        if len(text) > 10:  # a time without an offset is ambiguous
            raise QueryError(name, f"'{name}' must carry a time zone (Z or +hh:mm); got {text!r}.")
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def _choice(query: Mapping[str, str], name: str, choices: Sequence[str], default: str) -> str:
    value = query.get(name, default)
    if value not in choices:
        raise QueryError(name, f"'{name}' must be one of: {', '.join(choices)}; got {value!r}.")
    return value


def _range(query: Mapping[str, str], now: datetime, bucket: Bucket = "none") -> TimeRange:
    """``start`` and ``end`` from the query; by default the 30 days up to the end of the current
    hour (of the current day, with daily buckets)."""
    if "end" in query:
        end = parse_time("end", query["end"])
    else:
        hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        end = hour.replace(hour=0) + _DAY if bucket == "day" else hour + _HOUR
    if "start" in query:
        start = parse_time("start", query["start"])
    else:
        start = end - timedelta(days=DEFAULT_DAYS if bucket != "hour" else 1)
    return TimeRange.checked(start, end, bucket)


def _whole(query: Mapping[str, str], name: str, default: int, maximum: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= maximum:
        raise QueryError(
            name, f"'{name}' must be a whole number from 1 to {maximum}; got {text!r}."
        )
    return int(text)


# -- writing -----------------------------------------------------------------------------------


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _money(prefix: str, micros: int | None) -> dict[str, Any]:
    return {f"{prefix}_usd": usd(micros), f"{prefix}_micros": micros}


def _per_1k(value: float | None) -> float | None:
    return None if value is None else value / 1_000_000


def _measures(row: UsageRow) -> dict[str, Any]:
    return {
        "requests": row.requests,
        "errors": row.errors,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "total_tokens": row.tokens,
        **_money("cost", row.cost_micros),
        "latency_ms_mean": row.latency_ms_mean,
        "ttft_ms_mean": row.ttft_ms_mean,
    }


def _cost_json(cost: DeploymentCost) -> dict[str, Any]:
    totals = cost.totals
    return {
        "deployment": cost.deployment,
        "model": cost.model,
        "configured": cost.configured,
        "gpus": cost.gpus,
        "gpu_hour_usd": cost.gpu_hour_usd,
        "hours": cost.hours,
        "requests": totals.requests,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "total_tokens": totals.tokens,
        "tokens_per_hour": cost.tokens_per_hour,
        **_money("charged", totals.cost_micros),
        **_money("infra", cost.infra_micros),
        **_money("margin", cost.margin_micros),
        **_money("reference", cost.reference_micros),
        "infra_per_1k_usd": _per_1k(cost.infra_per_1k_micros),
        "charged_per_1k_usd": _per_1k(cost.charged_per_1k_micros),
    }


def _savings_json(item: Savings) -> dict[str, Any]:
    totals = item.totals
    return {
        "model": item.model,
        "requests": totals.requests,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        **_money("charged", totals.cost_micros),
        **_money("infra", item.infra_micros),
        **_money("reference", item.reference_micros),
        **_money("savings", item.savings_micros),
        **_money("savings_vs_charged", item.savings_vs_charged_micros),
        "savings_ratio": item.savings_ratio,
        "roi": item.roi,
    }


def _budget_json(row: BudgetUse) -> dict[str, Any]:
    return {
        "scope": row.scope,
        "id": row.id,
        "name": row.name,
        "team_id": row.team_id,
        "tier": row.tier,
        "members": row.members,
        **_money("spent", row.spent_micros),
        **_money("budget", row.budget_micros),
        **_money("remaining", row.remaining_micros),
        "utilisation": row.utilisation,
    }


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _answer(
    query: Mapping[str, str],
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    columns: Sequence[str],
) -> Response:
    """JSON (``meta`` and the rows as ``data``), or CSV: a header row of ``columns``, then a line
    per row."""
    if query.get("format", "json") == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(columns)
        writer.writerows([_csv_value(row.get(c)) for c in columns] for row in rows)
        return Response(200, out.getvalue().encode(), content_type=b"text/csv; charset=utf-8")
    return Response(200, orjson.dumps({**meta, "data": rows}))


def _columns(rows: list[dict[str, Any]], fallback: Sequence[str]) -> list[str]:
    return list(rows[0]) if rows else list(fallback)


_MEASURE_COLUMNS: Final = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "cost_micros",
    "latency_ms_mean",
    "ttft_ms_mean",
)
_FORMATS: Final = ("json", "csv")
_RANGE_QUERY: Final = (
    ("start", "start of the range, inclusive: RFC 3339, a date or Unix seconds; a whole UTC hour"),
    ("end", "end of the range, exclusive (default: the end of the current hour)"),
    ("format", "json (default) or csv"),
)


class _Service:
    """The handlers, over one settings object and one set of dependencies."""

    def __init__(self, settings: Settings, deps: MeteringDeps) -> None:
        self.settings = settings
        self.analytics = deps.analytics
        self.accounts = deps.accounts
        self.clock = deps.clock
        self.auth = AdminKeyAuthenticator(settings.gateway.admin_key)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def routes(self) -> list[tuple[Operation, PathHandler]]:
        def op(
            path: str, summary: str, query: tuple[tuple[str, str], ...], **more: Any
        ) -> Operation:
            return Operation(
                method="GET",
                path=path,
                summary=summary,
                tags=("analytics",),
                query=query,
                errors=(400, 503),
                response={"type": "object"},
                **more,
            )

        dims = ", ".join(DIMENSIONS)
        return [
            (op("/v1/usage", "Usage and cost, grouped and bucketed", (
                ("group_by", f"comma-separated, any of: {dims}"),
                ("bucket", "hour, day (whole UTC days) or none (default)"),
                *((d, f"only this {d}") for d in DIMENSIONS),
                *_RANGE_QUERY)), self.usage),
            (op("/v1/top", "The largest users, teams, ... by cost, tokens, requests or errors", (
                ("by", f"one of: {dims} (default user)"),
                ("metric", f"one of: {', '.join(METRICS)} (default cost)"),
                ("limit", f"how many, 1 to {MAX_TOP} (default 10)"),
                *_RANGE_QUERY)), self.top),
            (op("/v1/budgets", "This month's spend of each user or team against its budget", (
                ("scope", "team (default) or user"), ("format", "json (default) or csv"))),
             self.budgets),
            (op("/v1/deployments/costs",
                "Each deployment's real cost per 1000 tokens from its GPU-hours, beside the price "
                "charged", _RANGE_QUERY), self.deployment_costs),
            (op("/v1/savings", "Savings and ROI against each model's commercial reference price",
                _RANGE_QUERY), self.savings),
        ]  # fmt: skip

    # -- handlers -------------------------------------------------------------------------------

    async def usage(self, request: Request, params: Mapping[str, str]) -> Response:
        query = _query(request, ("group_by", "bucket", *DIMENSIONS, "start", "end", "format"))
        _choice(query, "format", _FORMATS, "json")
        group_by = check_group_by(n.strip() for n in query.get("group_by", "").split(",") if n)
        bucket: Bucket = _bucket(query)
        span = _range(query, self.now(), bucket)
        filters: dict[Dimension, str] = {d: query[d] for d in DIMENSIONS if d in query}
        rows = await self.analytics.usage(span, group_by=group_by, bucket=bucket, filters=filters)
        data = []
        for row in rows:
            item: dict[str, Any] = {"bucket": _iso(row.bucket)} if bucket != "none" else {}
            data.append(item | dict(row.keys) | _measures(row))
        columns = [*(["bucket"] if bucket != "none" else []), *group_by, *_MEASURE_COLUMNS]
        total = UsageRow(
            bucket=None,
            keys={},
            **{k: sum(getattr(r, k) for r in rows) for k in _SUMMED},
        )
        meta = {
            "object": "usage",
            **_span(span),
            "group_by": list(group_by),
            "bucket": bucket,
            "filters": filters,
            "total": _measures(total),
        }
        return _answer(query, data, meta, columns)

    async def top(self, request: Request, params: Mapping[str, str]) -> Response:
        query = _query(request, ("by", "metric", "limit", "start", "end", "format"))
        _choice(query, "format", _FORMATS, "json")
        by = check_group_by([_choice(query, "by", DIMENSIONS, "user")])[0]
        metric: Metric = _metric(query)
        limit = _whole(query, "limit", 10, MAX_TOP)
        span = _range(query, self.now())
        rows = await self.analytics.top(span, by=by, metric=metric, limit=limit)
        names = await self._names(by)
        data = [
            {"rank": i, "id": row.keys[by], "name": names.get(row.keys[by])} | _measures(row)
            for i, row in enumerate(rows, 1)
        ]
        meta = {"object": "top", **_span(span), "by": by, "metric": metric, "limit": limit}
        return _answer(query, data, meta, ["rank", "id", "name", *_MEASURE_COLUMNS])

    async def _names(self, by: Dimension) -> dict[str, str]:
        """Users' and teams' names, best effort: the ledger answered, the accounts may not."""
        try:
            if by == "user":
                return {u.id: u.name for u in await self.accounts.list_users()}
            if by == "team":
                return {t.id: t.name for t in await self.accounts.list_teams()}
        except StoreUnavailable as exc:
            _log.warning("names unavailable", extra={"detail": exc.detail})
        return {}

    async def budgets(self, request: Request, params: Mapping[str, str]) -> Response:
        query = _query(request, ("scope", "format"))
        _choice(query, "format", _FORMATS, "json")
        scope: Literal["user", "team"] = (
            "user" if _choice(query, "scope", ("team", "user"), "team") == "user" else "team"
        )
        users, teams = await self._accounts()
        span, rows = await self.analytics.budgets(
            scope, now=self.now(), settings=self.settings, users=users, teams=teams
        )
        data = [_budget_json(r) for r in rows]
        meta = {"object": "budgets", **_span(span), "scope": scope}
        return _answer(query, data, meta, _columns(data, _BUDGET_COLUMNS))

    async def _accounts(self) -> tuple[list[User], list[Team]]:
        try:
            return await self.accounts.list_users(), await self.accounts.list_teams()
        except StoreUnavailable as exc:
            raise Unavailable(
                f"The accounts database is unavailable: {exc.detail}. Try again later."
            ) from exc

    async def deployment_costs(self, request: Request, params: Mapping[str, str]) -> Response:
        query = _query(request, ("start", "end", "format"))
        _choice(query, "format", _FORMATS, "json")
        span = _range(query, self.now())
        costs = await self.analytics.deployment_costs(span, now=self.now(), settings=self.settings)
        data = [_cost_json(c) for c in costs]
        meta = {"object": "deployment_costs", **_span(span)}
        return _answer(query, data, meta, _columns(data, _COST_COLUMNS))

    async def savings(self, request: Request, params: Mapping[str, str]) -> Response:
        query = _query(request, ("start", "end", "format"))
        _choice(query, "format", _FORMATS, "json")
        span = _range(query, self.now())
        items = await self.analytics.savings(span, now=self.now(), settings=self.settings)
        data = [_savings_json(s) for s in items]
        total = _savings_json(sum_savings(items))
        meta = {"object": "savings", **_span(span), "total": total}
        if query.get("format") == "csv":
            data.append(total)  # the last line, model "*": every model with a reference price
        return _answer(query, data, meta, list(total))


_SUMMED: Final = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cost_micros",
    "latency_ms_sum",
    "ttft_ms_sum",
    "ttft_requests",
)
_BUDGET_COLUMNS: Final = tuple(
    _budget_json(BudgetUse(scope="team", id="", name="", spent_micros=0, budget_micros=None))
)
_COST_COLUMNS: Final = (
    "deployment",
    "model",
    "configured",
    "gpus",
    "gpu_hour_usd",
    "hours",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "tokens_per_hour",
    "charged_usd",
    "charged_micros",
    "infra_usd",
    "infra_micros",
    "margin_usd",
    "margin_micros",
    "reference_usd",
    "reference_micros",
    "infra_per_1k_usd",
    "charged_per_1k_usd",
)


def _bucket(query: Mapping[str, str]) -> Bucket:
    value = _choice(query, "bucket", BUCKETS, "none")
    return next(b for b in BUCKETS if b == value)


def _metric(query: Mapping[str, str]) -> Metric:
    value = _choice(query, "metric", METRICS, "cost")
    return next(m for m in METRICS if m == value)


def _span(span: TimeRange) -> dict[str, Any]:
    return {"start": _iso(span.start), "end": _iso(span.end)}


# -- business metrics ---------------------------------------------------------------------------


class _BusinessMetrics:
    """The business metrics, computed from the ledger at most every ``metrics_ttl`` seconds.

    They live in a registry of their own, rebuilt at each refresh, so a series whose labels are
    gone (a team that spent nothing this month) disappears, and so that with several workers
    each renders the same figures rather than a sum of them. The writer's lag (one figure for the
    whole stream) and error count are read at every scrape.
    """

    def __init__(self, settings: Settings, deps: MeteringDeps) -> None:
        self._settings = settings
        self._deps = deps
        # A counter of the service's registry (summed over workers, each running a writer),
        # brought up to the writer's own count at each scrape.
        self._errors = deps.registry.counter(LEDGER_WRITER_ERRORS)
        self._errors_seen = 0
        if deps.writer is not None:
            self._errors.inc((), 0)
        self._cached = b""
        self._expires = -1.0
        self._lock = asyncio.Lock()

    async def render(self) -> bytes:
        async with self._lock:
            now = time.monotonic()
            if now >= self._expires:
                try:
                    self._cached = await self._collect()
                except StoreUnavailable as exc:
                    _log.warning("business metrics unavailable", extra={"detail": exc.detail})
                    self._cached = b""
                self._expires = now + self._deps.metrics_ttl
        return self._cached + await self._writer_metrics()

    async def _writer_metrics(self) -> bytes:
        writer = self._deps.writer
        if writer is None:
            return b""
        failures = writer.stats().failures
        self._errors.inc((), max(0, failures - self._errors_seen))
        self._errors_seen = max(failures, self._errors_seen)
        lag = await _lag(writer)
        if lag is None:  # unknown: no sample rather than a wrong one
            return b""
        registry = Registry()
        registry.gauge(LEDGER_LAG).set((), lag)
        return registry.render()

    async def _collect(self) -> bytes:
        settings, analytics = self._settings, self._deps.analytics
        now = datetime.fromtimestamp(self._deps.clock(), UTC)
        span = month_range(now, settings.limits.timezone)
        registry = Registry()
        spend = registry.gauge(BUSINESS_SPEND)
        tokens = registry.gauge(BUSINESS_TOKENS)
        requests = registry.gauge(BUSINESS_REQUESTS)
        team_spend: dict[str, int] = {}
        for row in await analytics.usage(span, group_by=("tier", "team", "model")):
            labels = (row.keys["tier"], row.keys["team"], row.keys["model"])
            spend.set(labels, row.cost_micros / 1_000_000)
            tokens.set((*labels, "input"), row.prompt_tokens)
            tokens.set((*labels, "output"), row.completion_tokens)
            requests.set(labels, row.requests)
            team_spend[row.keys["team"]] = team_spend.get(row.keys["team"], 0) + row.cost_micros
        active = registry.gauge(BUSINESS_ACTIVE_USERS)
        for tier, count in (await analytics.active_users(now))[1].items():
            active.set((tier,), count)
        await self._budgets(registry, span, team_spend)
        costs = await analytics.deployment_costs(span, now=now, settings=settings)
        infra = registry.gauge(BUSINESS_INFRA_COST)
        per_1k = registry.gauge(BUSINESS_COST_PER_1K)
        for cost in costs:
            infra.set((cost.model, cost.deployment), cost.infra_micros / 1_000_000)
            for kind, value in (
                ("infrastructure", cost.infra_per_1k_micros),
                ("charged", cost.charged_per_1k_micros),
            ):
                if value is not None:
                    per_1k.set((cost.model, cost.deployment, kind), value / 1_000_000)
        reference = registry.gauge(BUSINESS_REFERENCE_COST)
        saved = registry.gauge(BUSINESS_SAVINGS)
        for item in savings_by_model(costs, settings):
            if item.reference_micros is not None and item.savings_micros is not None:
                reference.set((item.model,), item.reference_micros / 1_000_000)
                saved.set((item.model,), item.savings_micros / 1_000_000)
        return registry.render()

    async def _budgets(
        self, registry: Registry, span: TimeRange, team_spend: dict[str, int]
    ) -> None:
        accounts = self._deps.accounts
        try:
            users, teams = await accounts.list_users(), await accounts.list_teams()
        except StoreUnavailable as exc:
            _log.warning("budgets unavailable", extra={"detail": exc.detail})
            return
        user_spend = await self._deps.analytics.spend(span, "user")
        utilisation = registry.gauge(BUSINESS_BUDGET_UTILISATION)
        tiers = self._settings.tiers
        for scope, spent in (("team", team_spend), ("user", user_spend)):
            rows = budget_use(
                "team" if scope == "team" else "user",
                spent=spent,
                users=users,
                teams=teams,
                tiers=tiers,
            )
            for row in rows:
                if row.utilisation is not None:
                    utilisation.set((scope, row.id), row.utilisation)
