"""Durations said for people, never as 2.56712e+06 s."""

from __future__ import annotations

import math

import pytest

from citadel.duration import for_people


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (2_567_120.0, "29 days 17 h"),
        (86400.0, "1 day"),
        (2 * 86400.0 + 60, "2 days"),
        (3 * 3600 + 5 * 60 + 10, "3 h 5 min"),
        (3599.7, "1 h"),
        (150.0, "2 min 30 s"),
        (60.0, "1 min"),
        (45.4, "45 s"),
        (0.25, "0.25 s"),
        (0.0, "0 s"),
        (-90.0, "-1 min 30 s"),
        (math.inf, "forever"),
    ],
)
def test_a_duration_is_said_in_its_two_largest_units(seconds: float, expected: str) -> None:
    """Days and hours, hours and minutes, minutes and seconds, or seconds."""
    assert expected == for_people(seconds)
