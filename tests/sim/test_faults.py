"""Tests for the simulator's fault decisions, control headers and fault flags."""

# the house style writes `assert expected == actual` (STYLE.md)

from __future__ import annotations

import random
from collections import Counter

import pytest

from citadel.cli import build_parser
from citadel.errors import BadRequest, ConfigError
from citadel.sim.config import SimConfig, config_from_args
from citadel.sim.faults import (
    NO_FAULTS,
    Faults,
    decide,
    draw_faults,
    parse_fault_header,
    parse_milliseconds,
)


def _never() -> float:
    raise AssertionError("no random draw expected")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("status=503", Faults(status=503)),
        ("latency=200", Faults(latency_ms=200.0)),
        ("latency=2.5", Faults(latency_ms=2.5)),
        ("hang", Faults(hang=True)),
        ("disconnect=0", Faults(disconnect_after=0)),
        ("malformed", Faults(malformed=True)),
        ("latency=200,disconnect=3", Faults(latency_ms=200.0, disconnect_after=3)),
        (" Status = 429 , LATENCY=10 ", Faults(status=429, latency_ms=10.0)),
        ("linger=500", Faults(linger_ms=500.0)),
        ("status=503,linger=5", Faults(status=503, linger_ms=5.0)),
        ("none", NO_FAULTS),
    ],
)
def test_fault_header_parses(header: str, expected: Faults) -> None:
    """Each valid x-sim-fault form names its faults."""
    assert expected == parse_fault_header(header)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("", "an empty item"),
        ("status=500,", "an empty item"),
        ("explode", "unknown fault 'explode'"),
        ("status", "'status' needs a value"),
        ("status=", "'status' needs a value"),
        ("status=abc", "status=abc is not an integer between 400 and 599"),
        ("status=200", "status=200 is not an integer between 400 and 599"),
        ("status=600", "status=600 is not an integer between 400 and 599"),
        ("status=５０３", "is not an integer between 400 and 599"),
        ("latency=-1", "latency=-1 is not a number of milliseconds >= 0"),
        ("latency=nan", "latency=nan is not a number of milliseconds >= 0"),
        ("latency=inf", "latency=inf is not a number of milliseconds >= 0"),
        ("latency=soon", "latency=soon is not a number of milliseconds >= 0"),
        ("linger=-5", "linger=-5 is not a number of milliseconds >= 0"),
        ("linger", "'linger' needs a value, as in linger=500"),
        ("disconnect=-1", "disconnect=-1 is not an integer between 0 and 1000000"),
        ("hang=1", "'hang' takes no value"),
        ("malformed=yes", "'malformed' takes no value"),
        ("status=500,status=503", "'status' is named twice"),
        ("status=500,hang", "hang, status: at most one of"),
        ("disconnect=1,malformed", "disconnect, malformed: at most one of"),
        ("none,latency=5", "'none' cannot be combined"),
    ],
)
def test_bad_fault_header_is_a_400_naming_the_header(header: str, reason: str) -> None:
    """Each invalid x-sim-fault form is a BadRequest whose message says what is wrong."""
    with pytest.raises(BadRequest) as info:
        parse_fault_header(header)
    assert ("x-sim-fault", "invalid_header") == (info.value.param, info.value.code)
    assert reason in info.value.message


def test_fault_kinds_name_what_is_present() -> None:
    """``kinds`` lists the faults present, by the names the metric counts them under."""
    assert () == NO_FAULTS.kinds
    assert ("latency", "disconnect") == Faults(latency_ms=5, disconnect_after=1).kinds
    assert ("status",) == Faults(status=500).kinds
    assert ("linger",) == Faults(linger_ms=5).kinds


def test_delay_headers_parse_as_milliseconds() -> None:
    """x-sim-ttft-ms takes a number of milliseconds; anything else is a 400 naming the header."""
    assert 250.0 == parse_milliseconds("x-sim-ttft-ms", " 250 ")
    for bad in ("-5", "fast", "nan", "1e12"):
        with pytest.raises(BadRequest) as info:
            parse_milliseconds("x-sim-ttft-ms", bad)
        assert "x-sim-ttft-ms" == info.value.param


def test_no_rates_draw_nothing() -> None:
    """Without fault rates no random number is drawn; a latency flag applies to every request."""
    assert NO_FAULTS is draw_faults(SimConfig(), _never)
    assert Faults(latency_ms=30.0) == draw_faults(SimConfig(latency_ms=30), _never)


def test_one_draw_falls_into_the_rate_bands() -> None:
    """The rates lie end to end on [0, 1): hang, error (spread over the codes), disconnect,
    malformed, then no fault."""
    config = SimConfig(
        hang_rate=0.1,
        error_rate=0.2,
        error_codes=(500, 503),
        disconnect_rate=0.3,
        disconnect_after=4,
        malformed_rate=0.1,
        latency_ms=7,
    )
    draws = [0.05, 0.15, 0.25, 0.35, 0.65, 0.75, 0.9999]
    expected = [
        Faults(latency_ms=7, hang=True),
        Faults(latency_ms=7, status=500),
        Faults(latency_ms=7, status=503),
        Faults(latency_ms=7, disconnect_after=4),
        Faults(latency_ms=7, malformed=True),
        Faults(latency_ms=7),
        Faults(latency_ms=7),
    ]
    assert expected == [draw_faults(config, iter([u]).__next__) for u in draws]


def test_seeded_draws_are_reproducible_and_follow_the_rates() -> None:
    """Two generators with the same seed give the same faults, at about the configured rates."""
    config = SimConfig(error_rate=0.25, error_codes=(500, 502), hang_rate=0.05)
    first, second = random.Random(7), random.Random(7)
    runs = [[draw_faults(config, rng.random) for _ in range(4000)] for rng in (first, second)]
    assert runs[0] == runs[1]
    kinds = Counter(kind for faults in runs[0] for kind in faults.kinds)
    assert 900 <= kinds["status"] <= 1100
    assert 140 <= kinds["hang"] <= 260
    assert {500, 502} == {faults.status for faults in runs[0] if faults.status is not None}


def test_a_header_decides_alone() -> None:
    """A request's x-sim-fault header replaces the server's fault flags entirely."""
    config = SimConfig(error_rate=1.0, latency_ms=50)
    assert NO_FAULTS is decide(config, "none", _never)
    assert Faults(hang=True) == decide(config, "hang", _never)
    assert Faults(latency_ms=50, status=500) == decide(config, None, lambda: 0.0)


def test_fault_flags_build_the_config() -> None:
    """The sim command's flags become a SimConfig."""
    args = build_parser().parse_args(
        ["sim", "--error-rate", "0.1", "--error-codes", "502, 504", "--hang-rate", "0.2",
         "--disconnect-rate", "0.05", "--disconnect-after", "3", "--malformed-rate", "0.01",
         "--latency-ms", "20", "--fault-seed", "9", "--models", "a,b", "--ttft-ms", "5"]
    )  # fmt: skip
    config = config_from_args(args)
    expected = SimConfig(
        models=("a", "b"),
        ttft_ms=5.0,
        latency_ms=20.0,
        error_rate=0.1,
        error_codes=(502, 504),
        hang_rate=0.2,
        disconnect_rate=0.05,
        disconnect_after=3,
        malformed_rate=0.01,
        fault_seed=9,
    )
    assert expected == config


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (["--error-rate", "1.5"], "--error-rate"),
        (["--hang-rate", "0.6", "--error-rate", "0.6"], "--error-rate + --hang-rate"),
        (["--error-codes", "200"], "--error-codes"),
        (["--error-codes", "five"], "--error-codes"),
        (["--ttft-ms", "-1"], "--ttft-ms"),
        (["--completion-tokens", "0"], "--completion-tokens"),
        (["--models", "a,,b"], "--models"),
    ],
)
def test_bad_flags_name_the_flag(flags: list[str], key: str) -> None:
    """A bad flag value is a ConfigError naming the flag."""
    with pytest.raises(ConfigError) as info:
        config_from_args(build_parser().parse_args(["sim", *flags]))
    assert info.value.key.startswith(key)
