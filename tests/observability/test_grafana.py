"""Provisioning into Grafana, against the stand-in of its HTTP API (``grafana_standin``, the one
mock of the observability tests), and file provisioning on disk."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from litestar.testing import AsyncTestClient

from citadel.http.client import HttpClient
from citadel.observability.dashboards import BY_UID, DASHBOARDS, FOLDER_UID
from citadel.observability.grafana import (
    DATASOURCE_UID,
    GrafanaClient,
    GrafanaError,
    export_files,
    for_grafana,
    provision,
)
from citadel.observability.lint import lint
from citadel.observability.services import ObservabilityDeps, create_dashboards_app
from citadel.settings import load_settings

from grafana_standin import PASSWORD, TOKEN, USER, State, grafana_standin

PROMETHEUS = "http://127.0.0.1:9090"
UIDS = [d.uid for d in DASHBOARDS]
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def standin() -> Iterator[tuple[str, State]]:
    with grafana_standin() as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    client = HttpClient(max_connections_per_origin=2)
    try:
        yield client
    finally:
        await client.aclose()


def _writes(state: State) -> list[tuple[str, str]]:
    return [c for c in state.calls if c[0] != "GET"]


async def test_a_first_run_creates_everything_and_a_second_changes_nothing(
    standin: tuple[str, State], http: HttpClient
) -> None:
    url, state = standin
    grafana = GrafanaClient(url, http, token=TOKEN)
    first = await provision(grafana, prometheus_url=PROMETHEUS)
    assert (first.folder, first.datasource) == ("created", "created")
    assert first.dashboards == dict.fromkeys(UIDS, "created")
    assert set(state.folders) == {FOLDER_UID}
    assert state.datasources[DATASOURCE_UID]["url"] == PROMETHEUS
    for uid in UIDS:
        stored = state.dashboards[uid]
        assert stored["meta"]["folderUid"] == FOLDER_UID
        assert lint(stored["dashboard"]) == []
    made = len(_writes(state))
    assert made == 2 + len(UIDS)

    second = await provision(grafana, prometheus_url=PROMETHEUS)
    assert not second.changed
    assert second.dashboards == dict.fromkeys(UIDS, "unchanged")
    assert len(_writes(state)) == made  # no POST or PUT at all
    assert all(s["dashboard"]["version"] == 1 for s in state.dashboards.values())


async def test_only_what_differs_is_written_again(
    standin: tuple[str, State], http: HttpClient
) -> None:
    url, state = standin
    grafana = GrafanaClient(url, http, user=USER, password=PASSWORD)  # basic auth
    await provision(grafana, prometheus_url=PROMETHEUS)
    state.dashboards["citadel-users"]["dashboard"]["title"] = "edited by hand"
    state.datasources[DATASOURCE_UID]["url"] = "http://elsewhere:9090"
    again = await provision(grafana, prometheus_url=PROMETHEUS)
    assert again.datasource == "updated"
    assert [u for u, s in again.dashboards.items() if s != "unchanged"] == ["citadel-users"]
    assert state.dashboards["citadel-users"]["dashboard"]["title"] == BY_UID["citadel-users"].title
    assert state.dashboards["citadel-users"]["dashboard"]["version"] == 2
    assert state.datasources[DATASOURCE_UID]["url"] == PROMETHEUS


async def test_the_credentials_can_come_in_the_url(
    standin: tuple[str, State], http: HttpClient
) -> None:
    url, state = standin
    with_user = url.replace("http://", f"http://{USER}:{PASSWORD}@")
    done = await provision(GrafanaClient(with_user, http), prometheus_url=None)
    assert done.datasource == "skipped"
    assert not state.datasources
    assert len(state.dashboards) == len(UIDS)


@pytest.mark.parametrize(
    ("fail", "status", "words"),
    [
        ([], 401, "GRAFANA_TOKEN"),
        ([412], 412, "HTTP 412"),
        ([500], 500, "HTTP 500"),
        ([404, 503], 503, "POST /api/folders"),
    ],
)
async def test_a_refusal_from_grafana_is_a_clear_error(
    standin: tuple[str, State], http: HttpClient, fail: list[int], status: int, words: str
) -> None:
    url, state = standin
    state.fail = list(fail)
    token = "wrong" if status == 401 else TOKEN
    with pytest.raises(GrafanaError) as caught:
        await provision(GrafanaClient(url, http, token=token), prometheus_url=PROMETHEUS)
    assert caught.value.status == status
    assert words in str(caught.value)


async def test_grafana_down_is_a_clear_error(http: HttpClient) -> None:
    from support import free_port

    grafana = GrafanaClient(f"http://127.0.0.1:{free_port()}", http, token=TOKEN)
    with pytest.raises(GrafanaError) as caught:
        await provision(grafana, prometheus_url=None)
    assert "did not answer" in str(caught.value)


def test_file_provisioning_writes_the_json_and_the_providers(tmp_path: Path) -> None:
    written = export_files(tmp_path, prometheus_url=PROMETHEUS)
    assert len(written) == len(UIDS) + 2
    for board in DASHBOARDS:
        data = json.loads((tmp_path / "dashboards" / f"{board.uid}.json").read_text())
        assert data == for_grafana(board)
        assert data["schemaVersion"] >= 39  # the classic JSON, not the v2 schema
        assert "elements" not in data
    provider = yaml.safe_load((tmp_path / "provisioning/dashboards/citadel.yaml").read_text())
    entry = provider["providers"][0]
    assert (entry["type"], entry["folderUid"]) == ("file", FOLDER_UID)
    assert Path(entry["options"]["path"]) == (tmp_path / "dashboards").resolve()
    sources = yaml.safe_load((tmp_path / "provisioning/datasources/citadel.yaml").read_text())
    assert sources["datasources"][0]["uid"] == DATASOURCE_UID
    assert sources["datasources"][0]["url"] == PROMETHEUS
    again = export_files(tmp_path, prometheus_url=PROMETHEUS)
    assert [p.read_text() for p in again] == [p.read_text() for p in written]


ADMIN, READER = "sk-grafana-admin", "sk-grafana-reader"


async def test_the_service_provisions_with_the_admin_key_only(
    standin: tuple[str, State],
) -> None:
    url, state = standin
    env = {
        "CITADEL_ENV": "test",
        "CITADEL_ADMIN_KEY": ADMIN,
        "CITADEL_READONLY_KEY": READER,
        "GRAFANA_ENDPOINT": url,
        "GRAFANA_TOKEN": TOKEN,
        "PROMETHEUS_ENDPOINT": PROMETHEUS,
    }
    app = create_dashboards_app(load_settings(None, env), ObservabilityDeps(slos=()))
    async with AsyncTestClient(app) as client:
        reader = {"Authorization": f"Bearer {READER}"}
        assert (await client.post("/v1/provision", headers=reader)).status_code == 401
        before = (await client.get("/health")).json()["dependencies"]["grafana"]
        assert before["status"] == "degraded"
        assert "citadel-overview" in before["detail"]
        admin = {"Authorization": f"Bearer {ADMIN}"}
        first = await client.post("/v1/provision", headers=admin)
        assert first.status_code == 200, first.text
        assert first.json()["changed"] is True
        second = (await client.post("/v1/provision", headers=admin)).json()
        assert second["changed"] is False
        after = (await client.get("/health")).json()["dependencies"]["grafana"]
        assert after == {"status": "ok", "detail": "every dashboard as generated"}
        board = (await client.get("/v1/console/citadel-overview", headers=reader)).json()
        assert board["grafana_url"] == f"{url}/d/citadel-overview"
        state.fail = [500]
        failed = await client.post("/v1/provision", headers=admin)
        assert failed.status_code == 502
        assert failed.json()["error"]["code"] == "grafana_error"
    unset = {k: v for k, v in env.items() if k != "GRAFANA_ENDPOINT"}
    app = create_dashboards_app(load_settings(None, unset), ObservabilityDeps(slos=()))
    async with AsyncTestClient(app) as client:
        reply = await client.post("/v1/provision", headers={"Authorization": f"Bearer {ADMIN}"})
        assert reply.status_code == 409
        assert reply.json()["error"]["code"] == "grafana_not_configured"


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from citadel.cli import main

    code = main(["dashboards", "provision", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_provision_command_creates_once_then_changes_nothing(
    standin: tuple[str, State],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, state = standin
    monkeypatch.setenv("GRAFANA_ENDPOINT", url)
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    monkeypatch.setenv("PROMETHEUS_ENDPOINT", PROMETHEUS)
    code, out, err = _cli(capsys)
    assert code == 0, err
    assert "folder: created" in out
    assert "data source: created" in out
    assert all(f"dashboard {uid}: created" in out for uid in UIDS)
    assert f"{len(UIDS)} created" in err
    made = len(_writes(state))
    assert made == 2 + len(UIDS)
    assert state.datasources[DATASOURCE_UID]["url"] == PROMETHEUS
    code, _, err = _cli(capsys)
    assert code == 0, err
    assert "nothing changed" in err
    assert f"{len(UIDS)} unchanged" in err
    assert len(_writes(state)) == made  # the second run wrote nothing
    # --no-datasource leaves a data source changed by hand alone.
    state.datasources[DATASOURCE_UID]["url"] = "http://elsewhere:9090"
    code, out, _ = _cli(capsys, "--no-datasource")
    assert code == 0
    assert "data source: skipped" in out
    assert state.datasources[DATASOURCE_UID]["url"] == "http://elsewhere:9090"


@pytest.mark.parametrize(
    ("fail", "token", "words"),
    [
        ([], "wrong", "refused the credentials"),
        ([412], TOKEN, "HTTP 412"),
        ([502], TOKEN, "HTTP 502"),
    ],
)
def test_the_provision_command_reports_grafanas_refusal(
    standin: tuple[str, State],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fail: list[int],
    token: str,
    words: str,
) -> None:
    url, state = standin
    state.fail = list(fail)
    monkeypatch.setenv("GRAFANA_TOKEN", token)
    code, _, err = _cli(capsys, "--grafana", url, "--prometheus", PROMETHEUS)
    assert code == 1
    assert words in err
    assert "Traceback" not in err
    assert not state.dashboards


def test_the_provision_command_without_grafana_says_what_to_set(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GRAFANA_ENDPOINT", raising=False)
    code, _, err = _cli(capsys)
    assert code == 2
    assert "GRAFANA_ENDPOINT" in err


def test_the_provision_command_names_an_unreachable_grafana(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from support import free_port

    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = _cli(capsys, "--grafana", url)
    assert code == 1
    assert f"Grafana ({url}) did not answer" in err
