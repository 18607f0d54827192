"""Stored Responses API responses live in Redis when the gateway has one: a response made through
one gateway replica is found, continued and deleted through another."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import openai
import pytest

from gateway_helpers import ADMIN_KEY
from support import free_port, start_process, stop_process

REDIS = os.environ.get("CITADEL_TEST_REDIS", "redis://127.0.0.1:6379/10")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("stored")
    sim_port = free_port()
    config = tmp / "citadel.yaml"
    config.write_text(
        f"""
accounts: {{database: "sqlite+aiosqlite:///{tmp / "accounts.db"}"}}
endpoints: {{redis: "{REDIS}"}}
metering: {{stream: "citadel:{{usage-stored-{os.getpid()}}}:events", journal: false,
           spool_path: "{tmp / "spool"}"}}
models:
  - name: sim-chat
    deployments: [{{name: sim-a, url: "http://127.0.0.1:{sim_port}", model: sim-chat}}]
"""
    )
    sim = start_process([sys.executable, "-m", "citadel", "sim", "--port", str(sim_port)], sim_port)
    gateways = []
    try:
        for _ in range(2):
            port = free_port()
            command = [sys.executable, "-m", "citadel", "--config", str(config)]
            gateways.append(
                (
                    start_process(
                        [*command, "serve", "gateway", "--port", str(port)],
                        port,
                        env={"CITADEL_ADMIN_KEY": ADMIN_KEY},
                    ),
                    f"http://127.0.0.1:{port}/v1",
                )
            )
        yield gateways[0][1], gateways[1][1]
    finally:
        for proc, _ in gateways:
            stop_process(proc)
        stop_process(sim)
        stream = f"citadel:{{usage-stored-{os.getpid()}}}:events"
        subprocess.run(["redis-cli", "-u", REDIS, "DEL", stream], capture_output=True, check=False)


def _client(url: str, key: str = ADMIN_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0)


def test_a_response_made_on_one_replica_is_found_continued_and_deleted_on_another(
    replicas: tuple[str, str],
) -> None:
    one, other = replicas
    with _client(one) as a, _client(other) as b:
        made = a.responses.create(model="sim-chat", input="Say hello")
        assert made.output_text == b.responses.retrieve(made.id).output_text
        follow = b.responses.create(model="sim-chat", input="Again", previous_response_id=made.id)
        assert follow.usage is not None
        assert made.usage is not None
        assert follow.usage.input_tokens > made.usage.input_tokens  # the history came from Redis
        streamed = list(b.responses.create(model="sim-chat", input="Stream it", stream=True))
        final = streamed[-1].response  # type: ignore[union-attr]
        assert final.output_text == a.responses.retrieve(final.id).output_text
        b.responses.delete(made.id)
        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve(made.id)


def test_a_response_not_stored_is_not_found_anywhere(replicas: tuple[str, str]) -> None:
    one, other = replicas
    with _client(one) as a, _client(other) as b:
        made = a.responses.create(model="sim-chat", input="Say hello", store=False)
        for client in (a, b):
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(made.id)


def test_an_overlong_id_is_a_404_that_does_not_echo_it(replicas: tuple[str, str]) -> None:
    with _client(replicas[0]) as a, pytest.raises(openai.NotFoundError) as caught:
        a.responses.retrieve("resp_" + "x" * 5000)
    assert len(str(caught.value)) < 400
