"""``POST /v1/apply`` of the rules service (:9094) and its ``/health`` against a real Prometheus
(started here with ``--web.enable-lifecycle``): the rules are written whole and reloaded, the
health compares Prometheus's loaded groups with the generated ones, and a rules directory that
cannot be written or a Prometheus that cannot be reached is a clear error."""

from __future__ import annotations

import http.client
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from litestar import Litestar
from litestar.testing import AsyncTestClient

from citadel.observability.names import default_slos
from citadel.observability.promtool import RULE_FILE
from citadel.observability.services import ObservabilityDeps, create_rules_app
from citadel.settings import Settings, load_settings

from support import free_port, stop_process, wait_for

ADMIN = "sk-obs-apply"
KEY = {"Authorization": f"Bearer {ADMIN}"}
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        not shutil.which("prometheus"), reason="needs the Debian package prometheus"
    ),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def ready(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/-/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    tmp = tmp_path_factory.mktemp("apply")
    port = free_port()
    rules = tmp / "rules"
    rules.mkdir()
    (tmp / "prometheus.yml").write_text(yaml.safe_dump({"rule_files": [f"{rules}/*.yml"]}))
    with (tmp / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
             "--web.enable-lifecycle"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        wait_for("Prometheus", lambda: ready(port), 30)
        yield port, rules
    finally:
        stop_process(proc)


def settings(tmp_path: Path, rules_dir: Path, prometheus: str) -> Settings:
    path = tmp_path / "citadel.yaml"
    path.write_text(yaml.safe_dump({"observability": {"rules_dir": str(rules_dir)}}))
    env = {"CITADEL_ENV": "test", "CITADEL_ADMIN_KEY": ADMIN, "PROMETHEUS_ENDPOINT": prometheus}
    return load_settings(str(path), env)


async def client(s: Settings) -> AsyncIterator[AsyncTestClient[Litestar]]:
    deps = ObservabilityDeps(slos=default_slos(["sim-chat"]))
    async with AsyncTestClient(create_rules_app(s, deps)) as c:
        yield c


async def test_apply_writes_the_rules_reloads_prometheus_and_health_then_matches(
    tmp_path: Path, prometheus: tuple[int, Path]
) -> None:
    port, rules = prometheus
    s = settings(tmp_path, rules, f"http://127.0.0.1:{port}")
    async for c in client(s):
        before = (await c.get("/health")).json()["dependencies"]["prometheus"]
        if not (rules / RULE_FILE).exists():
            assert before["status"] == "degraded", before
            assert "missing: citadel-platform, citadel-recording" in before["detail"]
        assert 401 == (await c.post("/v1/apply")).status_code
        reply = await c.post("/v1/apply", headers=KEY)
        assert 200 == reply.status_code, reply.text
        body = reply.json()
        assert body == {
            "path": str(rules / RULE_FILE),
            "groups": 5,  # recording, platform, two SLOs, the model's recording
            "reloaded": True,
            "prometheus": f"http://127.0.0.1:{port}",
        }
        assert [p.name for p in rules.iterdir()] == [RULE_FILE]  # no temporary file left
        after = (await c.get("/health")).json()["dependencies"]["prometheus"]
        assert after == {"status": "ok", "detail": "5 rule groups loaded"}
        # Another SLO set: Prometheus now runs rules that differ from these.
        other = ObservabilityDeps(slos=default_slos(["sim-code"]))
        async with AsyncTestClient(create_rules_app(s, other)) as c2:
            differs = (await c2.get("/health")).json()["dependencies"]["prometheus"]
            assert differs["status"] == "degraded"
            detail = differs["detail"]
            assert "missing: citadel-recording-sim-code, citadel-slo-sim-code-avail" in detail
            assert "extra: citadel-recording-sim-chat, citadel-slo-sim-chat-avail" in detail


async def test_an_unreachable_prometheus_is_a_502_that_says_so(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    async for c in client(settings(tmp_path, tmp_path / "rules", down)):
        reply = await c.post("/v1/apply", headers=KEY)
        assert 502 == reply.status_code
        message = reply.json()["error"]["message"]
        assert f"Prometheus at {down} is unreachable for the reload" in message
        assert "it keeps its previous rules" in message
        health = (await c.get("/health")).json()["dependencies"]["prometheus"]
        assert health["status"] == "down"


async def test_a_rules_directory_that_cannot_be_written_is_a_503_naming_the_setting(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_text("x")
    s = settings(tmp_path, tmp_path / "file" / "rules", f"http://127.0.0.1:{free_port()}")
    async for c in client(s):
        reply = await c.post("/v1/apply", headers=KEY)
        assert 503 == reply.status_code
        error = reply.json()["error"]
        assert error["param"] == "observability.rules_dir"
        assert (
            f"Cannot write the rule file {tmp_path / 'file' / 'rules' / RULE_FILE}"
            in (error["message"])
        )
