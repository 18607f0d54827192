"""``/v1/responses`` forwarded as-is to a deployment that speaks the Responses API (``responses:
true``), against a real simulator, gateway, Redis limiter and the ``openai`` SDK.

The simulator's own Responses ids are ``resp_`` + its per-process prefix (the one its chat ids
carry) + a counter; the gateway's translation mints ``resp_`` + 48 random hex digits. So an id
with the simulator's prefix proves the reply came from the upstream's own ``/v1/responses``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import orjson
import pytest

from citadel.accounts.sql import open_store
from citadel.metering.events import UsageEvent
from citadel.metering.ledger import decode_event

from gateway_helpers import ADMIN_KEY, metric_value, post_json, request
from openai_schemas import assert_conforms, assert_event_conforms
from support import free_port, start_process, stop_process, wait_for

REDIS_DB = 6
REDIS = os.environ.get("CITADEL_TEST_REDIS", f"redis://127.0.0.1:6379/{REDIS_DB}")
STREAM = f"citadel:{{usage-passthrough-{os.getpid()}}}:events"


@dataclass(frozen=True)
class Stack:
    gateway: str  # base URL
    sim: str
    sim_prefix: str  # the simulator's id prefix (from its chat ids)
    database: str


def _redis(*args: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-u", REDIS, "--raw", *args],
        check=True,
        capture_output=True,
        timeout=10,
    )
    return done.stdout.decode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("passthrough")
    sim_port, gw_port, dead_port = free_port(), free_port(), free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    database = f"sqlite+aiosqlite:///{tmp / 'accounts.db'}"
    config = tmp / "citadel.yaml"
    config.write_text(
        f"""
accounts: {{database: "{database}", key_cache_ttl_seconds: 0.2, default_tier: roomy}}
limits: {{backend: "{REDIS}", default_max_tokens: 100}}
metering: {{stream: "{STREAM}", journal: false, flush_seconds: 0.05,
           spool_path: "{tmp / "spool"}"}}
routing:
  breaker: {{consecutive_failures: 1000000, minimum_calls: 1000000}}
tiers:
  roomy: {{}}
  tiny: {{requests_per_minute: 2}}
  single: {{concurrent_requests: 1}}
models:
  - name: sim-native
    price: {{input_per_1k: 1.0, output_per_1k: 2.0}}
    deployments: [{{name: native-a, url: "{sim_url}", model: sim-chat, responses: true}}]
  - name: sim-translated
    deployments: [{{name: chat-a, url: "{sim_url}", model: sim-chat}}]
  - name: native-then-translated
    fallbacks: [sim-translated]
    deployments:
      - {{name: native-dead, url: "http://127.0.0.1:{dead_port}", responses: true}}
"""
    )
    sim = start_process([sys.executable, "-m", "citadel", "sim", "--port", str(sim_port)], sim_port)
    try:
        command = [sys.executable, "-m", "citadel", "--config", str(config)]
        gateway = start_process(
            [*command, "serve", "gateway", "--port", str(gw_port)],
            gw_port,
            env={"CITADEL_ADMIN_KEY": ADMIN_KEY},
        )
        try:
            with openai.OpenAI(base_url=f"{sim_url}/v1", api_key="x", max_retries=0) as direct:
                chat_id = direct.chat.completions.create(
                    model="sim-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=1
                ).id
            prefix = chat_id.removeprefix("chatcmpl-")[:16]
            yield Stack(f"http://127.0.0.1:{gw_port}", sim_url, prefix, database)
        finally:
            stop_process(gateway)
    finally:
        stop_process(sim)
        _redis("DEL", STREAM)


def new_key(database: str, tier: str) -> tuple[str, str]:
    """A fresh user of ``tier`` and an API key of theirs: (key id, secret)."""

    async def make() -> tuple[str, str]:
        store = await open_store(database, migrate=True)
        try:
            user = await store.create_user(
                name="tester", email=f"{uuid.uuid4().hex}@example.com", tier=tier
            )
            key, secret = await store.create_key(user.id, name="test")
            return key.id, secret
        finally:
            await store.aclose()

    return asyncio.run(make())


def client(stack: Stack, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=secret, max_retries=0)


def usage_events(key_id: str, count: int) -> list[UsageEvent]:
    """The usage events of ``key_id`` in the gateway's stream, once there are ``count``."""

    def read() -> list[UsageEvent] | None:
        found = [
            event
            for line in _redis("XRANGE", STREAM, "-", "+").splitlines()
            if line.startswith("[")
            for event in (decode_event(line),)
            if event.key_id == key_id
        ]
        return found if len(found) >= count else None

    events: list[UsageEvent] = wait_for(f"{count} usage events of {key_id}", read, timeout=10)
    return events


def gateway_metric(stack: Stack, name: str, **labels: str) -> float:
    status, _, body = request(stack.gateway, "GET", "/metrics")
    assert status == 200
    return metric_value(body.decode(), name, **labels)


def is_the_sims(stack: Stack, response_id: str) -> bool:
    return response_id.startswith(f"resp_{stack.sim_prefix}")


def test_a_plain_reply_comes_from_the_upstreams_own_responses_api_and_is_metered(
    stack: Stack,
) -> None:
    key_id, secret = new_key(stack.database, "roomy")
    served = {"endpoint": "responses", "deployment": "native-a", "status": "200"}
    before = gateway_metric(stack, "citadel_gateway_requests_total", **served)
    with client(stack, secret) as c:
        made = c.responses.create(model="sim-native", input="Say hello", max_output_tokens=20)
        translated = c.responses.create(model="sim-translated", input="Say hello")
        assert made.usage is not None
        assert is_the_sims(stack, made.id), made.id
        assert not is_the_sims(stack, translated.id)  # the gateway's translation: its own ids
        assert made.model == "sim-native"  # named as the client asked, not the upstream's name
        assert made.status == "incomplete"  # max_output_tokens reached, as the sim answered
        assert made.output_text
        assert (made.usage.output_tokens, made.usage.total_tokens) == (
            20,
            made.usage.input_tokens + 20,
        )
        stored = c.responses.retrieve(made.id)  # the gateway kept the upstream's response
        assert (stored.id, stored.output_text) == (made.id, made.output_text)
        c.responses.delete(made.id)
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(made.id)
    event = next(e for e in usage_events(key_id, 2) if e.deployment == "native-a")
    assert (event.endpoint, event.model, event.status, event.streamed) == (
        "responses",
        "sim-native",
        200,
        False,
    )
    assert (event.prompt_tokens, event.completion_tokens) == (made.usage.input_tokens, 20)
    assert not event.usage_estimated
    # the price: 1.0 per 1k input tokens, 2.0 per 1k output tokens, in micro-USD
    assert event.cost_micros == made.usage.input_tokens * 1000 + 20 * 2000
    assert before + 1 == gateway_metric(stack, "citadel_gateway_requests_total", **served)


def test_a_stream_is_the_upstreams_own_events_relayed_and_metered(stack: Stack) -> None:
    key_id, secret = new_key(stack.database, "roomy")
    with client(stack, secret) as c:
        events = list(c.responses.create(model="sim-native", input="Tell me a story", stream=True))
        kinds = [e.type for e in events]
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert kinds[-1] == "response.completed"
        assert "response.output_text.delta" in kinds
        assert [e.sequence_number for e in events] == list(range(len(events)))
        final = events[-1].response  # type: ignore[union-attr]
        created = events[0].response  # type: ignore[union-attr]
        assert is_the_sims(stack, final.id)
        assert final.id == created.id
        assert final.model == created.model == "sim-native"
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
        assert text == final.output_text
        assert final.usage is not None
        assert final.usage.output_tokens > 0
        # stored once the stream ended, and continued without the upstream knowing the id:
        # the simulator stores nothing and answers a previous_response_id with a 404
        assert c.responses.retrieve(final.id).output_text == final.output_text
        follow = c.responses.create(
            model="sim-native", input="Go on", previous_response_id=final.id
        )
        assert is_the_sims(stack, follow.id)
        assert follow.previous_response_id == final.id
        assert follow.usage is not None
        assert follow.usage.input_tokens > final.usage.input_tokens  # the history went upstream
    streamed = next(e for e in usage_events(key_id, 2) if e.streamed)
    assert (streamed.endpoint, streamed.deployment, streamed.status) == (
        "responses",
        "native-a",
        200,
    )
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (
        final.usage.input_tokens,
        final.usage.output_tokens,
    )
    assert not streamed.usage_estimated
    assert streamed.ttft_seconds is not None


def test_a_rate_limited_key_gets_openais_429(stack: Stack) -> None:
    key_id, secret = new_key(stack.database, "tiny")  # two requests a minute
    with client(stack, secret) as c:
        c.responses.create(model="sim-native", input="one")
        list(c.responses.create(model="sim-native", input="two", stream=True))
        with pytest.raises(openai.RateLimitError) as caught:
            c.responses.create(model="sim-native", input="three")
    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["x-citadel-limit"] == "requests_per_minute"
    refused = [e for e in usage_events(key_id, 3) if e.status == 429]
    assert [(e.endpoint, e.reason, e.refused) for e in refused] == [
        ("responses", "requests_per_minute", True)
    ]


def test_upstream_errors_are_mapped_as_for_chat(stack: Stack) -> None:
    _, secret = new_key(stack.database, "roomy")
    with client(stack, secret) as c:
        with pytest.raises(openai.BadRequestError) as refused:
            c.responses.create(
                model="sim-native", input="x", extra_headers={"x-sim-fault": "status=400"}
            )
        # the upstream's refusal passes whole: its code and message, the deployment a header
        assert refused.value.code == "simulated_fault"
        assert "status 400" in refused.value.message
        assert refused.value.response.headers["x-citadel-deployment"] == "native-a"
        with pytest.raises(openai.RateLimitError) as busy:
            c.responses.create(
                model="sim-native", input="x", extra_headers={"x-sim-fault": "status=429"}
            )
        assert busy.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.InternalServerError) as failed:
            c.responses.create(
                model="sim-native", input="x", extra_headers={"x-sim-fault": "status=500"}
            )
        assert (failed.value.status_code, failed.value.code) == (502, "upstream_500")
        with pytest.raises(openai.BadRequestError) as invalid:  # checked before any upstream
            c.responses.create(model="sim-native", input=[])
        assert invalid.value.param == "input"


def test_a_stream_the_upstream_breaks_off_ends_failed_and_is_metered_as_such(
    stack: Stack,
) -> None:
    key_id, secret = new_key(stack.database, "roomy")
    with client(stack, secret) as c:
        events = list(
            c.responses.create(
                model="sim-native",
                input="Tell me a story",
                stream=True,
                extra_headers={"x-sim-fault": "disconnect=3"},
            )
        )
    kinds = [e.type for e in events]
    assert kinds[-2:] == ["error", "response.failed"]
    assert kinds.count("response.output_text.delta") == 3
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "127.0.0.1" not in str(events[-2])  # no internal URL in what the client sees
    failed = events[-1].response  # type: ignore[union-attr]
    assert is_the_sims(stack, failed.id)
    assert failed.status == "failed"
    [event] = usage_events(key_id, 1)
    assert (event.endpoint, event.status, event.reason) == (
        "responses",
        502,
        "upstream_stream_broken",
    )
    assert event.usage_estimated
    assert event.completion_tokens >= 3


def test_a_fallback_without_the_flag_is_translated(stack: Stack) -> None:
    """The flag is per deployment: when the native one is down, the fallback model's chat
    deployment serves the same request through the translation."""
    _, secret = new_key(stack.database, "roomy")
    with client(stack, secret) as c:
        raw = c.responses.with_raw_response.create(model="native-then-translated", input="hi")
        made = raw.parse()
        assert raw.headers["x-citadel-deployment"] == "chat-a"
        assert not is_the_sims(stack, made.id)
        assert made.output_text
        assert c.responses.retrieve(made.id).id == made.id


def test_passed_through_replies_and_events_conform_to_openais_schemas(stack: Stack) -> None:
    """The whole reply, the relayed events and the events the gateway adds to a stream the
    upstream broke off (``error``, ``response.failed``) match OpenAI's description."""
    plain = {"model": "sim-native", "input": "x"}
    status, headers, body = post_json(stack.gateway, "/v1/responses", plain)
    assert (status, headers["x-citadel-deployment"]) == (200, "native-a")
    assert_conforms("Response", orjson.loads(body))
    for fault in ("none", "disconnect=2"):
        status, _, body = post_json(
            stack.gateway,
            "/v1/responses",
            {**plain, "stream": True},
            {"x-sim-fault": fault},
        )
        assert status == 200
        events = [orjson.loads(b.split(b"\ndata: ", 1)[1]) for b in body.split(b"\n\n") if b]
        assert events[-1]["type"] == (
            "response.completed" if fault == "none" else "response.failed"
        )
        for event in events:
            assert_event_conforms(event)


def test_a_client_that_leaves_a_passed_through_stream_frees_its_concurrency_lease(
    stack: Stack,
) -> None:
    """The upstream's stream is closed, the call settled as a 499 (the lease returned), so a key
    allowed one request at a time can make the next one."""
    key_id, secret = new_key(stack.database, "single")
    aborted = "citadel_sim_requests_aborted_total"
    before = metric_value(request(stack.sim, "GET", "/metrics")[2].decode(), aborted)
    with client(stack, secret) as c:
        with c.responses.create(
            model="sim-native",
            input="Tell me a long story",
            max_output_tokens=200,
            stream=True,
            extra_headers={"x-sim-tbt-ms": "50"},
        ) as stream:
            for event in stream:
                if event.type == "response.output_text.delta":
                    break
        [left] = usage_events(key_id, 1)
        assert (left.endpoint, left.status, left.reason, left.cancelled) == (
            "responses",
            499,
            "client_closed",
            True,
        )
        wait_for(  # the gateway closed the upstream's stream: the simulator stopped generating
            "the simulator to count the abort",
            lambda: (
                metric_value(request(stack.sim, "GET", "/metrics")[2].decode(), aborted) > before
            ),
            timeout=10,
        )
        again = c.responses.create(model="sim-native", input="Now a short one")
        assert is_the_sims(stack, again.id)
