"""The rules (:9094) and dashboards (:9093) services through their real Litestar apps."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import yaml
from litestar import Litestar
from litestar.testing import AsyncTestClient

from citadel.observability.names import default_slos
from citadel.observability.services import (
    ObservabilityDeps,
    create_dashboards_app,
    create_rules_app,
)
from citadel.settings import load_settings

ADMIN = "sk-obs-admin"
KEY = {"Authorization": f"Bearer {ADMIN}"}
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


SETTINGS = load_settings(None, {"CITADEL_ADMIN_KEY": ADMIN, "CITADEL_ENV": "test"})


@pytest.fixture
async def rules() -> AsyncIterator[AsyncTestClient[Litestar]]:
    deps = ObservabilityDeps(slos=default_slos(["sim-chat"]))
    async with AsyncTestClient(create_rules_app(SETTINGS, deps)) as client:
        yield client


@pytest.fixture
async def boards() -> AsyncIterator[AsyncTestClient[Litestar]]:
    deps = ObservabilityDeps(slos=())
    async with AsyncTestClient(create_dashboards_app(SETTINGS, deps)) as client:
        yield client


async def test_rules_need_the_admin_key_and_list_every_group(
    rules: AsyncTestClient[Litestar],
) -> None:
    assert 401 == (await rules.get("/v1/rules")).status_code
    reply = await rules.get("/v1/rules", headers=KEY)
    assert 200 == reply.status_code
    body = reply.json()
    names = [g["name"] for g in body["groups"]]
    assert names[:2] == ["citadel-recording", "citadel-platform"]
    assert "citadel-slo-sim-chat-availability" in names
    assert [g["name"] for g in yaml.safe_load(body["yaml"])["groups"]] == names
    one = await rules.get("/v1/rules/citadel-platform", headers=KEY)
    assert one.json()["name"] == "citadel-platform"
    missing = await rules.get("/v1/rules/nope", headers=KEY)
    assert 404 == missing.status_code
    assert missing.json()["error"]["param"] == "group"


async def test_validate_runs_promtool_on_the_generated_and_a_posted_set(
    rules: AsyncTestClient[Litestar],
) -> None:
    good = (await rules.post("/v1/validate", json={}, headers=KEY)).json()
    assert good["valid"] is True
    assert "SUCCESS" in good["promtool"]
    posted = "groups:\n- name: x\n  rules:\n  - alert: A\n    expr: up ==\n"
    bad = (await rules.post("/v1/validate", json={"rules": posted}, headers=KEY)).json()
    assert bad["valid"] is False
    assert "x/A: no for" in bad["findings"]
    assert "promtool check rules failed" in bad["findings"]
    junk = await rules.post("/v1/validate", json={"rules": 3}, headers=KEY)
    assert 400 == junk.status_code


async def test_dashboards_list_and_serve_grafana_json(boards: AsyncTestClient[Litestar]) -> None:
    assert 401 == (await boards.get("/v1/dashboards")).status_code
    listed = (await boards.get("/v1/dashboards", headers=KEY)).json()
    assert {d["uid"] for d in listed} >= {"citadel-overview", "citadel-business"}
    one = (await boards.get("/v1/dashboards/citadel-overview", headers=KEY)).json()
    assert one["uid"] == "citadel-overview"
    assert one["panels"][0]["targets"][0]["expr"]
    assert 404 == (await boards.get("/v1/dashboards/nope", headers=KEY)).status_code
    health = (await boards.get("/health")).json()
    assert health["dependencies"]["grafana"]["status"] == "disabled"
