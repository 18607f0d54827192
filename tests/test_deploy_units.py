"""The systemd units in deploy/systemd: ``systemd-analyze verify`` accepts them (with the install
prefix pointed at this interpreter's virtualenv, since the check wants the executables to exist),
and each gives the service a writable state directory as its working directory."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
PREFIX = "/opt/citadel/.venv"


def _units() -> list[Path]:
    found = sorted(UNITS.glob("*.service"))
    assert {"citadel-llm@.service", "citadel-ledger-writer.service"} <= {p.name for p in found}
    return found


def _service(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(path, encoding="utf-8")
    return dict(parser["Service"])


@pytest.mark.parametrize("path", _units(), ids=lambda p: p.name)
def test_each_unit_has_a_writable_working_directory(path: Path) -> None:
    """ProtectSystem=strict makes / read-only: the relative spool, journal and SQLite files need
    a state directory to live in, and the working directory must be it."""
    service = _service(path)
    assert "strict" == service["ProtectSystem"]
    assert "citadel" == service["StateDirectory"]
    assert "/var/lib/citadel" == service["WorkingDirectory"]
    assert ("citadel", "citadel") == (service["User"], service["Group"])
    assert service["ExecStart"].startswith(f"{PREFIX}/bin/")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    venv = Path(sys.prefix)
    assert (venv / "bin" / "citadel").exists()
    for path in _units():
        text = path.read_text(encoding="utf-8").replace(PREFIX, str(venv))
        name = path.name.replace("@.service", "@gateway.service")
        (tmp_path / name).write_text(text, encoding="utf-8")
    names = sorted(str(p) for p in tmp_path.iterdir())
    done = subprocess.run(
        ["systemd-analyze", "verify", *names],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Its complaints about the host's own units (a container's) are not ours.
    ours = [line for line in done.stderr.splitlines() if "citadel" in line]
    assert [] == ours, done.stderr
    assert 0 == done.returncode, done.stderr
