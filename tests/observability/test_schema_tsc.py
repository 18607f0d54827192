"""Every generated dashboard type-checks as the published schema's ``Dashboard`` (the classic
JSON model of ``@grafana/schema`` on npm, Grafana Labs' generated TypeScript types), with ``tsc``.

The test installs ``@grafana/schema`` at the versions in ``SCHEMA_VERSIONS`` (npm aliases, so
three Grafana lines in one install) and ``typescript`` into a temporary directory, writes one
``.ts`` file per version in which each dashboard — as ``GET /v1/dashboards/{uid}`` and
``citadel dashboards export`` serve it, and as provisioned (``for_grafana``) — is an object
literal typed ``Dashboard``, and runs ``tsc --noEmit --strict``. An object literal gets
TypeScript's excess-property check, so a field the schema does not know is an error, as is a
wrong type or an enum value out of range. A control file with two deliberate mistakes must fail
with exactly those two errors, so the check is known to bite.

Needs Node and npm (Debian: ``nodejs``, ``npm``; ``.ci/run`` installs them) and the npm
registry; each step has a bounded timeout.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from citadel.observability.dashboards import DASHBOARDS, grafana_json
from citadel.observability.grafana import for_grafana

# The Grafana lines checked: 11.6 (what grafana-foundation-sdk's 11.6 builds target), the last
# 12.x and 13.x (whose v1 ``Dashboard`` type is still the classic JSON file provisioning takes).
SCHEMA_VERSIONS = {"schema11": "11.6.16", "schema12": "12.4.11", "schema13": "13.2.3"}
TYPESCRIPT = "5.9.3"
NPM = shutil.which("npm")
NODE = shutil.which("node")

pytestmark = pytest.mark.timeout(300)

BAD = """import type { Dashboard } from "schema11";
export const bad: Dashboard = {
  title: "bad", uid: "bad", schemaVersion: 39,
  panels: [{ type: "timeseries", id: 1, gridPos: { h: "8", w: 12, x: 0, y: 0 } }],
  templating: { list: [{ name: "x", type: "query", auto_min: "10s" }] },
};
"""


def _ts(alias: str) -> str:
    lines = [f'import type {{ Dashboard }} from "{alias}";\n']
    for board in DASHBOARDS:
        name = board.uid.replace("-", "_")
        for suffix, data in (("", grafana_json(board)), ("_provisioned", for_grafana(board))):
            literal = json.dumps(data, indent=1)
            lines.append(f"export const {name}{suffix}: Dashboard = {literal};\n")
    return "".join(lines)


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(args)} took over {timeout:g} s") from exc


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert NPM, "needs npm (Debian: apt-get install nodejs npm)"
    assert NODE, "needs Node (Debian: apt-get install nodejs)"
    where = tmp_path_factory.mktemp("grafana-schema")
    deps: dict[str, Any] = {a: f"npm:@grafana/schema@{v}" for a, v in SCHEMA_VERSIONS.items()}
    deps["typescript"] = TYPESCRIPT
    (where / "package.json").write_text(json.dumps({"private": True, "dependencies": deps}))
    installed = _run(
        [NPM, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
        where,
        150,
    )
    assert installed.returncode == 0, f"npm install failed:\n{installed.stderr[-3000:]}"
    for alias, version in SCHEMA_VERSIONS.items():
        meta = json.loads((where / "node_modules" / alias / "package.json").read_text())
        assert (meta["name"], meta["version"]) == ("@grafana/schema", version)
    return where


def test_every_dashboard_is_a_grafana_schema_dashboard(project: Path) -> None:
    files = [f"{alias}.ts" for alias in SCHEMA_VERSIONS]
    for alias, name in zip(SCHEMA_VERSIONS, files, strict=True):
        (project / name).write_text(_ts(alias))
    (project / "control.ts").write_text(BAD)
    config = {
        "compilerOptions": {
            "strict": True,
            "noEmit": True,
            "module": "nodenext",
            "moduleResolution": "nodenext",
            "target": "es2022",
            "skipLibCheck": True,
        },
        "files": [*files, "control.ts"],
    }
    (project / "tsconfig.json").write_text(json.dumps(config))
    tsc = project / "node_modules" / "typescript" / "bin" / "tsc"
    done = _run([str(NODE), str(tsc), "-p", "."], project, 150)
    errors = re.findall(r"^(\S+?)\(\d+,\d+\): error (TS\d+)", done.stdout, re.M)
    theirs = [line for line in done.stdout.splitlines() if not line.startswith("control.ts")]
    assert not [e for e in errors if e[0] != "control.ts"], "\n".join(theirs[:40])
    # The control: a string where the schema wants a number, a field VariableModel lacks.
    assert sorted(code for file, code in errors if file == "control.ts") == ["TS2322", "TS2353"]
    assert done.returncode != 0
    assert len(DASHBOARDS) >= 5
