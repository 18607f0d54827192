"""The ``citadel`` command as a user runs it: ``python -m citadel`` in a subprocess."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import UP_START, free_port, process_output, start_process, stop_process

DEV_KEY = "sk-citadel-dev"


def citadel(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m citadel ARGS`` to completion (bounded to 30 s); no traceback allowed."""
    result = subprocess.run(
        [sys.executable, "-m", "citadel", *args],
        cwd=cwd,
        env={**_clean_env(), **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "Traceback" not in result.stderr
    return result


SETTING_PREFIXES = ("CITADEL_", "API_GATEWAY_", "SIMULATOR_", "SERVER_IP")


def _clean_env() -> dict[str, str]:
    """This process's environment without settings that would leak into the command."""
    return {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}


def one_line(text: str) -> str:
    """The only line of ``text``; fails when there are more or none."""
    lines = text.splitlines()
    assert 1 == len(lines), text
    return lines[0]


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["--help"], ["up", "serve", "sim", "--config"]),
        (["serve", "--help"], ["gateway", "graphql-api", "--port", "--workers"]),
        (["sim", "--help"], ["--port", "--tbt-ms", "--ttft-ms", "--error-rate"]),
    ],
    ids=["citadel", "serve", "sim"],
)
def test_help_exits_0_and_names_the_commands(
    args: list[str], mentions: list[str], tmp_path: Path
) -> None:
    """Each --help prints usage naming its commands and options, and exits 0."""
    result = citadel(*args, cwd=tmp_path)
    assert (0, "") == (result.returncode, result.stderr)
    assert [] == [word for word in mentions if word not in result.stdout]


def test_version(tmp_path: Path) -> None:
    """--version prints the version and exits 0."""
    result = citadel("--version", cwd=tmp_path)
    assert 0 == result.returncode
    assert re.fullmatch(r"citadel \d+\.\d+\.\d+\S*\n", result.stdout) is not None


@pytest.mark.parametrize(
    "args",
    [["--bogus"], ["up", "--bogus"], ["serve", "gateway", "--bogus"], ["sim", "--bogus=3"]],
    ids=["alone", "up", "serve", "sim"],
)
def test_unknown_flag_is_one_line_naming_it(args: list[str], tmp_path: Path) -> None:
    """An unknown flag exits 2 with one line on stderr that names the flag."""
    result = citadel(*args, cwd=tmp_path)
    assert 2 == result.returncode
    assert args[-1] in one_line(result.stderr)


def test_missing_command_is_one_line(tmp_path: Path) -> None:
    """No command at all exits 2 with one line naming the commands."""
    result = citadel(cwd=tmp_path)
    assert 2 == result.returncode
    assert "up, serve or sim" in one_line(result.stderr)


def test_bad_option_value_is_one_line_naming_it(tmp_path: Path) -> None:
    """An option with a value of the wrong type exits 2 with one line naming the option."""
    result = citadel("serve", "gateway", "--port", "eighty", cwd=tmp_path)
    assert 2 == result.returncode
    assert "--port" in one_line(result.stderr)


def test_broken_yaml_config_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """A config file that is not YAML exits 2 with one line naming the file."""
    config = tmp_path / "broken.yaml"
    config.write_text("gateway: [unclosed\n  workers: {\n")
    result = citadel("--config", str(config), "serve", "gateway", cwd=tmp_path)
    assert 2 == result.returncode
    assert str(config) in one_line(result.stderr)


def test_missing_config_file_is_one_line_naming_it(tmp_path: Path) -> None:
    """A --config file that does not exist exits 2 with one line naming it."""
    missing = tmp_path / "nowhere.yaml"
    result = citadel("--config", str(missing), "up", cwd=tmp_path)
    assert 2 == result.returncode
    assert str(missing) in one_line(result.stderr)


def test_wrong_type_in_config_names_the_key(tmp_path: Path) -> None:
    """A setting of the wrong type exits 2 with one line naming its dotted key."""
    config = tmp_path / "citadel.yaml"
    config.write_text('gateway: {workers: "many"}\n')
    result = citadel("--config", str(config), "serve", "gateway", cwd=tmp_path)
    assert 2 == result.returncode
    assert "gateway.workers" in one_line(result.stderr)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "gateway", "--port", "99999"], "expected an integer port 1-65535, got '99999'"),
        (["serve", "gateway", "--port", "70000"], "expected an integer port 1-65535, got '70000'"),
        (["serve", "gateway", "--port", "-1"], "expected an integer port 1-65535, got '-1'"),
        (["serve", "gateway", "--port", "0"], "expected an integer port 1-65535, got '0'"),
        (["serve", "gateway", "--workers", "0"], "expected an integer >= 1, got '0'"),
        (["sim", "--port", "65536"], "expected an integer port 1-65535, got '65536'"),
        (["sim", "--workers", "-2"], "expected an integer >= 1, got '-2'"),
    ],
)
def test_out_of_range_flags_are_one_line_saying_what_is_expected(
    args: list[str], expected: str, tmp_path: Path
) -> None:
    """A port outside 1-65535 or no workers exits 2 before anything binds, with one line naming
    the flag and what it takes, as the settings file's own checks say it."""
    result = citadel(*args, cwd=tmp_path)
    assert 2 == result.returncode
    line = one_line(result.stderr)
    assert f"argument {args[-2]}: {expected}" in line


def test_citadel_yaml_in_the_working_directory_is_read(tmp_path: Path) -> None:
    """Without --config, ./citadel.yaml is read (a bad one is reported by its key)."""
    (tmp_path / "citadel.yaml").write_text('gateway: {workers: "many"}\n')
    result = citadel("serve", "gateway", cwd=tmp_path)
    assert 2 == result.returncode
    assert "gateway.workers" in one_line(result.stderr)


def test_bad_port_in_the_environment_names_the_variable(tmp_path: Path) -> None:
    """A port variable that is not a number exits 2 with one line naming the variable."""
    result = citadel("serve", "gateway", cwd=tmp_path, env={"ROUTING_API_PORT": "abc"})
    assert 2 == result.returncode
    assert "ROUTING_API_PORT" in one_line(result.stderr)


def test_graphql_schema_prints_the_sdl(tmp_path: Path) -> None:
    """`citadel graphql schema` prints the schema the graphql-api service serves."""
    result = citadel("graphql", "schema", cwd=tmp_path)
    assert 0 == result.returncode, result.stderr
    assert "type Query {" in result.stdout
    assert "usageEvents(" in result.stdout


def test_unknown_service_is_one_line(tmp_path: Path) -> None:
    """Serving a name that is no service exits 2 with one line naming it."""
    result = citadel("serve", "nothing", cwd=tmp_path)
    assert 2 == result.returncode
    assert "'nothing'" in one_line(result.stderr)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_port_taken_is_one_line(workers: str, tmp_path: Path) -> None:
    """A port already in use exits 1 with one line saying so, with one worker or several."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = citadel(
            "serve", "gateway", "--port", str(port), "--workers", workers, cwd=tmp_path
        )
    assert 1 == result.returncode
    assert "in use" in one_line(result.stderr)


def chat(port: int) -> tuple[int, dict[str, object]]:
    """POST a small chat completion to the gateway with the development key."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = {"model": "sim-chat", "messages": [{"role": "user", "content": "hello"}]}
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(body),
            headers={"authorization": f"Bearer {DEV_KEY}", "content-type": "application/json"},
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def refuses(port: int, within: float = 5.0) -> bool:
    """Whether connections to ``port`` are refused, waiting up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
        except ConnectionRefusedError:
            return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_up_starts_the_simulator_and_the_gateway_and_stops_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`citadel up` serves chat completions via the gateway and the simulator; SIGTERM stops all."""
    monkeypatch.chdir(tmp_path)  # no citadel.yaml here: embedded defaults
    for name in [k for k in os.environ if k.startswith(SETTING_PREFIXES)]:
        monkeypatch.delenv(name)
    gateway, simulator = free_port(), free_port()
    env = {
        "API_GATEWAY_PORT": str(gateway),
        "SIMULATOR_PORT": str(simulator),
        "RATE_LIMITING_API_PORT": str(free_port()),
        "ROUTING_API_PORT": str(free_port()),
        "STREAMING_API_PORT": str(free_port()),
    }
    up = [sys.executable, "-m", "citadel", "up"]
    proc = start_process(up, gateway, env=env, timeout=UP_START)
    try:
        status, completion = chat(gateway)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        output = process_output(proc)
    finally:
        stop_process(proc)
    assert 200 == status
    assert "chat.completion" == completion["object"]
    assert re.search(rf"simulator +http://[^\s:]+:{simulator}\n", output) is not None, output
    assert re.search(rf"gateway +http://[^\s:]+:{gateway}\n", output) is not None, output
    assert re.search(r"Citadel is starting:\n  console +http://[^\s:]+:\d+/\n", output), output
    assert "Traceback" not in output
    assert (0, True, True) == (code, refuses(gateway), refuses(simulator))


def _redis_reachable(url: str) -> bool:
    host, _, rest = url.removeprefix("redis://").partition(":")
    try:
        with socket.create_connection((host, int(rest.partition("/")[0])), timeout=1):
            return True
    except OSError:
        return False


def _ledger_requests(database: Path) -> int:
    import sqlite3

    if not database.exists():
        return 0
    with sqlite3.connect(database) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM usage_events").fetchone()[0])
        except sqlite3.OperationalError:  # the tables are not there yet
            return 0


def test_up_runs_a_ledger_writer_when_usage_goes_through_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Redis configured the gateway XADDs usage to a stream, and `citadel up` also runs a
    ledger writer, which stores the request's event in the (SQLite) ledger; SIGTERM stops it
    with the rest. The embedded default (no Redis) runs none: the gateway writes the ledger."""
    redis = os.environ.get("CITADEL_TEST_REDIS", "redis://127.0.0.1:6379/10")
    if not _redis_reachable(redis):
        pytest.skip(f"Redis is not reachable at {redis}")
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith(SETTING_PREFIXES)]:
        monkeypatch.delenv(name)
    stream = f"citadel:{{usage-cli-{os.getpid()}-{time.monotonic_ns()}}}:events"
    (tmp_path / "citadel.yaml").write_text(
        f"endpoints:\n  redis: {redis}\nmetering:\n  stream: '{stream}'\n  flush_seconds: 0.05\n"
    )
    gateway = free_port()
    env = {
        "API_GATEWAY_PORT": str(gateway),
        "SIMULATOR_PORT": str(free_port()),
        "RATE_LIMITING_API_PORT": str(free_port()),
        "ROUTING_API_PORT": str(free_port()),
        "STREAMING_API_PORT": str(free_port()),
        "CUSTOM_METRICS_PORT": str(free_port()),
        "PREDICTIVE_ALERTING_PORT": str(free_port()),
    }
    up = [sys.executable, "-m", "citadel", "up"]
    proc = start_process(up, gateway, env=env, timeout=UP_START)
    try:
        status, _ = chat(gateway)
        deadline = time.monotonic() + 15
        while _ledger_requests(tmp_path / "citadel.db") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        stored = _ledger_requests(tmp_path / "citadel.db")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
        output = process_output(proc)
    finally:
        stop_process(proc)
        subprocess.run(
            ["redis-cli", "-u", redis, "DEL", stream, f"{stream}:dead"],
            capture_output=True,
            check=False,
        )
    assert 200 == status
    assert re.search(r"ledger-writer +citadel:\{usage-cli", output) is not None, output
    assert 1 == stored, output
    assert "Traceback" not in output
    assert 0 == code, output


def test_up_runs_no_ledger_writer_without_redis() -> None:
    """The embedded default: usage goes straight into the ledger, nothing to drain."""
    from citadel.cli import _usage_stream
    from citadel.settings import Endpoints, GatewaySettings, LimitsSettings, Settings

    gateway = GatewaySettings(admin_key="sk-test")
    assert not _usage_stream(Settings(gateway=gateway))
    assert not _usage_stream(Settings(gateway=gateway, endpoints=Endpoints(redis="memory://")))
    assert _usage_stream(Settings(gateway=gateway, endpoints=Endpoints(redis="127.0.0.1:6379")))
    redis_limits = LimitsSettings(backend="redis://127.0.0.1:6379/3")
    assert _usage_stream(Settings(gateway=gateway, limits=redis_limits))


def test_the_up_banner_aligns_its_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row's address starts in the same column, however long the service's name."""
    from citadel.cli import banner
    from citadel.settings import load_settings

    monkeypatch.delenv("CITADEL_ADMIN_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, {})
    plan: list[tuple[str, list[str], int | None]] = [
        ("simulator", ["sim"], 8100),
        ("gateway", ["serve"], 8000),
        ("predictive-alerting", ["serve"], 9092),
        ("ledger-writer", ["writer"], None),
    ]
    rows = banner(plan, settings).splitlines()[1:]
    addresses = [
        f"http://localhost:{settings.ports.grafana_dashboards}/",  # the console, first
        "http://localhost:8100",
        "http://localhost:8000",
        "http://localhost:9092",
        settings.metering.stream,
        settings.gateway.admin_key,
    ]
    assert len(addresses) == len(rows)
    assert 1 == len({row.index(address) for row, address in zip(rows, addresses, strict=True)})
    assert all(row.endswith(address) for row, address in zip(rows, addresses, strict=True))
