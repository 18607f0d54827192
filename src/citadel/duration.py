"""Durations for people: ``for_people(2_567_120.0) == "29 days 17 h"``.

A machine field keeps its seconds (``crossing_in_seconds``); text a person reads (an alert's
description, an API reply's ``detail``, a command's output) says the duration in its two
largest units, rounded to the smaller one, never as ``2.56712e+06 s``. Under a minute it keeps
what precision the seconds have (``0.25 s``, ``12 s``).
"""

from __future__ import annotations

import math

__all__ = ["for_people"]

_UNITS = ((86400, "day"), (3600, "h"), (60, "min"), (1, "s"))


def _unit(count: int, name: str) -> str:
    if name == "day":
        return f"{count} day" if count == 1 else f"{count} days"
    return f"{count} {name}"


def for_people(seconds: float) -> str:
    """``seconds`` in its two largest units ("29 days 17 h", "3 h 5 min", "2 min 30 s",
    "45 s", "0.25 s"); negative durations keep their sign, non-finite ones are "forever"."""
    if not math.isfinite(seconds):
        return "forever"
    if seconds < 0:
        return f"-{for_people(-seconds)}"
    if seconds < 60:
        return f"{seconds:.3g} s" if seconds < 10 else f"{round(seconds)} s"
    for i, (size, name) in enumerate(_UNITS[:-1]):
        if seconds < size:
            continue
        small, small_name = _UNITS[i + 1]
        total = round(seconds / small)  # in the smaller unit, so 59 min 59.7 s is "1 h"
        big, rest = divmod(total, size // small)
        if i > 0 and big * size >= _UNITS[i - 1][0]:  # rounded up into the larger unit
            return for_people(float(big * size))
        return _unit(big, name) if rest == 0 else f"{_unit(big, name)} {_unit(rest, small_name)}"
    raise AssertionError("unreachable: seconds >= 60 fits a unit")
