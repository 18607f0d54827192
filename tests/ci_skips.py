"""A pytest plugin: in CI (``CI=true``, which ``.ci/run`` sets) a skip means a part the tests need
is missing — Redis, PostgreSQL, a Debian package — so it fails the run instead of hiding that
feature's tests. Outside CI a skip stays a skip."""

import os
from collections.abc import Generator

import pytest

_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    """Under CI, turn every skip into a failure that names the skip's reason."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if _CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (a needed part is missing): {report.longrepr}"
