"""Makes the shared test helpers in this directory (``support``) and the benchmarks' helpers in
``bench/`` (``nab_scoring``) importable from every test."""

import os
import pathlib
import sys

# statsmodels and numpy spread one fit over every core through OpenBLAS threads, which on a
# 2-core machine running servers beside the tests makes fits up to ten times slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

_TESTS = str(pathlib.Path(__file__).parent)
_BENCH = str(pathlib.Path(__file__).parents[1] / "bench")
for _path in (_BENCH, _TESTS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# In CI (``CI=true``, which ``.ci/run`` sets) a skip means a part the tests need is missing —
# Redis, PostgreSQL, a Debian package — so it fails the run instead of hiding that feature's tests.
_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

if _CI:
    import pytest

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
        """Turn every skip into a failure that names the skip's reason."""
        outcome = yield
        report = outcome.get_result()  # type: ignore[attr-defined]
        if report.skipped and not hasattr(report, "wasxfail"):
            report.outcome = "failed"
            report.longrepr = f"skipped under CI=true (a needed part is missing): {report.longrepr}"
        return None
