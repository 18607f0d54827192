"""Tests for the metric catalogue, the registry's exposition format and the multi-process merge."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from citadel.metrics import (
    CATALOGUE,
    GATEWAY_REQUESTS,
    SERVICE_INFO,
    MetricSpec,
    Registry,
    SharedMetrics,
    spec,
)

SAMPLE_LINE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})? \S+$")

REQUESTS = MetricSpec(
    name="t_requests_total", kind="counter", help="Requests.", labels=("route", "status")
)
IN_FLIGHT = MetricSpec(name="t_in_flight", kind="gauge", help="In flight.", labels=("model",))
LATENCY = MetricSpec(
    name="t_latency_seconds",
    kind="histogram",
    help="Latency.",
    labels=("model",),
    buckets=(0.125, 1.0),
    unit="seconds",
)


def assert_valid_exposition(text: bytes) -> None:
    """Fail unless every line is a comment or a sample line of the text format."""
    assert text.endswith(b"\n")
    for line in text.decode().splitlines():
        assert line.startswith("#") or SAMPLE_LINE.match(line), line


def test_counter_renders_help_type_and_samples() -> None:
    """A counter renders HELP, TYPE and one sample per label tuple, in insertion order."""
    registry = Registry()
    requests = registry.counter(REQUESTS)
    requests.inc(("/health", "200"))
    requests.inc(("/health", "200"), 2.5)
    requests.inc(("/metrics", "500"))
    expected = (
        "# HELP t_requests_total Requests.\n"
        "# TYPE t_requests_total counter\n"
        't_requests_total{route="/health",status="200"} 3.5\n'
        't_requests_total{route="/metrics",status="500"} 1.0\n'
    )
    assert expected == registry.render().decode()
    assert_valid_exposition(registry.render())


def test_gauge_goes_up_down_and_is_set() -> None:
    """A gauge renders the net of its increments, decrements and sets, infinities as +Inf."""
    registry = Registry()
    in_flight = registry.gauge(IN_FLIGHT)
    in_flight.inc(("a",), 3)
    in_flight.dec(("a",))
    in_flight.set(("b",), 7.25)
    in_flight.set(("c",), math.inf)
    expected = (
        "# HELP t_in_flight In flight.\n"
        "# TYPE t_in_flight gauge\n"
        't_in_flight{model="a"} 2.0\n'
        't_in_flight{model="b"} 7.25\n'
        't_in_flight{model="c"} +Inf\n'
    )
    assert expected == registry.render().decode()
    assert_valid_exposition(registry.render())


def test_histogram_renders_cumulative_buckets_sum_and_count() -> None:
    """A histogram renders cumulative buckets (a bound counts equal values), +Inf, sum, count."""
    registry = Registry()
    latency = registry.histogram(LATENCY)
    for value in (0.0625, 0.125, 0.5, 2.0):
        latency.observe(("m",), value)
    expected = (
        "# HELP t_latency_seconds Latency.\n"
        "# TYPE t_latency_seconds histogram\n"
        't_latency_seconds_bucket{model="m",le="0.125"} 2\n'
        't_latency_seconds_bucket{model="m",le="1.0"} 3\n'
        't_latency_seconds_bucket{model="m",le="+Inf"} 4\n'
        't_latency_seconds_sum{model="m"} 2.6875\n'
        't_latency_seconds_count{model="m"} 4\n'
    )
    assert expected == registry.render().decode()
    assert_valid_exposition(registry.render())


def test_metrics_without_labels_or_samples() -> None:
    """A metric with no samples renders only HELP and TYPE; one without labels has no braces."""
    registry = Registry()
    registry.counter(REQUESTS)
    plain = MetricSpec(name="t_plain_seconds", kind="histogram", help="Plain.", buckets=(1.0,))
    registry.histogram(plain).observe((), 0.5)
    expected = (
        "# HELP t_requests_total Requests.\n"
        "# TYPE t_requests_total counter\n"
        "# HELP t_plain_seconds Plain.\n"
        "# TYPE t_plain_seconds histogram\n"
        't_plain_seconds_bucket{le="1.0"} 1\n'
        't_plain_seconds_bucket{le="+Inf"} 1\n'
        "t_plain_seconds_sum 0.5\n"
        "t_plain_seconds_count 1\n"
    )
    assert expected == registry.render().decode()


def test_empty_registry_renders_nothing() -> None:
    """A registry with no metrics renders an empty body."""
    expected = b""
    assert expected == Registry().render()


def test_label_values_and_help_are_escaped() -> None:
    """Label values escape backslash, double quote and newline; help escapes the first and last."""
    registry = Registry()
    odd = MetricSpec(name="t_odd_total", kind="counter", help='a\\b "q"\nc', labels=("v",))
    registry.counter(odd).inc(('x\\y "z"\nw',))
    expected = (
        '# HELP t_odd_total a\\\\b "q"\\nc\n'
        "# TYPE t_odd_total counter\n"
        't_odd_total{v="x\\\\y \\"z\\"\\nw"} 1.0\n'
    )
    assert expected == registry.render().decode()
    assert_valid_exposition(registry.render())


def test_registering_a_spec_again_returns_the_same_metric() -> None:
    """Registering the same spec twice returns the same object."""
    registry = Registry()
    assert registry.counter(REQUESTS) is registry.counter(REQUESTS)
    assert registry.histogram(LATENCY) is registry.histogram(LATENCY)


def test_registering_a_different_spec_under_a_taken_name_fails() -> None:
    """A different spec with a registered name, or a spec of another kind, raises ValueError."""
    registry = Registry()
    registry.counter(REQUESTS)
    other = MetricSpec(name=REQUESTS.name, kind="counter", help="Other.", labels=("route",))
    with pytest.raises(ValueError, match="t_requests_total"):
        registry.counter(other)
    with pytest.raises(ValueError, match="is a counter, not a Gauge"):
        registry.gauge(REQUESTS)


def test_a_counter_refuses_a_negative_increment() -> None:
    """A negative counter increment raises ValueError naming the metric."""
    counter = Registry().counter(REQUESTS)
    with pytest.raises(ValueError, match="t_requests_total"):
        counter.inc(("/", "200"), -1)


def test_wrong_label_count_is_skipped_at_render() -> None:
    """A series with the wrong number of label values is skipped and reported in a comment."""
    registry = Registry()
    requests = registry.counter(REQUESTS)
    requests.inc(("/only-route",))
    requests.inc(("/", "200"))
    expected = (
        "# HELP t_requests_total Requests.\n"
        "# TYPE t_requests_total counter\n"
        "# citadel: skipped 1 series with wrong label count\n"
        't_requests_total{route="/",status="200"} 1.0\n'
    )
    assert expected == registry.render().decode()


def test_snapshot_is_json_serialisable() -> None:
    """A snapshot survives the standard json module and carries each spec and series."""
    registry = Registry()
    registry.counter(REQUESTS).inc(("/", "200"))
    registry.histogram(LATENCY).observe(("m",), 0.5)
    snapshot = json.loads(json.dumps(registry.snapshot()))
    expected_series = [[["m"], [0, 1, 0, 0.5]]]
    assert expected_series == snapshot["metrics"][1]["series"]
    expected_name = REQUESTS.name
    assert expected_name == snapshot["metrics"][0]["spec"]["name"]


def record(registry: Registry, times: int) -> None:
    """Record ``times`` requests, one gauge unit per request and one latency of 0.5 each."""
    registry.counter(REQUESTS).inc(("/", "200"), times)
    registry.gauge(IN_FLIGHT).inc(("m",), times)
    registry.gauge(SERVICE_INFO).set(("gateway", "0.1.0"), 1)
    for _ in range(times):
        registry.histogram(LATENCY).observe(("m",), 0.5)


def test_shared_metrics_sums_every_worker(tmp_path: Path) -> None:
    """A scrape of one worker renders the sum over every worker's file; info gauges stay at 1."""
    first, second = Registry(), Registry()
    record(first, 2)
    record(second, 3)
    SharedMetrics(second, str(tmp_path), pid=1002).flush()
    expected = Registry()
    record(expected, 5)
    assert expected.render() == SharedMetrics(first, str(tmp_path), pid=1001).render()
    assert_valid_exposition(expected.render())


def test_shared_metrics_sees_later_changes(tmp_path: Path) -> None:
    """Each render flushes this worker's latest state before merging."""
    registry = Registry()
    shared = SharedMetrics(registry, str(tmp_path), pid=1)
    shared.render()
    registry.counter(REQUESTS).inc(("/", "200"))
    assert b'{route="/",status="200"} 1.0' in shared.render()


def test_retire_zeroes_gauges_but_keeps_counts(tmp_path: Path) -> None:
    """A retired worker's file keeps its counters and histograms but reports its gauges as zero."""
    leaving, staying = Registry(), Registry()
    record(leaving, 2)
    shared_leaving = SharedMetrics(leaving, str(tmp_path), pid=1)
    shared_leaving.retire()
    shared_leaving.flush()  # a late periodic flush must not bring the gauges back
    merged = SharedMetrics(staying, str(tmp_path), pid=2).render().decode()
    assert 't_requests_total{route="/",status="200"} 2.0' in merged
    assert 't_latency_seconds_count{model="m"} 2' in merged
    assert 't_in_flight{model="m"} 0.0' in merged
    assert 'citadel_service_info{service="gateway",version="0.1.0"} 0.0' in merged


@pytest.mark.parametrize(
    "content",
    [b'{"metrics": [{"spec": {"na', b"not json", b'{"metrics": 3}', b'{"metrics": [{"spec": {}}]}'],
)
def test_a_corrupt_file_is_skipped(tmp_path: Path, content: bytes) -> None:
    """A partial, malformed or foreign *.json file is skipped and the others still merge."""
    (tmp_path / "999.json").write_bytes(content)
    registry = Registry()
    registry.counter(REQUESTS).inc(("/", "200"))
    assert registry.render() == SharedMetrics(registry, str(tmp_path), pid=1).render()


def test_a_histogram_of_the_wrong_shape_skips_its_whole_file(tmp_path: Path) -> None:
    """A file whose histogram series has the wrong number of buckets contributes nothing."""
    other = Registry()
    other.counter(REQUESTS).inc(("/", "200"))
    other.histogram(LATENCY).observe(("m",), 0.5)
    snapshot = other.snapshot()
    snapshot["metrics"][1]["series"][0][1] = [1, 0.5]
    (tmp_path / "2.json").write_text(json.dumps(snapshot))
    registry = Registry()
    registry.counter(REQUESTS).inc(("/", "200"))
    assert registry.render() == SharedMetrics(registry, str(tmp_path), pid=1).render()


def test_the_catalogue_names_are_unique_and_valid() -> None:
    """Every catalogue name is unique, counters end in _total, and histogram buckets ascend."""
    names = [s.name for s in CATALOGUE]
    assert len(names) == len(set(names))
    for metric in CATALOGUE:
        assert metric.kind != "counter" or metric.name.endswith("_total"), metric.name
        if metric.kind == "histogram":
            assert list(metric.buckets) == sorted(set(metric.buckets)), metric.name


def test_the_whole_catalogue_renders_valid_exposition() -> None:
    """Recording one sample in every catalogue metric renders valid exposition text."""
    registry = Registry()
    for metric in CATALOGUE:
        labels = tuple(f"v{i}" for i in range(len(metric.labels)))
        if metric.kind == "counter":
            registry.counter(metric).inc(labels)
        elif metric.kind == "gauge":
            registry.gauge(metric).set(labels, 1)
        else:
            registry.histogram(metric).observe(labels, 0.3)
    text = registry.render()
    assert_valid_exposition(text)
    assert len(CATALOGUE) == text.count(b"# TYPE ")


def test_spec_looks_up_the_catalogue() -> None:
    """spec() returns the catalogue entry, and its KeyError names an unknown metric."""
    assert GATEWAY_REQUESTS is spec("citadel_gateway_requests_total")
    with pytest.raises(KeyError, match="no_such_metric"):
        spec("no_such_metric")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "bad-name", "kind": "gauge"}, "expected a name"),
        ({"name": "t_requests", "kind": "counter"}, "must end with _total"),
        ({"name": "t_h", "kind": "histogram", "labels": ("le",), "buckets": (1.0,)}, "'le'"),
        ({"name": "t_h", "kind": "histogram", "buckets": (2.0, 1.0)}, "ascending"),
        ({"name": "t_h", "kind": "histogram"}, "ascending"),
        ({"name": "t_g", "kind": "gauge", "buckets": (1.0,)}, "only a histogram"),
        ({"name": "t_g", "kind": "gauge", "labels": ("a", "a")}, "duplicate label"),
    ],
)
def test_an_invalid_spec_is_refused(fields: dict[str, object], message: str) -> None:
    """A spec with an illegal name, label or buckets raises ValueError saying what was expected."""
    with pytest.raises(ValueError, match=message):
        MetricSpec(help="h", **fields)  # type: ignore[arg-type]


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)))
def test_histogram_buckets_are_cumulative(values: list[float]) -> None:
    """For any observations the buckets never decrease and +Inf equals the count."""
    registry = Registry()
    histogram = registry.histogram(LATENCY)
    for value in values:
        histogram.observe(("m",), value)
    lines = registry.render().decode().splitlines()
    buckets = [int(line.rsplit(" ", 1)[1]) for line in lines if "_bucket{" in line]
    counts = [int(line.rsplit(" ", 1)[1]) for line in lines if "_count{" in line]
    if not values:
        assert not buckets
        return
    assert sorted(buckets) == buckets
    assert [len(values)] == counts
    assert len(values) == buckets[-1]
    assert sum(v <= 0.125 for v in values) == buckets[0]
