"""The console's pure parts (ranges, variables, legends, ledger rows) and its service calls
through the real Litestar app (Prometheus absent, or on a port nothing listens on)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from citadel.errors import BadRequest, ConfigError
from citadel.observability.console import (
    MAX_POINTS,
    _Cache,
    ledger_series,
    legend,
    matcher_value,
    plan_window,
    render_expr,
)
from citadel.observability.dashboards import BY_UID, DASHBOARDS, LEDGER_PANELS
from citadel.observability.services import ObservabilityDeps, create_dashboards_app
from citadel.settings import load_settings

from support import free_port

ADMIN, READER = "sk-console-admin", "sk-console-reader"
ENV = {"CITADEL_ADMIN_KEY": ADMIN, "CITADEL_READONLY_KEY": READER, "CITADEL_ENV": "test"}


def test_a_window_is_aligned_to_its_step_and_never_asks_for_more_than_11000_points() -> None:
    window = plan_window(1000.5, 1000.5 + 3600, None)
    assert window.step == 15
    assert (window.start % 15, window.end % 15) == (0, 0)
    assert window.start <= 1000.5
    assert window.end >= 4600.5
    assert window.rate_interval == "60s"
    huge = plan_window(0, 365 * 86_400, 1)
    assert (huge.end - huge.start) / huge.step <= MAX_POINTS + 1
    assert huge.step == math.ceil(365 * 86_400 / MAX_POINTS)
    assert plan_window(0, 7 * 86_400, None).rate_interval == f"{2520 + 15}s"


@pytest.mark.parametrize(
    ("start", "end", "step", "param"),
    [
        (100, 100, None, "end"),
        (200, 100, None, "end"),
        (-5, 100, None, "start"),
        (math.nan, 100, None, "start"),
        (0, 100, 0, "step"),
        (0, 100, -1, "step"),
        (0, 500 * 86_400, None, "start"),
    ],
)
def test_a_bad_range_or_step_names_the_parameter(
    start: float, end: float, step: float | None, param: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        plan_window(start, end, step)
    assert caught.value.param == param


def test_variable_values_are_names_joined_into_a_regex() -> None:
    assert matcher_value(None) == ".*"
    assert matcher_value("All") == ".*"
    assert matcher_value("sim.chat,sim-code") == "sim[.]chat|sim-code"
    for hostile in ('a"}', "x|y", "a b", ".*", "x" * 200):
        with pytest.raises(BadRequest):
            matcher_value(hostile)


def test_expressions_take_the_variables_and_the_rate_interval() -> None:
    window = plan_window(0, 600, 10)
    expr = 'sum(rate(x{model=~"$model",deployment=~"$deployment"}[$__rate_interval]))'
    out = render_expr(expr, {"model": "a|b", "deployment": ".*"}, window)
    assert out == 'sum(rate(x{model=~"a|b",deployment=~".*"}[60s]))'
    assert legend("p95 {{model}}", {"model": "m"}) == "p95 m"
    assert legend("", {"b": "2", "a": "1"}) == '{a="1",b="2"}'


def test_ledger_rows_become_series_and_bars_with_gaps_kept() -> None:
    hourly, _, costs, _, top = LEDGER_PANELS
    rows = [
        {"bucket": "2026-12-02T10:00:00Z", "team": "research", "cost_usd": 1.5},
        {"bucket": "2026-12-02T11:00:00Z", "team": "research", "cost_usd": 2.0},
        {"bucket": "2026-12-02T11:00:00Z", "team": None, "cost_usd": 0.5},
    ]
    drawn = ledger_series(hourly, rows)
    assert drawn["kind"] == "timeseries"
    by_name = {s["name"]: s for s in drawn["series"]}
    assert by_name["research"]["values"] == [1.5, 2.0]
    assert by_name["research"]["times"][1] - by_name["research"]["times"][0] == 3600
    assert by_name["(none)"]["values"] == [0.5]
    bars = ledger_series(
        costs,
        [
            {"deployment": "a", "infra_per_1k_usd": None, "charged_per_1k_usd": 1.0},
            {"deployment": "b", "infra_per_1k_usd": 0.2, "charged_per_1k_usd": 0.9},
        ],
    )
    assert bars["categories"] == ["a", "b"]
    assert bars["series"][0] == {"name": "infra_per_1k_usd", "values": [None, 0.2]}
    named = ledger_series(top, [{"id": "usr_1", "name": None, "prompt_tokens": 3}])
    assert named["categories"] == ["usr_1"]


def test_the_cache_keeps_an_answer_until_it_expires() -> None:
    cache = _Cache(size=2)
    cache.put(("a",), [1], expires=10.0)
    assert cache.get(("a",), 9.9) == [1]
    assert cache.get(("a",), 10.0) is None
    cache.put(("b",), [2], 20.0)
    cache.put(("c",), [3], 20.0)
    cache.put(("d",), [4], 20.0)
    assert cache.get(("b",), 0) is None  # the oldest is evicted past the size
    assert (cache.hits, cache.misses) == (1, 2)


def test_the_read_only_key_must_differ_from_the_admin_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, ENV | {"CITADEL_READONLY_KEY": ADMIN})
    assert "gateway.readonly_key" in str(caught.value)


# -- the service ------------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _client(env: dict[str, str]) -> AsyncIterator[AsyncTestClient[Litestar]]:
    settings = load_settings(None, ENV | env)
    async with AsyncTestClient(create_dashboards_app(settings, ObservabilityDeps(slos=()))) as c:
        yield c


@pytest.fixture
async def console() -> AsyncIterator[AsyncTestClient[Litestar]]:
    async for client in _client({"METRICS_SERVER_ENDPOINT": f"http://127.0.0.1:{free_port()}"}):
        yield client


@pytest.fixture
async def console_prometheus_down() -> AsyncIterator[AsyncTestClient[Litestar]]:
    async for client in _client({"PROMETHEUS_ENDPOINT": f"http://127.0.0.1:{free_port()}"}):
        yield client


def _key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.anyio
async def test_the_page_is_open_and_its_calls_take_the_admin_or_read_only_key(
    console: AsyncTestClient[Litestar],
) -> None:
    page = await console.get("/")
    assert page.status_code == 200
    assert "/console/assets/console.js" in page.text
    assert (await console.get("/console/assets/console.js")).status_code == 200
    assert (await console.get("/console/assets/nope.js")).status_code == 404
    assert (await console.get("/v1/dashboards")).status_code == 401
    assert (await console.get("/v1/dashboards", headers=_key("sk-wrong"))).status_code == 401
    for key in (ADMIN, READER):
        listed = await console.get("/v1/dashboards", headers=_key(key))
        assert [d["uid"] for d in listed.json()] == [d.uid for d in DASHBOARDS]
    board = (await console.get("/v1/console/citadel-business", headers=_key(READER))).json()
    assert board["dashboard"]["uid"] == "citadel-business"
    assert len(board["ledger"]) == len(BY_UID["citadel-business"].ledger)
    assert board["grafana_url"] is None


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("query", "status", "param"),
    [
        ("dashboard=nope&panel=0&start=0&end=60", 404, "dashboard"),
        ("dashboard=citadel-overview&panel=99&start=0&end=60", 404, "panel"),
        ("dashboard=citadel-overview&panel=0&start=60&end=0", 400, "end"),
        ("dashboard=citadel-overview&panel=0&start=0&end=60&step=0", 400, "step"),
        ("dashboard=citadel-overview&panel=0&start=x&end=60", 400, "start"),
        ("dashboard=citadel-overview&panel=0&start=0&end=60&model=a%22%7D", 400, None),
        ("dashboard=citadel-overview&panel=0&start=0&end=60&bogus=1", 400, "bogus"),
    ],
)
async def test_bad_input_to_the_query_proxy_is_a_clear_4xx(
    console: AsyncTestClient[Litestar], query: str, status: int, param: str | None
) -> None:
    reply = await console.get(f"/v1/query?{query}", headers=_key(READER))
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param


@pytest.mark.anyio
async def test_without_prometheus_a_panel_says_why(
    console: AsyncTestClient[Litestar],
    console_prometheus_down: AsyncTestClient[Litestar],
) -> None:
    query = "/v1/query?dashboard=citadel-overview&panel=0&start=0&end=600"
    unset = await console.get(query, headers=_key(READER))
    assert unset.status_code == 503
    assert unset.json()["error"]["code"] == "prometheus_not_configured"
    down = await console_prometheus_down.get(query, headers=_key(READER))
    assert down.status_code == 503
    assert down.json()["error"]["code"] == "prometheus_error"
    ledger = await console.get(
        "/v1/ledger?dashboard=citadel-business&panel=0&start=0&end=3600", headers=_key(READER)
    )
    assert ledger.status_code == 503  # nothing listens on :9091 here
    assert "ledger" in ledger.json()["error"]["message"]
