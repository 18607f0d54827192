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

from ci_skips import pytest_runtest_makereport  # noqa: E402, F401  (CI=true: a skip fails)
from redis_topologies import topologies  # noqa: E402, F401  (a session fixture)
