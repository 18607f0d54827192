"""Under ``CI=true`` a skipped test fails the run: a missing Redis or PostgreSQL cannot pass CI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

_SKIPPING = """
import pytest

def test_needs_a_server():
    pytest.skip("Redis is not reachable")
"""


def _run(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_skipping.py").write_text(_SKIPPING)
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "CI": ci, "PYTHONPATH": path}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "ci_skips"]
    return subprocess.run(
        [*command, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(("ci", "code", "summary"), [("true", 1, "1 failed"), ("", 0, "1 skipped")])
def test_a_skip_fails_only_under_ci(tmp_path: Path, ci: str, code: int, summary: str) -> None:
    """The same skipping test fails with CI=true and is a plain skip without it."""
    result = _run(tmp_path, ci)
    assert (code, True) == (result.returncode, summary in result.stdout), result.stdout
