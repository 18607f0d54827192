"""``citadel rules``, ``dashboards``, ``prometheus-config`` and ``alertmanager-config``, run
through ``citadel.cli.main``; the files they write pass promtool and amtool, and
``deploy/prometheus/`` holds exactly what they generate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from citadel.cli import SERVICES, main
from citadel.observability import promtool
from citadel.observability.commands import RULE_FILE, deploy_files
from citadel.observability.dashboards import DASHBOARDS, grafana_json
from citadel.observability.names import Slo
from citadel.observability.rules import rules_yaml

DEPLOY = Path(__file__).parents[2] / "deploy" / "prometheus"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "citadel.yaml"
    path.write_text(text)
    return str(path)


SLOS_YAML = """
env: test
slos:
  - {model: sim-chat, objective: 99.9}
observability: {rules_dir: %s, scrape_interval_seconds: 0.5}
"""


def test_rules_generate_writes_the_rule_file_of_the_configured_slos(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, SLOS_YAML % (tmp_path / "rules"))
    code, _, err = run(capsys, "--config", cfg, "rules", "generate")
    assert code == 0, err
    written = (tmp_path / "rules" / RULE_FILE).read_text()
    assert written == rules_yaml([Slo(model="sim-chat", kind="availability", objective=99.9)])
    assert [p.name for p in (tmp_path / "rules").iterdir()] == [RULE_FILE]  # no temp file left
    code, out, _ = run(capsys, "--config", cfg, "rules", "generate", "--stdout")
    assert code == 0
    assert out == written
    checked = promtool.check_text(written)
    assert checked.ok, checked.output


def test_a_rule_file_that_cannot_be_written_is_a_clear_error_and_leaves_nothing_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "rules", "generate", "--out", str(tmp_path / "file" / "rules"))
    assert code == 1
    assert f"cannot write {tmp_path / 'file' / 'rules'}" in err
    rules = tmp_path / "rules"
    (rules / RULE_FILE).mkdir(parents=True)  # the target path taken by a directory
    code, _, err = run(capsys, "rules", "generate", "--out", str(rules))
    assert code == 1
    assert "cannot write" in err
    assert [p.name for p in rules.iterdir()] == [RULE_FILE]  # the temporary file is gone


def test_rules_test_without_promtool_says_how_to_get_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    code, _, err = run(capsys, "rules", "test")
    assert code == 2
    assert "apt-get install prometheus" in err


def test_dashboards_export_writes_each_dashboards_grafana_json_and_check_is_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "dashboards", "export", "--out", str(tmp_path / "boards"))
    assert code == 0, err
    files = sorted((tmp_path / "boards").iterdir())
    assert [f.name for f in files] == sorted(f"{d.uid}.json" for d in DASHBOARDS)
    for board in DASHBOARDS:
        assert json.loads((tmp_path / "boards" / f"{board.uid}.json").read_text()) == (
            grafana_json(board)
        )
    code, out, _ = run(capsys, "dashboards", "check")
    assert code == 0
    assert out.strip().endswith(" 0 findings")


def _jobs(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in doc["scrape_configs"]}


def test_prometheus_config_scrapes_everything_and_promtool_accepts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules"
    cfg = config(tmp_path, SLOS_YAML % rules)
    assert run(capsys, "--config", cfg, "rules", "generate")[0] == 0
    out_file = tmp_path / "prometheus.yml"
    code, _, err = run(capsys, "--config", cfg, "prometheus-config", "--out", str(out_file))
    assert code == 0, err
    doc = yaml.safe_load(out_file.read_text())
    assert doc["global"] == {"scrape_interval": "500ms", "evaluation_interval": "500ms"}
    assert doc["rule_files"] == [str(rules / "*.yml")]
    jobs = _jobs(doc)
    assert {f"citadel-{s}" for s in SERVICES} | {"citadel-model-servers"} == set(jobs)
    assert all("authorization" not in job for job in jobs.values())  # test: /metrics is open
    checked = subprocess.run(
        ["promtool", "check", "config", str(out_file)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    count = sum(len(g["rules"]) for g in yaml.safe_load((rules / RULE_FILE).read_text())["groups"])
    assert f"SUCCESS: {count} rules found" in checked.stdout  # it read the generated rule file


def test_outside_development_every_citadel_job_sends_the_metrics_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CITADEL_ENV", "production")
    monkeypatch.setenv("CITADEL_ADMIN_KEY", "sk-production-admin")
    code, out, err = run(capsys, "prometheus-config")
    assert code == 0, err
    jobs = _jobs(yaml.safe_load(out))
    for name, job in jobs.items():
        if name != "citadel-model-servers":
            assert job["authorization"]["type"] == "Bearer", name
            assert job["authorization"]["credentials_file"].endswith("citadel-metrics-token")
    assert "authorization" not in jobs["citadel-model-servers"]


def test_alertmanager_config_inhibits_tickets_and_amtool_accepts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "alertmanager.yml"
    code, _, err = run(
        capsys, "alertmanager-config", "--webhook", "http://127.0.0.1:1/hook", "--out",
        str(out_file),
    )  # fmt: skip
    assert code == 0, err
    doc = yaml.safe_load(out_file.read_text())
    assert doc["receivers"][0]["webhook_configs"] == [{"url": "http://127.0.0.1:1/hook"}]
    assert doc["inhibit_rules"][0]["equal"] == ["slo"]
    amtool = shutil.which("amtool")
    assert amtool, "amtool comes with the Debian package prometheus-alertmanager"
    checked = subprocess.run(
        [amtool, "check-config", str(out_file)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_deploy_prometheus_holds_what_the_generator_writes() -> None:
    for name, text in deploy_files().items():
        path = DEPLOY / name
        assert path.is_file(), f"{path} is missing: write deploy_files() there"
        assert path.read_text() == text, f"{path} is stale: write deploy_files() there again"
    checked = promtool.check_text((DEPLOY / "rules" / RULE_FILE).read_text())
    assert checked.ok, checked.output
    assert os.access(DEPLOY / "prometheus.yml", os.R_OK)
