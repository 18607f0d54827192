"""The live console at :9093/: the generated dashboards drawn in a browser.

The page (``assets/console.html``, ``console.js``, ``console.css``: plain SVG, no library, no
CDN) reads each dashboard's Grafana JSON — the same object ``GET /v1/dashboards/{uid}`` serves
to Grafana — so a panel is defined once, in ``dashboards.py``. Its data comes through three
calls of this service, behind the admin key or the read-only key (``CITADEL_READONLY_KEY``):

- ``GET /v1/query``: one panel's queries over a range, through Prometheus's ``query_range``.
  The service substitutes the template variables (values checked: names only, no PromQL),
  ``$__rate_interval``, aligns the range to the step, raises the step so a query never asks for
  more than ``MAX_POINTS`` points, and caches each answer for one step (a refresh of an
  unchanged range is served from memory).
- ``GET /v1/variables/{name}``: the values of a template variable, from its ``label_values``.
- ``GET /v1/ledger``: a ledger panel from custom-metrics' analytics API (:9091,
  ``METRICS_SERVER_ENDPOINT``), which works with embedded defaults and no Prometheus.

The pure parts (range planning, variable values, legends, the ledger's rows into series) are
functions here, tested without a server.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any
from urllib.parse import urlencode, urlsplit

import msgspec
import orjson
from litestar import Controller, Request, Response, get, post
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, FromQuery

from citadel.alerting.prometheus import PrometheusClient, PrometheusError
from citadel.errors import ApiError, BadRequest, NotFound, Unavailable
from citadel.http.client import ConnectError, HttpClient, Origin, ProtocolError, ReadTimeout
from citadel.observability.dashboards import (
    BY_UID,
    VARIABLE_QUERIES,
    Dashboard,
    LedgerPanel,
    grafana_json,
)
from citadel.observability.grafana import GrafanaClient, GrafanaError, Provisioned, provision
from citadel.settings import Settings
from citadel.web import Injected, Struct, errors

__all__ = [
    "MAX_POINTS",
    "Console",
    "ConsoleController",
    "LedgerClient",
    "ProvisionController",
    "Window",
    "console_pages",
    "ledger_series",
    "legend",
    "matcher_value",
    "plan_window",
    "render_expr",
]

MAX_POINTS = 11_000  # Prometheus refuses more than 11,000 points per series
DEFAULT_POINTS = 240  # the step when the page does not give one: range / 240
MAX_RANGE_SECONDS = 400 * 86_400
_VALUE = re.compile(r"^[A-Za-z0-9_:.\-]{1,128}$")
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")
_VARIABLES = ("model", "deployment", "team")


# -- pure parts -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """A range query's start and end (Unix seconds, multiples of ``step``) and its step."""

    start: float
    end: float
    step: float

    @property
    def rate_interval(self) -> str:
        """Grafana's ``$__rate_interval`` for a 15 s scrape: max(step + 15 s, 4 x 15 s)."""
        return f"{max(math.ceil(self.step) + 15, 60)}s"


def plan_window(start: float, end: float, step: float | None) -> Window:
    """The window to ask Prometheus for; BadRequest names the parameter at fault."""
    for name, value in (("start", start), ("end", end)):
        if not math.isfinite(value) or value < 0:
            raise BadRequest(f"'{name}' must be Unix seconds; got {value!r}.", param=name)
    if end <= start:
        raise BadRequest("'end' must be after 'start'.", param="end")
    span = end - start
    if span > MAX_RANGE_SECONDS:
        raise BadRequest("The range spans more than 400 days.", param="start")
    if step is None:
        step = max(1.0, math.ceil(span / DEFAULT_POINTS))
    elif not math.isfinite(step) or step <= 0:
        raise BadRequest(
            f"'step' must be a positive number of seconds; got {step!r}.", param="step"
        )
    step = max(float(step), float(math.ceil(span / MAX_POINTS)))
    # Start down and end up to the step: the same window for a whole step (so a refresh within
    # it is a cache hit), and the last point at or after ``end`` (the newest samples show).
    return Window(
        start=math.floor(start / step) * step, end=math.ceil(end / step) * step, step=step
    )


def matcher_value(given: str | None) -> str:
    """A template variable's value as the regex of a ``=~`` matcher: comma-separated names (or
    absent, or ``All``: every value). Names only: a value carrying PromQL is a BadRequest."""
    if given is None or given in ("", "All", "$__all"):
        return ".*"
    names = [v.strip() for v in given.split(",")]
    for name in names:
        if not _VALUE.match(name):
            raise BadRequest(
                f"A variable value must be a name (letters, digits, _ : . -); got {name[:100]!r}."
            )
    return "|".join(n.replace(".", "[.]") for n in names)


def render_expr(expr: str, values: Mapping[str, str], window: Window) -> str:
    """``expr`` with ``$__rate_interval`` and each ``$name`` (longest names first) replaced."""
    out = expr.replace("$__rate_interval", window.rate_interval)
    for name in sorted(values, key=len, reverse=True):
        out = out.replace(f"${name}", values[name])
    return out


def legend(fmt: str, labels: Mapping[str, str]) -> str:
    """Grafana's ``legendFormat``: ``{{label}}`` replaced by the series' value (empty if absent)."""
    text = _LEGEND.sub(lambda m: labels.get(m.group(1), ""), fmt).strip()
    return text or "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def ledger_series(panel: LedgerPanel, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A ledger answer's rows as the console draws them: series over time for ``timeseries``,
    categories with one value per field for ``bars``. A null value (no GPU price, say) is
    kept as null: the page leaves a gap rather than draw a zero."""
    if panel.kind == "timeseries":
        by_name: dict[str, dict[str, list[Any]]] = {}
        for row in rows:
            name = _name(row, panel.series)
            bucket = row.get("bucket")
            if bucket is None:
                continue
            when = _unix(str(bucket))
            for value_field in panel.values:
                key = name if len(panel.values) == 1 else f"{name} {value_field}"
                series = by_name.setdefault(key, {"times": [], "values": []})
                series["times"].append(when)
                series["values"].append(row.get(value_field))
        return {
            "kind": "timeseries",
            "series": [{"name": k, **v} for k, v in sorted(by_name.items())],
        }
    categories = [_name(row, panel.series) for row in rows]
    return {
        "kind": "bars",
        "categories": categories,
        "series": [{"name": f, "values": [row.get(f) for row in rows]} for f in panel.values],
    }


def _name(row: Mapping[str, Any], key: str) -> str:
    """The row's ``key`` (a user's name, say), else its id, else "(none)"."""
    return str(row.get(key) or row.get("id") or "(none)")


def _unix(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _hours(start: float, end: float) -> tuple[int, int]:
    """The whole UTC hours covering ``[start, end)`` (the ledger's granularity)."""
    return int(start // 3600 * 3600), int(math.ceil(end / 3600) * 3600)


# -- I/O --------------------------------------------------------------------------------------


class _Cache:
    """Answers kept until their expiry, at most ``size`` of them (oldest evicted first)."""

    def __init__(self, size: int = 512) -> None:
        self._size = size
        self._items: OrderedDict[tuple[Any, ...], tuple[float, Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[Any, ...], now: float) -> Any:
        item = self._items.get(key)
        if item is None or item[0] <= now:
            self.misses += 1
            return None
        self.hits += 1
        return item[1]

    def put(self, key: tuple[Any, ...], value: Any, expires: float) -> None:
        self._items[key] = (expires, value)
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


class LedgerClient:
    """GETs of custom-metrics' analytics API with the admin key (the console's caller may hold
    only the read-only key; the ledger's answers are read-only)."""

    def __init__(self, url: str, admin_key: str, http: HttpClient, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self._origin = Origin.parse(url)
        self._prefix = urlsplit(url).path.rstrip("/")
        self._auth = f"Bearer {admin_key}".encode()
        self._http = http
        self._timeout = timeout

    async def rows(self, path: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        target = f"{self._prefix}{path}?{urlencode(params)}"
        try:
            response = await self._http.request(
                "GET",
                self._origin,
                target,
                [(b"accept", b"application/json"), (b"authorization", self._auth)],
                b"",
                connect_timeout=self._timeout,
                first_byte_timeout=self._timeout,
            )
            raw = await response.read()
        except (ConnectError, ReadTimeout, ProtocolError, OSError) as exc:
            raise Unavailable(f"The ledger ({self.url}) did not answer: {exc}.") from exc
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
        if response.status != 200 or not isinstance(doc, dict):
            detail = doc.get("error", {}).get("message") if isinstance(doc, dict) else None
            error = ApiError(
                f"The ledger ({self.url}) answered HTTP {response.status}"
                + (f": {detail}" if detail else "."),
                code="ledger_error",
            )
            error.status = 502
            raise error
        data = doc.get("data")
        return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def _public(url: str) -> str:
    """``url`` without any user and password in it (the page shows it as a link)."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl().rstrip("/")


def _local_url(settings: Settings, port: int) -> str:
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{host}:{port}"


@dataclass(kw_only=True, slots=True)
class Console:
    """What the console's handlers use: Prometheus (None when not configured), the ledger, a
    cache of range answers, and where Grafana shows the same dashboards (None: not set)."""

    prometheus: PrometheusClient | None
    ledger: LedgerClient
    grafana_url: str | None = None
    grafana: GrafanaClient | None = None  # for POST /v1/provision
    prometheus_url: str | None = None  # the data source provisioned into Grafana
    http: HttpClient | None = None  # closed on shutdown when the console made it
    cache: _Cache = field(default_factory=_Cache)
    # Whole panel answers as sent (JSON bytes and their ETag), kept as long as their queries'.
    answers: _Cache = field(default_factory=_Cache)
    clock: Any = time.time

    @classmethod
    def from_settings(cls, settings: Settings) -> Console:
        http = HttpClient(max_connections_per_origin=8)
        prom = settings.endpoints.prometheus
        ledger = settings.endpoints.metrics_server or _local_url(
            settings, settings.ports.custom_metrics
        )
        grafana = settings.endpoints.grafana
        auth = settings.grafana
        return cls(
            prometheus=PrometheusClient(prom, http) if prom else None,
            ledger=LedgerClient(ledger, settings.gateway.admin_key, http),
            grafana_url=_public(grafana) if grafana else None,
            grafana=GrafanaClient(
                grafana, http, token=auth.token, user=auth.user, password=auth.password
            )
            if grafana
            else None,
            prometheus_url=prom,
            http=http,
        )

    async def aclose(self) -> None:
        if self.http is not None:
            await self.http.aclose()

    async def range(self, expr: str, window: Window) -> list[dict[str, Any]]:
        """``query_range`` of ``expr`` as ``[{labels, times, values}]``, cached for one step."""
        if self.prometheus is None:
            raise Unavailable(
                "Prometheus is not configured (set PROMETHEUS_ENDPOINT); this panel reads it.",
                code="prometheus_not_configured",
            )
        key = (expr, window.start, window.end, window.step)
        now = self.clock()
        found = self.cache.get(key, now)
        if found is not None:
            return list(found)
        try:
            series = await self.prometheus.query_range(
                expr, start=window.start, end=window.end, step=window.step
            )
        except PrometheusError as exc:
            raise Unavailable(
                f"Prometheus could not answer: {exc}", code="prometheus_error"
            ) from exc
        out = [
            {"labels": dict(s.labels), "times": list(s.times), "values": list(s.values)}
            for s in series
        ]
        self.cache.put(key, out, now + min(window.step, 30.0))
        return out


# -- handlers ---------------------------------------------------------------------------------


class Series(Struct):
    name: str
    times: list[float]
    values: list[float | None]
    ref: str = ""


class PanelData(Struct):
    start: float
    end: float
    step: float
    series: list[Series]


class VariableValues(Struct):
    name: str
    values: list[str]


class ConsoleBoard(Struct):
    dashboard: dict[str, Any]
    ledger: list[dict[str, Any]]
    grafana_url: str | None


def _board(uid: str) -> Dashboard:
    board = BY_UID.get(uid)
    if board is None:
        raise NotFound(f"No dashboard {uid[:100]!r}.", param="dashboard")
    return board


def _values(model: str | None, deployment: str | None, team: str | None) -> dict[str, str]:
    given = {"model": model, "deployment": deployment, "team": team}
    return {name: matcher_value(v) for name, v in given.items()}


class ConsoleController(Controller):
    path = "/v1"
    tags = ("console",)

    @get("/console/{uid:str}", summary="A dashboard as the console draws it", responses=errors(404))
    async def board(self, uid: FromPath[str], console: Injected[Console]) -> ConsoleBoard:
        board = _board(uid)
        ledger = [
            {"title": p.title, "unit": p.unit, "kind": p.kind, "index": i}
            for i, p in enumerate(board.ledger)
        ]
        link = None
        if console.grafana_url:
            link = f"{console.grafana_url.rstrip('/')}/d/{board.uid}"
        return ConsoleBoard(dashboard=grafana_json(board), ledger=ledger, grafana_url=link)

    @get(
        "/query",
        summary="One panel's queries over a range, through Prometheus",
        responses=errors(404, 503),
    )
    async def query(
        self,
        request: Request[Any, Any, Any],
        console: Injected[Console],
        dashboard: FromQuery[str],
        panel: FromQuery[int],
        start: FromQuery[float],
        end: FromQuery[float],
        step: FromQuery[float | None] = None,
        model: FromQuery[str | None] = None,
        deployment: FromQuery[str | None] = None,
        team: FromQuery[str | None] = None,
    ) -> Response[PanelData]:
        """A cached answer is sent as it was encoded: no query, no re-rendering."""
        board = _board(dashboard)
        if not 0 <= panel < len(board.panels):
            raise NotFound(f"Dashboard {board.uid!r} has no panel {panel}.", param="panel")
        window = plan_window(start, end, step)
        values = _values(model, deployment, team)
        key = (board.uid, panel, window.start, window.end, window.step, *values.values())
        now = console.clock()
        answer = console.answers.get(key, now)
        if answer is None:
            data = await self._panel(console, board, panel, window, values)
            body = msgspec.json.encode(data)
            answer = (body, f'"{hashlib.blake2b(body, digest_size=12).hexdigest()}"')
            console.answers.put(key, answer, now + min(window.step, 30.0))
        body, etag = answer
        # no-cache: the browser may keep the answer, and asks again with If-None-Match.
        headers = {"etag": etag, "cache-control": "private, no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(b"", status_code=304, headers=headers)  # type: ignore[arg-type]
        return Response(body, media_type="application/json", headers=headers)

    @staticmethod
    async def _panel(
        console: Console, board: Dashboard, panel: int, window: Window, values: dict[str, str]
    ) -> PanelData:
        out: list[Series] = []
        for ref, q in zip("ABCDEFGHIJ", board.panels[panel].queries, strict=False):
            found = await console.range(render_expr(q.expr, values, window), window)
            out.extend(
                Series(
                    name=legend(q.legend, s["labels"]),
                    times=s["times"],
                    values=s["values"],
                    ref=ref,
                )
                for s in found
            )
        return PanelData(start=window.start, end=window.end, step=window.step, series=out)

    @get(
        "/variables/{name:str}",
        summary="The values a template variable can take",
        responses=errors(404, 503),
    )
    async def variable(
        self,
        name: FromPath[str],
        console: Injected[Console],
        start: FromQuery[float],
        end: FromQuery[float],
        model: FromQuery[str | None] = None,
    ) -> VariableValues:
        if name not in _VARIABLES:
            raise NotFound(f"No variable {name[:100]!r}.", param="name")
        found = _LABEL_VALUES.match(VARIABLE_QUERIES[name])
        assert found is not None  # every variable is a label_values query
        window = plan_window(start, end, None)
        selector = render_expr(found["selector"], _values(model, None, None), window)
        label = found["label"]
        series = await console.range(f"group by ({label}) ({selector})", window)
        names = sorted({s["labels"][label] for s in series if label in s["labels"]})
        return VariableValues(name=name, values=names)

    @get(
        "/ledger",
        summary="A ledger panel, from custom-metrics' analytics API",
        responses=errors(404, 502, 503),
    )
    async def ledger(
        self,
        console: Injected[Console],
        dashboard: FromQuery[str],
        panel: FromQuery[int],
        start: FromQuery[float],
        end: FromQuery[float],
    ) -> dict[str, Any]:
        board = _board(dashboard)
        if not 0 <= panel < len(board.ledger):
            raise NotFound(f"Dashboard {board.uid!r} has no ledger panel {panel}.", param="panel")
        plan_window(start, end, None)  # the same checks as a Prometheus range
        first, last = _hours(start, end)
        chosen = board.ledger[panel]
        params = dict(chosen.params) | {"start": str(first), "end": str(last)}
        rows = await console.ledger.rows(chosen.path, params)
        if chosen.series == "team":  # the usage rows name teams by id: show their names
            names = {
                str(r["id"]): str(r["name"])
                for r in await console.ledger.rows("/v1/budgets", {"scope": "team"})
                if r.get("id") and r.get("name")
            }
            rows = [r | {"team": names.get(str(r.get("team")), r.get("team"))} for r in rows]
        return ledger_series(chosen, rows) | {"start": first, "end": last}


class ProvisionReply(Struct):
    folder: str
    datasource: str
    dashboards: dict[str, str]
    changed: bool
    grafana: str


def _reply(done: Provisioned, url: str) -> ProvisionReply:
    return ProvisionReply(
        folder=done.folder,
        datasource=done.datasource,
        dashboards=done.dashboards,
        changed=done.changed,
        grafana=url,
    )


class ProvisionController(Controller):
    """``POST /v1/provision``: the admin key only (it writes to Grafana)."""

    path = "/v1"
    tags = ("dashboards",)

    @post(
        "/provision",
        summary="Create or update the folder, data source and dashboards in Grafana",
        status_code=200,
        responses=errors(409, 502),
    )
    async def provision(self, console: Injected[Console]) -> ProvisionReply:
        if console.grafana is None:
            error = ApiError(
                "Grafana is not configured: set GRAFANA_ENDPOINT (and GRAFANA_TOKEN, or "
                "GRAFANA_USER and GRAFANA_PASSWORD).",
                code="grafana_not_configured",
            )
            error.status, error.type = 409, "invalid_request_error"
            raise error
        try:
            done = await provision(console.grafana, prometheus_url=console.prometheus_url)
        except GrafanaError as exc:
            error = ApiError(str(exc), code="grafana_error")
            error.status = 502
            raise error from exc
        return _reply(done, console.grafana_url or "")


# -- the page ---------------------------------------------------------------------------------

_ASSETS = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}


def _asset(name: str) -> bytes:
    return resources.files("citadel.observability").joinpath("assets", name).read_bytes()


def console_pages() -> list[Any]:
    """``GET /`` (the page; it asks for the key itself) and its script and style sheet."""

    @get("/", include_in_schema=False, sync_to_thread=False, media_type="text/html")
    def page() -> Response[bytes]:
        return Response(
            _asset("console.html"),
            media_type="text/html; charset=utf-8",
            headers={"cache-control": "no-cache", "x-frame-options": "DENY"},
        )

    @get("/console/assets/{name:str}", include_in_schema=False, sync_to_thread=False)
    def asset(name: FromPath[str]) -> Response[bytes]:
        media_type = _ASSETS.get(name)
        if media_type is None:
            raise NotFoundException()
        return Response(_asset(name), media_type=media_type, headers={"cache-control": "no-cache"})

    return [page, asset]
