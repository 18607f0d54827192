"""Makes the shared test helpers in this directory (``support``) importable from every test."""

import os
import pathlib
import sys

# statsmodels and numpy spread one fit over every core through OpenBLAS threads, which on a
# 2-core machine running servers beside the tests makes fits up to ten times slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

_TESTS = str(pathlib.Path(__file__).parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from redis_topologies import topologies  # noqa: E402, F401  (a session fixture)
