"""Run ``promtool`` (Debian package ``prometheus``) on generated rules and their unit tests."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from citadel.observability.names import Slo
from citadel.observability.rules import dump, promtool_tests, rules_yaml

RULE_FILE = "citadel.rules.yml"


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    output: str


def available() -> bool:
    return shutil.which("promtool") is not None


def _run(args: list[str], cwd: str, timeout: float) -> Outcome:
    try:
        done = subprocess.run(
            ["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return Outcome(False, f"promtool {args[0]} {args[1]} took over {timeout:g} s")
    return Outcome(done.returncode == 0, (done.stdout + done.stderr).strip())


def check_text(text: str, timeout: float = 30.0) -> Outcome:
    """``promtool check rules`` on a rule file's text."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, RULE_FILE).write_text(text)
        return _run(["check", "rules", RULE_FILE], tmp, timeout)


def run_tests(slos: Sequence[Slo], tests: object | None = None, timeout: float = 300.0) -> Outcome:
    """``promtool test rules`` on the generated rules and their generated cases (or ``tests``)."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, RULE_FILE).write_text(rules_yaml(slos))
        Path(tmp, "tests.yml").write_text(
            dump(tests if tests is not None else promtool_tests(slos))
        )
        return _run(["test", "rules", "tests.yml"], tmp, timeout)
