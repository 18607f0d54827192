"""Makes the shared test helpers in this directory (``support``) importable from every test."""

import pathlib
import sys

_TESTS = str(pathlib.Path(__file__).parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
